//! `gitball-archiver`: parse flags, set up logging, bind, serve until
//! SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use gitball_archiver::Config;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    gitball_archiver::config::init_tracing(config.options.log_format);
    // Handlers first: from the moment anything is served, SIGTERM means a
    // graceful drain, never the default action.
    let term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(term, int, shutdown.clone()));
    gitball_archiver::run(listener, config.repos, config.options, shutdown).await
}

async fn cancel_on_signal(mut term: Signal, mut int: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
