//! Fault detection: the rules that raise and clear alarms, which
//! `laddnet-incidents` turns into incidents.
//!
//! - charger fault: a connector reports `Faulted` (with its error code);
//!   cleared when it reports any working status;
//! - offline: a charger's connection dropped and it did not return within
//!   `alarms.offline_after_s`; cleared when it reconnects;
//! - meter anomaly: a session's register went backwards or delivered more
//!   energy than the connector's power allows (possible tampering);
//!   resolved by an operator (it never clears by itself).

use std::sync::Arc;
use std::time::Duration;

use laddnet_core::charging::{ConnectorStatus, FLAG_ENERGY_EXCEEDS_CAPACITY, FLAG_REGISTER_BACKWARDS, SessionRecord};
use laddnet_incidents::{Alarm, AlarmKind, Change};
use laddnet_store::StoreExt;

use crate::state::NodeState;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

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

/// A charger (re)connected.
pub async fn on_attached(state: &Arc<NodeState>, charger_id: &str) {
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

/// After a meter event: the session's anomaly flags raise an alarm.
pub async fn on_record(state: &Arc<NodeState>, r: &SessionRecord) {
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
