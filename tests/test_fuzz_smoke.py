"""A short run of every fuzz harness in ``fuzz/`` (a few thousand inputs each, seconds).

The harnesses run as child processes (libFuzzer owns its process and exits at the end)
with the wire core this test run uses (``VIRNET_NO_EXTENSIONS`` is inherited), on the
seeds ``fuzz/make_seeds.py`` writes.  The long campaigns are in ``fuzz/README.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
SRC = Path(__file__).resolve().parent.parent / "src"
RUNS = {"frames": 3000, "xdr": 5000, "core": 5000, "daemon": 1500, "client": 300}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    import virnet

    # The children import the same virnet as this process.
    pkg_parent = str(Path(virnet.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seeds")
    subprocess.run(
        [sys.executable, str(FUZZ / "make_seeds.py"), str(out)],
        check=True, env=_env(), capture_output=True, timeout=120,
    )
    return out


@pytest.mark.parametrize("harness", sorted(RUNS))
def test_harness_smoke(harness: str, seeds: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    runs = RUNS[harness]
    proc = subprocess.run(
        [
            sys.executable, str(FUZZ / f"fuzz_{harness}.py"), f"-runs={runs}",
            "-max_len=8192", "-rss_limit_mb=2048", "-timeout=30", "-seed=1",
            f"-artifact_prefix={tmp_path}/", str(corpus), str(seeds / harness),
        ],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0, f"fuzz_{harness} found something:\n{tail}"
    # libFuzzer stops at the end of a mutation batch, so the count it prints may pass
    # -runs by a few; fewer would mean it stopped early.
    done = re.search(r"^Done (\d+) runs", proc.stderr, re.MULTILINE)
    assert done is not None and int(done.group(1)) >= runs, tail
    import virnet

    core = "compiled" if virnet.compiled else "pure"
    assert f"fuzz {harness}: {core} core" in proc.stderr, tail
