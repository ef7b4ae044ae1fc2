"""Declaring RPC programs, their procedures and their events.

A ``Program`` is libvirt's unit of dispatch: a 32-bit program number and a version.  Each
``Procedure`` names its number, its argument and reply types (anything ``xdr.type_of``
accepts: an XDR type, an ``@xdr.struct`` class, or ``None`` for void) and, for
stream-carrying procedures, the direction of the stream::

    FILES = Program("FILES", 0x20008100, 1)
    STAT = FILES.procedure(1, "STAT", PathArgs, StatReply)
    UPLOAD = FILES.procedure(3, "UPLOAD", TransferArgs, None, stream=StreamDirection.UPLOAD)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from . import xdr
from .xdr import XdrType


class StreamDirection(enum.Enum):
    """Which way a procedure's stream carries data, seen from the client."""

    UPLOAD = "upload"  # client to server
    DOWNLOAD = "download"  # server to client
    BOTH = "both"


@dataclass(frozen=True, eq=False)
class Procedure:
    program: Program
    number: int
    name: str
    args: XdrType[Any]
    ret: XdrType[Any]
    stream: StreamDirection | None = None

    def encode_args(self, value: Any) -> bytes:
        return xdr.encode(self.args, value)

    def decode_args(self, data: bytes | bytearray | memoryview) -> Any:
        return xdr.decode(self.args, data)

    def encode_ret(self, value: Any) -> bytes:
        return xdr.encode(self.ret, value)

    def decode_ret(self, data: bytes | bytearray | memoryview) -> Any:
        return xdr.decode(self.ret, data)

    def __repr__(self) -> str:
        return f"<Procedure {self.program.name}.{self.name} ({self.number})>"


@dataclass(frozen=True, eq=False)
class Event:
    """An asynchronous MESSAGE a program may send (serial 0, no reply)."""

    program: Program
    number: int
    name: str
    body: XdrType[Any]

    def __repr__(self) -> str:
        return f"<Event {self.program.name}.{self.name} ({self.number})>"


@dataclass(eq=False)
class Program:
    name: str
    number: int
    version: int
    procedures: dict[int, Procedure] = field(default_factory=dict, repr=False)
    events: dict[int, Event] = field(default_factory=dict, repr=False)

    def procedure(
        self,
        number: int,
        name: str,
        args: Any = None,
        ret: Any = None,
        *,
        stream: StreamDirection | None = None,
    ) -> Procedure:
        if number in self.procedures:
            raise ValueError(f"{self.name}: procedure {number} is declared twice")
        proc = Procedure(self, number, name, xdr.type_of(args), xdr.type_of(ret), stream)
        self.procedures[number] = proc
        return proc

    def event(self, number: int, name: str, body: Any = None) -> Event:
        if number in self.events:
            raise ValueError(f"{self.name}: event {number} is declared twice")
        ev = Event(self, number, name, xdr.type_of(body))
        self.events[number] = ev
        return ev

    @property
    def key(self) -> tuple[int, int]:
        return (self.number, self.version)
