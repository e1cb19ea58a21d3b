"""The layers of ``../shared/design.md`` and ``docs/architecture.md``, checked on the source by AST.

Every import counts: module level, inside functions (lazy imports) and under ``TYPE_CHECKING``.
What is checked:

* no import cycle among ``src/tidings`` modules;
* each part imports only the parts below it (:data:`MAY_IMPORT`), and the pure parts no I/O;
* the broker is known by its interface: no concrete broker (``broker.memory``, ``broker.redis``,
  ``MemoryBroker``, ``RedisBroker``, an ``isinstance`` on one) outside ``broker/`` and the
  composition root ``server/app.py``;
* ``session.py`` calls node verbs only: it never names the node's hub, broker or change feed;
* ``metrics.py`` imports nothing from Tidings; ``cdc/cluster.py`` knows the broker as a
  ``ChangeBus`` only;
* the SDK: ``client/`` imports ``protocol/`` only, and ``client/channel.py`` / ``client/client.py``
  use none of each other's private members.
"""

from __future__ import annotations

import ast
import dataclasses
from functools import cache
from pathlib import Path

import pytest

import tidings

SRC = Path(tidings.__file__).parent

#: What each part of ``src/tidings`` may import from the rest (its own modules always). The parts
#: are the top-level modules and packages; the order is design.md's, from the pure core up.
MAY_IMPORT: dict[str, frozenset[str]] = {
    name: frozenset(parts)
    for name, parts in {
        # Pure: no asyncio, no sockets, no drivers (PURE below), and nothing above them.
        "protocol": (),
        "history": (),
        "limits": (),
        "metrics": (),
        "logs": (),
        "auth": ("protocol",),
        "config": ("auth", "protocol"),
        "alerts": ("config", "logs"),
        "hub": ("protocol",),
        # Between nodes, and the database side.
        "broker": ("history", "config", "protocol", "logs"),
        "cdc": ("protocol", "broker", "auth", "config", "logs", "limits"),
        "db": ("protocol", "auth", "broker", "cdc", "config", "history", "limits", "logs"),
        # The one door, and the connections that use it.
        "node": ("protocol", "auth", "broker", "config", "hub", "history", "limits", "logs", "metrics"),
        "session": (
            "protocol", "auth", "broker", "cdc", "config", "history", "limits", "logs", "metrics", "node",
        ),
        # I/O, wiring: everything but the SDK and the tools.
        "server": (
            "protocol", "auth", "broker", "cdc", "config", "db", "history", "hub", "limits", "logs",
            "metrics", "alerts", "node", "session",
        ),
        # The SDK knows the wire format only.
        "client": ("protocol",),
        # The load generator measures the server from outside (``tidings``: the version).
        "bench": ("tidings", "protocol", "client", "limits"),
        "cli": ("tidings", "auth", "bench", "config", "logs", "server", "client"),
        "__main__": ("cli",),
        "tidings": (),
    }.items()
}  # fmt: skip

#: Parts that stay pure (design.md): none of these modules is imported by them.
PURE = ("protocol", "auth", "history", "hub", "metrics")
IO_MODULES = frozenset(
    {"asyncio", "socket", "ssl", "selectors", "psycopg2", "redis", "uvicorn", "starlette", "httptools"}
)

CONCRETE_BROKERS = frozenset({"tidings.broker.memory", "tidings.broker.redis"})
CONCRETE_BROKER_NAMES = frozenset({"MemoryBroker", "RedisBroker"})
COMPOSITION_ROOT = "tidings.server.app"


@dataclasses.dataclass(frozen=True)
class Import:
    """One import: the module that imports, what it imports (a module), the names taken, the line."""

    source: str
    target: str
    names: tuple[str, ...]
    line: int


def module_name(path: Path) -> str:
    parts = ["tidings", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(), str(modules()[module]))


def part(module: str) -> str:
    """``tidings.server.app`` -> ``server``; ``tidings`` -> ``tidings``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


@cache
def imports(module: str) -> tuple[Import, ...]:
    """Every import of ``module`` resolved to modules of tidings (``from x import m`` -> ``x.m``)."""
    known = modules()
    package = module if modules()[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[Import] = []
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tidings":
                    found.append(Import(module, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "tidings":
                continue
            names = tuple(a.name for a in node.names)
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            for sub in submodules:
                found.append(Import(module, sub, (), node.lineno))
            if len(submodules) < len(names):
                found.append(Import(module, target, names, node.lineno))
    return tuple(found)


def third_party_imports(module: str) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {i.target for i in imports(m) if i.target in known and i.target != m} for m in known}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def where(imp: Import) -> str:
    return f"{modules()[imp.source].relative_to(SRC.parent)}:{imp.line} imports {imp.target}"


# -- the checks --------------------------------------------------------------------------------


def test_the_check_sees_every_kind_of_import() -> None:
    # A lazy import inside a function and a TYPE_CHECKING import are imports too.
    targets = {i.target for i in imports("tidings.server.app")}
    assert "tidings.cdc.service" in targets  # lazy, inside start_changes, and under TYPE_CHECKING
    assert "tidings.broker.redis" in {i.target for i in imports("tidings.broker")}  # lazy
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_modules() -> None:
    assert cycles(graph()) == []


def test_every_part_imports_only_the_parts_below_it() -> None:
    wrong = []
    for module in modules():
        allowed = MAY_IMPORT.get(part(module))
        assert allowed is not None, f"{module}: a new part; add it to MAY_IMPORT (and the docs)"
        for imp in imports(module):
            target = part(imp.target)
            if target != part(module) and target not in allowed:
                wrong.append(where(imp))
    assert wrong == []


@pytest.mark.parametrize("pure", PURE)
def test_pure_parts_do_no_io(pure: str) -> None:
    wrong = {m: sorted(third_party_imports(m) & IO_MODULES) for m in modules() if part(m) == pure}
    assert {m: found for m, found in wrong.items() if found} == {}


def test_concrete_brokers_only_in_the_broker_package_and_the_composition_root() -> None:
    wrong = []
    for module in modules():
        if part(module) == "broker" or module == COMPOSITION_ROOT:
            continue
        for imp in imports(module):
            if imp.target in CONCRETE_BROKERS or CONCRETE_BROKER_NAMES & set(imp.names):
                wrong.append(where(imp))
            elif part(imp.target) == "broker" and imp.target != "tidings.broker.base":
                wrong.append(where(imp) + " (only broker.base is the interface)")
        for node in ast.walk(tree(module)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                named = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                if named & CONCRETE_BROKER_NAMES:
                    wrong.append(f"{module}:{node.lineno}: isinstance on a concrete broker")
    assert wrong == []


def test_the_composition_root_alone_picks_the_broker() -> None:
    importers = {
        i.source
        for m in modules()
        for i in imports(m)
        if i.target == "tidings.broker" and "make_broker" in i.names
    }
    assert importers == {COMPOSITION_ROOT}


def test_session_calls_node_verbs_only() -> None:
    reaches = [
        f"session.py:{n.lineno}: .{n.attr}"
        for n in ast.walk(tree("tidings.session"))
        if isinstance(n, ast.Attribute) and n.attr in ("hub", "broker", "cdc")
    ]
    assert reaches == []
    assert "tidings.hub" not in {i.target for i in imports("tidings.session")}


def test_metrics_imports_nothing_from_tidings() -> None:
    assert [where(i) for i in imports("tidings.metrics")] == []


def test_the_cluster_change_feed_knows_the_change_bus_only() -> None:
    brokers = [i for i in imports("tidings.cdc.cluster") if part(i.target) == "broker"]
    assert [(i.target, i.names) for i in brokers] == [("tidings.broker.base", ("ChangeBus",))]


def test_the_sdk_imports_protocol_only() -> None:
    wrong = [
        where(i)
        for m in modules()
        if part(m) == "client"
        for i in imports(m)
        if part(i.target) != "client"
        if part(i.target) != "protocol"
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("module", "other"),
    [("tidings.client.channel", "client"), ("tidings.client.client", "channel")],
)
def test_the_sdk_client_and_channel_use_no_private_member_of_each_other(module: str, other: str) -> None:
    # ``self.client._x`` / ``client._x`` in channel.py, ``channel._x`` / ``ch._x`` in client.py.
    aliases = {other, other[:2]} if other == "channel" else {other}
    reaches = []
    for n in ast.walk(tree(module)):
        if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
            value = n.value
            name = value.attr if isinstance(value, ast.Attribute) else getattr(value, "id", None)
            if name in aliases:
                reaches.append(f"{module}:{n.lineno}: {name}.{n.attr}")
    assert reaches == []
