//! Bodies written around hyper: a file sent with `sendfile(2)`, or the rest
//! of a proxied download moved from socket to socket with `splice(2)`.
//!
//! hyper writes a body from memory: every byte of a file served through it
//! is first copied into user space (`pread`) and then into the socket
//! (`writev`). For a large cached archive on tmpfs those two copies are
//! nearly all the CPU a download costs. `sendfile` hands the file's pages
//! to the socket in the kernel, without the copy into user space.
//!
//! hyper has no way to send a file, so the accept loop takes the
//! connection back for the body:
//!
//! 1. A handler that may (the request carries a [`Takeover`]: HTTP/1.1
//!    and no request body) answers with [`Takeover::body`]: the response
//!    head is hyper's as always, and the body, when hyper first polls it,
//!    puts the [`FileBody`] where the loop finds it and stays pending.
//! 2. Once hyper has written every byte it buffered (the head, after any
//!    earlier response on the connection), the loop takes the socket and
//!    the bytes hyper read but did not parse (a pipelined next request)
//!    from hyper (`into_parts`), and lets the body write itself
//!    ([`FileBody::send`]) under the same write-stall timeout as hyper's
//!    writes ([`super::StallGuard`]).
//!
//!    A body stream hyper is already writing can hand the rest of itself
//!    over the same way, mid-body ([`Takeover::hand_over`]): the bytes
//!    hyper was given are written first, and the [`FileBody`] writes what
//!    follows them, in hyper's framing (raw under a `Content-Length`).
//! 3. The body sent, the loop serves the rest of the connection with a
//!    new hyper connection that reads the unparsed bytes first; when the
//!    request asked to close, or the server is shutting down, it closes
//!    instead. A body that fails closes the connection at once, without
//!    a shutdown, as hyper does for a body stream's error: the client sees
//!    fewer bytes than the `Content-Length` announced, or a chunked body
//!    without its terminating chunk.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use axum::body::{Body, Bytes, HttpBody};
use hyper::body::{Frame, SizeHint};
use nix::fcntl::SpliceFFlags;
use nix::sys::socket::MsgFlags;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{ClientWrites, StallGuard};

/// The most bytes of empty lines [`BodySocket::closed`] takes off the
/// socket during one body: what hyper's read buffer would take before a
/// request line, and far more than any client sends by mistake.
pub(crate) const MAX_EMPTY_LINE_BYTES: usize = 8 * 1024;

/// The socket a [`FileBody`] writes to.
pub type BodySocket = StallGuard<TcpStream>;

/// A response body that writes itself to the connection's socket.
pub trait FileBody: Send + 'static {
    /// Writes the whole body. An error closes the connection at once.
    fn send<'a>(
        self: Box<Self>,
        socket: &'a mut BodySocket,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;
}

/// Carried by a request whose response body may be a [`FileBody`]: one per
/// connection, cloned into each such request.
#[derive(Clone)]
pub struct Takeover(Arc<Offered>);

struct Offered {
    body: Mutex<Option<Box<dyn FileBody>>>,
    /// The request asked to close after its response.
    close_after: AtomicBool,
    /// The connection's writes: the offer clears `flushed`, so only a flush
    /// of hyper's after it (the head's) lets the loop take the connection.
    writes: ClientWrites,
}

impl Takeover {
    pub(super) fn new(writes: ClientWrites) -> Takeover {
        Takeover(Arc::new(Offered {
            body: Mutex::new(None),
            close_after: AtomicBool::new(false),
            writes,
        }))
    }

    /// The response body that hands `body` to the accept loop; `length`
    /// is the body's exact length, if known (hyper then sends the
    /// `Content-Length` the response's headers carry).
    pub fn body(&self, body: Box<dyn FileBody>, length: Option<u64>) -> Body {
        Body::new(Offer {
            takeover: self.clone(),
            body: Some(body),
            length,
        })
    }

    pub(super) fn set_close_after(&self, close: bool) {
        self.0.close_after.store(close, Ordering::Relaxed);
    }

    pub(super) fn close_after(&self) -> bool {
        self.0.close_after.load(Ordering::Relaxed)
    }

    /// The body hyper has polled, once hyper has written every byte it
    /// buffered before it (the head): the connection is the body's then.
    pub(super) fn take_when_flushed(&self) -> Option<Box<dyn FileBody>> {
        if !self.0.writes.flushed() {
            return None;
        }
        self.take()
    }

    /// The body hyper has polled, if one waits.
    pub(super) fn take(&self) -> Option<Box<dyn FileBody>> {
        self.0
            .body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Hands the rest of a body already under way to the accept loop: a
    /// body stream that has yielded some frames calls this and returns
    /// `Pending` from then on. The loop takes the connection once hyper
    /// has written every byte it was given (the frames so far), so `body`
    /// writes the bytes that follow them, in the framing hyper chose: raw
    /// for a response with a `Content-Length`.
    pub fn hand_over(&self, body: Box<dyn FileBody>) {
        self.0.writes.0.flushed.store(false, Ordering::Relaxed);
        *self.0.body.lock().unwrap_or_else(PoisonError::into_inner) = Some(body);
    }
}

/// The body hyper polls: hands its [`FileBody`] over at the first poll and
/// never yields a frame (the connection is taken from hyper before it
/// could want one).
struct Offer {
    takeover: Takeover,
    body: Option<Box<dyn FileBody>>,
    length: Option<u64>,
}

impl HttpBody for Offer {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(body) = self.body.take() {
            self.takeover.hand_over(body);
        }
        // No wake-up is registered: the accept loop looks for the offered
        // body after every poll of the connection.
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl StallGuard<TcpStream> {
    /// Sends up to `count` bytes of `file` from `offset` with `sendfile`;
    /// returns how many were sent, 0 only at the file's end. Fails with
    /// `TimedOut` when the client takes no bytes for the stall timeout.
    pub async fn send_file(
        &mut self,
        file: &std::fs::File,
        offset: u64,
        count: usize,
    ) -> io::Result<usize> {
        let mut offset = i64::try_from(offset).map_err(io::Error::other)?;
        self.write_with(|stream| {
            nix::sys::sendfile::sendfile64(stream, file, Some(&mut offset), count)
                .map_err(io::Error::from)
        })
        .await
    }

    /// Moves up to `count` bytes from the pipe `pipe` to the socket with
    /// `splice`, without copying them through user space; returns how many
    /// moved, 0 only when the pipe is empty and its write end closed.
    /// Fails with `TimedOut` when the client takes no bytes for the stall
    /// timeout.
    pub async fn splice_from(&mut self, pipe: &OwnedFd, count: usize) -> io::Result<usize> {
        self.write_with(|stream| {
            nix::fcntl::splice(
                pipe,
                None,
                stream,
                None,
                count,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        })
        .await
    }

    /// Waits until the socket takes bytes again, under the stall timeout
    /// like any write (a wait that ran out before is continued, not
    /// restarted).
    pub async fn writable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            self.guard(cx, |stream, cx| stream.get_mut().poll_write_ready(cx))
        })
        .await
    }

    /// Sends all of `bytes`, under the stall timeout like any write. With
    /// `more`, the kernel holds them back to go out with what is sent next
    /// (`MSG_MORE`): a chunk's size line leaves in one packet with its data.
    pub async fn send_bytes(&mut self, mut bytes: &[u8], more: bool) -> io::Result<()> {
        let flags = if more {
            MsgFlags::from_bits_retain(nix::libc::MSG_MORE)
        } else {
            MsgFlags::empty()
        };
        while !bytes.is_empty() {
            let sent = self
                .write_with(|stream| {
                    nix::sys::socket::send(
                        stream.as_raw_fd(),
                        bytes,
                        flags | MsgFlags::MSG_NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[sent..];
        }
        Ok(())
    }

    /// Resolves once the client has closed or reset the connection, as far
    /// as that can be told without reading: a body that waits for bytes to
    /// send watches this, as hyper watches a connection whose response
    /// waits (a client's end of input ends its connection; hyper's
    /// `half_close` is off). While input the client sent after its request
    /// (a pipelined request) waits unread, only a reset ends it: hyper too
    /// answers what came before the end of input, but after a reset nothing
    /// can be answered (attack: a pipelined request and a reset kept a
    /// spliced download's upstream until it sent again). (The pipelined
    /// request may also have been read already into the loop's buffers,
    /// off the socket: `input_waits`.)
    pub async fn closed(&self) {
        if !self.input_waits && self.end_of_input().await {
            return;
        }
        // The socket's error, which only a reset (or a failed write, which
        // reports it itself) sets.
        let _ = self.inner.ready(Interest::ERROR).await;
    }

    /// Waits for the client's end of input or reset (`true`), or for input
    /// it sent ahead (`false`). Empty lines are not input: hyper skips them
    /// before a request line, so they are taken off the socket here, up to
    /// [`MAX_EMPTY_LINE_BYTES`] per body; more is input, left to hyper
    /// (attack: taking an endless stream of them kept a core busy).
    async fn end_of_input(&self) -> bool {
        let recv = |bytes: &mut [u8], flags: MsgFlags| {
            self.inner.try_io(Interest::READABLE, || {
                nix::sys::socket::recv(
                    self.inner.as_raw_fd(),
                    bytes,
                    flags | MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)
            })
        };
        loop {
            if self.inner.ready(Interest::READABLE).await.is_err() {
                return true;
            }
            let mut bytes = [0u8; 1024];
            match recv(&mut bytes, MsgFlags::MSG_PEEK) {
                // Stale readiness, now cleared: wait again.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                // The end of input, or a reset.
                Ok(0) | Err(_) => return true,
                Ok(peeked)
                    if bytes[..peeked].iter().all(|&b| matches!(b, b'\r' | b'\n'))
                        && self.empty_line_bytes.fetch_add(peeked, Ordering::Relaxed) + peeked
                            <= MAX_EMPTY_LINE_BYTES =>
                {
                    // Taken as peeked (only this reads the socket now).
                    let _ = recv(&mut bytes[..peeked], MsgFlags::empty());
                }
                Ok(_) => return false,
            }
        }
    }

    /// Runs the non-blocking write `write` once the socket takes bytes,
    /// under the stall guard.
    async fn write_with(
        &mut self,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            self.guard(cx, |stream, cx| {
                let stream = &*stream.get_mut();
                loop {
                    ready!(stream.poll_write_ready(cx))?;
                    match stream.try_io(Interest::WRITABLE, || write(stream)) {
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                        written => return Poll::Ready(written),
                    }
                }
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use axum::Router;
    use axum::extract::Request;
    use axum::response::Response;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::server::Connections;
    use crate::server::OnConnection;
    use crate::server::tests::TestLoop;

    /// Bound on every wait in these tests.
    const TEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// More than a loopback socket takes in one call.
    const FILE_BYTES: usize = 3 * 1024 * 1024 + 17;
    /// Where `/handed` hands its body over: more than a small window takes.
    const HANDED_AFTER: usize = 1024 * 1024 + 5;

    /// How the last body sent ended.
    type Outcome = Arc<Mutex<Option<io::Result<u64>>>>;

    /// Sends `file` whole, or fails after `fail_after` bytes.
    struct Whole {
        file: std::fs::File,
        /// Where in the file the body starts.
        from: u64,
        len: u64,
        fail_after: Option<u64>,
        outcome: Outcome,
    }

    impl FileBody for Whole {
        fn send<'a>(
            self: Box<Self>,
            socket: &'a mut BodySocket,
        ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
            Box::pin(async move {
                let end = self.fail_after.unwrap_or(self.len);
                let mut at = self.from;
                let sent = async {
                    while at < end {
                        match socket
                            .send_file(&self.file, at, (end - at) as usize)
                            .await?
                        {
                            0 => return Err(io::Error::other("file ended early")),
                            sent => at += sent as u64,
                        }
                    }
                    match self.fail_after {
                        Some(_) => Err(io::Error::other("the body failed")),
                        None => Ok(at),
                    }
                }
                .await;
                let result = sent
                    .as_ref()
                    .map(|_| ())
                    .map_err(|error| io::Error::new(error.kind(), error.to_string()));
                *self.outcome.lock().unwrap() = Some(sent);
                result
            })
        }
    }

    struct Served {
        address: std::net::SocketAddr,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<io::Result<crate::server::Drain>>,
        data: Vec<u8>,
        outcome: Outcome,
        _dir: tempfile::TempDir,
    }

    /// A loop serving `/file` (written around hyper where the request
    /// allows it, `x-path: takeover`, else as a plain body, `x-path:
    /// stream`) and `/`.
    async fn start(fail_after: Option<u64>, stall: Duration) -> Served {
        start_with_grace(fail_after, stall, Duration::ZERO).await
    }

    async fn start_with_grace(fail_after: Option<u64>, stall: Duration, grace: Duration) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.path().join("file");
        std::fs::write(&path, &data).unwrap();
        let path = Arc::new(path);
        let outcome = Outcome::default();
        let file = {
            let path = path.clone();
            let outcome = outcome.clone();
            move |request: Request| async move {
                file_response(
                    &path,
                    request
                        .extensions()
                        .get::<OnConnection>()
                        .and_then(|connection| connection.takeover.as_ref()),
                    fail_after,
                    outcome,
                )
            }
        };
        let handed = {
            let outcome = outcome.clone();
            move |request: Request| async move {
                handed_response(
                    &path,
                    request
                        .extensions()
                        .get::<OnConnection>()
                        .and_then(|connection| connection.takeover.clone()),
                    outcome,
                )
            }
        };
        let router = Router::new()
            .route("/file", get(file))
            .route("/handed", get(handed))
            .route("/", get(|| async { "served" }));
        let TestLoop {
            address,
            shutdown,
            server,
        } = TestLoop::start_with(router, Connections::new(16, "test_takeover"), grace, stall).await;
        Served {
            address,
            shutdown,
            server,
            data,
            outcome,
            _dir: dir,
        }
    }

    fn file_response(
        path: &PathBuf,
        takeover: Option<&Takeover>,
        fail_after: Option<u64>,
        outcome: Outcome,
    ) -> Response {
        let len = FILE_BYTES as u64;
        let response = Response::builder().header(http::header::CONTENT_LENGTH, len);
        match takeover {
            Some(takeover) => {
                let whole = Whole {
                    file: std::fs::File::open(path).unwrap(),
                    from: 0,
                    len,
                    fail_after,
                    outcome,
                };
                response
                    .header("x-path", "takeover")
                    .body(takeover.body(Box::new(whole), Some(len)))
            }
            None => response
                .header("x-path", "stream")
                .body(Body::from(std::fs::read(path).unwrap())),
        }
        .unwrap()
    }

    /// The file as a body stream whose first [`HANDED_AFTER`] bytes hyper
    /// writes, in frames of 16 KiB, and whose rest is handed over
    /// (`Takeover::hand_over`).
    fn handed_response(path: &PathBuf, takeover: Option<Takeover>, outcome: Outcome) -> Response {
        let len = FILE_BYTES as u64;
        let data = std::fs::read(path).unwrap();
        let rest = Whole {
            file: std::fs::File::open(path).unwrap(),
            from: HANDED_AFTER as u64,
            len,
            fail_after: None,
            outcome,
        };
        // Small frames: hyper queues several before it writes, so some are
        // still in its buffer when the rest is handed over.
        let mut frames: Vec<Bytes> = data[..HANDED_AFTER]
            .chunks(16 * 1024)
            .map(Bytes::copy_from_slice)
            .collect();
        frames.reverse();
        let mut rest = Some(Box::new(rest) as Box<dyn FileBody>);
        let takeover = takeover.expect("an HTTP/1.1 request");
        let stream = futures_util::stream::poll_fn(move |_cx| match frames.pop() {
            Some(frame) => Poll::Ready(Some(Ok::<_, io::Error>(frame))),
            None => {
                if let Some(rest) = rest.take() {
                    takeover.hand_over(rest);
                }
                Poll::Pending
            }
        });
        Response::builder()
            .header(http::header::CONTENT_LENGTH, len)
            .header("x-path", "handed")
            .body(Body::from_stream(stream))
            .unwrap()
    }

    /// `future`, which must finish within [`TEST_TIMEOUT`].
    async fn within<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(TEST_TIMEOUT, future)
            .await
            .expect("finished in time")
    }

    /// One response read off a connection: its head and body.
    struct Answer {
        head: String,
        body: Vec<u8>,
    }

    /// Reads responses from a socket, keeping what follows one for the next.
    struct Client {
        stream: tokio::net::TcpStream,
        buffer: Vec<u8>,
    }

    impl Client {
        async fn connect(address: std::net::SocketAddr) -> Client {
            Client {
                stream: tokio::net::TcpStream::connect(address).await.unwrap(),
                buffer: Vec::new(),
            }
        }

        /// A client with a small receive window, as on a slow link: the
        /// server cannot send a body whole before it reads.
        async fn with_small_window(address: std::net::SocketAddr) -> Client {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            Client {
                stream: socket.connect(address).await.unwrap(),
                buffer: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &str) {
            self.stream.write_all(bytes.as_bytes()).await.unwrap();
        }

        /// Reads more; false at the end of the input (or a reset).
        async fn fill(&mut self) -> bool {
            let mut chunk = vec![0u8; 256 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => false,
                Ok(read) => {
                    self.buffer.extend_from_slice(&chunk[..read]);
                    true
                }
            }
        }

        /// The next response, its body cut short if the connection ends.
        async fn answer(&mut self) -> Answer {
            let end = loop {
                if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                assert!(self.fill().await, "the connection ended in a head");
            };
            let head = String::from_utf8(self.buffer.drain(..end).collect()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |length| length.trim().parse().unwrap());
            while self.buffer.len() < length && self.fill().await {}
            let body = self.buffer.drain(..length.min(self.buffer.len())).collect();
            Answer { head, body }
        }

        /// Whether the server closed the connection with nothing more.
        async fn closed(&mut self) -> bool {
            !self.fill().await && self.buffer.is_empty()
        }
    }

    fn request(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    impl Served {
        fn assert_whole(&self, answer: &Answer, path: &str) {
            assert!(answer.head.starts_with("HTTP/1.1 200 "), "{}", answer.head);
            assert!(
                answer.head.contains(&format!("x-path: {path}\r\n")),
                "{}",
                answer.head
            );
            assert!(
                answer.body == self.data,
                "{} of {} bytes, or other bytes",
                answer.body.len(),
                self.data.len()
            );
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.server.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_file_body_keeps_its_connection_for_what_follows_and_sent_ahead() {
        let served = start(None, TEST_TIMEOUT).await;
        let exchange = async {
            let mut client = Client::connect(served.address).await;
            client.send(&request("/file")).await;
            served.assert_whole(&client.answer().await, "takeover");
            assert_eq!(
                *served
                    .outcome
                    .lock()
                    .unwrap()
                    .as_ref()
                    .unwrap()
                    .as_ref()
                    .unwrap(),
                FILE_BYTES as u64
            );
            // Sent ahead in one write: a file body, a small answer, and a
            // file body after it (hyper's bytes then precede the head and
            // the file), then a small one after the file again.
            client
                .send(
                    &[
                        request("/file"),
                        request("/"),
                        request("/file"),
                        request("/"),
                    ]
                    .concat(),
                )
                .await;
            served.assert_whole(&client.answer().await, "takeover");
            assert_eq!(client.answer().await.body, b"served");
            served.assert_whole(&client.answer().await, "takeover");
            assert_eq!(client.answer().await.body, b"served");
            // Asked to close: the file, then the end.
            client
                .send("GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            served.assert_whole(&client.answer().await, "takeover");
            assert!(client.closed().await, "the connection stayed open");
        };
        within(exchange).await;
        served.stop().await;
    }

    #[tokio::test]
    async fn a_body_under_way_hands_its_rest_over_after_what_hyper_was_given() {
        let served = start(None, TEST_TIMEOUT).await;
        let exchange = async {
            // A small window: hyper still holds some of its frames when
            // the rest is handed over, and must write them first.
            let mut client = Client::with_small_window(served.address).await;
            client
                .send(&[request("/handed"), request("/")].concat())
                .await;
            served.assert_whole(&client.answer().await, "handed");
            assert_eq!(client.answer().await.body, b"served");
            client.send(&request("/handed")).await;
            served.assert_whole(&client.answer().await, "handed");
            let sent = served.outcome.lock().unwrap().take().unwrap().unwrap();
            assert_eq!(sent, FILE_BYTES as u64);
        };
        within(exchange).await;
        served.stop().await;
    }

    #[tokio::test]
    async fn http_1_0_gets_no_takeover() {
        let served = start(None, TEST_TIMEOUT).await;
        let exchange = async {
            let mut client = Client::connect(served.address).await;
            client.send("GET /file HTTP/1.0\r\n\r\n").await;
            let answer = client.answer().await;
            assert!(
                answer.head.contains("x-path: stream\r\n"),
                "{}",
                answer.head
            );
            assert!(answer.body == served.data);
        };
        within(exchange).await;
        served.stop().await;
    }

    #[tokio::test]
    async fn a_file_body_that_fails_cuts_the_connection_short() {
        let fail_after = 1024 * 1024;
        let served = start(Some(fail_after), TEST_TIMEOUT).await;
        let exchange = async {
            let mut client = Client::connect(served.address).await;
            client
                .send(&[request("/file"), request("/")].concat())
                .await;
            let answer = client.answer().await;
            assert!(
                answer
                    .head
                    .contains(&format!("content-length: {FILE_BYTES}\r\n"))
            );
            assert_eq!(
                answer.body.len() as u64,
                fail_after,
                "what came before the failure"
            );
            assert!(client.closed().await, "the next request was answered");
        };
        within(exchange).await;
        served.stop().await;
    }

    #[tokio::test]
    async fn a_client_that_takes_no_bytes_is_cut_after_the_stall_timeout() {
        let stall = Duration::from_millis(300);
        let served = start(None, stall).await;
        let exchange = async {
            let mut client = Client::with_small_window(served.address).await;
            client.send(&request("/file")).await;
            // Reads nothing until the server gave up on it.
            loop {
                if let Some(outcome) = served.outcome.lock().unwrap().as_ref() {
                    let error = outcome
                        .as_ref()
                        .expect_err("a stalled client got everything");
                    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let answer = client.answer().await;
            assert!(answer.body.len() < FILE_BYTES, "the body was cut");
        };
        within(exchange).await;
        served.stop().await;
    }

    #[tokio::test]
    async fn a_file_body_under_way_at_shutdown_is_finished_and_its_connection_closed() {
        let served = start_with_grace(None, TEST_TIMEOUT, TEST_TIMEOUT).await;
        // The body cannot be sent whole before the client read its start.
        let mut client = Client::with_small_window(served.address).await;
        let exchange = async {
            client
                .send(&[request("/file"), request("/")].concat())
                .await;
            // The body is under way: its first bytes are here.
            while client.buffer.len() < 64 * 1024 {
                assert!(client.fill().await, "the connection ended early");
            }
            served.shutdown.cancel();
            served.assert_whole(&client.answer().await, "takeover");
            // Closed after it: the request sent ahead is not answered.
            assert!(client.closed().await, "the connection stayed open");
        };
        within(exchange).await;
        let drain = within(served.server).await.unwrap().unwrap();
        assert_eq!(drain, crate::server::Drain::Complete);
    }

    /// A connected pair: the server's end as a body sees it, and the client.
    async fn pair() -> (BodySocket, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let guard = StallGuard::new(server, TEST_TIMEOUT, ClientWrites::default());
        (guard, client)
    }

    #[tokio::test]
    async fn closed_tells_a_client_that_left_and_waits_behind_input_sent_ahead() {
        // Still there: pending.
        let (server, client) = pair().await;
        let waited = tokio::time::timeout(Duration::from_millis(200), server.closed()).await;
        assert!(waited.is_err(), "closed() resolved for a connected client");
        // Gone (its end of input, then a reset): resolves.
        drop(client);
        within(server.closed()).await;

        // Input sent ahead, then the client's end: pending, so that what
        // it sent is answered first, as hyper would.
        let (server, mut client) = pair().await;
        client.write_all(request("/").as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), server.closed()).await;
        assert!(waited.is_err(), "closed() resolved with a request unread");
        // Nothing was consumed.
        let mut server = server;
        let mut read = Vec::new();
        server.inner.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, request("/").as_bytes());

        // Empty lines are not input: the client's end after them resolves.
        let (server, mut client) = pair().await;
        client.write_all(b"\r\n\r\n").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), server.closed()).await;
        assert!(waited.is_err(), "closed() resolved for a connected client");
        client.shutdown().await.unwrap();
        within(server.closed()).await;

        // Beyond `MAX_EMPTY_LINE_BYTES`, empty lines are input like any:
        // not taken off the socket (attack: an endless stream of them kept
        // a core busy), and the end of input after them leaves it pending.
        let (server, mut client) = pair().await;
        let flood = vec![b'\n'; 2 * MAX_EMPTY_LINE_BYTES];
        client.write_all(&flood).await.unwrap();
        client.shutdown().await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), server.closed()).await;
        assert!(
            waited.is_err(),
            "closed() resolved behind a flood of empty lines"
        );
        let mut server = server;
        let mut left = Vec::new();
        server.inner.read_to_end(&mut left).await.unwrap();
        assert!(
            left.len() >= MAX_EMPTY_LINE_BYTES,
            "{} bytes of empty lines taken",
            flood.len() - left.len()
        );

        // Input sent ahead, on the socket or already read off it, then a
        // reset: nothing can be answered, so it resolves.
        for read_ahead in [false, true] {
            let (mut server, mut client) = pair().await;
            client.write_all(request("/").as_bytes()).await.unwrap();
            server.input_waits = read_ahead;
            let waited = tokio::time::timeout(Duration::from_millis(200), server.closed()).await;
            assert!(waited.is_err(), "closed() resolved with a request unread");
            client.set_zero_linger().unwrap();
            drop(client);
            within(server.closed()).await;
        }
    }
}
