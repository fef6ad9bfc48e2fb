//! Finding a repository safely and resolving a ref to a commit, in-process.
//!
//! Every archive request starts here, so this is the hot path: a ref is
//! resolved with `gix` (tens of microseconds) instead of spawning
//! `git rev-parse` (about a millisecond and a half), and the opened
//! repositories are kept in a small LRU so their configuration is read once.
//!
//! Invariants:
//! - A repository is served only if the canonical paths of the directory
//!   asked for *and* of the git dir it leads to (after symlinks and `.git`
//!   files) lie under the canonical `--repos` root. A symlink or gitfile that
//!   leaves the root is "not found", like anything that is not a repository.
//!   A loose ref is never read through a symlink (the file or a directory on
//!   the way to it): a lookup or listing that meets one is "not found" too,
//!   whatever it leads to.
//! - Repositories are opened isolated: no environment variables, no system,
//!   global or user configuration, only the repository's own config. What is
//!   served depends on the repository alone, not on the server's `$HOME`.
//! - Resolution follows `git rev-parse`: a full hex id first, then the refs in
//!   git's "dwim" order, then an abbreviated id. The result is peeled to a
//!   commit; a ref to a tree or blob is "not found" (an archive of a tree
//!   would carry the current time and change bytes on every run).
//! - A push is visible to the very next request. What a ref resolved to is
//!   remembered together with a stat stamp (`stamp`) of every file the
//!   answer depends on: the loose ref files of the names tried before and at
//!   the match, the symbolic refs followed, and `packed-refs`. A remembered
//!   answer is used only while every one of those stamps is unchanged (one
//!   `statx` each), and an answer is remembered only when none of its files
//!   changed within `stamp::RACY_WINDOW`, so a coarse timestamp can never
//!   hide a change. The digest of all refs (export-subst, reachability) is
//!   kept the same way, stamped by every directory and loose file under
//!   `refs/` and `packed-refs`, and the reachable set is keyed by that
//!   digest. Objects are read afresh: `gix` rescans the pack directory when
//!   an object is missing, which picks up new packs and survives repacks.

use std::{
    collections::HashSet,
    fmt, fs, io,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use gix::{hash::ObjectId, object::Kind, refs::TargetRef};
use lru::LruCache;

use gitball_core::url::{RefKind, validate_name};

use crate::error::Error;

mod stamp;

use stamp::{RACY_WINDOW, Stamp, Stamps};

/// The owner under which a `--repos DIR` that is itself a repository is served.
pub const LOCAL_OWNER: &str = "local";

/// How many opened repositories are kept. Each holds its parsed config and
/// the object database's index of packs; a miss costs one open (well under a
/// millisecond), so the bound only needs to cover the repositories that are
/// popular at the same time.
const OPEN_REPOSITORIES: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// How many commits' "does its tree use export-subst" answers a repository
/// keeps.
const SUBSTITUTION_ANSWERS: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(count) => count,
    None => unreachable!(),
};

/// How many tree ids `CLEAN_TREES` keeps (about 80 bytes each).
const CLEAN_TREE_IDS: NonZeroUsize = match NonZeroUsize::new(64 * 1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// Trees in whose whole subtree no `.gitattributes` mentions `export-subst`.
/// A tree id names its content, so the fact holds in every repository: one
/// memo for the process, bounded. Without it, the first request for each
/// new commit walked every tree object before git was started (2,161 trees,
/// about 9 ms, on the benchmark's repository), though a new commit shares
/// almost all of its trees with the one before.
static CLEAN_TREES: std::sync::LazyLock<Mutex<LruCache<ObjectId, ()>>> =
    std::sync::LazyLock::new(|| Mutex::new(LruCache::new(CLEAN_TREE_IDS)));

/// Attributes blobs already judged, and whether they mention
/// `export-subst`: a blob's answer is its content's, so it is kept for the
/// process (bounded). A walk stopped by its budget (`Busy`) leaves what it
/// judged here, so the next request goes on past it.
static JUDGED_BLOBS: std::sync::LazyLock<Mutex<LruCache<ObjectId, bool>>> =
    std::sync::LazyLock::new(|| Mutex::new(LruCache::new(JUDGED_BLOB_IDS)));

/// How many blob answers `JUDGED_BLOBS` keeps: more than one walk can judge
/// (`ATTRIBUTES_BYTES_PER_WALK` / `MIN_BLOB_CHARGE`), 40 bytes each.
const JUDGED_BLOB_IDS: NonZeroUsize = match NonZeroUsize::new(64 * 1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// What each blob read costs the walk's budget at least.
const MIN_BLOB_CHARGE: u64 = 4 * 1024;

/// How many resolved refs a repository remembers (`Repository::resolve`).
const REMEMBERED_REFS: NonZeroUsize = match NonZeroUsize::new(256) {
    Some(count) => count,
    None => unreachable!(),
};

/// Most loose refs whose own stamps vouch for a remembered refs digest,
/// beside their directories'. Past this, the directories' stamps alone do:
/// git changes a loose ref by renaming a lock file into its directory (and
/// deletes one by unlinking it), which changes the directory's stamp; only
/// a ref file overwritten in place, which git never does, goes unseen
/// (attack: with 100,000 loose refs every request listed them all again,
/// 1.5 s of CPU each).
const MAX_STAMPED_REF_FILES: usize = 512;

/// Most directories under `refs/` whose stamps vouch for a remembered refs
/// digest; a repository with more lists its refs again on each call (one
/// listing at a time: `Repository::listing`).
const MAX_STAMPED_REF_DIRS: usize = 4096;

/// git's `SYMREF_MAXDEPTH`: a symbolic ref chain longer than this is broken.
const SYMREF_MAX_DEPTH: usize = 5;

/// Length of a full SHA-1 object id in hex.
const FULL_HEX_LEN: usize = 40;

/// Shortest abbreviated object id accepted (`docs/urls.md#refs`; git
/// itself takes 4).
const MIN_ABBREV_HEX_LEN: usize = 7;

/// The repositories under `--repos DIR`, with a cache of opened ones.
pub struct Repositories {
    /// Canonical `--repos` directory.
    root: PathBuf,
    layout: Layout,
    /// `"{owner}/{name}"` → opened repository.
    open: Mutex<LruCache<String, Arc<Repository>>>,
    /// `stamp::RACY_WINDOW`, for the repositories opened.
    racy_window: std::time::Duration,
}

/// How the `--repos` directory maps names to repositories.
#[derive(Debug)]
enum Layout {
    /// `DIR/{owner}/{repo}.git` or `DIR/{owner}/{repo}`.
    Owners,
    /// `DIR` is itself a repository, served as `local/{name}` and alone.
    Single { name: String },
}

impl Repositories {
    /// `root` is `--repos DIR`. If it is itself a repository (bare, or a work
    /// tree), it is served as `local/{dirname}` (a trailing `.git` dropped)
    /// and nothing else is; otherwise repositories are looked up as
    /// `DIR/{owner}/{repo}.git`, then `DIR/{owner}/{repo}`.
    pub fn new(root: &Path) -> io::Result<Repositories> {
        let root = fs::canonicalize(root)?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        let layout = if is_repository(&root) {
            let name = single_repository_name(&root)?;
            tracing::info!(root = %root.display(), "serving a single repository as {LOCAL_OWNER}/{name}");
            Layout::Single { name }
        } else {
            Layout::Owners
        };
        Ok(Repositories {
            root,
            layout,
            open: Mutex::new(LruCache::new(OPEN_REPOSITORIES)),
            racy_window: RACY_WINDOW,
        })
    }

    /// Remembers ref answers however recently their files changed, so
    /// tests exercise the remembered path right after each change.
    #[cfg(test)]
    fn trusting_recent_changes(mut self) -> Repositories {
        self.racy_window = std::time::Duration::ZERO;
        self
    }

    /// Finds `owner/name`. Invalid names are `Error::Url`; anything missing,
    /// not a repository, or leading outside the root is `RepoNotFound`.
    pub fn open(&self, owner: &str, name: &str) -> Result<Arc<Repository>, Error> {
        validate_name(owner)?;
        validate_name(name)?;
        let key = format!("{owner}/{name}");

        // The lock is held for map operations only; the freshness check (one
        // stat) and opening happen outside it.
        let cached = self.cache().get(&key).cloned();
        if let Some(repository) = cached {
            if repository.is_current() {
                return Ok(repository);
            }
            self.cache().pop(&key);
        }

        let mut repository = self.locate(owner, name)?;
        repository.racy_window = self.racy_window;
        let repository = Arc::new(repository);
        // Two requests racing here both open the repository; the later one
        // stays in the cache, which is harmless. One whose alternates files
        // changed too recently for their stamps to tell a rewrite of the
        // same size is opened again by the next request (review).
        if repository.alternates.settled(self.racy_window) {
            self.cache().put(key, Arc::clone(&repository));
        }
        Ok(repository)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<String, Arc<Repository>>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (each operation is a single call), so a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn locate(&self, owner: &str, name: &str) -> Result<Repository, Error> {
        match &self.layout {
            Layout::Single { name: served } => {
                if owner == LOCAL_OWNER && name == served {
                    // The operator named this directory: where its git dir
                    // lives (a linked work tree, a `.git` file) is theirs to choose.
                    open_candidate(&self.root, None)?.ok_or(Error::RepoNotFound)
                } else {
                    Err(Error::RepoNotFound)
                }
            }
            Layout::Owners => {
                let owner_dir = self.root.join(owner);
                for candidate in [owner_dir.join(format!("{name}.git")), owner_dir.join(name)] {
                    if let Some(repository) = open_candidate(&candidate, Some(&self.root))? {
                        if !self.is_canonical(&candidate, owner, name)
                            || !self.is_own_git_dir(&repository, owner, name)
                        {
                            tracing::warn!(
                                repository = %format_args!("{owner}/{name}"),
                                path = %candidate.display(),
                                "asked for under a name that is not the repository's own (a `.git` spelling or an alias); refused"
                            );
                            return Err(Error::RepoNotFound);
                        }
                        let checked =
                            layout_inside(&repository.git_dir, &repository.common_dir, &self.root)
                                .and_then(|objects| {
                                    alternates_stamps(&repository, &objects, &self.root)
                                });
                        match checked {
                            Ok(stamps) => {
                                let mut repository = repository;
                                repository.alternates = stamps;
                                return Ok(repository);
                            }
                            Err(outside) => {
                                tracing::warn!(
                                    repository = %format_args!("{owner}/{name}"),
                                    path = %outside.display(),
                                    "repository leads outside --repos (an alternate or a symlink); refused"
                                );
                                return Err(Error::RepoNotFound);
                            }
                        }
                    }
                }
                Err(Error::RepoNotFound)
            }
        }
    }
}

impl Repositories {
    /// Whether `owner/name` is the repository's one name: the directory it
    /// resolves to (after symlinks) is `DIR/{owner}/{name}.git` or
    /// `DIR/{owner}/{name}`. Routing, tokens and cache keys all use the name
    /// from the URL, so a second name for one repository (`widget.git` for
    /// `widget`, or a symlink alias) would let a request dodge a rule made
    /// for the first.
    fn is_canonical(&self, candidate: &Path, owner: &str, name: &str) -> bool {
        let Ok(directory) = fs::canonicalize(candidate) else {
            return false;
        };
        let Ok(relative) = directory.strip_prefix(&self.root) else {
            return false;
        };
        let mut parts = relative.iter().map(|part| part.to_str());
        let (Some(Some(found_owner)), Some(Some(leaf)), None) =
            (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let found_name = match leaf.strip_suffix(".git") {
            Some(stem) if !stem.is_empty() => stem,
            _ => leaf,
        };
        found_owner == owner && found_name == name
    }
}

impl Repositories {
    /// Whether the repository's git dir is its own: `DIR/{owner}/{name}.git`,
    /// `DIR/{owner}/{name}` (bare) or `DIR/{owner}/{name}/.git`, with objects
    /// and refs in it. A `.git` file or a linked work tree pointing at
    /// another repository's git dir would otherwise give that repository a
    /// second name.
    fn is_own_git_dir(&self, repository: &Repository, owner: &str, name: &str) -> bool {
        let owner_dir = self.root.join(owner);
        let own = [
            owner_dir.join(format!("{name}.git")),
            owner_dir.join(name),
            owner_dir.join(name).join(".git"),
        ];
        own.contains(&repository.git_dir) && repository.common_dir == repository.git_dir
    }
}

/// git ignores an attributes file of this size or more
/// (`ATTR_MAX_FILE_SIZE`).
const GIT_MAX_ATTRIBUTES_BYTES: u64 = 100 * 1024 * 1024;

/// The largest attributes blob read to see whether it mentions
/// `export-subst`; a larger one is taken as mentioning it.
const MAX_ATTRIBUTES_BLOB_BYTES: u64 = 1024 * 1024;

/// The attributes bytes one walk of a tree reads at most; past them, the
/// request is answered busy and the next one goes on.
const ATTRIBUTES_BYTES_PER_WALK: u64 = 64 * 1024 * 1024;

/// The most bytes of commit and tag objects read to resolve a ref, the
/// whole chain of tags included (git has no bound; a commit message of
/// hundreds of MB, pushed, was read whole on every request for it:
/// attack).
const MAX_PEELED_OBJECT_BYTES: u64 = 16 * 1024 * 1024;

/// The most object directories a repository may read from, its own and
/// its alternates'.
const MAX_OBJECT_DIRS: usize = 64;

/// How deep git follows alternates of alternates (its own limit).
const MAX_ALTERNATE_DEPTH: usize = 5;

/// The most bytes a loose ref file may hold: a ref is 41 bytes, a symbolic
/// one a line. git and gix read such a file whole.
const MAX_REF_FILE_BYTES: u64 = 64 * 1024;

/// The most bytes of `packed-refs`: a million refs (`MAX_LISTED_REFS`)
/// take 60 to 120 MB.
const MAX_PACKED_REFS_BYTES: u64 = 256 * 1024 * 1024;

/// The files of a git dir that git or gix read whole when they open it or
/// resolve a ref, and the most bytes each may hold. Every one must be a
/// regular file within its bound (attack: a 1 GiB `HEAD` or `config`
/// crashed the archiver out of memory, a FIFO hung a serving thread for
/// good, `config` linked to `/dev/zero` grew it until the kernel killed
/// it).
const GIT_FILES: [(&str, u64); 8] = [
    ("HEAD", MAX_REF_FILE_BYTES),
    ("config", 32 * 1024 * 1024),
    ("config.worktree", 32 * 1024 * 1024),
    ("commondir", MAX_REF_FILE_BYTES),
    ("gitdir", MAX_REF_FILE_BYTES),
    ("packed-refs", MAX_PACKED_REFS_BYTES),
    ("objects/info/alternates", MAX_REF_FILE_BYTES),
    ("shallow", MAX_PACKED_REFS_BYTES),
];

/// `Err(path)` when `path` exists and is not a regular file of at most
/// `max_bytes` (a symlink, a directory, a FIFO, a device or a socket, or
/// too large). Missing is fine.
fn regular_file_within(path: &Path, max_bytes: u64) -> Result<(), PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() <= max_bytes => Ok(()),
        Ok(_) => Err(path.to_path_buf()),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(())
        }
        Err(_) => Err(path.to_path_buf()),
    }
}

/// Checks the files git and gix read whole on opening the repository at
/// `directory` ([`GIT_FILES`]), before anything opens it: in the directory
/// (bare) and in its `.git`, in the git dir a `.git` file names, and in the
/// common dir a `commondir` names. `Err` names the first that is not a
/// regular file within its bound.
fn git_files_sane(directory: &Path) -> Result<(), PathBuf> {
    let dot_git = directory.join(".git");
    // A work tree's own files (a `config/` directory, a large `HEAD`) are
    // content, not the git dir's: with a `.git`, only it is checked
    // (review). A `.git` symlink to a directory is followed, as git does.
    let mut git_dirs = Vec::new();
    match fs::metadata(&dot_git) {
        Ok(meta) if meta.is_dir() => git_dirs.push(dot_git.clone()),
        Ok(_) => {
            regular_file_within(&dot_git, MAX_REF_FILE_BYTES)?;
            if let Some(target) = named_dir(&dot_git, directory, b"gitdir:") {
                git_dirs.push(target);
            }
        }
        Err(_) => git_dirs.push(directory.to_path_buf()),
    }
    let mut checked = Vec::new();
    while let Some(git_dir) = git_dirs.pop() {
        if checked.contains(&git_dir) {
            continue;
        }
        for (name, max_bytes) in GIT_FILES {
            regular_file_within(&git_dir.join(name), max_bytes)?;
        }
        alternates_bounded(&git_dir)?;
        if checked.len() < 4
            && let Some(common) = named_dir(&git_dir.join("commondir"), &git_dir, b"")
        {
            git_dirs.push(common);
        }
        checked.push(git_dir);
    }
    // A `.git` that is no git dir (a stale `.git` file): gix then opens
    // the directory itself as one, so its files are what it reads (review).
    let directory = directory.to_path_buf();
    if !checked.contains(&directory) && gix::discover::is_git(&dot_git).is_err() {
        for (name, max_bytes) in GIT_FILES {
            regular_file_within(&directory.join(name), max_bytes)?;
        }
        alternates_bounded(&directory)?;
    }
    Ok(())
}

/// Bounds what gix reads of the alternates of `git_dir`'s object directory
/// when it opens the repository, before it does: at most `MAX_OBJECT_DIRS`
/// directories, each alternates file a regular file within its bound. gix
/// resolves them in quadratic time (attack: 500 directories in 4 levels,
/// each listing the next level's, held a serving thread for minutes). Where
/// they lead is checked after the open ([`alternates_inside`]).
fn alternates_bounded(git_dir: &Path) -> Result<(), PathBuf> {
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let own = git_dir.join("objects");
    let mut pending = vec![own.clone()];
    while let Some(objects) = pending.pop() {
        if !seen.insert(objects.clone()) {
            continue;
        }
        if seen.len() > MAX_OBJECT_DIRS {
            return Err(objects);
        }
        let file = objects.join("info/alternates");
        regular_file_within(&file, MAX_REF_FILE_BYTES)?;
        let Ok(list) = fs::read(&file) else {
            continue;
        };
        // gix follows any depth, unquotes quoted entries, takes bytes that
        // are not UTF-8, and reads a relative entry of an alternate's list
        // from the repository's own object directory (review): every way
        // it could read an entry is counted, a quoted one refused, and a
        // list of more entries than the bound refused whole.
        let entries: Vec<&[u8]> = list
            .split(|&byte| byte == b'\n')
            .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
            .collect();
        if entries.len() > MAX_OBJECT_DIRS || entries.iter().any(|line| line.starts_with(b"\"")) {
            return Err(file);
        }
        for line in entries {
            let line =
                Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(line));
            let mut readings = vec![objects.join(line)];
            if objects != own && line.is_relative() {
                readings.push(own.join(line));
            }
            pending.extend(
                readings
                    .into_iter()
                    .filter_map(|reading| fs::canonicalize(reading).ok()),
            );
        }
    }
    Ok(())
}

/// The directory a small file (already checked) names, after `prefix`,
/// relative to `base` unless absolute.
fn named_dir(file: &Path, base: &Path, prefix: &[u8]) -> Option<PathBuf> {
    let text = fs::read(file).ok()?;
    let line = text.split(|&byte| byte == b'\n').next()?.trim_ascii();
    let named = line.strip_prefix(prefix)?.trim_ascii();
    let named = std::str::from_utf8(named).ok()?;
    (!named.is_empty()).then(|| base.join(named))
}

/// Checks what git and gix reach of a repository besides what its files
/// say: its alternates ([`alternates_inside`]), and no symlink in `HEAD` or
/// anywhere under an object directory (the repository's and each
/// alternate's), where a fan-out directory, a pack or a commit-graph
/// linked to another repository's would serve that repository's objects as
/// this one's. git never writes a symlink there; only a hand on the file
/// system does. Run when a repository is opened and again before each
/// generation (the layout may change while it stays open).
/// Returns the object directories, its own first.
pub fn layout_inside(
    git_dir: &Path,
    common_dir: &Path,
    root: &Path,
) -> Result<Vec<PathBuf>, PathBuf> {
    let head = git_dir.join("HEAD");
    if fs::symlink_metadata(&head).is_ok_and(|meta| meta.file_type().is_symlink()) {
        return Err(head);
    }
    let objects = alternates_inside(common_dir, root)?;
    for objects in &objects {
        without_symlinks(objects, OBJECTS_DEPTH)?;
    }
    Ok(objects)
}

/// The stamps of the alternates files of `objects` (each object directory
/// a repository reads), taken after checking them and checked again after
/// the stamps: gix reads these files again whenever an object is missing,
/// so a repository open while one changes must be checked anew
/// (`Repository::is_current`). `Err` names what leads outside.
fn alternates_stamps(
    repository: &Repository,
    objects: &[PathBuf],
    root: &Path,
) -> Result<Stamps, PathBuf> {
    let files = objects.iter().map(|dir| dir.join("info/alternates"));
    let stamps = Stamps::take(files).map_err(|_| objects[0].join("info/alternates"))?;
    // A change between the check and the stamps: seen by this check, or
    // by the stamps at the next request.
    if alternates_inside(&repository.common_dir, root)? != objects {
        return Err(objects[0].join("info/alternates"));
    }
    Ok(stamps)
}

/// `Err` names the first symlink on the way from `base` to the loose ref
/// `name` (for `refs/heads/x`: `refs`, `refs/heads`, `refs/heads/x`). The
/// walk ends where a component is missing or is a file: nothing below it
/// can be read.
///
/// The file itself must be a regular file within its bound
/// (`MAX_REF_FILE_BYTES`, `packed-refs` `MAX_PACKED_REFS_BYTES`): gix reads
/// it whole, and a FIFO would hang the read for good (attack).
fn ref_path_without_symlinks(base: &Path, name: &str) -> Result<(), PathBuf> {
    let max_bytes = if name == "packed-refs" {
        MAX_PACKED_REFS_BYTES
    } else {
        MAX_REF_FILE_BYTES
    };
    let mut path = base.to_path_buf();
    for component in name.split('/') {
        // Not a ref name git or gix would read; gix refuses it.
        if matches!(component, "" | "." | "..") {
            break;
        }
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.is_file() && meta.len() <= max_bytes => break,
            Ok(_) => return Err(path),
            Err(_) => break,
        }
    }
    Ok(())
}

/// Why the refs of a git dir are not listed.
#[derive(Debug)]
enum RefsRefused {
    /// `packed-refs`, `refs` or an entry under it is a symlink, a FIFO, a
    /// device or a socket, or a file too large for a ref.
    NotAFile(PathBuf),
    /// A directory under `refs` could not be read.
    Unreadable(PathBuf, io::Error),
}

/// Checks the ref files of the git dir `dir` that a listing reads:
/// `packed-refs`, `refs` and everything under it, at any depth, must not be
/// symlinks. Missing ones are fine: a linked work tree's git dir may have
/// no `refs`, and git removes a directory emptied by a deleted or packed
/// ref while we walk.
fn refs_without_symlinks(dir: &Path) -> Result<(), RefsRefused> {
    for top in ["packed-refs", "refs"] {
        ref_path_without_symlinks(dir, top).map_err(RefsRefused::NotAFile)?;
    }
    let mut pending = vec![dir.join("refs")];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(RefsRefused::Unreadable(dir, error)),
        };
        for entry in entries {
            let entry = entry.map_err(|error| RefsRefused::Unreadable(dir.clone(), error))?;
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(RefsRefused::Unreadable(entry.path(), error)),
            };
            if kind.is_dir() {
                pending.push(entry.path());
                continue;
            }
            // A symlink, a FIFO, a device or a socket, or a file too large
            // for a ref: gix would read through it, hang on it, or read it
            // whole (attack).
            let regular = kind.is_file()
                && match entry.metadata() {
                    Ok(meta) => meta.len() <= MAX_REF_FILE_BYTES,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(RefsRefused::Unreadable(entry.path(), error)),
                };
            if !regular {
                return Err(RefsRefused::NotAFile(entry.path()));
            }
        }
    }
    Ok(())
}

/// How deep [`without_symlinks`] looks under an object directory: its
/// fan-out directories' objects, `pack/*`, `info/commit-graphs/*`.
const OBJECTS_DEPTH: usize = 3;

/// `Err` names the first symlink under `dir`, `depth` levels down at most,
/// or a directory that cannot be listed.
fn without_symlinks(dir: &Path, depth: usize) -> Result<(), PathBuf> {
    let entries = fs::read_dir(dir).map_err(|_| dir.to_path_buf())?;
    for entry in entries {
        let entry = entry.map_err(|_| dir.to_path_buf())?;
        // `DirEntry::file_type` does not follow a symlink.
        let kind = entry.file_type().map_err(|_| entry.path())?;
        // Nor a FIFO, a device or a socket: a read of one (a pack's index,
        // the commit-graph) would hang or never end (attack).
        if !kind.is_file() && !kind.is_dir() {
            return Err(entry.path());
        }
        if kind.is_dir() && depth > 1 {
            without_symlinks(&entry.path(), depth - 1)?;
        }
    }
    Ok(())
}

/// Checks that every object directory the repository borrows from (its
/// `objects/info/alternates`, followed as git follows them) lies under
/// `root`; `Err` names the first one that does not. A fork network whose
/// shared pool is inside `--repos` is fine; an alternate elsewhere would
/// serve objects the operator never put under `--repos`.
/// Returns the object directories, its own first.
fn alternates_inside(common_dir: &Path, root: &Path) -> Result<Vec<PathBuf>, PathBuf> {
    // What git reads beside the objects: each must itself stay inside (a
    // symlinked `objects` or `refs` would lead out as surely as an
    // alternate).
    for part in ["objects", "refs", "packed-refs"] {
        let path = common_dir.join(part);
        match fs::canonicalize(&path) {
            Ok(canonical) if canonical.starts_with(root) => {}
            Err(error) if part == "packed-refs" && error.kind() == io::ErrorKind::NotFound => {}
            _ => return Err(path),
        }
    }
    let mut visited: Vec<PathBuf> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut pending = vec![(common_dir.join("objects"), 0)];
    while let Some((objects, depth)) = pending.pop() {
        // Each directory once, as git drops a repeated alternate: lists
        // naming the next one many times, chained, had made the check
        // exponential (attack: 16 names in 5 levels, 34 s a request), and
        // a list kept in a `Vec` quadratic (500 directories in 4 levels,
        // minutes). A repository borrows from a few; past
        // `MAX_OBJECT_DIRS`, gix's own reading of them would be slow too.
        if !seen.insert(objects.clone()) {
            continue;
        }
        if seen.len() > MAX_OBJECT_DIRS {
            return Err(objects);
        }
        visited.push(objects.clone());
        regular_file_within(&objects.join("info/alternates"), MAX_REF_FILE_BYTES)?;
        let list = match fs::read(objects.join("info/alternates")) {
            Ok(list) => list,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => return Err(objects.join("info/alternates")),
        };
        // Split as git does: on newlines only, nothing trimmed. A line git
        // would read differently from us (C-quoted, not UTF-8) or that does
        // not lead to an existing directory is refused rather than skipped:
        // an entry we cannot check is an entry we cannot allow.
        for line in list.split(|&byte| byte == b'\n') {
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let Ok(line) = std::str::from_utf8(line) else {
                return Err(objects.join("info/alternates"));
            };
            let alternate = objects.join(line);
            if line.starts_with('"') || depth >= MAX_ALTERNATE_DEPTH {
                return Err(alternate);
            }
            match fs::canonicalize(&alternate) {
                Ok(canonical) if canonical.starts_with(root) => {
                    pending.push((canonical, depth + 1));
                }
                _ => return Err(alternate),
            }
            // gix reads a relative entry of an alternate's list from the
            // repository's own object directory, not the list's (review):
            // where that leads must be inside too.
            if depth > 0 && Path::new(line).is_relative() {
                let as_gix_reads = common_dir.join("objects").join(line);
                match fs::canonicalize(&as_gix_reads) {
                    Ok(canonical) if canonical.starts_with(root) => {
                        pending.push((canonical, depth + 1));
                    }
                    Ok(_) => return Err(as_gix_reads),
                    Err(_) => {}
                }
            }
        }
    }
    Ok(visited)
}

impl fmt::Debug for Repositories {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repositories")
            .field("root", &self.root)
            .field("layout", &self.layout)
            .field("open", &self.cache().len())
            .finish()
    }
}

/// The name a `--repos DIR` that is a repository is served under.
fn single_repository_name(root: &Path) -> io::Result<String> {
    let dirname = root
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    let name = match dirname.strip_suffix(".git") {
        Some(stem) if !stem.is_empty() => stem,
        _ => dirname,
    };
    validate_name(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a repository, but its name {name:?} cannot appear in a URL \
                 (1 to 100 of A-Z a-z 0-9 _ . -, not starting with '.')",
                root.display()
            ),
        )
    })?;
    Ok(name.to_owned())
}

/// True when `dir` is a git dir (bare) or has one at `dir/.git` (directory or
/// gitfile). Only the layout is checked, nothing is opened.
fn is_repository(dir: &Path) -> bool {
    gix::discover::is_git(&dir.join(gix::discover::DOT_GIT_DIR)).is_ok()
        || gix::discover::is_git(dir).is_ok()
}

/// A repository's refs and `HEAD` as listed once: what the bytes of an
/// archive whose `export-subst` reads refs depend on. Its [`digest`] keys
/// such an archive, and git makes it from exactly these refs
/// (`shadow::Shadows::snapshot`), not from the live ones.
///
/// [`digest`]: RefsSnapshot::digest
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefsSnapshot {
    /// Every ref but `HEAD`, sorted by name: its name and its target, an
    /// object id in hex or `ref: {name}` for a symbolic ref.
    pub refs: Vec<(String, String)>,
    /// `HEAD`: `ref: {name}` (also when that branch is unborn), or the id
    /// of a detached `HEAD`.
    pub head: String,
}

impl RefsSnapshot {
    /// Lists `repo`'s refs and `HEAD`.
    fn of(repo: &gix::Repository) -> Result<RefsSnapshot, Error> {
        let mut refs = Vec::new();
        for_each_ref(repo, |reference| {
            let target = match reference.target() {
                TargetRef::Object(id) => id.to_hex().to_string(),
                TargetRef::Symbolic(name) => format!("ref: {}", name.as_bstr()),
            };
            refs.push((reference.name().as_bstr().to_string(), target));
        })?;
        refs.sort();
        let head = match repo.head_name() {
            Ok(Some(name)) => format!("ref: {}", name.as_bstr()),
            _ => match repo.head_id() {
                Ok(id) => id.to_hex().to_string(),
                Err(err) => return Err(Error::internal(format_args!("reading HEAD: {err}"))),
            },
        };
        Ok(RefsSnapshot { refs, head })
    }

    /// Reads the refs of the repository at `git_dir` (canonical, checked
    /// when it was first opened) afresh.
    /// A symlink anywhere under `refs/` (which gix would list, reading
    /// through it) makes the repository's refs unlisted: `RepoNotFound`.
    pub fn at(git_dir: &Path) -> Result<RefsSnapshot, Error> {
        let repo = open_isolated(git_dir)
            .map_err(|err| Error::internal(format_args!("opening {}: {err}", git_dir.display())))?
            .to_thread_local();
        let mut dirs = vec![repo.common_dir()];
        if repo.git_dir() != repo.common_dir() {
            dirs.push(repo.git_dir());
        }
        for dir in dirs {
            match refs_without_symlinks(dir) {
                Ok(()) => {}
                Err(RefsRefused::NotAFile(path)) => {
                    tracing::warn!(
                        path = %path.display(),
                        "a ref file is a symlink (which leads outside the repository), not a regular file, or too large; its refs are not listed"
                    );
                    return Err(Error::RepoNotFound);
                }
                Err(RefsRefused::Unreadable(path, error)) => {
                    return Err(Error::internal(format_args!(
                        "listing refs: {}: {error}",
                        path.display()
                    )));
                }
            }
        }
        RefsSnapshot::of(&repo)
    }

    /// The digest of every ref and `HEAD`.
    pub fn digest(&self) -> String {
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        for (name, target) in &self.refs {
            sha2::Digest::update(&mut hasher, format!("{name} {target}\n").as_bytes());
        }
        sha2::Digest::update(&mut hasher, format!("HEAD {}\n", self.head).as_bytes());
        hex::encode(sha2::Digest::finalize(hasher))
    }
}

/// Calls `each` with every ref of `repo` (not `HEAD`).
fn for_each_ref(
    repo: &gix::Repository,
    mut each: impl FnMut(gix::Reference<'_>),
) -> Result<(), Error> {
    let references = repo
        .references()
        .map_err(|err| Error::internal(format_args!("listing refs: {err}")))?;
    let all = references
        .all()
        .map_err(|err| Error::internal(format_args!("listing refs: {err}")))?;
    for (count, reference) in all.enumerate() {
        if count == MAX_LISTED_REFS {
            return Err(Error::internal(format_args!(
                "more than {MAX_LISTED_REFS} refs: not listed"
            )));
        }
        each(reference.map_err(|err| Error::internal(format_args!("reading a ref: {err}")))?);
    }
    Ok(())
}

/// The most refs a listing takes (for the refs digest, and the tips of the
/// reachability walk): 8 million refs in a `packed-refs` within its bound
/// had aborted the archiver out of memory (attack).
const MAX_LISTED_REFS: usize = 1_000_000;

/// Opens `path` with gix as the archiver reads every repository: isolated
/// from system and user config, and replace refs off, as for `git
/// --no-replace-objects`: what gix reads (the tree behind `substitutes`,
/// reachability, the refs) must be what git archives.
fn open_isolated(path: &Path) -> gix::Result<gix::ThreadSafeRepository> {
    gix::open::Options::isolated()
        .config_overrides(["core.useReplaceRefs=false"])
        .open(path)
}

/// Opens the repository at `path` if there is one. With `confine_to`, the
/// directory and the git dir it leads to must both be under that directory.
/// `Ok(None)` means "not here": missing, not a repository, or outside.
fn open_candidate(path: &Path, confine_to: Option<&Path>) -> Result<Option<Repository>, Error> {
    let inside = |canonical: &Path| confine_to.is_none_or(|root| canonical.starts_with(root));

    // Unreadable counts as missing: the client learns nothing either way.
    let Ok(directory) = fs::canonicalize(path) else {
        return Ok(None);
    };
    if !inside(&directory) {
        tracing::warn!(path = %path.display(), target = %directory.display(), "repository path leads outside --repos; ignored");
        return Ok(None);
    }
    if !directory.is_dir() {
        return Ok(None);
    }
    if let Err(file) = git_files_sane(&directory) {
        tracing::warn!(
            path = %path.display(),
            file = %file.display(),
            "a file git reads whole is not a regular file, or is too large; repository refused"
        );
        return Err(Error::RepoNotFound);
    }
    if !is_repository(&directory) {
        return Ok(None);
    }

    let repo = open_isolated(&directory)
        .map_err(|err| Error::internal(format_args!("opening {}: {err}", directory.display())))?;
    let local = repo.to_thread_local();
    // gix reads refs from files only: in a reftable repository every ref
    // would be "not found" (review: attack). Said as what it is instead.
    if let Some(storage) = local.config_snapshot().string("extensions.refStorage")
        && !storage.eq_ignore_ascii_case(b"files")
    {
        return Err(Error::internal(format_args!(
            "{}: refs in {storage} storage are not supported",
            directory.display()
        )));
    }
    let git_dir = fs::canonicalize(repo.git_dir()).map_err(|err| {
        Error::internal(format_args!(
            "resolving {}: {err}",
            repo.git_dir().display()
        ))
    })?;
    // A linked work tree keeps refs and objects in its common dir: confine it too.
    let common_dir = fs::canonicalize(local.common_dir()).map_err(|err| {
        Error::internal(format_args!(
            "resolving the common dir of {}: {err}",
            git_dir.display()
        ))
    })?;
    if !inside(&git_dir) || !inside(&common_dir) {
        tracing::warn!(path = %path.display(), git_dir = %git_dir.display(), "repository's git dir is outside --repos; ignored");
        return Ok(None);
    }
    let identity = FileIdentity::of(&git_dir)
        .map_err(|err| Error::internal(format_args!("stat {}: {err}", git_dir.display())))?;
    Ok(Some(Repository {
        repo,
        reachable: Mutex::new(None),
        substitutes: Mutex::new(LruCache::new(SUBSTITUTION_ANSWERS)),
        refs: Mutex::new(LruCache::new(REMEMBERED_REFS)),
        digest: Mutex::new(None),
        listing: Mutex::new(()),
        walking: Mutex::new(()),
        judging: Mutex::new(()),
        racy_window: RACY_WINDOW,
        git_dir,
        common_dir,
        identity,
        alternates: Stamps::default(),
        confined_to: confine_to.map(Path::to_path_buf),
    }))
}

/// Every commit reachable from the refs whose digest is `refs`.
#[derive(Debug)]
struct Reachable {
    refs: String,
    commits: HashSet<ObjectId>,
}

/// A resolved ref and the stamps of the files its answer came from.
#[derive(Clone, Debug)]
struct RememberedRef {
    stamps: Stamps,
    resolved: Resolved,
}

/// The refs digest and the stamps of everything under `refs/`.
#[derive(Clone, Debug)]
struct RememberedDigest {
    stamps: Stamps,
    digest: String,
}

/// Which directory a cached repository was opened from: if the path now
/// names another directory (deleted, replaced, renamed over), reopen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> io::Result<FileIdentity> {
        let metadata = fs::metadata(path)?;
        Ok(FileIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

/// One opened repository. Shared between requests; each call takes its own
/// thread-local `gix` handle, so calls may run on any thread concurrently.
#[derive(Debug)]
pub struct Repository {
    repo: gix::ThreadSafeRepository,
    /// The commits some ref reaches, for the refs state whose digest is
    /// kept beside them (`--require-reachable`).
    reachable: Mutex<Option<Reachable>>,
    /// Commit → whether its tree asks for `export-subst` (trees never
    /// change, so the answer is kept).
    substitutes: Mutex<LruCache<ObjectId, bool>>,
    /// User's ref (as in the URL) → what it resolved to, while the files
    /// the answer came from are unchanged.
    refs: Mutex<LruCache<String, RememberedRef>>,
    /// The refs digest, while nothing under `refs/` changed.
    digest: Mutex<Option<RememberedDigest>>,
    /// Held while the refs are listed for the digest: requests that find
    /// it unknown at once wait for one listing (which a large repository
    /// pays for in CPU and memory) and then find it known, rather than
    /// each listing them again.
    listing: Mutex<()>,
    /// Held while the history is walked for the reachable commits, for the
    /// same reason.
    walking: Mutex<()>,
    /// Held while a commit's trees are read for `export-subst`, for the
    /// same reason.
    judging: Mutex<()>,
    /// `stamp::RACY_WINDOW`; shorter in tests.
    racy_window: std::time::Duration,
    git_dir: PathBuf,
    /// Where objects and refs live: the git dir, except for a linked work
    /// tree.
    common_dir: PathBuf,
    identity: FileIdentity,
    /// The alternates files of every object directory, as checked at the
    /// open (none for a repository the operator named alone).
    alternates: Stamps,
    /// `--repos`, which everything the repository leads to must stay under
    /// (`layout_inside`); `None` for a repository the operator named alone.
    confined_to: Option<PathBuf>,
}

/// What a ref resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Full 40-hex commit id, lower case.
    pub commit: String,
    /// Branch or tag (short name) when the ref matched one, else `Commit`.
    pub kind: RefKind,
    /// Committer date, Unix seconds (for `Last-Modified`).
    pub committer_time: i64,
}

impl Repository {
    /// Canonical path of the git dir (its `HEAD`).
    pub fn git_dir(&self) -> &Path {
        &self.git_dir
    }

    /// Canonical path of the directory holding objects and refs.
    pub fn common_dir(&self) -> &Path {
        &self.common_dir
    }

    /// `--repos`, for a repository confined to it (see [`layout_inside`]).
    pub fn confined_to(&self) -> Option<&Path> {
        self.confined_to.as_deref()
    }

    /// True while the git dir still exists and is the directory that was opened.
    /// Whether the path still names the directory opened, and its
    /// alternates files are as they were checked (one `statx` each: gix
    /// would read a changed one at its next missing object, so an
    /// alternate made to lead outside after the open was served from;
    /// attack).
    fn is_current(&self) -> bool {
        FileIdentity::of(&self.git_dir).is_ok_and(|identity| identity == self.identity)
            && self.alternates.unchanged()
    }

    /// Resolves a user's ref (already validated by `url::validate_ref`) to a
    /// commit, in `git rev-parse` order, spawning no process.
    ///
    /// A ref name's answer is remembered while the files it came from keep
    /// their stamps (see the module docs): a hit costs one `statx` per file.
    pub fn resolve(&self, reference: &str) -> Result<Resolved, Error> {
        if parse_full_hex(reference).is_none() {
            let remembered = self.remembered_refs().get(reference).cloned();
            if let Some(remembered) = remembered {
                if remembered.stamps.unchanged() {
                    return Ok(remembered.resolved);
                }
                self.remembered_refs().pop(reference);
            }
        }
        let repo = self.repo.to_thread_local();
        let mut stamps = None;
        let (target, kind) = if let Some(id) = parse_full_hex(reference) {
            (id, RefKind::Commit)
        } else {
            // Stamped before reading: a change after this point leaves a
            // stamp that differs, or one too recent to be trusted.
            let candidates: Vec<String> = ref_candidates(reference).collect();
            let before = candidates
                .iter()
                .map(|name| self.stamp_refs(name))
                .collect::<Result<Vec<_>, _>>()?;
            let packed = Stamps::take([self.common_dir.join("packed-refs")]).map_err(stat_error)?;
            self.loose_ref_inside("packed-refs")?;
            let inside = |name: &str| self.loose_ref_inside(name);
            match find_reference(&repo, &candidates, &inside)? {
                Some(found) => {
                    // The candidates up to the match decide the answer;
                    // those after it do not.
                    let mut answer = packed;
                    for stamps in before.into_iter().take(found.tried) {
                        answer.extend(stamps);
                    }
                    // Symbolic refs' targets, stamped after reading: with
                    // their directory, whose stamp changes when one is
                    // created or deleted.
                    for target in &found.followed {
                        answer.extend(self.stamp_refs(target)?);
                        for path in self.ref_files(target) {
                            if let Some(parent) = path.parent() {
                                answer.add(parent.to_path_buf()).map_err(stat_error)?;
                            }
                        }
                    }
                    stamps = Some(answer);
                    (found.id, found.kind)
                }
                None => match find_abbreviated(&repo, reference)? {
                    Some(id) => (id, RefKind::Commit),
                    None => return Err(Error::RefNotFound),
                },
            }
        };
        let (commit, committer_time) = peel_to_commit(&repo, target)?;
        let resolved = Resolved {
            commit: commit.to_hex().to_string(),
            kind,
            committer_time,
        };
        if let Some(stamps) = stamps
            && stamps.settled(self.racy_window)
        {
            self.remembered_refs().put(
                reference.to_owned(),
                RememberedRef {
                    stamps,
                    resolved: resolved.clone(),
                },
            );
        }
        Ok(resolved)
    }

    fn remembered_refs(&self) -> std::sync::MutexGuard<'_, LruCache<String, RememberedRef>> {
        self.refs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The files git may read for the refs `names`: the loose ref in the
    /// common dir, and in the git dir too for a linked work tree (its
    /// `HEAD` and per-worktree refs live there).
    fn ref_files<'a>(&'a self, name: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
        let own = self.linked().then(|| self.git_dir.join(name));
        std::iter::once(self.common_dir.join(name)).chain(own)
    }

    /// Refuses the ref `name` when its loose file, or a directory on the
    /// way to it, is a symlink (also for `packed-refs`, which may have been
    /// swapped in after the open checked it): git and gix would read through it to a file
    /// anywhere on the host, and answer by what they found there (a ref, a
    /// broken ref, nothing). Refused as `RepoNotFound` whatever it leads
    /// to, as the refs listing refuses it ([`RefsSnapshot::at`]), the
    /// answer says nothing about that file.
    fn loose_ref_inside(&self, name: &str) -> Result<(), Error> {
        let own = self.linked().then_some(&self.git_dir);
        // gix's lookup of a name also opens these spellings of it, whatever
        // it is asked (attack: a FIFO at `tags/refs/main` hung the serving
        // thread, a symlink there was read through); `packed-refs` is read
        // alone.
        let spellings = if name == "packed-refs" {
            vec![name.to_owned()]
        } else if name == "HEAD" {
            // A pseudo ref missing from the git dir is looked up under
            // `refs/` (review).
            [
                "HEAD",
                "refs/HEAD",
                "refs/tags/HEAD",
                "refs/heads/HEAD",
                "refs/remotes/HEAD",
            ]
            .map(str::to_owned)
            .to_vec()
        } else {
            vec![
                name.to_owned(),
                format!("tags/{name}"),
                format!("heads/{name}"),
                format!("remotes/{name}"),
                format!("remotes/{name}/HEAD"),
            ]
        };
        for (base, name) in std::iter::once(&self.common_dir)
            .chain(own)
            .flat_map(|base| spellings.iter().map(move |name| (base, name)))
        {
            if let Err(symlink) = ref_path_without_symlinks(base, name) {
                tracing::warn!(
                    path = %symlink.display(),
                    "a loose ref is a symlink (which leads outside the repository), not a regular file, or too large; refused"
                );
                return Err(Error::RepoNotFound);
            }
        }
        Ok(())
    }

    fn stamp_refs(&self, name: &str) -> Result<Stamps, Error> {
        Stamps::take(self.ref_files(name)).map_err(stat_error)
    }

    /// [`Repository::substitutes`]'s answer for `commit` when it is kept:
    /// a lookup, without reading any object.
    pub fn known_substitutes(&self, commit: &str) -> Option<bool> {
        let id = ObjectId::from_hex(commit.as_bytes()).ok()?;
        self.substitutes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// Whether the archive of `commit` depends on more than the commit:
    /// true when any `.gitattributes` in its tree mentions `export-subst`.
    /// git then expands `$Format:…$` placeholders, and some of them read
    /// the refs (`%D`, `%d`, `%(describe)`) or `HEAD:.mailmap` (`%aN`), so
    /// the bytes change when a tag is pushed. Conservative on purpose: a
    /// placeholder that reads no ref is treated the same. The answer is
    /// kept per commit, and the walk skips every subtree already known to
    /// be clean (`CLEAN_TREES`): a new commit costs the trees it changed.
    pub fn substitutes(&self, commit: &str) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        if let Some(answer) = self.known_substitutes(commit) {
            return Ok(answer);
        }
        // One walk at a time per repository: requests for a new commit
        // that arrive together wait for it and find its answer (review).
        let _judging = self.judging.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(answer) = self.known_substitutes(commit) {
            return Ok(answer);
        }
        let repo = self.repo.to_thread_local();
        let tree = repo
            .find_commit(id)
            .and_then(|commit| Ok(commit.tree_id()?.detach()))
            .map_err(|err| Error::internal(format_args!("tree of {id}: {err}")))?;
        let (answer, _read) = tree_substitutes(&repo, tree, &CLEAN_TREES)?;
        self.substitutes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(id, answer);
        Ok(answer)
    }

    /// Whether some ref (or `HEAD`) reaches `commit`: a commit that was
    /// force-pushed away, or one that is only in an object pool shared with
    /// a private fork, is in the object store but in no history this
    /// repository publishes.
    ///
    /// The set of reachable commits is computed once per refs state (one
    /// walk of the history, using the commit-graph when there is one) and
    /// kept until a ref changes: about 30 bytes per commit.
    ///
    /// `refs` is the digest of the refs when the caller already took it
    /// (`refs_digest`); the listing is not repeated then.
    pub fn reaches(&self, commit: &str, refs: Option<String>) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        let refs = match refs {
            Some(refs) => refs,
            None => self.refs_digest()?,
        };
        let known = || {
            let reachable = self
                .reachable
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            reachable
                .as_ref()
                .filter(|known| known.refs == refs)
                .map(|known| known.commits.contains(&id))
        };
        if let Some(answer) = known() {
            return Ok(answer);
        }
        // One walk at a time: requests that arrive meanwhile (a crawler's
        // commit ids, after a push) take its answer instead of each walking
        // the history and holding its set of commits (attack: 64 at once
        // took 1.7 GB).
        let _walking = self.walking.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(answer) = known() {
            return Ok(answer);
        }
        let repo = self.repo.to_thread_local();
        let mut tips = Vec::new();
        for_each_ref(&repo, |mut reference| {
            // Refs to trees or blobs, and dangling ones, reach no commit.
            if let Ok(target) = reference.peel_to_id()
                && let Ok((tip, _)) = peel_to_commit(&repo, target.detach())
            {
                tips.push(tip);
            }
        })?;
        if let Ok(head) = repo.head_id()
            && let Ok((tip, _)) = peel_to_commit(&repo, head.detach())
        {
            tips.push(tip);
        }
        let walk = repo
            .rev_walk(tips)
            .use_commit_graph(true)
            .all()
            .map_err(|err| Error::internal(format_args!("walking the history: {err}")))?;
        let mut commits = HashSet::new();
        for info in walk {
            let info =
                info.map_err(|err| Error::internal(format_args!("walking the history: {err}")))?;
            commits.insert(info.id);
        }
        let answer = commits.contains(&id);
        *self
            .reachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Reachable { refs, commits });
        Ok(answer)
    }

    /// A digest of every ref and of `HEAD`: what ref-reading `export-subst`
    /// placeholders see. Two replicas with the same refs give the same
    /// digest, and so the same bytes.
    ///
    /// Remembered while every directory and loose ref under `refs/`,
    /// `packed-refs` and `HEAD` keep their stamps: git changes a ref by
    /// renaming a lock file into its directory, which changes the
    /// directory's stamp as well as the ref's.
    pub fn refs_digest(&self) -> Result<String, Error> {
        if let Some(digest) = self.known_refs_digest() {
            return Ok(digest);
        }
        let _listing = self.listing.lock().unwrap_or_else(PoisonError::into_inner);
        // Listed meanwhile by the request this one waited for.
        if let Some(digest) = self.known_refs_digest() {
            return Ok(digest);
        }
        // Stamped before listing, as for `resolve`.
        let stamps = self.stamp_all_refs()?;
        let digest = self.list_refs_digest()?;
        if let Some(stamps) = stamps
            && stamps.settled(self.racy_window)
        {
            *self.digest.lock().unwrap_or_else(PoisonError::into_inner) = Some(RememberedDigest {
                stamps,
                digest: digest.clone(),
            });
        }
        Ok(digest)
    }

    /// The refs digest if it is remembered and nothing changed since: no
    /// listing, a few `statx`.
    pub fn known_refs_digest(&self) -> Option<String> {
        let known = self
            .digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        known.stamps.unchanged().then_some(known.digest)
    }

    /// Whether some ref reaches `commit`, if that is known without reading
    /// the history or listing the refs: for the hot path, which then needs
    /// no blocking thread.
    pub fn reaches_known(&self, commit: &str, refs: Option<&str>) -> Option<bool> {
        let id = ObjectId::from_hex(commit.as_bytes()).ok()?;
        let refs = match refs {
            Some(refs) => refs.to_owned(),
            None => self.known_refs_digest()?,
        };
        let reachable = self
            .reachable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known = reachable.as_ref()?;
        (known.refs == refs).then(|| known.commits.contains(&id))
    }

    /// Stamps of what vouches for the refs digest: `packed-refs`, `HEAD`,
    /// every directory under `refs/` and, up to `MAX_STAMPED_REF_FILES` of
    /// them, the loose refs (past that, their directories alone). `None`
    /// past `MAX_STAMPED_REF_DIRS` directories (the digest is then not
    /// kept).
    fn stamp_all_refs(&self) -> Result<Option<Stamps>, Error> {
        let mut stamps = Stamps::default();
        stamps
            .add(self.common_dir.join("packed-refs"))
            .map_err(stat_error)?;
        let mut pending = vec![self.common_dir.join("refs")];
        stamps.add(self.git_dir.join("HEAD")).map_err(stat_error)?;
        if self.linked() {
            pending.push(self.git_dir.join("refs"));
        }
        let mut directories = 0;
        let mut files = Vec::new();
        while let Some(directory) = pending.pop() {
            if directories == MAX_STAMPED_REF_DIRS {
                return Ok(None);
            }
            if stamps.add(directory.clone()).map_err(stat_error)? == Stamp::Absent {
                continue;
            }
            directories += 1;
            let entries = fs::read_dir(&directory).map_err(stat_error)?;
            for entry in entries {
                let entry = entry.map_err(stat_error)?;
                if entry.file_type().map_err(stat_error)?.is_dir() {
                    pending.push(entry.path());
                } else if files.len() <= MAX_STAMPED_REF_FILES {
                    files.push(entry.path());
                }
            }
        }
        if files.len() <= MAX_STAMPED_REF_FILES {
            stamps.extend(Stamps::take(files).map_err(stat_error)?);
        }
        Ok(Some(stamps))
    }

    /// A linked work tree: some refs live in its own git dir.
    fn linked(&self) -> bool {
        self.git_dir != self.common_dir
    }

    /// Read afresh, as a generation reads them (`RefsSnapshot::at`): gix's
    /// long-lived handle reloads `packed-refs` only when its mtime is newer,
    /// and a rewrite within one clock tick would leave the two disagreeing
    /// for good (every such archive then failing as `refs_changed`).
    fn list_refs_digest(&self) -> Result<String, Error> {
        Ok(RefsSnapshot::at(&self.git_dir)?.digest())
    }

    /// True when `path` (a literal relative path, validated by
    /// `url::validate_subtree`) names a tree, file or symlink in `commit`'s
    /// tree. A submodule is not something `git archive` can include.
    pub fn has_path(&self, commit: &str, path: &str) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        let repo = self.repo.to_thread_local();
        let commit = repo
            .find_commit(id)
            .map_err(|err| Error::internal(format_args!("commit {id}: {err}")))?;
        let mut tree = commit
            .tree()
            .map_err(|err| Error::internal(format_args!("tree of {id}: {err}")))?;
        let mut components = path.split('/').peekable();
        while let Some(component) = components.next() {
            let Some(entry) = tree.find_entry(component) else {
                return Ok(false);
            };
            let (mode, entry_id) = (entry.mode(), entry.object_id());
            if components.peek().is_none() {
                return Ok(mode.is_tree() || mode.is_blob_or_symlink());
            }
            if !mode.is_tree() {
                return Ok(false);
            }
            tree = repo
                .find_tree(entry_id)
                .map_err(|err| Error::internal(format_args!("tree {entry_id}: {err}")))?;
        }
        // Only an empty path gets here, and that is no path at all.
        Ok(false)
    }
}

fn stat_error(error: io::Error) -> Error {
    Error::internal(format_args!("reading ref files' state: {error}"))
}

/// A full hex object id, in either case (as git accepts it).
fn parse_full_hex(reference: &str) -> Option<ObjectId> {
    if reference.len() == FULL_HEX_LEN && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        ObjectId::from_hex(reference.to_ascii_lowercase().as_bytes()).ok()
    } else {
        None
    }
}

/// The refs `reference` may mean, in git's `ref_rev_parse_rules` order.
///
/// git's first rule is the name itself: a full name (`refs/heads/x`) or a
/// root ref in the git dir. Of the root refs only `HEAD` is published:
/// `ORIG_HEAD`, `FETCH_HEAD` and the like are the server's own working state.
fn ref_candidates(reference: &str) -> impl Iterator<Item = String> + '_ {
    let as_is =
        (reference == "HEAD" || reference.starts_with("refs/")).then(|| reference.to_owned());
    as_is.into_iter().chain([
        format!("refs/{reference}"),
        format!("refs/tags/{reference}"),
        format!("refs/heads/{reference}"),
        format!("refs/remotes/{reference}"),
        format!("refs/remotes/{reference}/HEAD"),
    ])
}

/// The ref a user's name matched, and what reading it involved.
struct FoundRef {
    id: ObjectId,
    kind: RefKind,
    /// How many of the candidates were read, the match included.
    tried: usize,
    /// The symbolic refs' targets followed on the way, in any candidate.
    followed: Vec<String>,
}

/// The first existing ref of `candidates` (from `ref_candidates`),
/// followed through symbolic refs to the object it names, with the kind its
/// full name implies.
fn find_reference(
    repo: &gix::Repository,
    candidates: &[String],
    inside: &dyn Fn(&str) -> Result<(), Error>,
) -> Result<Option<FoundRef>, Error> {
    let mut followed = Vec::new();
    for (index, full_name) in candidates.iter().enumerate() {
        if let Some(id) = follow_ref(repo, full_name, inside, &mut followed)? {
            return Ok(Some(FoundRef {
                id,
                kind: ref_kind(full_name),
                tried: index + 1,
                followed,
            }));
        }
    }
    Ok(None)
}

/// Reads the ref named exactly `full_name` and follows symbolic refs to an
/// object id, noting each target in `followed`. A missing or dangling ref
/// (an unborn `HEAD`) is `None`, so the next candidate is tried, as git
/// does. `inside` checks each name before its file is read.
fn follow_ref(
    repo: &gix::Repository,
    full_name: &str,
    inside: &dyn Fn(&str) -> Result<(), Error>,
    followed: &mut Vec<String>,
) -> Result<Option<ObjectId>, Error> {
    let mut name = full_name.to_owned();
    for _ in 0..=SYMREF_MAX_DEPTH {
        // gix reads these from another git dir than the name says, where
        // the checks of `inside` do not look (attack: a symbolic ref to
        // `main-worktree/refs/heads/x` was read through a symlink there).
        // A served repository has no other work tree to name: not found.
        // Nor anything but `HEAD` or a name under `refs/` (a symbolic
        // ref's target may be any name gix accepts, and for `foo/bar` gix
        // opens `refs/foo/bar` and more, never `foo/bar`, so no answer
        // could have the asked name: review), nor a name that is not ASCII
        // (gix may open another spelling of it, precomposed).
        if !(name == "HEAD" || name.starts_with("refs/")) || !name.is_ascii() {
            return Ok(None);
        }
        inside(&name)?;
        let Some(reference) = find_exact(repo, &name)? else {
            return Ok(None);
        };
        match reference.target() {
            TargetRef::Object(id) => return Ok(Some(id.to_owned())),
            TargetRef::Symbolic(target) => match std::str::from_utf8(target.as_bstr()) {
                Ok(target) => {
                    name = target.to_owned();
                    followed.push(name.clone());
                }
                Err(_) => return Ok(None),
            },
        }
    }
    Ok(None)
}

/// Whether some `.gitattributes` under `root` mentions `export-subst`, and
/// how many tree objects were read to find out. Subtrees in `clean` are not
/// read; every subtree found clean is added to it. Iterative (depth-first),
/// so a deeply nested tree cannot overflow the stack.
fn tree_substitutes(
    repo: &gix::Repository,
    root: ObjectId,
    clean: &Mutex<LruCache<ObjectId, ()>>,
) -> Result<(bool, usize), Error> {
    /// A tree being walked: its id and the subtrees not yet visited;
    /// `cacheable` when none of them waits elsewhere in the walk (only a
    /// tree whose every subtree this walk saw clean is kept as clean).
    struct Frame {
        id: ObjectId,
        subtrees: Vec<ObjectId>,
        cacheable: bool,
    }
    let is_clean = |id: &ObjectId| {
        clean
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .is_some()
    };
    // The bytes of attributes blobs this walk may still read.
    let mut budget = ATTRIBUTES_BYTES_PER_WALK;
    // Trees read and found clean but not kept as clean while the walk ran
    // (a subtree of theirs waited elsewhere): all proven clean when the
    // whole walk finds nothing.
    let mut unproven: Vec<ObjectId> = Vec::new();
    // Every tree this walk has put on its stack, and those it found clean:
    // each is read once, and what waits to be read is at most the distinct
    // trees a push holds (attack: 1,000 nested trees of 100,000 entries
    // naming one empty tree, a 300 KB push, held 2 GB of ids and aborted
    // the archiver).
    let seen: std::cell::RefCell<HashSet<ObjectId>> = Default::default();
    let done: std::cell::RefCell<HashSet<ObjectId>> = Default::default();
    // `None`: the tree has a `.gitattributes` that mentions `export-subst`.
    let mut read = |id: ObjectId| -> Result<Option<Frame>, Error> {
        let tree = repo
            .find_tree(id)
            .map_err(|err| Error::internal(format_args!("tree {id}: {err}")))?;
        let mut subtrees = Vec::new();
        let mut cacheable = true;
        for entry in tree.iter() {
            let entry = entry.map_err(|err| Error::internal(format_args!("tree {id}: {err}")))?;
            if entry.mode().is_tree() {
                let subtree = entry.object_id();
                if done.borrow().contains(&subtree) {
                    continue;
                }
                if seen.borrow().contains(&subtree) {
                    // Waiting in another tree's list (or read and not
                    // proven yet): read there.
                    cacheable = false;
                    continue;
                }
                if is_clean(&subtree) {
                    continue;
                }
                if seen.borrow_mut().insert(subtree) {
                    subtrees.push(subtree);
                } else {
                    // Waiting in another tree's list: read there.
                    cacheable = false;
                }
            } else if is_attributes_path(entry.filename()) {
                let blob = entry.object_id();
                let known = JUDGED_BLOBS
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&blob)
                    .copied();
                let mentions = match known {
                    Some(mentions) => mentions,
                    None => {
                        let mentions = mentions_export_subst(repo, &blob, &mut budget)?;
                        JUDGED_BLOBS
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .put(blob, mentions);
                        mentions
                    }
                };
                if mentions {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Frame {
            id,
            subtrees,
            cacheable,
        }))
    };
    if is_clean(&root) {
        return Ok((false, 0));
    }
    let mut trees_read = 1;
    let Some(frame) = read(root)? else {
        return Ok((true, trees_read));
    };
    let mut stack = vec![frame];
    while let Some(frame) = stack.last_mut() {
        match frame.subtrees.pop() {
            Some(child) if is_clean(&child) => {}
            Some(child) => {
                trees_read += 1;
                match read(child)? {
                    Some(frame) => stack.push(frame),
                    None => return Ok((true, trees_read)),
                }
            }
            None => {
                // Every subtree of this one is clean, and so is it.
                // Unless a subtree of it waits elsewhere: then it stays
                // only seen, and a tree naming it is not kept clean either.
                let (id, cacheable) = (frame.id, frame.cacheable);
                stack.pop();
                if cacheable {
                    done.borrow_mut().insert(id);
                    clean
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .put(id, ());
                } else {
                    // Nor is the tree that names it (review: a parent of an
                    // unproven tree had been kept clean).
                    if let Some(parent) = stack.last_mut() {
                        parent.cacheable = false;
                    }
                    unproven.push(id);
                }
            }
        }
    }
    // Nothing mentions it anywhere: every tree read is clean.
    let mut clean = clean.lock().unwrap_or_else(PoisonError::into_inner);
    for id in unproven {
        clean.put(id, ());
    }
    Ok((false, trees_read))
}

/// Whether git reads a tree entry named `name` as a `.gitattributes` file.
/// git takes attributes from the index it builds of the tree, by path,
/// whatever the entry's mode: a symlink's target text or a gitlink's
/// object when it is a blob count too, and a name holding a slash
/// (`sub/.gitattributes`, which only a hand-made tree has) is the
/// attributes file of that path's directory.
fn is_attributes_path(name: &gix::bstr::BStr) -> bool {
    name == ".gitattributes" || name.ends_with(b"/.gitattributes")
}

/// Whether the object `id` may give git `export-subst` for an attributes
/// entry: a blob that mentions it, or an object the repository does not
/// have, which a push could add as such a blob later (the answer is kept
/// per tree, and git would read it then: review). An object of another
/// kind (a gitlink's commit) gives git no attributes, and its kind never
/// changes.
///
/// Its size is looked up first, and `budget` (the bytes a walk may still
/// read) pays for what is read: a blob git ignores for its size (100 MiB
/// or more, `ATTR_MAX_FILE_SIZE`) gives nothing; one larger than
/// `MAX_ATTRIBUTES_BLOB_BYTES` is taken as mentioning it unread, which
/// only keys the archive by the refs too (attack: 1,500 trees sharing one
/// 8 MB attributes blob, read whole for each on a serving thread, took
/// 23 s and held every other request). Past the budget the walk stops
/// with `Busy`, its answer not kept: what it found clean is
/// (`CLEAN_TREES`), so the next request goes on from there, and the
/// answer depends on the tree alone, never on what a replica had cached
/// (review: a budget that answered "mentions" gave one commit two ETags).
fn mentions_export_subst(
    repo: &gix::Repository,
    id: &gix::oid,
    budget: &mut u64,
) -> Result<bool, Error> {
    let header = repo
        .try_find_header(id)
        .map_err(|err| Error::internal(format_args!("object {id}: {err}")))?;
    let Some(header) = header else {
        return Ok(true);
    };
    if header.kind() != Kind::Blob || header.size() >= GIT_MAX_ATTRIBUTES_BYTES {
        return Ok(false);
    }
    if header.size() > MAX_ATTRIBUTES_BLOB_BYTES {
        return Ok(true);
    }
    let charge = header.size().max(MIN_BLOB_CHARGE);
    if charge > *budget {
        tracing::info!(
            "a tree's attributes files passed what one request reads; answering busy, the next goes on"
        );
        return Err(Error::Busy);
    }
    *budget -= charge;
    let object = repo
        .try_find_object(id)
        .map_err(|err| Error::internal(format_args!("object {id}: {err}")))?;
    Ok(object.is_none_or(|object| {
        object.kind == Kind::Blob
            && object
                .data
                .windows(12)
                .any(|window| window == b"export-subst")
    }))
}

/// Looks up one ref by its full name, loose or packed.
///
/// `gix`'s lookup also tries other spellings when the name is missing (its
/// own dwim); those answers carry another name and are discarded here, so
/// the order of `ref_candidates` is the only one that applies.
fn find_exact<'repo>(
    repo: &'repo gix::Repository,
    full_name: &str,
) -> Result<Option<gix::Reference<'repo>>, Error> {
    // A name gix considers invalid cannot exist as a ref.
    let Ok(partial) = <&gix::refs::PartialNameRef>::try_from(full_name) else {
        return Ok(None);
    };
    let found = repo
        .try_find_reference(partial)
        .map_err(|err| Error::internal(format_args!("reading ref {full_name}: {err}")))?;
    Ok(found.filter(|reference| reference.name().as_bstr() == full_name))
}

/// `Branch`/`Tag` by the matched ref's namespace; `HEAD`, remotes and
/// anything else are labelled by their commit.
fn ref_kind(full_name: &str) -> RefKind {
    if let Some(branch) = full_name.strip_prefix("refs/heads/") {
        RefKind::Branch(branch.to_owned())
    } else if let Some(tag) = full_name.strip_prefix("refs/tags/") {
        RefKind::Tag(tag.to_owned())
    } else {
        RefKind::Commit
    }
}

/// An abbreviated object id of 7 to 39 hex digits naming exactly one object.
fn find_abbreviated(repo: &gix::Repository, reference: &str) -> Result<Option<ObjectId>, Error> {
    if !(MIN_ABBREV_HEX_LEN..FULL_HEX_LEN).contains(&reference.len())
        || !reference.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(None);
    }
    let Ok(prefix) = gix::hash::Prefix::from_hex(&reference.to_ascii_lowercase()) else {
        return Ok(None);
    };
    match repo
        .objects
        .lookup_prefix(prefix, None)
        .map_err(|err| Error::internal(format_args!("looking up {reference}: {err}")))?
    {
        Some(Ok(id)) => Ok(Some(id)),
        // Ambiguous: git would refuse too (unless a commit-only hint could
        // settle it, which is rare at 7+ digits and not worth guessing).
        Some(Err(())) | None => Ok(None),
    }
}

/// Peels annotated tags (nested ones too) down to a commit and reads its
/// committer time. A tree, a blob or a missing object is "not found".
fn peel_to_commit(repo: &gix::Repository, mut id: ObjectId) -> Result<(ObjectId, i64), Error> {
    // No depth bound: object ids are hashes of their content, so a chain of
    // tags cannot loop.
    // The bound is on the whole chain: 1,200 chained tags of 16 MB each
    // had cost seconds of a serving thread per request (attack).
    let mut read_bytes = 0u64;
    loop {
        let header = repo
            .try_find_header(id)
            .map_err(|err| Error::internal(format_args!("reading object {id}: {err}")))?
            .ok_or(Error::RefNotFound)?;
        if matches!(header.kind(), Kind::Tree | Kind::Blob) {
            return Err(Error::RefNotFound);
        }
        read_bytes = read_bytes.saturating_add(header.size());
        if read_bytes > MAX_PEELED_OBJECT_BYTES {
            tracing::warn!(
                object = %id,
                bytes = header.size(),
                "a commit or tag object larger than the archiver reads; refused"
            );
            return Err(Error::TooLarge);
        }
        let object = repo
            .try_find_object(id)
            .map_err(|err| Error::internal(format_args!("reading object {id}: {err}")))?
            .ok_or(Error::RefNotFound)?;
        match object.kind {
            Kind::Commit => {
                let committer = object
                    .try_to_commit_ref_iter()
                    .ok_or_else(|| Error::internal(format_args!("commit {id} is not a commit")))?
                    .committer()
                    .map_err(|err| Error::internal(format_args!("committer of {id}: {err}")))?;
                return Ok((id, committer.seconds()));
            }
            Kind::Tag => {
                id = object
                    .try_to_tag_ref_iter()
                    .ok_or_else(|| Error::internal(format_args!("tag {id} is not a tag")))?
                    .target_id()
                    .map_err(|err| Error::internal(format_args!("target of tag {id}: {err}")))?;
            }
            Kind::Tree | Kind::Blob => return Err(Error::RefNotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const C1_TIME: i64 = 1_600_000_000;
    const C2_TIME: i64 = 1_700_000_000;
    const C3_TIME: i64 = 1_710_000_000;

    /// Runs `git` in `dir` with a fixed identity and dates, and no
    /// configuration but the repository's own.
    fn git_at(dir: &Path, time: i64, args: &[&str]) -> String {
        let date = format!("{time} +0000");
        let mut command = Command::new("git");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GIT_") {
                command.env_remove(key);
            }
        }
        let output = command
            .current_dir(dir)
            .env("HOME", dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "A U Thor")
            .env("GIT_AUTHOR_EMAIL", "author@example.com")
            .env("GIT_COMMITTER_NAME", "C O Mitter")
            .env("GIT_COMMITTER_EMAIL", "committer@example.com")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .args(["-c", "init.defaultBranch=main"])
            .args(args)
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        git_at(dir, C2_TIME, args)
    }

    /// What git itself says `reference` means, as a commit.
    fn rev_parse(git_dir: &Path, reference: &str) -> Option<String> {
        let output = Command::new("git")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .arg("--git-dir")
            .arg(git_dir)
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{reference}^{{commit}}"))
            .output()
            .expect("git runs");
        output
            .status
            .success()
            .then(|| String::from_utf8(output.stdout).unwrap().trim().to_owned())
    }

    fn committer_time(git_dir: &Path, commit: &str) -> i64 {
        let out = git(
            git_dir,
            &[
                "--git-dir",
                git_dir.to_str().unwrap(),
                "show",
                "-s",
                "--format=%ct",
                commit,
            ],
        );
        out.parse().unwrap()
    }

    /// Resolves `reference`, checks the commit against `git rev-parse` and the
    /// time against `git show`, and returns what was resolved.
    #[track_caller]
    fn assert_resolves(repository: &Repository, reference: &str, kind: RefKind) -> Resolved {
        let resolved = repository
            .resolve(reference)
            .unwrap_or_else(|err| panic!("{reference}: {err:?}"));
        let expected = rev_parse(repository.git_dir(), reference).expect("git resolves it too");
        assert_eq!(resolved.commit, expected, "{reference}");
        assert_eq!(resolved.kind, kind, "{reference}");
        assert_eq!(
            resolved.committer_time,
            committer_time(repository.git_dir(), &expected),
            "{reference}"
        );
        resolved
    }

    #[track_caller]
    fn assert_not_found(repository: &Repository, reference: &str) {
        let result = repository.resolve(reference);
        assert!(
            matches!(result, Err(Error::RefNotFound)),
            "{reference}: {result:?}"
        );
        assert_eq!(
            rev_parse(repository.git_dir(), reference),
            None,
            "git resolves {reference}"
        );
    }

    #[track_caller]
    fn assert_repo_not_found(repositories: &Repositories, owner: &str, name: &str) {
        let result = repositories.open(owner, name);
        assert!(
            matches!(result, Err(Error::RepoNotFound)),
            "{owner}/{name}: {result:?}"
        );
    }

    /// `repos/acme/widget`, a work tree with this history:
    ///
    /// ```text
    /// c1 (C1_TIME)  README, src/main.rs, src/lib/mod.rs   feature/x, v0.9, same (branch)
    /// c2 (C2_TIME)  README changed                        main, v1.0 (annotated), nested
    ///               (tag of v1.0), same (tag), tree-tag, blob-tag
    /// refs/remotes/origin/main -> c1, refs/remotes/origin/HEAD -> origin/main
    /// ```
    ///
    /// and `outside/secret`, a repository outside the root.
    struct Fixture {
        _temp: tempfile::TempDir,
        base: PathBuf,
        root: PathBuf,
        widget: PathBuf,
        c1: String,
        c2: String,
    }

    fn fixture() -> Fixture {
        let temp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(temp.path()).unwrap();
        let root = base.join("repos");
        let widget = root.join("acme/widget");
        fs::create_dir_all(widget.join("src/lib")).unwrap();
        git(&widget, &["init", "-q"]);
        fs::write(widget.join("README"), "one\n").unwrap();
        fs::write(widget.join("src/main.rs"), "fn main() {}\n").unwrap();
        fs::write(widget.join("src/lib/mod.rs"), "\n").unwrap();
        git_at(&widget, C1_TIME, &["add", "."]);
        git_at(&widget, C1_TIME, &["commit", "-q", "-m", "c1"]);
        let c1 = git(&widget, &["rev-parse", "HEAD"]);
        fs::write(widget.join("README"), "two\n").unwrap();
        git(&widget, &["commit", "-q", "-am", "c2"]);
        let c2 = git(&widget, &["rev-parse", "HEAD"]);

        git(&widget, &["branch", "feature/x", &c1]);
        git(&widget, &["tag", "v0.9", &c1]);
        git(&widget, &["tag", "-a", "-m", "release", "v1.0"]);
        git(
            &widget,
            &["tag", "-a", "-m", "a tag of a tag", "nested", "v1.0"],
        );
        git(&widget, &["branch", "same", &c1]);
        git(&widget, &["tag", "same", &c2]);
        git(&widget, &["tag", "tree-tag", "HEAD^{tree}"]);
        git(&widget, &["tag", "blob-tag", "HEAD:README"]);
        git(&widget, &["update-ref", "refs/remotes/origin/main", &c1]);
        git(
            &widget,
            &[
                "symbolic-ref",
                "refs/remotes/origin/HEAD",
                "refs/remotes/origin/main",
            ],
        );

        let secret = base.join("outside/secret");
        fs::create_dir_all(&secret).unwrap();
        git(&secret, &["init", "-q"]);
        git(&secret, &["commit", "-q", "--allow-empty", "-m", "secret"]);

        Fixture {
            _temp: temp,
            base,
            root,
            widget,
            c1,
            c2,
        }
    }

    impl Fixture {
        fn repositories(&self) -> Repositories {
            Repositories::new(&self.root)
                .unwrap()
                .trusting_recent_changes()
        }

        fn widget(&self) -> Arc<Repository> {
            self.repositories().open("acme", "widget").unwrap()
        }

        /// A bare clone of widget at `repos/acme/{name}`.
        fn bare_clone(&self, name: &str) -> PathBuf {
            let path = self.root.join("acme").join(name);
            git(
                &self.base,
                &[
                    "clone",
                    "-q",
                    "--bare",
                    self.widget.to_str().unwrap(),
                    path.to_str().unwrap(),
                ],
            );
            path
        }
    }

    /// The export-subst walk reads only the trees a commit changed: the
    /// first request for each new commit no longer reads every tree before
    /// git starts (it held back the first byte of every cold archive).
    #[test]
    fn export_subst_walk_skips_trees_known_clean() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        git(dir, &["init", "-q"]);
        for path in ["a/x/y/f", "a/g", "b/z/h", "top"] {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("{}\n", path.display())).unwrap();
        }
        let commit = |message: &str| {
            git(dir, &["add", "-A"]);
            git(dir, &["commit", "-q", "-m", message]);
            let repo = gix::open(dir).unwrap();
            let id = repo.head_id().unwrap().detach();
            let tree = repo.find_commit(id).unwrap().tree_id().unwrap().detach();
            (repo, tree)
        };
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));

        // Every tree: the root, a, a/x, a/x/y, b, b/z.
        let (repo, first) = commit("one");
        assert_eq!(tree_substitutes(&repo, first, &memo).unwrap(), (false, 6));
        assert_eq!(tree_substitutes(&repo, first, &memo).unwrap(), (false, 0));

        // A file changed in a/x/y: the root, a, a/x, a/x/y; b is known clean.
        fs::write(dir.join("a/x/y/f"), "changed\n").unwrap();
        let (repo, second) = commit("two");
        assert_eq!(tree_substitutes(&repo, second, &memo).unwrap(), (false, 4));

        // export-subst deep in b is found, through the new trees only.
        fs::write(dir.join("b/z/.gitattributes"), "h export-subst\n").unwrap();
        let (repo, third) = commit("three");
        assert_eq!(tree_substitutes(&repo, third, &memo).unwrap(), (true, 3));
        // ...and with nothing known, the same answer.
        let fresh = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        assert!(tree_substitutes(&repo, third, &fresh).unwrap().0);
        // A tree with export-subst below is never recorded as clean.
        assert!(tree_substitutes(&repo, third, &memo).unwrap().0);
    }

    /// git reads attributes from the tree by path, whatever the entry's
    /// mode: a symlink or a gitlink named `.gitattributes` whose object is a
    /// blob, and a hand-made entry named `sub/.gitattributes`, all make git
    /// substitute. Each was missed before (only a regular file named
    /// exactly `.gitattributes` was read), so such an archive was keyed
    /// without the refs and served as immutable while its bytes changed
    /// with every tag (review: attack).
    #[test]
    fn export_subst_is_found_in_every_entry_git_reads_attributes_from() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        git(dir, &["init", "-q", "--bare"]);
        let hash = |kind: &str, data: &[u8]| -> String {
            let mut child = std::process::Command::new("git")
                .args(["hash-object", "--literally", "-w", "--stdin", "-t", kind])
                .current_dir(dir)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), data).unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success());
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        let tree = |entries: &[(&str, &str, &str)]| -> String {
            let mut raw = Vec::new();
            for (mode, name, id) in entries {
                raw.extend_from_slice(format!("{mode} {name}\0").as_bytes());
                raw.extend_from_slice(&hex::decode(id).unwrap());
            }
            hash("tree", &raw)
        };
        let placeholder = hash("blob", b"$Format:%H$\n");
        let attributes = hash("blob", b"f export-subst\n");
        let sub_attributes = hash("blob", b"* export-subst\n");
        let sub = tree(&[("100644", "f", &placeholder)]);
        let cases = [
            (
                "a symlink",
                tree(&[
                    ("120000", ".gitattributes", &attributes),
                    ("100644", "f", &placeholder),
                ]),
            ),
            (
                "a gitlink",
                tree(&[
                    ("160000", ".gitattributes", &attributes),
                    ("100644", "f", &placeholder),
                ]),
            ),
            (
                "a name with a slash",
                tree(&[
                    ("40000", "sub", &sub),
                    ("100644", "sub/.gitattributes", &sub_attributes),
                ]),
            ),
            (
                "a regular file",
                tree(&[
                    ("100644", ".gitattributes", &attributes),
                    ("100644", "f", &placeholder),
                ]),
            ),
        ];
        let repo = gix::open(dir).unwrap();
        for (what, root) in cases {
            // git substitutes: its archive holds no placeholder left as is.
            let commit = git(dir, &["commit-tree", "-m", what, &root]);
            let archive = std::process::Command::new("git")
                .args(["archive", "--format=tar", &commit])
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(archive.status.success(), "{what}");
            assert!(
                !archive
                    .stdout
                    .windows(8)
                    .any(|window| window == b"$Format:"),
                "{what}: git does not substitute"
            );
            let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
            let root = ObjectId::from_hex(root.as_bytes()).unwrap();
            assert!(tree_substitutes(&repo, root, &memo).unwrap().0, "{what}");
        }
        // An object the repository does not have (a gitlink's commit, as
        // submodules have) may be pushed later as a blob git would read:
        // taken to substitute, never remembered as clean, not an error.
        let missing = "1".repeat(40);
        let root = tree(&[
            ("160000", ".gitattributes", &missing),
            ("100644", "f", &placeholder),
        ]);
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        let root = ObjectId::from_hex(root.as_bytes()).unwrap();
        assert_eq!(tree_substitutes(&repo, root, &memo).unwrap(), (true, 1));
        // A commit there is no attributes file, and never becomes one.
        let commit = git(dir, &["commit-tree", "-m", "a commit", &sub]);
        let root = tree(&[
            ("160000", ".gitattributes", &commit),
            ("100644", "f", &placeholder),
        ]);
        let root = ObjectId::from_hex(root.as_bytes()).unwrap();
        assert_eq!(tree_substitutes(&repo, root, &memo).unwrap(), (false, 1));
    }

    /// `packed-refs` swapped for a symlink after the open is not read
    /// through either, by a lookup or by the listing (review).
    #[test]
    fn packed_refs_read_through_a_symlink_are_refused() {
        let fixture = fixture();
        let repository = fixture.widget();
        assert_resolves(&repository, "v0.9", RefKind::Tag("v0.9".into()));
        git(&fixture.widget, &["pack-refs", "--all"]);
        let packed = repository.common_dir().join("packed-refs");
        let outside = fixture.base.join("packed-refs");
        fs::rename(&packed, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &packed).unwrap();
        assert!(
            rev_parse(repository.git_dir(), "v0.9").is_some(),
            "git reads through it"
        );
        let result = repository.resolve("v0.9");
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
        let result = RefsSnapshot::at(repository.git_dir());
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
    }

    /// Attributes blobs are judged once per walk and by their size first,
    /// within a budget of bytes read per walk (attack: 1,500 trees sharing
    /// one 8 MB attributes blob were read whole, one by one, for 23 s); the
    /// answer is the tree's alone.
    #[test]
    fn attributes_blobs_are_judged_once_each_by_size_first_within_a_budget() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        git(dir, &["init", "-q"]);
        let tree_of = |files: &dyn Fn(&Path)| {
            let _ = fs::remove_dir_all(dir.join("t"));
            files(&dir.join("t"));
            git(dir, &["add", "-A"]);
            git(dir, &["commit", "-q", "--allow-empty", "-m", "x"]);
            let repo = gix::open(dir).unwrap();
            let id = repo.head_id().unwrap().detach();
            let tree = repo.find_commit(id).unwrap().tree_id().unwrap().detach();
            let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
            tree_substitutes(&repo, tree, &memo).unwrap().0
        };
        // A megabyte of attributes without `export-subst`.
        let attributes = |seed: usize| {
            let mut text = format!("# {seed}\n");
            text.push_str(&"*.bin binary\n".repeat((MAX_ATTRIBUTES_BLOB_BYTES as usize - 64) / 13));
            text
        };
        let write = |path: PathBuf, text: &str| {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };

        // 100 trees sharing one: read once, clean (100 MiB read otherwise,
        // past the budget).
        assert!(!tree_of(&|t: &Path| {
            for i in 0..100 {
                write(t.join(format!("d{i}/.gitattributes")), &attributes(0));
                write(t.join(format!("d{i}/f{i}")), "x\n");
            }
        }));
        // 100 different ones: past the budget of one walk, which stops
        // busy; the next goes on from the trees found clean, to the answer
        // the tree alone decides.
        let _ = fs::remove_dir_all(dir.join("t"));
        for i in 0..100 {
            write(dir.join(format!("t/d{i}/.gitattributes")), &attributes(i));
        }
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "-m", "many"]);
        let repo = gix::open(dir).unwrap();
        let id = repo.head_id().unwrap().detach();
        let tree = repo.find_commit(id).unwrap().tree_id().unwrap().detach();
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        let first = tree_substitutes(&repo, tree, &memo);
        assert!(matches!(first, Err(Error::Busy)), "{first:?}");
        assert!(!tree_substitutes(&repo, tree, &memo).unwrap().0);

        // One over the bound of a blob read: taken as mentioning it.
        assert!(tree_of(&|t: &Path| {
            write(t.join(".gitattributes"), &attributes(0).repeat(2));
        }));
    }

    /// A tree met twice in one walk is read once (attack: 1,000 nested
    /// trees of 100,000 entries naming one empty tree held 2 GB of ids),
    /// and a tree one of whose subtrees waited elsewhere in the walk is
    /// not kept as clean: that subtree may mention `export-subst`, found
    /// after it.
    #[test]
    fn a_tree_met_twice_is_read_once_and_kept_clean_only_when_proven() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        git(dir, &["init", "-q", "--bare"]);
        let input = |args: &[&str], stdin: &str| {
            let mut child = std::process::Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success());
            ObjectId::from_hex(String::from_utf8(output.stdout).unwrap().trim().as_bytes()).unwrap()
        };
        let blob = |text: &str| input(&["hash-object", "-w", "--stdin"], text);
        let tree = |entries: &[(&str, &str, ObjectId)]| {
            let listing: String = entries
                .iter()
                .map(|(mode, name, id)| {
                    let kind = if *mode == "040000" { "tree" } else { "blob" };
                    format!("{mode} {kind} {id}\t{name}\n")
                })
                .collect();
            input(&["mktree"], &listing)
        };
        let repo = gix::open(dir).unwrap();
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));

        // 50 nested levels, each with 2,000 entries naming one empty tree.
        let empty = tree(&[]);
        let mut level = tree(&[("100644", "f", blob("x\n"))]);
        for _ in 0..50 {
            let mut entries: Vec<(String, ObjectId)> =
                (0..2000).map(|i| (format!("e{i:04}"), empty)).collect();
            entries.push(("next".into(), level));
            let entries: Vec<(&str, &str, ObjectId)> = entries
                .iter()
                .map(|(name, id)| ("040000", name.as_str(), *id))
                .collect();
            level = tree(&entries);
        }
        assert_eq!(tree_substitutes(&repo, level, &memo).unwrap(), (false, 52));

        // `a` is a subtree that mentions export-subst deep down; `b` names
        // it too, and is read first (the stack takes the last entry first).
        let deep = tree(&[("100644", ".gitattributes", blob("* export-subst\n"))]);
        let shared = tree(&[("040000", "deep", deep)]);
        let b = tree(&[("040000", "s", shared)]);
        let root = tree(&[("040000", "a", shared), ("040000", "b", b)]);
        assert!(tree_substitutes(&repo, root, &memo).unwrap().0);
        // `b` was not kept clean: alone, it still says so.
        let alone = tree(&[("040000", "b", b)]);
        assert!(tree_substitutes(&repo, alone, &memo).unwrap().0);

        // Nor the tree above it (review): `c` names `b`, which waited on
        // `shared`, listed by the root first.
        let c = tree(&[("040000", "b", b)]);
        let root = tree(&[("040000", "a", shared), ("040000", "c", c)]);
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        assert!(tree_substitutes(&repo, root, &memo).unwrap().0);
        let without_a = tree(&[("040000", "x", c)]);
        assert!(tree_substitutes(&repo, without_a, &memo).unwrap().0);

        // A walk that finds nothing keeps every tree it read as clean,
        // those that waited on others too.
        let plain = tree(&[("100644", "f", blob("plain\n"))]);
        let waits = tree(&[("040000", "s", plain)]);
        let root = tree(&[("040000", "a", plain), ("040000", "b", waits)]);
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        assert_eq!(tree_substitutes(&repo, root, &memo).unwrap(), (false, 3));
        assert_eq!(tree_substitutes(&repo, waits, &memo).unwrap(), (false, 0));

        // Past the budget where no tree can be kept clean before the end
        // (each names a subtree the root lists first): the blobs judged are
        // kept, so the next walk goes on (review: busy for good before).
        let megabyte = |seed: usize| {
            let mut text = format!("# {seed}\n");
            text.push_str(&"*.bin binary\n".repeat((MAX_ATTRIBUTES_BLOB_BYTES as usize - 64) / 13));
            text
        };
        let mut entries = vec![("040000".to_owned(), "a".to_owned(), plain)];
        for i in 0..100 {
            let attributes = blob(&megabyte(5000 + i));
            let t = tree(&[
                ("100644", ".gitattributes", attributes),
                ("040000", "s", plain),
            ]);
            entries.push(("040000".to_owned(), format!("t{i:03}"), t));
        }
        let entries: Vec<(&str, &str, ObjectId)> = entries
            .iter()
            .map(|(mode, name, id)| (mode.as_str(), name.as_str(), *id))
            .collect();
        let root = tree(&entries);
        let memo = Mutex::new(LruCache::new(CLEAN_TREE_IDS));
        let first = tree_substitutes(&repo, root, &memo).map(|(answer, _)| answer);
        assert!(matches!(first, Err(Error::Busy)), "{first:?}");
        let second = tree_substitutes(&repo, root, &memo).map(|(answer, _)| answer);
        assert!(matches!(second, Ok(false)), "{second:?}");
    }

    /// A commit object larger than the archiver reads is refused as too
    /// large, unread (attack: a pushed 300 MB commit message was read
    /// whole on every request for it).
    #[test]
    fn a_commit_object_past_the_bound_is_refused_unread() {
        let fixture = fixture();
        let git_dir = fixture.bare_clone("huge-commit.git");
        let tree = git(&git_dir, &["rev-parse", "main^{tree}"]);
        let mut object = format!(
            "tree {}\nauthor T <t@e> 1700000000 +0000\ncommitter T <t@e> 1700000000 +0000\n\n",
            tree.trim()
        )
        .into_bytes();
        object.resize(object.len() + MAX_PEELED_OBJECT_BYTES as usize + 1, b'm');
        let message = fixture.base.join("huge-commit");
        fs::write(&message, &object).unwrap();
        let commit = git(
            &git_dir,
            &[
                "hash-object",
                "-t",
                "commit",
                "-w",
                "--literally",
                message.to_str().unwrap(),
            ],
        );
        git(&git_dir, &["update-ref", "refs/heads/huge", commit.trim()]);
        let repository = fixture.repositories().open("acme", "huge-commit").unwrap();
        let result = repository.resolve("huge");
        assert!(matches!(result, Err(Error::TooLarge)), "{result:?}");
        assert_resolves(&repository, "main", RefKind::Branch("main".into()));

        // The bound is on the whole chain of tags (attack: 1,200 tags of
        // 16 MB each, seconds a request).
        let mut target = git(&git_dir, &["rev-parse", "main"]).trim().to_owned();
        for link in 0..3 {
            let mut tag = format!(
                "object {target}\ntype {}\ntag t{link}\ntagger T <t@e> 1700000000 +0000\n\n",
                if link == 0 { "commit" } else { "tag" }
            )
            .into_bytes();
            tag.resize(tag.len() + MAX_PEELED_OBJECT_BYTES as usize / 3, b'm');
            fs::write(&message, &tag).unwrap();
            target = git(
                &git_dir,
                &[
                    "hash-object",
                    "-t",
                    "tag",
                    "-w",
                    "--literally",
                    message.to_str().unwrap(),
                ],
            )
            .trim()
            .to_owned();
        }
        git(&git_dir, &["update-ref", "refs/tags/chain", &target]);
        let result = repository.resolve("chain");
        assert!(matches!(result, Err(Error::TooLarge)), "{result:?}");
    }

    /// `f` on a thread of its own, failing the test if it has not returned
    /// within 20 s (what it checks would hang for good).
    fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(f());
        });
        result
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what}: still reading after 20 s"))
    }

    fn mkfifo(path: &Path) {
        let _ = fs::remove_file(path);
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }

    /// A file git or gix reads whole that is a FIFO, a symlink to a device,
    /// or larger than any such file is (sparse here) gets the repository
    /// refused, without reading it (attack: each hung a serving thread for
    /// good, or crashed the archiver out of memory).
    #[test]
    fn files_read_whole_that_are_special_or_huge_refuse_the_repository() {
        let fixture = fixture();
        let repositories = fixture.repositories();
        type Damage = fn(&Path);
        let cases: [(&str, &str, Damage); 9] = [
            ("fifo-head", "HEAD", mkfifo),
            ("fifo-config", "config", mkfifo),
            ("fifo-worktree-config", "config.worktree", mkfifo),
            ("fifo-packed", "packed-refs", mkfifo),
            ("fifo-alternates", "objects/info/alternates", mkfifo),
            ("fifo-graph", "objects/info/commit-graph", mkfifo),
            ("huge-head", "HEAD", |path| {
                fs::File::create(path).unwrap().set_len(1 << 30).unwrap();
            }),
            ("huge-config", "config", |path| {
                fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .unwrap()
                    .set_len(1 << 30)
                    .unwrap();
            }),
            ("zero-config", "config", |path| {
                fs::remove_file(path).unwrap();
                std::os::unix::fs::symlink("/dev/zero", path).unwrap();
            }),
        ];
        for (name, file, damage) in cases {
            let git_dir = fixture.bare_clone(&format!("{name}.git"));
            damage(&git_dir.join(file));
            let root = fixture.root.clone();
            let result = within_bound(name, move || {
                Repositories::new(&root)
                    .unwrap()
                    .open("acme", name)
                    .map(|_| ())
            });
            assert!(
                matches!(result, Err(Error::RepoNotFound)),
                "{name}: {result:?}"
            );
        }

        // Loose refs, on a repository already open.
        let git_dir = fixture.bare_clone("refs.git");
        let repository = repositories.open("acme", "refs").unwrap();
        mkfifo(&git_dir.join("refs/heads/fifo"));
        fs::File::create(git_dir.join("refs/heads/huge"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        for reference in ["fifo", "huge"] {
            let repository = Arc::clone(&repository);
            let result = within_bound(reference, move || repository.resolve(reference));
            assert!(
                matches!(result, Err(Error::RepoNotFound)),
                "{reference}: {result:?}"
            );
        }
        // Another spelling gix's lookup opens for `refs/odd` (attack).
        fs::create_dir_all(git_dir.join("tags/refs")).unwrap();
        mkfifo(&git_dir.join("tags/refs/odd"));
        let odd = Arc::clone(&repository);
        let result = within_bound("tags/refs/odd", move || odd.resolve("odd"));
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
        // A symbolic ref into another work tree's refs is not followed
        // (gix reads it from the common dir, where no check looked).
        fs::write(
            git_dir.join("refs/heads/elsewhere"),
            "ref: main-worktree/refs/heads/main\n",
        )
        .unwrap();
        let elsewhere = Arc::clone(&repository);
        let result = within_bound("main-worktree", move || elsewhere.resolve("elsewhere"));
        assert!(matches!(result, Err(Error::RefNotFound)), "{result:?}");
        // Nor one to a name outside `refs/`, which gix looks up under
        // `refs/`, where no check looked (review).
        fs::create_dir_all(git_dir.join("refs/foo")).unwrap();
        mkfifo(&git_dir.join("refs/foo/bar"));
        fs::write(git_dir.join("refs/heads/bare-name"), "ref: foo/bar\n").unwrap();
        let bare_name = Arc::clone(&repository);
        let result = within_bound("foo/bar", move || bare_name.resolve("bare-name"));
        assert!(matches!(result, Err(Error::RefNotFound)), "{result:?}");
        let result = within_bound("listing", move || RefsSnapshot::at(&git_dir));
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");

        // A `.git` that is no git dir: gix opens the directory itself, so
        // its files are checked (review).
        let stale = fixture.bare_clone("stale.git");
        fs::write(stale.join(".git"), "gitdir: /nonexistent\n").unwrap();
        mkfifo(&stale.join("HEAD"));
        let root = fixture.root.clone();
        let result = within_bound("stale .git", move || {
            Repositories::new(&root)
                .unwrap()
                .open("acme", "stale")
                .map(|_| ())
        });
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");

        // A work tree's own files named like a git dir's are content: a
        // `config/` directory, a large `HEAD` (review: every work tree
        // with a `config/` was refused).
        fs::create_dir_all(fixture.widget.join("config")).unwrap();
        fs::write(fixture.widget.join("config/app.yml"), "a: 1\n").unwrap();
        fs::write(fixture.widget.join("HEAD"), "x".repeat(70_000)).unwrap();
        let repositories = Repositories::new(&fixture.root).unwrap();
        assert!(repositories.open("acme", "widget").is_ok());
        let single = Repositories::new(&fixture.widget).unwrap();
        assert!(single.open(LOCAL_OWNER, "widget").is_ok());
    }

    /// Alternates lists that name the next directory many times, chained,
    /// are checked once per directory, as git reads them: 16 names in 5
    /// levels had cost 34 s a check (attack).
    #[test]
    fn repeated_alternates_are_checked_once_each() {
        let fixture = fixture();
        let git_dir = fixture.bare_clone("chain.git");
        let mut previous = git_dir.join("objects");
        for level in 0..5 {
            let next = git_dir.join(format!("pool{level}/objects"));
            fs::create_dir_all(next.join("info")).unwrap();
            let line = format!("{}\n", next.display());
            fs::create_dir_all(previous.join("info")).unwrap();
            fs::write(previous.join("info/alternates"), line.repeat(16)).unwrap();
            previous = next;
        }
        let repositories = fixture.repositories();
        let started = std::time::Instant::now();
        let result = within_bound("alternates", move || {
            repositories.open("acme", "chain").map(|_| ())
        });
        assert!(result.is_ok(), "{result:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // A relative entry in an alternate's list is read by gix from the
        // repository's own object directory: where it leads from there must
        // be inside too (review).
        let git_dir = fixture.bare_clone("gixrel.git");
        let pool = fixture.root.join("acme/a/b/c/pool/objects");
        fs::create_dir_all(pool.join("info")).unwrap();
        fs::create_dir_all(fixture.root.join("acme/a/outside/objects")).unwrap();
        fs::create_dir_all(fixture.base.join("outside/objects")).unwrap();
        assert!(!fixture.base.join("outside").starts_with(&fixture.root));
        fs::write(
            git_dir.join("objects/info/alternates"),
            format!("{}\n", pool.display()),
        )
        .unwrap();
        fs::write(
            pool.join("info/alternates"),
            "../../../../outside/objects\n",
        )
        .unwrap();
        let result = fixture.repositories().open("acme", "gixrel");
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");

        // More object directories than a repository borrows from: refused
        // (gix reads its alternates in quadratic time; attack).
        let git_dir = fixture.bare_clone("wide.git");
        let mut list = String::new();
        for pool in 0..MAX_OBJECT_DIRS {
            let objects = git_dir.join(format!("pool{pool}/objects"));
            fs::create_dir_all(&objects).unwrap();
            list.push_str(&format!("{}\n", objects.display()));
        }
        fs::write(git_dir.join("objects/info/alternates"), list).unwrap();
        let result = fixture.repositories().open("acme", "wide");
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
    }

    /// A reftable repository is refused as unsupported (a `500` with the
    /// reason logged), not answered "ref not found" for refs it has.
    #[test]
    fn a_reftable_repository_is_unsupported_not_empty() {
        let fixture = fixture();
        let reftable = fixture.root.join("acme/reftable.git");
        git(
            &fixture.root,
            &[
                "clone",
                "-q",
                "--bare",
                "--ref-format=reftable",
                "acme/widget",
                reftable.to_str().unwrap(),
            ],
        );
        assert!(rev_parse(&reftable, "main").is_some(), "git reads its refs");
        let result = fixture.repositories().open("acme", "reftable");
        match result {
            Err(Error::Internal(detail)) => {
                assert!(
                    detail.contains("reftable storage are not supported"),
                    "{detail}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn branch_resolves_to_its_tip() {
        let fixture = fixture();
        let widget = fixture.widget();
        let resolved = assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_eq!(resolved.commit, fixture.c2);
        assert_eq!(resolved.committer_time, C2_TIME);
    }

    #[test]
    fn branch_with_slash_keeps_its_full_name() {
        let fixture = fixture();
        let widget = fixture.widget();
        let resolved = assert_resolves(&widget, "feature/x", RefKind::Branch("feature/x".into()));
        assert_eq!(resolved.commit, fixture.c1);
        assert_eq!(resolved.committer_time, C1_TIME);
    }

    #[test]
    fn lightweight_tag_resolves() {
        let fixture = fixture();
        let resolved = assert_resolves(&fixture.widget(), "v0.9", RefKind::Tag("v0.9".into()));
        assert_eq!(resolved.commit, fixture.c1);
    }

    #[test]
    fn annotated_tags_are_peeled_to_the_commit() {
        let fixture = fixture();
        let widget = fixture.widget();
        let resolved = assert_resolves(&widget, "v1.0", RefKind::Tag("v1.0".into()));
        assert_eq!(resolved.commit, fixture.c2);
        let resolved = assert_resolves(&widget, "nested", RefKind::Tag("nested".into()));
        assert_eq!(resolved.commit, fixture.c2);
    }

    #[test]
    fn full_ref_names_decide_the_kind() {
        let fixture = fixture();
        let widget = fixture.widget();
        assert_resolves(
            &widget,
            "refs/heads/feature/x",
            RefKind::Branch("feature/x".into()),
        );
        assert_resolves(&widget, "refs/tags/v1.0", RefKind::Tag("v1.0".into()));
        assert_resolves(&widget, "heads/main", RefKind::Branch("main".into()));
        assert_resolves(&widget, "tags/nested", RefKind::Tag("nested".into()));
        // The branch and the tag named `same` are reachable by full name.
        let branch = assert_resolves(&widget, "refs/heads/same", RefKind::Branch("same".into()));
        assert_eq!(branch.commit, fixture.c1);
    }

    #[test]
    fn head_and_remotes_are_labelled_by_commit() {
        let fixture = fixture();
        let widget = fixture.widget();
        let head = assert_resolves(&widget, "HEAD", RefKind::Commit);
        assert_eq!(head.commit, fixture.c2);
        let remote = assert_resolves(&widget, "origin/main", RefKind::Commit);
        assert_eq!(remote.commit, fixture.c1);
        // `refs/remotes/{r}/HEAD`, through a symbolic ref.
        let remote_head = assert_resolves(&widget, "origin", RefKind::Commit);
        assert_eq!(remote_head.commit, fixture.c1);
    }

    #[test]
    fn full_commit_id_resolves_in_either_case() {
        let fixture = fixture();
        let widget = fixture.widget();
        let resolved = assert_resolves(&widget, &fixture.c1, RefKind::Commit);
        assert_eq!(resolved.commit, fixture.c1);
        let resolved = assert_resolves(&widget, &fixture.c1.to_ascii_uppercase(), RefKind::Commit);
        assert_eq!(resolved.commit, fixture.c1);
        // The id of an annotated tag is peeled too.
        let tag_id = git(&fixture.widget, &["rev-parse", "v1.0"]);
        assert_ne!(tag_id, fixture.c2);
        let resolved = assert_resolves(&widget, &tag_id, RefKind::Commit);
        assert_eq!(resolved.commit, fixture.c2);
        // Well-formed but absent.
        assert_not_found(&widget, &"0".repeat(40));
        assert_not_found(&widget, "0123456789abcdef0123456789abcdef01234567");
    }

    #[test]
    fn abbreviated_commit_id_resolves_after_refs() {
        let fixture = fixture();
        let widget = fixture.widget();
        let resolved = assert_resolves(&widget, &fixture.c1[..7], RefKind::Commit);
        assert_eq!(resolved.commit, fixture.c1);
        assert_resolves(&widget, &fixture.c2[..12], RefKind::Commit);
        assert_resolves(
            &widget,
            &fixture.c2[..39].to_ascii_uppercase(),
            RefKind::Commit,
        );
        // Shorter than 7 digits is not an id here (nor a ref).
        assert!(matches!(
            widget.resolve(&fixture.c1[..6]),
            Err(Error::RefNotFound)
        ));
        // An abbreviated tree id is no commit.
        let tree = git(&fixture.widget, &["rev-parse", "HEAD^{tree}"]);
        assert_not_found(&widget, &tree[..10]);

        // A ref that looks like an id wins over the id, as in git.
        let prefix = &fixture.c2[..8];
        git(&fixture.widget, &["branch", prefix, &fixture.c1]);
        let resolved = assert_resolves(&widget, prefix, RefKind::Branch(prefix.into()));
        assert_eq!(resolved.commit, fixture.c1);
    }

    #[test]
    fn tag_wins_over_branch_of_the_same_name() {
        let fixture = fixture();
        let resolved = assert_resolves(&fixture.widget(), "same", RefKind::Tag("same".into()));
        assert_eq!(resolved.commit, fixture.c2);
    }

    #[test]
    fn refs_to_trees_and_blobs_are_not_found() {
        let fixture = fixture();
        let widget = fixture.widget();
        assert_not_found(&widget, "tree-tag");
        assert_not_found(&widget, "blob-tag");
        let tree = git(&fixture.widget, &["rev-parse", "HEAD^{tree}"]);
        assert_not_found(&widget, &tree);
    }

    #[test]
    fn unknown_refs_are_not_found() {
        let fixture = fixture();
        let widget = fixture.widget();
        for reference in [
            "nope",
            "feature",
            "feature/y",
            "refs/heads/nope",
            "heads",
            "tags",
            "refs",
            "origin/nope",
            "ORIG_HEAD",
            "deadbeefdeadbeef",
        ] {
            assert_not_found(&widget, reference);
        }
    }

    #[test]
    fn unborn_head_is_not_found() {
        let fixture = fixture();
        let empty = fixture.root.join("acme/empty");
        fs::create_dir_all(&empty).unwrap();
        git(&empty, &["init", "-q"]);
        let empty = fixture.repositories().open("acme", "empty").unwrap();
        assert_not_found(&empty, "HEAD");
        assert_not_found(&empty, "main");
    }

    #[test]
    fn refs_and_objects_created_after_open_are_seen() {
        let fixture = fixture();
        let widget = fixture.widget();
        assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_not_found(&widget, "late");

        fs::write(fixture.widget.join("late.txt"), "late\n").unwrap();
        git_at(&fixture.widget, C3_TIME, &["add", "late.txt"]);
        git_at(&fixture.widget, C3_TIME, &["commit", "-q", "-m", "c3"]);
        git(&fixture.widget, &["branch", "late"]);
        let late = assert_resolves(&widget, "late", RefKind::Branch("late".into()));
        assert_eq!(late.committer_time, C3_TIME);
        let main = assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_eq!(main.commit, late.commit);
        assert!(widget.has_path(&late.commit, "late.txt").unwrap());

        git(&fixture.widget, &["branch", "-D", "late"]);
        assert_not_found(&widget, "late");
    }

    #[test]
    fn remembered_refs_follow_every_change() {
        let fixture = fixture();
        let widget = fixture.widget();
        let dir = &fixture.widget;
        let main = assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_eq!(main.commit, fixture.c2);
        assert_eq!(widget.remembered_refs().len(), 1, "remembered");
        let head = widget.resolve("HEAD").unwrap();
        assert_eq!(head.commit, fixture.c2);

        // Moved (a lock file renamed over the ref): also through `HEAD`.
        git(dir, &["update-ref", "refs/heads/main", &fixture.c1]);
        assert_eq!(widget.resolve("main").unwrap().commit, fixture.c1);
        assert_eq!(widget.resolve("HEAD").unwrap().commit, fixture.c1);
        // Rewritten in place with the same size, as no git does.
        fs::write(
            dir.join(".git/refs/heads/main"),
            format!("{}\n", fixture.c2),
        )
        .unwrap();
        assert_eq!(widget.resolve("main").unwrap().commit, fixture.c2);
        assert_eq!(widget.resolve("HEAD").unwrap().commit, fixture.c2);

        // A tag of the same name comes first in git's order.
        git(dir, &["tag", "main", &fixture.c1]);
        let tag = widget.resolve("main").unwrap();
        assert_eq!(
            (tag.kind, tag.commit),
            (RefKind::Tag("main".into()), fixture.c1.clone())
        );
        git(dir, &["tag", "-d", "main"]);
        assert_eq!(
            widget.resolve("main").unwrap().kind,
            RefKind::Branch("main".into())
        );

        // Packed, then moved in packed-refs alone, then deleted there.
        git(dir, &["pack-refs", "--all"]);
        assert_eq!(widget.resolve("main").unwrap().commit, fixture.c2);
        assert_eq!(widget.resolve("HEAD").unwrap().commit, fixture.c2);
        let packed = fs::read_to_string(dir.join(".git/packed-refs")).unwrap();
        let moved = packed.replace(
            &format!("{} refs/heads/main", fixture.c2),
            &format!("{} refs/heads/main", fixture.c1),
        );
        assert_ne!(packed, moved);
        fs::write(dir.join(".git/packed-refs.new"), moved).unwrap();
        fs::rename(
            dir.join(".git/packed-refs.new"),
            dir.join(".git/packed-refs"),
        )
        .unwrap();
        assert_eq!(widget.resolve("main").unwrap().commit, fixture.c1);
        assert_eq!(widget.resolve("HEAD").unwrap().commit, fixture.c1);
        git(dir, &["symbolic-ref", "HEAD", "refs/heads/feature/x"]);
        git(dir, &["branch", "-D", "main"]);
        assert_not_found(&widget, "main");
        assert_eq!(widget.resolve("HEAD").unwrap().commit, fixture.c1);
    }

    #[test]
    fn recently_changed_refs_are_read_again_not_remembered() {
        let fixture = fixture();
        let widget = Repositories::new(&fixture.root)
            .unwrap()
            .open("acme", "widget")
            .unwrap();
        assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_eq!(widget.remembered_refs().len(), 0);
        widget.refs_digest().unwrap();
        assert!(widget.digest.lock().unwrap().is_none());
    }

    #[test]
    fn a_snapshot_of_the_refs_read_afresh_has_the_repositorys_refs_digest() {
        let fixture = fixture();
        let widget = fixture.widget();
        let dir = &fixture.widget;
        let snapshot = RefsSnapshot::at(widget.git_dir()).unwrap();
        assert_eq!(snapshot.digest(), widget.refs_digest().unwrap());
        assert_eq!(snapshot.head, "ref: refs/heads/main");
        assert!(
            snapshot
                .refs
                .iter()
                .any(|(name, _)| name == "refs/heads/main")
        );

        // A detached HEAD at the commit main names is another state.
        git(dir, &["checkout", "-q", "--detach", "main"]);
        let detached = RefsSnapshot::at(widget.git_dir()).unwrap();
        assert_eq!(detached.head, fixture.c2);
        assert_ne!(detached.digest(), snapshot.digest());
        assert_eq!(detached.digest(), widget.refs_digest().unwrap());
    }

    #[test]
    fn the_refs_digest_and_reachability_follow_every_change() {
        let fixture = fixture();
        let widget = fixture.widget();
        let dir = &fixture.widget;
        let first = widget.refs_digest().unwrap();
        assert_eq!(widget.known_refs_digest().as_deref(), Some(first.as_str()));
        assert!(widget.reaches(&fixture.c2, None).unwrap());
        assert_eq!(widget.reaches_known(&fixture.c2, None), Some(true));

        // A new branch, in a new directory.
        git(dir, &["branch", "topic/deep/new", &fixture.c1]);
        assert_eq!(widget.reaches_known(&fixture.c2, None), None);
        let second = widget.refs_digest().unwrap();
        assert_ne!(first, second);
        // Moved in place with the same size.
        fs::write(
            dir.join(".git/refs/heads/topic/deep/new"),
            format!("{}\n", fixture.c2),
        )
        .unwrap();
        let third = widget.refs_digest().unwrap();
        assert_ne!(second, third);
        // Packing changes no ref.
        git(dir, &["pack-refs", "--all"]);
        assert_eq!(widget.refs_digest().unwrap(), third);

        // A commit made unreachable by a force push.
        fs::write(dir.join("gone.txt"), "gone\n").unwrap();
        git_at(dir, C3_TIME, &["add", "gone.txt"]);
        git_at(dir, C3_TIME, &["commit", "-q", "-m", "c3"]);
        let c3 = git(dir, &["rev-parse", "HEAD"]);
        assert!(widget.reaches(&c3, None).unwrap());
        git(dir, &["update-ref", "refs/heads/main", &fixture.c2]);
        assert_eq!(widget.reaches_known(&c3, None), None);
        assert!(!widget.reaches(&c3, None).unwrap());
    }

    /// Past `MAX_STAMPED_REF_FILES` loose refs the digest is still kept,
    /// vouched for by the directories (attack: it was listed again on each
    /// request, 1.5 s with 100,000 refs), and every change git makes is
    /// still seen on the next call.
    #[test]
    fn with_more_loose_refs_than_are_stamped_the_digest_is_kept_and_follows_git() {
        let fixture = fixture();
        let widget = fixture.widget();
        let dir = &fixture.widget;
        for n in 0..MAX_STAMPED_REF_FILES + 88 {
            fs::write(
                dir.join(format!(".git/refs/tags/t{n:04}")),
                format!("{}\n", fixture.c1),
            )
            .unwrap();
        }
        let first = widget.refs_digest().unwrap();
        assert_eq!(
            widget.known_refs_digest().as_deref(),
            Some(first.as_str()),
            "kept past the stamped files"
        );
        assert!(widget.reaches(&fixture.c2, None).unwrap());
        assert_eq!(widget.reaches_known(&fixture.c2, None), Some(true));

        // An existing loose ref moved by git, a new one, a deleted one.
        for change in [
            vec!["update-ref", "refs/tags/t0007", &fixture.c2],
            vec!["tag", "fresh", &fixture.c1],
            vec!["update-ref", "-d", "refs/tags/t0300"],
        ] {
            let before = widget.refs_digest().unwrap();
            git(dir, &change);
            assert_eq!(widget.known_refs_digest(), None, "{change:?}");
            assert_ne!(widget.refs_digest().unwrap(), before, "{change:?}");
        }
    }

    #[test]
    fn pushed_packs_and_repacks_are_seen() {
        let fixture = fixture();
        fixture.bare_clone("gadget.git");
        let gadget_dir = fixture.root.join("acme/gadget.git");
        // Keep what is pushed as a pack instead of loose objects.
        git(&gadget_dir, &["config", "receive.unpackLimit", "1"]);
        let gadget = fixture.repositories().open("acme", "gadget").unwrap();
        assert_resolves(&gadget, "main", RefKind::Branch("main".into()));

        fs::write(fixture.widget.join("pushed.txt"), "pushed\n").unwrap();
        git_at(&fixture.widget, C3_TIME, &["add", "pushed.txt"]);
        git_at(&fixture.widget, C3_TIME, &["commit", "-q", "-m", "c3"]);
        git(
            &fixture.widget,
            &[
                "push",
                "-q",
                gadget_dir.to_str().unwrap(),
                "main:refs/heads/pushed",
                "v1.0:refs/tags/v1.0-pushed",
            ],
        );
        let pushed = assert_resolves(&gadget, "pushed", RefKind::Branch("pushed".into()));
        assert_eq!(pushed.committer_time, C3_TIME);
        assert!(gadget.has_path(&pushed.commit, "pushed.txt").unwrap());
        assert_resolves(&gadget, &pushed.commit[..9], RefKind::Commit);

        // A full repack replaces every pack the handle may have loaded.
        git(&gadget_dir, &["repack", "-q", "-a", "-d"]);
        git(&gadget_dir, &["pack-refs", "--all"]);
        let repacked = assert_resolves(&gadget, "pushed", RefKind::Branch("pushed".into()));
        assert_eq!(repacked, pushed);
        assert_resolves(&gadget, "v1.0-pushed", RefKind::Tag("v1.0-pushed".into()));
        assert_resolves(&gadget, &fixture.c1[..7], RefKind::Commit);
    }

    #[test]
    fn packed_refs_resolve_and_loose_refs_override_them() {
        let fixture = fixture();
        let widget = fixture.widget();
        assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        git(&fixture.widget, &["pack-refs", "--all"]);
        assert!(!fixture.widget.join(".git/refs/tags/v1.0").exists());
        for (reference, kind) in [
            ("main", RefKind::Branch("main".into())),
            ("feature/x", RefKind::Branch("feature/x".into())),
            ("refs/heads/feature/x", RefKind::Branch("feature/x".into())),
            ("v0.9", RefKind::Tag("v0.9".into())),
            ("v1.0", RefKind::Tag("v1.0".into())),
            ("nested", RefKind::Tag("nested".into())),
            ("same", RefKind::Tag("same".into())),
            ("origin/main", RefKind::Commit),
            ("origin", RefKind::Commit),
            ("HEAD", RefKind::Commit),
        ] {
            assert_resolves(&widget, reference, kind);
        }
        assert_not_found(&widget, "tree-tag");

        // A loose ref written after packing shadows the packed one.
        git(
            &fixture.widget,
            &["update-ref", "refs/heads/feature/x", &fixture.c2],
        );
        let moved = assert_resolves(&widget, "feature/x", RefKind::Branch("feature/x".into()));
        assert_eq!(moved.commit, fixture.c2);
        // Packed again (packed-refs rewritten, loose ref gone).
        git(&fixture.widget, &["pack-refs", "--all"]);
        let packed = assert_resolves(&widget, "feature/x", RefKind::Branch("feature/x".into()));
        assert_eq!(packed.commit, fixture.c2);
        // Deleted from packed-refs.
        git(&fixture.widget, &["branch", "-D", "feature/x"]);
        assert_not_found(&widget, "feature/x");
    }

    #[test]
    fn bare_and_work_tree_layouts_are_found() {
        let fixture = fixture();
        fixture.bare_clone("gadget.git");
        fixture.bare_clone("plain");
        let repositories = fixture.repositories();

        let widget = repositories.open("acme", "widget").unwrap();
        assert_eq!(widget.git_dir(), fixture.widget.join(".git"));
        let gadget = repositories.open("acme", "gadget").unwrap();
        assert_eq!(gadget.git_dir(), fixture.root.join("acme/gadget.git"));
        let plain = repositories.open("acme", "plain").unwrap();
        assert_eq!(plain.git_dir(), fixture.root.join("acme/plain"));
        for repository in [&widget, &gadget, &plain] {
            let resolved = assert_resolves(repository, "v1.0", RefKind::Tag("v1.0".into()));
            assert_eq!(resolved.commit, fixture.c2);
        }

        // `{repo}.git` comes before `{repo}`.
        let both = fixture.root.join("acme/both");
        fs::create_dir_all(&both).unwrap();
        git(&both, &["init", "-q"]);
        fixture.bare_clone("both.git");
        let both = repositories.open("acme", "both").unwrap();
        assert_eq!(both.git_dir(), fixture.root.join("acme/both.git"));
    }

    #[test]
    fn missing_and_non_repositories_are_not_found() {
        let fixture = fixture();
        fs::create_dir_all(fixture.root.join("acme/plain-dir/src")).unwrap();
        fs::write(fixture.root.join("acme/file.git"), "not a repo").unwrap();
        fs::write(fixture.root.join("acme/file"), "not a repo").unwrap();
        let repositories = fixture.repositories();
        assert_repo_not_found(&repositories, "acme", "missing");
        assert_repo_not_found(&repositories, "nobody", "widget");
        assert_repo_not_found(&repositories, "acme", "plain-dir");
        assert_repo_not_found(&repositories, "acme", "file");
        // A directory inside a repository is not that repository.
        assert_repo_not_found(&repositories, "widget", "src");
        for (owner, name) in [
            ("..", "x"),
            ("acme", ".."),
            (".git", "x"),
            ("acme", "a/b"),
            ("", "x"),
        ] {
            assert!(
                matches!(repositories.open(owner, name), Err(Error::Url(_))),
                "{owner}/{name}"
            );
        }
    }

    #[test]
    fn symlinks_and_gitfiles_leading_outside_the_root_are_not_found() {
        let fixture = fixture();
        let secret = fixture.base.join("outside/secret");
        std::os::unix::fs::symlink(&secret, fixture.root.join("acme/secret")).unwrap();
        std::os::unix::fs::symlink(fixture.base.join("outside"), fixture.root.join("evil"))
            .unwrap();
        let sneaky = fixture.root.join("acme/sneaky");
        fs::create_dir_all(&sneaky).unwrap();
        fs::write(
            sneaky.join(".git"),
            format!("gitdir: {}\n", secret.join(".git").display()),
        )
        .unwrap();
        let repositories = fixture.repositories();
        assert_repo_not_found(&repositories, "acme", "secret");
        assert_repo_not_found(&repositories, "evil", "secret");
        assert_repo_not_found(&repositories, "acme", "sneaky");
    }

    #[test]
    fn a_repository_answers_to_one_name_only() {
        let fixture = fixture();
        // An alias inside the root would give the repository a second name,
        // and a second set of routing rules.
        std::os::unix::fs::symlink(&fixture.widget, fixture.root.join("acme/alias")).unwrap();
        std::os::unix::fs::symlink(fixture.root.join("acme"), fixture.root.join("corp")).unwrap();
        let bare = fixture.root.join("acme/gadget.git");
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/gadget.git"],
        );

        let repositories = fixture.repositories();
        repositories.open("acme", "widget").unwrap();
        assert_eq!(repositories.open("acme", "gadget").unwrap().git_dir(), bare);
        assert_repo_not_found(&repositories, "acme", "alias");
        assert_repo_not_found(&repositories, "corp", "widget");
        assert_repo_not_found(&repositories, "acme", "gadget.git");
        assert_repo_not_found(&repositories, "acme", "widget.git");

        // A `.git` file leading to another repository's git dir is an alias
        // too.
        let gitfile = fixture.root.join("acme/gitfile");
        fs::create_dir_all(&gitfile).unwrap();
        fs::write(
            gitfile.join(".git"),
            format!("gitdir: {}\n", fixture.widget.join(".git").display()),
        )
        .unwrap();
        assert_repo_not_found(&fixture.repositories(), "acme", "gitfile");
    }

    /// A symlink anywhere under `objects/` (a fan-out directory, a loose
    /// object, `pack`, a commit-graph) or a symlinked `HEAD` would serve
    /// another repository's objects as this one's: refused at open, and by
    /// `layout_inside` when the symlink appears after the open.
    #[test]
    fn symlinks_under_objects_or_at_head_are_refused() {
        let fixture = fixture();
        let outside = fixture.base.join("outside");
        git(
            &fixture.base,
            &[
                "clone",
                "-q",
                "--bare",
                "repos/acme/widget",
                "outside/secret.git",
            ],
        );
        let secret_objects = outside.join("secret.git/objects");
        /// Plants a symlink in the repository whose objects are the first
        /// path, to the second's.
        type Plant = fn(&Path, &Path);
        let cases: [(&str, Plant); 5] = [
            ("fanout", |objects, secret| {
                std::os::unix::fs::symlink(secret.join("info"), objects.join("5d")).unwrap()
            }),
            ("loose", |objects, secret| {
                fs::create_dir_all(objects.join("ab")).unwrap();
                std::os::unix::fs::symlink(secret.join("info/packs"), objects.join("ab/cdef"))
                    .unwrap()
            }),
            ("pack", |objects, secret| {
                fs::remove_dir_all(objects.join("pack")).unwrap();
                std::os::unix::fs::symlink(secret.join("pack"), objects.join("pack")).unwrap()
            }),
            ("graph", |objects, secret| {
                fs::create_dir_all(objects.join("info/commit-graphs")).unwrap();
                std::os::unix::fs::symlink(
                    secret.join("info"),
                    objects.join("info/commit-graphs/graph-x.graph"),
                )
                .unwrap()
            }),
            ("head", |objects, secret| {
                let git_dir = objects.parent().unwrap();
                fs::remove_file(git_dir.join("HEAD")).unwrap();
                std::os::unix::fs::symlink(secret.join("../HEAD"), git_dir.join("HEAD")).unwrap()
            }),
        ];
        for (name, plant) in cases {
            let relative = format!("acme/{name}.git");
            git(
                &fixture.root,
                &["clone", "-q", "--bare", "acme/widget", &relative],
            );
            let git_dir = fixture.root.join(&relative);
            assert!(
                layout_inside(&git_dir, &git_dir, &fixture.root).is_ok(),
                "{name}"
            );
            let repositories = fixture.repositories();
            repositories.open("acme", name).unwrap();
            plant(&git_dir.join("objects"), &secret_objects);
            // Opened before: the check before each generation refuses it.
            assert!(
                layout_inside(&git_dir, &git_dir, &fixture.root).is_err(),
                "{name}"
            );
            // Opened now: refused at once.
            assert_repo_not_found(&fixture.repositories(), "acme", name);
        }
    }

    #[test]
    fn a_loose_ref_read_through_a_symlink_is_refused_whatever_it_leads_to() {
        let fixture = fixture();
        let outside = fixture.base.join("outside");
        fs::create_dir_all(outside.join("tags")).unwrap();
        // What a symlink may lead to: a file naming one of the repository's
        // commits, a file that is no ref, nothing, a directory of refs.
        fs::write(outside.join("names-c1"), format!("{}\n", fixture.c1)).unwrap();
        fs::write(outside.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(outside.join("tags/v9"), format!("{}\n", fixture.c1)).unwrap();
        let repository = fixture.widget();
        // Remembered before `main` becomes a symlink to the same id.
        assert_resolves(&repository, "main", RefKind::Branch("main".into()));
        let refs = repository.git_dir().join("refs");
        fs::write(outside.join("names-c2"), format!("{}\n", fixture.c2)).unwrap();
        fs::remove_file(refs.join("heads/main")).unwrap();
        use std::os::unix::fs::symlink;
        symlink(outside.join("names-c2"), refs.join("heads/main")).unwrap();
        symlink(outside.join("names-c1"), refs.join("heads/evil")).unwrap();
        symlink(outside.join("passwd"), refs.join("heads/passwd")).unwrap();
        symlink(outside.join("missing"), refs.join("heads/missing")).unwrap();
        symlink(&outside, refs.join("outside")).unwrap();
        fs::write(refs.join("heads/alias"), "ref: refs/heads/evil\n").unwrap();
        // git reads through each of them; the archiver answers the same
        // whatever it would have found.
        assert!(rev_parse(repository.git_dir(), "evil").is_some());
        for reference in [
            "main",
            "evil",
            "passwd",
            "missing",
            "outside/tags/v9",
            "alias",
        ] {
            let result = repository.resolve(reference);
            assert!(
                matches!(result, Err(Error::RepoNotFound)),
                "{reference}: {result:?}"
            );
        }
        // Refs no lookup of which meets a symlink still resolve.
        assert_resolves(&repository, "v1.0", RefKind::Tag("v1.0".into()));
        assert_resolves(
            &repository,
            "feature/x",
            RefKind::Branch("feature/x".into()),
        );
        // The list of all refs (full commit ids, `export-subst`) meets them all.
        let result = repository.refs_digest();
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
        let result = RefsSnapshot::at(repository.git_dir());
        assert!(matches!(result, Err(Error::RepoNotFound)), "{result:?}");
    }

    #[test]
    fn alternates_outside_the_root_are_refused_and_inside_followed() {
        let fixture = fixture();
        let pool = fixture.root.join("pool/objects.git");
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "pool/objects.git"],
        );
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/fork.git"],
        );
        fs::write(
            fixture.root.join("acme/fork.git/objects/info/alternates"),
            format!("{}\n", pool.join("objects").display()),
        )
        .unwrap();
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/leaky.git"],
        );
        fs::write(
            fixture.root.join("acme/leaky.git/objects/info/alternates"),
            "../../../../outside/secret/.git/objects\n",
        )
        .unwrap();
        // Borrowing from a repository that borrows from outside is outside too.
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/chained.git"],
        );
        fs::write(
            fixture
                .root
                .join("acme/chained.git/objects/info/alternates"),
            format!(
                "{}\n",
                fixture.root.join("acme/leaky.git/objects").display()
            ),
        )
        .unwrap();

        // git reads C-quoted entries too: one we cannot check is refused.
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/quoted.git"],
        );
        fs::write(
            fixture.root.join("acme/quoted.git/objects/info/alternates"),
            format!(
                "\"{}\"\n",
                fixture.base.join("outside/secret/.git/objects").display()
            ),
        )
        .unwrap();
        // An objects directory that is itself a symlink out.
        git(
            &fixture.root,
            &["clone", "-q", "--bare", "acme/widget", "acme/linked.git"],
        );
        let objects = fixture.root.join("acme/linked.git/objects");
        fs::remove_dir_all(&objects).unwrap();
        std::os::unix::fs::symlink(fixture.base.join("outside/secret/.git/objects"), &objects)
            .unwrap();

        let repositories = fixture.repositories();
        repositories.open("acme", "fork").unwrap();
        assert_repo_not_found(&repositories, "acme", "leaky");
        assert_repo_not_found(&repositories, "acme", "chained");
        assert_repo_not_found(&repositories, "acme", "quoted");
        assert_repo_not_found(&repositories, "acme", "linked");
    }

    #[test]
    fn a_repository_as_root_is_served_as_local() {
        let fixture = fixture();
        let repositories = Repositories::new(&fixture.widget).unwrap();
        let widget = repositories.open(LOCAL_OWNER, "widget").unwrap();
        assert_eq!(widget.git_dir(), fixture.widget.join(".git"));
        assert_resolves(&widget, "main", RefKind::Branch("main".into()));
        assert_repo_not_found(&repositories, "acme", "widget");
        assert_repo_not_found(&repositories, LOCAL_OWNER, "other");
        assert_repo_not_found(&repositories, "widget", "src");

        let gadget = fixture.bare_clone("gadget.git");
        let repositories = Repositories::new(&gadget).unwrap();
        let opened = repositories.open(LOCAL_OWNER, "gadget").unwrap();
        assert_eq!(opened.git_dir(), gadget);
        assert_resolves(&opened, "v1.0", RefKind::Tag("v1.0".into()));

        // The directory holding owners is not a repository itself.
        assert!(matches!(fixture.repositories().layout, Layout::Owners));
        // A missing root is an error at start-up, not a 404 per request.
        assert!(Repositories::new(&fixture.base.join("missing")).is_err());
    }

    #[test]
    fn opened_repositories_are_cached_until_their_git_dir_changes() {
        let fixture = fixture();
        let gadget_dir = fixture.bare_clone("gadget.git");
        let repositories = fixture.repositories();
        let first = repositories.open("acme", "gadget").unwrap();
        let again = repositories.open("acme", "gadget").unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        let moved = fixture.root.join("acme/moved.git");
        fs::rename(&gadget_dir, &moved).unwrap();
        assert_repo_not_found(&repositories, "acme", "gadget");

        // Replaced by a different repository at the same path.
        let other = fixture.base.join("other");
        fs::create_dir_all(&other).unwrap();
        git(&other, &["init", "-q"]);
        git_at(
            &other,
            C3_TIME,
            &["commit", "-q", "--allow-empty", "-m", "other"],
        );
        git(
            &fixture.base,
            &[
                "clone",
                "-q",
                "--bare",
                other.to_str().unwrap(),
                gadget_dir.to_str().unwrap(),
            ],
        );
        let replaced = repositories.open("acme", "gadget").unwrap();
        assert!(!Arc::ptr_eq(&first, &replaced));
        let resolved = assert_resolves(&replaced, "main", RefKind::Branch("main".into()));
        assert_eq!(resolved.committer_time, C3_TIME);
        assert_not_found(&replaced, "v1.0");
    }

    #[test]
    fn has_path_finds_files_and_directories() {
        let fixture = fixture();
        let widget = fixture.widget();
        let c1 = &fixture.c1;
        for path in ["README", "src", "src/lib", "src/lib/mod.rs", "src/main.rs"] {
            assert!(widget.has_path(c1, path).unwrap(), "{path}");
        }
        for path in [
            "missing",
            "src/li",
            "src/lib/missing",
            "README/x",
            "src/main.rs/x",
            "late.txt",
        ] {
            assert!(!widget.has_path(c1, path).unwrap(), "{path}");
        }
    }

    #[test]
    fn repositories_are_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Repositories>();
        assert_send_sync::<Repository>();
        let fixture = fixture();
        let repositories = Arc::new(fixture.repositories());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let repositories = Arc::clone(&repositories);
                std::thread::spawn(move || {
                    repositories
                        .open("acme", "widget")
                        .unwrap()
                        .resolve("v1.0")
                        .unwrap()
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap().commit, fixture.c2);
        }
    }
}
