"""virnetd as an administrator meets it: one log format (text, the journal's, json),
each event logged once, and a data root that is checked (and created) with a clear line.
Each test runs the daemon as a subprocess, ``python -m virnet.daemon``."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from _rpcutil import remove_tree, short_tmpdir
from virnet.daemon import logs
from virnet.daemon.app import RootError, prepare_root

TEXT_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) "
    r"virnet(\.\w+)*: .+"
)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = short_tmpdir()
    yield Path(path)
    remove_tree(path)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    for var in ("VIRNET_ROOT", "VIRNET_SOCKET", "JOURNAL_STREAM", "LISTEN_PID"):
        env.pop(var, None)
    env.update(extra)
    return env


def _virnetd(*args: str) -> list[str]:
    return [sys.executable, "-m", "virnet.daemon", *args]


def _fails(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _virnetd(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=30, env=_env(), cwd=cwd, check=False,
    )


def _serve(tmp: Path, *args: str, stderr: int | IO[str] = subprocess.PIPE,
           cwd: Path | None = None, **env: str) -> tuple[int, str]:
    """Start virnetd, wait for its socket, SIGTERM it; its exit status and stderr."""
    sock = tmp / "d.sock"
    proc = subprocess.Popen(
        _virnetd("--listen", f"unix://{sock}", *args), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=_env(**env), cwd=cwd,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "virnetd did not start"
            time.sleep(0.02)
        time.sleep(0.1)  # the lines after the listener
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    return proc.returncode, err or ""


def test_text_format_one_line_per_event(tmp: Path) -> None:
    code, err = _serve(tmp, "--root", str(tmp / "root"))
    assert code == 0, err
    lines = err.splitlines()
    assert all(TEXT_LINE.fullmatch(line) for line in lines), err
    messages = [line.split(": ", 1)[1] for line in lines]
    assert messages == [
        f"created the data root {tmp / 'root'} (it did not exist)",
        f"listening on unix://{tmp / 'd.sock'}",
        f"data root {tmp / 'root'}",
        "stopping",
        "stopped",
    ], err


def test_json_format(tmp: Path) -> None:
    (tmp / "root").mkdir()
    code, err = _serve(tmp, "--root", str(tmp / "root"), "--log-format", "json")
    assert code == 0, err
    entries = [json.loads(line) for line in err.splitlines()]
    assert [e["message"] for e in entries] == [
        f"listening on unix://{tmp / 'd.sock'}", f"data root {tmp / 'root'}",
        "stopping", "stopped",
    ]
    for e in entries:
        assert set(e) == {"time", "level", "logger", "message"}, e
        assert e["level"] == "info" and e["logger"] == "virnet.daemon"


def test_the_configuration_file_sets_the_format(tmp: Path) -> None:
    (tmp / "virnetd.toml").write_text('log_format = "json"\nlog_level = "warning"\n')
    code, err = _serve(tmp, "--root", str(tmp), "--config", str(tmp / "virnetd.toml"))
    assert (code, err) == (0, "")  # nothing at warning or above
    (tmp / "bad.toml").write_text('log_format = "xml"\n')
    res = _fails("--root", str(tmp), "--config", str(tmp / "bad.toml"))
    assert res.returncode == 2, res
    assert re.fullmatch(r"\S+ ERROR virnet.daemon: .*bad.toml: log_format must be one of "
                        r"text, json\n", res.stderr), res.stderr


def test_journal_format_when_stderr_is_the_journal(tmp: Path) -> None:
    # The journal hands the service a socket and names it in JOURNAL_STREAM; any file
    # whose device and inode are the ones named does as well here.
    log_path = tmp / "journal"
    with open(log_path, "w") as fh:
        st = os.fstat(fh.fileno())
        code, _ = _serve(tmp, "--root", str(tmp), stderr=fh,
                         JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    assert code == 0
    assert log_path.read_text().splitlines() == [
        f"<6>virnet.daemon: listening on unix://{tmp / 'd.sock'}",
        f"<6>virnet.daemon: data root {tmp}",
        "<6>virnet.daemon: stopping",
        "<6>virnet.daemon: stopped",
    ]


def test_formatters_priorities_extra_fields_and_exceptions() -> None:
    out = io.StringIO()
    logs.setup("debug", "json", stream=out)
    log = logging.getLogger("virnet.test")
    try:
        log.warning("client %s paused", "c1", extra={"client": "c1", "bytes": 4096})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
        first, second = (json.loads(line) for line in out.getvalue().splitlines()[:2])
        assert first["message"] == "client c1 paused" and first["level"] == "warning"
        assert (first["client"], first["bytes"]) == ("c1", 4096)
        assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]
    finally:
        logs.setup("warning", "text", stream=sys.stderr)
    journal = logs.TextFormatter(journal=True)
    for level, prio in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                        (logging.ERROR, 3), (logging.CRITICAL, 2)):
        record = logging.makeLogRecord({"name": "virnet.x", "levelno": level, "msg": "m"})
        assert journal.format(record) == f"<{prio}>virnet.x: m"
    assert not logs.stderr_is_journal(io.StringIO())  # no descriptor: not the journal


@pytest.mark.parametrize("case", ["file", "inside-a-file", "no-parent"])
def test_unusable_root_is_one_line_and_exit_2(tmp: Path, case: str) -> None:
    (tmp / "plain").write_text("x")
    root, needle = {
        "file": (tmp / "plain", "not a directory"),
        "inside-a-file": (tmp / "plain" / "sub", "a component of the path is not a directory"),
        "no-parent": (tmp / "none" / "sub",
                      f"does not exist, and neither does its parent directory {tmp}/none"),
    }[case]
    res = _fails("--listen", f"unix://{tmp}/d.sock", "--root", str(root))
    assert res.returncode == 2, res
    (line,) = res.stderr.splitlines()
    assert TEXT_LINE.fullmatch(line), line
    assert f" ERROR virnet.daemon: data root {root}: {needle}" in line, line
    assert not (tmp / "d.sock").exists() and not (tmp / "none").exists()
    assert (tmp / "plain").read_text() == "x"


def test_read_only_root(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp / "ro").mkdir(mode=0o555)
    real_access = os.access
    # As root every directory is writable: make this one read-only as access(2) sees it.
    monkeypatch.setattr(os, "access", lambda p, m: not m & os.W_OK and real_access(p, m))
    with pytest.raises(RootError, match="not writable by this user"):
        prepare_root(str(tmp / "ro"))
    assert prepare_root(str(tmp / "ro"), writable=False) is False


def test_default_root_is_created_in_the_working_directory_with_a_line(tmp: Path) -> None:
    code, err = _serve(tmp, cwd=tmp)
    assert code == 0, err
    assert (tmp / "virnet-data").is_dir()
    assert f"created the data root {tmp / 'virnet-data'} (it did not exist)" in err
    code, err = _serve(tmp, cwd=tmp)  # there now: no such line
    assert code == 0 and "created" not in err, err


def test_virnet_root_is_used(tmp: Path) -> None:
    code, err = _serve(tmp, VIRNET_ROOT=str(tmp / "envroot"))
    assert code == 0, err
    assert f"data root {tmp / 'envroot'}\n" in err
