"""One writer at a time: a lock file that a second process finds taken, with the holder's process id in it.

Two runs writing one store at once would each redo the other's work and report wrongly, so a writer takes
a lock first. Where the system has ``flock`` the operating system holds the lock and drops it when its
process dies, so a lock left by a killed run is simply taken over; elsewhere (or on file systems without
``flock``) the process id in the file decides: a lock whose process is gone is taken over.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from difffeat.errors import UserError
from difffeat.utils.atomic import cannot_write, write_failure

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


class FolderLock:
    """``with FolderLock(path, "the store DIR"):`` — or `acquire` / `release`. A second holder gets a
    UserError naming the lock file and the process that holds it."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        for _ in range(20):  # a free lock is taken at the first try; this bounds races with other takers
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise cannot_write(self.path.parent, f"the lock file {self.path.name}", write_failure(e)) from None
            if self._lock(fd) and self._still_there(fd):
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError as e:  # a full disk: the lock file, held by this process alone, goes with it
                    self.path.unlink(missing_ok=True)
                    os.close(fd)
                    raise cannot_write(self.path.parent, f"the lock file {self.path.name}", write_failure(e)) from None
                self.fd = fd
                return self
            os.close(fd)
        raise UserError(f"{self.path}: cannot take the lock of {self.what}")

    def _lock(self, fd: int) -> bool:
        """Lock `fd`; False when the lock file was swapped meanwhile (try again); UserError when it is held."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    self._refuse(_read_pid(fd))
                # no flock on this file system: the process id decides
        holder = _read_pid(fd)
        if holder and holder != os.getpid() and pid_alive(holder):
            self._refuse(holder)
        return True

    def _still_there(self, fd: int) -> bool:
        # The holder removes the file when it lets go: a lock taken on a removed file holds nothing.
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _refuse(self, holder: int | None) -> None:
        who = f"process {holder}" if holder else "another process"
        raise UserError(f"{self.path}: {self.what} is being written by {who} (difffeat); wait for it to finish or "
                        "stop it (a lock left by a process that is gone is taken over)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder: the lock, released below, is free for the next taker anyway
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a writer dropped without closing (a crash in a test) lets go of its lock too
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except (OSError, AttributeError):  # no pread on Windows
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 32).decode(errors="replace").strip()
        except OSError:
            return None
    return int(text) if text.isdigit() else None
