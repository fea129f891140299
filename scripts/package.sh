#!/usr/bin/env bash
# Build the Debian package with cargo-deb; print the path of the .deb on stdout.
#
#   scripts/package.sh                     release build + target/debian/virt-hypervisor-agent_<ver>-1_<arch>.deb
#   scripts/package.sh --no-build          package the existing target/release binary
#   scripts/package.sh --deb-revision 2    another revision of the same version (e.g. an upgrade test),
#                                          in target/debian-revision-2/
#
# Install: apt install ./target/debian/virt-hypervisor-agent_*.deb  (enables and starts the unit)
# cargo-deb (crates.io, pinned) is installed once under $VHA_CACHE_DIR/cargo-deb; the build needs
# libvirt-dev and pkg-config, installed with apt-get when missing (as root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_DEB_VERSION=3.8.0
cache=${VHA_CACHE_DIR:-/var/cache/virt-hypervisor-agent-ci}/cargo-deb
log() { printf 'package.sh: %s\n' "$*" >&2; }

no_build=() revision=() rev=1
while (($#)); do
    case $1 in
    --no-build) no_build=(--no-build) ;;
    --deb-revision) revision=(--deb-revision "$2") rev=$2; shift ;;
    *) log "usage: $0 [--no-build] [--deb-revision N]"; exit 2 ;;
    esac
    shift
done

if [[ $("$cache/bin/cargo-deb" --version 2>/dev/null | awk '{print $2}') != "$CARGO_DEB_VERSION" ]]; then
    log "installing cargo-deb $CARGO_DEB_VERSION into $cache"
    cargo install --quiet --locked --force cargo-deb --version "$CARGO_DEB_VERSION" --root "$cache" >&2
fi
for p in libvirt-dev pkg-config dpkg-dev; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
        [[ $(id -u) -eq 0 ]] || { log "ERROR: $p is missing (apt-get install $p)"; exit 1; }
        log "installing $p"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$p" >/dev/null
    fi
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
# cargo-deb deletes every other .deb of the package in target/debian, whatever --output says: write
# other revisions to their own directory and put back what it removed.
dir=target/debian
[[ $rev == 1 ]] || dir=target/debian-revision-$rev
deb=$dir/virt-hypervisor-agent_${version}-${rev}_$(dpkg --print-architecture).deb
mkdir -p "$dir"
stash=$(mktemp -d)
trap 'rm -rf "$stash"' EXIT
cp -p target/debian/*.deb "$stash/" 2>/dev/null || true
out=$("$cache/bin/cargo-deb" --locked "${no_build[@]}" "${revision[@]}" --output "$deb" 2>&1) || {
    printf '%s\n' "$out" >&2
    exit 1
}
for f in "$stash"/*.deb; do
    [[ -e $f && ! -e target/debian/${f##*/} && ${f##*/} != "${deb##*/}" ]] && mv "$f" target/debian/
done
[[ -f $deb ]] || { log "ERROR: cargo-deb wrote no $deb"; printf '%s\n' "$out" >&2; exit 1; }
log "built $deb"
printf '%s\n' "$deb"
