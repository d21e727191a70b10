"""Decoding an extraction's inputs: batches of resized images with their prompts, ready for the model.

Decoding (PNG/JPEG → RGB → resize → tensor) and reading caption sidecars cost CPU time that the model
does not need to wait for: with ``workers > 0`` whole batches are decoded in DataLoader worker processes
while the model runs, and on CUDA they arrive in pinned (page-locked) memory, so the copy to the GPU can
run asynchronously. With ``workers == 0`` the same function runs in the calling process: on a thread of its
own that decodes the next batches while the model works (``thread=True``), or batch by batch.
Either way a batch holds exactly the same tensor, so features never depend on the choice.

A bad image (undecodable, or missing what a technique needs) is not an error here: the batch lists it in
`failed` with the reason, and the run records it and goes on. A mistake that must stop the run (a prompt
column missing from the metadata) is carried back as text and raised in the main process, so the user
sees one line, not a worker traceback.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from difffeat.data.images import ImageItem

PREFETCH = 2  # decoded batches that may wait for the model (memory stays flat)
_END = object()


@dataclass
class Batch:
    """One chunk of inputs, decoded: the images that worked, in input order, and those that did not."""

    items: list[ImageItem]
    pixels: Any  # [B, 3, H, W] float32 in [0, 1] (a torch tensor), None when every image failed
    texts: list[str]
    fields: list[dict]
    stamps: list
    sizes: list = field(default_factory=list)  # each decoded image's own (height, width), before the resize
    failed: list[tuple[ImageItem, str]] = field(default_factory=list)
    size: int = 0  # inputs in the chunk, decoded or not
    decode_seconds: float = 0.0  # time spent decoding this chunk (in a worker: not time the model waited)
    error: str | None = None  # a mistake that stops the run, raised by the consumer

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def decode_chunk(source, prompts, chunk: Sequence[ImageItem], resolution: tuple[int, int], resize: str) -> Batch:
    """Load, resize and prompt every item of `chunk` (see the module doc)."""
    from difffeat.data.images import BadImageError, resize_image, to_tensor
    from difffeat.errors import UserError

    t0 = time.perf_counter()
    batch = Batch(items=[], pixels=None, texts=[], fields=[], stamps=[], size=len(chunk))
    images = []
    for item in chunk:
        try:
            loaded = source.load(item)
            image = resize_image(loaded, resolution, resize)
            text, item_fields = prompts(item), prompts.fields(item)
        except BadImageError as e:
            batch.failed.append((item, e.reason))
            continue
        except UserError as e:  # the run's own mistake: every image would fail alike
            batch.error = str(e)
            break
        images.append(image)
        batch.items.append(item)
        batch.texts.append(text)
        batch.fields.append(item_fields)
        batch.stamps.append(source.stamp(item))
        batch.sizes.append((loaded.height, loaded.width))
    if images and batch.error is None:
        batch.pixels = to_tensor(images)
    batch.decode_seconds = time.perf_counter() - t0
    return batch


class _Chunks:
    """A map-style dataset whose i-th element is the decoded i-th chunk (one DataLoader worker decodes it)."""

    def __init__(self, decode: Callable[[int], Batch], n: int):
        self.decode, self.n = decode, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Batch:
        return self.decode(i)


def _whole(batch: Batch) -> Batch:  # the DataLoader's collate_fn: a chunk is already a batch
    return batch


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding is PIL and numpy; torch threads in every worker would only compete


def default_workers(device) -> int:
    """Decoding workers when the run does not say: on CUDA, up to 4 (a GPU outpaces one decoding core); on
    the CPU none, since workers there take cores from the model itself (measured: docs/scale.md)."""
    if not str(device).startswith("cuda"):
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class BatchLoader:
    """Iterates over decoded `Batch`es of `chunks` (lists of items), in order.

    `workers`: DataLoader worker processes (0: decode in this process, on a thread of its own with `thread`);
    `pin_memory`: page-locked batches (for an asynchronous copy to CUDA).
    """

    def __init__(self, source, prompts, chunks: Sequence[Sequence[ImageItem]], resolution: tuple[int, int],
                 resize: str, workers: int = 0, pin_memory: bool = False, thread: bool = False):
        self.source, self.prompts = source, prompts
        self.chunks = [list(c) for c in chunks]
        self.resolution, self.resize = tuple(resolution), resize
        self.workers, self.pin_memory, self.thread = workers, pin_memory, thread

    def decode(self, i: int) -> Batch:
        return decode_chunk(self.source, self.prompts, self.chunks[i], self.resolution, self.resize)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Batch]:
        """Batches in order. With workers, they start here (not at the first batch): start the iterator before
        any other thread of the run, since worker processes are forked."""
        if self.workers <= 0 or len(self.chunks) <= 1:
            return self._in_a_thread() if self.thread and len(self.chunks) > 1 else self._in_this_process()
        from torch.utils.data import DataLoader

        loader = DataLoader(_Chunks(self.decode, len(self.chunks)), batch_size=None, shuffle=False,
                            num_workers=min(self.workers, len(self.chunks)), collate_fn=_whole,
                            pin_memory=self.pin_memory, worker_init_fn=_worker_init, prefetch_factor=2)
        return iter(loader)

    def _in_this_process(self) -> Iterator[Batch]:
        for i in range(len(self.chunks)):
            batch = self.decode(i)
            yield batch.pin_memory() if self.pin_memory else batch

    def _in_a_thread(self) -> Iterator[Batch]:
        """The next batches decoded on a thread while the caller works on this one (Pillow and numpy release
        the GIL while they decode and copy); at most `PREFETCH` wait. Close the iterator to stop the thread."""
        ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()

        def work() -> None:
            try:
                for i in range(len(self.chunks)):
                    if stop.is_set():
                        return
                    batch = self.decode(i)
                    ready.put(batch.pin_memory() if self.pin_memory else batch)
            except BaseException as e:  # a bug, or memory: raised where the batches are taken
                ready.put(e)
                return
            ready.put(_END)

        thread = threading.Thread(target=work, name="difffeat-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # let a thread blocked on a full queue finish
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()
