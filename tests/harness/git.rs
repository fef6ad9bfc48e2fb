//! Repositories built with the real `git`, and the directories tests work in.
//!
//! - [`Sandbox`]: a test's private temp dir: `repos/` (what a service
//!   serves) and `home/` (git's `HOME`), removed on drop.
//! - [`RepoBuilder`] and [`git_command`]: `git` in a clean environment
//!   (`HOME` is an empty temp dir, `GIT_CONFIG_NOSYSTEM=1`, fixed names,
//!   e-mails and dates), so the same test builds the same commits on every
//!   machine.
//! - [`pseudo_random_bytes`] and [`pseudo_text`]: deterministic content.
//! - [`dir_file_names`] and [`tree_snapshot`]: what a directory holds, to
//!   prove nothing was created or left behind.
//! - [`refs_settled`]: a repository's refs are older than the archiver's
//!   racy window, so what it reads of them is remembered.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::service::Archiver;

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
            let date = format!("@{time} +0000");
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
    /// hold (compare them with [`assert_same_stream`](crate::assert_same_stream)).
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

    /// A bare clone of `source` (over `file://`, so that `options` such as
    /// `--depth` or `--filter` apply) served as `{owner}/{name}`.
    pub fn bare_clone(
        &self,
        source: &RepoBuilder,
        owner: &str,
        name: &str,
        options: &[&str],
    ) -> RepoBuilder {
        let git_dir = self.repos().join(owner).join(format!("{name}.git"));
        let origin = format!("file://{}", source.dir().display());
        let git_dir_arg = git_dir.to_str().expect("a UTF-8 path");
        let mut args = vec!["clone", "-q", "--bare"];
        args.extend_from_slice(options);
        args.extend([origin.as_str(), git_dir_arg]);
        source.git(&args);
        RepoBuilder::open(&git_dir, &self.home())
    }

    /// An executable `sh` script `name` running `body` (a stub `--git`)
    /// for a `git archive` of a request, with a `PATH` of its own: the
    /// archiver gives git none. Anything else the archiver runs git for
    /// goes to the real git: the start-up canary (its plumbing, and its
    /// archive under the prefix `gitball-canary/`, `archiver/src/canary.rs`).
    pub fn write_stub(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\nPATH=/usr/local/bin:/usr/bin:/bin\n\
                 case \" $* \" in\n\
                 *' --prefix=gitball-canary/ '*) exec '{git}' \"$@\" ;;\n\
                 *' archive '*) ;;\n\
                 *) exec '{git}' \"$@\" ;;\n\
                 esac\n{body}",
                git = real_git().display()
            ),
        )
        .expect("write the stub");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod the stub");
        path
    }

    /// A fifo `name` and its write end, opened read-write so that opening
    /// does not wait for a reader: a line written waits in the pipe until a
    /// stub reads it (`read line < fifo`), which is how a test tells a stub
    /// when to go on.
    pub fn fifo(&self, name: &str) -> (PathBuf, fs::File) {
        let path = self.path(name);
        let made = Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", path.display());
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the fifo");
        (path, file)
    }

    /// A stub `--git` named `name` that runs the real git (the first `git`
    /// on `PATH`) and passes its first `pieces` pieces of 64 KiB on one
    /// every `gap_ms` milliseconds, and the rest as it comes: an archive
    /// whose first bytes come slowly but steadily. Streamed, so the first
    /// piece leaves once git wrote it (writing the whole archive into a
    /// file first took longer than a test's `--header-timeout` on a loaded
    /// machine); the stub exits with git's status.
    pub fn git_that_trickles(&self, name: &str, pieces: u32, gap_ms: u32) -> PathBuf {
        let status = self.path(&format!("{name}-status"));
        self.write_stub(
            name,
            &format!(
                "status='{status}'-$$\n\
                 {{ '{git}' \"$@\"; echo $? > \"$status\"; }} | {{\n\
                 i=0\n\
                 while [ $i -lt {pieces} ]; do\n\
                 /usr/bin/dd bs=65536 count=1 iflag=fullblock status=none\n\
                 /usr/bin/sleep {gap}\n\
                 i=$((i + 1))\n\
                 done\n\
                 /usr/bin/cat\n\
                 }}\n\
                 read code < \"$status\"\n\
                 rm -f \"$status\"\n\
                 exit $code\n",
                git = real_git().display(),
                status = status.display(),
                gap = f64::from(gap_ms) / 1000.0,
            ),
        )
    }

    /// A stub `--git` named `name` that runs the real git (the first `git`
    /// on `PATH`) into a file of its own (runs at once must not share one:
    /// two generations' output mixed was a `500`, a flake in CI), writes
    /// its first `first_bytes` bytes, then
    /// waits for a line on a fifo before it writes the rest; and the
    /// fifo's write end (see [`Sandbox::fifo`]). Each run of the stub takes
    /// one line.
    pub fn git_that_pauses(&self, name: &str, first_bytes: u64) -> (PathBuf, fs::File) {
        let (release, fifo) = self.fifo(&format!("{name}-release"));
        let output = self.path(&format!("{name}-output"));
        let stub = self.write_stub(
            name,
            &format!(
                "out='{out}'-$$\n\
                 '{git}' \"$@\" > \"$out\" || exit $?\n\
                 /usr/bin/head -c {first_bytes} \"$out\"\n\
                 read line < '{release}'\n\
                 /usr/bin/tail -c +{rest} \"$out\"\n\
                 status=$?\n\
                 rm -f \"$out\"\n\
                 exit $status\n",
                git = real_git().display(),
                out = output.display(),
                release = release.display(),
                rest = first_bytes + 1,
            ),
        );
        (stub, fifo)
    }
}

/// The first `git` on `PATH`, which stubs run.
pub fn real_git() -> PathBuf {
    let git = Command::new("sh")
        .args(["-c", "command -v git"])
        .output()
        .expect("look up git");
    PathBuf::from(
        String::from_utf8(git.stdout)
            .expect("git's path is UTF-8")
            .trim(),
    )
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

/// What a byte-series restart test starts from: `acme/plain`, one commit,
/// under `sandbox`'s repos, and a cache directory kept across archiver
/// restarts, where [`SeriesRepo::cached_file`] names an archive's file as
/// the archiver does (`Cache::key` over `Spec::variant`, then the SHA-256
/// of the bytes).
pub struct SeriesRepo {
    pub repo: RepoBuilder,
    pub commit: String,
    pub cache_dir: PathBuf,
    git_dir: PathBuf,
    _cache: TempDir,
}

impl SeriesRepo {
    pub fn new(sandbox: &Sandbox) -> SeriesRepo {
        let source = sandbox.source_repo("src/plain");
        source.write("README.md", "# plain\n");
        source.write("src/lib.rs", pseudo_text(3, 40_000));
        source.commit_all(1_704_164_645, "plain");
        let repo = source.clone_bare(&sandbox.repos().join("acme/plain.git"));
        let commit = repo.rev_parse("main");
        let git_dir = fs::canonicalize(repo.dir()).expect("canonical git dir");
        let cache = tempfile::tempdir().expect("cache dir");
        SeriesRepo {
            repo,
            commit,
            cache_dir: cache.path().join("cache"),
            git_dir,
            _cache: cache,
        }
    }

    /// The file of `bytes`, an archive of `main` as `ext` (`zip`,
    /// `tar.zst`, …) with the default prefix, in byte `series`, with
    /// `compression` (`{:?}` of the archiver's enum).
    pub fn cached_file(&self, series: &str, ext: &str, compression: &str, bytes: &[u8]) -> PathBuf {
        use sha2::{Digest, Sha256};
        let mut variant = Sha256::new();
        variant.update(format!("{series}\0{ext}\0{compression}\0plain-main/\0"));
        let variant = format!("{ext}-{}", &hex::encode(variant.finalize())[..16]);
        let mut key = Sha256::new();
        key.update(self.git_dir.as_os_str().as_encoded_bytes());
        key.update(b"\0");
        key.update(&self.commit);
        key.update(b"\0");
        key.update(variant);
        let key = hex::encode(key.finalize());
        self.cache_dir
            .join(format!("{key}-{}", hex::encode(Sha256::digest(bytes))))
    }

    /// A cold generation of `path` by an archiver over this cache, stopped
    /// after it: the body, and its file, named the way byte `series` names
    /// it ([`SeriesRepo::cached_file`]).
    pub fn generate(
        &self,
        sandbox: &Sandbox,
        path: &str,
        series: &str,
        ext: &str,
        compression: &str,
    ) -> (Vec<u8>, PathBuf) {
        let archiver = Archiver::start_with_cache(&sandbox.repos(), &self.cache_dir, &[]);
        let (body, cache_state) = archiver.get_body_and_cache(path);
        assert_eq!(cache_state, "miss");
        drop(archiver);
        // The key formula reproduces the archiver's: its file is named by it.
        let file = self.cached_file(series, ext, compression, &body);
        assert!(
            file.is_file(),
            "{file:?} in {:?}",
            fs::read_dir(&self.cache_dir).map(|d| d.count())
        );
        (body, file)
    }

    /// An archiver started again over this cache generates `path` anew,
    /// `current`'s bytes, whatever an older series left in the cache.
    pub fn assert_restart_generates(&self, sandbox: &Sandbox, path: &str, current: &[u8]) {
        let archiver = Archiver::start_with_cache(&sandbox.repos(), &self.cache_dir, &[]);
        let (body, cache_state) = archiver.get_body_and_cache(path);
        assert_eq!(cache_state, "miss", "the old series' file was served");
        assert!(body == current, "not the current series' bytes");
    }
}

/// How long the archiver waits before trusting a ref file's stamp
/// (`RACY_WINDOW` in `archiver/src/repo/stamp.rs`), plus a margin.
pub const SETTLED_AFTER: std::time::Duration = std::time::Duration::from_millis(2_500);

/// Every ref file, `packed-refs`, `HEAD` and the `refs/` directories of
/// `git_dir` are older than the archiver's racy window: what it reads of
/// them is remembered (a remembered ref, the refs digest).
pub fn refs_settled(git_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut pending = vec![
        git_dir.join("refs"),
        git_dir.join("packed-refs"),
        git_dir.join("HEAD"),
    ];
    let mut newest = 0.0_f64;
    while let Some(path) = pending.pop() {
        let Ok(metadata) = fs::metadata(&path) else {
            continue;
        };
        let changed = metadata.ctime() as f64 + metadata.ctime_nsec() as f64 / 1e9;
        let modified = metadata.mtime() as f64 + metadata.mtime_nsec() as f64 / 1e9;
        newest = newest.max(changed).max(modified);
        if metadata.is_dir() {
            pending.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    now - newest > SETTLED_AFTER.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_random_bytes_are_deterministic() {
        assert_eq!(pseudo_random_bytes(7, 100), pseudo_random_bytes(7, 100));
        assert_ne!(pseudo_random_bytes(7, 100), pseudo_random_bytes(8, 100));
        assert_eq!(pseudo_text(1, 1000).len(), 1000);
    }
}
