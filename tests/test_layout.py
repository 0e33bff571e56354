"""The package's shape: small functions, evaluation and reports free of training code, no script
started by file path, command lines that answer bad arguments before importing torch, no import circles,
and every import inside a function saying why it is there."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipdiff_imports(code: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The skipdiff modules that module ``name`` (source ``code``) imports when it runs: at module level and
    inside functions, not under ``if TYPE_CHECKING:`` (annotations only, never executed). ``from . import x``
    names module ``x``; ``from .x import y`` names ``x``, or ``x.y`` where that is a module."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(code)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            targets = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
            targets = targets or [module]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # skipdiff.x.name -> skipdiff.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those inside an ``if TYPE_CHECKING:`` block."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            yield from (node for orelse in child.orelse for node in _runtime_nodes(ast.Module([orelse], [])))
            continue
        yield child
        yield from _runtime_nodes(child)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(_path_round(sorted(component), graph))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def _path_round(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import path from the component's first module back to itself (breadth first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for other in sorted(graph[module] & members):
            if other == start:
                return [*paths[module], start]
            if other not in paths:
                paths[other] = [*paths[module], other]
                queue.append(other)
    return component


def test_no_import_circles_even_through_function_level_imports():
    """The module graph, with the imports inside functions, has no cycle: a circle closed by an import hidden
    in a function is still a circle between the two modules' concepts."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {
        _module_name(p): _skipdiff_imports(p.read_text(), _module_name(p), p.name == "__init__.py", modules)
        for p in paths
    }
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_circle_check_sees_imports_inside_functions():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    modules = {"skipdiff", "skipdiff.x", "skipdiff.y", "skipdiff.sub", "skipdiff.sub.z"}
    code = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import sub\n"
        "def f():\n    from ..x import thing\n    from . import z\n    import skipdiff.y\n"
    )
    assert _skipdiff_imports(code, "skipdiff.sub.z", False, modules) == {"skipdiff.x", "skipdiff.y"}


# The directives a comment may hold besides its words: they say nothing about why an import is where it is.
_DIRECTIVE = re.compile(r"(noqa(:\s*[A-Z]+[0-9]+(,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(\[[^\]]*\])?|fmt:\s*\w+)")


def _comments(code: str) -> dict[int, tuple[str, bool]]:
    """line -> (its comment's words, whether the line holds nothing but the comment)."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT:
            words = _DIRECTIVE.sub("", token.string.lstrip("#")).strip(" #")
            found[token.start[0]] = (words, not token.line[: token.start[1]].strip())
    return found


def _function_level_imports(tree: ast.AST) -> list[tuple[ast.stmt, ast.stmt]]:
    """(import, first import of its run) for every import inside a function: a run is the consecutive
    import statements of one block, which one comment line above the first explains."""
    found = {}
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            for field in ("body", "orelse", "finalbody"):
                block = getattr(node, field, None)
                if not isinstance(block, list):
                    continue
                first = None
                for statement in block:
                    if isinstance(statement, ast.Import | ast.ImportFrom):
                        first = first or statement
                        found[id(statement)] = (statement, first)
                    else:
                        first = None
    return sorted(found.values(), key=lambda pair: pair[0].lineno)


def uncommented_function_level_imports(code: str) -> list[int]:
    """The lines of the imports inside functions that say nowhere why they are there: no comment on the
    import's own lines, and no comment line right above it or above the first import of its run."""
    comments = _comments(code)

    def explained_above(line: int) -> bool:
        words, alone = comments.get(line - 1, ("", False))
        return alone and bool(words)

    missing = []
    for node, first in _function_level_imports(ast.parse(code)):
        own = any(comments.get(line, ("", False))[0] for line in range(node.lineno, node.end_lineno + 1))
        if not (own or explained_above(node.lineno) or explained_above(first.lineno)):
            missing.append(node.lineno)
    return missing


def test_every_function_level_import_says_why():
    """An import inside a function has a reason (an optional dependency, a heavy one a command line or an
    options module answers before, a layer it may not reach at import time) and says it in a comment."""
    missing = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line in uncommented_function_level_imports(path.read_text())
    ]
    assert not missing, "function-level imports without a comment saying why: " + ", ".join(missing)


def test_the_import_comment_check_reads_comments_and_runs():
    code = (
        "import os\n"
        "def f():\n"
        "    # heavy: torch only here\n"
        "    import torch\n\n"
        "    from . import a\n"
        "    x = 1\n"
        "    import b\n"
        "    import c  # optional: the c extra\n"
        "    import d  # noqa: F401\n"
        "    s = '# not a comment'; import e\n"
        "    class K:\n"
        "        def g(self):\n"
        "            import h\n"
        "    if x:\n"
        "        # layering: h reaches training\n"
        "        import i\n"
        "    else:\n"
        "        import j\n"
    )
    assert uncommented_function_level_imports(code) == [8, 10, 11, 14, 19]
