"""Confinement of FILES paths to virnetd's data root."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from virnet.daemon import confine


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def test_openat2_that_keeps_racing_falls_back_to_the_walk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """openat2 fails with EAGAIN when a rename races with a "..": after a few retries the
    walk resolves the path (the same rule, no retries needed)."""
    os.mkdir(tmp_path / "a")
    write(str(tmp_path / "a" / "f"), b"f")
    os.symlink("../a/f", tmp_path / "a" / "link")
    calls = []

    def eagain(dirfd: int, path: str, flags: int) -> int:
        calls.append(path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(confine, "_openat2", eagain)
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = confine.open_beneath_openat2(top, ["a", "link"], os.O_RDONLY, follow=True)
        try:
            assert os.read(fd, 10) == b"f"
        finally:
            os.close(fd)
        with pytest.raises(confine.Escape):
            confine.open_beneath_openat2(top, ["a", "..", ".."], os.O_PATH, follow=True)
    finally:
        os.close(top)
    assert len(calls) == 2 * confine._OPENAT2_RETRIES
