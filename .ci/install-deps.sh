#!/usr/bin/env bash
# Install everything the tests need (Debian packages, the package in editable mode with
# its test extras) and start virtlogd + libvirtd, which nobody else starts here because
# systemd is not PID 1. Idempotent: safe to run before every CI run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

PACKAGES=(
    qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev
    libsystemd-dev pkg-config gcc busybox-static linux-image-amd64 qemu-guest-agent
    e2fsprogs cpio prometheus time libguestfs-tools ansible-core ansible-lint
    curl openssl systemd util-linux
    mmdebstrap systemd-container dpkg-dev debhelper dh-python pybuild-plugin-pyproject
    python3-argparse-manpage lintian
    chromium
)

log() { echo "install-deps: $*"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep postinst scripts from starting services (prometheus would grab :9090 and
    # collide with tests); this script starts the two daemons the tests need itself.
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
else
    log "Debian packages present"
fi

log "pip install -e '.[test]'"
"$PYTHON" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e "$ROOT[test]"

# Same logic as rig.ensure_libvirtd() in tests/rig/host.py, for shells and `make`.
# virtlogd is checked on its own: a libvirtd can outlive it and leave a stale socket
# file, and then every domain start fails. A connect, not `-S`, tells live from stale.
virtlogd_answers() {
    "$PYTHON" -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])' \
        /run/libvirt/virtlogd-sock 2>/dev/null
}
mkdir -p /var/log/libvirt /var/run/libvirt
if ! virtlogd_answers; then
    log "starting virtlogd"
    # A second instance exits on the pidfile lock, so a failed start is not fatal here;
    # the wait below is the real check.
    virtlogd -d || true
    for _ in $(seq 60); do
        virtlogd_answers && break
        sleep 0.5
    done
    virtlogd_answers || { echo "install-deps: virtlogd does not answer; see /var/log/libvirt/virtlogd.log" >&2; exit 1; }
fi
# The rig's libvirtd lets group libvirt use the read-write socket (as polkit does on a
# real Debian host; see tests/rig/libvirtd.conf). One started without that file is
# restarted with it: running guests survive a libvirtd restart.
LIBVIRTD_CONF="$ROOT/tests/rig/libvirtd.conf"
if virsh -c qemu:///system version >/dev/null 2>&1 &&
    [[ "$(stat -c %G:%a /run/libvirt/libvirt-sock 2>/dev/null)" != "libvirt:770" ]]; then
    log "restarting libvirtd with $LIBVIRTD_CONF (group libvirt on the read-write socket)"
    pkill -TERM -x libvirtd || true
    for _ in $(seq 60); do
        pgrep -x libvirtd >/dev/null || break
        sleep 0.5
    done
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    log "starting libvirtd"
    libvirtd -d -f "$LIBVIRTD_CONF" || true
    for _ in $(seq 60); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.5
    done
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "install-deps: libvirtd does not answer on qemu:///system; see /var/log/libvirt/" >&2
    exit 1
fi
log "libvirtd answers on qemu:///system"
