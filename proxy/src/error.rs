//! The proxy's one error type, and the one place it becomes an HTTP answer.
//!
//! Every variant knows whose fault it is ([`Fault`]): the client's (a 4xx
//! the proxy answers without contacting any upstream), the upstreams' (no
//! candidate gave a usable answer: 502, 503, 504) or the proxy's own (500).
//! The fault is a field of the request's log line, so "who broke this
//! download?" is answered by a log query. Bodies are the shared JSON error
//! (`docs/http.md#errors`), `{"error": code, "message": text}`; the message
//! never carries an upstream's address or error text (those are in the log).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use gitball_core::log::Fault;
use gitball_core::protocol::{RETRY_AFTER_SECONDS, code};
use gitball_core::response::{json_error, method_not_allowed};
use gitball_core::url::UrlError;
use http::{HeaderValue, StatusCode, header};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL, ref, extension or `path` query is malformed (or the path is
    /// no archive URL at all).
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("only GET and HEAD are supported")]
    MethodNotAllowed,
    /// Anything but `POST` on a prewarm URL.
    #[error("only POST is allowed")]
    PostOnly,
    /// A prewarm without the `--prewarm-token-file` token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// No route matches, or a private route was asked for without a valid
    /// token: both look exactly like an unknown repository (the archiver's
    /// answer for one uses the same code).
    #[error("repository not found")]
    RepositoryNotFound,
    /// Every candidate failed: connect error, `5xx`, broken response.
    #[error("no upstream archiver answered")]
    BadGateway,
    /// Every candidate was already ejected and failed again.
    #[error("every archiver for this repository is unavailable; retry later")]
    Unavailable { retry_after: Duration },
    /// The proxy had no fd (or buffer) left to connect to an upstream:
    /// `503` + `Retry-After`, its own shortage, not the upstream's.
    #[error("the proxy is overloaded; retry later")]
    Overloaded,
    /// An archiver refused the proxy's connection at its cap per client
    /// (it counts the proxy as one client), and no other candidate
    /// answered: `503` + `Retry-After`, as for a full archiver, since that
    /// is what it is to the end user (who holds no connection there).
    #[error("the archivers for this repository are overloaded; retry later")]
    UpstreamsRefused,
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

    /// What the request log says: the code, or the detail of an internal
    /// error (which the client never sees).
    pub fn log_text(&self) -> String {
        match self {
            Error::Internal(detail) => detail.clone(),
            other => other.code().to_owned(),
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Error::Url(_)
            | Error::MethodNotAllowed
            | Error::PostOnly
            | Error::Unauthorized
            | Error::RepositoryNotFound => Fault::Client,
            Error::BadGateway
            | Error::Unavailable { .. }
            | Error::UpstreamsRefused
            | Error::GatewayTimeout => Fault::Upstream,
            Error::Internal(_) | Error::Overloaded => Fault::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Url(error) => error.status(),
            Error::MethodNotAllowed | Error::PostOnly => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::RepositoryNotFound => StatusCode::NOT_FOUND,
            Error::BadGateway => StatusCode::BAD_GATEWAY,
            Error::Unavailable { .. } | Error::Overloaded | Error::UpstreamsRefused => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Url(error) => error.code(),
            Error::MethodNotAllowed | Error::PostOnly => code::METHOD_NOT_ALLOWED,
            Error::Unauthorized => code::UNAUTHORIZED,
            Error::RepositoryNotFound => code::REPO_NOT_FOUND,
            Error::BadGateway => code::BAD_GATEWAY,
            Error::Unavailable { .. } => code::UNAVAILABLE,
            Error::GatewayTimeout => code::GATEWAY_TIMEOUT,
            Error::Overloaded | Error::UpstreamsRefused => code::OVERLOADED,
            Error::Internal(_) => code::INTERNAL,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::MethodNotAllowed = self {
            return method_not_allowed();
        }
        let mut response = json_error(self.status(), self.code(), &self.to_string());
        if let Error::PostOnly = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        if let Error::Unauthorized = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let retry_after = match &self {
            Error::Unavailable { retry_after } => Some(*retry_after),
            Error::Overloaded | Error::UpstreamsRefused => {
                Some(Duration::from_secs(RETRY_AFTER_SECONDS))
            }
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            // Whole seconds, at least 1: `Retry-After: 0` invites a retry
            // storm.
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every error the proxy answers itself (the `match` fails to
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
            Error::Unauthorized,
            Error::RepositoryNotFound,
            Error::BadGateway,
            Error::Unavailable {
                retry_after: Duration::from_secs(1),
            },
            Error::Overloaded,
            Error::UpstreamsRefused,
            Error::GatewayTimeout,
            Error::internal("x"),
        ];
        for error in &all {
            match error {
                Error::Url(_)
                | Error::MethodNotAllowed
                | Error::PostOnly
                | Error::Unauthorized
                | Error::RepositoryNotFound
                | Error::BadGateway
                | Error::Unavailable { .. }
                | Error::Overloaded
                | Error::UpstreamsRefused
                | Error::GatewayTimeout
                | Error::Internal(_) => {}
            }
        }
        all
    }

    /// Every error the proxy answers itself has its status and code in
    /// `docs/http.md`'s status codes table, on a row for the proxy. (Docs
    /// review: nothing held the table to the errors.)
    #[test]
    fn every_error_is_in_the_status_codes_table() {
        let rows = gitball_core::protocol::documented_statuses(include_str!("../../docs/http.md"));
        for error in every_error() {
            let (status, code) = (error.status().as_u16(), error.code());
            assert!(
                rows.iter().any(|(documented, documented_code, tier)| {
                    *documented == status
                        && documented_code == code
                        && matches!(tier.as_str(), "proxy" | "both" | "either")
                }),
                "{error:?}: {status} {code} has no proxy row in docs/http.md"
            );
        }
    }

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
        // An archiver refusing the proxy's connection: the upstream side's.
        assert_eq!(Error::UpstreamsRefused.fault(), Fault::Upstream);
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
        for overloaded in [Error::Overloaded, Error::UpstreamsRefused] {
            let response = overloaded.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        }
        let response = Error::MethodNotAllowed.into_response();
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
    }
}
