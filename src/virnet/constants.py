"""Wire numbers of libvirt's RPC protocol and virnet's extensions.

These are fixed by libvirt (``src/rpc/virnetprotocol.x``, ``virkeepaliveprotocol.x``) and by
virnet's product contract; changing one breaks interoperability.
"""

from __future__ import annotations

import enum
from typing import Final


class MessageType(enum.IntEnum):
    """``virNetMessageType``: what a packet is."""

    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


class MessageStatus(enum.IntEnum):
    """``virNetMessageStatus``."""

    OK = 0
    ERROR = 1
    CONTINUE = 2


#: Bytes in the length word that starts every packet (it counts itself).
LEN_SIZE: Final = 4
#: Bytes in the fixed header ``prog, vers, proc, type, serial, status``.
HEADER_SIZE: Final = 24
#: The smallest legal packet: length word plus header, empty payload.
MIN_PACKET: Final = LEN_SIZE + HEADER_SIZE
#: Largest header + payload a receiver accepts by default (libvirt's VIR_NET_MESSAGE_MAX).
#: The length word may therefore be at most ``max_message + LEN_SIZE``.
MAX_MESSAGE: Final = 32 * 1024 * 1024
#: Largest payload of one stream data packet we send (VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX),
#: so a 256 KiB packet never delays other traffic on the connection for long.
STREAM_CHUNK: Final = 262120
#: libvirt's limit for ``remote_nonnull_string`` and ``virNetMessageNonnullString``.
STRING_MAX: Final = 4 * 1024 * 1024

KEEPALIVE_PROGRAM: Final = 0x6B656570
KEEPALIVE_VERSION: Final = 1
KEEPALIVE_PING: Final = 1
KEEPALIVE_PONG: Final = 2

#: virnet's own negotiated extensions; libvirt peers never see them.
CONTROL_PROGRAM: Final = 0x766E6574
CONTROL_VERSION: Final = 1
CONTROL_HELLO: Final = 1
CONTROL_CREDIT: Final = 2

FEATURE_FLOW_CONTROL: Final = 1
FEATURE_KEEPALIVE: Final = 2

REMOTE_PROGRAM: Final = 0x20008086
REMOTE_VERSION: Final = 1

FILES_PROGRAM: Final = 0x20008100
CONSOLE_PROGRAM: Final = 0x20008101
MIGRATION_PROGRAM: Final = 0x20008102
