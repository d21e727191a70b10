"""Feature amalgamation: several *variants* of the same feature maps (extracted with and without generation
techniques) turned into one, as in the content-shift paper (Meng et al., NeurIPS 2024, App. A.4, Eq. 5) and its
released code (diffusion-content-shift: `pixel_classifier.py`, `diffusion_gate_segmentor.py`,
`aggregation_network.py`).

A variant is a feature store, or a ``NAME/`` layer prefix within one (what ``difffeat extract --variant
NAME=…`` writes; `downstream.seg.data.variant_key`). `variant_layout` lines the variants up layer by layer;
maps matching a *concat-after* pattern (the attention feature, ``*:probs``) are not amalgamated but
concatenated after it, as the paper does with its attention feature.

- `VariantSum` (``--variants weighted``): per layer, a learned per-channel softmax over variants, the same
  for every input: ``r = Σ_i softmax_i(a)[i] ⊙ r_i``.
- `Amalgamation` (``--variants amalgamate``): the paper's form. Per layer, ``n`` weight assigners ``f^j``,
  each conditioned on the input: ``w_i^j = softmax_i(f^j(r_i))`` per channel (``Σ_i w_i^j = 1``), and
  ``r = Concat_j(Σ_i w_i^j ⊙ r_i)``. ``f^j`` is a per-pixel MLP (``Linear(C,128)→ReLU→BN→Dropout(0.5)→
  Linear(128,C)`` on every pixel: weights per pixel; init N(0, 0.02)) or a CNN with global pooling
  (``Conv3×3(C→128)→ReLU→BN→Dropout(0.5)→GAP→Linear(128→C)``: one weight vector per image; torch's init), the
  two forms of the released code. As there, ``f^j`` is called once per variant: BatchNorm's batch statistics
  (and its running statistics) are each variant's own, never pooled over the variants.
- Eq. 5's regulariser, weighted in one of two ways (``--amalgamation-weighting``), which the forward pass's
  terms (`Amalgamation.forward` with ``with_terms``) feed:
  - ``released`` (default), `AdaptiveWeighting`: what the released code trains with: only the sparsity term,
    divided by n (`released_sparsity`; no diversity term), scaled to the size of the task loss and weighted by a
    coefficient that starts at 0 and walks by ±1e-5 every 5 iterations.
  - ``paper``, `FixedWeighting`: ``−γ1 S − γ2 D`` (`sparsity`, `diversity`) with fixed γ, as Eq. 5 is written.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from downstream.seg.feature_spec import FeatureSpec, variant_key

ASSIGNER_FORMS = ("pixel", "global")
ASSIGNER_HIDDEN = 128  # the released code's width
ASSIGNER_DROPOUT = 0.5
ASSIGNER_INIT_STD = 0.02  # the released pixel classifier's init_weights('normal', 0.02)
WEIGHTINGS = ("released", "paper")

__all__ = ["ASSIGNER_FORMS", "WEIGHTINGS", "AdaptiveWeighting", "Amalgamation", "Dropout", "FixedWeighting",
           "GlobalAssigner", "PixelAssigner", "VariantLayout", "VariantSum", "amalgamation_penalty",
           "assigner_weights", "diversity", "penalty_weighting", "released_sparsity", "sparsity", "variant_layout",
           "variant_names"]


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                      align_corners=False)


# ----------------------------------------------------------------------------------------------- layout
def layer_of(spec: FeatureSpec) -> str:
    """A map's layer name without its variant prefix (``canny/up_blocks.1`` → ``up_blocks.1``)."""
    name, sep, rest = spec.layer.partition("/")
    return rest if sep else name


@dataclass(frozen=True)
class VariantLayout:
    """How the maps of a batch line up: `names` of the V variants, the amalgamated `layers` (names without the
    variant prefix) with their [C, h, w] `shapes` (the first variant's), `positions[l][i]` = index of variant
    i's map of layer l in the batch's map list, and the `after` maps concatenated after amalgamation."""

    names: tuple[str, ...]
    layers: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]
    positions: tuple[tuple[int, ...], ...]
    after: tuple[int, ...]


def _variant_name(key: tuple[int, str], several_stores: bool) -> str:
    store, prefix = key
    if not prefix:
        return f"store{store}"
    return f"store{store}:{prefix}" if several_stores else prefix


def variant_names(specs: Sequence[FeatureSpec]) -> list[str]:
    """The names of the feature variants among `specs`, in order of appearance (no checks)."""
    keys = list(dict.fromkeys(variant_key(s) for s in specs))
    several = len({k[0] for k in keys}) > 1
    return [_variant_name(k, several) for k in keys]


def variant_layout(specs: Sequence[FeatureSpec], concat_after: Sequence[str] = ()) -> VariantLayout:
    """Group `specs` by variant and check that every variant has the same layers with the same shapes.

    Maps whose layer (without prefix) matches a `concat_after` pattern (fnmatch) are left out of the variants
    and listed in ``after``. ValueError naming both variants when two differ.
    """
    after = tuple(i for i, s in enumerate(specs) if any(fnmatch.fnmatchcase(layer_of(s), p) for p in concat_after))
    groups: dict[tuple[int, str], list[int]] = {}
    for i, s in enumerate(specs):
        if i not in after:
            groups.setdefault(variant_key(s), []).append(i)
    several = len({k[0] for k in groups}) > 1
    names = tuple(_variant_name(k, several) for k in groups)
    members = list(groups.values())
    if not members:
        return VariantLayout((), (), (), (), after)

    def described(idx: list[int]) -> list[str]:
        return [f"{layer_of(specs[i])} {'×'.join(map(str, specs[i].shape))}" for i in idx]

    first = members[0]
    for name, idx in zip(names[1:], members[1:]):
        if ([layer_of(specs[i]) for i in idx] != [layer_of(specs[i]) for i in first]
                or [specs[i].shape[0] for i in idx] != [specs[i].shape[0] for i in first]):
            raise ValueError(f"amalgamated variants need the same layers with the same channels in every variant; "
                             f"variant {names[0]} has {described(first)}, variant {name} has {described(idx)}")
    return VariantLayout(names, tuple(layer_of(specs[i]) for i in first), tuple(specs[i].shape for i in first),
                         tuple(tuple(m[j] for m in members) for j in range(len(first))), after)


class _VariantMixer(nn.Module):
    """What both mixers share: the layout, and the lists of maps per layer (resized to the first variant's grid)."""

    def __init__(self, specs: Sequence[FeatureSpec], concat_after: Sequence[str]):
        super().__init__()
        self.layout = variant_layout(specs, concat_after)
        self.positions = [list(p) for p in self.layout.positions]
        self.after_shapes = [specs[i].shape for i in self.layout.after]

    def per_layer(self, features: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        out = []
        for pos in self.positions:
            size = features[pos[0]].shape[-2:]
            out.append([_resize(features[p], size) for p in pos])
        return out

    def after(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [features[i] for i in self.layout.after]


# ------------------------------------------------------------------------------------- static weighting
class VariantSum(_VariantMixer):
    """Softmax-weighted sum over feature variants, per layer and channel (learned; uniform at start), the same
    for every input: ``r = Σ_i softmax_i(a)[i] ⊙ r_i``. Maps of the concat-after layers follow the sums."""

    def __init__(self, specs: Sequence[FeatureSpec], concat_after: Sequence[str] = ()):
        super().__init__(specs, concat_after)
        v = len(self.layout.names)
        self.logits = nn.ParameterList([nn.Parameter(torch.zeros(v, s[0])) for s in self.layout.shapes])
        self.out_shapes = list(self.layout.shapes) + self.after_shapes

    def weights(self) -> list[torch.Tensor]:
        """Per layer, the [V, C] variant weights (each column sums to 1)."""
        return [torch.softmax(a, dim=0) for a in self.logits]

    def forward(self, features: Sequence[torch.Tensor], with_terms: bool = False):
        """The mixed maps; with `with_terms`, ``(maps, None)``: a static weighting has no regulariser."""
        out = [sum(w[v].view(1, -1, 1, 1) * x for v, x in enumerate(maps))
               for maps, w in zip(self.per_layer(features), self.weights())]
        out += self.after(features)
        return (out, None) if with_terms else out


# ---------------------------------------------------------------------------------------- the assigners
class Dropout(nn.Module):
    """Inverted dropout, ``x · 1[u ≥ p] / (1 − p)`` with u uniform, in training. The same as `nn.Dropout`, but its
    mask comes from a uniform draw: torch's CPU bernoulli sampler, which `nn.Dropout` uses, is about 30× slower
    than `rand` here and was the largest single cost of a pixel assigner."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))


class PixelAssigner(nn.Module):
    """f^j per pixel: ``Linear(C,128)→ReLU→BN→Dropout(0.5)→Linear(128,C)`` on every pixel, as 1×1 convolutions
    (a 1×1 conv over a map is a Linear over its pixels; BatchNorm2d over [N, C, h, w] is BatchNorm1d over its
    N·h·w pixels). [N, C, h, w] → logits [N, C, h, w].

    Initialised as the released pixel classifier's ``init_weights('normal', 0.02)`` leaves it: Linear weights
    N(0, 0.02), biases 0, BatchNorm at torch's (1, 0) (that init touches ``BatchNorm2d`` only, and the released
    assigner's is a ``BatchNorm1d``)."""

    def __init__(self, channels: int, hidden: int = ASSIGNER_HIDDEN, dropout: float = ASSIGNER_DROPOUT):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.BatchNorm2d(hidden),
                                 Dropout(dropout), nn.Conv2d(hidden, channels, 1))
        for m in (self.net[0], self.net[4]):
            nn.init.normal_(m.weight, 0.0, ASSIGNER_INIT_STD)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GlobalAssigner(nn.Module):
    """f^j per image: ``Conv3×3(C→128, no bias)→ReLU→BN2d→Dropout(0.5)→GAP→Linear(128→C)``, torch's init (as the
    released segmentor's and correspondence network's `WeightAssigner`). [N, C, h, w] → logits [N, C, 1, 1]."""

    def __init__(self, channels: int, hidden: int = ASSIGNER_HIDDEN, dropout: float = ASSIGNER_DROPOUT):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(),
                                 nn.BatchNorm2d(hidden), Dropout(dropout), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :, None, None]


ASSIGNERS = {"pixel": PixelAssigner, "global": GlobalAssigner}


def assigner_weights(assigner: nn.Module, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``w_i = softmax_i(f(r_i))`` per channel (and pixel): [B, V, C, h, w] (h = w = 1 for a global assigner).

    Each variant's map [B, C, h, w] goes through `f` on its own, as the released code calls its assigner once per
    variant: in training, BatchNorm normalises each variant by that variant's batch statistics and updates its
    running statistics once per variant (one batch of all V maps would pool the statistics over the variants)."""
    logits = torch.stack([assigner(m) for m in maps], dim=1)
    return torch.softmax(logits.float(), dim=1).to(maps[0].dtype)


class Amalgamation(_VariantMixer):
    """The paper's amalgamation: per layer, `assigners` input-conditioned weight assigners of `form` (pixel or
    global; `hidden` wide), ``r = Concat_j(Σ_i w_i^j ⊙ r_i)`` ([B, n·C, h, w] per layer), then the concat-after
    maps.

    ``forward(features, with_terms=True)`` also returns Eq. 5's terms on this forward's weights, as `weighting`
    (one of `WEIGHTINGS`) defines them (`eq5_terms`), for the objective to weight (`penalty_weighting`).
    """

    def __init__(self, specs: Sequence[FeatureSpec], assigners: int = 1, form: str = "pixel",
                 concat_after: Sequence[str] = (), weighting: str = "released", hidden: int = ASSIGNER_HIDDEN):
        super().__init__(specs, concat_after)
        if form not in ASSIGNERS:
            raise ValueError(f"assigner form must be one of {', '.join(ASSIGNERS)}, got {form!r}")
        if assigners < 1:
            raise ValueError(f"needs at least one weight assigner, got {assigners}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"amalgamation weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.form, self.n, self.weighting = form, assigners, weighting
        self.assigners = nn.ModuleList([nn.ModuleList([ASSIGNERS[form](s[0], hidden) for _ in range(assigners)])
                                        for s in self.layout.shapes])
        self.out_shapes = [(assigners * s[0], s[1], s[2]) for s in self.layout.shapes] + self.after_shapes

    def weights(self, features: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Per layer, per assigner, the weights [B, V, C, h|1, w|1] (Σ over V = 1)."""
        return [[assigner_weights(f, maps) for f in fs] for maps, fs in zip(self.per_layer(features), self.assigners)]

    def forward(self, features: Sequence[torch.Tensor], with_terms: bool = False):
        """The amalgamated maps; with `with_terms`, ``(maps, eq5_terms(weights))``."""
        out, weights = [], []
        for maps, fs in zip(self.per_layer(features), self.assigners):
            stacked = torch.stack(maps, dim=1)  # [B, V, C, h, w]
            ws = [assigner_weights(f, maps) for f in fs]
            out.append(torch.cat([(w * stacked).sum(1) for w in ws], dim=1))
            weights.append(ws)
        out += self.after(features)
        return (out, self.eq5_terms(weights)) if with_terms else out

    def eq5_terms(self, weights: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Eq. 5's terms of `weights` as this weighting uses them: released, ``{"sparsity": S / n}``
        (`released_sparsity`; the released code computes no diversity term); paper, ``{"sparsity": S,
        "diversity": D}`` (`sparsity`, `diversity`)."""
        if self.weighting == "released":
            return {"sparsity": released_sparsity(weights)}
        return {"sparsity": sparsity(weights), "diversity": diversity(weights)}


# ---------------------------------------------------------------------------------------- Eq. 5's terms
def _column_norms(w: torch.Tensor) -> torch.Tensor:
    """‖w[b, :, c, p]‖₂ over the variant axis (dim 1) of a [B, V, C, …] weight tensor."""
    return w.float().pow(2).sum(1).clamp(min=1e-12).sqrt()


def sparsity(weights: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``S = mean_l Σ_j mean_{b,c,p} ‖w^{l,j}_{b,·,c,p}‖₂``: the ℓ2 norm over variants of each weight column
    (one per image b, channel c and pixel p), averaged over columns, summed over the assigners j of a layer l,
    averaged over layers. With Σ_i w_i = 1 fixed, a larger ℓ2 norm puts the weight on fewer variants
    (1/√V for uniform weights, 1 for one-hot)."""
    return torch.stack([sum(_column_norms(w).mean() for w in ws) for ws in weights]).mean()


def released_sparsity(weights: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``S_n = Σ_l Σ_j mean_{b,c,p} ‖w^{l,j}_{b,·,c,p}‖₂ / n``: the released code's sparsity (its pixel
    classifier sums ``torch.linalg.norm(w, dim=1).mean()`` over the assigners of each of its feature groups,
    here the layers, and divides by the number of assigners n)."""
    n = len(weights[0])
    return torch.stack([sum(_column_norms(w).mean() for w in ws) for ws in weights]).sum() / n


def diversity(weights: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``D = mean_l ½ Σ_j Σ_{k≠j} mean_{b,c,p} ‖w^{l,j}_{b,·,c,p} − w^{l,k}_{b,·,c,p}‖₂``: how far apart the
    assigners of a layer put their weights (0 with one assigner)."""
    per_layer = []
    for ws in weights:
        d = ws[0].new_zeros((), dtype=torch.float32)
        for j in range(len(ws)):
            for k in range(len(ws)):
                if k != j:
                    d = d + 0.5 * _column_norms(ws[j] - ws[k]).mean()
        per_layer.append(d)
    return torch.stack(per_layer).mean()


def amalgamation_penalty(weights: Sequence[Sequence[torch.Tensor]], gamma_sparsity: float,
                         gamma_diversity: float) -> torch.Tensor:
    """Eq. 5 of the paper, the part added to the task loss L: ``L_fin = L − γ1 S − γ2 D`` (`sparsity` S,
    `diversity` D): rewards weights on few variants and assigners that differ."""
    return -gamma_sparsity * sparsity(weights) - gamma_diversity * diversity(weights)


# ---------------------------------------------------------------------------------- weighting the terms
class FixedWeighting:
    """The paper's Eq. 5 as written (``--amalgamation-weighting paper``): ``penalty = −γ1 S − γ2 D`` on the terms
    of `Amalgamation.eq5_terms`, whatever the task loss."""

    def __init__(self, gamma_sparsity: float, gamma_diversity: float):
        self.gamma_sparsity, self.gamma_diversity = gamma_sparsity, gamma_diversity

    def penalty(self, terms: Mapping[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        return -self.gamma_sparsity * terms["sparsity"] - self.gamma_diversity * terms["diversity"]

    def update(self, loss: torch.Tensor | float) -> None:
        """Nothing to adapt."""

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass


class AdaptiveWeighting:
    """The released code's weighting of Eq. 5 (``--amalgamation-weighting released``; the training loops of
    `task-pixel.py` and `task-corres.py`). With the task loss L and ``S_n`` = `released_sparsity` (ˆ: detached),
    the penalty is

        c · (−S_n) · L̂ / Ŝ_n

    whose value is ``−c·L̂`` and gradient ``−c·(L̂/Ŝ_n)·∇S_n``: the sparsity reward scaled to the size of the task
    loss (so the scale of S_n, its division by n included, does not matter). The coefficient c starts at 0 (no
    penalty at first) and walks (`update`, after each iteration): every 5th iteration the loss's fall since the
    last such look is compared with the one remembered; where it is larger, or 1 time in 20 regardless, c becomes
    the kept value and its fall the one remembered; the remembered fall decays by 0.9; then c = max(0, kept +
    one of −1e-5, 0, +1e-5). The draws come from a seeded generator (the released code uses the global `random`),
    kept in the checkpoint with the walk (`state`), so a resumed run walks on as an uninterrupted one."""

    STEP, EVERY, ACCEPT_ONE_IN, DECAY = 1e-5, 5, 20, 0.9

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng([seed, 1])  # a stream of its own beside others seeded alike (memory bank)
        self.coefficient = self.kept = self.kept_fall = 0.0
        self.last_loss: float | None = None
        self.iterations = 0

    def penalty(self, terms: Mapping[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        s = terms["sparsity"]
        return self.coefficient * -s * loss.detach() / s.detach()

    def update(self, loss: torch.Tensor | float) -> None:
        """One iteration done, its task loss `loss`: every 5th, the step of the walk described above."""
        self.iterations += 1
        if self.iterations % self.EVERY:
            return
        value = float(loss)
        fall = 0.0 if self.last_loss is None else self.last_loss - value
        self.last_loss = value
        regardless = int(self.rng.integers(self.ACCEPT_ONE_IN)) == 0
        if regardless or fall > self.kept_fall:
            self.kept, self.kept_fall = self.coefficient, fall
        self.kept_fall *= self.DECAY
        self.coefficient = max(0.0, self.kept + (-self.STEP, 0.0, self.STEP)[int(self.rng.integers(3))])

    def state(self) -> dict[str, Any]:
        return {"coefficient": self.coefficient, "kept": self.kept, "kept_fall": self.kept_fall,
                "last_loss": self.last_loss, "iterations": self.iterations, "rng": self.rng.bit_generator.state}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.coefficient, self.kept, self.kept_fall = state["coefficient"], state["kept"], state["kept_fall"]
        self.last_loss, self.iterations = state["last_loss"], int(state["iterations"])
        self.rng.bit_generator.state = dict(state["rng"])


def penalty_weighting(weighting: str, gamma_sparsity: float = 0.0, gamma_diversity: float = 0.0,
                      seed: int = 0) -> AdaptiveWeighting | FixedWeighting | None:
    """The weighting of Eq. 5's terms that `weighting` names (one of `WEIGHTINGS`); None for the paper's form
    with both γ 0 (no penalty)."""
    if weighting == "released":
        return AdaptiveWeighting(seed)
    if weighting != "paper":
        raise ValueError(f"amalgamation weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return FixedWeighting(gamma_sparsity, gamma_diversity) if gamma_sparsity or gamma_diversity else None
