//! `laddnet-bench`: laddnet measured against the transport's own limit.
//!
//! Every scenario runs a real `laddnet node` and, interleaved with it, a
//! bare tonic mutual-TLS echo server (`laddnet-bench echo`) with the same
//! CA, certificates and message shapes; each figure is reported with its
//! baseline and the median of the per-pair ratios. Servers are pinned to
//! core 0 (`taskset`), this process to core 1 (`scripts/bench.sh`), and
//! server CPU and memory are read from `/proc`. Nothing here is a test:
//! CI builds it but never times anything.

mod echo;
mod load;
mod procfs;
mod scenarios;
mod servers;

use laddnet_bench::stalls;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "laddnet-bench", about = "laddnet's benchmark suite")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The baseline server (started by the scenarios).
    Echo {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        crl: PathBuf,
        #[arg(long, default_value = "0.0.0.0:0")]
        listen: std::net::SocketAddr,
        /// Only the TLS handshake (the reconnect storm's baseline).
        #[arg(long)]
        handshake_only: bool,
    },
    /// Meter events acknowledged per server CPU-second.
    Ingest {
        #[arg(long, default_value_t = 50)]
        chargers: usize,
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Nine, not five: the node's rate moves ±15 % from one process
        /// to the next (42,000–57,000 in one run), the echo's by half as
        /// much, and the median of five pairs moved 17 % between runs.
        #[arg(long, default_value_t = 9)]
        pairs: usize,
    },
    /// Acknowledged meter events lost when the node is SIGKILLed under
    /// ingest load (must be none).
    Sigkill {
        #[arg(long, default_value_t = 50)]
        chargers: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Chargers re-admitted (TLS + boot accepted) per second, against a
    /// raw rustls handshake loop.
    Reconnect {
        #[arg(long, default_value_t = 10_000)]
        chargers: usize,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
    },
    /// Start to accepting with a store holding many open sessions, against
    /// the same node on an empty store.
    ColdStart {
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        #[arg(long, default_value_t = 9)]
        pairs: usize,
    },
    /// Authorize round trips at a fixed rate with meter traffic in the
    /// background.
    Authorize {
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 50)]
        background_chargers: usize,
        #[arg(long, default_value_t = 20)]
        background_rate: u64,
        /// Seconds each server has the load per pair (in turns of
        /// 100 ms, so both see the same stretch of the machine's stalls).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// 24: a fresh node's p99 differs from the next one's by up to
        /// 2.5x in calm weather, and the median of 12 pairs' ratios moved
        /// by 13-17 % from run to run.
        #[arg(long, default_value_t = 24)]
        pairs: usize,
    },
    /// The machine's speed: a fixed user-space workload, best of 5
    /// passes, in milliseconds (run it on the server core).
    Speed,
    /// Idle mutual-TLS chargers held, and server memory per charger.
    Density {
        #[arg(long, default_value_t = 15_000)]
        chargers: usize,
        #[arg(long, default_value_t = 5)]
        pairs: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The echo server runs as the node does (tokio's multi-threaded
    // runtime, one worker per core it is pinned to). The load runs on one
    // thread: it is pinned to one core, where a second thread would only
    // take turns with the first (a reply waiting out another thread's
    // time slice shows up as the server's latency).
    let rt = match cli.cmd {
        Cmd::Echo { .. } => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
    };
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let rows = match cli.cmd {
        Cmd::Speed => {
            println!("{:.1}", laddnet_bench::speed::best_of(5).as_secs_f64() * 1e3);
            return Ok(());
        }
        Cmd::Echo {
            root,
            cert,
            key,
            crl,
            listen,
            handshake_only,
        } => {
            let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let tls = laddnet_pki::tls::mtls_server_config(
                &read(&root)?,
                laddnet_pki::tls::crl_from_pem(&read(&crl)?)?,
                laddnet_pki::tls::certs_from_pem(&read(&cert)?)?,
                laddnet_pki::tls::key_from_pem(&read(&key)?)?,
                None,
            )?;
            if handshake_only {
                return echo::serve_handshakes(listen, tls).await;
            }
            return echo::serve(listen, tls).await;
        }
        Cmd::Ingest {
            chargers,
            window,
            seconds,
            pairs,
        } => {
            scenarios::ingest(scenarios::IngestOpts {
                chargers,
                window,
                seconds,
                pairs,
            })
            .await?
        }
        Cmd::Density { chargers, pairs } => scenarios::density(scenarios::DensityOpts { chargers, pairs }).await?,
        Cmd::Sigkill { chargers, rounds } => scenarios::sigkill(chargers, rounds).await?,
        Cmd::Reconnect {
            chargers,
            concurrency,
            pairs,
        } => scenarios::reconnect(chargers, concurrency, pairs).await?,
        Cmd::Authorize {
            rate,
            background_chargers,
            background_rate,
            seconds,
            pairs,
        } => {
            scenarios::authorize(scenarios::AuthorizeOpts {
                rate,
                background_chargers,
                background_rate,
                seconds,
                pairs,
            })
            .await?
        }
        Cmd::ColdStart { sessions, pairs } => scenarios::cold_start(sessions, pairs).await?,
    };
    if !servers::can_pin() {
        eprintln!("note: not pinned (taskset or a second core is missing); ratios are noisier");
    }
    print!("{}", scenarios::table(&rows));
    Ok(())
}
