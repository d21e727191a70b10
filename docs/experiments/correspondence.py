"""Issue #24's experiment: semantic correspondence on the correspondence world with mini: PCK@0.1 of plain features,
of each GATE candidate technique as a variant, of GATE's greedy choice and of fused (concatenated) variants; and
which layer and timestep match best (docs/experiments/correspondence.md).

    python docs/experiments/correspondence.py [WORKDIR] [--pairs 300] [--seeds 0 1 2] [--gate-images 12]

Every step is difffeat's own command (eval-corr through `downstream.corr.evaluate.eval_corr`, the function behind
`difffeat eval-corr`, in this process: a fresh interpreter per evaluation would cost more than the evaluation), and
every step is skipped when its output is there, so an interrupted run goes on where it stopped:

1. ``data synth --task corr``: the world in SPair-71k's layout; then a caption beside every image (``<name>.txt``,
   Shapes-LT's own words: "a large cyan circle at the bottom left"), from its ImageAnnotation, so that
   ``prompt:caption`` has something to say.
2. ``gate`` on the val split's images (``--greedy``): img2img with and without each candidate (`CANDIDATES`).
3. ``extract`` the trn split's images (nothing is trained anywhere, so every split is unseen; GATE saw only val
   images) at their native 64², `dift` layer, t = 50, seeded noise, one store per seed holding plain, every
   candidate and GATE's greedy combination as variants; the same layer of mini-random (the architecture with random
   weights: what matching owes to the architecture and the resizing alone); and the plain features at several
   layers × timesteps per seed (and once in clean mode) for the sweep.
4. ``eval-corr`` (DIFT's protocol: features resized to each target's own pixels, cosine, hard argmax; PCK@α bbox /
   img, per point / per image, 95% bootstrap intervals over pairs) for every row and seed.
5. The tables (mean ± std over seeds; paired differences to plain with 95% bootstrap intervals over pairs, of the
   seed-averaged per-pair counts) and Spearman ρ between GATE's PSNR and PCK over the candidates, written to
   WORKDIR/results.{json,md} and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CANDIDATES = {  # name → technique specs
    "caption": ["prompt:caption"],
    "fine": ["prompt:fine"],
    "label": ["prompt:label"],  # "a photo of a {label}": DIFT's prompt, the category
    "canny": ["controlnet:canny"],
    "canny-caption": ["controlnet:canny", "prompt:caption"],
    "other-caption": ["prompt:other-caption"],  # another image's caption: meant to hurt
}
LAYER = "up_blocks.1"  # mini's `dift`
SWEEP_LAYERS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]
SWEEP_T = [10, 50, 100, 200, 400]
ALPHA = 0.1


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def cli(*args: str) -> None:
    """One difffeat command, as a user types it (offline)."""
    log("$ difffeat", " ".join(args))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "difffeat", "--quiet", *args], check=True, env=env)


# ------------------------------------------------------------------------------------------------ step 1
def write_captions(world: Path) -> int:
    """A Shapes-LT caption beside every image of the world, from its ImageAnnotation (size, colour, class, where)."""
    from difffeat.data.shapes_lt import SIZE, position_name

    n = 0
    for file in sorted((world / "ImageAnnotation").rglob("*.json")):
        a = json.loads(file.read_text())
        h, w = a["image_height"], a["image_width"]
        radius = a["radius"] * SIZE / min(h, w)
        size = "small" if radius <= 6.5 else "medium" if radius <= 10.5 else "large"
        x1, y1, x2, y2 = a["bndbox"]
        cx, cy = a["kps"].get("0") or ((x1 + x2) / 2, (y1 + y2) / 2)
        where = position_name((cx + 0.5) * SIZE / w, (cy + 0.5) * SIZE / h)
        phrase = "in the center" if where == "center" else f"at the {where}"
        image = world / "JPEGImages" / a["category"] / (Path(a["filename"]).stem + ".txt")
        image.write_text(f"a {size} {a['colour']} {a['category']} {phrase}\n")
        n += 1
    return n


# ------------------------------------------------------------------------------------------------ steps 1–3
def prepare(w: Path, args) -> dict:
    world = w / "world"
    if not (world / "classes.json").is_file():
        cli("data", "synth", str(world), "--task", "corr", "--n", str(args.pairs), "--seed", "0")
    captions = write_captions(world)
    (w / "candidates.yaml").write_text("".join(f"{k}: [{', '.join(v)}]\n" for k, v in CANDIDATES.items()))
    if not (w / "gate" / "ranking.json").is_file():
        cli("gate", f"spair:{world}:val", "--candidates", str(w / "candidates.yaml"), "--out", str(w / "gate"),
            "--n", str(args.gate_images), "--layer", "dift", "--greedy", "--overwrite")
    ranking = json.loads((w / "gate" / "ranking.json").read_text())
    greedy = ranking.get("greedy") or {}
    variants = {"plain": [], **CANDIDATES}
    if len(greedy.get("selected", [])) > 1:  # a combination of its own; a single candidate is already a row
        variants["greedy"] = list(greedy["specs"])
    (w / "variants.yaml").write_text("variants:\n" + "".join(f"  {k}: [{', '.join(v)}]\n"
                                                             for k, v in variants.items()))
    data = f"spair:{world}:trn"
    common = ["--shard-size", "50", "--resume"]
    sweep = [*sum((["--layer", lay] for lay in SWEEP_LAYERS), [])]
    for seed in args.seeds:
        if not (w / f"feat-s{seed}" / "report.json").is_file():
            cli("extract", data, "--out", str(w / f"feat-s{seed}"), "--variants", str(w / "variants.yaml"),
                "--layer", LAYER, "--t", "50", "--seed", str(seed), *common)
        if not (w / f"random-s{seed}" / "report.json").is_file():  # the same network with random weights
            cli("extract", data, "--out", str(w / f"random-s{seed}"), "--model", "mini-random", "--layer", LAYER,
                "--t", "50", "--seed", str(seed), *common)
        if not (w / f"sweep-s{seed}" / "report.json").is_file():
            cli("extract", data, "--out", str(w / f"sweep-s{seed}"), *sweep,
                *sum((["--t", str(t)] for t in SWEEP_T), []), "--seed", str(seed), *common)
    if not (w / "sweep-clean" / "report.json").is_file():
        cli("extract", data, "--out", str(w / "sweep-clean"), *sweep, "--t", "50", "--clean", *common)
    return {"ranking": ranking, "variants": variants, "data": data, "captions": captions}


# ------------------------------------------------------------------------------------------------ step 4
def fused_sets(ranking: dict, variants: dict) -> dict[str, list[str]]:
    """Concatenated variants: plain + GATE's two best accepted candidates (filled up by its ranking when fewer were
    accepted), and plain + the greedy combination when there is one."""
    order = [r["candidate"] for r in ranking["ranking"] if r["candidate"] in CANDIDATES]
    accepted = [c for c in order if c in ranking["accepted"]]
    best = (accepted + [c for c in order if c not in accepted])[:2]
    out = {"plain+" + "+".join(best): ["plain", *best]}
    if "greedy" in variants:
        out["plain+greedy"] = ["plain", "greedy"]
    return out


def rows(prep: dict) -> list[dict]:
    """Every evaluation: name, group, store stem (per seed), variants, layers, matcher options."""
    out = [{"row": v, "group": "variant", "store": "feat", "variants": [v]} for v in prep["variants"]]
    out += [{"row": name, "group": "fused", "store": "feat", "variants": vs}
            for name, vs in fused_sets(prep["ranking"], prep["variants"]).items()]
    out.append({"row": "mini-random", "group": "baseline", "store": "random", "layers": [LAYER]})
    out.append({"row": "plain, soft-argmax W=3", "group": "matcher", "store": "feat", "variants": ["plain"],
                "soft_argmax": 3, "temperature": 0.05})
    out += [{"row": f"{lay}@{t}", "group": "sweep", "store": "sweep", "layers": [f"{lay}@{t}"], "layer": lay, "t": t}
            for lay in SWEEP_LAYERS for t in SWEEP_T]
    out += [{"row": f"{lay} clean", "group": "clean", "store": "sweep-clean", "layers": [lay], "layer": lay,
             "t": "clean"} for lay in SWEEP_LAYERS]
    return out


def evaluate_all(w: Path, prep: dict, specs: list[dict], args) -> None:
    from downstream.corr.evaluate import eval_corr

    jobs = [(r, s) for s in args.seeds for r in specs if r["group"] != "clean"] + \
           [(r, None) for r in specs if r["group"] == "clean"]
    for i, (r, seed) in enumerate(jobs, 1):
        out = w / "eval" / (slug(r["row"]) + ("" if seed is None else f"-s{seed}"))
        if (out / "results.json").is_file():
            continue
        store = w / (r["store"] if seed is None else f"{r['store']}-s{seed}")
        t0 = time.perf_counter()
        res = eval_corr([store], prep["data"], out=str(out), variants=r.get("variants"), layers=r.get("layers"),
                        soft_argmax=r.get("soft_argmax", 0), temperature=r.get("temperature", 0.02),
                        alphas=[0.05, ALPHA, 0.15], examples=6 if seed == args.seeds[0] else 0, progress=False)
        o = res["scores"]["bbox"][str(ALPHA)]["overall"]
        log(f"[{i}/{len(jobs)}] {out.name}: PCK@{ALPHA} bbox per point {100 * o['per_point']:.1f} "
            f"({time.perf_counter() - t0:.0f} s)")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".@-+" else "_" for c in name)


# ------------------------------------------------------------------------------------------------ step 5
def per_pair(w: Path, row: str, seeds) -> list[dict]:
    from downstream.corr.evaluate import read_per_pair

    names = [slug(row)] if seeds is None else [f"{slug(row)}-s{s}" for s in seeds]
    return [read_per_pair(w / "eval" / n / "per_pair.csv") for n in names]


def results_of(w: Path, row: str, seeds) -> list[dict]:
    names = [slug(row)] if seeds is None else [f"{slug(row)}-s{s}" for s in seeds]
    return [json.loads((w / "eval" / n / "results.json").read_text()) for n in names]


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_mean_counts(tables: list[dict], column: str) -> tuple[np.ndarray, np.ndarray]:
    """Per pair the correct count averaged over seeds, and the points (equal in every seed)."""
    points = tables[0]["points"]
    assert all(np.array_equal(t["points"], points) for t in tables)
    return np.mean([t["correct"][column] for t in tables], axis=0), points


def spearman_interval(gate_scores: dict[str, np.ndarray], correct: dict[str, np.ndarray], points: np.ndarray,
                      boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """ρ between each candidate's mean GATE score and its PCK per point (seed-averaged counts), with a 95% percentile
    interval from resampling GATE's images and the evaluation pairs (each paired over the candidates)."""
    from gate.stats import spearman

    names = list(gate_scores)
    pck = lambda idx: np.array([correct[n][idx].sum() / points[idx].sum() for n in names])
    rho = spearman([gate_scores[n].mean() for n in names], pck(np.arange(len(points))))
    rng = np.random.default_rng(seed)
    n_img = len(next(iter(gate_scores.values())))
    draws = []
    for _ in range(boot):
        gi, pi = rng.integers(0, n_img, n_img), rng.integers(0, len(points), len(points))
        r = spearman([gate_scores[n][gi].mean() for n in names], pck(pi))
        if np.isfinite(r):
            draws.append(r)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return float(rho), float(low), float(high)


def summarize(w: Path, prep: dict, specs: list[dict], args, timing: dict) -> dict:
    from downstream.corr.pck import paired_difference

    column = f"correct@{ALPHA}_bbox"
    plain, points = seed_mean_counts(per_pair(w, "plain", args.seeds), column)
    table = []
    for r in specs:
        seeds = None if r["group"] == "clean" else args.seeds
        runs = results_of(w, r["row"], seeds)
        entry = {k: r[k] for k in ("row", "group") if k in r}
        entry.update({k: r[k] for k in ("layer", "t", "variants") if k in r})
        for norm in ("bbox", "img"):
            for avg in ("per_point", "per_image"):
                entry[f"{norm}_{avg}"] = mean_std([x["scores"][norm][str(ALPHA)]["overall"][avg] for x in runs])
        first = runs[0]["scores"]["bbox"][str(ALPHA)]["overall"]
        entry["interval_seed0"] = {avg: [first[f"{avg}_low"], first[f"{avg}_high"]] for avg in ("per_point",
                                                                                                  "per_image")}
        entry["pairs"], entry["points"] = runs[0]["pairs"], runs[0]["points"]
        entry["per_category"] = {c: mean_std([x["scores"]["bbox"][str(ALPHA)]["per_category"][c]["per_point"]
                                               for x in runs])
                                 for c in runs[0]["scores"]["bbox"][str(ALPHA)]["per_category"]}
        if r["group"] in ("variant", "fused", "matcher", "baseline"):
            mine, _ = seed_mean_counts(per_pair(w, r["row"], args.seeds), column)
            entry["vs_plain"] = paired_difference(mine, plain, points, draws=2000, seed=0)
        table.append(entry)
    ranking = prep["ranking"]
    gate_rows = {g["candidate"]: g for g in ranking["ranking"]}
    names = {"reference": "plain", **{c: c for c in CANDIDATES}}
    if "greedy" in prep["variants"] and "greedy" in gate_rows:
        names["greedy"] = "greedy"
    scores = {names[c]: np.asarray(ranking["per_image"][c]["psnr"], float) for c in names if c in ranking["per_image"]}
    correct = {n: seed_mean_counts(per_pair(w, n, args.seeds), column)[0] for n in scores}
    rho = spearman_interval(scores, correct, points)
    return {"table": table, "gate": ranking["ranking"], "accepted": ranking["accepted"],
            "greedy": ranking.get("greedy"), "fused": fused_sets(ranking, prep["variants"]),
            "spearman_psnr_pck": rho, "captions": prep["captions"], "timing": timing,
            "settings": {k: v for k, v in vars(args).items() if k != "workdir"}}


def fmt(ms) -> str:
    return "–" if ms[0] != ms[0] else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def ci(d) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def markdown(res: dict) -> str:
    gate = {g["candidate"]: g for g in res["gate"]}
    lines = [f"PCK@{ALPHA} (%), mean ± std over seeds {res['settings']['seeds']}; interval: 95% bootstrap over pairs "
             "of seed 0's run; Δ: paired difference to plain of the seed-averaged per-pair counts, 95% bootstrap "
             "over pairs.", "",
             "| features | bbox per point | bbox per image | img per point | 95% interval (bbox per point, seed 0) "
             "| Δ vs plain (bbox per point) | GATE PSNR Δ | GATE accepted |", "|---|---|---|---|---|---|---|---|"]
    for e in res["table"]:
        if e["group"] not in ("variant", "fused", "matcher", "baseline"):
            continue
        g = gate.get(e["row"]) or (gate.get("reference") if e["row"] == "plain" else None)
        psnr = "–" if g is None else ("0 (reference)" if g["candidate"] == "reference" else
                                      f"{g['improvement']:+.2f} [{g['improvement_low']:+.2f}, "
                                      f"{g['improvement_high']:+.2f}]")
        acc = "–" if g is None else ("–" if g["candidate"] == "reference" else str(g["accepted"]))
        lo, hi = e["interval_seed0"]["per_point"]
        vs = ci(e["vs_plain"]["per_point"]) if e["row"] != "plain" else "0"
        lines.append(f"| {e['row']} | {fmt(e['bbox_per_point'])} | {fmt(e['bbox_per_image'])} | "
                     f"{fmt(e['img_per_point'])} | [{100 * lo:.1f}, {100 * hi:.1f}] | {vs} | {psnr} | {acc} |")
    greedy = res["greedy"] or {}
    lines += ["", f"GATE accepted: {', '.join(res['accepted']) or 'none'}; greedy choice: "
                  f"{' + '.join(greedy.get('selected') or []) or 'none'}; fused rows: "
                  + "; ".join(f"{k} = {' + '.join(v)}" for k, v in res["fused"].items()) + ".",
              f"Spearman ρ over the candidates (reference ↔ plain) between GATE's PSNR and PCK@{ALPHA} bbox per point: "
              f"{res['spearman_psnr_pck'][0]:.2f} [{res['spearman_psnr_pck'][1]:.2f}, "
              f"{res['spearman_psnr_pck'][2]:.2f}].", ""]
    shown = [e for e in res["table"] if e["row"] in ("plain", "mini-random", *(greedy.get("selected") or [])[:1])]
    cats = list(shown[0]["per_category"])
    lines += [f"Per category, PCK@{ALPHA} bbox per point (%), mean ± std over seeds:", "",
              "| features | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    lines += [f"| {e['row']} | " + " | ".join(fmt(e["per_category"][c]) for c in cats) + " |" for e in shown]
    lines.append("")
    sweep = {(e["layer"], e["t"]): e for e in res["table"] if e["group"] in ("sweep", "clean")}
    cols = [*SWEEP_T, "clean"]
    lines += [f"Layer × timestep, plain features, PCK@{ALPHA} bbox per point (%), mean ± std over seeds (clean: one "
              "deterministic run at t = 50):", "", "| layer | " + " | ".join(f"t={t}" if t != "clean" else t
                                                                             for t in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for lay in SWEEP_LAYERS:
        lines.append(f"| {lay} | " + " | ".join(fmt(sweep[lay, t]["bbox_per_point"]) for t in cols) + " |")
    t = res["timing"]
    lines += ["", f"Time: {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU (this process and its "
                  "commands); steps: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in t["steps"].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default="runs/correspondence")
    p.add_argument("--pairs", type=int, default=300, help="pairs in the world (80%% trn: the evaluation pairs)")
    p.add_argument("--gate-images", type=int, default=12, help="val images GATE ranks on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    w = Path(args.workdir)
    w.mkdir(parents=True, exist_ok=True)
    t0, steps = time.perf_counter(), {}
    prep = prepare(w, args)
    steps["data, GATE, extraction"] = time.perf_counter() - t0
    specs = rows(prep)
    t1 = time.perf_counter()
    evaluate_all(w, prep, specs, args)
    steps["eval-corr"] = time.perf_counter() - t1
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    timing = {"wall_s": time.perf_counter() - t0, "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage),
              "steps": steps}
    res = summarize(w, prep, specs, args, timing)
    (w / "results.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (w / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
