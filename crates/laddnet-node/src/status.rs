//! The one table from domain errors to gRPC statuses. Handlers return
//! domain errors; nothing else builds a `Status` from one.

use std::fmt::Display;

use laddnet_core::{ErrorKind, HasKind};
use tonic::{Code, Status};

pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    }
}

/// A domain error as a gRPC status. Internal errors are logged in full and
/// sent as a generic message: the caller cannot act on them.
pub fn to_status<E: HasKind + Display>(e: E) -> Status {
    let kind = e.kind();
    if kind == ErrorKind::Internal {
        tracing::error!(error = %e, "internal error");
        return Status::internal("internal error; see the node's log");
    }
    Status::new(code(kind), e.to_string())
}

/// Errors raised by the node's own handlers (not by a domain crate).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
    /// A dependency (the store, another node) is down; retry.
    #[error("{0}")]
    Unavailable(String),
}

impl HasKind for NodeError {
    fn kind(&self) -> ErrorKind {
        match self {
            NodeError::Invalid(_) => ErrorKind::InvalidArgument,
            NodeError::Denied(_) => ErrorKind::PermissionDenied,
            NodeError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            NodeError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            NodeError::Precondition(_) => ErrorKind::FailedPrecondition,
            NodeError::Exhausted(_) => ErrorKind::ResourceExhausted,
            NodeError::NotFound(_) => ErrorKind::NotFound,
            NodeError::Internal(_) => ErrorKind::Internal,
            NodeError::Unavailable(_) => ErrorKind::Unavailable,
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        to_status(e)
    }
}

impl From<laddnet_store::StoreError> for NodeError {
    fn from(e: laddnet_store::StoreError) -> Self {
        NodeError::Internal(format!("store: {e}"))
    }
}
