//! Places for the work on a repository that a push makes costly and that
//! requests share (`docs/archiver.md#published-commits-only`): a history
//! walk, a listing of the refs, a commit's trees read for `export-subst`,
//! the trees on a `?path=`.
//! A request waits for its place on the runtime, holding no thread, and
//! its work takes one of the repositories' threads (`pool`) only once it
//! holds it.
//!
//! Waiting on a blocking thread (a `std::sync::Mutex` or `Condvar` taken
//! inside `spawn_blocking`), each request by commit id that arrived while
//! one walk ran held one of the runtime's 512 blocking threads: hundreds
//! of them after a push, or to many forks, and every other repository's
//! work off the serving threads (first reads, generations) queued behind
//! them (review of 2b0b416, which did the same for reads of one object).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::pool::Pool;
use crate::error::Error;

/// Places for one kind of work: that many run at once, the others wait
/// their turn, first come first served.
#[derive(Debug)]
pub struct Places(Arc<Semaphore>);

impl Places {
    pub fn new(count: usize) -> Places {
        Places(Arc::new(Semaphore::new(count)))
    }

    /// A place, waited for on the runtime.
    pub async fn take(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.0)
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("places are never closed"))
    }

    /// Every place, if all are free now: a test holds them.
    #[cfg(test)]
    pub fn take_all(&self, count: u32) -> OwnedSemaphorePermit {
        Arc::clone(&self.0)
            .try_acquire_many_owned(count)
            .expect("a place is taken")
    }
}

/// A repository's own places, one set for each kind of work: one set per
/// repository (by its git dir), shared by every handle open on it
/// (`Repositories::own_places`). A repository whose alternates changed
/// within the racy window is opened anew by each request; with places of
/// each handle's own, a burst of requests then ran one of each kind per
/// request, as if each were another repository (review of 1e89ccc).
#[derive(Debug)]
pub struct Own {
    /// The places to read objects in for requests,
    /// `READS_PER_REPOSITORY` (one read per object already, but many
    /// costly objects of one repository would take every place across
    /// repositories).
    pub reading: Places,
    /// The places to look for different paths in, `PATH_CHECKS`: a
    /// crawler asking for many paths of a costly repository at once takes
    /// that many blocking threads, not one each; the others wait on the
    /// runtime.
    pub path_checks: Places,
    /// The one place to list the refs for the digest in: requests that
    /// find it unknown at once wait for one listing (which a large
    /// repository pays for in CPU and memory) and then find it known,
    /// rather than each listing them again. They wait on the runtime,
    /// holding no thread.
    pub listing: Places,
    /// The one place to walk the history for the reachable commits in, for
    /// the same reasons.
    pub walking: Places,
    /// The one place to read a commit's trees for `export-subst` in, for
    /// the same reasons.
    pub judging: Places,
}

impl Default for Own {
    fn default() -> Own {
        Own {
            reading: Places::new(super::READS_PER_REPOSITORY),
            path_checks: Places::new(super::PATH_CHECKS),
            listing: Places::new(1),
            walking: Places::new(1),
            judging: Places::new(1),
        }
    }
}

/// `known`'s answer when it has one; otherwise `work`'s, run on one of
/// `threads` once the caller holds a place of each of `places`, taken in
/// that order, each waited for on the runtime. `known` is asked again
/// after each place is taken: the work waited for may have given the
/// answer (the requests for a new commit after a push take the one walk's
/// answer), and it then needs no further place and no thread. The places
/// are held until `work` ends, also when the caller has gone away, so that
/// its answer is there for the next.
pub async fn known_or_in_place<T: Send + 'static>(
    what: &str,
    threads: &Pool,
    places: &[&Places],
    known: impl Fn() -> Option<T>,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    if let Some(answer) = known() {
        return Ok(answer);
    }
    let mut held = Vec::with_capacity(places.len());
    for places in places {
        held.push(places.take().await);
        if let Some(answer) = known() {
            return Ok(answer);
        }
    }
    threads
        .run(held, work)
        .await
        .map_err(|lost| Error::internal(format_args!("{what}: {lost}")))?
}
