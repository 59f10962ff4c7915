//! Notifications to drivers, persisted before delivery.
//!
//! Raising a notification is a store write (de-duplicated by a key the
//! raiser chooses, claimed in the same transaction), so nothing is lost
//! across restarts. Delivery reads the store: the driver's stream replays
//! from the last sequence number the app saw, and each webhook endpoint has
//! its own queue with attempts and the next retry time. Every notification
//! has an id a receiver uses to drop duplicates.
//!
//! | key | value |
//! |---|---|
//! | `("notif-seq",)` | u64, big-endian: the last sequence number |
//! | `("notif", driver, seq)` | [`Notification`] for the driver's stream |
//! | `("notif-hook", endpoint, seq)` | [`HookDelivery`]: waiting for a webhook |
//! | `("notif-dead", endpoint, seq)` | [`HookDelivery`]: gave up |
//! | `("notif-once", dedup)` | empty: raised already |

use laddnet_store::{Transaction, keys};
use serde::{Deserialize, Serialize};

use crate::model::{AccountStatus, Channel, DriverRecord};
use crate::{DriverError, key, load, save};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotificationKind {
    /// A watched charger or site has a connector available.
    Available,
    /// State of charge near the target, or the departure time is near.
    NearlyDone,
    /// The session ended; `amount` is what it cost.
    SessionEnded,
    /// A watched charger, or the one charging, is out of order.
    OutOfOrder,
    /// Maintenance is planned at a charger or site the driver uses.
    MaintenanceScheduled,
}

impl NotificationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Available => "available",
            NotificationKind::NearlyDone => "nearly-done",
            NotificationKind::SessionEnded => "session-ended",
            NotificationKind::OutOfOrder => "out-of-order",
            NotificationKind::MaintenanceScheduled => "maintenance-scheduled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// Stable and unique: receivers de-duplicate by it.
    pub id: String,
    pub seq: u64,
    pub driver_id: String,
    pub kind: NotificationKind,
    /// Unix seconds.
    pub created_at: i64,
    pub message: String,
    #[serde(default)]
    pub charger_id: Option<String>,
    #[serde(default)]
    pub site_id: Option<String>,
    #[serde(default)]
    pub connector_id: Option<u32>,
    #[serde(default)]
    pub transaction_id: Option<String>,
    /// The session's cost (session-ended) and currency.
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    /// A maintenance window, unix seconds.
    #[serde(default)]
    pub starts_at: Option<i64>,
    #[serde(default)]
    pub ends_at: Option<i64>,
}

impl Notification {
    /// A notification to fill in and pass to [`raise`]; id and seq are set there.
    pub fn new(kind: NotificationKind, driver_id: &str, created_at: i64, message: String) -> Self {
        Self {
            id: String::new(),
            seq: 0,
            driver_id: driver_id.into(),
            kind,
            created_at,
            message,
            charger_id: None,
            site_id: None,
            connector_id: None,
            transaction_id: None,
            amount: None,
            currency: None,
            starts_at: None,
            ends_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookDelivery {
    pub notification: Notification,
    pub attempts: u32,
    /// Unix milliseconds of the next attempt.
    pub next_at_ms: i64,
    #[serde(default)]
    pub last_error: String,
}

fn seq_key() -> Vec<u8> {
    keys::pack(&("notif-seq",))
}
fn stream_key(driver: &str, seq: u64) -> Vec<u8> {
    keys::pack(&("notif", driver, seq))
}
fn hook_key(endpoint: &str, seq: u64) -> Vec<u8> {
    keys::pack(&("notif-hook", endpoint, seq))
}
fn dead_key(endpoint: &str, seq: u64) -> Vec<u8> {
    keys::pack(&("notif-dead", endpoint, seq))
}
fn once_key(dedup: &str) -> Vec<u8> {
    keys::pack(&("notif-once", dedup))
}

/// Raises `n` unless `dedup` was raised before, for the driver's stream
/// and each webhook endpoint, as the driver's channels allow. Returns the
/// stored notification, or None when it was a duplicate or the driver is
/// erased or has turned every channel off.
pub fn raise(
    tx: &mut dyn Transaction,
    dedup: &str,
    mut n: Notification,
    endpoints: &[String],
    now_ms: i64,
) -> Result<Option<Notification>, DriverError> {
    let Some(drv) = load::<DriverRecord>(tx, &key::driver(&n.driver_id))? else {
        return Ok(None);
    };
    if drv.status == AccountStatus::Erased {
        return Ok(None);
    }
    let channels = &drv.preferences.channels;
    if channels.is_empty() {
        return Ok(None);
    }
    if !tx.claim_once(&once_key(dedup))? {
        return Ok(None);
    }
    let seq = match tx.get(&seq_key())? {
        Some(b) => u64::from_be_bytes(b.try_into().map_err(|_| DriverError::Corrupted("notif-seq".into()))?),
        None => 0,
    } + 1;
    tx.set(&seq_key(), &seq.to_be_bytes())?;
    n.seq = seq;
    n.id = format!("ntf-{seq:016}");
    if channels.contains(&Channel::Stream) {
        save(tx, &stream_key(&n.driver_id, seq), &n)?;
    }
    if channels.contains(&Channel::Webhook) {
        for e in endpoints {
            save(
                tx,
                &hook_key(e, seq),
                &HookDelivery {
                    notification: n.clone(),
                    attempts: 0,
                    next_at_ms: now_ms,
                    last_error: String::new(),
                },
            )?;
        }
    }
    Ok(Some(n))
}

/// The driver's notifications after `after_seq`, oldest first.
pub fn for_driver(
    tx: &mut dyn Transaction,
    driver: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<Notification>, DriverError> {
    let (_, e) = keys::tuple_range(&("notif", driver));
    let b = stream_key(driver, after_seq.saturating_add(1));
    tx.get_range(&b, &e, limit, false)?
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string())))
        .collect()
}

/// Webhook deliveries of `endpoint` due at `now_ms`, oldest first.
pub fn due(
    tx: &mut dyn Transaction,
    endpoint: &str,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<HookDelivery>, DriverError> {
    let (b, e) = keys::tuple_range(&("notif-hook", endpoint));
    let mut out = Vec::new();
    for (_, v) in tx.get_range(&b, &e, 0, false)? {
        let d: HookDelivery = serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string()))?;
        if d.next_at_ms <= now_ms {
            out.push(d);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Deliveries still waiting for `endpoint` (due or not).
pub fn pending(tx: &mut dyn Transaction, endpoint: &str) -> Result<usize, DriverError> {
    let (b, e) = keys::tuple_range(&("notif-hook", endpoint));
    Ok(tx.get_range(&b, &e, 0, false)?.len())
}

pub fn delivered(tx: &mut dyn Transaction, endpoint: &str, seq: u64) -> Result<(), DriverError> {
    tx.clear(&hook_key(endpoint, seq))?;
    Ok(())
}

/// Backoff after `attempts` failures: 0.5 s doubling, at most `max_ms`.
pub fn backoff_ms(attempts: u32, initial_ms: u64, max_ms: u64) -> u64 {
    initial_ms.saturating_mul(1u64 << attempts.min(30)).min(max_ms)
}

/// Records a failed attempt: retried after a backoff, or moved to the dead
/// letters after `max_attempts`.
pub fn failed(
    tx: &mut dyn Transaction,
    endpoint: &str,
    seq: u64,
    now_ms: i64,
    error: &str,
    next_in_ms: u64,
    max_attempts: u32,
) -> Result<(), DriverError> {
    let Some(mut d) = load::<HookDelivery>(tx, &hook_key(endpoint, seq))? else {
        return Ok(());
    };
    d.attempts += 1;
    d.last_error = error.chars().take(200).collect();
    d.next_at_ms = now_ms.saturating_add(next_in_ms as i64);
    if d.attempts >= max_attempts {
        tx.clear(&hook_key(endpoint, seq))?;
        save(tx, &dead_key(endpoint, seq), &d)
    } else {
        save(tx, &hook_key(endpoint, seq), &d)
    }
}

/// Drops everything queued for a driver (erasure).
pub fn forget_driver(tx: &mut dyn Transaction, driver: &str) -> Result<(), DriverError> {
    let (b, e) = keys::tuple_range(&("notif", driver));
    for (k, _) in tx.get_range(&b, &e, 0, false)? {
        tx.clear(&k)?;
    }
    for area in ["notif-hook", "notif-dead"] {
        let (b, e) = keys::tuple_range(&(area,));
        for (k, v) in tx.get_range(&b, &e, 0, false)? {
            let d: HookDelivery = serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string()))?;
            if d.notification.driver_id == driver {
                tx.clear(&k)?;
            }
        }
    }
    Ok(())
}
