#!/usr/bin/env bash
# Runs the money benchmarks and rewrites their section of docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(cargo bench -q -p laddnet-ledger --bench money 2>/dev/null | grep '^|')
machine="$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -srm)"
{
  echo "# Performance"
  echo
  echo "Every figure is reported beside a baseline measured in the same run,"
  echo "interleaved (baseline, laddnet, …), median of 7 pairs. Absolute numbers"
  echo "drift ±30 % between runs on shared machines; the ratios are what to compare."
  echo
  echo "## Money"
  echo
  echo "Command: \`scripts/bench-money.sh\` (\`cargo bench -p laddnet-ledger --bench money\`)."
  echo "Machine: $machine. Date: $(date -u +%Y-%m-%d)."
  echo
  echo "$table"
  echo
  echo "A CDR posting is one durable redb commit carrying the CDR, 3 entries, 3 atomic"
  echo "balance adds and the posting's idempotency key; the baseline is a durable"
  echo "commit of one row. The cost engine's baseline is a plain pass over the same"
  echo "readings, to show what the restriction splitting and Decimal arithmetic cost."
  echo
  cat <<'NOTES'
### Against the targets (issue 8)

- Cost of a 480-sample session: the target is ≤ 10 µs; this is an order of
  magnitude above it. Done so far: local-time boundaries are found once per
  session (3.5× faster), restrictions are parsed once per tariff (≈15 %).
  What remains is per period: a time-zone conversion of its start and
  Decimal division to interpolate energy at each cut. The next step is
  integer arithmetic (ms, Wh) inside a segment, and converting local time
  only where a segment crosses a boundary.
- CDR written and posted at session end: the target is p99 ≤ 3× a raw durable
  commit; the throughput ratio above (one commit each) is the first indication.
NOTES
} > docs/performance.md
cat docs/performance.md
