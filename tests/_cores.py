"""The one place tests choose a wire core twin.

The whole suite runs twice (ci/test.sh): with the compiled core, which must then be
importable (a missing extension fails, it never falls back), and with
``VIRNET_NO_EXTENSIONS=1``, where only the pure twin is tested.  Tests that compare or
parametrize over both twins take them from here: the ``wire`` fixture (root conftest)
for one twin per test, ``compiled()`` for both side by side.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

NO_EXTENSIONS = bool(os.environ.get("VIRNET_NO_EXTENSIONS"))

MISSING = (
    "the compiled core virnet.{name} is missing ({exc}): build it with `pip install -e .`, "
    "or set VIRNET_NO_EXTENSIONS=1 for a pure-Python run"
)


def pure(name: str = "_wire") -> ModuleType:
    return importlib.import_module(f"virnet.{name}_py")


def compiled(*, module_level: bool = False, name: str = "_wire") -> ModuleType:
    """``virnet._wire`` (or the core's other module, ``name``).  Under
    ``VIRNET_NO_EXTENSIONS`` the caller is skipped (the whole test module with
    ``module_level=True``); otherwise a missing extension is an error, never a silent
    fallback to the pure twin."""
    if NO_EXTENSIONS:
        pytest.skip("VIRNET_NO_EXTENSIONS is set: compiled core not tested",
                    allow_module_level=module_level)
    try:
        return importlib.import_module(f"virnet.{name}")
    except ImportError as exc:
        raise ImportError(MISSING.format(name=name, exc=exc)) from exc
