//! `gitball-proxy`: parse flags, set up logging, bind, serve until SIGTERM
//! or SIGINT; SIGHUP reloads the routing table. `gitball-proxy sign …`
//! prints a signed token instead.

use anyhow::Context;
use clap::Parser;
use gitball_core::url::validate_name;
use gitball_proxy::config::{Cli, Command, SignArgs};
use gitball_proxy::routes::Routes;
use gitball_proxy::sign::SigningKey;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

/// jemalloc, configured in `.cargo/config.toml` to return freed pages to
/// the kernel within about a second (a background thread). With glibc's
/// malloc, the 64 KiB buffers that thousands of parking downloads free
/// stayed resident between live ones: proxy RSS per parked download, 5,000
/// stalled, 0.102–0.131 MiB with glibc against 0.084 with jemalloc
/// (BENCHMARKS.md, "The proxy's memory per parked download").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The proxy's own jemalloc options, read after `.cargo/config.toml`'s
/// (jemalloc's `malloc_conf` global; the prefixed build names it
/// `_rjem_malloc_conf`). `tcache_max:65536`: each thread keeps freed blocks
/// up to 64 KiB in its cache (jemalloc's default stops at 32 KiB), so the
/// upstream connection's 64 KiB read buffer, which hyper allocates anew for
/// each response whose last chunk is still held, comes from the thread's
/// cache instead of the arena's extents: about 2,500 instructions of a
/// small hit's 60,400 (callgrind). A thread's cache holds at most 20 such
/// blocks per size class, and is flushed as it goes unused. In embedded mode
/// the archiver's threads have it too: 54 cold archives of git/git asked 40
/// at a time, then hit three times over, left the release binary at 68.1 MiB
/// of RSS against 65.4 with jemalloc's default (`_RJEM_MALLOC_CONF=
/// tcache_max:32768`; one run each), on 11–13 threads: its blocking reads are 128 KiB
/// blocks, which no thread cache holds.
#[allow(unsafe_code)]
// SAFETY: jemalloc declares this symbol weak (`const char *malloc_conf`)
// and only reads it, as a NUL-terminated string; nothing else defines it.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 17] = b"tcache_max:65536\0";

fn main() -> anyhow::Result<()> {
    // Not `#[tokio::main]`: the exit does not wait for an embedded
    // archiver's compressor thread still stopping (`run_main`).
    gitball_core::signals::run_main(serve())?
}

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Sign(args)) = cli.command {
        return sign(&args);
    }
    let config = cli.config;
    gitball_core::log::init_tracing(config.archiver.log_format);
    // A login shell's soft limit (1024) would cap downloads at about 500.
    gitball_core::limits::raise_nofile();
    // Installed before anything is served: from then on SIGTERM and SIGINT
    // mean a graceful drain and SIGHUP a reload, never the default action
    // (which would kill the process).
    let cut = gitball_core::server::ShutdownCut::default();
    let shutdown = gitball_core::signals::shutdown_on_signal(cut.clone())
        .context("cannot install the SIGTERM and SIGINT handlers")?;
    let hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let listener =
        gitball_core::server::bind(config.listen, config.archiver.tcp_congestion.as_deref())
            .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = gitball_core::server::bind_admin(config.admin_listen)?;
    let Some(proxy) = gitball_proxy::Proxy::start_with_cut(config, shutdown, cut).await? else {
        return Ok(());
    };
    tokio::spawn(reload_on_sighup(hangup, proxy.routes()));
    proxy.serve(listener, admin).await
}

fn sign(args: &SignArgs) -> anyhow::Result<()> {
    let (owner, repo) = args
        .repo
        .split_once('/')
        .context("--repo must be owner/repo")?;
    validate_name(owner)
        .and(validate_name(repo))
        .context("--repo must be owner/repo")?;
    let key = SigningKey::from_file(&args.key_file)?;
    println!("{}", key.sign_for(&args.repo, args.ttl));
    Ok(())
}

async fn reload_on_sighup(mut hangup: tokio::signal::unix::Signal, routes: Arc<Routes>) {
    while hangup.recv().await.is_some() {
        // Outcome already logged and counted by `reload`.
        let _ = routes.reload();
    }
}
