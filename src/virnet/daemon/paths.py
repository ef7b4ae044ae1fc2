"""Confining client-supplied paths to the daemon's data root.

A path on the wire is relative to the root and ``/``-separated.  Refused with
``VIR_ERR_INVALID_ARG``: absolute paths, ``..`` components, NUL bytes, and any path whose
resolved location (after following symlinks) is outside the root.  The final component
may be resolved or not (``follow_last``): DELETE removes a symlink itself, so it only
needs the parent inside the root.
"""

from __future__ import annotations

import os

from ..errors import ErrorCode, ErrorDomain, RPCError


def path_error(message: str) -> RPCError:
    return RPCError(message, code=ErrorCode.INVALID_ARG, domain=ErrorDomain.STORAGE)


def system_error(exc: OSError, what: str) -> RPCError:
    """libvirt's convention for OS errors: VIR_ERR_SYSTEM_ERROR with errno in int1."""
    reason = exc.strerror or str(exc)
    return RPCError(
        f"cannot {what}: {reason}",
        code=ErrorCode.SYSTEM_ERROR,
        domain=ErrorDomain.STORAGE,
        int1=exc.errno or 0,
    )


class Root:
    """The daemon's data root; turns wire paths into confined local paths."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.realpath(directory)

    def _inside(self, real: str) -> bool:
        return real == self.path or real.startswith(self.path + os.sep)

    def resolve(self, wire_path: str, *, follow_last: bool = True) -> str:
        if "\0" in wire_path:
            raise path_error("path contains a NUL byte")
        if wire_path.startswith("/"):
            raise path_error(f"absolute path refused: {wire_path!r}")
        parts = [p for p in wire_path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise path_error(f"'..' refused in path: {wire_path!r}")
        local = os.path.join(self.path, *parts) if parts else self.path
        if follow_last or not parts:
            real = os.path.realpath(local)
        else:
            real = os.path.join(os.path.realpath(os.path.dirname(local)), parts[-1])
        if not self._inside(real):
            raise path_error(f"path leads outside the data root: {wire_path!r}")
        return real

    def relative(self, local: str) -> str:
        return os.path.relpath(local, self.path)
