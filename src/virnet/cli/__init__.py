"""``virnet``: the command-line client (docs/cli.md describes every command).

Exit status: 0 success; 1 the operation failed (one ``virnet: error: ...`` line on
stderr); 2 usage or configuration error; 130 interrupted (Ctrl-C); 141 stdout's
reader went away (``virnet download f - | head``), quietly, as the shell reports
``cat`` killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn

from .. import _loop
from .._units import parse_size
from .._uri import default_uri
from ..client import Client, connect
from ..errors import VirnetError
from ._args import DEFAULT_TIMEOUT, build_parser
from ._config import ConfigError, load_config
from ._errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_USAGE,
    CommandError,
    Interrupted,
    PipeClosed,
    connect_error,
    is_broken_pipe,
    reason,
)

__all__ = ["build_parser", "main", "parse_rate", "parse_size", "run"]

Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


def parse_rate(text: str) -> int:
    """``parse_rate`` for argparse: a bad rate is an ``ArgumentTypeError``."""
    from ._args import _rate

    return _rate(text)


def _command(name: str) -> Command:
    from . import _files, _transfer

    table: dict[str, Command] = {
        "ping": _files.cmd_ping, "ls": _files.cmd_ls, "stat": _files.cmd_stat,
        "rm": _files.cmd_rm, "mkdir": _files.cmd_mkdir, "checksum": _files.cmd_checksum,
        "consoles": _files.cmd_consoles, "upload": _transfer.cmd_upload,
        "download": _transfer.cmd_download, "console": _transfer.cmd_console,
        "migrate": _transfer.cmd_migrate,
    }
    return table[name]


def _error(text: str) -> None:
    print(f"virnet: error: {text}", file=sys.stderr)


def _resolve_uri(args: argparse.Namespace) -> tuple[str, bool]:
    """-c, then $VIRNET_DEFAULT_URI, then the config file's uri, then the default
    socket; the second value says whether it is the default socket."""
    if args.connect:
        return args.connect, False
    if os.environ.get("VIRNET_DEFAULT_URI"):
        return os.environ["VIRNET_DEFAULT_URI"], False
    if args.config.uri:
        return args.config.uri, False
    return default_uri(), True


async def _with_client(args: argparse.Namespace, func: Command) -> int:
    uri, is_default = _resolve_uri(args)
    try:
        client = await connect(uri, timeout=args.timeout)
    except (VirnetError, OSError, ValueError) as exc:
        raise CommandError(connect_error(exc, uri, args.timeout, is_default)) from None
    async with client:
        return await func(client, args)


def _quiet_stdout() -> None:
    """After EPIPE on stdout: point fd 1 at a pipe of our own, so that flushing what
    is still buffered at exit neither fails nor complains."""
    try:
        r, w = os.pipe()
        os.dup2(w, 1)
        os.close(w)
        # r stays open until exit: the flush (a few KiB at most) fits in the pipe.
        _quiet_stdout.keep = r  # type: ignore[attr-defined]
    except OSError:
        pass


def run() -> NoReturn:
    """The ``virnet`` command itself: ``main()``, then out of the process without the
    interpreter's teardown (freeing every module and object one by one: ~10 ms of
    every short command, and a visible share of a fast transfer).  Nothing is left to
    tear down by then: the loop is closed, transfers are committed, the terminal is
    restored, and the two standard streams are flushed here.  Should another thread
    still run (none of ours does), the ordinary exit is kept, which waits for it."""
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            # stdout's reader went away after main's own flush; say it as main does
            if stream is sys.stdout and status == EXIT_OK:
                status = EXIT_PIPE
    if threading.active_count() > 1:
        sys.exit(status)
    os._exit(status)


def _local_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    """help, completion and demo: no connection."""
    if args.func == "help":
        if args.topic is None:
            parser.print_help()
            return EXIT_OK
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if args.topic not in sub.choices:
            _error(f"help {args.topic}: no such command (see virnet --help)")
            return EXIT_USAGE
        sub.choices[args.topic].print_help()
        return EXIT_OK
    if args.func == "completion":
        from ._gen import completion

        sys.stdout.write(completion(args.shell))
        return EXIT_OK
    if args.func == "demo":
        from ..demo import run_demo

        try:
            return _loop.run(run_demo(args.size, quiet=args.quiet, keep=args.keep))
        except (VirnetError, OSError, ValueError) as exc:
            _error(str(exc))
            return EXIT_FAILED
    return None


def main(argv: list[str] | None = None) -> int:
    # The library logs protocol trouble; the command line says it in its error line.
    logging.getLogger("virnet").addHandler(logging.NullHandler())
    logging.getLogger("virnet").propagate = False
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    try:
        local = _local_command(args, parser)
        if local is not None:
            return local
        # Only now: help and completion work whatever the config file says.
        try:
            args.config = load_config()
        except ConfigError as exc:
            _error(f"config {exc}")
            return EXIT_USAGE
        if args.timeout is None:
            args.timeout = args.config.timeout or DEFAULT_TIMEOUT
        status = _loop.run(_with_client(args, _command(args.func)))
        sys.stdout.flush()  # here, where a closed pipe is still ours to report
        return status
    except Interrupted as exc:
        _error(str(exc))
        return EXIT_INTERRUPTED
    except CommandError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except PipeClosed:
        _quiet_stdout()
        return EXIT_PIPE
    except (VirnetError, OSError, ValueError) as exc:
        if is_broken_pipe(exc):
            _quiet_stdout()
            return EXIT_PIPE
        # What a command did not put in its own words (the console's messages name
        # the console already).
        _error(reason(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
