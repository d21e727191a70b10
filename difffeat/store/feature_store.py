"""The feature store: what `difffeat extract` writes and every downstream tool reads.

A store is a folder holding the run's features, per image a dict layer → array ``[C, h, w]``::

    DIR/manifest.json                              run config, its hash and library versions (written once)
    DIR/shards/shard-r{rank:03d}-{index:06d}.safetensors   up to `shard_size` images each
    DIR/failures-r{rank:03d}.jsonl                 one {"key", "reason"} line per skipped input

In a shard the tensor ``f"{i}/{layer}"`` is layer `layer` of its i-th image; the shard's safetensors metadata holds
``"keys"`` (JSON list of image keys, in order), ``"layers"`` (JSON list of layer names in the order the caller gave
them, which safetensors itself does not keep), ``"stamps"`` (per image the [size, mtime_ns] of its input file when
it was read, or null), ``"sha256"`` (the shard's checksum, see `shard_digest`), ``"ranges"`` (per image {layer:
[min, max, mean]} of the values as stored, null for a layer holding a non-finite value: what readers check each
image against, see `FeatureStore.__getitem__`) and, when a technique captioned the images (`prompt:auto`),
``"captions"`` (per image {technique spec: caption}, or null). A shard is written to a temporary name and renamed,
so it exists whole or not at all: a reader or a resumed run learns what is done from shard headers alone, without
reading tensor data. Each process (rank) writes its own shards and failures file, so several processes can fill one
store; each holds the lock ``.lock-r{rank:03d}``, so two runs cannot fill one store at once.

The folder itself is a run folder of the spine (`difffeat.spine.run.RunFolder`): ownership, resume / overwrite
and "config differs" follow its rules; the manifest is its marker, in the store's own format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difffeat.errors import UserError
from difffeat.spine.run import STORE_FORMAT, RunFolder, canonical_json, config_hash, library_versions, mkdir
from difffeat.utils.atomic import atomic_path
from difffeat.utils.lock import FolderLock

__all__ = ["FeatureRangeWarning", "FeatureStore", "FeatureStoreWriter", "check_shard", "config_hash", "failure_files",
           "library_versions", "list_shards", "read_manifest", "shard_digest", "shard_keys", "store_exists",
           "summarize", "value_range"]
# config_hash and library_versions: from difffeat.spine.run, kept importable here

FORMAT = STORE_FORMAT
# The config fields that differ between the stores of one sharded extraction (each job a part): what a merge lets
# differ (difffeat.store.merge) and what a store's identity leaves out.
SHARDING_FIELDS = ("shard_index", "num_shards")
KIND = "feature store"
MANIFEST = "manifest.json"
SHARDS = "shards"
# Written first and removed last by `difffeat store merge` (`difffeat.store.merge`): a store holding it is a merge
# that has not finished (a killed one looks whole otherwise), which no reader accepts and `--resume` finishes.
MERGING = "merge-unfinished.json"
DTYPES = ("float32", "float16")
OPEN_SHARDS = 2  # shards a reader keeps open at once (`FeatureStore._handle`)
# Copied from the config to the top level of `FeatureStore.manifest`, where the API contract promises them.
MANIFEST_SHORTCUTS = ("model", "layers", "timesteps", "seed", "techniques", "variants", "resolution")
# What a store consists of besides its manifest (the runner's reports included): all that overwrite removes.
OWNED = (SHARDS, "failures-r*.jsonl", "report.json", "report-r*.json")

STRIPPED = ("no checksum, though the difffeat that wrote it gives every shard one: it was removed, so its content "
            "cannot be trusted")

_SHARD_RE = re.compile(r"shard-r(\d{3,})-(\d{6,})\.safetensors")
_FAILURES_RE = re.compile(r"failures-r(\d{3,})\.jsonl")


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:06d}.safetensors"


def failures_name(rank: int) -> str:
    return f"failures-r{rank:03d}.jsonl"


def store_exists(path: str | os.PathLike) -> bool:
    """Whether `path` holds a difffeat feature store (a folder with a difffeat manifest.json)."""
    try:
        _read_manifest(Path(path))
    except UserError:
        return False
    return True


# For tools that work on whole stores (`difffeat store merge`): the layout, read from headers alone.
def read_manifest(path: str | os.PathLike) -> dict:
    """The checked manifest of the store at `path` (UserError when it is not a store or was edited)."""
    return _read_manifest(Path(path))


def list_shards(path: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(rank, index, file) of every complete shard of the store at `path`, in name order."""
    return _list_shards(Path(path) / SHARDS)


def shard_keys(file: str | os.PathLike) -> list[str]:
    """The image keys of a shard file, in order, from its header alone."""
    return _shard_header(Path(file))[0]


def failure_files(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """(rank, file) of every failures file of the store at `path`."""
    found = [(int(m[1]), p) for p in Path(path).iterdir() if (m := _FAILURES_RE.fullmatch(p.name))]
    return sorted(found)


# --------------------------------------------------------------------------------------------- helpers
def _read_manifest(path: Path) -> dict:
    """The parsed manifest of the store at `path`; UserError when `path` is not a store, or when the manifest's
    config no longer matches its hash (an edited or damaged manifest describes features it did not make)."""
    file = path / MANIFEST
    if (path / MERGING).is_file():
        raise UserError(f"{path}: an unfinished store merge (it was interrupted; {MERGING} is still there), not a "
                        f"store yet: finish it with `difffeat store merge {path} STORE… --resume` (the same stores)")
    if not file.is_file():
        raise UserError(f"{path}: not a difffeat feature store (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a difffeat feature store ({MANIFEST} is not a {FORMAT} manifest)")
    config = manifest.get("config")
    if not isinstance(config, dict) or manifest.get("config_hash") != config_hash(config):
        raise UserError(f"{file}: its config does not match its config_hash (the manifest was edited or damaged); "
                        "the store's features cannot be trusted to match it")
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


def _shard_header(file: Path) -> tuple[list[str], list[str], list[str], list]:
    """(image keys, layer order, tensor names, input stamps) from a shard's header, reading no tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
        keys = json.loads(meta["keys"])
        layers = json.loads(meta.get("layers", "[]"))
        stamps = json.loads(meta["stamps"]) if "stamps" in meta else [None] * len(keys)
    except Exception as e:  # a damaged file: say which one, whatever safetensors raised
        raise UserError(f"{file}: unreadable feature shard ({_one_line(e)})") from None
    return keys, layers, names, stamps


def shard_digest(names: Iterable[str], get: Callable[[str], np.ndarray], metadata: Mapping[str, str]) -> str:
    """A shard's checksum: sha256 over its metadata (without the checksum itself) and, in name order, each
    tensor's name, dtype, shape and bytes. It does not depend on how safetensors lays the file out, so a
    reader recomputes it from what it reads; a changed byte anywhere it reads changes it."""
    h = hashlib.sha256(canonical_json({k: v for k, v in metadata.items() if k != "sha256"}).encode())
    for name in sorted(names):  # one tensor in memory at a time
        array = np.ascontiguousarray(get(name))
        h.update(canonical_json([name, array.dtype.str, list(array.shape)]).encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def check_shard(file: str | os.PathLike) -> str | None:
    """Why a shard cannot be trusted (unreadable, its content no longer matches its checksum, or its checksum was
    removed); None when it matches, or when it was written before shards carried checksums."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
            if "sha256" not in meta:
                # Shards carried checksums before they carried ranges: ranges without a checksum is a stripped one.
                return STRIPPED if "ranges" in meta else None
            digest = shard_digest(f.keys(), f.get_tensor, meta)
    except Exception as e:  # a damaged file, whatever safetensors raised
        return f"unreadable ({_one_line(e)})"
    if digest != meta["sha256"]:
        return "checksum mismatch: its content changed after it was written"
    return None


def _has_checksum(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        return "sha256" in (f.metadata() or {})


def value_range(array: np.ndarray) -> list[float] | None:
    """[min, max, mean] of one image's layer as stored (exact in the stored dtype, the mean summed in float64);
    None when it holds a non-finite value, which the heads refuse on their own."""
    low, high = array.min(), array.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    return [float(low), float(high), float(array.mean(dtype=np.float64))]


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def _io_reason(e: BaseException) -> str:
    """The system's words from a safetensors I/O error (``IoError(Os { …, message: "No space left" })``)."""
    m = re.search(r'message: "([^"]+)"', str(e))
    return m[1] if m else _one_line(e)


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


class _StoreFolder(RunFolder):
    """The store as a run folder: a store has started once it holds a shard or a failure record (a manifest
    alone is the store another process of this run just created, which this one may join)."""

    def started(self) -> bool:
        return bool(_list_shards(self.path / SHARDS)) or any(_FAILURES_RE.fullmatch(p.name)
                                                              for p in self.path.iterdir())


class FeatureStoreWriter:
    """Writes features of many images to a store, one shard per `shard_size` images; see the module doc.

    Opening a folder that holds a store of the same config (same `config_hash`) continues it when
    `resume` is set: `done_keys()` then says which images every rank has finished. A store of another
    config is never touched; `overwrite` replaces a store (only its own files). With several processes,
    give each its own `rank`; one of them should create or overwrite the store before the others open it
    (with `resume=True`), because a process that finds a store another one just started, with shards in
    it, refuses to join it without `resume`.

    A resumed store is checked first (by rank 0, which opens it first): a shard that no longer matches its
    checksum is set aside (renamed ``….damaged``) and its images count as not done; `stale_keys` and
    `discard` drop images whose input changed or went away. What was set aside or dropped is in `notes`.

    Use it as a context manager or call `close()`: buffered images are written only by `flush()`,
    `close()` or the end of a ``with`` block (also when the block raises, since every buffered image is
    complete). A writer dropped without closing writes nothing more, so a crashed run just redoes them.
    A shard that cannot be written (disk full) ends the writer: nothing more is written, not even at close.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any], *, shard_size: int = 256,
                 dtype: str = "float32", rank: int = 0, overwrite: bool = False, resume: bool = False):
        if dtype not in DTYPES:
            raise UserError(f"feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
        if rank < 0:
            raise ValueError(f"rank must be ≥ 0, got {rank}")
        if (Path(path) / MANIFEST).is_file() and not overwrite:
            _read_manifest(Path(path))  # a store to continue: its manifest must still match its own hash
        self.folder = _StoreFolder(path, KIND, config, resume=resume, overwrite=overwrite, owned=OWNED,
                                   marker=MANIFEST, ignore=(), format=FORMAT)
        self.path = self.folder.path
        self.config = self.folder.config  # as it reads back (tuples become lists)
        self.config_hash = self.folder.config_hash
        self.continuing = self.folder.continuing
        self.shard_size = shard_size
        self.dtype = dtype
        self.rank = rank
        self.notes: list[dict] = []  # shards set aside, images dropped: for the run's report
        # Per buffered image: (key, layer → array, input stamp, captions or None, placement or None).
        self._buffer: list[tuple[str, dict[str, np.ndarray], list[int] | None, dict | None, dict | None]] = []
        self._header_cache: dict[Path, tuple[list[str], list]] = {}
        self._closed = False
        self._broken = False
        # Taken before anything changes, so that a second run (even with overwrite) touches nothing.
        mkdir(self.path)
        self._lock = FolderLock(self.path / f".lock-r{rank:03d}", f"the feature store {self.path}").acquire()
        try:
            self.folder.create()
            self._remove_own_temp_files()
            mkdir(self.shards_dir)
            if self.continuing and rank == 0:
                self._set_aside_damaged_shards()
        except BaseException:
            self._lock.release()
            raise
        self._next_index = 1 + max((i for r, i, _ in _list_shards(self.shards_dir) if r == rank), default=-1)

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS

    @property
    def failures_file(self) -> Path:
        return self.path / failures_name(self.rank)

    def _remove_own_temp_files(self) -> None:
        # Only this rank's: another rank may be writing its own temporary file right now.
        prefix = f".shard-r{self.rank:03d}-"
        if self.shards_dir.is_dir():
            for p in self.shards_dir.iterdir():
                if p.name.startswith(prefix) and ".tmp" in p.name:
                    p.unlink(missing_ok=True)

    def _set_aside_damaged_shards(self) -> None:
        """Check every shard against its checksum before a resumed run trusts it; move the damaged ones aside."""
        for _, _, file in _list_shards(self.shards_dir):
            reason = check_shard(file)
            if reason is None:
                continue
            aside = file.with_name(file.name + ".damaged")
            try:
                os.replace(file, aside)
            except OSError as e:
                raise UserError(f"{file}: {reason}, and it cannot be set aside ({e.strerror or e})") from None
            self.notes.append({"shard": f"{SHARDS}/{file.name}",
                               "reason": f"{reason}; set aside as {aside.name}, its images are extracted again"})

    def _header(self, file: Path) -> tuple[list[str], list]:
        if file not in self._header_cache:  # a shard never changes once written (`discard` forgets it)
            keys, _, _, stamps = _shard_header(file)
            self._header_cache[file] = (keys, stamps)
        return self._header_cache[file]

    def done_keys(self) -> set[str]:
        """Keys of the images in complete shards of all ranks: what a resumed run may skip."""
        done: set[str] = set()
        for _, _, file in _list_shards(self.shards_dir):
            done.update(self._header(file)[0])
        return done

    def stale_keys(self, current: Mapping[str, Any]) -> dict[str, str]:
        """Done images whose input went away or changed since it was read: key → why.

        `current` maps every input key to its file's ``(size, mtime_ns)`` now (None when unknown, as for a
        data set row); a key missing from it was deleted. Images stored without a stamp are judged only by
        whether they are still there.
        """
        stale = {}
        for _, _, file in _list_shards(self.shards_dir):
            keys, stamps = self._header(file)
            for key, stamp in zip(keys, stamps):
                if key not in current:
                    stale[key] = "its input is gone"
                elif stamp is not None and current[key] is not None and list(current[key]) != list(stamp):
                    stale[key] = "its input changed since it was extracted"
        return stale

    def discard(self, keys: Mapping[str, str] | Iterable[str]) -> None:
        """Remove images from the store: each shard holding one is written again without it (and removed when
        nothing is left). `keys` may map each key to why; every dropped key is noted. Call it before other
        processes join the store."""
        reasons = dict(keys) if isinstance(keys, Mapping) else dict.fromkeys(keys, "discarded")
        if not reasons:
            return
        for _, _, file in _list_shards(self.shards_dir):
            if any(k in reasons for k in self._header(file)[0]):
                self._rewrite_without(file, reasons)
                self._header_cache.pop(file, None)
        self.notes += [{"key": k, "reason": f"{why}; its features were dropped"} for k, why in reasons.items()]

    def _rewrite_without(self, file: Path, drop: Mapping[str, str]) -> None:
        from safetensors import safe_open

        keys, _, names, stamps = _shard_header(file)
        keep = [i for i, k in enumerate(keys) if k not in drop]
        if not keep:
            file.unlink()
            return
        buffer = []
        with safe_open(str(file), framework="np") as f:
            order = json.loads((f.metadata() or {}).get("layers", "[]"))
            captions = json.loads((f.metadata() or {}).get("captions", "[]")) or [None] * len(keys)
            geometry = json.loads((f.metadata() or {}).get("geometry", "[]")) or [None] * len(keys)
            for i in keep:
                layers = sorted((n.partition("/")[2] for n in names if n.partition("/")[0] == str(i)),
                                key=lambda layer: order.index(layer) if layer in order else len(order))
                buffer.append((keys[i], {layer: f.get_tensor(f"{i}/{layer}") for layer in layers}, stamps[i],
                               captions[i], geometry[i]))
        self._write_shard(file, buffer)

    def add(self, key: str, features: Mapping[str, Any], stamp: tuple[int, int] | None = None,
            captions: Mapping[str, str] | None = None, placement: Mapping[str, Any] | None = None) -> None:
        """Buffer the features of image `key` (layer → [C, h, w] array or tensor); write a full shard.

        `stamp` is the input file's ``(size, mtime_ns)`` when it was read: a resumed run compares it with the
        file's now (`stale_keys`). `captions` are the image's captions by technique spec (`prompt:auto`), kept in
        the shard beside its features. `placement` is where the image lay in the frame the model saw (its own size
        and the box: `difffeat.data.geometry.Placement.to_dict`), None when it was that frame already."""
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
        self._buffer.append((str(key), arrays, None if stamp is None else [int(v) for v in stamp],
                             {str(k): str(v) for k, v in captions.items()} if captions else None,
                             dict(placement) if placement else None))
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
        if not self._buffer or self._broken:
            return
        final = self.shards_dir / shard_name(self.rank, self._next_index)
        try:
            self._write_shard(final, self._buffer)
        except UserError:
            self._broken = True  # the disk is full or gone: nothing more is tried, not even at close
            raise
        self._header_cache[final] = ([k for k, *_ in self._buffer], [s for _, _, s, *_ in self._buffer])
        self._buffer.clear()
        self._next_index += 1

    def _write_shard(self, final: Path,
                     images: list[tuple[str, dict[str, np.ndarray], list[int] | None, dict | None, dict | None]]
                     ) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        layers: dict[str, None] = {}  # ordered union of layer names, as the caller gave them
        for i, (_, arrays, *_) in enumerate(images):
            for layer, array in arrays.items():
                tensors[f"{i}/{layer}"] = array
                layers[layer] = None
        metadata = {"keys": json.dumps([k for k, *_ in images]), "layers": json.dumps(list(layers)),
                    "stamps": json.dumps([s for _, _, s, *_ in images]),
                    "ranges": json.dumps([{layer: value_range(a) for layer, a in arrays.items()}
                                          for _, arrays, *_ in images])}
        if any(c for *_, c, _ in images):  # stores without captions stay byte for byte as they were
            metadata["captions"] = json.dumps([c or None for *_, c, _ in images])
        if any(g for *_, g in images):  # likewise stores of images the model saw at their own size
            metadata["geometry"] = json.dumps([g or None for *_, g in images])
        metadata["sha256"] = shard_digest(tensors, tensors.__getitem__, metadata)
        try:
            with atomic_path(final, what=f"feature shard {final.name}") as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # safetensors' own I/O errors (a full disk) are not OSErrors
            raise UserError(f"{final.parent}: cannot write feature shard {final.name} ({_io_reason(e)})") from None

    def close(self) -> None:
        """Write what is buffered; the writer takes no more images and lets go of its lock."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()

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
        return False


# ---------------------------------------------------------------------------------------------- reader
class FeatureRangeWarning(UserWarning):
    """Features read from a store lie outside the range recorded when they were written (`FeatureStore`)."""


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
            keys, order, names, _ = _shard_header(file)
            per_image: dict[int, list[str]] = {}
            for name in names:
                i, _, layer = name.partition("/")
                per_image.setdefault(int(i), []).append(layer)
            rank = {layer: j for j, layer in enumerate(order)}
            for i, key in enumerate(keys):
                layers = sorted(per_image.get(i, []), key=lambda lay: (rank.get(lay, len(rank)), lay))
                self._index[key] = (file, i, layers)
        self._keys = sorted(self._index)
        # Open shards, least recently used first: at most OPEN_SHARDS stay open (each is memory-mapped, and the pages
        # read from it count in the process's memory until it is closed), so reading a large store keeps flat memory.
        self._handles: OrderedDict[Path, Any] = OrderedDict()
        self._captions: dict[Path, list] = {}  # per shard, read on first use
        self._geometry: dict[Path, list] = {}  # per shard, read on first use
        self._ranges: dict[Path, list] = {}  # per shard, read on first use
        self._flagged: set[str] = set()  # keys already warned about: one warning per key

    def _handle(self, file: Path):
        if file in self._handles:
            self._handles.move_to_end(file)
        else:
            while len(self._handles) >= OPEN_SHARDS:
                self._handles.popitem(last=False)
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
        """Features of image `key`, layer → [C, h, w] array in the stored dtype.

        Each layer is checked against the [min, max] recorded for it when it was written (`value_range`, in its
        shard's header): values outside it mean the shard was changed since (a checksum stripped and data edited,
        features scaled by 1e30), and one warning names the key, the layer and both ranges. The check reads
        nothing more than the features themselves; a change inside the range is the checksum's to find
        (`verify`)."""
        file, i, layers = self._locate(key)
        handle = self._handle(file)
        out = {layer: handle.get_tensor(f"{i}/{layer}") for layer in layers}
        self._check_range(key, file, i, out)
        return out

    def _recorded_ranges(self, file: Path, i: int) -> dict[str, list[float] | None]:
        if file not in self._ranges:
            self._ranges[file] = json.loads((self._handle(file).metadata() or {}).get("ranges", "[]"))
        found = self._ranges[file]
        return (found[i] or {}) if i < len(found) else {}

    def _check_range(self, key: str, file: Path, i: int, arrays: Mapping[str, np.ndarray]) -> None:
        if key in self._flagged:
            return
        recorded = self._recorded_ranges(file, i)
        for layer, array in arrays.items():
            bounds = recorded.get(layer)
            if bounds is None or array.size == 0:  # not recorded (an older store), or non-finite when written
                continue
            low, high = array.min(), array.max()
            if bounds[0] <= low and high <= bounds[1]:  # False for NaN too
                continue
            import warnings

            self._flagged.add(key)
            warnings.warn(
                f"{self.path}: the features of {key!r} lie outside the range recorded when they were extracted "
                f"(layer {layer}: recorded [{bounds[0]:.4g}, {bounds[1]:.4g}], read [{float(low):.4g}, "
                f"{float(high):.4g}]): {file.relative_to(self.path).as_posix()} was changed after it was written; "
                f"check it with `difffeat inspect {self.path} --verify` and extract the image again",
                FeatureRangeWarning, stacklevel=3)
            return

    def ranges(self) -> dict[str, dict[str, float]]:
        """Per layer, the range of the whole store as recorded at extraction: {"min", "max", "mean"} over every image
        written with a record (the mean is the mean of the images' means), from shard headers alone. Layers with
        no record (a store of an older difffeat, or only non-finite images) are left out."""
        low: dict[str, float] = {}
        high: dict[str, float] = {}
        means: dict[str, list[float]] = {}
        for file, i, _ in self._index.values():
            for layer, bounds in self._recorded_ranges(file, i).items():
                if bounds is None:
                    continue
                low[layer] = min(low.get(layer, bounds[0]), bounds[0])
                high[layer] = max(high.get(layer, bounds[1]), bounds[1])
                means.setdefault(layer, []).append(bounds[2])
        return {layer: {"min": low[layer], "max": high[layer], "mean": float(np.mean(means[layer]))}
                for layer in low}

    def entry(self, key: str) -> dict:
        """The per-image part of the manifest: shard file, position, each layer's shape and dtype, and the captions
        techniques gave the image (`captions`, only when any).

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
        entry = {"key": key, "shard": file.relative_to(self.path).as_posix(), "position": i, "layers": layer_info}
        if captions := self.captions(key):
            entry["captions"] = captions
        return entry

    def captions(self, key: str) -> dict[str, str]:
        """The captions image `key` got ({technique spec: caption}, from `prompt:auto`), read from its shard's header;
        {} when no technique captioned it."""
        file, i, _ = self._locate(key)
        if file not in self._captions:
            self._captions[file] = json.loads((self._handle(file).metadata() or {}).get("captions", "[]"))
        found = self._captions[file]
        return dict(found[i] or {}) if i < len(found) else {}

    def placement(self, key: str):
        """Where image `key` lay in the frame the model saw (`difffeat.data.geometry.Placement`): its own size and the
        resize / crop / pad box, from its shard's header; the frame itself for an image of that size (or a store made
        before placements were recorded)."""
        from difffeat.data.geometry import Placement, placement

        file, i, _ = self._locate(key)
        if file not in self._geometry:
            self._geometry[file] = json.loads((self._handle(file).metadata() or {}).get("geometry", "[]"))
        found = self._geometry[file]
        config = self.manifest.get("config", {})
        res = self.manifest.get("resolution") or config.get("resolution")
        frame = (int(res), int(res)) if isinstance(res, int) else (int(res[0]), int(res[1])) if res else None
        mode = str(config.get("resize", "center-crop"))
        record = found[i] if i < len(found) else None
        if record is None:
            return None if frame is None else placement(frame, frame, mode)
        got = placement(record["size"], frame, mode)
        return Placement(got.size, got.frame, mode, tuple(float(v) for v in record["box"]))

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
            file, i, _ = self._locate(key)
            self._check_range(key, file, i, {layer: array})
            out[n] = array
        return out

    def verify(self, progress: bool = False) -> list[dict]:
        """Every shard read in full and checked against its checksum: one {"shard", "reason"} per damaged one
        (shards of an older difffeat carry no checksum and count as sound). `progress` shows a bar over the
        shards (a big store is gigabytes to read)."""
        from tqdm.auto import tqdm

        damaged = []
        for _, _, file in tqdm(_list_shards(self.path / SHARDS), desc="verify", unit="shard", disable=not progress):
            reason = check_shard(file)
            if reason is not None:
                damaged.append({"shard": file.relative_to(self.path).as_posix(), "reason": reason})
        return damaged

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
        signature = hashlib.sha256(canonical_json(stamp).encode()).hexdigest()
        return datasets.Dataset.from_generator(
            _hf_rows, features=features, cache_dir=cache_dir,
            gen_kwargs={"path": str(self.path.resolve()), "layers": tuple(self.layers), "signature": signature},
        )


    def to_parquet(self, folder: str | os.PathLike, shard_rows: int | None = None,
                   progress: bool = False) -> list[Path]:
        """The store as Parquet files in `folder` (new or empty), for ``datasets.load_dataset("parquet",
        data_dir=folder)`` and ``push_to_hub``; see `difffeat.store.export.to_parquet` (`progress`: a bar)."""
        from difffeat.store.export import to_parquet

        return to_parquet(self, folder, shard_rows=shard_rows, progress=progress)


def _hf_rows(path: str, layers: tuple[str, ...], signature: str) -> Iterator[dict]:
    """Rows for `FeatureStore.to_hf_dataset` (module level so that datasets can hash it)."""
    del signature  # only part of the cache fingerprint
    store = FeatureStore(path)
    for key in store.keys():
        features = store[key]
        yield {"key": key, **{layer: features[layer] for layer in layers}}


def _run_lines(path: Path) -> list[str]:
    """Speed and peak memory of the run that wrote the store, from its report.json (none when it has none)."""
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(report, dict):
        return []
    speed, peak = report.get("images_per_second"), report.get("peak_memory_bytes")
    device = report.get("peak_device_memory_bytes")
    parts = [f"{speed:.1f} images/s" if isinstance(speed, (int, float)) else None,
             f"peak memory {_human_bytes(int(peak))}" if isinstance(peak, (int, float)) and peak else None,
             f"on the GPU {_human_bytes(int(device))}" if isinstance(device, (int, float)) and device else None,
             f"batch {report['batch_size']}" if isinstance(report.get("batch_size"), int) else None]
    parts = [p for p in parts if p]
    return [f"  last run:   {', '.join(parts)}"] if parts else []


def summarize(store: FeatureStore, max_failures: int = 5, verify: bool = False, progress: bool = False) -> str:
    """A few lines describing a store, for `difffeat inspect DIR`; with `verify` every shard is checked
    against its checksum first (`FeatureStore.verify`, with a bar when `progress`), and a damaged one is a
    UserError naming it."""
    if verify:
        damaged = store.verify(progress=progress)
        if damaged:
            more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
            raise UserError(f"{store.path / damaged[0]['shard']}: {damaged[0]['reason']}{more}")
    manifest = store.manifest
    lines = [f"feature store {store.path}", f"  images:     {len(store)}"]
    shapes, dtypes = store.shapes, store.dtypes
    if shapes:
        lines.append("  layers:")
        width = max(len(layer) for layer in shapes)
        ranges = store.ranges()
        for layer, shape in shapes.items():
            values = ""
            if layer in ranges:
                r = ranges[layer]
                values = f"  values [{r['min']:.4g}, {r['max']:.4g}], mean {r['mean']:.4g}"
            lines.append(f"    {layer:<{width}}  [{', '.join(map(str, shape))}]  {dtypes[layer]}{values}")
    else:
        lines.append("  layers:     (none yet)")
    lines.append(f"  size:       {_human_bytes(store.size_on_disk())}")
    lines += _run_lines(store.path)
    for name in ("model", "timesteps", "seed", "techniques", "variants", "resolution"):
        if name in manifest and (name != "variants" or manifest[name]):
            lines.append(f"  {name + ':':<11} {json.dumps(manifest[name])}")
    if "created" in manifest:
        lines.append(f"  created:    {manifest['created']}")
    first = store.keys()[0] if len(store) else None
    for spec, text in (store.captions(first) if first else {}).items():  # every image's: FeatureStore.captions
        lines.append(f"  captions:   {spec}, e.g. {first}: {json.dumps(text)}")
    failures = store.failures
    lines.append(f"  failures:   {len(failures)}")
    for record in failures[:max_failures]:
        lines.append(f"    {record['key']}: {record.get('reason', '')}")
    if len(failures) > max_failures:
        lines.append(f"    … and {len(failures) - max_failures} more")
    if verify:
        shards = [file for _, _, file in _list_shards(store.path / SHARDS)]
        unchecked = sum(1 for file in shards if not _has_checksum(file))
        line = f"  verified:   {len(shards) - unchecked} shard(s) match their checksums"
        if unchecked:
            line += f"; {unchecked} written before shards carried checksums could not be checked"
        lines.append(line)
    return "\n".join(lines)
