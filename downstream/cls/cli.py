"""`difffeat train-cls` and `difffeat eval-cls`: classification heads on pooled stored features.

Collected by difffeat's CLI through the `difffeat.commands` entry point; the flags are generated from
`ClsTrainConfig` and `EvalClsConfig` (this module imports only those torch-free configs at start-up, the training
code when a command runs).

    difffeat train-cls --features DIR [--features DIR …] --labels CSV [--split train/ --test-split test/ |
        --test-labels CSV] --method ce|la|vs|ldam|tla-adrw|dirmixe|drauc|tkpr [--optim sam|imbsam|ssesam]
        [--head linear|cosine|etf|grassmannian] [--fusion concat|weighted|reconboost] [--profile NAME] --out RUN

`--profile NAME` (a classification profile of `downstream.profiles`: cifar100-lt, cifar10-lt, imagenet-lt,
inat) sets the released hyper-parameters of that data set for the chosen method, optimizer and evaluation
(`downstream.cls.profile`); flags given on the command line win over it.
    difffeat eval-cls --run RUN --features DIR … --labels CSV [--split test/] [--out DIR] [--no-tta]
"""

from __future__ import annotations

import argparse
import contextlib
import os

from difffeat.errors import UserError
from difffeat.spine.config_cli import add_config_arguments, config_from_args, flag_of
from difffeat.spine.run import ConfigError
from difffeat.utils.progress import Stopwatch
from downstream.cls.config import ClsTrainConfig, EvalClsConfig


@contextlib.contextmanager
def _flags(args: argparse.Namespace):
    """Config errors name a field; on the command line they name its flag."""
    try:
        yield
    except ConfigError as e:
        raise UserError(f"{flag_of(args, e.field)}: {e.reason}") from None


def _cmd_train_cls(args: argparse.Namespace) -> None:
    from difffeat.spine.run import read_json
    from downstream.cli_common import train_config_of
    from downstream.cls.evaluation import summary_line
    from downstream.cls.profile import config_from_profile
    from downstream.cls.train import train_cls

    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be ≥ 1, got {args.stop_after}")
    with _flags(args):
        cfg = train_config_of(ClsTrainConfig, args, config_from_profile)
        watch = Stopwatch()
        run = train_cls(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                        stop_after=args.stop_after)
    if os.environ.get("RANK", "0") != "0":  # one of several processes: the main one reports
        return
    metrics = run / "metrics.json"
    if metrics.is_file():
        print(f"trained {run}; {summary_line(read_json(metrics, 'metrics'))}")
    else:
        print(f"trained {run}")
    # A resumed or stopped run does only part of the epochs: a rate only for a whole fresh run.
    done = None if args.resume or args.stop_after is not None else cfg.epochs
    print(watch.finish_line(f"train-cls: {run} ({done or '?'} epochs)", count=done, unit="epochs"))


def _cmd_eval_cls(args: argparse.Namespace) -> None:
    from downstream.cls.evaluation import eval_cls, summary_line

    with _flags(args):
        cfg = config_from_args(EvalClsConfig, args)
        watch = Stopwatch()
        scores = eval_cls(cfg.run, cfg.features, cfg.labels, split=cfg.split, out=cfg.out, tta=cfg.tta,
                          dirichlet_draws=cfg.dirichlet_draws, seed=cfg.seed, drop_unseen=cfg.drop_unseen,
                          overwrite=args.overwrite)
    print(f"{scores['images']} images: {summary_line(scores)}  (wrote {scores['out']}/metrics.json)")
    if os.environ.get("RANK", "0") == "0":
        print(watch.finish_line(f"eval-cls: {scores['out']}/metrics.json", count=scores["images"], unit="images"))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train-cls` and `eval-cls` to difffeat's sub-command parsers."""
    p = sub.add_parser("train-cls", help="train a classification head on pooled stored features (long-tail losses)")
    add_config_arguments(p, ClsTrainConfig, required=("out",))
    p.add_argument("--profile", metavar="NAME", help="set the released hyper-parameters of a data set (cifar100-lt, "
                                                     "cifar10-lt, imagenet-lt, inat); given flags win")
    p.add_argument("--config", help="repeat a run: its config.json")
    p.add_argument("--stop-after", type=int, help="stop after N epochs of this call (--resume goes on)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(func=_cmd_train_cls)

    p = sub.add_parser("eval-cls", help="label-shift accuracy of a train-cls run (+ NC diagnostics)")
    add_config_arguments(p, EvalClsConfig, required=("run", "features", "labels"))
    p.add_argument("--overwrite", action="store_true", help="replace another evaluation in --out")
    p.set_defaults(func=_cmd_eval_cls)
