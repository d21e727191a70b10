import os
import tempfile

import pytest

# Everything must work with no network: the tests prove it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Batch-size choices cached by the tests never reach the user's cache folder.
os.environ.setdefault("DIFFFEAT_CACHE", tempfile.mkdtemp(prefix="difffeat-test-cache-"))
# Under pytest-xdist (`-n N`) the workers share the cores: each takes its share of torch threads (and so do the
# processes the tests start), instead of every worker starting one thread per core.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small Shapes-LT set on disk, shared by the tests that read files."""
    from difffeat.data.shapes_lt import synthesize

    return synthesize(tmp_path_factory.mktemp("shapes") / "shapes-lt", n=60, seed=3)


@pytest.fixture(scope="session")
def mini_pipe():
    # No global torch.set_grad_enabled(False) here: a session fixture would leave it off for every later
    # test. The quality checks run under no_grad themselves.
    from difffeat import load_pipeline

    return load_pipeline("mini")
