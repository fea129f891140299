#!/usr/bin/env bash
# Check deploy/kubernetes/daemonset.yaml:
#   1. kubernetes-validate --strict (offline OpenAPI schemas; unknown fields are errors) against the
#      oldest and newest Kubernetes versions it ships (1.25 and 1.37);
#   2. structural checks for what the agent needs (mounts, env, securityContext, scheduling);
#   3. yamllint;
#   4. if an agent binary is available (VHA_AGENT_BIN, else target/release or target/debug), run
#      `virt-hypervisor-agent --config <the ConfigMap's config.yaml> check-config` with the
#      DaemonSet's environment, so the config keys and env names are checked by the agent itself.
set -euo pipefail
# shellcheck source=tests/deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$DEPLOY_ROOT"

manifest="${VHA_MANIFEST:-deploy/kubernetes/daemonset.yaml}"
fail() { echo "check-k8s: FAIL: $*" >&2; exit 1; }
[[ -f "$manifest" ]] || fail "missing $manifest"

bin=$(deploy_venv)

# recursiveReadOnly (the kubelet pods mount) is in the API from 1.30, on by default from 1.31.
for k in 1.31.0 1.37.0; do
    "$bin/kubernetes-validate" --strict --quiet -k "$k" "$manifest" || fail "kubernetes-validate --strict -k $k"
    echo "check-k8s: kubernetes-validate --strict (Kubernetes $k): ok"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$bin/python" - "$manifest" "$tmp" <<'PY' || fail "structure of $manifest"
import sys, yaml
path, tmp = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d['kind'], []).append(d)
errs = []
def need(cond, msg):
    if not cond:
        errs.append(msg)

for kind in ('Namespace', 'ServiceAccount', 'ConfigMap', 'DaemonSet'):
    need(len(by_kind.get(kind, [])) == 1, f'exactly one {kind} expected')
if errs:
    sys.exit('\n'.join(errs))
ns = by_kind['Namespace'][0]['metadata']['name']
for d in docs:
    if d['kind'] != 'Namespace':
        need(d['metadata'].get('namespace') == ns, f"{d['kind']} must be in namespace {ns}")

ds = by_kind['DaemonSet'][0]
pod = ds['spec']['template']['spec']
need(pod.get('serviceAccountName') == by_kind['ServiceAccount'][0]['metadata']['name'], 'serviceAccountName must name the ServiceAccount')
need(pod.get('automountServiceAccountToken') is False, 'no service account token (the agent never calls the API)')
# kubevirt.io/schedulable flips to "false" during KubeVirt upgrades while VMs run: never select on it.
need('kubevirt.io/schedulable' not in yaml.safe_dump(pod.get('nodeSelector') or {}) + yaml.safe_dump(pod.get('affinity') or {}), 'no scheduling on kubevirt.io/schedulable (it flips during upgrades)')
need(pod.get('priorityClassName') == 'system-node-critical', 'priorityClassName system-node-critical')
need({'operator': 'Exists'} in (pod.get('tolerations') or []), 'a toleration {operator: Exists} (all nodes)')
need(pod.get('hostNetwork') in (None, False) and pod.get('hostPID') in (None, False), 'no hostNetwork / hostPID')
psc = pod.get('securityContext') or {}
need(psc.get('runAsUser') == 0, 'runAsUser 0 (kubelet pod dirs are root-only)')
need((psc.get('seccompProfile') or {}).get('type') == 'RuntimeDefault', 'seccompProfile RuntimeDefault')

cs = pod['containers']
need(len(cs) == 1, 'one container')
c = cs[0]
sc = c.get('securityContext') or {}
need(sc.get('readOnlyRootFilesystem') is True, 'readOnlyRootFilesystem: true')
need(sc.get('allowPrivilegeEscalation') is False, 'allowPrivilegeEscalation: false')
need(sc.get('privileged') in (None, False), 'not privileged')
caps = sc.get('capabilities') or {}
need(caps.get('drop') == ['ALL'], 'capabilities.drop [ALL]')
need(set(caps.get('add') or []) <= {'DAC_OVERRIDE'}, 'capabilities.add at most DAC_OVERRIDE')
res = c.get('resources') or {}
need('cpu' in (res.get('requests') or {}) and 'memory' in (res.get('requests') or {}), 'cpu and memory requests')
need('memory' in (res.get('limits') or {}), 'a memory limit')
need(not any(k.startswith('devices.kubevirt.io/') for part in ('requests', 'limits') for k in (res.get(part) or {})), 'no device request (nodes without KVM advertise none)')
ports = {p.get('name'): p.get('containerPort') for p in c.get('ports') or []}
for probe, url in (('livenessProbe', '/livez'), ('readinessProbe', '/readyz')):
    hg = (c.get(probe) or {}).get('httpGet') or {}
    need(hg.get('path') == url and hg.get('port') in ('health', ports.get('health')), f'{probe} httpGet {url} on the health port')

env = {e['name']: e for e in c.get('env') or []}
need((env.get('NODE_NAME') or {}).get('valueFrom', {}).get('fieldRef', {}).get('fieldPath') == 'spec.nodeName', 'NODE_NAME from spec.nodeName')
# Discovery is on in the ConfigMap's config (checked below); no variable may turn it off.
need((env.get('VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED') or {'value': 'true'}).get('value') == 'true', 'no VIRT_HYPERVISOR_AGENT_LIBVIRT__DISCOVER__ENABLED other than true')
ep_ref = (env.get('OTEL_EXPORTER_OTLP_ENDPOINT') or {}).get('valueFrom', {}).get('secretKeyRef') or {}
need(ep_ref.get('key') == 'endpoint', 'OTEL_EXPORTER_OTLP_ENDPOINT from a Secret (secretKeyRef, key endpoint)')
tls_dir = '/var/run/secrets/virt-hypervisor-agent/otlp'
for var, f in (('CA_FILE', 'ca.crt'), ('CERT_FILE', 'tls.crt'), ('KEY_FILE', 'tls.key')):
    need((env.get('VIRT_HYPERVISOR_AGENT_EXPORT__TLS__' + var) or {}).get('value') == f'{tls_dir}/{f}', f'VIRT_HYPERVISOR_AGENT_EXPORT__TLS__{var} = {tls_dir}/{f}')
for name in env:
    need(name in ('NODE_NAME', 'RUST_LOG') or name.startswith('VIRT_HYPERVISOR_AGENT_') or name.startswith('OTEL_'), f'unexpected env {name}')

vols = {v['name']: v for v in pod.get('volumes') or []}
mounts = {m['mountPath']: m for m in c.get('volumeMounts') or []}
kp = mounts.get('/var/lib/kubelet/pods')
need(kp is not None, 'mount /var/lib/kubelet/pods')
if kp:
    need(kp.get('readOnly') is True, '/var/lib/kubelet/pods read-only')
    # With propagation, readOnly is not recursive: other pods' secret volumes would be writable.
    need(kp.get('mountPropagation', 'None') == 'None', '/var/lib/kubelet/pods mountPropagation None')
    need(kp.get('recursiveReadOnly') == 'Enabled', '/var/lib/kubelet/pods recursiveReadOnly Enabled')
    need((vols.get(kp['name']) or {}).get('hostPath', {}).get('path') == '/var/lib/kubelet/pods', 'kubelet-pods volume is hostPath /var/lib/kubelet/pods')
for m in mounts.values():
    need(m.get('readOnly') is True, f"mount {m['mountPath']} must be read-only")
    need(m['name'] in vols, f"mount {m['mountPath']} names an undefined volume")
for v in vols.values():
    hp = v.get('hostPath')
    if hp:
        need(hp['path'] in ('/var/lib/kubelet/pods', '/etc/machine-id'), f"unexpected hostPath {hp['path']}")
tm = mounts.get(tls_dir)
need(tm is not None and (vols.get(tm['name']) or {}).get('secret', {}).get('secretName') == ep_ref.get('name'), f'the endpoint Secret mounted at {tls_dir}')
cfg_mount = mounts.get('/etc/virt-hypervisor-agent')
need(cfg_mount is not None and 'configMap' in vols.get(cfg_mount['name'], {}), 'ConfigMap mounted at /etc/virt-hypervisor-agent')

cm = by_kind['ConfigMap'][0]
need(vols.get('config', {}).get('configMap', {}).get('name') == cm['metadata']['name'], 'config volume names the ConfigMap')
cfg = yaml.safe_load(cm['data']['config.yaml'])
lv = cfg.get('libvirt') or {}
need(lv.get('uris') == [], 'config: libvirt.uris: [] (discovery only)')
need((lv.get('discover') or {}).get('enabled') is True, 'config: libvirt.discover.enabled: true')
need(((cfg.get('health') or {}).get('listen') or '').endswith(f":{ports.get('health')}"), 'config: health.listen on the health containerPort')
open(f'{tmp}/config.yaml', 'w').write(cm['data']['config.yaml'])
# check-config below: the Secret's values and files as stand-ins (it only opens the TLS files).
stand_in = {'NODE_NAME': 'node-from-downward-api', 'OTEL_EXPORTER_OTLP_ENDPOINT': 'https://otel-collector.example:4317'}
with open(f'{tmp}/env', 'w') as f:
    for name, e in env.items():
        value = e.get('value', stand_in.get(name))
        if value is None:
            continue
        if value.startswith(tls_dir + '/'):
            value = f'{tmp}/' + value.rsplit('/', 1)[1]
            open(value, 'w').close()
        f.write(f"{name}={value}\n")

if errs:
    print('\n'.join(f'{path}: {e}' for e in errs), file=sys.stderr)
    sys.exit(1)
print(f'check-k8s: {path}: structure ok ({len(docs)} objects)')
PY

"$bin/yamllint" -s -d "$DEPLOY_YAMLLINT_CONFIG" "$manifest" || fail "yamllint $manifest"
echo "check-k8s: yamllint: ok"

agent="${VHA_AGENT_BIN:-}"
if [[ -z "$agent" ]]; then
    for cand in target/release/virt-hypervisor-agent target/debug/virt-hypervisor-agent; do
        [[ -x "$cand" ]] && { agent=$cand; break; }
    done
fi
if [[ -n "$agent" ]]; then
    mapfile -t envs <"$tmp/env"
    if ! out=$(env -i PATH=/usr/bin:/bin "${envs[@]}" "$agent" --config "$tmp/config.yaml" check-config 2>&1); then
        echo "$out" >&2
        fail "$agent check-config rejects the DaemonSet's config/env"
    fi
    echo "check-k8s: $agent check-config accepts the ConfigMap config and the DaemonSet env: ok"
else
    echo "check-k8s: no agent binary built (set VHA_AGENT_BIN): skipped check-config of the ConfigMap"
fi
echo "check-k8s: PASS"
