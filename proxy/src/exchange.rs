//! The HTTP/1.1 exchange on a pooled upstream connection: the request head
//! written, the response head read with `httparse` straight into the map
//! the client's answer is made from, and the body's framing decoded
//! (`Content-Length`, chunked, or to the connection's end).
//!
//! hyper's client connection did this in a task of its own, handing each
//! response over a channel and parsing its head into a map name by name
//! (a custom name copied into an allocation of its own): about a third of
//! a small hit's instructions through the proxy (`BENCHMARKS.md`). Here the
//! exchange runs in the request's own task, and the archiver's own header
//! names are matched to static ones.
//!
//! It reads responses as hyper's client did: informational `1xx` heads
//! other than `101` are skipped; a `HEAD`'s answer, a `204`, a `304` and a
//! `101` have no body; `Transfer-Encoding` on an HTTP/1.0 response, a
//! `Content-Length` that is not one number (a list of one number
//! repeated is that number, and is passed on as one) or is over [`MAX_BODY_BYTES`], and a head
//! over [`MAX_HEAD_BYTES`] are errors; a body framed by a coding other
//! than `chunked` last, or by
//! neither header, runs to the connection's end (which `forward::framed`
//! refuses to pass on). A connection is used again only after an
//! HTTP/1.1 answer without `Connection: close`, framed by length or
//! chunked, whose body ended whole with nothing after it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::forward::UPSTREAM_READ_BUFFER_BYTES;
use crate::window::WindowedIo;

/// The most a response head may take: the read buffer (hyper's client
/// refused a head that did not fit its buffer the same way).
pub const MAX_HEAD_BYTES: usize = UPSTREAM_READ_BUFFER_BYTES;

/// The most header lines a response head may have (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;

/// The most read buffers a serving thread keeps for its connections'
/// next reads ([`SPARE`]).
pub(crate) const SPARE_READ_BUFFERS: usize = 4;

thread_local! {
    /// Read buffers of the thread's upstream connections that had nothing
    /// left unread, the last one given back on top. A connection takes one
    /// when its socket is ready to be read, not when it writes its
    /// request: with many requests waiting for their answers, each answer
    /// is read into the buffer the thread used last (nginx's order), not
    /// into one that waited with its connection while the other answers
    /// went through the cache. Each serving thread runs its own runtime
    /// (`crate::Proxy::serve`), so this is per thread and takes no lock.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Below this much room left in the read buffer, the next read goes into
/// a new one.
pub(crate) const MIN_READ_ROOM: usize = 16 * 1024;

/// The most a chunk-size line or a trailer section may take.
pub(crate) const MAX_CHUNK_LINE_BYTES: usize = 4096;
pub(crate) const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// The largest body length or chunk: the largest file offset (`off_t`,
/// 2^63 - 1 bytes). An archive is a file the archiver serves from its
/// cache, so a larger length cannot be one's; the proxy would wait for
/// bytes that never come until the upstream's silence ends the download.
/// nginx refuses the same chunk sizes and lengths.
pub(crate) const MAX_BODY_BYTES: u64 = i64::MAX as u64;

/// An upstream connection: its socket (with its receive window) and what
/// was read from it and not yet handed out.
#[derive(Debug)]
pub struct Wire {
    io: TokioIo<WindowedIo>,
    read: BytesMut,
}

/// How a response's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes (zero: no body).
    Length(u64),
    Chunked,
    /// To the connection's end.
    Close,
}

/// A response head read: the body follows in the wire's buffer and socket.
#[derive(Debug)]
pub struct Head {
    pub parts: http::response::Parts,
    pub framing: Framing,
    /// The connection may carry another exchange once the body ended.
    pub keep_alive: bool,
    pub present: Present,
}

/// What the head's lines held of names the proxy reads, noted as each
/// line's name was matched: whether there was a `Transfer-Encoding` and a
/// `Connection` (an archiver sends neither), and whether the first
/// `X-Gitball-Cache` said `join`. Each search of the map hashes the name
/// (a custom one byte by byte): a small hit searched it six times for
/// these, between the framing here, `forward::framed` and `http::respond`
/// (`BENCHMARKS.md`). `false` is exact for a map as [`parse`] left it,
/// and it is never added to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present {
    pub transfer_encoding: bool,
    pub connection: bool,
    /// The first `X-Gitball-Cache` said `join` (`upstream::joined`).
    pub joined: bool,
}

/// What a line's name is to [`parse`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Noted {
    /// Left out of the map.
    Date,
    TransferEncoding,
    Connection,
    Cache,
    Other,
}

/// A request for an upstream, borrowed from what the proxy holds for it:
/// written as it is, with no map copied or filled for it (a copy of the
/// forwarded headers, grown for the `Host` inserted into it, was about
/// 3 % of a small hit's instructions: `BENCHMARKS.md`). A `GET` or
/// `HEAD`, or a prewarm's `POST`: never a body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin-form, parsed (so it holds nothing a request line may not).
    pub target: &'a http::uri::PathAndQuery,
    pub headers: &'a HeaderMap,
    /// Sent in place of any `Authorization` in `headers`.
    pub authorization: Option<&'a HeaderValue>,
}

impl<'a> RequestHead<'a> {
    /// A `GET` of `target` with `headers`.
    pub fn get(target: &'a http::uri::PathAndQuery, headers: &'a HeaderMap) -> RequestHead<'a> {
        static GET: Method = Method::GET;
        RequestHead {
            method: &GET,
            target,
            headers,
            authorization: None,
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub struct ExchangeError {
    pub error: io::Error,
    /// Not one byte of an answer came before the connection's end or reset.
    pub unanswered: bool,
}

impl Wire {
    pub fn new(io: WindowedIo) -> Wire {
        Wire {
            io: TokioIo::new(io),
            read: BytesMut::new(),
        }
    }

    pub fn window(&self) -> &crate::window::UpstreamWindow {
        self.io.inner().window()
    }

    /// Whether an idle connection may be used: nothing came from the
    /// upstream since its last answer, neither bytes nor its close. The
    /// socket itself is asked (a peek that takes nothing), not the
    /// runtime's last word on it: bytes that came since its driver last
    /// ran (a pipelined request is served without it running) would be
    /// read as the next request's answer.
    pub fn is_idle_and_open(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        self.read.is_empty()
            && matches!(
                socket2::SockRef::from(self.io.inner().tcp()).peek(&mut byte),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock
            )
    }

    /// For an idle connection: whether anything came on it (bytes, its
    /// close, an error); if nothing did, `cx` is woken when something does.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.io.inner().tcp().poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => return true,
                // Ready as the runtime last saw: a read tells, and clears
                // a readiness that was stale, so the next poll waits.
                Poll::Ready(Ok(())) => {
                    if !self.read.is_empty()
                        || !matches!(
                            self.io.inner().tcp().try_read(&mut byte),
                            Err(error) if error.kind() == io::ErrorKind::WouldBlock
                        )
                    {
                        return true;
                    }
                }
            }
        }
    }

    /// Writes `request`'s head (it has no body), with `host` as its
    /// `Host`, and reads the answer's.
    pub async fn exchange(
        &mut self,
        request: &RequestHead<'_>,
        host: &HeaderValue,
    ) -> Result<Head, ExchangeError> {
        let mut head = Vec::with_capacity(256);
        encode(request, host, &mut head);
        if let Err(error) = self.io.write_all(&head).await {
            return Err(ExchangeError {
                unanswered: closed(&error),
                error,
            });
        }
        let mut any = false;
        // Bytes of interim heads taken: they and the answer's head share
        // the bound (an upstream could send them until the caller's
        // timeout otherwise).
        let mut interim = 0;
        loop {
            if !self.read.is_empty() {
                any = true;
                match parse(&mut self.read, request.method, &mut interim)? {
                    Some(head) => return Ok(head),
                    None if interim + self.read.len() >= MAX_HEAD_BYTES => {
                        return Err(invalid("response head too large"));
                    }
                    None => {}
                }
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => {
                    return Err(ExchangeError {
                        error: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before a whole response head",
                        ),
                        unanswered: !any,
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(ExchangeError {
                        unanswered: !any && closed(&error),
                        error,
                    });
                }
            }
        }
    }

    /// Reads what the socket has into the buffer's spare room (see
    /// [`Wire::make_room`]). A connection with nothing unread holds no
    /// buffer while it waits: it takes one (the serving thread's last
    /// given back, [`SPARE`]) once the socket is ready, and gives it back
    /// if the read finds nothing after all.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.is_empty() {
            ready!(self.io.inner().tcp().poll_read_ready(cx))?;
            if self.read.capacity() == 0
                && let Some(buffer) = SPARE.with_borrow_mut(Vec::pop)
            {
                self.read = buffer;
            }
        }
        self.make_room();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read);
        if read.is_pending() {
            self.release_buffer();
        }
        read
    }

    /// Gives the read buffer to the serving thread's spares if nothing in
    /// it is left unread: the next read on any of the thread's connections
    /// goes into it, while it is still in the CPU's cache.
    pub(crate) fn release_buffer(&mut self) {
        if self.read.is_empty() && self.read.capacity() > 0 {
            let buffer = std::mem::take(&mut self.read);
            SPARE.with_borrow_mut(|spare| {
                if spare.len() < SPARE_READ_BUFFERS {
                    spare.push(buffer);
                }
            });
        }
    }

    /// Reads more body bytes.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.poll_fill(cx)
    }

    /// Room for the next read: the buffer's own start again when all it
    /// held was handed out and dropped (each small answer lands in the
    /// same [`UPSTREAM_READ_BUFFER_BYTES`], still in the CPU's cache, and
    /// the kernel's copy into it and the copy out to the client are
    /// cheaper than into a part of the buffer not touched for a while),
    /// else a fresh buffer once less than [`MIN_READ_ROOM`] of the last is
    /// left (its bytes handed out, or waiting to be: read into a sliver, a
    /// stream would come in small chunks).
    fn make_room(&mut self) {
        if self.read.is_empty() && self.read.try_reclaim(UPSTREAM_READ_BUFFER_BYTES) {
            return;
        }
        if self.read.capacity() - self.read.len() < MIN_READ_ROOM {
            self.read.reserve(UPSTREAM_READ_BUFFER_BYTES);
        }
    }
}

fn closed(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

fn invalid(what: &'static str) -> ExchangeError {
    ExchangeError {
        error: io::Error::new(io::ErrorKind::InvalidData, what),
        unanswered: false,
    }
}

/// The request line and headers, as hyper's client wrote them for a
/// request without a body: `request`'s headers in their order (a `Host`
/// among them left out, and an `Authorization` when the request has one
/// of its own), then its `Authorization`, then `host`, as they were when
/// the two were inserted into a copy of its map.
fn encode(request: &RequestHead<'_>, host: &HeaderValue, out: &mut Vec<u8>) {
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in request.headers {
        if name != header::HOST
            && (request.authorization.is_none() || name != header::AUTHORIZATION)
        {
            line(name, value);
        }
    }
    if let Some(authorization) = request.authorization {
        line(&header::AUTHORIZATION, authorization);
    }
    line(&header::HOST, host);
    out.extend_from_slice(b"\r\n");
}

/// The archiver's own header names, and the standard ones it sends, as
/// static names: no copy, and compared without hashing their bytes.
/// The name noted as it is matched (no comparison of the name again).
fn known_name(name: &[u8]) -> Option<(HeaderName, Noted)> {
    use gitball_core::protocol::{REPR_DIGEST, REQUEST_ID, X_GITBALL_CACHE, X_GITBALL_COMMIT};
    let other = |name| Some((name, Noted::Other));
    match name {
        b"etag" => other(header::ETAG),
        b"last-modified" => other(header::LAST_MODIFIED),
        b"x-gitball-commit" => other(X_GITBALL_COMMIT),
        b"content-disposition" => other(header::CONTENT_DISPOSITION),
        b"link" => other(header::LINK),
        b"cache-control" => other(header::CACHE_CONTROL),
        b"content-type" => other(header::CONTENT_TYPE),
        b"x-gitball-cache" => Some((X_GITBALL_CACHE, Noted::Cache)),
        b"accept-ranges" => other(header::ACCEPT_RANGES),
        b"repr-digest" => other(REPR_DIGEST),
        b"content-length" => other(header::CONTENT_LENGTH),
        b"x-request-id" => other(REQUEST_ID),
        b"date" => Some((header::DATE, Noted::Date)),
        b"transfer-encoding" => Some((header::TRANSFER_ENCODING, Noted::TransferEncoding)),
        b"connection" => Some((header::CONNECTION, Noted::Connection)),
        _ => None,
    }
}

/// A name [`known_name`] did not match (another name, or one of its in
/// other letter cases), parsed and noted.
fn other_name(name: &[u8]) -> Result<(HeaderName, Noted), ExchangeError> {
    let name = HeaderName::from_bytes(name).map_err(|_| invalid("invalid response header name"))?;
    let noted = if name == header::DATE {
        Noted::Date
    } else if name == header::TRANSFER_ENCODING {
        Noted::TransferEncoding
    } else if name == header::CONNECTION {
        Noted::Connection
    } else if name == gitball_core::protocol::X_GITBALL_CACHE {
        Noted::Cache
    } else {
        Noted::Other
    };
    Ok((name, noted))
}

/// Parses a whole response head at the start of `read` and takes it out;
/// `None` while it is not whole. Informational heads before it are
/// skipped (and taken out), their bytes added to `interim`; they and the
/// answer's head are at most [`MAX_HEAD_BYTES`] together. The one reader
/// of an archiver's response head: a spliced download's range request
/// (`splice::read_head`) is read with it too.
pub(crate) fn parse(
    read: &mut BytesMut,
    method: &Method,
    interim: &mut usize,
) -> Result<Option<Head>, ExchangeError> {
    loop {
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            read,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(invalid("invalid response head")),
        };
        if *interim + length > MAX_HEAD_BYTES {
            return Err(invalid("response head too large"));
        }
        let code = response.code.unwrap_or_default();
        if (100..200).contains(&code) && code != 101 {
            read.advance(length);
            *interim += length;
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid response status"))?;
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let base = read.as_ptr() as usize;
        let mut names = Vec::with_capacity(response.headers.len());
        let mut present = Present {
            transfer_encoding: false,
            connection: false,
            joined: false,
        };
        let mut cache_seen = false;
        for line in response.headers.iter() {
            let (name, noted) = match known_name(line.name.as_bytes()) {
                Some(known) => known,
                None => other_name(line.name.as_bytes())?,
            };
            match noted {
                // The upstream's `Date` is left out: the proxy never passes
                // it on (the client gets its own server's), nothing reads
                // it, and taken into the map it was checked, inserted, then
                // looked up and removed again (about 1 % of a small hit's
                // instructions).
                Noted::Date => continue,
                Noted::TransferEncoding => present.transfer_encoding = true,
                Noted::Connection => present.connection = true,
                Noted::Cache if !cache_seen => {
                    cache_seen = true;
                    present.joined = line.value == b"join";
                }
                Noted::Cache | Noted::Other => {}
            }
            // httparse's values are slices of `read` (an empty one too);
            // anything else is refused, never sliced out of bounds.
            let start = (line.value.as_ptr() as usize)
                .checked_sub(base)
                .filter(|start| start + line.value.len() <= length)
                .ok_or_else(|| invalid("invalid response header value"))?;
            names.push((name, start, start + line.value.len()));
        }
        let head = read.split_to(length).freeze();
        let mut map = HeaderMap::with_capacity(names.len());
        for (name, start, end) in names {
            // httparse let through only what a header value may hold.
            map.append(
                name,
                HeaderValue::from_maybe_shared(head.slice(start..end))
                    .map_err(|_| invalid("invalid response header value"))?,
            );
        }
        let (framing, by_length) = framing(status, version, method, &mut map, present)?;
        let keep_alive = version == Version::HTTP_11
            && by_length
            && !(present.connection
                && map
                    .get_all(header::CONNECTION)
                    .iter()
                    .any(|value| has_token(value.as_bytes(), b"close")));
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = map;
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
            present,
        }));
    }
}

/// How the body is framed, and whether its end leaves the connection
/// usable (not [`Framing::Close`]).
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &mut HeaderMap,
    present: Present,
) -> Result<(Framing, bool), ExchangeError> {
    if matches!(status.as_u16(), 101 | 204 | 304) || method == Method::HEAD {
        // No body, but a length passed on: one listed again is that one
        // too. Anything else is left for `forward::framed` to refuse.
        drop(one_length(headers));
        return Ok((Framing::Length(0), status.as_u16() != 101));
    }
    if present.transfer_encoding {
        let codings = headers.get_all(header::TRANSFER_ENCODING).iter();
        if version == Version::HTTP_10 {
            return Err(invalid("transfer-encoding on an HTTP/1.0 response"));
        }
        let last = codings
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|coding| !coding.is_empty());
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => (Framing::Chunked, true),
            _ => (Framing::Close, false),
        });
    }
    Ok(match one_length(headers)? {
        Some(length) => (Framing::Length(length), true),
        None => (Framing::Close, false),
    })
}

/// The answer's `Content-Length`, if it has one: a number of digits alone
/// within [`MAX_BODY_BYTES`], or a list of one such number repeated (in one
/// field, `900, 900`, or several), which RFC 9112 (section 6.3) lets a
/// recipient take as that number. Such a list is replaced in `headers` by
/// the number once, so what is passed on is one length (review: the
/// splice took `900, 900` as 900, the pooled path refused it and counted
/// an upstream failure). Other numbers in a list are an error.
fn one_length(headers: &mut HeaderMap) -> Result<Option<u64>, ExchangeError> {
    let mut length = None;
    let mut parts = 0;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&byte| byte == b',') {
            let parsed = decimal(part.trim_ascii())
                .filter(|&parsed| {
                    parsed <= MAX_BODY_BYTES && length.is_none_or(|length| length == parsed)
                })
                .ok_or_else(|| invalid("invalid content-length"))?;
            length = Some(parsed);
            parts += 1;
        }
    }
    if let Some(length) = length
        && parts > 1
    {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(length)
}

/// A number of an answer's head (a `Content-Length`, a `Content-Range`'s
/// positions): one or more digits and nothing else, within `u64`. The one
/// reading of such numbers (`resume` reads `Content-Range` with it).
/// Read digit by digit: `str`'s parse after a UTF-8 check of the same
/// bytes took about 100 instructions of every answer (`BENCHMARKS.md`).
pub(crate) fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Takes what `read` holds of the `left` bytes a body or chunk still has,
/// and counts them off `left`.
fn take_up_to(read: &mut BytesMut, left: &mut u64) -> Bytes {
    let take = read.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
    *left -= take as u64;
    read.split_to(take).freeze()
}

/// Whether `line` (without its CR LF) is a header field: a name of token
/// characters, a colon and a value without a control byte but a tab (RFC
/// 9110's field-value; obs-text is let through, as httparse does). A bare
/// LF is refused too, not taken for a line's end as httparse would: as in
/// a chunk-size line, a lenient reader would frame the body otherwise.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&byte| byte == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
        && value
            .iter()
            .all(|&byte| !byte.is_ascii_control() || byte == b'\t')
}

/// Whether a comma-separated header value holds `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token))
}

/// Where a body's decoding stands.
#[derive(Debug)]
pub enum Decoder {
    /// Bytes of a `Content-Length` body left.
    Length(u64),
    /// Before a chunk's size line.
    ChunkSize,
    /// Bytes of a chunk's data left.
    ChunkData(u64),
    /// The CR LF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk: the bytes and lines of it
    /// read.
    Trailers {
        bytes: usize,
        lines: usize,
    },
    /// To the connection's end.
    Close,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::Length(0) => Decoder::Done,
            Framing::Length(length) => Decoder::Length(length),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Close => Decoder::Close,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// The body bytes left, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(left) => Some(*left),
            Decoder::Done => Some(0),
            _ => None,
        }
    }

    /// The whole body when `wire`'s buffer holds all of it already (a
    /// `Content-Length` body that came in the reads so far, or none),
    /// taken out of it; `None` otherwise, nothing taken.
    pub fn take_whole(&mut self, wire: &mut Wire) -> Option<Bytes> {
        let whole = match self {
            Decoder::Done => Bytes::new(),
            Decoder::Length(left) if wire.read.len() as u64 >= *left => {
                take_up_to(&mut wire.read, left)
            }
            _ => return None,
        };
        *self = Decoder::Done;
        Some(whole)
    }

    /// The next data chunk, `None` at the body's end.
    pub fn poll_data(
        &mut self,
        wire: &mut Wire,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            // What the buffer holds, first.
            if let Some(step) = self.step(&mut wire.read)? {
                return Poll::Ready(Ok(step));
            }
            let read = ready!(wire.poll_more(cx))?;
            if read == 0 {
                if matches!(self, Decoder::Close) {
                    *self = Decoder::Done;
                    return Poll::Ready(Ok(None));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection mid-body",
                )));
            }
        }
    }

    /// Decodes from `read`: `Some` with a chunk or the end, `None` when more
    /// bytes are needed.
    fn step(&mut self, read: &mut BytesMut) -> io::Result<Option<Option<Bytes>>> {
        let bad = |what: &'static str| io::Error::new(io::ErrorKind::InvalidData, what);
        loop {
            match self {
                Decoder::Done => return Ok(Some(None)),
                Decoder::Length(left) => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    let data = take_up_to(read, left);
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Some(Some(data)));
                }
                Decoder::Close => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(read.split().freeze())));
                }
                Decoder::ChunkSize => {
                    // The line's end is looked for in its bound only: a
                    // longer line is refused whether or not its end came
                    // in the same read.
                    let bound = read.len().min(MAX_CHUNK_LINE_BYTES + 2);
                    let Some(end) = read[..bound].windows(2).position(|pair| pair == b"\r\n")
                    else {
                        if read.len() >= MAX_CHUNK_LINE_BYTES + 2 {
                            return Err(bad("chunk size line too long"));
                        }
                        return Ok(None);
                    };
                    let line = &read[..end];
                    // No control byte but a tab: a bare LF or CR would be
                    // a line end to a lenient reader, and frame the body
                    // otherwise (hyper's client refused them too).
                    if line
                        .iter()
                        .any(|&byte| byte.is_ascii_control() && byte != b'\t')
                    {
                        return Err(bad("control byte in a chunk size line"));
                    }
                    let digits = line
                        .iter()
                        .position(|&byte| !byte.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    // Spaces or tabs may follow the size, and extensions
                    // after a `;` (ignored), as hyper's decoder took them.
                    let rest = line[digits..].trim_ascii_start();
                    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
                        return Err(bad("invalid chunk size line"));
                    }
                    let size = u64::from_str_radix(
                        std::str::from_utf8(&line[..digits]).unwrap_or("x"),
                        16,
                    )
                    .map_err(|_| bad("invalid chunk size"))?;
                    if size > MAX_BODY_BYTES {
                        return Err(bad("chunk size past the largest file"));
                    }
                    read.advance(end + 2);
                    *self = if size == 0 {
                        Decoder::Trailers { bytes: 0, lines: 0 }
                    } else {
                        Decoder::ChunkData(size)
                    };
                }
                Decoder::ChunkData(left) => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    let data = take_up_to(read, left);
                    if *left == 0 {
                        *self = Decoder::ChunkEnd;
                    }
                    return Ok(Some(Some(data)));
                }
                Decoder::ChunkEnd => {
                    if read.len() < 2 {
                        return Ok(None);
                    }
                    if &read[..2] != b"\r\n" {
                        return Err(bad("no CR LF after a chunk"));
                    }
                    read.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers { bytes, lines } => {
                    let Some(end) = read.windows(2).position(|pair| pair == b"\r\n") else {
                        if *bytes + read.len() > MAX_TRAILER_BYTES {
                            return Err(bad("trailers too large"));
                        }
                        return Ok(None);
                    };
                    // Each line a header field, at most MAX_HEADERS of
                    // them, as hyper's client took trailers (httparse's
                    // rules for a head's fields, and its header count).
                    if end != 0 {
                        if !is_field_line(&read[..end]) {
                            return Err(bad("invalid trailer line"));
                        }
                        if *lines == MAX_HEADERS {
                            return Err(bad("too many trailer lines"));
                        }
                    }
                    read.advance(end + 2);
                    if end == 0 {
                        *self = Decoder::Done;
                    } else {
                        *bytes += end + 2;
                        *lines += 1;
                        if *bytes > MAX_TRAILER_BYTES {
                            return Err(bad("trailers too large"));
                        }
                    }
                }
            }
        }
    }

    /// Whether the wire holds nothing past the body (a connection with
    /// more is not used again).
    pub fn left_clean(wire: &Wire) -> bool {
        wire.read.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A number of a head is what `str`'s parse reads from digits alone,
    /// and nothing else: a sign, a space, an empty value, or one past
    /// `u64` is refused.
    #[test]
    fn decimals_are_digits_within_u64() {
        let mut values: Vec<String> = (0..1_000).map(|value| value.to_string()).collect();
        values.extend((0..20).map(|power| format!("{}", 10u64.pow(power) - 1)));
        values.extend((0..20).map(|power| format!("00{}", 10u64.pow(power))));
        values.extend(
            [
                "18446744073709551615",
                "18446744073709551616",
                "99999999999999999999",
                "184467440737095516150",
                "",
                "+1",
                "-1",
                " 1",
                "1 ",
                "1a",
                "0x10",
                "１",
            ]
            .map(str::to_owned),
        );
        for value in values {
            let expected = if value.bytes().all(|byte| byte.is_ascii_digit()) {
                value.parse::<u64>().ok()
            } else {
                None
            };
            assert_eq!(decimal(value.as_bytes()), expected, "{value:?}");
        }
    }

    fn head(bytes: &[u8], method: &Method) -> Result<Option<Head>, ExchangeError> {
        parse(&mut BytesMut::from(bytes), method, &mut 0)
    }

    fn decode(framing: Framing, wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut read = BytesMut::from(wire);
        let mut decoder = Decoder::new(framing);
        let mut body = Vec::new();
        loop {
            match decoder.step(&mut read)? {
                Some(Some(chunk)) => body.extend_from_slice(&chunk),
                Some(None) => return Ok(body),
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    #[test]
    fn a_head_is_read_as_hyper_read_it() {
        let parsed = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Gitball-Cache: hit\r\nX-Other: a\r\nX-Other: b\r\n\r\nok",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.parts.status, StatusCode::OK);
        assert_eq!(parsed.framing, Framing::Length(2));
        assert!(parsed.keep_alive);
        assert_eq!(parsed.parts.headers["x-gitball-cache"], "hit");
        let others: Vec<_> = parsed.parts.headers.get_all("x-other").iter().collect();
        assert_eq!(others, ["a", "b"]);
        // The upstream's `Date` is not kept, in any case; what follows it is.
        let parsed = head(
            b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 16:00:00 GMT\r\nDate: x\r\n\
              ETag: \"e\"\r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!parsed.parts.headers.contains_key(header::DATE));
        assert_eq!(parsed.parts.headers.len(), 2);
        assert_eq!(parsed.parts.headers[header::ETAG], "\"e\"");
        // An empty value is a value.
        let parsed = head(
            b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:   \r\nContent-Length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.parts.headers["x-empty"], "");
        assert_eq!(parsed.parts.headers["x-blank"], "");
        // Informational heads are skipped; a partial head waits.
        let parsed = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.parts.status, StatusCode::NO_CONTENT);
        assert_eq!(parsed.framing, Framing::Length(0));
        assert!(
            head(b"HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
                .unwrap()
                .is_none()
        );
        // A HEAD's answer has no body whatever its length.
        let parsed = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.framing, Framing::Length(0));
        assert_eq!(parsed.parts.headers[header::CONTENT_LENGTH], "9");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing_of = |bytes: &[u8]| head(bytes, &Method::GET).map(|head| head.unwrap());
        let chunked = framing_of(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
        )
        .unwrap();
        assert_eq!(chunked.framing, Framing::Chunked);
        let close =
            framing_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").unwrap();
        assert_eq!(close.framing, Framing::Close);
        assert!(!close.keep_alive);
        let none = framing_of(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!(none.framing, Framing::Close);
        let repeated =
            framing_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
                .unwrap();
        assert_eq!(repeated.framing, Framing::Length(5));
        let passed_on: Vec<_> = repeated
            .parts
            .headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .collect();
        assert_eq!(passed_on, ["5"], "a list is passed on as its one length");
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            // Past the largest file (2^63 - 1), and up to u64's end.
            b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(framing_of(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let largest =
            framing_of(b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775807\r\n\r\n").unwrap();
        assert_eq!(largest.framing, Framing::Length(MAX_BODY_BYTES));
        let old = framing_of(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").unwrap();
        assert!(!old.keep_alive, "an HTTP/1.0 connection is not kept");
        let closing = framing_of(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, Close\r\n\r\n",
        )
        .unwrap();
        assert!(!closing.keep_alive);
    }

    /// What the head held of the names the proxy reads is noted as the
    /// map holds it, whether a name is matched as an archiver spells it
    /// (lower case) or parsed from another spelling, and the body is framed
    /// the same either way.
    #[test]
    fn the_names_read_are_noted_as_the_map_holds_them_in_any_case() {
        for given in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: x-a\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Gitball-Cache: join\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Gitball-Cache: hit\r\nX-Gitball-Cache: join\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Gitball-Cache: join\r\nX-Gitball-Cache: hit\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Gitball-Cache: Join\r\nX-Gitball-Cache: join\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(given);
            // The names in lower case, the values as they were.
            let lower: Vec<String> = text
                .split("\r\n")
                .map(|line| match line.split_once(':') {
                    Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                    None => line.to_owned(),
                })
                .collect();
            let lower = lower.join("\r\n");
            let mut seen = vec![];
            for bytes in [given, lower.as_bytes()] {
                let parsed = head(bytes, &Method::GET).unwrap().unwrap();
                let headers = &parsed.parts.headers;
                assert_eq!(
                    parsed.present,
                    Present {
                        transfer_encoding: headers.contains_key(header::TRANSFER_ENCODING),
                        connection: headers.contains_key(header::CONNECTION),
                        joined: crate::upstream::joined(headers),
                    },
                    "{text}"
                );
                seen.push((parsed.framing, parsed.keep_alive, parsed.present));
            }
            assert_eq!(seen[0], seen[1], "{text}");
        }
    }

    #[test]
    fn chunked_bodies_are_decoded_and_their_faults_found() {
        assert_eq!(
            decode(
                Framing::Chunked,
                b"3\r\nabc\r\nA;ext=1\r\n0123456789\r\n2 \t\r\nde\r\n1 ; x\r\nf\r\n0\r\nTrailer: x\r\n\r\n"
            )
            .unwrap(),
            b"abc0123456789def"
        );
        assert_eq!(decode(Framing::Length(3), b"abc").unwrap(), b"abc");
        for bad in [
            &b"3\r\nabcX\r\n0\r\n\r\n"[..],
            b"g\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(
                decode(Framing::Chunked, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Cut short: more is needed.
        assert_eq!(
            decode(Framing::Chunked, b"3\r\nab").unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// A chunk-size line, extensions included, is at most
    /// [`MAX_CHUNK_LINE_BYTES`] whether or not its CR LF has come yet
    /// (it was bounded only while its end had not: a line of 40,000 bytes
    /// read in one go passed).
    #[test]
    fn a_chunk_size_line_over_the_bound_is_refused_whole_or_not() {
        let line = |extension: usize| {
            let mut body = b"2;".to_vec();
            body.resize(2 + extension, b'a');
            body.extend_from_slice(b"\r\nok\r\n0\r\n\r\n");
            body
        };
        assert_eq!(
            decode(Framing::Chunked, &line(MAX_CHUNK_LINE_BYTES - 2)).unwrap(),
            b"ok"
        );
        let error = decode(Framing::Chunked, &line(MAX_CHUNK_LINE_BYTES - 1)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        let error = decode(Framing::Chunked, &line(40_000)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    }

    /// A chunk-size line holds no control byte but a tab: a bare LF (or
    /// CR, or NUL) in its extensions is an error, as hyper's client made
    /// it, not a part of an extension (a reader taking LF alone as a line
    /// end would frame the body otherwise).
    #[test]
    fn a_chunk_size_line_with_a_bare_lf_or_a_control_byte_is_refused() {
        for bad in [
            &b"2;a\nb\r\nok\r\n0\r\n\r\n"[..],
            b"2;a\rb\r\nok\r\n0\r\n\r\n",
            b"2;a\0\r\nok\r\n0\r\n\r\n",
            b"2\r\nok\r\n0;\n\r\n\r\n",
        ] {
            let error = decode(Framing::Chunked, bad).unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidData,
                "{}: {error}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode(Framing::Chunked, b"2;a=\"b\tc\"\r\nok\r\n0\r\n\r\n").unwrap(),
            b"ok"
        );
    }

    /// docs/internal-api.md, "Connections": a chunk size past
    /// [`MAX_BODY_BYTES`] (the largest file, so no archive's) fails the
    /// body where it stands, as a cut body does: the proxy does not wait
    /// for bytes that never come. (`ffffffffffffffff` was a chunk, and the
    /// body ended only at the upstream's silence bound.)
    #[test]
    fn a_chunk_size_past_the_largest_file_is_refused() {
        let largest = format!("{MAX_BODY_BYTES:x}\r\nabc");
        assert_eq!(
            decode(Framing::Chunked, largest.as_bytes())
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof,
            "a chunk of 2^63 - 1 bytes is a chunk: more is needed"
        );
        for size in ["8000000000000000", "ffffffffffffffff", "FFFFFFFFFFFFFFFF"] {
            let body = format!("{size}\r\nabc");
            let error = decode(Framing::Chunked, body.as_bytes()).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{size}: {error}");
        }
    }

    /// The same through a socket: an upstream that announces a chunk of
    /// 2^64 - 1 bytes, sends three and holds its connection open gets the
    /// body failed at once, before the first of those bytes is handed
    /// out (the caller aborts the client's download, as for a cut).
    #[tokio::test]
    async fn a_chunk_past_the_largest_file_fails_at_once_on_a_held_connection() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(stream.read(&mut byte).unwrap(), 1, "a whole head");
                head.push(byte[0]);
            }
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      ffffffffffffffff\r\nabc",
                )
                .unwrap();
            // Held open (and silent) until the proxy closes it.
            let _ = stream.read(&mut byte);
        });
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut wire = Wire::new(WindowedIo::new(TokioIo::new(stream)));
        let target = http::uri::PathAndQuery::from_static("/acme/widget/archive/main.tar");
        let headers = HeaderMap::new();
        let request = RequestHead::get(&target, &headers);
        let head = wire
            .exchange(&request, &HeaderValue::from_static("127.0.0.1"))
            .await
            .expect("the head");
        assert_eq!(head.framing, Framing::Chunked);
        let mut decoder = Decoder::new(head.framing);
        let mut handed_out = 0;
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match std::future::poll_fn(|cx| decoder.poll_data(&mut wire, cx)).await {
                    Ok(Some(chunk)) => handed_out += chunk.len(),
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(error),
                }
            }
        })
        .await
        .expect("the body of a chunk of 2^64 - 1 bytes was waited for");
        let error = ended.expect_err("the body ended cleanly");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert_eq!(
            handed_out, 0,
            "bytes of the impossible chunk were handed out"
        );
        drop(wire);
        server.join().unwrap();
    }

    /// docs/internal-api.md, "Connections": each trailer line is a header
    /// field (a token, a colon, a value with no control byte but a tab)
    /// and there are at most [`MAX_HEADERS`] of them, as hyper's client
    /// required (its decoder handed the trailer section to httparse and
    /// failed the body on an invalid line or past its header count). They
    /// were taken unchecked: a NUL, a lone CR or a bare LF in a trailer
    /// ended the body cleanly.
    #[test]
    fn a_trailer_that_is_no_header_field_is_refused() {
        let body = |trailers: &str| format!("2\r\nok\r\n0\r\n{trailers}\r\n");
        for good in ["", "Trailer: x\r\n", "X-A: b\tc\r\nX-B:\r\nX-C: \u{e9}\r\n"] {
            assert_eq!(
                decode(Framing::Chunked, body(good).as_bytes()).unwrap(),
                b"ok",
                "{good:?}"
            );
        }
        let many = "X-A: b\r\n".repeat(MAX_HEADERS);
        assert_eq!(
            decode(Framing::Chunked, body(&many).as_bytes()).unwrap(),
            b"ok"
        );
        let too_many = "X-A: b\r\n".repeat(MAX_HEADERS + 1);
        for bad in [
            "X-A: b\0c\r\n",
            "X-A: b\rc\r\n",
            "X-A: b\nX-B: c\r\n",
            "X-A: b\x7f\r\n",
            "X-A: b\x1b\r\n",
            "no colon\r\n",
            ": no name\r\n",
            "X A: b\r\n",
            "X-A : b\r\n",
            "X-A: b\r\n folded\r\n",
            &too_many,
        ] {
            let error = decode(Framing::Chunked, body(bad).as_bytes()).unwrap_err();
            assert_eq!(
                error.kind(),
                io::ErrorKind::InvalidData,
                "{:?}: {error}",
                bad.get(..40).unwrap_or(bad)
            );
        }
    }

    /// The bytes the pool wrote when it inserted `Host` (and the route's
    /// `Authorization`) into a copy of the forwarded headers and hyper's
    /// client wrote the map: the map's headers in order, then the
    /// inserted ones.
    #[test]
    fn a_request_head_is_written_as_hyper_wrote_it() {
        let mut headers = HeaderMap::new();
        headers.append(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        headers.append(header::HOST, HeaderValue::from_static("client.example"));
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        headers.append(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\""));
        let target = http::uri::PathAndQuery::from_static("/a/b/archive/main.tar.gz?path=x");
        let host = HeaderValue::from_static("127.0.0.1:1");
        let mut request = RequestHead {
            method: &Method::HEAD,
            target: &target,
            headers: &headers,
            authorization: None,
        };
        let mut out = Vec::new();
        encode(&request, &host, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HEAD /a/b/archive/main.tar.gz?path=x HTTP/1.1\r\nrange: bytes=0-1\r\n\
             authorization: Bearer client\r\nif-none-match: \"x\"\r\nhost: 127.0.0.1:1\r\n\r\n"
        );
        let route = HeaderValue::from_static("Bearer route");
        request.authorization = Some(&route);
        let mut out = Vec::new();
        encode(&request, &host, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HEAD /a/b/archive/main.tar.gz?path=x HTTP/1.1\r\nrange: bytes=0-1\r\n\
             if-none-match: \"x\"\r\nauthorization: Bearer route\r\nhost: 127.0.0.1:1\r\n\r\n"
        );
    }
}
