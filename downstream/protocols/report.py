"""A protocol run's page: our numbers with their intervals beside the published anchors, then the exact settings,
what departs from the protocol and from the paper's code, the library versions and the machine. One HTML file with
no script and no outside resource (the report kit's style and policy: `difffeat.report_sections.page`)."""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.atomic import write_atomic
from difffeat.report_sections.page import CSP, CSS, esc


def _number(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    lo, hi = summary["ci95"]
    return (f"{summary['mean']:.2f} ± {summary['std']:.2f} <span class=ci>[{lo:.2f}, {hi:.2f}] "
            f"n={summary['n']}</span>")


def results_table(results: dict) -> str:
    """Rows: our groups (heads or methods), then the anchors; columns: every metric either side reports."""
    ours = results["results"]
    metrics = list(dict.fromkeys([m for g in ours.values() for m in g] +
                                 [k for a in results["anchors"] for k in a if k not in ("method", "source", "std")]))
    head = "".join(f"<th>{esc(m)}</th>" for m in metrics)
    rows = [f"<tr class=best><td class=l>difffeat: {esc(group)}</td>" +
            "".join(f"<td>{_number(values.get(m))}</td>" for m in metrics) + "<td class=l>this run</td></tr>"
            for group, values in ours.items()]
    for anchor in results["anchors"]:
        cells = "".join(f"<td>{esc(anchor[m])}" + (f" ± {esc(anchor['std'])}" if "std" in anchor and m == "miou"
                                                     else "") + "</td>" if m in anchor else "<td>–</td>"
                        for m in metrics)
        rows.append(f"<tr class=ref><td class=l>{esc(anchor['method'])}</td>{cells}"
                    f"<td class=l>{esc(anchor['source'])}</td></tr>")
    return (f"<div class=scroll><table><tr><th class=l>method</th>{head}<th class=l>source</th></tr>"
            f"{''.join(rows)}</table></div>")


def render(results: dict) -> str:
    verdict = ("<span class='pill acc'>the protocol as published</span>" if results["is_protocol"] else
               "<span class='pill worse'>not the protocol: " + esc("; ".join(results["departures"])) + "</span>")
    differences = "".join(f"<li>{esc(d)}</li>" for d in results["differences"])
    return f"""<!doctype html><html><head><meta charset=utf-8>
<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(results['protocol'])}</title>
<style>{CSS}</style></head><body>
<h1>Protocol {esc(results['protocol'])} <span class=sub>v{esc(results['version'])}</span></h1>
<p class=sub>{esc(results['title'])}</p><div class=verdict>{verdict}</div>
<h2>Numbers</h2><p class=note>{esc(results['report'])}. Ours: mean ± std [95 % t-interval of the mean] over n seeds.
</p>{results_table(results)}
<h2>How difffeat runs it, where the paper's code does otherwise</h2><ul>{differences}</ul>
<h2>Settings</h2><pre>{esc(json.dumps(results['settings'], indent=1))}</pre>
<p class=note>data: <code>{esc(results['data'])}</code>; runs: {esc(', '.join(results['runs']))}</p>
<h2>Versions and machine</h2><pre>{esc(json.dumps({**results['versions'], **results['machine']}, indent=1))}</pre>
</body></html>
"""


def write_report(results: dict, path: str | Path) -> None:
    write_atomic(path, render(results))
