"""``virnet``: the command-line client (docs/cli.md describes every command).

Exit status: 0 success, 1 the operation failed (one ``virnet: error: ...`` line on
stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import _loop
from ._localfile import format_size
from ._uri import default_uri
from .client import Client, connect
from .errors import VirnetError
from .services import files as f

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UsageError(Exception):
    pass


def _kind_name(kind: int) -> str:
    return {1: "file", 2: "directory", 3: "other"}.get(kind, f"kind {kind}")




async def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    for i in range(args.count):
        rtt = await client.ping()
        if not args.quiet:
            print(f"pong from {client.address}: seq={i + 1} time={rtt * 1000:.3f} ms")
        if i + 1 < args.count:
            await asyncio.sleep(args.interval)
    return EXIT_OK


async def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    reply = await client.call(f.LIST, f.PathArgs(args.path))
    if args.json:
        print(json.dumps([
            {"name": e.name, "kind": _kind_name(e.kind), "size": e.size} for e in reply.entries
        ]))
        return EXIT_OK
    for e in reply.entries:
        suffix = "/" if e.kind == f.Kind.DIRECTORY else ""
        print(f"{_kind_name(e.kind):9} {e.size:>15} {e.name}{suffix}")
    return EXIT_OK


async def cmd_stat(client: Client, args: argparse.Namespace) -> int:
    st = await client.call(f.STAT, f.PathArgs(args.path))
    info = {
        "path": args.path,
        "kind": _kind_name(st.kind),
        "size": st.size,
        "allocation": st.allocation,
        "mtime_ns": st.mtime_ns,
        "mode": f"{st.mode:04o}",
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            extra = f" ({format_size(value)})" if key in ("size", "allocation") else ""
            print(f"{key + ':':12}{value}{extra}")
    return EXIT_OK


async def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    await client.call(f.DELETE, f.PathArgs(args.path))
    return EXIT_OK


async def cmd_mkdir(client: Client, args: argparse.Namespace) -> int:
    await client.call(f.MKDIR, f.PathArgs(args.path))
    return EXIT_OK


async def cmd_checksum(client: Client, args: argparse.Namespace) -> int:
    reply = await client.call(f.CHECKSUM, f.ChecksumArgs(args.path, args.algorithm))
    print(f"{reply.digest.hex()}  {args.path}")
    return EXIT_OK


class _NoBar:
    """What the transfer commands talk to when no bar is shown."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def total(self, n: int) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def committing(self) -> None:
        pass

    def finish(self, done: int, elapsed: float) -> None:
        pass


def _bar(show: bool, description: str) -> Any:
    if not show:
        return _NoBar()
    from ._progressbar import ProgressBar  # rich: only when a bar is shown

    return ProgressBar(description)


def _show_progress(args: argparse.Namespace) -> bool:
    if args.quiet:
        return False
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


class CommandError(Exception):
    """A transfer failed: the one line to print."""


def _transfer_error(operation: str, exc: BaseException) -> CommandError:
    """``OPERATION REMOTE: what went wrong``; a local problem names the local path (a
    ``LocalFileError`` does), a system error never shows its ``[Errno N]``."""
    if isinstance(exc, OSError) and not isinstance(exc, VirnetError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc)
    return CommandError(f"{operation}: {text}")


async def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    from . import transfer

    start = time.perf_counter()
    show = _show_progress(args)
    with _bar(show, f"upload {args.remote}") as bar:
        try:
            done = await transfer.upload(
                client, args.local, args.remote, sparse=args.sparse, offset=args.offset,
                length=args.length, exclusive=args.exclusive, sync=not args.no_sync,
                progress=bar.update if show else None, on_size=bar.total,
                on_commit=bar.committing,
            )
        except (VirnetError, OSError, ValueError) as exc:
            err = _transfer_error(f"upload {args.remote}", exc)
            if (args.offset or args.length) and getattr(exc, "int1", 0) == errno.ENOENT:
                # The protocol's rule, easy to trip over with a stream and --length.
                err = CommandError(f"{err} (--offset/--length write in place into an "
                                   "existing file)")
            raise err from None
        elapsed = time.perf_counter() - start
        bar.finish(done, elapsed)
    if show:
        _summary("uploaded", done, elapsed)
    return EXIT_OK


async def cmd_download(client: Client, args: argparse.Namespace) -> int:
    from . import transfer

    start = time.perf_counter()
    # To stdout, only an explicit --progress shows the bar (on stderr, like curl).
    show = _show_progress(args) and (args.local != "-" or bool(args.progress))
    with _bar(show, f"download {args.remote}") as bar:
        try:
            done = await transfer.download(
                client, args.remote, args.local, sparse=args.sparse, offset=args.offset,
                length=args.length, sync=not args.no_sync,
                progress=bar.update if show else None, on_size=bar.total,
                on_commit=bar.committing,
            )
        except (VirnetError, OSError, ValueError) as exc:
            raise _transfer_error(f"download {args.remote}", exc) from None
        elapsed = time.perf_counter() - start
        bar.finish(done, elapsed)
    if show:
        _summary("downloaded", done, elapsed)
    return EXIT_OK


async def cmd_console(client: Client, args: argparse.Namespace) -> int:
    from . import _terminal

    code, message = await _terminal.run(
        client, args.name, force=args.force, history=not args.no_history,
        escape=args.escape, linger=args.linger, quiet=args.quiet,
    )
    if message is not None:
        raise CommandError(message)
    return code


def _escape(text: str) -> str:
    from ._terminal import parse_escape

    try:
        parse_escape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 3600:
        raise argparse.ArgumentTypeError("must be between 0 and 3600 seconds")
    return value


def _summary(verb: str, done: int, elapsed: float) -> None:
    """One line after the progress bar, at the rate the bar ends with; without a bar a
    successful transfer is silent (scripts, pipes, --no-progress, -q)."""
    from ._progressbar import format_rate

    elapsed = max(elapsed, 1e-9)
    print(f"{verb} {format_size(done)} in {elapsed:.2f} s ({format_rate(done / elapsed)})",
          file=sys.stderr)


_RATE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rate(text: str) -> int:
    """A bandwidth in bytes/s: ``100M`` is 100 MiB/s; units K, M, G, T (binary), each
    also as ``KiB``, with an optional ``B`` and ``/s`` (``100MiB/s``); 0 is unlimited."""
    raw = text.strip().lower().replace(" ", "")
    body = raw.removesuffix("/s")
    body = body.removesuffix("ib") if body.endswith("ib") else body.removesuffix("b")
    unit = body[-1:] if body[-1:].isalpha() else ""
    number = body[: len(body) - len(unit)]
    if unit not in _RATE_UNITS or not number:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (bytes/s, or with K, M, G, T: 100M is 100 MiB/s)"
        )
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}")
    return round(value * _RATE_UNITS[unit])


async def cmd_migrate(client: Client, args: argparse.Namespace) -> int:
    """PERFORM on the daemon we talk to (the source), a bar from its PROGRESS events,
    ABORT on Ctrl-C (exit 130), one result line."""
    import signal

    from .services import migration as mig

    flags = (mig.MigrationFlags.MOVE if args.move else 0) | (
        mig.MigrationFlags.RESUME if args.resume else 0
    )
    serial = client.protocol.allocate_serial()
    show = _show_progress(args)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    start = time.perf_counter()
    with _bar(show, f"migrate {args.name}") as bar:
        sized = False

        def on_progress(ev: Any) -> None:
            nonlocal sized
            if ev.job_serial != serial:
                return
            if not sized:
                bar.total(ev.total)
                sized = True
            bar.update(ev.transferred)
            if ev.transferred == ev.total:
                bar.committing()

        unsubscribe = client.subscribe(mig.PROGRESS, on_progress)
        payload = mig.PERFORM.encode_args(
            mig.PerformArgs(args.name, args.dest_uri, args.bandwidth, int(flags))
        )
        prog = mig.MIGRATION
        call = asyncio.ensure_future(
            client.call_raw(prog.number, prog.version, mig.PERFORM.number, payload,
                            serial=serial)
        )
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        stop = asyncio.ensure_future(interrupted.wait())
        try:
            await asyncio.wait((call, stop), return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                # Ctrl-C: ask the daemon to abort, and wait for it to roll back (its
                # PERFORM then fails with the abort); a second Ctrl-C leaves at once.
                with contextlib.suppress(VirnetError, OSError, TimeoutError):
                    await client.call(mig.ABORT, mig.NameArgs(args.name), timeout=60)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(call, timeout=10)
                raise Interrupted(f"migrate {args.name}: interrupted, migration aborted")
            try:
                data = call.result()
            except VirnetError as exc:
                raise CommandError(str(exc)) from None
            reply = mig.PERFORM.decode_ret(data)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            stop.cancel()
            unsubscribe()
            if not call.done():
                call.cancel()
        elapsed = reply.elapsed_ns / 1e9 if reply.elapsed_ns else time.perf_counter() - start
        bar.finish(reply.bytes, elapsed)
    if not args.quiet:
        from ._progressbar import format_rate

        moved = " (source deleted)" if args.move else ""
        print(f"migrated {args.name} to {args.dest_uri}: {format_size(reply.bytes)} in "
              f"{elapsed:.2f} s ({format_rate(reply.bytes / max(elapsed, 1e-9))}){moved}")
    return EXIT_OK


class Interrupted(Exception):
    """Ctrl-C: the one line to print, exit status 130."""


def _nonnegative(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virnet", description="Client for virnetd.")
    p.add_argument("-c", "--connect", metavar="URI", default=None,
                   help="daemon URI (default $VIRNET_DEFAULT_URI or the local socket)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sp = sub.add_parser("ping", help="measure keepalive round trips")
    sp.add_argument("--count", type=int, default=1)
    sp.add_argument("--interval", type=float, default=0.2, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_ping)

    sp = sub.add_parser("ls", help="list a directory")
    sp.add_argument("path", nargs="?", default="")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_ls)

    sp = sub.add_parser("stat", help="show a path's metadata")
    sp.add_argument("path")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_stat)

    sp = sub.add_parser("rm", help="delete a file or an empty directory")
    sp.add_argument("path")
    sp.set_defaults(func=cmd_rm)

    sp = sub.add_parser("mkdir", help="create a directory")
    sp.add_argument("path")
    sp.set_defaults(func=cmd_mkdir)

    sp = sub.add_parser("checksum", help="checksum a file on the daemon")
    sp.add_argument("path")
    sp.add_argument("--algorithm", default="sha256")
    sp.set_defaults(func=cmd_checksum)

    for name, helptext in (("upload", "upload LOCAL (- for stdin) to REMOTE"),
                           ("download", "download REMOTE into LOCAL (- for stdout)")):
        sp = sub.add_parser(name, help=helptext)
        if name == "upload":
            sp.add_argument("local")
            sp.add_argument("remote")
            sp.add_argument("--exclusive", action="store_true",
                            help="fail if REMOTE already exists")
            sp.set_defaults(func=cmd_upload)
        else:
            sp.add_argument("remote")
            sp.add_argument("local")
            sp.set_defaults(func=cmd_download)
        sp.add_argument("--sparse", action="store_true", help="send holes as holes")
        sp.add_argument("--offset", type=_nonnegative, default=0)
        sp.add_argument("--length", type=_nonnegative, default=0)
        sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="always show a progress bar on stderr")
        sp.add_argument("--no-progress", dest="progress", action="store_false")
        sp.add_argument("--no-sync", action="store_true",
                        help="do not fsync the result (faster, for scratch data: a crash "
                        "soon after may lose it); on upload the daemon skips its fsyncs")

    sp = sub.add_parser(
        "console", help="attach to a console (raw terminal; ^] detaches)",
        description="Attach to console NAME of the daemon. On a terminal: raw mode, the "
        "window size follows yours, the escape character detaches (the program keeps "
        "running). With standard input not a terminal: a pipe, standard input to the "
        "console and its output to standard output, ending once standard input ended "
        "and the console has been quiet for --linger seconds.",
    )
    sp.add_argument("name")
    sp.add_argument("--force", action="store_true",
                    help="take the console over from the session holding it")
    sp.add_argument("--escape", type=_escape, default="^]", metavar="CHAR",
                    help="detach character, ^X with X one of @ A-Z [ \\ ] ^ _ (default ^])")
    sp.add_argument("--no-history", action="store_true",
                    help="do not replay what the console printed before the attach")
    sp.add_argument("--linger", type=_seconds, default=0.5, metavar="SECONDS",
                    help="pipe mode: after standard input's EOF, keep copying output "
                    "until the console has been quiet this long (default 0.5)")
    sp.set_defaults(func=cmd_console)

    sp = sub.add_parser("migrate", help="have the daemon migrate image NAME to the daemon "
                        "at DEST_URI")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("dest_uri", metavar="DEST_URI",
                    help="the destination daemon, as the source daemon reaches it")
    sp.add_argument("--bandwidth", type=parse_rate, default=0, metavar="RATE",
                    help="cap in bytes/s; K, M, G suffixes (100M = 100 MiB/s); 0 = none")
    sp.add_argument("--move", action="store_true",
                    help="delete the source once the destination has committed")
    sp.add_argument("--resume", action="store_true",
                    help="continue an interrupted migration: send only what is missing")
    sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                    help="always show a progress bar on stderr")
    sp.add_argument("--no-progress", dest="progress", action="store_false")
    sp.set_defaults(func=cmd_migrate)

    sp = sub.add_parser("demo", help="start an embedded daemon and tour virnet")
    sp.add_argument("--size", default="256M", help="bytes to push through the wire core")
    sp.set_defaults(func=None, demo=True)
    return p


async def _with_client(
    uri: str, func: Callable[[Client, argparse.Namespace], Awaitable[int]], args: Any
) -> int:
    async with await connect(uri) as client:
        return await func(client, args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    if getattr(args, "demo", False):
        from .demo import run_demo

        try:
            return _loop.run(run_demo(args.size, quiet=args.quiet))
        except (VirnetError, OSError, ValueError) as exc:
            print(f"virnet: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if getattr(args, "count", 1) < 1:
        print("virnet: error: --count must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    uri = args.connect or default_uri()
    try:
        return _loop.run(_with_client(uri, args.func, args))
    except (VirnetError, OSError, ValueError, CommandError) as exc:
        print(f"virnet: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted as exc:
        print(f"virnet: error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("virnet: error: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
