"""Which module of lbstack may import which: layers from the bottom up, and no cycles.

Every ``import`` statement counts, wherever it stands: under ``if TYPE_CHECKING:`` or
in a function body, an import that goes up a layer is still a dependency on the layer
above, and two modules that import each other are still one. (Imports made at run
time from a string, such as ``importlib.import_module``, are not read.)
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from tests.source import PACKAGE, Module, modules, parse

# The layers, bottom up: a module may import its own layer and the layers below it.
# ``name/`` stands for a package and every module in it; other names are one module.
LAYERS: Final = (
    ("base", "__init__ errors log address identity sockets rundir aio"),
    ("config", "config/ simulation tls"),
    ("services", "metrics client api httpserver admin component accesslog statusview"),
    ("data plane", "routing/ health/ scrape loadview peering forwarding/ discovery reconciler"),
    ("tiers", "tiers/"),
    ("children", "worker gunicorn"),
    # The supervisor's own, bottom up: each mechanism takes narrow interfaces, and
    # only the arbiter sees them all.
    ("supervisor: child", "supervisor.child"),
    ("supervisor: topology", "supervisor.topology"),
    ("supervisor: membership", "supervisor.membership"),
    (
        "supervisor: mechanisms",
        "supervisor.scaling supervisor.reload supervisor.autoscaler supervisor.upgrade "
        "supervisor.control supervisor.telemetry",
    ),
    ("supervisor: arbiter", "supervisor supervisor.arbiter"),
    ("entry points", "cli __main__ reference metric_reference testing"),
)

# Layers above others that must still not import them. The supervisor runs each child
# as a command (``python -m lbstack.worker``): it knows nothing of what they run.
APART: Final = {"supervisor/": ("data plane", "tiers", "children")}


# -- the checker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import of a module of lbstack by another: ``where`` is its file and line."""

    source: str
    target: str
    where: str

    def __str__(self) -> str:
        return f"{self.source} → {self.target} ({self.where})"


def matches(pattern: str, name: str) -> bool:
    if pattern.endswith("/"):
        return name == pattern[:-1] or name.startswith(pattern.replace("/", "."))
    return name == pattern


def layer_index(layers: Sequence[tuple[str, str]], names: Iterable[str]) -> dict[str, int]:
    """Each module's layer (its position in ``layers``); a module in none is left out."""
    index = {}
    for name in names:
        found = [i for i, (_, members) in enumerate(layers) if _in(name, members)]
        assert len(found) <= 1, f"{name} is in more than one layer: {found}"
        if found:
            index[name] = found[0]
    return index


def _in(name: str, members: str) -> bool:
    return any(matches(pattern, name) for pattern in members.split())


def imports(module: Module, known: Collection[str]) -> Iterator[Import]:
    """Every import of another module of lbstack in ``module``, wherever it stands."""
    seen = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            # ``from a import b``: the module a.b if there is one, else a itself.
            dotted = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in dotted:
            target = _nearest(name, known)
            found = Import(module.name, target or "", f"{module.where}:{node.lineno}")
            if target is not None and target != module.name and found not in seen:
                seen.add(found)
                yield found


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    full = "lbstack" if module.name == "__init__" else f"lbstack.{module.name}"
    parts = full.split(".") if module.is_package else full.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join([*parts, node.module] if node.module else parts)


def _nearest(dotted: str, known: Collection[str]) -> str | None:
    """The module of lbstack that ``dotted`` (a module, or a name in one) is in."""
    if dotted == "lbstack":
        return "__init__"
    if not dotted.startswith("lbstack."):
        return None
    name = dotted.removeprefix("lbstack.")
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or "__init__"


def graph(found: Iterable[Module]) -> dict[str, list[Import]]:
    """Each module's imports of the others."""
    found = list(found)
    known = {m.name for m in found}
    return {m.name: list(imports(m, known)) for m in found}


def cycles(edges: Mapping[str, Sequence[Import]]) -> list[list[Import]]:
    """The imports within each group of modules that import each other (in a circle)."""
    groups = _strongly_connected(edges)
    return [
        [i for name in group for i in edges.get(name, ()) if i.target in group]
        for group in groups
        if len(group) > 1
    ]


def _strongly_connected(edges: Mapping[str, Sequence[Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components of the import graph."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(name: str) -> None:
        order[name] = low[name] = len(order)
        stack.append(name)
        for target in (i.target for i in edges.get(name, ())):
            if target not in order:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], order[target])
        if low[name] == order[name]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == name:
                    break
            groups.append(group)

    for name in sorted(edges):
        if name not in order:
            visit(name)
    return groups


def upward(edges: Mapping[str, Sequence[Import]], index: Mapping[str, int]) -> list[Import]:
    """The imports of a module in a higher layer than the importer's."""
    return [
        i
        for found in edges.values()
        for i in found
        if i.source in index and i.target in index and index[i.target] > index[i.source]
    ]


def _report(title: str, found: Iterable[object]) -> str:
    return "\n".join([title, *(f"  {item}" for item in found)])


# -- the package ------------------------------------------------------------------------


def _graph() -> dict[str, list[Import]]:
    return graph(modules())


def test_the_whole_package_is_read() -> None:
    edges = _graph()
    assert len(edges) > 40, sorted(edges)
    assert sum(len(found) for found in edges.values()) > 150
    # An import that hides under TYPE_CHECKING (the checker's test shows the others).
    assert "config.certificates" in {i.target for i in edges["tls"]}


def test_every_module_is_in_a_layer() -> None:
    names = [m.name for m in modules()]
    index = layer_index(LAYERS, names)
    assert [n for n in names if n not in index] == [], "add each to LAYERS"


def test_no_modules_import_each_other() -> None:
    found = cycles(_graph())
    assert not found, "\n".join(
        _report("Modules that import each other, by these imports:", group) for group in found
    )


def test_no_import_goes_up_a_layer() -> None:
    edges = _graph()
    found = upward(edges, layer_index(LAYERS, edges))
    names = [layer for layer, _ in LAYERS]
    assert not found, _report(f"Imports from a lower layer to a higher one ({names}):", found)


def test_the_supervisor_knows_nothing_of_what_its_children_run() -> None:
    edges = _graph()
    index = layer_index(LAYERS, edges)
    names = [layer for layer, _ in LAYERS]
    assert {layer for layers in APART.values() for layer in layers} <= set(names)
    found = [
        i
        for pattern, layers in APART.items()
        for source, imported in edges.items()
        if matches(pattern, source)
        for i in imported
        if i.target in index and names[index[i.target]] in layers
    ]
    assert not found, _report("Imports across a wall (APART):", found)


# -- the checker itself -------------------------------------------------------------------


def _module(name: str, text: str) -> Module:
    path = PACKAGE / (name.replace(".", "/") + ".py")
    return parse(name, path, text)


def _edges(pairs: str) -> dict[str, list[Import]]:
    """A synthetic graph from ``"a>b b>c"``."""
    edges: dict[str, list[Import]] = {}
    for pair in pairs.split():
        source, target = pair.split(">")
        edges.setdefault(source, []).append(Import(source, target, f"{source}.py:1"))
        edges.setdefault(target, [])
    return edges


def test_the_checker_sees_every_kind_of_import() -> None:
    known = {"a", "a.b", "a.c", "d", "e", "f", "g", "h", "__init__"}
    text = (
        "from __future__ import annotations\n"
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from lbstack import d\n"
        "import lbstack.e\n"
        "from lbstack.f import Thing\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n"
        "    from lbstack.g import Other\n"
        "def later():\n"
        "    from ..h import something\n"
        "    import lbstack\n"
    )
    found = [(i.target, i.where.rpartition(":")[2]) for i in imports(_module("a.b", text), known)]
    assert found == [
        ("d", "4"),
        ("e", "5"),
        ("f", "6"),
        ("a.c", "7"),
        ("g", "9"),
        ("h", "11"),
        ("__init__", "12"),
    ]


def test_the_checker_finds_a_planted_cycle() -> None:
    assert cycles(_edges("a>b b>c c>d d>e")) == []
    found = cycles(_edges("a>b b>c c>a c>d x>a"))
    assert [sorted(str(i) for i in group) for group in found] == [
        ["a → b (a.py:1)", "b → c (b.py:1)", "c → a (c.py:1)"]
    ]
    # A cycle of two, as under TYPE_CHECKING, and two separate ones.
    found = cycles(_edges("a>b b>a c>d d>c"))
    assert sorted(sorted(i.source for i in group) for group in found) == [["a", "b"], ["c", "d"]]


def test_the_checker_finds_an_import_going_up() -> None:
    layers = (("low", "a p/"), ("high", "b"))
    edges = _edges("b>a p.x>a a>p a>b p.y>b")
    index = layer_index(layers, edges)
    assert index == {"a": 0, "p.x": 0, "p": 0, "b": 1, "p.y": 0}
    assert [str(i) for i in upward(edges, index)] == ["a → b (a.py:1)", "p.y → b (p.y.py:1)"]
    assert layer_index(layers, ["c", "px"]) == {}, "in no layer: found by the layer test"
