//! The node's side of drivers: the vault's master keys, authorization at
//! the charger, after-the-fact authorization of offline starts, offline
//! lists pushed to chargers, the notifications raised by what chargers
//! report, and their delivery (driver streams and signed webhooks).

use std::sync::Arc;
use std::time::Duration;

use laddnet_core::charging::{ConnectorStatus, SessionRecord, SessionStatus};
use laddnet_drivers::authz::{AuthDecision, AuthRequest, AuthStatus};
use laddnet_drivers::outbox::{self, Notification, NotificationKind};
use laddnet_drivers::{Drivers, TokenKind, locallist};
use laddnet_proto::v1;
use laddnet_store::{SharedStore, StoreExt, keys};
use laddnet_vault::{LocalMasterKeys, Vault};
use rust_decimal::Decimal;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, WebhookConfig};
use crate::now_ms;
use crate::state::NodeState;

/// Drivers, their vault, and the notification plumbing.
pub struct DriverHub {
    pub drivers: Drivers,
    /// Every notification raised, for live driver streams.
    pub live: broadcast::Sender<Notification>,
    /// Wakes the webhook worker.
    pub wake: Notify,
    pub endpoints: Vec<String>,
    pub min_wallet_balance: Decimal,
    /// What a start reserves on a wallet or pre-authorizes on a card.
    pub payment_hold: Decimal,
}

/// Opens the vault: master keys from `drivers.master_key_dir` (created on
/// first start) and `LADDNET_MASTER_KEYS`.
pub fn open_hub(config: &NodeConfig, store: SharedStore) -> anyhow::Result<DriverHub> {
    let keys = LocalMasterKeys::load(&config.master_key_dir(), true)?;
    let vault = Vault::load(store.as_ref(), Arc::new(keys))?;
    let (live, _) = broadcast::channel(1024);
    Ok(DriverHub {
        drivers: Drivers::new(store, vault),
        live,
        wake: Notify::new(),
        endpoints: config.notifications.webhooks.iter().map(|w| w.name.clone()).collect(),
        min_wallet_balance: config.drivers.min_wallet_balance.parse().unwrap_or(Decimal::from(5)),
        payment_hold: config.drivers.payment_hold.parse().unwrap_or(Decimal::from(20)),
    })
}

pub fn token_kind(t: i32) -> TokenKind {
    match v1::TokenType::try_from(t) {
        Ok(v1::TokenType::App) => TokenKind::App,
        Ok(v1::TokenType::Contract) => TokenKind::Contract,
        _ => TokenKind::Rfid,
    }
}

pub fn status_to_proto(s: AuthStatus) -> v1::AuthorizationStatus {
    use v1::AuthorizationStatus as P;
    match s {
        AuthStatus::Accepted => P::Accepted,
        AuthStatus::Unknown => P::Unknown,
        AuthStatus::Blocked => P::Blocked,
        AuthStatus::Expired => P::Expired,
        AuthStatus::InsufficientFunds => P::InsufficientFunds,
        AuthStatus::PrivateSite => P::PrivateSite,
        AuthStatus::ConcurrentLimit => P::ConcurrentLimit,
        AuthStatus::PriceAboveMaximum => P::PriceAboveMaximum,
        AuthStatus::NoPaymentMethod => P::NoPaymentMethod,
    }
}

/// Decides whether `token` may start at this charger now.
pub async fn authorize(
    state: &Arc<NodeState>,
    charger_id: &str,
    site_id: Option<String>,
    kind: TokenKind,
    token: String,
    connector_id: u32,
    session: Option<String>,
) -> Result<AuthDecision, String> {
    let (state, charger_id) = (state.clone(), charger_id.to_string());
    let local = state.store.local_reads();
    let decide = move || {
        let now = now_ms();
        let price = laddnet_ledger::cdr::energy_price_at(
            state.store.as_ref(),
            &charger_id,
            site_id.as_deref(),
            connector_id,
            now,
        )
        .map_err(|e| e.to_string())?;
        state
            .hub
            .drivers
            .authorize(&AuthRequest {
                kind,
                value: &token,
                site_id: site_id.as_deref(),
                price_per_kwh: price,
                now: now / 1000,
                min_wallet_balance: state.hub.min_wallet_balance,
                session: session.as_deref(),
            })
            .map_err(|e| e.to_string())
    };
    // Two reads (the price, the token's blind index and driver), no write.
    crate::state::store_read(local, decide)
        .await
        .map_err(|e| e.to_string())?
}

/// A session of a driver has started: reserve its payment (a wallet hold,
/// a card pre-authorization). A wallet that cannot cover it (an offline
/// start) is still attached, so the CDR takes what it has then.
pub async fn hold_payment(state: &Arc<NodeState>, driver: String, session: String) {
    use laddnet_drivers::PaymentKind;
    use laddnet_ledger::payments::{AuthorizeRequest, CardIntents, PaymentProvider, Wallet};
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<Option<String>, String> {
        let drv = st.hub.drivers.get(&driver).map_err(|e| e.to_string())?;
        let provider: &dyn PaymentProvider = match drv.payment {
            PaymentKind::Wallet => &Wallet,
            PaymentKind::Card | PaymentKind::MobileWallet => &CardIntents,
            PaymentKind::Invoice | PaymentKind::None => return Ok(None),
        };
        let at = now_ms() / 1000;
        let req = AuthorizeRequest {
            driver: &driver,
            session: &session,
            currency: &drv.currency,
            minimum: st.hub.min_wallet_balance,
            hold: st.hub.payment_hold,
            at,
        };
        st.store
            .transact(|tx| match provider.authorize(tx, &req) {
                Ok(h) => Ok(Some(format!("{} {} held by {}", h.amount, h.currency, provider.name()))),
                Err(laddnet_ledger::LedgerError::Declined(why)) => {
                    Wallet.attach(tx, &driver, &session, &drv.currency, at)?;
                    Ok(Some(format!("not held: {why}")))
                }
                Err(e) => Err(e),
            })
            .map_err(|e| e.to_string())
    })
    .await;
    match r {
        Ok(Ok(Some(what))) => tracing::debug!(outcome = %what, "session payment"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "placing the payment hold failed"),
        Err(e) => tracing::error!(error = %e, "placing the payment hold failed"),
    }
}

/// Whether a refusal means the token itself may not charge (as opposed to
/// funds, price or limits, which an offline start is not held to).
pub fn token_refused(s: AuthStatus) -> bool {
    matches!(s, AuthStatus::Unknown | AuthStatus::Blocked | AuthStatus::Expired)
}

/// Raises notifications (each de-duplicated by its key), then tells live
/// streams and the webhook worker.
pub async fn raise(state: &Arc<NodeState>, items: Vec<(String, Notification)>) {
    if items.is_empty() {
        return;
    }
    let st = state.clone();
    let raised = tokio::task::spawn_blocking(move || {
        let endpoints = st.hub.endpoints.clone();
        let mut out = Vec::new();
        for (dedup, n) in items {
            match st
                .store
                .transact(|tx| outbox::raise(tx, &dedup, n.clone(), &endpoints, now_ms()))
            {
                Ok(Some(n)) => out.push(n),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "could not raise a notification"),
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    for n in raised {
        tracing::info!(notification_id = %n.id, kind = n.kind.as_str(), driver_id = %n.driver_id, "notification raised");
        let _ = state.hub.live.send(n);
    }
    state.hub.wake.notify_one();
}

fn drivers_for(state: &NodeState, targets: &[String], also: &[String]) -> Vec<String> {
    let mut out: Vec<String> = also.to_vec();
    let r = state.store.snapshot(|tx| {
        for t in targets {
            out.extend(state.hub.drivers.watchers(tx, t)?);
        }
        Ok::<_, laddnet_drivers::DriverError>(())
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "reading watchers failed");
    }
    out.sort();
    out.dedup();
    out
}

/// Drivers with an open session at `charger_id`.
fn charging_at(state: &NodeState, charger_id: &str) -> Vec<String> {
    let ids = laddnet_actors::repo::open_sessions(state.store.as_ref(), charger_id).unwrap_or_default();
    ids.iter()
        .filter_map(|id| {
            laddnet_actors::repo::get_session(state.store.as_ref(), id)
                .ok()
                .flatten()
        })
        .filter_map(|s| s.driver_id)
        .collect()
}

/// A connector changed status: "available" to watchers, "out of order" to
/// watchers and whoever is charging there.
pub async fn on_status(
    state: &Arc<NodeState>,
    charger_id: &str,
    site_id: Option<&str>,
    connector_id: u32,
    status: ConnectorStatus,
    at_ms: i64,
) {
    let kind = match status {
        ConnectorStatus::Available => NotificationKind::Available,
        ConnectorStatus::Faulted | ConnectorStatus::Unavailable => NotificationKind::OutOfOrder,
        _ => return,
    };
    let st = state.clone();
    let (charger, site) = (charger_id.to_string(), site_id.map(str::to_string));
    let drivers = tokio::task::spawn_blocking(move || {
        let mut targets = vec![format!("charger:{charger}")];
        if let Some(s) = &site {
            targets.push(format!("site:{s}"));
        }
        let also = if kind == NotificationKind::OutOfOrder {
            charging_at(&st, &charger)
        } else {
            vec![]
        };
        drivers_for(&st, &targets, &also)
    })
    .await
    .unwrap_or_default();
    let now = now_ms() / 1000;
    let items = drivers
        .into_iter()
        .map(|d| {
            let message = match kind {
                NotificationKind::Available => format!("Charger {charger_id} connector {connector_id} is available"),
                _ => format!("Charger {charger_id} connector {connector_id} is out of order"),
            };
            let mut n = Notification::new(kind, &d, now, message);
            n.charger_id = Some(charger_id.into());
            n.site_id = site_id.map(str::to_string);
            n.connector_id = Some(connector_id);
            (format!("{}/{charger_id}/{connector_id}/{at_ms}/{d}", kind.as_str()), n)
        })
        .collect();
    raise(state, items).await;
}

/// After a meter event: "nearly done" when the state of charge is near
/// the driver's target, or departure is minutes away.
pub async fn on_event(state: &Arc<NodeState>, record: &SessionRecord) {
    let (Some(driver), SessionStatus::Active) = (record.driver_id.clone(), record.status) else {
        return;
    };
    let Ok(drv) = ({
        let st = state.clone();
        let d = driver.clone();
        tokio::task::spawn_blocking(move || st.hub.drivers.get(&d))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
    }) else {
        return;
    };
    let cfg = &state.config.notifications;
    let p = &drv.preferences;
    let soc_near =
        matches!((p.target_soc_percent, record.soc_percent), (Some(t), Some(s)) if s + cfg.nearly_done_soc_margin >= t);
    let departure_near = p
        .departure
        .as_deref()
        .and_then(laddnet_drivers::parse_hhmm)
        .is_some_and(|dep| {
            let tz = site_tz(state, record.site_id.as_deref());
            let now = chrono::Utc::now().with_timezone(&tz);
            use chrono::Timelike;
            let minutes = now.hour() * 60 + now.minute();
            let until = (dep + 24 * 60 - minutes) % (24 * 60);
            until <= cfg.nearly_done_minutes
        });
    if !(soc_near || departure_near) {
        return;
    }
    let message = match record.soc_percent {
        Some(s) if soc_near => format!("Charging is nearly done: {s}% at charger {}", record.charger_id),
        _ => format!(
            "Charging is nearly done: departure is near, charger {}",
            record.charger_id
        ),
    };
    let mut n = Notification::new(NotificationKind::NearlyDone, &driver, now_ms() / 1000, message);
    n.charger_id = Some(record.charger_id.clone());
    n.site_id = record.site_id.clone();
    n.connector_id = Some(record.connector_id);
    n.transaction_id = Some(record.transaction_id.clone());
    raise(state, vec![(format!("nearly-done/{}", record.transaction_id), n)]).await;
}

/// The driver's departure (a daily HH:MM in the site's zone) as the
/// first such moment after `after_ms`, in Unix ms; blocking.
pub(crate) fn departure_ms(state: &NodeState, driver_id: &str, site: Option<&str>, after_ms: i64) -> Option<i64> {
    use chrono::TimeZone;
    let drv = state.hub.drivers.get(driver_id).ok()?;
    let minutes = laddnet_drivers::parse_hhmm(drv.preferences.departure.as_deref()?)?;
    let tz = site_tz(state, site);
    let after = chrono::Utc.timestamp_millis_opt(after_ms).single()?.with_timezone(&tz);
    let day = after.date_naive();
    for d in [day, day.succ_opt()?] {
        let naive = d.and_hms_opt(minutes / 60, minutes % 60, 0)?;
        if let Some(t) = tz.from_local_datetime(&naive).earliest()
            && t.timestamp_millis() > after_ms
        {
            return Some(t.timestamp_millis());
        }
    }
    None
}

fn site_tz(state: &NodeState, site: Option<&str>) -> chrono_tz::Tz {
    site.and_then(|s| laddnet_actors::repo::get_site(state.store.as_ref(), s).ok().flatten())
        .and_then(|s| s.time_zone.parse().ok())
        .unwrap_or(chrono_tz::UTC)
}

/// Session-ended notifications, from the markers the ledger writes with
/// each CDR of a driver's session: raised and cleared together, so each is
/// raised once, whoever billed the session and whenever.
pub async fn pump_session_ended(state: &Arc<NodeState>) -> usize {
    let st = state.clone();
    let raised = tokio::task::spawn_blocking(move || {
        let endpoints = st.hub.endpoints.clone();
        let (b, e) = keys::tuple_range(&("cdr-notify",));
        let rows = st
            .store
            .snapshot(|tx| tx.get_range(&b, &e, 100, false))
            .unwrap_or_default();
        let mut out = Vec::new();
        for (k, _) in rows {
            let Ok((_, tx_id)) = keys::unpack::<(String, String)>(&k) else {
                continue;
            };
            let Ok(Some(cdr)) = laddnet_ledger::cdr::get_cdr(st.store.as_ref(), &tx_id) else {
                let _ = st.store.transact(|tx| tx.clear(&k));
                continue;
            };
            let r = st.store.transact(|tx| {
                tx.clear(&k)?;
                let Some(driver) = &cdr.driver_ref else { return Ok(None) };
                let mut n = Notification::new(
                    NotificationKind::SessionEnded,
                    driver,
                    now_ms() / 1000,
                    format!(
                        "Charging ended at {}: {} kWh, {} {}",
                        cdr.charger_id,
                        Decimal::from(cdr.energy_wh) / Decimal::from(1000),
                        cdr.total_incl_vat,
                        cdr.currency
                    ),
                );
                n.charger_id = Some(cdr.charger_id.clone());
                n.site_id = cdr.site_id.clone();
                n.connector_id = Some(cdr.connector_id);
                n.transaction_id = Some(tx_id.clone());
                n.amount = Some(cdr.total_incl_vat.to_string());
                n.currency = Some(cdr.currency.clone());
                outbox::raise(tx, &format!("ended/{tx_id}"), n, &endpoints, now_ms())
            });
            match r {
                Ok(Some(n)) => out.push(n),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "raising session-ended failed"),
            }
        }
        out
    })
    .await
    .unwrap_or_default();
    let n = raised.len();
    for x in raised {
        let _ = state.hub.live.send(x);
    }
    if n > 0 {
        state.hub.wake.notify_one();
    }
    n
}

/// Plans maintenance and notifies the drivers who watch the place or
/// charged there in the last 90 days.
pub async fn schedule_maintenance(
    state: &Arc<NodeState>,
    charger_id: Option<String>,
    site_id: Option<String>,
    starts_at: i64,
    ends_at: i64,
    reason: String,
) -> Result<(String, u32), String> {
    let st = state.clone();
    let id = format!("mnt-{}", hex::encode(rand::random::<[u8; 6]>()));
    let (c2, s2, r2, id2) = (charger_id.clone(), site_id.clone(), reason.clone(), id.clone());
    let drivers = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
        let window = serde_json::json!({
            "maintenance_id": id2, "charger_id": c2, "site_id": s2,
            "starts_at": starts_at, "ends_at": ends_at, "reason": r2,
        });
        st.store
            .transact(|tx| {
                tx.set(
                    &keys::pack(&("maintenance", id2.as_str())),
                    window.to_string().as_bytes(),
                )
            })
            .map_err(|e| e.to_string())?;
        let mut targets = Vec::new();
        if let Some(c) = &c2 {
            targets.push(format!("charger:{c}"));
        }
        if let Some(s) = &s2 {
            targets.push(format!("site:{s}"));
        }
        let since_ms = (time::OffsetDateTime::now_utc().unix_timestamp() - 90 * 86_400) * 1000;
        // The drivers who charged there in the last 90 days, from the
        // charger's and the site's session indices.
        let store = st.store.as_ref();
        let mut sessions = Vec::new();
        if let Some(c) = &c2 {
            sessions.extend(laddnet_actors::repo::sessions_of_charger(store, c).map_err(|e| e.to_string())?);
        }
        if let Some(s) = &s2 {
            sessions.extend(laddnet_actors::repo::sessions_at_site(store, s).map_err(|e| e.to_string())?);
        }
        let users: Vec<String> = sessions
            .into_iter()
            .filter(|s| s.first.at_ms >= since_ms)
            .filter_map(|s| s.driver_id)
            .collect();
        Ok(drivers_for(&st, &targets, &users))
    })
    .await
    .map_err(|e| e.to_string())??;
    let place = match (&charger_id, &site_id) {
        (Some(c), _) => format!("charger {c}"),
        (None, Some(s)) => format!("site {s}"),
        _ => String::new(),
    };
    let count = drivers.len() as u32;
    let items = drivers
        .into_iter()
        .map(|d| {
            let mut n = Notification::new(
                NotificationKind::MaintenanceScheduled,
                &d,
                now_ms() / 1000,
                format!("Maintenance at {place}: {reason}"),
            );
            n.charger_id = charger_id.clone();
            n.site_id = site_id.clone();
            n.starts_at = Some(starts_at);
            n.ends_at = Some(ends_at);
            (format!("maintenance/{id}/{d}"), n)
        })
        .collect();
    raise(state, items).await;
    Ok((id, count))
}

/// The offline-list update a charger at `from` needs, if any.
pub async fn list_update(state: &Arc<NodeState>, from: u64) -> Option<v1::LocalListUpdate> {
    let st = state.clone();
    let u = crate::state::store_read(state.store.local_reads(), move || {
        st.store.snapshot(|tx| locallist::since(tx, from))
    })
    .await
    .ok()?
    .ok()?;
    if u.version == from {
        return None;
    }
    Some(v1::LocalListUpdate {
        from_version: u.from,
        version: u.version,
        full: u.full,
        list_key: if u.full {
            state.hub.drivers.vault.list_key().to_vec()
        } else {
            vec![]
        },
        entries: u
            .changes
            .into_iter()
            .map(|c| v1::LocalListEntry {
                hash: c.hash,
                status: match c.entry.as_ref().map(|e| e.status) {
                    None => v1::AuthorizationStatus::Unspecified,
                    Some(locallist::ListStatus::Accepted) => v1::AuthorizationStatus::Accepted,
                    Some(locallist::ListStatus::Blocked) => v1::AuthorizationStatus::Blocked,
                    Some(locallist::ListStatus::Expired) => v1::AuthorizationStatus::Expired,
                } as i32,
                expires_at: c.entry.and_then(|e| e.expires_at).unwrap_or(0),
            })
            .collect(),
    })
}

/// Sends every connected charger the list changes it has not seen.
pub async fn push_local_lists(state: &Arc<NodeState>) {
    for (id, outbound) in state.chargers.all_outbound() {
        let from = outbound.list_version.load(std::sync::atomic::Ordering::Acquire);
        if let Some(u) = list_update(state, from).await {
            let version = u.version;
            let msg = v1::CentralMessage {
                msg_id: 0,
                payload: Some(v1::central_message::Payload::LocalList(u)),
            };
            if outbound.tx.send(Box::new(Ok(msg))).await.is_ok() {
                outbound
                    .list_version
                    .store(version, std::sync::atomic::Ordering::Release);
                tracing::debug!(charger_id = %id, version, "offline list sent");
            }
        }
    }
}

/// Delivers webhook notifications: each endpoint's due deliveries, signed,
/// retried with backoff, until the shutdown.
pub async fn webhook_worker(state: Arc<NodeState>, shutdown: CancellationToken) {
    let hooks: Vec<(WebhookConfig, Vec<u8>)> = state
        .config
        .notifications
        .webhooks
        .iter()
        .filter_map(|w| match read_secret(&w.secret_file) {
            Ok(s) => Some((w.clone(), s)),
            Err(e) => {
                tracing::error!(webhook = %w.name, error = %e, "webhook disabled: cannot read its secret");
                None
            }
        })
        .collect();
    if hooks.is_empty() {
        return;
    }
    let cfg = state.config.notifications.clone();
    loop {
        let mut next_wait = Duration::from_millis(cfg.retry_initial_ms.min(1_000));
        for (hook, secret) in &hooks {
            let st = state.clone();
            let name = hook.name.clone();
            let due = tokio::task::spawn_blocking(move || st.store.snapshot(|tx| outbox::due(tx, &name, now_ms(), 50)))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            for d in due {
                let n = &d.notification;
                let result = post(hook, secret, n, Duration::from_millis(cfg.timeout_ms)).await;
                let st = state.clone();
                let (name, seq, attempts) = (hook.name.clone(), n.seq, d.attempts);
                let cfg2 = cfg.clone();
                let outcome = result.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    st.store.transact(|tx| match &outcome {
                        Ok(()) => outbox::delivered(tx, &name, seq),
                        Err(e) => outbox::failed(
                            tx,
                            &name,
                            seq,
                            now_ms(),
                            e,
                            outbox::backoff_ms(attempts, cfg2.retry_initial_ms, cfg2.retry_max_ms),
                            cfg2.max_attempts,
                        ),
                    })
                })
                .await;
                match result {
                    Ok(()) => tracing::info!(webhook = %hook.name, notification_id = %n.id, "webhook delivered"),
                    Err(e) => {
                        tracing::warn!(webhook = %hook.name, notification_id = %n.id, attempt = attempts + 1, error = %e, "webhook failed; will retry");
                        next_wait = next_wait.min(Duration::from_millis(cfg.retry_initial_ms));
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.hub.wake.notified() => {}
            _ = tokio::time::sleep(next_wait) => {}
        }
    }
}

fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: mode {:o} lets others read it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = s.trim();
    if s.len() < 16 {
        return Err(format!("{}: the secret must be at least 16 characters", path.display()));
    }
    Ok(s.as_bytes().to_vec())
}

/// `sha256=<hex HMAC-SHA-256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut msg = timestamp.to_string().into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    format!("sha256={}", hex::encode(laddnet_vault::hmac(secret, &[&msg])))
}

async fn post(hook: &WebhookConfig, secret: &[u8], n: &Notification, timeout: Duration) -> Result<(), String> {
    let body = serde_json::to_vec(n).map_err(|e| e.to_string())?;
    let ts = time::OffsetDateTime::now_utc().unix_timestamp();
    let sig = signature(secret, ts, &body);
    tokio::time::timeout(timeout, crate::webhook::post_json(&hook.url, &body, &n.id, ts, &sig))
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Deletes ended sessions past `drivers.session_retention_days`.
pub async fn retention_sweeper(state: Arc<NodeState>, shutdown: CancellationToken) {
    let days = state.config.drivers.session_retention_days;
    if days == 0 {
        return;
    }
    let every = Duration::from_secs(state.config.drivers.retention_sweep_s);
    loop {
        let st = state.clone();
        let cutoff_ms = (time::OffsetDateTime::now_utc().unix_timestamp() - i64::from(days) * 86_400) * 1000;
        match tokio::task::spawn_blocking(move || {
            laddnet_actors::repo::purge_ended_before(st.store.as_ref(), cutoff_ms)
        })
        .await
        {
            Ok(Ok(n)) if n > 0 => tracing::info!(sessions = n, days, "sessions past retention deleted"),
            Ok(Err(e)) => tracing::error!(error = %e, "retention sweep failed"),
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Raises the session-ended notifications the ledger marked, every 200 ms.
pub async fn notification_pump(state: Arc<NodeState>, shutdown: CancellationToken) {
    loop {
        pump_session_ended(&state).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Moves every data key under the current master-key version, 100 drivers
/// per transaction, from where the last run stopped (the cursor is in the
/// store, so a crash or a restart resumes). A no-op once done.
pub async fn vault_rewrapper(state: Arc<NodeState>, shutdown: CancellationToken) {
    let st = state.clone();
    let done = tokio::task::spawn_blocking(move || st.hub.drivers.vault.rewrap_done(st.store.as_ref())).await;
    if matches!(done, Ok(Ok(true))) {
        return;
    }
    let mut announced = false;
    loop {
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || st.hub.drivers.vault.rewrap(st.store.as_ref(), 100, Some(1))).await;
        match r {
            Ok(Ok(c)) => {
                // A first start (nothing to move) says nothing.
                if !announced && (c.moved > 0 || !c.finished) {
                    tracing::info!(
                        master_version = c.target,
                        "rewrapping data keys under the current master key"
                    );
                    announced = true;
                }
                if c.finished {
                    if announced {
                        tracing::info!(master_version = c.target, keys_moved = c.moved, "rewrap finished");
                    }
                    return;
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "rewrap failed; retrying in 10 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
            Err(_) => return,
        }
        if shutdown.is_cancelled() {
            return;
        }
        tokio::task::yield_now().await;
    }
}
