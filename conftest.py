"""Root conftest: shared by tests/ and bench/.

* ``wire`` fixture: the wire core twins, ``pure`` and ``compiled``.  The compiled one is
  required unless ``VIRNET_NO_EXTENSIONS`` is set: a missing extension fails loudly.
* Async tests run on both stock asyncio and uvloop (pytest-asyncio loop factories).
"""

from __future__ import annotations

import asyncio
import os
import sys
from types import ModuleType
from typing import Any

import pytest

NO_EXTENSIONS = bool(os.environ.get("VIRNET_NO_EXTENSIONS"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))


def pytest_report_header(config: pytest.Config) -> str:
    import virnet

    return f"virnet core: {'compiled (Cython)' if virnet.compiled else 'pure Python'}"


def pytest_sessionstart(session: pytest.Session) -> None:
    import virnet

    if not NO_EXTENSIONS and not virnet.compiled:
        raise pytest.UsageError(
            "the compiled core (virnet._wire, virnet._direct_loop) is missing but "
            "VIRNET_NO_EXTENSIONS is not set: "
            "build it (pip install -e .) or run with VIRNET_NO_EXTENSIONS=1"
        )


def _loop_factories() -> dict[str, Any]:
    factories: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return _loop_factories()


@pytest.fixture(params=["pure", "compiled"])
def wire(request: pytest.FixtureRequest) -> ModuleType:
    """The wire core module under test (``virnet._wire_py`` or ``virnet._wire``)."""
    import _cores

    return _cores.pure() if request.param == "pure" else _cores.compiled()
