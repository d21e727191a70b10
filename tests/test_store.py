"""The feature store (sharded safetensors, manifest, resume, ranks) and the PCA pictures of features."""

import json
import os

import numpy as np
import pytest
import torch

from difffeat.errors import UserError
from difffeat.report.viz import pca_rgb, save_pca_image
from difffeat.store.feature_store import FeatureStore, FeatureStoreWriter, config_hash, store_exists, summarize

CONFIG = {"model": "mini", "layers": ["up.0", "mid"], "timesteps": [50], "seed": 0, "techniques": [],
          "resolution": 64, "ensemble": 1}
KEYS = [f"img/{i:03d}.png" for i in range(10)]


def features(key: str) -> dict[str, np.ndarray]:
    """Distinct, reproducible features per key; 'up.0' comes first although it sorts last."""
    rng = np.random.default_rng([ord(c) for c in key])
    return {"up.0": rng.normal(size=(4, 8, 8)).astype(np.float32),
            "mid": rng.normal(size=(6, 2, 2)).astype(np.float32)}


def write(path, keys=KEYS, config=CONFIG, **kwargs) -> None:
    with FeatureStoreWriter(path, config, **kwargs) as w:
        for k in keys:
            w.add(k, features(k))


def shard_files(path):
    return sorted(p.name for p in (path / "shards").iterdir())


def assert_same_content(a: FeatureStore, b: FeatureStore) -> None:
    assert a.keys() == b.keys()
    for k in a.keys():
        fa, fb = a[k], b[k]
        assert list(fa) == list(fb)
        for layer in fa:
            assert fa[layer].dtype == fb[layer].dtype
            assert np.array_equal(fa[layer], fb[layer])


def test_round_trip(tmp_path):
    path = tmp_path / "feats"
    shuffled = KEYS[5:] + KEYS[:5]
    write(path, shuffled, shard_size=4)
    assert shard_files(path) == [f"shard-r000-{i:06d}.safetensors" for i in range(3)]
    assert store_exists(path) and not store_exists(tmp_path)

    store = FeatureStore(path)
    assert len(store) == 10 and store.keys() == KEYS and list(store) == KEYS
    assert KEYS[3] in store and "nope" not in store
    assert store.layers == ["up.0", "mid"]
    assert store.shapes == {"up.0": (4, 8, 8), "mid": (6, 2, 2)}
    for k in KEYS:
        got, want = store[k], features(k)
        assert list(got) == ["up.0", "mid"]
        for layer in want:
            assert got[layer].dtype == np.float32 and np.array_equal(got[layer], want[layer])
    assert np.array_equal(store.stacked("mid"), np.stack([features(k)["mid"] for k in KEYS]))
    assert np.array_equal(store.stacked("up.0", KEYS[7:1:-2]), np.stack([features(k)["up.0"] for k in KEYS[7:1:-2]]))
    with pytest.raises(KeyError, match="nope"):
        store["nope"]

    m = store.manifest
    on_disk = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "difffeat-store/1" and m["config"] == CONFIG == on_disk["config"]
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    import hashlib

    assert m["config_hash"] == hashlib.sha256(canonical).hexdigest() == config_hash(CONFIG)
    assert m["versions"]["numpy"] == np.__version__ and m["versions"]["torch"] == torch.__version__
    assert set(m["versions"]) >= {"python", "diffusers", "transformers", "safetensors", "difffeat"}
    for name in ("model", "layers", "timesteps", "seed", "techniques", "resolution"):
        assert m[name] == CONFIG[name]
    assert "created" in m


def test_float16_and_torch_input(tmp_path):
    path = tmp_path / "f16"
    with FeatureStoreWriter(path, CONFIG, dtype="float16", shard_size=4) as w:
        for k in KEYS[:5]:
            w.add(k, {name: torch.from_numpy(a) for name, a in features(k).items()})
    store = FeatureStore(path)
    for k in KEYS[:5]:
        for layer, a in features(k).items():
            assert store[k][layer].dtype == np.float16
            assert np.array_equal(store[k][layer], a.astype(np.float16))
    with pytest.raises(UserError, match="dtype"):
        FeatureStoreWriter(tmp_path / "bad", CONFIG, dtype="int8")


def test_resume_after_crash_equals_one_go(tmp_path):
    path = tmp_path / "feats"
    w = FeatureStoreWriter(path, CONFIG, shard_size=2)
    for k in KEYS[:7]:
        w.add(k, features(k))
    del w  # a crash: the 7th image is buffered and must not be written
    assert len(FeatureStore(path)) == 6

    with pytest.raises(UserError, match="--resume"):
        FeatureStoreWriter(path, CONFIG, shard_size=2)
    with FeatureStoreWriter(path, CONFIG, shard_size=2, resume=True) as w:
        assert w.done_keys() == set(KEYS[:6])
        for k in KEYS:
            if k not in w.done_keys():
                w.add(k, features(k))
    assert shard_files(path)[-1] == "shard-r000-000004.safetensors"  # numbering went on after 000002

    write(tmp_path / "one-go", shard_size=3)
    assert_same_content(FeatureStore(path), FeatureStore(tmp_path / "one-go"))


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path):
    path = tmp_path / "feats"
    write(path, KEYS[:4], shard_size=2)
    tmp = path / "shards" / ".shard-r000-000002.safetensors.tmp-99999"
    tmp.write_bytes(b"half a shard")  # a write cut short
    store = FeatureStore(path)
    assert store.keys() == KEYS[:4]
    with FeatureStoreWriter(path, CONFIG, shard_size=2, resume=True) as w:
        assert w.done_keys() == set(KEYS[:4])
        assert not tmp.exists()
        for k in KEYS[4:6]:
            w.add(k, features(k))
    assert FeatureStore(path).keys() == KEYS[:6]


def test_refuses_other_runs_and_folders(tmp_path):
    path = tmp_path / "feats"
    write(path, KEYS[:3])
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    other = {**CONFIG, "seed": 1, "layers": ["mid"]}
    with pytest.raises(UserError, match=r"differs in: layers, seed.*--overwrite") as e:
        FeatureStoreWriter(path, other, resume=True)
    assert str(path) in str(e.value)
    with pytest.raises(UserError, match="--resume"):
        FeatureStoreWriter(path, CONFIG)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before

    (path / "notes.txt").write_text("mine")
    with FeatureStoreWriter(path, other, overwrite=True) as w:
        w.add(KEYS[9], features(KEYS[9]))
    store = FeatureStore(path)
    assert store.keys() == [KEYS[9]] and store.manifest["config"] == other
    assert (path / "notes.txt").read_text() == "mine"  # overwrite removes only the store's own files

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a difffeat feature store"):
            FeatureStoreWriter(foreign, CONFIG, overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["a.jpg"]
    with pytest.raises(UserError, match=r"photos: not a difffeat feature store \(no manifest.json\)"):
        FeatureStore(foreign)

    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, KEYS[:1])
    assert FeatureStore(empty).keys() == KEYS[:1]


def test_two_ranks_make_one_store(tmp_path):
    path = tmp_path / "feats"
    w0 = FeatureStoreWriter(path, CONFIG, shard_size=2, rank=0)
    w1 = FeatureStoreWriter(path, CONFIG, shard_size=2, rank=1)  # joins the store rank 0 just created
    for i, k in enumerate(KEYS):
        (w0 if i % 2 == 0 else w1).add(k, features(k))
    w0.close()
    w1.close()
    names = shard_files(path)
    assert any(n.startswith("shard-r000-") for n in names) and any(n.startswith("shard-r001-") for n in names)
    write(tmp_path / "single")
    assert_same_content(FeatureStore(path), FeatureStore(tmp_path / "single"))

    # A resumed run with any number of ranks sees what every rank has done.
    w2 = FeatureStoreWriter(path, CONFIG, rank=2, resume=True)
    assert w2.done_keys() == set(KEYS)


def test_failures_and_summary(tmp_path):
    path = tmp_path / "feats"
    with FeatureStoreWriter(path, CONFIG, rank=1) as w:
        w.add(KEYS[0], features(KEYS[0]))
        w.fail(KEYS[1], "cannot identify image file")
        assert json.loads((path / "failures-r001.jsonl").read_text()) == {
            "key": KEYS[1], "reason": "cannot identify image file"}  # on disk before close
    store = FeatureStore(path)
    assert store.failures == [{"key": KEYS[1], "reason": "cannot identify image file"}]

    text = summarize(store)
    assert "images:     1" in text
    assert "up.0" in text and "[4, 8, 8]" in text and "mid" in text and "float32" in text
    assert "failures:   1" in text and "cannot identify image file" in text
    assert '"mini"' in text


def test_exception_in_with_block_keeps_buffered_images(tmp_path):
    path = tmp_path / "feats"
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureStoreWriter(path, CONFIG, shard_size=100) as w:
            for k in KEYS[:3]:
                w.add(k, features(k))
            raise RuntimeError("boom")
    assert FeatureStore(path).keys() == KEYS[:3]


def test_read_only_folder(tmp_path):
    path = tmp_path / "feats"
    w = FeatureStoreWriter(path, CONFIG, shard_size=2)
    os.chmod(path / "shards", 0o555)
    try:
        if os.access(path / "shards", os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        w.add(KEYS[0], features(KEYS[0]))
        with pytest.raises(UserError, match="shards: cannot write feature shard"):
            w.add(KEYS[1], features(KEYS[1]))
        assert list((path / "shards").iterdir()) == []
    finally:
        os.chmod(path / "shards", 0o755)


def test_disk_full_leaves_no_partial_shard(tmp_path, monkeypatch):
    path = tmp_path / "feats"
    w = FeatureStoreWriter(path, CONFIG, shard_size=2)

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("difffeat.store.feature_store.os.replace", full)
    w.add(KEYS[0], features(KEYS[0]))
    with pytest.raises(UserError, match="No space left on device") as e:
        w.add(KEYS[1], features(KEYS[1]))
    assert str(path / "shards") in str(e.value)
    assert list((path / "shards").iterdir()) == []


def test_to_hf_dataset(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "feats"
    write(path, KEYS[:3], shard_size=2)
    ds = FeatureStore(path).to_hf_dataset(cache_dir=str(tmp_path / "hf")).with_format("numpy")
    assert len(ds) == 3 and ds.column_names == ["key", "up.0", "mid"]
    for row, k in zip(ds, KEYS[:3]):
        assert row["key"] == k
        for layer, a in features(k).items():
            assert row[layer].dtype == np.float32 and np.array_equal(row[layer], a)


# ------------------------------------------------------------------------------------------------ viz
def test_pca_rgb_recovers_a_linearly_embedded_image():
    rng = np.random.default_rng(0)
    # Three uncorrelated channels of variance 9, 4 and 1, so the principal axes are the channels, in order.
    pixels = rng.normal(size=(16 * 20, 3))
    q, _ = np.linalg.qr(pixels - pixels.mean(axis=0))
    image = (q * np.sqrt(16 * 20) * [3.0, 2.0, 1.0]).T.reshape(3, 16, 20)
    embed, _ = np.linalg.qr(rng.normal(size=(32, 3)))  # orthonormal columns: a linear, lossless embedding
    feats = np.einsum("cj,jhw->chw", embed, image) + 5.0

    out = pca_rgb(feats)
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    corr = np.corrcoef(out.reshape(-1, 3).T.astype(float), image.reshape(3, -1))[:3, 3:]
    assert np.abs(corr).max() > 0.9
    assert np.all(np.abs(np.diag(corr)) > 0.9)  # component j is channel j, ordered by variance
    assert out.min() == 0 and out.max() == 255

    assert np.array_equal(pca_rgb(feats), out)  # deterministic
    # Negated data has the same axes (the sign is fixed by the loadings, not by the SVD), so its
    # picture is the negative of this one.
    assert np.abs(pca_rgb(-feats).astype(int) - (255 - out.astype(int))).max() <= 1


def test_pca_rgb_list_shares_one_fit(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 5, 6)), rng.normal(size=(8, 3, 4))
    both = pca_rgb([a, b])
    assert isinstance(both, list) and [x.shape for x in both] == [(5, 6, 3), (3, 4, 3)]
    # One fit over both: the same as fitting on the maps laid side by side as one map.
    joined = np.concatenate([a.reshape(8, -1), b.reshape(8, -1)], axis=1)[:, None, :]
    single = pca_rgb(joined)[0]
    assert np.array_equal(np.concatenate([both[0].reshape(-1, 3), both[1].reshape(-1, 3)]), single)

    png = save_pca_image([a, b], tmp_path / "out" / "pca.png", scale=2)
    from PIL import Image

    picture = np.asarray(Image.open(png))
    assert picture.shape == (10, 12 + 2 + 8, 3)
    assert np.array_equal(picture[:10, :12], both[0].repeat(2, 0).repeat(2, 1))
    assert np.array_equal(picture[:6, 14:], both[1].repeat(2, 0).repeat(2, 1))


# ------------------------------------------------------------------------------------ integrity (#13)
def flip_bytes(file, offset_from_end: int = 200, n: int = 64) -> None:
    """Overwrite `n` bytes inside a shard's tensor data (the issue's "64 bytes overwritten")."""
    data = bytearray(file.read_bytes())
    start = len(data) - offset_from_end
    data[start:start + n] = bytes(255 - b for b in data[start:start + n])
    file.write_bytes(bytes(data))


def test_shards_carry_a_checksum_that_verify_checks(tmp_path):
    path = tmp_path / "feats"
    write(path, shard_size=4)
    store = FeatureStore(path)
    assert store.verify() == []
    assert "verified:   3 shard(s)" in summarize(store, verify=True)
    shard = path / "shards" / "shard-r000-000001.safetensors"
    flip_bytes(shard)
    damaged = FeatureStore(path).verify()
    assert damaged == [{"shard": "shards/shard-r000-000001.safetensors",
                        "reason": "checksum mismatch: its content changed after it was written"}]
    with pytest.raises(UserError, match=r"shard-r000-000001.safetensors: checksum mismatch"):
        summarize(FeatureStore(path), verify=True)


def test_resume_sets_a_damaged_shard_aside_and_extracts_its_images_again(tmp_path):
    path = tmp_path / "feats"
    write(path, KEYS[:8], shard_size=4)
    flip_bytes(path / "shards" / "shard-r000-000000.safetensors")
    with FeatureStoreWriter(path, CONFIG, shard_size=4, resume=True) as w:
        assert w.done_keys() == set(KEYS[4:8])
        assert w.notes[0]["shard"] == "shards/shard-r000-000000.safetensors"
        assert "checksum mismatch" in w.notes[0]["reason"] and "extracted again" in w.notes[0]["reason"]
        for k in KEYS:
            if k not in w.done_keys():
                w.add(k, features(k))
    assert (path / "shards" / "shard-r000-000000.safetensors.damaged").is_file()
    write(tmp_path / "one-go", shard_size=3)
    assert_same_content(FeatureStore(path), FeatureStore(tmp_path / "one-go"))
    assert FeatureStore(path).verify() == []


def test_manifest_config_is_checked_against_its_hash(tmp_path):
    path = tmp_path / "feats"
    write(path, KEYS[:2])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["seed"] = 7  # edited by hand: the features were not made with seed 7
    (path / "manifest.json").write_text(json.dumps(manifest))
    for open_it in (FeatureStore, lambda p: FeatureStoreWriter(p, {**CONFIG, "seed": 7}, resume=True)):
        with pytest.raises(UserError, match=r"manifest.json: its config does not match its config_hash"):
            open_it(path)


def test_a_store_of_an_older_difffeat_stays_readable_and_resumable(tmp_path):
    """Manifests without "kind", shards without checksum or input stamps: what earlier versions wrote."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "feats"
    write(path, KEYS[:4], shard_size=2)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["kind"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    for shard in (path / "shards").iterdir():
        tensors = load_file(shard)
        save_file(tensors, str(shard), metadata={"keys": json.dumps(KEYS[:2] if "000000" in shard.name else
                                                                     KEYS[2:4]), "layers": '["up.0", "mid"]'})
    store = FeatureStore(path)
    assert store.keys() == KEYS[:4] and store.verify() == []
    with FeatureStoreWriter(path, CONFIG, shard_size=2, resume=True) as w:
        assert w.done_keys() == set(KEYS[:4]) and w.stale_keys({k: (1, 2) for k in KEYS}) == {}
        for k in KEYS[4:]:
            w.add(k, features(k))
    write(tmp_path / "one-go")
    assert_same_content(FeatureStore(path), FeatureStore(tmp_path / "one-go"))


def test_changed_and_deleted_inputs_are_dropped_on_resume(tmp_path):
    path = tmp_path / "feats"
    stamps = {k: (100 + i, 10**18 + i) for i, k in enumerate(KEYS)}
    with FeatureStoreWriter(path, CONFIG, shard_size=3) as w:
        for k in KEYS[:7]:
            w.add(k, features(k), stamp=stamps[k])
    now = {**stamps, KEYS[1]: (100 + 1, 10**18 + 99)}  # KEYS[1] rewritten since
    del now[KEYS[4]]  # KEYS[4] deleted
    with FeatureStoreWriter(path, CONFIG, shard_size=3, resume=True) as w:
        stale = w.stale_keys(now)
        assert stale == {KEYS[1]: "its input changed since it was extracted", KEYS[4]: "its input is gone"}
        w.discard(stale)
        assert w.done_keys() == set(KEYS[:7]) - {KEYS[1], KEYS[4]}
        assert {n["key"] for n in w.notes} == {KEYS[1], KEYS[4]}
        assert all(n["reason"].endswith("its features were dropped") for n in w.notes)
        for k in KEYS:
            if k not in w.done_keys() and k in now:
                w.add(k, features(k), stamp=now[k])
    store = FeatureStore(path)
    assert store.keys() == [k for k in KEYS if k != KEYS[4]] and store.verify() == []
    for k in store.keys():
        assert np.array_equal(store[k]["mid"], features(k)["mid"])
        assert list(store[k]) == ["up.0", "mid"]


# ------------------------------------------------------------------------------- locks, modes (#13 14)
def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    path = tmp_path / "feats"
    first = FeatureStoreWriter(path, CONFIG, shard_size=2)
    first.add(KEYS[0], features(KEYS[0]))
    first.add(KEYS[1], features(KEYS[1]))
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".lock")}
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(UserError, match=rf"\.lock-r000: the feature store .* is being written by process "
                                            rf"{os.getpid()}"):
            FeatureStoreWriter(path, CONFIG, shard_size=2, **kwargs)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".lock")} == before
    first.close()
    assert not (path / ".lock-r000").exists()
    with FeatureStoreWriter(path, CONFIG, shard_size=2, resume=True) as w:
        assert w.done_keys() == set(KEYS[:2])


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "feats"
    write(path, KEYS[:2])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (path / ".lock-r000").write_text(dead.stdout)  # a run killed with -9 leaves its lock file behind
    with FeatureStoreWriter(path, CONFIG, resume=True) as w:
        assert (path / ".lock-r000").read_text().strip() == str(os.getpid())
        w.add(KEYS[2], features(KEYS[2]))
    assert FeatureStore(path).keys() == KEYS[:3] and not (path / ".lock-r000").exists()


def test_shards_are_as_readable_as_the_manifest(tmp_path):
    """safetensors creates its files 0600: a store written by one user must be readable as a whole by the
    people who can read its manifest (both follow the umask, as a plain open() does)."""
    path = tmp_path / "feats"
    write(path, KEYS[:2])
    umask = os.umask(0o022)
    os.umask(umask)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    shard = next((path / "shards").iterdir())
    assert mode(shard) == mode(path / "manifest.json") == 0o666 & ~umask


def test_disk_full_inside_safetensors_is_one_line_and_not_retried(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    path = tmp_path / "feats"
    calls = []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(b"half")  # what was written before the disk filled up
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    with pytest.raises(UserError) as e:
        with FeatureStoreWriter(path, CONFIG, shard_size=2) as w:
            monkeypatch.setattr("safetensors.numpy.save_file", full)
            for k in KEYS[:3]:
                w.add(k, features(k))
    assert str(e.value) == f"{path / 'shards'}: cannot write feature shard shard-r000-000000.safetensors " \
                           "(No space left on device)"
    assert len(calls) == 1  # no second try at close
    assert list((path / "shards").iterdir()) == [] and not (path / ".lock-r000").exists()
