#!/usr/bin/env bash
# Check deploy/systemd/virt-hypervisor-agent.service:
#   1. `systemd-analyze verify` prints nothing (any warning, e.g. an unknown key, is a failure);
#   2. `systemd-analyze security --offline=true` exposure score <= MAX_EXPOSURE (default 2.0).
# Works without a running systemd (no PID 1 needed).
#
# verify checks that ExecStart= points at an executable. When /usr/bin/virt-hypervisor-agent
# is not installed (the usual case on a build machine), the unit is verified as a copy whose
# ExecStart= path (and nothing else) is replaced by a stub executable in a temp dir; the script
# says so. Set VHA_AGENT_BIN=/path/to/binary to verify against a real build instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
unit_src="${VHA_UNIT:-$root/deploy/systemd/virt-hypervisor-agent.service}"
env_src="$root/deploy/systemd/virt-hypervisor-agent.default"
max_exposure="${MAX_EXPOSURE:-2.0}"
installed_bin=/usr/bin/virt-hypervisor-agent

command -v systemd-analyze >/dev/null || { echo "check-systemd: systemd-analyze not found (apt-get install systemd)" >&2; exit 1; }
[[ -f "$unit_src" ]] || { echo "check-systemd: missing $unit_src" >&2; exit 1; }
[[ -f "$env_src" ]] || { echo "check-systemd: missing $env_src" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unit="$tmp/virt-hypervisor-agent.service"

bin="${VHA_AGENT_BIN:-}"
if [[ -z "$bin" && -x "$installed_bin" ]]; then
    bin="$installed_bin"
fi
if [[ -z "$bin" ]]; then
    bin="$tmp/bin/virt-hypervisor-agent"
    mkdir -p "$tmp/bin"
    printf '#!/bin/sh\nexit 0\n' >"$bin"
    chmod 0755 "$bin"
    echo "check-systemd: $installed_bin not installed: verifying a copy with ExecStart=$bin (stub); nothing else changed"
fi
# Replace only the executable path of ExecStart=, keep its arguments.
sed "s|^ExecStart=$installed_bin |ExecStart=$bin |" "$unit_src" >"$unit"
grep -q "^ExecStart=$bin --config /etc/virt-hypervisor-agent/config.yaml run\$" "$unit" || {
    echo "check-systemd: FAIL: ExecStart= is not '$installed_bin --config /etc/virt-hypervisor-agent/config.yaml run'" >&2
    exit 1
}

# Keys the agent depends on (a regression here would not be caught by verify).
for want in '^Type=notify$' '^NotifyAccess=main$' '^WatchdogSec=' '^Restart=on-failure$' '^RestartSec=' \
            '^EnvironmentFile=-/etc/default/virt-hypervisor-agent$' '^ProtectSystem=strict$' \
            '^NoNewPrivileges=yes$'; do
    grep -q -- "$want" "$unit" || { echo "check-systemd: FAIL: unit lacks $want" >&2; exit 1; }
done

# Pulling libvirt sockets in would flip a host between monolithic and modular libvirt (their units
# conflict): ordering only.
if grep -qE '^(Wants|Requires|BindsTo|Requisite)=.*(libvirtd|virtqemud)' "$unit"; then
    echo "check-systemd: FAIL: the unit must only order After= libvirt units, not pull them in" >&2; exit 1
fi

# 1. verify: must pass and print nothing.
verify_out=$(cd "$tmp" && systemd-analyze verify "$unit" 2>&1) || {
    echo "check-systemd: FAIL: systemd-analyze verify:" >&2; echo "$verify_out" >&2; exit 1; }
if [[ -n "$verify_out" ]]; then
    echo "check-systemd: FAIL: systemd-analyze verify printed warnings:" >&2; echo "$verify_out" >&2; exit 1
fi
echo "check-systemd: systemd-analyze verify: ok"

# 2. security exposure score (offline: judged from the unit file alone).
sec_out=$(cd "$tmp" && systemd-analyze security --offline=true "$unit" 2>&1) || true
score=$(printf '%s\n' "$sec_out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n1)
if [[ -z "$score" ]]; then
    echo "check-systemd: FAIL: no exposure score in systemd-analyze security output:" >&2; echo "$sec_out" >&2; exit 1
fi
echo "check-systemd: exposure score $score (limit $max_exposure)"
if awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s > m) }'; then
    echo "check-systemd: FAIL: exposure $score > $max_exposure; findings:" >&2
    printf '%s\n' "$sec_out" | grep '✗' >&2 || true
    exit 1
fi

# 3. The EnvironmentFile example only assigns variables the agent reads (KEY=value or comments).
bad=$(grep -vnE '^[[:space:]]*(#.*)?$|^(VIRT_HYPERVISOR_AGENT_[A-Z0-9_]+|OTEL_[A-Z0-9_]+|NODE_NAME|RUST_LOG)=' "$env_src" || true)
if [[ -n "$bad" ]]; then
    echo "check-systemd: FAIL: unexpected lines in $env_src:" >&2; echo "$bad" >&2; exit 1
fi
echo "check-systemd: PASS"
