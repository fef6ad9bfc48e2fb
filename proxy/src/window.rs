//! The receive window of upstream connections: small unless the download
//! on it has shown that its client keeps up.
//!
//! Every upstream connection is opened with `SO_RCVBUF`
//! [`SMALL_RECV_BUFFER_BYTES`], which bounds the kernel memory a stalled
//! download holds on it (docs/architecture.md, "Memory per slow
//! download"). A download whose client takes its first
//! [`WIDEN_AFTER_BYTES`] within [`WIDEN_WITHIN`] (faster than about
//! 100 MB/s) widens its connection to [`WIDE_RECV_BUFFER_BYTES`]. Every
//! request written on a connection narrows it again first, so a pooled
//! connection starts each download small, whatever the previous one did.
//!
//! What widening buys is limited by the kernel: the window scale is chosen
//! at the handshake from the buffer then (64 KiB: scale 1), and the window
//! clamp stays where the handshake put it, so the advertised window stays
//! at about 126 KiB; only the receive queue grows (up to 512 KiB with the
//! doubling). On loopback that still takes part of the cost of the small
//! buffer back (BENCHMARKS.md). Lifting the clamp too would need
//! `TCP_WINDOW_CLAMP`, which no safe wrapper offers.
//!
//! The socket is reached without a second fd: the connection's I/O object
//! ([`WindowedIo`]) owns the `TcpStream` and applies the size the download
//! asked for ([`UpstreamWindow`], which the pool hands to each response's
//! body, `pool::PooledBody::window`) at its next read or write.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `SO_RCVBUF` of every upstream connection when it is opened and when a
/// request is written on it (the kernel doubles it for its bookkeeping, so
/// about 128 KiB of window). Without it the kernel autotunes each one up to
/// `tcp_rmem`'s maximum (6 MiB or more), and a stalled download parks
/// megabytes in socket buffers between archiver and proxy: 5,000 of them
/// exhausted the kernel's `tcp_mem`, and new connections failed. With
/// 128 KiB, 5,000 stalled downloads (bench scenario 8) held 1.8 GiB of
/// kernel memory on loopback, 168 KiB each on this socket; with 64 KiB,
/// 1.4 GiB and 109 KiB. The cost: one download's rate is at most the window
/// per round trip, about 250 MB/s at 0.5 ms between proxy and archiver,
/// and even on loopback a 1 GiB stream ran about 15 % slower than with
/// 256 KiB (2.1 against 2.4 GiB/s; 256 KiB held 425 KiB of kernel memory
/// per stalled download instead of 277), which widening takes partly back.
pub const SMALL_RECV_BUFFER_BYTES: usize = 64 * 1024;

/// `SO_RCVBUF` of a connection whose download's client keeps up. A
/// download that stalls after widening holds up to twice this in the
/// kernel on this socket until it is parked (`--park-after`).
pub const WIDE_RECV_BUFFER_BYTES: usize = 256 * 1024;

/// A download is judged once it has handed this many bytes to its client.
pub const WIDEN_AFTER_BYTES: u64 = 4 << 20;

/// … and widens its connection if that took at most this long from its
/// first chunk: 4 MiB in 40 ms is about 100 MB/s. A client that stalls
/// cannot get there: the kernel buffers toward it hold far less.
pub const WIDEN_WITHIN: Duration = Duration::from_millis(40);

/// The window a connection's current download asks for: one word, the
/// number of requests written on the connection (shifted left by one)
/// plus a low bit set when the download asked to widen.
#[derive(Clone, Debug, Default)]
pub struct UpstreamWindow(Arc<AtomicU64>);

/// The download a [`UpstreamWindow`] was taken for: widening applies only
/// while no later request was written on the connection.
#[derive(Clone, Debug)]
pub struct DownloadWindow {
    window: UpstreamWindow,
    requests: u64,
}

impl UpstreamWindow {
    /// The handle for the download whose response is being read now.
    pub fn for_download(&self) -> DownloadWindow {
        DownloadWindow {
            window: self.clone(),
            requests: self.0.load(Ordering::Acquire) >> 1,
        }
    }

    pub(crate) fn wanted(&self) -> usize {
        if self.0.load(Ordering::Acquire) & 1 == 1 {
            WIDE_RECV_BUFFER_BYTES
        } else {
            SMALL_RECV_BUFFER_BYTES
        }
    }

    /// A request is being written: the next download starts small.
    fn next_request(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                Some(((word >> 1) + 1) << 1)
            });
    }
}

impl DownloadWindow {
    /// Asks for the wide window; does nothing if the connection has moved
    /// on to another request.
    pub fn widen(&self) -> bool {
        let narrow = self.requests << 1;
        self.window
            .0
            .compare_exchange(narrow, narrow | 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// An upstream connection's I/O: the `TcpStream` plus its window.
#[derive(Debug)]
pub struct WindowedIo {
    io: TokioIo<TcpStream>,
    window: UpstreamWindow,
    applied: usize,
}

impl WindowedIo {
    /// Wraps a connection just opened with `SO_RCVBUF`
    /// [`SMALL_RECV_BUFFER_BYTES`].
    pub fn new(io: TokioIo<TcpStream>) -> WindowedIo {
        WindowedIo {
            io,
            window: UpstreamWindow::default(),
            applied: SMALL_RECV_BUFFER_BYTES,
        }
    }

    /// The window of the downloads on this connection, which the pool
    /// hands to each response (`pool`).
    pub fn window(&self) -> &UpstreamWindow {
        &self.window
    }

    /// The socket, for a look at whether an idle connection was closed.
    pub(crate) fn tcp(&self) -> &TcpStream {
        self.io.inner()
    }

    fn apply(&mut self) {
        let wanted = self.window.wanted();
        if wanted != self.applied {
            self.applied = wanted;
            if let Err(error) = socket2::SockRef::from(self.io.inner()).set_recv_buffer_size(wanted)
            {
                tracing::debug!(%error, wanted, "upstream SO_RCVBUF not set");
            }
        }
    }
}

impl Read for WindowedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.apply();
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl Write for WindowedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Only requests are written on an upstream connection.
        this.window.next_request();
        this.apply();
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.window.next_request();
        this.apply();
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection to a local listener opened as the upstream connector
    /// opens it (`SO_RCVBUF` small before the handshake), wrapped; and the
    /// other end.
    async fn connection() -> (TokioIo<WindowedIo>, UpstreamWindow, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .set_recv_buffer_size(SMALL_RECV_BUFFER_BYTES as u32)
            .unwrap();
        let (stream, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let io = WindowedIo::new(TokioIo::new(stream.unwrap()));
        let window = io.window.clone();
        (TokioIo::new(io), window, accepted.unwrap().0)
    }

    /// The socket's `SO_RCVBUF` as the kernel reports it (twice the size
    /// set, for its bookkeeping).
    fn recv_buffer(io: &TokioIo<WindowedIo>) -> usize {
        socket2::SockRef::from(io.inner().io.inner())
            .recv_buffer_size()
            .unwrap()
    }

    /// One request and its answer on the connection; returns the handle
    /// the download's pipe gets.
    async fn exchange(
        io: &mut TokioIo<WindowedIo>,
        window: &UpstreamWindow,
        peer: &mut TcpStream,
    ) -> DownloadWindow {
        io.write_all(b"GET").await.unwrap();
        let mut request = [0u8; 3];
        peer.read_exact(&mut request).await.unwrap();
        peer.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        io.read_exact(&mut answer).await.unwrap();
        window.for_download()
    }

    /// docs/proxy.md (memory per slow download, spliced downloads) and
    /// architecture.md: a 64 KiB upstream receive buffer (128 KiB once the
    /// kernel doubles it), 256 KiB once the client kept up. (Mutation
    /// review: this test compared with the constants themselves, so other
    /// sizes passed it.)
    #[tokio::test]
    async fn a_download_widens_its_connection_and_the_next_request_starts_small() {
        let (mut io, window, mut peer) = connection().await;
        let small = recv_buffer(&io);
        assert_eq!(small, 2 * 64 * 1024);

        let download = exchange(&mut io, &window, &mut peer).await;
        assert_eq!(recv_buffer(&io), small, "a download starts small");
        assert!(download.widen());
        // Applied at the connection's next read.
        peer.write_all(b"more").await.unwrap();
        let mut more = [0u8; 4];
        io.read_exact(&mut more).await.unwrap();
        assert_eq!(recv_buffer(&io), 2 * 256 * 1024);

        // Back in the pool, the connection carries the next request: the
        // request itself narrows it, before any byte of the answer.
        io.write_all(b"GET").await.unwrap();
        assert_eq!(recv_buffer(&io), small, "a pooled connection starts small");
        // The previous download, late, cannot widen the new one.
        assert!(!download.widen());
        let mut request = [0u8; 3];
        peer.read_exact(&mut request).await.unwrap();
        peer.write_all(b"answer").await.unwrap();
        let mut answer = [0u8; 6];
        io.read_exact(&mut answer).await.unwrap();
        assert_eq!(recv_buffer(&io), small);
    }
}
