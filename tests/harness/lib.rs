//! The end-to-end harness: real binaries as child processes, real `git`,
//! real sockets on 127.0.0.1.
//!
//! Used by every test in `tests/` (archiver now, proxy later). Its parts:
//!
//! - [`Sandbox`] and [`RepoBuilder`]: repositories built with the real `git`
//!   in a temp dir, in a clean environment (`HOME` is an empty temp dir,
//!   `GIT_CONFIG_NOSYSTEM=1`, fixed names, e-mails and dates), so the same
//!   test builds the same commits on every machine.
//! - [`Service`] and [`Archiver`]: a binary started on `127.0.0.1:0`; the
//!   bound address is read from its `… serving listen=…` log line (no port
//!   guessing, no race for a free port), then `/healthz` is polled under a
//!   deadline. `Drop` sends SIGTERM, then SIGKILL if it does not exit.
//! - [`RawConnection`]: HTTP/1.1 over a plain `TcpStream` where a test needs
//!   control that a client library hides: stalling, aborting after N bytes,
//!   oversized heads, and telling a clean end of a body from an abort.
//! - [`Metrics`]: a parsed `/metrics` scrape.
//! - `/proc` readers: resident memory, open fds, child processes.
//! - [`wait_until`]: every wait in the tests is a condition polled under a
//!   deadline, never a sleep standing in for synchronisation.

pub mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// How often [`wait_until`] checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long a started service gets to log its address and answer `/healthz`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a service gets to exit after SIGTERM in `Drop` before SIGKILL.
pub const DROP_TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read/write timeout of [`RawConnection`]: no test read blocks forever.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
/// Whole-request timeout of [`http_client`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(180);

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
// Deterministic data

/// Deterministic incompressible bytes: xorshift64* seeded with `seed`.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Deterministic compressible text (words from a small vocabulary).
pub fn pseudo_text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "archive", "branch", "commit", "tarball", "gitball", "zstd", "gzip", "tree", "blob", "tag",
        "cache", "reader", "stream", "bytes", "owner", "widget",
    ];
    let noise = pseudo_random_bytes(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let byte = noise[i % noise.len()];
        out.extend_from_slice(WORDS[usize::from(byte & 15)].as_bytes());
        out.push(if byte >> 4 == 0 { b'\n' } else { b' ' });
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Standard base64 with padding (what `Repr-Digest` uses).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if k <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An IMF-fixdate (`Tue, 02 Jan 2024 03:04:05 GMT`) for Unix seconds.
pub fn http_date(unix_seconds: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Runs `program args` with `input` on stdin and returns its stdout; panics
/// (with its stderr) unless it exits 0. Used for `gzip -dc` and `zstd -dc`.
pub fn pipe_through(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let output = std::thread::scope(|scope| {
        scope.spawn(move || {
            // A decompressor that stops early closes its stdin: that is its
            // exit status's business, not a panic here.
            let _ = stdin.write_all(input);
        });
        child.wait_with_output().expect("wait for the child")
    });
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

// ---------------------------------------------------------------------------
// Archive listings (to check the top folder without trusting a library)

/// Entry names of a tar archive (ustar + pax `path` records), without the
/// `pax_global_header` entry.
pub fn tar_entry_names(tar: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut offset = 0;
    let mut pax_path: Option<String> = None;
    while offset + 512 <= tar.len() {
        let header = &tar[offset..offset + 512];
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let size_text = field(124..136);
        let size = u64::from_str_radix(size_text.trim(), 8)
            .unwrap_or_else(|_| panic!("bad tar size field {size_text:?} at {offset}"));
        let size = usize::try_from(size).expect("tar entry size fits usize");
        let typeflag = header[156];
        let data = &tar[offset + 512..(offset + 512 + size).min(tar.len())];
        match typeflag {
            b'g' => {}
            b'x' => pax_path = pax_record(data, "path"),
            _ => {
                let name = pax_path.take().unwrap_or_else(|| {
                    let prefix = field(345..500);
                    let name = field(0..100);
                    if prefix.is_empty() {
                        name
                    } else {
                        format!("{prefix}/{name}")
                    }
                });
                names.push(name);
            }
        }
        offset += 512 + size.div_ceil(512) * 512;
    }
    names
}

fn pax_record(data: &[u8], key: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|line| {
        let (_, record) = line.split_once(' ')?;
        let (k, v) = record.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Entry names of a zip archive, from its central directory.
pub fn zip_entry_names(zip: &[u8]) -> Vec<String> {
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([zip[at], zip[at + 1]]));
    let u32_at =
        |at: usize| u32::from_le_bytes([zip[at], zip[at + 1], zip[at + 2], zip[at + 3]]) as usize;
    let end = (0..=zip.len().saturating_sub(22))
        .rev()
        .find(|&at| zip[at..at + 4] == [0x50, 0x4b, 0x05, 0x06])
        .expect("zip end of central directory");
    let count = u16_at(end + 10);
    let mut at = u32_at(end + 16);
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        assert_eq!(
            zip[at..at + 4],
            [0x50, 0x4b, 0x01, 0x02],
            "zip central directory entry"
        );
        let (name_len, extra_len, comment_len) =
            (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        names.push(String::from_utf8_lossy(&zip[at + 46..at + 46 + name_len]).into_owned());
        at += 46 + name_len + extra_len + comment_len;
    }
    names
}

// ---------------------------------------------------------------------------
// Git

/// A `git` command in a clean environment: no system or user configuration
/// (`HOME` is `home`, an empty directory), fixed identity, C locale, UTC.
pub fn git_command(home: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env("GIT_AUTHOR_NAME", "Gitball Tester")
        .env("GIT_AUTHOR_EMAIL", "tester@gitball.invalid")
        .env("GIT_COMMITTER_NAME", "Gitball Tester")
        .env("GIT_COMMITTER_EMAIL", "tester@gitball.invalid")
        .args(["-c", "init.defaultBranch=main"])
        .stdin(Stdio::null());
    command
}

/// Runs a git command; panics with its stderr unless it exits 0.
fn run_git(mut command: Command, what: &str) -> Vec<u8> {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run git ({what}): {error}"));
    assert!(
        output.status.success(),
        "git {what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Builds a repository with the real `git`, deterministically: every commit
/// and tag gets the date the test passes.
pub struct RepoBuilder {
    dir: PathBuf,
    home: PathBuf,
}

impl RepoBuilder {
    /// `git init` a work tree at `dir` (created), with `home` as `HOME`.
    pub fn init(dir: &Path, home: &Path) -> RepoBuilder {
        fs::create_dir_all(dir).expect("create the repository dir");
        fs::create_dir_all(home).expect("create the git home dir");
        let builder = RepoBuilder {
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
        };
        builder.git(&["init", "-q"]);
        builder
    }

    /// `git init --bare` at `dir`; fill it with plumbing ([`RepoBuilder::git_with_input`]).
    pub fn init_bare(dir: &Path, home: &Path) -> RepoBuilder {
        fs::create_dir_all(dir).expect("create the repository dir");
        fs::create_dir_all(home).expect("create the git home dir");
        let builder = RepoBuilder {
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
        };
        builder.git(&["init", "-q", "--bare"]);
        builder
    }

    /// A builder for an existing repository at `dir`.
    pub fn open(dir: &Path, home: &Path) -> RepoBuilder {
        RepoBuilder {
            dir: dir.to_path_buf(),
            home: home.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, time: Option<i64>, args: &[&str]) -> Command {
        let mut command = git_command(&self.home);
        command.current_dir(&self.dir).args(args);
        if let Some(time) = time {
            let date = format!("{time} +0000");
            command
                .env("GIT_AUTHOR_DATE", &date)
                .env("GIT_COMMITTER_DATE", &date);
        }
        command
    }

    /// Runs git in the repository; returns trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let stdout = run_git(self.command(None, args), &args.join(" "));
        String::from_utf8_lossy(&stdout).trim().to_owned()
    }

    /// Runs git with author and committer dates set to `time` (Unix seconds).
    pub fn git_at(&self, time: i64, args: &[&str]) -> String {
        let stdout = run_git(self.command(Some(time), args), &args.join(" "));
        String::from_utf8_lossy(&stdout).trim().to_owned()
    }

    /// Runs git with `input` on stdin; returns trimmed stdout.
    pub fn git_with_input(&self, time: Option<i64>, args: &[&str], input: &[u8]) -> String {
        let mut command = self.command(time, args);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn git");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let output = std::thread::scope(|scope| {
            scope.spawn(move || {
                stdin.write_all(input).expect("write git's stdin");
            });
            child.wait_with_output().expect("wait for git")
        });
        assert!(
            output.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Writes a file of the work tree (directories created).
    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) {
        let path = self.dir.join(relative);
        fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir -p");
        fs::write(&path, contents).expect("write a work tree file");
    }

    pub fn write_executable(&self, relative: &str, contents: impl AsRef<[u8]>) {
        use std::os::unix::fs::PermissionsExt;
        self.write(relative, contents);
        fs::set_permissions(self.dir.join(relative), fs::Permissions::from_mode(0o755))
            .expect("chmod 755");
    }

    pub fn symlink(&self, relative: &str, target: &str) {
        let path = self.dir.join(relative);
        fs::create_dir_all(path.parent().expect("a link has a parent")).expect("mkdir -p");
        std::os::unix::fs::symlink(target, path).expect("create a symlink");
    }

    /// `git add -A && git commit` dated `time`; returns the commit id.
    pub fn commit_all(&self, time: i64, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git_at(time, &["commit", "-q", "-m", message]);
        self.rev_parse("HEAD")
    }

    /// A lightweight tag.
    pub fn tag(&self, name: &str, target: &str) {
        self.git(&["tag", name, target]);
    }

    /// An annotated tag, tagged at `time`.
    pub fn tag_annotated(&self, name: &str, target: &str, time: i64, message: &str) {
        self.git_at(time, &["tag", "-a", name, "-m", message, target]);
    }

    /// The full id `rev` names.
    pub fn rev_parse(&self, rev: &str) -> String {
        self.git(&["rev-parse", "--verify", "--end-of-options", rev])
    }

    /// What `git archive --format={format} --prefix={prefix} {commit} [-- path]` prints.
    pub fn archive(&self, format: &str, prefix: &str, commit: &str, path: Option<&str>) -> Vec<u8> {
        let format_arg = format!("--format={format}");
        let prefix_arg = format!("--prefix={prefix}");
        let mut args = vec!["archive", &format_arg, &prefix_arg, commit];
        if let Some(path) = path {
            args.extend(["--", path]);
        }
        run_git(self.command(None, &args), "archive")
    }

    /// Starts `git archive` with its stdout piped, for archives too large to
    /// hold (compare them with [`assert_same_stream`]).
    pub fn archive_stream(&self, format: &str, prefix: &str, commit: &str) -> Child {
        self.command(
            None,
            &[
                "archive",
                &format!("--format={format}"),
                &format!("--prefix={prefix}"),
                commit,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn git archive")
    }

    /// `git clone --bare` of this repository into `destination`.
    pub fn clone_bare(&self, destination: &Path) -> RepoBuilder {
        let mut command = git_command(&self.home);
        command
            .arg("clone")
            .arg("-q")
            .arg("--bare")
            .arg(&self.dir)
            .arg(destination);
        run_git(command, "clone --bare");
        RepoBuilder {
            dir: destination.to_path_buf(),
            home: self.home.clone(),
        }
    }
}

/// Reads `actual` to its end and asserts it equals what `expected` (a
/// spawned command with piped stdout) prints, without holding either whole.
/// Returns the number of bytes compared.
pub fn assert_same_stream(mut actual: impl Read, mut expected: Child, what: &str) -> u64 {
    let mut expected_out = expected.stdout.take().expect("stdout is piped");
    let mut a = vec![0u8; 1 << 20];
    let mut e = vec![0u8; 1 << 20];
    let mut offset: u64 = 0;
    loop {
        let n = read_full(&mut actual, &mut a).unwrap_or_else(|error| {
            panic!("{what}: reading the body failed at byte {offset}: {error}")
        });
        let m = read_full(&mut expected_out, &mut e).expect("read git's output");
        if let Some(at) = a[..n.min(m)]
            .iter()
            .zip(&e[..n.min(m)])
            .position(|(x, y)| x != y)
        {
            panic!("{what}: bytes differ at offset {}", offset + at as u64);
        }
        assert_eq!(
            n,
            m,
            "{what}: lengths differ (body ends near {}, expected near {})",
            offset + n as u64,
            offset + m as u64
        );
        offset += n as u64;
        if n == 0 {
            break;
        }
    }
    assert!(
        expected.wait().expect("wait for git").success(),
        "{what}: git failed"
    );
    offset
}

fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// A test's private directory: `repos/` (what the service serves), `home/`
/// (git's `HOME`), and whatever else the test puts there. Removed on drop.
pub struct Sandbox {
    dir: TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("gitball-e2e-")
            .tempdir()
            .expect("create a temp dir");
        fs::create_dir_all(dir.path().join("repos")).expect("mkdir repos");
        fs::create_dir_all(dir.path().join("home")).expect("mkdir home");
        Sandbox { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// `--repos DIR`.
    pub fn repos(&self) -> PathBuf {
        self.path("repos")
    }

    pub fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// A work tree repository served as `{owner}/{name}`.
    pub fn repo(&self, owner: &str, name: &str) -> RepoBuilder {
        RepoBuilder::init(&self.repos().join(owner).join(name), &self.home())
    }

    /// A work tree outside `repos/` (e.g. to be cloned bare into it).
    pub fn source_repo(&self, relative: &str) -> RepoBuilder {
        RepoBuilder::init(&self.path(relative), &self.home())
    }
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
        let path = binary_path(binary);
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{binary}-"))
            .tempdir()
            .expect("create a scratch dir");
        let log_path = scratch.path().join("log");
        let workdir = scratch.path().join("cwd");
        fs::create_dir_all(&workdir).expect("mkdir cwd");
        let log = fs::File::create(&log_path).expect("create the log file");
        let child = Command::new(&path)
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &workdir)
            .env("NO_COLOR", "1")
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

impl Drop for Service {
    fn drop(&mut self) {
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

    /// Starts the archiver over `repos` with `cache_dir` (kept by the caller,
    /// e.g. to restart on the same cache).
    pub fn start_with_cache(repos: &Path, cache_dir: &Path, extra_args: &[&str]) -> Archiver {
        let mut args: Vec<OsString> = vec![
            "--repos".into(),
            repos.into(),
            "--cache-dir".into(),
            cache_dir.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        if !extra_args.contains(&"--log-format") {
            args.extend(["--log-format".into(), "json".into()]);
        }
        args.extend(extra_args.iter().map(OsString::from));
        Archiver {
            service: Service::start("gitball-archiver", &args),
            cache_dir: cache_dir.to_path_buf(),
            _cache: None,
        }
    }

    /// Names of the files in the cache dir.
    pub fn cache_files(&self) -> Vec<String> {
        dir_file_names(&self.cache_dir)
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

pub fn dir_file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every path under `root` (symlinks not followed) with its size and, for
/// symlinks, target: compare two snapshots to prove nothing was created.
pub fn tree_snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut snapshot = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = pending.pop() {
        visited += 1;
        assert!(visited < 100_000, "tree_snapshot: too many directories");
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Ok(metadata) = fs::symlink_metadata(&path) else {
                continue;
            };
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            let description = if metadata.is_symlink() {
                format!("link -> {:?}", fs::read_link(&path).ok())
            } else if metadata.is_dir() {
                pending.push(path);
                "dir".to_owned()
            } else {
                format!("file {}", metadata.len())
            };
            snapshot.insert(relative, description);
        }
    }
    snapshot
}

/// A blocking HTTP client without decompression or a short total timeout.
pub fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build the HTTP client")
}

/// A header's value as text ("" when missing).
pub fn header<'r>(response: &'r reqwest::blocking::Response, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1

/// A response head read by [`RawConnection`]. Header names are lower case.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// How a response body ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// The framing said it was complete (Content-Length reached, or the
    /// terminating zero-size chunk).
    Complete,
    /// The connection ended (EOF or reset) before the framing's end.
    Aborted(String),
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length {
        remaining: u64,
    },
    Chunked {
        remaining: u64,
        after_data: bool,
    },
    UntilEof,
    Done,
}

/// One HTTP/1.1 connection over a plain socket.
pub struct RawConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
    start: usize,
    framing: Framing,
    head_request: bool,
}

/// Longest response head or chunk-size line accepted from the server.
const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;

impl RawConnection {
    pub fn connect(addr: SocketAddr) -> io::Result<RawConnection> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(RawConnection {
            stream,
            buffer: Vec::new(),
            start: 0,
            framing: Framing::Done,
            head_request: false,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends arbitrary bytes.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends `{method} {target} HTTP/1.1` with a Host header and `headers`.
    pub fn send_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<()> {
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\n",
            self.stream.peer_addr()?
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.head_request = method == "HEAD";
        self.send(request.as_bytes())
    }

    /// Connects, sends one request with `Connection: close` added, reads the
    /// head and the whole body.
    pub fn request(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<(ResponseHead, Vec<u8>, BodyEnd)> {
        let mut connection = RawConnection::connect(addr)?;
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.push(("Connection", "close"));
        connection.send_request(method, target, &all)?;
        let head = connection.read_head()?;
        let mut body = Vec::new();
        let end = connection.read_body_to_end(|chunk| body.extend_from_slice(chunk));
        Ok((head, body, end))
    }

    fn buffered(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads up to and including `\r\n`; returns the line without it.
    fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = self.buffered().windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buffered()[..at]).into_owned();
                self.consume(at + 2);
                return Ok(line);
            }
            if self.buffered().len() > MAX_RESPONSE_HEAD_BYTES {
                return Err(io::Error::other("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF in a line",
                ));
            }
        }
    }

    /// Reads a response head and sets up the body's framing.
    pub fn read_head(&mut self) -> io::Result<ResponseHead> {
        let status_line = self.read_line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        for _ in 0..1000 {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let head = ResponseHead { status, headers };
        self.framing = if self.head_request || status == 204 || status == 304 || status < 200 {
            Framing::Empty
        } else if head
            .header("transfer-encoding")
            .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked {
                remaining: 0,
                after_data: false,
            }
        } else if let Some(length) = head.header("content-length") {
            Framing::Length {
                remaining: length.parse().map_err(io::Error::other)?,
            }
        } else {
            Framing::UntilEof
        };
        Ok(head)
    }

    /// The next piece of the body, at most `max` bytes. `Ok(None)`: the body
    /// ended cleanly. `Err`: the connection ended or failed before the end.
    pub fn read_body_some(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            match self.framing {
                Framing::Empty | Framing::Done => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length { remaining: 0 } => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length { remaining } => {
                    if self.buffered().is_empty() && self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("EOF with {remaining} bytes of Content-Length missing"),
                        ));
                    }
                    let n = self
                        .buffered()
                        .len()
                        .min(max)
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    self.framing = Framing::Length {
                        remaining: remaining - n as u64,
                    };
                    return Ok(Some(piece));
                }
                Framing::UntilEof => {
                    if self.buffered().is_empty() && self.fill()? == 0 {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    let n = self.buffered().len().min(max);
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    return Ok(Some(piece));
                }
                Framing::Chunked {
                    remaining: 0,
                    after_data,
                } => {
                    let eof = |what: &str| {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection ended {what} (no terminating chunk)"),
                        )
                    };
                    if after_data {
                        let line = self.read_line().map_err(|_| eof("after a chunk"))?;
                        if !line.is_empty() {
                            return Err(io::Error::other("chunk data not followed by CRLF"));
                        }
                    }
                    let line = self.read_line().map_err(|_| eof("before a chunk size"))?;
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size_text, 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        for _ in 0..1000 {
                            if self
                                .read_line()
                                .map_err(|_| eof("in the trailer"))?
                                .is_empty()
                            {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    self.framing = Framing::Chunked {
                        remaining: size,
                        after_data: false,
                    };
                }
                Framing::Chunked { remaining, .. } => {
                    if self.buffered().is_empty() && self.fill()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection ended inside a chunk",
                        ));
                    }
                    let n = self
                        .buffered()
                        .len()
                        .min(max)
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let piece = self.buffered()[..n].to_vec();
                    self.consume(n);
                    self.framing = Framing::Chunked {
                        remaining: remaining - n as u64,
                        after_data: true,
                    };
                    return Ok(Some(piece));
                }
            }
        }
    }

    /// Reads up to `n` body bytes (fewer only if the body ends first).
    pub fn read_body_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.read_body_some(n - out.len())? {
                Some(piece) => out.extend_from_slice(&piece),
                None => break,
            }
        }
        Ok(out)
    }

    /// Reads the rest of the body into `sink` and says how it ended.
    pub fn read_body_to_end(&mut self, mut sink: impl FnMut(&[u8])) -> BodyEnd {
        // Bounded: every turn consumes at least one byte or ends.
        loop {
            match self.read_body_some(1 << 20) {
                Ok(Some(piece)) => sink(&piece),
                Ok(None) => return BodyEnd::Complete,
                Err(error) => return BodyEnd::Aborted(error.to_string()),
            }
        }
    }

    /// Everything the server sends until it closes the connection, framing
    /// ignored (e.g. to prove nothing follows a HEAD response).
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = self.buffered().to_vec();
        self.start = self.buffer.len();
        let _ = self.stream.read_to_end(&mut rest);
        rest
    }

    /// A `Read` over the rest of the body; an abort is an `Err`.
    pub fn body_reader(&mut self) -> BodyReader<'_> {
        BodyReader {
            connection: self,
            pending: Vec::new(),
            at: 0,
        }
    }
}

/// See [`RawConnection::body_reader`].
pub struct BodyReader<'c> {
    connection: &'c mut RawConnection,
    pending: Vec<u8>,
    at: usize,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.pending.len() {
            match self.connection.read_body_some(1 << 20)? {
                Some(piece) => {
                    self.pending = piece;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.pending.len() - self.at);
        out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// A `/metrics` scrape: series (name and labels, labels sorted) → value, and
/// the `# HELP` / `# TYPE` lines by family.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub series: HashMap<String, f64>,
    pub help: HashMap<String, String>,
    pub types: HashMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                metrics.help.insert(name.to_owned(), help.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
                metrics
                    .types
                    .insert(name.to_owned(), kind.trim().to_owned());
            } else if !line.is_empty() && !line.starts_with('#') {
                let Some((series, value)) = split_sample(line) else {
                    continue;
                };
                let Ok(value) = value.parse::<f64>() else {
                    continue;
                };
                metrics.series.insert(normalise_series(series), value);
            }
        }
        metrics
    }

    /// The value of `name{labels}` (label order does not matter).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.series.get(&series_key(name, labels)).copied()
    }

    /// The value of `name{labels}`, 0 when the series is absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.series
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) = split_labels(series);
                series_name == name && wanted.iter().all(|w| series_labels.contains(w))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// Every series (normalised) of family `name`.
    pub fn series_of(&self, name: &str) -> Vec<(&str, f64)> {
        let mut found: Vec<(&str, f64)> = self
            .series
            .iter()
            .filter(|(series, _)| split_labels(series).0 == name)
            .map(|(series, value)| (series.as_str(), *value))
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        found
    }
}

/// `name{a="1",b="2"} 3` → (`name{a="1",b="2"}`, `3`); a timestamp after the
/// value is ignored.
fn split_sample(line: &str) -> Option<(&str, &str)> {
    let series_end = match line.find('{') {
        Some(open) => {
            let close = closing_brace(line, open)?;
            close + 1
        }
        None => line.find(' ')?,
    };
    let (series, rest) = line.split_at(series_end);
    let value = rest.split_whitespace().next()?;
    Some((series, value))
}

fn closing_brace(line: &str, open: usize) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (at, c) in line[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(open + at),
            _ => {}
        }
    }
    None
}

/// (`name`, [`k="v"`, …]) of a series.
fn split_labels(series: &str) -> (&str, Vec<String>) {
    let Some(open) = series.find('{') else {
        return (series, Vec::new());
    };
    let name = &series[..open];
    let inner = &series[open + 1..series.len() - 1];
    let mut labels = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in inner.chars() {
        match c {
            _ if escaped => {
                escaped = false;
                current.push(c);
            }
            '\\' if in_quotes => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ',' if !in_quotes => {
                if !current.trim().is_empty() {
                    labels.push(current.trim().to_owned());
                }
                current.clear();
            }
            _ => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        labels.push(current.trim().to_owned());
    }
    (name, labels)
}

fn normalise_series(series: &str) -> String {
    let (name, mut labels) = split_labels(series);
    if labels.is_empty() {
        return name.to_owned();
    }
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    parts.sort();
    format!("{name}{{{}}}", parts.join(","))
}

// ---------------------------------------------------------------------------
// /proc

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`); 0 if missing.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

pub fn vm_rss_bytes(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS") * 1024
}

/// Entries of `/proc/PID/fd`.
pub fn open_fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// One line of `/proc/PID/stat`, the parts the tests need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub parent: u32,
    pub command: String,
    /// `R`, `S`, `D`, `Z`, …
    pub state: char,
}

pub fn process_info(pid: u32) -> Option<ProcessInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let command = stat[open + 1..close].to_owned();
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let parent = rest.next()?.parse().ok()?;
    Some(ProcessInfo {
        pid,
        parent,
        command,
        state,
    })
}

/// Every process whose parent is `parent` (scans `/proc/*/stat`).
pub fn child_processes(parent: u32) -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_info)
        .filter(|info| info.parent == parent)
        .collect()
}

/// Children of `parent` that are zombies or named `git`.
pub fn zombie_or_git_children(parent: u32) -> Vec<ProcessInfo> {
    child_processes(parent)
        .into_iter()
        .filter(|info| {
            info.state == 'Z' || info.command == "git" || info.command.starts_with("git-")
        })
        .collect()
}

/// Whether a process with this id exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    process_info(pid).is_some_and(|info| info.state != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_704_164_645), "Tue, 02 Jan 2024 03:04:05 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn metrics_parse_and_normalise_labels() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\n\
                    a_total{outcome=\"ok\",format=\"tar\"} 3\nb 1.5\nc{x=\"a,}b\"} 2 1700000000\n";
        let metrics = Metrics::parse(text);
        assert_eq!(
            metrics.get("a_total", &[("format", "tar"), ("outcome", "ok")]),
            Some(3.0)
        );
        assert_eq!(metrics.get("b", &[]), Some(1.5));
        assert_eq!(metrics.get("c", &[("x", "a,}b")]), Some(2.0));
        assert_eq!(metrics.sum("a_total", &[("format", "tar")]), 3.0);
        assert_eq!(metrics.types["a_total"], "counter");
        assert_eq!(metrics.help["a_total"], "Things.");
    }

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

    #[test]
    fn pseudo_random_bytes_are_deterministic() {
        assert_eq!(pseudo_random_bytes(7, 100), pseudo_random_bytes(7, 100));
        assert_ne!(pseudo_random_bytes(7, 100), pseudo_random_bytes(8, 100));
        assert_eq!(pseudo_text(1, 1000).len(), 1000);
    }
}
