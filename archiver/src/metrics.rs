//! Prometheus metrics (SPEC §6), through the `metrics` facade and
//! `metrics-exporter-prometheus`, rendered by the `/metrics` route.
//!
//! The recorder is process-global and installed once ([`install`]), so the
//! proxy's embedded mode (proxy and archiver in one process) exports both
//! families from one registry. Unlabelled series are registered at start-up
//! with value 0 ([`describe_archiver`]), so a dashboard sees them before the
//! first event; labelled ones appear with their first event.

use std::sync::OnceLock;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_TOTAL: &str = "gitball_archiver_requests_total";
pub const REQUEST_DURATION: &str = "gitball_archiver_request_duration_seconds";
pub const GENERATIONS_TOTAL: &str = "gitball_archiver_generations_total";
pub const GENERATION_DURATION: &str = "gitball_archiver_generation_duration_seconds";
pub const GENERATIONS_IN_FLIGHT: &str = "gitball_archiver_generations_in_flight";
pub const GENERATIONS_QUEUED: &str = "gitball_archiver_generations_queued";
pub const CACHE_BYTES: &str = "gitball_archiver_cache_bytes";
pub const CACHE_HELD_BYTES: &str = "gitball_archiver_cache_held_bytes";
pub const CACHE_MAX_BYTES: &str = "gitball_archiver_cache_max_bytes";
pub const CACHE_ENTRIES: &str = "gitball_archiver_cache_entries";
pub const CACHE_EVICTIONS_TOTAL: &str = "gitball_archiver_cache_evictions_total";
pub const ACTIVE_DOWNLOADS: &str = "gitball_archiver_active_downloads";
pub const SENT_BYTES_TOTAL: &str = "gitball_archiver_sent_bytes_total";
pub const CLIENT_DISCONNECTS_TOTAL: &str = "gitball_archiver_client_disconnects_total";

/// Latency buckets, in seconds, for every `*_duration_seconds` histogram:
/// from a cache hit's first byte to a ten-minute generation.
const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the global recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    DURATION_BUCKETS_SECONDS,
                )
                // The bucket list is a non-empty constant: this cannot fail.
                .expect("non-empty bucket list")
                .install_recorder()
                // Only fails when another recorder was installed first, which
                // nothing in gitball does.
                .expect("no other metrics recorder is installed");
            let process = metrics_process::Collector::default();
            process.describe();
            process.collect();
            let _ = PROCESS.set(process);
            handle
        })
        .clone()
}

/// Renders the text exposition, refreshing the process_* series first.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.render()
}

/// Describes every archiver family and registers the unlabelled ones at 0.
pub fn describe_archiver(cache_max_bytes: u64) {
    describe_counter!(
        REQUESTS_TOTAL,
        "Archive requests answered, by format, cache result (hit, miss, join, none) and status code."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to the end of the response body."
    );
    describe_counter!(
        GENERATIONS_TOTAL,
        "git archive generations finished, by format and outcome (ok, failed, timeout, too_large)."
    );
    describe_histogram!(
        GENERATION_DURATION,
        Unit::Seconds,
        "Time from a generation's start (after the queue) to its end."
    );
    describe_gauge!(GENERATIONS_IN_FLIGHT, "git archive children running now.");
    describe_gauge!(
        GENERATIONS_QUEUED,
        "Generations waiting for a slot (--max-generations)."
    );
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes in the cache: complete archives plus in-progress files."
    );
    describe_gauge!(
        CACHE_HELD_BYTES,
        Unit::Bytes,
        "Bytes of evicted files still held open by readers (tmpfs space not yet freed)."
    );
    describe_gauge!(
        CACHE_MAX_BYTES,
        Unit::Bytes,
        "The cache's bound (--cache-max-bytes)."
    );
    describe_gauge!(CACHE_ENTRIES, "Complete archives in the cache.");
    describe_counter!(
        CACHE_EVICTIONS_TOTAL,
        "Complete archives evicted to stay under the bound."
    );
    describe_gauge!(ACTIVE_DOWNLOADS, "Archive bodies being sent now.");
    describe_counter!(
        SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Archive body bytes sent to clients."
    );
    describe_counter!(
        CLIENT_DISCONNECTS_TOTAL,
        "Downloads that ended because the client went away before the end."
    );

    let _ = histogram!(REQUEST_DURATION);
    gauge!(GENERATIONS_IN_FLIGHT).set(0.0);
    gauge!(GENERATIONS_QUEUED).set(0.0);
    gauge!(CACHE_BYTES).set(0.0);
    gauge!(CACHE_HELD_BYTES).set(0.0);
    gauge!(CACHE_MAX_BYTES).set(cache_max_bytes as f64);
    gauge!(CACHE_ENTRIES).set(0.0);
    counter!(CACHE_EVICTIONS_TOTAL).absolute(0);
    gauge!(ACTIVE_DOWNLOADS).set(0.0);
    counter!(SENT_BYTES_TOTAL).absolute(0);
    counter!(CLIENT_DISCONNECTS_TOTAL).absolute(0);
}
