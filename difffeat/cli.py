"""The `difffeat` command line. Sub-commands import their heavy dependencies only when they run.

A mistake the user can fix (a `UserError`) prints one line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difffeat.errors import UserError


def _cmd_data_synth(args) -> None:
    from difffeat.data.shapes_lt import synthesize

    out = synthesize(args.out, n=args.n, seed=args.seed, imbalance=args.imbalance, overwrite=args.overwrite,
                     progress=not args.quiet)
    classes = json.loads((out / "classes.json").read_text())
    print(f"wrote {args.n} Shapes-LT scenes to {out} (splits {classes['config']['splits']})")


def _cmd_zoo_list(args) -> None:
    from difffeat.zoo import MODELS

    for name in MODELS:
        print(name)


def _cmd_zoo_train_mini(args) -> None:
    from difffeat.zoo.train import MiniTrainConfig, train_mini

    cfg = MiniTrainConfig(seed=args.seed, n_train=args.n_train, vae_steps=args.vae_steps,
                          unet_steps=args.unet_steps, threads=args.threads)
    train_mini(args.run, args.out, cfg)


def _cmd_zoo_eval_mini(args) -> None:
    from difffeat.zoo.quality import evaluate_quality

    report = evaluate_quality(args.model, n=args.n, seed=args.seed)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


def _cmd_sample(args) -> None:
    from difffeat.zoo.sampling import sample_to_folder

    prompts = list(args.prompts)
    if args.captions:
        from difffeat.zoo.sampling import read_captions

        prompts += read_captions(args.captions, args.column, args.n)
    if not prompts:
        raise UserError("give at least one prompt, or --captions metadata.csv")
    out = sample_to_folder(prompts, args.out, model=args.model, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, progress=not args.quiet)
    print(f"wrote {len(prompts)} samples and grid.png to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difffeat", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate the Shapes-LT data set")
    p.add_argument("out", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--n", type=int, default=1000, help="images in all (80/10/10 train/val/test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance", type=float, default=100.0, help="head/tail image-label ratio R")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_data_synth)

    zoo = sub.add_parser("zoo", help="built-in models").add_subparsers(dest="zoo_command", required=True)
    zoo.add_parser("list", help="registered model names").set_defaults(func=_cmd_zoo_list)
    p = zoo.add_parser("train-mini", help="train the built-in mini model (the shipped weights' recipe)")
    p.add_argument("run", help="run folder: config, loss log, checkpoints (resumes if present)")
    p.add_argument("--out", help="where to export the pipeline (default RUN/pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--unet-steps", type=int, default=4500)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=_cmd_zoo_train_mini)
    p = zoo.add_parser("eval-mini", help="the mini model's quality numbers on held-out Shapes-LT scenes")
    p.add_argument("--model", default="mini")
    p.add_argument("--n", type=int, default=64, help="held-out scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(func=_cmd_zoo_eval_mini)

    p = sub.add_parser("sample", help="generate images from prompts (DDIM)")
    p.add_argument("prompts", nargs="*", help="prompts, one image each")
    p.add_argument("--captions", help="a metadata.csv (Shapes-LT or imagefolder) to take prompts from")
    p.add_argument("--column", default="fine_caption", help="caption column of --captions")
    p.add_argument("--n", type=int, default=16, help="prompts to take from --captions")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="mini")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"difffeat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difffeat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
