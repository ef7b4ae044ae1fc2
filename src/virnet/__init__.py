"""virnet: libvirt's RPC wire protocol with generic data streams, for asyncio.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.
"""

from __future__ import annotations

from . import constants as constants
from . import xdr as xdr
from ._core import Mode as Mode
from ._impl import compiled as compiled
from .client import Client as Client
from .client import connect as connect
from .errors import (
    CallTimeoutError as CallTimeoutError,
)
from .errors import (
    ConnectionClosedError as ConnectionClosedError,
)
from .errors import (
    ProtocolError as ProtocolError,
)
from .errors import (
    RPCError as RPCError,
)
from .errors import (
    StreamError as StreamError,
)
from .errors import (
    VirnetError as VirnetError,
)
from .errors import (
    XdrError as XdrError,
)
from .limits import Limits as Limits
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
