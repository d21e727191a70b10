"""`rank`: GATE as a measured ranking. Reconstruct every image under every candidate, score, decide, rank.

GATE (research/content_shift_gate.md §2): img2img at a high repainting strength with and without a
technique; a technique whose output stays closer to the input suppresses content shift. Here each candidate
is scored per image (PSNR, SSIM, edge F1, LPIPS when available, and the paper's feature Score), every score
gets a bootstrap interval over images, and a candidate is *accepted* when its paired improvement over
`reference` on the primary score is significant: its two-sided paired bootstrap p-value (same resampled
images for both), Holm-corrected across the candidates, is at most 1 − level (5%) and the mean difference is
positive; with ``correction="none"``, when the 95% paired bootstrap interval of the mean difference lies entirely
above 0. With ``replicates`` R > 1, every image is reconstructed (and its features taken) under R noise draws
and its scores are their mean, so the intervals over images include the draws' spread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from difffeat.errors import UserError
from difffeat.spine.run import ConfigError
from gate.candidates import REFERENCE, check_candidates
from gate.config import FEATURE_REFERENCES, GateConfig  # noqa: F401
from gate.inputs import GateInputs, drop_unusable, require_enough
from gate.reconstruct import Reconstructor
from gate.score import HIGHER_IS_BETTER, contour_diff, edge_f1, lpips, lpips_weights, psnr, ssim
from gate.stats import Interval, bootstrap, bootstrap_p, difference, holm, mean_of, resample


@dataclass
class Evaluation:
    """One technique list's per-image scores, contour diffs (per layer) and what the report shows of it."""

    specs: list[str]
    per_image: dict[str, np.ndarray]  # metric → [n]
    diffs: dict[str, np.ndarray]  # layer → [n] contour diffs (Eq. 1) against its t = 0 reference
    recon: torch.Tensor
    features: torch.Tensor  # first layer's features at t, [n, C, h, w]
    prompts: list[str] = field(default_factory=list)  # each image's prompt under the techniques
    control: torch.Tensor | None = None  # the first ControlNet's control images [n, 3, H, W], if any
    seconds: float = 0.0  # time taken to reconstruct and score


@dataclass
class GateResult:
    """What a GATE run found: scores with intervals, the decision, the ranking, and the pictures' material."""

    config: GateConfig
    candidates: dict[str, list[str]]
    keys: list[str]
    dropped: list[dict]
    metrics: list[str]
    skipped_metrics: dict[str, str]
    scores: dict[str, dict[str, Interval]]  # candidate → metric → interval
    improvement: dict[str, Interval]  # candidate → paired improvement over reference on the primary score
    accepted: list[str]
    evaluations: dict[str, Evaluation]
    inputs: torch.Tensor
    reference_features: torch.Tensor  # first layer's clean t = 0 features without technique, [n, C, h, w]
    greedy: dict | None = None
    probe: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tests: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate → p and Holm-adjusted p

    @property
    def primary(self) -> str:
        return self.config.primary

    def ranking(self) -> list[str]:
        """Candidate names, best first on the primary score."""
        sign = 1 if HIGHER_IS_BETTER[self.primary] else -1
        return sorted(self.scores, key=lambda c: -sign * self.scores[c][self.primary].value)

    def table(self) -> list[dict]:
        """One row per candidate in ranking order: rank, name, specs, every score with its interval, decision."""
        rows = []
        for rank, name in enumerate(self.ranking(), 1):
            row = {"rank": rank, "candidate": name, "techniques": " + ".join(self.candidates[name]) or "(none)"}
            for m in self.metrics:
                iv = self.scores[name][m]
                row.update({m: iv.value, f"{m}_low": iv.low, f"{m}_high": iv.high})
            imp = self.improvement.get(name)
            row.update({"improvement": imp.value if imp else 0.0, "improvement_low": imp.low if imp else 0.0,
                        "improvement_high": imp.high if imp else 0.0, "accepted": name in self.accepted})
            rows.append(row)
        return rows

    def accepted_variants(self) -> dict[str, list[str]]:
        """What `--emit` writes: the greedy combination, else each accepted candidate; `reference` when none is."""
        if self.greedy and self.greedy["selected"]:
            name = self.greedy.get("name", self.greedy["selected"][0])
            return {name: list(self.greedy["specs"])}
        if not self.accepted:
            return {REFERENCE: []}
        return {name: list(self.candidates[name]) for name in self.ranking() if name in self.accepted}

    def prompt_candidates(self) -> list[str]:
        """The candidates (ranking order) whose techniques rewrite the prompt: the report shows what they used."""
        return [c for c in self.ranking() if c in self.evaluations and _rewrites_prompts(self.evaluations[c].specs)]

    def to_dict(self) -> dict:
        """The JSON-able result (no tensors)."""
        return {
            "primary": self.primary,
            "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in self.metrics},
            "decision": f"accepted when the {self.config.level:.0%} paired bootstrap interval of the mean "
                        f"improvement over {REFERENCE!r} on {self.primary} lies above 0",
            "images": len(self.keys),
            "keys": self.keys,
            "dropped": self.dropped,
            "skipped_metrics": self.skipped_metrics,
            "ranking": self.table(),
            "accepted": self.accepted,
            "greedy": self.greedy,
            "probe": self.probe,
            "per_image": {c: {m: [float(v) for v in e.per_image[m]] for m in self.metrics}
                          for c, e in self.evaluations.items() if c in self.scores},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "candidate_seconds": {c: round(e.seconds, 3) for c, e in self.evaluations.items()},
            "tests": self.tests,
            "prompts": {c: self.evaluations[c].prompts for c in self.prompt_candidates()},
            "config": asdict(self.config),
        }


# ---------------------------------------------------------------------------------------------- scoring
class _Scorer:
    """Evaluates technique lists on one image set; holds the shared reconstructor and the anchor's diffs."""

    def __init__(self, pipe, inputs: GateInputs, cfg: GateConfig, progress: bool):
        self.cfg, self.inputs, self.progress = cfg, inputs, progress
        self.recon = Reconstructor(pipe, inputs, strength=cfg.strength, steps=cfg.steps, seed=cfg.seed,
                                   layers=cfg.layers, batch_size=cfg.batch_size, reuse=cfg.reuse)
        self.lpips_at, why = lpips_weights()
        self.skipped = {} if self.lpips_at else {"lpips": why}
        self.metrics = ["psnr", "ssim", "edge_f1"] + (["lpips"] if self.lpips_at else []) + ["feature_score"]
        self.plain_t0 = self.recon.features([], 0, noise=False)
        self.layers = list(self.plain_t0)
        self._t0: dict[tuple[str, ...], dict[str, torch.Tensor]] = {(): self.plain_t0}
        self.anchor: dict[str, np.ndarray] | None = None
        self.idx = resample(len(inputs), cfg.n_boot, cfg.seed)

    def _reference_t0(self, specs: Sequence[str]) -> dict[str, torch.Tensor]:
        from pipelines.base import parse_technique

        if self.cfg.feature_reference == "plain":
            return self.plain_t0
        # A schedule technique (denoise-from) means nothing without noise: the t = 0 pass leaves it out.
        key = tuple(s for s in specs if not parse_technique(s).implements("schedule"))
        if key not in self._t0:
            self._t0[key] = self.recon.features(list(key), 0, noise=False)
        return self._t0[key]

    def evaluate(self, specs: Sequence[str]) -> Evaluation:
        t0 = time.perf_counter()
        x = self.inputs.images
        ref0 = self._reference_t0(specs)
        draws = []  # per noise draw: (reconstructions, per-image scores, contour diffs, first layer's features)
        for r in range(self.cfg.replicates):  # draw 0 is the run's seed: one replicate is the plain run
            seed = self.cfg.seed + r * 1_000_003
            rec = self.recon.reconstruct(specs, seed=seed)
            scores = {"psnr": psnr(rec, x).numpy(), "ssim": ssim(rec, x).numpy(),
                      "edge_f1": edge_f1(rec, x, self.cfg.edge_tolerance).numpy()}
            if self.lpips_at:
                scores["lpips"] = lpips(rec, x).numpy()
            feats = self.recon.features(specs, self.cfg.t, seed=seed)
            diffs = {layer: contour_diff(feats[layer], ref0[layer]).numpy().astype(np.float64)
                     for layer in self.layers}
            draws.append((rec, scores, diffs, feats[self.layers[0]]))
        per_image = {m: np.mean([d[1][m] for d in draws], axis=0) for m in draws[0][1]}
        diffs = {layer: np.mean([d[2][layer] for d in draws], axis=0) for layer in self.layers}
        anchor = self.anchor if self.anchor is not None else diffs
        # Per image, Eq. 2 with that image's own anchor diff (the interval uses ratios of sums instead).
        per_image["feature_score"] = np.mean(
            [1 - diffs[layer] / np.maximum(anchor[layer], 1e-12) for layer in self.layers], axis=0)
        stack, inp = self.recon.stack(specs), self.inputs
        prompts = [stack.prompt(p, f, k) for p, f, k in zip(inp.prompts, inp.fields, inp.keys)]
        control = _first_control(stack, x, inp.keys)
        return Evaluation(list(specs), per_image, diffs, draws[0][0], draws[0][3], prompts, control,
                          time.perf_counter() - t0)

    def statistic(self, ev: Evaluation, metric: str) -> Callable[[np.ndarray], np.ndarray]:
        """The bootstrap statistic of one score: a mean over images; for the feature Score, Eq. 2 on sums of
        diffs over the resampled images (`gate.score.feature_score`), averaged over layers."""
        if metric != "feature_score":
            return mean_of(ev.per_image[metric])
        d, a = ev.diffs, self.anchor
        return lambda idx: np.mean([1 - d[layer][idx].sum(1) / np.maximum(a[layer][idx].sum(1), 1e-12)
                                    for layer in self.layers], axis=0)

    def intervals(self, ev: Evaluation) -> dict[str, Interval]:
        return {m: bootstrap(self.statistic(ev, m), self.idx, self.cfg.level) for m in self.metrics}

    def gain(self, ev: Evaluation, base: Evaluation) -> Callable[[np.ndarray], np.ndarray]:
        """The statistic of `ev`'s paired improvement over `base` on the primary score (positive = better)."""
        m = self.cfg.primary
        a, b = self.statistic(ev, m), self.statistic(base, m)
        return difference(a, b) if HIGHER_IS_BETTER[m] else difference(b, a)

    def improvement(self, ev: Evaluation, base: Evaluation) -> Interval:
        """Paired improvement of `ev` over `base` on the primary score (positive = better, whatever its direction)."""
        return bootstrap(self.gain(ev, base), self.idx, self.cfg.level)


# ---------------------------------------------------------------------------------------------- ranking
def rank(pipe, images, candidates: dict[str, list[str]], config: GateConfig | None = None, progress: bool = False,
         keys: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
         fields: Sequence[dict] | None = None, **overrides) -> GateResult:
    """Rank `candidates` ({name: technique specs}; `reference` added) by how close their img2img
    reconstructions of `images` stay to the inputs.

    `images`: a folder, glob, imagefolder or `hf:` spec (base prompts and caption fields come from the
    config's prompt source), a `GateInputs`, or a [B, 3, H, W] tensor in [0, 1] with optional `keys`,
    `prompts` and `fields` (prompt-template fields: caption, label, other_caption). `overrides` set
    `GateConfig` fields. Images that fail, or lack a field some candidate needs, are dropped from all.
    """
    from pipelines.stack import TechniqueStack

    cfg = GateConfig.from_dict(asdict(config) if config else {}, **overrides)
    cfg.candidates = check_candidates(candidates or cfg.candidates)
    if cfg.primary == "lpips" and lpips_weights()[0] is None:
        raise ConfigError("primary", f"LPIPS cannot run here ({lpips_weights()[1]}); choose another score")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = _inputs(pipe, images, cfg, keys, prompts, fields)
    cfg.images = cfg.images if isinstance(images, GateInputs | torch.Tensor) else str(images)
    stacks = {name: TechniqueStack(pipe, specs) for name, specs in cfg.candidates.items()}  # fails before any work
    inputs = drop_unusable(inputs, stacks)
    require_enough(inputs, cfg.images or "images")
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scorer = _Scorer(pipe, inputs, cfg, progress)
    evaluations: dict[str, Evaluation] = {}
    from tqdm.auto import tqdm

    for name, specs in tqdm(cfg.candidates.items(), desc="gate", unit="candidate", disable=not progress):
        evaluations[name] = scorer.evaluate(specs)
        if name == REFERENCE:
            scorer.anchor = evaluations[name].diffs
    timings["candidates"] = time.perf_counter() - t0
    ref = evaluations[REFERENCE]
    scores = {name: scorer.intervals(ev) for name, ev in evaluations.items()}
    improvement = {name: scorer.improvement(ev, ref) for name, ev in evaluations.items() if name != REFERENCE}
    pvalues = {name: bootstrap_p(scorer.gain(ev, ref), scorer.idx) for name, ev in evaluations.items()
               if name != REFERENCE}
    adjusted = holm(pvalues) if cfg.correction == "holm" else dict(pvalues)
    tests = {name: {"p": pvalues[name], "p_adjusted": adjusted[name]} for name in pvalues}
    if cfg.correction == "holm":
        accepted = [name for name, iv in improvement.items() if iv.value > 0 and adjusted[name] <= 1 - cfg.level]
    else:
        accepted = [name for name, iv in improvement.items() if iv.low > 0]
    result = GateResult(cfg, dict(cfg.candidates), list(inputs.keys), list(inputs.dropped), scorer.metrics,
                        scorer.skipped, scores, improvement, accepted, evaluations, inputs.images,
                        scorer.plain_t0[scorer.layers[0]], timings=timings, tests=tests)
    result.accepted = sorted(accepted, key=result.ranking().index)
    if cfg.greedy:
        t0 = time.perf_counter()
        result.greedy = _greedy(scorer, result, progress)
        timings["greedy"] = time.perf_counter() - t0
    if cfg.probe:
        from gate.probe import run_probe

        t0 = time.perf_counter()
        result.probe = run_probe(pipe, result, progress=progress)
        timings["probe"] = time.perf_counter() - t0
    return result


def _rewrites_prompts(specs: Sequence[str]) -> bool:
    from pipelines.base import parse_technique

    return any(parse_technique(s).implements("prepare_prompt") for s in specs)


def _first_control(stack, images: torch.Tensor, keys: list[str]) -> torch.Tensor | None:
    """The control images of a candidate's first ControlNet ([n, 3, H, W] in [0, 1]), for the report; None
    without one."""
    if not stack.residuals:
        return None
    controls = stack.control_images(images, keys)
    first = next((c for c in controls if isinstance(c, torch.Tensor)), None) if controls else None
    return None if first is None else first.float().cpu()


def _inputs(pipe, images, cfg: GateConfig, keys, prompts, fields) -> GateInputs:
    from difffeat.models.layers import native_resolution
    from gate.inputs import load_inputs

    if isinstance(images, GateInputs):
        return images
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"images tensor must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        n = len(images)
        keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
        prompts = [cfg.prompt] * n if prompts is None else list(prompts)
        fields = [{} for _ in range(n)] if fields is None else [dict(f) for f in fields]
        if not len(keys) == len(prompts) == len(fields) == n:
            raise UserError(f"got {n} images but {len(keys)} keys, {len(prompts)} prompts and {len(fields)} fields")
        return GateInputs(images.float(), keys, prompts, fields)
    inputs, _, _ = load_inputs(str(images), native_resolution(pipe), n=cfg.n, seed=cfg.seed, prompt=cfg.prompt,
                               prompt_source=cfg.prompt_source, caption_column=cfg.caption_column)
    return inputs


# ----------------------------------------------------------------------------------------------- greedy
def _merge(*spec_lists: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(s for specs in spec_lists for s in specs))


def _greedy(scorer: _Scorer, result: GateResult, progress: bool) -> dict:
    """Forward selection on the primary score over the accepted candidates.

    Start from the best accepted candidate; at each step add the candidate whose techniques, merged into
    the current combination, give the largest paired improvement over it, if that improvement is
    significant (the same test as the decision); stop when none is. Combinations the stack refuses (two
    guidance techniques) are recorded and skipped.
    """
    pool = list(result.accepted)
    steps: list[dict] = []
    if not pool:
        return {"selected": [], "specs": [], "steps": steps, "note": "no candidate was accepted"}
    members = [pool.pop(0)]
    current = result.evaluations[members[0]]
    steps.append({"members": list(members), "specs": current.specs, "kept": True,
                  result.primary: result.scores[members[0]][result.primary].as_dict()})
    while pool:
        trials = []
        for name in pool:
            specs = _merge(current.specs, result.candidates[name])
            try:
                ev = scorer.evaluate(specs)
            except UserError as e:
                steps.append({"members": [*members, name], "specs": specs, "kept": False, "refused": str(e)})
                continue
            gain = scorer.improvement(ev, current)
            trials.append((gain.value, name, ev, gain))
            steps.append({"members": [*members, name], "specs": specs, "kept": False,
                          result.primary: bootstrap(scorer.statistic(ev, result.primary), scorer.idx).as_dict(),
                          "improvement": gain.as_dict()})
        good = [t for t in trials if t[3].low > 0]
        if not good:
            break
        _, name, ev, _ = max(good, key=lambda t: t[0])
        steps[[i for i, s in enumerate(steps) if s["members"] == [*members, name]][-1]]["kept"] = True
        members.append(name)
        pool.remove(name)
        current = ev
    out = {"selected": members, "specs": current.specs, "steps": steps}
    if len(members) > 1:  # the combination joins the table and the report
        name = next(n for n in ("greedy", "greedy-combo", "greedy-forward") if n not in result.candidates)
        result.candidates[name] = current.specs
        result.evaluations[name] = current
        result.scores[name] = scorer.intervals(current)
        result.improvement[name] = scorer.improvement(current, result.evaluations[REFERENCE])
        if result.improvement[name].low > 0:
            result.accepted.append(name)
        out["name"] = name
    return out
