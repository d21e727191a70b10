"""Writing a data set the way every synthesizer does: into a temporary folder inside its destination, then each
entry moved into place, so that a call cut short leaves either the earlier entry or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from difffeat.errors import UserError


@contextmanager
def staged(out: Path, name: str, what: str, owned: Collection[str] | None = None) -> Iterator[Path]:
    """A new temporary folder ``out/.NAME.tmp-PID`` to write into. When the block ends, each of its entries
    replaces the entry of the same name in `out` (what is there is the set's own: an earlier call cut short; a
    symbolic link is removed, never followed). `owned` lists the names the set may write: another is a bug of the
    writer. An `OSError` (a full disk) becomes one line naming `out` and `what`; the temporary folder never stays.
    """
    tmp = out / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        for entry in sorted(tmp.iterdir()):
            if owned is not None and entry.name not in owned:
                raise RuntimeError(f"{what} wrote {entry.name}, which it does not declare as its own")
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    except OSError as e:
        raise UserError(f"{out}: cannot write the {what} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
