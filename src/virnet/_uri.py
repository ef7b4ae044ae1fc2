"""Connection URIs: ``unix:///abs/path.sock`` and ``tcp://host:port``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Address:
    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_uri(uri: str) -> Address:
    """Parse a virnet URI; raises ``ValueError`` with a clear reason."""
    parts = urlsplit(uri)
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: a unix URI has no host (use unix:///abs/path.sock)")
        if not path.startswith("/"):
            raise ValueError(f"{uri!r}: the socket path must be absolute")
        return Address("unix", path=path)
    if parts.scheme == "tcp":
        if not parts.hostname:
            raise ValueError(f"{uri!r}: a tcp URI needs a host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{uri!r}: invalid port") from None
        if port is None:
            raise ValueError(f"{uri!r}: a tcp URI needs a port")
        return Address("tcp", host=parts.hostname, port=port)
    if parts.scheme == "tls":
        raise ValueError(f"{uri!r}: tls:// is not supported yet")
    raise ValueError(f"{uri!r}: unsupported scheme (use unix:///path or tcp://host:port)")


def default_socket_path() -> str:
    """``$VIRNET_SOCKET``, else ``$XDG_RUNTIME_DIR/virnet/virnetd.sock``, else
    ``/run/virnet/virnetd.sock`` (as root; other users get ``/tmp/virnet-UID/``)."""
    env = os.environ.get("VIRNET_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "virnet", "virnetd.sock")
    if os.geteuid() == 0:
        return "/run/virnet/virnetd.sock"
    return f"/tmp/virnet-{os.geteuid()}/virnetd.sock"


def default_uri() -> str:
    """The client's default: ``$VIRNET_DEFAULT_URI``, else the default socket."""
    return os.environ.get("VIRNET_DEFAULT_URI") or f"unix://{default_socket_path()}"
