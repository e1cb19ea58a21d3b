"""The public surface: every module says what it exports, and every exported name exists."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import pytest

import tidings

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(tidings.__path__, "tidings.") if not m.name.endswith("__main__")
)
PACKAGES = {m.name for m in pkgutil.walk_packages(tidings.__path__, "tidings.") if m.ispkg}


def load(name: str) -> ModuleType:
    return importlib.import_module(name)


def test_modules_were_found() -> None:
    for name in ("tidings.protocol.codec", "tidings.session", "tidings.server.websocket", "tidings.config"):
        assert name in MODULES


@pytest.mark.parametrize("name", ["tidings", *MODULES])
def test_all_names_exist(name: str) -> None:
    module = load(name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        # Only a package may leave its surface to its modules (an empty __init__).
        assert name in PACKAGES, f"{name} has no __all__"
        return
    assert isinstance(exported, list | tuple), name
    assert all(isinstance(n, str) for n in exported), name
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_version() -> None:
    assert isinstance(tidings.__version__, str) and tidings.__version__
