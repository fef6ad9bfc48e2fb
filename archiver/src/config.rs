//! The archiver's command-line flags (`docs/archiver.md#flags`). Every flag
//! also reads `GITBALL_<FLAG>`.
//!
//! The flags are split in two: [`Config`] is the whole command line of the
//! `gitball-archiver` binary, [`ArchiveOptions`] everything but `--listen` and
//! `--repos`, so that `gitball-proxy --repos DIR` (embedded mode) can take the
//! same archiver flags by flattening it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use gitball_core::client::Nets;
use gitball_core::log::LogFormat;
use gitball_core::units::{parse_positive_seconds, parse_seconds, parse_size};
use gitball_core::url::{Format, parse_formats};

use crate::budget::{Rate, parse_rate};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gitball-archiver",
    version,
    about = "Serves `git archive` over HTTP: zip and tarball downloads of the repositories under --repos, \
             generated once per commit and format into a size-bounded cache and streamed while they are generated."
)]
pub struct Config {
    /// Address to listen on (host:port).
    #[arg(long, env = "GITBALL_LISTEN", default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,

    /// Address of the admin listener (host:port): `/healthz` and `/metrics` under a connection
    /// cap of their own, so probes and scrapes get in while downloads fill --max-connections.
    /// Both stay on --listen too. Default: no admin listener
    #[arg(long, env = "GITBALL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Directory of repositories: DIR/{owner}/{repo}.git (bare) or DIR/{owner}/{repo} (work tree).
    /// A DIR that is itself a repository is served as local/{dirname}.
    #[arg(long, env = "GITBALL_REPOS")]
    pub repos: PathBuf,

    #[command(flatten)]
    pub options: ArchiveOptions,
}

/// The archiver's flags other than where it listens and what it serves.
#[derive(Args, Debug, Clone)]
pub struct ArchiveOptions {
    /// Cache directory (created mode 0700). Put it on tmpfs. Default: /dev/shm/gitball-archiver
    /// when /dev/shm exists, else gitball-archiver under the temp dir.
    #[arg(long, env = "GITBALL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Upper bound of the cache in bytes, complete and in-progress archives together (a scan-resistant segmented LRU by bytes).
    /// Accepts 1048576, 512KiB, 64MiB, 2GiB.
    #[arg(long, env = "GITBALL_CACHE_MAX_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub cache_max_bytes: u64,

    /// Concurrent `git archive` children; further generations wait in a queue. Default: CPU count.
    #[arg(long, env = "GITBALL_MAX_GENERATIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_generations: Option<u32>,

    /// Seconds a request may wait in the generation queue before it gets 503 + Retry-After.
    #[arg(long, env = "GITBALL_QUEUE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub queue_timeout: Duration,

    /// Seconds a generation may run; then the child is killed and the partial file removed.
    #[arg(long, env = "GITBALL_GENERATION_TIMEOUT", default_value = "600", value_parser = parse_positive_seconds)]
    pub generation_timeout: Duration,

    /// Largest archive generated, in bytes (as written to the cache); a larger one is killed and
    /// removed. Default: 4GiB, or --cache-max-bytes if that is smaller
    #[arg(long, env = "GITBALL_MAX_ARCHIVE_BYTES", value_parser = parse_size)]
    pub max_archive_bytes: Option<u64>,

    /// Serve a commit asked for by its id only when some ref of the repository reaches it
    /// (true or false). Off, a commit force-pushed away, or one only in an object pool shared
    /// with a private fork, is served to anyone who knows its id.
    #[arg(long, env = "GITBALL_REQUIRE_REACHABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub require_reachable: bool,

    /// The git binary to run. Default: the first `git` on PATH at start-up.
    #[arg(long, env = "GITBALL_GIT")]
    pub git: Option<PathBuf>,

    /// Largest data segment (heap) of one `git archive` child, in bytes (its RLIMIT_DATA);
    /// a child that needs more fails the generation. 0: no limit.
    #[arg(long, env = "GITBALL_GENERATION_MEMORY_LIMIT", default_value = "2GiB", value_parser = parse_size)]
    pub generation_memory_limit: u64,

    /// File holding a bearer token; archive URLs then need `Authorization: Bearer <token>`.
    #[arg(long, env = "GITBALL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// gzip level for tar.gz (0-9). Part of the ETag: changing it changes the bytes.
    #[arg(long, env = "GITBALL_GZIP_LEVEL", default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub gzip_level: u32,

    /// zstd level for tar.zst (1-19). Part of the ETag: changing it changes the bytes.
    #[arg(long, env = "GITBALL_ZSTD_LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,

    /// Cold generations each client may start, as N/s, N/min or N/h (`docs/archiver.md#crawler-budget`);
    /// beyond it a request that would start one gets 429 + Retry-After. Hits and joins are never
    /// limited. The budget is per archiver. 0: no budget.
    #[arg(long, env = "GITBALL_CLIENT_COLD_RATE", default_value = "60/min", value_parser = parse_rate)]
    pub client_cold_rate: Rate,

    /// Cold generations a client may start at once before --client-cold-rate applies.
    #[arg(long, env = "GITBALL_CLIENT_COLD_BURST", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_cold_burst: u32,

    /// Clients whose budget is remembered (least recently seen forgotten first; about 100 bytes each).
    #[arg(long, env = "GITBALL_CLIENT_COLD_MAX_CLIENTS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_cold_max_clients: u64,

    /// File holding the bearer token of `POST /{owner}/{repo}/prewarm/{ref}`. Without it prewarm is
    /// off (the path is 404). In embedded mode the proxy checks it too.
    #[arg(long, env = "GITBALL_PREWARM_TOKEN_FILE")]
    pub prewarm_token_file: Option<PathBuf>,

    /// Formats a prewarm generates, comma-separated.
    #[arg(long, env = "GITBALL_PREWARM_FORMATS", default_value = "tar.gz,zip", value_parser = parse_prewarm_formats)]
    pub prewarm_formats: PrewarmFormats,

    /// Seconds to let running downloads finish after SIGTERM/SIGINT before they are cut and children killed.
    #[arg(long, env = "GITBALL_SHUTDOWN_GRACE", default_value = "30", value_parser = parse_seconds)]
    pub shutdown_grace: Duration,

    /// Connections held at once; past it a new connection gets 503 + Retry-After and is closed.
    /// Default: from the fd limit (raised to the hard limit at start), (RLIMIT_NOFILE - 256) / 2,
    /// or / 4 for an embedded proxy (client, upstream and archiver sockets plus a cache file).
    #[arg(long, env = "GITBALL_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,

    /// Connections one client (an address, an IPv6 /64) holds at once while the process holds half
    /// its --max-connections or more; past it the client's new connection gets 429 + Retry-After
    /// and is closed, while other clients are served. 0: no cap
    /// per client. Default: --max-connections / 8, at least 64; on an archiver with --token-file, 0
    /// (only proxies, which hold the token, download from it).
    #[arg(long, env = "GITBALL_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<u64>,

    /// Peers not counted by --max-connections-per-client, as CIDR[,CIDR...] (a bare address is its
    /// own /32 or /128): fronts whose connections carry other clients (proxies, a load balancer).
    /// Default: loopback (127.0.0.0/8, ::1); the proxy adds its --trusted-proxies.
    #[arg(long, env = "GITBALL_MAX_CONNECTIONS_PER_CLIENT_EXEMPT", value_parser = gitball_core::client::parse_nets)]
    pub max_connections_per_client_exempt: Option<Nets>,

    /// Log line format.
    #[arg(long, env = "GITBALL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// TCP congestion control of the listener and of every connection it accepts, from any peer
    /// (e.g. cubic, bbr; one of net.ipv4.tcp_available_congestion_control). Default: reno for a
    /// connection from a loopback peer, the host's for any other (docs/archiver.md).
    #[arg(long, env = "GITBALL_TCP_CONGESTION", value_parser = gitball_core::server::parse_congestion)]
    pub tcp_congestion: Option<String>,
}

/// `--prewarm-formats`: one value holding a list (not a repeated flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrewarmFormats(pub Vec<Format>);

fn parse_prewarm_formats(text: &str) -> Result<PrewarmFormats, String> {
    parse_formats(text)
        .map(PrewarmFormats)
        .map_err(|error| error.to_string())
}

/// `--max-archive-bytes` when the cache can hold it.
const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 4 << 30;

impl ArchiveOptions {
    /// `--max-archive-bytes`, or its default: 4 GiB, or `--cache-max-bytes`
    /// if that is smaller.
    pub fn max_archive_bytes(&self) -> u64 {
        self.max_archive_bytes
            .unwrap_or(DEFAULT_MAX_ARCHIVE_BYTES.min(self.cache_max_bytes))
    }
    /// The cache directory actually used (see `--cache-dir`).
    pub fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.cache_dir {
            return dir.clone();
        }
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            shm.join("gitball-archiver")
        } else {
            std::env::temp_dir().join("gitball-archiver")
        }
    }

    /// The connection cap (see `--max-connections`) for a process whose
    /// connections cost `fds_per_connection` each.
    pub fn max_connections(&self, fds_per_connection: u64) -> usize {
        match self.max_connections {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => gitball_core::limits::default_max_connections(
                gitball_core::limits::nofile().soft,
                fds_per_connection,
            ),
        }
    }

    /// The connection cap per client (see `--max-connections-per-client`)
    /// under a cap of `max_connections`: the flag, else its default, which
    /// is 0 (none) when `token_only` (an archiver with `--token-file`,
    /// whose clients are the proxies holding the token).
    pub fn max_connections_per_client(&self, max_connections: usize, token_only: bool) -> usize {
        match self.max_connections_per_client {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None if token_only => 0,
            None => gitball_core::limits::default_max_connections_per_client(max_connections),
        }
    }

    /// The peers `--max-connections-per-client` does not count: the flag,
    /// else loopback.
    pub fn max_connections_per_client_exempt(&self) -> Nets {
        self.max_connections_per_client_exempt
            .clone()
            .unwrap_or_else(Nets::loopback)
    }

    pub fn max_generations(&self) -> usize {
        match self.max_generations {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gitball_core::docs::{check_flags, documented_bounds, documented_flags, section};

    /// `docs/archiver.md`'s flags table is the whole command line, and says
    /// what clap (and so `--help`) does: every flag of the binary has a row
    /// and every row a flag, with the same environment variable, `required`
    /// for a required flag, and clap's default first in the default cell.
    /// The README's short table, where it gives a flag, agrees too.
    /// (Docs review: nothing held the tables to the code.)
    #[test]
    fn every_flag_is_documented_with_its_environment_and_default() {
        use clap::CommandFactory;
        let problems = check_flags(
            &Config::command(),
            &documented_flags(include_str!("../../docs/archiver.md")),
            &documented_flags(section(
                include_str!("../../README.md"),
                "## Running the archiver",
            )),
            &[],
            "archiver",
        );
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn defaults_match_the_docs() {
        let config = Config::try_parse_from(["gitball-archiver", "--repos", "/srv/git"]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(config.options.cache_max_bytes, 1 << 30);
        // The cache's bound when that is smaller: an archive past it could
        // never be kept, and every default start warned of it (attack).
        assert_eq!(config.options.max_archive_bytes(), 1 << 30);
        let larger_cache = Config::try_parse_from([
            "gitball-archiver",
            "--repos",
            "/srv/git",
            "--cache-max-bytes",
            "8GiB",
        ])
        .unwrap();
        assert_eq!(larger_cache.options.max_archive_bytes(), 4 << 30);
        assert_eq!(config.options.queue_timeout, Duration::from_secs(30));
        assert_eq!(config.options.generation_timeout, Duration::from_secs(600));
        assert_eq!(config.options.generation_memory_limit, 2 << 30);
        assert_eq!(config.options.shutdown_grace, Duration::from_secs(30));
        assert!(config.options.require_reachable);
        assert_eq!(config.options.gzip_level, 6);
        assert_eq!(config.options.zstd_level, 3);
        assert_eq!(config.options.log_format, LogFormat::Text);
        assert_eq!(config.options.client_cold_rate.per_second(), 1.0);
        assert_eq!(config.options.client_cold_burst, 60);
        assert_eq!(config.options.client_cold_max_clients, 100_000);
        assert!(config.options.prewarm_token_file.is_none());
        assert_eq!(
            config.options.prewarm_formats,
            PrewarmFormats(vec![Format::TarGz, Format::Zip])
        );
        assert_eq!(config.options.max_connections, None);
    }

    /// The defaults docs/archiver.md's flags table gives that depend on the
    /// host: `--cache-dir` on tmpfs at `/dev/shm/gitball-archiver` where
    /// `/dev/shm` exists (else under the temp dir), `--max-generations` the
    /// CPU count. (Docs audit: `defaults_match_the_docs` reads neither, and
    /// every other test gives `--cache-dir`.)
    #[test]
    fn host_dependent_defaults_match_the_docs() {
        let config = Config::try_parse_from(["gitball-archiver", "--repos", "/srv/git"]).unwrap();
        let expected = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm/gitball-archiver")
        } else {
            std::env::temp_dir().join("gitball-archiver")
        };
        assert_eq!(config.options.cache_dir(), expected);
        assert_eq!(
            config.options.max_generations(),
            std::thread::available_parallelism().unwrap().get()
        );
    }

    /// What docs/archiver.md's flags table says a flag accepts or refuses
    /// ("at least 1", "more than 0", "0 to 9", "`0`: no limit") is what the
    /// command line does. (Docs review: nothing held these to clap.)
    #[test]
    fn every_documented_bound_of_a_flag_holds() {
        let mut problems = Vec::new();
        let mut checked = 0;
        for (name, cells) in documented_flags(include_str!("../../docs/archiver.md")) {
            for (value, accepted) in documented_bounds(&cells[3].to_lowercase()) {
                checked += 1;
                let flag = format!("--{name}");
                let parsed = Config::try_parse_from([
                    "gitball-archiver",
                    "--repos",
                    "/srv/git",
                    flag.as_str(),
                    value.as_str(),
                ]);
                if parsed.is_ok() != accepted {
                    problems.push(format!(
                        "{flag} {value}: {} where docs/archiver.md says {}",
                        if parsed.is_ok() {
                            "accepted"
                        } else {
                            "refused"
                        },
                        if accepted { "accepted" } else { "refused" }
                    ));
                }
            }
        }
        assert!(checked >= 16, "only {checked} bounds found");
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
