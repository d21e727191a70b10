"""The configs of the techniques layer's training recipes (`difffeat lora train`, `difffeat controlnet train`), in a
module that imports no torch: the command line makes their flags from these fields when it starts
(`difffeat.spine.config_cli`), and the trainers (`pipelines.lora_train`, `pipelines.train_controlnet`) read them."""

from __future__ import annotations

from dataclasses import dataclass

from difffeat.spine.run import Config, ConfigError, option

CAPTION_STYLES = ("empty", "tags", "sentence")


@dataclass
class LoraTrainConfig(Config):
    """The LoRA recipe; written to the output folder's `config.json`."""

    images: str = option(help="image folder (captions: metadata.csv columns and/or sidecar .txt files)")
    out: str = option(help="folder for pytorch_lora_weights.safetensors")
    model: str = option("mini")
    rank: int = option(64, min=1)
    alpha: float = option(32.0, above=0)
    unet_lr: float = option(1e-4, above=0)
    text_lr: float = option(5e-5, min=0, help="0 trains the UNet only")
    epochs: int = option(100, min=1)
    repeats: int = option(10, min=1, help="passes over each (image, caption) per epoch")
    batch_size: int = option(8, min=1)
    max_images: int = option(30, min=1)
    seed: int = option(0, min=0)
    checkpoint_every: int = option(200, min=1)
    steps: int = option(0, min=0, help="optimizer steps (0: epochs × repeats × samples / batch size)")
    captions: list[str] = option(default_factory=lambda: list(CAPTION_STYLES), choices=CAPTION_STYLES,
                                 help="caption styles each image is seen with")
    conv: bool = option(False, help="LoCon: every module of LyCORIS's LoCon preset (convolutions, feed-forward, "
                                    "proj_in/out, time_emb_proj, text fc1/fc2 too)")
    conv_rank: int = option(32, min=1, help="rank of the 3×3 conv adapters (kohya_ss's LoCon preset: 32)")
    conv_alpha: float = option(1.0, above=0, help="alpha of the 3×3 conv adapters (kohya_ss's LoCon preset: 1)")


@dataclass
class ControlNetTrainConfig(Config):
    """The canny ControlNet's recipe; written to the run's `config.json`, and a run resumes only under the same one."""

    model: str = option("mini")
    seed: int = option(0, min=0)
    n_train: int = option(4000, min=1, help="Shapes-LT train scenes")
    steps: int = option(2500, min=0)
    lr: float = option(3e-4, above=0)
    warmup: int = option(100, min=0)
    batch_size: int = option(32, min=1)
    p_empty: float = option(0.5, min=0, max=1, help="share of captions dropped to the empty prompt")
    low: int = option(100, min=0, help="canny low threshold")
    high: int = option(200, min=0, help="canny high threshold")
    checkpoint_every: int = option(100, min=1)
    threads: int = option(0, min=0, help="torch threads (0: torch's default); does not change the weights")

    def check(self) -> None:
        if self.low > self.high:
            raise ConfigError("low", f"the canny low threshold {self.low} is above the high one {self.high}")
