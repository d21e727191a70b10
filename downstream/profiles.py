"""Data-set profiles: the released hyper-parameters of the long-tail suite, set together by a name.

A profile is plain data, kept in one file beside this module (`profiles.json`) and read once. Its sections
are named after the methods (`imbsam`, `ssesam`, `vs`, `tla_adrw`, `ldam`, `dirmixe`, `test_agnostic`,
`test_time_aggregation`, `shots` for classification; `aucseg`, `memory_bank` for segmentation) and hold
values under the parameter names of difffeat's losses, optimizers and protocols, each section with the
`source` it was read from (repository and file). A value with more than one released source lists the
others under `alternatives` (VS γ: 0.05 in DDC's scripts, 0.3 in the VS paper's code). The commands apply
them with ``--profile NAME`` (`downstream.cls.profile` for train-cls, `downstream.seg.profile` for train-seg),
to the options the command line leaves unset.

    >>> profile("cityscapes")["memory_bank"]["tail_classes"]
    [6, 12, 14, 15, 16, 17, 18]
    >>> profile("ade20k")["aucseg"]["auc_weight"]  # AUCSeg's loss_weight 4 with its ½ folded in
    2.0
    >>> "inat" in profile_names()
    True
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from difffeat.errors import UserError

PROFILES_FILE = Path(__file__).with_name("profiles.json")
TASKS = ("classification", "segmentation")
METADATA_KEYS = ("source", "note", "alternatives")  # in a section: provenance, not settings


@functools.lru_cache(maxsize=1)
def _load() -> dict[str, dict]:
    return json.loads(PROFILES_FILE.read_text(encoding="utf-8"))["profiles"]


def profile_names() -> list[str]:
    """The names of the profiles, sorted."""
    return sorted(_load())


def profile(name: str) -> dict:
    """The profile `name` as a fresh dict (editing it changes nothing else); UserError naming the valid ones."""
    profiles = _load()
    if name not in profiles:
        raise UserError(f"unknown profile {name!r}; valid profiles: {', '.join(profile_names())}")
    return copy.deepcopy(profiles[name])


def settings(name: str, section: str) -> dict:
    """One section of profile `name` without its provenance (`METADATA_KEYS`): the values to pass on.

    >>> settings("cityscapes", "aucseg")
    {'auc_weight': 0.5, 'released_auc_loss_weight': 1.0, 'margin': 1.0, 'ce_average': 'all'}
    """
    chosen = profile(name)
    if not isinstance(chosen.get(section), dict):
        sections = [k for k, v in chosen.items() if isinstance(v, dict)]
        raise UserError(f"profile {name!r} has no section {section!r}; its sections: {', '.join(sections)}")
    return {k: v for k, v in chosen[section].items() if k not in METADATA_KEYS}
