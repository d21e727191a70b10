"""`GateConfig`: everything that defines a GATE run, in a module that imports no torch, so that `difffeat gate`'s
flags are made from it when the command line starts (`difffeat.spine.config_cli`)."""

from __future__ import annotations

from dataclasses import dataclass

from difffeat.spine.run import Config, ConfigError, option

# Each score GATE computes, and whether higher is better (the order is the `--primary` choices' order).
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "edge_f1": True, "lpips": False, "feature_score": True}
FEATURE_REFERENCES = ("technique", "plain")
CORRECTIONS = ("holm", "none")


@dataclass
class GateConfig(Config):
    """Everything that defines a GATE run; written next to its outputs (`config.json`), and a run repeats from it.

    Fields validate themselves (`validate`, raising `ConfigError` naming the field); the `difffeat gate` flags
    are made from them."""

    images: str | None = option(None, help="image folder, glob, imagefolder or hf:NAME[:SPLIT] (None: tensors "
                                           "given to `rank`)")
    candidates: dict[str, list[str]] = option(default_factory=dict, cli=False,
                                              help="name → technique specs (reference added)")
    model: str = option("mini")
    n: int | None = option(16, min=1, help="images drawn (seeded) from `images`; None (0 on the command line): all")
    seed: int = option(0, help="image draw, img2img noise, feature noise and bootstrap")
    strength: float = option(0.7, above=0, max=1, help="img2img repainting strength (diffusers semantics)")
    steps: int = option(25, min=1, help="DDIM steps of img2img; int(steps · strength) of them run")
    t: int = option(50, min=0, help="feature-extraction timestep (the feature Score's features)")
    layers: list[str] = option(default_factory=lambda: ["auto"], flag="--layer", metavar="LAYER",
                               help="feature layer or preset; repeat (default auto: dift on a UNet, dit-middle on a "
                                    "transformer)")
    primary: str = option("psnr", choices=tuple(HIGHER_IS_BETTER), help="the score the decision and the ranking use")
    prompt: str = option("", help="base prompt of every image (prompt techniques rewrite it)")
    prompt_source: str = option("fixed", choices=("fixed", "sidecar", "csv", "label"), flag="--prompt-from",
                                help="base prompts as in `difffeat extract --prompt-from`")
    caption_column: str = option("fine_caption", help="metadata column of an image's caption")
    edge_tolerance: int = option(1, min=0, help="pixels an edge may move and still match (edge F1)")
    feature_reference: str = option("technique", choices=FEATURE_REFERENCES,
                                    help="t = 0 reference features: with the candidate's techniques, or plain")
    n_boot: int = option(2000, min=100, flag="--boot", metavar="BOOT", help="bootstrap resamples")
    replicates: int = option(1, min=1, help="noise draws per image (img2img and features); an image's scores are "
                                            "their mean, and intervals resample images")
    correction: str = option("holm", choices=CORRECTIONS,
                             help="acceptance across candidates: Holm's correction of the paired bootstrap tests "
                                  "(family-wise error 1 − level), or none (each candidate's own interval)")
    level: float = option(0.95, above=0, help="confidence level of the intervals (below 1)")
    greedy: bool = option(False, help="forward selection over combinations of accepted candidates")
    probe: str | None = option(None, metavar="LABELS", help="labelled image set for the linear probe")
    probe_n: int = option(32, min=2, help="labelled images drawn for the probe (half fit, half score)")
    probe_task: str = option("auto", choices=("auto", "seg", "cls"))
    batch_size: int = option(8, min=1)
    reuse: bool = option(True, cli=False,
                         help="share VAE encodes and text embeddings across candidates (False: the benchmark baseline)")

    def check(self) -> None:
        if int(self.steps * self.strength) < 1:
            raise ConfigError("steps", f"{self.steps} steps at strength {self.strength} run no denoising step")
        if not self.level < 1:
            raise ConfigError("level", f"must be < 1, got {self.level}")
