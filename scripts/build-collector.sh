#!/usr/bin/env bash
# Build the minimal OpenTelemetry Collector of otel/builder-config.yaml with the OpenTelemetry
# Collector Builder (ocb), from the Go module proxy, once; print the binary's path on stdout.
#
#   scripts/build-collector.sh            build unless cached, print the path
#   scripts/build-collector.sh --validate also run `otelcol-vha validate` on both shipped profiles
#
# Cache: $VHA_CACHE_DIR (default /var/cache/virt-hypervisor-agent-ci)/otelcol/<key>/otelcol-vha, where
# the key hashes the manifest, the local filter processor's sources (otel/vhafilterprocessor) and the
# Go version: a change to either builds anew, anything else reuses.
# --validate checks both shipped profiles: otel/collector.yaml (production: TLS, allowlist, remote
# write over TLS with an Authorization header) and otel/collector-dev.yaml (plaintext, trusted
# networks only); validate checks the configuration, it does not read the certificate files.
# Needs Go (1.24+) and the module proxy; the first build takes several minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MANIFEST=$ROOT/otel/builder-config.yaml
OCB_VERSION=v0.165.0
CACHE=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}/otelcol

LOG_TAG=build-collector.sh
# shellcheck source=scripts/lib-cache.sh
source "$ROOT/scripts/lib-cache.sh"
need_go "the collector"

build() {
    local out=$1
    work=$(mktemp -d "$CACHE/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    log "installing ocb $OCB_VERSION"
    GOBIN=$CACHE/bin go install "go.opentelemetry.io/collector/cmd/builder@$OCB_VERSION"
    # Same manifest, output into the scratch dir (ocb takes output_path from the manifest only).
    sed "s#^\(\s*output_path:\).*#\1 $work/out#" "$MANIFEST" >"$work/manifest.yaml"
    log "building the collector (first build: several minutes)"
    # From the root: the manifest's local `path:` entries are relative to the working directory.
    (cd "$ROOT" && "$CACHE/bin/builder" --config="$work/manifest.yaml") >"$work/ocb.log" 2>&1 || {
        tail -n 40 "$work/ocb.log" >&2
        log "ERROR: ocb failed"
        exit 1
    }
    cp "$work/out/otelcol-vha" "$out/otelcol-vha"
}

FILTER=$ROOT/otel/vhafilterprocessor
key=$( (cat "$MANIFEST"; find "$FILTER" -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | LC_ALL=C sort | xargs cat
    echo "$OCB_VERSION"; go version) | sha256sum | cut -c1-16)
bin=$(cached_build "$CACHE/$key" otelcol-vha build)
if [[ ${1:-} == --validate ]]; then
    # The production profile's one setting without a default: a placeholder (validate sends nothing).
    PROMETHEUS_REMOTE_WRITE_AUTHORIZATION="Basic placeholder" \
        "$bin" validate --config="$ROOT/otel/collector.yaml" >&2
    "$bin" validate --config="$ROOT/otel/collector-dev.yaml" >&2
    log "otel/collector.yaml and otel/collector-dev.yaml are valid for $("$bin" --version 2>/dev/null | head -n1)"
fi
printf '%s\n' "$bin"
