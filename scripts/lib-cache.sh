# Shared by the scripts that build a tool once and keep it under $VHA_CACHE_DIR (build-helm.sh,
# build-prometheus.sh, build-collector.sh). Source it, set LOG_TAG, then call cached_build.
#
# cached_build DIR NAME BUILD: print DIR/NAME's path; when it is not there yet, run BUILD with a
# scratch directory as its one argument (BUILD leaves NAME, and whatever belongs with it, in that
# directory), then move the scratch directory to DIR in one rename, so a build that fails or is
# interrupted never leaves a half-built DIR behind. Times the build.

log() { printf '%s: %s\n' "${LOG_TAG:-build}" "$*" >&2; }

# need_go WHAT: stop with an error naming WHAT when there is no Go toolchain.
need_go() {
    command -v go >/dev/null || { log "ERROR: go not found ($1 is built from the Go module proxy)"; exit 1; }
}

# go_key VERSION: a short cache key for VERSION built with this Go toolchain.
go_key() { printf '%s %s' "$1" "$(go version)" | sha256sum | cut -c1-16; }

cached_build() {
    local dir=$1 name=$2 build=$3 t
    if [[ -x $dir/$name ]]; then
        log "cached: $dir/$name"
    else
        mkdir -p "$(dirname "$dir")"
        t=$SECONDS
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        "$build" "$dir.tmp"
        [[ -x $dir.tmp/$name ]] || { log "ERROR: the build left no $name"; exit 1; }
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
        log "built $dir/$name in $((SECONDS - t))s"
    fi
    printf '%s\n' "$dir/$name"
}
