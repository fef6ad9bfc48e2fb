//! Routes, conditional and range requests, errors: the archiver's HTTP face.
//!
//! An archive request goes: bearer check → URL grammar (`url`) → repository
//! and ref (`repo`) → `If-None-Match` (answered before anything is generated)
//! → cache lookup → body. A complete file is served with `Content-Length`,
//! `Accept-Ranges` and `Repr-Digest`, and honours one `Range`; a growing one
//! is served chunked from the file as it grows, and a `Range` is ignored.
//!
//! `error_response` is the one place where an [`Error`] becomes a status and
//! a JSON body; bodies never carry a path or git's stderr.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;

use crate::cache::{Cache, CacheFile, Lookup, State as GenerationState};
use crate::error::Error;
use crate::generate::{Compression, Failure, Spec};
use crate::metrics as m;
use crate::repo::{Repositories, Resolved};
use crate::tail::{self, Download, RequestLog, Source};
use crate::url::{self, ArchiveRequest, Format, RefKind, UrlError};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_GITBALL_COMMIT: HeaderName = HeaderName::from_static("x-gitball-commit");
const X_GITBALL_CACHE: HeaderName = HeaderName::from_static("x-gitball-cache");
const REPR_DIGEST: HeaderName = HeaderName::from_static("repr-digest");
/// What `Retry-After` says when the generation queue is full.
const RETRY_AFTER_SECONDS: u64 = 5;
const LONGEST_REQUEST_ID: usize = 128;

/// Shared state of the routes.
pub struct App {
    pub repos: Repositories,
    pub cache: Arc<Cache>,
    pub token: Option<Vec<u8>>,
    pub gzip_level: u32,
    pub zstd_level: i32,
    pub metrics: PrometheusHandle,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/metrics", get(render_metrics))
        .fallback(archive)
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .with_state(app)
}

async fn render_metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.metrics),
    )
        .into_response()
}

/// Everything about an archive that its headers say.
struct Resolution {
    request: ArchiveRequest,
    resolved: Resolved,
    spec: Spec,
    filename: String,
    etag: String,
}

async fn archive(State(app): State<Arc<App>>, request: Request) -> Response {
    let mut log = RequestLog {
        started: Instant::now(),
        request_id: request_id(request.headers()),
        method: request.method().to_string(),
        path: request.uri().path().chars().take(512).collect(),
        status: 0,
        cache: "none",
        commit: String::new(),
    };
    let archive = url::parse_path(request.uri().path());
    let format = archive
        .as_ref()
        .map_or("none", |archive| archive.format.metric_label());
    // The body is not needed (and not `Sync`); the head is.
    let (request, _body) = request.into_parts();
    let mut response = match serve(&app, &request, archive, &mut log).await {
        Ok(response) => response,
        Err(error) => {
            let response = error_response(&error);
            log.status = response.status().as_u16();
            log.emit("error", 0);
            response
        }
    };
    counter!(m::REQUESTS_TOTAL, "format" => format, "cache" => log.cache, "code" => response.status().as_str().to_owned())
        .increment(1);
    if let Ok(value) = HeaderValue::from_str(&log.request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

async fn serve(
    app: &App,
    request: &Parts,
    archive: Result<ArchiveRequest, UrlError>,
    log: &mut RequestLog,
) -> Result<Response, Error> {
    let method = &request.method;
    if method != Method::GET && method != Method::HEAD {
        return Ok(method_not_allowed());
    }
    authorize(app, &request.headers)?;
    let resolution = resolve(app, request, archive?)?;
    log.commit = resolution.resolved.commit.clone();
    let headers = &request.headers;

    if if_none_match(headers, &resolution.etag) {
        log.status = 304;
        log.emit("not_modified", 0);
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        common_headers(response.headers_mut(), &resolution);
        return Ok(response);
    }
    if resolution.request.checksum {
        return checksum(app, &resolution, method, log).await;
    }

    let lookup = if method == Method::HEAD {
        match app.cache.peek(&resolution.spec) {
            Some(lookup) => lookup,
            None => {
                log.cache = "miss";
                log.status = 200;
                log.emit("head", 0);
                return Ok(archive_response(
                    &resolution,
                    None,
                    StatusCode::OK,
                    None,
                    Body::empty(),
                    "miss",
                ));
            }
        }
    } else {
        app.cache.lookup(resolution.spec.clone()).map_err(|error| {
            if app.cache.is_shutting_down() {
                Error::ShuttingDown
            } else {
                Error::internal(error)
            }
        })?
    };
    let cache_label = lookup.label();
    log.cache = cache_label;

    // A growing archive: wait for its first bytes (or its end) so a failure
    // that happens at once is still an error status, not an aborted 200.
    let source = match lookup {
        Lookup::Hit(file) => Source::Complete(file),
        Lookup::Join(generation) | Lookup::Miss(generation) => {
            let progress = generation.started().await;
            match progress.state {
                GenerationState::Complete(file) => Source::Complete(file),
                GenerationState::Failed(failure) => return Err(failure_error(failure)),
                GenerationState::Running => Source::Growing(generation),
            }
        }
    };

    let complete = match &source {
        Source::Complete(file) => Some(file.clone()),
        Source::Growing(_) => None,
    };
    let (status, range) = match &complete {
        Some(file) => match requested_range(headers, &resolution.etag, file.len)? {
            Some((start, end)) => (StatusCode::PARTIAL_CONTENT, Some((start, end))),
            None => (StatusCode::OK, None),
        },
        None => (StatusCode::OK, None),
    };
    log.status = status.as_u16();
    if method == Method::HEAD {
        log.emit("head", 0);
        return Ok(archive_response(
            &resolution,
            complete.as_deref(),
            status,
            range,
            Body::empty(),
            cache_label,
        ));
    }
    let (start, end) = match range {
        Some((start, end)) => (start, Some(end + 1)),
        None => (0, None),
    };
    let stream =
        tail::open(source, start, end, Download::start(log.clone())).map_err(Error::internal)?;
    Ok(archive_response(
        &resolution,
        complete.as_deref(),
        status,
        range,
        Body::from_stream(stream),
        cache_label,
    ))
}

/// `…/archive/{ref}.{ext}.sha256`: `"{hex}  {filename}\n"`, generating the
/// archive first if needed.
async fn checksum(
    app: &App,
    resolution: &Resolution,
    method: &Method,
    log: &mut RequestLog,
) -> Result<Response, Error> {
    let lookup = app
        .cache
        .lookup(resolution.spec.clone())
        .map_err(Error::internal)?;
    log.cache = lookup.label();
    let file = match lookup {
        Lookup::Hit(file) => file,
        Lookup::Join(generation) | Lookup::Miss(generation) => match generation.finished().await {
            GenerationState::Complete(file) => file,
            GenerationState::Failed(failure) => return Err(failure_error(failure)),
            GenerationState::Running => return Err(Error::GenerationFailed),
        },
    };
    let body = format!("{}  {}\n", hex::encode(file.sha256), resolution.filename);
    log.status = 200;
    log.emit("checksum", body.len() as u64);
    let mut response = if method == Method::HEAD {
        let mut response = Response::new(Body::empty());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        response
    } else {
        Response::new(Body::from(body))
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(X_GITBALL_COMMIT, header_value(&resolution.resolved.commit));
    headers.insert(X_GITBALL_CACHE, HeaderValue::from_static(log.cache));
    Ok(response)
}

fn resolve(app: &App, request: &Parts, archive: ArchiveRequest) -> Result<Resolution, Error> {
    let subtree = url::query_param(request.uri.query(), "path")?
        .map(|path| url::validate_subtree(&path))
        .transpose()?;
    let repository = app.repos.open(&archive.owner, &archive.repo)?;
    let resolved = repository.resolve(&archive.reference)?;
    if let Some(subtree) = &subtree
        && !repository.has_path(&resolved.commit, subtree)?
    {
        return Err(Error::SubtreeNotFound);
    }
    let name = format!(
        "{}-{}",
        archive.repo,
        url::label(&resolved.kind, &resolved.commit)
    );
    let compression = match archive.format {
        Format::TarGz => Compression::Gzip(app.gzip_level),
        Format::TarZst => Compression::Zstd(app.zstd_level),
        Format::Tar | Format::Zip => Compression::None,
    };
    let spec = Spec {
        git_dir: repository.git_dir().to_path_buf(),
        commit: resolved.commit.clone(),
        format: archive.format,
        prefix: format!("{name}/"),
        subtree,
        compression,
    };
    let etag = format!("\"{}-{}\"", resolved.commit, spec.variant());
    let filename = format!("{name}.{}", archive.format.ext());
    Ok(Resolution {
        request: archive,
        resolved,
        spec,
        filename,
        etag,
    })
}

fn archive_response(
    resolution: &Resolution,
    complete: Option<&CacheFile>,
    status: StatusCode,
    range: Option<(u64, u64)>,
    body: Body,
    cache: &'static str,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    common_headers(headers, resolution);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(resolution.request.format.content_type()),
    );
    headers.insert(X_GITBALL_CACHE, HeaderValue::from_static(cache));
    if let Some(file) = complete {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let digest = base64::engine::general_purpose::STANDARD.encode(file.sha256);
        headers.insert(REPR_DIGEST, header_value(&format!("sha-256=:{digest}:")));
        let length = match range {
            Some((start, end)) => {
                headers.insert(
                    header::CONTENT_RANGE,
                    header_value(&format!("bytes {start}-{end}/{}", file.len)),
                );
                end - start + 1
            }
            None => file.len,
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// Headers every archive response carries, 304 included.
fn common_headers(headers: &mut HeaderMap, resolution: &Resolution) {
    let Resolution {
        request,
        resolved,
        filename,
        etag,
        ..
    } = resolution;
    headers.insert(header::ETAG, header_value(etag));
    let modified =
        SystemTime::UNIX_EPOCH + Duration::from_secs(resolved.committer_time.max(0) as u64);
    headers.insert(
        header::LAST_MODIFIED,
        header_value(&httpdate::fmt_http_date(modified)),
    );
    headers.insert(X_GITBALL_COMMIT, header_value(&resolved.commit));
    headers.insert(
        header::CONTENT_DISPOSITION,
        header_value(&format!("attachment; filename={filename}")),
    );
    let immutable = url::immutable_path(
        &request.owner,
        &request.repo,
        &resolved.commit,
        request.format,
    );
    headers.insert(
        header::LINK,
        header_value(&format!("<{immutable}>; rel=\"immutable\"")),
    );
    // A commit URL never changes; a branch or tag URL may move.
    let cache_control = if resolved.kind == RefKind::Commit && request.reference == resolved.commit
    {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=60"
    };
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
}

/// Values built from validated parts (hex, names of `[A-Za-z0-9._/+@=-]`)
/// are always valid header values.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Error> {
    let Some(expected) = &app.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

/// `If-None-Match`: a list of entity tags or `*` (weak comparison, RFC 9110).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|value| {
            value
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
        })
}

/// One `Range: bytes=…` on a complete archive of `len` bytes; an `If-Range`
/// that does not match the ETag means "send it all".
fn requested_range(headers: &HeaderMap, etag: &str, len: u64) -> Result<Option<(u64, u64)>, Error> {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok())
        && if_range.trim() != etag
    {
        return Ok(None);
    }
    parse_range(range, len)
}

/// Parses a single byte range. `Ok(None)`: ignore the header (not bytes,
/// several ranges, or malformed). Inclusive bounds.
pub fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, Error> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let unsatisfiable = Error::RangeNotSatisfiable {
        complete_length: len,
    };
    match (first.trim(), last.trim()) {
        ("", "") => Ok(None),
        ("", suffix) => {
            let Ok(suffix) = suffix.parse::<u64>() else {
                return Ok(None);
            };
            if suffix == 0 || len == 0 {
                return Err(unsatisfiable);
            }
            Ok(Some((len.saturating_sub(suffix), len - 1)))
        }
        (first, last) => {
            let Ok(first) = first.parse::<u64>() else {
                return Ok(None);
            };
            let last = if last.is_empty() {
                len.saturating_sub(1)
            } else {
                let Ok(last) = last.parse::<u64>() else {
                    return Ok(None);
                };
                if last < first {
                    return Ok(None);
                }
                last.min(len.saturating_sub(1))
            };
            if first >= len {
                return Err(unsatisfiable);
            }
            Ok(Some((first, last)))
        }
    }
}

fn failure_error(failure: Failure) -> Error {
    match failure {
        Failure::Busy => Error::Busy,
        Failure::Cancelled => Error::ShuttingDown,
        Failure::Failed => Error::GenerationFailed,
        Failure::Timeout => Error::GenerationTimeout,
        Failure::TooLarge => Error::TooLarge,
    }
}

/// Accepts a client's `X-Request-Id` when it is sane, else makes one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= LONGEST_REQUEST_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(|| format!("{:032x}", rand::random::<u128>()), str::to_owned)
}

fn method_not_allowed() -> Response {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "only GET and HEAD are allowed",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// The one mapping from [`Error`] to status and JSON body.
pub fn error_response(error: &Error) -> Response {
    let (status, code) = match error {
        Error::Url(UrlError::NotAnArchiveUrl) => (StatusCode::NOT_FOUND, "not_found"),
        Error::Url(error) => (StatusCode::BAD_REQUEST, error.code()),
        Error::RepoNotFound => (StatusCode::NOT_FOUND, "repo_not_found"),
        Error::RefNotFound => (StatusCode::NOT_FOUND, "ref_not_found"),
        Error::SubtreeNotFound => (StatusCode::NOT_FOUND, "path_not_found"),
        Error::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Error::RangeNotSatisfiable { .. } => {
            (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable")
        }
        Error::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        Error::GenerationFailed => (StatusCode::INTERNAL_SERVER_ERROR, "generation_failed"),
        Error::GenerationTimeout => (StatusCode::INTERNAL_SERVER_ERROR, "generation_timeout"),
        Error::TooLarge => (StatusCode::INTERNAL_SERVER_ERROR, "archive_too_large"),
        Error::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    };
    let mut response = json_error(status, code, &error.to_string());
    let headers = response.headers_mut();
    match error {
        Error::Busy | Error::ShuttingDown => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        Error::Unauthorized => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Error::RangeNotSatisfiable { complete_length } => {
            headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{complete_length}")),
            );
        }
        _ => {}
    }
    response
}

pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_parse() {
        assert_eq!(parse_range("bytes=0-99", 1000).unwrap(), Some((0, 99)));
        assert_eq!(parse_range("bytes=900-", 1000).unwrap(), Some((900, 999)));
        assert_eq!(parse_range("bytes=-100", 1000).unwrap(), Some((900, 999)));
        assert_eq!(parse_range("bytes=-5000", 1000).unwrap(), Some((0, 999)));
        assert_eq!(
            parse_range("bytes=990-5000", 1000).unwrap(),
            Some((990, 999))
        );
    }

    #[test]
    fn odd_ranges_are_ignored_or_unsatisfiable() {
        assert_eq!(parse_range("items=0-1", 1000).unwrap(), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000).unwrap(), None);
        assert_eq!(parse_range("bytes=5-1", 1000).unwrap(), None);
        assert_eq!(parse_range("bytes=x-1", 1000).unwrap(), None);
        assert!(parse_range("bytes=1000-", 1000).is_err());
        assert!(parse_range("bytes=-0", 1000).is_err());
    }

    #[test]
    fn if_none_match_accepts_lists_star_and_weak_tags() {
        let mut headers = HeaderMap::new();
        let etag = "\"abc-tar\"";
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc-tar\""),
        );
        assert!(if_none_match(&headers, etag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&headers, etag));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!if_none_match(&headers, etag));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(REQUEST_ID, HeaderValue::from_static("a b"));
        assert_eq!(request_id(&headers).len(), 32);
    }
}
