"""Speed options of the denoiser that never change what is computed, only how: attention backend,
channels-last memory layout, `torch.compile`.

Each one is asked for by name and applied for the length of a ``with`` block, then undone, so the pipeline
a caller passed in is left as it was. Features agree with the plain path up to float rounding (other
kernels sum in another order), as for any change of batch size or device.

When an option cannot be honoured here, the run goes on without it and the reason is given in one line
(`warn`): xformers that is not installed or does not fit this GPU falls back to torch SDPA; a model
`torch.compile` cannot compile (no C compiler, an unsupported Python, a broken compile cache) runs eagerly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


def warn_line(message, file=None) -> None:
    """One warning line (on stderr by default), the way the CLI shows them."""
    print(f"difffeat: warning: {message}", file=file or sys.stderr)


def _xformers_active(model) -> bool:
    procs = getattr(model, "attn_processors", None) or {}
    return any("XFormers" in type(p).__name__ for p in procs.values())


def xformers_unusable(pipe, device) -> str | None:
    """Why xformers cannot run here, or None when it can (it is then switched on)."""
    if not str(device).startswith("cuda"):
        return f"xformers needs a CUDA device and this run is on {device}"
    try:
        import xformers  # noqa: F401
    except ImportError as e:
        return f"xformers is not installed ({e}; pip install -e '.[xformers]')"
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as e:  # a build that does not match this GPU or torch: diffusers raises many kinds
        return f"xformers does not work here ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


def use_attention(pipe, backend: str, device, warn: Callable[[str], None] = warn_line) -> str:
    """Put the denoiser on `backend` ("sdpa", "xformers", or "auto": as loaded, which is xformers on CUDA
    when installed); returns the backend in use. xformers that cannot run gives its reason and SDPA."""
    if backend not in ATTENTION_BACKENDS:
        from difffeat.errors import UserError

        raise UserError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    from difffeat.models import dit

    model = dit.denoiser(pipe)
    if backend == "xformers":
        why = xformers_unusable(pipe, device)
        if why is None:
            return "xformers"
        warn(f"xformers requested but not usable: {why}; using torch SDPA")
        backend = "sdpa"
    if backend == "sdpa" and _xformers_active(model):
        pipe.disable_xformers_memory_efficient_attention()  # diffusers' default processors: SDPA where torch has it
    return "xformers" if _xformers_active(model) else "sdpa"


@contextlib.contextmanager
def channels_last(model, enabled: bool = True):
    """The model's 4-d weights in channels-last (NHWC) layout inside the block, contiguous again after it: faster
    convolutions on recent GPUs in fp16/bf16, and for the VAE encoder on this project's CPU (docs/scale.md)."""
    if not enabled:
        yield model
        return
    import torch

    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


class Compiled:
    """``with Compiled(model):`` calls of `model` inside run `torch.compile`d, with the model's own hooks
    (difffeat's capture hooks and their early exit included).

    `dynamic=False`: one graph per input shape, so callers keep shapes fixed (the extractor pads its last
    batch) and each shape is compiled once per process; inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``)
    makes later runs faster where torch can reuse it. If compiling fails (at `torch.compile` or at the first
    call), one warning line gives the reason and the model runs eagerly from then on.
    """

    def __init__(self, model, backend: str = "inductor", mode: str | None = None,
                 warn: Callable[[str], None] = warn_line):
        self.model, self.backend, self.mode, self.warn = model, backend, mode, warn
        self.failed: str | None = None
        self._compiled = None
        self._previous = None

    def __enter__(self) -> Compiled:
        import torch

        try:
            self._compiled = torch.compile(self.model._call_impl, backend=self.backend, mode=self.mode, dynamic=False)
        except Exception as e:  # e.g. a Python version dynamo does not support
            self._give_up(e)
            return self
        # What `nn.Module.compile()` sets, with a fallback around it; restored on exit (torch has no public undo).
        self._previous = self.model._compiled_call_impl
        self.model._compiled_call_impl = self._call
        return self

    def _give_up(self, e: BaseException) -> None:
        text = " ".join(str(e).split())
        self.failed = f"{type(e).__name__}: {text[:300]}"
        self.warn(f"torch.compile cannot compile the {type(self.model).__name__} here ({self.failed}); "
                  "running it without compiling")

    def _call(self, *args, **kwargs):
        import torch._dynamo.exc

        if self.failed is None:
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # compiler errors only; the model's own pass on
                self._give_up(e)
                self.model._compiled_call_impl = None
        return self.model._call_impl(*args, **kwargs)

    def __exit__(self, *exc) -> None:
        if self._compiled is not None:
            self.model._compiled_call_impl = self._previous
        return None
