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

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

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
    let writer = match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => BoxMakeWriter::new(Arc::new(std::fs::File::from(fd))),
        // No fd left at start-up: the locked stderr still works.
        Err(_) => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // A second call (tests, embedded mode) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Complete => "complete",
            Ending::ClientGone => "client_gone",
            Ending::IdleTimeout => "idle_timeout",
            Ending::Aborted => "aborted",
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
            path: path.chars().take(MAX_LOGGED_PATH_CHARS).collect(),
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
            ending: self.ending.unwrap_or(if self.status.is_some() {
                Ending::Complete
            } else {
                Ending::ClientGone
            }),
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
        let tier = self.tier.as_str();
        let duration_ms = (duration.as_secs_f64() * 1e6).round() / 1e3;
        let fault = self.fault.map_or("-", Fault::as_str);
        let error = self.error.as_deref().unwrap_or("");
        let cache = self.cache.unwrap_or("-");
        let commit = self.commit.as_deref().unwrap_or("-");
        let format = self.format.unwrap_or("-");
        let upstream = self.upstream.as_deref().unwrap_or("-");
        let attempts = self
            .attempts
            .map_or_else(|| "-".to_owned(), |attempts| attempts.to_string());
        let ending = ending.as_str();
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    tier = %tier,
                    request_id = %self.request_id,
                    method = %self.method,
                    path = %self.path,
                    status,
                    bytes = self.bytes,
                    duration_ms,
                    ending = %ending,
                    fault = %fault,
                    error = %error,
                    cache = %cache,
                    commit = %commit,
                    format = %format,
                    upstream = %upstream,
                    attempts = %attempts,
                    "request"
                )
            };
        }
        if self.fault == Some(Fault::Internal) {
            line!(error);
        } else if ending != Ending::Complete.as_str() || self.fault == Some(Fault::Upstream) {
            line!(warn);
        } else {
            line!(info);
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

    #[test]
    fn long_paths_are_cut() {
        let log = RequestLog::new(
            Tier::Proxy,
            "id".into(),
            Method::GET,
            &"x".repeat(5000),
            |_, _| {},
        );
        assert_eq!(log.path.len(), MAX_LOGGED_PATH_CHARS);
    }
}
