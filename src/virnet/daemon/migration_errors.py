"""The errors both halves of a migration answer with (STORAGE domain, libvirt's codes)."""

from __future__ import annotations

import asyncio

from ..errors import ErrorCode, ErrorDomain, RPCError


def arg_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STORAGE)


def invalid(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.OPERATION_INVALID, domain=ErrorDomain.STORAGE)


def aborted(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.OPERATION_ABORTED, domain=ErrorDomain.STORAGE)


def failure_reason(exc: BaseException) -> str:
    """What went wrong, for a log line or an error message."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled: the daemon is stopping"
    return str(exc) or type(exc).__name__
