#!/usr/bin/env bash
# Fail when a locked dependency needs a newer Rust than the package's declared rust-version (the
# Containerfile builds with that version). Fix with `cargo update -p CRATE --precise OLDER`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
def v(s): return tuple(int(x) for x in (s.split(".") + ["0", "0"])[:3])
d = json.load(sys.stdin)
root = next(p for p in d["packages"] if p["name"] == "virt-hypervisor-agent")
declared = root["rust_version"]
msrv = v(declared)
bad = [(p["name"], p["version"], p["rust_version"]) for p in d["packages"]
       if p.get("rust_version") and v(p["rust_version"]) > msrv]
for name, ver, rv in bad:
    print(f"check-msrv: {name} {ver} needs Rust {rv} > rust-version {declared}")
sys.exit(1 if bad else 0)
'
echo "check-msrv: every locked dependency builds with the declared rust-version"
