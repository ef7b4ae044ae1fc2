"""Exceptions raised by virnet, and libvirt's error numbers that it uses.

``RPCError`` carries every field of libvirt's ``virNetMessageError`` so that an error from
libvirtd or from a virnet daemon surfaces with the same code, domain and message that
``virsh`` would show.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """The subset of libvirt's ``virErrorNumber`` that virnet produces or tests for."""

    OK = 0
    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    INVALID_ARG = 8
    OPERATION_FAILED = 9
    SYSTEM_ERROR = 38
    RPC = 39
    NO_DOMAIN = 42
    NO_STORAGE_POOL = 49
    NO_STORAGE_VOL = 50
    OPERATION_INVALID = 55
    AUTH_FAILED = 45
    OPERATION_DENIED = 70
    INVALID_STREAM = 73
    OPERATION_TIMEOUT = 68
    NO_CLIENT = 81
    OPERATION_ABORTED = 78


class ErrorDomain(enum.IntEnum):
    """The subset of libvirt's ``virErrorDomain`` that virnet produces."""

    NONE = 0
    RPC = 7
    REMOTE = 13
    STORAGE = 18
    STREAMS = 38


class ErrorLevel(enum.IntEnum):
    NONE = 0
    WARNING = 1
    ERROR = 2


class VirnetError(Exception):
    """Base class of every exception virnet raises on purpose."""


class ProtocolError(VirnetError):
    """The peer broke the wire protocol; the connection cannot continue."""


class XdrError(ProtocolError, ValueError):
    """A value cannot be encoded, or bytes cannot be decoded, as the schema says.

    ``path`` names the field (``"args.vol.name"``) when a struct layer knows it.
    """

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)

    def at(self, field: str) -> XdrError:
        """The same error, one field further out."""
        return XdrError(self.reason, f"{field}.{self.path}" if self.path else field)


class ConnectionClosedError(VirnetError, ConnectionError):
    """The connection ended (cleanly, by error, or by keepalive timeout)."""


class RPCError(VirnetError):
    """An error reply: libvirt's ``virNetMessageError`` fields, all of them."""

    def __init__(
        self,
        message: str | None,
        code: int = ErrorCode.INTERNAL_ERROR,
        domain: int = ErrorDomain.RPC,
        level: int = ErrorLevel.ERROR,
        str1: str | None = None,
        str2: str | None = None,
        str3: str | None = None,
        int1: int = 0,
        int2: int = 0,
    ) -> None:
        self.message = message
        self.code = code
        self.domain = domain
        self.level = level
        self.str1 = str1
        self.str2 = str2
        self.str3 = str3
        self.int1 = int1
        self.int2 = int2
        super().__init__(message or f"error code {code}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code}, "
            f"domain={self.domain}, level={self.level})"
        )


class StreamError(RPCError):
    """A stream failed or was aborted; raised by every later operation on it."""


class CallTimeoutError(VirnetError, TimeoutError):
    """A call's deadline passed before its reply arrived."""
