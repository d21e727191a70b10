"""`difffeat bench` and the GPU check script, on the CPU with tiny configurations (issue 17)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from difffeat.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFFEAT_CACHE", str(tmp_path / "cache"))


def test_bench_measures_difffeat_bare_and_the_naive_loop(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--quiet", "bench", "--model", "mini-random", "--n", "6", "--batch-size", "4", "--compare", "naive",
                 "--compare", "bare", "--json", str(out), "--tmp-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mini-random 64×64, layers up_blocks.1, t=50, fp32, batch 4, attention sdpa, compile off")
    # Peak memory reads GiB once the process (an xdist worker, after other tests) has passed 1 GiB.
    assert re.search(r"\| difffeat \| 6 \| [\d.]+ \| [\d.]+ \| [\d.]+ [MG]iB \|", printed)
    assert "- bare / difffeat:" in printed and "- difffeat / naive:" in printed
    result = json.loads(out.read_text())
    assert set(result["contenders"]) == {"difffeat", "bare", "naive"}
    for r in result["contenders"].values():
        assert r["images"] == 6 and r["images_per_second"] > 0 and r["peak_memory_bytes"] > 100 * 2**20
        split = r["ms_per_image"]
        assert set(split) == {"decode", "vae", "text", "unet", "copy", "write", "other"}
        # The phases account for the time: their sum is the wall time per image.
        assert abs(sum(split.values()) - 1000 * r["seconds"] / r["images"]) < 0.05 * 1000 * r["seconds"] / r["images"]
    assert result["contenders"]["difffeat"]["ms_per_image"]["unet"] > 0
    assert result["contenders"]["naive"]["ms_per_image"]["decode"] > 0, "the naive loop decodes as it goes"
    assert result["contenders"]["bare"]["ms_per_image"]["decode"] == 0, "bare compute has its images in memory"
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["versions"]["torch"] and machine["versions"]["xformers"]
    assert len(machine["load_average"]) == 3 and result["ratios"]["bare_over_difffeat"] > 0
    assert list(tmp_path.glob("difffeat-bench-*")) == [], "inputs and stores are cleaned up"
    assert main(["--quiet", "bench", "--model", "mini-random", "--n", "2", "--json", str(out)]) == 2, "not replaced"


def test_bench_auto_batch_and_xformers_fallback(tmp_path, capsys):
    assert main(["--quiet", "bench", "--model", "mini-random", "--n", "4", "--batch-size", "auto", "--attention",
                 "xformers", "--max-memory", "2"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == ["difffeat: warning: xformers requested but not usable: xformers needs a CUDA device and this "
                        "run is on cpu; using torch SDPA"]
    result = json.loads(captured.out[captured.out.index("\n{") + 1:])
    assert result["attention"] == "sdpa" and isinstance(result["config"]["batch_size"], int)
    assert result["warmup"]["batch_sizing"]["source"] == "probe"
    assert "(auto)" in captured.out.splitlines()[0]


def test_bench_rejects_bad_flags_in_one_line(capsys):
    assert main(["bench", "--batch-size", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "difffeat: error: --batch-size: must be a whole number ≥ 1 or auto, got 'many'"
    assert main(["bench", "--n", "0"]) == 2
    assert "--n: must be ≥ 1" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_script_runs_in_its_tiny_cpu_configuration(tmp_path):
    """benchmarks/gpu.sh as a GPU machine will run it, on mini-random at 64² (one of its four configurations here:
    SDPA with the baselines; the compiled path is checked against eager features in test_fast_paths)."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFFEAT_BENCH_TINY": "1", "DIFFFEAT_RESULTS": str(results)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--only", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert re.search(r"## gpu\.sh \(\d{4}-\d\d-\d\d\) on .+, \d+ cores — tiny CPU check", text)
    assert "### SDPA, compile off" in text
    assert "| naive |" in text and "| bare |" in text and "- best difffeat:" in text
    rows = json.loads((tmp_path / "gpu-results-tiny.json").read_text())
    assert [r["name"] for r in rows] == ["SDPA, compile off"]
    assert rows[0]["config"]["compile"] is False and rows[0]["config"]["dtype"]
    assert rows[0]["config"]["layers"] == ["up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0",
                                           "up_blocks.2.attentions.2"], "gdf-legacy"


def test_bench_runs_its_contenders_on_a_diffusion_transformer(tmp_path, capsys):
    """mini-dit: bare is VAE encode + the transformer stopped after the deepest block, naive the full per-image
    loop; every contender has its time split (no timing assertions)."""
    out = tmp_path / "bench.json"
    assert main(["--quiet", "bench", "--model", "mini-dit", "--layer", "dit-middle", "--n", "4", "--batch-size", "2",
                 "--compare", "bare", "--compare", "naive", "--json", str(out), "--tmp-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mini-dit 64×64, layers transformer_blocks.2, t=50, fp32, batch 2")
    assert "- bare / difffeat:" in printed and "- difffeat / naive:" in printed
    result = json.loads(out.read_text())
    assert set(result["contenders"]) == {"difffeat", "bare", "naive"}
    for r in result["contenders"].values():
        assert r["images"] == 4 and r["images_per_second"] > 0
        assert set(r["ms_per_image"]) == {"decode", "vae", "text", "unet", "copy", "write", "other"}
        assert r["ms_per_image"]["vae"] > 0 and r["ms_per_image"]["unet"] > 0, "the transformer's time is 'unet'"
    assert result["contenders"]["bare"]["ms_per_image"]["decode"] == 0
    assert result["ratios"]["bare_over_difffeat"] > 0 and result["ratios"]["difffeat_over_naive"] > 0
    assert list(tmp_path.glob("difffeat-bench-*")) == [], "inputs and stores are cleaned up"


def test_bench_refuses_a_preset_without_weights_in_one_line(capsys):
    assert main(["bench", "--model", "sd3-medium-random", "--layer", "dit-middle", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difffeat: error: --model sd3-medium-random: built on the meta device") and "\n" not in err
    assert "--materialize" in err


def test_materialize_gives_meta_components_random_weights_and_bench_runs_them(tmp_path):
    """`materialize` rebuilds each meta component from its config (so CLIP's position ids hold values), and
    `bench(materialize=True)` runs a pipeline whose transformer and text encoder were on the meta device."""
    import torch

    import difffeat
    from difffeat.extraction.bench import BenchConfig, bench
    from difffeat.zoo.dit_presets import materialize

    pipe = difffeat.load_pipeline("mini-dit")
    real = {name: getattr(pipe, name) for name in ("transformer", "text_encoder")}
    with torch.device("meta"):
        pipe.transformer = type(real["transformer"]).from_config(real["transformer"].config)
        pipe.text_encoder = type(real["text_encoder"])(real["text_encoder"].config)
    assert any(p.is_meta for p in pipe.transformer.parameters())
    assert sorted(materialize(pipe)) == ["text_encoder", "transformer"]
    for name, module in real.items():
        fresh = getattr(pipe, name)
        assert not any(p.is_meta for p in fresh.parameters()) and not any(b.is_meta for b in fresh.buffers())
        assert dict(fresh.config.to_dict() if hasattr(fresh.config, "to_dict") else fresh.config) == \
            dict(module.config.to_dict() if hasattr(module.config, "to_dict") else module.config)
        assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())
    positions = pipe.text_encoder.text_model.embeddings.position_ids
    assert torch.equal(positions, torch.arange(positions.shape[-1]).expand_as(positions))
    assert materialize(pipe) == [], "nothing left on the meta device"

    with torch.device("meta"):  # once more on the meta device, now through bench
        pipe.transformer = type(real["transformer"]).from_config(real["transformer"].config)
    result = bench(BenchConfig(model="mini-dit", layers=["dit-middle"], n=2, batch_size=2, materialize=True,
                               tmp_dir=str(tmp_path)), pipe=pipe)
    assert result["contenders"]["difffeat"]["images"] == 2 and result["contenders"]["difffeat"]["images_per_second"] > 0
