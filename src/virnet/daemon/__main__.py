"""``virnetd``: the command-line entry point of the daemon."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import _loop
from .app import run
from .config import DaemonConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="virnetd", description="Serve files, consoles and migrations over virnet."
    )
    p.add_argument("--listen", action="append", default=None, metavar="URI",
                   help="listen on URI (unix:///path or tcp://host:port); repeatable")
    p.add_argument("--listen-readonly", action="append", default=None, metavar="URI",
                   help="listen on URI allowing only read-only operations; repeatable")
    p.add_argument("--root", metavar="DIR",
                   help="data root (default $VIRNET_ROOT or ./virnet-data)")
    p.add_argument("--console", action="append", default=[], metavar="NAME=COMMAND",
                   help="serve a console running COMMAND on a pseudo-terminal; repeatable")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error"], help="default: info")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = DaemonConfig.from_file(args.config) if args.config else DaemonConfig()
    except (OSError, ValueError) as exc:
        print(f"virnetd: error: {exc}", file=sys.stderr)
        return 2
    if args.listen:
        config.listen = args.listen
    if args.listen_readonly:
        config.listen_readonly = args.listen_readonly
    if args.root:
        config.root = args.root
    if args.log_level:
        config.log_level = args.log_level
    for item in args.console:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            print(f"virnetd: error: --console wants NAME=COMMAND, got {item!r}", file=sys.stderr)
            return 2
        config.consoles[name] = command
    if config.consoles:
        # The CONSOLE program is not implemented yet: refuse rather than pretend.
        print("virnetd: error: consoles are not supported by this version", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="virnetd: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return _loop.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
