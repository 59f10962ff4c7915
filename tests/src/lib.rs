//! The end-to-end test harness: a real node on loopback (port 0) in a
//! temporary data dir, with a clock the test can move, and helpers that act
//! as chargers, operators and attackers with real certificates.

pub mod cluster;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use laddnet_core::{OperatorName, Role};
use laddnet_node::{NodeConfig, RunningNode};
use laddnet_proto::v1;
use laddnet_proto::v1::charger_service_client::ChargerServiceClient;
use laddnet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use laddnet_proto::v1::pki_service_client::PkiServiceClient;
use rustls::ClientConfig;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub use laddnet_node;
pub use laddnet_pki;

/// A clock the test moves: the wall clock plus an offset.
#[derive(Clone, Default)]
pub struct TestClock {
    offset: Arc<AtomicI64>,
}

impl TestClock {
    pub fn advance_days(&self, days: i64) {
        self.offset.fetch_add(days * 86_400, Ordering::SeqCst);
    }
    pub fn clock(&self) -> laddnet_pki::Clock {
        let offset = self.offset.clone();
        Arc::new(move || time::OffsetDateTime::now_utc().unix_timestamp() + offset.load(Ordering::SeqCst))
    }
}

/// Credentials: chain PEM (leaf first) and key PEM.
#[derive(Clone, Debug)]
pub struct Creds {
    pub chain_pem: String,
    pub key_pem: String,
    pub serial: String,
}

pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub config: NodeConfig,
    pub node: Option<RunningNode>,
    pub clock: TestClock,
    pub root_pem: String,
    pub admin: Creds,
}

impl TestNode {
    /// A fresh CA and node with test-friendly timings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut NodeConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = NodeConfig::for_data_dir(dir.path().join("data"));
        config.listen.mtls = "127.0.0.1:0".parse().unwrap();
        config.listen.enrollment = "127.0.0.1:0".parse().unwrap();
        config.listen.metrics = "127.0.0.1:0".into();
        config.tls.handshake_timeout_ms = 1_000;
        config.tls.crl_poll_ms = 200;
        tweak(&mut config);
        let init_cfg = config.clone();
        tokio::task::spawn_blocking(move || {
            laddnet_node::init_data_dir(&init_cfg, &OperatorName::new("admin").unwrap()).expect("init")
        })
        .await
        .unwrap();
        let creds = config.data_dir.join("credentials");
        let chain_pem = std::fs::read_to_string(creds.join("admin.crt")).unwrap();
        let key_pem = std::fs::read_to_string(creds.join("admin.key")).unwrap();
        let serial = laddnet_pki::summarize_certificate(&laddnet_pki::tls::certs_from_pem(&chain_pem).unwrap()[0])
            .unwrap()
            .serial;
        let root_pem = std::fs::read_to_string(config.ca_dir().join("root.crt")).unwrap();
        let clock = TestClock::default();
        let node = RunningNode::start_with(config.clone(), clock.clock())
            .await
            .expect("node starts");
        Self {
            dir,
            config,
            node: Some(node),
            clock,
            root_pem,
            admin: Creds {
                chain_pem,
                key_pem,
                serial,
            },
        }
    }

    pub fn node(&self) -> &RunningNode {
        self.node.as_ref().expect("node running")
    }

    pub fn mtls_endpoint(&self) -> String {
        format!("https://{}", self.node().mtls_addr)
    }

    pub fn tls(&self, creds: Option<&Creds>) -> Arc<ClientConfig> {
        laddnet_pki::tls::client_config(
            &self.root_pem,
            creds.map(|c| (c.chain_pem.as_str(), c.key_pem.as_str())),
        )
        .unwrap()
    }

    /// A channel to the mutual-TLS listener presenting `creds`.
    pub async fn channel(&self, creds: &Creds) -> anyhow::Result<Channel> {
        laddnet_node::client::connect(&self.mtls_endpoint(), "localhost", self.tls(Some(creds))).await
    }

    pub async fn pki(&self) -> PkiServiceClient<Channel> {
        PkiServiceClient::new(self.channel(&self.admin).await.expect("admin connects"))
    }

    pub async fn enrollment(&self) -> EnrollmentServiceClient<Channel> {
        let ch = laddnet_node::client::connect(
            &format!("https://{}", self.node().enrollment_addr),
            "localhost",
            self.tls(None),
        )
        .await
        .expect("enrollment listener reachable");
        EnrollmentServiceClient::new(ch)
    }

    pub async fn token(&self, charger_id: &str) -> String {
        self.pki()
            .await
            .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
                charger_id: charger_id.into(),
                ttl_seconds: 0,
                site_id: String::new(),
            })
            .await
            .expect("token created")
            .into_inner()
            .token
    }

    /// Enrolls a charger the way a real one does: new key, CSR, token.
    pub async fn enroll(&self, charger_id: &str) -> Creds {
        let token = self.token(charger_id).await;
        let (key, csr) = laddnet_pki::new_key_and_csr(charger_id).unwrap();
        let r = self
            .enrollment()
            .await
            .enroll(v1::EnrollRequest {
                charger_id: charger_id.into(),
                token,
                csr_pem: csr,
            })
            .await
            .expect("enrolled")
            .into_inner();
        Creds {
            chain_pem: r.chain_pem,
            key_pem: key.to_string(),
            serial: r.certificate.unwrap().serial,
        }
    }

    /// Issues an operator certificate with `role`.
    pub async fn operator(&self, name: &str, role: Role) -> Creds {
        let (key, csr) = laddnet_pki::new_key_and_csr(name).unwrap();
        let r = self
            .pki()
            .await
            .issue_operator_certificate(v1::IssueOperatorCertificateRequest {
                name: name.into(),
                role: role.to_string(),
                csr_pem: csr,
            })
            .await
            .expect("operator issued")
            .into_inner();
        Creds {
            chain_pem: r.chain_pem,
            key_pem: key.to_string(),
            serial: r.certificate.unwrap().serial,
        }
    }

    /// The intermediate CA's issuer, read from disk as an attacker holding
    /// the key would: for forging certificates the CA never recorded.
    pub fn raw_issuer(&self) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let files = laddnet_pki::CaFiles::new(self.config.ca_dir());
        let sealed: laddnet_vault::SealedBox =
            serde_json::from_slice(&std::fs::read(files.intermediate_key()).unwrap()).unwrap();
        let der = laddnet_vault::open(
            &laddnet_vault::KeySource::KeyFile(self.config.key_file()),
            b"laddnet/ca/intermediate-key/v1",
            &sealed,
        )
        .unwrap();
        let key = rcgen::KeyPair::try_from(der.as_slice()).unwrap();
        let cert_pem = std::fs::read_to_string(files.intermediate_cert()).unwrap();
        rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).unwrap()
    }

    pub fn intermediate_pem(&self) -> String {
        std::fs::read_to_string(laddnet_pki::CaFiles::new(self.config.ca_dir()).intermediate_cert()).unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// Revokes `serial` for key compromise, as a security officer would.
    pub async fn revoke(&self, serial: &str) {
        self.pki()
            .await
            .revoke_certificate(laddnet_proto::v1::RevokeCertificateRequest {
                serial: serial.into(),
                reason: "key-compromise".into(),
            })
            .await
            .expect("revoked");
    }

    pub async fn stop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }

    /// Stops the node (if running) and starts it again on the same data
    /// dir and config; the listeners get new ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        let node = RunningNode::start_with(self.config.clone(), self.clock.clock())
            .await
            .expect("node restarts");
        self.node = Some(node);
    }

    pub async fn driver_admin(
        &self,
    ) -> laddnet_proto::v1::driver_admin_service_client::DriverAdminServiceClient<Channel> {
        laddnet_proto::v1::driver_admin_service_client::DriverAdminServiceClient::new(
            self.channel(&self.admin).await.expect("admin connects"),
        )
    }

    /// Creates a driver paying by card with one RFID card; returns
    /// (driver id, token id).
    pub async fn driver(&self, name: &str, email: &str, rfid: &str) -> (String, String) {
        let mut admin = self.driver_admin().await;
        let d = admin
            .create_driver(v1::CreateDriverRequest {
                name: name.into(),
                email: email.into(),
                payment: "card".into(),
                ..Default::default()
            })
            .await
            .expect("driver created")
            .into_inner();
        let t = admin
            .add_token(v1::AddTokenRequest {
                driver_id: d.driver_id.clone(),
                kind: "rfid".into(),
                value: rfid.into(),
                expires_at: String::new(),
            })
            .await
            .expect("token added")
            .into_inner();
        (d.driver_id, t.token_id)
    }

    /// A driver-app credential (certificate) for `driver_id`.
    pub async fn driver_credential(&self, driver_id: &str) -> Creds {
        let (key, csr) = laddnet_pki::new_key_and_csr(driver_id).unwrap();
        let r = self
            .driver_admin()
            .await
            .issue_driver_credential(v1::IssueDriverCredentialRequest {
                driver_id: driver_id.into(),
                csr_pem: csr,
            })
            .await
            .expect("driver credential issued")
            .into_inner();
        Creds {
            chain_pem: r.chain_pem,
            key_pem: key.to_string(),
            serial: r.certificate.unwrap().serial,
        }
    }

    /// Installs [`TARIFF`] for the whole operator.
    pub async fn install_tariff(&self) {
        let mut b = laddnet_proto::v1::billing_service_client::BillingServiceClient::new(
            self.channel(&self.admin).await.expect("admin connects"),
        );
        install_tariff(&mut b).await;
    }

    /// Where a simulated charger finds this node (as it runs now).
    pub fn sim_endpoints(&self) -> laddnet_sim::Endpoints {
        laddnet_sim::Endpoints {
            mtls: vec![self.mtls_endpoint()],
            enrollment: format!("https://{}", self.node().enrollment_addr),
            server_name: "localhost".into(),
            root_pem: self.root_pem.clone(),
        }
    }
}

/// A tariff: 0.50 flat (20 % VAT) plus 0.25 per kWh (10 % VAT), in EUR.
pub const TARIFF: &str = r#"{"id":"standard","currency":"EUR","elements":[
  {"price_components":[{"type":"FLAT","price":0.50,"vat":20.0,"step_size":1}]},
  {"price_components":[{"type":"ENERGY","price":0.25,"vat":10.0,"step_size":1}]}]}"#;

/// Installs [`TARIFF`] (id `standard`) for the whole operator.
pub async fn install_tariff(b: &mut laddnet_proto::v1::billing_service_client::BillingServiceClient<Channel>) {
    b.create_tariff(v1::CreateTariffRequest {
        tariff_json: TARIFF.into(),
    })
    .await
    .expect("tariff created");
    b.assign_tariff(v1::AssignTariffRequest {
        assignment: Some(v1::TariffAssignment {
            scope: "operator".into(),
            target: String::new(),
            tariff_id: "standard".into(),
            valid_from: "2020-01-01T00:00:00Z".into(),
            valid_to: String::new(),
        }),
    })
    .await
    .expect("tariff assigned");
}

/// A charger's open Attach stream.
pub struct Attached {
    pub tx: mpsc::Sender<v1::ChargerMessage>,
    pub rx: tonic::Streaming<v1::CentralMessage>,
    next_id: u64,
}

impl Attached {
    /// Sends one message and waits for the reply that names it (commands
    /// arriving meanwhile are collected in `commands`).
    pub async fn request(&mut self, payload: v1::charger_message::Payload) -> anyhow::Result<v1::CentralMessage> {
        self.next_id += 1;
        let id = self.next_id;
        self.tx
            .send(v1::ChargerMessage {
                msg_id: id,
                payload: Some(payload),
            })
            .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(15), self.rx.message())
                .await??
                .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
            if m.msg_id == id {
                return Ok(m);
            }
        }
    }

    /// Sends a transaction event; Ok(true) when acknowledged, Ok(false) when rejected.
    pub async fn event(&mut self, e: v1::TransactionEvent) -> anyhow::Result<bool> {
        let r = self.request(v1::charger_message::Payload::Transaction(e)).await?;
        match r.payload {
            Some(v1::central_message::Payload::TransactionAck(_)) => Ok(true),
            Some(v1::central_message::Payload::Rejected(_)) => Ok(false),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }

    pub async fn heartbeat(&mut self) -> anyhow::Result<v1::CentralMessage> {
        self.next_id += 1;
        self.tx
            .send(v1::ChargerMessage {
                msg_id: self.next_id,
                payload: Some(v1::charger_message::Payload::Heartbeat(v1::Heartbeat {})),
            })
            .await?;
        let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        Ok(m)
    }
}

/// Opens the Attach stream and sends boot claiming `claimed_id`; returns
/// once the node accepted the boot, or its refusal.
pub async fn attach(channel: Channel, claimed_id: &str) -> Result<Attached, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(v1::ChargerMessage {
        msg_id: 1,
        payload: Some(v1::charger_message::Payload::Boot(v1::Boot {
            charger_id: claimed_id.into(),
            vendor: "laddnet-test".into(),
            model: "T1".into(),
            firmware_version: "1.0".into(),
            local_list_version: 0,
            connectors: vec![
                v1::Connector {
                    connector_id: 1,
                    r#type: v1::ConnectorType::Ac as i32,
                    max_power_w: 22_000,
                },
                v1::Connector {
                    connector_id: 2,
                    r#type: v1::ConnectorType::Dc as i32,
                    max_power_w: 150_000,
                },
            ],
        })),
    })
    .await
    .unwrap();
    let mut client = ChargerServiceClient::new(channel);
    let mut rx_stream = client.attach(ReceiverStream::new(rx)).await?.into_inner();
    match rx_stream.message().await? {
        Some(v1::CentralMessage {
            payload: Some(v1::central_message::Payload::BootAccepted(_)),
            ..
        }) => Ok(Attached {
            tx,
            rx: rx_stream,
            next_id: 1,
        }),
        other => Err(tonic::Status::internal(format!("unexpected first reply {other:?}"))),
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Signs a certificate directly with the intermediate's key (bypassing the
/// CA's records), from `params` for a fresh key. Returns (chain PEM, key PEM).
pub fn forge(node: &TestNode, params: rcgen::CertificateParams) -> Creds {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &node.raw_issuer()).unwrap();
    let serial = laddnet_pki::summarize_certificate(cert.der()).unwrap().serial;
    Creds {
        chain_pem: format!("{}{}", cert.pem(), node.intermediate_pem()),
        key_pem: key.serialize_pem(),
        serial,
    }
}

/// Parameters of a charger-like certificate, for tests to bend.
pub fn charger_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(30);
    let mut serial = [0u8; 17];
    serial[0] = 1;
    serial[1..9].copy_from_slice(&now.unix_timestamp_nanos().to_be_bytes()[8..]);
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    p.use_authority_key_identifier_extension = true;
    p
}

/// Whether an RPC over a channel with `creds` gets any answer from the node.
pub async fn served(node: &TestNode, creds: &Creds) -> bool {
    let Ok(ch) = node.channel(creds).await else {
        return false;
    };
    let mut health = tonic_health_client(ch);
    health
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .is_ok()
}

fn tonic_health_client(ch: Channel) -> tonic_health::pb::health_client::HealthClient<Channel> {
    tonic_health::pb::health_client::HealthClient::new(ch)
}

/// A transaction event on connector 1 at `minute` minutes into the session.
pub fn tx_event(
    tx: &str,
    seq: u64,
    kind: v1::TransactionEventType,
    energy_wh: u64,
    minute: i64,
) -> v1::TransactionEvent {
    v1::TransactionEvent {
        transaction_id: tx.into(),
        seq,
        event_type: kind as i32,
        connector_id: 1,
        timestamp_ms: 1_700_000_000_000 + minute * 60_000,
        // No token: a start the node does not authorize (free vend, or a
        // remote start); tests of authorization set one.
        id_token: String::new(),
        token_type: v1::TokenType::Rfid as i32,
        meter: Some(v1::MeterValue {
            energy_wh,
            power_w: 11_000,
            current_ma: 16_000,
            voltage_mv: 230_000,
            soc_percent: Some(40),
            ..Default::default()
        }),
        offline: false,
        stop_reason: if kind == v1::TransactionEventType::Ended {
            "ev-disconnected".into()
        } else {
            String::new()
        },
    }
}

/// A whole session: start, `updates` updates of 150 Wh a minute, end.
pub fn session_events(tx: &str, updates: u64) -> Vec<v1::TransactionEvent> {
    let mut v = vec![tx_event(tx, 0, v1::TransactionEventType::Started, 10_000, 0)];
    for i in 1..=updates {
        v.push(tx_event(
            tx,
            i,
            v1::TransactionEventType::Updated,
            10_000 + 150 * i,
            i as i64,
        ));
    }
    v.push(tx_event(
        tx,
        updates + 1,
        v1::TransactionEventType::Ended,
        10_000 + 150 * (updates + 1),
        updates as i64 + 1,
    ));
    v
}

/// Where cargo put the workspace's binaries. The first call in a test
/// process runs `cargo build` for them (a no-op when they are fresh), so a
/// test never runs a stale binary: `cargo test -p laddnet-tests` alone does
/// not rebuild other packages' binaries.
/// `laddnet init --data-dir d` in `dir`, as an operator runs it: a fresh
/// data dir with its CA, config and admin credentials under `dir/d`.
pub fn laddnet_init(dir: &std::path::Path) {
    let init = std::process::Command::new(bin("laddnet"))
        .args(["init", "--data-dir", "d"])
        .current_dir(dir)
        .output()
        .expect("running laddnet init");
    assert!(
        init.status.success(),
        "laddnet init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}

pub fn bin(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Without the variables `cargo test` sets for this package: build
        // scripts that watch them (ring's watches CARGO_MANIFEST_DIR) would
        // otherwise rebuild half the tree, and again at the next plain build.
        let mut cmd = std::process::Command::new(cargo);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "OUT_DIR"
                || k == "CARGO_MANIFEST_DIR"
                || k == "CARGO_MANIFEST_PATH"
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "CARGO_TARGET_TMPDIR"
                || k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_")
            {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.args(["build", "-q", "--workspace", "--bins"]);
        // On a real FoundationDB (see docs/operations.md) the nodes need the backend.
        if std::env::var_os("FDB_CLUSTER_FILE").is_some() {
            cmd.args(["--features", "laddnet-node/fdb"]);
        }
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "building the binaries failed");
    });
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    dir.join(name)
}

impl TestNode {
    pub async fn operator_client(&self) -> laddnet_proto::v1::operator_service_client::OperatorServiceClient<Channel> {
        laddnet_proto::v1::operator_service_client::OperatorServiceClient::new(
            self.channel(&self.admin).await.expect("admin connects"),
        )
    }

    pub async fn session(&self, tx: &str) -> Option<v1::Session> {
        self.operator_client()
            .await
            .get_session(v1::GetSessionRequest {
                transaction_id: tx.into(),
            })
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// A charger certificate issued by the CA directly (as for chargers
    /// provisioned at the factory), without the enrollment listener and
    /// its per-address rate limit: for benches that need many chargers.
    pub async fn provisioned(&self, id: &str) -> Creds {
        let (ca, id) = (self.node().state.ca.clone(), id.to_string());
        let (issued, key) = tokio::task::spawn_blocking(move || {
            ca.issue_with_new_key(
                &laddnet_pki::Subject::Charger {
                    id: laddnet_core::ChargerId::new(&id).unwrap(),
                    site: None,
                },
                "test",
            )
        })
        .await
        .unwrap()
        .unwrap();
        Creds {
            chain_pem: issued.chain_pem,
            key_pem: key.to_string(),
            serial: issued.record.serial,
        }
    }

    /// Enrolls `id` and attaches it.
    pub async fn charger(&self, id: &str) -> (Creds, Attached) {
        let creds = self.enroll(id).await;
        let a = attach(self.channel(&creds).await.unwrap(), id).await.expect("attached");
        (creds, a)
    }
}

/// A real `laddnet node` process on the data dir `d` under `dir`, listening
/// on free loopback ports; `env` adds overrides (`LADDNET_…`).
pub struct NodeProcess {
    pub child: std::process::Child,
    pub mtls: String,
    pub enrollment: String,
    /// The node's log (its stderr), appended across restarts.
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> NodeProcess {
        Self::start_in(dir, "d/laddnet.toml", "node.log", env)
    }

    /// A node on the config `config` (relative to `dir`), logging to `log`.
    pub fn start_in(dir: &std::path::Path, config: &str, log: &str, env: &[(&str, &str)]) -> NodeProcess {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(bin("laddnet"));
        cmd.args(["node", "--config", config])
            .current_dir(dir)
            .env("LADDNET_LISTEN__MTLS", "127.0.0.1:0")
            .env("LADDNET_LISTEN__ENROLLMENT", "127.0.0.1:0")
            .env("LADDNET_LISTEN__METRICS", "127.0.0.1:0")
            .env_remove("LADDNET_CA_PASSPHRASE")
            .stdout(std::process::Stdio::piped());
        let log = dir.join(log);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("node log file");
        cmd.stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("laddnet node starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("serving: mutual TLS on ") {
                    let (m, e) = rest.split_once(", enrollment on ").unwrap_or((rest, ""));
                    let _ = tx.send((m.to_string(), e.to_string()));
                }
            }
        });
        let (mtls, enrollment) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the node printed its addresses");
        NodeProcess {
            child,
            mtls,
            enrollment,
            log,
        }
    }

    /// A client TLS config trusting `root_pem`, presenting `creds` if given.
    pub fn tls(root_pem: &str, creds: Option<&Creds>) -> Arc<ClientConfig> {
        laddnet_pki::tls::client_config(root_pem, creds.map(|c| (c.chain_pem.as_str(), c.key_pem.as_str()))).unwrap()
    }

    /// A channel to this node's mutual-TLS listener presenting `creds`.
    pub async fn channel(&self, root_pem: &str, creds: &Creds) -> Channel {
        laddnet_node::client::connect(
            &format!("https://{}", self.mtls),
            "localhost",
            Self::tls(root_pem, Some(creds)),
        )
        .await
        .expect("connects")
    }

    /// Enrolls `charger_id` as a charger does: a token from `admin`, a new
    /// key, a CSR to the enrollment listener.
    pub async fn enroll(&self, root_pem: &str, admin: &Creds, charger_id: &str) -> Creds {
        self.enroll_at(root_pem, admin, charger_id, "").await
    }

    /// [`Self::enroll`], the charger placed at `site_id` by its token.
    pub async fn enroll_at(&self, root_pem: &str, admin: &Creds, charger_id: &str, site_id: &str) -> Creds {
        let token = v1::pki_service_client::PkiServiceClient::new(self.channel(root_pem, admin).await)
            .create_enrollment_token(v1::CreateEnrollmentTokenRequest {
                charger_id: charger_id.into(),
                ttl_seconds: 0,
                site_id: site_id.into(),
            })
            .await
            .expect("token")
            .into_inner()
            .token;
        let (key, csr) = laddnet_pki::new_key_and_csr(charger_id).unwrap();
        let ch = laddnet_node::client::connect(
            &format!("https://{}", self.enrollment),
            "localhost",
            Self::tls(root_pem, None),
        )
        .await
        .expect("enrollment listener");
        let r = EnrollmentServiceClient::new(ch)
            .enroll(v1::EnrollRequest {
                charger_id: charger_id.into(),
                token,
                csr_pem: csr,
            })
            .await
            .expect("enrolled")
            .into_inner();
        Creds {
            chain_pem: r.chain_pem,
            key_pem: key.to_string(),
            serial: r.certificate.map(|c| c.serial).unwrap_or_default(),
        }
    }

    /// SIGTERM, then waits for the node to finish shutting down.
    pub fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// SIGKILL: no shutdown, no flush, nothing.
    pub fn kill9(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// `laddnet up` and `laddctl` as a newcomer runs them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// A `laddnet up` process and where its laddctl config is.
pub struct Up {
    pub child: Child,
    pub stderr: std::thread::JoinHandle<String>,
    pub ctl_config: PathBuf,
}

/// Runs `laddnet up` in `dir` on free ports with no injected faults, plus
/// `extra` arguments; returns once it printed its laddctl config.
pub fn start_up(dir: &Path, extra: &[&str]) -> Up {
    let mut child = Command::new(bin("laddnet"))
        .args([
            "up",
            "--mtls-addr",
            "127.0.0.1:0",
            "--enrollment-addr",
            "127.0.0.1:0",
            "--fault-every-s",
            "0",
        ])
        .args(extra)
        .current_dir(dir)
        .env("LADDNET_LISTEN__METRICS", "127.0.0.1:0")
        .env_remove("LADDCTL_CONFIG")
        .env_remove("LADDNET_CA_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.trim().strip_prefix("laddctl config: ") {
                let _ = tx.send(PathBuf::from(p));
            }
        }
    });
    let ctl_config = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("`laddnet up` printed its laddctl config");
    Up {
        child,
        stderr,
        ctl_config,
    }
}

/// Ctrl-C; returns the exit status and everything it logged.
pub fn stop(up: Up) -> (std::process::ExitStatus, String) {
    stop_with(up, "-INT")
}

pub fn stop_with(mut up: Up, signal: &str) -> (std::process::ExitStatus, String) {
    let ok = Command::new("kill")
        .args([signal, &up.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = up.child.wait().unwrap();
    (status, up.stderr.join().unwrap())
}

/// `laddctl` in `dir` (finding its config there).
pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("laddctl"))
        .args(args)
        .current_dir(dir)
        .env_remove("LADDCTL_CONFIG")
        .output()
        .unwrap()
}

/// A successful command's JSON output.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "laddctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}
