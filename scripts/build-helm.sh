#!/usr/bin/env bash
# Build Helm (helm.sh/helm/v3) from the Go module proxy, once; print the binary's path on stdout.
# Used by tests/deploy/check-helm.sh (lint, template, schema) and the chart's end-to-end test.
# Cache: $VHA_CACHE_DIR (default /var/cache/virt-hypervisor-agent-ci)/helm/<version>-<go>/helm,
# with its Go module and build caches beside it (a cold CI is really cold, a warm one is instant).
set -euo pipefail
VERSION=${VHA_HELM_VERSION:-v3.22.0}
CACHE=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}/helm

LOG_TAG=build-helm.sh
# shellcheck source=scripts/lib-cache.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-cache.sh"
need_go Helm

build() {
    log "building helm $VERSION (cold: a few minutes)"
    # Helm's go.mod has no replace directives: go install pkg@version works.
    GOBIN=$1 GOMODCACHE=$CACHE/gomod GOCACHE=$CACHE/gocache GOFLAGS=-buildvcs=false \
        CGO_ENABLED=0 go install -trimpath "helm.sh/helm/v3/cmd/helm@$VERSION" >&2
}

cached_build "$CACHE/$VERSION-$(go_key "$VERSION")" helm build
