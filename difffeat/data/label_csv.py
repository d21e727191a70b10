"""The ``key,label`` CSV that classification training and the sweep read: one parser, one set of errors.

A header with ``key`` and ``label`` columns (any case, a UTF-8 BOM allowed); no empty cell; one label per key
(a key may repeat with the same label). Errors name the file and, where one row is at fault, its line.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from difffeat.errors import UserError


def read_label_csv(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, int]]:
    """(key → label, key → line of its first row) of the CSV at `path`, checked as the module doc says."""
    path = Path(path)
    labels: dict[str, str] = {}
    lines: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            if "key" not in header or "label" not in header:
                raise UserError(f"{path}: a labels CSV needs 'key' and 'label' columns "
                                f"(found: {', '.join(reader.fieldnames or []) or 'none'})")
            for line, row in enumerate(reader, start=2):
                key, label = (row.get(header["key"]) or "").strip(), (row.get(header["label"]) or "").strip()
                if not key or not label:
                    raise UserError(f"{path}: line {line} has an empty key or label")
                if labels.get(key, label) != label:
                    raise UserError(f"{path}: key {key!r} has two labels ({labels[key]!r}, {label!r})")
                labels[key] = label
                lines.setdefault(key, line)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read the labels CSV ({e})") from None
    if not labels:
        raise UserError(f"{path}: no labelled keys")
    return labels, lines
