"""``virnetd``: the command-line entry point of the daemon."""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys

from .. import _loop
from . import logs
from .app import run
from .config import LOG_LEVELS, DaemonConfig
from .console import ConsoleError, parse_option

log = logging.getLogger("virnet.daemon")

#: Exit statuses: 1 the daemon failed (a socket could not be listened on, a console
#: program could not be started), 2 its configuration is wrong (options, the
#: configuration file, the data root).
EXIT_FAILED, EXIT_CONFIG = 1, 2


def build_parser(docs: bool = False) -> argparse.ArgumentParser:
    """virnetd's options; ``docs=True`` for the man page and completion scripts (no
    machine-dependent defaults in the text)."""
    from .. import __version__, compiled
    from .._uri import default_socket_path

    # The rule, not this machine's answer, in generated files.
    socket = (
        "$VIRNET_SOCKET (else $XDG_RUNTIME_DIR/virnet/virnetd.sock; as root "
        "/run/virnet/virnetd.sock, else /tmp/virnet-UID/virnetd.sock)"
        if docs else default_socket_path()
    )
    core = "compiled" if compiled else "pure Python"
    p = argparse.ArgumentParser(
        prog="virnetd", description="Serve files, consoles and migrations over virnet.",
        epilog="Sizes take K, M, G suffixes, binary: 1K = 1KiB = 1KB = 1024 bytes.",
    )
    p.add_argument("-V", "--version", action="version",
                   version=f"virnetd {__version__}" if docs
                   else f"virnetd {__version__} (wire core: {core})")
    p.add_argument("--listen", action="append", default=None, metavar="URI",
                   help="listen on URI (unix:///path or tcp://host:port); repeatable "
                   f"(default: the configuration file's, else unix://{socket})")
    p.add_argument("--listen-readonly", action="append", default=None, metavar="URI",
                   help="listen on URI allowing only read-only operations; repeatable "
                   "(default: none)")
    p.add_argument("--root", metavar="DIR",
                   help="data root (default $VIRNET_ROOT or ./virnet-data); created when "
                   "missing if its parent directory exists")
    p.add_argument("--console", action="append", default=[], metavar="NAME=COMMAND",
                   help="serve a console: NAME=COMMAND runs COMMAND on a pseudo-terminal "
                   "(started with the daemon, restarted at the next attach after it exits; "
                   "split like a shell would, no shell unless COMMAND names one), "
                   "NAME=unix:/PATH relays a Unix socket; repeatable")
    p.add_argument("--console-history", type=_size, default=None, metavar="SIZE",
                   help="output each console keeps for replay when a client attaches "
                   "(default 64K; K, M, G suffixes)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (default: none)")
    p.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="default: info")
    p.add_argument("--log-format", default=None, choices=logs.FORMATS,
                   help="text: TIME LEVEL LOGGER: MESSAGE (under systemd's journal, "
                   "<PRIORITY>LOGGER: MESSAGE); json: one object per line (default: text)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _size(text: str) -> int:
    from .._units import UnitError, parse_size

    try:
        return parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap and are reused (bytes).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse rather than given back (bytes).
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_malloc() -> None:
    """Keep the receive buffers of stream packets (one ~256 KiB buffer per large
    packet) in the heap.  glibc otherwise may give each one its own mmap and munmap it
    when freed, so every packet costs a page fault per 4 KiB on the way in: measured on
    a 2 GiB migration between two daemons on tmpfs, 0.09-0.97 GB/s from run to run
    without, 0.60-0.88 with.  No-op where glibc's mallopt is absent."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Logging first, so that even a configuration error is a log line in the format
    # asked for; the configuration file may change level and format after.
    logs.setup(args.log_level or "info", args.log_format or "text")
    try:
        config = DaemonConfig.from_file(args.config) if args.config else DaemonConfig()
    except OSError as exc:
        log.error("configuration file %s: %s", args.config, exc.strerror or exc)
        return EXIT_CONFIG
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    if args.listen:
        config.listen = args.listen
    if args.listen_readonly:
        config.listen_readonly = args.listen_readonly
    if args.root:
        config.root = args.root
    if args.log_level:
        config.log_level = args.log_level
    if args.log_format:
        config.log_format = args.log_format
    logs.setup(config.log_level, config.log_format)
    if args.console_history is not None:
        config.console_history = args.console_history
    for item in args.console:
        try:
            name, spec = parse_option(item)
        except ConsoleError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        config.consoles[name] = spec
    tune_malloc()
    return _loop.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
