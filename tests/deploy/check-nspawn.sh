#!/usr/bin/env bash
# The Debian package and its systemd unit on a real systemd: boot a Debian 12 root with systemd as
# PID 1 in systemd-nspawn, install the .deb with apt, and check what the unit promises, against a
# real libvirtd and a KubeVirt-style launcher daemon inside the container and a real OTLP receiver
# on the host (the container shares the host's network):
#
#   1. apt install ./virt-hypervisor-agent_<v>-1_<arch>.deb enables and starts the unit; it becomes
#      active only after the first sync (READY=1 follows "initial sync done" in the journal; the
#      time from exec to active is printed);
#   2. the series of both connections reach the receiver: a TCG domain of the container's
#      qemu:///system and a KubeVirt VMI of a session daemon running as uid 107 (qemu) whose socket,
#      mode 0700, is bind-mounted at /var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/
#      libvirt-runtime/ (like a launcher's emptyDir);
#   3. the running process has exactly the unit's privileges (/proc/<pid>/status: bounding,
#      effective and permitted sets = CAP_DAC_OVERRIDE, no ambient, NoNewPrivs, seccomp filter) and
#      cannot write the file system (writes through nsenter into its mount namespace fail with EROFS,
#      except its private /tmp); it reads its config and reaches the uid-107 socket (item 2);
#   4. watchdog: SIGSTOP the agent -> systemd kills it after WatchdogSec, restarts it, NRestarts
#      grows, the series come back (time from SIGSTOP to active again is printed);
#   5. systemctl stop -> exit status 0 within TimeoutStopSec and a final export at the receiver;
#      and again with the receiver gone (the final export fails, the stop must not hang);
#   6. an unknown key edited into /etc/virt-hypervisor-agent/config.yaml -> the start fails and
#      `journalctl -u` names the key; with the file fixed, the unit starts again;
#   6b. systemctl reload (SIGHUP): an invalid file is refused (journal names the key) and the unit
#      keeps running; a valid one that swaps qemu:///system for test:///default drops the TCG
#      domain's series and brings the test driver's (and the 2 s export interval it sets), with
#      the same PID and no restart, and the restored file brings the domain back;
#   7. upgrade to revision 2 of the package: the service is restarted (new PID, new version) and the
#      locally edited config is kept byte for byte;
#   8. `systemd-analyze security` of the installed unit in the booted system <= MAX_EXPOSURE (2.0);
#   9. apt remove stops the unit and keeps the config; purge removes it.
#
# The Debian root (minbase + systemd + libvirt + QEMU) is cached under $VHA_CACHE_DIR (see
# lib-node.sh) and booted through an overlay, so the cached copy is never modified. Ports:
# $VHA_NSPAWN_OTLP_PORT (default 14317, gRPC) and the next one (HTTP). Packages: VHA_DEB and
# VHA_DEB2 name prebuilt revisions 1 and 2; otherwise scripts/package.sh builds them.
set -euo pipefail
NODE_CHECK=check-nspawn
# shellcheck source=tests/deploy/lib-node.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib-node.sh"
cd "$DEPLOY_ROOT"

GRPC_PORT=${VHA_NSPAWN_OTLP_PORT:-14317}
HTTP_PORT=$((GRPC_PORT + 1))
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
UNIT=virt-hypervisor-agent.service
NODE=vha-nspawn-node
SYS_DOMAIN=vha-nspawn-tcg
VMI_NS=vha-ns
VMI_NAME=vmi-nspawn
# Bounds (generous, printed). WatchdogSec is 30 s and the agent pings every 15 s, so systemd's
# timeout fires 15 to 30 s after a SIGSTOP (30 s after the last ping), then RestartSec (5 s).
READY_BOUND=60 SERIES_BOUND=30 WATCHDOG_MIN=15 WATCHDOG_MAX=120 STOP_BOUND=15

[[ $(id -u) -eq 0 ]] || node_fail "must run as root (debootstrap, mounts, systemd-nspawn)"
need_pkgs systemd-container debootstrap

work=$(mktemp -d /tmp/vha-nspawn.XXXXXX)
NSPAWN_PID='' LEADER='' OVERLAY='' NSPAWN_TMPFS=''
cleanup() {
    local rc=$?
    set +e
    if [[ -n $LEADER ]] && kill -0 "$LEADER" 2>/dev/null; then
        nsenter -t "$LEADER" -a -- systemctl poweroff >/dev/null 2>&1
    fi
    if [[ -n $NSPAWN_PID ]]; then
        local i
        for ((i = 0; i < 300; i++)); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            node_log "container did not power off within 30s: SIGKILL to systemd-nspawn (pid $NSPAWN_PID)"
            kill -KILL "$NSPAWN_PID"
        fi
        wait "$NSPAWN_PID" 2>/dev/null
    fi
    [[ -n $OVERLAY ]] && umount "$OVERLAY"
    [[ -n $NSPAWN_TMPFS ]] && umount /run/systemd/nspawn
    otlp_receiver_stop
    if ((rc != 0)); then
        node_log "---- last receiver lines"; tail -n 20 "${RECEIVER_LOG:-/dev/null}" 2>/dev/null >&2
        node_log "---- container console"; tail -n 30 "$work/nspawn.log" 2>/dev/null >&2
    fi
    rm -rf "$work"
    print_timings
    exit "$rc"
}
trap cleanup EXIT

# ct CMD...: run CMD in every namespace of the booted container (as its root).
ct() { nsenter -t "$LEADER" -a -- "$@"; }
prop() { ct systemctl show -p "$1" --value "$UNIT"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# host_pid PID: the host PID of the process that is PID in the container's PID namespace.
host_pid() {
    local want=$1 ns p
    ns=$(readlink "/proc/$LEADER/ns/pid")
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/pid" 2>/dev/null) == "$ns" ]] || continue
        if [[ $(awk '/^NSpid:/ { print $NF }' "$p/status" 2>/dev/null) == "$want" ]]; then
            printf '%s\n' "${p#/proc/}"
            return 0
        fi
    done
    return 1
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s.
wait_for() {
    local bound=$1 what=$2 t0
    shift 2
    t0=$(now)
    until "$@" >/dev/null 2>&1; do
        awk -v a="$t0" -v b="$(now)" -v t="$bound" 'BEGIN { exit !(b - a > t) }' &&
            node_fail "$what: not within ${bound}s"
        sleep 0.2
    done
}

journal_has() { ct journalctl -q -u "$UNIT" --no-pager | grep -q -- "$1"; }
series_sys() { wait_points "$SERIES_BOUND" "$1" --metric kubevirt_vmi_hypervisor_info --attr "name=$SYS_DOMAIN" \
    --attr namespace=! --attr hypervisor_type=qemu-tcg --attr "node=$NODE"; }
series_vmi() { wait_points "$SERIES_BOUND" "$1" --metric kubevirt_vmi_hypervisor_info --attr "namespace=$VMI_NS" \
    --attr "name=$VMI_NAME" --attr hypervisor_type=qemu-tcg --attr "node=$NODE"; }

# ---------------------------------------------------------------- steps
build_debs() {
    mkdir -p "$work/debs"
    local d1=${VHA_DEB:-} d2=${VHA_DEB2:-}
    [[ -n $d1 ]] || d1=$(bash scripts/package.sh) || return 1
    [[ -n $d2 ]] || d2=$(bash scripts/package.sh --no-build --deb-revision 2) || return 1
    cp "$d1" "$d2" "$work/debs/"
    DEB1=$(basename "$d1") DEB2=$(basename "$d2")
    [[ $DEB1 != "$DEB2" ]] || node_fail "revision 2 has the same file name as revision 1: $DEB1"
    node_log "packages: $DEB1, $DEB2"
}

boot() {
    mkdir -p "$work/upper" "$work/ovl" "$work/root"
    mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$work/upper,workdir=$work/ovl" "$work/root"
    OVERLAY=$work/root
    mkdir -p /run/systemd/nspawn
    if ! mountpoint -q /run/systemd/nspawn; then
        # systemd-nspawn fails its cleanup without this on a host whose PID 1 is not systemd.
        mount -t tmpfs tmpfs /run/systemd/nspawn
        NSPAWN_TMPFS=1
    fi
    # nspawn's own seccomp allow-list (systemd 252) lacks the Landlock calls: add them, so that
    # what the agent achieves is decided by its unit's filter alone, as on a real host.
    systemd-nspawn -D "$work/root" --boot --register=no --keep-unit --machine="vha-ci-$$" \
        --system-call-filter="landlock_create_ruleset landlock_add_rule landlock_restrict_self" \
        --bind-ro="$work/debs:/vha-debs" >"$work/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    local t0 p
    t0=$(now)
    while [[ -z $LEADER ]]; do
        kill -0 "$NSPAWN_PID" 2>/dev/null || node_fail "systemd-nspawn exited"
        for p in $(cat /proc/"$NSPAWN_PID"/task/*/children 2>/dev/null); do
            [[ $(awk '/^NSpid:/ { print $NF }' "/proc/$p/status" 2>/dev/null) == 1 ]] && LEADER=$p
        done
        awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 30) }' && node_fail "no container PID 1 after 30s"
        sleep 0.1
    done
    # Poll: right after exec, PID 1's bus socket does not exist yet (`is-system-running --wait` fails).
    local state=
    t0=$(now)
    while [[ $state != running && $state != degraded ]]; do
        awk -v a="$t0" -v b="$(now)" -v t="$READY_BOUND" 'BEGIN { exit !(b - a > t) }' && break
        sleep 0.2
        state=$(ct systemctl is-system-running 2>/dev/null) || true
    done
    if [[ $state != running ]]; then
        ct systemctl --no-pager --failed >&2 || true
        node_fail "system state after boot: '${state:-timeout after ${READY_BOUND}s}' (expected running)"
    fi
    node_log "booted: systemd $(ct systemctl --version | head -n1 | awk '{print $2}') is PID 1, state running (host pid $LEADER)"
}

start_libvirt() {
    ct systemd-run --quiet --unit=vha-virtlogd /usr/sbin/virtlogd
    ct systemd-run --quiet --unit=vha-libvirtd /usr/sbin/libvirtd
    wait_for 30 "qemu:///system answering in the container" ct virsh -c qemu:///system list
    tcg_domain_xml "$SYS_DOMAIN" >"$work/root/root/sys.xml"
    ct virsh -q -c qemu:///system define /root/sys.xml >/dev/null
    ct virsh -q -c qemu:///system start "$SYS_DOMAIN" >/dev/null
    node_log "qemu:///system in the container runs TCG domain $SYS_DOMAIN"
}

# A KubeVirt-style launcher: a libvirt session daemon running as uid 107 (qemu, like KubeVirt's
# non-root virt-launcher), its runtime dir bind-mounted where the launcher's emptyDir would be.
start_launcher() {
    POD_UID=$(cat /proc/sys/kernel/random/uuid)
    local d=/run/vha-launcher rt
    rt=/var/lib/kubelet/pods/$POD_UID/volumes/kubernetes.io~empty-dir/libvirt-runtime
    ct sh -ec "mkdir -p $d/run $d/cfg $d/cache; chown -R 107:107 $d; chmod 0700 $d
        mkdir -p '$rt'; chmod 0750 /var/lib/kubelet /var/lib/kubelet/pods /var/lib/kubelet/pods/$POD_UID"
    ct systemd-run --quiet --unit=vha-launcher -p User=qemu -p Group=qemu \
        -E XDG_RUNTIME_DIR=$d/run -E XDG_CONFIG_HOME=$d/cfg -E XDG_CACHE_HOME=$d/cache -E HOME=$d \
        /usr/sbin/libvirtd --timeout 0
    wait_for 30 "launcher socket $d/run/libvirt/libvirt-sock" ct test -S "$d/run/libvirt/libvirt-sock"
    ct mount --bind "$d/run/libvirt" "$rt"
    local st
    st=$(ct stat -c '%u %a %F' "$rt/libvirt-sock")
    [[ $st == "107 700 socket" ]] || node_fail "launcher socket $rt/libvirt-sock is '$st', expected '107 700 socket'"
    tcg_domain_xml "${VMI_NS}_${VMI_NAME}" kubevirt >"$work/root/root/vmi.xml"
    local uri="qemu+unix:///session?socket=$d/run/libvirt/libvirt-sock"
    ct virsh -q -c "$uri" define /root/vmi.xml >/dev/null
    ct virsh -q -c "$uri" start "${VMI_NS}_${VMI_NAME}" >/dev/null
    node_log "launcher: uid 107 session daemon, socket $rt/libvirt-sock ($st), VMI ${VMI_NS}/${VMI_NAME} running"
}

install_package() {
    # Test settings in a drop-in, as an operator would: the /etc files are the package's conffiles.
    mkdir -p "$work/root/etc/systemd/system/$UNIT.d"
    cat >"$work/root/etc/systemd/system/$UNIT.d/ci.conf" <<EOF
[Service]
Environment=OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$GRPC_PORT
Environment=OTEL_EXPORTER_OTLP_PROTOCOL=grpc
Environment=NODE_NAME=$NODE
Environment=VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED=true
# Long enough that an export seen during "systemctl stop" is the final flush, not a periodic one;
# the agent pushes every change within its debounce anyway.
Environment=OTEL_METRIC_EXPORT_INTERVAL=60000
EOF
    MARK=$(log_mark)
    local t0
    t0=$(now)
    ct env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "/vha-debs/$DEB1" \
        >"$work/apt1.log" 2>&1 || { cat "$work/apt1.log" >&2; node_fail "apt-get install $DEB1"; }
    node_log "apt-get install $DEB1: $(since "$t0")s"
    [[ $(ct systemctl is-enabled "$UNIT") == enabled ]] || node_fail "$UNIT not enabled after install"
    [[ $(prop ActiveState) == active && $(prop SubState) == running ]] ||
        node_fail "$UNIT not active (running) right after apt-get returned: $(prop ActiveState)/$(prop SubState)"
    local exec_us active_us
    exec_us=$(prop ExecMainStartTimestampMonotonic)
    active_us=$(prop ActiveEnterTimestampMonotonic)
    READY_MS=$(((active_us - exec_us) / 1000))
    # READY=1 must come after the first sync: the journal orders the agent's "initial sync done"
    # before systemd's "Started".
    ct journalctl -q -u "$UNIT" -o short-monotonic --no-pager >"$work/journal1.txt"
    local sync_line started_line
    sync_line=$(grep -n 'initial sync done' "$work/journal1.txt" | head -n1 | cut -d: -f1)
    started_line=$(grep -n "Started $UNIT\|Started virt-hypervisor-agent" "$work/journal1.txt" | head -n1 | cut -d: -f1)
    [[ -n $sync_line && -n $started_line ]] || { cat "$work/journal1.txt" >&2; node_fail "journal lacks 'initial sync done' or 'Started'"; }
    ((sync_line < started_line)) || { cat "$work/journal1.txt" >&2; node_fail "unit became active before the first sync"; }
    ((READY_MS <= READY_BOUND * 1000)) || node_fail "READY after ${READY_MS} ms (bound ${READY_BOUND}s)"
    node_log "active (running) ${READY_MS} ms after exec; 'initial sync done' (journal line $sync_line) precedes 'Started' (line $started_line)"
}

check_series() {
    local a b
    a=$(series_sys "$MARK") || node_fail "no series of $SYS_DOMAIN (qemu:///system) at the receiver"
    b=$(series_vmi "$MARK") || node_fail "no series of $VMI_NS/$VMI_NAME (launcher socket) at the receiver"
    (($(points "$MARK" --metric virt_hypervisor_agent_connection_up --attr connection=qemu:///system --value 1) > 0)) ||
        node_fail "no connection_up=1 for qemu:///system"
    # The running process confined itself with Landlock under the unit's own sandbox (its
    # seccomp filter must let the three landlock calls through).
    (($(points "$MARK" --metric virt_hypervisor_agent_landlock --attr status=full --value 1) > 0)) || {
        ct journalctl -q -u "$UNIT" --no-pager | grep -i landlock >&2 || true
        node_fail "the agent did not report virt_hypervisor_agent_landlock{status=full}"
    }
    node_log "series at the receiver: $SYS_DOMAIN after ${a}s, $VMI_NS/$VMI_NAME after ${b}s (waited after install); Landlock: full"
}

check_hardening() {
    local pid hpid st
    pid=$(prop MainPID)
    hpid=$(host_pid "$pid") || node_fail "no host PID for container PID $pid"
    st=$(ct cat "/proc/$pid/status")
    local want k v
    for want in CapBnd:0000000000000002 CapEff:0000000000000002 CapPrm:0000000000000002 \
        CapInh:0000000000000000 CapAmb:0000000000000000 NoNewPrivs:1 Seccomp:2 Uid:0; do
        k=${want%%:*} v=${want#*:}
        [[ $(awk -v k="$k:" '$1 == k { print $2 }' <<<"$st") == "$v" ]] ||
            node_fail "/proc/$pid/status: $(grep "^$k:" <<<"$st") (want $k $v)"
    done
    node_log "process $pid (host $hpid): CapBnd=CapEff=CapPrm=0x2 (cap_dac_override), CapAmb=0, NoNewPrivs=1, Seccomp=2 (filter), uid 0"
    local dir out
    for dir in /etc /etc/virt-hypervisor-agent /usr/bin /var/lib /var/lib/kubelet/pods /run /run/libvirt; do
        if out=$(nsenter -t "$hpid" -m -- sh -c "echo x >'$dir/.vha-write-probe'" 2>&1); then
            nsenter -t "$hpid" -m -- rm -f "$dir/.vha-write-probe"
            grep -E " $dir(/[^ ]*)? " "/proc/$hpid/mountinfo" >&2 || true
            node_fail "the agent's mount namespace lets root write $dir"
        fi
        grep -q 'Read-only file system' <<<"$out" || node_fail "write to $dir failed, but not with EROFS: $out"
    done
    nsenter -t "$hpid" -m -- sh -c 'echo x >/tmp/.vha-probe && rm /tmp/.vha-probe' ||
        node_fail "control: private /tmp not writable in the agent's namespace (the probe itself is broken)"
    nsenter -t "$hpid" -m -- test -r /etc/virt-hypervisor-agent/config.yaml || node_fail "config not readable there"
    # /root holds this test's domain XML files: ProtectHome= must hide them.
    ct test -f /root/sys.xml || node_fail "control: /root/sys.xml missing in the container"
    [[ -z $(nsenter -t "$hpid" -m -- find /home /root -mindepth 1 -maxdepth 1 2>/dev/null) ]] ||
        node_fail "ProtectHome: /home or /root visible to the agent"
    node_log "writes denied (EROFS) in /etc /usr/bin /var/lib /var/lib/kubelet/pods /run /run/libvirt; private /tmp writable (control); config readable; /root hidden"
}

check_watchdog() {
    local pid0 n0 hpid t0 pid
    pid0=$(prop MainPID) n0=$(prop NRestarts)
    hpid=$(host_pid "$pid0")
    local mark
    mark=$(log_mark)
    t0=$(now)
    kill -STOP "$hpid"
    while true; do
        pid=$(prop MainPID)
        [[ $pid != 0 && $pid != "$pid0" && $(prop ActiveState) == active ]] && break
        awk -v a="$t0" -v b="$(now)" -v t="$WATCHDOG_MAX" 'BEGIN { exit !(b - a > t) }' && {
            kill -CONT "$hpid" 2>/dev/null
            node_fail "not restarted within ${WATCHDOG_MAX}s of SIGSTOP"
        }
        sleep 0.2
    done
    WATCHDOG_S=$(since "$t0")
    local n1
    n1=$(prop NRestarts)
    ((n1 == n0 + 1)) || node_fail "NRestarts $n0 -> $n1 (expected +1)"
    # journald may store systemd's message a moment after the restart: poll.
    wait_for 15 "'Watchdog timeout' in the journal" journal_has 'Watchdog timeout'
    node_log "journal: $(ct journalctl -q -u "$UNIT" --no-pager | grep -m1 'Watchdog timeout' | cut -c1-160)"
    awk -v s="$WATCHDOG_S" -v m="$WATCHDOG_MIN" 'BEGIN { exit !(s >= m) }' ||
        node_fail "restarted ${WATCHDOG_S}s after SIGSTOP, sooner than WatchdogSec/2 (${WATCHDOG_MIN}s): not the watchdog"
    local a b
    a=$(series_sys "$mark") || node_fail "$SYS_DOMAIN series did not come back after the restart"
    b=$(series_vmi "$mark") || node_fail "$VMI_NS/$VMI_NAME series did not come back after the restart"
    node_log "watchdog: SIGSTOP -> 'Watchdog timeout', killed and active again (pid $pid0 -> $pid) after ${WATCHDOG_S}s; NRestarts $n0 -> $n1; series back (${a}s, ${b}s after the restart)"
}

check_stop() {
    local mark t0 n
    mark=$(log_mark)
    t0=$(now)
    ct systemctl stop "$UNIT"
    STOP_S=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
    local status code result
    status=$(prop ExecMainStatus) code=$(prop ExecMainCode) result=$(prop Result)
    [[ $status == 0 && $code == 1 && $result == success ]] ||
        node_fail "after stop: ExecMainCode=$code ExecMainStatus=$status Result=$result (want exited 0, success)"
    awk -v s="$STOP_S" -v m="$STOP_BOUND" 'BEGIN { exit !(s <= m) }' || node_fail "stop took ${STOP_S}s > ${STOP_BOUND}s"
    sleep 0.5
    n=$(points "$mark" --metric kubevirt_vmi_hypervisor_info --attr "name=$SYS_DOMAIN")
    ((n > 0)) || node_fail "no final export during stop"
    node_log "systemctl stop: ${STOP_S}s, exit status 0, Result=success; final export seen ($n point(s) of $SYS_DOMAIN)"
}

check_bad_config() {
    local cfg=/etc/virt-hypervisor-agent/config.yaml key=vha_ci_unknown_key cursor
    ct cp -p "$cfg" /root/config.yaml.orig
    ct sh -c "printf '%s: true\n' $key >>$cfg"
    cursor=$(ct journalctl -q -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
    if ct systemctl start "$UNIT" 2>/dev/null; then
        node_fail "the unit started with an unknown key in $cfg"
    fi
    local status
    status=$(prop ExecMainStatus)
    ((status != 0)) || node_fail "failed start with ExecMainStatus=0"
    ct journalctl -q -u "$UNIT" --after-cursor="$cursor" --no-pager >"$work/journal-bad.txt"
    grep -q "$key" "$work/journal-bad.txt" || { cat "$work/journal-bad.txt" >&2; node_fail "journal does not name $key"; }
    node_log "bad config: start failed (exit status $status), journal: $(grep -m1 "$key" "$work/journal-bad.txt" | cut -c1-200)"
    ct cp -p /root/config.yaml.orig "$cfg"
    ct systemctl reset-failed "$UNIT"
    local mark
    mark=$(log_mark)
    ct systemctl start "$UNIT" || node_fail "did not start again with the config fixed"
    [[ $(prop ActiveState) == active ]] || node_fail "not active after the fix"
    series_sys "$mark" >/dev/null || node_fail "no series after the fix"
    node_log "config fixed: active again, series back"
}

check_reload() {
    local cfg=/etc/virt-hypervisor-agent/config.yaml key=vha_ci_reload_key pid0 restarts0 cursor mark t0
    pid0=$(prop MainPID) restarts0=$(prop NRestarts)
    ct cp -p "$cfg" /root/config.yaml.orig
    # Invalid: refused, logged with the key, still running.
    ct sh -c "printf '%s: true\n' $key >>$cfg"
    cursor=$(ct journalctl -q -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
    ct systemctl reload "$UNIT" || node_fail "systemctl reload failed"
    refused() { ct journalctl -q -u "$UNIT" --after-cursor="$cursor" --no-pager | grep 'configuration not reloaded' | grep -q "$key"; }
    wait_for 10 "'configuration not reloaded' naming $key in the journal" refused
    [[ $(prop ActiveState) == active && $(prop MainPID) == "$pid0" ]] || node_fail "an invalid reload stopped the unit"
    node_log "reload, invalid file: refused, journal: $(ct journalctl -q -u "$UNIT" --after-cursor="$cursor" --no-pager | grep -m1 'configuration not reloaded' | cut -c1-200)"
    # Valid: qemu:///system out, test:///default in, and exports every 2 s instead of the
    # drop-in's 60 s (sed -i: a new file, as editors write it).
    ct cp -p /root/config.yaml.orig "$cfg"
    ct sed -i 's|^    - qemu:///system$|    - test:///default|; s|^  # interval: 30s$|  interval: 2s|' "$cfg"
    ct grep -q '^    - test:///default$' "$cfg" || node_fail "the URI edit did not apply"
    ct grep -q '^  interval: 2s$' "$cfg" || node_fail "the interval edit did not apply"
    mark=$(log_mark)
    cursor=$(ct journalctl -q -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
    t0=$(now)
    ct systemctl reload "$UNIT" || node_fail "systemctl reload failed"
    wait_points "$SERIES_BOUND" "$mark" --metric kubevirt_vmi_hypervisor_info --attr name=test \
        --attr "node=$NODE" >/dev/null || {
        ct journalctl -q -u "$UNIT" --after-cursor="$cursor" --no-pager | tail -n 20 >&2
        node_fail "test:///default's domain not exported after the reload"
    }
    local added_s after
    added_s=$(since "$t0")
    # In the next (periodic, 2 s) export, the TCG domain of qemu:///system is not among the series.
    after=$(log_mark)
    wait_points "$SERIES_BOUND" "$after" --metric kubevirt_vmi_hypervisor_info --attr name=test >/dev/null ||
        node_fail "no export after the reload"
    (($(points "$after" --metric kubevirt_vmi_hypervisor_info --attr "name=$SYS_DOMAIN") == 0)) ||
        node_fail "$SYS_DOMAIN still exported after its URI was removed"
    series_vmi "$after" >/dev/null || node_fail "the launcher's VMI was dropped by a reload that did not touch it"
    [[ $(prop MainPID) == "$pid0" && $(prop NRestarts) == "$restarts0" ]] || node_fail "the reload restarted the agent"
    # Restored: the domain is back.
    ct cp -p /root/config.yaml.orig "$cfg"
    mark=$(log_mark)
    ct systemctl reload "$UNIT" || node_fail "systemctl reload failed"
    series_sys "$mark" >/dev/null || node_fail "$SYS_DOMAIN not back after the URI was restored"
    [[ $(prop MainPID) == "$pid0" ]] || node_fail "the reload restarted the agent"
    node_log "reload, URI swapped: test:///default exported ${added_s}s after systemctl reload, $SYS_DOMAIN gone, VMI kept; restored: back; same PID $pid0, NRestarts $restarts0"
}

check_upgrade() {
    local cfg=/etc/virt-hypervisor-agent/config.yaml pid0 sum0 mark t0
    # A local edit, as an operator would make it.
    ct sed -i 's/^  level: info$/  level: debug/; 1i # edited locally on this node (check-nspawn)' "$cfg"
    ct grep -q '^  level: debug$' "$cfg" || node_fail "the local edit did not apply"
    ct systemctl restart "$UNIT"
    pid0=$(prop MainPID)
    sum0=$(ct sha256sum "$cfg" | cut -d' ' -f1)
    mark=$(log_mark)
    t0=$(now)
    ct env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "/vha-debs/$DEB2" \
        >"$work/apt2.log" 2>&1 || { cat "$work/apt2.log" >&2; node_fail "apt-get install $DEB2"; }
    local ver pid sum
    ver=$(ct dpkg-query -W -f='${Version}' virt-hypervisor-agent)
    [[ $DEB2 == *"_${ver}_"* ]] || node_fail "installed version $ver, expected the one of $DEB2"
    pid=$(prop MainPID)
    [[ $(prop ActiveState) == active && $pid != "$pid0" && $pid != 0 ]] ||
        node_fail "not restarted by the upgrade (pid $pid0 -> $pid, $(prop ActiveState))"
    sum=$(ct sha256sum "$cfg" | cut -d' ' -f1)
    [[ $sum == "$sum0" ]] || node_fail "the upgrade changed the edited $cfg"
    if ct sh -c 'ls /etc/virt-hypervisor-agent/*.dpkg-* 2>/dev/null' | grep -q .; then
        node_fail "dpkg left .dpkg-* files next to the config"
    fi
    series_sys "$mark" >/dev/null || node_fail "no series after the upgrade"
    node_log "upgrade to $ver in $(since "$t0")s: restarted (pid $pid0 -> $pid), edited config kept (sha256 unchanged), series back"
}

check_security() {
    local out score
    out=$(ct systemd-analyze security --no-pager "$UNIT" 2>&1) || true
    score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' <<<"$out" | tail -n1)
    [[ -n $score ]] || { echo "$out" >&2; node_fail "no exposure score"; }
    EXPOSURE=$score
    if awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
        grep '✗' <<<"$out" >&2 || true
        node_fail "exposure of the installed unit $score > $MAX_EXPOSURE"
    fi
    node_log "systemd-analyze security (installed unit, live): $score (limit $MAX_EXPOSURE)"
}

check_stop_collector_down() {
    otlp_receiver_stop
    ct systemctl restart "$UNIT"
    local t0 status result
    t0=$(now)
    ct systemctl stop "$UNIT"
    STOP_DOWN_S=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
    status=$(prop ExecMainStatus) result=$(prop Result)
    [[ $status == 0 && $result == success ]] || node_fail "stop with the collector down: ExecMainStatus=$status Result=$result"
    awk -v s="$STOP_DOWN_S" -v m="$STOP_BOUND" 'BEGIN { exit !(s <= m) }' ||
        node_fail "stop with the collector down took ${STOP_DOWN_S}s > ${STOP_BOUND}s"
    node_log "systemctl stop with the collector down: ${STOP_DOWN_S}s, exit status 0"
    ct systemctl start "$UNIT"
}

check_remove() {
    local pid
    pid=$(prop MainPID)
    ct env DEBIAN_FRONTEND=noninteractive apt-get remove -y -q virt-hypervisor-agent >"$work/apt3.log" 2>&1 ||
        { cat "$work/apt3.log" >&2; node_fail "apt-get remove"; }
    [[ $(ct systemctl is-active "$UNIT" 2>/dev/null) != active ]] || node_fail "still active after remove"
    ct test ! -e /usr/bin/virt-hypervisor-agent || node_fail "binary left after remove"
    ! ct test -d "/proc/$pid" || node_fail "agent process $pid still running after remove"
    ct test -f /etc/virt-hypervisor-agent/config.yaml || node_fail "remove (not purge) deleted the config"
    ct env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q virt-hypervisor-agent >>"$work/apt3.log" 2>&1 ||
        { cat "$work/apt3.log" >&2; node_fail "apt-get purge"; }
    ct test ! -e /etc/virt-hypervisor-agent/config.yaml || node_fail "purge left the config"
    node_log "remove: unit stopped, binary gone, config kept; purge: config gone"
}

t_all=$(now)
timed "packages (revision 1 and 2)" build_debs
timed "cached Debian 12 root (systemd, libvirt, QEMU)" eval 'ROOT=$(cached_root nspawn)'
[[ -n ${ROOT:-} ]] || node_fail "no root"
timed "OTLP receiver on the host" otlp_receiver_start "$work" "$GRPC_PORT" "$HTTP_PORT"
timed "boot systemd in systemd-nspawn" boot
timed "libvirtd + TCG domain in the container" start_libvirt
timed "launcher-style session daemon (uid 107)" start_launcher
timed "apt install; READY after first sync" install_package
timed "series of both connections at the receiver" check_series
timed "privileges of the running process" check_hardening
timed "watchdog (SIGSTOP)" check_watchdog
timed "systemctl stop" check_stop
timed "bad config, then fixed" check_bad_config
timed "systemctl reload" check_reload
timed "upgrade keeps the edited config" check_upgrade
timed "systemd-analyze security (installed)" check_security
receiver_kind=$RECEIVER_KIND
timed "systemctl stop, collector down" check_stop_collector_down
timed "remove and purge" check_remove
node_log "observed: READY ${READY_MS} ms after exec; watchdog restart ${WATCHDOG_S}s after SIGSTOP; stop ${STOP_S}s (collector down: ${STOP_DOWN_S}s); exposure ${EXPOSURE}; receiver: $receiver_kind"
node_log "PASS in $(since "$t_all")s"
