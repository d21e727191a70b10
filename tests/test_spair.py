"""`spair`: the SPair-71k reader against a hand-written pair annotation in SPair's exact fields, its refusals, and
the correspondence world `difffeat data synth --task corr` writes in that layout (read back, keypoints checked
against the pixels and against a similarity fitted between the two images), extraction of a split, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffeat.data.layouts import detect_layout, fitting_layouts, open_data
from difffeat.data.layouts.spair import PairSample, SpairLayout
from difffeat.data.shapes_lt import THING_COLOURS
from difffeat.data.synth_corr import CATEGORIES, KEYPOINTS, OFF_BODY, shape_mask, synthesize_corr
from difffeat.errors import UserError

STEM = "000001-2008_000585-2008_004373:aeroplane"


def spair_pair(**change) -> dict:
    """A pair annotation as SPair writes it: source 40 wide × 30 high, target 50 × 20."""
    pair = {"pair_id": 1, "src_imname": "2008_000585.jpg", "trg_imname": "2008_004373.jpg",
            "src_imsize": [40, 30, 3], "trg_imsize": [50, 20, 3],
            "src_bndbox": [2, 3, 38, 29], "trg_bndbox": [0, 1, 49, 19], "category": "aeroplane",
            "src_kps": [[3, 4], None, [39, 29], [-1, 5], [10, 10], [20.5, 7.25]],
            "trg_kps": [[1, 2], [3, 4], [49, 19], [5, 5], [50, 10], [44.75, 0]],
            "kps_ids": ["0", "7", "11", "12", "13", "20"], "mirror": 0, "viewpoint_variation": 1,
            "scale_variation": 0, "truncation": 2, "occlusion": 0}
    pair.update(change)
    return {k: v for k, v in pair.items() if v is not ...}


def spair_root(tmp_path: Path, split: str = "test", **change) -> Path:
    root = tmp_path / "SPair-71k"
    for name, (w, h) in (("2008_000585", (40, 30)), ("2008_004373", (50, 20))):
        (root / "JPEGImages" / "aeroplane").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 30, 200)).save(root / "JPEGImages" / "aeroplane" / f"{name}.jpg")
    (root / "PairAnnotation" / split).mkdir(parents=True)
    (root / "PairAnnotation" / split / f"{STEM}.json").write_text(json.dumps(spair_pair(**change)))
    return root


# ---------------------------------------------------------------------------------------------- the reader
def test_a_hand_written_pair_reads_with_spair_conventions(tmp_path):
    root = spair_root(tmp_path)
    assert detect_layout(root) == "spair"
    layout = open_data(f"spair:{root}:test")
    assert isinstance(layout, SpairLayout) and layout.splits() == ["test"]
    assert [s.key for s in layout.samples] == ["JPEGImages/aeroplane/2008_000585.jpg",
                                                "JPEGImages/aeroplane/2008_004373.jpg"]
    assert all(s.target is None and s.image == root / s.key for s in layout.samples)
    [pair] = layout.pairs()
    assert isinstance(pair, PairSample)
    assert (pair.key, pair.split, pair.category) == (STEM, "test", "aeroplane")
    assert pair.source == "JPEGImages/aeroplane/2008_000585.jpg"
    assert pair.target == "JPEGImages/aeroplane/2008_004373.jpg"
    assert pair.source_size == (30, 40) and pair.target_size == (20, 50)  # imsize is [W, H, C]
    assert pair.source_bbox == (2.0, 3.0, 38.0, 29.0) and pair.target_bbox == (0.0, 1.0, 49.0, 19.0)
    assert pair.point_ids == ("0", "7", "11", "12", "13", "20")
    # 0 both inside; 1 null in the source; 2 at (W − 1, H − 1) of both: inside; 3 negative x in the source;
    # 4 at x = W of the target: outside; 5 fractional, inside both
    assert pair.valid.tolist() == [True, False, True, False, False, True]
    assert pair.valid.dtype == bool and pair.source_points.dtype == np.float64
    nan = np.nan
    np.testing.assert_array_equal(pair.source_points,
                                  [[3, 4], [nan, nan], [39, 29], [nan, nan], [10, 10], [20.5, 7.25]])
    np.testing.assert_array_equal(pair.target_points, [[1, 2], [3, 4], [49, 19], [5, 5], [nan, nan], [44.75, 0]])
    assert layout.category(pair.source) == layout.category(pair.key) == "aeroplane"
    assert layout.categories() == ["aeroplane"] and layout.pair(STEM) is pair
    assert layout.rows[pair.source]["label"] == "aeroplane"  # what --prompt-from label reads
    assert "spair" not in fitting_layouts(np.arange(18))  # no masks: never named for a mask's values


@pytest.mark.parametrize("word, split", [("train", "trn"), ("validation", "val"), ("val", "val"), ("trn", "trn")])
def test_split_names(tmp_path, word, split):
    root = spair_root(tmp_path, split)
    layout = open_data(f"spair:{root}:{word}")
    assert layout.split == split and [p.split for p in layout.pairs()] == [split]
    assert [p.key for p in open_data(f"spair:{root}").pairs()] == [STEM]  # no split: every split


def test_missing_kps_ids_count_the_points(tmp_path):
    [pair] = open_data(f"spair:{spair_root(tmp_path, kps_ids=...)}:test").pairs()
    assert pair.point_ids == (0, 1, 2, 3, 4, 5)


@pytest.mark.parametrize("field", ["src_imname", "trg_imsize", "src_bndbox", "trg_kps", "category"])
def test_a_missing_field_is_one_line_naming_the_file_and_the_field(tmp_path, field):
    root = spair_root(tmp_path, **{field: ...})
    with pytest.raises(UserError) as e:
        _ = open_data(f"spair:{root}:test").samples
    message = str(e.value)
    assert "\n" not in message and f"{STEM}.json" in message and repr(field) in message


@pytest.mark.parametrize("change, words", [
    ({"src_imsize": [40]}, "'src_imsize' must be [W, H, C]"),
    ({"trg_bndbox": [0, 1, 2]}, "'trg_bndbox' must be [x1, y1, x2, y2]"),
    ({"src_kps": [[3, 4], "x", [1, 1], [1, 1], [1, 1], [1, 1]]}, "'src_kps': keypoint 1 must be [x, y] or null"),
    ({"trg_kps": [[1, 2]]}, "src_kps has 6 keypoints but trg_kps 1"),
    ({"kps_ids": ["0"]}, "'kps_ids' must list one id per keypoint"),
    ({"trg_imname": "missing.jpg"}, "names image JPEGImages/aeroplane/missing.jpg, but"),
    ({"src_imname": "../../../etc/passwd"}, "points outside"),
])
def test_bad_values_are_one_line(tmp_path, change, words):
    root = spair_root(tmp_path, **change)
    with pytest.raises(UserError) as e:
        _ = open_data(f"spair:{root}:test").pairs()
    assert "\n" not in str(e.value) and words in str(e.value) and STEM in str(e.value)


def test_unreadable_json_and_unknown_split(tmp_path):
    root = spair_root(tmp_path)
    (root / "PairAnnotation" / "test" / f"{STEM}.json").write_text('{"pair_id": 1,')
    with pytest.raises(UserError, match=r"unreadable pair annotation") as e:
        _ = open_data(f"spair:{root}:test").samples
    assert "\n" not in str(e.value) and f"{STEM}.json" in str(e.value)
    with pytest.raises(UserError, match="has no split 'trn'"):
        _ = open_data(f"spair:{root}:train").samples


# ------------------------------------------------------------------------------------------------ the world
N, SEED = 120, 3  # trn 96, val 12, test 12 pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthesize_corr(tmp_path_factory.mktemp("corr") / "spair", n=N, seed=SEED, sizes="mixed")


def annotation(root: Path, image_key: str) -> dict:
    _, category, name = image_key.split("/")
    return json.loads((root / "ImageAnnotation" / category / f"{Path(name).stem}.json").read_text())


def test_the_world_in_spair_layout(world):
    classes = json.loads((world / "classes.json").read_text())
    assert classes["pairs"] == {"trn": 96, "val": 12, "test": 12} and classes["names"] == list(CATEGORIES)
    assert detect_layout(world) == "spair"
    for split, count in classes["pairs"].items():
        layout = open_data(f"spair:{world}:{split}")
        pairs = layout.pairs()
        assert len(pairs) == count == len(list((world / "PairAnnotation" / split).glob("*.json")))
        assert len(layout.samples) == classes["images"][split]
        assert layout.names == list(CATEGORIES) and set(layout.categories()) <= set(CATEGORIES)
        for pair in pairs:
            raw = json.loads((world / "PairAnnotation" / split / f"{pair.key}.json").read_text())
            assert pair.key.endswith(f":{raw['category']}") and pair.key.startswith(f"{raw['pair_id']:06d}-")
            assert raw["mirror"] == 0 and all(raw[f] in (0, 1) for f in ("viewpoint_variation", "scale_variation",
                                                                          "truncation", "occlusion"))
            assert raw["kps_ids"] == [str(i) for i in range(len(KEYPOINTS[pair.category]))]
            for key, size, bbox in ((pair.source, pair.source_size, pair.source_bbox),
                                    (pair.target, pair.target_size, pair.target_bbox)):
                with Image.open(world / key) as img:
                    assert (img.height, img.width) == size  # imsize [W, H, 3] matches the file
                x1, y1, x2, y2 = bbox
                assert 0 <= x1 < x2 <= size[1] - 1 and 0 <= y1 < y2 <= size[0] - 1


def test_keypoint_pixels_show_the_object(world):
    """Every visible keypoint on a body lies on a pixel of the object's colour (nearest of the palette by hue);
    the same image has the same keypoints in every pair and in its ImageAnnotation."""
    names = list(THING_COLOURS)
    palette = np.array([THING_COLOURS[n] for n in names], float)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    seen: dict[str, list] = {}
    checked = 0
    for pair in open_data(f"spair:{world}").pairs():
        for key, points in ((pair.source, pair.source_points), (pair.target, pair.target_points)):
            note = annotation(world, key)
            listed = [np.nan * np.ones(2) if v is None else np.array(v, float) for v in note["kps"].values()]
            np.testing.assert_array_equal(points, listed)  # the pair's keypoints are the image's own
            seen.setdefault(key, []).append(points)
            pixels = np.asarray(Image.open(world / key).convert("RGB"), float)
            for i, (x, y) in enumerate(points):
                if np.isnan(x) or (pair.category, i) in OFF_BODY:
                    continue
                pixel = pixels[int(math.floor(y + 0.5)), int(math.floor(x + 0.5))]
                assert names[int(np.argmax(palette @ pixel))] == note["colour"], (pair.key, key, i)
                checked += 1
    assert checked > 500
    assert any(len(v) == 2 for v in seen.values())  # images serve in two pairs of the chain
    for points in seen.values():
        np.testing.assert_array_equal(points[0], points[-1])


def test_keypoints_correspond_by_a_similarity(world):
    """Target keypoints are the source keypoints under one similarity (the objects' scale, rotation and shift): fitted
    on the valid points, it maps them within rounding, its scale and angle are the radii's ratio and the tilts'
    difference, and a point null in one image maps to outside it or into an occluded object there."""
    fitted = 0
    for pair in open_data(f"spair:{world}").pairs():
        src, trg = annotation(world, pair.source), annotation(world, pair.target)
        v = pair.valid
        assert v.sum() >= 1 or src["truncated"] or trg["truncated"] or src["occluded"] or trg["occluded"]
        if v.sum() < 2:
            continue
        zs = pair.source_points[v] @ [1, 1j]
        zt = pair.target_points[v] @ [1, 1j]
        a, b = np.linalg.lstsq(np.stack([zs, np.ones_like(zs)], 1), zt, rcond=None)[0]
        assert np.abs(a * zs + b - zt).max() < 0.05, pair.key
        assert abs(a) == pytest.approx(trg["radius"] / src["radius"], rel=0.01)
        turn = math.degrees(np.angle(a)) - (trg["tilt"] - src["tilt"])
        assert abs((turn + 180) % 360 - 180) < 1.0
        h, w = pair.target_size
        for p in np.nonzero(~np.isnan(pair.source_points[:, 0]) & np.isnan(pair.target_points[:, 0]))[0]:
            z = a * (pair.source_points[p] @ [1, 1j]) + b
            assert not (0 <= z.real <= w - 1 and 0 <= z.imag <= h - 1) or trg["occluded"], (pair.key, p)
        fitted += 1
    assert fitted > 100
    flags = [json.loads(f.read_text()) for f in (world / "PairAnnotation").rglob("*.json")]
    for flag in ("viewpoint_variation", "scale_variation", "truncation", "occlusion"):
        assert {f[flag] for f in flags} == {0, 1}, flag  # the world varies every way SPair flags
    assert any(kp is None for f in flags for kp in f["src_kps"] + f["trg_kps"])


@pytest.mark.parametrize("cls", CATEGORIES)
def test_keypoints_sit_inside_their_shape(cls):
    """At the smallest radius and any tilt and sub-pixel position, the pixel of every keypoint on a body belongs to
    the shape (so a keypoint's pixel shows its object)."""
    from difffeat.data.synth_corr import CorrObject

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64].astype(float) + 0.5
    for _ in range(40):
        obj = CorrObject(cls, "red", 32 + rng.uniform(), 32 + rng.uniform(), 9.0 * 48 / 64,
                         rng.uniform(0, 2 * math.pi))
        mask = shape_mask(cls, obj.cx, obj.cy, obj.radius, obj.angle, xx, yy)
        for i, (x, y) in enumerate(obj.keypoints()):
            inside = mask[int(math.floor(y + 0.5)), int(math.floor(x + 0.5))]
            assert inside == ((cls, i) not in OFF_BODY), (cls, i)


def test_identical_pairs_coincide(tmp_path):
    root = synthesize_corr(tmp_path / "same", n=20, seed=1, identical=True)
    for pair in open_data(f"spair:{root}").pairs():
        assert pair.source == pair.target and pair.source_bbox == pair.target_bbox
        np.testing.assert_array_equal(pair.source_points, pair.target_points)
        assert pair.valid.sum() == (~np.isnan(pair.source_points[:, 0])).sum() >= 1


def test_the_same_arguments_give_the_same_files_and_the_folder_rules(tmp_path):
    a = synthesize_corr(tmp_path / "a", n=12, seed=2)
    b = synthesize_corr(tmp_path / "b", n=12, seed=2)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(UserError, match="holds this correspondence set already"):
        synthesize_corr(a, n=12, seed=2)
    with pytest.raises(UserError, match="another config"):
        synthesize_corr(a, n=12, seed=5)
    (a / "mine.txt").write_text("keep")
    synthesize_corr(a, n=15, seed=5, overwrite=True)
    assert (a / "mine.txt").read_text() == "keep" and len(list((a / "PairAnnotation").rglob("*.json"))) == 15
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("")
    with pytest.raises(UserError, match="never writes into a folder it did not create"):
        synthesize_corr(other, n=12)


# ---------------------------------------------------------------------------------------------- the commands
def test_extract_a_split_of_the_world(world, tmp_path):
    from difffeat import FeatureStore
    from difffeat.cli import main

    store = tmp_path / "feat"
    assert main(["--quiet", "extract", f"spair:{world}:test", "--out", str(store), "--model", "mini-random",
                 "--clean", "--layer", "down_blocks.0"]) == 0
    layout = open_data(f"spair:{world}:test")
    keys = {k for p in layout.pairs() for k in (p.source, p.target)}
    assert sorted(FeatureStore(store).keys()) == sorted(keys) == [s.key for s in layout.samples]
    data = FeatureStore(store).manifest["config"]["data"]
    assert data["layout"] == "spair" and data["split"] == "test"


def test_cli_data_synth_corr(tmp_path, capsys):
    from difffeat.cli import main

    out = tmp_path / "corr"
    assert main(["--quiet", "data", "synth", str(out), "--task", "corr", "--n", "20", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "spair layout" in printed and "20 pairs" in printed
    assert len(list((out / "PairAnnotation").rglob("*.json"))) == 20
    assert {p.parent.name for p in (out / "JPEGImages").rglob("*.jpg")} == set(CATEGORIES)
    with Image.open(next((out / "JPEGImages").rglob("*.jpg"))) as img:
        assert img.size == (64, 64)
    for flags, words in ((["--layout", "voc"], "--task corr writes the spair layout"),
                         (["--imbalance", "5"], "--imbalance is for --task seg")):
        assert main(["data", "synth", str(tmp_path / "bad"), "--task", "corr", *flags]) == 2
        assert words in capsys.readouterr().err
    assert main(["data", "synth", str(tmp_path / "bad"), "--layout", "spair"]) == 2
    assert "use --task corr" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
