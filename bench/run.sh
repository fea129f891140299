#!/usr/bin/env bash
# The benchmarks of BENCHMARKS.md in one command: prints the tables and writes bench/out/results.md (the
# generated part of BENCHMARKS.md) and docs/idle-cpu-vs-n.svg.
#
#   bash bench/run.sh            full run (about 35 minutes; needs root, ~4.5 GiB free RAM)
#   bash bench/run.sh --write    same, then replace the generated section of BENCHMARKS.md
#   bash bench/run.sh --quick    a few minutes, tiny sizes: checks the machinery, numbers meaningless
#   bash bench/run.sh --report   only rebuild the tables from the last results in bench/out
#   bash bench/run.sh --promql   only the PromQL benchmarks (about 8 minutes): visibility
#                                of starts/stops through collector -> Prometheus 2.42, Prometheus 3 OTLP
#                                and the peer; fleet cost (bytes, requests, collector CPU per agent).
#                                Prints the tables, writes bench/out/promql-visibility.json and
#                                fleet-cost.json (bench/bench_promql.rs).
#   bash bench/run.sh --kubevirt only the KubeVirt-scale benchmark (bench/scale_kubevirt.rs,
#                                bench/kubevirt-scale.md): 50 session-daemon pods watched by one
#                                agent; VHA_SCALE_PODS and VHA_SCALE_CYCLES change its size.
#
# Environment (optional): BENCH_SIZES (idle N list, default 10,50,100), BENCH_IDLE_SECS (60),
# BENCH_TRANSITIONS (100), BENCH_PEER_TRANSITIONS (50), BENCH_SCRAPE_SECS (15), BENCH_SYNC_RUNS (5),
# BENCH_SCALE_SIZES (0,100,1000,10000), BENCH_OUT (bench/out), BENCH_DAEMON (private or system).
#
# What it does: installs what is missing (scripts/setup.sh, the peer prometheus-libvirt-exporter,
# curl), builds the agent in release mode, runs the parser criterion bench, the simulated scale bench
# and the live bench (bench/suite.rs), then the report. Nothing here asserts on time. The idle
# windows also measure the floor of any event-driven client, `virsh event --all --loop`.
#
# The live bench runs against a private libvirt daemon by default (BENCH_DAEMON=private): a session
# libvirtd of its own, as user vha-launcher (created when missing; the tests' session daemons use it too), stopped at the end. On a shared
# machine other people's tests make the system daemon busy, and that noise is larger than the
# agent's whole idle cost. BENCH_DAEMON=system uses qemu:///system instead (started by
# scripts/libvirtd.sh unless one answers, stopped at the end only if started here). Its domains are
# named vha-b-<pid>_* and removed at the end, also on Ctrl-C.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
MODE=full
WRITE=0
for arg in "$@"; do
    case $arg in
    --quick) MODE=quick ;;
    --write) WRITE=1 ;;
    --report) MODE=report ;;
    --promql) MODE=promql ;;
    --kubevirt) MODE=kubevirt ;;
    -h | --help)
        sed -n '2,/^[^#]/{/^#/p}' "$0"
        exit 0
        ;;
    *)
        echo "run.sh: unknown argument $arg" >&2
        exit 2
        ;;
    esac
done

OUT=${BENCH_OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
log() { printf '\n==> bench: %s\n' "$*" >&2; }

if [[ $MODE == quick ]]; then
    : "${BENCH_SIZES:=2,4}" "${BENCH_IDLE_SECS:=5}" "${BENCH_TRANSITIONS:=6}" "${BENCH_PEER_TRANSITIONS:=4}"
    : "${BENCH_SCRAPE_SECS:=3}" "${BENCH_SYNC_RUNS:=1}" "${BENCH_SCALE_SIZES:=0,100,1000}"
    PARSER_ARGS=(--warm-up-time 0.5 --measurement-time 1)
    COLLECTIONS=20
else
    PARSER_ARGS=(--warm-up-time 1 --measurement-time 3)
    COLLECTIONS=200
fi
SIZES=${BENCH_SIZES:-10,50,100}
IDLE_SECS=${BENCH_IDLE_SECS:-60}
TRANSITIONS=${BENCH_TRANSITIONS:-100}
PEER_TRANSITIONS=${BENCH_PEER_TRANSITIONS:-50}
SCRAPE_SECS=${BENCH_SCRAPE_SECS:-15}
SYNC_RUNS=${BENCH_SYNC_RUNS:-5}
SCALE_SIZES=${BENCH_SCALE_SIZES:-0,100,1000,10000}
DAEMON=${BENCH_DAEMON:-private}
case $DAEMON in
private) URI=private ;;
system) URI=qemu:///system ;;
*)
    echo "run.sh: BENCH_DAEMON must be private or system" >&2
    exit 2
    ;;
esac
COMMAND="bash bench/run.sh"
[[ $WRITE == 0 ]] || COMMAND+=" --write"
[[ $MODE != quick ]] || COMMAND+=" --quick"

suite() { cargo bench -q --bench suite -- "$@"; }

report() {
    local since=()
    [[ -s $OUT/started-at ]] && since=(--since "$(cat "$OUT/started-at")")
    suite report --out "$OUT" --criterion "${CARGO_TARGET_DIR:-$ROOT/target}/criterion" \
        --svg "$ROOT/docs/idle-cpu-vs-n.svg" --command "$COMMAND" "${since[@]}"
}

splice() {
    # Replace what lies between the two markers of BENCHMARKS.md with results.md.
    local md=$ROOT/BENCHMARKS.md begin='<!-- bench:results:begin -->' end='<!-- bench:results:end -->'
    if ! grep -qF "$begin" "$md" 2>/dev/null || ! grep -qF "$end" "$md"; then
        echo "run.sh: $md lacks the markers $begin / $end: not written" >&2
        return 1
    fi
    awk -v b="$begin" -v e="$end" -v f="$OUT/results.md" '
        $0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
        $0 == e { skip = 0 }
        !skip { print }' "$md" >"$md.tmp"
    mv "$md.tmp" "$md"
    log "wrote the results into BENCHMARKS.md"
}

if [[ $MODE == report ]]; then
    report
    [[ $WRITE == 1 ]] && splice
    exit 0
fi

[[ $(id -u) -eq 0 ]] || { echo "run.sh: needs root (system libvirtd, packages)" >&2; exit 1; }

log "packages"
bash scripts/setup.sh

if [[ $MODE == kubevirt ]]; then
    # The pods' session daemons and the agent are started by the test itself and stopped by PID.
    log "KubeVirt scale: cargo test --release --bench scale_kubevirt -- --ignored --nocapture"
    cargo test --release -q --bench scale_kubevirt -- --ignored --nocapture
    exit 0
fi

need=()
for pkg in prometheus-libvirt-exporter curl; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] || need+=("$pkg")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    # Keep the peer's maintainer script from starting it as a service.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [[ $MODE == promql ]]; then
    # Private session daemon, collector and both Prometheus versions are started by the test itself
    # (and stopped by PID); one test at a time so that the two benchmarks never share the CPU.
    log "PromQL benchmarks: cargo test --release --bench bench_promql -- --ignored --nocapture --test-threads=1"
    VHA_BENCH_OUT=$OUT cargo test --release -q --bench bench_promql -- --ignored --nocapture --test-threads=1
    exit 0
fi

LIBVIRTD=none
if [[ $DAEMON == system ]]; then
    export VHA_STATE_DIR=${VHA_BENCH_STATE_DIR:-/tmp/vha-bench}
    LIBVIRTD=$(bash scripts/libvirtd.sh start)
fi
on_exit() {
    local rc=$?
    if [[ $LIBVIRTD == started ]]; then
        bash "$ROOT/scripts/libvirtd.sh" stop || true
    fi
    exit "$rc"
}
trap on_exit EXIT

date +%s >"$OUT/started-at"
rm -f "$OUT/live.json" "$OUT/scale.json" "$OUT/build.json"

log "cargo build --release (the agent) and the bench binaries"
cargo build --release -q
# Run a private copy: the shared target directory may be rebuilt by someone else meanwhile.
cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/virt-hypervisor-agent" "$OUT/virt-hypervisor-agent"
# What was built (others may commit while this runs): commit, uncommitted source files, time.
dirty=$(git status --porcelain -- src Cargo.toml | awk '{print $NF}' | paste -sd, -)
printf '{"git": "%s%s", "date_utc": "%s"}\n' "$(git rev-parse --short HEAD)" \
    "${dirty:+ + uncommitted changes in $dirty}" "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$OUT/build.json"
cargo bench -q --bench suite --no-run

log "parser (criterion): cargo bench --bench parser -- ${PARSER_ARGS[*]}"
cargo bench -q --bench parser -- "${PARSER_ARGS[@]}" 2>&1 | grep -E '^[a-z].*/|time:' || true

log "scale (simulated): sizes $SCALE_SIZES"
suite scale-all --out "$OUT" --sizes "$SCALE_SIZES" --collections "$COLLECTIONS"

log "live ($DAEMON libvirt daemon): sizes $SIZES, ${IDLE_SECS}s windows"
suite live --uri "$URI" --agent-bin "$OUT/virt-hypervisor-agent" --out "$OUT" --sizes "$SIZES" \
    --idle-secs "$IDLE_SECS" --transitions "$TRANSITIONS" --peer-transitions "$PEER_TRANSITIONS" \
    --scrape-secs "$SCRAPE_SECS" --sync-runs "$SYNC_RUNS"

log "report"
report
[[ $WRITE == 1 ]] && splice
exit 0
