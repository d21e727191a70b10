"""`difffeat sweep`: the probe on planted signals, its maths against GATE's probe, successive halving with resume,
the winner config through `difffeat extract --config`, and the bad-input cases of the issue."""

import csv
import json

import numpy as np
import pytest
import torch

from difffeat.cli import main
from gate.probe import mean_iou, ridge_fit
from gate.sweep_labels import grid_labels
from gate.sweep_probe import (
    ProbeSpec,
    Reducer,
    SegProbe,
    Targets,
    knn_predict,
    logistic_predict,
    miou_from_confusion,
    score_features,
)


# ------------------------------------------------------------------------------------------ the probe
def planted(n=24, size=32, grid=8, k=4, seed=0):
    """Masks of random rectangles and feature maps at `grid`: one layer carries the mask, others do not."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n):
        m = np.zeros((size, size), np.int64)
        for c in range(1, k):
            y, x = rng.integers(0, size - 12, 2)
            h, w = rng.integers(8, 13, 2)
            m[y : y + h, x : x + w] = c
        m[rng.random((size, size)) < 0.02] = 255
        masks.append(m)
    targets = Targets("seg", masks, k)
    onehot = torch.stack([torch.from_numpy(np.eye(k)[targets.grid(i, (grid, grid))].transpose(2, 0, 1))
                          for i in range(n)]).float()
    noise = lambda c, g=grid: torch.from_numpy(rng.normal(size=(n, c, g, g))).float()  # noqa: E731
    mix = torch.from_numpy(rng.normal(size=(k, 96))).float()
    feats = {
        "signal": torch.cat([onehot * 2, noise(12)], 1) + 0.3 * noise(16),
        "weak": torch.cat([onehot * 1.5, noise(12)], 1) + 0.8 * noise(16),
        "noise": noise(16),
        # wider than the reduction width: the mask is spread over 96 channels, then projected
        "wide": torch.einsum("nkhw,kc->nchw", onehot, mix) * 0.5 + noise(96),
        # a coarser grid (4×4): probed at its own grid, scored at full mask size
        "coarse": torch.nn.functional.avg_pool2d(onehot * 2, 2) + 0.3 * noise(k, grid // 2),
    }
    return feats, targets


def test_planted_signal_ranks_the_layer_that_carries_the_mask():
    feats, targets = planted()
    roles = ["fit" if i % 2 == 0 else "score" for i in range(24)]
    spec = ProbeSpec("seg", 4, n_boot=500)
    scores = score_features(spec, feats, targets, roles, reducer=Reducer("random", width=32, seed=0))
    value = {name: iv.value for name, (iv, _) in scores.items()}
    assert max(value, key=value.get) == "signal"
    assert value["signal"] > value["weak"] > value["noise"]
    assert scores["signal"][0].low > scores["noise"][0].high  # separated, not just ordered
    assert value["wide"] > value["weak"]  # the projection keeps a signal spread over many channels
    assert value["coarse"] > value["noise"] and value["coarse"] < value["signal"]  # half the grid, blurrier edges
    for iv, per_image in scores.values():
        assert iv.low <= iv.value <= iv.high and per_image.shape == (12, 4, 4)


def test_planted_image_labels_rank_the_informative_layer_for_every_classifier():
    rng = np.random.default_rng(1)
    n, k = 40, 3
    labels = np.arange(n) % k
    targets = Targets("cls", labels.tolist(), k)
    centres = rng.normal(size=(k, 8)) * 2
    good = torch.from_numpy(centres[labels][:, :, None, None] + rng.normal(size=(n, 8, 2, 2))).float()
    bad = torch.from_numpy(rng.normal(size=(n, 8, 2, 2))).float()
    roles = ["fit" if i % 2 == 0 else "score" for i in range(n)]
    for method in ("ridge", "logistic", "knn"):
        scores = score_features(ProbeSpec("cls", k, method, n_boot=200), {"good": good, "bad": bad}, targets, roles)
        assert scores["good"][0].value > 0.9 > 0.6 > scores["bad"][0].value, method


def test_pca_reduction_keeps_the_signal_and_round_trips_through_a_checkpoint():
    feats, targets = planted()
    roles = ["fit" if i % 2 == 0 else "score" for i in range(24)]
    reducer = Reducer("pca", width=8, seed=0)
    scores = score_features(ProbeSpec("seg", 4, n_boot=200), {k: feats[k] for k in ("wide", "noise")}, targets, roles,
                            reducer=reducer)
    assert scores["wide"][0].value > scores["noise"][0].value + 0.1
    again = Reducer("pca", width=8, seed=0)
    again.load_state(reducer.state())
    torch.testing.assert_close(again("wide", "wide", feats["wide"][:2]), reducer("wide", "wide", feats["wide"][:2]))


def test_incremental_ridge_is_gate_probes_ridge_and_confusion_miou_is_gate_probes_miou():
    rng = np.random.default_rng(2)
    d, k = 6, 3
    probe = SegProbe(d, k)
    labels = rng.integers(0, k, (2, 10, 10))
    labels[0, 0, :4] = 255  # ignored cells are left out of the fit
    maps = rng.normal(size=(2, d, 10, 10)) * 3 + 1
    targets = Targets("seg", list(labels), k)
    for i in range(2):  # two images added one after the other = one fit on all their cells
        probe.add(i, "fit", torch.from_numpy(maps[i]), targets)
    w, bias, mean, std = probe.solve(1e-3)
    x = maps.transpose(0, 2, 3, 1).reshape(-1, d)
    y = labels.reshape(-1)
    ref_w, ref_mean, ref_std = ridge_fit(x[y != 255], np.eye(k)[y[y != 255]])
    np.testing.assert_allclose(w, ref_w[:d], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias, ref_w[d], atol=1e-12)
    np.testing.assert_allclose(std, ref_std, rtol=1e-9)
    pred, target = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    target[:40] = 255
    keep = target != 255
    conf = np.bincount(target[keep] * 4 + pred[keep], minlength=16).reshape(4, 4)
    assert miou_from_confusion(conf) == pytest.approx(mean_iou(pred, target), abs=1e-12)


def test_grid_labels_are_the_majority_of_each_cell():
    mask = np.array([[1, 1, 2, 2],
                     [1, 0, 2, 255],
                     [255, 255, 3, 3],
                     [255, 0, 3, 255]])
    np.testing.assert_array_equal(grid_labels(mask, (2, 2), 4), [[1, 2], [255, 3]])


def test_knn_and_logistic_are_deterministic_and_fit_separable_data():
    x = np.array([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [0, 5], [0.1, 5]])
    y = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(knn_predict(x, y, x, k=1), y)
    assert (logistic_predict(x, y, x, 3, 1e-3) == y).all()


# ------------------------------------------------------------------------------------------ end to end
FAST = ["--n", "8", "--min-images", "4", "--t", "50,300", "--boot", "200", "--batch-size", "4"]


@pytest.fixture(scope="module")
def swept(shapes_dir, tmp_path_factory):
    """One sweep by the CLI (uninterrupted): every up block's output × 2 timesteps × {plain, caption}."""
    root = tmp_path_factory.mktemp("sweep")
    tech = root / "tech.yaml"
    tech.write_text("variants:\n  plain: []\n  caption: [prompt:caption]\n")
    out = root / "run"
    rc = main(["--quiet", "sweep", str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(out),
               "--techniques", str(tech), "--layers", "up-blocks", "--greedy", *FAST])
    assert rc == 0
    return out


def test_sweep_outputs_rungs_and_mixed_grids(swept):
    ranking = json.loads((swept / "ranking.json").read_text())
    rows = ranking["ranking"]
    assert len(rows) == 3 * 2 * 2 and [r["rank"] for r in rows] == list(range(1, 13))
    assert {r["grid"] for r in rows} == {"8x8", "16x16"}  # mini's up blocks: each probed at its own grid
    rungs = ranking["rungs"]
    assert [(r["images"], r["configurations"], len(r["kept"]), r["dropped"]) for r in rungs] == \
        [(4, 12, 6, 6), (8, 6, 6, 0)]
    assert sum(r["status"] == "final" for r in rows) == 6 and rows[0]["status"] == "final"
    finals = [r["miou"] for r in rows if r["status"] == "final"]
    assert finals == sorted(finals, reverse=True)
    assert all(r["low"] <= r["miou"] <= r["high"] for r in rows)
    for name in ("ranking.csv", "report.html", "heatmap-plain.png", "heatmap-caption.png", "best.json",
                 "variants.yaml", "config.json"):
        assert (swept / name).is_file(), name
    page = (swept / "report.html").read_text()
    assert "Successive halving" in page and rows[0]["config"] in page
    assert ranking["greedy"]["selected"][0] == rows[0]["layer"] or rows[0]["layer"] in ranking["greedy"]["selected"]


def test_resume_after_interruption_gives_the_same_ranking(swept, mini_pipe, tmp_path, monkeypatch):
    import gate
    from gate.sweeping import Search, SweepConfig

    cfg = SweepConfig.from_run(swept / "config.json", out=str(tmp_path / "run"))
    assert gate.sweep(config=cfg, pipe=mini_pipe, stop_after=1) is None  # stopped cleanly after one unit
    # Then a crash in the middle of the next unit, after its probes took images but before its checkpoint.
    real_save = Search.save

    def crash(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Search, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        gate.sweep(config=cfg, pipe=mini_pipe, resume=True)
    monkeypatch.setattr(Search, "save", real_save)
    result = gate.sweep(config=cfg, pipe=mini_pipe, resume=True)
    again = json.loads((tmp_path / "run" / "ranking.json").read_text())
    first = json.loads((swept / "ranking.json").read_text())
    assert again["ranking"] == first["ranking"] and again["greedy"] == first["greedy"]
    assert [r["config"] for r in result.table()] == [r["config"] for r in first["ranking"]]


def test_winner_config_runs_through_extract(swept, shapes_dir, tmp_path):
    from difffeat.store.feature_store import FeatureStore

    best = json.loads((swept / "best.json").read_text())
    top = json.loads((swept / "ranking.json").read_text())["ranking"][0]
    out = tmp_path / "features"
    # as is, on other images (the held-out split, so that the test stays small)
    assert main(["--quiet", "extract", "--config", str(swept / "best.json"), str(shapes_dir / "val"),
                 "--out", str(out)]) == 0
    store = FeatureStore(out)
    assert store.manifest["timesteps"] == [top["t"]] and top["layer"] in best["layers"]
    assert set(store.layers) == set(best["layers"])
    assert store.manifest["techniques"] == ([] if top["variant"] == "plain" else ["prompt:caption"])


def test_image_labels_from_a_csv(shapes_dir, tmp_path):
    rows = list(csv.DictReader(open(shapes_dir / "train" / "metadata.csv")))
    labels = tmp_path / "labels.csv"
    labels.write_text("key,label\n" + "".join(f"{r['file_name']},{r['label']}\n" for r in rows))
    out = tmp_path / "run"
    assert main(["--quiet", "sweep", str(shapes_dir / "train"), "--labels", str(labels), "--out", str(out),
                 "--layers", "dift", "--t", "50", "--n", "12", "--min-images", "12", "--probe", "logistic",
                 "--boot", "200"]) == 0
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["task"] == "cls" and ranking["metric"] == "accuracy" and len(ranking["ranking"]) == 1
    assert 0 <= ranking["ranking"][0]["accuracy"] <= 1


# ------------------------------------------------------------------------------------------ bad input
def run_cli(args, capsys):
    rc = main(["--quiet", "sweep", *args])
    err = capsys.readouterr().err
    return rc, err


def test_labels_that_match_no_image_name_the_first_keys_of_each(shapes_dir, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("key,label\nphotos/a.png,cat\nphotos/b.png,dog\n")
    rc, err = run_cli([str(shapes_dir / "train"), "--labels", str(labels), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no label key matches" in err and "'photos/a.png'" in err and "'images/" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "elsewhere.png").write_bytes((shapes_dir / "val" / "masks" / next(
        p.name for p in (shapes_dir / "val" / "masks").iterdir())).read_bytes())
    rc, err = run_cli([str(shapes_dir / "train"), "--labels", str(masks), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no mask matches" in err and "'elsewhere.png'" in err and "'images/" in err
    # another split's masks are numbered like these images: never paired by file name alone
    rc, err = run_cli([str(shapes_dir / "train"), "--labels", str(shapes_dir / "val" / "masks"), "--out",
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and "no mask matches" in err and f"an image of {shapes_dir / 'train'}" in err


def test_a_sweep_above_the_memory_budget_is_refused_with_its_estimate(shapes_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc, err = run_cli([str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(out),
                       "--max-memory", "1MB"], capsys)
    assert rc == 2 and "--max-memory" in err and "needs about" in err and "model weights" in err
    assert not out.exists()  # refused before starting


@pytest.mark.parametrize("args, flag", [
    (["--probe", "logistic"], "--probe"),  # masks are scored by ridge only
    (["--t", "5000"], "--t"),
    (["--keep", "0"], "--keep"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--layers", "up_blocks.9"], "up_blocks.9"),
])
def test_bad_options_name_their_flag(shapes_dir, tmp_path, capsys, args, flag):
    rc, err = run_cli([str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(tmp_path / "o"), *args],
                      capsys)
    assert rc == 2 and flag in err and "Traceback" not in err and err.count("\n") == 1


def test_noise_modes_clean_mode_and_a_variant_that_cannot_run_clean(shapes_dir, mini_pipe, tmp_path):
    import gate

    result = gate.sweep(str(shapes_dir / "train"), str(shapes_dir), pipe=mini_pipe, layers=["dift"], timesteps=[50],
                        ensemble=[1, 2], clean=True, n=4, min_images=4, n_boot=100,
                        variants={"plain": [], "late": ["denoise-from:100"]})
    assert not (tmp_path / "anything").exists()  # no `out`: nothing written
    ids = {row["config"] for row in result.table()}
    assert ids == {"plain/noise-x1/t50/up_blocks.1", "plain/noise-x2/t50/up_blocks.1", "plain/clean/t50/up_blocks.1",
                   "late/noise-x1/t50/up_blocks.1", "late/noise-x2/t50/up_blocks.1"}
    assert [s["group"] for s in result.skipped] == ["late/clean"] and "noise" in result.skipped[0]["reason"]
    clean = next(r for r in result.table() if r["noise"] == "clean")
    cfg = result.extract_config(clean)
    assert cfg["noise"] is False and cfg["ensemble"] == 1 and cfg["layers"] == ["up_blocks.1"]


def test_gate_sweep_stays_the_function_after_its_module_is_imported():
    import gate
    from gate.sweeping import add_sweep_command  # noqa: F401  (what gate.cli does)

    assert callable(gate.sweep) and gate.sweep.__name__ == "sweep"


def test_difffeat_sweep_is_gates_sweep_without_the_core_importing_gate():
    """`difffeat.sweep` comes through the `difffeat.api` entry point: the core names no gate module itself."""
    import difffeat
    import gate

    assert difffeat.sweep is gate.sweep
