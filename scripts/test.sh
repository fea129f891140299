#!/usr/bin/env bash
# Run all tests: install what is needed, start libvirtd, then format check, clippy, the cargo test suite
# (unit, integration and end-to-end tests against the real libvirtd + QEMU) and the deployment checks.
#
# Environment:
#   VHA_SKIP_SETUP=1    do not run scripts/setup.sh (packages and qemu.conf already in place)
#   VHA_E2E_REQUIRED    exported as 1 unless set: e2e tests FAIL (not skip) when libvirtd is missing
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
STATE_DIR=${VHA_STATE_DIR:-/tmp/vha-ci}
export VHA_STATE_DIR=$STATE_DIR
mkdir -p "$STATE_DIR"

step_names=()
step_secs=()
current=""
started_at=$SECONDS

on_exit() {
    local rc=$?
    if [[ ${LIBVIRTD_STARTED:-} == started ]]; then
        bash "$ROOT/scripts/libvirtd.sh" stop || true
    fi
    if ((rc != 0)); then
        printf '\ntest.sh: FAILED at step "%s" (exit %d) after %ds\n' "$current" "$rc" "$((SECONDS - started_at))" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT

# step NAME CMD...: run one step, fail fast, remember its duration.
step() {
    current=$1
    shift
    printf '\n==> test.sh: %s\n' "$current" >&2
    local t=$SECONDS
    "$@"
    step_names+=("$current")
    step_secs+=("$((SECONDS - t))")
}

if [[ ${VHA_SKIP_SETUP:-} != 1 ]]; then
    step "setup (packages, libvirt users, qemu.conf)" bash scripts/setup.sh
fi

current="start libvirtd"
printf '\n==> test.sh: %s\n' "$current" >&2
if ! LIBVIRTD_STARTED=$(bash scripts/libvirtd.sh start); then
    # A failed start only records what it started itself: let the exit trap stop that.
    LIBVIRTD_STARTED=started
    exit 1
fi
step_names+=("libvirtd ($LIBVIRTD_STARTED)")
step_secs+=(0)

export VHA_E2E_REQUIRED=${VHA_E2E_REQUIRED:-1}
# The e2e tests append their latency table here; printed in the summary.
export VHA_E2E_REPORT=$STATE_DIR/e2e-latency.txt
rm -f "$VHA_E2E_REPORT"

step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy --all-targets -- -D warnings" cargo clippy --all-targets -- -D warnings
step "cargo test --all-targets" cargo test --all-targets

if [[ -f tests/deploy/run-all.sh ]]; then
    step "deployment checks (tests/deploy/run-all.sh)" bash tests/deploy/run-all.sh
else
    printf '\n==> test.sh: tests/deploy/run-all.sh not present: skipped\n' >&2
fi
current="summary"

if [[ -s $VHA_E2E_REPORT ]]; then
    printf '\nEnd-to-end latencies (libvirt command returned -> OTLP receiver saw the change):\n'
    cat "$VHA_E2E_REPORT"
fi
printf '\nSteps:\n'
for i in "${!step_names[@]}"; do
    printf '  %-55s %4ss\n' "${step_names[$i]}" "${step_secs[$i]}"
done
printf 'test.sh: all %d steps passed in %ds\n' "${#step_names[@]}" "$((SECONDS - started_at))"
