//! The archiver's one error type: what a caller (and so an HTTP client) can
//! act on. It is mapped to a status and a JSON `error` code in exactly one
//! place, `http::error_response`. Messages never carry a filesystem path or
//! git's stderr: those go to the log, not to the client.

use crate::url::UrlError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("repository not found")]
    RepoNotFound,
    #[error("ref not found")]
    RefNotFound,
    #[error("path not found in this commit")]
    SubtreeNotFound,
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("range not satisfiable")]
    RangeNotSatisfiable { complete_length: u64 },
    #[error("too many archives are being generated; retry later")]
    Busy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the archive could not be generated")]
    GenerationFailed,
    #[error("the archive took too long to generate")]
    GenerationTimeout,
    #[error("the archive is larger than this server generates")]
    TooLarge,
    /// Anything else; the detail is logged, the client sees a generic text.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Error::Internal(detail.to_string())
    }
}
