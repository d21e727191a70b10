"""`difffeat eval-corr` and `difffeat match`: semantic correspondence with stored or live features.

Collected by difffeat's CLI through the `difffeat.commands` entry point; the flags are generated from
`CorrEvalConfig` and `MatchConfig`. At load this module imports only argparse and light difffeat modules.

    difffeat eval-corr --features STORE [--features STORE2] --data spair:ROOT:SPLIT [--layer L]… [--variant NAME]…
        [--alpha 0.05 --alpha 0.1 --alpha 0.15] [--soft-argmax W] [--working-size H W] --out DIR
    difffeat match IMG_A IMG_B [--model mini] [--layer dift] [--t 50] [--points X,Y …] [--grid N] --out match.png
"""

from __future__ import annotations

import argparse

from difffeat.spine.config_cli import add_config_arguments, config_from_args
from difffeat.utils.progress import Stopwatch
from downstream.corr.config import CorrEvalConfig, MatchConfig


def _pct(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def headline(results: dict) -> str:
    """One line: PCK at the main α (bbox), per point and per image with intervals."""
    a = results["main"]["alpha"]
    o = results["scores"]["bbox"][str(a)]["overall"]
    parts = []
    for avg in ("per_point", "per_image"):
        text = f"{avg.replace('_', ' ')} {_pct(o[avg])}"
        if f"{avg}_low" in o:
            text += f" [{_pct(o[f'{avg}_low'])}, {_pct(o[f'{avg}_high'])}]"
        parts.append(text)
    return f"PCK@{a} bbox: " + ", ".join(parts)


def cmd_eval_corr(args: argparse.Namespace) -> None:
    from downstream.corr.evaluate import eval_corr

    cfg = config_from_args(CorrEvalConfig, args)
    watch = Stopwatch()
    results = eval_corr(**cfg.to_dict(), progress=not args.quiet)
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"{results['pairs']} pairs, {results['points']} points: {headline(results)}  "
          f"(wrote {results['out']}/results.json)")
    print(watch.finish_line(f"eval-corr: {results['out']}", count=results["pairs"], unit="pairs"))


def cmd_match(args: argparse.Namespace) -> None:
    from downstream.corr.live import match_images

    cfg = config_from_args(MatchConfig, args)
    found = match_images(cfg, progress=not args.quiet)
    for note in found["notes"]:
        print(f"note: {note}")
    print(f"matched {len(found['points'])} points on {', '.join(found['layers'])}; wrote {found['out']}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `eval-corr` and `match` to difffeat's sub-command parsers."""
    p = sub.add_parser("eval-corr", help="PCK of stored features on keypoint pairs (SPair-71k layout; DIFT protocol)")
    add_config_arguments(p, CorrEvalConfig, required=("features", "out"))
    p.set_defaults(func=cmd_eval_corr)

    p = sub.add_parser("match", help="match points between two images with live features and draw the matches")
    add_config_arguments(p, MatchConfig, positional=("images",), required=("images",))
    p.set_defaults(func=cmd_match)
