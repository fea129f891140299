# shellcheck shell=bash disable=SC2034  # sourced: variables are used by the check scripts
# Helpers for the checks that run the deployment artefacts for real (sourced, not executed):
# check-package.sh, check-nspawn.sh, check-podman.sh.
#
# Everything they need comes from the ordinary registries and is installed here on first use:
# Debian packages (debootstrap, systemd-container, podman, runc, ...) with apt-get, cargo-deb from
# crates.io. Slow things are cached under $VHA_CACHE_DIR (default
# /var/cache/virt-hypervisor-agent-ci), outside the repository, and rebuilt only when their recipe
# (the text of the function that builds them) changes:
#   debs/                  .deb files downloaded by debootstrap and apt for the roots below
#   root-nspawn-<hash>/    Debian 12 minbase + systemd + libvirt daemon + QEMU (booted by nspawn)
#   root-runtime-<hash>/   Debian 12 minbase, trimmed like debian:bookworm-slim (podman base)
#   cargo-deb/             `cargo install --root` of cargo-deb
#   cargo-target/          CARGO_TARGET_DIR of the release build packaged by scripts/package.sh
# Podman images are kept in podman's own storage, labelled with their recipe hash.

# shellcheck source=tests/deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

VHA_CACHE_DIR=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}
# The release build behind the package goes to a target dir in the cache, not the clone's target/:
# CI starts from a clean clone, and would otherwise rebuild every dependency in release mode each
# run (17 min of the first, cold run here on a loaded machine). cargo-deb honours it.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$VHA_CACHE_DIR/cargo-target}
DEBIAN_MIRROR=${VHA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
CARGO_DEB_VERSION=3.8.0

node_log() { printf '%s: %s\n' "${NODE_CHECK:-node}" "$*" >&2; }
node_fail() { printf '%s: FAIL: %s\n' "${NODE_CHECK:-node}" "$*" >&2; exit 1; }

# timed NAME CMD...: run CMD (a function: errexit stays on inside it, so its first failing command
# ends the script) and record how long it took. print_timings, from the EXIT trap, also shows the
# step that was running when the script failed.
NODE_TIMINGS=()
STEP_NAME='' STEP_T0=''
step_elapsed() { awk -v a="$STEP_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
timed() {
    STEP_NAME=$1 STEP_T0=$(date +%s.%N)
    shift
    node_log "--- $STEP_NAME"
    "$@"
    local dt
    dt=$(step_elapsed)
    NODE_TIMINGS+=("$(printf '%-52s %7ss' "$STEP_NAME" "$dt")")
    node_log "--- $STEP_NAME: ${dt}s"
    STEP_NAME=
}

print_timings() {
    local line
    if [[ -n $STEP_NAME ]]; then
        NODE_TIMINGS+=("$(printf '%-52s %7ss  FAILED' "$STEP_NAME" "$(step_elapsed)")")
        STEP_NAME=
    fi
    printf '%s: step times\n' "${NODE_CHECK:-node}" >&2
    for line in "${NODE_TIMINGS[@]}"; do printf '  %s\n' "$line" >&2; done
}

# need_pkgs PKG...: apt-get install the Debian packages that are missing (dpkg check first).
need_pkgs() {
    local missing=() p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || node_fail "need root to install ${missing[*]}"
    node_log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
            node_fail "apt-get install ${missing[*]}"
    fi
}

# tcg_domain_xml NAME [kubevirt]: a minimal TCG domain (32 MiB, 1 vCPU, a pty serial), with a
# KubeVirt <uid> of its own when the second argument is "kubevirt".
tcg_domain_xml() {
    local meta=
    if [[ ${2:-} == kubevirt ]]; then
        meta="  <metadata><kubevirt xmlns=\"http://kubevirt.io\"><uid>$(cat /proc/sys/kernel/random/uuid)</uid></kubevirt></metadata>
"
    fi
    printf "<domain type='qemu'>\n  <name>%s</name>\n%s  <memory unit='MiB'>32</memory>\n  <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices><serial type='pty'/></devices>\n</domain>\n" "$1" "$meta"
}

# recipe_hash FUNCTION...: a short hash of the functions' source text (the cache key).
recipe_hash() {
    local f
    for f in "$@"; do declare -f "$f"; done | sha256sum | cut -c1-12
}

# chroot_apt ROOT PKG...: install packages into ROOT with its own apt, no service started, the
# downloaded .debs kept in the shared cache.
chroot_apt() {
    local root=$1
    shift
    mkdir -p "$VHA_CACHE_DIR/debs" "$root/var/cache/apt/archives"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    mount --bind "$VHA_CACHE_DIR/debs" "$root/var/cache/apt/archives"
    mount -t proc proc "$root/proc"
    local rc=0
    {
        chroot "$root" apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -q --no-install-recommends "$@"
    } >"$root.apt.log" 2>&1 || rc=$?
    umount "$root/proc"
    umount "$root/var/cache/apt/archives"
    rm -f "$root/usr/sbin/policy-rc.d"
    if ((rc != 0)); then
        tail -n 30 "$root.apt.log" >&2
        return "$rc"
    fi
    rm -f "$root.apt.log"
}

debootstrap_minbase() {
    local root=$1 include=$2
    mkdir -p "$VHA_CACHE_DIR/debs"
    debootstrap --variant=minbase --cache-dir="$VHA_CACHE_DIR/debs" ${include:+--include="$include"} \
        "$SUITE" "$root" "$DEBIAN_MIRROR" >"$root.debootstrap.log" 2>&1 || {
        tail -n 30 "$root.debootstrap.log" >&2
        return 1
    }
    rm -f "$root.debootstrap.log"
}

# The root booted by check-nspawn.sh: systemd as PID 1, a libvirt system daemon with the QEMU driver
# (configured like scripts/setup.sh: no cgroups, namespaces or security driver inside a container),
# the `qemu` user with KubeVirt's uid 107 for launcher-style session daemons, and the /etc/hosts
# every installed Debian system has (debootstrap writes none; without it "localhost", the agent's
# default endpoint host, does not resolve).
build_nspawn_root() {
    local root=$1
    debootstrap_minbase "$root" systemd,systemd-sysv,dbus || return 1
    chroot_apt "$root" libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \
        systemd-container || return 1
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    echo vha-nspawn >"$root/etc/hostname"
    chroot "$root" sh -ec '
        getent group kvm >/dev/null || groupadd -r kvm
        getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
        id -u libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
        groupadd -g 107 qemu && useradd -u 107 -g 107 -d /nonexistent -s /usr/sbin/nologin qemu
        mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt
        printf "%s\n" "user = \"root\"" "group = \"root\"" "dynamic_ownership = 0" "namespaces = []" \
            "cgroup_controllers = []" "security_driver = \"none\"" >>/etc/libvirt/qemu.conf
        # No getty on a console nobody reads.
        systemctl mask console-getty.service getty@tty1.service >/dev/null 2>&1 || true
        : >/etc/machine-id
    '
}

# The runtime base of the image (tagged as debian:bookworm-slim): minbase, with the dpkg excludes and
# apt settings of the official slim image (no docs, man pages or locales; no apt lists, downloaded
# .debs or package caches kept).
build_runtime_root() {
    local root=$1
    debootstrap_minbase "$root" "" || return 1
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    # As in the official image: apt keeps no downloaded .debs and no package caches in a layer.
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
    find "$root/usr/share/doc" -mindepth 2 -not -name copyright -not -type d -delete
    rm -rf "$root"/usr/share/{man,info,locale,groff,lintian}/* "$root"/var/lib/apt/lists/* \
        "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
    : >"$root/etc/machine-id"
}

# cached_root KIND: print the path of the cached root KIND (nspawn or runtime), building it first
# when no root for the current recipe exists. Older roots of the same kind are removed.
cached_root() {
    local kind=$1 fn hash dir old
    fn=build_${kind}_root
    hash=$(recipe_hash "$fn" debootstrap_minbase chroot_apt)
    dir=$VHA_CACHE_DIR/root-$kind-$hash
    if [[ -f $dir/.vha-complete ]]; then
        node_log "cached $kind root: $dir"
        printf '%s\n' "$dir"
        return 0
    fi
    need_pkgs debootstrap
    mkdir -p "$VHA_CACHE_DIR"
    for old in "$VHA_CACHE_DIR"/root-"$kind"-*; do
        [[ -d $old && $old != "$dir" ]] && { node_log "removing outdated root $old"; rm -rf "$old"; }
    done
    rm -rf "$dir" "$dir.tmp"
    node_log "building $kind root (recipe $hash) in $dir"
    "$fn" "$dir.tmp" || { rm -rf "$dir.tmp"; node_fail "building the $kind root failed"; }
    mv "$dir.tmp" "$dir"
    touch "$dir/.vha-complete"
    node_log "$kind root: $(du -sh "$dir" | cut -f1)"
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------- OTLP receiver on the host
# otlp_receiver_start DIR GRPC_PORT HTTP_PORT: start an OTLP receiver on 127.0.0.1 that prints every
# data point (debug exporter, verbosity detailed) to $RECEIVER_LOG: the project's minimal
# OpenTelemetry Collector, from VHA_OTELCOL or VHA_OTELCOL_BIN (set by scripts/test.sh) or else
# scripts/build-collector.sh (cached); without that script, Rotel, an independent Rust collector
# shipped in a PyPI wheel, which prints the same format. Sets RECEIVER_PID, RECEIVER_LOG,
# RECEIVER_KIND.
ROTEL_VERSION=0.0.1a15
otlp_receiver_start() {
    local dir=$1 grpc=$2 http=$3 bin=${VHA_OTELCOL:-${VHA_OTELCOL_BIN:-}}
    RECEIVER_LOG=$dir/receiver.log
    if [[ -z $bin && -f $DEPLOY_ROOT/scripts/build-collector.sh ]]; then
        bin=$(bash "$DEPLOY_ROOT/scripts/build-collector.sh") || node_fail "scripts/build-collector.sh failed"
    fi
    if [[ -n $bin ]]; then
        cat >"$dir/otelcol.yaml" <<YAML
receivers:
  otlp:
    protocols:
      grpc: {endpoint: "127.0.0.1:$grpc"}
      http: {endpoint: "127.0.0.1:$http"}
exporters:
  debug: {verbosity: detailed}
service:
  telemetry:
    metrics: {level: none}
  pipelines:
    metrics: {receivers: [otlp], exporters: [debug]}
YAML
        "$bin" --config="$dir/otelcol.yaml" >"$RECEIVER_LOG" 2>&1 &
        RECEIVER_PID=$!
        RECEIVER_KIND="OpenTelemetry Collector $bin"
    else
        need_pkgs libpython3.11
        local venv=$DEPLOY_TOOLS_DIR/rotel-$ROTEL_VERSION
        if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import rotel' 2>/dev/null; then
            python3 -m venv "$venv" || node_fail "python3 -m venv $venv"
            "$venv/bin/pip" install -q --disable-pip-version-check "rotel==$ROTEL_VERSION" ||
                node_fail "pip install rotel==$ROTEL_VERSION"
        fi
        bin=$("$venv/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')
        "$bin" start --otlp-grpc-endpoint "127.0.0.1:$grpc" --otlp-http-endpoint "127.0.0.1:$http" \
            --exporter blackhole --debug-log metrics --debug-log-verbosity detailed >"$RECEIVER_LOG" 2>&1 &
        RECEIVER_PID=$!
        RECEIVER_KIND="Rotel $ROTEL_VERSION (PyPI wheel)"
    fi
    local t=$SECONDS
    until (: >"/dev/tcp/127.0.0.1/$grpc") 2>/dev/null; do
        kill -0 "$RECEIVER_PID" 2>/dev/null || { cat "$RECEIVER_LOG" >&2; node_fail "receiver exited"; }
        ((SECONDS - t < 30)) || node_fail "receiver not listening on 127.0.0.1:$grpc after 30s"
        sleep 0.2
    done
    node_log "receiver: $RECEIVER_KIND (pid $RECEIVER_PID) on 127.0.0.1:$grpc (gRPC) / :$http (HTTP)"
}

otlp_receiver_stop() {
    [[ -n ${RECEIVER_PID:-} ]] || return 0
    kill "$RECEIVER_PID" 2>/dev/null || true
    wait "$RECEIVER_PID" 2>/dev/null || true
    RECEIVER_PID=
}

# Byte offset of the receiver log now: later checks only look at what arrives after it.
log_mark() { stat -c %s "$RECEIVER_LOG"; }

# points FROM ARGS...: number of matching data points after byte FROM (see otlp_debug.py).
points() {
    local from=$1
    shift
    python3 "$DEPLOY_ROOT/tests/deploy/otlp_debug.py" "$RECEIVER_LOG" --from-byte "$from" "$@" | cut -d' ' -f1
}

# wait_points TIMEOUT FROM ARGS...: wait until at least one matching point arrived after FROM;
# prints the seconds it took. Fails after TIMEOUT seconds.
wait_points() {
    local timeout=$1 from=$2 t0
    shift 2
    t0=$(date +%s.%N)
    while true; do
        if (($(points "$from" "$@") > 0)); then
            awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }'
            return 0
        fi
        if awk -v a="$t0" -v b="$(date +%s.%N)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
            node_log "no data point matching [$*] within ${timeout}s"
            return 1
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- podman and local base images
# podman_setup DIR: install podman + runc and write the containers.conf this machine needs (runc,
# not crun, which refuses its hybrid cgroups; cgroupfs without a systemd PID 1; no default ulimits,
# which exceed the machine's hard limits). Only this shell's podman calls use it (CONTAINERS_CONF).
podman_setup() {
    need_pkgs podman runc
    mkdir -p "$VHA_CACHE_DIR/podman"
    cat >"$VHA_CACHE_DIR/podman/containers.conf" <<'CONF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF=$VHA_CACHE_DIR/podman/containers.conf
}

image_recipe() { podman image inspect --format '{{index .Config.Labels "vha.recipe"}}' "$1" 2>/dev/null || true; }

# The builder base: the runtime root, plus the C toolchain and CA certificates the official rust
# image carries (cargo links with cc and fetches crates over https), plus this machine's Rust
# toolchain (rustc, cargo, the std library; no docs or sources) where the official image has it.
build_builder_root() {
    local root=$1 runtime=$2 sysroot
    sysroot=$(rustc --print sysroot)
    mkdir -p "$root"
    cp -a "$runtime/." "$root/"
    rm -f "$root/.vha-complete"
    chroot_apt "$root" gcc libc6-dev ca-certificates || return 1
    # Trust what this machine trusts: its local CAs (Debian's place for them), e.g. of an egress
    # proxy in front of crates.io. Only the builder gets them, never the runtime image.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null || return 1
    fi
    rm -rf "$root"/var/lib/apt/lists/*
    local tc
    tc=$root/usr/local/rustup/toolchains/$(basename "$sysroot")
    mkdir -p "$tc/bin" "$root/usr/local/cargo/bin"
    cp -a "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$sysroot/bin/rustdoc" "$tc/bin/"
    cp -a "$sysroot/libexec" "$tc/"
    (cd "$sysroot" && tar -c --exclude=lib/rustlib/src --exclude=lib/rustlib/rustc-src lib) | tar -C "$tc" -x
    local b
    for b in cargo rustc rustdoc; do ln -s "../../rustup/toolchains/$(basename "$sysroot")/bin/$b" "$root/usr/local/cargo/bin/$b"; done
}

# local_base_images: make sure podman has the two base images the Containerfile names, built from
# debootstrap and this machine's toolchain (no registry is reachable), tagged with those names:
#   docker.io/library/debian:bookworm-slim   <- the runtime root
#   docker.io/library/rust:<rustc version>-bookworm <- the builder root
# Each carries the label vha.recipe=<hash>; an image with the current hash is reused. Sets
# RUST_IMAGE_VERSION (pass it as --build-arg RUST_VERSION).
local_base_images() {
    local runtime rhash bhash tmp old
    runtime=$(cached_root runtime) || node_fail "no runtime root"
    rhash=$(basename "$runtime" | sed 's/^root-runtime-//')
    RUST_IMAGE_VERSION=$(rustc --version | awk '{print $2}')
    RUNTIME_BASE=docker.io/library/debian:$SUITE-slim
    BUILDER_BASE=docker.io/library/rust:$RUST_IMAGE_VERSION-$SUITE
    if [[ $(image_recipe "$RUNTIME_BASE") != "$rhash" ]]; then
        old=$(podman image inspect --format '{{.Id}}' "$RUNTIME_BASE" 2>/dev/null || true)
        node_log "importing $runtime as $RUNTIME_BASE"
        tar -C "$runtime" --exclude=./.vha-complete -c . |
            podman import -q --change "LABEL vha.recipe=$rhash" --change 'CMD ["bash"]' - "$RUNTIME_BASE" >/dev/null ||
            node_fail "podman import $RUNTIME_BASE"
        # The replaced image, unless images built on it still use it.
        [[ -n $old ]] && podman rmi "$old" >/dev/null 2>&1 || true
    else
        node_log "cached image $RUNTIME_BASE (recipe $rhash)"
    fi
    bhash=$( (echo "$rhash"; recipe_hash build_builder_root; rustc -vV; cat /usr/local/share/ca-certificates/*.crt 2>/dev/null) |
        sha256sum | cut -c1-12)
    if [[ $(image_recipe "$BUILDER_BASE") != "$bhash" ]]; then
        old=$(podman image inspect --format '{{.Id}}' "$BUILDER_BASE" 2>/dev/null || true)
        tmp=$VHA_CACHE_DIR/root-builder.tmp
        rm -rf "$tmp"
        node_log "building $BUILDER_BASE (recipe $bhash)"
        build_builder_root "$tmp" "$runtime" || { rm -rf "$tmp"; node_fail "building the builder root failed"; }
        tar -C "$tmp" -c . |
            podman import -q --change "LABEL vha.recipe=$bhash" \
                --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
                --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["bash"]' - "$BUILDER_BASE" >/dev/null || { rm -rf "$tmp"; node_fail "podman import $BUILDER_BASE"; }
        rm -rf "$tmp"
        [[ -n $old ]] && podman rmi "$old" >/dev/null 2>&1 || true
    else
        node_log "cached image $BUILDER_BASE (recipe $bhash)"
    fi
}
