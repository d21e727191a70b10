"""Which stored map each input of a segmentation head is: a store (variant) and layer with its shape.

Kept apart from the data set (`downstream.seg.data`) so that the heads that read specs (amalgamation) do not load
the data-set code, and the data set's config does not load theirs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    """One feature map of each item: which store (`variant`, its index) and layer it is, and its [C, h, w]
    shape. A layer named ``NAME/LAYER`` is variant NAME of that store (see `variant_key`)."""

    variant: int
    layer: str
    shape: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"variant": self.variant, "layer": self.layer, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(int(d["variant"]), str(d["layer"]), tuple(int(x) for x in d["shape"]))


def variant_key(spec: FeatureSpec) -> tuple[int, str]:
    """The feature variant a map belongs to: its store and, for a ``NAME/LAYER`` layer (what `difffeat
    extract --variant NAME=…` writes), NAME."""
    name, sep, _ = spec.layer.partition("/")
    return spec.variant, name if sep else ""
