"""Python-visible surface of the compiled direct-run loop (``pyx/virnet/_direct_loop.pyx``).

It is the interface of the pure twin ``virnet._direct_loop_py``, name for name.
"""

from typing import Final

IS_COMPILED: Final[bool]
BUDGET: Final[int]
STOPPED: Final[int]
WAIT: Final[int]
PARTIAL: Final[int]
FOREIGN: Final[int]
SOCKET: Final[int]
SINK: Final[int]

def splice_packets(
    sock: int,
    pipe_r: int,
    pipe_w: int,
    pipe_size: int,
    sink: int,
    offset: int,
    key: tuple[int, int, int, int],
    max_payload: int,
    limit: int,
    budget: int,
    stop: bytearray,
    header: bytearray,
) -> tuple[int, int, int, int, int, int, int]: ...
