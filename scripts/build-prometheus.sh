#!/usr/bin/env bash
# Build Prometheus 3 (cmd/prometheus and cmd/promtool) from the Go module proxy, once; print the
# prometheus binary's path on stdout. Used by the end-to-end tests of the second supported pipeline
# (agent -> Prometheus's own OTLP receiver, --web.enable-otlp-receiver).
#
# The module's go.mod has replace directives, so `go install pkg@version` refuses it: the module is
# downloaded into the module cache and built from a writable copy of its directory.
# Cache: $VHA_CACHE_DIR (default /var/cache/virt-hypervisor-agent-ci)/prometheus/<version>-<go>/.
# The web UI's assets are not built (no npm step): the HTTP API, which the tests use, is complete.
set -euo pipefail
VERSION=${VHA_PROMETHEUS_VERSION:-v0.316.0}
CACHE=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}/prometheus

LOG_TAG=build-prometheus.sh
# shellcheck source=scripts/lib-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-cache.sh"
need_go "Prometheus 3"

build() {
    local out=$1 src
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
    log "downloading github.com/prometheus/prometheus@$VERSION"
    src=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/prometheus/prometheus@$VERSION" |
        sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
    [[ -d $src ]] || { log "ERROR: module directory not found after download"; exit 1; }
    cp -r "$src" "$work/src"
    chmod -R u+w "$work/src"
    log "building prometheus and promtool (first build: several minutes)"
    (cd "$work/src" && GOWORK=off GOFLAGS=-mod=mod go build -o "$work/bin/" ./cmd/prometheus ./cmd/promtool) >"$work/build.log" 2>&1 || {
        tail -n 40 "$work/build.log" >&2
        log "ERROR: go build failed"
        exit 1
    }
    cp "$work/bin/prometheus" "$work/bin/promtool" "$out/"
}

cached_build "$CACHE/$VERSION-$(go_key "$VERSION")" prometheus build
