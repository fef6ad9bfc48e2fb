//! Proxy-specific parts of the harness, used by `tests/proxy.rs`.
//!
//! - [`Proxy`]: `gitball-proxy` as a child process. Its address is read from
//!   its own `gitball-proxy serving` log line, not from the first `serving`
//!   line: in embedded mode the in-process archiver logs its address first.
//! - [`Cluster`]: archivers plus a proxy routing to them (a primary and its
//!   replicas), the shape of a real deployment on one machine.
//! - [`start_archiver_at`]: an archiver on a given address, to restart a
//!   killed one on its old port.
//! - [`fetch`] and [`scrape`]: one request on a fresh connection that is
//!   closed afterwards, so the fd counts of the services only ever include
//!   what the test means them to.
//! - [`settled_fd_count`]: an fd baseline read once the count stopped moving.
//! - [`big_repository`]: a repository holding one large incompressible file.
//! - [`hmac_sha256`] and [`base64url`] (the `hmac`, `sha2` and `base64`
//!   crates): to forge (or correctly sign) tokens without trusting the
//!   proxy's own code.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    Archiver, BodyEnd, Metrics, RawConnection, RepoBuilder, ResponseHead, Service, open_fd_count,
    pseudo_random_bytes, wait_until,
};

/// How long a restart on a just-freed port keeps retrying the bind.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Processes

/// `gitball-proxy` as a child process on an ephemeral port.
pub struct Proxy {
    service: Service,
}

impl Proxy {
    /// Starts the proxy with `args` plus `--listen 127.0.0.1:0` and JSON
    /// logs; waits for its own serving line and `/healthz`.
    pub fn start(args: &[OsString]) -> Proxy {
        Proxy::start_with_nofile(args, None)
    }

    /// [`Proxy::start`] with `RLIMIT_NOFILE` `(soft, hard)` when given.
    pub fn start_with_nofile(args: &[OsString], nofile: Option<(u64, u64)>) -> Proxy {
        let mut all: Vec<OsString> = vec!["--listen".into(), "127.0.0.1:0".into()];
        if !args.iter().any(|arg| arg == "--log-format") {
            all.extend(["--log-format".into(), "json".into()]);
        }
        all.extend(args.iter().cloned());
        // `Service::start` waits for the `gitball-proxy serving` line, so in
        // embedded mode the in-process archiver's own line is not mistaken
        // for the proxy's.
        let service = Service::start_with_nofile("gitball-proxy", &all, nofile);
        Proxy { service }
    }

    /// A proxy over a routing table file.
    pub fn with_routes(routes: &Path, extra_args: &[&str]) -> Proxy {
        let mut args: Vec<OsString> = vec!["--routes".into(), routes.into()];
        args.extend(extra_args.iter().map(OsString::from));
        Proxy::start(&args)
    }

    /// Embedded mode: `--repos repos --cache-dir cache_dir`.
    pub fn embedded(repos: &Path, cache_dir: &Path, extra_args: &[&str]) -> Proxy {
        let mut args: Vec<OsString> = vec![
            "--repos".into(),
            repos.into(),
            "--cache-dir".into(),
            cache_dir.into(),
        ];
        args.extend(extra_args.iter().map(OsString::from));
        Proxy::start(&args)
    }

    /// A `/metrics` scrape on a connection of its own.
    pub fn scrape(&self) -> Metrics {
        scrape(self.addr)
    }
}

impl Deref for Proxy {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

impl DerefMut for Proxy {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.service
    }
}

/// Starts `gitball-archiver` on `listen` (a fixed address, e.g. the port of
/// an archiver that was just killed), retrying while the port is still
/// taken, for up to [`RESTART_TIMEOUT`].
pub fn start_archiver_at(
    repos: &Path,
    cache_dir: &Path,
    listen: SocketAddr,
    extra_args: &[&str],
) -> Service {
    let mut args: Vec<OsString> = vec![
        "--repos".into(),
        repos.into(),
        "--cache-dir".into(),
        cache_dir.into(),
        "--listen".into(),
        listen.to_string().into(),
        "--log-format".into(),
        "json".into(),
    ];
    args.extend(extra_args.iter().map(OsString::from));
    let deadline = Instant::now() + RESTART_TIMEOUT;
    // Bounded: each failed attempt costs one process start and 100 ms.
    for attempt in 1.. {
        // `Service::start` panics when the process exits before serving
        // (here: the bind failed); that is the retry signal.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Service::start("gitball-archiver", &args)
        }));
        match started {
            Ok(service) => return service,
            Err(panic) if Instant::now() >= deadline => {
                eprintln!("gitball-archiver could not start on {listen} after {attempt} attempts");
                std::panic::resume_unwind(panic);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    unreachable!("the restart loop returns or panics")
}

/// Sends SIGKILL to a service and waits (bounded) until it has exited.
pub fn kill_hard(service: &mut Service) {
    service.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || !service.is_running()),
        "pid {} survived SIGKILL",
        service.pid
    );
}

// ---------------------------------------------------------------------------
// Routing tables

/// One `[[route]]` of a routing table.
#[derive(Clone, Debug)]
pub struct Route {
    pub repos: String,
    pub primary: String,
    pub replicas: Vec<String>,
    pub private: bool,
}

impl Route {
    pub fn new(repos: &str, primary: &str, replicas: &[&str]) -> Route {
        Route {
            repos: repos.to_owned(),
            primary: primary.to_owned(),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            private: false,
        }
    }

    pub fn private(mut self) -> Route {
        self.private = true;
        self
    }

    fn toml(&self) -> String {
        let replicas: Vec<String> = self.replicas.iter().map(|r| format!("{r:?}")).collect();
        format!(
            "[[route]]\nrepos = {:?}\nprimary = {:?}\nreplicas = [{}]\nprivate = {}\n\n",
            self.repos,
            self.primary,
            replicas.join(", "),
            self.private
        )
    }
}

/// Writes a routing table to `path` atomically (a reload never sees half a file).
pub fn write_routes(path: &Path, routes: &[Route]) {
    let text: String = routes.iter().map(Route::toml).collect();
    write_atomically(path, text.as_bytes());
}

pub fn write_atomically(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("tmp");
    fs::write(&temporary, contents).expect("write a temporary file");
    fs::rename(&temporary, path).expect("rename it into place");
}

/// A primary archiver, its replicas and a proxy routing `*` to them.
pub struct Cluster {
    /// The primary.
    pub primary: Archiver,
    pub replicas: Vec<Archiver>,
    pub proxy: Proxy,
    pub routes_path: PathBuf,
    _routes_dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts a primary over `primary_repos`, `replicas` archivers over
    /// `replica_repos` (each with its own cache dir), and a proxy with
    /// `proxy_args` over a table routing every repository to them.
    pub fn start(
        primary_repos: &Path,
        replica_repos: &Path,
        replicas: usize,
        proxy_args: &[&str],
    ) -> Cluster {
        let primary = Archiver::start(primary_repos, &[]);
        let replicas: Vec<Archiver> = (0..replicas)
            .map(|_| Archiver::start(replica_repos, &[]))
            .collect();
        Cluster::around(primary, replicas, proxy_args)
    }

    /// Starts a proxy with `proxy_args` over a table routing every
    /// repository to archivers the caller started (e.g. a primary on a cache
    /// dir that is warm already).
    pub fn around(primary: Archiver, replicas: Vec<Archiver>, proxy_args: &[&str]) -> Cluster {
        let routes_dir = tempfile::Builder::new()
            .prefix("gitball-routes-")
            .tempdir()
            .expect("create a routes dir");
        let routes_path = routes_dir.path().join("routes.toml");
        let replica_urls: Vec<&str> = replicas.iter().map(|r| r.base_url.as_str()).collect();
        write_routes(
            &routes_path,
            &[Route::new("*", &primary.base_url, &replica_urls)],
        );
        let proxy = Proxy::with_routes(&routes_path, proxy_args);
        Cluster {
            primary,
            replicas,
            proxy,
            routes_path,
            _routes_dir: routes_dir,
        }
    }

    /// Every archiver: the primary first, then the replicas.
    pub fn archivers(&self) -> Vec<&Archiver> {
        std::iter::once(&self.primary)
            .chain(&self.replicas)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Requests

/// A whole response read from a fresh connection.
#[derive(Debug)]
pub struct Fetched {
    pub head: ResponseHead,
    pub body: Vec<u8>,
    pub end: BodyEnd,
}

impl Fetched {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// A header's value ("" when missing).
    pub fn header(&self, name: &str) -> &str {
        self.head.header(name).unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON `error` code of an error body ("" if there is none).
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|json| json.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// `method target` with `headers` (plus `Connection: close`) on a fresh
/// connection; reads the whole response.
pub fn fetch_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Fetched {
    let (head, body, end) = RawConnection::request(addr, method, target, headers)
        .unwrap_or_else(|error| panic!("{method} {target}: {error}"));
    Fetched { head, body, end }
}

pub fn fetch(addr: SocketAddr, target: &str) -> Fetched {
    fetch_with(addr, "GET", target, &[])
}

/// `GET target`, asserting `200` and a complete body.
pub fn fetch_ok(addr: SocketAddr, target: &str) -> Fetched {
    let fetched = fetch(addr, target);
    assert_eq!(
        fetched.status(),
        200,
        "GET {target}: {}",
        String::from_utf8_lossy(&fetched.body[..fetched.body.len().min(500)])
    );
    assert_eq!(fetched.end, BodyEnd::Complete, "GET {target}");
    fetched
}

/// `/metrics` on a connection of its own, closed afterwards.
pub fn scrape(addr: SocketAddr) -> Metrics {
    let fetched = fetch(addr, "/metrics");
    assert_eq!(fetched.status(), 200, "GET /metrics");
    Metrics::parse(&fetched.text())
}

/// Sum of every series of a family.
pub fn family_sum(metrics: &Metrics, name: &str) -> f64 {
    metrics.sum(name, &[])
}

/// The fd count of `pid` once it has not changed for 200 ms (at most 5 s):
/// a baseline not caught in the middle of a connection closing.
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = open_fd_count(pid);
    let mut same_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = open_fd_count(pid);
        if now != last {
            last = now;
            same_since = Instant::now();
        } else if same_since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
    last
}

/// Reads from `reader` until EOF or an error, at most `limit` bytes;
/// returns the count.
pub fn drain(mut reader: impl Read, limit: u64) -> io::Result<u64> {
    io::copy(&mut reader.by_ref().take(limit), &mut io::sink())
}

// ---------------------------------------------------------------------------
// Repositories

/// Commit dates of the small repository (fixed, so commits are too).
pub const FIRST_TIME: i64 = 1_700_000_000;
pub const SECOND_TIME: i64 = 1_700_086_400;

/// The commits of [`small_repository`].
#[derive(Clone, Debug)]
pub struct SmallRepository {
    /// `v1.0.0` (annotated) and `feature/x`.
    pub first: String,
    /// `main` and `v1.2.3`.
    pub second: String,
}

/// Two commits with text, binary and nested files; tags `v1.0.0`
/// (annotated, on the first) and `v1.2.3` (on the second); branch
/// `feature/x` on the first, `main` on the second.
pub fn small_repository(repo: &RepoBuilder) -> SmallRepository {
    repo.write("README.md", "# widget\n\nA test repository.\n");
    repo.write("src/lib.rs", crate::pseudo_text(1, 20_000));
    repo.write("data/blob.bin", pseudo_random_bytes(2, 50_000));
    let first = repo.commit_all(FIRST_TIME, "first");
    repo.tag_annotated("v1.0.0", &first, FIRST_TIME, "release 1.0.0");
    repo.git(&["branch", "feature/x", &first]);
    repo.write("src/lib.rs", crate::pseudo_text(3, 30_000));
    repo.write("docs/guide.md", "How to use the widget.\n");
    let second = repo.commit_all(SECOND_TIME, "second");
    repo.tag("v1.2.3", &second);
    SmallRepository { first, second }
}

/// A repository with one file of `bytes` incompressible bytes (stored
/// without zlib work, so building it is quick); returns its commit.
pub fn big_repository(repo: &RepoBuilder, bytes: usize) -> String {
    repo.write("README.md", "big\n");
    repo.write("big.bin", pseudo_random_bytes(42, bytes));
    repo.git(&["-c", "core.looseCompression=0", "add", "-A"]);
    repo.git_at(FIRST_TIME, &["commit", "-q", "-m", "big"]);
    repo.rev_parse("HEAD")
}

/// The byte length of `git archive --format=tar` of `commit`, by streaming.
pub fn tar_length(repo: &RepoBuilder, prefix: &str, commit: &str) -> u64 {
    let mut child = repo.archive_stream("tar", prefix, commit);
    let stdout = child.stdout.take().expect("stdout is piped");
    let length = drain(stdout, u64::MAX).expect("read git archive");
    assert!(child.wait().expect("wait for git").success(), "git archive");
    length
}

// ---------------------------------------------------------------------------
// Signed tokens, computed independently of the proxy

/// HMAC-SHA256 (RFC 2104), by the `hmac` crate.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Unpadded base64url.
pub fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The token of `docs/proxy.md`: `{expiry}.{base64url(HMAC-SHA256(key, "{repository}:{expiry}"))}`.
pub fn token(key: &[u8], repository: &str, expiry: u64) -> String {
    let signature = hmac_sha256(key, format!("{repository}:{expiry}").as_bytes());
    format!("{expiry}.{}", base64url(&signature))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 1.
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn base64url_is_unpadded_and_url_safe() {
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn tokens_match_an_independently_computed_one() {
        // Python: hmac.new(key, b"acme/secret:1700000000", sha256), then
        // urlsafe_b64encode without the padding.
        assert_eq!(
            token(
                b"e2e-signing-key-0123456789abcdef",
                "acme/secret",
                1_700_000_000
            ),
            "1700000000.bZOzT3kX-fTOK4s9ovKrPoDeTq-JktOwwDx9w8Eor_w"
        );
    }

    #[test]
    fn routes_are_written_as_toml() {
        let route = Route::new("acme/*", "http://a:1", &["http://b:2", "http://c:3"]).private();
        assert_eq!(
            route.toml(),
            "[[route]]\nrepos = \"acme/*\"\nprimary = \"http://a:1\"\n\
             replicas = [\"http://b:2\", \"http://c:3\"]\nprivate = true\n\n"
        );
    }
}
