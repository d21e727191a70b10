"""Real data sets in their native layouts: raw mask values read to the train ids a hand-written table gives, bad input
as one line, the same chain on every layout of one world giving the same numbers, and scoring at the original
resolution equal to an independent computation (mmsegmentation's rule)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difffeat.data.layouts import detect_layout, open_data
from difffeat.errors import UserError

# ------------------------------------------------------------------------------------------- hand-written tables
# Cityscapes labels.py: labelId → trainId for the 19 evaluated classes; every other id 0…33 is ignored.
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
# STEGO's fine_to_coarse for the thing ids (ranges of raw ids → coarse class)
COCO_THINGS_27 = [((0, 0), 9), ((1, 8), 11), ((9, 14), 8), ((15, 24), 7), ((25, 32), 6), ((33, 42), 10),
                  ((43, 50), 5), ((51, 60), 2), ((61, 70), 3), ((71, 76), 0), ((77, 82), 1), ((83, 90), 4)]


def _png(path, array, mode="L", palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array, np.uint8), "L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette(palette)
    img.save(path)


def _jpg(path, shape):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), 128, np.uint8)).save(path)


def _grid(values):
    """The values laid out as an [n, 1] image (one pixel each)."""
    return np.asarray(values, np.uint8).reshape(-1, 1)


def test_ade20k_raw_ids_reduce_zero_label(tmp_path):
    raw = list(range(151)) + [255]
    _jpg(tmp_path / "images/training/ADE_train_1.jpg", (len(raw), 1))
    _png(tmp_path / "annotations/training/ADE_train_1.png", _grid(raw))
    layout = open_data(f"ade20k:{tmp_path}:train")
    assert detect_layout(tmp_path) == "ade20k" and len(layout.names) == 150
    (sample,) = layout.samples
    want = [255] + list(range(150)) + [255]  # 0 = other → ignore, k → k − 1, 255 stays ignore
    assert layout.target(sample).ravel().tolist() == want


@pytest.mark.parametrize("name", ["ade20k", "coco-stuff"])
def test_a_link_cycle_in_a_native_layout_lists_each_image_once(tmp_path, name):
    """Linked folders are followed, each real folder once: a link back to a parent made every image a sample 41
    times (until the system's link limit), each under a longer key."""
    split = {"ade20k": "training", "coco-stuff": "train2017"}[name]
    _jpg(tmp_path / f"images/{split}/sub/a.jpg", (4, 4))
    _png(tmp_path / f"annotations/{split}/sub/a.png", np.zeros((4, 4)))
    (tmp_path / f"images/{split}/sub/back").symlink_to(tmp_path / f"images/{split}", target_is_directory=True)
    layout = open_data(f"{name}:{tmp_path}:train")
    assert [s.key for s in layout.samples] == [f"images/{split}/sub/a.jpg"]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    raw = list(range(34))
    stem = "aachen_000000_000001"
    image = _mk(tmp_path / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png")
    Image.fromarray(np.zeros((34, 1, 3), np.uint8)).save(image)
    _png(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png", _grid(raw))
    _png(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_color.png", _grid(raw))  # not a mask the reader reads
    layout = open_data(f"cityscapes:{tmp_path}:train")
    (sample,) = layout.samples
    assert sample.key == f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png"
    assert layout.target(sample).ravel().tolist() == [CITYSCAPES_TRAIN_ID.get(i, 255) for i in raw]
    # labelIds read as labelTrainIds: one line naming the file, the value, and the layout that fits
    _png(tmp_path / f"gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png", _grid(raw))
    trainids = open_data(f"cityscapes-trainids:{tmp_path}:train")
    with pytest.raises(UserError, match=r"labelTrainIds\.png: label value 19 is not defined in layout "
                                        r"cityscapes-trainids.*would fit layout .*cityscapes"):
        trainids.target(trainids.samples[0])


def _mk(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_voc_palette_masks_read_as_indices(tmp_path):
    from difffeat.data.label_maps import voc_palette

    raw = list(range(21)) + [255]
    for stem in ("2007_000001", "2007_000002"):
        _jpg(tmp_path / f"JPEGImages/{stem}.jpg", (len(raw), 1))
        _png(tmp_path / f"SegmentationClass/{stem}.png", _grid(raw), "P", voc_palette())
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n")
    (tmp_path / "ImageSets/Segmentation/trainval.txt").write_text("2007_000001\n2007_000002\n")
    layout = open_data(f"voc:{tmp_path}:train")
    assert [s.key for s in layout.samples] == ["JPEGImages/2007_000001.jpg"]
    assert layout.target(layout.samples[0]).ravel().tolist() == raw  # indices, 255 = boundary kept as ignore
    assert len(open_data(f"voc:{tmp_path}").samples) == 2  # every list, each image once
    # a palette index without a class
    _png(tmp_path / "SegmentationClass/2007_000002.png", _grid([0, 21]), "P", voc_palette())
    with pytest.raises(UserError, match=r"2007_000002\.png: label value 21 is not defined in layout voc"):
        layout.target(open_data(f"voc:{tmp_path}:trainval").samples[1])
    # a split list naming a missing image
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_999999\n")
    with pytest.raises(UserError, match=r"val\.txt: line 2 names '2007_999999'"):
        _ = open_data(f"voc:{tmp_path}:val").samples


def test_coco_stuff_raw_ids_to_171_and_27(tmp_path):
    raw = list(range(182)) + [255]
    used = [r for r in raw if r not in COCO_UNUSED]
    _jpg(tmp_path / "images/train2017/000000000001.jpg", (len(used), 1))
    _png(tmp_path / "annotations/train2017/000000000001.png", _grid(used))
    fine = open_data(f"coco-stuff:{tmp_path}:train")
    want = [255 if r == 255 else sorted(set(range(182)) - COCO_UNUSED).index(r) for r in used]
    assert fine.target(fine.samples[0]).ravel().tolist() == want
    coarse = open_data(f"coco-stuff-27:{tmp_path}:train").target(fine.samples[0]).ravel().tolist()
    for (lo, hi), c in COCO_THINGS_27:
        assert all(coarse[used.index(r)] == c for r in range(lo, hi + 1) if r in used)
    assert coarse[used.index(91)] == 17 and coarse[used.index(181)] == 24 and coarse[-1] == 255  # stuff, unlabeled
    _png(tmp_path / "annotations/train2017/000000000001.png", _grid([0, 11]))  # an id COCO never uses
    with pytest.raises(UserError, match="label value 11 is not defined in layout coco-stuff"):
        fine.target(fine.samples[0])


def test_ddpm_seg_npy_masks(tmp_path):
    for name, want in (("horse_21", lambda v: v), ("bedroom_28", lambda v: 255 if v in (0, 255) else v - 1)):
        root = tmp_path / name
        values = np.array([[0, 1, 2], [5, 20, 255]], np.int64)
        _jpg(root / "real/train/a.png", (2, 3))
        np.save(root / "real/train/a.npy", values)
        layout = open_data(f"ddpm-seg:{root}:train")
        assert detect_layout(root) == "ddpm-seg"
        assert layout.target(layout.samples[0]).tolist() == [[want(v) for v in row] for row in values.tolist()]
    assert len(open_data(f"ddpm-seg:{tmp_path / 'bedroom_28'}").names) == 28  # background not a class
    root = tmp_path / "horse_21"
    layout = open_data(f"ddpm-seg:{root}:train")
    np.save(root / "real/train/a.npy", np.zeros((2, 3, 1), np.int64))
    with pytest.raises(UserError, match=r"a\.npy: mask has shape \(2, 3, 1\); expected \[H, W\]"):
        layout.target(layout.samples[0])
    np.save(root / "real/train/a.npy", np.full((2, 3), 0.5))
    with pytest.raises(UserError, match=r"a\.npy: mask has dtype float64; expected integer class ids"):
        open_data(f"ddpm-seg:{root}").target(layout.samples[0])


def test_an_unreduced_ade_mask_read_as_shapes_lt_names_the_fitting_layout(tmp_path):
    from difffeat.data.synth_layouts import synthesize_layout

    root = synthesize_layout(tmp_path / "s", "shapes-lt", n=6, seed=1)
    layout = open_data(f"shapes-lt:{root}:train")
    sample = layout.samples[0]
    _png(sample.target, np.array([[0, 150], [3, 255]]))
    with pytest.raises(UserError, match=r"000000\.png: label value 150 is not defined in layout shapes-lt.*ade20k"):
        layout.target(sample)


def test_hf_local_dataset_without_an_annotation_column(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))]}, features=datasets.Features(
        {"image": datasets.Image()}))
    ds.to_parquet(str(_mk(tmp_path / "data" / "train-00000-of-00001.parquet")))
    layout = open_data(f"hf:{tmp_path}:train")
    with pytest.raises(UserError, match="has no annotation column"):
        _ = layout.samples


# ------------------------------------------------------------------- the same chain on every layout of one world
LAYOUTS = ["shapes-lt", "ade20k", "cityscapes", "voc", "coco-stuff", "coco-stuff-27", "ddpm-seg", "hf/ade20k",
           "hf-disk"]


@pytest.fixture(scope="module")
def chains(tmp_path_factory, mini_pipe):
    """Per layout: synth (mixed sizes; ddpm-seg square) → extract train and val (clean) → train-seg → eval-seg."""
    from difffeat.data.synth_layouts import synthesize_layout
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.evaluate import eval_seg
    from downstream.seg.train import train_seg

    base = tmp_path_factory.mktemp("layouts")
    out = {}
    for name in LAYOUTS + ["shapes-lt-square"]:
        writer = {"hf/ade20k": "hf", "shapes-lt-square": "shapes-lt"}.get(name, name)
        sizes = "square" if name in ("ddpm-seg", "shapes-lt-square") else "mixed"
        folder = base / name.replace("/", "-") / ("horse_21" if name == "ddpm-seg" else "root")
        root = synthesize_layout(folder, writer, n=20, seed=4, sizes=sizes)
        layout = {"shapes-lt-square": "shapes-lt", "hf-disk": "hf/ade20k"}.get(name, name)
        stores = {}
        for split in ("train", "val"):
            store = folder.parent / f"feat-{split}"
            run_extraction(ExtractRunConfig(images=f"{layout}:{root}:{split}", out=str(store), model="mini",
                                            layers=["up_blocks.1"], noise=False), progress=False, pipe=mini_pipe)
            stores[split] = str(store)
        run = train_seg(SegTrainConfig.from_dict(dict(features=[stores["train"]], out=str(folder.parent / "run"),
                                                      iterations=4, batch_size=4, hidden=16)), progress=False)
        scores = eval_seg(run, [stores["val"]], progress=False)
        out[name] = (scores, stores, Path(scores["out"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "shapes-lt"])
def test_every_layout_scores_like_the_shapes_lt_layout(chains, name):
    reference = chains["shapes-lt-square" if name == "ddpm-seg" else "shapes-lt"][0]
    scores = chains[name][0]
    for key in ("miou", "mean_accuracy", "pixel_accuracy", "pixels", "miou_head", "miou_tail"):
        assert scores[key] == pytest.approx(reference[key], abs=1e-9), key
    matrix = json.loads((chains[name][2] / "metrics.json").read_text())["confusion_matrix"]
    assert matrix == json.loads((chains["shapes-lt-square" if name == "ddpm-seg" else "shapes-lt"][2] /
                                 "metrics.json").read_text())["confusion_matrix"]
    assert scores["per_class_iou"] == reference["per_class_iou"]
    assert scores["images"] == reference["images"] > 0 and scores["uncovered_pixels"] == reference["uncovered_pixels"]


@pytest.mark.slow
def test_the_store_records_its_data_set_and_each_placement(chains):
    from difffeat import FeatureStore

    store = FeatureStore(chains["ade20k"][1]["val"])
    data = store.manifest["config"]["data"]
    assert data["layout"] == "ade20k" and data["split"] == "validation"
    sizes = {store.placement(k).size for k in store.keys()}
    assert len(sizes) > 1 and all(store.placement(k).frame == (64, 64) for k in store.keys())


# ---------------------------------------------------------------------------- scoring at the original resolution
def _confusion_scores(preds, masks, k):
    m = np.zeros((k, k), np.int64)
    for p, t in zip(preds, masks):
        ok = t != 255
        m += np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)
    tp, true, pred = np.diag(m).astype(float), m.sum(1), m.sum(0)
    union = true + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = tp / union, tp / true
    return {"miou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc), "pixel_accuracy": tp.sum() / m.sum()}


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_original_resolution_scores_equal_an_independent_computation(tmp_path, mini_pipe, resize):
    """Images of 500×375, 375×500, 640×480 (ADE layout): eval-seg's mIoU / mAcc / aAcc at each mask's own size equal
    logits resized by hand (padding stripped as PIL placed it) and a numpy confusion; the extraction-size score
    differs."""
    from difffeat.data.shapes_lt import generate_scene
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction
    from downstream.seg.config import SegTrainConfig
    from downstream.seg.evaluate import eval_seg, load_run
    from downstream.seg.train import train_seg

    root = tmp_path / "ade"
    sizes = [(375, 500), (500, 375), (480, 640)]
    for split, folder, n in (("train", "training", 6), ("val", "validation", 6)):
        for i in range(n):
            scene = generate_scene(7, split, i)
            h, w = sizes[i % 3]
            stem = f"ADE_{split}_{i:08d}"
            Image.fromarray(scene.image).resize((w, h), Image.BICUBIC).save(_mk(root / f"images/{folder}/{stem}.png"))
            _png(root / f"annotations/{folder}/{stem}.png",
                 np.asarray(Image.fromarray(scene.mask + 1).resize((w, h), Image.NEAREST)))
    (root / "classes.json").write_text(json.dumps({"names": ["background", "stripes", "speckles", "gradient",
                                                             "circle", "square", "triangle", "star", "ring", "cross",
                                                             "diamond", "hexagon", "crescent"]}))
    stores = {}
    for split in ("train", "val"):
        stores[split] = str(tmp_path / f"feat-{split}")
        run_extraction(ExtractRunConfig(images=f"ade20k:{root}:{split}", out=stores[split], model="mini",
                                        layers=["up_blocks.1"], noise=False, resize=resize), progress=False,
                       pipe=mini_pipe)
    run = train_seg(SegTrainConfig.from_dict(dict(features=[stores["train"]], out=str(tmp_path / "run"), iterations=8,
                                                  batch_size=4, hidden=16)), progress=False)
    scores = eval_seg(run, [stores["val"]], progress=False)
    frame = eval_seg(run, [stores["val"]], progress=False, resolution="frame", out=str(tmp_path / "frame"))

    from difffeat import FeatureStore

    _, model, _ = load_run(run)
    store = FeatureStore(stores["val"])
    preds, masks = [], []
    for key in store.keys():
        feats = [torch.from_numpy(np.asarray(store[key]["up_blocks.1"], np.float32))[None]]
        logits = F.interpolate(model(feats)[0], size=(64, 64), mode="bilinear", align_corners=False)
        mask = np.asarray(Image.open(root / key.replace("images/", "annotations/")), np.int64)
        h, w = mask.shape
        if resize == "pad":  # PIL's ImageOps.pad: scaled to fit 64, pasted centred (rounded)
            if w >= h:
                rh = round(h / w * 64)
                logits = logits[..., round((64 - rh) / 2) : round((64 - rh) / 2) + rh, :]
            else:
                rw = round(w / h * 64)
                logits = logits[..., round((64 - rw) / 2) : round((64 - rw) / 2) + rw]
        pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        preds.append(pred)
        masks.append(np.where(mask == 0, 255, mask - 1))
    want = _confusion_scores(preds, masks, 13)
    for key, value in want.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
    assert scores["pixels"] == sum(int((m != 255).sum()) for m in masks)
    assert scores["resolution"] == "original" and scores["uncovered_pixels"] == 0
    assert frame["pixels"] != scores["pixels"] and frame["miou"] != scores["miou"]


def test_a_profile_tail_list_on_raw_ids_and_a_long_class_list():
    from difffeat.data.label_maps import ADE20K_CLASSES
    from difffeat.spine.run import ConfigError
    from downstream.seg.classes import load_classes
    from downstream.seg.profile import check_profile_classes, profile_fields

    tails = profile_fields("ade20k")["tail_classes"]
    with pytest.raises(ConfigError, match="its 150 classes, but these data have 151"):
        check_profile_classes("ade20k", tails, 151)  # ADE20K masks taken with their raw ids (0 = other)
    check_profile_classes("ade20k", tails, 150)
    check_profile_classes("ade20k", [1, 2], 151)  # the user's own list
    # 150 names as one comma list: a list, not a file name too long to look up
    assert load_classes(",".join(ADE20K_CLASSES)).names == list(ADE20K_CLASSES)


@pytest.mark.parametrize("name", ["../../secret/x.png", "/etc/x.png", "images/../../x.png"])
def test_an_imagefolder_row_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    """Issue #27 item 3: metadata.csv file_name is confined (one line), where a symbolic link inside is followed."""
    from difffeat.data.sources import ImageSource

    root = tmp_path / "set"
    _jpg(root / "train/images/a.png", (4, 4))
    _jpg(tmp_path / "elsewhere/b.png", (4, 4))
    (root / "train/images/b.png").symlink_to(tmp_path / "elsewhere/b.png")  # a data set assembled from links
    (root / "train/metadata.csv").write_text("file_name\nimages/a.png\nimages/b.png\n")
    assert [it.key for it in ImageSource(str(root)).items] == ["train/images/a.png", "train/images/b.png"]
    (root / "train/metadata.csv").write_text(f"file_name\nimages/a.png\n{name}\n")
    with pytest.raises(UserError, match=r"metadata\.csv: line 3: file_name .*(outside|relative path inside)"):
        ImageSource(str(root))


def test_a_layout_names_the_profile_whose_tail_ids_number_its_classes():
    from difffeat.data.layouts import LAYOUTS
    from downstream.profiles import profile

    linked = {name: cls for name, cls in LAYOUTS.items() if cls.profile}
    assert set(linked) == {"ade20k", "cityscapes", "cityscapes-trainids", "coco-stuff"}
    for cls in linked.values():
        chosen = profile(cls.profile)
        assert chosen["num_classes"] == len(cls.class_names)
        assert max(chosen["memory_bank"]["tail_classes"]) < len(cls.class_names)


@pytest.mark.slow
def test_a_layout_store_repeats_from_its_manifest(chains, tmp_path):
    """The recorded data set is not a setting: `extract --config MANIFEST` reads the images named again."""
    from difffeat.extraction.runner import ExtractRunConfig

    store = Path(chains["ade20k"][1]["val"])
    cfg = ExtractRunConfig.from_run(store / "manifest.json", out=str(tmp_path / "again"))
    assert cfg.images.startswith("ade20k:") and cfg.images.endswith(":val") and cfg.out == str(tmp_path / "again")
