//! What every handler shares: the CA, the store, the live chargers, the
//! revoked serials and the mutual-TLS configuration that carries the CRL.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use laddnet_actors::{ChargerHandle, SupervisorHandle};
use laddnet_core::ChargerId;
use laddnet_pki::Ca;
use laddnet_proto::v1;
use laddnet_store::SharedStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::NodeConfig;
use crate::transport::{ConnRegistry, SharedTlsConfig};

pub struct NodeState {
    pub config: NodeConfig,
    pub ca: Arc<Ca>,
    pub store: SharedStore,
    pub chargers: ChargerRegistry,
    pub revoked: Arc<RwLock<HashSet<String>>>,
    pub conns: Arc<ConnRegistry>,
    pub mtls: SharedTlsConfig,
    pub actors: SupervisorHandle,
    pub metrics: Metrics,
    pub hub: crate::drivers::DriverHub,
    /// The fault-detection actor (set once at start).
    pub alarm_actor: std::sync::OnceLock<ractor::ActorRef<crate::alarms::AlarmMsg>>,
    /// Operators waiting for a diagnostics bundle, by request id.
    pub diag_waiters:
        Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<crate::diagnostics::Bundle>>>,
    /// The firmware-signing key, loaded (or issued) at the first upload.
    pub firmware_signer: tokio::sync::Mutex<Option<Arc<laddnet_pki::firmware::FirmwareSigner>>>,
    /// Site load management: one actor per site with a grid limit.
    pub load: crate::load::LoadManager,
    /// Membership and node-to-node routing.
    pub cluster: crate::cluster::Cluster,
    /// gRPC latency per method, for the metrics endpoint.
    pub rpc: Arc<crate::metrics::RpcStats>,
    /// Cancelled when the node shuts down: long-lived streams end with it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The TLS session-ticket keys, when `tls.session_tickets` is on (set
    /// once at start).
    pub tickets: std::sync::OnceLock<TicketSync>,
    pub(crate) node_chain: Vec<CertificateDer<'static>>,
    pub(crate) node_key: PrivateKeyDer<'static>,
    crl_number: AtomicU64,
}

/// Runs `f`, a small store read: here, where the store's reads are local
/// (`Store::local_reads`: a blocking-pool hand-off costs more than the
/// read), else on the blocking pool.
pub async fn store_read<T: Send + 'static>(
    local: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if local {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

/// The TLS session-ticket keys and the key-encryption key that opens them.
pub struct TicketSync {
    pub keys: Arc<laddnet_pki::tickets::TicketKeys>,
    pub source: laddnet_vault::KeySource,
}

impl NodeState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: NodeConfig,
        ca: Arc<Ca>,
        store: SharedStore,
        mtls: SharedTlsConfig,
        actors: SupervisorHandle,
        node_chain: Vec<CertificateDer<'static>>,
        node_key: PrivateKeyDer<'static>,
        revoked: HashSet<String>,
        crl_number: u64,
        hub: crate::drivers::DriverHub,
    ) -> Self {
        Self {
            config,
            ca,
            store,
            chargers: ChargerRegistry::default(),
            revoked: Arc::new(RwLock::new(revoked)),
            conns: Arc::new(ConnRegistry::default()),
            mtls,
            actors,
            metrics: Metrics::default(),
            hub,
            alarm_actor: Default::default(),
            load: Default::default(),
            cluster: Default::default(),
            diag_waiters: Default::default(),
            firmware_signer: Default::default(),
            rpc: Default::default(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            tickets: Default::default(),
            node_chain,
            node_key,
            crl_number: AtomicU64::new(crl_number),
        }
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }

    /// Re-reads the CRL and the revoked serials from the store. When they
    /// changed: new handshakes get the new CRL, and live connections of
    /// newly revoked certificates are closed.
    pub async fn apply_revocations(&self) {
        let ca = self.ca.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            Ok::<_, laddnet_pki::PkiError>((ca.crl_record()?, ca.revoked_serials()?))
        })
        .await;
        let (crl, serials) = match loaded {
            Ok(Ok((Some(crl), serials))) => (crl, serials),
            Ok(Ok((None, _))) => return,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read revocations; keeping the last good CRL");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation reload task failed");
                return;
            }
        };
        let fresh: Vec<String> = {
            let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
            serials.into_iter().filter(|s| set.insert(s.clone())).collect()
        };
        for serial in &fresh {
            let n = self.conns.close_serial(serial);
            tracing::info!(serial = %serial, connections = n, "revoked certificate disconnected");
        }
        if self.crl_number.load(Ordering::Acquire) != crl.number {
            match self.rebuild_mtls(&crl.pem) {
                Ok(()) => {
                    self.crl_number.store(crl.number, Ordering::Release);
                    tracing::info!(crl_number = crl.number, "CRL applied");
                }
                // A CRL that does not parse must not take the node down:
                // keep serving with the last good one.
                Err(e) => {
                    tracing::error!(error = %e, crl_number = crl.number, "CRL refused; keeping the last good one")
                }
            }
        }
    }

    fn rebuild_mtls(&self, crl_pem: &str) -> Result<(), laddnet_pki::PkiError> {
        let crl = laddnet_pki::tls::crl_from_pem(crl_pem)?;
        laddnet_pki::summarize_crl(crl_pem.as_bytes())?;
        let cfg = laddnet_pki::tls::mtls_server_config(
            self.ca.root_pem(),
            crl,
            self.node_chain.clone(),
            self.node_key.clone_key(),
            self.tickets.get().map(|t| t.keys.clone()),
        )?;
        *self.mtls.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(())
    }

    /// Follows the ticket keys in the store: a rotation made by another
    /// node is picked up, and this node rotates when the newest key is due.
    pub async fn sync_tickets(&self) {
        let Some(t) = self.tickets.get() else { return };
        let (keys, source, store, ca) = (t.keys.clone(), t.source.clone(), self.store.clone(), self.ca.clone());
        let synced =
            tokio::task::spawn_blocking(move || keys.sync(store.as_ref(), &source, ca.now().saturating_mul(1000)))
                .await;
        match synced {
            Ok(Ok(r)) if r.rotated => tracing::info!(keys = r.ids.len(), "TLS ticket key rotated"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "TLS ticket keys not synced; keeping the ones held"),
            Err(e) => tracing::error!(error = %e, "TLS ticket key task failed"),
        }
    }

    /// The actor tree's settings, billing included.
    pub fn actor_config(&self) -> laddnet_actors::ActorConfig {
        self.config.sessions.actor_config_with(&self.config.billing)
    }

    pub fn crl_number(&self) -> u64 {
        self.crl_number.load(Ordering::Acquire)
    }
}

/// Counters a test or the live summary reads (Prometheus comes later).
#[derive(Default)]
pub struct Metrics {
    /// Times a charger's stream was read more slowly because it sent faster
    /// than `sessions.max_messages_per_second`.
    pub charger_backpressure: AtomicU64,
    /// Operator commands refused because a charger had too many pending.
    pub commands_shed: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub events_rejected: AtomicU64,
    /// Events stored as part of a run (meter updates that had arrived
    /// together, stored in one transaction).
    pub events_in_runs: AtomicU64,
}

/// A live charger's outbound side: the stream to it and its pending commands.
pub struct Outbound {
    /// Boxed replies: a channel allocates its first block of 32 slots when
    /// created, and every idle charger holds one, so 32 pointers rather
    /// than 32 messages of 184 bytes.
    pub tx: tokio::sync::mpsc::Sender<Box<Result<v1::CentralMessage, tonic::Status>>>,
    pub pending: Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<v1::CommandReply>>>,
    /// The offline-list version the charger holds (as far as we sent it).
    pub list_version: AtomicU64,
    /// Diagnostics uploads the node asked this charger for.
    pub uploads: crate::diagnostics::Uploads,
}

impl Outbound {
    /// Sends a command (its reply, if any, is matched by `command_id`);
    /// false when the charger's stream is gone.
    pub async fn send_command(&self, command: v1::Command) -> bool {
        let msg = v1::CentralMessage {
            msg_id: 0,
            payload: Some(v1::central_message::Payload::Command(command)),
        };
        self.tx.send(Box::new(Ok(msg))).await.is_ok()
    }
}

struct Attached {
    conn: u64,
    handle: Option<ChargerHandle>,
    outbound: Option<Arc<Outbound>>,
    serial: String,
    since: i64,
    last_heartbeat: i64,
}

/// Another live stream holds the charger id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyAttached;

/// The chargers attached to this node: one live stream per charger id.
#[derive(Default)]
pub struct ChargerRegistry {
    next: AtomicU64,
    live: Mutex<BTreeMap<String, Attached>>,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl ChargerRegistry {
    /// Registers a stream; refused while another live one holds the id, so
    /// a second connection can never evict the first.
    pub fn attach(&self, id: &ChargerId, serial: &str) -> Result<u64, AlreadyAttached> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.contains_key(id.as_str()) {
            return Err(AlreadyAttached);
        }
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let t = now();
        live.insert(
            id.to_string(),
            Attached {
                conn,
                handle: None,
                outbound: None,
                serial: serial.into(),
                since: t,
                last_heartbeat: t,
            },
        );
        Ok(conn)
    }

    /// Completes an attachment with the charger's actor and outbound side.
    pub fn bind(&self, id: &ChargerId, conn: u64, handle: ChargerHandle, outbound: Arc<Outbound>) {
        if let Some(a) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id.as_str())
            && a.conn == conn
        {
            a.handle = Some(handle);
            a.outbound = Some(outbound);
        }
    }

    pub fn handle(&self, id: &str) -> Option<ChargerHandle> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|a| a.handle.clone())
    }

    pub fn outbound(&self, id: &str) -> Option<Arc<Outbound>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|a| a.outbound.clone())
    }

    /// Connection details of a live charger: (since, last heartbeat, serial).
    pub fn connection(&self, id: &str) -> Option<(i64, i64, String)> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|a| (a.since, a.last_heartbeat, a.serial.clone()))
    }

    pub fn heartbeat(&self, id: &ChargerId, conn: u64) {
        if let Some(a) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get_mut(id.as_str())
            && a.conn == conn
        {
            a.last_heartbeat = now();
        }
    }

    pub fn detach(&self, id: &ChargerId, conn: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(id.as_str()).is_some_and(|a| a.conn == conn) {
            live.remove(id.as_str());
        }
    }

    /// Every live charger's outbound side.
    pub fn all_outbound(&self) -> Vec<(String, Arc<Outbound>)> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(id, a)| a.outbound.clone().map(|o| (id.clone(), o)))
            .collect()
    }

    /// Closes every charger connection (this node lost its membership).
    pub fn close_all(&self, conns: &crate::transport::ConnRegistry) -> usize {
        let serials: Vec<String> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|a| a.serial.clone())
            .collect();
        serials.iter().map(|s| conns.close_serial(s)).sum()
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
