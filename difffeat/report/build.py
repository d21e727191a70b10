"""`difffeat report RUN_OR_STORE… --out report.html`: one self-contained page for a whole chain.

It gathers what exists under the folders given — GATE runs, sweeps, feature stores, segmentation and classification
head runs, protocol runs, and folders holding them (a `difffeat demo` folder, a ``runs/`` folder) — and shows each
as the section of its kind, with a table comparing the folders of a kind where the kind has one (every
segmentation head). The kinds are registered by the packages that write those folders (`difffeat.report.kinds`:
the entry-point group ``difffeat.report_sections``; the store is the core's own), and each recognises its folders
by the marker difffeat writes (a run's ``config.json`` with ``"format": "difffeat-run/1"`` and its ``"kind"``, a
store's ``manifest.json``) or by the files of runs written before those markers. Sections only read files.

The page is one HTML file with every picture embedded (base64 PNG), every text escaped, and a
Content-Security-Policy that lets it load nothing and run nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import RUN_FORMAT, Config, ConfigError, check_new_file, option

SKIP_FOLDERS = ("checkpoints", "shards")  # parts of a run, never runs themselves


@dataclass
class Found:
    """A folder the report shows: its path as the user named it (or below it), its kind, its marker's content."""

    path: Path
    kind: str
    saved: dict | None = None


def _marker(path: Path) -> dict | None:
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def classify(path: Path) -> tuple[str | None, dict | None]:
    """(kind, marker content) of a folder: the first registered kind that recognises it (`section_kinds`),
    "container" (a run that holds runs, e.g. a demo, or a run of a kind the report does not show), or None (not a
    difffeat folder)."""
    from difffeat.report.kinds import section_kinds

    saved = _marker(path)
    for kind in section_kinds():
        if kind.detect(path, saved):
            return kind.kind, saved
    marked = saved is not None and saved.get("format") == RUN_FORMAT
    return ("container", saved) if marked else (None, saved)


def find_runs(paths: list[str | Path], depth: int = 3) -> list[Found]:
    """Every folder the report can show, in or below `paths` (down to `depth` folders), each once."""
    found: list[Found] = []
    seen: set[Path] = set()

    def visit(path: Path, level: int, given: bool) -> None:
        real = path.resolve()
        if real in seen:
            return
        seen.add(real)
        kind, saved = classify(path)
        if kind not in (None, "container"):
            found.append(Found(path, kind, saved))
            return
        if level >= depth:
            return
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                              and p.name not in SKIP_FOLDERS)
        except OSError as e:
            if given:
                raise UserError(f"{path}: cannot list the folder ({e.strerror or e})") from None
            return
        for child in children:
            visit(child, level + 1, False)

    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise UserError(f"{path}: no such folder (give run folders, feature stores, or folders holding them)")
        if path.resolve() in seen:  # given twice, or inside a folder given before
            continue
        before = len(found)
        visit(path, 0, True)
        if len(found) == before:
            raise UserError(f"{path}: no difffeat run or feature store in it or below it (looked for a "
                            "store's manifest.json, a run's config.json, a GATE ranking.json)")
    return found


# ------------------------------------------------------------------------------------------------ page
def _section(found: Found, anchor: str, n_images: int):
    from difffeat.report.kinds import kind_named
    from difffeat.report.page import Section, esc, note

    shown = found.path.as_posix()
    kind = kind_named(found.kind)
    try:
        return kind.render(found.path, found.saved, anchor, shown, n_images)
    except (UserError, KeyError, TypeError, ValueError, OSError) as e:
        # One folder written by another version must not cost the whole page: say what could not be shown.
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"difffeat report: {shown}: not shown ({reason})", file=sys.stderr)
        return Section(found.kind, f"{kind.title} · {shown}", anchor,
                       note(f"Could not show this folder: {reason}", "warn"), f"<i>not shown</i>: {esc(reason)}")


def _page_order(found: list[Found]) -> list[Found]:
    from difffeat.report.kinds import kind_named

    return sorted(found, key=lambda f: (kind_named(f.kind).page_rank, f.kind))


def build_page(found: list[Found], title: str = "difffeat report", n_images: int = 8) -> str:
    """The report page of the folders `found` (see `find_runs`)."""
    import difffeat
    from difffeat.report.kinds import kind_named
    from difffeat.report.page import CSP, CSS, esc, table

    ordered = _page_order(found)
    sections = [_section(f, f"s{i + 1}", n_images) for i, f in enumerate(ordered)]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1><p class='sub'>difffeat {esc(difffeat.__version__)} · {esc(stamp)} · "
             f"{len(sections)} folder(s)</p>"]
    parts.append(note_chain(ordered))
    parts.append("<h2 id='contents'>Contents</h2>")
    parts.append(table(["kind", "folder", "in short"],
                       [[esc(kind_named(s.kind).title), f"<a href='#{s.anchor}'>{esc(s.title.split(' · ', 1)[-1])}</a>",
                         s.overview if s.overview.startswith("<i>") else esc(s.overview)] for s in sections], left=3))
    for kind in dict.fromkeys(kind_named(f.kind) for f in ordered):  # a comparison per kind that has one
        mine = [s for s in sections if s.kind == kind.kind]
        compared = kind.compare(mine) if kind.compare is not None else ""
        if compared:
            parts.append(f"<h2 id='compare-{esc(kind.kind)}'>{esc(kind.compare_title)}</h2>")
            parts.append(f"<p class='note'>{esc(kind.compare_note)}</p>")
            parts.append(compared)
    for s in sections:
        parts.append(f"<h2 id='{s.anchor}'>{esc(s.title)}</h2>")
        parts.append(s.html)
    parts.append("<p class='note'>Written by <code>difffeat report</code>; every picture is embedded, so this file "
                 "can be sent on its own. <a href='#contents'>Back to the contents</a>.</p></body></html>")
    return "\n".join(parts)


def note_chain(found: list[Found]) -> str:
    """One paragraph saying how the parts of the page connect (the chain a newcomer follows)."""
    from difffeat.report.kinds import kind_named
    from difffeat.report.page import esc

    said = [kind.chain_step for kind in dict.fromkeys(kind_named(f.kind) for f in _page_order(found))
            if kind.chain_step]
    text = "; ".join(said)
    return f"<p>{esc(text[:1].upper() + text[1:])}.</p>" if said else ""


# ------------------------------------------------------------------------------------------- command
@dataclass
class ReportConfig(Config):
    """`difffeat report`: one HTML page for run folders and feature stores."""

    runs: list[str] = option(help="run folders, feature stores, or folders holding them")
    out: str = option(help="the HTML file to write")
    title: str = option("difffeat report", help="the page's title")
    n: int = option(8, min=1, max=64, help="images in each store's comparison grid")
    overwrite: bool = option(False, help="replace --out if it exists")

    def check(self) -> None:
        if not self.runs:
            raise ConfigError("runs", "give at least one run folder or feature store")
        if not str(self.out).lower().endswith((".html", ".htm")):
            raise ConfigError("out", f"must be an .html file, got {self.out!r}")


def write_report(cfg: ReportConfig) -> tuple[Path, list[Found]]:
    """Write the page `cfg` describes; returns its path and the folders it shows."""
    from difffeat.spine.run import mkdir
    from difffeat.utils.atomic import write_atomic

    out = check_new_file(cfg.out, cfg.overwrite, what="report")
    found = find_runs(cfg.runs)
    page = build_page(found, cfg.title, cfg.n)
    mkdir(out.parent)
    write_atomic(out, page)
    return out, found


def _cmd_report(args) -> None:
    from difffeat.spine.config_cli import config_from_args
    from difffeat.utils.progress import Stopwatch, human_bytes

    watch = Stopwatch()
    out, found = write_report(config_from_args(ReportConfig, args))
    from difffeat.report.kinds import kind_named

    kinds = dict.fromkeys(f.kind for f in _page_order(found))
    counts = ", ".join(f"{sum(f.kind == k for f in found)} {kind_named(k).title}(s)" for k in kinds)
    print(watch.finish_line(f"wrote {out} ({human_bytes(out.stat().st_size)}; {counts})"))


def add_report_command(subparsers) -> None:
    """Add `report` to difffeat's sub-commands."""
    from difffeat.spine.config_cli import add_config_arguments

    p = subparsers.add_parser("report", help="one self-contained HTML page for runs and stores (GATE, features, heads)",
                              description=__doc__.split("\n\n")[1].replace("\n", " "),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, ReportConfig, positional=["runs"], required=["runs", "out"])
    p.set_defaults(func=_cmd_report)
