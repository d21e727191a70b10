"""A protocol run's page: our numbers with their intervals beside the published anchors, then the exact settings,
what departs from the protocol and from the paper's code, the library versions and the machine. One HTML file with
no script and no outside resource (the report kit's style and policy: `difffeat.report.page`)."""

from __future__ import annotations

import json
from pathlib import Path

from difffeat.report.page import CSP, CSS, esc
from difffeat.utils.atomic import write_atomic
from downstream.protocols.report_section import results_table


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
