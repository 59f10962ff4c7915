//! `laddnet`: run a node, or bring up a whole local network with `up`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use laddnet_core::OperatorName;
use laddnet_node::{NodeConfig, RunningNode, init_data_dir};

mod fleet;

#[derive(Parser)]
#[command(name = "laddnet", version, about = "laddnet: EV charging network manager")]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the data dir if needed (CA, admin credentials, configs), then
    /// run a node on it until Ctrl-C. Running it again resumes.
    Up {
        #[arg(long, default_value = "laddnet-data", env = "LADDNET_DATA_DIR")]
        data_dir: PathBuf,
        /// Address of the mutual-TLS listener (port 0 picks a free one).
        #[arg(long)]
        mtls_addr: Option<std::net::SocketAddr>,
        #[arg(long)]
        enrollment_addr: Option<std::net::SocketAddr>,
        /// Simulated chargers to run against the node (0: none).
        #[arg(long, default_value_t = 20)]
        chargers: usize,
        /// Inject a fault into a random simulated charger every N seconds (0: never).
        #[arg(long, default_value_t = 20)]
        fault_every_s: u64,
    },
    /// Run a node from a config file.
    Node {
        #[arg(long, short, default_value = "laddnet-data/laddnet.toml", env = "LADDNET_CONFIG")]
        config: PathBuf,
    },
    /// Create a data dir: CA, key-encryption key, store, admin credentials.
    Init {
        #[arg(long, default_value = "laddnet-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// The master keys that protect personal data (on this node's host).
    Vault {
        #[command(subcommand)]
        cmd: VaultCmd,
    },
    /// The shared store for a small cluster without FoundationDB.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Check a config file (with LADDNET_* overrides) and print it resolved.
    Validate {
        #[arg(long, short, default_value = "laddnet-data/laddnet.toml", env = "LADDNET_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LADDNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load(config: &std::path::Path) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig::load(config, std::env::vars())?)
}

/// Ctrl-C, or SIGTERM (what systemd and container runtimes send).
/// Ctrl-C or SIGTERM, caught from the moment this is called (not from
/// the first poll): a signal that arrives while the node is still
/// starting stops it cleanly once it is up, instead of killing it.
fn stop_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            return Box::pin(async move {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
        }
    }
    Box::pin(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Serve this data dir's store to the nodes of a cluster over mutual
    /// TLS (one redb file, not replicated: FoundationDB is the production
    /// backend). Writes credentials for each `--client` node that has none
    /// into `<data_dir>/store-clients/`.
    Serve {
        #[arg(long, short, default_value = "laddnet-data/laddnet.toml", env = "LADDNET_CONFIG")]
        config: PathBuf,
        /// Where nodes connect (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:7450")]
        listen: std::net::SocketAddr,
        /// A node that will use the store (repeat for each).
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VaultCmd {
    /// Add master key version N+1 (`master-v<N+1>.key`, mode 0600) to the
    /// node's key dir. New data keys are wrapped by it at once after the
    /// next start, and the node rewraps existing ones in the background
    /// (resumable). Keep the old file until `laddctl vault status` shows
    /// no key wrapped by it.
    Rotate {
        #[arg(long, short, default_value = "laddnet-data/laddnet.toml", env = "LADDNET_CONFIG")]
        config: PathBuf,
    },
    /// List the master key versions in the key dir (never the keys).
    Keys {
        #[arg(long, short, default_value = "laddnet-data/laddnet.toml", env = "LADDNET_CONFIG")]
        config: PathBuf,
    },
}

fn vault(cmd: VaultCmd) -> anyhow::Result<()> {
    use laddnet_vault::{LocalMasterKeys, MasterKeys};
    match cmd {
        VaultCmd::Rotate { config } => {
            let dir = load(&config)?.master_key_dir();
            let v = LocalMasterKeys::rotate(&dir)?;
            println!("master key version {v}: {}", LocalMasterKeys::path(&dir, v).display());
            println!(
                "restart the node: it wraps new data keys with version {v} and rewraps the others in the background"
            );
            println!("keep the older key files until `laddctl vault status` shows no key wrapped by them");
            Ok(())
        }
        VaultCmd::Keys { config } => {
            let dir = load(&config)?.master_key_dir();
            let keys = LocalMasterKeys::load(&dir, false)?;
            println!("current master key version: {}", keys.current());
            for v in keys.versions() {
                println!("  version {v}");
            }
            Ok(())
        }
    }
}

async fn up(
    data_dir: PathBuf,
    mtls: Option<std::net::SocketAddr>,
    enroll: Option<std::net::SocketAddr>,
    chargers: usize,
    fault_every_s: u64,
) -> anyhow::Result<()> {
    let stop = stop_signal();
    let config_path = data_dir.join("laddnet.toml");
    if !config_path.exists() {
        let cfg = NodeConfig::for_data_dir(&data_dir);
        let admin = OperatorName::new("admin").map_err(|e| anyhow::anyhow!(e))?;
        let out = tokio::task::spawn_blocking(move || init_data_dir(&cfg, &admin)).await??;
        eprintln!("created a new CA and admin credentials in {}", data_dir.display());
        eprintln!("  root CA serial {}", out.root_serial);
    } else {
        eprintln!("resuming from {}", data_dir.display());
    }
    let mut cfg = load(&config_path)?;
    if let Some(a) = mtls {
        cfg.listen.mtls = a;
    }
    if let Some(a) = enroll {
        cfg.listen.enrollment = a;
    }
    let node = RunningNode::start(cfg.clone()).await?;
    // laddctl reads this file: rewrite it with the address really bound.
    let mut bound = cfg.clone();
    bound.listen.mtls = node.mtls_addr;
    let creds = data_dir.join("credentials");
    let ctl_path = data_dir.join("laddctl.toml");
    laddnet_node::write_ctl_config(&ctl_path, &bound, &creds.join("admin.crt"), &creds.join("admin.key"))?;
    let ctl_abs = std::fs::canonicalize(&ctl_path).unwrap_or(ctl_path);
    println!("laddnet is up");
    println!("  chargers and operators (mutual TLS): {}", node.mtls_addr);
    println!("  charger enrollment (server TLS):     {}", node.enrollment_addr);
    if let Some(m) = node.metrics_addr {
        println!("  metrics (Prometheus):                http://{m}/metrics");
    }
    println!("  laddctl config: {}", ctl_abs.display());
    println!(
        "  try: laddctl sessions list   (from this directory, or with LADDCTL_CONFIG={})",
        ctl_abs.display()
    );
    println!("Ctrl-C stops the node.");
    let fleet = fleet::start(&node, &data_dir, chargers).await?;
    let summary = tokio::spawn(fleet::summary(node.state.clone()));
    let faults = tokio::spawn(fleet::inject_faults(fleet.sims.clone(), fault_every_s));
    stop.await;
    eprintln!("stopping…");
    // The enrolling task holds the CA (and so the store), the summary the
    // node's state: both let go before the node closes its store. An
    // aborted task's handle resolves once its future is dropped.
    for task in [fleet.enrolling, summary, faults] {
        task.abort();
        let _ = task.await;
    }
    for sim in fleet.sims.lock().await.iter() {
        sim.stop();
    }
    node.shutdown().await;
    Ok(())
}

fn main() {
    // The runtime's threads serve requests: each asks for a short time
    // slice, so one woken by a message preempts the store's writer (a
    // background thread) instead of waiting out its slice.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(laddnet_store::request_priority)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("laddnet: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    laddnet_node::panics::install_hook();
    let result: anyhow::Result<()> = async {
        match cli.cmd {
            Cmd::Up {
                data_dir,
                mtls_addr,
                enrollment_addr,
                chargers,
                fault_every_s,
            } => up(data_dir, mtls_addr, enrollment_addr, chargers, fault_every_s).await,
            Cmd::Node { config } => {
                let stop = stop_signal();
                let node = RunningNode::start(load(&config)?).await?;
                println!(
                    "serving: mutual TLS on {}, enrollment on {}",
                    node.mtls_addr, node.enrollment_addr
                );
                if let Some(m) = node.metrics_addr {
                    println!("metrics: http://{m}/metrics");
                }
                stop.await;
                node.shutdown().await;
                Ok(())
            }
            Cmd::Init { data_dir, admin } => {
                let admin = OperatorName::new(admin).map_err(|e| anyhow::anyhow!(e))?;
                // LADDNET_* overrides apply (a store.backend, for one).
                let cfg = NodeConfig::parse(&NodeConfig::for_data_dir(&data_dir).to_toml(), std::env::vars())?;
                let out = tokio::task::spawn_blocking(move || init_data_dir(&cfg, &admin)).await??;
                println!("node config:    {}", out.config_path.display());
                println!("laddctl config: {}", out.ctl_config_path.display());
                Ok(())
            }
            Cmd::Vault { cmd } => vault(cmd),
            Cmd::Store {
                cmd:
                    StoreCmd::Serve {
                        config,
                        listen,
                        clients,
                    },
            } => {
                let signal = stop_signal();
                let stop = tokio_util::sync::CancellationToken::new();
                let serving = laddnet_node::shared_store::serve(load(&config)?, listen, clients, stop.clone()).await?;
                for (name, crt, key) in &serving.clients {
                    println!("client {name}: {} {}", crt.display(), key.display());
                }
                println!("store serving on {}", serving.addr);
                signal.await;
                stop.cancel();
                let _ = serving.task.await;
                Ok(())
            }
            Cmd::Validate { config } => {
                let cfg = load(&config).with_context(|| "invalid configuration")?;
                laddnet_node::node::load_policy(&cfg)?;
                println!("{}", cfg.to_toml());
                eprintln!("{}: valid", config.display());
                Ok(())
            }
        }
    }
    .await;
    if let Err(e) = result {
        eprintln!("laddnet: {e:#}");
        std::process::exit(1);
    }
}
