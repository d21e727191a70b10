"""`difffeat train-seg` and `difffeat eval-seg`: segmentation heads on stored features.

Collected by difffeat's CLI through the `difffeat.commands` entry point. The flags are generated from
`SegTrainConfig` and `SegEvalConfig` (one default per option; a `ConfigError` naming a field is shown with its
flag by the CLI); at load this module imports only argparse and light difffeat modules, the training code
when a command runs.

    difffeat train-seg --features DIR [--features DIR2]… [--data LAYOUT:ROOT | --masks DIR] --loss ce|aucseg
        [--memory-bank] --head mlp|conv --out RUN [--resume | --overwrite] [--stop-after N] [--config RUN/config.json]
    difffeat eval-seg --run RUN --features DIR [--data LAYOUT:ROOT | --masks DIR] [--split test]
        [--resolution original|frame] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

from difffeat.spine.config_cli import add_config_arguments, config_from_args
from difffeat.spine.run import read_json
from difffeat.utils.progress import Stopwatch
from downstream.seg.config import SegEvalConfig, SegTrainConfig


def _main_process() -> bool:
    """Under torchrun / accelerate launch, one report, from rank 0."""
    return os.environ.get("RANK", "0") == "0"


def cmd_train_seg(args: argparse.Namespace) -> None:
    from downstream.cli_common import train_config_of
    from downstream.seg.evaluate import group_summary
    from downstream.seg.profile import config_from_profile
    from downstream.seg.train import train_seg

    cfg = train_config_of(SegTrainConfig, args, config_from_profile)
    watch = Stopwatch()
    run = train_seg(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                    stop_after=args.stop_after)
    if not _main_process():
        return
    metrics = run / "metrics.json"
    if metrics.is_file():
        print(f"trained {run}; {cfg.val_split}: {group_summary(read_json(metrics, 'scores file'))}")
    else:
        print(f"trained {run}")
    # A resumed run does only what was left, so only a fresh run's iterations give an honest rate.
    done = None if args.resume else min(cfg.iterations, args.stop_after or cfg.iterations)
    print(watch.finish_line(f"train-seg: {run} ({done or '?'} iterations)", count=done, unit="it"))


def cmd_eval_seg(args: argparse.Namespace) -> None:
    from downstream.seg.evaluate import eval_seg, group_summary

    cfg = config_from_args(SegEvalConfig, args)
    watch = Stopwatch()
    scores = eval_seg(**cfg.to_dict(), progress=not args.quiet)
    if _main_process():
        print(f"{scores['images']} images: {group_summary(scores)}  (wrote {scores['out']}/metrics.json)")
        print(watch.finish_line(f"eval-seg: {scores['out']}/metrics.json", count=scores["images"], unit="images"))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train-seg` and `eval-seg` to difffeat's sub-command parsers."""
    p = sub.add_parser("train-seg", help="train a segmentation head on stored features (CE or AUCSeg)")
    add_config_arguments(p, SegTrainConfig, required=("out",))
    p.add_argument("--profile", metavar="NAME", help="AUCSeg's released settings of a data set (ade20k, cityscapes, "
                                                     "coco-stuff): λ, CE averaging, tail classes, bank ratio; given "
                                                     "flags win")
    p.add_argument("--config", help="repeat a run: its config.json (the other options are then ignored)")
    p.add_argument("--stop-after", type=_positive_int,
                   help="stop after N iterations of this call (--resume goes on)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("eval-seg", help="mIoU (overall, head, middle, tail) of a train-seg run on features and masks")
    add_config_arguments(p, SegEvalConfig, required=("run", "features"))
    p.set_defaults(func=cmd_eval_seg)
