//! The two servers a scenario compares — a real `laddnet node` and the
//! bare echo — each a process of its own, pinned to core 0 (the load runs
//! on core 1), on a data dir whose CA issued every certificate used.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use laddnet_core::{ChargerId, OperatorName};
use laddnet_pki::{Ca, Subject};

/// One charger's credentials.
#[derive(Clone)]
pub struct Creds {
    pub id: String,
    pub chain_pem: String,
    pub key_pem: String,
}

/// A data dir with its CA, the echo's certificate and `n` chargers'.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub store_path: PathBuf,
    pub data_dir: PathBuf,
    pub root_pem: String,
    pub chargers: Vec<Creds>,
}

impl Fleet {
    /// Initialises a node data dir and issues `n` charger certificates
    /// (and the echo server's) from its CA, as enrollment would.
    pub fn create(n: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let config = laddnet_node::NodeConfig::for_data_dir(&data);
        let out = laddnet_node::init_data_dir(&config, &OperatorName::new("admin").map_err(|e| anyhow::anyhow!(e))?)?;
        let store = laddnet_node::node::open_store(&config)?;
        let ca = Ca::open(
            &laddnet_pki::CaFiles::new(config.ca_dir()),
            laddnet_node::node::load_policy(&config)?,
            &laddnet_node::node::key_source(&config),
            store,
            laddnet_pki::system_clock(),
        )?;
        let (echo, echo_key) = ca.issue_with_new_key(
            &Subject::Node {
                name: "bench-echo".into(),
                sans: vec!["localhost".into()],
            },
            "bench",
        )?;
        std::fs::write(dir.path().join("echo.crt"), &echo.chain_pem)?;
        std::fs::write(dir.path().join("echo.key"), echo_key.as_bytes())?;
        let crl = ca.crl_record()?.context("the CA has no CRL")?;
        std::fs::write(dir.path().join("crl.pem"), crl.pem.as_bytes())?;
        let mut chargers = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("BENCH-{i:05}");
            let (issued, key) = ca.issue_with_new_key(
                &Subject::Charger {
                    id: ChargerId::new(&id).map_err(|e| anyhow::anyhow!(e))?,
                    site: None,
                },
                "bench",
            )?;
            chargers.push(Creds {
                id,
                chain_pem: issued.chain_pem,
                key_pem: key.to_string(),
            });
        }
        let root_pem = ca.root_pem().to_string();
        drop(ca);
        Ok(Self {
            dir,
            config_path: out.config_path,
            store_path: config.store_path(),
            data_dir: data.clone(),
            root_pem,
            chargers,
        })
    }

    /// Registers `cards` RFID cards, one driver each (a third pay from a
    /// wallet holding 50 EUR, the rest by card), as `laddctl drivers`
    /// would; the node must not be running.
    pub fn provision_drivers(&self, cards: &[String]) -> anyhow::Result<()> {
        use laddnet_drivers::accounts::NewDriver;
        use laddnet_drivers::{PaymentKind, TokenKind};
        let config = laddnet_node::NodeConfig::for_data_dir(&self.data_dir);
        let hub = laddnet_node::drivers::open_hub(&config, laddnet_node::node::open_store(&config)?)?;
        for (i, card) in cards.iter().enumerate() {
            let d = hub.drivers.create(
                NewDriver {
                    name: Some(format!("Bench {i}")),
                    payment: Some(if i % 3 == 0 {
                        PaymentKind::Wallet
                    } else {
                        PaymentKind::Card
                    }),
                    currency: "EUR".into(),
                    max_concurrent_sessions: 1,
                    ..Default::default()
                },
                0,
            )?;
            if i % 3 == 0 {
                hub.drivers
                    .adjust_wallet(&d.driver_id, 50.into(), &format!("bench-{i}"), 0)?;
            }
            hub.drivers.add_token(&d.driver_id, TokenKind::Rfid, card, None, 0)?;
        }
        // A node in steady state has finished its start-up pass over the
        // data keys (rewrap to the current master key); do it here, so
        // the first measured starts do not spend their core on it.
        let store = hub.drivers.store.clone();
        while !hub.drivers.vault.rewrap(store.as_ref(), 1_000, None)?.finished {}
        Ok(())
    }

    pub fn client_tls(&self, c: &Creds) -> anyhow::Result<Arc<tokio_rustls::rustls::ClientConfig>> {
        Ok(laddnet_pki::tls::client_config(
            &self.root_pem,
            Some((&c.chain_pem, &c.key_pem)),
        )?)
    }
}

/// A server process under measurement.
pub struct Server {
    pub child: Child,
    pub addr: std::net::SocketAddr,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `taskset` can pin to two cores here.
pub fn can_pin() -> bool {
    // The machine's cores, not this process's: the load itself runs
    // pinned to one (available_parallelism would say 1).
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(1);
    cores >= 2
        && Command::new("taskset")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn command(bin: &Path, pin: bool) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A binary beside this one (`cargo build` puts them together).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        anyhow::bail!("{} not found: build it first (scripts/bench.sh does)", path.display());
    }
    Ok(path)
}

fn wait_for_line(child: &mut Child, prefix: &'static str) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .with_context(|| format!("the server did not print {prefix:?}"))
}

/// Starts `laddnet node` on the fleet's data dir, listening on every
/// loopback address, with `env` as config overrides. It logs as it would
/// in production (its default level, info: a line per authorization, for
/// one) to a file in the fleet's directory.
pub fn start_node(fleet: &Fleet, env: &[(&str, String)]) -> anyhow::Result<Server> {
    let pin = can_pin();
    let mut cmd = command(&sibling("laddnet")?, pin);
    cmd.args(["node", "--config"])
        .arg(&fleet.config_path)
        .env("LADDNET_LISTEN__MTLS", "0.0.0.0:0")
        .env("LADDNET_LISTEN__ENROLLMENT", "127.0.0.1:0")
        .env("LADDNET_LISTEN__METRICS", "127.0.0.1:0")
        .env_remove("LADDNET_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(fleet.dir.path().join("node.log"))?));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("starting laddnet node")?;
    let line = wait_for_line(&mut child, "serving: mutual TLS on ")?;
    let addr = line.split(',').next().unwrap_or_default().trim().parse()?;
    Ok(Server { child, addr })
}

/// Starts the echo server with the fleet's CA and the echo certificate.
pub fn start_echo(fleet: &Fleet) -> anyhow::Result<Server> {
    start_echo_with(fleet, &[])
}

/// The echo server with extra arguments (`--handshake-only`).
pub fn start_echo_with(fleet: &Fleet, args: &[&str]) -> anyhow::Result<Server> {
    let pin = can_pin();
    let d = fleet.dir.path();
    let ca = d.join("data").join("ca");
    let mut cmd = command(&std::env::current_exe()?, pin);
    cmd.arg("echo")
        .arg("--root")
        .arg(ca.join("root.crt"))
        .arg("--cert")
        .arg(d.join("echo.crt"))
        .arg("--key")
        .arg(d.join("echo.key"))
        .arg("--crl")
        .arg(d.join("crl.pem"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(d.join("echo.log"))?));
    let mut child = cmd.spawn().context("starting the echo server")?;
    let addr = wait_for_line(&mut child, "echo serving on ")?.trim().parse()?;
    Ok(Server { child, addr })
}
