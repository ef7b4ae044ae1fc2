"""Every Python example in README.md and docs/*.md, run as written.

Each fenced ```python block is saved as a script and run by a fresh interpreter (so a
top-level ``await`` or a missing import fails as it would for a reader) in an empty
directory, with ``VIRNET_DEFAULT_URI`` naming a real ``virnetd`` this test started for
it: the examples call ``virnet.connect()`` and get that daemon, with a data root of its
own and two consoles, ``shell`` (``/bin/sh`` with the prompt ``shell$ ``) and ``raw``
(``cat`` on a raw terminal).  A block fails the test when its script exits non-zero.

A block that cannot run here (it needs libvirtd) has ``<!-- not-run: REASON -->`` on
the line above its fence; it must still compile.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from _daemon import Virnetd
from _rpcutil import remove_tree, short_tmpdir

TOP = Path(__file__).resolve().parent.parent
DOCS = [TOP / "README.md", *sorted((TOP / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(\S.*?)\s*-->")
RUN_TIMEOUT = 60.0


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence
    code: str
    not_run: str | None  # the reason, for a block that is not run

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(TOP)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i
                body = []
                i += 1
                while lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                before = [x for x in lines[:start] if x.strip()]
                marker = NOT_RUN.fullmatch(before[-1].strip()) if before else None
                found.append(Block(doc, start + 1, "\n".join(body) + "\n",
                                   marker.group(1) if marker else None))
            i += 1
    return found


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b.not_run is None]


def test_every_example_compiles_and_few_are_not_run() -> None:
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        compile(block.code, block.name, "exec")  # no top-level await, even in fragments
    assert len(BLOCKS) - len(RUN) <= 4, [b.name for b in BLOCKS if b.not_run]


@pytest.fixture
def daemon() -> Iterator[tuple[str, Path]]:
    """A virnetd for one example: its URI and an empty directory to run the example in."""
    tmp = Path(short_tmpdir())
    try:
        d = Virnetd(
            str(tmp), str(tmp / "root"),
            "--console", "shell=env 'PS1=shell$ ' /bin/sh -i",
            "--console", "raw=sh -c 'stty raw -echo && exec cat'",
        )
        try:
            (tmp / "work").mkdir()
            yield d.uri, tmp / "work"
        finally:
            d.stop()
    finally:
        remove_tree(str(tmp))


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_example(block: Block, daemon: tuple[str, Path]) -> None:
    uri, work = daemon
    script = work / "example.py"
    script.write_text(block.code)
    env = dict(os.environ, VIRNET_DEFAULT_URI=uri)
    res = subprocess.run(
        [sys.executable, str(script)], cwd=work, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )
    assert res.returncode == 0, (
        f"{block.name} exited {res.returncode}\n--- stdout ---\n{res.stdout}"
        f"--- stderr ---\n{res.stderr}"
    )


# ------------------------------------------------------------------ configuration.md


def test_configuration_md_names_every_key_and_variable() -> None:
    from virnet.daemon.config import DaemonConfig

    text = (TOP / "docs" / "configuration.md").read_text()
    keys = [f.name for f in dataclasses.fields(DaemonConfig)]
    missing = [k for k in keys if f"| `{k}` |" not in text and f"| `[{k}]` |" not in text]
    assert not missing, f"keys without a row in docs/configuration.md: {missing}"
    sources = [*(TOP / "src").rglob("*.py"), TOP / "setup.py"]
    variables = set()
    for path in sources:
        variables |= set(re.findall(r"\"((?:VIRNET|XDG|LISTEN)_\w+|JOURNAL_STREAM)\"",
                                    path.read_text()))
    assert {"VIRNET_ROOT", "VIRNET_SOCKET", "VIRNET_DEFAULT_URI"} <= variables
    missing = sorted(v for v in variables if f"`{v}`" not in text)
    assert not missing, f"environment variables not in docs/configuration.md: {missing}"


def test_configuration_md_example_is_the_defaults(tmp_path: Path) -> None:
    from virnet.daemon.config import DaemonConfig

    text = (TOP / "docs" / "configuration.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    path = tmp_path / "virnetd.toml"
    path.write_text(example)
    loaded = DaemonConfig.from_file(str(path))
    assert loaded.consoles == {"shell": "/bin/bash -i", "guest": "unix:/run/guest/serial.sock"}
    loaded.consoles = {}
    assert loaded == DaemonConfig()
