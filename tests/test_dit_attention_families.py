"""Image→text attention maps of FLUX (double- and single-stream blocks, RoPE) and PixArt (cross-attention with the
text padding mask), on tiny random pipelines (`tests/test_transformers.py`): each `f"{module}:probs"` map [T, h, w]
equals softmax(QKᵀ/√d + mask) recomputed from the very q, k and mask the module hands to
`scaled_dot_product_attention` (a spy in its place), at the image rows and text columns, averaged over heads;
recording never changes what the model computes; wrong names are refused naming this family's modules."""

from contextlib import contextmanager

import pytest
import torch
from test_transformers import tiny_flux, tiny_pixart

import difffeat
from difffeat.errors import UserError
from difffeat.extraction.capture import Capture
from difffeat.models import dit
from difffeat.models.attention_feature import probs_processor, probs_processor_for
from difffeat.zoo import mmdit

PROMPTS = ["a red circle", "a small blue star at the top left of a big green square"]
FLUX_ATTN = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
PIXART_ATTN = ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(mmdit.mini_parts())


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart(mmdit.mini_parts())


def images(n=2, h=64, w=64):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(5))


def model_inputs(pipe, fe, t, h=64, w=64):
    """The transformer's keyword arguments of a clean-mode extraction at t (as FeatureExtractor builds them)."""
    z0 = fe.encode_latents(images(2, h, w), ["0", "1"])
    embeds, added = dit.encode_prompts(pipe, PROMPTS)
    return dit.forward_kwargs(pipe, z0, torch.tensor([t, t]), torch.stack(embeds), added)


@contextmanager
def attention_inputs(model):
    """`{module name: (q, k, attn_mask)}` as each attention module hands them to scaled_dot_product_attention."""
    calls, current, real = {}, [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        calls[current[-1]] = (query, key, attn_mask)
        return real(query, key, value, attn_mask, *args, **kwargs)

    def enter(name):
        def hook(module, args):
            current.append(name)

        return hook

    def leave(module, args, output):
        current.pop()

    handles = []
    for name, m in model.named_modules():
        if hasattr(m, "processor"):
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()


def reference_map(q, k, mask, rows: slice, cols: slice, grid) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask) of all heads at once, at `rows` × `cols`, head mean, on the patch grid: [B, T, h, w]."""
    scores = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, S_q, S_k]
    if mask is not None:
        scores = scores + (torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                           else mask.float())
    p = scores.softmax(-1)[:, :, rows, cols].mean(1)  # [B, N, T]
    return p.transpose(1, 2).reshape(p.shape[0], p.shape[2], *grid)


def seen_by_the_model(pipe, kwargs) -> dict:
    with torch.no_grad(), attention_inputs(pipe.transformer) as calls:
        pipe.transformer(**kwargs)
    return calls


# ------------------------------------------------------------------------------------------------- FLUX
def test_flux_double_and_single_stream_maps_equal_the_attention_computed(flux):
    h, w, grid = 64, 96, (8, 12)  # latent 16×24, 2×2 latent cells per token
    fe = difffeat.FeatureExtractor(flux, ["single_transformer_blocks.1"], timesteps=(250,), noise=False,
                                   resolution=(h, w), attention=FLUX_ATTN)
    feats = fe.extract(images(2, h, w), prompts=PROMPTS)
    kwargs = model_inputs(flux, fe, 250, h, w)
    tokens = kwargs["encoder_hidden_states"].shape[1]  # FLUX's sequences are [text; image]
    calls = seen_by_the_model(flux, kwargs)
    for name in FLUX_ATTN:
        got = feats[f"{name}:probs"]
        assert got.shape == (2, tokens, *grid)
        q, k, mask = calls[name]  # after the q/k norms and the rotary embedding
        assert mask is None and q.shape[2] == tokens + grid[0] * grid[1]
        ref = reference_map(q, k, None, slice(tokens, None), slice(0, tokens), grid)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        mass = got.sum(1)  # image keys take the rest of each image query's attention
        assert (mass > 0).all() and (mass < 1).all()


def test_flux_maps_apply_the_attention_mask_the_processor_gets(flux):
    fe = difffeat.FeatureExtractor(flux, ["single_transformer_blocks.1"], timesteps=(500,), noise=False)
    kwargs = model_inputs(flux, fe, 500)
    tokens, n_image = kwargs["encoder_hidden_states"].shape[1], 64
    mask = torch.ones(2, tokens + n_image, dtype=torch.bool)
    mask[1, 5:tokens] = False  # the second item's last text tokens are padding
    kwargs["joint_attention_kwargs"] = {"attention_mask": mask}
    calls = seen_by_the_model(flux, kwargs)
    with torch.no_grad(), Capture(flux.transformer, [], (16, 16), attention=FLUX_ATTN, early_exit=False,
                                  probs_processor=probs_processor_for(flux.transformer, (16, 16))) as cap:
        flux.transformer(**kwargs)
    for name in FLUX_ATTN:
        got = cap.features[f"{name}:probs"]
        ref = reference_map(*calls[name], slice(tokens, None), slice(0, tokens), (8, 8))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        assert (got[1, 5:] == 0).all() and (got[0, 5:] > 0).all()


def test_a_single_stream_module_needs_the_image_token_count(flux):
    fe = difffeat.FeatureExtractor(flux, ["single_transformer_blocks.1"], timesteps=(500,), noise=False)
    with torch.no_grad(), Capture(flux.transformer, [], (16, 16), attention=["single_transformer_blocks.0.attn"],
                                  probs_processor=probs_processor) as cap:
        with pytest.raises(RuntimeError, match="give `probs_processor` the image token count"):
            cap.run(**model_inputs(flux, fe, 500))


# ----------------------------------------------------------------------------------------------- PixArt
def test_pixart_cross_attention_maps_with_the_padding_mask(pixart):
    fe = difffeat.FeatureExtractor(pixart, ["transformer_blocks.1"], timesteps=(300,), noise=False,
                                   attention=PIXART_ATTN)
    feats = fe.extract(images(2), prompts=PROMPTS)
    kwargs = model_inputs(pixart, fe, 300)
    keep = kwargs["encoder_attention_mask"].bool()  # [B, T]: the short prompt is padded
    assert not keep[0].all() and keep[1].all()
    calls = seen_by_the_model(pixart, kwargs)
    for name in PIXART_ATTN:
        got = feats[f"{name}:probs"]
        assert got.shape == (2, keep.shape[1], 8, 8)
        q, k, mask = calls[name]
        assert mask is not None and mask.shape == (2, 2, 1, keep.shape[1])  # −10000 on padding, per head
        torch.testing.assert_close(got, reference_map(q, k, mask, slice(None), slice(None), (8, 8)), rtol=0,
                                   atol=1e-5)
        assert (got[0][~keep[0]] == 0).all() and (got[0][keep[0]] > 0).all()
        torch.testing.assert_close(got.sum(1), torch.ones(2, 8, 8))  # text keys only: each pixel's row sums to 1


# --------------------------------------------------------------------------------------------- both
@pytest.mark.parametrize("family, layer, attention", [
    ("flux", "single_transformer_blocks.1", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]),
    ("pixart", "transformer_blocks.1", ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]),
])
def test_recording_changes_no_output(request, family, layer, attention):
    pipe = request.getfixturevalue(family)
    stock = {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}
    plain = difffeat.FeatureExtractor(pipe, [layer], timesteps=(400,), noise=False).extract(images(2), prompts=PROMPTS)
    recorded = difffeat.FeatureExtractor(pipe, [layer], timesteps=(400,), noise=False, attention=attention).extract(
        images(2), prompts=PROMPTS)
    assert torch.equal(plain[layer], recorded[layer])
    assert {n: type(m.processor) for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")} == stock


def test_wrong_names_are_refused_with_this_familys_near_names(flux, pixart):
    cases = [
        (flux, "transformer_blocks.0.attn2", r"not a joint attention module of this FluxTransformer2DModel; did you "
                                             r"mean transformer_blocks\.0\.attn"),
        (flux, "single_transformer_blocks.7.attn", r"did you mean single_transformer_blocks\.\d\.attn"),
        (flux, "up_blocks.1.attentions.0.transformer_blocks.0.attn2", r"not a joint attention module of this Flux"),
        (pixart, "transformer_blocks.0.attn1", r"not a cross-attention module of this PixArtTransformer2DModel; did "
                                               r"you mean transformer_blocks\.0\.attn2"),
        (pixart, "transformer_blocks.0.attn", r"not a cross-attention module .*did you mean transformer_blocks\.0\."
                                              r"attn2"),
        (pixart, "gdf-up-cross", r"'gdf-up-cross': a UNet attention preset of this PixArtTransformer2DModel"),
    ]
    for pipe, bad, message in cases:
        layer = "transformer_blocks.0"
        with pytest.raises(UserError, match=message):
            difffeat.FeatureExtractor(pipe, [layer], attention=[bad])
