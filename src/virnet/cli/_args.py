"""The ``virnet`` argument parser: every option with its help and default.

The global options (``-c``, ``-q``, ``--timeout``, ``--json``) are accepted before and
after the command: each command's parser has them too, with ``SUPPRESS`` defaults, so
a value given after the command overrides the one before it and an absent one leaves
it alone.  ``docs=True`` builds the parser the man page and the completion scripts are
generated from: defaults that depend on the machine (the socket path) are described
rather than computed, so the generated files are the same everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

from .. import __version__, compiled
from .._units import SIZE_HELP, UnitError, parse_rate, parse_size
from .._uri import default_socket_path
from ._config import CONFIG_PATH_HELP

DEFAULT_TIMEOUT = 30.0

#: Algorithms every Python's hashlib has and the daemon can return (the shake ones
#: need a length, so they are left out).
ALGORITHMS = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake"))

# What shtab completes a local path with (shtab.FILE; spelt out so that the parser is
# built without importing shtab).
_LOCAL_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_NO_COMPLETION: dict[str, str] = {"bash": "", "zsh": "", "tcsh": ""}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str, *, low: float = 0.0, high: float = 3600.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} seconds")
    return value


def _timeout(text: str) -> float:
    value = _seconds(text, high=86400.0)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _escape(text: str) -> str:
    from .._terminal import parse_escape

    try:
        parse_escape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_globals(p: argparse.ArgumentParser, *, top: bool, docs: bool) -> None:
    """The global options; on a command's parser (``top=False``) they default to
    absent, so they never undo what was given before the command."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    # The rule, not this machine's answer, in generated files.
    socket = (
        "$VIRNET_SOCKET (else $XDG_RUNTIME_DIR/virnet/virnetd.sock; as root "
        "/run/virnet/virnetd.sock, else /tmp/virnet-UID/virnetd.sock)"
        if docs else default_socket_path()
    )
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument(
        "-c", "--connect", metavar="URI", default=default(None),
        help="the daemon: unix:///PATH or tcp://HOST:PORT (default: $VIRNET_DEFAULT_URI, "
        f"else uri in the config file, else unix://{socket})",
    ).complete = _NO_COMPLETION  # type: ignore[attr-defined]
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="print nothing but errors (no progress bars, no summaries)")
    g.add_argument(
        "--timeout", type=_timeout, metavar="SECONDS", default=default(None),
        help="give up when connecting, or waiting for any one reply, takes longer "
        f"(default: timeout in the config file, else {DEFAULT_TIMEOUT:g})",
    )
    g.add_argument("--json", action="store_true", default=default(False),
                   help="print results as one JSON document on stdout")


def _progress_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="always show a progress bar on stderr (default: only when stderr "
                    "is a terminal, unless progress = false in the config file)")
    sp.add_argument("--no-progress", dest="progress", action="store_false",
                    help="never show a progress bar")


def _local(sp: argparse.ArgumentParser, name: str, helptext: str) -> None:
    sp.add_argument(name, metavar=name.upper(), help=helptext).complete = (  # type: ignore[attr-defined]
        _LOCAL_FILE
    )


def _remote(sp: argparse.ArgumentParser, name: str, helptext: str, **kw: Any) -> None:
    sp.add_argument(name, metavar=name.upper(), help=helptext, **kw).complete = (  # type: ignore[attr-defined]
        _NO_COMPLETION
    )


REMOTE_HELP = ("a path inside the daemon's data root; a leading / is the root itself "
               "(/images and images are the same)")


def build_parser(docs: bool = False) -> argparse.ArgumentParser:
    core = "compiled" if compiled else "pure Python"
    p = argparse.ArgumentParser(
        prog="virnet",
        description="Client for virnetd: files, consoles and migrations over libvirt's RPC "
        "protocol. Sizes take K, M, G, T suffixes, all binary (1K = 1KiB = 1KB = 1024 "
        "bytes); rates are sizes per second (100M or 100MiB/s).",
        epilog=f"Configuration file: {CONFIG_PATH_HELP} (keys uri, timeout, progress). "
        "Exit status: 0 success, 1 failure, 2 usage or configuration error, 130 "
        "interrupted (Ctrl-C), 141 stdout closed early (like cat | head).",
    )
    p.add_argument("-V", "--version", action="version",
                   version=f"virnet {__version__}" if docs
                   else f"virnet {__version__} (wire core: {core})")
    _add_globals(p, top=True, docs=docs)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    def command(name: str, helptext: str, description: str | None = None) -> Any:
        sp = sub.add_parser(name, help=helptext, description=description or helptext)
        _add_globals(sp, top=False, docs=docs)
        return sp

    sp = command("ping", "measure round trips to the daemon (keepalive PING/PONG)")
    sp.add_argument("--count", type=_count, default=1, metavar="N",
                    help="pings to send (default 1)")
    sp.add_argument("--interval", type=_seconds, default=0.2, metavar="SECONDS",
                    help="pause between pings (default 0.2)")
    sp.set_defaults(func="ping")

    sp = command("ls", "list a directory, or show a file, on the daemon")
    _remote(sp, "path", f"what to list (default /, the data root); {REMOTE_HELP}",
            nargs="?", default="/")
    sp.set_defaults(func="ls")

    sp = command("stat", "show a remote path's metadata")
    _remote(sp, "path", REMOTE_HELP)
    sp.set_defaults(func="stat")

    sp = command("rm", "delete a remote file or empty directory")
    _remote(sp, "path", REMOTE_HELP)
    sp.set_defaults(func="rm")

    sp = command("mkdir", "create a remote directory")
    _remote(sp, "path", REMOTE_HELP)
    sp.add_argument("-p", "--parents", action="store_true",
                    help="create missing parents too; an existing directory is no error")
    sp.set_defaults(func="mkdir")

    sp = command("checksum", "checksum a remote file (computed by the daemon)")
    _remote(sp, "path", REMOTE_HELP)
    sp.add_argument("--algorithm", default="sha256", choices=ALGORITHMS, metavar="NAME",
                    help=f"one of {', '.join(ALGORITHMS)} (default sha256)")
    sp.set_defaults(func="checksum")

    sp = command(
        "upload", "copy a local file (- for stdin) to the daemon",
        "Copy LOCAL to REMOTE on the daemon. A whole-file upload replaces REMOTE "
        "atomically; an existing remote directory as REMOTE receives LOCAL's name inside "
        "it, like cp. --offset or --length instead write in place into an existing "
        "REMOTE file: its size stays, the bytes from OFFSET on are overwritten.",
    )
    _local(sp, "local", "the file, device, FIFO or socket to read; - reads stdin to EOF")
    _remote(sp, "remote", f"the target file or directory; {REMOTE_HELP}")
    sp.add_argument("--exclusive", action="store_true", help="fail if REMOTE already exists")
    sp.set_defaults(func="upload")
    _transfer_options(sp, "upload")

    sp = command(
        "download", "copy a remote file to a local path (- for stdout)",
        "Copy REMOTE from the daemon into LOCAL. A regular file is replaced atomically "
        "(a temporary file beside it, renamed when complete); a directory receives "
        "REMOTE's name inside it; devices, FIFOs, sockets and stdout are written in "
        "place.",
    )
    _remote(sp, "remote", f"the file to read; {REMOTE_HELP}")
    _local(sp, "local", "the target file, directory, device, FIFO or socket; - is stdout")
    sp.set_defaults(func="download")
    _transfer_options(sp, "download")

    sp = command(
        "console", "attach to a console (raw terminal; ^] detaches)",
        "Attach to console NAME of the daemon. On a terminal: raw mode, the window size "
        "follows yours, the escape character detaches (the program keeps running). With "
        "standard input not a terminal: a pipe, standard input to the console and its "
        "output to standard output, ending once standard input ended and the console has "
        "been quiet for --linger seconds.",
    )
    sp.add_argument("name", metavar="NAME", help="the console, as `virnet consoles` lists it")
    sp.add_argument("--force", action="store_true",
                    help="take the console over from the session holding it")
    sp.add_argument("--escape", type=_escape, default="^]", metavar="CHAR",
                    help="detach character, ^X with X one of @ A-Z [ \\ ] ^ _ (default ^])")
    sp.add_argument("--no-history", action="store_true",
                    help="do not replay what the console printed before the attach")
    sp.add_argument("--linger", type=_seconds, default=0.5, metavar="SECONDS",
                    help="pipe mode: after standard input's EOF, keep copying output "
                    "until the console has been quiet this long (default 0.5)")
    sp.set_defaults(func="console")

    sp = command("consoles", "list the daemon's consoles")
    sp.set_defaults(func="consoles")

    sp = command("migrate", "have the daemon migrate image NAME to the daemon at DEST_URI")
    sp.add_argument("name", metavar="NAME", help="the image, a path in the source's data root")
    sp.add_argument("dest_uri", metavar="DEST_URI",
                    help="the destination daemon, as the source daemon reaches it")
    sp.add_argument("--bandwidth", type=_rate, default=0, metavar="RATE",
                    help="cap in bytes/s, e.g. 100M or 100MiB/s (binary units); "
                    "default 0, no cap")
    sp.add_argument("--move", action="store_true",
                    help="delete the source once the destination has committed")
    sp.add_argument("--resume", action="store_true",
                    help="continue an interrupted migration: send only what is missing")
    _progress_options(sp)
    sp.set_defaults(func="migrate")

    sp = command("demo", "tour virnet on two daemons started in a temporary directory")
    sp.add_argument("--size", default="256M", metavar="SIZE",
                    help=f"bytes of each step's file (default 256M; {SIZE_HELP})")
    sp.add_argument("--keep", action="store_true",
                    help="leave the two daemons running afterwards and print what to try")
    sp.set_defaults(func="demo")

    sp = command("help", "show the help of a command, or of virnet")
    sp.add_argument("topic", nargs="?", metavar="COMMAND", help="the command to explain")
    sp.set_defaults(func="help")

    sp = command("completion", "print the shell completion script",
                 "Print the completion script for SHELL; e.g. in ~/.bashrc: "
                 'eval "$(virnet completion bash)". Installed packages also ship the '
                 "scripts under share/bash-completion and share/zsh.")
    sp.add_argument("shell", choices=["bash", "zsh"], help="bash or zsh")
    sp.set_defaults(func="completion")
    return p


def _transfer_options(sp: argparse.ArgumentParser, name: str) -> None:
    if name == "upload":
        offset = ("write in place into the existing REMOTE, starting at this byte of "
                  "REMOTE (LOCAL is read from its start); default 0")
        length = ("write exactly this many bytes of LOCAL (a shorter LOCAL is an error); "
                  "non-zero also means in place; default 0, all of LOCAL")
    else:
        offset = "start reading REMOTE at this byte (default 0)"
        length = "read at most this many bytes (default 0: to the end)"
    sp.add_argument("--sparse", action="store_true",
                    help="send holes as holes (and recreate them locally on download)")
    sp.add_argument("--offset", type=_size, default=0, metavar="SIZE",
                    help=f"{offset}; {SIZE_HELP}")
    sp.add_argument("--length", type=_size, default=0, metavar="SIZE", help=length)
    _progress_options(sp)
    sp.add_argument("--no-sync", action="store_true",
                    help="do not fsync the result (faster, for scratch data: a crash "
                    "soon after may lose it); on upload the daemon skips its fsyncs")
