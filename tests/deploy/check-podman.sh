#!/usr/bin/env bash
# Build the Containerfile with podman and run the image the way deploy/kubernetes/daemonset.yaml
# runs it, against real libvirt daemons laid out like KubeVirt launchers, with a real OTLP
# receiver on the host:
#
#   1. base images: no registry is reachable, so the two images the Containerfile names are made
#      here (lib-node.sh local_base_images) and cached in podman's storage:
#        docker.io/library/debian:bookworm-slim  debootstrap --variant=minbase bookworm with the
#            slim image's dpkg excludes (no docs, man pages, locales) and no apt lists. Differs
#            from the public image: built from today's archive by debootstrap, not by the Docker
#            Official Images tooling (same Priority: required package set, no docker-specific
#            apt-get clean hooks);
#        docker.io/library/rust:<rustc version>-bookworm  that root + gcc, libc6-dev,
#            ca-certificates and this machine's Rust toolchain (rustc, cargo, std; RUSTUP_HOME and
#            CARGO_HOME as in the official image). Differs from the public image: not based on
#            buildpack-deps (no git, curl, make, libssl-dev ...), no rustup, no rust-src/docs, and
#            the machine's Rust version (passed as RUST_VERSION) rather than the Containerfile's
#            default 1.88;
#   2. podman build --pull=never; the Containerfile's cache mounts keep the cargo registry and target
#      dir between runs (buildah stores them under /var/tmp/buildah-cache*);
#   3. the image: size, runtime package list (what the runtime stage added to its base must be
#      libvirt0 and its libraries only: no compiler, -dev package, Rust toolchain or CA store);
#   4. run it as the DaemonSet does: read-only root (no tmpfs added), --cap-drop ALL
#      --cap-add DAC_OVERRIDE, no-new-privileges, uid 0, the DaemonSet's env and ConfigMap config,
#      NODE_NAME set, /var/lib/kubelet/pods read-only with rslave (HostToContainer) propagation,
#      /etc/machine-id read-only. The pods dir holds a launcher whose uid-107 session daemon's
#      runtime dir (socket mode 0700) is mounted at .../volumes/kubernetes.io~empty-dir/
#      libvirt-runtime; a second launcher is added while the container runs;
#   5. the series of both launchers' VMIs arrive at the receiver with the node name;
#   6. the process's capabilities, NoNewPrivs and seccomp (from /proc on the host), and writes to
#      its root and to the pods dir fail with EROFS;
#   7. why there is no HEALTHCHECK: `check-config` still succeeds with the agent SIGSTOPped;
#   8. podman stop -> exit code 0 within the DaemonSet's grace period (15 s), final export seen.
#
# The container uses the host network (the receiver listens on 127.0.0.1); in Kubernetes the pod
# has its own network and reaches the collector's Service. Ports: $VHA_PODMAN_OTLP_PORT (default
# 14327, gRPC) and the next one.
set -euo pipefail
NODE_CHECK=check-podman
# shellcheck source=tests/deploy/lib-node.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib-node.sh"
cd "$DEPLOY_ROOT"

GRPC_PORT=${VHA_PODMAN_OTLP_PORT:-14327}
HTTP_PORT=$((GRPC_PORT + 1))
IMAGE=localhost/virt-hypervisor-agent:ci
NODE=vha-podman-node
LAUNCHER_USER=vha-qemu
GRACE=15 SERIES_BOUND=30
CTR=vha-ci-agent-$$

[[ $(id -u) -eq 0 ]] || node_fail "must run as root"
need_pkgs util-linux libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86

work=$(mktemp -d /tmp/vha-pod.XXXXXX)
chmod 0755 "$work"
CTR_STARTED='' LAUNCHERS=() MOUNTS=()
cleanup() {
    local rc=$?
    set +e
    if [[ -n $CTR_STARTED ]]; then
        ((rc != 0)) && { node_log "---- container log"; podman logs "$CTR" 2>&1 | tail -n 20 >&2; }
        podman rm -f -t 0 "$CTR" >/dev/null 2>&1
    fi
    local l
    for l in "${LAUNCHERS[@]}"; do stop_launcher "$l"; done
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}"; done
    otlp_receiver_stop
    ((rc != 0)) && { node_log "---- last receiver lines"; tail -n 20 "${RECEIVER_LOG:-/dev/null}" 2>/dev/null >&2; }
    rm -rf "$work"
    print_timings
    exit "$rc"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- launchers on the host
# A KubeVirt-style launcher: a libvirt session daemon running as uid 107 (KubeVirt's qemu user)
# in $work/<tag> (short: unix socket paths hold 107 bytes), its runtime dir bind-mounted at the
# launcher's emptyDir path under the fake kubelet root, one TCG VMI defined and started in it.
launcher_user() {
    if ! id -u "$LAUNCHER_USER" >/dev/null 2>&1; then
        if getent passwd 107 >/dev/null; then
            useradd -r -M -d /nonexistent -s /usr/sbin/nologin "$LAUNCHER_USER"
        else
            useradd -r -u 107 -M -d /nonexistent -s /usr/sbin/nologin "$LAUNCHER_USER"
        fi
    fi
    LAUNCHER_UID=$(id -u "$LAUNCHER_USER")
}

start_launcher() {
    local tag=$1 vmi=$2 d=$work/$1 pod rt
    mkdir -p "$d/run" "$d/cfg" "$d/cache"
    chown -R "$LAUNCHER_USER:" "$d"
    chmod 0700 "$d"
    runuser -u "$LAUNCHER_USER" -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$d" XDG_RUNTIME_DIR="$d/run" \
        XDG_CONFIG_HOME="$d/cfg" XDG_CACHE_HOME="$d/cache" setsid libvirtd --timeout 0 >"$d/libvirtd.log" 2>&1 &
    LAUNCHERS+=("$tag")
    local t0
    t0=$(now)
    until [[ -S $d/run/libvirt/libvirt-sock ]]; do
        awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 30) }' && { cat "$d/libvirtd.log" >&2; node_fail "launcher $tag: no socket"; }
        sleep 0.2
    done
    pod=$(cat /proc/sys/kernel/random/uuid)
    rt=$work/kubelet/pods/$pod/volumes/kubernetes.io~empty-dir/libvirt-runtime
    mkdir -p "$rt"
    chmod 0750 "$work/kubelet/pods/$pod"
    mount --bind "$d/run/libvirt" "$rt"
    MOUNTS+=("$rt")
    local st
    st=$(stat -c '%u %a %F' "$rt/libvirt-sock")
    [[ $st == "$LAUNCHER_UID 700 socket" ]] || node_fail "launcher socket is '$st'"
    tcg_domain_xml "vha-ns_$vmi" kubevirt >"$d/vmi.xml"
    local uri="qemu+unix:///session?socket=$d/run/libvirt/libvirt-sock"
    timeout 60 virsh -q -c "$uri" define "$d/vmi.xml" >/dev/null
    timeout 60 virsh -q -c "$uri" start "vha-ns_$vmi" >/dev/null
    node_log "launcher $tag: uid $LAUNCHER_UID session daemon, socket $rt/libvirt-sock ($st), VMI vha-ns/$vmi running"
}

# stop_launcher TAG: destroy its domains, then stop its libvirtd and virtlogd by the PIDs in their
# pid files (checked by name), so nothing but what this test started is signalled.
stop_launcher() {
    local d=$work/$1 uri name pid f
    uri="qemu+unix:///session?socket=$d/run/libvirt/libvirt-sock"
    if [[ -S $d/run/libvirt/libvirt-sock ]]; then
        for name in $(timeout 30 virsh -q -c "$uri" list --name 2>/dev/null); do
            timeout 30 virsh -q -c "$uri" destroy "$name" >/dev/null 2>&1
        done
    fi
    for f in "$d/run/libvirt/libvirtd.pid:libvirtd" "$d/run/libvirt/virtlogd.pid:virtlogd"; do
        pid=$(tr -dc 0-9 <"${f%%:*}" 2>/dev/null) || continue
        [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "${f##*:}" ]] && kill "$pid" 2>/dev/null
    done
    sleep 0.3
}

# ---------------------------------------------------------------- steps
images() { podman_setup; local_base_images; }

build_image() {
    local rev
    rev=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    local old
    old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    # --layers=false: no intermediate images pile up in the storage (one per source change, ~1 GB
    # each); the slow part, cargo, is cached by the Containerfile's cache mounts instead.
    podman build --isolation=chroot --pull=never --layers=false -q \
        --build-arg "RUST_VERSION=$RUST_IMAGE_VERSION" --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)" \
        --build-arg "REVISION=$rev" -t "$IMAGE" -f Containerfile . >"$work/build.log" 2>&1 ||
        { tail -n 40 "$work/build.log" >&2; node_fail "podman build"; }
    if [[ -n $old && $old != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
    node_log "built $IMAGE from Containerfile (builder $BUILDER_BASE, runtime $RUNTIME_BASE)"
}

inspect_image() {
    local size
    size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
    IMAGE_MB=$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')
    podman run --rm --pull=never --entrypoint dpkg-query "$RUNTIME_BASE" -W -f '${Package}\n' | sort >"$work/base.pkgs"
    podman run --rm --pull=never --entrypoint dpkg-query "$IMAGE" -W -f '${Package} ${Installed-Size}\n' | sort >"$work/image.pkgs"
    cut -d' ' -f1 "$work/image.pkgs" | sort | comm -13 "$work/base.pkgs" - >"$work/added.pkgs"
    grep -qx libvirt0 "$work/added.pkgs" || node_fail "libvirt0 not installed in the image"
    if grep -E -- '-dev$|^(gcc|cpp|g\+\+|pkg-config|pkgconf|rustc|cargo|ca-certificates|openssl|apt-utils)' "$work/added.pkgs"; then
        node_fail "the runtime image carries build tools or packages it does not need (above)"
    fi
    # Every added package must be libvirt0 or something libvirt0 depends on (directly or not).
    local needed
    needed=$(podman run --rm --pull=never --entrypoint sh "$IMAGE" -c \
        'apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances libvirt0 2>/dev/null' |
        grep -v '^ ' | sort -u)
    local extra
    extra=$(comm -23 "$work/added.pkgs" <(printf '%s\n' "$needed" | sort -u) || true)
    if [[ -n $extra ]]; then node_fail "packages added beyond libvirt0 and its dependencies: $extra"; fi
    local left
    left=$(podman run --rm --pull=never --entrypoint sh "$IMAGE" -c \
        'ls -d /usr/local/cargo /usr/local/rustup /var/lib/apt/lists/*_Packages /var/cache/apt/*.bin /var/cache/apt/archives/*.deb 2>/dev/null' || true)
    [[ -z $left ]] || node_fail "toolchain, apt lists or apt caches left in the runtime image: $left"
    node_log "image $IMAGE: ${IMAGE_MB} MB; $(wc -l <"$work/image.pkgs") packages, $(wc -l <"$work/added.pkgs") added to the base (libvirt0 and its dependencies):"
    tr '\n' ' ' <"$work/added.pkgs" | fold -s -w 100 | sed 's/^/    /' >&2
    echo >&2
    RUNTIME_PKGS=$(tr '\n' ' ' <"$work/added.pkgs")
}

run_container() {
    launcher_user
    mkdir -p "$work/kubelet/pods" "$work/config"
    chmod 0750 "$work/kubelet" "$work/kubelet/pods"
    # A shared mount, so that the rslave volume below receives the launcher mounts made later.
    mount --bind "$work/kubelet" "$work/kubelet"
    MOUNTS+=("$work/kubelet")
    mount --make-rshared "$work/kubelet"
    start_launcher l1 vmi-one
    # The DaemonSet's ConfigMap config and env (NODE_NAME from the downward API, the collector here).
    "$(deploy_venv)/python" - deploy/kubernetes/daemonset.yaml "$work/config/config.yaml" "$work/env" "$GRPC_PORT" "$NODE" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d['kind'] == 'ConfigMap')
ds = next(d for d in docs if d['kind'] == 'DaemonSet')
open(sys.argv[2], 'w').write(cm['data']['config.yaml'])
c = ds['spec']['template']['spec']['containers'][0]
with open(sys.argv[3], 'w') as f:
    for e in c.get('env') or []:
        name = e['name']
        if name == 'NODE_NAME':
            value = sys.argv[5]
        elif name == 'OTEL_EXPORTER_OTLP_ENDPOINT':
            value = f'http://127.0.0.1:{sys.argv[4]}'
        elif name.startswith('VIRT_HYPERVISOR_AGENT_EXPORT__TLS__') or 'valueFrom' in e:
            # The receiver here is plain OTLP on loopback: no TLS files, no Secret's headers (the
            # mTLS path with the Secret is tests/e2e_k8s.rs's).
            continue
        else:
            value = e['value']
        f.write(f'{name}={value}\n')
    # The health endpoint on a port of this test (the container shares the host's network).
    f.write(f'VIRT_HYPERVISOR_AGENT_HEALTH__LISTEN=127.0.0.1:{int(sys.argv[4]) + 2}\n')
    # Long: an export seen during `podman stop` is then the final flush; changes are pushed anyway.
    f.write('OTEL_METRIC_EXPORT_INTERVAL=60000\n')
sc = c['securityContext']
assert sc['readOnlyRootFilesystem'] and sc['capabilities'] == {'drop': ['ALL'], 'add': ['DAC_OVERRIDE']}, sc
assert sc['allowPrivilegeEscalation'] is False
open(sys.argv[2] + '.args', 'w').write(' '.join(c['args']))
PY
    local args
    args=$(cat "$work/config/config.yaml.args")
    rm "$work/config/config.yaml.args"
    MARK=$(log_mark)
    # shellcheck disable=SC2086  # args: the DaemonSet's words
    podman run -d --name "$CTR" --pull=never --network host \
        --read-only --read-only-tmpfs=false --cap-drop ALL --cap-add DAC_OVERRIDE \
        --security-opt no-new-privileges --user 0:0 --env-file "$work/env" \
        -v "$work/kubelet/pods:/var/lib/kubelet/pods:ro,rslave" -v /etc/machine-id:/etc/machine-id:ro \
        -v "$work/config:/etc/virt-hypervisor-agent:ro" "$IMAGE" $args >/dev/null
    CTR_STARTED=1
    CPID=$(podman inspect --format '{{.State.Pid}}' "$CTR")
    node_log "container $CTR running (host pid $CPID), args: $args"
}

check_series() {
    local a
    a=$(wait_points "$SERIES_BOUND" "$MARK" --metric kubevirt_vmi_hypervisor_info --attr namespace=vha-ns \
        --attr name=vmi-one --attr hypervisor_type=qemu-tcg --attr "node=$NODE") || node_fail "no series of vha-ns/vmi-one"
    node_log "vha-ns/vmi-one (launcher present at start) at the receiver after ${a}s"
    # The container confined itself with Landlock (podman's seccomp profile lets the calls through).
    (($(points "$MARK" --metric virt_hypervisor_agent_landlock --attr status=full --value 1) > 0)) || {
        podman logs "$CTR" 2>&1 | grep -i landlock >&2 || true
        node_fail "the agent did not report virt_hypervisor_agent_landlock{status=full}"
    }
    local mark b
    mark=$(log_mark)
    start_launcher l2 vmi-two
    b=$(wait_points "$SERIES_BOUND" "$mark" --metric kubevirt_vmi_hypervisor_info --attr namespace=vha-ns \
        --attr name=vmi-two --attr hypervisor_type=qemu-tcg --attr "node=$NODE") ||
        node_fail "no series of vha-ns/vmi-two (launcher added while the container runs)"
    node_log "vha-ns/vmi-two (launcher added while running) at the receiver ${b}s after its VMI started"
}

check_privileges() {
    local st want k v
    st=$(cat "/proc/$CPID/status")
    for want in CapBnd:0000000000000002 CapEff:0000000000000002 CapPrm:0000000000000002 \
        CapAmb:0000000000000000 NoNewPrivs:1 Seccomp:2 Uid:0; do
        k=${want%%:*} v=${want#*:}
        [[ $(awk -v k="$k:" '$1 == k { print $2 }' <<<"$st") == "$v" ]] || node_fail "/proc/$CPID/status: $(grep "^$k:" <<<"$st") (want $v)"
    done
    [[ $(cat "/proc/$CPID/comm") == virt-hypervisor ]] || node_fail "pid $CPID is $(cat "/proc/$CPID/comm"), not the agent"
    local dir out
    for dir in / /etc /tmp /usr/local/bin /var/lib/kubelet/pods /etc/virt-hypervisor-agent; do
        if out=$(nsenter -t "$CPID" -m -- /bin/sh -c "echo x >'$dir/.vha-write-probe'" 2>&1); then
            node_fail "root in the container can write $dir"
        fi
        grep -q 'Read-only file system' <<<"$out" || node_fail "write to $dir failed, but not with EROFS: $out"
    done
    node_log "agent (host pid $CPID): CapBnd=CapEff=CapPrm=0x2 (cap_dac_override), CapAmb=0, NoNewPrivs=1, Seccomp=2; writes to / /etc /tmp /usr/local/bin, the pods dir and the config fail (EROFS)"
}

check_no_healthcheck() {
    [[ $(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE") == "<nil>" ]] || node_fail "the image has a HEALTHCHECK"
    kill -STOP "$CPID"
    local rc=0
    podman exec "$CTR" virt-hypervisor-agent check-config >/dev/null 2>&1 || rc=$?
    kill -CONT "$CPID"
    ((rc == 0)) || node_fail "check-config failed (exit $rc) against a stopped agent: revisit the HEALTHCHECK decision"
    node_log "no HEALTHCHECK: the former one (check-config) exits 0 while the agent is SIGSTOPped"
}

check_stop() {
    local mark t0 code
    mark=$(log_mark)
    t0=$(now)
    podman stop -t "$GRACE" "$CTR" >/dev/null
    STOP_S=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
    code=$(podman inspect --format '{{.State.ExitCode}}' "$CTR")
    [[ $code == 0 ]] || node_fail "exit code $code after podman stop"
    awk -v s="$STOP_S" -v m="$GRACE" 'BEGIN { exit !(s < m) }' || node_fail "stop took ${STOP_S}s (grace ${GRACE}s: SIGKILL)"
    sleep 0.5
    (($(points "$mark" --metric kubevirt_vmi_hypervisor_info --attr name=vmi-one) > 0)) || node_fail "no final export during stop"
    node_log "podman stop: ${STOP_S}s, exit code 0, final export seen"
}

t_all=$(now)
timed "podman, local base images" images
timed "podman build Containerfile" build_image
timed "image size and packages" inspect_image
timed "OTLP receiver on the host" otlp_receiver_start "$work" "$GRPC_PORT" "$HTTP_PORT"
timed "run like the DaemonSet (launcher 1)" run_container
timed "series of both launchers at the receiver" check_series
timed "privileges of the running container" check_privileges
timed "HEALTHCHECK decision" check_no_healthcheck
timed "podman stop" check_stop
node_log "observed: image ${IMAGE_MB} MB; runtime packages added to the base: ${RUNTIME_PKGS}; stop ${STOP_S}s; receiver: $RECEIVER_KIND"
node_log "PASS in $(since "$t_all")s"
