//! Upstream health: passive ejection.
//!
//! There is no active health checking (but for the one check a download
//! cut short gets, below). An upstream that just failed a
//! request (connect error or timeout, no headers in time, a `5xx`, a body
//! that broke off) is *ejected* for `--eject-for`: it stays a candidate but
//! is tried after every healthy one, so a dead archiver costs one failed
//! attempt per `--eject-for`, not one per request. An ejected upstream that
//! answers again (it is still tried when everything before it fails, and
//! first once its ejection expires) is healthy at once.
//!
//! Ejection only reorders: with every upstream of a route ejected, they are
//! all still tried, in their rendezvous order, and the client gets `503`
//! only if all of them fail again.
//!
//! When an ejection ends the upstream is on *probation*: one request at a
//! time tries it in its place ([`Health::trial`] hands out one
//! [`Probe`]); meanwhile every other request tries it after its other
//! candidates but before those still ejected (its ejection is over,
//! theirs is not). The probe's answer ends the probation, its failure
//! ejects it again, and anything else (a busy `503`, its client gone)
//! lets the next request probe. Without it, an
//! archiver that accepts connections and never answers (stopped, hung) had
//! every request in flight when its ejection ended wait `--header-timeout`
//! on it, each ejection over again (attack: a SIGSTOPped replica, 32
//! clients, every one of them paid 3 s per `--eject-for` of 4 s).
//!
//! A body cut short says only that its connection ended: the archiver cut
//! it for a failed archive, or its process went away (a restart's drain,
//! a kill). It counts as an archive failed there only if the archiver
//! answers a `HEAD /healthz` sent right after ([`Health::cut`]); a process
//! that went away answers nothing, and the next request's connect tells
//! whether it is back.
//!
//! An archive that failed at its archiver (a `500`, or a body the archiver
//! cut itself) is no failure of the archiver: one request for a broken or
//! huge commit must not move everyone's traffic. But an archiver that is up
//! and fails every generation (git cannot be spawned, its disk is full of
//! what readers pin) would then never be ejected, and every cold request
//! sent there would fail. So `ARCHIVE_FAILURES_TO_EJECT` of them in a row,
//! with no download from it ending whole in between, eject it as one
//! failure does (review). One generation's failure counts once: a request
//! that joined a generation under way (`X-Gitball-Cache: join`) shares it,
//! and only the request that started it counts it (attack: a rush of
//! requests for one new archive that fails ejected the archiver).
//!
//! `gitball_proxy_upstream_ejected{upstream}` is `1` while an upstream is
//! ejected and `0` otherwise; expiries are noticed lazily (on the next
//! request's ordering and on every `/metrics` scrape), so the gauge is never
//! stale when it is read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::routes::Candidate;

/// What a download cut midway says of its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// It is gone: silent for the silence bound, or its host unreachable.
    /// Ejected, as one failed attempt is.
    Gone,
    /// The connection ended short: the archiver cut it because the
    /// archive failed there ([`Health::archive_failed`]), or its process
    /// went away (a drain's cut at a graceful restart, a kill). Counted as
    /// an archive failure only if the upstream still answers right after
    /// (`Health::cut`): a process that went away is shown by
    /// the next connect, not by the downloads it cut.
    ByUpstream,
    /// It ended the body of a generation this download joined, under way
    /// there before it (`X-Gitball-Cache: join`): that failure is counted
    /// once, by the request that started the generation (`miss`), not by
    /// each that joined it (attack: six requests for one new archive that
    /// fails ejected the archiver).
    Joined,
    /// Not its doing: a parked download no candidate could resume (each
    /// attempt was judged on its own).
    NotUpstreams,
}

impl Cut {
    /// This cut of a download now from `upstream`, which joined a
    /// generation under way at `joined` (if any, see [`joined`]): one by
    /// the upstream whose generation it joined is [`Cut::Joined`].
    pub fn of_download(self, upstream: &str, joined: Option<&str>) -> Cut {
        if self == Cut::ByUpstream && joined == Some(upstream) {
            Cut::Joined
        } else {
            self
        }
    }
}

/// Whether an archiver's response head says the request joined a
/// generation already under way there (`X-Gitball-Cache: join`): if that
/// generation fails, the request that started it counts the failure.
pub fn joined(headers: &http::HeaderMap) -> bool {
    headers
        .get(gitball_core::protocol::X_GITBALL_CACHE)
        .is_some_and(|value| value == "join")
}

/// Archives failed at one archiver in a row, with no download from it
/// ending whole in between, that eject it.
pub const ARCHIVE_FAILURES_TO_EJECT: u32 = 5;

/// How long the check of a cut download's upstream waits for its answer
/// without `--header-timeout` given (`Health::checking_cuts_within`).
const CHECK_WITHIN: Duration = Duration::from_secs(60);

/// Whether `upstream` (`http://host:port`) answers `HEAD /healthz` (any
/// status) within `within`: its process is there and serving. A connect
/// alone is not enough: a killed process's listener completes handshakes
/// from its backlog until the kernel closes it, which may come after the
/// downloads it cut (seen: one check of six connected). `/healthz` never
/// needs the token (`docs/internal-api.md`).
async fn answers(upstream: &str, within: Duration) -> bool {
    healthz_status(upstream, within).await.is_some()
}

/// Whether `upstream` answers `HEAD /healthz` with a `200` within
/// `within`: serving, its cache dir the one it locked
/// (`docs/http.md#health`).
async fn healthy(upstream: &str, within: Duration) -> bool {
    healthz_status(upstream, within).await == Some(*b"200")
}

/// The status code `upstream` answers `HEAD /healthz` with, if it
/// answers within `within`.
async fn healthz_status(upstream: &str, within: Duration) -> Option<[u8; 3]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = http::Uri::try_from(upstream).ok()?.authority()?.clone();
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request =
            format!("HEAD /healthz HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        // `HTTP/1.x 200`.
        let mut status_line = [0; 12];
        stream.read_exact(&mut status_line).await?;
        Ok::<_, std::io::Error>(status_line)
    };
    match tokio::time::timeout(within, check).await {
        Ok(Ok(line)) if line.starts_with(b"HTTP/1.") && line[8] == b' ' => {
            Some([line[9], line[10], line[11]])
        }
        _ => None,
    }
}

/// How often an upstream ejected for a refused connect is asked whether it
/// is back ([`Health::refused`]).
const BACK_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Where an upstream that failed stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Ejected until then: tried after every healthy candidate.
    Ejected(Instant),
    /// Its ejection ended, and no answer came since: one request at a time
    /// tries it in its place (`probing`: since when); the others after the
    /// rest. Kept until an answer or a failure, or for `--eject-for` with
    /// no probe (an upstream no route names any more is not kept for ever).
    Probation {
        probing: Option<Instant>,
        since: Instant,
    },
}

impl Standing {
    fn ejected_at(&self, now: Instant) -> bool {
        matches!(self, Standing::Ejected(until) if *until > now)
    }
}

/// The right to try an upstream on probation in its place: one at a time.
/// Dropped (the attempt over, or its request gone) without an answer or a
/// failure, it lets the next request probe.
#[derive(Debug)]
pub struct Probe {
    health: Arc<Health>,
    upstream: Arc<str>,
    began: Instant,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(Standing::Probation { probing, since }) =
            self.health.lock().get_mut(&self.upstream)
            && *probing == Some(self.began)
        {
            *probing = None;
            *since = Instant::now();
        }
    }
}

/// Whether a request may try an upstream now.
#[derive(Debug)]
pub enum Trial {
    /// Yes; with the [`Probe`] when the upstream is on probation.
    Go(Option<Probe>),
    /// Not before the other candidates: another request is probing it.
    /// Still before those ejected: its ejection ended, theirs has not.
    Later,
    /// Yes, but it is ejected: after any candidate another request is
    /// probing ([`Trial::Later`]).
    Ejected,
}

#[derive(Debug)]
pub struct Health {
    eject_for: Duration,
    /// How long one probe keeps the others off an upstream on probation:
    /// `--header-timeout`, within which an ordinary attempt ends. A
    /// request answered only once its archive is complete may wait far
    /// longer for its head; the next request probes then.
    probe_for: Duration,
    /// Ejected upstreams and when their ejection ends, and upstreams on
    /// probation since.
    ejected: Mutex<HashMap<Arc<str>, Standing>>,
    /// Archives failed in a row at each upstream since its last answer.
    archive_failures: Mutex<HashMap<Arc<str>, Row>>,
    /// How long the check that tells a cut download's upstream alive may
    /// take: `--header-timeout`.
    check_within: Duration,
    /// The last [`Row::id`] handed out.
    rows: AtomicU64,
    /// Upstreams whose latest ejection is a refused connect's, and when it
    /// ends: those are asked whether they are back ([`Health::refused`]).
    refused: Mutex<HashMap<Arc<str>, Instant>>,
}

/// A row of archives failed at one upstream, with no archive from it
/// ending whole in between.
#[derive(Clone, Copy, Debug, Default)]
struct Row {
    failures: u32,
    /// Downloads cut in this row whose check is not done yet.
    pending: u32,
    /// A check of the upstream is under way, for this row or one before
    /// it: one at a time per upstream, so a row that ends while it runs
    /// leaves its place to a new one that keeps this (`Health::end_row`).
    /// The cuts made meanwhile share its answer, or, made in a later row,
    /// the next check's, made as soon as it is done.
    checking: bool,
    /// Which row: a cut download's check counts only toward the row it
    /// was cut in, not one begun after an archive ended whole there.
    id: u64,
}

impl Health {
    pub fn new(eject_for: Duration) -> Health {
        Health {
            eject_for,
            probe_for: eject_for,
            ejected: Mutex::new(HashMap::new()),
            archive_failures: Mutex::new(HashMap::new()),
            check_within: CHECK_WITHIN,
            rows: AtomicU64::new(0),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// The check that tells whether a cut download's upstream is still
    /// there waits `header_timeout` (`--header-timeout`) at most.
    pub fn checking_cuts_within(mut self, header_timeout: Duration) -> Health {
        self.check_within = header_timeout;
        self
    }

    /// One probe keeps the others off an upstream on probation for at most
    /// `probe_for` (`--header-timeout`).
    pub fn probing_for(mut self, probe_for: Duration) -> Health {
        self.probe_for = probe_for;
        self
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Row>> {
        self.archive_failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ends `upstream`'s row of archive failures, if any: removed, or
    /// while a check of the upstream is under way a new, empty row in its
    /// place, which keeps it (one check at a time per upstream).
    fn end_row(&self, failures: &mut HashMap<Arc<str>, Row>, upstream: &Arc<str>) {
        match failures.get_mut(upstream) {
            Some(row) if row.checking => {
                *row = Row {
                    failures: 0,
                    pending: 0,
                    checking: true,
                    id: self.rows.fetch_add(1, Ordering::Relaxed) + 1,
                }
            }
            Some(_) => drop(failures.remove(upstream)),
            None => {}
        }
    }

    /// Ends `upstream`'s row of archive failures when it ejects, or when
    /// nothing is in it (no failure, no cut to check, no check under way);
    /// returns its count.
    fn settle(&self, failures: &mut HashMap<Arc<str>, Row>, upstream: &Arc<str>) -> u32 {
        let Some(&Row {
            failures: in_a_row,
            pending,
            checking,
            ..
        }) = failures.get(upstream)
        else {
            return 0;
        };
        if in_a_row >= ARCHIVE_FAILURES_TO_EJECT {
            self.end_row(failures, upstream);
        } else if in_a_row == 0 && pending == 0 && !checking {
            failures.remove(upstream);
        }
        in_a_row
    }

    fn row<'a>(
        &self,
        failures: &'a mut HashMap<Arc<str>, Row>,
        upstream: &Arc<str>,
    ) -> &'a mut Row {
        failures.entry(upstream.clone()).or_insert_with(|| Row {
            failures: 0,
            pending: 0,
            checking: false,
            id: self.rows.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    /// An archive failed at `upstream` (a `500`, or a body it cut itself):
    /// no failure of the upstream, unless it is the
    /// `ARCHIVE_FAILURES_TO_EJECT`th in a row.
    pub fn archive_failed(&self, upstream: &Arc<str>) {
        let in_a_row = {
            let mut failures = self.failures();
            self.row(&mut failures, upstream).failures += 1;
            self.settle(&mut failures, upstream)
        };
        self.eject_if_in_a_row(upstream, in_a_row);
    }

    /// The check of the downloads cut at `upstream` in the row `id` is
    /// done: each counted as an archive failed there if the upstream
    /// `answered`, and for nothing if the row is over (an archive ended
    /// whole there since, or the row ejected it). Returns the row to check
    /// next: a later one whose cuts were made while this check ran.
    fn cut_checked(&self, upstream: &Arc<str>, id: u64, answered: bool) -> Option<u64> {
        let mut gone = 0;
        let (in_a_row, next) = {
            let mut failures = self.failures();
            // Kept while the check ran (`Row::checking`).
            let row = failures.get_mut(upstream)?;
            row.checking = false;
            if row.id == id {
                let cuts = std::mem::take(&mut row.pending);
                if answered {
                    row.failures += cuts;
                } else {
                    gone = cuts;
                }
            }
            let in_a_row = self.settle(&mut failures, upstream);
            let next = failures
                .get_mut(upstream)
                .filter(|row| row.pending > 0)
                .map(|row| {
                    row.checking = true;
                    row.id
                });
            (in_a_row, next)
        };
        if gone > 0 {
            // One line per check, with the cuts it judged (review: a line
            // per check read as one per cut).
            tracing::info!(
                %upstream,
                cuts = gone,
                "downloads cut by an upstream that then did not answer: its process went away; not counted"
            );
        }
        self.eject_if_in_a_row(upstream, in_a_row);
        next
    }

    fn eject_if_in_a_row(&self, upstream: &Arc<str>, in_a_row: u32) {
        if in_a_row >= ARCHIVE_FAILURES_TO_EJECT {
            tracing::warn!(%upstream, in_a_row, "every archive failed at this upstream lately");
            self.failed(upstream);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Standing>> {
        // A panic while holding this lock cannot leave the map half-updated
        // in a way that matters: worst case one upstream's ejection is lost.
        self.ejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets ejections that have expired, setting their gauges to 0.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let eject_for = self.eject_for;
        self.lock().retain(|upstream, standing| match *standing {
            Standing::Ejected(until) if until <= now => {
                crate::metrics::upstream_ejected(upstream, false);
                tracing::info!(%upstream, "upstream ejection expired; on probation");
                *standing = Standing::Probation {
                    probing: None,
                    since: now,
                };
                true
            }
            Standing::Probation {
                probing: None,
                since,
            } => now.saturating_duration_since(since) < eject_for,
            _ => true,
        });
    }

    /// Whether a request may try `upstream` now: an upstream on probation
    /// is tried by one request at a time, the [`Probe`]'s holder; the
    /// others try it after their other candidates but those still ejected
    /// ([`Trial::Later`]). One whose ejection ended since the request
    /// ordered its candidates (no request swept it yet) is on probation
    /// from now: the request takes its probe, or tries it later.
    pub fn trial(self: &Arc<Self>, upstream: &Arc<str>) -> Trial {
        self.trial_at(upstream, Instant::now())
    }

    fn trial_at(self: &Arc<Self>, upstream: &Arc<str>, now: Instant) -> Trial {
        let mut standings = self.lock();
        // The common case (nothing ejected) does not hash the name.
        if standings.is_empty() {
            return Trial::Go(None);
        }
        let Some(standing) = standings.get_mut(upstream) else {
            return Trial::Go(None);
        };
        match standing {
            Standing::Ejected(until) if *until > now => Trial::Ejected,
            Standing::Ejected(_) => {
                // What `sweep` does, here: without it a request that
                // ordered its candidates just before the ejection ended
                // tried the upstream beside the probe's holder (review).
                *standing = Standing::Probation {
                    probing: Some(now),
                    since: now,
                };
                drop(standings);
                crate::metrics::upstream_ejected(upstream, false);
                tracing::info!(%upstream, "upstream ejection expired; on probation");
                Trial::Go(Some(Probe {
                    health: self.clone(),
                    upstream: upstream.clone(),
                    began: now,
                }))
            }
            Standing::Probation { probing, .. } => {
                if probing
                    .is_some_and(|began| now.saturating_duration_since(began) < self.probe_for)
                {
                    return Trial::Later;
                }
                *probing = Some(now);
                Trial::Go(Some(Probe {
                    health: self.clone(),
                    upstream: upstream.clone(),
                    began: now,
                }))
            }
        }
    }

    /// Moves ejected candidates after the healthy ones, keeping the
    /// relative order within each group. Returns how many are ejected.
    pub fn order(&self, candidates: &mut [Candidate]) -> usize {
        self.order_at(candidates, Instant::now())
    }

    fn order_at(&self, candidates: &mut [Candidate], now: Instant) -> usize {
        self.sweep_at(now);
        let ejected = self.lock();
        if ejected.is_empty() {
            return 0;
        }
        let is_ejected = |candidate: &Candidate| {
            ejected
                .get(&candidate.upstream)
                .is_some_and(|standing| standing.ejected_at(now))
        };
        // A stable sort on a bool key is a stable partition.
        candidates.sort_by_key(is_ejected);
        candidates.iter().filter(|c| is_ejected(c)).count()
    }

    pub fn is_ejected(&self, upstream: &str) -> bool {
        let now = Instant::now();
        self.lock()
            .get(upstream)
            .is_some_and(|standing| standing.ejected_at(now))
    }

    /// How long until the earliest ejection among `upstreams` ends: what a
    /// `503`'s `Retry-After` should say.
    pub fn retry_after(&self, upstreams: &[Candidate]) -> Duration {
        let now = Instant::now();
        let ejected = self.lock();
        upstreams
            .iter()
            .filter_map(|candidate| match ejected.get(&candidate.upstream) {
                Some(Standing::Ejected(until)) => Some(until.saturating_duration_since(now)),
                _ => None,
            })
            .min()
            .unwrap_or(self.eject_for)
    }

    /// `upstream` failed: eject it (again) for `--eject-for` from now.
    pub fn failed(&self, upstream: &Arc<str>) {
        self.failed_at(upstream, Instant::now());
    }

    pub(crate) fn failed_at(&self, upstream: &Arc<str>, now: Instant) {
        self.eject(upstream, now);
    }

    /// Ejects `upstream` until `--eject-for` from `now`; returns when that
    /// is, and whether it was not ejected already.
    fn eject(&self, upstream: &Arc<str>, now: Instant) -> (Instant, bool) {
        let until = now + self.eject_for;
        let newly = !self
            .lock()
            .insert(upstream.clone(), Standing::Ejected(until))
            .is_some_and(|before| before.ejected_at(now));
        if newly {
            crate::metrics::upstream_ejected(upstream, true);
            tracing::warn!(%upstream, eject_for = ?self.eject_for, "upstream ejected");
        }
        (until, newly)
    }

    /// `upstream` refused a connect: nothing listens there, as during an
    /// archiver's restart (`docs/proxy.md#ejection`). Ejected as by
    /// [`Health::failed`], and then asked every [`BACK_CHECK_EVERY`]
    /// whether it is back (`HEAD /healthz`, a `200`): once it is, its
    /// ejection ends and it is on probation, as when `--eject-for` runs
    /// out. A rolling restart of the archivers otherwise moved each one's
    /// archives to the next for `--eject-for`, generated there again
    /// (attack: 21 to 45 cold misses elsewhere per restart of three). An
    /// ejection for anything else (a failure it answered, archives failing
    /// there in a row) is not ended so: such an archiver answers its
    /// health check.
    pub fn refused(self: &Arc<Self>, upstream: &Arc<str>) {
        let (until, newly) = self.eject(upstream, Instant::now());
        self.refusals().insert(upstream.clone(), until);
        if !newly {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.clone().ask_whether_back(upstream.clone()));
        }
    }

    fn refusals(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Instant>> {
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `upstream`'s ejection now is a refused connect's.
    fn ejected_as_refused(&self, upstream: &Arc<str>, now: Instant) -> bool {
        let until = match self.lock().get(upstream) {
            Some(&Standing::Ejected(until)) if until > now => until,
            _ => return false,
        };
        self.refusals().get(upstream) == Some(&until)
    }

    /// [`Health::refused`]'s checks, while the ejection is a refused
    /// connect's (at most `--eject-for`).
    async fn ask_whether_back(self: Arc<Self>, upstream: Arc<str>) {
        loop {
            tokio::time::sleep(BACK_CHECK_EVERY).await;
            if !self.ejected_as_refused(&upstream, Instant::now()) {
                break;
            }
            if !healthy(&upstream, self.check_within.min(BACK_CHECK_EVERY)).await {
                continue;
            }
            let now = Instant::now();
            let mut standings = self.lock();
            let back = match standings.get(&upstream) {
                Some(&Standing::Ejected(until)) => {
                    until > now && self.refusals().get(&upstream) == Some(&until)
                }
                _ => false,
            };
            if back {
                standings.insert(
                    upstream.clone(),
                    Standing::Probation {
                        probing: None,
                        since: now,
                    },
                );
                drop(standings);
                crate::metrics::upstream_ejected(&upstream, false);
                tracing::info!(%upstream, "upstream ejected for a refused connect answers again; on probation");
            }
            break;
        }
        self.refusals().remove(&upstream);
    }

    /// A download from `upstream` was cut midway, for the reason `cut`.
    ///
    /// A connection that ended short ([`Cut::ByUpstream`]) is an archive
    /// failed there only if the upstream still answers: a `HEAD /healthz`
    /// is sent at once, in a task of its own. No answer (a refused
    /// connect, a connection closed unanswered, nothing within
    /// `--header-timeout`) says its process went away: a drain cutting the
    /// downloads it could not finish at a graceful restart (its listener
    /// is closed from the signal on), or a kill.
    /// That counts for nothing here; the next request's connect tells
    /// whether it is back (attack: a restart that cut five downloads
    /// counted as five archives failed in a row and ejected the restarted
    /// archiver for `--eject-for`).
    pub fn cut(self: &Arc<Self>, upstream: &Arc<str>, cut: Cut) {
        match cut {
            Cut::Gone => self.failed(upstream),
            Cut::ByUpstream => {
                // The row the cut belongs to: an archive ending whole
                // there before the check is done ends it. One check at a
                // time per upstream, whatever its rows (`Row::checking`): a
                // restart that cuts ten thousand downloads makes one
                // connection to the archiver, not one each (review: each
                // cut's own check held an fd up to `--header-timeout`, ten
                // thousand of them for an archiver whose host stopped
                // answering after the cuts).
                let Some(id) = self.cut_to_check(upstream) else {
                    return;
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(self.clone().check_cut(upstream.clone(), id));
                    }
                    Err(_) => {
                        // No check can be under way: nothing is left.
                        let _ = self.cut_checked(upstream, id, true);
                    }
                }
            }
            Cut::Joined | Cut::NotUpstreams => {}
        }
    }

    /// Notes a download cut at `upstream` in its row of archive failures,
    /// to be counted when the row's check is done; the row's id when this
    /// cut is to start that check (none of the upstream is under way).
    fn cut_to_check(&self, upstream: &Arc<str>) -> Option<u64> {
        let mut failures = self.failures();
        let row = self.row(&mut failures, upstream);
        row.pending += 1;
        (!std::mem::replace(&mut row.checking, true)).then_some(row.id)
    }

    /// Checks whether `upstream`, which cut a download in its row `id` of
    /// archive failures, still answers ([`Health::cut`]), and counts the
    /// cut if it does; then checks again for the cuts of a later row made
    /// meanwhile, if any.
    async fn check_cut(self: Arc<Self>, upstream: Arc<str>, mut id: u64) {
        loop {
            let answered = answers(&upstream, self.check_within).await;
            match self.cut_checked(&upstream, id, answered) {
                Some(next) => id = next,
                None => return,
            }
        }
    }

    /// A download from `upstream` ended whole: archives do not all fail
    /// there. (A response head is not enough: a cold zip's or tar.gz's
    /// head leaves before git runs, so one whose git cannot run answers
    /// every time.)
    pub fn answered_whole(&self, upstream: &Arc<str>) {
        // The common case (no archive failed) takes the lock only to look.
        let mut failures = self.failures();
        if !failures.is_empty() {
            self.end_row(&mut failures, upstream);
        }
    }

    /// `upstream` answered: it is healthy again.
    pub fn succeeded(&self, upstream: &Arc<str>) {
        // The common case (never ejected) takes the lock only to look, and
        // does not hash the name for an empty map (`remove` would: a
        // SipHash, about 200 instructions of a small hit).
        let mut ejected = self.lock();
        if ejected.is_empty() {
            return;
        }
        match ejected.remove(upstream) {
            Some(Standing::Ejected(_)) => {
                drop(ejected);
                crate::metrics::upstream_ejected(upstream, false);
                tracing::info!(%upstream, "upstream answered again; no longer ejected");
            }
            Some(Standing::Probation { .. }) => {
                drop(ejected);
                tracing::info!(%upstream, "upstream answered again; off probation");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Role;

    fn candidates(names: &[&str]) -> Vec<Candidate> {
        names
            .iter()
            .map(|name| Candidate {
                upstream: Arc::from(*name),
                role: Role::Replica,
            })
            .collect()
    }

    fn names(candidates: &[Candidate]) -> Vec<&str> {
        candidates.iter().map(|c| &*c.upstream).collect()
    }

    #[test]
    fn failed_upstream_goes_last_until_its_ejection_ends() {
        let health = Health::new(Duration::from_secs(10));
        let start = Instant::now();
        health.failed_at(&Arc::from("b"), start);

        let mut order = candidates(&["a", "b", "c"]);
        assert_eq!(health.order_at(&mut order, start), 1);
        assert_eq!(names(&order), ["a", "c", "b"]);

        let mut order = candidates(&["a", "b", "c"]);
        let later = start + Duration::from_secs(11);
        assert_eq!(health.order_at(&mut order, later), 0);
        assert_eq!(names(&order), ["a", "b", "c"]);
    }

    /// When an ejection ends, one request at a time may try the upstream
    /// in its place; an answer ends the probation, a failure ejects it
    /// again, and a probe given up lets the next request probe.
    #[test]
    fn an_upstream_whose_ejection_ended_is_probed_by_one_request_at_a_time() {
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let upstream: Arc<str> = Arc::from("b");
        let start = Instant::now();
        health.failed_at(&upstream, start);
        let later = start + Duration::from_secs(11);
        let mut order = candidates(&["a", "b"]);
        assert_eq!(health.order_at(&mut order, later), 0, "no longer ejected");
        assert_eq!(names(&order), ["a", "b"]);
        let probe = match health.trial(&upstream) {
            Trial::Go(Some(probe)) => probe,
            other => panic!("no probe: {other:?}"),
        };
        assert!(matches!(health.trial(&upstream), Trial::Later));
        assert!(matches!(health.trial(&Arc::from("a")), Trial::Go(None)));
        drop(probe);
        let probe = match health.trial(&upstream) {
            Trial::Go(Some(probe)) => probe,
            other => panic!("the probe given up was not handed on: {other:?}"),
        };
        health.failed(&upstream);
        drop(probe);
        assert!(
            health.is_ejected("b"),
            "the probe's failure ejects it again"
        );
        assert!(matches!(health.trial(&upstream), Trial::Ejected));
        health.sweep_at(Instant::now() + Duration::from_secs(11));
        let _probe = health.trial(&upstream);
        health.succeeded(&upstream);
        assert!(
            matches!(health.trial(&upstream), Trial::Go(None)),
            "an answer ends it"
        );
        assert!(health.lock().is_empty());
        // Probation with no probe is forgotten after --eject-for.
        health.failed_at(&upstream, start);
        health.sweep_at(later);
        assert_eq!(health.lock().len(), 1);
        health.sweep_at(later + Duration::from_secs(10));
        assert!(health.lock().is_empty());
    }

    /// A request that ordered its candidates while an upstream was ejected
    /// and reaches it after the ejection ended takes its probe (or tries it
    /// later): it does not try it beside the probe's holder (review: at
    /// most one extra attempt, each time an ejection ended).
    /// Only an ejection whose latest cause is a refused connect is ended by
    /// the upstream's health check (`docs/proxy.md#ejection`): one renewed
    /// by another failure (an intermediary's `502`, archives failing in a
    /// row, which a health check does not see) runs its course.
    #[test]
    fn only_an_ejection_for_a_refused_connect_is_ended_by_a_health_check() {
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let upstream: Arc<str> = Arc::from("http://127.0.0.1:9");
        health.refused(&upstream);
        let now = Instant::now();
        assert!(health.ejected_as_refused(&upstream, now));
        health.refused(&upstream);
        assert!(
            health.ejected_as_refused(&upstream, Instant::now()),
            "renewed by a refusal"
        );
        health.failed_at(&upstream, Instant::now() + Duration::from_secs(1));
        assert!(health.is_ejected(&upstream));
        assert!(
            !health.ejected_as_refused(&upstream, Instant::now()),
            "renewed by another failure"
        );
    }

    #[test]
    fn an_ejection_that_ends_after_the_ordering_is_probed_all_the_same() {
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let upstream: Arc<str> = Arc::from("b");
        let start = Instant::now();
        health.failed_at(&upstream, start);
        let mut order = candidates(&["b", "a"]);
        let ordered = start + Duration::from_secs(9);
        assert_eq!(
            health.order_at(&mut order, ordered),
            1,
            "ordered while ejected"
        );
        assert_eq!(names(&order), ["a", "b"]);
        assert!(matches!(
            health.trial_at(&upstream, ordered),
            Trial::Ejected
        ));
        let reached = start + Duration::from_secs(11);
        let Trial::Go(Some(_probe)) = health.trial_at(&upstream, reached) else {
            panic!("reached after its ejection ended, without the probe");
        };
        assert!(matches!(
            health.lock().get(&upstream),
            Some(Standing::Probation {
                probing: Some(_),
                ..
            })
        ));
        assert!(
            matches!(health.trial_at(&upstream, reached), Trial::Later),
            "a second request tried it beside the probe"
        );
    }

    /// A probe keeps the others off for `--header-timeout` at most: a
    /// request answered only when its archive is complete (up to 630 s)
    /// does not keep a healthy archiver off that long.
    #[test]
    fn a_probe_keeps_the_others_off_for_the_header_timeout_at_most() {
        let health = Arc::new(Health::new(Duration::from_secs(10)).probing_for(Duration::ZERO));
        let upstream: Arc<str> = Arc::from("b");
        health.failed_at(&upstream, Instant::now() - Duration::from_secs(11));
        health.sweep();
        let Trial::Go(Some(first)) = health.trial(&upstream) else {
            panic!("no probe");
        };
        let Trial::Go(Some(second)) = health.trial(&upstream) else {
            panic!("the first probe's bound had passed: a second one is due");
        };
        // The first one's end does not end the second's.
        drop(first);
        assert!(matches!(
            health.lock().get(&upstream),
            Some(Standing::Probation {
                probing: Some(_),
                ..
            })
        ));
        drop(second);
        assert!(matches!(
            health.lock().get(&upstream),
            Some(Standing::Probation { probing: None, .. })
        ));
    }

    #[test]
    fn all_ejected_keeps_rendezvous_order() {
        let health = Health::new(Duration::from_secs(10));
        let now = Instant::now();
        for name in ["a", "b", "c"] {
            health.failed_at(&Arc::from(name), now);
        }
        let mut order = candidates(&["c", "a", "b"]);
        assert_eq!(health.order_at(&mut order, now), 3);
        assert_eq!(names(&order), ["c", "a", "b"]);
    }

    #[test]
    fn success_ends_ejection_at_once() {
        let health = Health::new(Duration::from_secs(10));
        let upstream: Arc<str> = Arc::from("a");
        health.failed(&upstream);
        assert!(health.is_ejected("a"));
        health.succeeded(&upstream);
        assert!(!health.is_ejected("a"));
    }

    #[test]
    fn archives_failing_in_a_row_eject_and_an_answer_between_resets() {
        let health = Health::new(Duration::from_secs(10));
        let upstream: Arc<str> = Arc::from("a");
        for _ in 1..ARCHIVE_FAILURES_TO_EJECT {
            health.archive_failed(&upstream);
        }
        assert!(!health.is_ejected("a"), "one short of the count");
        // A head is not enough; a whole download is.
        health.succeeded(&upstream);
        health.archive_failed(&upstream);
        assert!(health.is_ejected("a"), "a head reset the count");
        health.succeeded(&upstream);
        for _ in 1..ARCHIVE_FAILURES_TO_EJECT {
            health.archive_failed(&upstream);
        }
        health.answered_whole(&upstream);
        for _ in 1..ARCHIVE_FAILURES_TO_EJECT {
            health.archive_failed(&upstream);
        }
        assert!(
            !health.is_ejected("a"),
            "the answer between reset the count"
        );
        health.archive_failed(&upstream);
        assert!(health.is_ejected("a"));
    }

    #[test]
    fn a_cut_of_a_joined_generation_counts_for_nothing_at_its_upstream() {
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let upstream: Arc<str> = Arc::from("a");
        for _ in 0..2 * ARCHIVE_FAILURES_TO_EJECT {
            let cut = Cut::ByUpstream.of_download("a", Some("a"));
            assert_eq!(cut, Cut::Joined);
            health.cut(&upstream, cut);
        }
        assert!(!health.is_ejected("a"), "joiners' cuts were counted");
        // Resumed elsewhere, or never joined: counted.
        assert_eq!(Cut::ByUpstream.of_download("a", Some("b")), Cut::ByUpstream);
        assert_eq!(Cut::ByUpstream.of_download("a", None), Cut::ByUpstream);
        assert_eq!(Cut::Gone.of_download("a", Some("a")), Cut::Gone);
    }

    /// A download cut short counts toward the row of archive failures
    /// only if its upstream still answers: one whose process went away (a
    /// drain's cut at a restart, a kill) answers nothing, and
    /// its cuts count for nothing, however many (attack: a restart cutting
    /// five downloads ejected the restarted archiver for `--eject-for`).
    #[tokio::test]
    async fn a_cut_counts_only_if_its_upstream_still_answers() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let serving = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            }
        });
        // Takes connections (its backlog), answers none: a killed
        // process's listener not closed yet.
        let silent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent: Arc<str> = format!("http://{}", silent_listener.local_addr().unwrap()).into();
        let refusing = crate::test_support::RefusingPort::new();
        let gone: Arc<str> = format!("http://{}", refusing.addr).into();
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        // `Health::cut`, its check awaited.
        let cut = |health: &Arc<Health>, upstream: &Arc<str>| {
            let id = health.cut_to_check(upstream).expect("no check under way");
            health.clone().check_cut(upstream.clone(), id)
        };
        for _ in 0..2 * ARCHIVE_FAILURES_TO_EJECT {
            cut(&health, &gone).await;
        }
        assert!(
            !health.is_ejected(&gone),
            "a gone process's cuts ejected it"
        );
        let health_silent = Arc::new(
            Health::new(Duration::from_secs(10)).checking_cuts_within(Duration::from_millis(100)),
        );
        for _ in 0..ARCHIVE_FAILURES_TO_EJECT {
            cut(&health_silent, &silent).await;
        }
        assert!(
            !health_silent.is_ejected(&silent),
            "a connect alone counted"
        );
        assert!(health.failures().is_empty(), "a row was left behind");
        for _ in 1..ARCHIVE_FAILURES_TO_EJECT {
            cut(&health, &alive).await;
        }
        assert!(!health.is_ejected(&alive), "one short of the count");
        // An archive that ended whole after the cut, before its check was
        // done, ended the row the cut was in.
        let late = cut(&health, &alive);
        health.answered_whole(&alive);
        late.await;
        for _ in 1..ARCHIVE_FAILURES_TO_EJECT {
            cut(&health, &alive).await;
        }
        assert!(!health.is_ejected(&alive), "a check counted in a later row");
        cut(&health, &alive).await;
        assert!(health.is_ejected(&alive), "five cuts by a live upstream");
        serving.abort();
    }

    /// One check at a time per upstream: the cuts made while it runs share
    /// its answer, those of a row begun since (an archive ended whole
    /// there) get the next check, made once it is done, and a check of a
    /// row that ended counts in none after it.
    #[test]
    fn the_cuts_made_while_a_check_runs_share_its_answer_or_the_next_ones() {
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        let upstream: Arc<str> = Arc::from("a");
        // A cut in a row an archive ended whole after; its check (its
        // upstream gone) is done after the next row's cuts were made.
        let ended_row = health.cut_to_check(&upstream).expect("a check");
        health.answered_whole(&upstream);
        for _ in 0..3 {
            assert_eq!(
                health.cut_to_check(&upstream),
                None,
                "a second check under way"
            );
        }
        let live = health
            .cut_checked(&upstream, ended_row, false)
            .expect("the next row's cuts not checked");
        assert_ne!(live, ended_row);
        assert_eq!(
            health.cut_to_check(&upstream),
            None,
            "a second check under way"
        );
        assert_eq!(health.cut_checked(&upstream, live, true), None);
        assert!(
            !health.is_ejected("a"),
            "the ended row's cut counted, or one was counted twice"
        );
        health.archive_failed(&upstream);
        assert!(health.is_ejected("a"), "a cut of the shared check was lost");
        assert!(health.failures().is_empty());
    }

    /// An upstream that answers every `HEAD /healthz` once `all_cut` is
    /// sent (each connection on its own: checks under way together are
    /// all accepted), and the connections it accepted.
    async fn healthz_after_the_cuts() -> (
        Arc<str>,
        tokio::sync::watch::Sender<bool>,
        Arc<AtomicU64>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream: Arc<str> = format!("http://{}", listener.local_addr().unwrap()).into();
        let (all_cut, cuts_made) = tokio::sync::watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let serving = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut cuts_made = cuts_made.clone();
                    tokio::spawn(async move {
                        let _ = cuts_made.wait_for(|made| *made).await;
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    });
                }
            }
        });
        (upstream, all_cut, accepted, serving)
    }

    /// Waits (10 s at most) until `health` ejects `upstream`.
    async fn until_ejected(health: &Health, upstream: &Arc<str>, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !health.is_ejected(upstream) {
            assert!(Instant::now() < deadline, "{what} never ejected it");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// However many downloads a restart cuts at once, the upstream gets one
    /// check, not one connection each (review: ten thousand cuts held ten
    /// thousand fds for up to `--header-timeout` when the archiver's host
    /// stopped answering).
    #[tokio::test]
    async fn downloads_cut_together_make_one_check() {
        let (upstream, all_cut, accepted, serving) = healthz_after_the_cuts().await;
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        for _ in 0..ARCHIVE_FAILURES_TO_EJECT {
            health.cut(&upstream, Cut::ByUpstream);
        }
        all_cut.send_replace(true);
        until_ejected(&health, &upstream, "the cuts").await;
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "connections the checks of {ARCHIVE_FAILURES_TO_EJECT} cuts made"
        );
        serving.abort();
    }

    /// One check at a time per upstream, across its rows too: a cut made
    /// after an archive ended whole there, while an earlier cut's check
    /// still waits, waits for that check to end and is checked then,
    /// instead of opening a connection of its own (review: one check per
    /// row; an archiver that left each check unanswered while it ended
    /// downloads whole between cuts had the proxy hold a connection per
    /// such pair, each up to `--header-timeout`).
    #[tokio::test]
    async fn one_check_at_a_time_per_upstream_across_its_rows() {
        let (upstream, all_cut, accepted, serving) = healthz_after_the_cuts().await;
        let health = Arc::new(Health::new(Duration::from_secs(10)));
        // Three rows, each a cut and then an archive ended whole.
        for _ in 0..3 {
            health.cut(&upstream, Cut::ByUpstream);
            health.answered_whole(&upstream);
        }
        // And a row that ejects, once checked.
        for _ in 0..ARCHIVE_FAILURES_TO_EJECT {
            health.cut(&upstream, Cut::ByUpstream);
        }
        all_cut.send_replace(true);
        until_ejected(&health, &upstream, "the last row").await;
        // The first cut's check, and one more for the last row's cuts,
        // made while it waited.
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            2,
            "connections the checks of four rows made"
        );
        assert!(health.failures().is_empty(), "a row was left behind");
        serving.abort();
    }

    #[test]
    fn retry_after_is_the_earliest_ejection_end() {
        let health = Health::new(Duration::from_secs(10));
        health.failed(&Arc::from("a"));
        let wait = health.retry_after(&candidates(&["a", "b"]));
        assert!(wait <= Duration::from_secs(10) && wait > Duration::from_secs(8));
    }
}
