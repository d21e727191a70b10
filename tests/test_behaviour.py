"""The public CLI's outputs on a tiny fixed-seed world equal the recorded golden file (tests/golden/).

Runs tests/golden/record_behaviour.py --check (about 2 minutes on one core): extract store arrays, the GATE
ranking, train-seg / eval-seg / train-cls metrics, compared exactly. If a change alters the maths on purpose,
re-record as tests/golden/README.md says.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


@pytest.mark.slow
def test_cli_behaviour_equals_the_golden_record(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)  # this checkout's code
    proc = subprocess.run([sys.executable, str(GOLDEN / "record_behaviour.py"), "--workdir", str(tmp_path / "w"),
                           "--check", str(GOLDEN / "behaviour.json"), "--out", str(tmp_path / "behaviour.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
