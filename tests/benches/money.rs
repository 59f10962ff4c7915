//! Money benchmarks, each beside a baseline measured in the same run,
//! interleaved (baseline, laddnet, baseline, laddnet, …), median of the
//! pairs. Prints a Markdown table; `scripts/bench.sh` puts it in
//! docs/performance.md. Not a test: nothing here asserts a time.
//!
//! - ledger posting (a CDR: 3 entries, 3 atomic adds, the idempotency key,
//!   one durable commit) vs a raw durable single-row commit of the store,
//!   one of each in turn; the p99s leave out, on both sides alike, the
//!   commits a stall of the machine overlapped (`laddnet_bench::stalls`,
//!   as the other tails do), and a pair that met a storm of them is set
//!   aside for another (`stalls::Gate`). It lives here, not in
//!   laddnet-ledger, for that probe: laddnet-bench builds on the ledger,
//!   which cannot depend on it back;
//! - the cost engine on a 480-sample session under a 4-element tariff vs
//!   the same engine and readings under a one-element flat tariff (the
//!   median of the per-pair ratios).

use std::time::{Duration, Instant};

use laddnet_bench::stalls;
use laddnet_core::cost::{Reading, price};
use laddnet_core::tariff::Tariff;
use laddnet_ledger::cdr::Cdr;
use laddnet_store::{RedbStore, Store, StoreExt};
use rust_decimal::Decimal;

const PAIRS: usize = 9;
/// Commits of each side per pair: a pair's p99 is its tenth slowest.
const PER_PAIR: usize = 1_000;
/// The cost engine's pairs take milliseconds each: more of them.
const COST_PAIRS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn cdr(i: usize) -> Cdr {
    Cdr {
        id: format!("bench-{i}"),
        charger_id: "CP-1".into(),
        connector_id: 1,
        site_id: Some("site-1".into()),
        driver_ref: None,
        start_ms: 0,
        stop_ms: 3_600_000,
        meter_start_wh: 0,
        meter_stop_wh: 22_000,
        energy_wh: 22_000,
        charging_s: Decimal::from(3600),
        idle_s: Decimal::ZERO,
        tariff_id: Some("t".into()),
        tariff_version: Some(1),
        currency: "EUR".into(),
        periods: vec![],
        lines: vec![],
        total_excl_vat: Decimal::new(1050, 2),
        total_incl_vat: Decimal::new(1313, 2),
        total_vat: Decimal::new(263, 2),
        flags: vec![],
        review_required: false,
        approved: false,
        stop_reason: String::new(),
        created_at: 0,
        content_hash: String::new(),
    }
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(dir.path().join("bench.redb")).expect("store");
    let tariff = Tariff::parse_json(
        r#"{"id":"bench","currency":"EUR","elements":[
        {"price_components":[{"type":"FLAT","price":0.50,"vat":25,"step_size":1}]},
        {"price_components":[{"type":"ENERGY","price":0.45,"vat":25,"step_size":1}],"restrictions":{"start_time":"07:00","end_time":"21:00"}},
        {"price_components":[{"type":"ENERGY","price":0.32,"vat":25,"step_size":1}]},
        {"price_components":[{"type":"PARKING_TIME","price":6.00,"vat":25,"step_size":300}],"restrictions":{"min_duration":3600}}]}"#,
    )
    .expect("tariff");
    let tz: chrono_tz::Tz = "Europe/Stockholm".parse().expect("tz");
    // 480 samples, one a minute, 8 hours from 17:00 local: crosses 21:00.
    let readings: Vec<Reading> = (0..480)
        .map(|i| Reading {
            at_ms: 1_781_190_000_000 + i * 60_000,
            energy_wh: 1_000_000 + (i as u64) * 180,
            current_ma: 16_000,
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probe = stalls::Probe::start(&(0..cores).collect::<Vec<_>>());
    if probe.is_none() {
        eprintln!("no real-time stall probe here (needs root or CAP_SYS_NICE): the p99s include the machine's stalls");
    }
    // Session end → CDR and ledger committed, one at a time, interleaved
    // with a raw durable single-row commit: per pair run, each side's
    // latencies (with when each began) and commits a second.
    let mut runs = Vec::new();
    let mut gate = stalls::Gate::new(PAIRS);
    let mut next = 0usize;
    while gate.more() {
        let from = Instant::now();
        let (mut raw_t, mut post_t) = (Duration::ZERO, Duration::ZERO);
        let (mut raw_lat, mut end_lat) = (Vec::with_capacity(PER_PAIR), Vec::with_capacity(PER_PAIR));
        for i in 0..PER_PAIR {
            let t = Instant::now();
            store
                .transact(|tx| tx.set(format!("raw-{next}-{i}").as_bytes(), b"x"))
                .expect("commit");
            let took = t.elapsed();
            raw_t += took;
            raw_lat.push((t, took));

            let t = Instant::now();
            // As billing does at session end: price the session, seal the
            // CDR, and write it with its posting in one durable commit.
            let priced = price(&tariff, &readings, &tz).expect("price");
            let mut c = cdr(next);
            std::hint::black_box(&priced);
            c.seal();
            next += 1;
            let json = serde_json::to_vec(&c).expect("json");
            store
                .run(&mut |tx| {
                    tx.set(&laddnet_store::keys::pack(&("cdr", c.id.as_str())), &json)?;
                    laddnet_ledger::ledger::post_cdr(tx, &c)
                        .map(|_| ())
                        .map_err(|e| laddnet_store::StoreError::Internal(e.to_string()))
                })
                .expect("post");
            let took = t.elapsed();
            post_t += took;
            end_lat.push((t, took));
        }
        let seen = probe.as_ref().map(|p| p.stalls()).unwrap_or_default();
        let weather = stalls::per_second(&seen, from, Instant::now());
        eprintln!("money pair {}: {weather:.1} stalls a second", runs.len());
        gate.record(weather);
        runs.push((
            raw_lat,
            end_lat,
            per_second(PER_PAIR, raw_t),
            per_second(PER_PAIR, post_t),
        ));
    }
    let stalls = probe.map(|p| p.finish()).unwrap_or_default();
    let (mut raw, mut posting) = (Vec::new(), Vec::new());
    let (mut raw99s, mut end99s, mut ratios99) = (Vec::new(), Vec::new(), Vec::new());
    for k in gate.kept() {
        let (raw_lat, end_lat, raw_s, post_s) = &runs[k];
        let raw99 = stalls::quantile_clear(raw_lat, &stalls, 0.99).0.as_secs_f64() * 1e6;
        let end99 = stalls::quantile_clear(end_lat, &stalls, 0.99).0.as_secs_f64() * 1e6;
        eprintln!(
            "money pair {k} kept: p99 CDR {end99:.0} µs, raw {raw99:.0} µs, ratio {:.2}",
            end99 / raw99
        );
        raw99s.push(raw99);
        end99s.push(end99);
        ratios99.push(end99 / raw99);
        raw.push(*raw_s);
        posting.push(*post_s);
    }
    let (raw99, end99, ratio99) = (median(raw99s), median(end99s), median(ratios99));
    let v = laddnet_ledger::ledger::verify(&store).expect("verify");
    assert!(
        v.problems.is_empty(),
        "ledger does not verify: {:?}",
        v.problems.first()
    );

    // The cost engine against itself on the simplest tariff there is (one
    // ENERGY element, no restriction) over the same readings: what the
    // four elements, their time-of-day boundaries and the parking rule
    // cost on top. The same code on both sides, so the ratio holds when
    // this machine's speed changes (an unrelated baseline, a bare pass or
    // plain decimal arithmetic, slowed by a different factor).
    let flat_tariff = Tariff::parse_json(
        r#"{"id":"flat","currency":"EUR","elements":[{"price_components":[{"type":"ENERGY","price":0.45,"vat":25,"step_size":1}]}]}"#,
    )
    .expect("tariff");
    let rounds = 2_000;
    let (mut flat, mut engine, mut cost_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut sink = 0u64;
    for _ in 0..COST_PAIRS {
        let t = Instant::now();
        for _ in 0..rounds {
            let c = price(std::hint::black_box(&flat_tariff), std::hint::black_box(&readings), &tz).expect("price");
            sink = sink.wrapping_add(c.lines.len() as u64);
        }
        let f = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        let t = Instant::now();
        for _ in 0..rounds {
            let c = price(std::hint::black_box(&tariff), std::hint::black_box(&readings), &tz).expect("price");
            sink = sink.wrapping_add(c.lines.len() as u64);
        }
        let e = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        flat.push(f);
        engine.push(e);
        cost_ratios.push(e / f);
    }
    std::hint::black_box(sink);
    let (raw, posting, flat, engine, cost_ratio) = (
        median(raw),
        median(posting),
        median(flat),
        median(engine),
        median(cost_ratios),
    );
    println!("| figure | laddnet | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| CDRs written and posted per second (durable) | {posting:.0} | raw single-row durable commits: {raw:.0}/s | {:.2} |",
        posting / raw
    );
    println!(
        "| session end → CDR and ledger committed, p99 (pricing 480 samples included; {}, {PER_PAIR} commits a side each, one of each in turn; commits a stall of the machine overlapped left out, on both sides) | {end99:.0} µs | raw single-row durable commit p99: {raw99:.0} µs | {ratio99:.2} (target ≤ 3) |",
        gate.summary()
    );
    println!(
        "| cost of a 480-sample session, 4-element tariff (target ≤ 10 µs) | {engine:.1} µs ({:.2} M samples/s) | the same engine, one-element flat tariff: {flat:.1} µs | {cost_ratio:.2} |",
        480.0 / engine
    );
}
