//! Services: a gitball binary as a child process, and waiting on it.
//!
//! - [`Service`]: a binary started on `127.0.0.1:0`; the bound address is
//!   read from its `… serving listen=…` log line (no port guessing, no race
//!   for a free port), then `/healthz` is polled under a deadline. `Drop`
//!   sends SIGTERM, then SIGKILL if it does not exit.
//! - [`Archiver`]: `gitball-archiver` over a repos dir, with a cache dir of
//!   its own or one the caller keeps (to restart on it).
//! - [`wait_until`]: every wait in the tests is a condition polled under a
//!   deadline, never a sleep standing in for synchronisation.
//! - [`binary_path`]: the workspace binaries, found next to the test
//!   executable.

use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::git::dir_file_names;
use crate::metrics::Metrics;
use crate::procfs::{ProcessInfo, open_fd_count, proc_status_kib, zombie_or_git_children};
use crate::raw_http::{RawConnection, http_client};

/// How often [`wait_until`] checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a started service gets to log its address and answer `/healthz`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a service gets to exit after SIGTERM in `Drop` before SIGKILL.
pub const DROP_TERM_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Waiting

/// Polls `condition` every [`POLL_INTERVAL`] until it holds or `timeout`
/// passed; returns whether it held. Bounded in time and in iterations.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let max_polls = timeout.as_millis() / POLL_INTERVAL.as_millis() + 2;
    for _ in 0..max_polls {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    condition()
}

// ---------------------------------------------------------------------------
// Binaries

/// The path of a workspace binary, found next to the test executable
/// (`target/{profile}/deps/test-…` → `target/{profile}/{name}`).
///
/// Panics with the command to run when it is missing: `cargo test -p
/// gitball-e2e` does not build other packages' binaries.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe
        .parent()
        .expect("the test executable is in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: build it first with `cargo build -p {name}` \
         (add --release when testing with --release), or run `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------
// Services

/// A gitball binary running as a child process on an ephemeral port.
pub struct Service {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub base_url: String,
    /// stdout and stderr of the process.
    pub log_path: PathBuf,
    /// The process's working directory (empty unless it writes there).
    pub workdir: PathBuf,
    client: reqwest::blocking::Client,
    _scratch: TempDir,
}

impl Service {
    /// Starts `binary` (found by [`binary_path`]) with `args`, which must make
    /// it listen on `127.0.0.1:0`. Waits for its `serving listen=ADDR` log
    /// line and for `/healthz` to answer 200.
    pub fn start(binary: &str, args: &[OsString]) -> Service {
        Service::start_with_nofile(binary, args, None)
    }

    /// [`Service::start`], with `RLIMIT_NOFILE` set to `(soft, hard)` in the
    /// child (by `prlimit`, which then execs the binary: same pid), as a
    /// login shell gives it (soft 1024) or tighter.
    pub fn start_with_nofile(
        binary: &str,
        args: &[OsString],
        nofile: Option<(u64, u64)>,
    ) -> Service {
        let wrapper: Vec<OsString> = match nofile {
            Some((soft, hard)) => vec![
                "prlimit".into(),
                format!("--nofile={soft}:{hard}").into(),
                "--".into(),
            ],
            None => Vec::new(),
        };
        Service::start_wrapped(binary, &binary_path(binary), &wrapper, args)
    }

    /// [`Service::start`] of `binary` found at `path`, run through
    /// `wrapper` (a command and its arguments that then exec the binary,
    /// keeping its pid: `prlimit … --`, `setpriv … --`); an empty
    /// `wrapper` runs the binary itself.
    pub fn start_wrapped(
        binary: &str,
        path: &Path,
        wrapper: &[OsString],
        args: &[OsString],
    ) -> Service {
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{binary}-"))
            .tempdir()
            .expect("create a scratch dir");
        let log_path = scratch.path().join("log");
        let workdir = scratch.path().join("cwd");
        fs::create_dir_all(&workdir).expect("mkdir cwd");
        let log = fs::File::create(&log_path).expect("create the log file");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(path);
                command
            }
            None => Command::new(path),
        };
        let child = command
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &workdir)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("GITBALL_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", path.display()));
        let pid = child.id();
        let mut service = Service {
            name: binary.to_owned(),
            child,
            exit: None,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: String::new(),
            log_path,
            workdir,
            client: http_client(),
            _scratch: scratch,
        };

        let mut addr = None;
        let logged = wait_until(START_TIMEOUT, || {
            addr = listen_address(&service.log(), &format!("{binary} serving"));
            addr.is_some() || !service.is_running()
        });
        let Some(addr) = addr else {
            panic!(
                "{binary} did not log its listen address ({}); log:\n{}",
                if logged { "it exited" } else { "timeout" },
                service.log()
            );
        };
        service.addr = addr;
        service.base_url = format!("http://{addr}");
        let healthy = wait_until(START_TIMEOUT, || {
            service.health_status() == Some(200) || !service.is_running()
        });
        assert!(
            healthy && service.is_running(),
            "{binary} did not answer /healthz with 200; log:\n{}",
            service.log()
        );
        service
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base_url)
    }

    /// A shared blocking client (keep-alive pool included).
    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    pub fn get(&self, path_and_query: &str) -> reqwest::blocking::Response {
        self.client
            .get(self.url(path_and_query))
            .send()
            .unwrap_or_else(|error| panic!("GET {path_and_query}: {error}"))
    }

    /// `GET path_and_query`, which must answer `200`: its body and its
    /// `X-Gitball-Cache`.
    pub fn get_body_and_cache(&self, path_and_query: &str) -> (Vec<u8>, String) {
        let response = self.get(path_and_query);
        assert_eq!(response.status().as_u16(), 200, "GET {path_and_query}");
        let cache = crate::header(&response, "x-gitball-cache").to_owned();
        (response.bytes().expect("body").to_vec(), cache)
    }

    /// `GET /healthz` on a fresh connection that is closed afterwards (so
    /// health checks leave no idle connection behind).
    pub fn health_status(&self) -> Option<u16> {
        let mut connection = RawConnection::connect(self.addr).ok()?;
        connection
            .send_request("GET", "/healthz", &[("Connection", "close")])
            .ok()?;
        connection.read_head().ok().map(|head| head.status)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn metrics_text(&self) -> String {
        let response = self.get("/metrics");
        assert_eq!(response.status().as_u16(), 200, "GET /metrics");
        response.text().expect("read /metrics")
    }

    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text())
    }

    /// True until the process has exited (and then it is reaped).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(status);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Sends SIGSTOP and waits (up to 5 s) until every thread is stopped.
    /// Returns whether they all stopped.
    pub fn suspend(&self) -> bool {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        wait_until(Duration::from_secs(5), || {
            crate::procfs::threads_stopped(self.pid)
        })
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit. Returns the exit
    /// status (None: still running) and how long the exit took.
    pub fn terminate(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        if self.is_running() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
        }
        wait_until(timeout, || !self.is_running());
        (self.exit, started.elapsed())
    }

    /// Waits up to `timeout` for the exit, sending nothing. Returns the
    /// exit status (None: still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || !self.is_running());
        self.exit
    }

    pub fn rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS") * 1024
    }

    /// Peak resident set size since the process started.
    pub fn peak_rss_bytes(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM") * 1024
    }

    pub fn open_fds(&self) -> usize {
        open_fd_count(self.pid)
    }

    /// Child processes that are zombies or named `git`.
    pub fn stray_children(&self) -> Vec<ProcessInfo> {
        zombie_or_git_children(self.pid)
    }
}

/// How many of a service's last log lines a failing test prints.
const LOG_LINES_ON_FAILURE: usize = 40;

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: its output (which libtest shows) gets the end
            // of the service's log, e.g. why it answered 500.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
            eprintln!(
                "--- {} (pid {}): last {} lines of {}\n{}",
                self.name,
                self.pid,
                tail.len(),
                self.log_path.display(),
                tail.join("\n")
            );
        }
        if !self.is_running() {
            return;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if !wait_until(DROP_TERM_TIMEOUT, || !self.is_running()) {
            eprintln!(
                "{} (pid {}) ignored SIGTERM; killing it",
                self.name, self.pid
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `binary` on `127.0.0.1:0` over `repos` with the cache dir `cache`
/// and `args`, and expects it to refuse to start: it must exit,
/// unsuccessfully, within 10 s (killed otherwise). Returns its stderr.
pub fn start_refused(
    binary: &str,
    repos: &Path,
    cache: &Path,
    args: &[&std::ffi::OsStr],
) -> String {
    let mut child = Command::new(binary_path(binary))
        .args(["--listen", "127.0.0.1:0", "--repos"])
        .arg(repos)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the binary");
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().expect("wait").is_some()
    });
    if !exited {
        child.kill().expect("kill");
    }
    let output = child.wait_with_output().expect("its stderr");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        exited && !output.status.success(),
        "{binary} started: {stderr}"
    );
    stderr
}

/// Finds the address in a `… serving … listen=ADDR` line (text logs) or a
/// JSON log line whose message ends in `serving` with a `listen` field.
pub fn listen_address(log: &str, marker: &str) -> Option<SocketAddr> {
    for line in log.lines() {
        if !line.contains(marker) {
            continue;
        }
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(line)
            && let Some(listen) = map.get("listen").and_then(|v| v.as_str())
            && let Ok(addr) = listen.parse()
        {
            return Some(addr);
        }
        let plain = strip_ansi(line);
        if let Some(rest) = plain.split("listen=").nth(1) {
            let token: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            if let Ok(addr) = token.parse() {
                return Some(addr);
            }
        }
    }
    None
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ … final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `gitball-archiver` as a child process.
pub struct Archiver {
    service: Service,
    pub cache_dir: PathBuf,
    _cache: Option<TempDir>,
}

impl Archiver {
    /// Starts the archiver over `repos` with a fresh cache dir of its own.
    pub fn start(repos: &Path, extra_args: &[&str]) -> Archiver {
        let cache = tempfile::Builder::new()
            .prefix("gitball-cache-")
            .tempdir()
            .expect("create a cache dir");
        let cache_dir = cache.path().join("cache");
        let mut archiver = Archiver::start_with_cache(repos, &cache_dir, extra_args);
        archiver._cache = Some(cache);
        archiver
    }

    /// [`Archiver::start`] with `RLIMIT_NOFILE` `(soft, hard)`.
    pub fn start_with_nofile(repos: &Path, extra_args: &[&str], nofile: (u64, u64)) -> Archiver {
        let cache = tempfile::Builder::new()
            .prefix("gitball-cache-")
            .tempdir()
            .expect("create a cache dir");
        let cache_dir = cache.path().join("cache");
        let mut archiver = Archiver::start_inner(repos, &cache_dir, extra_args, Some(nofile));
        archiver._cache = Some(cache);
        archiver
    }

    /// Starts the archiver over `repos` with `cache_dir` as the user `uid`
    /// and group `gid`, and no other group (`setpriv`, so the test must run
    /// as root): the user reads `repos` as anyone may, and must own
    /// `cache_dir` or be able to create it. The binary is copied beside
    /// `cache_dir` first (the build's may lie where only root can read),
    /// so the user must be able to read `cache_dir`'s parent.
    pub fn start_as_user(
        repos: &Path,
        cache_dir: &Path,
        (uid, gid): (u32, u32),
        extra_args: &[&str],
    ) -> Archiver {
        let wrapper: Vec<OsString> = vec![
            "setpriv".into(),
            format!("--reuid={uid}").into(),
            format!("--regid={gid}").into(),
            "--clear-groups".into(),
            "--".into(),
        ];
        let args = Archiver::args(repos, cache_dir, extra_args);
        let parent = cache_dir.parent().expect("a cache dir in a directory");
        let copy = parent.join("gitball-archiver");
        fs::copy(binary_path("gitball-archiver"), &copy).expect("copy the archiver");
        wait_until_executable(&copy);
        Archiver {
            service: Service::start_wrapped("gitball-archiver", &copy, &wrapper, &args),
            cache_dir: cache_dir.to_path_buf(),
            _cache: None,
        }
    }

    /// [`Archiver::start`] run through `wrapper` (a command and its
    /// arguments that then exec the binary, keeping its pid: `env VAR=…`).
    pub fn start_wrapped(repos: &Path, extra_args: &[&str], wrapper: &[OsString]) -> Archiver {
        let cache = tempfile::Builder::new()
            .prefix("gitball-cache-")
            .tempdir()
            .expect("create a cache dir");
        let cache_dir = cache.path().join("cache");
        let args = Archiver::args(repos, &cache_dir, extra_args);
        Archiver {
            service: Service::start_wrapped(
                "gitball-archiver",
                &binary_path("gitball-archiver"),
                wrapper,
                &args,
            ),
            cache_dir,
            _cache: Some(cache),
        }
    }

    /// Starts the archiver over `repos` with `cache_dir` (kept by the caller,
    /// e.g. to restart on the same cache).
    pub fn start_with_cache(repos: &Path, cache_dir: &Path, extra_args: &[&str]) -> Archiver {
        Archiver::start_inner(repos, cache_dir, extra_args, None)
    }

    fn start_inner(
        repos: &Path,
        cache_dir: &Path,
        extra_args: &[&str],
        nofile: Option<(u64, u64)>,
    ) -> Archiver {
        let args = Archiver::args(repos, cache_dir, extra_args);
        Archiver {
            service: Service::start_with_nofile("gitball-archiver", &args, nofile),
            cache_dir: cache_dir.to_path_buf(),
            _cache: None,
        }
    }

    fn args(repos: &Path, cache_dir: &Path, extra_args: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--repos".into(),
            repos.into(),
            "--cache-dir".into(),
            cache_dir.into(),
        ];
        // A test may give its own (`[::]:0`, a dual-stack listener).
        if !extra_args.contains(&"--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !extra_args.contains(&"--log-format") {
            args.extend(["--log-format".into(), "json".into()]);
        }
        args.extend(extra_args.iter().map(OsString::from));
        args
    }

    /// Names of the files in the cache dir.
    pub fn cache_files(&self) -> Vec<String> {
        let mut names = dir_file_names(&self.cache_dir);
        // The archiver's own shadow git dirs (docs/archiver.md, "No command
        // from the repository").
        names.retain(|name| !name.starts_with("shadows-"));
        names
    }

    /// Sum of the sizes of the files in the cache dir.
    pub fn cache_dir_bytes(&self) -> u64 {
        fs::read_dir(&self.cache_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| entry.metadata().ok())
                    .filter(fs::Metadata::is_file)
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Deref for Archiver {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

impl DerefMut for Archiver {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.service
    }
}

/// The first line of a JSON log that contains `marker`, parsed; panics
/// with the log when there is none.
pub fn log_line(log: &str, marker: &str) -> serde_json::Value {
    let line = log
        .lines()
        .find(|line| line.contains(marker))
        .unwrap_or_else(|| panic!("no `{marker}` line:\n{log}"));
    serde_json::from_str(line).expect("a JSON log line")
}

/// Every `request` line of a JSON log.
pub fn request_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "request")
        .collect()
}

/// The `request` line of a JSON log with `request_id`.
pub fn line_for(log: &str, request_id: &str) -> Option<serde_json::Value> {
    request_lines(log)
        .into_iter()
        .find(|line| line["request_id"] == request_id)
}

/// The `request` line with `request_id` in the JSON log `log()` reads,
/// waited for up to `timeout` (a line is written when its request ends,
/// which can be after the client saw the end). Panics with the log if it
/// never comes.
pub fn wait_for_line(
    timeout: Duration,
    log: impl Fn() -> String,
    request_id: &str,
) -> serde_json::Value {
    let mut line = None;
    let found = wait_until(timeout, || {
        line = line_for(&log(), request_id);
        line.is_some()
    });
    assert!(found, "no line for request {request_id}:\n{}", log());
    line.expect("found")
}

/// Waits until `binary`, just written, can be executed. A child that
/// another test thread forked while the file was open for writing holds
/// it so until the child execs, and an exec of the file fails with
/// `ETXTBSY` meanwhile (review): tried again, within a bound, until it
/// runs. No new writer can appear once the copy is closed.
fn wait_until_executable(binary: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Command::new(binary)
            .arg("--help")
            .stdout(Stdio::null())
            .status()
        {
            Err(error)
                if error.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                    && Instant::now() < deadline =>
            {
                std::thread::yield_now();
            }
            Err(error) => panic!("running {}: {error}", binary.display()),
            Ok(status) => {
                assert!(status.success(), "{} --help: {status}", binary.display());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_found_in_text_and_json_logs() {
        let text = "\u{1b}[2m2026\u{1b}[0m INFO gitball_archiver: gitball-archiver serving \u{1b}[3mlisten\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:4242\n";
        assert_eq!(
            listen_address(text, "gitball-archiver serving"),
            Some("127.0.0.1:4242".parse().unwrap())
        );
        let json = "{\"message\":\"gitball-archiver serving\",\"listen\":\"127.0.0.1:5555\"}\n";
        assert_eq!(
            listen_address(json, "gitball-archiver serving"),
            Some("127.0.0.1:5555".parse().unwrap())
        );
        assert_eq!(
            listen_address("starting\n", "gitball-archiver serving"),
            None
        );
        // Embedded mode: the proxy's own line, not its in-process archiver's.
        let both = "{\"message\":\"gitball-archiver serving\",\"listen\":\"127.0.0.1:1111\"}\n\
                    {\"message\":\"gitball-proxy serving\",\"listen\":\"127.0.0.1:2222\"}\n";
        assert_eq!(
            listen_address(both, "gitball-proxy serving"),
            Some("127.0.0.1:2222".parse().unwrap())
        );
    }
}
