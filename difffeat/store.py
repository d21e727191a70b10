"""The feature store: what `difffeat extract` writes and every downstream tool reads.

A store is a folder holding the run's features, per image a dict layer → array ``[C, h, w]``::

    DIR/manifest.json                              run config, its hash and library versions (written once)
    DIR/shards/shard-r{rank:03d}-{index:06d}.safetensors   up to `shard_size` images each
    DIR/failures-r{rank:03d}.jsonl                 one {"key", "reason"} line per skipped input

In a shard the tensor ``f"{i}/{layer}"`` is layer `layer` of its i-th image; the shard's safetensors
metadata holds ``"keys"`` (JSON list of image keys, in order) and ``"layers"`` (JSON list of layer names
in the order the caller gave them, which safetensors itself does not keep). A shard is written to a
temporary name and renamed, so it exists whole or not at all: a reader or a resumed run learns what is
done from shard headers alone, without reading tensor data. Each process (rank) writes its own shards
and failures file, so several processes can fill one store with no locking.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difffeat.atomic import atomic_path, write_json_atomic
from difffeat.errors import UserError

FORMAT = "difffeat-store/1"
MANIFEST = "manifest.json"
SHARDS = "shards"
DTYPES = ("float32", "float16")
# Copied from the config to the top level of `FeatureStore.manifest`, where the API contract promises them.
MANIFEST_SHORTCUTS = ("model", "layers", "timesteps", "seed", "techniques", "variants", "resolution")
VERSIONED = ("torch", "diffusers", "transformers", "safetensors", "numpy", "difffeat")

_SHARD_RE = re.compile(r"shard-r(\d{3,})-(\d{6,})\.safetensors")
_FAILURES_RE = re.compile(r"failures-r(\d{3,})\.jsonl")


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:06d}.safetensors"


def failures_name(rank: int) -> str:
    return f"failures-r{rank:03d}.jsonl"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config`: equal configs hash equally whatever their key order."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the features ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def store_exists(path: str | os.PathLike) -> bool:
    """Whether `path` holds a difffeat feature store (a folder with a difffeat manifest.json)."""
    try:
        _read_manifest(Path(path))
    except UserError:
        return False
    return True


# --------------------------------------------------------------------------------------------- helpers
def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _read_manifest(path: Path) -> dict:
    """The parsed manifest of the store at `path`; UserError when `path` is not a store."""
    file = path / MANIFEST
    if not file.is_file():
        raise UserError(f"{path}: not a difffeat feature store (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a difffeat feature store ({MANIFEST} is not a {FORMAT} manifest)")
    return manifest


def _list_shards(shards: Path) -> list[tuple[int, int, Path]]:
    """(rank, index, path) of every complete shard, in name order; temporary files do not match."""
    if not shards.is_dir():
        return []
    found = []
    for p in shards.iterdir():
        m = _SHARD_RE.fullmatch(p.name)
        if m:
            found.append((int(m[1]), int(m[2]), p))
    return sorted(found, key=lambda s: s[2].name)


def _shard_header(file: Path) -> tuple[list[str], list[str], list[str]]:
    """(image keys, layer order, tensor names) from a shard's header, reading no tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
        keys = json.loads(meta["keys"])
        layers = json.loads(meta.get("layers", "[]"))
    except Exception as e:  # a damaged file: say which one, whatever safetensors raised
        raise UserError(f"{file}: unreadable feature shard ({e})") from None
    return keys, layers, names


def _to_numpy(value: Any, dtype: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; duck-typed so reading a store never imports torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return ""  # unreachable: the loop returns at TiB


# ---------------------------------------------------------------------------------------------- writer
class FeatureStoreWriter:
    """Writes features of many images to a store, one shard per `shard_size` images; see the module doc.

    Opening a folder that holds a store of the same config (same `config_hash`) continues it when
    `resume` is set: `done_keys()` then says which images every rank has finished. A store of another
    config is never touched; `overwrite` replaces a store (only its own files). With several processes,
    give each its own `rank`; one of them should create or overwrite the store before the others open it
    (with `resume=True`), because a process that finds a store another one just started, with shards in
    it, refuses to join it without `resume`.

    Use it as a context manager or call `close()`: buffered images are written only by `flush()`,
    `close()` or the end of a ``with`` block (also when the block raises, since every buffered image is
    complete). A writer dropped without closing writes nothing more, so a crashed run just redoes them.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *, shard_size: int = 256,
                 dtype: str = "float32", rank: int = 0, overwrite: bool = False, resume: bool = False):
        if dtype not in DTYPES:
            raise UserError(f"feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be ≥ 0, got {rank}")
        self.path = Path(path)
        self.config = json.loads(_canonical(dict(config)))  # as it will read back (tuples become lists)
        self.config_hash = config_hash(self.config)
        self.shard_size = shard_size
        self.dtype = dtype
        self.rank = rank
        self._buffer: list[tuple[str, dict[str, np.ndarray]]] = []
        self._header_cache: dict[Path, list[str]] = {}
        self._closed = False
        self._open(overwrite=overwrite, resume=resume)
        self._next_index = 1 + max((i for r, i, _ in _list_shards(self.shards_dir) if r == rank), default=-1)

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS

    @property
    def failures_file(self) -> Path:
        return self.path / failures_name(self.rank)

    def _open(self, *, overwrite: bool, resume: bool) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        if path.is_dir() and any(path.iterdir()):
            if not (path / MANIFEST).exists():
                raise UserError(f"{path}: folder is not empty and is not a difffeat feature store; "
                                "choose a new or empty folder")
            old = _read_manifest(path)  # refuses a foreign manifest.json, even with overwrite
            if overwrite:
                self._remove_store_files()
            elif old.get("config_hash") == self.config_hash:
                started = _list_shards(self.shards_dir) or any(_FAILURES_RE.fullmatch(p.name)
                                                                 for p in path.iterdir())
                # A store with nothing in it yet is the one this run (another rank of it) just created.
                if started and not resume:
                    raise UserError(f"{path}: a store of this run exists; pass --resume to continue it "
                                    "or --overwrite to replace it")
                self._remove_own_temp_files()
                self._mkdir(self.shards_dir)
                return
            else:
                old_cfg = old.get("config", {}) if isinstance(old.get("config"), dict) else {}
                differ = sorted(k for k in set(old_cfg) | set(self.config)
                                if _canonical(old_cfg.get(k)) != _canonical(self.config.get(k)))
                raise UserError(f"{path}: holds a store of a different run (config differs in: "
                                f"{', '.join(differ) or 'format'}); pass --overwrite to replace it or "
                                "choose another folder")
        self._mkdir(self.shards_dir)
        manifest = {
            "format": FORMAT,
            "config": self.config,
            "config_hash": self.config_hash,
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(path / MANIFEST, manifest)

    def _mkdir(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{folder}: cannot create folder ({e.strerror or e})") from None

    def _remove_store_files(self) -> None:
        """Delete what a store consists of (shards, manifest, failures files) and nothing else."""
        try:
            if self.shards_dir.exists():
                shutil.rmtree(self.shards_dir)
            for p in self.path.iterdir():
                if p.name == MANIFEST or _FAILURES_RE.fullmatch(p.name):
                    p.unlink()
        except OSError as e:
            raise UserError(f"{self.path}: cannot remove the old store ({e.strerror or e})") from None

    def _remove_own_temp_files(self) -> None:
        # Only this rank's: another rank may be writing its own temporary file right now.
        prefix = f".shard-r{self.rank:03d}-"
        if self.shards_dir.is_dir():
            for p in self.shards_dir.iterdir():
                if p.name.startswith(prefix) and ".tmp" in p.name:
                    p.unlink(missing_ok=True)

    def done_keys(self) -> set[str]:
        """Keys of the images in complete shards of all ranks: what a resumed run may skip."""
        done: set[str] = set()
        for _, _, file in _list_shards(self.shards_dir):
            if file not in self._header_cache:  # a shard never changes once written
                self._header_cache[file] = _shard_header(file)[0]
            done.update(self._header_cache[file])
        return done

    def add(self, key: str, features: Mapping[str, Any]) -> None:
        """Buffer the features of image `key` (layer → [C, h, w] array or tensor); write a full shard."""
        if self._closed:
            raise ValueError("add() on a closed FeatureStoreWriter")
        if not features:
            raise ValueError(f"{key}: no features given")
        arrays = {}
        for layer, value in features.items():
            array = _to_numpy(value, self.dtype)
            if array.ndim != 3:
                raise ValueError(f"{key}: layer {layer!r} has shape {array.shape}, expected [C, h, w]")
            arrays[str(layer)] = array
        self._buffer.append((str(key), arrays))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def fail(self, key: str, reason: str) -> None:
        """Record that input `key` was skipped and why (one JSON line, on disk at once)."""
        line = json.dumps({"key": str(key), "reason": str(reason)}) + "\n"
        try:
            with open(self.failures_file, "a") as f:
                f.write(line)
                f.flush()
        except OSError as e:
            raise UserError(f"{self.path}: cannot write {self.failures_file.name} ({e.strerror or e})") from None

    def flush(self) -> None:
        """Write the buffered images as one shard (smaller than `shard_size` if fewer are buffered)."""
        if not self._buffer:
            return
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        layers: dict[str, None] = {}  # ordered union of layer names, as the caller gave them
        for i, (_, arrays) in enumerate(self._buffer):
            for layer, array in arrays.items():
                tensors[f"{i}/{layer}"] = array
                layers[layer] = None
        metadata = {"keys": json.dumps([k for k, _ in self._buffer]), "layers": json.dumps(list(layers))}
        name = shard_name(self.rank, self._next_index)
        final = self.shards_dir / name
        with atomic_path(final, what=f"feature shard {name}") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self._header_cache[final] = [k for k, _ in self._buffer]
        self._buffer.clear()
        self._next_index += 1

    def close(self) -> None:
        """Write what is buffered; the writer takes no more images."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> FeatureStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            # Every buffered image is complete, so keep them; a failing flush must not hide the
            # original error (a resumed run redoes whatever was not written).
            with contextlib.suppress(UserError):
                self.close()
            self._closed = True
        return False


# ---------------------------------------------------------------------------------------------- reader
class FeatureStore:
    """Read access to a feature store: ``store[key]`` is a dict layer → ``[C, h, w]`` array.

    Only shard headers are read when the store is opened; tensors are read on demand, each shard opened
    once (memory-mapped) and kept. Keys are image paths relative to the input folder. Should two shards
    hold the same key (not in normal use), the shard whose file name sorts later wins.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._manifest = _read_manifest(self.path)
        self._index: dict[str, tuple[Path, int, list[str]]] = {}  # key → (shard, position, layers)
        for _, _, file in _list_shards(self.path / SHARDS):
            keys, order, names = _shard_header(file)
            per_image: dict[int, list[str]] = {}
            for name in names:
                i, _, layer = name.partition("/")
                per_image.setdefault(int(i), []).append(layer)
            rank = {layer: j for j, layer in enumerate(order)}
            for i, key in enumerate(keys):
                layers = sorted(per_image.get(i, []), key=lambda lay: (rank.get(lay, len(rank)), lay))
                self._index[key] = (file, i, layers)
        self._keys = sorted(self._index)
        self._handles: dict[Path, Any] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(file), framework="np")
        return self._handles[file]

    def _locate(self, key: str) -> tuple[Path, int, list[str]]:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the feature store {self.path}") from None

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """Image keys, sorted."""
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        """Features of image `key`, layer → [C, h, w] array in the stored dtype."""
        file, i, layers = self._locate(key)
        handle = self._handle(file)
        return {layer: handle.get_tensor(f"{i}/{layer}") for layer in layers}

    def entry(self, key: str) -> dict:
        """The per-image part of the manifest: shard file, position, and each layer's shape and dtype.

        It lives in the shard's own header rather than in manifest.json, so it is written atomically
        with the data it describes: a shard and its index can never disagree, even after a crash.
        """
        file, i, layers = self._locate(key)
        handle = self._handle(file)
        names = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64"}
        layer_info = {}
        for layer in layers:
            sl = handle.get_slice(f"{i}/{layer}")
            layer_info[layer] = {"shape": list(sl.get_shape()), "dtype": names.get(sl.get_dtype(), sl.get_dtype())}
        return {"key": key, "shard": file.relative_to(self.path).as_posix(), "position": i, "layers": layer_info}

    def _slice(self, key: str, layer: str):
        file, i, layers = self._locate(key)
        if layer not in layers:
            raise KeyError(f"{key!r} has no layer {layer!r} in {self.path}")
        return self._handle(file), f"{i}/{layer}"

    @property
    def layers(self) -> list[str]:
        """Layer names as the first image (in key order) stores them, in the order they were given."""
        return list(self._index[self._keys[0]][2]) if self._keys else []

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Layer → [C, h, w] shape of the first image, from the header alone."""
        out = {}
        for layer in self.layers:
            handle, name = self._slice(self._keys[0], layer)
            out[layer] = tuple(handle.get_slice(name).get_shape())
        return out

    @property
    def dtypes(self) -> dict[str, str]:
        """Layer → numpy dtype name of the first image, from the header alone."""
        names = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64"}
        out = {}
        for layer in self.layers:
            handle, name = self._slice(self._keys[0], layer)
            code = handle.get_slice(name).get_dtype()
            out[layer] = names.get(code, code)
        return out

    @property
    def manifest(self) -> dict:
        """manifest.json, plus model, layers, timesteps, seed, techniques, variants and resolution of its config."""
        manifest = dict(self._manifest)
        config = manifest.get("config")
        if isinstance(config, dict):
            for name in MANIFEST_SHORTCUTS:
                if name in config and name not in manifest:
                    manifest[name] = config[name]
        return manifest

    @property
    def failures(self) -> list[dict]:
        """Inputs that were skipped and are not in the store, with the reason (the latest, if retried)."""
        latest: dict[str, dict] = {}
        files = sorted(p for p in self.path.iterdir() if _FAILURES_RE.fullmatch(p.name))
        for file in files:
            for line in file.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if isinstance(record, dict) and "key" in record:
                    latest.pop(record["key"], None)  # keep the order of the latest record
                    latest[record["key"]] = record
        return [r for k, r in latest.items() if k not in self._index]

    def stacked(self, layer: str, keys: Iterable[str] | None = None) -> np.ndarray:
        """One layer of many images (all, in key order, by default) as one [N, C, h, w] array."""
        keys = self._keys if keys is None else list(keys)
        if not keys:
            raise ValueError("stacked() needs at least one key")
        out = None
        for n, key in enumerate(keys):
            handle, name = self._slice(key, layer)
            array = handle.get_tensor(name)
            if out is None:
                out = np.empty((len(keys), *array.shape), array.dtype)
            elif array.shape != out.shape[1:]:
                raise ValueError(f"{key!r}: layer {layer!r} has shape {array.shape}, others {out.shape[1:]}")
            out[n] = array
        return out

    def size_on_disk(self) -> int:
        """Bytes of every file in the store folder."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def to_hf_dataset(self, cache_dir: str | None = None):
        """A `datasets.Dataset` with a "key" column and one Array3D column per layer, in key order.

        Built from a generator into Arrow files (under `cache_dir` or the datasets cache), so memory
        stays bounded; the cache fingerprint covers the shard files, so a changed store is re-read.
        """
        import datasets

        shapes, dtypes = self.shapes, self.dtypes
        features = datasets.Features({"key": datasets.Value("string")})
        for layer in self.layers:
            features[layer] = datasets.Array3D(shape=shapes[layer], dtype=dtypes[layer])
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for _, _, p in _list_shards(self.path / SHARDS)]
        signature = hashlib.sha256(_canonical(stamp).encode()).hexdigest()
        return datasets.Dataset.from_generator(
            _hf_rows, features=features, cache_dir=cache_dir,
            gen_kwargs={"path": str(self.path.resolve()), "layers": tuple(self.layers), "signature": signature},
        )


def _hf_rows(path: str, layers: tuple[str, ...], signature: str) -> Iterator[dict]:
    """Rows for `FeatureStore.to_hf_dataset` (module level so that datasets can hash it)."""
    del signature  # only part of the cache fingerprint
    store = FeatureStore(path)
    for key in store.keys():
        features = store[key]
        yield {"key": key, **{layer: features[layer] for layer in layers}}


def summarize(store: FeatureStore, max_failures: int = 5) -> str:
    """A few lines describing a store, for `difffeat inspect DIR`."""
    manifest = store.manifest
    lines = [f"feature store {store.path}", f"  images:     {len(store)}"]
    shapes, dtypes = store.shapes, store.dtypes
    if shapes:
        lines.append("  layers:")
        width = max(len(layer) for layer in shapes)
        for layer, shape in shapes.items():
            lines.append(f"    {layer:<{width}}  [{', '.join(map(str, shape))}]  {dtypes[layer]}")
    else:
        lines.append("  layers:     (none yet)")
    lines.append(f"  size:       {_human_bytes(store.size_on_disk())}")
    for name in ("model", "timesteps", "seed", "techniques", "variants", "resolution"):
        if name in manifest and (name != "variants" or manifest[name]):
            lines.append(f"  {name + ':':<11} {json.dumps(manifest[name])}")
    if "created" in manifest:
        lines.append(f"  created:    {manifest['created']}")
    failures = store.failures
    lines.append(f"  failures:   {len(failures)}")
    for record in failures[:max_failures]:
        lines.append(f"    {record['key']}: {record.get('reason', '')}")
    if len(failures) > max_failures:
        lines.append(f"    … and {len(failures) - max_failures} more")
    return "\n".join(lines)
