//! Routes and responses: the archiver's HTTP face.
//!
//! An archive request goes: method → bearer check → URL grammar
//! (`gitball_core::url`) → repository and ref (`repo`) → validators
//! (`conditional`; a `304` is answered before anything is generated) →
//! cache lookup (`cache`) → body (`tail`). A complete file is served with
//! `Content-Length`, `Accept-Ranges` and `Repr-Digest`, and honours one
//! `Range`; a growing one is served chunked from the file as it grows, and a
//! `Range` is ignored.
//!
//! A request that may start a generation (a `GET` of an archive or its
//! checksum that is not in the cache) first takes a token from its client's
//! crawler budget (`budget`); a hit or a join gives it back. The client is
//! the socket peer, or the `X-Gitball-Client` a trusted proxy sent
//! ([`client_of`]). `POST /{owner}/{repo}/prewarm/{ref}` goes to `prewarm`.
//!
//! Every request has one [`RequestLog`] from the moment its head is read;
//! for a download it moves into the body stream, so the line is written
//! when the body ends, and a client that leaves while the request waits
//! (for a generation slot, say) is logged and counted as `499`. Errors
//! become responses in one place, `error`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine;
use gitball_core::log::{RequestLog, Tier};
use gitball_core::protocol::{
    REPR_DIGEST, REQUEST_ID, X_GITBALL_CACHE, X_GITBALL_CLIENT, X_GITBALL_COMMIT,
    X_GITBALL_WANT_LENGTH, code,
};
use gitball_core::request_id::request_id;
use gitball_core::response::{self, is_allowed};
use gitball_core::secret::bearer_is;
use gitball_core::server::OnConnection;
use gitball_core::server::takeover::Takeover;
use gitball_core::url::{self, ArchiveRequest, Format, RefKind};
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::budget::{Budget, client_key};
use crate::cache::{Cache, CacheFile, Lookup, State as GenerationState};
use crate::conditional::{self, ByteRange, Validators};
use crate::error::Error;
use crate::generate::{Compression, Spec};
use crate::repo::{RefLookup, Repositories, Resolved};
use crate::tail::{self, Source};

/// Shared state of the routes.
pub struct App {
    pub repos: Repositories,
    pub cache: Arc<Cache>,
    pub token: Option<Vec<u8>>,
    /// The crawler budget; `None` with `--client-cold-rate 0`.
    pub budget: Option<Arc<Budget>>,
    /// `--prewarm-token-file`; `None`: prewarm is off.
    pub prewarm_token: Option<Vec<u8>>,
    /// `--prewarm-formats`.
    pub prewarm_formats: Vec<Format>,
    /// `--require-reachable`.
    pub require_reachable: bool,
    pub gzip_level: u32,
    pub zstd_level: i32,
    pub metrics: PrometheusHandle,
}

pub fn router(app: Arc<App>) -> Router {
    health_and_metrics().fallback(archive).with_state(app)
}

/// The admin listener's routes (`--admin-listen`): `/healthz` and
/// `/metrics`, nothing else.
pub fn admin_router(app: Arc<App>) -> Router {
    health_and_metrics()
        .fallback(response::admin_not_found)
        .with_state(app)
}

/// `/healthz` and `/metrics`, as both listeners serve them.
fn health_and_metrics() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/metrics", any(render_metrics))
}

/// `/healthz`: `200` while the archiver serves, `503 unavailable` once its
/// cache dir is not the one it locked (`Cache::dir_intact`), which only a
/// restart mends: an orchestrator's probe restarts it, a balancer's takes
/// it out.
async fn healthz(State(app): State<Arc<App>>, method: Method) -> Response {
    if response::is_allowed(&method) && !app.cache.dir_intact() {
        return response::json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            code::UNAVAILABLE,
            "the cache dir was removed or replaced while the archiver ran: restart it",
        );
    }
    response::healthz(method).await
}

async fn render_metrics(State(app): State<Arc<App>>, method: Method) -> Response {
    response::metrics(&method, &app.metrics)
}

/// 9999-12-31T23:59:59Z, the last time an HTTP date can say.
const LAST_HTTP_DATE: i64 = 253_402_300_799;

/// Everything about an archive that its headers say.
pub(crate) struct Resolution {
    pub request: ArchiveRequest,
    pub resolved: Resolved,
    pub spec: Spec,
    filename: String,
    etag: String,
    /// A token of the client's budget went to looking for its `?path=`:
    /// the generation it leads to takes none.
    paid: bool,
}

impl Resolution {
    /// The commit time, within what an HTTP date can say (years 1970 to
    /// 9999: a forged commit can carry any time, and a later one panicked
    /// the date's formatting), and never later than now: RFC 9110
    /// (8.8.2.1) forbids a `Last-Modified` later than the response's
    /// `Date`, and a commit is dated by its committer's clock, which may
    /// run ahead of the server's.
    fn last_modified(&self) -> SystemTime {
        let seconds = self.resolved.committer_time.clamp(0, LAST_HTTP_DATE);
        (SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)).min(SystemTime::now())
    }

    /// What an `If-Modified-Since` is compared with: the `Last-Modified`
    /// sent, except for a commit dated after now, which is sent the time
    /// of each response: the bytes of its commit URL were the same at any
    /// date a client was sent, so no date given is before them (review of
    /// 801e9d3: revalidated with the date it was sent, such an archive was
    /// a 200, the whole of it, once the clock had moved on).
    fn modified_for_conditions(&self) -> SystemTime {
        let last_modified = self.last_modified();
        let seconds = self.resolved.committer_time.clamp(0, LAST_HTTP_DATE);
        if SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64) > last_modified {
            SystemTime::UNIX_EPOCH
        } else {
            last_modified
        }
    }

    /// How long a cache may keep the archive, and so its checksum: a
    /// commit URL never changes; a branch or tag URL may move.
    fn cache_control(&self) -> HeaderValue {
        HeaderValue::from_static(if self.immutable_url() {
            "public, max-age=31536000, immutable"
        } else {
            "public, max-age=60"
        })
    }

    /// The URL named the commit itself and the archive depends on nothing
    /// else: its bytes can never change.
    fn immutable_url(&self) -> bool {
        self.resolved.kind == RefKind::Commit
            && self.request.reference == self.resolved.commit
            && self.spec.refs.is_none()
    }
}

/// What `serve` decided: a whole response, or one whose body is read from
/// the cache file (the request log moves into that body).
enum Answer {
    Whole(Response),
    Stream {
        response: Response,
        reader: tail::Reader,
    },
}

async fn archive(State(app): State<Arc<App>>, request: Request) -> Response {
    // The body is not needed (and not `Sync`); the head is.
    let (request, _body) = request.into_parts();
    let mut log = RequestLog::new(
        Tier::Archiver,
        request_id(&request.headers),
        request.method.clone(),
        request.uri.path(),
        crate::metrics::request_finished,
    );
    let connection = request.extensions.get::<OnConnection>();
    log.on_connection(connection.map(|connection| &connection.writes));
    let request_id = log.request_id.clone();
    let answer = if url::is_prewarm_path(request.uri.path()) {
        crate::prewarm::serve(&app, &request, &mut log)
            .await
            .map(Answer::Whole)
    } else {
        serve(&app, &request, &mut log).await
    };
    let mut response = match answer {
        Ok(answer) => respond(
            answer,
            log,
            connection.and_then(|connection| connection.takeover.as_ref()),
        ),
        Err(error) => fail(error, log),
    };
    // Either checked by the request-id rule or hex: a valid header value.
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The error's response; the log line is written as it returns.
fn fail(error: Error, mut log: RequestLog) -> Response {
    log.failed(error.status(), error.fault(), error.log_text());
    // A generation's failure says whether this request started it (`miss`)
    // or joined it under way (`join`), as its 200 would have: a proxy
    // counts one generation's failure once, at the request that started it
    // (proxy.md, Ejection).
    let generation_failed = matches!(
        error,
        Error::GenerationFailed | Error::GenerationTimeout | Error::TooLarge
    );
    let mut response = error.into_response();
    if generation_failed && let Some(label @ ("miss" | "join")) = log.cache {
        response
            .headers_mut()
            .insert(X_GITBALL_CACHE, HeaderValue::from_static(label));
    }
    log.answered(&response);
    response
}

/// Attaches the body; from here on the log belongs to the response.
fn respond(answer: Answer, mut log: RequestLog, takeover: Option<&Takeover>) -> Response {
    match answer {
        Answer::Whole(response) => {
            log.answered(&response);
            response
        }
        Answer::Stream {
            mut response,
            reader,
        } => {
            log.status = Some(response.status());
            *response.body_mut() = reader.into_body(log, takeover);
            response
        }
    }
}

async fn serve(app: &App, request: &Parts, log: &mut RequestLog) -> Result<Answer, Error> {
    let archive = url::parse_path(request.uri.path());
    if let Ok(archive) = &archive {
        log.format = Some(archive.format.metric_label());
    }
    let method = &request.method;
    if !is_allowed(method) {
        return Err(Error::MethodNotAllowed);
    }
    authorize(app, &request.headers)?;
    let archive = archive?;
    let subtree = url::query_param(request.uri.query(), "path")?
        .map(|path| url::validate_subtree(&path))
        .transpose()?;
    // An archive keyed by the refs whose refs changed before its generation
    // started is resolved again, under the new refs: the client sees
    // `refs_changed` only if they keep changing. So is one whose cached file
    // was deleted behind the archiver's back: the cache forgot it, so it is
    // generated anew.
    let mut attempts = 1;
    loop {
        match serve_archive(app, request, archive.clone(), subtree.clone(), log).await {
            Err(Error::RefsChanged | Error::FileGone) if attempts < RESOLVE_ATTEMPTS => {
                attempts += 1;
            }
            answer => return answer,
        }
    }
}

/// How many times a request is resolved when the refs its archive is keyed
/// by keep changing before the generation starts (or its file vanishes).
const RESOLVE_ATTEMPTS: u32 = 3;

/// [`serve`] from the resolution on.
async fn serve_archive(
    app: &App,
    request: &Parts,
    archive: url::ArchiveRequest,
    subtree: Option<String>,
    log: &mut RequestLog,
) -> Result<Answer, Error> {
    let method = &request.method;
    let resolution = resolve(app, archive, subtree, Some(client_of(app, request))).await?;
    log.commit = Some(resolution.resolved.commit.clone());
    let headers = &request.headers;

    // A checksum has no validators of its own: the archive's would answer
    // a 304 carrying the archive's headers (review: attack).
    if resolution.request.checksum {
        return checksum(app, &resolution, method, client_of(app, request), log)
            .await
            .map(Answer::Whole);
    }
    let validators = Validators {
        etag: &resolution.etag,
        last_modified: resolution.modified_for_conditions(),
        immutable_url: resolution.immutable_url(),
    };
    if conditional::not_modified(headers, &validators) {
        let mut response = Response::new(response::no_length());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        common_headers(response.headers_mut(), &resolution);
        return Ok(Answer::Whole(response));
    }

    let lookup = if method == Method::HEAD {
        match app.cache.peek(&resolution.spec) {
            // It waits for the generation's start like a GET that joins it:
            // on its own client's turn too.
            Some(mut lookup) => {
                app.cache.wanted_by(&mut lookup, client_of(app, request));
                lookup
            }
            // What GET would answer without a lookup.
            None if app.cache.known_too_large(&resolution.spec) => {
                return Err(Error::KnownTooLarge);
            }
            // HEAD never starts a generation.
            None => {
                log.cache = Some("miss");
                let response = archive_response(&resolution, None, None, "miss");
                return Ok(Answer::Whole(response));
            }
        }
    } else {
        lookup_within_budget(app, &resolution, client_of(app, request), &log.request_id)?
    };
    let cache_label = lookup.label();
    log.cache = Some(cache_label);

    // A growing archive: wait for its first bytes (or its end) so a failure
    // that happens at once is still an error status, not an aborted 200.
    // (A zip's and a tar.gz's first bytes are written before git starts:
    // those answer at once, and a git that then fails aborts the 200.)
    // A client that cannot tell a truncated body from a complete one (HTTP
    // 1.0 has no chunked encoding: a growing archive would end with a plain
    // close) waits for the end and gets a `Content-Length`. So does a
    // resume (a `Range` without `If-Range`: curl -C -, wget -c, aria2
    // --continue), which a growing archive could only answer with the
    // whole body: curl then gives up, aria2 starts a new file.
    // A client that leaves meanwhile drops this future: its log says 499.
    // Asked only of an archive not complete: a hit looks at no header here.
    let needs_length = || {
        request.version < http::Version::HTTP_11
            || headers.contains_key(X_GITBALL_WANT_LENGTH)
            || is_resume(headers)
    };
    let source = match lookup {
        Lookup::Hit(file) => Source::Complete(file),
        Lookup::Join(generation) | Lookup::Miss(generation) if needs_length() => {
            match generation.finished().await {
                GenerationState::Complete(file) => Source::Complete(file),
                GenerationState::Failed(failure) => return Err(failure.into()),
                GenerationState::Running => return Err(Error::GenerationFailed),
            }
        }
        Lookup::Join(generation) | Lookup::Miss(generation) => {
            let progress = generation.started().await;
            match progress.state {
                GenerationState::Complete(file) => Source::Complete(file),
                GenerationState::Failed(failure) => return Err(failure.into()),
                GenerationState::Running => Source::Growing(generation.into_generation()),
            }
        }
    };

    let complete = match &source {
        Source::Complete(file) => Some(file.clone()),
        Source::Growing(_) => None,
    };
    let range = match &complete {
        Some(file) => conditional::requested_range(headers, &resolution.etag, file.len).map_err(
            |conditional::Unsatisfiable| Error::RangeNotSatisfiable {
                complete_length: file.len,
            },
        )?,
        None => None,
    };
    let response = archive_response(&resolution, complete.as_deref(), range, cache_label);
    if method == Method::HEAD {
        return Ok(Answer::Whole(response));
    }
    // A complete file is opened by its name in the directory the cache
    // locked (`CacheFile::open`): one evicted since the lookup, or deleted
    // behind the archiver's back, is not there; one cut, replaced or
    // written to behind its back is not the file indexed (another length,
    // inode or mtime). Either is forgotten, and the request resolved again.
    let reader = match (tail::Reader::open(source, range), complete) {
        (Ok(reader), _) => reader,
        (Err(error), Some(file))
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
            ) =>
        {
            app.cache.forget(&file);
            return Err(Error::FileGone);
        }
        (Err(error), _) => return Err(Error::internal(error)),
    };
    Ok(Answer::Stream { response, reader })
}

/// A request for the rest of an archive with no fallback to the whole: a
/// `Range` without `If-Range`. It is answered once the archive is complete,
/// with the range (`docs/http.md#range-requests`).
pub(crate) fn is_resume(headers: &HeaderMap) -> bool {
    headers.contains_key(header::RANGE) && !headers.contains_key(header::IF_RANGE)
}

/// `…/archive/{ref}.{ext}.sha256`: `"{hex}  {filename}\n"`, generating the
/// archive first if needed.
async fn checksum(
    app: &App,
    resolution: &Resolution,
    method: &Method,
    client: IpAddr,
    log: &mut RequestLog,
) -> Result<Response, Error> {
    let lookup = lookup_within_budget(app, resolution, client, &log.request_id)?;
    let cache_label = lookup.label();
    log.cache = Some(cache_label);
    let file = match lookup {
        Lookup::Hit(file) => file,
        Lookup::Join(generation) | Lookup::Miss(generation) => match generation.finished().await {
            GenerationState::Complete(file) => file,
            GenerationState::Failed(failure) => return Err(failure.into()),
            GenerationState::Running => return Err(Error::GenerationFailed),
        },
    };
    let body = format!("{}  {}\n", hex::encode(file.sha256), resolution.filename);
    let length = body.len();
    let mut response = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body))
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(X_GITBALL_COMMIT, header_value(&resolution.resolved.commit));
    headers.insert(X_GITBALL_CACHE, HeaderValue::from_static(cache_label));
    // The archive's freshness: without it a cache in front falls back to
    // heuristic freshness (a CDN's default TTL, an hour and more), and
    // answers a branch's checksum after a push with the old archive's.
    headers.insert(header::CACHE_CONTROL, resolution.cache_control());
    Ok(response)
}

/// The cache lookup of a request that may start a generation, within its
/// client's budget: a token is taken first and given back if the lookup was
/// a hit or a join, so only a request that really starts a generation
/// spends one. A client with no token left is still served what exists or
/// is under way (a `peek`), and gets `429` only for what would be new.
pub(crate) fn lookup_within_budget(
    app: &App,
    resolution: &Resolution,
    client: IpAddr,
    request_id: &str,
) -> Result<Lookup, Error> {
    // A hit or a join starts nothing: no budget is reserved (and refunded).
    if let Some(lookup) = app.cache.existing(&resolution.spec, client) {
        return Ok(lookup);
    }
    // An archive known to pass `--max-archive-bytes` is refused unrun: its
    // git would run up to the limit again for the same answer (attack).
    if app.cache.known_too_large(&resolution.spec) {
        return Err(Error::KnownTooLarge);
    }
    let Some(budget) = app.budget.as_ref().filter(|_| !resolution.paid) else {
        return Ok(app
            .cache
            .lookup(resolution.spec.clone(), client, request_id)?);
    };
    match budget.reserve(client) {
        Ok(reservation) => {
            let lookup = app
                .cache
                .lookup(resolution.spec.clone(), client, request_id)?;
            if !matches!(lookup, Lookup::Miss(_)) {
                reservation.refund();
            }
            Ok(lookup)
        }
        Err(exhausted) => match app.cache.peek(&resolution.spec) {
            Some(mut lookup) => {
                app.cache.wanted_by(&mut lookup, client);
                Ok(lookup)
            }
            None => {
                metrics::counter!(crate::metrics::BUDGET_REJECTED_TOTAL).increment(1);
                tracing::debug!(%client, "crawler budget spent");
                Err(Error::RateLimited {
                    retry_after_seconds: exhausted.retry_after_seconds(),
                })
            }
        },
    }
}

/// Who the request is for, as far as the budget is concerned
/// (`docs/security.md#client-identity`): the `X-Gitball-Client` a trusted
/// peer sent, else the socket peer. A peer is trusted when it passed the
/// `--token-file` check (only proxies hold that token) or is on loopback
/// (a proxy on the same host, embedded mode). A header that does not parse
/// as an address is ignored. Requests without a socket (in-process tests)
/// count as one unspecified client.
pub(crate) fn client_of(app: &App, request: &Parts) -> IpAddr {
    client_identity(app.token.as_ref().map(|_| true), request)
}

/// [`client_of`], given `vouched`: `None` without `--token-file` (a
/// loopback peer is then believed), else whether the request carried that
/// token. Every archive request with the flag set did (archive URLs need
/// it); a prewarm need not, as the prewarm token admits it too, and then
/// nothing vouches for it, from loopback either.
pub(crate) fn client_identity(vouched: Option<bool>, request: &Parts) -> IpAddr {
    let peer = request
        .extensions
        .get::<OnConnection>()
        .map(|connection| client_key(connection.peer.ip()));
    let trusted = vouched.unwrap_or_else(|| peer.is_none_or(|peer| peer.is_loopback()));
    let claimed = || {
        request
            .headers
            .get(X_GITBALL_CLIENT)?
            .to_str()
            .ok()?
            .trim()
            .parse::<IpAddr>()
            .ok()
    };
    match (trusted.then(claimed).flatten(), peer) {
        (Some(claimed), _) => client_key(claimed),
        (None, Some(peer)) => peer,
        (None, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

/// What the request names, resolved; `client` pays for a look at its
/// `subtree` with a token of its budget (`None`: a prewarm, which names
/// none and takes no token).
pub(crate) async fn resolve(
    app: &App,
    archive: ArchiveRequest,
    subtree: Option<String>,
    client: Option<IpAddr>,
) -> Result<Resolution, Error> {
    let repository = app.repos.open(&archive.owner, &archive.repo)?;
    // The object a ref names is read off the serving thread, once: it may
    // be a delta at the end of a chain through large objects (attack:
    // 0.8 s of a serving thread on every request for one commit by id,
    // whose other connections waited meanwhile). Requests for an object
    // being read wait for that read on the runtime, holding no blocking
    // thread (review: hundreds of requests for one costly, broken commit
    // each held one, and every other repository's work off the serving
    // threads queued behind them).
    let resolved = match repository.find(&archive.reference)? {
        RefLookup::Known(resolved) => resolved,
        RefLookup::Found(found) => repository.peel_found_waiting(found).await?,
    };
    // A commit asked for by its id must be one this repository publishes,
    // when `--require-reachable` says so; otherwise it is as unknown as a
    // commit that does not exist. Checked before anything else is read of
    // the commit: a `?path=` looked for first answered `path_not_found` or
    // not by what the commit's trees hold, so a commit only in a pool
    // shared with a private fork told which names its tree has (attack).
    // A known answer needs no blocking thread; the first check after a
    // push walks the history on one, and the requests that arrive
    // meanwhile wait for that walk on the runtime, holding none (review:
    // each held one of the runtime's 512). The digest of the refs it is
    // checked under is the one an archive keyed by the refs takes below:
    // taken once (review of 9256de4: each take is a `statx` of every loose
    // ref, and a hit took it twice).
    let reachable_under = if app.require_reachable
        && resolved.kind == RefKind::Commit
        && archive.reference.bytes().all(|b| b.is_ascii_hexdigit())
    {
        let refs = repository.refs_digest().await?;
        if !repository
            .reaches(&resolved.commit, Some(refs.clone()))
            .await?
        {
            return Err(Error::RefNotFound);
        }
        Some(refs)
    } else {
        None
    };
    let name = format!(
        "{}-{}",
        archive.repo,
        url::label(&resolved.kind, &resolved.commit)
    );
    // A commit not seen before has its changed trees and their attributes
    // read: off the serving thread, as for the refs below (a request that
    // finds them being read waits on the runtime, as for the history).
    //
    // Reading them is cold work a push decides the size of, whatever the
    // request: it takes a token of `client`'s budget (attack: a `HEAD` by
    // the id of each commit of a history whose directory of 50,000 entries
    // changed each time, 42 ms each, free), as a look at a `?path=` does
    // below; a request takes at most one, which the generation it leads
    // to does not take again. An archive of the commit the cache has
    // without the refs says the commit does not ask for `export-subst`
    // (that never changes): a hit whose answer was forgotten is not
    // charged for it.
    let mut paid = false;
    let compression = match archive.format {
        Format::TarGz => Compression::Gzip(app.gzip_level),
        Format::TarZst => Compression::Zstd(app.zstd_level),
        Format::Zip => Compression::Zip(crate::compress::ZIP_LEVEL),
        Format::Tar => Compression::None,
    };
    let spec_of = |refs: Option<String>, tar_writer: Option<String>| Spec {
        git_dir: repository.git_dir().to_path_buf(),
        common_dir: repository.common_dir().to_path_buf(),
        repository: format!("{}/{}", archive.owner, archive.repo),
        commit: resolved.commit.clone(),
        format: archive.format,
        prefix: format!("{name}/"),
        subtree: subtree.clone(),
        compression,
        refs,
        commit_time: resolved.committer_time,
        confined_to: repository.confined_to().map(std::path::Path::to_path_buf),
        tar_writer,
    };
    let substitutes = match repository.known_substitutes(&resolved.commit) {
        Some(substitutes) => substitutes,
        None if app
            .cache
            .peek(&spec_of(None, app.cache.tar_writer(false).await))
            .is_some() =>
        {
            false
        }
        None => {
            paid = take_token(app, client)?;
            repository.substitutes(&resolved.commit).await?
        }
    };
    // An archive whose `export-subst` output may read the refs is keyed
    // (and tagged) by their state too: a pushed tag then makes new bytes
    // under a new ETag, never new bytes under an old one.
    let refs = if substitutes {
        // Listing every ref (after a push; or on each request while the
        // refs keep changing): off the serving thread, whose other
        // requests it would hold up for as long (attack: 1.5 s with
        // 100,000 refs). Not again when reachability was just checked
        // under a digest: a push since is met when the generation starts
        // (`refs_changed`, resolved again), as for a push after this.
        Some(match reachable_under {
            Some(refs) => refs,
            None => repository.refs_digest().await?,
        })
    } else {
        None
    };
    let tar_writer = app.cache.tar_writer(refs.is_some()).await;
    let spec = spec_of(refs, tar_writer);
    // Off the serving thread: each tree on the path is read whole, and a
    // push decides how large (attack: 500 nested trees of 8 MB, 2.7 s).
    // The answer is kept, so a later request reads no tree; requests for
    // a path being looked for wait for that look on the runtime, holding
    // no thread (as for the object above). An archive the cache has or is
    // making was looked for before it was made: no look. A look is cold
    // work, as a generation is: it takes a token of `client`'s budget
    // (attack: names that are not there in a directory of 50,000 entries,
    // 40 ms each, asked for free), unless this request took one already.
    if let Some(subtree) = &spec.subtree
        && app.cache.peek(&spec).is_none()
    {
        let pay = || {
            if !paid {
                paid = take_token(app, client)?;
            }
            Ok(())
        };
        let found = repository
            .has_path_paid(&resolved.commit, subtree, pay)
            .await?;
        if !found {
            return Err(Error::SubtreeNotFound);
        }
    }
    let etag = format!("\"{}-{}\"", resolved.commit, spec.variant());
    let filename = format!("{name}.{}", archive.format.ext());
    Ok(Resolution {
        request: archive,
        resolved,
        spec,
        filename,
        etag,
        paid,
    })
}

/// Takes a token of `client`'s budget for cold work other than a
/// generation (reading a new commit's trees, looking for a new
/// `?path=`): whether one was taken (none without a budget or a client),
/// or `429` when the budget is spent.
fn take_token(app: &App, client: Option<IpAddr>) -> Result<bool, Error> {
    let (Some(budget), Some(client)) = (&app.budget, client) else {
        return Ok(false);
    };
    match budget.reserve(client) {
        Ok(_spent) => Ok(true),
        Err(exhausted) => {
            metrics::counter!(crate::metrics::BUDGET_REJECTED_TOTAL).increment(1);
            Err(Error::RateLimited {
                retry_after_seconds: exhausted.retry_after_seconds(),
            })
        }
    }
}

/// The `200`/`206` head of an archive; its body is attached later.
fn archive_response(
    resolution: &Resolution,
    complete: Option<&CacheFile>,
    range: Option<ByteRange>,
    cache: &'static str,
) -> Response {
    // A GET replaces the body; a HEAD keeps it: a length only with a
    // complete file's headers, as GET's.
    let mut response = Response::new(response::no_length());
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let headers = response.headers_mut();
    common_headers(headers, resolution);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(resolution.request.format.content_type()),
    );
    headers.insert(X_GITBALL_CACHE, HeaderValue::from_static(cache));
    if let Some(file) = complete {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let digest = base64::engine::general_purpose::STANDARD.encode(file.sha256);
        headers.insert(REPR_DIGEST, header_value(&format!("sha-256=:{digest}:")));
        let length = match range {
            Some(range) => {
                headers.insert(
                    header::CONTENT_RANGE,
                    header_value(&format!(
                        "bytes {}-{}/{}",
                        range.first, range.last, file.len
                    )),
                );
                range.len()
            }
            None => file.len,
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// Headers every archive response carries, 304 included.
fn common_headers(headers: &mut HeaderMap, resolution: &Resolution) {
    let Resolution {
        request,
        resolved,
        filename,
        etag,
        ..
    } = resolution;
    headers.insert(header::ETAG, header_value(etag));
    headers.insert(
        header::LAST_MODIFIED,
        header_value(&httpdate::fmt_http_date(resolution.last_modified())),
    );
    headers.insert(X_GITBALL_COMMIT, header_value(&resolved.commit));
    headers.insert(
        header::CONTENT_DISPOSITION,
        // Quoted: a file name is `{repo}-{label}.{ext}`, ASCII of
        // `A-Z a-z 0-9 . _ - + @ =` by the URL grammar, so it never needs
        // escaping inside the quotes, nor an RFC 8187 `filename*`.
        header_value(&format!("attachment; filename=\"{filename}\"")),
    );
    // The commit URL pins these bytes only when nothing but the commit
    // decides them.
    if resolution.spec.refs.is_none() {
        let immutable = url::immutable_path(
            &request.owner,
            &request.repo,
            &resolved.commit,
            request.format,
            resolution.spec.subtree.as_deref(),
        );
        headers.insert(
            header::LINK,
            header_value(&format!("<{immutable}>; rel=\"immutable\"")),
        );
    }
    headers.insert(header::CACHE_CONTROL, resolution.cache_control());
}

/// Values built from validated parts (hex, names of `[A-Za-z0-9._/+@=-]`)
/// are always valid header values.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Error> {
    let Some(expected) = &app.token else {
        return Ok(());
    };
    if bearer_is(headers, expected) {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitball_core::server::ClientWrites;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::Command;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tower::ServiceExt;

    use crate::cache::Settings;
    use crate::generate::Limits;

    fn git(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .current_dir(dir)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "C")
            .env("GIT_COMMITTER_EMAIL", "c@example.com")
            .args(args)
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?}");
    }

    /// An archiver's routes over one repository (`local/widget`), in-process.
    fn app(dir: &Path) -> (Router, Arc<Cache>) {
        let (router, cache, _) = app_with_state(dir);
        (router, cache)
    }

    /// [`app`], and the state its routes serve from.
    fn app_with_state(dir: &Path) -> (Router, Arc<Cache>, Arc<App>) {
        let widget = dir.join("widget");
        std::fs::create_dir_all(&widget).unwrap();
        git(&widget, &["init", "-q", "-b", "main"]);
        std::fs::write(widget.join("README"), "hello\n").unwrap();
        git(&widget, &["add", "."]);
        git(&widget, &["commit", "-q", "-m", "one"]);
        let cache = Cache::open(Settings {
            dir: dir.join("cache"),
            max_bytes: 1 << 20,
            max_generations: 1,
            queue_timeout: Duration::from_secs(5),
            limits: Limits {
                timeout: Duration::from_secs(30),
                max_bytes: 1 << 20,
                memory: Some(1 << 30),
            },
            git: crate::generate::find_git().unwrap(),
            tar_writer: None,
        })
        .unwrap();
        let app = Arc::new(App {
            repos: Repositories::new(&widget).unwrap(),
            cache: cache.clone(),
            token: None,
            budget: None,
            prewarm_token: None,
            prewarm_formats: vec![Format::TarGz, Format::Zip],
            require_reachable: true,
            gzip_level: 6,
            zstd_level: 3,
            metrics: gitball_core::metrics::install(),
        });
        (router(app.clone()), cache, app)
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, HeaderMap, serde_json::Value) {
        let request = http::Request::get(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (parts.status, parts.headers, json)
    }

    /// Shutdown is one typed state: a checksum asked for after the cache
    /// stopped gets the same `503` + `Retry-After` as an archive, not a 500.
    #[tokio::test]
    async fn checksum_and_archive_during_shutdown_are_503_with_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let (router, cache) = app(dir.path());
        let (status, _, _) = get(&router, "/local/widget/archive/main.tar.sha256").await;
        assert_eq!(status, StatusCode::OK);

        assert!(cache.shutdown(Duration::from_secs(5)).await);
        for path in [
            "/local/widget/archive/main.zip.sha256",
            "/local/widget/archive/main.zip",
        ] {
            let (status, headers, json) = get(&router, path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(json["error"], "shutting_down", "{path}");
            assert!(headers.contains_key(header::RETRY_AFTER), "{path}");
        }
        // What is complete is still served.
        let (status, _, _) = get(&router, "/local/widget/archive/main.tar.sha256").await;
        assert_eq!(status, StatusCode::OK);
    }

    fn parts(peer: &str, claimed: Option<&str>) -> Parts {
        let mut request = http::Request::get("/x").body(()).unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(OnConnection {
            peer,
            writes: ClientWrites::default(),
            takeover: None,
        });
        if let Some(claimed) = claimed {
            request
                .headers_mut()
                .insert(X_GITBALL_CLIENT, HeaderValue::from_str(claimed).unwrap());
        }
        request.into_parts().0
    }

    #[test]
    fn the_client_header_is_believed_from_loopback_or_an_authenticated_peer_only() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let loopback = parts("127.0.0.1:5000", Some("198.51.100.7"));
        assert_eq!(client_identity(None, &loopback), ip("198.51.100.7"));
        let outside = parts("192.0.2.9:5000", Some("198.51.100.7"));
        assert_eq!(client_identity(None, &outside), ip("192.0.2.9"));
        assert_eq!(client_identity(Some(true), &outside), ip("198.51.100.7"));
        // Garbage is ignored; the peer stands.
        let garbage = parts("192.0.2.9:5000", Some("not-an-address"));
        assert_eq!(client_identity(Some(true), &garbage), ip("192.0.2.9"));
        // No header: the peer, an IPv6 one by its /64.
        let v6 = parts("[2001:db8:1:2:3:4:5:6]:5000", None);
        assert_eq!(client_identity(None, &v6), ip("2001:db8:1:2::"));
        let mapped = parts("[::ffff:127.0.0.1]:5000", Some("198.51.100.8"));
        assert_eq!(client_identity(None, &mapped), ip("198.51.100.8"));
        // A claimed IPv6 client is its /64 too (review: attack; the queue
        // took each address of one /64 for a client of its own), and a
        // claimed IPv4-mapped one its IPv4 address.
        for claimed in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::8"] {
            let v6 = parts("127.0.0.1:5000", Some(claimed));
            assert_eq!(client_identity(None, &v6), ip("2001:db8:1:2::"));
        }
        let mapped = parts("127.0.0.1:5000", Some("::ffff:198.51.100.9"));
        assert_eq!(client_identity(None, &mapped), ip("198.51.100.9"));
        // With --token-file, a request without the token is not believed,
        // from loopback either (a prewarm admitted by the prewarm token).
        assert_eq!(client_identity(Some(false), &loopback), ip("127.0.0.1"));
        assert_eq!(client_identity(Some(false), &outside), ip("192.0.2.9"));
    }

    /// A hit of a commit-id URL learns that a ref reaches the commit from
    /// the set kept for the refs, after one check that the refs are as
    /// they were (a `statx` of every loose ref and directory): `resolve`
    /// checks reachability before a `?path=` is looked for, and `serve`
    /// checked it again, under a digest taken afresh, so every hit stat'ed
    /// every ref twice (review of 9256de4: 1,015 `statx` per hit with 500
    /// loose tags, 509 before). So does one whose archive is keyed by the
    /// refs (export-subst), whose digest is the one reachability was
    /// checked under.
    #[tokio::test]
    async fn a_hit_by_commit_id_checks_the_refs_once() {
        let dir = tempfile::tempdir().unwrap();
        let (router, _, app) = app_with_state(dir.path());
        let widget = dir.path().join("widget");
        let head = || {
            String::from_utf8(
                Command::new("git")
                    .current_dir(&widget)
                    .args(["rev-parse", "HEAD"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
        };
        let plain = head();
        std::fs::write(widget.join(".gitattributes"), "README export-subst\n").unwrap();
        std::fs::write(widget.join("README"), "hello $Format:%D$\n").unwrap();
        git(&widget, &["add", "."]);
        git(&widget, &["commit", "-q", "-m", "two"]);
        let subst = head();
        for commit in [plain.trim(), subst.trim()] {
            let path = format!("/local/widget/archive/{commit}.tar");
            // The refs settle (out of the racy window) and the archive is
            // made: the second answer is a hit, from what is kept.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (status, headers, _) = get(&router, &path).await;
                assert_eq!(status, StatusCode::OK, "{path}");
                if headers["x-gitball-cache"] == "hit"
                    && app
                        .repos
                        .open("local", "widget")
                        .unwrap()
                        .known_refs_digest()
                        .is_some()
                {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{path}: no hit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let repository = app.repos.open("local", "widget").unwrap();
            let before = repository.refs_digest_checks.load(Ordering::Relaxed);
            let (status, headers, _) = get(&router, &path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers["x-gitball-cache"], "hit", "{path}");
            let checks = repository.refs_digest_checks.load(Ordering::Relaxed) - before;
            assert_eq!(
                checks, 1,
                "{path}: the refs were checked {checks} times for one hit"
            );
        }
    }

    #[tokio::test]
    async fn healthz_is_json_on_the_archiver() {
        let dir = tempfile::tempdir().unwrap();
        let (router, _) = app(dir.path());
        let (status, headers, json) = get(&router, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(json["status"], "ok");
    }
}
