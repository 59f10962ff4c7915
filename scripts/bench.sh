#!/usr/bin/env bash
# Runs every benchmark and rewrites docs/performance.md with their tables.
set -euo pipefail
cd "$(dirname "$0")/.."
table=$(cargo bench -q -p laddnet-ledger --bench money 2>/dev/null | grep '^|')
authz=$(cargo bench -q -p laddnet-tests --bench authz 2>/dev/null)
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
  echo "Command: \`scripts/bench.sh\` (\`cargo bench -p laddnet-ledger --bench money\`)."
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

## Authorization at the charger

Command: `scripts/bench.sh` (`cargo bench -p laddnet-tests --bench authz`).

NOTES
  echo "$authz"
  cat <<'NOTES'

A real node on loopback; one charger on its mutual-TLS Attach stream sends
`Authorize` on a fixed schedule (its per-charger message limit lifted, so it
stands for a fleet's worth of chargers). Latency runs from when each request
was due, so a slow answer also counts against the ones queued behind it. The
baseline is a `Heartbeat` on the same stream at the same rate, interleaved:
the same TLS, HTTP/2 and dispatch without the authorization. An authorization
is a blind-index lookup (HMAC of the card), the token and account records,
the site's access rules, the open-session count and the tariff's energy price
at this charger.
NOTES
} > docs/performance.md
cat docs/performance.md
