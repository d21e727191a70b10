"""Batch sizes by measurement: `--batch-size auto`, and a clear refusal when a batch cannot fit.

A *probe* runs the real extraction (VAE encode, conditioning, hooked UNet pass, copy to the host) on
random images at the run's size and tells how long it took and how much memory it needed above what was
in use before (`difffeat.utils.measure.PeakMemory`: the CUDA allocator's peak, or sampled RSS on the CPU).

`choose_batch_size` doubles the batch from 1 while it fits in the memory limit and still gets faster; a
batch whose need, extrapolated from the two before it, would pass the limit is not even tried (on the CPU
the operating system kills a process that runs out of memory, with no message). It picks the largest
batch within 3 % of the best throughput measured: on a GPU the largest that fits, on a CPU (where bigger
batches stop paying early) a modest one. Choices are cached per model × size × device (and the other
settings that change the cost) in ``batch-size.json`` under the user cache folder (`cache_dir`).

`check_fits` is the guard for a batch size the user gave: one probe image (or two more probes) gives the
memory per image, and a batch that would not fit is refused with the numbers and the batch that would. When
the estimate from shapes (below) is under a quarter of the limit, the run skips this probe: it would cost a
pass of one image for nothing.

A probe at the run's size is itself a forward pass at that size: at ``--size 4096 4096`` on mini one image
needs gigabytes, and the operating system kills the process without a word. So before any probe,
`check_estimate` judges the batch *from shapes alone* (`estimate_batch_memory`: the layer listing, traced on
the meta device) and refuses what clearly cannot fit.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difffeat.errors import UserError
from difffeat.utils.progress import human_bytes

CACHE_FILE = "batch-size.json"
SAFETY = 0.9  # of the free memory; the rest absorbs what a probe cannot see (fragmentation, other processes)
MAX_BATCH = 256
NEAR_BEST = 0.97  # the largest batch within 3 % of the best throughput wins
ROOMY = 4  # a given batch whose estimate from shapes is under a quarter of the limit is not probed as well


def cache_dir() -> Path:
    """difffeat's cache folder: ``$DIFFFEAT_CACHE``, else ``$XDG_CACHE_HOME/difffeat``, else ``~/.cache/difffeat``."""
    if os.environ.get("DIFFFEAT_CACHE"):
        return Path(os.environ["DIFFFEAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return Path(base or Path.home() / ".cache") / "difffeat"


# ----------------------------------------------------------------------------------------------- probing
def extraction_probe(extractor, device, measure_memory: bool = True) -> Callable[[int], tuple[float, int]]:
    """``probe(b) -> (seconds, bytes)``: one extraction of b random images with `extractor` (its settings, its
    techniques), timed, with the memory it needed above what was in use (`measure_memory`)."""
    import torch

    from difffeat.utils.measure import PeakMemory, device_sync

    sync = device_sync(device) or (lambda: None)
    height, width = extractor.resolution
    generator = torch.Generator().manual_seed(0)
    # Text no real input has: prompt embeddings are cached by text, and the probe's must not stand in for a run's
    # (a prompt encoded alone can differ in the last bit from the same prompt encoded in a batch).
    text = "difffeat batch size probe"
    fields = {"caption": text, "label": text, "other_caption": text}  # what prompt techniques read

    def probe(b: int) -> tuple[float, int]:
        x = torch.rand(b, 3, height, width, generator=generator)
        keys = [f"probe-{i}" for i in range(b)]
        saved = extractor.batch_size
        extractor.batch_size = b
        mem = PeakMemory(device) if measure_memory else None
        try:
            with mem or contextlib.nullcontext():
                sync()
                t0 = time.perf_counter()
                z = extractor.encode_latents(x, keys)
                extractor.extract(x, prompts=[text] * b, keys=keys, fields=[fields] * b, latents=z)
                sync()
                seconds = time.perf_counter() - t0
        finally:
            extractor.batch_size = saved
        return seconds, mem.added if mem else 0

    return probe


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError)


def release(device) -> None:
    """Give memory back after running out: Python garbage, and the CUDA cache."""
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _predict(tried: dict[int, dict], b: int) -> float | None:
    """Memory of batch b, extrapolated linearly from the two largest batches tried."""
    sizes = sorted(s for s in tried if tried[s]["fits"])
    if len(sizes) < 2:
        return None
    b1, b2 = sizes[-2:]
    m1, m2 = tried[b1]["bytes"], tried[b2]["bytes"]
    return m2 + (m2 - m1) / (b2 - b1) * (b - b2)


def choose_batch_size(probe: Callable[[int], tuple[float, int]], limit: float, max_batch: int = MAX_BATCH,
                      device="cpu") -> dict:
    """The batch size to run at, by probing (see the module doc): ``{"batch_size", "images_per_second",
    "limit_bytes", "tried": {b: {"seconds", "bytes", "images_per_second", "fits"}}, "stopped": why}``."""
    tried: dict[int, dict] = {}
    probe(1)  # warm-up: first-call costs (kernel selection, caches) are no batch size's fault
    stopped = f"reached the largest batch tried ({max_batch})"
    b, stale = 1, 0
    while b <= max_batch:
        need = _predict(tried, b)
        if need is not None and need > limit:
            stopped = f"batch {b} would need about {human_bytes(need)}, over the limit of {human_bytes(limit)}"
            break
        try:
            probe(b)  # the first pass at a new shape pays for kernel choice; the second is timed
            seconds, used = probe(b)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            release(device)
            stopped = f"batch {b} ran out of memory"
            break
        fits = used <= limit
        tried[b] = {"seconds": round(seconds, 4), "bytes": int(used), "images_per_second": round(b / seconds, 3),
                    "fits": fits}
        if not fits:
            stopped = f"batch {b} needed {human_bytes(used)}, over the limit of {human_bytes(limit)}"
            break
        best = max(v["images_per_second"] for s, v in tried.items() if v["fits"] and s < b) if len(tried) > 1 else 0
        stale = stale + 1 if tried[b]["images_per_second"] < best * 1.03 else 0
        if stale >= 2:
            stopped = f"batches {b // 2} and {b} were not 3 % faster than smaller ones"
            break
        b *= 2
    fitting = {s: v for s, v in tried.items() if v["fits"]}
    if not fitting:
        raise UserError(f"not even a batch of 1 fits in {human_bytes(limit)} of memory ({stopped}); "
                        "use a smaller --size or a smaller model")
    top = max(v["images_per_second"] for v in fitting.values())
    choice = max(s for s, v in fitting.items() if v["images_per_second"] >= NEAR_BEST * top)
    return {"batch_size": choice, "images_per_second": fitting[choice]["images_per_second"], "limit_bytes": int(limit),
            "tried": {str(s): v for s, v in sorted(tried.items())}, "stopped": stopped}


MEMORY_LIMIT_ENV = "DIFFFEAT_MEMORY_LIMIT_BYTES"  # stands in for the free memory (tests; a shared machine)


def memory_limit(device, max_memory_gib: float | None = None) -> float:
    """Bytes a run may add: `max_memory_gib` when given, else ``$DIFFFEAT_MEMORY_LIMIT_BYTES`` when set, else
    90 % of what the device has free now."""
    from difffeat.utils.measure import free_memory

    if max_memory_gib is not None:
        return max_memory_gib * 2**30
    if os.environ.get(MEMORY_LIMIT_ENV):
        try:
            return float(int(os.environ[MEMORY_LIMIT_ENV]))
        except ValueError:
            raise UserError(f"${MEMORY_LIMIT_ENV} must be a whole number of bytes, "
                            f"got {os.environ[MEMORY_LIMIT_ENV]!r}") from None
    free, _ = free_memory(device)
    return SAFETY * free if free else float("inf")


# --------------------------------------------------------------------------------------------- the cache
def cache_key(what: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_batch_size(what: dict[str, Any], path: Path | None = None) -> dict | None:
    """The cached choice for `what` (model, size, device, …), None when there is none (or the file is damaged)."""
    path = path or cache_dir() / CACHE_FILE
    try:
        entries = json.loads(path.read_text())
        entry = entries.get(cache_key(what))
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("batch_size"), int) else None


def remember_batch_size(what: dict[str, Any], choice: dict, path: Path | None = None) -> Path | None:
    """Add `choice` to the cache file (atomically; a cache that cannot be written is not an error)."""
    from difffeat.utils.atomic import write_json_atomic

    path = path or cache_dir() / CACHE_FILE
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[cache_key(what)] = {**choice, "for": what,
                                "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, entries)
    except (OSError, UserError):
        return None
    return path


# ------------------------------------------------------------------------------------------- the guard
def fitting_batch(per_image: float, base: float, limit: float) -> int:
    """The largest batch whose need ``base + per_image·b`` stays within `limit` (0 when not even one does)."""
    if per_image <= 0:
        return MAX_BATCH
    return max(0, int((limit - base) // per_image))


def memory_model(probe: Callable[[int], tuple[float, int]], warm: bool = False) -> tuple[float, float]:
    """(bytes per image, fixed bytes) of a batch, from probes of 1 and 2 images (after a warm-up unless `warm`)."""
    if not warm:
        probe(1)
    one, two = probe(1)[1], probe(2)[1]
    per_image = max(two - one, 0)
    return float(per_image), float(max(one - per_image, 0))


def does_not_fit(batch: int, device, per_image: float, base: float, limit: float, what: str = "") -> UserError:
    """The refusal: the memory numbers and the batch that would fit."""
    from difffeat.utils.measure import free_memory

    need = base + per_image * batch
    _, total = free_memory(device)
    fit = fitting_batch(per_image, base, limit)
    hint = f"batch {fit} would fit: --batch-size {fit} or --batch-size auto" if fit else \
        "not even a batch of 1 fits: use a smaller --size or model"
    of_total = f" of {human_bytes(total)}" if total else ""
    return UserError(f"batch {batch}{what} does not fit on {device}: it needs about {human_bytes(need)} "
                     f"({human_bytes(per_image)} per image), and {human_bytes(limit)} is available{of_total}; {hint}")


def check_fits(probe: Callable[[int], tuple[float, int]], batch: int, device, limit: float) -> dict:
    """Refuse (`does_not_fit`) a batch whose need is over `limit`; else how it was judged.

    One image first: its need (first-call costs included) times the batch is a bound from above, and when that
    fits, nothing more is probed. Else probes of 1 and 2 images give the need per image."""
    first = probe(1)[1]
    if first * batch <= limit:
        return {"per_image_bytes": int(first), "base_bytes": 0, "limit_bytes": int(limit), "bound": "upper"}
    per_image, base = memory_model(probe, warm=True)
    if base + per_image * batch > limit:
        raise does_not_fit(batch, device, per_image, base, limit)
    return {"per_image_bytes": int(per_image), "base_bytes": int(base), "limit_bytes": int(limit)}


# ------------------------------------------------------------------------------ the estimate from shapes
# The UNet's working set above the features it keeps, in units of its largest activation (C·h·w of the
# biggest module output), and the VAE encoder's peak in units of its largest activation (the first block's
# output at full image size). Calibrated on mini (CPU, fp32, dift layer, t=50), one fresh process per size
# and part: load, warm up with a batch of 2 at 32², then the peak RSS (resource.getrusage ru_maxrss) added by
# one batch of 8 — VAE encode alone, then the hooked UNet pass alone on ready latents. UNet: (added − kept
# features) / (8 × 4 B × largest) = 2.3 at 64², 2.6 at 128², 2.0 at 256²; VAE: added / (8 × 4 B × largest) =
# 6.0, 7.2, 4.4. The constants round the largest up, so the estimate errs towards refusing only what clearly
# cannot fit (the measured probe of `check_fits` still judges a batch that passes).
UNET_WORKING_SET = 3
VAE_WORKING_SET = 8


def _vae_largest_activation(vae, height: int, width: int) -> int:
    """Elements of the largest tensor the VAE encoder's modules output for one height×width image, traced on a
    meta-device copy made from the config (no memory, no compute)."""
    encoder = getattr(vae, "encoder", None)
    if encoder is None:
        return 3 * height * width
    # Kept on the VAE (per size), like the UNet's layer listing: tracing costs a third of a second per run.
    traced = vars(vae).setdefault("difffeat_largest_activation", {})
    if (height, width) not in traced:
        traced[(height, width)] = _trace_vae_encoder(vae, height, width)
    return traced[(height, width)]


def _trace_vae_encoder(vae, height: int, width: int) -> int:
    """`_vae_largest_activation`, traced."""
    import torch

    from difffeat.models.layers import first_tensor

    with torch.device("meta"):
        ghost = type(vae).from_config(vae.config).encoder
    largest = 3 * height * width

    def hook(_module, _args, output):
        nonlocal largest
        t = first_tensor(output)
        if t is not None:
            largest = max(largest, t.numel())

    handles = [m.register_forward_hook(hook) for m in ghost.modules()]
    try:
        with torch.device("meta"), torch.no_grad():
            ghost(torch.zeros(1, 3, height, width))
    finally:
        for h in handles:
            h.remove()
    return largest


def estimate_batch_memory(pipe, layers: list[str], height: int, width: int, batch: int, kept_copies: int = 1,
                          element_bytes: int = 4) -> dict[str, int]:
    """Bytes one batch of `batch` images at height×width will add, by part, from shapes only (see the
    constants above for how the factors were measured): the hooked layers' features (`kept_copies`: one per
    timestep and variant), the UNet's working set and the VAE encoder's. Nothing runs at that size."""
    from difffeat.models.layers import list_layers

    shapes = list_layers(pipe, height, width)  # traced on the meta device, cached per size
    size = {name: c * h * w for name, (c, h, w) in shapes}
    kept = sum(size.get(name, max(size.values())) for name in layers)
    biggest = max(size.values())
    vae = getattr(pipe, "vae", None)
    vae_peak = _vae_largest_activation(vae, height, width) if vae is not None else 0
    return {"features": batch * kept_copies * kept * element_bytes,
            "unet": batch * UNET_WORKING_SET * biggest * element_bytes,
            "vae": batch * VAE_WORKING_SET * vae_peak * element_bytes}


def check_estimate(pipe, layers: list[str], resolution: tuple[int, int], batch: int, device, limit: float,
                   kept_copies: int = 1, element_bytes: int = 4) -> dict:
    """Refuse (`does_not_fit`), before any forward pass, a batch whose estimate from shapes
    (`estimate_batch_memory`) is over `limit`: one line with the estimate, the memory there is, and the largest
    batch that fits (or that not even one image does). Returns the estimate when it fits."""
    height, width = resolution  # "4096 4096" on mini: gigabytes per image, found with nothing run at that size
    one = estimate_batch_memory(pipe, layers, height, width, 1, kept_copies, element_bytes)
    per_image = sum(one.values())
    need = per_image * batch
    if need <= limit:
        return {"estimate_bytes": int(need), "estimate_per_image_bytes": int(per_image), "limit_bytes": int(limit)}
    raise does_not_fit(batch, device, per_image, 0, limit)  # the same line as a measured refusal
