"""`lora:PATH` on a diffusion transformer: a diffusers-format LoRA of mini-dit's transformer (built here with peft,
saved by `StableDiffusion3Pipeline.save_lora_weights`) against the same weights merged by hand into the stock
transformer; the LoRA is active only while its technique's stack is."""

import numpy as np
import pytest
import torch

import difffeat
from difffeat.errors import UserError
from difffeat.zoo import mmdit
from pipelines import TechniqueStack

LAYER = "transformer_blocks.2"
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def pipe():
    return difffeat.load_pipeline("mini-dit")


@pytest.fixture(scope="module")
def images():
    from difffeat.data.shapes_lt import iter_scenes

    scenes = list(iter_scenes("test", 2, seed=5))
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return x, [s.fine_caption for s in scenes]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(folder, state dict {module path: (A, B)}) of a LoRA on a few of mini-dit's attention projections."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**mmdit.TRANSFORMER_CONFIG)  # same shapes as mini-dit's; weights do not matter
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["attn.to_q", "attn.to_v", "attn.add_k_proj"])
    model.add_adapter(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    state = get_peft_model_state_dict(model)
    folder = tmp_path_factory.mktemp("dit-lora") / "lora"
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config.to_dict())
    pairs = {k.removesuffix(".lora_A.weight"): (v, state[k.replace("lora_A", "lora_B")])
             for k, v in state.items() if k.endswith(".lora_A.weight")}
    return str(folder), pairs


def features(pipe, x, prompts, techniques=()):
    return difffeat.FeatureExtractor(pipe, [LAYER], timesteps=(500,), techniques=list(techniques)).extract(
        x, prompts=prompts, keys=["a", "b"][: len(x)])[LAYER]


def test_lora_on_transformer_equals_hand_merged_weights(pipe, images, lora):
    x, caps = images
    folder, pairs = lora
    plain = features(pipe, x, caps)
    got = features(pipe, x, caps, [f"lora:{folder},scale=0.7"])
    assert not torch.allclose(got, plain, atol=1e-4)
    assert torch.equal(features(pipe, x, caps), plain)  # removed after the stack
    assert torch.equal(features(pipe, x, caps, [f"lora:{folder},scale=0"]), plain)

    merged = difffeat.load_pipeline("mini-dit")
    modules = dict(merged.transformer.named_modules())
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            modules[path].weight += 0.7 * (ALPHA / RANK) * (b @ a)
    torch.testing.assert_close(got, features(merged, x, caps), atol=1e-5, rtol=1e-5)


def test_text_encoder_and_kohya_loras_are_refused_on_transformers(pipe, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_joint_blocks_0_x_block_attn_to_q.lora_down.weight": torch.zeros(4, 128),
               "lora_unet_joint_blocks_0_x_block_attn_to_q.lora_up.weight": torch.zeros(128, 4)},
              str(tmp_path / "kohya.safetensors"))
    with pytest.raises(UserError, match="only diffusers-format LoRAs of the transformer"):
        TechniqueStack(pipe, [f"lora:{tmp_path / 'kohya.safetensors'}"])
