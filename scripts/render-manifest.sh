#!/usr/bin/env bash
# Regenerate deploy/kubernetes/daemonset.yaml from the Helm chart's defaults: its header comment
# (everything before the first "---") is kept, the rest is `helm template` output.
# tests/deploy/check-helm.sh fails when the two differ.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
manifest=deploy/kubernetes/daemonset.yaml
helm=$(bash scripts/build-helm.sh)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
sed '/^---$/,$d' "$manifest" >"$tmp"
"$helm" template virt-hypervisor-agent deploy/helm/virt-hypervisor-agent --namespace virt-hypervisor-agent \
    --kube-version 1.37.0 >>"$tmp"
cp "$tmp" "$manifest"
echo "render-manifest.sh: wrote $manifest" >&2
