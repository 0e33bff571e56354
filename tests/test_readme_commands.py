"""Every command a reader copies from the README parses against its command line, and every skipdiff name and
keyword its Python snippets use exists: the README's examples cannot drift from the code unnoticed.

Shell blocks: ``make <target>`` names a Makefile target; ``accelerate launch ... <script>.py ARGS`` and
``python -m <module> ARGS`` are parsed by that command's own parser and checks (no download, no training);
``pip install -e ".[extras]"`` names extras pyproject.toml declares. Python blocks: each ``from skipdiff import
name`` exists, and each keyword passed to such a name is one of its parameters (or, for
``enable_skip_cache(**overrides)``, a field of ``SkipCacheOptions``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``text`` in ``language``."""
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(block: str) -> list[list[str]]:
    """One argv per command line of a shell block (continuations joined, comments and VAR=value dropped)."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
        if argv:
            commands.append(argv)
    return commands


def _parsed(parse, args: list[str]):
    """``parse(args)``; an argparse exit becomes a ValueError carrying its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(args)
    except SystemExit as exit_:
        raise ValueError(err.getvalue().strip() or f"exit {exit_.code}") from None


def _options(module: str, name: str):
    from skipdiff.config import parse_args

    options = getattr(__import__(module, fromlist=[name]), name)
    return lambda args: parse_args(options, args)


def _argparse(module: str, check: str | None = None):
    def parse(args):
        main = __import__(module, fromlist=["build_parser"])
        parsed = main.build_parser().parse_args(args)
        if check:
            getattr(main, check)(parsed)
        return parsed

    return parse


SCRIPTS = {  # accelerate launch <script>: the options class its command line is generated from
    "train_scripts/train_unet.py": ("skipdiff.training.options", "TrainOptions"),
    "train_scripts/train_vae.py": ("skipdiff.training.vae_options", "VaeOptions"),
}
MODULES = {  # python -m <module>
    "skipdiff.eval": lambda: _options("skipdiff.eval.options", "EvalOptions"),
    "skipdiff.cli.train_unet": lambda: _options("skipdiff.training.options", "TrainOptions"),
    "skipdiff.search": lambda: _argparse("skipdiff.search.__main__", "check_args"),
    "skipdiff.search.worker": lambda: _argparse("skipdiff.search.worker"),
    "skipdiff.sweep": lambda: _argparse("skipdiff.sweep.__main__"),
    "skipdiff.report": lambda: _argparse("skipdiff.report.__main__"),
}


def check_command(argv: list[str]) -> None:
    """Raise ``ValueError`` naming what is wrong with one README command line."""
    if argv[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        missing = [t for t in argv[1:] if t not in targets]
        if missing:
            raise ValueError(f"no Makefile target {missing}")
        return
    if argv[:2] == ["accelerate", "launch"]:
        script = next((a for a in argv if a.endswith(".py")), None)
        if script not in SCRIPTS:
            raise ValueError(f"accelerate launch of an unchecked script {script!r}")
        _parsed(_options(*SCRIPTS[script]), argv[argv.index(script) + 1 :])
        return
    if argv[:2] == ["python", "-m"] and argv[2] in MODULES:
        args = argv[3:]
        parsed = _parsed(MODULES[argv[2]](), args)
        spec = getattr(parsed, "spec", None)
        if spec is not None and spec.startswith("eval/") and not (REPO / spec).is_file():
            raise ValueError(f"{argv[2]}: spec {spec} does not exist")
        return
    if argv[:3] == ["pip", "install", "-e"]:
        extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", argv[3])
        if extras is None:
            raise ValueError(f"pip install -e of {argv[3]!r}, not this repository")
        declared = set(re.findall(r"^([\w-]+) = \[", (REPO / "pyproject.toml").read_text(), re.M))
        missing = [e for e in (extras.group(1) or "").split(",") if e and e not in declared]
        if missing:
            raise ValueError(f"pyproject.toml declares no extra {missing}")
        return
    raise ValueError(f"a README command no check knows: {shlex.join(argv)} (teach tests/test_readme_commands.py)")


def check_snippet(source: str) -> list[str]:
    """What a Python snippet uses from skipdiff that does not exist: names, and keywords of calls to them."""
    import skipdiff

    tree, problems, names = ast.parse(source), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "skipdiff":
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"{node.module} has no {alias.name}")
                else:
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
            allowed = _keywords(names[node.func.id], skipdiff)
            problems += [
                f"{node.func.id}() takes no keyword {k.arg!r}"
                for k in node.keywords
                if k.arg is not None and allowed is not None and k.arg not in allowed
            ]
    return problems


def _keywords(function, skipdiff) -> set[str] | None:
    """The keyword names ``function`` accepts (None: any)."""
    parameters = inspect.signature(function).parameters
    names = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        if function is skipdiff.enable_skip_cache:  # **overrides of SkipCacheOptions' fields
            return names | {f.name for f in dataclasses.fields(skipdiff.SkipCacheOptions)}
        return None
    return names


def test_every_readme_command_line_parses_against_its_command():
    commands = [argv for block in blocks(README.read_text(), "bash") for argv in shell_commands(block)]
    assert len(commands) >= 8, "the README's shell blocks hold almost no command"
    failures = []
    for argv in commands:
        try:
            check_command(argv)
        except ValueError as err:
            failures.append(f"{shlex.join(argv)}\n    {err}")
    assert not failures, "\n".join(failures)


def test_every_readme_snippet_uses_names_and_keywords_that_exist():
    snippets = blocks(README.read_text(), "python")
    assert len(snippets) >= 2
    assert [p for s in snippets for p in check_snippet(s)] == []


def test_the_checks_catch_a_mistyped_option_a_missing_target_and_a_wrong_keyword():
    with pytest.raises(ValueError, match="unrecognized arguments: --skipz"):
        check_command(["accelerate", "launch", "train_scripts/train_unet.py", "--skipz", "none"])
    with pytest.raises(ValueError, match="no Makefile target"):
        check_command(["make", "deploy"])
    with pytest.raises(ValueError, match="invalid choice|must be one of|not one of|choose"):
        check_command(["python", "-m", "skipdiff.eval", "--checkpoint", "runs/x", "--grid", "--sampler", "euler"])
    with pytest.raises(ValueError, match="no check knows"):
        check_command(["python", "bench/unknown.py"])
    with pytest.raises(ValueError, match="declares no extra"):
        check_command(["pip", "install", "-e", ".[nonexistent]"])
    assert check_snippet("from skipdiff import enable_skip_cache\nenable_skip_cache(None, cache_intervall=3)") == [
        "enable_skip_cache() takes no keyword 'cache_intervall'"
    ]
    assert check_snippet("from skipdiff import no_such_name") == ["skipdiff has no no_such_name"]
