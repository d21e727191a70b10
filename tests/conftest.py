import os

import pytest

# Everything must work with no network: the tests prove it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
