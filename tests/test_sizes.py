"""No god modules or classes: a module stays under 500 lines and a class under 300.

Beyond that, the module's or class's docstring says why, in a line of its own that
starts with ``Size:`` and gives the reason (a hot path kept in one place, say).
"""

from __future__ import annotations

import ast
import re
from typing import Final

from tests.source import PACKAGE, Module, classes, modules, parse

MODULE_LINES: Final = 500
CLASS_LINES: Final = 300
# "Size:" and a reason of a few words, on a line of the docstring.
_JUSTIFIED: Final = re.compile(r"^\s*Size:\s*\S+(\s+\S+){3,}", re.MULTILINE)


def justified(node: ast.Module | ast.ClassDef) -> bool:
    return bool(_JUSTIFIED.search(ast.get_docstring(node) or ""))


def oversized(module: Module) -> list[str]:
    """What in ``module`` is over its size and says nothing of why."""
    found = []
    if module.lines > MODULE_LINES and not justified(module.tree):
        found.append(f"{module.where}: {module.lines} lines (at most {MODULE_LINES})")
    for node in classes(module):
        size = (node.end_lineno or node.lineno) - node.lineno + 1
        if size > CLASS_LINES and not justified(node):
            where = f"{module.where}:{node.lineno}"
            found.append(f"{where}: class {node.name}, {size} lines (at most {CLASS_LINES})")
    return found


def test_no_module_or_class_is_over_its_size_unless_it_says_why() -> None:
    found = [problem for module in modules() for problem in oversized(module)]
    assert not found, "\n".join(
        ["Split these, or say why not in a 'Size: <why>' line of the docstring:", *found]
    )


def test_the_size_check_counts_lines_and_reads_the_reason() -> None:
    body = "    x = 1\n" * CLASS_LINES
    big = parse("big", PACKAGE / "big.py", f"class Big:\n    '''A big one.'''\n{body}")
    assert oversized(big) == [
        f"app/lbstack/big.py:1: class Big, {CLASS_LINES + 2} lines (at most {CLASS_LINES})"
    ]
    reason = "    '''A big one.\n\n    Size: one state machine, read as one.\n    '''\n"
    assert oversized(parse("big", big.path, f"class Big:\n{reason}{body}")) == []
    bare = "    '''A big one.\n\n    Size: big.\n    '''\n"
    assert len(oversized(parse("big", big.path, f"class Big:\n{bare}{body}"))) == 1
    long = parse("long", big.path, "x = 1\n" * (MODULE_LINES + 1))
    assert oversized(long) == [f"app/lbstack/big.py: {MODULE_LINES + 1} lines (at most 500)"]
