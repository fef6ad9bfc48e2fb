//! Attempts and failover: getting response headers from one of a route's
//! candidates.
//!
//! Candidates are tried one at a time, in order (replicas in rendezvous
//! order, then the primary, ejected ones last). The next candidate is tried
//! when an attempt
//!
//! - cannot connect (`connect_error`), or not within `--connect-timeout`
//!   (`connect_timeout`);
//! - gets no response headers within `--header-timeout` (`header_timeout`);
//! - gets a `5xx` (`server_error`): nothing has been sent to the client
//!   yet, so another archiver can still give the whole answer; a `503`
//!   with `Retry-After` (`busy`: the archiver is up, but this request met
//!   its full queue, its connection cap or refs that kept changing) moves on
//!   the same way but does not eject it: a crawler whose own generations
//!   time out in the archiver's queue would otherwise move everyone's
//!   traffic, hits included, to archivers that must generate them anew;
//!   nor does a `500` (`archive_failed`): the archiver answered, and this
//!   archive failed there (git refused its tree, it grew past
//!   `--max-archive-bytes`), which one request for a broken or huge commit
//!   must not turn into everyone's traffic moved off it. A `502`, `504` or
//!   a `503` without `Retry-After` (an intermediary's: the archiver behind
//!   it is down) ejects, as does any other `5xx` (no archiver answers one);
//! - gets a `404` from a replica (`replica_not_found`): the ref may simply
//!   not have been replicated yet, so the primary is asked;
//! - gets a `401` or `403` (`unauthorized`): the archiver refused the
//!   proxy's own `--upstream-token-file`, a configuration error that is not
//!   the client's to see (it ends as `502` if no candidate accepts it);
//! - gets a `429` marked `X-Gitball-Refused` (`too_many_connections`): the
//!   archiver refused the proxy's own connection at its
//!   `--max-connections-per-client`, because it counts this proxy as one
//!   client (a missing `--max-connections-per-client-exempt`). That says
//!   nothing of the end user, whose own limits (the crawler budget's
//!   `429 rate_limited`, unmarked) are passed on as they are; for the
//!   request it is an archiver that cannot take a connection now, as a
//!   `503 overloaded` would be. Logged at most once per 10 s, and it ejects
//!   nothing: the archiver is up.
//!
//! An attempt that fails for a reason of the proxy's own (`overloaded`: no
//! fd or buffer left to open the upstream connection, EMFILE, ENFILE,
//! ENOBUFS, ENOMEM) ends the request at once with `503` + `Retry-After`:
//! the next candidate would fail the same way, and the upstream is not at
//! fault, so it is not ejected (nor marked healthy).
//!
//! A response whose body's end could not be told from a cut (neither
//! `Content-Length` nor chunked, or no length for a complete-only request)
//! is an `error`: passed on, a cut would look like the end.
//!
//! Any other response (`ok`) is the answer, whatever its status: a `404`
//! from the primary, a `400`, a `304` or a `206` are final. Once a response
//! is chosen this module is done; what happens after the first body byte is
//! `pipe`'s business, and there is no failover from there — the client
//! already has part of one archiver's bytes.
//!
//! When every candidate fails: the last `5xx` response, if any, is passed
//! through (it carries the archiver's own reason, e.g. `503` +
//! `Retry-After` when over capacity); otherwise the answer is
//! `503 overloaded` if an archiver refused the proxy's connection
//! (`too_many_connections`: the fleet is up and full), `503 unavailable` if
//! every candidate was already ejected before this request (the whole route
//! is known to be down), `504` if every attempt timed out waiting for
//! headers, and `502` otherwise.
//!
//! Each attempt is counted in `gitball_proxy_upstream_attempts_total
//! {upstream, outcome}`, each move to a next candidate in
//! `gitball_proxy_failovers_total`. Failures eject the upstream
//! (`upstream::Health`); any answer (including a replica's `404`) ends its
//! ejection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::net::TcpStream;

use gitball_core::log::SharedLogEvery;

use crate::error::Error;
use crate::exchange::RequestHead;
use crate::pool::{Pool, PooledBody, SendError};
use crate::routes::{Candidate, Role};
use crate::upstream::{Health, Trial};

/// How long an idle pooled upstream connection is kept, and reused: half
/// the archiver's keep-alive timeout (it closes a connection that sent no
/// new head within `HEADER_READ_TIMEOUT`, 10 s, of its last response), so
/// the proxy rarely sends a request on a connection the archiver is
/// closing at that moment. Such a request is sent again on a new
/// connection (`pool`), which costs a connect. It was 20 s, on the belief
/// that the archiver kept connections longer (mutation review).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many idle connections per upstream in each serving
/// thread's pool; a connection whose response ends past it is closed, not
/// kept for [`POOL_IDLE_TIMEOUT`]. Without a bound a burst left as many
/// idle connections as it had requests in flight (3,000 HEADs: 3,000
/// connections, each an fd here and a connection the archiver counts
/// against its `--max-connections`, for 5 s). 256 is far above what steady
/// traffic keeps busy (a connection is busy only until its response ends;
/// `wrk -c64`'s hits use 64 at most, 32 per thread on 2 CPUs), so it never
/// makes steady traffic reconnect, and a burst leaves at most 256 fds per
/// thread and upstream behind.
pub const POOL_MAX_IDLE_PER_UPSTREAM: usize = 256;

/// The read buffer of each upstream connection, fixed, and so the size of
/// a body chunk. hyper's default is adaptive and grows to ~400 KiB on a
/// fast connection; it lives as long as the download, so with many slow
/// clients it was most of the proxy's memory. A stalled download holds two
/// chunks (see `pipe`), about 0.17 MiB per download with this size; 32 KiB
/// cut that to 0.10 MiB but cost a 1 GiB stream about half its speed
/// (twice the reads and wake-ups per byte), so 64 KiB it is.
pub const UPSTREAM_READ_BUFFER_BYTES: usize = 64 * 1024;

/// TCP keep-alive probes on upstream connections: idle time before the
/// first probe, the interval between probes, and how many go unanswered
/// before the connection is dropped. A download paused by a slow client
/// still learns of a vanished archiver host.
pub(crate) const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
pub(crate) const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// Sets the upstream connections' TCP keep-alive on `stream`.
pub fn keep_alive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE)
        .with_interval(TCP_KEEPALIVE)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "upstream TCP keep-alive not set");
    }
}

/// An upstream response: headers received, body not yet read; the body
/// gives its connection back to the pool when it ends whole.
pub type UpstreamResponse = http::Response<PooledBody>;

/// The body's length when the upstream framed it with `Content-Length`
/// (zero for `HEAD`, `204` and `304`, which have none).
pub fn body_length(response: &UpstreamResponse) -> Option<u64> {
    hyper::body::Body::size_hint(response.body()).exact()
}

/// Forwarding settings plus the connection pool (one for every upstream).
/// A clone shares the pool; [`Forwarder::with_own_pool`] does not.
#[derive(Debug, Clone)]
pub struct Forwarder {
    pool: Pool,
    connect_timeout: Duration,
    health: Arc<Health>,
    header_timeout: Duration,
    /// `Authorization: Bearer …` for archivers, from `--upstream-token-file`.
    authorization: Option<HeaderValue>,
    /// The warning that an archiver refused the proxy's connection at its
    /// cap per client, once per [`REFUSALS_LOG_INTERVAL`] for every thread.
    refusals_log: Arc<SharedLogEvery>,
}

/// How often an archiver's refusals of the proxy's connections
/// (`too_many_connections`) are logged at most, as the accept loop logs
/// its own refusals.
const REFUSALS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What is sent upstream: the canonical archive URL's path and query, and
/// the request headers that are forwarded.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    /// `/{owner}/{repo}/archive/{ref}.{ext}[.sha256][?path=…]`
    pub path_and_query: String,
    /// `path_and_query` parsed already: the client's own request target,
    /// when the client asked for the canonical URL (as most do). Sent as
    /// it is, a request's URL is not parsed a second time for the
    /// upstream. A slice of the client connection's read buffer: not kept
    /// past the request's answer (a resume's request has `None`).
    pub parsed: Option<http::uri::PathAndQuery>,
    pub headers: HeaderMap,
}

/// The chosen upstream response (headers received, body unread).
#[derive(Debug)]
pub struct Forwarded {
    pub response: UpstreamResponse,
    pub upstream: Arc<str>,
    pub attempts: u32,
}

/// No usable response: the error for the client, and what was tried.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub upstream: Option<Arc<str>>,
    pub attempts: u32,
}

/// How one attempt ended; the `outcome` label of
/// `gitball_proxy_upstream_attempts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is the answer.
    Ok,
    ConnectError,
    ConnectTimeout,
    HeaderTimeout,
    ServerError,
    /// A `503` with `Retry-After`: up, but over capacity for this request.
    Busy,
    /// A `429` marked `X-Gitball-Refused`: up, and refusing the proxy's
    /// own connection at its cap per client (it counts this proxy).
    TooManyConnections,
    /// A `500`: the archiver is up and answered, and this archive failed
    /// there (git refused the tree, it is too large, it took too long).
    ArchiveFailed,
    ReplicaNotFound,
    Unauthorized,
    /// The proxy itself had no fd (or buffer) left to connect.
    Overloaded,
    /// The connection broke before a complete response head arrived, or
    /// any other transport error.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ConnectError => "connect_error",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::HeaderTimeout => "header_timeout",
            Outcome::ServerError => "server_error",
            Outcome::Busy => "busy",
            Outcome::TooManyConnections => "too_many_connections",
            Outcome::ArchiveFailed => "archive_failed",
            Outcome::ReplicaNotFound => "replica_not_found",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Overloaded => "overloaded",
            Outcome::Error => "error",
        }
    }

    /// Whether the upstream is at fault (and is ejected).
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Outcome::Ok
                | Outcome::Busy
                | Outcome::TooManyConnections
                | Outcome::ArchiveFailed
                | Outcome::ReplicaNotFound
                | Outcome::Overloaded
        )
    }
}

/// An attempt in flight: dropped before it ends (its request's future was
/// dropped: the client left, or was cut while a parked download resumed),
/// it is counted as `client_gone`.
struct UnfinishedAttempt<'a>(&'a Arc<str>);

impl Drop for UnfinishedAttempt<'_> {
    fn drop(&mut self) {
        crate::metrics::upstream_attempt(self.0, "client_gone");
    }
}

/// Runs one attempt on `upstream` (the future `attempt` makes) and counts
/// it in `gitball_proxy_upstream_attempts_total`: by the outcome `outcome`
/// reads from its result, or `client_gone` when it is dropped before it
/// ends. The pooled client's attempts and a spliced download's range
/// requests alike.
///
/// It takes a maker, not the future: a future passed to an `async fn` is
/// kept twice in its state (the argument, and the value being awaited), so
/// every request's future was the attempt's size larger, and each move of
/// it copied that much more.
pub(crate) async fn counted<T, F: Future<Output = T>>(
    upstream: &Arc<str>,
    attempt: impl FnOnce() -> F,
    outcome: impl FnOnce(&T) -> Outcome,
) -> T {
    let unfinished = UnfinishedAttempt(upstream);
    let ended = attempt().await;
    std::mem::forget(unfinished);
    crate::metrics::upstream_attempt(upstream, outcome(&ended).as_str());
    ended
}

/// Whether an archiver's `500` is an answer its cache had
/// (`X-Gitball-Cache: hit`: an archive it knows to be too large), which
/// ran nothing there, or the failure of a generation the request joined
/// (`join`), which the request that started it counts; rather than an
/// archive failing there now for this request.
fn known<B>(response: &http::Response<B>) -> bool {
    crate::upstream::joined(response.headers())
        || response
            .headers()
            .get(gitball_core::protocol::X_GITBALL_CACHE)
            .is_some_and(|value| value == "hit")
}

/// Decides what a response's status (and, for a `503`, its `Retry-After`)
/// means for failover.
pub fn classify(status: StatusCode, headers: &HeaderMap, role: Role) -> Outcome {
    if status.as_u16() > 599 || status.is_informational() {
        // hyper takes any three digits; no archiver answers past 599. Of
        // the 1xx, hyper's client skips all but a `101`, which it returns as
        // the answer: the proxy asks for no upgrade and no archiver
        // switches protocols, and passed on, it would hand the client's
        // connection over to nothing.
        Outcome::Error
    } else if status == StatusCode::SERVICE_UNAVAILABLE
        && headers.contains_key(http::header::RETRY_AFTER)
    {
        Outcome::Busy
    } else if status == StatusCode::TOO_MANY_REQUESTS
        && headers.contains_key(gitball_core::protocol::X_GITBALL_REFUSED)
    {
        // The archiver's accept loop refused this connection, the proxy's,
        // before reading the request: not the end user's limit.
        Outcome::TooManyConnections
    } else if status == StatusCode::INTERNAL_SERVER_ERROR {
        Outcome::ArchiveFailed
    } else if status.is_server_error() {
        Outcome::ServerError
    } else if status == StatusCode::NOT_FOUND && role == Role::Replica {
        Outcome::ReplicaNotFound
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        Outcome::Unauthorized
    } else {
        Outcome::Ok
    }
}

/// Whether `error` is a connect refused: nothing listens at the upstream's
/// address (its process restarting, or stopped). Not a connection reset,
/// which a listener made.
fn connect_refused(error: &SendError) -> bool {
    matches!(error, SendError::Connect(error) if error.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn classify_error(error: &SendError) -> Outcome {
    if out_of_local_resources(error) {
        Outcome::Overloaded
    } else if matches!(error, SendError::ConnectTimeout(_)) {
        Outcome::ConnectTimeout
    } else if let SendError::Connect(error) = error {
        if error.kind() == std::io::ErrorKind::TimedOut {
            Outcome::ConnectTimeout
        } else {
            Outcome::ConnectError
        }
    } else if is_timeout(error) {
        Outcome::HeaderTimeout
    } else {
        Outcome::Error
    }
}

/// Whether `error`'s chain of causes holds an `io::Error` that says this
/// process or host ran out of fds or buffers (on `socket()` or `connect()`).
pub(crate) fn out_of_local_resources(error: &(dyn std::error::Error + 'static)) -> bool {
    use nix::errno::Errno;
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(code) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            && [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
                .contains(&Errno::from_raw(code))
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Whether a timeout is somewhere in `error`'s chain of causes (the
/// connector reports its connect timeout as an `io::Error` `TimedOut`).
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || error
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

impl Forwarder {
    pub fn new(
        health: Arc<Health>,
        connect_timeout: Duration,
        header_timeout: Duration,
        upstream_token: Option<&str>,
    ) -> anyhow::Result<Forwarder> {
        let pool = Pool::new(connect_timeout);
        let authorization = upstream_token
            .map(|token| {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))?;
                value.set_sensitive(true);
                Ok::<_, http::header::InvalidHeaderValue>(value)
            })
            .transpose()
            .map_err(|_| anyhow::anyhow!("the upstream token is not a valid header value"))?;
        Ok(Forwarder {
            pool,
            connect_timeout,
            health,
            header_timeout,
            authorization,
            refusals_log: Arc::new(SharedLogEvery::new(REFUSALS_LOG_INTERVAL)),
        })
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// `--connect-timeout`.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The `Authorization` header sent to archivers, if any.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// `--header-timeout`, which also bounds each wait for a body chunk.
    pub fn header_timeout(&self) -> Duration {
        self.header_timeout
    }

    /// The same settings and health, with a connection pool of its own.
    /// Each serving thread has one (see `crate::Proxy::serve`): a pooled
    /// connection's task runs on the runtime that opened it, so a pool
    /// shared between threads would put a download's two connections on
    /// different threads again.
    pub fn with_own_pool(&self) -> Forwarder {
        Forwarder {
            pool: Pool::new(self.connect_timeout),
            ..self.clone()
        }
    }

    /// Tries `candidates` in order until one gives a usable response.
    /// `all_ejected` says every candidate was ejected before this request.
    pub async fn forward(
        &self,
        candidates: &[Candidate],
        all_ejected: bool,
        request: &UpstreamRequest,
    ) -> Result<Forwarded, Failed> {
        self.forward_telling(candidates, all_ejected, request, |_, _| {})
            .await
    }

    /// [`Forwarder::forward`], telling `attempting` each attempt's upstream
    /// and number as it begins: a request whose client leaves meanwhile
    /// (its future dropped mid-attempt) is then logged with the attempt
    /// the archiver may already be serving, and the attempt is counted
    /// with the outcome `client_gone`.
    pub async fn forward_telling(
        &self,
        candidates: &[Candidate],
        all_ejected: bool,
        request: &UpstreamRequest,
        mut attempting: impl FnMut(&Arc<str>, u32),
    ) -> Result<Forwarded, Failed> {
        let mut attempts = 0;
        let mut last_server_error: Option<(UpstreamResponse, Arc<str>)> = None;
        let mut timeouts = 0;
        let mut refused = false;
        let mut last_upstream = None;
        // Upstreams on probation that another request is probing: tried
        // after the other candidates but before those still ejected (the
        // tail of `candidates`, `Health::order`): both are suspect, but
        // their ejection ended (`upstream`). Before, they came after the
        // ejected ones too (review).
        let mut later: Vec<&Candidate> = Vec::new();
        let mut next = candidates.iter().peekable();
        let mut deferred = 0;
        loop {
            let deferred_one = |deferred: &mut usize| {
                let candidate: &Candidate = later.get(*deferred)?;
                *deferred += 1;
                // Its probe may be over by now: take it if free.
                Some(match self.health.trial(&candidate.upstream) {
                    Trial::Go(probe) => (candidate, probe),
                    Trial::Later | Trial::Ejected => (candidate, None),
                })
            };
            let (candidate, _probe) = match next.peek() {
                Some(&candidate) => match self.health.trial(&candidate.upstream) {
                    Trial::Go(probe) => {
                        next.next();
                        (candidate, probe)
                    }
                    Trial::Later => {
                        next.next();
                        later.push(candidate);
                        continue;
                    }
                    Trial::Ejected => match deferred_one(&mut deferred) {
                        Some(tried) => tried,
                        None => {
                            next.next();
                            (candidate, None)
                        }
                    },
                },
                None => match deferred_one(&mut deferred) {
                    Some(tried) => tried,
                    None => break,
                },
            };
            if attempts > 0 {
                crate::metrics::failover();
            }
            attempts += 1;
            last_upstream = Some(candidate.upstream.clone());
            attempting(&candidate.upstream, attempts);
            let (outcome, response, nothing_listens) = counted(
                &candidate.upstream,
                || self.attempt(candidate, request),
                |(outcome, _, _)| *outcome,
            )
            .await;
            // A complete-only request waits for a whole generation: running
            // long is no sign of a broken archiver.
            let slow_but_sane =
                matches!(outcome, Outcome::HeaderTimeout) && request.answered_when_complete();
            if outcome == Outcome::Overloaded {
                // Our own shortage says nothing about the upstream, and
                // the next candidate needs an fd just the same.
                tracing::warn!(
                    upstream = %candidate.upstream,
                    "no fd left to connect to the upstream; answering 503"
                );
                return Err(Failed {
                    error: Error::Overloaded,
                    upstream: Some(candidate.upstream.clone()),
                    attempts,
                });
            }
            if slow_but_sane || outcome == Outcome::Busy || outcome == Outcome::TooManyConnections {
                // Neither a failure nor a sign of health: an ejected
                // archiver that never answers, or answers only that it is
                // busy, stays ejected.
            } else if outcome == Outcome::ArchiveFailed && response.as_ref().is_some_and(known) {
                // Nor is an answer the archiver had (an archive it knows
                // too large, `X-Gitball-Cache: hit`): nothing failed there
                // now, however often it is asked (attack: five such
                // answers ejected it). Nor a generation's failure told to
                // a request that joined it (`join`): it counts once, at
                // the request that started it.
            } else if outcome == Outcome::ArchiveFailed {
                // Nor is one archive's failure, unless every one fails.
                self.health.archive_failed(&candidate.upstream);
            } else if nothing_listens {
                self.health.refused(&candidate.upstream);
            } else if outcome.is_failure() {
                self.health.failed(&candidate.upstream);
            } else {
                self.health.succeeded(&candidate.upstream);
            }
            match (outcome, response) {
                (Outcome::Ok, Some(response)) => {
                    return Ok(Forwarded {
                        response,
                        upstream: candidate.upstream.clone(),
                        attempts,
                    });
                }
                (Outcome::ServerError | Outcome::Busy | Outcome::ArchiveFailed, Some(response)) => {
                    tracing::debug!(
                        upstream = %candidate.upstream,
                        status = response.status().as_u16(),
                        "upstream answered 5xx; trying the next candidate"
                    );
                    // Dropping the previous one closes its connection.
                    last_server_error = Some((response, candidate.upstream.clone()));
                }
                (Outcome::HeaderTimeout, _) => timeouts += 1,
                (Outcome::TooManyConnections, _) => {
                    // Its body, the archiver's word to "the client", is
                    // false for the end user: dropped (the archiver closes
                    // that connection anyway).
                    refused = true;
                    if let Some(suppressed) = self.refusals_log.note(std::time::Instant::now()) {
                        tracing::warn!(
                            upstream = %candidate.upstream,
                            suppressed,
                            "an archiver refused the proxy's connection with 429: it counts this proxy as one client; list the proxies in its --max-connections-per-client-exempt (suppressed: refusals not logged since the last line)"
                        );
                    }
                }
                (Outcome::Unauthorized, _) => {
                    tracing::error!(
                        upstream = %candidate.upstream,
                        "upstream refused the proxy's bearer token; check --upstream-token-file"
                    );
                }
                (outcome, _) => {
                    tracing::debug!(
                        upstream = %candidate.upstream,
                        outcome = outcome.as_str(),
                        "attempt failed; trying the next candidate"
                    );
                }
            }
        }
        if let Some((response, upstream)) = last_server_error {
            return Ok(Forwarded {
                response,
                upstream,
                attempts,
            });
        }
        let error = if refused {
            Error::UpstreamsRefused
        } else if all_ejected {
            Error::Unavailable {
                retry_after: self.health.retry_after(candidates),
            }
        } else if timeouts > 0 && timeouts == attempts {
            Error::GatewayTimeout
        } else {
            Error::BadGateway
        };
        Err(Failed {
            error,
            upstream: last_upstream,
            attempts,
        })
    }

    /// One attempt: send the request and wait for the response head, within
    /// `--header-timeout`.
    /// How the attempt ended, its response if it is passed on, and whether
    /// the connect was refused (nothing listens: [`Health::refused`]).
    async fn attempt(
        &self,
        candidate: &Candidate,
        request: &UpstreamRequest,
    ) -> (Outcome, Option<UpstreamResponse>, bool) {
        // Origin-form, as sent: the pool knows the upstream's address and
        // sets its `Host`.
        let target = match request.target() {
            Ok(target) => target,
            Err(error) => {
                tracing::debug!(upstream = %candidate.upstream, %error, "no valid upstream URL");
                return (Outcome::Error, None, false);
            }
        };
        let send = self.pool.send(
            &candidate.upstream,
            RequestHead {
                method: &request.method,
                target: &target,
                headers: &request.headers,
                authorization: self.authorization.as_ref(),
            },
        );
        let header_timeout = if request.answered_when_complete() {
            self.header_timeout.max(COMPLETE_ARCHIVE_TIMEOUT)
        } else {
            self.header_timeout
        };
        match tokio::time::timeout(header_timeout, send).await {
            Err(_elapsed) => (Outcome::HeaderTimeout, None, false),
            Ok(Err(error)) => {
                let outcome = classify_error(&error);
                tracing::debug!(upstream = %candidate.upstream, %error, "upstream request failed");
                (outcome, None, connect_refused(&error))
            }
            Ok(Ok(response)) => {
                let outcome = classify(response.status(), response.headers(), candidate.role);
                if framed(&response, request) {
                    return (outcome, Some(response), false);
                }
                tracing::warn!(
                    upstream = %candidate.upstream,
                    status = response.status().as_u16(),
                    "upstream body not framed by one length or chunked alone; its end could not be told from a cut"
                );
                match outcome {
                    Outcome::Ok => (Outcome::Error, None, false),
                    // An error the proxy answers itself if every candidate
                    // fails: its body is not passed on either.
                    outcome => (outcome, None, false),
                }
            }
        }
    }
}

/// Whether `response`'s body, if it has one, is framed as an archiver
/// frames it, so that its end can be told from a cut: by one
/// `Content-Length` of digits alone, or by `Transfer-Encoding: chunked`
/// alone; and by a length when the request asked for a complete archive.
/// Anything else cannot be passed on (attack: misbehaving upstreams):
/// - a body ended by closing the connection, or one whose transfer coding
///   is not `chunked` last, or which names none (RFC 9112, section 6.3: close-delimited,
///   whatever its `Content-Length`): through the proxy a cut would look
///   like the end;
/// - any other coding before `chunked`: the client would get the coded
///   bytes as the archive;
/// - a `Content-Length` that is not one number of digits (`+5`, `5, 6`),
///   which hyper's server refuses to send: a list of one number repeated
///   comes here as that number once (`exchange::one_length`), as the
///   splice reads it.
fn framed(response: &UpstreamResponse, request: &UpstreamRequest) -> bool {
    let headers = response.headers();
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    let length = first_length
        .is_some_and(|first| is_digits(first.as_bytes()) && lengths.all(|other| other == first));
    if request.method == Method::HEAD
        || response.status() == StatusCode::NO_CONTENT
        || response.status() == StatusCode::NOT_MODIFIED
    {
        // No body; a length, passed on, must still be one hyper's server
        // sends (review: a list got the client an empty reply here too).
        return first_length.is_none() || length;
    }
    if !response.body().present().transfer_encoding {
        return length;
    }
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match codings.next() {
        // A `Transfer-Encoding` of no coding: the exchange reads the body
        // to the close, whatever the length (review: a cut was a clean end).
        None => false,
        Some(coding) => {
            coding.eq_ignore_ascii_case(b"chunked")
                && codings.next().is_none()
                && !request.wants_length()
        }
    }
}

fn is_digits(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(u8::is_ascii_digit)
}

/// How long a request for a complete archive (an HTTP/1.0 client's, see
/// `X-Gitball-Want-Length`) may wait for the response head: the archiver
/// answers only when the generation is done, so this covers its default
/// queue and generation timeouts (30 s + 600 s).
pub const COMPLETE_ARCHIVE_TIMEOUT: Duration = Duration::from_secs(630);

impl UpstreamRequest {
    /// The upstream request's origin-form target: [`UpstreamRequest::parsed`]
    /// if there is one, else `path_and_query` parsed.
    fn target(&self) -> Result<http::uri::PathAndQuery, http::uri::InvalidUri> {
        match &self.parsed {
            Some(parsed) => Ok(parsed.clone()),
            None => {
                http::uri::PathAndQuery::from_maybe_shared(Bytes::from(self.path_and_query.clone()))
            }
        }
    }

    /// The proxy asked for the archive with its length: the archiver
    /// answers once it is complete.
    pub fn wants_length(&self) -> bool {
        // One pass over the few forwarded names (two on most requests)
        // rather than a hashed look-up of this custom one, byte by byte:
        // asked twice an attempt (`BENCHMARKS.md`).
        self.headers
            .keys()
            .any(|name| name == gitball_core::protocol::X_GITBALL_WANT_LENGTH)
    }

    /// The archiver answers only once the archive is complete: a request
    /// with [`UpstreamRequest::wants_length`], or for an archive's
    /// `.sha256`, which needs the whole archive.
    pub fn answered_when_complete(&self) -> bool {
        // A byte search: `split_once`'s searcher cost a request more.
        let path = self
            .path_and_query
            .bytes()
            .position(|byte| byte == b'?')
            .map_or(self.path_and_query.as_str(), |at| {
                &self.path_and_query[..at]
            });
        self.wants_length() || path.ends_with(".sha256")
    }
}

/// Request headers passed on to the archiver (besides `X-Request-Id`,
/// which the proxy sets, and `Authorization`, which it replaces).
pub const FORWARDED_REQUEST_HEADERS: [http::HeaderName; 4] = [
    http::header::RANGE,
    http::header::IF_NONE_MATCH,
    http::header::IF_RANGE,
    http::header::IF_MODIFIED_SINCE,
];

/// Whether an archiver's response header is passed to the client. Anything
/// else (hop-by-hop headers, `Server`, `Date`, whatever an archiver adds
/// later) stays behind: the proxy owns the client connection's framing.
/// So does `X-Gitball-Refused`, which says the archiver refused the
/// proxy's connection, not the client's (on a `503 overloaded` passed on).
///
/// `Cache-Control` passes because only the archiver knows whether the URL
/// named a commit (cacheable for a year) or a ref that may move (a minute);
/// without it a cache in front falls back to heuristic freshness.
pub fn is_passed_through(name: &http::HeaderName) -> bool {
    use http::header;
    // `HeaderName`s are lower case.
    matches!(
        *name,
        header::CONTENT_TYPE
            | header::CONTENT_LENGTH
            | header::CONTENT_DISPOSITION
            | header::CONTENT_RANGE
            | header::ETAG
            | header::LAST_MODIFIED
            | header::ACCEPT_RANGES
            | header::LINK
            | header::CACHE_CONTROL
            | header::RETRY_AFTER
    ) || name.as_str() == "repr-digest"
        || (name.as_str().starts_with("x-gitball-")
            && *name != gitball_core::protocol::X_GITBALL_REFUSED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    /// `wants_length` finds the header among any forwarded ones, and only
    /// it.
    #[test]
    fn a_request_wants_the_length_when_its_headers_say_so() {
        let mut request = UpstreamRequest {
            method: Method::GET,
            path_and_query: "/acme/widget/archive/main.tar".into(),
            parsed: None,
            headers: HeaderMap::new(),
        };
        assert!(!request.wants_length());
        for (name, value) in [
            (gitball_core::protocol::REQUEST_ID, "id"),
            (http::header::RANGE, "bytes=0-1"),
            (gitball_core::protocol::X_GITBALL_CLIENT, "127.0.0.1"),
        ] {
            request
                .headers
                .insert(name, HeaderValue::from_static(value));
            assert!(!request.wants_length());
        }
        request.headers.insert(
            gitball_core::protocol::X_GITBALL_WANT_LENGTH,
            HeaderValue::from_static("1"),
        );
        assert!(request.wants_length());
        assert!(request.answered_when_complete());
    }

    /// A pooled connection is never reused when the archiver may be
    /// closing it: its pool lets go of it well before the archiver's
    /// keep-alive ends (`docs/internal-api.md`, "Connections").
    #[test]
    fn pooled_connections_are_let_go_well_before_the_archiver_closes_them() {
        let archiver_closes = gitball_core::server::HEADER_READ_TIMEOUT;
        assert!(
            POOL_IDLE_TIMEOUT * 2 <= archiver_closes,
            "kept {POOL_IDLE_TIMEOUT:?}, the archiver closes at {archiver_closes:?}"
        );
    }

    /// `docs/internal-api.md`, "Connections", gives the pool's bounds.
    #[test]
    fn the_pools_bounds_are_the_documented_ones() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/internal-api.md"),
            "docs/internal-api.md",
            [
                format!(
                    "idle connections are kept for {} s",
                    POOL_IDLE_TIMEOUT.as_secs()
                ),
                format!("at most {POOL_MAX_IDLE_PER_UPSTREAM} of them per upstream"),
            ],
        );
    }

    /// `docs/internal-api.md`'s tables are the allowlists: every header of
    /// "Response headers" passes and those it says stay behind do not, and
    /// the request headers it says come from the client are
    /// `FORWARDED_REQUEST_HEADERS`. (Docs review: nothing held the tables
    /// to the code.)
    #[test]
    fn the_internal_api_tables_are_the_allowlists() {
        let docs = include_str!("../../docs/internal-api.md");
        let section = |heading: &str| {
            let start = docs.find(heading).expect("the section");
            let rest = &docs[start + heading.len()..];
            &rest[..rest.find("\n## ").unwrap_or(rest.len())]
        };
        let backticked = |text: &str| -> Vec<String> {
            text.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        };
        let responses = section("\n## Response headers\n");
        let table: String = responses
            .lines()
            .skip_while(|line| !line.starts_with("| passed to the client |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .collect();
        let passed = backticked(&table);
        assert!(passed.len() >= 10, "{passed:?}");
        for name in &passed {
            let name = name.replace('*', "anything").to_ascii_lowercase();
            assert!(
                is_passed_through(&HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name} is documented as passed to the client"
            );
        }
        let behind = responses[responses.find("Everything else stays behind").unwrap()..]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        // The first two sentences: what stays behind, before the framing
        // rules that follow.
        let behind = &behind[..behind.find("A `Content-Length` sent beside").unwrap()];
        for name in backticked(behind) {
            let name = name.to_ascii_lowercase();
            if let Ok(header) = HeaderName::from_bytes(name.as_bytes()) {
                assert!(
                    !is_passed_through(&header),
                    "{name} is documented as kept behind"
                );
            }
        }
        let requests = section("\n## Forwarded request headers\n");
        let from_client: Vec<String> = requests
            .lines()
            .filter(|line| line.contains("| the client's, every value as sent |"))
            .flat_map(|line| backticked(line).into_iter().take(1))
            .map(|name| name.to_ascii_lowercase())
            .collect();
        let forwarded: Vec<String> = FORWARDED_REQUEST_HEADERS
            .iter()
            .map(|name| name.as_str().to_owned())
            .collect();
        assert_eq!(from_client, forwarded, "the client's headers forwarded");
    }

    /// Every `outcome` an attempt is counted with (and `client_gone`) is in
    /// `docs/observability.md`'s label values for `upstream_attempts_total`
    /// and has its row in `docs/proxy.md`'s failover table. (Docs review.)
    #[test]
    fn every_attempt_outcome_is_documented() {
        let observability = include_str!("../../docs/observability.md");
        let row = observability
            .lines()
            .find(|line| line.starts_with("| `outcome` on `upstream_attempts_total` |"))
            .expect("the upstream_attempts_total outcome row");
        let proxy = include_str!("../../docs/proxy.md");
        let outcomes = [
            Outcome::Ok,
            Outcome::ConnectError,
            Outcome::ConnectTimeout,
            Outcome::HeaderTimeout,
            Outcome::ServerError,
            Outcome::Busy,
            Outcome::TooManyConnections,
            Outcome::ArchiveFailed,
            Outcome::ReplicaNotFound,
            Outcome::Unauthorized,
            Outcome::Overloaded,
            Outcome::Error,
        ];
        for outcome in outcomes {
            // Exhaustive: a new variant must be added above.
            match outcome {
                Outcome::Ok
                | Outcome::ConnectError
                | Outcome::ConnectTimeout
                | Outcome::HeaderTimeout
                | Outcome::ServerError
                | Outcome::Busy
                | Outcome::TooManyConnections
                | Outcome::ArchiveFailed
                | Outcome::ReplicaNotFound
                | Outcome::Unauthorized
                | Outcome::Overloaded
                | Outcome::Error => {}
            }
        }
        for outcome in outcomes
            .map(Outcome::as_str)
            .into_iter()
            .chain(["client_gone"])
        {
            assert!(
                row.contains(&format!("`{outcome}`")),
                "upstream_attempts_total{{outcome=\"{outcome}\"}} is not in docs/observability.md"
            );
            assert!(
                proxy.contains(&format!("\n| `{outcome}` |")),
                "{outcome} has no row in docs/proxy.md's failover table"
            );
        }
    }

    #[test]
    fn response_header_allowlist() {
        for passed in [
            "content-type",
            "content-length",
            "content-disposition",
            "content-range",
            "etag",
            "last-modified",
            "accept-ranges",
            "repr-digest",
            "link",
            "cache-control",
            "retry-after",
            "x-gitball-commit",
            "x-gitball-cache",
        ] {
            assert!(
                is_passed_through(&HeaderName::from_static(passed)),
                "{passed}"
            );
        }
        for dropped in [
            "connection",
            "keep-alive",
            "transfer-encoding",
            "server",
            "date",
            "set-cookie",
            "x-request-id",
            "x-gitballcommit",
            // The archiver's refusal of the proxy's connection, not the
            // client's.
            "x-gitball-refused",
            "content-encoding",
            "trailer",
            "upgrade",
        ] {
            assert!(
                !is_passed_through(&HeaderName::from_static(dropped)),
                "{dropped}"
            );
        }
        assert!(is_passed_through(
            &HeaderName::from_bytes(b"X-Gitball-Commit").unwrap()
        ));
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let refusing = crate::test_support::RefusingPort::new();
        let upstream: Arc<str> = format!("http://{}", refusing.addr).into();
        let error = Pool::new(Duration::from_secs(5))
            .send(
                &upstream,
                crate::exchange::RequestHead::get(
                    &http::uri::PathAndQuery::from_static("/"),
                    &HeaderMap::new(),
                ),
            )
            .await
            .unwrap_err();
        assert_eq!(classify_error(&error), Outcome::ConnectError);
        assert!(connect_refused(&error));
    }

    /// A request answered only once the archive is complete (a `.sha256`)
    /// that times out says nothing of the archiver: an ejected archiver that
    /// accepts connections and never answers stays ejected.
    #[tokio::test(start_paused = true)]
    async fn a_checksum_timing_out_neither_ejects_nor_clears_an_ejection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        // Accepts, reads nothing, answers nothing.
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let health = Arc::new(Health::new(Duration::from_secs(3600)));
        let forwarder = Forwarder::new(
            health.clone(),
            Duration::from_secs(5),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        let candidates = [Candidate {
            upstream: upstream.clone(),
            role: crate::routes::Role::Primary,
        }];
        let request = |path: &str| UpstreamRequest {
            method: Method::GET,
            path_and_query: path.into(),
            parsed: None,
            headers: HeaderMap::new(),
        };
        let download = request("/acme/widget/archive/main.tar.gz");
        assert!(!download.answered_when_complete());
        assert!(
            forwarder
                .forward(&candidates, false, &download)
                .await
                .is_err()
        );
        assert!(health.is_ejected(&upstream), "a silent archiver is ejected");
        let checksum = request("/acme/widget/archive/main.tar.gz.sha256?path=docs");
        assert!(checksum.answered_when_complete());
        let started = tokio::time::Instant::now();
        assert!(
            forwarder
                .forward(&candidates, true, &checksum)
                .await
                .is_err()
        );
        // docs/internal-api.md: up to 630 s, the archiver's default queue
        // and generation timeouts. (Mutation review: compared with the
        // constant itself, another bound passed.)
        assert_eq!(started.elapsed(), Duration::from_secs(630));
        assert!(health.is_ejected(&upstream), "the ejection was cleared");
        held.abort();
    }

    /// An upstream whose ejection ended, probed by another request, is
    /// tried after the healthy candidates and before those still ejected:
    /// both are suspect, but its ejection is over (review: it came after
    /// the ejected ones).
    #[tokio::test]
    async fn an_upstream_another_request_probes_comes_before_those_still_ejected() {
        // Three addresses that refuse connections: every attempt fails at
        // once, and each is made.
        let refusing = || -> Arc<str> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap()).into()
        };
        let (probed, healthy, ejected) = (refusing(), refusing(), refusing());
        let eject_for = Duration::from_secs(3600);
        let health = Arc::new(Health::new(eject_for));
        health.failed_at(&probed, std::time::Instant::now() - eject_for * 2);
        let Trial::Go(Some(_held_by_another_request)) = health.trial(&probed) else {
            panic!("no probe");
        };
        health.failed(&ejected);
        let mut candidates: Vec<Candidate> = [&probed, &healthy, &ejected]
            .into_iter()
            .map(|upstream| Candidate {
                upstream: upstream.clone(),
                role: crate::routes::Role::Replica,
            })
            .collect();
        assert_eq!(health.order(&mut candidates), 1);
        let forwarder =
            Forwarder::new(health, Duration::from_secs(5), Duration::from_secs(5), None).unwrap();
        let request = UpstreamRequest {
            method: Method::GET,
            path_and_query: "/acme/widget/archive/main.tar".into(),
            parsed: None,
            headers: HeaderMap::new(),
        };
        let mut tried = Vec::new();
        let forwarded = forwarder
            .forward_telling(&candidates, false, &request, |upstream, _| {
                tried.push(upstream.clone())
            })
            .await;
        assert!(forwarded.is_err());
        assert_eq!(
            tried,
            [healthy.clone(), probed.clone(), ejected.clone()],
            "healthy {healthy}, probed by another {probed}, ejected {ejected}"
        );
    }

    /// The target sent upstream is `path_and_query`'s, whether parsed here
    /// or taken as the client sent it.
    #[test]
    fn the_upstream_target_is_the_canonical_path_either_way() {
        let path = "/acme/widget/archive/main.tar.gz?path=docs%20x";
        let mut request = UpstreamRequest {
            method: Method::GET,
            path_and_query: path.into(),
            parsed: None,
            headers: HeaderMap::new(),
        };
        let parsed_here = request.target().unwrap();
        request.parsed = Some(http::uri::PathAndQuery::from_static(path));
        let as_sent = request.target().unwrap();
        assert_eq!(parsed_here, as_sent);
        assert_eq!(as_sent.as_str(), path);
        // What may not stand in a request line is refused, not sent.
        request.parsed = None;
        request.path_and_query = "/acme/widget/archive/main.tar.gz\r\nx: y".into();
        assert!(request.target().is_err());
    }

    #[test]
    fn fd_exhaustion_anywhere_in_the_causes_is_the_proxys_own_and_ejects_nothing() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp open error")]
        struct Wrapper(#[source] std::io::Error);
        for errno in [
            nix::errno::Errno::EMFILE,
            nix::errno::Errno::ENFILE,
            nix::errno::Errno::ENOBUFS,
            nix::errno::Errno::ENOMEM,
        ] {
            let error = Wrapper(std::io::Error::from_raw_os_error(errno as i32));
            assert!(out_of_local_resources(&error), "{errno}");
        }
        let refused = Wrapper(std::io::ErrorKind::ConnectionRefused.into());
        assert!(!out_of_local_resources(&refused));
        assert!(!Outcome::Overloaded.is_failure());
    }

    #[test]
    fn a_timeout_anywhere_in_the_causes_is_a_timeout() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Wrapper(#[source] std::io::Error);
        let timed_out = Wrapper(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "deadline has elapsed",
        ));
        assert!(is_timeout(&timed_out));
        let refused = Wrapper(std::io::ErrorKind::ConnectionRefused.into());
        assert!(!is_timeout(&refused));
    }

    #[test]
    fn replica_404_fails_over_but_primary_404_is_final() {
        let none = HeaderMap::new();
        assert_eq!(
            classify(StatusCode::NOT_FOUND, &none, Role::Replica),
            Outcome::ReplicaNotFound
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, &none, Role::Primary),
            Outcome::Ok
        );
        assert!(!Outcome::ReplicaNotFound.is_failure());
    }

    #[test]
    fn server_errors_fail_over_and_client_errors_do_not() {
        let none = HeaderMap::new();
        // An intermediary's (the archiver behind it is down), or one no
        // archiver answers: ejects.
        for status in [501, 502, 503, 504, 505, 507, 599] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, &none, Role::Primary), Outcome::ServerError);
            assert_eq!(classify(status, &none, Role::Replica), Outcome::ServerError);
        }
        // The archiver's own answer that this archive failed: failed over,
        // never ejecting.
        for role in [Role::Primary, Role::Replica] {
            assert_eq!(
                classify(StatusCode::INTERNAL_SERVER_ERROR, &none, role),
                Outcome::ArchiveFailed
            );
        }
        assert!(!Outcome::ArchiveFailed.is_failure());
        for status in [401, 403] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                classify(status, &none, Role::Primary),
                Outcome::Unauthorized
            );
            assert!(Outcome::Unauthorized.is_failure());
        }
        // No HTTP status, or no answer to a request that asked for no
        // upgrade: a failed attempt, never passed on.
        for status in [101, 600] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, &none, Role::Primary), Outcome::Error);
        }
        for status in [200, 206, 304, 400, 416] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(classify(status, &none, Role::Replica), Outcome::Ok);
        }
        assert!(Outcome::ServerError.is_failure());
        // A 503 with Retry-After: busy, failed over but not ejected.
        let mut retry = HeaderMap::new();
        retry.insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        let busy = classify(StatusCode::SERVICE_UNAVAILABLE, &retry, Role::Primary);
        assert_eq!(busy, Outcome::Busy);
        assert!(!busy.is_failure());
        assert_eq!(
            classify(StatusCode::BAD_GATEWAY, &retry, Role::Primary),
            Outcome::ServerError
        );
    }

    /// A `429` the archiver's accept loop marks `X-Gitball-Refused` refused
    /// the proxy's own connection: failed over, ejecting nothing. Any other
    /// `429` (the crawler budget's, the end user's own limit) is the answer.
    #[test]
    fn an_archivers_refusal_of_the_proxys_connection_fails_over_and_another_429_is_the_answer() {
        let mut refused = HeaderMap::new();
        refused.insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        let budget = refused.clone();
        refused.insert(
            gitball_core::protocol::X_GITBALL_REFUSED,
            HeaderValue::from_static(gitball_core::protocol::REFUSED_MAX_CONNECTIONS_PER_CLIENT),
        );
        for role in [Role::Primary, Role::Replica] {
            let outcome = classify(StatusCode::TOO_MANY_REQUESTS, &refused, role);
            assert_eq!(outcome, Outcome::TooManyConnections);
            assert!(!outcome.is_failure());
            assert_eq!(
                classify(StatusCode::TOO_MANY_REQUESTS, &budget, role),
                Outcome::Ok
            );
        }
        // The archiver's `503 overloaded` carries it too: busy, as before.
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &refused, Role::Primary),
            Outcome::Busy
        );
    }
}
