//! SIGTERM and SIGINT as a [`CancellationToken`]: the binaries install the
//! handlers before they serve anything, so from the first request on a
//! signal means a graceful drain, never the default action (death).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::server::ShutdownCut;

/// Runs a binary's `main` on tokio's multi-threaded runtime and, once it
/// returned, leaves the runtime without waiting for blocking work still
/// running. `#[tokio::main]` drops its runtime instead, which waits for
/// every blocking task to end: a compressor thread still on its job after
/// the archiver gave its generations up ("generations did not stop in
/// time") held the exit for as long as that took, unbounded, with the
/// drain long over and the partial files removed.
///
/// A panic in `main` leaves the same way, then goes on unwinding.
pub fn run_main<T>(main: impl Future<Output = T>) -> std::io::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let returned =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(main)));
    runtime.shutdown_background();
    match returned {
        Ok(returned) => Ok(returned),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Installs the SIGTERM and SIGINT handlers now and returns a token that is
/// cancelled when either signal arrives. A second one (of either) ends the
/// shutdown grace at once through `cut` ([`ShutdownCut::end_grace_now`]):
/// the handlers stay installed after the first, so without it a second
/// signal did nothing, and an operator's second Ctrl-C or `systemctl kill`
/// waited the whole grace, or had to SIGKILL and leave partial files and
/// git children behind. Needs a running tokio runtime.
pub fn shutdown_on_signal(cut: ShutdownCut) -> std::io::Result<CancellationToken> {
    let term = signal(SignalKind::terminate())?;
    let int = signal(SignalKind::interrupt())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(term, int, shutdown.clone(), cut));
    Ok(shutdown)
}

/// Installs a SIGHUP handler that only says the signal was ignored: for
/// the archiver, which has nothing to reload. SIGHUP's default action is
/// death, and a hangup, or a reload sent to every gitball process (the
/// proxy's reload is SIGHUP), would otherwise cut every download at once
/// with no drain (attack).
pub fn ignore_hangup(what: &'static str) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP ignored: {what}");
        }
    });
    Ok(())
}

async fn cancel_on_signal(
    mut term: Signal,
    mut int: Signal,
    shutdown: CancellationToken,
    cut: ShutdownCut,
) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => tracing::warn!("SIGTERM again: ending the shutdown grace now"),
        _ = int.recv() => tracing::warn!("SIGINT again: ending the shutdown grace now"),
    }
    cut.end_grace_now();
}
