"""What a local diffusers folder must hold, and what it may not bring: the checks made before anything loads.

Kept apart from the model registry (`difffeat.zoo.registry`) so that the built-in models' builders check their own
folders without importing the registry that names them.
"""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.errors import UserError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                "model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")

# What a model folder may name as a component's library (model_index.json): anything else is code the folder brings.
TRUSTED_LIBRARIES = ("diffusers", "transformers")
# Weight files that are pickles: loading one unpickles it, which can run code.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def first_line(e: Exception, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def check_trusted_folder(path: Path) -> None:
    """Refuse, in one line and before anything loads, a local diffusers folder (a pipeline, or one model such as a
    ControlNet) that would run what it brings: a component class from another library than diffusers or
    transformers (custom code named in ``model_index.json``), a pipeline class diffusers does not have (a custom
    pipeline), or weights given only as pickles (``.bin`` and the like, without safetensors beside them)."""
    import diffusers

    folders = [path]
    index_file = path / "model_index.json"
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{index_file}: unreadable ({first_line(e)})") from None
        if not isinstance(index, dict):
            raise UserError(f"{index_file}: not a diffusers model index (expected a JSON object)")
        pipeline = index.get("_class_name")
        if pipeline is not None and not (isinstance(pipeline, str) and hasattr(diffusers, pipeline)):
            raise UserError(f"{index_file}: names the pipeline class {pipeline!r}, which diffusers does not have "
                            "(custom code); difffeat runs no code a model folder brings")
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or not spec or spec[0] is None:
                continue
            if spec[0] not in TRUSTED_LIBRARIES:
                cls = spec[1] if len(spec) > 1 else "?"
                raise UserError(f"{index_file}: component {name!r} comes from {spec[0]}.{cls}, custom code, not "
                                f"{' or '.join(TRUSTED_LIBRARIES)}; difffeat runs no code a model folder brings")
            folders.append(path / name)
    for folder in folders:
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files):
            raise UserError(f"{pickles[0]}: pickled weights, not loaded (unpickling can run code); give the model as "
                            "safetensors (diffusers: save_pretrained(..., safe_serialization=True) where the file "
                            "is trusted)")


def check_pipeline_folder(path: Path, given: tuple[str, ...] = ()) -> dict:
    """Raise a UserError naming what is missing from a diffusers pipeline folder; return its index.

    Components named in `given` are passed in already loaded: only their config is needed, not their weights."""
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise UserError(f"{path}: not a diffusers pipeline folder (model_index.json is missing)")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{index_path}: not valid JSON ({e})") from None
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or a component the pipeline declares absent
        sub = path / name
        if not sub.is_dir():
            missing.append(f"{name}/")
        elif name.startswith("tokenizer"):
            if not any((sub / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
                missing.append(f"{name}/tokenizer.json")
        elif name.startswith("scheduler"):
            if not (sub / "scheduler_config.json").exists():
                missing.append(f"{name}/scheduler_config.json")
        elif name not in ("feature_extractor", "image_processor"):
            if not (sub / "config.json").exists():
                missing.append(f"{name}/config.json")
            if name not in given and not any((sub / w).exists() for w in WEIGHT_FILES):
                missing.append(f"{name}/ weights ({WEIGHT_FILES[0]} or {WEIGHT_FILES[1]})")
    if missing:
        raise UserError(f"{path}: incomplete pipeline folder, missing " + ", ".join(missing))
    return index
