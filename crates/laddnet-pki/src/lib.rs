//! laddnet's built-in certificate authority.
//!
//! - [`init`] creates a root and an issuing intermediate (path length 0);
//!   both keys are sealed with AES-256-GCM (`laddnet-vault`). A running
//!   node opens only the intermediate ([`Ca::open`]); the root key can be
//!   moved offline.
//! - [`Ca`] issues from [`Policy`] only (profiles charger, operator, node),
//!   checks CSRs ([`check_csr`]), enrolls chargers with one-time tokens,
//!   renews inside the renewal window, revokes and signs CRLs whose number
//!   only grows. Serials are 128 random bits, checked unique in the store.
//! - [`audit`]: the hash-chained, append-only audit log, written in the same
//!   transaction as the action it records.
//! - [`tls`]: the rustls configurations for every listener and client.
//! - [`tickets`]: TLS session-ticket keys shared by every node (stateless
//!   resumption across the cluster and restarts), rotated every 6 h.
//! - [`firmware`]: the firmware-signing key (issued by this CA) and the
//!   check a charger makes before installing an image.
//! - [`inspect`]: decoders for CSRs, certificates and CRLs (fuzzed).

#![forbid(unsafe_code)]

pub mod audit;
mod ca;
mod error;
pub mod firmware;
pub mod inspect;
mod policy;
mod records;
pub mod tickets;
pub mod tls;

pub use audit::{AuditEntry, AuditKind, AuditVerdict};
pub use ca::{Ca, CaFiles, CertFilter, Clock, InitReport, Issued, NewToken, Subject, init, system_clock};
pub use error::PkiError;
pub use inspect::{CertSummary, CheckedCsr, CrlSummary, check_csr, summarize_certificate, summarize_crl};
pub use policy::{
    CaPolicy, CsrPolicy, DEFAULT_POLICY_TOML, EnrollmentPolicy, KeyAlgorithm, Policy, Profile, ProfilePolicy,
};
pub use records::{CertRecord, CertStatus, CrlRecord, Revocation, RevocationReason, TokenRecord, crl_key};

/// Makes a new key and a CSR for it, as a charger or `laddctl` does.
/// Returns (key PEM, CSR PEM).
pub fn new_key_and_csr(common_name: &str) -> Result<(laddnet_vault::Secret<String>, String), PkiError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((laddnet_vault::Secret::new(key.serialize_pem()), csr))
}
