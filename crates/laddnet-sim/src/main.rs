//! `laddnet-sim`: a fleet of simulated chargers against a running node.
//! It reads a `laddctl.toml` (an admin's), creates enrollment tokens,
//! enrolls each charger once (identities are kept in --state-dir) and runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use laddnet_proto::v1;

#[derive(Parser)]
#[command(name = "laddnet-sim", version, about = "Simulated chargers for laddnet")]
struct Cli {
    /// An admin's laddctl.toml (to create enrollment tokens).
    #[arg(long, env = "LADDCTL_CONFIG", default_value = "laddnet-data/laddctl.toml")]
    config: PathBuf,
    /// The node's enrollment listener, https://host:port.
    #[arg(long)]
    enrollment: String,
    #[arg(long, default_value_t = 20)]
    chargers: usize,
    /// Where enrolled identities are kept.
    #[arg(long, default_value = "laddnet-sim-state")]
    state_dir: PathBuf,
    /// Inject a random fault somewhere every N seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    fault_every_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let text = std::fs::read_to_string(&cli.config).with_context(|| format!("reading {}", cli.config.display()))?;
    let cfg: laddnet_client::CtlConfig = toml::from_str(&text).with_context(|| format!("{}", cli.config.display()))?;
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let root_pem = read(&cfg.ca_cert)?;
    let ep = laddnet_sim::Endpoints {
        mtls: vec![cfg.endpoint.clone()],
        enrollment: cli.enrollment.clone(),
        server_name: cfg.server_name.clone(),
        root_pem,
    };
    let tls = laddnet_pki::tls::client_config(&ep.root_pem, Some((&read(&cfg.cert)?, &read(&cfg.key)?)))?;
    let admin = laddnet_client::connect(&cfg.endpoint, &cfg.server_name, tls).await?;
    let mut pki = v1::pki_service_client::PkiServiceClient::new(admin);
    let mut fleet = Vec::new();
    for i in 0..cli.chargers {
        let profile = laddnet_sim::Profile::fleet_member(i);
        let id = match laddnet_sim::load_identity(&cli.state_dir, &profile.charger_id) {
            Some(id) => id,
            None => {
                let token = pki
                    .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
                        charger_id: profile.charger_id.clone(),
                        ttl_seconds: 600,
                        site_id: String::new(),
                    })
                    .await?
                    .into_inner()
                    .token;
                let id = laddnet_sim::enroll(&ep, &profile.charger_id, &token).await?;
                laddnet_sim::save_identity(&cli.state_dir, &profile.charger_id, &id)?;
                id
            }
        };
        fleet.push(laddnet_sim::spawn(ep.clone(), id, profile));
    }
    eprintln!("{} simulated chargers running; Ctrl-C stops", fleet.len());
    let faults = async {
        if cli.fault_every_s == 0 {
            return std::future::pending::<()>().await;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(cli.fault_every_s)).await;
            let i = rand::random::<u32>() as usize % fleet.len();
            fleet[i].inject(laddnet_sim::Fault::Disconnect).await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = faults => {}
    }
    Ok(())
}
