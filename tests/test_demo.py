"""``virnet demo`` end to end: the tour's steps, and nothing left behind (its directory,
its daemons, their sockets) unless ``--keep`` asked for the daemons to stay."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import virnet
import virnet.console
from virnet.services import files as f

TOUR_LIMIT = 30.0  # seconds the tour may take


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virnet.cli", "demo", *args], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})),
        check=False,
    )


def _describe(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout}--- stderr ---\n{res.stderr}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _daemons(out: str) -> dict[str, tuple[int, str]]:
    """role -> (pid, uri), from the tour's first lines."""
    found = re.findall(r"^(source|destination) virnetd: pid (\d+), listening on (\S+),",
                       out, re.M)
    return {role: (int(pid), uri) for role, pid, uri in found}


@pytest.mark.parametrize("no_extensions", [False, True], ids=["default", "no-extensions"])
def test_tour_runs_every_step_and_leaves_nothing(no_extensions: bool) -> None:
    env = {"VIRNET_NO_EXTENSIONS": "1"} if no_extensions else {}
    start = time.monotonic()
    res = _run("--size", "8M", env=env)
    took = time.monotonic() - start
    assert res.returncode == 0, _describe(res)
    assert "Traceback" not in res.stderr, _describe(res)
    assert took < TOUR_LIMIT, _describe(res)
    out = res.stdout
    rate = r"\d+\.\d \w?i?B/s \(local copy of the same bytes: \d+\.\d \w?i?B/s, \d+ %\)"
    for pattern in (
        r"^1\. files",
        rf"^   upload   disk\.img -> images/disk\.img  8\.0 MiB: {rate}$",
        rf"^   download images/disk\.img -> disk\.back 8\.0 MiB: {rate}$",
        r"^   checksum images/disk\.img on the daemon: [0-9a-f]{16}\.\.\., the same as both",
        rf"^   upload --sparse sparse\.img: 32\.0 MiB, of which 2\.0 MiB allocated .*{rate}$",
        r"^   download --sparse: the same bytes back",
        r"^   stat \.\./etc/passwd is refused",
        r"^2\. a console",
        r"^   \| hello from Linux on /dev/pts/\d+$",
        r"^   \| 30 100$",  # the window size the tour set
        r"^   \| 42$",
        r"^3\. a migration",
        rf"^   migrated 8\.0 MiB in \d+\.\d\d s: {rate}$",
        r"^   the destination daemon has committed it; sha256 equal on both daemons$",
        r"^4\. the wire core",
        r"^   wire core framing \+ decoding of 8 MiB: \d+\.\d+ GB/s$",
        r"^tour done in \d+\.\d s$",
    ):
        assert re.search(pattern, out, re.M), f"{pattern!r} not in\n{_describe(res)}"
    pure = no_extensions or bool(os.environ.get("VIRNET_NO_EXTENSIONS"))
    assert ("wire core: pure Python" if pure else "wire core: compiled (Cython)") in out
    # The migration's progress bar, on stderr.
    assert "migrate images/disk.img" in res.stderr and "8.0/8.0 MiB" in res.stderr
    # Nothing left: the directory (sockets, roots, logs) and both daemons are gone.
    (tmp,) = re.findall(r"^virnet demo in (\S+)$", out, re.M)
    assert out.rstrip().endswith(f"stopped the daemons and removed {tmp}")
    assert not os.path.exists(tmp), _describe(res)
    daemons = _daemons(out)
    assert set(daemons) == {"source", "destination"}, _describe(res)
    assert not any(_alive(pid) for pid, _ in daemons.values())


def test_quiet_tour_prints_nothing() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virnet.cli", "-q", "demo", "--size", "2M"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "", ""), _describe(res)


def test_bad_size_is_one_line() -> None:
    res = _run("--size", "1K")
    assert res.returncode == 1, _describe(res)
    assert res.stderr.splitlines() == ["virnet: error: demo size '1K': at least 1M"]


async def _check_daemons(source: str, destination: str) -> None:
    async with await virnet.connect(source) as client:
        assert await virnet.console.list(client) == ["shell"]
        listing = await client.call(f.LIST, f.PathArgs("images"))
        names = {e.name for e in listing.entries}
        assert names == {"disk.img", "sparse.img"}
    async with await virnet.connect(destination) as client:
        await client.ping()


def test_keep_leaves_the_daemons_running_until_stopped() -> None:
    res = _run("--size", "2M", "--keep")
    daemons = _daemons(res.stdout)
    try:
        assert res.returncode == 0, _describe(res)
        (tmp,) = re.findall(r"^virnet demo in (\S+)$", res.stdout, re.M)
        assert set(daemons) == {"source", "destination"}, _describe(res)
        assert all(_alive(pid) for pid, _ in daemons.values()), _describe(res)
        asyncio.run(_check_daemons(daemons["source"][1], daemons["destination"][1]))
        src = daemons["source"][1]
        assert f"virnet -c {src} console shell" in res.stdout, _describe(res)
        (stop,) = re.findall(r"^  (\S+/stop) ", res.stdout, re.M)
        assert stop == os.path.join(tmp, "stop")
        assert f"kill {daemons['source'][0]} {daemons['destination'][0]}" in res.stdout
        # The printed way to stop them: the daemons end, the directory goes.
        done = subprocess.run([stop], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0, done
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid, _ in daemons.values()):
            assert time.monotonic() < deadline, "the kept daemons did not stop"
            time.sleep(0.05)
        assert not os.path.exists(tmp)
    finally:
        for pid, _ in daemons.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_interrupted_tour_cleans_up() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "virnet.cli", "demo", "--size", "64M"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("1. files"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    out = "".join(lines) + rest
    assert proc.returncode != 0, out + err
    assert "Traceback" not in err, err
    (tmp,) = re.findall(r"^virnet demo in (\S+)$", out, re.M)
    assert not Path(tmp).exists(), out
    assert not any(_alive(pid) for pid, _ in _daemons(out).values()), out
