#!/usr/bin/env bash
# Install a real libvirtd (Debian packages) for virnet's interop tests.
#
# Idempotent; run as root on a Debian machine (verified on Debian 12, libvirt 9.0.0).
# No systemd is needed: tests/_libvirtd.py starts private libvirtd instances itself.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

PACKAGES=(libvirt-daemon libvirt-clients python3-libvirt)

log() { printf 'install-libvirt: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    # apt-get update only if there are no package lists yet; if the install then
    # fails (stale lists), update once and retry.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "apt-get update (no package lists)"
        apt-get -q -o DPkg::Lock::Timeout=600 update
    fi
    if ! apt-get install "${APT_OPTS[@]}" "${missing[@]}"; then
        log "install failed; apt-get update and retry"
        apt-get -q -o DPkg::Lock::Timeout=600 update
        apt-get install "${APT_OPTS[@]}" "${missing[@]}"
    fi
else
    log "packages already installed: ${PACKAGES[*]}"
fi

# Debian's build of the QEMU driver runs guests as user libvirt-qemu, group
# libvirt-qemu; its state driver fails to initialise ("Failed to parse user
# 'libvirt-qemu'" / "Failed to parse group 'libvirt-qemu'") and libvirtd exits if
# either is missing. These are normally made by libvirt-daemon-system's postinst
# (not installed with --no-install-recommends); mirror what it does.
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin --gid kvm --groups libvirt-qemu \
        --comment "Libvirt Qemu" libvirt-qemu
fi
id -nG libvirt-qemu | tr ' ' '\n' | grep -qx libvirt-qemu \
    || usermod -a -G libvirt-qemu libvirt-qemu

# Mount points that tests/_libvirtd.py bind-mounts private directories over (in a
# private mount namespace), so several test daemons never share driver state.
mkdir -p /run/libvirt /etc/libvirt /var/lib/libvirt /var/cache/libvirt

# Sanity checks.
command -v libvirtd >/dev/null || die "libvirtd missing"
command -v virsh >/dev/null || die "virsh missing"
/usr/bin/python3 -c 'import libvirt' || die "python3-libvirt not importable by /usr/bin/python3"
command -v unshare >/dev/null || log "warning: unshare missing; test daemons will not be isolated"

log "ok: $(libvirtd --version)"
