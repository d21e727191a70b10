"""A GATE run in the report: the verdict pills, the ranking with intervals, the score chart, the
reconstructions and the PCA pictures, as `difffeat gate` shows them in its own report.

Read from the run folder: ``ranking.json`` (the whole result), ``scores.png``, ``pca.png``, and the
reconstructions: the pictures ``reconstructions.json`` lists (every name confined to the folder, every picture
checked as a PNG), or a ``reconstructions.png`` when the run has one. GATE's own ``report.html`` is never read.
"""

from __future__ import annotations

from pathlib import Path

from difffeat.errors import UserError
from difffeat.report.kinds import SectionKind
from difffeat.report.page import (
    Section,
    esc,
    img_file,
    note,
    num,
    read_json,
    read_json_or,
    table,
)
from difffeat.spine.run import RUN_FORMAT, confine

REFERENCE = "reference"
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "edge_f1": "edge F1 ↑", "lpips": "LPIPS ↓",
          "feature_score": "feature Score ↑"}
MAX_RECON_ROWS = 8


def is_gate_run(path: Path) -> bool:
    return (path / "ranking.json").is_file()


def _fmt(value, metric: str) -> str:
    return num(value, 4) if metric == "psnr" else num(value, 3)


def reconstructions(path: Path) -> str:
    """The reconstructions grid of a GATE run: the picture files its ``reconstructions.json`` lists (see
    `gate.report.write_reconstructions`), or a ``reconstructions.png`` when the run has one."""
    if (path / "reconstructions.png").is_file():
        return img_file(path / "reconstructions.png", "reconstructions")
    listing = read_json_or(path / "reconstructions.json", None)
    if listing is None:
        return note("No reconstructions: this run keeps none as files (GATE runs of difffeat before 0.1 show them "
                    "only in their own report.html).")
    if not isinstance(listing, dict) or not isinstance(listing.get("images"), list):
        raise UserError(f"{path / 'reconstructions.json'}: not a list of reconstructions (no 'images' list)")
    primary = listing.get("primary", "psnr")

    def picture(name, alt: str) -> str:  # every name read from the file stays inside the run folder
        return img_file(confine(path, str(name), "reconstruction picture"), alt, cls="pix")

    head = "<th>input</th>" + "".join(f"<th>{esc(c)}</th>" for c in listing.get("columns") or [])
    body = []
    for row in listing["images"][:MAX_RECON_ROWS]:
        cells = [f"<td>{picture(row['input'], 'input')}<span>{esc(str(row.get('key', ''))[-18:])}</span></td>"]
        diffs = ["<td class='note'>|recon − input|</td>"]
        for cell in row.get("cells") or []:
            side = cell.get("versus_reference") if cell.get("versus_reference") in ("up", "down") else ""
            cells.append(f"<td>{picture(cell['file'], str(cell.get('candidate', '')))}"
                         f"<span class='{side}'>{_fmt(cell.get('score'), primary)}</span></td>")
            diffs.append(f"<td>{picture(cell['difference'], 'difference')}</td>")
        body.append("<tr>" + "".join(cells) + "</tr><tr>" + "".join(diffs) + "</tr>")
    return f"<div class='scroll'><table class='grid'><tr>{head}</tr>{''.join(body)}</table></div>"


def render_gate(path: Path, anchor: str, shown_as: str) -> Section:
    """The section of one GATE run folder."""
    result = read_json(path / "ranking.json")
    if not isinstance(result, dict) or not isinstance(result.get("ranking"), list):
        raise UserError(f"{path / 'ranking.json'}: not a GATE ranking (no 'ranking' list)")
    cfg = result.get("config") or (read_json_or(path / "config.json", {}) or {}).get("config") or {}
    primary = result.get("primary", cfg.get("primary", "psnr"))
    metrics = list(result.get("higher_is_better") or [m for m in LABELS if m in result["ranking"][0]])
    rows = result["ranking"]
    parts = [f"<p class='sub'>model <code>{esc(cfg.get('model', '?'))}</code> · {esc(result.get('images', '?'))} "
             f"images from <code>{esc(cfg.get('images', '?'))}</code> · img2img strength "
             f"{esc(cfg.get('strength', '?'))}, "
             f"{esc(cfg.get('steps', '?'))} DDIM steps, seed {esc(cfg.get('seed', '?'))} · features at "
             f"t = {esc(cfg.get('t', '?'))} · primary score <b>{esc(LABELS.get(primary, primary))}</b></p>"]
    pills = []
    for row in rows:
        name = row.get("candidate", "?")
        if name == REFERENCE:
            continue
        low, high, value = row.get("improvement_low"), row.get("improvement_high"), row.get("improvement")
        worse = isinstance(high, (int, float)) and high < 0
        cls, word = ("acc", "accepted") if row.get("accepted") else \
            ("worse", "worse than reference") if worse else ("rej", "not accepted")
        pills.append(f"<span class='pill {cls}'><b>{esc(name)}</b> {word}: {num(value)} "
                     f"[{num(low)}, {num(high)}]</span>")
    parts.append("<div class='verdict'>" + "".join(pills) + "</div>")
    parts.append(note(result.get("decision") or "accepted when the paired bootstrap interval of the improvement "
                                                 "over reference lies above 0"))
    header = ["#", "candidate", "techniques", *[esc(LABELS.get(m, m)) for m in metrics], "gain on primary", "accepted"]
    body, classes = [], []
    for row in rows:
        name = row.get("candidate", "?")
        cells = [esc(row.get("rank", "")), f"<b>{esc(name)}</b>", f"<code>{esc(row.get('techniques', ''))}</code>"]
        for m in metrics:
            cells.append(f"{_fmt(row.get(m), m)}<br><span class='ci'>[{_fmt(row.get(m + '_low'), m)}, "
                         f"{_fmt(row.get(m + '_high'), m)}]</span>")
        if name == REFERENCE:
            cells += ["—", "anchor"]
        else:
            cells += [f"{num(row.get('improvement'))}<br><span class='ci'>[{num(row.get('improvement_low'))}, "
                      f"{num(row.get('improvement_high'))}]</span>", "✔" if row.get("accepted") else "✘"]
        body.append(cells)
        classes.append("ref" if name == REFERENCE else "acc" if row.get("accepted") else "")
    parts.append(table(header, body, left=3, row_classes=classes))
    if (path / "scores.png").is_file():
        parts.append(img_file(path / "scores.png", "GATE scores with intervals"))
    greedy = result.get("greedy")
    if isinstance(greedy, dict) and greedy.get("selected"):
        parts.append(f"<p>Greedy forward selection kept <b>{esc(' + '.join(map(str, greedy['selected'])))}</b>: "
                     f"<code>{esc(' + '.join(map(str, greedy.get('specs') or [])))}</code> — what "
                     "<code>gate --emit</code> hands to <code>extract --variants</code>.</p>")
    parts.append("<h3>Reconstructions</h3>" + note("The input, then each candidate's img2img reconstruction (best "
                                                   "first) with its primary score; green = better than reference "
                                                   "on that image."))
    parts.append(reconstructions(path))
    if (path / "pca.png").is_file():
        order = ", ".join(["t = 0 (clean input)"] + [str(r.get("candidate", "?")) for r in rows])
        parts.append("<h3>Features</h3>" + note(f"PCA of the first layer's features at t = {cfg.get('t', '?')}, one "
                                                f"basis for the whole grid; rows from the top: {order}; one column per "
                                                "image. Rows that look like the top row have less content shift."))
        parts.append(img_file(path / "pca.png", "PCA of GATE features", cls="fig pix"))
    dropped = result.get("dropped") or []
    if dropped:
        parts.append(note(f"{len(dropped)} image(s) dropped: " + "; ".join(
            f"{d.get('key', '?')}: {d.get('reason', '?')}" for d in dropped[:5] if isinstance(d, dict))))
    accepted = [r.get("candidate") for r in rows if r.get("accepted")]
    overview = (f"{len(rows) - 1} candidates on {result.get('images', '?')} images; accepted: "
                f"{', '.join(map(str, accepted)) or 'none'}")
    return Section("gate", f"GATE · {shown_as}", anchor, "\n".join(parts), overview)


def _is_gate_folder(path: Path, marker: dict | None) -> bool:
    if marker is not None and marker.get("format") == RUN_FORMAT:
        return marker.get("kind") == "gate"
    return is_gate_run(path)  # a run written before folders carried a marker


GATE_SECTION = SectionKind(
    "gate", "GATE", _is_gate_folder,
    lambda path, marker, anchor, shown, n_images: render_gate(path, anchor, shown),
    detect_rank=30, page_rank=10,
    chain_step="GATE ranked the candidate techniques by how closely img2img with each stays to the input")
