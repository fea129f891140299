#!/usr/bin/env bash
# Install and configure what the build and the tests need on a fresh Debian 12 machine (as root).
#
# Idempotent: packages are installed only when one is missing (a dpkg check is the fast path), users,
# groups and directories are created only when absent, and a qemu.conf setting is written only when the
# file does not set that key already (an operator's own value is never overwritten).
#
# Why these settings: there is no systemd as PID 1 on the build machines, so libvirtd runs as a plain
# root process without cgroups, mount namespaces or a security driver (see shared ENVIRONMENT notes).
set -euo pipefail

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Build: libvirt-dev + pkg-config (virt-sys links libvirt). Runtime for the e2e tests: the libvirt system
# daemon with its QEMU driver, the virsh client and QEMU itself. prometheus brings promtool (rule tests),
# libpython3.11 is needed by the rotel OTLP collector binary, systemd brings systemd-analyze (unit checks),
# openssl and curl make the test certificates and talk to the TLS collector and Prometheus
# (tests/tls_export.rs, tests/e2e_collector_security.rs); python3-seccomp runs the agent as on a
# kernel without Landlock (tests/confinement.rs). The single-node Kubernetes of tests/e2e_k8s.rs
# (scripts/k8s-cluster.sh) takes etcd, runc and the CNI plugins from Debian (its kubelet, control plane and
# containerd 2.x are built by scripts/build-k8s.sh), debootstrap for its local images, iptables for the
# CNI bridge plugin.
# NOT qemu-utils: the machine may carry a newer one from backports and apt refuses the mix.
PACKAGES=(
    libvirt-dev pkg-config
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    prometheus libpython3.11 systemd openssl curl
    python3-seccomp
    runc containernetworking-plugins etcd-server debootstrap iptables
)

if [[ $(id -u) -ne 0 ]]; then
    die "must run as root (installs packages, writes /etc/libvirt/qemu.conf)"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    log "all packages already installed"
else
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep maintainer scripts from starting services (prometheus ships an init script) on a host where
    # nothing should run unless a test starts it; container images usually have this file already.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" || die "apt-get install failed: ${missing[*]}"
fi

# Users and groups the QEMU driver expects (libvirt-daemon-system would create them, but it is heavier and
# its maintainer scripts want systemd).
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent group libvirt >/dev/null || groupadd -r libvirt
id -u libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

mkdir -p /var/log/libvirt/qemu /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt /etc/libvirt

# qemu.conf: set each key only when no uncommented line sets it already.
QEMU_CONF=/etc/libvirt/qemu.conf
[[ -e $QEMU_CONF ]] || printf '# Written by virt-hypervisor-agent scripts/setup.sh for a host without systemd.\n' >"$QEMU_CONF"
# A file whose last line lacks its newline would glue our first line onto it.
if [[ -s $QEMU_CONF && $(tail -c1 "$QEMU_CONF" | od -An -c | tr -d ' ') != '\n' ]]; then
    printf '\n' >>"$QEMU_CONF"
fi
set_default() {
    local key=$1 value=$2 existing
    existing=$(grep -E "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF" | tail -n1 || true)
    if [[ -n $existing ]]; then
        if [[ $(tr -d '[:space:]' <<<"${existing#*=}") != "$(tr -d '[:space:]' <<<"$value")" ]]; then
            log "qemu.conf: keeping the operator's '$existing' (tests want $key = $value)"
        fi
        return 0
    fi
    printf '%s = %s\n' "$key" "$value" >>"$QEMU_CONF"
    log "qemu.conf: set $key = $value"
}
set_default user '"root"'
set_default group '"root"'
set_default dynamic_ownership 0
set_default namespaces '[]'
set_default cgroup_controllers '[]'
set_default security_driver '"none"'

log "done"
