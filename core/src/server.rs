//! The HTTP/1 accept loop both tiers run, instead of `axum::serve`.
//!
//! `axum::serve` installs no timer, so a client could hold a connection open
//! forever by sending its request head one byte at a time. This loop serves
//! the same `Router` through hyper's connection builder with:
//!
//! - a header-read timeout (`HEADER_READ_TIMEOUT`): the head must arrive in
//!   10 s or the connection is closed;
//! - bounded request heads: a head over `MAX_HEAD_BYTES` gets `431` and a
//!   request line over `MAX_REQUEST_LINE_BYTES` gets `414`, both as JSON
//!   errors. hyper checks its buffer bound (`HEAD_BUFFER_BYTES`) only while a
//!   head is incomplete, so a head that arrives in one read is measured here;
//!   one beyond the buffer never reaches us and gets hyper's own, empty,
//!   `431` (likewise its `400` for a request line that does not parse).
//!   A head with more than `MAX_HEADER_LINES` header lines also gets
//!   hyper's empty `431`, whatever its size. A connection is parsed with
//!   hyper's smaller default cap, which costs no scratch space, until it
//!   sends a long run of lines ([`head_lines`]);
//! - TCP keepalive, so a peer that vanished is noticed even when idle;
//! - unless `--tcp-congestion` names one, reno ([`LOOPBACK_CONGESTION`])
//!   for a connection from a loopback peer, from the listener ([`bind`]),
//!   and the host's default for one from any other peer, set right after
//!   the accept unless its route chose its own: a `getsockopt` and a
//!   `setsockopt` per such connection, not per request (docs/archiver.md,
//!   "TCP congestion control");
//! - a bound on the bytes a connection queues in the kernel unsent
//!   (`TCP_NOTSENT_LOWAT`, [`SEND_QUEUE_LOW_WATER_BYTES`]): a client that
//!   stops reading parks at most about that much in this side's send buffer,
//!   not the megabytes the kernel's send-buffer autotuning would allow,
//!   while the bytes in flight to a fast client are not capped;
//! - a write-stall timeout: a connection whose writes make no progress for
//!   `write_stall_timeout` (a client that stopped taking bytes) is closed.
//!   Nothing inside a body stream can do this, because hyper stops polling
//!   the body while the socket is full; the socket wrapper ([`StallGuard`])
//!   sees the stuck write itself;
//! - a connection cap (`Connections::max`, `--max-connections`): past it, a
//!   new connection is accepted, sent a fixed `503` with `Retry-After` and
//!   a JSON `overloaded` error, and closed, instead of waiting unanswered
//!   in the kernel's backlog. The refusal never blocks the loop: it is
//!   written by a task bounded in time (`REJECT_TIMEOUT`) and in number
//!   (`MAX_REJECTIONS_IN_FLIGHT`; beyond that, one non-blocking write and
//!   close);
//! - a connection cap per client (`--max-connections-per-client`,
//!   [`per_client`]): past it, once the process holds half its cap, a
//!   client's new connection is refused the
//!   same way with a `429 too_many_connections`, so that one client cannot
//!   hold every connection; peers that are fronts (a proxy, a load
//!   balancer) are not counted;
//! - accept errors (EMFILE, ENFILE, ENOBUFS, ENOMEM: resources run out)
//!   back the loop off for `ACCEPT_BACKOFF` per failure, never a spin and
//!   never an exit, and are logged at most once per
//!   `ACCEPT_ERROR_LOG_INTERVAL` with the count of those not logged;
//! - bodies written around hyper ([`takeover`]): a handler may answer an
//!   HTTP/1.1 request with a body that writes itself to the socket (a file
//!   with `sendfile`, or the rest of a proxied download with `splice`); the
//!   loop takes the connection from hyper for that body and hands the rest
//!   of it to a new hyper connection;
//! - a bounded graceful shutdown: on `shutdown` it stops accepting, lets
//!   running requests (downloads) finish for up to `grace`, then drops the
//!   connections still open, which drops their body streams and with them
//!   every fd and slot they held.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

mod head_lines;
mod per_client;
pub mod takeover;

use crate::log::SharedLogEvery;
use crate::protocol::{
    REFUSED_MAX_CONNECTIONS, REFUSED_MAX_CONNECTIONS_PER_CLIENT, RETRY_AFTER_SECONDS,
    X_GITBALL_REFUSED, code,
};
use crate::response::json_error;
use head_lines::{HeadLines, NeedsFullParse};
pub use per_client::PerClient;
use per_client::{Admission, PerClientLimit};
use takeover::Takeover;

/// The request head (line and headers) must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line (method, target, version) accepted; longer gets 414.
pub const MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
/// Largest request head accepted; larger gets 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// hyper's read buffer bound: heads up to this size are parsed (and then
/// measured against `MAX_HEAD_BYTES`); larger ones are cut off by hyper.
const HEAD_BUFFER_BYTES: usize = 2 * MAX_HEAD_BYTES;
/// hyper's limit on the number of request headers: more get hyper's own,
/// empty, `431`. hyper's default, 100, refused a real request with 150
/// small headers; this allows twenty times that, far more than any client
/// sends, so heads are in practice decided by their size.
///
/// Not more: hyper allocates scratch space for this many headers (64 bytes
/// a slot, here 128 KiB) on every parse. At one slot per possible 3-byte
/// line of the buffer (21,845, 1.3 MiB) it was allocated, faulted in and
/// trimmed again on every request: a small cache hit then cost several
/// times the archiver CPU it costs with hyper's default (measured with
/// `ops/bench`-like `wrk` load: 275–460 µs against 40 µs per hit). Even
/// this many cost 12–13 % of a small hit, so only a connection that sends
/// a long run of lines is parsed with it (`head_lines`).
const MAX_HEADER_LINES: usize = 2000;
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// `TCP_NOTSENT_LOWAT` of every accepted connection: the socket counts as
/// writable only while fewer bytes than this wait unsent in its send
/// buffer, so a write adds at most this plus one segment (64 KiB on
/// loopback) to the unsent queue. Bytes already sent and not yet
/// acknowledged are not counted: send-buffer autotuning still grows the
/// window of a fast client on a long path, which a fixed `SO_SNDBUF` would
/// cap at `SO_SNDBUF / RTT`. What it bounds is the memory a stalled client
/// pins in the kernel: without it, each connection's send buffer autotuned
/// up to `tcp_wmem`'s maximum (4 MiB), and 5,000 stalled downloads
/// exhausted the machine-wide `tcp_mem` ("TCP: out of memory" in dmesg,
/// connections reset). 64 KiB: with 128 KiB (and the proxy's upstream
/// receive buffers at 256 KiB) the 5,000 stalled downloads of bench
/// scenario 8 held 2.2 GiB of kernel memory, at this machine's limit; with
/// 64 KiB (both), 1.4 GiB.
/// See docs/architecture.md, "Memory per slow download".
pub const SEND_QUEUE_LOW_WATER_BYTES: u32 = 64 * 1024;
/// How long the loop waits after a failed `accept` before the next one.
/// The pending connection stays in the backlog meanwhile; freed fds let
/// it in on a later try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one `accept failed` (or `refusing connections`) log line per
/// this interval; the next line says how many were not logged.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a refused connection may take to receive its `503` and close.
const REJECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Refusals being written at once; beyond this a refused connection gets
/// one non-blocking write of the `503` and is closed at once.
const MAX_REJECTIONS_IN_FLIGHT: usize = 64;
/// Bytes of the refused client's request read (and discarded) before the
/// close, so that the close does not turn into a reset that could destroy
/// the `503` before the client reads it.
const REJECT_DRAIN_BYTES: usize = 16 * 1024;

/// The listen backlog asked for (the kernel caps it at
/// `net.core.somaxconn`, 4096 on current Linux). tokio's `bind` asks for
/// 1024: a burst of 1,500 connections (a release rush) then overflowed it
/// on a loaded machine, and each dropped SYN cost its client a 1 s
/// retransmit before the loop could even see it.
pub const LISTEN_BACKLOG: u32 = 4096;

/// The TCP congestion control of a connection accepted from a loopback
/// peer (127.0.0.0/8, `::1`, `::ffff:127.x`) when `--tcp-congestion` names
/// none: such a connection never leaves the host, so there is no
/// bottleneck link to pace for, and BBR (a common default) paces inside
/// TCP with a timer per connection where there is no `fq` qdisc, which
/// loopback has not. Reno is built into every kernel and is in
/// `net.ipv4.tcp_allowed_congestion_control` unless an administrator took
/// it out. See docs/archiver.md, "TCP congestion control".
pub const LOOPBACK_CONGESTION: &str = "reno";

/// Binds a listener for [`serve`] with [`LISTEN_BACKLOG`] (and
/// `SO_REUSEADDR`, as `tokio::net::TcpListener::bind` sets it).
///
/// `congestion` (`--tcp-congestion`) is the TCP congestion control of the
/// listener, which every connection it accepts inherits (`TCP_CONGESTION`;
/// Linux). `None`: the listener gets [`LOOPBACK_CONGESTION`], so that a
/// connection from a loopback peer has it from its establishment, and
/// [`serve`] gives a connection from any other peer the host's default
/// (`net.ipv4.tcp_congestion_control`) right after the accept. Set after
/// the accept instead, reno would not undo BBR's pacing: BBR turns TCP's
/// own pacing on when the connection is established, and nothing turns it
/// off. A kernel that refuses reno leaves the listener with the host's
/// (logged once), and [`serve`] then sets reno on loopback connections
/// after the accept. See docs/archiver.md, "TCP congestion control".
pub fn bind(address: std::net::SocketAddr, congestion: Option<&str>) -> io::Result<TcpListener> {
    let socket = new_listening_socket(address)?;
    match congestion {
        Some(name) => {
            socket2::SockRef::from(&socket)
                .set_tcp_congestion(name.as_bytes())
                .map_err(|error| {
                    let hint = match error.raw_os_error() {
                        // Available, but only a privileged process may pick it.
                        Some(code) if code == nix::errno::Errno::EPERM as i32 => {
                            "not in net.ipv4.tcp_allowed_congestion_control: add it there, \
                             or give the service CAP_NET_ADMIN"
                        }
                        _ => "net.ipv4.tcp_available_congestion_control lists what this kernel has",
                    };
                    io::Error::new(
                        error.kind(),
                        format!("TCP congestion control {name:?}: {error} ({hint})"),
                    )
                })?;
        }
        None => {
            if let Err(error) =
                socket2::SockRef::from(&socket).set_tcp_congestion(LOOPBACK_CONGESTION.as_bytes())
            {
                congestion_refused(&error, LOOPBACK_CONGESTION);
            }
        }
    }
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A TCP socket for `address`'s family, with `SO_REUSEADDR`.
fn new_listening_socket(address: std::net::SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// Binds the admin listener (`--admin-listen`) when one is asked for: as
/// [`bind`], with the host's congestion control (it carries probes and
/// scrapes, not downloads).
pub fn bind_admin(address: Option<std::net::SocketAddr>) -> io::Result<Option<TcpListener>> {
    address
        .map(|address| {
            new_listening_socket(address)
                .and_then(|socket| {
                    socket.bind(address)?;
                    socket.listen(LISTEN_BACKLOG)
                })
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("admin listener {address}: {error}"))
                })
        })
        .transpose()
}

/// Runs [`serve_admin`] on `listener`, if there is one, as a task of the
/// caller's runtime, and logs its address (`admin listener serving`). A
/// failure of its loop stops the process as a serving thread's does.
pub fn spawn_admin(
    listener: Option<TcpListener>,
    router: Router,
    shutdown: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = listener?;
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, max_connections = ADMIN_MAX_CONNECTIONS, "admin listener serving");
    }
    let shutdown = shutdown.clone();
    Some(tokio::spawn(async move {
        if let Err(error) = serve_admin(listener, router, shutdown.clone()).await {
            tracing::error!(%error, "the admin listener failed; shutting down");
            shutdown.cancel();
        }
    }))
}

/// `--tcp-congestion`: a kernel congestion control's name, as
/// `net.ipv4.tcp_available_congestion_control` lists them (at most 15
/// characters). Whether this kernel has it is known only at `bind`.
pub fn parse_congestion(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a congestion control name (e.g. cubic, bbr, reno)"
        ))
    }
}

/// The connection cap of a process: how many connections it holds at once,
/// and the prefix of its connection series (`gitball_archiver`,
/// `gitball_proxy`): `{prefix}_connections_open`, `{prefix}_connections_max`,
/// `{prefix}_connections_rejected_total{reason}`,
/// `{prefix}_accept_errors_total`. Clones share one cap, so several `serve`
/// loops (the proxy's serving threads) hold `max` connections between them.
#[derive(Clone)]
pub struct Connections {
    limit: Arc<ConnectionLimit>,
    /// `None`: no cap per client (`--max-connections-per-client 0`, the
    /// admin listener).
    per_client: Option<Arc<PerClientLimit>>,
    cut: ShutdownCut,
    /// What a connection from a loopback peer gets (others: the host's
    /// default; [`PeerCongestion`]); `None`: every connection keeps the
    /// listener's.
    loopback_congestion: Option<&'static str>,
}

/// Set when a server's shutdown grace runs out, before it cuts the
/// connections left: a request whose client is gone after that logs
/// `shutdown`, not `client_gone`. Clones share it. A process's serving
/// threads share one (through [`Connections`]); in embedded mode the proxy
/// gives its own to the in-process archiver, whose downloads the proxy's
/// cut ends (its client, the proxy, is gone), so they log `shutdown` too.
///
/// It also ends the grace early: [`ShutdownCut::end_grace_now`] (a second
/// SIGTERM or SIGINT, [`crate::signals`]) makes every server sharing it
/// cut its connections left at once, as when the grace runs out.
#[derive(Clone, Default, Debug)]
pub struct ShutdownCut {
    cut: Arc<AtomicBool>,
    now: CancellationToken,
}

impl ShutdownCut {
    fn set(&self) {
        self.cut.store(true, Ordering::Release);
    }

    /// Whether the drain cut the connections left.
    pub fn is_set(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Ends the shutdown grace now: a drain under way, or one that starts
    /// later, cuts its connections left at once. Serving goes on until
    /// the shutdown itself is asked for.
    pub fn end_grace_now(&self) {
        self.now.cancel();
    }
}

impl Connections {
    /// A cap of `max` connections; registers its series.
    pub fn new(max: usize, metrics_prefix: &'static str) -> Connections {
        Connections {
            limit: Arc::new(ConnectionLimit::new(
                max,
                Some(metrics_prefix),
                MAX_REJECTIONS_IN_FLIGHT,
            )),
            per_client: None,
            cut: ShutdownCut::default(),
            loopback_congestion: Some(LOOPBACK_CONGESTION),
        }
    }

    /// The same cap, with a cap per client (`--max-connections-per-client`;
    /// `max` 0: none) that does not count the peers in `fronts`. Sets its
    /// series: `{prefix}_connections_per_client_max`,
    /// `{prefix}_connections_clients` and
    /// `{prefix}_connections_rejected_total{reason="max_connections_per_client"}`.
    pub fn with_per_client(self, per_client: PerClient) -> Connections {
        let rejected = match self.limit.series {
            Some(prefix) => {
                let rejected = metrics::counter!(
                    format!("{prefix}_connections_rejected_total"),
                    "reason" => REFUSED_MAX_CONNECTIONS_PER_CLIENT
                );
                rejected.absolute(0);
                rejected
            }
            None => metrics::Counter::noop(),
        };
        Connections {
            per_client: PerClientLimit::new(per_client, self.limit.series, rejected),
            ..self
        }
    }

    /// The same cap, for a listener bound with `asked` (`--tcp-congestion`):
    /// when a name was asked for, every connection keeps it; when none was,
    /// a connection from a loopback peer gets [`LOOPBACK_CONGESTION`] and
    /// one from another peer the host's default (as [`Connections::new`]
    /// does).
    pub fn with_tcp_congestion(self, asked: Option<&str>) -> Connections {
        Connections {
            loopback_congestion: asked.is_none().then_some(LOOPBACK_CONGESTION),
            ..self
        }
    }

    /// The same cap, whose shutdown cut is `cut` (shared with another
    /// server's, see [`ShutdownCut`]).
    pub fn with_cut(self, cut: ShutdownCut) -> Connections {
        Connections { cut, ..self }
    }

    /// The admin listener's own cap, [`ADMIN_MAX_CONNECTIONS`]. It has no
    /// series: the connection series count the service's clients, and the
    /// admin listener's few (probes, scrapes) would only blur them.
    pub fn admin() -> Connections {
        Connections {
            limit: Arc::new(ConnectionLimit::new(
                ADMIN_MAX_CONNECTIONS,
                None,
                ADMIN_REJECTIONS_IN_FLIGHT,
            )),
            // Its clients are a few probes and scrapers: no cap per client.
            per_client: None,
            cut: ShutdownCut::default(),
            // Probes and scrapes: nothing to gain, the host's is kept.
            loopback_congestion: None,
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.limit.max
    }
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Complete,
    /// The grace period ran out; this many connections were cut.
    Cut(usize),
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains
/// for at most `grace`. A connection whose writes are stuck for
/// `write_stall_timeout` is closed; past `connections.max` open
/// connections a new one is refused with `503`.
pub async fn serve(
    listener: TcpListener,
    router: impl RequestService,
    shutdown: CancellationToken,
    grace: Duration,
    write_stall_timeout: Duration,
    connections: Connections,
) -> std::io::Result<Drain> {
    // Every connection starts with hyper's default header cap (no scratch
    // space to fill per parse) and switches to the full cap only when its
    // input holds a long run of lines (`head_lines`). Half-close stays off
    // (hyper's default): hyper then reads a client's close while a body it
    // sends waits for its next chunk, and drops the body at once (the
    // proxy's test `a_client_that_leaves_while_its_resume_skips_releases_the_upstream`).
    let mut lean = hyper::server::conn::http1::Builder::new();
    lean.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(HEAD_BUFFER_BYTES)
        .keep_alive(true);
    let mut full = lean.clone();
    full.max_headers(MAX_HEADER_LINES);
    let builders = Arc::new(Builders { lean, full });
    let Connections {
        limit,
        per_client,
        cut,
        loopback_congestion,
    } = connections;
    let peer_congestion =
        loopback_congestion.map(|loopback| PeerCongestion::of(&listener, loopback));
    let mut connections = JoinSet::new();

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning, and
                    // say so once per interval, not 20 times a second.
                    limit.accept_errors.increment(1);
                    if let Some(suppressed) = limit.accept_errors_log.note(Instant::now()) {
                        tracing::warn!(
                            %error,
                            suppressed,
                            "accept failed; backing off (suppressed: failures not logged since the last line)"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Before any byte is sent, the refusal's included.
        if let Some(congestion) = &peer_congestion {
            congestion.apply(&stream, peer);
        }
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        // The client's own cap first: a client past it is told so (`429`),
        // whether or not the process is full too.
        let client_slot = match per_client.as_ref().map(|cap| {
            let contended = per_client::contended(limit.open_now(), limit.max);
            (cap, cap.try_acquire(peer.ip(), contended))
        }) {
            Some((cap, Admission::Refused(client))) => {
                limit.reject(stream, &cap.refusal, &cap.rejected);
                if let Some(suppressed) = limit.client_refusals_log.note(Instant::now()) {
                    tracing::warn!(
                        %client,
                        max_connections_per_client = cap.max(),
                        suppressed,
                        "refusing a client's connections with 429: --max-connections-per-client reached (suppressed: refusals not logged since the last line)"
                    );
                }
                continue;
            }
            Some((_, Admission::Counted(slot))) => Some(slot),
            Some((_, Admission::Uncounted)) | None => None,
        };
        let Some(slot) = limit.try_acquire() else {
            drop(client_slot);
            limit.reject(stream, &limit.refusal, &limit.rejected);
            if let Some(suppressed) = limit.refusals_log.note(Instant::now()) {
                match limit.series {
                    Some(_) => tracing::warn!(
                        max_connections = limit.max,
                        suppressed,
                        "refusing connections with 503: --max-connections reached (suppressed: refusals not logged since the last line)"
                    ),
                    None => tracing::warn!(
                        max_connections = limit.max,
                        suppressed,
                        "admin listener refusing connections with 503: its cap reached (suppressed: refusals not logged since the last line)"
                    ),
                }
            }
            continue;
        };
        configure_accepted(&stream);

        let router = router.clone();
        let writes = ClientWrites::of_server(&cut);
        let stream = StallGuard::new(stream, write_stall_timeout, writes.clone());
        let needs_full_parse = NeedsFullParse::default();
        let stream = HeadLines::new(stream, needs_full_parse.clone());
        let requests = Arc::new(Requests::default());
        let takeover = Takeover::new(writes.clone());
        let service = {
            let requests = requests.clone();
            let writes = writes.clone();
            let takeover = takeover.clone();
            hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                requests.heads.fetch_add(1, Ordering::Relaxed);
                let router = router.clone();
                let has_body = !hyper::body::Body::is_end_stream(request.body());
                if has_body {
                    requests.had_body.store(true, Ordering::Relaxed);
                }
                let takeover =
                    (!has_body && request.version() == http::Version::HTTP_11).then(|| {
                        // Its answer may be a body written around hyper: the
                        // loop then reads nothing of this request after its
                        // head, and keeps the connection only as HTTP/1.1 does.
                        takeover.set_close_after(asks_to_close(request.headers()));
                        takeover.clone()
                    });
                request.extensions_mut().insert(OnConnection {
                    peer,
                    writes: writes.clone(),
                    takeover,
                });
                // Boxed: ending a connection without shutting its socket
                // (to switch header caps) needs an `Unpin` future.
                Box::pin(async move {
                    let mut response = handle(router, request).await;
                    response
                        .headers_mut()
                        .insert(http::header::DATE, date_now());
                    if has_body {
                        // Such a connection can no longer switch to the
                        // full header cap (`serve_connection`): a later
                        // long head on it would end it unanswered, which a
                        // front pooling it (nginx) counts as this server
                        // failing. So it carries no later request (attack).
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                })
            })
        };
        let connection = serve_connection(
            builders.clone(),
            stream,
            service,
            needs_full_parse,
            requests,
            takeover,
            shutdown.clone(),
        );
        connections.spawn(async move {
            // Released when the connection ends, however it ends.
            let _slot = slot;
            let _client_slot = client_slot;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let drain = tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => Drain::Complete,
        () = async {
            tokio::select! {
                () = tokio::time::sleep(grace) => {}
                () = cut.now.cancelled() => {}
            }
        } => {
            let open = connections.len();
            // Before the cut: requests dropped with it log `shutdown`.
            cut.set();
            connections.abort_all();
            Drain::Cut(open)
        }
    };
    while connections.join_next().await.is_some() {}
    Ok(drain)
}

/// The `Date` of a response made now: the wall clock, rendered again
/// whenever its second changes, in either direction. hyper's own (left on
/// for the answers hyper makes itself, a `400` for a head it cannot parse)
/// is rendered again only once the clock passes the second after the one
/// it last rendered: after the wall clock was stepped back (NTP correcting
/// a clock that ran ahead, a host booted with its RTC in the future) every
/// response said the later time for as long as the step, a day for a day
/// (`the_date_header_follows_the_wall_clock_when_it_is_stepped_back`). A
/// response that has a `Date` keeps it in hyper. Kept per thread, as the
/// log's timestamps are.
fn date_now() -> http::HeaderValue {
    thread_local! {
        static DATE: std::cell::RefCell<Option<(u64, http::HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    // An HTTP date says years 1970 to 9999 (httpdate panics past either).
    const LAST_HTTP_DATE: u64 = 253_402_300_799;
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
        .min(LAST_HTTP_DATE);
    DATE.with_borrow_mut(|cached| match cached {
        Some((at, value)) if *at == second => value.clone(),
        _ => {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(second);
            let value = http::HeaderValue::try_from(httpdate::fmt_http_date(at))
                .expect("an HTTP date is a valid header value");
            *cached = Some((second, value.clone()));
            value
        }
    })
}

/// What a connection's service saw of the requests hyper handed it, for
/// [`serve_connection`].
#[derive(Default)]
struct Requests {
    /// One of them had a body.
    had_body: AtomicBool,
    /// The heads hyper parsed.
    heads: AtomicU64,
}

/// The two hyper configurations a connection may be served with.
struct Builders {
    /// hyper's default header cap, with no scratch space to fill.
    lean: hyper::server::conn::http1::Builder,
    /// [`MAX_HEADER_LINES`].
    full: hyper::server::conn::http1::Builder,
}

/// Serves one connection: with the lean header cap until its input holds a
/// run of lines the lean parse might refuse, then with the full cap on the
/// same socket (`head_lines`). A response body that writes itself
/// ([`takeover`]) is sent around hyper, and a new hyper connection serves
/// what follows. On `shutdown` the connection finishes the request in
/// flight and closes, as hyper's graceful shutdown does.
async fn serve_connection<S>(
    builders: Arc<Builders>,
    mut stream: HeadLines<StallGuard<TcpStream>>,
    mut service: S,
    needs_full_parse: NeedsFullParse,
    requests: Arc<Requests>,
    takeover: Takeover,
    shutdown: CancellationToken,
) -> hyper::Result<()>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // After the switch: the full cap.
    let mut switched = false;
    // The head held back at the switch: when what was left of its timer
    // runs out, and the heads parsed before it.
    let mut held_head: Option<(Pin<Box<tokio::time::Sleep>>, u64)> = None;
    loop {
        let builder = if switched {
            &builders.full
        } else {
            &builders.lean
        };
        let mut connection = builder.serve_connection(TokioIo::new(stream), service);
        let ended = {
            let mut cancelled = std::pin::pin!(shutdown.cancelled());
            let mut ending = false;
            std::future::poll_fn(|cx| {
                if !ending && cancelled.as_mut().poll(cx).is_ready() {
                    ending = true;
                    Pin::new(&mut connection).graceful_shutdown();
                }
                let polled = connection.poll_without_shutdown(cx);
                if polled.is_pending()
                    && let Some(body) = takeover.take_when_flushed()
                {
                    return Poll::Ready(Ended::TakenOver(body));
                }
                if polled.is_pending()
                    && let Some((left, heads_before)) = &mut held_head
                {
                    if requests.heads.load(Ordering::Relaxed) != *heads_before {
                        // Parsed: the heads after it have hyper's timer.
                        held_head = None;
                    } else if left.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Ended::HeldHeadTimedOut);
                    }
                }
                polled.map(Ended::Hyper)
            })
            .await
        };
        let parts = connection.into_parts();
        stream = parts.io.into_inner();
        service = parts.service;
        let ended = match ended {
            Ended::TakenOver(body) => {
                // What hyper read past the request, or the head watch still
                // holds, is a request to answer after this body; empty
                // lines are not (hyper skips them before a request line),
                // and must not hide the client's leaving (attack).
                let input_waits = parts
                    .read_buf
                    .iter()
                    .any(|&byte| !matches!(byte, b'\r' | b'\n'))
                    || stream.holds_input();
                stream.socket_mut().input_waits = input_waits;
                stream.socket_mut().empty_line_bytes = 0.into();
                let sent = body.send(stream.socket_mut()).await;
                stream.socket_mut().input_waits = false;
                if let Err(error) = sent {
                    // Dropped unshut, as hyper drops a connection whose
                    // body failed: the client sees the body cut short.
                    tracing::debug!(%error, "connection ended in a body sent around hyper");
                    return Ok(());
                }
                if takeover.close_after() || shutdown.is_cancelled() {
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                stream.unread(&parts.read_buf);
                stream.restart_head_wait();
                continue;
            }
            Ended::Hyper(ended) => {
                // A body hyper polled but never got to hand over (the
                // connection ended first) must not be taken for the next
                // request's.
                drop(takeover.take());
                ended
            }
            Ended::HeldHeadTimedOut => {
                // As hyper ends a connection whose head is late: unanswered.
                tracing::debug!("a long head came too late; connection closed");
                return Ok(());
            }
        };
        // The watch ends hyper's input where it held bytes back; hyper calls
        // a partial head at the end of its input an incomplete message.
        let switch = !switched
            && needs_full_parse.is_set()
            && ended
                .as_ref()
                .map_or_else(hyper::Error::is_incomplete_message, |()| true)
            // A connection that sent a request body is not switched: the
            // bytes held back may be the rest of a body, not a head. It ends
            // here, its client has had every answer due.
            && !requests.had_body.load(Ordering::Relaxed)
            && !shutdown.is_cancelled();
        if !switch {
            ended?;
            let _ = stream.shutdown().await;
            return Ok(());
        }
        // The head held back has been due since the last response ended
        // (or the connection began): a new hyper connection would give it
        // a fresh 10 s, twice the bound for a client trickling a long head.
        // It gets what is left (`held_head`). Each later head gets 10 s of
        // its own from hyper, as on any connection: given that remainder
        // too, a pooled connection (the proxy keeps one idle 5 s) was
        // closed under its next request once its long head came late.
        let Some(left) = HEADER_READ_TIMEOUT
            .checked_sub(stream.head_wait_started().elapsed())
            .filter(|left| !left.is_zero())
        else {
            let _ = stream.shutdown().await;
            return Ok(());
        };
        switched = true;
        held_head = Some((
            Box::pin(tokio::time::sleep(left)),
            requests.heads.load(Ordering::Relaxed),
        ));
        stream.replay(&parts.read_buf);
    }
}

/// Why a hyper connection stopped being polled.
enum Ended {
    /// It ended.
    Hyper(hyper::Result<()>),
    /// Its response head is written and the body writes itself.
    TakenOver(Box<dyn takeover::FileBody>),
    /// The head held back at the switch to the full header cap did not
    /// arrive within what was left of its head timeout.
    HeldHeadTimedOut,
}

/// Whether a request's `Connection` header holds the `close` option.
fn asks_to_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("close"))
}

/// Socket options of an accepted connection. Failures are ignored: each is
/// an improvement, and none can fail on a TCP socket of a supported kernel.
fn configure_accepted(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_notsent_lowat(SEND_QUEUE_LOW_WATER_BYTES);
}

/// Whether `peer` is on this host's loopback: 127.0.0.0/8, `::1`, or
/// 127.0.0.0/8 mapped into IPv6 (`::ffff:127.0.0.1`, as a dual-stack
/// listener sees an IPv4 client).
fn is_loopback_peer(peer: std::net::SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// Set once the kernel refused a `TCP_CONGESTION` of [`bind`] or
/// [`PeerCongestion::apply`], so that the refusal is logged once per
/// process, not once per connection.
static CONGESTION_REFUSED: AtomicBool = AtomicBool::new(false);

/// Logs the first refusal of `congestion` in this process.
fn congestion_refused(error: &io::Error, congestion: &str) {
    if !CONGESTION_REFUSED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            %error,
            congestion,
            "TCP_CONGESTION refused; such connections keep the listener's congestion control \
             (logged once)"
        );
    }
}

/// A socket's congestion control (`TCP_CONGESTION`), its name without the
/// padding NULs.
fn congestion_of(socket: socket2::SockRef<'_>) -> Option<Vec<u8>> {
    let mut name = socket.tcp_congestion().ok()?;
    name.retain(|&byte| byte != 0);
    Some(name)
}

/// What [`serve`] sets on an accepted connection without
/// `--tcp-congestion`, given what its listener has: nothing when the
/// listener has what the peer should get.
struct PeerCongestion {
    /// For a loopback peer: [`LOOPBACK_CONGESTION`], if the listener has
    /// another (the kernel refused it to [`bind`], or the listener was not
    /// bound by it). Set after the accept it does not undo BBR's pacing.
    loopback: Option<&'static str>,
    /// For any other peer: the host's default, if the listener has
    /// another (reno, from [`bind`]).
    others: Option<Vec<u8>>,
    /// The listener's, which a connection has unless a route with its own
    /// `congctl` chose another (then it keeps the route's).
    listener_has: Vec<u8>,
}

impl PeerCongestion {
    /// The rule for `listener`'s connections: loopback peers get
    /// `loopback`, others the host's default, read once here (from a new
    /// socket, which has it).
    fn of(listener: &TcpListener, loopback: &'static str) -> PeerCongestion {
        let listener_has = congestion_of(socket2::SockRef::from(listener));
        let host_default = listener.local_addr().ok().and_then(|address| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(address),
                socket2::Type::STREAM,
                None,
            )
            .ok()?;
            congestion_of(socket2::SockRef::from(&socket))
        });
        match (listener_has, host_default) {
            (Some(listener_has), Some(host_default)) => PeerCongestion {
                loopback: (listener_has != loopback.as_bytes()).then_some(loopback),
                others: (listener_has != host_default).then_some(host_default),
                listener_has,
            },
            // Unreadable: at least loopback peers get theirs.
            _ => PeerCongestion {
                loopback: Some(loopback),
                others: None,
                listener_has: Vec::new(),
            },
        }
    }

    /// Sets what an accepted connection from `peer` gets; a refusal leaves
    /// it with the listener's, and is logged the first time only.
    fn apply(&self, stream: &TcpStream, peer: std::net::SocketAddr) {
        let wanted = if is_loopback_peer(peer) {
            self.loopback.map(str::as_bytes)
        } else {
            // One more call, for a peer that is not loopback only: a
            // connection whose route chose its own (`ip route … congctl`)
            // keeps it, as it would on a listener with the host's.
            self.others.as_deref().filter(|_| {
                congestion_of(socket2::SockRef::from(stream)).as_ref() == Some(&self.listener_has)
            })
        };
        let Some(wanted) = wanted else {
            return;
        };
        if let Err(error) = socket2::SockRef::from(stream).set_tcp_congestion(wanted) {
            congestion_refused(&error, &String::from_utf8_lossy(wanted));
        }
    }
}

/// Connections the admin listener (`--admin-listen`) holds at once: its
/// clients are a few probes and scrapers, and past this a new one gets the
/// fast `503` rather than an fd the downloads' budget counted on (the fd
/// headroom of `limits` covers it).
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

/// Refusals of the admin listener being written at once (its fds are
/// counted in `limits::RESERVED_FDS`).
const ADMIN_REJECTIONS_IN_FLIGHT: usize = 4;

/// How long the admin listener's open connections get to finish at
/// shutdown: a probe or a scrape takes milliseconds.
const ADMIN_GRACE: Duration = Duration::from_secs(1);

/// A scrape whose reader stops reading is closed after this long.
const ADMIN_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` (`/healthz` and `/metrics`) on the admin listener until
/// `shutdown`, as [`serve`] does, under a cap of its own
/// ([`Connections::admin`]): however many downloads fill `--max-connections`,
/// probes and scrapes still get in. Run on the caller's runtime, not on the
/// serving threads, so that threads busy with downloads do not delay them.
/// It stops accepting on the same `shutdown` as the service's listener, so
/// a probe sees a draining process as the service's clients do.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<Drain> {
    serve(
        listener,
        router,
        shutdown,
        ADMIN_GRACE,
        ADMIN_WRITE_STALL_TIMEOUT,
        Connections::admin(),
    )
    .await
}

/// What serves a listener's requests: an axum [`Router`], or a tier's own
/// service for its hot path in front of one (the proxy's archive URLs:
/// axum's routing, boxed handler and URL parameters cost a small hit more
/// than its own route lookup).
pub trait RequestService:
    tower::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Unpin
    + 'static
{
}

impl<S> RequestService for S where
    S: tower::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + Unpin
        + 'static
{
}

/// How many threads [`serve_on_threads`] runs: one per CPU, as nginx has
/// one worker per CPU.
pub fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// [`serve`] on `workers` threads, each running its own single-threaded
/// runtime and accept loop on the shared listening socket, with the router
/// `router_for(index)` built for it; returns how the drain went, summed
/// over the threads. Threads are named `{name}-{index}`. `serving` is
/// called once every thread's runtime exists (the caller's "serving" log
/// line: what is there then is what serves).
///
/// Why not one multi-threaded runtime: on a work-stealing runtime the
/// tasks of one connection (and the wake-ups between them) move between
/// threads, so a request or a body chunk crosses CPUs. Here everything a
/// connection starts runs on the thread that accepted it, as in an nginx
/// worker. A thread busy with its connections accepts less, an idle one
/// more. Tasks that must outlive a connection or the serving threads
/// (shared work) belong on another runtime, spawned through its handle.
#[allow(clippy::too_many_arguments)] // `serve`'s, and the threads
pub async fn serve_on_threads<S: RequestService>(
    listener: TcpListener,
    mut router_for: impl FnMut(usize) -> S,
    shutdown: &CancellationToken,
    grace: Duration,
    write_stall_timeout: Duration,
    workers: usize,
    connections: Connections,
    name: &str,
    serving: impl FnOnce(),
) -> io::Result<Drain> {
    // Started in one fallible step: a failure midway stops the threads
    // already started (below).
    let started = (|| -> io::Result<Finished> {
        let listener = listener.into_std()?;
        let mut finished = Vec::with_capacity(workers);
        for index in 0..workers {
            let listener = listener.try_clone()?;
            let router = router_for(index);
            let shutdown = shutdown.clone();
            let connections = connections.clone();
            let (done, finished_rx) = tokio::sync::oneshot::channel();
            finished.push(finished_rx);
            // Built here, so that every thread's runtime (and its fds) exists
            // when `serving` says so, and a runtime that cannot be built fails
            // the start instead of one thread later.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let worker = move || {
                let served = runtime.block_on(async {
                    let listener = TcpListener::from_std(listener)?;
                    serve(
                        listener,
                        router,
                        shutdown.clone(),
                        grace,
                        write_stall_timeout,
                        connections,
                    )
                    .await
                });
                if served.is_err() {
                    // One thread down takes the process down, rather than
                    // leave it serving at a fraction of its capacity unnoticed.
                    shutdown.cancel();
                }
                // Its tasks, and the router clones they hold (the archiver's
                // cache among them), are dropped before the drain is told
                // over: told first, the process could exit before they
                // were, and the cache's shadow git dirs, removed when it is
                // dropped, were left behind (CI: the_shadow_git_dirs_are_
                // private_and_removed_at_exit, a `shadows-*` dir after the
                // exit). Blocking work still running is not waited for, as
                // at the process's exit (`signals::run_main`).
                runtime.shutdown_background();
                let _ = done.send(served);
            };
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(worker)?;
        }
        drop(listener);
        Ok(finished)
    })();
    let finished = match started {
        Ok(finished) => finished,
        Err(error) => {
            // The threads already started stop too: a process serving on
            // some of them, with its admin listener saying it is healthy,
            // would hide the failure instead of exiting with it.
            shutdown.cancel();
            return Err(error);
        }
    };
    serving();
    let mut open = None;
    for finished in finished {
        let served = finished
            .await
            .unwrap_or_else(|_| Err(io::Error::other("a serving thread panicked")));
        match served {
            Ok(Drain::Complete) => {}
            Ok(Drain::Cut(cut)) => *open.get_or_insert(0) += cut,
            Err(error) => {
                shutdown.cancel();
                return Err(error);
            }
        }
    }
    Ok(open.map_or(Drain::Complete, Drain::Cut))
}

/// The receivers of how each serving thread's `serve` ended.
type Finished = Vec<tokio::sync::oneshot::Receiver<io::Result<Drain>>>;

/// The connection cap: a semaphore with one permit per connection, the
/// series that count connections, and the fixed refusal.
struct ConnectionLimit {
    max: usize,
    /// The prefix of its series; `None` for the admin listener's.
    series: Option<&'static str>,
    slots: Arc<Semaphore>,
    open: metrics::Gauge,
    rejected: metrics::Counter,
    accept_errors: metrics::Counter,
    /// Refusals whose task is still writing.
    rejecting: Arc<Semaphore>,
    /// The whole `503` response, built once.
    refusal: Arc<[u8]>,
    /// Shared by every loop under this cap (the serving threads), so each
    /// message is logged once per interval for the process.
    accept_errors_log: SharedLogEvery,
    refusals_log: SharedLogEvery,
    /// Refusals at a client's cap (`per_client`).
    client_refusals_log: SharedLogEvery,
}

/// One open connection's place under the cap; dropping it frees the place.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl ConnectionLimit {
    fn new(
        max: usize,
        series: Option<&'static str>,
        rejections_in_flight: usize,
    ) -> ConnectionLimit {
        let (open, rejected, accept_errors) = match series {
            Some(prefix) => Self::register(max, prefix),
            None => (
                metrics::Gauge::noop(),
                metrics::Counter::noop(),
                metrics::Counter::noop(),
            ),
        };
        ConnectionLimit {
            max,
            series,
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            open,
            rejected,
            accept_errors,
            rejecting: Arc::new(Semaphore::new(rejections_in_flight)),
            refusal: overloaded_response().into(),
            accept_errors_log: SharedLogEvery::new(ACCEPT_ERROR_LOG_INTERVAL),
            refusals_log: SharedLogEvery::new(ACCEPT_ERROR_LOG_INTERVAL),
            client_refusals_log: SharedLogEvery::new(ACCEPT_ERROR_LOG_INTERVAL),
        }
    }

    /// Registers the series of a cap of `max` under `prefix`: the open
    /// connections, the refusals, the failed accepts.
    fn register(
        max: usize,
        prefix: &'static str,
    ) -> (metrics::Gauge, metrics::Counter, metrics::Counter) {
        let open_name = format!("{prefix}_connections_open");
        let max_name = format!("{prefix}_connections_max");
        let rejected_name = format!("{prefix}_connections_rejected_total");
        let errors_name = format!("{prefix}_accept_errors_total");
        metrics::describe_gauge!(open_name.clone(), "Client connections open now.");
        metrics::describe_gauge!(
            max_name.clone(),
            "--max-connections: connections held at once before new ones get 503."
        );
        metrics::describe_counter!(
            rejected_name.clone(),
            "Connections refused at accept, by reason: max_connections (503), max_connections_per_client (429)."
        );
        metrics::describe_counter!(
            errors_name.clone(),
            "Failed accepts (EMFILE, ENFILE, ENOBUFS, ENOMEM), each followed by a short back-off."
        );
        metrics::gauge!(max_name).set(max as f64);
        let open = metrics::gauge!(open_name);
        open.set(0.0);
        let rejected = metrics::counter!(rejected_name, "reason" => REFUSED_MAX_CONNECTIONS);
        rejected.absolute(0);
        let accept_errors = metrics::counter!(errors_name);
        accept_errors.absolute(0);
        (open, rejected, accept_errors)
    }

    /// Connections holding a place under the cap now.
    fn open_now(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }

    fn try_acquire(&self) -> Option<ConnectionSlot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.open.increment(1.0);
        Some(ConnectionSlot {
            _permit: permit,
            open: self.open.clone(),
        })
    }

    /// Sends `refusal` (the `503`, or a client's `429`), counted in
    /// `rejected`, and closes, without ever making the loop wait.
    fn reject(&self, stream: TcpStream, refusal: &Arc<[u8]>, rejected: &metrics::Counter) {
        rejected.increment(1);
        let refusal = refusal.clone();
        match self.rejecting.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(REJECT_TIMEOUT, refuse(stream, &refusal)).await;
                });
            }
            Err(_) => {
                // Too many refusals under way: one non-blocking write (a
                // fresh socket's buffer takes these few hundred bytes) and
                // close.
                let _ = socket2::SockRef::from(&stream).send(&refusal);
            }
        }
    }
}

/// Writes the refusal, ends our side, and reads what the client sent until
/// it closes too (a bounded amount), so the close is a FIN, not a reset.
async fn refuse(mut stream: TcpStream, refusal: &[u8]) {
    if stream.write_all(refusal).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut drained = 0;
    let mut buffer = [0u8; 4096];
    while drained < REJECT_DRAIN_BYTES {
        match tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => drained += read,
        }
    }
}

/// The `503` a refused connection gets: the shared JSON error body, with
/// `Retry-After` and `Connection: close`.
fn overloaded_response() -> Vec<u8> {
    refusal_response(
        "503 Service Unavailable",
        REFUSED_MAX_CONNECTIONS,
        code::OVERLOADED,
        "the server holds as many connections as it may; retry later",
    )
}

/// A whole response refusing a connection at the accept (`status`: the
/// status line's code and reason): the JSON error `code` with `message`,
/// `Retry-After`, `Connection: close` and `X-Gitball-Refused: {reason}`
/// (the cap that refused it: a proxy tells an archiver's refusal of its own
/// connection from a `429` about its client by it). Written before any
/// request is read, so built by hand, once.
fn refusal_response(status: &str, reason: &str, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    format!(
        "HTTP/1.1 {status}\r\n\
         content-type: application/json\r\n\
         cache-control: no-store\r\n\
         retry-after: {RETRY_AFTER_SECONDS}\r\n\
         {X_GITBALL_REFUSED}: {reason}\r\n\
         connection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn handle(router: impl RequestService, request: hyper::Request<Incoming>) -> Response {
    let line = request.method().as_str().len() + target_len(request.uri()) + " HTTP/1.1\r\n".len();
    if line > MAX_REQUEST_LINE_BYTES {
        return too_large(
            StatusCode::URI_TOO_LONG,
            code::URI_TOO_LONG,
            "the request line is longer than 8 KiB",
        );
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len())
        .sum();
    if line + headers + 2 > MAX_HEAD_BYTES {
        return too_large(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            code::HEADERS_TOO_LARGE,
            "the request head is larger than 32 KiB",
        );
    }
    let request: Request = request.map(Body::new);
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    }
}

/// The length of `uri` as written (its `Display`), without writing it.
fn target_len(uri: &http::Uri) -> usize {
    uri.scheme_str()
        .map_or(0, |scheme| scheme.len() + "://".len())
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |query| "?".len() + query.len())
}

fn too_large(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = json_error(status, code, message);
    // The rest of an oversized request is not worth reading.
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// What the server loop tells each request of its connection, as its one
/// request extension (three of them, each boxed and inserted in the
/// request's map and dropped again, cost a small proxied hit about 800
/// instructions).
#[derive(Clone)]
pub struct OnConnection {
    /// Who is asking: the archiver's crawler budget, the proxy's client
    /// identity.
    pub peer: std::net::SocketAddr,
    /// Lets a body stream tell, when it is dropped, that its connection
    /// was closed for a client that took no bytes.
    pub writes: ClientWrites,
    /// A bodiless HTTP/1.1 request's: its response body may be handed
    /// over to the loop ([`Takeover`]).
    pub takeover: Option<Takeover>,
}

/// What the server loop knows of a connection's socket writes. Each request
/// carries its connection's ([`OnConnection`]), so a body stream can tell
/// whether its client is taking bytes (hyper does not poll a body while the
/// socket is full, so the stream cannot see that itself).
#[derive(Clone, Debug)]
pub struct ClientWrites(Arc<WriteState>);

#[derive(Debug)]
struct WriteState {
    /// Set when the write-stall guard fired.
    timed_out: AtomicBool,
    /// When the connection was accepted; `stuck_since_ms` counts from here.
    base: tokio::time::Instant,
    /// Milliseconds after `base` since which a write has been pending with
    /// no progress, or `NOT_STUCK`.
    stuck_since_ms: AtomicU64,
    /// Whether the last write-side call was a completed flush: hyper has
    /// handed every byte it buffered to the socket (`takeover`).
    flushed: AtomicBool,
    /// Set, for every connection of a server at once, when its shutdown
    /// grace ran out and it cut the connections left.
    cut: ShutdownCut,
}

const NOT_STUCK: u64 = u64::MAX;

impl Default for ClientWrites {
    fn default() -> Self {
        ClientWrites::of_server(&ShutdownCut::default())
    }
}

impl ClientWrites {
    /// A connection of the server whose shutdown sets `cut`.
    fn of_server(cut: &ShutdownCut) -> Self {
        ClientWrites(Arc::new(WriteState {
            timed_out: AtomicBool::new(false),
            base: tokio::time::Instant::now(),
            stuck_since_ms: AtomicU64::new(NOT_STUCK),
            flushed: AtomicBool::new(true),
            cut: cut.clone(),
        }))
    }

    /// Whether the server cut the connection when its shutdown grace ran
    /// out.
    pub fn cut_at_shutdown(&self) -> bool {
        self.0.cut.is_set()
    }

    /// Whether the write-stall guard closed the connection.
    pub fn timed_out(&self) -> bool {
        self.0.timed_out.load(Ordering::Acquire)
    }

    /// How long the connection's pending write has been waiting for the
    /// client to take bytes; `None` while writes go through.
    pub fn stuck_for(&self) -> Option<Duration> {
        let since = self.0.stuck_since_ms.load(Ordering::Acquire);
        (since != NOT_STUCK).then(|| {
            self.0
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(since))
        })
    }

    fn stuck(&self) {
        let since = u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(NOT_STUCK - 1);
        self.0.stuck_since_ms.store(since, Ordering::Release);
    }

    fn moving(&self) {
        self.0.stuck_since_ms.store(NOT_STUCK, Ordering::Release);
    }

    /// Whether hyper's buffered bytes have all gone to the socket: its
    /// last write-side call was a flush that completed.
    fn flushed(&self) -> bool {
        self.0.flushed.load(Ordering::Relaxed)
    }
}

/// A socket whose writes fail with `TimedOut` once they have been pending
/// for longer than the stall timeout.
pub struct StallGuard<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write is pending; boxed so the guard stays `Unpin`.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    writes: ClientWrites,
    /// Input the client sent after the request whose body is being sent
    /// around hyper waits unread in the loop's buffers (a pipelined
    /// request): the end of input after it does not end the connection
    /// (`takeover::BodySocket::closed`).
    pub(crate) input_waits: bool,
    /// Bytes of empty lines `takeover::BodySocket::closed` took off the
    /// socket during the body sent around hyper: at most
    /// `takeover::MAX_EMPTY_LINE_BYTES`.
    pub(crate) empty_line_bytes: std::sync::atomic::AtomicUsize,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, timeout: Duration, writes: ClientWrites) -> Self {
        StallGuard {
            inner,
            timeout,
            stalled: None,
            writes,
            input_waits: false,
            empty_line_bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> StallGuard<S> {
    /// Wraps one write-side poll: progress disarms the timer, `Pending` arms
    /// it (and registers its wake-up), expiry turns into an error.
    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(result) => {
                if self.stalled.take().is_some() {
                    self.writes.moving();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if self.stalled.is_none() {
                    self.writes.stuck();
                }
                let timeout = self.timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.writes.0.timed_out.store(true, Ordering::Release);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client took no bytes",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.0.flushed.store(false, Ordering::Relaxed);
        self.guard(cx, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes.0.flushed.store(false, Ordering::Relaxed);
        self.guard(cx, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = self.guard(cx, |inner, cx| inner.poll_flush(cx));
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.writes.0.flushed.store(true, Ordering::Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::time::Instant;

    use super::*;
    use axum::routing::get;

    /// `docs/http.md` and `docs/archiver.md` give the accept loop's limits
    /// as these constants. (Docs review: a figure changed on one side only
    /// had nothing to fail.)
    #[test]
    fn the_figures_docs_give_for_the_accept_loop_are_these_constants() {
        let squash = crate::docs::prose;
        let http = squash(include_str!("../../docs/http.md"));
        let archiver = squash(include_str!("../../docs/archiver.md"));
        let kib = |bytes: usize| format!("{} KiB", bytes >> 10);
        let security = squash(include_str!("../../docs/security.md"));
        let readme = squash(include_str!("../../README.md"));
        let architecture = squash(include_str!("../../docs/architecture.md"));
        let head = HEADER_READ_TIMEOUT.as_secs();
        let (line, whole) = (kib(MAX_REQUEST_LINE_BYTES), kib(MAX_HEAD_BYTES));
        for (docs, name, figure) in [
            (
                &security,
                "security.md",
                format!("bounded in time ({head} s) and size ({line} line, {whole} head)"),
            ),
            (
                &readme,
                "../README.md",
                format!("oversized request line ({line}) or head ({whole})"),
            ),
            (
                &readme,
                "../README.md",
                format!("a request head must arrive within {head} s"),
            ),
            (
                &architecture,
                "architecture.md",
                format!("the {head} s head timeout"),
            ),
            (
                &http,
                "http.md",
                format!("must arrive complete within {head} s"),
            ),
            (
                &http,
                "http.md",
                format!(
                    "over {} gets `414 uri_too_long`",
                    kib(MAX_REQUEST_LINE_BYTES)
                ),
            ),
            (
                &http,
                "http.md",
                format!(
                    "a head over {} gets `431 headers_too_large`",
                    kib(MAX_HEAD_BYTES)
                ),
            ),
            (
                &http,
                "http.md",
                format!(
                    "A head larger than hyper's {} buffer",
                    kib(HEAD_BUFFER_BYTES)
                ),
            ),
            (
                &http,
                "http.md",
                format!("A head of more than {} lines", head_lines::WATCHED_LINES),
            ),
            (
                &http,
                "http.md",
                format!(
                    "up to {},{:03} header lines",
                    MAX_HEADER_LINES / 1000,
                    MAX_HEADER_LINES % 1000
                ),
            ),
            (
                &http,
                "http.md",
                format!("TCP keepalive ({} s)", TCP_KEEPALIVE.as_secs()),
            ),
            (
                &http,
                "http.md",
                format!(
                    "less than {} waits unsent",
                    kib(SEND_QUEUE_LOW_WATER_BYTES as usize)
                ),
            ),
            (
                &http,
                "http.md",
                format!("under a cap of its own, {ADMIN_MAX_CONNECTIONS} connections"),
            ),
            (
                &archiver,
                "archiver.md",
                format!(
                    "the loop waits {} ms before the next try",
                    ACCEPT_BACKOFF.as_millis()
                ),
            ),
            (
                &archiver,
                "archiver.md",
                format!(
                    "logged at most once per {} s",
                    ACCEPT_ERROR_LOG_INTERVAL.as_secs()
                ),
            ),
            (
                &archiver,
                "archiver.md",
                format!(
                    "it is written within {} s, by at most {MAX_REJECTIONS_IN_FLIGHT} tasks at once",
                    REJECT_TIMEOUT.as_secs()
                ),
            ),
            (
                &archiver,
                "archiver.md",
                format!("The listen backlog asked for is {LISTEN_BACKLOG}"),
            ),
            (
                &archiver,
                "archiver.md",
                format!(
                    "({ADMIN_MAX_CONNECTIONS} connections, and at most {ADMIN_REJECTIONS_IN_FLIGHT} refusals being written"
                ),
            ),
        ] {
            assert!(
                docs.contains(&figure),
                "docs/{name} does not say {figure:?}"
            );
        }
    }

    const STALL: Duration = Duration::from_secs(300);

    #[test]
    fn loopback_peers_are_127_slash_8_and_v6_loopback_mapped_or_not() {
        for peer in [
            "127.0.0.1:1",
            "127.9.8.7:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback_peer(peer.parse().unwrap()), "{peer}");
        }
        for peer in [
            "10.0.0.1:1",
            "192.168.1.2:1",
            "[::ffff:10.0.0.1]:1",
            "[2001:db8::1]:1",
            "[::2]:1",
        ] {
            assert!(!is_loopback_peer(peer.parse().unwrap()), "{peer}");
        }
    }

    #[test]
    fn a_congestion_control_name_is_a_kernel_name_or_refused() {
        for name in ["cubic", "bbr", "reno", "dctcp", "bbr2", "h-tcp", "my_cc"] {
            assert_eq!(parse_congestion(name).as_deref(), Ok(name));
        }
        for name in ["", "cubic; reboot", "../bbr", "a b", "sixteen-chars-xx"] {
            assert!(parse_congestion(name).is_err(), "{name:?} accepted");
        }
    }

    #[test]
    fn a_request_targets_length_is_that_of_its_text() {
        for target in [
            "/",
            "/acme/widget/archive/v1.0.tar.gz",
            "/a/b/archive/v1.zip?path=docs&x=%20",
            "/?",
            "http://example.com/a?b",
            "http://example.com:8080",
            "example.com:443",
            "*",
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(target_len(&uri), uri.to_string().len(), "{target}");
        }
    }

    /// A guarded end of a duplex with a 4-byte buffer, and the peer end.
    fn guarded() -> (StallGuard<DuplexStream>, DuplexStream, ClientWrites) {
        let (ours, peer) = duplex(4);
        let stalled = ClientWrites::default();
        (StallGuard::new(ours, STALL, stalled.clone()), peer, stalled)
    }

    /// One poll, as hyper would make it (the test polls again itself).
    fn poll_write(guard: &mut StallGuard<DuplexStream>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(guard).poll_write(&mut cx, buf)
    }

    fn poll_read(guard: &mut StallGuard<DuplexStream>) -> Poll<io::Result<Vec<u8>>> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut buffer = [0u8; 16];
        let mut buf = ReadBuf::new(&mut buffer);
        Pin::new(guard)
            .poll_read(&mut cx, &mut buf)
            .map_ok(|()| buf.filled().to_vec())
    }

    fn timed_out(poll: Poll<io::Result<usize>>) -> bool {
        matches!(poll, Poll::Ready(Err(error)) if error.kind() == io::ErrorKind::TimedOut)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_pending_past_the_timeout_fails_timed_out_and_sets_the_flag() {
        let (mut guard, _peer, stalled) = guarded();
        guard.write_all(b"abcd").await.unwrap();
        assert!(!stalled.timed_out());

        // The peer takes nothing: the write waits, then fails. (An await,
        // not manual polls: the guard's timer must wake the writer.)
        let started = Instant::now();
        let error = guard.write_all(b"efgh").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), STALL);
        assert!(stalled.timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_fails_only_once_pending_for_the_whole_timeout() {
        let (mut guard, _peer, stalled) = guarded();
        guard.write_all(b"abcd").await.unwrap();
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        tokio::time::advance(STALL - Duration::from_millis(1)).await;
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        assert!(!stalled.timed_out());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(timed_out(poll_write(&mut guard, b"efgh")));
        assert!(stalled.timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn progress_before_the_timeout_disarms_the_guard() {
        let (mut guard, mut peer, stalled) = guarded();
        guard.write_all(b"abcd").await.unwrap();
        assert_eq!(stalled.stuck_for(), None);
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        tokio::time::advance(STALL * 2 / 3).await;
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        // What a body stream reads to tell a stalled client.
        assert_eq!(stalled.stuck_for(), Some(STALL * 2 / 3));

        // The peer takes the bytes: the write goes through.
        let mut taken = [0u8; 4];
        peer.read_exact(&mut taken).await.unwrap();
        assert_eq!(&taken, b"abcd");
        assert!(matches!(
            poll_write(&mut guard, b"efgh"),
            Poll::Ready(Ok(4))
        ));
        assert_eq!(stalled.stuck_for(), None);

        // Stuck again: the timeout counts from now, not from the first
        // stall (whose deadline passes in between).
        assert!(poll_write(&mut guard, b"ijkl").is_pending());
        tokio::time::advance(STALL * 2 / 3).await;
        assert!(poll_write(&mut guard, b"ijkl").is_pending());
        assert!(!stalled.timed_out());
        tokio::time::advance(STALL / 3).await;
        assert!(timed_out(poll_write(&mut guard, b"ijkl")));
        assert!(stalled.timed_out());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pass_through_and_never_time_out() {
        let (mut guard, mut peer, stalled) = guarded();
        assert!(poll_read(&mut guard).is_pending());
        tokio::time::advance(STALL * 10).await;
        assert!(poll_read(&mut guard).is_pending());
        assert!(!stalled.timed_out());

        peer.write_all(b"GET ").await.unwrap();
        let mut read = [0u8; 4];
        guard.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"GET ");

        // Also while a write is stuck.
        guard.write_all(b"abcd").await.unwrap();
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        peer.write_all(b"/ HT").await.unwrap();
        assert_eq!(
            poll_read(&mut guard).map(Result::unwrap),
            Poll::Ready(b"/ HT".to_vec())
        );
        assert!(!stalled.timed_out());

        // EOF too.
        drop(peer);
        assert_eq!(
            poll_read(&mut guard).map(Result::unwrap),
            Poll::Ready(Vec::new())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_shutdown_pass_through() {
        let (mut guard, mut peer, stalled) = guarded();
        guard.write_all(b"ab").await.unwrap();
        guard.flush().await.unwrap();
        guard.shutdown().await.unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"ab");

        assert!(!stalled.timed_out());

        let (mut guard, peer, stalled) = guarded();
        drop(peer);
        let error = guard.write_all(b"abcd").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(!stalled.timed_out());
    }

    /// Bound on every wait in these tests.
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// [`serve`] with `router` on an ephemeral port of 127.0.0.1 (also
    /// for `takeover`'s tests).
    pub(in crate::server) struct TestLoop {
        pub(in crate::server) address: std::net::SocketAddr,
        pub(in crate::server) shutdown: CancellationToken,
        pub(in crate::server) server: tokio::task::JoinHandle<io::Result<Drain>>,
    }

    impl TestLoop {
        async fn start(router: Router, connections: Connections) -> TestLoop {
            TestLoop::start_with(router, connections, Duration::ZERO, TEST_TIMEOUT).await
        }

        /// With a shutdown `grace` and a write-stall timeout `stall`.
        pub(in crate::server) async fn start_with(
            router: Router,
            connections: Connections,
            grace: Duration,
            stall: Duration,
        ) -> TestLoop {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(serve(
                listener,
                router,
                shutdown.clone(),
                grace,
                stall,
                connections,
            ));
            TestLoop {
                address,
                shutdown,
                server,
            }
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.server.await.unwrap().unwrap();
        }
    }

    /// Sends `head` on a fresh connection to a loop serving `GET /` and
    /// returns the status and body (the loop closes: `Connection: close`).
    async fn answer(head: Vec<u8>) -> (u16, String) {
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(16, "test")).await;
        let address = server.address;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(&head).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            response
        };
        let response = tokio::time::timeout(TEST_TIMEOUT, exchange)
            .await
            .expect("the loop answered in time");
        server.stop().await;
        let response = String::from_utf8(response).unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// `GET /` with `lines` header lines `line` each, and `Connection: close`.
    fn head_with(lines: usize, line: &str) -> Vec<u8> {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        head.push_str(&line.repeat(lines));
        head.push_str("\r\n");
        head.into_bytes()
    }

    #[tokio::test]
    async fn many_small_headers_under_32_kib_are_served() {
        let (status, body) = answer(head_with(150, "X-Small: v\r\n")).await;
        assert_eq!((status, body.as_str()), (200, "served"));
        // As many as the cap allows (`Host` and `Connection` are two).
        let (status, _) = answer(head_with(MAX_HEADER_LINES - 2, "a:\r\n")).await;
        assert_eq!(status, 200);
    }

    /// `GET /` with `lines` header lines `a:` and `Host`, kept alive.
    fn kept_alive(lines: usize) -> String {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "a:\r\n".repeat(lines)
        )
    }

    /// Sends each of `writes` on one connection, waiting for one answer per
    /// request before the next write, and returns everything the loop sent
    /// until it closed.
    async fn converse(writes: &[(String, usize)]) -> String {
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(16, "test")).await;
        let address = server.address;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let mut response = Vec::new();
            let mut answers = 0;
            for (write, requests) in writes {
                stream.write_all(write.as_bytes()).await.unwrap();
                answers += requests;
                // Each answer ends with its body, `served`.
                while response.windows(6).filter(|w| w == b"served").count() < answers {
                    let mut chunk = [0u8; 4096];
                    let read = stream.read(&mut chunk).await.unwrap();
                    assert!(
                        read > 0,
                        "closed early: {:?}",
                        String::from_utf8_lossy(&response)
                    );
                    response.extend_from_slice(&chunk[..read]);
                }
            }
            stream.read_to_end(&mut response).await.unwrap();
            response
        };
        let response = tokio::time::timeout(TEST_TIMEOUT, exchange)
            .await
            .expect("the loop answered in time");
        server.stop().await;
        String::from_utf8(response).unwrap()
    }

    #[tokio::test]
    async fn long_heads_are_served_on_a_kept_alive_connection_before_and_after_short_ones() {
        // Short heads parse with hyper's default cap; a head longer than
        // that default (100) switches the connection to the full cap
        // without losing a byte, here in the middle of a conversation, in
        // a write of several requests (pipelined), and right at the
        // switch's threshold.
        let last = "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned();
        let pipelined = format!("{}{}{}", kept_alive(3), kept_alive(1_500), kept_alive(3));
        let writes = [
            (kept_alive(3), 1),
            (kept_alive(head_lines::WATCHED_LINES - 2), 1),
            (kept_alive(head_lines::WATCHED_LINES - 1), 1),
            (kept_alive(150), 1),
            (kept_alive(3), 1),
            (pipelined, 3),
            (kept_alive(MAX_HEADER_LINES - 1), 1),
            (last, 1),
        ];
        let response = converse(&writes).await;
        assert_eq!(
            response.matches("HTTP/1.1 200 OK").count(),
            10,
            "{response}"
        );
        assert_eq!(response.matches("HTTP/1.1 ").count(), 10, "{response}");
        // Only the last answer closes: the switch ends no conversation.
        assert_eq!(
            response.matches("connection: close").count(),
            1,
            "{response}"
        );
    }

    #[tokio::test]
    async fn a_long_head_first_on_a_connection_is_served_and_the_connection_kept() {
        let writes = [
            (kept_alive(1_000), 1),
            (kept_alive(3), 1),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned(),
                1,
            ),
        ];
        let response = converse(&writes).await;
        assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 3, "{response}");
    }

    #[tokio::test]
    async fn a_long_head_trickled_in_is_cut_within_the_head_timeout_of_its_start() {
        // 70 header lines over about 8 s (the switch to the full cap comes
        // after the 64th), then one every 250 ms: the head is cut
        // unanswered at 10 s from the connection's start, as a short head
        // would be, not 10 s after the switch.
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(16, "test_trickle")).await;
        let started = Instant::now();
        let stream = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let closed = tokio::spawn(async move {
            let mut answer = Vec::new();
            let _ = reader.read_to_end(&mut answer).await;
            (started.elapsed(), answer)
        });
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        for line in 0..200 {
            let pause = if line < 70 { 115 } else { 250 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if closed.is_finished() || writer.write_all(b"a: b\r\n").await.is_err() {
                break;
            }
        }
        let (after, answer) = tokio::time::timeout(TEST_TIMEOUT, closed)
            .await
            .expect("the connection was closed")
            .unwrap();
        server.stop().await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        assert!(
            after < HEADER_READ_TIMEOUT + Duration::from_secs(2),
            "the head was cut {after:?} after the connection began"
        );
    }

    #[tokio::test]
    async fn a_head_after_a_late_long_one_gets_a_whole_head_timeout_of_its_own() {
        // A long head sent 8 s into the connection gets what is left of its
        // 10 s; the next head, sent 4 s after that answer (a pooled
        // connection idle for a while: the proxy keeps one 5 s), is due 10 s
        // after it as on any connection, not within that remainder.
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(16, "test_late_long")).await;
        let mut stream = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        let mut answers = Vec::new();
        let mut answered = async |stream: &mut tokio::net::TcpStream, count: usize| {
            while answers.windows(6).filter(|w| w == b"served").count() < count {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(read) => answers.extend_from_slice(&chunk[..read]),
                }
            }
            true
        };
        tokio::time::sleep(Duration::from_secs(8)).await;
        stream
            .write_all(kept_alive(head_lines::WATCHED_LINES + 6).as_bytes())
            .await
            .unwrap();
        let long = tokio::time::timeout(TEST_TIMEOUT, answered(&mut stream, 1)).await;
        assert_eq!(long, Ok(true), "the long head was not answered");
        tokio::time::sleep(Duration::from_secs(4)).await;
        // The server may have closed by now: the write can still succeed.
        let _ = stream.write_all(kept_alive(3).as_bytes()).await;
        let next = tokio::time::timeout(TEST_TIMEOUT, answered(&mut stream, 2)).await;
        server.stop().await;
        assert_eq!(
            next,
            Ok(true),
            "the connection was closed before the next head was due: {}",
            String::from_utf8_lossy(&answers)
        );
    }

    #[tokio::test]
    async fn a_request_body_of_many_lines_is_answered_and_its_connection_closed() {
        // The lines held back may be the rest of a body, not a head: the
        // connection is not switched but ends after its answer, whatever
        // the client sends next.
        let body = "line\n".repeat(200);
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}{}",
            body.len(),
            kept_alive(3)
        );
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(16, "test")).await;
        let address = server.address;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.unwrap();
            String::from_utf8(response).unwrap()
        };
        let response = tokio::time::timeout(TEST_TIMEOUT, exchange)
            .await
            .expect("the loop answered and closed in time");
        server.stop().await;
        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
        assert_eq!(response.matches("HTTP/1.1 ").count(), 1, "{response}");
    }

    #[tokio::test]
    async fn heads_over_32_kib_or_over_the_header_cap_get_431() {
        // Under the cap but over 32 KiB: measured by the loop, JSON.
        let (status, body) = answer(head_with(1_990, "X-Header: value\r\n")).await;
        assert_eq!(status, 431);
        assert!(body.contains("\"headers_too_large\""), "body {body:?}");

        // Over the cap, however small: hyper's own 431.
        let (status, _) = answer(head_with(MAX_HEADER_LINES, "a:\r\n")).await;
        assert_eq!(status, 431);
        let (status, _) = answer(head_with(6_000, "a:\r\n")).await;
        assert_eq!(status, 431);
    }

    #[test]
    fn accept_errors_are_logged_once_per_interval_with_the_count_not_logged() {
        let interval = Duration::from_secs(10);
        let mut errors = crate::log::LogEvery::new(interval);
        let start = std::time::Instant::now();
        assert_eq!(errors.note(start), Some(0));
        // 20 a second, as the back-off allows: none logged for 10 s.
        for tick in 1..200 {
            assert_eq!(errors.note(start + ACCEPT_BACKOFF * tick), None);
        }
        assert_eq!(errors.note(start + interval), Some(199));
        assert_eq!(errors.note(start + interval), None);
        assert_eq!(errors.note(start + interval * 3), Some(1));
    }

    #[test]
    fn the_refusal_is_a_complete_json_503_with_retry_after() {
        let refusal = String::from_utf8(overloaded_response()).unwrap();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("retry-after: {RETRY_AFTER_SECONDS}\r\n")));
        assert!(head.contains("connection: close"));
        assert!(head.contains("\r\nx-gitball-refused: max_connections\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], code::OVERLOADED);
    }

    #[tokio::test]
    async fn past_the_cap_a_connection_gets_503_and_a_freed_slot_serves_again() {
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = TestLoop::start(router, Connections::new(1, "test_cap")).await;
        let address = server.address;
        let exchange = async {
            // The one slot: a kept-alive connection, served once.
            let mut held = tokio::net::TcpStream::connect(address).await.unwrap();
            held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut first = [0u8; 12];
            held.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");

            let mut refused = tokio::net::TcpStream::connect(address).await.unwrap();
            refused
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            refused.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, overloaded_response());

            // Closing the held connection frees its slot.
            drop(held);
            loop {
                let mut next = tokio::net::TcpStream::connect(address).await.unwrap();
                next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                next.read_to_end(&mut answer).await.unwrap();
                if answer.starts_with(b"HTTP/1.1 200") {
                    break;
                }
                // The server may not have seen the close yet.
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(TEST_TIMEOUT, exchange)
            .await
            .expect("answered in time");
        server.stop().await;
    }

    /// An endless body in 16 KiB chunks that counts the bytes hyper took.
    struct Endless(Arc<std::sync::atomic::AtomicUsize>);

    const ENDLESS_CHUNK: usize = 16 * 1024;

    impl axum::body::HttpBody for Endless {
        type Data = axum::body::Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Infallible>>> {
            self.0.fetch_add(ENDLESS_CHUNK, Ordering::Relaxed);
            let chunk = axum::body::Bytes::from_static(&[b'x'; ENDLESS_CHUNK]);
            Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
        }
    }

    /// A client that reads nothing pins only a bounded number of bytes on
    /// the server side: what its own receive buffer took, hyper's write
    /// buffer, and at most `SEND_QUEUE_LOW_WATER_BYTES` plus one segment
    /// unsent in the kernel. Without `TCP_NOTSENT_LOWAT`, the send buffer's
    /// autotuning let the kernel queue megabytes.
    #[tokio::test]
    async fn a_stalled_client_pins_a_bounded_send_queue() {
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body_taken = taken.clone();
        let router = Router::new().route(
            "/",
            get(move || {
                let taken = body_taken.clone();
                async move { Body::new(Endless(taken)) }
            }),
        );
        let server = TestLoop::start(router, Connections::new(4, "test_lowat")).await;
        // A remote client's receive buffer, small as on a slow link.
        const CLIENT_RECEIVE_BUFFER: u32 = 16 * 1024;
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(CLIENT_RECEIVE_BUFFER).unwrap();
        let mut client = client.connect(server.address).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The server writes until the socket takes no more; wait (bounded)
        // until the count of bytes hyper took stops moving.
        let settled = async {
            let mut last = usize::MAX;
            let mut unchanged = 0;
            while unchanged < 5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = taken.load(Ordering::Relaxed);
                unchanged = if now == last && now > 0 {
                    unchanged + 1
                } else {
                    0
                };
                last = now;
            }
            last
        };
        let held = tokio::time::timeout(TEST_TIMEOUT, settled)
            .await
            .expect("the server stopped writing in time");
        // The client's receive buffer (the kernel doubles the size asked
        // for), hyper's write buffer bound, the unsent queue and one
        // segment of 64 KiB (loopback), and one chunk of slack.
        let bound = 2 * CLIENT_RECEIVE_BUFFER as usize
            + HEAD_BUFFER_BYTES
            + SEND_QUEUE_LOW_WATER_BYTES as usize
            + 64 * 1024
            + ENDLESS_CHUNK;
        assert!(
            held <= bound,
            "{held} bytes left the body for a client that reads nothing (bound {bound})"
        );
        drop(client);
        server.stop().await;
    }
}
