"""Shared plumbing of the benchmark scripts (``throughput.py``, ``latency.py``).

Each measurement runs as two child processes started from the script itself
(``python bench/<script>.py --child ROLE ...``): a *server* role that listens, prints
``READY <addr>`` and, for some scripts, ``RESULT <data>`` when done; and a *client* role
that connects to ``<addr>``.  The wire core of a child is chosen through its environment
(``VIRNET_NO_EXTENSIONS=1`` for the pure twin) and checked there, so a missing extension
fails loudly instead of silently measuring the other twin.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Skipped(Exception):
    """A scenario that cannot run on this machine (the reason is printed and kept)."""


@dataclass
class Transfer:
    """What one run of a throughput scenario reports: wall seconds for the volume, and
    optionally the CPU seconds per side (``{"recv": s, "send": s}``) spent during it."""

    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)
    reads: int | None = None  # socket reads on the receiving side, if known
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures


def transfer_timeout(nbytes: int) -> float:
    """How long a transfer of ``nbytes`` may take before it counts as hung."""
    return 60 + nbytes / 20e6  # generous: 20 MB/s is far below anything expected


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """User + system CPU time of this process's children that were waited for so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def child_env(core: str | None) -> dict[str, str]:
    """The environment for a child using the ``core`` twin (None: virnet not used)."""
    env = dict(os.environ)
    env.pop("VIRNET_NO_EXTENSIONS", None)
    if core == "pure":
        env["VIRNET_NO_EXTENSIONS"] = "1"
    return env


def check_core(core: str | None) -> None:
    """In a child: fail unless virnet runs with the twin the parent asked for."""
    if core is None:
        return
    import virnet

    if virnet.compiled != (core == "compiled"):
        raise SystemExit(f"wanted the {core} virnet core, got the other one")


def child_cmd(script: str, role: str, addr: str, core: str | None, *extra: str) -> list[str]:
    cmd = [sys.executable, os.path.abspath(script), "--child", role, "--addr", addr]
    if core is not None:
        cmd += ["--core", core]
    return [*cmd, *extra]


def virnet_uri(addr: str) -> str:
    """A child's address as a virnet URI: ``unix:/path`` -> ``unix:///path``,
    ``tcp:host:port`` -> ``tcp://host:port``."""
    if addr.startswith("unix:"):
        return f"unix://{addr[len('unix:') :]}"
    return f"tcp://{addr[len('tcp:') :]}"


def ready_addr(address: Any) -> str:
    """The address a server child announces (``READY ADDR``) for what it is bound to:
    with ``tcp:127.0.0.1:0`` the kernel picks the port."""
    if address.scheme == "unix":
        return f"unix:{address.path}"
    return f"tcp:{address.host}:{address.port}"


def unix_addr(workdir: Path, name: str) -> str:
    path = workdir / name
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return f"unix:{path}"


def run_pair(
    script: str,
    server_role: str,
    client_role: str,
    addr: str,
    *,
    core: str | None,
    extra: tuple[str, ...] = (),
    results_from: tuple[str, ...],
    timeout: float,
) -> dict[str, str]:
    """Run a server child and a client child; return the data of their ``RESULT`` lines
    as ``{"server": ..., "client": ...}``, requiring one from each side named in
    ``results_from``.  Both children must exit with status 0."""
    env = child_env(core)
    server = subprocess.Popen(
        child_cmd(script, server_role, addr, core, *extra),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    client: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline().split()
        if len(line) != 2 or line[0] != "READY":
            raise RuntimeError(f"{server_role} did not start: {line!r}")
        client = subprocess.Popen(
            child_cmd(script, client_role, line[1], core, *extra),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        client_out, _ = client.communicate(timeout=timeout)
        server_out, _ = server.communicate(timeout=30)
        if client.returncode != 0 or server.returncode != 0:
            raise RuntimeError(
                f"{server_role}/{client_role} failed: "
                f"exit status {server.returncode}/{client.returncode}"
            )
        results: dict[str, str] = {}
        for side, out in (("server", server_out), ("client", client_out)):
            for ln in out.splitlines():
                if ln.startswith("RESULT "):
                    results[side] = ln[len("RESULT ") :]
        for side in results_from:
            if side not in results:
                raise RuntimeError(f"{side} of {server_role}/{client_role} gave no RESULT")
        return results
    finally:
        # Only the two children started here are ever killed, by their own handles.
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def run_one(
    script: str,
    role: str,
    addr: str,
    *,
    core: str | None,
    extra: tuple[str, ...] = (),
    timeout: float,
) -> str:
    """Run one client child against a server that is not ours (e.g. libvirtd); return
    the data of its ``RESULT`` line.  It must exit with status 0."""
    child = subprocess.Popen(
        child_cmd(script, role, addr, core, *extra),
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(core),
    )
    try:
        out, _ = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:  # only the child started here, by its own handle
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{role} failed: exit status {child.returncode}")
    for ln in out.splitlines():
        if ln.startswith("RESULT "):
            return ln[len("RESULT ") :]
    raise RuntimeError(f"{role} gave no RESULT")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for mod in ("uvloop", "Cython", "virnet"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            info[mod] = None
    info["git"] = _git_state()
    info["sources"] = source_fingerprint()
    import virnet

    info["virnet_path"] = str(Path(virnet.__file__).resolve().parent)
    return info


def source_fingerprint() -> str:
    """A short hash of the virnet package the children import (its ``.py`` files and
    built extension), to notice a run that straddled a rebuild: the scripts compare it
    at the start and at the end.  To benchmark a frozen copy while the tree changes, copy
    ``src/virnet`` somewhere and put that directory first on ``PYTHONPATH``."""
    import hashlib

    import virnet

    pkg = Path(virnet.__file__).resolve().parent
    h = hashlib.sha256()
    for pattern in ("**/*.py", "*.so"):
        for path in sorted(pkg.glob(pattern)):
            h.update(str(path.relative_to(pkg)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def check_sources_unchanged(info: dict[str, Any]) -> bool:
    """Warn (on stderr) if virnet's sources changed since ``info`` was taken."""
    now = source_fingerprint()
    if now != info.get("sources"):
        print(
            f"WARNING: virnet's sources or extension changed during the run "
            f"({info.get('sources')} -> {now}): the results mix two versions",
            file=sys.stderr,
        )
        return False
    return True


def _git_state() -> str | None:
    """The commit benchmarked, with "+dirty" if src/ or pyx/ have local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "pyx"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A table with rich if it is installed, else plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in columns))
    Console(width=max(150, Console().width)).print(table)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime
