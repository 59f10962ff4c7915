//! The node's typed configuration: a TOML file (unknown fields refused)
//! plus `LADDNET_*` environment overrides. `LADDNET_SECTION__KEY=value`
//! sets `[section] key = value` (the value parsed as TOML, else taken as a
//! string): `LADDNET_LISTEN__MTLS=0.0.0.0:7443`.
//!
//! Secrets are never in the file: the CA passphrase comes from
//! `LADDNET_CA_PASSPHRASE`, the key-encryption key from a key file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variables that are not config overrides.
const NOT_OVERRIDES: &[&str] = &["LADDNET_CA_PASSPHRASE", "LADDNET_LOG", "LADDNET_MASTER_KEYS"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the store, the CA and credentials live. Relative paths are
    /// relative to the config file.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub listen: ListenSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub grpc: GrpcSection,
    #[serde(default)]
    pub ca: CaSection,
    #[serde(default)]
    pub sessions: SessionsSection,
    #[serde(default)]
    pub billing: BillingSection,
    #[serde(default)]
    pub drivers: DriversSection,
    #[serde(default)]
    pub notifications: NotificationsSection,
    #[serde(default)]
    pub alarms: AlarmsSection,
    #[serde(default)]
    pub load: LoadSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub cluster: ClusterSection,
}

/// Which store the node uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// redb in the data dir: one node owns it (the default).
    #[default]
    Embedded,
    /// `laddnet store serve`: one redb file shared by the nodes of a small
    /// cluster over mutual TLS (not replicated).
    Shared,
    /// A FoundationDB cluster (a build with the `fdb` feature).
    Foundationdb,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub backend: StoreBackend,
    /// shared: `https://host:port` of `laddnet store serve`.
    pub endpoint: String,
    /// shared: the name to check in the store server's certificate.
    pub server_name: String,
    /// shared: this node's store credentials, written by `laddnet store
    /// serve --client NAME` (the chain and its key, mode 0600).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// foundationdb: the cluster file (default: FoundationDB's own default).
    pub cluster_file: Option<PathBuf>,
    /// foundationdb: every key under this prefix (a subspace), so one
    /// FoundationDB cluster can hold several installations. At most 64
    /// characters; empty: the whole keyspace.
    pub key_prefix: String,
}

/// Several nodes on one shared store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// A node's membership lease: another node takes over its chargers
    /// once it has not renewed for this long.
    pub lease_ms: u64,
    /// Where other nodes reach this node's mutual-TLS listener
    /// (`host:port`); empty: the listener's own address.
    pub advertise: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            advertise: String::new(),
        }
    }
}

/// Site load management: how a site's grid limit is shared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoadSection {
    /// Every session gets at least this much while the limit allows (6 A
    /// on one phase: what an AC car needs to keep charging).
    pub min_session_w: u32,
    /// Re-plan at least this often, besides every start and stop.
    pub replan_ms: u64,
    /// A new limit is sent only when it moves by more than this.
    pub hysteresis_w: u32,
}

impl Default for LoadSection {
    fn default() -> Self {
        Self {
            min_session_w: 1_400,
            replan_ms: 2_000,
            hysteresis_w: 300,
        }
    }
}

/// Fault detection thresholds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsSection {
    /// A charger whose connection dropped and did not come back within
    /// this long is offline (an incident opens; it resolves on reconnect).
    pub offline_after_s: u64,
    /// A valid certificate with no successor this close to its expiry is
    /// an incident (renewing or revoking it resolves it).
    pub certificate_expiry_days: u32,
    /// How often certificates are checked.
    pub certificate_check_s: u64,
    /// This many connections of one charger within `flap_window_s` is
    /// flapping; a window with fewer resolves it.
    pub flap_reconnects: u32,
    pub flap_window_s: u64,
    /// Too little power: a session drawing less than this percentage of
    /// what the car, the connector and its limit allow, for longer than
    /// `low_power_after_s` (below `low_power_below_soc` %, where batteries
    /// do not yet taper); or one that will not reach the driver's target
    /// before their departure at its present pace.
    pub low_power_percent: u32,
    pub low_power_after_s: u64,
    pub low_power_below_soc: u32,
    /// A charger drawing more than its charging limit (plus 5 %) this long
    /// after the limit was sent ignores it.
    pub limit_grace_s: u64,
    /// A site above its grid limit for longer than this (the load
    /// manager's reaction time) is an incident.
    pub site_overload_after_s: u64,
}

impl Default for AlarmsSection {
    fn default() -> Self {
        Self {
            offline_after_s: 120,
            certificate_expiry_days: 14,
            certificate_check_s: 3_600,
            flap_reconnects: 5,
            flap_window_s: 600,
            low_power_percent: 50,
            low_power_after_s: 120,
            low_power_below_soc: 80,
            limit_grace_s: 5,
            site_overload_after_s: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DriversSection {
    /// Master keys (`master-v<N>.key`); default `<data_dir>/keys`. Keys
    /// may also come from `LADDNET_MASTER_KEYS` (`1=<hex>,2=<hex>`).
    pub master_key_dir: Option<PathBuf>,
    /// A prepaid wallet must hold this much to start (decimal string).
    pub min_wallet_balance: String,
    /// What a start reserves on a wallet (at most what it has) or
    /// pre-authorizes on a card (decimal string); the session's CDR takes
    /// the real cost and releases the rest.
    pub payment_hold: String,
    /// A start the token did not allow (found when an offline start is
    /// reconciled) is stopped remotely, not only flagged.
    pub stop_unauthorized_starts: bool,
    /// Ended sessions (and their meter readings) older than this are
    /// deleted; CDRs and the ledger stay. 0 keeps them forever.
    pub session_retention_days: u32,
    /// How often the retention sweep runs.
    pub retention_sweep_s: u64,
}

impl Default for DriversSection {
    fn default() -> Self {
        Self {
            master_key_dir: None,
            min_wallet_balance: "5.00".into(),
            payment_hold: "20.00".into(),
            stop_unauthorized_starts: true,
            session_retention_days: 730,
            retention_sweep_s: 3_600,
        }
    }
}

/// One receiver of notification webhooks (the operator's app backend).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the endpoint's queue; keep it stable.
    pub name: String,
    /// http:// or https://
    pub url: String,
    /// File holding the HMAC secret (mode 0600). Each POST carries
    /// `X-Laddnet-Signature: sha256=<hex HMAC of "<timestamp>.<body>">`.
    pub secret_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSection {
    pub webhooks: Vec<WebhookConfig>,
    /// First retry after this long, doubling up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// After this many failed attempts a delivery goes to the dead letters.
    pub max_attempts: u32,
    /// Per attempt.
    pub timeout_ms: u64,
    /// State of charge within this many points of the driver's target
    /// counts as "nearly done"; so do the minutes before departure.
    pub nearly_done_soc_margin: u32,
    pub nearly_done_minutes: u32,
}

impl Default for NotificationsSection {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            retry_initial_ms: 500,
            retry_max_ms: 300_000,
            max_attempts: 20,
            timeout_ms: 5_000,
            nearly_done_soc_margin: 5,
            nearly_done_minutes: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BillingSection {
    /// Currency of CDRs for sessions no tariff applies to.
    pub default_currency: String,
    /// Bill each session the moment it ends (else only the sweeper does).
    pub bill_on_end: bool,
    /// How often ended-but-unbilled sessions are looked for.
    pub sweep_interval_ms: u64,
    /// Who issues invoices: the name (and address) printed on them.
    pub invoice_issuer: String,
}

impl Default for BillingSection {
    fn default() -> Self {
        Self {
            default_currency: "EUR".into(),
            bill_on_end: true,
            sweep_interval_ms: 2_000,
            invoice_issuer: "laddnet charge point operator".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsSection {
    /// A session whose charger dropped is closed as interrupted after this.
    pub interrupted_timeout_s: u64,
    /// A session with no meter data for this long is flagged stuck.
    pub stuck_after_s: u64,
    /// How often the watchdog pings each session actor, and how long it waits.
    pub watchdog_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// Session actor restarts allowed per charger within the window before
    /// the charger's actor escalates (its connection is closed).
    pub max_restarts: u32,
    pub restart_window_s: u64,
    /// How long a caller waits for an actor.
    pub call_timeout_ms: u64,
    /// Messages a charger may send per second (burst `burst`); beyond it the
    /// node reads its stream more slowly (backpressure), never drops.
    pub max_messages_per_second: u32,
    pub burst: u32,
    /// Operator commands waiting for one charger's reply; more are refused.
    pub max_pending_commands: usize,
    /// How long an operator command waits for the charger's reply.
    pub command_timeout_ms: u64,
}

impl Default for SessionsSection {
    fn default() -> Self {
        Self {
            interrupted_timeout_s: 900,
            stuck_after_s: 600,
            watchdog_interval_ms: 5_000,
            ping_timeout_ms: 2_000,
            max_restarts: 3,
            restart_window_s: 10,
            call_timeout_ms: 5_000,
            max_messages_per_second: 100,
            burst: 200,
            max_pending_commands: 16,
            command_timeout_ms: 30_000,
        }
    }
}

impl SessionsSection {
    /// The actor settings with this node's billing choice.
    pub fn actor_config_with(&self, billing: &BillingSection) -> laddnet_actors::ActorConfig {
        let mut c = self.actor_config();
        if billing.bill_on_end {
            c.bill_on_end = Some(billing.default_currency.clone());
        }
        c
    }

    pub fn actor_config(&self) -> laddnet_actors::ActorConfig {
        laddnet_actors::ActorConfig {
            call_timeout: Duration::from_millis(self.call_timeout_ms),
            max_restarts: self.max_restarts,
            restart_window: Duration::from_secs(self.restart_window_s),
            watchdog_interval: Duration::from_millis(self.watchdog_interval_ms),
            ping_timeout: Duration::from_millis(self.ping_timeout_ms),
            stuck_after: Duration::from_secs(self.stuck_after_s),
            bill_on_end: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// The node's name: the CN of its certificate.
    pub name: String,
    /// Seconds a charger may stay silent before it is considered gone.
    pub heartbeat_interval_s: u32,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            name: "node-1".into(),
            heartbeat_interval_s: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// The mutual-TLS listener: chargers, operators, nodes.
    pub mtls: SocketAddr,
    /// The enrollment listener: server-side TLS only.
    pub enrollment: SocketAddr,
    /// Prometheus metrics over plain HTTP (`GET /metrics`); keep it on
    /// localhost or a monitoring network. Empty: off.
    pub metrics: String,
}

impl Default for ListenSection {
    fn default() -> Self {
        Self {
            mtls: "127.0.0.1:7443".parse().unwrap_or_else(|_| unreachable!()),
            enrollment: "127.0.0.1:7444".parse().unwrap_or_else(|_| unreachable!()),
            metrics: "127.0.0.1:9464".into(),
        }
    }
}

impl ListenSection {
    /// Where metrics are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.parse().ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// DNS names and IP addresses in the node's server certificate.
    pub server_names: Vec<String>,
    /// A TLS handshake that takes longer is dropped (slowloris).
    pub handshake_timeout_ms: u64,
    /// Handshakes in progress at once; more wait in the kernel's backlog.
    pub max_pending_handshakes: usize,
    /// Revocations made on other nodes apply as soon as they commit (the
    /// node watches the CRL in the store); this is the safety net: the CRL
    /// and revocations are re-read this often even if no watch fired, and
    /// the CRL is re-signed when half its validity has passed.
    pub crl_poll_ms: u64,
    /// Issue TLS session tickets so reconnecting chargers resume instead of
    /// making a full handshake. The ticket keys are shared by every node
    /// through the store (sealed under the key-encryption key) and rotate
    /// every 6 hours; a ticket is good for at most 12. A resumed
    /// connection passes the same identity check (issued, not revoked, not
    /// expired) as a new one.
    pub session_tickets: bool,
}

impl Default for TlsSection {
    fn default() -> Self {
        Self {
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            handshake_timeout_ms: 5_000,
            max_pending_handshakes: 1_024,
            crl_poll_ms: 30_000,
            session_tickets: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcSection {
    /// Largest message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub keepalive_interval_s: u64,
    pub keepalive_timeout_s: u64,
    /// Connections are closed gracefully after this age (0 = never).
    pub max_connection_age_s: u64,
    pub max_page_size: u32,
    pub default_page_size: u32,
}

impl Default for GrpcSection {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 * 1024,
            max_concurrent_streams: 16,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval_s: 20,
            keepalive_timeout_s: 10,
            max_connection_age_s: 0,
            max_page_size: 1_000,
            default_page_size: 100,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CaSection {
    /// The CA directory; default `<data_dir>/ca`.
    pub dir: Option<PathBuf>,
    /// The key-encryption key file; default `<data_dir>/kek`. Ignored when
    /// `LADDNET_CA_PASSPHRASE` is set.
    pub key_file: Option<PathBuf>,
    /// The certificate policy; default: the compiled-in `pki/policy.toml`.
    pub policy: Option<PathBuf>,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("environment override {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// A config for `data_dir` with every default.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node: Default::default(),
            listen: Default::default(),
            tls: Default::default(),
            grpc: Default::default(),
            ca: Default::default(),
            sessions: Default::default(),
            billing: Default::default(),
            drivers: Default::default(),
            notifications: Default::default(),
            alarms: Default::default(),
            load: Default::default(),
            store: Default::default(),
            cluster: Default::default(),
        }
    }

    /// Reads `path`, applies `LADDNET_*` overrides from `env`, validates.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let mut cfg = Self::parse(&text, env).map_err(|e| match e {
            ConfigError::Invalid(reason) => ConfigError::File {
                path: path.into(),
                reason,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_relative(base);
        Ok(cfg)
    }

    /// Parses TOML text with overrides (no relative-path resolution).
    pub fn parse(text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("LADDNET_") else {
                continue;
            };
            if NOT_OVERRIDES.contains(&var.as_str()) {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Env {
                    var,
                    reason: "empty key segment".into(),
                });
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            let mut node = &mut table;
            for seg in &path[..path.len() - 1] {
                let entry = node
                    .entry(seg.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                node = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                    var: var.clone(),
                    reason: format!("{seg} is not a section"),
                })?;
            }
            node.insert(path[path.len() - 1].clone(), parsed);
        }
        let cfg: NodeConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        for p in [
            &mut self.ca.dir,
            &mut self.ca.key_file,
            &mut self.ca.policy,
            &mut self.drivers.master_key_dir,
            &mut self.store.cert,
            &mut self.store.key,
            &mut self.store.cluster_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for w in &mut self.notifications.webhooks {
            fix(&mut w.secret_file);
        }
    }

    /// Checks values that types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if laddnet_core::ChargerId::new(self.node.name.clone()).is_err() {
            return bad("node.name must be 1 to 48 characters of A-Z a-z 0-9 . _ -");
        }
        if self.store.key_prefix.len() > 64 {
            return bad("store.key_prefix must be at most 64 characters");
        }
        if self.tls.server_names.is_empty() {
            return bad("tls.server_names must name at least one DNS name or IP address");
        }
        if !(1_000..=600_000).contains(&self.cluster.lease_ms) {
            return bad("cluster.lease_ms must be 1000 to 600000");
        }
        if self.store.backend == StoreBackend::Shared
            && (self.store.endpoint.is_empty() || self.store.cert.is_none() || self.store.key.is_none())
        {
            return bad("store.backend = \"shared\" needs store.endpoint, store.cert and store.key");
        }
        if !self.cluster.advertise.is_empty() && self.cluster.advertise.parse::<SocketAddr>().is_err() {
            return bad("cluster.advertise must be host:port with an IP address");
        }
        if !(100..=60_000).contains(&self.tls.handshake_timeout_ms) {
            return bad("tls.handshake_timeout_ms must be 100 to 60000");
        }
        if self.tls.max_pending_handshakes == 0 {
            return bad("tls.max_pending_handshakes must be at least 1");
        }
        if self.tls.crl_poll_ms < 100 {
            return bad("tls.crl_poll_ms must be at least 100");
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.grpc.max_message_bytes) {
            return bad("grpc.max_message_bytes must be 1 KiB to 64 MiB");
        }
        if self.grpc.max_concurrent_streams == 0 {
            return bad("grpc.max_concurrent_streams must be at least 1");
        }
        if self.grpc.keepalive_interval_s == 0 || self.grpc.keepalive_timeout_s == 0 {
            return bad("grpc.keepalive_interval_s and grpc.keepalive_timeout_s must be at least 1");
        }
        if self.grpc.default_page_size == 0 || self.grpc.default_page_size > self.grpc.max_page_size {
            return bad("grpc.default_page_size must be 1 to grpc.max_page_size");
        }
        let se = &self.sessions;
        if se.watchdog_interval_ms < 10 || se.ping_timeout_ms < 10 || se.call_timeout_ms < 10 {
            return bad("sessions.watchdog_interval_ms, ping_timeout_ms and call_timeout_ms must be at least 10");
        }
        if se.max_messages_per_second == 0 || se.burst == 0 || se.max_pending_commands == 0 {
            return bad("sessions.max_messages_per_second, burst and max_pending_commands must be at least 1");
        }
        if se.interrupted_timeout_s == 0 || se.stuck_after_s == 0 {
            return bad("sessions.interrupted_timeout_s and stuck_after_s must be at least 1");
        }
        let b = &self.billing;
        if b.default_currency.len() != 3 || !b.default_currency.bytes().all(|c| c.is_ascii_uppercase()) {
            return bad("billing.default_currency must be an ISO 4217 code such as EUR");
        }
        if b.sweep_interval_ms < 10 {
            return bad("billing.sweep_interval_ms must be at least 10");
        }
        let d = &self.drivers;
        match d.min_wallet_balance.parse::<rust_decimal::Decimal>() {
            Ok(v) if v >= rust_decimal::Decimal::ZERO => {}
            _ => return bad("drivers.min_wallet_balance must be a non-negative decimal such as \"5.00\""),
        }
        match d.payment_hold.parse::<rust_decimal::Decimal>() {
            Ok(v) if v > rust_decimal::Decimal::ZERO => {}
            _ => return bad("drivers.payment_hold must be a positive decimal such as \"20.00\""),
        }
        if d.retention_sweep_s == 0 {
            return bad("drivers.retention_sweep_s must be at least 1");
        }
        if !self.listen.metrics.is_empty() && self.listen.metrics.parse::<SocketAddr>().is_err() {
            return bad("listen.metrics must be an address such as \"127.0.0.1:9464\", or empty for none");
        }
        if self.alarms.offline_after_s == 0 {
            return bad("alarms.offline_after_s must be at least 1");
        }
        if self.alarms.certificate_check_s == 0 {
            return bad("alarms.certificate_check_s must be at least 1");
        }
        if self.alarms.flap_reconnects < 2 || self.alarms.flap_window_s == 0 {
            return bad("alarms.flap_reconnects must be at least 2 and alarms.flap_window_s at least 1");
        }
        let a = &self.alarms;
        if a.low_power_percent == 0 || a.low_power_percent >= 100 || a.low_power_below_soc > 100 {
            return bad("alarms.low_power_percent must be 1 to 99 and alarms.low_power_below_soc at most 100");
        }
        if a.low_power_after_s == 0 || a.limit_grace_s == 0 || a.site_overload_after_s == 0 {
            return bad("alarms.low_power_after_s, limit_grace_s and site_overload_after_s must be at least 1");
        }
        if self.load.replan_ms < 100 || self.load.replan_ms > 60_000 {
            return bad("load.replan_ms must be 100 to 60000");
        }
        let n = &self.notifications;
        if n.retry_initial_ms == 0 || n.retry_max_ms < n.retry_initial_ms || n.max_attempts == 0 {
            return bad(
                "notifications.retry_initial_ms must be at least 1, retry_max_ms at least that, max_attempts at least 1",
            );
        }
        if n.timeout_ms < 10 {
            return bad("notifications.timeout_ms must be at least 10");
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &n.webhooks {
            if w.name.is_empty() || w.name.len() > 64 || !names.insert(w.name.clone()) {
                return bad("notifications.webhooks: each needs a unique name of 1 to 64 characters");
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "notifications.webhooks {}: url must start with http:// or https://",
                    w.name
                )));
            }
        }
        if self.node.heartbeat_interval_s == 0 {
            return bad("node.heartbeat_interval_s must be at least 1");
        }
        Ok(())
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.ca.dir.clone().unwrap_or_else(|| self.data_dir.join("ca"))
    }
    pub fn key_file(&self) -> PathBuf {
        self.ca.key_file.clone().unwrap_or_else(|| self.data_dir.join("kek"))
    }
    pub fn master_key_dir(&self) -> PathBuf {
        self.drivers
            .master_key_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("store.redb")
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls.handshake_timeout_ms)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn overrides_apply_and_are_typed() {
        let cfg = NodeConfig::parse(
            "data_dir = \"d\"\n[grpc]\nmax_concurrent_streams = 8\n",
            env(&[
                ("LADDNET_LISTEN__MTLS", "0.0.0.0:9000"),
                ("LADDNET_GRPC__MAX_CONCURRENT_STREAMS", "32"),
                ("LADDNET_CA_PASSPHRASE", "not a config key"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.mtls.port(), 9000);
        assert_eq!(cfg.grpc.max_concurrent_streams, 32);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = NodeConfig::parse("data_dir = \"d\"\n[grpc]\nmax_streams = 8\n", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_streams"), "{e}");
        let e = NodeConfig::parse("data_dir = \"d\"\n", env(&[("LADDNET_TLS__HANDSHAKE_TIMEOUT_MS", "5")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.handshake_timeout_ms"), "{e}");
        let e = NodeConfig::parse("data_dir = \"d\"\n[listen]\nmtls = \"nonsense\"\n", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mtls") || e.contains("socket address"), "{e}");
    }

    #[test]
    fn default_config_round_trips() {
        let cfg = NodeConfig::for_data_dir("/tmp/x");
        let again = NodeConfig::parse(&cfg.to_toml(), []).unwrap();
        assert_eq!(cfg, again);
    }
}
