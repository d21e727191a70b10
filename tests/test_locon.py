"""LoCon (issue #12 item 3): `lora train --conv` adapts the UNet's convolutions too, at their own rank and
alpha; the file it writes gives exactly the trained model, and the same weights written in kohya's key layout
(``lora_unet_<module path>.lora_down / .lora_up / .alpha``) load to the same outputs."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import difffeat
from pipelines.lora_train import LoraTrainConfig, train_lora
from pipelines.techniques.lora import LoRA


def images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def unet_output(pipe):
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([50]), text).sample


def kohya_layout(diffusers_file, out, alpha_factor=4.0):
    """The LoRA of a diffusers-format file written as kohya writes a LoCon: ``lora_unet_<path with _>`` keys,
    lora_down / lora_up / alpha. The alpha is `alpha_factor`·rank with lora_up divided by the same factor, so
    that the file is only right if the loader applies alpha / rank."""
    out_state = {}
    for key, value in load_file(str(diffusers_file)).items():
        path, matrix = re.fullmatch(r"unet\.(.*)\.lora_(A|B)\.weight", key).groups()
        name = "lora_unet_" + path.replace(".", "_")
        if matrix == "A":
            out_state[f"{name}.lora_down.weight"] = value
            out_state[f"{name}.alpha"] = torch.tensor(alpha_factor * value.shape[0])
        else:
            out_state[f"{name}.lora_up.weight"] = value / alpha_factor
    save_file(out_state, str(out))
    return out


def load_lora(path):
    pipe = difffeat.load_pipeline("mini-random")
    technique = LoRA(path=str(path))
    technique.bind(pipe)
    pipe.set_adapters([technique.adapter], [1.0])
    return pipe


def test_locon_round_trip_train_save_load_by_kohya_layout(tmp_path, monkeypatch):
    trained = {}
    load = difffeat.load_pipeline

    def keep(*args, **kwargs):  # the pipeline train_lora fits its adapters on, kept to compare with the files
        trained["pipe"] = load(*args, **kwargs)
        return trained["pipe"]

    monkeypatch.setattr(difffeat, "load_pipeline", keep)
    cfg = LoraTrainConfig(images=str(images(tmp_path / "imgs")), out=str(tmp_path / "locon"), model="mini-random",
                          rank=4, alpha=2, conv=True, conv_rank=2, conv_alpha=8, steps=3, batch_size=2, text_lr=0,
                          unet_lr=1e-2)
    out = train_lora(cfg, progress=False)
    monkeypatch.setattr(difffeat, "load_pipeline", load)
    file = out / "pytorch_lora_weights.safetensors"
    state = load_file(str(file))
    conv_a = state["unet.up_blocks.1.resnets.0.conv1.lora_A.weight"]
    conv1 = trained["pipe"].unet.up_blocks[1].resnets[0].conv1.base_layer  # peft wraps the trained one
    assert conv_a.shape[:2] == (2, conv1.in_channels) and conv_a.ndim == 4
    assert state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 4
    assert any(".upsamplers.0.conv." in k for k in state) and any(".conv_shortcut." in k for k in state)
    modules = dict(trained["pipe"].unet.named_modules())
    assert modules["up_blocks.1.resnets.0.conv1"].scaling["default"] == 4.0  # conv: alpha 8 / rank 2
    assert modules["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scaling["default"] == 0.5
    expected = unet_output(trained["pipe"])
    plain = unet_output(difffeat.load_pipeline("mini-random"))
    assert (expected - plain).abs().max() > 1e-3  # the adapters (convolutions included) change the output
    assert torch.allclose(unet_output(load_lora(out)), expected, atol=1e-5)  # the diffusers file, alphas folded
    kohya = kohya_layout(file, tmp_path / "locon_kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    assert torch.allclose(unet_output(load_lora(kohya)), expected, atol=1e-5)


def test_plain_lora_file_keeps_its_alpha(tmp_path, monkeypatch):
    """rank ≠ alpha (the recipe's 64 / 32): the written file gives the trained model, not one at alpha = rank."""
    trained = {}
    load = difffeat.load_pipeline
    monkeypatch.setattr(difffeat, "load_pipeline", lambda *a, **k: trained.setdefault("pipe", load(*a, **k)))
    cfg = LoraTrainConfig(images=str(images(tmp_path / "imgs")), out=str(tmp_path / "lora"), model="mini-random",
                          rank=4, alpha=1, steps=2, batch_size=2, text_lr=0, unet_lr=1e-2)
    out = train_lora(cfg, progress=False)
    monkeypatch.setattr(difffeat, "load_pipeline", load)
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert not any("conv1" in k for k in state)
    assert torch.allclose(unet_output(load_lora(out)), unet_output(trained["pipe"]), atol=1e-5)


@pytest.mark.parametrize("bad, message", [({"conv_rank": -1}, "conv_rank: must be ≥ 0"),
                                          ({"conv_alpha": -2.0}, "conv_alpha: must be ≥ 0")])
def test_bad_conv_options(tmp_path, bad, message):
    from difffeat.run import ConfigError

    with pytest.raises(ConfigError, match=message):
        LoraTrainConfig(images=str(tmp_path), out=str(tmp_path / "o"), conv=True, **bad).validate()
