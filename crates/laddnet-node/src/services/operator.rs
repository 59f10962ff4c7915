//! `OperatorService`: the operators' view of the network and their
//! commands. Every role may read; changes and commands need `operator` or
//! `admin`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use laddnet_actors::cluster::{self, MemberRecord, OwnerRecord};
use laddnet_actors::repo::{self, ChargerRecord, RepoError, SiteRecord};
use laddnet_core::charging::{ConnectorStatus, ConnectorType, SessionRecord, SessionStatus};
use laddnet_core::{ChargerId, Role, SiteId};
use laddnet_proto::v1;
use laddnet_proto::v1::operator_service_server::OperatorService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{blocking, page, page_token, require_role, rfc3339};
use crate::identity::Principal;
use crate::now_ms;
use crate::state::NodeState;
use crate::status::NodeError;

pub struct Operator {
    pub state: Arc<NodeState>,
}

fn invalid(e: impl std::fmt::Display) -> Status {
    NodeError::Invalid(e.to_string()).into()
}

fn ms_to_rfc3339(ms: i64) -> String {
    rfc3339(ms.div_euclid(1000))
}

fn status_proto(s: ConnectorStatus) -> v1::ConnectorStatus {
    use v1::ConnectorStatus as P;
    match s {
        ConnectorStatus::Available => P::Available,
        ConnectorStatus::Preparing => P::Preparing,
        ConnectorStatus::Charging => P::Charging,
        ConnectorStatus::SuspendedEv => P::SuspendedEv,
        ConnectorStatus::SuspendedEvse => P::SuspendedEvse,
        ConnectorStatus::Finishing => P::Finishing,
        ConnectorStatus::Reserved => P::Reserved,
        ConnectorStatus::Unavailable => P::Unavailable,
        ConnectorStatus::Faulted => P::Faulted,
    }
}

/// Where chargers are connected in the cluster, by charger id.
type Placements = std::collections::HashMap<String, (OwnerRecord, MemberRecord)>;

/// The view of a charger: connected here (with its connection's details),
/// to another node of the cluster (`placed`), or nowhere.
pub(crate) fn charger_proto(state: &NodeState, r: &ChargerRecord, placed: &Placements) -> v1::Charger {
    let conn = state.chargers.connection(&r.charger_id);
    let elsewhere = placed.get(&r.charger_id).filter(|_| conn.is_none());
    let node_id = match (&conn, elsewhere) {
        (Some(_), _) => state.config.node.name.clone(),
        (None, Some((_, m))) => m.node.clone(),
        (None, None) => String::new(),
    };
    v1::Charger {
        charger_id: r.charger_id.clone(),
        connected: conn.is_some() || elsewhere.is_some(),
        node_id,
        vendor: r.vendor.clone(),
        model: r.model.clone(),
        firmware_version: r.firmware_version.clone(),
        connected_since: match (&conn, elsewhere) {
            (Some(c), _) => rfc3339(c.0),
            (None, Some((o, _))) => ms_to_rfc3339(o.since_ms),
            (None, None) => String::new(),
        },
        last_heartbeat: conn.as_ref().map(|c| rfc3339(c.1)).unwrap_or_default(),
        certificate_serial: conn.map(|c| c.2).unwrap_or_else(|| r.certificate_serial.clone()),
        site_id: r.site_id.clone().unwrap_or_default(),
        connectors: r
            .connectors
            .iter()
            .map(|c| v1::ConnectorState {
                connector_id: c.connector_id,
                r#type: match c.connector_type {
                    ConnectorType::Ac => v1::ConnectorType::Ac,
                    ConnectorType::Dc => v1::ConnectorType::Dc,
                } as i32,
                max_power_w: c.max_power_w,
                status: status_proto(c.status) as i32,
                error_code: c.error_code.clone(),
            })
            .collect(),
        last_seen: rfc3339(r.last_seen),
    }
}

pub(crate) fn session_proto(r: &SessionRecord, now_ms: i64) -> v1::Session {
    v1::Session {
        transaction_id: r.transaction_id.clone(),
        charger_id: r.charger_id.clone(),
        connector_id: r.connector_id,
        site_id: r.site_id.clone().unwrap_or_default(),
        status: r.status.as_str().into(),
        started_at: ms_to_rfc3339(r.started_at_ms.unwrap_or(r.first.at_ms)),
        ended_at: r.ended.map(|p| ms_to_rfc3339(p.at_ms)).unwrap_or_default(),
        energy_wh: r.energy_wh(),
        power_w: r.power_w,
        duration_s: r.duration_s(now_ms),
        samples: r.samples,
        last_seq: r.last.seq,
        missing_events: r.missing_events(),
        soc_percent: r.soc_percent,
        flags: r.flags.iter().cloned().collect(),
        stop_reason: r.stop_reason.clone(),
        meter_start_wh: r.first.energy_wh,
        meter_stop_wh: r.ended.map(|p| p.energy_wh).unwrap_or_default(),
        currency: String::new(),
        cost_excl_vat: String::new(),
        cost_incl_vat: String::new(),
    }
}

/// Adds the session's cost (final once billed, else running) to its view.
fn with_cost(store: &laddnet_store::SharedStore, mut p: v1::Session) -> v1::Session {
    if let Ok(Some((currency, excl, incl))) = laddnet_ledger::cdr::estimate(store.as_ref(), &p.transaction_id) {
        p.currency = currency;
        p.cost_excl_vat = excl.to_string();
        p.cost_incl_vat = incl.to_string();
    }
    p
}

fn parse_status(s: &str) -> Result<Option<SessionStatus>, Status> {
    Ok(match s {
        "" => None,
        "active" => Some(SessionStatus::Active),
        "interrupted" => Some(SessionStatus::Interrupted),
        "ended" => Some(SessionStatus::Ended),
        other => {
            return Err(invalid(format!(
                "unknown session status {other:?}: expected active, interrupted or ended"
            )));
        }
    })
}

fn site_proto(s: SiteRecord) -> v1::Site {
    v1::Site {
        site_id: s.site_id,
        name: s.name,
        address: s.address,
        time_zone: s.time_zone,
        grid_limit_w: s.grid_limit_w,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::Session, Status>> + Send>>;

#[tonic::async_trait]
impl OperatorService for Operator {
    type WatchSessionsStream = WatchStream;

    async fn who_am_i(&self, req: Request<v1::WhoAmIRequest>) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let (id, role) = require_role(&self.state, &req, "ask", |_| true)?;
        let name = match &id.principal {
            Principal::Operator { name, .. } => name.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(v1::WhoAmIResponse {
            name,
            role: role.to_string(),
            serial: id.serial.clone(),
            not_after: rfc3339(id.not_after),
        }))
    }

    async fn list_chargers(
        &self,
        req: Request<v1::ListChargersRequest>,
    ) -> Result<Response<v1::ListChargersResponse>, Status> {
        require_role(&self.state, &req, "list chargers", |_| true)?;
        let (limit, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let store = self.state.store.clone();
        let (rows, more, placed) = blocking(move || {
            let (rows, more) = repo::list_chargers(store.as_ref(), after.as_deref(), limit)?;
            let ids: Vec<String> = rows.iter().map(|r| r.charger_id.clone()).collect();
            let placed = cluster::locate_many(store.as_ref(), &ids, now_ms())?;
            Ok::<_, RepoError>((rows, more, placed))
        })
        .await?;
        Ok(Response::new(v1::ListChargersResponse {
            next_page_token: page_token(rows.last().map(|c| c.charger_id.as_str()), more),
            chargers: rows.iter().map(|r| charger_proto(&self.state, r, &placed)).collect(),
        }))
    }

    async fn get_charger(&self, req: Request<v1::GetChargerRequest>) -> Result<Response<v1::Charger>, Status> {
        require_role(&self.state, &req, "read chargers", |_| true)?;
        let id = ChargerId::new(req.into_inner().charger_id).map_err(invalid)?;
        let store = self.state.store.clone();
        let key = id.to_string();
        let (rec, placed) = blocking(move || {
            let rec = repo::get_charger(store.as_ref(), &key)?;
            let placed = cluster::locate_many(store.as_ref(), &[key], now_ms())?;
            Ok::<_, RepoError>((rec, placed))
        })
        .await?;
        let rec = rec.ok_or_else(|| crate::status::to_status(RepoError::NotFound(format!("charger {id}"))))?;
        Ok(Response::new(charger_proto(&self.state, &rec, &placed)))
    }

    async fn set_charger_site(&self, req: Request<v1::SetChargerSiteRequest>) -> Result<Response<v1::Charger>, Status> {
        require_role(&self.state, &req, "move chargers between sites", Role::can_operate)?;
        let r = req.into_inner();
        let id = ChargerId::new(r.charger_id).map_err(invalid)?;
        let site = SiteId::new(r.site_id).map_err(invalid)?;
        let store = self.state.store.clone();
        let (rec, placed) = blocking(move || {
            let rec = repo::set_charger_site(store.as_ref(), id.as_str(), site.as_str())?;
            let placed = cluster::locate_many(store.as_ref(), std::slice::from_ref(&rec.charger_id), now_ms())?;
            Ok::<_, RepoError>((rec, placed))
        })
        .await?;
        Ok(Response::new(charger_proto(&self.state, &rec, &placed)))
    }

    async fn send_command(&self, req: Request<v1::SendCommandRequest>) -> Result<Response<v1::CommandReply>, Status> {
        let (identity, _) = require_role(&self.state, &req, "send commands to chargers", Role::can_operate)?;
        let r = req.into_inner();
        let id = ChargerId::new(r.charger_id).map_err(invalid)?;
        let mut command = r.command.ok_or_else(|| invalid("command is required"))?;
        if command.kind.is_none() {
            return Err(invalid("command has no kind"));
        }
        command.command_id = format!("cmd-{:x}", rand_id());
        let reply = crate::cluster::command(&self.state, id.as_str(), command, true, &identity.actor()).await?;
        Ok(Response::new(reply))
    }

    async fn create_site(&self, req: Request<v1::CreateSiteRequest>) -> Result<Response<v1::Site>, Status> {
        require_role(&self.state, &req, "create sites", Role::can_operate)?;
        let s = req.into_inner().site.ok_or_else(|| invalid("site is required"))?;
        let id = SiteId::new(s.site_id).map_err(invalid)?;
        if s.name.trim().is_empty() || s.name.len() > 128 {
            return Err(invalid("site name must be 1 to 128 characters"));
        }
        if s.address.len() > 256 {
            return Err(invalid("site address is at most 256 characters"));
        }
        let tz = if s.time_zone.is_empty() {
            "UTC".to_string()
        } else {
            s.time_zone
        };
        if tz.len() > 64 || !tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c)) {
            return Err(invalid(format!("time_zone {tz:?} is not an IANA zone name")));
        }
        let rec = SiteRecord {
            site_id: id.to_string(),
            name: s.name,
            address: s.address,
            time_zone: tz,
            grid_limit_w: s.grid_limit_w,
        };
        let store = self.state.store.clone();
        let r2 = rec.clone();
        blocking(move || repo::create_site(store.as_ref(), &r2)).await?;
        Ok(Response::new(site_proto(rec)))
    }

    async fn list_sites(&self, req: Request<v1::ListSitesRequest>) -> Result<Response<v1::ListSitesResponse>, Status> {
        require_role(&self.state, &req, "list sites", |_| true)?;
        let (limit, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let store = self.state.store.clone();
        let (rows, more) = blocking(move || repo::list_sites(store.as_ref(), after.as_deref(), limit)).await?;
        Ok(Response::new(v1::ListSitesResponse {
            next_page_token: page_token(rows.last().map(|s| s.site_id.as_str()), more),
            sites: rows.into_iter().map(site_proto).collect(),
        }))
    }

    async fn get_site(&self, req: Request<v1::GetSiteRequest>) -> Result<Response<v1::Site>, Status> {
        require_role(&self.state, &req, "read sites", |_| true)?;
        let id = SiteId::new(req.into_inner().site_id).map_err(invalid)?;
        let store = self.state.store.clone();
        let key = id.to_string();
        let rec = blocking(move || repo::get_site(store.as_ref(), &key)).await?;
        Ok(Response::new(site_proto(rec.ok_or_else(|| {
            crate::status::to_status(RepoError::NotFound(format!("site {id}")))
        })?)))
    }

    async fn list_sessions(
        &self,
        req: Request<v1::ListSessionsRequest>,
    ) -> Result<Response<v1::ListSessionsResponse>, Status> {
        require_role(&self.state, &req, "list sessions", |_| true)?;
        let r = req.into_inner();
        let (limit, after) = page(&self.state, r.page.as_ref())?;
        let status = parse_status(&r.status)?;
        let charger = if r.charger_id.is_empty() {
            None
        } else {
            Some(ChargerId::new(r.charger_id).map_err(invalid)?.to_string())
        };
        let store = self.state.store.clone();
        let (rows, more) = {
            let store = store.clone();
            blocking(move || repo::list_sessions(store.as_ref(), status, charger.as_deref(), after.as_deref(), limit))
                .await?
        };
        let last = rows.last().map(|s| s.transaction_id.clone());
        let now = now_ms();
        // Each running cost is a few reads: over a networked store, a page
        // of them concurrently rather than one round trip after another.
        use futures::StreamExt;
        let sessions: Vec<v1::Session> = futures::stream::iter(rows)
            .map(|s| {
                let store = store.clone();
                async move {
                    let view = session_proto(&s, now);
                    let fallback = view.clone();
                    tokio::task::spawn_blocking(move || with_cost(&store, view))
                        .await
                        .unwrap_or(fallback)
                }
            })
            .buffered(16)
            .collect()
            .await;
        Ok(Response::new(v1::ListSessionsResponse {
            next_page_token: page_token(last.as_deref(), more),
            sessions,
        }))
    }

    async fn get_session(&self, req: Request<v1::GetSessionRequest>) -> Result<Response<v1::Session>, Status> {
        require_role(&self.state, &req, "read sessions", |_| true)?;
        let id = req.into_inner().transaction_id;
        if id.is_empty() || id.len() > 64 {
            return Err(invalid("transaction_id must be 1 to 64 characters"));
        }
        let store = self.state.store.clone();
        let key = id.clone();
        let rec = blocking(move || repo::get_session(store.as_ref(), &key)).await?;
        let rec = rec.ok_or_else(|| crate::status::to_status(RepoError::NotFound(format!("session {id}"))))?;
        let (store, view) = (self.state.store.clone(), session_proto(&rec, now_ms()));
        let view = tokio::task::spawn_blocking(move || with_cost(&store, view))
            .await
            .map_err(|e| Status::from(NodeError::Internal(e.to_string())))?;
        Ok(Response::new(view))
    }

    async fn availability_report(
        &self,
        req: Request<v1::AvailabilityReportRequest>,
    ) -> Result<Response<v1::AvailabilityReportResponse>, Status> {
        require_role(&self.state, &req, "read availability", |_| true)?;
        let r = req.into_inner();
        let at = |field: &str, v: &str| -> Result<i64, Status> {
            super::parse_time(v, field)?.ok_or_else(|| super::invalid(format!("{field} is required (RFC 3339)")))
        };
        let (from, to) = (at("from", &r.from)?, at("to", &r.to)?);
        let by = laddnet_actors::availability::By::parse(if r.by.is_empty() { "charger" } else { &r.by })
            .map_err(|e| super::invalid(e.to_string()))?;
        let store = self.state.store.clone();
        let rows =
            blocking(move || laddnet_actors::availability::report(store.as_ref(), from * 1000, to * 1000, by)).await?;
        Ok(Response::new(v1::AvailabilityReportResponse {
            rows: rows
                .iter()
                .map(|x| v1::AvailabilityRow {
                    key: x.key.clone(),
                    availability_percent: x.availability_percent().to_string(),
                    counted_s: x.counted_ms / 1000,
                    up_s: x.up_ms / 1000,
                    fault_s: x.fault_ms / 1000,
                    offline_s: x.offline_ms / 1000,
                    maintenance_s: x.maintenance_ms / 1000,
                })
                .collect(),
        }))
    }

    async fn watch_sessions(&self, req: Request<v1::WatchSessionsRequest>) -> Result<Response<WatchStream>, Status> {
        require_role(&self.state, &req, "watch sessions", |_| true)?;
        let only = req.into_inner().transaction_id;
        let (tx, rx) = mpsc::channel(64);
        let store = self.state.store.clone();
        let shutdown = self.state.shutdown.clone();
        tokio::spawn(async move {
            // Sends a session whenever what an operator sees of it changed.
            let mut last: std::collections::HashMap<String, (u64, u32, String, u64)> = Default::default();
            loop {
                let (store2, only2) = (store.clone(), only.clone());
                let rows = tokio::task::spawn_blocking(move || -> Result<Vec<SessionRecord>, RepoError> {
                    if only2.is_empty() {
                        Ok(repo::list_sessions(store2.as_ref(), Some(SessionStatus::Active), None, None, 10_000)?.0)
                    } else {
                        Ok(repo::get_session(store2.as_ref(), &only2)?.into_iter().collect())
                    }
                })
                .await;
                let mut rows = match rows {
                    Ok(Ok(rows)) => rows,
                    _ => break,
                };
                // Sessions that left the active listing since the last
                // look: their last state (ended, interrupted) once.
                let gone: Vec<String> = last
                    .keys()
                    .filter(|k| !rows.iter().any(|r| &r.transaction_id == *k))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    let store2 = store.clone();
                    let ended = tokio::task::spawn_blocking(move || {
                        gone.iter()
                            .filter_map(|id| repo::get_session(store2.as_ref(), id).ok().flatten())
                            .collect::<Vec<_>>()
                    })
                    .await
                    .unwrap_or_default();
                    for r in ended {
                        if r.status == SessionStatus::Active {
                            continue;
                        }
                        last.remove(&r.transaction_id);
                        rows.push(r);
                    }
                }
                let now = now_ms();
                let (store2, views) = (
                    store.clone(),
                    rows.iter().map(|r| session_proto(r, now)).collect::<Vec<_>>(),
                );
                let Ok(views) = tokio::task::spawn_blocking(move || {
                    views.into_iter().map(|v| with_cost(&store2, v)).collect::<Vec<_>>()
                })
                .await
                else {
                    break;
                };
                for p in views {
                    let key = (p.energy_wh, p.power_w, p.status.clone(), p.duration_s);
                    if last.get(&p.transaction_id) != Some(&key) {
                        // Watching all: a session no longer active is sent
                        // once and no longer followed.
                        if p.status == "active" || !only.is_empty() {
                            last.insert(p.transaction_id.clone(), key);
                        }
                        if tx.send(Ok(p)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let t = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    t ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(32)
}
