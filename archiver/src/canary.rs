//! Which bytes the configured git writes: a fingerprint of its tar writer
//! and of its `export-subst` placeholders, taken at start-up and again
//! whenever the binary is replaced.
//!
//! `tar` is git's own bytes, and every other format is made from them
//! (`docs/urls.md#byte-stability`), so a git release that changes its tar
//! writer changes archives under ETags that promise the old bytes: a cache
//! or CDN holding one and an archiver making the other would serve two
//! archives under one ETag, and the proxy would resume a download begun on
//! one replica with the other's bytes after a rolling upgrade. So at
//! start-up the archiver has its git archive a fixed canary tree, made with
//! `git fast-import` in a directory of its own, exactly as a generation
//! runs git ([`generate::command`]), and compares the tar's SHA-256 with
//! [`REFERENCE`], the one the reference git writes. The same bytes: every
//! ETag is what it always was. Other bytes: the fingerprint becomes part of
//! every archive's variant (`Spec::variant`), so archives of this git get
//! ETags and cache keys of their own, and a warning says so.
//!
//! git can be replaced under a running archiver (a package upgrade renames
//! a new binary over it), so before each generation [`TarWriter::check`]
//! compares a stat stamp of the binary with the one the fingerprint was
//! taken of, and takes the fingerprint anew when it changed; once git has
//! started, [`TarWriter::unchanged`] confirms the binary it ran is that
//! one; and requests look at most once a second ([`TarWriter::fresh`]). A
//! generation whose request was resolved under another fingerprint does
//! not run: it fails as `refs_changed`, which the request resolves again
//! under the current one (`http`).
//!
//! The canary holds what a tar writer and git's conversions encode: a
//! file, an executable, an empty file, a symlink, a path and a symlink
//! target too long for the ustar fields (pax headers), a name that is not
//! ASCII, a nested directory, a submodule, the commit id in the global
//! header, and `.gitattributes` asking for `export-subst`,
//! `export-ignore`, `eol=crlf`, `ident` and `working-tree-encoding`; it is
//! archived whole and as a subtree.
//!
//! `working-tree-encoding` is not git's alone: git re-encodes such a file
//! from UTF-8 with the host's iconv, so a replica on another libc (musl,
//! GNU libiconv), another glibc whose tables changed, a distribution that
//! patches or leaves out gconv modules (where iconv does not know the
//! encoding or cannot map a character, git writes the file unconverted),
//! or another byte order writes other bytes for the same commit. The
//! archiver's git gets no `GCONV_PATH`, `LOCPATH` or locale of the
//! server's (`generate::git_command`), so what differs is the host. The
//! canary holds one file each in `UTF-16` and `UTF-32` (the BOM and the
//! byte order, which glibc takes from the host and GNU libiconv and a git
//! built for musl write big-endian; a character beyond the BMP), and in
//! `SHIFT-JIS` and `EUC-JP` (table-driven multibyte encodings, with the
//! characters their tables are known to map differently: `SHIFT_JIS_TEXT`,
//! `EUC_JP_TEXT`). Another encoding whose table differs between hosts,
//! and a name one iconv knows and another does not, go unseen.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::generate::{self, Compression, Spec};
use crate::repo::stamp::Stamp;
use gitball_core::url::Format;

/// The SHA-256s of the canary's tars as git 2.47.3 writes them, with which
/// the golden hashes (`tests/archiver.rs`) were recorded. (git 2.39.5
/// writes the same `tar`, and another `subst`: its `%aI`/`%cI` say
/// `+00:00` where 2.47.3 says `Z`.)
///
/// Frozen for good: archives made under it carry ETags that caches keep for
/// a year. A git whose canary differs writes other bytes, and must get
/// other ETags; writing its hashes here would give it the old ones. Only a
/// new canary tree (a change of this file) may change these values, and
/// then only to what git 2.47.3 writes for it, on the reference host
/// (Debian 12, glibc 2.36, x86-64: the `working-tree-encoding` files are
/// its iconv's bytes), where archives then keep their ETags. (Changed
/// once so: the `encoding/` files, 2026-12-07.)
pub const REFERENCE: Reference = Reference {
    tar: "8cd5aec9c526b4ee3632a91906c845b6f2159c32ba51e1ba28e082bc05d0070d",
    subst: "667b48a8f3be37f4e6cd1331f6f1593d1908b6d699bff0a980329764d7e11ab9",
};

/// [`REFERENCE`]'s type: [`Fingerprint`]'s parts as constants.
pub struct Reference {
    pub tar: &'static str,
    pub subst: &'static str,
}

/// The prefix of the canary's entries. Stub gits in the tests pass a
/// command line that holds it through to the real git.
pub const PREFIX: &str = "gitball-canary/";

/// The canary commit's author and committer time.
const TIME: i64 = 1_700_000_000;

/// The whole canary, made and archived, takes at most this long (about
/// 30 ms; embedded mode's start has 60 s in all).
const TIMEOUT: Duration = Duration::from_secs(10);

/// A git that could not archive the canary is not run again for it sooner
/// than this (unless it is replaced again): meanwhile every generation
/// fails at once instead of each running a canary.
const RETRY_FAILED: Duration = Duration::from_secs(30);

/// Requests look at the binary at most this often (`TarWriter::fresh`).
const REQUEST_STAT_INTERVAL: Duration = Duration::from_secs(1);

/// What the `working-tree-encoding` files hold (UTF-8, as git stores
/// them) for UTF-16 and UTF-32: Latin, a BMP sign and a character beyond
/// the BMP (a surrogate pair in UTF-16). glibc writes a BOM and the host's
/// byte order (`ff fe`, little-endian, on x86-64, big-endian on s390x); GNU
/// libiconv writes big-endian with a BOM, and a git built with
/// `ICONV_OMITS_BOM` (musl's iconv writes no BOM) writes UTF-16BE after a
/// BOM of its own.
const UNICODE_TEXT: &str = "A \u{e9} \u{20ac} \u{1f600}\n";

/// What the Shift_JIS file holds: code points that Shift_JIS tables are
/// known to map differently, then kana, a kanji and a half-width katakana.
/// `\` and `~` are where JIS X 0201 Roman has YEN SIGN and OVERLINE:
/// glibc writes all four as the bytes `5c` and `7e`, tables that follow
/// JIS X 0201 strictly (GNU libiconv's) keep those bytes for YEN SIGN and
/// OVERLINE only. WAVE DASH (U+301C), MINUS SIGN, DOUBLE VERTICAL LINE,
/// CENT and NOT SIGN are the JIS X 0208 characters whose Unicode mapping
/// JIS, Microsoft (CP932) and IBM (IBM943) tables disagree on: glibc's
/// `IBM943` writes CENT and NOT SIGN as `7f`, its `SJIS` as `81 91` and
/// `81 ca`. FULLWIDTH TILDE (U+FF5E) is not here: glibc's `SJIS` has no
/// mapping for it, and git then writes the whole file unconverted (a
/// future git that failed instead would fail every canary).
const SHIFT_JIS_TEXT: &str = "\\ ~ \u{a5} \u{203e} \u{301c} \u{2212} \u{2016} \u{a2} \u{ac} \
                              \u{2015} \u{3042} \u{6f22} \u{ff71}\n";

/// What the EUC-JP file holds: the same, and FULLWIDTH TILDE, which
/// glibc's `EUC-JP` writes from JIS X 0212 (`8f a2 b7`) and eucJP-ms
/// (glibc's `EUC-JP-MS`) as the wave dash (`a1 c1`). The half-width
/// katakana takes EUC-JP's single shift (`8e`).
const EUC_JP_TEXT: &str = "\\ ~ \u{a5} \u{203e} \u{301c} \u{2212} \u{2016} \u{a2} \u{ac} \
                           \u{2015} \u{ff5e} \u{3042} \u{6f22} \u{ff71}\n";

/// The inline file `path` of `mode` holding `content`, for `fast-import`.
fn inline(mode: &str, path: &str, content: &str) -> String {
    format!(
        "M {mode} inline {path}\ndata {}\n{content}\n",
        content.len()
    )
}

/// `git fast-import` input of the canary: `main`, the tree above without
/// `export-subst`, and `subst`, which adds a file that asks for it.
fn fast_import_stream() -> String {
    let long_dir = "d".repeat(90);
    let long_target = "t".repeat(120);
    let conversions = "ignored.txt export-ignore\ncrlf.txt text eol=crlf\nident.txt ident\n\
                       encoding/utf-16.txt working-tree-encoding=UTF-16\n\
                       encoding/utf-32.txt working-tree-encoding=UTF-32\n\
                       encoding/shift-jis.txt working-tree-encoding=SHIFT-JIS\n\
                       encoding/euc-jp.txt working-tree-encoding=EUC-JP\n";
    let files: [(&str, &str, &str); 16] = [
        ("100644", ".gitattributes", conversions),
        ("100644", "ignored.txt", "not archived\n"),
        ("100644", "crlf.txt", "one\ntwo\n"),
        ("100644", "ident.txt", "$Id$\n"),
        ("100644", "README", "gitball canary\n"),
        ("100755", "bin/run.sh", "#!/bin/sh\nexit 0\n"),
        ("100644", "empty", ""),
        ("120000", "link", "README"),
        ("120000", "long-link", &long_target),
        ("100644", "naïve/fichier.txt", "non-ASCII name\n"),
        ("100644", "a/b/c/nested.txt", "nested\n"),
        ("100644", "a/b/crlf.txt", "three\nfour\n"),
        // `working-tree-encoding`: git re-encodes these from UTF-8 with the
        // host's iconv (`ENCODINGS`).
        ("100644", "encoding/utf-16.txt", UNICODE_TEXT),
        ("100644", "encoding/utf-32.txt", UNICODE_TEXT),
        ("100644", "encoding/shift-jis.txt", SHIFT_JIS_TEXT),
        ("100644", "encoding/euc-jp.txt", EUC_JP_TEXT),
    ];
    let commit = |branch: &str| {
        format!(
            "commit refs/heads/{branch}\n\
             author Canary <canary@example.invalid> {TIME} +0000\n\
             committer Canary <canary@example.invalid> {TIME} +0000\n\
             data 7\ncanary\n"
        )
    };
    let mut stream = commit("main");
    for (mode, path, content) in files {
        stream.push_str(&inline(mode, path, content));
    }
    stream.push_str(&inline(
        "100644",
        &format!("{long_dir}/{long_dir}/long-path.txt"),
        "long\n",
    ));
    // A submodule: git writes it as an empty directory.
    stream.push_str("M 160000 0123456789abcdef0123456789abcdef01234567 submodule\n\n");
    // A tag for `%(describe)`.
    stream.push_str("reset refs/tags/v1\nfrom refs/heads/main\n\n");
    stream.push_str(&commit("subst"));
    stream.push_str("from refs/heads/main\n");
    stream.push_str(&inline(
        "100644",
        ".gitattributes",
        &format!("{conversions}subst.txt export-subst\n"),
    ));
    stream.push_str(&inline(
        "100644",
        "subst.txt",
        "$Format:%H %h %T %P %an <%ae> %aN %ad %aI %cI %cr %cD %ah %ch %d %D \
         %(describe) %(describe:tags) %s%n%b%(trailers)$\n",
    ));
    stream.push('\n');
    stream
}

/// A git command in `git_dir`, set up as a generation's
/// (`generate::git_command`).
fn plumbing(git: &Path, git_dir: &Path) -> Command {
    let mut command = generate::git_command(git);
    command.arg(format!("--git-dir={}", git_dir.display()));
    command
}

/// Kills a child's process group when dropped armed: a canary cut by its
/// timeout leaves nothing running (a `--git` wrapper's children included).
struct KillGroup(Option<nix::unistd::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs `command` (with `input` on its stdin, if any) and returns its
/// stdout; an error names `what` and carries git's stderr.
async fn run(mut command: Command, input: Option<&[u8]>, what: &str) -> anyhow::Result<Vec<u8>> {
    if input.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().with_context(|| format!("{what}: spawn"))?;
    let mut group = KillGroup(
        child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(nix::unistd::Pid::from_raw),
    );
    // A child that exits early closes its stdin: what it said on stderr
    // is the reason, not the broken pipe.
    let mut written = Ok(());
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        written = stdin.write_all(input).await;
    }
    let output = child
        .wait_with_output()
        .await
        .with_context(|| format!("{what}: wait"))?;
    // Waited for: its pid may be reused from now on.
    group.0 = None;
    if !output.status.success() {
        anyhow::bail!(
            "{what}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.with_context(|| format!("{what}: write"))?;
    Ok(output.stdout)
}

/// The SHA-256s (hex) of the canary's tars as `git` writes them, made in
/// a new directory in `parent` that is removed afterwards.
pub async fn fingerprint(git: &Path, parent: &Path) -> anyhow::Result<Fingerprint> {
    // Named as the shadows are: one a killed archiver left is removed at
    // the next start (`Cache::open`).
    let dir = tempfile::Builder::new()
        .prefix(crate::shadow::SHADOWS_PREFIX)
        .tempdir_in(parent)
        .context("a directory for the canary")?;
    let git_dir = dir.path().join("canary.git");
    tokio::time::timeout(TIMEOUT, async {
        // Made as the shadows are, not by `git init`, whose defaults (the
        // object format, the ref storage) vary with git's build.
        for sub in ["objects/info", "objects/pack", "refs/heads", "refs/tags"] {
            std::fs::create_dir_all(git_dir.join(sub)).context("the canary's git dir")?;
        }
        std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n")
            .context("the canary's HEAD")?;
        std::fs::write(git_dir.join("config"), crate::shadow::CONFIG)
            .context("the canary's config")?;
        let mut import = plumbing(git, &git_dir);
        import.args(["fast-import", "--quiet"]);
        run(
            import,
            Some(fast_import_stream().as_bytes()),
            "git fast-import",
        )
        .await?;
        let mut hashes = Vec::new();
        for (branch, subtrees) in [
            ("main", &[None, Some("a")][..]),
            ("subst", &[Some("subst.txt")][..]),
        ] {
            let mut rev_parse = plumbing(git, &git_dir);
            rev_parse.args([
                "rev-parse",
                "--verify",
                &format!("refs/heads/{branch}^{{commit}}"),
            ]);
            let commit = run(rev_parse, None, "git rev-parse").await?;
            let mut hasher = Sha256::new();
            for subtree in subtrees {
                let spec = Spec {
                    git_dir: git_dir.clone(),
                    common_dir: git_dir.clone(),
                    repository: "gitball/canary".to_owned(),
                    commit: String::from_utf8_lossy(&commit).trim().to_owned(),
                    format: Format::Tar,
                    prefix: PREFIX.to_owned(),
                    subtree: subtree.map(str::to_owned),
                    compression: Compression::None,
                    commit_time: TIME,
                    refs: None,
                    confined_to: None,
                    tar_writer: None,
                };
                let command = generate::command(git, &spec, &git_dir);
                hasher.update(run(command, None, "git archive").await?);
            }
            hashes.push(hex::encode(hasher.finalize()));
        }
        let subst = hashes.pop().unwrap_or_default();
        let tar = hashes.pop().unwrap_or_default();
        Ok(Fingerprint { tar, subst })
    })
    .await
    .with_context(|| format!("the canary took more than {TIMEOUT:?}"))?
}

/// What the canary's tars hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    /// The tree without `export-subst`, whole and as a subtree: git's tar
    /// writer and the conversions every archive may meet.
    pub tar: String,
    /// The file that asks for `export-subst`: git's placeholders, which
    /// only archives whose tree asks for them carry.
    pub subst: String,
}

impl Fingerprint {
    /// What the variant is given (`Spec::tar_writer`): nothing for the
    /// reference's, else the first 16 hex digits of each part that is not
    /// the reference's, the placeholders' only for an archive whose tree
    /// asks for `export-subst`.
    pub fn variant_part(&self, export_subst: bool) -> Option<String> {
        let tar = (self.tar != REFERENCE.tar).then(|| format!("tar {}", &self.tar[..16]));
        let subst = (export_subst && self.subst != REFERENCE.subst)
            .then(|| format!("subst {}", &self.subst[..16]));
        match (tar, subst) {
            (None, None) => None,
            (Some(part), None) | (None, Some(part)) => Some(part),
            (Some(tar), Some(subst)) => Some(format!("{tar} {subst}")),
        }
    }

    /// The label of `gitball_archiver_tar_writer_info`.
    fn label(&self) -> String {
        let part = |hash: &str, reference: &str| {
            if hash == reference {
                "reference".to_owned()
            } else {
                hash[..16].to_owned()
            }
        };
        format!(
            "{}/{}",
            part(&self.tar, REFERENCE.tar),
            part(&self.subst, REFERENCE.subst)
        )
    }
}

/// The binary's stamp (`repo`'s, one `stat`): a binary renamed over it (a
/// package upgrade) or written anew has another. `None` when it is missing
/// or cannot be read: a generation then fails as git cannot be run, and
/// the next check stamps it again.
fn stamp_of(git: &Path) -> Option<Stamp> {
    match Stamp::of(git) {
        Ok(Stamp::Absent | Stamp::Unreadable | Stamp::UnderAFile) | Err(_) => None,
        Ok(stamp) => Some(stamp),
    }
}

/// A fingerprint, and the stamp of the binary it was taken of: what
/// [`TarWriter::check`] answers, and what [`TarWriter::unchanged`] confirms
/// once a generation's git has started.
#[derive(Clone, Debug)]
pub struct Checked {
    pub fingerprint: Fingerprint,
    stamp: Option<Stamp>,
}

/// The last canary's answer, for the binary of `stamp`.
#[derive(Clone, Debug)]
struct Taken {
    stamp: Option<Stamp>,
    /// The error's text when git could not archive the canary.
    result: Result<Fingerprint, String>,
    at: Instant,
    /// The last fingerprint taken, kept through a failure after it.
    last_good: Option<Fingerprint>,
}

/// The tar writer of the git an archiver runs (`--git`), kept current.
#[derive(Debug)]
pub struct TarWriter {
    git: PathBuf,
    /// Where canaries are made: the cache dir.
    parent: PathBuf,
    taken: Mutex<Option<Taken>>,
    /// One canary at a time; the others wait for its answer.
    checking: tokio::sync::Mutex<()>,
    /// Milliseconds after `epoch` when a request last looked at the binary.
    looked: AtomicU64,
    epoch: Instant,
    /// Run before each canary ([`TarWriter::before_each_canary`]).
    before_canary: std::sync::OnceLock<BeforeCanary>,
}

/// Makes room for a canary in the cache dir (`Cache::make_room_for_the_canary`).
struct BeforeCanary(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for BeforeCanary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeCanary")
    }
}

impl TarWriter {
    /// Nothing is run until [`TarWriter::check`].
    pub fn new(git: PathBuf, parent: PathBuf) -> TarWriter {
        TarWriter {
            git,
            parent,
            taken: Mutex::new(None),
            checking: tokio::sync::Mutex::new(()),
            looked: AtomicU64::new(0),
            epoch: Instant::now(),
            before_canary: std::sync::OnceLock::new(),
        }
    }

    /// Has `room` run before each canary from now on: the cache, once
    /// open, makes room for it in its dir. Set once; later calls are
    /// ignored.
    pub fn before_each_canary(&self, room: impl Fn() + Send + Sync + 'static) {
        let _ = self.before_canary.set(BeforeCanary(Arc::new(room)));
    }

    fn taken(&self) -> Option<Taken> {
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What [`Spec::variant`] is given for an archive (whose tree asks for
    /// `export-subst` or not): from the last fingerprint taken.
    pub fn current(&self, export_subst: bool) -> Option<String> {
        // Read in place, not through a copy of `Taken`: every request,
        // a small hit too, asks.
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()?
            .last_good
            .as_ref()?
            .variant_part(export_subst)
    }

    /// [`TarWriter::current`], after a look at the binary if no request
    /// looked within [`REQUEST_STAT_INTERVAL`] (one `stat` a second at
    /// most), and a canary if it was replaced: a request resolved after an
    /// upgrade gets the new git's ETag, not one no generation will make.
    pub async fn fresh(&self, export_subst: bool) -> Option<String> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let looked = self.looked.load(Ordering::Relaxed);
        let interval = REQUEST_STAT_INTERVAL.as_millis() as u64;
        if now.saturating_sub(looked) >= interval
            && self
                .looked
                .compare_exchange(looked, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && self
                .taken()
                .is_some_and(|taken| taken.stamp != stamp_of(&self.git))
        {
            // A failure is the generation's to report.
            let _ = self.check().await;
        }
        self.current(export_subst)
    }

    /// Whether the binary is still the one `checked` was taken of.
    pub fn unchanged(&self, checked: &Checked) -> bool {
        checked.stamp.is_some() && stamp_of(&self.git) == checked.stamp
    }

    /// The answer `taken` holds for the binary of `stamp`, if it may be
    /// used: a fingerprint, or a failure less than [`RETRY_FAILED`] old.
    fn usable(taken: &Taken, stamp: Option<Stamp>) -> Option<anyhow::Result<Checked>> {
        if stamp.is_none() || taken.stamp != stamp {
            return None;
        }
        match &taken.result {
            Ok(fingerprint) => Some(Ok(Checked {
                fingerprint: fingerprint.clone(),
                stamp,
            })),
            Err(error) if taken.at.elapsed() < RETRY_FAILED => Some(Err(anyhow::anyhow!(
                "{error} (the last canary's answer, retried {RETRY_FAILED:?} after it)"
            ))),
            Err(_) => None,
        }
    }

    /// The fingerprint of the git binary there now: the last one taken
    /// while the binary's stamp is the same (one `stat`), else taken anew
    /// by a canary. An error when git cannot archive the canary.
    pub async fn check(&self) -> anyhow::Result<Checked> {
        if let Some(answer) = self
            .taken()
            .and_then(|taken| TarWriter::usable(&taken, stamp_of(&self.git)))
        {
            return answer;
        }
        let _one = self.checking.lock().await;
        // The canary that held the lock may have answered for this binary.
        let before = self.taken();
        if let Some(answer) = before
            .as_ref()
            .and_then(|taken| TarWriter::usable(taken, stamp_of(&self.git)))
        {
            return answer;
        }
        let last_good = before.as_ref().and_then(|taken| taken.last_good.clone());
        // Stamped before and after: a canary that may have run two
        // binaries is not taken for either.
        let mut result = Err(anyhow::anyhow!("{} kept changing", self.git.display()));
        let mut stamp = None;
        // A `statvfs` and perhaps unlinks, off the serving threads.
        if let Some(BeforeCanary(room)) = self.before_canary.get() {
            let room = room.clone();
            let _ = tokio::task::spawn_blocking(move || room()).await;
        }
        for _ in 0..3 {
            let before_canary = stamp_of(&self.git);
            let answer = fingerprint(&self.git, &self.parent).await;
            if stamp_of(&self.git) == before_canary {
                stamp = before_canary;
                result = answer;
                break;
            }
        }
        let result =
            result.with_context(|| format!("{} cannot archive a canary tree", self.git.display()));
        let fingerprint = match result {
            Ok(fingerprint) => fingerprint,
            Err(error) => {
                *self.taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(Taken {
                    stamp,
                    result: Err(format!("{error:#}")),
                    at: Instant::now(),
                    last_good,
                });
                return Err(error);
            }
        };
        let label = fingerprint.label();
        match &last_good {
            None if fingerprint.variant_part(true).is_none() => {
                tracing::debug!(git = %self.git.display(), "git writes the reference tar");
            }
            None => tracing::warn!(
                git = %self.git.display(),
                writer = %label,
                "this git writes other bytes than the reference git (2.47.3) for the canary tree (tar/export-subst): those archives get ETags and cache keys of their own (docs/urls.md#byte-stability)"
            ),
            Some(before) if *before == fingerprint => tracing::info!(
                git = %self.git.display(),
                writer = %label,
                "git was replaced; it writes the same canary bytes"
            ),
            Some(before) => tracing::warn!(
                git = %self.git.display(),
                before = %before.label(),
                after = %label,
                "git was replaced by one that writes other canary bytes: those archives get ETags and cache keys of their own from now on"
            ),
        }
        if let Some(before) = &last_good {
            crate::metrics::tar_writer(&before.label(), false);
        }
        crate::metrics::tar_writer(&label, true);
        *self.taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(Taken {
            stamp,
            result: Ok(fingerprint.clone()),
            at: Instant::now(),
            last_good: Some(fingerprint.clone()),
        });
        Ok(Checked { fingerprint, stamp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/archiver.md` gives the canary's timeout and retry as these
    /// constants.
    /// (Docs review: a figure changed on one side only had nothing to
    /// fail.)
    #[test]
    fn the_figures_docs_give_for_the_canary_are_these_constants() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            [
                format!("within {} s; about 30 ms", TIMEOUT.as_secs()),
                format!(
                    "the canary is tried again {} s after",
                    RETRY_FAILED.as_secs()
                ),
            ],
        );
    }

    /// A git whose placeholders differ from the reference's but whose tar
    /// does not changes the variant of archives whose tree asks for
    /// `export-subst` only (docs/urls.md, byte stability: "those whose tree
    /// asks for `export-subst` when its placeholders differ, every archive
    /// when its tar does"): every other archive keeps its ETag and cache
    /// key. (Mutation review: giving every archive the placeholders' part
    /// passed every test, whose other git differed in both.)
    #[test]
    fn placeholders_that_differ_reach_only_archives_that_ask_for_them() {
        let other = "0123456789abcdef".repeat(4);
        let reference = Fingerprint {
            tar: REFERENCE.tar.to_owned(),
            subst: REFERENCE.subst.to_owned(),
        };
        assert_eq!(reference.variant_part(false), None);
        assert_eq!(reference.variant_part(true), None);
        let subst_only = Fingerprint {
            tar: REFERENCE.tar.to_owned(),
            subst: other.clone(),
        };
        assert_eq!(subst_only.variant_part(false), None);
        assert_eq!(
            subst_only.variant_part(true).as_deref(),
            Some("subst 0123456789abcdef")
        );
        let tar_only = Fingerprint {
            tar: other.clone(),
            subst: REFERENCE.subst.to_owned(),
        };
        assert_eq!(
            tar_only.variant_part(false).as_deref(),
            Some("tar 0123456789abcdef")
        );
        assert_eq!(tar_only.variant_part(true), tar_only.variant_part(false));
        let both = Fingerprint {
            tar: other.clone(),
            subst: other,
        };
        assert_eq!(both.variant_part(false), tar_only.variant_part(false));
        assert_ne!(both.variant_part(true), both.variant_part(false));
    }

    /// `tar_writer_info`'s `fingerprint` label is `{tar}/{subst}`, each part
    /// `reference` or the first 16 hex digits of the canary's SHA-256
    /// (docs/observability.md, label values: `reference/…` for git
    /// 2.39.5, whose placeholders alone differ). (Mutation review: another
    /// number of digits, or the parts in the other order, passed every
    /// test, which compare the label with the reference's only.)
    #[test]
    fn the_fingerprint_label_names_each_part_that_differs() {
        let tar = "0123456789abcdef".repeat(4);
        let subst = "fedcba9876543210".repeat(4);
        let label = |tar: &str, subst: &str| {
            Fingerprint {
                tar: tar.to_owned(),
                subst: subst.to_owned(),
            }
            .label()
        };
        assert_eq!(label(REFERENCE.tar, REFERENCE.subst), "reference/reference");
        assert_eq!(label(REFERENCE.tar, &subst), "reference/fedcba9876543210");
        assert_eq!(label(&tar, REFERENCE.subst), "0123456789abcdef/reference");
        assert_eq!(label(&tar, &subst), "0123456789abcdef/fedcba9876543210");
    }

    /// The git on this host (CI's) is the reference: its archives keep the
    /// ETags they always had. A host whose git fails this writes other
    /// bytes; `golden_hashes_pin_the_bytes_of_every_format` fails there too.
    /// Never "fixed" by writing another hash into `REFERENCE` (see there).
    #[tokio::test]
    async fn this_hosts_git_writes_the_reference_tar() {
        let parent = tempfile::tempdir().unwrap();
        let git = generate::find_git().unwrap();
        let fingerprint = fingerprint(&git, parent.path()).await.unwrap();
        assert_eq!(
            (fingerprint.tar.as_str(), fingerprint.subst.as_str()),
            (REFERENCE.tar, REFERENCE.subst),
            "{} writes other canary bytes than the reference git; REFERENCE is frozen",
            git.display()
        );
        let writer = TarWriter::new(git, parent.path().to_path_buf());
        assert_eq!(writer.check().await.unwrap().fingerprint, fingerprint);
        assert_eq!(writer.current(true), None);
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    /// A git whose iconv maps `working-tree-encoding` otherwise than the
    /// reference host's is not the reference: the canary's `encoding/`
    /// files catch it, the placeholders' part stays the reference's. The
    /// other gits are this host's git with a `GCONV_PATH` whose
    /// `gconv-modules` aliases `EUC-JP` to glibc's eucJP-ms and
    /// `SHIFT-JIS` to IBM943, as a host whose libc or gconv configuration
    /// has other tables for them (FULLWIDTH TILDE is `a1 c1`, not
    /// `8f a2 b7`; CENT SIGN `7f`, not `81 91`). (Security review: before
    /// the `encoding/` files both wrote the reference canary, so their
    /// archives of a tree in those encodings, other bytes, kept the
    /// reference ETags.)
    #[tokio::test]
    async fn a_git_whose_iconv_maps_otherwise_is_not_the_reference() {
        let parent = tempfile::tempdir().unwrap();
        let real = generate::find_git().unwrap();
        // The first aliases an encoding the canary does not use: the
        // control, `GCONV_PATH` alone changes nothing.
        for (encoding, table) in [
            ("EUC-KR", "UHC"),
            ("EUC-JP", "EUC-JP-MS"),
            ("SHIFT-JIS", "IBM943"),
        ] {
            let gconv = parent.path().join(format!("gconv-{encoding}"));
            std::fs::create_dir(&gconv).unwrap();
            std::fs::write(
                gconv.join("gconv-modules"),
                format!("alias\t{encoding}//\t{table}//\n"),
            )
            .unwrap();
            let git = parent.path().join(format!("git-{encoding}"));
            std::fs::write(
                &git,
                format!(
                    "#!/bin/sh\nGCONV_PATH='{gconv}' exec '{real}' \"$@\"\n",
                    gconv = gconv.display(),
                    real = real.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&git, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let fingerprint = fingerprint(&git, parent.path()).await.unwrap();
            if encoding == "EUC-KR" {
                assert_eq!(fingerprint.tar, REFERENCE.tar, "the control");
                continue;
            }
            assert_ne!(
                fingerprint.tar, REFERENCE.tar,
                "{encoding} as {table}: the reference canary"
            );
            assert_eq!(fingerprint.subst, REFERENCE.subst, "{encoding} as {table}");
            assert!(
                fingerprint
                    .variant_part(false)
                    .is_some_and(|part| part.starts_with("tar ")),
                "{encoding} as {table}"
            );
        }
    }

    /// A git replaced under a running archiver is fingerprinted anew at
    /// the next check; an unchanged one is not run again.
    #[tokio::test]
    async fn a_replaced_git_is_fingerprinted_anew() {
        let parent = tempfile::tempdir().unwrap();
        let real = generate::find_git().unwrap();
        let git = parent.path().join("git");
        let runs = parent.path().join("runs");
        let wrapper = |extra: &str| {
            let script = format!(
                "#!/bin/sh\necho run >> '{runs}'\ncase \" $* \" in\n\
                 *' archive '*) '{real}' \"$@\" || exit $?; {extra} ;;\n\
                 *) exec '{real}' \"$@\" ;;\nesac\n",
                runs = runs.display(),
                real = real.display()
            );
            // Renamed over the old one, as a package upgrade does.
            let new = parent.path().join("git.new");
            std::fs::write(&new, script).unwrap();
            std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            std::fs::rename(&new, &git).unwrap();
        };
        let runs_so_far = || {
            std::fs::read_to_string(&runs)
                .map(|text| text.lines().count())
                .unwrap_or(0)
        };
        wrapper("true");
        let writer = TarWriter::new(git.clone(), parent.path().to_path_buf());
        writer.check().await.unwrap();
        assert_eq!(writer.current(true), None, "the reference");
        let canary_runs = runs_so_far();
        writer.check().await.unwrap();
        assert_eq!(
            runs_so_far(),
            canary_runs,
            "an unchanged git is not run again"
        );
        wrapper("/usr/bin/head -c 512 /dev/zero");
        writer.check().await.unwrap();
        let other = writer.current(false);
        assert!(
            other
                .as_ref()
                .is_some_and(|other| other.starts_with("tar ")),
            "{other:?}"
        );
        assert!(
            writer
                .current(true)
                .is_some_and(|both| both.contains(" subst "))
        );
        wrapper("true");
        let checked = writer.check().await.unwrap();
        assert_eq!(writer.current(true), None, "back to the reference");
        assert!(writer.unchanged(&checked));

        // A git that cannot archive the canary: every check fails, and
        // the canary is not run again for it within `RETRY_FAILED`.
        wrapper("exit 1");
        assert!(!writer.unchanged(&checked), "a replaced binary is seen");
        let runs_before = runs_so_far();
        let error = writer.check().await.unwrap_err();
        assert!(format!("{error:#}").contains("canary"), "{error:#}");
        let failed_runs = runs_so_far();
        assert!(failed_runs > runs_before);
        assert!(writer.check().await.is_err());
        assert_eq!(
            runs_so_far(),
            failed_runs,
            "a failed canary is not run again at once"
        );
        // What requests are given stays the last fingerprint taken.
        assert_eq!(writer.current(true), None);
    }
}
