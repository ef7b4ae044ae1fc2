#!/usr/bin/env bash
# System tools the tests drive for real: tmux (terminal tests of `virnet console`),
# iproute2 (network namespaces for link failures in migration tests), util-linux
# (losetup for block-device targets). Idempotent; Debian/Ubuntu, as root.
set -euo pipefail
PACKAGES=(tmux iproute2 util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    echo "install-system: installing ${missing[*]}" >&2
    apt-get -q -o DPkg::Lock::Timeout=600 update
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"
else
    echo "install-system: already installed: ${PACKAGES[*]}" >&2
fi
