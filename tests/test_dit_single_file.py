"""Diffusion transformers from a single file: `load_pipeline(FILE, config=FOLDER)` reads the transformer from FILE
(diffusers' `from_single_file`) and every other component from FOLDER. The files are written here from the shipped
mini-dit and a tiny FLUX in diffusers' key layout, which `from_single_file` takes as it is; features are checked
against the same models loaded from their folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import difffeat
from difffeat.errors import UserError
from difffeat.models import dit
from difffeat.zoo import mmdit

LAYER = "transformer_blocks.1"
shipped_dit = pytest.mark.skipif(not (mmdit.weights_dir() / "model_index.json").exists(),
                                 reason="mini-dit weights not shipped")


@pytest.fixture(scope="module")
def mini_dit():
    return difffeat.load_pipeline("mini-dit")


def save_transformer(state: dict, file):
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(file))
    return file


def features(pipe, layer=LAYER):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return difffeat.FeatureExtractor(pipe, [layer], timesteps=(500,)).extract(
        x, prompts=["a red circle", ""], keys=["a", "b"])[layer]


def assert_same_transformer(got, expected):
    state = got.state_dict()
    assert state.keys() == expected.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())


@shipped_dit
def test_mini_dit_transformer_file_with_the_shipped_folder_as_config(mini_dit, tmp_path):
    file = save_transformer(mini_dit.transformer.state_dict(), tmp_path / "mini-dit-transformer.safetensors")
    pipe = difffeat.load_pipeline(file, config=str(mmdit.weights_dir()))
    assert type(pipe) is type(mini_dit) and pipe.text_encoder_3 is None
    assert dit.max_sequence_length(pipe) == mmdit.T5_TOKENS  # the folder's recorded T5 token count is kept
    assert_same_transformer(pipe.transformer, mini_dit.transformer)
    torch.testing.assert_close(features(pipe), features(mini_dit), rtol=0, atol=0)

    # The file's weights are the ones used: one perturbed tensor changes the features.
    state = dict(mini_dit.transformer.state_dict())
    state["transformer_blocks.0.attn.to_q.weight"] = state["transformer_blocks.0.attn.to_q.weight"] + 0.5
    perturbed = difffeat.load_pipeline(save_transformer(state, tmp_path / "perturbed.safetensors"),
                                       config=str(mmdit.weights_dir()))
    assert not torch.allclose(features(perturbed), features(mini_dit), atol=1e-3)


@shipped_dit
def test_config_folder_needs_the_transformer_config_not_its_weights(mini_dit, tmp_path):
    folder = tmp_path / "mini-dit-config"
    shutil.copytree(mmdit.weights_dir(), folder, ignore=shutil.ignore_patterns("diffusion_pytorch_model*"))
    for vae_file in (mmdit.weights_dir() / "vae").glob("diffusion_pytorch_model*"):
        shutil.copy(vae_file, folder / "vae")  # only the transformer's weights are left out
    file = save_transformer(mini_dit.transformer.state_dict(), tmp_path / "t.safetensors")
    assert_same_transformer(difffeat.load_pipeline(file, config=folder).transformer, mini_dit.transformer)
    half = difffeat.load_pipeline(file, config=folder, dtype="bf16")  # the transformer is read in bf16 directly
    assert half.transformer.dtype == half.vae.dtype == torch.bfloat16
    with pytest.raises(UserError, match="missing transformer/ weights"):
        difffeat.load_pipeline(folder)  # as a folder on its own it is incomplete


@shipped_dit
def test_a_file_of_another_architecture_is_one_error_naming_it(tmp_path):
    garbage = save_transformer({"foo.weight": torch.randn(3, 3)}, tmp_path / "garbage.safetensors")
    with pytest.raises(UserError) as e:
        difffeat.load_pipeline(garbage, config=str(mmdit.weights_dir()))
    message = str(e.value)
    assert message.startswith(f"{garbage}: not a SD3Transformer2DModel checkpoint of the architecture in ")
    assert "(diffusers: " in message and "\n" not in message and "Traceback" not in message
    # Right keys, wrong shapes (a larger model of the same family): diffusers' reason is named.
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        wider = SD3Transformer2DModel(**{**mmdit.TRANSFORMER_CONFIG, "num_attention_heads": 8})
    state = {k: torch.zeros(v.shape) for k, v in wider.state_dict().items()}
    with pytest.raises(UserError, match=r"wider.safetensors: not a SD3Transformer2DModel .*shape"):
        difffeat.load_pipeline(save_transformer(state, tmp_path / "wider.safetensors"), config=mmdit.weights_dir())


def test_pixart_config_folder_is_one_line(tmp_path):
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    file = save_transformer({"x": torch.zeros(1)}, tmp_path / "pixart.safetensors")
    with pytest.raises(UserError) as e:
        difffeat.load_pipeline(file, config=str(folder))
    assert str(e.value).startswith(f"{file}: diffusers cannot load a PixArtTransformer2DModel from a single file")
    assert "\n" not in str(e.value)


def test_whole_pipeline_cascade_names_every_class_tried(tmp_path):
    from difffeat.zoo import mini

    bad = save_transformer({"foo.weight": torch.randn(2)}, tmp_path / "bad.safetensors")
    for config in (None, str(mini.weights_dir())):  # no config, or a UNet folder: whole-pipeline classes
        with pytest.raises(UserError, match="could not load as a single-file checkpoint") as e:
            difffeat.load_pipeline(bad, config=config)
        tried = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
        assert all(name in str(e.value) for name in tried) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A tiny FLUX pipeline saved as a diffusers folder (the mini model's VAE and CLIP, a 1-layer T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from difffeat.zoo import mini

    vae, _, tokenizer = mmdit.mini_parts()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=128, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    t5 = T5EncoderModel(T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 is_encoder_decoder=False))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                        vae=vae, text_encoder=CLIPTextModel.from_pretrained(mini.weights_dir() / "text_encoder"),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer)
    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, mmdit.INDEX_KEY: 16}))  # 16 T5 tokens: quick
    return folder


def test_flux_transformer_file_with_a_flux_folder_as_config(flux_folder, tmp_path):
    reference = difffeat.load_pipeline(flux_folder)
    file = save_transformer(reference.transformer.state_dict(), tmp_path / "flux-transformer.safetensors")
    pipe = difffeat.load_pipeline(file, config=flux_folder)
    assert type(pipe).__name__ == "FluxPipeline" and dit.max_sequence_length(pipe) == 16
    assert_same_transformer(pipe.transformer, reference.transformer)
    layer = "single_transformer_blocks.0"
    torch.testing.assert_close(features(pipe, layer), features(reference, layer), rtol=0, atol=0)
    if (mmdit.weights_dir() / "model_index.json").exists():  # a FLUX file is not an SD3 transformer
        with pytest.raises(UserError, match=r"flux-transformer.safetensors: not a SD3Transformer2DModel"):
            difffeat.load_pipeline(file, config=mmdit.weights_dir())
