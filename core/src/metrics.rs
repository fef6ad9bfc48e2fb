//! The process-global Prometheus recorder, through the `metrics` facade and
//! `metrics-exporter-prometheus`, rendered by each tier's `/metrics`.
//!
//! The recorder is installed once ([`install`]), so embedded mode (proxy
//! and archiver in one process) exports both tiers' families from one
//! registry. Each tier names and describes its own series in its `metrics`
//! module (`docs/observability.md#metrics`); this module adds the shared
//! histogram buckets and the `process_*` series.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Renders the text exposition, refreshing the `process_*` series first.
pub fn render(handle: &PrometheusHandle) -> String {
    if let Some(process) = PROCESS.get() {
        process.collect();
    }
    handle.render()
}
