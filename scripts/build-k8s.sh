#!/usr/bin/env bash
# Build the single-node Kubernetes of the cluster tests (tests/e2e_k8s.rs, scripts/k8s-cluster.sh) once,
# from the Go module proxy alone; print the binaries' directory on stdout.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl  k8s.io/kubernetes@$VHA_K8S_VERSION
#   containerd, containerd-shim-runc-v2, ctr  github.com/containerd/containerd/v2@$VHA_CONTAINERD_VERSION
#
# containerd 2.x is built because Debian 12's containerd 1.6 rejects `recursiveReadOnly` mounts, which
# deploy/kubernetes/daemonset.yaml uses. etcd, runc and the CNI plugins come from Debian (scripts/setup.sh).
#
# k8s.io/kubernetes's go.mod replaces its 33 k8s.io/* staging modules with ./staging/..., which the
# module zip does not contain: the module directory is copied out of the (read-only) module cache and
# each replace is rewritten to the published staging module of the same release (v1.X.Y -> v0.X.Y).
#
# Cache: $VHA_CACHE_DIR (default /var/cache/virt-hypervisor-agent-ci)/k8s/<version>-<key>/, key = the
# Kubernetes and containerd versions and `go version`. The Go module and build caches of these builds
# live under the same directory (gomod/, gocache/), so an empty cache directory really means a cold
# build (about 10 minutes of wall time on 2 cores) and a version bump of one component rebuilds little.
set -euo pipefail
K8S_VERSION=${VHA_K8S_VERSION:-v1.37.2}
CTRD_VERSION=${VHA_CONTAINERD_VERSION:-v2.4.2}
ROOT=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}/k8s

log() { printf 'build-k8s.sh: %s\n' "$*" >&2; }
command -v go >/dev/null || { log "ERROR: go not found (Kubernetes is built from the Go module proxy)"; exit 1; }

key=$(printf '%s %s %s' "$K8S_VERSION" "$CTRD_VERSION" "$(go version)" | sha256sum | cut -c1-16)
dir=$ROOT/$K8S_VERSION-$key
want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl containerd containerd-shim-runc-v2 ctr)
complete() { local b; for b in "${want[@]}"; do [[ -x $1/$b ]] || return 1; done; }

if complete "$dir"; then
    log "cached: $dir"
    printf '%s\n' "$dir"
    exit 0
fi

export GOMODCACHE=$ROOT/gomod GOCACHE=$ROOT/gocache GOPATH=$ROOT/gopath
export GOWORK=off GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
mkdir -p "$ROOT"
t0=$SECONDS
work=$(mktemp -d "$ROOT/build.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/bin"

# --- Kubernetes ---------------------------------------------------------------------------------
staging=v0.${K8S_VERSION#v1.}
log "downloading k8s.io/kubernetes@$K8S_VERSION"
src=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
[[ -d $src ]] || { log "ERROR: module directory not found after download"; exit 1; }
cp -r "$src" "$work/src"
chmod -R u+w "$work/src"
args=()
for m in $(sed -n 's#^\s*\(k8s.io/[^ ]*\) => ./staging/.*#\1#p' "$work/src/go.mod"); do
    args+=("-dropreplace=$m" "-replace=$m=$m@$staging")
done
[[ ${#args[@]} -gt 0 ]] || { log "ERROR: no staging replace directives found in go.mod"; exit 1; }
log "rewriting $((${#args[@]} / 2)) staging replace directives to @$staging"
(cd "$work/src" && go mod edit "${args[@]}")

minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld="$ld -X $p.buildDate=1970-01-01T00:00:00Z"
done
log "building Kubernetes $K8S_VERSION (cold: 8-12 minutes, 2.5 GB peak memory)"
t=$SECONDS
(cd "$work/src" && go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags="$ld" -o "$work/bin/" \
    ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler ./cmd/kubelet ./cmd/kubectl) \
    >"$work/k8s.log" 2>&1 || {
    tail -n 40 "$work/k8s.log" >&2
    log "ERROR: go build of Kubernetes failed"
    exit 1
}
log "Kubernetes built in $((SECONDS - t))s"

# --- containerd (its go.mod has no replace directives: go install pkg@version works) --------------
pkg=github.com/containerd/containerd/v2
log "building containerd $CTRD_VERSION"
t=$SECONDS
(cd "$work" && GOBIN=$work/bin go install -trimpath -tags=no_btrfs,osusergo,netgo \
    -ldflags="-s -w -X $pkg/version.Version=$CTRD_VERSION -X $pkg/version.Package=$pkg" \
    "$pkg/cmd/containerd@$CTRD_VERSION" "$pkg/cmd/containerd-shim-runc-v2@$CTRD_VERSION" \
    "$pkg/cmd/ctr@$CTRD_VERSION") >"$work/containerd.log" 2>&1 || {
    tail -n 40 "$work/containerd.log" >&2
    log "ERROR: go install of containerd failed"
    exit 1
}
log "containerd built in $((SECONDS - t))s"

complete "$work/bin" || { log "ERROR: a binary is missing from $work/bin"; exit 1; }
rm -rf "$dir.tmp" "$dir"
cp -r "$work/bin" "$dir.tmp"
mv "$dir.tmp" "$dir"
log "built $dir in $((SECONDS - t0))s (cold build time)"
printf '%s\n' "$dir"
