"""MIGRATION between real daemons (in-process ``Daemon``s on real Unix sockets): data,
PROGRESS, MOVE, sparse images, the bandwidth cap, ABORT, a caller that disconnects,
concurrent migrations, refusals (read-only listeners, names, destinations, the same
root), the hidden staging directory, and resume after a failure with the agreement on
the staged prefix.  Subprocess kills, a full disk and namespaces are in the other
``test_migration_*`` files."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

import virnet
from _migration import (
    MOVE,
    RESUME,
    STAGING,
    Daemons,
    MiB,
    Run,
    allocated,
    eventually,
    file_sha,
    make_image,
    perform,
    staged_files,
    visible,
)
from _rpcutil import remove_tree, short_tmpdir
from virnet.daemon.staging import DIGEST_BLOCK, block_digest
from virnet.errors import ErrorCode, RPCError
from virnet.services import files as f
from virnet.services import migration as m


@pytest.fixture
async def daemons() -> AsyncIterator[Daemons]:
    tmp = short_tmpdir()
    ds = Daemons(tmp)
    try:
        yield ds
    finally:
        await ds.stop_all()
        remove_tree(tmp)


async def pair(ds: Daemons, **config: object) -> tuple[str, str, str, str]:
    """Source and destination: (source uri, source root, destination uri, its root)."""
    a, ua = await ds.start("a", readonly=True, **config)  # type: ignore[arg-type]
    b, ub = await ds.start("b", readonly=True, **config)  # type: ignore[arg-type]
    return ua, a.root.path, ub, b.root.path


# ----------------------------------------------------------------------------- basics


async def test_migration_copies_the_image_and_reports_progress(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "img"), 24 * MiB + 4097)
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, bandwidth=8 * MiB)
    assert run.reply.bytes == 24 * MiB + 4097
    assert run.reply.elapsed_ns > 2.5e9  # 24 MiB at 8 MiB/s
    assert file_sha(os.path.join(rb, "img")) == digest
    assert file_sha(os.path.join(ra, "img")) == digest  # a copy: the source stays
    assert staged_files(rb) == []
    assert visible(rb) == ["img"]
    # Progress: to this caller, for this call, monotonic, the last = total, <= ~10/s.
    values = [ev.transferred for _, ev in run.events]
    assert values == sorted(values)
    assert run.last.transferred == run.last.total == run.reply.bytes
    assert all(ev.job_serial == run.serial and ev.total == run.reply.bytes
               for _, ev in run.events)
    seconds = run.reply.elapsed_ns / 1e9
    assert 3 <= len(run.events) <= seconds * 10 + 3
    # No second holds more than ~10 (arrival times: a busy client may read two at once).
    times = [t for t, _ in run.events]
    assert max(sum(1 for u in times if t <= u < t + 1.0) for t in times) <= 12


async def test_a_fast_migration_still_sends_a_final_progress(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    make_image(os.path.join(ra, "tiny"), 1000)
    open(os.path.join(ra, "empty"), "wb").close()
    async with await virnet.connect(ua) as c:
        for name, size in (("tiny", 1000), ("empty", 0)):
            run = await perform(c, name, ub)
            assert run.reply.bytes == size
            assert run.events and run.last.transferred == run.last.total == size
    assert os.path.getsize(os.path.join(rb, "empty")) == 0


async def test_move_deletes_the_source_after_the_commit(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    os.mkdir(os.path.join(ra, "vm"))
    os.mkdir(os.path.join(rb, "vm"))
    digest = make_image(os.path.join(ra, "vm", "disk"), 5 * MiB)
    async with await virnet.connect(ua) as c:
        run = await perform(c, "vm/disk", ub, flags=MOVE)
    assert run.reply.bytes == 5 * MiB
    assert not os.path.exists(os.path.join(ra, "vm", "disk"))
    assert file_sha(os.path.join(rb, "vm", "disk")) == digest


async def test_failed_move_keeps_the_source(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "img"), MiB)
    os.mkdir(os.path.join(ra, "sub"))
    make_image(os.path.join(ra, "sub", "img"), MiB)
    async with await virnet.connect(ua) as c:
        # The destination has no directory "sub": refused before any data moves.
        run = await perform(c, "sub/img", ub, flags=MOVE, raise_error=False)
        assert run.error is not None and "no such file" in str(run.error).lower()
        # A directory in the way of the target.
        os.mkdir(os.path.join(rb, "img"))
        run = await perform(c, "img", ub, flags=MOVE, raise_error=False)
        assert run.error is not None and "directory" in str(run.error)
    assert file_sha(os.path.join(ra, "img")) == digest
    assert os.path.exists(os.path.join(ra, "sub", "img"))
    assert staged_files(rb) == []


async def test_move_of_a_symlink_is_refused(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    make_image(os.path.join(ra, "img"), MiB)
    os.symlink("img", os.path.join(ra, "link"))
    async with await virnet.connect(ua) as c:
        run = await perform(c, "link", ub, flags=MOVE, raise_error=False)
        assert run.error is not None and "symlink" in str(run.error)
        await perform(c, "link", ub)  # a copy follows it, as DOWNLOAD does
    assert os.path.islink(os.path.join(ra, "link"))
    assert file_sha(os.path.join(rb, "link")) == file_sha(os.path.join(ra, "img"))


async def test_migration_replaces_an_existing_target_keeping_its_mode(
    daemons: Daemons,
) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "img"), 3 * MiB, seed=1)
    make_image(os.path.join(rb, "img"), 7 * MiB, seed=2)
    os.chmod(os.path.join(rb, "img"), 0o600)
    async with await virnet.connect(ua) as c:
        await perform(c, "img", ub)
    assert file_sha(os.path.join(rb, "img")) == digest
    assert os.stat(os.path.join(rb, "img")).st_mode & 0o777 == 0o600


async def test_sparse_image_moves_as_holes_and_stays_sparse(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    size = 1024 * MiB
    runs = [(0, MiB), (700 * MiB, MiB)]
    digest = make_image(os.path.join(ra, "sparse"), size, runs)
    assert allocated(os.path.join(ra, "sparse")) <= 3 * MiB
    async with await virnet.connect(ua) as c:
        # Capped at 4 MiB/s: the 2 MiB of data take ~0.5 s, the 1 GiB would take 256 s.
        run = await perform(c, "sparse", ub, bandwidth=4 * MiB)
    assert run.reply.bytes == size
    assert run.reply.elapsed_ns < 3e9
    target = os.path.join(rb, "sparse")
    assert os.path.getsize(target) == size
    assert allocated(target) <= 3 * MiB
    assert file_sha(target) == digest


async def test_trailing_hole_keeps_the_size(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "t"), 64 * MiB, [(0, 4096)])
    async with await virnet.connect(ua) as c:
        await perform(c, "t", ub)
    assert os.path.getsize(os.path.join(rb, "t")) == 64 * MiB
    assert file_sha(os.path.join(rb, "t")) == digest


# ----------------------------------------------------------------------------- bandwidth


async def test_bandwidth_cap_is_accurate_and_smooth() -> None:
    # Roots on tmpfs: the destination writes each packet as it arrives, so the staged
    # file's size follows the wire closely.
    tmp = short_tmpdir()
    shm = tempfile.mkdtemp(prefix="vn-mig-", dir="/dev/shm")
    ds = Daemons(tmp)
    try:
        _, ua = await ds.start("a", root=os.path.join(shm, "a"))
        b, ub = await ds.start("b", root=os.path.join(shm, "b"))
        rate = 12 * MiB
        size = 36 * MiB  # 3 s
        make_image(os.path.join(shm, "a", "img"), size)
        samples: list[tuple[float, int]] = []
        staging = os.path.join(b.root.path, STAGING)
        loop = asyncio.get_running_loop()

        async def sample() -> None:
            while True:
                for name in os.listdir(staging) if os.path.isdir(staging) else []:
                    if name.endswith(".data"):
                        try:
                            samples.append((loop.time(), os.path.getsize(
                                os.path.join(staging, name))))
                        except FileNotFoundError:
                            pass
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        async with await virnet.connect(ua) as c:
            run = await perform(c, "img", ub, bandwidth=rate)
        sampler.cancel()
        seconds = run.reply.elapsed_ns / 1e9
        assert size / seconds == pytest.approx(rate, rel=0.05)
        # Smooth: over any stretch, never more than a few packets above the line.
        samples = [s for s in samples if s[1] > 0]
        assert len(samples) > 100
        worst = 0.0
        for i, (ti, bi) in enumerate(samples):
            for tj, bj in samples[i + 1 : i + 200]:
                worst = max(worst, (bj - bi) - rate * (tj - ti))
        assert worst <= 4 * 262144, f"a burst of {worst / 1024:.0f} KiB above the cap"
    finally:
        await ds.stop_all()
        remove_tree(tmp)
        remove_tree(shm)


async def test_bandwidth_changes_while_running(daemons: Daemons) -> None:
    ua, ra, ub, _rb = await pair(daemons)
    make_image(os.path.join(ra, "img"), 40 * MiB)
    async with await virnet.connect(ua) as c, await virnet.connect(ua) as other:
        run = Run()
        job = asyncio.ensure_future(perform(c, "img", ub, bandwidth=2 * MiB, run=run))
        await eventually(lambda: len(run.events) >= 3)
        await asyncio.sleep(1.0)
        at = run.events[-1][1].transferred
        assert at < 6 * MiB  # 2 MiB/s so far
        await other.call(m.SET_BANDWIDTH, m.BandwidthArgs("img", 0))
        started = asyncio.get_running_loop().time()
        await job
        # The remaining ~35 MiB at 2 MiB/s would take ~17 s; unlimited, a moment.
        assert asyncio.get_running_loop().time() - started < 5
        with pytest.raises(RPCError, match="no migration"):
            await other.call(m.SET_BANDWIDTH, m.BandwidthArgs("img", 1))


# ----------------------------------------------------------------------------- abort


async def test_abort_by_name_from_another_client_rolls_back(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "img"), 40 * MiB)
    make_image(os.path.join(rb, "img"), MiB, seed=9)
    old = file_sha(os.path.join(rb, "img"))
    async with await virnet.connect(ua) as c, await virnet.connect(ua) as other:
        run = Run()
        job = asyncio.ensure_future(
            perform(c, "img", ub, bandwidth=8 * MiB, flags=MOVE, run=run, raise_error=False)
        )
        await eventually(lambda: bool(run.events) and run.events[-1][1].transferred > 4 * MiB)
        await eventually(lambda: len(staged_files(rb)) == 2)  # data and meta
        t = asyncio.get_running_loop().time()
        await other.call(m.ABORT, m.NameArgs("img"))
        # ABORT returns once both sides are rolled back.
        assert staged_files(rb) == []
        await job
        assert asyncio.get_running_loop().time() - t < 3
        assert isinstance(run.error, RPCError)
        assert run.error.code == ErrorCode.OPERATION_ABORTED
        assert "aborted" in str(run.error)
        with pytest.raises(RPCError, match="no migration"):
            await other.call(m.ABORT, m.NameArgs("img"))
    assert file_sha(os.path.join(ra, "img")) == digest  # MOVE did not happen
    assert file_sha(os.path.join(rb, "img")) == old
    assert visible(rb) == ["img"]


async def test_caller_disconnecting_aborts(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    digest = make_image(os.path.join(ra, "img"), 40 * MiB)
    a = daemons.daemons[0]
    c = await virnet.connect(ua)
    run = Run()
    job = asyncio.ensure_future(perform(c, "img", ub, bandwidth=8 * MiB, flags=MOVE, run=run,
                                        raise_error=False))
    await eventually(lambda: bool(run.events) and run.events[-1][1].transferred > 2 * MiB)
    assert "img" in a.migration.outgoing
    await c.close()
    await eventually(lambda: not a.migration.outgoing, what="source job gone")
    await eventually(lambda: staged_files(rb) == [], what="staging discarded")
    job.cancel()
    assert visible(rb) == []
    assert file_sha(os.path.join(ra, "img")) == digest


async def test_abort_at_the_destination_fails_the_source(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    make_image(os.path.join(ra, "img"), 40 * MiB)
    async with await virnet.connect(ua) as c, await virnet.connect(ub) as at_b:
        run = Run()
        job = asyncio.ensure_future(perform(c, "img", ub, bandwidth=8 * MiB, run=run,
                                            raise_error=False))
        await eventually(lambda: bool(run.events) and run.events[-1][1].transferred > MiB)
        await at_b.call(m.ABORT, m.NameArgs("img"))
        await job
        assert run.error is not None and "aborted" in str(run.error)
    assert staged_files(rb) == []
    assert visible(rb) == []


# ----------------------------------------------------------------------------- concurrency


async def test_second_migration_of_a_name_is_refused_while_one_runs(
    daemons: Daemons,
) -> None:
    ua, ra, ub, rb = await pair(daemons)
    _, uc = await daemons.start("c")
    make_image(os.path.join(ra, "img"), 16 * MiB)
    async with await virnet.connect(ua) as c:
        run = Run()
        job = asyncio.ensure_future(perform(c, "img", ub, bandwidth=8 * MiB, run=run))
        await eventually(lambda: bool(run.events))
        with pytest.raises(RPCError, match="already running") as info:
            await perform(c, "./img", uc)
        assert info.value.code == ErrorCode.OPERATION_INVALID
        await job
    assert os.path.exists(os.path.join(rb, "img"))
    assert not os.path.exists(os.path.join(daemons.daemons[2].root.path, "img"))


async def test_concurrent_migrations_of_different_names_share_fairly(
    daemons: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two migrations from one daemon to another at once move at about the same pace.
    Compared at the same moments while both are moving (progress every 10 ms here), so
    that neither which call started first nor when the last events came can decide it
    (with the default 100 ms a 256 MiB image gives two or three events per run, and
    "where the other was when one finished" read its last one, up to 100 ms old)."""
    from virnet.daemon import migration_source

    monkeypatch.setattr(migration_source, "PROGRESS_INTERVAL", 0.01)
    ua, ra, ub, rb = await pair(daemons)
    size = 256 * MiB
    digests = {n: make_image(os.path.join(ra, n), size, seed=i) for i, n in enumerate("xy")}
    async with await virnet.connect(ua) as c:
        runs = {n: Run() for n in "xy"}
        await asyncio.gather(*(perform(c, n, ub, run=runs[n]) for n in "xy"))

    def moving(run: Run) -> list[tuple[float, int]]:
        return [(t, ev.transferred) for t, ev in run.events if 0 < ev.transferred < size]

    trace = {n: moving(runs[n]) for n in "xy"}
    # Both emit on the same 10 ms ticks of the source daemon: pair events 5 ms apart.
    pairs = [(a, b) for ta, a in trace["x"] for tb, b in trace["y"] if abs(ta - tb) < 0.005]
    assert len(pairs) >= 3, f"too few moments with both moving: {trace}"
    # At the last moment both were moving (the first is about to finish), the other has
    # moved at least 60 % as much; and over the whole time both were moving, their
    # paces are within 0.6x.  (Not earlier moments: the first MiB come in bursts, one
    # may be 2x the other after 10 ms, which says nothing about sharing.)
    (x0, y0), (x1, y1) = pairs[0], pairs[-1]
    assert min(x1, y1) >= 0.6 * max(x1, y1), f"one fell behind at {x1, y1}: {trace}"
    paces = sorted([x1 - x0, y1 - y0])
    assert paces[0] >= 0.6 * paces[1], f"paces {paces}: {trace}"
    for n in "xy":
        assert file_sha(os.path.join(rb, n)) == digests[n]


async def test_chain_and_back(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    _, uc = await daemons.start("c")
    rc = daemons.daemons[2].root.path
    digest = make_image(os.path.join(ra, "img"), 9 * MiB, [(0, MiB), (5 * MiB, 4 * MiB)])
    async with await virnet.connect(ua) as ca, await virnet.connect(ub) as cb:
        await perform(ca, "img", ub, flags=MOVE)
        await perform(cb, "img", uc, flags=MOVE)
    async with await virnet.connect(uc) as cc:
        await perform(cc, "img", ua)
    assert not os.path.exists(os.path.join(rb, "img"))
    assert file_sha(os.path.join(rc, "img")) == digest
    assert file_sha(os.path.join(ra, "img")) == digest


# ----------------------------------------------------------------------------- refusals


async def test_readonly_listener_refuses_every_migration_procedure(
    daemons: Daemons,
) -> None:
    a, _ = await daemons.start("a", readonly=True)
    _, ub = await daemons.start("b")
    make_image(os.path.join(a.root.path, "img"), MiB)
    ro = f"unix://{daemons.tmp}/a-ro.sock"
    calls: list[tuple[virnet.Procedure[Any, Any], Any]] = [
        (m.PERFORM, m.PerformArgs("img", ub, 0, 0)),
        (m.ABORT, m.NameArgs("img")),
        (m.IDENTIFY, m.IdentifyArgs("img", 1, bytes(32), bytes(32))),
        (m.STAGED_DIGEST, m.StagedDigestArgs("img", 0)),
        (m.SET_BANDWIDTH, m.BandwidthArgs("img", 0)),
    ]
    async with await virnet.connect(ro) as c:
        for proc, args in calls:
            with pytest.raises(RPCError) as info:
                await c.call(proc, args)
            assert info.value.code == ErrorCode.OPERATION_DENIED, proc
        with pytest.raises(RPCError) as info:
            await c.open_stream(m.PREPARE_TUNNEL, m.PrepareTunnelArgs("x", 1, 0), sparse=True)
        assert info.value.code == ErrorCode.OPERATION_DENIED
    assert visible(a.root.path) == ["img"]


@pytest.mark.parametrize("name", ["../img", "/etc/passwd", "a/../../img", "", STAGING,
                                  f"{STAGING}/x", "nul\0byte"])
async def test_names_are_confined(daemons: Daemons, name: str) -> None:
    ua, _ra, ub, _rb = await pair(daemons)
    async with await virnet.connect(ua) as c, await virnet.connect(ub) as cb:
        with pytest.raises(RPCError) as info:
            await c.call(m.PERFORM, m.PerformArgs(name, ub, 0, 0))
        assert info.value.code == ErrorCode.INVALID_ARG
        with pytest.raises(RPCError) as info:
            await cb.open_stream(m.PREPARE_TUNNEL, m.PrepareTunnelArgs(name, 1, 0),
                                 sparse=True)
        assert info.value.code == ErrorCode.INVALID_ARG


async def test_symlink_out_of_the_source_root_is_refused(daemons: Daemons) -> None:
    ua, ra, ub, rb = await pair(daemons)
    outside = os.path.join(daemons.tmp, "secret")
    make_image(outside, 1000)
    os.symlink(outside, os.path.join(ra, "abs"))
    os.symlink("../secret", os.path.join(ra, "rel"))
    async with await virnet.connect(ua) as c:
        for name in ("abs", "rel"):
            with pytest.raises(RPCError, match="outside"):
                await perform(c, name, ub)
    assert visible(rb) == []


async def test_destinations_follow_the_allow_list(daemons: Daemons) -> None:
    a, ua = await daemons.start("a", migration_destinations=["unix"])
    b, ub = await daemons.start("b")
    await b.server.listen("tcp://127.0.0.1:0")
    port = b.server.addresses[-1].port
    loop_only, ul = await daemons.start("l", migration_destinations=["loopback"])
    for d in (a, loop_only):
        make_image(os.path.join(d.root.path, "img"), MiB)
    async with await virnet.connect(ua) as c:
        with pytest.raises(RPCError, match="not allowed") as info:
            await perform(c, "img", f"tcp://127.0.0.1:{port}")
        assert info.value.code == ErrorCode.OPERATION_DENIED
        await perform(c, "img", ub)  # unix: allowed
        with pytest.raises(RPCError, match="invalid destination"):
            await perform(c, "img", "ftp://x")
    async with await virnet.connect(ul) as c:
        with pytest.raises(RPCError, match="not allowed"):
            await perform(c, "img", ub)
        os.unlink(os.path.join(b.root.path, "img"))
        await perform(c, "img", f"tcp://127.0.0.1:{port}")
        os.unlink(os.path.join(b.root.path, "img"))
        await perform(c, "img", f"tcp://localhost:{port}")  # resolved, then checked
    assert visible(b.root.path) == ["img"]


async def test_migration_into_its_own_root_is_refused(daemons: Daemons) -> None:
    a, ua = await daemons.start("a")
    _twin, ut = await daemons.start("t", root=a.root.path)  # another daemon, same root
    digest = make_image(os.path.join(a.root.path, "img"), MiB)
    async with await virnet.connect(ua) as c:
        for dest in (ua, ut):
            with pytest.raises(RPCError, match="same data root"):
                await perform(c, "img", dest, flags=MOVE)
    assert file_sha(os.path.join(a.root.path, "img")) == digest


async def test_unreachable_destination_is_a_prompt_error(daemons: Daemons) -> None:
    ua, ra, ub, _rb = await pair(daemons)
    make_image(os.path.join(ra, "img"), MiB)
    async with await virnet.connect(ua) as c:
        with pytest.raises(RPCError, match="cannot connect") as info:
            await perform(c, "img", f"unix://{daemons.tmp}/nobody.sock")
        assert info.value.code == ErrorCode.OPERATION_FAILED
        with pytest.raises(RPCError, match=r"(?i)no such file"):
            await perform(c, "missing", ub)
        with pytest.raises(RPCError, match="unsupported flags"):
            await perform(c, "img", ub, flags=64)


# ----------------------------------------------------------------------------- staging


async def test_staging_is_invisible_to_files(daemons: Daemons) -> None:
    b, ub = await daemons.start("b")
    staging = os.path.join(b.root.path, STAGING)
    os.mkdir(staging)
    make_image(os.path.join(staging, "x.data"), 100)
    os.symlink(".", os.path.join(b.root.path, "self"))
    async with await virnet.connect(ub) as c:
        for path in ("", "self", "./"):
            names = [e.name for e in (await c.call(f.LIST, f.PathArgs(path))).entries]
            assert STAGING not in names, path
        for path in (STAGING, f"{STAGING}/x.data", f"./{STAGING}/x.data"):
            checks: tuple[tuple[virnet.Procedure[Any, Any], Any], ...] = (
                (f.STAT, f.PathArgs(path)),
                (f.LIST, f.PathArgs(path)),
                (f.DELETE, f.PathArgs(path)),
                (f.MKDIR, f.PathArgs(path)),
                (f.CHECKSUM, f.ChecksumArgs(path, "sha256")),
            )
            for proc, args in checks:
                with pytest.raises(RPCError, match="reserved"):
                    await c.call(proc, args)
            for streaming in (f.UPLOAD, f.DOWNLOAD):
                with pytest.raises(RPCError, match="reserved"):
                    await c.open_stream(streaming, f.TransferArgs(path, 0, 0, 0))
    assert os.path.exists(os.path.join(staging, "x.data"))


def test_block_digest_depends_on_content_not_on_holes(tmp_path: object) -> None:
    d = str(tmp_path)
    sparse, dense = os.path.join(d, "s"), os.path.join(d, "d")
    make_image(sparse, 5 * MiB + 10, [(2 * MiB, 1000)])
    with open(sparse, "rb") as src, open(dense, "wb") as dst:
        dst.write(src.read())
    fds = [os.open(p, os.O_RDONLY) for p in (sparse, dense)]
    try:
        for length in (0, 1, DIGEST_BLOCK, 3 * DIGEST_BLOCK, 5 * MiB + 10):
            a, b = (block_digest(fd, length) for fd in fds)
            assert a == b
        assert block_digest(fds[0], 3 * MiB) != block_digest(fds[0], 2 * MiB)
        with open(dense, "r+b") as fh:
            fh.seek(2 * MiB + 999)
            fh.write(b"\xff")
        assert block_digest(fds[0], 3 * MiB) != block_digest(fds[1], 3 * MiB)
    finally:
        for fd in fds:
            os.close(fd)


# ----------------------------------------------------------------------------- resume


async def interrupted_migration(
    ds: Daemons, size: int, *, cut_at: int, expiry: float = 600.0, rate: int = 16 * MiB,
    runs: list[tuple[int, int]] | None = None,
) -> tuple[str, str, str, str, Run]:
    """A migration of ``img`` cut by stopping the destination once ``cut_at`` bytes
    went; the destination is started again on the same root.  The source's PERFORM
    failed with the run returned."""
    a, ua = await ds.start("a")
    b, ub = await ds.start("b", staging_expiry=expiry)
    rb = b.root.path
    make_image(os.path.join(a.root.path, "img"), size, runs)
    async with await virnet.connect(ua) as c:
        run = Run()
        job = asyncio.ensure_future(perform(c, "img", ub, bandwidth=rate, run=run,
                                            raise_error=False))
        await eventually(lambda: bool(run.events) and run.events[-1][1].transferred >= cut_at)
        await ds.stop(b)  # a failure: the staged data stays
        await job
    assert run.error is not None
    assert visible(rb) == []
    _, ub = await ds.start("b", root=rb, staging_expiry=expiry)
    return ua, a.root.path, ub, rb, run


async def test_resume_sends_only_the_rest(daemons: Daemons) -> None:
    size = 48 * MiB
    ua, ra, ub, rb, failed = await interrupted_migration(daemons, size, cut_at=30 * MiB)
    assert "img" not in visible(rb)
    assert len(staged_files(rb)) == 2
    assert failed.error is not None and "shutting down" in str(failed.error)
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, bandwidth=16 * MiB, flags=RESUME)
    assert run.reply.bytes == size
    # It started where the staged prefix ends (whole MiB blocks) and moved the rest.
    assert run.first.transferred >= 28 * MiB
    assert run.first.transferred % DIGEST_BLOCK == 0
    rest = size - run.first.transferred
    assert run.reply.elapsed_ns / 1e9 < rest / (16 * MiB) + 1.0
    assert file_sha(os.path.join(rb, "img")) == file_sha(os.path.join(ra, "img"))
    assert staged_files(rb) == []


async def test_resume_of_a_sparse_image(daemons: Daemons) -> None:
    size = 512 * MiB
    runs = [(0, 8 * MiB), (200 * MiB, 8 * MiB), (400 * MiB, 8 * MiB)]
    ua, ra, ub, rb, _ = await interrupted_migration(
        daemons, size, cut_at=204 * MiB, runs=runs, rate=4 * MiB
    )
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, flags=RESUME)
    assert run.first.transferred >= 200 * MiB
    target = os.path.join(rb, "img")
    assert file_sha(target) == file_sha(os.path.join(ra, "img"))
    assert allocated(target) <= 26 * MiB


async def test_without_resume_a_migration_starts_over(daemons: Daemons) -> None:
    ua, ra, ub, rb, _ = await interrupted_migration(daemons, 24 * MiB, cut_at=12 * MiB)
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub)
    assert run.first.transferred == 0
    assert file_sha(os.path.join(rb, "img")) == file_sha(os.path.join(ra, "img"))
    assert staged_files(rb) == []


async def test_resume_of_a_changed_source_starts_over(daemons: Daemons) -> None:
    ua, ra, ub, rb, _ = await interrupted_migration(daemons, 24 * MiB, cut_at=12 * MiB)
    with open(os.path.join(ra, "img"), "r+b") as fh:
        fh.write(b"changed")
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, flags=RESUME)
    assert run.first.transferred == 0  # another identity: nothing staged for it
    assert file_sha(os.path.join(rb, "img")) == file_sha(os.path.join(ra, "img"))


async def test_resume_with_corrupt_staged_data_starts_over(daemons: Daemons) -> None:
    ua, ra, ub, rb, _ = await interrupted_migration(daemons, 24 * MiB, cut_at=12 * MiB)
    (data,) = [n for n in staged_files(rb) if n.endswith(".data")]
    with open(os.path.join(rb, STAGING, data), "r+b") as fh:
        fh.seek(5 * MiB + 3)
        fh.write(b"\x00garbage")
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, flags=RESUME)
    assert run.first.transferred == 0  # the digests differ
    assert file_sha(os.path.join(rb, "img")) == file_sha(os.path.join(ra, "img"))


async def test_staging_expires_while_running_and_at_startup(daemons: Daemons) -> None:
    _ua, _ra, _ub, rb, _ = await interrupted_migration(
        daemons, 24 * MiB, cut_at=8 * MiB, expiry=1.5
    )
    # Kept at this start (younger than the expiry), removed by the timer.
    assert len(staged_files(rb)) == 2
    await eventually(lambda: staged_files(rb) == [], timeout=5, what="expiry timer")
    # At start-up: an old entry (and a stray half of one) goes at once.
    staging = os.path.join(rb, STAGING)
    for name in ("k1.data", "k1.meta", "k2.data"):
        with open(os.path.join(staging, name), "w") as fh:
            fh.write("{}")
        os.utime(os.path.join(staging, name), (1, 1))
    b = daemons.daemons[-1]
    await daemons.stop(b)
    await daemons.start("b", root=rb, staging_expiry=1.5)
    assert staged_files(rb) == []


async def test_abort_discards_staged_data_of_an_interrupted_migration(
    daemons: Daemons,
) -> None:
    ua, _ra, ub, rb, _ = await interrupted_migration(daemons, 24 * MiB, cut_at=8 * MiB)
    assert staged_files(rb)
    async with await virnet.connect(ub) as c:
        await c.call(m.ABORT, m.NameArgs("img"))
        assert staged_files(rb) == []
        with pytest.raises(RPCError, match="no migration"):
            await c.call(m.ABORT, m.NameArgs("img"))
    async with await virnet.connect(ua) as c:
        run = await perform(c, "img", ub, flags=RESUME)
    assert run.first.transferred == 0


async def test_resume_protocol_refusals(daemons: Daemons) -> None:
    _, ub = await daemons.start("b")
    async with await virnet.connect(ub) as c:
        with pytest.raises(RPCError, match="RESUME"):
            await c.open_stream(m.PREPARE_TUNNEL, m.PrepareTunnelArgs("x", 10, RESUME),
                                sparse=True)
        with pytest.raises(RPCError, match="STAGED_DIGEST"):
            await c.call(m.STAGED_DIGEST, m.StagedDigestArgs("x", 10))
        with pytest.raises(RPCError, match="identity"):
            await c.call(m.IDENTIFY, m.IdentifyArgs("x", 10, b"short", bytes(32)))
        reply = await c.call(m.IDENTIFY, m.IdentifyArgs("x", 10, bytes(32), bytes(32)))
        assert reply.staged == 0
