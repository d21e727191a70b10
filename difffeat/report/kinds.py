"""The kinds of folder `difffeat report` shows, each with its section: registered by the package that writes them.

A `SectionKind` says how to recognise a folder of its kind (`detect`, from the files in it and its run marker) and
how to show it (`render` → `difffeat.report.page.Section`); optionally a sentence for the page's opening paragraph
(`chain_step`) and a table comparing every folder of the kind (`compare`). The core knows one kind itself, the
feature store (`difffeat.report.store_section`); every other arrives through the entry-point group
``difffeat.report_sections`` (each entry a `SectionKind`), so the package that writes a run's files is the one that
reads them back, and the core names none of those packages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SECTION_GROUP = "difffeat.report_sections"


@dataclass(frozen=True)
class SectionKind:
    """One kind of folder in the report.

    - `kind`: its name ("gate", "train-seg", …); `title`: how the page names it ("GATE", "segmentation head").
    - `detect(path, marker)`: whether `path` is a folder of this kind; `marker` is its ``config.json`` content
      (a dict) or None. Kinds are asked in `detect_rank` order, the first that answers yes wins.
    - `render(path, marker, anchor, shown, n_images)`: the folder's `Section`.
    - `page_rank`: where its sections stand on the page; `chain_step`: its part of the opening sentence;
      `compare(sections)`: HTML comparing its sections (with `compare_title` and `compare_note`), or None.
    """

    kind: str
    title: str
    detect: Callable[[Path, dict | None], bool]
    render: Callable[..., object]
    detect_rank: int = 50
    page_rank: int = 50
    chain_step: str = ""
    compare: Callable[[list], str] | None = None
    compare_title: str = ""
    compare_note: str = ""


def _store_kind() -> SectionKind:
    from difffeat.report.store_section import is_store, render_store

    return SectionKind(
        "store", "feature store", lambda path, marker: is_store(path),
        lambda path, marker, anchor, shown, n_images: render_store(path, anchor, shown, n_images=n_images),
        detect_rank=0, page_rank=30,
        chain_step="the feature store holds denoiser features of the images under each chosen technique (one "
                   "variant each)")


@lru_cache(maxsize=1)
def section_kinds() -> tuple[SectionKind, ...]:
    """Every kind the report knows: the store, and each installed package's (entry points), by `detect_rank`."""
    from importlib.metadata import entry_points

    kinds = {"store": _store_kind()}
    for entry in entry_points(group=SECTION_GROUP):
        found = entry.load()
        if not isinstance(found, SectionKind):
            raise TypeError(f"{entry.value}: a {SECTION_GROUP} entry must be a SectionKind, got {type(found).__name__}")
        kinds.setdefault(found.kind, found)
    return tuple(sorted(kinds.values(), key=lambda k: (k.detect_rank, k.kind)))


def kind_named(kind: str) -> SectionKind:
    return next(k for k in section_kinds() if k.kind == kind)
