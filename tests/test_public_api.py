"""The public API as a user's type checker and ``import virnet`` see it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import virnet


def test_everything_public_is_exported() -> None:
    for name in ("Stream", "Hole", "StreamEvent", "StreamState", "Client", "Server",
                 "Procedure", "Program", "RPCError", "StreamError", "connect"):
        assert name in virnet.__all__, name
        assert getattr(virnet, name) is not None
    assert sorted(virnet.__all__) == sorted(set(virnet.__all__))
    for name in virnet.__all__:
        assert hasattr(virnet, name), name


def test_mypy_sees_typed_replies(tmp_path: Path) -> None:
    """``Client.call`` is typed end to end: mypy reveals the reply class, and a wrong
    argument type is an error."""
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent('''
        import virnet
        from virnet.services import files

        async def main(client: virnet.Client) -> None:
            st = await client.call(files.STAT, files.PathArgs("a"))
            reveal_type(st)
            ls = await client.call(files.LIST, files.PathArgs(""))
            reveal_type(ls.entries)
            stream = await client.open_stream(files.DOWNLOAD, files.TransferArgs("a", 0, 0, 0))
            reveal_type(stream)
            await client.call(files.STAT, files.TransferArgs("a", 0, 0, 0))
    '''))
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    )
    assert 'Revealed type is "virnet.services.files.StatReply"' in out, out + err
    assert 'list[virnet.services.files.Entry]"' in out, out
    assert 'Revealed type is "virnet.stream.Stream"' in out, out
    # The wrong argument type is refused (mypy words it as an unsolvable type variable).
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "snippet.py:12:" in errors[0], out
    assert status == 1
