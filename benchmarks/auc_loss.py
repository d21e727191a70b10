"""`downstream.losses.pixel_auc_loss` (moment form) against the two other ways to compute it, in one run.

Contenders, on the same logits [1, K, h, w] and long-tailed labels (Zipf over K classes, 5 % ignore):
- moment: `pixel_auc_loss`: class sums of s and s² in one blocked pass (sigmoid, square, scatter-add per
  cache-sized block of pixels, block sums in float64), O(nK) with no class loop and no [n, K] temporary;
- loop: the AUCSeg code's approach (research/aucseg_dirmixe.md A.2, A.4): a dense n×K one-hot, then per
  present class a handful of length-n vector ops (its ``0.5·A − B`` without the ½, so values compare);
- pairwise: the definition, pair by pair (`pixel_auc_loss_pairwise`, O(n²) memory), at small n only;
- sigmoid: one `torch.sigmoid` pass over the logits: the memory-bound floor of any sigmoid-score loss.

For each (K, n): forward and forward+backward time (median of repeats), the peak memory the call adds
(CUDA: allocator peak; CPU: peak RSS above the start, reset through /proc/self/clear_refs), and the
relative difference of each value from the moment form. Ratios: loop / moment (target ≥ 3 at K = 150,
n ≈ 2.6·10⁵) and moment / sigmoid.

Run: `python benchmarks/auc_loss.py [--quick] [--device cuda] [--results]`; --quick uses small sizes
(seconds), the full run n = 10⁴ … 10⁶ at K = 19 and 150 (minutes on a CPU, several GB of memory);
--results appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from downstream.losses import pixel_auc_loss, pixel_auc_loss_pairwise

FULL_SIDES = (100, 316, 512, 1000)  # n = side² ≈ 10⁴, 10⁵, 2.6·10⁵, 10⁶
QUICK_SIDES = (100, 256)
PAIRWISE_SIDE = {"full": 64, "quick": 32}  # n = 4096 / 1024 for the O(n²) definition


def per_class_loop_auc(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                       ignore_index: int = 255) -> torch.Tensor:
    """The AUCSeg code's computation (A.2): dense one-hot, per present class ``A − 2B``; the mean OvO loss.

    Per class c: ``S = (K_b − 1)/N_c`` on positives and ``1/N_{y_q}`` on negatives, ``diff = s_c − γ·[y = c]``,
    ``A = Σ S·diff²``, ``B = (Σ_neg s_c/(N_c N_{y_q})) · (Σ_pos (s_c − γ))``; summed and divided by
    K_b(K_b − 1). The code returns half of this (its ½); it is left out here so the values compare.
    """
    k = logits.shape[1]
    s = torch.sigmoid(logits).movedim(1, -1).reshape(-1, k)
    y = labels.reshape(-1)
    keep = y != ignore_index
    s, y = s[keep], y[keep]
    onehot = torch.nn.functional.one_hot(y, k).to(s.dtype)  # the n×K float matrix the code builds
    counts = onehot.sum(0)
    present = (counts > 0).nonzero()[:, 0].tolist()
    kb = len(present)
    if kb < 2:
        return logits.sum() * 0.0
    inv_n_of_pixel = 1.0 / counts[y]
    total = logits.new_zeros(())
    for c in present:
        pos = onehot[:, c]
        neg = 1.0 - pos
        sc = s[:, c]
        weight = pos * (kb - 1) / counts[c] + neg * inv_n_of_pixel
        diff = sc - margin * pos
        a = (weight * diff * diff).sum()
        b = (neg * sc * inv_n_of_pixel / counts[c]).sum() * (pos * (sc - margin)).sum()
        total = total + a - 2 * b
    return total / (kb * (kb - 1))


def make_inputs(k: int, side: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, k, side, side, generator=g) * 2
    p = 1.0 / torch.arange(1, k + 1).double()  # Zipf: a long tail, as in segmentation data
    labels = torch.multinomial(p / p.sum(), side * side, replacement=True, generator=g).view(1, side, side)
    labels[torch.rand(1, side, side, generator=g) < 0.05] = 255
    return logits.to(device), labels.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn, logits: torch.Tensor, labels: torch.Tensor, device: str, backward: bool, repeat: int
            ) -> tuple[float, float, float]:
    """(median seconds, peak MiB added, value) of `fn`, after one warm-up call."""
    def call():
        x = logits.detach().requires_grad_(backward)
        out = fn(x, labels)
        if backward and out.requires_grad:
            out.backward()
        return out

    value = float(call().detach())  # warm-up
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
            base = _rss_kib("VmRSS")
            call()
            peak = (_rss_kib("VmHWM") - base) / 1024
        except OSError:
            peak = float("nan")
    return statistics.median(times), peak, value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    ap.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    ap.add_argument("--sides", type=int, nargs="+", help="image sides (n = side²); default by --quick")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    sides = args.sides or (QUICK_SIDES if args.quick else FULL_SIDES)
    mode = "quick" if args.quick else "full"
    contenders = {"moment": pixel_auc_loss, "loop": per_class_loop_auc,
                  "sigmoid": lambda x, y: torch.sigmoid(x).sum()}
    rows = []
    for k in args.classes:
        cases = [(PAIRWISE_SIDE[mode], {**contenders, "pairwise": pixel_auc_loss_pairwise})]
        cases += [(side, contenders) for side in sides]
        for side, fns in cases:
            logits, labels = make_inputs(k, side, args.device)
            res = {}
            for name, fn in fns.items():
                fwd, peak, value = measure(fn, logits, labels, args.device, False, args.repeat)
                both, _, _ = measure(fn, logits, labels, args.device, True, args.repeat)
                res[name] = {"fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * both, "peak_mib": peak, "value": value}
            ref = res["moment"]["value"]
            for name, r in res.items():
                r["rel_diff"] = None if name == "sigmoid" else abs(r["value"] - ref) / max(abs(ref), 1e-30)
            rows.append({"K": k, "n": side * side, **res})
            print(json.dumps(rows[-1]), flush=True)

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"pixel AUC loss, {args.device} ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads), torch {torch.__version__}, median of {args.repeat}; "
             f"load average at the end {load}",
             "| K | n | contender | fwd ms | fwd+bwd ms | peak MiB | rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("moment", "loop", "pairwise", "sigmoid"):
            if name in r:
                c = r[name]
                diff = "-" if c["rel_diff"] is None else f"{c['rel_diff']:.1e}"
                lines.append(f"| {r['K']} | {r['n']} | {name} | {c['fwd_ms']:.2f} | {c['fwd_bwd_ms']:.2f} | "
                             f"{c['peak_mib']:.1f} | {diff} |")
    lines += ["", "| K | n | loop / moment (fwd) | loop / moment (fwd+bwd) | moment / sigmoid (fwd) |",
              "|---|---|---|---|---|"]
    for r in rows:
        m, lo, sg = r["moment"], r["loop"], r["sigmoid"]
        lines.append(f"| {r['K']} | {r['n']} | {lo['fwd_ms'] / m['fwd_ms']:.2f}× | "
                     f"{lo['fwd_bwd_ms'] / m['fwd_bwd_ms']:.2f}× | {m['fwd_ms'] / sg['fwd_ms']:.1f}× |")
    target = [r for r in rows if r["K"] == 150 and abs(r["n"] - 262_144) < 30_000]
    for r in target:
        fwd = r["loop"]["fwd_ms"] / r["moment"]["fwd_ms"]
        both = r["loop"]["fwd_bwd_ms"] / r["moment"]["fwd_bwd_ms"]
        ok = min(fwd, both) >= 3 and r["loop"]["rel_diff"] <= 1e-5
        lines.append(f"- target (K = 150, n = {r['n']}: ≥ 3× the loop, forward and forward+backward, values "
                     f"within 1e-5): {'met' if ok else 'NOT met'} ({fwd:.1f}× / {both:.1f}×, "
                     f"rel. diff {r['loop']['rel_diff']:.1e})")
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(f"\n## auc_loss.py{' --quick' if args.quick else ''} ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
