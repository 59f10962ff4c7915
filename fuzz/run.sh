#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 120), seeded from fuzz/seeds.
# The toolchain here is stable: RUSTC_BOOTSTRAP lets cargo-fuzz use the
# sanitizer flags it needs. Install once: cargo install cargo-fuzz --locked
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  [ -d "seeds/$t" ] && cp -n seeds/$t/* "corpus/$t/" 2>/dev/null || true
  echo "== $t for ${secs}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 2>&1 | grep -E "^#[0-9]+.*DONE|ERROR|panicked|SUMMARY" || true
done
