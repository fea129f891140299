#!/usr/bin/env bash
# Run every deployment check; exit non-zero if any fails. Last line: "deploy: N passed, M failed".
#   tests/deploy/run-all.sh               all checks
#   tests/deploy/run-all.sh check-podman  only the named ones
# Static checks of the files (no root needed):
#   check-systemd check-prometheus check-k8s check-helm check-container
# The artefacts built and run for real (root; see each script's header):
#   check-package  the .deb (scripts/package.sh, cargo-deb)
#   check-nspawn   the .deb installed and driven under systemd as PID 1 in systemd-nspawn
#   check-podman   the Containerfile built with podman and run like the DaemonSet
# Each check installs what it needs on first use (Debian packages with apt-get, PyPI tools in a venv,
# cargo-deb from crates.io) and caches slow things under $VHA_CACHE_DIR (see lib-node.sh). Each
# check prints its own step times; this script prints each check's total.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

checks=(check-systemd check-prometheus check-k8s check-helm check-container check-package check-nspawn check-podman)
(($# > 0)) && checks=("$@")
passed=0 failed=0 failed_names=() times=()
for c in "${checks[@]}"; do
    echo "=== $c"
    t=$SECONDS
    if bash "$here/$c.sh"; then
        passed=$((passed + 1))
        times+=("$(printf '  %-18s %5ss' "$c" "$((SECONDS - t))")")
    else
        failed=$((failed + 1))
        failed_names+=("$c")
        times+=("$(printf '  %-18s %5ss  FAILED' "$c" "$((SECONDS - t))")")
        echo "=== $c: FAILED" >&2
    fi
done
echo "deploy: check times"
printf '%s\n' "${times[@]}"
if ((failed > 0)); then
    echo "failed: ${failed_names[*]}" >&2
fi
echo "deploy: $passed passed, $failed failed"
((failed == 0))
