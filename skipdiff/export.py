"""A run folder that plain diffusers loads: the pipeline's code travels in the folder.

diffusers loads classes it does not ship from Python files in the folder being loaded, when the
caller passes ``trust_remote_code=True`` (``pipelines/pipeline_loading_utils.py``):

* ``model_index.json``'s ``"_class_name": ["skipdiff_pipeline", "SkipDiffPipeline"]`` makes
  ``DiffusionPipeline.from_pretrained`` (and ``DDPMPipeline.from_pretrained``: any pipeline class it is
  called on) import ``SkipDiffPipeline`` from ``<folder>/skipdiff_pipeline.py``
  (``_resolve_custom_pipeline_and_cls``); without ``trust_remote_code`` it refuses, naming the file;
* a component entry ``"unet": ["skipdiff_unet", "SkipUNet2DModel"]`` makes it import
  ``SkipUNet2DModel`` from ``<folder>/unet/skipdiff_unet.py`` (``get_class_obj_and_candidates``).

diffusers copies each such file alone into its modules cache and imports it there (a relative import
would need its file copied next to it), so each file is one self-contained module:
:func:`bundle_source` concatenates skipdiff's own source files in import order, at export time, so
there is no second copy of the code to keep in step. The installed ``SkipDiffPipeline`` reads these
entries as its own classes (``SkipDiffPipeline.load_config``), so ``SkipDiffPipeline.from_pretrained``
runs nothing from the folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from . import __version__
from .pipeline import UNFINISHED_EXPORT
from .runfolder import follow_umask, write_json_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
PIPELINE_MODULE = "skipdiff_pipeline"  # <folder>/skipdiff_pipeline.py
UNET_MODULE = "skipdiff_unet"  # <folder>/<component>/skipdiff_unet.py
# The bundled classes and the skipdiff module each one comes from (the bundle's roots).
PIPELINE_CLASS, UNET_CLASS = "SkipDiffPipeline", "SkipUNet2DModel"
BUNDLES = {PIPELINE_MODULE: "pipeline", UNET_MODULE: "skips/unet"}  # paths in the package

# The patterns diffusers' dynamic_modules_utils reads a module's imports with (get_relative_imports,
# check_imports): they see every matching line, docstrings included.
_RELATIVE_IMPORT = re.compile(r"^\s*(?:import\s+\.(\S+)\s*$|from\s+\.(\S+)\s+import)", re.MULTILINE)
_ABSOLUTE_IMPORT = re.compile(r"^\s*(?:import\s+(\S+)\s*$|from\s+(\S+)\s+import)", re.MULTILINE)


# --------------------------------------------------------------------------------------------------
# One self-contained module from skipdiff's sources
# --------------------------------------------------------------------------------------------------


def _dotted(name: str) -> str:
    """``skips/unet`` -> ``skipdiff.skips.unet`` (bundled modules are named by their path in the package)."""
    return "skipdiff." + name.replace("/", ".")


def _parse(name: str) -> ast.Module:
    path = PACKAGE_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(
            f"cannot bundle {_dotted(name)}: no such module file ({path}); only modules of the "
            "package are bundled, not packages"
        )
    return ast.parse(path.read_text(), filename=str(path))


def _relative_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """Every ``from .x import y`` (or ``from ..x import y``) of a module, at any depth."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]


def _imported_module(node: ast.ImportFrom, where: str) -> str:
    """The bundled name (path in the package, e.g. ``skips/router``) of the module ``node`` imports from,
    resolved against the package of ``where`` (``..config`` from ``skips/unet`` is ``config``)."""
    if not node.module or any(alias.name == "*" for alias in node.names):
        raise ValueError(
            f"cannot bundle {_dotted(where)}: only `from .module import name` is supported (line {node.lineno})"
        )
    package = where.split("/")[:-1]
    if node.level - 1 > len(package):
        raise ValueError(f"cannot bundle {_dotted(where)}: line {node.lineno} imports from outside skipdiff")
    base = package[: len(package) - (node.level - 1)]
    return "/".join([*base, *node.module.split(".")])


def import_order(root: str) -> list[str]:
    """``root`` and every skipdiff module it imports (transitively), each after the modules it imports."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"cannot bundle circular imports: {' -> '.join([*visiting, name])}")
        visiting.append(name)
        for node in _relative_imports(_parse(name)):
            visit(_imported_module(node, name))
        visiting.pop()
        order.append(name)

    visit(root)
    return order


def _top_level_names(tree: ast.Module) -> dict[str, str]:
    """name -> what binds it at module level (imports as ``import:<module>.<name>``, so that two modules
    importing the same thing do not collide)."""
    names: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = "definition"
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]  # a, b = 1, 2
            names.update({t.id: "definition" for t in flat if isinstance(t, ast.Name)})
        elif isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
            source = node.module if isinstance(node, ast.ImportFrom) else ""
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = f"import:{source}.{alias.name}"
    return names


def _absolute_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def _module_text(name: str, tree: ast.Module, defined: set[str]) -> str:
    """The module's source with ``from __future__`` and its relative imports taken out: the names they
    import are defined earlier in the bundle (an ``as`` alias becomes an assignment)."""
    lines = (PACKAGE_DIR / f"{name}.py").read_text().splitlines()
    edits: list[tuple[ast.stmt, list[str]]] = []
    for node in ast.walk(tree):
        if any(module.split(".")[0] == "skipdiff" for module in _absolute_imports(node)):
            raise ValueError(
                f"cannot bundle {_dotted(name)}: it imports skipdiff by name (line {node.lineno}); "
                "import from the package relatively"
            )
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            edits.append((node, []))
        elif isinstance(node, ast.ImportFrom) and node.level:
            missing = [a.name for a in node.names if a.name not in defined]
            if missing:
                raise ValueError(
                    f"cannot bundle {_dotted(name)}: {missing} from {'.' * node.level}{node.module} are not "
                    "module-level names"
                )
            indent = " " * node.col_offset
            aliases = [f"{indent}{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
            # Inside a function the import may be the only statement of its block.
            edits.append((node, aliases or ([f"{indent}pass"] if node.col_offset else [])))
    for node, replacement in sorted(edits, key=lambda edit: edit[0].lineno, reverse=True):
        lines[node.lineno - 1 : node.end_lineno] = replacement
    return "\n".join(lines).strip("\n")


def bundle_source(root: str) -> str:
    """skipdiff module ``root`` (its path in the package: ``pipeline``, ``skips/unet``) and everything it
    imports from skipdiff as one module (Python source).

    Raises ``ValueError`` when the modules cannot share one namespace (a name defined in two of them)
    or import in a way the bundle cannot follow."""
    order = import_order(root)
    trees = {name: _parse(name) for name in order}
    owners: dict[str, tuple[str, str]] = {}
    for name in order:
        for binding, kind in _top_level_names(trees[name]).items():
            previous = owners.setdefault(binding, (name, kind))
            if previous != (name, kind) and not (kind == previous[1] and kind.startswith("import:")):
                raise ValueError(
                    f"cannot bundle {_dotted(root)}: {binding!r} is defined in both "
                    f"skipdiff/{previous[0]}.py and skipdiff/{name}.py"
                )
    parts = [
        f'"""skipdiff {__version__} as one module: {", ".join(f"skipdiff/{n}.py" for n in order)}.\n\n'
        "Generated by skipdiff.export when this folder was saved, so that diffusers alone loads the folder\n"
        "with trust_remote_code=True. Do not edit it: it is regenerated from skipdiff's sources.\n"
        '"""\n\nfrom __future__ import annotations',
    ]
    defined: set[str] = set()
    for name in order:
        parts.append(f"# {'-' * 98}\n# skipdiff/{name}.py\n# {'-' * 98}\n\n{_module_text(name, trees[name], defined)}")
        defined |= set(_top_level_names(trees[name]))
    source = re.sub(r"\n{4,}", "\n\n\n", "\n\n\n".join(parts)) + "\n"  # no gaps where imports were
    _check_loadable(source, root)
    return source


def _check_loadable(source: str, root: str) -> None:
    """What diffusers will do with the file must work where only diffusers is installed: it must
    compile, and the import lines diffusers' loader reads (docstrings too) may not be relative or
    name skipdiff."""
    compile(source, f"<bundle of {_dotted(root)}>", "exec")
    relative = [m.group(0).strip() for m in _RELATIVE_IMPORT.finditer(source)]
    own = [
        m.group(0).strip()
        for m in _ABSOLUTE_IMPORT.finditer(source)
        if (m.group(1) or m.group(2)).split(".")[0] == "skipdiff"
    ]
    if relative or own:
        raise ValueError(f"the bundle of {_dotted(root)} would make diffusers look for other files: {relative + own}")


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_remote_code(folder: str | os.PathLike, components: dict) -> dict:
    """Write the bundled modules into a saved ``SkipDiffPipeline`` folder and point its
    ``model_index.json`` at them; returns the new ``model_index.json`` content.

    ``components``: the pipeline's components (name -> object); each ``SkipUNet2DModel`` gets
    ``<name>/skipdiff_unet.py``."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if index.get("_class_name") not in (PIPELINE_CLASS, [PIPELINE_MODULE, PIPELINE_CLASS]):
        raise ValueError(f"{str(folder)!r} holds a {index.get('_class_name')!r}, not a {PIPELINE_CLASS}")
    _write_text_atomic(folder / f"{PIPELINE_MODULE}.py", bundle_source(BUNDLES[PIPELINE_MODULE]))
    index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    unet_source = None
    for name, component in components.items():
        if type(component).__name__ == UNET_CLASS:
            unet_source = unet_source or bundle_source(BUNDLES[UNET_MODULE])
            _write_text_atomic(folder / name / f"{UNET_MODULE}.py", unet_source)
            index[name] = [UNET_MODULE, UNET_CLASS]
    write_json_atomic(index_path, index)
    return index


def export_pipeline(pipeline, folder: str | os.PathLike, raw_unet=None) -> Path:
    """Save a ``SkipDiffPipeline`` so that any diffusers user can load it.

    Writes ``pipeline.save_pretrained(folder)`` (``model_index.json``, ``unet/``, ``scheduler/``,
    ``vae/``), ``unet_raw/`` when ``raw_unet`` is given (the raw weights of a run that samples from
    its EMA weights, as diffusers' training examples save them), and the bundled code
    (:func:`write_remote_code`). The folder then loads with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (diffusers only) and with
    ``SkipDiffPipeline.from_pretrained(folder)`` (skipdiff installed). Returns the folder.

    Everything is written to a temporary folder inside ``folder`` first, so a full disk or a missing
    permission while writing (an ``OSError`` naming the folder) leaves an earlier export as it was. The
    files are then moved in, ``model_index.json`` last, while the folder holds
    :data:`~skipdiff.pipeline.UNFINISHED_EXPORT`: a kill while moving leaves it, and evaluation and
    ``SkipDiffPipeline.from_pretrained`` refuse the folder instead of loading weights that may be missing."""
    folder = Path(folder)
    tmp = folder / f".export.tmp{os.getpid()}"  # a name --overwrite_output_dir knows as skipdiff's
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(tmp)
        if raw_unet is not None:
            raw_unet.save_pretrained(tmp / "unet_raw")
        write_remote_code(tmp, pipeline.components)
        follow_umask(tmp)  # safetensors writes 0600: follow the umask instead
        _move_in(tmp, folder)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        raise OSError(
            f"could not export the pipeline to {str(folder)!r}: {err}; what it held before is intact; free "
            "space or make the folder writable, then export again (a training run: its command with "
            "--resume_from_checkpoint latest)"
        ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _move_in(tmp: Path, folder: Path) -> None:
    """Move an export's entries from ``tmp`` into ``folder``, replacing earlier ones, ``model_index.json`` last,
    with :data:`~skipdiff.pipeline.UNFINISHED_EXPORT` present from before the first move to after the last."""
    marker = folder / UNFINISHED_EXPORT
    marker.write_text("an export is moving its files into this folder; it is unfinished while this file exists\n")
    for entry in sorted(tmp.iterdir(), key=lambda path: path.name == "model_index.json"):
        target = folder / entry.name
        aside = folder / f".{entry.name}.old.tmp{os.getpid()}"
        if target.is_dir() and entry.is_dir():  # a folder cannot be renamed over a non-empty one
            os.replace(target, aside)
        os.replace(entry, target)
        shutil.rmtree(aside, ignore_errors=True)
    marker.unlink()
