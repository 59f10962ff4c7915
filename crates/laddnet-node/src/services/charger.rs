//! `ChargerService`: the chargers' stream and certificate renewal. A
//! charger may speak only for the charger id in its own certificate.
//!
//! The stream is read one message at a time: each is handled by the
//! charger's actor and answered before the next is read, so a charger can
//! never have more than one message in flight, and one that sends faster
//! than `sessions.max_messages_per_second` is read more slowly
//! (backpressure through HTTP/2 flow control; nothing is dropped).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream};
use laddnet_actors::charger::ChargerArgs;
use laddnet_actors::repo::{self, ChargerRecord, RepoError};
use laddnet_core::ChargerId;
use laddnet_core::charging::{Connector, ConnectorStatus, ConnectorType, MeterSample, TxEvent, TxEventKind};
use laddnet_pki::AuditKind;
use laddnet_proto::v1;
use laddnet_proto::v1::central_message::Payload as Out;
use laddnet_proto::v1::charger_message::Payload as In;
use laddnet_proto::v1::charger_service_server::ChargerService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, caller, cert_info, peer, rfc3339};
use crate::identity::Principal;
use crate::state::{NodeState, Outbound};
use crate::status::NodeError;

/// How long a new stream may take to send its boot message.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);

pub struct Charger {
    pub state: Arc<NodeState>,
}

type AttachStream = Pin<Box<dyn Stream<Item = Result<v1::CentralMessage, Status>> + Send>>;

/// The most meter updates stored as one run.
const MAX_RUN: usize = 64;

fn out(msg_id: u64, payload: Out) -> Result<v1::CentralMessage, Status> {
    Ok(v1::CentralMessage {
        msg_id,
        payload: Some(payload),
    })
}

fn rejected(msg_id: u64, reason: impl Into<String>) -> Result<v1::CentralMessage, Status> {
    out(msg_id, Out::Rejected(v1::Rejected { reason: reason.into() }))
}

pub(crate) fn connector_type(t: i32) -> Result<ConnectorType, String> {
    match v1::ConnectorType::try_from(t) {
        Ok(v1::ConnectorType::Ac) => Ok(ConnectorType::Ac),
        Ok(v1::ConnectorType::Dc) => Ok(ConnectorType::Dc),
        _ => Err(format!("connector type {t} is not AC or DC")),
    }
}

pub fn connector_status(s: i32) -> Result<ConnectorStatus, String> {
    use v1::ConnectorStatus as P;
    Ok(
        match P::try_from(s).map_err(|_| format!("unknown connector status {s}"))? {
            P::Available => ConnectorStatus::Available,
            P::Preparing => ConnectorStatus::Preparing,
            P::Charging => ConnectorStatus::Charging,
            P::SuspendedEv => ConnectorStatus::SuspendedEv,
            P::SuspendedEvse => ConnectorStatus::SuspendedEvse,
            P::Finishing => ConnectorStatus::Finishing,
            P::Reserved => ConnectorStatus::Reserved,
            P::Unavailable => ConnectorStatus::Unavailable,
            P::Faulted => ConnectorStatus::Faulted,
            P::Unspecified => return Err("connector status is unspecified".into()),
        },
    )
}

/// A transaction event from the wire, checked.
pub fn tx_event(e: v1::TransactionEvent) -> Result<TxEvent, String> {
    let kind = match v1::TransactionEventType::try_from(e.event_type) {
        Ok(v1::TransactionEventType::Started) => TxEventKind::Started,
        Ok(v1::TransactionEventType::Updated) => TxEventKind::Updated,
        Ok(v1::TransactionEventType::Ended) => TxEventKind::Ended,
        _ => return Err(format!("event_type {} is not started, updated or ended", e.event_type)),
    };
    let m = e.meter.ok_or("a transaction event needs a meter value")?;
    if m.soc_percent.is_some_and(|s| s > 100) {
        return Err("soc_percent above 100".into());
    }
    if e.stop_reason.len() > 64 || e.id_token.len() > 64 {
        return Err("stop_reason and id_token are at most 64 characters".into());
    }
    let event = TxEvent {
        transaction_id: e.transaction_id,
        seq: e.seq,
        kind,
        connector_id: e.connector_id,
        at_ms: e.timestamp_ms,
        meter: MeterSample {
            energy_wh: m.energy_wh,
            power_w: m.power_w,
            current_ma: m.current_ma,
            voltage_mv: m.voltage_mv,
            soc_percent: m.soc_percent,
        },
        offline: e.offline,
        stop_reason: e.stop_reason,
        driver_id: None,
        token_ref: None,
    };
    repo::validate_event(&event).map_err(|e| e.to_string())?;
    Ok(event)
}

pub fn boot_record(
    id: &ChargerId,
    site: Option<String>,
    serial: &str,
    boot: &v1::Boot,
) -> Result<ChargerRecord, String> {
    if boot.connectors.is_empty() || boot.connectors.len() > 32 {
        return Err("boot must declare 1 to 32 connectors".into());
    }
    let mut connectors = Vec::new();
    for c in &boot.connectors {
        if c.connector_id == 0 || connectors.iter().any(|k: &Connector| k.connector_id == c.connector_id) {
            return Err(format!("connector id {} is zero or declared twice", c.connector_id));
        }
        connectors.push(Connector {
            connector_id: c.connector_id,
            connector_type: connector_type(c.r#type)?,
            max_power_w: c.max_power_w,
            status: ConnectorStatus::Available,
            error_code: String::new(),
        });
    }
    for (what, v) in [
        ("vendor", &boot.vendor),
        ("model", &boot.model),
        ("firmware_version", &boot.firmware_version),
    ] {
        if v.len() > 64 {
            return Err(format!("{what} is longer than 64 characters"));
        }
    }
    Ok(ChargerRecord {
        charger_id: id.to_string(),
        site_id: site,
        vendor: boot.vendor.clone(),
        model: boot.model.clone(),
        firmware_version: boot.firmware_version.clone(),
        connectors,
        last_seen: time::OffsetDateTime::now_utc().unix_timestamp(),
        certificate_serial: serial.to_string(),
    })
}

/// A token bucket that waits instead of refusing.
struct Pacer {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// How long to wait before the next message may be read.
    fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

type DownloadStream = Pin<Box<dyn Stream<Item = Result<v1::FirmwareChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ChargerService for Charger {
    type AttachStream = AttachStream;
    type DownloadFirmwareStream = DownloadStream;

    async fn download_firmware(
        &self,
        req: Request<v1::DownloadFirmwareRequest>,
    ) -> Result<Response<DownloadStream>, Status> {
        let identity = caller(&self.state, &req)?;
        let Principal::Charger { id, .. } = &identity.principal else {
            return Err(NodeError::Denied("only chargers download firmware".into()).into());
        };
        let version = req.into_inner().version;
        crate::firmware::check_version(&version)?;
        let (store, charger, v2) = (self.state.store.clone(), id.to_string(), version.clone());
        let image = blocking(move || {
            if !crate::firmware::may_download(store.as_ref(), &charger, &v2)? {
                return Err(NodeError::Denied(format!(
                    "no firmware campaign for version {v2} includes charger {charger}"
                )));
            }
            crate::firmware::get_image(store.as_ref(), &v2)?
                .ok_or_else(|| NodeError::NotFound(format!("no firmware {v2}")))
        })
        .await?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.state.store.clone();
        tokio::spawn(async move {
            for i in 0..image.chunks {
                let (s2, v) = (store.clone(), image.version.clone());
                let chunk = tokio::task::spawn_blocking(move || crate::firmware::read_chunk(s2.as_ref(), &v, i)).await;
                let item = match chunk {
                    Ok(Ok(Some(data))) => Ok(v1::FirmwareChunk { data }),
                    Ok(Ok(None)) => Err(Status::data_loss(format!(
                        "firmware {} misses chunk {i}",
                        image.version
                    ))),
                    Ok(Err(e)) => Err(crate::status::to_status(e)),
                    Err(e) => Err(Status::internal(e.to_string())),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn attach(&self, req: Request<Streaming<v1::ChargerMessage>>) -> Result<Response<AttachStream>, Status> {
        let identity = caller(&self.state, &req)?;
        let closed = peer(&req)?.closed.clone();
        let Principal::Charger { id, site } = &identity.principal else {
            return Err(NodeError::Denied("only chargers may attach".into()).into());
        };
        let (id, site) = (id.clone(), site.clone());
        let mut inbound = req.into_inner();
        let first = match tokio::time::timeout(BOOT_DEADLINE, inbound.message()).await {
            Err(_) => return Err(NodeError::Precondition("no boot message within 30 s".into()).into()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(None)) => return Err(NodeError::Precondition("stream closed before boot".into()).into()),
            Ok(Ok(Some(m))) => m,
        };
        let Some(In::Boot(boot)) = first.payload else {
            return Err(NodeError::Precondition("the first message on the stream must be boot".into()).into());
        };
        if boot.charger_id != id.as_str() {
            let claimed: String = boot.charger_id.chars().take(64).collect();
            tracing::warn!(charger_id = %id, "charger claimed another charger's identity");
            let ca = self.state.ca.clone();
            let (actor, detail) = (
                identity.actor(),
                format!("certificate {} claimed to be charger {claimed:?}", identity.serial),
            );
            blocking(move || ca.record(AuditKind::SecurityEvent, &actor, &claimed, &detail)).await?;
            return Err(NodeError::Denied(format!(
                "this certificate is for charger {id}; it may not speak for another charger"
            ))
            .into());
        }
        let record = boot_record(&id, site.as_ref().map(|s| s.to_string()), &identity.serial, &boot)
            .map_err(NodeError::Invalid)?;
        let conn = match self.state.chargers.attach(&id, &identity.serial) {
            Ok(conn) => conn,
            Err(crate::state::AlreadyAttached) => {
                let ca = self.state.ca.clone();
                let (actor, subject) = (identity.actor(), id.to_string());
                blocking(move || {
                    ca.record(
                        AuditKind::SecurityEvent,
                        &actor,
                        &subject,
                        "second connection refused: the charger is already connected",
                    )
                })
                .await?;
                return Err(NodeError::AlreadyExists(format!(
                    "charger {id} is already connected; the live connection keeps its place"
                ))
                .into());
            }
        };
        // Ownership: taken in one transaction, or refused while a live
        // member of the cluster holds the charger's other connection.
        let Some(me) = self.state.cluster.me() else {
            self.state.chargers.detach(&id, conn);
            return Err(NodeError::Unavailable("this node has not joined the cluster yet".into()).into());
        };
        // The ownership and the boot record: one durable transaction.
        let (store, cid) = (self.state.store.clone(), id.to_string());
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let taken: Result<_, NodeError> = Ok(laddnet_actors::repo::write(&store, move |tx| {
            laddnet_actors::cluster::take_and_boot_in(tx, &cid, &me, now_ms, record.clone())
        })
        .await);
        let (fence, stored) = match taken {
            Ok(Ok((laddnet_actors::cluster::Takeover::Taken(f), Some(stored)))) => (f, stored),
            Ok(Ok((laddnet_actors::cluster::Takeover::Taken(_), None))) => {
                self.state.chargers.detach(&id, conn);
                return Err(NodeError::Internal("the boot was not recorded".into()).into());
            }
            Ok(Ok((laddnet_actors::cluster::Takeover::HeldBy { node, until_ms, .. }, _))) => {
                self.state.chargers.detach(&id, conn);
                // When to try again: once the holder's lease would lapse
                // (if that node died, its charger is free then).
                let wait_ms = (until_ms - crate::cluster::now_ms()).clamp(0, 600_000) + 250;
                let mut status: Status = NodeError::AlreadyExists(format!(
                    "charger {id} is connected to node {node}; the live connection keeps its place \
                     (retry in {} s)",
                    (wait_ms + 999) / 1000
                ))
                .into();
                if let Ok(v) = wait_ms.to_string().parse() {
                    status.metadata_mut().insert(laddnet_proto::RETRY_AFTER_MS, v);
                }
                return Err(status);
            }
            Ok(Err(e)) => {
                self.state.chargers.detach(&id, conn);
                return Err(crate::status::to_status(e));
            }
            Err(e) => {
                self.state.chargers.detach(&id, conn);
                return Err(e.into());
            }
        };
        let store: laddnet_store::SharedStore = Arc::new(laddnet_actors::cluster::FencedStore::new(
            self.state.store.clone(),
            fence.clone(),
        ));
        let args = ChargerArgs {
            store,
            fence: Some(fence),
            charger_id: id.to_string(),
            site_id: stored.site_id.clone(),
            connectors: stored.connectors.clone(),
            config: self.state.actor_config(),
        };
        let handle = match self.state.actors.attach(args, closed.clone()).await {
            Ok(h) => h,
            Err(e) => {
                self.state.chargers.detach(&id, conn);
                return Err(NodeError::Internal(format!("starting the charger actor: {e}")).into());
            }
        };
        let (tx, rx) = mpsc::channel(64);
        let outbound = Arc::new(Outbound {
            tx: tx.clone(),
            pending: Default::default(),
            list_version: std::sync::atomic::AtomicU64::new(boot.local_list_version),
            uploads: Default::default(),
        });
        self.state.chargers.bind(&id, conn, handle.clone(), outbound.clone());
        tracing::info!(charger_id = %id, "charger attached");
        crate::alarms::on_attached(&self.state, id.as_str());
        let heartbeat_interval_s = self.state.config.node.heartbeat_interval_s;
        let _ = tx
            .send(Box::new(out(
                first.msg_id,
                Out::BootAccepted(v1::BootAccepted {
                    server_time: rfc3339(self.state.ca.now()),
                    heartbeat_interval_s,
                }),
            )))
            .await;
        // The offline list, or what changed since the version the charger holds.
        if let Some(u) = crate::drivers::list_update(&self.state, boot.local_list_version).await {
            let version = u.version;
            if tx.send(Box::new(out(0, Out::LocalList(u)))).await.is_ok() {
                outbound.list_version.store(version, Ordering::Release);
            }
        }
        let ctx = Ctx {
            charger_id: id.to_string(),
            site_id: stored.site_id.clone(),
        };
        let state = self.state.clone();
        let fut = async move {
            let se = &state.config.sessions;
            let mut pacer = Pacer::new(se.max_messages_per_second, se.burst);
            // A message read ahead while gathering a run, handled next.
            let mut ahead: Option<v1::ChargerMessage> = None;
            let mut ended = false;
            while !ended {
                let m = match ahead.take() {
                    Some(m) => m,
                    None => {
                        let msg = tokio::select! {
                            _ = closed.cancelled() => {
                                let _ = tx.send(Box::new(out(0, Out::Closing(v1::Closing { reason: "connection closed by the node".into() })))).await;
                                break;
                            }
                            // The stream ends with the node, so the graceful
                            // shutdown is not held open by a charger that stays.
                            _ = state.shutdown.cancelled() => {
                                let _ = tx.send(Box::new(out(0, Out::Closing(v1::Closing { reason: "node shutting down; reconnect".into() })))).await;
                                break;
                            }
                            msg = inbound.message() => msg,
                        };
                        match msg {
                            Ok(Some(m)) => m,
                            Ok(None) | Err(_) => break,
                        }
                    }
                };
                state.chargers.heartbeat(&id, conn);
                // Meter updates of one transaction that have already
                // arrived (a charger sending ahead, or flushing what it
                // queued offline) are stored together: one store
                // transaction, and the replies in order.
                let mut run = vec![m];
                if is_meter_update(&run[0]) {
                    while run.len() < MAX_RUN {
                        match inbound.message().now_or_never() {
                            None => break,
                            Some(Ok(Some(next))) => {
                                if is_meter_update(&next) && transaction_of(&next) == transaction_of(&run[0]) {
                                    run.push(next);
                                } else {
                                    ahead = Some(next);
                                    break;
                                }
                            }
                            Some(Ok(None) | Err(_)) => {
                                ended = true;
                                break;
                            }
                        }
                    }
                }
                for _ in 0..run.len() {
                    if let Some(wait) = pacer.take() {
                        state.metrics.charger_backpressure.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(wait).await;
                    }
                }
                // Boxed: the large handling futures exist only while a
                // message is handled, not in every idle charger's task.
                let who = identity_actor(&id);
                let replies = match (run.len(), run.pop()) {
                    (1, Some(m)) => Box::pin(handle_message(&state, &ctx, &who, &handle, &outbound, m))
                        .await
                        .into_iter()
                        .collect(),
                    (_, last) => {
                        run.extend(last);
                        Box::pin(handle_meter_run(&state, &ctx, &who, &handle, &outbound, run)).await
                    }
                };
                for reply in replies {
                    let ends = reply.is_err();
                    if tx.send(Box::new(reply)).await.is_err() || ends {
                        ended = true;
                        break;
                    }
                }
            }
            handle.detach().await;
            state.chargers.detach(&id, conn);
            tracing::info!(charger_id = %id, "charger detached");
            crate::alarms::on_detached(&state, id.as_str());
        };
        tokio::spawn(fut);
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            |reply| *reply,
        ))))
    }

    async fn renew_certificate(
        &self,
        req: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let identity = caller(&self.state, &req)?;
        if !matches!(identity.principal, Principal::Charger { .. }) {
            return Err(NodeError::Denied("only chargers renew here; operators use laddctl pki renew".into()).into());
        }
        let csr = req.into_inner().csr_pem;
        let ca = self.state.ca.clone();
        let (serial, actor) = (identity.serial.clone(), identity.actor());
        let issued = blocking(move || ca.renew(&serial, csr.as_bytes(), &actor, true)).await?;
        Ok(Response::new(v1::RenewCertificateResponse {
            certificate: Some(cert_info(&issued.record, self.state.ca.now())),
            chain_pem: issued.chain_pem,
        }))
    }
}

fn identity_actor(id: &ChargerId) -> String {
    format!("charger:{id}")
}

/// The charger a stream belongs to.
struct Ctx {
    charger_id: String,
    site_id: Option<String>,
}

/// Asks the charger to stop a transaction; the reply is not waited for.
async fn remote_stop(outbound: &Outbound, tx_id: &str) {
    let cmd = v1::Command {
        command_id: format!("cmd-unauthorized-{tx_id}"),
        kind: Some(v1::command::Kind::RemoteStop(v1::RemoteStop {
            transaction_id: tx_id.into(),
        })),
    };
    outbound.send_command(cmd).await;
}

/// Handles one message after boot; returns the reply to send, if any.
async fn handle_message(
    state: &Arc<NodeState>,
    ctx: &Ctx,
    actor: &str,
    handle: &laddnet_actors::ChargerHandle,
    outbound: &Outbound,
    m: v1::ChargerMessage,
) -> Option<Result<v1::CentralMessage, Status>> {
    let id = m.msg_id;
    Some(match m.payload {
        Some(In::Heartbeat(_)) => {
            handle.heartbeat();
            out(
                id,
                Out::HeartbeatAck(v1::HeartbeatAck {
                    server_time: rfc3339(state.ca.now()),
                }),
            )
        }
        Some(In::Status(s)) => match connector_status(s.status) {
            Err(e) => rejected(id, e),
            Ok(status) => {
                if s.error_code.len() > 64 {
                    return Some(rejected(id, "error_code is longer than 64 characters"));
                }
                let code = s.error_code.clone();
                match handle
                    .status(s.connector_id, status, s.error_code, s.timestamp_ms)
                    .await
                {
                    Ok(()) => {
                        crate::alarms::on_status(state, &ctx.charger_id, s.connector_id, status, &code);
                        crate::drivers::on_status(
                            state,
                            &ctx.charger_id,
                            ctx.site_id.as_deref(),
                            s.connector_id,
                            status,
                            s.timestamp_ms,
                        )
                        .await;
                        out(id, Out::StatusAck(v1::StatusAck {}))
                    }
                    Err(e) if laddnet_core::HasKind::kind(&e) == laddnet_core::ErrorKind::Unavailable => {
                        Err(Status::unavailable(format!("status not stored, send it again: {e}")))
                    }
                    Err(e) => rejected(id, e.to_string()),
                }
            }
        },
        Some(In::Authorize(a)) => {
            if a.id_token.is_empty() || a.id_token.len() > 64 {
                return Some(out(
                    id,
                    Out::AuthorizeResult(v1::AuthorizeResult {
                        accepted: false,
                        reason: "id_token must be 1 to 64 characters".into(),
                        status: v1::AuthorizationStatus::Invalid as i32,
                    }),
                ));
            }
            let kind = crate::drivers::token_kind(a.token_type);
            match crate::drivers::authorize(
                state,
                &ctx.charger_id,
                ctx.site_id.clone(),
                kind,
                a.id_token,
                a.connector_id,
                None,
            )
            .await
            {
                Ok(d) => {
                    tracing::info!(charger_id = %ctx.charger_id, token_ref = %d.token_ref, status = d.status.as_str(), "authorization");
                    out(
                        id,
                        Out::AuthorizeResult(v1::AuthorizeResult {
                            accepted: d.accepted(),
                            reason: d.reason,
                            status: crate::drivers::status_to_proto(d.status) as i32,
                        }),
                    )
                }
                Err(e) => {
                    tracing::error!(error = %e, "authorization failed");
                    rejected(id, "authorization is unavailable; retry")
                }
            }
        }
        Some(In::Transaction(t)) => {
            let (token, token_type) = (t.id_token.clone(), t.token_type);
            let ev_max_w = t.meter.as_ref().and_then(|m| m.ev_max_power_w);
            let limit_w = t.meter.as_ref().and_then(|m| m.limit_w);
            let event = match tx_event(t) {
                Ok(e) => e,
                Err(reason) => {
                    state.metrics.events_rejected.fetch_add(1, Ordering::Relaxed);
                    return Some(rejected(id, reason));
                }
            };
            let (tx_id, seq) = (event.transaction_id.clone(), event.seq);
            let mut event = event;
            // A start: who is it? Authorized again here, after the fact, so
            // offline starts are reconciled when the charger is back.
            let mut refusal = None;
            if event.kind == laddnet_core::charging::TxEventKind::Started && !token.is_empty() {
                match crate::drivers::authorize(
                    state,
                    &ctx.charger_id,
                    ctx.site_id.clone(),
                    crate::drivers::token_kind(token_type),
                    token,
                    event.connector_id,
                    Some(tx_id.clone()),
                )
                .await
                {
                    Ok(d) => {
                        event.driver_id = d.driver_id.clone();
                        event.token_ref = Some(d.token_ref.clone());
                        if crate::drivers::token_refused(d.status) {
                            refusal = Some(format!(
                                "{} start refused: {}",
                                if event.offline { "offline" } else { "online" },
                                d.reason
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "authorization failed");
                        return Some(rejected(id, "authorization is unavailable; retry"));
                    }
                }
            }
            let result = handle.event(event).await;
            let meta = EventMeta {
                msg_id: id,
                transaction_id: tx_id,
                seq,
                ev_max_w,
                limit_w,
            };
            return Some(event_reply(state, ctx, actor, outbound, meta, refusal, result).await);
        }
        Some(In::CommandReply(r)) => {
            let waiter = outbound
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&r.command_id);
            if let Some(w) = waiter {
                let _ = w.send(r);
            }
            return None;
        }
        Some(In::FirmwareStatus(fs)) => {
            let store = state.store.clone();
            let charger = ctx.charger_id.clone();
            let r = tokio::task::spawn_blocking(move || {
                let r = crate::firmware::on_status(store.as_ref(), &charger, &fs);
                (r, fs)
            })
            .await;
            match r {
                Ok((Ok(()), fs)) => {
                    tracing::info!(charger_id = %ctx.charger_id, version = %fs.version, state = fs.state, campaign = %fs.campaign_id, "firmware status");
                    out(id, Out::StatusAck(v1::StatusAck {}))
                }
                Ok((Err(e), _)) => rejected(id, e.to_string()),
                Err(e) => rejected(id, format!("firmware status not recorded: {e}")),
            }
        }
        Some(In::Diagnostics(chunk)) => match outbound.uploads.chunk(chunk) {
            Err(e) => rejected(id, e.to_string()),
            Ok(None) => out(id, Out::StatusAck(v1::StatusAck {})),
            Ok(Some((request, file_name, content))) => {
                let store = state.store.clone();
                let charger = ctx.charger_id.clone();
                let req2 = request.clone();
                let saved = tokio::task::spawn_blocking(move || {
                    crate::diagnostics::save(store.as_ref(), &charger, &req2, &file_name, &content)
                })
                .await;
                match saved {
                    Ok(Ok(bundle)) => {
                        tracing::info!(charger_id = %ctx.charger_id, bundle = %bundle.id, size = bundle.size, "diagnostics stored");
                        let waiter = state
                            .diag_waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&request);
                        if let Some(w) = waiter {
                            let _ = w.send(bundle);
                        }
                        out(id, Out::StatusAck(v1::StatusAck {}))
                    }
                    Ok(Err(e)) => rejected(id, e.to_string()),
                    Err(e) => rejected(id, format!("diagnostics not stored: {e}")),
                }
            }
        },
        Some(In::Boot(_)) => rejected(id, "boot was already accepted on this stream"),
        None => rejected(id, "message without payload"),
    })
}

/// What an event's reply needs besides its result.
struct EventMeta {
    msg_id: u64,
    transaction_id: String,
    seq: u64,
    ev_max_w: Option<u32>,
    limit_w: Option<u32>,
}

/// The reply to one transaction event, and what follows it once stored:
/// payment hold, notifications, alarms, load; a refused start is recorded
/// (and stopped), another charger's transaction audited.
async fn event_reply(
    state: &Arc<NodeState>,
    ctx: &Ctx,
    actor: &str,
    outbound: &Outbound,
    meta: EventMeta,
    refusal: Option<String>,
    result: Result<laddnet_actors::repo::Applied, RepoError>,
) -> Result<v1::CentralMessage, Status> {
    let EventMeta {
        msg_id: id,
        transaction_id: tx_id,
        seq,
        ev_max_w,
        limit_w,
    } = meta;
    match result {
        Ok(applied) => {
            if let Some(why) = refusal
                && !applied.duplicate
            {
                let store = state.store.clone();
                let (t, w) = (tx_id.clone(), why.clone());
                let r = tokio::task::spawn_blocking(move || {
                    laddnet_actors::repo::set_authorization(store.as_ref(), &t, None, Some(w))
                })
                .await;
                tracing::warn!(charger_id = %ctx.charger_id, transaction_id = %tx_id, reason = %why, "unauthorized start");
                let open =
                    matches!(r, Ok(Ok(Some(ref rec))) if rec.status != laddnet_core::charging::SessionStatus::Ended);
                if open && state.config.drivers.stop_unauthorized_starts {
                    remote_stop(outbound, &tx_id).await;
                }
            } else if !applied.duplicate {
                if applied.record.samples == 1
                    && let Some(driver) = applied.record.driver_id.clone()
                {
                    crate::drivers::hold_payment(state, driver, tx_id.clone()).await;
                }
                crate::drivers::on_event(state, &applied.record).await;
                crate::alarms::on_record(state, &applied.record, ev_max_w, limit_w);
                crate::load::on_reading(state, &applied.record, ev_max_w).await;
            }
            let counter = if applied.duplicate {
                &state.metrics.events_duplicate
            } else {
                &state.metrics.events_accepted
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let (currency, excl, incl) = match &applied.running_cost {
                Some(c) => (c.currency.clone(), c.excl_vat.to_string(), c.incl_vat.to_string()),
                None => Default::default(),
            };
            out(
                id,
                Out::TransactionAck(v1::TransactionAck {
                    transaction_id: tx_id,
                    seq,
                    currency,
                    running_cost_excl_vat: excl,
                    running_cost_incl_vat: incl,
                }),
            )
        }
        Err(RepoError::ForeignTransaction(t)) => {
            state.metrics.events_rejected.fetch_add(1, Ordering::Relaxed);
            let ca = state.ca.clone();
            let (actor, detail) = (
                actor.to_string(),
                format!("sent an event for transaction {t} of another charger"),
            );
            let _ = tokio::task::spawn_blocking(move || ca.record(AuditKind::SecurityEvent, &actor, &t, &detail)).await;
            rejected(id, "this transaction belongs to another charger")
        }
        // The store or the session actor is unavailable, or another
        // node owns the charger now: not the event's fault. End the
        // stream; the charger keeps the event and sends it again
        // after reconnecting (here or to another node).
        Err(e) if laddnet_core::HasKind::kind(&e) == laddnet_core::ErrorKind::Unavailable => {
            tracing::warn!(charger_id = %ctx.charger_id, error = %e, "event not stored; closing the stream so the charger resends it");
            Err(Status::unavailable(format!("event not stored, send it again: {e}")))
        }
        Err(e) => {
            state.metrics.events_rejected.fetch_add(1, Ordering::Relaxed);
            rejected(id, e.to_string())
        }
    }
}

/// A meter update that may join a run: no token, nothing to authorize.
fn is_meter_update(m: &v1::ChargerMessage) -> bool {
    matches!(&m.payload, Some(In::Transaction(t))
        if t.event_type == v1::TransactionEventType::Updated as i32 && t.id_token.is_empty())
}

fn transaction_of(m: &v1::ChargerMessage) -> Option<&str> {
    match &m.payload {
        Some(In::Transaction(t)) => Some(&t.transaction_id),
        _ => None,
    }
}

/// A run of meter updates of one transaction, already received: stored in
/// one transaction by the session actor, then answered one by one, in order.
async fn handle_meter_run(
    state: &Arc<NodeState>,
    ctx: &Ctx,
    actor: &str,
    handle: &laddnet_actors::ChargerHandle,
    outbound: &Outbound,
    run: Vec<v1::ChargerMessage>,
) -> Vec<Result<v1::CentralMessage, Status>> {
    let mut replies: Vec<Option<Result<v1::CentralMessage, Status>>> = Vec::with_capacity(run.len());
    let (mut events, mut metas) = (Vec::new(), Vec::new());
    for m in run {
        let Some(In::Transaction(t)) = m.payload else {
            replies.push(Some(rejected(m.msg_id, "message without payload")));
            continue;
        };
        let (ev_max_w, limit_w) = (
            t.meter.as_ref().and_then(|m| m.ev_max_power_w),
            t.meter.as_ref().and_then(|m| m.limit_w),
        );
        match tx_event(t) {
            Ok(e) => {
                metas.push((
                    replies.len(),
                    EventMeta {
                        msg_id: m.msg_id,
                        transaction_id: e.transaction_id.clone(),
                        seq: e.seq,
                        ev_max_w,
                        limit_w,
                    },
                ));
                events.push(e);
                replies.push(None);
            }
            Err(reason) => {
                state.metrics.events_rejected.fetch_add(1, Ordering::Relaxed);
                replies.push(Some(rejected(m.msg_id, reason)));
            }
        }
    }
    state
        .metrics
        .events_in_runs
        .fetch_add(events.len() as u64, Ordering::Relaxed);
    let results: Vec<Result<laddnet_actors::repo::Applied, RepoError>> = match handle.events(events).await {
        Ok(r) => r,
        Err(e) => {
            let text = e.to_string();
            let mut all = vec![Err(e)];
            all.extend((1..metas.len()).map(|_| Err(RepoError::Gone(text.clone()))));
            all
        }
    };
    for ((at, meta), result) in metas.into_iter().zip(results) {
        replies[at] = Some(event_reply(state, ctx, actor, outbound, meta, None, result).await);
    }
    replies
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Status::internal("an event of the run was not answered"))))
        .collect()
}
