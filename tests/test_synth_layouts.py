"""`difffeat data synth --layout`: the Shapes-LT world in the native layouts of real data sets.

Every layout's masks are decoded here by hand, the way a reader of the real data set would, and compared with
the world re-computed here independently (scene → resize → boundary bands); the image pixels are the same in
every layout."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffeat.data.shapes_lt import CLASS_NAMES, generate_scene, head_middle_tail, split_sizes
from difffeat.data.synth_layouts import LAYOUT_WRITERS, synthesize_layout
from difffeat.errors import UserError

N, SEED = 20, 5
SIZES = split_sizes(N)  # train 16, val 2, test 2
MIXED = [(64, 64), (48, 64), (64, 48), (72, 96), (96, 72), (60, 80)]
SQUARE = [(64, 64), (96, 96), (48, 48)]

# Typed in from the Cityscapes labels table: the labelIds the world uses, to trainIds.
CITYSCAPES_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       0: 255, 1: 255, 4: 255, 5: 255, 9: 255, 14: 255}
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_27_RAW = [71, 77, 51, 61, 83, 43, 26, 15, 9, 0, 33, 1, 101]  # smallest used raw id of coarse 0..12


def expected_mask(split: str, index: int, sizes: list[tuple[int, int]] = MIXED) -> np.ndarray:
    """The world's mask, computed independently: resize with NEAREST, then ignore bands via edge padding."""
    h, w = sizes[index % len(sizes)]
    mask = np.asarray(Image.fromarray(generate_scene(SEED, split, index).mask).resize((w, h), Image.NEAREST))
    p = np.pad(mask.astype(np.int16), 1, mode="edge")  # outside the image = the pixel itself: no difference
    centre = p[1:-1, 1:-1]
    other = (p[:-2, 1:-1] != centre) | (p[2:, 1:-1] != centre) | (p[1:-1, :-2] != centre) | (p[1:-1, 2:] != centre)
    return np.where(other, 255, mask).astype(np.uint8)


def read(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as img:
        if mode is not None:
            assert img.mode == mode, f"{path}: mode {img.mode}, not {mode}"
        return np.asarray(img).copy()


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Every layout written once (ddpm-seg twice: its default square sizes, and mixed for the pixel checks)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {name: synthesize_layout(root / name, name, n=N, seed=SEED, sizes="mixed") for name in LAYOUT_WRITERS}
    out["ddpm-seg-square"] = synthesize_layout(root / "ddpm-square", "ddpm-seg", n=N, seed=SEED)
    return out


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- each layout: its tree and its encoding
# A decoder per layout: (split, index) → (mask as world ids, image pixels), read as for the real data set.
def decode_shapes(root, split, i):
    return read(root / split / "masks" / f"{i:06d}.png", "L"), rgb(root / split / "images" / f"{i:06d}.png")


def decode_ade(root, split, i):
    folder, stem = {"train": ("training", "ADE_train"), "val": ("validation", "ADE_val")}[split]
    raw = read(root / "annotations" / folder / f"{stem}_{i + 1:08d}.png", "L").astype(np.int16)
    return np.where(raw == 0, 255, raw - 1).astype(np.uint8), rgb(root / "images" / folder / f"{stem}_{i + 1:08d}.jpg")


def _cityscapes_stem(root, split, i):
    found = sorted((root / "leftImg8bit" / split).glob(f"*/*_000000_{i:06d}_leftImg8bit.png"))
    assert len(found) == 1, found
    return found[0].parent.name, found[0].name[: -len("_leftImg8bit.png")]


def decode_cityscapes(root, split, i):
    city, stem = _cityscapes_stem(root, split, i)
    ids = read(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", "L")
    assert set(np.unique(ids).tolist()) <= set(CITYSCAPES_TO_TRAIN), np.unique(ids)
    mask = np.vectorize(CITYSCAPES_TO_TRAIN.get)(ids).astype(np.uint8)
    return mask, rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")


def _voc_stem(split, i):
    offset = {"train": 0, "val": SIZES["train"], "test": SIZES["train"] + SIZES["val"]}[split]
    return f"2012_{offset + i + 1:06d}"


def decode_voc(root, split, i):
    stem = _voc_stem(split, i)
    return read(root / "SegmentationClass" / f"{stem}.png", "P"), rgb(root / "JPEGImages" / f"{stem}.jpg")


def _coco(raw_of_class):
    def decode(root, split, i):
        offset = {"train": 0, "val": SIZES["train"]}[split]
        folder, stem = {"train": "train2017", "val": "val2017"}[split], f"{offset + i + 1:012d}"
        raw = read(root / "annotations" / folder / f"{stem}.png", "L")
        back = {r: c for c, r in enumerate(raw_of_class)}
        back[255] = 255
        assert set(np.unique(raw).tolist()) <= set(back), np.unique(raw)
        return np.vectorize(back.get)(raw).astype(np.uint8), rgb(root / "images" / folder / f"{stem}.jpg")

    return decode


def decode_ddpm(root, split, i):
    folder = root / "real" / {"train": "train", "val": "test"}[split]
    labels = np.load(folder / f"{i:06d}.npy")
    assert labels.dtype == np.uint8 and labels.ndim == 2
    return labels, rgb(folder / f"{i:06d}.png")


def _hf_rows(root: Path, layout: str) -> dict:
    import datasets

    if layout == "hf-disk":
        return datasets.load_from_disk(str(root))
    return datasets.load_dataset(str(root), cache_dir=str(root.parent / ".hf-cache"))  # as a local HF data set


_HF_CACHE: dict = {}


def decode_hf(layout):
    def decode(root, split, i):
        if root not in _HF_CACHE:
            _HF_CACHE[root] = _hf_rows(root, layout)
        row = _HF_CACHE[root][{"train": "train", "val": "validation", "test": "test"}[split]][i]
        raw = np.asarray(row["annotation"]).astype(np.int16)
        assert row["scene_category"] == 0
        return np.where(raw == 0, 255, raw - 1).astype(np.uint8), np.asarray(row["image"].convert("RGB"))

    return decode


USED = [r for r in range(182) if r not in COCO_UNUSED]
DECODERS = {
    "shapes-lt": (decode_shapes, ("train", "val", "test")),
    "ade20k": (decode_ade, ("train", "val")),
    "cityscapes": (decode_cityscapes, ("train", "val", "test")),
    "voc": (decode_voc, ("train", "val", "test")),
    "coco-stuff": (_coco(USED[:13]), ("train", "val")),
    "coco-stuff-27": (_coco(COCO_27_RAW), ("train", "val")),
    "ddpm-seg": (decode_ddpm, ("train", "val")),
    "hf": (decode_hf("hf"), ("train", "val", "test")),
    "hf-disk": (decode_hf("hf-disk"), ("train", "val", "test")),
}


def test_every_registered_layout_is_checked_here():
    assert set(DECODERS) == set(LAYOUT_WRITERS)


@pytest.mark.parametrize("layout", list(DECODERS))
def test_masks_decode_to_the_world_and_pixels_are_the_same_everywhere(sets, layout):
    decode, splits = DECODERS[layout]
    for split in splits:
        for i in range(SIZES[split]):
            mask, image = decode(sets[layout], split, i)
            want = expected_mask(split, i)
            assert mask.shape == want.shape == MIXED[i % len(MIXED)]
            np.testing.assert_array_equal(mask, want, err_msg=f"{layout} {split} {i}")
            # The same pixels as the .jpg of the VOC set (the JPEG bytes every .jpg layout writes).
            np.testing.assert_array_equal(image, rgb(sets["voc"] / "JPEGImages" / f"{_voc_stem(split, i)}.jpg"),
                                          err_msg=f"{layout} {split} {i}")


def test_the_world_has_boundaries_and_every_class():
    masks = [expected_mask("train", i) for i in range(SIZES["train"])]
    values = set(np.unique(np.concatenate([m.ravel() for m in masks])).tolist())
    assert 255 in values and 0 in values and len(values) >= 6


def test_jpeg_layouts_write_the_same_bytes(sets):
    for i in range(SIZES["train"]):
        voc = (sets["voc"] / "JPEGImages" / f"{_voc_stem('train', i)}.jpg").read_bytes()
        assert voc[:2] == b"\xff\xd8"
        assert (sets["ade20k"] / "images" / "training" / f"ADE_train_{i + 1:08d}.jpg").read_bytes() == voc
        assert (sets["coco-stuff"] / "images" / "train2017" / f"{i + 1:012d}.jpg").read_bytes() == voc


def test_trees(sets):
    n_tr, n_va, n_te = SIZES["train"], SIZES["val"], SIZES["test"]
    ade = files(sets["ade20k"])
    assert ade[0] == "annotations/training/ADE_train_00000001.png"
    assert "images/validation/ADE_val_00000002.jpg" in ade and len(ade) == 2 * (n_tr + n_va) + 1

    city = files(sets["cityscapes"])
    cities = {p.split("/")[2] for p in city if p.startswith("leftImg8bit/train/")}
    assert cities == {"aachen", "bochum"}
    assert {p.split("/")[2] for p in city if p.startswith("gtFine/val/")} == {"frankfurt"}
    assert {p.split("/")[2] for p in city if p.startswith("gtFine/test/")} == {"berlin"}
    assert "gtFine/train/aachen/aachen_000000_000000_gtFine_color.png" in city
    assert len([p for p in city if p.endswith("_gtFine_labelIds.png")]) == N
    colour = read(sets["cityscapes"] / "gtFine/train/aachen/aachen_000000_000000_gtFine_color.png", "RGB")
    assert colour.ndim == 3

    voc = sets["voc"] / "ImageSets" / "Segmentation"
    lists = {name: (voc / f"{name}.txt").read_text().split() for name in ("train", "val", "trainval", "test")}
    assert lists["train"] == [_voc_stem("train", i) for i in range(n_tr)]
    assert lists["trainval"] == lists["train"] + lists["val"] and len(lists["test"]) == n_te
    with Image.open(sets["voc"] / "SegmentationClass" / f"{lists['val'][0]}.png") as img:
        assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]

    for name in ("coco-stuff", "coco-stuff-27"):
        coco = files(sets[name])
        assert "images/val2017/000000000017.jpg" in coco and not any("test" in p for p in coco)
    assert files(sets["ddpm-seg"])[:2] == ["classes.json", "real/test/000000.npy"]
    assert not (sets["ddpm-seg"] / "real" / "val").exists()
    assert files(sets["hf"]) == ["classes.json", "data/test-00000-of-00001.parquet",
                                 "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet"]
    assert {"dataset_dict.json", "train/state.json"} <= set(files(sets["hf-disk"]))

    shapes = sets["shapes-lt"]
    rows = list(csv.DictReader(open(shapes / "train" / "metadata.csv")))
    assert [r["file_name"] for r in rows] == [f"images/{i:06d}.png" for i in range(n_tr)]
    scene = generate_scene(SEED, "train", 3)
    assert rows[3]["label"] == scene.label
    assert (shapes / "train" / "images" / "000003.txt").read_text() == scene.fine_caption + "\n"


def test_file_names_sort_in_scene_order(sets):
    """Within a split, sorting the full relative paths gives scene order (cities in blocks, numbers padded)."""
    city = [p for p in files(sets["cityscapes"]) if p.startswith("leftImg8bit/train/")]
    assert [int(p.split("_")[-2]) for p in city] == list(range(SIZES["train"]))
    for name, prefix in (("ade20k", "images/training/"), ("coco-stuff", "images/train2017/"),
                         ("voc", "JPEGImages/"), ("ddpm-seg", "real/train/"), ("shapes-lt", "train/images/")):
        listed = [p for p in files(sets[name]) if p.startswith(prefix) and p.endswith((".jpg", ".png"))]
        assert len(listed) == (SIZES["train"] if name != "voc" else N)
        assert listed == sorted(listed, key=lambda p: int("".join(ch for ch in p.rsplit("/", 1)[1] if ch.isdigit())))


def test_cityscapes_ignore_pixels_use_several_ignore_ids(sets):
    used = set()
    for p in (sets["cityscapes"] / "gtFine" / "train").rglob("*_labelIds.png"):
        used |= set(np.unique(read(p)).tolist())
    assert {0, 1, 4, 5, 9, 14} <= used and 7 in used  # road = trainId 0 = background


def test_ddpm_default_sizes_are_square(sets):
    root = sets["ddpm-seg-square"]
    for i in range(SIZES["train"]):
        labels = np.load(root / "real" / "train" / f"{i:06d}.npy")
        assert labels.shape == SQUARE[i % 3] == rgb(root / "real" / "train" / f"{i:06d}.png").shape[:2]
        np.testing.assert_array_equal(labels, expected_mask("train", i, SQUARE))
    assert json.loads((root / "classes.json").read_text())["world"]["sizes"] == "square"


def test_classes_json(sets):
    masks = [expected_mask("train", i) for i in range(SIZES["train"])]
    counts = np.bincount(np.concatenate([m.ravel() for m in masks]), minlength=256)[:13].tolist()
    tables = {name: json.loads((root / "classes.json").read_text()) for name, root in sets.items()}
    for name, t in tables.items():
        assert t["names"] == list(CLASS_NAMES) and t["ignore_index"] == 255
        assert t["train_pixel_counts"] == (counts if name != "ddpm-seg-square" else t["train_pixel_counts"])
        assert t["groups"] == head_middle_tail(list(CLASS_NAMES), t["train_pixel_counts"])
        assert t["layout"] == t["config"]["layout"]
        assert t["world"] == {"n": N, "seed": SEED, "imbalance": 100.0, "sizes": t["world"]["sizes"]}
    assert tables["voc"]["layout"] == "voc" and tables["voc"]["world"]["sizes"] == "mixed"
    assert sum(tables["voc"]["train_image_label_counts"]) == SIZES["train"]


def test_overwrite_replaces_only_what_synth_wrote(tmp_path):
    out = tmp_path / "set"
    synthesize_layout(out, "voc", n=6, seed=1)
    with pytest.raises(UserError, match="already"):
        synthesize_layout(out, "voc", n=6, seed=1)
    with pytest.raises(UserError, match="another config"):
        synthesize_layout(out, "ade20k", n=6, seed=1)
    (out / "notes.txt").write_text("mine")
    synthesize_layout(out, "ade20k", n=6, seed=2, overwrite=True)  # the VOC tree goes, the user's file stays
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "classes.json", "images", "notes.txt"]
    assert json.loads((out / "classes.json").read_text())["world"]["seed"] == 2
    synthesize_layout(out, "ade20k", n=6, seed=2, overwrite=True)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary folder left

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a difffeat"):
            synthesize_layout(foreign, "voc", n=6, overwrite=overwrite)
    with pytest.raises(UserError, match="--layout must be one of"):
        synthesize_layout(tmp_path / "bad", "kitti", n=6)
    with pytest.raises(UserError, match="--sizes"):
        synthesize_layout(tmp_path / "bad", "voc", n=6, sizes="huge")


def test_the_same_arguments_give_the_same_files(tmp_path):
    a = synthesize_layout(tmp_path / "a", "cityscapes", n=5, seed=4)
    b = synthesize_layout(tmp_path / "b", "cityscapes", n=5, seed=4)
    assert files(a) == files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files(a))


def test_cli(tmp_path):
    out = tmp_path / "voc"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "difffeat", "--quiet", "data", "synth", str(out), "--n", "8",
                           "--seed", "2", "--layout", "voc"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "voc layout" in proc.stdout
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 8


def test_cli_sizes_need_a_layout(tmp_path, capsys):
    from difffeat.cli import main

    assert main(["data", "synth", str(tmp_path / "x"), "--n", "8", "--sizes", "square"]) == 2
    assert "--sizes needs --layout" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
