//! The archiver's one error type: what a caller (and so an HTTP client) can
//! act on, and the one place it becomes an HTTP answer
//! (`docs/http.md#errors`).
//!
//! Every variant knows whose fault it is ([`Fault`]): the client's (a 4xx
//! answered without generating anything) or the archiver's own (a
//! generation that failed, a full queue, a shutdown, a bug). The fault is a
//! field of the request's log line. Messages never carry a filesystem path
//! or git's stderr: those go to the log, not to the client.

use axum::response::{IntoResponse, Response};
use gitball_core::log::Fault;
use gitball_core::protocol::{RETRY_AFTER_SECONDS, X_GITBALL_CACHE, code};
use gitball_core::response::{json_error, method_not_allowed};
use gitball_core::url::UrlError;
use http::{HeaderValue, StatusCode, header};

use crate::cache::LookupError;
use crate::generate::Failure;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("only GET and HEAD are allowed")]
    MethodNotAllowed,
    /// Anything but `POST` on a prewarm URL.
    #[error("only POST is allowed")]
    PostOnly,
    /// The client's budget of cold generations is spent.
    #[error("too many new archives requested; retry later or download archives that exist")]
    RateLimited { retry_after_seconds: u64 },
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
    /// The refs an `export-subst` archive is keyed by changed before its
    /// generation started: asked again, it is keyed by the new ones.
    #[error("the repository's refs changed while the archive waited to be generated; retry")]
    RefsChanged,
    #[error("the archive could not be generated")]
    GenerationFailed,
    #[error("the archive took too long to generate")]
    GenerationTimeout,
    #[error("the archive is larger than this server generates")]
    TooLarge,
    /// [`Error::TooLarge`] answered from what the cache remembers
    /// (`Cache::known_too_large`): nothing ran. Marked so for a proxy,
    /// which counts it as no archive failed at this archiver.
    #[error("the archive is larger than this server generates")]
    KnownTooLarge,
    /// A cached archive's file was gone when opened (deleted behind the
    /// archiver's back): forgotten by the cache, and the request is
    /// resolved again, which generates it anew.
    #[error("internal error")]
    FileGone,
    /// Anything else; the detail is logged, the client sees a generic text.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Error::Internal(detail.to_string())
    }

    pub fn fault(&self) -> Fault {
        match self {
            Error::Url(_)
            | Error::MethodNotAllowed
            | Error::PostOnly
            | Error::RateLimited { .. }
            | Error::RepoNotFound
            | Error::RefNotFound
            | Error::SubtreeNotFound
            | Error::Unauthorized
            | Error::RangeNotSatisfiable { .. } => Fault::Client,
            Error::Busy
            | Error::ShuttingDown
            | Error::RefsChanged
            | Error::GenerationFailed
            | Error::GenerationTimeout
            | Error::TooLarge
            | Error::KnownTooLarge
            | Error::FileGone
            | Error::Internal(_) => Fault::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Url(error) => error.status(),
            Error::MethodNotAllowed | Error::PostOnly => StatusCode::METHOD_NOT_ALLOWED,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::RepoNotFound | Error::RefNotFound | Error::SubtreeNotFound => {
                StatusCode::NOT_FOUND
            }
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::Busy | Error::ShuttingDown | Error::RefsChanged => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::GenerationFailed
            | Error::GenerationTimeout
            | Error::TooLarge
            | Error::KnownTooLarge
            | Error::FileGone
            | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Url(error) => error.code(),
            Error::MethodNotAllowed | Error::PostOnly => code::METHOD_NOT_ALLOWED,
            Error::RateLimited { .. } => code::RATE_LIMITED,
            Error::RepoNotFound => code::REPO_NOT_FOUND,
            Error::RefNotFound => code::REF_NOT_FOUND,
            Error::SubtreeNotFound => code::PATH_NOT_FOUND,
            Error::Unauthorized => code::UNAUTHORIZED,
            Error::RangeNotSatisfiable { .. } => code::RANGE_NOT_SATISFIABLE,
            Error::Busy => code::BUSY,
            Error::ShuttingDown => code::SHUTTING_DOWN,
            Error::RefsChanged => code::REFS_CHANGED,
            Error::GenerationFailed => code::GENERATION_FAILED,
            Error::GenerationTimeout => code::GENERATION_TIMEOUT,
            Error::TooLarge | Error::KnownTooLarge => code::ARCHIVE_TOO_LARGE,
            Error::FileGone | Error::Internal(_) => code::INTERNAL,
        }
    }

    /// What the request log says: the code, or the detail of an internal
    /// error (which the client never sees).
    pub fn log_text(&self) -> String {
        match self {
            Error::Internal(detail) => detail.clone(),
            Error::FileGone => "the cached archive's file is gone".to_owned(),
            other => other.code().to_owned(),
        }
    }
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        match failure {
            Failure::Busy => Error::Busy,
            // No request is left to answer (the generation leaves only
            // when none waits, and none can join it after); were one told,
            // a retry would start the generation anew.
            Failure::Abandoned => Error::Busy,
            Failure::Cancelled => Error::ShuttingDown,
            Failure::Failed => Error::GenerationFailed,
            Failure::Timeout => Error::GenerationTimeout,
            Failure::TooLarge => Error::TooLarge,
            Failure::RefsChanged => Error::RefsChanged,
        }
    }
}

impl From<LookupError> for Error {
    fn from(error: LookupError) -> Error {
        match error {
            LookupError::ShuttingDown => Error::ShuttingDown,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::MethodNotAllowed = self {
            return method_not_allowed();
        }
        let mut response = json_error(self.status(), self.code(), &self.to_string());
        let headers = response.headers_mut();
        match &self {
            Error::Busy | Error::ShuttingDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            // Nothing to wait for: asked again now, it is keyed anew.
            Error::RefsChanged => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(0));
            }
            Error::RateLimited {
                retry_after_seconds,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            Error::PostOnly => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            // What the cache knew: no generation failed here now.
            Error::KnownTooLarge => {
                headers.insert(X_GITBALL_CACHE, HeaderValue::from_static("hit"));
            }
            Error::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                // One answer per connection: a peer without the token
                // cannot hold a connection by asking again within each
                // head timeout (docs/security.md, "Connections per client").
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Error::RangeNotSatisfiable { complete_length } => {
                headers.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{complete_length}"))
                        .expect("digits are a valid header value"),
                );
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every error the archiver answers (the `match` fails to
    /// compile when a variant is added, so it cannot be left out).
    fn every_error() -> Vec<Error> {
        let all = vec![
            Error::Url(UrlError::NotAnArchiveUrl),
            Error::Url(UrlError::BadName),
            Error::Url(UrlError::BadFormat),
            Error::Url(UrlError::BadRef("x")),
            Error::Url(UrlError::BadSubtree("x")),
            Error::Url(UrlError::BadEncoding),
            Error::MethodNotAllowed,
            Error::PostOnly,
            Error::RateLimited {
                retry_after_seconds: 1,
            },
            Error::RepoNotFound,
            Error::RefNotFound,
            Error::SubtreeNotFound,
            Error::Unauthorized,
            Error::RangeNotSatisfiable { complete_length: 1 },
            Error::Busy,
            Error::ShuttingDown,
            Error::RefsChanged,
            Error::GenerationFailed,
            Error::GenerationTimeout,
            Error::TooLarge,
            Error::KnownTooLarge,
            Error::FileGone,
            Error::internal("x"),
        ];
        for error in &all {
            match error {
                Error::Url(_)
                | Error::MethodNotAllowed
                | Error::PostOnly
                | Error::RateLimited { .. }
                | Error::RepoNotFound
                | Error::RefNotFound
                | Error::SubtreeNotFound
                | Error::Unauthorized
                | Error::RangeNotSatisfiable { .. }
                | Error::Busy
                | Error::ShuttingDown
                | Error::RefsChanged
                | Error::GenerationFailed
                | Error::GenerationTimeout
                | Error::TooLarge
                | Error::KnownTooLarge
                | Error::FileGone
                | Error::Internal(_) => {}
            }
        }
        all
    }

    /// Every error the archiver answers has its status and code in
    /// `docs/http.md`'s status codes table, on a row for the archiver.
    /// (Docs review: nothing held the table to the errors.)
    #[test]
    fn every_error_is_in_the_status_codes_table() {
        let rows = gitball_core::protocol::documented_statuses(include_str!("../../docs/http.md"));
        for error in every_error() {
            let (status, code) = (error.status().as_u16(), error.code());
            assert!(
                rows.iter().any(|(documented, documented_code, tier)| {
                    *documented == status
                        && documented_code == code
                        && matches!(tier.as_str(), "archiver" | "both" | "either")
                }),
                "{error:?}: {status} {code} has no archiver row in docs/http.md"
            );
        }
    }

    #[test]
    fn every_error_says_whose_fault_it_is_and_its_status() {
        assert_eq!(Error::Url(UrlError::BadRef("x")).fault(), Fault::Client);
        assert_eq!(
            Error::Url(UrlError::NotAnArchiveUrl).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(Error::RefNotFound.status(), StatusCode::NOT_FOUND);
        assert_eq!(Error::Busy.fault(), Fault::Internal);
        assert_eq!(
            Error::from(LookupError::ShuttingDown).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(Error::from(Failure::Cancelled).code(), "shutting_down");
        assert_eq!(Error::internal("disk").log_text(), "disk");
        assert_eq!(Error::TooLarge.log_text(), "archive_too_large");
    }

    #[test]
    fn overload_and_shutdown_carry_retry_after() {
        for error in [Error::Busy, Error::ShuttingDown] {
            let response = error.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        }
        // Asked again at once, the archive is keyed by the new refs.
        let response = Error::from(Failure::RefsChanged).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "0");
        assert_eq!(Error::RefsChanged.code(), "refs_changed");
        let response = Error::RangeNotSatisfiable {
            complete_length: 10,
        }
        .into_response();
        assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */10");
        let response = Error::MethodNotAllowed.into_response();
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
        let response = Error::PostOnly.into_response();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
    }

    #[test]
    fn rate_limited_is_429_with_its_retry_after() {
        let error = Error::RateLimited {
            retry_after_seconds: 7,
        };
        assert_eq!(error.fault(), Fault::Client);
        assert_eq!(error.code(), "rate_limited");
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
