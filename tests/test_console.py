"""CONSOLE against an in-process ``Daemon`` over real Unix sockets, with real programs on
real pseudo-terminals (``cat``, an interactive ``sh``) and a real relayed socket: echo,
history before any attach, takeover, detach and disconnect, program exit and restart,
window size, read-only listeners, relays that reconnect, the daemon stopping its
programs.  Both loops (root conftest), both cores (ci/test.sh / VIRNET_NO_EXTENSIONS)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import virnet
import virnet.console
from _rpcutil import remove_tree, short_tmpdir, sock_uri
from virnet.daemon.app import Daemon
from virnet.daemon.config import DaemonConfig
from virnet.daemon.console import ConsoleError, History, ProgramConsole, RelayConsole
from virnet.errors import ErrorCode, RPCError, StreamError
from virnet.services import console as c
from virnet.stream import Stream, StreamState

TIMEOUT = 10.0
SH = f"env PS1='$ ' {shlex.quote('/bin/sh')} -i"


class Env:
    def __init__(self, daemon: Daemon, tmp: str, uri: str, ro_uri: str) -> None:
        self.daemon = daemon
        self.tmp = tmp
        self.uri = uri
        self.ro_uri = ro_uri

    def console(self, name: str) -> ProgramConsole:
        con = self.daemon.consoles.consoles[name]
        assert isinstance(con, ProgramConsole)
        return con

    def relay(self, name: str) -> RelayConsole:
        con = self.daemon.consoles.consoles[name]
        assert isinstance(con, RelayConsole)
        return con


Start = Callable[..., Awaitable[Env]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start daemons with the given consoles; all stopped (programs too) at teardown."""
    made: list[tuple[Daemon, str]] = []

    async def make(consoles: dict[str, str], history: int = 64 * 1024) -> Env:
        tmp = short_tmpdir()
        daemon = Daemon(
            DaemonConfig(
                listen=[sock_uri(tmp)],
                listen_readonly=[sock_uri(tmp, "ro.sock")],
                root=os.path.join(tmp, "root"),
                consoles=consoles,
                console_history=history,
            )
        )
        made.append((daemon, tmp))
        uri, ro_uri = await daemon.start()
        return Env(daemon, tmp, uri, ro_uri)

    try:
        yield make
    finally:
        for daemon, tmp in made:
            await daemon.stop()
            remove_tree(tmp)


async def read_until(stream: Stream, pattern: bytes | re.Pattern[bytes],
                     timeout: float = TIMEOUT, seen: bytearray | None = None) -> bytes:
    """Read the stream until ``pattern`` (bytes or a regex) appears; returns all read."""
    got = seen if seen is not None else bytearray()

    def found() -> bool:
        if isinstance(pattern, bytes):
            return pattern in got
        return pattern.search(got) is not None

    try:
        async with asyncio.timeout(timeout):
            while not found():
                chunk = await stream.recv()
                if not chunk:
                    raise AssertionError(f"EOF before {pattern!r}; got {bytes(got)!r}")
                got += chunk
    except TimeoutError:
        raise AssertionError(f"no {pattern!r} within {timeout} s; got {bytes(got)!r}") from None
    return bytes(got)


async def read_to_eof(stream: Stream, timeout: float = TIMEOUT) -> bytes:
    got = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await stream.recv():
            got += chunk
    return bytes(got)


async def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: only the daemon can reap it, and that is the point.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[str]:
    """Names of the processes whose parent is ``pid``."""
    names = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                head, _, tail = fh.read().rpartition(")")
        except OSError:
            continue
        if int(tail.split()[1]) == pid:
            names.append(head.partition("(")[2])
    return names


# ----------------------------------------------------------------------------- basics


async def test_list_in_configured_order_also_read_only(start: Start) -> None:
    env = await start({"zeta": "cat", "alpha": "cat", "sock": "unix:/nonexistent/s"})
    for uri in (env.uri, env.ro_uri):
        async with await virnet.connect(uri) as client:
            assert await virnet.console.list(client) == ["zeta", "alpha", "sock"]
            reply = await client.call(c.LIST)
            assert reply.names == ["zeta", "alpha", "sock"]


async def test_echo_through_cat(start: Start) -> None:
    env = await start({"cat": "cat"})
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "cat")
        await stream.send(b"hello console\n")
        # The terminal echoes the line as typed, then cat writes it back.
        out = await read_until(stream, b"hello console\r\nhello console\r\n")
        assert out == b"hello console\r\nhello console\r\n"
        await stream.finish()
        assert stream.state is StreamState.FINISHED


async def test_interactive_sh_on_its_controlling_terminal(start: Start) -> None:
    env = await start({"sh": SH})
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "sh")
        seen = bytearray()
        await read_until(stream, b"$ ", seen=seen)
        await stream.send(b"echo answer=$((6*7)); tty\n")
        await read_until(stream, re.compile(rb"answer=42\r\n/dev/pts/\d+\r\n\$ "), seen=seen)
        # ^C reaches the foreground program through the line discipline: only a
        # program whose terminal is its controlling terminal is interrupted by it.
        seen.clear()
        await stream.send(b"sleep 30; echo not-interrupted\n")
        await read_until(stream, b"sleep 30; echo not-interrupted\r\n", seen=seen)
        sh_pid = env.console("sh").pid
        assert sh_pid is not None
        await wait_for(lambda: "sleep" in children(sh_pid))  # in the foreground now
        t0 = time.monotonic()
        await stream.send(b"\x03")
        await read_until(stream, b"$ ", seen=seen, timeout=5)
        assert time.monotonic() - t0 < 5
        assert b"not-interrupted\r\n" not in seen.split(b"\r\n", 1)[1]
        await stream.finish()


async def test_history_replayed_on_attach_unless_no_history(start: Start) -> None:
    env = await start({"early": "sh -c 'echo printed-before-any-attach; exec cat'"})
    con = env.console("early")
    await wait_for(lambda: b"printed-before-any-attach" in con.history.replay())
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "early")
        # History comes first, before any live output.
        out = await read_until(stream, b"printed-before-any-attach\r\n")
        assert out == b"printed-before-any-attach\r\n"
        await stream.send(b"live\n")
        await read_until(stream, b"live\r\nlive\r\n", seen=bytearray(out))
        await stream.finish()

        # Every OPEN replays it (now with the live part too), unless NO_HISTORY.
        stream = await virnet.console.open(client, "early")
        out = await read_until(stream, b"live\r\nlive\r\n")
        assert out.startswith(b"printed-before-any-attach\r\n")
        await stream.finish()

        stream = await virnet.console.open(client, "early", history=False)
        await stream.send(b"fresh\n")
        out = await read_until(stream, b"fresh\r\nfresh\r\n")
        assert out == b"fresh\r\nfresh\r\n"
        await stream.finish()


async def test_history_is_bounded_and_starts_on_a_line(start: Start) -> None:
    script = "i=0; while [ $i -lt 400 ]; do echo line-$i; i=$((i+1)); done; exec cat"
    env = await start({"lines": f"sh -c {shlex.quote(script)}"}, history=1024)
    con = env.console("lines")
    await wait_for(lambda: b"line-399\r\n" in con.history.replay())
    assert len(con.history) == 1024
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "lines")
        out = await read_until(stream, b"line-399\r\n")
        await stream.finish()
    assert len(out) <= 1024
    assert re.match(rb"line-\d+\r\n", out), out[:40]  # no partial first line
    numbers = [int(n) for n in re.findall(rb"line-(\d+)\r\n", out)]
    assert numbers == list(range(numbers[0], 400))


def test_history_ring_unit() -> None:
    h = History(10)
    h.append(b"abc")
    assert h.replay() == b"abc"
    h.append(b"defghijkl")
    assert h.replay() == b"cdefghijkl" and h.dropped == 2
    h.append(b"x" * 25)
    assert h.replay() == b"x" * 10 and len(h) == 10
    # Once output was dropped, the replay starts after a line break in its first quarter.
    h = History(20)
    h.append(b"y" * 30)
    h.append(b"ab\n" + b"z" * 17)
    assert h.replay() == b"z" * 17
    h.append(b"0123456789\nq")  # the only break is late: nothing is cut
    assert h.replay() == (b"z" * 8 + b"0123456789\nq")[-20:]
    assert History(0).replay() == b""
    with pytest.raises(ConsoleError):
        History(-1)


# ----------------------------------------------------------------------------- sessions


async def test_busy_without_force_then_takeover(start: Start) -> None:
    env = await start({"cat": "cat"})
    async with await virnet.connect(env.uri) as a, await virnet.connect(env.uri) as b:
        first = await virnet.console.open(a, "cat")
        await first.send(b"one\n")
        await read_until(first, b"one\r\none\r\n")

        with pytest.raises(RPCError) as info:
            await virnet.console.open(b, "cat")
        assert info.value.code == ErrorCode.OPERATION_FAILED
        assert "in use by another session" in str(info.value)
        assert not isinstance(info.value, StreamError)  # a plain error reply

        second = await virnet.console.open(b, "cat", force=True, history=False)
        # The old session's stream ends with an error that says so.
        with pytest.raises(StreamError) as info2:
            await read_to_eof(first)
        assert "taken over by another session" in str(info2.value)
        assert info2.value.code == ErrorCode.OPERATION_ABORTED
        assert first.state is StreamState.FAILED
        with pytest.raises(StreamError):
            await first.send(b"ignored\n")

        await second.send(b"two\n")
        out = await read_until(second, b"two\r\ntwo\r\n")
        assert b"one" not in out
        await second.finish()


async def test_disconnect_frees_the_console_at_once(start: Start) -> None:
    env = await start({"cat": "cat"})
    holder = await virnet.connect(env.uri)
    stream = await virnet.console.open(holder, "cat")
    await stream.send(b"x\n")
    await read_until(stream, b"x\r\nx\r\n")
    holder.protocol.transport.abort()  # type: ignore[union-attr]  # a crashed client
    await holder.wait_closed()
    con = env.console("cat")
    await wait_for(lambda: con.session is None, timeout=1.0)
    async with await virnet.connect(env.uri) as client:
        again = await virnet.console.open(client, "cat")  # no FORCE needed
        await again.send(b"y\n")
        await read_until(again, b"y\r\ny\r\n")
        await again.finish()


async def test_detach_keeps_the_program_running(start: Start) -> None:
    env = await start({"sh": SH})
    con = env.console("sh")
    pid = con.pid
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "sh", history=False)
        await stream.send(b"kept=across-sessions\n")
        await read_until(stream, b"$ ")
        await stream.finish()  # detach
        assert con.session is None
        await asyncio.sleep(0.1)
        assert con.pid == pid and pid is not None and alive(pid)

        stream = await virnet.console.open(client, "sh", history=False)
        await stream.send(b"echo value=$kept\n")
        await read_until(stream, b"value=across-sessions\r\n")
        await stream.finish()
    assert con.starts == 1


async def test_client_abort_frees_the_console(start: Start) -> None:
    env = await start({"cat": "cat"})
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "cat")
        await stream.abort()
        con = env.console("cat")
        await wait_for(lambda: con.session is None, timeout=1.0)
        stream = await virnet.console.open(client, "cat")
        await stream.finish()


async def test_program_exit_ends_the_stream_and_restarts_at_next_open(start: Start) -> None:
    env = await start({"sh": SH})
    con = env.console("sh")
    first_pid = con.pid
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "sh", history=False)
        await stream.send(b"echo bye; exit 3\n")
        out = await read_to_eof(stream)  # EOF, not an error
        await stream.finish()
        assert out.endswith(b"bye\r\n[virnetd: console sh: env exited with status 3]\r\n"), out
        assert con.proc is None and con.session is None
        assert first_pid is not None and not alive(first_pid)
        # Nothing runs until the next OPEN, which starts the program again; the history
        # it replays holds the exit line.
        assert await virnet.console.list(client) == ["sh"]
        stream = await virnet.console.open(client, "sh")
        out = await read_until(stream, b"$ ")
        assert b"[virnetd: console sh: env exited with status 3]\r\n" in out
        assert con.pid not in (None, first_pid) and con.starts == 2
        await stream.send(b"echo restarted\n")
        await read_until(stream, b"restarted\r\n$ ")
        await stream.finish()


async def test_exit_while_detached_is_in_the_history(start: Start) -> None:
    env = await start({"cat": "cat"})
    con = env.console("cat")
    pid = con.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: con.proc is None)
    line = b"[virnetd: console cat: cat killed by signal 9 (SIGKILL)]\r\n"
    assert con.history.replay().endswith(line)
    async with await virnet.connect(env.uri) as client:
        stream = await virnet.console.open(client, "cat")
        assert await read_until(stream, line) == line
        await stream.send(b"back\n")
        await read_until(stream, b"back\r\nback\r\n")
        await stream.finish()


async def test_program_that_cannot_start(start: Start, tmp_path: object) -> None:
    with pytest.raises(ConsoleError, match="cannot run '/nonexistent/prog'"):
        await start({"bad": "/nonexistent/prog --flag"})
    # A program that vanishes while the console is down: the next OPEN says why.
    tmp = short_tmpdir()
    try:
        script = os.path.join(tmp, "prog.sh")
        with open(script, "w") as fh:
            fh.write("#!/bin/sh\nexec cat\n")
        os.chmod(script, 0o755)
        env = await start({"p": script})
        con = env.console("p")
        os.unlink(script)
        assert con.pid is not None
        os.kill(con.pid, signal.SIGTERM)
        await wait_for(lambda: con.proc is None)
        async with await virnet.connect(env.uri) as client:
            with pytest.raises(RPCError, match=r"console p: cannot run .*No such file"):
                await virnet.console.open(client, "p")
            assert con.session is None
    finally:
        remove_tree(tmp)


async def test_errors_for_unknown_console_and_flags(start: Start) -> None:
    env = await start({"cat": "cat"})
    async with await virnet.connect(env.uri) as client:
        with pytest.raises(RPCError) as info:
            await virnet.console.open(client, "nope")
        assert info.value.code == ErrorCode.INVALID_ARG and "nope" in str(info.value)
        with pytest.raises(RPCError) as info:
            await client.open_stream(c.OPEN, c.OpenArgs("cat", 0x80))
        assert info.value.code == ErrorCode.INVALID_ARG
        with pytest.raises(RPCError) as info:
            await virnet.console.resize(client, "nope", 24, 80)
        assert info.value.code == ErrorCode.INVALID_ARG


# ----------------------------------------------------------------------------- resize


async def test_resize_sets_the_window_size_for_the_session_holder(start: Start) -> None:
    env = await start({"sh": SH})
    async with await virnet.connect(env.uri) as client, await virnet.connect(env.uri) as other:
        # No session yet: nobody may resize.
        with pytest.raises(RPCError) as info:
            await virnet.console.resize(client, "sh", 40, 120)
        assert info.value.code == ErrorCode.OPERATION_INVALID
        stream = await virnet.console.open(client, "sh", history=False)
        # A foreground job that waits for SIGWINCH, then says so.
        await stream.send(
            b"sh -c 'trap \"echo got-winch; exit\" WINCH; echo waiting; "
            b"while :; do sleep 0.05; done'\n"
        )
        seen = bytearray()
        await read_until(stream, b"waiting\r\n", seen=seen)
        await virnet.console.resize(client, "sh", 40, 120)
        await read_until(stream, b"got-winch\r\n$ ", seen=seen)  # it got SIGWINCH
        await stream.send(b"stty size\n")
        await read_until(stream, b"40 120\r\n", seen=seen)
        # Only the connection holding the session may resize.
        with pytest.raises(RPCError) as info:
            await virnet.console.resize(other, "sh", 10, 10)
        assert info.value.code == ErrorCode.OPERATION_INVALID
        assert "connection holding" in str(info.value)
        with pytest.raises(RPCError) as info:
            await virnet.console.resize(client, "sh", 0, 80)
        assert info.value.code == ErrorCode.INVALID_ARG
        await stream.finish()
        # The size stays with the console (and a restarted program gets it too).
        con = env.console("sh")
        assert (con.rows, con.cols) == (40, 120)


# ----------------------------------------------------------------------------- read-only


async def test_read_only_listener_refuses_open_and_resize(start: Start) -> None:
    env = await start({"cat": "cat"})
    async with await virnet.connect(env.ro_uri) as client:
        assert await virnet.console.list(client) == ["cat"]
        for attempt in (
            virnet.console.open(client, "cat"),
            virnet.console.resize(client, "cat", 24, 80),
        ):
            with pytest.raises(RPCError) as info:
                await attempt
            assert info.value.code == ErrorCode.OPERATION_DENIED
            assert "read only" in str(info.value)
    assert env.console("cat").session is None


# ----------------------------------------------------------------------------- relays


class UpstreamServer:
    """A Unix socket server standing in for a VM's serial port: greets each connection,
    echoes what it gets in upper case, can be stopped and started again."""

    def __init__(self, path: str, greeting: bytes) -> None:
        self.path = path
        self.greeting = greeting
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        writer.write(self.greeting)
        try:
            while data := await reader.read(4096):
                writer.write(data.upper())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await self.server.wait_closed()
        if os.path.exists(self.path):
            os.unlink(self.path)


async def test_relay_history_session_loss_and_reconnect(start: Start) -> None:
    tmp = short_tmpdir()
    path = os.path.join(tmp, "serial.sock")
    upstream = UpstreamServer(path, b"guest booted\r\n")
    await upstream.start()
    try:
        env = await start({"vm": f"unix:{path}"})
        relay = env.relay("vm")
        # Connected at start; the greeting went into the history with nobody attached.
        await wait_for(lambda: b"guest booted" in relay.history.replay())
        async with await virnet.connect(env.uri) as client:
            stream = await virnet.console.open(client, "vm")
            await read_until(stream, b"guest booted\r\n")
            await stream.send(b"hello relay")
            await read_until(stream, b"HELLO RELAY")
            with pytest.raises(RPCError) as info:
                await virnet.console.resize(client, "vm", 24, 80)
            assert info.value.code == ErrorCode.NO_SUPPORT

            # The other end goes away: the session ends with EOF after a line saying so.
            await upstream.stop()
            out = await read_to_eof(stream)
            await stream.finish()
            assert out.endswith(f"[virnetd: console vm: {path} closed the connection]\r\n"
                                .encode()), out
            # Down: OPEN says it cannot connect.
            with pytest.raises(RPCError, match="cannot connect to"):
                await virnet.console.open(client, "vm")

            # It comes back: the relay reconnects by itself, with nobody attached, and
            # what the other end says meanwhile is kept.
            upstream.greeting = b"guest rebooted\r\n"
            await upstream.start()
            await wait_for(lambda: b"guest rebooted" in relay.history.replay())
            assert relay.connects == 2
            stream = await virnet.console.open(client, "vm")
            out = await read_until(stream, b"guest rebooted\r\n")
            assert b"reconnected to" in out
            await stream.send(b"again")
            await read_until(stream, b"AGAIN")
            await stream.finish()
    finally:
        with_server = upstream.server
        if with_server is not None and with_server.is_serving():
            await upstream.stop()
        remove_tree(tmp)


async def test_relay_not_there_at_start_connects_later(start: Start) -> None:
    tmp = short_tmpdir()
    path = os.path.join(tmp, "late.sock")
    try:
        env = await start({"late": f"unix://{path}"})  # unix:///abs/path spelling
        relay = env.relay("late")
        assert relay.path == path and not relay.connected
        upstream = UpstreamServer(path, b"late hello\r\n")
        await upstream.start()
        try:
            await wait_for(lambda: relay.connected)
            async with await virnet.connect(env.uri) as client:
                stream = await virnet.console.open(client, "late")
                await read_until(stream, b"late hello\r\n")
                await stream.finish()
        finally:
            await upstream.stop()
    finally:
        remove_tree(tmp)


# ----------------------------------------------------------------------------- stopping


async def test_stop_ends_sessions_and_programs(start: Start) -> None:
    stubborn = "sh -c 'trap \"\" HUP TERM; while :; do sleep 0.05; done'"
    env = await start({"cat": "cat", "stubborn": stubborn})
    pids = [env.console(n).pid for n in ("cat", "stubborn")]
    client = await virnet.connect(env.uri)
    try:
        stream = await virnet.console.open(client, "cat")
        await env.daemon.stop()
        with pytest.raises(StreamError):
            await read_to_eof(stream)
    finally:
        await client.close()
    for pid in pids:
        assert pid is not None and not alive(pid), pid


# ----------------------------------------------------------------------------- config


def test_console_specs_are_checked() -> None:
    from virnet.daemon.console import parse_option

    assert parse_option("a=cat -u") == ("a", "cat -u")
    assert parse_option("vm=unix:/run/x.sock") == ("vm", "unix:/run/x.sock")
    for bad, needle in (
        ("noequals", "NAME=COMMAND"),
        ("=cat", "NAME=COMMAND"),
        ("a=", "NAME=COMMAND"),
        ("a b=cat", "printable"),
        ("a=cat 'unclosed", "closing quotation"),
        ("vm=unix:relative.sock", "absolute"),
        ("x" * 300 + "=cat", "longer than 256"),
    ):
        with pytest.raises(ConsoleError, match=needle):
            parse_option(bad)


def test_toml_consoles_and_history(tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    cfg = tmp_path / "virnetd.toml"
    cfg.write_text('console_history = 4096\n[consoles]\nsh = "/bin/sh -i"\n'
                   'vm = "unix:/run/vm.sock"\n')
    config = DaemonConfig.from_file(str(cfg))
    assert config.consoles == {"sh": "/bin/sh -i", "vm": "unix:/run/vm.sock"}
    assert config.console_history == 4096
    cfg.write_text("[consoles]\nsh = 3\n")
    with pytest.raises(ValueError, match=r"consoles\.sh must be a string"):
        DaemonConfig.from_file(str(cfg))
