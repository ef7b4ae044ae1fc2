"""``virnet migrate`` as a user runs it: the command (a subprocess) against ``virnetd``
subprocesses.  The result line, the progress bar, -q, RATE parsing, error lines and
exit statuses, Ctrl-C (SIGINT to the command) aborting cleanly with exit 130, and
--move with --resume after an interrupted migration."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from _migration import DaemonProcess, MiB, file_sha, make_image, staged_files, visible
from _rpcutil import remove_tree, short_tmpdir
from virnet.cli import parse_rate


class Two:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list[DaemonProcess] = []
        self.a = self.start("a")
        self.b = self.start("b")

    def start(self, label: str) -> DaemonProcess:
        cfg = {"listen": [f"unix://{self.tmp}/{label}.sock"],
               "root": os.path.join(self.tmp, label)}
        d = DaemonProcess(cfg, self.tmp, label)
        self.procs.append(d)
        d.wait_ready()
        return d

    def uri(self, d: DaemonProcess) -> str:
        return str(d.config["listen"][0])

    def root(self, d: DaemonProcess) -> str:
        return str(d.config["root"])

    def stop(self) -> None:
        for d in self.procs:
            d.stop()


@pytest.fixture
def two() -> Iterator[Two]:
    tmp = short_tmpdir()
    t = Two(tmp)
    try:
        yield t
    finally:
        t.stop()
        remove_tree(tmp)
    for d in t.procs:
        assert "Traceback" not in d.stderr, d.stderr


def virnet_cmd(two: Two, *args: str) -> list[str]:
    return [sys.executable, "-m", "virnet.cli", "-c", two.uri(two.a), *args]


def run(two: Two, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(virnet_cmd(two, *args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def test_migrate_prints_one_result_line(two: Two) -> None:
    digest = make_image(os.path.join(two.root(two.a), "img"), 8 * MiB)
    res = run(two, "migrate", "img", two.uri(two.b))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert re.fullmatch(
        rf"migrated img to {re.escape(two.uri(two.b))}: 8\.0 MiB in \d+\.\d\d s "
        r"\(\d+(\.\d)? (B|KiB|MiB|GiB)/s\)\n", res.stdout), res.stdout
    assert file_sha(os.path.join(two.root(two.b), "img")) == digest
    res = run(two, "-q", "migrate", "img", two.uri(two.b))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_migrate_progress_bar_and_bandwidth(two: Two) -> None:
    make_image(os.path.join(two.root(two.a), "img"), 6 * MiB)
    start = time.monotonic()
    res = run(two, "migrate", "img", two.uri(two.b), "--progress", "--bandwidth", "3MiB/s")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start > 1.8  # 6 MiB at 3 MiB/s
    assert "migrate img" in res.stderr and "6.0/6.0 MiB" in res.stderr, res.stderr
    assert res.stdout.startswith("migrated img to ")


def test_migrate_errors_are_one_line(two: Two) -> None:
    res = run(two, "migrate", "missing", two.uri(two.b))
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == "virnet: error: migrate missing: No such file or directory\n"
    make_image(os.path.join(two.root(two.a), "img"), MiB)
    res = run(two, "migrate", "img", f"unix://{two.tmp}/none.sock")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virnet: error: "), res.stderr
    assert "cannot connect" in lines[0]
    res = run(two, "migrate", "img", two.uri(two.b), "--bandwidth", "fast")
    assert res.returncode == 2
    assert "not a rate" in res.stderr


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1000", 1000), ("100M", 100 * MiB), ("100m", 100 * MiB),
    ("100MiB", 100 * MiB), ("100MiB/s", 100 * MiB), ("100M/s", 100 * MiB),
    ("1.5G", 3 * 512 * MiB), ("512K", 512 * 1024), ("512KB", 512 * 1024),
    ("2T", 2 << 40), ("10B/s", 10),
])
def test_rates(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "M", "fast", "-1", "1X", "nan", "inf", "1..5M"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate(text)


def test_ctrl_c_aborts_cleanly(two: Two) -> None:
    digest = make_image(os.path.join(two.root(two.a), "img"), 40 * MiB)
    proc = subprocess.Popen(
        virnet_cmd(two, "migrate", "img", two.uri(two.b), "--bandwidth", "4M", "--move"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        staging = os.path.join(two.root(two.b), ".virnet-staging")
        deadline = time.monotonic() + 20
        while not any(
            n.endswith(".data") and os.path.getsize(os.path.join(staging, n)) > 2 * MiB
            for n in (os.listdir(staging) if os.path.isdir(staging) else [])
        ):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert out == ""
    assert err == "virnet: error: migrate img: interrupted, migration aborted\n"
    assert staged_files(two.root(two.b)) == []
    assert visible(two.root(two.b)) == []
    assert file_sha(os.path.join(two.root(two.a), "img")) == digest
    res = run(two, "migrate", "img", two.uri(two.b))  # nothing left running
    assert res.returncode == 0, res.stderr


def test_resume_and_move_after_an_interruption(two: Two) -> None:
    digest = make_image(os.path.join(two.root(two.a), "img"), 32 * MiB)
    proc = subprocess.Popen(
        virnet_cmd(two, "migrate", "img", two.uri(two.b), "--bandwidth", "8M"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        staging = os.path.join(two.root(two.b), ".virnet-staging")
        deadline = time.monotonic() + 20
        while not any(
            n.endswith(".data") and os.path.getsize(os.path.join(staging, n)) > 12 * MiB
            for n in (os.listdir(staging) if os.path.isdir(staging) else [])
        ):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        two.b.kill()
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert err.startswith("virnet: error: migrate img: migration of 'img' to "), err
    assert "connection" in err
    two.b = two.start("b")
    start = time.monotonic()
    res = run(two, "migrate", "img", two.uri(two.b), "--resume", "--move", "--bandwidth", "8M")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < 20 / 8 + 1.5  # at most ~20 MiB were left
    assert "(source deleted)" in res.stdout
    assert not os.path.exists(os.path.join(two.root(two.a), "img"))
    assert file_sha(os.path.join(two.root(two.b), "img")) == digest
