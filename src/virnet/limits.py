"""Every limit of a connection and of a server, in one place.

A ``Limits`` is immutable: make one with the changes you want
(``Limits(window=1 << 20)`` or ``limits.replace(max_calls=64)``) and hand it to
``virnet.connect(limits=...)`` or ``virnet.Server(limits=...)``; virnetd builds its own
from the configuration file (docs/configuration.md lists the keys).  The connection
limits apply to both sides; the server limits only where a ``Server`` uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .constants import MAX_MESSAGE

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    # ---- every connection, client or server
    #: Largest packet accepted, header included (libvirt: 32 MiB).
    max_message: int = MAX_MESSAGE
    #: Stream bytes the peer may send ahead of our reading, per stream (native mode).
    window: int = 4 * MiB
    #: Stream bytes buffered unread across all streams of a connection before the
    #: connection stops granting credit (native) or reading (legacy).
    rx_budget: int = 64 * MiB
    #: Seconds between keepalive PINGs on an idle connection; 0 turns them off.
    keepalive_interval: float = 5.0
    #: Unanswered PINGs before the connection is closed as dead.
    keepalive_count: int = 5

    # ---- a server
    #: Connections served at once; more are refused with a log line.
    max_clients: int = 1024
    #: Calls handled at once per connection; more wait in arrival order.
    max_calls: int = 256
    #: Calls read and waiting per connection before it is no longer read.
    max_queued_calls: int = 1024
    #: Streams open at once per connection.
    max_streams: int = 64
    #: Reply and event bytes a client may leave unread before it is paused.
    max_client_output: int = 4 * MiB

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"limit {f.name} must be a number, not {value!r}")
            if value < 0 or (value == 0 and f.name != "keepalive_interval"):
                raise ValueError(f"limit {f.name} must be positive, not {value!r}")
        if self.max_message < 28:
            raise ValueError("limit max_message must hold at least a packet header (28)")

    def replace(self, **changes: Any) -> Limits:
        """A copy with ``changes`` (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


DEFAULT_LIMITS = Limits()
