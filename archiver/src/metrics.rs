//! The archiver's Prometheus series (`docs/observability.md#metrics`),
//! recorded through the process-global recorder of `gitball_core::metrics`.
//!
//! Every series name is written once, here. Every counter is registered at
//! start-up at 0 ([`describe`]), for every label set it can count: its
//! labels are all closed sets (formats, outcomes, cache results, the
//! statuses the archiver sends). So a dashboard sees each before its first
//! event, and `increase()` and `rate()` count that event, which they cannot
//! for a series born with it (a first failure read as no failure).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use gitball_core::log::{Ending, Finished, RequestLog};
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

pub const REQUESTS_TOTAL: &str = "gitball_archiver_requests_total";
pub const REQUEST_DURATION: &str = "gitball_archiver_request_duration_seconds";
pub const GENERATIONS_TOTAL: &str = "gitball_archiver_generations_total";
pub const GENERATION_DURATION: &str = "gitball_archiver_generation_duration_seconds";
pub const GENERATIONS_IN_FLIGHT: &str = "gitball_archiver_generations_in_flight";
pub const GENERATIONS_QUEUED: &str = "gitball_archiver_generations_queued";
pub const GENERATIONS_QUEUED_CLIENTS: &str = "gitball_archiver_generations_queued_clients";
pub const GENERATIONS_ABANDONED_TOTAL: &str = "gitball_archiver_generations_abandoned_total";
pub const CACHE_BYTES: &str = "gitball_archiver_cache_bytes";
pub const CACHE_HELD_BYTES: &str = "gitball_archiver_cache_held_bytes";
pub const CACHE_MAX_BYTES: &str = "gitball_archiver_cache_max_bytes";
pub const CACHE_ENTRIES: &str = "gitball_archiver_cache_entries";
pub const CACHE_FILESYSTEM_SIZE_BYTES: &str = "gitball_archiver_cache_filesystem_size_bytes";
pub const CACHE_FILESYSTEM_FREE_BYTES: &str = "gitball_archiver_cache_filesystem_free_bytes";
pub const CACHE_EVICTIONS_TOTAL: &str = "gitball_archiver_cache_evictions_total";
pub const CACHE_PROTECTED_BYTES: &str = "gitball_archiver_cache_protected_bytes";
pub const CACHE_ADMISSION_REJECTIONS_TOTAL: &str =
    "gitball_archiver_cache_admission_rejections_total";
pub const ACTIVE_DOWNLOADS: &str = "gitball_archiver_active_downloads";
pub const SENT_BYTES_TOTAL: &str = "gitball_archiver_sent_bytes_total";
pub const CLIENT_DISCONNECTS_TOTAL: &str = "gitball_archiver_client_disconnects_total";
pub const BUDGET_RATE: &str = "gitball_archiver_budget_rate";
pub const BUDGET_BURST: &str = "gitball_archiver_budget_burst";
pub const BUDGET_CLIENTS: &str = "gitball_archiver_budget_clients";
pub const BUDGET_MAX_CLIENTS: &str = "gitball_archiver_budget_max_clients";
pub const BUDGET_TAKEN_TOTAL: &str = "gitball_archiver_budget_taken_total";
pub const BUDGET_REJECTED_TOTAL: &str = "gitball_archiver_budget_rejected_total";
pub const TAR_WRITER_INFO: &str = "gitball_archiver_tar_writer_info";

/// Every `outcome` of `generations_total` (`generate::Failure::outcome`,
/// and `ok`).
pub const GENERATION_OUTCOMES: [&str; 5] = ["ok", "failed", "timeout", "too_large", "refs_changed"];

/// Every `cache` and `code` a request for an archive of a format can be
/// counted with in `requests_total` (`docs/observability.md#label-values`):
/// a lookup's answer (the archive, its range, a range past its end, a
/// failure of the archive, a `503` for its generation), and the answers
/// given before a lookup (`none`: a `304`, the request's own errors, a
/// spent budget, a shutdown). `499` with each: the client left.
pub const REQUEST_LABELS: [(&str, &[u16]); 4] = [
    ("hit", &[200, 206, 416, 499, 500]),
    ("miss", &[200, 206, 416, 499, 500, 503]),
    ("join", &[200, 206, 416, 499, 500, 503]),
    ("none", &[304, 400, 401, 404, 405, 429, 499, 500, 503]),
];

/// The same for a request whose path names no format (`format="none"`): a
/// URL that did not parse, or a prewarm, whose `202` is its only answer
/// after its lookups.
pub const REQUEST_LABELS_WITHOUT_FORMAT: [(&str, &[u16]); 2] = [
    ("none", &[400, 401, 404, 405, 429, 499, 500, 503]),
    ("prewarm", &[202]),
];

/// Describes every archiver family and registers the unlabelled ones at 0.
pub fn describe(cache_max_bytes: u64, budget_max_clients: usize) {
    describe_counter!(
        REQUESTS_TOTAL,
        "Archive requests, by format, cache result (hit, miss, join, prewarm, none) and status code (499: the client left before the answer)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from request to the end of the response body."
    );
    describe_counter!(
        GENERATIONS_TOTAL,
        "git archive generations finished, by format and outcome (ok, failed, timeout, too_large, refs_changed)."
    );
    describe_histogram!(
        GENERATION_DURATION,
        Unit::Seconds,
        "Time from a generation's start (after the queue) to its end."
    );
    describe_gauge!(
        GENERATIONS_IN_FLIGHT,
        "Generations running now, each in one of the --max-generations slots (a canary a request runs after git was replaced is not counted)."
    );
    describe_gauge!(
        TAR_WRITER_INFO,
        "1 for the canary fingerprint (tar/export-subst) of the git generations run now, reference/reference for git 2.47.3's bytes; 0 for one replaced since."
    );
    describe_gauge!(
        GENERATIONS_QUEUED,
        "Generations waiting for a slot (--max-generations)."
    );
    describe_gauge!(
        GENERATIONS_QUEUED_CLIENTS,
        "Clients with a generation waiting for a slot; slots go to them in turn."
    );
    describe_counter!(
        GENERATIONS_ABANDONED_TOTAL,
        "Generations that left the queue before their slot because every request waiting for them had left; git never ran for them."
    );
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes in the cache: complete archives plus in-progress files."
    );
    describe_gauge!(
        CACHE_HELD_BYTES,
        Unit::Bytes,
        "Bytes of evicted files and failed generations' partial files still held open by readers or by the archiver's writer (tmpfs space not yet freed)."
    );
    describe_gauge!(
        CACHE_MAX_BYTES,
        Unit::Bytes,
        "The cache's bound (--cache-max-bytes)."
    );
    describe_gauge!(CACHE_ENTRIES, "Complete archives in the cache.");
    describe_gauge!(
        CACHE_FILESYSTEM_SIZE_BYTES,
        Unit::Bytes,
        "Size of the cache dir's filesystem (statvfs), refreshed every 5 s: what the cache, held bytes and git dirs share, whatever --cache-max-bytes says."
    );
    describe_gauge!(
        CACHE_FILESYSTEM_FREE_BYTES,
        Unit::Bytes,
        "Bytes free on the cache dir's filesystem for the archiver (statvfs), refreshed every 5 s."
    );
    describe_counter!(
        CACHE_EVICTIONS_TOTAL,
        "Complete archives evicted to stay under the bound."
    );
    describe_gauge!(
        CACHE_PROTECTED_BYTES,
        Unit::Bytes,
        "Bytes of complete archives in the protected segment (hit since they were cached, or requested at least twice)."
    );
    describe_counter!(
        CACHE_ADMISSION_REJECTIONS_TOTAL,
        "Generations denied room because the archives they would evict are requested more often (they fail as too large)."
    );
    describe_gauge!(ACTIVE_DOWNLOADS, "Archive bodies being sent now.");
    describe_counter!(
        SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Archive body bytes sent to clients."
    );
    describe_counter!(
        CLIENT_DISCONNECTS_TOTAL,
        "Requests whose client went away before the response body ended (or before it began)."
    );

    describe_gauge!(
        BUDGET_RATE,
        "Cold generations per second each client may start (--client-cold-rate; 0: no budget)."
    );
    describe_gauge!(
        BUDGET_BURST,
        "Cold generations a client may start at once (--client-cold-burst; 0 when there is no budget)."
    );
    describe_gauge!(
        BUDGET_CLIENTS,
        "Clients whose crawler budget is tracked now (at most --client-cold-max-clients)."
    );
    describe_gauge!(
        BUDGET_MAX_CLIENTS,
        "The bound on tracked clients (--client-cold-max-clients)."
    );
    describe_counter!(
        BUDGET_TAKEN_TOTAL,
        "Tokens taken by requests that could start a generation, read a new commit or looked for a new ?path= (one given back for a hit or a join is still counted)."
    );
    describe_counter!(
        BUDGET_REJECTED_TOTAL,
        "Requests refused with 429 because their client's budget of cold work (generations, new commits and ?path= looks) was spent."
    );

    let _ = histogram!(REQUEST_DURATION);
    gauge!(GENERATIONS_IN_FLIGHT).set(0.0);
    gauge!(GENERATIONS_QUEUED).set(0.0);
    gauge!(GENERATIONS_QUEUED_CLIENTS).set(0.0);
    counter!(GENERATIONS_ABANDONED_TOTAL).absolute(0);
    let by_format = gitball_core::url::Format::ALL
        .into_iter()
        .map(|format| (format.metric_label(), REQUEST_LABELS.as_slice()));
    for (format, labels) in by_format.chain([("none", REQUEST_LABELS_WITHOUT_FORMAT.as_slice())]) {
        for (cache, codes) in labels {
            for code in *codes {
                // Labels in `request_finished`'s order: the same series.
                counter!(
                    REQUESTS_TOTAL,
                    "format" => format,
                    "cache" => *cache,
                    "code" => code.to_string()
                )
                .absolute(0);
            }
        }
    }
    for format in gitball_core::url::Format::ALL {
        // Empty, so a format's duration panels and alerts see 0
        // observations rather than no data before its first generation.
        let _ = histogram!(GENERATION_DURATION, "format" => format.metric_label());
        for outcome in GENERATION_OUTCOMES {
            counter!(GENERATIONS_TOTAL, "format" => format.metric_label(), "outcome" => outcome)
                .absolute(0);
        }
    }
    gauge!(CACHE_BYTES).set(0.0);
    gauge!(CACHE_HELD_BYTES).set(0.0);
    gauge!(CACHE_MAX_BYTES).set(cache_max_bytes as f64);
    gauge!(CACHE_ENTRIES).set(0.0);
    counter!(CACHE_EVICTIONS_TOTAL).absolute(0);
    gauge!(CACHE_PROTECTED_BYTES).set(0.0);
    counter!(CACHE_ADMISSION_REJECTIONS_TOTAL).absolute(0);
    gauge!(ACTIVE_DOWNLOADS).set(0.0);
    counter!(SENT_BYTES_TOTAL).absolute(0);
    counter!(CLIENT_DISCONNECTS_TOTAL).absolute(0);
    gauge!(BUDGET_CLIENTS).set(0.0);
    gauge!(BUDGET_MAX_CLIENTS).set(budget_max_clients as f64);
    counter!(BUDGET_TAKEN_TOTAL).absolute(0);
    counter!(BUDGET_REJECTED_TOTAL).absolute(0);
    REGISTERED.store(true, Ordering::Relaxed);
}

/// Set once [`describe`] ran, i.e. after the recorder was installed: a
/// handle taken before would record nowhere, forever.
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// The handles of the series every request records, kept per serving
/// thread: a `counter!` with labels builds its key (here a status string)
/// and searches the registry on every call, about 3 % of the CPU of a
/// small cache hit. The proxy keeps its handles the same way.
#[derive(Default)]
struct Handles {
    requests: HashMap<(&'static str, &'static str, u16), Counter>,
    duration: Option<Histogram>,
    active_downloads: Option<Gauge>,
    sent_bytes: Option<Counter>,
}

thread_local! {
    static HANDLES: RefCell<Handles> = RefCell::default();
}

/// `keep` on this thread's handles, or `None` before [`describe`].
fn with_handles<R>(keep: impl FnOnce(&mut Handles) -> R) -> Option<R> {
    if !REGISTERED.load(Ordering::Relaxed) {
        return None;
    }
    HANDLES
        .try_with(|handles| Some(keep(&mut *handles.try_borrow_mut().ok()?)))
        .ok()
        .flatten()
}

/// The tar writer `fingerprint` is the one generations run now (`canary`).
pub fn tar_writer(fingerprint: &str, current: bool) {
    gauge!(TAR_WRITER_INFO, "fingerprint" => fingerprint.to_owned()).set(if current {
        1.0
    } else {
        0.0
    });
}

/// `gitball_archiver_active_downloads`.
pub fn active_downloads() -> Gauge {
    let make = || gauge!(ACTIVE_DOWNLOADS);
    with_handles(|kept| kept.active_downloads.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

/// `gitball_archiver_sent_bytes_total`.
pub fn sent_bytes() -> Counter {
    let make = || counter!(SENT_BYTES_TOTAL);
    with_handles(|kept| kept.sent_bytes.get_or_insert_with(make).clone()).unwrap_or_else(make)
}

/// The request log's hook: counts a finished archive request (also one
/// whose client left before the answer, as `499`).
pub fn request_finished(log: &RequestLog, finished: &Finished) {
    let format = log.format.unwrap_or("none");
    let cache = log.cache.unwrap_or("none");
    let status = finished.status;
    let make = || {
        counter!(
            REQUESTS_TOTAL,
            "format" => format,
            "cache" => cache,
            "code" => status.to_string()
        )
    };
    let requests = with_handles(|kept| {
        kept.requests
            .entry((format, cache, status))
            .or_insert_with(make)
            .clone()
    })
    .unwrap_or_else(make);
    requests.increment(1);
    let make = || histogram!(REQUEST_DURATION);
    with_handles(|kept| kept.duration.get_or_insert_with(make).clone())
        .unwrap_or_else(make)
        .record(finished.duration.as_secs_f64());
    if finished.ending == Ending::ClientGone {
        counter!(CLIENT_DISCONNECTS_TOTAL).increment(1);
    }
}
