"""The run spine: every folder difffeat writes (feature stores, GATE reports, head runs, recipe runs) goes
through here.

Three rules live in this one module, so no command can forget them:

- **Ownership.** A run folder carries a marker file written by difffeat (its config file, with a
  ``"format": "difffeat-run/1"`` entry, or a store's manifest). difffeat only writes into a folder that is
  new, empty or marked as its own run of the same kind, and ``overwrite`` removes only the files the run
  declares as its own (never a file it did not write). A single output file (``--emit FILE``, a sample
  PNG) is never replaced unless the user asked for it.
- **Configs are data.** A run's resolved config is written with library versions and a config hash; a
  resumed run must have the same config (the fields that differ are named); `Config` gives dataclass
  configs ``from_dict`` / ``from_run`` / ``to_json`` and validation from field metadata, from which the
  CLI builds its flags (`difffeat.spine.config_cli`).
- **Nothing untrusted runs, nothing escapes.** Checkpoints are safetensors plus JSON; `load_torch` reads a
  legacy ``.pt`` with ``weights_only=True``; `confine` resolves a path read from a file (a store key, a
  checkpoint pointer) inside its root or refuses it.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import importlib.metadata
import json
import math
import numbers
import os
import platform
import re
import shutil
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from difffeat.errors import UserError
from difffeat.utils.atomic import atomic_path, write_json_atomic

RUN_FORMAT = "difffeat-run/1"
STORE_FORMAT = "difffeat-store/1"  # a feature store's manifest (difffeat.store); here so data can tell outputs apart
VERSIONED = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "difffeat")
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------------------ config data
def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text whatever their key order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def as_json_data(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, numpy scalars become numbers)."""
    return json.loads(canonical_json(value))


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config`."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape results ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_default(value):
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = (),
                     nested: Iterable[str] = ()) -> list[str]:
    """Names of the top-level entries whose values differ between two configs; for the sub-configs named in
    `nested` (dicts on both sides) the names of their differing entries, as ``field.sub``."""
    skip, subs, found = set(ignore), set(nested), []
    for k in set(old) | set(new):
        a, b = old.get(k), new.get(k)
        if k in skip or canonical_json(a) == canonical_json(b):
            continue
        if k in subs and isinstance(a, Mapping) and isinstance(b, Mapping):
            found += [f"{k}.{sub}" for sub in differing_fields(a, b)]
        else:
            found.append(k)
    return sorted(found)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON of `path`; one clear error naming the file when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({e})") from None


def read_saved_config(path: str | os.PathLike) -> dict:
    """The config dict of a saved run file (a run's config.json or a store's manifest.json: its "config"
    entry) or of a bare config file."""
    return _saved_config(path)[2]


def _saved_config(path: str | os.PathLike) -> tuple[Path, str | None, dict]:
    """(the file read, the run kind it names or None for a bare config, its config dict) of a saved run file, a run
    folder (its config.json or manifest.json) or a bare config file."""
    path = Path(path)
    if path.is_dir():  # a run folder: its config file
        for name in ("config.json", "manifest.json"):
            if (path / name).is_file():
                path = path / name
                break
    saved = read_json(path, "run config")
    config = saved.get("config", saved) if isinstance(saved, dict) else saved
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a run config (expected a JSON object)")
    kind = saved.get("kind") if config is not saved and isinstance(saved.get("kind"), str) else None
    return path, kind, config


class ConfigError(UserError):
    """A config field holds a value no run can use. The library names the field; the CLI shows its flag."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


def option(default: Any = dataclasses.MISSING, *, help: str = "", choices: Iterable[Any] | None = None,
           min: float | None = None, max: float | None = None, above: float | None = None,
           flag: str | None = None, short: str | None = None, metavar: str | None = None, cli: bool = True,
           default_factory: Any = dataclasses.MISSING, nargs: str | int | None = None) -> Any:
    """A dataclass field with the metadata that validation and the CLI read: `help`, `choices`, bounds
    (`min` ≤ value ≤ `max`, value > `above`), the flag name when it is not ``--field-name``, `cli=False`
    for fields the command line does not set. The default is written once, here."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "above": above, "flag": flag, "short": short, "metavar": metavar, "cli": cli, "nargs": nargs}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(config_cls: type, *, prefix: str | None, flags: Mapping[str, str] | None = None,
           legacy: Mapping[str, str] | None = None, help: str = "") -> Any:
    """A field holding a sub-config (a `Config` of its own, e.g. DirMixE's hyper-parameters in train-cls's config):
    saved as a nested dict, validated as its own config (an error names ``field.sub``), and on the command line
    one flag per sub-field, ``--PREFIX-SUB`` (or the spelling in `flags`, sub-field → flag; with no prefix, each
    sub-field's own flag). `legacy` maps the flat names of configs written before the nesting (``dm_tau``) to
    sub-fields (``tau``): they still load; a legacy name may be the field's own (train-seg's ``head``, once the head
    kind's name), then a plain value there is that sub-field's."""
    meta = {"nested": config_cls, "prefix": prefix, "flags": dict(flags or {}), "legacy": dict(legacy or {}),
            "help": help, "choices": None, "min": None, "max": None, "above": None, "flag": None, "short": None,
            "metavar": None, "cli": True, "nargs": None}
    return dataclasses.field(default_factory=config_cls, metadata=meta)


def nested_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields of `config_cls` made with `nested`."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("nested")]


def _fold_dotted(data: Mapping[str, Any], config_cls: type) -> dict:
    """``{"dirmixe.tau": 1.6}`` entries (a sub-config's field, as profiles and the CLI name them) folded into the
    sub-config's dict."""
    subs = {f.name for f in nested_fields(config_cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name, dot, sub = key.partition(".")
        if dot and name in subs:
            base = out.get(name)
            base = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base or {})
            out[name] = {**base, sub: value}
        elif key in out and isinstance(value, Mapping) and isinstance(out[key], Mapping):
            out[key] = {**value, **out[key]}
        else:
            out[key] = value
    return out


def _prefixed(name: str, error: ConfigError) -> ConfigError:
    return ConfigError(f"{name}.{error.field}", error.reason)


C = TypeVar("C", bound="Config")


class Config:
    """Base of dataclass configs (in the spirit of diffusers' ``ConfigMixin``): plain data that a run writes
    next to its outputs and can be rebuilt from.

    Subclasses are ``@dataclass``es; fields made with `option` carry their help, choices and bounds, which
    `validate` checks (raising `ConfigError` naming the field) and `difffeat.spine.config_cli` turns into flags.
    Override `check` for rules that span several fields.
    """

    # Fields that say where a run writes rather than what it computes: not part of the config hash.
    location_fields: ClassVar[tuple[str, ...]] = ("out",)
    # Entries a run records beside its config that are not settings (what the inputs were): `from_run` skips them.
    recorded_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        return as_json_data(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def unknown_names(cls, data: Mapping[str, Any]) -> list[str]:
        """The names in `data` that `from_dict` would pass over: neither a field, nor a sub-config's field (dotted,
        ``head.kind``, or as a nested dict), nor a sub-config's former flat name. What a user typed (``--set``, a
        profile) is checked with it, since `from_dict` itself must skip what a manifest holds beside its config."""
        names = {f.name for f in dataclasses.fields(cls)}
        nested = {f.name: f for f in nested_fields(cls)}
        legacy = {k for f in nested.values() for k in f.metadata["legacy"]}
        unknown = []
        for key, value in data.items():
            name, dot, sub = key.partition(".")
            if dot and name in nested:
                unknown += [f"{name}.{n}" for n in nested[name].metadata["nested"].unknown_names({sub: value})]
            elif key in nested and isinstance(value, Mapping):
                unknown += [f"{key}.{n}" for n in nested[key].metadata["nested"].unknown_names(value)]
            elif key not in names and key not in legacy:
                unknown.append(key)
        return unknown

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], **override) -> C:
        """Build from a dict, ignoring entries that are not fields (a manifest holds more than the config); a
        required field missing is a `ConfigError` naming it, like a value of the wrong type or out of bounds."""
        fields = dataclasses.fields(cls)
        data = _fold_dotted({**data, **override}, cls)
        override = {}
        values = {k: v for k, v in data.items() if k in {f.name for f in fields}}
        for f in nested_fields(cls):  # a sub-config from its dict, from flat names of older configs, or as given
            sub, legacy = values.get(f.name), f.metadata["legacy"]
            if isinstance(sub, f.metadata["nested"]):
                continue
            if f.name in legacy and sub is not None and not isinstance(sub, Mapping):
                sub = None  # the field's own name in its former, flat sense: taken through `legacy` below
            if sub is not None and not isinstance(sub, Mapping):
                raise ConfigError(f.name, f"must be a mapping of {f.metadata['nested'].__name__}'s settings, got "
                                          f"{type(sub).__name__}")
            flat = {legacy[k]: v for k, v in data.items()
                    if k in legacy and not (k == f.name and isinstance(v, (Mapping, f.metadata["nested"])))}
            merged = {**flat, **(sub or {})}
            try:
                values[f.name] = f.metadata["nested"].from_dict(merged)
            except ConfigError as e:
                raise _prefixed(f.name, e) from None
        for f in fields:
            if f.name not in values and f.init and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f.name, "is required and not given")
        hints = _field_types(cls)
        for name, value in values.items():  # before the dataclass's own __post_init__ sees them
            _check_type(name, value, hints.get(name, Any))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @classmethod
    def from_run(cls: type[C], run: str | os.PathLike, **override) -> C:
        """The config a run folder (or its config/manifest file) was made with, checked like any config: one line
        naming the file when it is another command's (entries this config does not have: a sweep's config.json
        given to `extract`), or when a field is missing, of the wrong type or out of bounds. `override` (where
        the repeated run writes) is the caller's, not the file's."""
        file, kind, config = _saved_config(run)
        known = {f.name for f in dataclasses.fields(cls)}
        known |= {k for f in nested_fields(cls) for k in f.metadata["legacy"]}  # flat names of older configs
        unknown = sorted(set(config) - known - set(cls.recorded_fields))
        if unknown:
            what = f"the config of a difffeat {kind} run" if kind else "a config with other settings"
            listed = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
            raise UserError(f"{file}: {what}, not one this command can repeat ({listed}: not among its settings); "
                            "give the config file this command wrote")
        config = {k: v for k, v in config.items() if k not in cls.recorded_fields}
        try:
            return cls.from_dict(config, **override)
        except ConfigError as e:  # the value came from the file, not from a flag: name the file and the field
            raise UserError(f"{file}: {e.field}: {e.reason}") from None

    def hash(self) -> str:
        data = self.to_dict()
        for name in self.location_fields:
            data.pop(name, None)
        return config_hash(data)

    def validate(self: C) -> C:
        """Check every field against its type annotation and its metadata, seeds for being ≥ 0, then `check`;
        returns self."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            if value is None:
                continue
            if meta.get("nested"):
                if not isinstance(value, meta["nested"]):
                    raise ConfigError(f.name, f"must be a {meta['nested'].__name__}, got {type(value).__name__}")
                try:
                    value.validate()
                except ConfigError as e:
                    raise _prefixed(f.name, e) from None
                continue
            _check_type(f.name, value, hints[f.name])
            if f.name == "seed" or f.name.endswith("_seed"):
                check_seed(value, f.name)
            if not meta:
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                _check_value(f.name, v, meta)
        self.check()
        return self

    def check(self) -> None:
        """Rules across fields; raise ConfigError(field, reason)."""


def check_seed(value: Any, name: str = "seed") -> None:
    """Seeds are whole numbers ≥ 0 (numpy's generators take no other): a ConfigError naming the field otherwise. Every
    config field called ``seed`` or ``*_seed`` is checked by `Config.validate`; plain flags call this."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value < 0:
        raise ConfigError(name, f"must be ≥ 0, got {value}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name → resolved type annotation of a dataclass config."""
    return typing.get_type_hints(cls)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """A ConfigError naming the field when `value` does not have the annotated type (a config file's
    ``"timesteps": "fifty"`` or ``"layers": [["x"]]``), before any code uses it."""
    if value is None or _fits(value, hint):
        return
    shown = repr(value)
    raise ConfigError(name, f"must be {_describe(hint)}, got {shown if len(shown) <= 60 else shown[:57] + '...'}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint in (list, tuple) or origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and (not inner or all(_fits(v, inner[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, Mapping) and (not args or all(_fits(k, args[0]) and _fits(v, args[1])
                                                                 for k, v in value.items()))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    return not isinstance(hint, type) or isinstance(value, hint)  # Literal and the like: not checked here


def _describe(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args if a is not type(None))
    if hint in (list, tuple) or origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return ("lists" if plural else "a list") + (f" of {_describe(inner[0], True)}" if inner else "")
    if hint is dict or origin is dict:
        return ("mappings" if plural else "a mapping") + (
            f" of {_describe(args[0], True)} to {_describe(args[1], True)}" if args else "")
    names = {bool: ("true or false", "true or false"), int: ("a whole number", "whole numbers"),
             float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    return getattr(hint, "__name__", str(hint))


def _check_value(name: str, v: Any, meta: Mapping[str, Any]) -> None:
    if meta.get("choices") and v not in meta["choices"]:
        raise ConfigError(name, f"must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(name, f"must be a finite number, got {v}")
    if meta.get("min") is not None and v < meta["min"]:
        raise ConfigError(name, f"must be ≥ {meta['min']}, got {v}")
    if meta.get("max") is not None and v > meta["max"]:
        raise ConfigError(name, f"must be ≤ {meta['max']}, got {v}")
    if meta.get("above") is not None and v <= meta["above"]:
        raise ConfigError(name, f"must be > {meta['above']}, got {v}")


# ------------------------------------------------------------------------------------------------ paths
def confine(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """``root / relative`` when it stays inside `root` (after resolving ``..`` and symbolic links);
    UserError otherwise. For every path that is read from a file (store keys, checkpoint pointers)."""
    rel = str(relative)
    if not rel or os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise UserError(f"{what} {rel!r}: must be a relative path inside {root}")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{what} {rel!r}: points outside {root}")
    return target


def confine_name(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """``root / relative`` when the name `relative` (read from a data set's own table or list) stays inside `root` as
    written: no absolute path, no ``..`` out of it; UserError otherwise. Unlike `confine`, symbolic links in the data
    set are followed: a data set assembled from links is the owner's choice, a name climbing out of it is not."""
    rel = str(relative).replace("\\", "/")
    if not rel or os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise UserError(f"{what} {rel!r}: must be a relative path inside {root}")
    normal = os.path.normpath(rel)
    if normal == ".." or normal.startswith("../"):
        raise UserError(f"{what} {rel!r}: points outside {root}")
    return Path(root) / normal


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies under it (both resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def check_new_file(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """The rule for single output files (``--emit FILE``, a picture): an existing file is replaced only
    with ``overwrite``; a folder or a symbolic link there is never replaced."""
    path = Path(path)
    if path.is_symlink() or path.is_dir():
        raise UserError(f"{path}: exists and is not a plain file; choose another {what} path")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; replace it (overwrite, --overwrite) or choose another {what} path")
    return path


def check_new_folder(path: str | os.PathLike, what: str = "output") -> Path:
    """The rule for an export folder outside any run folder (a trained model's ``--out``): it must be new or
    empty, since what is in it was not written by this run."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: exists and is not an empty folder; choose a new {what} folder")
    return path


def refuse_pickled_checkpoints(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Stop with one clear line when `folder` holds a checkpoint an older difffeat pickled (``torch.save``):
    such a file is never loaded, since unpickling a file someone handed over can run code."""
    for name in names:
        file = Path(folder) / name
        if file.exists():
            raise UserError(f"{file}: a pickled checkpoint of an older difffeat; it is not loaded (unpickling can "
                            "run code): start a new run folder")


def start_model_training(run: str | os.PathLike, out: str | os.PathLike | None, kind: str, config: Config,
                         owned: Iterable[str], legacy_checkpoints: Iterable[str] = ()) -> RunFolder:
    """The created (or resumed) run folder of a model-training command whose config has a ``threads`` field:
    older pickled checkpoints are refused, an export `out` outside the run must be new or empty (checked before
    any work), ``threads`` may differ on resume (it does not change the result) and is applied here."""
    refuse_pickled_checkpoints(run, legacy_checkpoints)
    if out is not None and not is_inside(out, run):
        check_new_folder(out, "export")
    folder = RunFolder(run, kind, config, resume=True, owned=tuple(owned), ignore=("threads",)).create()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    return folder


def mkdir(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create folder ({e.strerror or e})") from None
    return folder


# ------------------------------------------------------------------------------------------ run folders
class RunFolder:
    """A folder one run owns: its marker config file, its own outputs, its checkpoints.

    ``RunFolder(path, kind, config, resume=…, overwrite=…)`` only *looks* (every process of a launch can
    run it and all fail alike); `create` then makes or resets the folder and writes the marker (call it on
    the main process only). `continuing` says whether an existing run of the same config is resumed.

    `owned` lists the run's own file and folder names (glob patterns, relative to the folder); with
    ``overwrite`` they, the marker and the checkpoints are removed and nothing else is. A name made from the
    run's settings is written with a ``{field}`` placeholder (``"heatmap-{variants}.png"``): it stands for the
    exact names the old run's saved config gives (one per entry of a list or mapping field), never a wildcard,
    so a file of the user's that only looks like the run's own (``heatmap-mine.png``) is kept. A folder that is
    neither empty nor marked as a difffeat run of this `kind` is never written to.

    One process works on a run at a time: `lock` takes the folder's lock (``.lock``, `difffeat.utils.lock.FolderLock`)
    for as long as the caller trains, and looking at a folder whose lock is held refuses at once, naming the holder.
    """

    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike, kind: str, config: Mapping[str, Any] | Config, *,
                 resume: bool = False, overwrite: bool = False, owned: Iterable[str] = (),
                 marker: str = "config.json", ignore: Iterable[str] = ("out",), extra: Mapping[str, Any] | None = None,
                 format: str = RUN_FORMAT, resumable: bool = True):
        self.path = Path(path)
        self.kind = kind
        # The marker's "format" entry (a feature store's manifest has its own); `resumable=False` for runs that
        # can only be made again (samples, a GATE report): their own old outputs are replaced with overwrite only.
        self.format, self.resumable = format, resumable
        self.config = as_json_data(config.to_dict() if isinstance(config, Config) else dict(config))
        # sub-configs: a resumed run of another config names their differing fields (head.hidden)
        self.nested = tuple(f.name for f in nested_fields(type(config))) if isinstance(config, Config) else ()
        self.ignore = tuple(ignore)
        self.config_hash = config_hash({k: v for k, v in self.config.items() if k not in self.ignore})
        self.marker = marker
        self.owned = (marker, CHECKPOINTS, *owned)
        self.extra = dict(extra or {})
        self.overwrite, self.resume = overwrite, resume
        self.continuing = self._look(resume=resume, overwrite=overwrite)

    # -- looking
    def _look(self, *, resume: bool, overwrite: bool, probe: bool = True) -> bool:
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder")
        if not path.is_dir() or not any(p.name != self.LOCK for p in path.iterdir()):
            return False
        if probe:
            self._refuse_if_locked()
        saved = self.saved()
        if saved is None:
            raise UserError(f"{path}: folder is not empty and is not a difffeat {self.kind} run; difffeat "
                            "never writes into a folder it did not create: choose a new or empty folder")
        if overwrite:
            return False
        old = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        if saved.get("config_hash") != self.config_hash:
            differ = differing_fields(old, self.config, self.ignore, self.nested)
            raise UserError(f"{path}: holds a {self.kind} run of another config (differs in: "
                            f"{', '.join(differ) or 'format'}); replace it (overwrite, --overwrite) or choose "
                            "another folder")
        if not self.resumable and self.started():
            raise UserError(f"{path}: holds a {self.kind} run; replace it (overwrite, --overwrite) or choose another "
                            "folder")
        if not resume and self.started():
            raise UserError(f"{path}: holds a {self.kind} run; continue it (resume, --resume) or replace it "
                            "(overwrite, --overwrite)")
        return True

    def saved(self) -> dict | None:
        """The marker file's content when the folder holds a difffeat run of this kind, else None."""
        file = self.path / self.marker
        if not file.is_file():
            return None
        try:
            saved = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(saved, dict) or saved.get("format") != self.format:
            return None
        # Markers of another format than runs' (a store's manifest) were written without a kind before it existed.
        if saved.get("kind", None if self.format == RUN_FORMAT else self.kind) != self.kind:
            return None
        return saved

    def check_saved(self, **entries: Any) -> None:
        """For a continued run: what the marker recorded when the run began (entries of `extra`, such as the
        inputs it was made on) must equal `entries`, or the run is refused, naming the entry and both values.
        An entry the marker lacks (a run older than that record) is not compared."""
        if not self.continuing:
            return
        saved = self.saved() or {}
        for name, value in entries.items():
            if name in saved and canonical_json(saved[name]) != canonical_json(value):
                raise UserError(f"{self.path}: holds a {self.kind} run made with other {name} (run: "
                                f"{canonical_json(saved[name])}; now: {canonical_json(value)}); replace it "
                                "(overwrite, --overwrite) or choose another folder")

    def started(self) -> bool:
        """Whether the run has written anything beyond its marker (a fresh marker alone is a run another
        process of this launch just created)."""
        return any(p.name not in (self.marker, self.LOCK) for p in self.path.iterdir())

    def _refuse_if_locked(self) -> None:
        """Refuse, naming the holder, when another process holds the run's lock (a probe that takes nothing: every
        process of a launch looks at once, before the main one takes the lock)."""
        from difffeat.utils.lock import FolderLock, fcntl

        file = self.path / self.LOCK
        if fcntl is None or not file.is_file():
            return  # without flock the lock itself (`lock`) decides
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except OSError:
            held = True
        finally:
            os.close(fd)
        if held:  # taking it says who holds it, in the lock's own words; should it be free by now, let go again
            FolderLock(file, f"the {self.kind} run {self.path}").acquire().release()

    def lock(self):
        """Take the run's lock (`difffeat.utils.lock.FolderLock` on ``.lock``) for as long as this process works on the
        run; the caller releases it. A second process (another ``--resume`` of the same run) is refused with one
        line naming the holder. Taken on the main process, before `create`; the folder is looked at again under the
        lock, since another process may have changed it meanwhile."""
        from difffeat.utils.lock import FolderLock

        mkdir(self.path)
        lock = FolderLock(self.path / self.LOCK, f"the {self.kind} run {self.path}").acquire()
        try:
            if self._look(resume=self.resume, overwrite=self.overwrite, probe=False) != self.continuing:
                raise UserError(f"{self.path}: another process changed this {self.kind} run while this one started; "
                                "start it again")
        except BaseException:
            lock.release()
            raise
        return lock

    # -- changing
    def create(self) -> RunFolder:
        """Make the folder (or remove an old run's own files when overwriting) and write the marker."""
        if self.path.is_dir() and self.overwrite and self.saved() is not None:
            self.remove_owned()
        mkdir(self.path)
        if not self.continuing:
            write_json_atomic(self.path / self.marker, self.marker_content(), default=_json_default)
        self.remove_stale_temp_files()
        return self

    def marker_content(self) -> dict:
        return {"format": self.format, "kind": self.kind, "config": self.config, "config_hash": self.config_hash,
                **self.extra, "versions": library_versions(), "created": utc_now()}

    def owned_names(self) -> tuple[set[str], list[str]]:
        """(exact names, glob patterns) of the run's own files: the `owned` patterns, each ``{field}`` one made
        into the names the saved run's config gives."""
        saved = self.saved() or {}
        config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        exact: set[str] = set()
        patterns: list[str] = []
        for pat in self.owned:
            m = re.fullmatch(r"([^{}]*)\{(\w+)\}([^{}]*)", pat)
            if m is None:
                patterns.append(pat)
                continue
            value = config.get(m[2])
            values = value if isinstance(value, (list, tuple, dict)) else [] if value is None else [value]
            exact |= {f"{m[1]}{v}{m[3]}" for v in values if isinstance(v, (str, int)) and "/" not in str(v)}
        return exact, patterns

    def remove_owned(self) -> None:
        """Delete the run's own files (the `owned` patterns, `owned_names`) and nothing else."""
        exact, patterns = self.owned_names()
        try:
            for p in list(self.path.iterdir()):
                if p.name in exact or any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        except OSError as e:
            raise UserError(f"{self.path}: cannot remove the old run's files ({e.strerror or e})") from None

    def remove_stale_temp_files(self) -> None:
        """Temporary files an interrupted process of this run left (atomic writes are ``.NAME.tmp-PID…``)."""
        for folder in (self.path, self.path / CHECKPOINTS):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.name.startswith(".") and ".tmp-" in p.name and not _pid_alive(p.name):
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)

    # -- writing
    def file(self, name: str) -> Path:
        """Path of the run's own file `name` (confined to the folder)."""
        return confine(self.path, name, what="run file")

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.file(name)
        mkdir(path.parent)
        write_json_atomic(path, obj, default=_json_default)
        return path

    def save_tensors(self, name: str, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> Path:
        path = self.file(name)
        mkdir(path.parent)
        save_tensors(path, tensors, metadata)
        return path

    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.path / CHECKPOINTS)


def _pid_alive(name: str) -> bool:
    """Whether the process whose id a temp-file name carries still runs (its file is then in use). One rule with the
    folder locks (`difffeat.utils.lock.pid_alive`): a process of another user runs, and its file is never removed."""
    from difffeat.utils.lock import pid_alive

    m = re.search(r"\.tmp-(\d+)", name)
    if not m:
        return False
    pid = int(m[1])
    return pid != os.getpid() and pid_alive(pid)


# ------------------------------------------------------------------------------------- tensors on disk
def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                 metadata: Mapping[str, Any] | None = None) -> None:
    """torch tensors to a safetensors file, atomically; `metadata` values are stored as JSON."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v, default=_json_default) for k, v in (metadata or {}).items()})


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """(tensors, metadata) of a safetensors file written by `save_tensors`; UserError naming a damaged file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # a damaged file: name it, whatever safetensors raised
        raise UserError(f"{path}: unreadable ({e})") from None


def load_torch(path: str | os.PathLike):
    """A ``torch.save`` file read with ``weights_only=True``: tensors, numbers, strings and containers only,
    so a crafted file cannot run code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a plain-tensor checkpoint, refusing to load it ({reason})") from None


# ------------------------------------------------------------------------------------------ checkpoints
_STEP_DIR = re.compile(r"step-(\d{7,})")


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"state", "param_groups"}


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(hasattr(v, "detach") for v in value.values())


def _optimizer_to_tensors(sd: Mapping[str, Any]) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if hasattr(v, "detach"):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        pid, _, k = name.partition(".")
        state.setdefault(int(pid), {})[k] = v
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU, and CUDA when present), for a checkpoint."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpoint:
    """One saved step: ``load(name)`` gives back what ``save(step, name=…)`` was given."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = path, step
        self._json = read_json(path / "state.json", "checkpoint state")

    def __contains__(self, name: str) -> bool:
        return name in self._json or (self.path / f"{name}.safetensors").is_file()

    def load(self, name: str, default: Any = None) -> Any:
        if name in self._json:
            return self._json[name]
        file = self.path / f"{name}.safetensors"
        if not file.is_file():
            return default
        tensors, meta = load_tensors(file)
        if meta.get("kind") == "optimizer":
            return _optimizer_from_tensors(tensors, meta["optimizer"])
        if "meta" in meta:
            return tensors, meta["meta"]
        return tensors


class Checkpoints:
    """A run's checkpoints folder: ``save(step, **state)`` and ``latest()``.

    Each state entry is stored by what it is: a dict of tensors (a ``state_dict``) or an optimizer
    ``state_dict`` as safetensors, a ``(tensors, json_meta)`` pair as safetensors with metadata, anything
    else as JSON in ``state.json``. A checkpoint is written to a temporary folder and renamed, then
    ``latest.json`` points to it; only the newest `keep` are kept. Nothing is ever unpickled.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 1):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, **state: Any) -> Path:
        name = f"step-{int(step):07d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        mkdir(tmp)
        plain = {"step": int(step)}
        try:
            for key, value in state.items():
                if _is_optimizer_state(value):
                    tensors, meta = _optimizer_to_tensors(value)
                    save_tensors(tmp / f"{key}.safetensors", tensors, {"kind": "optimizer", "optimizer": meta})
                elif isinstance(value, tuple) and len(value) == 2 and _is_tensor_dict(value[0]):
                    save_tensors(tmp / f"{key}.safetensors", value[0], {"meta": value[1]})
                elif _is_tensor_dict(value):
                    save_tensors(tmp / f"{key}.safetensors", value)
                else:
                    plain[key] = value
            write_json_atomic(tmp / "state.json", plain, default=_json_default)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{self.root}: cannot write checkpoint {name} ({e.strerror or e})") from None
        except BaseException:  # a failed write (disk full, interrupt) leaves no half-written checkpoint folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json_atomic(self.root / "latest.json", {"step": int(step), "dir": name})
        kept = sorted((p for p in self.root.iterdir() if _STEP_DIR.fullmatch(p.name)), key=lambda p: p.name)
        for old in kept[: max(len(kept) - self.keep, 0)]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Checkpoint | None:
        pointer = self.root / "latest.json"
        if not pointer.is_file():
            return None
        data = read_json(pointer, "checkpoint pointer")
        name = data.get("dir") if isinstance(data, dict) else None
        # The pointer is read from disk: it may only name a checkpoint folder of this run.
        if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
            raise UserError(f"{pointer}: names {name!r}, not a checkpoint of this run")
        path = confine(self.root, name, what="checkpoint")
        if not path.is_dir():
            raise UserError(f"{pointer}: checkpoint {name} is missing")
        return Checkpoint(path, int(_STEP_DIR.fullmatch(name)[1]))
