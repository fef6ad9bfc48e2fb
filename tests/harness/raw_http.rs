//! HTTP as the tests speak it.
//!
//! - [`RawConnection`]: HTTP/1.1 over a plain `TcpStream` where a test needs
//!   control that a client library hides: stalling, aborting after N bytes,
//!   oversized heads, and telling a clean end of a body ([`BodyEnd`]) from
//!   an abort.
//! - [`http_client`] and [`header`]: a blocking `reqwest` client for the
//!   requests that need no such control.
//! - [`read_request_head`]: the other side, for a fake upstream.
//! - [`RefusingPort`]: an address that refuses every connection, for an
//!   upstream that is down.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Socket read/write timeout of [`RawConnection`]: no test read blocks forever.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
/// Whole-request timeout of [`http_client`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(180);

/// A port on 127.0.0.1 that refuses every connection for as long as this
/// value lives: a TCP socket bound to it and never listening. An upstream
/// that is down.
///
/// A port bound, closed, and then trusted to refuse is free in between:
/// any listener of this test process or another (a service started on
/// port 0) may be given it, and the connection meant to be refused is
/// accepted. This one cannot be given to anyone: the socket is bound
/// without `SO_REUSEADDR` or `SO_REUSEPORT`, so the kernel refuses every
/// other bind of the port, on 127.0.0.1 or a wildcard address, with
/// `EADDRINUSE` whatever options that socket sets, and never picks it for
/// a bind to port 0. A socket that does not listen takes no connection:
/// the kernel answers a SYN to it with a reset, which the client reads as
/// `ECONNREFUSED`.
pub struct RefusingPort {
    /// Holds the port; never listens.
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        RefusingPort {
            _socket: socket,
            addr,
        }
    }

    /// `http://127.0.0.1:PORT`, as a routing table names an upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Default for RefusingPort {
    fn default() -> RefusingPort {
        RefusingPort::new()
    }
}

/// Reads a request head from `stream`, as a fake upstream does: byte by
/// byte, so nothing after the head is taken from the socket. The head with
/// its blank line, or what came before the stream ended or failed (see
/// [`is_whole_head`]).
pub fn read_request_head(stream: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !is_whole_head(&head) {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    head
}

/// Whether `head` ends with the blank line that ends an HTTP head.
pub fn is_whole_head(head: &[u8]) -> bool {
    head.ends_with(b"\r\n\r\n")
}

/// A blocking HTTP client without decompression or a short total timeout.
pub fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build the HTTP client")
}

/// A header's value as text ("" when missing).
pub fn header<'r>(response: &'r reqwest::blocking::Response, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1

/// A response head read by [`RawConnection`]. Header names are lower case.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// How a response body ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// The framing said it was complete (Content-Length reached, or the
    /// terminating zero-size chunk).
    Complete,
    /// The connection ended (EOF or reset) before the framing's end.
    Aborted(String),
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length {
        remaining: u64,
    },
    Chunked {
        remaining: u64,
        after_data: bool,
    },
    UntilEof,
    Done,
}

/// One HTTP/1.1 connection over a plain socket.
pub struct RawConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
    start: usize,
    framing: Framing,
    head_request: bool,
}

/// Longest response head or chunk-size line accepted from the server.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;

impl RawConnection {
    pub fn connect(addr: SocketAddr) -> io::Result<RawConnection> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        RawConnection::over(stream)
    }

    /// As [`RawConnection::connect`], from the local address `source` (a
    /// peer address other than the usual `127.0.0.1`).
    pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> io::Result<RawConnection> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        RawConnection::over(socket.into())
    }

    fn over(stream: TcpStream) -> io::Result<RawConnection> {
        stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(RawConnection {
            stream,
            buffer: Vec::new(),
            start: 0,
            framing: Framing::Done,
            head_request: false,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends arbitrary bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends `{method} {target} HTTP/1.1` with a Host header and `headers`.
    pub fn send_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\n",
            self.stream.peer_addr()?
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.head_request = method == "HEAD";
        self.send(request.as_bytes())
    }

    /// Connects, sends one request with `Connection: close` added, reads the
    /// head and the whole body.
    pub fn request(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<(ResponseHead, Vec<u8>, BodyEnd)> {
        let mut connection = RawConnection::connect(addr)?;
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.push(("Connection", "close"));
        connection.send_request(method, target, &all)?;
        let head = connection.read_head()?;
        let mut body = Vec::new();
        let end = connection.read_body_to_end(|chunk| body.extend_from_slice(chunk));
        Ok((head, body, end))
    }

    fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        self.fill_up_to(usize::MAX)
    }

    /// Reads at most `limit` bytes from the socket into the buffer: a read
    /// of a `Content-Length` (or until-EOF) body never takes more from the
    /// kernel than it was asked for, so a client that stops after `n`
    /// bytes leaves the rest in the socket buffers, where the server's
    /// flow control sees it. (Heads and chunked bodies read ahead.)
    fn fill_up_to(&mut self, limit: usize) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        let mut chunk = [0u8; 64 * 1024];
        let limit = limit.clamp(1, chunk.len());
        // Interrupted is no error of the connection: `Read` says to read
        // again. A blocking socket read with a timeout (`SOCKET_TIMEOUT`)
        // ends so when the test process is stopped and continued, even
        // without a signal handler (signal(7)); it failed a download in a
        // test as a cut connection.
        let n = loop {
            match self.stream.read(&mut chunk[..limit]) {
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                read => break read?,
            }
        };
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads up to and including `\r\n`; returns the line without it.
    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = self.buffered().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buffered()[..at]).into_owned();
                self.consume(at + 2);
                return Ok(line);
            }
            if self.buffered().len() > MAX_RESPONSE_HEAD_BYTES {
                return Err(io::Error::other("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF in a line",
                ));
            }
        }
    }

    /// Reads a response head and sets up the body's framing.
    pub fn read_head(&mut self) -> io::Result<ResponseHead> {
        let status_line = self.read_line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        for _ in 0..1000 {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let head = ResponseHead { status, headers };
        self.framing = if self.head_request || status == 204 || status == 304 || status < 200 {
            Framing::Empty
        } else if head
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked {
                remaining: 0,
                after_data: false,
            }
        } else if let Some(length) = head.header("content-length") {
            Framing::Length {
                remaining: length.parse().map_err(io::Error::other)?,
            }
        } else {
            Framing::UntilEof
        };
        Ok(head)
    }

    /// The next piece of the body, at most `max` bytes. `Ok(None)`: the body
    /// ended cleanly. `Err`: the connection ended or failed before the end.
    pub fn read_body_some(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            match self.framing {
                Framing::Empty | Framing::Done => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length { remaining: 0 } => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length { remaining } => {
                    let wanted = max.min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    if self.buffered().is_empty() && self.fill_up_to(wanted)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("EOF with {remaining} bytes of Content-Length missing"),
                        ));
                    }
                    let n = self
                        .buffered()
                        .len()
                        .min(max)
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    self.framing = Framing::Length {
                        remaining: remaining - n as u64,
                    };
                    return Ok(Some(piece));
                }
                Framing::UntilEof => {
                    if self.buffered().is_empty() && self.fill_up_to(max)? == 0 {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    let n = self.buffered().len().min(max);
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    return Ok(Some(piece));
                }
                Framing::Chunked {
                    remaining: 0,
                    after_data,
                } => {
                    // With the error that ended the line, which is not always
                    // an end of input.
                    let eof = |what: &str, error: io::Error| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection ended {what} (no terminating chunk): {error}"),
                        )
                    };
                    if after_data {
                        let line = self
                            .read_line()
                            .map_err(|error| eof("after a chunk", error))?;
                        if !line.is_empty() {
                            return Err(io::Error::other("chunk data not followed by CRLF"));
                        }
                    }
                    let line = self
                        .read_line()
                        .map_err(|error| eof("before a chunk size", error))?;
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size_text, 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        for _ in 0..1000 {
                            if self
                                .read_line()
                                .map_err(|error| eof("in the trailer", error))?
                                .is_empty()
                            {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    self.framing = Framing::Chunked {
                        remaining: size,
                        after_data: false,
                    };
                }
                Framing::Chunked { remaining, .. } => {
                    if self.buffered().is_empty() && self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection ended inside a chunk",
                        ));
                    }
                    let n = self
                        .buffered()
                        .len()
                        .min(max)
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    self.framing = Framing::Chunked {
                        remaining: remaining - n as u64,
                        after_data: true,
                    };
                    return Ok(Some(piece));
                }
            }
        }
    }

    /// Reads up to `n` body bytes (fewer only if the body ends first).
    pub fn read_body_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.read_body_some(n - out.len())? {
                Some(piece) => out.extend_from_slice(&piece),
                None => break,
            }
        }
        Ok(out)
    }

    /// Reads the rest of the body into `sink` and says how it ended.
    pub fn read_body_to_end(&mut self, mut sink: impl FnMut(&[u8])) -> BodyEnd {
        // Bounded: every turn consumes at least one byte or ends.
        loop {
            match self.read_body_some(1 << 20) {
                Ok(Some(piece)) => sink(&piece),
                Ok(None) => return BodyEnd::Complete,
                Err(error) => return BodyEnd::Aborted(error.to_string()),
            }
        }
    }

    /// Everything the server sends until it closes the connection, framing
    /// ignored (e.g. to prove nothing follows a HEAD response).
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = self.buffered().to_vec();
        self.start = self.buffer.len();
        let _ = self.stream.read_to_end(&mut rest);
        rest
    }

    /// A `Read` over the rest of the body; an abort is an `Err`.
    pub fn body_reader(&mut self) -> BodyReader<'_> {
        BodyReader {
            connection: self,
            pending: Vec::new(),
            at: 0,
        }
    }
}

/// See [`RawConnection::body_reader`].
pub struct BodyReader<'c> {
    connection: &'c mut RawConnection,
    pending: Vec<u8>,
    at: usize,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.pending.len() {
            match self.connection.read_body_some(1 << 20)? {
                Some(piece) => {
                    self.pending = piece;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.pending.len() - self.at);
        out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What makes [`RefusingPort`] safe to share a machine with: no
    /// listener can take its port (std's `bind` sets `SO_REUSEADDR`, as
    /// tokio's does), on its address or a wildcard one, while connections
    /// to it are refused. (A port bound and closed, the pattern it
    /// replaces, is taken by the first bind here.)
    #[test]
    fn a_refusing_port_cannot_be_taken_and_refuses() {
        let refusing = RefusingPort::new();
        let port = refusing.addr.port();
        for address in ["127.0.0.1", "0.0.0.0", "[::]"] {
            let taken = std::net::TcpListener::bind(format!("{address}:{port}"));
            assert!(taken.is_err(), "{address}:{port} was taken");
        }
        let error = TcpStream::connect(refusing.addr).expect_err("connected");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
