"""Flags made from configs (issue #11 item 4): for every command whose options come from a `Config`, each flag's
parser default is the config field's own default, so a default is written once, in the config."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from difffeat.cli import build_parser


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _configs():
    from difffeat.extraction.runner import ExtractRunConfig
    from difffeat.zoo.recipe_config import MiniTrainConfig
    from gate.config import GateConfig
    from pipelines.recipe_config import ControlNetTrainConfig, LoraTrainConfig

    return [(["gate"], GateConfig), (["lora", "train"], LoraTrainConfig),
            (["controlnet", "train"], ControlNetTrainConfig), (["zoo", "train-mini"], MiniTrainConfig),
            (["extract"], ExtractRunConfig)]


@pytest.mark.parametrize("path, config", _configs(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_flag_default_is_the_config_default(path, config):
    parser = _subparser(build_parser(), path)
    by_dest = {a.dest: a for a in parser._actions}
    checked = 0
    for f in dataclasses.fields(config):
        if not f.metadata.get("cli", True):
            continue
        action = by_dest[f.name]  # every CLI field has its flag
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # no default: given
            assert action.default is None, f.name
        elif f.default_factory is not dataclasses.MISSING:  # filled from the config's factory when not given
            assert action.default is None, f.name
        else:
            assert action.default == f.default, (f.name, action.default, f.default)
        if f.metadata.get("choices"):
            assert list(action.choices) == list(f.metadata["choices"]), f.name
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("argv, config_name, expected", [
    (["gate", "imgs", "--candidates", "c.yaml", "--out", "o"], "GateConfig", {}),
    (["lora", "train", "imgs", "--out", "o"], "LoraTrainConfig", {"images": "imgs", "out": "o"}),
    (["controlnet", "train", "run"], "ControlNetTrainConfig", {}),
    (["zoo", "train-mini", "run"], "MiniTrainConfig", {}),
])
def test_no_flag_given_means_the_config_defaults(argv, config_name, expected):
    """Parsing a command line that gives no option yields exactly the config's defaults."""
    from difffeat.spine.config_cli import config_from_args

    config = {c.__name__: c for _, c in _configs()}[config_name]
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    values = {k: v for k, v in values.items() if v is not None}
    if config_name == "GateConfig":  # the images and the candidates file are the run's inputs
        values.pop("images")
        values.pop("candidates")  # the --candidates file's path, read into the config when the command runs
        cfg = config.from_dict(values)
    else:
        cfg = config_from_args(config, args)
    default = config(**expected) if expected else config()
    assert cfg.to_dict() == default.to_dict()


def test_today_s_flags_keep_their_names():
    """The flags users type today are still there under the same names (a subset check: configs may add more)."""
    parser = build_parser()
    want = {
        ("gate",): ["--model", "--strength", "--steps", "--n", "--seed", "--t", "--layer", "--primary", "--prompt",
                    "--prompt-from", "--caption-column", "--edge-tolerance", "--feature-reference", "--boot",
                    "--batch-size", "--emit", "--greedy", "--probe", "--probe-n", "--probe-task", "--report-images",
                    "--overwrite", "--candidates", "--out", "--config"],
        ("lora", "train"): ["--out", "--model", "--rank", "--alpha", "--unet-lr", "--text-lr", "--epochs",
                            "--repeats", "--steps", "--batch-size", "--max-images", "--seed", "--overwrite"],
        ("controlnet", "train"): ["--out", "--model", "--seed", "--n-train", "--steps", "--lr", "--batch-size",
                                  "--threads"],
        ("zoo", "train-mini"): ["--out", "--seed", "--n-train", "--vae-steps", "--unet-steps", "--threads"],
    }
    for path, flags in want.items():
        sub = _subparser(parser, list(path))
        have = {s for a in sub._actions for s in a.option_strings}
        assert set(flags) <= have, (path, set(flags) - have)
