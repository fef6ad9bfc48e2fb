//! `gitball-archiver`: parse flags, set up logging, bind, serve until
//! SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use gitball_archiver::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    gitball_core::log::init_tracing(config.options.log_format);
    // A login shell's soft limit (1024) would cap downloads at about 500.
    gitball_core::limits::raise_nofile();
    // Handlers first: from the moment anything is served, SIGTERM means a
    // graceful drain, never the default action.
    let shutdown = gitball_core::signals::shutdown_on_signal()
        .context("cannot install the SIGTERM and SIGINT handlers")?;
    let listener = gitball_core::server::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    gitball_archiver::run(listener, config.repos, config.options, shutdown).await
}
