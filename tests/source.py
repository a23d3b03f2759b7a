"""The lbstack package read as source, for the tests of its structure (layers, sizes)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "app" / "lbstack"


@dataclass(frozen=True)
class Module:
    """One module of lbstack: ``name`` is dotted and relative to the package
    (``forwarding.exchange``; a package is named by its ``__init__``'s folder, the root
    package ``__init__``)."""

    name: str
    path: Path
    tree: ast.Module
    lines: int

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


def parse(name: str, path: Path, text: str) -> Module:
    return Module(name, path, ast.parse(text, str(path)), len(text.splitlines()))


@cache
def modules() -> tuple[Module, ...]:
    """Every module of the package, by name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found.append(parse(".".join(parts), path, path.read_text()))
    return tuple(found)


def classes(module: Module) -> Iterator[ast.ClassDef]:
    """Every class the module defines, nested ones included."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef):
            yield node
