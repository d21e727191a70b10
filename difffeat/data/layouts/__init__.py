"""Data sets in their native layouts: one reader class per layout, registered by name (`LAYOUTS`).

A data spec names a data set everywhere (extract, gate, sweep, train-seg, eval-seg and the Python API):

    LAYOUT:ROOT[:SPLIT]      e.g.  ade20k:data/ADEChallengeData2016:validation   voc:VOCdevkit/VOC2012:train
                                   hf/ade20k:data/scene_parse_150:validation    shapes-lt:data/shapes-lt

Without a split, every split of the root. `open_data` opens one; `detect_layout` recognises a root given as a
plain folder (an ADE20K tree, a Cityscapes tree …), so that its annotation images are never taken for inputs.
"""

from __future__ import annotations

import os

from difffeat.data.layouts import ade20k, cityscapes, coco_stuff, ddpm_seg, hf, shapes_lt, spair, voc  # noqa: F401 (registers)
from difffeat.data.layouts.base import IGNORE, LAYOUTS, Layout, Sample, detect_layout, fitting_layouts, register_layout
from difffeat.errors import UserError

__all__ = ["IGNORE", "LAYOUTS", "Layout", "Sample", "data_spec", "detect_layout", "fitting_layouts", "open_data",
           "parse_data_spec", "register_layout"]


def parse_data_spec(spec: str) -> tuple[str, str, str | None, str | None] | None:
    """(layout, option, root, split) of ``LAYOUT[/OPTION]:ROOT[:SPLIT]``; None when `spec` names no layout (a plain
    folder, glob or file)."""
    head, sep, rest = str(spec).partition(":")
    name, _, option = head.partition("/")
    if not sep or name not in LAYOUTS or not rest:
        return None
    root, split = rest, None
    if not os.path.exists(rest) and ":" in rest:
        root, _, split = rest.rpartition(":")
    return name, option or None, root, split or None


def open_data(spec: str, split: str | None = None, names=None) -> Layout:
    """The reader of data spec `spec` (see the module doc); `split` (when given) wins over the spec's."""
    parsed = parse_data_spec(spec)
    if parsed is None:
        known = ", ".join(n for n, cls in LAYOUTS.items() if n == cls.name)
        raise UserError(f"{spec}: not a data spec LAYOUT:ROOT[:SPLIT] (layouts: {known})")
    name, option, root, spec_split = parsed
    cls = LAYOUTS[name]
    if option is not None and cls is not hf.HfLayout:
        raise UserError(f"{spec}: layout {name} takes no /{option}")
    kwargs = {"labels": option} if option is not None else {}
    return cls(root, split or spec_split, names, **kwargs)


def data_spec(layout: Layout) -> str:
    """The spec that opens `layout` again (its root and split)."""
    described = layout.describe()
    return f"{described['layout']}:{described['root']}" + (f":{layout.split}" if layout.split else "")
