import csv

import pytest
import torch
from safetensors.torch import load_file

from difffeat import load_pipeline
from difffeat.errors import UserError
from difffeat.spine.run import Checkpoints
from difffeat.zoo.train import MiniTrainConfig, train_mini

TINY = MiniTrainConfig(n_train=48, vae_steps=3, unet_steps=4, batch_size=4, checkpoint_every=2, warmup=2)


def _unet_weights(path):
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_recipe_is_reproducible_resumable_and_loadable(tmp_path):
    a = train_mini(tmp_path / "a", cfg=TINY)
    b = train_mini(tmp_path / "b", cfg=TINY)
    wa, wb = _unet_weights(a), _unet_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, same weights"
    # Re-running a finished run resumes from its checkpoints: no step is trained twice.
    rows_before = list(csv.DictReader(open(tmp_path / "a" / "losses.csv")))
    train_mini(tmp_path / "a", cfg=TINY)
    assert list(csv.DictReader(open(tmp_path / "a" / "losses.csv"))) == rows_before
    assert all(torch.equal(wa[k], v) for k, v in _unet_weights(a).items())
    pipe = load_pipeline(a)
    assert pipe.vae.config.scaling_factor > 0 and pipe.tokenizer.model_max_length == 77
    with pytest.raises(UserError, match="another config"):
        train_mini(tmp_path / "a", cfg=MiniTrainConfig(**{**TINY.__dict__, "seed": 1}))


def test_interrupted_unet_stage_resumes_to_the_same_weights(tmp_path):
    full = train_mini(tmp_path / "full", cfg=TINY)
    # An interruption after two UNet steps (3 VAE steps + 2 UNet steps), then the same run again.
    part = tmp_path / "part"
    assert train_mini(part, cfg=TINY, stop_after=3 + 2) is None
    assert Checkpoints(part / "checkpoints" / "unet").latest().step == 2
    resumed = train_mini(part, cfg=TINY)
    wf, wr = _unet_weights(full), _unet_weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    """Issue #13 item 3: neither an old-style pickle nor a pickle put where a checkpoint belongs is unpickled."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    old = tmp_path / "old"
    old.mkdir()
    (old / "unet.pt").write_bytes(pickle.dumps({"step": Payload()}))
    with pytest.raises(UserError, match=r"unet.pt: a pickled checkpoint of an older difffeat; it is not loaded"):
        train_mini(old, cfg=TINY)
    run = tmp_path / "run"
    train_mini(run, cfg=TINY, stop_after=2)
    step = Checkpoints(run / "checkpoints" / "vae").latest().path
    (step / "model.safetensors").write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(UserError, match=r"model.safetensors: unreadable"):
        train_mini(run, cfg=TINY)
    assert not marker.exists()
