"""Atomic file writes: a file appears whole or not at all (temp file in the same folder, then rename).

Every run output (store shards and manifests, reports, checkpoints, pictures) goes through here, so an
interrupted run never leaves a half-written file that looks complete, and every file gets the permissions a
plain ``open()`` would give it (0666 less the umask): some writers (safetensors) create their files 0600,
which would make a store or a run readable only in part by the people who can read the rest of it.

A write that fails (a full disk, a folder gone read-only) is one `UserError` naming the folder, what was being
written and the system's reason, whichever library wrote: `write_failure` is the one rule that tells such a
failure from a bug, for these writers and for the lock files (`difffeat.utils.lock`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difffeat.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back at once
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # read once, at import: setting the umask is not thread-safe
# How safetensors words an I/O error in its own exception type: ``IoError(Os { code: 28, kind: StorageFull,
# message: "No space left on device" })``.
_SAFETENSORS_IO = re.compile(r'IoError\(.*message: "([^"]+)"', re.S)


def write_failure(e: BaseException) -> str | None:
    """The system's reason when `e` is a failed write (an OSError, or an I/O error that safetensors raises as its own
    `SafetensorError`, such as a full disk); None for any other error, which is a bug and keeps its traceback."""
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    if type(e).__name__ == "SafetensorError" and (m := _SAFETENSORS_IO.search(str(e))):
        return m[1]
    return None


def cannot_write(folder: str | os.PathLike, what: str, reason: str) -> UserError:
    """The one line a failed write ends in: the folder, what was being written, and the system's reason."""
    return UserError(f"{folder}: cannot write {what} ({reason})")


@contextmanager
def atomic_path(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; renamed onto `path` if the block succeeds.

    The temporary name keeps `path`'s suffix, so writers that choose a format by suffix still work. On
    any error the temporary file is removed; a failed write (`write_failure`: a full disk, whichever library
    wrote) becomes a UserError naming the folder, `what` was being written (default the file name) and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if not tmp.is_dir():
            os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        reason = write_failure(e)
        if reason is None:
            raise
        raise cannot_write(path.parent, what or path.name, reason) from None


def _remove(tmp: Path) -> None:
    """The temporary file (or folder) of a failed write, gone; a failure to remove it must not hide the write's."""
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj, default=None) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_atomic(path, json.dumps(obj, indent=1, default=default) + "\n")
