"""The stream-carrying subset of libvirt's REMOTE program (``remote_protocol.x``).

Procedure numbers and structures are libvirt's, field for field; names follow libvirt's
with the ``remote_`` prefix dropped.
"""

from __future__ import annotations

from typing import Annotated

from .. import xdr
from ..constants import REMOTE_PROGRAM, REMOTE_VERSION, STRING_MAX
from ..program import Program, StreamDirection

NonnullString = Annotated[str, xdr.string(STRING_MAX)]
OptString = Annotated[str | None, xdr.optional(xdr.string(STRING_MAX))]
UUID = Annotated[bytes, xdr.fixed_opaque(16)]

AUTH_NONE, AUTH_SASL, AUTH_POLKIT = 0, 1, 2
FEATURE_PROGRAM_KEEPALIVE = 10
VOL_UPLOAD_SPARSE_STREAM = 1
VOL_DOWNLOAD_SPARSE_STREAM = 1
DOMAIN_CONSOLE_FORCE = 1  # virDomainConsoleFlags: take over another client's session
DOMAIN_CONSOLE_SAFE = 2  # only if the driver guarantees exclusive access


@xdr.struct
class Domain:
    name: NonnullString
    uuid: UUID
    id: xdr.Int


@xdr.struct
class StoragePool:
    name: NonnullString
    uuid: UUID


@xdr.struct
class StorageVol:
    pool: NonnullString
    name: NonnullString
    key: NonnullString


@xdr.struct
class ConnectOpenArgs:
    name: OptString
    flags: xdr.UInt


@xdr.struct
class NameArgs:
    name: NonnullString


@xdr.struct
class DomainReply:
    dom: Domain


@xdr.struct
class SupportsFeatureArgs:
    feature: xdr.Int


@xdr.struct
class SupportsFeatureReply:
    supported: xdr.Int


@xdr.struct
class AuthListReply:
    types: Annotated[list[int], xdr.array(xdr.int_, 20)]


@xdr.struct
class StoragePoolReply:
    pool: StoragePool


@xdr.struct
class VolLookupArgs:
    pool: StoragePool
    name: NonnullString


@xdr.struct
class StorageVolReply:
    vol: StorageVol


@xdr.struct
class VolArgs:
    vol: StorageVol


@xdr.struct
class VolInfoReply:
    type: xdr.Int  # XDR char: a 4-byte int on the wire
    capacity: xdr.UHyper
    allocation: xdr.UHyper


@xdr.struct
class UriReply:
    uri: NonnullString


@xdr.struct
class VolTransferArgs:
    vol: StorageVol
    offset: xdr.UHyper
    length: xdr.UHyper
    flags: xdr.UInt


@xdr.struct
class ScreenshotArgs:
    dom: Domain
    screen: xdr.UInt
    flags: xdr.UInt


@xdr.struct
class OpenConsoleArgs:
    dom: Domain
    dev_name: OptString
    flags: xdr.UInt


@xdr.struct
class ScreenshotReply:
    mime: OptString


REMOTE = Program("REMOTE", REMOTE_PROGRAM, REMOTE_VERSION)
CONNECT_OPEN = REMOTE.procedure(1, "CONNECT_OPEN", ConnectOpenArgs, None)
CONNECT_CLOSE = REMOTE.procedure(2, "CONNECT_CLOSE", None, None)
DOMAIN_LOOKUP_BY_NAME = REMOTE.procedure(23, "DOMAIN_LOOKUP_BY_NAME", NameArgs, DomainReply)
CONNECT_SUPPORTS_FEATURE = REMOTE.procedure(
    60, "CONNECT_SUPPORTS_FEATURE", SupportsFeatureArgs, SupportsFeatureReply
)
AUTH_LIST = REMOTE.procedure(66, "AUTH_LIST", None, AuthListReply)
STORAGE_POOL_LOOKUP_BY_NAME = REMOTE.procedure(
    84, "STORAGE_POOL_LOOKUP_BY_NAME", NameArgs, StoragePoolReply
)
STORAGE_VOL_LOOKUP_BY_NAME = REMOTE.procedure(
    95, "STORAGE_VOL_LOOKUP_BY_NAME", VolLookupArgs, StorageVolReply
)
STORAGE_VOL_GET_INFO = REMOTE.procedure(98, "STORAGE_VOL_GET_INFO", VolArgs, VolInfoReply)
CONNECT_GET_URI = REMOTE.procedure(110, "CONNECT_GET_URI", None, UriReply)
DOMAIN_OPEN_CONSOLE = REMOTE.procedure(
    201, "DOMAIN_OPEN_CONSOLE", OpenConsoleArgs, None, stream=StreamDirection.BOTH
)
STORAGE_VOL_UPLOAD = REMOTE.procedure(
    208, "STORAGE_VOL_UPLOAD", VolTransferArgs, None, stream=StreamDirection.UPLOAD
)
STORAGE_VOL_DOWNLOAD = REMOTE.procedure(
    209, "STORAGE_VOL_DOWNLOAD", VolTransferArgs, None, stream=StreamDirection.DOWNLOAD
)
DOMAIN_SCREENSHOT = REMOTE.procedure(
    211, "DOMAIN_SCREENSHOT", ScreenshotArgs, ScreenshotReply, stream=StreamDirection.DOWNLOAD
)
