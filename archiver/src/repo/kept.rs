//! The bound on the reachable sets kept across repositories
//! (`docs/archiver.md#published-commits-only`).
//!
//! Each repository asked for by commit id keeps the set of commits its refs
//! reach, about 30 bytes per commit. Kept per repository alone, the memory
//! was the sum over up to `OPEN_REPOSITORIES` (1,024) repositories: a client
//! sending one `HEAD` (no budget token, before any cache lookup) to each
//! fork of a large history made the archiver hold every fork's set (attack:
//! 8 forks of a 300,000-commit history took 75 MB; a thousand forks of a
//! 1.3 million commit history would take about 40 GB, past the unit's
//! `MemoryMax`). Here every kept set is recorded, least recently used
//! first, and a set that takes the total past the bound drops the least
//! recently used others until it fits (its own stays, however large): the
//! repositories they belong to walk their history again when next asked.
//!
//! A walk builds its set before it is recorded, so the sets being walked
//! are bounded too: at most `MAX_WALKS` walks run at once across
//! repositories (one at a time per repository already), the others wait
//! for one to end, on the runtime (`places`). Without it a `HEAD` to each
//! of many forks at once had as many walks, each building a set of the
//! whole history, as requests.
//!
//! The looks for a `?path=` (`Repository::has_path`) are bounded the same
//! way: at most `MAX_PATH_LOOKS` at once across repositories, after the
//! repository's own places. Bounded per repository alone, requests for
//! two costly paths in each of many forks (a fork costs a push nothing:
//! its objects are the original's) took two blocking threads per fork,
//! 256 forks the runtime's 512, which every other repository's work off
//! the serving threads (first reads, generations) queued behind.
//!
//! So are the other kinds of work on a repository a request makes and a
//! push can make costly, each after the repository's own bound: the first
//! reads of objects (`MAX_READS`; one at a time per object and repository,
//! and a commit behind a chain of deltas is read in each fork), the walks
//! of a commit's trees for `export-subst` (`MAX_JUDGINGS`; one at a time
//! per repository) and the listings of the refs for their digest
//! (`MAX_LISTINGS`; one at a time per repository). Bounded per repository
//! alone, each took one blocking thread per fork asked at once (24 forks,
//! 24 to 36 threads more). Each kind has its own places: a request takes
//! them one after the other, never holding one while it waits for the
//! next, and a kind made costly (refs listed for 1.5 s each) holds up only
//! that kind's work elsewhere, not every repository's first reads.
//!
//! The work in all those places runs on threads of its own (`pool`), one
//! for each place across repositories at most (`MAX_THREADS`), not on
//! tokio's blocking threads, which the places alone did not bound.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use lru::LruCache;

use super::Reachable;
use super::places::Places;
use super::pool::Pool;

/// Commits kept in the reachable sets of all repositories together:
/// about 250 MB at 30 bytes a commit, a few histories the size of Linux's.
pub const MAX_KEPT_COMMITS: usize = 8 * 1024 * 1024;

/// History walks running at once, across repositories.
pub const MAX_WALKS: usize = 2;

/// Looks for `?path=`s running at once, across repositories.
pub const MAX_PATH_LOOKS: usize = 8;

/// First reads of objects (`Repository::peel_waiting`) running at once,
/// across repositories: each may allocate up to `MAX_OBJECT_READ_BYTES`.
pub const MAX_READS: usize = 8;

/// Walks of a commit's trees for `export-subst`
/// (`Repository::substitutes`) running at once, across repositories.
pub const MAX_JUDGINGS: usize = 8;

/// Listings of the refs for their digest (`Repository::refs_digest`)
/// running at once, across repositories.
pub const MAX_LISTINGS: usize = 8;

/// The threads all of that work runs on (`pool`): one for each place
/// across repositories, as each work holds one while it runs.
pub const MAX_THREADS: usize = MAX_WALKS + MAX_PATH_LOOKS + MAX_READS + MAX_JUDGINGS + MAX_LISTINGS;

/// A repository's kept set, as the ledger reaches it.
pub type Slot = Arc<Mutex<Option<Reachable>>>;

/// The reachable sets kept, by repository, least recently used first.
#[derive(Debug)]
pub struct Kept {
    max_commits: usize,
    /// Slot address → (its set's refs digest, commits, the slot).
    sets: Mutex<LruCache<usize, Entry>>,
    /// The places of the walks running: `MAX_WALKS`.
    walks: Places,
    /// The places of the looks for a `?path=` running: `MAX_PATH_LOOKS`.
    path_looks: Places,
    /// The places of the first reads of objects running: `MAX_READS`.
    reads: Places,
    /// The places of the walks for `export-subst` running: `MAX_JUDGINGS`.
    judgings: Places,
    /// The places of the listings of the refs running: `MAX_LISTINGS`.
    listings: Places,
    /// The threads the work in those places runs on: `MAX_THREADS`.
    threads: Pool,
}

#[derive(Debug)]
struct Entry {
    refs: String,
    commits: usize,
    slot: Weak<Mutex<Option<Reachable>>>,
}

impl Kept {
    pub fn new(max_commits: usize) -> Kept {
        Kept {
            max_commits,
            sets: Mutex::new(LruCache::unbounded()),
            walks: Places::new(MAX_WALKS),
            path_looks: Places::new(MAX_PATH_LOOKS),
            reads: Places::new(MAX_READS),
            judgings: Places::new(MAX_JUDGINGS),
            listings: Places::new(MAX_LISTINGS),
            threads: Pool::new("gitball-repo", MAX_THREADS),
        }
    }

    /// The threads the work in the places runs on, once it holds them.
    pub fn threads(&self) -> &Pool {
        &self.threads
    }

    /// The places to walk a history in: a walk takes one, after its
    /// repository's own (`Own::walking`).
    pub fn walks(&self) -> &Places {
        &self.walks
    }

    /// The places to look for a `?path=` in: a look takes one, after its
    /// repository's own (`Own::path_checks`).
    pub fn path_looks(&self) -> &Places {
        &self.path_looks
    }

    /// The places to read an object in for a request: a read takes one
    /// (it has no place of its own repository's; one read per object).
    pub fn reads(&self) -> &Places {
        &self.reads
    }

    /// The places to walk a commit's trees for `export-subst` in: a walk
    /// takes one, after its repository's own (`Own::judging`).
    pub fn judgings(&self) -> &Places {
        &self.judgings
    }

    /// The places to list the refs for their digest in: a listing takes
    /// one, after its repository's own (`Own::listing`).
    pub fn listings(&self) -> &Places {
        &self.listings
    }

    /// `slot` now holds the set of `commits` commits for `refs`: other
    /// repositories' least recently used sets are dropped until the total
    /// is within the bound. Called without `slot`'s lock held.
    pub fn record(&self, slot: &Slot, refs: &str, commits: usize) {
        let mut sets = self.sets.lock().unwrap_or_else(PoisonError::into_inner);
        // Sets of repositories closed since (their memory is gone) no
        // longer count.
        let gone: Vec<usize> = sets
            .iter()
            .filter(|(_, entry)| entry.slot.strong_count() == 0)
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            sets.pop(&key);
        }
        let key = Arc::as_ptr(slot) as usize;
        sets.put(
            key,
            Entry {
                refs: refs.to_owned(),
                commits,
                slot: Arc::downgrade(slot),
            },
        );
        let mut total: usize = sets.iter().map(|(_, entry)| entry.commits).sum();
        while total > self.max_commits && sets.len() > 1 {
            let Some((_, entry)) = sets.pop_lru() else {
                break;
            };
            total -= entry.commits;
            if let Some(slot) = entry.slot.upgrade() {
                let mut kept = slot.lock().unwrap_or_else(PoisonError::into_inner);
                // Only the set recorded: a newer one records itself.
                if kept.as_ref().is_some_and(|set| set.refs == entry.refs) {
                    *kept = None;
                }
            }
        }
    }

    /// `slot`'s set was used: it goes last.
    pub fn touch(&self, slot: &Slot) {
        self.sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .promote(&(Arc::as_ptr(slot) as usize));
    }

    /// Commits in the sets recorded whose repositories are still open.
    #[cfg(test)]
    pub fn commits(&self) -> usize {
        self.sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, entry)| entry.slot.strong_count() > 0)
            .map(|(_, entry)| entry.commits)
            .sum()
    }
}

impl Default for Kept {
    fn default() -> Kept {
        Kept::new(MAX_KEPT_COMMITS)
    }
}
