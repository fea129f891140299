#!/usr/bin/env bash
# The demo: no daemon, no collector. Installs the build dependencies (Debian 12, as root), builds the
# agent, shows the inventory of the embedded test-driver node (config/demo-node.xml) and runs the agent
# for a few seconds with the stdout exporter so you see real kubevirt_vmi_hypervisor_info points.
#
#   DEMO_SECONDS=12 scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
for pkg in libvirt-dev pkg-config; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == "install ok installed" ]] || need+=("$pkg")
done
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "demo.sh: missing packages ${need[*]}: run as root or install them first" >&2
        exit 1
    fi
    echo "demo.sh: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi

cargo build --quiet --bin virt-hypervisor-agent
BIN=target/debug/virt-hypervisor-agent
URI="test://$PWD/config/demo-node.xml"

echo "== What would be exported now (virt-hypervisor-agent inventory):"
"$BIN" --config config/demo.yaml --uri "$URI" inventory
echo
echo "== Running the agent for ${DEMO_SECONDS:-12}s with the stdout exporter (every 5s):"
"$BIN" --config config/demo.yaml --uri "$URI" run &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT
sleep "${DEMO_SECONDS:-12}"
kill -TERM "$pid"
wait "$pid"
trap - EXIT
echo "== Agent stopped cleanly (exit 0)."
