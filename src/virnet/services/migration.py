"""MIGRATION = 0x20008102 v1: daemon-to-daemon tunnelled transfer of images.

A client asks the *source* daemon to PERFORM the migration of one of its images to the
daemon at ``dest_uri``; the source connects there itself and becomes that daemon's
client: IDENTIFY (and, to resume, STAGED_DIGEST), then PREPARE_TUNNEL opens an upload
stream into the destination's staging area, committed atomically on finish.  The
caller hears PROGRESS events and gets ``{bytes, elapsed_ns}`` back.  docs/migration.md
tells the whole protocol, its failure handling and how a resume is agreed.

Procedures 1-4 are the public contract; 5-7 were added for resume and live bandwidth
changes (5 and 6 are daemon-to-daemon, 7 is for clients).
"""

from __future__ import annotations

import enum
from typing import Annotated

from .. import xdr
from ..constants import MIGRATION_PROGRAM
from ..program import Program, StreamDirection

NAME_MAX = 4096
URI_MAX = 1024
#: Bytes of an image identity and of a staged-prefix digest (sha256).
DIGEST_SIZE = 32

Name = Annotated[str, xdr.string(NAME_MAX)]
Digest = Annotated[bytes, xdr.opaque(64)]


class MigrationFlags(enum.IntFlag):
    MOVE = 1  # PERFORM: delete the source once the destination committed
    RESUME = 2  # PERFORM: send only what the destination is missing; PREPARE_TUNNEL:
    #             continue the staged data IDENTIFY reported on this connection


@xdr.struct
class PrepareTunnelArgs:
    name: Name
    size: xdr.UHyper
    flags: xdr.UInt


@xdr.struct
class PerformArgs:
    name: Name
    dest_uri: Annotated[str, xdr.string(URI_MAX)]
    bandwidth: xdr.UHyper  # bytes/s, 0 = unlimited
    flags: xdr.UInt


@xdr.struct
class PerformReply:
    bytes: xdr.UHyper  # the image size covered, holes included
    elapsed_ns: xdr.UHyper


@xdr.struct
class Progress:
    job_serial: xdr.UInt  # the serial of the PERFORM call this is about
    transferred: xdr.UHyper
    total: xdr.UHyper


@xdr.struct
class NameArgs:
    name: Name


@xdr.struct
class IdentifyArgs:
    """What the source tells the destination before PREPARE_TUNNEL: which image the
    stream will carry (``identity``: sha256 of the source's data root, the name, and
    the file's device, inode, size and modification time) and which data root it comes
    from (``source_root``: refused if it is the destination's own)."""

    name: Name
    size: xdr.UHyper
    identity: Digest
    source_root: Digest


@xdr.struct
class IdentifyReply:
    staged: xdr.UHyper  # bytes staged for exactly this image (0: none), a prefix


@xdr.struct
class StagedDigestArgs:
    name: Name
    length: xdr.UHyper


@xdr.struct
class StagedDigestReply:
    digest: Digest  # the block digest of the first ``length`` staged bytes


@xdr.struct
class BandwidthArgs:
    name: Name
    bandwidth: xdr.UHyper  # bytes/s, 0 = unlimited


MIGRATION = Program("MIGRATION", MIGRATION_PROGRAM, 1)
PREPARE_TUNNEL = MIGRATION.procedure(
    1, "PREPARE_TUNNEL", PrepareTunnelArgs, None, stream=StreamDirection.UPLOAD
)
PERFORM = MIGRATION.procedure(2, "PERFORM", PerformArgs, PerformReply)
PROGRESS = MIGRATION.event(3, "PROGRESS", Progress)
ABORT = MIGRATION.procedure(4, "ABORT", NameArgs, None)
IDENTIFY = MIGRATION.procedure(5, "IDENTIFY", IdentifyArgs, IdentifyReply)
STAGED_DIGEST = MIGRATION.procedure(6, "STAGED_DIGEST", StagedDigestArgs, StagedDigestReply)
SET_BANDWIDTH = MIGRATION.procedure(7, "SET_BANDWIDTH", BandwidthArgs, None)
