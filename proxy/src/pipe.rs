//! The body: an upstream response piped to the client at the client's pace.
//!
//! [`Pipe`] is a `Stream` handed to `axum::body::Body::from_stream`. It
//! hands hyper one chunk at a time: the next chunk is taken from the
//! upstream only once hyper has written the last one to the client's socket
//! in full (hyper drops a body chunk then, and the chunk's drop wakes the
//! pipe). hyper alone would queue chunks until its write buffer bound (the
//! server's `max_buf_size`, 64 KiB) is passed, which a stalled client then
//! pins. So a download holds at most two chunks in the proxy, whatever the
//! archive's size: the one hyper is writing and the one the upstream
//! connection read ahead (64 KiB each, `forward::UPSTREAM_READ_BUFFER_BYTES`).
//! A slow client slows the upstream read, and TCP flow control carries that
//! back to the archiver, which reads its cache file at the same pace.
//! A body the upstream connection read whole with its head (a small cache
//! hit) has nothing to pipe: it goes to hyper in one piece ([`Whole`]).
//! A client that takes its first 4 MiB fast widens the upstream
//! connection's receive buffer for the rest of the download
//! (`crate::window`); the kernel memory of a slow one stays bounded.
//!
//! **Parked**: a client that takes no byte for `--park-after` (the chunk
//! handed to hyper still unwritten, and the connection's write stuck that
//! long, `ClientWrites::stuck_for`) loses its upstream: the watchdog drops
//! the upstream body, which closes that connection and frees the chunk read
//! ahead, the socket buffers on the way and the archiver's reader. When
//! hyper asks for more, the pipe gets the rest by range (`resume`) and
//! carries on; a resume that fails aborts the client connection.
//! `gitball_proxy_parked_downloads`, `gitball_proxy_resumes_total`.
//!
//! How a download ends, and what each way releases and counts:
//!
//! - **complete**: the upstream body ended cleanly; the stream ends and
//!   hyper finishes the response. With a `Content-Length`, hyper stops
//!   polling (and drops the pipe) as soon as that many bytes were written,
//!   so reaching the length counts as complete too; the upstream's own
//!   framing guarantees those bytes were the whole body.
//! - **client gone**: hyper drops the body before its end (the client closed,
//!   or the server's shutdown grace ran out). Dropping the pipe drops the
//!   upstream response at once, which closes that upstream connection
//!   rather than returning it to the pool, releasing its fd here and the
//!   archiver's reader there. `gitball_proxy_client_disconnects_total`
//!   (counted with the request's log line).
//! - **idle**: the client took no bytes for `--client-idle-timeout`. A
//!   watchdog task drops the upstream response at once, and the next poll
//!   returns an error so hyper aborts the client connection.
//!   `gitball_proxy_client_idle_timeouts_total`.
//! - **aborted**: the upstream body failed midway (archiver died,
//!   connection reset, body shorter than its `Content-Length`, or no byte
//!   from the upstream for `--header-timeout` while the client waits for
//!   one: a hung archiver, whose kernel still holds the connection open,
//!   would otherwise hold the download forever). The stream
//!   returns an error, so hyper aborts the client connection: a truncated
//!   archive never ends like a complete one. A silent upstream is
//!   ejected (it hangs); one that ended the body itself is not: an
//!   archiver aborts a download whose generation failed (git refused the
//!   tree, the archive grew past `--max-archive-bytes`), which says nothing
//!   of its health, and ejecting it would move everyone's traffic, hits
//!   included, off it. An archiver that died shows at the next connection.
//!   `gitball_proxy_upstream_aborts_total`.
//!
//! The idle watchdog is a task because a stalled client means hyper does
//! *not* poll the body — a timer inside the stream would never be looked at.
//! "Idle" is measured from the moment a chunk was handed to hyper until
//! hyper has written it and asks for the next one; time spent waiting for a
//! slow upstream does not count against the client. The watchdog starts
//! with the first chunk that is not the last, so a small archive sent in
//! one chunk costs no task and no timer.
//!
//! While the client stays stalled hyper does not poll the body, so the
//! client's connection itself is closed by the server loop's write-stall
//! guard (`gitball_core::server::StallGuard`, armed with the same
//! `--client-idle-timeout`), which sees the stuck socket write directly.
//!
//! `gitball_proxy_active_downloads` is held by a guard that lives exactly
//! as long as the pipe; `gitball_proxy_sent_bytes_total` counts bytes as
//! they are handed to hyper.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
// The tokio clock, so the idle watchdog runs on a paused clock in tests.
use tokio::time::Instant;

use gitball_core::log::Ending;
use gitball_core::server::ClientWrites;
use gitball_core::server::takeover::Takeover;

use crate::forward::{UpstreamResponse, body_length};
use crate::metrics::ActiveDownload;
use crate::resume::{Resume, ResumeError, Resumed};
use crate::splice::{Handoff, OpenError, Prepared, SLOTS, SpliceBody};
use crate::upstream::{Cut, Health};
use crate::window::{DownloadWindow, UpstreamWindow, WIDEN_AFTER_BYTES, WIDEN_WITHIN};

/// What the pipe reports when it ends, for the request's log line.
#[derive(Clone, Debug)]
pub struct End {
    pub ending: Ending,
    pub bytes: u64,
    /// The attempts of the download's range requests: its resumes after it
    /// was parked, and a splice's.
    pub resumes: crate::resume::Tried,
}

/// Why the body stream failed; hyper aborts the client connection on it.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("the client took no bytes for {0:?}")]
    IdleTimeout(Duration),
    #[error("the upstream body failed: {0}")]
    Upstream(#[source] UpstreamError),
    #[error("the parked download could not be resumed: {0}")]
    Resume(#[source] ResumeError),
}

/// The upstream sent no body bytes for this long while the client waited.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
pub struct UpstreamSilent(pub Duration);

/// What a body's failure says of its upstream: gone (`Cut::Gone`) when it
/// sent nothing for the silence bound or the kernel gave up on its host
/// (`ETIMEDOUT` after retransmissions, no route); otherwise it closed or
/// reset the connection itself (`Cut::ByUpstream`), as an archiver cuts a
/// failed generation's download.
pub(crate) fn cut_by(error: &(dyn std::error::Error + 'static)) -> Cut {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.downcast_ref::<UpstreamSilent>().is_some()
            || error.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                )
            })
        {
            return Cut::Gone;
        }
        cause = error.source();
    }
    Cut::ByUpstream
}

/// Why the upstream body failed (a `hyper::Error` from the client; boxed
/// so the tests can stand in any error).
pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream body's data frames (trailers, which archivers do not send,
/// are skipped).
pub type UpstreamBody = BoxStream<'static, Result<Bytes, UpstreamError>>;

/// The pipe's timers, from the proxy's flags.
#[derive(Clone, Copy, Debug)]
pub struct Timers {
    /// `--client-idle-timeout`.
    pub idle_timeout: Duration,
    /// `--header-timeout`: bounds each wait for the upstream's next chunk.
    pub upstream_silence: Duration,
    /// `--park-after`; zero: never park.
    pub park_after: Duration,
}

/// A fast download is spliced only if at least this much of it is left:
/// an upstream connection and a pipe are not worth less.
pub(crate) const MIN_SPLICED_BYTES: u64 = 1 << 20;

/// `waiting_since_ms` when the pipe is not waiting for the client.
const NOT_WAITING: u64 = u64::MAX;

/// State shared by the pipe and its idle watchdog.
struct Shared {
    /// The upstream body; `None` once it ended or the watchdog dropped it.
    /// The lock is held only inside `poll_next` and by the watchdog while
    /// it takes the body: never across an await.
    upstream: Mutex<Option<UpstreamBody>>,
    /// Milliseconds since `started` at which the last chunk was handed to
    /// hyper without hyper asking for the next yet; `NOT_WAITING` otherwise.
    waiting_since_ms: AtomicU64,
    /// Set by the watchdog when it cut the download for idleness.
    idle_timed_out: AtomicBool,
    /// Set by the watchdog when it released the upstream of a download
    /// whose client takes nothing; cleared when the download resumed.
    parked: AtomicBool,
    /// Wakes the watchdog when a parked download resumed: it does not look
    /// for a stall while parked, and the next may come at once.
    resumed: tokio::sync::Notify,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UpstreamBody>> {
        // Poisoning would need a panic inside the upstream stream's poll;
        // the `Option` is still coherent then.
        self.upstream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NOT_WAITING - 1)
    }

    /// Marks the download as no longer parked (resumed, or over).
    /// Whether the download was parked.
    fn unpark(&self) -> bool {
        let parked = self.parked.swap(false, Ordering::AcqRel);
        if parked {
            crate::metrics::parked_downloads(-1.0);
            // A permit if the watchdog is not waiting yet: not lost.
            self.resumed.notify_one();
        }
        parked
    }
}

/// Whether the last chunk handed to hyper is still waiting to be written to
/// the client's socket, and who to wake when it has been.
#[derive(Default)]
struct InFlight {
    busy: AtomicBool,
    waker: AtomicWaker,
}

/// A chunk as handed to hyper. hyper drops it once its last byte went to
/// the socket (it queues body chunks as they are, without copying them);
/// that drop frees the chunk's memory and lets the pipe read the next one.
struct Handed {
    chunk: Bytes,
    in_flight: Arc<InFlight>,
}

impl AsRef<[u8]> for Handed {
    fn as_ref(&self) -> &[u8] {
        &self.chunk
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        self.in_flight.busy.store(false, Ordering::Release);
        self.in_flight.waker.wake();
    }
}

/// The upstream body as a client body stream. See the module docs.
pub struct Pipe {
    shared: Arc<Shared>,
    in_flight: Arc<InFlight>,
    timers: Timers,
    /// Started with the first chunk that is not the last: a small archive
    /// sent in one chunk never needs one.
    watchdog: Option<tokio::task::JoinHandle<()>>,
    health: Arc<Health>,
    upstream_name: Arc<str>,
    bytes: u64,
    /// The body's length when the upstream sent `Content-Length`.
    expected_bytes: Option<u64>,
    ending: Option<Ending>,
    on_end: Option<Box<dyn FnOnce(End) + Send>>,
    /// How to get the upstream back after parking; `None`: never parked.
    resume: Option<Arc<Resume>>,
    /// A resume under way (the client asked for more while parked).
    resuming: Option<BoxFuture<'static, Result<Resumed, ResumeError>>>,
    /// The client connection's writes (see `Drop` and `watch`).
    writes: Option<ClientWrites>,
    /// The upstream connection's window, until the download was judged
    /// (`crate::window`); and when the first chunk was handed over.
    window: Option<(DownloadWindow, Option<Instant>)>,
    /// Whether the rest of the download may be spliced (`crate::splice`).
    splice: Splicing,
    /// Moves to the spliced body when the download is handed over.
    active: Option<ActiveDownload>,
    /// A `2xx` answer: its body ending whole says archives do not all
    /// fail at the upstream (`Health::answered_whole`); an error's body,
    /// a `404`'s or the `500` itself, says nothing of that (review: attack).
    archive: bool,
    /// The upstream whose generation, under way before this request, the
    /// download joined (`X-Gitball-Cache: join`): its cut there is counted
    /// by the request that started the generation (`Cut::Joined`).
    joined: Option<Arc<str>>,
}

/// Where a download stands with `crate::splice`.
enum Splicing {
    /// Not for this download, or declined.
    No,
    /// Spliced if its client proves fast.
    Possible(Takeover),
    /// Asking the upstream for the rest; the window is widened instead if
    /// that fails.
    Preparing {
        takeover: Takeover,
        prepared: BoxFuture<'static, Result<Prepared, OpenError>>,
        window: DownloadWindow,
    },
    /// The spliced body has the download: this pipe is done with it.
    HandedOver,
}

impl Pipe {
    /// Starts piping `response`'s body. `on_end` is called exactly once,
    /// when the download ends by any path. Must be polled inside a tokio
    /// runtime (it spawns the idle watchdog). Without `resume` the download
    /// keeps its upstream while the client is stalled.
    pub fn new(
        response: UpstreamResponse,
        upstream_name: Arc<str>,
        health: Arc<Health>,
        timers: Timers,
        resume: Option<Resume>,
        on_end: impl FnOnce(End) + Send + 'static,
    ) -> Pipe {
        let expected_bytes = body_length(&response);
        let archive = response.status().is_success();
        let window = response.body().window().map(UpstreamWindow::for_download);
        let body = response
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map_err(UpstreamError::from));
        let mut pipe = Pipe::from_stream(
            fail_when_silent(Box::pin(body), timers.upstream_silence),
            expected_bytes,
            upstream_name,
            health,
            timers,
            on_end,
        );
        pipe.resume = resume.map(Arc::new);
        pipe.window = window.map(|window| (window, None));
        pipe.archive = archive;
        pipe
    }

    /// Tells the pipe whether its response head said the request joined a
    /// generation under way at the upstream (`upstream::joined`, read
    /// before the head's headers moved to the client's response): a cut
    /// there is then `Cut::Joined`.
    pub fn joined(mut self, joined: bool) -> Pipe {
        self.joined = joined.then(|| self.upstream_name.clone());
        self
    }

    fn from_stream(
        upstream: UpstreamBody,
        expected_bytes: Option<u64>,
        upstream_name: Arc<str>,
        health: Arc<Health>,
        timers: Timers,
        on_end: impl FnOnce(End) + Send + 'static,
    ) -> Pipe {
        let shared = Arc::new(Shared {
            upstream: Mutex::new(Some(upstream)),
            // Set when the first chunk is handed over, which starts the
            // watchdog.
            waiting_since_ms: AtomicU64::new(NOT_WAITING),
            idle_timed_out: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            resumed: tokio::sync::Notify::new(),
            started: Instant::now(),
        });
        Pipe {
            shared,
            in_flight: Arc::default(),
            timers,
            watchdog: None,
            health,
            upstream_name,
            bytes: 0,
            expected_bytes,
            ending: None,
            on_end: Some(Box::new(on_end)),
            resume: None,
            resuming: None,
            writes: None,
            window: None,
            archive: true,
            joined: None,
            splice: Splicing::No,
            active: Some(ActiveDownload::start()),
        }
    }

    /// Tells the pipe its client connection's writes: whether the server's
    /// write-stall guard cut the connection (then the download ended for
    /// idleness), and how long a write has been stuck (which parks it);
    /// and whether the connection can be taken from hyper for a splice.
    pub fn on_connection(
        mut self,
        writes: Option<ClientWrites>,
        takeover: Option<Takeover>,
    ) -> Pipe {
        self.writes = writes;
        if let Some(takeover) = takeover
            && self.expected_bytes.is_some()
            && self.resume.is_some()
        {
            self.splice = Splicing::Possible(takeover);
        }
        self
    }
}

/// `body`, failing with [`UpstreamSilent`] when a chunk asked for does not
/// come within `limit`. The clock runs only while the pipe waits for the
/// upstream, that is while the client is ready for more: a slow client
/// never makes its upstream look silent.
pub(crate) fn fail_when_silent(body: UpstreamBody, limit: Duration) -> UpstreamBody {
    Box::pin(futures_util::stream::unfold(
        Some(body),
        move |body| async move {
            let mut body = body?;
            match tokio::time::timeout(limit, body.next()).await {
                Ok(Some(item)) => Some((item, Some(body))),
                Ok(None) => None,
                // The body is dropped here: its connection closes now.
                Err(_) => Some((Err(UpstreamError::from(UpstreamSilent(limit))), None)),
            }
        },
    ))
}

/// When to park a download: its client has not asked for the next chunk,
/// and its connection's write has taken no byte, for `after`.
struct Park {
    after: Duration,
    /// `None` without a server connection (in-process tests): the wait for
    /// the next ask alone counts.
    writes: Option<ClientWrites>,
}

/// Watches a download while the client holds its last chunk: parks it
/// (releases the upstream, `park`) once the client has taken nothing for
/// `park.after`, and cuts it (drops the upstream, then returns) once the
/// client has not asked for a chunk for `idle_timeout`. Aborted when the
/// pipe is dropped.
async fn watch(shared: Arc<Shared>, idle_timeout: Duration, park: Option<Park>) {
    let as_ms = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2);
    let idle_ms = as_ms(idle_timeout);
    loop {
        let since = shared.waiting_since_ms.load(Ordering::Acquire);
        let now = shared.now_ms();
        let mut wait_ms = if since == NOT_WAITING {
            // Waiting for the upstream, not the client: look again later.
            idle_ms
        } else if now.saturating_sub(since) >= idle_ms {
            let mut upstream = shared.lock();
            // Re-check under the lock: `poll_next` clears the mark while
            // holding it, so this cannot race with a chunk being taken.
            if shared.waiting_since_ms.load(Ordering::Acquire) == since {
                // Drop the upstream response here and now: its connection
                // closes even though the stalled client connection lingers.
                let body = upstream.take();
                let counted = shared.idle_timed_out.swap(true, Ordering::AcqRel);
                drop(upstream);
                drop(body);
                // Counted now, not when the client comes back (it may never).
                if !counted {
                    crate::metrics::client_idle_timeout();
                }
                tracing::debug!(?idle_timeout, "client idle; upstream released");
                return;
            }
            continue;
        } else {
            since + idle_ms - now
        };
        if let Some(park) = &park
            && !shared.parked.load(Ordering::Acquire)
        {
            let after_ms = as_ms(park.after);
            let waited_ms = now.saturating_sub(since);
            // How long the client's socket has taken nothing: a slow client
            // that still takes bytes keeps its upstream. While the client
            // is taking bytes (`NOT_WAITING`), look again in `after`.
            let stuck_ms = match &park.writes {
                _ if since == NOT_WAITING => None,
                Some(writes) => writes.stuck_for().map(as_ms),
                None => Some(waited_ms),
            };
            match stuck_ms {
                Some(stuck_ms) if waited_ms >= after_ms && stuck_ms >= after_ms => {
                    let mut upstream = shared.lock();
                    if shared.waiting_since_ms.load(Ordering::Acquire) == since
                        && upstream.is_some()
                    {
                        let body = upstream.take();
                        shared.parked.store(true, Ordering::Release);
                        drop(upstream);
                        // Closes the upstream connection: the chunk it read
                        // ahead, its socket buffers and the archiver's
                        // reader go now.
                        drop(body);
                        crate::metrics::parked_downloads(1.0);
                        tracing::debug!(after = ?park.after, "client stalled; download parked");
                    }
                    continue;
                }
                Some(stuck_ms) => {
                    let until = after_ms - waited_ms.min(stuck_ms).min(after_ms);
                    wait_ms = wait_ms.min(until);
                }
                None => wait_ms = wait_ms.min(after_ms),
            }
        }
        let sleep = tokio::time::sleep(Duration::from_millis(wait_ms.max(1)));
        if park.is_some() && shared.parked.load(Ordering::Acquire) {
            // Parked, the wait above is the idle timeout's alone: a resumed
            // download that stalls again is parked after `--park-after`,
            // not when that wait ends (attack: up to a minute later).
            tokio::select! {
                () = sleep => {}
                () = shared.resumed.notified() => {}
            }
        } else {
            sleep.await;
        }
    }
}

impl Pipe {
    /// Ends the download other than by an abort.
    fn end(&mut self, ending: Ending) {
        self.end_with(ending, Cut::NotUpstreams);
    }

    /// Ends the download; an abort is held against the upstream as `cut`
    /// says (`Health::cut`), once, if the download really ends so.
    fn end_with(&mut self, ending: Ending, cut: Cut) {
        if self.ending.is_some() || matches!(self.splice, Splicing::HandedOver) {
            return;
        }
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        self.shared.unpark();
        // Once the watchdog cut the download, however the pipe ends next
        // (an error at the next poll, or a drop when the client finally
        // leaves) it ended for idleness.
        let ending = if self.shared.idle_timed_out.load(Ordering::Acquire) {
            Ending::IdleTimeout
        } else {
            ending
        };
        self.ending = Some(ending);
        match ending {
            Ending::Complete if self.archive => self.health.answered_whole(&self.upstream_name),
            Ending::Complete => {}
            // Counted with the request (`metrics::request_finished`).
            Ending::ClientGone | Ending::Shutdown => {}
            // Counted by the watchdog when it fired.
            Ending::IdleTimeout => {}
            Ending::Aborted => {
                crate::metrics::upstream_abort(&self.upstream_name);
                let cut = cut.of_download(&self.upstream_name, self.joined.as_deref());
                self.health.cut(&self.upstream_name, cut);
            }
        }
        if let Some(on_end) = self.on_end.take() {
            on_end(End {
                ending,
                bytes: self.bytes,
                resumes: self
                    .resume
                    .as_ref()
                    .map(|resume| resume.tried())
                    .unwrap_or_default(),
            });
        }
    }

    /// The client asks for more while the download is parked: get the
    /// rest from an upstream (`resume`), then carry on.
    fn poll_resume(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ResumeError>> {
        let Some(resume) = self.resume.clone() else {
            // Parked only when resumable.
            return Poll::Ready(Err(ResumeError::NoAnswer("not resumable".into())));
        };
        let sent = self.bytes;
        let resuming = self
            .resuming
            .get_or_insert_with(|| Box::pin(async move { resume.resume(sent).await }));
        let resumed = match resuming.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(resumed) => resumed,
        };
        self.resuming = None;
        let resumed = match resumed {
            Ok(resumed) => resumed,
            Err(error) => {
                crate::metrics::resume("failed");
                return Poll::Ready(Err(error));
            }
        };
        crate::metrics::resume("resumed");
        tracing::debug!(upstream = %resumed.upstream, sent, "parked download resumed");
        self.upstream_name = resumed.upstream;
        // Silence is bounded per upstream chunk inside the resumed body,
        // the skipped ones included (`Resume::resume`).
        *self.shared.lock() = Some(resumed.body);
        self.shared.unpark();
        Poll::Ready(Ok(()))
    }
}

impl Pipe {
    /// Widens the upstream connection's window once the client has taken
    /// [`WIDEN_AFTER_BYTES`] within [`WIDEN_WITHIN`] of the first chunk;
    /// judged once per download. Called with a chunk that is not the last.
    fn judge_window(&mut self) {
        let Some((window, first)) = &mut self.window else {
            return;
        };
        let first = *first.get_or_insert_with(Instant::now);
        if self.bytes < WIDEN_AFTER_BYTES {
            return;
        }
        if first.elapsed() <= WIDEN_WITHIN {
            let splice = std::mem::replace(&mut self.splice, Splicing::No);
            let left = self
                .expected_bytes
                .map_or(0, |length| length.saturating_sub(self.bytes));
            match (splice, &self.resume) {
                (Splicing::Possible(takeover), Some(resume)) if left >= MIN_SPLICED_BYTES => {
                    if let Some(slot) = SLOTS.take() {
                        let resume = resume.clone();
                        let sent = self.bytes;
                        self.splice = Splicing::Preparing {
                            takeover,
                            prepared: Box::pin(async move {
                                crate::splice::prepare(&resume, sent, slot).await
                            }),
                            window: window.clone(),
                        };
                    } else {
                        crate::metrics::splice("declined");
                        window.widen();
                    }
                }
                _ => {
                    window.widen();
                }
            }
        }
        self.window = None;
    }

    /// Polls the splice being prepared: `Ready(true)` once the download
    /// was handed over, `Ready(false)` if it carries on here.
    fn poll_splice(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Splicing::Preparing { prepared, .. } = &mut self.splice else {
            return Poll::Ready(matches!(self.splice, Splicing::HandedOver));
        };
        let prepared = ready!(prepared.as_mut().poll(cx));
        let Splicing::Preparing {
            takeover, window, ..
        } = std::mem::replace(&mut self.splice, Splicing::No)
        else {
            return Poll::Ready(false);
        };
        let spliced = match prepared {
            Ok(spliced) => spliced,
            Err(error) => {
                tracing::debug!(%error, "download not spliced; piped on");
                crate::metrics::splice("declined");
                window.widen();
                return Poll::Ready(false);
            }
        };
        let mut upstream = self.shared.lock();
        if self.shared.idle_timed_out.load(Ordering::Acquire) {
            // The watchdog cut the download meanwhile: it ends here, for
            // idleness, as the pipe's next step says.
            return Poll::Ready(false);
        }
        // A download is prepared only with a length and a resume, and its
        // end and its gauge are taken only here or when it ends (after
        // which it is never polled).
        let (Some(resume), Some(length)) = (self.resume.clone(), self.expected_bytes) else {
            return Poll::Ready(false);
        };
        let (Some(on_end), Some(active)) = (self.on_end.take(), self.active.take()) else {
            return Poll::Ready(false);
        };
        // Parked while the client held the chunk before the preparation
        // began: the spliced body has an upstream of its own, whose range
        // request is this download's resume (review: it was not counted).
        if self.shared.unpark() {
            crate::metrics::resume("resumed");
        }
        // Closes the pooled upstream connection mid-body: the spliced
        // body has a connection of its own.
        let pooled = upstream.take();
        drop(upstream);
        drop(pooled);
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        self.splice = Splicing::HandedOver;
        crate::metrics::splice("spliced");
        takeover.hand_over(Box::new(SpliceBody::new(
            spliced,
            Handoff {
                resume,
                sent: self.bytes,
                length,
                timers: self.timers,
                health: self.health.clone(),
                on_end,
                active,
                writes: self.writes.clone(),
                joined: self.joined.clone(),
            },
        )));
        Poll::Ready(true)
    }
}

impl Stream for Pipe {
    type Item = Result<Bytes, PipeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ending.is_some() {
            return Poll::Ready(None);
        }
        if this.in_flight.busy.load(Ordering::Acquire) {
            // hyper has room in its write buffer but the client has not
            // taken the last chunk yet: wait for it (`Handed::drop`), with
            // the idle clock running.
            this.in_flight.waker.register(cx.waker());
            if this.in_flight.busy.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        if !matches!(this.splice, Splicing::No | Splicing::Possible(_)) {
            {
                // Under the lock, as below: the watchdog re-checks the mark
                // under it before it parks or cuts the download.
                let _upstream = this.shared.lock();
                this.shared
                    .waiting_since_ms
                    .store(NOT_WAITING, Ordering::Release);
            }
            if ready!(this.poll_splice(cx)) {
                // The accept loop takes the connection from hyper once it
                // has written what it was given; hyper never polls this
                // body again.
                return Poll::Pending;
            }
        }
        let shared = this.shared.clone();
        let mut upstream = shared.lock();
        // hyper is asking for more: the client is taking bytes.
        shared
            .waiting_since_ms
            .store(NOT_WAITING, Ordering::Release);
        if upstream.is_none() {
            drop(upstream);
            // Only the watchdog takes the body while the pipe is running:
            // to cut an idle client, or to park a stalled one.
            if shared.idle_timed_out.load(Ordering::Acquire)
                || !shared.parked.load(Ordering::Acquire)
            {
                this.end(Ending::IdleTimeout);
                return Poll::Ready(Some(Err(PipeError::IdleTimeout(this.timers.idle_timeout))));
            }
            match this.poll_resume(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => {
                    tracing::warn!(%error, "parked download not resumed; aborting it");
                    this.end_with(Ending::Aborted, Cut::NotUpstreams);
                    return Poll::Ready(Some(Err(PipeError::Resume(error))));
                }
            }
            upstream = shared.lock();
        }
        let Some(body) = upstream.as_mut() else {
            drop(upstream);
            this.end(Ending::IdleTimeout);
            return Poll::Ready(Some(Err(PipeError::IdleTimeout(this.timers.idle_timeout))));
        };
        match body.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let length = chunk.len() as u64;
                this.in_flight.busy.store(true, Ordering::Release);
                let chunk = Bytes::from_owner(Handed {
                    chunk,
                    in_flight: this.in_flight.clone(),
                });
                this.bytes += length;
                crate::metrics::sent_bytes(length);
                if Some(this.bytes) == this.expected_bytes {
                    // hyper will not ask again; see the module docs.
                    upstream.take();
                    drop(upstream);
                    this.end(Ending::Complete);
                } else {
                    shared
                        .waiting_since_ms
                        .store(shared.now_ms(), Ordering::Release);
                    this.judge_window();
                    if this.watchdog.is_none() {
                        let park = (this.resume.is_some() && !this.timers.park_after.is_zero())
                            .then(|| Park {
                                after: this.timers.park_after,
                                writes: this.writes.clone(),
                            });
                        this.watchdog = Some(tokio::spawn(watch(
                            this.shared.clone(),
                            this.timers.idle_timeout,
                            park,
                        )));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                upstream.take();
                drop(upstream);
                tracing::warn!(upstream = %this.upstream_name, %error, "upstream body failed midway");
                // A silent archiver is hung: ejected. One that ended the
                // body itself (a generation that failed, too large, or the
                // archiver gone, which the next connection will show) is
                // not: see the module docs.
                this.end_with(Ending::Aborted, cut_by(&*error));
                Poll::Ready(Some(Err(PipeError::Upstream(error))))
            }
            Poll::Ready(None) => {
                upstream.take();
                drop(upstream);
                if let Some(expected) = this.expected_bytes
                    && this.bytes != expected
                {
                    // An upstream that framed a resumed body shorter than
                    // its announced range: never a clean end short.
                    let error = UpstreamError::from(format!(
                        "the upstream body ended after {} of {expected} bytes",
                        this.bytes
                    ));
                    tracing::warn!(upstream = %this.upstream_name, %error, "upstream body failed midway");
                    this.end_with(Ending::Aborted, Cut::ByUpstream);
                    return Poll::Ready(Some(Err(PipeError::Upstream(error))));
                }
                this.end(Ending::Complete);
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // The upstream body (if still there) is dropped with `shared` once
        // the watchdog is gone; abort it first so that happens now.
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        self.shared.lock().take();
        // The server's write-stall guard (same timeout) may close a stalled
        // client's connection before the watchdog fires: then the download
        // ended for idleness, not because the client left.
        if self.ending.is_none()
            && !matches!(self.splice, Splicing::HandedOver)
            && self.writes.as_ref().is_some_and(ClientWrites::timed_out)
            && !self.shared.idle_timed_out.swap(true, Ordering::AcqRel)
        {
            crate::metrics::client_idle_timeout();
        }
        self.end(Ending::ClientGone);
    }
}

/// A body whose every byte the upstream connection's reads hold already
/// (`PooledBody::take_whole`), handed to hyper in one frame: a small cache
/// hit, a `206` of a few bytes, an archiver's `404`. Its connection went
/// back to the pool as the body was taken, so nothing can fail, park or
/// splice it; a [`Pipe`] would only hand the same one chunk over, at the
/// cost of its shared state, its boxed streams and a timer per chunk
/// (about a twentieth of a small hit's instructions: `BENCHMARKS.md`).
/// What the pipe settles at such a body's end is settled when it is made:
/// the bytes counted as sent, and a `2xx` that ends whole marking its
/// upstream as answering archives (`Health::answered_whole`). It holds
/// `gitball_proxy_active_downloads` until hyper has written it.
pub struct Whole {
    body: Option<Bytes>,
    length: u64,
    _active: ActiveDownload,
}

/// Whole bodies made so far (tests tell the path taken by it).
#[cfg(test)]
pub(crate) static WHOLE_BODIES: AtomicU64 = AtomicU64::new(0);

impl Whole {
    /// `body`, the whole of `upstream`'s answer with `status`.
    pub fn new(
        body: Bytes,
        upstream: &Arc<str>,
        status: http::StatusCode,
        health: &Health,
    ) -> Whole {
        let length = body.len() as u64;
        crate::metrics::sent_bytes(length);
        if status.is_success() {
            health.answered_whole(upstream);
        }
        #[cfg(test)]
        WHOLE_BODIES.fetch_add(1, Ordering::Relaxed);
        Whole {
            body: Some(body),
            length,
            _active: ActiveDownload::start(),
        }
    }

    /// Its bytes, for the request's log line.
    pub fn bytes(&self) -> u64 {
        self.length
    }
}

impl hyper::body::Body for Whole {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(
            self.body
                .take()
                .map(|body| Ok(hyper::body::Frame::data(body))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.body.as_ref().map_or(0, |body| body.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// Timers with `idle` as the idle timeout; no parking.
    fn timers(idle: Duration) -> Timers {
        Timers {
            idle_timeout: idle,
            upstream_silence: Duration::from_secs(60),
            park_after: Duration::ZERO,
        }
    }

    /// An upstream body that records when it is dropped.
    struct Tracked {
        chunks: std::vec::IntoIter<Result<Bytes, UpstreamError>>,
        dropped: Arc<AtomicBool>,
        pending_at_end: bool,
    }

    impl Stream for Tracked {
        type Item = Result<Bytes, UpstreamError>;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.chunks.next() {
                Some(item) => Poll::Ready(Some(item)),
                None if self.pending_at_end => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn pipe(
        chunks: Vec<&'static [u8]>,
        pending_at_end: bool,
        idle: Duration,
    ) -> (Pipe, Arc<AtomicBool>, Arc<Mutex<Option<End>>>) {
        pipe_expecting(chunks, None, pending_at_end, idle)
    }

    fn pipe_expecting(
        chunks: Vec<&'static [u8]>,
        expected: Option<u64>,
        pending_at_end: bool,
        idle: Duration,
    ) -> (Pipe, Arc<AtomicBool>, Arc<Mutex<Option<End>>>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let upstream = Tracked {
            chunks: chunks
                .into_iter()
                .map(|c| Ok(Bytes::from_static(c)))
                .collect::<Vec<_>>()
                .into_iter(),
            dropped: dropped.clone(),
            pending_at_end,
        };
        let record = ended.clone();
        let pipe = Pipe::from_stream(
            Box::pin(upstream),
            expected,
            Arc::from("http://upstream:1"),
            Arc::new(Health::new(Duration::from_secs(10))),
            timers(idle),
            move |end| *record.lock().unwrap() = Some(end),
        );
        (pipe, dropped, ended)
    }

    #[tokio::test]
    async fn complete_body_ends_cleanly_and_reports_bytes() {
        let (mut pipe, dropped, ended) =
            pipe(vec![b"abc", b"defg"], false, Duration::from_secs(60));
        assert_eq!(&pipe.next().await.unwrap().unwrap()[..], b"abc");
        assert_eq!(&pipe.next().await.unwrap().unwrap()[..], b"defg");
        assert!(pipe.next().await.is_none());
        assert!(
            dropped.load(Ordering::SeqCst),
            "upstream released at the end"
        );
        let end = ended.lock().unwrap().clone().unwrap();
        assert_eq!(end.ending, Ending::Complete);
        assert_eq!(end.bytes, 7);
        drop(pipe);
        // Dropping after the end is not a disconnect.
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::Complete
        );
    }

    #[tokio::test]
    async fn reaching_content_length_is_complete_even_if_dropped_then() {
        // hyper drops the body once Content-Length bytes are written,
        // without polling it to its end.
        let (mut pipe, dropped, ended) = pipe_expecting(
            vec![b"abc", b"defg"],
            Some(7),
            true,
            Duration::from_secs(60),
        );
        assert!(pipe.next().await.is_some());
        assert!(pipe.next().await.is_some());
        assert!(dropped.load(Ordering::SeqCst));
        drop(pipe);
        let end = ended.lock().unwrap().clone().unwrap();
        assert_eq!(end.ending, Ending::Complete);
        assert_eq!(end.bytes, 7);
    }

    #[tokio::test]
    async fn the_next_chunk_waits_until_the_last_one_was_written() {
        let (mut pipe, _dropped, _ended) =
            pipe(vec![b"abc", b"def"], false, Duration::from_secs(60));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(Ok(first))) = Pin::new(&mut pipe).poll_next(&mut cx) else {
            panic!("the first chunk is ready");
        };
        // hyper still holds the first chunk (the client has not taken it):
        // the pipe reads nothing more from the upstream.
        assert!(Pin::new(&mut pipe).poll_next(&mut cx).is_pending());
        assert!(Pin::new(&mut pipe).poll_next(&mut cx).is_pending());
        // Written out and dropped: the next chunk comes.
        drop(first);
        let Poll::Ready(Some(Ok(second))) = Pin::new(&mut pipe).poll_next(&mut cx) else {
            panic!("the second chunk is ready once the first is gone");
        };
        assert_eq!(&second[..], b"def");
    }

    #[tokio::test]
    async fn a_written_chunk_wakes_the_pipe() {
        let (mut pipe, _dropped, _ended) =
            pipe(vec![b"abc", b"def"], false, Duration::from_secs(60));
        let first = pipe.next().await.unwrap().unwrap();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(first);
        });
        // Resolves only if dropping the first chunk wakes the pipe.
        let second = tokio::time::timeout(Duration::from_secs(10), pipe.next())
            .await
            .expect("woken when the first chunk was dropped");
        assert_eq!(&second.unwrap().unwrap()[..], b"def");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn client_leaving_drops_the_upstream_at_once() {
        let (mut pipe, dropped, ended) = pipe(vec![b"abc"], true, Duration::from_secs(60));
        assert!(pipe.next().await.is_some());
        assert!(!dropped.load(Ordering::SeqCst));
        drop(pipe);
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::ClientGone
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_loses_the_upstream_and_gets_an_error() {
        let (mut pipe, dropped, ended) =
            pipe(vec![b"abc", b"def"], false, Duration::from_millis(100));
        assert!(pipe.next().await.is_some());
        // The client takes nothing for longer than the idle timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "upstream dropped by the watchdog"
        );
        assert!(matches!(
            pipe.next().await,
            Some(Err(PipeError::IdleTimeout(_)))
        ));
        assert!(pipe.next().await.is_none());
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::IdleTimeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_that_then_leaves_counts_as_idle() {
        let (mut pipe, _dropped, ended) = pipe(vec![b"abc"], true, Duration::from_millis(100));
        assert!(pipe.next().await.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(pipe);
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::IdleTimeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slow_upstream_is_not_client_idleness() {
        let (mut pipe, dropped, _ended) = pipe(vec![b"abc"], true, Duration::from_millis(100));
        assert!(pipe.next().await.is_some());
        // hyper asks for the next chunk; the upstream has none yet.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut pipe).poll_next(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dropped.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_silent_midway_is_an_abort_not_a_hang() {
        let dropped = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        // One chunk, then nothing: a stopped archiver's connection.
        let upstream = Tracked {
            chunks: vec![Ok(Bytes::from_static(b"abc"))].into_iter(),
            dropped: dropped.clone(),
            pending_at_end: true,
        };
        let record = ended.clone();
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let mut pipe = Pipe::from_stream(
            fail_when_silent(Box::pin(upstream), Duration::from_secs(3)),
            None,
            Arc::from("http://upstream:1"),
            health.clone(),
            timers(Duration::from_secs(60)),
            move |end| *record.lock().unwrap() = Some(end),
        );
        assert!(pipe.next().await.unwrap().is_ok());
        let started = Instant::now();
        assert!(matches!(
            pipe.next().await,
            Some(Err(PipeError::Upstream(_)))
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(dropped.load(Ordering::SeqCst), "upstream released");
        assert!(pipe.next().await.is_none());
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::Aborted
        );
        assert!(health.is_ejected("http://upstream:1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_does_not_make_its_upstream_silent() {
        let (dropped, ended) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(None)));
        let upstream = Tracked {
            chunks: vec![
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::from_static(b"def")),
            ]
            .into_iter(),
            dropped: dropped.clone(),
            pending_at_end: false,
        };
        let record = ended.clone();
        let mut pipe = Pipe::from_stream(
            fail_when_silent(Box::pin(upstream), Duration::from_secs(3)),
            None,
            Arc::from("http://upstream:1"),
            Arc::new(Health::new(Duration::from_secs(10))),
            timers(Duration::from_secs(60)),
            move |end| *record.lock().unwrap() = Some(end),
        );
        assert!(pipe.next().await.unwrap().is_ok());
        // The client takes 10 s before asking for more: not the upstream's fault.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(&pipe.next().await.unwrap().unwrap()[..], b"def");
        assert!(pipe.next().await.is_none());
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::Complete
        );
    }

    /// How a test pipe ended, once it has.
    type Ended = Arc<Mutex<Option<End>>>;

    /// A pipe whose upstream sends `abc`, then fails with an `io::Error` of
    /// `kind` (standing in for the `hyper::Error` hyper wraps it in); with
    /// its health, whether the upstream was dropped, and how it ended.
    fn failing_midway(kind: std::io::ErrorKind) -> (Pipe, Arc<Health>, Arc<AtomicBool>, Ended) {
        let dropped = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let upstream = Tracked {
            chunks: vec![
                Ok(Bytes::from_static(b"abc")),
                Err(std::io::Error::from(kind).into()),
            ]
            .into_iter(),
            dropped: dropped.clone(),
            pending_at_end: false,
        };
        let record = ended.clone();
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let pipe = Pipe::from_stream(
            Box::pin(upstream),
            None,
            Arc::from("http://127.0.0.1:1"),
            health.clone(),
            timers(Duration::from_secs(60)),
            move |end| *record.lock().unwrap() = Some(end),
        );
        (pipe, health, dropped, ended)
    }

    #[tokio::test]
    async fn upstream_failure_midway_is_an_error_not_an_end() {
        let (mut pipe, health, dropped, ended) =
            failing_midway(std::io::ErrorKind::ConnectionReset);
        assert!(pipe.next().await.unwrap().is_ok());
        assert!(matches!(
            pipe.next().await,
            Some(Err(PipeError::Upstream(_)))
        ));
        assert!(dropped.load(Ordering::SeqCst));
        assert_eq!(
            ended.lock().unwrap().clone().unwrap().ending,
            Ending::Aborted
        );
        // The upstream ended the body itself (an archiver aborts a failed
        // generation's download): not ejected; only a silent one is.
        assert!(!health.is_ejected("http://127.0.0.1:1"));
    }

    /// A body that failed because the kernel gave up on the upstream's host
    /// (`ETIMEDOUT` after retransmissions, no route) ejects it; a reset does
    /// not (`upstream_failure_midway_is_an_error_not_an_end`).
    #[tokio::test]
    async fn an_upstream_host_the_kernel_gave_up_on_is_ejected() {
        for kind in [
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::HostUnreachable,
        ] {
            let (mut pipe, health, _, _) = failing_midway(kind);
            assert!(pipe.next().await.unwrap().is_ok());
            assert!(pipe.next().await.unwrap().is_err());
            assert!(health.is_ejected("http://127.0.0.1:1"), "{kind:?}");
        }
    }

    /// An upstream body that ends cleanly short of the length the download
    /// announced (a resumed body an upstream framed shorter than its range)
    /// is an abort, never a clean end short.
    #[tokio::test]
    async fn an_upstream_body_ending_short_of_the_length_is_an_abort() {
        let (mut pipe, dropped, ended) = pipe_expecting(
            vec![b"abc", b"def"],
            Some(10),
            false,
            Duration::from_secs(60),
        );
        assert!(pipe.next().await.unwrap().is_ok());
        assert!(pipe.next().await.unwrap().is_ok());
        assert!(matches!(
            pipe.next().await,
            Some(Err(PipeError::Upstream(_)))
        ));
        assert!(dropped.load(Ordering::SeqCst));
        let end = ended.lock().unwrap().clone().unwrap();
        assert_eq!((end.ending, end.bytes), (Ending::Aborted, 6));
    }

    use crate::window::{SMALL_RECV_BUFFER_BYTES, WIDE_RECV_BUFFER_BYTES};

    static MIB: [u8; 1 << 20] = [0; 1 << 20];

    /// Pipes six 1 MiB chunks, the client taking each after `pace`;
    /// returns the upstream connection's window afterwards.
    async fn window_after(pace: Duration) -> usize {
        let (mut pipe, _dropped, _ended) = pipe(vec![&MIB[..]; 6], false, Duration::from_secs(60));
        let window = UpstreamWindow::default();
        pipe.window = Some((window.for_download(), None));
        while let Some(chunk) = pipe.next().await {
            tokio::time::sleep(pace).await;
            drop(chunk);
        }
        window.wanted()
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_up_widens_the_upstream_window() {
        assert_eq!(
            window_after(Duration::from_millis(1)).await,
            WIDE_RECV_BUFFER_BYTES
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_keeps_the_small_window() {
        // 4 MiB in 60 ms: slower than the bar.
        assert_eq!(
            window_after(Duration::from_millis(20)).await,
            SMALL_RECV_BUFFER_BYTES
        );
    }
}
