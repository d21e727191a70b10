"""`difffeat protocol list | show NAME | run NAME`: the field's standard evaluations by name (docs/protocols.md).

Collected by difffeat's CLI through the `difffeat.commands` entry point; at load only argparse.

    difffeat protocol list
    difffeat protocol show ade20k
    difffeat protocol run ade20k --data data/ADEChallengeData2016 --out runs/ade20k [--model M] [--variants FILE]
        [--set head.iterations=500]… [--smoke]
"""

from __future__ import annotations

import argparse
import json


def _cmd_list(args: argparse.Namespace) -> None:
    from downstream.protocols.protocol import load_protocol, protocol_names

    for name in protocol_names():
        p = load_protocol(name)
        print(f"{name:24s} {p.task:15s} {p.title}")


def _cmd_show(args: argparse.Namespace) -> None:
    from downstream.protocols.protocol import load_protocol

    print(json.dumps(load_protocol(args.name).raw, indent=1, ensure_ascii=False))


def _cmd_run(args: argparse.Namespace) -> None:
    from difffeat.utils.progress import Stopwatch
    from downstream.protocols.protocol import load_protocol, parse_override
    from downstream.protocols.runner import run_protocol

    variants = {}
    if args.variants:
        from difffeat.extraction.conditioning import technique_provider

        variants = technique_provider().read_variants(args.variants)
    watch = Stopwatch()
    results = run_protocol(load_protocol(args.name), args.out, data=args.data, model=args.model,
                           overrides=dict(parse_override(s) for s in args.set or []), variants=variants,
                           smoke=args.smoke, progress=not args.quiet)
    for group, numbers in results["results"].items():
        shown = "  ".join(f"{m} {v['mean']:.2f}±{v['std']:.2f}" for m, v in numbers.items() if v["mean"] is not None)
        print(f"{group}: {shown}")
    tag = "the protocol" if results["is_protocol"] else "NOT the protocol (" + "; ".join(results["departures"]) + ")"
    print(f"{args.name}: {tag}; wrote {args.out}/results.json and report.html")
    print(watch.finish_line(f"protocol run {args.name}: {args.out}/results.json"))


def add_commands(sub: argparse._SubParsersAction) -> None:
    protocol = sub.add_parser("protocol", help="standard evaluations by name, with the published numbers beside ours")
    commands = protocol.add_subparsers(dest="protocol_command", required=True)
    commands.add_parser("list", help="the protocols").set_defaults(func=_cmd_list)
    p = commands.add_parser("show", help="a protocol's settings, sources and anchors")
    p.add_argument("name")
    p.set_defaults(func=_cmd_show)
    p = commands.add_parser("run", help="run a protocol's whole chain (resumable) and write results.json + report")
    p.add_argument("name")
    p.add_argument("--data", metavar="ROOT", help="the data set's root, in the protocol's layout")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--model", help="another model than the protocol's (the run is then marked as not the protocol)")
    p.add_argument("--variants", metavar="FILE", help="techniques to extract as variants (GATE's --emit file)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. head.iterations=500 or extract.timesteps=[100] (marked); repeat")
    p.add_argument("--smoke", action="store_true", help="the protocol at toy scale on the built-in world, in the "
                                                        "protocol's layout, with the mini model")
    p.set_defaults(func=_cmd_run)
