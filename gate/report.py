"""A GATE run's outputs: ranking table (CSV, JSON), per-image scores, bar chart, PCA pictures and an HTML report.

The HTML report is one self-contained file (pictures embedded as base64 PNG) that a person reads top-down:
the decision, the ranking with intervals (and the time each candidate took), the chart, then per image the
input beside every candidate's reconstruction and its difference |reconstruction − input|, the control
images of ControlNet candidates and the prompts of prompt candidates, then PCA pictures of the features (the
standard view of content shift) and, with a probe, each GATE score against probe quality (`probe.png`). `config.json`
holds the resolved config and library versions: `difffeat gate --config OUT/config.json` repeats the run.

The output folder is a run folder of the spine (`difffeat.spine.run.RunFolder`, kind "gate"), checked before any
work (`report_folder`): difffeat never writes into a folder it did not make, and an earlier report is
replaced only with ``overwrite`` — its own files only, never anything else in the folder.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from difffeat.report.page import CSP, CSS, data_uri
from difffeat.spine.run import RunFolder
from difffeat.utils.atomic import atomic_path, write_atomic
from gate.candidates import REFERENCE
from gate.score import HIGHER_IS_BETTER

LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "edge_f1": "edge F1 ↑", "lpips": "LPIPS ↓",
          "feature_score": "feature Score ↑"}
MEANING = {
    "psnr": "pixel fidelity of the reconstruction to the input: 10·log10(1/MSE)",
    "ssim": "structural similarity (local means, variances, covariance; 11×11 Gaussian window)",
    "edge_f1": "F1 of the reconstruction's canny edges against the input's, an edge matching within {tol} px",
    "lpips": "learned perceptual distance (AlexNet), lower is closer",
    "feature_score": "the paper's Eq. 2 on UNet features at t={t}: (diff_ref − diff)/diff_ref, diff the "
                     "Laplacian contour difference to t = 0 features; 0 = as much shift as reference",
}
COLORS = {"reference": "#8a8a8a", "accepted": "#2e8b57", "other": "#4a78b5"}
KIND = "gate"
OWNED = ("ranking.csv", "ranking.json", "per_image.csv", "scores.png", "pca.png", "probe.png", "report.html",
         "reconstructions", "reconstructions.json")
RECONSTRUCTIONS = "reconstructions"  # the folder of the reconstruction pictures; reconstructions.json lists them
DIFF_GAIN = 4  # |reconstruction − input| is shown ×4 (differences of a few percent are otherwise black)


def report_folder(out: str | os.PathLike, config, overwrite: bool = False) -> RunFolder:
    """The run folder a GATE report goes to, checked now (call it before ranking, so that a folder that
    cannot take the report costs no work): refused when difffeat did not make it, or when it holds an
    earlier report and `overwrite` is not set. `config` is the run's `GateConfig`."""
    return RunFolder(out, KIND, config, overwrite=overwrite, owned=OWNED, resumable=False)


def _png(array: np.ndarray, scale: int = 1) -> bytes:
    from PIL import Image

    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] → [H, W, 3] uint8."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def difference_map(recon: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """|reconstruction − input| averaged over colour channels, ×`DIFF_GAIN`, as a grey [H, W, 3] uint8 picture."""
    diff = (recon.float() - image.float()).abs().mean(0, keepdim=True).mul(DIFF_GAIN).expand(3, -1, -1)
    return _uint8(diff)


def probe_scatter(result, path: Path) -> Path:
    """One panel per GATE score: each candidate's score (x) against its probe quality (y), both with their
    bootstrap intervals, and Spearman ρ with its interval in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, names = result.probe, result.ranking()
    fig, axes = plt.subplots(1, len(result.metrics), figsize=(3.3 * len(result.metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], result.metrics):
        for n in names:
            iv, q = result.scores[n][m], p["quality"][n]
            qi = p.get("quality_interval", {}).get(n, [q, q])
            color = COLORS["reference"] if n == REFERENCE else COLORS["accepted"] if n in result.accepted \
                else COLORS["other"]
            ax.errorbar(iv.value, q, xerr=[[iv.value - iv.low], [iv.high - iv.value]], yerr=[[q - qi[0]], [qi[1] - q]],
                        fmt="o", color=color, ecolor="#999999", capsize=2, markersize=5)
            ax.annotate(n, (iv.value, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rho, ci = p["spearman"][m], p.get("spearman_interval", {}).get(m)
        extra = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci and ci[0] is not None else ""
        ax.set_title(f"{LABELS[m]}\nρ = {rho:+.2f}{extra}", fontsize=8)
        ax.set_xlabel(LABELS[m], fontsize=8)
        ax.set_ylabel(f"probe {p['metric']}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(path, what="probe scatter") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _fmt(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "psnr" else f"{value:.3f}"


def write_ranking(result, folder: RunFolder) -> None:
    """ranking.csv (`result.table()`: a row per candidate or configuration, best first) and ranking.json (the whole
    result): what GATE and the sweep both write."""
    rows = result.table()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(folder.file("ranking.csv"), buf.getvalue())
    folder.write_json("ranking.json", result.to_dict())


def write_tables(result, folder: RunFolder) -> None:
    """ranking.csv, ranking.json (`write_ranking`) and per_image.csv."""
    write_ranking(result, folder)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "candidate", *result.metrics])
    for name in result.ranking():
        per_image = result.evaluations[name].per_image
        for i, key in enumerate(result.keys):
            writer.writerow([key, name, *(f"{per_image[m][i]:.6g}" for m in result.metrics)])
    write_atomic(folder.file("per_image.csv"), buf.getvalue())


def bar_chart(result, path: Path) -> Path:
    """One panel per score: a bar per candidate (ranking order) with its bootstrap interval; the dashed line is
    `reference`; green bars are accepted candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result.ranking()
    metrics = [result.primary] + [m for m in result.metrics if m != result.primary]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 1.0 * len(names) * len(metrics) * 0.55, 3.4),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ivs = [result.scores[n][m] for n in names]
        values = np.array([iv.value for iv in ivs])
        err = np.array([[iv.value - iv.low for iv in ivs], [iv.high - iv.value for iv in ivs]])
        colors = [COLORS["reference"] if n == REFERENCE else COLORS["accepted"] if n in result.accepted
                  else COLORS["other"] for n in names]
        ax.bar(range(len(names)), values, yerr=err, color=colors, capsize=3, ecolor="#333333")
        ax.axhline(result.scores[REFERENCE][m].value, color="#555555", linestyle="--", linewidth=1)
        lo, hi = np.min([iv.low for iv in ivs]), np.max([iv.high for iv in ivs])
        pad = (hi - lo) * 0.15 or 0.05
        ax.set_ylim(lo - pad, hi + pad)  # differences are small against the scores' magnitude
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(LABELS[m] + (" (primary)" if m == result.primary else ""), fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"GATE on {len(result.keys)} images: mean and {result.config.level:.0%} bootstrap interval",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, what="bar chart") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def pca_grid(result, n_images: int = 4) -> tuple[list[str], list[list[np.ndarray]]]:
    """PCA pictures of the first layer's features: one shared PCA over the clean t = 0 features and every
    candidate's features at t, for the first `n_images` images (colours mean the same across the grid)."""
    from difffeat.report.viz import pca_rgb

    k = min(n_images, len(result.keys))
    rows = [("t = 0 (clean input)", result.reference_features[:k])]
    rows += [(name, result.evaluations[name].features[:k]) for name in result.ranking()]
    maps = [f.numpy() for _, batch in rows for f in batch]
    rgb = pca_rgb(maps)
    return [name for name, _ in rows], [rgb[i * k : (i + 1) * k] for i in range(len(rows))]


def reconstruction_pictures(result, count: int) -> list[dict]:
    """The first `count` images' pictures, made once for the run's files and for its page: per image its key and
    the input as PNG, and per candidate (best first) its reconstruction and |reconstruction − input| as PNG, its
    primary score, and whether that beats reference on the image ("up" / "down" / "")."""
    primary = result.primary
    better = HIGHER_IS_BETTER[primary]
    rows = []
    for i in range(min(count, len(result.keys))):
        ref_v = result.evaluations[REFERENCE].per_image[primary][i]
        cells = []
        for n in result.ranking():
            ev = result.evaluations[n]
            v = ev.per_image[primary][i]
            side = "" if n == REFERENCE or v == ref_v else "up" if (v > ref_v) == better else "down"
            cells.append({"candidate": n, "png": _png(_uint8(ev.recon[i])), "score": float(v), "side": side,
                          "difference": _png(difference_map(ev.recon[i], result.inputs[i]))})
        rows.append({"key": result.keys[i], "input": _png(_uint8(result.inputs[i])), "cells": cells})
    return rows


def write_reconstructions(result, folder: RunFolder, pictures: list[dict]) -> Path:
    """The `reconstruction_pictures` as files in RUN/reconstructions/, and ``reconstructions.json`` listing them per
    image with the primary score and whether it beats reference on that image: what `difffeat report` shows,
    without reading report.html. The list is written last: a run cut short has none."""
    folder.file(RECONSTRUCTIONS).mkdir(exist_ok=True)
    rows = []
    for i, row in enumerate(pictures):
        stem = f"{RECONSTRUCTIONS}/{i:03d}"
        write_atomic(folder.file(f"{stem}-input.png"), row["input"])
        cells = []
        for j, cell in enumerate(row["cells"]):
            write_atomic(folder.file(f"{stem}-c{j}.png"), cell["png"])
            write_atomic(folder.file(f"{stem}-c{j}-diff.png"), cell["difference"])
            cells.append({"candidate": cell["candidate"], "file": f"{stem}-c{j}.png",
                          "difference": f"{stem}-c{j}-diff.png", "score": cell["score"],
                          "versus_reference": cell["side"]})
        rows.append({"key": row["key"], "input": f"{stem}-input.png", "cells": cells})
    listing = folder.file("reconstructions.json")
    write_atomic(listing, json.dumps({"primary": result.primary, "difference_gain": DIFF_GAIN,
                                      "columns": result.ranking(), "images": rows}, indent=1))
    return listing


def write_report(result, out: str | os.PathLike | RunFolder, report_images: int = 8, pca_images: int = 4,
                 overwrite: bool = False) -> Path:
    """Write every output of a run into `out` (a folder, or the `report_folder` checked before the run);
    returns the HTML report's path. `config.json` (the run folder's marker) holds the config and versions."""
    folder = out if isinstance(out, RunFolder) else report_folder(out, result.config, overwrite=overwrite)
    folder.create()
    write_tables(result, folder)
    pictures = reconstruction_pictures(result, report_images)
    write_reconstructions(result, folder, pictures)
    chart = bar_chart(result, folder.file("scores.png"))
    labels, pcas = pca_grid(result, pca_images)
    scale = max(1, 96 // pcas[0][0].shape[0])
    with atomic_path(folder.file("pca.png"), what="PCA image") as tmp:
        gap = np.full((pcas[0][0].shape[0] * scale, scale, 3), 255, np.uint8)
        lines = [np.concatenate(sum(([m.repeat(scale, 0).repeat(scale, 1), gap] for m in row), [])[:-1], 1)
                 for row in pcas]
        rowgap = np.full((scale, lines[0].shape[1], 3), 255, np.uint8)
        tmp.write_bytes(_png(np.concatenate(sum(([line, rowgap] for line in lines), [])[:-1], 0)))
    scatter = probe_scatter(result, folder.file("probe.png")).read_bytes() if result.probe is not None else None
    page = _html(result, chart.read_bytes(), labels, pcas, pictures, scatter)
    write_atomic(folder.file("report.html"), page)
    return folder.file("report.html")


# ------------------------------------------------------------------------------------------------- HTML


def _html(result, chart_png: bytes, pca_labels: list[str], pcas: list[list[np.ndarray]], pictures: list[dict],
          scatter_png: bytes | None = None) -> str:
    cfg, esc, primary = result.config, html.escape, result.primary
    names = result.ranking()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='Content-Security-Policy' "
             f"content=\"{CSP}\"><title>GATE report</title><style>{CSS}</style>"
             "</head><body>"]
    parts.append("<h1>GATE: which techniques suppress content shift</h1>")
    parts.append(f"<div class='sub'>model <code>{esc(cfg.model)}</code> · {len(result.keys)} images from "
                 f"<code>{esc(str(cfg.images))}</code> · img2img strength {cfg.strength}, {cfg.steps} DDIM steps, "
                 f"seed {cfg.seed} · features at t = {cfg.t} · primary score <b>{esc(LABELS[primary])}</b></div>")
    # ---------------------------------------------------------------- verdict
    parts.append("<div class='verdict'>")
    for name in names:
        if name == REFERENCE:
            continue
        imp = result.improvement[name]
        cls, word = ("acc", "accepted") if name in result.accepted else \
            ("worse", "worse than reference") if imp.high < 0 else ("rej", "not accepted")
        parts.append(f"<span class='pill {cls}'><b>{esc(name)}</b> {word}: {imp.value:+.3g} "
                     f"[{imp.low:+.3g}, {imp.high:+.3g}]</span>")
    parts.append("</div>")
    if getattr(cfg, "correction", "none") == "holm":
        rule = (f"its mean improvement over <code>reference</code> (no technique) on {esc(LABELS[primary])} is "
                f"positive and its paired bootstrap test ({cfg.n_boot} resamples of the same images for both) holds "
                f"after Holm's correction across the {len(result.improvement)} candidates (adjusted p ≤ "
                f"{1 - cfg.level:.2g})")
    else:
        rule = (f"the {cfg.level:.0%} paired bootstrap interval of its mean improvement over <code>reference</code> "
                f"(no technique) on {esc(LABELS[primary])} lies above 0 ({cfg.n_boot} resamples of the same images "
                "for both)")
    draws = getattr(cfg, "replicates", 1)
    parts.append(f"<p class='note'>A candidate is accepted when {rule}. Pills show that improvement and its "
                 f"interval." + (f" Every image was reconstructed under {draws} noise draws; its scores are their "
                                 "mean." if draws > 1 else "") + "</p>")
    # ---------------------------------------------------------------- ranking table
    parts.append("<h2>Ranking</h2><div class='scroll'><table><tr><th>#</th><th class='l'>candidate</th>"
                 "<th class='l'>techniques</th>")
    parts += [f"<th>{esc(LABELS[m])}</th>" for m in result.metrics]
    parts.append("<th>gain over reference<br>on primary</th><th>p (adjusted)</th><th>accepted</th>"
                 "<th>seconds</th></tr>")
    for row in result.table():
        name = row["candidate"]
        cls = "ref" if name == REFERENCE else "acc" if row["accepted"] else ""
        parts.append(f"<tr class='{cls}'><td>{row['rank']}</td><td class='l'><b>{esc(name)}</b></td>"
                     f"<td class='l tech'><code>{esc(row['techniques'])}</code></td>")
        for m in result.metrics:
            iv = result.scores[name][m]
            ci = f"[{_fmt(iv.low, m)}, {_fmt(iv.high, m)}]"
            parts.append(f"<td>{_fmt(iv.value, m)}<br><span class='ci'>{ci}</span></td>")
        seconds = f"<td>{result.evaluations[name].seconds:.1f}</td>" if name in result.evaluations else "<td></td>"
        if name == REFERENCE:
            parts.append(f"<td>—</td><td>—</td><td>anchor</td>{seconds}</tr>")
        else:
            imp, test = result.improvement[name], result.tests.get(name)
            p_text = f"{test['p']:.3g}<br><span class='ci'>({test['p_adjusted']:.3g})</span>" if test else "—"
            parts.append(f"<td>{imp.value:+.3g}<br><span class='ci'>[{imp.low:+.3g}, {imp.high:+.3g}]</span></td>"
                         f"<td>{p_text}</td><td>{'✔' if row['accepted'] else '✘'}</td>{seconds}</tr>")
    parts.append("</table></div>")
    parts.append(f"<img alt='scores with intervals' src='{data_uri(chart_png)}' style='max-width:100%'>")
    parts.append("<p class='note'>Bars: mean over images with its bootstrap interval; green = accepted (on the primary "
                 "score), grey = reference (also the dashed line), blue = not accepted.</p>")
    parts.append("<ul class='note'>" + "".join(
        f"<li><b>{esc(LABELS[m])}</b>: {esc(MEANING[m].format(tol=cfg.edge_tolerance, t=cfg.t))}</li>"
        for m in result.metrics) + "".join(f"<li><b>{esc(m)}</b> skipped: {esc(why)}</li>"
                                           for m, why in result.skipped_metrics.items()) + "</ul>")
    # ---------------------------------------------------------------- per image
    k = len(pictures)
    parts.append(f"<h2>Reconstructions</h2><p class='note'>The first {k} of {len(result.keys)} images: the input, then "
                 f"each candidate's img2img reconstruction (best first). Under each: {esc(LABELS[primary])}; green "
                 "when better than reference on that image, red when worse. Below each row: |reconstruction − input| "
                 f"(mean over colours, ×{DIFF_GAIN}; darker is closer).</p><div class='scroll'><table class='grid'>"
                 "<tr><th>input</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
    for row in pictures:
        cells = [f"<td><img alt='input' src='{data_uri(row['input'])}'>{esc(row['key'][-18:])}</td>"]
        cells += [f"<td><img alt='{esc(c['candidate'])}' src='{data_uri(c['png'])}'>"
                  f"<span class='{c['side']}'>{_fmt(c['score'], primary)}</span></td>" for c in row["cells"]]
        parts.append("<tr>" + "".join(cells) + "</tr>")
        diffs = [f"<td><img alt='difference {esc(c['candidate'])}' src='{data_uri(c['difference'])}'></td>"
                 for c in row["cells"]]
        parts.append("<tr><td class='note'>|recon − input|</td>" + "".join(diffs) + "</tr>")
    parts.append("</table></div>")
    controlled = [n for n in names if result.evaluations[n].control is not None]
    if controlled:
        parts.append("<h2>Control images</h2><p class='note'>What each ControlNet candidate conditioned on (its first "
                     "ControlNet's control images).</p><div class='scroll'><table class='grid'><tr><th></th>" +
                     "".join(f"<th>{esc(key[-18:])}</th>" for key in result.keys[:k]) + "</tr>")
        for n in controlled:
            control = result.evaluations[n].control
            cells = "".join(f"<td><img alt='control' src='{data_uri(_png(_uint8(control[i])))}'></td>"
                            for i in range(k))
            parts.append(f"<tr><th style='text-align:right;padding-right:8px'>{esc(n)}</th>{cells}</tr>")
        parts.append("</table></div>")
    prompted = result.prompt_candidates()
    if prompted:
        parts.append("<h2>Prompts</h2><p class='note'>The prompt each prompt candidate actually used, for the first "
                     f"{k} images.</p><div class='scroll'><table><tr><th class='l'>image</th>" +
                     "".join(f"<th class='l'>{esc(n)}</th>" for n in prompted) + "</tr>")
        for i in range(k):
            parts.append(f"<tr><td class='l'>{esc(result.keys[i][-18:])}</td>" + "".join(
                f"<td class='l tech'>{esc(result.evaluations[n].prompts[i])}</td>" for n in prompted) + "</tr>")
        parts.append("</table></div>")
    # ---------------------------------------------------------------- PCA
    layer = next(iter(result.evaluations[REFERENCE].diffs))
    parts.append(f"<h2>Features</h2><p class='note'>PCA of <code>{esc(layer)}</code> features (one PCA for the whole "
                 f"grid, so colours compare): the clean input at t = 0 on top, then each candidate at t = {cfg.t}. "
                 "Rows that look like the top row have less content shift.</p><div class='scroll'><table class='grid'>")
    heads = "".join(f"<th>{esc(key[-18:])}</th>" for key in result.keys[: len(pcas[0])])
    parts.append(f"<tr><th></th>{heads}</tr>")
    for label, row in zip(pca_labels, pcas):
        parts.append(f"<tr><th style='text-align:right;padding-right:8px'>{esc(label)}</th>" + "".join(
            f"<td><img alt='pca' src='{data_uri(_png(m))}'></td>" for m in row) + "</tr>")
    parts.append("</table></div>")
    # ---------------------------------------------------------------- greedy, probe, dropped
    if result.greedy is not None:
        g = result.greedy
        parts.append("<h2>Greedy combination</h2>")
        if g["selected"]:
            parts.append(f"<p>Forward selection on {esc(LABELS[primary])} kept <b>{esc(' + '.join(g['selected']))}"
                         f"</b>: <code>{esc(' + '.join(g['specs']))}</code>.</p>")
        parts.append("<table><tr><th class='l'>combination</th><th>primary</th><th>gain over previous</th>"
                     "<th>kept</th></tr>")
        for s in g["steps"]:
            pv, gain = s.get(primary), s.get("improvement")
            gain_text = f"{gain['value']:+.3g} [{gain['low']:+.3g}, {gain['high']:+.3g}]" if gain else "—"
            parts.append(f"<tr><td class='l'>{esc(' + '.join(s['members']))}</td>"
                         f"<td>{_fmt(pv['value'], primary) if pv else esc(s.get('refused', ''))}</td>"
                         f"<td>{gain_text}</td><td>{'✔' if s['kept'] else '✘'}</td></tr>")
        parts.append("</table>")
    if result.probe is not None:
        p = result.probe
        parts.append(f"<h2>Probe: does the ranking predict downstream quality?</h2><p class='note'>A ridge linear "
                     f"probe on features at t = {cfg.t} ({esc(p['task'])}: {esc(p['metric'])}), fitted on "
                     f"{p['train']} and scored on {p['test']} labelled images of <code>{esc(str(p['labels']))}</code>."
                     "</p><table><tr><th class='l'>candidate</th><th>" + esc(p["metric"]) + "</th>" + "".join(
                         f"<th>{esc(LABELS[m])}</th>" for m in result.metrics) + "</tr>")
        for n in names:
            parts.append(f"<tr><td class='l'>{esc(n)}</td><td>{p['quality'][n]:.3f}"
                         f"{_interval_text(p.get('quality_interval', {}).get(n))}</td>" + "".join(
                f"<td>{_fmt(result.scores[n][m].value, m)}</td>" for m in result.metrics) + "</tr>")
        parts.append("<tr><td class='l'><b>Spearman ρ</b></td><td></td>" + "".join(
            f"<td><b>{p['spearman'][m]:+.2f}</b>" + _interval_text(p.get("spearman_interval", {}).get(m)) + "</td>"
            for m in result.metrics) + "</tr></table>")
        parts.append(f"<p class='note'>ρ over {len(p['quality'])} candidates, with its {cfg.level:.0%} bootstrap "
                     "interval (GATE images and scored probe images resampled together): with so few candidates, only "
                     "|ρ| near 1 means much.</p>")
        if scatter_png is not None:
            parts.append(f"<img alt='GATE scores against probe quality' src='{data_uri(scatter_png)}' "
                         "style='max-width:100%'>")
    if result.dropped:
        items = "".join(f"<li><code>{esc(d['key'])}</code>: {esc(d['reason'])}</li>" for d in result.dropped)
        parts.append(f"<h2>Dropped images ({len(result.dropped)})</h2><p class='note'>Left out of every candidate so "
                     f"that all comparisons stay paired.</p><ul>{items}</ul>")
    parts.append("<p class='note'>Resolved config and library versions: <code>config.json</code>; tables: "
                 "<code>ranking.csv</code>, <code>ranking.json</code>, <code>per_image.csv</code>.</p></body></html>")
    return "\n".join(parts)


def _interval_text(interval) -> str:
    if not interval or interval[0] is None:
        return ""
    return f"<br><span class='ci'>[{interval[0]:.3g}, {interval[1]:.3g}]</span>"
