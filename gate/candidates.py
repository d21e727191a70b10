"""Candidates: named technique lists that GATE compares against `reference` (no technique).

A candidates file is YAML (or JSON, which YAML reads): a mapping of names to lists of technique specs,
bare or under a `candidates:` (or `variants:`) key, so a variants file can be ranked as it is::

    canny: [controlnet:canny]
    caption: [prompt:caption]
    both:
      - controlnet:canny,scale=0.8
      - prompt:caption

A name with no specs (`[]` or nothing) is a plain run. `reference` is always added, with no technique.
Errors name the file, the line and the field, and carry `parse_technique`'s own message (the valid specs).
"""

from __future__ import annotations

import re
from pathlib import Path

from difffeat.errors import UserError

REFERENCE = "reference"
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # the names a variants file (`difffeat extract --variants`) accepts


def check_candidates(candidates: dict[str, list[str]], where: str = "candidates") -> dict[str, list[str]]:
    """{name: canonical specs} with `reference` first (added when absent); fails on a bad name or spec."""
    from pipelines.base import parse_technique

    out: dict[str, list[str]] = {REFERENCE: []}
    for name, specs in candidates.items():
        if not NAME.match(str(name)):
            raise UserError(f"{where}: candidate name {name!r} must be letters, digits, '_', '-' or '.'")
        specs = [specs] if isinstance(specs, str) else list(specs or [])
        if name == REFERENCE:
            if specs:
                raise UserError(f"{where}: {REFERENCE!r} is the no-technique anchor; give it no specs or leave it out")
            continue
        try:
            out[str(name)] = [parse_technique(s).spec for s in specs]
        except UserError as e:
            raise UserError(f"{where}: candidate {name!r}: {e}") from None
    return out


def read_candidates(path: str | Path) -> dict[str, list[str]]:
    """The candidates of a YAML/JSON file → {name: canonical specs}, `reference` first.

    Read through YAML's node tree (not `safe_load`) so that every error can name its line, and a name
    given twice is an error instead of silently keeping the last one.
    """
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    from pipelines.base import parse_technique

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read the candidates file ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the candidates file is not UTF-8 text") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None

    def at(node) -> str:
        return f"{path}:{node.start_mark.line + 1}"

    if root is None:
        raise UserError(f"{path}: empty; expected a mapping of candidate names to lists of technique specs")
    if isinstance(root, MappingNode) and len(root.value) == 1 and isinstance(root.value[0][0], ScalarNode) \
            and root.value[0][0].value in ("candidates", "variants"):
        root = root.value[0][1]
    if not isinstance(root, MappingNode):
        raise UserError(f"{at(root)}: expected a mapping of candidate names to lists of technique specs")
    if not root.value:
        raise UserError(f"{at(root)}: no candidates")
    out: dict[str, list[str]] = {REFERENCE: []}
    seen: dict[str, int] = {}
    for key, value in root.value:
        if not isinstance(key, ScalarNode) or not NAME.match(key.value):
            raise UserError(f"{at(key)}: candidate name {getattr(key, 'value', '?')!r} must be letters, digits, "
                            "'_', '-' or '.'")
        name = key.value
        if name in seen:
            raise UserError(f"{at(key)}: candidate {name!r} appears twice (first at line {seen[name]})")
        seen[name] = key.start_mark.line + 1
        if isinstance(value, ScalarNode):
            items = [] if value.tag.endswith(":null") or value.value == "" else [value]
        elif isinstance(value, SequenceNode):
            items = value.value
        else:
            raise UserError(f"{at(value)}: candidate {name!r}: expected a list of technique specs, got a mapping")
        if name == REFERENCE:
            if items:
                raise UserError(f"{at(value)}: {REFERENCE!r} is the no-technique anchor; give it no specs or leave "
                                "it out")
            continue
        specs = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, ScalarNode) or item.tag.endswith(":null"):
                raise UserError(f"{at(item)}: candidate {name!r}, spec {i}: expected a technique spec string "
                                "such as controlnet:canny")
            try:
                specs.append(parse_technique(item.value).spec)
            except UserError as e:
                raise UserError(f"{at(item)}: candidate {name!r}, spec {i}: {e}") from None
        out[name] = specs
    return out
