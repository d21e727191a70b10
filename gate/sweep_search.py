"""The search of `difffeat sweep`: configurations, successive halving over growing image sets, checkpoints after
every unit of work, and greedy forward selection of a layer set.

A unit of work is one rung's new images for one (variant, noise mode): one `FeatureExtractor` with hooks on every
layer still in the race at the rung's timesteps, its maps reduced and fed to each live configuration's probe
(`gate.sweep_probe`). After the units of a rung, every live configuration is scored on all images so far and the
best go on. The state after each unit (probe sums and kept maps as safetensors, progress as JSON) is a checkpoint
of the run folder, so a killed sweep resumes where it was and ranks exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config and inputs are made by `gate.sweeping`, which imports this module
    from gate.sweeping import SweepConfig, SweepInputs


@dataclass(frozen=True)
class Candidate:
    """One configuration of the sweep."""

    variant: str
    noise: str  # noise-xE (E noise draws averaged) or clean
    t: int
    layer: str

    @property
    def id(self) -> str:
        return f"{self.variant}/{self.noise}/t{self.t}/{self.layer}"

    @property
    def group(self) -> str:
        """The extraction unit it belongs to: one extractor serves a (variant, noise mode)."""
        return f"{self.variant}/{self.noise}"

    @property
    def ensemble(self) -> int:
        return 1 if self.noise == "clean" else int(self.noise.removeprefix("noise-x"))


def rung_sizes(n: int, min_images: int) -> list[int]:
    """Images per successive-halving rung: min_images, doubling, ending at n (one rung when min_images ≥ n)."""
    sizes = [min(min_images, n)]
    while sizes[-1] < n:
        sizes.append(min(2 * sizes[-1], n))
    return sizes


def kept_count(alive: int, keep: float, top_k: int) -> int:
    """Configurations going on from a rung of `alive`: the top `keep` fraction, never fewer than top_k."""
    return min(alive, max(math.ceil(keep * alive), top_k))


# ---------------------------------------------------------------------------------------- the search
class Search:
    """The successive-halving search over a plan of configurations, with its checkpointed progress."""

    def __init__(self, cfg: SweepConfig, pipe, data: SweepInputs, plan: list[Candidate], spec, stacks: dict,
                 run=None, progress: bool = False):
        from difffeat.extraction.extract import encode_latents
        from difffeat.models.prompts import PromptEncoder
        from gate.sweep_probe import Reducer

        self.cfg, self.pipe, self.data, self.plan, self.spec, self.stacks = cfg, pipe, data, plan, spec, stacks
        self.run, self.progress = run, progress
        self.by_id = {c.id: c for c in plan}
        inputs = data.inputs
        self.latents = encode_latents(pipe, inputs.images, inputs.keys, seed=cfg.seed, batch_size=cfg.batch_size)
        self.encoder = PromptEncoder(pipe)  # text embeddings shared by every extractor
        self.reducer = Reducer(cfg.reduce, cfg.width, cfg.seed)
        self.sizes = rung_sizes(len(inputs), cfg.min_images)
        self.probes: dict[str, Any] = {}
        self.state = {"step": 0, "rung": 0, "done": [], "rungs": [], "greedy": None}
        self.resample: dict[int, Any] = {}  # number of scored images → the bootstrap draw every configuration shares
        self.seconds = {"extract": 0.0, "probe": 0.0}

    # -- checkpoints
    def restore(self) -> bool:
        """Continue from the run folder's latest checkpoint, if it has one."""
        from gate.sweep_probe import new_probe

        ck = self.run.checkpoints.latest() if self.run is not None else None
        if ck is None:
            return False
        self.state = ck.load("progress")
        tensors, meta = _pair(ck.load("probes"))
        for cid, probe_meta in meta.items():
            probe = new_probe(self.spec, int(probe_meta["dim"]))
            probe.load_state({k.split("|", 1)[1]: v for k, v in tensors.items() if k.split("|", 1)[0] == cid},
                             probe_meta)
            self.probes[cid] = probe
        self.reducer.load_state(_pair(ck.load("reducer"))[0])
        return True

    def save(self) -> None:
        self.state["step"] += 1
        if self.run is None:
            return
        tensors, meta = {}, {}
        for cid, probe in self.probes.items():
            part, m = probe.state()
            tensors.update({f"{cid}|{k}": v for k, v in part.items()})
            meta[cid] = {**m, "dim": probe.dim}
        self.run.checkpoints.save(self.state["step"], progress=self.state, probes=(tensors or None, meta),
                                  reducer=(self.reducer.state() or None, {}))

    # -- work
    def alive(self, rung: int) -> list[Candidate]:
        return list(self.plan) if rung == 0 else [self.by_id[c] for c in self.state["rungs"][rung - 1]["kept"]]

    def units(self, rung: int) -> list[str]:
        return list(dict.fromkeys(c.group for c in self.alive(rung)))

    def extractor(self, cands: list[Candidate], timesteps: list[int], layers: list[str] | None = None):
        from difffeat.extraction.extract import FeatureExtractor

        first = cands[0]
        wanted = layers or list(dict.fromkeys(c.layer for c in cands))
        return FeatureExtractor(self.pipe, wanted, timesteps=timesteps, ensemble=first.ensemble, seed=self.cfg.seed,
                                noise=first.noise != "clean", techniques=self.stacks[first.variant],
                                batch_size=self.cfg.batch_size, prompt_encoder=self.encoder,
                                resolution=tuple(self.data.inputs.images.shape[-2:]))

    def features(self, extractor, rows: list[int]):
        """{output name: [b, C, h, w]} for image rows, one batch of images at a time."""
        x = self.data.inputs
        for s in range(0, len(rows), self.cfg.batch_size):
            batch = rows[s : s + self.cfg.batch_size]
            t0 = time.perf_counter()
            feats = extractor.extract(x.images[batch], prompts=[x.prompts[i] for i in batch],
                                      keys=[x.keys[i] for i in batch], fields=[x.fields[i] for i in batch],
                                      latents=self.latents[batch])
            self.seconds["extract"] += time.perf_counter() - t0
            yield batch, feats

    def run_unit(self, rung: int, group: str, bar) -> None:
        """Extract the rung's new images for the group's live configurations and feed their probes."""
        from gate.sweep_probe import new_probe

        cands = [c for c in self.alive(rung) if c.group == group]
        timesteps = sorted({c.t for c in cands})
        extractor = self.extractor(cands, timesteps)
        start = self.sizes[rung - 1] if rung else 0
        rows = list(range(start, self.sizes[rung]))
        roles = self.data.roles
        for batch, feats in self.features(extractor, rows):
            t0 = time.perf_counter()
            for c in cands:
                fmap = feats[c.layer if len(timesteps) == 1 else f"{c.layer}@{c.t}"]
                reduced = self.reducer(c.id, c.layer, fmap)
                probe = self.probes.get(c.id)
                if probe is None:
                    probe = self.probes[c.id] = new_probe(self.spec, reduced.shape[1])
                for row, i in enumerate(batch):
                    probe.add(i, roles[i], reduced[row], self.data.targets)
            self.seconds["probe"] += time.perf_counter() - t0
            bar.update(len(batch) * len(timesteps))

    def score(self, probe) -> tuple[Any, Any]:
        from gate.stats import resample
        from gate.sweep_probe import interval

        per_image = probe.per_image(self.spec, self.data.targets)
        n = len(per_image)
        if n not in self.resample:
            self.resample[n] = resample(n, self.cfg.n_boot, self.cfg.seed)
        return interval(self.spec, per_image, self.resample[n]), per_image

    def evaluate(self, rung: int) -> None:
        """Score every live configuration on the rung's images and keep the best for the next rung."""
        t0 = time.perf_counter()
        alive = self.alive(rung)
        scores = {c.id: self.score(self.probes[c.id])[0] for c in alive}
        ranked = sorted(alive, key=lambda c: -scores[c.id].value)  # stable: ties keep plan order
        last = rung == len(self.sizes) - 1
        kept = ranked if last else ranked[: kept_count(len(ranked), self.cfg.keep, self.cfg.top_k)]
        self.state["rungs"].append({
            "rung": rung, "images": self.sizes[rung], "configurations": len(alive), "kept": [c.id for c in kept],
            "dropped": len(alive) - len(kept), "scores": {cid: iv.as_dict() for cid, iv in scores.items()}})
        for c in alive:
            if c not in kept or last:
                self.probes.pop(c.id, None)  # its score is recorded; its state is no longer needed
        self.state["rung"], self.state["done"] = rung + 1, []
        self.seconds["probe"] += time.perf_counter() - t0

    def search(self, stop_after: int | None = None) -> bool:
        """Run (or finish) every rung; False when `stop_after` units were done first (resume goes on)."""
        from tqdm.auto import tqdm

        bar = tqdm(desc="sweep", unit="pass", disable=not self.progress)  # (image, t) passes
        done_here = 0
        try:
            while self.state["rung"] < len(self.sizes):
                rung = self.state["rung"]
                for group in self.units(rung):
                    if group in self.state["done"]:
                        continue
                    if stop_after is not None and done_here >= stop_after:
                        return False
                    self.run_unit(rung, group, bar)
                    self.state["done"].append(group)
                    done_here += 1
                    self.save()
                self.evaluate(rung)
                self.save()
        finally:
            bar.close()
        return True

    # -- greedy forward selection of a layer set
    def greedy(self, layers: list[str]) -> dict:
        """Starting from the winner, add the layer (same variant, noise mode and t) whose concatenation gains most,
        while the paired bootstrap interval of the gain lies above 0 (GATE's `--greedy` rule)."""
        import torch
        import torch.nn.functional as F

        from gate.stats import bootstrap, difference
        from gate.sweep_probe import new_probe, statistic

        best = self.by_id[self.state["rungs"][-1]["kept"][0]]
        extractor = self.extractor([best], [best.t], layers=layers)
        rows = list(range(len(self.data.inputs)))
        reduced: dict[str, list] = {layer: [] for layer in layers}
        for _batch, feats in self.features(extractor, rows):
            for layer in layers:
                cid = Candidate(best.variant, best.noise, best.t, layer).id
                reduced[layer] += list(self.reducer(cid, layer, feats[layer]))

        def per_image(chosen: list[str]):
            grid = max((reduced[layer][0].shape[-2:] for layer in chosen), key=lambda s: s[0] * s[1])
            probe = None
            for i, role in enumerate(self.data.roles):
                maps = [reduced[layer][i] for layer in chosen]
                maps = [m if tuple(m.shape[-2:]) == tuple(grid) else
                        F.interpolate(m[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]
                        for m in maps]
                fmap = torch.cat(maps, 0)
                probe = probe or new_probe(self.spec, fmap.shape[0])
                probe.add(i, role, fmap, self.data.targets)
            return self.score(probe)

        chosen = [best.layer]
        current, cur_values = per_image(chosen)
        steps = [{"layers": list(chosen), "score": current.as_dict(), "gain": None, "kept": True}]
        task = self.spec.task
        while True:
            trials = []
            for layer in layers:
                if layer in chosen:
                    continue
                iv, values = per_image(chosen + [layer])
                idx = self.resample[len(values)]
                gain = bootstrap(difference(statistic(task, values), statistic(task, cur_values)), idx,
                                 self.cfg.level)
                trials.append((layer, iv, values, gain))
            good = [tr for tr in trials if tr[3].low > 0]
            for layer, iv, _, gain in trials:
                steps.append({"layers": chosen + [layer], "score": iv.as_dict(), "gain": gain.as_dict(),
                              "kept": bool(good) and layer == max(good, key=lambda tr: tr[1].value)[0]})
            if not good:
                break
            layer, current, cur_values, _ = max(good, key=lambda tr: tr[1].value)
            chosen.append(layer)
        order = {name: i for i, name in enumerate(layers)}
        return {"start": best.id, "selected": sorted(chosen, key=order.__getitem__), "score": current.as_dict(),
                "steps": steps}


def _pair(value) -> tuple[dict, dict]:
    """A checkpoint entry saved as (tensors, meta): an empty tensor dict comes back as JSON."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, list) and len(value) == 2:
        return value[0] or {}, value[1] or {}
    return {}, {}
