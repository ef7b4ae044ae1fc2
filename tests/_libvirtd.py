"""Start a private, real libvirtd (Debian packages) for interop tests.

Usage::

    reason = libvirtd_available()
    if reason: pytest.skip(reason)
    with LibvirtDaemon() as d:
        pool, pool_dir = d.create_dir_pool()
        vol_path = d.create_raw_volume(pool, "v1", "16M")
        d.virsh("vol-list", pool)
        d.virsh("list", "--all", uri=d.test_uri)

Isolation: as root, libvirtd's drivers keep state in fixed paths (/run/libvirt/<driver>,
/etc/libvirt/storage, /var/lib/libvirt, /var/cache/libvirt) and each driver takes a lock
on /run/libvirt/<driver>/driver.pid, so a second root libvirtd fails with "Failed to
acquire pid file '/run/libvirt/network/driver.pid'". When possible each daemon is
therefore run in a private mount namespace (``unshare --mount``) with private temporary
directories bind-mounted over those paths: daemons never collide with each other nor
with a system libvirtd, and pool definitions never persist on the host. Where mount
namespaces are not available the daemon runs unisolated, serialised by a lock file.

The sockets live in a private ``unix_sock_dir`` under the temporary directory (visible
outside the namespace). Clients reach the daemon with
``qemu+unix:///system?socket=PATH`` or ``test+unix:///default?socket=PATH``.

Needs ci/install-libvirt.sh to have been run (packages, user libvirt-qemu, groups kvm
and libvirt-qemu).
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

__all__ = [
    "SYSTEM_PYTHON",
    "LibvirtDaemon",
    "LibvirtDaemonError",
    "libvirtd_available",
    "libvirtd_binary",
    "mount_namespace_usable",
]

#: python3-libvirt belongs to Debian's interpreter, not to a venv.
SYSTEM_PYTHON = "/usr/bin/python3"

# Paths that a root libvirtd (9.0) writes driver state to; bind-mounted over when isolated.
_ISOLATED_PATHS = ("/run/libvirt", "/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt")

# Serialises unisolated daemons (they share /run/libvirt/*/driver.pid).
_UNISOLATED_LOCK = "/run/lock/virnet-libvirtd.lock"

_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 on Linux


class LibvirtDaemonError(RuntimeError):
    pass


def libvirtd_binary() -> str | None:
    return shutil.which("libvirtd") or (
        "/usr/sbin/libvirtd" if os.access("/usr/sbin/libvirtd", os.X_OK) else None
    )


def libvirtd_available() -> str | None:
    """None if a private libvirtd can be started here, else a reason string."""
    if os.geteuid() != 0:
        return "libvirtd interop tests need root (qemu:///system driver)"
    if libvirtd_binary() is None:
        return "libvirtd not installed (run ci/install-libvirt.sh)"
    if shutil.which("virsh") is None:
        return "virsh not installed (run ci/install-libvirt.sh)"
    try:
        import grp
        import pwd

        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        return "user/group libvirt-qemu missing (run ci/install-libvirt.sh)"
    return None


def system_python_has_libvirt() -> bool:
    try:
        r = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import libvirt"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@functools.cache
def mount_namespace_usable() -> bool:
    """True if `unshare --mount` plus a bind mount works here (root with CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    d = tempfile.mkdtemp(prefix="virnet-nsprobe-")
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "mount", "--bind", d, d],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(d)


def _short_tmpdir(prefix: str) -> Path:
    # AF_UNIX paths are limited to 107 bytes: keep the socket dir short, under /tmp.
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class LibvirtDaemon:
    """A private libvirtd subprocess with its own config, sockets, log and state."""

    def __init__(
        self,
        *,
        workdir: str | os.PathLike[str] | None = None,
        isolate: bool | None = None,
        start_timeout: float = 30.0,
        log_level: int = 3,
        extra_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: variables set in libvirtd's environment on top of ours."""
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else _short_tmpdir("virnet-lvd-")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock_dir = self.workdir / "sock"
        self.socket_path = str(self.sock_dir / "libvirt-sock")
        self.ro_socket_path = str(self.sock_dir / "libvirt-sock-ro")
        self.config_path = str(self.workdir / "libvirtd.conf")
        self.pid_file = str(self.workdir / "libvirtd.pid")
        self.log_path = str(self.workdir / "libvirtd.log")
        self.stdio_path = str(self.workdir / "libvirtd.stdio")
        self.state_dir = self.workdir / "state"
        if len(self.socket_path.encode()) > _SUN_PATH_MAX:
            raise LibvirtDaemonError(f"socket path too long for AF_UNIX: {self.socket_path}")
        self.isolated = mount_namespace_usable() if isolate is None else isolate
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.extra_config = extra_config
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._stdio: IO[bytes] | None = None
        self._lock_fd: int | None = None
        self._pools: list[str] = []

    # -- URIs -------------------------------------------------------------------------

    @property
    def qemu_uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def test_uri(self) -> str:
        return f"test+unix:///default?socket={self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- lifecycle --------------------------------------------------------------------

    def _write_config(self) -> None:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        conf = f"""\
# written by virnet tests/_libvirtd.py
listen_tls = 0
listen_tcp = 0
unix_sock_dir = {q(str(self.sock_dir))}
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
unix_sock_ro_perms = "0777"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = {q(f"{self.log_level}:file:{self.log_path}")}
{self.extra_config}
"""
        Path(self.config_path).write_text(conf)

    def _command(self, binary: str) -> list[str]:
        daemon = [binary, "-f", self.config_path, "-p", self.pid_file]
        if not self.isolated:
            return daemon
        binds: list[str] = []
        for target in _ISOLATED_PATHS:
            src = self.state_dir / target.strip("/").replace("/", "_")
            src.mkdir(parents=True, exist_ok=True)
            if target == "/etc/libvirt" and os.path.isdir(target):
                # Keep libvirt.conf / libvirt-admin.conf; driver config dirs start empty.
                for f in Path(target).iterdir():
                    if f.is_file():
                        shutil.copy2(f, src / f.name)
            os.makedirs(target, exist_ok=True)  # mount point must exist on the host
            binds.append(f"mount --bind {_shq(str(src))} {_shq(target)}")
        # unshare execs sh (no --fork), sh execs libvirtd: Popen.pid is libvirtd's pid.
        script = " && ".join([*binds, "exec " + " ".join(_shq(a) for a in daemon)])
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script]

    def start(self) -> LibvirtDaemon:
        if self.proc is not None:
            raise LibvirtDaemonError("already started")
        reason = libvirtd_available()
        if reason:
            raise LibvirtDaemonError(reason)
        binary = libvirtd_binary()
        assert binary is not None
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not self.isolated:
            self._take_unisolated_lock()
        env = dict(os.environ)
        env["LC_ALL"] = "C"
        for k in (
            "LIBVIRT_DEFAULT_URI",
            "LIBVIRT_LOG_OUTPUTS",
            "LIBVIRT_LOG_FILTERS",
            "LIBVIRT_DEBUG",
        ):
            env.pop(k, None)
        env.update(self.extra_env)
        self._stdio = open(self.stdio_path, "wb")  # noqa: SIM115 (closed in stop())
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=self._stdio,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
                start_new_session=True,  # no terminal signals from the test runner
            )
        except BaseException:
            self._cleanup_files()
            raise
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _take_unisolated_lock(self) -> None:
        os.makedirs(os.path.dirname(_UNISOLATED_LOCK), exist_ok=True)
        fd = os.open(_UNISOLATED_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LibvirtDaemonError(
                        f"timed out waiting for {_UNISOLATED_LOCK} (another unisolated libvirtd)"
                    ) from None
                time.sleep(0.2)
        self._lock_fd = fd

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        deadline = t0 + self.start_timeout
        last_err = "socket not created"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise LibvirtDaemonError(
                    f"libvirtd exited with status {rc} during startup\n{self.log_tail()}"
                )
            if os.path.exists(self.socket_path):
                # The socket is listening before the drivers have initialised (the daemon
                # only serves clients after that), and a bare connect()+close() logs an
                # "End of file while reading data" error: a real RPC proves readiness.
                r = self._run_virsh(
                    ["uri"], self.qemu_uri, timeout=max(1.0, deadline - time.monotonic())
                )
                if r is not None and r.returncode == 0:
                    return
                last_err = "virsh uri: " + (r.stderr.strip() if r is not None else "timeout")
            time.sleep(0.05)
        raise LibvirtDaemonError(
            f"libvirtd not ready after {self.start_timeout:.0f}s ({last_err})\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop exactly this libvirtd (by PID): SIGTERM, then SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None and self._pools:
                for pool in reversed(self._pools):
                    # Only matters when unisolated: definitions persist in /etc/libvirt.
                    self._run_virsh(["pool-destroy", pool], self.qemu_uri, timeout=10)
                    self._run_virsh(["pool-undefine", pool], self.qemu_uri, timeout=10)
            self._pools.clear()
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._stdio is not None:
            self._stdio.close()
            self._stdio = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def cleanup(self) -> None:
        """stop() and remove the temporary directory (if this object created it)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- diagnostics ------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for label, path in (("log", self.log_path), ("stdout/stderr", self.stdio_path)):
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail.strip():
                out.append(f"--- libvirtd {label} ({path}) ---\n{tail}")
        return "\n".join(out) or "(libvirtd wrote no log)"

    # -- clients ----------------------------------------------------------------------

    def _run_virsh(
        self, args: list[str], uri: str, timeout: float
    ) -> subprocess.CompletedProcess[str] | None:
        env = dict(os.environ)
        env["LC_ALL"] = "C"
        env.pop("LIBVIRT_DEFAULT_URI", None)
        env.pop("VIRSH_DEFAULT_CONNECT_URI", None)
        try:
            return subprocess.run(
                ["virsh", "-c", uri, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None

    def virsh(self, *args: str, uri: str | None = None, timeout: float = 60) -> str:
        """Run virsh against this daemon (default: the qemu:///system driver); return stdout."""
        u = uri if uri is not None else self.qemu_uri
        r = self._run_virsh([str(a) for a in args], u, timeout)
        if r is None:
            raise LibvirtDaemonError(f"virsh -c {u} {' '.join(args)}: timed out after {timeout}s")
        if r.returncode != 0:
            raise LibvirtDaemonError(
                f"virsh -c {u} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}"
            )
        return r.stdout

    def system_python(self, code: str, *args: str, timeout: float = 60) -> str:
        """Run `code` with Debian's /usr/bin/python3 (which has python3-libvirt).

        argv[1] is this daemon's qemu URI, argv[2] its test URI, then `args`.
        """
        r = subprocess.run(
            [SYSTEM_PYTHON, "-c", code, self.qemu_uri, self.test_uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if r.returncode != 0:
            raise LibvirtDaemonError(f"{SYSTEM_PYTHON} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    # -- storage helpers --------------------------------------------------------------

    def create_dir_pool(
        self, name: str | None = None, target: str | os.PathLike[str] | None = None
    ) -> tuple[str, str]:
        """Define and start a `dir` pool; return (pool name, target dir)."""
        name = name or f"virnet-{uuid.uuid4().hex[:8]}"
        tdir = Path(target) if target is not None else self.workdir / "pools" / name
        tdir.mkdir(parents=True, exist_ok=True)
        self.virsh("pool-define-as", name, "dir", "--target", str(tdir))
        self._pools.append(name)
        self.virsh("pool-start", name)
        return name, str(tdir)

    def create_raw_volume(self, pool: str, name: str, size: str | int = "16M") -> str:
        """Create a raw volume (`vol-create-as POOL NAME SIZE --format raw`); return its path."""
        self.virsh("vol-create-as", pool, name, str(size), "--format", "raw")
        return self.virsh("vol-path", name, "--pool", pool).strip()

    def delete_pool(self, name: str) -> None:
        self.virsh("pool-destroy", name)
        self.virsh("pool-undefine", name)
        if name in self._pools:
            self._pools.remove(name)


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"
