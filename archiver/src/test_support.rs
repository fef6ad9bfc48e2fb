//! Test helpers: a stub `git` and the settings and specs the cache and tail
//! tests share.
//!
//! The stub is a shell script in a temp dir. It ignores its arguments and
//! takes its behaviour from its own content and from files beside it (the
//! child runs with a cleared environment, so env vars cannot reach it):
//!
//! 1. it appends its pid to `runs` (how many children ran, and which);
//! 2. if the fifo `feed` exists, it opens it, before printing anything
//!    (the test holds the write end open, see [`StubGit::feed`], so this
//!    does not block);
//! 3. it prints the file `header` (a tar header block, [`TAR_HEADER`],
//!    unless made with [`StubGit::without_header`]), then the file `out`
//!    (may be empty): generations refuse output that does not start like
//!    the format asked for (`generate::FormatCheck`), and the specs ask
//!    for a tar;
//! 4. if it opened the feed, it copies it to stdout until the test closes
//!    it: the test decides what comes next, and when. A test that never
//!    sends nor closes has a generation that runs until killed, without a
//!    sleep;
//! 5. it exits with the status given to [`StubGit::new`].
//!
//! Because the feed is opened before anything is printed, once a test has
//! seen the first bytes it may close the feed at any time and the child
//! sees EOF (closed before the child opened it, the bytes sent would be
//! lost and the child would wait for a writer for ever).
//!
//! Generations run not in the spec's git dir but in a shadow of it
//! (`shadow`), made from the git dir's `HEAD`: each stub carries a
//! minimal git dir ([`StubGit::spec`] points at it), which git, being
//! the stub, never reads.
//!
//! The script is written by a `sh` child rather than by this process: a
//! file this process holds open for writing could leak, for an instant, into
//! a child forked by a test running in parallel, and exec-ing the script
//! meanwhile fails with `ETXTBSY`.

use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::cache::Settings;
use crate::generate::{Compression, Limits, Spec};
use gitball_core::url::Format;

/// The client a unit test's lookups are made for.
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A tar header block as far as the format check looks: zeros, with the
/// magic `ustar\0` at offset 257. Every stub but a
/// [`StubGit::without_header`] one prints it before `out`.
pub const TAR_HEADER: [u8; 512] = {
    let mut block = [0u8; 512];
    let magic = *b"ustar\0";
    let mut i = 0;
    while i < magic.len() {
        block[257 + i] = magic[i];
        i += 1;
    }
    block
};

/// The length of [`TAR_HEADER`].
pub const HEADER_LEN: u64 = TAR_HEADER.len() as u64;

/// What a stub made with `out` prints before the feed: [`TAR_HEADER`],
/// then `out`.
pub fn printed(out: &[u8]) -> Vec<u8> {
    [&TAR_HEADER[..], out].concat()
}

pub struct StubGit {
    dir: TempDir,
}

impl StubGit {
    /// A stub that prints [`TAR_HEADER`] and `out` (then the feed, if any)
    /// and exits `status`.
    pub fn new(out: &[u8], status: i32) -> StubGit {
        StubGit::with_header(&TAR_HEADER, out, status)
    }

    /// A stub that prints `out` alone (then the feed, if any), no tar
    /// header before it, and exits `status`.
    pub fn without_header(out: &[u8], status: i32) -> StubGit {
        StubGit::with_header(b"", out, status)
    }

    fn with_header(header: &[u8], out: &[u8], status: i32) -> StubGit {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        assert!(!root.contains('\''), "temp dir with a quote: {root}");
        std::fs::write(dir.path().join("header"), header).unwrap();
        std::fs::write(dir.path().join("out"), out).unwrap();
        // The git dir the specs name: what a shadow is made from.
        let git_dir = dir.path().join("owner/repo.git");
        std::fs::create_dir_all(git_dir.join("refs")).unwrap();
        std::fs::create_dir_all(git_dir.join("objects")).unwrap();
        std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let script = format!(
            "#!/bin/sh\n\
             PATH=/usr/local/bin:/usr/bin:/bin\n\
             echo $$ >> '{root}/runs'\n\
             fed=\n\
             if [ -p '{root}/feed' ]; then exec 3< '{root}/feed' || exit 2; fed=1; fi\n\
             cat '{root}/header' '{root}/out' || exit 2\n\
             if [ -n \"$fed\" ]; then cat <&3 || exit 2; fi\n\
             exit {status}\n"
        );
        let written = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("printf '%s' \"$2\" > \"$1\" && chmod 755 \"$1\"")
            .arg("sh")
            .arg(dir.path().join("git"))
            .arg(script)
            .status()
            .unwrap();
        assert!(written.success());
        StubGit { dir }
    }

    /// Prints [`TAR_HEADER`] and `out` and exits 0.
    pub fn printing(out: &[u8]) -> StubGit {
        StubGit::new(out, 0)
    }

    pub fn git(&self) -> PathBuf {
        self.dir.path().join("git")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The stub's git dir: `HEAD`, empty `refs/` and `objects/`.
    pub fn git_dir(&self) -> PathBuf {
        self.dir.path().join("owner/repo.git")
    }

    /// An uncompressed tar of commit `n` of the stub's repository: a
    /// distinct key per `n`.
    pub fn spec(&self, n: u32) -> Spec {
        Spec {
            git_dir: self.git_dir(),
            common_dir: self.git_dir(),
            repository: "owner/repo".to_owned(),
            commit: format!("{n:040x}"),
            format: Format::Tar,
            prefix: "repo-main/".to_owned(),
            subtree: None,
            compression: Compression::None,
            refs: None,
            commit_time: 1_234_567_890,
            confined_to: None,
            tar_writer: None,
        }
    }

    /// The pids of the children that ran, in order.
    pub fn runs(&self) -> Vec<u32> {
        match std::fs::read_to_string(self.dir.path().join("runs")) {
            Ok(text) => text.lines().map(|line| line.parse().unwrap()).collect(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => panic!("{error}"),
        }
    }

    /// Creates the fifo `feed` and opens its write end: from now on every
    /// child copies it after printing the header and `out`, until the
    /// returned [`Feed`] is dropped. Opened read-write, so the open does
    /// not wait for a reader (Linux), and bytes sent wait in the pipe for
    /// the child.
    pub fn feed(&self) -> Feed {
        let made = std::process::Command::new("mkfifo")
            .arg(self.feed_path())
            .status()
            .unwrap();
        assert!(made.success());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.feed_path())
            .unwrap();
        Feed(file)
    }

    /// Removes the fifo: children started from now on print without it
    /// (those that opened it read on until the `Feed` is dropped).
    pub fn unfeed(&self) {
        std::fs::remove_file(self.feed_path()).unwrap();
    }

    fn feed_path(&self) -> PathBuf {
        self.dir.path().join("feed")
    }

    /// Cache settings around this stub: room for `max_bytes`, archives up
    /// to 1 MiB, generous timeouts (tests that need a short one set it).
    pub fn settings(&self, max_bytes: u64) -> Settings {
        Settings {
            dir: self.cache_dir(),
            max_bytes,
            max_generations: 4,
            queue_timeout: Duration::from_secs(30),
            limits: Limits {
                timeout: Duration::from_secs(60),
                max_bytes: 1 << 20,
                memory: None,
            },
            git: self.git(),
            tar_writer: None,
        }
    }
}

impl Drop for StubGit {
    /// Releases a child blocked opening the feed (one started after the
    /// test dropped its `Feed`): a writer that opens and closes the fifo
    /// completes the child's `open`, and it reads EOF and exits.
    fn drop(&mut self) {
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.feed_path());
    }
}

/// The write end of the stub's fifo. Keep each `send` well under the pipe's
/// 64 KiB: the test's thread also runs the generation that drains it.
/// Dropping it ends the feed: children that already opened it (every child
/// whose first bytes were seen) read EOF. With two children running, both
/// read the one fifo: which gets what is anyone's guess.
pub struct Feed(std::fs::File);

impl Feed {
    pub fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }
}

/// Awaits `future`, failing the test after 10 s instead of hanging it.
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("the test timed out")
}

/// The names of the files in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        // The cache's own shadow git dirs.
        .filter(|name| !name.starts_with(crate::shadow::SHADOWS_PREFIX))
        .collect();
    names.sort();
    names
}

/// Returns once the kernel's clock, as a new file's ctime beside `path`
/// shows it, is past `path`'s ctime (its last change of any kind), so that
/// a write to `path` now moves its mtime, and a new link its ctime: where
/// timestamps are coarse (Linux before 6.13), a change in the tick the
/// file was last changed leaves its timestamps as they were.
pub fn past_the_clock_of(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let ctime = |path: &Path| {
        let metadata = std::fs::metadata(path).unwrap();
        (metadata.ctime(), metadata.ctime_nsec())
    };
    let changed = ctime(path);
    let probe = path.with_extension("ctime-probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        std::fs::write(&probe, b"").unwrap();
        if ctime(&probe) > changed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
    }
    std::fs::remove_file(&probe).unwrap();
}
