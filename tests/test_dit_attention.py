"""Joint attention's image→text probabilities as an attention feature (issue #14 item 2), on mini-dit (SD3
architecture with RMS q/k norms): `f"{module}:probs"` maps [T, h, w], one channel per text token on the patch grid,
equal to softmax(QKᵀ/√d) over all (image + text) keys, recomputed here from the module's own projections and
norms, restricted to the text keys and averaged over heads; recording never changes what the model computes."""

import pytest
import torch

import difffeat
from difffeat.errors import UserError
from difffeat.extraction.capture import Capture
from difffeat.models import dit
from difffeat.models.attention_feature import probs_processor

PROMPTS = ["a large red circle in the center", "a small blue star"]


@pytest.fixture(scope="module")
def pipe():
    return difffeat.load_pipeline("mini-dit")


def images(n, h=64, w=64):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(4))


def model_inputs(pipe, fe, t, h=64, w=64):
    """The transformer's keyword arguments of a clean-mode extraction at t (as FeatureExtractor builds them)."""
    z0 = fe.encode_latents(images(2, h, w), ["0", "1"])
    embeds, added = dit.encode_prompts(pipe, PROMPTS)
    return dit.forward_kwargs(pipe, z0, torch.tensor([t, t]), torch.stack(embeds), added)


def reference_probs(attn, hidden, context) -> torch.Tensor:
    """softmax(QKᵀ/√d) of the joint sequence [image; text] with all heads' scores at once, text columns, head mean,
    from the module's projections and q/k norms applied by hand: [B, N, T]."""
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

    q, k, k_text = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.add_k_proj(context))
    assert attn.norm_q is not None and attn.norm_k is not None and attn.norm_added_k is not None  # mini-dit: RMS
    q, k, k_text = attn.norm_q(q), attn.norm_k(k), attn.norm_added_k(k_text)
    scores = q @ torch.cat([k, k_text], 2).transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, N, N + T]
    return scores.softmax(-1)[..., hidden.shape[1]:].mean(1)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_image_to_text_probs_equal_a_hand_recomputation(pipe, size):
    h, w = size
    grid = (h // 8, w // 8)  # VAE factor 4 × patch 2
    attn = ["transformer_blocks.1.attn", "transformer_blocks.3.attn"]  # block 3: the last (context_pre_only)
    fe = difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], timesteps=(500,), noise=False, resolution=size,
                                   attention=attn)
    feats = fe.extract(images(2, h, w), prompts=PROMPTS)
    assert list(feats) == ["transformer_blocks.0", *(f"{a}:probs" for a in attn)]
    got = feats["transformer_blocks.1.attn:probs"]
    tokens = dit.encode_prompts(pipe, PROMPTS)[0][0].shape[0]  # mini-dit: its CLIP's token count, no T5
    assert tokens == pipe.tokenizer.model_max_length
    assert got.shape == (2, tokens, *grid) and feats["transformer_blocks.3.attn:probs"].shape == (2, tokens, *grid)
    mass = got.sum(1)  # the text keys' share of each image query's attention: in (0, 1), image keys take the rest
    assert (mass > 0).all() and (mass < 1).all()

    module = dict(pipe.transformer.named_modules())["transformer_blocks.1.attn"]
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe.transformer(**model_inputs(pipe, fe, 500, h, w))
            ref = reference_probs(module, seen["hidden_states"], seen["encoder_hidden_states"])
    finally:
        hook.remove()
    ref = ref.transpose(1, 2).reshape(2, tokens, *grid)  # image tokens row-major on the patch grid
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_recording_changes_no_output(pipe):
    fe = difffeat.FeatureExtractor(pipe, ["transformer_blocks.2"], timesteps=(300,), noise=False)
    kwargs = model_inputs(pipe, fe, 300)
    model = pipe.transformer
    blocks = dict(model.named_modules())

    def run(record: bool):
        outs = {}
        hook = blocks["transformer_blocks.1"].register_forward_hook(lambda m, a, o: outs.update(block=o))
        try:
            with torch.no_grad():
                if record:
                    with Capture(model, [], (16, 16), attention=["transformer_blocks.1.attn"], early_exit=False,
                                 probs_processor=probs_processor) as cap:
                        outs["sample"] = model(**kwargs).sample
                    tokens = kwargs["encoder_hidden_states"].shape[1]
                    assert cap.features["transformer_blocks.1.attn:probs"].shape == (2, tokens, 8, 8)
                else:
                    outs["sample"] = model(**kwargs).sample
        finally:
            hook.remove()
        return outs

    plain, recorded = run(False), run(True)
    for a, b in zip(plain["block"], recorded["block"]):
        assert torch.equal(a, b)
    assert torch.equal(plain["sample"], recorded["sample"])
    assert type(blocks["transformer_blocks.1.attn"].processor).__name__ == "JointAttnProcessor2_0"  # restored
    # and the extracted block features are those of an extraction without attention maps
    with_maps = difffeat.FeatureExtractor(pipe, ["transformer_blocks.2"], timesteps=(300,), noise=False,
                                          attention=["transformer_blocks.1.attn"]).extract(images(2), prompts=PROMPTS)
    plain_feats = fe.extract(images(2), prompts=PROMPTS)
    assert torch.equal(with_maps["transformer_blocks.2"], plain_feats["transformer_blocks.2"])


def test_fixed_attention_prompt_on_a_transformer(pipe):
    fixed = "a scene of shapes"
    fe = difffeat.FeatureExtractor(pipe, ["transformer_blocks.1"], timesteps=(500,), noise=False,
                                   attention=["transformer_blocks.2.attn"], attention_prompt=fixed)
    got = fe.extract(images(2), prompts=PROMPTS)
    alone = difffeat.FeatureExtractor(pipe, ["transformer_blocks.1"], timesteps=(500,), noise=False,
                                      attention=["transformer_blocks.2.attn"]).extract(images(2), prompts=[fixed] * 2)
    torch.testing.assert_close(got["transformer_blocks.2.attn:probs"], alone["transformer_blocks.2.attn:probs"])


def test_names_that_are_not_joint_attention_are_refused_with_near_names(pipe):
    for bad in ["transformer_blocks.1.attn2", "transformer_blocks.1", "transformer_blocks.9.attn"]:
        with pytest.raises(UserError, match=r"not a joint attention module of this SD3Transformer2DModel; "
                                            r"did you mean transformer_blocks\.\d\.attn"):
            difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], attention=[bad])
    with pytest.raises(UserError, match="'gdf-up-cross': a UNet attention preset"):
        difffeat.FeatureExtractor(pipe, ["transformer_blocks.0"], attention=["gdf-up-cross"])
