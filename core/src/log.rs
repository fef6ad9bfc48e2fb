//! Logging: the tracing set-up, and the one request-log record both tiers
//! write (`docs/observability.md#request-log`).
//!
//! A [`RequestLog`] is created when a request's head has been read and
//! writes its line when it is dropped, so every request gets exactly one
//! line however it ends: an error answered at once, a download whose body
//! ran to the end or was cut, or a client that left before any answer was
//! chosen (axum drops the handler's future; the line says `499`, as nginx
//! logs it). For a download the record moves into the body stream and is
//! dropped with it. The same drop calls the tier's `on_finish` hook, which
//! counts the request in that tier's `requests_total`: a request is never
//! logged without being counted, or counted without being logged.
//!
//! Both tiers write the same fields, with `-` for those that do not apply,
//! so one log query reads either and the two join on `request_id`.

use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use tracing::Level;

use crate::server::ClientWrites;

/// The status logged and counted for a request whose client left before
/// it was answered (nginx's "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Log line format (`--log-format`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the `tracing` subscriber: one line per event on stderr, text or
/// JSON; the level filter comes from `RUST_LOG` (default `info`).
///
/// Lines are written to a duplicate of fd 2, not through `std::io::Stderr`:
/// its process-wide lock serialised the serving threads, each writing one
/// request line per request, and under small-hit load the proxy spent 0.6
/// `futex` calls per request waiting for it, its whole event loop blocked
/// meanwhile. The subscriber formats each line into a buffer of its own and
/// writes it with one `write(2)`, which the kernel does not interleave with
/// another thread's (a pipe takes up to `PIPE_BUF` bytes at once, a file
/// write holds the file's position lock); nginx writes its log the same way.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let file = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .map(|fd| Arc::new(std::fs::File::from(fd)));
    let writer = match &file {
        Ok(file) => BoxMakeWriter::new(file.clone()),
        // No fd left at start-up: the locked stderr still works.
        Err(_) => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // A second call (tests, embedded mode) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_ok() {
        let _ = LOG_FORMAT.set(format);
    }
    if let (Ok(()), Ok(file), false) = (installed, file, ansi) {
        let _ = REQUEST_LINES.set(RequestLines { file });
    }
}

/// Where request lines go without `tracing`'s formatting: the subscriber's
/// own file (in its format, [`LOG_FORMAT`]). `tracing_subscriber`'s formatting of the request
/// line's fifteen fields (a visitor and a `fmt::Write` call per field, a
/// timestamp through its own calendar code) took 10–12 % of the archiver's
/// CPU on a small cache hit; [`RequestLine`] writes the same bytes directly.
/// Set by [`init_tracing`] unless the output is a terminal (colours are left
/// to `tracing_subscriber`).
struct RequestLines {
    file: Arc<std::fs::File>,
}

static REQUEST_LINES: OnceLock<RequestLines> = OnceLock::new();

/// The installed subscriber's format, for lines written directly and for
/// those that go through `tracing` (colours at a terminal, no fd to spare,
/// inside a span): a line emitted through it escapes its values as that
/// format wants them. Unset (tests without `init_tracing`): text, the
/// subscriber's default.
static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

thread_local! {
    /// The line being written, reused: one allocation per serving thread.
    /// Bytes, not a `String`: the digits of its numbers go in without a
    /// UTF-8 check each (`BENCHMARKS.md`).
    static LINE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which tier wrote a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Archiver,
    Proxy,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Archiver => "archiver",
            Tier::Proxy => "proxy",
        }
    }
}

/// Who caused an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bad input: a 4xx answered without doing the work.
    Client,
    /// The proxy's upstreams: none gave a usable answer, or one failed
    /// mid-body.
    Upstream,
    /// This process: a generation that failed, a full queue, a bug.
    Internal,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Upstream => "upstream",
            Fault::Internal => "internal",
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The whole answer was handed to the connection.
    Complete,
    /// The client went away first (before the answer, or mid-body).
    ClientGone,
    /// The client took no bytes for too long and was cut.
    IdleTimeout,
    /// The source failed mid-body (a generation, an upstream) and the
    /// connection was aborted so the truncation shows.
    Aborted,
    /// The server cut the connection when its shutdown grace ran out.
    Shutdown,
}

impl Ending {
    /// Every ending, in the order of docs/observability.md's table.
    pub const ALL: [Ending; 5] = [
        Ending::Complete,
        Ending::ClientGone,
        Ending::IdleTimeout,
        Ending::Aborted,
        Ending::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::ClientGone => "client_gone",
            Ending::IdleTimeout => "idle_timeout",
            Ending::Aborted => "aborted",
            Ending::Shutdown => "shutdown",
        }
    }
}

/// What the drop computed: handed to the tier's `on_finish` hook.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    /// The status sent, or [`CLIENT_CLOSED_REQUEST`].
    pub status: u16,
    pub ending: Ending,
    pub duration: Duration,
}

/// Counts a finished request in the tier's metrics.
pub type OnFinish = fn(&RequestLog, &Finished);

/// One request's log record; its line is written when it is dropped.
#[derive(Debug)]
pub struct RequestLog {
    tier: Tier,
    started: Instant,
    on_finish: OnFinish,
    pub request_id: String,
    pub method: Method,
    /// The path only: the query may hold a token.
    pub path: String,
    /// `None` until an answer was chosen; dropped as `None`, it is a 499.
    pub status: Option<StatusCode>,
    /// Body bytes handed to the connection.
    pub bytes: u64,
    /// `None`: complete when answered, else the client left.
    pub ending: Option<Ending>,
    pub fault: Option<Fault>,
    /// The error code, or a detail for internal errors (never sent to the
    /// client).
    pub error: Option<String>,
    /// Archiver: `hit`, `miss`, `join`.
    pub cache: Option<&'static str>,
    /// Archiver: the resolved commit.
    pub commit: Option<String>,
    /// Archiver: the archive format.
    pub format: Option<&'static str>,
    /// Proxy: the upstream that answered (or was tried last).
    pub upstream: Option<Arc<str>>,
    /// Proxy: upstream attempts made.
    pub attempts: Option<u32>,
    /// The connection's writes: whether the server cut it at shutdown.
    writes: Option<ClientWrites>,
}

/// Longest path kept in a line; a longer one is cut (it is a bad request
/// anyway, and log lines stay bounded).
const MAX_LOGGED_PATH_CHARS: usize = 512;

impl RequestLog {
    pub fn new(
        tier: Tier,
        request_id: String,
        method: Method,
        path: &str,
        on_finish: OnFinish,
    ) -> RequestLog {
        RequestLog {
            tier,
            started: Instant::now(),
            on_finish,
            request_id,
            method,
            path: if path.len() <= MAX_LOGGED_PATH_CHARS {
                path.to_owned()
            } else {
                path.chars().take(MAX_LOGGED_PATH_CHARS).collect()
            },
            status: None,
            bytes: 0,
            ending: None,
            fault: None,
            error: None,
            cache: None,
            commit: None,
            format: None,
            upstream: None,
            attempts: None,
            writes: None,
        }
    }

    /// The request came on a server connection with these writes: a
    /// request it left unfinished when the server's shutdown grace ran out
    /// ends `shutdown`, not `client_gone`.
    pub fn on_connection(&mut self, writes: Option<&ClientWrites>) {
        self.writes = writes.cloned();
    }

    /// A whole answer (built by the tier, not streamed): its status, and
    /// its body's length as the bytes sent (none for `HEAD`).
    pub fn answered(&mut self, response: &axum::response::Response) {
        use axum::body::HttpBody as _;
        self.status = Some(response.status());
        if self.method != Method::HEAD {
            let length = response.body().size_hint().exact().or_else(|| {
                response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)?
                    .to_str()
                    .ok()?
                    .parse()
                    .ok()
            });
            if let Some(length) = length {
                self.bytes = length;
            }
        }
    }

    /// The request failed with `code` (or an internal detail), answered
    /// with `status`.
    pub fn failed(&mut self, status: StatusCode, fault: Fault, error: String) {
        self.status = Some(status);
        self.fault = Some(fault);
        self.error.get_or_insert(error);
    }

    /// What this record will say when dropped now.
    pub fn finished(&self) -> Finished {
        Finished {
            status: self
                .status
                .map_or(CLIENT_CLOSED_REQUEST, |status| status.as_u16()),
            ending: match self.ending.unwrap_or(if self.status.is_some() {
                Ending::Complete
            } else {
                Ending::ClientGone
            }) {
                Ending::ClientGone
                    if self
                        .writes
                        .as_ref()
                        .is_some_and(ClientWrites::cut_at_shutdown) =>
                {
                    Ending::Shutdown
                }
                ending => ending,
            },
            duration: self.started.elapsed(),
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let finished = self.finished();
        (self.on_finish)(self, &finished);
        let Finished {
            status,
            ending,
            duration,
        } = finished;
        let mut digits = [0; 20];
        let attempts = self
            .attempts
            .map_or("-", |attempts| decimal(&mut digits, u64::from(attempts)));
        let line = RequestLine {
            level: if self.fault == Some(Fault::Internal) {
                Level::ERROR
            } else if ending != Ending::Complete || self.fault == Some(Fault::Upstream) {
                Level::WARN
            } else {
                Level::INFO
            },
            tier: self.tier,
            request_id: &self.request_id,
            method: self.method.as_str(),
            path: &self.path,
            status,
            bytes: self.bytes,
            duration_ms: (duration.as_secs_f64() * 1e6).round() / 1e3,
            ending,
            fault: self.fault,
            error: self.error.as_deref().unwrap_or(""),
            cache: self.cache.unwrap_or("-"),
            commit: self.commit.as_deref().unwrap_or("-"),
            format: self.format.unwrap_or("-"),
            upstream: self.upstream.as_deref().unwrap_or("-"),
            attempts,
        };
        let format = LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text);
        match REQUEST_LINES.get() {
            // Inside a span `tracing_subscriber` would add the span's
            // context: leave such a line to it.
            Some(lines) if tracing::Span::current().is_none() => {
                if line.enabled() {
                    line.write(lines, format);
                }
            }
            _ => line.emit(format),
        }
    }
}

/// ` name=value` in the text format, `prefix` being ` name=`.
fn text_field(out: &mut Vec<u8>, prefix: &str, value: &str) {
    out.extend_from_slice(prefix.as_bytes());
    text_value(out, value);
}

/// A value of the text format ([`write_text_value`]).
fn text_value(out: &mut Vec<u8>, value: &str) {
    if is_plain(value.as_bytes()) {
        out.extend_from_slice(value.as_bytes());
    } else {
        let _ = write_text_value(&mut LineWriter(out), value);
    }
}

/// A line's bytes written through `std::fmt::Write` (a value to escape).
struct LineWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for LineWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// Whether every byte of `value` is [`PLAIN`] (a value [`write_text_value`]
/// writes as it is), eight bytes at a time: the check runs over every
/// byte of every line, and byte by byte it was a tenth of the line's
/// cost (`BENCHMARKS.md`).
fn is_plain(value: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    // Whether a byte of `word` is zero (exact for the word as a whole).
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGH != 0;
    let mut chunks = value.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(<[u8; 8]>::try_from(chunk).unwrap_or_default());
        // Not ASCII; then, all bytes below 0x80: one below `!` (a space or
        // a control), a DEL (the only byte the `+ 1` carries into the top
        // bit), or a `"`, `=` or `\\`.
        if word & HIGH != 0
            || word.wrapping_sub(ONES * 0x21) & !word & HIGH != 0
            || word.wrapping_add(ONES) & HIGH != 0
            || has_zero(word ^ (ONES * u64::from(b'"')))
            || has_zero(word ^ (ONES * u64::from(b'=')))
            || has_zero(word ^ (ONES * u64::from(b'\\')))
        {
            return false;
        }
    }
    chunks
        .remainder()
        .iter()
        .all(|&byte| PLAIN[usize::from(byte)])
}

/// The text format's line after its timestamp up to `request_id`'s value,
/// one piece for each level and tier: the level, the target, the message,
/// the tier (a plain value of the service's own) and the next name were
/// five pieces, the tier's checked for plainness (`BENCHMARKS.md`).
fn text_head(level: Level, tier: Tier) -> &'static str {
    macro_rules! head {
        ($level:literal) => {
            match tier {
                Tier::Archiver => concat!(
                    $level,
                    module_path!(),
                    ": request tier=archiver request_id="
                ),
                Tier::Proxy => concat!($level, module_path!(), ": request tier=proxy request_id="),
            }
        };
    }
    match level {
        Level::ERROR => head!(" ERROR "),
        Level::WARN => head!("  WARN "),
        _ => head!("  INFO "),
    }
}

/// The text format's ` ending=… fault=…`, one piece for each ending and
/// fault (the service's own plain values): two fields, each checked for
/// plainness, were about a tenth of the line's cost (`BENCHMARKS.md`).
fn text_ending_and_fault(ending: Ending, fault: Option<Fault>) -> &'static str {
    macro_rules! pieces {
        ($ending:literal) => {
            match fault {
                None => concat!(" ending=", $ending, " fault=-"),
                Some(Fault::Client) => concat!(" ending=", $ending, " fault=client"),
                Some(Fault::Upstream) => concat!(" ending=", $ending, " fault=upstream"),
                Some(Fault::Internal) => concat!(" ending=", $ending, " fault=internal"),
            }
        };
    }
    match ending {
        Ending::Complete => pieces!("complete"),
        Ending::ClientGone => pieces!("client_gone"),
        Ending::IdleTimeout => pieces!("idle_timeout"),
        Ending::Aborted => pieces!("aborted"),
        Ending::Shutdown => pieces!("shutdown"),
    }
}

/// The text format's names of the fields between `fault` and `upstream`.
const TEXT_AFTER: [&str; 4] = [" error=", " cache=", " commit=", " format="];

/// The bytes a text value shows as they are: printable ASCII but `"`, `=`
/// and `\\` (a table: the check runs over every byte of a line).
const PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        plain[byte] = (byte as u8).is_ascii_graphic() && !matches!(byte as u8, b'"' | b'=' | b'\\');
        byte += 1;
    }
    plain
};

/// A string field as a line of `format` shows it: escaped by
/// [`write_text_value`] in the text format, as it is for JSON (whose
/// encoder escapes it).
struct Shown<'a> {
    text: bool,
    value: &'a str,
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.text {
            write_text_value(out, self.value)
        } else {
            out.write_str(self.value)
        }
    }
}

/// A value from outside the service, shown in any log line as the request
/// line's values are: escaped by [`write_text_value`] in the text format
/// (the JSON encoder escapes it in the other). git's stderr quotes the
/// paths of the tree it failed on, and a pushed tree's path may hold a
/// newline: written as it was, it put lines of the pusher's choosing into
/// the log (a forged request line among them).
pub fn untrusted(value: &str) -> impl std::fmt::Display + '_ {
    Shown {
        text: matches!(
            LOG_FORMAT.get().copied().unwrap_or(LogFormat::Text),
            LogFormat::Text
        ),
        value,
    }
}

/// A value of the text format: as it is when plain (printable ASCII but
/// space, `"`, `=` and `\\`, or empty), else quoted, with `"` and `\\`
/// escaped and every character that is not printable ASCII written as an
/// escape (`\\n`, `\\u{2028}`). A client's path, method or error detail
/// therefore cannot start a line of its own, or pass for another field.
fn write_text_value(out: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    if is_plain(value.as_bytes()) {
        return out.write_str(value);
    }
    out.write_char('"')?;
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.write_char('\\')?;
                out.write_char(c)?;
            }
            ' ' => out.write_char(' ')?,
            c if c.is_ascii_graphic() => out.write_char(c)?,
            c => write!(out, "{}", c.escape_default())?,
        }
    }
    out.write_char('"')
}

/// A string field of a request line: its name and value.
type Field<'a> = (&'static str, &'a str);

/// The fields of one request line.
#[derive(Debug, Clone)]
struct RequestLine<'a> {
    level: Level,
    tier: Tier,
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    bytes: u64,
    duration_ms: f64,
    ending: Ending,
    fault: Option<Fault>,
    error: &'a str,
    cache: &'a str,
    commit: &'a str,
    format: &'a str,
    upstream: &'a str,
    attempts: &'a str,
}

impl RequestLine<'_> {
    /// Whether the subscriber's filter (`RUST_LOG`) passes this line's
    /// level for this module.
    fn enabled(&self) -> bool {
        match self.level {
            Level::ERROR => tracing::enabled!(Level::ERROR),
            Level::WARN => tracing::enabled!(Level::WARN),
            _ => tracing::enabled!(Level::INFO),
        }
    }

    /// Writes the line as the subscriber would, in one `write(2)`.
    fn write(&self, lines: &RequestLines, format: LogFormat) {
        let now = std::time::SystemTime::now();
        LINE_BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            match format {
                LogFormat::Text => self.format_text(now, buffer),
                LogFormat::Json => self.format_json(now, buffer),
            }
            let _ = (&*lines.file).write_all(buffer);
            if buffer.capacity() > 64 * 1024 {
                // A long error detail once does not pin the memory.
                *buffer = Vec::new();
            }
        });
    }

    /// The string fields in line order: those before `status`, `bytes`
    /// and `duration_ms`, and those after.
    fn strings(&self) -> ([Field<'_>; 4], [Field<'_>; 8]) {
        (
            [
                ("tier", self.tier.as_str()),
                ("request_id", self.request_id),
                ("method", self.method),
                ("path", self.path),
            ],
            [
                ("ending", self.ending.as_str()),
                ("fault", self.fault.map_or("-", Fault::as_str)),
                ("error", self.error),
                ("cache", self.cache),
                ("commit", self.commit),
                ("format", self.format),
                ("upstream", self.upstream),
                ("attempts", self.attempts),
            ],
        )
    }

    /// `tracing_subscriber`'s text format (`fmt()` without colours), each
    /// string value through [`write_text_value`].
    fn format_text(&self, now: std::time::SystemTime, out: &mut Vec<u8>) {
        write_timestamp(now, out);
        out.extend_from_slice(text_head(self.level, self.tier).as_bytes());
        text_value(out, self.request_id);
        text_field(out, " method=", self.method);
        text_field(out, " path=", self.path);
        let (_, after) = self.strings();
        out.extend_from_slice(b" status=");
        push_decimal(out, u64::from(self.status));
        out.extend_from_slice(b" bytes=");
        push_decimal(out, self.bytes);
        out.extend_from_slice(b" duration_ms=");
        push_milliseconds(out, self.duration_ms);
        out.extend_from_slice(text_ending_and_fault(self.ending, self.fault).as_bytes());
        let [_, _, error, cache, commit, format, upstream, attempts] = after;
        if error.1.is_empty() && cache.1 == "-" && commit.1 == "-" && format.1 == "-" {
            // A proxy's line, and an archiver's error before any work.
            out.extend_from_slice(b" error= cache=- commit=- format=-");
        } else {
            for ((_, value), prefix) in [error, cache, commit, format].into_iter().zip(TEXT_AFTER) {
                text_field(out, prefix, value);
            }
        }
        text_field(out, " upstream=", upstream.1);
        text_field(out, " attempts=", attempts.1);
        out.push(b'\n');
    }

    /// `tracing_subscriber`'s JSON format with `flatten_event(true)`.
    fn format_json(&self, now: std::time::SystemTime, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(now, out);
        out.extend_from_slice(match self.level {
            Level::ERROR => b"\",\"level\":\"ERROR\",\"message\":\"request\"",
            Level::WARN => b"\",\"level\":\"WARN\",\"message\":\"request\"" as &[u8],
            _ => b"\",\"level\":\"INFO\",\"message\":\"request\"",
        });
        let (before, after) = self.strings();
        for (name, value) in before {
            json_field(out, name, value);
        }
        out.extend_from_slice(b",\"status\":");
        push_decimal(out, u64::from(self.status));
        out.extend_from_slice(b",\"bytes\":");
        push_decimal(out, self.bytes);
        out.extend_from_slice(b",\"duration_ms\":");
        push_milliseconds(out, self.duration_ms);
        for (name, value) in after {
            json_field(out, name, value);
        }
        json_field(out, "target", module_path!());
        out.extend_from_slice(b"}\n");
    }

    /// The line through `tracing`: when the fast path does not apply.
    fn emit(&self, format: LogFormat) {
        let text = matches!(format, LogFormat::Text);
        let shown = |value| Shown { text, value };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    tier = %shown(self.tier.as_str()),
                    request_id = %shown(self.request_id),
                    method = %shown(self.method),
                    path = %shown(self.path),
                    status = self.status,
                    bytes = self.bytes,
                    duration_ms = self.duration_ms,
                    ending = %shown(self.ending.as_str()),
                    fault = %shown(self.fault.map_or("-", Fault::as_str)),
                    error = %shown(self.error),
                    cache = %shown(self.cache),
                    commit = %shown(self.commit),
                    format = %shown(self.format),
                    upstream = %shown(self.upstream),
                    attempts = %shown(self.attempts),
                    "request"
                )
            };
        }
        match self.level {
            Level::ERROR => line!(error),
            Level::WARN => line!(warn),
            _ => line!(info),
        }
    }
}

/// `,"name":"value"` with the value escaped as JSON.
fn json_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    if value
        .bytes()
        .all(|byte| (b' '..0x7f).contains(&byte) && !matches!(byte, b'"' | b'\\'))
    {
        // Nothing to escape: as serde_json writes it.
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a `&str` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

/// `value` in decimal, as `Display` writes it, in `digits`.
fn decimal(digits: &mut [u8; 20], value: u64) -> &str {
    // The attempts of nearly every line: no UTF-8 check of one digit.
    const ONE_DIGIT: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(value)
        .ok()
        .and_then(|value| ONE_DIGIT.get(value))
    {
        Some(digit) => digit,
        None => padded(digits, value, 1),
    }
}

/// `value` in decimal with `width` digits at least, zeros in front, in
/// `digits`.
fn padded(digits: &mut [u8; 20], mut value: u64, width: usize) -> &str {
    let mut start = digits.len();
    while value > 0 || digits.len() - start < width {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    // ASCII digits.
    std::str::from_utf8(&digits[start..]).unwrap_or_default()
}

/// `"00"` to `"99"`: a number's digits are written two at a time.
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0; 200];
    let mut pair = 0;
    while pair < 100 {
        pairs[2 * pair] = b'0' + (pair / 10) as u8;
        pairs[2 * pair + 1] = b'0' + (pair % 10) as u8;
        pair += 1;
    }
    pairs
};

fn push_decimal(out: &mut Vec<u8>, value: u64) {
    push_padded(out, value, 1);
}

/// `value` in decimal with `width` digits at least (up to 20), zeros in
/// front, as `{value:0width$}` writes it.
fn push_padded(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    while value >= 100 {
        let pair = (value % 100) as usize * 2;
        value /= 100;
        start -= 2;
        digits[start..start + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if value >= 10 {
        let pair = value as usize * 2;
        start -= 2;
        digits[start..start + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        start -= 1;
        digits[start] = b'0' + value as u8;
    }
    let start = start.min(digits.len().saturating_sub(width));
    out.extend_from_slice(&digits[start..]);
}

/// A duration in milliseconds, a whole number of microseconds over 1,000
/// (as [`RequestLog`] rounds it), written as `{:?}` and serde_json write
/// that `f64`: its shortest decimal, `.0` when whole. Any other value (not
/// a whole number of microseconds, or too large for them to be exact)
/// goes through `{:?}` itself.
fn push_milliseconds(out: &mut Vec<u8>, milliseconds: f64) {
    let micros = (milliseconds * 1e3).round();
    if (0.0..1e12).contains(&micros) && micros / 1e3 == milliseconds {
        let micros = micros as u64;
        push_decimal(out, micros / 1000);
        out.push(b'.');
        let fraction = micros % 1000;
        if fraction == 0 {
            out.push(b'0');
        } else if fraction.is_multiple_of(100) {
            push_decimal(out, fraction / 100);
        } else if fraction.is_multiple_of(10) {
            push_padded(out, fraction / 10, 2);
        } else {
            push_padded(out, fraction, 3);
        }
    } else {
        let _ = write!(out, "{milliseconds:?}");
    }
}

/// `2026-12-03T02:36:27.097324Z`: UTC, microseconds, as `tracing_subscriber`
/// writes it.
fn write_timestamp(now: std::time::SystemTime, out: &mut Vec<u8>) {
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    // The date and time to the second change once a second: kept per
    // thread, written again only when they change.
    LAST_SECOND.with_borrow_mut(|(second, text)| {
        if *second != Some(seconds) {
            text.clear();
            write_second(seconds, text);
            *second = Some(seconds);
        }
        out.extend_from_slice(text);
    });
    push_padded(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push(b'Z');
}

thread_local! {
    /// The second [`write_timestamp`] wrote last, and its text up to the
    /// fraction (`2026-12-03T02:36:27.`).
    static LAST_SECOND: std::cell::RefCell<(Option<u64>, Vec<u8>)> =
        const { std::cell::RefCell::new((None, Vec::new())) };
}

/// `2026-12-03T02:36:27.` for `seconds` since the epoch.
fn write_second(seconds: u64, out: &mut Vec<u8>) {
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let of_day = seconds % 86_400;
    // Written digit by digit: `write!` with padding cost more than the
    // rest of the line.
    push_padded(out, year.max(0) as u64, 4);
    out.push(b'-');
    push_padded(out, u64::from(month), 2);
    out.push(b'-');
    push_padded(out, u64::from(day), 2);
    out.push(b'T');
    push_padded(out, of_day / 3600, 2);
    out.push(b':');
    push_padded(out, of_day / 60 % 60, 2);
    out.push(b':');
    push_padded(out, of_day % 60, 2);
    out.push(b'.');
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A [`LogEvery`] shared by threads (the serving threads of a process).
#[derive(Debug)]
pub struct SharedLogEvery(std::sync::Mutex<LogEvery>);

impl SharedLogEvery {
    pub fn new(interval: Duration) -> SharedLogEvery {
        SharedLogEvery(std::sync::Mutex::new(LogEvery::new(interval)))
    }

    /// [`LogEvery::note`].
    pub fn note(&self, now: Instant) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .note(now)
    }
}

/// Rate limit for a log line that could otherwise repeat many times a
/// second (`accept failed`, refusals at the caps, an archiver refusing the
/// proxy's connections).
#[derive(Debug)]
pub struct LogEvery {
    interval: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    pub fn new(interval: Duration) -> LogEvery {
        LogEvery {
            interval,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Notes one failure at `now`. Returns `Some(failures not logged since
    /// the last line)` when this one is to be logged.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_logged
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last_logged = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU16, Ordering};

    static LAST_STATUS: AtomicU16 = AtomicU16::new(0);

    fn remember(_: &RequestLog, finished: &Finished) {
        LAST_STATUS.store(finished.status, Ordering::SeqCst);
    }

    fn record() -> RequestLog {
        RequestLog::new(
            Tier::Archiver,
            "id".into(),
            Method::GET,
            "/a/b/archive/main.tar",
            remember,
        )
    }

    #[test]
    fn a_request_dropped_before_an_answer_is_a_499_client_gone() {
        let log = record();
        let finished = log.finished();
        assert_eq!(finished.status, CLIENT_CLOSED_REQUEST);
        assert_eq!(finished.ending, Ending::ClientGone);
        drop(log);
        assert_eq!(LAST_STATUS.load(Ordering::SeqCst), 499);
    }

    #[test]
    fn an_answered_request_is_complete_unless_told_otherwise() {
        let mut log = RequestLog::new(Tier::Proxy, "id".into(), Method::GET, "/", |_, _| {});
        log.status = Some(StatusCode::OK);
        assert_eq!(log.finished().ending, Ending::Complete);
        log.ending = Some(Ending::Aborted);
        assert_eq!(log.finished().ending, Ending::Aborted);
        log.failed(StatusCode::NOT_FOUND, Fault::Client, "ref_not_found".into());
        assert_eq!(log.finished().status, 404);
        assert_eq!(log.error.as_deref(), Some("ref_not_found"));
    }

    /// `docs/observability.md#request-log`: the level is `error` for an
    /// `internal` fault, `warn` for an `upstream` one or for any request
    /// that did not end `complete`, a fault or not (a client that left, an
    /// idle client cut, a cut at shutdown), and `info` otherwise.
    #[test]
    fn the_level_follows_the_fault_and_the_ending() {
        let level = |status: Option<StatusCode>, ending: Option<Ending>, fault: Option<Fault>| {
            let line = captured(LogFormat::Text, || {
                let mut log =
                    RequestLog::new(Tier::Proxy, "id".into(), Method::GET, "/", |_, _| {});
                log.status = status;
                log.ending = ending;
                log.fault = fault;
            });
            // `{timestamp} {level} {target}: request …`
            line.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        };
        let ok = Some(StatusCode::OK);
        assert_eq!(level(ok, None, None), "INFO");
        assert_eq!(level(ok, None, Some(Fault::Client)), "INFO");
        assert_eq!(level(ok, None, Some(Fault::Upstream)), "WARN");
        assert_eq!(level(ok, None, Some(Fault::Internal)), "ERROR");
        // Not `complete`, and nobody's fault.
        assert_eq!(level(None, None, None), "WARN", "a 499");
        for ending in [
            Ending::ClientGone,
            Ending::IdleTimeout,
            Ending::Shutdown,
            Ending::Aborted,
        ] {
            assert_eq!(level(ok, Some(ending), None), "WARN", "{ending:?}");
        }
    }

    /// A writer for `tracing_subscriber` that keeps what it is given.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `tracing_subscriber`, set up as `init_tracing` sets it up,
    /// writes for `line`.
    fn through_tracing(line: &RequestLine, format: LogFormat) -> String {
        captured(format, || line.emit(format))
    }

    /// What `tracing_subscriber`, set up as `init_tracing` sets it up for
    /// `format`, writes while `run` runs.
    fn captured(format: LogFormat, run: impl FnOnce()) -> String {
        let capture = Capture::default();
        let writer = {
            let capture = capture.clone();
            move || capture.clone()
        };
        let builder = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), run),
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), run)
            }
        }
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    fn direct(line: &RequestLine, format: LogFormat) -> String {
        let mut out = Vec::new();
        let now = std::time::SystemTime::now();
        match format {
            LogFormat::Text => line.format_text(now, &mut out),
            LogFormat::Json => line.format_json(now, &mut out),
        }
        String::from_utf8(out).unwrap()
    }

    /// The line with its timestamp (27 characters) blanked.
    fn without_timestamp(line: &str) -> String {
        let start = line.find("20").expect("a timestamp");
        format!("{}{}", &line[..start], &line[start + 27..])
    }

    #[test]
    fn request_lines_are_written_byte_for_byte_as_tracing_subscriber_writes_them() {
        let mut line = RequestLine {
            level: Level::INFO,
            tier: Tier::Archiver,
            request_id: "0b7e7090d0da2d60e38936afc06bf12b",
            method: "GET",
            path: "/acme/widget/archive/v1.0.tar.gz",
            status: 200,
            bytes: 15_736,
            duration_ms: 0.199,
            ending: Ending::Complete,
            fault: None,
            error: "",
            cache: "hit",
            commit: "d09ef0477bd07b7eae1deee68c5f502d5e75a88b",
            format: "tar.gz",
            upstream: "-",
            attempts: "-",
        };
        let mut cases = vec![];
        cases.push(line.clone());
        line.level = Level::WARN;
        line.duration_ms = 12_345.0;
        line.ending = Ending::ClientGone;
        line.status = 499;
        cases.push(line.clone());
        line.level = Level::ERROR;
        line.duration_ms = 0.0;
        line.error = "git said \"no\"\n\tat C:\\path \u{1}é";
        line.fault = Some(Fault::Internal);
        line.attempts = "3";
        line.upstream = "http://127.0.0.1:9001";
        cases.push(line.clone());
        // Each level's line of the other tier too (the text format's head
        // is one piece per level and tier).
        for case in cases.clone() {
            cases.push(RequestLine {
                tier: Tier::Proxy,
                ..case
            });
        }
        // A proxy's line (no error, cache, commit or format: one piece in
        // the text format) with every ending and fault (one piece each).
        for ending in Ending::ALL {
            for fault in [
                None,
                Some(Fault::Client),
                Some(Fault::Upstream),
                Some(Fault::Internal),
            ] {
                cases.push(RequestLine {
                    tier: Tier::Proxy,
                    ending,
                    fault,
                    error: "",
                    cache: "-",
                    commit: "-",
                    format: "-",
                    upstream: "http://127.0.0.1:9001",
                    attempts: "1",
                    ..cases[0].clone()
                });
            }
        }
        // One of those four present, each in turn.
        for (index, value) in ["e", "hit", "d09ef04", "zip"].into_iter().enumerate() {
            let mut case = cases[cases.len() - 1].clone();
            *[
                &mut case.error,
                &mut case.cache,
                &mut case.commit,
                &mut case.format,
            ][index] = value;
            cases.push(case);
        }
        for case in &cases {
            for format in [LogFormat::Text, LogFormat::Json] {
                let expected = through_tracing(case, format);
                let written = direct(case, format);
                assert_eq!(
                    without_timestamp(&written),
                    without_timestamp(&expected),
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn a_client_string_cannot_start_a_text_line_or_pass_for_a_field() {
        let mut line = RequestLine {
            level: Level::WARN,
            tier: Tier::Proxy,
            request_id: "r1",
            method: "GET",
            path: "/a/b/archive/v1\u{2028}2026-12-05T00:00:00Z INFO x\nstatus=200 \"q\"\\.tar",
            status: 400,
            bytes: 0,
            duration_ms: 0.5,
            ending: Ending::Complete,
            fault: Some(Fault::Client),
            error: "token expired",
            cache: "-",
            commit: "-",
            format: "-",
            upstream: "-",
            attempts: "0",
        };
        let written = direct(&line, LogFormat::Text);
        assert_eq!(written.lines().count(), 1, "{written}");
        assert!(
            written.contains(
                r#" path="/a/b/archive/v1\u{2028}2026-12-05T00:00:00Z INFO x\nstatus=200 \"q\"\\.tar" status=400 "#
            ),
            "{written}"
        );
        assert!(written.contains(r#" error="token expired" "#), "{written}");
        // Plain values stay as they were; an empty one stays empty.
        line.error = "";
        line.path = "/a/b/archive/v1.tar";
        let written = direct(&line, LogFormat::Text);
        assert!(
            written.contains(" path=/a/b/archive/v1.tar status=400 "),
            "{written}"
        );
        assert!(written.contains(" error= cache=- "), "{written}");
        // JSON escapes by its own rules: the value is the string itself.
        line.path = "/a b";
        let json: serde_json::Value =
            serde_json::from_str(&direct(&line, LogFormat::Json)).unwrap();
        assert_eq!(json["path"], "/a b");
    }

    /// The word-at-a-time check says what the table says, for every byte
    /// at every place of a word and of the bytes after the last whole one.
    #[test]
    fn the_plain_check_agrees_with_the_table() {
        let by_table = |value: &[u8]| value.iter().all(|&byte| PLAIN[usize::from(byte)]);
        let base = b"abcdefghijklmnopqrstuvwxyz0123456789";
        for length in 0..=base.len() {
            assert!(is_plain(&base[..length]));
            for at in 0..length {
                for byte in 0..=255u8 {
                    let mut value = base[..length].to_vec();
                    value[at] = byte;
                    assert_eq!(
                        is_plain(&value),
                        by_table(&value),
                        "byte {byte:#04x} at {at} of {length}"
                    );
                }
            }
        }
        // Two odd bytes in one word, each next to a plain neighbour.
        for first in 0..=255u8 {
            for second in [0x00, 0x20, 0x21, b'"', b'=', b'\\', 0x7e, 0x7f, 0x80, 0xff] {
                let value = [b'a', first, b'b', b'c', b'd', b'e', second, b'f', b'g'];
                assert_eq!(
                    is_plain(&value),
                    by_table(&value),
                    "{first:#04x} {second:#04x}"
                );
            }
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let mut out = Vec::new();
        let at = std::time::UNIX_EPOCH + Duration::from_micros(951_782_400_123_456);
        write_timestamp(at, &mut out);
        assert_eq!(out, b"2000-02-29T00:00:00.123456Z");
        out.clear();
        // The same second again, from what the thread kept of it.
        write_timestamp(at + Duration::from_micros(876_000), &mut out);
        assert_eq!(out, b"2000-02-29T00:00:00.999456Z");
        out.clear();
        let at = std::time::UNIX_EPOCH + Duration::from_secs(1_764_729_387);
        write_timestamp(at, &mut out);
        assert_eq!(out, b"2025-12-03T02:36:27.000000Z");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(2_932_896), (9999, 12, 31));
    }

    /// The line's numbers are written digit by digit, byte for byte as
    /// `tracing_subscriber` writes them: `{:?}` of the duration in the text
    /// format, serde_json's for JSON, `Display` of the integers.
    #[test]
    fn numbers_are_written_as_debug_and_serde_json_write_them() {
        let mut micros: Vec<u64> = (0..20_000).collect();
        micros.extend((0..40).map(|shift| (1u64 << shift) + 7));
        micros.extend([999_999, 1_000_000, 86_400_000_000, 999_999_999_999]);
        for micros in micros {
            let milliseconds = micros as f64 / 1e3;
            let mut out = Vec::new();
            push_milliseconds(&mut out, milliseconds);
            let out = String::from_utf8(out).unwrap();
            assert_eq!(out, format!("{milliseconds:?}"), "{micros} µs");
            assert_eq!(
                out,
                serde_json::Value::from(milliseconds).to_string(),
                "{micros} µs"
            );
        }
        for odd in [0.1234, 1e-7, 3e20, 12_345.0] {
            let mut out = Vec::new();
            push_milliseconds(&mut out, odd);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{odd:?}"));
        }
        for value in [0, 7, 10, 499, 65_535, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(String::from_utf8(out).unwrap(), value.to_string());
        }
        // Written two digits at a time: every width the line uses, at each
        // digit count's edges.
        let edges = (0..20).flat_map(|power| {
            let at = 10u64.pow(power);
            [at - 1, at, at + 1, at.saturating_mul(5)]
        });
        for value in edges.chain([u64::MAX]) {
            for width in [1, 2, 3, 4, 6] {
                let mut out = Vec::new();
                push_padded(&mut out, value, width);
                assert_eq!(String::from_utf8(out).unwrap(), format!("{value:0width$}"));
            }
        }
    }

    /// The kept date and time are the second's own: written across a
    /// second, a day and a year boundary in steps shorter than a second,
    /// each timestamp is the one `write!` gives, on this thread and on one
    /// that kept another second meanwhile.
    #[test]
    fn kept_timestamps_change_with_the_second_and_the_day() {
        let expected = |at: std::time::SystemTime| {
            let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap();
            let seconds = since_epoch.as_secs();
            let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
            let of_day = seconds % 86_400;
            format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                of_day / 3600,
                of_day / 60 % 60,
                of_day % 60,
                since_epoch.subsec_micros()
            )
        };
        let written = |at| {
            let mut out = Vec::new();
            write_timestamp(at, &mut out);
            String::from_utf8(out).unwrap()
        };
        // 2025-12-31T23:59:58.5 to 2026-01-01T00:00:01.5.
        let start = std::time::UNIX_EPOCH + Duration::from_millis(1_767_225_598_500);
        for step in 0..3_000u64 {
            let at = start + Duration::from_micros(step * 1_000 + step % 7);
            assert_eq!(written(at), expected(at));
        }
        // Another thread keeps the next day's second; this one's is its own.
        let at = start + Duration::from_millis(1_500);
        assert_eq!(written(at), expected(at));
        let next_day = at + Duration::from_secs(86_400);
        let other = std::thread::spawn(move || written(next_day))
            .join()
            .unwrap();
        assert_eq!(other, expected(next_day));
        assert_eq!(written(at), expected(at));
        // Back a day on the same thread, same time of day.
        let day_before = at - Duration::from_secs(86_400);
        assert_eq!(written(day_before), expected(day_before));
    }

    /// A JSON value with nothing to escape is pushed as it is: byte for
    /// byte what serde_json writes, for every character class at the edge
    /// of the check (controls, space, `"`, `\\`, DEL, non-ASCII, U+2028).
    #[test]
    fn json_values_are_written_as_serde_json_writes_them() {
        let mut values: Vec<String> = (0u32..0x100)
            .chain([0x2028, 0x2029, 0xfffd, 0x1_f600])
            .filter_map(char::from_u32)
            .flat_map(|c| [c.to_string(), format!("/a{c}b"), format!("{c}{c}")])
            .collect();
        values.extend([String::new(), "/acme/widget/archive/v1.0.tar.gz".into()]);
        for value in values {
            let mut out = Vec::new();
            json_field(&mut out, "path", &value);
            let out = String::from_utf8(out).unwrap();
            let expected = format!(",\"path\":{}", serde_json::to_string(&value).unwrap());
            assert_eq!(out, expected, "{value:?}");
        }
    }

    /// docs/observability.md: the path is cut at 512 characters (not
    /// bytes). (Mutation review: this test compared with the constant
    /// itself, so any bound passed it.)
    #[test]
    fn long_paths_are_cut() {
        let logged = |path: &str| {
            RequestLog::new(Tier::Proxy, "id".into(), Method::GET, path, |_, _| {})
                .path
                .clone()
        };
        assert_eq!(logged(&"x".repeat(5000)), "x".repeat(512));
        assert_eq!(logged(&"x".repeat(512)), "x".repeat(512), "512 kept whole");
        assert_eq!(logged(&"é".repeat(600)), "é".repeat(512), "characters");
        // At the cut: 512 characters of more than 512 bytes are kept
        // whole, a 513th multi-byte character is not.
        let kept = format!("{}é€😀", "x".repeat(509));
        assert_eq!(logged(&kept), kept, "512 characters, 518 bytes");
        assert_eq!(logged(&format!("{kept}é")), kept, "513 characters");
        let short = format!("{}€", "x".repeat(510));
        assert_eq!(logged(&short), short, "511 characters, 513 bytes");
    }

    /// `docs/observability.md`'s request-log table names every field a
    /// line has and no other, and its
    /// `ending` and `fault` rows every value those fields take. (Docs
    /// review: nothing held the table to the code.)
    #[test]
    fn the_request_log_table_is_every_field_of_a_line() {
        let docs = include_str!("../../docs/observability.md");
        let section = &docs[docs.find("\n## Request log\n").expect("the section")..];
        let rows: Vec<(&str, &str)> = section
            .lines()
            .skip_while(|line| !line.starts_with("| field |"))
            .skip(2)
            .take_while(|line| line.starts_with("| `"))
            .filter_map(|line| {
                let (field, value) = line.trim_start_matches("| `").split_once("` | ")?;
                Some((field, value))
            })
            .collect();
        let line = captured(LogFormat::Json, || {
            let mut log = RequestLog::new(Tier::Proxy, "id".into(), Method::GET, "/", |_, _| {});
            log.status = Some(StatusCode::OK);
        });
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line.trim()).expect("a JSON line");
        let written: Vec<&str> = object
            .keys()
            .map(String::as_str)
            .filter(|key| !matches!(*key, "timestamp" | "level" | "target" | "message"))
            .collect();
        let documented: Vec<&str> = rows.iter().map(|(field, _)| *field).collect();
        let mut sorted_written = written.clone();
        let mut sorted_documented = documented.clone();
        sorted_written.sort_unstable();
        sorted_documented.sort_unstable();
        assert_eq!(
            sorted_written, sorted_documented,
            "fields written vs documented"
        );
        assert_eq!(object["message"], "request", "the message");
        let row = |field: &str| rows.iter().find(|(name, _)| *name == field).unwrap().1;
        for ending in Ending::ALL {
            let value = format!("`{}`", ending.as_str());
            assert!(
                row("ending").contains(&value),
                "ending {value} is not documented"
            );
        }
        for fault in [Fault::Client, Fault::Upstream, Fault::Internal] {
            let value = format!("`{}`", fault.as_str());
            assert!(
                row("fault").contains(&value),
                "fault {value} is not documented"
            );
        }
        for tier in [Tier::Archiver, Tier::Proxy] {
            let value = format!("`{}`", tier.as_str());
            assert!(
                row("tier").contains(&value),
                "tier {value} is not documented"
            );
        }
        assert!(
            row("path").contains(&format!("cut at {MAX_LOGGED_PATH_CHARS} characters")),
            "the path's bound"
        );
    }
}
