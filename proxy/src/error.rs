//! The proxy's one error type, and the one place it becomes an HTTP answer.
//!
//! Every variant knows whose fault it is ([`Fault`]): the client's (a 4xx
//! the proxy answers without contacting any upstream), the upstreams' (no
//! candidate gave a usable answer: 502, 503, 504) or the proxy's own (500).
//! The fault is a field of the request's log line, so "who broke this
//! download?" is answered by a log query. Bodies are the JSON of SPEC §3,
//! `{"error": code, "message": text}`; the message never carries an
//! upstream's address or error text (those are in the log).

use std::time::Duration;

use axum::Json;
use axum::response::{IntoResponse, Response};
use gitball_archiver::url::UrlError;
use http::{HeaderValue, StatusCode, header};

/// The JSON `error` code of an unknown repository, shared with the archiver
/// so a private repository without a valid token is indistinguishable from
/// one that does not exist.
pub const REPOSITORY_NOT_FOUND_CODE: &str = "repo_not_found";

/// Who caused an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Internal,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL, ref, extension or `path` query is malformed (or the path is
    /// no archive URL at all).
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("only GET and HEAD are supported")]
    MethodNotAllowed,
    /// No route matches, or a private route was asked for without a valid
    /// token: both look exactly like an unknown repository.
    #[error("repository not found")]
    RepositoryNotFound,
    /// Every candidate failed: connect error, `5xx`, broken response.
    #[error("no upstream archiver answered")]
    BadGateway,
    /// Every candidate was already ejected and failed again.
    #[error("every archiver for this repository is unavailable; retry later")]
    Unavailable { retry_after: Duration },
    /// Every candidate that was tried gave no response headers in time.
    #[error("no upstream archiver answered in time")]
    GatewayTimeout,
    /// A bug or resource problem in the proxy itself; the detail is logged.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn internal(detail: impl std::fmt::Display) -> Error {
        Error::Internal(detail.to_string())
    }

    pub fn fault(&self) -> Fault {
        match self {
            Error::Url(_) | Error::MethodNotAllowed | Error::RepositoryNotFound => Fault::Client,
            Error::BadGateway | Error::Unavailable { .. } | Error::GatewayTimeout => {
                Fault::Upstream
            }
            Error::Internal(_) => Fault::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Url(UrlError::NotAnArchiveUrl) => StatusCode::NOT_FOUND,
            Error::Url(_) => StatusCode::BAD_REQUEST,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::RepositoryNotFound => StatusCode::NOT_FOUND,
            Error::BadGateway => StatusCode::BAD_GATEWAY,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Url(error) => error.code(),
            Error::MethodNotAllowed => "method_not_allowed",
            Error::RepositoryNotFound => REPOSITORY_NOT_FOUND_CODE,
            Error::BadGateway => "bad_gateway",
            Error::Unavailable { .. } => "unavailable",
            Error::GatewayTimeout => "gateway_timeout",
            Error::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
        });
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            Error::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Error::Unavailable { retry_after } => {
                // Whole seconds, at least 1: `Retry-After: 0` invites a
                // retry storm.
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_says_whose_fault_it_is() {
        assert_eq!(Error::Url(UrlError::BadFormat).fault(), Fault::Client);
        assert_eq!(
            Error::Url(UrlError::BadFormat).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            Error::Url(UrlError::NotAnArchiveUrl).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(Error::RepositoryNotFound.fault(), Fault::Client);
        assert_eq!(Error::BadGateway.fault(), Fault::Upstream);
        assert_eq!(Error::GatewayTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(Error::internal("x").fault(), Fault::Internal);
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let response = Error::Unavailable {
            retry_after: Duration::from_millis(2500),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let response = Error::MethodNotAllowed.into_response();
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
    }
}
