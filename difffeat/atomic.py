"""Atomic file writes: a file appears whole or not at all (temp file in the same folder, then rename).

Every run output (store shards and manifests, reports, checkpoints, pictures) goes through here, so an
interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difffeat.errors import UserError


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
