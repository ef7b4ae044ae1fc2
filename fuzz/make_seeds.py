"""Write seed corpora for the fuzz harnesses, built from valid messages.

    python fuzz/make_seeds.py [OUT_DIR]        # default: fuzz/seeds

One directory per harness (``frames``, ``xdr``, ``core``, ``daemon``, ``client``), each file one
input in that harness's layout (see the harness's docstring): real CALL, REPLY, error
REPLY, STREAM data and end, STREAM_HOLE, CREDIT, HELLO and keepalive packets, in the
sequences a client and a daemon exchange (calls of every FILES procedure, uploads with
finish and with abort, sparse uploads, downloads), plus every XDR struct encoded from a
sample value.  The output is deterministic.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from virnet import protocol, xdr  # noqa: E402
from virnet._impl import encode_message  # noqa: E402
from virnet.constants import (  # noqa: E402
    CONTROL_CREDIT,
    CONTROL_HELLO,
    CONTROL_PROGRAM,
    CONTROL_VERSION,
    FILES_PROGRAM,
    KEEPALIVE_PING,
    KEEPALIVE_PONG,
    KEEPALIVE_PROGRAM,
    KEEPALIVE_VERSION,
    REMOTE_PROGRAM,
    STREAM_CHUNK,
)
from virnet.errors import RPCError  # noqa: E402
from virnet.services import files  # noqa: E402

CALL, REPLY, MESSAGE, STREAM, HOLE = 0, 1, 2, 3, 6
OK, ERROR, CONTINUE = 0, 1, 2


def pkt(prog: int, proc: int, mtype: int, serial: int, status: int, payload: bytes = b"",
        vers: int = 1) -> bytes:
    return b"".join(encode_message(prog, vers, proc, mtype, serial, status, payload))


def files_call(proc: Any, serial: int, args: Any) -> bytes:
    return pkt(FILES_PROGRAM, proc.number, CALL, serial, OK, proc.encode_args(args))


def hello_call(serial: int = 1) -> bytes:
    return pkt(CONTROL_PROGRAM, CONTROL_HELLO, CALL, serial, OK,
               xdr.encode(protocol.Hello, protocol.Hello(3, 4 << 20)), CONTROL_VERSION)


def credit(proc: int, serial: int, amount: int) -> bytes:
    return pkt(CONTROL_PROGRAM, CONTROL_CREDIT, MESSAGE, 0, OK,
               xdr.encode(protocol.Credit, protocol.Credit(FILES_PROGRAM, 1, proc, serial,
                                                           amount)), CONTROL_VERSION)


def hole(proc: int, serial: int, length: int) -> bytes:
    return pkt(FILES_PROGRAM, proc, HOLE, serial, CONTINUE,
               xdr.encode(protocol.StreamHole, protocol.StreamHole(length, 0)))


def error_payload(text: str = "aborted") -> bytes:
    return protocol.encode_error(RPCError(text, code=78, domain=38))


PING = pkt(KEEPALIVE_PROGRAM, KEEPALIVE_PING, MESSAGE, 0, OK, vers=KEEPALIVE_VERSION)
PONG = pkt(KEEPALIVE_PROGRAM, KEEPALIVE_PONG, MESSAGE, 0, OK, vers=KEEPALIVE_VERSION)
UP, DOWN = files.UPLOAD.number, files.DOWNLOAD.number


def transfer(path: str, flags: int = 0, offset: int = 0, length: int = 0) -> Any:
    return files.TransferArgs(path, offset, length, flags)


def client_sequences() -> dict[str, bytes]:
    """What a client sends a daemon (the daemon harness and the server-role core)."""
    data = bytes(range(256)) * 8
    return {
        "stat": files_call(files.STAT, 1, files.PathArgs("a")),
        "stat_missing": files_call(files.STAT, 1, files.PathArgs("nope/../x")),
        "list": files_call(files.LIST, 2, files.PathArgs("d")),
        "list_root": files_call(files.LIST, 2, files.PathArgs("")),
        "checksum": files_call(files.CHECKSUM, 3, files.ChecksumArgs("d/e/c", "sha256")),
        "mkdir_delete": files_call(files.MKDIR, 4, files.PathArgs("new"))
        + files_call(files.DELETE, 5, files.PathArgs("new")),
        "download": files_call(files.DOWNLOAD, 6, transfer("d/e/c")),
        "download_range": files_call(files.DOWNLOAD, 6, transfer("a", 0, 100, 1000)),
        "download_sparse": files_call(files.DOWNLOAD, 6, transfer("d/e/c", 1)),
        "upload": files_call(files.UPLOAD, 7, transfer("up")) + pkt(
            FILES_PROGRAM, UP, STREAM, 7, CONTINUE, data) + pkt(FILES_PROGRAM, UP, STREAM, 7, OK),
        "upload_abort": files_call(files.UPLOAD, 8, transfer("up2", 4))
        + pkt(FILES_PROGRAM, UP, STREAM, 8, CONTINUE, data[:100])
        + pkt(FILES_PROGRAM, UP, STREAM, 8, ERROR, error_payload()),
        "upload_sparse": files_call(files.UPLOAD, 9, transfer("up3", 1 | 4))
        + pkt(FILES_PROGRAM, UP, STREAM, 9, CONTINUE, data[:512]) + hole(UP, 9, 1 << 16)
        + pkt(FILES_PROGRAM, UP, STREAM, 9, CONTINUE, data[:512])
        + pkt(FILES_PROGRAM, UP, STREAM, 9, OK),
        "upload_inplace": files_call(files.UPLOAD, 10, transfer("a", 0, 16, 32))
        + pkt(FILES_PROGRAM, UP, STREAM, 10, CONTINUE, data[:32])
        + pkt(FILES_PROGRAM, UP, STREAM, 10, OK),
        "upload_exclusive": files_call(files.UPLOAD, 11, transfer("a", 2)),
        "ping_stat": PING + files_call(files.STAT, 1, files.PathArgs("a")) + PONG,
        "unknown_program": pkt(0x12345678, 1, CALL, 1, OK),
        "unknown_proc": pkt(FILES_PROGRAM, 99, CALL, 1, OK),
        "remote_program": pkt(REMOTE_PROGRAM, 1, CALL, 1, OK, b"\0\0\0\0\0\0\0\0"),
        "bad_args": pkt(FILES_PROGRAM, 1, CALL, 1, OK, b"\0\0\0\x05abc"),
        "control_unknown": pkt(CONTROL_PROGRAM, 9, CALL, 1, OK, vers=CONTROL_VERSION),
        "hello_again": hello_call(3),
        "stream_unrouted": pkt(FILES_PROGRAM, UP, STREAM, 42, CONTINUE, b"xyz"),
        "call_error_status": pkt(FILES_PROGRAM, 1, CALL, 1, ERROR),
        "reply_to_server": pkt(FILES_PROGRAM, 1, REPLY, 1, OK),
    }


def native_sequences() -> dict[str, bytes]:
    """Sequences that need HELLO first (sent by the harness with flag bit 0)."""
    data = bytes(range(256)) * 16
    return {
        "download_credit": files_call(files.DOWNLOAD, 2, transfer("d/e/c"))
        + credit(DOWN, 2, 1 << 20),
        "upload_native": files_call(files.UPLOAD, 3, transfer("n1", 4))
        + pkt(FILES_PROGRAM, UP, STREAM, 3, CONTINUE, data)
        + pkt(FILES_PROGRAM, UP, STREAM, 3, OK),
        "credit_unknown": credit(DOWN, 77, 5),
        "credit_bad": pkt(CONTROL_PROGRAM, CONTROL_CREDIT, MESSAGE, 0, OK, b"\0" * 19,
                          CONTROL_VERSION),
    }


def server_sequences() -> dict[str, bytes]:
    """What a daemon sends a client (the client-role core): replies to serials 1-7 for
    FILES procedures 1-7 (as the core harness's pending calls), events, stream data."""
    stat = xdr.encode(files.StatReply, files.StatReply(1, 4096, 4096, 10**18, 0o644))
    entries = files.ListReply([files.Entry("a", 1, 4096), files.Entry("d", 2, 0)])
    return {
        "reply_stat": pkt(FILES_PROGRAM, 1, REPLY, 1, OK, stat),
        "reply_list": pkt(FILES_PROGRAM, 2, REPLY, 2, OK, xdr.encode(files.ListReply, entries)),
        "reply_error": pkt(FILES_PROGRAM, 3, REPLY, 3, ERROR, error_payload("no")),
        "download_data": pkt(FILES_PROGRAM, 4, REPLY, 4, OK,
                             xdr.encode(files.DownloadReply, files.DownloadReply(5)))
        + pkt(FILES_PROGRAM, DOWN, STREAM, 4, CONTINUE, b"hello") + hole(DOWN, 4, 4096)
        + pkt(FILES_PROGRAM, DOWN, STREAM, 4, CONTINUE) + pkt(FILES_PROGRAM, DOWN, STREAM, 4, OK),
        "stream_error": pkt(FILES_PROGRAM, DOWN, STREAM, 4, ERROR, error_payload()),
        "event": pkt(FILES_PROGRAM, 1, MESSAGE, 0, OK, b"\0\0\0\1"),
        "keepalive": PING + PONG,
        "credit": credit(UP, 3, 65536),
    }


def client_seeds() -> dict[str, bytes]:
    """What a server answers the client harness: part A after the first call, part B
    after the rest (serials: HELLO 1, STAT 2, DOWNLOAD 3; without HELLO one less)."""
    stat = xdr.encode(files.StatReply, files.StatReply(1, 5, 8, 1, 0o600))
    hello = pkt(CONTROL_PROGRAM, CONTROL_HELLO, REPLY, 1, OK,
                xdr.encode(protocol.Hello, protocol.Hello(3, 1 << 20)), CONTROL_VERSION)
    refused = pkt(CONTROL_PROGRAM, CONTROL_HELLO, REPLY, 1, ERROR, error_payload("no"),
                  CONTROL_VERSION)

    def rest(first: int, sparse: bool = False) -> bytes:
        dl = first + 1
        body = pkt(FILES_PROGRAM, 1, REPLY, first, OK, stat) + pkt(
            FILES_PROGRAM, DOWN, REPLY, dl, OK,
            xdr.encode(files.DownloadReply, files.DownloadReply(5)))
        body += pkt(FILES_PROGRAM, DOWN, STREAM, dl, CONTINUE, b"hel")
        if sparse:
            body += hole(DOWN, dl, 1000)
        body += pkt(FILES_PROGRAM, DOWN, STREAM, dl, CONTINUE, b"lo")
        body += pkt(FILES_PROGRAM, DOWN, STREAM, dl, CONTINUE)
        return body + pkt(FILES_PROGRAM, DOWN, STREAM, dl, OK) + PONG

    def seed(flags: int, a: bytes, b: bytes) -> bytes:
        return bytes([flags]) + len(a).to_bytes(2, "big") + a + b

    legacy = rest(1)
    stat1 = pkt(FILES_PROGRAM, 1, REPLY, 1, OK, stat)
    return {
        "native": seed(1, hello, rest(2)),
        "native_sparse": seed(3, hello, rest(2, True)),
        "native_credit": seed(1, hello, credit(DOWN, 3, 100) + rest(2)),
        "refused_hello": seed(1, refused, rest(2)),
        "legacy": seed(0, stat1, legacy[len(stat1):]),
        "errors": seed(1, hello, pkt(FILES_PROGRAM, 1, REPLY, 2, ERROR, error_payload())
                       + pkt(FILES_PROGRAM, DOWN, REPLY, 3, ERROR, error_payload())),
        "stream_error": seed(1, hello, pkt(FILES_PROGRAM, DOWN, REPLY, 3, OK,
                                           xdr.encode(files.DownloadReply,
                                                      files.DownloadReply(5)))
                             + pkt(FILES_PROGRAM, DOWN, STREAM, 3, ERROR, error_payload())),
        "event_ping": seed(1, hello, PING + pkt(FILES_PROGRAM, 9, MESSAGE, 0, OK, b"x")),
    }


def sample(t: Any, variant: int) -> Any:
    """A value of XDR type ``t``; ``variant`` picks among optional/union/array shapes."""
    if isinstance(t, xdr.StructType):
        return t.cls(*(sample(ft, variant + i) for i, (_, ft) in enumerate(t.fields)))
    if isinstance(t, xdr.union):
        keys = sorted(t.arms)
        disc = keys[variant % len(keys)]
        if isinstance(t.discriminant, xdr.enum):
            disc = t.discriminant.cls(disc)
        return (disc, sample(t.arms[int(disc)], variant))
    if isinstance(t, xdr.optional):
        return None if variant % 2 else sample(t.inner, variant + 1)
    if isinstance(t, xdr.fixed_array):
        return [sample(t.element, variant + i) for i in range(t.size)]
    if isinstance(t, xdr.array):
        n = min(variant % 3, t.maximum)
        return [sample(t.element, variant + i) for i in range(n)]
    if isinstance(t, xdr.enum):
        return list(t.cls)[variant % len(t.cls)]
    if isinstance(t, xdr.string):
        return ["", "a/b.img", "päth\udcff", "x" * 37][variant % 4][: t.maximum]
    if isinstance(t, xdr.fixed_opaque):
        return bytes(range(t.size))
    if isinstance(t, xdr.opaque):
        return hashlib.sha256(b"%d" % variant).digest()[: min(t.maximum, 5 + variant % 30)]
    if t is xdr.void:
        return None
    kind = getattr(t, "kind", "")
    return {
        "int": -5 - variant, "uint": 7 + variant, "hyper": -(1 << 40), "uhyper": (1 << 63) + 1,
        "bool": bool(variant % 2), "float": 1.5, "double": -2.25,
    }[kind]


def frames_seeds(packets: list[bytes]) -> dict[str, bytes]:
    stream = b"".join(packets)
    out = {}
    for name, config, splits in (
        ("whole", 0, b""),
        ("bytewise", 0, b"\x00"),
        ("odd_splits", 0, bytes([2, 6, 27, 100])),
        ("feed", 16, bytes([9, 30])),
        ("hold", 32, bytes([27])),
        ("small_limit", 2, b""),
        ("large_reads", 0, bytes([241, 250])),
    ):
        out[name] = bytes([config, len(splits)]) + splits + stream
    def big(plen: int, fill: int, mtype: int = STREAM, status: int = CONTINUE) -> bytes:
        header = b"".join(encode_message(FILES_PROGRAM, 1, UP, mtype, 9, status))[4:]
        return b"\x01" + header + plen.to_bytes(3, "big") + bytes([fill])

    small = b"\x00" + bytes([len(packets[0])]) + packets[0]
    script = big(STREAM_CHUNK, 0x41) + big(STREAM_CHUNK, 0x42) + small + big(70000, 0x43)
    out["script_stream"] = bytes([8, 0]) + script
    out["script_hold_split"] = bytes([8 | 32, 2, 250, 99]) + script
    out["script_oversize"] = bytes([8 | 32, 1, 245]) + big(300000, 0x44) + big(STREAM_CHUNK, 1)
    out["script_limit"] = bytes([8 | 5, 0]) + big(100000, 0x45)
    out["bad_length"] = bytes([0, 0]) + packets[0] + b"\x00\x00\x00\x05" + b"\0" * 24
    return out


def main(argv: list[str]) -> int:
    out_dir = argv[1] if len(argv) > 1 else os.path.join(HERE, "seeds")
    import fuzz_xdr  # the harness's schema list (an import only: no fuzzing starts)

    corpora: dict[str, dict[str, bytes]] = {
        h: {} for h in ("frames", "xdr", "core", "daemon", "client")}
    corpora["client"] = client_seeds()
    client = client_sequences()
    native = native_sequences()
    server = server_sequences()
    for name, seq in client.items():
        corpora["daemon"][name] = b"\x00" + seq
        corpora["daemon"][name + "_hello"] = b"\x01" + seq
        corpora["core"]["server_" + name] = bytes([0, 0]) + seq
    for name, seq in native.items():
        corpora["daemon"]["native_" + name] = b"\x01" + seq
        corpora["daemon"]["ro_" + name] = b"\x03" + seq
        corpora["core"]["server_native_" + name] = bytes([2 | 4, 0]) + seq
    for name, seq in server.items():
        corpora["core"]["client_" + name] = bytes([1 | 2 | 4 | 8, 0]) + seq
        corpora["core"]["client_split_" + name] = bytes([1 | 2 | 4 | 8 | 16, 7]) + seq
    corpora["core"]["server_hello"] = bytes([0, 3]) + hello_call() + PING
    corpora["frames"] = frames_seeds(list(client.values()) + list(server.values()))
    for i, schema in enumerate(fuzz_xdr.SCHEMAS):
        xt = xdr.type_of(schema)
        for variant in range(4):
            value = sample(xt, variant)
            data = xdr.encode(schema, value)
            corpora["xdr"][f"{schema.__name__}_{variant}"] = bytes([i, variant * 3]) + data
    total = 0
    for harness, seeds in corpora.items():
        d = os.path.join(out_dir, harness)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as fh:
                fh.write(data)
        total += len(seeds)
        print(f"{harness}: {len(seeds)} seeds in {d}")
    print(f"{total} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
