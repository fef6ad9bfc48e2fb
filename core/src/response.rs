//! The answers both tiers give the same way: the JSON error body
//! (`{"error": code, "message": text}`), `405` with `Allow`, `/healthz` and
//! `/metrics`. Each tier's `error` module maps its own error type onto
//! [`json_error`]; nothing else builds an error body.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::protocol::code;

/// The one error body: `{"error": code, "message": text}` as JSON, never
/// stored by a cache (`no-store`): a cached `404` for a token that becomes
/// valid, or a cached `503`, would outlive its cause.
///
/// `Content-Length` is a header of its own, next to the others, rather than
/// left to hyper, which writes it after every header the tiers add later:
/// the proxy's own `404` for a private repository's refused token would
/// then differ, in the order of its lines, from the archiver's `404` for a
/// repository that does not exist, which the proxy passes on (attack).
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::CONTENT_LENGTH, HeaderValue::from(body.len())),
        ],
        body,
    )
        .into_response()
}

/// A prewarm's answer on either tier: `202` with its JSON body (a line),
/// never stored by a cache.
pub fn json_accepted(body: &serde_json::Value) -> Response {
    (
        StatusCode::ACCEPTED,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("{body}\n"),
    )
        .into_response()
}

/// A body with nothing in it and no length said, for a `HEAD` or a `304`
/// whose `GET` would have no length either (an archive being generated):
/// for `Body::empty()` hyper writes `Content-Length: 0`, which on a `HEAD`
/// says the archive is empty and on a `304` contradicts the `200` (RFC
/// 9110, 8.6).
pub fn no_length() -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::empty::<
        Result<bytes::Bytes, std::convert::Infallible>,
    >())
}

/// Only `GET` and `HEAD` exist on either tier.
pub fn is_allowed(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// `405` with `Allow: GET, HEAD`.
pub fn method_not_allowed() -> Response {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        code::METHOD_NOT_ALLOWED,
        "only GET and HEAD are allowed",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// `/healthz`: `200` and `{"status":"ok"}` while the process serves.
pub async fn healthz(method: Method) -> Response {
    if !is_allowed(&method) {
        return method_not_allowed();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}\n",
    )
        .into_response()
}

/// `/metrics`: the Prometheus text exposition.
pub fn metrics(method: &Method, handle: &PrometheusHandle) -> Response {
    if !is_allowed(method) {
        return method_not_allowed();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(handle),
    )
        .into_response()
}

/// What the admin listener (`--admin-listen`) answers for any path but
/// `/healthz` and `/metrics`: `404 not_found`.
pub async fn admin_not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        code::NOT_FOUND,
        "the admin listener serves /healthz and /metrics only",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_not_allowed_names_the_allowed_methods() {
        let response = method_not_allowed();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
