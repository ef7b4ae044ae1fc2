"""The public API as a user's type checker and ``import virnet`` see it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import virnet
from _rpcutil import remove_tree, short_tmpdir


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


def test_limits_are_one_validated_value_used_everywhere() -> None:
    lim = virnet.Limits(window=1 << 20)
    assert lim.replace(max_calls=8).max_calls == 8 and lim.max_calls == 256
    with pytest.raises(ValueError, match="window"):
        virnet.Limits(window=0)
    with pytest.raises(TypeError, match="max_calls"):
        virnet.Limits(max_calls="many")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lim.replace(no_such_limit=1)


async def test_server_and_client_take_limits() -> None:
    tmp = short_tmpdir()
    server = virnet.Server(limits=virnet.Limits(window=1 << 20), max_calls=8)
    try:
        assert server.limits.window == 1 << 20 and server.limits.max_calls == 8
        address = await server.listen(f"unix://{tmp}/s.sock")
        async with await virnet.connect(str(address), window=1 << 19) as client:
            assert client.protocol.limits.window == 1 << 19
            assert client.protocol.peer_window == 1 << 20  # the server's, from HELLO
            (conn,) = server.connections
            assert conn.limits is server.limits
    finally:
        await server.close()
        remove_tree(tmp)


def test_daemon_config_sets_every_limit(tmp_path: Path) -> None:
    from virnet.daemon.config import DaemonConfig

    conf = tmp_path / "virnetd.toml"
    names = virnet.Limits.names()
    conf.write_text("".join(f"{name} = {i + 30}\n" for i, name in enumerate(names)))
    limits = DaemonConfig.from_file(str(conf)).limits()
    assert [getattr(limits, n) for n in names] == [i + 30 for i in range(len(names))]
    conf.write_text("window = 0\n")
    with pytest.raises(ValueError, match=r"virnetd.toml: limit window must be positive"):
        DaemonConfig.from_file(str(conf))


def test_importing_virnet_loads_only_what_is_used() -> None:
    """``import virnet`` defers the heavy modules until a name from them is used."""
    import subprocess
    import sys

    code = (
        "import sys, virnet\n"
        "assert 'virnet.server' not in sys.modules and 'virnet.client' not in sys.modules\n"
        "virnet.connect\n"
        "assert 'virnet.client' in sys.modules and 'virnet.server' not in sys.modules\n"
        "assert virnet.Server.__module__ == 'virnet.server'\n"
        "assert sorted(virnet.__all__) == sorted(n for n in virnet.__all__ if hasattr(virnet, n))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
