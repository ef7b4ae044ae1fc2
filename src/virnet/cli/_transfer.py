"""upload, download, migrate and console: the commands with a data stream."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import posixpath
import sys
import time
from typing import Any

from ..client import Client
from ..errors import RPCError, VirnetError
from ..services import files as f
from ._errors import EXIT_OK, CommandError, Interrupted, failing, reason
from ._files import wire_path
from ._output import emit_json, summary, transfer_json


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
    from .._progressbar import ProgressBar  # rich: only when a bar is shown

    return ProgressBar(description)


def show_progress(args: argparse.Namespace) -> bool:
    """-q, then --progress/--no-progress, then the config file's ``progress = false``,
    then whether stderr is a terminal."""
    if args.quiet:
        return False
    if args.progress is not None:
        return bool(args.progress)
    if args.config.progress is False:
        return False
    return sys.stderr.isatty()


async def _upload_target(client: Client, args: argparse.Namespace) -> tuple[str, str]:
    """REMOTE, or REMOTE/basename(LOCAL) when REMOTE is a directory (like cp): the
    path to show and the wire path."""
    shown, wire = args.remote, wire_path(args.remote)
    is_dir = wire == "" or args.remote.endswith("/")
    if not is_dir:
        try:
            st = await client.call(f.STAT, f.PathArgs(wire), timeout=args.timeout)
        except RPCError:
            return shown, wire  # missing, or refused: the upload says why
        is_dir = st.kind == f.Kind.DIRECTORY
    if not is_dir:
        return shown, wire
    if args.local == "-":
        raise CommandError(f"upload {shown}: is a directory (stdin has no name to put "
                           "inside it; name the remote file)")
    name = posixpath.basename(args.local.rstrip("/"))
    return posixpath.join(shown, name), posixpath.join(wire, name)


async def cmd_upload(client: Client, args: argparse.Namespace) -> int:
    from .. import transfer

    shown, wire = await _upload_target(client, args)
    start = time.perf_counter()
    show = show_progress(args)
    with _bar(show, f"upload {shown}") as bar:
        try:
            done = await transfer.upload(
                client, args.local, wire, sparse=args.sparse, offset=args.offset,
                length=args.length, exclusive=args.exclusive, sync=not args.no_sync,
                progress=bar.update if show else None, on_size=bar.total,
                on_commit=bar.committing, timeout=args.timeout,
            )
        except (VirnetError, OSError, ValueError) as exc:
            text = f"upload {shown}: {reason(exc, wire)}"
            if (args.offset or args.length) and getattr(exc, "int1", 0) == errno.ENOENT:
                # The protocol's rule, easy to trip over with a stream and --length.
                text += " (--offset/--length write in place into an existing file)"
            raise CommandError(text) from None
        elapsed = time.perf_counter() - start
        bar.finish(done, elapsed)
    if args.json:
        emit_json(transfer_json("upload", done, elapsed, local=args.local, remote=shown))
    elif show:
        print(summary("uploaded", done, elapsed), file=sys.stderr)
    return EXIT_OK


async def cmd_download(client: Client, args: argparse.Namespace) -> int:
    from .. import transfer

    wire = wire_path(args.remote)
    start = time.perf_counter()
    # To stdout, only an explicit --progress shows the bar (on stderr, like curl).
    show = show_progress(args) and (args.local != "-" or bool(args.progress))
    with _bar(show, f"download {args.remote}") as bar, failing(f"download {args.remote}", wire):
        done = await transfer.download(
            client, wire, args.local, sparse=args.sparse, offset=args.offset,
            length=args.length, sync=not args.no_sync,
            progress=bar.update if show else None, on_size=bar.total,
            on_commit=bar.committing, timeout=args.timeout,
        )
        elapsed = time.perf_counter() - start
        bar.finish(done, elapsed)
    if args.json:
        # The data owns stdout when it is the target: the summary goes to stderr.
        emit_json(transfer_json("download", done, elapsed, remote=args.remote,
                                local=args.local), stderr=args.local == "-")
    elif show:
        print(summary("downloaded", done, elapsed), file=sys.stderr)
    return EXIT_OK


async def cmd_console(client: Client, args: argparse.Namespace) -> int:
    from .. import _terminal

    code, message = await _terminal.run(
        client, args.name, force=args.force, history=not args.no_history,
        escape=args.escape, linger=args.linger, quiet=args.quiet,
    )
    if message is not None:
        raise CommandError(message)
    return code


async def cmd_migrate(client: Client, args: argparse.Namespace) -> int:
    """PERFORM on the daemon we talk to (the source), a bar from its PROGRESS events,
    ABORT on Ctrl-C (exit 130), one result line."""
    import signal

    from ..services import migration as mig

    flags = (mig.MigrationFlags.MOVE if args.move else 0) | (
        mig.MigrationFlags.RESUME if args.resume else 0
    )
    serial = client.protocol.allocate_serial()
    show = show_progress(args)
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
            mig.PerformArgs(wire_path(args.name), args.dest_uri, args.bandwidth, int(flags))
        )
        prog = mig.MIGRATION
        # No --timeout on PERFORM: it lasts as long as the migration.
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
            with failing(f"migrate {args.name}", wire_path(args.name)):
                data = call.result()
            reply = mig.PERFORM.decode_ret(data)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            stop.cancel()
            unsubscribe()
            if not call.done():
                call.cancel()
        elapsed = reply.elapsed_ns / 1e9 if reply.elapsed_ns else time.perf_counter() - start
        bar.finish(reply.bytes, elapsed)
    if args.json:
        emit_json(transfer_json("migrate", reply.bytes, elapsed, name=args.name,
                                dest_uri=args.dest_uri, moved=bool(args.move)))
    elif not args.quiet:
        moved = " (source deleted)" if args.move else ""
        print(f"{summary(f'migrated {args.name} to {args.dest_uri}:', reply.bytes, elapsed)}"
              f"{moved}")
    return EXIT_OK
