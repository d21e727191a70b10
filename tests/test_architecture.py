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
UPPER = ("pipelines", "gate", "downstream", "apps")
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


PACKAGES = ("difffeat", "pipelines", "gate", "downstream", "apps")


def _module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module → the project modules it imports: every import statement, also inside functions (a lazy import is
    still a dependency), but not those under ``if TYPE_CHECKING:`` (annotations only). ``from P import M`` counts
    as importing P.M when M is a module, else P."""
    modules = _module_files(root, packages)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                       for child in node.body for n in ast.walk(child)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {o for t in targets if t.split(".")[0] in packages and (o := owner(t)) and o != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = _import_graph()
    assert len(graph) > 100
    circles = _circles(graph)
    assert circles == [], "modules that import each other (in a circle):\n" + "\n".join(
        " → ".join(c) for c in circles)


# The core's layers, lowest first (docs/architecture.md, "The core, one folder per layer"): a sub-package imports only
# those before it. The top-level modules: `errors` and `lazy` are below every layer, the package face (`difffeat`,
# which loads the zoo) just above the zoo, `cli` and `__main__` above every layer.
CORE_LAYERS = ("utils", "spine", "data", "models", "zoo", "store", "extraction", "report")
CORE_TOP = {"errors": -1, "lazy": -1, "": CORE_LAYERS.index("zoo") + 0.5, "cli": len(CORE_LAYERS),
            "__main__": len(CORE_LAYERS) + 1}


def _core_layer(module: str) -> float | None:
    parts = module.split(".")
    if parts[0] != "difffeat":
        return None
    name = parts[1] if len(parts) > 1 else ""
    return CORE_LAYERS.index(name) if name in CORE_LAYERS else CORE_TOP.get(name)


def _climbing_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports inside the core from a layer to the same or a higher one in another sub-package (same-package
    imports are the circle test's business)."""
    found = []
    for module, targets in sorted(graph.items()):
        low = _core_layer(module)
        if low is None:
            continue
        for target in sorted(targets):
            high = _core_layer(target)
            if high is not None and high >= low and module.split(".")[:2] != target.split(".")[:2]:
                found.append(f"{module} → {target}")
    return found


def test_the_core_layers_import_downwards_only():
    graph = _import_graph()
    unknown = sorted({m.split(".")[1] for m in graph if m.startswith("difffeat.") and _core_layer(m) is None})
    assert unknown == [], f"core sub-packages or modules without a layer in CORE_LAYERS: {unknown}"
    climbing = _climbing_imports(graph)
    assert climbing == [], "imports that climb the core's layers (docs/architecture.md):\n" + "\n".join(climbing)


def test_the_layer_scan_sees_a_climbing_import():
    graph = {"difffeat.store.feature_store": {"difffeat.extraction.runner", "difffeat.data.geometry"},
             "difffeat.data.images": {"difffeat.spine.run"}, "difffeat.models.maps": {"difffeat.models.layers"}}
    assert _climbing_imports(graph) == ["difffeat.store.feature_store → difffeat.extraction.runner"]


def test_the_architecture_page_names_every_core_sub_package_and_no_other():
    """docs/architecture.md draws the layers this test enforces: its table names each sub-package, in order."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = re.findall(r"^\| `difffeat/(\w+)/` \|", page, flags=re.M)
    assert tuple(named) == CORE_LAYERS
    on_disk = {p.parent.name for p in (ROOT / "difffeat").glob("*/__init__.py")}
    assert on_disk == set(CORE_LAYERS)
    top = {p.stem for p in (ROOT / "difffeat").glob("*.py")} - {"__init__"}
    assert top == {name for name in CORE_TOP if name} | {"__main__"}
    chain = " ──► ".join(["cli", *reversed(CORE_LAYERS)])
    assert chain in page, chain


def test_the_circle_scan_sees_a_lazy_circle_and_ignores_typing_imports(tmp_path):
    pkg = tmp_path / "difffeat"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from difffeat.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from difffeat import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from difffeat.d import X\n")
    (pkg / "d.py").write_text("from .c import TYPE_CHECKING\n")
    graph = _import_graph(tmp_path, ("difffeat",))
    assert graph["difffeat.b"] == {"difffeat.a"} and graph["difffeat.c"] == set()
    assert graph["difffeat.d"] == {"difffeat.c"}  # a relative import resolved
    assert _circles(graph) == [["difffeat.a", "difffeat.b"]]


FAMILY_NAMES = {"unet", "sd3", "pixart", "flux"}
BACKBONE_HOME = ("difffeat/models/backbones/", "difffeat/models/dit.py")  # the classes, and dit.py's functions of old


def _family_branches(path: Path, root: Path = ROOT) -> list[str]:
    """Branches on the denoiser family in a module: `is_transformer(...)` / `family(...)` calls, `isinstance` against
    a backbone class, and comparisons with a family's name ("sd3" == …, … in ("flux", …))."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("is_transformer", "family"):
                found.append(f"line {node.lineno}: {name}(…)")
            elif name == "isinstance" and len(node.args) == 2 and "Backbone" in ast.unparse(node.args[1]):
                found.append(f"line {node.lineno}: isinstance(…, {ast.unparse(node.args[1])})")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            sides += [e for side in sides if isinstance(side, (ast.Tuple, ast.List, ast.Set)) for e in side.elts]
            literals = {c.value for c in sides if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if literals & FAMILY_NAMES:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return [f"{path.relative_to(root)}:{item}" for item in found]


def test_no_family_branch_outside_the_backbone_classes():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
             if not p.relative_to(ROOT).as_posix().startswith(BACKBONE_HOME)]
    found = [b for p in files for b in _family_branches(p)]
    assert found == [], "the denoiser family is the backbone's business (difffeat.models.backbones):\n" + \
        "\n".join(found)


def test_the_family_scan_sees_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(pipe, b):\n    if dit.is_transformer(pipe):\n        return 1\n'
                   '    if family(pipe.transformer) == "flux":\n        return 2\n'
                   '    return isinstance(b, UNetBackbone) or b.name in ("sd3", "x")\n')
    assert [b.split(":", 2)[1] for b in _family_branches(bad, tmp_path)] == [
        "line 2", "line 4", "line 4", "line 6", "line 6"]


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


def test_extraction_without_techniques_is_the_cores_own():
    """No technique: the core's PlainStack makes the denoiser call; no technique provider is loaded."""
    proc = _python("""
        import sys
        import torch
        from difffeat import FeatureExtractor, load_pipeline
        pipe = load_pipeline("mini-random")
        fe = FeatureExtractor(pipe, ["up_blocks.1"])
        out = fe.extract(torch.rand(2, 3, 64, 64), keys=["a", "b"])
        assert "pipelines" not in sys.modules, sorted(m for m in sys.modules if m.startswith("pipelines"))
        print(type(fe.stack).__name__, len(out["up_blocks.1"]))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PlainStack", "2"]


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
    from difffeat.extraction.runner import ExtractRunConfig
    from difffeat.spine.run import ConfigError

    with pytest.raises(ConfigError, match=r"^prompt_source: must be one of fixed, sidecar, csv, label"):
        ExtractRunConfig.from_dict({"images": "a", "out": "b", "prompt_source": "captions"})
