"""The content-shift paper's feature amalgamation (issue #12 item 1): input-conditioned weight assigners whose
weights sum to 1 per channel, Eq. 5's terms against a hand computation, n = 1 with one variant is the plain
feature, `train-seg --variants amalgamate` on one multi-variant store and on several stores, and every bad
input as one clear error."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.cli import main
from difffeat.run import ConfigError, load_tensors
from difffeat.store import FeatureStoreWriter
from downstream.seg.amalgamate import (
    ASSIGNER_FORMS,
    Amalgamation,
    amalgamation_penalty,
    diversity,
    sparsity,
    variant_layout,
)
from downstream.seg.config import ASSIGNER_FORMS as CONFIG_FORMS
from downstream.seg.config import SegTrainConfig
from downstream.seg.data import FeatureSpec
from downstream.seg.evaluate import eval_seg
from downstream.seg.model import HeadConfig, SegModel
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
    # the bounds that make S a sparsity measure: 1/√V for uniform weights, 1 for one-hot
    uniform = [[torch.full((1, 4, 2, 1, 1), 0.25)]]
    one_hot = [[torch.nn.functional.one_hot(torch.tensor([[1, 3]]), 4).permute(0, 2, 1)[..., None, None].float()]]
    assert sparsity(uniform).item() == pytest.approx(0.5) and sparsity(one_hot).item() == pytest.approx(1.0)


def test_penalty_reaches_the_loss_and_its_gradient_the_assigners():
    torch.manual_seed(0)
    specs = specs_of(["plain", "canny"])
    model = SegModel(specs, K, HeadConfig(variants="amalgamate", assigners=2, gamma_sparsity=0.5,
                                          gamma_diversity=0.5, hidden=8))
    model(maps_of(specs))
    penalty = model.penalty()
    weights = model.amalgamate.last_weights
    assert penalty.item() == pytest.approx(amalgamation_penalty(weights, 0.5, 0.5).item())
    penalty.backward()
    grads = [p.grad for p in model.amalgamate.assigners.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert SegModel(specs, K, HeadConfig(variants="amalgamate", gamma_sparsity=0, gamma_diversity=0)).penalty() is None
    assert SegModel(specs, K, HeadConfig()).penalty() is None  # concat


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


def test_assigner_forms_are_the_configs():
    assert tuple(ASSIGNER_FORMS) == tuple(CONFIG_FORMS)


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
        cfg = SegTrainConfig(features=[str(store)], masks=str(root), out=str(tmp_path / mode), iterations=3,
                             batch_size=2, hidden=8, variants=mode, assigners=2, assigner=form, log_every=1)
        runs[mode] = train_seg(cfg, progress=False)
    run = runs["amalgamate"]
    weights = load_tensors(run / "model.safetensors")[0]
    assert any(k.startswith("amalgamate.assigners.0.1.") for k in weights)  # layer x, second assigner
    history = json.loads((run / "history.json").read_text())
    assert all("penalty" in h for h in history if "loss" in h)
    saved = json.loads((run / "config.json").read_text())
    assert saved["variants"] == ["plain", "canny"] and saved["config"]["assigner"] == form
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
    assert rc == 2 and "made with other variants" in err and '["plain","canny"]' in err and '["plain","lora"]' in err
    assert "\n" not in err


def test_train_seg_amalgamates_several_stores_and_refuses_bad_options(world, tmp_path, capsys):
    root, keys = world
    stores = [str(write_store(tmp_path / f"s{i}", keys, root, [""], seed=i)) for i in range(3)]
    base = ["train-seg", *[a for s in stores for a in ("--features", s)], "--masks", str(root), "--iterations", "2",
            "--batch-size", "2", "--hidden", "8", "--variants", "amalgamate"]
    rc, err = run_cli([*base, "--out", str(tmp_path / "ok"), "--assigners", "3", "--gamma-sparsity", "0.1",
                       "--gamma-diversity", "0.2"], capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["variants"] == ["store0", "store1", "store2"]
    assert (saved["config"]["gamma_sparsity"], saved["config"]["gamma_diversity"]) == (0.1, 0.2)
    for extra, message in [(["--assigners", "0"], "--assigners: must be ≥ 1, got 0"),
                           (["--assigners", "4"], "--assigners: must be ≤ variants × layers = 3 × 1 = 3, got 4"),
                           (["--gamma-sparsity", "-1"], "--gamma-sparsity: must be ≥ 0")]:
        rc, err = run_cli([*base, "--out", str(tmp_path / "bad"), *extra], capsys)
        assert rc == 2 and message in err and "\n" not in err, (extra, err)
        assert not (tmp_path / "bad").exists()  # refused before anything was written
    rc, err = run_cli([*base[:3], *base[7:], "--out", str(tmp_path / "one")], capsys)
    assert rc == 2 and "--variants: amalgamate needs two or more feature variants" in err
    odd = write_store(tmp_path / "odd", keys, root, [""], layers=(("z", (4, 8, 8)),))
    rc, err = run_cli([*base, "--features", str(odd), "--out", str(tmp_path / "odd-run")], capsys)
    assert rc == 2 and "variant store0 has ['x 4×8×8'], variant store3 has ['z 4×8×8']" in err
