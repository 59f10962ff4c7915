//! The scenarios: each runs interleaved pairs (echo, node, echo, node …)
//! and reports medians and the median of the per-pair ratios.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::load;
use crate::procfs;
use crate::servers::{self, Fleet, Server};

/// One line of the report.
pub struct Row {
    pub figure: String,
    pub laddnet: String,
    pub baseline: String,
    pub ratio: f64,
    pub target: String,
    pub met: bool,
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The node with the per-charger message limit lifted: one benchmark
/// charger stands for many real ones.
fn node_env() -> Vec<(&'static str, String)> {
    vec![
        ("LADDNET_SESSIONS__MAX_MESSAGES_PER_SECOND", "1000000".into()),
        ("LADDNET_SESSIONS__BURST", "1000000".into()),
    ]
}

/// Loopback address `i` of many, so connections' 4-tuples spread.
fn spread(server: &Server, i: usize) -> std::net::SocketAddr {
    let ip = std::net::Ipv4Addr::new(127, 0, (i / 250 % 250) as u8, (1 + i % 250) as u8);
    std::net::SocketAddr::new(ip.into(), server.addr.port())
}

pub struct IngestOpts {
    pub chargers: usize,
    pub window: usize,
    pub seconds: u64,
    pub pairs: usize,
}

/// Acknowledged meter events per second of the server's CPU, and per
/// second of wall time.
async fn ingest_once(fleet: &Fleet, server: &Server, round: usize, o: &IngestOpts) -> anyhow::Result<(f64, f64)> {
    let attached: Vec<_> = futures::stream::iter(fleet.chargers.iter().take(o.chargers).enumerate())
        .map(|(i, c)| load::attach(fleet, c, spread(server, i)))
        .buffer_unordered(32)
        .collect()
        .await;
    let (acked, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let mut tasks = Vec::new();
    for (i, a) in attached.into_iter().enumerate() {
        let a = a?;
        tasks.push(tokio::spawn(load::charge(
            a,
            format!("bench-{round}-{i}-{}", std::process::id()),
            o.window,
            acked.clone(),
            stop.clone(),
        )));
    }
    // Warm up, then measure a window of steady state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tck = procfs::ticks_per_second();
    let (a0, c0, t0) = (
        acked.load(Ordering::Relaxed),
        procfs::cpu_ticks(server.pid())?,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(o.seconds)).await;
    let (a1, c1, wall) = (
        acked.load(Ordering::Relaxed),
        procfs::cpu_ticks(server.pid())?,
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let events = (a1 - a0) as f64;
    let cpu = (c1 - c0) as f64 / tck;
    Ok((events / cpu.max(1.0 / tck), events / wall.as_secs_f64()))
}

pub async fn ingest(o: IngestOpts) -> anyhow::Result<Vec<Row>> {
    let fleet = tokio::task::spawn_blocking({
        let n = o.chargers;
        move || Fleet::create(n)
    })
    .await??;
    let (mut base, mut ours, mut ratios, mut base_wall, mut ours_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..o.pairs {
        let echo = servers::start_echo(&fleet)?;
        let (b, bw) = ingest_once(&fleet, &echo, round, &o).await?;
        echo.kill();
        let node = servers::start_node(&fleet, &node_env())?;
        let (n, nw) = ingest_once(&fleet, &node, round, &o).await?;
        node.kill();
        eprintln!("ingest pair {round}: echo {b:.0}/CPU-s ({bw:.0}/s), node {n:.0}/CPU-s ({nw:.0}/s)");
        ratios.push(n / b);
        base.push(b);
        ours.push(n);
        base_wall.push(bw);
        ours_wall.push(nw);
    }
    let ratio = median(&mut ratios);
    Ok(vec![
        Row {
            figure: format!(
                "ingest: acknowledged meter events per server CPU-second ({} chargers, {} in flight each)",
                o.chargers, o.window
            ),
            laddnet: format!("{:.0}", median(&mut ours)),
            baseline: format!("echo: {:.0}", median(&mut base)),
            ratio,
            target: "≥ 0.6×".into(),
            met: ratio >= 0.6,
        },
        Row {
            figure: "ingest: acknowledged events per second of wall time (server on one core)".into(),
            laddnet: format!("{:.0}", median(&mut ours_wall)),
            baseline: format!("echo: {:.0}", median(&mut base_wall)),
            ratio: median(&mut ours_wall) / median(&mut base_wall),
            target: "—".into(),
            met: true,
        },
    ])
}

pub struct DensityOpts {
    pub chargers: usize,
    pub pairs: usize,
}

/// Connects every charger, then reads the server's RSS: bytes per
/// connection beyond the idle server, and how many got in.
async fn density_once(fleet: &Fleet, server: &Server, n: usize) -> anyhow::Result<(f64, usize)> {
    // Let the server settle, then take its idle footprint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = procfs::rss_bytes(server.pid())?;
    let attached: Vec<_> = futures::stream::iter(fleet.chargers.iter().take(n).enumerate())
        .map(|(i, c)| load::attach(fleet, c, spread(server, i)))
        .buffer_unordered(64)
        .collect()
        .await;
    let held: Vec<_> = attached.into_iter().filter_map(Result::ok).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let full = procfs::rss_bytes(server.pid())?;
    let connected = held.len();
    drop(held);
    Ok((full.saturating_sub(idle) as f64 / connected.max(1) as f64, connected))
}

pub async fn density(o: DensityOpts) -> anyhow::Result<Vec<Row>> {
    let fleet = tokio::task::spawn_blocking({
        let n = o.chargers;
        move || Fleet::create(n)
    })
    .await??;
    let (mut base, mut ours, mut ratios, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..o.pairs {
        let echo = servers::start_echo(&fleet)?;
        let (b, bn) = density_once(&fleet, &echo, o.chargers).await?;
        echo.kill();
        let node = servers::start_node(&fleet, &[])?;
        let (n, nn) = density_once(&fleet, &node, o.chargers).await?;
        node.kill();
        eprintln!(
            "density pair {round}: echo {:.1} KiB/conn ({bn} connected), node {:.1} KiB/conn ({nn} connected)",
            b / 1024.0,
            n / 1024.0
        );
        ratios.push(n / b);
        base.push(b);
        ours.push(n);
        counts.push(nn as f64);
    }
    let ratio = median(&mut ratios);
    let connected = median(&mut counts) as usize;
    Ok(vec![Row {
        figure: format!(
            "density: server RSS per idle mTLS charger ({connected} of {} connected)",
            o.chargers
        ),
        laddnet: format!("{:.1} KiB", median(&mut ours) / 1024.0),
        baseline: format!("echo: {:.1} KiB", median(&mut base) / 1024.0),
        ratio,
        target: "≥ 15,000 connected, ≤ 1.5×".into(),
        met: connected >= 15_000 && ratio <= 1.5,
    }])
}

pub fn table(rows: &[Row]) -> String {
    let mut s =
        String::from("| figure | laddnet | baseline (same run) | ratio | target | met |\n|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {} | {} |\n",
            r.figure,
            r.laddnet,
            r.baseline,
            r.ratio,
            r.target,
            if r.met { "yes" } else { "**no**" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
