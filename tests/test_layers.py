"""The shape of the code: a command line that starts without the training stack, no import
circle, and an experiment harness that the library never imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "datasets", "accelerate")


def test_building_the_command_line_imports_no_training_stack():
    # A fresh interpreter: this test process has long imported torch.
    code = ("import json, sys\n"
            "from selftune.cli import build_parser\n"
            "build_parser()\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a module imports, as it loads or inside its functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _import_graph(package: str) -> dict[str, set[str]]:
    files = list((SRC / package).rglob("*.py"))
    modules = {_module_name(f) for f in files}
    modules |= {_module_name(f) for f in SRC.rglob("*.py")}
    return {_module_name(f): _imports(f, modules) for f in files}


def test_no_import_circle():
    graph = {}
    for package in ("selftune", "selftune_experiments"):
        graph.update(_import_graph(package))
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            # A module's own package __init__ runs first anyway: not a circle of ours.
            if module.startswith(imported + "."):
                continue
            assert state.get(imported) != "open", " -> ".join([*path, module, imported])
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_library_does_not_import_the_experiment_harness():
    importers = set()
    for path in (SRC / "selftune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "selftune_experiments" for n in names):
                importers.add(_module_name(path))
    # Only the command line offers the harness's commands (bench, report).
    assert importers == {"selftune.cli.dispatch"}


def test_models_and_data_take_no_run_options():
    # The model and data layers are handed the values they need (a [CLS] normalizer its kind
    # and source), never the run's option object: nothing of the config or CLI layer.
    graph = _import_graph("selftune")
    options_layer = ("selftune.config", "selftune.cli")
    reaching = {module: sorted(i for i in imported
                               if any(i == o or i.startswith(o + ".") for o in options_layer))
                for module, imported in graph.items()
                if module.startswith(("selftune.models", "selftune.data"))}
    assert {m: i for m, i in reaching.items() if i} == {}
    assert "selftune.models.heads" in reaching and "selftune.data.loading" in reaching


def test_single_and_multi_task_runs_share_one_lifecycle():
    # Each kind of run supplies its parts to selftune.lifecycle; neither borrows the other's.
    graph = _import_graph("selftune")
    assert "selftune.lifecycle" in graph["selftune.training"]
    assert "selftune.lifecycle" in graph["selftune.multitask.training"]
    assert "selftune.training" not in graph["selftune.multitask.training"]
    assert "selftune.multitask.training" not in graph["selftune.training"]
