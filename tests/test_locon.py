"""LoCon (issue #12 item 3, issue #26 item 2): `lora train --conv` adapts every module of LyCORIS's LoCon preset
(UNet transformer / resnet / sampler blocks and the text encoder's attention and MLP: 278 + 72 modules on SD-1.5),
3×3 convolutions at their own rank and alpha, the rest (conv_shortcut, proj_in/out included) at the linear ones; the
file it writes gives exactly the trained model, and the same weights written in kohya's key layout
(``lora_unet_<module path>`` / ``lora_te_<module path>``, ``.lora_down / .lora_up / .alpha``) load to the same
outputs."""

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


def text_output(pipe):
    ids = torch.arange(1, 78).unsqueeze(0) % pipe.text_encoder.config.vocab_size
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def kohya_layout(diffusers_file, out, alpha_factor=4.0):
    """The LoRA of a diffusers-format file written as kohya writes a LoCon: ``lora_unet_<path with _>`` keys,
    lora_down / lora_up / alpha. The alpha is `alpha_factor`·rank with lora_up divided by the same factor, so
    that the file is only right if the loader applies alpha / rank."""
    out_state = {}
    for key, value in load_file(str(diffusers_file)).items():
        part, path, matrix = re.fullmatch(r"(unet|text_encoder)\.(.*)\.lora_(A|B)\.weight", key).groups()
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        name = prefix + path.replace(".", "_")
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


def test_locon_covers_every_module_of_the_preset_on_sd15():
    """LyCORIS's LoCon preset on SD-1.5 (research/content_shift_gate.md §3.2; LyCORIS `kohya.py` / `config.py`
    "full" before 1.9: Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D; CLIPAttention, CLIPMLP):
    278 UNet modules, 72 text-encoder modules, named here by group."""
    from collections import Counter

    from transformers import CLIPTextConfig, CLIPTextModel

    from difffeat.zoo.presets import CLIP_L, build_unet
    from pipelines.lora_train import LOCON_TEXT_BLOCKS, LOCON_UNET_BLOCKS, locon_modules, on_conv_rank

    with torch.device("meta"):
        unet = build_unet("sd15-random")
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    groups = {"attention": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)", "proj_in/out": r"attentions\.\d+\.proj_(in|out)",
              "feed-forward": r"ff\.net\.(0\.proj|2)", "time_emb_proj": r"time_emb_proj",
              "conv1/conv2": r"resnets\.\d+\.conv[12]", "conv_shortcut": r"conv_shortcut",
              "sampler conv": r"(down|up)samplers\.\d+\.conv"}
    unet_modules = locon_modules(unet, LOCON_UNET_BLOCKS)
    counts = Counter(next(g for g, p in groups.items() if re.search(rf"\.{p}$", n)) for n in unet_modules)
    assert counts == {"attention": 128, "proj_in/out": 32, "feed-forward": 32, "time_emb_proj": 22,
                      "conv1/conv2": 44, "conv_shortcut": 14, "sampler conv": 6}
    assert len(unet_modules) == 278
    on_conv = {n for n, m in unet_modules.items() if on_conv_rank(m)}  # only 3×3 convolutions take the conv rank
    assert len(on_conv) == 50 and not any("conv_shortcut" in n or "proj_" in n for n in on_conv)
    assert not any(n in unet_modules for n in ("conv_in", "conv_out", "time_embedding.linear_1"))  # outside blocks
    text_modules = locon_modules(text_encoder, LOCON_TEXT_BLOCKS)
    assert Counter(n.rsplit(".", 1)[1] for n in text_modules) == {
        p: 12 for p in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}
    assert len(text_modules) == 72


def test_locon_defaults_are_the_papers_preset():
    """kohya_ss's "sd15 - EDG_LoConOptiSettings" (the preset lora_guide.md names): conv dim 32, conv alpha 1."""
    cfg = LoraTrainConfig(images="x", out="y")
    assert (cfg.rank, cfg.alpha, cfg.conv_rank, cfg.conv_alpha) == (64, 32.0, 32, 1.0)


def test_locon_round_trip_train_save_load_by_kohya_layout(tmp_path, monkeypatch):
    trained = {}
    load = difffeat.load_pipeline

    def keep(*args, **kwargs):  # the pipeline train_lora fits its adapters on, kept to compare with the files
        trained["pipe"] = load(*args, **kwargs)
        return trained["pipe"]

    monkeypatch.setattr(difffeat, "load_pipeline", keep)
    cfg = LoraTrainConfig(images=str(images(tmp_path / "imgs")), out=str(tmp_path / "locon"), model="mini-random",
                          rank=4, alpha=2, conv=True, conv_rank=2, conv_alpha=8, steps=3, batch_size=2, text_lr=1e-2,
                          unet_lr=1e-2)
    out = train_lora(cfg, progress=False)
    monkeypatch.setattr(difffeat, "load_pipeline", load)
    file = out / "pytorch_lora_weights.safetensors"
    state = load_file(str(file))
    conv_a = state["unet.up_blocks.1.resnets.0.conv1.lora_A.weight"]
    conv1 = trained["pipe"].unet.up_blocks[1].resnets[0].conv1.base_layer  # peft wraps the trained one
    assert conv_a.shape[:2] == (2, conv1.in_channels) and conv_a.ndim == 4
    assert state["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 4
    for part in (".upsamplers.0.conv.", ".conv_shortcut.", ".proj_in.", ".proj_out.", ".ff.net.0.proj.", ".ff.net.2.",
                 ".time_emb_proj.", ".mlp.fc1.", ".mlp.fc2.", ".self_attn.q_proj."):
        assert any(part in k for k in state), part
    modules = dict(trained["pipe"].unet.named_modules())
    assert modules["up_blocks.1.resnets.0.conv1"].scaling["default"] == 4.0  # conv: alpha 8 / rank 2
    assert modules["up_blocks.1.resnets.0.conv_shortcut"].r["default"] == 4  # 1×1: the linear rank
    assert modules["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scaling["default"] == 0.5
    expected, expected_text = unet_output(trained["pipe"]), text_output(trained["pipe"])
    plain = difffeat.load_pipeline("mini-random")
    assert (expected - unet_output(plain)).abs().max() > 1e-3  # the adapters (convolutions included) change the output
    assert (expected_text - text_output(plain)).abs().max() > 1e-3
    loaded = load_lora(out)  # the diffusers file, alphas folded
    assert torch.allclose(unet_output(loaded), expected, atol=1e-5)
    assert torch.allclose(text_output(loaded), expected_text, atol=1e-5)
    kohya = kohya_layout(file, tmp_path / "locon_kohya.safetensors")
    keys = load_file(str(kohya))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) and any("_mlp_fc1." in k for k in keys)
    loaded = load_lora(kohya)
    assert torch.allclose(unet_output(loaded), expected, atol=1e-5)
    assert torch.allclose(text_output(loaded), expected_text, atol=1e-5)


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


@pytest.mark.parametrize("bad, message", [({"conv_rank": 0}, "conv_rank: must be ≥ 1"),
                                          ({"conv_alpha": 0.0}, "conv_alpha: must be > 0")])
def test_bad_conv_options(tmp_path, bad, message):
    from difffeat.spine.run import ConfigError

    with pytest.raises(ConfigError, match=message):
        LoraTrainConfig(images=str(tmp_path), out=str(tmp_path / "o"), conv=True, **bad).validate()
