import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffeat.data.images import (
    IMAGE_SUFFIXES,
    BadImageError,
    ImageItem,
    discover_hf,
    discover_images,
    label_prompt,
    load_hf_image,
    load_image,
    read_caption_table,
    resize_image,
    sidecar_caption,
    to_rgb,
    to_tensor,
)
from difffeat.errors import UserError

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def rgb_image(w: int = 12, h: int = 8, colour=(10, 200, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR declaring width×height 8-bit RGB, and IEND: no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def close(pixel, expected, tol: int = 6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


# ------------------------------------------------------------------------------------------- discovery
@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    data = png_bytes(rgb_image())
    for rel in ["a.png", "B.JPG", "c.TiFf", "sub/d.webp", "sub/deeper/e.bmp", "z.jpeg",
                ".hidden.png", ".git/x.png", "sub/.cache/y.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)  # discovery goes by suffix; contents are not decoded
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "table.csv").write_text("a,b\n")
    (root / "sub" / "png").mkdir()  # a folder whose name looks like a suffix-less file
    (root / "broken.png").write_bytes(b"junk")  # listed here, reported when loaded
    return root


def test_discover_folder_recursive_sorted_skips_hidden_and_non_images(image_tree):
    items = discover_images(image_tree)
    keys = [item.key for item in items]
    assert keys == ["B.JPG", "a.png", "broken.png", "c.TiFf", "sub/d.webp", "sub/deeper/e.bmp", "z.jpeg"]
    assert all(item.path == image_tree / item.key and item.index is None for item in items)
    assert items[0] == ImageItem(key="B.JPG", path=image_tree / "B.JPG")


def test_discover_folder_not_recursive(image_tree):
    keys = [item.key for item in discover_images(str(image_tree), recursive=False)]
    assert keys == ["B.JPG", "a.png", "broken.png", "c.TiFf", "z.jpeg"]


def test_discover_glob_keys_relative_to_glob_root(image_tree):
    items = discover_images(f"{image_tree}/sub/**/*.*")
    assert [item.key for item in items] == ["d.webp", "deeper/e.bmp"]  # .cache and table.csv left out
    assert items[1].path == image_tree / "sub" / "deeper" / "e.bmp"
    assert [i.key for i in discover_images(f"{image_tree}/*.png")] == ["a.png", "broken.png"]


def test_discover_leaves_out_difffeat_outputs_and_excluded_folders(image_tree):
    """Issue #13 item 8: a store (or any run folder) inside the input folder is not an input, nor is `exclude`."""
    import json

    from difffeat.data.sources import ImageSource
    from difffeat.store.feature_store import FeatureStoreWriter

    FeatureStoreWriter(image_tree / "feats", {"model": "mini"}).close()
    (image_tree / "feats" / "pca.png").write_bytes(b"x")  # `viz … --out feats/pca.png`
    (image_tree / "gate").mkdir()
    (image_tree / "gate" / "config.json").write_text(json.dumps({"format": "difffeat-run/1", "kind": "gate"}))
    (image_tree / "gate" / "scores.png").write_bytes(b"x")
    (image_tree / "other").mkdir()  # a config.json that is not difffeat's: an ordinary folder
    (image_tree / "other" / "config.json").write_text('{"format": "theirs"}')
    (image_tree / "other" / "f.png").write_bytes(b"x")
    plain = ["B.JPG", "a.png", "broken.png", "c.TiFf", "other/f.png", "sub/d.webp", "sub/deeper/e.bmp", "z.jpeg"]
    assert [i.key for i in discover_images(image_tree)] == plain
    assert [i.key for i in discover_images(f"{image_tree}/**/*.png", recursive=True)] == \
        ["a.png", "broken.png", "other/f.png"]
    assert [i.key for i in discover_images(image_tree, exclude=[image_tree / "sub"])] == \
        [k for k in plain if not k.startswith("sub/")]
    assert [i.key for i in ImageSource(str(image_tree), exclude=[image_tree / "other"]).items] == \
        [k for k in plain if not k.startswith("other/")]
    # The folder the user names is read even when it is a run folder (extracting a sample folder's images).
    assert [i.key for i in discover_images(image_tree / "gate")] == ["scores.png"]


def test_imagefolder_tables_in_linked_folders_are_read_once(tmp_path):
    """An imagefolder (``metadata.csv`` tables) assembled from links: a table in a linked folder is read, as image
    discovery follows the same link, and a link back to a parent does not read any table twice."""
    from difffeat.data.sources import ImageSource

    root, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    for folder, name in ((root, "a.png"), (elsewhere / "more", "b.png")):
        folder.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(folder / name)
        (folder / "metadata.csv").write_text(f"file_name,label\n{name},x\n")
    (root / "extra").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "more" / "back").symlink_to(root, target_is_directory=True)
    source = ImageSource(str(root))
    assert [i.key for i in source.items] == ["a.png", "extra/more/b.png"]
    assert source.rows["extra/more/b.png"]["label"] == "x"


def test_source_stamps_are_size_and_mtime(image_tree):
    import os

    from difffeat.data.sources import ImageSource

    source = ImageSource(str(image_tree))
    st = os.stat(image_tree / "a.png")
    assert source.stamps()["a.png"] == (st.st_size, st.st_mtime_ns)
    (image_tree / "a.png").write_bytes(b"changed")
    assert source.stamp(source.items[1]) == (7, os.stat(image_tree / "a.png").st_mtime_ns)


def test_discover_single_file(image_tree):
    assert discover_images(image_tree / "sub" / "d.webp") == [ImageItem("d.webp", image_tree / "sub" / "d.webp")]
    with pytest.raises(UserError, match="notes.txt: not an image file"):
        discover_images(image_tree / "notes.txt")


def test_discover_errors_name_the_source(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: no such folder"):
        discover_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "a.png").write_bytes(b"x")
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"empty: no images found"):
        discover_images(empty)
    with pytest.raises(UserError, match=r"\*\.png: no images found .*match this pattern"):
        discover_images(f"{empty}/*.png")


def test_suffixes_are_the_documented_ones():
    assert IMAGE_SUFFIXES == (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt,suffix,lossy", [("PNG", ".png", False), ("JPEG", ".jpg", True),
                                              ("WEBP", ".webp", False), ("BMP", ".bmp", False),
                                              ("TIFF", ".tif", False)])
def test_each_format_loads_to_rgb(tmp_path, fmt, suffix, lossy):
    arr = np.zeros((10, 14, 3), np.uint8)
    arr[:, :7] = (200, 40, 90)
    arr[:, 7:] = (20, 160, 240)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (14, 10)
    got = np.asarray(img)
    if lossy:
        assert np.abs(got[2:8, 1:5].astype(int) - (200, 40, 90)).max() <= 8
    else:
        assert np.array_equal(got, arr)


def test_grayscale_l_and_la(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "l.png")
    assert np.all(np.asarray(load_image(tmp_path / "l.png")) == 77)
    la = Image.new("LA", (5, 4), (100, 255))
    la.putpixel((0, 0), (100, 0))  # fully transparent
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 1)) == (100, 100, 100)


def test_palette_and_palette_transparency(tmp_path):
    p = Image.new("P", (6, 6), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((2, 3), 1)
    p.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == RED and img.getpixel((2, 3)) == BLUE
    p.save(tmp_path / "pt.png", transparency=1)  # palette index 1 transparent
    img = load_image(tmp_path / "pt.png")
    assert img.getpixel((0, 0)) == RED and img.getpixel((2, 3)) == WHITE


def test_rgba_alpha_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black over white -> mid grey
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((3, 3)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in img.getpixel((1, 0)))


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB" and close(img.getpixel((8, 8)), RED, tol=10)


def test_16bit_png_scales_by_range_not_clipping(tmp_path):
    arr = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode == "I;16"
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and img.size == (4, 1)
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128,) * 3, (255,) * 3, (1, 1, 1)]


def test_to_rgb_other_modes():
    i32 = Image.fromarray(np.array([[-5, 0, 65535, 70000, 25700]], dtype=np.int32))
    assert i32.mode == "I"
    assert [to_rgb(i32).getpixel((x, 0))[0] for x in range(5)] == [0, 0, 255, 255, 100]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    assert [to_rgb(bw).getpixel((x, 0)) for x in range(2)] == [BLACK, WHITE]
    rgb = rgb_image()
    assert to_rgb(rgb) is rgb  # nothing to do: no copy


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), WHITE)
    img.paste(RED, (0, 0, 8, 8))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # width and height swapped
    assert close(out.getpixel((17, 2)), RED, tol=20)  # top-left turned clockwise lands top-right
    assert close(out.getpixel((2, 2)), WHITE, tol=20)
    assert close(out.getpixel((17, 37)), WHITE, tol=20)


def test_loaded_image_is_independent_of_the_file(tmp_path):
    path = tmp_path / "x.png"
    rgb_image(colour=GREEN).save(path)
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == GREEN and img.copy().size == (12, 8)


# ------------------------------------------------------------------------------------------- bad files
def assert_bad(path, reason_part: str, **kw) -> BadImageError:
    with pytest.raises(BadImageError) as info:
        load_image(path, **kw)
    err = info.value
    assert str(err).startswith(f"{path}: ") and "\n" not in str(err)
    assert reason_part in err.reason and str(err) == f"{err.path}: {err.reason}"
    assert Path(err.path) == Path(path)
    assert isinstance(err, UserError)
    return err


def test_bad_files_raise_clear_errors(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    assert_bad(tmp_path / "zero.png", "empty file (0 bytes)")
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    assert_bad(tmp_path / "text.png", "not an image (cannot identify format)")
    assert_bad(tmp_path / "missing.png", "no such file")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert_bad(tmp_path / "cut.png", "truncated or corrupt image data (")


def test_image_over_max_pixels_refused_before_decoding(tmp_path):
    rgb_image(100, 100).save(tmp_path / "big.png")
    err = assert_bad(tmp_path / "big.png", "image too large", max_pixels=5000)
    assert err.reason == "image too large: 100×100 pixels exceeds the limit of 5000 (possible decompression bomb)"
    assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)  # at the limit is fine


def test_declared_huge_png_is_a_bomb(tmp_path, recwarn):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 5_000))  # 10^8 px: Pillow only warns
    err = assert_bad(tmp_path / "bomb.png", "image too large")
    assert "20000×5000 pixels exceeds the limit of 64000000" in err.reason
    (tmp_path / "bomb2.png").write_bytes(png_header_only(100_000, 100_000))  # 10^10 px: Pillow refuses
    err = assert_bad(tmp_path / "bomb2.png", "possible decompression bomb")
    assert "10000000000 pixels exceeds the limit of 64000000" in err.reason
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # the global limit is left alone


def test_bad_image_error_pickles():
    err = pickle.loads(pickle.dumps(BadImageError("a/b.png", "empty file (0 bytes)")))
    assert (err.path, err.reason, str(err)) == ("a/b.png", "empty file (0 bytes)", "a/b.png: empty file (0 bytes)")


# -------------------------------------------------------------------------------------------- resizing
def three_bands(w: int = 40, h: int = 20) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 4] = RED
    arr[:, w // 4 : 3 * w // 4] = GREEN
    arr[:, 3 * w // 4 :] = BLUE
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["center-crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [(16, 16), (9, 31), (50, 7)])
def test_resize_gives_target_size(mode, size):
    out = resize_image(three_bands(), size, mode)
    assert out.size == (size[1], size[0]) and out.mode == "RGB"


def test_center_crop_keeps_the_centre():
    out = np.asarray(resize_image(three_bands(), (10, 10), "center-crop"))
    # Covering 10×10 scales 40×20 to 20×10; the kept middle half of the width is all green.
    assert tuple(out[5, 5]) == GREEN
    assert np.abs(out[:, 2:8].astype(int) - GREEN).max() <= 3


def test_pad_adds_black_borders():
    img = Image.new("RGB", (40, 20), WHITE)
    out = np.asarray(resize_image(img, (20, 20), "pad"))  # fits as 20×10, centred vertically
    assert np.all(out[:5] == 0) and np.all(out[15:] == 0)
    assert np.all(out[6:14] >= 250)
    tall = np.asarray(resize_image(Image.new("RGB", (10, 40), WHITE), (20, 20), "pad"))  # fits as 5×20
    assert np.all(tall[:, :7] == 0) and np.all(tall[:, 13:] == 0) and np.all(tall[:, 8:12] >= 250)


def test_stretch_ignores_aspect_ratio():
    out = np.asarray(resize_image(three_bands(), (20, 20), "stretch"))
    assert tuple(out[10, 1]) == RED and tuple(out[10, 10]) == GREEN and tuple(out[10, 18]) == BLUE


@pytest.mark.parametrize("mode", ["center-crop", "pad", "stretch"])
def test_resize_same_size_is_unchanged(mode):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    out = resize_image(img, (12, 20), mode)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_resize_unknown_mode():
    with pytest.raises(UserError, match="center-crop, pad, stretch"):
        resize_image(rgb_image(), (4, 4), "squash")


def test_to_tensor_values():
    import torch

    a = Image.new("RGB", (3, 2), (255, 0, 128))
    b = Image.new("RGB", (3, 2), (0, 51, 255))
    t = to_tensor([a, b])
    assert t.shape == (2, 3, 2, 3) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[0, :, 1, 2].tolist() == [1.0, 0.0, pytest.approx(128 / 255)]
    assert t[1, :, 0, 0].tolist() == [0.0, pytest.approx(0.2), 1.0]
    assert 0.0 <= t.min() and t.max() <= 1.0
    with pytest.raises(ValueError, match="differ in size"):
        to_tensor([a, Image.new("RGB", (2, 3))])
    with pytest.raises(ValueError):
        to_tensor([])


# -------------------------------------------------------------------------------------------- captions
def test_sidecar_caption(tmp_path):
    img = tmp_path / "cat.v2.png"
    rgb_image().save(img)
    assert sidecar_caption(img) is None
    (tmp_path / "cat.v2.txt").write_text("  a small red circle\n", encoding="utf-8")
    assert sidecar_caption(img) == "a small red circle"
    (tmp_path / "cat.v2.txt").write_text("\n")
    assert sidecar_caption(img) == ""


def test_read_caption_table(tmp_path):
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text('file_name,label,caption\nimages/0.png,circle,"a circle, red"\n./images/1.png,star,a star\n')
    assert read_caption_table(csv_path, "caption") == {"images/0.png": "a circle, red", "images/1.png": "a star"}
    assert read_caption_table(csv_path, "file_name", key_column="label")["star"] == "./images/1.png"
    with pytest.raises(UserError, match=r"metadata.csv: no column 'text' \(columns: file_name, label, caption\)"):
        read_caption_table(csv_path, "text")
    with pytest.raises(UserError, match="no column 'path'"):
        read_caption_table(csv_path, "caption", key_column="path")
    with pytest.raises(UserError, match="nothing.csv: no such file"):
        read_caption_table(tmp_path / "nothing.csv", "caption")


def test_label_prompt():
    assert label_prompt("a photo of a {label}", "star") == "a photo of a star"
    assert label_prompt("{label} {json: {}}", "x") == "x {json: {}}"
    with pytest.raises(UserError, match="no {label} placeholder"):
        label_prompt("a photo of a {}", "star")


# ------------------------------------------------------------------------------------ Hugging Face data
def test_hf_dataset_from_images():
    datasets = pytest.importorskip("datasets")
    rgba = Image.new("RGBA", (6, 4), (0, 0, 255, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    images = [rgb_image(6, 4, RED), Image.new("L", (5, 5), 40), rgba]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]}).cast_column("image", datasets.Image())
    items = discover_hf(ds)
    assert items == [ImageItem(key=f"{i:08d}", index=i) for i in range(3)]
    loaded = [load_hf_image(ds, item) for item in items]
    assert all(img.mode == "RGB" for img in loaded)
    assert loaded[0].getpixel((5, 3)) == RED
    assert loaded[1].size == (5, 5) and loaded[1].getpixel((2, 2)) == (40, 40, 40)
    assert loaded[2].getpixel((0, 0)) == WHITE and loaded[2].getpixel((3, 3)) == BLUE
    with pytest.raises(UserError, match=r"no column 'img' \(columns: image, label\)"):
        discover_hf(ds, image_column="img")


def test_hf_dataset_keys_from_files_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = []
    for rel, colour in [("cats/a.png", RED), ("dogs/b.png", GREEN)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb_image(colour=colour).save(tmp_path / rel)
        paths.append(str(tmp_path / rel))
    ds = datasets.Dataset.from_dict({"image": paths}, split="train").cast_column("image", datasets.Image())
    items = discover_hf(ds)
    assert [i.key for i in items] == ["train/cats/a.png", "train/dogs/b.png"]
    assert load_hf_image(ds, items[1]).getpixel((0, 0)) == GREEN


def test_hf_bad_row_names_the_key():
    datasets = pytest.importorskip("datasets")
    good = png_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 12, 3), dtype=np.uint8)))
    rows = [{"bytes": good, "path": None}, {"bytes": good[: len(good) // 2], "path": None},
            {"bytes": b"junk", "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    items = discover_hf(ds)
    assert load_hf_image(ds, items[0]).size == (12, 8)
    with pytest.raises(BadImageError, match=r"^00000001: truncated or corrupt"):
        load_hf_image(ds, items[1])
    with pytest.raises(BadImageError, match=r"^00000002: not an image"):
        load_hf_image(ds, items[2])
