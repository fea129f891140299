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

# The user's side of the pipeline, built from the Go module proxy and cached under $VHA_CACHE_DIR
# (default /var/cache/virt-hypervisor-agent-ci): the minimal collector of otel/builder-config.yaml
# (also validating the shipped otel/collector.yaml) and Prometheus 3 (OTLP receiver). The PromQL
# end-to-end tests (tests/e2e_prometheus.rs) take them from these variables.
build_collector() {
    VHA_OTELCOL_BIN=$(bash scripts/build-collector.sh --validate)
    export VHA_OTELCOL_BIN
}
build_prometheus3() {
    VHA_PROMETHEUS3_BIN=$(bash scripts/build-prometheus.sh)
    export VHA_PROMETHEUS3_BIN
}
# The single-node Kubernetes of tests/e2e_k8s.rs (the DaemonSet on a real kubelet): kubelet,
# control plane, kubectl and containerd 2.x built from the Go module proxy, cached under
# $VHA_CACHE_DIR/k8s (a cold build is about 10 minutes on 2 cores). The test starts and stops the
# cluster itself through scripts/k8s-cluster.sh.
build_k8s() {
    VHA_K8S_BIN=$(nice -n 10 bash scripts/build-k8s.sh)
    export VHA_K8S_BIN
}
# Helm, for the chart's checks (tests/deploy/check-helm.sh) and its install, upgrade and uninstall
# on the test cluster (tests/e2e_k8s.rs): built from the Go module proxy, cached.
build_helm() {
    VHA_HELM_BIN=$(nice -n 10 bash scripts/build-helm.sh)
    export VHA_HELM_BIN
}
step "collector: ocb build (cached) + validate otel/collector.yaml" build_collector
step "Prometheus 3: build from the Go module proxy (cached)" build_prometheus3
step "Kubernetes: build (cached)" build_k8s
step "Helm: build from the Go module proxy (cached)" build_helm

step "dependencies build with rust-version (scripts/check-msrv.sh)" bash scripts/check-msrv.sh
step "cargo fmt --check" cargo fmt --all --check
step "cargo clippy --all-targets -- -D warnings" cargo clippy --all-targets -- -D warnings
# Keep a copy of the output to count the tests for the closing line.
CARGO_TEST_LOG=$STATE_DIR/cargo-test.log
run_cargo_test() { cargo test --all-targets 2>&1 | tee "$CARGO_TEST_LOG"; }
step "cargo test --all-targets" run_cargo_test

if [[ -f tests/deploy/run-all.sh ]]; then
    step "deployment checks (tests/deploy/run-all.sh)" bash tests/deploy/run-all.sh
else
    printf '\n==> test.sh: tests/deploy/run-all.sh not present: skipped\n' >&2
fi
current="stop libvirtd"
# Stop here rather than in the exit trap, so the summary below is the last thing printed.
if [[ $LIBVIRTD_STARTED == started ]]; then
    bash scripts/libvirtd.sh stop
    LIBVIRTD_STARTED=stopped
fi
current="summary"

if [[ -s $VHA_E2E_REPORT ]]; then
    printf '\nEnd-to-end latencies (libvirt command returned -> OTLP receiver or PromQL saw the change):\n'
    cat "$VHA_E2E_REPORT"
fi
printf '\nSteps:\n'
for i in "${!step_names[@]}"; do
    printf '  %-55s %4ss\n' "${step_names[$i]}" "${step_secs[$i]}"
done
printf 'test.sh: all %d steps passed in %ds\n' "${#step_names[@]}" "$((SECONDS - started_at))"
# Closing line in the plain "N passed, N failed, N skipped" form, summed over every cargo test binary
# (skipped = #[ignore]d; e2e tests cannot skip here since VHA_E2E_REQUIRED=1).
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed;?$/) p += $(i - 1)
            if ($(i) ~ /^failed;?$/) f += $(i - 1)
            if ($(i) ~ /^ignored;?$/) s += $(i - 1)
        }
    }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$CARGO_TEST_LOG"
