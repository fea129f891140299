#!/usr/bin/env bash
# A real single-node Kubernetes for the cluster tests (tests/e2e_k8s.rs): etcd, containerd 2.x,
# kube-apiserver, kube-controller-manager, kube-scheduler and kubelet as plain processes on this
# host, all on 127.0.0.1, pods on a CNI bridge (vha0, 10.244.0.0/24, gateway 10.244.0.1 = this
# host as seen from a pod). No kube-proxy and no cluster DNS: pods reach the host by address.
#
#   scripts/k8s-cluster.sh start    start everything (idempotent); prints the state directory
#   scripts/k8s-cluster.sh stop     stop everything it started, by PID, and remove what it made
#
# Binaries: $VHA_K8S_BIN, else scripts/build-k8s.sh (cached). etcd, runc, the CNI plugins from
# Debian (scripts/setup.sh). Images, made without any registry and imported with
# `ctr -n k8s.io images import`:
#   localhost/pause:3.10      the upstream pause.c of the same Kubernetes release, static
#   localhost/vha-node:test   Debian 12 minbase + libvirt daemon + QEMU (launcher pods), plus the
#                             agent binary $VHA_AGENT_BIN as a second layer (the DaemonSet)
# The Debian root and the layer made from it are cached under $VHA_CACHE_DIR/k8s/images, keyed
# by their recipe (tests/deploy/lib-node.sh's cached_root).
#
# State (PKI, configs, logs, PID files): $VHA_K8S_STATE (default /tmp/vha-k8s). The kubelet root
# is the standard /var/lib/kubelet, where the agent's discovery looks.
# Facts behind each setting: the shared environment notes, "A real Kubernetes".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEPLOY_ROOT=$ROOT
# shellcheck source=tests/deploy/lib-node.sh
source "$ROOT/tests/deploy/lib-node.sh"
NODE_CHECK=k8s-cluster.sh
S=${VHA_K8S_STATE:-/tmp/vha-k8s}
P=$S/pki C=$S/conf L=$S/logs R=$S/pids
IMG=$VHA_CACHE_DIR/k8s/images
NODE=${VHA_K8S_NODE:-$(hostname | tr '[:upper:]' '[:lower:]')}
BRIDGE=vha0
SUBNET=10.244.0.0/24
CTRD_SOCK=/run/containerd/containerd.sock
API=https://127.0.0.1:6443

log() { printf 'k8s-cluster.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bins() {
    if [[ -n ${VHA_K8S_BIN:-} ]]; then B=$VHA_K8S_BIN; else B=$(bash "$ROOT/scripts/build-k8s.sh"); fi
    [[ -x $B/kubelet && -x $B/containerd ]] || die "no Kubernetes binaries in $B"
}

# ------------------------------------------------------------------------------------- PKI, configs
pki() {
    [[ -f $P/ca.crt && -f $P/sa.pub ]] && return 0
    mkdir -p "$P"
    (
        cd "$P"
        openssl genrsa -out ca.key 2048 2>/dev/null
        openssl req -x509 -new -nodes -key ca.key -subj /CN=vha-k8s-ca -days 30 -out ca.crt 2>/dev/null
        sign() { # name CN O SAN
            openssl genrsa -out "$1.key" 2048 2>/dev/null
            openssl req -new -key "$1.key" -subj "/CN=$2${3:+/O=$3}" -out "$1.csr" 2>/dev/null
            {
                echo basicConstraints=CA:FALSE
                echo keyUsage=critical,digitalSignature,keyEncipherment
                if [[ -n ${4:-} ]]; then echo extendedKeyUsage=serverAuth,clientAuth; echo "subjectAltName=$4"
                else echo extendedKeyUsage=clientAuth; fi
            } >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
                -extfile "$1.ext" -out "$1.crt" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        sign apiserver kube-apiserver "" "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:$NODE,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
        sign admin kubernetes-admin system:masters
        sign controller-manager system:kube-controller-manager ""
        sign scheduler system:kube-scheduler ""
        sign kubelet "system:node:$NODE" system:nodes "DNS:$NODE,IP:127.0.0.1"
        sign apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    )
}

kubeconfig() { # name cert
    cat >"$C/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vha
  cluster: {server: $API, certificate-authority: $P/ca.crt}
users:
- name: $1
  user: {client-certificate: $P/$2.crt, client-key: $P/$2.key}
contexts:
- name: vha
  context: {cluster: vha, user: $1}
current-context: vha
EOF
}

configs() {
    mkdir -p "$C/cni" "$L" "$R"
    kubeconfig admin admin
    kubeconfig controller-manager controller-manager
    kubeconfig scheduler scheduler
    kubeconfig kubelet kubelet
    cat >"$C/cni/10-vha.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "vha", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "/run/vha-cni-ipam", "ranges": [[{"subnet": "$SUBNET"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
    # containerd 2.x: runc with cgroupfs (no systemd), the local pause image, Debian's CNI plugins.
    # restrict_oom_score_adj: this machine's bounding set lacks CAP_SYS_RESOURCE, so runc cannot
    # write the negative oom_score_adj the kubelet asks for a sandbox.
    cat >"$C/containerd.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "$CTRD_SOCK"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "localhost/pause:3.10"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$C/cni"
    max_conf_num = 1
EOF
    # failCgroupV1/cgroupDriver/failSwapOn: this hybrid-cgroup VM. crashLoopBackOff capped at 1s so
    # a liveness restart is not delayed by the back-off (tests only).
    cat >"$C/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$CTRD_SOCK
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $P/ca.crt}
authorization: {mode: AlwaysAllow}
address: 127.0.0.1
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
staticPodPath: ""
clusterDNS: []
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
crashLoopBackOff: {maxContainerRestartPeriod: 1s}
EOF
}

# ------------------------------------------------------------------------------------- images
# The launcher/agent root: Debian 12 minbase with the libvirt daemon and QEMU (Debian 12's libvirt
# 9.0 packages no virtqemud, so launchers run libvirtd), KubeVirt's qemu user (uid/gid 107), and a
# qemu.conf for a daemon without cgroups, namespaces or a security driver inside a container.
build_k8snode_root() {
    local root=$1
    debootstrap_minbase "$root" "" || return 1
    chroot_apt "$root" libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 || return 1
    chroot "$root" sh -ec '
        groupadd -g 107 qemu && useradd -u 107 -g 107 -d /var/lib/qemu-home -s /usr/sbin/nologin qemu
        getent group kvm >/dev/null || groupadd -r kvm
        getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
        id -u libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
        mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt
        printf "%s\n" "user = \"root\"" "group = \"root\"" "dynamic_ownership = 0" "namespaces = []" \
            "cgroup_controllers = []" "security_driver = \"none\"" "stdio_handler = \"file\"" >>/etc/libvirt/qemu.conf
        : >/etc/machine-id
    '
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
}

images() {
    mkdir -p "$IMG"
    local src hash
    src=$VHA_CACHE_DIR/k8s/gomod/k8s.io/kubernetes@v1.37.2/build/pause/linux/pause.c
    hash=$( (sha256sum "$src" 2>/dev/null; declare -f images) | sha256sum | cut -c1-12)
    if [[ ! -f $IMG/pause-$hash.tar ]]; then
        [[ -f $src ]] || die "pause.c not found at $src (run scripts/build-k8s.sh)"
        local t
        t=$(mktemp -d)
        gcc -Os -static -DVERSION=v3.10-vha -o "$t/pause" "$src"
        strip "$t/pause"
        tar --numeric-owner -C "$t" -cf "$IMG/pause-layer-$hash.tar" pause
        python3 "$ROOT/tests/k8s/mkoci.py" --name localhost/pause:3.10 --out "$IMG/pause-$hash.tar" \
            --layer "$IMG/pause-layer-$hash.tar" --entrypoint '["/pause"]' >/dev/null
        rm -rf "$t"
    fi
    PAUSE_TAR=$IMG/pause-$hash.tar
    local root base
    root=$(cached_root k8snode)
    base=$IMG/$(basename "$root").tar
    if [[ ! -f $base ]]; then
        log "packing $root as an image layer"
        tar --numeric-owner --xattrs -C "$root" --exclude=./.vha-complete -cf "$base.tmp" .
        mv "$base.tmp" "$base"
    fi
    NODE_TAR=
    if [[ -n ${VHA_AGENT_BIN:-} ]]; then
        local t=$S/agent-layer
        rm -rf "$t"
        mkdir -p "$t/usr/local/bin"
        install -m 0755 "$VHA_AGENT_BIN" "$t/usr/local/bin/virt-hypervisor-agent"
        tar --numeric-owner -C "$t" -cf "$S/agent-layer.tar" .
        python3 "$ROOT/tests/k8s/mkoci.py" --name localhost/vha-node:test --out "$S/vha-node.tar" \
            --layer "$base" --layer "$S/agent-layer.tar" \
            --entrypoint '["/usr/local/bin/virt-hypervisor-agent"]' --cmd '["run"]' >/dev/null
        NODE_TAR=$S/vha-node.tar
    fi
}

# ------------------------------------------------------------------------------------- processes
start_proc() { # name cmd...
    local n=$1
    shift
    if [[ -f $R/$n.pid ]] && kill -0 "$(cat "$R/$n.pid")" 2>/dev/null; then return 0; fi
    setsid "$@" >"$L/$n.log" 2>&1 </dev/null &
    echo $! >"$R/$n.pid"
}
wait_for() { # name timeout-seconds cmd...
    local n=$1 limit=$2 t=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        kill -0 "$(cat "$R/$n.pid")" 2>/dev/null || { tail -n 20 "$L/$n.log" >&2; die "$n exited"; }
        ((SECONDS - t < limit)) || { tail -n 20 "$L/$n.log" >&2; die "$n not ready after ${limit}s"; }
        sleep 0.3
    done
}
api_get() { curl -sf --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" "$API$1"; }
node_ready() {
    "$B/kubectl" --kubeconfig "$C/admin.kubeconfig" get node "$NODE" \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

TIMES=()
timed_step() { # name cmd...
    local n=$1 t
    t=$(date +%s.%N)
    shift
    "$@"
    TIMES+=("$(printf '  %-34s %6.1fs' "$n" "$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')")")
}

start() {
    local t0=$SECONDS
    timed_step "binaries (build-k8s.sh)" bins
    for c in etcd runc iptables; do command -v "$c" >/dev/null || die "$c missing (scripts/setup.sh)"; done
    [[ -x /usr/lib/cni/bridge ]] || die "CNI plugins missing (scripts/setup.sh: containernetworking-plugins)"
    mkdir -p "$S" "$L" "$R"
    [[ -f $S/ip_forward.orig ]] || sysctl -n net.ipv4.ip_forward >"$S/ip_forward.orig"
    timed_step "PKI and configs" eval 'pki; configs'
    timed_step "images (cached root)" images
    timed_step "etcd" eval 'start_proc etcd etcd --name vha --data-dir "$S/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster vha=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381;
        wait_for etcd 60 curl -sf http://127.0.0.1:2379/health'
    timed_step "containerd + image import" eval 'start_proc containerd env PATH="$B:/usr/sbin:/usr/bin:/sbin:/bin" "$B/containerd" --config "$C/containerd.toml";
        wait_for containerd 60 "$B/ctr" --address "$CTRD_SOCK" version;
        "$B/ctr" --address "$CTRD_SOCK" -n k8s.io images import "$PAUSE_TAR" >/dev/null;
        if [[ -n $NODE_TAR ]]; then "$B/ctr" --address "$CTRD_SOCK" -n k8s.io images import "$NODE_TAR" >/dev/null; fi'
    timed_step "kube-apiserver" eval 'start_proc kube-apiserver "$B/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=6443 --endpoint-reconciler-type=none \
        --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" --client-ca-file="$P/ca.crt" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
        --service-cluster-ip-range=10.96.0.0/16 --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=Hostname,InternalIP --allow-privileged=true;
        wait_for kube-apiserver 240 api_get /readyz'
    timed_step "controller-manager + scheduler" eval 'start_proc kube-controller-manager "$B/kube-controller-manager" \
        --kubeconfig="$C/controller-manager.kubeconfig" --authentication-kubeconfig="$C/controller-manager.kubeconfig" \
        --authorization-kubeconfig="$C/controller-manager.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false \
        --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" --use-service-account-credentials=true \
        --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key";
        start_proc kube-scheduler "$B/kube-scheduler" --kubeconfig="$C/scheduler.kubeconfig" \
        --authentication-kubeconfig="$C/scheduler.kubeconfig" --authorization-kubeconfig="$C/scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --leader-elect=false;
        wait_for kube-controller-manager 120 curl -skf https://127.0.0.1:10257/healthz;
        wait_for kube-scheduler 120 curl -skf https://127.0.0.1:10259/healthz'
    timed_step "kubelet, node Ready" eval 'start_proc kubelet "$B/kubelet" --config="$C/kubelet.yaml" \
        --kubeconfig="$C/kubelet.kubeconfig" --hostname-override="$NODE";
        wait_for kubelet 120 curl -sf http://127.0.0.1:10248/healthz;
        wait_for kubelet 120 node_ready'
    # Pods are refused until the service account controller made "default".
    timed_step "default service account" wait_for kube-controller-manager 120 api_get /api/v1/namespaces/default/serviceaccounts/default
    printf '%s\n' "${TIMES[@]}" >&2
    log "cluster up in $((SECONDS - t0))s: node $NODE, kubectl --kubeconfig $C/admin.kubeconfig"
    printf '%s\n' "$S"
}

# ------------------------------------------------------------------------------------- stop
stop_pid() { # name
    local n=$1 p
    [[ -f $R/$n.pid ]] || return 0
    p=$(cat "$R/$n.pid")
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$p" 2>/dev/null && { log "$n: SIGKILL"; kill -KILL "$p" 2>/dev/null || true; }
    fi
    rm -f "$R/$n.pid"
}

stop() {
    local t0=$SECONDS K ctr
    B=${VHA_K8S_BIN:-}
    [[ -n $B ]] || B=$(bash "$ROOT/scripts/build-k8s.sh" 2>/dev/null || true)
    K=("$B/kubectl" --kubeconfig "$C/admin.kubeconfig")
    if [[ -f $R/kubelet.pid && -f $R/kube-apiserver.pid ]] && kill -0 "$(cat "$R/kubelet.pid")" 2>/dev/null; then
        "${K[@]}" delete daemonset,deployment --all -A --wait=false >/dev/null 2>&1 || true
        "${K[@]}" delete pod --all -A --grace-period=2 --timeout=60s >/dev/null 2>&1 || true
    fi
    stop_pid kubelet
    ctr=("$B/ctr" --address "$CTRD_SOCK" -n k8s.io)
    if [[ -S $CTRD_SOCK ]]; then
        for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
        sleep 1
        for t in $("${ctr[@]}" tasks ls -q 2>/dev/null); do "${ctr[@]}" tasks delete -f "$t" >/dev/null 2>&1 || true; done
        for c in $("${ctr[@]}" containers ls -q 2>/dev/null); do "${ctr[@]}" containers delete "$c" >/dev/null 2>&1 || true; done
    fi
    # The shims our containerd started, by the PIDs it recorded.
    local shims
    shims=$(cat /run/containerd/io.containerd.runtime.v2.task/*/*/shim.pid 2>/dev/null | sort -u || true)
    stop_pid kube-scheduler
    stop_pid kube-controller-manager
    stop_pid kube-apiserver
    stop_pid etcd
    stop_pid containerd
    for p in $shims; do kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    grep -E ' (/var/lib/kubelet|/run/containerd|/var/lib/containerd|/run/netns)' /proc/self/mountinfo |
        awk '{print $5}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do
        ip netns exec "$ns" ip -o addr 2>/dev/null | grep -q '10\.244\.0\.' && ip netns del "$ns" || true
    done
    [[ -f $S/ip_forward.orig ]] && sysctl -qw "net.ipv4.ip_forward=$(cat "$S/ip_forward.orig")" && rm -f "$S/ip_forward.orig"
    rm -rf /var/lib/kubelet /var/lib/containerd /run/containerd /run/vha-cni-ipam /var/log/pods /var/log/containers \
        "$S/etcd" /var/lib/cni/results/vha-*
    for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice; do
        [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    log "stopped in $((SECONDS - t0))s"
}

case ${1:-} in
start) start ;;
stop) stop ;;
images) mkdir -p "$S" && images ;; # build (or reuse) the cached images only
*) die "usage: $0 start|stop|images" ;;
esac
