"""Mean ± std over seeds of train-seg runs: the table that compares features, losses and heads.

Runs are grouped by their config with the seed and the output folder left out, so runs that differ only in
seed form one row. Scores come from each run's ``metrics.json`` (validation) or from an ``eval-seg`` output
below it (``--metrics eval-test/metrics.json``).

    python -m downstream.seg.summary runs/seg-* --metrics eval-test/metrics.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from difffeat.errors import UserError
from difffeat.spine.run import confine, read_json, read_saved_config

SCORES = ("miou", "miou_head", "miou_middle", "miou_tail", "pixel_accuracy")
VARYING = ("seed", "out", "extra")


def _label(config: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={json.dumps(config.get(k))}" for k in keys) or "all"


def summarize_runs(runs: list[str | Path], metrics: str = "metrics.json") -> list[dict]:
    """One row per group of runs: the group's label, seeds, and mean and std (over seeds) of each score."""
    groups: dict[str, list[tuple[dict, dict]]] = {}
    configs = []
    for run in runs:
        run = Path(run)
        if not (run / "config.json").is_file():
            raise UserError(f"{run}: not a train-seg run (no config.json)")
        config = read_saved_config(run / "config.json")
        scores = read_json(confine(run, metrics, what="--metrics"), "scores file")
        if not isinstance(scores, dict):
            raise UserError(f"{run / metrics}: not a scores file (expected a JSON object)")
        configs.append((config, scores))
    # Label groups by the config fields that differ between runs (apart from seed and folder).
    keys = sorted({k for c, _ in configs for k in c if k not in VARYING
                   and len({json.dumps(c2.get(k), sort_keys=True) for c2, _ in configs}) > 1})
    for config, scores in configs:
        groups.setdefault(_label(config, keys), []).append((config, scores))
    rows = []
    for label, members in groups.items():
        row = {"group": label, "seeds": sorted(c["seed"] for c, _ in members), "n": len(members)}
        for name in SCORES:
            values = [s[name] for _, s in members if s.get(name) is not None]
            row[name] = (statistics.mean(values) if values else None,
                         statistics.stdev(values) if len(values) > 1 else 0.0 if values else None)
        rows.append(row)
    return rows


def format_rows(rows: list[dict], markdown: bool = False) -> str:
    def cell(v):
        mean, std = v
        return "-" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"

    head = ["group", "seeds", *SCORES]
    lines = [[r["group"], ",".join(map(str, r["seeds"])), *(cell(r[s]) for s in SCORES)] for r in rows]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m downstream.seg.summary", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="train-seg run folders")
    parser.add_argument("--metrics", default="metrics.json", help="scores file, relative to each run")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(format_rows(summarize_runs(args.runs, args.metrics), args.markdown))
    except UserError as e:
        print(f"seg_summary: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
