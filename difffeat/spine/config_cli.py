"""Command-line options generated from `difffeat.spine.run.Config` dataclasses: one source for every default.

A config's fields (made with `difffeat.spine.run.option`) carry their help, choices and bounds; this module turns
them into argparse options and back. It is the only place where a field name becomes a ``--flag``: library
errors (`ConfigError`) name the field, and `flag_of` lets the CLI show the flag instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from typing import Any

from difffeat.spine.run import Config


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation, looking through Optional / unions with None."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
        # e.g. `str | list[str]`: the command line gives the first, scalar form
        scalar = [a for a in args if typing.get_origin(a) not in (list, tuple)]
        return _base_type(scalar[0] if scalar else args[0])
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return (inner[0] if inner and inner[0] is not Ellipsis else str), True
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[Config], *,
                         exclude: Iterable[str] = (), positional: Iterable[str] = (),
                         required: Iterable[str] = ()) -> None:
    """Add one option per field of `config_cls` (those with ``cli=True``), with the field's default,
    help, choices and type; list fields repeat (``--layer A --layer B``) unless they give `nargs`.

    Fields in `positional` become positional arguments; `required` ones must be given. The parser's
    defaults remember which flag belongs to which field (`flag_of`)."""
    hints = typing.get_type_hints(config_cls)
    skip, positional, required = set(exclude), set(positional), set(required)
    flags = {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        meta = f.metadata
        kind, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = None  # filled from the config's own factory in `config_from_args`
        kwargs: dict[str, Any] = {"help": meta.get("help") or None}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if f.name in positional:
            if is_list:
                kwargs["nargs"] = "*"
            elif f.name not in required:
                kwargs["nargs"] = "?"
            parser.add_argument(f.name, type=kind if kind in (int, float) else None, **kwargs)
            flags[f.name] = f.name.upper()
            continue
        flag = _flag(f)
        flags[f.name] = flag
        names = [flag] + ([meta["short"]] if meta.get("short") else [])
        kwargs["dest"] = f.name
        if kind is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            kwargs["default"] = bool(default)
            _note_given(parser.add_argument(*names, **kwargs))
            continue
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if kind in (int, float, str):
            kwargs["type"] = kind
        if is_list:
            if meta.get("nargs") is not None:
                kwargs["nargs"] = meta["nargs"]
            else:
                kwargs["action"] = "append"
            kwargs["default"] = None
        else:
            kwargs["default"] = default
        if f.name in required:
            kwargs["required"] = True
        _note_given(parser.add_argument(*names, **kwargs))
    parser.set_defaults(_config_flags={**(parser.get_default("_config_flags") or {}), **flags})


def _note_given(action: argparse.Action) -> None:
    """Let the option note in the namespace that it was given (`given_fields`); it parses as before."""
    action.__class__ = _noting(type(action))


def config_from_args(config_cls: type[Config], args: argparse.Namespace, **override) -> Config:
    """The config the parsed arguments describe: fields not given keep the config's own defaults."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and (f.default is not dataclasses.MISSING or
                              f.default_factory is not dataclasses.MISSING):  # type: ignore[misc]
            continue
        values[f.name] = value
    return config_cls.from_dict({**values, **override})


GIVEN = "_config_given"  # the namespace entry where the options of config fields note that they were given


@functools.cache
def _noting(action_cls: type[argparse.Action]) -> type[argparse.Action]:
    """`action_cls` that also notes its field in the namespace's `GIVEN` set when the command line gives it."""

    class Noting(action_cls):  # type: ignore[valid-type, misc]
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            given = getattr(namespace, GIVEN, None)
            if given is None:
                given = set()
                setattr(namespace, GIVEN, given)
            given.add(self.dest)

    Noting.__name__ = Noting.__qualname__ = f"Noting{action_cls.__name__}"
    return Noting


def given_fields(args: argparse.Namespace, config_cls: type[Config] | None = None) -> set[str]:
    """The config fields whose options the command line gave (even with their default value), for presets that
    fill only what the user left unset (a data-set profile). Options made by `add_config_arguments` note this
    while parsing; positional fields count as given."""
    given = set(getattr(args, GIVEN, None) or ())
    if config_cls is not None:
        given &= {f.name for f in dataclasses.fields(config_cls)}
    return given


def flag_of(args: argparse.Namespace | None, field: str) -> str:
    """The command-line name of config field `field` (``--field-name`` unless the field says otherwise)."""
    flags = getattr(args, "_config_flags", None) or {}
    return flags.get(field, "--" + field.replace("_", "-"))
