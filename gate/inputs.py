"""GATE's image set: the images, their keys, base prompts and prompt fields, and the images dropped from it.

An image that fails to load, or lacks a field some candidate's prompt needs (a caption for
`prompt:caption`), is dropped from *every* candidate, so that all comparisons stay paired over the same
images; the dropped ones are named in the result with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from difffeat.errors import UserError

MIN_IMAGES = 2  # a bootstrap interval over one image is no interval


@dataclass
class GateInputs:
    """Images [B, 3, H, W] in [0, 1] with, per image, its key, base prompt and prompt-template fields."""

    images: torch.Tensor
    keys: list[str]
    prompts: list[str]
    fields: list[dict]
    dropped: list[dict] = field(default_factory=list)  # {"key": …, "reason": …}

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, rows: Sequence[int]) -> GateInputs:
        rows = list(rows)
        return GateInputs(self.images[rows], [self.keys[i] for i in rows], [self.prompts[i] for i in rows],
                          [self.fields[i] for i in rows], list(self.dropped))


def sample_items(items: list, n: int | None, seed: int) -> list:
    """n items drawn without replacement by `seed` (all when n is None or ≥ their number), in key order.

    A seeded draw, not the first n, because sorted keys often group by class (`cat/…` before `dog/…`).
    """
    if n is None or n >= len(items):
        return list(items)
    if n < 1:
        raise UserError(f"--n must be ≥ 1, got {n}")
    rows = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in rows]


def load_inputs(spec: str, resolution: tuple[int, int], n: int | None = None, seed: int = 0, prompt: str = "",
                prompt_source: str = "fixed", caption_column: str = "fine_caption",
                resize: str = "center-crop") -> tuple[GateInputs, object, object]:
    """Images of a folder, glob, imagefolder or `hf:` data set, resized to `resolution`; bad ones dropped.

    Returns (inputs, the `ImageSource`, its `PromptSource`): the probe reads labels through them.
    """
    from difffeat.data.sources import ImageSource
    from difffeat.extraction.runner import ExtractRunConfig, PromptSource

    source = ImageSource(spec)
    if not source.items:
        raise UserError(f"{spec}: no images found")
    prompts = PromptSource(ExtractRunConfig(images=spec, out="", prompt=prompt, prompt_source=prompt_source,
                                            caption_column=caption_column), source)
    inputs, _ = read_items(source, prompts, sample_items(source.items, n, seed), resolution, resize)
    return inputs, source, prompts


def read_items(source, prompts, items: list, resolution: tuple[int, int], resize: str = "center-crop",
               target=None) -> tuple[GateInputs, list]:
    """`items` of `source` decoded and resized, with their prompts and prompt fields, as `GateInputs`; an item
    whose image is bad, whose prompt source has nothing for it, or whose `target(item)` (a label, a mask) fails
    is dropped with the reason. Returns the inputs and the targets of the items kept ([] without `target`)."""
    from difffeat.data.images import BadImageError, resize_image, to_tensor

    images, keys, texts, fields, values, dropped = [], [], [], [], [], []
    for item in items:
        try:
            image = resize_image(source.load(item), resolution, resize)
            text, item_fields = prompts(item), prompts.fields(item)
            value = target(item) if target is not None else None
        except BadImageError as e:
            dropped.append({"key": item.key, "reason": e.reason})
            continue
        except UserError as e:  # a prompt source without this image's caption or label
            dropped.append({"key": item.key, "reason": str(e).removeprefix(f"{item.key}: ")})
            continue
        images.append(image)
        keys.append(item.key)
        texts.append(text)
        fields.append(item_fields)
        if target is not None:
            values.append(value)
    x = to_tensor(images) if images else torch.zeros(0, 3, *resolution)
    return GateInputs(x, keys, texts, fields, dropped), values


def drop_unusable(inputs: GateInputs, stacks: Mapping[str, object]) -> GateInputs:
    """Drop the images some candidate cannot process (`TechniqueStack.missing`: no caption, no control map)."""
    keep = []
    for i, (key, fields) in enumerate(zip(inputs.keys, inputs.fields)):
        why = next(((name, w) for name, stack in stacks.items() if (w := stack.missing(key, fields))), None)
        if why is None:
            keep.append(i)
        else:
            inputs.dropped.append({"key": key, "reason": f"{why[1]} (needed by candidate {why[0]!r})"})
    out = inputs.subset(keep)
    return out


def require_enough(inputs: GateInputs, what: str) -> None:
    """Stop with one clear line when fewer than `MIN_IMAGES` images are left."""
    if len(inputs) < MIN_IMAGES:
        reasons = "; ".join(f"{d['key']}: {d['reason']}" for d in inputs.dropped[:3])
        raise UserError(f"{what}: {len(inputs)} usable image(s), GATE needs at least {MIN_IMAGES} to compare "
                        f"candidates" + (f" ({len(inputs.dropped)} dropped: {reasons})" if inputs.dropped else ""))
