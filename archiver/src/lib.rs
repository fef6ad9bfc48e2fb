//! gitball-archiver: the HTTP interface for `git archive`, one per file server.
//!
//! A request is parsed with the shared URL grammar (`gitball_core::url`),
//! its repository found and its ref resolved to a commit in-process
//! (`repo`), then served from the cache (`cache`): a complete file is sent
//! with `Content-Length` and ranges (`conditional`); a missing one is
//! generated once (`generate`: one `git archive` child per key, compressed
//! in-process by `compress`) while every request for it tails the growing
//! file (`tail`). `http` holds the routes and responses, `error` the one
//! mapping of errors to statuses, `metrics` the Prometheus series, `config`
//! the flags. `docs/architecture.md` follows a request through them.
//!
//! The crate exports what a binary needs to run an archiver, itself or
//! embedded in the proxy: [`run`], [`Config`] and [`ArchiveOptions`].

mod budget;
mod cache;
mod canary;
mod compress;
mod conditional;
mod config;
mod error;
mod generate;
mod http;
mod metrics;
mod prewarm;
mod queue;
mod repo;
mod shadow;
mod tail;
#[cfg(test)]
mod test_support;
mod zip;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use budget::Rate;
/// The cache's replacement policy, for its trace benchmark
/// (`examples/cache_trace.rs`). Not an API.
#[doc(hidden)]
pub use cache::policy as cache_policy;
pub use config::{ArchiveOptions, Config, PrewarmFormats};
use gitball_core::{limits, server};

/// How long generations get to stop (children killed, partials removed)
/// after the downloads were drained.
const GENERATION_STOP_DEADLINE: Duration = Duration::from_secs(5);

/// How often the opened repositories removed from `--repos`, or whose
/// packs a repack replaced, are let go (`forget_stale_repositories`): at
/// most 1,024 repositories, a few `statx` each; and complete archives
/// deleted behind the archiver's back forgotten
/// ([`cache::Cache::sweep_gone`]): 256 files, an `lstat` each; and the
/// cache filesystem's size and free bytes published
/// ([`cache::Cache::publish_filesystem`]), one `fstatvfs`.
const STALE_REPOSITORIES_SWEEP: Duration = Duration::from_secs(5);

/// A client connection whose writes make no progress for this long is
/// closed. Generous: the archiver's clients are mostly proxies, which pause
/// reading while their own client is slow and cut idle clients after their
/// `--client-idle-timeout` (60 s by default).
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves the archiver on `listener` (and `/healthz` and `/metrics` on
/// `admin`, the `--admin-listen` one, when given) until `shutdown` is
/// cancelled, then drains downloads for `--shutdown-grace`, kills the
/// children that are still running and removes their partial files. `cut`
/// is set when the drain cuts what is left: a fresh one, or in embedded
/// mode the proxy's (`server::ShutdownCut`).
pub async fn run(
    listener: TcpListener,
    admin: Option<TcpListener>,
    repos: PathBuf,
    options: ArchiveOptions,
    shutdown: CancellationToken,
    cut: server::ShutdownCut,
) -> anyhow::Result<()> {
    let handle = gitball_core::metrics::install();
    let max_clients = std::num::NonZeroUsize::new(options.client_cold_max_clients as usize)
        .context("--client-cold-max-clients is at least 1")?;
    metrics::describe(options.cache_max_bytes, max_clients.get());

    let repos = repo::Repositories::new(&repos)
        .with_context(|| format!("cannot open --repos {}", repos.display()))?;
    let git = match &options.git {
        Some(git) => generate::find_program(git).context("--git")?,
        None => generate::find_git()
            .context("no --git given, and gitball-archiver runs `git archive`")?,
    };
    let token = match &options.token_file {
        Some(path) => Some(gitball_core::secret::read_secret(path, "--token-file")?),
        None => None,
    };
    let prewarm_token = match &options.prewarm_token_file {
        Some(path) => Some(gitball_core::secret::read_secret(
            path,
            "--prewarm-token-file",
        )?),
        None => None,
    };
    let budget = budget::Budget::new(
        options.client_cold_rate,
        options.client_cold_burst,
        max_clients,
    );
    match &budget {
        Some(_) => tracing::info!(
            per_second = options.client_cold_rate.per_second(),
            burst = options.client_cold_burst,
            max_clients = max_clients.get(),
            "crawler budget on"
        ),
        None => tracing::info!("crawler budget off (--client-cold-rate 0)"),
    }
    if options.max_archive_bytes() > options.cache_max_bytes {
        tracing::warn!(
            max_archive_bytes = options.max_archive_bytes(),
            cache_max_bytes = options.cache_max_bytes,
            "archives larger than --cache-max-bytes cannot be generated; raise it above --max-archive-bytes"
        );
    }
    let tar_writer = Arc::new(canary::TarWriter::new(git.clone(), options.cache_dir()));
    // Opening reads every restored archive once (to check it): in the
    // blocking pool, not on a runtime thread the embedding proxy serves on.
    let settings = cache::Settings {
        dir: options.cache_dir(),
        max_bytes: options.cache_max_bytes,
        max_generations: options.max_generations(),
        queue_timeout: options.queue_timeout,
        limits: generate::Limits {
            timeout: options.generation_timeout,
            max_bytes: options.max_archive_bytes(),
            memory: (options.generation_memory_limit > 0)
                .then_some(options.generation_memory_limit),
        },
        git: git.clone(),
        tar_writer: Some(tar_writer.clone()),
    };
    // A signal while the cache dir is opened (every archive a warm restart
    // keeps is hashed again) or while the canary runs ends the start: the
    // exit is bounded by the grace (attack: SIGTERM at start-up held the
    // exit 9 s with a 1 s grace). An opening left behind goes on, on a
    // blocking thread the exit does not wait for (`run_main`).
    let opening = tokio::task::spawn_blocking(move || cache::Cache::open(settings));
    let opened = tokio::select! {
        opened = opening => opened,
        () = shutdown.cancelled() => {
            tracing::info!("shut down while starting; nothing was served");
            return Ok(());
        }
    };
    let cache = opened
        .context("opening the cache dir panicked")?
        .with_context(|| format!("cannot open --cache-dir {}", options.cache_dir().display()))?;

    // The canary is made in the cache dir: a full one makes room for it as
    // for a generation (attack: the start failed on a full tmpfs).
    {
        let cache = Arc::downgrade(&cache);
        tar_writer.before_each_canary(move || {
            if let Some(cache) = cache.upgrade() {
                cache.make_room_for_the_canary();
            }
        });
    }
    // After the cache dir is this archiver's: the canary is made in it. A
    // canary may take its 10 s, three times over while the binary keeps
    // changing.
    tokio::select! {
        checked = tar_writer.check() => checked?,
        () = shutdown.cancelled() => {
            tracing::info!("shut down while starting; nothing was served");
            return Ok(());
        }
    };

    let app = Arc::new(http::App {
        repos,
        cache: cache.clone(),
        token,
        budget,
        prewarm_token,
        prewarm_formats: options.prewarm_formats.0.clone(),
        require_reachable: options.require_reachable,
        gzip_level: options.gzip_level,
        zstd_level: options.zstd_level,
        metrics: handle,
    });
    tokio::spawn(forget_stale_repositories(app.clone(), shutdown.clone()));
    let max_connections = options.max_connections(limits::FDS_PER_CONNECTION_ARCHIVER);
    limits::warn_if_too_low(
        limits::nofile(),
        max_connections,
        limits::FDS_PER_CONNECTION_ARCHIVER,
    );
    let max_connections_per_client =
        options.max_connections_per_client(max_connections, app.token.is_some());
    let per_client = server::PerClient {
        max: max_connections_per_client,
        fronts: options.max_connections_per_client_exempt(),
    };
    let workers = server::serving_threads();
    let listen = listener.local_addr()?;
    // Requests are served on one single-threaded runtime per CPU: a cache
    // hit then never crosses threads. Generations run on this runtime
    // (`Cache::open` keeps its handle), so they outlive the serving threads
    // and are stopped by `cache.shutdown` below.
    let admin = server::spawn_admin(admin, http::admin_router(app.clone()), &shutdown);
    let drain = server::serve_on_threads(
        listener,
        |_| http::router(app.clone()),
        &shutdown,
        options.shutdown_grace,
        WRITE_STALL_TIMEOUT,
        workers,
        server::Connections::new(max_connections, "gitball_archiver")
            .with_cut(cut.clone())
            .with_tcp_congestion(options.tcp_congestion.as_deref())
            .with_per_client(per_client),
        "gitball-archiver",
        || {
            tracing::info!(
                %listen,
                workers,
                max_connections,
                max_connections_per_client,
                "gitball-archiver serving"
            )
        },
    )
    .await?;
    match drain {
        // Embedded, the proxy cut first: the downloads it cut ended here
        // as their client went, before this grace ran out.
        server::Drain::Complete if cut.is_set() => {
            tracing::warn!("downloads were cut by the embedding proxy's shutdown")
        }
        server::Drain::Complete => tracing::info!("all downloads finished"),
        server::Drain::Cut(open) => {
            tracing::warn!(open, "shutdown grace ran out; open downloads were cut")
        }
    }
    if let Some(admin) = admin {
        // It stopped accepting with the service's listener; its last
        // connections get a second.
        let _ = admin.await;
    }
    if !cache.shutdown(GENERATION_STOP_DEADLINE).await {
        tracing::warn!("generations did not stop in time");
    }
    Ok(())
}

/// Every `STALE_REPOSITORIES_SWEEP`, lets go of the opened repositories
/// removed from `--repos` or whose packs changed
/// (`Repositories::forget_stale`), until `shutdown`: the packs they read
/// stay mapped, and their disk space taken, while they are held. So are
/// complete archives found gone (`Cache::sweep_gone`), whose bytes would
/// otherwise stay counted until they are next requested. And publishes the
/// cache filesystem's size and free bytes (`Cache::publish_filesystem`).
async fn forget_stale_repositories(app: Arc<http::App>, shutdown: CancellationToken) {
    let mut sweeps = tokio::time::interval(STALE_REPOSITORIES_SWEEP);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sweeps.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let app = app.clone();
        let forgotten = tokio::task::spawn_blocking(move || {
            app.cache.sweep_gone();
            app.cache.publish_filesystem();
            app.repos.forget_stale()
        })
        .await
        .unwrap_or(0);
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "let go of repositories removed from --repos or repacked"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/archiver.md` gives the sweep for archives gone as these
    /// constants.
    #[test]
    fn the_figures_docs_give_for_the_sweep_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [format!(
                "a sweep that looks at {} indexed files every {} s",
                cache::GONE_SWEEP_FILES,
                STALE_REPOSITORIES_SWEEP.as_secs()
            )],
        );
    }

    /// `docs/archiver.md` and `docs/http.md` give the write-stall timeout
    /// and the generations' stop after the grace as these constants. (Docs
    /// review: a figure changed on one side only had nothing to fail.)
    #[test]
    fn the_figures_docs_give_for_stalls_and_the_stop_are_these_constants() {
        let squash = gitball_core::docs::prose;
        let archiver = squash(include_str!("../../docs/archiver.md"));
        let http = squash(include_str!("../../docs/http.md"));
        let readme = squash(include_str!("../../README.md"));
        let architecture = squash(include_str!("../../docs/architecture.md"));
        let stall = WRITE_STALL_TIMEOUT.as_secs();
        for (docs, name, figure) in [
            (
                &readme,
                "README.md",
                format!("no progress for {stall} s is closed"),
            ),
            (
                &architecture,
                "docs/architecture.md",
                format!("with a {stall} s write-stall guard"),
            ),
            (
                &archiver,
                "docs/archiver.md",
                format!("a client that takes no bytes for {stall} s is cut"),
            ),
            (
                &archiver,
                "docs/archiver.md",
                format!(
                    "This last step is waited for at most {} s",
                    GENERATION_STOP_DEADLINE.as_secs()
                ),
            ),
            (
                &http,
                "docs/http.md",
                format!("That happens after {stall} s on the archiver"),
            ),
        ] {
            assert!(docs.contains(&figure), "{name} does not say {figure:?}");
        }
    }
}
