"""Measuring a run: seconds per phase (decode, VAE, UNet, copy, write) and peak memory, on CPU and CUDA.

`extract` reports images/s and peak memory on every run; `difffeat bench` adds the split by phase and picks
batch sizes by memory (`difffeat.extraction.autobatch`). Memory means the device's: the peak of `torch.cuda.
max_memory_allocated` on CUDA, resident memory (RSS) on the CPU. The kernel keeps only a lifetime peak of
RSS (``ru_maxrss``), which cannot be reset, so the peak of one stretch of work is sampled by a thread reading
``/proc/self/statm``; no psutil needed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

PHASES = ("decode", "vae", "unet", "copy", "write")


# ------------------------------------------------------------------------------------------------ time
class PhaseTimer:
    """Seconds per named phase, summed over batches; thread-safe (the store writer reports from its thread).

    With `sync` (a callable, e.g. ``torch.cuda.synchronize``) each phase waits for the device at its end, so
    that asynchronous GPU work is counted in the phase that queued it; it costs a little overlap, so only
    benchmarks ask for it.
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in self.seconds.items()}


class NullTimer:
    """A timer that records nothing: what a run without a benchmark uses, at no cost."""

    sync = None

    @contextmanager
    def phase(self, name: str):
        yield

    def add(self, name: str, seconds: float) -> None:
        pass

    def as_dict(self) -> dict[str, float]:
        return {}


def device_sync(device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (phases then count their GPU work), None elsewhere."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return lambda: torch.cuda.synchronize(device)
    return None


# ---------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Resident memory of this process now (0 where the system does not say)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        from difffeat.utils.progress import peak_memory_bytes

        return peak_memory_bytes()  # elsewhere the lifetime peak is the best figure there is


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


class PeakMemory:
    """``with PeakMemory(device) as m: …`` then `m.peak` (bytes at the highest point) and `m.added` (above
    what was in use when the block began).

    CUDA: the allocator's peak, reset at the start. CPU: RSS sampled every `interval` seconds by a thread
    (a short spike between two samples can be missed; large allocations last longer than a millisecond).
    """

    def __init__(self, device="cpu", interval: float = 0.001):
        self.device, self.interval = device, interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> PeakMemory:
        if is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, name="difffeat-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if is_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def peak_device_memory(device) -> int | None:
    """The run's peak on a CUDA device (bytes, since the last reset), None on the CPU."""
    if not is_cuda(device):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """What the container's memory limit leaves (cgroup v2), None without one."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def free_memory(device="cpu") -> tuple[int | None, int | None]:
    """(bytes free for new work, total) on `device`: CUDA's free memory plus what torch holds cached but
    unused; on the CPU, the system's available memory (within a container's limit). None when unknown."""
    if is_cuda(device):
        import torch

        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), int(total)
    room = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = None
    return (min(room) if room else None), total


def device_name(device="cpu") -> str:
    """The GPU's name, or the CPU's model and core count."""
    if is_cuda(device):
        import torch

        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"
