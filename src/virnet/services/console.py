"""CONSOLE = 0x20008101 v1: list the daemon's consoles, attach to one, resize it."""

from __future__ import annotations

import enum
from typing import Annotated

from .. import xdr
from ..constants import CONSOLE_PROGRAM
from ..program import Program, StreamDirection

NAME_MAX = 256
Name = Annotated[str, xdr.string(NAME_MAX)]


class OpenFlags(enum.IntFlag):
    FORCE = 1  # take the console over from the session holding it
    NO_HISTORY = 2  # do not replay the console's history before live output


@xdr.struct
class ListReply:
    names: Annotated[list[str], xdr.array(xdr.string(NAME_MAX))]


@xdr.struct
class OpenArgs:
    name: Name
    flags: xdr.UInt


@xdr.struct
class ResizeArgs:
    name: Name
    rows: xdr.UInt
    cols: xdr.UInt


CONSOLE = Program("CONSOLE", CONSOLE_PROGRAM, 1)
LIST = CONSOLE.procedure(1, "LIST", None, ListReply)
OPEN = CONSOLE.procedure(2, "OPEN", OpenArgs, None, stream=StreamDirection.BOTH)
RESIZE = CONSOLE.procedure(3, "RESIZE", ResizeArgs, None)
