"""Data-set profiles for train-seg: which `SegTrainConfig` fields a profile of `downstream.profiles` sets, and
the scores over a listed tail (a profile's released tail classes).

A segmentation profile (ade20k, cityscapes, coco-stuff) holds AUCSeg's released settings: λ of CE + λ·AUC (the
released loss weight with its hidden ½ folded in), the margin, mmseg's CE averaging, and the T-Memory Bank's
tail classes (`small_index`), capacity and sample ratio. They replace defaults only: `apply_profile` keeps
every value the user gave. The bank's resize ratio has no counterpart: the feature-space bank does not resize.

    >>> fields = profile_fields("ade20k")
    >>> fields["auc_weight"], fields["ce_average"], fields["bank_sample_ratio"], len(fields["tail_classes"])
    (2.0, 'all', 0.05, 124)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError
from downstream.profile_apply import overlay_profile
from downstream.profiles import profile, settings
from downstream.seg.classes import check_tail_classes  # noqa: F401 (importable here as before)

SECTIONS: dict[str, dict[str, str]] = {
    "aucseg": {"auc_weight": "auc_weight", "margin": "margin", "ce_average": "ce_average"},
    "memory_bank": {"tail_classes": "tail_classes", "capacity": "bank_capacity", "sample_ratio": "bank_sample_ratio"},
}


def profile_fields(name: str) -> dict[str, Any]:
    """The train-seg config values segmentation profile `name` sets."""
    chosen = profile(name)
    if chosen.get("task") != "segmentation":
        raise UserError(f"profile {name!r} is a {chosen.get('task')} profile; train-seg takes a segmentation "
                        "profile")
    fields: dict[str, Any] = {}
    for section, names in SECTIONS.items():
        if section in chosen:
            fields.update({names[k]: v for k, v in settings(name, section).items() if k in names})
    return fields


def apply_profile(values: Mapping[str, Any], name: str, given: Iterable[str] = ()) -> dict[str, Any]:
    """`values` (config field → value) with profile `name`'s settings for the fields not in `given`; the
    profile's name is kept in ``extra["profile"]``."""
    return overlay_profile(values, profile_fields(name), name, given)


def config_from_profile(args):
    """The `SegTrainConfig` of parsed train-seg arguments with profile ``args.profile`` filling the fields the
    command line did not give (`difffeat.spine.config_cli.given_fields`)."""
    from difffeat.spine.config_cli import config_from_args, given_fields
    from downstream.seg.config import SegTrainConfig

    given = given_fields(args, SegTrainConfig)
    return config_from_args(SegTrainConfig, args, **apply_profile({f: getattr(args, f) for f in given}, args.profile,
                                                                  given))


def listed_tail_scores(scores: Mapping[str, Any], names: Sequence[str], tail_classes: Sequence[int] | None,
                       source: str | None = None) -> dict[str, Any]:
    """``{"tail_list": {"source", "classes", "miou"}}``: the mean IoU over the listed tail classes whose IoU is
    defined (per_class_iou not None), beside the head / middle / tail groups; empty without a list."""
    if not tail_classes:
        return {}
    listed = [names[c] for c in tail_classes if 0 <= c < len(names)]
    ious = [scores["per_class_iou"].get(n) for n in listed]
    ious = [v for v in ious if v is not None and not math.isnan(v)]
    return {"tail_list": {"source": f"profile {source}" if source else "given", "classes": listed,
                          "miou": sum(ious) / len(ious) if ious else None}}


def check_profile_classes(name: str | None, tail_classes: Sequence[int] | None, num_classes: int) -> None:
    """A profile's released tail ids number its data set's classes: refuse them (ConfigError) on data with another
    class count, e.g. ADE20K masks read with their raw ids (151 values with "other") instead of reduced ones."""
    if not name or tail_classes is None:
        return
    chosen = profile(name)
    want = chosen.get("num_classes")
    if want is None or want == num_classes or list(tail_classes) != profile_fields(name).get("tail_classes"):
        return
    raise ConfigError("tail_classes", f"profile {name} lists the tail ids of its {want} classes, but these data have "
                                      f"{num_classes}; read the masks through the data set's layout (e.g. --data "
                                      f"{name}:ROOT, which maps raw ids to train ids) or give --tail-class")

