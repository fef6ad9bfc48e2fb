//! gitball-proxy: the stateless front of gitball.
//!
//! A request's life, module by module: `http` parses it with the URL
//! grammar shared with the archiver and answers bad input itself; `routes`
//! picks the route for `owner/repo` (first matching glob) and orders its
//! candidates (replicas by rendezvous hash, then the primary); `sign` checks
//! the token of a private route; `upstream` moves recently failed archivers
//! last; `forward` tries candidates until one gives response headers,
//! failing over on connect errors, timeouts, `5xx` and a replica's `404`;
//! `pipe` streams the chosen body to the client at the client's pace.
//! `client` says which client a request is for (the archivers' crawler
//! budget is keyed on it) and `prewarm` starts a ref's generations ahead of
//! a release rush.
//! `metrics` names every series, `error` maps every failure to an HTTP
//! answer in one place, `config` holds the flags.
//!
//! What both tiers share (the URL grammar, the HTTP server loop with its
//! header-read timeout, head-size limits and bounded graceful shutdown, the
//! request log, JSON errors) is `gitball_core`; from the archiver crate the
//! proxy takes only what embedded mode runs. `docs/architecture.md` follows
//! a request through the modules.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use gitball_proxy::config::Config;
//! let config = Config::try_parse_from(["gitball-proxy", "--routes", "/etc/gitball/routes.toml"])?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! gitball_proxy::run(listener, config, shutdown).await
//! # }
//! ```

pub mod client;
pub mod config;
pub mod error;
pub mod exchange;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod pipe;
pub mod pool;
pub mod prewarm;
pub mod resume;
pub mod routes;
pub mod sign;
pub mod splice;
#[cfg(test)]
mod test_support;
pub mod upstream;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gitball_core::secret::read_secret;
use gitball_core::{limits, server};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

use crate::forward::Forwarder;
use crate::routes::{RouteTable, Routes};
use crate::sign::SigningKey;
use crate::upstream::Health;

/// Serves the proxy on `listener` until `shutdown` is cancelled, then
/// drains for `--shutdown-grace`. In embedded mode (`--repos`) it also runs
/// the archiver, stopped by the same token.
///
/// The routing table is not reloaded here; a binary that wants SIGHUP
/// reloads uses [`Proxy`] and calls [`Routes::reload`] on [`Proxy::routes`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin = server::bind_admin(config.admin_listen)?;
    match Proxy::start(config, shutdown).await? {
        Some(proxy) => proxy.serve(listener, admin).await,
        None => Ok(()),
    }
}

/// A started proxy: routes loaded (or the embedded archiver running),
/// ready to serve.
pub struct Proxy {
    state: Arc<http::AppState>,
    shutdown: CancellationToken,
    grace: Duration,
    /// Shared with the embedded archiver (`server::ShutdownCut`).
    cut: server::ShutdownCut,
    /// `--max-connections`, or its default for this mode.
    max_connections: usize,
    /// `--max-connections-per-client` and the peers it does not count.
    per_client: server::PerClient,
    /// `--tcp-congestion`, if given (`server::Connections::with_tcp_congestion`).
    tcp_congestion: Option<String>,
    embedded: Option<Embedded>,
}

/// The in-process archiver of embedded mode, and its own shutdown: once
/// the proxy has drained, or when the `Proxy` is dropped unserved.
struct Embedded {
    task: JoinHandle<anyhow::Result<()>>,
    stop: tokio_util::sync::DropGuard,
}

impl Proxy {
    /// Loads the routing table, or starts the embedded archiver on
    /// `127.0.0.1:0`, and reads the key and token files. `None` when
    /// `shutdown` came while the embedded archiver started: there is
    /// nothing to serve, and nothing failed.
    pub async fn start(
        config: Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Proxy>> {
        Proxy::start_with_cut(config, shutdown, server::ShutdownCut::default()).await
    }

    /// [`Proxy::start`], with the shutdown cut shared with the caller (and
    /// the embedded archiver), which ends the grace early through it
    /// ([`server::ShutdownCut::end_grace_now`]: a second SIGTERM).
    pub async fn start_with_cut(
        config: Config,
        shutdown: CancellationToken,
        cut: server::ShutdownCut,
    ) -> anyhow::Result<Option<Proxy>> {
        let handle = gitball_core::metrics::install();
        metrics::register();

        let upstream_token_file = config
            .upstream_token_file
            .clone()
            // In embedded mode an archiver `--token-file` is the proxy's own
            // to send: no reason to make the operator say it twice.
            .or_else(|| {
                config
                    .repos
                    .as_ref()
                    .and(config.archiver.token_file.clone())
            });
        let upstream_token = match &upstream_token_file {
            Some(path) => {
                let token = read_secret(path, "--upstream-token-file")?;
                Some(String::from_utf8(token).map_err(|_| {
                    anyhow::anyhow!("--upstream-token-file {} is not UTF-8", path.display())
                })?)
            }
            None => None,
        };
        // Embedded, both ends are this process's: two tokens that differ
        // would refuse every download (502, then every upstream ejected).
        if config.repos.is_some()
            && let (Some(sent), Some(archiver_file)) =
                (&upstream_token, &config.archiver.token_file)
            && read_secret(archiver_file, "--token-file")? != sent.as_bytes()
        {
            anyhow::bail!(
                "--upstream-token-file and --token-file hold different tokens; in embedded mode \
                 give --token-file alone (the proxy sends it to its own archiver)"
            );
        }
        let signing_key = match &config.signing_key_file {
            Some(path) => Some(SigningKey::from_file(path)?),
            None => None,
        };

        // Embedded, one client download holds four fds in this process.
        let fds_per_connection = if config.repos.is_some() {
            limits::FDS_PER_CONNECTION_EMBEDDED
        } else {
            limits::FDS_PER_CONNECTION_PROXY
        };
        let max_connections = config.archiver.max_connections(fds_per_connection);
        limits::warn_if_too_low(limits::nofile(), max_connections, fds_per_connection);

        let (routes, embedded) = match (&config.routes, &config.repos) {
            (Some(path), None) => {
                let routes = Routes::from_file(path.clone())
                    .with_context(|| format!("cannot load the routing table {}", path.display()))?;
                tracing::info!(
                    path = %path.display(),
                    routes = routes.current().len(),
                    "routing table loaded"
                );
                (routes, None)
            }
            (None, Some(repos)) => {
                let loopback = (std::net::Ipv4Addr::LOCALHOST, 0).into();
                // Its connections all come from this proxy over loopback:
                // without --tcp-congestion the accept loop gives them reno
                // (`server::LOOPBACK_CONGESTION`), as for any loopback peer.
                let listener =
                    gitball_core::server::bind(loopback, config.archiver.tcp_congestion.as_deref())
                        .context("cannot bind the embedded archiver's port")?;
                let address = listener.local_addr()?;
                // The in-process archiver's connections all come from this
                // proxy, at most one per client download (idle pooled ones
                // included) plus the start-up health check's: the cap with
                // a little headroom never refuses one of them.
                let mut options = config.archiver.clone();
                options.max_connections =
                    Some((max_connections + EMBEDDED_CONNECTIONS_HEADROOM) as u64);
                // At shutdown the archiver serves on through the proxy's
                // drain: a parked download resumes on a new connection to
                // it, and a request not yet forwarded still gets there.
                // Only once the proxy's connections are all gone (finished,
                // or cut by the proxy, which the shared flag makes its
                // downloads log as `shutdown`) does it drain, with nothing
                // left to wait for but its idle connections.
                options.shutdown_grace = EMBEDDED_GRACE_MARGIN;
                // Its one client is this proxy, which counts its own
                // clients' connections.
                options.max_connections_per_client = Some(0);
                let archiver_shutdown = CancellationToken::new();
                // Stops the archiver if this start fails after here, or the
                // `Proxy` is dropped unserved.
                let stop = archiver_shutdown.clone().drop_guard();
                let mut archiver = tokio::spawn(gitball_archiver::run(
                    listener,
                    // The proxy's own admin listener shows both tiers.
                    None,
                    repos.clone(),
                    options,
                    archiver_shutdown.clone(),
                    cut.clone(),
                ));
                let base = format!("http://{address}");
                // A bad --repos or cache dir fails here, before the proxy
                // says it is serving.
                tokio::select! {
                    ready = wait_healthy(&base) => ready?,
                    ended = &mut archiver => {
                        ended.context("the embedded archiver panicked")??;
                        anyhow::bail!("the embedded archiver stopped at start-up");
                    }
                    () = shutdown.cancelled() => {
                        // A signal while it started: not a failure.
                        archiver_shutdown.cancel();
                        archiver.await.context("the embedded archiver panicked")??;
                        tracing::info!("shut down while starting; nothing was served");
                        return Ok(None);
                    }
                }
                let table = RouteTable::single(&base)?;
                tracing::info!(%address, repos = %repos.display(), "embedded archiver ready");
                (
                    Routes::fixed(table),
                    Some(Embedded {
                        task: archiver,
                        stop,
                    }),
                )
            }
            // clap's `upstreams` group makes these impossible from the
            // command line; a `Config` built by hand could still say it.
            _ => anyhow::bail!("give exactly one of --routes and --repos"),
        };
        if routes.current().has_private() && signing_key.is_none() {
            anyhow::bail!(
                "the routing table has private routes but no --signing-key-file is given"
            );
        }

        let prewarm = match &config.archiver.prewarm_token_file {
            Some(path) => Some(prewarm::Prewarm {
                token: read_secret(path, "--prewarm-token-file")?,
                formats: config.archiver.prewarm_formats.0.clone(),
                // Archivers without a token of their own know the proxy
                // only by the prewarm token: pass on the one checked.
                pass_token: upstream_token.is_none(),
            }),
            None => None,
        };
        let trusted_proxies = config.trusted_proxies.clone().unwrap_or_default();
        if !trusted_proxies.is_empty() {
            tracing::info!(?trusted_proxies, "X-Forwarded-For is read from these peers");
        }
        // A trusted proxy's connections carry its clients: it is a front,
        // not counted as one client (docs/proxy.md, "Connections and file
        // descriptors").
        let per_client = server::PerClient {
            max: config
                .archiver
                .max_connections_per_client(max_connections, false),
            fronts: config
                .archiver
                .max_connections_per_client_exempt()
                .union(&trusted_proxies),
        };

        let health = Arc::new(
            Health::new(config.eject_for)
                .probing_for(config.header_timeout)
                .checking_cuts_within(config.header_timeout),
        );
        let forwarder = Forwarder::new(
            health,
            config.connect_timeout,
            config.header_timeout,
            upstream_token.as_deref(),
        )?;
        let state = Arc::new(http::AppState {
            routes: Arc::new(routes),
            forwarder,
            signing_key,
            max_token_ttl: config.max_token_ttl,
            client_idle_timeout: config.client_idle_timeout,
            park_after: config.park_after,
            trusted_proxies,
            prewarm,
            metrics: handle,
            whole_bodies: true,
        });
        Ok(Some(Proxy {
            state,
            shutdown,
            grace: config.shutdown_grace(),
            cut,
            max_connections,
            per_client,
            tcp_congestion: config.archiver.tcp_congestion.clone(),
            embedded,
        }))
    }

    /// The routing table, for reloading it (SIGHUP).
    pub fn routes(&self) -> Arc<Routes> {
        self.state.routes.clone()
    }

    /// Serves on `listener` (and `/healthz` and `/metrics` on `admin`, the
    /// `--admin-listen` one, when given) until the shutdown token is
    /// cancelled, then drains for the grace period and, in embedded mode,
    /// waits for the archiver to stop.
    pub async fn serve(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> anyhow::Result<()> {
        let address = listener.local_addr()?;
        // An embedded archiver that dies takes the proxy down with it:
        // serving 502 for everything would hide the cause.
        let archiver = self.embedded.map(|Embedded { task, stop }| {
            let stop = stop.disarm();
            let shutdown = self.shutdown.clone();
            let watcher = tokio::spawn(async move {
                let result = match task.await {
                    Ok(result) => result,
                    Err(join) => Err(anyhow::anyhow!("the embedded archiver panicked: {join}")),
                };
                if !shutdown.is_cancelled() {
                    match &result {
                        Ok(()) => tracing::error!("the embedded archiver stopped; shutting down"),
                        Err(error) => {
                            tracing::error!(error = %format!("{error:#}"), "the embedded archiver failed; shutting down")
                        }
                    }
                    shutdown.cancel();
                }
                result
            });
            (watcher, stop)
        });

        let admin = server::spawn_admin(
            admin,
            http::admin_router(self.state.clone()),
            &self.shutdown,
        );
        let workers = server::serving_threads();
        let max_connections = self.max_connections;
        let max_connections_per_client = self.per_client.max;
        let connections = server::Connections::new(max_connections, "gitball_proxy")
            .with_cut(self.cut)
            .with_tcp_congestion(self.tcp_congestion.as_deref())
            .with_per_client(self.per_client);
        let drain = serve_on_threads(
            listener,
            &self.state,
            &self.shutdown,
            self.grace,
            workers,
            connections,
            || {
                tracing::info!(
                    listen = %address,
                    workers,
                    max_connections,
                    max_connections_per_client,
                    "gitball-proxy serving"
                )
            },
        )
        .await;
        match &drain {
            Ok(server::Drain::Complete) => {
                tracing::info!("shutdown: all downloads finished")
            }
            Ok(server::Drain::Cut(open)) => {
                tracing::warn!(open, "shutdown: grace ran out; open downloads were cut")
            }
            Err(_) => {}
        }
        // The proxy has drained: nothing of its needs the archiver now. It
        // drains while the admin listener's last connections get their
        // second, not after.
        if let Some((_, stop)) = &archiver {
            stop.cancel();
        }
        if let Some(admin) = admin {
            // It stopped accepting with the proxy's listener; its last
            // connections get a second.
            let _ = admin.await;
        }
        if let Some((archiver, _)) = archiver {
            archiver
                .await
                .context("the embedded archiver's watcher panicked")?
                .context("embedded archiver")?;
        }
        drain.map(drop)
    }
}

/// The embedded archiver's `--shutdown-grace`, which starts once the
/// proxy has drained: its only client is the proxy, whose connections are
/// gone by then, so what it waits for is at most its own idle connections
/// closing. The exit comes at most this, plus the 5 s for generations to
/// stop, after the proxy's grace.
const EMBEDDED_GRACE_MARGIN: Duration = Duration::from_secs(2);

/// Connections the embedded archiver accepts beyond the proxy's cap: the
/// start-up health check's client keeps its connection pooled for a while.
const EMBEDDED_CONNECTIONS_HEADROOM: usize = 16;

/// Serves `listener` on `workers` threads ([`server::serve_on_threads`]),
/// each with its own upstream connection pool, until `shutdown`.
///
/// A download has two connections, the client's and the upstream's, each
/// driven by its own task. On a work-stealing runtime those tasks (and the
/// wake-ups between them, one per chunk) landed on different threads, so
/// every chunk crossed CPUs; a 1 GiB stream ran at 0.72× nginx's. Here
/// everything a connection starts (its upstream connection, the pipe's idle
/// watchdog) runs on the thread that accepted it. What the threads share
/// besides (routes, upstream health, metrics) is behind locks or atomics
/// and touched a few times per request, not per chunk.
async fn serve_on_threads(
    listener: TcpListener,
    state: &Arc<http::AppState>,
    shutdown: &CancellationToken,
    grace: Duration,
    workers: usize,
    connections: server::Connections,
    serving: impl FnOnce(),
) -> anyhow::Result<server::Drain> {
    let router_for = |_| {
        let mut worker_state = http::AppState::clone(state);
        worker_state.forwarder = state.forwarder.with_own_pool();
        http::service(Arc::new(worker_state))
    };
    // The socket-level stall guard backs the pipe's idle watchdog: the
    // watchdog releases the upstream, the guard closes the client's
    // connection, which hyper cannot do while the client reads nothing.
    server::serve_on_threads(
        listener,
        router_for,
        shutdown,
        grace,
        state.client_idle_timeout,
        workers,
        connections,
        "gitball-proxy",
        serving,
    )
    .await
    .context("serving")
}

/// How long the embedded archiver may take to answer `/healthz` (it
/// re-indexes its cache directory first).
const EMBEDDED_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the archiver at `base` answers `/healthz` with `200`.
async fn wait_healthy(base: &str) -> anyhow::Result<()> {
    const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
    let pool = pool::Pool::new(ATTEMPT_TIMEOUT);
    let upstream: std::sync::Arc<str> = base.into();
    let target = ::http::uri::PathAndQuery::from_static("/healthz");
    let headers = ::http::HeaderMap::new();
    let request = exchange::RequestHead::get(&target, &headers);
    let deadline = tokio::time::Instant::now() + EMBEDDED_START_TIMEOUT;
    loop {
        let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, pool.send(&upstream, request)).await;
        if answer.is_ok_and(|answer| answer.is_ok_and(|response| response.status().is_success())) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the embedded archiver did not answer /healthz within {EMBEDDED_START_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/proxy.md`, `docs/internal-api.md` and `docs/architecture.md`
    /// give the proxy's splices, windows, timeouts, pool, keepalive, token
    /// bound and embedded mode as these constants. (Docs review: a figure
    /// changed on one side only had nothing to fail.)
    #[test]
    fn the_figures_docs_give_for_the_proxy_are_these_constants() {
        let squash = gitball_core::docs::prose;
        let proxy = squash(include_str!("../../docs/proxy.md"));
        let api = squash(include_str!("../../docs/internal-api.md"));
        let architecture = squash(include_str!("../../docs/architecture.md"));
        let kib = |bytes: usize| format!("{} KiB", bytes >> 10);
        let widen = format!(
            "took its first {} MiB within {} ms",
            window::WIDEN_AFTER_BYTES >> 20,
            window::WIDEN_WITHIN.as_millis()
        );
        let complete = forward::COMPLETE_ARCHIVE_TIMEOUT.as_secs();
        let keepalive = forward::TCP_KEEPALIVE.as_secs();
        let ordinals = [
            "zeroth", "first", "second", "third", "fourth", "fifth", "sixth",
        ];
        for (docs, name, figure) in [
            (
                &proxy,
                "proxy.md",
                format!(
                    "At most {} downloads are spliced at once",
                    splice::MAX_SPLICED
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!("through a pipe of {}", kib(splice::PIPE_BYTES)),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "if all {} are taken it goes on copied through a buffer of {}",
                    splice::MAX_SPLICED,
                    kib(splice::COPY_BUFFER_BYTES)
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "within {} s (or `--header-timeout`, if less",
                    splice::PREPARE_TIMEOUT.as_secs()
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "At least {} MiB must be left",
                    pipe::MIN_SPLICED_BYTES >> 20
                ),
            ),
            (&proxy, "proxy.md", widen.clone()),
            (&architecture, "architecture.md", widen),
            (
                &architecture,
                "architecture.md",
                format!(
                    "every upstream connection opens with {}",
                    kib(window::SMALL_RECV_BUFFER_BYTES)
                ),
            ),
            (
                &architecture,
                "architecture.md",
                format!(
                    "raises its connection's `SO_RCVBUF` to {}",
                    kib(window::WIDE_RECV_BUFFER_BYTES)
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!("waits up to {complete} s for its head"),
            ),
            (
                &api,
                "internal-api.md",
                format!("may wait for the head up to {complete} s"),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "idle connections are kept for {} s",
                    forward::POOL_IDLE_TIMEOUT.as_secs()
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "TCP keepalive ({keepalive} s idle, {keepalive} s interval, {} probes)",
                    forward::TCP_KEEPALIVE_RETRIES
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "reads into {} buffers, a new one once less than {} of the last is left",
                    kib(forward::UPSTREAM_READ_BUFFER_BYTES),
                    kib(exchange::MIN_READ_ROOM)
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "chunk size is over 2^{} - 1 bytes",
                    (exchange::MAX_BODY_BYTES + 1).trailing_zeros()
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "a head over {} (with the interim heads before it) or {} lines",
                    kib(exchange::MAX_HEAD_BYTES),
                    exchange::MAX_HEADERS
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "chunk-size line (extensions included) is over {}",
                    kib(exchange::MAX_CHUNK_LINE_BYTES)
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "trailers are over {} or {} lines",
                    kib(exchange::MAX_TRAILER_BYTES),
                    exchange::MAX_HEADERS
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "of at most {} kept per thread",
                    exchange::SPARE_READ_BUFFERS
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "one chunk (up to {})",
                    kib(forward::UPSTREAM_READ_BUFFER_BYTES)
                ),
            ),
            (
                &api,
                "internal-api.md",
                format!(
                    "read by the proxy up to {} within {} s",
                    kib(prewarm::MAX_ANSWER_BYTES),
                    prewarm::ANSWER_TIMEOUT.as_secs()
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!("over {} bytes, no `.`", sign::MAX_TOKEN_BYTES),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "ejected by the {} archive failed there in a row",
                    ordinals[upstream::ARCHIVE_FAILURES_TO_EJECT as usize]
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "waits up to {} s for its `/healthz`",
                    EMBEDDED_START_TIMEOUT.as_secs()
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!(
                    "with a grace of {} s that it",
                    EMBEDDED_GRACE_MARGIN.as_secs()
                ),
            ),
            (
                &proxy,
                "proxy.md",
                format!("the same cap plus {EMBEDDED_CONNECTIONS_HEADROOM}"),
            ),
        ] {
            assert!(
                docs.contains(&figure),
                "docs/{name} does not say {figure:?}"
            );
        }
    }

    /// Embedded mode over `repos`, its cache in `cache`, the rest default.
    fn embedded_config(repos: &std::path::Path, cache: &std::path::Path) -> Config {
        Config::try_parse_from([
            "gitball-proxy".as_ref(),
            "--repos".as_ref(),
            repos.as_os_str(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
        ])
        .unwrap()
    }

    /// A `Proxy` dropped without being served stops its embedded archiver:
    /// for an embedder of `Proxy::start`, it ran on for good on a token of
    /// its own (review).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_embedded_archiver_stops_with_a_proxy_dropped_unserved() {
        let dir = tempfile::tempdir().unwrap();
        let (repos, cache) = (dir.path().join("repos"), dir.path().join("cache"));
        std::fs::create_dir(&repos).unwrap();
        let config = embedded_config(&repos, &cache);
        let proxy = Proxy::start(config, CancellationToken::new())
            .await
            .unwrap()
            .expect("started");
        let upstream = proxy
            .routes()
            .current()
            .lookup("a/b")
            .unwrap()
            .candidates("a/b")[0]
            .upstream
            .clone();
        let address = upstream.trim_start_matches("http://").to_owned();
        assert!(tokio::net::TcpStream::connect(&address).await.is_ok());
        drop(proxy);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&address).await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the embedded archiver still accepts at {address}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client's view of one answer: its head and body.
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    /// Reads the next answer off `stream` (`buffer` keeps what follows it).
    /// The answer to a `HEAD` (`head_request`) or a `304` has no body,
    /// whatever its `content-length`.
    async fn next_answer(
        stream: &mut tokio::net::TcpStream,
        buffer: &mut Vec<u8>,
        head_request: bool,
    ) -> Seen {
        use tokio::io::AsyncReadExt;
        let end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 65536];
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the connection ended in a head");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8(buffer.drain(..end).collect()).unwrap();
        let bodiless = head_request || head.starts_with("HTTP/1.1 304 ");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .filter(|_| !bodiless)
            .map_or(0, |length| length.parse().unwrap());
        while buffer.len() < length {
            let mut chunk = [0u8; 65536];
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the connection ended in a body");
            buffer.extend_from_slice(&chunk[..read]);
        }
        Seen {
            head,
            body: buffer.drain(..length).collect(),
        }
    }

    /// A head with its `date` value (the second's) checked and left out.
    fn normalized(head: &str) -> String {
        head.split("\r\n")
            .map(|line| match line.strip_prefix("date: ") {
                Some(date) => {
                    assert!(httpdate_like(date), "{line}");
                    "date: (now)"
                }
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT`'s shape.
    fn httpdate_like(date: &str) -> bool {
        date.len() == 29 && date.ends_with(" GMT") && date.as_bytes()[3] == b','
    }

    /// docs/proxy.md, "The pipe": a body the upstream connection's reads
    /// hold whole is handed to hyper as it is (`pipe::Whole`), and the
    /// client gets the very answer the pipe gave it: the same head, byte
    /// for byte (the `date` line's value is the second's), and the same
    /// body, for a `200`, `304`, `206`, the archiver's `404` and a `HEAD`,
    /// on a kept-alive connection, pipelined, and with `Connection: close`
    /// (which closes the connection after it on both).
    #[tokio::test]
    async fn a_body_read_whole_reaches_the_client_as_the_pipe_sent_it() {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (repos, cache) = (dir.path().join("repos"), dir.path().join("cache"));
        let work = repos.join("acme").join("widget");
        std::fs::create_dir_all(&work).unwrap();
        let git = |args: &[&str]| {
            let status = std::process::Command::new("git")
                .current_dir(&work)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", dir.path())
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@gitball.invalid")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@gitball.invalid")
                .env("GIT_AUTHOR_DATE", "1700000000 +0000")
                .env("GIT_COMMITTER_DATE", "1700000000 +0000")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(work.join("README"), "a small archive\n".repeat(40)).unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "one"]);
        git(&["tag", "v1.0"]);
        let config = embedded_config(&repos, &cache);
        let shutdown = CancellationToken::new();
        let proxy = Proxy::start(config, shutdown.clone())
            .await
            .unwrap()
            .expect("started");
        let mut addresses = Vec::new();
        for whole in [false, true] {
            let mut state = http::AppState::clone(&proxy.state);
            state.whole_bodies = whole;
            state.forwarder = state.forwarder.with_own_pool();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap());
            tokio::spawn(server::serve(
                listener,
                http::service(Arc::new(state)),
                shutdown.clone(),
                Duration::from_secs(1),
                Duration::from_secs(30),
                server::Connections::new(64, "test_whole"),
            ));
        }
        let hit = "/acme/widget/archive/v1.0.tar.gz";
        // The first request generates the archive: later ones are hits.
        let mut warm = tokio::net::TcpStream::connect(addresses[0]).await.unwrap();
        warm.write_all(
            format!("GET {hit} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        warm.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200 "));
        // Hits from then on, read from memory by the archiver.
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(addresses[0]).await.unwrap();
            stream
                .write_all(format!("GET {hit} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let seen = next_answer(&mut stream, &mut Vec::new(), false).await;
            assert!(seen.head.starts_with("HTTP/1.1 200 "), "{}", seen.head);
        }
        let etag = {
            let mut stream = tokio::net::TcpStream::connect(addresses[0]).await.unwrap();
            stream
                .write_all(format!("HEAD {hit} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let seen = next_answer(&mut stream, &mut Vec::new(), true).await;
            seen.head
                .lines()
                .find_map(|line| line.strip_prefix("etag: "))
                .unwrap()
                .to_owned()
        };
        let request = |method: &str, target: &str, id: &str, extra: &str| {
            format!("{method} {target} HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\n{extra}\r\n")
        };
        // (what is sent in one write, whether each answer is a HEAD's)
        let conversations: Vec<Vec<(String, bool)>> = vec![
            // Kept alive: a hit, then the same again.
            vec![(request("GET", hit, "a", ""), false)],
            vec![
                (request("GET", hit, "b", ""), false),
                (request("GET", hit, "b2", ""), false),
            ],
            vec![(
                request("GET", hit, "c", &format!("If-None-Match: {etag}\r\n")),
                false,
            )],
            vec![(request("GET", hit, "d", "Range: bytes=0-9\r\n"), false)],
            vec![(
                request("GET", "/acme/widget/archive/nope.tar.gz", "e", ""),
                false,
            )],
            vec![(request("HEAD", hit, "f", ""), true)],
        ];
        let pipelined = [
            (request("GET", hit, "g1", ""), false),
            (request("HEAD", hit, "g2", ""), true),
            (
                request("GET", hit, "g3", &format!("If-None-Match: {etag}\r\n")),
                false,
            ),
            (request("GET", hit, "g4", "Range: bytes=3-\r\n"), false),
        ];
        let closing = request("GET", hit, "h", "Connection: close\r\n");
        let before = pipe::WHOLE_BODIES.load(Ordering::Relaxed);
        let mut seen: [Vec<(String, Vec<u8>)>; 2] = Default::default();
        for (index, address) in addresses.iter().enumerate() {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            let mut buffer = Vec::new();
            for conversation in &conversations {
                for (sent, head_request) in conversation {
                    stream.write_all(sent.as_bytes()).await.unwrap();
                    let answer = next_answer(&mut stream, &mut buffer, *head_request).await;
                    seen[index].push((normalized(&answer.head), answer.body));
                }
            }
            let all: String = pipelined.iter().map(|(sent, _)| sent.as_str()).collect();
            stream.write_all(all.as_bytes()).await.unwrap();
            for (_, head_request) in &pipelined {
                let answer = next_answer(&mut stream, &mut buffer, *head_request).await;
                seen[index].push((normalized(&answer.head), answer.body));
            }
            stream.write_all(closing.as_bytes()).await.unwrap();
            let answer = next_answer(&mut stream, &mut buffer, false).await;
            seen[index].push((normalized(&answer.head), answer.body));
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            assert!(
                rest.is_empty() && buffer.is_empty(),
                "closed after the answer"
            );
        }
        let [piped, whole] = seen;
        assert_eq!(piped.len(), whole.len());
        for (piped, whole) in piped.iter().zip(&whole) {
            assert_eq!(piped.0, whole.0, "heads");
            assert!(piped.1 == whole.1, "bodies of {}", piped.0);
        }
        for status in [
            "200 OK",
            "304 Not Modified",
            "206 Partial Content",
            "404 Not Found",
        ] {
            assert!(
                piped
                    .iter()
                    .any(|(head, _)| head.starts_with(&format!("HTTP/1.1 {status}\r\n"))),
                "no {status}"
            );
        }
        assert!(
            piped
                .last()
                .unwrap()
                .0
                .contains("\r\nconnection: close\r\n")
        );
        // Every answer with a body on the second server was whole (each
        // came in the archiver's one write on loopback): 200s, 206s, the
        // 404; not the HEADs and 304s.
        assert_eq!(pipe::WHOLE_BODIES.load(Ordering::Relaxed) - before, 8);
        shutdown.cancel();
    }
}
