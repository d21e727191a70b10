"""A sweep run (`difffeat sweep`) in the report: the winning configuration with its interval, the ranking's top rows
(variant, noise mode, timestep, layer, probe score, how far successive halving let it go), the heat maps, and the
winner's extraction config.

Read from the run folder: ``config.json`` (its marker, kind "sweep"), ``ranking.json`` (the result), ``best.json`` and
``heatmap-*.png``. A sweep stopped before its end has no ranking yet: the section says so and how to go on.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.report.kinds import SectionKind
from difffeat.report.page import Section, esc, img_file, note, num, read_json, read_json_or, table
from difffeat.spine.run import RUN_FORMAT

LABELS = {"miou": "mIoU ↑", "accuracy": "accuracy ↑"}
MAX_ROWS = 12


def is_sweep_run(saved: dict | None) -> bool:
    return bool(saved) and saved.get("kind") == "sweep"


def render_sweep(path: Path, saved: dict, anchor: str, shown_as: str) -> Section:
    """The section of one sweep run folder."""
    cfg = saved.get("config") or {}
    parts = [f"<p class='sub'>model <code>{esc(cfg.get('model', '?'))}</code> · images "
             f"<code>{esc(cfg.get('images', '?'))}</code> · labels <code>{esc(cfg.get('labels', '?'))}</code> · "
             f"{esc(cfg.get('probe', '?'))} probe · seed {esc(cfg.get('seed', '?'))}</p>"]
    if not (path / "ranking.json").is_file():
        parts.append(note(f"Unfinished: no ranking yet (the sweep was interrupted or stopped with --stop-after); "
                          f"continue it with difffeat sweep … --out {shown_as} --resume.", "warn"))
        return Section("sweep", f"Sweep · {shown_as}", anchor, "\n".join(parts), "unfinished: no ranking yet")
    result = read_json(path / "ranking.json")
    rows = result.get("ranking") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path / 'ranking.json'}: not a sweep ranking (no 'ranking' rows)")
    metric = result.get("metric") or "score"
    label = LABELS.get(metric, metric)
    best = rows[0]
    parts.append(f"<div class='verdict'><span class='pill acc'>best <b>{esc(best.get('config', '?'))}</b> {esc(label)} "
                 f"{num(best.get(metric))} [{num(best.get('low'))}, {num(best.get('high'))}]</span></div>")
    parts.append(note(f"{len(rows)} configuration(s) (variant × noise mode × timestep × layer) scored by a "
                      f"{result.get('probe', cfg.get('probe', '?'))} probe on {result.get('images', '?')} labelled "
                      f"images ({result.get('task', '?')}); successive halving drops the weaker ones at each rung. "
                      "Intervals are bootstrap intervals over the scored images."))
    header = ["#", "configuration", "techniques", "noise", "t", "layer", "grid", f"{esc(label)}", "reached"]
    body = [[esc(r.get("rank", "")), f"<b>{esc(r.get('config', '?'))}</b>",
             f"<code>{esc(r.get('techniques', ''))}</code>", esc(r.get("noise", "")), esc(r.get("t", "")),
             f"<code>{esc(r.get('layer', ''))}</code>", esc(r.get("grid", "")),
             f"{num(r.get(metric))}<br><span class='ci'>[{num(r.get('low'))}, {num(r.get('high'))}]</span>",
             esc(r.get("status", ""))] for r in rows[:MAX_ROWS]]
    parts.append(table(header, body, left=3, row_classes=["best"] + [""] * (len(body) - 1)))
    if len(rows) > MAX_ROWS:
        parts.append(note(f"… and {len(rows) - MAX_ROWS} more rows in ranking.csv."))
    greedy = result.get("greedy")
    if isinstance(greedy, dict) and greedy.get("selected"):
        parts.append(f"<p>Greedy layer set: <b>{esc(' + '.join(map(str, greedy['selected'])))}</b>.</p>")
    if isinstance(read_json_or(path / "best.json"), dict):
        parts.append(f"<p>The winner as an extraction config: <code>difffeat extract --config "
                     f"{esc(shown_as)}/best.json --out DIR</code>.</p>")
    for picture in sorted(path.glob("heatmap-*.png")):
        variant = picture.stem.removeprefix("heatmap-")
        parts.append(f"<h3>Variant {esc(variant)}</h3>" + img_file(picture, f"sweep heat map, variant {variant}"))
    overview = f"best of {len(rows)} configuration(s): {best.get('config', '?')} ({metric} {num(best.get(metric))})"
    return Section("sweep", f"Sweep · {shown_as}", anchor, "\n".join(parts), overview)


def _is_sweep_folder(path: Path, marker: dict | None) -> bool:
    return marker is not None and marker.get("format") == RUN_FORMAT and is_sweep_run(marker)


SWEEP_SECTION = SectionKind(
    "sweep", "sweep", _is_sweep_folder,
    lambda path, marker, anchor, shown, n_images: render_sweep(path, marker or {}, anchor, shown),
    detect_rank=20, page_rank=20,  # a sweep writes a ranking.json too: it is asked before GATE
    chain_step="a sweep probed which layer, timestep and technique variant give the best features")
