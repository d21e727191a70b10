"""Semantic correspondence: PCK against direct counts, matching against DIFT's own recipe and known geometry (identical
images, a horizontal flip, a sub-pixel shift), mutual nearest neighbours, the placement mapping, bad input, and
eval-corr / match end to end on the correspondence world with mini against mini-random."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.cli import main
from difffeat.data.geometry import placement
from difffeat.data.layouts.spair import PairSample
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter
from downstream.corr import points as P
from downstream.corr.evaluate import eval_corr, read_per_pair
from downstream.corr.features import choose_layers
from downstream.corr.match import (
    lattice_descriptors,
    lattice_norms,
    lattice_similarity,
    match_points,
    mutual_nearest,
    sample_descriptors,
    similarity,
    window_soft_argmax,
)
from downstream.corr.pck import bootstrap_interval, paired_difference, pck_per_image, pck_per_point, pck_table


# ------------------------------------------------------------------------------------------------- helpers
def make_pair(key, source, target, src_pts, tgt_pts, source_size, target_size=None, valid=None, bbox=None,
              category="thing"):
    target_size = target_size or source_size
    src, tgt = np.asarray(src_pts, float).reshape(-1, 2), np.asarray(tgt_pts, float).reshape(-1, 2)
    h, w = target_size
    return PairSample(key=key, split="test", category=category, source=source, target=target,
                      source_size=tuple(source_size), target_size=tuple(target_size), source_points=src,
                      target_points=tgt, valid=np.ones(len(src), bool) if valid is None else np.asarray(valid),
                      source_bbox=(0, 0, source_size[1] - 1, source_size[0] - 1),
                      target_bbox=bbox or (0, 0, w - 1, h - 1), point_ids=tuple(str(i) for i in range(len(src))))


def write_store(path, images, frame=(32, 32), mode="stretch"):
    """images: key → (original size (H, W), {layer: [C, h, w]}); placements recorded as extraction records them."""
    config = {"model": "hand-made", "resolution": list(frame), "resize": mode}
    with FeatureStoreWriter(path, config) as w:
        for key, (size, maps) in images.items():
            place = placement(size, frame, mode)
            w.add(key, maps, placement=None if place.identity else place.to_dict())
    return FeatureStore(path)


def scores(results, norm="bbox", alpha=0.1):
    return results["scores"][norm][str(alpha)]["overall"]


# ----------------------------------------------------------------------------------------------------- PCK
def test_pck_equals_a_direct_count():
    rng = np.random.default_rng(0)
    n_pairs, categories = 40, ["cat", "dog", "cow"]
    correct, points, cats = [], [], []
    for p in range(n_pairs):
        n = int(rng.integers(0, 8))  # pairs without points too
        truth, pred = rng.uniform(0, 100, (n, 2)), rng.uniform(0, 100, (n, 2))
        box = (10, 10, 10 + rng.uniform(20, 80), 10 + rng.uniform(20, 80))
        thr = 0.1 * max(box[2] - box[0], box[3] - box[1])
        correct.append(sum(1 for k in range(n) if np.hypot(*(pred[k] - truth[k])) <= thr))
        points.append(n)
        cats.append(categories[p % 3])
    table = pck_table(np.array(correct), np.array(points), cats)
    assert table["overall"]["per_point"] == pytest.approx(sum(correct) / sum(points))
    fractions = [c / n for c, n in zip(correct, points) if n]
    assert table["overall"]["per_image"] == pytest.approx(sum(fractions) / len(fractions))
    assert table["overall"]["pairs"] == len(fractions) and table["overall"]["points"] == sum(points)
    for c in categories:
        mine = [(k, n) for k, n, cc in zip(correct, points, cats) if cc == c]
        assert table["per_category"][c]["per_point"] == pytest.approx(sum(k for k, _ in mine) / sum(n for _, n in mine))
        per = [k / n for k, n in mine if n]
        assert table["per_category"][c]["per_image"] == pytest.approx(sum(per) / len(per))
    assert table["category_mean"]["per_image"] == pytest.approx(
        np.mean([table["per_category"][c]["per_image"] for c in categories]))


def test_per_image_and_per_point_differ_where_they_should():
    # one easy pair with many points, one hard pair with a single point
    assert pck_per_point(np.array([10, 0]), np.array([10, 1])) == pytest.approx(10 / 11)
    assert pck_per_image(np.array([10, 0]), np.array([10, 1])) == pytest.approx(0.5)
    # equal point counts: the two averages agree
    assert pck_per_point(np.array([3, 1]), np.array([4, 4])) == pck_per_image(np.array([3, 1]), np.array([4, 4]))


def test_bootstrap_intervals_resample_pairs():
    correct, points = np.array([3, 0, 5, 2, 4]), np.array([4, 3, 5, 2, 6])
    ci = bootstrap_interval(correct, points, draws=500, seed=3)
    rng = np.random.default_rng(3)  # the same draws, one by one
    idx = rng.integers(0, 5, size=(500, 5))
    naive = [correct[i].sum() / points[i].sum() for i in idx]
    assert ci["per_point"] == pytest.approx(list(np.percentile(naive, [2.5, 97.5])))
    assert ci["per_point"][0] <= pck_per_point(correct, points) <= ci["per_point"][1]
    # pairs all alike: no spread
    assert bootstrap_interval(np.array([1, 1, 1]), np.array([2, 2, 2]), draws=50)["per_image"] == [0.5, 0.5]
    diff = paired_difference(correct, correct, points, draws=200)
    assert diff["per_point"] == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------ matching
def test_matching_equals_dift_upsample_then_index():
    """Bilinear sampling at a keypoint's frame position = DIFT's upsample-to-the-image then index; cosine; argmax."""
    torch.manual_seed(0)
    src, tgt = torch.randn(2, 8, 6, 7), torch.randn(2, 8, 5, 9)
    h, w = 23, 31
    pts = torch.stack([torch.randint(0, w, (2, 6)), torch.randint(0, h, (2, 6))], -1)
    uv = (pts.float() + 0.5) / torch.tensor([w, h])
    pos, score = match_points(src, tgt, uv, (h, w))
    up_s = F.interpolate(src, (h, w), mode="bilinear", align_corners=False)
    up_t = F.normalize(F.interpolate(tgt, (h, w), mode="bilinear", align_corners=False), dim=1)
    for b in range(2):
        for n in range(6):
            v = F.normalize(up_s[b, :, pts[b, n, 1], pts[b, n, 0]], dim=0)
            cos = torch.einsum("c,chw->hw", v, up_t[b])
            best = int(cos.argmax())
            assert (int(pos[b, n, 0]), int(pos[b, n, 1])) == (best % w, best // w)
            assert float(score[b, n]) == pytest.approx(float(cos.max()), abs=1e-5)


def test_similarity_on_the_feature_grid_equals_the_descriptors_on_the_lattice():
    """Cosines read from the grid of dot products (linear) = the cosines of descriptors read on the lattice; two
    layers of different grids (the mean of their cosines), a working grid and explicit positions."""
    torch.manual_seed(2)
    src = [torch.randn(3, 8, 6, 6), torch.randn(3, 4, 12, 12)]
    tgt = [torch.randn(3, 8, 5, 7), torch.randn(3, 4, 10, 14)]
    uv = torch.rand(3, 5, 2)
    d = sample_descriptors(src, uv)
    assert torch.allclose(d.norm(dim=-1), torch.ones(3, 5))
    explicit = (torch.linspace(-0.05, 1.02, 19), torch.linspace(0.1, 0.9, 11))
    for lattice in ((17, 23), explicit):
        want = similarity(d, lattice_descriptors(tgt, lattice))
        per_layer = sum(similarity(sample_descriptors([s], uv), lattice_descriptors([t], lattice))
                        for s, t in zip(src, tgt)) / 2
        assert torch.allclose(want, per_layer, atol=1e-5)
        assert torch.allclose(lattice_similarity(d, tgt, lattice), want, atol=1e-5)
        for t in tgt:  # the norms from neighbouring cells' products = the norms of the maps read there
            direct = (F.interpolate(t, lattice, mode="bilinear", align_corners=False) if isinstance(lattice[0], int)
                      else F.grid_sample(t, torch.stack(torch.meshgrid(lattice[1] * 2 - 1, lattice[0] * 2 - 1,
                                                                       indexing="ij")[::-1], -1)[None].expand(
                          3, -1, -1, -1), padding_mode="border", align_corners=False)).norm(dim=1)
            assert torch.allclose(lattice_norms(t, lattice), direct, rtol=1e-5)


def test_soft_argmax_refines_to_a_sub_pixel_peak():
    """A smooth feature field shifted by (0.4, 0.3) cells: the hard argmax is off by about half a cell, the window
    soft-argmax lands on the true sub-cell position."""
    a = 0.35  # one period (18 cells) longer than the map: a single peak
    field = lambda x, y: torch.stack([torch.cos(a * x), torch.sin(a * x), torch.cos(a * y), torch.sin(a * y)])
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    source = field(xx, yy)[None]
    target = field(xx + 0.4, yy + 0.3)[None]  # target cell (i, j) shows the source's (i + 0.4, j + 0.3)
    cells = torch.tensor([[5.0, 6.0], [8.0, 9.0], [10.0, 7.0]])
    uv = ((cells + 0.5) / 16)[None]
    truth = cells - torch.tensor([0.4, 0.3])
    hard, _ = match_points(source, target, uv, (16, 16))
    soft, _ = match_points(source, target, uv, (16, 16), soft_argmax=3, temperature=a * a / 2)
    assert (hard[0] - truth).abs().max() > 0.25
    assert (soft[0] - truth).abs().max() < 0.05
    # on a similarity map with a symmetric peak between cells
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    sim = -((xx - 4.3) ** 2 + (yy - 6.8) ** 2)[None, None] / 10
    got = window_soft_argmax(sim, torch.tensor([[[4, 7]]]), radius=4, temperature=0.1)
    assert got[0, 0].tolist() == pytest.approx([4.3, 6.8], abs=0.02)


def test_mutual_nearest_neighbours():
    torch.manual_seed(1)
    a = torch.randn(1, 8, 6, 6)
    perm = torch.randperm(36)
    b = a.flatten(2)[:, :, perm].reshape(1, 8, 6, 6)  # b's cell k shows a's cell perm[k]
    ia, ib, score = mutual_nearest(a, b, chunk=5)
    assert len(ia) == 36 and torch.equal(perm[ib], ia) and torch.allclose(score, torch.ones(36))
    # unrelated maps: the same as the full similarity matrix, mutual both ways
    c = torch.randn(1, 8, 5, 7)
    ia, ib, _ = mutual_nearest(a, c, chunk=7)
    fa, fc = F.normalize(a.flatten(2)[0].T, dim=1), F.normalize(c.flatten(2)[0].T, dim=1)
    sim = fa @ fc.T
    want = [i for i in range(36) if int(sim[:, sim[i].argmax()].argmax()) == i]
    assert ia.tolist() == want and ib.tolist() == [int(sim[i].argmax()) for i in want]


# ---------------------------------------------------------------------------------------- placement mapping
@pytest.mark.parametrize("mode", ["center-crop", "pad", "stretch"])
def test_points_map_into_the_frame_where_pillow_puts_them(mode):
    from difffeat.data.images import resize_image

    size, frame = (60, 100), (32, 32)
    place = placement(size, frame, mode)
    for x, y in [(50, 30), (60, 20), (45, 40)]:
        img = np.zeros((*size, 3), np.uint8)
        img[y - 2 : y + 3, x - 2 : x + 3] = 255
        framed = np.asarray(resize_image(Image.fromarray(img), frame, mode)).astype(float)[..., 0]
        rows, cols = np.mgrid[0 : frame[0], 0 : frame[1]]
        seen = np.array([(framed * cols).sum(), (framed * rows).sum()]) / framed.sum()  # brightness centroid
        uv = P.image_to_frame([[x, y]], place)
        assert P.frame_to_grid(uv, frame)[0] == pytest.approx(seen, abs=0.35)
        assert P.frame_to_image(uv, place)[0] == pytest.approx([x, y])
    # a centre crop of a wide image hides its left and right ends; pad and stretch hide nothing
    hidden = P.in_frame(P.image_to_frame([[5, 30], [95, 30]], place))
    assert hidden.tolist() == ([False, False] if mode == "center-crop" else [True, True])
    cells = np.array([[0, 0], [3.5, 1.25], [7, 7]])
    assert P.frame_to_grid(P.grid_to_frame(cells, (8, 8)), (8, 8)) == pytest.approx(cells)
    assert P.rescale(P.rescale(cells, (40, 60), (20, 30)), (20, 30), (40, 60)) == pytest.approx(cells)


# ------------------------------------------------------------------------------- known answers end to end
@pytest.fixture(scope="module")
def hand_store(tmp_path_factory):
    """Random features of image a (40 × 60, in a 32² frame, stretched), its horizontal mirror b, and a copy c
    stored from a half-size copy of the image."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(16, 8, 8)).astype(np.float32)
    root = tmp_path_factory.mktemp("corr-hand")
    store = write_store(root / "feat", {"a.jpg": ((40, 60), {"f": maps}),
                                        "b.jpg": ((40, 60), {"f": maps[:, :, ::-1].copy()})})
    write_store(root / "half", {"a.jpg": ((20, 30), {"f": maps})})
    return root, store


def test_identical_images_score_one(hand_store, tmp_path):
    root, _ = hand_store
    rng = np.random.default_rng(1)
    # in the border strip where bilinear upsampling clamps (x < 3.25 or > 55.75 for 8 → 60 cells; y ≤ 2 or
    # > 37.5), pixels share one descriptor and the argmax takes the first of them: DIFT's own tie
    pts = np.stack([rng.integers(4, 56, 12), rng.integers(3, 38, 12)], 1)
    pair = make_pair("same", "a.jpg", "a.jpg", pts, pts, (40, 60))
    for extra in ({}, {"working_size": [64, 64]}, {"soft_argmax": 2}):
        res = eval_corr([root / "feat"], pairs=[pair], out=str(tmp_path / "same"), alphas=[0.02, 0.1],
                        progress=False, examples=1, **extra)
        for norm in ("bbox", "img"):
            for alpha in (0.02, 0.1):
                assert scores(res, norm, alpha)["per_point"] == 1.0 and scores(res, norm, alpha)["per_image"] == 1.0
    for name in ("results.json", "per_pair.csv", "examples.png", "report.html", "config.json"):
        assert (tmp_path / "same" / name).is_file(), name


def test_a_known_horizontal_flip_gives_the_known_score(hand_store, tmp_path):
    """Target b is a's mirror image but annotated with a's own positions: every point is matched to its mirror
    x' = W − 1 − x, so it is correct exactly when |W − 1 − 2x| ≤ α · L."""
    root, _ = hand_store
    w = 60
    # off the border strip where upsampling clamps (see test_identical_images_score_one)
    first = np.array([[29, 5], [30, 10], [31, 12], [20, 30], [40, 4], [33, 33], [10, 10], [50, 36]])
    second = np.array([[28, 20], [5, 5]])
    pairs = [make_pair("flip-1", "a.jpg", "b.jpg", first, first, (40, 60), category="x"),
             make_pair("flip-2", "a.jpg", "b.jpg", second, second, (40, 60), category="y")]
    res = eval_corr([root / "feat"], pairs=pairs, out=str(tmp_path / "flip"), alphas=[0.05, 0.1], progress=False,
                    bootstrap=0)
    for alpha in (0.05, 0.1):
        for norm, length in (("bbox", 59.0), ("img", 60.0)):
            ok = [np.abs(w - 1 - 2 * pts[:, 0]) <= alpha * length for pts in (first, second)]
            got = scores(res, norm, alpha)
            assert got["per_point"] == pytest.approx(sum(o.sum() for o in ok) / 10)
            assert got["per_image"] == pytest.approx(np.mean([o.mean() for o in ok]))
    assert scores(res, "bbox", 0.1)["per_point"] != scores(res, "bbox", 0.1)["per_image"]
    table = read_per_pair(tmp_path / "flip" / "per_pair.csv")
    assert table["points"].tolist() == [8, 2]
    mirrored = [make_pair("m", "a.jpg", "b.jpg", first, np.stack([w - 1 - first[:, 0], first[:, 1]], 1), (40, 60))]
    res = eval_corr([root / "feat"], pairs=mirrored, out=str(tmp_path / "flip"), alphas=[0.01], progress=False)
    assert scores(res, "bbox", 0.01)["per_point"] == 1.0  # annotated with the mirror: every match exact


# ------------------------------------------------------------------------------------------------ bad input
def test_invisible_and_outside_points_are_left_out_and_counted(tmp_path):
    rng = np.random.default_rng(2)
    maps = {"f": rng.normal(size=(8, 8, 8)).astype(np.float32)}
    # a wide image centre-cropped into a square frame: columns x < 20 and x > 59 were never seen
    write_store(tmp_path / "crop", {"w.jpg": ((40, 80), maps)}, mode="center-crop")
    src = np.array([[30, 10], [45, 20], [5, 10], [75, 30], [-9, 3], [35, 5]])
    pair = make_pair("p", "w.jpg", "w.jpg", src, src, (40, 80), valid=[True, True, True, True, True, False])
    res = eval_corr([tmp_path / "crop"], pairs=[pair], out=str(tmp_path / "out"), progress=False)
    assert res["excluded"] == {"invalid": 1, "outside_image": 1, "outside_frame": 2, "pairs_without_points": 0}
    assert res["points"] == 2 and scores(res)["per_point"] == 1.0
    # a pair with nothing left to score counts as such and scores nothing
    none = make_pair("q", "w.jpg", "w.jpg", src[2:4], src[2:4], (40, 80))
    res = eval_corr([tmp_path / "crop"], pairs=[pair, none], out=str(tmp_path / "out"), progress=False)
    assert res["excluded"]["pairs_without_points"] == 1 and scores(res)["pairs"] == 1


def test_missing_store_keys_are_one_line_naming_them(hand_store, tmp_path):
    root, _ = hand_store
    pairs = [make_pair(f"p{i}", "a.jpg", f"gone-{i}.jpg", [[1, 1]], [[1, 1]], (40, 60)) for i in range(8)]
    with pytest.raises(UserError) as err:
        eval_corr([root / "feat"], pairs=pairs, out=str(tmp_path / "x"), progress=False)
    text = str(err.value)
    assert "\n" not in text and "8 of the pairs' images are not in the store" in text
    assert "gone-0.jpg" in text and "and 3 more" in text and not (tmp_path / "x").exists()


def test_features_of_another_size_are_rescaled_with_a_note(hand_store, tmp_path):
    root, _ = hand_store
    pts = np.array([[5, 4], [50, 30], [20, 10], [54, 36]])
    pair = make_pair("same", "a.jpg", "a.jpg", pts, pts, (40, 60))
    res = eval_corr([root / "half"], pairs=[pair], out=str(tmp_path / "half"), alphas=[0.05], progress=False)
    assert any("another size" in n for n in res["notes"])
    assert scores(res, "bbox", 0.05)["per_point"] == 1.0


def test_layer_and_variant_choice_is_checked(tmp_path):
    maps = {f"{v}/{lay}": np.zeros((2, 4, 4), np.float32) for v in ("plain", "canny") for lay in ("l1", "l2")}
    store = write_store(tmp_path / "v", {"a.jpg": ((32, 32), maps)})
    assert choose_layers(store, variants=["canny"]) == ["canny/l1", "canny/l2"]
    assert choose_layers(store, ["l2"], ["plain", "canny"]) == ["plain/l2", "canny/l2"]
    with pytest.raises(UserError, match="holds the variants plain, canny"):
        choose_layers(store)
    with pytest.raises(UserError, match="no variant lora"):
        choose_layers(store, variants=["lora"])
    with pytest.raises(UserError, match="no layer l3"):
        choose_layers(store, ["l3"], ["plain"])


# ------------------------------------------------------------------------------- the correspondence world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small correspondence world and its clean `dift` features from mini and from mini-random."""
    from difffeat.data.synth_corr import synthesize_corr
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction

    root = tmp_path_factory.mktemp("corr-world")
    data = synthesize_corr(root / "world", n=30, seed=0)
    for model in ("mini", "mini-random"):
        run_extraction(ExtractRunConfig(images=f"spair:{data}", out=str(root / model), model=model, layers=["dift"],
                                        noise=False, batch_size=32), progress=False)
    return root, data


@pytest.mark.slow
def test_eval_corr_scores_mini_well_above_mini_random(world, capsys):
    root, data = world
    for model in ("mini", "mini-random"):
        assert main(["--quiet", "eval-corr", "--features", str(root / model), "--data", f"spair:{data}",
                     "--out", str(root / f"eval-{model}"), "--examples", "2" if model == "mini" else "0"]) == 0
        assert "PCK@0.1 bbox: per point" in capsys.readouterr().out
    got = {m: json.loads((root / f"eval-{m}" / "results.json").read_text()) for m in ("mini", "mini-random")}
    assert got["mini"]["pairs"] == 30 and got["mini"]["points"] == got["mini-random"]["points"] > 100
    tables = {m: read_per_pair(root / f"eval-{m}" / "per_pair.csv") for m in got}
    assert tables["mini"]["keys"] == tables["mini-random"]["keys"]
    diff = {}
    for column in ("correct@0.1_bbox", "correct@0.1_img"):
        diff[column] = paired_difference(tables["mini"]["correct"][column], tables["mini-random"]["correct"][column],
                                         tables["mini"]["points"], draws=2000)
    mini, rand = scores(got["mini"], "img"), scores(got["mini-random"], "img")
    print(f"PCK@0.1 img per point: mini {mini['per_point']:.3f} [{mini['per_point_low']:.3f}, "
          f"{mini['per_point_high']:.3f}], mini-random {rand['per_point']:.3f} [{rand['per_point_low']:.3f}, "
          f"{rand['per_point_high']:.3f}]; paired differences {diff}")
    for column, d in diff.items():  # the whole 95% interval of the paired difference above zero
        assert d["per_point"][1] > 0 and d["per_image"][1] > 0, (column, d)
    assert mini["per_point"] > 1.3 * rand["per_point"]
    assert (root / "eval-mini" / "examples.png").is_file()
    page = (root / "eval-mini" / "report.html").read_text()
    assert "data:image/png;base64" in page and "Per category" in page


@pytest.mark.slow
def test_match_command_draws_and_matches_an_image_to_itself(world, tmp_path, capsys):
    from downstream.corr.config import MatchConfig
    from downstream.corr.live import match_images

    _, data = world
    image = sorted((data / "JPEGImages").rglob("*.jpg"))[0]
    found = match_images(MatchConfig(images=[str(image), str(image)], out=str(tmp_path / "self.png"),
                                     points=["10,12", "40,33", "60,3"], noise=False), progress=False)
    assert found["matched"] == found["points"] == [[10, 12], [40, 33], [60, 3]]
    assert main(["--quiet", "match", str(image), str(sorted(image.parent.glob("*.jpg"))[1]), "--grid", "3",
                 "--out", str(tmp_path / "m.png")]) == 0
    assert "matched 9 points" in capsys.readouterr().out and (tmp_path / "m.png").is_file()
    with pytest.raises(UserError, match="exists"):
        match_images(MatchConfig(images=[str(image), str(image)], out=str(tmp_path / "m.png")))
