"""The ``virnet`` command line's usability: help, suffixes, global options, the config
file, exit statuses (SIGINT, EPIPE), peers that are not virnet, and the generated man
pages and completion scripts.  Real subprocesses against real daemons, as in
test_cli_e2e.py (whose fixtures and helpers these reuse)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import test_cli_e2e as e2e
from test_cli_e2e import (
    RUN_TIMEOUT,
    VirnetDaemon,
    _describe,
    _env,
    _executable,
    failed,
    ok,
    run_virnet,
)
from virnet._units import UnitError, format_rate, format_size, parse_rate, parse_size

ROOT = Path(__file__).resolve().parent.parent

# test_cli_e2e's fixtures: one daemon for the module, fresh directories per test.
base, daemon, area, local = e2e.base, e2e.daemon, e2e.area, e2e.local


# ---------------------------------------------------------------------------- units


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("0x100", 256), ("1K", 1024), ("1k", 1024), ("1KB", 1024),
    ("1KiB", 1024), ("1M", 1 << 20), ("4GiB", 4 << 30), ("1.5G", 3 << 29), ("2T", 2 << 40),
    ("10B", 10), (" 8 M ", 8 << 20),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "-1", "1X", "1.5", "nan", "1..5M", "1iB", "x1"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(UnitError):
        parse_size(text)


def test_rates_and_formats() -> None:
    assert parse_rate("100M/s") == parse_rate("100MiB/s") == parse_rate("100M") == 100 << 20
    assert format_size(1023) == "1023 B" and format_size(1536) == "1.5 KiB"
    assert format_size(1 << 30) == "1.0 GiB"
    assert format_rate(210.7 * (1 << 20)) == "210.7 MiB/s"


def test_suffixes_on_the_command_line(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    data = os.urandom(3000)
    (area / "f").write_bytes(data)
    ok("download", f"{area.name}/f", str(local / "part"), "--offset", "1K", "--length",
       "1KiB", uri=daemon.uri)
    assert (local / "part").read_bytes() == data[1024:2048]
    res = run_virnet("download", f"{area.name}/f", "-", "--length", "lots", uri=daemon.uri)
    assert res.returncode == 2 and "not a size: 'lots'" in res.stderr, _describe(res)


# ---------------------------------------------------------------------------- help


def test_version_of_both_tools() -> None:
    res = run_virnet("--version")
    assert res.returncode == 0 and res.stdout.startswith("virnet 0."), _describe(res)
    res2 = subprocess.run([_executable("virnetd"), "--version"], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, env=_env(), check=False)
    assert res2.returncode == 0 and res2.stdout.startswith("virnetd 0."), res2


def _options_and_help(command: str | None) -> str:
    res = run_virnet(*([command] if command else []), "--help", env={"COLUMNS": "200"})
    assert res.returncode == 0, _describe(res)
    return res.stdout


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    from virnet.cli import build_parser
    from virnet.daemon.__main__ import build_parser as daemon_parser

    top = build_parser()
    yield "virnet", top
    yield "virnetd", daemon_parser()
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from ((f"virnet {n}", p) for n, p in action.choices.items())


def test_every_option_and_positional_has_help_and_its_default() -> None:
    for name, parser in _parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"no help: {what}"
            default = action.default
            if default not in (None, False, True, [], argparse.SUPPRESS) and not isinstance(
                action, argparse._VersionAction
            ):
                assert "default" in action.help, f"default not shown: {what}"


def test_help_shows_defaults_and_explains() -> None:
    top = _options_and_help(None)
    assert "virnetd.sock" in top and "client.toml" in top and "(default" in top
    up = _options_and_help("upload")
    assert "write in place into the existing REMOTE" in up and "binary" in up
    cs = _options_and_help("checksum")
    assert "sha256" in cs and "md5" in cs
    res = run_virnet("help", "upload", env={"COLUMNS": "200"})
    assert res.returncode == 0 and res.stdout == up, _describe(res)
    assert run_virnet("help", "nosuch").returncode == 2


# ---------------------------------------------------------------------------- options


def test_global_options_after_the_command(daemon: VirnetDaemon, area: Path) -> None:
    (area / "f").write_bytes(b"abc")
    res = run_virnet("stat", f"{area.name}/f", "-c", daemon.uri, "--json")
    assert res.returncode == 0, _describe(res)
    assert json.loads(res.stdout)["size"] == 3
    assert ok("ping", "--count", "2", "-q", uri=daemon.uri) == ""
    res = run_virnet("ping", "--timeout", "5", "-c", daemon.uri)
    assert res.returncode == 0 and "pong from" in res.stdout, _describe(res)


def test_json_on_every_command(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    d = area.name
    (area / "f").write_bytes(b"hello")
    (local / "src").write_bytes(b"12345678")
    ping = json.loads(ok("--json", "ping", "--count", "2", uri=daemon.uri))
    assert ping["count"] == 2 and ping["min_ms"] <= ping["avg_ms"] <= ping["max_ms"]
    digest = json.loads(ok("checksum", f"{d}/f", "--json", uri=daemon.uri))
    assert digest["algorithm"] == "sha256" and len(digest["digest"]) == 64
    up = json.loads(ok("upload", str(local / "src"), f"{d}/up", "--json", uri=daemon.uri))
    assert up["operation"] == "upload" and up["bytes"] == 8 and up["remote"] == f"{d}/up"
    down = json.loads(ok("download", f"{d}/f", str(local / "f"), "--json", uri=daemon.uri))
    assert down["bytes"] == 5 and down["bytes_per_second"] > 0
    assert json.loads(ok("consoles", "--json", uri=daemon.uri)) == []


def test_ls_of_a_file_and_of_the_root(daemon: VirnetDaemon, area: Path) -> None:
    (area / "f").write_bytes(b"x" * 2048)
    (area / "sub").mkdir()
    line = ok("ls", f"{area.name}/f", uri=daemon.uri)
    assert line.split()[:3] == ["file", "2.0", "KiB"] and line.split()[-1] == f"{area.name}/f"
    names = [e["name"] for e in json.loads(ok("ls", "/", "--json", uri=daemon.uri))]
    assert area.name in names
    assert [e["name"] for e in json.loads(ok("ls", f"/{area.name}", "--json",
                                             uri=daemon.uri))] == ["f", "sub"]


def test_mkdir_parents(daemon: VirnetDaemon, area: Path) -> None:
    (area / "file").write_bytes(b"")
    assert ok("mkdir", "-p", f"{area.name}/a/b/c", uri=daemon.uri) == ""
    assert (area / "a" / "b" / "c").is_dir()
    assert ok("mkdir", "--parents", f"/{area.name}/a/b", uri=daemon.uri) == ""
    failed("mkdir", "-p", f"{area.name}/file/x", uri=daemon.uri,
           needles=(f"mkdir {area.name}/file/x: {area.name}/file exists and is not a dir",))


def test_upload_into_a_remote_directory(daemon: VirnetDaemon, area: Path, local: Path) -> None:
    (area / "images").mkdir()
    (local / "disk.raw").write_bytes(b"disk")
    assert ok("upload", str(local / "disk.raw"), f"{area.name}/images", uri=daemon.uri) == ""
    assert (area / "images" / "disk.raw").read_bytes() == b"disk"
    line = failed("upload", "-", f"{area.name}/images", uri=daemon.uri)
    assert "is a directory" in line


# ---------------------------------------------------------------------------- errors


def test_local_errors_name_the_operation_and_path(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    (area / "f").write_bytes(b"x")
    for line in (
        failed("upload", str(local / "nosuch.txt"), f"{area.name}/x", uri=daemon.uri,
               needles=(f"upload {area.name}/x: {local}/nosuch.txt: no such file",)),
        failed("upload", str(local), f"{area.name}/x", uri=daemon.uri,
               needles=(f"{local}: is a directory",)),
        failed("download", f"{area.name}/f", str(local / "nodir" / "x.txt"), uri=daemon.uri,
               needles=(f"download {area.name}/f: {local}/nodir/x.txt: ",)),
    ):
        assert "[Errno" not in line and ".part" not in line, line


def test_a_write_error_mid_download_names_the_path(
    daemon: VirnetDaemon, area: Path, local: Path
) -> None:
    """A local write failing part way (here EFBIG from a file size limit, the way
    ENOSPC fails): the path as given, the reason, no temporary file left."""
    import resource

    (area / "big").write_bytes(os.urandom(4 << 20))

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    res = subprocess.run(
        [_executable("virnet"), "-c", daemon.uri, "download", f"{area.name}/big",
         str(local / "out")], capture_output=True, text=True, timeout=RUN_TIMEOUT,
        env=_env(), preexec_fn=limit, check=False,
    )
    assert res.returncode == 1, _describe(res)
    assert res.stderr == (f"virnet: error: download {area.name}/big: {local}/out: "
                          "File too large\n"), _describe(res)
    assert os.listdir(local) == []


def test_system_errors_never_show_errno() -> None:
    import errno

    from virnet.cli._errors import CommandError, failing

    with pytest.raises(CommandError) as info, failing("download x"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/mnt/full/x")
    assert str(info.value) == "download x: /mnt/full/x: No space left on device"


def test_default_socket_hint(base: Path) -> None:
    res = run_virnet("ping", env={"XDG_RUNTIME_DIR": str(base / "no-runtime")})
    assert res.returncode == 1, _describe(res)
    sock = base / "no-runtime" / "virnet" / "virnetd.sock"
    assert res.stderr == (
        f"virnet: error: connect unix://{sock}: No such file or directory (is virnetd "
        "running? start it with `virnetd`, or pass -c URI)\n"
    ), _describe(res)


class _Listener:
    """A TCP listener on loopback that answers like something else than virnet."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.recv(65536)
                conn.sendall(self.reply)  # and keep the connection open

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[_Listener]:
    lst = _Listener(request.param)
    try:
        yield lst
    finally:
        lst.close()


@pytest.mark.parametrize("listener", [
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b"\x00\x00\x00\x10garbage!garbage!",
], ids=["http", "garbage"], indirect=True)
def test_a_peer_that_is_not_virnet(listener: _Listener) -> None:
    start = time.monotonic()
    line = failed("ls", uri=f"tcp://127.0.0.1:{listener.port}",
                  needles=(f"connect tcp://127.0.0.1:{listener.port}: not a virnet/libvirt "
                           "peer (packet length",))
    assert time.monotonic() - start < 10, line


@pytest.mark.parametrize("listener", [None], ids=["silent"], indirect=True)
def test_timeout_against_a_silent_peer(listener: _Listener) -> None:
    start = time.monotonic()
    failed("--timeout", "1", "ls", uri=f"tcp://127.0.0.1:{listener.port}",
           needles=("no answer to the handshake within 1 s", "--timeout"))
    assert time.monotonic() - start < 8


def test_sigint_exits_130(daemon: VirnetDaemon, local: Path) -> None:
    # SIGINT may be ignored by whatever started the tests: the client gets the default.
    proc = subprocess.Popen(
        [_executable("virnet"), "-c", daemon.uri, "ping", "--count", "1000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("pong from ")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err == "virnet: error: interrupted\n"


def test_broken_pipe_is_quiet(daemon: VirnetDaemon, area: Path) -> None:
    (area / "big").write_bytes(os.urandom(8 << 20))
    res = subprocess.run(
        ["bash", "-c", f'set -o pipefail; "$0" -c {daemon.uri} download '
         f'{area.name}/big - | head -c 10 | wc -c; echo "status ${{PIPESTATUS[0]}}"',
         _executable("virnet")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_env(), check=False,
    )
    assert res.stdout.split() == ["10", "status", "141"], res
    assert res.stderr == "", res


def _run_entry(prologue: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``virnet.cli.run`` (the console script's entry) in a fresh interpreter, after
    ``prologue``; an atexit hook says whether the interpreter's teardown ran."""
    code = (
        "import atexit, sys, threading, time\n"
        "atexit.register(lambda: print('teardown ran', file=sys.stderr))\n"
        f"{prologue}\n"
        "from virnet.cli import run\n"
        f"sys.argv = ['virnet', *{list(argv)!r}]\n"
        "run()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=RUN_TIMEOUT, env=_env(), check=False,
    )


def test_the_command_exits_without_teardown_and_loses_no_output(
    daemon: VirnetDaemon, area: Path
) -> None:
    """The console script leaves with ``os._exit`` once ``main`` is done (the
    interpreter's teardown is ~10 ms of every command): what it printed is all there,
    its exit status is main's, and no teardown ran."""
    payload = os.urandom(3 << 20)
    (area / "out.bin").write_bytes(payload)
    res = _run_entry("", "--version")
    assert res.returncode == 0 and res.stdout.startswith("virnet "), res
    assert "teardown ran" not in res.stderr, res
    res = _run_entry("", "-c", daemon.uri, "stat", f"{area.name}/missing")
    assert res.returncode == 1 and "teardown ran" not in res.stderr, res
    assert res.stderr.startswith("virnet: error:"), res
    # Megabytes through stdout (a pipe here): every byte, in order, before the exit.
    res = _run_entry("", "-c", daemon.uri, "--json", "ls", area.name)
    assert res.returncode == 0 and json.loads(res.stdout), res
    cmd = [sys.executable, "-c", "from virnet.cli import run; import sys; "
           "sys.argv = ['virnet', *sys.argv[1:]]; run()",
           "-c", daemon.uri, "download", f"{area.name}/out.bin", "-"]
    got = subprocess.run(cmd, capture_output=True, timeout=RUN_TIMEOUT, env=_env(), check=False)
    assert got.returncode == 0 and got.stdout == payload, got.stderr


def test_the_command_waits_for_a_thread_still_running() -> None:
    """Another thread still running when ``main`` returns (none of virnet's does):
    the ordinary exit is kept, which waits for it and runs the teardown."""
    prologue = (
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()"
    )
    res = _run_entry(prologue, "--version")
    assert res.returncode == 0, res
    assert "thread done" in res.stdout and "teardown ran" in res.stderr, res


# ---------------------------------------------------------------------------- config


def _config(base: Path, name: str, text: str) -> dict[str, str]:
    home = base / f"cfg-{name}"
    (home / "virnet").mkdir(parents=True)
    (home / "virnet" / "client.toml").write_text(text)
    return {"XDG_CONFIG_HOME": str(home)}


def test_config_uri_and_precedence(daemon: VirnetDaemon, base: Path) -> None:
    env = _config(base, "uri", f'uri = "{daemon.uri}"\ntimeout = 5\nprogress = false\n')
    res = run_virnet("ping", env=env)
    assert res.returncode == 0 and "pong from " + daemon.uri in res.stdout, _describe(res)
    nowhere = f"unix://{base}/nowhere.sock"
    # $VIRNET_DEFAULT_URI beats the file, -c beats both
    res = run_virnet("ping", env={**env, "VIRNET_DEFAULT_URI": nowhere})
    assert res.returncode == 1 and nowhere in res.stderr, _describe(res)
    res = run_virnet("ping", uri=daemon.uri, env={**env, "VIRNET_DEFAULT_URI": nowhere})
    assert res.returncode == 0, _describe(res)


@pytest.mark.parametrize(("text", "needle"), [
    ("timeout = 'soon'\n", "key 'timeout': must be a positive number of seconds"),
    ("progress = 1\n", "key 'progress': must be true or false"),
    ('uri = "ftp://x"\n', "key 'uri': 'ftp://x': unsupported scheme"),
    ("colour = true\n", "unknown key 'colour'"),
    ("uri = \n", "not valid TOML"),
], ids=["timeout", "progress", "uri", "unknown", "syntax"])
def test_bad_config_is_one_line(base: Path, text: str, needle: str) -> None:
    env = _config(base, needle.split()[1].strip("'") + str(len(text)), text)
    res = run_virnet("ping", env=env)
    path = Path(env["XDG_CONFIG_HOME"]) / "virnet" / "client.toml"
    assert res.returncode == 2, _describe(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"virnet: error: config {path}: "), lines
    assert needle in lines[0], lines
    assert run_virnet("help", "ls", env=env).returncode == 0  # help needs no config


# ---------------------------------------------------------------------------- generated


def test_generated_files_match_the_parsers() -> None:
    from virnet.cli import _gen

    recorded = _gen.generated_with(str(ROOT / "share" / "man" / "man1" / "virnet.1"))
    if recorded != _gen.PYTHON:
        pytest.skip(f"share/ was generated with Python {recorded}; argparse's layout "
                    f"differs on {_gen.PYTHON}")
    res = subprocess.run([sys.executable, "-m", "virnet.cli._gen", "--check", "--share",
                          str(ROOT / "share")], capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, check=False)
    assert res.returncode == 0, f"regenerate with python -m virnet.cli._gen\n{res.stdout}"


def test_completion_command_prints_the_scripts() -> None:
    bash = run_virnet("completion", "bash")
    assert bash.returncode == 0 and "complete -o" in bash.stdout and "upload" in bash.stdout
    zsh = run_virnet("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef virnet")


def test_pip_install_puts_man_pages_and_completions_under_share(tmp_path: Path) -> None:
    # A venv of its own: installing into the running one would replace its virnet.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=RUN_TIMEOUT)
    res = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--quiet", str(ROOT)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "VIRNET_NO_EXTENSIONS": "1"},
    )
    if res.returncode != 0 and "No matching distribution" in res.stderr:
        pytest.skip(f"no build dependencies: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    for rel in ("share/man/man1/virnet.1", "share/man/man1/virnetd.1",
                "share/bash-completion/completions/virnet",
                "share/bash-completion/completions/virnetd",
                "share/zsh/site-functions/_virnet", "share/zsh/site-functions/_virnetd"):
        installed = venv / rel
        assert installed.is_file(), rel
        assert installed.read_text() == (ROOT / rel).read_text(), rel
