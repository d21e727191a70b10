"""`difffeat train-cls` and `difffeat eval-cls`: classification heads on pooled stored features.

Registered in difffeat's CLI through `EXTENSION_COMMANDS`; this module imports only the standard library at
load, the training code when a command runs.

    difffeat train-cls --features DIR [--features DIR …] --labels CSV [--split train/ --test-split test/ |
        --test-labels CSV] --method ce|la|vs|ldam|tla-adrw|dirmixe [--optim sam|imbsam|ssesam]
        [--head linear|cosine|etf|grassmannian] [--fusion concat|weighted|reconboost] --out RUN
    difffeat eval-cls --run RUN --features DIR … --labels CSV [--split test/] [--out DIR] [--no-tta]
"""

from __future__ import annotations

import argparse
import json


def _cmd_train_cls(args) -> None:
    from difffeat.errors import UserError
    from difffeat.runconfig import read_saved_config
    from downstream.train_cls import ClsTrainConfig, summary_line, train_cls

    if args.config:
        cfg = ClsTrainConfig.from_dict(read_saved_config(args.config), out=args.out)
    else:
        if not args.features or not args.labels:
            raise UserError("give --features DIR and --labels CSV (or --config RUN/config.json)")
        cfg = ClsTrainConfig(
            features=args.features, labels=args.labels, out=args.out, test_labels=args.test_labels,
            split=args.split, test_split=args.test_split, classes=args.classes, layers=args.layer,
            sources=args.sources, pool_grid=args.pool_grid, fusion=args.fusion, method=args.method,
            optim=args.optim, head=args.head, hidden=args.hidden, frame_dim=args.frame_dim,
            assignment=args.assignment, scale=args.scale, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, tau=args.tau,
            rho=args.rho, rho_tail=args.rho_tail, sse_gamma=args.sse_gamma, tail_eta=args.tail_eta,
            dm_tau=args.dm_tau, lambda_var=args.lambda_var, trials=args.trials, concentration=args.concentration,
            tta_epochs=args.tta_epochs, tta_steps=args.tta_steps, rb_stages=args.rb_stages, rb_weight2=args.rb_weight2,
            dirichlet_draws=args.dirichlet_draws,
            drop_unseen=args.drop_unseen, seed=args.seed, checkpoint_every=args.checkpoint_every,
            device=args.device)
    run = train_cls(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                    stop_after=args.stop_after)
    metrics = run / "metrics.json"
    if metrics.is_file():
        print(f"trained {run}; {summary_line(json.loads(metrics.read_text()))}")
    else:
        print(f"trained {run}")


def _cmd_eval_cls(args) -> None:
    from downstream.train_cls import eval_cls, summary_line

    scores = eval_cls(args.run, args.features, args.labels, split=args.split, out=args.out, tta=not args.no_tta,
                      dirichlet_draws=args.dirichlet_draws, seed=args.seed, drop_unseen=args.drop_unseen)
    print(f"{scores['images']} images: {summary_line(scores)}  (wrote {scores['out']}/metrics.json)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train-cls` and `eval-cls` to difffeat's sub-command parsers."""
    p = sub.add_parser("train-cls", help="train a classification head on pooled stored features (long-tail losses)")
    p.add_argument("--features", action="append", help="feature store; repeat for several sources")
    p.add_argument("--labels", help="CSV with key,label columns (label: class name or integer id)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="repeat a run: its config.json")
    p.add_argument("--split", help="train on the store keys under this prefix (e.g. train/); each needs a label")
    p.add_argument("--test-split", help="evaluate at the end on the keys under this prefix (e.g. test/)")
    p.add_argument("--test-labels", help="a separate key,label CSV of test keys (then --labels lists the "
                                         "training keys exactly)")
    p.add_argument("--classes", help="class names: names file, JSON list / classes.json, or a,b,c "
                                     "(default: from the labels)")
    p.add_argument("--layer", action="append", help="use only these layers (e.g. up_blocks.1@50); repeat")
    p.add_argument("--sources", default="store", choices=["store", "layer"],
                   help="one source per store, or per layer of each store (layers / timesteps as modalities)")
    p.add_argument("--pool-grid", type=int, default=1, help="average-pool onto G×G cells (1: global)")
    p.add_argument("--fusion", default="concat", choices=["concat", "weighted", "reconboost"],
                   help="several sources: concatenate, learned softmax-weighted sum, or ReconBoost")
    p.add_argument("--method", default="ce", choices=["ce", "la", "vs", "ldam", "tla-adrw", "dirmixe"])
    p.add_argument("--optim", default="none", choices=["none", "sam", "imbsam", "ssesam"],
                   help="sharpness-aware wrapper of SGD (imbsam / ssesam use the head / tail split)")
    p.add_argument("--head", choices=["linear", "cosine", "etf", "grassmannian"],
                   help="default: cosine for ldam and dirmixe, else linear")
    p.add_argument("--hidden", type=int, default=256, help="trunk width (0: no trunk)")
    p.add_argument("--frame-dim", type=int, help="dimension of an etf / grassmannian frame")
    p.add_argument("--assignment", default="identity", choices=["identity", "random"],
                   help="label → frame vertex assignment")
    p.add_argument("--scale", type=float, default=30.0, help="logit scale of cosine and frame heads")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--tau", type=float, default=1.0, help="LA: τ of z + τ·log π")
    p.add_argument("--rho", type=float, default=0.05, help="SAM / ImbSAM radius; SSE-SAM head radius")
    p.add_argument("--rho-tail", type=float, default=0.1, help="SSE-SAM tail radius")
    p.add_argument("--sse-gamma", type=float, default=0.7, help="SSE-SAM: head radius 0 after γ·epochs")
    p.add_argument("--tail-eta", type=float, help="tail classes: fewer training samples than this "
                                                   "(default 0.2 × the largest class)")
    p.add_argument("--dm-tau", type=float, default=1.3, help="DirMixE: power τ of the prior shift")
    p.add_argument("--lambda-var", type=float, default=5.0, help="DirMixE: weight of the semi-variance")
    p.add_argument("--trials", type=int, default=60, help="DirMixE: Dirichlet draws per iteration")
    p.add_argument("--concentration", type=float, default=1e4, help="DirMixE: α0")
    p.add_argument("--tta-epochs", type=int, default=5, help="DirMixE test-time aggregation: passes at most")
    p.add_argument("--tta-steps", type=int, default=79,
                   help="DirMixE test-time aggregation: batches per pass at least")
    p.add_argument("--rb-stages", type=int, default=16, help="ReconBoost: stages (4 update + 2 rectify epochs each)")
    p.add_argument("--rb-weight2", type=float, default=1.0, help="ReconBoost: λ₂ of the KL reconcilement term")
    p.add_argument("--dirichlet-draws", type=int, default=3, help="Dirichlet test sets per component")
    p.add_argument("--drop-unseen", action="store_true", help="evaluate without test samples of untrained classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=10, help="epochs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--stop-after", type=int, help="stop after N epochs of this call (--resume goes on)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(func=_cmd_train_cls)

    p = sub.add_parser("eval-cls", help="test-agnostic accuracy of a train-cls run (+ NC diagnostics)")
    p.add_argument("--run", required=True, help="train-cls run folder")
    p.add_argument("--features", action="append", required=True, help="feature store(s), as in training")
    p.add_argument("--labels", required=True, help="key,label CSV of the test images")
    p.add_argument("--split", help="the store keys under this prefix (default: the CSV's keys)")
    p.add_argument("--out", help="where to write metrics.json and accuracy.png (default RUN/eval-SPLIT)")
    p.add_argument("--no-tta", action="store_true", help="DirMixE: skip test-time aggregation")
    p.add_argument("--dirichlet-draws", type=int, help="Dirichlet test sets per component (default: as trained)")
    p.add_argument("--seed", type=int, help="seed of the resampled test sets (default: as trained)")
    p.add_argument("--drop-unseen", action="store_true", help="evaluate without test samples of untrained classes")
    p.set_defaults(func=_cmd_eval_cls)
