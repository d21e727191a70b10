import csv

import pytest
import torch
from safetensors.torch import load_file

from difffeat import load_pipeline
from difffeat.errors import UserError
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
    # An interruption after the step-2 checkpoint: stop the recipe there, then run it again.
    half = MiniTrainConfig(**{**TINY.__dict__, "unet_steps": 2})
    part = tmp_path / "part"
    train_mini(part, cfg=half)
    (part / "config.json").unlink()  # the same run, now asked for its full length
    ck = torch.load(part / "unet.pt", weights_only=False)
    assert ck["step"] == 2
    resumed = train_mini(part, cfg=TINY)
    wf, wr = _unet_weights(full), _unet_weights(resumed)
    assert all(torch.allclose(wf[k], wr[k], atol=1e-6) for k in wf)
