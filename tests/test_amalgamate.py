"""The content-shift paper's feature amalgamation (issue #12 item 1; issue #26 item 1: as released): input-conditioned
weight assigners whose weights sum to 1 per channel, the released assigners' forward (one call per variant, from
their published structure) equal to difffeat's in training mode, their N(0, 0.02) init, Eq. 5's terms against a
hand computation, the released adaptive weighting against its training loop, n = 1 with one variant is the plain
feature, `train-seg --variants amalgamate` on one multi-variant store and on several stores (resumed exactly),
and every bad input as one clear error."""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from difffeat.cli import main
from difffeat.spine.run import Checkpoints, ConfigError, load_tensors
from difffeat.store.feature_store import FeatureStoreWriter
from downstream.seg.amalgamate import (
    ASSIGNER_FORMS,
    WEIGHTINGS,
    AdaptiveWeighting,
    Amalgamation,
    FixedWeighting,
    PixelAssigner,
    amalgamation_penalty,
    assigner_weights,
    diversity,
    penalty_weighting,
    released_sparsity,
    sparsity,
    variant_layout,
)
from downstream.seg.config import AMALGAMATION_WEIGHTINGS, SegTrainConfig
from downstream.seg.config import ASSIGNER_FORMS as CONFIG_FORMS
from downstream.seg.data import FeatureSpec
from downstream.seg.evaluate import eval_seg
from downstream.seg.model import HeadConfig, SegModel
from downstream.seg.objective import SegObjective
from downstream.seg.train import train_seg

K, SIZE = 3, 16


def specs_of(variants, layers=(("a", (6, 8, 8)), ("b", (4, 4, 4))), store=0):
    return [FeatureSpec(store, f"{v}/{name}" if v else name, shape) for v in variants for name, shape in layers]


def maps_of(specs, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s.shape, generator=g) for s in specs]


# ------------------------------------------------------------------------------------------- the module
@pytest.mark.parametrize("form", ASSIGNER_FORMS)
def test_assigner_weights_sum_to_one_per_channel_and_depend_on_the_input(form):
    torch.manual_seed(0)
    specs = specs_of(["plain", "canny", "lora"])
    mix = Amalgamation(specs, assigners=2, form=form).eval()
    a, b = maps_of(specs, seed=1), maps_of(specs, seed=2)
    wa, wb = mix.weights(a), mix.weights(b)
    for shape, ws in zip(mix.layout.shapes, wa):
        for w in ws:
            grid = (1, 1) if form == "global" else shape[1:]
            assert w.shape == (2, 3, shape[0], *grid) and (w >= 0).all()
            assert torch.allclose(w.sum(1), torch.ones(()), atol=1e-6)  # Σ_i w_i^j = 1 per channel (and pixel)
    # input-conditioned: other images, other weights (also between the two images of one batch)
    assert not torch.allclose(wa[0][0], wb[0][0], atol=1e-3)
    assert not torch.allclose(wa[0][0][0], wa[0][0][1], atol=1e-3)
    # the combined feature is Concat_j(Σ_i w_i^j r_i), layer by layer
    out = mix(a)
    for layer, pos in enumerate(mix.positions):
        expected = torch.cat([sum(w[:, i] * a[p] for i, p in enumerate(pos)) for w in wa[layer]], dim=1)
        assert out[layer].shape == (2, 2 * specs[pos[0]].shape[0], *specs[pos[0]].shape[1:])
        assert torch.allclose(out[layer], expected, atol=1e-6)


def test_one_assigner_on_one_variant_is_the_plain_feature():
    specs = specs_of([""])
    for form in ASSIGNER_FORMS:
        mix = Amalgamation(specs, assigners=1, form=form)
        x = maps_of(specs)
        out = mix(x)
        assert len(out) == 2 and all(torch.equal(o, r) for o, r in zip(out, x))


# ------------------------------------------------------------ the released assigners, from their published structure
class MapDropout(nn.Module):
    """The released assigners' ``nn.Dropout()`` (p = 0.5), with its mask drawn as difffeat's `Dropout` draws it (one
    uniform per unit of the [B, 128, h, w] map, kept where ≥ p), so that both forwards drop the same units; on
    pixel rows [B·h·w, 128] (the pixel classifier's layout) the draw is reordered to the rows."""

    def __init__(self, grid=None):
        super().__init__()
        self.grid = grid  # (B, h, w) for pixel rows; None for maps

    def forward(self, x):
        if self.grid is None:
            return x * (torch.rand_like(x) >= 0.5).to(x.dtype) * 2.0
        b, h, w = self.grid
        u = torch.rand(b, x.shape[1], h, w, dtype=x.dtype).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return x * (u >= 0.5).to(x.dtype) * 2.0


def released_pixel_assigner(dim, grid):
    """`pixel_classifier.py`'s ``weight_assigner[j]``: Linear(dim, 128), ReLU, BatchNorm1d(128), Dropout(),
    Linear(128, dim), on pixel rows."""
    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.BatchNorm1d(128), MapDropout(grid), nn.Linear(128, dim))


def released_global_assigner(dim):
    """`diffusion_gate_segmentor.py`'s `WeightAssigner` (and `aggregation_network.py`'s assigner)."""
    return nn.Sequential(nn.Conv2d(dim, 128, kernel_size=3, stride=1, padding=1, bias=False), nn.ReLU(),
                         nn.BatchNorm2d(128), MapDropout(), nn.AdaptiveAvgPool2d(output_size=(1, 1)), nn.Flatten(),
                         nn.Linear(128, dim))


def released_pixel_forward(assigners, maps):
    """`pixel_classifier.forward`'s amalgamation and sparsity term on one group of maps [B, C, h, w] (one per
    bucket): x = pixels × bucket × dim, each assigner called once per bucket."""
    b, c, h, wd = maps[0].shape
    x = torch.stack([m.permute(0, 2, 3, 1).reshape(-1, c) for m in maps], dim=1)
    linear_combination, weight_save = [], []
    for m in assigners:
        weights = torch.stack([m(x[:, k, :]) for k in range(x.shape[1])])  # bucket x batch x dim
        weights = F.softmax(weights, dim=0).permute(1, 0, 2)  # batch x bucket x dim
        weight_save.append(weights)
        linear_combination.append(torch.sum(weights * x, dim=1))
    out = torch.cat(linear_combination, dim=1).reshape(b, h, wd, -1).permute(0, 3, 1, 2)
    as_maps = [w.reshape(b, h, wd, len(maps), c).permute(0, 3, 4, 1, 2) for w in weight_save]  # [B, V, C, h, w]
    return out, as_maps, sum(torch.linalg.norm(w, dim=1).mean() for w in weight_save)


def released_global_forward(assigners, maps):
    """`aggregation_network.forward`'s amalgamation (without its attention maps) and sparsity term: x = batch ×
    bucket × dim × h × w, each assigner called once per bucket."""
    x = torch.stack(maps, dim=1)
    linear_combination, weight_save = [], []
    for m in assigners:
        weights = torch.stack([m(x[:, k]) for k in range(x.shape[1])])  # bucket x batch x dim
        weights = F.softmax(weights, dim=0).permute(1, 0, 2)  # batch x bucket x dim
        weight_save.append(weights)
        linear_combination.append(torch.sum(weights.unsqueeze(-1).unsqueeze(-1) * x, dim=1))
    out = torch.cat(linear_combination, dim=1)
    return out, [w[..., None, None] for w in weight_save], sum(torch.linalg.norm(w, dim=1).mean() for w in weight_save)


def load_released(form, ours, grid):
    """A released assigner holding the weights (and BatchNorm state) of difffeat's assigner `ours`."""
    c = ours.net[0].in_channels
    ref = released_pixel_assigner(c, grid) if form == "pixel" else released_global_assigner(c)
    src = ours.net
    with torch.no_grad():
        if form == "pixel":
            ref[0].weight.copy_(src[0].weight.flatten(1))
            ref[0].bias.copy_(src[0].bias)
            ref[4].weight.copy_(src[4].weight.flatten(1))
            ref[4].bias.copy_(src[4].bias)
        else:
            ref[0].weight.copy_(src[0].weight)
            ref[6].weight.copy_(src[6].weight)
            ref[6].bias.copy_(src[6].bias)
        ref[2].load_state_dict(src[2].state_dict())
    return ref


def batched_weights(assigner, maps):
    """What difffeat did before issue #26: all V maps through the assigner as one batch."""
    v, b = len(maps), maps[0].shape[0]
    logits = assigner(torch.cat(list(maps))).unflatten(0, (v, b)).transpose(0, 1)
    return torch.softmax(logits.float(), dim=1)


@pytest.mark.parametrize("form", ASSIGNER_FORMS)
def test_released_assigner_forward_equals_difffeats_in_training(form, monkeypatch):
    """Issue #26 acceptance: the released forward (per-variant assigner calls) and difffeat's on the same weights,
    in training mode (batch-statistics BatchNorm, dropout), equal to 1e-6: outputs, weights, the sparsity term,
    BatchNorm's running statistics. The old batched call (BatchNorm statistics pooled over variants) differed."""
    torch.manual_seed(0)
    specs = specs_of(["plain", "canny", "lora"], layers=(("a", (6, 8, 8)), ("b", (5, 4, 4))))
    mix = Amalgamation(specs, assigners=2, form=form).train()
    with torch.no_grad():  # BatchNorm's affine and running statistics away from their defaults
        for m in mix.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(mix)
    x = maps_of(specs, batch=2, seed=4)
    refs = [[load_released(form, f, (2, *s[1:])) for f in fs] for fs, s in zip(mix.assigners, mix.layout.shapes)]
    for r in refs:
        for f in r:
            f.train()

    torch.manual_seed(7)
    out, terms = mix(x, with_terms=True)
    torch.manual_seed(7)
    released = released_pixel_forward if form == "pixel" else released_global_forward
    ref = [released(fs, maps) for fs, maps in zip(refs, mix.per_layer(x))]

    for layer in range(2):
        assert (out[layer] - ref[layer][0]).abs().max().item() < 1e-6
    # the released sparsity term: Σ over groups (layers) and assigners of mean ‖w‖ over buckets, divided by n
    assert abs(terms["sparsity"].item() - sum(r[2] for r in ref).item() / 2) < 1e-6 and "diversity" not in terms
    for fs, rs in zip(mix.assigners, refs):  # running statistics, updated once per variant as the released code does
        for f, r in zip(fs, rs):
            assert (f.net[2].running_mean - r[2].running_mean).abs().max().item() < 1e-6
            assert (f.net[2].running_var - r[2].running_var).abs().max().item() < 1e-6
            assert f.net[2].num_batches_tracked.item() == r[2].num_batches_tracked.item() == 3
    # the weights, per layer and assigner
    torch.manual_seed(7)
    ours_w = copy.deepcopy(before).weights(x)
    for layer in range(2):
        for j in range(2):
            assert (ours_w[layer][j] - ref[layer][1][j]).abs().max().item() < 1e-6

    # before issue #26: one batched call for the V maps. Dropout off in both, so that only BatchNorm differs.
    for m in before.modules():
        if m.__class__.__name__ == "Dropout":
            m.p = 0.0
    per_variant = [[assigner_weights(f, maps) for f in fs]
                   for fs, maps in zip(copy.deepcopy(before).assigners, before.per_layer(x))]
    batched = [[batched_weights(f, maps) for f in fs] for fs, maps in zip(before.assigners, before.per_layer(x))]
    gap = max((a - b).abs().max().item() for pa, pb in zip(per_variant, batched) for a, b in zip(pa, pb))
    assert gap > 1e-3, gap
    monkeypatch.setattr("downstream.seg.amalgamate.assigner_weights", batched_weights)
    old = before(x)
    assert max((a - r[0]).abs().max().item() for a, r in zip(old, ref)) > 1e-3


def test_pixel_assigner_starts_as_the_released_init():
    torch.manual_seed(0)
    f = PixelAssigner(64)
    for conv in (f.net[0], f.net[4]):
        assert abs(conv.weight.std().item() - 0.02) < 0.001 and abs(conv.weight.mean().item()) < 0.001
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    bn = f.net[2]  # the released init touches BatchNorm2d only; its assigner's BatchNorm1d keeps torch's (1, 0)
    assert torch.equal(bn.weight, torch.ones(128)) and torch.equal(bn.bias, torch.zeros(128))


def test_eq5_terms_equal_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    # two layers; layer 0 with three assigners, layer 1 with one; weights [B, V, C, h, w] summing to 1 over V
    weights = [[torch.softmax(torch.randn(2, 3, 4, 2, 2, generator=g), 1) for _ in range(3)],
               [torch.softmax(torch.randn(2, 3, 5, 1, 1, generator=g), 1)]]
    arrays = [[w.double().numpy() for w in ws] for ws in weights]

    def column_norm_mean(w):  # mean over (b, c, pixel) of the ℓ2 norm over variants, by explicit loops
        b_, v_, c_, h_, w_ = w.shape
        total = 0.0
        for b in range(b_):
            for c in range(c_):
                for y in range(h_):
                    for x in range(w_):
                        total += math.sqrt(sum(w[b, i, c, y, x] ** 2 for i in range(v_)))
        return total / (b_ * c_ * h_ * w_)

    s_hand = np.mean([sum(column_norm_mean(w) for w in ws) for ws in arrays])
    d_hand = np.mean([0.5 * sum(column_norm_mean(ws[j] - ws[k]) for j in range(len(ws)) for k in range(len(ws))
                                if k != j) for ws in arrays])
    assert sparsity(weights).item() == pytest.approx(s_hand, rel=1e-5)
    assert diversity(weights).item() == pytest.approx(d_hand, rel=1e-5)
    assert d_hand > 0 and diversity(weights[1:]).item() == 0.0  # one assigner: no diversity
    assert amalgamation_penalty(weights, 0.3, 0.7).item() == pytest.approx(-0.3 * s_hand - 0.7 * d_hand, rel=1e-5)
    # the released code's: summed over layers (its feature groups) and assigners, divided by n (one n per model)
    same_n = [weights[0], [torch.softmax(torch.randn(2, 3, 5, 1, 1, generator=g), 1) for _ in range(3)]]
    s_released = sum(column_norm_mean(w.double().numpy()) for ws in same_n for w in ws) / 3
    assert released_sparsity(same_n).item() == pytest.approx(s_released, rel=1e-5)
    # the bounds that make S a sparsity measure: 1/√V for uniform weights, 1 for one-hot
    uniform = [[torch.full((1, 4, 2, 1, 1), 0.25)]]
    one_hot = [[torch.nn.functional.one_hot(torch.tensor([[1, 3]]), 4).permute(0, 2, 1)[..., None, None].float()]]
    assert sparsity(uniform).item() == pytest.approx(0.5) and sparsity(one_hot).item() == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_the_forward_returns_eq5_terms_and_the_penalty_reaches_the_assigners(weighting):
    torch.manual_seed(0)
    specs = specs_of(["plain", "canny"])
    model = SegModel(specs, K, HeadConfig(variants="amalgamate", assigners=2, amalgamation_weighting=weighting,
                                          hidden=8)).eval()
    x = maps_of(specs)
    logits, terms = model(x, with_penalty=True)
    assert all(torch.equal(a, b) for a, b in zip(logits, model(x)))  # the logits are the plain forward's
    weights = model.amalgamate.weights(model.norm(x))
    if weighting == "released":
        assert terms.keys() == {"sparsity"} and terms["sparsity"].item() == pytest.approx(
            released_sparsity(weights).item())
    else:
        assert terms["sparsity"].item() == pytest.approx(sparsity(weights).item())
        assert terms["diversity"].item() == pytest.approx(diversity(weights).item())
        assert FixedWeighting(0.5, 0.5).penalty(terms, None).item() == pytest.approx(
            amalgamation_penalty(weights, 0.5, 0.5).item())
    model.train()
    weighter = penalty_weighting(weighting, 0.5, 0.5)
    if weighting == "released":
        weighter.coefficient = 0.3
    _, terms = model(x, with_penalty=True)
    weighter.penalty(terms, torch.tensor(2.0)).backward()
    grads = [p.grad for p in model.amalgamate.assigners.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert SegModel(specs, K, HeadConfig())(x, with_penalty=True)[1] is None  # concat: no terms
    assert penalty_weighting("paper", 0, 0) is None  # the paper's form with both γ 0: no penalty


def released_walk(losses, rng):
    """The coefficient of each iteration in `task-pixel.py`'s training loop (``random.choice`` drawn from `rng`)."""
    last_sparsity, last_loss_delta, loss_log, sparsity_ = 0, 0, None, 0
    used = []
    for iteration, loss in enumerate(losses):
        used.append(sparsity_)  # (loss + sparsity * sparsity_loss * loss.detach() / (-sparsity_loss.detach()))
        if (iteration + 1) % 5 == 0:
            loss_delta = 0 if loss_log is None else loss_log - loss
            loss_log = loss
            ignore_comparision = ([True] + [False] * 19)[rng.integers(20)]
            if ignore_comparision or loss_delta > last_loss_delta:
                last_sparsity = sparsity_
                last_loss_delta = loss_delta
            last_loss_delta *= 0.9
            sparsity_ = max(0, last_sparsity + [-0.00001, 0, 0.00001][rng.integers(3)])
    return used


def test_adaptive_weighting_walks_as_the_released_loop():
    g = np.random.default_rng(0)
    losses = (2.0 * np.exp(-np.arange(400) / 150) + 0.05 * g.normal(size=400)).tolist()
    w = AdaptiveWeighting(seed=3)
    used = []
    for loss in losses:
        used.append(w.coefficient)
        w.update(torch.tensor(loss))
    assert used == released_walk(losses, np.random.default_rng([3, 1]))
    assert used[0] == 0 and max(used) > 0 and all(c >= 0 for c in used)
    assert all(used[i] == used[i - 1] for i in range(1, len(used)) if i % 5)  # moves only every 5 iterations
    # the penalty: value −c·L̂, gradient −c·(L̂/Ŝ)·∇S (the sparsity term scaled to the size of the task loss)
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    s = theta.pow(2).sum() + 1.0
    loss = (theta * torch.tensor([2.0, 1.0])).sum() + 3.0
    w.coefficient = 0.004
    penalty = w.penalty({"sparsity": s}, loss)
    assert penalty.item() == pytest.approx(-0.004 * loss.item())
    (grad,) = torch.autograd.grad(penalty, theta)
    assert torch.allclose(grad, -0.004 * loss.detach() / s.detach() * 2 * theta.detach())
    assert AdaptiveWeighting().penalty({"sparsity": s}, loss).item() == 0  # starts at 0


def test_objective_adds_the_weighted_penalty_and_keeps_the_walk_in_its_checkpoint(tmp_path):
    from downstream.losses.aucseg import SegLoss

    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, K, (2, 8, 8), generator=g)
    logits = [torch.randn(2, K, 4, 4, generator=g)]
    terms = {"sparsity": torch.tensor(0.8)}
    ce = SegLoss("ce", 0.5, 1.0, None, 255, "valid")
    plain = SegObjective(ce)
    base, logged = plain(logits, mask, terms)  # no weighting: terms are ignored
    assert logged.shape == (3,)
    fixed = SegObjective(ce, weighting=FixedWeighting(0.1, 0.2))
    total, logged = fixed(logits, mask, {"sparsity": torch.tensor(0.8), "diversity": torch.tensor(0.5)})
    assert total.item() == pytest.approx(base.item() - 0.08 - 0.1) and logged[3].item() == pytest.approx(-0.18)
    adaptive = SegObjective(ce, weighting=AdaptiveWeighting(seed=1))
    for _ in range(40):
        total, logged = adaptive(logits, mask, terms)
    c = adaptive.weighting.coefficient
    assert total.item() == pytest.approx(base.item() * (1 - c)) and logged[3].item() == pytest.approx(-c * base.item())
    checkpoints = Checkpoints(tmp_path / "ck")
    checkpoints.save(40, **adaptive.state())
    again = SegObjective(ce, weighting=AdaptiveWeighting(seed=1))
    again.load_state(checkpoints.latest())
    for _ in range(60):  # the restored walk goes on as the uninterrupted one
        a = adaptive(logits, mask, terms)[0].item()
        assert again(logits, mask, terms)[0].item() == a
    assert again.weighting.state() == adaptive.weighting.state()


def test_attention_maps_are_concatenated_after_amalgamation():
    specs = specs_of(["plain", "canny"], layers=(("a", (6, 8, 8)), ("attn:probs", (77, 8, 8))))
    layout = variant_layout(specs, ["*:probs"])
    assert layout.names == ("plain", "canny") and layout.layers == ("a",) and layout.after == (1, 3)
    model = SegModel(specs, K, HeadConfig(variants="amalgamate", assigners=2, hidden=8))
    assert model.amalgamate.out_shapes == [(12, 8, 8), (77, 8, 8), (77, 8, 8)]
    x = maps_of(specs)
    out = model.amalgamate(x)
    assert torch.equal(out[1], x[1]) and torch.equal(out[2], x[3])
    # several stores: each store a variant, an attention-only store concatenated after
    specs = specs_of([""], store=0) + specs_of([""], store=1) + [FeatureSpec(2, "up_cross.16:probs", (7, 4, 4))]
    layout = variant_layout(specs, ["*:probs"])
    assert layout.names == ("store0", "store1") and layout.after == (4,)


def test_dropout_is_inverted_dropout():
    from downstream.seg.amalgamate import Dropout

    drop, x = Dropout(0.5), torch.ones(200_000)
    torch.manual_seed(0)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0} and abs((y == 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(drop.eval()(x), x)


def test_assigner_forms_and_weightings_are_the_configs():
    assert tuple(ASSIGNER_FORMS) == tuple(CONFIG_FORMS)
    assert tuple(WEIGHTINGS) == tuple(AMALGAMATION_WEIGHTINGS)
    assert HeadConfig().amalgamation_weighting == SegTrainConfig.from_dict(dict(features=["x"],
                                                                                out="o")).head.amalgamation_weighting \
        == "released"


# ----------------------------------------------------------------------------------------- bad input
def test_options_that_cannot_act_are_errors_naming_the_field():
    two = specs_of(["plain", "canny"])
    for mode in ("weighted", "amalgamate"):
        for specs in (specs_of([""]), specs_of(["plain"]), specs_of(["plain"]) + [FeatureSpec(0, "plain/q:probs",
                                                                                                 (3, 8, 8))]):
            with pytest.raises(ConfigError, match=f"{mode} needs two or more feature variants") as e:
                SegModel(specs, K, HeadConfig(variants=mode))
            assert e.value.field == "variants"
        other = two[:3] + [FeatureSpec(0, "canny/c", (4, 4, 4))]
        with pytest.raises(ConfigError, match=r"variant plain has \['a 6×8×8', 'b 4×4×4'\], variant canny has "
                                              r"\['a 6×8×8', 'c 4×4×4'\]"):
            SegModel(other, K, HeadConfig(variants=mode))
    with pytest.raises(ConfigError, match="assigners: must be ≥ 1"):
        HeadConfig(variants="amalgamate", assigners=0).validate()
    with pytest.raises(ConfigError, match=r"assigners: must be ≤ variants × layers = 2 × 2 = 4, got 5") as e:
        SegModel(two, K, HeadConfig(variants="amalgamate", assigners=5))
    assert e.value.field == "assigners"
    SegModel(two, K, HeadConfig(variants="amalgamate", assigners=4))


# ------------------------------------------------------------------------------------------- train-seg
def write_store(path, keys, images, variants, layers=(("x", (4, 8, 8)),), seed=0):
    config = {"model": "test", "layers": [f"{v}/{n}" if v else n for v in variants for n, _ in layers],
              "resolution": [SIZE, SIZE], "resize": "stretch", "images": str(images)}
    with FeatureStoreWriter(path, config) as w:
        for i, key in enumerate(keys):
            rng = np.random.default_rng(seed * 100 + i)
            w.add(key, {f"{v}/{n}" if v else n: rng.normal(size=shape).astype(np.float32)
                        for v in variants for n, shape in layers})
    return path


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "root"
    keys = [f"images/{i}.png" for i in range(4)]
    for i in range(4):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((SIZE, SIZE, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[: 4 + i] = 1
        m[-3:] = 2
        Image.fromarray(m).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    return root, keys


def run_cli(argv, capsys):
    rc = main(["--quiet", *argv])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("form", ASSIGNER_FORMS)
def test_train_seg_amalgamates_one_multi_variant_store(world, tmp_path, form, capsys):
    root, keys = world
    store = write_store(tmp_path / "two", keys, root, ["plain", "canny"], layers=(("x", (4, 8, 8)),
                                                                                 ("y:probs", (3, 8, 8))))
    runs = {}
    for mode in ("concat", "amalgamate"):
        cfg = SegTrainConfig.from_dict(dict(features=[str(store)], masks=str(root), out=str(tmp_path / mode),
                                            iterations=3, batch_size=2, hidden=8, variants=mode, assigners=2,
                                            assigner=form, log_every=1))
        runs[mode] = train_seg(cfg, progress=False)
    run = runs["amalgamate"]
    weights = load_tensors(run / "model.safetensors")[0]
    assert any(k.startswith("amalgamate.assigners.0.1.") for k in weights)  # layer x, second assigner
    history = json.loads((run / "history.json").read_text())
    assert all("penalty" in h for h in history if "loss" in h)
    saved = json.loads((run / "config.json").read_text())
    assert saved["variants"] == ["plain", "canny"] and saved["config"]["head"]["assigner"] == form
    summary, meta = load_tensors(run / "amalgamation.safetensors")
    assert meta["variants"] == ["plain", "canny"] and meta["layers"] == ["x"] and meta["assigners"] == 2
    assert summary["x/a1/mean"].shape == (2, 4) and torch.allclose(summary["x/a1/mean"].sum(0), torch.ones(4))
    assert ("x/a0/maps" in summary) == (form == "pixel")
    assert (run / "amalgamation.png").stat().st_size > 0
    assert not (runs["concat"] / "amalgamation.png").exists()
    scores = eval_seg(run, [str(store)], str(root), progress=False)  # the saved run rebuilds its amalgamation
    assert 0 <= scores["miou"] <= 1
    # resumed on a store re-extracted with another variant set: refused, naming the difference
    shutil.rmtree(store)
    write_store(store, keys, root, ["plain", "lora"], layers=(("x", (4, 8, 8)), ("y:probs", (3, 8, 8))))
    rc, err = run_cli(["train-seg", "--features", str(store), "--masks", str(root), "--out", str(run),
                       "--iterations", "3", "--batch-size", "2", "--hidden", "8", "--variants", "amalgamate",
                       "--assigners", "2", "--assigner", form, "--log-every", "1", "--resume"], capsys)
    # (the store's identity, pinned since issue #24, may say it first: its layers carry the variant names)
    assert rc == 2 and "\n" not in err, err
    assert ("made with other variants" in err and '["plain","canny"]' in err and '["plain","lora"]' in err) \
        or "re-extracted with other settings (differs in: layers)" in err, err


def test_train_seg_amalgamates_several_stores_and_refuses_bad_options(world, tmp_path, capsys):
    root, keys = world
    stores = [str(write_store(tmp_path / f"s{i}", keys, root, [""], seed=i)) for i in range(3)]
    base = ["train-seg", *[a for s in stores for a in ("--features", s)], "--masks", str(root), "--iterations", "2",
            "--batch-size", "2", "--hidden", "8", "--variants", "amalgamate"]
    paper = ["--assigners", "3", "--amalgamation-weighting", "paper", "--gamma-sparsity", "0.1",
             "--gamma-diversity", "0.2"]
    rc, err = run_cli([*base, "--out", str(tmp_path / "ok"), *paper], capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["variants"] == ["store0", "store1", "store2"]
    assert (saved["config"]["head"]["gamma_sparsity"], saved["config"]["head"]["gamma_diversity"]) == (0.1, 0.2)
    assert saved["config"]["head"]["amalgamation_weighting"] == "paper"
    history = json.loads((tmp_path / "ok" / "history.json").read_text())
    assert all(h["penalty"] < 0 for h in history if "loss" in h)  # −γ1 S − γ2 D from the first iteration
    # resumed with the other weighting form: refused, naming it
    rc, err = run_cli([*base, "--out", str(tmp_path / "ok"), *paper[:2], "--resume"], capsys)
    assert rc == 2 and "differs in: head.amalgamation_weighting, head.gamma_diversity, head.gamma_sparsity" in err, err
    assert "\n" not in err
    for extra, message in [(["--assigners", "0"], "--assigners: must be ≥ 1, got 0"),
                           (["--assigners", "4"], "--assigners: must be ≤ variants × layers = 3 × 1 = 3, got 4"),
                           (["--gamma-sparsity", "-1"], "--gamma-sparsity: must be ≥ 0"),
                           (["--gamma-sparsity", "0.1"], "--gamma-sparsity: acts only with the paper's weighting "
                                                         "(--amalgamation-weighting paper)"),
                           (["--gamma-diversity", "0"], "--gamma-diversity: acts only with the paper's weighting")]:
        rc, err = run_cli([*base, "--out", str(tmp_path / "bad"), *extra], capsys)
        assert rc == 2 and message in err and "\n" not in err, (extra, err)
        assert not (tmp_path / "bad").exists()  # refused before anything was written
    rc, err = run_cli([*base[:3], *base[7:], "--out", str(tmp_path / "one")], capsys)
    assert rc == 2 and "--variants: amalgamate needs two or more feature variants" in err
    odd = write_store(tmp_path / "odd", keys, root, [""], layers=(("z", (4, 8, 8)),))
    rc, err = run_cli([*base, "--features", str(odd), "--out", str(tmp_path / "odd-run")], capsys)
    assert rc == 2 and "variant store0 has ['x 4×8×8'], variant store3 has ['z 4×8×8']" in err


def test_released_amalgamation_resumes_to_the_weights_of_an_uninterrupted_run(world, tmp_path):
    """The released weighting's walk (coefficient, remembered loss, random state) is in the checkpoint."""
    from safetensors.torch import load_file

    root, keys = world
    store = write_store(tmp_path / "two", keys, root, ["plain", "canny"])
    kw = dict(features=[str(store)], masks=str(root), iterations=23, batch_size=2, hidden=8, variants="amalgamate",
              checkpoint_every=4, log_every=1, seed=2)
    whole = train_seg(SegTrainConfig.from_dict(dict(out=str(tmp_path / "whole"), **kw)), progress=False)
    part = SegTrainConfig.from_dict(dict(out=str(tmp_path / "part"), **kw))
    train_seg(part, progress=False, stop_after=12)
    walk = Checkpoints(tmp_path / "part" / "checkpoints").latest().load("amalgamation_weighting")
    assert walk["iterations"] == 12 and walk["last_loss"] is not None
    train_seg(part, progress=False, resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((whole / "history.json").read_text())
    hb = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["penalty"] for h in ha] == [h["penalty"] for h in hb]
    assert all(h["penalty"] == 0 for h in ha[:5])  # the coefficient starts at 0 …
    assert any(h["penalty"] < 0 for h in ha[12:])  # … and has moved after the resume point
