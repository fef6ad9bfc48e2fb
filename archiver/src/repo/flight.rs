//! One piece of work per key at a time, whose answer the requests for that
//! key that arrive meanwhile wait for and take: a read of an object
//! (`Repository::peeling`), a look for a `?path=` in a commit's tree
//! (`Repository::finding`). Their cost is a push's to decide (a delta chain
//! through large objects, nested trees of megabytes each), so each is done
//! once however many requests ask together.
//!
//! A request waits on the runtime, holding no thread ([`InFlight::wait`]):
//! hundreds waiting for one piece of work had each held one of the
//! runtime's 512 blocking threads, and every other repository's work off
//! the serving threads (first reads, generations) queued behind them
//! (review). Only the reachability walk, on a blocking thread already,
//! waits on its thread ([`InFlight::wait_blocking`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// One piece of work under way: its answer, once there, for the requests
/// waiting for it, on the runtime or on a blocking thread.
#[derive(Debug)]
pub struct InFlight<A> {
    answer: Mutex<Option<A>>,
    /// For those waiting on a blocking thread (the reachability walk).
    ready: Condvar,
    /// For those waiting on the runtime (requests).
    done: tokio::sync::Notify,
}

impl<A> Default for InFlight<A> {
    fn default() -> InFlight<A> {
        InFlight {
            answer: Mutex::new(None),
            ready: Condvar::new(),
            done: tokio::sync::Notify::new(),
        }
    }
}

impl<A: Clone> InFlight<A> {
    fn answer(&self) -> MutexGuard<'_, Option<A>> {
        self.answer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The work's answer, waiting for it on the runtime.
    pub async fn wait(&self) -> A {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            // Registered before looking: an answer put after the look
            // wakes this wait.
            done.as_mut().enable();
            if let Some(answer) = self.answer().clone() {
                return answer;
            }
            done.await;
        }
    }

    /// The work's answer, waiting for it on this thread.
    pub fn wait_blocking(&self) -> A {
        let mut answer = self.answer();
        loop {
            if let Some(answer) = answer.clone() {
                return answer;
            }
            answer = self
                .ready
                .wait(answer)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// The work under way, by key.
pub type Flights<K, A> = Arc<Mutex<HashMap<K, Arc<InFlight<A>>>>>;

/// Whose turn it is to do the work for a key ([`turn`]).
pub enum Turn<K: Eq + Hash, A> {
    /// Nobody's: its answer is known.
    Known(A),
    /// The work under way's, whose answer to take.
    Wait(Arc<InFlight<A>>),
    /// The caller's: it does the work and hands its answer on.
    Work(Worker<K, A>),
}

/// Whose turn it is to do the work for `key`: nobody's (`known` has its
/// answer), the work under way's, or the caller's. `unfinished` is the
/// answer those waiting take if the caller's work ends without one.
pub fn turn<K: Eq + Hash + Clone, A: Clone>(
    flights: &Flights<K, A>,
    key: K,
    known: impl Fn() -> Option<A>,
    unfinished: fn(&K) -> A,
) -> Turn<K, A> {
    if let Some(answer) = known() {
        return Turn::Known(answer);
    }
    let mut under_way = flights.lock().unwrap_or_else(PoisonError::into_inner);
    // A work's answer is kept before its entry goes (`Worker`'s drop):
    // known now, or still under way.
    if let Some(answer) = known() {
        return Turn::Known(answer);
    }
    if let Some(flight) = under_way.get(&key) {
        return Turn::Wait(Arc::clone(flight));
    }
    let flight = Arc::new(InFlight::default());
    under_way.insert(key.clone(), Arc::clone(&flight));
    Turn::Work(Worker {
        flights: Arc::clone(flights),
        key,
        flight,
        answer: None,
        unfinished,
    })
}

/// A caller's turn to do the work for `key`. Dropped, it forgets the work
/// in its flights, after its answer was kept, and hands the answer to
/// those waiting; work that panicked, or never ran (a task dropped at
/// shutdown), hands them `unfinished`'s, so none waits for good.
pub struct Worker<K: Eq + Hash, A> {
    flights: Flights<K, A>,
    pub key: K,
    pub flight: Arc<InFlight<A>>,
    /// The work's answer, set by the caller once it is kept.
    pub answer: Option<A>,
    unfinished: fn(&K) -> A,
}

impl<K: Eq + Hash, A> Drop for Worker<K, A> {
    fn drop(&mut self) {
        let answer = self
            .answer
            .take()
            .unwrap_or_else(|| (self.unfinished)(&self.key));
        self.flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        *self
            .flight
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(answer);
        self.flight.ready.notify_all();
        self.flight.done.notify_waiters();
    }
}

impl<K: Eq + Hash + std::fmt::Debug, A> std::fmt::Debug for Worker<K, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("key", &self.key).finish()
    }
}
