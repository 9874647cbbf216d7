"""The package's layers hold (the import-linter contracts in pyproject.toml), and the tests keep to
their own rules: no test module imports another."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("lint-imports") is None,
                    reason="needs import-linter: pip install -e '.[dev]' (.ci/run does)")
def test_the_import_layers_hold():
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_core_imports_nothing_above_it_even_inside_functions():
    """The same rule read from the source, without import-linter: every import statement in core,
    at any depth, names core, the standard library or a third-party package."""
    above = ("kdistill.cli", "kdistill.analysis", "kdistill.toolkit", "kdistill.docgen", "kdistill.testing",
             "kdistill.plugins", "kdistill.strategies", "kdistill.evaluators")
    found = []
    for path in sorted((ROOT / "src" / "kdistill" / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} {name}" for name in names if name.startswith(above)]
    assert found == []


def test_no_test_module_imports_another():
    found = []
    for path in sorted(ROOT.glob("tests/**/*.py")) + sorted(ROOT.glob("examples/*/tests/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {name}" for name in names if name.startswith("test_")]
    assert found == []
