"""FILES = 0x20008100 v1: stat, list, upload, download, delete, checksum, mkdir."""

from __future__ import annotations

import enum
from typing import Annotated

from .. import xdr
from ..constants import FILES_PROGRAM
from ..program import Program, StreamDirection

PATH_MAX = 4096
Path = Annotated[str, xdr.string(PATH_MAX)]


class Kind(enum.IntEnum):
    FILE = 1
    DIRECTORY = 2
    OTHER = 3


class TransferFlags(enum.IntFlag):
    SPARSE = 1  # holes travel as STREAM_HOLE
    EXCLUSIVE = 2  # upload fails if the path exists
    NO_SYNC = 4  # upload: skip the fsyncs before and after the commit (scratch data)


@xdr.struct
class PathArgs:
    path: Path


@xdr.struct
class StatReply:
    kind: xdr.Int
    size: xdr.UHyper
    allocation: xdr.UHyper
    mtime_ns: xdr.Hyper
    mode: xdr.UInt


@xdr.struct
class Entry:
    name: Path
    kind: xdr.Int
    size: xdr.UHyper


@xdr.struct
class ListReply:
    entries: Annotated[list[Entry], xdr.array(Entry)]


@xdr.struct
class TransferArgs:
    path: Path
    offset: xdr.UHyper
    length: xdr.UHyper
    flags: xdr.UInt


@xdr.struct
class DownloadReply:
    size: xdr.UHyper


@xdr.struct
class ChecksumArgs:
    path: Path
    algorithm: Annotated[str, xdr.string(32)]


@xdr.struct
class ChecksumReply:
    digest: Annotated[bytes, xdr.opaque(64)]


FILES = Program("FILES", FILES_PROGRAM, 1)
STAT = FILES.procedure(1, "STAT", PathArgs, StatReply)
LIST = FILES.procedure(2, "LIST", PathArgs, ListReply)
UPLOAD = FILES.procedure(3, "UPLOAD", TransferArgs, None, stream=StreamDirection.UPLOAD)
DOWNLOAD = FILES.procedure(
    4, "DOWNLOAD", TransferArgs, DownloadReply, stream=StreamDirection.DOWNLOAD
)
DELETE = FILES.procedure(5, "DELETE", PathArgs, None)
CHECKSUM = FILES.procedure(6, "CHECKSUM", ChecksumArgs, ChecksumReply)
MKDIR = FILES.procedure(7, "MKDIR", PathArgs, None)
