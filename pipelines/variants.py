"""Variants: named technique lists that one `difffeat extract` run extracts side by side.

`--variant NAME=SPEC[+SPEC…]` on the command line, or a variants file (YAML or JSON) that `difffeat gate
--emit` writes::

    variants:
      plain: []
      canny: [controlnet:canny, denoise-from:60]

Every spec is checked when read, so a typo fails before any model loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from difffeat.errors import UserError
from pipelines.base import parse_technique, technique_names

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def split_specs(text: str) -> list[str]:
    """`controlnet:canny+prompt:fine` → specs; a `+` starts a new spec only before a technique name."""
    if not text.strip():
        return []
    names = "|".join(map(re.escape, technique_names()))
    return [p.strip() for p in re.split(rf"\+(?=(?:{names})(?:[:,]|$))", text) if p.strip()]


def _checked(name: str, specs: list, where: str) -> list[str]:
    if not NAME.match(name):
        raise UserError(f"{where}: variant name {name!r} must be letters, digits, '_', '-' or '.'")
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise UserError(f"{where}: variant {name!r} must be a list of technique specs")
    out = []
    for spec in specs:
        try:
            out.append(parse_technique(spec).spec)
        except UserError as e:
            raise UserError(f"{where}: variant {name!r}: {e}") from None
    return out


def parse_variant_args(args: list[str]) -> dict[str, list[str]]:
    """`NAME=SPEC[+SPEC…]` strings → {name: canonical specs}, in the order given."""
    variants: dict[str, list[str]] = {}
    for arg in args:
        name, eq, rest = arg.partition("=")
        if not eq:
            raise UserError(f"variant {arg!r}: use NAME=SPEC[+SPEC…] (NAME= for no technique)")
        if name.strip() in variants:
            raise UserError(f"variant {arg!r}: variant {name.strip()!r} given twice")
        variants[name.strip()] = _checked(name.strip(), split_specs(rest), f"variant {arg!r}")
    return variants


class _DuplicateKey(ValueError):
    """A mapping of a YAML or JSON file names one key twice; `str(e)` names the key (and, for YAML, both lines)."""


def load_mapping_text(text: str, json_format: bool = False):
    """YAML (or JSON) text → Python data, refusing a key given twice in any mapping (`_DuplicateKey`) where the plain
    loaders silently keep the last one."""
    import yaml

    if json_format:
        def pairs(items: list[tuple]) -> dict:
            out: dict = {}
            for key, value in items:
                if key in out:
                    raise _DuplicateKey(f"key {key!r} appears twice")
                out[key] = value
            return out

        return json.loads(text, object_pairs_hook=pairs)

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise _DuplicateKey(f"key {key!r} appears twice (line {line}, first at line {seen[key]})")
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader: plain data only, no Python objects


def read_variants_file(path: str | Path) -> dict[str, list[str]]:
    """A variants file (YAML or JSON, `variants:` mapping or a bare mapping) → {name: canonical specs}."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read the variants file ({e.strerror})") from None
    try:
        data = load_mapping_text(text, json_format=path.suffix == ".json")
    except _DuplicateKey as e:  # YAML and JSON keep the last of two equal keys: a variant would vanish unseen
        raise UserError(f"{path}: {e}; give each name once") from None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})")\
            from None
    data = data.get("variants", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of variant names to lists of technique specs")
    return {str(name): _checked(str(name), specs or [], str(path)) for name, specs in data.items()}


def write_variants_file(path: str | Path, variants: dict[str, list[str]], comment: str = "") -> None:
    import yaml

    from difffeat.utils.atomic import write_atomic

    head = "".join(f"# {line}\n" for line in comment.splitlines())
    write_atomic(Path(path), (head + yaml.safe_dump({"variants": variants}, sort_keys=False)).encode())
