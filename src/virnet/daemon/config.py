"""virnetd's configuration: defaults, then an optional TOML file, then command-line flags
(docs/configuration.md describes every key).

Example ``virnetd.toml``::

    listen = ["unix:///run/virnet/virnetd.sock", "tcp://127.0.0.1:16600"]
    listen_readonly = ["unix:///run/virnet/virnetd-ro.sock"]
    root = "/srv/virnet"
    log_level = "info"                # debug, info, warning, error
    log_format = "text"               # or "json": one object per line
    max_message = 33554432
    max_clients = 1024
    max_streams = 64
    max_calls = 256
    max_queued_calls = 1024
    max_client_output = 4194304       # unread reply bytes per client before it is paused
    rx_budget = 67108864
    keepalive_interval = 5
    keepalive_count = 5
    window = 4194304
    # migrations: where this daemon may send images ("unix" = any Unix socket,
    # "loopback" = 127.0.0.0/8 and ::1, else IP addresses or networks), where incoming
    # ones are staged (a directory of that name in the root, hidden from FILES) and for
    # how many seconds an interrupted one stays resumable
    migration_destinations = ["unix", "loopback", "10.0.0.0/24"]
    migration_connect_timeout = 30
    staging_dir = ".virnet-staging"
    staging_expiry = 600

    console_history = 65536           # bytes of output each console keeps for replay

    [consoles]                        # NAME = COMMAND, or NAME = "unix:/path" (a relay)
    shell = "/bin/bash -i"
    guest = "unix:/run/guest/serial.sock"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from .._uri import default_socket_path
from ..limits import DEFAULT_LIMITS, Limits

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass
class DaemonConfig:
    listen: list[str] = field(default_factory=list)
    listen_readonly: list[str] = field(default_factory=list)
    root: str = ""
    consoles: dict[str, str] = field(default_factory=dict)
    console_history: int = 64 * 1024
    log_level: str = "info"
    # Limits (``virnet.Limits``; each key of it is a key here).
    max_message: int = DEFAULT_LIMITS.max_message
    max_clients: int = DEFAULT_LIMITS.max_clients
    max_streams: int = DEFAULT_LIMITS.max_streams
    max_calls: int = DEFAULT_LIMITS.max_calls
    max_queued_calls: int = DEFAULT_LIMITS.max_queued_calls
    max_client_output: int = DEFAULT_LIMITS.max_client_output
    keepalive_interval: float = DEFAULT_LIMITS.keepalive_interval
    keepalive_count: int = DEFAULT_LIMITS.keepalive_count
    window: int = DEFAULT_LIMITS.window
    rx_budget: int = DEFAULT_LIMITS.rx_budget
    migration_destinations: list[str] = field(default_factory=lambda: ["unix", "loopback"])
    migration_connect_timeout: float = 30.0
    staging_dir: str = ".virnet-staging"
    staging_expiry: float = 600.0
    log_format: str = "text"

    def finish(self, *, default_listen: bool = True) -> DaemonConfig:
        """Fill in environment-dependent defaults (the default socket only when nothing
        else is listened on: ``default_listen=False`` with inherited sockets)."""
        if default_listen and not self.listen and not self.listen_readonly:
            self.listen = [f"unix://{default_socket_path()}"]
        if not self.root:
            self.root = os.environ.get("VIRNET_ROOT") or "./virnet-data"
        return self

    def limits(self) -> Limits:
        """The limits this configuration sets (``ValueError`` for a bad value)."""
        return Limits(**{name: getattr(self, name) for name in Limits.names()})

    @classmethod
    def from_file(cls, path: str) -> DaemonConfig:
        with open(path, "rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings: {', '.join(sorted(unknown))}")
        cfg = cls()
        for key, value in data.items():
            default = getattr(cfg, key)
            if isinstance(default, list) and isinstance(value, str):
                value = [value]
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if type(value) is not type(default):
                raise ValueError(
                    f"{path}: {key} must be {type(default).__name__}, not {type(value).__name__}"
                )
            setattr(cfg, key, value)
        try:
            cfg.limits()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        if cfg.log_level not in LOG_LEVELS:
            raise ValueError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}")
        if cfg.log_format not in LOG_FORMATS:
            raise ValueError(f"{path}: log_format must be one of {', '.join(LOG_FORMATS)}")
        for name, spec in cfg.consoles.items():
            if not isinstance(spec, str):
                raise ValueError(
                    f"{path}: consoles.{name} must be a string (a command or unix:/path)"
                )
        return cfg
