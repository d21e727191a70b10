"""Image labels for classification: the ``key,label`` CSV, class names, and label → class id.

A label is a class name or an integer class id, never both in one file (a file that mixes them is refused,
naming an example of each). Integer ids are class names of their own kind: ids 0…K−1 with K = largest id + 1,
a missing id being a class with no sample; an id that would make far more classes than there are labelled
keys (a typo such as ``50000000``) is refused, naming the file and line. Errors name the file and, where one
row is at fault, its line.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difffeat.data.label_csv import read_label_csv
from difffeat.errors import UserError

EXAMPLES = 3  # keys named in an error message
CLASSES_PER_KEY = 2  # integer ids may make at most this many classes per labelled key (more is a typo)
INTEGER = re.compile(r"[+-]?[0-9]+")


def some(items: Sequence[str]) -> str:
    """A few of `items` for an error message: 'a', 'b', 'c' … (N in all)."""
    items = sorted(items)
    more = f" … ({len(items)} in all)" if len(items) > EXAMPLES else ""
    return ", ".join(repr(k) for k in items[:EXAMPLES]) + more


def is_integer(label: str) -> bool:
    return INTEGER.fullmatch(label) is not None


@dataclass(frozen=True)
class Labels:
    """A labels CSV: key → label text, and the line of each key (for error messages)."""

    path: str
    labels: dict[str, str]
    lines: dict[str, int]

    def __getitem__(self, key: str) -> str:
        return self.labels[key]

    def __contains__(self, key: str) -> bool:
        return key in self.labels

    def __iter__(self):
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def at(self, key: str) -> str:
        """Where `key` is labelled: "FILE: line N"."""
        return f"{self.path}: line {self.lines[key]}"


def read_labels(path: str | os.PathLike) -> Labels:
    """The ``key`` and ``label`` columns (case-insensitive header) of a CSV, checked: no empty cell, one label
    per key (`difffeat.data.label_csv`), and not names and integer ids mixed."""
    labels, lines = read_label_csv(path)
    result = Labels(str(path), labels, lines)
    _check_one_kind(result)
    return result


def _check_one_kind(labels: Labels) -> None:
    """Integer ids and names in one file would become unrelated classes ("3" beside "cat"): refuse."""
    integer = next((k for k in labels if is_integer(labels[k])), None)
    name = next((k for k in labels if not is_integer(labels[k])), None)
    if integer is not None and name is not None:
        raise UserError(f"{labels.path}: mixes integer class ids (line {labels.lines[integer]}: "
                        f"{labels[integer]!r}) with class names (line {labels.lines[name]}: {labels[name]!r}); "
                        "use one kind throughout")


def write_labels_csv(root: str | os.PathLike, out: str | os.PathLike, column: str = "label") -> int:
    """A labels CSV for an imagefolder / Shapes-LT root: one row per ``metadata.csv`` row, the key being the
    image path relative to `root` (as `difffeat extract ROOT` names it). Returns the number of rows."""
    root = Path(root)
    rows = []
    for meta in sorted(root.rglob("metadata.csv")):
        with open(meta, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("file_name") and row.get(column, "") != "":
                    rows.append(((meta.parent / row["file_name"]).relative_to(root).as_posix(), row[column]))
    if not rows:
        raise UserError(f"{root}: no metadata.csv rows with file_name and {column!r}")
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label"])
        writer.writerows(sorted(rows))
    return len(rows)


def load_class_names(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, ``a,b,c``, a text file (one per line), or JSON (a list, or {"names": […]})."""
    if not isinstance(spec, (str, os.PathLike)):
        names = [str(n) for n in spec]
    else:
        path = Path(spec)
        if path.is_file():
            text = path.read_text()
            if path.suffix.lower() == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: unreadable classes file ({e})") from None
                data = data.get("names") if isinstance(data, dict) else data
                if not isinstance(data, list):
                    raise UserError(f"{path}: a classes file needs a list \"names\"")
                names = [str(n) for n in data]
            else:
                names = [line.strip() for line in text.splitlines() if line.strip()]
        elif "," in str(spec) and not path.suffix:
            names = [n.strip() for n in str(spec).split(",") if n.strip()]
        else:
            raise UserError(f"{spec}: no such classes file (give a names file, classes.json or a,b,c)")
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"{spec}: need at least two distinct class names")
    return names


def infer_class_names(labels: Labels, keys: Sequence[str]) -> list[str]:
    """The classes of the labels of `keys`: integer ids → "0".."max" (ids are kept, so a missing id is a class
    with zero samples); else the sorted distinct names."""
    if not all(is_integer(labels[k]) for k in keys):
        return sorted({labels[k] for k in keys})
    ids = {k: int(labels[k]) for k in keys}
    low = min(ids, key=ids.get)
    if ids[low] < 0:
        raise UserError(f"{labels.at(low)}: integer labels are class ids and must be ≥ 0, got {labels[low]!r}")
    high = max(ids, key=ids.get)
    count = ids[high] + 1
    if count > CLASSES_PER_KEY * len(keys):
        raise UserError(f"{labels.at(high)}: label {labels[high]!r} would make {count} classes (integer labels "
                        f"are class ids 0…K−1) for {len(keys)} labelled keys; fix the label or give the class "
                        "names (classes, --classes)")
    return [str(i) for i in range(count)]


def encode_labels(labels: Labels, keys: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Class ids of the labels of `keys` (names, or integer ids when the names are "0".."C−1"); UserError
    naming the file (and the first line) for labels that are not among `names`."""
    index = {n: i for i, n in enumerate(names)}
    integer = all(n == str(i) for i, n in enumerate(names))
    ids, unknown = [], {}
    for key in keys:
        label = labels[key]
        name = str(int(label)) if integer and is_integer(label) else label
        if name not in index:
            unknown.setdefault(label, key)
            continue
        ids.append(index[name])
    if unknown:
        first = min(unknown.values(), key=lambda k: labels.lines[k])
        raise UserError(f"{labels.path}: labels {some(list(unknown))} are not among the training classes "
                        f"({', '.join(names[:12])}{' …' if len(names) > 12 else ''}); first on line "
                        f"{labels.lines[first]}")
    return np.asarray(ids, dtype=np.int64)
