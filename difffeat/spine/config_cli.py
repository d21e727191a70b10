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
    help, choices and type; list fields repeat (``--layer A --layer B``) unless they give `nargs`. A sub-config
    (`difffeat.spine.run.nested`) adds one option per field of its own, ``--PREFIX-FIELD`` unless it names the flag,
    whose value lands in the namespace as ``field.sub``.

    Fields in `positional` become positional arguments; `required` ones must be given. The parser's
    defaults remember which flag belongs to which field (`flag_of`)."""
    hints = typing.get_type_hints(config_cls)
    skip, positional, required = set(exclude), set(positional), set(required)
    flags = {}
    for f in dataclasses.fields(config_cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        meta = f.metadata
        if meta.get("nested"):
            sub_hints = typing.get_type_hints(meta["nested"])
            for sub in dataclasses.fields(meta["nested"]):
                if not sub.metadata.get("cli", True):
                    continue
                dest = f"{f.name}.{sub.name}"
                own = sub.metadata.get("flag") or "--" + sub.name.replace("_", "-")
                flags[dest] = meta["flags"].get(sub.name) or (
                    f"--{meta['prefix']}-{sub.name.replace('_', '-')}" if meta["prefix"] else own)
                help_text = " ".join(x for x in (meta.get("help"), sub.metadata.get("help")) if x)
                _add_option(parser, sub, sub_hints[sub.name], flags[dest], dest, False, help_text, nested=True)
            continue
        kind, is_list = _base_type(hints[f.name])
        if f.name in positional:
            kwargs: dict[str, Any] = {"help": meta.get("help") or None}
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if is_list:
                kwargs["nargs"] = "*"
            elif f.name not in required:
                kwargs["nargs"] = "?"
            parser.add_argument(f.name, type=kind if kind in (int, float) else None, **kwargs)
            flags[f.name] = f.name.upper()
            continue
        flags[f.name] = _flag(f)
        _add_option(parser, f, hints[f.name], flags[f.name], f.name, f.name in required, meta.get("help"))
    parser.set_defaults(_config_flags={**(parser.get_default("_config_flags") or {}), **flags})


def _add_option(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, flag: str, dest: str,
                required: bool, help_text: str | None, nested: bool = False) -> None:
    """The option of one config field (`dest`: where its value lands; a sub-config's fields default to None, so
    that what is not given keeps the sub-config's own default)."""
    meta = f.metadata
    kind, is_list = _base_type(hint)
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING or nested:  # type: ignore[misc]
        default = None  # filled from the config's own defaults in `config_from_args`
    kwargs: dict[str, Any] = {"help": help_text or None, "dest": dest}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    names = [flag] + ([meta["short"]] if meta.get("short") else [])
    if kind is bool and not is_list:
        own = f.default if f.default is not dataclasses.MISSING else False
        kwargs["action"] = argparse.BooleanOptionalAction if own or nested else "store_true"
        kwargs["default"] = None if nested else bool(default)
        _note_given(parser.add_argument(*names, **kwargs))
        return
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
    if required:
        kwargs["required"] = True
    _note_given(parser.add_argument(*names, **kwargs))


def _note_given(action: argparse.Action) -> None:
    """Let the option note in the namespace that it was given (`given_fields`); it parses as before."""
    action.__class__ = _noting(type(action))


def config_from_args(config_cls: type[Config], args: argparse.Namespace, **override) -> Config:
    """The config the parsed arguments describe: fields not given keep the config's own defaults. A sub-config's
    fields come as ``field.sub`` entries (in `args` and in `override`) and are gathered into its dict."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("nested"):
            sub = {s.name: getattr(args, f"{f.name}.{s.name}") for s in dataclasses.fields(f.metadata["nested"])
                   if getattr(args, f"{f.name}.{s.name}", None) is not None}
            if sub:
                values[f.name] = sub
            continue
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and (f.default is not dataclasses.MISSING or
                              f.default_factory is not dataclasses.MISSING):  # type: ignore[misc]
            continue
        values[f.name] = value
    for key, value in override.items():
        name, dot, sub = key.partition(".")
        if dot:
            values[name] = {**(values.get(name) or {}), sub: value}
        else:
            values[key] = value
    return config_cls.from_dict(values)


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
        fields = dataclasses.fields(config_cls)
        given &= {f.name for f in fields} | {f"{f.name}.{s.name}" for f in fields if f.metadata.get("nested")
                                             for s in dataclasses.fields(f.metadata["nested"])}
    return given


def flag_of(args: argparse.Namespace | None, field: str) -> str:
    """The command-line name of config field `field` (``--field-name`` unless the field says otherwise)."""
    flags = getattr(args, "_config_flags", None) or {}
    return flags.get(field, "--" + field.replace("_", "-"))
