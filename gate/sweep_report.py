"""A sweep's outputs: ranked table (CSV, JSON), a layer × timestep heat map per variant (PNG), an HTML page in
the style of the GATE report, the winner as a `difffeat extract` config (`best.json`) and the top-k technique
variants as a variants file (`variants.yaml`, what `difffeat extract --variants` reads).

Heat-map cells show the probe score and, under it, ± half the width of its bootstrap interval; a configuration
dropped by successive halving shows the score of the rung it reached (scored on fewer images), marked "rN".
"""

from __future__ import annotations

import html
import json

import numpy as np

from difffeat.report.page import CSP, CSS, data_uri
from difffeat.utils.atomic import atomic_path, write_atomic
from gate.report import write_ranking

LABEL = {"miou": "mIoU ↑", "accuracy": "accuracy ↑"}


def heat_map(result, variant: str, path) -> None:
    """Layer × timestep grid of one variant's scores, one panel per noise mode; text: score, ± half-width of the
    interval, and the rung for configurations dropped before the last one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.table() if r["variant"] == variant]
    metric = result.metric
    layers = list(dict.fromkeys(c.layer for c in result.plan if c.variant == variant))
    ts = sorted({c.t for c in result.plan if c.variant == variant})
    modes = list(dict.fromkeys(c.noise for c in result.plan if c.variant == variant))
    final = len(result.rungs)
    values = [r[metric] for r in result.table()]
    vmin, vmax = min(values), max(values)
    fig, axes = plt.subplots(1, len(modes), figsize=(1.4 + 1.05 * len(ts) * len(modes), 1.2 + 0.55 * len(layers)),
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = np.full((len(layers), len(ts)), np.nan)
        for r in rows:
            if r["noise"] == mode:
                grid[layers.index(r["layer"]), ts.index(r["t"])] = r[metric]
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for r in rows:
            if r["noise"] != mode:
                continue
            i, j = layers.index(r["layer"]), ts.index(r["t"])
            dropped = r["rung"] < final
            text = f"{r[metric]:.3f}\n±{r['width'] / 2:.3f}" + (f"\nr{r['rung']}" if dropped else "")
            shade = (r[metric] - vmin) / ((vmax - vmin) or 1)
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if shade > 0.6 else "white",
                    style="italic" if dropped else "normal", weight="bold" if r["rank"] == 1 else "normal")
        ax.set_xticks(range(len(ts)), [f"t={t}" for t in ts], fontsize=8)
        ax.set_yticks(range(len(layers)), [f"{name} ({result.shapes[name][1]}×{result.shapes[name][2]})"
                                           for name in layers], fontsize=8)
        ax.set_title(mode, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=LABEL.get(metric, metric))
    fig.suptitle(f"variant {variant}: probe {LABEL.get(metric, metric)} (± half the {result.config.level:.0%} "
                 "interval; rN: dropped at rung N)", fontsize=9, y=1.0 + 0.15 / (1.2 + 0.55 * len(layers)))
    with atomic_path(path, what="heat map") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def write_outputs(result, run) -> None:
    """Every output of a finished sweep into its run folder (`difffeat.spine.run.RunFolder`)."""
    from pipelines.variants import write_variants_file

    write_ranking(result, run)
    pictures = {}
    for variant in dict.fromkeys(c.variant for c in result.plan):
        path = run.file(f"heatmap-{variant}.png")
        heat_map(result, variant, path)
        pictures[variant] = path.read_bytes()
    run.write_json("best.json", result.extract_config())
    top = result.table()[: result.config.top_k]
    write_variants_file(run.file("variants.yaml"), result.top_variants(),
                        comment=f"difffeat sweep {result.config.images}: technique variants of the top "
                                f"{len(top)} configurations ({', '.join(r['config'] for r in top)}); their layers "
                                f"and timesteps are in ranking.csv, the winner's in best.json")
    write_atomic(run.file("report.html"), page(result, pictures))


def page(result, pictures: dict[str, bytes]) -> str:
    """The self-contained HTML report (heat maps embedded)."""
    cfg, esc, metric = result.config, html.escape, result.metric
    best = result.best()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
             f"content=\"{CSP}\"><title>sweep report</title><style>{CSS}</style>"
             "</head><body><h1>Sweep: which layer, timestep and technique</h1>"]
    parts.append(f"<div class='sub'>model <code>{esc(cfg.model)}</code> · {len(result.keys)} labelled images from "
                 f"<code>{esc(cfg.images)}</code> · labels <code>{esc(cfg.labels)}</code> ({esc(result.task)}, "
                 f"{esc(LABEL.get(metric, metric))}) · {esc(cfg.probe)} probe on features reduced to ≤ {cfg.width} "
                 f"channels ({esc(cfg.reduce)}) · seed {cfg.seed}</div>")
    parts.append(f"<div class='verdict'><span class='pill acc'><b>{esc(best['config'])}</b> {metric} "
                 f"{best[metric]:.3f} [{best['low']:.3f}, {best['high']:.3f}]</span>")
    if result.greedy:
        parts.append(f"<span class='pill acc'>greedy layer set: <b>{esc(' + '.join(result.greedy['selected']))}"
                     f"</b> {result.greedy['score']['value']:.3f}</span>")
    parts.append("</div>")
    out = cfg.out or "OUT"
    best_cfg = result.extract_config()
    parts.append(f"<p>The winner as an extraction config: <code>difffeat extract --config {esc(out)}/best.json --out "
                 f"FEATURES</code> (give IMAGES to run it on other images): layers <code>"
                 f"{esc(', '.join(best_cfg['layers']))}</code>, t = {best_cfg['timesteps'][0]}, techniques <code>"
                 f"{esc(' + '.join(best_cfg['techniques']) or 'none')}</code>, "
                 f"{'noise × ' + str(best_cfg['ensemble']) if best_cfg['noise'] else 'clean'}.</p>"
                 f"<details><summary class='note'>best.json</summary><pre class='note'>"
                 f"{esc(json.dumps(best_cfg, indent=1))}</pre></details>")
    # ---------------------------------------------------------------- halving
    parts.append("<h2>Successive halving</h2><table><tr><th>rung</th><th>images</th><th>fit / scored</th>"
                 "<th>configurations</th><th>kept</th><th>dropped</th></tr>")
    for r in result.rungs:
        parts.append(f"<tr><td>{r['rung'] + 1}</td><td>{r['images']}</td><td>{(r['images'] + 1) // 2} / "
                     f"{r['images'] // 2}</td><td>{r['configurations']}</td><td>{len(r['kept'])}</td>"
                     f"<td>{r['dropped']}</td></tr>")
    parts.append(f"</table><p class='note'>Every configuration is scored on the first rung's images (a seeded "
                 f"shuffle of the labelled set); the top {cfg.keep:.0%} (at least {cfg.top_k}) go on to twice the "
                 "images. A configuration dropped at a rung keeps that rung's score, on fewer images.</p>")
    # ---------------------------------------------------------------- heat maps
    parts.append("<h2>Layer × timestep</h2>")
    for variant, png in pictures.items():
        specs = " + ".join(cfg.variants[variant]) or "no technique"
        parts.append(f"<p><b>{esc(variant)}</b> <code>{esc(specs)}</code></p><img alt='heat map {esc(variant)}' "
                     f"src='{data_uri(png)}' style='max-width:100%'>")
    # ---------------------------------------------------------------- ranking
    rows = result.table()
    shown = rows[:40]
    parts.append(f"<h2>Ranking</h2><p class='note'>{len(shown)} of {len(rows)} configurations (all in "
                 "<code>ranking.csv</code>). Score: the probe's " + esc(metric) + " on the scored images, with its "
                 f"{cfg.level:.0%} bootstrap interval over them.</p><div class='scroll'><table><tr><th>#</th>"
                 "<th class='l'>variant</th><th class='l'>techniques</th><th>noise</th><th>t</th>"
                 "<th class='l'>layer</th><th>grid</th><th>" + esc(LABEL.get(metric, metric)) +
                 "</th><th>images</th><th class='l'>status</th></tr>")
    for r in shown:
        cls = "acc" if r["rank"] == 1 else ""
        parts.append(f"<tr class='{cls}'><td>{r['rank']}</td><td class='l'>{esc(r['variant'])}</td>"
                     f"<td class='l tech'><code>{esc(r['techniques'])}</code></td><td>{esc(r['noise'])}</td>"
                     f"<td>{r['t']}</td><td class='l'><code>{esc(r['layer'])}</code></td><td>{esc(r['grid'])}</td>"
                     f"<td>{r[metric]:.3f}<br><span class='ci'>[{r['low']:.3f}, {r['high']:.3f}]</span></td>"
                     f"<td>{r['images']}</td><td class='l'>{esc(r['status'])}</td></tr>")
    parts.append("</table></div>")
    # ---------------------------------------------------------------- greedy, skipped, dropped
    if result.greedy:
        g = result.greedy
        parts.append("<h2>Greedy layer set</h2><p class='note'>From the winner, the layer (same variant, noise mode "
                     "and t) whose concatenation gains most is added while the paired bootstrap interval of the "
                     "gain lies above 0; layers of a coarser grid are upsampled to the finest one.</p><table><tr>"
                     f"<th class='l'>layers</th><th>{esc(metric)}</th><th>gain</th><th>kept</th></tr>")
        for s in g["steps"]:
            gain = s["gain"]
            gain_text = f"{gain['value']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]" if gain else "—"
            parts.append(f"<tr><td class='l'>{esc(' + '.join(s['layers']))}</td><td>{s['score']['value']:.3f}</td>"
                         f"<td>{gain_text}</td><td>{'✔' if s['kept'] else '✘'}</td></tr>")
        parts.append("</table>")
    if result.skipped:
        items = "".join(f"<li><code>{esc(s['group'])}</code>: {esc(s['reason'])}</li>" for s in result.skipped)
        parts.append(f"<h2>Skipped</h2><ul>{items}</ul>")
    if result.dropped:
        items = "".join(f"<li><code>{esc(d['key'])}</code>: {esc(d['reason'])}</li>" for d in result.dropped)
        parts.append(f"<h2>Dropped images ({len(result.dropped)})</h2><ul>{items}</ul>")
    total = sum(result.estimate.values())
    parts.append(f"<p class='note'>Memory estimate {total / 2**20:.0f} MB; time {result.timings.get('total', 0):.1f} s "
                 f"(extraction {result.timings.get('extract', 0):.1f} s, probes {result.timings.get('probe', 0):.1f} s)"
                 f". Resolved config and library versions: <code>config.json</code>; tables: <code>ranking.csv</code>, "
                 "<code>ranking.json</code>; top variants: <code>variants.yaml</code>.</p></body></html>")
    return "\n".join(parts)
