//! Upstream connections: opened, kept idle between requests, reused.
//!
//! Each serving thread's [`crate::forward::Forwarder`] has one [`Pool`]
//! (see `crate::Proxy::serve`), holding the idle HTTP/1 connections to
//! every upstream it has talked to, each upstream's in a list of its own
//! found by its name in a map with a fast hash (a fleet of hundreds of
//! archivers, and names that change with route reloads: a linear search
//! cost a request more than the rest of a hit). A request
//! takes the connection that came back last, or opens one; its response's
//! body gives the connection back when it ends whole ([`PooledBody`]).
//! The HTTP/1.1 exchange itself is the proxy's own (`exchange`), run in the
//! request's task: hyper-util's pooled client cost a small hit about a
//! quarter of the proxy's instructions (a SipHash of the authority per
//! checkout and return, a task spawned per response to wait for the
//! connection to be ready again, the URI's authority parsed and cut away
//! again), and hyper's client connection, in a task of its own, about a
//! sixth more (the response head parsed into a map name by name, a custom
//! name allocated, each answer handed over a channel).
//!
//! What it guarantees, as that client did (docs/internal-api.md,
//! "Connections"):
//!
//! - a connection is reused only after its previous response's body ended
//!   whole; one whose body was dropped before its end (the client left,
//!   a `5xx` failed over) is closed, never pooled;
//! - an idle connection on which anything came since its last answer
//!   (bytes, or the upstream's close) is not used, and is closed as soon
//!   as the runtime sees it (the reaper is woken); a request that met
//!   the connection's end or a reset before any byte of an answer (the
//!   upstream's close crossed the request) is sent again, once, on a new
//!   connection; the same on a new connection is the attempt's failure
//!   (and the caller's failover). The proxy's requests are `GET`s and
//!   `HEAD`s, and prewarm `POST`s (a second joins the generation the
//!   first started), safe to send twice, and a connection its upstream
//!   closed served none of them;
//! - at most [`POOL_MAX_IDLE_PER_UPSTREAM`] idle connections per upstream;
//!   one whose body ends when its list is full is closed;
//! - an idle connection is closed [`POOL_IDLE_TIMEOUT`] after it came back
//!   (a task per pool, running only while something is idle);
//! - connects time out after `--connect-timeout`; each connection opens
//!   with the small receive window (`window`), TCP keep-alive and no
//!   Nagle, and reads into buffers of
//!   [`crate::forward::UPSTREAM_READ_BUFFER_BYTES`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
// The runtime's clock, which a test can pause.
use tokio::time::Instant;

use crate::exchange::{Decoder, Present, RequestHead, Wire};
use crate::forward::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_UPSTREAM};
use crate::window::{SMALL_RECV_BUFFER_BYTES, UpstreamWindow, WindowedIo};

/// Why no response head came back from an upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the upstream {0:?} is not an http://host:port URL")]
    NotHttp(Arc<str>),
    #[error("connecting: {0}")]
    Connect(#[source] io::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The exchange failed: the connection broke, or what came back was
    /// no HTTP/1 response head (`exchange`).
    #[error("{0}")]
    Http(#[source] io::Error),
}

/// One serving thread's idle upstream connections. A clone shares them.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Pool").finish_non_exhaustive()
    }
}

struct Shared {
    connect_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By name; an upstream with no idle connection left when the reaper
    /// runs is dropped (route reloads change the names).
    upstreams: std::collections::HashMap<Arc<str>, Upstream, foldhash::fast::RandomState>,
    /// Whether the task closing expired idle connections runs.
    reaping: bool,
    /// That task's waker, once it ran: an idle connection wakes it when
    /// anything comes on it (its upstream's close), to be closed at once.
    reaper: Option<std::task::Waker>,
}

/// One upstream's address and idle connections, oldest first.
struct Upstream {
    /// `host:port`, for the connect.
    address: String,
    /// The `Host` of every request to it.
    host: HeaderValue,
    idle: std::collections::VecDeque<Idle>,
}

struct Idle {
    connection: Connection,
    since: Instant,
}

/// An open connection: its socket and read buffer (`exchange`).
#[derive(Debug)]
struct Connection {
    wire: Wire,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                connect_timeout,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Sends `request` (a `GET` or `HEAD`, or a prewarm's `POST`; its
    /// `Host` is set here) to `upstream` (`http://host:port`) and waits for
    /// the response head. Not bounded in time but for the connect: the
    /// caller bounds it. A request sent again (see the module docs) is the
    /// same head.
    pub async fn send(
        &self,
        upstream: &Arc<str>,
        request: RequestHead<'_>,
    ) -> Result<http::Response<PooledBody>, SendError> {
        let host = {
            let mut state = self.shared.lock();
            match state.upstreams.get(&**upstream) {
                Some(slot) => slot.host.clone(),
                None => state.add(upstream)?.host.clone(),
            }
        };
        // Once a written request met a close, it goes out again on a new
        // connection only: at most twice in all, whatever the idle ones.
        let mut resent = false;
        loop {
            let checked_out = if resent {
                None
            } else {
                self.checkout(upstream).await
            };
            let (mut connection, reused) = match checked_out {
                Some(connection) => (connection, true),
                None => (self.connect(upstream).await?, false),
            };
            match connection.wire.exchange(&request, &host).await {
                Ok(head) => {
                    let mut body = PooledBody {
                        decoder: Decoder::new(head.framing),
                        keep_alive: head.keep_alive,
                        present: head.present,
                        back: Some(Back {
                            pool: Arc::downgrade(&self.shared),
                            upstream: upstream.clone(),
                            connection,
                        }),
                    };
                    if body.decoder.is_done() {
                        // No body (a `HEAD`, a `304`): the connection is
                        // done with this exchange already.
                        body.give_back();
                    }
                    return Ok(http::Response::from_parts(head.parts, body));
                }
                // Written, or turned away as it was written, and the
                // connection closed before any answer: the upstream's
                // close crossed the request (a `GET`, `HEAD` or prewarm
                // `POST`, safe to send again), once, on a new connection: the archiver may
                // also have closed on reading it, and would get it again
                // from every idle connection. On a new connection, any
                // failure is the attempt's.
                Err(error) if reused && error.unanswered => resent = true,
                Err(error) => return Err(SendError::Http(error.error)),
            }
        }
    }

    /// The upstream's most recent idle connection that is still open:
    /// nothing came on it since its last answer, not even its close.
    async fn checkout(&self, upstream: &Arc<str>) -> Option<Connection> {
        let mut state = self.shared.lock();
        let slot = state.upstreams.get_mut(&**upstream)?;
        loop {
            let idle = slot.idle.pop_back()?;
            if idle.since.elapsed() < POOL_IDLE_TIMEOUT && idle.connection.wire.is_idle_and_open() {
                return Some(idle.connection);
            }
        }
    }

    async fn connect(&self, upstream: &Arc<str>) -> Result<Connection, SendError> {
        let address = {
            let mut state = self.shared.lock();
            match state.upstreams.get(&**upstream) {
                Some(slot) => slot.address.clone(),
                // Dropped by the reaper while this request waited.
                None => state.add(upstream)?.address.clone(),
            }
        };
        let connect_timeout = self.shared.connect_timeout;
        let stream = tokio::time::timeout(
            connect_timeout,
            crate::splice::connect(&address, SMALL_RECV_BUFFER_BYTES),
        )
        .await
        .map_err(|_| SendError::ConnectTimeout(connect_timeout))?
        .map_err(SendError::Connect)?;
        Ok(Connection {
            wire: Wire::new(WindowedIo::new(TokioIo::new(stream))),
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still a
        // list of connections.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `connection` idle, unless its upstream has its fill; starts
    /// the reaper if it is not running.
    fn give_back(self: &Arc<Shared>, upstream: &Arc<str>, connection: Connection) {
        let mut state = self.lock();
        if !state.upstreams.contains_key(&**upstream) && state.add(upstream).is_err() {
            return;
        }
        let Some(slot) = state.upstreams.get_mut(&**upstream) else {
            return;
        };
        if slot.idle.len() >= POOL_MAX_IDLE_PER_UPSTREAM {
            return;
        }
        if let Some(reaper) = &state.reaper
            && connection
                .wire
                .poll_closed(&mut Context::from_waker(reaper))
        {
            return;
        }
        let Some(slot) = state.upstreams.get_mut(&**upstream) else {
            return;
        };
        slot.idle.push_back(Idle {
            connection,
            since: Instant::now(),
        });
        if !state.reaping {
            state.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }
}

impl State {
    /// Adds `upstream`'s list, at its first request (or its first since
    /// the reaper dropped it).
    fn add(&mut self, upstream: &Arc<str>) -> Result<&mut Upstream, SendError> {
        let not_http = || SendError::NotHttp(upstream.clone());
        let uri = http::Uri::try_from(&**upstream).map_err(|_| not_http())?;
        let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(not_http());
        };
        let port = authority.port_u16().unwrap_or(80);
        let host = if port == 80 {
            authority.host().to_owned()
        } else {
            format!("{}:{port}", authority.host())
        };
        let slot = Upstream {
            address: format!("{}:{port}", authority.host()),
            host: HeaderValue::try_from(host).map_err(|_| not_http())?,
            idle: Default::default(),
        };
        Ok(self.upstreams.entry(upstream.clone()).or_insert(slot))
    }
}

/// Closes idle connections [`POOL_IDLE_TIMEOUT`] after they came back, and
/// at once those on which anything came (their upstream's close: hyper's
/// connection task closed them as it read it); ends when none is idle (or
/// the pool is gone).
async fn reap(pool: Weak<Shared>) {
    let mut wait = POOL_IDLE_TIMEOUT;
    loop {
        let sleep = tokio::time::sleep(wait);
        let mut sleep = std::pin::pin!(sleep);
        std::future::poll_fn(|cx| {
            if let Some(shared) = pool.upgrade() {
                let mut state = shared.lock();
                if !state
                    .reaper
                    .as_ref()
                    .is_some_and(|reaper| reaper.will_wake(cx.waker()))
                {
                    state.reaper = Some(cx.waker().clone());
                }
                for slot in state.upstreams.values_mut() {
                    slot.idle
                        .retain(|idle| !idle.connection.wire.poll_closed(cx));
                }
            }
            sleep.as_mut().poll(cx)
        })
        .await;
        let Some(shared) = pool.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let now = Instant::now();
        let mut oldest: Option<Instant> = None;
        state.upstreams.retain(|_, slot| {
            slot.idle
                .retain(|idle| now.duration_since(idle.since) < POOL_IDLE_TIMEOUT);
            if let Some(first) = slot.idle.front() {
                oldest = Some(oldest.map_or(first.since, |oldest| oldest.min(first.since)));
            }
            // Kept only while it has idle connections: an upstream gone
            // from the routes must not stay (nor slow the look-ups).
            !slot.idle.is_empty()
        });
        match oldest {
            Some(oldest) => {
                wait = (oldest + POOL_IDLE_TIMEOUT).saturating_duration_since(now)
                    + Duration::from_millis(1);
            }
            None => {
                state.reaping = false;
                state.reaper = None;
                return;
            }
        }
    }
}

/// A response's body, read from its connection as the caller polls it
/// (`exchange::Decoder`), in the caller's task; the connection goes back to the
/// pool when the body ended whole with nothing after it, and is closed
/// otherwise (dropped before its end, failed, or framed by the
/// connection's end).
pub struct PooledBody {
    decoder: Decoder,
    keep_alive: bool,
    present: Present,
    back: Option<Back>,
}

struct Back {
    pool: Weak<Shared>,
    upstream: Arc<str>,
    connection: Connection,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PooledBody")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    /// Which of `Transfer-Encoding` and `Connection` the head's lines
    /// held: one that did not is not in the response's map, as long as
    /// nothing adds it.
    pub fn present(&self) -> Present {
        self.present
    }

    pub fn window(&self) -> Option<&UpstreamWindow> {
        self.back.as_ref().map(|back| back.connection.wire.window())
    }

    /// The whole body, when the connection's reads so far hold all of it
    /// (`Decoder::take_whole`); the connection then goes back to the pool
    /// as at the body's end. `None`, nothing taken, when more must be read.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        if self.decoder.is_done() {
            // No body, or none left: its connection went back already.
            return Some(Bytes::new());
        }
        let back = self.back.as_mut()?;
        let whole = self.decoder.take_whole(&mut back.connection.wire)?;
        self.give_back();
        Some(whole)
    }

    fn give_back(&mut self) {
        let Some(mut back) = self.back.take() else {
            return;
        };
        // Its read buffer goes to the thread's spares, kept or not
        // (`exchange::Wire::release_buffer`; not if bytes are left in it).
        back.connection.wire.release_buffer();
        if self.keep_alive
            && Decoder::left_clean(&back.connection.wire)
            && let Some(pool) = back.pool.upgrade()
        {
            pool.give_back(&back.upstream, back.connection);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let Some(back) = this.back.as_mut() else {
            return Poll::Ready(None);
        };
        match this.decoder.poll_data(&mut back.connection.wire, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                if this.decoder.is_done() {
                    this.give_back();
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Ok(None)) => {
                this.give_back();
                Poll::Ready(None)
            }
            Poll::Ready(Err(error)) => {
                this.back = None;
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    /// Reads one request head from `stream` (a test upstream's).
    fn read_head(stream: &mut std::net::TcpStream) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).expect("read"), 1, "a whole head");
            head.push(byte[0]);
        }
    }

    fn request() -> RequestHead<'static> {
        static TARGET: std::sync::LazyLock<http::uri::PathAndQuery> =
            std::sync::LazyLock::new(|| {
                http::uri::PathAndQuery::from_static("/acme/widget/archive/main.tar.gz")
            });
        static HEADERS: std::sync::LazyLock<http::HeaderMap> =
            std::sync::LazyLock::new(http::HeaderMap::new);
        RequestHead::get(&TARGET, &HEADERS)
    }

    /// docs/internal-api.md, "Connections": a request written on an idle
    /// connection that the archiver had just closed (the close not yet
    /// seen by the proxy) goes out again on a new connection instead of
    /// failing. (The archiver closes connections idle for its keep-alive
    /// timeout; the pool lets them go earlier, but a close can still meet
    /// a request.)
    #[tokio::test]
    async fn a_request_crossing_an_idle_connections_close_is_sent_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (first, first_connection) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            // The first connection answers once and is handed to the test,
            // which closes it; the second answers the request sent again.
            let (mut stream, _) = listener.accept().unwrap();
            read_head(&mut stream);
            stream.write_all(ANSWER).unwrap();
            first.send(stream).unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            read_head(&mut stream);
            stream.write_all(ANSWER).unwrap();
            stream
        });
        let pool = Pool::new(Duration::from_secs(5));
        let response = pool
            .send(&upstream, request())
            .await
            .expect("the first answer");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        // Until the connection is back and ready for the next request: the
        // close below must meet it idle and trusted.
        let ready = |pool: &Pool| {
            let state = pool.shared.lock();
            state
                .upstreams
                .values()
                .next()
                .unwrap()
                .idle
                .back()
                .is_some()
        };
        for _ in 0..10_000 {
            if ready(&pool) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(ready(&pool), "the connection came back to the pool");
        // The archiver closes it; the pool's connection task has not run
        // since (nothing yields before the request is handed to it).
        drop(first_connection.recv().unwrap());
        let response = pool
            .send(&upstream, request())
            .await
            .expect("sent again on a new connection");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        drop(server.join().unwrap());
    }
    /// A body is taken whole only when the reads so far hold all of it,
    /// and its connection goes back to the pool as it is taken; a body
    /// that has not all come is left to be read, not cut at what came;
    /// and a connection on which more than the body came is not kept.
    #[tokio::test]
    async fn a_body_is_taken_whole_only_when_all_of_it_was_read() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (rest_due, rest) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // Whole in one write.
            read_head(&mut stream);
            stream.write_all(ANSWER).unwrap();
            // Its head and one byte of two; the other once the test asks.
            read_head(&mut stream);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
                .unwrap();
            rest.recv().unwrap();
            stream.write_all(b"k").unwrap();
            // The body, then bytes no answer announced.
            read_head(&mut stream);
            stream.write_all(&[ANSWER, b"??"].concat()).unwrap();
            stream
        });
        let pool = Pool::new(Duration::from_secs(5));
        // Each answer is one write of a few bytes: one segment on
        // loopback, read whole with its head.
        let mut response = pool.send(&upstream, request()).await.unwrap();
        let whole = response.body_mut().take_whole().expect("all of it came");
        assert_eq!(&whole[..], b"ok");
        assert_eq!(idle(&pool), 1, "back in the pool as the body was taken");
        drop(response);

        let mut response = pool.send(&upstream, request()).await.unwrap();
        assert!(response.body_mut().take_whole().is_none(), "half a body");
        assert_eq!(idle(&pool), 0);
        rest_due.send(()).unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok", "nothing of it was lost");
        assert_eq!(idle(&pool), 1);

        let mut response = pool.send(&upstream, request()).await.unwrap();
        let whole = response.body_mut().take_whole().expect("all of it came");
        assert_eq!(&whole[..], b"ok");
        assert_eq!(
            idle(&pool),
            0,
            "a connection with bytes after the body was kept"
        );
        drop(server.join().unwrap());
    }

    /// The number of idle connections the pool holds to its first upstream.
    fn idle(pool: &Pool) -> usize {
        pool.shared
            .lock()
            .upstreams
            .values()
            .next()
            .map_or(0, |slot| slot.idle.len())
    }

    /// docs/internal-api.md, "Connections": an idle connection is closed
    /// when it has been idle for 5 s, not before, and not only when the
    /// next request comes.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_when_the_idle_timeout_ends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (closed, closed_at) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_head(&mut stream);
            stream.write_all(ANSWER).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut more = [0u8; 1];
            let _ = closed.send(stream.read(&mut more).map_err(|error| error.kind()));
        });
        let pool = Pool::new(Duration::from_secs(5));
        let response = pool.send(&upstream, request()).await.expect("the answer");
        response.into_body().collect().await.unwrap();
        assert_eq!(idle(&pool), 1, "the connection came back");
        tokio::time::sleep(POOL_IDLE_TIMEOUT - Duration::from_millis(10)).await;
        assert_eq!(idle(&pool), 1, "kept until its idle timeout");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(idle(&pool), 0, "let go at its idle timeout");
        let read =
            tokio::task::spawn_blocking(move || closed_at.recv_timeout(Duration::from_secs(30)))
                .await
                .unwrap()
                .expect("the upstream saw the connection end");
        assert_eq!(read, Ok(0), "closed by the proxy");
    }

    /// docs/internal-api.md, "Connections": a request written and met by
    /// the connection's close with no answer is sent again once, on a new
    /// connection, never once per idle connection: an archiver that
    /// closes on reading it (its own limits, a handler that failed) would
    /// otherwise get it as many times as the pool holds idle connections
    /// to it, each a generation.
    #[tokio::test]
    async fn a_request_closed_unanswered_is_sent_again_once_at_most() {
        const IDLE: usize = 4;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        std::thread::spawn(move || {
            // The first IDLE connections answer once each, together; then
            // every request on any connection is read and met by a close.
            let mut streams: Vec<_> = (0..IDLE).map(|_| listener.accept().unwrap().0).collect();
            for stream in &mut streams {
                read_head(stream);
            }
            for stream in &mut streams {
                stream.write_all(ANSWER).unwrap();
            }
            let mut handles = Vec::new();
            for mut stream in streams {
                let counted = counted.clone();
                handles.push(std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).unwrap_or(0) != 1 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }));
            }
            while let Ok((mut stream, _)) = listener.accept() {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    read_head(&mut stream);
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        let pool = Pool::new(Duration::from_secs(5));
        let answers = futures_util::future::join_all((0..IDLE).map(|_| async {
            let response = pool.send(&upstream, request()).await.expect("an answer");
            response.into_body().collect().await.unwrap().to_bytes()
        }))
        .await;
        assert!(answers.iter().all(|body| &body[..] == b"ok"));
        for _ in 0..10_000 {
            if idle(&pool) == IDLE {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(idle(&pool), IDLE, "every connection came back");
        let error = pool
            .send(&upstream, request())
            .await
            .expect_err("the archiver closes on every request");
        assert!(matches!(error, SendError::Http(_)), "{error:?}");
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the request reached the archiver once, and once again"
        );
    }

    /// A connection is used again only after an answer that leaves it
    /// clean: not one that said `Connection: close`, not one framed by the
    /// connection's end, not one with bytes after its body (`exchange`).
    #[tokio::test]
    async fn only_a_clean_answer_leaves_its_connection_to_the_pool() {
        for (answer, kept) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], true),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                false,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1",
                false,
            ),
        ] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
            let server = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                read_head(&mut stream);
                stream.write_all(answer).unwrap();
                stream
            });
            let pool = Pool::new(Duration::from_secs(5));
            let response = pool.send(&upstream, request()).await.expect("the answer");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            assert_eq!(
                idle(&pool) == 1,
                kept,
                "{}",
                String::from_utf8_lossy(answer)
            );
            drop(server.join().unwrap());
        }
    }

    /// docs/internal-api.md, "Connections": interim `1xx` heads count
    /// toward the 64 KiB a response head may take, with the head after
    /// them (as a spliced download's `splice::read_head` counts them): each
    /// was bounded alone, so an upstream could send them until the
    /// caller's timeout.
    #[tokio::test]
    async fn interim_heads_count_toward_the_bound_on_a_response_head() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_head(&mut stream);
            let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
            let count = crate::exchange::MAX_HEAD_BYTES / interim.len() + 1;
            // The peer may close once it has seen enough.
            let _ = stream.write_all(&interim.repeat(count));
            let _ = stream.write_all(ANSWER);
            stream
        });
        let pool = Pool::new(Duration::from_secs(5));
        let error = pool
            .send(&upstream, request())
            .await
            .expect_err("more than 64 KiB of interim heads taken");
        assert!(error.to_string().contains("too large"), "{error}");
        drop(server.join().unwrap());
    }

    /// docs/internal-api.md, "Connections": an idle connection its
    /// upstream closed is closed at once, not kept (its fd in CLOSE_WAIT)
    /// until the idle timeout: hyper's connection task did so as it read
    /// the end; the pool's own connections have no task, and kept it 5 s
    /// (an archiver's restart left every idle connection to it so).
    #[tokio::test]
    async fn an_idle_connection_its_upstream_closed_is_closed_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (sent, answered) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_head(&mut stream);
            stream.write_all(ANSWER).unwrap();
            sent.send(()).unwrap();
            // The upstream closes its side; the proxy's close shows as
            // the end of what it reads.
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let started = std::time::Instant::now();
            let mut byte = [0u8; 1];
            let read = stream.read(&mut byte);
            (read.map_err(|error| error.kind()), started.elapsed())
        });
        let pool = Pool::new(Duration::from_secs(5));
        let response = pool.send(&upstream, request()).await.expect("the answer");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        answered.recv().unwrap();
        assert_eq!(idle(&pool), 1, "the connection came back to the pool");
        // The runtime runs (the reaper with it) while the server waits.
        let (read, after) = tokio::task::spawn_blocking(move || server.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            read,
            Ok(0),
            "the proxy kept the connection its upstream closed ({after:?})"
        );
        assert_eq!(idle(&pool), 0);
    }

    /// docs/internal-api.md, "Connections": bytes that came on an idle
    /// connection after its answer are seen at checkout even when the
    /// runtime has not polled for events since they came (a pipelined
    /// client's next request is served without a turn of the runtime's
    /// driver): the connection is not used, and the next client does not
    /// get them as its answer.
    #[tokio::test(flavor = "current_thread")]
    async fn bytes_that_came_on_an_idle_connection_are_seen_at_checkout() {
        const EVIL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!";
        const SECOND: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond";
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (go, went) = std::sync::mpsc::channel();
        let (sent, evil_sent) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            read_head(&mut first);
            first.write_all(ANSWER).unwrap();
            went.recv().unwrap();
            first.write_all(EVIL).unwrap();
            sent.send(()).unwrap();
            // The request sent again, on a new connection.
            let (mut second, _) = listener.accept().unwrap();
            read_head(&mut second);
            second.write_all(SECOND).unwrap();
            (first, second)
        });
        let pool = Pool::new(Duration::from_secs(5));
        let response = pool.send(&upstream, request()).await.expect("the first");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(idle(&pool), 1);
        // Nothing yields from here to the checkout: the runtime's driver
        // does not run.
        go.send(()).unwrap();
        evil_sent.recv().unwrap();
        // Loopback: written is arrived; a moment for the kernel anyway.
        std::thread::sleep(Duration::from_millis(50));
        let response = pool.send(&upstream, request()).await.expect("the second");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            b"second",
            "the next request got what came on an idle connection"
        );
        drop(server.join().unwrap());
    }

    /// docs/internal-api.md, "Connections": a connection reads its next
    /// answer into its buffer's start again once everything read before
    /// was handed out and dropped: a small answer lands in memory still in
    /// the CPU's cache, not in the next stretch of the buffer (nor in a
    /// new one every four answers).
    #[tokio::test]
    async fn the_next_answer_is_read_into_the_start_of_the_buffer_the_last_one_left() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            for _ in 0..3 {
                read_head(&mut stream);
                stream.write_all(ANSWER).unwrap();
            }
            stream
        });
        let pool = Pool::new(Duration::from_secs(5));
        let mut at = Vec::new();
        for _ in 0..3 {
            let (parts, mut body) = pool
                .send(&upstream, request())
                .await
                .expect("the answer")
                .into_parts();
            drop(parts);
            let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&chunk[..], b"ok");
            at.push(chunk.as_ptr() as usize);
            drop(chunk);
            assert!(body.frame().await.is_none());
            drop(body);
            assert_eq!(idle(&pool), 1, "the connection came back");
        }
        assert_eq!(
            at[1], at[0],
            "the second answer went elsewhere in the buffer"
        );
        assert_eq!(
            at[2], at[0],
            "the third answer went elsewhere in the buffer"
        );
        drop(server.join().unwrap());
    }

    /// docs/internal-api.md, "Connections": an answer is read into the
    /// buffer the serving thread read its last answer into, whichever
    /// connection it comes on (here a new one), not into a buffer of the
    /// connection's own. The first answer's chunk is kept, so that buffer
    /// cannot be freed and handed out again by the allocator: the second
    /// answer lands right after the first.
    #[tokio::test]
    async fn an_answer_is_read_into_the_buffer_the_thread_read_its_last_answer_into() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (closed, closed_seen) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let (mut first, _) = listener.accept().unwrap();
            read_head(&mut first);
            first.write_all(ANSWER).unwrap();
            // The first connection ends: the next request needs a new one.
            first.shutdown(std::net::Shutdown::Write).unwrap();
            closed.send(()).unwrap();
            let (mut second, _) = listener.accept().unwrap();
            read_head(&mut second);
            second.write_all(ANSWER).unwrap();
            (first, second)
        });
        let pool = Pool::new(Duration::from_secs(5));
        let (parts, mut body) = pool
            .send(&upstream, request())
            .await
            .expect("the first")
            .into_parts();
        drop(parts);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(body.frame().await.is_none());
        drop(body);
        closed_seen.recv().unwrap();
        let (parts, mut body) = pool
            .send(&upstream, request())
            .await
            .expect("the second")
            .into_parts();
        drop(parts);
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!((&first[..], &second[..]), (&b"ok"[..], &b"ok"[..]));
        assert_eq!(
            second.as_ptr() as usize,
            first.as_ptr() as usize + ANSWER.len(),
            "the answer on the new connection went into a buffer of its own"
        );
        drop(server.join().unwrap());
    }

    /// docs/internal-api.md, "Connections": an upstream the pool holds no
    /// idle connection to once the reaper runs is let go, not kept for
    /// ever (route reloads change names; every request searched them).
    #[tokio::test(start_paused = true)]
    async fn an_upstream_with_nothing_idle_is_let_go() {
        let pool = Pool::new(Duration::from_secs(5));
        let mut servers = Vec::new();
        for _ in 0..2 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
            let server = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                read_head(&mut stream);
                stream.write_all(ANSWER).unwrap();
                stream
            });
            let response = pool.send(&upstream, request()).await.expect("the answer");
            response.into_body().collect().await.unwrap();
            // Kept open: only the idle timeout lets the connection go.
            servers.push(server);
        }
        tokio::time::sleep(POOL_IDLE_TIMEOUT + Duration::from_millis(10)).await;
        assert_eq!(
            pool.shared.lock().upstreams.len(),
            0,
            "let go with their last idle connection"
        );
    }
}
