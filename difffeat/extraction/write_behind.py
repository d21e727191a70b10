"""Store writes on a background thread, so the model never waits on the disk.

`WriteBehind` takes whole batches of features from the extraction loop and hands them, in order, to a
`FeatureStoreWriter` running on one thread of its own. The queue between them is bounded (`max_pending`
batches), so memory stays flat when the disk is slower than the model: the loop then waits, and that
wait is what the run's time split calls "write". Converting features to numpy, checksumming and writing
shards release the GIL for most of their time, which is what lets them overlap the model.

Nothing changes in what is written, or when a shard counts as done: the writer is the same, only on
another thread. An error in the thread (disk full) stops it; the loop sees that error, the very same
exception, at its next hand-over or at `close`. A run that is killed loses at most the queued batches,
which a resumed run extracts again, as it would have without the thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from difffeat.utils.measure import NullTimer

_STOP = object()


class WriteBehind:
    """``add(keys, features, stamps)`` / ``fail(key, reason)`` now, written by `writer` later (or at once with
    ``threaded=False``); `close` waits for everything to be written and raises the thread's error, if any.
    `timer` receives "write" (time the loop waited) and "write_busy" (time the thread spent writing)."""

    def __init__(self, writer, threaded: bool = True, max_pending: int = 2, timer=None):
        self.writer = writer
        self.timer = timer or NullTimer()
        self.threaded = threaded
        self.error: BaseException | None = None
        self._raised = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._work, name="difffeat-store-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------- the thread
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self.error is not None:
                continue  # keep taking jobs so that the loop never blocks on a full queue; write nothing more
            try:
                self._do(job)
            except BaseException as e:  # handed to the loop, which raises it
                self.error = e

    def _do(self, job: tuple) -> None:
        t0 = time.perf_counter()
        if job[0] == "add":
            _, keys, features, stamps, captions, placements = job
            for row, key in enumerate(keys):
                extra = {"captions": captions[row]} if captions[row] else {}  # writers without captions work on
                if placements[row]:
                    extra["placement"] = placements[row]
                self.writer.add(key, {name: f[row] for name, f in features.items()}, stamp=stamps[row], **extra)
        elif job[0] == "fail":
            _, key, reason = job
            self.writer.fail(key, reason)
        else:  # the last, partial shard, written here too rather than by the loop
            self.writer.flush()
        self.timer.add("write_busy", time.perf_counter() - t0)

    # --------------------------------------------------------------------------------------- the loop
    def _raise_error(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True
            raise self.error

    def _submit(self, job: tuple) -> None:
        self._raise_error()
        t0 = time.perf_counter()
        if self.threaded:
            self._queue.put(job)
        else:
            self._do(job)
        self.timer.add("write", time.perf_counter() - t0)

    def add(self, keys: Sequence[str], features: Mapping[str, Any], stamps: Sequence | None = None,
            captions: Sequence[Mapping[str, str] | None] | None = None,
            placements: Sequence[Mapping | None] | None = None) -> None:
        """Features of a batch: `features` maps each stored name to a [B, …] tensor whose row i is `keys[i]`'s;
        `captions`, per image, those techniques gave it, and `placements` where it lay in the frame
        (`FeatureStoreWriter.add`).
        The tensors must not be changed afterwards (the thread reads them later)."""
        self._submit(("add", list(keys), dict(features), list(stamps) if stamps else [None] * len(keys),
                      list(captions) if captions else [None] * len(keys),
                      list(placements) if placements else [None] * len(keys)))

    def fail(self, key: str, reason: str) -> None:
        """Record a skipped input (in order with the batches)."""
        self._submit(("fail", key, reason))

    def close(self) -> None:
        """Write what is buffered as a shard and wait until every handed-over batch is written (or the thread has
        failed), then raise its error."""
        try:
            if self.error is None:
                self._submit(("flush",))
        finally:
            if self._thread is not None:
                t0 = time.perf_counter()
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None
                self.timer.add("write", time.perf_counter() - t0)
        self._raise_error()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif self._thread is not None:  # already failing: let the thread finish what it has, keep the first error
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        return False
