//! Simulated chargers. Each one is a real client: it enrolls with a
//! one-time token over the enrollment listener, then attaches over mutual
//! TLS with its own certificate, and behaves like a charger in the field:
//!
//! - AC chargers deliver a flat power up to 22 kW (what the car's onboard
//!   charger takes); DC chargers 50–350 kW, tapering as the state of charge
//!   rises.
//! - Drivers arrive and leave at random; the session ends at the car's
//!   target state of charge or when the driver leaves.
//! - Every event waits in a queue until the node acknowledges it: a
//!   dropped connection keeps queueing (flagged offline) and the queue is
//!   replayed on reconnect, which uses jittered exponential backoff and
//!   moves to the next of the cluster's endpoints after each failure. A
//!   message unanswered for [`ACK_TIMEOUT`] counts as a dead connection (a
//!   frozen node keeps TCP open).
//! - Commands are answered; remote start and stop act on sessions.
//! - Charging limits (`SetChargingLimit`) cap a connector's power until
//!   changed; each reading reports the limit applied and what the car takes.
//! - `GetDiagnostics` uploads a log bundle of the charger's recent history
//!   over the stream.
//! - `UpdateFirmware` downloads the image over mutual TLS and installs it
//!   only if [`laddnet_pki::firmware::verify_firmware`] passes against the
//!   root the charger trusts; then it reboots (reconnects with the new
//!   version in its boot).
//! - Faults can be injected on demand ([`Fault`]).

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use laddnet_proto::v1;
use laddnet_proto::v1::central_message::Payload as Out;
use laddnet_proto::v1::charger_message::Payload as In;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Where the nodes are and what to trust.
#[derive(Clone)]
pub struct Endpoints {
    /// The mutual-TLS listeners of the cluster's nodes (`https://host:port`),
    /// tried in turn: a charger that loses its node, or cannot reach it,
    /// moves to the next one.
    pub mtls: Vec<String>,
    pub enrollment: String,
    pub server_name: String,
    pub root_pem: String,
}

/// A charger's identity: chain and key PEM.
#[derive(Clone)]
pub struct Identity {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Enrolls `charger_id` with `token`, as a real charger does: a new key,
/// a CSR, the token, over server-side TLS.
pub async fn enroll(ep: &Endpoints, charger_id: &str, token: &str) -> anyhow::Result<Identity> {
    let (key, csr) = laddnet_pki::new_key_and_csr(charger_id)?;
    let tls = laddnet_pki::tls::client_config(&ep.root_pem, None)?;
    let ch = laddnet_client::connect(&ep.enrollment, &ep.server_name, tls).await?;
    let r = v1::enrollment_service_client::EnrollmentServiceClient::new(ch)
        .enroll(v1::EnrollRequest {
            charger_id: charger_id.into(),
            token: token.into(),
            csr_pem: csr,
        })
        .await?
        .into_inner();
    Ok(Identity {
        chain_pem: r.chain_pem,
        key_pem: key.to_string(),
    })
}

/// Loads an identity saved by [`save_identity`], if present.
pub fn load_identity(dir: &std::path::Path, charger_id: &str) -> Option<Identity> {
    let chain_pem = std::fs::read_to_string(dir.join(format!("{charger_id}.crt"))).ok()?;
    let key_pem = std::fs::read_to_string(dir.join(format!("{charger_id}.key"))).ok()?;
    Some(Identity { chain_pem, key_pem })
}

pub fn save_identity(dir: &std::path::Path, charger_id: &str, id: &Identity) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{charger_id}.crt")), &id.chain_pem)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(dir.join(format!("{charger_id}.key")))?
        .write_all(id.key_pem.as_bytes())?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ac,
    Dc,
}

/// A simulated charger's make-up.
#[derive(Debug, Clone)]
pub struct Profile {
    pub charger_id: String,
    pub kind: Kind,
    /// Rated power per connector, W.
    pub max_power_w: u32,
    pub connectors: u32,
    /// Real time between meter samples.
    pub sample_every: Duration,
    /// Simulated seconds per real second (a demo compresses an hour).
    pub speed: u32,
    /// Mean real seconds between a connector freeing up and the next car.
    pub mean_idle: Duration,
    /// The first car arrives at a random time within this (real time).
    pub first_car_within: Duration,
    /// RFID UIDs of the drivers who come here (one at random per car, a
    /// card in use here is not picked); empty: the charger runs free
    /// (starts carry no token).
    pub tokens: Vec<String>,
    /// How long drivers stay (None: 30–180 s at random).
    pub stay: Option<Duration>,
}

impl Profile {
    /// A mixed fleet: mostly AC, every fourth a DC fast charger.
    pub fn fleet_member(i: usize) -> Self {
        let dc = i % 4 == 3;
        Profile {
            charger_id: format!("SIM-{:04}", i + 1),
            kind: if dc { Kind::Dc } else { Kind::Ac },
            max_power_w: if dc { [50_000, 150_000, 350_000][i % 3] } else { 22_000 },
            connectors: if dc { 1 } else { 2 },
            sample_every: Duration::from_secs(2),
            speed: 1,
            mean_idle: Duration::from_secs(8),
            first_car_within: Duration::from_secs(4),
            tokens: Vec::new(),
            stay: None,
        }
    }
}

/// Faults to inject.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The connector reports Faulted with this error code (until cleared).
    ErrorCode(u32, String),
    ClearError(u32),
    /// The next reading jumps forward by this many Wh.
    MeterJump(u64),
    /// The next reading goes backwards by this many Wh.
    MeterBackwards(u64),
    /// Send nothing (no heartbeats, no samples) for this long.
    Silence(Duration),
    /// Drop the connection now (the charger reconnects with backoff).
    Disconnect,
    /// Report this many W above the connector's rating while charging
    /// (0: back to normal).
    Overload(u32),
    /// A broken power module: deliver at most this many W whatever the car
    /// and the limit allow (None: repaired).
    Throttle(Option<u32>),
    /// Ignore charging limits from the node (true) or obey them again.
    IgnoreLimits(bool),
    /// Firmware installs fail after a good download and check (true).
    FirmwareFails(bool),
    /// A tampered meter: the register counts this percentage of the energy
    /// delivered (100: honest again), while the power reading stays true.
    EnergyScale(u32),
}

/// How long a message may wait for its answer before the connection is
/// taken for dead.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The longest wait a node's retry-after hint is followed for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The node's hint of when to connect again, if the attach was refused
/// with one.
fn retry_after(e: &anyhow::Error) -> Option<Duration> {
    let status = e.downcast_ref::<tonic::Status>()?;
    let ms: u64 = status
        .metadata()
        .get(laddnet_proto::RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms))
}

/// The most lines a diagnostics bundle keeps.
const LOG_LINES: usize = 500;

/// Live figures, for the `up` summary and tests.
#[derive(Debug, Clone, Default)]
pub struct SimStatus {
    pub connected: bool,
    pub active_sessions: u32,
    /// Power delivered now (the sum over sessions), W.
    pub power_w: u32,
    /// Per session: (transaction id, power delivered now, W).
    pub sessions: Vec<(String, u32)>,
    pub firmware_version: String,
    /// Images refused because they did not verify.
    pub firmware_refused: u64,
    pub queued: usize,
    pub reconnects: u64,
    pub acked: u64,
    /// The highest sequence number the node acknowledged, per transaction.
    pub acked_seq: std::collections::BTreeMap<String, u64>,
}

/// A running simulated charger.
pub struct SimHandle {
    pub charger_id: String,
    faults: mpsc::Sender<Fault>,
    pub status: watch::Receiver<SimStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    pub async fn inject(&self, f: Fault) {
        let _ = self.faults.send(f).await;
    }
    pub fn stop(&self) {
        self.task.abort();
    }
}

struct Session {
    tx_id: String,
    token: String,
    connector: u32,
    seq: u64,
    soc: f64,
    target_soc: f64,
    car_max_w: u32,
    leaves_after: Duration,
    elapsed: Duration,
    power_w: u32,
}

struct Sim {
    p: Profile,
    /// Which of the endpoints to try next (wraps around).
    endpoint: usize,
    /// The endpoint of the live connection.
    connected_to: String,
    register_wh: Vec<u64>,
    sessions: Vec<Session>,
    queue: VecDeque<v1::ChargerMessage>,
    next_msg: u64,
    pending_jump: i64,
    overload_w: u32,
    faulted: Vec<bool>,
    /// The node's charging limit per connector.
    limits: Vec<Option<u32>>,
    ignore_limits: bool,
    throttle: Option<u32>,
    energy_scale: u32,
    firmware: String,
    firmware_fails: bool,
    /// An update in progress (one at a time).
    updating: bool,
    log: VecDeque<String>,
    idle_until: Vec<tokio::time::Instant>,
    status: SimStatus,
    /// The offline authorization list: hash -> accepted.
    local_list: std::collections::HashMap<String, bool>,
    list_key: Vec<u8>,
    list_version: u64,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Sim {
    fn note(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(format!("{} {line}", now_ms()));
    }

    fn msg(&mut self, payload: In) -> v1::ChargerMessage {
        self.next_msg += 1;
        v1::ChargerMessage {
            msg_id: self.next_msg,
            payload: Some(payload),
        }
    }

    fn queue_status(&mut self, connector: u32, status: v1::ConnectorStatus, code: &str) {
        self.note(format!("connector {connector} {} {code}", status.as_str_name()));
        let m = self.msg(In::Status(v1::StatusNotification {
            connector_id: connector,
            status: status as i32,
            error_code: code.into(),
            timestamp_ms: now_ms(),
        }));
        self.queue.push_back(m);
    }

    fn queue_event(&mut self, i: usize, kind: v1::TransactionEventType, power_w: u32, stop: &str, offline: bool) {
        let s = &mut self.sessions[i];
        let seq = s.seq;
        s.seq += 1;
        let (tx_id, connector, soc, token, car_max) =
            (s.tx_id.clone(), s.connector, s.soc, s.token.clone(), s.car_max_w);
        let wh = self.register_wh[(connector - 1) as usize];
        let limit = self.limits[(connector - 1) as usize];
        let m = self.msg(In::Transaction(v1::TransactionEvent {
            transaction_id: tx_id,
            seq,
            event_type: kind as i32,
            connector_id: connector,
            timestamp_ms: now_ms(),
            id_token: token,
            token_type: v1::TokenType::Rfid as i32,
            meter: Some(v1::MeterValue {
                energy_wh: wh,
                power_w,
                current_ma: power_w / 230 * 1000 / if self.p.kind == Kind::Ac { 3 } else { 1 },
                voltage_mv: if self.p.kind == Kind::Ac { 230_000 } else { 400_000 },
                soc_percent: Some(soc as u32),
                ev_max_power_w: Some(car_max),
                limit_w: limit,
            }),
            offline,
            stop_reason: stop.into(),
        }));
        self.queue.push_back(m);
    }

    /// Whether the offline list lets `token` start: a listed token must be
    /// accepted; an unlisted one may start (the node authorizes it after
    /// the fact).
    fn list_allows(&self, token: &str) -> bool {
        if self.list_key.is_empty() {
            return true;
        }
        let hash = hex::encode(laddnet_vault::hmac(&self.list_key, &[token.as_bytes()]));
        self.local_list.get(&hash).copied().unwrap_or(true)
    }

    fn apply_list(&mut self, u: &v1::LocalListUpdate) {
        if u.full {
            self.local_list.clear();
        }
        if !u.list_key.is_empty() {
            self.list_key = u.list_key.clone();
        }
        for e in &u.entries {
            if e.status == v1::AuthorizationStatus::Unspecified as i32 {
                self.local_list.remove(&e.hash);
            } else {
                self.local_list
                    .insert(e.hash.clone(), e.status == v1::AuthorizationStatus::Accepted as i32);
            }
        }
        self.list_version = u.version;
    }

    fn start_session(&mut self, connector: u32, offline: bool) {
        // A card already charging here stays with its car.
        let free: Vec<&String> = self
            .p
            .tokens
            .iter()
            .filter(|t| !self.sessions.iter().any(|s| &s.token == *t))
            .collect();
        let token = if self.p.tokens.is_empty() {
            String::new()
        } else if free.is_empty() {
            self.idle_until[(connector - 1) as usize] = tokio::time::Instant::now() + self.p.mean_idle;
            return;
        } else {
            free[rand::thread_rng().gen_range(0..free.len())].clone()
        };
        if !self.list_allows(&token) {
            // Refused at the charger: the driver goes elsewhere.
            self.idle_until[(connector - 1) as usize] = tokio::time::Instant::now() + self.p.mean_idle;
            return;
        }
        let mut rng = rand::thread_rng();
        let car_max_w = match self.p.kind {
            Kind::Ac => *[7_400u32, 11_000, 22_000].get(rng.gen_range(0..3)).unwrap_or(&11_000),
            Kind::Dc => rng.gen_range(50_000..=270_000),
        };
        let tx_id = format!("{}-{}-{:08x}", self.p.charger_id, connector, rng.r#gen::<u32>());
        self.queue_status(connector, v1::ConnectorStatus::Charging, "");
        self.sessions.push(Session {
            tx_id,
            token,
            connector,
            seq: 0,
            soc: rng.gen_range(10.0..50.0),
            target_soc: rng.gen_range(70.0..95.0),
            car_max_w,
            leaves_after: self
                .p
                .stay
                .unwrap_or_else(|| Duration::from_secs(rng.gen_range(30..180))),
            elapsed: Duration::ZERO,
            power_w: 0,
        });
        self.note(format!("connector {connector} session started"));
        let i = self.sessions.len() - 1;
        self.queue_event(i, v1::TransactionEventType::Started, 0, "", offline);
    }

    fn stop_session(&mut self, i: usize, reason: &str, offline: bool) {
        self.queue_event(i, v1::TransactionEventType::Ended, 0, reason, offline);
        let s = self.sessions.remove(i);
        self.note(format!("connector {} session ended: {reason}", s.connector));
        // A limit belongs to the session it was planned for.
        self.limits[(s.connector - 1) as usize] = None;
        self.queue_status(s.connector, v1::ConnectorStatus::Available, "");
        // Cars come more often at the commuter peaks (07–09, 16–19 UTC here)
        // and rarely at night.
        let hour = time::OffsetDateTime::now_utc().hour();
        let busy = match hour {
            7..=9 | 16..=19 => 0.5,
            0..=5 => 3.0,
            _ => 1.0,
        };
        let mean = (self.p.mean_idle.as_secs_f64() * busy).max(0.1);
        let wait = rand::thread_rng().gen_range(0.2 * mean..1.8 * mean);
        self.idle_until[(s.connector - 1) as usize] = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    }

    /// One sample period: energy flows, sessions end, cars arrive.
    fn tick(&mut self, offline: bool) {
        let dt = self.p.sample_every;
        let sim_s = dt.as_secs_f64() * f64::from(self.p.speed);
        let mut i = 0;
        while i < self.sessions.len() {
            let s = &mut self.sessions[i];
            s.elapsed += dt;
            let rated = self.p.max_power_w.min(s.car_max_w);
            // DC tapers above 50 % state of charge; AC is flat.
            let power = match self.p.kind {
                Kind::Ac => rated,
                Kind::Dc if s.soc < 50.0 => rated,
                Kind::Dc => (f64::from(rated) * (1.0 - (s.soc - 50.0) / 60.0)).max(5_000.0) as u32,
            };
            let c = (s.connector - 1) as usize;
            let mut power = power;
            if let Some(l) = self.limits[c]
                && !self.ignore_limits
            {
                power = power.min(l);
            }
            if let Some(t) = self.throttle {
                power = power.min(t);
            }
            s.power_w = power;
            let wh = (f64::from(power) * sim_s / 3600.0) as u64;
            self.register_wh[c] += wh * u64::from(self.energy_scale) / 100;
            if self.pending_jump != 0 {
                self.register_wh[c] = self.register_wh[c].saturating_add_signed(self.pending_jump);
                self.pending_jump = 0;
            }
            // A 60 kWh battery.
            s.soc = (s.soc + wh as f64 / 600.0).min(100.0);
            let done = s.soc >= s.target_soc;
            let left = s.elapsed >= s.leaves_after;
            let reported = if self.overload_w > 0 {
                self.p.max_power_w + self.overload_w
            } else {
                power
            };
            self.queue_event(i, v1::TransactionEventType::Updated, reported, "", offline);
            if done || left {
                self.stop_session(i, if done { "ev-full" } else { "ev-disconnected" }, offline);
            } else {
                i += 1;
            }
        }
        let now = tokio::time::Instant::now();
        for c in 1..=self.p.connectors {
            let idx = (c - 1) as usize;
            let busy = self.sessions.iter().any(|s| s.connector == c);
            if !busy && !self.faulted[idx] && now >= self.idle_until[idx] {
                self.start_session(c, offline);
            }
        }
        self.status.active_sessions = self.sessions.len() as u32;
        self.status.power_w = self.sessions.iter().map(|s| s.power_w).sum();
        self.status.sessions = self.sessions.iter().map(|s| (s.tx_id.clone(), s.power_w)).collect();
        self.status.queued = self.queue.len();
    }
}

/// Starts a simulated charger that runs until stopped.
pub fn spawn(ep: Endpoints, identity: Identity, profile: Profile) -> SimHandle {
    let (faults_tx, faults_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(SimStatus::default());
    let charger_id = profile.charger_id.clone();
    let task = tokio::spawn(run(ep, identity, profile, faults_rx, status_tx));
    SimHandle {
        charger_id,
        faults: faults_tx,
        status: status_rx,
        task,
    }
}

async fn run(
    ep: Endpoints,
    identity: Identity,
    p: Profile,
    mut faults: mpsc::Receiver<Fault>,
    status: watch::Sender<SimStatus>,
) {
    let n = p.connectors as usize;
    let start = tokio::time::Instant::now();
    let mut sim = Sim {
        register_wh: (0..n)
            .map(|_| rand::thread_rng().gen_range(100_000..5_000_000))
            .collect(),
        sessions: Vec::new(),
        queue: VecDeque::new(),
        next_msg: 0,
        pending_jump: 0,
        overload_w: 0,
        faulted: vec![false; n],
        limits: vec![None; n],
        ignore_limits: false,
        throttle: None,
        energy_scale: 100,
        firmware: "1.0.0".into(),
        firmware_fails: false,
        updating: false,
        log: VecDeque::new(),
        endpoint: 0,
        connected_to: String::new(),
        idle_until: (0..n)
            .map(|_| start + p.first_car_within.mul_f64(rand::thread_rng().gen_range(0.0..1.0)))
            .collect(),
        status: SimStatus::default(),
        local_list: Default::default(),
        list_key: Vec::new(),
        list_version: 0,
        p,
    };
    let tls = match laddnet_pki::tls::client_config(&ep.root_pem, Some((&identity.chain_pem, &identity.key_pem))) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(charger_id = %sim.p.charger_id, error = %e, "bad simulator identity");
            return;
        }
    };
    let mut backoff = Duration::from_millis(250);
    let mut silent_until = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(sim.p.sample_every);
    let (fw_tx, mut fw_rx) = mpsc::channel::<v1::FirmwareStatus>(8);
    loop {
        // Offline: keep charging and queueing until a connection works.
        if ep.mtls.is_empty() {
            tracing::error!(charger_id = %sim.p.charger_id, "no endpoint to connect to");
            return;
        }
        let endpoint = ep.mtls[sim.endpoint % ep.mtls.len()].clone();
        let attempt = connect_once(&endpoint, &ep, tls.clone(), &sim).await;
        let (out_tx, mut inbound) = match attempt {
            Ok(pair) => {
                backoff = Duration::from_millis(250);
                sim.connected_to = endpoint;
                pair
            }
            Err(e) => {
                tracing::debug!(charger_id = %sim.p.charger_id, endpoint = %endpoint, error = %e, "connect failed");
                let wait = match retry_after(&e) {
                    // The node said when: its previous node's lease lapses
                    // then. Come back to the same node, spread over a second.
                    Some(after) => after.min(MAX_RETRY_AFTER) + backoff.mul_f64(rand::thread_rng().gen_range(0.0..4.0)),
                    None => {
                        sim.endpoint += 1;
                        let jitter = rand::thread_rng().gen_range(0.5..1.5);
                        let wait = backoff.mul_f64(jitter);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        wait
                    }
                };
                let deadline = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < deadline {
                    tokio::select! {
                        _ = ticker.tick() => sim.tick(true),
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                continue;
            }
        };
        sim.status.connected = true;
        sim.status.firmware_version = sim.firmware.clone();
        sim.note("connected".into());
        let _ = status.send(sim.status.clone());
        // Replay what the node has not acknowledged, oldest first.
        let mut in_flight = 0usize;
        let mut sent_at = tokio::time::Instant::now();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
        let disconnected = loop {
            // One message in flight at a time: the node answers each.
            if in_flight == 0
                && tokio::time::Instant::now() >= silent_until
                && let Some(m) = sim.queue.front().cloned()
            {
                // Command replies get no answer: send and move on.
                let is_reply = matches!(m.payload, Some(In::CommandReply(_)));
                if is_reply {
                    sim.queue.pop_front();
                }
                if out_tx.send(m).await.is_err() {
                    break true;
                }
                if is_reply {
                    continue;
                }
                in_flight = 1;
                sent_at = tokio::time::Instant::now();
            }
            let ack_deadline = sent_at + ACK_TIMEOUT;
            tokio::select! {
                _ = tokio::time::sleep_until(ack_deadline), if in_flight > 0 => {
                    tracing::debug!(charger_id = %sim.p.charger_id, "no answer in time; the connection is taken for dead");
                    break true;
                }
                _ = ticker.tick() => {
                    if tokio::time::Instant::now() >= silent_until {
                        sim.tick(false);
                    }
                }
                _ = heartbeat.tick() => {
                    if sim.queue.is_empty() && tokio::time::Instant::now() >= silent_until {
                        let m = sim.msg(In::Heartbeat(v1::Heartbeat {}));
                        sim.queue.push_back(m);
                    }
                }
                f = faults.recv() => match f {
                    None => {}
                    Some(Fault::ErrorCode(c, code)) => {
                        if let Some(x) = sim.faulted.get_mut((c.max(1) - 1) as usize) { *x = true; }
                        if let Some(i) = sim.sessions.iter().position(|s| s.connector == c) { sim.stop_session(i, "charger-fault", false); }
                        sim.queue_status(c, v1::ConnectorStatus::Faulted, &code);
                    }
                    Some(Fault::ClearError(c)) => {
                        if let Some(x) = sim.faulted.get_mut((c.max(1) - 1) as usize) { *x = false; }
                        sim.queue_status(c, v1::ConnectorStatus::Available, "");
                    }
                    Some(Fault::MeterJump(wh)) => sim.pending_jump = wh as i64,
                    Some(Fault::MeterBackwards(wh)) => sim.pending_jump = -(wh as i64),
                    Some(Fault::Overload(w)) => sim.overload_w = w,
                    Some(Fault::Throttle(w)) => sim.throttle = w,
                    Some(Fault::EnergyScale(p)) => sim.energy_scale = p,
                    Some(Fault::IgnoreLimits(b)) => sim.ignore_limits = b,
                    Some(Fault::FirmwareFails(b)) => sim.firmware_fails = b,
                    Some(Fault::Silence(d)) => silent_until = tokio::time::Instant::now() + d,
                    Some(Fault::Disconnect) => break true,
                },
                Some(fs) = fw_rx.recv() => {
                    let installed = fs.state == v1::FirmwareState::Installed as i32;
                    let refused = fs.state == v1::FirmwareState::SignatureInvalid as i32;
                    let done = installed || refused
                        || fs.state == v1::FirmwareState::InstallFailed as i32
                        || fs.state == v1::FirmwareState::DownloadFailed as i32;
                    sim.note(format!("firmware {} {}: {}", fs.version, v1::FirmwareState::try_from(fs.state).map(|s| s.as_str_name()).unwrap_or("?"), fs.detail));
                    if refused {
                        sim.status.firmware_refused += 1;
                    }
                    if installed {
                        sim.firmware = fs.version.clone();
                        sim.status.firmware_version = fs.version.clone();
                    }
                    if done {
                        sim.updating = false;
                    }
                    let m = sim.msg(In::FirmwareStatus(fs));
                    sim.queue.push_back(m);
                }
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        match m.payload {
                            Some(Out::Command(cmd)) => {
                                let reply = handle_command(&mut sim, &cmd, &ep, &tls, &fw_tx);
                                let r = sim.msg(In::CommandReply(reply));
                                // Replies jump the queue (an operator is waiting),
                                // behind the message in flight, if any.
                                let at = in_flight.min(sim.queue.len());
                                sim.queue.insert(at, r);
                            }
                            Some(Out::Closing(_)) => break true,
                            Some(Out::LocalList(u)) if m.msg_id == 0 => sim.apply_list(&u),
                            Some(_) if m.msg_id != 0 => {
                                if sim.queue.front().is_some_and(|q| q.msg_id == m.msg_id) {
                                    if let Some(In::Transaction(t)) = sim.queue.pop_front().and_then(|q| q.payload)
                                        && matches!(m.payload, Some(Out::TransactionAck(_)))
                                    {
                                        let e = sim.status.acked_seq.entry(t.transaction_id).or_insert(0);
                                        *e = (*e).max(t.seq);
                                    }
                                    sim.status.acked += 1;
                                }
                                in_flight = 0;
                            }
                            _ => {}
                        }
                    }
                    _ => break true,
                },
            }
            sim.status.queued = sim.queue.len();
            let _ = status.send(sim.status.clone());
        };
        if disconnected {
            // The next attempt goes to the next node.
            sim.endpoint += 1;
            sim.status.connected = false;
            sim.status.reconnects += 1;
            let _ = status.send(sim.status.clone());
            // Everything still queued is replayed as offline events.
            for m in sim.queue.iter_mut() {
                if let Some(In::Transaction(t)) = &mut m.payload {
                    t.offline = true;
                }
            }
        }
    }
}

fn handle_command(
    sim: &mut Sim,
    cmd: &v1::Command,
    ep: &Endpoints,
    tls: &Arc<laddnet_client::ClientConfig>,
    fw: &mpsc::Sender<v1::FirmwareStatus>,
) -> v1::CommandReply {
    use v1::command::Kind as K;
    let accepted = |detail: &str| v1::CommandReply {
        command_id: cmd.command_id.clone(),
        status: v1::CommandStatus::Accepted as i32,
        detail: detail.into(),
    };
    let rejected = |detail: &str| v1::CommandReply {
        command_id: cmd.command_id.clone(),
        status: v1::CommandStatus::Rejected as i32,
        detail: detail.into(),
    };
    match &cmd.kind {
        Some(K::RemoteStart(s)) => {
            if s.connector_id == 0
                || s.connector_id > sim.p.connectors
                || sim.sessions.iter().any(|x| x.connector == s.connector_id)
            {
                return rejected("connector busy or unknown");
            }
            sim.start_session(s.connector_id, false);
            accepted("started")
        }
        Some(K::RemoteStop(s)) => match sim.sessions.iter().position(|x| x.tx_id == s.transaction_id) {
            Some(i) => {
                sim.stop_session(i, "remote", false);
                accepted("stopped")
            }
            None => rejected("no such transaction"),
        },
        Some(K::SetChargingLimit(l)) => match sim.limits.get_mut((l.connector_id.max(1) - 1) as usize) {
            Some(slot) if l.connector_id > 0 => {
                *slot = Some(l.limit_w);
                accepted("limit set")
            }
            _ => rejected("no such connector"),
        },
        Some(K::Reset(_)) | Some(K::UnlockConnector(_)) | Some(K::ChangeAvailability(_)) => accepted(""),
        Some(K::GetDiagnostics(_)) => {
            let mut bundle = format!(
                "laddnet-sim diagnostics\ncharger {}\nfirmware {}\nconnectors {}\nqueued {}\n--- log ---\n",
                sim.p.charger_id,
                sim.firmware,
                sim.p.connectors,
                sim.queue.len()
            );
            for l in &sim.log {
                bundle.push_str(l);
                bundle.push('\n');
            }
            let chunks: Vec<Vec<u8>> = bundle.as_bytes().chunks(16 * 1024).map(<[u8]>::to_vec).collect();
            let n = chunks.len();
            for (i, data) in chunks.into_iter().enumerate() {
                let m = sim.msg(In::Diagnostics(v1::DiagnosticsChunk {
                    command_id: cmd.command_id.clone(),
                    index: i as u32,
                    data,
                    last: i + 1 == n,
                    file_name: format!("{}-diagnostics.log", sim.p.charger_id),
                }));
                sim.queue.push_back(m);
            }
            accepted("uploading")
        }
        Some(K::UpdateFirmware(u)) => {
            if sim.updating {
                return rejected("an update is already in progress");
            }
            sim.updating = true;
            let (ep, tls, fw, u) = (ep.clone(), tls.clone(), fw.clone(), u.clone());
            let fails = sim.firmware_fails;
            // From the node the command came through.
            let from = sim.connected_to.clone();
            tokio::spawn(update_firmware(ep, from, tls, fw, u, fails));
            accepted("downloading")
        }
        None => rejected("empty command"),
    }
}

/// Downloads, verifies and "installs" an image, reporting each step.
async fn update_firmware(
    ep: Endpoints,
    from: String,
    tls: Arc<laddnet_client::ClientConfig>,
    fw: mpsc::Sender<v1::FirmwareStatus>,
    u: v1::UpdateFirmware,
    fails: bool,
) {
    let report = |state: v1::FirmwareState, detail: String| v1::FirmwareStatus {
        campaign_id: u.campaign_id.clone(),
        version: u.version.clone(),
        state: state as i32,
        detail,
    };
    let _ = fw.send(report(v1::FirmwareState::Downloading, String::new())).await;
    let image = async {
        let ch = laddnet_client::connect(&from, &ep.server_name, tls).await?;
        let mut s = v1::charger_service_client::ChargerServiceClient::new(ch)
            .download_firmware(v1::DownloadFirmwareRequest {
                version: u.version.clone(),
            })
            .await?
            .into_inner();
        let mut image = Vec::new();
        while let Some(c) = s.message().await? {
            image.extend_from_slice(&c.data);
            if image.len() as u64 > u.size.max(1) * 2 {
                anyhow::bail!("the image is larger than announced");
            }
        }
        Ok::<_, anyhow::Error>(image)
    }
    .await;
    let image = match image {
        Ok(i) => i,
        Err(e) => {
            let _ = fw.send(report(v1::FirmwareState::DownloadFailed, e.to_string())).await;
            return;
        }
    };
    let _ = fw.send(report(v1::FirmwareState::Downloaded, String::new())).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Err(e) = laddnet_pki::firmware::verify_firmware(
        &ep.root_pem,
        &u.signer_chain_pem,
        &u.version,
        &image,
        &u.sha256,
        &u.signature,
        now,
    ) {
        let _ = fw
            .send(report(v1::FirmwareState::SignatureInvalid, e.to_string()))
            .await;
        return;
    }
    let _ = fw.send(report(v1::FirmwareState::Installing, String::new())).await;
    if fails {
        let _ = fw
            .send(report(v1::FirmwareState::InstallFailed, "flash write failed".into()))
            .await;
        return;
    }
    let _ = fw.send(report(v1::FirmwareState::Installed, String::new())).await;
}

type Inbound = tonic::Streaming<v1::CentralMessage>;

async fn connect_once(
    endpoint: &str,
    ep: &Endpoints,
    tls: Arc<laddnet_client::ClientConfig>,
    sim: &Sim,
) -> anyhow::Result<(mpsc::Sender<v1::ChargerMessage>, Inbound)> {
    let ch = laddnet_client::connect(endpoint, &ep.server_name, tls).await?;
    let (tx, rx) = mpsc::channel(64);
    let boot = v1::ChargerMessage {
        msg_id: 0,
        payload: Some(In::Boot(v1::Boot {
            charger_id: sim.p.charger_id.clone(),
            vendor: "laddnet-sim".into(),
            model: match sim.p.kind {
                Kind::Ac => "AC-22".into(),
                Kind::Dc => format!("DC-{}", sim.p.max_power_w / 1000),
            },
            firmware_version: sim.firmware.clone(),
            connectors: (1..=sim.p.connectors)
                .map(|c| v1::Connector {
                    connector_id: c,
                    r#type: match sim.p.kind {
                        Kind::Ac => v1::ConnectorType::Ac,
                        Kind::Dc => v1::ConnectorType::Dc,
                    } as i32,
                    max_power_w: sim.p.max_power_w,
                })
                .collect(),
            local_list_version: sim.list_version,
        })),
    };
    tx.send(boot).await?;
    let mut inbound = v1::charger_service_client::ChargerServiceClient::new(ch)
        .attach(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(v1::CentralMessage {
            payload: Some(Out::BootAccepted(_)),
            ..
        }) => Ok((tx, inbound)),
        other => anyhow::bail!("boot not accepted: {other:?}"),
    }
}

/// Where a fleet keeps its enrolled identities.
pub fn identity_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("sim")
}
