#!/usr/bin/env bash
# Build the Debian package (scripts/package.sh, cargo-deb) and check what is in it:
#   - control: Depends computed from the binary (libvirt0 among them), architecture, version;
#   - files: the binary in /usr/bin, the unit, /etc/default/virt-hypervisor-agent (0600), the
#     reference config at /etc/virt-hypervisor-agent/config.yaml (0640), the docs; the unit and the
#     config are byte-identical to deploy/systemd/ and config/agent.yaml;
#   - conffiles: both /etc files (dpkg keeps local edits on upgrade and remove);
#   - maintainer scripts: enable + start on install, restart on upgrade (not stop + start), stop on
#     removal, purge of the unit state on purge, and our config check in postinst;
#   - the packaged binary runs (--version) and accepts the packaged config (check-config).
# Installing, upgrading and removing it on a booted systemd is check-nspawn.sh.
# VHA_DEB=path checks a prebuilt package instead of building one.
set -euo pipefail
NODE_CHECK=check-package
# shellcheck source=tests/deploy/lib-node.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib-node.sh"
cd "$DEPLOY_ROOT"

work=$(mktemp -d)
trap 'rc=$?; rm -rf "$work"; print_timings; exit $rc' EXIT

build() { DEB=${VHA_DEB:-$(bash scripts/package.sh)}; node_log "package: $DEB ($(du -h "$DEB" | cut -f1))"; }

check_control() {
    local f
    f=$(dpkg-deb -f "$DEB")
    printf '%s\n' "$f" | sed 's/^/    /' >&2
    grep -q '^Package: virt-hypervisor-agent$' <<<"$f" || node_fail "Package field"
    grep -q "^Architecture: $(dpkg --print-architecture)$" <<<"$f" || node_fail "Architecture field"
    local dep
    dep=$(sed -n 's/^Depends: //p' <<<"$f")
    grep -qE '(^|, )libvirt0( |,|$)' <<<"$dep" || node_fail "Depends lacks libvirt0: $dep"
    grep -qE '(^|, )libc6( |,|$)' <<<"$dep" || node_fail "Depends lacks libc6 (not computed?): $dep"
}

check_files() {
    dpkg-deb -c "$DEB" | awk '{ print $1, $NF }' >"$work/list"
    local want
    for want in '-rwxr-xr-x ./usr/bin/virt-hypervisor-agent' \
        '-rw-r--r-- ./usr/lib/systemd/system/virt-hypervisor-agent.service' \
        '-rw------- ./etc/default/virt-hypervisor-agent' \
        '-rw-r----- ./etc/virt-hypervisor-agent/config.yaml' \
        '-rw-r--r-- ./usr/share/doc/virt-hypervisor-agent/README.md' \
        '-rw-r--r-- ./usr/share/doc/virt-hypervisor-agent/deploy.md' \
        '-rw-r--r-- ./usr/share/doc/virt-hypervisor-agent/copyright'; do
        grep -qxF -- "$want" "$work/list" || { cat "$work/list" >&2; node_fail "package lacks '$want'"; }
    done
    if grep -q '/usr/local/' "$work/list"; then node_fail "files under /usr/local in a package"; fi
    mkdir -p "$work/x"
    dpkg-deb -x "$DEB" "$work/x"
    cmp "$work/x/usr/lib/systemd/system/virt-hypervisor-agent.service" deploy/systemd/virt-hypervisor-agent.service ||
        node_fail "packaged unit differs from deploy/systemd/virt-hypervisor-agent.service"
    cmp "$work/x/etc/virt-hypervisor-agent/config.yaml" config/agent.yaml || node_fail "packaged config differs from config/agent.yaml"
    cmp "$work/x/etc/default/virt-hypervisor-agent" deploy/systemd/virt-hypervisor-agent.default ||
        node_fail "packaged /etc/default file differs"
    grep -q '^ExecStart=/usr/bin/virt-hypervisor-agent ' "$work/x/usr/lib/systemd/system/virt-hypervisor-agent.service" ||
        node_fail "the unit does not start the packaged /usr/bin binary"
    node_log "files: $(wc -l <"$work/list") entries; unit, config and /etc/default identical to the sources"
}

check_scripts() {
    mkdir -p "$work/c"
    dpkg-deb -e "$DEB" "$work/c"
    local cf
    cf=$(cat "$work/c/conffiles")
    for want in /etc/virt-hypervisor-agent/config.yaml /etc/default/virt-hypervisor-agent; do
        grep -qxF "$want" <<<"$cf" || node_fail "conffiles lacks $want: $cf"
    done
    local s
    for s in postinst prerm postrm; do
        [[ -x $work/c/$s ]] || node_fail "no executable $s"
        sh -n "$work/c/$s" || node_fail "$s: syntax"
        ! grep -q '#DEBHELPER#' "$work/c/$s" || node_fail "$s: #DEBHELPER# was not replaced"
    done
    grep -q 'deb-systemd-helper enable virt-hypervisor-agent.service' "$work/c/postinst" || node_fail "postinst does not enable the unit"
    local w
    for w in '_dh_action=restart' '_dh_action=start' 'deb-systemd-invoke $_dh_action virt-hypervisor-agent.service'; do
        grep -qF -- "$w" "$work/c/postinst" || node_fail "postinst does not start (install) / restart (upgrade) the unit: no '$w'"
    done
    (($(grep -c 'Automatically added by cargo-deb' "$work/c/postinst") == 2)) || node_fail "postinst: expected 2 generated snippets"
    grep -q 'check-config' "$work/c/postinst" || node_fail "postinst lacks the config check"
    grep -q 'deb-systemd-invoke stop .*virt-hypervisor-agent.service' "$work/c/prerm" || node_fail "prerm does not stop the unit"
    # Upgrades restart in postinst; the unit must not be stopped by the old prerm on upgrade.
    grep -B3 'deb-systemd-invoke stop' "$work/c/prerm" | grep -q '"\$1" = remove' ||
        node_fail "prerm stops the unit on upgrade too (expected only on remove)"
    grep -q 'deb-systemd-helper purge' "$work/c/postrm" || node_fail "postrm does not purge the unit state"
    node_log "conffiles: $(tr '\n' ' ' <<<"$cf"); postinst enables and (re)starts, prerm stops on remove only, postrm purges"
}

check_binary() {
    "$work/x/usr/bin/virt-hypervisor-agent" --version >&2 || node_fail "packaged binary does not run"
    "$work/x/usr/bin/virt-hypervisor-agent" --config "$work/x/etc/virt-hypervisor-agent/config.yaml" check-config >/dev/null ||
        node_fail "packaged binary rejects the packaged config"
    node_log "packaged binary runs and accepts the packaged config"
}

timed "build the package (scripts/package.sh)" build
timed "control fields" check_control
timed "files" check_files
timed "conffiles and maintainer scripts" check_scripts
timed "packaged binary" check_binary
node_log "PASS"
