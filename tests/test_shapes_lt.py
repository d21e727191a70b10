import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from difffeat.data import shapes_lt as slt
from difffeat.errors import UserError


def test_scene_is_deterministic_and_independent_of_other_scenes():
    a = slt.generate_scene(7, "train", 12)
    b = slt.generate_scene(7, "train", 12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.fine_caption == b.fine_caption
    # Scene 12 of a stream equals the 3rd scene of the stream started at 10.
    c = list(slt.iter_scenes("train", 3, seed=7, start=10))[2]
    assert np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, slt.generate_scene(8, "train", 12).image)
    assert not np.array_equal(a.image, slt.generate_scene(7, "test", 12).image)


def test_synthesize_writes_the_design_format(shapes_dir):
    classes = json.loads((shapes_dir / "classes.json").read_text())
    assert len(classes["names"]) >= 12 and classes["names"][0] == "background"
    assert set(classes["groups"]) == {"head", "middle", "tail"}
    assert sorted(sum(classes["groups"].values(), [])) == sorted(classes["names"])
    sizes = classes["config"]["splits"]
    assert sizes == {"train": 48, "val": 6, "test": 6}
    for split, n in sizes.items():
        rows = list(csv.DictReader(open(shapes_dir / split / "metadata.csv")))
        assert len(rows) == n
        assert list(rows[0]) == ["file_name", "mask_file_name", "label", "coarse_caption", "fine_caption"]
        for i, row in enumerate(rows):
            scene = slt.generate_scene(3, split, i)  # the file is exactly the seeded scene
            img = np.asarray(Image.open(shapes_dir / split / row["file_name"]))
            mask = np.asarray(Image.open(shapes_dir / split / row["mask_file_name"]))
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and mask.dtype == np.uint8
            assert np.array_equal(img, scene.image) and np.array_equal(mask, scene.mask)
            assert row["label"] == scene.label and row["fine_caption"] == scene.fine_caption
            sidecar = (shapes_dir / split / row["file_name"]).with_suffix(".txt").read_text().strip()
            assert sidecar == row["fine_caption"]


def test_same_seed_gives_identical_folders(tmp_path):
    a = slt.synthesize(tmp_path / "a", n=12, seed=5)
    b = slt.synthesize(tmp_path / "b", n=12, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_label_profile_is_exponential_with_ratio_r():
    p = slt.label_profile(100)
    assert p[0] / p[-1] == pytest.approx(100)
    assert np.all(np.diff(np.log(p)) == pytest.approx(np.log(100) / -(len(p) - 1)))
    counts = np.zeros(len(slt.THING_CLASSES))
    for scene in slt.iter_scenes("train", 3000, seed=1):
        counts[slt.THING_CLASSES.index(scene.label)] += 1
    freq = counts / counts.sum()
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation from the profile
    assert slt.label_profile(1) == pytest.approx(np.full(len(p), 1 / len(p)))


def test_pixel_frequencies_are_long_tailed(tmp_path):
    out = slt.synthesize(tmp_path / "lt", n=1000, seed=0)
    counts = np.array(json.loads((out / "classes.json").read_text())["train_pixel_counts"])
    assert counts.min() > 0, "every class appears in train"
    assert counts.max() >= 100 * counts.min()
    # Recount from the mask files: the exported counts are the truth.
    recount = np.zeros_like(counts)
    for f in (out / "train" / "masks").glob("*.png"):
        recount += np.bincount(np.asarray(Image.open(f)).ravel(), minlength=len(counts))[: len(counts)]
    assert np.array_equal(counts, recount)


PHRASE = re.compile(r"^a (small|medium|large) (\w+) (\w+) (?:in the center|at the (.+))$")


@pytest.mark.parametrize("seed", [0, 1])
def test_fine_caption_names_every_object_and_masks_agree(seed):
    checked_position = 0
    for scene in slt.iter_scenes("val", 300, seed=seed):
        phrases = scene.fine_caption.split(", ")
        assert len(phrases) == len(scene.things) + len(scene.stuff)
        present = set(np.unique(scene.mask).tolist())
        for phrase, thing in zip(phrases, scene.things):
            m = PHRASE.match(phrase)
            assert m, phrase
            size, colour, cls, where = m.groups()
            assert (size, colour, cls) == (thing.size, thing.colour, thing.cls)
            assert (where or "center") == thing.position
            assert slt.CLASS_ID[cls] in present, f"{cls} named but not in the mask"
        for phrase, stuff in zip(phrases[len(scene.things):], scene.stuff):
            assert phrase == f"{stuff.colour} {stuff.cls} at the {stuff.side}"
            assert slt.CLASS_ID[stuff.cls] in present
        named = {slt.CLASS_ID[t.cls] for t in scene.things} | {slt.CLASS_ID[s.cls] for s in scene.stuff}
        assert present - {0} <= named, "every non-background class in the mask is named"
        # The main object is drawn last: its whole shape carries its class and its colour.
        main = scene.things[0]
        shape = main.shape()
        assert shape.sum() > 0 and np.all(scene.mask[shape] == slt.CLASS_ID[main.cls])
        ys, xs = np.nonzero(shape)
        colour = np.array(slt.THING_COLOURS[main.colour], float)
        mean = scene.image[ys, xs].astype(float).mean(0)
        assert np.linalg.norm(mean / np.linalg.norm(mean) - colour / np.linalg.norm(colour)) < 0.15
        # Position word from the mask itself, for point-symmetric shapes away from cell borders.
        if main.cls in ("circle", "square", "diamond", "hexagon", "ring") and len(scene.things) == 1:
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            borders = np.array([64 / 3, 128 / 3])
            if np.abs(borders - cx).min() > 2 and np.abs(borders - cy).min() > 2:
                assert slt.position_name(cx, cy) == main.position
                checked_position += 1
    assert checked_position > 20


def test_loads_as_hf_imagefolder(shapes_dir):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(shapes_dir))
    assert set(ds) == {"train", "validation", "test"}
    row = ds["train"][0]
    assert row["image"].size == (64, 64) and row["mask"].size == (64, 64)
    assert {"label", "coarse_caption", "fine_caption"} <= set(row)
    assert len(ds["train"]) == 48


def test_never_writes_into_a_folder_it_did_not_make(tmp_path):
    """Issue #13 item 1: a non-empty folder without the Shapes-LT marker is refused, even with overwrite."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not empty and is not a difffeat shapes-lt run"):
            slt.synthesize(tmp_path / "x", n=5, overwrite=overwrite)
        assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
        assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_its_own_files(tmp_path):
    out = slt.synthesize(tmp_path / "d", n=5, seed=1)
    classes = json.loads((out / "classes.json").read_text())
    assert classes["format"] == "difffeat-run/1" and classes["kind"] == "shapes-lt"
    (out / "main.py").write_text("print('mine')\n")
    (out / "notes").mkdir()
    with pytest.raises(UserError, match="already.*--overwrite"):  # the same set again
        slt.synthesize(out, n=5, seed=1)
    with pytest.raises(UserError, match=r"another config \(differs in: n, splits\).*--overwrite"):
        slt.synthesize(out, n=6, seed=1)
    old_test = sorted(p.name for p in (out / "test" / "images").iterdir())
    slt.synthesize(out, n=10, seed=2, overwrite=True)
    assert (out / "main.py").read_text() == "print('mine')\n" and (out / "notes").is_dir()
    assert json.loads((out / "classes.json").read_text())["config"]["seed"] == 2
    assert len(list((out / "train" / "images").glob("*.png"))) == 8
    assert sorted(p.name for p in (out / "test" / "images").iterdir()) == old_test  # 1 test image either way
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "main.py", "notes", "test", "train", "val"]


def test_a_set_cut_short_is_made_again_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    out = tmp_path / "d"
    calls = {"n": 0}
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):  # the disk fills up at the 7th picture
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(UserError, match=r"d: cannot write the Shapes-LT set \(No space left on device\)"):
        slt.synthesize(out, n=5)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json"]  # the marker alone: no temporary folder
    monkeypatch.undo()
    slt.synthesize(out, n=5)  # recognised as its own set, cut short: made again without --overwrite
    assert len(list((out / "train" / "images").glob("*.png"))) == 3


def test_synth_onto_a_symbolic_link_to_a_folder(tmp_path):
    """Issue #13 item 11: the data lands in the linked folder, the link stays, and no temporary folder is left."""
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    slt.synthesize(link, n=5)
    assert link.is_symlink() and (target / "classes.json").is_file() and (target / "train" / "images").is_dir()
    slt.synthesize(link, n=5, seed=4, overwrite=True)
    assert link.is_symlink() and json.loads((target / "classes.json").read_text())["config"]["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args, message", [
    (["--n", "2"], "at least 3"),
    (["--imbalance", "0.5"], "imbalance"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "difffeat", "data", "synth", str(tmp_path / "o"), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_synth_into_non_empty_folder(tmp_path):
    """The issue's reproduction: `difffeat data synth . --overwrite` in a project folder deletes nothing."""
    (tmp_path / "main.py").write_text("x")
    cmd = [sys.executable, "-m", "difffeat", "--quiet", "data", "synth", str(tmp_path), "--n", "6"]
    for extra in ([], ["--overwrite"]):
        proc = subprocess.run(cmd + extra, capture_output=True, text=True)
        assert proc.returncode == 2 and "not a difffeat shapes-lt run" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert [p.name for p in tmp_path.iterdir()] == ["main.py"] and (tmp_path / "main.py").read_text() == "x"
    out = tmp_path / "data"
    proc = subprocess.run(cmd[:-3] + [str(out), "--n", "6"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "train" / "images").glob("*.png"))) == 4


def test_splits_of_chosen_sizes_keep_every_scene_where_it_was(tmp_path, capsys):
    """`--splits TRAIN VAL TEST` (e.g. a test split large enough for every tail class): scene i of a split is the one
    an 80/10/10 set of the same seed has there; sizes that disagree with --n, or a layout, are refused."""
    from difffeat.cli import main

    assert main(["--quiet", "data", "synth", str(tmp_path / "big"), "--splits", "4", "2", "9"]) == 0
    assert main(["--quiet", "data", "synth", str(tmp_path / "plain"), "--n", "20"]) == 0  # 16 / 2 / 2
    config = json.loads((tmp_path / "big" / "classes.json").read_text())["config"]
    assert config["splits"] == {"train": 4, "val": 2, "test": 9} and config["n"] == 15
    assert len(list((tmp_path / "big" / "test" / "images").glob("*.png"))) == 9
    for split, name in (("test", "000001.png"), ("train", "000003.png"), ("val", "000001.png")):
        for kind in ("images", "masks"):
            assert (tmp_path / "big" / split / kind / name).read_bytes() == \
                (tmp_path / "plain" / split / kind / name).read_bytes(), (split, kind)
    for argv, message in ((["--splits", "4", "2", "9", "--n", "10"], "disagree"),
                          (["--splits", "4", "0", "9"], "positive counts"),
                          (["--splits", "4", "2", "9", "--layout", "ade20k"], "plain Shapes-LT")):
        capsys.readouterr()
        assert main(["--quiet", "data", "synth", str(tmp_path / "bad"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "bad").exists()
