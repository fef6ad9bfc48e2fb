//! `gitball-archiver`: parse flags, set up logging, bind, serve until
//! SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use gitball_archiver::Config;

/// jemalloc, as in the proxy and with the same configuration
/// (`.cargo/config.toml`: freed pages go back to the kernel within about a
/// second). On a small cache hit glibc's `malloc` and `free` were 11 % of
/// the archiver's CPU; with jemalloc a hit takes about 9 % less
/// (BENCHMARKS.md, "jemalloc in the archiver").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    // Not `#[tokio::main]`: the exit does not wait for a compressor thread
    // still stopping (`run_main`).
    gitball_core::signals::run_main(serve())?
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::parse();
    gitball_core::log::init_tracing(config.options.log_format);
    // A login shell's soft limit (1024) would cap downloads at about 500.
    gitball_core::limits::raise_nofile();
    // Handlers first: from the moment anything is served, SIGTERM means a
    // graceful drain, never the default action.
    let cut = gitball_core::server::ShutdownCut::default();
    let shutdown = gitball_core::signals::shutdown_on_signal(cut.clone())
        .context("cannot install the SIGTERM and SIGINT handlers")?;
    gitball_core::signals::ignore_hangup("the archiver has nothing to reload")
        .context("cannot install the SIGHUP handler")?;
    let listener =
        gitball_core::server::bind(config.listen, config.options.tcp_congestion.as_deref())
            .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = gitball_core::server::bind_admin(config.admin_listen)?;
    gitball_archiver::run(listener, admin, config.repos, config.options, shutdown, cut).await
}
