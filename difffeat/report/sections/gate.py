"""A GATE run in the report: the verdict pills, the ranking with intervals, the score chart, the
reconstructions and the PCA pictures, as `difffeat gate` shows them in its own report.

Read from the run folder: ``ranking.json`` (the whole result), ``scores.png``, ``pca.png``, and the
reconstructions, which GATE keeps only inside its ``report.html``: they are taken from that page's
"Reconstructions" table (every picture decoded again, every text escaped again), or from a
``reconstructions.png`` when the run has one.
"""

from __future__ import annotations

import base64
import binascii
from html.parser import HTMLParser
from pathlib import Path

from difffeat.errors import UserError
from difffeat.report.sections.page import (
    Section,
    esc,
    img,
    img_file,
    note,
    num,
    png_bytes,
    read_json,
    read_json_or,
    table,
)

REFERENCE = "reference"
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "edge_f1": "edge F1 ↑", "lpips": "LPIPS ↓",
          "feature_score": "feature Score ↑"}
MAX_RECON_ROWS = 8


def is_gate_run(path: Path) -> bool:
    return (path / "ranking.json").is_file()


def _fmt(value, metric: str) -> str:
    return num(value, 4) if metric == "psnr" else num(value, 3)


class _ReconTable(HTMLParser):
    """The cells of the first table after GATE's ``<h2>Reconstructions</h2>``: header texts, and per row the
    cells' (picture data, text)."""

    def __init__(self):
        super().__init__()
        self.state = "before"  # before → heading → table → done
        self.header: list[str] = []
        self.rows: list[list[tuple[bytes | None, str, str]]] = []
        self._cell: list | None = None
        self._tag = ""
        self._heading = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            if self.state == "table":
                self.state = "done"
            self._heading = ""
            self._tag = "h2"
        elif self.state == "heading" and tag == "table":
            self.state = "table"
        elif self.state == "table":
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self._cell = [None, "", ""]
                self._tag = tag
            elif tag == "img" and self._cell is not None:
                self._cell[0] = _decode(attrs.get("src") or "")
            elif tag == "span" and self._cell is not None and attrs.get("class") in ("up", "down"):
                self._cell[2] = attrs["class"]  # better / worse than reference on this image

    def handle_endtag(self, tag):
        if tag == "h2" and self._tag == "h2":
            if self.state == "before" and self._heading.strip().lower().startswith("reconstruction"):
                self.state = "heading"
            self._tag = ""
        elif self.state == "table" and tag in ("td", "th") and self._cell is not None:
            if tag == "th":
                self.header.append(self._cell[1].strip())
            elif self.rows:
                self.rows[-1].append((self._cell[0], self._cell[1].strip(), self._cell[2]))
            self._cell = None
        elif self.state == "table" and tag == "table":
            self.state = "done"

    def handle_data(self, data):
        if self._tag == "h2":
            self._heading += data
        if self._cell is not None:
            self._cell[1] += data


def _decode(src: str) -> bytes | None:
    prefix = "data:image/png;base64,"
    if not src.startswith(prefix):
        return None
    try:
        return png_bytes(base64.b64decode(src[len(prefix):], validate=True))
    except (binascii.Error, ValueError, UserError):
        return None


def reconstructions(path: Path) -> str:
    """The reconstructions grid of a GATE run, re-rendered from its own report (see the module doc)."""
    if (path / "reconstructions.png").is_file():
        return img_file(path / "reconstructions.png", "reconstructions")
    page = path / "report.html"
    if not page.is_file():
        return note("No reconstructions: the run has no report.html.")
    parser = _ReconTable()
    try:
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    except (OSError, AssertionError) as e:
        return note(f"{page}: unreadable ({e})")
    rows = [r for r in parser.rows if r][:MAX_RECON_ROWS]
    if not parser.header or not rows:
        return note(f"{page}: no reconstructions table found.")
    head = "".join(f"<th>{esc(h)}</th>" for h in parser.header)
    body = []
    for row in rows:
        cells = []
        for picture, text, better in row:
            pic = img(picture, text or "reconstruction", cls="pix") if picture else "<i>unreadable</i>"
            cells.append(f"<td>{pic}<span class='{better}'>{esc(text)}</span></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
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
