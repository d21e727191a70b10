"""`MiniTrainConfig`: the mini model's training recipe (`difffeat zoo train-mini`), in a module that imports no torch,
so the command line makes its flags from these fields when it starts (`difffeat.spine.config_cli`)."""

from __future__ import annotations

from dataclasses import dataclass

from difffeat.spine.run import Config, ConfigError, option


@dataclass
class MiniTrainConfig(Config):
    """The mini model's recipe; written to the run's `config.json`, and a run resumes only under the same one."""

    seed: int = option(0, min=0)
    n_train: int = option(8000, min=1, help="Shapes-LT train scenes (made in memory from the seed)")
    imbalance: float = option(100.0, min=1)
    vae_steps: int = option(900, min=0)
    vae_lr: float = option(1e-3, above=0)
    vae_kl_weight: float = option(1e-6, min=0)
    unet_steps: int = option(4500, min=0)
    unet_lr: float = option(5e-4, above=0)
    warmup: int = option(200, min=0)
    batch_size: int = option(32, min=1)
    ema_decay: float = option(0.999, min=0, max=1)
    p_empty: float = option(0.1, min=0, max=1)
    p_coarse: float = option(0.1, min=0, max=1)
    checkpoint_every: int = option(250, min=1)
    threads: int = option(0, min=0, help="torch threads (0: torch's default); does not change the weights")

    def check(self) -> None:
        if self.p_empty + self.p_coarse > 1:
            raise ConfigError("p_coarse", f"p_empty + p_coarse must be ≤ 1, got {self.p_empty + self.p_coarse}")
