#!/usr/bin/env bash
# Start or stop the libvirt system daemon (qemu:///system) for the tests, on a host without systemd.
#
#   scripts/libvirtd.sh start   start virtlogd and libvirtd in the background unless a daemon already
#                               answers; wait until `virsh list` works (bounded). Prints one word on
#                               stdout: `started` (stop it when done) or `reused` (leave it alone)
#   scripts/libvirtd.sh stop    stop only what `start` started (PIDs recorded in the state dir)
#   scripts/libvirtd.sh status  print whether the daemon answers and what we started
#
# State dir: $VHA_STATE_DIR (default /tmp/vha-ci). A daemon that was already running is left alone and
# recorded as "not ours", so `stop` never kills somebody else's libvirtd.
set -euo pipefail

URI=qemu:///system
STATE_DIR=${VHA_STATE_DIR:-/tmp/vha-ci}
START_TIMEOUT=${VHA_LIBVIRTD_START_TIMEOUT:-30}
LOG_DIR=/var/log/libvirt
# Test domains are named with this prefix (tests/common/libvirt.rs); leftovers of crashed test runs are
# cleaned on `stop`, and only when we own the daemon.
TEST_DOMAIN_PREFIX=vha-t-

log() { printf 'libvirtd.sh: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }
lists() { timeout 10 virsh -c "$URI" list >/dev/null 2>&1; }

# pid_alive PID NAME: the process exists, is still NAME (guards against a recycled PID) and is not a
# zombie (without an init that reaps, a dead daemon lingers as one).
pid_alive() {
    local pid=$1 name=$2 stat
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# read_pidfile FILE NAME: print the PID in FILE if it names a live NAME process.
read_pidfile() {
    local file=$1 name=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    pid_alive "$pid" "$name" && printf '%s\n' "$pid"
}

fail_start() {
    log "ERROR: $*"
    for f in "$LOG_DIR/libvirtd.log" "$LOG_DIR/virtlogd.log"; do
        if [[ -r $f ]]; then
            log "---- last lines of $f ----"
            tail -n 30 "$f" >&2
        fi
    done
    exit 1
}

start() {
    mkdir -p "$STATE_DIR"
    if answers; then
        # Keep the record of an earlier `start` of ours (so its `stop` still works); otherwise record that
        # the running daemon is somebody else's.
        if [[ -s $STATE_DIR/started ]] && recorded_alive; then
            log "libvirtd started earlier by this script answers on $URI: reusing it"
        else
            log "a libvirt daemon already answers on $URI: using it, not starting one"
            : >"$STATE_DIR/started"
        fi
        echo reused
        return 0
    fi
    command -v libvirtd >/dev/null || die "libvirtd not installed: run scripts/setup.sh first"
    [[ $(id -u) -eq 0 ]] || die "starting the system daemon needs root"
    mkdir -p "$LOG_DIR/qemu" /var/run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt
    : >"$STATE_DIR/started"

    # Without systemd/journald the daemons would log to nowhere: send them to files.
    local pid
    if pid=$(read_pidfile /run/virtlogd.pid virtlogd); then
        log "virtlogd already running (pid $pid): not ours"
    else
        rm -f /run/virtlogd.pid
        LIBVIRT_LOG_OUTPUTS="3:file:$LOG_DIR/virtlogd.log" virtlogd -d ||
            fail_start "virtlogd -d failed"
        pid=$(wait_pidfile /run/virtlogd.pid virtlogd) || fail_start "virtlogd did not write /run/virtlogd.pid"
        printf 'virtlogd %s\n' "$pid" >>"$STATE_DIR/started"
        log "started virtlogd (pid $pid)"
    fi

    if pid=$(read_pidfile /run/libvirtd.pid libvirtd); then
        fail_start "libvirtd runs (pid $pid) but does not answer on $URI"
    fi
    rm -f /run/libvirtd.pid
    LIBVIRT_LOG_OUTPUTS="3:file:$LOG_DIR/libvirtd.log" libvirtd -d || fail_start "libvirtd -d failed"
    pid=$(wait_pidfile /run/libvirtd.pid libvirtd) || fail_start "libvirtd did not write /run/libvirtd.pid"
    printf 'libvirtd %s\n' "$pid" >>"$STATE_DIR/started"
    log "started libvirtd (pid $pid), waiting for $URI"

    local start=$SECONDS
    until lists; do
        pid_alive "$pid" libvirtd || fail_start "libvirtd (pid $pid) exited during startup"
        ((SECONDS - start < START_TIMEOUT)) ||
            fail_start "libvirtd did not answer 'virsh -c $URI list' within ${START_TIMEOUT}s"
        sleep 0.2
    done
    log "libvirtd answers on $URI after $((SECONDS - start))s"
    # QEMU outlives libvirtd: domains of a test run that was killed come back with the daemon. Nobody
    # else was using this daemon (it did not answer), so removing them now is safe.
    cleanup_test_domains
    echo started
}

recorded_alive() {
    local name pid
    while read -r name pid; do
        pid_alive "$pid" "$name" || return 1
    done <"$STATE_DIR/started"
}

# wait_pidfile FILE NAME: the daemons write their pid file right after forking; wait up to 10 s.
wait_pidfile() {
    local file=$1 name=$2 i
    for ((i = 0; i < 100; i++)); do
        read_pidfile "$file" "$name" && return 0
        sleep 0.1
    done
    return 1
}

cleanup_test_domains() {
    local name
    while read -r name; do
        [[ $name == "$TEST_DOMAIN_PREFIX"* ]] || continue
        log "removing leftover test domain $name"
        timeout 30 virsh -c "$URI" destroy "$name" >/dev/null 2>&1 || true
        timeout 30 virsh -c "$URI" undefine "$name" >/dev/null 2>&1 || true
    done < <(timeout 10 virsh -c "$URI" list --all --name 2>/dev/null || true)
}

stop() {
    local file=$STATE_DIR/started
    if [[ ! -e $file ]]; then
        log "nothing recorded in $file: nothing to stop"
        return 0
    fi
    if [[ ! -s $file ]]; then
        log "the daemon was not started by us: leaving it running"
        rm -f "$file"
        return 0
    fi
    cleanup_test_domains
    # Stop in reverse start order: libvirtd first, then virtlogd.
    local name pid i
    while read -r name pid; do
        if ! pid_alive "$pid" "$name"; then
            log "$name (pid $pid) already gone"
            continue
        fi
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" "$name" || break
            sleep 0.1
        done
        if pid_alive "$pid" "$name"; then
            log "$name (pid $pid) ignored SIGTERM for 10s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    done < <(tac "$file")
    rm -f "$file"
}

status() {
    if answers; then log "$URI answers"; else log "$URI does not answer"; fi
    if [[ -s $STATE_DIR/started ]]; then
        log "started by us: $(tr '\n' ' ' <"$STATE_DIR/started")"
    elif [[ -e $STATE_DIR/started ]]; then
        log "the running daemon is not ours"
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start|stop|status" ;;
esac
