"""Atomic file writes: a file appears whole or not at all (temp file in the same folder, then rename).

Every run output (store shards and manifests, reports, checkpoints, pictures) goes through here, so an
interrupted run never leaves a half-written file that looks complete, and every file gets the permissions a
plain ``open()`` would give it (0666 less the umask): some writers (safetensors) create their files 0600,
which would make a store or a run readable only in part by the people who can read the rest of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difffeat.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back at once
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # read once, at import: setting the umask is not thread-safe


@contextmanager
def atomic_path(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renamed onto `path` if the block succeeds.

    The temporary name keeps `path`'s suffix, so writers that choose a format by suffix still work. On
    any error the temporary file is removed; an OSError becomes a UserError naming the folder, `what` was
    being written (default the file name) and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if not tmp.is_dir():
            os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path.parent}: cannot write {what or path.name} ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj, default=None) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_atomic(path, json.dumps(obj, indent=1, default=default) + "\n")
