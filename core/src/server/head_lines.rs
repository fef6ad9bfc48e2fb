//! Watching a connection's input for long runs of lines, so that hyper
//! can parse ordinary request heads with its small inline header scratch
//! space and switch to the full header cap only for a connection that
//! needs it.
//!
//! hyper sizes the scratch space of every head parse by its
//! `max_headers`: with its default (100) the space is an uninitialised
//! array on the stack; with any other value it is a heap allocation of
//! 64 bytes a slot, written out in full on every parse (for the 2,000 lines
//! [`super::MAX_HEADER_LINES`] promises, 128 KiB allocated, filled and
//! freed per request: 12–13 % of the archiver's CPU on a small cache hit).
//! hyper offers no small-first parse that grows on demand, so a connection
//! starts with the default and [`HeadLines`] makes sure that parse never
//! sees a head it would refuse:
//!
//! - It counts the newline-ended lines since the last blank line (a blank
//!   line ends every head, and no head contains one). A head of `n` lines
//!   therefore puts the count at `n` or more by its end, whatever came
//!   before it; request bodies can only raise it (harmlessly).
//! - Before the count exceeds [`WATCHED_LINES`] (far under the default's
//!   100), the bytes from that point on are held back instead of being
//!   handed to hyper, and [`NeedsFullParse`] is set. hyper then has at most
//!   a partial head of at most `WATCHED_LINES` lines, which it can neither
//!   complete nor refuse, and its next read sees the end of the input: it
//!   finishes the response in flight, if any, and ends that connection,
//!   writing nothing more (a partial head at the end of the input is an
//!   "incomplete message", which hyper does not answer).
//! - The accept loop then takes back the bytes hyper read but did not
//!   parse, and serves the rest of the connection with the full cap:
//!   [`HeadLines::replay`] hands out those bytes and then the held ones
//!   before reading the socket again, now without watching.
//!
//! So every head up to the full cap is served, on the same connection, and
//! the cost of the full cap is paid only by a connection that once sent 64
//! lines in a row.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most lines in a row hyper is shown while it parses with its default
/// header cap (100 headers): a request line and 63 headers. One more and
/// the connection switches to the full cap.
pub const WATCHED_LINES: usize = 64;

/// Set by a [`HeadLines`] when it holds bytes back: the connection must be
/// served with the full header cap from here on.
#[derive(Clone, Debug, Default)]
pub struct NeedsFullParse(Arc<AtomicBool>);

impl NeedsFullParse {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where the line count stands after the bytes seen so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinePosition {
    /// Just after a `\n` (or at the start of the connection).
    Start,
    /// After a `\n` and a `\r`: a `\n` now ends a blank line.
    StartCr,
    /// Inside a line.
    Inside,
}

/// Counts newline-ended lines since the last blank line.
#[derive(Clone, Copy, Debug)]
struct LineRun {
    lines: usize,
    position: LinePosition,
}

impl LineRun {
    fn new() -> LineRun {
        LineRun {
            lines: 0,
            position: LinePosition::Start,
        }
    }

    /// Feeds `bytes`; returns the offset of the first byte that would take
    /// the run past [`WATCHED_LINES`], if one does. Bytes from there on are
    /// not counted.
    ///
    /// Every byte of every request passes through here, so it jumps from
    /// newline to newline (`memchr`) instead of stepping byte by byte: what
    /// lies between two newlines matters only as empty, a lone `\r`, or
    /// anything else. Byte by byte it cost 11 instructions a byte, 1,700
    /// of an archiver's small hit behind the proxy (BENCHMARKS.md).
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut from = 0;
        for newline in memchr::memchr_iter(b'\n', bytes) {
            self.position = self.after(&bytes[from..newline]);
            if self.position == LinePosition::Inside {
                if self.lines == WATCHED_LINES {
                    return Some(newline);
                }
                self.lines += 1;
            } else {
                // A blank line: the end of a head.
                self.lines = 0;
            }
            self.position = LinePosition::Start;
            from = newline + 1;
        }
        self.position = self.after(&bytes[from..]);
        None
    }

    /// Where the run stands after `part` (bytes without a `\n`) read from
    /// where it stands now.
    fn after(&self, part: &[u8]) -> LinePosition {
        match (part, self.position) {
            ([], position) => position,
            ([b'\r'], LinePosition::Start) => LinePosition::StartCr,
            _ => LinePosition::Inside,
        }
    }
}

/// A connection's socket as hyper reads it: watched for long line runs
/// until [`HeadLines::replay`], then passed through.
pub struct HeadLines<S> {
    inner: S,
    /// `Some` while watching.
    run: Option<LineRun>,
    /// Bytes read from the socket and not yet handed to hyper: `held[handed..]`.
    held: Vec<u8>,
    handed: usize,
    /// Bytes an ended hyper connection read and did not parse, handed out
    /// first (they were watched when they were first read).
    unparsed: Vec<u8>,
    needs_full_parse: NeedsFullParse,
    /// While watching: when hyper began to wait for the head it is reading
    /// (the connection's start, or its first read after a write: a
    /// response's end), which is when its head timer started. The switch
    /// gives the head held back what is left of that timer, not a fresh one
    /// ([`HeadLines::head_wait_started`]).
    head_wait_started: Instant,
    /// A write came since the last read: the next read starts the wait.
    wrote: bool,
}

impl<S> HeadLines<S> {
    pub fn new(inner: S, needs_full_parse: NeedsFullParse) -> HeadLines<S> {
        HeadLines {
            inner,
            run: Some(LineRun::new()),
            held: Vec::new(),
            handed: 0,
            unparsed: Vec::new(),
            needs_full_parse,
            head_wait_started: Instant::now(),
            wrote: false,
        }
    }

    /// When the head being read became due: the connection's start, its
    /// last write, or the last [`HeadLines::restart_head_wait`].
    pub fn head_wait_started(&self) -> Instant {
        self.head_wait_started
    }

    /// A new hyper connection takes over the socket (after a body sent
    /// around hyper): its head timer starts now.
    pub fn restart_head_wait(&mut self) {
        self.head_wait_started = Instant::now();
    }

    /// Notes a write while watching: a response (or part of one) went out.
    /// The clock is read at the next read, once per response rather than
    /// once per write.
    fn note_write(&mut self, written: &io::Result<usize>) {
        if self.run.is_some() && matches!(written, Ok(count) if *count > 0) {
            self.wrote = true;
        }
    }

    /// Stops watching: the next reads return `unparsed` (the bytes the
    /// ended hyper connection read but did not parse), then the bytes held
    /// back, then the socket's.
    pub fn replay(&mut self, unparsed: &[u8]) {
        self.unread(unparsed);
        self.run = None;
    }

    /// Hands `unparsed` (the bytes an ended hyper connection read but did
    /// not parse) to the next reads, before anything else, and goes on
    /// watching as before.
    pub fn unread(&mut self, unparsed: &[u8]) {
        self.unparsed.splice(0..0, unparsed.iter().copied());
    }

    /// Whether bytes the client sent wait here, not yet handed to hyper.
    pub fn holds_input(&self) -> bool {
        !self.unparsed.is_empty() || self.handed < self.held.len()
    }

    /// The socket, for a body written around hyper (`takeover`).
    pub fn socket_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadLines<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.unparsed.is_empty() {
            let count = this.unparsed.len().min(buf.remaining());
            buf.put_slice(&this.unparsed[..count]);
            this.unparsed.drain(..count);
            return Poll::Ready(Ok(()));
        }
        let Some(run) = &mut this.run else {
            let pending = &this.held[this.handed..];
            if pending.is_empty() {
                if !this.held.is_empty() {
                    this.held = Vec::new();
                    this.handed = 0;
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let count = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..count]);
            this.handed += count;
            return Poll::Ready(Ok(()));
        };
        if std::mem::take(&mut this.wrote) {
            this.head_wait_started = Instant::now();
        }
        if !this.held.is_empty() {
            // The end of this hyper connection: it finishes the response in
            // flight, if any, and ends (with an "incomplete message" error
            // when it holds part of a head), and the accept loop serves
            // the rest with the full cap.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(cut) = run.feed(&buf.filled()[before..]) {
            this.held.extend_from_slice(&buf.filled()[before + cut..]);
            buf.set_filled(before + cut);
            this.needs_full_parse.0.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadLines<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.note_write(&written);
        Poll::Ready(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        self.note_write(&written);
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: usize) -> Vec<u8> {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for index in 0..headers {
            head.extend_from_slice(format!("x-{index}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    #[test]
    fn heads_up_to_the_watched_lines_pass_one_after_another() {
        let mut run = LineRun::new();
        for _ in 0..1000 {
            assert_eq!(run.feed(&head(WATCHED_LINES - 1)), None);
        }
        // Bare newlines end lines and heads too, as httparse reads them.
        assert_eq!(run.feed(b"GET / HTTP/1.1\nx: 1\n\n"), None);
        assert_eq!(run.lines, 0);
    }

    #[test]
    fn a_longer_head_is_cut_before_the_line_past_the_limit_even_across_reads() {
        let long = head(WATCHED_LINES);
        let mut run = LineRun::new();
        let (first, rest) = long.split_at(100);
        assert_eq!(run.feed(first), None);
        let cut = run.feed(rest).expect("cut") + first.len();
        // hyper is shown exactly WATCHED_LINES lines of it.
        assert_eq!(
            long[..cut].iter().filter(|&&byte| byte == b'\n').count(),
            WATCHED_LINES
        );
    }

    /// The byte-by-byte automaton `LineRun::feed` jumps through: the
    /// definition the fast version must agree with.
    fn feed_byte_by_byte(run: &mut LineRun, bytes: &[u8]) -> Option<usize> {
        for (offset, &byte) in bytes.iter().enumerate() {
            run.position = match (byte, run.position) {
                (b'\n', LinePosition::Start | LinePosition::StartCr) => {
                    run.lines = 0;
                    LinePosition::Start
                }
                (b'\n', LinePosition::Inside) => {
                    if run.lines == WATCHED_LINES {
                        return Some(offset);
                    }
                    run.lines += 1;
                    LinePosition::Start
                }
                (b'\r', LinePosition::Start) => LinePosition::StartCr,
                _ => LinePosition::Inside,
            };
        }
        None
    }

    #[test]
    fn the_count_is_the_byte_by_byte_automatons_for_any_input_and_any_reads() {
        // Every string of up to 7 bytes over `\r`, `\n` and `x`, fed after
        // a prefix that leaves the run at each position and near the limit,
        // in one read and split in two at every offset.
        let alphabet = [b'\r', b'\n', b'x'];
        let prefixes: Vec<(Vec<u8>, LineRun)> = [
            Vec::new(),
            b"\r".to_vec(),
            b"ab".to_vec(),
            b"\n".to_vec(),
            b"line\n".repeat(WATCHED_LINES - 1),
            b"line\r\n".repeat(WATCHED_LINES),
            [b"line\r\n".repeat(WATCHED_LINES).as_slice(), b"\r"].concat(),
        ]
        .into_iter()
        .map(|prefix| {
            let mut fast = LineRun::new();
            let mut slow = LineRun::new();
            assert_eq!(fast.feed(&prefix), None);
            assert_eq!(feed_byte_by_byte(&mut slow, &prefix), None);
            assert_eq!((fast.lines, fast.position), (slow.lines, slow.position));
            (prefix, fast)
        })
        .collect();
        let mut input = Vec::new();
        for length in 0..=7u32 {
            for mut code in 0..3usize.pow(length) {
                input.clear();
                for _ in 0..length {
                    input.push(alphabet[code % 3]);
                    code /= 3;
                }
                for (prefix, after_prefix) in &prefixes {
                    for split in 0..=input.len() {
                        let mut fast = *after_prefix;
                        let mut slow = *after_prefix;
                        let (first, second) = input.split_at(split);
                        let got = fast
                            .feed(first)
                            .or_else(|| fast.feed(second).map(|cut| cut + split));
                        let want = feed_byte_by_byte(&mut slow, first).or_else(|| {
                            feed_byte_by_byte(&mut slow, second).map(|cut| cut + split)
                        });
                        assert_eq!(got, want, "{prefix:?} then {first:?} {second:?}");
                        if got.is_none() {
                            assert_eq!(
                                (fast.lines, fast.position),
                                (slow.lines, slow.position),
                                "{prefix:?} then {first:?} {second:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lines_before_a_head_only_count_against_it() {
        let mut run = LineRun::new();
        // A body without a final blank line, then a short head: the run
        // spans both, so the cut comes no later than the head's own lines
        // would put it.
        assert_eq!(run.feed(&b"line\n".repeat(60)), None);
        assert!(run.feed(&head(10)).is_some());
    }
}
