"""`load_pipeline`: one factory for every model difffeat can run, by name, folder, file or Hub id.

Names are a registry (`MODELS`): the built-in trained "mini", its random-weight twin, and real-size
random presets. Anything else is a local diffusers folder, a single-file checkpoint, or a Hub id.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from difffeat.errors import UserError
from difffeat.zoo.folders import (  # noqa: F401 (importable here as before)
    PICKLE_SUFFIXES,
    TRUSTED_LIBRARIES,
    WEIGHT_FILES,
    check_pipeline_folder,
    check_trusted_folder,
)
from difffeat.zoo.folders import (
    first_line as _first_line,
)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MODELS: dict[str, Callable[[], object]] = {}


def register_model(name: str):
    """Decorator: `@register_model("name")` on a zero-argument function returning a pipeline."""

    def wrap(fn):
        MODELS[name] = fn
        return fn

    return wrap


@register_model("mini")
def _mini():
    from difffeat.zoo.mini import weights_dir

    path = weights_dir()
    if not (path / "model_index.json").exists():
        raise UserError(f"{path}: the built-in mini model's weights are missing from this install "
                        "(reinstall difffeat, or rebuild them with `difffeat zoo train-mini`)")
    return _from_folder(path)


@register_model("mini-random")
def _mini_random():
    from difffeat.zoo.mini import random_mini_pipeline

    return random_mini_pipeline()


@register_model("mini-dit")
def _mini_dit():
    from difffeat.zoo.mmdit import weights_dir

    path = weights_dir()
    if not (path / "model_index.json").exists():
        raise UserError(f"{path}: the built-in mini-dit model's weights are missing from this install "
                        "(reinstall difffeat, or rebuild them with `difffeat zoo train-mini-dit`)")
    return _from_folder(path)


@register_model("mini-dit-random")
def _mini_dit_random():
    from difffeat.zoo.mmdit import random_mini_dit_pipeline

    return random_mini_dit_pipeline()


def _register_presets() -> None:
    from difffeat.zoo import dit_presets
    from difffeat.zoo.presets import PRESETS, build_preset_pipeline

    for name in PRESETS:
        register_model(name)(lambda name=name: build_preset_pipeline(name))
    for name in dit_presets.TRANSFORMERS:  # shapes only: built on the meta device
        register_model(name)(lambda name=name: dit_presets.build_preset_pipeline(name))


_register_presets()


def _from_folder(path: Path, dtype=None, **components):
    """The pipeline in a diffusers folder; `components` (e.g. ``transformer=``) replace the folder's own."""
    from diffusers import DiffusionPipeline

    check_trusted_folder(path)
    index = check_pipeline_folder(path, given=tuple(components))
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    # Components the folder declares absent ([null, null], e.g. SD3 without T5) must be passed as None to load.
    kwargs.update({k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None})
    kwargs.update(components)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    if "_difffeat_max_sequence_length" in index:  # the T5 token count the model was trained with (mini-dit: 0)
        vars(pipe)["difffeat_max_sequence_length"] = int(index["_difffeat_max_sequence_length"])
    return pipe


def _from_single_file(path: Path, config: str | os.PathLike | None, dtype=None):
    """A single-file checkpoint. With `config` a pipeline folder that has a transformer, the file is that
    transformer's weights (the other components come from the folder); otherwise a whole pipeline, tried as
    SD-1/2, SDXL, SD3 then FLUX."""
    config = None if config is None else os.fspath(config)
    if config and Path(config).expanduser().is_dir():
        check_trusted_folder(Path(config).expanduser())  # before its index names a module to import
    transformer = _transformer_class(Path(config).expanduser()) if config else None
    if transformer is not None:
        return _transformer_from_single_file(path, Path(config).expanduser(), transformer, dtype)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    errors: dict[str, list[str]] = {}  # reason → the classes that gave it
    # diffusers infers the variant from the keys, but needs the pipeline class.
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline):
        try:
            return cls.from_single_file(str(path), config=config, local_files_only=config is not None
                                        or offline())
        except Exception as e:  # diffusers raises many types here; we report them together
            errors.setdefault(_first_line(e), []).append(cls.__name__)
    hint = "" if config else " (offline, pass config=DIR: a diffusers folder of the same architecture)"
    raise UserError(f"{path}: could not load as a single-file checkpoint{hint}; "
                    + "; ".join(f"{', '.join(names)}: {reason}" for reason, names in errors.items()))


def _transformer_class(folder: Path) -> tuple[str, str] | None:
    """(library, class name) of the transformer a pipeline folder declares, or None (no such folder, a UNet)."""
    try:
        spec = json.loads((folder / "model_index.json").read_text()).get("transformer")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return tuple(spec) if isinstance(spec, list) and len(spec) == 2 and spec[0] is not None else None


def _transformer_from_single_file(path: Path, folder: Path, spec: tuple[str, str], dtype=None):
    """`folder`'s pipeline with its transformer read from `path` by diffusers' `from_single_file`, which takes
    diffusers' key layout as it is and converts the original ones (of a whole-pipeline file only the transformer)."""
    import importlib

    library, name = spec
    try:
        cls = getattr(importlib.import_module(library), name, None)
    except ImportError:
        cls = None
    if not hasattr(cls, "from_single_file"):
        raise UserError(f"{path}: diffusers cannot load a {name} from a single file (the transformer {folder} "
                        "declares); load a diffusers folder instead")
    check_pipeline_folder(folder, given=("transformer",))
    with quiet_local_loading():
        try:
            transformer = cls.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                               local_files_only=True, torch_dtype=dtype)
        except Exception as e:  # diffusers raises many types for a file of another architecture
            raise UserError(f"{path}: not a {name} checkpoint of the architecture in {folder} "
                            f"(diffusers: {_first_line(e)})") from None
        empty = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
        if empty:
            raise UserError(f"{path}: not a complete {name} checkpoint of the architecture in {folder} "
                            f"(no weights for {empty[0]}" + (f" and {len(empty) - 1} more)" if len(empty) > 1 else ")"))
        return _from_folder(folder, dtype=dtype, transformer=transformer)


def offline() -> bool:
    """Whether the Hugging Face Hub is off limits (HF_HUB_OFFLINE set): then only the local cache is read."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _from_hub(model_id: str):
    from diffusers import DiffusionPipeline

    return from_hub_model(DiffusionPipeline, model_id)


def from_hub_model(cls, model_id: str):
    """`cls.from_pretrained(model_id)` from the Hub (or its cache when offline), one clear error otherwise."""
    try:
        return cls.from_pretrained(model_id, local_files_only=offline())
    except Exception as e:
        reason = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if offline() else \
            f"could not be fetched from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        raise UserError(f"{model_id}: not a local folder, file or built-in name, and as a Hub id it {reason}") from None


def as_dtype(dtype):
    """A torch dtype from a torch dtype, None, or a name ("fp32", "fp16", "bf16" and their long forms)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def _use_xformers_if_installed(pipe) -> None:
    """xformers attention on CUDA when the optional extra is installed; otherwise torch SDPA stays."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as e:  # a build that does not match this GPU / torch: SDPA is the safe fallback
        import warnings

        warnings.warn(f"xformers is installed but unusable here ({e}); using torch SDPA", stacklevel=3)


@contextlib.contextmanager
def quiet_local_loading():
    """No "Loading weights" / "Loading pipeline components" bars while reading a local folder: they flash for a
    fraction of a second and break the one-line errors that follow on stderr (downloads keep their bars)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            transformers_logging.enable_progress_bar()
        if was[1]:
            diffusers_logging.enable_progress_bar()


def load_pipeline(model: str | os.PathLike = "mini", device: str = "cpu", dtype=None,
                  config: str | os.PathLike | None = None):
    """A diffusers pipeline with `.unet`, `.vae`, `.text_encoder`, `.tokenizer`, `.scheduler`.

    `model` is a registered name (`"mini"`, `"mini-random"`, `"sd15-random"`, …; see `MODELS`), a local
    diffusers folder, a single-file checkpoint, or a Hub id (offline it fails with one clear error naming the id).
    A single file is a whole SD-1/2, SDXL, SD3 or FLUX pipeline (`config` names a diffusers folder to take the
    architecture from when offline), or, when `config` is a folder of a transformer pipeline (SD3, FLUX), that
    transformer's weights alone, the other components coming from the folder (diffusers reads no PixArt file).
    `dtype` is a torch dtype or one of "fp32", "fp16", "bf16"; None keeps the stored precision.
    """
    dtype = as_dtype(dtype)
    name = str(model)
    path = Path(name).expanduser()
    if name in MODELS:
        with quiet_local_loading():
            pipe = MODELS[name]()
    elif path.is_dir():
        with quiet_local_loading():
            pipe = _from_folder(path)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        pipe = _from_single_file(path, config, dtype)
    elif _looks_like_hub_id(name) and not name.endswith(SINGLE_FILE_SUFFIXES):
        pipe = _from_hub(name)
    else:
        raise UserError(f"{name}: no such model folder or file, and not a built-in name "
                        f"({', '.join(MODELS)}) or a Hub id (owner/name)")
    from difffeat.models.dit import denoiser

    if denoiser(pipe).device.type == "meta":  # a shape-only preset (transformers at their real size): no values to move
        return pipe
    pipe = pipe.to(device)
    if str(device).startswith("cuda"):
        _use_xformers_if_installed(pipe)
    if dtype is not None and denoiser(pipe).dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe
