//! laddnet's money, on `laddnet-store`:
//!
//! - [`tariffs`]: tariff versions (never edited in place) and their
//!   assignment to the operator, a site, a charger or a connector type,
//!   with validity periods.
//! - [`cdr`]: charge detail records, written exactly once when a session
//!   ends, priced by the cost engine, with a content hash. Sessions with
//!   meter anomalies get a CDR held for review, not posted blindly.
//! - [`ledger`]: the double-entry revenue ledger. Each CDR posts once (an
//!   idempotency key in the same transaction); balances move by atomic add;
//!   [`ledger::verify`] proves debits equal credits and every CDR is posted
//!   exactly once. Refunds are reversing postings, never edits.
//!
//! - [`payments`]: the provider interface (authorize at start, capture at
//!   the end, release, refund), the prepaid wallet, card intents.
//! - [`subscriptions`]: plans (monthly fee, included kWh, discount, a
//!   tariff of their own) and who is on which.
//! - [`invoices`]: per account and month, numbered without gaps, with a
//!   VAT summary, as JSON and HTML.
//!
//! Amounts in the ledger are integers in the currency's minor unit.

#![forbid(unsafe_code)]

pub mod cdr;
pub mod invoices;
pub mod ledger;
pub mod payments;
pub mod report;
pub mod subscriptions;
pub mod tariffs;

use laddnet_core::{ErrorKind, HasKind};
use laddnet_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tariff(#[from] laddnet_core::tariff::TariffError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    /// A payment method refused (the reason is for the driver).
    #[error("{0}")]
    Declined(String),
    #[error("stored record is corrupted: {0}")]
    Corrupted(String),
}

impl HasKind for LedgerError {
    fn kind(&self) -> ErrorKind {
        match self {
            LedgerError::Store(_) => ErrorKind::Unavailable,
            LedgerError::Tariff(_) | LedgerError::Invalid(_) => ErrorKind::InvalidArgument,
            LedgerError::NotFound(_) => ErrorKind::NotFound,
            LedgerError::Precondition(_) | LedgerError::Declined(_) => ErrorKind::FailedPrecondition,
            LedgerError::Corrupted(_) => ErrorKind::Internal,
        }
    }
}

pub(crate) fn get<T: serde::de::DeserializeOwned>(
    tx: &mut dyn laddnet_store::Transaction,
    key: &[u8],
) -> Result<Option<T>, LedgerError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| LedgerError::Corrupted(e.to_string())),
    }
}

pub(crate) fn put<T: serde::Serialize>(
    tx: &mut dyn laddnet_store::Transaction,
    key: &[u8],
    value: &T,
) -> Result<(), LedgerError> {
    let v = serde_json::to_vec(value).map_err(|e| LedgerError::Corrupted(e.to_string()))?;
    Ok(tx.set(key, &v)?)
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
