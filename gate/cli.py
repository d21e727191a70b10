"""`difffeat gate`: rank candidate techniques by how well they suppress content shift, and write the report.

Collected by difffeat's CLI through the entry point ``difffeat.commands: gate``; this module imports only the
standard library at load, GATE itself when the command runs.

    difffeat gate IMAGES --candidates FILE.yaml [--strength 0.7] [--steps 25] [--n 16] [--seed 0] [--t 50]
        [--primary psnr] --out DIR [--emit FILE] [--greedy] [--probe LABELS]
    difffeat gate --config DIR/config.json --out DIR2       # repeat a run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args):
    from difffeat.errors import UserError
    from difffeat.spine.config_cli import config_from_args
    from gate.candidates import read_candidates
    from gate.config import GateConfig

    if args.config:
        cfg = GateConfig.from_run(args.config)  # checked for kind and field types, like every repeated run
        if args.images:
            cfg.images = args.images
        if args.candidates:
            cfg.candidates = read_candidates(args.candidates)
        return cfg
    if not args.images or not args.candidates:
        raise UserError("give IMAGES and --candidates FILE.yaml (or --config DIR/config.json)")
    # `--n 0` means every image (None in the config); candidates come from their YAML file.
    return config_from_args(GateConfig, args, candidates=read_candidates(args.candidates), n=args.n or None)


def _cmd_gate(args) -> None:
    from difffeat.spine.run import check_new_file
    from difffeat.zoo import load_pipeline
    from gate.ranking import rank
    from gate.report import report_folder, write_report
    from pipelines.variants import write_variants_file

    cfg = _config(args)
    cfg.validate()  # before the model loads
    folder = report_folder(args.out, cfg, overwrite=args.overwrite)  # refused now, not after the work
    if args.emit:
        check_new_file(args.emit, args.overwrite, "--emit")
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    pipe = load_pipeline(cfg.model)
    result = rank(pipe, cfg.images, cfg.candidates, cfg, progress=not args.quiet)
    out = Path(args.out)
    page = write_report(result, folder, report_images=args.report_images)
    primary = result.primary
    print(f"GATE on {len(result.keys)} images ({len(result.dropped)} dropped), primary {primary}:")
    for row in result.table():
        imp = "" if row["candidate"] == "reference" else \
            f"  Δ {row['improvement']:+.3g} [{row['improvement_low']:+.3g}, {row['improvement_high']:+.3g}]"
        print(f"  {row['rank']}. {row['candidate']:<16} {primary} {row[primary]:.4g} "
              f"[{row[primary + '_low']:.4g}, {row[primary + '_high']:.4g}]{imp}"
              + ("  accepted" if row["accepted"] else ""))
    if result.greedy and result.greedy["selected"]:
        print(f"  greedy: {' + '.join(result.greedy['selected'])}")
    if result.probe:
        p = result.probe
        print(f"  probe ({p['metric']}): " + ", ".join(f"{n} {q:.3f}" for n, q in p["quality"].items())
              + f"; Spearman ρ with {primary}: {p['primary_spearman']:+.2f}")
    for d in result.dropped[:10]:
        print(f"  dropped {d['key']}: {d['reason']}", file=sys.stderr)
    if args.emit:
        variants = result.accepted_variants()
        note = "no candidate was accepted: the plain reference" if not result.accepted else \
            ("the greedy combination" if result.greedy else "accepted candidates")
        write_variants_file(args.emit, variants, comment=f"difffeat gate {cfg.images}: {note} "
                                                          f"(primary {primary}); report in {out}")
        print(f"wrote {len(variants)} variant(s) to {args.emit} (difffeat extract --variants {args.emit})")
    print(f"report: {page}")
    print(watch.finish_line(f"gate: {len(result.table())} candidates ranked on {len(result.keys)} images, report in "
                            f"{out}", count=len(result.keys), unit="images"))


def add_commands(subparsers) -> None:
    """Add `gate` to difffeat's sub-commands (its flags made from `GateConfig`'s fields)."""
    from difffeat.spine.config_cli import add_config_arguments
    from gate.config import GateConfig

    p = subparsers.add_parser("gate", help="rank candidate techniques by content-shift suppression (GATE)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p, GateConfig, positional=["images"])
    p.add_argument("--candidates", help="YAML: candidate name → list of technique specs (reference is added)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--config", help="repeat a run: its config.json")
    p.add_argument("--emit", metavar="FILE", help="write the accepted candidates as a variants file for "
                                                  "`difffeat extract --variants FILE`")
    p.add_argument("--report-images", type=int, default=8, help="images shown in the HTML report")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out and the --emit file")
    p.set_defaults(func=_cmd_gate)

    from gate.sweeping import add_sweep_command  # the `sweep` command lives with its code

    add_sweep_command(subparsers)
