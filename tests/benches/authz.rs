//! Authorization latency at the charger, end to end: a real node, a
//! charger on its mutual-TLS Attach stream, `Authorize` sent at a fixed
//! rate for 2,000 drivers' RFID cards (and some unknown ones). The baseline,
//! measured in the same run and interleaved, is a `Heartbeat` on the same
//! stream at the same rate: the same TLS, HTTP/2 and node dispatch, without
//! the authorization (blind-index lookup, account, site, tariff price).
//!
//! One charger carries the load (its per-charger message limit lifted);
//! a real charger authorizes a few times an hour, so the rate stands for a
//! fleet's worth of them.
//!
//! Latency runs from when a request was due, not when it was sent, so a
//! slow answer that delays the next request counts against the next one
//! too (no coordinated omission). Prints a Markdown table for
//! docs/performance.md (`scripts/bench.sh`). Nothing here asserts a time.

use std::time::{Duration, Instant};

use laddnet_proto::v1;
use laddnet_tests::*;
use rand::Rng;

const DRIVERS: usize = 2_000;
const RATE_PER_S: u64 = 200;
const PER_ROUND: usize = 600;
const ROUNDS: usize = 5;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn round(cp: &mut Attached, cards: &[String], authorize: bool) -> Vec<Duration> {
    let every = Duration::from_micros(1_000_000 / RATE_PER_S);
    let start = Instant::now();
    let mut out = Vec::with_capacity(PER_ROUND);
    for i in 0..PER_ROUND {
        let due = start + every * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let payload = if authorize {
            // One in ten cards is unknown to the network.
            let token = if i % 10 == 9 {
                format!("FF{:08X}", rand::thread_rng().r#gen::<u32>())
            } else {
                cards[rand::thread_rng().gen_range(0..cards.len())].clone()
            };
            v1::charger_message::Payload::Authorize(v1::Authorize {
                id_token: token,
                token_type: v1::TokenType::Rfid as i32,
                connector_id: 1,
            })
        } else {
            v1::charger_message::Payload::Heartbeat(v1::Heartbeat {})
        };
        cp.request(payload).await.expect("answered");
        out.push(due.elapsed());
    }
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // One charger stands in for many: its message limit (100/s by
        // default, per charger) is lifted so the node's work is measured.
        let node = TestNode::start_with(|c| c.sessions.max_messages_per_second = 100_000).await;
        node.install_tariff().await;
        let drivers = node.node().state.hub.drivers.clone();
        let cards: Vec<String> = (0..DRIVERS).map(|i| format!("0A{i:08X}")).collect();
        let c2 = cards.clone();
        tokio::task::spawn_blocking(move || {
            use laddnet_drivers::accounts::NewDriver;
            use laddnet_drivers::{PaymentKind, TokenKind};
            for (i, card) in c2.iter().enumerate() {
                let d = drivers
                    .create(
                        NewDriver {
                            name: Some(format!("Bench {i}")),
                            payment: Some(if i % 3 == 0 { PaymentKind::Wallet } else { PaymentKind::Card }),
                            currency: "EUR".into(),
                            max_concurrent_sessions: 1,
                            ..Default::default()
                        },
                        0,
                    )
                    .unwrap();
                if i % 3 == 0 {
                    drivers.adjust_wallet(&d.driver_id, 50.into(), &format!("bench-{i}"), 0).unwrap();
                }
                drivers.add_token(&d.driver_id, TokenKind::Rfid, card, None, 0).unwrap();
            }
        })
        .await
        .unwrap();
        let (_, mut cp) = node.charger("CP-BENCH").await;
        // Warm up both paths.
        round(&mut cp, &cards, false).await;
        round(&mut cp, &cards, true).await;
        let (mut base, mut auth) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            base.extend(round(&mut cp, &cards, false).await);
            auth.extend(round(&mut cp, &cards, true).await);
        }
        base.sort();
        auth.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let row = |name: &str, p: f64| {
            let (a, b) = (pct(&auth, p), pct(&base, p));
            println!(
                "| authorization latency {name} at {RATE_PER_S}/s | {:.0} µs | heartbeat on the same stream: {:.0} µs | {:.2} |",
                us(a),
                us(b),
                us(a) / us(b)
            );
        };
        println!("| figure | laddnet | baseline (same run) | ratio |");
        println!("|---|---|---|---|");
        row("p50", 0.50);
        row("p99", 0.99);
        row("max", 1.0);
        println!(
            "\n{} authorizations and {} heartbeats over mutual TLS, {DRIVERS} drivers, 10 % unknown cards.",
            auth.len(),
            base.len()
        );
    });
}
