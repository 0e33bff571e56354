"""A griffe extension: skipdiff's Sphinx-style references in docstrings become mkdocstrings cross-references.

skipdiff's docstrings name objects the way Sphinx does (``:func:`skipdiff.eval.fid_with_floor```,
``:class:`~skipdiff.unet.SkipUNet2DModel```, ``:mod:`.kinds``` relative to the module, ``:func:`evaluate```
in the same module). Each one naming a skipdiff object becomes ``[`name`][skipdiff.full.path]``, which
mkdocs-autorefs links to that object's entry in the API reference. A reference to a skipdiff name that
does not exist stays a cross-reference to that missing path, so autorefs reports it and the strict build
fails; a private object (``_name``, not in the reference) and a name from another library are shown as
code.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|data|attr|obj|exc):`(~?)([^`]+?)`")
PACKAGE = "skipdiff"


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            yield member
            continue
        yield from _walk(member, seen)


def _module(obj):
    return obj if obj.is_module else obj.module


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the skipdiff package (see the module docstring)."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        objects = {obj.path: obj for obj in _walk(pkg)}
        for obj in list(objects.values()):
            if obj.is_alias or obj.docstring is None:
                continue
            obj.docstring.value = ROLE.sub(lambda m, o=obj: self._reference(m, o, objects), obj.docstring.value)

    def _reference(self, match, obj, objects) -> str:
        short, target = match.group(2) == "~", match.group(3).strip().removesuffix("()")
        label = target.lstrip(".").split(".")[-1] if short else target.lstrip(".")
        qualified = target.startswith(PACKAGE + ".") or target == PACKAGE
        path = self._resolve(target, obj, objects)
        if path is None:
            if qualified or target.startswith("."):  # a skipdiff name that does not exist: let autorefs report it
                missing = target if qualified else f"{_module(obj).path}{target}"
                return f"[`{label}`][{missing}]"
            return f"`{label}`"  # another library's name
        if any(part.startswith("_") and part != "__init__" for part in path.split(".")):
            return f"`{label}`"  # private: not in the reference
        return f"[`{label}`][{path}]"

    def _resolve(self, target: str, obj, objects) -> str | None:
        module = _module(obj)
        if target.startswith(PACKAGE + ".") or target == PACKAGE:
            candidates, scope = [target], target.rsplit(".", 1)[0]
            tail = "." + target.rsplit(".", 1)[-1]  # a lazily exported name: defined in a module below ``scope``
        else:
            name, scopes = target.lstrip("."), []
            if obj.parent is not None and obj.parent.is_class:
                scopes.append(obj.parent.path)  # a method naming a sibling method
            if obj.is_class:
                scopes.append(obj.path)
            scope = module
            while scope is not None:  # the module, then its package and the packages above
                scopes.append(scope.path)
                scope = scope.parent
            candidates, scope, tail = [f"{s}.{name}" for s in scopes], PACKAGE, "." + name
        for candidate in candidates:
            found = objects.get(candidate)
            if found is not None:
                return self._final(found, objects)
        matches = sorted(
            p for p in objects if p.endswith(tail) and p.startswith(scope + ".") and not objects[p].is_alias
        )
        return matches[0] if len(matches) == 1 else None  # a lazily exported name: its one definition

    @staticmethod
    def _final(found, objects) -> str:
        if found.is_alias:
            try:
                return found.final_target.path
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return found.target_path
        return found.path
