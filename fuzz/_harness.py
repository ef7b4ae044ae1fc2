"""Plumbing shared by the fuzz harnesses (imports nothing of virnet: each harness imports
virnet itself, inside ``atheris.instrument_imports()``, after ``start()``).

The wire core under test is the one ``virnet._impl`` picks: the compiled extension by
default, the pure-Python twin with ``VIRNET_NO_EXTENSIONS=1`` in the environment.  A
coverage build of the extension (``fuzz/build_cov.sh``) is found through ``PYTHONPATH``
like any other; it must be imported after ``atheris.Setup()``, which loads libFuzzer
with its symbols global, so every harness calls ``start()`` before importing virnet.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import atheris

_target: Callable[[bytes], None] | None = None


def scratch_dir(prefix: str) -> str:
    """A temporary directory for this harness process.  libFuzzer ends the process with
    ``_exit`` (atexit handlers do not run), so each one is named after its process and
    those of processes that are gone are removed here, at the next start."""
    import glob
    import shutil
    import tempfile

    for old in glob.glob(f"/tmp/{prefix}-*-*"):
        try:
            pid = int(old.rsplit("/", 1)[1].split("-")[1])
        except ValueError:
            continue
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir="/tmp")


def core_name() -> str:
    return "pure" if os.environ.get("VIRNET_NO_EXTENSIONS") else "compiled"


def _dispatch(data: bytes) -> None:
    assert _target is not None
    _target(data)


def start(is_main: bool) -> None:
    """Hand the command line to libFuzzer (``-runs=N``, ``-max_len=N``, corpus
    directories ...) when the harness runs as a script; nothing when it is imported."""
    if is_main:
        atheris.Setup(sys.argv, _dispatch)


def check_core() -> str:
    """Fail unless virnet runs with the core the environment asks for (never fuzz the
    other twin by accident: a missing extension falls back with only a warning)."""
    import virnet
    from virnet import _impl

    want_compiled = core_name() == "compiled"
    if virnet.compiled != want_compiled:
        raise SystemExit(f"fuzz: wanted the {core_name()} core, virnet loaded the other one")
    where = getattr(_impl.wire, "__file__", "?")
    return f"{core_name()} core ({where})"


def fuzz(name: str, test_one: Callable[[bytes], None]) -> None:
    global _target
    print(f"fuzz {name}: {check_core()}", file=sys.stderr, flush=True)
    # The harness's own branches count as coverage too: with an uninstrumented build of
    # the extension they are the only guidance the compiled core's runs get.
    atheris.instrument_func(getattr(test_one, "__func__", test_one))  # patches its code
    _target = test_one
    atheris.Fuzz()
