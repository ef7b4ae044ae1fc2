"""virnet: libvirt's RPC wire protocol with generic data streams, for asyncio.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.  The names are loaded on first use, so that a program which needs
only part of the package (the ``virnet`` command, a client that never serves) does not
pay for importing the rest at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CallTimeoutError as CallTimeoutError
from .errors import ConnectionClosedError as ConnectionClosedError
from .errors import ProtocolError as ProtocolError
from .errors import RPCError as RPCError
from .errors import StreamError as StreamError
from .errors import VirnetError as VirnetError
from .errors import XdrError as XdrError
from .limits import Limits as Limits

if TYPE_CHECKING:
    from . import constants as constants
    from . import xdr as xdr
    from ._core import Mode as Mode
    from ._impl import compiled as compiled
    from .client import Client as Client
    from .client import connect as connect
    from .program import Event as Event
    from .program import Procedure as Procedure
    from .program import Program as Program
    from .program import StreamDirection as StreamDirection
    from .server import CallContext as CallContext
    from .server import Server as Server
    from .stream import Hole as Hole
    from .stream import Stream as Stream
    from .stream import StreamEvent as StreamEvent
    from .stream import StreamState as StreamState

__version__ = "0.1.0"

#: Public name -> the module that defines it (None: the name is that module).
_LAZY: dict[str, tuple[str, str | None]] = {
    "constants": (".constants", None),
    "xdr": (".xdr", None),
    "Mode": ("._core", "Mode"),
    "compiled": ("._impl", "compiled"),
    "Client": (".client", "Client"),
    "connect": (".client", "connect"),
    "Event": (".program", "Event"),
    "Procedure": (".program", "Procedure"),
    "Program": (".program", "Program"),
    "StreamDirection": (".program", "StreamDirection"),
    "CallContext": (".server", "CallContext"),
    "Server": (".server", "Server"),
    "Hole": (".stream", "Hole"),
    "Stream": (".stream", "Stream"),
    "StreamEvent": (".stream", "StreamEvent"),
    "StreamState": (".stream", "StreamState"),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'virnet' has no attribute {name!r}") from None
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CallContext",
    "CallTimeoutError",
    "Client",
    "ConnectionClosedError",
    "Event",
    "Hole",
    "Limits",
    "Mode",
    "Procedure",
    "Program",
    "ProtocolError",
    "RPCError",
    "Server",
    "Stream",
    "StreamDirection",
    "StreamError",
    "StreamEvent",
    "StreamState",
    "VirnetError",
    "XdrError",
    "compiled",
    "connect",
    "constants",
    "xdr",
]
