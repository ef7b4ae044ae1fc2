"""End-to-end tests of the installed executables ``virnetd`` and ``virnet``.

Everything here runs the real console scripts as subprocesses (no in-process shortcuts):
a daemon on a Unix socket under a short ``/tmp/vn-*`` directory, the client talking to it,
and the exit statuses and messages of docs/cli.md checked from the outside.  The tests
are synchronous on purpose: the executables run their own event loops.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

START_TIMEOUT = 20.0  # seconds for virnetd to say "listening on"
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
RUN_TIMEOUT = 60.0  # seconds for one client invocation


def _executable(name: str) -> str:
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"console script {name!r} not found next to the interpreter nor on PATH "
            "(install the project: pip install -e '.[test]')",
            pytrace=False,
        )
    return found


#: Where the client looks for its config file in these tests: nowhere that exists.
NO_CONFIG = "/tmp/virnet-e2e-no-config-home"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("VIRNET_DEFAULT_URI", "VIRNET_SOCKET", "VIRNET_ROOT"):
        env.pop(var, None)
    env["XDG_CONFIG_HOME"] = NO_CONFIG
    if extra:
        env.update(extra)
    return env


def _describe(res: subprocess.CompletedProcess[str]) -> str:
    return (
        f"command {res.args!r} exited {res.returncode}\n"
        f"--- stdout ---\n{res.stdout}--- stderr ---\n{res.stderr}"
    )


def run_virnet(
    *args: str, uri: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [_executable("virnet")]
    if uri is not None:
        cmd += ["-c", uri]
    cmd += list(args)
    return subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=_env(env),
        check=False,
    )


def ok(*args: str, uri: str | None = None) -> str:
    """Run ``virnet``, require success with a silent stderr, return stdout."""
    res = run_virnet(*args, uri=uri)
    assert res.returncode == 0, _describe(res)
    assert res.stderr == "", _describe(res)
    return res.stdout


def failed(*args: str, uri: str | None = None, needles: tuple[str, ...] = ()) -> str:
    """Run ``virnet``, require exit 1 with one clean error line; return that line."""
    res = run_virnet(*args, uri=uri)
    assert res.returncode == 1, _describe(res)
    assert res.stdout == "", _describe(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, _describe(res)
    assert lines[0].startswith("virnet: error: "), _describe(res)
    for needle in needles:
        assert needle.lower() in lines[0].lower(), _describe(res)
    return lines[0]


class VirnetDaemon:
    """One ``virnetd`` subprocess; stderr is collected by a thread for the whole run."""

    def __init__(
        self, root: Path, listen: list[str], readonly: tuple[str, ...] | list[str] = ()
    ) -> None:
        self.listen = list(listen)
        self.readonly = list(readonly)
        cmd = [_executable("virnetd"), "--root", str(root)]
        for uri in self.listen:
            cmd += ["--listen", uri]
        for uri in self.readonly:
            cmd += ["--listen-readonly", uri]
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=_env(),
        )
        self._reader = threading.Thread(target=self._read, name="virnetd-stderr", daemon=True)
        self._reader.start()
        self.returncode: int | None = None
        self.killed = False

    @property
    def uri(self) -> str:
        return self.listen[0]

    @property
    def ro_uri(self) -> str:
        return self.readonly[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def _announced(self) -> int:
        return sum(1 for line in self._lines if " virnet.daemon: listening on " in line)

    def wait_ready(self) -> None:
        expected = len(self.listen) + len(self.readonly)
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._announced() >= expected or self._eof, timeout=START_TIMEOUT
            )
            ready = ready and self._announced() >= expected
        if not ready:
            self.stop()
            pytest.fail(
                f"virnetd (pid {self.pid}) did not report 'listening on' for all {expected} "
                f"listeners within {START_TIMEOUT} s (exit status {self.returncode})\n"
                f"--- stderr ---\n{self.stderr}",
                pytrace=False,
            )

    def stop(self) -> int:
        """SIGTERM exactly this process, SIGKILL after STOP_TIMEOUT; idempotent."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    self.proc.kill()
                    self.proc.wait()
            self.returncode = self.proc.returncode
            self._reader.join(timeout=STOP_TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return self.returncode


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vn-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(base: Path) -> Iterator[VirnetDaemon]:
    """A daemon shared by the module: a read-write and a read-only Unix listener."""
    d = VirnetDaemon(base / "root", [f"unix://{base}/d.sock"], readonly=[f"unix://{base}/ro.sock"])
    try:
        d.wait_ready()
        yield d
    finally:
        rc = d.stop()
    assert not d.killed, f"virnetd ignored SIGTERM\n{d.stderr}"
    assert rc == 0, f"virnetd exited {rc}\n{d.stderr}"
    assert "Traceback" not in d.stderr, d.stderr


@pytest.fixture
def area(daemon: VirnetDaemon, base: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the shared daemon's root, named after the test."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    path = base / "root" / name
    path.mkdir()
    return path


@pytest.fixture
def spawn() -> Iterator[Callable[..., VirnetDaemon]]:
    """Start dedicated daemons (each in its own /tmp/vn-* dir); all stopped at teardown."""
    started: list[VirnetDaemon] = []
    dirs: list[str] = []

    def start(readonly: bool = False) -> VirnetDaemon:
        tmp = tempfile.mkdtemp(prefix="vn-", dir="/tmp")
        dirs.append(tmp)
        d = VirnetDaemon(
            Path(tmp) / "root",
            [f"unix://{tmp}/d.sock"],
            readonly=[f"unix://{tmp}/ro.sock"] if readonly else [],
        )
        started.append(d)
        d.wait_ready()
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()
        for tmp in dirs:
            shutil.rmtree(tmp, ignore_errors=True)


def _socket_path(uri: str) -> str:
    assert uri.startswith("unix://")
    return uri.removeprefix("unix://")


# ---------------------------------------------------------------------------- ping


def test_ping_count_prints_one_pong_per_round(daemon: VirnetDaemon) -> None:
    out = ok("ping", "--count", "2", uri=daemon.uri)
    lines = out.splitlines()
    assert len(lines) == 4, out
    for seq, line in enumerate(lines[:2], 1):
        assert re.fullmatch(
            rf"pong from {re.escape(daemon.uri)}: seq={seq} time=\d+\.\d+ ms", line
        ), line
    # ping(8)'s summary
    assert lines[2] == f"--- {daemon.uri} ping statistics ---", out
    assert re.fullmatch(r"2 pings, rtt min/avg/max/mdev = (\d+\.\d{3}/){3}\d+\.\d{3} ms",
                        lines[3]), out


def test_ping_quiet_prints_nothing(daemon: VirnetDaemon) -> None:
    assert ok("-q", "ping", "--count", "2", uri=daemon.uri) == ""


# ---------------------------------------------------------------------------- FILES


def test_mkdir_then_ls_plain_and_json(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    assert ok("mkdir", f"{d}/sub", uri=daemon.uri) == ""
    assert (area / "sub").is_dir()
    (area / "a.bin").write_bytes(b"x" * 1000)
    (area / "empty").write_bytes(b"")
    os.mkfifo(area / "pipe")

    listing = json.loads(ok("ls", d, "--json", uri=daemon.uri))
    for entry in listing:
        st = os.lstat(area / entry["name"])
        assert entry.pop("mtime_ns") == st.st_mtime_ns, entry
        assert entry.pop("mtime").startswith(time.strftime("%Y-%m-%dT", time.localtime(
            st.st_mtime))), entry
    assert listing == [
        {"name": "a.bin", "kind": "file", "size": 1000},
        {"name": "empty", "kind": "file", "size": 0},
        {"name": "pipe", "kind": "other", "size": 0},
        {"name": "sub", "kind": "directory", "size": (area / "sub").stat().st_size},
    ]

    # kind, size with its unit, local mtime (date, time), name
    plain = ok("ls", d, uri=daemon.uri).splitlines()
    rows = [line.split() for line in plain]
    assert [r[5] for r in rows] == ["a.bin", "empty", "pipe", "sub/"], plain
    assert [r[0] for r in rows] == ["file", "file", "other", "directory"], plain
    assert [" ".join(r[1:3]) for r in rows[:3]] == ["1000 B", "0 B", "0 B"], plain
    mtime = time.localtime(os.stat(area / "a.bin").st_mtime)
    assert " ".join(rows[0][3:5]) == time.strftime("%Y-%m-%d %H:%M:%S", mtime), plain

    # No path: the data root itself, which holds this test's directory.
    top = json.loads(ok("ls", "--json", uri=daemon.uri))
    assert {"name": d, "kind": "directory", "size": area.stat().st_size} in [
        {k: e[k] for k in ("name", "kind", "size")} for e in top]
    # An empty directory lists as nothing.
    assert json.loads(ok("ls", f"{d}/sub", "--json", uri=daemon.uri)) == []
    assert ok("ls", f"{d}/sub", uri=daemon.uri) == ""


def test_stat_plain_and_json(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    data = os.urandom(12345)
    (area / "f.bin").write_bytes(data)
    os.chmod(area / "f.bin", 0o640)
    (area / "dir").mkdir()
    os.chmod(area / "dir", 0o750)

    st = os.stat(area / "f.bin")
    info = json.loads(ok("stat", f"{d}/f.bin", "--json", uri=daemon.uri))
    assert info == {
        "path": f"{d}/f.bin",
        "kind": "file",
        "size": 12345,
        "allocation": st.st_blocks * 512,
        "mtime_ns": st.st_mtime_ns,
        "mtime": datetime.fromtimestamp(st.st_mtime_ns / 1e9).astimezone().isoformat(),
        "mode": "0640",
    }

    plain = ok("stat", f"{d}/f.bin", uri=daemon.uri)
    fields = dict(
        (key.rstrip(":"), value.strip())
        for key, value in (line.split(None, 1) for line in plain.splitlines())
    )
    assert fields["path"] == f"{d}/f.bin"
    assert fields["kind"] == "file"
    assert fields["size"] == "12345 (12.1 KiB)"
    assert fields["mode"] == "0640"
    # local time to the nanosecond, with the UTC offset, as stat(1) prints it
    local = time.localtime(st.st_mtime)
    assert fields["mtime"] == (time.strftime("%Y-%m-%d %H:%M:%S", local)
                               + f".{st.st_mtime_ns % 10**9:09d} "
                               + time.strftime("%z", local)), plain

    dinfo = json.loads(ok("stat", f"{d}/dir", "--json", uri=daemon.uri))
    assert dinfo["kind"] == "directory"
    assert dinfo["mode"] == "0750"
    # Redundant separators and "." components name the same thing.
    again = json.loads(ok("stat", f"./{d}//dir/.", "--json", uri=daemon.uri))
    assert again["kind"] == "directory" and again["mtime_ns"] == dinfo["mtime_ns"]


def test_checksum_sha256_and_md5(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    data = os.urandom(3 * 1024 * 1024 + 17)  # several of the daemon's read blocks
    (area / "blob").write_bytes(data)
    (area / "nothing").write_bytes(b"")

    out = ok("checksum", f"{d}/blob", uri=daemon.uri)
    assert out == f"{hashlib.sha256(data).hexdigest()}  {d}/blob\n"
    out = ok("checksum", f"{d}/blob", "--algorithm", "md5", uri=daemon.uri)
    assert out == f"{hashlib.md5(data).hexdigest()}  {d}/blob\n"
    out = ok("checksum", f"{d}/nothing", uri=daemon.uri)
    assert out == f"{hashlib.sha256(b'').hexdigest()}  {d}/nothing\n"


def test_rm_file_and_empty_directory(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    (area / "gone.txt").write_text("bye")
    (area / "emptydir").mkdir()
    assert ok("rm", f"{d}/gone.txt", uri=daemon.uri) == ""
    assert not (area / "gone.txt").exists()
    assert ok("rm", f"{d}/emptydir", uri=daemon.uri) == ""
    assert not (area / "emptydir").exists()
    failed("rm", f"{d}/gone.txt", uri=daemon.uri, needles=("no such file",))


# ---------------------------------------------------------------------------- errors


def test_stat_missing_path_is_one_error_line(daemon: VirnetDaemon, area: Path) -> None:
    line = failed("stat", f"{area.name}/missing", uri=daemon.uri, needles=("no such file",))
    assert f"{area.name}/missing" in line


def test_mkdir_existing_fails_cleanly(daemon: VirnetDaemon, area: Path) -> None:
    (area / "here").mkdir()
    failed("mkdir", f"{area.name}/here", uri=daemon.uri, needles=("exists",))
    failed("mkdir", f"{area.name}/no/such/parent", uri=daemon.uri, needles=("no such file",))


@pytest.mark.parametrize("path", ["../x", "a/../../x", "a/b/../../../x", "/../x"])
@pytest.mark.parametrize("command", ["stat", "ls", "checksum"])
def test_escaping_paths_are_refused(daemon: VirnetDaemon, command: str, path: str) -> None:
    failed(command, path, uri=daemon.uri, needles=("refused",))


@pytest.mark.parametrize("command", ["stat", "ls", "checksum"])
def test_absolute_paths_are_inside_the_root(daemon: VirnetDaemon, command: str) -> None:
    # A leading / is the data root: /etc/passwd is etc/passwd under it.
    line = failed(command, "/etc/passwd", uri=daemon.uri, needles=("no such file",))
    assert line == f"virnet: error: {command} /etc/passwd: No such file or directory"


def test_writes_outside_the_root_are_refused(daemon: VirnetDaemon, base: Path) -> None:
    outside = base / "outside-writes"
    outside.mkdir(exist_ok=True)
    victim = outside / "victim"
    victim.write_text("keep me")
    # absolute: inside the root, where there is no such path
    failed("rm", str(victim), uri=daemon.uri, needles=("no such file",))
    failed("rm", "../outside-writes/victim", uri=daemon.uri, needles=("refused",))
    failed("mkdir", str(outside / "new"), uri=daemon.uri, needles=("no such file",))
    failed("mkdir", "../outside-writes/new", uri=daemon.uri, needles=("refused",))
    assert victim.read_text() == "keep me"
    assert not (outside / "new").exists()


def test_data_root_itself_cannot_be_deleted(daemon: VirnetDaemon, base: Path) -> None:
    failed("rm", ".", uri=daemon.uri, needles=("refus",))
    assert (base / "root").is_dir()


def test_symlinks_leading_outside_are_refused(daemon: VirnetDaemon, area: Path, base: Path) -> None:
    d = area.name
    outside = base / "outside-links"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret"
    secret.write_text("secret")
    os.symlink("/etc", area / "esc")
    os.symlink(outside, area / "outdir")
    os.symlink(secret, area / "outfile")
    (area / "inside.txt").write_text("inside")
    os.symlink("inside.txt", area / "inlink")

    uri = daemon.uri
    for cmd in (
        ("stat", f"{d}/esc/passwd"),
        ("stat", f"{d}/esc"),
        ("ls", f"{d}/esc"),
        ("checksum", f"{d}/esc/passwd"),
        ("stat", f"{d}/outfile"),
        ("checksum", f"{d}/outfile"),
        ("ls", f"{d}/outdir"),
        ("mkdir", f"{d}/outdir/new"),
        ("rm", f"{d}/outdir/secret"),
        ("mkdir", f"{d}/esc/virnet-must-not-create"),
    ):
        failed(*cmd, uri=uri, needles=("outside the data root",))
    assert secret.read_text() == "secret"
    assert not (outside / "new").exists()
    assert not os.path.exists("/etc/virnet-must-not-create")

    # A symlink that stays inside the root is followed.
    info = json.loads(ok("stat", f"{d}/inlink", "--json", uri=uri))
    assert info["kind"] == "file" and info["size"] == len("inside")

    # DELETE removes the link itself, never its target.
    assert ok("rm", f"{d}/esc", uri=uri) == ""
    assert not os.path.lexists(area / "esc")
    assert os.path.isfile("/etc/passwd")
    assert ok("rm", f"{d}/outfile", uri=uri) == ""
    assert not os.path.lexists(area / "outfile")
    assert secret.read_text() == "secret"
    assert ok("rm", f"{d}/outdir", uri=uri) == ""
    assert not os.path.lexists(area / "outdir")
    assert secret.read_text() == "secret"
    assert ok("rm", f"{d}/inlink", uri=uri) == ""
    assert (area / "inside.txt").read_text() == "inside"


def test_rm_non_empty_directory_fails_cleanly(daemon: VirnetDaemon, area: Path) -> None:
    (area / "full").mkdir()
    (area / "full" / "child").write_text("x")
    failed("rm", f"{area.name}/full", uri=daemon.uri, needles=("not empty",))
    assert (area / "full" / "child").read_text() == "x"


def test_checksum_bad_algorithm_or_target_fails_cleanly(daemon: VirnetDaemon, area: Path) -> None:
    (area / "f").write_text("data")
    (area / "dir").mkdir()
    # refused before connecting, with the valid names
    res = run_virnet("checksum", f"{area.name}/f", "--algorithm", "no-such-hash",
                     uri=daemon.uri)
    assert res.returncode == 2, _describe(res)
    assert "invalid choice: 'no-such-hash'" in res.stderr, _describe(res)
    assert "'sha256'" in res.stderr and "'md5'" in res.stderr, _describe(res)
    failed("checksum", f"{area.name}/dir", uri=daemon.uri)
    failed("checksum", f"{area.name}/missing", uri=daemon.uri, needles=("no such file",))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["stat"],
        ["frobnicate"],
        ["ls", "--no-such-flag"],
        ["ping", "--count", "zero"],
        ["ping", "--count", "0"],
    ],
    ids=["nothing", "stat-no-path", "unknown-command", "unknown-flag", "count-nan", "count-0"],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    res = run_virnet(*argv, uri="unix:///nonexistent/virnet-e2e.sock")
    assert res.returncode == 2, _describe(res)
    assert res.stdout == "", _describe(res)
    assert "Traceback" not in res.stderr, _describe(res)
    assert res.stderr.strip(), _describe(res)


def test_help_exits_0() -> None:
    res = run_virnet("--help")
    assert res.returncode == 0, _describe(res)
    assert "usage: virnet" in res.stdout


def test_nothing_listening_is_one_clean_line(base: Path) -> None:
    missing = base / "nobody.sock"
    failed("ping", uri=f"unix://{missing}", needles=(str(missing),))
    failed("ls", uri=f"unix://{base}/no/such/dir/x.sock")

    # A socket file that nobody listens on any more (a daemon that died).
    stale = base / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(stale))
    finally:
        s.close()
    failed("ping", uri=f"unix://{stale}", needles=(str(stale),))

    # Not a socket at all.
    regular = base / "regular.sock"
    regular.write_text("")
    failed("ping", uri=f"unix://{regular}")


def test_bad_uri_is_one_clean_line() -> None:
    res = run_virnet("ping", uri="ftp://example.invalid/x")
    assert res.returncode in (1, 2), _describe(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virnet: error: "), _describe(res)


# ---------------------------------------------------------------------------- read-only


def test_readonly_listener_allows_reads_denies_writes(area: Path, daemon: VirnetDaemon) -> None:
    d = area.name
    data = b"read me\n" * 100
    (area / "f.txt").write_bytes(data)
    ro = daemon.ro_uri

    assert json.loads(ok("stat", f"{d}/f.txt", "--json", uri=ro))["size"] == len(data)
    assert [{k: e[k] for k in ("name", "kind", "size")}
            for e in json.loads(ok("ls", d, "--json", uri=ro))] == [
        {"name": "f.txt", "kind": "file", "size": len(data)}
    ]
    assert ok("checksum", f"{d}/f.txt", uri=ro).split()[0] == hashlib.sha256(data).hexdigest()
    assert len(ok("ping", uri=ro).splitlines()) == 1

    failed("mkdir", f"{d}/newdir", uri=ro, needles=("read only",))
    failed("rm", f"{d}/f.txt", uri=ro, needles=("read only",))
    assert not (area / "newdir").exists()
    assert (area / "f.txt").read_bytes() == data
    # Refusals still come first for bad paths, even read-only.
    failed("stat", "../x", uri=ro, needles=("refused",))


# ---------------------------------------------------------------------------- daemon lifecycle


def test_unix_sockets_are_mode_0600(daemon: VirnetDaemon) -> None:
    for uri in (daemon.uri, daemon.ro_uri):
        st = os.lstat(_socket_path(uri))
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def test_sigterm_stops_gracefully_and_removes_sockets(
    spawn: Callable[..., VirnetDaemon],
) -> None:
    d = spawn(readonly=True)
    paths = [_socket_path(d.uri), _socket_path(d.ro_uri)]
    assert all(os.path.exists(p) for p in paths)
    assert len(ok("ping", uri=d.uri).splitlines()) == 1

    started = time.monotonic()
    rc = d.stop()
    elapsed = time.monotonic() - started
    assert not d.killed, d.stderr
    assert rc == 0, d.stderr
    assert elapsed < 5.0, f"virnetd took {elapsed:.1f} s to stop\n{d.stderr}"
    assert not any(os.path.lexists(p) for p in paths), d.stderr
    assert "Traceback" not in d.stderr, d.stderr
    failed("ping", uri=d.uri)


def run_virnetd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``virnetd`` that is expected to fail at start-up (so it returns by itself)."""
    return subprocess.run(
        [_executable("virnetd"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        env=_env(),
        check=False,
    )


def assert_startup_failed(
    res: subprocess.CompletedProcess[str], needle: str, status: int = 1
) -> None:
    """Exit ``status`` (2: a configuration error) with one log line at level ERROR."""
    assert res.returncode == status, _describe(res)
    assert "Traceback" not in res.stderr, _describe(res)
    errors = [line for line in res.stderr.splitlines() if " ERROR virnet.daemon: " in line]
    assert len(errors) == 1, _describe(res)
    assert needle in errors[0], _describe(res)
    assert " listening on " not in res.stderr, _describe(res)


@pytest.mark.parametrize("extra_listener", [False, True], ids=["alone", "after-another"])
def test_second_daemon_on_same_socket_fails(
    spawn: Callable[..., VirnetDaemon], extra_listener: bool
) -> None:
    first = spawn()
    path = _socket_path(first.uri)
    inode = os.lstat(path).st_ino
    tmp = Path(path).parent
    other = tmp / "other.sock"

    # With another listener first, that one binds before the clash: it must be closed
    # and its socket file removed, not left behind as a stray.
    listen = ["--listen", f"unix://{other}"] if extra_listener else []
    res = run_virnetd(*listen, "--listen", first.uri, "--root", str(tmp / "root"))
    assert_startup_failed(res, "in use")
    assert not os.path.lexists(other), _describe(res)

    # The first daemon's socket is untouched and still answers.
    assert os.lstat(path).st_ino == inode
    assert ok("ping", "--count", "2", uri=first.uri).count("pong from ") == 2
    assert first.proc.poll() is None


@pytest.mark.parametrize(
    "case", ["root-is-a-file", "root-uncreatable", "bad-scheme", "not-a-socket", "path-too-long"]
)
def test_daemon_startup_errors_are_one_clean_line(base: Path, case: str) -> None:
    tmp = base / f"startup-{case}"
    tmp.mkdir()
    (tmp / "plain-file").write_text("")
    root, listen, needle, status = str(tmp / "root"), f"unix://{tmp}/d.sock", "", 1
    if case == "root-is-a-file":
        root, needle, status = str(tmp / "plain-file"), "plain-file: not a directory", 2
    elif case == "root-uncreatable":
        root, needle, status = str(tmp / "plain-file" / "sub"), "plain-file", 2
    elif case == "bad-scheme":
        listen, needle = "ftp://localhost/x", "unsupported scheme"
    elif case == "not-a-socket":
        listen, needle = f"unix://{tmp}/plain-file", "not a socket"
    else:
        listen, needle = f"unix://{tmp}/{'s' * 120}.sock", "too long"
    assert_startup_failed(run_virnetd("--listen", listen, "--root", root), needle, status)
    assert (tmp / "plain-file").is_file()


def test_stale_socket_file_is_replaced() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vn-", dir="/tmp"))
    try:
        stale = tmp / "d.sock"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(str(stale))
        finally:
            s.close()
        d = VirnetDaemon(tmp / "root", [f"unix://{stale}"])
        try:
            d.wait_ready()
            assert len(ok("ping", uri=d.uri).splitlines()) == 1
        finally:
            assert d.stop() == 0, d.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _expect_disconnect(sock: socket.socket) -> None:
    sock.settimeout(10.0)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
    except ConnectionResetError:
        return


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00" + b"garbage, not a virnet packet" * 4,
        b"\xff\xff\xff\xff" + b"far too long",
        b"\x00\x00\x00\x1b" + b"\x00" * 64,  # 27: one below the minimum
    ],
    ids=["length-0", "length-huge", "length-27"],
)
def test_malformed_client_is_disconnected_others_unaffected(
    spawn: Callable[..., VirnetDaemon], garbage: bytes
) -> None:
    d = spawn()
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bad.connect(_socket_path(d.uri))
        # Let the good client connect while the bad one is open, then send the garbage.
        assert len(ok("ping", uri=d.uri).splitlines()) == 1
        bad.sendall(garbage)
        _expect_disconnect(bad)
    finally:
        bad.close()
    assert ok("ping", "--count", "2", uri=d.uri).count("pong from ") == 2
    assert d.proc.poll() is None, d.stderr

    rc = d.stop()
    log = d.stderr
    assert rc == 0, log
    assert "Traceback" not in log, log
    reasons = [line for line in log.splitlines() if "closing connection" in line]
    assert len(reasons) == 1, log
    assert "length" in reasons[0], log


def test_client_vanishing_mid_packet_is_harmless(spawn: Callable[..., VirnetDaemon]) -> None:
    d = spawn()
    for partial in (b"\x00\x00", b"\x00\x00\x00\x40" + b"\x20" * 10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(_socket_path(d.uri))
            s.sendall(partial)
        finally:
            s.close()
    assert len(ok("ping", uri=d.uri).splitlines()) == 1
    assert d.stop() == 0, d.stderr
    assert "Traceback" not in d.stderr, d.stderr


# ---------------------------------------------------------------------------- transfers

MiB = 1024 * 1024


def run_virnet_bytes(
    *args: str, uri: str | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``virnet`` with binary stdin/stdout (``upload -`` / ``download ... -``)."""
    cmd = [_executable("virnet")]
    if uri is not None:
        cmd += ["-c", uri]
    cmd += list(args)
    return subprocess.run(
        cmd, input=stdin, capture_output=True, timeout=RUN_TIMEOUT, env=_env(), check=False
    )


def _describe_bytes(res: subprocess.CompletedProcess[bytes]) -> str:
    return (
        f"command {res.args!r} exited {res.returncode}\n"
        f"--- stdout: {len(res.stdout)} bytes ---\n"
        f"--- stderr ---\n{res.stderr.decode(errors='replace')}"
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MiB):
            h.update(block)
    return h.hexdigest()


def _temps(*dirs: Path) -> list[str]:
    """Temporary files of an upload (``.NAME.*.virnet-part``, the daemon's) or of a
    download (``.NAME.*.part``, the client's) left anywhere under ``dirs``."""
    return [
        os.path.join(d, n)
        for top in dirs
        for d, _, names in os.walk(top)
        for n in names
        if n.endswith(".part")
    ]


_SPARSE_SIZE = 64 * MiB
_SPARSE_BLOCKS = {MiB: b"a" * 4096, 17 * MiB + 100: os.urandom(10_000), 40 * MiB: b"z" * 65536}


def _make_sparse(path: Path) -> str:
    """A 64 MiB file with three small data blocks and holes everywhere else (a trailing
    one too); returns the sha256 of its contents."""
    with open(path, "wb") as fh:
        fh.truncate(_SPARSE_SIZE)
        for offset, block in _SPARSE_BLOCKS.items():
            fh.seek(offset)
            fh.write(block)
    if os.stat(path).st_blocks * 512 >= 4 * MiB:
        pytest.skip("the file system under /tmp does not keep files sparse")
    expected = bytearray(_SPARSE_SIZE)
    for offset, block in _SPARSE_BLOCKS.items():
        expected[offset : offset + len(block)] = block
    return _sha(bytes(expected))


@pytest.fixture
def local(base: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh client-side directory outside the daemon's root, named after the test."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    path = base / "local" / name
    path.mkdir(parents=True)
    return path


def test_upload_then_download_round_trip(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    data = os.urandom(5 * MiB + 3)
    src = local / "src.bin"
    src.write_bytes(data)
    assert ok("upload", str(src), f"{d}/f.bin", uri=daemon.uri) == ""
    assert _file_sha(area / "f.bin") == _sha(data)
    assert stat.S_IMODE(os.stat(area / "f.bin").st_mode) == 0o644

    assert ok("download", f"{d}/f.bin", str(local / "back.bin"), uri=daemon.uri) == ""
    assert _file_sha(local / "back.bin") == _sha(data)
    # a directory as LOCAL: the remote file's name inside it
    assert ok("download", f"{d}/f.bin", str(local), uri=daemon.uri) == ""
    assert _file_sha(local / "f.bin") == _sha(data)

    # uploading again replaces the file (a new inode) and keeps its mode
    os.chmod(area / "f.bin", 0o640)
    inode = os.stat(area / "f.bin").st_ino
    new = os.urandom(MiB + 1)
    src.write_bytes(new)
    assert ok("upload", str(src), f"{d}/f.bin", uri=daemon.uri) == ""
    st = os.stat(area / "f.bin")
    assert _file_sha(area / "f.bin") == _sha(new)
    assert st.st_ino != inode and stat.S_IMODE(st.st_mode) == 0o640
    assert _temps(area, local) == []


def test_download_to_stdout_and_upload_from_stdin(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    data = os.urandom(3 * MiB + 5)
    (area / "f.bin").write_bytes(data)

    res = run_virnet_bytes("download", f"{d}/f.bin", "-", uri=daemon.uri)
    assert res.returncode == 0, _describe_bytes(res)
    assert res.stderr == b"", _describe_bytes(res)
    assert _sha(res.stdout) == _sha(data)

    res = run_virnet_bytes(
        "download", f"{d}/f.bin", "-", "--offset", "1000", "--length", "70000", uri=daemon.uri
    )
    assert res.returncode == 0, _describe_bytes(res)
    assert res.stdout == data[1000:71000]

    res = run_virnet_bytes("upload", "-", f"{d}/in.bin", uri=daemon.uri, stdin=data)
    assert res.returncode == 0, _describe_bytes(res)
    assert (res.stdout, res.stderr) == (b"", b""), _describe_bytes(res)
    assert _file_sha(area / "in.bin") == _sha(data)

    res = run_virnet_bytes("upload", "-", f"{d}/empty", uri=daemon.uri, stdin=b"")
    assert res.returncode == 0, _describe_bytes(res)
    assert (area / "empty").read_bytes() == b""

    # stdin in place: at an offset of an existing file
    res = run_virnet_bytes("upload", "-", f"{d}/in.bin", "--offset", "7", uri=daemon.uri,
                           stdin=b"PATCH")
    assert res.returncode == 0, _describe_bytes(res)
    assert _file_sha(area / "in.bin") == _sha(data[:7] + b"PATCH" + data[12:])
    assert _temps(area) == []


def test_sparse_download_and_upload(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    digest = _make_sparse(area / "sparse.img")

    assert ok("download", "--sparse", f"{d}/sparse.img", str(local / "s.img"),
              uri=daemon.uri) == ""
    st = os.stat(local / "s.img")
    assert st.st_size == _SPARSE_SIZE  # the trailing hole is there
    assert st.st_blocks * 512 < 2 * MiB
    assert _file_sha(local / "s.img") == digest

    assert ok("upload", "--sparse", str(local / "s.img"), f"{d}/up.img", uri=daemon.uri) == ""
    st = os.stat(area / "up.img")
    assert st.st_size == _SPARSE_SIZE
    assert st.st_blocks * 512 < 2 * MiB
    assert _file_sha(area / "up.img") == digest

    # without --sparse the bytes are the same (the holes travel as zeros)
    assert ok("download", f"{d}/sparse.img", str(local / "plain.img"), uri=daemon.uri) == ""
    assert _file_sha(local / "plain.img") == digest
    assert _temps(area, local) == []


def test_offset_and_length(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    data = os.urandom(MiB)
    (area / "f.bin").write_bytes(data)

    ok("download", f"{d}/f.bin", str(local / "part"), "--offset", "1000", "--length", "5000",
       uri=daemon.uri)
    assert (local / "part").read_bytes() == data[1000:6000]
    ok("download", f"{d}/f.bin", str(local / "tail"), "--offset", "0x100", uri=daemon.uri)
    assert (local / "tail").read_bytes() == data[256:]

    patch = os.urandom(3000)
    (local / "patch").write_bytes(patch)
    inode = os.stat(area / "f.bin").st_ino
    ok("upload", str(local / "patch"), f"{d}/f.bin", "--offset", "100", uri=daemon.uri)
    ok("upload", str(local / "patch"), f"{d}/f.bin", "--offset", "5000", "--length", "4",
       uri=daemon.uri)
    expected = data[:100] + patch + data[3100:5000] + patch[:4] + data[5004:]
    assert _file_sha(area / "f.bin") == _sha(expected)
    assert os.stat(area / "f.bin").st_ino == inode  # written in place

    failed("download", f"{d}/f.bin", str(local / "x"), "--offset", str(MiB + 1),
           uri=daemon.uri, needles=("beyond",))
    failed("download", f"{d}/f.bin", str(local / "x"), "--offset", "10", "--length", str(MiB),
           uri=daemon.uri, needles=("beyond",))
    failed("upload", str(local / "patch"), f"{d}/f.bin", "--length", "3001",
           uri=daemon.uri, needles=("larger",))
    failed("upload", str(local / "patch"), f"{d}/missing", "--offset", "1",
           uri=daemon.uri, needles=("no such file",))
    assert not (area / "missing").exists()
    assert not (local / "x").exists()
    res = run_virnet("download", f"{d}/f.bin", "-", "--offset", "-1", uri=daemon.uri)
    assert res.returncode == 2, _describe(res)
    assert _file_sha(area / "f.bin") == _sha(expected)
    assert _temps(area, local) == []


def test_exclusive_upload(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    (area / "taken").write_bytes(b"first")
    (local / "src").write_bytes(b"second")
    line = failed("upload", "--exclusive", str(local / "src"), f"{d}/taken", uri=daemon.uri,
                  needles=("exists",))
    assert f"{d}/taken" in line
    assert (area / "taken").read_bytes() == b"first"
    assert ok("upload", "--exclusive", str(local / "src"), f"{d}/free", uri=daemon.uri) == ""
    assert (area / "free").read_bytes() == b"second"
    assert _temps(area) == []


@pytest.mark.parametrize(
    "flags",
    [["--no-progress"], ["-q"], ["-q", "--progress"]],
    ids=["no-progress", "quiet", "quiet-beats-progress"],
)
def test_transfers_print_nothing_when_asked(
    daemon: VirnetDaemon, area: Path, local: Path, flags: list[str]
) -> None:
    d = area.name
    data = os.urandom(2 * MiB)
    (local / "src").write_bytes(data)
    top = [f for f in flags if f == "-q"]
    sub = [f for f in flags if f != "-q"]
    for argv in (
        [*top, "upload", str(local / "src"), f"{d}/f", *sub],
        [*top, "download", f"{d}/f", str(local / "back"), *sub],
    ):
        res = run_virnet(*argv, uri=daemon.uri)
        assert res.returncode == 0, _describe(res)
        assert (res.stdout, res.stderr) == ("", ""), _describe(res)
    assert (local / "back").read_bytes() == data
    raw = run_virnet_bytes(*top, "download", f"{d}/f", "-", *sub, uri=daemon.uri)
    assert raw.returncode == 0, _describe_bytes(raw)
    assert raw.stderr == b"", _describe_bytes(raw)
    assert raw.stdout == data


def test_progress_is_forced_without_a_terminal(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    data = os.urandom(3 * MiB)
    (local / "src").write_bytes(data)
    progress = re.compile(r"MiB|%|/s\b")

    res = run_virnet("upload", "--progress", str(local / "src"), f"{d}/f", uri=daemon.uri)
    assert res.returncode == 0, _describe(res)
    assert res.stdout == "", _describe(res)
    assert progress.search(res.stderr), _describe(res)
    assert "Traceback" not in res.stderr, _describe(res)

    res = run_virnet("download", "--progress", f"{d}/f", str(local / "back"), uri=daemon.uri)
    assert res.returncode == 0, _describe(res)
    assert progress.search(res.stderr), _describe(res)
    assert (local / "back").read_bytes() == data

    # to stdout: the bar goes to stderr, the data alone to stdout
    resb = run_virnet_bytes("download", "--progress", f"{d}/f", "-", uri=daemon.uri)
    assert resb.returncode == 0, _describe_bytes(resb)
    assert progress.search(resb.stderr.decode()), _describe_bytes(resb)
    assert resb.stdout == data

    # and without --progress (stderr is a pipe here): nothing
    res = run_virnet("download", f"{d}/f", str(local / "again"), uri=daemon.uri)
    assert res.returncode == 0 and res.stderr == "", _describe(res)


def test_failed_download_leaves_no_partial_local_file(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    failed("download", f"{d}/missing", str(local / "out"), uri=daemon.uri,
           needles=("no such file",))
    assert os.listdir(local) == []
    (local / "keep").write_bytes(b"precious")
    before = os.stat(local / "keep")
    failed("download", f"{d}/missing", str(local / "keep"), uri=daemon.uri,
           needles=("no such file",))
    (area / "dir").mkdir()
    failed("download", f"{d}/dir", str(local / "keep"), uri=daemon.uri,
           needles=("regular file",))
    failed("download", "../escape", str(local / "keep"), uri=daemon.uri, needles=("refused",))
    assert (local / "keep").read_bytes() == b"precious"
    assert os.stat(local / "keep").st_mtime_ns == before.st_mtime_ns
    assert os.listdir(local) == ["keep"]
    # to stdout: nothing on stdout, one error line (checked by failed())
    failed("download", f"{d}/missing", "-", uri=daemon.uri, needles=("no such file",))


def test_failed_uploads_are_one_clean_line(
    daemon: VirnetDaemon, area: Path, local: Path, base: Path
) -> None:
    d = area.name
    (local / "src").write_bytes(b"data")
    (area / "dir").mkdir()
    failed("upload", str(local / "nothing"), f"{d}/x", uri=daemon.uri, needles=("no such file",))
    failed("upload", str(local / "src"), f"{d}/no/such/dir/x", uri=daemon.uri,
           needles=("no such file",))
    failed("upload", str(local / "src"), "../outside-upload", uri=daemon.uri,
           needles=("refused",))
    failed("upload", str(local / "src"), "/tmp/outside-upload", uri=daemon.uri,
           needles=("no such file",))  # a leading / is the data root
    assert not (base / "outside-upload").exists()
    assert not (area / "x").exists() and not (area / "no").exists()
    assert sorted(os.listdir(area)) == ["dir"]
    # an existing directory as REMOTE: LOCAL's name inside it, like cp
    assert ok("upload", str(local / "src"), f"{d}/dir", uri=daemon.uri) == ""
    assert (area / "dir" / "src").read_bytes() == b"data"
    assert _temps(area) == []


def test_upload_over_a_symlink_leading_outside_replaces_the_link(
    daemon: VirnetDaemon, area: Path, local: Path, base: Path
) -> None:
    d = area.name
    outside = base / "outside-transfers"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret"
    secret.write_bytes(b"secret")
    os.symlink(secret, area / "link")
    os.symlink(outside, area / "outdir")
    (local / "src").write_bytes(b"new contents")
    failed("download", f"{d}/link", str(local / "got"), uri=daemon.uri,
           needles=("outside the data root",))
    failed("download", f"{d}/outdir/secret", str(local / "got"), uri=daemon.uri,
           needles=("outside the data root",))
    failed("upload", str(local / "src"), f"{d}/outdir/secret", uri=daemon.uri,
           needles=("outside the data root",))
    failed("upload", str(local / "src"), f"{d}/link", "--offset", "1", uri=daemon.uri,
           needles=("outside the data root",))
    assert not (local / "got").exists()
    assert ok("upload", str(local / "src"), f"{d}/link", uri=daemon.uri) == ""
    assert not os.path.islink(area / "link")
    assert (area / "link").read_bytes() == b"new contents"
    assert secret.read_bytes() == b"secret"
    assert os.listdir(outside) == ["secret"]


def test_readonly_listener_downloads_but_refuses_uploads(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    data = os.urandom(100_000)
    (area / "f").write_bytes(data)
    (local / "src").write_bytes(b"nope")
    assert ok("download", f"{d}/f", str(local / "f"), uri=daemon.ro_uri) == ""
    assert (local / "f").read_bytes() == data
    failed("upload", str(local / "src"), f"{d}/f", uri=daemon.ro_uri, needles=("read only",))
    failed("upload", str(local / "src"), f"{d}/new", uri=daemon.ro_uri,
           needles=("read only",))
    assert (area / "f").read_bytes() == data
    assert sorted(os.listdir(area)) == ["f"]


# ---------------------------------------------------------------------------- local targets


def _mknod(path: Path, minor: int) -> Path:
    """A private character device of the memory driver (1, 3: null; 1, 5: zero)."""
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, minor))
    return path


def _fifo_thread(path: Path, data: bytes | None) -> tuple[threading.Thread, bytearray]:
    """A thread at the other end of a FIFO: writes ``data``, or (None) reads to EOF."""
    got = bytearray()

    def run() -> None:
        if data is None:
            with open(path, "rb", buffering=0) as fh:
                while block := fh.read(MiB):
                    got.extend(block)
        else:
            with open(path, "wb", buffering=0) as fh:
                fh.write(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_download_into_devices_and_fifos_writes_in_place(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    data = os.urandom(3 * MiB + 5)
    (area / "big.bin").write_bytes(data)
    null = _mknod(local / "null", 3)
    assert ok("download", f"{d}/big.bin", str(null), uri=daemon.uri) == ""
    assert stat.S_ISCHR(os.lstat(null).st_mode)  # still the device, not a file

    fifo = local / "fifo"
    os.mkfifo(fifo)
    reader, got = _fifo_thread(fifo, None)
    assert ok("download", f"{d}/big.bin", str(fifo), uri=daemon.uri) == ""
    reader.join(timeout=RUN_TIMEOUT)
    assert _sha(bytes(got)) == _sha(data)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(local)) == ["fifo", "null"]


def test_upload_from_a_fifo_and_a_zero_device(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    data = os.urandom(2 * MiB + 3)
    fifo = local / "fifo"
    os.mkfifo(fifo)
    writer, _ = _fifo_thread(fifo, data)
    assert ok("upload", str(fifo), f"{d}/from-fifo", uri=daemon.uri) == ""
    writer.join(timeout=RUN_TIMEOUT)
    assert _file_sha(area / "from-fifo") == _sha(data)  # not 0 bytes: read until EOF

    zero = _mknod(local / "zero", 5)
    (area / "z.bin").write_bytes(b"\xff" * MiB)
    assert ok("upload", str(zero), f"{d}/z.bin", "--length", "1048576", uri=daemon.uri) == ""
    assert (area / "z.bin").read_bytes() == bytes(MiB)
    line = failed("upload", str(zero), f"{d}/new.bin", "--length", "1048576", uri=daemon.uri,
                  needles=("no such file",))
    assert line.endswith("(--offset/--length write in place into an existing file)"), line
    failed("upload", str(local), f"{d}/dir", uri=daemon.uri, needles=(f"{local}: is a directory",))
    assert _temps(area, local) == []


def test_stdin_with_a_length_must_be_met(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    (area / "f").write_bytes(b"0123456789")
    res = run_virnet_bytes("upload", "-", f"{d}/f", "--length", "4", uri=daemon.uri,
                           stdin=b"abcdEFGH")
    assert res.returncode == 0, _describe_bytes(res)
    assert (area / "f").read_bytes() == b"abcd456789"  # exactly 4 bytes, in place

    res = run_virnet_bytes("upload", "-", f"{d}/f", "--offset", "6", "--length", "10",
                           uri=daemon.uri, stdin=b"xyz")
    assert res.returncode == 1, _describe_bytes(res)
    assert res.stderr.decode() == (
        f"virnet: error: upload {d}/f: stdin: the source ended after 3 of the 10 bytes "
        "asked for\n"
    )
    assert len((area / "f").read_bytes()) == 10  # never extended: not committed
    assert _temps(area) == []


def test_sparse_download_to_stdout_through_a_pipe(daemon: VirnetDaemon, area: Path) -> None:
    d = area.name
    digest = _make_sparse(area / "sparse.img")
    virnet = subprocess.Popen(
        [_executable("virnet"), "-c", daemon.uri, "download", "--sparse", f"{d}/sparse.img", "-"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    assert virnet.stdout is not None
    h = hashlib.sha256()
    total = 0
    while block := virnet.stdout.read(MiB):  # the holes arrive as zeros
        h.update(block)
        total += len(block)
    _, err = virnet.communicate(timeout=RUN_TIMEOUT)
    assert virnet.returncode == 0 and err == b"", err
    assert (total, h.hexdigest()) == (_SPARSE_SIZE, digest)


def test_block_device_too_small_is_one_clear_line(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("losetup is not installed")
    backing = local / "backing.img"
    backing.write_bytes(b"\xaa" * MiB)
    res = subprocess.run([losetup, "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        d = area.name
        (area / "big.img").write_bytes(os.urandom(2 * MiB))
        line = failed("download", f"{d}/big.img", dev, uri=daemon.uri)
        assert line == (
            f"virnet: error: download {d}/big.img: {dev}: device is 1.0 MiB, "
            "the download is 2.0 MiB"
        )
        small = os.urandom(MiB // 2)
        (area / "small.img").write_bytes(small)
        assert ok("download", f"{d}/small.img", dev, "--no-sync", uri=daemon.uri) == ""
        with open(dev, "rb") as fh:
            assert fh.read() == small + b"\xaa" * (MiB // 2)
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_local_errors_are_one_line_without_errno_or_temp_names(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    d = area.name
    (area / "f").write_bytes(b"x")
    lines = [
        failed("download", f"{d}/f", str(local / "no" / "x"), uri=daemon.uri,
               needles=(f"download {d}/f: {local}/no/x: ", "no such file")),
        failed("upload", str(local / "nothing"), f"{d}/g", uri=daemon.uri,
               needles=(f"upload {d}/g: {local}/nothing: no such file or directory",)),
        failed("download", f"{d}/f", str(local / "no") + "/", uri=daemon.uri,
               needles=("not a directory",)),
    ]
    for line in lines:
        assert "[Errno" not in line and ".part" not in line, line
    assert os.listdir(local) == []


def test_no_sync_transfers(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    data = os.urandom(MiB + 1)
    (local / "src").write_bytes(data)
    assert ok("upload", "--no-sync", str(local / "src"), f"{d}/f", uri=daemon.uri) == ""
    assert ok("download", "--no-sync", f"{d}/f", str(local / "back"), uri=daemon.uri) == ""
    assert (local / "back").read_bytes() == data
    res = run_virnet("upload", "--help")
    assert "--no-sync" in res.stdout and "fsync" in res.stdout, _describe(res)


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_progress_says_committing_and_ends_at_the_summary_rate(
    daemon: VirnetDaemon, area: Path, local: Path, direction: str
) -> None:
    d = area.name
    data = os.urandom(4 * MiB)
    (area / "f").write_bytes(data)
    (local / "src").write_bytes(data)
    if direction == "download":
        argv = ["download", "--progress", f"{d}/f", str(local / "back")]
    else:
        argv = ["upload", "--progress", str(local / "src"), f"{d}/up"]
    res = run_virnet(*argv, uri=daemon.uri, env={"COLUMNS": "200"})
    assert res.returncode == 0, _describe(res)
    lines = res.stderr.splitlines()
    name = f"{d}/f" if direction == "download" else f"{d}/up"
    assert f"committing {direction} {name} ..." in lines, _describe(res)
    summary = re.fullmatch(r"\w+ 4\.0 MiB in \d+\.\d\d s \((\d+\.\d [KMG]iB/s)\)",
                           lines[-1])
    assert summary, _describe(res)
    bar = lines[-2]  # the bar's final state: complete, at the summary's rate
    assert bar.startswith(f"{direction} {name} "), _describe(res)
    assert "4.0/4.0 MiB" in bar and f" {summary.group(1)} " in bar, _describe(res)


# ---------------------------------------------------------------------------- demo


@pytest.mark.parametrize("no_extensions", [False, True], ids=["default", "no-extensions"])
def test_demo_prints_framing_rate(no_extensions: bool) -> None:
    env = {"VIRNET_NO_EXTENSIONS": "1"} if no_extensions else None
    res = run_virnet("demo", "--size", "16M", env=env)
    assert res.returncode == 0, _describe(res)
    assert "Traceback" not in res.stderr, _describe(res)
    assert re.search(r"framing.*\b16 MiB: \d+\.\d+ GB/s$", res.stdout, re.M), _describe(res)
    pure = no_extensions or bool(os.environ.get("VIRNET_NO_EXTENSIONS"))
    expected = "wire core: pure Python" if pure else "wire core: compiled (Cython)"
    assert expected in res.stdout, _describe(res)
