"""Walking a data-set folder: linked folders are followed (data sets are often assembled from links), but each
real folder is entered once, so a link cycle or two links to one folder cannot list a file twice."""

from __future__ import annotations

import os
from collections.abc import Iterator


def walk_once(root: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root, followlinks=True)``, top-down, entering each real folder once, with hidden sub-folders left
    out and the rest in sorted order. As with `os.walk`, the caller may prune the yielded sub-folder list in
    place (to skip folders, or to stay at the top level)."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield folder, dirs, files
