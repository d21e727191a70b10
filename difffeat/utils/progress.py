"""How long, how fast, how much memory: the one summary line a long command ends with.

Commands that run for more than a few seconds show a tqdm bar (rate and ETA) while they work and print
`finish_line` when they are done, so a person sees what was written where, how long it took, how fast it
went and how much memory it needed (peak resident set size, from ``resource.getrusage``).
"""

from __future__ import annotations

import sys
import time


def peak_memory_bytes() -> int:
    """Peak resident memory of this process or of any child it waited for (the larger), in bytes."""
    try:
        import resource
    except ImportError:  # not on POSIX: no figure rather than a wrong one
        return 0
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS reports bytes, Linux KiB


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable: the loop returns at GiB


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Stopwatch:
    """Started on creation; `seconds` so far and the `finish_line` of the work it timed."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def finish_line(self, what: str, count: int | None = None, unit: str = "items") -> str:
        """``"<what> in 12.3 s (4.1 images/s); peak memory 812.0 MiB"``; below one per second the rate reads
        ``(28.0 s/image)``, so a slow run never shows 0.0."""
        seconds = self.seconds
        rate = ""
        if count and seconds > 0:
            per_second = count / seconds
            singular = unit[:-1] if unit.endswith("s") else unit
            rate = f" ({per_second:.1f} {unit}/s)" if per_second >= 1 else f" ({seconds / count:.1f} s/{singular})"
        return f"{what} in {human_seconds(seconds)}{rate}; peak memory {human_bytes(peak_memory_bytes())}"


def log_line(text: str) -> None:
    """Print `text` on stdout above any tqdm bar that is running (bars draw on stderr; a plain print would cut
    through them), flushed so that a log file shows it at once."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def step_callback(bar):
    """A diffusers ``callback_on_step_end`` that moves `bar` on by one per denoising step. It only observes: it
    hands the pipeline's tensors back untouched, so the images are the same with or without it."""

    def advance(pipe, step, timestep, tensors):
        bar.update(1)
        return tensors

    return advance
