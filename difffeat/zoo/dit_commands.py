"""`difffeat zoo train-mini-dit` and `difffeat zoo eval-mini-dit`: the command-line side of the mini-dit recipe.

The commands live apart from the training (`difffeat.zoo.train_dit`) and its check (`difffeat.zoo.dit_quality`),
which the check's report reads, so that neither library module imports the other's commands. Nothing heavy is
imported at load: the parser builds without torch.
"""

from __future__ import annotations

from difffeat.errors import UserError


def add_zoo_commands(zoo) -> None:
    """`zoo train-mini-dit` and `zoo eval-mini-dit` on the `difffeat zoo` sub-command parser."""
    from difffeat.spine.config_cli import add_config_arguments
    from difffeat.zoo.train_dit import MiniDitTrainConfig

    p = zoo.add_parser("train-mini-dit", help="train the built-in mini-dit (SD3-architecture) model")
    p.add_argument("run", help="run folder: config, loss log, checkpoints (resumes if present)")
    p.add_argument("--out", help="where to export the pipeline (default RUN/pipeline)")
    add_config_arguments(p, MiniDitTrainConfig)
    p.set_defaults(func=_cmd_train)
    p = zoo.add_parser("eval-mini-dit", help="the mini-dit model's conditioning check on held-out Shapes-LT scenes")
    p.add_argument("--model", default="mini-dit")
    p.add_argument("--n", type=int, default=64, help="held-out scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here (a new file)")
    p.set_defaults(func=_cmd_eval)


def _cmd_train(args) -> None:
    from difffeat.spine.config_cli import config_from_args
    from difffeat.zoo.train_dit import MiniDitTrainConfig, train_mini_dit

    train_mini_dit(args.run, args.out, config_from_args(MiniDitTrainConfig, args), progress=not args.quiet)


def _cmd_eval(args) -> None:
    import json
    import sys

    from difffeat.spine.run import check_new_file
    from difffeat.utils.atomic import write_json_atomic
    from difffeat.utils.progress import Stopwatch
    from difffeat.zoo.dit_quality import evaluate_dit_quality

    if args.n < 2:
        raise UserError(f"--n: at least 2 held-out scenes are needed (another image's caption), got {args.n}")
    if args.json:
        check_new_file(args.json, what="report")
    watch = Stopwatch()
    report = evaluate_dit_quality(args.model, n=args.n, seed=args.seed, progress=not args.quiet)
    if args.json:
        write_json_atomic(args.json, report)
    print(json.dumps(report, indent=1))
    # On stderr: stdout is the JSON report, which a script may read as a whole.
    print(watch.finish_line(f"eval-mini-dit: {args.model} on {args.n} held-out scenes"
                            + (f", report in {args.json}" if args.json else ""), count=args.n, unit="images"),
          file=sys.stderr)
