"""magg_core's folders are layered as docs/architecture.md §Packages draws them.

A module may import from its own folder and from the leaves and folders listed
before its own in ``ORDER``; never from a later one. So the store cannot learn
about the reader or a stage, and nothing in the library depends on the reports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "magg_core"
ORDER = (
    "errors",
    "urls",
    "expressions",
    "config",
    "cycles",
    "morton",
    "access",
    "schema",
    "catalog",
    "granules",
    "stats",
    "store",
    "extract",
    "grid",
    "height_change",
    "report",
)
"""Leaves and folders of magg_core, lowest first (as the architecture page lists them)."""


def _unit(module: str) -> str | None:
    """``magg_core.store.arrays`` → ``store``; ``None`` for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "magg_core":
                found |= {f"magg_core.{alias.name}" for alias in node.names}
            elif node.module.startswith("magg_core."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("magg_core.")}
    return found


def test_every_leaf_and_folder_is_in_the_order_and_the_architecture_page():
    present = {p.stem for p in CORE.glob("*.py") if p.stem != "__init__"}
    present |= {p.parent.name for p in CORE.glob("*/__init__.py")}
    assert present == set(ORDER)
    page = (REPO / "docs" / "architecture.md").read_text()
    tree = re.search(r"```\n\s*magg_core/\n(.*?)```", page, re.S).group(1)
    listed = [name for name in re.findall(r"(\w+)(?:/|\.py)", tree) if name in ORDER]
    assert listed == list(ORDER)


def test_no_module_imports_from_a_later_leaf_or_folder():
    upward = []
    for path in sorted(CORE.rglob("*.py")):
        relative = path.relative_to(REPO).with_suffix("")
        mine = _unit(".".join(relative.parts))
        if mine is None:
            continue
        for module in _imports(path):
            theirs = _unit(module)
            if theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                upward.append(f"{relative.as_posix()} imports {module}")
    assert upward == []


def test_the_check_sees_an_upward_import():
    """The walk above finds imports at all: the grid cell reads through the store."""
    imported = _imports(CORE / "grid" / "cell.py")
    assert any(_unit(m) == "store" for m in imported)
    assert ORDER.index("store") < ORDER.index("grid")
