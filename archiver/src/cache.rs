//! The archive cache: an index of complete files, the generations under way,
//! and the byte bound they share.
//!
//! Invariants:
//! - One generation per key at a time. A lookup under the index lock finds a
//!   complete file (`Hit`), a generation to tail (`Join`), or starts one
//!   (`Miss`). The generation runs in a task owned by the cache, not by the
//!   request that started it: a client that leaves does not stop it.
//! - A file is in the index only after git exited 0, the encoder finished
//!   and the partial file was renamed to `{key}-{sha256}`; until then it is
//!   `{key}.{random}.partial`. A failed, killed or oversized generation's
//!   partial file is removed and never indexed.
//! - `bytes` counts complete files plus what generations have written so far,
//!   and stays under `--cache-max-bytes`: growth evicts least-recently-used
//!   complete files, and a generation that cannot fit even then fails as
//!   too large.
//! - An evicted file is unlinked at once. Readers that still hold it keep its
//!   space pinned (tmpfs frees it at the last close); those bytes are counted
//!   in `held_bytes` until the last reader's `Arc<CacheFile>` is dropped.
//! - On start, files named like complete entries are re-indexed (oldest
//!   first, by mtime) and leftover partials deleted: a restart keeps the
//!   cache warm.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use metrics::{counter, gauge, histogram};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::generate::{self, Failure, Limits, Spec};
use crate::metrics as m;
use crate::shadow::Shadows;

const PARTIAL_SUFFIX: &str = ".partial";

/// A complete archive file.
#[derive(Debug)]
pub struct CacheFile {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: [u8; 32],
    evicted: AtomicBool,
    held_bytes: Arc<AtomicU64>,
}

impl Drop for CacheFile {
    fn drop(&mut self) {
        // The last holder of an evicted file is gone: tmpfs frees it now.
        if self.evicted.load(Ordering::Acquire) {
            let held = self.held_bytes.fetch_sub(self.len, Ordering::AcqRel) - self.len;
            gauge!(m::CACHE_HELD_BYTES).set(held as f64);
        }
    }
}

/// Where a generation is.
#[derive(Clone, Debug)]
pub enum State {
    Running,
    Complete(Arc<CacheFile>),
    Failed(Failure),
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Bytes in the partial file that readers may read.
    pub written: u64,
    pub state: State,
}

/// A generation under way, as its readers see it.
#[derive(Debug)]
pub struct Generation {
    pub partial: PathBuf,
    /// The partial file, opened when it was created: readers share this
    /// handle (they read with `pread`), so they never race the rename that
    /// completes the generation, and a growing archive costs one fd however
    /// many readers tail it.
    pub file: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
}

impl Generation {
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until the first bytes are in the file or the generation ended,
    /// so a request can still answer with an error status instead of a
    /// `200` whose body is then aborted.
    pub async fn started(&self) -> Progress {
        let mut progress = self.progress();
        let result = progress
            .wait_for(|p| p.written > 0 || !matches!(p.state, State::Running))
            .await
            .map(|p| p.clone());
        // The sender is dropped only after a terminal state was sent.
        result.unwrap_or_else(|_| progress.borrow().clone())
    }

    /// Waits for the end of the generation.
    pub async fn finished(&self) -> State {
        let mut progress = self.progress();
        let result = progress
            .wait_for(|p| !matches!(p.state, State::Running))
            .await
            .map(|p| p.state.clone());
        result.unwrap_or_else(|_| progress.borrow().state.clone())
    }
}

pub enum Lookup {
    Hit(Arc<CacheFile>),
    /// Tail a generation another request started.
    Join(Arc<Generation>),
    /// This request started the generation.
    Miss(Arc<Generation>),
}

impl Lookup {
    /// The `X-Gitball-Cache` value and metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Lookup::Hit(_) => "hit",
            Lookup::Join(_) => "join",
            Lookup::Miss(_) => "miss",
        }
    }
}

/// Why no lookup result could be had.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The archiver is stopping: no new generation starts.
    #[error("the archiver is shutting down")]
    ShuttingDown,
    #[error("cannot create the partial file: {0}")]
    Io(#[from] io::Error),
}

/// Cache settings, from the flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_generations: usize,
    pub queue_timeout: Duration,
    pub limits: Limits,
    pub git: PathBuf,
}

pub struct Cache {
    settings: Settings,
    /// The git dirs generations run in (see `shadow`).
    shadows: Shadows,
    slots: Arc<Semaphore>,
    index: Mutex<Index>,
    held_bytes: Arc<AtomicU64>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

struct Index {
    complete: LruCache<String, Arc<CacheFile>>,
    generating: HashMap<String, Arc<Generation>>,
    /// Complete files plus in-progress bytes.
    bytes: u64,
}

impl Index {
    /// A complete file (promoted in the LRU) or a generation under way.
    fn find(&mut self, key: &str) -> Option<Lookup> {
        if let Some(file) = self.complete.get(key) {
            return Some(Lookup::Hit(file.clone()));
        }
        self.generating
            .get(key)
            .map(|generation| Lookup::Join(generation.clone()))
    }
}

impl Cache {
    /// Opens (creating, mode 0700) the cache directory, deletes leftover
    /// partials and re-indexes complete files.
    pub fn open(settings: Settings) -> io::Result<Arc<Cache>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&settings.dir)?;
        std::fs::set_permissions(&settings.dir, std::fs::Permissions::from_mode(0o700))?;
        let held_bytes = Arc::new(AtomicU64::new(0));

        let mut found = Vec::new();
        for entry in std::fs::read_dir(&settings.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(PARTIAL_SUFFIX) {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            let Some((key, sha256)) = parse_complete_name(name) else {
                continue;
            };
            let metadata = entry.metadata()?;
            if !metadata.is_file() {
                continue;
            }
            let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, key, sha256, metadata.len(), entry.path()));
        }
        found.sort_by_key(|(modified, ..)| *modified);

        let mut index = Index {
            complete: LruCache::unbounded(),
            generating: HashMap::new(),
            bytes: 0,
        };
        for (_, key, sha256, len, path) in found {
            index.bytes += len;
            let file = CacheFile {
                path,
                len,
                sha256,
                evicted: AtomicBool::new(false),
                held_bytes: held_bytes.clone(),
            };
            index.complete.put(key, Arc::new(file));
        }
        let restored = index.complete.len();
        let cache = Cache {
            shadows: Shadows::create()?,
            slots: Arc::new(Semaphore::new(settings.max_generations)),
            settings,
            index: Mutex::new(index),
            held_bytes,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        {
            let mut index = cache.lock();
            cache.evict_until(&mut index, cache.settings.max_bytes);
            cache.publish(&index);
        }
        tracing::info!(entries = restored, dir = %cache.settings.dir.display(), "cache opened");
        Ok(Arc::new(cache))
    }

    /// The cache key: which repository, commit and bytes.
    pub fn key(spec: &Spec) -> String {
        let mut hasher = Sha256::new();
        hasher.update(spec.git_dir.as_os_str().as_encoded_bytes());
        hasher.update(b"\0");
        hasher.update(&spec.commit);
        hasher.update(b"\0");
        hasher.update(spec.variant());
        hex::encode(hasher.finalize())
    }

    /// Finds the archive for `spec`, starting its generation if needed
    /// (`request_id`, of the request that starts it, goes in its log span).
    pub fn lookup(self: &Arc<Self>, spec: Spec, request_id: &str) -> Result<Lookup, LookupError> {
        let key = Cache::key(&spec);
        let mut index = self.lock();
        if let Some(found) = index.find(&key) {
            return Ok(found);
        }
        if self.cancel.is_cancelled() {
            return Err(LookupError::ShuttingDown);
        }
        // Created here, under the lock, so every reader can open it at once.
        let partial = self.settings.dir.join(format!(
            "{key}.{:016x}{PARTIAL_SUFFIX}",
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&partial)?;
        let (sender, receiver) = watch::channel(Progress {
            written: 0,
            state: State::Running,
        });
        let generation = Arc::new(Generation {
            partial,
            file: Arc::new(file),
            progress: receiver,
        });
        index.generating.insert(key.clone(), generation.clone());
        drop(index);

        // Every line the generation logs (git's failure and stderr among
        // them) carries what it makes and the request that started it.
        let span = tracing::info_span!(
            "generation",
            key = %key,
            repository = %spec.repository,
            commit = %spec.commit,
            format = spec.format.metric_label(),
            request_id,
        );
        let cache = self.clone();
        let partial = generation.partial.clone();
        self.tasks.spawn(
            async move { cache.generate(key, spec, partial, sender).await }.instrument(span),
        );
        Ok(Lookup::Miss(generation))
    }

    /// Like [`Cache::lookup`], but never starts a generation (for `HEAD`).
    pub fn peek(&self, spec: &Spec) -> Option<Lookup> {
        self.lock().find(&Cache::key(spec))
    }

    /// The generation task: queue, run, then index or clean up.
    async fn generate(
        self: Arc<Self>,
        key: String,
        spec: Spec,
        partial: PathBuf,
        progress: watch::Sender<Progress>,
    ) {
        let format = spec.format.metric_label();
        gauge!(m::GENERATIONS_QUEUED).increment(1.0);
        let permit = tokio::select! {
            permit = tokio::time::timeout(self.settings.queue_timeout, self.slots.clone().acquire_owned()) => permit.ok().and_then(Result::ok),
            () = self.cancel.cancelled() => None,
        };
        gauge!(m::GENERATIONS_QUEUED).decrement(1.0);
        let Some(_permit) = permit else {
            let failure = if self.cancel.is_cancelled() {
                Failure::Cancelled
            } else {
                Failure::Busy
            };
            self.fail(&key, &partial, 0, failure, &progress);
            return;
        };

        gauge!(m::GENERATIONS_IN_FLIGHT).increment(1.0);
        let started = Instant::now();
        let accounted = Arc::new(AtomicU64::new(0));
        let growth: generate::Growth = {
            let cache = self.clone();
            let accounted = accounted.clone();
            let progress = progress.clone();
            Arc::new(move |len| {
                let previous = accounted.swap(len, Ordering::AcqRel);
                let fits = cache.grow(len.saturating_sub(previous));
                progress.send_modify(|p| p.written = len);
                fits
            })
        };
        let result = match self.shadows.prepare(&spec.git_dir, &spec.common_dir) {
            Ok(shadow) => {
                generate::run(
                    &self.settings.git,
                    &spec,
                    &shadow,
                    &partial,
                    self.settings.limits,
                    growth,
                    &self.cancel,
                )
                .await
            }
            Err(error) => {
                tracing::error!(%error, "cannot prepare the git dir to run in");
                Err(Failure::Failed)
            }
        };
        gauge!(m::GENERATIONS_IN_FLIGHT).decrement(1.0);
        histogram!(m::GENERATION_DURATION, "format" => format)
            .record(started.elapsed().as_secs_f64());

        let written = accounted.load(Ordering::Acquire);
        let finished = match result {
            Ok(finished) => finished,
            Err(failure) => {
                counter!(m::GENERATIONS_TOTAL, "format" => format, "outcome" => failure.outcome())
                    .increment(1);
                self.fail(&key, &partial, written, failure, &progress);
                return;
            }
        };
        let path = self
            .settings
            .dir
            .join(format!("{key}-{}", hex::encode(finished.sha256)));
        if let Err(error) = std::fs::rename(&partial, &path) {
            tracing::error!(%error, "cannot rename the finished archive");
            counter!(m::GENERATIONS_TOTAL, "format" => format, "outcome" => "failed").increment(1);
            self.fail(&key, &partial, written, Failure::Failed, &progress);
            return;
        }
        counter!(m::GENERATIONS_TOTAL, "format" => format, "outcome" => "ok").increment(1);
        let file = Arc::new(CacheFile {
            path,
            len: finished.len,
            sha256: finished.sha256,
            evicted: AtomicBool::new(false),
            held_bytes: self.held_bytes.clone(),
        });
        {
            let mut index = self.lock();
            index.generating.remove(&key);
            // `written` was accounted while growing; the final length may
            // differ only by what the growth callback already saw.
            index.bytes = index.bytes - written + finished.len;
            index.complete.put(key, file.clone());
            self.publish(&index);
        }
        tracing::info!(
            bytes = finished.len,
            seconds = started.elapsed().as_secs_f64(),
            "archive generated"
        );
        progress.send_modify(|p| {
            p.written = finished.len;
            p.state = State::Complete(file);
        });
    }

    fn fail(
        &self,
        key: &str,
        partial: &Path,
        written: u64,
        failure: Failure,
        progress: &watch::Sender<Progress>,
    ) {
        if let Err(error) = std::fs::remove_file(partial) {
            tracing::error!(%error, "cannot remove a failed partial file");
        }
        {
            let mut index = self.lock();
            index.generating.remove(key);
            index.bytes -= written;
            self.publish(&index);
        }
        if failure != Failure::Busy {
            tracing::warn!(outcome = failure.outcome(), "generation failed");
        }
        progress.send_modify(|p| p.state = State::Failed(failure));
    }

    /// Accounts `delta` more bytes; evicts to make room. False if the bound
    /// cannot be kept even with no complete file left.
    fn grow(&self, delta: u64) -> bool {
        let mut index = self.lock();
        index.bytes += delta;
        self.evict_until(&mut index, self.settings.max_bytes);
        self.publish(&index);
        index.bytes <= self.settings.max_bytes
    }

    fn evict_until(&self, index: &mut Index, bound: u64) {
        while index.bytes > bound {
            let Some((_, file)) = index.complete.pop_lru() else {
                break;
            };
            if let Err(error) = std::fs::remove_file(&file.path) {
                tracing::error!(%error, "cannot remove an evicted archive");
            }
            index.bytes -= file.len;
            // Counted as held until the last holder drops it (maybe now).
            file.evicted.store(true, Ordering::Release);
            let held = self.held_bytes.fetch_add(file.len, Ordering::AcqRel) + file.len;
            gauge!(m::CACHE_HELD_BYTES).set(held as f64);
            counter!(m::CACHE_EVICTIONS_TOTAL).increment(1);
        }
    }

    fn publish(&self, index: &Index) {
        gauge!(m::CACHE_BYTES).set(index.bytes as f64);
        gauge!(m::CACHE_ENTRIES).set(index.complete.len() as f64);
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock leaves the index consistent enough
        // (every mutation is a few statements); keep serving.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stops every generation (children killed, partials removed) and waits
    /// for their tasks, at most `deadline`.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        self.cancel.cancel();
        self.tasks.close();
        tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
    }
}

/// `{key}-{sha256}`, both 64 lower-case hex digits.
fn parse_complete_name(name: &str) -> Option<(String, [u8; 32])> {
    let (key, sha256) = name.split_once('-')?;
    let is_hex64 =
        |s: &str| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_hex64(key) || !is_hex64(sha256) {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(sha256, &mut digest).ok()?;
    Some((key.to_owned(), digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_names_parse_and_others_do_not() {
        let key = "a".repeat(64);
        let sha = "0".repeat(64);
        assert!(parse_complete_name(&format!("{key}-{sha}")).is_some());
        assert!(parse_complete_name(&format!("{key}.0123{PARTIAL_SUFFIX}")).is_none());
        assert!(parse_complete_name("notes.txt").is_none());
        assert!(parse_complete_name(&format!("{}-{sha}", "A".repeat(64))).is_none());
    }
}
