"""The measured effect of each generation technique on mini (issue "techniques"): reconstruction and features.

    OMP_NUM_THREADS=1 python docs/experiments/techniques.py [--out docs/experiments] [--n-recon 16] [--n-feat 32]

For every technique alone (and two combinations), on held-out Shapes-LT scenes (`heldout_scenes`, seed 0):
- reconstruction: img2img at strength 0.7 (20 DDIM steps, seed 0) against the input: PSNR, canny edge F1;
- features (`dift` = up_blocks.1) at t = 50 and the amplified t = 300 against the clean features (t = 0, no
  noise, the image's own caption): cosine similarity and the paper's Laplacian contour difference (Eq. 1).
The run's base prompt is empty; prompt techniques replace it. The LoRA is trained here on 30 Shapes-LT train
scenes with `difffeat lora train` (rank 16, 300 steps). Writes techniques.json and techniques_table.md
(pasted into techniques.md with a reading).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def train_table_lora(work: Path) -> Path:
    from difffeat.data.shapes_lt import synthesize
    from pipelines.lora_train import LoraTrainConfig, train_lora

    data = work / "lora-data"
    if not (data / "train" / "metadata.csv").exists():
        synthesize(data, n=40, seed=21, overwrite=True)
    out = work / "lora-shapes"
    if not (out / "pytorch_lora_weights.safetensors").exists():
        train_lora(LoraTrainConfig(images=str(data / "train"), out=str(out), rank=16, alpha=8, unet_lr=5e-4,
                                   text_lr=1e-4, steps=300), progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/experiments")
    ap.add_argument("--work", default="runs/techniques")
    ap.add_argument("--n-recon", type=int, default=16)
    ap.add_argument("--n-feat", type=int, default=32)
    args = ap.parse_args()
    from difffeat import FeatureExtractor, load_pipeline
    from difffeat.zoo.quality import heldout_scenes
    from gate.score import contour_diff, edge_f1, psnr
    from pipelines import img2img

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lora = train_table_lora(work)
    pipe = load_pipeline("mini")
    scenes = heldout_scenes(max(args.n_recon, args.n_feat), seed=0)
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    caps = [s.fine_caption for s in scenes]
    fields = [{"caption": c, "other_caption": o} for c, o in zip(caps, caps[1:] + caps[:1])]
    rows = {
        "reference (none)": ([], []),
        "prompt:caption (own fine caption)": (["prompt:caption"], ["prompt:caption"]),
        "prompt:other-caption (next image's)": (["prompt:other-caption"], ["prompt:other-caption"]),
        "prompt:fine (quality tags)": (["prompt:fine"], ["prompt:fine"]),
        "controlnet:canny": (["controlnet:canny"], ["controlnet:canny"]),
        "lora (30 Shapes-LT scenes)": ([f"lora:{lora}"], [f"lora:{lora}"]),
        "denoise-from (t+10)": (None, ["denoise-from:{t10}"]),
        "controlnet:canny + denoise-from (t+10)": (["controlnet:canny"], ["controlnet:canny", "denoise-from:{t10}"]),
        "prompt:caption + cfg:4": (["prompt:caption", "cfg:4"], ["prompt:caption", "cfg:4"]),
    }
    n_r, n_f = args.n_recon, args.n_feat
    clean = FeatureExtractor(pipe, ["dift"], timesteps=(0,), noise=False).extract(x[:n_f], prompts=caps[:n_f])
    clean = clean["up_blocks.1"]
    results = {}
    own_refs = {}  # t = 0 features with the technique itself (schedule techniques cannot run without noise)
    t0 = time.time()
    for name, (recon_specs, feat_specs) in rows.items():
        row = {}
        if recon_specs is not None:
            rec = img2img(pipe, x[:n_r], recon_specs, prompts=[""] * n_r, fields=fields[:n_r], strength=0.7,
                          steps=20, seed=0)
            row["psnr"] = mean_se(psnr(rec, x[:n_r]).tolist())
            row["edge_f1"] = mean_se(edge_f1(rec, x[:n_r]).tolist())
        for t in (50, 300):
            specs = [s.replace("{t10}", str(t + 10)) for s in feat_specs]
            feats = FeatureExtractor(pipe, ["dift"], timesteps=(t,), ensemble=2, techniques=specs).extract(
                x[:n_f], prompts=[""] * n_f, fields=fields[:n_f])["up_blocks.1"]
            cos = torch.nn.functional.cosine_similarity(feats.flatten(1), clean.flatten(1))
            row[f"cos@{t}"] = mean_se(cos.tolist())
            row[f"contour@{t}"] = mean_se(contour_diff(feats, clean).tolist())
            ref_specs = tuple(s for s in specs if not s.startswith("denoise-from"))
            if ref_specs not in own_refs:
                own_refs[ref_specs] = FeatureExtractor(pipe, ["dift"], timesteps=(0,), noise=False,
                                                       techniques=list(ref_specs)).extract(
                    x[:n_f], prompts=[""] * n_f, fields=fields[:n_f])["up_blocks.1"]
            own = own_refs[ref_specs]
            row[f"cos_own@{t}"] = mean_se(torch.nn.functional.cosine_similarity(feats.flatten(1),
                                                                                  own.flatten(1)).tolist())
            row[f"contour_own@{t}"] = mean_se(contour_diff(feats, own).tolist())
        results[name] = row
        print(name, {k: round(v[0], 4) for k, v in row.items()}, f"{time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    (out / "techniques.json").write_text(json.dumps(results, indent=1) + "\n")
    fmt = {"psnr": "{:.2f} ± {:.2f}", "edge_f1": "{:.3f} ± {:.3f}"}
    fmt.update({f"{m}@{t}": ("{:.4f} ± {:.4f}" if m.startswith("cos") else "{:.1f} ± {:.1f}")
                for m in ("cos", "contour", "cos_own", "contour_own") for t in (50, 300)})
    lines = []
    for title, cols in (("img2img PSNR (dB) ↑ | edge F1 ↑ | cos t=50 ↑ | contour t=50 ↓ | cos t=300 ↑ "
                         "| contour t=300 ↓",
                         ["psnr", "edge_f1", "cos@50", "contour@50", "cos@300", "contour@300"]),
                        ("cos t=50 ↑ | contour t=50 ↓ | cos t=300 ↑ | contour t=300 ↓ (reference: t = 0 with the "
                         "technique)", ["cos_own@50", "contour_own@50", "cos_own@300", "contour_own@300"])):
        lines += ["", f"| technique | {title} |", "|---" * (len(cols) + 1) + "|"]
        for name, row in results.items():
            cells = [fmt[c].format(*row[c]) if c in row else "n/a" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "techniques_table.md").write_text("\n".join(lines).lstrip() + "\n")  # pasted into techniques.md
    print("\n".join(lines))


if __name__ == "__main__":
    main()
