"""mkdocs hook: the committed results join the site, and every skipdiff module has an API page.

* ``eval/results/**`` (Markdown tables and reports, PNGs, JSON) are added to the site at the same paths, so
  a page's link to ``../eval/results/<x>`` (right on GitHub, relative to ``docs/``) is rewritten to the
  copy in the site and checked like any other link: a result that does not exist fails the strict build.
* a committed results page is generated output: a link in it to a file that was not committed with it (a
  report's PNG left out of ``eval/results/``) is shown as text saying so, not as a broken link;
* every module under ``skipdiff/`` must be rendered by a ``::: module`` directive of some page in
  ``docs/api/`` (directly, or inside a package rendered with ``show_submodules: true``); a new module
  without one is a warning, so the strict build fails until the API reference covers it.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

log = logging.getLogger("mkdocs.hooks.repository_files")

ROOT = Path(__file__).resolve().parents[2]
INCLUDED = ("eval/results/",)  # repository folders whose files join the site
SUFFIXES = {".md", ".png", ".json", ".svg"}
LINK = re.compile(r"(\]\()(\.\./[^)#\s]+)((?:#[^)\s]*)?\))")
RESULT_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)#\s:]+)\)")  # a relative link or image in a results page
DIRECTIVE = re.compile(r"^::: (\S+)((?:\n    .*)*)", re.M)


def on_files(files, config):
    """Add the committed results to the site (not in the navigation: pages link to them)."""
    for folder in INCLUDED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES:
                uri = path.relative_to(ROOT).as_posix()
                files.append(
                    File(
                        uri,
                        str(ROOT),
                        config["site_dir"],
                        config["use_directory_urls"],
                        inclusion=InclusionLevel.NOT_IN_NAV,
                    )
                )
    _check_api_coverage(Path(config["docs_dir"]) / "api")
    return files


def on_page_markdown(markdown, page, config, files):
    """``](../eval/results/x)`` in a page under docs/ -> the same file's copy in the site, relative to the page."""
    here = posixpath.dirname(page.file.src_uri)
    if page.file.src_uri.startswith(INCLUDED):  # a results page itself: its links are already repository-relative
        return RESULT_LINK.sub(lambda m: _uncommitted(m, here), markdown)

    def rewrite(match):
        target = posixpath.normpath(posixpath.join("docs", here, match.group(2)))
        if not target.startswith(INCLUDED):
            return match.group(0)  # outside what the site holds: left for mkdocs' link check to report
        if (ROOT / target).is_dir():
            log.warning(f"{page.file.src_uri}: link to the folder {target!r}; link a file in it")
            return match.group(0)
        return f"{match.group(1)}{posixpath.relpath(target, here or '.')}{match.group(3)}"

    return LINK.sub(rewrite, markdown)


def _uncommitted(match, here: str) -> str:
    image, text, target = match.groups()
    if (ROOT / here / target).exists():
        return match.group(0)
    log.info(f"{here}: {target} was not committed with its report; shown as text")
    return f"*{text or target} ({target}: not committed)*" if image else f"{text} (`{target}`: not committed)"


def _check_api_coverage(api: Path) -> None:
    documented, recursive = set(), set()
    for page in sorted(api.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text()):
            documented.add(match.group(1))
            if re.search(r"show_submodules:\s*true", match.group(2)):
                recursive.add(match.group(1))
    for path in sorted((ROOT / "skipdiff").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module in documented or any(module.startswith(p + ".") for p in recursive):
            continue
        log.warning(
            f"API reference: module {module} is not rendered by any page in docs/api/ (add a '::: module' directive)"
        )
