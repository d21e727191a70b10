"""`difffeat zoo train-<model>` and `difffeat zoo eval-<model>`: the command-line side of the built-in recipes.

Each built-in model (mini, mini-dit) has a recipe, which trains it, and a quality check, which its docs page quotes.
Both recipes get the same two commands from one table, so their flags and their rules agree: training resumes
its run folder, and `eval-… --json` writes a new file atomically (an existing report is refused unless
`--overwrite`, because a quality report is what a docs page quotes). The commands live apart from the training and
the checks, which the checks' reports read, so that no library module imports the commands. Nothing heavy is
imported at load: the parsers build without torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from difffeat.errors import UserError


@dataclass(frozen=True)
class Recipe:
    """A built-in model's commands: `train-<name>` runs `train` (a "module:function" taking run, out, config,
    progress) with a `config` (a "module:Config"); `eval-<name>` runs `evaluate` (a "module:function" taking
    model, n, seed, progress) and returns its report."""

    name: str
    train: str
    config: str
    evaluate: str
    train_help: str
    eval_help: str


RECIPES = (
    Recipe("mini", "difffeat.zoo.train:train_mini", "difffeat.zoo.recipe_config:MiniTrainConfig",
           "difffeat.zoo.quality:evaluate_quality",
           "train the built-in mini model (the shipped weights' recipe)",
           "the mini model's quality numbers on held-out Shapes-LT scenes"),
    Recipe("mini-dit", "difffeat.zoo.train_dit:train_mini_dit", "difffeat.zoo.train_dit:MiniDitTrainConfig",
           "difffeat.zoo.dit_quality:evaluate_dit_quality",
           "train the built-in mini-dit (SD3-architecture) model",
           "the mini-dit model's conditioning check on held-out Shapes-LT scenes"),
)


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def add_zoo_commands(zoo) -> None:
    """`zoo train-<name>` and `zoo eval-<name>` of every recipe on the `difffeat zoo` sub-command parser."""
    from difffeat.spine.config_cli import add_config_arguments

    for recipe in RECIPES:
        p = zoo.add_parser(f"train-{recipe.name}", help=recipe.train_help)
        p.add_argument("run", help="run folder: config, loss log, checkpoints (resumes if present)")
        p.add_argument("--out", help="where to export the pipeline (default RUN/pipeline)")
        add_config_arguments(p, _resolve(recipe.config))
        p.set_defaults(func=_cmd_train, recipe=recipe)
    for recipe in RECIPES:
        p = zoo.add_parser(f"eval-{recipe.name}", help=recipe.eval_help)
        p.add_argument("--model", default=recipe.name)
        p.add_argument("--n", type=int, default=64, help="held-out scenes (at least 2)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", help="also write the report here (a new file, unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --json report")
        p.set_defaults(func=_cmd_eval, recipe=recipe)


def _cmd_train(args) -> None:
    from difffeat.spine.config_cli import config_from_args

    recipe = args.recipe
    _resolve(recipe.train)(args.run, args.out, config_from_args(_resolve(recipe.config), args),
                           progress=not args.quiet)


def _cmd_eval(args) -> None:
    import json
    import sys

    from difffeat.spine.run import check_new_file
    from difffeat.utils.atomic import write_json_atomic
    from difffeat.utils.progress import Stopwatch

    recipe = args.recipe
    # the conditioning check compares each scene's caption with the next scene's, so one scene cannot be scored
    if args.n < 2:
        raise UserError(f"--n: at least 2 held-out scenes are needed (another image's caption), got {args.n}")
    if args.json:
        check_new_file(args.json, overwrite=args.overwrite, what="report")  # before minutes of evaluation, not after
    watch = Stopwatch()
    report = _resolve(recipe.evaluate)(args.model, n=args.n, seed=args.seed, progress=not args.quiet)
    if args.json:
        write_json_atomic(args.json, report)
    print(json.dumps(report, indent=1))
    # On stderr: stdout is the JSON report, which a script may read as a whole.
    print(watch.finish_line(f"eval-{recipe.name}: {args.model} on {args.n} held-out scenes"
                            + (f", report in {args.json}" if args.json else ""), count=args.n, unit="images"),
          file=sys.stderr)
