"""The technique interface, its registry, and spec strings (`controlnet:canny,scale=1.0`).

A technique is a dataclass config plus the hooks it overrides. `Technique` declares every hook as a no-op;
`TechniqueStack` calls, for each hook, the techniques that override it (`Technique.implements`):

- ``weights``        (LoRA): the adapter `bind` loaded into the pipeline, active while the stack runs;
- ``prepare_prompt`` (prompt templates): rewrites each image's prompt before encoding;
- ``guidance``       (CFG): combines an unconditional branch (`negative_prompt`) with the conditional one;
- ``residuals``      (ControlNet): residuals for the UNet's skip connections (a transformer's blocks), from
                      `control_images`;
- ``schedule``       (denoise-from): the timesteps to noise at and denoise through before the feature pass.

Techniques compose in that hook order (`HOOKS`; a technique's place is the first hook it overrides), and in
the order given among techniques of one place, whatever order the user lists them in; so a spec list names
one composition.

A technique is one module in `pipelines/techniques/` with a `@register_technique` class; the folder's
modules are found with `pkgutil`, and other installed packages add theirs through the entry-point group
``pipelines.techniques`` (each entry names a module that registers its techniques on import).

Spec strings are ``NAME[:VALUE][,FIELD=VALUE]…``: ``VALUE`` fills the technique's positional field, unless a
technique is registered under ``NAME:VALUE`` itself (`prompt:auto`, a technique of its own beside `prompt`).
A comma followed by ``WORD=`` starts a new field; in a free-text field (a prompt template, a negative
prompt) it stays text unless WORD is one of the technique's fields, so templates may hold commas.
`Technique.spec` writes the canonical string (non-default fields in declaration order), and
``parse_technique(t.spec) == t``: specs round-trip through the store manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from difffeat.errors import UserError

# The hooks that place a technique in a composition, in composition order.
HOOKS = ("weights", "prepare_prompt", "guidance", "residuals", "schedule")
PLUGIN_GROUP = "pipelines.techniques"

TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls):
    """Class decorator: registers a `Technique` dataclass under its `name`."""
    if not cls.hooks():
        raise ValueError(f"{cls.__name__}: overrides none of the technique hooks {HOOKS}")
    TECHNIQUES[cls.name] = cls
    return cls


class MissingInput(UserError):
    """An image lacks what a technique needs (a caption, a control map); its run skips the image."""


class Technique:
    """Base of all techniques (subclasses are dataclasses). Every hook is a no-op here; a technique overrides
    those it implements, and the stack calls only those (see the module docstring).

    `bind(pipe)` is called once per stack, with the pipeline the technique will act on: load what it needs,
    check that it fits the pipeline (raise `UserError` when it does not), and return what it loaded (or None);
    the stack keeps that and hands it back to `residuals` as `loaded`, so the config object itself never holds
    runtime modules.
    """

    name: ClassVar[str]
    positional: ClassVar[str | None] = None  # the field `NAME:VALUE` fills
    free_text: ClassVar[tuple[str, ...]] = ()  # fields whose values may hold ", x=y" as plain text

    def bind(self, pipe) -> Any:
        """Load and check what the technique needs for `pipe`; returns it (default: nothing)."""
        return None

    # -------------------------------------------------------------------------------------------- hooks
    def weights(self) -> tuple[str, float] | None:
        """(adapter name, scale) of the weights `bind` loaded into the pipeline, active while the stack runs."""
        return None

    def prepare_prompt(self, prompt: str, fields: Mapping[str, str | None], key: str = "") -> str:
        """The image's prompt after this technique (`prompt` is the prompt so far); raise `MissingInput` when
        the image lacks a field the technique needs."""
        return prompt

    def guidance(self, uncond, cond):
        """Unconditional and conditional branches (UNet outputs or captured features) combined into one."""
        return cond

    def negative_prompt(self) -> str:
        """The prompt of the unconditional branch `guidance` combines."""
        return ""

    def residuals(self, loaded, z, t, embeds, control, call: dict):
        """The keyword arguments that carry residuals into the denoiser's call `call` (its keyword arguments, as the
        backbone made them): a UNet's `{"down_block_additional_residuals": …, "mid_block_additional_residual": …}`,
        an SD3 transformer's `{"block_controlnet_hidden_states": [...]}`; z and t as the backbone gives them to a
        ControlNet (`Backbone.control_inputs`). `loaded` is what `bind` returned and `control` the batch's rows of
        `control_images` after `prepare_control`."""
        return None

    def control_images(self, images, keys: list[str]):
        """The control inputs `residuals` takes, for images [B, 3, H, W] in [0, 1]."""
        return None

    def prepare_control(self, loaded, pipe, control):
        """One batch's control inputs as the network `loaded` takes them (default: as `control_images` gave them;
        an SD3 ControlNet takes VAE latents); called once per batch, not per denoiser call."""
        return control

    def schedule(self, t: int) -> list[int]:
        """Timesteps from where noising starts down to the feature timestep `t` (both included)."""
        return [t]

    def missing(self, key: str) -> str | None:
        """Why image `key` cannot be processed under this technique (e.g. no control map), or None."""
        return None

    def image_fields(self, loaded, images, keys: list[str]) -> list[dict[str, str]]:
        """Per image, the prompt fields this technique derives from the image itself (`prompt:auto`'s caption),
        for images [B, 3, H, W] in [0, 1]; `loaded` is what `bind` returned. Not a composition hook: a technique
        that overrides it also overrides `prepare_prompt`, which reads the fields."""
        return [{} for _ in keys]

    # ------------------------------------------------------------------------------------------- queries
    @classmethod
    def implements(cls, hook: str) -> bool:
        """Whether this technique overrides `hook`."""
        return getattr(cls, hook) is not getattr(Technique, hook)

    @classmethod
    def hooks(cls) -> list[str]:
        """The composition hooks this technique overrides, in composition order."""
        return [h for h in HOOKS if cls.implements(h)]

    @classmethod
    def place(cls) -> int:
        """Its place in a composition: the first hook it overrides."""
        return HOOKS.index(cls.hooks()[0])

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
    load_techniques()
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
    load_techniques()
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
    if ":" in text and not rest.strip():  # `controlnet:` with its value forgotten, not a request for the default
        raise UserError(f"technique {text!r}: nothing after ':'; valid: {describe(cls)}")
    # A technique registered as NAME:VALUE (`prompt:auto`) takes that spelling over NAME's positional value.
    head, comma, tail = rest.partition(",") if not rest.startswith(",") else ("", "", "")
    if f"{name}:{head.strip()}" in TECHNIQUES and (not comma or re.match(r"\s*[A-Za-z_][\w-]*=", tail)):
        name = f"{name}:{head.strip()}"
        cls, rest = TECHNIQUES[name], comma + tail
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
    """Parsed techniques in composition order (by place, then as given)."""
    parsed = [parse_technique(t) for t in techniques]
    return sorted(parsed, key=lambda t: t.place())  # sorted() is stable


@functools.cache
def load_techniques() -> None:
    """Import every technique module once: those in `pipelines/techniques/` and those other packages name in the
    entry-point group `PLUGIN_GROUP`; each registers its techniques on import. Imported on first need, so
    `pipelines.base` does not pull in their heavier dependencies before a spec is parsed."""
    from importlib.metadata import entry_points

    from pipelines import techniques

    for module in pkgutil.iter_modules(techniques.__path__, techniques.__name__ + "."):
        importlib.import_module(module.name)
    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()
