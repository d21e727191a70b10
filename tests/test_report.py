"""`difffeat report`: one self-contained page for GATE runs, stores and head runs, checked the way a reader sees
it — in headless Chromium where it is installed (loads, silent console, every image drawn), else by parsing the
HTML and decoding every embedded picture."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from difffeat.cli import main
from difffeat.report.build import find_runs
from difffeat.report.check import check_report, check_static
from difffeat.store.feature_store import FeatureStoreWriter

CLASSES = {"names": ["background", "stripes", "circle", "star"], "ignore_index": 255,
           "pixel_counts": [900, 300, 60, 5], "groups": {"head": ["background", "stripes"], "middle": ["circle"],
                                                       "tail": ["star"]}}
HOSTILE = "<script>alert('x')</script>"  # text from a file must come out as text


def png(size=(12, 12), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_gate(folder) -> None:
    """A GATE run folder as `difffeat gate` writes it today (ranking.json, pictures, reconstructions as files)."""
    def row(rank, name, psnr, imp, accepted):
        return {"rank": rank, "candidate": name, "techniques": "controlnet:canny" if name == "canny" else HOSTILE,
                "psnr": psnr, "psnr_low": psnr - 1, "psnr_high": psnr + 1, "ssim": 0.6, "ssim_low": 0.5,
                "ssim_high": 0.7, "improvement": imp, "improvement_low": imp - 0.5, "improvement_high": imp + 0.5,
                "accepted": accepted}

    write_json(folder / "ranking.json", {
        "primary": "psnr", "higher_is_better": {"psnr": True, "ssim": True}, "decision": "accepted when …",
        "images": 2, "keys": ["a.png", "b.png"], "dropped": [], "accepted": ["canny"],
        "ranking": [row(1, "canny", 21.5, 1.2, True), row(2, "reference", 20.0, 0.0, False),
                    row(3, "other-caption", 18.0, -2.0, False)],
        "greedy": {"selected": ["canny"], "specs": ["controlnet:canny"], "steps": []},
        "config": {"model": "mini", "images": "shapes/test", "strength": 0.7, "steps": 10, "seed": 0, "t": 50}})
    write_json(folder / "config.json", {"config": {"model": "mini"}, "versions": {}})
    (folder / "scores.png").write_bytes(png((60, 30)))
    (folder / "pca.png").write_bytes(png((48, 36), (10, 200, 10)))
    recon = folder / "reconstructions"
    recon.mkdir()
    images = []
    for i, key in enumerate(("images/a.png", "images/b.png")):
        (recon / f"{i:03d}-input.png").write_bytes(png())
        cells = []
        for j, (name, score, side, colour) in enumerate((("canny", 21.0, "up", (0, 0, 200)),
                                                         ("reference", 20.0, "", (128, 128, 128)))):
            (recon / f"{i:03d}-c{j}.png").write_bytes(png(colour=colour))
            (recon / f"{i:03d}-c{j}-diff.png").write_bytes(png(colour=(20, 20, 20)))
            cells.append({"candidate": name, "file": f"reconstructions/{i:03d}-c{j}.png",
                          "difference": f"reconstructions/{i:03d}-c{j}-diff.png", "score": score,
                          "versus_reference": side})
        images.append({"key": key, "input": f"reconstructions/{i:03d}-input.png", "cells": cells})
    write_json(folder / "reconstructions.json", {"primary": "psnr", "difference_gain": 4,
                                                 "columns": ["canny", "reference"], "images": images})
    # GATE's own page is not read by the report (its pictures come from the files above)
    (folder / "report.html").write_text("<html><body><h2>Reconstructions</h2><table><tr><td><img src='x'>"
                                        "</td></tr></table></body></html>")


def seg_scores(miou: float) -> dict:
    return {"miou": miou, "miou_head": 0.9, "miou_middle": 0.4, "miou_tail": None, "pixel_accuracy": 0.95,
            "per_class_iou": {"background": 0.95, "stripes": 0.85, "circle": 0.4, "star": None}, "images": 4,
            "confusion_matrix": [[90, 5, 5, 0], [5, 30, 0, 0], [2, 0, 6, 0], [0, 0, 0, 0]]}


def make_seg(folder, marked: bool, layer: str, miou: float) -> None:
    """A train-seg run, with a RunFolder marker or in today's layout; evaluated on test (no confusion.png)."""
    config = {"features": ["runs/features"], "masks": "shapes", "layers": [layer], "head": "conv", "loss": "ce",
              "iterations": 80, "batch_size": 8, "lr": 0.001, "seed": 0, "split": "train", "val_split": "val"}
    marker = {"config": config, "classes": CLASSES}
    if marked:
        marker = {"format": "difffeat-run/1", "kind": "train-seg", **marker}
    write_json(folder / "config.json", marker)
    write_json(folder / "metrics.json", seg_scores(miou - 0.01))
    write_json(folder / "eval-test" / "metrics.json", {**seg_scores(miou), "split": "test"})
    (folder / "curves.png").write_bytes(png((80, 30)))


def make_cls(folder) -> None:
    write_json(folder / "config.json", {"config": {"method": "dirmixe", "labels": "labels.csv", "features": ["f"],
                                                   "epochs": 5, "seed": 0}, "classes": ["a", "b"]})
    shifts = [("forward-10", "forward", 0.8), ("uniform", "uniform", 0.6), ("backward-10", "backward", 0.4),
              ("dirichlet-forward-1", "dirichlet-forward", 0.7)]
    rows = [{"name": name, "kind": kind, "ratio": 10.0, "images": 6, "counts": [3, 3],
             "accuracy": {"default": acc, "tta": acc + 0.05}} for name, kind, acc in shifts]
    write_json(folder / "metrics.json", {
        "images": 6, "distributions": rows, "mean_accuracy": {"default": 0.62, "tta": 0.67},
        "mean_accuracy_sade": {"default": 0.6}, "mean_accuracy_dirichlet": {"default": 0.7},
        "full_test": {"accuracy": 0.66, "class_mean_accuracy": 0.6}, "split": "test/"})
    (folder / "curves.png").write_bytes(png((80, 30)))


def make_store(folder, images) -> None:
    rng = np.random.default_rng(0)
    images.mkdir(parents=True)
    config = {"images": str(images), "layers": ["up_blocks.1"], "timesteps": [50], "resolution": [16, 16],
              "variants": {"plain": [], "canny": ["controlnet:canny"]}, "model": "mini"}
    with FeatureStoreWriter(folder, config) as w:
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
            w.add(f"{i}.png", {f"{v}/up_blocks.1": rng.normal(size=(6, 4, 4)) for v in ("plain", "canny")})


@pytest.fixture
def chain(tmp_path):
    """A demo-like folder: a RunFolder of kind demo holding a GATE run, a store and three head runs."""
    root = tmp_path / "chain"
    write_json(root / "config.json", {"format": "difffeat-run/1", "kind": "demo", "config": {}})
    make_gate(root / "gate")
    make_store(root / "features", tmp_path / "images")
    make_seg(root / "seg-plain", marked=False, layer="plain/up_blocks.1", miou=0.5)
    make_seg(root / "seg-gate", marked=True, layer="canny/up_blocks.1", miou=0.6)
    make_cls(root / "cls")
    return root


def assert_page_ok(path, min_images: int) -> None:
    found = check_report(path)
    assert not found["problems"], found["problems"]
    assert found["images"] >= min_images


def test_report_shows_every_part_of_the_chain(chain, tmp_path, capsys):
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(chain), "--out", str(out), "--title", "my chain"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "1 GATE(s), 1 feature store(s), 2 segmentation head(s), 1 classification" in said
    page = out.read_text()
    # gate: 2 pictures of its own + 2×5 reconstructions; store: its grid; seg: bars, confusion, curves ×2; cls: 2
    assert_page_ok(out, min_images=2 + 10 + 1 + 6 + 2)
    # the reconstructions (input, 2 candidates, 2 differences per image) from reconstructions.json's files
    assert page.count("class='pix'") == 10
    for text in ("my chain", "Segmentation heads compared", "GATE · ", "Feature store · ", "Classification head · ",
                 "accepted", "worse than reference", "Greedy forward selection kept <b>canny</b>", "Reconstructions",
                 "canny/up_blocks.1", "plain/up_blocks.1", "Dirichlet", "forward-10"):
        assert text in page, text
    # Hostile text from a file is shown as text: the only <script> would be one the page never has.
    assert "<script" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page
    # The comparison table highlights the better head on the same evaluation.
    table = page[page.index("Segmentation heads compared"):page.index("GATE · ")]
    best = re.findall(r"<tr class='best'>(.*?)</tr>", table)
    assert len(best) == 1 and "seg-gate" in best[0] and "60.0" in best[0]
    # Sections in chain order: GATE, store, heads.
    assert page.index("GATE · ") < page.index("Feature store · ") < page.index("Segmentation head · ") \
        < page.index("Classification head · ")


def test_report_finds_runs_by_marker_and_by_todays_files(chain):
    found = {f.path.name: f.kind for f in find_runs([chain])}
    assert found == {"gate": "gate", "features": "store", "seg-plain": "train-seg", "seg-gate": "train-seg",
                     "cls": "train-cls"}
    # Naming a run directly, or twice, shows it once.
    assert [f.kind for f in find_runs([chain / "seg-gate", chain / "seg-gate"])] == ["train-seg"]


def test_report_output_rules_and_bad_input(chain, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(chain / "gate"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(chain / "gate"), "--out", str(out)]) == 2  # never replaced unless asked
    assert "exists" in capsys.readouterr().err
    assert main(["report", str(chain / "gate"), "--out", str(out), "--overwrite"]) == 0
    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "nope")], "no such folder"), ([str(tmp_path / "empty")], "no difffeat run"),
                          ([str(chain), "--out", str(tmp_path / "r.txt")], "--out: must be an .html"),
                          ([str(chain), "--n", "0"], "--n: must be ≥ 1")]:
        args = ["report", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "new.html")])
        assert main(args) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "new.html").exists()


def test_a_damaged_run_costs_its_section_not_the_page(chain, tmp_path, capsys):
    (chain / "gate" / "ranking.json").write_text("{not json")
    (chain / "seg-plain" / "curves.png").write_bytes(b"not a png")
    out = tmp_path / "r.html"
    assert main(["report", str(chain), "--out", str(out)]) == 0
    assert "not shown" in capsys.readouterr().err
    page = out.read_text()
    assert "Could not show this folder" in page and "unreadable" in page
    assert "curves.png: not a readable image" in page
    assert_page_ok(out, min_images=5)


def test_page_check_finds_a_broken_picture(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(f"<!doctype html><html><head></head><body><img alt='ok' src='{uri(png())}'>"
                   "<img alt='broken' src='data:image/png;base64,AAAA'><img alt='outside' src='x.png'></body></html>")
    static = check_static(bad)
    assert static["images"] == 3 and len(static["problems"]) == 2
    found = check_report(bad)
    if found["browser"]:  # and the browser sees it too
        assert any("could not draw image 'broken'" in p for p in found["problems"])


def test_gate_reconstructions_come_from_its_files_and_stay_inside_the_run(chain, tmp_path, capsys):
    """No reconstructions.json (an older run): a note, the rest of the section shown. A listed name outside the run
    folder: the section is not shown, naming why; the page still is."""
    import json as _json

    listing = chain / "gate" / "reconstructions.json"
    saved = listing.read_text()
    listing.unlink()
    out = tmp_path / "older.html"
    assert main(["report", str(chain / "gate"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "keeps none as files" in page and "class='pix'" not in page and "Greedy forward selection" in page
    data = _json.loads(saved)
    data["images"][0]["cells"][0]["file"] = "../../secret.png"
    listing.write_text(_json.dumps(data))
    out = tmp_path / "hostile.html"
    assert main(["report", str(chain / "gate"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not shown" in err and "../../secret.png" in err and err.count("\n") == 1, err
    assert "Could not show this folder" in out.read_text()


def test_a_package_adds_a_section_kind_through_the_entry_point_group(tmp_path):
    """A kind of folder the core does not know, registered by an installed package, is recognised and shown."""
    import os
    import subprocess
    import sys
    import textwrap

    (tmp_path / "notes_plugin.py").write_text(textwrap.dedent('''
        from difffeat.report.kinds import SectionKind
        from difffeat.report.page import Section, esc

        def render(path, marker, anchor, shown, n_images):
            text = (path / "NOTES.txt").read_text()
            return Section("notes", f"notes · {shown}", anchor, f"<pre>{esc(text)}</pre>", "a notes folder")

        NOTES = SectionKind("notes", "notes folder", lambda path, marker: (path / "NOTES.txt").is_file(), render,
                            page_rank=5, chain_step="someone left notes")
    '''))
    info = tmp_path / "notes_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: notes-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[difffeat.report_sections]\nnotes = notes_plugin:NOTES\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "NOTES.txt").write_text("<b>hello</b> from a plugin")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "difffeat", "report", str(tmp_path / "run"), "--out",
                           str(tmp_path / "r.html")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 notes folder(s)" in proc.stdout
    page = (tmp_path / "r.html").read_text()
    assert "&lt;b&gt;hello&lt;/b&gt; from a plugin" in page and "Someone left notes." in page
