//! Places for the work on a repository that a push makes costly and that
//! requests share (`docs/archiver.md#published-commits-only`): a history
//! walk, a listing of the refs, a commit's trees read for `export-subst`,
//! the trees on a `?path=`.
//! A request waits for its place on the runtime, holding no thread, and
//! takes one of tokio's blocking threads only once it holds it.
//!
//! Waiting on a blocking thread (a `std::sync::Mutex` or `Condvar` taken
//! inside `spawn_blocking`), each request by commit id that arrived while
//! one walk ran held one of the runtime's 512 blocking threads: hundreds
//! of them after a push, or to many forks, and every other repository's
//! work off the serving threads (first reads, generations) queued behind
//! them (review of 2b0b416, which did the same for reads of one object).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// `known`'s answer when it has one; otherwise `work`'s, run on a blocking
/// thread once the caller holds a place of each of `places`, taken in
/// that order, each waited for on the runtime. `known` is asked again
/// after each place is taken: the work waited for may have given the
/// answer (the requests for a new commit after a push take the one walk's
/// answer), and it then needs no further place and no thread. The places
/// are held until `work` ends, also when the caller has gone away, so that
/// its answer is there for the next.
pub async fn known_or_in_place<T: Send + 'static>(
    what: &str,
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
    tokio::task::spawn_blocking(move || {
        let _held = held;
        work()
    })
    .await
    .map_err(|error| Error::internal(format_args!("{what} panicked: {error}")))?
}
