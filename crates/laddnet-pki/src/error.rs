use laddnet_core::{ErrorKind, HasKind};
use laddnet_store::StoreError;

/// Why a PKI operation failed. Messages name the problem and never carry
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("CSR refused: {0}")]
    BadCsr(String),
    #[error("certificate refused: {0}")]
    BadCertificate(String),
    #[error("CRL refused: {0}")]
    BadCrl(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("certificate {0} not found")]
    NotFound(String),
    #[error("enrollment refused: {0}")]
    Enrollment(String),
    #[error("renewal refused: {0}")]
    Renewal(String),
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("rate limit reached: {0}")]
    RateLimited(String),
    #[error("CA files: {0}")]
    Files(String),
    #[error("CA key: {0}")]
    Key(String),
    #[error(transparent)]
    Vault(#[from] laddnet_vault::VaultError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("stored PKI record is corrupted: {0}")]
    Corrupted(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Rcgen(e.to_string())
    }
}

impl HasKind for PkiError {
    fn kind(&self) -> ErrorKind {
        match self {
            PkiError::Invalid(_) | PkiError::BadCsr(_) | PkiError::BadCertificate(_) | PkiError::BadCrl(_) => {
                ErrorKind::InvalidArgument
            }
            PkiError::NotFound(_) => ErrorKind::NotFound,
            PkiError::Enrollment(_) => ErrorKind::PermissionDenied,
            PkiError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            PkiError::Renewal(_) | PkiError::AlreadyRevoked(_) => ErrorKind::FailedPrecondition,
            PkiError::RateLimited(_) => ErrorKind::ResourceExhausted,
            PkiError::Store(StoreError::KeyTooLarge(_) | StoreError::ValueTooLarge(_)) => ErrorKind::InvalidArgument,
            PkiError::Store(_) => ErrorKind::Unavailable,
            PkiError::Policy(_)
            | PkiError::Files(_)
            | PkiError::Key(_)
            | PkiError::Vault(_)
            | PkiError::Rcgen(_)
            | PkiError::Tls(_)
            | PkiError::Corrupted(_) => ErrorKind::Internal,
        }
    }
}
