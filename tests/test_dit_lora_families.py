"""`lora:PATH` on FLUX and PixArt (tiny random pipelines of `tests/test_transformers.py`): LoRAs built with peft on
a same-shape model and saved as diffusers, kohya or peft files give the features of the stock model with
W + scale·(alpha/r)·B·A merged by hand; several LoRAs add up; a LoRA is active only inside its technique's stack;
files that would load only in part, or made for another architecture, are refused naming the file."""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_transformers import tiny_flux, tiny_pixart, tiny_sd3

import difffeat
from difffeat.errors import UserError
from difffeat.zoo import mmdit
from pipelines import TechniqueStack

RANK, ALPHA = 4, 8
PROMPTS = ["a red circle", "a small blue star"]


@pytest.fixture(scope="module")
def mini_parts():
    return mmdit.mini_parts()


@pytest.fixture(scope="module")
def flux(mini_parts):
    return tiny_flux(mini_parts)


@pytest.fixture(scope="module")
def pixart(mini_parts):
    return tiny_pixart(mini_parts)


def features(pipe, layer, techniques=()):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fe = difffeat.FeatureExtractor(pipe, [layer], timesteps=(500,), techniques=list(techniques))
    return fe.extract(x, prompts=PROMPTS, keys=["a", "b"])[layer]


def peft_lora(model, targets, seed=0):
    """(state dict {module path.lora_A/B.weight}, LoraConfig) of a random LoRA on `targets` of a model of `model`'s
    class and config (its weights do not matter to the LoRA)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cls = type(model)
    model = cls.from_config(model.config) if hasattr(cls, "from_config") else cls(model.config)  # diffusers / CLIP
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    model = inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return get_peft_model_state_dict(model), config


def merge(model, state, scale):
    """Add scale·(alpha/r)·B·A of each LoRA pair in `state` to the weight of the module it names."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                b = state[key.replace(".lora_A.", ".lora_B.")]
                modules[key.removesuffix(".lora_A.weight")].weight += scale * (ALPHA / RANK) * (b @ a)


def save_peft_folder(folder, state, config):
    """A peft `save_pretrained` folder of the LoRA, as PixArt-Σ's LoRA training writes one."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))


def check_against_hand_merge(pipe, rebuilt, lora, state, layer, scale=0.7):
    """`lora:{lora},scale=…` on `pipe` changes `layer`, is off again after its stack, is plain at scale 0, and equals
    `rebuilt` (a fresh copy of the stock pipeline) with the LoRA merged by hand; returns the LoRA's features."""
    plain = features(pipe, layer)
    got = features(pipe, layer, [f"lora:{lora},scale={scale}"])
    assert not torch.allclose(got, plain, atol=1e-4)
    assert torch.equal(features(pipe, layer), plain)  # off again after its stack
    assert torch.equal(features(pipe, layer, [f"lora:{lora},scale=0"]), plain)
    merge(rebuilt.transformer, state, scale)
    torch.testing.assert_close(got, features(rebuilt, layer), atol=1e-5, rtol=1e-5)
    return got


# ---------------------------------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux_lora(flux, tmp_path_factory):
    """(folder, state) of a diffusers-format LoRA on attention projections of FLUX's double and single blocks."""
    from diffusers import FluxPipeline

    state, config = peft_lora(flux.transformer, ["attn.to_q", "attn.to_v", "attn.add_k_proj"])
    folder = tmp_path_factory.mktemp("flux-lora") / "lora"
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=config.to_dict())
    return str(folder), state


def test_flux_lora_equals_hand_merged_weights_and_only_inside_its_stack(flux, flux_lora, mini_parts):
    folder, state = flux_lora
    check_against_hand_merge(flux, tiny_flux(mini_parts), folder, state, "single_transformer_blocks.1")


def test_flux_kohya_clip_and_diffusers_loras_add_up(flux, flux_lora, mini_parts, tmp_path):
    """A kohya file (fused qkv split by diffusers' converter, alphas ≠ rank), a diffusers-format LoRA of the CLIP
    text encoder and the transformer LoRA above, in one stack at three scales."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(1)
    kohya = {}
    for name, size_in, size_out, alpha in (("double_blocks_0_img_attn_qkv", 16, 48, 2.0),
                                           ("double_blocks_0_txt_attn_proj", 16, 16, 2.0),
                                           ("single_blocks_1_linear2", 80, 16, 8.0)):  # 16 + mlp 64 → 16
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(RANK, size_in, generator=g) * 0.1
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(size_out, RANK, generator=g) * 0.1
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    clip_state, clip_config = peft_lora(flux.text_encoder, ["q_proj", "v_proj"], seed=2)
    FluxPipeline.save_lora_weights(tmp_path / "clip", text_encoder_lora_layers=clip_state,
                                   text_encoder_lora_adapter_metadata=clip_config.to_dict())
    folder, state = flux_lora

    layer = "transformer_blocks.0"
    got = features(flux, layer, [f"lora:{tmp_path / 'kohya.safetensors'},scale=0.5",
                                 f"lora:{tmp_path / 'clip'},scale=0.8", f"lora:{folder},scale=0.3"])
    merged = tiny_flux(mini_parts)
    modules = dict(merged.transformer.named_modules())
    delta = lambda name: 0.5 * kohya[f"lora_unet_{name}.alpha"] / RANK * (
        kohya[f"lora_unet_{name}.lora_up.weight"] @ kohya[f"lora_unet_{name}.lora_down.weight"])
    with torch.no_grad():
        qkv = delta("double_blocks_0_img_attn_qkv")
        for i, proj in enumerate(("to_q", "to_k", "to_v")):
            modules[f"transformer_blocks.0.attn.{proj}"].weight += qkv[16 * i:16 * (i + 1)]
        modules["transformer_blocks.0.attn.to_add_out"].weight += delta("double_blocks_0_txt_attn_proj")
        modules["single_transformer_blocks.1.proj_out"].weight += delta("single_blocks_1_linear2")
    merge(merged.text_encoder, clip_state, 0.8)
    merge(merged.transformer, state, 0.3)
    torch.testing.assert_close(got, features(merged, layer), atol=1e-5, rtol=1e-5)
    assert torch.equal(features(flux, layer), features(tiny_flux(mini_parts), layer))  # all off outside the stack


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_peft_folder_equals_the_same_lora_as_a_diffusers_file(family, flux, mini_parts, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe, writer = (flux, FluxPipeline) if family == "flux" else (tiny_sd3(mini_parts), StableDiffusion3Pipeline)
    state, config = peft_lora(pipe.transformer, ["attn.to_k", "attn.to_out.0"], seed=3)
    writer.save_lora_weights(tmp_path / "file", transformer_lora_layers=state,
                             transformer_lora_adapter_metadata=config.to_dict())
    save_peft_folder(tmp_path / "peft", state, config)
    layer = "transformer_blocks.0"
    plain = features(pipe, layer)
    got = features(pipe, layer, [f"lora:{tmp_path / 'peft'},scale=0.6"])
    assert not torch.allclose(got, plain, atol=1e-4)
    torch.testing.assert_close(got, features(pipe, layer, [f"lora:{tmp_path / 'file'},scale=0.6"]),
                               atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------------------- PixArt
def test_pixart_lora_file_and_peft_folder_equal_hand_merged_weights(pixart, mini_parts, tmp_path):
    """PixArt's pipeline has no LoRA loader: the LoRA goes into its transformer with peft, switched per stack."""
    from diffusers.loaders import SanaLoraLoaderMixin

    state, config = peft_lora(pixart.transformer, ["attn1.to_q", "attn1.to_out.0", "attn2.to_v"])
    # diffusers' writer of a transformer-only LoRA (PixArt has none of its own), and a peft folder.
    SanaLoraLoaderMixin.save_lora_weights(tmp_path / "file", transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=config.to_dict())
    save_peft_folder(tmp_path / "peft", state, config)
    layer = "transformer_blocks.1"
    got = check_against_hand_merge(pixart, tiny_pixart(mini_parts), tmp_path / "file", state, layer)
    torch.testing.assert_close(features(pixart, layer, [f"lora:{tmp_path / 'peft'},scale=0.7"]), got,
                               atol=1e-6, rtol=1e-6)
    both = features(pixart, layer, [f"lora:{tmp_path / 'file'},scale=0.3", f"lora:{tmp_path / 'peft'},scale=0.4"])
    torch.testing.assert_close(both, got, atol=1e-5, rtol=1e-5)  # two adapters at 0.3 and 0.4 add up to 0.7


# ------------------------------------------------------------------------------------------------ refused
@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory):
    """A diffusers-format LoRA of mini-dit's SD3 transformer."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    state, config = peft_lora(SD3Transformer2DModel(**mmdit.TRANSFORMER_CONFIG),
                              ["attn.to_q", "attn.to_v", "attn.add_k_proj"])
    folder = tmp_path_factory.mktemp("sd3-lora") / "lora"
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config.to_dict())
    return folder


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_a_lora_of_another_architecture_is_refused_naming_the_file(family, flux, pixart, sd3_lora):
    pipe = flux if family == "flux" else pixart
    with pytest.raises(UserError, match=rf"{sd3_lora}: LoRA made for another architecture; \d+ of \d+ keys do not"):
        TechniqueStack(pipe, [f"lora:{sd3_lora}"])


def test_flux_files_that_would_load_in_part_are_refused(flux, tmp_path):
    def kohya(name, **extra):
        save_file({f"{name}.lora_down.weight": torch.zeros(RANK, 16), f"{name}.lora_up.weight": torch.zeros(16, RANK),
                   **extra}, str(tmp_path / "f.safetensors"))
        return f"lora:{tmp_path / 'f.safetensors'}"

    with pytest.raises(UserError, match="outside what LoRAs load into on flux"):  # converted to 'x_embedder.…'
        TechniqueStack(flux, [kohya("lora_unet_img_in")])
    with pytest.raises(UserError, match="kohya text-encoder LoRAs"):
        TechniqueStack(flux, [kohya("lora_unet_double_blocks_0_img_attn_proj",
                                    **{"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})])
    with pytest.raises(UserError, match="DoRA"):
        TechniqueStack(flux, [kohya("lora_unet_double_blocks_0_img_attn_proj",
                                    **{"lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(1, 16)})])
    with pytest.raises(UserError, match="diffusers' converter would drop it"):  # a norm 'diff' of ComfyUI files
        TechniqueStack(flux, [kohya("lora_unet_double_blocks_0_img_attn_proj",
                                    **{"lora_unet_double_blocks_0_img_attn_norm_key_norm.diff": torch.ones(8)})])
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 16),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, RANK),
               "transformer.transformer_blocks.0.attn.norm_q.weight": torch.ones(8)},
              str(tmp_path / "control.safetensors"))  # a FLUX Control LoRA's norm weight
    with pytest.raises(UserError, match="diffusers would write it into the model's own weights"):
        TechniqueStack(flux, [f"lora:{tmp_path / 'control.safetensors'}"])
    save_file({"double_blocks.0.processor.proj_lora1.down.weight": torch.zeros(RANK, 16)},
              str(tmp_path / "xlabs.safetensors"))  # XLabs layout: not one diffusers converts cleanly here
    with pytest.raises(UserError, match="only diffusers-format LoRAs of the transformer"):
        TechniqueStack(flux, [f"lora:{tmp_path / 'xlabs.safetensors'}"])
