"""The technique interface, its registry, and spec strings (`controlnet:canny,scale=1.0`).

A technique is a dataclass config plus the hooks of its *kind*; the kind says where it acts on
extraction and generation:

- ``weights``  (LoRA): changes UNet / text-encoder weights while active;
- ``prompt``   (prompt templates): rewrites each image's prompt before encoding;
- ``guidance`` (CFG): runs an unconditional branch and combines it with the conditional one;
- ``residual`` (ControlNet): adds residuals to the UNet's skip connections;
- ``schedule`` (denoise-from): changes where noising starts and which steps run before extraction.

Techniques compose in that kind order (`KIND_ORDER`), and in the order given within a kind, whatever
order the user lists them in; so a spec list names one composition.

Spec strings are ``NAME[:VALUE][,FIELD=VALUE]…``: ``VALUE`` fills the technique's positional field.
A comma followed by ``WORD=`` starts a new field; in a free-text field (a prompt template, a negative
prompt) it stays text unless WORD is one of the technique's fields, so templates may hold commas.
`Technique.spec` writes the canonical string (non-default fields in declaration order), and
``parse_technique(t.spec) == t``: specs round-trip through the store manifest.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable
from typing import ClassVar

from difffeat.errors import UserError

KIND_ORDER = ("weights", "prompt", "guidance", "residual", "schedule")

TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls):
    """Class decorator: registers a `Technique` dataclass under its `name`."""
    if cls.kind not in KIND_ORDER:
        raise ValueError(f"{cls.__name__}: kind {cls.kind!r} is not one of {KIND_ORDER}")
    TECHNIQUES[cls.name] = cls
    return cls


class Technique:
    """Base of all techniques (subclasses are dataclasses; see the module docstring for the kinds).

    `bind(pipe)` is called once before use, with the pipeline the technique will act on: load models,
    check that they fit the pipeline, and raise `UserError` when they do not.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    positional: ClassVar[str | None] = None  # the field `NAME:VALUE` fills
    free_text: ClassVar[tuple[str, ...]] = ()  # fields whose values may hold ", x=y" as plain text

    def bind(self, pipe) -> None:
        """Load and check what the technique needs for `pipe` (default: nothing)."""

    @property
    def spec(self) -> str:
        parts, head = [], self.name
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name == self.positional:
                head = f"{self.name}:{_format(value)}"
            elif value != _default(f):
                parts.append(f"{f.name}={_format(value)}")
        return ",".join([head, *parts])

    def __str__(self) -> str:
        return self.spec


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return f"{value:.1f}"
    return str(value)


def _convert(cls, field: dataclasses.Field, raw: str, spec: str):
    hint = typing.get_type_hints(cls)[field.name]
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = base[0] if typing.get_origin(hint) is not None else hint
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise UserError(f"technique {spec!r}: {field.name} must be {kind.__name__}, got {raw!r}") from None
    return raw


def technique_names() -> list[str]:
    _load_builtins()
    return sorted(TECHNIQUES)


def describe(cls) -> str:
    """`name:POSITIONAL,field=default,…`: one line of the valid parameters, for error messages."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    head = f"{cls.name}:{cls.positional.upper()}" if cls.positional else cls.name
    return ",".join([head] + [f"{f.name}={_format(_default(f))}" for f in fields if f.name != cls.positional])


def parse_technique(spec: str | Technique) -> Technique:
    """A technique from its spec string (a `Technique` passes through); unknown names or fields fail with
    the valid ones listed."""
    if isinstance(spec, Technique):
        return spec
    _load_builtins()
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    if ":" not in text and "," in name:  # NAME,field=… without a positional value
        name, _, rest = text.partition(",")
        rest = "," + rest
    name = name.strip()
    if name not in TECHNIQUES:
        raise UserError(f"unknown technique {name!r} in {text!r}; valid: "
                        + "; ".join(describe(TECHNIQUES[n]) for n in sorted(TECHNIQUES)))
    cls = TECHNIQUES[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    raw: dict[str, str] = {}
    last = None
    for i, piece in enumerate(re.split(r",\s*(?=[A-Za-z_][\w-]*=)", rest) if rest else []):
        if i == 0 and not rest.startswith(","):  # NAME:VALUE
            if cls.positional is None:
                if piece:
                    raise UserError(f"technique {text!r}: {name} takes no value after ':'; valid: {describe(cls)}")
                continue
            raw[last := cls.positional] = piece
            continue
        key, _, value = piece.lstrip(",").partition("=")
        key = key.strip()
        if key in fields:
            raw[last := key] = value.strip()
        elif last in cls.free_text:  # "a, b=c" inside free text (a template) is text
            raw[last] += "," + piece
        elif key:
            raise UserError(f"technique {text!r}: unknown parameter {key!r}; valid: {describe(cls)}")
    kwargs = {k: _convert(cls, fields[k], v, text) for k, v in raw.items()}
    missing = [f for f in fields.values() if _default(f) is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise UserError(f"technique {text!r}: missing {missing[0].name}; valid: {describe(cls)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"technique {text!r}: {e}") from None


def ordered(techniques: Iterable[str | Technique]) -> list[Technique]:
    """Parsed techniques in composition order (by kind, then as given)."""
    parsed = [parse_technique(t) for t in techniques]
    return sorted(parsed, key=lambda t: KIND_ORDER.index(t.kind))  # sorted() is stable


def _load_builtins() -> None:
    # The built-in techniques register themselves on import; importing here keeps `pipelines.base`
    # free of their heavier dependencies until a spec is parsed.
    from pipelines import cfg, controlnet, denoise_from, lora, prompt  # noqa: F401
