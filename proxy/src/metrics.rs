//! The proxy's Prometheus series (`docs/observability.md#metrics`).
//!
//! Recording goes through the process-global `metrics` recorder that
//! `gitball_core::metrics::install` sets up (histogram buckets, process
//! series); in embedded mode the in-process archiver's series land in the
//! same registry, so the proxy's `/metrics` shows both tiers. Every series
//! name is written once, here, and every family gets its `# HELP` line
//! from [`register`]. Every series whose labels are all closed sets
//! (statuses, outcomes) is created at start-up, counters at 0, so
//! dashboards and alerts see it before the first event, and `increase()`
//! counts that event. Those labelled by upstream are made for every
//! upstream of a newly loaded routing table: one series each of
//! `upstream_ejected`, `upstream_aborts_total` and
//! `upstream_attempts_total{outcome="too_many_connections"}`, not every
//! outcome of every upstream (`docs/observability.md#series-at-start-up`).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gitball_core::log::{Ending, Finished, RequestLog};
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

const REQUESTS_TOTAL: &str = "gitball_proxy_requests_total";
const REQUEST_DURATION_SECONDS: &str = "gitball_proxy_request_duration_seconds";
const UPSTREAM_ATTEMPTS_TOTAL: &str = "gitball_proxy_upstream_attempts_total";
const FAILOVERS_TOTAL: &str = "gitball_proxy_failovers_total";
const UPSTREAM_EJECTED: &str = "gitball_proxy_upstream_ejected";
const ACTIVE_DOWNLOADS: &str = "gitball_proxy_active_downloads";
const SENT_BYTES_TOTAL: &str = "gitball_proxy_sent_bytes_total";
const CLIENT_DISCONNECTS_TOTAL: &str = "gitball_proxy_client_disconnects_total";
const CLIENT_IDLE_TIMEOUTS_TOTAL: &str = "gitball_proxy_client_idle_timeouts_total";
const UPSTREAM_ABORTS_TOTAL: &str = "gitball_proxy_upstream_aborts_total";
const ROUTES_RELOADS_TOTAL: &str = "gitball_proxy_routes_reloads_total";
const PARKED_DOWNLOADS: &str = "gitball_proxy_parked_downloads";
const RESUMES_TOTAL: &str = "gitball_proxy_resumes_total";
const SPLICES_TOTAL: &str = "gitball_proxy_splices_total";

/// Every status the proxy sends (`requests_total{code}`): its own answers
/// (`docs/proxy.md`), those it passes on from an archiver (the archiver's
/// own list, `gitball_archiver::metrics::REQUEST_LABELS`), and `499`.
const REQUEST_CODES: [u16; 15] = [
    200, 202, 206, 304, 400, 401, 404, 405, 416, 429, 499, 500, 502, 503, 504,
];

/// Every `outcome` of `routes_reloads_total`.
const RELOAD_OUTCOMES: [&str; 2] = ["ok", "error"];

/// Set by [`register`]: the recorder is installed, so handles taken from
/// now on record into it and may be kept.
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Handles of the series every request records, kept per serving thread.
/// Each `counter!`/`gauge!`/`histogram!` call builds its key (allocating a
/// label's text), hashes it and looks it up in the shared registry: six of
/// them per small cache hit were about 3 % of the proxy's CPU. A handle
/// records into the same atomic as the macro would, so the series read the
/// same. Labelled handles are per label value (status codes, upstreams ×
/// outcomes: bounded by the routing table): status codes and outcomes in
/// lists searched in order, a few entries each, where a `HashMap`'s SipHash
/// of the key (two per attempt, one per request) cost a small hit about
/// 500 instructions; upstreams, which may be hundreds, by a fast hash.
#[derive(Default)]
struct Handles {
    requests: Vec<(u16, Counter)>,
    attempts: Vec<(&'static str, ByUpstream)>,
    duration: Option<Histogram>,
    disconnects: Option<Counter>,
    sent_bytes: Option<Counter>,
    active_downloads: Option<Gauge>,
}

/// One outcome's attempt counters, by upstream: hashed, fast (a fleet of
/// hundreds of archivers; searched in order, 300 of them cost an attempt
/// about 600 ns).
type ByUpstream = std::collections::HashMap<Box<str>, Counter, foldhash::fast::RandomState>;

thread_local! {
    static HANDLES: RefCell<Option<Handles>> = const { RefCell::new(None) };
}

/// Runs `keep` with this thread's handles, or returns `None` before
/// [`register`] (a handle taken then would be a no-op forever). The
/// accessors below fall back to a handle of the moment then.
fn with_handles<R>(keep: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    if !REGISTERED.load(Ordering::Relaxed) {
        return None;
    }
    HANDLES
        .try_with(|handles| {
            let mut handles = handles.try_borrow_mut().ok()?;
            Some(keep(handles.get_or_insert_with(Handles::default)))
        })
        .ok()
        .flatten()
}

fn requests(status: u16) -> Counter {
    let make = || counter!(REQUESTS_TOTAL, "code" => status.to_string());
    with_handles(|kept| {
        if let Some((_, requests)) = kept.requests.iter().find(|(code, _)| *code == status) {
            return requests.clone();
        }
        let requests = make();
        kept.requests.push((status, requests.clone()));
        requests
    })
    .unwrap_or_else(make)
}

fn attempts(upstream: &str, outcome: &'static str) -> Counter {
    let make = || {
        counter!(
            UPSTREAM_ATTEMPTS_TOTAL,
            "upstream" => upstream.to_owned(),
            "outcome" => outcome
        )
    };
    with_handles(|kept| {
        let index = match kept.attempts.iter().position(|(kept, _)| *kept == outcome) {
            Some(index) => index,
            None => {
                kept.attempts.push((outcome, ByUpstream::default()));
                kept.attempts.len() - 1
            }
        };
        let by_upstream = &mut kept.attempts[index].1;
        if let Some(attempts) = by_upstream.get(upstream) {
            return attempts.clone();
        }
        let attempts = make();
        by_upstream.insert(upstream.into(), attempts.clone());
        attempts
    })
    .unwrap_or_else(make)
}

fn duration() -> Histogram {
    let make = || histogram!(REQUEST_DURATION_SECONDS);
    with_handles(|kept| kept.duration.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

fn disconnects() -> Counter {
    let make = || counter!(CLIENT_DISCONNECTS_TOTAL);
    with_handles(|kept| kept.disconnects.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

fn sent_bytes_counter() -> Counter {
    let make = || counter!(SENT_BYTES_TOTAL);
    with_handles(|kept| kept.sent_bytes.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

fn active_downloads() -> Gauge {
    let make = || gauge!(ACTIVE_DOWNLOADS);
    with_handles(|kept| kept.active_downloads.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

/// Describes every family and creates the unlabelled series at 0. Call once
/// after the recorder is installed.
pub fn register() {
    describe_counter!(REQUESTS_TOTAL, "Requests answered, by HTTP status code.");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from request to the last body byte handed to the client connection."
    );
    describe_counter!(
        UPSTREAM_ATTEMPTS_TOTAL,
        "Attempts to get response headers from an upstream, by outcome."
    );
    describe_counter!(
        FAILOVERS_TOTAL,
        "Times a request moved on to its next upstream candidate."
    );
    describe_gauge!(
        UPSTREAM_EJECTED,
        "1 while an upstream is ejected (tried last after a failure), else 0."
    );
    describe_gauge!(
        ACTIVE_DOWNLOADS,
        "Response bodies being piped from an upstream to a client now."
    );
    describe_counter!(
        SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Body bytes handed to client connections."
    );
    describe_counter!(
        CLIENT_DISCONNECTS_TOTAL,
        "Requests whose client went away before the response body ended (or before it began)."
    );
    describe_counter!(
        CLIENT_IDLE_TIMEOUTS_TOTAL,
        "Downloads ended because the client took no bytes for --client-idle-timeout."
    );
    describe_counter!(
        UPSTREAM_ABORTS_TOTAL,
        "Downloads aborted because the upstream failed mid-body, by the upstream the download was from."
    );
    describe_gauge!(
        PARKED_DOWNLOADS,
        "Downloads whose client took no bytes for --park-after: their upstream is released until the client reads again."
    );
    describe_counter!(
        RESUMES_TOTAL,
        "Parked downloads that asked an upstream for the rest, by outcome (resumed, failed: the download was aborted)."
    );
    describe_counter!(
        SPLICES_TOTAL,
        "Fast downloads whose rest was to be spliced from socket to socket, by outcome (spliced, declined: piped on, copied: a parked spliced download resumed with no place free)."
    );
    describe_counter!(
        ROUTES_RELOADS_TOTAL,
        "Routing table reloads (SIGHUP), by outcome (ok, error)."
    );

    // Touching a series creates it. `absolute(0)` rather than
    // `increment(0)` reads as "exists at zero" and is equally harmless.
    let _ = histogram!(REQUEST_DURATION_SECONDS);
    counter!(FAILOVERS_TOTAL).absolute(0);
    counter!(SENT_BYTES_TOTAL).absolute(0);
    counter!(CLIENT_DISCONNECTS_TOTAL).absolute(0);
    counter!(CLIENT_IDLE_TIMEOUTS_TOTAL).absolute(0);
    gauge!(ACTIVE_DOWNLOADS).set(0.0);
    gauge!(PARKED_DOWNLOADS).set(0.0);
    for code in REQUEST_CODES {
        requests(code).absolute(0);
    }
    for outcome in ["resumed", "failed"] {
        counter!(RESUMES_TOTAL, "outcome" => outcome).absolute(0);
    }
    for outcome in ["spliced", "declined", "copied"] {
        counter!(SPLICES_TOTAL, "outcome" => outcome).absolute(0);
    }
    REGISTERED.store(true, Ordering::Relaxed);
}

/// The request log's hook: a request finished (its body ended, one way or
/// another, or its client left before the answer: `499`).
pub fn request_finished(_: &RequestLog, finished: &Finished) {
    requests(finished.status).increment(1);
    duration().record(finished.duration.as_secs_f64());
    if finished.ending == Ending::ClientGone {
        disconnects().increment(1);
    }
}

/// One attempt at an upstream ended with `outcome` (see `forward::Outcome`).
pub fn upstream_attempt(upstream: &str, outcome: &'static str) {
    attempts(upstream, outcome).increment(1);
}

pub fn failover() {
    counter!(FAILOVERS_TOTAL).increment(1);
}

pub fn upstream_ejected(upstream: &str, ejected: bool) {
    gauge!(UPSTREAM_EJECTED, "upstream" => upstream.to_owned()).set(if ejected {
        1.0
    } else {
        0.0
    });
}

/// A routing table was loaded: its upstreams' ejection gauges start at 0
/// (unless already ejected, which a reload does not change), and the
/// counters an alert reads with `increase()` exist at 0, which cannot see
/// the event a series is born with (an archiver's first refusal of this
/// proxy read as none).
pub fn upstreams_known(upstreams: &[Arc<str>]) {
    for upstream in upstreams {
        // `increment(0.0)` creates the series at 0 without overwriting a 1.
        gauge!(UPSTREAM_EJECTED, "upstream" => upstream.to_string()).increment(0.0);
        counter!(UPSTREAM_ABORTS_TOTAL, "upstream" => upstream.to_string()).increment(0);
        attempts(upstream, "too_many_connections").increment(0);
    }
}

/// A routing table was loaded from a file, which a reload reads again:
/// `routes_reloads_total` exists at 0 for each outcome. (Embedded mode has
/// no file, and no such series.)
pub fn routes_reloadable() {
    for outcome in RELOAD_OUTCOMES {
        counter!(ROUTES_RELOADS_TOTAL, "outcome" => outcome).increment(0);
    }
}

pub fn routes_reloaded(outcome: &'static str) {
    counter!(ROUTES_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn sent_bytes(bytes: u64) {
    sent_bytes_counter().increment(bytes);
}

pub fn client_idle_timeout() {
    counter!(CLIENT_IDLE_TIMEOUTS_TOTAL).increment(1);
}

pub fn upstream_abort(upstream: &str) {
    counter!(UPSTREAM_ABORTS_TOTAL, "upstream" => upstream.to_owned()).increment(1);
}

/// A download was parked (`1`) or is no longer (`-1`).
pub fn parked_downloads(delta: f64) {
    gauge!(PARKED_DOWNLOADS).increment(delta);
}

/// A parked download's resume ended with `outcome` (`resumed`, `failed`).
pub fn resume(outcome: &'static str) {
    counter!(RESUMES_TOTAL, "outcome" => outcome).increment(1);
}

/// A fast download's splice ended with `outcome` (`spliced`, `declined`),
/// or a parked spliced download resumed `copied`.
pub fn splice(outcome: &'static str) {
    counter!(SPLICES_TOTAL, "outcome" => outcome).increment(1);
}

/// Holds one unit of `gitball_proxy_active_downloads` for as long as it
/// lives: a download that ends at any point, by any path, gives it back.
#[derive(Debug)]
pub struct ActiveDownload(());

impl ActiveDownload {
    pub fn start() -> ActiveDownload {
        active_downloads().increment(1.0);
        ActiveDownload(())
    }
}

impl Drop for ActiveDownload {
    fn drop(&mut self) {
        active_downloads().decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_handles_count_into_the_series_the_macros_name() {
        let handle = gitball_core::metrics::install();
        register();
        let upstream = "http://kept-handles.test:1";
        upstream_attempt(upstream, "ok");
        upstream_attempt(upstream, "ok");
        upstream_attempt(upstream, "connect_error");
        // Another serving thread keeps handles of its own: same series.
        std::thread::spawn(move || upstream_attempt(upstream, "ok"))
            .join()
            .unwrap();
        let text = handle.render();
        for line in [
            format!("{UPSTREAM_ATTEMPTS_TOTAL}{{upstream=\"{upstream}\",outcome=\"ok\"}} 3"),
            format!(
                "{UPSTREAM_ATTEMPTS_TOTAL}{{upstream=\"{upstream}\",outcome=\"connect_error\"}} 1"
            ),
        ] {
            assert!(
                text.lines().any(|got| got == line),
                "{line} not in:\n{text}"
            );
        }
    }
}
