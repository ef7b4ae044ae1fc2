"""Socket activation: listening sockets handed over by systemd (or anything that speaks
the same convention, ``sd_listen_fds(3)``).

The service manager binds the sockets, starts the daemon with them open from descriptor
3 on, and says so in the environment: ``LISTEN_PID`` (must be this process),
``LISTEN_FDS`` (how many) and, optionally, ``LISTEN_FDNAMES`` (colon-separated names,
set by ``FileDescriptorName=`` in the .socket unit).  A socket named ``readonly`` (or
ending in ``-ro``, like ``virnetd-ro``) becomes a read-only listener.  The variables are
removed once read, so programs the daemon starts (consoles) do not inherit them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

FIRST_FD = 3  # SD_LISTEN_FDS_START


@dataclass
class InheritedSocket:
    sock: socket.socket
    name: str

    @property
    def readonly(self) -> bool:
        return self.name == "readonly" or self.name.endswith("-ro")


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[InheritedSocket]:
    """The listening sockets passed to this process, or ``[]`` when none were.  Raises
    ``ValueError`` when the variables are there but make no sense."""
    env = os.environ if environ is None else environ
    listen_pid = env.pop("LISTEN_PID", None)
    count = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or count is None:
        return []
    if listen_pid != str(os.getpid() if pid is None else pid):
        return []  # meant for another process (we were started by the one it was for)
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"LISTEN_FDS is not a number: {count!r}") from None
    names = names_text.split(":") if names_text else []
    found = []
    for i in range(n):
        fd = FIRST_FD + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise ValueError(f"LISTEN_FDS: descriptor {fd} is not a listening stream socket")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        found.append(InheritedSocket(sock, names[i] if i < len(names) else f"fd{fd}"))
    return found
