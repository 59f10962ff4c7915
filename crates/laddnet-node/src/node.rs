//! Starting and stopping a node: the store, the CA, the node's own
//! certificate, both listeners and the revocation poller.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use laddnet_pki::{Ca, CaFiles, Clock, Policy, Subject};
use laddnet_proto::v1::billing_service_server::BillingServiceServer;
use laddnet_proto::v1::charger_service_server::ChargerServiceServer;
use laddnet_proto::v1::driver_admin_service_server::DriverAdminServiceServer;
use laddnet_proto::v1::driver_service_server::DriverServiceServer;
use laddnet_proto::v1::enrollment_service_server::EnrollmentServiceServer;
use laddnet_proto::v1::fleet_service_server::FleetServiceServer;
use laddnet_proto::v1::incident_service_server::IncidentServiceServer;
use laddnet_proto::v1::operator_service_server::OperatorServiceServer;
use laddnet_proto::v1::pki_service_server::PkiServiceServer;
use laddnet_store::{RedbStore, SharedStore};
use laddnet_vault::KeySource;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{NodeConfig, StoreBackend};
use crate::identity::CaIdentityCheck;
use crate::services::billing::Billing;
use crate::services::drivers::{DriverAdmin, DriverApp};
use crate::services::{
    charger::Charger, enrollment::Enrollment, enrollment::RateLimiter, operator::Operator, pki::Pki,
};
use crate::state::NodeState;
use crate::transport::{AcceptorSettings, accept_loop};

/// Where the key-encryption key comes from: `LADDNET_CA_PASSPHRASE` when
/// set, else the key file.
pub fn key_source(config: &NodeConfig) -> KeySource {
    match std::env::var("LADDNET_CA_PASSPHRASE") {
        Ok(p) if !p.is_empty() => KeySource::Passphrase(laddnet_vault::Secret::new(p)),
        _ => KeySource::KeyFile(config.key_file()),
    }
}

pub fn load_policy(config: &NodeConfig) -> anyhow::Result<Policy> {
    Ok(match &config.ca.policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default(),
    })
}

pub fn open_store(config: &NodeConfig) -> anyhow::Result<SharedStore> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let s = &config.store;
    match s.backend {
        StoreBackend::Embedded => {
            let store = RedbStore::open(config.store_path())
                .with_context(|| format!("opening {}", config.store_path().display()))?;
            Ok(Arc::new(store))
        }
        StoreBackend::Shared => {
            let read = |p: &Option<std::path::PathBuf>, what: &str| -> anyhow::Result<String> {
                let p = p.as_ref().with_context(|| format!("store.{what} is not set"))?;
                std::fs::read_to_string(p).with_context(|| format!("reading store.{what} {}", p.display()))
            };
            let root_path = config.ca_dir().join("root.crt");
            let root = std::fs::read_to_string(&root_path)
                .with_context(|| format!("reading the CA root {}", root_path.display()))?;
            let server_name = if s.server_name.is_empty() {
                "localhost"
            } else {
                &s.server_name
            };
            let client = crate::shared_store::SharedStoreClient::connect(
                &s.endpoint,
                server_name,
                &root,
                &read(&s.cert, "cert")?,
                &read(&s.key, "key")?,
            )
            .with_context(|| format!("connecting to the shared store at {}", s.endpoint))?;
            Ok(Arc::new(client))
        }
        #[cfg(feature = "fdb")]
        StoreBackend::Foundationdb => {
            let file = s.cluster_file.as_ref().map(|p| p.display().to_string());
            let store = laddnet_store::FdbStore::open_in(file.as_deref(), s.key_prefix.as_bytes())
                .context("opening FoundationDB")?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "fdb"))]
        StoreBackend::Foundationdb => anyhow::bail!(
            "store.backend = \"foundationdb\" needs a laddnet built with `--features fdb` (and libfdb_c installed)"
        ),
    }
}

/// A node that is serving.
pub struct RunningNode {
    pub mtls_addr: SocketAddr,
    pub enrollment_addr: SocketAddr,
    /// Where `GET /metrics` answers, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<NodeState>,
    shutdown: CancellationToken,
    health: HealthReporter,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Starts a node from its config, on the wall clock.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Self> {
        Self::start_with(config, laddnet_pki::system_clock()).await
    }

    /// Starts a node whose CA reads time from `clock` (tests move it).
    pub async fn start_with(config: NodeConfig, clock: Clock) -> anyhow::Result<Self> {
        config.validate()?;
        let policy = load_policy(&config)?;
        let store = open_store(&config)?;
        let files = CaFiles::new(config.ca_dir());
        if !files.exists() {
            anyhow::bail!(
                "no CA in {}: run `laddctl pki init --data-dir {}` (or `laddnet up`) first",
                files.dir.display(),
                config.data_dir.display()
            );
        }
        let source = key_source(&config);
        let tickets = config.tls.session_tickets.then(laddnet_pki::tickets::TicketKeys::new);
        let (ca, node_cert, node_key) = {
            let (config, store, source, tickets) = (config.clone(), store.clone(), source.clone(), tickets.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let ca = Ca::open(&files, policy, &source, store.clone(), clock).context("opening the CA")?;
                // A store from before the session indices: index it before
                // any listing reads them (once; a start cut short redoes it).
                match laddnet_actors::repo::index_sessions_once(store.as_ref())
                    .context("indexing the stored sessions")?
                {
                    Some(i) if i.unreadable > 0 => tracing::warn!(
                        sessions = i.sessions,
                        unreadable = i.unreadable,
                        "sessions indexed by charger and site; records that do not decode were left out"
                    ),
                    Some(i) if i.sessions > 0 => {
                        tracing::info!(sessions = i.sessions, "sessions indexed by charger and site")
                    }
                    _ => {}
                }
                // Metrics only: a store it cannot count still serves.
                match laddnet_actors::repo::count_energy_once(store.as_ref()) {
                    Ok(Some(sessions @ 1..)) => {
                        tracing::info!(sessions, "energy counter started from the sessions in the store")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        error = %e,
                        "could not count the stored sessions' energy; the counter starts from the next reading"
                    ),
                }
                // Metrics only too: until it is done, a scrape counts the
                // active incidents from every incident, as before.
                match laddnet_incidents::index_active_once(store.as_ref()) {
                    Ok(n @ 1..) => tracing::info!(incidents = n, "active incidents indexed"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not index the active incidents; counted from every incident meanwhile"),
                }
                let subject = Subject::Node {
                    name: config.node.name.clone(),
                    sans: config.tls.server_names.clone(),
                };
                // The node mints its own server certificate at every start:
                // its key lives only in memory.
                let (issued, key) = ca
                    .issue_with_new_key(&subject, "system")
                    .context("issuing the node certificate")?;
                if let Some(t) = &tickets {
                    t.sync(store.as_ref(), &source, ca.now().saturating_mul(1000))
                        .context("loading the TLS ticket keys")?;
                }
                Ok((Arc::new(ca), issued, key))
            })
            .await??
        };
        let chain = laddnet_pki::tls::certs_from_pem(&node_cert.chain_pem)?;
        let key = laddnet_pki::tls::key_from_pem(&node_key)?;
        let node_client_tls = laddnet_pki::tls::client_config(ca.root_pem(), Some((&node_cert.chain_pem, &node_key)))?;
        let (crl, revoked) = {
            let ca = ca.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let crl = ca.crl_record()?.context("the CA has no CRL")?;
                Ok((crl, ca.revoked_serials()?))
            })
            .await??
        };
        let mtls_cfg = laddnet_pki::tls::mtls_server_config(
            ca.root_pem(),
            laddnet_pki::tls::crl_from_pem(&crl.pem)?,
            chain.clone(),
            key.clone_key(),
            tickets.clone(),
        )?;
        let enroll_cfg = laddnet_pki::tls::server_only_config(chain.clone(), key.clone_key())?;
        let mtls_shared = Arc::new(RwLock::new(mtls_cfg));
        let actors = laddnet_actors::SupervisorHandle::start(config.sessions.actor_config_with(&config.billing))
            .await
            .map_err(|e| anyhow::anyhow!("starting the actor tree: {e}"))?;
        let hub = {
            let (config, store) = (config.clone(), store.clone());
            tokio::task::spawn_blocking(move || crate::drivers::open_hub(&config, store))
                .await?
                .context("opening the vault (master keys)")?
        };
        let state = Arc::new(NodeState::new(
            config.clone(),
            ca.clone(),
            store,
            mtls_shared.clone(),
            actors,
            chain,
            key,
            revoked.into_iter().collect::<HashSet<_>>(),
            crl.number,
            hub,
        ));

        if let Some(keys) = tickets {
            let _ = state.tickets.set(crate::state::TicketSync { keys, source });
        }
        let alarm_actor = crate::alarms::start(&state).await?;
        let _ = state.alarm_actor.set(alarm_actor);
        tokio::spawn(crate::firmware::resume(state.clone()));

        let mtls_listener = TcpListener::bind(config.listen.mtls)
            .await
            .with_context(|| format!("binding the mutual-TLS listener on {}", config.listen.mtls))?;
        let enroll_listener = TcpListener::bind(config.listen.enrollment)
            .await
            .with_context(|| format!("binding the enrollment listener on {}", config.listen.enrollment))?;
        let metrics_listener = match config.listen.metrics_addr() {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the metrics listener on {a} (listen.metrics)"))?,
            ),
            None => None,
        };
        let metrics_addr = match &metrics_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let mtls_addr = mtls_listener.local_addr()?;
        let enrollment_addr = enroll_listener.local_addr()?;
        let _ = state.cluster.client_tls.set(node_client_tls);
        let advertise = if config.cluster.advertise.is_empty() {
            mtls_addr.to_string()
        } else {
            config.cluster.advertise.clone()
        };
        crate::cluster::join(&state, advertise)
            .await
            .context("joining the cluster")?;

        let shutdown = state.shutdown.clone();
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in [
            "",
            "laddnet.v1.ChargerService",
            "laddnet.v1.PkiService",
            "laddnet.v1.OperatorService",
            "laddnet.v1.DriverAdminService",
            "laddnet.v1.DriverService",
            "laddnet.v1.IncidentService",
            "laddnet.v1.FleetService",
            "laddnet.v1.ClusterService",
            "laddnet.v1.EnrollmentService",
        ] {
            health.set_service_status(name, ServingStatus::Serving).await;
        }
        // Both reflection versions: grpcurl and older tools still ask v1alpha.
        let reflection_builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(laddnet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection = reflection_builder().build_v1()?;
        let reflection_alpha = reflection_builder().build_v1alpha()?;

        let g = &config.grpc;
        let limit = g.max_message_bytes;
        let server = || {
            let mut s = Server::builder()
                .max_concurrent_streams(g.max_concurrent_streams)
                .http2_max_header_list_size(g.max_header_list_bytes)
                .http2_keepalive_interval(Some(Duration::from_secs(g.keepalive_interval_s)))
                .http2_keepalive_timeout(Some(Duration::from_secs(g.keepalive_timeout_s)));
            if g.max_connection_age_s > 0 {
                s = s.max_connection_age(Duration::from_secs(g.max_connection_age_s));
            }
            s
        };

        let identity_check = Arc::new(CaIdentityCheck::new(ca.clone(), state.revoked.clone()));
        let mtls_incoming = accept_loop(
            mtls_listener,
            AcceptorSettings {
                tls: mtls_shared,
                handshake_timeout: config.handshake_timeout(),
                max_pending: config.tls.max_pending_handshakes,
                identity_check: Some(identity_check),
                registry: state.conns.clone(),
            },
            shutdown.clone(),
        );
        let enroll_incoming = accept_loop(
            enroll_listener,
            AcceptorSettings {
                tls: Arc::new(RwLock::new(enroll_cfg)),
                handshake_timeout: config.handshake_timeout(),
                max_pending: config.tls.max_pending_handshakes,
                identity_check: None,
                registry: state.conns.clone(),
            },
            shutdown.clone(),
        );

        let mtls_router = server()
            .layer(crate::metrics::RpcTimer(state.rpc.clone()))
            .add_service(health_service.clone())
            .add_service(reflection.clone())
            .add_service(reflection_alpha.clone())
            .add_service(
                ChargerServiceServer::new(Charger { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                PkiServiceServer::new(Pki { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                OperatorServiceServer::new(Operator { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                BillingServiceServer::new(Billing { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                DriverAdminServiceServer::new(DriverAdmin { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                DriverServiceServer::new(DriverApp { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                IncidentServiceServer::new(crate::services::incidents::Incidents { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                FleetServiceServer::new(crate::services::fleet::Fleet { state: state.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit.max(crate::diagnostics::MAX_BUNDLE + 4096)),
            )
            .add_service(
                laddnet_proto::v1::cluster_service_server::ClusterServiceServer::new(
                    crate::services::cluster::ClusterNode { state: state.clone() },
                )
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            );
        let e = &ca.policy().enrollment;
        let enroll_router = server()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(
                EnrollmentServiceServer::new(Enrollment {
                    state: state.clone(),
                    limiter: RateLimiter::new(e.per_minute, e.burst),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            );

        let mut tasks = Vec::new();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let r = mtls_router
                .serve_with_incoming_shutdown(ReceiverStream::new(mtls_incoming), stop.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "mutual-TLS server stopped");
            }
        }));
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let r = enroll_router
                .serve_with_incoming_shutdown(ReceiverStream::new(enroll_incoming), stop.cancelled_owned())
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "enrollment server stopped");
            }
        }));
        if config.store.backend == StoreBackend::Embedded {
            tasks.push(tokio::spawn(interrupt_left_active(state.clone())));
        }
        tasks.push(tokio::spawn(revocation_poller(state.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(crate::cluster::heartbeat(state.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(interruption_sweeper(state.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(billing_sweeper(state.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(crate::drivers::notification_pump(
            state.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::drivers::webhook_worker(
            state.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::drivers::retention_sweeper(
            state.clone(),
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::alarms::certificate_watch(
            state.clone(),
            shutdown.clone(),
        )));
        if let Some(l) = metrics_listener {
            tasks.push(tokio::spawn(crate::metrics::serve(l, state.clone(), shutdown.clone())));
        }
        tasks.push(tokio::spawn(crate::drivers::vault_rewrapper(
            state.clone(),
            shutdown.clone(),
        )));

        tracing::info!(mtls = %mtls_addr, enrollment = %enrollment_addr, store = state.store.backend(), "node serving");
        Ok(Self {
            mtls_addr,
            enrollment_addr,
            metrics_addr,
            state,
            shutdown,
            health,
            tasks,
        })
    }

    /// Graceful shutdown: health flips to NOT_SERVING, listeners stop
    /// accepting, in-flight requests drain.
    pub async fn shutdown(self) {
        for name in [
            "",
            "laddnet.v1.ChargerService",
            "laddnet.v1.PkiService",
            "laddnet.v1.OperatorService",
            "laddnet.v1.DriverAdminService",
            "laddnet.v1.DriverService",
            "laddnet.v1.IncidentService",
            "laddnet.v1.FleetService",
            "laddnet.v1.ClusterService",
            "laddnet.v1.EnrollmentService",
        ] {
            self.health.set_service_status(name, ServingStatus::NotServing).await;
        }
        self.shutdown.cancel();
        self.state.actors.stop();
        self.state.load.stop_all();
        if let Some(a) = self.state.alarm_actor.get() {
            a.stop(None);
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        crate::cluster::leave(&self.state).await;
        // Streams, actors, connection tasks and the CRL watch thread hold
        // the store; wait for them to let go, then drop the last handle
        // here, so the store is closed (its file lock released) when this
        // returns. Waiting for the count to reach zero instead would race
        // with the close still running on whichever thread let go last.
        let store = self.state.store.clone();
        drop(self.state);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&store) > 1 {
            tracing::warn!(
                holders = Arc::strong_count(&store) - 1,
                "tasks still hold the store after shutdown"
            );
        }
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
        tracing::info!("node stopped");
    }
}

/// Applies revocations made anywhere (another node, another process) as
/// soon as they commit, by watching the CRL's key, and re-signs the CRL
/// when half its validity has passed. `tls.crl_poll_ms` is the safety net:
/// revocations are re-read that often even if no watch fired.
async fn revocation_poller(state: Arc<NodeState>, shutdown: CancellationToken) {
    let every = Duration::from_millis(state.config.tls.crl_poll_ms);
    let changed = Arc::new(tokio::sync::Notify::new());
    if let Err(e) = crate::follow::follow_key(
        state.store.clone(),
        laddnet_pki::crl_key(),
        "crl",
        changed.clone(),
        shutdown.clone(),
    ) {
        tracing::error!(error = %e, "cannot start the CRL watch; revocations from elsewhere wait for the poll");
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let ticked = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => true,
            _ = changed.notified() => false,
        };
        if ticked {
            let ca = state.ca.clone();
            let refreshed = tokio::task::spawn_blocking(move || -> Result<bool, laddnet_pki::PkiError> {
                let Some(crl) = ca.crl_record()? else { return Ok(false) };
                if ca.now() >= crl.this_update + (crl.next_update - crl.this_update) / 2 {
                    ca.refresh_crl("system")?;
                    return Ok(true);
                }
                Ok(false)
            })
            .await;
            if let Ok(Err(e)) = refreshed {
                tracing::error!(error = %e, "CRL refresh failed");
            }
            state.sync_tickets().await;
        }
        state.apply_revocations().await;
    }
}

/// A previous run may have stopped uncleanly and left sessions active:
/// each is interrupted until its charger comes back. Run beside accepting
/// (100,000 open sessions take about a second to rewrite); chargers that
/// are already back are left alone.
async fn interrupt_left_active(state: Arc<NodeState>) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let st = state.clone();
    // A thread of its own at background priority: the chargers coming back
    // (and the node's own start) go first.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("left-active".into()).spawn(move || {
        laddnet_store::background_priority();
        let _ = tx.send(laddnet_actors::repo::interrupt_all_active(
            st.store.as_ref(),
            now,
            &|c| st.chargers.connection(c).is_some(),
        ));
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the thread interrupting the sessions left active");
        return;
    }
    match rx.await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(
            sessions = n,
            "sessions left active by the previous run are interrupted until their chargers return"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "interrupting the sessions left active failed"),
        Err(_) => tracing::error!("interrupting the sessions left active panicked"),
    }
}

/// Closes sessions whose charger has not come back within
/// `sessions.interrupted_timeout_s`.
async fn interruption_sweeper(state: Arc<NodeState>, shutdown: CancellationToken) {
    let timeout = state.config.sessions.interrupted_timeout_s as i64;
    let every = Duration::from_millis((timeout as u64 * 1000 / 4).clamp(100, 5_000));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let store = state.store.clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match tokio::task::spawn_blocking(move || laddnet_actors::repo::close_interrupted(store.as_ref(), timeout, now))
            .await
        {
            Ok(Ok(closed)) => {
                for id in closed {
                    tracing::info!(transaction_id = %id, "interrupted session closed after the timeout");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "closing interrupted sessions failed"),
            Err(_) => {}
        }
    }
}

/// Bills ended sessions that have no CDR yet: those a crash caught between
/// the end and billing, and interrupted sessions the sweeper closed. Runs
/// at start, then every `billing.sweep_interval_ms`.
async fn billing_sweeper(state: Arc<NodeState>, shutdown: CancellationToken) {
    let every = Duration::from_millis(state.config.billing.sweep_interval_ms);
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        first = false;
        let store = state.store.clone();
        let currency = state.config.billing.default_currency.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<usize, laddnet_ledger::LedgerError> {
            let ids = laddnet_ledger::cdr::unbilled(store.as_ref())?;
            let defaults = laddnet_ledger::cdr::BillingDefaults { currency };
            let mut billed = 0;
            for id in &ids {
                // One session that cannot be billed must not hold up the
                // others: it is logged and tried again next pass.
                match laddnet_ledger::cdr::bill_session(store.as_ref(), id, &defaults) {
                    Ok(_) => billed += 1,
                    Err(e) => tracing::error!(transaction_id = %id, error = %e, "billing an ended session failed"),
                }
            }
            Ok(billed)
        })
        .await;
        match r {
            Ok(Ok(n)) if n > 0 => tracing::info!(sessions = n, "billed sessions that ended without a CDR"),
            Ok(Err(e)) => tracing::error!(error = %e, "billing sweep failed"),
            _ => {}
        }
    }
}
