"""Head / middle / tail: the class grouping long-tail papers report by."""

from __future__ import annotations

import math
from collections.abc import Sequence


def head_middle_tail(names: Sequence[str], pixel_counts: Sequence[int]) -> dict[str, list[str]]:
    """Classes ranked by pixel count and cut into three near-equal groups (AUCSeg's convention).

    The same rule as Shapes-LT's ``classes.json`` (head and tail get ⌈K/3⌉ classes each), restated here
    because `downstream` does not import difffeat's data code.
    """
    order = sorted(range(len(names)), key=lambda i: -pixel_counts[i])
    k = math.ceil(len(order) / 3)
    return {"head": [names[i] for i in order[:k]], "middle": [names[i] for i in order[k: len(order) - k]],
            "tail": [names[i] for i in order[len(order) - k:]]}
