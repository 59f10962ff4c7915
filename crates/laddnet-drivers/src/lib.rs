//! Drivers: who charges, and what laddnet holds about them.
//!
//! - [`Drivers`]: accounts, tokens (RFID UIDs, app tokens, contract ids),
//!   groups, payment methods, preferences and watches. Personal data
//!   (name, e-mail, phone, token values, payment references) is stored only
//!   sealed by the [`laddnet_vault::Vault`] under the driver's own data key;
//!   tokens are found by their blind index, never by their value.
//! - [`authz`]: the authorization decision, with a precise reason.
//! - [`locallist`]: the versioned offline authorization list chargers keep.
//! - [`outbox`]: notifications, persisted before they are delivered.
//! - [`insights`]: habits per driver and utilisation per site, computed
//!   from session records.
//!
//! | key | value |
//! |---|---|
//! | `("driver", id)` | [`DriverRecord`] |
//! | `("driver-pii", id, field)` | sealed name / email / phone / payment-ref |
//! | `("token", token_id)` | [`TokenRecord`] |
//! | `("token-pii", token_id)` | the sealed token value |
//! | `("token-idx", blind index)` | token id |
//! | `("driver-token", driver, token)` | empty |
//! | `("driver-session", driver, tx)` | empty: the driver's open sessions |
//! | `("driver-history", driver, tx)` | empty: every session of the driver |
//! | `("site-access", site)` | [`SiteAccess`] |
//! | `("watch", target, driver)` | empty: "charger:ID" or "site:ID" watchers |

#![forbid(unsafe_code)]

pub mod accounts;
pub mod authz;
pub mod insights;
pub mod locallist;
pub mod model;
pub mod outbox;

pub use accounts::Drivers;
pub use model::*;

use laddnet_core::{ErrorKind, HasKind};
use laddnet_store::{StoreError, keys};
use laddnet_vault::VaultError;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("vault: {0}")]
    Vault(#[from] VaultError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("stored record is corrupted: {0}")]
    Corrupted(String),
    #[error(transparent)]
    Ledger(#[from] laddnet_ledger::LedgerError),
}

impl HasKind for DriverError {
    fn kind(&self) -> ErrorKind {
        match self {
            DriverError::Store(_) => ErrorKind::Unavailable,
            DriverError::Vault(VaultError::Shredded) => ErrorKind::FailedPrecondition,
            DriverError::Vault(_) | DriverError::Corrupted(_) => ErrorKind::Internal,
            DriverError::NotFound(_) => ErrorKind::NotFound,
            DriverError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            DriverError::Invalid(_) => ErrorKind::InvalidArgument,
            DriverError::Precondition(_) => ErrorKind::FailedPrecondition,
            DriverError::Ledger(e) => e.kind(),
        }
    }
}

/// Store keys other crates write (the session actor keeps a driver's
/// open sessions and history up to date).
pub mod key {
    use super::keys;

    pub fn driver(id: &str) -> Vec<u8> {
        keys::pack(&("driver", id))
    }
    pub fn active_session(driver: &str, tx: &str) -> Vec<u8> {
        keys::pack(&("driver-session", driver, tx))
    }
    pub fn history(driver: &str, tx: &str) -> Vec<u8> {
        keys::pack(&("driver-history", driver, tx))
    }
    /// One sealed personal field (`name`, `email`, `phone`, …) of a driver.
    pub fn personal(driver: &str, field: &str) -> Vec<u8> {
        keys::pack(&("driver-pii", driver, field))
    }
}

pub(crate) fn load<T: serde::de::DeserializeOwned>(
    tx: &mut dyn laddnet_store::Transaction,
    key: &[u8],
) -> Result<Option<T>, DriverError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| DriverError::Corrupted(e.to_string())),
    }
}

pub(crate) fn save<T: serde::Serialize>(
    tx: &mut dyn laddnet_store::Transaction,
    key: &[u8],
    v: &T,
) -> Result<(), DriverError> {
    let bytes = serde_json::to_vec(v).map_err(|e| DriverError::Corrupted(e.to_string()))?;
    tx.set(key, &bytes)?;
    Ok(())
}
