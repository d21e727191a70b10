import pytest
import torch

from difffeat import load_pipeline
from difffeat.errors import UserError
from difffeat.models.layers import LAYER_PRESETS, list_layers, resolve_layers
from difffeat.zoo.presets import build_unet


class _Shell:
    """Just what list_layers reads from a pipeline: a UNet and a VAE config."""

    def __init__(self, unet, factor=8):
        self.unet = unet
        self.vae_scale_factor = factor


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("mini-random")


def test_shapes_equal_a_real_forward(pipe):
    layers = list_layers(pipe)
    seen = {}
    modules = dict(pipe.unet.named_modules())

    def record(name):
        def hook(module, args, output):  # returns None: the output is left alone
            seen.setdefault(name, (output[0] if isinstance(output, tuple) else output).shape)
        return hook

    hooks = [modules[n].register_forward_hook(record(n)) for n, _ in layers]
    with torch.no_grad():
        pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([50]), torch.randn(1, 77, 128))
    for h in hooks:
        h.remove()
    assert list(seen) == [n for n, _ in layers], "forward order"
    for name, (c, h, w) in layers:
        shape = seen[name]
        assert (shape[1:] == (c, h, w)) if len(shape) == 4 else (shape[1:] == (h * w, c)), name
    names = [n for n, _ in layers]
    assert "up_blocks.1.upsamplers.0" in names and "mid_block" in names and "conv_out" in names
    assert not any(n.endswith("nonlinearity") for n in names), "shared modules are not single places"


def test_sd15_shapes_and_gdf_preset_match_the_paper():
    with torch.device("meta"):
        shell = _Shell(build_unet("sd15-random"))
    shapes = dict(list_layers(shell, 512, 512))
    # research/content_shift_gate.md §3.1: the four legacy maps at 512².
    assert shapes["up_blocks.0.upsamplers.0"] == (1280, 16, 16)
    assert shapes["up_blocks.1.upsamplers.0"] == (1280, 32, 32)
    assert shapes["up_blocks.2.upsamplers.0"] == (640, 64, 64)
    assert shapes["up_blocks.3.attentions.2"] == (320, 64, 64)
    assert resolve_layers(shell, ["gdf-legacy"], 512, 512) == [
        "up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0", "up_blocks.2.upsamplers.0", "up_blocks.3.attentions.2"]
    assert resolve_layers(shell, ["dift"], 512, 512) == ["up_blocks.1"]
    assert len(resolve_layers(shell, ["hyperfeatures"], 512, 512)) == 12
    assert dict(list_layers(shell, 768, 512))["up_blocks.1"] == (1280, 48, 32)


def test_sdxl_layers_include_added_conditions():
    with torch.device("meta"):
        shell = _Shell(build_unet("sdxl-random"))
    shapes = dict(list_layers(shell))
    assert shapes["up_blocks.0.upsamplers.0"] == (1280, 64, 64)  # 1024² native: 128² latents
    assert "up_blocks.0.attentions.0.transformer_blocks.9" in shapes
    assert len(resolve_layers(shell, ["gdf-legacy"])) == 3


def test_unknown_layer_fails_with_suggestions(pipe):
    with pytest.raises(UserError, match="did you mean up_blocks.1.upsamplers.0"):
        resolve_layers(pipe, ["up_blocks.1.upsampler.0"])
    with pytest.raises(UserError, match="unknown layer 'nonsense'"):
        resolve_layers(pipe, ["up_blocks.1", "nonsense"])
    assert set(LAYER_PRESETS) >= {"dift", "gdf-legacy", "hyperfeatures"}
    # Forward order and no duplicates whatever the request order.
    assert resolve_layers(pipe, ["up_blocks.1", "down_blocks.0", "up_blocks.1"]) == ["down_blocks.0", "up_blocks.1"]


def test_layers_cli_lists_shapes_and_presets(capsys):
    from difffeat.cli import main

    assert main(["layers", "--model", "mini-random", "--size", "128", "128"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "up_blocks.1.upsamplers.0\t64×32×32" in out
    assert any(line.startswith("# preset dift: up_blocks.1") for line in out)
    assert main(["layers", "--model", "no/such-model"]) == 2
