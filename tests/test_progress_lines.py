"""Issue #18 item 4: every long command shows a bar with rate and ETA (not under --quiet) and ends with one summary
line (what was written where, how long, how fast, peak memory); the bar only watches, so results do not change.

Each command runs at its smallest setting (one or two steps, the random-weight models).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from difffeat.cli import main

# "<what> in 12.3 s (4.1 it/s); peak memory 812.0 MiB" (Stopwatch.finish_line; "(28.0 s/it)" below 1/s); the rate
# only when work was counted
SUMMARY = r"{what} in [\d.]+ s( \(([\d.]+ {unit}/s|[\d.]+ s/\w+)\))?; peak memory [\d.]+ [KMG]iB$"
# tqdm's "[00:01<00:02, 1.52it/s]" (or "s/it" when slow): elapsed<ETA and rate
BAR = r"{desc}: .*\[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/{unit}|{unit}/s)"


def run(argv, capsys, quiet=False):
    assert main([*(["--quiet"] if quiet else []), *argv]) == 0
    return capsys.readouterr()


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def assert_summary(text: str, what: str, unit: str = "it") -> None:
    line = last_line(text)
    assert re.match(SUMMARY.format(what=what, unit=unit), line), line


def assert_bar(err: str, desc: str, unit: str = "it", quiet: bool = False) -> None:
    found = re.search(BAR.format(desc=re.escape(desc), unit=unit), err)
    assert (found is None) if quiet else (found is not None), err[-500:]


def images(folder, n: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


# ------------------------------------------------------------------------------------------ training
def test_train_mini_bar_only_watches(tmp_path, capsys):
    from safetensors.torch import load_file

    tiny = ["--n-train", "2", "--vae-steps", "1", "--unet-steps", "1", "--batch-size", "1"]
    shown = run(["zoo", "train-mini", str(tmp_path / "a"), *tiny], capsys)
    hidden = run(["zoo", "train-mini", str(tmp_path / "b"), *tiny], capsys, quiet=True)
    for out, run_dir, quiet in ((shown, tmp_path / "a", False), (hidden, tmp_path / "b", True)):
        assert_summary(out.out, re.escape(f"train-mini: 2 steps to {run_dir} (losses.csv, checkpoints/, pipeline "
                                          f"{run_dir / 'pipeline'})"))
        assert_bar(out.err, "train-mini vae", quiet=quiet)
        assert_bar(out.err, "train-mini unet", quiet=quiet)
        assert "vae step 0 loss" in out.out  # the log lines are still printed, above the bar
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / "pipeline" / part), load_file(tmp_path / "b" / "pipeline" / part)
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_train_mini_stopped_early_still_sums_up(tmp_path, capsys):
    from difffeat.zoo.train import MiniTrainConfig, train_mini

    cfg = MiniTrainConfig(n_train=2, vae_steps=2, unet_steps=1, batch_size=1)
    assert train_mini(tmp_path / "run", cfg=cfg, stop_after=1) is None
    assert_summary(capsys.readouterr().out,
                   re.escape(f"train-mini: stopped after 1 steps to {tmp_path / 'run'} (train again to go on)"))


def test_train_mini_dit_summary_and_bar(tmp_path, capsys):
    run_dir = tmp_path / "dit"
    out = run(["zoo", "train-mini-dit", str(run_dir), "--n-train", "4", "--steps", "2", "--batch-size", "1",
               "--warmup", "1"], capsys)
    assert_summary(out.out, re.escape(f"train-mini-dit: 2 steps to {run_dir} (losses.csv, checkpoints/, pipeline "
                                      f"{run_dir / 'pipeline'})"))
    assert_bar(out.err, "train-mini-dit")


@pytest.mark.parametrize("quiet", [False, True])
def test_controlnet_train_summary_and_bar(tmp_path, capsys, quiet):
    run_dir = tmp_path / "cn"
    out = run(["controlnet", "train", str(run_dir), "--model", "mini-random", "--steps", "2", "--n-train", "2",
               "--batch-size", "1"], capsys, quiet=quiet)
    assert f"use it as --technique controlnet:{run_dir / 'controlnet'}" in out.out
    assert_summary(out.out, re.escape(f"controlnet train: 2 steps to {run_dir} (losses.csv, checkpoints/, "
                                      f"ControlNet {run_dir / 'controlnet'})"))
    assert_bar(out.err, "controlnet", quiet=quiet)


def test_lora_train_summary_and_bar(tmp_path, capsys):
    argv = ["lora", "train", str(images(tmp_path / "imgs")), "--out", str(tmp_path / "lora"), "--model",
            "mini-random", "--steps", "2"]
    out = run(argv, capsys)
    assert f"use it as --technique lora:{tmp_path / 'lora'}" in out.out
    assert_summary(out.out, re.escape(f"lora train: 2 steps on 3 images to {tmp_path / 'lora'} "
                                      "(pytorch_lora_weights.safetensors, losses.csv)"))
    assert_bar(out.err, "lora train")
    again = run(argv, capsys, quiet=True)  # a finished run: nothing to train, still one line saying so
    assert_summary(again.out, re.escape(f"lora train: {tmp_path / 'lora'} is trained already (use it as --technique "
                                        f"lora:{tmp_path / 'lora'})"))
    assert again.err == ""


# ------------------------------------------------------------------------------------------ generation
def test_sample_bar_only_watches(tmp_path, capsys):
    argv = ["sample", "a red circle", "a blue square", "--model", "mini-random", "--steps", "2"]
    shown = run([*argv, "--out", str(tmp_path / "a")], capsys)
    hidden = run([*argv, "--out", str(tmp_path / "b")], capsys, quiet=True)
    for out, folder, quiet in ((shown, tmp_path / "a", False), (hidden, tmp_path / "b", True)):
        assert_summary(out.out, re.escape(f"sample: 2 images and grid.png to {folder}"), unit="images")
        assert_bar(out.err, "sample", unit="step", quiet=quiet)
    for name in ("0000.png", "0001.png"):
        a, b = (np.asarray(Image.open(tmp_path / folder / name)) for folder in ("a", "b"))
        assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------ quality checks
@pytest.fixture(scope="module")
def random_pipe():
    from difffeat import load_pipeline

    return load_pipeline("mini-random")


def watching_bar():
    from tqdm import tqdm

    return tqdm(total=None, file=io.StringIO(), disable=False)


def test_eval_mini_bar_counts_the_steps_it_plans(random_pipe):
    """evaluate_quality sizes its bar from these counts; each check moves the bar by exactly that much and gives the
    same numbers with or without it."""
    from difffeat.zoo.quality import colour_accuracy, conditioning_mse, heldout_scenes, img2img_psnr, img2img_steps

    scenes = heldout_scenes(2, seed=0)
    bar = watching_bar()
    assert conditioning_mse(random_pipe, scenes, bar=bar) == conditioning_mse(random_pipe, scenes)
    assert bar.n == 2 * 2  # timesteps × draws
    bar = watching_bar()
    watched = colour_accuracy(random_pipe, scenes, steps=3, bar=bar)
    assert bar.n == 3
    plain = colour_accuracy(random_pipe, scenes, steps=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(watched["images"], plain["images"]))
    bar = watching_bar()
    assert img2img_psnr(random_pipe, scenes, 0.5, steps=6, bar=bar) == img2img_psnr(random_pipe, scenes, 0.5, steps=6)
    assert bar.n == img2img_steps(6, 0.5) == 3


def test_eval_mini_prints_json_then_the_summary_on_stderr(monkeypatch, tmp_path, capsys):
    import difffeat.zoo.quality as quality

    seen = {}

    def fake(model, n, seed, progress):
        seen.update(progress=progress)
        return {"model": model, "n_heldout": n}

    monkeypatch.setattr(quality, "evaluate_quality", fake)
    for quiet in (False, True):
        report = tmp_path / f"q-{quiet}.json"
        out = run(["zoo", "eval-mini", "--model", "mini-random", "--n", "2", "--json", str(report)],
                  capsys, quiet=quiet)
        assert json.loads(out.out) == {"model": "mini-random", "n_heldout": 2}  # stdout stays one JSON document
        what = f"eval-mini: mini-random on 2 held-out scenes, report in {report}"
        assert_summary(out.err, re.escape(what), unit="images")
        assert seen["progress"] is not quiet


def test_eval_mini_dit_summary_and_bar(capsys):
    out = run(["zoo", "eval-mini-dit", "--model", "mini-dit-random", "--n", "2"], capsys)
    assert json.loads(out.out)["n_heldout"] == 2
    assert_summary(out.err, re.escape("eval-mini-dit: mini-dit-random on 2 held-out scenes"), unit="images")
    assert_bar(out.err, "eval-mini-dit", unit="step")
    assert "eval-mini-dit: 100%" in out.err  # the planned total is what the checks run


# ------------------------------------------------------------------------------------------ GATE sweep
def test_sweep_ends_with_its_summary(shapes_dir, tmp_path, capsys):
    out_dir = tmp_path / "sweep"
    out = run(["sweep", str(shapes_dir / "train"), "--labels", str(shapes_dir), "--out", str(out_dir), "--layers",
               "dift", "--t", "50", "--n", "4", "--min-images", "4", "--boot", "100", "--batch-size", "4"], capsys,
              quiet=True)
    assert_summary(out.out, re.escape(f"sweep: 1 configuration(s) on 4 images, report in {out_dir}"), unit="images")
    assert out.err == ""
