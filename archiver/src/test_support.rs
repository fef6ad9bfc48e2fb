//! Test helpers: a stub `git` and the settings and specs the cache and tail
//! tests share.
//!
//! The stub is a shell script in a temp dir. It ignores its arguments and
//! takes its behaviour from its own content and from files beside it (the
//! child runs with a cleared environment, so env vars cannot reach it):
//!
//! 1. it appends its pid to `runs` (how many children ran, and which);
//! 2. it prints the file `out` (the archive's first bytes; may be empty);
//! 3. if the fifo `feed` exists, it copies it to stdout until every writer
//!    closed it: the test decides what comes next and when (see [`Feed`]).
//!    With no writer ever opened, the child blocks in `open` until killed:
//!    a generation that never ends, without a sleep;
//! 4. it exits with the status given to [`StubGit::new`].
//!
//! The script is written by a `sh` child rather than by this process: a
//! file this process holds open for writing could leak, for an instant, into
//! a child forked by a test running in parallel, and exec-ing the script
//! meanwhile fails with `ETXTBSY`.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::cache::Settings;
use crate::generate::{Compression, Limits, Spec};
use gitball_core::url::Format;

pub struct StubGit {
    dir: TempDir,
}

impl StubGit {
    /// A stub that prints `out` (then the feed, if any) and exits `status`.
    pub fn new(out: &[u8], status: i32) -> StubGit {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        assert!(!root.contains('\''), "temp dir with a quote: {root}");
        std::fs::write(dir.path().join("out"), out).unwrap();
        let script = format!(
            "#!/bin/sh\n\
             echo $$ >> '{root}/runs'\n\
             cat '{root}/out' || exit 2\n\
             if [ -p '{root}/feed' ]; then cat '{root}/feed' || exit 2; fi\n\
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

    /// Prints `out` and exits 0.
    pub fn printing(out: &[u8]) -> StubGit {
        StubGit::new(out, 0)
    }

    pub fn git(&self) -> PathBuf {
        self.dir.path().join("git")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// The pids of the children that ran, in order.
    pub fn runs(&self) -> Vec<u32> {
        match std::fs::read_to_string(self.dir.path().join("runs")) {
            Ok(text) => text.lines().map(|line| line.parse().unwrap()).collect(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => panic!("{error}"),
        }
    }

    /// Creates the fifo `feed`: from now on every child blocks on it after
    /// printing `out`. The fifo is not opened: call [`StubGit::open_feed`]
    /// to drive the children, or never, to keep them blocked.
    pub fn make_feed(&self) {
        let made = std::process::Command::new("mkfifo")
            .arg(self.feed_path())
            .status()
            .unwrap();
        assert!(made.success());
    }

    /// Creates the fifo and opens its write end.
    pub fn feed(&self) -> Feed {
        self.make_feed();
        self.open_feed()
    }

    /// Opens the existing fifo's write end. Read-write, so the open does
    /// not wait for a reader (Linux): bytes sent before the child opens its
    /// end wait in the pipe.
    pub fn open_feed(&self) -> Feed {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.feed_path())
            .unwrap();
        Feed(file)
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
            },
            git: self.git(),
        }
    }
}

impl Drop for StubGit {
    /// Releases a child still blocked on the feed (a test that failed before
    /// it shut its cache down): a writer that opens and closes the fifo
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
/// Dropping it (with every child's copy of the bytes read) ends the feed.
pub struct Feed(std::fs::File);

impl Feed {
    pub fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }
}

/// An uncompressed tar of commit `n` of one repository: a distinct key per
/// `n`.
pub fn spec(n: u32) -> Spec {
    Spec {
        git_dir: PathBuf::from("/nonexistent/owner/repo.git"),
        repository: "owner/repo".to_owned(),
        commit: format!("{n:040x}"),
        format: Format::Tar,
        prefix: "repo-main/".to_owned(),
        subtree: None,
        compression: Compression::None,
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
        .collect();
    names.sort();
    names
}
