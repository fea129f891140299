#!/usr/bin/env bash
# Check the Helm chart deploy/helm/virt-hypervisor-agent (Helm built from the Go module proxy by
# scripts/build-helm.sh, cached):
#   1. helm lint, with the defaults and with every optional object on;
#   2. deploy/kubernetes/daemonset.yaml is exactly `helm template` of the defaults (after its
#      header comment): the plain manifest is the chart, rendered;
#   3. values.schema.json rejects misspelled or mistyped values, and the chart's own checks reject a
#      config that does not match the mounts or the probe port, each with a message naming the key;
#   4. the PrometheusRule carries exactly the groups of deploy/prometheus/virt-hypervisor-agent.rules.yml
#      and the dashboard ConfigMap exactly deploy/grafana/virt-hypervisor-agent.json (the chart's
#      files/ copies are byte-identical to them);
#   5. the agent's own check-config accepts the rendered ConfigMap's config with the DaemonSet's
#      environment, also with values an operator would set (a custom kubelet root, an endpoint).
set -euo pipefail
# shellcheck source=tests/deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$DEPLOY_ROOT"

chart=deploy/helm/virt-hypervisor-agent
manifest=deploy/kubernetes/daemonset.yaml
fail() { echo "check-helm: FAIL: $*" >&2; exit 1; }
ok() { echo "check-helm: $*"; }

helm=${VHA_HELM_BIN:-$(bash scripts/build-helm.sh)} || fail "building helm"
bin=$(deploy_venv)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The chart needs Kubernetes 1.31+ (recursiveReadOnly); helm template assumes 1.20 unless told.
render() { "$helm" template virt-hypervisor-agent "$chart" --namespace virt-hypervisor-agent --kube-version 1.37.0 "$@"; }

# 1. lint
"$helm" lint --strict --kube-version 1.37.0 "$chart" >"$tmp/lint.txt" 2>&1 || { cat "$tmp/lint.txt" >&2; fail "helm lint"; }
"$helm" lint --strict --kube-version 1.37.0 "$chart" --set prometheusRule.enabled=true --set dashboard.enabled=true \
    >"$tmp/lint2.txt" 2>&1 || { cat "$tmp/lint2.txt" >&2; fail "helm lint with the PrometheusRule and dashboard on"; }
ok "helm lint --strict (defaults; PrometheusRule and dashboard on): ok"

# 2. the plain manifest is the rendered chart
render >"$tmp/rendered.yaml" || fail "helm template with the defaults"
sed -n '/^---$/,$p' "$manifest" >"$tmp/manifest-body.yaml"
if ! diff -u "$tmp/manifest-body.yaml" "$tmp/rendered.yaml" >"$tmp/manifest.diff"; then
    head -n 60 "$tmp/manifest.diff" >&2
    fail "$manifest differs from helm template of the chart's defaults (regenerate it: scripts/render-manifest.sh)"
fi
ok "$manifest equals helm template of the defaults"

# 3. bad values are refused, each naming what is wrong
refused() { # refused WHAT WANT ARGS...: the render must fail and its error contain WANT
    local what=$1 want=$2 out
    shift 2
    if out=$(render "$@" 2>&1 >/dev/null); then
        fail "$what: accepted"
    fi
    grep -qF -- "$want" <<<"$out" || fail "$what: the error does not name $want: $out"
    ok "refused: $what"
}
refused "a misspelled top-level value (imagee)" "imagee" --set imagee.tag=x
refused "a misspelled nested value (export.tls.enabeld)" "enabeld" --set export.tls.enabeld=true
refused "a port that is not a number" "/health/port" --set health.port=http
refused "a pull policy Kubernetes does not know" "/image/pullPolicy" --set image.pullPolicy=Sometimes
refused "a digest that is not sha256" "/image/digest" --set image.digest=latest
refused "a kubelet root the config does not use" "kubelet_root" --set kubeletRoot=/var/lib/k0s/kubelet
refused "a health port the agent does not listen on" "health.listen" --set health.port=9000

# 4. one source for the rules and the dashboard
cmp -s "$chart/files/virt-hypervisor-agent.rules.yml" deploy/prometheus/virt-hypervisor-agent.rules.yml ||
    fail "$chart/files/virt-hypervisor-agent.rules.yml is not a copy of deploy/prometheus/virt-hypervisor-agent.rules.yml"
cmp -s "$chart/files/virt-hypervisor-agent.json" deploy/grafana/virt-hypervisor-agent.json ||
    fail "$chart/files/virt-hypervisor-agent.json is not a copy of deploy/grafana/virt-hypervisor-agent.json"
render --set prometheusRule.enabled=true --set prometheusRule.labels.release=kps \
    --set dashboard.enabled=true >"$tmp/all.yaml" || fail "helm template with everything on"
"$bin/python" - "$tmp/all.yaml" <<'PY' || fail "PrometheusRule or dashboard content"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
rule = kinds[("PrometheusRule", "virt-hypervisor-agent")]
want = yaml.safe_load(open("deploy/prometheus/virt-hypervisor-agent.rules.yml"))
assert rule["spec"]["groups"] == want["groups"], "PrometheusRule groups differ from the rules file"
assert rule["metadata"]["labels"]["release"] == "kps", rule["metadata"]["labels"]
dash = kinds[("ConfigMap", "virt-hypervisor-agent-dashboard")]
assert dash["metadata"]["labels"]["grafana_dashboard"] == "1", dash["metadata"]["labels"]
got = json.loads(dash["data"]["virt-hypervisor-agent.json"])
assert got == json.load(open("deploy/grafana/virt-hypervisor-agent.json")), "dashboard differs"
n = sum(len(g["rules"]) for g in want["groups"])
print(f"check-helm: PrometheusRule: the rules file's {len(want['groups'])} groups ({n} rules); dashboard: {len(got.get('panels', []))} panels")
PY
render | grep -q "kind: PrometheusRule" && fail "the PrometheusRule is rendered although prometheusRule.enabled is false"
base=https://git.example.com/ops/virt-hypervisor-agent/-/blob/v0.1.0/
render --set prometheusRule.enabled=true --set "prometheusRule.runbookBaseURL=$base" >"$tmp/runbooks.yaml" ||
    fail "helm template with a runbook base"
n=$(grep -c "runbook_url: ${base}deploy/README.md#" "$tmp/runbooks.yaml" || true)
((n > 0)) && ! grep -q 'virt-hypervisor-agent.invalid' "$tmp/runbooks.yaml" ||
    fail "prometheusRule.runbookBaseURL did not replace every runbook base ($n replaced)"
ok "prometheusRule.runbookBaseURL: $n runbook_url values point at $base"

# 5. the agent checks the rendered config with the DaemonSet's environment
agent=${VHA_AGENT_BIN:-}
if [[ -z $agent ]]; then
    for candidate in target/release/virt-hypervisor-agent target/debug/virt-hypervisor-agent; do
        [[ -x $candidate ]] && agent=$candidate && break
    done
fi
if [[ -z $agent ]]; then
    fail "no agent binary (build it, or set VHA_AGENT_BIN)"
fi
check_config() { # check_config WHAT ARGS...: render with ARGS, run check-config on the result
    local what=$1
    shift
    render "$@" >"$tmp/r.yaml" || fail "$what: helm template"
    "$bin/python" - "$tmp/r.yaml" "$tmp" <<'PY' || fail "$what: extracting the config and env"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "virt-hypervisor-agent")
open(sys.argv[2] + "/config.yaml", "w").write(cm["data"]["config.yaml"])
ds = next(d for d in docs if d["kind"] == "DaemonSet")
env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
with open(sys.argv[2] + "/env", "w") as f:
    for e in env:
        value = e.get("value")
        if value is None:  # from the downward API or a Secret: a stand-in of the right shape
            value = {"NODE_NAME": "node-1", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example:4317"}.get(e["name"], "")
        if value.startswith("/var/run/secrets/"):  # the Secret's files: empty stand-ins
            value = sys.argv[2] + "/" + value.rsplit("/", 1)[1]
            open(value, "w").close()
        if value != "":
            f.write(f"{e['name']}={value}\n")
PY
    local -a envs=()
    mapfile -t envs <"$tmp/env"
    # The TLS files are only read when the exporter starts: check-config does not need them.
    env -i PATH=/usr/bin:/bin "${envs[@]}" "$agent" --config "$tmp/config.yaml" check-config \
        >"$tmp/check.txt" 2>&1 || { cat "$tmp/check.txt" >&2; fail "$what: check-config refused the rendered config"; }
    ok "check-config accepts the rendered config ($what)"
}
check_config "defaults"
check_config "custom kubelet root, endpoint as a value, another port" \
    --set kubeletRoot=/var/lib/k0s/kubelet --set config.libvirt.discover.kubelet_root=/var/lib/k0s/kubelet \
    --set export.endpoint=https://otel.example:4317 --set health.port=9100 --set config.health.listen=0.0.0.0:9100
echo "check-helm: PASS"
