"""A protocol run's section (`difffeat protocol run`): our numbers with their intervals beside the published anchors.

A protocol run writes ``results.json`` (plain JSON: ``protocol``, ``results`` {group: {metric: summary}},
``anchors`` [{method, source, metric: number}], ``departures``); the table here is the one both the protocol's own
page and `difffeat report` show.
"""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.report.kinds import SectionKind
from difffeat.report.page import Section, esc, note

RESULTS = "results.json"


def is_protocol_run(path: Path) -> bool:
    try:
        data = json.loads((path / RESULTS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"protocol", "results", "anchors"} <= set(data)


def _number(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    lo, hi = summary["ci95"]
    return (f"{summary['mean']:.2f} ± {summary['std']:.2f} <span class=ci>[{lo:.2f}, {hi:.2f}] "
            f"n={summary['n']}</span>")


def results_table(results: dict) -> str:
    """Rows: our groups (heads or methods: mean ± std [95 % t-interval] over seeds), then the anchors as published;
    columns: every metric either side reports."""
    ours = results["results"]
    skip = ("method", "source", "std")
    metrics = list(dict.fromkeys([m for g in ours.values() for m in g] +
                                 [k for a in results["anchors"] for k in a if k not in skip]))
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    rows = [f"<tr class=best><td class=l>difffeat: {esc(group)}</td>" +
            "".join(f"<td>{_number(values.get(m))}</td>" for m in metrics) + "<td class=l>this run</td></tr>"
            for group, values in ours.items()]
    for anchor in results["anchors"]:
        cells = []
        for m in metrics:
            spread = f" ± {esc(anchor['std'])}" if "std" in anchor and m == "miou" else ""
            cells.append(f"<td>{esc(anchor[m])}{spread}</td>" if m in anchor else "<td>–</td>")
        rows.append(f"<tr class=ref><td class=l>{esc(anchor['method'])}</td>{''.join(cells)}"
                    f"<td class=l>{esc(anchor['source'])}</td></tr>")
    return (f"<div class=scroll><table><tr><th class=l>method</th>{head}<th class=l>source</th></tr>"
            f"{''.join(rows)}</table></div>")


def render_protocol(path: Path, anchor: str, shown_as: str) -> Section:
    results = json.loads((path / RESULTS).read_text())
    verdict = "the protocol as published" if results.get("is_protocol") else \
        "not the protocol: " + "; ".join(results.get("departures", []))
    parts = [note(f"{results.get('title', '')} — {verdict}"), results_table(results)]
    if (path / "report.html").is_file():
        parts.append(note(f"The protocol's own page, with its settings, versions and machine: {path / 'report.html'}"))
    first = next(iter(results["results"].values()), {})
    metric = next(iter(first), None)
    overview = f"{metric} {_number(first.get(metric))}" if metric else ""
    return Section("protocol", f"Protocol {results['protocol']} · {shown_as}", anchor, "\n".join(parts), overview)


PROTOCOL_SECTION = SectionKind(
    "protocol", "protocol run", lambda path, marker: is_protocol_run(path),
    lambda path, marker, anchor, shown, n_images: render_protocol(path, anchor, shown),
    detect_rank=10, page_rank=0)  # its steps' folders are shown through its table
