/// The class of a domain error. The node turns each into one gRPC code in a
/// single table; handlers never choose a status code themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller sent something malformed or against policy.
    InvalidArgument,
    /// The thing asked for does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The caller is known but not allowed to do this.
    PermissionDenied,
    /// The caller could not be identified.
    Unauthenticated,
    /// The request is valid but the state does not allow it now.
    FailedPrecondition,
    /// A limit was reached: rate, size, count.
    ResourceExhausted,
    /// A dependency is down; retrying later may work.
    Unavailable,
    /// A bug or a corrupted store.
    Internal,
}

/// Implemented by every crate's error enum.
pub trait HasKind {
    fn kind(&self) -> ErrorKind;
}
