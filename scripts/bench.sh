#!/usr/bin/env bash
# Runs every benchmark and rewrites docs/performance.md with their tables.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p laddnet-node -p laddnet-bench
bench=target/release/laddnet-bench
# The load on core 1; the servers pin themselves to core 0.
load=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then load=(taskset -c 1); fi
ingest=$("${load[@]}" "$bench" ingest)
density=$("${load[@]}" "$bench" density)
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
  echo "## Fleet: laddnet against a bare tonic mutual-TLS echo"
  echo
  echo "Command: \`scripts/bench.sh\` (\`laddnet-bench ingest\`, \`laddnet-bench density\`)."
  echo "Machine: $machine. Date: $(date -u +%Y-%m-%d)."
  echo
  echo "$ingest"
  echo "$density"
  echo
  cat <<'NOTES'
Each figure is the median of 5 interleaved pairs (echo, node, echo,
node …); the ratio is the median of the per-pair ratios. The baseline is
`laddnet-bench echo`: tonic with the node's rustls configuration, the same
CA, certificates and `ChargerService` messages, answering every message at
once and storing nothing. Servers run pinned to core 0 (`taskset`), the
load on core 1; server CPU and RSS come from `/proc/PID/stat` and
`/proc/PID/status`. Servers are restarted for every measurement.

- **Ingest**: 50 chargers each keep 16 meter events in flight on their
  Attach stream (one session each, 11 kW, consistent energy); events
  acknowledged during 5 s of steady state, divided by the server's CPU
  time in that window. The node acknowledges an event only once it is
  durable (group commit). The per-charger message limit is lifted so one
  benchmark charger stands for many.
- **Density**: chargers connect (TLS, Attach, Boot) over 127.0.0.x and stay
  idle; the server's RSS growth divided by the connections held.

**Ingest against its target.** Profile (`perf record -g -p <node pid>`
during the run, 2026-11-22): kernel context switches and the virtio disk's
writes are over a quarter of the samples, then malloc/free and redb's
page cache; laddnet's own code is under 1 %. Every event is one durable
redb transaction (one fsync) behind a `spawn_blocking` hand-off. The next
step is one writer that commits the events waiting together (group
commit) and acknowledges each only after that commit.

Not measured yet: reconnect storm, session end → CDR under load, cold
start with 100,000 open sessions, panicked-actor replacement, and zero
loss on SIGKILL inside the ingest scenario (a test covers the property:
`tests/tests/crash.rs`).

NOTES
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
