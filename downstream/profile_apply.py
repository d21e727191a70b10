"""Filling a head-training config from a data set's released profile, shared by train-seg and train-cls.

A profile replaces defaults only: every field the user gave keeps its value. The profile's name is recorded in
the config's ``extra["profile"]`` so a run's config says where its values came from."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def overlay_profile(values: Mapping[str, Any], fields: Mapping[str, Any], name: str,
                    given: Iterable[str] = ()) -> dict[str, Any]:
    """`values` (config field → value) with profile `name`'s `fields` set wherever the field is not in
    `given`, and ``extra["profile"] = name``."""
    values, given = dict(values), set(given)
    for field, value in fields.items():
        if field not in given:
            values[field] = value
    values["extra"] = {**values.get("extra", {}), "profile": name}
    return values
