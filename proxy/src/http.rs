//! Routes and the life of one request, in named phases:
//!
//! 1. **identify**: take the client's `X-Request-Id` if it is sane, else
//!    make one; it is forwarded to the archiver and echoed to the client.
//! 2. **parse**: method (`GET`/`HEAD`, else `405`), the archive URL and the
//!    `path` query with the shared grammar (`gitball_core::url`). A bad
//!    request is answered here, before any upstream is contacted.
//! 3. **route**: the first matching route; for a private route, the signed
//!    token. No route, or no valid token, is the `404` of an unknown
//!    repository.
//! 4. **forward**: candidates in order, with failover (`forward`).
//! 5. **respond**: the chosen response's status and allowlisted headers,
//!    and its body through the `pipe`. On a private route `Cache-Control`
//!    says `private`: a shared cache keyed on the URL would otherwise keep
//!    serving the archive after the token expired.
//! 6. **log**: one structured line per request when it is over, the record
//!    both tiers share (`gitball_core::log::RequestLog`) — for a download
//!    that is when the body ends, so the line carries the bytes sent and how
//!    the download ended; a client that leaves before any answer is logged
//!    as `499` — plus `requests_total{code}` and the duration histogram.
//!
//! Every forwarded request carries `X-Gitball-Client`: the client's address
//! (`client`), which keys the archiver's crawler budget. A
//! `/{owner}/{repo}/prewarm/{ref}` path goes to `prewarm` instead.
//!
//! The archiver is always asked the canonical URL
//! `/{owner}/{repo}/archive/{ref}.{ext}[.sha256]`, whichever URL shape the
//! client used; the `path` query is passed on, the `token` is not.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use gitball_core::log::{Ending, Fault, RequestLog, Tier};
use gitball_core::protocol::{REQUEST_ID, X_GITBALL_CLIENT, X_GITBALL_WANT_LENGTH};
use gitball_core::request_id::request_id;
use gitball_core::response;
use gitball_core::server::OnConnection;
use gitball_core::url;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::client::{TrustedProxies, client_address};
use crate::error::Error;
use crate::forward::{
    FORWARDED_REQUEST_HEADERS, Forwarder, UpstreamRequest, UpstreamResponse, body_length,
    is_passed_through,
};
use crate::pipe::{Pipe, Timers, Whole};
use crate::prewarm::Prewarm;
use crate::resume::Resume;
use crate::routes::Routes;
use crate::sign::SigningKey;

/// Everything a request needs, shared by all of them. A clone shares
/// everything, the upstream connection pool included.
#[derive(Clone)]
pub struct AppState {
    pub routes: Arc<Routes>,
    pub forwarder: Forwarder,
    pub signing_key: Option<SigningKey>,
    /// `--max-token-ttl`: how far ahead a token's expiry may be.
    pub max_token_ttl: Duration,
    pub client_idle_timeout: Duration,
    /// `--park-after` (zero: never).
    pub park_after: Duration,
    /// `--trusted-proxies`.
    pub trusted_proxies: TrustedProxies,
    /// `--prewarm-token-file` and formats; `None`: prewarm is off.
    pub prewarm: Option<Prewarm>,
    pub metrics: PrometheusHandle,
    /// A body the upstream connection's reads hold whole is handed to
    /// hyper as it is (`pipe::Whole`), not through a [`Pipe`]; false only
    /// where a test compares the two.
    pub whole_bodies: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    health_and_metrics().fallback(archive).with_state(state)
}

/// What serves the proxy's listener: [`router`], with archive URLs (every
/// path but `/healthz` and `/metrics`, which the router's fallback would
/// give [`archive`]) sent to [`archive`] directly, past axum's routing, as
/// the router's fallback route answers them (see [`ProxyService`]).
pub fn service(state: Arc<AppState>) -> ProxyService {
    ProxyService {
        router: router(state.clone()),
        state,
    }
}

/// [`service`]'s service.
#[derive(Clone)]
pub struct ProxyService {
    router: Router,
    state: Arc<AppState>,
}

impl tower::Service<Request> for ProxyService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        <Router as tower::Service<Request>>::Future,
        futures_util::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::future::Either;
        if matches!(request.uri().path(), "/healthz" | "/metrics") {
            return Either::Left(self.router.call(request));
        }
        let state = self.state.clone();
        Either::Right(Box::pin(async move {
            let method = request.method().clone();
            let mut response = archive(State(state), request).await;
            // What axum does to a route's answer, the fallback's included:
            // a length from an exact body, no body for a `HEAD`.
            if !response.headers().contains_key(header::CONTENT_LENGTH)
                && let Some(length) = axum::body::HttpBody::size_hint(response.body()).exact()
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
            if method == Method::HEAD {
                *response.body_mut() = Body::empty();
            }
            Ok(response)
        }))
    }
}

/// The admin listener's routes (`--admin-listen`): `/healthz` and
/// `/metrics`, nothing else.
pub fn admin_router(state: Arc<AppState>) -> Router {
    health_and_metrics()
        .fallback(response::admin_not_found)
        .with_state(state)
}

/// `/healthz` and `/metrics`, as both listeners serve them.
fn health_and_metrics() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", any(response::healthz))
        .route("/metrics", any(metrics))
}

/// Whether a `Connection` header's value names the header `name`.
fn names(connection: &HeaderValue, name: &header::HeaderName) -> bool {
    connection
        .as_bytes()
        .split(|&byte| byte == b',')
        .any(|token| {
            token
                .trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    // Either checked by the request-id rule or hex: a valid header value.
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

async fn metrics(State(state): State<Arc<AppState>>, method: Method) -> Response {
    // Expired ejections are set back to 0 before they are read.
    state.forwarder.health().sweep();
    response::metrics(&method, &state.metrics)
}

/// Everything under an archive URL (and every other path: they get the
/// URL grammar's `404`).
async fn archive(State(state): State<Arc<AppState>>, request: Request) -> Response {
    // Only the head matters (GET and HEAD have no body), and unlike the
    // body it can be borrowed across awaits.
    let (request, _body) = request.into_parts();
    let request_id = request_id(&request.headers);
    let mut log = RequestLog::new(
        Tier::Proxy,
        request_id.clone(),
        request.method.clone(),
        request.uri.path(),
        crate::metrics::request_finished,
    );
    log.on_connection(
        request
            .extensions
            .get::<OnConnection>()
            .map(|connection| &connection.writes),
    );
    log.attempts = Some(0);
    if url::is_prewarm_path(request.uri.path()) {
        let response = match crate::prewarm::serve(&state, &request, &request_id, &mut log).await {
            Ok(response) => response,
            Err(error) => {
                log.failed(error.status(), error.fault(), error.log_text());
                error.into_response()
            }
        };
        log.answered(&response);
        return with_request_id(response, &request_id);
    }
    let response = match handle(&state, &request, &request_id, &mut log).await {
        // It carries the request id already.
        Ok(answer) => return respond(&state, &request, answer, log),
        Err(error) => {
            log.failed(error.status(), error.fault(), error.log_text());
            let response = error.into_response();
            log.answered(&response);
            response
        }
    };
    with_request_id(response, &request_id)
}

/// The upstream response chosen for a request.
struct Answer {
    response: UpstreamResponse,
    upstream: Arc<str>,
    /// The route needed a token: no shared cache may store the answer.
    private: bool,
    /// How the download gets its upstream back after parking.
    resume: Option<Resume>,
}

/// Phases 2 to 4: parse, route, forward.
async fn handle(
    state: &AppState,
    request: &Parts,
    request_id: &str,
    log: &mut RequestLog,
) -> Result<Answer, Error> {
    // Parse.
    if !response::is_allowed(&request.method) {
        return Err(Error::MethodNotAllowed);
    }
    let archive = url::parse_path(request.uri.path())?;
    let query = request.uri.query();
    let subtree = url::query_param(query, "path")?
        .map(|path| url::validate_subtree(&path))
        .transpose()?;

    // Route.
    let mut repository = String::with_capacity(archive.owner.len() + 1 + archive.repo.len());
    repository.push_str(&archive.owner);
    repository.push('/');
    repository.push_str(&archive.repo);
    let (mut candidates, private) = {
        let table = state.routes.current();
        let route = table.lookup(&repository).ok_or(Error::RepositoryNotFound)?;
        if route.private {
            authorize(state, &repository, query, log)?;
        }
        (route.candidates(&repository), route.private)
    };
    let ejected = state.forwarder.health().order(&mut candidates);

    // Forward.
    let path_and_query = archive.canonical_path(subtree.as_deref());
    let parsed = canonical_as_sent(&request.uri, &path_and_query);
    let upstream_request = UpstreamRequest {
        method: request.method.clone(),
        path_and_query,
        parsed,
        headers: forwarded_headers(
            &request.headers,
            request_id,
            request.version,
            client_of(state, request),
        ),
    };
    let all_ejected = ejected == candidates.len();
    let forwarded = state
        .forwarder
        .forward_telling(
            &candidates,
            all_ejected,
            &upstream_request,
            |upstream, attempts| {
                log.upstream = Some(upstream.clone());
                log.attempts = Some(attempts);
            },
        )
        .await;
    match forwarded {
        Ok(forwarded) => {
            log.upstream = Some(forwarded.upstream.clone());
            log.attempts = Some(forwarded.attempts);
            // For parking, and for a splice (which asks for the rest by
            // range just the same).
            let resume = Resume::for_response(
                &forwarded.response,
                &forwarded.upstream,
                &state.forwarder,
                &candidates,
                &upstream_request,
            );
            Ok(Answer {
                response: forwarded.response,
                upstream: forwarded.upstream,
                private,
                resume,
            })
        }
        Err(failed) => {
            log.upstream = failed.upstream;
            log.attempts = Some(failed.attempts);
            Err(failed.error)
        }
    }
}

/// The client's request target, parsed already, when it is `canonical`
/// byte for byte (no other shape, alias or query): it can be sent upstream
/// as it is ([`UpstreamRequest::parsed`]).
fn canonical_as_sent(uri: &http::Uri, canonical: &str) -> Option<http::uri::PathAndQuery> {
    uri.path_and_query()
        .filter(|sent| sent.as_str() == canonical)
        .cloned()
}

/// Phase 5: the client response from the upstream one, with the request
/// id. The log moves into the pipe when there is a body, so it is written
/// when the body ends.
fn respond(state: &AppState, request: &Parts, answer: Answer, mut log: RequestLog) -> Response {
    let mut upstream_response = answer.response;
    let status = upstream_response.status();
    log.status = Some(status);
    if status.is_server_error() {
        // Passed through after every candidate failed.
        log.fault = Some(Fault::Upstream);
    } else if status.is_client_error() {
        // The archiver's 4xx (`ref_not_found`, `path_not_found`, …).
        log.fault = Some(Fault::Client);
    }
    // Replaced when there is a body; kept, with no length of its own, for
    // a HEAD, a 304 or a 204, whose length is the archiver's or none.
    let mut response = Response::new(gitball_core::response::no_length());
    *response.status_mut() = status;
    // What the head held of the names read below, noted as it was read:
    // the map is not searched for one it did not hold.
    let present = upstream_response.body().present();
    // A joined generation's cut is counted by the request that started it
    // (`Cut::Joined`).
    let joined = present.joined;
    // The upstream's own map, less what is not passed on, rather than a
    // new map filled header by header (its appends, hashing each name, and
    // the two maps were a twentieth of a small hit's instructions). A
    // removal may move the upstream's last header into the removed one's
    // place: the order of different field names means nothing (RFC 9110,
    // section 5.3), and one name's values keep theirs.
    let mut headers = std::mem::take(upstream_response.headers_mut());
    // A `Content-Length` beside `Transfer-Encoding` does not frame the
    // body (RFC 9112, section 6.3): not passed on, or the client would
    // frame by it.
    let by_coding = present.transfer_encoding && headers.contains_key(header::TRANSFER_ENCODING);
    // Headers named in `Connection` are hop-by-hop (RFC 9110, section
    // 7.6.1); an archiver names none. Not the length, which the proxy's
    // own framing goes by (`forward::framed`): dropped, the client would
    // get a chunked answer that a splice then wrote raw bytes into (review).
    let connection: Vec<HeaderValue> = if present.connection {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    // The archiver echoes the request id it was sent: that one value is
    // passed on as it is, rather than removed and written anew.
    let echoed = {
        let mut ids = headers.get_all(REQUEST_ID).iter();
        ids.next()
            .is_some_and(|id| id.as_bytes() == log.request_id.as_bytes())
            && ids.next().is_none()
            && !connection
                .iter()
                .any(|connection| names(connection, &REQUEST_ID))
    };
    let own_id = if echoed {
        None
    } else {
        // Either checked by the request-id rule or hex: a valid header value.
        HeaderValue::from_str(&log.request_id).ok()
    };
    let passed = |name: &header::HeaderName| {
        (is_passed_through(name) || (echoed && name == REQUEST_ID))
            && !(by_coding && name == header::CONTENT_LENGTH)
            && (name == header::CONTENT_LENGTH
                || !connection.iter().any(|connection| names(connection, name)))
    };
    // One pass to find what is not passed on (an archiver's `Date` and
    // `X-Request-Id`), then the removals: searching again from the start
    // after each removal judged every name three times over.
    let mut dropped: [Option<header::HeaderName>; 4] = Default::default();
    let mut more_dropped = Vec::new();
    for (index, name) in headers.keys().filter(|name| !passed(name)).enumerate() {
        match dropped.get_mut(index) {
            Some(slot) => *slot = Some(name.clone()),
            None => more_dropped.push(name.clone()),
        }
    }
    for name in dropped.iter().flatten().chain(&more_dropped) {
        headers.remove(name);
    }
    *response.headers_mut() = headers;
    let headers = response.headers_mut();
    if let Some(own_id) = own_id {
        headers.insert(REQUEST_ID, own_id);
    }
    if answer.private {
        let cache_control = private_cache_control(headers.get(header::CACHE_CONTROL));
        headers.insert(header::CACHE_CONTROL, cache_control);
    }
    let has_body = request.method != Method::HEAD
        && status != StatusCode::NOT_MODIFIED
        && status != StatusCode::NO_CONTENT
        && body_length(&upstream_response) != Some(0);
    if has_body
        && state.whole_bodies
        && let Some(body) = upstream_response.body_mut().take_whole()
    {
        // Nothing left upstream to wait for, fail, park or splice: the
        // download is settled as the pipe settles a body it hands over in
        // one chunk, complete once handed to hyper.
        let body = Whole::new(body, &answer.upstream, status, state.forwarder.health());
        log.ending = Some(Ending::Complete);
        log.bytes = body.bytes();
        drop(log);
        *response.body_mut() = Body::new(body);
        return response;
    }
    if has_body {
        let on_connection = request.extensions.get::<OnConnection>();
        *response.body_mut() = Body::from_stream(
            Pipe::new(
                upstream_response,
                answer.upstream,
                state.forwarder.health().clone(),
                Timers {
                    idle_timeout: state.client_idle_timeout,
                    upstream_silence: state.forwarder.header_timeout(),
                    park_after: state.park_after,
                },
                answer.resume,
                move |end| {
                    log.ending = Some(end.ending);
                    log.bytes = end.bytes;
                    if let Some(upstream) = end.resumes.upstream {
                        log.upstream = Some(upstream);
                        log.attempts = Some(log.attempts.unwrap_or(0) + end.resumes.attempts);
                    }
                    if end.ending == Ending::Aborted {
                        log.fault = Some(Fault::Upstream);
                    }
                    drop(log);
                },
            )
            .joined(joined)
            .on_connection(
                on_connection.map(|connection| connection.writes.clone()),
                on_connection.and_then(|connection| connection.takeover.clone()),
            ),
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
    // Taken as written, not percent-decoded, and only once: a token has one
    // spelling in a URL too (docs/security.md), so a deny-list or a log
    // search keyed on its text (nginx's `$arg_token` is the first, raw)
    // sees every use of it. Its characters never need escaping.
    let mut tokens =
        query
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| match pair.split_once('=') {
                Some(("token", value)) => Some(value),
                None if pair == "token" => Some(""),
                _ => None,
            });
    let token = tokens.next().unwrap_or_default();
    if tokens.next().is_some() {
        log.error = Some("token given twice".to_owned());
        return Err(Error::RepositoryNotFound);
    }
    key.verify(repository, token, state.max_token_ttl)
        .map_err(|refused| {
            log.error = Some(refused.to_string());
            Error::RepositoryNotFound
        })
}

/// `Cache-Control` for a private route's answer: the archiver's directives
/// with `public` replaced by `private`, so the client's own cache may keep
/// the archive as long as the archiver said (it had the token), and no
/// shared cache stores it. `private` is set even when the archiver sent
/// nothing, so that a cache's heuristics cannot make the answer shareable.
/// (The archiver's directives are plain tokens: no quoted commas to split.)
fn private_cache_control(upstream: Option<&HeaderValue>) -> HeaderValue {
    let mut directives = vec!["private"];
    if let Some(text) = upstream.and_then(|value| value.to_str().ok()) {
        directives.extend(text.split(',').map(str::trim).filter(|directive| {
            let name = directive.split('=').next().unwrap_or_default().trim();
            !name.is_empty()
                && !name.eq_ignore_ascii_case("public")
                && !name.eq_ignore_ascii_case("private")
        }));
    }
    // Parts of a valid header value, joined with ", ": still valid.
    HeaderValue::from_str(&directives.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("private"))
}

/// The client the request is for (`client`); `None` only without a socket
/// (in-process tests).
pub fn client_of(state: &AppState, request: &Parts) -> Option<IpAddr> {
    let peer = request.extensions.get::<OnConnection>()?.peer;
    Some(client_address(
        peer.ip(),
        &request.headers,
        &state.trusted_proxies,
    ))
}

/// The request headers the archiver gets: `Range`, `If-None-Match`,
/// `If-Range` and `If-Modified-Since` as sent (unless the client's
/// `Connection` names them), the request id and the client's address
/// (whatever `X-Gitball-Client` the client sent is not among them).
pub fn forwarded_headers(
    client: &HeaderMap,
    request_id: &str,
    version: Version,
    address: Option<IpAddr>,
) -> HeaderMap {
    // Room for all of them at once (the listed ones, the request id, the
    // client's address, the length wish, and the `Host` the client adds):
    // no regrowth while filling it.
    let mut headers = HeaderMap::with_capacity(FORWARDED_REQUEST_HEADERS.len() + 4);
    // One pass over the client's headers rather than a hashed look-up of
    // each name that may be forwarded (five, one a custom name hashed byte
    // by byte): a client sends a few headers, wrk only `Host`. A name's
    // values come in the order sent, its first one first.
    let mut asked = None;
    let mut connection = false;
    for (name, value) in client {
        if FORWARDED_REQUEST_HEADERS.contains(name) {
            headers.append(name.clone(), value.clone());
        } else if asked.is_none() && name == X_GITBALL_WANT_LENGTH {
            asked = Some(value.as_bytes() == b"1");
        } else if name == header::CONNECTION {
            connection = true;
        }
    }
    if connection {
        // A header the client names in `Connection` is for this hop only
        // (RFC 9110, section 7.6.1: a proxy removes it before forwarding),
        // whatever its name, as the archiver's are on the way back.
        let named = |name: &header::HeaderName| {
            client
                .get_all(header::CONNECTION)
                .iter()
                .any(|connection| names(connection, name))
        };
        for name in &FORWARDED_REQUEST_HEADERS {
            if named(name) {
                headers.remove(name);
            }
        }
        if named(&X_GITBALL_WANT_LENGTH) {
            asked = None;
        }
    }
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, value);
    }
    if let Some(address) = address {
        // An address's text is a valid header value.
        if let Ok(value) = HeaderValue::from_bytes(address_text(address, &mut [0; 64])) {
            headers.insert(X_GITBALL_CLIENT, value);
        }
    }
    // An HTTP/1.0 client gets a close-delimited body: an upstream failure
    // midway would look like a clean end. Ask for complete archives only,
    // which come with a length. A front that speaks HTTP/1.1 to the proxy
    // for its HTTP/1.0 clients (nginx) says so with the same header; from
    // anyone else it costs only the asker the wait.
    // A resume (a `Range` without `If-Range`) is answered with the range
    // once the archive is complete (docs/http.md#range-requests): saying so
    // gives the wait the complete archive's time, not `--header-timeout`.
    let resume = headers.contains_key(header::RANGE) && !headers.contains_key(header::IF_RANGE);
    if version < Version::HTTP_11 || asked == Some(true) || resume {
        headers.insert(X_GITBALL_WANT_LENGTH, HeaderValue::from_static("1"));
    }
    headers
}

/// `address` as its `Display` writes it, in `buffer`: an IPv4 address
/// digit by digit (the formatting machinery and a `String` cost a proxied
/// hit more than the rest of its request headers).
fn address_text(address: IpAddr, buffer: &mut [u8; 64]) -> &[u8] {
    let mut length = 0;
    match address {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    buffer[length] = b'.';
                    length += 1;
                }
                if octet >= 100 {
                    buffer[length] = b'0' + octet / 100;
                    length += 1;
                }
                if octet >= 10 {
                    buffer[length] = b'0' + octet / 10 % 10;
                    length += 1;
                }
                buffer[length] = b'0' + octet % 10;
                length += 1;
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write as _;
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            // An IPv6 address's text is at most 45 bytes.
            let _ = write!(cursor, "{address}");
            length = cursor.position() as usize;
        }
    }
    &buffer[..length]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        for address in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.9.255",
            "203.0.113.99",
            "255.255.255.255",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:203.0.113.9",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let address: IpAddr = address.parse().unwrap();
            assert_eq!(
                address_text(address, &mut [0; 64]),
                address.to_string().as_bytes()
            );
        }
        for octet in 0..=255u8 {
            let address = IpAddr::from([octet, 0, 9, octet]);
            assert_eq!(
                address_text(address, &mut [0; 64]),
                address.to_string().as_bytes()
            );
        }
    }

    fn private_of(upstream: Option<&'static str>) -> String {
        let upstream = upstream.map(HeaderValue::from_static);
        private_cache_control(upstream.as_ref())
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn private_cache_control_keeps_the_archivers_freshness() {
        assert_eq!(
            private_of(Some("public, max-age=31536000, immutable")),
            "private, max-age=31536000, immutable"
        );
        assert_eq!(
            private_of(Some("public, max-age=60")),
            "private, max-age=60"
        );
        assert_eq!(private_of(Some("max-age=60")), "private, max-age=60");
    }

    #[test]
    fn private_cache_control_never_says_public() {
        assert_eq!(private_of(None), "private");
        assert_eq!(private_of(Some("")), "private");
        assert_eq!(private_of(Some("PUBLIC")), "private");
        assert_eq!(
            private_of(Some("Public ,max-age=5,, private=\"x\", public")),
            "private, max-age=5"
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
        client.insert(X_GITBALL_CLIENT, HeaderValue::from_static("6.6.6.6"));
        let forwarded = forwarded_headers(
            &client,
            "chosen-id",
            Version::HTTP_11,
            Some("203.0.113.9".parse().unwrap()),
        );
        assert_eq!(forwarded[header::RANGE], "bytes=0-99");
        assert_eq!(forwarded[header::IF_NONE_MATCH], "\"abc-tar\"");
        assert_eq!(forwarded[header::IF_RANGE], "\"abc-tar\"");
        assert_eq!(forwarded[REQUEST_ID], "chosen-id");
        assert!(forwarded.get(header::AUTHORIZATION).is_none());
        assert!(forwarded.get(header::COOKIE).is_none());
        assert_eq!(forwarded[X_GITBALL_CLIENT], "203.0.113.9");
        assert_eq!(forwarded.len(), 5);
        let mut front = client.clone();
        front.insert(X_GITBALL_WANT_LENGTH, HeaderValue::from_static("1"));
        let behind_nginx = forwarded_headers(&front, "chosen-id", Version::HTTP_11, None);
        assert_eq!(
            behind_nginx[X_GITBALL_WANT_LENGTH], "1",
            "asked by the front"
        );
        let old = forwarded_headers(&client, "chosen-id", Version::HTTP_10, None);
        assert!(old.get(X_GITBALL_CLIENT).is_none());
        assert_eq!(old[X_GITBALL_WANT_LENGTH], "1");
    }

    /// A client's request target is sent upstream as it is only when it
    /// is the canonical URL itself; any other shape is asked for by the
    /// canonical one.
    #[test]
    fn only_a_canonical_target_is_sent_as_the_client_sent_it() {
        let canonical = "/acme/widget/archive/v1.0.tar.gz";
        for (sent, kept) in [
            ("/acme/widget/archive/v1.0.tar.gz", true),
            ("http://proxy.example/acme/widget/archive/v1.0.tar.gz", true),
            ("/acme/widget/archive/v1.0.tgz", false),
            ("/acme/widget/archive/v1.0.tar.gz?token=abc", false),
            ("/acme/widget/archive/v1%2E0.tar.gz", false),
            ("/acme/widget/archive/v1.0.tar.gz?", false),
        ] {
            let uri: http::Uri = sent.parse().unwrap();
            let parsed = canonical_as_sent(&uri, canonical);
            assert_eq!(parsed.is_some(), kept, "{sent}");
            if let Some(parsed) = parsed {
                assert_eq!(parsed.as_str(), canonical);
            }
        }
        let with_subtree = "/acme/widget/archive/v1.0.tar.gz?path=docs%20x";
        assert!(canonical_as_sent(&with_subtree.parse().unwrap(), with_subtree).is_some());
    }

    /// Each forwarded header's values reach the archiver all, in the order
    /// sent, whatever the other headers around them; only the first
    /// `X-Gitball-Want-Length` counts. (Guards the one pass over the
    /// client's headers that replaced a look-up per name.)
    #[test]
    fn forwarded_values_keep_their_order_and_the_first_length_wish_counts() {
        let mut client = HeaderMap::new();
        let sent = [
            (header::IF_NONE_MATCH, "\"a\""),
            (header::USER_AGENT, "curl"),
            (X_GITBALL_WANT_LENGTH, "0"),
            (header::IF_NONE_MATCH, "\"b\""),
            (header::IF_MODIFIED_SINCE, "Tue, 14 Nov 2023 22:13:20 GMT"),
            (X_GITBALL_WANT_LENGTH, "1"),
            (header::RANGE, "bytes=0-1"),
            (header::IF_NONE_MATCH, "\"c\""),
            (header::RANGE, "bytes=5-"),
            // Not a resume, which would ask for the length itself.
            (header::IF_RANGE, "\"c\""),
        ];
        for (name, value) in &sent {
            client.append(name.clone(), HeaderValue::from_static(value));
        }
        let forwarded = forwarded_headers(&client, "chosen-id", Version::HTTP_11, None);
        let values = |name| {
            forwarded
                .get_all(name)
                .iter()
                .map(|value| value.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(values(header::IF_NONE_MATCH), ["\"a\"", "\"b\"", "\"c\""]);
        assert_eq!(values(header::RANGE), ["bytes=0-1", "bytes=5-"]);
        assert_eq!(
            values(header::IF_MODIFIED_SINCE),
            ["Tue, 14 Nov 2023 22:13:20 GMT"]
        );
        assert!(forwarded.get(header::USER_AGENT).is_none());
        assert!(
            forwarded.get(X_GITBALL_WANT_LENGTH).is_none(),
            "the first wish is not `1`"
        );
        assert_eq!(forwarded.len(), 8, "{forwarded:?}");
    }

    /// A resume, a `Range` without `If-Range`, asks for the length: the
    /// archiver answers it once the archive is complete
    /// (docs/http.md#range-requests), and the wait is not bounded by
    /// `--header-timeout`. With `If-Range` it does not.
    #[test]
    fn a_resume_asks_for_the_length() {
        let mut client = HeaderMap::new();
        client.insert(header::RANGE, HeaderValue::from_static("bytes=40000-"));
        let forwarded = forwarded_headers(&client, "id", Version::HTTP_11, None);
        assert_eq!(forwarded[X_GITBALL_WANT_LENGTH], "1");
        client.insert(header::IF_RANGE, HeaderValue::from_static("\"c\""));
        let forwarded = forwarded_headers(&client, "id", Version::HTTP_11, None);
        assert!(forwarded.get(X_GITBALL_WANT_LENGTH).is_none());
    }

    /// docs/internal-api.md, "Forwarded request headers": a header the
    /// client names in its `Connection` header is hop-by-hop (RFC 9110,
    /// section 7.6.1) and does not reach the archiver, a forwarded name
    /// or the length wish alike; the others still do. (They were forwarded
    /// as any other value: the request side did not do what the response
    /// side does.)
    #[test]
    fn headers_the_client_names_in_connection_are_not_forwarded() {
        let mut client = HeaderMap::new();
        let sent = [
            (header::CONNECTION, "keep-alive, RANGE"),
            (header::RANGE, "bytes=0-1"),
            (header::IF_NONE_MATCH, "\"a\""),
            (header::IF_RANGE, "\"b\""),
            (X_GITBALL_WANT_LENGTH, "1"),
            (header::CONNECTION, " x-gitball-want-length ,If-Range"),
        ];
        for (name, value) in &sent {
            client.append(name.clone(), HeaderValue::from_static(value));
        }
        let forwarded = forwarded_headers(&client, "chosen-id", Version::HTTP_11, None);
        for named in [header::RANGE, header::IF_RANGE, X_GITBALL_WANT_LENGTH] {
            assert!(
                forwarded.get(&named).is_none(),
                "{named}, named in Connection, was forwarded: {forwarded:?}"
            );
        }
        assert_eq!(forwarded[header::IF_NONE_MATCH], "\"a\"");
        assert!(forwarded.get(header::CONNECTION).is_none());
        // The proxy's own wish (an HTTP/1.0 client's) is not the client's
        // header: it stays.
        let forwarded = forwarded_headers(&client, "chosen-id", Version::HTTP_10, None);
        assert_eq!(forwarded[X_GITBALL_WANT_LENGTH], "1");
    }
}
