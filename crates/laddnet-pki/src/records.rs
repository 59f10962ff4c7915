//! What the CA keeps in the store, and where. Keys are tuples:
//!
//! | key | value |
//! |---|---|
//! | `("pki", "cert", serial)` | [`CertRecord`] JSON |
//! | `("pki", "by-subject", profile, subject, serial)` | empty (index) |
//! | `("pki", "revoked", serial)` | empty (index for the CRL) |
//! | `("pki", "token", sha256(token))` | [`TokenRecord`] JSON |
//! | `("pki", "crl")` | [`CrlRecord`] JSON |
//! | `("pki", "audit", seq)` | [`crate::AuditEntry`] JSON |
//! | `("pki", "audit-head")` | [`crate::audit::AuditHead`] JSON |

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use laddnet_store::{StoreError, Transaction, keys};

use crate::{PkiError, Profile};

pub(crate) fn cert_key(serial: &str) -> Vec<u8> {
    keys::pack(&("pki", "cert", serial))
}
pub(crate) fn subject_key(profile: Profile, subject: &str, serial: &str) -> Vec<u8> {
    keys::pack(&("pki", "by-subject", profile.as_str(), subject, serial))
}
/// The expiry index: every certificate by its `not_after`, so what expires
/// in a window is a range read, not a walk over every certificate.
pub(crate) fn expiry_key(not_after: i64, serial: &str) -> Vec<u8> {
    keys::pack(&("pki", "by-expiry", not_after, serial))
}
/// Set once every certificate stored before the expiry index is in it.
pub(crate) fn expiry_indexed_key() -> Vec<u8> {
    keys::pack(&("pki", "by-expiry-indexed"))
}
pub(crate) fn revoked_key(serial: &str) -> Vec<u8> {
    keys::pack(&("pki", "revoked", serial))
}
pub(crate) fn token_key(token_hash: &str) -> Vec<u8> {
    keys::pack(&("pki", "token", token_hash))
}
/// Where the current CRL lives in the store: every revocation rewrites it,
/// so a node follows revocations by watching this key.
pub fn crl_key() -> Vec<u8> {
    keys::pack(&("pki", "crl"))
}

/// One certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertRecord {
    pub serial: String,
    pub profile: Profile,
    pub subject: String,
    pub organisation: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub site_id: Option<String>,
    /// Unix seconds, UTC.
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    pub certificate_pem: String,
    #[serde(default)]
    pub renewed_from: Option<String>,
    #[serde(default)]
    pub revoked: Option<Revocation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    pub at: i64,
    pub reason: RevocationReason,
}

/// RFC 5280 revocation reasons that a security team uses.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 8] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::CertificateHold,
        RevocationReason::PrivilegeWithdrawn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key-compromise",
            RevocationReason::CaCompromise => "ca-compromise",
            RevocationReason::AffiliationChanged => "affiliation-changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation-of-operation",
            RevocationReason::CertificateHold => "certificate-hold",
            RevocationReason::PrivilegeWithdrawn => "privilege-withdrawn",
        }
    }

    pub fn parse(s: &str) -> Result<Self, PkiError> {
        if s.is_empty() {
            return Ok(RevocationReason::Unspecified);
        }
        Self::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            PkiError::Invalid(format!(
                "unknown revocation reason {s:?}: expected one of {}",
                Self::ALL.map(|r| r.as_str()).join(", ")
            ))
        })
    }

    pub(crate) fn to_rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            RevocationReason::Unspecified => R::Unspecified,
            RevocationReason::KeyCompromise => R::KeyCompromise,
            RevocationReason::CaCompromise => R::CaCompromise,
            RevocationReason::AffiliationChanged => R::AffiliationChanged,
            RevocationReason::Superseded => R::Superseded,
            RevocationReason::CessationOfOperation => R::CessationOfOperation,
            RevocationReason::CertificateHold => R::CertificateHold,
            RevocationReason::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
        }
    }
}

/// The status of a certificate at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Valid,
    NotYetValid,
    Expired,
    Revoked,
}

impl CertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Valid => "valid",
            CertStatus::NotYetValid => "not-yet-valid",
            CertStatus::Expired => "expired",
            CertStatus::Revoked => "revoked",
        }
    }
}

impl CertRecord {
    pub fn status(&self, now: i64) -> CertStatus {
        if self.revoked.is_some() {
            CertStatus::Revoked
        } else if now < self.not_before {
            CertStatus::NotYetValid
        } else if now >= self.not_after {
            CertStatus::Expired
        } else {
            CertStatus::Valid
        }
    }
}

/// A one-time enrollment token, stored by the SHA-256 of its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub charger_id: String,
    #[serde(default)]
    pub site_id: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
    #[serde(default)]
    pub used_at: Option<i64>,
}

/// The current CRL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrlRecord {
    pub number: u64,
    pub this_update: i64,
    pub next_update: i64,
    pub pem: String,
}

pub(crate) fn get_json<T: DeserializeOwned>(tx: &mut dyn Transaction, key: &[u8]) -> Result<Option<T>, PkiError> {
    match tx.get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PkiError::Corrupted(e.to_string())),
    }
}

pub(crate) fn put_json<T: Serialize>(tx: &mut dyn Transaction, key: &[u8], value: &T) -> Result<(), PkiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| PkiError::Corrupted(e.to_string()))?;
    tx.set(key, &bytes).map_err(|e: StoreError| e.into())
}
