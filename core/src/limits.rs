//! The file-descriptor limit, and the connection cap derived from it.
//!
//! Every connection costs file descriptors: the client's socket, plus a
//! cache file (archiver) or an upstream socket (proxy). A login shell gives
//! a process a soft `RLIMIT_NOFILE` of 1024 while the hard limit is far
//! higher; left there, a tier runs out of fds at about 500 downloads and
//! the rest wait unanswered in the listen backlog. So, as Go's runtime and
//! most servers do, both binaries raise the soft limit to the hard one at
//! start ([`raise_nofile`]) and log what they got.
//!
//! `--max-connections` then caps the connections a process holds, so that
//! it refuses early and cheaply (`503` + `Retry-After`, see
//! `server::serve`) instead of running out of fds mid-request. Its default
//! ([`default_max_connections`]) is what the fd limit allows once
//! [`RESERVED_FDS`] are set aside, divided by the fds one connection costs
//! ([`FDS_PER_CONNECTION_ARCHIVER`], [`FDS_PER_CONNECTION_PROXY`],
//! [`FDS_PER_CONNECTION_EMBEDDED`]).

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Fds kept out of the connection budget: listeners, the runtime's epoll
/// and wake-up fds, log and cache dir handles, `git archive` children's
/// pipes (a few per generation), pooled idle upstream connections, the
/// files `/metrics` reads in `/proc`, refusals being written (64), and the
/// admin listener's connections and refusals (`server::ADMIN_MAX_CONNECTIONS`
/// and 4).
pub const RESERVED_FDS: u64 = 256;
/// An archiver download holds its socket and its cache file.
pub const FDS_PER_CONNECTION_ARCHIVER: u64 = 2;
/// A proxied download holds the client's socket and the upstream's.
pub const FDS_PER_CONNECTION_PROXY: u64 = 2;
/// Embedded mode, per client download: the client's socket, the proxy's
/// socket to the in-process archiver, the archiver's end of it and the
/// cache file.
pub const FDS_PER_CONNECTION_EMBEDDED: u64 = 4;
/// The default cap never goes below this, however low the fd limit: a
/// process that can hold a few connections still serves a few.
pub const MIN_DEFAULT_MAX_CONNECTIONS: usize = 16;

/// The soft and hard `RLIMIT_NOFILE` in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The `RLIMIT_NOFILE` in force (unlimited if it cannot be read, which
/// on Linux does not happen).
pub fn nofile() -> NofileLimit {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => NofileLimit { soft, hard },
        Err(_) => NofileLimit {
            soft: u64::MAX,
            hard: u64::MAX,
        },
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the
/// limits in force afterwards (logged). When raising fails, the limits as
/// they were are returned and the failure is logged. Both binaries call
/// this first thing in `main`; the libraries only read the limit
/// ([`nofile`]).
pub fn raise_nofile() -> NofileLimit {
    let NofileLimit { soft, hard } = nofile();
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => NofileLimit { soft: hard, hard },
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the soft RLIMIT_NOFILE to the hard limit");
                NofileLimit { soft, hard }
            }
        }
    } else {
        NofileLimit { soft, hard }
    };
    tracing::info!(
        nofile = limit.soft,
        was = soft,
        hard = limit.hard,
        "file descriptor limit"
    );
    limit
}

/// The default `--max-connections`: the fds left after [`RESERVED_FDS`],
/// divided by what one connection costs; at least
/// [`MIN_DEFAULT_MAX_CONNECTIONS`].
pub fn default_max_connections(nofile: u64, fds_per_connection: u64) -> usize {
    let budget = nofile.saturating_sub(RESERVED_FDS) / fds_per_connection.max(1);
    usize::try_from(budget)
        .unwrap_or(usize::MAX)
        .max(MIN_DEFAULT_MAX_CONNECTIONS)
}

/// The default `--max-connections-per-client` is `--max-connections`
/// divided by this: one client (a crawler, a slowloris) holds at most an
/// eighth of the process's connections, so it takes several clients
/// misbehaving at once to fill them.
pub const PER_CLIENT_SHARE_DIVISOR: usize = 8;
/// The default `--max-connections-per-client` never goes below this, so
/// that the CI jobs of a small office behind one NAT address are not
/// refused under a small `--max-connections`.
pub const MIN_DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 64;

/// The default `--max-connections-per-client` under a cap of
/// `max_connections`: [`PER_CLIENT_SHARE_DIVISOR`]th of it, at least
/// [`MIN_DEFAULT_MAX_CONNECTIONS_PER_CLIENT`] (a cap at or above
/// `max_connections` never refuses before the process's own does).
pub fn default_max_connections_per_client(max_connections: usize) -> usize {
    (max_connections / PER_CLIENT_SHARE_DIVISOR).max(MIN_DEFAULT_MAX_CONNECTIONS_PER_CLIENT)
}

/// Warns when `max_connections` connections, at `fds_per_connection` each,
/// plus [`RESERVED_FDS`], do not fit under the fd limit: the process would
/// run out of fds (failed accepts, failed cache opens or upstream
/// connects) before the cap refuses anyone.
pub fn warn_if_too_low(limit: NofileLimit, max_connections: usize, fds_per_connection: u64) {
    let needed = (max_connections as u64)
        .saturating_mul(fds_per_connection)
        .saturating_add(RESERVED_FDS);
    if needed > limit.soft {
        tracing::warn!(
            nofile = limit.soft,
            hard = limit.hard,
            max_connections,
            needed,
            "the file descriptor limit is too low for --max-connections; raise the hard RLIMIT_NOFILE \
             (LimitNOFILE= in systemd, ulimit -Hn) or lower --max-connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/archiver.md` and `docs/proxy.md` give the default connection
    /// cap as these constants. (Docs review: a figure changed on one side
    /// only had nothing to fail.)
    #[test]
    fn the_figures_docs_give_for_the_default_cap_are_these_constants() {
        let squash = crate::docs::prose;
        for (name, docs, per_connection) in [
            (
                "archiver.md",
                squash(include_str!("../../docs/archiver.md")),
                FDS_PER_CONNECTION_ARCHIVER,
            ),
            (
                "proxy.md",
                squash(include_str!("../../docs/proxy.md")),
                FDS_PER_CONNECTION_PROXY,
            ),
        ] {
            let figure = format!(
                "`(RLIMIT_NOFILE − {RESERVED_FDS}) / {per_connection}`, at least {MIN_DEFAULT_MAX_CONNECTIONS}"
            );
            assert!(
                docs.contains(&figure),
                "docs/{name} does not say {figure:?}"
            );
        }
        let proxy = squash(include_str!("../../docs/proxy.md"));
        let figure = format!("`(RLIMIT_NOFILE − {RESERVED_FDS}) / {FDS_PER_CONNECTION_EMBEDDED}`");
        assert!(
            proxy.contains(&figure),
            "docs/proxy.md does not say {figure:?}"
        );
    }

    /// The default of `--max-connections-per-client`, where the contract
    /// and the shipped configuration state it, is these constants: one
    /// figure on every page, so a page left behind fails here.
    #[test]
    fn the_figures_docs_give_for_the_default_cap_per_client_are_these_constants() {
        use crate::docs::{assert_says, thousands};
        let share = match PER_CLIENT_SHARE_DIVISOR {
            8 => "an eighth",
            other => panic!("name the share 1/{other} in this test and the docs"),
        };
        let (divisor, floor) = (
            PER_CLIENT_SHARE_DIVISOR,
            MIN_DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        );
        let of = |nofile: u64, per_connection: u64| {
            thousands(default_max_connections_per_client(default_max_connections(
                nofile,
                per_connection,
            )))
        };
        let (hard, unit) = (20_000, 65_536);
        assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!(
                    "`--max-connections` / {divisor}, at least {floor}; `0` with `--token-file`"
                ),
                format!(
                    "{share} of `--max-connections` and at least {floor} ({} under a hard fd \
                     limit of {}; {} with `LimitNOFILE={unit}`)",
                    of(hard, FDS_PER_CONNECTION_ARCHIVER),
                    thousands(hard as usize),
                    of(unit, FDS_PER_CONNECTION_ARCHIVER),
                ),
            ],
        );
        assert_says(
            include_str!("../../docs/proxy.md"),
            "docs/proxy.md",
            [format!(
                "{share} of its own `--max-connections`, at least {floor}, with or without \
                 `--token-file`"
            )],
        );
        assert_says(
            include_str!("../../README.md"),
            "README.md",
            [format!(
                "default {share} of `--max-connections`, at least {floor}"
            )],
        );
        assert_says(
            include_str!("../../ops/nginx/gitball.conf"),
            "ops/nginx/gitball.conf",
            [format!(
                "--max-connections-per-client under LimitNOFILE={unit} is {}",
                of(unit, FDS_PER_CONNECTION_PROXY)
            )],
        );
        for env in [
            include_str!("../../ops/systemd/gitball-archiver.env"),
            include_str!("../../ops/systemd/gitball-proxy.env"),
        ] {
            assert_says(
                env,
                "ops/systemd/gitball-*.env",
                [format!(
                    "GITBALL_MAX_CONNECTIONS / {divisor}, at least {floor}"
                )],
            );
        }
    }

    #[test]
    fn default_cap_leaves_the_reserve_and_pays_per_connection() {
        assert_eq!(default_max_connections(20_000, 2), 9_872);
        assert_eq!(default_max_connections(20_000, 4), 4_936);
        assert_eq!(default_max_connections(1_024, 2), 384);
        // Never below the floor, even under the reserve.
        assert_eq!(default_max_connections(64, 2), MIN_DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn the_default_cap_per_client_is_an_eighth_of_the_cap_with_a_floor() {
        assert_eq!(default_max_connections_per_client(9_872), 1_234);
        assert_eq!(default_max_connections_per_client(32_640), 4_080);
        assert_eq!(default_max_connections_per_client(384), 64);
        assert_eq!(default_max_connections_per_client(16), 64);
    }

    #[test]
    fn the_limit_in_force_is_read_back() {
        // Raising is idempotent; in a test it only ever raises the soft
        // limit of this test process to its own hard limit.
        let limit = raise_nofile();
        assert_eq!(limit.soft, limit.hard);
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).unwrap(),
            (limit.soft, limit.hard)
        );
    }
}
