"""`difffeat viz`: the comparison grid (input | one PCA column per variant, layer and t) and its command."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from difffeat.cli import main
from difffeat.errors import UserError
from difffeat.report.viz import (
    choose_columns,
    comparison_grid,
    cosine_map,
    input_image,
    pca_rgb,
    render_grid,
    store_columns,
)
from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter

KEYS = ["a.png", "sub/b.png", "c.png"]  # c.png has no file: its input tile is grey


def make_store(root, *, timesteps=(0, 50), variants=("plain", "canny"), layers=("up_blocks.1", "mid_block"),
               n_keys=3, resolution=(16, 16)):
    """A store as `extract --variant … --t …` writes it, over real input PNGs (all but the last key)."""
    images = root / "images"
    rng = np.random.default_rng(0)
    for key in KEYS[: n_keys - 1]:
        (images / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*resolution, 3), dtype=np.uint8)).save(images / key)
    config = {"images": str(images), "layers": list(layers), "timesteps": list(timesteps),
              "variants": {v: ([] if v == "plain" else ["controlnet:canny"]) for v in variants},
              "resolution": list(resolution), "resize": "center-crop", "noise": True, "model": "mini"}
    channels = {"up_blocks.1": 8, "mid_block": 12}
    sizes = {"up_blocks.1": 4, "mid_block": 2}
    arrays = {}
    with FeatureStoreWriter(root / "store", config) as w:
        for key in KEYS[:n_keys]:
            feats = {}
            for t in timesteps:
                for v in variants:
                    for layer in layers:
                        name = f"{v}/{layer}" + (f"@{t}" if len(timesteps) > 1 else "")
                        feats[name] = rng.normal(size=(channels[layer], sizes[layer], sizes[layer])).astype(np.float32)
            w.add(key, feats)
            arrays[key] = feats
    return root / "store", arrays


def test_columns_parse_variant_layer_and_t(tmp_path):
    path, _ = make_store(tmp_path)
    columns = store_columns(FeatureStore(path))
    got = {(c.variant, c.layer, c.t) for c in columns}
    assert got == {(v, layer, t) for v in ("plain", "canny") for layer in ("up_blocks.1", "mid_block") for t in (0, 50)}
    c = next(c for c in columns if c.key == "canny/mid_block@50")
    assert (c.variant, c.layer, c.t) == ("canny", "mid_block", 50) and c.title == "canny\nmid_block\nt = 50"

    # A one-timestep store without variants: plain layer names, t from the manifest.
    single, _ = make_store(tmp_path / "single", timesteps=(50,), variants=("plain",), layers=("up_blocks.1",))
    store = FeatureStore(single)
    assert [(c.key, c.variant, c.layer, c.t) for c in store_columns(store)] == [
        ("plain/up_blocks.1", "plain", "up_blocks.1", 50)]


def test_choose_columns_by_variant_and_layer(tmp_path):
    path, _ = make_store(tmp_path)
    columns = store_columns(FeatureStore(path))
    keys = [c.key for c in choose_columns(columns, variants=["canny,plain"], layers=["up_blocks.1@50"])]
    assert keys == ["canny/up_blocks.1@50", "plain/up_blocks.1@50"]  # in the order asked for
    keys = [c.key for c in choose_columns(columns, layers=["mid_block"])]  # a bare layer: every t, every variant
    assert keys == ["plain/mid_block@0", "plain/mid_block@50", "canny/mid_block@0", "canny/mid_block@50"]
    # default: everything, the plain (no technique) variant first, each layer's timesteps side by side
    keys = [c.key for c in choose_columns(columns, baseline=("plain",))]
    assert keys[:4] == ["plain/up_blocks.1@0", "plain/up_blocks.1@50", "plain/mid_block@0", "plain/mid_block@50"]
    with pytest.raises(UserError, match="no variant 'lora'.*plain"):
        choose_columns(columns, variants=["lora"])
    with pytest.raises(UserError, match="no layer 'down_blocks.0'.*mid_block@0"):
        choose_columns(columns, layers=["down_blocks.0"])


def test_grid_shares_one_pca_per_layer_and_computes_cosine_to_clean(tmp_path):
    path, arrays = make_store(tmp_path)
    store = FeatureStore(path)
    grid = comparison_grid(store, n=3, layers=["up_blocks.1"])
    assert [c.key for c in grid.columns] == ["plain/up_blocks.1@0", "plain/up_blocks.1@50", "canny/up_blocks.1@0",
                                             "canny/up_blocks.1@50"]
    # One basis for every column of the layer: the tiles equal one pca_rgb over all of their maps.
    assert grid.keys == sorted(KEYS)
    maps = [arrays[k][c.key] for c in grid.columns for k in grid.keys]
    expected = pca_rgb(maps)
    got = [tile for column in grid.tiles for tile in column]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # Cosine to the same variant's t = 0 features, per image: an independent computation over unit vectors.
    col = grid.columns.index(next(c for c in grid.columns if c.key == "canny/up_blocks.1@50"))
    for i, key in enumerate(grid.keys):
        a, b = arrays[key]["canny/up_blocks.1@50"], arrays[key]["canny/up_blocks.1@0"]
        ua = a / np.linalg.norm(a, axis=0, keepdims=True)
        ub = b / np.linalg.norm(b, axis=0, keepdims=True)
        assert grid.cosine[col][i] == pytest.approx(float((ua * ub).sum(0).mean()), rel=1e-6)
    assert grid.cosine[0] is None  # a t = 0 column has nothing to compare with
    assert np.allclose(cosine_map(a, a), 1.0)
    # Inputs: the files as the extraction saw them, a missing one noted.
    assert np.array_equal(grid.inputs[0], np.asarray(Image.open(tmp_path / "images" / "a.png")))
    assert grid.inputs[1] is None and grid.notes[1] == "input image missing"  # c.png


def test_input_found_beside_the_store_when_the_run_used_a_relative_path(tmp_path, monkeypatch):
    path, _ = make_store(tmp_path)
    store = FeatureStore(path)
    store._manifest["config"]["images"] = "images"  # relative to where extract ran: here the store's parent
    monkeypatch.chdir(tmp_path / "images")  # the working folder no longer holds it
    image, why = input_image(store, "a.png", (16, 16))
    assert image is not None and why == ""
    # A key that points outside the input folder is never followed.
    image, why = input_image(store, "../store/manifest.json", None)
    assert image is None and why == "input image missing"


def test_render_grid_is_an_rgb_png_that_grows_with_rows_and_columns(tmp_path):
    path, _ = make_store(tmp_path)
    store = FeatureStore(path)
    def picture(**kw):
        return Image.open(io.BytesIO(render_grid(comparison_grid(store, layers=["up_blocks.1@50"], **kw))))

    one, two = picture(n=2, variants=["plain"], cosine=False), picture(n=3, cosine=False)
    assert one.mode == two.mode == "RGB"
    assert two.size[0] > one.size[0] and two.size[1] > one.size[1]
    # The cosine to t = 0 adds a last row of means.
    three = picture(n=3, cosine=True)
    assert three.size[0] == two.size[0] and three.size[1] > two.size[1]


def test_viz_command(tmp_path, capsys):
    path, _ = make_store(tmp_path)
    out = tmp_path / "pics" / "grid.png"
    assert main(["viz", str(path), "--out", str(out), "--variants", "plain,canny", "--layers", "up_blocks.1"]) == 0
    assert Image.open(out).mode == "RGB"
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "plain/up_blocks.1@0 | plain/up_blocks.1@50" in said and "peak memory" in said
    assert "1 input(s) not found" in said
    # The picture is never replaced unless asked.
    assert main(["viz", str(path), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["viz", str(path), "--out", str(out), "--overwrite", "--layer", "mid_block@50", "--n", "1"]) == 0
    # Bad input: one line naming the flag or the store, no traceback.
    for argv, message in [(["--n", "0"], "--n: must be ≥ 1"), (["--scale", "0"], "--scale: must be ≥ 1"),
                          (["--variants", "lora"], "no variant 'lora'"), (["--keys", "zzz.png"], "no image 'zzz.png'"),
                          (["--out", str(tmp_path / "x.jpg")], "--out: must be a .png")]:
        args = ["viz", str(path), "--out", str(tmp_path / "bad.png"), *argv]
        if "--out" in argv:
            args = ["viz", str(path), *argv]
        assert main(args) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "bad.png").exists()


def test_viz_of_an_empty_store_and_of_a_folder_that_is_no_store(tmp_path, capsys):
    with FeatureStoreWriter(tmp_path / "empty", {"images": str(tmp_path)}):
        pass
    assert main(["viz", str(tmp_path / "empty"), "--out", str(tmp_path / "e.png")]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert main(["viz", str(tmp_path / "nothing"), "--out", str(tmp_path / "e.png")]) == 2
    assert "not a difffeat feature store" in capsys.readouterr().err
