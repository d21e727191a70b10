"""The page kit: escaping, embedded pictures, tables, numbers, the style sheet and the content policy of every page
difffeat writes (`difffeat report`, GATE's and the sweep's own pages, protocol pages, eval-corr's).

Every picture is embedded as a base64 PNG data URI after Pillow has decoded it, so the page is one file that
shows everything or says which picture was unreadable; every text that comes from a file goes through
`esc`. The page carries a Content-Security-Policy that allows no script and no outside resource at all.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difffeat.errors import UserError

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;
 padding:0 16px;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.3em;margin-top:36px;border-bottom:2px solid #ddd;padding-bottom:3px}
h3{font-size:1.05em;margin:22px 0 6px}.sub{color:#666;font-size:.92em}
nav ul{columns:2;font-size:.92em}.verdict{display:flex;gap:10px;flex-wrap:wrap;margin:12px 0}
.pill{border-radius:14px;padding:3px 12px;font-size:.9em;border:1px solid #ccc}
.pill.acc{background:#e5f4ea;border-color:#2e8b57;color:#1d5e39}.pill.rej{background:#f6f6f6;color:#555}
.pill.worse{background:#fbeceb;border-color:#b03a2e;color:#8a2a20}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}th,td{padding:4px 9px;border-bottom:1px solid #e3e3e3;
 text-align:right;white-space:nowrap}th{background:#f5f5f5}td.l,th.l{text-align:left}
td{vertical-align:top}td.tech{white-space:normal;max-width:230px;overflow-wrap:anywhere}
td.l{white-space:normal;overflow-wrap:anywhere;max-width:420px}td.wrap{white-space:normal;max-width:280px;overflow-wrap:anywhere}
tr.acc td{background:#f1faf4}tr.ref td{background:#f7f7f7}tr.best td{background:#f1faf4}.ci{color:#777;font-size:.85em}
.grid{border-collapse:separate;border-spacing:6px 4px}.grid td{border:none;text-align:center;vertical-align:top;
 font-size:.8em;color:#444;padding:0}.grid th{background:none;border:none;font-size:.82em;text-align:center}
.grid img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc;display:block;margin:0 auto 2px}
img.fig{max-width:100%;height:auto;display:block;margin:6px 0}img.pix{image-rendering:pixelated}
.up{color:#1d7a43}.down{color:#b03a2e}.note{color:#555;font-size:.88em}code{background:#f3f3f3;padding:0 3px}
.scroll{overflow-x:auto}.card{border:1px solid #e3e3e3;border-radius:6px;padding:6px 14px 10px;margin:14px 0}
.warn{background:#fff6e5;border:1px solid #e0b050;border-radius:4px;padding:6px 10px;font-size:.9em}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
"""


def esc(value: Any) -> str:
    """Any value as HTML text (quotes too, so it is safe inside an attribute)."""
    return html.escape(str(value), quote=True)


def png_bytes(data: bytes, what: str = "picture") -> bytes:
    """`data` if Pillow decodes it as an image (re-encoded as PNG when it is another format); UserError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "PNG":
                return data
            buf = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(buf, format="PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what}: not a readable image ({e})") from None


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, cls: str = "fig", width: int | None = None) -> str:
    style = f" style='width:{int(width)}px'" if width else ""
    return f"<img class='{esc(cls)}' alt='{esc(alt)}' src='{data_uri(png)}'{style}>"


def img_file(path: Path, alt: str, cls: str = "fig", width: int | None = None) -> str:
    """A picture file embedded, or a note saying why it cannot be (missing or unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return note(f"{path.name}: cannot read ({e.strerror or e})")
    try:
        return img(png_bytes(data, str(path)), alt, cls, width)
    except UserError as e:
        return note(str(e))


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def note(text: str, cls: str = "note") -> str:
    return f"<p class='{cls}'>{esc(text)}</p>"


def table(header: list[str] | None, rows: list[list[str]], left: int = 1, row_classes: list[str] | None = None) -> str:
    """An HTML table (no header row when `header` is None); cells are given as HTML (escape them first); the
    first `left` columns align left."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{v}</{tag}>" for i, v in enumerate(values))

    body = "".join(f"<tr class='{esc(c)}'>{cells('td', r)}</tr>" for r, c in
                   zip(rows, row_classes or [""] * len(rows)))
    head = f"<tr>{cells('th', header)}</tr>" if header else ""
    return f"<div class='scroll'><table>{head}{body}</table></div>"


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; "–" when there is none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{100 * value:.1f}"
    return "–"


def num(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}g}"
    return "–"


def read_json(path: Path) -> Any:
    """Parsed JSON; UserError naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def read_json_or(path: Path, default: Any = None) -> Any:
    try:
        return read_json(path) if path.is_file() else default
    except UserError:
        return default


def display_path(path: Path, base: Path | None = None) -> str:
    """`path` relative to `base` (the report's folder) when it lies below it, else as given."""
    if base is not None:
        try:
            return os.path.relpath(path.resolve(), base.resolve())
        except ValueError:  # another drive (Windows)
            pass
    return str(path)


@dataclass
class Section:
    """One folder's part of the page; `overview` is its row in the page's summary table."""

    kind: str
    title: str
    anchor: str
    html: str
    overview: str = ""
    data: dict = field(default_factory=dict)  # what a summary across sections needs (e.g. a head's scores)
