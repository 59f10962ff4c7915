//! `DriverAdminService` (operators) and `DriverService` (driver apps).
//! Personal data leaves the vault only for a caller whose role allows it,
//! and every such read is written to the audit log first.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use laddnet_core::Role;
use laddnet_drivers::accounts::NewDriver;
use laddnet_drivers::insights::{SessionSummary, driver_insights, site_utilisation};
use laddnet_drivers::outbox::{self, Notification};
use laddnet_drivers::{
    AccountStatus, Channel, DriverError, DriverRecord, PaymentKind, Preferences, SiteAccess, TokenKind, TokenRecord,
    TokenStatus,
};
use laddnet_pki::{AuditKind, Subject};
use laddnet_proto::v1;
use laddnet_proto::v1::driver_admin_service_server::DriverAdminService;
use laddnet_proto::v1::driver_service_server::DriverService;
use laddnet_store::StoreExt;
use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use super::{blocking, caller, cert_info, invalid, page, page_token, parse_time, require_role, rfc3339};
use crate::identity::Principal;
use crate::state::NodeState;
use crate::status::NodeError;

pub struct DriverAdmin {
    pub state: Arc<NodeState>,
}

pub struct DriverApp {
    pub state: Arc<NodeState>,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn check_driver_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid("driver_id must be 1 to 64 letters, digits or '-'"));
    }
    Ok(())
}

fn token_info(t: &TokenRecord) -> v1::DriverToken {
    v1::DriverToken {
        token_id: t.token_id.clone(),
        driver_id: t.driver_id.clone(),
        kind: t.kind.as_str().into(),
        status: t.effective_status(now()).as_str().into(),
        expires_at: t.expires_at.map(rfc3339).unwrap_or_default(),
        token_ref: t.token_ref(),
    }
}

fn prefs_info(p: &Preferences) -> v1::Preferences {
    v1::Preferences {
        target_soc_percent: p.target_soc_percent.unwrap_or(0),
        departure: p.departure.clone().unwrap_or_default(),
        max_price_per_kwh: p.max_price_per_kwh.map(|d| d.to_string()).unwrap_or_default(),
        channels: p.channels.iter().map(|c| c.as_str().to_string()).collect(),
    }
}

fn prefs_from(p: Option<v1::Preferences>) -> Result<Preferences, Status> {
    let p = p.ok_or_else(|| invalid("preferences are required"))?;
    let channels = p
        .channels
        .iter()
        .map(|c| Channel::parse(c))
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(invalid)?;
    // No channels named: the default (every channel), never silence by omission.
    let channels = if channels.is_empty() {
        Preferences::default().channels
    } else {
        channels
    };
    let prefs = Preferences {
        target_soc_percent: (p.target_soc_percent != 0).then_some(p.target_soc_percent),
        departure: (!p.departure.is_empty()).then_some(p.departure),
        max_price_per_kwh: if p.max_price_per_kwh.is_empty() {
            None
        } else {
            Some(
                p.max_price_per_kwh
                    .parse::<Decimal>()
                    .map_err(|_| invalid(format!("max_price_per_kwh {:?} is not a decimal", p.max_price_per_kwh)))?,
            )
        },
        channels,
    };
    prefs.validate().map_err(invalid)?;
    Ok(prefs)
}

/// The account as shown: tokens, open sessions, and the personal fields
/// only when `personal` is given.
fn driver_view(
    state: &NodeState,
    rec: &DriverRecord,
    personal: Option<std::collections::BTreeMap<String, String>>,
) -> Result<v1::Driver, DriverError> {
    let d = &state.hub.drivers;
    let tokens = d.tokens(&rec.driver_id)?;
    let open = d.store.snapshot(|tx| d.active_sessions(tx, &rec.driver_id))?.len() as u32;
    let (balance, available) = d.wallet(&rec.driver_id)?;
    Ok(v1::Driver {
        driver_id: rec.driver_id.clone(),
        status: rec.effective_status(now()).as_str().into(),
        expires_at: rec.expires_at.map(rfc3339).unwrap_or_default(),
        groups: rec.groups.iter().cloned().collect(),
        max_concurrent_sessions: rec.max_concurrent_sessions,
        payment: rec.payment.as_str().into(),
        currency: rec.currency.clone(),
        wallet_balance: balance.to_string(),
        wallet_available: available.to_string(),
        preferences: Some(prefs_info(&rec.preferences)),
        watches: rec.watches.iter().cloned().collect(),
        personal_fields: rec.personal_fields.iter().cloned().collect(),
        personal: personal.unwrap_or_default().into_iter().collect(),
        tokens: tokens.iter().map(token_info).collect(),
        created_at: rfc3339(rec.created_at),
        open_sessions: open,
    })
}

async fn view(state: &Arc<NodeState>, rec: DriverRecord) -> Result<v1::Driver, Status> {
    let st = state.clone();
    blocking(move || driver_view(&st, &rec, None)).await
}

/// Writes an audit entry; the action does not happen if this fails.
async fn audit(
    state: &Arc<NodeState>,
    kind: AuditKind,
    actor: String,
    subject: String,
    detail: String,
) -> Result<(), Status> {
    let ca = state.ca.clone();
    blocking(move || ca.record(kind, &actor, &subject, &detail)).await
}

/// Session summaries of the given transactions, with their sites' zones.
fn summaries(state: &NodeState, tx_ids: &[String]) -> Vec<SessionSummary> {
    let store = state.store.as_ref();
    let mut zones: std::collections::HashMap<String, chrono_tz::Tz> = Default::default();
    tx_ids
        .iter()
        .filter_map(|id| laddnet_actors::repo::get_session(store, id).ok().flatten())
        .map(|s| {
            let start = s.started_at_ms.unwrap_or(s.first.at_ms);
            let end = s.ended.unwrap_or(s.last).at_ms;
            let tz = match &s.site_id {
                Some(site) => *zones.entry(site.clone()).or_insert_with(|| {
                    laddnet_actors::repo::get_site(store, site)
                        .ok()
                        .flatten()
                        .and_then(|r| r.time_zone.parse().ok())
                        .unwrap_or(chrono_tz::UTC)
                }),
                None => chrono_tz::UTC,
            };
            let ct = laddnet_actors::repo::get_charger(store, &s.charger_id)
                .ok()
                .flatten()
                .and_then(|c| c.connectors.into_iter().find(|k| k.connector_id == s.connector_id))
                .map(|k| k.connector_type);
            SessionSummary {
                started_at_ms: start,
                ended_at_ms: end,
                energy_wh: s.energy_wh(),
                connector_type: ct,
                site_id: s.site_id.clone(),
                time_zone: tz,
            }
        })
        .collect()
}

fn export_json(state: &NodeState, id: &str) -> Result<String, DriverError> {
    let ex = state.hub.drivers.export(id)?;
    let sessions: Vec<serde_json::Value> = ex
        .sessions
        .iter()
        .filter_map(|t| {
            laddnet_actors::repo::get_session(state.store.as_ref(), t)
                .ok()
                .flatten()
        })
        .map(|s| serde_json::to_value(&s).unwrap_or_default())
        .collect();
    let cdrs: Vec<serde_json::Value> = ex
        .sessions
        .iter()
        .filter_map(|t| laddnet_ledger::cdr::get_cdr(state.store.as_ref(), t).ok().flatten())
        .map(|c| serde_json::to_value(&c).unwrap_or_default())
        .collect();
    let doc = serde_json::json!({
        "format": "laddnet-driver-export/v1",
        "exported_at": rfc3339(now()),
        "driver": ex.driver,
        "personal": ex.personal,
        "tokens": ex.tokens,
        "sessions": sessions,
        "charge_detail_records": cdrs,
    });
    serde_json::to_string_pretty(&doc).map_err(|e| DriverError::Corrupted(e.to_string()))
}

fn notification_info(n: &Notification) -> v1::Notification {
    v1::Notification {
        id: n.id.clone(),
        seq: n.seq,
        kind: n.kind.as_str().into(),
        created_at: rfc3339(n.created_at),
        message: n.message.clone(),
        charger_id: n.charger_id.clone().unwrap_or_default(),
        site_id: n.site_id.clone().unwrap_or_default(),
        connector_id: n.connector_id.unwrap_or(0),
        transaction_id: n.transaction_id.clone().unwrap_or_default(),
        amount: n.amount.clone().unwrap_or_default(),
        currency: n.currency.clone().unwrap_or_default(),
        starts_at: n.starts_at.map(rfc3339).unwrap_or_default(),
        ends_at: n.ends_at.map(rfc3339).unwrap_or_default(),
    }
}

async fn after_change(state: &Arc<NodeState>) {
    crate::drivers::push_local_lists(state).await;
}

#[tonic::async_trait]
impl DriverAdminService for DriverAdmin {
    async fn create_driver(&self, req: Request<v1::CreateDriverRequest>) -> Result<Response<v1::Driver>, Status> {
        let (who, _) = require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let new = NewDriver {
            name: opt(r.name),
            email: opt(r.email),
            phone: opt(r.phone),
            payment_ref: opt(r.payment_ref),
            groups: r.groups.into_iter().collect(),
            max_concurrent_sessions: r.max_concurrent_sessions,
            payment: Some(if r.payment.is_empty() {
                PaymentKind::None
            } else {
                PaymentKind::parse(&r.payment).map_err(invalid)?
            }),
            currency: if r.currency.is_empty() {
                self.state.config.billing.default_currency.clone()
            } else {
                r.currency
            },
            expires_at: parse_time(&r.expires_at, "expires_at")?,
        };
        let d = self.state.hub.drivers.clone();
        let rec = blocking(move || d.create(new, now())).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            rec.driver_id.clone(),
            "created".into(),
        )
        .await?;
        tracing::info!(driver_id = %rec.driver_id, "driver created");
        Ok(Response::new(view(&self.state, rec).await?))
    }

    async fn get_driver(&self, req: Request<v1::GetDriverRequest>) -> Result<Response<v1::Driver>, Status> {
        let (who, role) = require_role(&self.state, &req, "read drivers", |r| {
            r.can_manage_drivers() || r.can_read_billing()
        })?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        if r.with_personal && !role.can_read_personal_data() {
            return Err(NodeError::Denied(format!("role {role} may not read personal data")).into());
        }
        let d = self.state.hub.drivers.clone();
        let id = r.driver_id.clone();
        let rec = blocking(move || d.get(&id)).await?;
        let personal = if r.with_personal {
            audit(
                &self.state,
                AuditKind::PersonalDataRead,
                who.actor(),
                r.driver_id.clone(),
                "read personal fields".into(),
            )
            .await?;
            let d = self.state.hub.drivers.clone();
            let id = r.driver_id.clone();
            Some(blocking(move || d.personal(&id)).await?)
        } else {
            None
        };
        let st = self.state.clone();
        Ok(Response::new(blocking(move || driver_view(&st, &rec, personal)).await?))
    }

    async fn list_drivers(
        &self,
        req: Request<v1::ListDriversRequest>,
    ) -> Result<Response<v1::ListDriversResponse>, Status> {
        require_role(&self.state, &req, "read drivers", |r| {
            r.can_manage_drivers() || r.can_read_billing()
        })?;
        let (size, after) = page(&self.state, req.get_ref().page.as_ref())?;
        let d = self.state.hub.drivers.clone();
        let mut recs = blocking(move || d.list(after.as_deref(), size + 1)).await?;
        let more = recs.len() > size;
        recs.truncate(size);
        let last = recs.last().map(|r| r.driver_id.clone());
        let mut drivers = Vec::new();
        for r in recs {
            drivers.push(view(&self.state, r).await?);
        }
        Ok(Response::new(v1::ListDriversResponse {
            drivers,
            next_page_token: page_token(last.as_deref(), more),
        }))
    }

    async fn update_driver(&self, req: Request<v1::UpdateDriverRequest>) -> Result<Response<v1::Driver>, Status> {
        let (who, _) = require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        let status = r
            .status
            .as_deref()
            .map(AccountStatus::parse)
            .transpose()
            .map_err(invalid)?;
        let payment = r
            .payment
            .as_deref()
            .map(PaymentKind::parse)
            .transpose()
            .map_err(invalid)?;
        let expires = match r.expires_at.as_deref() {
            None => None,
            Some(s) => Some(parse_time(s, "expires_at")?),
        };
        let d = self.state.hub.drivers.clone();
        let (id, personal) = (r.driver_id.clone(), r.personal.clone());
        let (set_groups, groups, max) = (r.set_groups, r.groups.clone(), r.max_concurrent_sessions);
        let rec = blocking(move || {
            for (field, value) in &personal {
                d.set_personal(&id, field, value)?;
            }
            d.update(&id, now(), |rec| {
                if let Some(s) = status {
                    rec.status = s;
                }
                if let Some(e) = expires {
                    rec.expires_at = e;
                }
                if set_groups {
                    rec.groups = groups.iter().cloned().collect();
                }
                if let Some(m) = max {
                    if m == 0 {
                        return Err(DriverError::Invalid(
                            "max_concurrent_sessions must be at least 1".into(),
                        ));
                    }
                    rec.max_concurrent_sessions = m;
                }
                if let Some(p) = payment {
                    rec.payment = p;
                }
                Ok(())
            })
        })
        .await?;
        let fields: Vec<&String> = r.personal.keys().collect();
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            r.driver_id.clone(),
            format!("updated (personal fields replaced: {fields:?})"),
        )
        .await?;
        after_change(&self.state).await;
        Ok(Response::new(view(&self.state, rec).await?))
    }

    async fn adjust_wallet(&self, req: Request<v1::AdjustWalletRequest>) -> Result<Response<v1::Driver>, Status> {
        let (who, _) = require_role(&self.state, &req, "adjust wallets", |r| {
            r.can_bill() || r == Role::Support
        })?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        let amount: Decimal = r
            .amount
            .parse()
            .map_err(|_| invalid(format!("amount {:?} is not a decimal", r.amount)))?;
        let reference = if r.reference.is_empty() {
            format!("manual-{}", hex::encode(rand::random::<[u8; 8]>()))
        } else if r.reference.len() > 128 || r.reference.chars().any(|c| c.is_control()) {
            return Err(invalid("reference: at most 128 printable characters"));
        } else {
            r.reference.clone()
        };
        let d = self.state.hub.drivers.clone();
        let (id, reference2) = (r.driver_id.clone(), reference.clone());
        blocking(move || d.adjust_wallet(&id, amount, &reference2, now())).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            r.driver_id.clone(),
            format!("wallet adjusted by {amount} (reference {reference})"),
        )
        .await?;
        let d = self.state.hub.drivers.clone();
        let rec = blocking(move || d.get(&r.driver_id)).await?;
        Ok(Response::new(view(&self.state, rec).await?))
    }

    async fn add_token(&self, req: Request<v1::AddTokenRequest>) -> Result<Response<v1::DriverToken>, Status> {
        let (who, _) = require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        let kind = TokenKind::parse(&r.kind).map_err(invalid)?;
        let expires = parse_time(&r.expires_at, "expires_at")?;
        let d = self.state.hub.drivers.clone();
        let (id, value) = (r.driver_id.clone(), r.value);
        let tok = blocking(move || d.add_token(&id, kind, &value, expires, now())).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            r.driver_id,
            format!("token {} added", tok.token_id),
        )
        .await?;
        after_change(&self.state).await;
        Ok(Response::new(token_info(&tok)))
    }

    async fn set_token_status(
        &self,
        req: Request<v1::SetTokenStatusRequest>,
    ) -> Result<Response<v1::DriverToken>, Status> {
        let (who, _) = require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        let status = TokenStatus::parse(&r.status).map_err(invalid)?;
        let d = self.state.hub.drivers.clone();
        let id = r.token_id.clone();
        let tok = blocking(move || d.set_token_status(&id, status, now())).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            tok.driver_id.clone(),
            format!("token {} set {}", tok.token_id, status.as_str()),
        )
        .await?;
        after_change(&self.state).await;
        Ok(Response::new(token_info(&tok)))
    }

    async fn remove_token(
        &self,
        req: Request<v1::RemoveTokenRequest>,
    ) -> Result<Response<v1::RemoveTokenResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let id = req.into_inner().token_id;
        let d = self.state.hub.drivers.clone();
        let t = id.clone();
        blocking(move || d.remove_token(&t)).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            id.clone(),
            "token removed".into(),
        )
        .await?;
        after_change(&self.state).await;
        Ok(Response::new(v1::RemoveTokenResponse {}))
    }

    async fn set_preferences(&self, req: Request<v1::SetPreferencesRequest>) -> Result<Response<v1::Driver>, Status> {
        require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        set_prefs(&self.state, r.driver_id, r.preferences).await
    }

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<v1::Driver>, Status> {
        require_role(&self.state, &req, "manage drivers", Role::can_manage_drivers)?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        watch(&self.state, r.driver_id, r.target, !r.stop).await
    }

    async fn export_driver(
        &self,
        req: Request<v1::ExportDriverRequest>,
    ) -> Result<Response<v1::ExportDriverResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, "export personal data", Role::can_read_personal_data)?;
        let id = req.into_inner().driver_id;
        check_driver_id(&id)?;
        audit(
            &self.state,
            AuditKind::PersonalDataRead,
            who.actor(),
            id.clone(),
            "exported (GDPR access)".into(),
        )
        .await?;
        let st = self.state.clone();
        let json = blocking(move || export_json(&st, &id)).await?;
        Ok(Response::new(v1::ExportDriverResponse { json }))
    }

    async fn erase_driver(&self, req: Request<v1::EraseDriverRequest>) -> Result<Response<v1::Driver>, Status> {
        let (who, _) = require_role(&self.state, &req, "erase personal data", Role::can_read_personal_data)?;
        let id = req.into_inner().driver_id;
        check_driver_id(&id)?;
        audit(
            &self.state,
            AuditKind::PersonalDataErased,
            who.actor(),
            id.clone(),
            "data key destroyed (erasure)".into(),
        )
        .await?;
        let d = self.state.hub.drivers.clone();
        let i = id.clone();
        let rec = blocking(move || d.erase(&i, now())).await?;
        tracing::info!(driver_id = %id, "driver erased");
        after_change(&self.state).await;
        Ok(Response::new(view(&self.state, rec).await?))
    }

    async fn driver_insights(
        &self,
        req: Request<v1::DriverInsightsRequest>,
    ) -> Result<Response<v1::JsonResponse>, Status> {
        require_role(&self.state, &req, "read drivers", |r| {
            r.can_manage_drivers() || r.can_read_billing()
        })?;
        let id = req.into_inner().driver_id;
        check_driver_id(&id)?;
        let st = self.state.clone();
        let json = blocking(move || -> Result<String, DriverError> {
            let rec = st.hub.drivers.get(&id)?;
            let history = st.hub.drivers.history(&id)?;
            let insights = driver_insights(&summaries(&st, &history));
            let doc = serde_json::json!({
                "driver_id": id,
                "insights": insights,
                "preferences": rec.preferences,
            });
            serde_json::to_string_pretty(&doc).map_err(|e| DriverError::Corrupted(e.to_string()))
        })
        .await?;
        Ok(Response::new(v1::JsonResponse { json }))
    }

    async fn site_utilisation(
        &self,
        req: Request<v1::SiteUtilisationRequest>,
    ) -> Result<Response<v1::JsonResponse>, Status> {
        require_role(&self.state, &req, "read sites", |r| {
            r.can_operate() || r.can_read_billing() || r == Role::Viewer
        })?;
        let r = req.into_inner();
        let days = if r.days == 0 { 30 } else { r.days.min(366) };
        let st = self.state.clone();
        let json = blocking(move || -> Result<String, DriverError> {
            let store = st.store.as_ref();
            let site = laddnet_actors::repo::get_site(store, &r.site_id)
                .map_err(|e| DriverError::Corrupted(e.to_string()))?
                .ok_or_else(|| DriverError::NotFound(format!("site {}", r.site_id)))?;
            let tz: chrono_tz::Tz = site.time_zone.parse().unwrap_or(chrono_tz::UTC);
            let to = now() * 1000;
            let from = to - i64::from(days) * 86_400_000;
            let ids: Vec<String> = laddnet_actors::repo::sessions_at_site(store, &r.site_id)
                .map_err(|e| DriverError::Corrupted(e.to_string()))?
                .into_iter()
                .filter(|s| s.last.at_ms >= from)
                .map(|s| s.transaction_id)
                .collect();
            let connectors: u32 = laddnet_actors::repo::chargers_at_site(store, &r.site_id)
                .map_err(|e| DriverError::Corrupted(e.to_string()))?
                .iter()
                .map(|c| c.connectors.len() as u32)
                .sum();
            let u = site_utilisation(&summaries(&st, &ids), connectors, tz, from, to);
            let doc = serde_json::json!({ "site_id": r.site_id, "time_zone": site.time_zone, "utilisation": u });
            serde_json::to_string_pretty(&doc).map_err(|e| DriverError::Corrupted(e.to_string()))
        })
        .await?;
        Ok(Response::new(v1::JsonResponse { json }))
    }

    async fn set_site_access(
        &self,
        req: Request<v1::SetSiteAccessRequest>,
    ) -> Result<Response<v1::SetSiteAccessResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, "change site access", Role::can_operate)?;
        let r = req.into_inner();
        laddnet_core::SiteId::new(r.site_id.clone()).map_err(invalid)?;
        let access = SiteAccess {
            private: r.private,
            groups: r.groups.into_iter().collect(),
        };
        let d = self.state.hub.drivers.clone();
        let (site, a) = (r.site_id.clone(), access.clone());
        blocking(move || d.set_site_access(&site, &a)).await?;
        audit(
            &self.state,
            AuditKind::DriverChanged,
            who.actor(),
            r.site_id,
            format!("site access: private={} groups={:?}", access.private, access.groups),
        )
        .await?;
        Ok(Response::new(v1::SetSiteAccessResponse {}))
    }

    async fn schedule_maintenance(
        &self,
        req: Request<v1::ScheduleMaintenanceRequest>,
    ) -> Result<Response<v1::ScheduleMaintenanceResponse>, Status> {
        require_role(&self.state, &req, "schedule maintenance", Role::can_operate)?;
        let r = req.into_inner();
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let (charger, site) = (opt(r.charger_id), opt(r.site_id));
        if charger.is_some() == site.is_some() {
            return Err(invalid("name exactly one of charger_id and site_id"));
        }
        let starts = parse_time(&r.starts_at, "starts_at")?.ok_or_else(|| invalid("starts_at is required"))?;
        let ends = parse_time(&r.ends_at, "ends_at")?.ok_or_else(|| invalid("ends_at is required"))?;
        if ends <= starts {
            return Err(invalid("ends_at must be after starts_at"));
        }
        if r.reason.trim().is_empty() || r.reason.len() > 200 {
            return Err(invalid("reason must be 1 to 200 characters"));
        }
        let (id, notified) = crate::drivers::schedule_maintenance(&self.state, charger, site, starts, ends, r.reason)
            .await
            .map_err(|e| Status::from(NodeError::Internal(e)))?;
        Ok(Response::new(v1::ScheduleMaintenanceResponse {
            maintenance_id: id,
            notified,
        }))
    }

    async fn issue_driver_credential(
        &self,
        req: Request<v1::IssueDriverCredentialRequest>,
    ) -> Result<Response<v1::IssueDriverCredentialResponse>, Status> {
        let (who, _) = require_role(&self.state, &req, "issue driver credentials", Role::can_manage_drivers)?;
        let r = req.into_inner();
        check_driver_id(&r.driver_id)?;
        let d = self.state.hub.drivers.clone();
        let id = r.driver_id.clone();
        let rec = blocking(move || d.get(&id)).await?;
        if rec.status == AccountStatus::Erased {
            return Err(NodeError::Precondition(format!("driver {} was erased", rec.driver_id)).into());
        }
        let ca = self.state.ca.clone();
        let actor = who.actor();
        let issued =
            blocking(move || ca.issue(&Subject::Driver { id: r.driver_id }, r.csr_pem.as_bytes(), &actor)).await?;
        Ok(Response::new(v1::IssueDriverCredentialResponse {
            certificate: Some(cert_info(&issued.record, self.state.ca.now())),
            chain_pem: issued.chain_pem,
        }))
    }
}

async fn set_prefs(
    state: &Arc<NodeState>,
    id: String,
    p: Option<v1::Preferences>,
) -> Result<Response<v1::Driver>, Status> {
    let prefs = prefs_from(p)?;
    let d = state.hub.drivers.clone();
    let rec = blocking(move || {
        d.update(&id, now(), |r| {
            r.preferences = prefs.clone();
            Ok(())
        })
    })
    .await?;
    Ok(Response::new(view(state, rec).await?))
}

async fn watch(state: &Arc<NodeState>, id: String, target: String, on: bool) -> Result<Response<v1::Driver>, Status> {
    let d = state.hub.drivers.clone();
    let rec = blocking(move || d.watch(&id, &target, on, now())).await?;
    Ok(Response::new(view(state, rec).await?))
}

/// The driver calling, from its certificate.
fn me<T>(state: &NodeState, req: &Request<T>) -> Result<String, Status> {
    match &caller(state, req)?.principal {
        Principal::Driver { id } => Ok(id.clone()),
        _ => Err(NodeError::Denied("only driver apps use DriverService".into()).into()),
    }
}

type NotificationStream = Pin<Box<dyn Stream<Item = Result<v1::Notification, Status>> + Send>>;

#[tonic::async_trait]
impl DriverService for DriverApp {
    type NotificationsStream = NotificationStream;

    async fn notifications(
        &self,
        req: Request<v1::NotificationsRequest>,
    ) -> Result<Response<Self::NotificationsStream>, Status> {
        let id = me(&self.state, &req)?;
        let mut after = req.into_inner().after_seq;
        // Subscribe first, then replay: nothing raised in between is missed
        // (duplicates are dropped by sequence number).
        let mut live = self.state.hub.live.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                let (st, d) = (state.clone(), id.clone());
                let backlog =
                    tokio::task::spawn_blocking(move || st.store.snapshot(|t| outbox::for_driver(t, &d, after, 500)))
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .unwrap_or_default();
                let full = backlog.len() == 500;
                for n in backlog {
                    after = after.max(n.seq);
                    if tx.send(Ok(notification_info(&n))).await.is_err() {
                        return;
                    }
                }
                if !full {
                    break;
                }
            }
            loop {
                let next = tokio::select! {
                    n = live.recv() => n,
                    _ = tx.closed() => return,
                    _ = state.shutdown.cancelled() => return,
                };
                match next {
                    Ok(n) if n.driver_id == id && n.seq > after => {
                        after = n.seq;
                        if tx.send(Ok(notification_info(&n))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind the live feed: catch up from the store.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let (st, d) = (state.clone(), id.clone());
                        let backlog = tokio::task::spawn_blocking(move || {
                            st.store.snapshot(|t| outbox::for_driver(t, &d, after, 500))
                        })
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .unwrap_or_default();
                        for n in backlog {
                            after = after.max(n.seq);
                            if tx.send(Ok(notification_info(&n))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_me(&self, req: Request<v1::GetMeRequest>) -> Result<Response<v1::Driver>, Status> {
        let id = me(&self.state, &req)?;
        let d = self.state.hub.drivers.clone();
        let i = id.clone();
        let rec = blocking(move || d.get(&i)).await?;
        let d = self.state.hub.drivers.clone();
        let personal = blocking(move || d.personal(&id)).await?;
        let st = self.state.clone();
        Ok(Response::new(
            blocking(move || driver_view(&st, &rec, Some(personal))).await?,
        ))
    }

    async fn export_me(&self, req: Request<v1::ExportMeRequest>) -> Result<Response<v1::ExportDriverResponse>, Status> {
        let id = me(&self.state, &req)?;
        audit(
            &self.state,
            AuditKind::PersonalDataRead,
            format!("driver:{id}"),
            id.clone(),
            "exported by the driver".into(),
        )
        .await?;
        let st = self.state.clone();
        let json = blocking(move || export_json(&st, &id)).await?;
        Ok(Response::new(v1::ExportDriverResponse { json }))
    }

    async fn set_my_preferences(
        &self,
        req: Request<v1::SetPreferencesRequest>,
    ) -> Result<Response<v1::Driver>, Status> {
        let id = me(&self.state, &req)?;
        set_prefs(&self.state, id, req.into_inner().preferences).await
    }

    async fn watch_me(&self, req: Request<v1::WatchRequest>) -> Result<Response<v1::Driver>, Status> {
        let id = me(&self.state, &req)?;
        let r = req.into_inner();
        watch(&self.state, id, r.target, !r.stop).await
    }
}
