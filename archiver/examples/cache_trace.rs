//! Replays a deterministic request trace against the archiver cache's
//! replacement policy (`cache::policy`, the real code) and against the
//! byte-weighted LRU it replaced, and prints the hit ratio of the popular
//! keys. Sizes only, no files: a miss "generates" its archive in 1 MiB
//! steps, making room as it writes exactly as `Cache::grow` does, and
//! fails when no room can be had (as too large).
//!
//! ```sh
//! cargo run --release -p gitball-archiver --example cache_trace [-- --json]
//! ```
//!
//! The trace (seeded, identical on every run):
//! - 500 popular keys, archive sizes log-uniform in 100 KiB..4 MiB
//!   (~520 MiB together), requested with a Zipf(0.9) popularity; a 128 MiB
//!   cache;
//! - phases of 20,000 popular requests each: `before`, `scan` (every
//!   popular request followed by one request of a cold key, 20,000
//!   distinct cold keys in one pass, plus one 300 MiB archive larger than
//!   the cache every 4,000 requests) and `after`;
//! - two control traces without a scan: the same Zipf (`zipf`), and one
//!   whose popular set moves on every 10,000 requests (`shifting`: 50 new
//!   keys become the hottest, as release tags do).
//!
//! Figures and the command are kept in `BENCHMARKS.md` ("Cache policy under
//! a scan"); `ops/bench/scenario_cache_trace.py` runs this.

use std::collections::BTreeMap;

use gitball_archiver::cache_policy::Policy;
use lru::LruCache;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CACHE_BYTES: u64 = 128 * MIB;
const POPULAR_KEYS: u64 = 500;
const PHASE_REQUESTS: usize = 20_000;
const ZIPF_EXPONENT: f64 = 0.9;
const OVERSIZED_BYTES: u64 = 300 * MIB;
const OVERSIZED_EVERY: usize = 4_000;
const WRITE_STEP_BYTES: u64 = MIB;
/// Cold keys live above this: never a popular key.
const COLD_BASE: u64 = 1 << 40;

/// splitmix64: a tiny, seeded, portable generator.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The size of `key`'s archive: log-uniform in 100 KiB..4 MiB, fixed per
/// key.
fn size_of(key: u64) -> u64 {
    if key == u64::MAX {
        return OVERSIZED_BYTES;
    }
    let mut random = Random(key ^ 0x5eed);
    let (low, high) = ((100 * KIB) as f64, (4 * MIB) as f64);
    (low * (high / low).powf(random.unit())) as u64
}

/// Ranks 0..n by Zipf(s) popularity.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, exponent: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exponent);
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.iter().map(|c| c / total).collect();
        Zipf { cumulative }
    }

    fn sample(&self, random: &mut Random) -> u64 {
        let u = random.unit();
        self.cumulative.partition_point(|&c| c < u) as u64
    }
}

#[derive(Clone, Copy)]
enum Request {
    /// A popular key, counted in `phase`.
    Popular { key: u64, phase: &'static str },
    /// A cold key, or the oversized archive: not counted.
    Other(u64),
}

fn scan_trace() -> Vec<Request> {
    let mut random = Random(9);
    let zipf = Zipf::new(POPULAR_KEYS, ZIPF_EXPONENT);
    let mut trace = Vec::new();
    let mut cold = COLD_BASE;
    for phase in ["before", "scan", "after"] {
        for n in 0..PHASE_REQUESTS {
            let key = zipf.sample(&mut random);
            trace.push(Request::Popular { key, phase });
            if phase == "scan" {
                trace.push(Request::Other(cold));
                cold += 1;
                if n % OVERSIZED_EVERY == 0 {
                    trace.push(Request::Other(u64::MAX));
                }
            }
        }
    }
    trace
}

fn zipf_trace() -> Vec<Request> {
    let mut random = Random(11);
    let zipf = Zipf::new(POPULAR_KEYS, ZIPF_EXPONENT);
    (0..3 * PHASE_REQUESTS)
        .map(|_| Request::Popular {
            key: zipf.sample(&mut random),
            phase: "all",
        })
        .collect()
}

fn shifting_trace() -> Vec<Request> {
    let mut random = Random(13);
    let zipf = Zipf::new(POPULAR_KEYS, ZIPF_EXPONENT);
    (0..3 * PHASE_REQUESTS)
        .map(|n| {
            // Every 10,000 requests the 50 hottest ranks go to keys never
            // seen before; the rest of the ranking shifts down.
            let epoch = (n / 10_000) as u64;
            let rank = zipf.sample(&mut random);
            let key = if rank < 50 {
                10_000 * (epoch + 1) + rank
            } else {
                rank + 50 * epoch
            };
            Request::Popular { key, phase: "all" }
        })
        .collect()
}

/// A cache model: what a request finds, and what a miss does.
trait Model {
    /// True on a hit.
    fn request(&mut self, key: u64) -> bool;
    /// Generates `key` (`len` bytes) in steps; false if it failed.
    fn generate(&mut self, key: u64, len: u64) -> bool;
    fn name(&self) -> &'static str;
}

/// The policy as `Cache` drives it.
struct Current {
    policy: Policy<u64>,
}

impl Model for Current {
    fn request(&mut self, key: u64) -> bool {
        self.policy.record(&key);
        self.policy.touch(&key)
    }

    fn generate(&mut self, key: u64, len: u64) -> bool {
        let mut written = 0;
        while written < len {
            written = (written + WRITE_STEP_BYTES).min(len);
            let used = self.policy.bytes() + written;
            if used > CACHE_BYTES
                && self
                    .policy
                    .evict(used - CACHE_BYTES, Some(&key))
                    .short
                    .is_some()
            {
                return false;
            }
        }
        self.policy.insert(key, len);
        true
    }

    fn name(&self) -> &'static str {
        "segmented LRU + frequency (new)"
    }
}

/// The cache before: LRU by bytes, growth evicts the least recently used.
struct OldLru {
    lru: LruCache<u64, u64>,
    bytes: u64,
}

impl Model for OldLru {
    fn request(&mut self, key: u64) -> bool {
        self.lru.get(&key).is_some()
    }

    fn generate(&mut self, key: u64, len: u64) -> bool {
        let mut written = 0;
        while written < len {
            written = (written + WRITE_STEP_BYTES).min(len);
            while self.bytes + written > CACHE_BYTES {
                let Some((_, bytes)) = self.lru.pop_lru() else {
                    return false;
                };
                self.bytes -= bytes;
            }
        }
        self.lru.put(key, len);
        self.bytes += len;
        true
    }

    fn name(&self) -> &'static str {
        "LRU by bytes (old)"
    }
}

#[derive(Default)]
struct Count {
    hits: u64,
    requests: u64,
}

struct Replayed {
    /// Popular hits and requests by phase (and `total`).
    counts: BTreeMap<&'static str, Count>,
    /// Bytes generated: the work misses cost.
    generated: u64,
    /// Generations that failed for want of room (too large).
    failed: u64,
}

fn replay(model: &mut dyn Model, trace: &[Request]) -> Replayed {
    let mut counts: BTreeMap<&'static str, Count> = BTreeMap::new();
    let mut generated = 0;
    let mut failed = 0;
    for request in trace {
        let key = match *request {
            Request::Popular { key, .. } | Request::Other(key) => key,
        };
        let hit = model.request(key);
        if let Request::Popular { phase, .. } = *request {
            for phase in [phase, "total"] {
                let count = counts.entry(phase).or_default();
                count.requests += 1;
                count.hits += u64::from(hit);
            }
        }
        if !hit {
            let len = size_of(key);
            generated += len;
            failed += u64::from(!model.generate(key, len));
        }
    }
    Replayed {
        counts,
        generated,
        failed,
    }
}

fn main() {
    let json = std::env::args().any(|arg| arg == "--json");
    let traces: [(&str, Vec<Request>); 3] = [
        ("scan", scan_trace()),
        ("zipf", zipf_trace()),
        ("shifting", shifting_trace()),
    ];
    let mut rows = Vec::new();
    for (trace_name, trace) in &traces {
        let models: [Box<dyn Model>; 2] = [
            Box::new(OldLru {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            Box::new(Current {
                policy: Policy::new(CACHE_BYTES),
            }),
        ];
        for mut model in models {
            let replayed = replay(model.as_mut(), trace);
            let ratios: BTreeMap<&str, f64> = replayed
                .counts
                .iter()
                .map(|(phase, c)| (*phase, c.hits as f64 / c.requests as f64))
                .collect();
            rows.push((
                *trace_name,
                model.name(),
                ratios,
                replayed.generated,
                replayed.failed,
            ));
        }
    }
    if json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(trace, policy, ratios, generated, failed)| {
                serde_json::json!({
                    "trace": trace,
                    "policy": policy,
                    "popular_hit_ratio": ratios,
                    "generated_bytes": generated,
                    "failed_generations": failed,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!(
        "| trace | policy | popular hit ratio: before scan | during scan | after scan | whole trace | GiB generated | generations failed (too large) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let cell = |ratios: &BTreeMap<&str, f64>, phase: &str| {
        ratios
            .get(phase)
            .map_or("–".to_owned(), |r| format!("{:.1} %", 100.0 * r))
    };
    for (trace, policy, ratios, generated, failed) in &rows {
        println!(
            "| {trace} | {policy} | {} | {} | {} | {} | {:.1} | {failed} |",
            cell(ratios, "before"),
            cell(ratios, "scan"),
            cell(ratios, "after"),
            cell(ratios, "total"),
            *generated as f64 / (1u64 << 30) as f64
        );
    }
}
