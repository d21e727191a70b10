"""Segmentation classes: names, the ignore label, training pixel counts and the head / middle / tail grouping
long-tail segmentation reports by, read from a ``classes.json``, a names file or a list."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError, read_json
from downstream.groups import head_middle_tail

IGNORE_INDEX = 255
GROUPS = ("head", "middle", "tail")


@dataclass
class SegClasses:
    """Class names, the ignore label, train pixel counts and the head / middle / tail grouping (by name)."""

    names: list[str]
    ignore_index: int = IGNORE_INDEX
    pixel_counts: list[int] | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def group_ids(self) -> dict[str, list[int]]:
        """Group → class ids; empty when no grouping is known."""
        index = {name: i for i, name in enumerate(self.names)}
        return {g: [index[n] for n in self.groups.get(g, [])] for g in GROUPS if g in self.groups}

    def tail_ids(self) -> list[int]:
        return self.group_ids().get("tail", [])

    def with_counts(self, counts: Sequence[int]) -> SegClasses:
        """These classes with `counts` as pixel counts and, when no grouping was given, the grouping from them."""
        counts = [int(c) for c in counts]
        groups = self.groups or head_middle_tail(self.names, counts)
        return SegClasses(list(self.names), self.ignore_index, counts, groups)

    def to_dict(self) -> dict:
        return {"names": self.names, "ignore_index": self.ignore_index, "pixel_counts": self.pixel_counts,
                "groups": self.groups}

    @classmethod
    def from_dict(cls, d: dict) -> SegClasses:
        return cls(list(d["names"]), int(d.get("ignore_index", IGNORE_INDEX)), d.get("pixel_counts"),
                   dict(d.get("groups") or {}))


def load_classes(spec: str | os.PathLike | Sequence[str]) -> SegClasses:
    """Classes from a ``classes.json`` (Shapes-LT's, or any JSON with "names" or a plain list of names),
    a text file with one name per line, a comma-separated string of names, or a list of names.

    Groups in the JSON may be given by name or by class id.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return _checked_classes(SegClasses([str(n) for n in spec]), "class list")
    path = Path(spec)
    try:
        is_file = path.is_file()
    except OSError:  # a long a,b,c list is no file name the system can even look up
        is_file = False
    if not is_file:
        if isinstance(spec, str) and "," in spec:
            return _checked_classes(SegClasses([n.strip() for n in spec.split(",") if n.strip()]), "class list")
        raise UserError(f"{spec}: no such classes file (give classes.json, a names file, or a,b,c)")
    if path.suffix.lower() != ".json":
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable classes file ({e})") from None
        return _checked_classes(SegClasses(names), str(path))
    data = read_json(path, "classes file")
    if isinstance(data, list):
        data = {"names": data}
    if not isinstance(data, dict) or not isinstance(data.get("names"), list):
        raise UserError(f"{path}: a classes file needs a list \"names\"")
    names = [str(n) for n in data["names"]]
    counts = data.get("train_pixel_counts", data.get("pixel_counts"))
    if counts is not None and len(counts) != len(names):
        raise UserError(f"{path}: {len(counts)} pixel counts for {len(names)} classes")
    groups = {}
    for g, members in (data.get("groups") or {}).items():
        if g in GROUPS:
            groups[g] = [names[m] if isinstance(m, int) and 0 <= m < len(names) else str(m) for m in members]
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if isinstance(ignore, bool) or not isinstance(ignore, int):
        raise UserError(f"{path}: ignore_index must be an integer, got {ignore!r}")
    return _checked_classes(SegClasses(names, ignore, counts, groups), str(path))


def _checked_classes(classes: SegClasses, where: str) -> SegClasses:
    if not classes.names:
        raise UserError(f"{where}: no class names")
    if len(set(classes.names)) != len(classes.names):
        raise UserError(f"{where}: class names repeat")
    if classes.ignore_index < len(classes.names) and classes.ignore_index >= 0:
        raise UserError(f"{where}: ignore index {classes.ignore_index} is a class id (there are "
                        f"{len(classes.names)} classes)")
    unknown = sorted({n for members in classes.groups.values() for n in members} - set(classes.names))
    if unknown:
        raise UserError(f"{where}: groups name unknown classes {unknown[:5]}")
    return classes


def resolve_classes(spec: str | os.PathLike | Sequence[str] | None, masks: str | os.PathLike) -> SegClasses:
    """`load_classes(spec)`, or the mask root's ``classes.json`` when `spec` is None."""
    if spec is not None:
        return load_classes(spec)
    default = Path(masks) / "classes.json"
    if not default.is_file():
        raise UserError(f"{masks}: no classes.json there; give --classes (a classes.json, a names file or a,b,c)")
    return load_classes(default)


def check_tail_classes(tail_classes: Sequence[int] | None, num_classes: int) -> list[int] | None:
    """The listed tail class ids, checked against the classes (ConfigError naming the field and bad ids)."""
    if tail_classes is None:
        return None
    bad = [c for c in tail_classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ConfigError("tail_classes", f"ids {bad[:5]} are not among the {num_classes} classes (a profile's "
                                          "list needs the data set's class ids)")
    return [int(c) for c in tail_classes]
