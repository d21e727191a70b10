"""The package rules of docs/architecture.md: the core imports no other package, the CLI starts without torch,
techniques and commands arrive by registration (entry points, one file per technique), caches die with their
pipeline."""

import ast
import gc
import os
import re
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("pipelines", "gate", "downstream")
UPPER_MODULE = re.compile(rf"^({'|'.join(UPPER)})(\.[\w.]+)?(:\w+)?$")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (nothing imported yet), run from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})


def _upward_references(path: Path, root: Path = ROOT) -> list[str]:
    """Imports of pipelines / gate / downstream in a module: import statements (also inside functions),
    `importlib.import_module` / `__import__` calls, and module-path strings such as ``"gate.cli"``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UPPER]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in UPPER:
            found.append(f"from {node.module} import …")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and UPPER_MODULE.match(node.value) and "." in node.value:
            found.append(f"module name {node.value!r}")
    return [f"{path.relative_to(root)}:{item}" for item in found]


def test_the_core_imports_no_other_package():
    modules = sorted((ROOT / "difffeat").rglob("*.py"))
    assert len(modules) > 10
    offending = [ref for path in modules for ref in _upward_references(path)]
    assert offending == [], "difffeat must not import pipelines, gate or downstream:\n" + "\n".join(offending)


def test_the_reference_scan_sees_what_it_must(tmp_path):
    """The scan itself: each way of reaching upwards is caught, docstrings naming the packages are not."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Uses `pipelines.stack` in prose only."""\nimport gate.cli\n'
                   'def f():\n    from downstream.seg import cli\n    return ["pipelines.cli"]\n')
    assert [r.split(":", 1)[1] for r in _upward_references(bad, tmp_path)] == [
        "import gate.cli", "from downstream.seg import …", "module name 'pipelines.cli'"]


def test_the_cli_starts_without_torch():
    proc = _python("""
        import sys
        import difffeat.cli
        assert "torch" not in sys.modules, "import difffeat.cli imported torch"
        parser = difffeat.cli.build_parser()  # collects every package's commands
        heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        assert not heavy, f"building the parser imported {heavy}"
        commands = parser._subparsers._group_actions[0].choices
        print(" ".join(sorted(commands)))
    """)
    assert proc.returncode == 0, proc.stderr
    commands = set(proc.stdout.split())
    # The core's own commands and those other packages add through the `difffeat.commands` entry points.
    assert {"extract", "layers", "data", "techniques", "lora", "controlnet", "gate", "train-cls"} <= commands


def test_extraction_finds_the_technique_provider_without_importing_it():
    proc = _python("""
        import sys
        from difffeat import FeatureExtractor, load_pipeline
        pipe = load_pipeline("mini-random")
        assert "pipelines" not in sys.modules
        fe = FeatureExtractor(pipe, ["dift"], techniques=["controlnet:canny", "prompt:fine"])
        print(type(fe.stack).__module__, fe.stack.specs)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(maxsplit=1) == ["pipelines.stack", "['prompt:fine', 'controlnet:canny']\n"]


def test_every_file_in_the_techniques_folder_is_a_registered_technique():
    from pipelines.base import TECHNIQUES, load_techniques

    load_techniques()
    files = {f"pipelines.techniques.{p.stem}" for p in (ROOT / "pipelines" / "techniques").glob("*.py")
             if p.stem != "__init__"}
    assert {cls.__module__ for cls in TECHNIQUES.values()} >= files
    for cls in TECHNIQUES.values():
        assert cls.hooks(), f"{cls.__name__} overrides no hook"


def test_a_plugin_technique_in_a_new_module_is_picked_up(tmp_path):
    """A technique in a module of its own, installed the way a plugin package is (a distribution whose
    `pipelines.techniques` entry point names the module), is parsed, listed and composed with no list edited."""
    (tmp_path / "shout_plugin.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        from pipelines.base import Technique, register_technique


        @register_technique
        @dataclass
        class Shout(Technique):
            """Upper-case the prompt."""

            name = "shout"
            positional = "times"

            times: int = 1

            def prepare_prompt(self, prompt, fields, key=""):
                return prompt.upper() + "!" * self.times
    '''))
    info = tmp_path / "shout_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pipelines.techniques]\nshout = shout_plugin\n")
    proc = _python("""
        from pipelines import TechniqueStack, parse_technique, technique_names
        assert "shout" in technique_names()
        t = parse_technique("shout:2")
        assert t.spec == "shout:2" and parse_technique(t.spec) == t and t.hooks() == ["prepare_prompt"]
        stack = TechniqueStack(None, ["prompt:fine", "shout:3"])  # prompt techniques bind nothing
        print(stack.prompt("a red circle"))
    """, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "A RED CIRCLE, HIGH QUALITY, BEST QUALITY, HIGHLY REALISTIC, MASTERPIECE!!!"


def test_controlnet_modules_live_and_die_with_their_pipeline():
    import torch

    from difffeat import load_pipeline
    from pipelines import TechniqueStack, parse_technique

    pipe = load_pipeline("mini-random")
    technique = parse_technique("controlnet:canny")
    stack = TechniqueStack(pipe, [technique])
    again = TechniqueStack(pipe, ["controlnet:canny"])
    assert again.loaded[0] is stack.loaded[0], "stacks of one pipeline share the loaded module"
    assert not any(isinstance(v, torch.nn.Module) for v in vars(technique).values()), "no module in the config"
    net = weakref.ref(stack.loaded[0])
    del pipe, stack, again
    gc.collect()
    assert net() is None, "the ControlNet outlived its pipeline"


@pytest.mark.parametrize("argv, message", [
    (["extract", "imgs", "--out", "x", "--ensemble", "0"], "--ensemble: must be ≥ 1, got 0"),
    (["extract", "imgs", "--out", "x", "--t", "-3"], "--t: must be ≥ 0, got -3"),
    (["extract", "imgs", "--out", "x", "--size", "0", "64"], "--size: must be ≥ 1, got 0"),
])
def test_config_errors_name_the_flag(argv, message, capsys):
    from difffeat.cli import main

    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"difffeat: error: {message}"


def test_config_errors_name_the_field_in_the_library():
    from difffeat.run import ConfigError
    from difffeat.runner import ExtractRunConfig

    with pytest.raises(ConfigError, match=r"^prompt_source: must be one of fixed, sidecar, csv, label"):
        ExtractRunConfig.from_dict({"images": "a", "out": "b", "prompt_source": "captions"})
