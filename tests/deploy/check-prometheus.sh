#!/usr/bin/env bash
# Check the metrics pipeline files:
#   otel/prometheus.yml                                   promtool check config
#   deploy/prometheus/virt-hypervisor-agent.rules.yml     promtool check rules
#   deploy/prometheus/virt-hypervisor-agent.rules.test.yml promtool test rules
#   the tests really depend on staleness markers and on the KVM and MSHV capabilities (mutants must fail)
#   every alert has a runbook_url whose section exists in deploy/README.md ("Runbooks")
#   deploy/grafana/virt-hypervisor-agent.json                 dashboard structure (queries: tests/e2e_dashboard.rs)
#   otel/collector.yaml, otel/collector-dev.yaml          otelcol-vha validate + structural check
#   all of the above                                      yamllint
set -euo pipefail
# shellcheck source=tests/deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$DEPLOY_ROOT"

prom_cfg=otel/prometheus.yml
rules=deploy/prometheus/virt-hypervisor-agent.rules.yml
rules_test=deploy/prometheus/virt-hypervisor-agent.rules.test.yml
collector=otel/collector.yaml
collector_dev=otel/collector-dev.yaml
dashboard=deploy/grafana/virt-hypervisor-agent.json

need_debian_pkg promtool prometheus
promtool --version 2>&1 | head -n1

fail() { echo "check-prometheus: FAIL: $*" >&2; exit 1; }

promtool check config "$prom_cfg" || fail "promtool check config $prom_cfg"
promtool check rules "$rules" || fail "promtool check rules $rules"
promtool test rules "$rules_test" || fail "promtool test rules $rules_test"

# Mutation checks: each mutant must make the tests fail, or they no longer test what they claim.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mutant() { # NAME: run the tests in $tmp (mutated copies) and require a failure
    if promtool test rules "$tmp/$(basename "$rules_test")" >"$tmp/mutant.log" 2>&1; then
        fail "rule tests still pass with $1"
    fi
    echo "check-prometheus: mutation ($1) is caught by the tests: ok"
}
# 1. No staleness markers (series of stopped VMs and dropped connections simply end, as from a
#    sender without them): their last samples linger for the lookback and must trip the tests.
cp "$rules" "$tmp/"
python3 - "$rules_test" "$tmp/$(basename "$rules_test")" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
out, n = re.subn(r"\bstale\b(?=[^\n]*'$)", '_', src, flags=re.M)
if n < 4:
    sys.exit(f"mutation: expected >= 4 stale values in {sys.argv[1]}, found {n}")
open(sys.argv[2], 'w').write(out)
PY
mutant "staleness markers replaced by a plain end of series"
# 2. The node's own KVM capability replaced by the old inference "other VMs on the node run with
#    kvm": the single-VM node and the all-emulated node must trip the tests.
cp "$rules_test" "$tmp/"
python3 - "$rules" "$tmp/$(basename "$rules")" <<'PY'
import sys
src = open(sys.argv[1]).read()
old = '(max by (node) (virt_hypervisor_agent_node_kvm_available) == 1)'
new = 'count by (node) (kubevirt_vmi_hypervisor_info{hypervisor_type="kvm"})'
if src.count(old) != 1:
    sys.exit(f"mutation: expected the KVM capability join once in {sys.argv[1]}")
open(sys.argv[2], 'w').write(src.replace(old, new))
PY
mutant "KVM capability replaced by the inference from other VMs"
# 3. The node's MSHV capability ignored (as by rules that know only KVM): the TCG VM on the MSHV
#    node must then be missed by (a) and caught by (c), which trips the tests.
python3 - "$rules" "$tmp/$(basename "$rules")" <<'PY'
import sys
src = open(sys.argv[1]).read()
name = 'virt_hypervisor_agent_node_mshv_available'
if src.count(name) < 2:
    sys.exit(f"mutation: expected the MSHV capability in (a) and (c) of {sys.argv[1]}")
open(sys.argv[2], 'w').write(src.replace(name, 'virt_hypervisor_agent_node_mshv_available_ignored'))
PY
mutant "MSHV capability ignored"

# Runbooks: every alert names its node in the summary (but the one about no agent at all) and has
# runbook_url = the placeholder base + deploy/README.md#<alert name in lower case>, and that section
# ("### <alert>" under "## Runbooks") exists with what it means, how to confirm it, how to fix it.
bin=$(deploy_venv)
"$bin/python" - "$rules" deploy/README.md <<'PY' || fail "runbooks ($rules, deploy/README.md)"
import re, sys, yaml
rules, readme = sys.argv[1], sys.argv[2]
base = 'https://virt-hypervisor-agent.invalid/deploy/README.md#'
m = re.search(r'^## Runbooks\n(.*?)(?=^## )', open(readme).read(), re.M | re.S)
if not m:
    sys.exit(f'{readme}: no "## Runbooks" section')
sections = {}
for part in re.split(r'^### ', m.group(1), flags=re.M)[1:]:
    head, _, body = part.partition('\n')
    sections[head.strip()] = body
alerts = [r for g in yaml.safe_load(open(rules))['groups'] for r in g['rules'] if 'alert' in r]
errs = []
for r in alerts:
    name, ann = r['alert'], r.get('annotations') or {}
    if ann.get('runbook_url') != base + name.lower():
        errs.append(f'{name}: runbook_url is {ann.get("runbook_url")!r}, expected {base + name.lower()!r}')
    if name != 'VirtHypervisorAgentAbsent' and '$labels.node' not in ann.get('summary', ''):
        errs.append(f'{name}: the summary does not name the node')
    body = sections.get(name)
    if body is None:
        errs.append(f'{name}: no "### {name}" section under "## Runbooks" in {readme}')
        continue
    errs += [f'{name}: its runbook has no {p}' for p in ('**Means.**', '**Confirm.**', '**Fix.**') if p not in body]
extra = sorted(set(sections) - {r['alert'] for r in alerts})
if extra:
    errs.append(f'{readme}: runbook sections without an alert: {extra}')
if errs:
    sys.exit('\n'.join(errs))
print(f'check-prometheus: runbooks: {len(alerts)} alerts, each with runbook_url and its section: ok')
PY

# The Grafana dashboard: a dashboard model whose every panel reads the ${datasource} variable and has
# PromQL targets (tests/e2e_dashboard.rs runs each against real data).
"$bin/python" - "$dashboard" <<'PY' || fail "$dashboard"
import json, sys
path = sys.argv[1]
d = json.load(open(path))
errs = []
if not d.get('uid') or not d.get('title'):
    errs.append('uid and title must be set')
variables = {v.get('name'): v for v in (d.get('templating') or {}).get('list', [])}
if (variables.get('datasource') or {}).get('type') != 'datasource' or variables['datasource'].get('query') != 'prometheus':
    errs.append('a "datasource" variable of type datasource (prometheus) is needed')
ids, n = set(), 0
def walk(panels):
    global n
    for p in panels:
        if p.get('id') in ids:
            errs.append(f'panel id {p.get("id")} used twice')
        ids.add(p.get('id'))
        if p.get('type') == 'row':
            walk(p.get('panels') or [])
            continue
        title, targets = p.get('title'), p.get('targets') or []
        if not targets:
            errs.append(f'panel {title!r}: no targets')
        refs = [t.get('refId') for t in targets]
        if len(set(refs)) != len(refs):
            errs.append(f'panel {title!r}: refIds repeat')
        for t in [p] + targets:
            if (t.get('datasource') or {}).get('uid') != '${datasource}':
                errs.append(f'panel {title!r}: datasource must be ${{datasource}}')
        errs.extend(f'panel {title!r}: a target without expr' for t in targets if not t.get('expr'))
        n += 1
walk(d.get('panels') or [])
if errs:
    sys.exit('\n'.join(f'{path}: {e}' for e in errs))
print(f'check-prometheus: {path}: {n} panels, each on ${{datasource}} with PromQL targets: ok')
PY

# Collector config: the collector's own validation (the minimal collector of otel/builder-config.yaml,
# built and cached by scripts/build-collector.sh), then what this pipeline needs of it.
bash "$(dirname "${BASH_SOURCE[0]}")/../../scripts/build-collector.sh" --validate >/dev/null ||
    fail "$collector, $collector_dev: otelcol-vha validate"
for profile in production:"$collector" development:"$collector_dev"; do
"$bin/python" - "${profile#*:}" "${profile%%:*}" <<'PY' || fail "${profile#*:}"
import re, sys, yaml
path, profile = sys.argv[1], sys.argv[2]
c = yaml.safe_load(open(path))
errs = []
def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
def default(v):
    """The value a ${env:VAR:-default} reference takes when VAR is unset."""
    m = re.fullmatch(r'\$\{env:[A-Z0-9_]+:-(.*)\}', str(v))
    return m.group(1) if m else v
if default(get(c, 'receivers', 'otlp', 'protocols', 'grpc', 'endpoint')) != '0.0.0.0:4317':
    errs.append('otlp grpc endpoint must default to 0.0.0.0:4317')
if default(get(c, 'receivers', 'otlp', 'protocols', 'http', 'endpoint')) != '0.0.0.0:4318':
    errs.append('otlp http endpoint must default to 0.0.0.0:4318')
prw = get(c, 'exporters', 'prometheus_remote_write') or {}
if not str(default(prw.get('endpoint', ''))).endswith('/api/v1/write'):
    errs.append('prometheus_remote_write endpoint must end with /api/v1/write')
if profile == 'production':
    for proto in ('grpc', 'http'):
        tls = get(c, 'receivers', 'otlp', 'protocols', proto, 'tls') or {}
        for key in ('cert_file', 'key_file', 'client_ca_file'):
            if not tls.get(key):
                errs.append(f'otlp {proto} receiver: tls.{key} must be set (TLS, client certificates)')
    if not str(default(prw.get('endpoint', ''))).startswith('https://'):
        errs.append('prometheus_remote_write endpoint must default to https://')
    if get(prw, 'tls', 'insecure') or not get(prw, 'tls', 'ca_file'):
        errs.append('prometheus_remote_write: tls.ca_file, and not insecure')
    if not get(prw, 'headers', 'Authorization'):
        errs.append('prometheus_remote_write: an Authorization header')
elif get(prw, 'tls', 'insecure') is not True:
    errs.append('prometheus_remote_write tls.insecure must be true for plain http')
if get(prw, 'resource_to_telemetry_conversion', 'enabled') is None:
    errs.append('resource_to_telemetry_conversion.enabled must be set explicitly')
if get(c, 'exporters', 'debug') is None:
    errs.append('a debug exporter must be defined (the debug toggle)')
pipes = get(c, 'service', 'pipelines') or {}
m = pipes.get('metrics')
if not m:
    errs.append('service.pipelines.metrics missing')
else:
    if m.get('receivers') != ['otlp']:
        errs.append('metrics pipeline receivers must be [otlp]')
    if (m.get('processors') or []) != ['memory_limiter', 'vhafilter', 'batch']:
        errs.append('metrics pipeline processors must be memory_limiter, vhafilter (allowlist), batch')
    if not get(c, 'processors', 'vhafilter', 'metric_names'):
        errs.append('vhafilter: the allowlist (metric_names) is missing')
    if 'prometheus_remote_write' not in (m.get('exporters') or []):
        errs.append('metrics pipeline must export to prometheus_remote_write')
for name, p in pipes.items():
    if not name.startswith('metrics'):
        errs.append(f'pipeline {name}: only metrics pipelines expected')
    for kind in ('receivers', 'processors', 'exporters'):
        for comp in p.get(kind) or []:
            if get(c, kind, comp) is None and comp not in (c.get(kind) or {}):
                errs.append(f'pipeline {name}: {kind[:-1]} {comp} is not defined')
for ext in get(c, 'service', 'extensions') or []:
    if ext not in (c.get('extensions') or {}):
        errs.append(f'extension {ext} is not defined')
if errs:
    print('\n'.join(f'{path}: {e}' for e in errs), file=sys.stderr)
    sys.exit(1)
print(f'check-prometheus: {path}: {profile} structure ok (otlp 0.0.0.0:4317/4318 -> memory_limiter -> vhafilter -> batch -> prometheus_remote_write)')
PY
done

"$bin/yamllint" -s -d "$DEPLOY_YAMLLINT_CONFIG" "$collector" "$collector_dev" "$prom_cfg" "$rules" "$rules_test" \
    || fail "yamllint"
echo "check-prometheus: yamllint: ok"
echo "check-prometheus: PASS"
