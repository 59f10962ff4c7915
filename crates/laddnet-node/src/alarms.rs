//! Fault detection: the rules that raise and clear alarms, which
//! `laddnet-incidents` turns into incidents.
//!
//! - charger fault: a connector reports `Faulted` (with its error code);
//!   cleared when it reports any working status;
//! - offline: a charger's connection dropped and it did not return within
//!   `alarms.offline_after_s`; cleared when it reconnects;
//! - certificate expiring: a valid certificate with no successor within
//!   `alarms.certificate_expiry_days` of its end; resolved when it is
//!   renewed or revoked (checked every `alarms.certificate_check_s`);
//! - overload: a session's power above its connector's rating (by more
//!   than 5 %); cleared by a reading within it;
//! - flapping: `alarms.flap_reconnects` connections of one charger within
//!   `alarms.flap_window_s`; resolved after a window with fewer;
//! - meter anomaly: a session's register went backwards or delivered more
//!   energy than the connector's power allows (possible tampering);
//!   resolved by an operator (it never clears by itself).

use std::sync::Arc;
use std::time::Duration;

use laddnet_core::charging::{ConnectorStatus, FLAG_ENERGY_EXCEEDS_CAPACITY, FLAG_REGISTER_BACKWARDS, SessionRecord};
use laddnet_incidents::{Alarm, AlarmKind, Change};
use laddnet_store::StoreExt;

use crate::now_ms;
use crate::state::NodeState;

/// Raises an alarm (once per condition: repeats are absorbed).
pub async fn raise(state: &Arc<NodeState>, kind: AlarmKind, subject: String, detail: String) {
    let st = state.clone();
    let (s2, d2) = (subject.clone(), detail.clone());
    let r = tokio::task::spawn_blocking(move || {
        st.store.transact(|tx| {
            laddnet_incidents::raise(
                tx,
                &Alarm {
                    kind,
                    subject: &s2,
                    detail: &d2,
                    at_ms: now_ms(),
                },
            )
        })
    })
    .await;
    match r {
        Ok(Ok((i, Change::Opened | Change::Reopened | Change::Recurred))) => {
            tracing::warn!(incident = %i.id, kind = kind.as_str(), subject = %subject, detail = %detail, "incident opened");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "raising an alarm failed"),
        Err(e) => tracing::error!(error = %e, "raising an alarm failed"),
    }
}

/// The condition ended.
pub async fn clear(state: &Arc<NodeState>, kind: AlarmKind, subject: String, detail: &'static str) {
    let st = state.clone();
    let s2 = subject.clone();
    let r = tokio::task::spawn_blocking(move || {
        // Most working statuses and reconnects have nothing to clear: a read.
        if !st.store.snapshot(|tx| laddnet_incidents::is_live(tx, kind, &s2))? {
            return Ok(None);
        }
        st.store
            .transact(|tx| laddnet_incidents::clear(tx, kind, &s2, now_ms(), detail))
    })
    .await;
    match r {
        Ok(Ok(Some((i, Change::Cleared)))) => {
            tracing::info!(incident = %i.id, kind = kind.as_str(), subject = %subject, "incident resolved: the condition cleared");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "clearing an alarm failed"),
        Err(e) => tracing::error!(error = %e, "clearing an alarm failed"),
    }
}

/// A connector's status: `Faulted` raises, a working status clears.
pub async fn on_status(
    state: &Arc<NodeState>,
    charger_id: &str,
    connector_id: u32,
    status: ConnectorStatus,
    error_code: &str,
) {
    let subject = format!("connector:{charger_id}/{connector_id}");
    match status {
        ConnectorStatus::Faulted => {
            let detail = if error_code.is_empty() {
                "faulted (no error code)".to_string()
            } else {
                format!("faulted: {error_code}")
            };
            raise(state, AlarmKind::ChargerFault, subject, detail).await;
        }
        ConnectorStatus::Unavailable => {}
        _ => clear(state, AlarmKind::ChargerFault, subject, "the connector works again").await,
    }
}

/// Connection history, for availability.
async fn record_connection(state: &Arc<NodeState>, charger_id: &str, online: bool) {
    let (st, id) = (state.clone(), charger_id.to_string());
    let r = tokio::task::spawn_blocking(move || {
        laddnet_actors::repo::record_connection(st.store.as_ref(), &id, online, now_ms())
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!(error = %e, "recording the connection history failed");
    }
}

/// A charger (re)connected.
pub async fn on_attached(state: &Arc<NodeState>, charger_id: &str) {
    record_connection(state, charger_id, true).await;
    flapping(state, charger_id).await;
    clear(
        state,
        AlarmKind::Offline,
        format!("charger:{charger_id}"),
        "reconnected",
    )
    .await;
}

/// A charger's connection ended: offline unless it is back in time.
pub fn on_detached(state: &Arc<NodeState>, charger_id: &str) {
    let (state, id) = (state.clone(), charger_id.to_string());
    let after = Duration::from_secs(state.config.alarms.offline_after_s);
    tokio::spawn(async move {
        record_connection(&state, &id, false).await;
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(after) => {}
        }
        if state.chargers.connection(&id).is_none() {
            raise(
                &state,
                AlarmKind::Offline,
                format!("charger:{id}"),
                format!("no connection for {} s", after.as_secs()),
            )
            .await;
        }
    });
}

/// After a meter event: the session's anomaly flags raise an alarm, and
/// power above the connector's rating (by more than 5 %) is an overload
/// until a reading is back within it.
pub async fn on_record(state: &Arc<NodeState>, r: &SessionRecord) {
    if r.max_power_w > 0 && r.status == laddnet_core::charging::SessionStatus::Active {
        let subject = format!("connector:{}/{}", r.charger_id, r.connector_id);
        let over = u64::from(r.power_w) * 100 > u64::from(r.max_power_w) * 105;
        let known = state
            .overloaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&subject);
        if over {
            state
                .overloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(subject.clone());
            if !known {
                let detail = format!("{} W on a {} W connector", r.power_w, r.max_power_w);
                raise(state, AlarmKind::Overload, subject, detail).await;
            }
        } else if known {
            state
                .overloaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&subject);
            clear(state, AlarmKind::Overload, subject, "power back within the rating").await;
        }
    }
    let found: Vec<&str> = [FLAG_REGISTER_BACKWARDS, FLAG_ENERGY_EXCEEDS_CAPACITY]
        .into_iter()
        .filter(|f| r.flags.contains(*f))
        .collect();
    if !found.is_empty() {
        raise(
            state,
            AlarmKind::MeterAnomaly,
            format!("session:{}", r.transaction_id),
            format!("{} at charger {}", found.join(", "), r.charger_id),
        )
        .await;
    }
}

/// Checks certificates now and then (see the module docs).
pub async fn certificate_watch(state: Arc<NodeState>, shutdown: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs(state.config.alarms.certificate_check_s);
    loop {
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || check_certificates(&st)).await;
        match r {
            Ok(Ok((raise_now, clear_now))) => {
                for (subject, detail) in raise_now {
                    raise(&state, AlarmKind::CertificateExpiring, subject, detail).await;
                }
                for subject in clear_now {
                    clear(&state, AlarmKind::CertificateExpiring, subject, "renewed or revoked").await;
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "checking certificates failed"),
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

type Subjects = (Vec<(String, String)>, Vec<String>);

fn check_certificates(state: &NodeState) -> Result<Subjects, laddnet_pki::PkiError> {
    use laddnet_pki::CertStatus;
    let now = state.ca.now();
    let horizon = i64::from(state.config.alarms.certificate_expiry_days) * 86_400;
    let (all, _) = state.ca.list(&laddnet_pki::CertFilter::default(), None, usize::MAX)?;
    let renewed: std::collections::HashSet<&str> = all.iter().filter_map(|c| c.renewed_from.as_deref()).collect();
    let (mut raise_now, mut clear_now) = (Vec::new(), Vec::new());
    for c in &all {
        let subject = format!("certificate:{}", c.serial);
        let done = renewed.contains(c.serial.as_str()) || c.status(now) == CertStatus::Revoked;
        if done {
            clear_now.push(subject);
        } else if c.status(now) == CertStatus::Valid && c.not_after - now < horizon {
            let days = (c.not_after - now).div_euclid(86_400);
            raise_now.push((
                subject,
                format!(
                    "{} certificate of {} expires in {days} days",
                    c.profile.as_str(),
                    c.subject
                ),
            ));
        }
    }
    Ok((raise_now, clear_now))
}

/// Counts this connection; raises flapping at the threshold and, a window
/// later, clears it if the charger has calmed down.
async fn flapping(state: &Arc<NodeState>, charger_id: &str) {
    let cfg = &state.config.alarms;
    let window = Duration::from_secs(cfg.flap_window_s);
    let now = std::time::Instant::now();
    let recent = {
        let mut m = state.connects.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry(charger_id.to_string()).or_default();
        q.push_back(now);
        while q.front().is_some_and(|t| now.duration_since(*t) > window) {
            q.pop_front();
        }
        q.len()
    };
    if recent < cfg.flap_reconnects as usize {
        return;
    }
    raise(
        state,
        AlarmKind::Flapping,
        format!("charger:{charger_id}"),
        format!("{recent} connections within {} s", window.as_secs()),
    )
    .await;
    if recent > cfg.flap_reconnects as usize {
        // A watcher from when the threshold was reached is on it.
        return;
    }
    let (state, id) = (state.clone(), charger_id.to_string());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(window) => {}
            }
            let calm = {
                let m = state.connects.lock().unwrap_or_else(|p| p.into_inner());
                let now = std::time::Instant::now();
                m.get(&id)
                    .map(|q| q.iter().filter(|t| now.duration_since(**t) <= window).count())
                    .unwrap_or(0)
                    < state.config.alarms.flap_reconnects as usize
            };
            if calm {
                clear(
                    &state,
                    AlarmKind::Flapping,
                    format!("charger:{id}"),
                    "the connection is stable",
                )
                .await;
                return;
            }
        }
    });
}
