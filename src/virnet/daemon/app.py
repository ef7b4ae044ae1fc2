"""Assembling and running a daemon: the server, its services, its listeners, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

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
    try:
        inherited = inherited_sockets()
        daemon = Daemon(config, inherited)  # creates the data root: may fail like a listener
    except (OSError, ValueError) as exc:
        print(f"virnetd: error: {exc}", file=sys.stderr)
        return 1
    try:
        uris = await daemon.start()
    except (OSError, ValueError) as exc:
        await daemon.stop()  # close (and unlink) the listeners that did start
        print(f"virnetd: error: {exc}", file=sys.stderr)
        return 1
    for uri in uris:
        print(f"virnetd: listening on {uri}", file=sys.stderr, flush=True)
    log.info("data root %s", daemon.root.path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    print("virnetd: stopping", file=sys.stderr, flush=True)
    await daemon.stop()
    return 0
