//! Errors carry a class that decides what the runtime does with them.

/// What the runtime should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (network, server restart, throttling): retry with backoff.
    Retryable,
    /// The data or the target refuses it; retrying will not help.
    Permanent,
    /// The pipeline or the environment is wrong: stop and say why.
    Config,
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{context}: {message}")]
    Retryable { context: String, message: String },
    #[error("{context}: {message}")]
    Permanent { context: String, message: String },
    #[error("embedded log: {0}")]
    Storage(String),
    /// The destination's daily allocation is spent and the sink waits for it (retried, but a
    /// stop need not wait for it).
    #[error("parked: {0}")]
    Parked(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config(_) => ErrorClass::Config,
            Error::Retryable { .. } | Error::Parked(_) => ErrorClass::Retryable,
            Error::Permanent { .. } | Error::Storage(_) => ErrorClass::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into())
    }

    pub fn retryable(context: impl Into<String>, message: impl ToString) -> Self {
        Error::Retryable { context: context.into(), message: message.to_string() }
    }

    pub fn permanent(context: impl Into<String>, message: impl ToString) -> Self {
        Error::Permanent { context: context.into(), message: message.to_string() }
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

macro_rules! storage_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(e.to_string())
            }
        }
    )*};
}
storage_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    postcard::Error
);

pub type Result<T, E = Error> = std::result::Result<T, E>;
