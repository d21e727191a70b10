"""Issue #27, the weak cases about stores and commands: each behaviour a user met as unclear, now one clear behaviour
(a refusal in one line naming the file or flag and the reason, a warning said once, or a documented limit), checked
through the command line as the issue met it. docs/reliability.md ("Weak cases of the issue, stores and commands")
lists each case with its test.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reliability import assert_one_line, images, run_cli, snapshot

from difffeat.store.feature_store import FeatureStore

MODEL = ["--model", "mini-random"]


def warned(text: str, err: str, recorded: list) -> int:
    """How often a warning holding `text` was given: on stderr (the CLI's one-line warnings) or recorded by Python."""
    return sum(line.startswith("difffeat: warning: ") and text in line for line in err.splitlines()) + \
        sum(text in str(w.message) for w in recorded)


# ------------------------------------------------------------------------------ pictures difffeat does not read
def test_unread_picture_formats_are_skipped_with_one_warning_naming_one(tmp_path, capsys):
    """A `.gif` (and any picture of a format difffeat does not read) is left out with one warning per listing: how
    many, which formats, the first by name; captions and notes beside the images are not pictures and are not
    counted."""
    from difffeat.data.images import SkippedImagesWarning, discover_images
    from difffeat.errors import UserError

    imgs = images(tmp_path / "imgs", 2)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(imgs / "anim.gif")
    (imgs / "sub").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(imgs / "sub" / "b.gif")
    (imgs / "0.txt").write_text("a red circle")  # a caption sidecar
    (imgs / "notes.md").write_text("mine")
    with pytest.warns(SkippedImagesWarning) as record:
        assert [it.key for it in discover_images(imgs)] == ["0.png", "1.png"]
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 2 files of a format difffeat does not read (.gif; first: anim.gif)" in message, message
    assert "0.txt" not in message and "notes.md" not in message
    with pytest.raises(UserError, match=r"no images found .*skipped 1 file .*\(\.gif; first: anim\.gif\)"):
        discover_images(f"{imgs}/*.gif")  # a pattern of GIFs only: the refusal says why
    # Through the command line: one warning, the PNGs extracted, the GIFs not.
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        code, _, err = run_cli(["extract", str(imgs), "--out", str(tmp_path / "feats"), *MODEL, "--layer",
                                "mid_block"], capsys)
    assert code == 0, err
    assert warned("skipped 2 files of a format difffeat does not read", err, recorded) == 1, (err, recorded)
    assert FeatureStore(tmp_path / "feats").keys() == ["0.png", "1.png"]


# ------------------------------------------------------------------------------ sweep --max-memory
def test_a_sweep_budget_below_what_the_process_holds_is_refused(shapes_dir, tmp_path, capsys):
    """`sweep --max-memory 40MB`: the estimate counts the process itself (Python, torch, libraries) besides the model
    and the sweep's tensors, and a budget below what is held before any sweep work is refused saying so."""
    out = tmp_path / "sw"
    code, _, err = run_cli(["sweep", str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(out),
                            *MODEL, "--layers", "dift", "--t", "50", "--n", "8", "--max-memory", "40MB"], capsys)
    assert code == 2
    assert_one_line(err, ("--max-memory", "the process itself", "model weights", "above 40MB",
                          "before any sweep work: give a budget above that"))
    assert not out.exists()


# ------------------------------------------------------------------------------ sweep --overwrite
def test_sweep_overwrite_removes_its_own_heat_maps_by_name_and_keeps_the_users(shapes_dir, tmp_path, capsys):
    """`sweep --overwrite` removes the heat maps of the variants its old run had (exact names from its saved config),
    never a glob over `heatmap-*`: the user's `heatmap-mine.png` survives, byte for byte and untouched."""
    from difffeat.spine.run import RunFolder
    from gate.sweeping import KIND, OWNED, SweepConfig

    out = tmp_path / "sw"
    old = SweepConfig(images=str(shapes_dir / "train"), labels=str(shapes_dir), out=str(out), model="mini-random",
                      variants={"old": []})
    RunFolder(out, KIND, old).create()
    for name in ("heatmap-old.png", "ranking.csv", "report.html"):
        (out / name).write_bytes(b"the old run's")
    (out / "heatmap-mine.png").write_bytes(b"my own picture")
    (out / "notes.txt").write_text("mine")
    names = RunFolder(out, KIND, old, overwrite=True, owned=OWNED)
    kept = snapshot(out)
    kept = {k: v for k, v in kept.items() if k in ("heatmap-mine.png", "notes.txt")}
    code, _, err = run_cli(["sweep", str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(out),
                            *MODEL, "--layers", "dift", "--t", "50", "--n", "4", "--min-images", "4", "--boot", "100",
                            "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "heatmap-old.png").exists()  # the old run's own heat map went
    assert (out / "heatmap-plain.png").is_file() and (out / "ranking.csv").read_bytes() != b"the old run's"
    assert {k: v for k, v in snapshot(out).items() if k in kept} == kept  # the user's files: same size and time
    assert (out / "heatmap-mine.png").read_bytes() == b"my own picture"
    assert names.owned_names()[0] == {"heatmap-plain.png"}  # the new run's own, by name, from its saved config


# ------------------------------------------------------------------------------ --variants FILE
@pytest.mark.parametrize("name, text, words", [
    ("dup.yaml", "variants:\n  plain: []\n  canny: [prompt:caption]\n  plain: [prompt:fine]\n",
     ("dup.yaml", "key 'plain' appears twice (line 4, first at line 2)")),
    ("dup.json", '{"variants": {"plain": [], "plain": ["prompt:caption"]}}', ("dup.json", "key 'plain' appears twice")),
])
def test_a_variants_file_naming_a_variant_twice_is_refused(name, text, words, tmp_path, capsys):
    """A variants file with one name twice: YAML and JSON would keep the last silently; refused naming the file and
    the key, for `extract --variants` and `sweep --techniques` alike (one reader)."""
    images(tmp_path / "imgs", 2)
    (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "feats"), *MODEL,
                            "--variants", str(tmp_path / name)], capsys)
    assert code == 2
    assert_one_line(err, words)
    code, _, err = run_cli(["sweep", str(tmp_path / "imgs"), "--labels", str(tmp_path), "--out", str(tmp_path / "sw"),
                            *MODEL, "--techniques", str(tmp_path / name)], capsys)
    assert code == 2
    assert_one_line(err, words)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ default layers on a transformer
def test_extract_on_a_transformer_without_layer_takes_its_middle_block(tmp_path, capsys):
    """The default layer preset `auto` is DIFT's `up_blocks.1` on a UNet and `dit-middle` on a transformer, so
    `extract --model mini-dit` with no `--layer` runs; an explicit `--layer dift` there is still refused."""
    from difffeat.extraction.runner import ExtractRunConfig
    from difffeat.models.layers import resolve_layers
    from difffeat.zoo import load_pipeline

    assert ExtractRunConfig(images="x", out="y").layers == ["auto"]
    assert resolve_layers(load_pipeline("mini-random"), ["auto"]) == ["up_blocks.1"]
    imgs = images(tmp_path / "imgs", 2)
    code, _, err = run_cli(["extract", str(imgs), "--out", str(tmp_path / "feats"), "--model", "mini-dit"], capsys)
    assert code == 0, err
    store = FeatureStore(tmp_path / "feats")
    assert store.manifest["layers"] == ["transformer_blocks.2"] and store.keys() == ["0.png", "1.png"]
    code, _, err = run_cli(["extract", str(imgs), "--out", str(tmp_path / "f2"), "--model", "mini-dit", "--layer",
                            "dift"], capsys)
    assert code == 2
    assert_one_line(err, ("preset 'dift' does not fit", "auto"))


# ------------------------------------------------------------------------------ a refusal leaves no store
def test_extract_refused_for_memory_leaves_no_store_and_a_retry_at_another_size_runs(tmp_path, capsys, monkeypatch):
    """`extract --size 4096 4096` refused for memory before any feature: the store it had begun is taken away (a new
    folder entirely; an empty folder of the user's stays, empty), so the retry at another size is not refused as
    "a feature store run of another config"."""
    from difffeat.extraction.autobatch import MEMORY_LIMIT_ENV

    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(4 * 2**30))
    imgs = images(tmp_path / "imgs", 2)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "feats", tmp_path / "empty"):
        code, _, err = run_cli(["extract", str(imgs), "--out", str(out), *MODEL, "--layer", "mid_block", "--size",
                                "4096", "4096"], capsys)
        assert code == 2
        assert_one_line(err, ("does not fit", "--size"))
    assert not (tmp_path / "feats").exists()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    code, _, err = run_cli(["extract", str(imgs), "--out", str(tmp_path / "feats"), *MODEL, "--layer", "mid_block",
                            "--size", "32", "32"], capsys)
    assert code == 0, err
    assert FeatureStore(tmp_path / "feats").manifest["resolution"] == [32, 32]


# ------------------------------------------------------------------------------ --out is the input folder
@pytest.mark.parametrize("given", ["imgs", "imgs/", "imgs/*.png", "empty"])
def test_out_equal_to_the_input_folder_is_refused_saying_so(given, tmp_path, capsys):
    """`extract imgs --out imgs` listed nothing (its own output is never an input) and said "no images found":
    refused in one line saying the output folder is the input folder, before a model loads; nothing changes."""
    images(tmp_path / "imgs", 2)
    (tmp_path / "empty").mkdir()
    source = str(tmp_path / given)
    out = str(tmp_path / given.split("/")[0])
    before = snapshot(tmp_path)
    code, _, err = run_cli(["extract", source, "--out", out, *MODEL], capsys)
    assert code == 2
    assert_one_line(err, (source, "the output folder (--out) is the input folder"))
    assert "no images found" not in err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ an ADE20K root
def test_extract_on_an_ade20k_root_takes_its_images_and_not_its_annotations(tmp_path, capsys):
    """An ADEChallengeData2016 root given as a plain folder is detected as the ade20k layout: its annotation PNGs are
    masks, not images."""
    root = tmp_path / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        pixels = np.random.default_rng(len(stem)).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / split / f"{stem}.jpg")
        Image.fromarray(np.ones((64, 64), np.uint8)).save(root / "annotations" / split / f"{stem}.png")
    code, _, err = run_cli(["extract", str(root), "--out", str(tmp_path / "feats"), *MODEL, "--layer", "mid_block"],
                           capsys)
    assert code == 0, err
    store = FeatureStore(tmp_path / "feats")
    assert store.keys() == ["images/training/ADE_train_00000001.jpg", "images/validation/ADE_val_00000001.jpg"]
    assert store.manifest["config"]["data"]["layout"] == "ade20k"


# ------------------------------------------------------------------------------ resume at another batch size
def test_a_resume_at_another_batch_size_differs_only_by_float_rounding(tmp_path):
    """A store extracted in one go (batch 4) and one begun at batch 1 and resumed at batch 3: the same keys, features
    equal to float32 rounding (CPU matrix kernels sum in another order for another batch; the issue saw 8.6e-6).
    Noise is drawn per image key, so nothing but rounding differs."""
    from difffeat.extraction.runner import ExtractRunConfig, run_extraction
    from difffeat.zoo import load_pipeline

    pipe = load_pipeline("mini-random")
    imgs = images(tmp_path / "imgs", 4)

    def extract(folder: Path, out: str, batch: int, resume: bool = False) -> None:
        cfg = ExtractRunConfig(images=str(folder), out=str(tmp_path / out), model="mini-random", batch_size=batch,
                               layers=["mid_block"], resolution=[32, 32])
        run_extraction(cfg, resume=resume, progress=False, pipe=pipe)

    extract(imgs, "one-go", 4)
    part = tmp_path / "part"
    part.mkdir()
    for name in ("0.png", "1.png"):
        os.link(imgs / name, part / name)
    extract(part, "resumed", 1)
    for name in ("2.png", "3.png"):
        os.link(imgs / name, part / name)
    extract(part, "resumed", 3, resume=True)
    a, b = FeatureStore(tmp_path / "one-go"), FeatureStore(tmp_path / "resumed")
    assert a.keys() == b.keys() == ["0.png", "1.png", "2.png", "3.png"]
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert report["already_done"] == 2 and report["extracted"] == 2 and report["batch_size"] == 3
    worst = max(float(np.abs(a[k][layer] - b[k][layer]).max()) for k in a.keys() for layer in a.layers)
    assert worst < 1e-4, worst
