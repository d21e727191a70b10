"""The shipped mini-dit meets its quality bar on held-out Shapes-LT scenes (fixed seeds; issue #14 item 5).

"Mid noise" is mini's: the σ with the signal-to-noise ratio of mini's DDPM schedule at t = 500 (`bar_sigma`), since
both models share one VAE and latent scale. The numbers are reported by `difffeat zoo eval-mini-dit`
(docs/mini_dit.md, docs/mini_dit_quality.json).
"""

import math

import pytest

from difffeat import load_pipeline
from difffeat.zoo.dit_quality import bar_sigma, conditioning_velocity_mse, sigma_at_snr
from difffeat.zoo.quality import heldout_scenes


def test_sigma_at_snr_inverts_flow_matchings_signal_to_noise_ratio():
    assert sigma_at_snr(1.0) == pytest.approx(0.5)
    for sigma in (0.1, 0.5, 0.618, 0.9):
        assert sigma_at_snr(((1 - sigma) / sigma) ** 2) == pytest.approx(sigma)


def test_bar_sigma_has_minis_signal_to_noise_ratio_at_t_500(mini_pipe):
    alpha_bar = float(mini_pipe.scheduler.alphas_cumprod[500])
    sigma = bar_sigma()
    assert ((1 - sigma) / sigma) ** 2 == pytest.approx(alpha_bar / (1 - alpha_bar), rel=1e-3)
    assert 0.5 < sigma < 0.75  # noisier than σ = 0.5 (SNR 1): mini's t = 500 has SNR ≈ 0.38


@pytest.mark.slow
def test_mini_dit_uses_its_caption_at_mid_noise():
    pipe = load_pipeline("mini-dit")
    mid = bar_sigma()
    report = conditioning_velocity_mse(pipe, heldout_scenes(64, seed=0), sigmas=(0.5, mid, 0.75), seed=0)
    bar = report[str(mid)]
    assert bar["own"] <= 0.95 * bar["empty"] and bar["own"] <= 0.95 * bar["other"], bar
    for sigma, mse in report.items():  # own caption best at every level, the gap growing with the noise
        assert mse["own"] < mse["empty"] < mse["other"], (sigma, mse)
    gaps = [1 - report[str(s)]["own"] / report[str(s)]["empty"] for s in (0.5, mid, 0.75)]
    assert gaps == sorted(gaps) and all(math.isfinite(g) for g in gaps), gaps
