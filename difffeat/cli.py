"""The `difffeat` command line. Sub-commands import their heavy dependencies only when they run.

A mistake the user can fix (a `UserError`) prints one line and exits with status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from difffeat.errors import UserError
from difffeat.extraction.runner import ExtractRunConfig
from difffeat.spine.config_cli import add_config_arguments, flag_of
from difffeat.spine.run import ConfigError

# Other packages add sub-commands by declaring `add_commands(subparsers)` in this entry-point group (pyproject.toml);
# difffeat collects them without naming them, so dependencies point from those packages to difffeat only.
COMMAND_GROUP = "difffeat.commands"


def _cmd_data_synth(args) -> None:
    from difffeat.spine.run import check_seed
    from difffeat.utils.progress import Stopwatch

    check_seed(args.seed)  # before the set's folder is made
    watch = Stopwatch()
    if args.splits is not None and (args.task == "corr" or args.layout is not None):
        raise UserError("--splits is for the plain Shapes-LT set (no --layout, --task seg)")
    given_n, args.n = args.n, 1000 if args.n is None else args.n
    if args.task == "corr":
        from difffeat.data.synth_corr import synthesize_corr

        if args.layout not in (None, "spair"):
            raise UserError(f"--layout {args.layout} is a segmentation layout; --task corr writes the spair layout")
        if args.imbalance is not None:
            raise UserError("--imbalance is for --task seg (the correspondence world cycles through its categories)")
        out = synthesize_corr(args.out, n=args.n, seed=args.seed, sizes=args.sizes or "native",
                              overwrite=args.overwrite, progress=not args.quiet)
        classes = json.loads((out / "classes.json").read_text())
        print(f"wrote the Shapes-LT correspondence world ({args.n} pairs, {sum(classes['images'].values())} images, "
              f"sizes {classes['config']['sizes']}) to {out} in the spair layout (pairs {classes['pairs']})")
        print(watch.finish_line(f"data synth --task corr: {args.n} pairs to {out}", count=args.n, unit="pairs"))
        return
    if args.layout == "spair":
        raise UserError("--layout spair holds keypoint pairs: use --task corr")
    imbalance = 100.0 if args.imbalance is None else args.imbalance
    if args.layout is None:
        from difffeat.data.shapes_lt import synthesize

        if args.sizes is not None:
            raise UserError("--sizes needs --layout (a plain Shapes-LT set is 64×64)")
        n = None if args.splits is not None and given_n is None else args.n
        out = synthesize(args.out, n=n, seed=args.seed, imbalance=imbalance, overwrite=args.overwrite,
                         progress=not args.quiet, splits=args.splits)
        classes = json.loads((out / "classes.json").read_text())
        n = classes["config"]["n"]
        print(f"wrote {n} Shapes-LT scenes to {out} (splits {classes['config']['splits']})")
        print(watch.finish_line(f"data synth: {n} scenes to {out}", count=n, unit="images"))
        return
    from difffeat.data.synth_layouts import synthesize_layout

    out = synthesize_layout(args.out, args.layout, n=args.n, seed=args.seed, imbalance=imbalance,
                            sizes=args.sizes, overwrite=args.overwrite, progress=not args.quiet)
    config = json.loads((out / "classes.json").read_text())["config"]
    print(f"wrote the Shapes-LT world ({args.n} scenes, sizes {config['sizes']}) to {out} in the {args.layout} "
          f"layout (world splits {config['splits']})")
    print(watch.finish_line(f"data synth --layout {args.layout}: {args.n} scenes to {out}", count=args.n,
                            unit="images"))


def _synth_layouts() -> list[str]:
    from difffeat.data.synth_layouts import LAYOUT_WRITERS

    return list(LAYOUT_WRITERS)


def _cmd_zoo_list(args) -> None:
    from difffeat.zoo import MODELS

    for name in MODELS:
        print(name)


def _cmd_zoo_report(args) -> None:
    from difffeat.utils.progress import Stopwatch
    from difffeat.zoo.report import write_mini_report

    watch = Stopwatch()
    report = write_mini_report(args.run, args.model, args.out, seed=args.seed, progress=not args.quiet)
    print(json.dumps(report, indent=1))
    # On stderr: stdout is the JSON report, which a script may read as a whole.
    print(watch.finish_line(f"zoo report: mini_loss.png, mini_samples.png/.txt and mini_quality.json in {args.out}"),
          file=sys.stderr)


def _cmd_sample(args) -> None:
    from difffeat.utils.progress import Stopwatch
    from difffeat.zoo.sampling import sample_to_folder

    watch = Stopwatch()
    prompts = list(args.prompts)
    if args.captions:
        from difffeat.zoo.sampling import read_captions

        prompts += read_captions(args.captions, args.column, args.n)
    if not prompts:
        raise UserError("give at least one prompt, or --captions metadata.csv")
    out = sample_to_folder(prompts, args.out, model=args.model, steps=args.steps, guidance=args.guidance,
                           seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
    print(f"wrote {len(prompts)} samples and grid.png to {out}")
    print(watch.finish_line(f"sample: {len(prompts)} images and grid.png to {out}", count=len(prompts), unit="images"))


def _cmd_layers(args) -> None:
    from difffeat.models.layers import LAYER_PRESETS, list_layers, resolve_layers
    from difffeat.zoo import load_pipeline

    pipe = load_pipeline(args.model)
    size = tuple(args.size) if args.size else (None, None)
    for name, shape in list_layers(pipe, *size):
        print(f"{name}\t{'×'.join(map(str, shape))}")
    for preset in LAYER_PRESETS:
        try:
            print(f"# preset {preset}: {' '.join(resolve_layers(pipe, [preset], *size))}")
        except UserError:  # a preset of another architecture (UNet presets on a transformer, and back)
            continue


def _extract_config(args):
    from difffeat.extraction.runner import ExtractRunConfig
    from difffeat.spine.config_cli import config_from_args

    if args.config:  # a manifest.json or a bare config; only the image source and the output may change
        cfg = ExtractRunConfig.from_run(args.config, out=args.out)  # another command's config: one line naming it
        if args.images:
            cfg.images = args.images
        return _checked_techniques(cfg)
    if not args.images:
        raise UserError("give an image folder, glob or dataset (or --config FILE)")
    # Three flags do not map one-to-one on a field, so they are translated here: --clean switches noise off,
    # --fp16-store names a storage dtype, and variants come from --variant NAME=SPEC… and a --variants file.
    return _checked_techniques(config_from_args(ExtractRunConfig, args, noise=not args.clean,
                                                store_dtype="float16" if args.fp16_store else "float32",
                                                variants=_variants(args)))


def _checked_techniques(cfg):
    """`cfg` once its technique specs parse (before the model loads), each technique given once."""
    if not cfg.techniques:
        return cfg
    from difffeat.extraction.conditioning import technique_provider

    provider, seen = technique_provider(), set()
    for spec in cfg.techniques:
        try:
            canonical = provider.canonical_spec(spec)
        except UserError as e:
            raise ConfigError("techniques", str(e)) from None
        if canonical in seen:
            raise ConfigError("techniques", f"{canonical} is given twice; give each technique once")
        seen.add(canonical)
    return cfg


def _variants(args) -> dict[str, list[str]]:
    from difffeat.extraction.conditioning import variants_given

    return variants_given(args.variants, args.variant or [])


def _cmd_extract(args) -> None:
    from difffeat.extraction.runner import run_extraction
    from difffeat.utils.progress import Stopwatch, human_bytes

    cfg = _extract_config(args)
    out = Path(cfg.out)
    new_folder = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    watch = Stopwatch()  # model loading included: the line says how long the command took
    report = run_extraction(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    if report["world_size"] == 1 and new_folder and report["failed"] and not report["extracted"] \
            and not report["already_done"]:
        _remove_new_store(out)  # every input was bad: an empty store would only look like a result
        first = report["failed"][0]
        raise UserError(f"{cfg.images}: none of the {len(report['failed'])} input files could be extracted (first: "
                        f"{first['key']}: {first['reason']}); no store was written to {out}")
    if report["rank"] == 0:
        failed = report["failed"]
        speed = report["images_per_second"]
        print(f"extracted {report['extracted']} images to {args.out}"
              + (f" ({speed:.1f} img/s per process, batch {report['batch_size']}" if speed else "")
              + (f", peak memory {human_bytes(report['peak_memory_bytes'])})" if speed else "")
              + (f"; {report['already_done']} already done" if report["already_done"] else "")
              + (f"; skipped {len(failed)} (see {args.out}/report.json)" if failed else ""))
        for f in failed[:10]:
            print(f"  skipped {f['key']}: {f['reason']}", file=sys.stderr)
        print(watch.finish_line(f"extract: {report['extracted']} images to {args.out} (report.json, shards/)",
                                count=report["extracted"], unit="images"))


def _remove_new_store(out: Path) -> None:
    """Remove what this run wrote into `out`, a folder that was new or empty before it (so all of it is the run's)."""
    import shutil

    for p in list(out.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    try:
        out.rmdir()
    except OSError:
        pass


def _cmd_inspect(args) -> None:
    from difffeat.store.feature_store import FeatureStore, summarize
    from difffeat.utils.progress import Stopwatch

    watch = Stopwatch()
    store = FeatureStore(args.store)
    print(summarize(store, verify=args.verify, progress=not args.quiet))
    if args.verify:  # reading every shard takes a while on a big store: say how long and how fast
        print(watch.finish_line(f"inspect --verify: {len(store)} images of {args.store} checked", count=len(store),
                                unit="images"), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difffeat", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate the Shapes-LT data set (or its correspondence world)")
    p.add_argument("out", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--task", choices=("seg", "corr"), default="seg",
                   help="seg: scenes with masks (default); corr: image pairs with keypoints in the SPair-71k layout")
    p.add_argument("--n", type=int, default=None,
                   help="images in all (default 1000: 80/10/10 train/val/test); with --task corr: pairs in all "
                        "(trn/val/test)")
    p.add_argument("--splits", type=int, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="each split's size instead of 80/10/10 (plain Shapes-LT only): e.g. a test split large "
                        "enough that every tail class appears in it; scene i of a split is the same for any sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance", type=float, default=None, help="head/tail image-label ratio R (default 100)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--layout", choices=[*_synth_layouts(), "spair"], default=None,
                   help="write the Shapes-LT world in this real data set's native layout and label encoding "
                        "(default: the plain Shapes-LT set; spair with --task corr)")
    p.add_argument("--sizes", choices=("mixed", "square", "native"), default=None,
                   help="image sizes with --layout (default mixed; square for ddpm-seg; native = 64×64) or "
                        "--task corr (default native)")
    p.set_defaults(func=_cmd_data_synth)

    zoo = sub.add_parser("zoo", help="built-in models").add_subparsers(dest="zoo_command", required=True)
    zoo.add_parser("list", help="registered model names").set_defaults(func=_cmd_zoo_list)
    p = zoo.add_parser("report", help="loss curve, sample grid and quality numbers of a mini run (docs/)")
    p.add_argument("run", help="the train-mini run folder (for losses.csv)")
    p.add_argument("--model", default="mini", help="the pipeline to sample (default: the shipped mini)")
    p.add_argument("--out", default="docs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_zoo_report)
    from difffeat.zoo.commands import add_zoo_commands

    add_zoo_commands(zoo)  # train-mini, eval-mini, train-mini-dit, eval-mini-dit

    p = sub.add_parser("layers", help="hookable UNet modules with their output shapes, and the presets")
    p.add_argument("--model", default="mini")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: native)")
    p.set_defaults(func=_cmd_layers, _config_flags={"resolution": "--size"})  # the library names it `resolution`

    p = sub.add_parser("extract", help="extract UNet features of an image folder into a feature store")
    add_config_arguments(p, ExtractRunConfig, positional=["images"], required=["out"])
    p.add_argument("--config", help="repeat a run: its manifest.json (or a config JSON)")
    p.add_argument("--variant", action="append", metavar="NAME=SPEC[+SPEC…]",
                   help="a named variant (its layers are stored as NAME/LAYER); repeat")
    p.add_argument("--variants", metavar="FILE", help="variants file (YAML/JSON), e.g. from `difffeat gate --emit`")
    p.add_argument("--clean", action="store_true", help="no noise: the UNet sees the clean latent at t")
    p.add_argument("--fp16-store", action="store_true", help="store features as float16")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("inspect", help="summarise a feature store")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="read every shard and check it against its checksum")
    p.set_defaults(func=_cmd_inspect)

    from difffeat.report.build import add_report_command
    from difffeat.report.viz import add_viz_command

    add_viz_command(sub)  # the comparison picture of a store
    add_report_command(sub)  # one HTML page for GATE runs, stores and head runs
    from difffeat.extraction.bench import add_bench_command
    from difffeat.store.merge import add_store_commands

    add_bench_command(sub)  # throughput, memory and time split against baselines
    add_store_commands(sub)  # store merge, store parquet

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
    p.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in --out")
    p.set_defaults(func=_cmd_sample)

    add_package_commands(sub)
    return parser


def add_package_commands(sub) -> None:
    """The sub-commands of every installed package that declares them in `COMMAND_GROUP` (each such module
    imports only the standard library at load, so the parser builds without torch)."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            add_commands = ep.load()
        except ModuleNotFoundError as e:
            # Install metadata older than the code (an editable install made before a module moved) names a
            # module that is gone: say which and how to refresh it, and keep the other commands working.
            if e.name is None or not (ep.module == e.name or ep.module.startswith(e.name + ".")):
                raise
            print(f"difffeat: warning: the {ep.name!r} commands are missing: no module {ep.module} "
                  f"(reinstall difffeat: pip install -e .)", file=sys.stderr)
            continue
        add_commands(sub)


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
        with warnings.catch_warnings():
            # One line per warning of ours, unless something records warnings already (pytest, a caller's
            # catch_warnings(record=True)): that keeps them.
            if _warnings_shown_plainly():
                warnings.showwarning = _show_warning
            args.func(args)
    except ConfigError as e:  # the library names the config field; the command line shows its flag
        print(f"difffeat: error: {flag_of(args, e.field)}: {e.reason}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"difffeat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difffeat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `difffeat inspect … | head`: the reader has all it wants
        _quiet_stdout()
        return 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    return 0


_OWN_CODE = Path(__file__).resolve().parent.parent  # difffeat/, downstream/, gate/, pipelines/ live here
_OWN_PACKAGES = {"difffeat", "downstream", "gate", "pipelines"}
_DEFAULT_SHOW = warnings.showwarning


def _warnings_shown_plainly() -> bool:
    """Whether warnings go to Python's own display (no recorder such as pytest's or `catch_warnings(record=True)`,
    which swap the display function or the message sink)."""
    sink = getattr(warnings, "_showwarnmsg_impl", None)
    return warnings.showwarning is _DEFAULT_SHOW and getattr(sink, "__module__", "warnings") == "warnings"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The project's own warnings as one line, the way the CLI writes errors; others (torch, diffusers) as Python
    shows them."""
    try:
        ours = Path(filename).resolve().relative_to(_OWN_CODE).parts[0] in _OWN_PACKAGES
    except (OSError, ValueError, IndexError):
        ours = False
    if ours and issubclass(category, UserWarning):
        from difffeat.extraction.fastpath import warn_line

        warn_line(message, file)
    else:
        _DEFAULT_SHOW(message, category, filename, lineno, file, line)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
