"""What defines a correspondence evaluation (`CorrEvalConfig`, eval-corr) and a live match (`MatchConfig`, match).

Each field's default, help and bounds are written once, here, with `difffeat.spine.run.option`; the CLI flags are
generated from them (`downstream.corr.cli`). This module imports no torch: the CLI reads it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from difffeat.spine.run import Config, ConfigError, option

DEFAULT_ALPHAS = (0.05, 0.1, 0.15)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class CorrEvalConfig(Config):
    """A PCK evaluation of stored features on keypoint pairs; written to OUT/config.json next to the scores."""

    features: list[str] = option(help="feature store of the pairs' images; repeat to concatenate several",
                                 metavar="DIR")
    out: str = option(help="folder for results.json, per_pair.csv, examples.png and report.html", metavar="DIR")
    data: str | None = option(None, metavar="spair:ROOT[:SPLIT]",
                              help="the keypoint pairs: a data set in SPair-71k's layout (or what `difffeat data "
                                   "synth --task corr` writes)")
    layers: list[str] | None = option(None, flag="--layer", metavar="NAME",
                                      help="match on these stored layers, concatenated (default: every layer but "
                                           "attention maps); repeat")
    variants: list[str] | None = option(None, flag="--variant", metavar="NAME",
                                        help="variant of a store made with --variant / --variants (its NAME/LAYER "
                                             "layers); repeat to concatenate several")
    alphas: list[float] = option(default_factory=lambda: list(DEFAULT_ALPHAS), flag="--alpha", metavar="A",
                                 above=0, help="PCK thresholds α (a point is correct within α · max(w, h) of the "
                                               "target box, or of the image); repeat (default 0.05 0.1 0.15)")
    soft_argmax: int = option(0, min=0, metavar="W",
                              help="window soft-argmax of radius W around the best match (GeoAware-SC uses 5–7); "
                                   "0: hard argmax (DIFT)")
    temperature: float = option(0.02, above=0, help="soft-argmax temperature on the cosine (SFNet's β)")
    working_size: list[int] | None = option(None, nargs=2, metavar=("H", "W"), min=1,
                                            help="match on an H × W grid over the extraction frame (default: each "
                                                 "target image's own pixels, as DIFT)")
    bootstrap: int = option(1000, min=0, help="bootstrap draws over pairs for the 95%% intervals (0: none)")
    seed: int = option(0, help="seed of the bootstrap and of the example pairs drawn")
    max_pairs: int | None = option(None, min=1, help="evaluate a seeded sample of at most N pairs")
    examples: int = option(6, min=0, max=64, help="pairs drawn in examples.png")
    batch_size: int = option(32, min=1, help="pairs matched at once (memory: see docs/experiments/correspondence.md)")
    device: str = option("auto", choices=DEVICES, help="auto: CUDA when present")

    def check(self) -> None:
        if not self.features:
            raise ConfigError("features", "give at least one feature store")
        if self.working_size is not None and len(self.working_size) != 2:
            raise ConfigError("working_size", f"must be [height, width], got {self.working_size!r}")
        if not self.alphas:
            raise ConfigError("alphas", "give at least one threshold")


@dataclass
class MatchConfig(Config):
    """`difffeat match`: two images' features extracted live, a grid of points (or given points) matched, drawn."""

    images: list[str] = option(help="the two images: source then target", metavar="IMG")
    out: str = option("match.png", help="the picture to write")
    model: str = option("mini")
    layers: list[str] = option(default_factory=lambda: ["dift"], flag="--layer", metavar="LAYER",
                               help="module name or preset (default dift); repeat to concatenate")
    timesteps: list[int] = option(default_factory=lambda: [50], flag="--t", metavar="T", min=0,
                                  help="timestep; repeat to concatenate several")
    points: list[str] | None = option(None, flag="--points", nargs="+", metavar="X,Y",
                                      help="source points in pixels (default: a --grid of points)")
    grid: int = option(5, min=1, max=64, help="an N × N grid of source points inside the image")
    resolution: list[int] | None = option(None, flag="--size", nargs=2, metavar=("H", "W"), min=1,
                                          help="extraction frame (default: the model's native resolution)")
    resize: str = option("stretch", choices=("center-crop", "pad", "stretch"),
                         help="how each image is brought to the frame")
    prompt: str = option("", help="prompt for both images")
    noise: bool = option(True, help="add seeded noise at t (--no-noise: the clean latent)")
    ensemble: int = option(1, min=1, help="noise draws averaged")
    seed: int = option(0)
    soft_argmax: int = option(0, min=0, metavar="W", help="window soft-argmax radius (0: hard argmax)")
    temperature: float = option(0.02, above=0, help="soft-argmax temperature")
    overwrite: bool = option(False, help="replace --out if it exists")
    device: str = option("auto", choices=DEVICES, help="auto: CUDA when present")

    def check(self) -> None:
        if len(self.images) != 2:
            raise ConfigError("images", f"give two images (source, target), got {len(self.images)}")
        if self.resolution is not None and len(self.resolution) != 2:
            raise ConfigError("resolution", f"must be [height, width], got {self.resolution!r}")
