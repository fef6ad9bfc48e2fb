//! The threads the work in places runs on (`places`,
//! `docs/archiver.md#published-commits-only`): at most as many as there
//! are places across repositories (`kept::MAX_THREADS`), named
//! `gitball-repo`, fed by a queue.
//!
//! The places bound how much of that work runs at once. On tokio's
//! blocking pool (up to 512 threads) they did not bound the threads it
//! took: a place was freed on its blocking thread as the work returned,
//! the next request took it and called `spawn_blocking` before that thread
//! was idle again, and tokio started another (64 forks at once: up to 47
//! threads more on a loaded machine for at most 8 listings at a time).
//! Here a thread counts itself idle before the places its work held are
//! freed, so the work that takes them finds it; and whatever the timing,
//! no more than `max_threads` are ever started: work beyond them queues
//! for the next thread to finish.
//!
//! Threads are started as work first finds none idle, not with the pool:
//! an archiver that never read a costly commit holds none. Once started a
//! thread waits for work until the pool is dropped (bounded, so not
//! retired after a while as tokio's are: a burst after a quiet minute
//! would start them all again).
//!
//! Not a crate's pool: rayon's `ThreadPool` starts all its threads when it
//! is built, and tokio's blocking pool (also a runtime of our own with
//! `max_blocking_threads`) frees a thread only after the work's places are
//! dropped, which is the race above. What is needed is a queue, a count
//! and a condition variable.

use std::{
    collections::VecDeque,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
};

/// Threads for work handed over with what it holds (its places).
#[derive(Debug)]
pub struct Pool {
    name: &'static str,
    max_threads: usize,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or the pool is dropped.
    queued: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads started and not yet ended.
    threads: usize,
    /// Threads between two jobs: each takes a queued job, so a job finds
    /// one without a thread started for it.
    idle: usize,
    /// The pool was dropped: a thread that finds no job ends.
    closed: bool,
}

impl std::fmt::Debug for State {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("State")
            .field("jobs", &self.jobs.len())
            .field("threads", &self.threads)
            .field("idle", &self.idle)
            .field("closed", &self.closed)
            .finish()
    }
}

/// Runs the work; returns what is left to do once its thread counts itself
/// idle again.
type Job = Box<dyn FnOnce() -> Finish + Send>;

/// Drops what the work held (its places), then hands its answer over: a
/// caller that has the answer finds the places free, as after
/// `spawn_blocking`.
type Finish = Box<dyn FnOnce() + Send>;

/// Why work handed to the pool gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// The work panicked; its thread goes on with the next.
    #[error("panicked: {0}")]
    Panicked(String),
    /// No thread was running and none could be started (the process's
    /// thread limit): the work was dropped without running.
    #[error("no thread could be started for it")]
    NoThread,
}

impl Pool {
    /// A pool of at most `max_threads` threads named `name`, none started.
    pub fn new(name: &'static str, max_threads: usize) -> Pool {
        Pool {
            name,
            max_threads: max_threads.max(1),
            shared: Arc::default(),
        }
    }

    /// Runs `work` on one of the pool's threads and gives its answer;
    /// `held` (the work's places) is dropped there once that thread is
    /// idle again, before the answer is handed over. Handed over now, not
    /// when the future is first polled: a caller that goes away, dropping
    /// the future, leaves the work to run and its answer to whoever it
    /// keeps it for.
    pub fn run<T, H, W>(
        &self,
        held: H,
        work: W,
    ) -> impl Future<Output = Result<T, Lost>> + use<T, H, W>
    where
        T: Send + 'static,
        H: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.hand_over(Box::new(move || {
            // The work's own state is left as a panic leaves it, as on
            // tokio's blocking threads: callers keep nothing a half-done
            // work could spoil (their mutexes are taken past poisoning).
            let answer_or_panic =
                std::panic::catch_unwind(AssertUnwindSafe(work)).map_err(panic_message);
            Box::new(move || {
                drop(held);
                // The caller may have gone away: nobody to tell.
                let _ = answer.send(answer_or_panic);
            })
        }));
        async move {
            match answered.await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(message)) => Err(Lost::Panicked(message)),
                Err(_) => Err(Lost::NoThread),
            }
        }
    }

    /// Queues `job` and starts a thread for it if every thread is busy and
    /// fewer than `max_threads` run.
    fn hand_over(&self, job: Job) {
        let mut state = self.shared.lock();
        state.jobs.push_back(job);
        if state.jobs.len() > state.idle && state.threads < self.max_threads {
            let shared = Arc::clone(&self.shared);
            let started = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || shared.serve());
            match started {
                Ok(_) => {
                    state.threads += 1;
                    state.idle += 1;
                }
                Err(error) if state.threads == 0 => {
                    // Nobody would ever take it: dropped, its caller told.
                    // Not under the lock: what it holds may be the last
                    // handle on the pool, whose drop takes the lock.
                    tracing::error!(%error, pool = self.name, "cannot start a thread; the work is not done");
                    let job = state.jobs.pop_back();
                    drop(state);
                    drop(job);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, pool = self.name, threads = state.threads, "cannot start another thread; the work waits for one");
                }
            }
        }
        self.shared.queued.notify_one();
    }

    /// Threads started and not yet ended.
    #[cfg(test)]
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Drop for Pool {
    /// Each thread ends once no job is queued: work handed over still runs.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.queued.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A thread's life: the queued jobs, one after the other, until the
    /// pool is dropped and none is left. Counted idle (`State::idle`) from
    /// when it was started for a job to when it takes one, and again from
    /// the end of that job, before what the job held is dropped.
    fn serve(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                state.idle -= 1;
                drop(state);
                let finish = job();
                self.lock().idle += 1;
                finish();
                state = self.lock();
            } else if state.closed {
                state.threads -= 1;
                state.idle -= 1;
                return;
            } else {
                state = self
                    .queued
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// A panic's message, as the default hook prints it.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_owned())
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Barrier, mpsc},
        time::Duration,
    };

    use tokio::sync::Semaphore;

    use super::*;

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// Threads are started as work needs them, never more than the
    /// pool's: work beyond them waits in the queue.
    #[test]
    fn no_more_threads_start_than_the_pool_has_whatever_is_handed_over() {
        const THREADS: usize = 4;
        let pool = Pool::new("gitball-test", THREADS);
        assert_eq!(pool.threads(), 0, "a pool given no work started threads");
        // THREADS jobs that wait for each other: each has a thread.
        let all_running = Arc::new(Barrier::new(THREADS + 1));
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let mut answers: Vec<_> = (0..THREADS)
            .map(|job| {
                let all_running = Arc::clone(&all_running);
                let released = Arc::clone(&released);
                pool.run((), move || {
                    all_running.wait();
                    let _ = released.lock().unwrap().recv();
                    job
                })
            })
            .map(|answer| Box::pin(answer) as std::pin::Pin<Box<dyn Future<Output = _>>>)
            .collect();
        all_running.wait();
        // As many more while every thread is busy: queued, none started.
        answers.extend((THREADS..2 * THREADS).map(|job| {
            Box::pin(pool.run((), move || job)) as std::pin::Pin<Box<dyn Future<Output = _>>>
        }));
        assert_eq!(pool.threads(), THREADS);
        for _ in 0..THREADS {
            release.send(()).unwrap();
        }
        let answers: Vec<usize> = block_on(futures_util::future::join_all(answers))
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(answers, (0..2 * THREADS).collect::<Vec<_>>());
        assert_eq!(pool.threads(), THREADS);
    }

    /// Work that takes the place the work before it held, freed as that
    /// work ends, finds its thread idle: one place, one thread, however
    /// many take it in turn, also when the next work is handed over before
    /// the thread that freed the place has gone back for more (here it
    /// waits for that in what it drops). On tokio's blocking pool the place
    /// was freed before its thread was idle again, and the next work
    /// started another: 64 forks at once took up to 47 threads more for 8
    /// places.
    #[test]
    fn work_in_a_place_freed_by_work_before_it_finds_that_thread_idle() {
        const TURNS: usize = 20;
        /// Dropped after the place: waits until the next turn was handed
        /// over, as a loaded machine may have it.
        struct UntilTheNextIsHandedOver(Option<Arc<Mutex<mpsc::Receiver<()>>>>);
        impl Drop for UntilTheNextIsHandedOver {
            fn drop(&mut self) {
                if let Some(handed) = &self.0 {
                    let handed = handed.lock().unwrap().recv_timeout(Duration::from_secs(10));
                    assert!(handed.is_ok(), "the next turn was never handed over");
                }
            }
        }
        let pool = Arc::new(Pool::new("gitball-test", 8));
        let place = Arc::new(Semaphore::new(1));
        let (handed, handed_over) = mpsc::channel();
        let handed_over = Arc::new(Mutex::new(handed_over));
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let turns: Vec<_> = (0..TURNS)
            .map(|_| {
                let (pool, place, taken) =
                    (Arc::clone(&pool), Arc::clone(&place), Arc::clone(&taken));
                let (handed, handed_over) = (handed.clone(), Arc::clone(&handed_over));
                runtime.spawn(async move {
                    let permit = place.acquire_owned().await.unwrap();
                    let turn = taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let wait = (turn + 1 < TURNS).then_some(handed_over);
                    let answer = pool.run((permit, UntilTheNextIsHandedOver(wait)), move || turn);
                    if turn > 0 {
                        handed.send(()).unwrap();
                    }
                    answer.await.unwrap()
                })
            })
            .collect();
        let mut answers: Vec<usize> = turns
            .into_iter()
            .map(|turn| {
                runtime
                    .block_on(async { tokio::time::timeout(Duration::from_secs(60), turn).await })
                    .expect("a turn never ran")
                    .unwrap()
            })
            .collect();
        answers.sort_unstable();
        assert_eq!(answers, (0..TURNS).collect::<Vec<_>>());
        assert_eq!(
            pool.threads(),
            1,
            "threads were started for work in a freed place"
        );
    }

    /// A panic in the work is its caller's error; the thread goes on and
    /// runs the next work, and what the work held is let go.
    #[test]
    fn a_panic_in_the_work_is_an_error_and_its_thread_goes_on() {
        let pool = Pool::new("gitball-test", 1);
        let place = Arc::new(Semaphore::new(1));
        let held = place.clone().try_acquire_owned().unwrap();
        let answer = block_on(pool.run(held, || -> usize { panic!("a damaged tree") }));
        assert!(
            matches!(&answer, Err(Lost::Panicked(message)) if message == "a damaged tree"),
            "{answer:?}"
        );
        assert_eq!(place.available_permits(), 1, "the place was not let go");
        assert_eq!(block_on(pool.run((), || 7)).unwrap(), 7);
        assert_eq!(pool.threads(), 1);
    }

    /// A caller that goes away leaves the work to run, holding what it
    /// held until it ends: its answer is kept for the next caller.
    #[test]
    fn work_whose_caller_went_away_still_runs() {
        let pool = Pool::new("gitball-test", 1);
        let place = Arc::new(Semaphore::new(1));
        let held = place.clone().try_acquire_owned().unwrap();
        let (go, wait) = mpsc::channel::<()>();
        let (done, ran) = mpsc::channel();
        drop(pool.run(held, move || {
            let _ = wait.recv();
            done.send("kept").unwrap();
        }));
        assert_eq!(place.available_permits(), 0, "the place was let go early");
        go.send(()).unwrap();
        assert_eq!(ran.recv_timeout(Duration::from_secs(30)), Ok("kept"));
        // Let go once its thread is idle again: the next work needs no
        // other thread.
        block_on(pool.run((), || ())).unwrap();
        assert_eq!(place.available_permits(), 1);
        assert_eq!(pool.threads(), 1);
    }

    /// A dropped pool's threads end once the work handed over has run.
    #[test]
    fn a_dropped_pools_threads_end_after_its_work() {
        let pool = Pool::new("gitball-test", 2);
        let shared = Arc::clone(&pool.shared);
        let answer = pool.run((), || 3);
        drop(pool);
        assert_eq!(block_on(answer).unwrap(), 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while shared.lock().threads > 0 {
            assert!(std::time::Instant::now() < deadline, "a thread never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
