"""Which stored maps describe an image for matching, and reading them: `choose_layers` and `PairFeatures`.

A descriptor may come from one layer, several layers, several variants of one store (``NAME/LAYER``, what
``difffeat extract --variant NAME=…`` writes) or several stores; the maps are concatenated after each is
L2-normalised (`downstream.corr.match`). Reads are cached per image key, since an image takes part in many pairs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from difffeat.data.geometry import Placement
from difffeat.errors import UserError
from difffeat.store.feature_store import FeatureStore


def variants_of(store: FeatureStore) -> list[str]:
    """Names of the variants a store holds (``NAME/LAYER`` layers), in stored order; [] for a plain store."""
    seen: dict[str, None] = {}
    for layer in store.layers:
        name, sep, _ = layer.partition("/")
        if sep:
            seen[name] = None
    return list(seen)


def choose_layers(store: FeatureStore, layers: Sequence[str] | None = None,
                  variants: Sequence[str] | None = None) -> list[str]:
    """The stored layer names a descriptor reads from `store`: those of the `variants` (all of a plain store), then
    of the `layers` among them (a name matches a stored layer whole, or its part after ``NAME/``); by default every
    layer but attention maps (``…:probs``). One clear error naming the store when nothing or something unknown
    is asked for."""
    names = list(store.layers)
    if not names:
        raise UserError(f"{store.path}: the feature store is empty")
    held = variants_of(store)
    if variants:
        unknown = [v for v in variants if v not in held]
        if unknown:
            raise UserError(f"{store.path}: no variant {', '.join(unknown)} (it holds: {', '.join(held) or 'none'})")
        names = [n for v in variants for n in names if n.partition("/")[0] == v and "/" in n]
    elif held:
        raise UserError(f"{store.path}: holds the variants {', '.join(held)}; choose with --variant NAME "
                        "(repeat to concatenate several)")
    if layers:
        chosen = [n for n in names if n in layers or n.partition("/")[2] in layers]
        missing = [lay for lay in layers if not any(n == lay or n.partition("/")[2] == lay for n in names)]
        if missing:
            bare = sorted({n.partition("/")[2] or n for n in names})
            raise UserError(f"{store.path}: no layer {', '.join(missing)} (it has: {', '.join(bare)})")
        return chosen
    chosen = [n for n in names if not n.endswith(":probs")]
    return chosen or names


class PairFeatures:
    """The maps of each image key for matching: `maps(key)` → list of ``[C, h, w]`` float32 tensors (the chosen
    layers of every store, in order), `placement(key)` → where the image lay in the extraction frame (None when the
    store does not know). Keeps the latest images' maps up to `cache_bytes`."""

    def __init__(self, stores: Sequence[str | os.PathLike | FeatureStore], layers: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, cache_bytes: int = 1 << 28):
        if not stores:
            raise UserError("give at least one feature store")
        self.stores = [s if isinstance(s, FeatureStore) else FeatureStore(s) for s in stores]
        self.layers = [choose_layers(s, layers, variants) for s in self.stores]
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self._held = 0

    @property
    def names(self) -> list[str]:
        """The maps' names, ``STORE_INDEX:LAYER`` where several stores take part."""
        if len(self.stores) == 1:
            return list(self.layers[0])
        return [f"{i}:{lay}" for i, chosen in enumerate(self.layers) for lay in chosen]

    def missing(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """Per store path, the keys it lacks (sorted, each once)."""
        out = {}
        for store in self.stores:
            lacking = sorted({k for k in keys if k not in store})
            if lacking:
                out[str(store.path)] = lacking
        return out

    def maps(self, key: str) -> list[torch.Tensor]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = []
        for store, chosen in zip(self.stores, self.layers):
            stored = store[key]
            for layer in chosen:
                array = np.asarray(stored[layer], dtype=np.float32)
                if not np.isfinite(array).all():
                    raise UserError(f"{store.path}: features of {key!r} ({layer}) hold NaN or Inf")
                out.append(torch.from_numpy(array))
        size = sum(t.numel() * 4 for t in out)
        if size <= self.cache_bytes:
            self._cache[key] = out
            self._held += size
            while self._held > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._held -= sum(t.numel() * 4 for t in old)
        return out

    def placement(self, key: str) -> Placement | None:
        return self.stores[0].placement(key)
