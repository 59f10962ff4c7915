//! The offline authorization list chargers keep, so known drivers can start
//! while a charger is offline (OCPP's local authorization list).
//!
//! Entries are keyed by [`laddnet_vault::Vault::list_hash`] of the token
//! value, never the value: a charger hashes the token it reads with the
//! list key it was given and looks the hash up. Every change bumps the list
//! version and is logged, so a charger that reports version N receives only
//! the changes after N (or the whole list, when it is too far behind).
//!
//! | key | value |
//! |---|---|
//! | `("authlist", "version")` | u64, big-endian |
//! | `("authlist-entry", hash)` | [`ListEntry`] |
//! | `("authlist-log", version)` | [`ListChange`] |

use laddnet_store::{Transaction, keys};
use serde::{Deserialize, Serialize};

use crate::model::{AccountStatus, DriverRecord, TokenRecord, TokenStatus};
use crate::{DriverError, load, save};

/// A charger this many changes behind gets the whole list instead.
pub const MAX_DIFF: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListStatus {
    Accepted,
    Blocked,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub status: ListStatus,
    /// Unix seconds after which the charger must treat the entry as expired.
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListChange {
    pub hash: String,
    /// None: the entry was removed.
    pub entry: Option<ListEntry>,
}

/// What a charger at `from` needs to reach `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListUpdate {
    pub from: u64,
    pub version: u64,
    /// The charger must replace its list with `changes` (all entries).
    pub full: bool,
    pub changes: Vec<ListChange>,
}

fn version_key() -> Vec<u8> {
    keys::pack(&("authlist", "version"))
}
fn entry_key(hash: &str) -> Vec<u8> {
    keys::pack(&("authlist-entry", hash))
}
fn log_key(v: u64) -> Vec<u8> {
    keys::pack(&("authlist-log", v))
}

pub fn version(tx: &mut dyn Transaction) -> Result<u64, DriverError> {
    Ok(match tx.get(&version_key())? {
        Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
        Some(_) => return Err(DriverError::Corrupted("authlist version".into())),
        None => 0,
    })
}

fn log(tx: &mut dyn Transaction, change: ListChange) -> Result<(), DriverError> {
    let v = version(tx)? + 1;
    tx.set(&version_key(), &v.to_be_bytes())?;
    save(tx, &log_key(v), &change)
}

/// The entry a token should have, given its driver.
pub fn entry_for(tok: &TokenRecord, drv: &DriverRecord, now: i64) -> Option<ListEntry> {
    let status = match (drv.effective_status(now), tok.effective_status(now)) {
        (AccountStatus::Erased, _) => return None,
        (AccountStatus::Blocked, _) | (_, TokenStatus::Blocked) => ListStatus::Blocked,
        (AccountStatus::Expired, _) | (_, TokenStatus::Expired) => ListStatus::Expired,
        (AccountStatus::Active, TokenStatus::Active) => ListStatus::Accepted,
    };
    let expires_at = match (tok.expires_at, drv.expires_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Some(ListEntry { status, expires_at })
}

/// Brings the token's entry up to date, logging a change if there is one.
pub fn record(tx: &mut dyn Transaction, tok: &TokenRecord, drv: &DriverRecord, now: i64) -> Result<(), DriverError> {
    let want = entry_for(tok, drv, now);
    let have: Option<ListEntry> = load(tx, &entry_key(&tok.list_hash))?;
    if want == have {
        return Ok(());
    }
    match &want {
        Some(e) => save(tx, &entry_key(&tok.list_hash), e)?,
        None => tx.clear(&entry_key(&tok.list_hash))?,
    }
    log(
        tx,
        ListChange {
            hash: tok.list_hash.clone(),
            entry: want,
        },
    )
}

pub fn remove(tx: &mut dyn Transaction, hash: &str) -> Result<(), DriverError> {
    if tx.get(&entry_key(hash))?.is_none() {
        return Ok(());
    }
    tx.clear(&entry_key(hash))?;
    log(
        tx,
        ListChange {
            hash: hash.into(),
            entry: None,
        },
    )
}

/// The update for a charger that has version `from`.
pub fn since(tx: &mut dyn Transaction, from: u64) -> Result<ListUpdate, DriverError> {
    let version = version(tx)?;
    if from == version {
        return Ok(ListUpdate {
            from,
            version,
            full: false,
            changes: vec![],
        });
    }
    if from == 0 || from > version || version - from > MAX_DIFF {
        let (b, e) = keys::tuple_range(&("authlist-entry",));
        let mut changes = Vec::new();
        for (k, v) in tx.get_range(&b, &e, 0, false)? {
            let (_, hash): (String, String) = keys::unpack(&k).map_err(|e| DriverError::Corrupted(e.to_string()))?;
            let entry: ListEntry = serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string()))?;
            changes.push(ListChange {
                hash,
                entry: Some(entry),
            });
        }
        return Ok(ListUpdate {
            from,
            version,
            full: true,
            changes,
        });
    }
    let (_, e) = keys::tuple_range(&("authlist-log",));
    let b = log_key(from + 1);
    let mut changes = Vec::new();
    for (_, v) in tx.get_range(&b, &e, 0, false)? {
        changes.push(serde_json::from_slice(&v).map_err(|e| DriverError::Corrupted(e.to_string()))?);
    }
    Ok(ListUpdate {
        from,
        version,
        full: false,
        changes,
    })
}
