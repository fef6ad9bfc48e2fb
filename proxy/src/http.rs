//! Routes and the life of one request, in named phases:
//!
//! 1. **identify**: take the client's `X-Request-Id` if it is sane, else
//!    make one; it is forwarded to the archiver and echoed to the client.
//! 2. **parse**: method (`GET`/`HEAD`, else `405`), the archive URL and the
//!    `path` query with the shared grammar (`gitball_archiver::url`). A bad
//!    request is answered here, before any upstream is contacted.
//! 3. **route**: the first matching route; for a private route, the signed
//!    token. No route, or no valid token, is the `404` of an unknown
//!    repository.
//! 4. **forward**: candidates in order, with failover (`forward`).
//! 5. **respond**: the chosen response's status and allowlisted headers,
//!    and its body through the `pipe`.
//! 6. **log**: one structured line per request when it is over — for a
//!    download that is when the body ends, so the line carries the bytes
//!    sent and how the download ended — plus `requests_total{code}` and the
//!    duration histogram.
//!
//! The archiver is always asked the canonical URL
//! `/{owner}/{repo}/archive/{ref}.{ext}[.sha256]`, whichever URL shape the
//! client used; the `path` query is passed on, the `token` is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use gitball_archiver::server::WriteStalled;
use gitball_archiver::url::{self, ArchiveRequest};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::error::{Error, Fault};
use crate::forward::{
    FORWARDED_REQUEST_HEADERS, Forwarder, UpstreamRequest, UpstreamResponse, body_length,
    is_passed_through,
};
use crate::pipe::{End, Ending, Pipe};
use crate::routes::Routes;
use crate::sign::SigningKey;

/// The request id header, read, forwarded and echoed.
pub const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Longest client-supplied request id kept; a longer one is replaced.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Everything a request needs, shared by all of them.
pub struct AppState {
    pub routes: Arc<Routes>,
    pub forwarder: Forwarder,
    pub signing_key: Option<SigningKey>,
    pub client_idle_timeout: Duration,
    pub metrics: PrometheusHandle,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/metrics", any(metrics))
        .fallback(archive)
        .with_state(state)
}

/// The request's log line and metrics, written exactly once: when the
/// value is dropped. For a download that is when the body ends (the log
/// moves into the pipe's end callback); for any other answer, when the
/// handler returns; and if the client leaves before an answer was chosen,
/// when axum drops the handler's future — then the status is logged and
/// counted as `499` (nginx's "client closed request").
struct RequestLog {
    request_id: String,
    method: Method,
    /// The path only: the query may hold a token.
    path: String,
    started: Instant,
    /// `None` until an answer was chosen.
    status: Option<StatusCode>,
    upstream: Option<Arc<str>>,
    attempts: u32,
    fault: Option<Fault>,
    error: Option<String>,
    end: Option<End>,
}

/// Logged for a request whose client left before it was answered.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for RequestLog {
    fn drop(&mut self) {
        let duration = self.started.elapsed();
        let status = match self.status {
            Some(status) => status.as_u16(),
            None => {
                crate::metrics::client_disconnect();
                CLIENT_CLOSED_REQUEST
            }
        };
        crate::metrics::request_finished(status, duration);
        let (bytes, ending) = match (self.end, self.status) {
            (Some(end), _) => (end.bytes, end.ending.as_str()),
            (None, Some(_)) => (0, Ending::Complete.as_str()),
            (None, None) => (0, Ending::ClientGone.as_str()),
        };
        let aborted = ending != Ending::Complete.as_str();
        let upstream = self.upstream.as_deref().unwrap_or("-");
        let fault = self.fault.map_or("-", Fault::as_str);
        let error = self.error.as_deref().unwrap_or("");
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.request_id,
                    method = %self.method,
                    path = %self.path,
                    status,
                    upstream,
                    attempts = self.attempts,
                    bytes,
                    duration_ms = duration.as_millis() as u64,
                    ending,
                    fault,
                    error,
                    "request"
                )
            };
        }
        if self.fault == Some(Fault::Internal) {
            line!(error);
        } else if aborted || self.fault == Some(Fault::Upstream) {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

/// The client's request id if it is 1 to 128 characters of `A-Z a-z 0-9 . _
/// -` (safe in a header and a log line), else a new random one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_sane_request_id(id))
        .map_or_else(new_request_id, str::to_owned)
}

pub fn is_sane_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    // The id is either checked by `is_sane_request_id` or hex: always a
    // valid header value.
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

fn method_allowed(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

async fn healthz(method: Method) -> Response {
    if !method_allowed(&method) {
        return Error::MethodNotAllowed.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}\n",
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>, method: Method) -> Response {
    if !method_allowed(&method) {
        return Error::MethodNotAllowed.into_response();
    }
    // Expired ejections are set back to 0 before they are read.
    state.forwarder.health().sweep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        gitball_archiver::metrics::render(&state.metrics),
    )
        .into_response()
}

/// Everything under an archive URL (and every other path: they get the
/// URL grammar's `404`).
async fn archive(State(state): State<Arc<AppState>>, request: Request) -> Response {
    // Only the head matters (GET and HEAD have no body), and unlike the
    // body it can be borrowed across awaits.
    let (request, _body) = request.into_parts();
    let request_id = request_id(&request.headers);
    let mut log = RequestLog {
        request_id: request_id.clone(),
        method: request.method.clone(),
        path: request.uri.path().to_owned(),
        started: Instant::now(),
        status: None,
        upstream: None,
        attempts: 0,
        fault: None,
        error: None,
        end: None,
    };
    let response = match handle(&state, &request, &request_id, &mut log).await {
        Ok(answer) => respond(&state, &request, answer, log),
        Err(error) => {
            log.status = Some(error.status());
            log.fault = Some(error.fault());
            if log.error.is_none() {
                log.error = Some(match &error {
                    Error::Internal(detail) => detail.clone(),
                    other => other.code().to_owned(),
                });
            }
            error.into_response()
        }
    };
    with_request_id(response, &request_id)
}

/// The upstream response chosen for a request.
struct Answer {
    response: UpstreamResponse,
    upstream: Arc<str>,
}

/// Phases 2 to 4: parse, route, forward.
async fn handle(
    state: &AppState,
    request: &Parts,
    request_id: &str,
    log: &mut RequestLog,
) -> Result<Answer, Error> {
    // Parse.
    if !method_allowed(&request.method) {
        return Err(Error::MethodNotAllowed);
    }
    let archive = url::parse_path(request.uri.path())?;
    let query = request.uri.query();
    let subtree = url::query_param(query, "path")?
        .map(|path| url::validate_subtree(&path))
        .transpose()?;

    // Route.
    let repository = format!("{}/{}", archive.owner, archive.repo);
    let mut candidates = {
        let table = state.routes.current();
        let route = table.lookup(&repository).ok_or(Error::RepositoryNotFound)?;
        if route.private {
            authorize(state, &repository, query, log)?;
        }
        route.candidates(&repository)
    };
    let ejected = state.forwarder.health().order(&mut candidates);

    // Forward.
    let upstream_request = UpstreamRequest {
        method: request.method.clone(),
        path_and_query: upstream_path(&archive, subtree.as_deref()),
        headers: forwarded_headers(&request.headers, request_id),
    };
    let all_ejected = ejected == candidates.len();
    match state
        .forwarder
        .forward(&candidates, all_ejected, &upstream_request)
        .await
    {
        Ok(forwarded) => {
            log.upstream = Some(forwarded.upstream.clone());
            log.attempts = forwarded.attempts;
            Ok(Answer {
                response: forwarded.response,
                upstream: forwarded.upstream,
            })
        }
        Err(failed) => {
            log.upstream = failed.upstream;
            log.attempts = failed.attempts;
            Err(failed.error)
        }
    }
}

/// Phase 5: the client response from the upstream one. The log moves into
/// the pipe when there is a body, so it is written when the body ends.
fn respond(state: &AppState, request: &Parts, answer: Answer, mut log: RequestLog) -> Response {
    let upstream_response = answer.response;
    let status = upstream_response.status();
    log.status = Some(status);
    if status.is_server_error() {
        // Passed through after every candidate failed.
        log.fault = Some(Fault::Upstream);
    }
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in upstream_response.headers() {
        if is_passed_through(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let has_body = request.method != Method::HEAD
        && status != StatusCode::NOT_MODIFIED
        && status != StatusCode::NO_CONTENT
        && body_length(&upstream_response) != Some(0);
    if has_body {
        *response.body_mut() = Body::from_stream(
            Pipe::new(
                upstream_response,
                answer.upstream,
                state.forwarder.health().clone(),
                state.client_idle_timeout,
                move |end| {
                    log.end = Some(end);
                    drop(log);
                },
            )
            .on_connection(request.extensions.get::<WriteStalled>().cloned()),
        );
    }
    // Otherwise the upstream response is dropped here; having no body left
    // to read, its connection goes back to the pool.
    response
}

/// A private route needs a valid token for this repository; anything else
/// is indistinguishable from an unknown repository.
fn authorize(
    state: &AppState,
    repository: &str,
    query: Option<&str>,
    log: &mut RequestLog,
) -> Result<(), Error> {
    let Some(key) = &state.signing_key else {
        tracing::warn!(
            repository,
            "private route but no --signing-key-file; refusing"
        );
        return Err(Error::RepositoryNotFound);
    };
    let token = url::query_param(query, "token")
        .ok()
        .flatten()
        .unwrap_or_default();
    key.verify(repository, &token).map_err(|refused| {
        log.error = Some(refused.to_string());
        Error::RepositoryNotFound
    })
}

/// The canonical archiver URL for a request (path and query).
pub fn upstream_path(archive: &ArchiveRequest, subtree: Option<&str>) -> String {
    let mut path = format!(
        "/{}/{}/archive/{}.{}",
        archive.owner,
        archive.repo,
        archive.reference,
        archive.format.ext()
    );
    if archive.checksum {
        path.push_str(".sha256");
    }
    if let Some(subtree) = subtree {
        path.push_str("?path=");
        percent_encode_into(subtree, &mut path);
    }
    path
}

/// Percent-encodes everything but unreserved characters and `/`. `+` is
/// encoded too: `query_param` reads it as a space.
fn percent_encode_into(text: &str, out: &mut String) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

/// The request headers the archiver gets: `Range`, `If-None-Match`,
/// `If-Range` as sent, and the request id.
pub fn forwarded_headers(client: &HeaderMap, request_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in &FORWARDED_REQUEST_HEADERS {
        for value in client.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, value);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_request_ids_are_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123_X.y"));
        assert_eq!(request_id(&headers), "abc-123_X.y");
        let id = "a".repeat(128);
        headers.insert(REQUEST_ID, HeaderValue::from_str(&id).unwrap());
        assert_eq!(request_id(&headers), id);
    }

    #[test]
    fn insane_request_ids_are_replaced() {
        for bad in [
            "",
            "has space",
            "semi;colon",
            "quote\"",
            "tab\there",
            "é",
            &"a".repeat(129),
        ] {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(bad) {
                headers.insert(REQUEST_ID, value);
            }
            let id = request_id(&headers);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        assert_eq!(request_id(&headers).len(), 32);
    }

    #[test]
    fn generated_request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn upstream_url_is_canonical() {
        let codeload = url::parse_path("/acme/widget/tgz/feature/x").unwrap();
        assert_eq!(
            upstream_path(&codeload, None),
            "/acme/widget/archive/feature/x.tar.gz"
        );
        let checksum = url::parse_path("/acme/widget/archive/v1.0.zip.sha256").unwrap();
        assert_eq!(
            upstream_path(&checksum, None),
            "/acme/widget/archive/v1.0.zip.sha256"
        );
        let github = url::parse_path("/acme/widget/archive/main.tar").unwrap();
        assert_eq!(
            upstream_path(&github, Some("docs/a b+c&d")),
            "/acme/widget/archive/main.tar?path=docs/a%20b%2Bc%26d"
        );
        // The archiver's own query parser gets the subtree back unchanged.
        let query = upstream_path(&github, Some("docs/a b+c&d/é"))
            .split_once('?')
            .unwrap()
            .1
            .to_owned();
        assert_eq!(
            url::query_param(Some(&query), "path").unwrap().as_deref(),
            Some("docs/a b+c&d/é")
        );
    }

    #[test]
    fn only_listed_request_headers_are_forwarded() {
        let mut client = HeaderMap::new();
        client.insert(header::RANGE, HeaderValue::from_static("bytes=0-99"));
        client.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"abc-tar\""),
        );
        client.insert(header::IF_RANGE, HeaderValue::from_static("\"abc-tar\""));
        client.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        client.insert(header::COOKIE, HeaderValue::from_static("session=1"));
        client.insert(REQUEST_ID, HeaderValue::from_static("client-id"));
        let forwarded = forwarded_headers(&client, "chosen-id");
        assert_eq!(forwarded[header::RANGE], "bytes=0-99");
        assert_eq!(forwarded[header::IF_NONE_MATCH], "\"abc-tar\"");
        assert_eq!(forwarded[header::IF_RANGE], "\"abc-tar\"");
        assert_eq!(forwarded[REQUEST_ID], "chosen-id");
        assert!(forwarded.get(header::AUTHORIZATION).is_none());
        assert!(forwarded.get(header::COOKIE).is_none());
        assert_eq!(forwarded.len(), 4);
    }
}
