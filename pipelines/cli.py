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
    from pipelines.lora_train import LoraTrainConfig, train_lora

    cfg = LoraTrainConfig(images=args.images, out=args.out, model=args.model, rank=args.rank, alpha=args.alpha,
                          unet_lr=args.unet_lr, text_lr=args.text_lr, epochs=args.epochs, repeats=args.repeats,
                          batch_size=args.batch_size, max_images=args.max_images, seed=args.seed, steps=args.steps)
    out = train_lora(cfg, progress=not args.quiet, overwrite=args.overwrite)
    print(f"LoRA written to {out} (use it as --technique lora:{out})")


def _cmd_controlnet_train(args) -> None:
    from pipelines.train_controlnet import ControlNetTrainConfig, train_controlnet

    cfg = ControlNetTrainConfig(model=args.model, seed=args.seed, n_train=args.n_train, steps=args.steps,
                                lr=args.lr, batch_size=args.batch_size, threads=args.threads)
    out = train_controlnet(args.run, args.out, cfg)
    print(f"ControlNet written to {out} (use it as --technique controlnet:{out})")


def add_commands(sub) -> None:
    p = sub.add_parser("techniques", help="the generation techniques and their parameters (spec strings)")
    p.set_defaults(func=_cmd_techniques)

    lora = sub.add_parser("lora", help="LoRA adapters").add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("train", help="train a LoRA on a few target images (the content-shift paper's recipe)")
    p.add_argument("images", help="image folder (captions: metadata.csv columns and/or sidecar .txt files)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    p.add_argument("--model", default="mini")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--unet-lr", type=float, default=1e-4)
    p.add_argument("--text-lr", type=float, default=5e-5, help="0 trains the UNet only")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=10, help="passes over each (image, caption) per epoch")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: from epochs and repeats)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a LoRA run of another config in --out")
    p.set_defaults(func=_cmd_lora_train)

    cn = sub.add_parser("controlnet", help="ControlNets").add_subparsers(dest="controlnet_command", required=True)
    p = cn.add_parser("train", help="train a canny ControlNet for a model on Shapes-LT (the shipped mini one's recipe)")
    p.add_argument("run", help="run folder (checkpoints, losses.csv; resumable)")
    p.add_argument("--out", help="export folder (default RUN/controlnet)")
    p.add_argument("--model", default="mini")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=_cmd_controlnet_train)
