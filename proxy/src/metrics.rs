//! The proxy's Prometheus series (`docs/observability.md#metrics`).
//!
//! Recording goes through the process-global `metrics` recorder that
//! `gitball_core::metrics::install` sets up (histogram buckets, process
//! series); in embedded mode the in-process archiver's series land in the
//! same registry, so the proxy's `/metrics` shows both tiers. Every series
//! name is written once, here, and every family gets its `# HELP` line
//! from [`register`]. Unlabelled series are created at start-up (counters at
//! 0) so dashboards and alerts see them before the first event; labelled ones
//! appear with their first event, except `upstream_ejected`, which is set to
//! 0 for every upstream of a newly loaded routing table.

use std::sync::Arc;

use gitball_core::log::{Ending, Finished, RequestLog};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
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
        "Downloads aborted because the upstream failed mid-body."
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
    counter!(UPSTREAM_ABORTS_TOTAL).absolute(0);
    gauge!(ACTIVE_DOWNLOADS).set(0.0);
}

/// The request log's hook: a request finished (its body ended, one way or
/// another, or its client left before the answer: `499`).
pub fn request_finished(_: &RequestLog, finished: &Finished) {
    counter!(REQUESTS_TOTAL, "code" => finished.status.to_string()).increment(1);
    histogram!(REQUEST_DURATION_SECONDS).record(finished.duration.as_secs_f64());
    if finished.ending == Ending::ClientGone {
        counter!(CLIENT_DISCONNECTS_TOTAL).increment(1);
    }
}

/// One attempt at an upstream ended with `outcome` (see `forward::Outcome`).
pub fn upstream_attempt(upstream: &str, outcome: &'static str) {
    counter!(
        UPSTREAM_ATTEMPTS_TOTAL,
        "upstream" => upstream.to_owned(),
        "outcome" => outcome
    )
    .increment(1);
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
/// (unless already ejected, which a reload does not change).
pub fn upstreams_known(upstreams: &[Arc<str>]) {
    for upstream in upstreams {
        // `increment(0.0)` creates the series at 0 without overwriting a 1.
        gauge!(UPSTREAM_EJECTED, "upstream" => upstream.to_string()).increment(0.0);
    }
}

pub fn routes_reloaded(outcome: &'static str) {
    counter!(ROUTES_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}

pub fn sent_bytes(bytes: u64) {
    counter!(SENT_BYTES_TOTAL).increment(bytes);
}

pub fn client_idle_timeout() {
    counter!(CLIENT_IDLE_TIMEOUTS_TOTAL).increment(1);
}

pub fn upstream_abort() {
    counter!(UPSTREAM_ABORTS_TOTAL).increment(1);
}

/// Holds one unit of `gitball_proxy_active_downloads` for as long as it
/// lives: a download that ends at any point, by any path, gives it back.
#[derive(Debug)]
pub struct ActiveDownload(());

impl ActiveDownload {
    pub fn start() -> ActiveDownload {
        gauge!(ACTIVE_DOWNLOADS).increment(1.0);
        ActiveDownload(())
    }
}

impl Drop for ActiveDownload {
    fn drop(&mut self) {
        gauge!(ACTIVE_DOWNLOADS).decrement(1.0);
    }
}
