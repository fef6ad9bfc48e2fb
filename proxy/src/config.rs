//! The proxy's command-line flags (`docs/proxy.md#flags`). Every flag also
//! reads `GITBALL_<FLAG>`.
//!
//! `gitball-proxy` either routes to archivers on other machines (`--routes
//! FILE`) or runs one archiver in-process (`--repos DIR`, embedded mode);
//! exactly one of the two is given. In embedded mode the archiver's own
//! flags (`--cache-dir`, `--max-generations`, …) apply, which is why they
//! are flattened in here from `gitball_archiver::ArchiveOptions`;
//! `--log-format`, `--shutdown-grace`, `--max-connections` and
//! `--tcp-congestion` from that set govern the proxy too.
//!
//! `gitball-proxy sign …` is the one subcommand: it prints a signed token
//! for a private repository and exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use gitball_archiver::ArchiveOptions;
use gitball_core::units::{parse_positive_seconds, parse_seconds};

use crate::client::TrustedProxies;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gitball-proxy",
    version,
    about = "Stateless front for gitball archivers: routes owner/repo to its archivers, \
             fails over before the first byte, pipes archives with backpressure.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print a signed token for a private repository: append `?token=…` to
    /// its archive URLs.
    Sign(SignArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SignArgs {
    /// File holding the HMAC key (the same file as the proxy's --signing-key-file).
    #[arg(long, env = "GITBALL_SIGNING_KEY_FILE")]
    pub key_file: PathBuf,

    /// The repository the token grants, as owner/repo.
    #[arg(long, env = "GITBALL_SIGN_REPO")]
    pub repo: String,

    /// How long the token stays valid: seconds, or a number with s, m, h or d (10m, 12h, 7d).
    /// The proxy refuses a token that expires further ahead than its --max-token-ttl (default 7d).
    #[arg(long, env = "GITBALL_SIGN_TTL", default_value = "10m", value_parser = crate::sign::parse_ttl)]
    pub ttl: Duration,
}

/// Everything the proxy service needs.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("upstreams").required(true).args(["routes", "repos"])))]
pub struct Config {
    /// Address to listen on (host:port).
    #[arg(long, env = "GITBALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener (host:port): `/healthz` and `/metrics` under a connection
    /// cap of their own, so probes and scrapes get in while downloads fill --max-connections.
    /// Both stay on --listen too. Default: no admin listener
    #[arg(long, env = "GITBALL_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Routing table (TOML): which archivers serve which owner/repo. Reloaded on SIGHUP;
    /// a file that does not parse keeps the previous table.
    #[arg(long, env = "GITBALL_ROUTES")]
    pub routes: Option<PathBuf>,

    /// Embedded mode: run an archiver in-process over this directory (archiver flags apply)
    /// and route every repository to it.
    #[arg(long, env = "GITBALL_REPOS")]
    pub repos: Option<PathBuf>,

    /// File holding the bearer token sent to archivers (their --token-file).
    #[arg(long, env = "GITBALL_UPSTREAM_TOKEN_FILE")]
    pub upstream_token_file: Option<PathBuf>,

    /// File holding the HMAC key that signs private repositories' URLs.
    #[arg(long, env = "GITBALL_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,

    /// Longest a private repository's token may still have to run: one whose expiry is further
    /// ahead is refused. Seconds, or a number with s, m, h or d (12h, 7d).
    #[arg(long, env = "GITBALL_MAX_TOKEN_TTL", default_value = "7d", value_parser = crate::sign::parse_ttl)]
    pub max_token_ttl: Duration,

    /// Seconds to wait for a TCP connection to an upstream, per attempt.
    #[arg(long, env = "GITBALL_CONNECT_TIMEOUT", default_value = "2", value_parser = parse_positive_seconds)]
    pub connect_timeout: Duration,

    /// Seconds to wait for an upstream's response headers, per attempt (connecting included),
    /// and for each next piece of its body while the client waits for one (then the download is
    /// aborted).
    #[arg(long, env = "GITBALL_HEADER_TIMEOUT", default_value = "60", value_parser = parse_positive_seconds)]
    pub header_timeout: Duration,

    /// Seconds a client may take no body bytes before its download is cut.
    #[arg(long, env = "GITBALL_CLIENT_IDLE_TIMEOUT", default_value = "60", value_parser = parse_positive_seconds)]
    pub client_idle_timeout: Duration,

    /// Seconds a client may take no body bytes before its download releases its upstream
    /// connection, to resume with a `Range` request when the client reads again (0: never).
    #[arg(long, env = "GITBALL_PARK_AFTER", default_value = "10", value_parser = parse_seconds)]
    pub park_after: Duration,

    /// Seconds a failed upstream is tried last (after every healthy candidate).
    #[arg(long, env = "GITBALL_EJECT_FOR", default_value = "10", value_parser = parse_seconds)]
    pub eject_for: Duration,

    /// Peers whose X-Forwarded-For names the client (nginx in front), as CIDR[,CIDR…]. The client
    /// address keys the archivers' crawler budget. Default: none, the socket peer is the client.
    #[arg(long, env = "GITBALL_TRUSTED_PROXIES", value_parser = gitball_core::client::parse_nets)]
    pub trusted_proxies: Option<TrustedProxies>,

    /// Archiver flags, used in embedded mode (--repos); --log-format,
    /// --shutdown-grace, --max-connections and --tcp-congestion apply to
    /// the proxy as well.
    #[command(flatten)]
    pub archiver: ArchiveOptions,
}

impl Config {
    /// Parses a command line that must not be the `sign` subcommand (tests,
    /// embedding).
    pub fn try_parse_from<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            None => Ok(cli.config),
            Some(_) => Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                "expected the proxy's flags, not a subcommand",
            )),
        }
    }

    /// Seconds the drain on shutdown may take (the archiver's flag).
    pub fn shutdown_grace(&self) -> Duration {
        self.archiver.shutdown_grace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use gitball_core::docs::{check_flags, documented_flags, section};

    /// `docs/proxy.md`'s flags table holds the proxy's own flags, the
    /// archiver's (which the proxy takes, all but `--listen` and `--repos`)
    /// are those of `docs/archiver.md`, and the `sign` table is that
    /// subcommand's: each with clap's environment variable and default, and
    /// the README's short table agrees where it gives a flag. (Docs review:
    /// nothing held the tables to the code.)
    #[test]
    fn every_flag_is_documented_with_its_environment_and_default() {
        let proxy_md = include_str!("../../docs/proxy.md");
        let archiver_md = documented_flags(include_str!("../../docs/archiver.md"));
        let readme = include_str!("../../README.md");
        let archiver_flags: Vec<String> = archiver_md
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| !matches!(name.as_str(), "listen" | "repos" | "admin-listen"))
            .collect();
        let command = Cli::command();
        let mut problems = check_flags(
            &command,
            &documented_flags(section(proxy_md, "## Flags")),
            &documented_flags(section(
                readme,
                "## Deploying: archivers on file servers, proxies in front",
            )),
            &archiver_flags,
            "proxy",
        );
        // The archiver flags the proxy takes, as docs/archiver.md gives them.
        let archiver_only: Vec<(String, Vec<String>)> = archiver_md
            .iter()
            .filter(|(name, _)| archiver_flags.contains(name))
            .cloned()
            .collect();
        let own: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !archiver_flags.iter().any(|name| name == long))
            .map(str::to_owned)
            .collect();
        problems.extend(check_flags(
            &command,
            &archiver_only,
            &[],
            &own,
            "archiver flag of the proxy",
        ));
        let sign = command
            .find_subcommand("sign")
            .expect("the sign subcommand");
        problems.extend(check_flags(
            sign,
            &documented_flags(section(proxy_md, "## The sign subcommand")),
            &[],
            &[],
            "sign",
        ));
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_docs() {
        let config =
            Config::try_parse_from(["gitball-proxy", "--routes", "/etc/routes.toml"]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.header_timeout, Duration::from_secs(60));
        assert_eq!(config.client_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.eject_for, Duration::from_secs(10));
        assert_eq!(config.park_after, Duration::from_secs(10));
        // The archiver flags it takes govern it too.
        assert_eq!(config.shutdown_grace(), Duration::from_secs(30));
        assert_eq!(config.max_token_ttl, Duration::from_secs(7 * 86_400));
        assert!(config.repos.is_none());
    }

    #[test]
    fn exactly_one_of_routes_and_repos() {
        assert!(Config::try_parse_from(["gitball-proxy"]).is_err());
        assert!(
            Config::try_parse_from(["gitball-proxy", "--routes", "r.toml", "--repos", "."])
                .is_err()
        );
        let embedded =
            Config::try_parse_from(["gitball-proxy", "--repos", ".", "--max-generations", "3"])
                .unwrap();
        assert_eq!(embedded.archiver.max_generations, Some(3));
    }

    /// The `sign` subcommand parsed from `sign {args}`.
    fn sign_with(args: &[&str]) -> SignArgs {
        let cli = Cli::try_parse_from(["gitball-proxy", "sign"].iter().chain(args)).unwrap();
        let Some(Command::Sign(sign)) = cli.command else {
            panic!("not the sign subcommand");
        };
        sign
    }

    #[test]
    fn sign_subcommand_needs_no_service_flags() {
        let sign = sign_with(&["--key-file", "k", "--repo", "acme/widget", "--ttl", "5m"]);
        assert_eq!(sign.ttl, Duration::from_secs(300));
        assert_eq!(sign.repo, "acme/widget");
    }

    /// `sign --ttl` defaults to `10m` (`docs/proxy.md`, "The sign
    /// subcommand"). (Mutation review: another default passed every test,
    /// which all give `--ttl`.)
    #[test]
    fn sign_ttl_defaults_to_ten_minutes() {
        let sign = sign_with(&["--key-file", "k", "--repo", "acme/widget"]);
        assert_eq!(sign.ttl, Duration::from_secs(600));
    }

    #[test]
    fn max_token_ttl_takes_the_sign_ttl_syntax() {
        let parse = |value: &str| {
            Config::try_parse_from([
                "gitball-proxy",
                "--routes",
                "r.toml",
                "--max-token-ttl",
                value,
            ])
            .map(|config| config.max_token_ttl)
        };
        assert_eq!(parse("60d").unwrap(), Duration::from_secs(60 * 86_400));
        assert_eq!(parse("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse("900").unwrap(), Duration::from_secs(900));
        for bad in ["0", "1.5d", "7w", ""] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// docs/proxy.md, "Flags": `--connect-timeout`, `--header-timeout` and
    /// `--client-idle-timeout` must be more than 0; `--park-after 0` means
    /// never. (Mutation review: accepting 0 for any of the three passed
    /// every test.)
    #[test]
    fn timeouts_must_be_more_than_zero_but_park_after_may_be_zero() {
        let parse = |flag: &str, value: &str| {
            Config::try_parse_from(["gitball-proxy", "--routes", "r.toml", flag, value])
        };
        for flag in [
            "--connect-timeout",
            "--header-timeout",
            "--client-idle-timeout",
        ] {
            assert!(parse(flag, "0").is_err(), "{flag} 0 was accepted");
            assert!(parse(flag, "0.0").is_err(), "{flag} 0.0 was accepted");
            assert!(parse(flag, "0.5").is_ok(), "{flag} 0.5 was refused");
        }
        let never = parse("--park-after", "0").expect("--park-after 0");
        assert_eq!(never.park_after, Duration::ZERO);
    }

    #[test]
    fn fractional_seconds_are_accepted() {
        let config = Config::try_parse_from([
            "gitball-proxy",
            "--routes",
            "r.toml",
            "--client-idle-timeout",
            "0.5",
        ])
        .unwrap();
        assert_eq!(config.client_idle_timeout, Duration::from_millis(500));
    }

    /// What docs/proxy.md's flags tables say a flag accepts or refuses
    /// ("more than 0", "`0`: never", "Must be positive") is what the
    /// command line does. (Docs review: nothing held these to clap.)
    #[test]
    fn every_documented_bound_of_a_flag_holds() {
        let proxy_md = include_str!("../../docs/proxy.md");
        let mut problems = Vec::new();
        let mut checked = 0;
        let mut check = |args: &[&str], flag: &str, value: &str, accepted: bool| {
            checked += 1;
            let mut line: Vec<&str> = args.to_vec();
            line.extend([flag, value]);
            if Cli::try_parse_from(&line).is_ok() != accepted {
                problems.push(format!(
                    "{flag} {value}: docs/proxy.md says {}",
                    if accepted { "accepted" } else { "refused" }
                ));
            }
        };
        for (name, cells) in documented_flags(section(proxy_md, "## Flags")) {
            let flag = format!("--{name}");
            let meaning = cells[3].to_lowercase();
            if meaning.contains("more than 0") {
                check(&["gitball-proxy", "--routes", "r.toml"], &flag, "0", false);
                check(&["gitball-proxy", "--routes", "r.toml"], &flag, "0.5", true);
            }
            if meaning.contains("`0`:") {
                check(&["gitball-proxy", "--routes", "r.toml"], &flag, "0", true);
            }
        }
        let sign = [
            "gitball-proxy",
            "sign",
            "--key-file",
            "k",
            "--repo",
            "acme/widget",
        ];
        for (name, cells) in documented_flags(section(proxy_md, "## The sign subcommand")) {
            if cells[3].contains("Must be positive") {
                check(&sign, &format!("--{name}"), "0", false);
                check(&sign, &format!("--{name}"), "1", true);
            }
        }
        assert!(checked >= 9, "only {checked} bounds found");
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
