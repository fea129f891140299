#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each) and fail on any crash.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
# Needs cargo-fuzz (`cargo install --locked cargo-fuzz`); libFuzzer's sanitizer flags need a
# nightly compiler, or the stable one with RUSTC_BOOTSTRAP=1, which is what this uses.
# Crashing inputs are left in fuzz/artifacts/<target>/; corpora grow in fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=(config_loader domain_xml)
cargo fuzz build
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    # Seeds: the shipped configs, the XML fixtures.
    case "$t" in
        config_loader) cp -n config/*.yaml "fuzz/corpus/$t/" 2>/dev/null || true ;;
        domain_xml) cp -n tests/fixtures/xml/*.xml config/demo-node.xml "fuzz/corpus/$t/" 2>/dev/null || true ;;
    esac
    echo "== fuzz $t for ${secs}s"
    # -rss_limit_mb: a config or XML input must never need much memory (the alias bomb did).
    cargo fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=1024 -max_len=65536 \
        -print_final_stats=1
done
echo "fuzz: no crashes"
