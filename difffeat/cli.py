"""The `difffeat` command line. Sub-commands import their heavy dependencies only when they run.

A mistake the user can fix (a `UserError`) prints one line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from difffeat.errors import UserError
from difffeat.runconfig import read_saved_config

# Modules of the other layers that add sub-commands through `add_commands(subparsers)`: difffeat never
# imports them otherwise (dependencies point from them to difffeat).
EXTENSION_COMMANDS: list[str] = ["pipelines.cli", "downstream.cls_cli", "gate.cli"]


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


def _cmd_zoo_report(args) -> None:
    from difffeat.zoo.report import write_mini_report

    report = write_mini_report(args.run, args.model, args.out, seed=args.seed)
    print(json.dumps(report, indent=1))


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


def _cmd_layers(args) -> None:
    from difffeat.layers import LAYER_PRESETS, list_layers, resolve_layers
    from difffeat.zoo import load_pipeline

    pipe = load_pipeline(args.model)
    size = tuple(args.size) if args.size else (None, None)
    for name, shape in list_layers(pipe, *size):
        print(f"{name}\t{'×'.join(map(str, shape))}")
    for preset in LAYER_PRESETS:
        print(f"# preset {preset}: {' '.join(resolve_layers(pipe, [preset], *size))}")


def _extract_config(args):
    from dataclasses import fields

    from difffeat.runner import ExtractRunConfig

    if args.config:
        saved = read_saved_config(args.config)  # a manifest.json or a bare config
        known = {f.name for f in fields(ExtractRunConfig)}
        cfg = ExtractRunConfig(**{k: v for k, v in saved.items() if k in known and k != "out"},
                               out=args.out)
        if args.images:
            cfg.images = args.images
        return cfg
    if not args.images:
        raise UserError("give an image folder, glob or dataset (or --config FILE)")
    return ExtractRunConfig(
        images=args.images, out=args.out, model=args.model, layers=args.layer or ["dift"],
        timesteps=args.t or [50], seed=args.seed, ensemble=args.ensemble, batch_size=args.batch_size,
        noise=not args.clean, posterior=args.posterior, prompt=args.prompt, prompt_source=args.prompt_from,
        captions_csv=args.captions_csv, caption_column=args.caption_column, label_template=args.label_template,
        resolution=list(args.size) if args.size else None, resize=args.resize, dtype=args.dtype,
        store_dtype="float16" if args.fp16_store else "float32", concat=args.concat,
        concat_size=list(args.concat_size) if args.concat_size else None, capture=args.capture,
        attention=args.attention or [], techniques=args.technique or [], variants=_variants(args),
        shard_size=args.shard_size,
    )


def _variants(args) -> dict[str, list[str]]:
    from pipelines.variants import parse_variant_args, read_variants_file

    variants = read_variants_file(args.variants) if args.variants else {}
    for name, specs in parse_variant_args(args.variant or []).items():
        if name in variants:
            raise UserError(f"variant {name!r} is both in {args.variants} and given by --variant")
        variants[name] = specs
    return variants


def _cmd_extract(args) -> None:
    from difffeat.runner import run_extraction

    report = run_extraction(_extract_config(args), overwrite=args.overwrite, resume=args.resume,
                            progress=not args.quiet)
    if report["rank"] == 0:
        failed = report["failed"]
        speed = report["images_per_second"]
        print(f"extracted {report['extracted']} images to {args.out}"
              + (f" ({speed:.1f} img/s per process)" if speed else "")
              + (f"; {report['already_done']} already done" if report["already_done"] else "")
              + (f"; skipped {len(failed)} (see {args.out}/report.json)" if failed else ""))
        for f in failed[:10]:
            print(f"  skipped {f['key']}: {f['reason']}", file=sys.stderr)


def _cmd_inspect(args) -> None:
    from difffeat.store import FeatureStore, summarize

    print(summarize(FeatureStore(args.store)))


def _cmd_viz(args) -> None:
    from difffeat.store import FeatureStore
    from difffeat.viz import save_pca_image

    store = FeatureStore(args.store)
    layer = args.layer or store.layers[0]
    if layer not in store.layers:
        raise UserError(f"{args.store}: no layer {layer!r} (layers: {', '.join(store.layers)})")
    keys = args.keys or store.keys()[: args.n]
    missing = [k for k in keys if k not in store]
    if missing:
        raise UserError(f"{args.store}: no image {missing[0]!r}")
    save_pca_image([store[k][layer].astype("float32") for k in keys], args.out, scale=args.scale)
    print(f"wrote PCA image of {layer} for {len(keys)} images to {args.out}")


def _cmd_train_seg(args) -> None:
    from downstream.train_seg import SegTrainConfig, group_summary, train_seg

    if args.config:
        cfg = SegTrainConfig.from_dict(read_saved_config(args.config), out=args.out)
    else:
        if not args.features or not args.masks:
            raise UserError("give --features DIR and --masks DIR (or --config RUN/config.json)")
        cfg = SegTrainConfig(
            features=args.features, masks=args.masks, out=args.out, classes=args.classes, split=args.split,
            val_split=args.val_split, layers=args.layer, mask_size=args.mask_size, head=args.head,
            variants=args.variants, ensemble=args.ensemble, hidden=args.hidden, loss=args.loss,
            auc_weight=args.auc_weight, margin=args.margin, class_weights=args.class_weights,
            memory_bank=args.memory_bank, bank_capacity=args.bank_capacity, bank_sample_ratio=args.bank_sample_ratio,
            iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_iterations=args.warmup, seed=args.seed, checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every, mixed_precision=args.mixed_precision, num_workers=args.num_workers)
    run = train_seg(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                    stop_after=args.stop_after)
    metrics = run / "metrics.json"
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch: one report, from rank 0
        return
    if metrics.is_file():
        print(f"trained {run}; {cfg.val_split}: {group_summary(json.loads(metrics.read_text()))}")
    else:
        print(f"trained {run}")


def _cmd_eval_seg(args) -> None:
    from downstream.train_seg import eval_seg, group_summary

    scores = eval_seg(args.run, args.features, args.masks, split=args.split, out=args.out,
                      mask_size=args.mask_size, batch_size=args.batch_size, progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"{scores['images']} images: {group_summary(scores)}  (wrote {scores['out']}/metrics.json)")


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
    p = zoo.add_parser("report", help="loss curve, sample grid and quality numbers of a mini run (docs/)")
    p.add_argument("run", help="the train-mini run folder (for losses.csv)")
    p.add_argument("--model", default="mini", help="the pipeline to sample (default: the shipped mini)")
    p.add_argument("--out", default="docs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_zoo_report)

    p = sub.add_parser("layers", help="hookable UNet modules with their output shapes, and the presets")
    p.add_argument("--model", default="mini")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: native)")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("extract", help="extract UNet features of an image folder into a feature store")
    p.add_argument("images", nargs="?", help="image folder (recursive), glob, or imagefolder")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--config", help="repeat a run: its manifest.json (or a config JSON)")
    p.add_argument("--model", default="mini")
    p.add_argument("--layer", action="append", help="module name or preset (dift, gdf-legacy, hyperfeatures); repeat")
    p.add_argument("--t", type=int, action="append", help="timestep; repeat for several (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensemble", type=int, default=1, help="noise draws averaged per image and timestep")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--technique", action="append", metavar="SPEC",
                   help="generation technique for every variant, e.g. controlnet:canny,scale=1.0 lora:DIR "
                        "prompt:fine denoise-from:60 cfg:7.5; repeat (`difffeat techniques` lists them)")
    p.add_argument("--variant", action="append", metavar="NAME=SPEC[+SPEC…]",
                   help="a named variant (its layers are stored as NAME/LAYER); repeat")
    p.add_argument("--variants", metavar="FILE", help="variants file (YAML/JSON), e.g. from `difffeat gate --emit`")
    p.add_argument("--prompt", default="", help="prompt for every image (or the fallback of --prompt-from)")
    p.add_argument("--prompt-from", default="fixed", choices=["fixed", "sidecar", "csv", "label"],
                   help="sidecar: <image>.txt; csv: --caption-column of --captions-csv; label: --label-template")
    p.add_argument("--captions-csv",
                   help="CSV with file_name and caption/label columns (default: each image's own metadata row)")
    p.add_argument("--caption-column", default="fine_caption")
    p.add_argument("--label-template", default="a photo of a {label}")
    p.add_argument("--clean", action="store_true", help="no noise: the UNet sees the clean latent at t")
    p.add_argument("--posterior", default="mean", choices=["mean", "sample"])
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images to this (default: native)")
    p.add_argument("--resize", default="center-crop", choices=["center-crop", "pad", "stretch"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--fp16-store", action="store_true", help="store features as float16")
    p.add_argument("--concat", action="store_true", help="resize all layers to one size and concatenate")
    p.add_argument("--concat-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--capture", default="output", choices=["output", "input"])
    p.add_argument("--attention", action="append", help="attention module whose cross-attention maps to keep")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("inspect", help="summarise a feature store")
    p.add_argument("store")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("viz", help="PCA-to-RGB image of one layer of a feature store (PNG)")
    p.add_argument("store")
    p.add_argument("--layer")
    p.add_argument("--keys", nargs="*")
    p.add_argument("--n", type=int, default=8, help="first N images when --keys is not given")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_viz)

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

    p = sub.add_parser("train-seg", help="train a segmentation head on stored features (CE or AUCSeg)")
    p.add_argument("--features", action="append", help="feature store; repeat for several variants")
    p.add_argument("--masks", help="mask root: Shapes-LT / imagefolder root, or a folder of masks")
    p.add_argument("--classes", help="classes.json, a names file or a,b,c (default: MASKS/classes.json)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="repeat a run: its config.json")
    p.add_argument("--split", help="train on keys under this folder (e.g. train)")
    p.add_argument("--val-split", help="evaluate on keys under this folder (e.g. val)")
    p.add_argument("--layer", action="append", help="use only these layers; repeat")
    p.add_argument("--mask-size", default="resize", choices=["resize", "refuse"],
                   help="a mask whose size differs from the features' source images: resize (nearest) or refuse")
    p.add_argument("--head", default="conv", choices=["mlp", "conv"])
    p.add_argument("--variants", default="concat", choices=["concat", "weighted"],
                   help="several stores: concatenate, or a learned softmax-weighted sum")
    p.add_argument("--ensemble", type=int, default=10, help="members of the pixel MLP ensemble")
    p.add_argument("--hidden", type=int, default=128, help="width of the conv head")
    p.add_argument("--loss", default="ce", choices=["ce", "aucseg"])
    p.add_argument("--auc-weight", type=float, default=0.5, help="λ in CE + λ·AUC (0.5 = AUCSeg's w_auc 1)")
    p.add_argument("--margin", type=float, default=1.0, help="margin of the square AUC surrogate")
    p.add_argument("--class-weights", default="none", choices=["none", "inverse", "sqrt-inverse"])
    p.add_argument("--memory-bank", action="store_true", help="feature-space T-Memory Bank on tail classes")
    p.add_argument("--bank-capacity", type=int, default=5)
    p.add_argument("--bank-sample-ratio", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=0, help="validate every N iterations (0: at the end)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--stop-after", type=int, help="stop after N iterations of this call (--resume goes on)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.set_defaults(func=_cmd_train_seg)

    p = sub.add_parser("eval-seg", help="mIoU (overall, head, middle, tail) of a train-seg run on features and masks")
    p.add_argument("--run", required=True, help="train-seg run folder")
    p.add_argument("--features", action="append", required=True, help="feature store(s), as in training")
    p.add_argument("--masks", required=True)
    p.add_argument("--split", help="evaluate keys under this folder (e.g. test)")
    p.add_argument("--out", help="where to write metrics.json and confusion.png (default RUN/eval-SPLIT)")
    p.add_argument("--mask-size", choices=["resize", "refuse"], help="default: as in training")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=_cmd_eval_seg)

    for module in EXTENSION_COMMANDS:  # the other layers' commands; each module imports only argparse at load
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional image processors difffeat never uses; keep the CLI quiet
    # about them (an explicit TRANSFORMERS_VERBOSITY still wins).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            import diffusers

            diffusers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
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
