"""Sub-commands of the techniques layer: `difffeat techniques`, `difffeat lora train`, `difffeat controlnet train`.

Collected by difffeat's CLI through the entry point ``difffeat.commands: pipelines`` (`add_commands`); heavy imports
happen inside the commands.
"""

from __future__ import annotations


def _cmd_techniques(args) -> None:
    from pipelines.base import TECHNIQUES, describe, technique_names

    for name in technique_names():
        cls = TECHNIQUES[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{describe(cls):55s} [{', '.join(cls.hooks())}] {doc}")


def _cmd_lora_train(args) -> None:
    from difffeat.spine.config_cli import config_from_args
    from pipelines.lora_train import train_lora
    from pipelines.recipe_config import LoraTrainConfig

    # The recipe prints where the LoRA went, how to use it, and the summary line.
    train_lora(config_from_args(LoraTrainConfig, args), progress=not args.quiet, overwrite=args.overwrite)


def _cmd_controlnet_train(args) -> None:
    from difffeat.spine.config_cli import config_from_args
    from pipelines.recipe_config import ControlNetTrainConfig
    from pipelines.train_controlnet import train_controlnet

    # The recipe prints where the ControlNet went, how to use it, and the summary line.
    train_controlnet(args.run, args.out, config_from_args(ControlNetTrainConfig, args), progress=not args.quiet)


def add_commands(sub) -> None:
    """Add `techniques`, `lora train` and `controlnet train`; the recipes' flags are made from their configs."""
    from difffeat.spine.config_cli import add_config_arguments
    from pipelines.recipe_config import ControlNetTrainConfig, LoraTrainConfig

    p = sub.add_parser("techniques", help="the generation techniques and their parameters (spec strings)")
    p.set_defaults(func=_cmd_techniques)

    lora = sub.add_parser("lora", help="LoRA adapters").add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("train", help="train a LoRA on a few target images (the content-shift paper's recipe)")
    add_config_arguments(p, LoraTrainConfig, positional=["images"], required=["images", "out"])
    p.add_argument("--overwrite", action="store_true", help="replace a LoRA run of another config in --out")
    p.set_defaults(func=_cmd_lora_train)

    cn = sub.add_parser("controlnet", help="ControlNets").add_subparsers(dest="controlnet_command", required=True)
    p = cn.add_parser("train", help="train a canny ControlNet for a model on Shapes-LT (the shipped mini one's recipe)")
    p.add_argument("run", help="run folder (checkpoints, losses.csv; resumable)")
    p.add_argument("--out", help="export folder (default RUN/controlnet)")
    add_config_arguments(p, ControlNetTrainConfig)
    p.set_defaults(func=_cmd_controlnet_train)
