//! `laddctl`: the command line for operators and security teams. It talks
//! gRPC over mutual TLS with an operator certificate; `laddctl pki init`
//! alone works offline, creating a CA in a data dir.
//!
//! Configuration: `--config FILE`, else `LADDCTL_CONFIG`, else
//! `./laddctl.toml`, else `./laddnet-data/laddctl.toml` (what `laddnet up`
//! writes). `LADDCTL_ENDPOINT` (`https://host:port`) overrides the file's
//! endpoint, e.g. to reach a cluster through its load balancer from a
//! container. Every command prints a table, or JSON with `--output json`.
//! Errors go to stderr, naming the problem, with exit code 1 (2 for usage).

mod drivers;
mod fleet;
mod incidents;
mod invoices;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use laddnet_node::CtlConfig;
use laddnet_proto::v1;
use laddnet_proto::v1::billing_service_client::BillingServiceClient;
use laddnet_proto::v1::operator_service_client::OperatorServiceClient;
use laddnet_proto::v1::pki_service_client::PkiServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "laddctl", version, about = "Operate a laddnet network")]
struct Cli {
    /// laddctl.toml to use.
    #[arg(long, global = true, env = "LADDCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum VaultCmd {
    /// The current master-key version, data keys per master version and
    /// the rewrap's progress (rotate with `laddnet vault rotate` on the
    /// node's host).
    Status,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificates, enrollment tokens, revocation, CRL and the audit log.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Operator certificates.
    #[command(subcommand)]
    Operators(OperatorsCmd),
    /// Chargers.
    #[command(subcommand)]
    Chargers(ChargersCmd),
    /// Sites: where chargers stand, with their grid limit and time zone.
    #[command(subcommand)]
    Sites(SitesCmd),
    /// Charging sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Tariffs (OCPI 2.2.1 JSON), their versions and assignment.
    #[command(subcommand)]
    Tariffs(TariffsCmd),
    /// Charge detail records.
    #[command(subcommand)]
    Cdrs(CdrsCmd),
    /// The revenue ledger.
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Revenue reports.
    #[command(subcommand)]
    Revenue(RevenueCmd),
    /// Subscription plans and who is on which.
    #[command(subcommand)]
    Plans(invoices::PlansCmd),
    /// Monthly invoices: numbered without gaps, JSON and HTML.
    #[command(subcommand)]
    Invoices(invoices::InvoicesCmd),
    /// Incidents: faults and alarms as cases to work through.
    #[command(subcommand)]
    Incidents(incidents::IncidentsCmd),
    /// Uptime of connectors, chargers and sites.
    #[command(subcommand)]
    Availability(incidents::AvailabilityCmd),
    /// Firmware images (signed by the node) and staged update campaigns.
    #[command(subcommand)]
    Firmware(fleet::FirmwareCmd),
    /// Log bundles uploaded by chargers.
    #[command(subcommand)]
    Diagnostics(fleet::DiagnosticsCmd),
    /// Drivers: accounts, tokens, preferences, GDPR export and erasure.
    #[command(subcommand)]
    Drivers(drivers::DriversCmd),
    /// Maintenance windows (drivers are told).
    #[command(subcommand)]
    Maintenance(drivers::MaintenanceCmd),
    /// The keys protecting personal data (security team).
    #[command(subcommand)]
    Vault(VaultCmd),
    /// The nodes of the cluster: who is alive, until when, how many chargers each holds.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Who the node thinks you are.
    Whoami,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members in the store: node, incarnation, address, lease, chargers.
    Members,
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA, admin credentials and configs in a data dir (offline).
    Init {
        #[arg(long, default_value = "laddnet-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "admin")]
        admin: String,
        /// A certificate policy TOML (default: the compiled-in pki/policy.toml).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// One-time enrollment tokens for new chargers.
    #[command(subcommand)]
    Token(TokenCmd),
    /// List issued certificates.
    List {
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one certificate.
    Show {
        serial: String,
        /// Print the certificate PEM too.
        #[arg(long)]
        pem: bool,
    },
    /// Issue a successor for a certificate. With --csr, for the key in that
    /// CSR; otherwise a new key is made here and written to --out-dir.
    Renew {
        serial: String,
        #[arg(long)]
        csr: Option<PathBuf>,
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Revoke a certificate; its live connections are closed.
    Revoke {
        serial: String,
        /// unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation, certificate-hold, privilege-withdrawn
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Show the current CRL; --out writes its PEM.
    Crl {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The audit log; `audit verify` checks its hash chain.
    Audit {
        #[command(subcommand)]
        cmd: Option<AuditCmd>,
        #[command(flatten)]
        page: PageArgs,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain: detects altered and removed entries.
    Verify,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token for a charger id (shown once).
    Create {
        charger_id: String,
        /// Lifetime in seconds (default: the policy's).
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Subcommand)]
enum OperatorsCmd {
    /// Issue an operator certificate; the key is made here and written to --out-dir.
    Issue {
        name: String,
        /// viewer, operator, billing, security-admin or admin
        #[arg(long)]
        role: String,
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ChargersCmd {
    /// Every charger the node knows, connected or not.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// One charger with its connectors.
    Show { charger_id: String },
    /// Move a charger to a site.
    SetSite { charger_id: String, site_id: String },
    /// Send a command and wait for the charger's reply.
    Command {
        charger_id: String,
        #[command(subcommand)]
        command: ChargerCommand,
    },
}

#[derive(Subcommand)]
enum ChargerCommand {
    /// Soft reset (or --hard).
    Reset {
        #[arg(long)]
        hard: bool,
    },
    Unlock {
        #[arg(long, default_value_t = 1)]
        connector: u32,
    },
    /// Start charging for a token.
    Start {
        #[arg(long, default_value_t = 1)]
        connector: u32,
        #[arg(long)]
        token: String,
    },
    Stop {
        #[arg(long)]
        transaction: String,
    },
    /// Make a connector (0 = the whole charger) operative or inoperative.
    Availability {
        #[arg(long, default_value_t = 0)]
        connector: u32,
        #[arg(long, value_parser = ["operative", "inoperative"])]
        state: String,
    },
}

#[derive(Subcommand)]
enum TariffsCmd {
    /// Store a tariff from a JSON file as a new version of its id.
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    List,
    Show {
        id: String,
        /// A past version (default: the latest).
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Apply a tariff to the operator (default), a site, a charger or a connector type.
    Assign {
        tariff_id: String,
        /// operator, site, charger or connector-type
        #[arg(long, default_value = "operator")]
        scope: String,
        /// Site id, charger id, or ac/dc.
        #[arg(long, default_value = "")]
        target: String,
        /// RFC 3339 (default: now).
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long, default_value = "")]
        to: String,
    },
    /// Price a hypothetical session: --stretch MINUTES:KWH[:AMPS], repeated
    /// (0 kWh = parked), from --start in --time-zone.
    Preview {
        /// A stored tariff's id, or --file for one not stored.
        #[arg(long, default_value = "")]
        tariff: String,
        #[arg(long)]
        file: Option<PathBuf>,
        /// RFC 3339 start (default: now).
        #[arg(long, default_value = "")]
        start: String,
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        #[arg(long = "stretch", required = true)]
        stretches: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CdrsCmd {
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    Show {
        id: String,
    },
    /// Export CDRs stopped in [--from, --to) as JSON or CSV.
    Export {
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long, default_value = "")]
        to: String,
        #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
        format: String,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Post a CDR held for review.
    Approve {
        id: String,
    },
    /// Refund a posted CDR in full (a reversing posting).
    Refund {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum RevenueCmd {
    /// Revenue of posted CDRs stopped in [--from, --to), grouped.
    Report {
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long, default_value = "")]
        to: String,
        #[arg(long, default_value = "site", value_parser = ["operator", "site", "charger", "tariff", "day", "month"])]
        by: String,
        /// Print CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    Balance,
    /// Prove debits equal credits and every CDR is posted exactly once.
    Verify,
}

#[derive(Subcommand)]
enum SitesCmd {
    Create {
        site_id: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        address: String,
        /// IANA time zone.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
        /// Grid connection limit in kW.
        #[arg(long, default_value_t = 0)]
        grid_limit_kw: u32,
    },
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    Show {
        site_id: String,
    },
    /// Who may charge: public, or private to driver groups.
    Access {
        site_id: String,
        #[arg(long)]
        private: bool,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// The site's grid limit, measured power and each session's limit.
    Load {
        site_id: String,
    },
    /// Share of connector time in use per local hour (JSON).
    Utilisation {
        site_id: String,
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum SessionsCmd {
    List {
        /// active, interrupted or ended
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        charger: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    Show {
        transaction_id: String,
    },
    /// Follow active sessions live (or one): power, kWh, duration. Ctrl-C stops.
    Watch {
        transaction_id: Option<String>,
    },
}

#[derive(clap::Args)]
struct PageArgs {
    /// Rows per page (default: the server's).
    #[arg(long, default_value_t = 0)]
    page_size: u32,
    /// Continue from a previous page's next_page_token.
    #[arg(long, default_value = "")]
    page_token: String,
    /// Fetch every page.
    #[arg(long)]
    all: bool,
}

impl PageArgs {
    fn req(&self, token: &str) -> v1::PageRequest {
        v1::PageRequest {
            page_size: self.page_size,
            page_token: token.to_string(),
        }
    }
}

fn find_config(explicit: Option<&Path>) -> anyhow::Result<(PathBuf, CtlConfig)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => ["laddctl.toml", "laddnet-data/laddctl.toml"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| anyhow!("no laddctl config: pass --config FILE, set LADDCTL_CONFIG, or run from the directory where `laddnet up` ran"))?,
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("config {}", path.display()))?;
    let mut cfg: CtlConfig = toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut cfg.ca_cert, &mut cfg.cert, &mut cfg.key] {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    if let Ok(e) = std::env::var("LADDCTL_ENDPOINT")
        && !e.is_empty()
    {
        if !e.starts_with("https://") {
            bail!("LADDCTL_ENDPOINT must be https://host:port, not {e:?}");
        }
        cfg.endpoint = e;
    }
    Ok((path, cfg))
}

async fn channel(explicit: Option<&Path>) -> anyhow::Result<Channel> {
    let (_, cfg) = find_config(explicit)?;
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let (root, chain, key) = (read(&cfg.ca_cert)?, read(&cfg.cert)?, read(&cfg.key)?);
    let tls = laddnet_pki::tls::client_config(&root, Some((&chain, &key)))?;
    laddnet_node::client::connect(&cfg.endpoint, &cfg.server_name, tls).await
}

/// Prints rows as an aligned table, or the JSON value.
fn emit(output: Output, json_value: Value, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&json_value).unwrap_or_default());
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(c.chars().count()),
                None => widths.push(c.chars().count()),
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r));
    }
}

fn cert_json(c: &v1::CertificateInfo) -> Value {
    json!({
        "serial": c.serial, "profile": c.profile, "subject": c.subject, "organisation": c.organisation,
        "role": c.role, "site_id": c.site_id, "not_before": c.not_before, "not_after": c.not_after,
        "status": c.status, "revocation_reason": c.revocation_reason, "revoked_at": c.revoked_at,
        "renewed_from": c.renewed_from,
    })
}

fn cert_row(c: &v1::CertificateInfo) -> Vec<String> {
    vec![
        c.serial.clone(),
        c.profile.clone(),
        c.subject.clone(),
        c.role.clone(),
        c.status.clone(),
        c.not_after.clone(),
    ]
}

fn charger_json(c: &v1::Charger) -> Value {
    json!({
        "charger_id": c.charger_id, "connected": c.connected, "vendor": c.vendor, "model": c.model,
        "firmware_version": c.firmware_version, "connected_since": c.connected_since, "last_heartbeat": c.last_heartbeat,
        "last_seen": c.last_seen, "certificate_serial": c.certificate_serial, "site_id": c.site_id,
        "node_id": c.node_id,
        "connectors": c.connectors.iter().map(|k| json!({
            "connector_id": k.connector_id,
            "type": enum_name(v1::ConnectorType::try_from(k.r#type).map(|t| t.as_str_name()), "CONNECTOR_TYPE_"),
            "max_power_w": k.max_power_w,
            "status": enum_name(v1::ConnectorStatus::try_from(k.status).map(|t| t.as_str_name()), "CONNECTOR_STATUS_"),
            "error_code": k.error_code,
        })).collect::<Vec<_>>(),
    })
}

fn enum_name<E>(r: Result<&str, E>, prefix: &str) -> String {
    r.map(|s| s.trim_start_matches(prefix).to_ascii_lowercase().replace('_', "-"))
        .unwrap_or_else(|_| "unknown".into())
}

fn emit_connectors(out: Output, c: &v1::Charger) {
    let j = charger_json(c);
    let rows = j["connectors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| {
            vec![
                c.charger_id.clone(),
                c.site_id.clone(),
                c.connected.to_string(),
                k["connector_id"].to_string(),
                k["type"].as_str().unwrap_or_default().to_string(),
                kw(k["max_power_w"].as_u64().unwrap_or(0)),
                k["status"].as_str().unwrap_or_default().to_string(),
                k["error_code"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    emit(
        out,
        j,
        &[
            "CHARGER",
            "SITE",
            "CONNECTED",
            "CONNECTOR",
            "TYPE",
            "MAX KW",
            "STATUS",
            "ERROR",
        ],
        rows,
    );
}

/// Watts as kW with one decimal, in integers.
fn kw(w: u64) -> String {
    format!("{}.{}", w / 1000, (w % 1000) / 100)
}

const SITE_HEADERS: &[&str] = &["SITE", "NAME", "TIME ZONE", "GRID LIMIT KW", "ADDRESS"];

fn site_json(s: &v1::Site) -> Value {
    json!({"site_id": s.site_id, "name": s.name, "address": s.address, "time_zone": s.time_zone, "grid_limit_w": s.grid_limit_w})
}

fn site_row(s: &v1::Site) -> Vec<String> {
    vec![
        s.site_id.clone(),
        s.name.clone(),
        s.time_zone.clone(),
        kw(u64::from(s.grid_limit_w)),
        s.address.clone(),
    ]
}

const SESSION_HEADERS: &[&str] = &[
    "TRANSACTION",
    "CHARGER",
    "CONN",
    "STATUS",
    "KWH",
    "KW",
    "DURATION",
    "SOC",
    "COST",
    "FLAGS",
];

fn session_json(s: &v1::Session) -> Value {
    json!({
        "transaction_id": s.transaction_id, "charger_id": s.charger_id, "connector_id": s.connector_id, "site_id": s.site_id,
        "status": s.status, "started_at": s.started_at, "ended_at": s.ended_at, "energy_wh": s.energy_wh, "power_w": s.power_w,
        "duration_s": s.duration_s, "samples": s.samples, "last_seq": s.last_seq, "missing_events": s.missing_events,
        "soc_percent": s.soc_percent, "flags": s.flags, "stop_reason": s.stop_reason,
        "meter_start_wh": s.meter_start_wh, "meter_stop_wh": s.meter_stop_wh,
        "currency": s.currency, "cost_excl_vat": s.cost_excl_vat, "cost_incl_vat": s.cost_incl_vat,
    })
}

fn session_row(s: &v1::Session) -> Vec<String> {
    // Display only: energy is stored and billed in integer Wh.
    vec![
        s.transaction_id.clone(),
        s.charger_id.clone(),
        s.connector_id.to_string(),
        s.status.clone(),
        format!("{}.{:03}", s.energy_wh / 1000, s.energy_wh % 1000),
        kw(u64::from(s.power_w)),
        format!(
            "{}:{:02}:{:02}",
            s.duration_s / 3600,
            s.duration_s / 60 % 60,
            s.duration_s % 60
        ),
        s.soc_percent.map(|p| format!("{p}%")).unwrap_or_default(),
        if s.currency.is_empty() {
            String::new()
        } else {
            format!("{} {}", s.cost_incl_vat, s.currency)
        },
        s.flags.join(","),
    ]
}

const CERT_HEADERS: &[&str] = &["SERIAL", "PROFILE", "SUBJECT", "ROLE", "STATUS", "NOT AFTER"];

fn write_key_and_cert(dir: &Path, stem: &str, key: &str, chain: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (key_path, cert_path) = (dir.join(format!("{stem}.key")), dir.join(format!("{stem}.crt")));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&key_path)
        .with_context(|| format!("writing {} (it must not exist yet)", key_path.display()))?;
    f.write_all(key.as_bytes())?;
    std::fs::write(&cert_path, chain).with_context(|| format!("writing {}", cert_path.display()))?;
    Ok((key_path, cert_path))
}

fn file_stem(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    let cfg = cli.config.as_deref();
    match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "laddctl", &mut std::io::stdout());
        }
        Cmd::Pki(PkiCmd::Init {
            data_dir,
            admin,
            policy,
        }) => {
            let admin = laddnet_core::OperatorName::new(admin).map_err(|e| anyhow!(e))?;
            let mut node_cfg = laddnet_node::NodeConfig::for_data_dir(&data_dir);
            node_cfg.ca.policy = policy;
            let o = tokio::task::spawn_blocking(move || laddnet_node::init_data_dir(&node_cfg, &admin)).await??;
            emit(
                out,
                json!({"config": o.config_path, "laddctl_config": o.ctl_config_path, "root_serial": o.root_serial, "admin_serial": o.admin_serial}),
                &["WHAT", "VALUE"],
                vec![
                    vec!["node config".into(), o.config_path.display().to_string()],
                    vec!["laddctl config".into(), o.ctl_config_path.display().to_string()],
                    vec!["root serial".into(), o.root_serial],
                    vec!["admin serial".into(), o.admin_serial],
                ],
            );
            eprintln!(
                "the sealed root key is {}/ca/root-key.sealed.json: move it offline; a node never needs it",
                data_dir.display()
            );
        }
        Cmd::Pki(PkiCmd::Token(TokenCmd::Create { charger_id, ttl, site })) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let t = c
                .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
                    charger_id,
                    ttl_seconds: ttl,
                    site_id: site.unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(
                out,
                json!({"token": t.token, "charger_id": t.charger_id, "expires_at": t.expires_at}),
                &["CHARGER", "TOKEN", "EXPIRES"],
                vec![vec![t.charger_id, t.token, t.expires_at]],
            );
        }
        Cmd::Pki(PkiCmd::List {
            profile,
            subject,
            status,
            page,
        }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_certificates(v1::ListCertificatesRequest {
                        page: Some(page.req(&token)),
                        profile: profile.clone().unwrap_or_default(),
                        subject: subject.clone().unwrap_or_default(),
                        status: status.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                all.extend(r.certificates);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"certificates": all.iter().map(cert_json).collect::<Vec<_>>(), "next_page_token": token}),
                CERT_HEADERS,
                all.iter().map(cert_row).collect(),
            );
            if out == Output::Table && !token.is_empty() {
                eprintln!("more: --page-token {token}");
            }
        }
        Cmd::Pki(PkiCmd::Show { serial, pem }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let info = c
                .get_certificate(v1::GetCertificateRequest { serial })
                .await?
                .into_inner();
            let mut j = cert_json(&info);
            j["certificate_pem"] = json!(info.certificate_pem);
            let mut rows: Vec<Vec<String>> = j
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| *k != "certificate_pem")
                .map(|(k, v)| vec![k.clone(), v.as_str().unwrap_or_default().to_string()])
                .collect();
            if pem {
                rows.push(vec!["certificate_pem".into(), info.certificate_pem.clone()]);
            }
            emit(out, j, &["FIELD", "VALUE"], rows);
        }
        Cmd::Pki(PkiCmd::Renew { serial, csr, out_dir }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let (key, csr_pem) = match csr {
                Some(p) => (
                    None,
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                ),
                None => {
                    let (k, c) = laddnet_pki::new_key_and_csr("renewal")?;
                    (Some(k), c)
                }
            };
            let r = c
                .renew_certificate(v1::PkiRenewRequest { serial, csr_pem })
                .await?
                .into_inner();
            let info = r
                .certificate
                .ok_or_else(|| anyhow!("the node returned no certificate"))?;
            let written = match key {
                Some(k) => {
                    let (kp, cp) = write_key_and_cert(
                        &out_dir,
                        &file_stem(&format!("{}-{}", info.subject, &info.serial[..8])),
                        &k,
                        &r.chain_pem,
                    )?;
                    format!("{} {}", cp.display(), kp.display())
                }
                None => {
                    let p = out_dir.join(format!("{}.crt", file_stem(&info.serial)));
                    std::fs::write(&p, &r.chain_pem).with_context(|| format!("writing {}", p.display()))?;
                    p.display().to_string()
                }
            };
            let mut j = cert_json(&info);
            j["files"] = json!(written);
            emit(out, j, CERT_HEADERS, vec![cert_row(&info)]);
        }
        Cmd::Pki(PkiCmd::Revoke { serial, reason }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let info = c
                .revoke_certificate(v1::RevokeCertificateRequest { serial, reason })
                .await?
                .into_inner();
            emit(out, cert_json(&info), CERT_HEADERS, vec![cert_row(&info)]);
        }
        Cmd::Pki(PkiCmd::Crl { out: file }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let crl = c.get_crl(v1::GetCrlRequest {}).await?.into_inner();
            let summary = laddnet_pki::summarize_crl(crl.crl_pem.as_bytes())?;
            if let Some(f) = file {
                std::fs::write(&f, &crl.crl_pem).with_context(|| format!("writing {}", f.display()))?;
            }
            emit(
                out,
                json!({"crl_number": crl.crl_number, "this_update": crl.this_update, "next_update": crl.next_update, "revoked": summary.revoked_serials, "pem": crl.crl_pem}),
                &["NUMBER", "THIS UPDATE", "NEXT UPDATE", "REVOKED"],
                vec![vec![
                    crl.crl_number.to_string(),
                    crl.this_update,
                    crl.next_update,
                    summary.revoked_serials.len().to_string(),
                ]],
            );
        }
        Cmd::Pki(PkiCmd::Audit {
            cmd: Some(AuditCmd::Verify),
            ..
        }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let v = c.verify_audit(v1::VerifyAuditRequest {}).await?.into_inner();
            emit(
                out,
                json!({"ok": v.ok, "entries": v.entries, "first_bad_seq": v.first_bad_seq, "problem": v.problem}),
                &["OK", "ENTRIES", "FIRST BAD", "PROBLEM"],
                vec![vec![
                    v.ok.to_string(),
                    v.entries.to_string(),
                    if v.ok {
                        String::new()
                    } else {
                        v.first_bad_seq.to_string()
                    },
                    v.problem.clone(),
                ]],
            );
            if !v.ok {
                bail!("audit log is broken at entry {}: {}", v.first_bad_seq, v.problem);
            }
        }
        Cmd::Pki(PkiCmd::Audit { cmd: None, page }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_audit_entries(v1::ListAuditEntriesRequest {
                        page: Some(page.req(&token)),
                    })
                    .await?
                    .into_inner();
                all.extend(r.entries);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"entries": all.iter().map(|e| json!({"seq": e.seq, "at": e.at, "kind": e.kind, "actor": e.actor, "subject": e.subject, "detail": e.detail, "hash": e.hash})).collect::<Vec<_>>(), "next_page_token": token}),
                &["SEQ", "AT", "KIND", "ACTOR", "SUBJECT", "DETAIL"],
                all.iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            e.at.clone(),
                            e.kind.clone(),
                            e.actor.clone(),
                            e.subject.clone(),
                            e.detail.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Operators(OperatorsCmd::Issue { name, role, out_dir }) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let (key, csr_pem) = laddnet_pki::new_key_and_csr(&name)?;
            let r = c
                .issue_operator_certificate(v1::IssueOperatorCertificateRequest { name, role, csr_pem })
                .await?
                .into_inner();
            let info = r
                .certificate
                .ok_or_else(|| anyhow!("the node returned no certificate"))?;
            let (kp, cp) = write_key_and_cert(&out_dir, &file_stem(&info.subject), &key, &r.chain_pem)?;
            let mut j = cert_json(&info);
            j["certificate_file"] = json!(cp);
            j["key_file"] = json!(kp);
            emit(out, j, CERT_HEADERS, vec![cert_row(&info)]);
            if out == Output::Table {
                eprintln!("wrote {} and {}", cp.display(), kp.display());
            }
        }
        Cmd::Tariffs(cmd) => tariffs_cmd(out, cfg, cmd).await?,
        Cmd::Cdrs(cmd) => cdrs_cmd(out, cfg, cmd).await?,
        Cmd::Ledger(cmd) => ledger_cmd(out, cfg, cmd).await?,
        Cmd::Revenue(RevenueCmd::Report { from, to, by, csv }) => {
            let r = billing(cfg)
                .await?
                .revenue_report(v1::RevenueReportRequest {
                    from,
                    to,
                    by: by.clone(),
                })
                .await?
                .into_inner();
            if csv {
                print!("{}", r.csv);
            } else {
                emit(
                    out,
                    json!({"by": by, "rows": r.rows.iter().map(|x| json!({"key": x.key, "currency": x.currency, "sessions": x.sessions, "energy_wh": x.energy_wh, "excl_vat": x.excl_vat, "vat": x.vat, "incl_vat": x.incl_vat})).collect::<Vec<_>>()}),
                    &[
                        &by.to_ascii_uppercase(),
                        "CURRENCY",
                        "SESSIONS",
                        "KWH",
                        "EXCL VAT",
                        "VAT",
                        "INCL VAT",
                    ],
                    r.rows
                        .iter()
                        .map(|x| {
                            vec![
                                x.key.clone(),
                                x.currency.clone(),
                                x.sessions.to_string(),
                                format!("{}.{:03}", x.energy_wh / 1000, x.energy_wh % 1000),
                                x.excl_vat.clone(),
                                x.vat.clone(),
                                x.incl_vat.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Chargers(ChargersCmd::Show { charger_id }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let ch = c.get_charger(v1::GetChargerRequest { charger_id }).await?.into_inner();
            emit_connectors(out, &ch);
        }
        Cmd::Chargers(ChargersCmd::SetSite { charger_id, site_id }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let ch = c
                .set_charger_site(v1::SetChargerSiteRequest { charger_id, site_id })
                .await?
                .into_inner();
            emit_connectors(out, &ch);
        }
        Cmd::Chargers(ChargersCmd::Command { charger_id, command }) => {
            use v1::command::Kind;
            let kind = match command {
                ChargerCommand::Reset { hard } => Kind::Reset(v1::Reset { hard }),
                ChargerCommand::Unlock { connector } => Kind::UnlockConnector(v1::UnlockConnector {
                    connector_id: connector,
                }),
                ChargerCommand::Start { connector, token } => Kind::RemoteStart(v1::RemoteStart {
                    connector_id: connector,
                    id_token: token,
                }),
                ChargerCommand::Stop { transaction } => Kind::RemoteStop(v1::RemoteStop {
                    transaction_id: transaction,
                }),
                ChargerCommand::Availability { connector, state } => Kind::ChangeAvailability(v1::ChangeAvailability {
                    connector_id: connector,
                    operative: state == "operative",
                }),
            };
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let r = c
                .send_command(v1::SendCommandRequest {
                    charger_id,
                    command: Some(v1::Command {
                        command_id: String::new(),
                        kind: Some(kind),
                    }),
                })
                .await?
                .into_inner();
            let status = v1::CommandStatus::try_from(r.status)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("COMMAND_STATUS_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            emit(
                out,
                json!({"command_id": r.command_id, "status": status, "detail": r.detail}),
                &["COMMAND", "STATUS", "DETAIL"],
                vec![vec![r.command_id, status.clone(), r.detail]],
            );
            if status != "accepted" {
                bail!("the charger did not accept the command ({status})");
            }
        }
        Cmd::Sites(SitesCmd::Create {
            site_id,
            name,
            address,
            time_zone,
            grid_limit_kw,
        }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let grid_limit_w = grid_limit_kw
                .checked_mul(1000)
                .ok_or_else(|| anyhow!("--grid-limit-kw is too large"))?;
            let s = c
                .create_site(v1::CreateSiteRequest {
                    site: Some(v1::Site {
                        site_id,
                        name,
                        address,
                        time_zone,
                        grid_limit_w,
                    }),
                })
                .await?
                .into_inner();
            emit(out, site_json(&s), SITE_HEADERS, vec![site_row(&s)]);
        }
        Cmd::Sites(SitesCmd::List { page }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_sites(v1::ListSitesRequest {
                        page: Some(page.req(&token)),
                    })
                    .await?
                    .into_inner();
                all.extend(r.sites);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"sites": all.iter().map(site_json).collect::<Vec<_>>(), "next_page_token": token}),
                SITE_HEADERS,
                all.iter().map(site_row).collect(),
            );
        }
        Cmd::Drivers(d) => drivers::run(d, cfg, out).await?,
        Cmd::Plans(p) => invoices::plans(p, cfg, out).await?,
        Cmd::Invoices(i) => invoices::invoices(i, cfg, out).await?,
        Cmd::Incidents(i) => incidents::run(i, cfg, out).await?,
        Cmd::Availability(a) => incidents::availability(a, cfg, out).await?,
        Cmd::Firmware(f) => fleet::firmware(f, cfg, out).await?,
        Cmd::Diagnostics(d) => fleet::diagnostics(d, cfg, out).await?,
        Cmd::Sites(SitesCmd::Load { site_id }) => fleet::site_load(cfg, out, site_id).await?,
        Cmd::Maintenance(m) => drivers::maintenance(m, cfg, out).await?,
        Cmd::Sites(SitesCmd::Access {
            site_id,
            private,
            groups,
        }) => drivers::site_access(cfg, out, site_id, private, groups).await?,
        Cmd::Sites(SitesCmd::Utilisation { site_id, days }) => drivers::site_utilisation(cfg, site_id, days).await?,
        Cmd::Sites(SitesCmd::Show { site_id }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let s = c.get_site(v1::GetSiteRequest { site_id }).await?.into_inner();
            emit(out, site_json(&s), SITE_HEADERS, vec![site_row(&s)]);
        }
        Cmd::Sessions(SessionsCmd::List { status, charger, page }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_sessions(v1::ListSessionsRequest {
                        page: Some(page.req(&token)),
                        status: status.clone().unwrap_or_default(),
                        charger_id: charger.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                all.extend(r.sessions);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"sessions": all.iter().map(session_json).collect::<Vec<_>>(), "next_page_token": token}),
                SESSION_HEADERS,
                all.iter().map(session_row).collect(),
            );
        }
        Cmd::Sessions(SessionsCmd::Show { transaction_id }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let s = c
                .get_session(v1::GetSessionRequest { transaction_id })
                .await?
                .into_inner();
            emit(out, session_json(&s), SESSION_HEADERS, vec![session_row(&s)]);
        }
        Cmd::Sessions(SessionsCmd::Watch { transaction_id }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let mut stream = c
                .watch_sessions(v1::WatchSessionsRequest {
                    transaction_id: transaction_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            // A stream has no end to align a table at: fixed widths.
            const W: [usize; 10] = [24, 10, 4, 11, 9, 6, 9, 4, 12, 0];
            let line = |cells: Vec<String>| {
                cells
                    .iter()
                    .zip(W)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let mut stdout = std::io::stdout().lock();
            if out == Output::Table
                && writeln!(
                    stdout,
                    "{}",
                    line(SESSION_HEADERS.iter().map(|h| h.to_string()).collect())
                )
                .is_err()
            {
                return Ok(());
            }
            while let Some(s) = stream.message().await? {
                let text = if out == Output::Json {
                    session_json(&s).to_string()
                } else {
                    line(session_row(&s))
                };
                // A closed pipe (`| head`) ends the watch quietly.
                if writeln!(stdout, "{text}").and_then(|_| stdout.flush()).is_err() {
                    break;
                }
            }
        }
        Cmd::Chargers(ChargersCmd::List { page }) => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_chargers(v1::ListChargersRequest {
                        page: Some(page.req(&token)),
                    })
                    .await?
                    .into_inner();
                all.extend(r.chargers);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"chargers": all.iter().map(|c| json!({"charger_id": c.charger_id, "connected": c.connected, "vendor": c.vendor, "model": c.model, "firmware_version": c.firmware_version, "connected_since": c.connected_since, "last_heartbeat": c.last_heartbeat, "certificate_serial": c.certificate_serial, "site_id": c.site_id, "node_id": c.node_id})).collect::<Vec<_>>(), "next_page_token": token}),
                &[
                    "CHARGER",
                    "SITE",
                    "NODE",
                    "VENDOR",
                    "MODEL",
                    "FIRMWARE",
                    "SINCE",
                    "LAST HEARTBEAT",
                ],
                all.iter()
                    .map(|c| {
                        vec![
                            c.charger_id.clone(),
                            c.site_id.clone(),
                            c.node_id.clone(),
                            c.vendor.clone(),
                            c.model.clone(),
                            c.firmware_version.clone(),
                            c.connected_since.clone(),
                            c.last_heartbeat.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Vault(VaultCmd::Status) => {
            let mut c = PkiServiceClient::new(channel(cfg).await?);
            let v = c.vault_status(v1::VaultStatusRequest {}).await?.into_inner();
            let by: Vec<Value> = v
                .by_master
                .iter()
                .map(|m| json!({"version": m.version, "wrapped_keys": m.wrapped_keys}))
                .collect();
            emit(
                out,
                json!({"current_master": v.current_master, "by_master": by, "subjects": v.subjects,
                       "rewrap_finished": v.rewrap_finished, "rewrap_moved": v.rewrap_moved}),
                &["MASTER VERSION", "WRAPPED KEYS", "CURRENT"],
                v.by_master
                    .iter()
                    .map(|m| {
                        vec![
                            m.version.to_string(),
                            m.wrapped_keys.to_string(),
                            if m.version == v.current_master {
                                "yes"
                            } else {
                                "no (rewrap pending)"
                            }
                            .into(),
                        ]
                    })
                    .collect(),
            );
            if out != Output::Json {
                println!(
                    "current master key: v{}; drivers with data keys: {}; rewrap {}",
                    v.current_master,
                    v.subjects,
                    if v.rewrap_finished { "finished" } else { "under way" }
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Members) => {
            let mut c = v1::cluster_service_client::ClusterServiceClient::new(channel(cfg).await?);
            let mut members = c.members(v1::MembersRequest {}).await?.into_inner().members;
            members.sort_by(|a, b| (&a.node_id, a.incarnation).cmp(&(&b.node_id, b.incarnation)));
            let lease = |m: &v1::Member| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(m.lease_expires_ms) * 1_000_000)
                    .ok()
                    .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                    .unwrap_or_default()
            };
            emit(
                out,
                Value::Array(
                    members
                        .iter()
                        .map(|m| {
                            json!({"node": m.node_id, "incarnation": m.incarnation, "address": m.address,
                            "alive": m.alive, "lease_expires": lease(m), "chargers": m.chargers})
                        })
                        .collect(),
                ),
                &["NODE", "INCARNATION", "ADDRESS", "ALIVE", "LEASE EXPIRES", "CHARGERS"],
                members
                    .iter()
                    .map(|m| {
                        vec![
                            m.node_id.clone(),
                            m.incarnation.to_string(),
                            m.address.clone(),
                            if m.alive { "yes" } else { "no" }.into(),
                            lease(m),
                            m.chargers.to_string(),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Whoami => {
            let mut c = OperatorServiceClient::new(channel(cfg).await?);
            let w = c.who_am_i(v1::WhoAmIRequest {}).await?.into_inner();
            emit(
                out,
                json!({"name": w.name, "role": w.role, "serial": w.serial, "not_after": w.not_after}),
                &["NAME", "ROLE", "SERIAL", "NOT AFTER"],
                vec![vec![w.name, w.role, w.serial, w.not_after]],
            );
        }
    }
    Ok(())
}

async fn billing(cfg: Option<&Path>) -> anyhow::Result<BillingServiceClient<Channel>> {
    Ok(BillingServiceClient::new(channel(cfg).await?))
}

async fn tariffs_cmd(out: Output, cfg: Option<&Path>, cmd: TariffsCmd) -> anyhow::Result<()> {
    let row = |t: &v1::TariffInfo| vec![t.id.clone(), t.version.to_string(), t.currency.clone()];
    let tjson = |t: &v1::TariffInfo| json!({"id": t.id, "version": t.version, "currency": t.currency, "tariff": serde_json::from_str::<Value>(&t.tariff_json).unwrap_or_default()});
    match cmd {
        TariffsCmd::Create { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let t = billing(cfg)
                .await?
                .create_tariff(v1::CreateTariffRequest { tariff_json: text })
                .await?
                .into_inner();
            emit(out, tjson(&t), &["TARIFF", "VERSION", "CURRENCY"], vec![row(&t)]);
        }
        TariffsCmd::List => {
            let r = billing(cfg)
                .await?
                .list_tariffs(v1::ListTariffsRequest {})
                .await?
                .into_inner();
            emit(
                out,
                json!({"tariffs": r.tariffs.iter().map(tjson).collect::<Vec<_>>(), "assignments": r.assignments.iter().map(|a| json!({"scope": a.scope, "target": a.target, "tariff_id": a.tariff_id, "valid_from": a.valid_from, "valid_to": a.valid_to})).collect::<Vec<_>>()}),
                &["TARIFF", "VERSION", "CURRENCY", "ASSIGNED TO"],
                r.tariffs
                    .iter()
                    .map(|t| {
                        let to: Vec<String> = r
                            .assignments
                            .iter()
                            .filter(|a| a.tariff_id == t.id)
                            .map(|a| {
                                if a.target.is_empty() {
                                    a.scope.clone()
                                } else {
                                    format!("{}:{}", a.scope, a.target)
                                }
                            })
                            .collect();
                        let mut v = row(t);
                        v.push(to.join(", "));
                        v
                    })
                    .collect(),
            );
        }
        TariffsCmd::Show { id, version } => {
            let t = billing(cfg)
                .await?
                .get_tariff(v1::GetTariffRequest { id, version })
                .await?
                .into_inner();
            if out == Output::Json {
                emit(out, tjson(&t), &[], vec![]);
            } else {
                println!("{}", t.tariff_json);
            }
        }
        TariffsCmd::Assign {
            tariff_id,
            scope,
            target,
            from,
            to,
        } => {
            billing(cfg)
                .await?
                .assign_tariff(v1::AssignTariffRequest {
                    assignment: Some(v1::TariffAssignment {
                        scope: scope.clone(),
                        target: target.clone(),
                        tariff_id: tariff_id.clone(),
                        valid_from: from,
                        valid_to: to,
                    }),
                })
                .await?;
            emit(
                out,
                json!({"tariff_id": tariff_id, "scope": scope, "target": target}),
                &["TARIFF", "SCOPE", "TARGET"],
                vec![vec![tariff_id, scope, target]],
            );
        }
        TariffsCmd::Preview {
            tariff,
            file,
            start,
            time_zone,
            stretches,
        } => {
            let tariff_json = match &file {
                Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                None => String::new(),
            };
            let fmt = &time::format_description::well_known::Rfc3339;
            let mut at = if start.is_empty() {
                time::OffsetDateTime::now_utc()
            } else {
                time::OffsetDateTime::parse(&start, fmt)
                    .with_context(|| format!("--start {start:?} is not RFC 3339"))?
            };
            let mut wh: u64 = 0;
            let mut readings = vec![v1::PreviewReading {
                timestamp: at.format(fmt)?,
                energy_wh: 0,
                current_ma: 0,
            }];
            for s in &stretches {
                let parts: Vec<&str> = s.split(':').collect();
                let bad = || anyhow!("--stretch {s:?}: expected MINUTES:KWH[:AMPS], e.g. 60:20:32");
                if !(2..=3).contains(&parts.len()) {
                    return Err(bad());
                }
                let minutes: u32 = parts[0].parse().map_err(|_| bad())?;
                let kwh: rust_decimal::Decimal = parts[1].parse().map_err(|_| bad())?;
                let amps: u32 = parts
                    .get(2)
                    .map(|a| a.parse())
                    .transpose()
                    .map_err(|_| bad())?
                    .unwrap_or(if kwh.is_zero() { 0 } else { 16 });
                let add: u64 = (kwh * rust_decimal::Decimal::from(1000))
                    .trunc()
                    .try_into()
                    .map_err(|_| bad())?;
                at += time::Duration::minutes(i64::from(minutes));
                wh += add;
                readings.push(v1::PreviewReading {
                    timestamp: at.format(fmt)?,
                    energy_wh: wh,
                    current_ma: amps * 1000,
                });
            }
            let c = billing(cfg)
                .await?
                .preview_cost(v1::PreviewCostRequest {
                    tariff_id: tariff,
                    tariff_json,
                    time_zone,
                    readings,
                })
                .await?
                .into_inner();
            emit(
                out,
                serde_json::from_str(&c.json).unwrap_or_default(),
                &["CURRENCY", "EXCL VAT", "VAT", "INCL VAT"],
                vec![vec![c.currency, c.total_excl_vat, c.total_vat, c.total_incl_vat]],
            );
        }
    }
    Ok(())
}

const CDR_HEADERS: &[&str] = &[
    "CDR", "CHARGER", "STOP", "KWH", "CURRENCY", "EXCL VAT", "INCL VAT", "REVIEW", "FLAGS",
];

fn cdr_row(c: &v1::CdrInfo) -> Vec<String> {
    vec![
        c.id.clone(),
        c.charger_id.clone(),
        c.stop.clone(),
        format!("{}.{:03}", c.energy_wh / 1000, c.energy_wh % 1000),
        c.currency.clone(),
        c.total_excl_vat.clone(),
        c.total_incl_vat.clone(),
        if c.review_required && !c.approved {
            "held".into()
        } else {
            String::new()
        },
        c.flags.join(","),
    ]
}

async fn cdrs_cmd(out: Output, cfg: Option<&Path>, cmd: CdrsCmd) -> anyhow::Result<()> {
    let cjson = |c: &v1::CdrInfo| serde_json::from_str::<Value>(&c.json).unwrap_or_default();
    match cmd {
        CdrsCmd::List { page } => {
            let mut b = billing(cfg).await?;
            let mut token = page.page_token.clone();
            let mut all = Vec::new();
            loop {
                let r = b
                    .list_cdrs(v1::ListCdrsRequest {
                        page: Some(page.req(&token)),
                    })
                    .await?
                    .into_inner();
                all.extend(r.cdrs);
                token = r.next_page_token;
                if !page.all || token.is_empty() {
                    break;
                }
            }
            emit(
                out,
                json!({"cdrs": all.iter().map(cjson).collect::<Vec<_>>(), "next_page_token": token}),
                CDR_HEADERS,
                all.iter().map(cdr_row).collect(),
            );
        }
        CdrsCmd::Show { id } => {
            let c = billing(cfg)
                .await?
                .get_cdr(v1::GetCdrRequest { id })
                .await?
                .into_inner();
            if out == Output::Json {
                emit(out, cjson(&c), &[], vec![]);
            } else {
                println!("{}", c.json);
            }
        }
        CdrsCmd::Export {
            from,
            to,
            format,
            out: file,
        } => {
            let r = billing(cfg)
                .await?
                .export_cdrs(v1::ExportCdrsRequest { from, to, format })
                .await?
                .into_inner();
            match file {
                Some(f) => {
                    std::fs::write(&f, &r.content).with_context(|| format!("writing {}", f.display()))?;
                    eprintln!("{} CDRs written to {}", r.count, f.display());
                }
                None => print!("{}", r.content),
            }
        }
        CdrsCmd::Approve { id } => {
            let c = billing(cfg)
                .await?
                .approve_cdr(v1::GetCdrRequest { id })
                .await?
                .into_inner();
            emit(out, cjson(&c), CDR_HEADERS, vec![cdr_row(&c)]);
        }
        CdrsCmd::Refund { id, reason } => {
            billing(cfg)
                .await?
                .refund_cdr(v1::RefundCdrRequest { id: id.clone(), reason })
                .await?;
            emit(out, json!({"refunded": id}), &["REFUNDED"], vec![vec![id]]);
        }
    }
    Ok(())
}

async fn ledger_cmd(out: Output, cfg: Option<&Path>, cmd: LedgerCmd) -> anyhow::Result<()> {
    match cmd {
        LedgerCmd::Balance => {
            let r = billing(cfg)
                .await?
                .ledger_balances(v1::LedgerBalancesRequest {})
                .await?
                .into_inner();
            emit(
                out,
                json!({"balances": r.balances.iter().map(|b| json!({"currency": b.currency, "account": b.account, "amount": b.amount})).collect::<Vec<_>>()}),
                &["CURRENCY", "ACCOUNT", "BALANCE (DEBIT − CREDIT)"],
                r.balances
                    .iter()
                    .map(|b| vec![b.currency.clone(), b.account.clone(), b.amount.clone()])
                    .collect(),
            );
        }
        LedgerCmd::Verify => {
            let v = billing(cfg)
                .await?
                .verify_ledger(v1::VerifyLedgerRequest {})
                .await?
                .into_inner();
            emit(
                out,
                json!({"ok": v.ok, "entries": v.entries, "postings": v.postings, "cdrs": v.cdrs, "problems": v.problems}),
                &["OK", "ENTRIES", "POSTINGS", "CDRS", "PROBLEMS"],
                vec![vec![
                    v.ok.to_string(),
                    v.entries.to_string(),
                    v.postings.to_string(),
                    v.cdrs.to_string(),
                    v.problems.join("; "),
                ]],
            );
            if !v.ok {
                bail!("the ledger does not verify: {}", v.problems.join("; "));
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<tonic::Status>() {
            Some(s) => eprintln!("laddctl: {:?}: {}", s.code(), s.message()),
            None => eprintln!("laddctl: {e:#}"),
        }
        std::process::exit(1);
    }
}
