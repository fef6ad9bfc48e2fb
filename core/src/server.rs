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
//!   hyper's empty `431`, whatever its size;
//! - TCP keepalive, so a peer that vanished is noticed even when idle;
//! - a write-stall timeout: a connection whose writes make no progress for
//!   `write_stall_timeout` (a client that stopped taking bytes) is closed.
//!   Nothing inside a body stream can do this, because hyper stops polling
//!   the body while the socket is full; the socket wrapper ([`StallGuard`])
//!   sees the stuck write itself;
//! - a bounded graceful shutdown: on `shutdown` it stops accepting, lets
//!   running requests (downloads) finish for up to `grace`, then drops the
//!   connections still open, which drops their body streams and with them
//!   every fd and slot they held.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::protocol::code;
use crate::response::json_error;

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
/// `ops/bench`-like `wrk` load: 275–460 µs against 40 µs per hit).
const MAX_HEADER_LINES: usize = 2000;
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

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
/// `write_stall_timeout` is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
    write_stall_timeout: Duration,
) -> std::io::Result<Drain> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(HEAD_BUFFER_BYTES)
        .max_headers(MAX_HEADER_LINES)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);

        let router = router.clone();
        let stalled = WriteStalled::default();
        let stream = StallGuard::new(stream, write_stall_timeout, stalled.clone());
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let router = router.clone();
            // Lets a body stream tell, when it is dropped, that its
            // connection was closed for a client that took no bytes.
            request.extensions_mut().insert(stalled.clone());
            async move { Ok::<_, Infallible>(handle(router, request).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let drain = tokio::select! {
        () = graceful.shutdown() => Drain::Complete,
        () = tokio::time::sleep(grace) => {
            let open = connections.len();
            connections.abort_all();
            Drain::Cut(open)
        }
    };
    while connections.join_next().await.is_some() {}
    Ok(drain)
}

async fn handle(router: Router, request: hyper::Request<Incoming>) -> Response {
    let line =
        request.method().as_str().len() + request.uri().to_string().len() + " HTTP/1.1\r\n".len();
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

fn too_large(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = json_error(status, code, message);
    // The rest of an oversized request is not worth reading.
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// Set when a connection's write-stall guard fired. Each request carries
/// its connection's flag as an extension.
#[derive(Clone, Debug, Default)]
pub struct WriteStalled(Arc<AtomicBool>);

impl WriteStalled {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A socket whose writes fail with `TimedOut` once they have been pending
/// for longer than the stall timeout.
pub struct StallGuard<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write is pending; boxed so the guard stays `Unpin`.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    fired: WriteStalled,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, timeout: Duration, fired: WriteStalled) -> Self {
        StallGuard {
            inner,
            timeout,
            stalled: None,
            fired,
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
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.fired.0.store(true, Ordering::Release);
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
        self.guard(cx, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |inner, cx| inner.poll_flush(cx))
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

    const STALL: Duration = Duration::from_secs(300);

    /// A guarded end of a duplex with a 4-byte buffer, and the peer end.
    fn guarded() -> (StallGuard<DuplexStream>, DuplexStream, WriteStalled) {
        let (ours, peer) = duplex(4);
        let stalled = WriteStalled::default();
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
        assert!(!stalled.is_set());

        // The peer takes nothing: the write waits, then fails. (An await,
        // not manual polls: the guard's timer must wake the writer.)
        let started = Instant::now();
        let error = guard.write_all(b"efgh").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), STALL);
        assert!(stalled.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_fails_only_once_pending_for_the_whole_timeout() {
        let (mut guard, _peer, stalled) = guarded();
        guard.write_all(b"abcd").await.unwrap();
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        tokio::time::advance(STALL - Duration::from_millis(1)).await;
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        assert!(!stalled.is_set());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(timed_out(poll_write(&mut guard, b"efgh")));
        assert!(stalled.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn progress_before_the_timeout_disarms_the_guard() {
        let (mut guard, mut peer, stalled) = guarded();
        guard.write_all(b"abcd").await.unwrap();
        assert!(poll_write(&mut guard, b"efgh").is_pending());
        tokio::time::advance(STALL * 2 / 3).await;
        assert!(poll_write(&mut guard, b"efgh").is_pending());

        // The peer takes the bytes: the write goes through.
        let mut taken = [0u8; 4];
        peer.read_exact(&mut taken).await.unwrap();
        assert_eq!(&taken, b"abcd");
        assert!(matches!(
            poll_write(&mut guard, b"efgh"),
            Poll::Ready(Ok(4))
        ));

        // Stuck again: the timeout counts from now, not from the first
        // stall (whose deadline passes in between).
        assert!(poll_write(&mut guard, b"ijkl").is_pending());
        tokio::time::advance(STALL * 2 / 3).await;
        assert!(poll_write(&mut guard, b"ijkl").is_pending());
        assert!(!stalled.is_set());
        tokio::time::advance(STALL / 3).await;
        assert!(timed_out(poll_write(&mut guard, b"ijkl")));
        assert!(stalled.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pass_through_and_never_time_out() {
        let (mut guard, mut peer, stalled) = guarded();
        assert!(poll_read(&mut guard).is_pending());
        tokio::time::advance(STALL * 10).await;
        assert!(poll_read(&mut guard).is_pending());
        assert!(!stalled.is_set());

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
        assert!(!stalled.is_set());

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

        assert!(!stalled.is_set());

        let (mut guard, peer, stalled) = guarded();
        drop(peer);
        let error = guard.write_all(b"abcd").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
        assert!(!stalled.is_set());
    }

    /// Bound on every wait in these tests.
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// Sends `head` on a fresh connection to a loop serving `GET /` and
    /// returns the status and body (the loop closes: `Connection: close`).
    async fn answer(head: Vec<u8>) -> (u16, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let router = Router::new().route("/", get(|| async { "served" }));
        let server = tokio::spawn(serve(
            listener,
            router,
            shutdown.clone(),
            Duration::ZERO,
            TEST_TIMEOUT,
        ));
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
        shutdown.cancel();
        server.await.unwrap().unwrap();
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
}
