"""MIGRATION across network namespaces: three ``virnetd`` processes, each in a namespace
of its own made by the test (``ip netns add``), linked A - B - C by veth pairs with
addresses that exist only inside those namespaces (10.231.1.0/24 between A and B,
10.231.2.0/24 between B and C).  The daemons talk to each other over TCP on those links;
the test steers them through their Unix sockets (a path on the shared file system).
Each daemon's allow-list names the network of its next hop (those addresses are not
loopback).  Checked: the chain A -> B -> C, a link cut mid-transfer (``ip link set ...
down``) found by keepalive and rolled back on both sides, then resumed; two migrations
sharing a shaped link fairly.  Skipped where namespaces cannot be made.  Everything the
test makes (namespaces, their links, the daemons) is removed in a finally."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest

import virnet
from _migration import (
    MOVE,
    RESUME,
    DaemonProcess,
    MiB,
    Run,
    eventually,
    file_sha,
    make_image,
    perform,
    staged_files,
    visible,
)
from _rpcutil import remove_tree, short_tmpdir
from virnet.errors import ErrorCode, RPCError

PORT = 16600
KEEPALIVE = {"keepalive_interval": 0.5, "keepalive_count": 2}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Net:
    """Namespaces ``a``, ``b``, ``c`` and the veth links a-b, b-c."""

    def __init__(self) -> None:
        tag = f"vnmig{os.getpid() % 100000}"
        self.ns = {k: f"{tag}{k}" for k in "abc"}
        # veth names: at most 15 characters.
        self.links = {"ab": (f"{tag}ab", f"{tag}ba"), "bc": (f"{tag}bc", f"{tag}cb")}
        self.addr = {"a": "10.231.1.1", "b1": "10.231.1.2", "b2": "10.231.2.2",
                     "c": "10.231.2.3"}
        self.made: list[str] = []

    def create(self) -> None:
        for ns in self.ns.values():
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for (left, right), (lns, rns), (laddr, raddr) in (
            (self.links["ab"], ("a", "b"), (self.addr["a"], self.addr["b1"])),
            (self.links["bc"], ("b", "c"), (self.addr["b2"], self.addr["c"])),
        ):
            ip("link", "add", left, "netns", self.ns[lns], "type", "veth",
               "peer", "name", right, "netns", self.ns[rns])
            ip("-n", self.ns[lns], "addr", "add", f"{laddr}/24", "dev", left)
            ip("-n", self.ns[rns], "addr", "add", f"{raddr}/24", "dev", right)
            ip("-n", self.ns[lns], "link", "set", left, "up")
            ip("-n", self.ns[rns], "link", "set", right, "up")

    def link(self, which: str, up: bool) -> None:
        left, _ = self.links[which]
        ip("-n", self.ns[which[0]], "link", "set", left, "up" if up else "down")

    def destroy(self) -> None:
        for ns in self.made:  # removing a namespace removes its veth ends
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self.made.clear()


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    n = Net()
    try:
        n.create()
    except (OSError, subprocess.CalledProcessError) as exc:
        n.destroy()
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"cannot make network namespaces here: {detail.strip()}")
    try:
        yield n
    finally:
        n.destroy()


class Chain:
    def __init__(self, net: Net, tmp: str) -> None:
        self.net = net
        self.tmp = tmp
        self.daemons: dict[str, DaemonProcess] = {}

    def start(self, label: str, tcp: str, allow: list[str]) -> DaemonProcess:
        cfg = {
            "listen": [f"unix://{self.tmp}/{label}.sock", f"tcp://{tcp}:{PORT}"],
            "root": os.path.join(self.tmp, label),
            "migration_destinations": allow,
            **KEEPALIVE,
        }
        d = DaemonProcess(cfg, self.tmp, label,
                          prefix=("ip", "netns", "exec", self.net.ns[label]))
        self.daemons[label] = d
        d.wait_ready()
        return d

    def uri(self, label: str) -> str:
        return str(self.daemons[label].config["listen"][0])

    def root(self, label: str) -> str:
        return str(self.daemons[label].config["root"])

    def stop(self) -> None:
        for d in self.daemons.values():
            d.stop()


@pytest.fixture
async def chain(net: Net) -> AsyncIterator[Chain]:
    tmp = short_tmpdir()
    ch = Chain(net, tmp)
    try:
        ch.start("a", net.addr["a"], ["unix", f"{net.addr['b1']}/24"])
        ch.start("b", net.addr["b1"], ["unix", f"{net.addr['c']}/24"])
        ch.start("c", net.addr["c"], ["unix"])
        yield ch
    finally:
        ch.stop()
        net.link("ab", True)
        net.link("bc", True)
        subprocess.run(["ip", "netns", "exec", net.ns["a"], "tc", "qdisc", "del", "dev",
                        net.links["ab"][0], "root"], check=False, capture_output=True)
        remove_tree(tmp)
    for label, d in ch.daemons.items():
        assert "Traceback" not in d.stderr, f"{label}:\n{d.stderr}"


async def test_chain_a_to_b_to_c(chain: Chain) -> None:
    net = chain.net
    digest = make_image(os.path.join(chain.root("a"), "img"), 64 * MiB,
                        [(0, 24 * MiB), (40 * MiB, 8 * MiB)])
    to_b = f"tcp://{net.addr['b1']}:{PORT}"
    to_c = f"tcp://{net.addr['c']}:{PORT}"
    async with await virnet.connect(chain.uri("a")) as ca:
        # A has no route to C and no permission for it either.
        with pytest.raises(RPCError, match="not allowed") as info:
            await perform(ca, "img", to_c)
        assert info.value.code == ErrorCode.OPERATION_DENIED
        run = await perform(ca, "img", to_b)
        assert run.reply.bytes == 64 * MiB
    async with await virnet.connect(chain.uri("b")) as cb:
        await perform(cb, "img", to_c, flags=MOVE)
    assert not os.path.exists(os.path.join(chain.root("b"), "img"))
    for label in "ac":
        assert file_sha(os.path.join(chain.root(label), "img")) == digest, label
    assert staged_files(chain.root("b")) == staged_files(chain.root("c")) == []


async def test_link_cut_is_found_rolled_back_and_resumed(chain: Chain) -> None:
    net = chain.net
    digest = make_image(os.path.join(chain.root("a"), "img"), 48 * MiB)
    to_b = f"tcp://{net.addr['b1']}:{PORT}"
    loop = asyncio.get_running_loop()
    async with await virnet.connect(chain.uri("a")) as ca:
        run = Run()
        job = asyncio.ensure_future(perform(ca, "img", to_b, bandwidth=16 * MiB, run=run,
                                            raise_error=False))
        await eventually(lambda: bool(run.events) and run.events[-1][1].transferred >= 16 * MiB)
        net.link("ab", False)
        cut = loop.time()
        await job
        waited = loop.time() - cut
        # Keepalive: interval 0.5 s x (count 2 + 1) = 1.5 s, plus a tick.
        assert 1.0 <= waited < 3.0, waited
        assert isinstance(run.error, RPCError)
        assert "keepalive" in str(run.error) and to_b in str(run.error), run.error
        assert file_sha(os.path.join(chain.root("a"), "img")) == digest
        # The destination found it too (its own keepalive), kept the staged data and
        # shows nothing.
        await eventually(lambda: len(staged_files(chain.root("b"))) == 2, timeout=5)
        assert visible(chain.root("b")) == []
        await asyncio.sleep(1.0)
        assert visible(chain.root("b")) == []
        net.link("ab", True)
        resumed = await perform(ca, "img", to_b, flags=RESUME)
    assert resumed.first.transferred >= 12 * MiB
    assert file_sha(os.path.join(chain.root("b"), "img")) == digest
    assert staged_files(chain.root("b")) == []


async def test_two_migrations_share_a_shaped_link(chain: Chain) -> None:
    net = chain.net
    dev = net.links["ab"][0]
    subprocess.run(["ip", "netns", "exec", net.ns["a"], "tc", "qdisc", "replace", "dev", dev,
                    "root", "tbf", "rate", "240mbit", "burst", "64kb", "latency", "50ms"],
                   check=True, capture_output=True)
    size = 24 * MiB  # 2 x 24 MiB at 30 MB/s: ~1.7 s
    for i, name in enumerate("xy"):
        make_image(os.path.join(chain.root("a"), name), size, seed=i)
    to_b = f"tcp://{net.addr['b1']}:{PORT}"
    loop = asyncio.get_running_loop()
    async with await virnet.connect(chain.uri("a")) as ca:
        runs = {n: Run() for n in "xy"}
        start = loop.time()
        jobs = {n: asyncio.ensure_future(perform(ca, n, to_b, run=runs[n])) for n in "xy"}
        done, _ = await asyncio.wait(jobs.values(), return_when=asyncio.FIRST_COMPLETED)
        first = next(n for n, j in jobs.items() if j in done)
        other = "y" if first == "x" else "x"
        behind = runs[other].events[-1][1].transferred
        await asyncio.gather(*jobs.values())
        total = loop.time() - start
    assert behind >= 0.7 * size, f"{other} at {behind / size:.0%} when {first} finished"
    assert total > 1.2  # the link, not the daemons, was the limit
    for n in "xy":
        assert file_sha(os.path.join(chain.root("b"), n)) == file_sha(
            os.path.join(chain.root("a"), n))
