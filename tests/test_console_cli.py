"""``virnet console`` end to end: the real ``virnetd`` with real consoles, and the real
``virnet`` in a real terminal (tmux, driven with send-keys and read with capture-pane as a
person would: attach, type, see the echo, detach, then ``stty -a`` in the same terminal
to see it restored), and as a pipe from a script.  Every tmux server runs on a socket
name of its own and is killed at the end, every daemon by its PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 20.0
WAIT = 15.0


def _executable(name: str) -> str:
    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} not found", pytrace=False)
    return found


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("VIRNET_DEFAULT_URI", "VIRNET_SOCKET", "VIRNET_ROOT", "TMUX", "TMUX_PANE"):
        env.pop(var, None)
    env.update(extra)
    return env


class Daemon:
    """A ``virnetd`` subprocess with consoles; stderr collected by a thread."""

    def __init__(self, tmp: Path, consoles: dict[str, str], *extra: str) -> None:
        self.uri = f"unix://{tmp}/d.sock"
        cmd = [_executable("virnetd"), "--listen", self.uri, "--root", str(tmp / "root")]
        for name, spec in consoles.items():
            cmd += ["--console", f"{name}={spec}"]
        cmd += list(extra)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", env=_env(PS1="$ "),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_ready(self) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any("listening on" in line for line in self.lines)
                or self.proc.poll() is not None,
                timeout=START_TIMEOUT,
            )
        if not ok or self.proc.poll() is not None:
            self.stop()
            pytest.fail(f"virnetd did not start:\n{''.join(self.lines)}", pytrace=False)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vn-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(tmp: Path) -> Iterator[Daemon]:
    d = Daemon(tmp, {"cat": "cat", "sh": "/bin/sh -i"})
    try:
        d.wait_ready()
        yield d
    finally:
        rc = d.stop()
    assert rc == 0, "".join(d.lines)
    assert "Traceback" not in "".join(d.lines), "".join(d.lines)


def virnet(*args: str, uri: str, stdin: bytes = b"", timeout: float = 30,
           loop: str = "uvloop") -> subprocess.CompletedProcess[bytes]:
    env = _env(VIRNET_LOOP="asyncio") if loop == "asyncio" else _env()
    return subprocess.run(
        [_executable("virnet"), "-c", uri, *args], input=stdin, capture_output=True,
        timeout=timeout, env=env, check=False,
    )


# ----------------------------------------------------------------------------- tmux


class Tmux:
    """A terminal: a tmux server of its own running an interactive ``sh``."""

    def __init__(self, tmp: Path, width: int = 160, height: int = 40) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is needed to test the console in a terminal", pytrace=False)
        self.socket = f"virnet-test-{uuid.uuid4().hex[:12]}"
        self.env = _env(PS1="outer$ ", SHELL="/bin/sh", TERM="xterm-256color",
                        HOME=str(tmp), ENV="")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                   "/bin/sh -i")
        self.wait(r"outer\$ ")

    def _tmux(self, *args: str) -> str:
        res = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                             text=True, env=self.env, timeout=30, check=False)
        if res.returncode != 0:
            raise AssertionError(f"tmux {args!r} failed: {res.stderr}")
        return res.stdout

    def type(self, text: str, enter: bool = True) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        if enter:
            self._tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "t", "-S", "-200")

    def wait(self, pattern: str, timeout: float = WAIT, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if len(re.findall(pattern, text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} (x{count}) on the screen:\n{text}")
            time.sleep(0.05)

    def resize(self, width: int, height: int) -> None:
        self._tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       env=self.env, timeout=30, check=False)


@pytest.fixture
def term(tmp: Path) -> Iterator[Tmux]:
    t = Tmux(tmp)
    try:
        yield t
    finally:
        t.kill()


def attach(term: Tmux, daemon: Daemon, *args: str, loop: str = "uvloop") -> None:
    prefix = "VIRNET_LOOP=asyncio " if loop == "asyncio" else ""
    term.type(f"{prefix}{_executable('virnet')} -c {daemon.uri} console {' '.join(args)}")


def restored(term: Tmux, before: int = 1) -> str:
    """Type ``echo rc=$?`` and ``stty -a`` in the outer shell; check the terminal is back
    in cooked mode with echo; returns the exit status line's value."""
    term.type("echo rc=$?")
    screen = term.wait(r"rc=\d+", count=before)
    rc: str = re.findall(r"rc=(\d+)", screen)[-1]
    term.type("stty -a; echo stty-done")
    screen = term.wait(r"\nstty-done", count=before)
    flags = screen.rsplit("stty -a; echo stty-done", 1)[1]
    # The shell's own terminal description was never made non-blocking (dash says so).
    assert "NDELAY" not in screen, screen
    for flag in ("icanon", "echo", "isig", "icrnl", "opost"):
        assert re.search(rf"(?<![-\w]){flag}(?!\w)", flags), (flag, flags)
        assert not re.search(rf"-{flag}(?!\w)", flags), (flag, flags)
    return rc


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_attach_type_echo_detach_restores_the_terminal(
    daemon: Daemon, term: Tmux, loop: str
) -> None:
    attach(term, daemon, "cat", loop=loop)
    term.wait(r"Connected to console cat \(escape character is \^\]\)")
    term.type("hello-from-a-person")
    # The console's terminal echoes the line, then cat prints it back.
    term.wait(r"hello-from-a-person", count=2)
    term.keys("C-]")
    term.wait(r"outer\$ $|outer\$ \n", timeout=WAIT)
    assert restored(term) == "0"


def test_escape_anywhere_in_the_input_sends_what_came_before(
    daemon: Daemon, term: Tmux
) -> None:
    attach(term, daemon, "--no-history", "cat")
    term.wait(r"Connected to console cat")
    # One write: text, the escape, more text; the escape detaches mid-read.
    term.type("before-esc\x1dafter-esc", enter=False)
    term.wait(r"outer\$ ", count=2)
    assert restored(term) == "0"
    # What came before the escape reached the console (its terminal echoed it into the
    # history); what came after did not.
    res = virnet("console", "cat", uri=daemon.uri, stdin=b"")
    assert b"before-esc" in res.stdout and b"after-esc" not in res.stdout, res


def test_custom_escape_and_ctrl_c_goes_to_the_console(daemon: Daemon, term: Tmux) -> None:
    attach(term, daemon, "--escape", "^a", "--no-history", "sh")
    term.wait(r"escape character is \^A")
    term.type("sleep 30; echo not-interrupted")
    time.sleep(0.5)
    term.keys("C-c")  # raw mode: ^C is a byte for the console, not SIGINT for virnet
    term.wait(r"\^C")
    term.type("echo still-attached-$((40+2))")
    term.wait(r"still-attached-42")
    term.keys("C-]")  # not the escape now: goes to the console
    term.keys("C-a")
    term.wait(r"outer\$ ", count=2)
    screen = term.screen()
    assert "not-interrupted" not in screen.split("sleep 30; echo not-interrupted", 1)[1]
    assert restored(term) == "0"


def test_window_size_at_attach_and_on_sigwinch(daemon: Daemon, term: Tmux) -> None:
    attach(term, daemon, "--no-history", "sh")
    term.wait(r"Connected to console sh")
    term.type("stty size")
    term.wait(r"\n40 160\s")
    term.resize(120, 30)
    time.sleep(0.3)
    term.type("stty size")
    term.wait(r"\n30 120\s")
    term.keys("C-]")
    term.wait(r"outer\$ ", count=2)
    assert restored(term) == "0"


def _virnet_pid(daemon: Daemon) -> int:
    """The ``virnet console`` process talking to ``daemon`` (its socket is unique)."""
    needle = f"\0-c\0{daemon.uri}\0console\0".encode()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read()
            except OSError:
                continue
            if needle in cmdline:
                return int(entry)
        time.sleep(0.05)
    raise AssertionError("virnet not found")


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_signal_restores_the_terminal(daemon: Daemon, term: Tmux, signo: int) -> None:
    attach(term, daemon, "cat")
    term.wait(r"Connected to console cat")
    os.kill(_virnet_pid(daemon), signo)
    term.wait(r"outer\$ ", count=2)
    assert restored(term) == str(128 + signo)


def test_takeover_prints_the_reason_and_restores(daemon: Daemon, term: Tmux) -> None:
    attach(term, daemon, "cat")
    term.wait(r"Connected to console cat")
    res = virnet("console", "cat", uri=daemon.uri, stdin=b"")
    assert res.returncode == 1
    assert res.stderr.decode().splitlines() == [
        "virnet: error: console cat is in use by another session (FORCE takes it over)"
    ]
    res = virnet("console", "--force", "--no-history", "cat", uri=daemon.uri, stdin=b"x\n")
    assert res.returncode == 0, res
    screen = term.wait(r"virnet: error: console cat: console cat was taken over")
    assert screen.count("virnet: error:") == 1
    assert restored(term) == "1"


def test_daemon_going_away_restores_the_terminal(tmp: Path, term: Tmux) -> None:
    d = Daemon(tmp, {"cat": "cat"})
    try:
        d.wait_ready()
        attach(term, d, "cat")
        term.wait(r"Connected to console cat")
        d.proc.kill()  # not a clean stop: the socket just closes
        d.proc.wait()
        term.wait(r"virnet: error: console cat: .*connection")
        assert restored(term) == "1"
    finally:
        d.stop()


def test_program_exit_ends_the_session(daemon: Daemon, term: Tmux) -> None:
    attach(term, daemon, "--no-history", "sh")
    term.wait(r"Connected to console sh")
    term.type("exit 5")
    term.wait(r"\[virnetd: console sh: /bin/sh exited with status 5\]")
    term.wait(r"outer\$ ", count=2)
    assert restored(term) == "0"


# ----------------------------------------------------------------------------- pipe mode


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_pipe_mode_from_a_script(daemon: Daemon, loop: str) -> None:
    res = virnet("console", "--no-history", "sh", uri=daemon.uri, loop=loop,
                 stdin=b"echo piped-$((2+3))\necho second-line\n")
    assert res.returncode == 0, res
    assert res.stderr == b"", res
    out = res.stdout
    assert b"piped-5\r\n" in out and b"second-line\r\n" in out, out
    # Nothing of ours on stdout: what the console printed (echoed input included).
    assert b"Connected" not in out
    # History is on by default: a second run sees the first one's output first.
    res = virnet("console", "sh", uri=daemon.uri, stdin=b"", loop=loop)
    assert res.returncode == 0 and res.stdout.startswith(b"$ ") and b"piped-5" in res.stdout


def test_pipe_mode_waits_for_trailing_output(daemon: Daemon) -> None:
    # Output keeps coming after stdin's EOF; it is copied until quiet for --linger.
    script = b"for i in 1 2 3 4; do sleep 0.2; echo tick-$i; done\n"
    res = virnet("console", "--no-history", "--linger", "0.6", "sh", uri=daemon.uri,
                 stdin=script)
    assert res.returncode == 0, res
    assert b"tick-4\r\n" in res.stdout, res.stdout
    # With a short linger the session detaches before the late output.
    res = virnet("console", "--no-history", "--linger", "0.05", "sh", uri=daemon.uri,
                 stdin=b"sleep 1; echo too-late\n")
    assert res.returncode == 0 and b"\r\ntoo-late\r\n" not in res.stdout, res


def test_pipe_mode_binary_and_escape_bytes_pass_through(daemon: Daemon) -> None:
    res = virnet("console", "--no-history", "cat", uri=daemon.uri, stdin=b"a\x1db\n")
    assert res.returncode == 0, res
    assert b"a^]b" in res.stdout, res.stdout  # the terminal shows it; no detach


def test_pipe_mode_sigint_exits_130(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [_executable("virnet"), "-c", daemon.uri, "console", "cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        deadline = time.monotonic() + WAIT
        got = b""
        while b"ping\r\nping\r\n" not in got and time.monotonic() < deadline:
            got += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 130
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_errors_are_one_line(daemon: Daemon) -> None:
    res = virnet("console", "nope", uri=daemon.uri)
    assert res.returncode == 1
    assert res.stderr.decode().splitlines() == ["virnet: error: no console named 'nope'"]
    res = virnet("console", "--escape", "x", "cat", uri=daemon.uri)
    assert res.returncode == 2 and b"escape character must be" in res.stderr


def test_virnetd_refuses_bad_console_options(tmp: Path) -> None:
    for args, needle in (
        (["--console", "oops"], "NAME=COMMAND"),
        (["--console", "a=sh 'x"], "closing quotation"),
        (["--console", "a=/nonexistent/prog"], "cannot run '/nonexistent/prog'"),
    ):
        res = subprocess.run(
            [_executable("virnetd"), "--listen", f"unix://{tmp}/x.sock", "--root",
             str(tmp / "root"), *args], stdin=subprocess.PIPE, capture_output=True,
            text=True, timeout=30, env=_env(), check=False,
        )
        assert res.returncode in (1, 2), res
        # one log line at level ERROR
        (line,) = [x for x in res.stderr.splitlines() if " ERROR " in x]
        assert needle in line and " ERROR virnet.daemon: " in line, res.stderr
        assert not (tmp / "x.sock").exists()
    res = subprocess.run([_executable("virnetd"), "--help"], capture_output=True, text=True,
                         timeout=30, env=_env(), check=False)
    assert "NAME=unix:/PATH" in res.stdout and "--console-history" in res.stdout
