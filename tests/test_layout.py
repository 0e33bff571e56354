"""The package's shape: small functions, evaluation and reports free of training code, no script
started by file path, command lines that answer bad arguments before importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "skipdiff"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are module, class or function docstrings."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_no_function_in_the_package_is_over_100_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long


def test_the_library_starts_no_script_by_file_path():
    """Training starts through entry points or ``-m`` module names: a path into train_scripts/ would
    break wherever the package is installed rather than checked out."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if "train_scripts" in node.value:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not found


@pytest.mark.slow
def test_evaluation_and_report_import_no_training_or_sweep_module():
    code = """
import importlib, pkgutil, sys
import skipdiff.eval, skipdiff.report
for package in (skipdiff.eval, skipdiff.report):
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
print(sorted(m for m in sys.modules if m.startswith(("skipdiff.training", "skipdiff.sweep", "skipdiff.cli"))))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_command_lines_answer_bad_arguments_before_heavy_imports():
    code = """
import sys
from skipdiff.sweep.__main__ import cli as sweep
from skipdiff.report.__main__ import cli as report
codes = [sweep(["no-such-spec.yaml"]), sweep(["x.yaml", "--num_threads", "0"]), report(["no-such-sweep"])]
print(codes, sorted(m for m in ("torch", "matplotlib", "scipy", "diffusers", "accelerate") if m in sys.modules))
"""
    result = _python(code)
    assert result.stdout.strip() == "[2, 2, 2] []", result.stderr
    assert "error: sweep spec 'no-such-spec.yaml' does not exist" in result.stderr
    assert "error: sweep folder 'no-such-sweep' does not exist" in result.stderr
    for module, flag in (("skipdiff.sweep", "--launcher"), ("skipdiff.report", "--reference")):
        shown = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert shown.returncode == 0 and flag in shown.stdout, shown.stderr
