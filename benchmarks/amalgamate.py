"""Cost of a training iteration of a segmentation head with the paper's amalgamation against the plain concat
head, at V = 3 feature variants (issue #12, and issue #26 for the released form: amalgamate ≤ 1.5× concat per
iteration).

Each contender is `downstream.seg.model.SegModel` (conv head, hidden 128, feature normalisation) trained by
AdamW on random features and labels: forward (``with_penalty``: the amalgamation's Eq. 5 terms come with the
logits), the loss at the mask resolution (CE, plus the weighted penalty for amalgamate:
`downstream.seg.amalgamate.penalty_weighting`), backward, step. The amalgamate contenders are the released form
(the default: one assigner call per variant, the adaptive weighting), the paper's fixed-γ weighting, and the
call before issue #26 (all V maps through the assigner as one batch) for the cost of the per-variant calls. The
contenders run in turns (round robin) so that load from other jobs on the machine falls on all of them alike;
the median time per iteration is reported, with its ratio to concat.

Shape sets: `mini` = the gdf-legacy layers of the mini model at 128² (what docs/experiments/content_shift.sh
extracts: 128×16², 64×32², 32×32²), batch 8; `sd15` = the gdf-legacy layers of SD-1.5 at 256² (1280×8²,
1280×16², 640×32², 320×32²), batch 2.

Run: `OMP_NUM_THREADS=1 python benchmarks/amalgamate.py [--shapes mini sd15] [--iterations 10] [--rounds 5]
[--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import downstream.seg.amalgamate as amalgamate  # noqa: E402
from downstream.seg.data import FeatureSpec  # noqa: E402
from downstream.seg.model import HeadConfig, SegModel  # noqa: E402

SHAPES = {"mini": ([(128, 16, 16), (64, 32, 32), (32, 32, 32)], 8, (128, 128)),
          "sd15": ([(1280, 8, 8), (1280, 16, 16), (640, 32, 32), (320, 32, 32)], 2, (256, 256))}
VARIANTS = ("plain", "canny", "lora")
CONTENDERS = {
    "concat": {},
    "weighted": {"variants": "weighted"},
    "amalgamate pixel n=1": {"variants": "amalgamate", "assigners": 1},
    "amalgamate pixel n=1, paper weighting": {"variants": "amalgamate", "assigners": 1,
                                              "amalgamation_weighting": "paper"},
    "amalgamate pixel n=1, one batched call (before #26)": {"variants": "amalgamate", "assigners": 1,
                                                            "batched": True},
    "amalgamate pixel n=2": {"variants": "amalgamate", "assigners": 2},
    "amalgamate pixel n=3": {"variants": "amalgamate", "assigners": 3},
    "amalgamate global n=1": {"variants": "amalgamate", "assigners": 1, "assigner": "global"},
}
TARGET = "amalgamate pixel n=1"  # the default amalgamation: the released form
PER_VARIANT = amalgamate.assigner_weights


def batched_weights(assigner, maps):
    """The assigner call before issue #26: the V maps through the assigner as one batch."""
    v, b = len(maps), maps[0].shape[0]
    logits = assigner(torch.cat(list(maps))).unflatten(0, (v, b)).transpose(0, 1)
    return torch.softmax(logits.float(), dim=1).to(maps[0].dtype)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name} ({os.cpu_count()} cores)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Contender:
    def __init__(self, specs, options: dict, batch: int, mask_size, classes: int = 12, device: str = "cpu"):
        torch.manual_seed(0)
        options = dict(options)
        self.batched, self.device = options.pop("batched", False), device
        config = HeadConfig(**options)
        self.model = SegModel(specs, classes, config).to(device).train()
        self.weighting = (amalgamate.penalty_weighting(config.amalgamation_weighting, config.gamma_sparsity,
                                                       config.gamma_diversity)
                          if config.variants == "amalgamate" else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        self.feats = [torch.randn(batch, *s.shape, generator=g).to(device) for s in specs]
        self.mask = torch.randint(0, classes, (batch, *mask_size), generator=g).to(device)

    def step(self) -> None:
        amalgamate.assigner_weights = batched_weights if self.batched else PER_VARIANT
        try:
            outputs, terms = self.model(self.feats, with_penalty=True)
        finally:
            amalgamate.assigner_weights = PER_VARIANT
        loss = sum(F.cross_entropy(F.interpolate(z, size=self.mask.shape[-2:], mode="bilinear", align_corners=False),
                                   self.mask) for z in outputs)
        if terms is not None and self.weighting is not None:
            penalty = self.weighting.penalty(terms, loss)
            self.weighting.update(loss.detach())
            loss = loss + penalty
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time(self, iterations: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t0) / iterations


def run(name: str, iterations: int, rounds: int, device: str = "cpu", names=tuple(CONTENDERS)) -> dict[str, float]:
    layers, batch, mask_size = SHAPES[name]
    specs = [FeatureSpec(0, f"{v}/layer{i}", s) for v in VARIANTS for i, s in enumerate(layers)]
    contenders = {k: Contender(specs, CONTENDERS[k], batch, mask_size, device=device) for k in names}
    for c in contenders.values():  # warm-up
        c.time(2)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, c in contenders.items():
            times[k].append(c.time(iterations))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--iterations", type=int, default=10, help="iterations per timed turn")
    parser.add_argument("--rounds", type=int, default=5, help="turns per contender (the median is reported)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--contenders", nargs="+", type=int, metavar="I", default=list(range(len(CONTENDERS))),
                        help="only these contenders, by index in CONTENDERS (concat and the target always run): "
                             + "; ".join(f"{i} {k}" for i, k in enumerate(CONTENDERS)))
    args = parser.parse_args()
    keys = list(CONTENDERS)
    names = [k for i, k in enumerate(keys) if i in set(args.contenders) or k in ("concat", TARGET)]
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {threads} torch thread(s)"
    print(f"## amalgamate.py ({time.strftime('%Y-%m-%d')})\n")
    chosen = "" if len(names) == len(keys) else f" --contenders {' '.join(str(keys.index(k)) for k in names)}"
    print(f"`OMP_NUM_THREADS={threads} python benchmarks/amalgamate.py --shapes {' '.join(args.shapes)} --iterations "
          f"{args.iterations} --rounds {args.rounds} --device {args.device}{chosen}`; {where}, load average at start "
          f"{os.getloadavg()[0]:.1f}; V = {len(VARIANTS)} variants, conv head (hidden 128), AdamW step included.\n")
    print("| shapes | contender | ms / iteration | ÷ concat |\n|---|---|---|---|")
    verdicts = []
    for name in args.shapes:
        result = run(name, args.iterations, args.rounds, args.device, names)
        for k, t in result.items():
            print(f"| {name} | {k} | {1000 * t:.1f} | {t / result['concat']:.2f}× |")
        verdicts.append(f"{name}: {result[TARGET] / result['concat']:.2f}×")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}. Target ({TARGET} ÷ concat ≤ 1.5): " + ", ".join(verdicts))


if __name__ == "__main__":
    main()
