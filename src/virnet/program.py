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
from typing import Any, Generic, TypeVar, overload

from . import xdr
from .xdr import XdrType


class StreamDirection(enum.Enum):
    """Which way a procedure's stream carries data, seen from the client."""

    UPLOAD = "upload"  # client to server
    DOWNLOAD = "download"  # server to client
    BOTH = "both"


A = TypeVar("A")  # a procedure's argument type
R = TypeVar("R")  # its reply type


@dataclass(frozen=True, eq=False)
class Procedure(Generic[A, R]):
    """One procedure of a program; ``Procedure[Args, Reply]`` carries its argument and
    reply types, so ``Client.call(STAT, ...)`` is typed ``StatReply`` end to end."""

    program: Program
    number: int
    name: str
    args: XdrType[A]
    ret: XdrType[R]
    stream: StreamDirection | None = None

    # ``args`` and ``ret`` are resolved XDR types already: no ``xdr.type_of`` per call.
    def encode_args(self, value: A) -> bytes:
        return self.args.encode(value)

    def decode_args(self, data: bytes | bytearray | memoryview) -> A:
        return self.args.decode(data)

    def encode_ret(self, value: R) -> bytes:
        return self.ret.encode(value)

    def decode_ret(self, data: bytes | bytearray | memoryview) -> R:
        return self.ret.decode(data)

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
    procedures: dict[int, Procedure[Any, Any]] = field(default_factory=dict, repr=False)
    events: dict[int, Event] = field(default_factory=dict, repr=False)

    # The argument and reply specs are struct classes or None (void) in every program
    # here; anything else ``xdr.type_of`` accepts gives an untyped ``Procedure[Any, Any]``.
    @overload
    def procedure(
        self, number: int, name: str, args: type[A], ret: type[R], *,
        stream: StreamDirection | None = None,
    ) -> Procedure[A, R]: ...
    @overload
    def procedure(
        self, number: int, name: str, args: type[A], ret: None = None, *,
        stream: StreamDirection | None = None,
    ) -> Procedure[A, None]: ...
    @overload
    def procedure(
        self, number: int, name: str, args: None, ret: type[R], *,
        stream: StreamDirection | None = None,
    ) -> Procedure[None, R]: ...
    @overload
    def procedure(
        self, number: int, name: str, args: None = None, ret: None = None, *,
        stream: StreamDirection | None = None,
    ) -> Procedure[None, None]: ...
    @overload
    def procedure(
        self, number: int, name: str, args: Any, ret: Any, *,
        stream: StreamDirection | None = None,
    ) -> Procedure[Any, Any]: ...
    def procedure(
        self,
        number: int,
        name: str,
        args: Any = None,
        ret: Any = None,
        *,
        stream: StreamDirection | None = None,
    ) -> Procedure[Any, Any]:
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
