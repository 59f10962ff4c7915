/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Io(String),
    #[error("store is corrupted: {0}")]
    Corrupted(String),
    #[error("key of {0} bytes exceeds the {max}-byte limit", max = crate::MAX_KEY_BYTES)]
    KeyTooLarge(usize),
    #[error("value of {0} bytes exceeds the {max}-byte limit", max = crate::MAX_VALUE_BYTES)]
    ValueTooLarge(usize),
    #[error("transaction writes {0} bytes, over the {max}-byte limit", max = crate::MAX_TRANSACTION_BYTES)]
    TransactionTooLarge(usize),
    #[error("write in a read-only transaction")]
    ReadOnly,
    #[error("transaction conflicted {0} times; giving up")]
    TooManyRetries(u32),
    /// The closure returned an error; its own error is handed back by
    /// [`crate::StoreExt`].
    #[error("transaction aborted")]
    Aborted,
    /// The writer no longer owns what it writes for (a fencing epoch moved
    /// on: another node took the charger over).
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("store internal error: {0}")]
    Internal(String),
}

impl StoreError {
    pub(crate) fn io(e: impl std::fmt::Display) -> Self {
        StoreError::Io(e.to_string())
    }
}
