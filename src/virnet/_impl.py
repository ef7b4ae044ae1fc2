"""The one place that chooses the core: compiled Cython or its pure-Python twins.

The core is two modules: the wire (``_wire``: framing, buffers, XDR) and the inner loop
of direct runs (``_direct_loop``).  ``VIRNET_NO_EXTENSIONS=1`` (any non-empty value)
selects the pure twins.  Otherwise the compiled modules are used, both or neither; if
one is missing (a pure build, or an unsupported platform) the pure twins are used with a
RuntimeWarning, never silently.  The test suite's
compiled run checks ``virnet.compiled`` and fails when the extension is not there.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

NO_EXTENSIONS = bool(os.environ.get("VIRNET_NO_EXTENSIONS"))

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _direct_loop_py as direct_loop
    from . import _wire_py as wire
else:
    try:
        from . import _direct_loop as direct_loop  # type: ignore[no-redef]
        from . import _wire as wire  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"virnet: compiled core unavailable ({exc}); using the pure-Python core. "
            "Set VIRNET_NO_EXTENSIONS=1 to choose it explicitly.",
            RuntimeWarning,
            stacklevel=2,
        )
        from . import _direct_loop_py as direct_loop
        from . import _wire_py as wire

compiled: bool = bool(wire.IS_COMPILED and direct_loop.IS_COMPILED)

Calls = wire.Calls
Message = wire.Message
FrameDecoder = wire.FrameDecoder
Packer = wire.Packer
Unpacker = wire.Unpacker
pack_header = wire.pack_header
encode_message = wire.encode_message
queue_message = wire.queue_message
encode_stream_data = wire.encode_stream_data
check_length = wire.check_length

__all__ = [
    "Calls",
    "FrameDecoder",
    "Message",
    "Packer",
    "Unpacker",
    "check_length",
    "compiled",
    "direct_loop",
    "encode_message",
    "encode_stream_data",
    "pack_header",
    "queue_message",
    "wire",
]
