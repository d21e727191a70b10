"""Extraction throughput and memory against the peers' ways of doing it, all measured in one run.

Contenders, the same model, layers, timestep and images for each:
- naive: one image per forward, VAE posterior sample, full UNet forward with a hook, features kept in
  RAM and saved as .npy at the end (how ddpm-segmentation / generic-diffusion-feature loop);
- dift: DIFT's shape: batch = the ensemble of one image, stopping after the up block holding the layer;
- bare: batched VAE encode + UNet forward up to the deepest layer, images already in memory, no I/O;
- difffeat: `difffeat extract` end to end (PNG decoding, prompts, store writing included).
Then peak RSS of `difffeat extract` over 4,000 images against 250 (streaming, not accumulating).

Run: `python benchmarks/extract.py [--n 256] [--ensemble 1] [--model mini]`; it prints a table and the
ratios, and with --results appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from difffeat import load_pipeline
from difffeat.data.images import load_image, to_tensor
from difffeat.data.shapes_lt import synthesize
from difffeat.extraction.capture import Capture
from difffeat.models.layers import resolve_layers


def naive(pipe, paths, layers, t, ensemble, out_dir):
    modules = dict(pipe.unet.named_modules())
    kept, cur = [], {}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: cur.__setitem__(n, o)) for n in layers]
    emb = pipe.text_encoder(pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")
                            .input_ids).last_hidden_state
    a = pipe.scheduler.alphas_cumprod[t]
    for p in paths:
        x = to_tensor([load_image(p)]) * 2 - 1
        feats = []
        for _ in range(ensemble):
            z = pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor
            zt = a.sqrt() * z + (1 - a).sqrt() * torch.randn_like(z)
            pipe.unet(zt, torch.tensor([t]), emb)
            feats.append({n: v.clone() for n, v in cur.items()})
        kept.append({n: torch.stack([f[n] for f in feats]).mean(0).numpy() for n in layers})
    for h in hooks:
        h.remove()
    for i, f in enumerate(kept):
        for n, v in f.items():
            np.save(out_dir / f"{i}_{n}.npy", v)


class _Stop(Exception):
    pass


def dift(pipe, paths, layers, t, ensemble):
    modules = dict(pipe.unet.named_modules())
    block = ".".join(layers[-1].split(".")[:2])  # DIFT stops after the whole up block
    cur = {}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: cur.__setitem__(n, o)) for n in layers]

    def stop(*_):
        raise _Stop

    hooks.append(modules[block].register_forward_hook(stop))
    emb = pipe.text_encoder(pipe.tokenizer([""] * ensemble, padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids).last_hidden_state
    a = pipe.scheduler.alphas_cumprod[t]
    out = []
    for p in paths:
        x = to_tensor([load_image(p)]) * 2 - 1
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        zt = a.sqrt() * z + (1 - a).sqrt() * torch.randn(ensemble, *z.shape[1:])
        try:
            pipe.unet(zt, torch.tensor([t] * ensemble), emb)
        except _Stop:
            pass
        out.append({n: v.mean(0).numpy() for n, v in cur.items()})
    for h in hooks:
        h.remove()


def bare(pipe, x, layers, t, ensemble, batch):
    emb = pipe.text_encoder(pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt")
                            .input_ids).last_hidden_state
    a = pipe.scheduler.alphas_cumprod[t]
    with Capture(pipe.unet, layers, (x.shape[-2] // 4, x.shape[-1] // 4)) as cap:
        for s in range(0, len(x), batch):
            z = pipe.vae.encode(x[s : s + batch] * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
            z = z.repeat_interleave(ensemble, 0)
            zt = a.sqrt() * z + (1 - a).sqrt() * torch.randn_like(z)
            cap.run(zt, torch.tensor([t] * len(z)), emb.expand(len(z), -1, -1))


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - t0


def peak_rss_extract(images: Path, n: int, model: str, layers: list[str], tmp: Path) -> float:
    """Peak RSS (MiB) of a `difffeat extract` process over the first n images of `images`."""
    sub = tmp / f"subset{n}"
    sub.mkdir()
    for p in sorted(images.glob("*.png"))[:n]:
        os.symlink(p, sub / p.name)
    code = ("import resource, sys; from difffeat.cli import main; rc = main(sys.argv[1:]); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    args = ["--quiet", "extract", str(sub), "--out", str(tmp / f"store{n}"), "--model", model]
    for layer in layers:
        args += ["--layer", layer]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return int(out.split("RSS")[-1].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--ensemble", type=int, default=1)
    ap.add_argument("--t", type=int, default=50)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--layers", nargs="+", default=["dift"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rss", nargs=2, type=int, default=[250, 4000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", action="store_true", help="append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(args.model)
    layers = resolve_layers(pipe, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthesize(tmp / "shapes", n=max(args.rss[1], args.n) * 10 // 8 + 3, seed=0)
        images = data / "train" / "images"
        paths = sorted(images.glob("*.png"))[: args.n]
        sub = tmp / "bench"
        sub.mkdir()
        for p in paths:
            os.symlink(p, sub / p.name)
        x = to_tensor([load_image(p) for p in paths])
        (tmp / "npy").mkdir()
        timed(bare, pipe, x[:32], layers, args.t, args.ensemble, args.batch_size)  # warm-up, not measured
        results = {
            "naive": timed(naive, pipe, paths, layers, args.t, args.ensemble, tmp / "npy"),
            "dift": timed(dift, pipe, paths, layers, args.t, args.ensemble),
        }
        from difffeat.extraction.runner import ExtractRunConfig, run_extraction

        # bare and difffeat are close: alternate them and keep each one's best of `--repeats`, so that
        # a passing load on the machine does not decide the ratio.
        for r in range(args.repeats):
            bare_s = timed(bare, pipe, x, layers, args.t, args.ensemble, args.batch_size)
            cfg = ExtractRunConfig(images=str(sub), out=str(tmp / f"store{r}"), model=args.model, layers=layers,
                                   timesteps=[args.t], ensemble=args.ensemble, batch_size=args.batch_size)
            t0 = time.perf_counter()
            run_extraction(cfg, progress=False, pipe=pipe)
            ours = time.perf_counter() - t0
            results["bare"] = min(results.get("bare", bare_s), bare_s)
            results["difffeat"] = min(results.get("difffeat", ours), ours)
        rss = {n: peak_rss_extract(images, n, args.model, layers, tmp) for n in args.rss}
    ips = {k: args.n / v for k, v in results.items()}
    lines = [f"model {args.model}, {args.n} images, layers {layers}, t={args.t}, ensemble {args.ensemble}, "
             f"batch {args.batch_size}; {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads",
             "| contender | images/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in ips.items()]
    lines += [
        f"- difffeat / naive: {ips['difffeat'] / ips['naive']:.2f}× (target ≥ 2)",
        f"- difffeat / dift: {ips['difffeat'] / ips['dift']:.2f}× (target ≥ 1.3)",
        f"- bare / difffeat: {ips['bare'] / ips['difffeat']:.2f}× (target ≤ 1.2)",
        f"- peak RSS {args.rss[0]} images: {rss[args.rss[0]]:.0f} MiB; "
        f"{args.rss[1]} images: {rss[args.rss[1]]:.0f} MiB "
        f"(ratio {rss[args.rss[1]] / rss[args.rss[0]]:.2f}, target ≤ 1.2)",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"images_per_second": ips, "peak_rss_mib": rss}))
    if args.results:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(f"\n## extract.py ({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
