"""Assembling and running a daemon: the server, its services, its listeners, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat

from ..server import Server
from .activation import InheritedSocket, inherited_sockets
from .config import DaemonConfig
from .console import ConsoleService
from .migration import MigrationService
from .staging import HiddenRoot, HidingFilesService
from .transfer import TransferService

log = logging.getLogger("virnet.daemon")


class Daemon:
    """A configured virnetd; ``await start()``, then ``await stop()``."""

    def __init__(
        self, config: DaemonConfig, inherited: list[InheritedSocket] | None = None
    ) -> None:
        #: Listening sockets handed over by the service manager (socket activation):
        #: with them, no default socket is made.
        self.inherited = inherited or []
        self.config = config.finish(default_listen=not self.inherited)
        # The root as FILES sees it: without the migration staging directory.
        self.root = HiddenRoot(self.config.root, self.config.staging_dir)
        self.server = Server(limits=self.config.limits())
        self.files = HidingFilesService(self.root)
        self.files.register(self.server)
        self.transfers = TransferService(self.root)
        self.transfers.register(self.server)
        self.consoles = ConsoleService(self.config.consoles, self.config.console_history)
        self.consoles.register(self.server)
        self.migration = MigrationService(
            self.root,
            staging_dir=self.config.staging_dir,
            staging_expiry=self.config.staging_expiry,
            destinations=self.config.migration_destinations,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_count=self.config.keepalive_count,
            connect_timeout=self.config.migration_connect_timeout,
        )
        self.migration.register(self.server)

    async def start(self) -> list[str]:
        await self.migration.start()  # expired staged data of an earlier run goes
        # Programs start with the daemon, before the first client can ask for them.
        await self.consoles.start()
        uris = [
            str(await self.server.adopt(s.sock, readonly=s.readonly)) for s in self.inherited
        ]
        uris += [str(await self.server.listen(uri)) for uri in self.config.listen]
        uris += [
            str(await self.server.listen(uri, readonly=True))
            for uri in self.config.listen_readonly
        ]
        return uris

    async def stop(self) -> None:
        await self.migration.close()  # outgoing migrations fail before the server closes
        await self.server.close()
        await self.consoles.close()


async def run(config: DaemonConfig) -> int:
    """virnetd's life: 0 after SIGTERM or SIGINT, 1 when it could not start, 2 when
    its data root is unusable.  Every line goes through logging, each event once."""
    try:
        inherited = inherited_sockets()
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    config.finish(default_listen=not inherited)
    readonly_only = not config.listen and all(s.readonly for s in inherited)
    try:
        created = prepare_root(config.root, writable=not readonly_only)
    except RootError as exc:
        log.error("%s", exc)
        return 2
    if created:
        log.info("created the data root %s (it did not exist)", os.path.abspath(config.root))
    try:
        daemon = Daemon(config, inherited)
    except (OSError, ValueError) as exc:
        log.error("%s", _describe(exc))
        return 1
    try:
        uris = await daemon.start()
    except (OSError, ValueError) as exc:
        await daemon.stop()  # close (and unlink) the listeners that did start
        log.error("%s", _describe(exc))
        return 1
    for uri in uris:
        log.info("listening on %s", uri)
    log.info("data root %s", daemon.root.path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await daemon.stop()
    log.info("stopped")
    return 0


class RootError(Exception):
    """The data root cannot be used: one line naming it."""


def prepare_root(path: str, *, writable: bool = True) -> bool:
    """Check that ``path`` is a directory the daemon can use as its data root (and
    write to, with ``writable``); create it when it does not exist but its parent
    does.  Returns whether it was created; raises ``RootError``."""
    what = f"data root {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise RootError(
                f"{what}: does not exist, and neither does its parent directory {parent}"
            ) from None
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return prepare_root(path, writable=writable)  # made meanwhile
        except OSError as exc:
            raise RootError(f"{what}: cannot create it: {exc.strerror or exc}") from None
        return True
    except NotADirectoryError:
        raise RootError(f"{what}: a component of the path is not a directory") from None
    except OSError as exc:
        raise RootError(f"{what}: {_describe(exc)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RootError(f"{what}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise RootError(f"{what}: not readable by this user (uid {os.geteuid()})")
    if writable and not os.access(path, os.W_OK):
        raise RootError(f"{what}: not writable by this user (uid {os.geteuid()})")
    return False


def _describe(exc: BaseException) -> str:
    """An error as one line, without ``[Errno N]``."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)
