"""Segmentation data: masks matched to stored features by key, classes, and the bad-input rules."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStoreWriter
from downstream.groups import head_middle_tail
from downstream.seg.classes import SegClasses, load_classes
from downstream.seg.data import SegDataset
from downstream.seg.masks import MaskFinder

K = 5


def write_store(path, keys, images=None, resolution=(16, 16), layers=(("a", (4, 4, 4)),), resize="stretch"):
    """A store whose features encode their key: feature[0, 0, 0] = index of the key, so pairing is checkable."""
    config = {"model": "test", "layers": [n for n, _ in layers], "resolution": list(resolution), "resize": resize,
              "images": str(images) if images else None}
    with FeatureStoreWriter(path, config) as w:
        for i, key in enumerate(keys):
            feats = {}
            for name, shape in layers:
                x = np.random.default_rng(i).normal(size=shape).astype(np.float32)
                x[0, 0, 0] = i
                feats[name] = x
            w.add(key, feats)
    return path


def write_mask(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), "L").save(path)


@pytest.fixture
def tree(tmp_path):
    """A Shapes-LT-like root: train/ and val/ with the same image names, metadata.csv per split."""
    root = tmp_path / "data"
    masks = {}
    for s, split in enumerate(("train", "val")):
        rows = ["file_name,mask_file_name,label"]
        for i in range(3):
            m = np.full((16, 16), (i + s) % K, np.uint8)
            m[:2] = 255
            write_mask(root / split / "masks" / f"{i:06d}.png", m)
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            rows.append(f"images/{i:06d}.png,masks/{i:06d}.png,x")
            masks[f"{split}/images/{i:06d}.png"] = m
        (root / split / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.json").write_text(json.dumps({"names": list("abcde"), "ignore_index": 255,
                                                   "train_pixel_counts": [50, 40, 30, 20, 10],
                                                   "groups": {"head": ["a", "b"], "middle": ["c"],
                                                              "tail": ["d", "e"]}}))
    return root, masks


def test_masks_are_paired_with_features_by_key_and_split(tree, tmp_path):
    root, masks = tree
    keys = sorted(masks)
    store = write_store(tmp_path / "s", keys, images=root)
    classes = load_classes(root / "classes.json")
    ds = SegDataset([store], root, classes, split="train")
    assert ds.keys == [k for k in keys if k.startswith("train/")]
    for i, key in enumerate(ds.keys):
        item = ds[i]
        assert torch.equal(item["mask"], torch.from_numpy(masks[key].astype(np.int64)))
        assert item["features"][0][0, 0, 0] == keys.index(key)  # the features of that very key
    assert ds.report["missing_masks"] == [] and ds.mask_size == (16, 16)
    assert ds.pixel_counts.tolist() == [14 * 16, 14 * 16, 14 * 16, 0, 0]  # two ignore rows per mask


def test_keys_relative_to_a_split_folder_find_that_splits_masks(tree, tmp_path):
    root, masks = tree
    # Extracted from data/val/images: keys "000000.png"; the manifest's image folder disambiguates the split.
    store = write_store(tmp_path / "s", ["000000.png", "000001.png"], images=root / "val" / "images")
    ds = SegDataset([store], root, load_classes(root / "classes.json"))
    assert torch.equal(ds[1]["mask"], torch.from_numpy(masks["val/images/000001.png"].astype(np.int64)))
    finder = MaskFinder(root)  # without it, "images/000000.png" matches two splits: no unique answer
    assert finder.find("train/images/000002.png") == root / "train" / "masks" / "000002.png"


def test_plain_mask_folder_by_stem(tmp_path):
    write_mask(tmp_path / "m" / "x1.png", np.full((8, 8), 2))
    store = write_store(tmp_path / "s", ["x1.jpg"], resolution=(8, 8))
    ds = SegDataset([store], tmp_path / "m", SegClasses(list("abc")))
    assert ds[0]["mask"].unique().tolist() == [2]


def test_mask_of_another_size_is_resized_nearest_or_refused(tree, tmp_path):
    root, masks = tree
    store = write_store(tmp_path / "s", ["train/images/000000.png"], images=root, resolution=(8, 8))
    classes = load_classes(root / "classes.json")
    ds = SegDataset([store], root, classes, mask_size="resize")
    expected = np.asarray(Image.fromarray(masks["train/images/000000.png"]).resize((8, 8), Image.NEAREST))
    assert torch.equal(ds[0]["mask"], torch.from_numpy(expected.astype(np.int64)))
    assert ds.report["resized_masks"] == 1
    with pytest.raises(UserError, match=r"000000\.png: mask is 16×16 but the features come from 8×8"):
        SegDataset([store], root, classes, mask_size="refuse")


def test_label_value_out_of_range_names_file_and_value(tree, tmp_path):
    root, _ = tree
    bad = np.zeros((16, 16), np.uint8)
    bad[3, 4] = 7
    write_mask(root / "train" / "masks" / "000001.png", bad)
    store = write_store(tmp_path / "s", ["train/images/000001.png"], images=root)
    with pytest.raises(UserError, match=r"train/masks/000001\.png: label value 7 is not a class id \(0\.\.4\)"):
        SegDataset([store], root, load_classes(root / "classes.json"))


def test_keys_without_masks_are_reported(tree, tmp_path):
    root, _ = tree
    keys = ["train/images/000000.png", "train/images/000099.png"]
    store = write_store(tmp_path / "s", keys, images=root)
    with pytest.warns(UserWarning, match=r"1 without a mask \(first: train/images/000099\.png\)"):
        ds = SegDataset([store], root, load_classes(root / "classes.json"))
    assert ds.keys == keys[:1] and ds.report["missing_masks"] == keys[1:]
    lonely = write_store(tmp_path / "t", ["nowhere/1.png"], images=root)
    with pytest.raises(UserError, match="no masks found"):
        SegDataset([lonely], root, load_classes(root / "classes.json"))


def test_several_stores_give_variant_maps_and_report_keys_missing_in_one(tree, tmp_path):
    root, masks = tree
    keys = sorted(k for k in masks if k.startswith("train/"))
    a = write_store(tmp_path / "a", keys, images=root, layers=(("x", (4, 4, 4)), ("y", (2, 8, 8))))
    b = write_store(tmp_path / "b", keys[:2], images=root, layers=(("x", (4, 4, 4)),))
    with pytest.warns(UserWarning, match="not in every feature store"):
        ds = SegDataset([a, b], root, load_classes(root / "classes.json"), layers=None)
    assert [(s.variant, s.layer, s.shape) for s in ds.specs] == [(0, "x", (4, 4, 4)), (0, "y", (2, 8, 8)),
                                                                 (1, "x", (4, 4, 4))]
    assert ds.report["missing_features"] == keys[2:]
    assert [f.shape for f in ds[0]["features"]] == [(4, 4, 4), (2, 8, 8), (4, 4, 4)]


def test_classes_from_files_lists_and_counts(tmp_path):
    assert load_classes("cat,dog,bird").names == ["cat", "dog", "bird"]
    assert load_classes(["a", "b"]).num_classes == 2
    (tmp_path / "names.txt").write_text("x\ny\n\n")
    assert load_classes(tmp_path / "names.txt").names == ["x", "y"]
    (tmp_path / "c.json").write_text(json.dumps({"names": ["a", "b", "c"], "groups": {"tail": [2]}}))
    assert load_classes(tmp_path / "c.json").tail_ids() == [2]
    grouped = SegClasses(list("abcdefg")).with_counts([70, 60, 50, 40, 30, 20, 10])
    assert grouped.groups == {"head": ["a", "b", "c"], "middle": ["d"], "tail": ["e", "f", "g"]}
    assert head_middle_tail(list("abc"), [1, 3, 2]) == {"head": ["b"], "middle": ["c"], "tail": ["a"]}
    with pytest.raises(UserError, match="no such classes file"):
        load_classes(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"names": ["a"], "groups": {"tail": ["zzz"]}}))
    with pytest.raises(UserError, match="unknown classes"):
        load_classes(tmp_path / "bad.json")
