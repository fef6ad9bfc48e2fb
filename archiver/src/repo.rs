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
    collections::{HashMap, HashSet},
    fmt, fs, io,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, Weak},
};

use gix::hash::ObjectId;
use lru::LruCache;
use sha2::{Digest, Sha256};

use gitball_core::url::{RefKind, validate_name};

use crate::error::Error;

mod beneath;
mod confine;
mod flight;
mod kept;
mod packed;
mod places;
mod pool;
mod refs;
pub(crate) mod stamp;
mod subst;
#[cfg(test)]
mod tests;

pub use confine::layout_inside;
use confine::{alternates_stamps, git_files_sane, ref_path_without_symlinks};
use places::{Own, known_or_in_place};
pub use refs::RefsSnapshot;
use refs::{
    PeelFailure, find_abbreviated, find_reference, follow_ref, parse_full_hex, peel_to_commit,
    ref_candidates,
};
use stamp::{RACY_WINDOW, Stamp, Stamps};
use subst::{CLEAN_TREES, tree_substitutes};

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

/// How many objects' peeled commits a repository keeps
/// (`Repository::resolve_known`): about 100 bytes each.
const PEELED_OBJECTS: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// How many objects' failures to peel to a commit a repository keeps
/// (`Repository::known_failure`), those that the object's content
/// decides: a few hundred bytes each.
const FAILED_OBJECTS: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// How many `?path=` answers (is this path in this commit's tree) a
/// repository keeps: about 100 bytes each, the path kept as a digest
/// (`PathKey`).
const PATH_ANSWERS: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// How many looks for different `?path=`s run at once per repository,
/// each on one of the repositories' threads (`Own::path_checks`, `pool`).
const PATH_CHECKS: usize = 2;

/// How many first reads of objects for requests run at once per
/// repository, each on one of the repositories' threads (`Own::reading`,
/// `pool`).
const READS_PER_REPOSITORY: usize = 2;

/// How many git dirs' places `Repositories::own_places` holds at least
/// before it forgets those no handle holds any more.
const OWN_PLACES_PRUNED_PAST: usize = 64;

/// The most one read of an object may allocate, however the object is
/// stored (gix's `gitoxide.objects.allocLimit`): room for a commit within
/// `MAX_PEELED_OBJECT_BYTES` (16 MiB) rebuilt from a delta, which takes
/// its base, its result and the delta at once. A small commit stored as a
/// delta of a 1 GB object (a few KiB in a pushed pack) had each request
/// for it inflate the base: 4 GB of memory, 20 s of a serving thread
/// (attack). Set here, so a repository's own config cannot raise it, and
/// the same whoever owns the repository (gix sets 16 MiB by default only
/// for a repository another user owns).
const MAX_OBJECT_READ_BYTES: u64 = 64 * 1024 * 1024;

/// gix's caches of delta bases and of objects, by the keys gix reads for
/// them (`core.deltaBaseCacheLimit`; `gitoxide.core.deltaBaseCacheLimit`,
/// the one it reads for the default pack cache's limit, documented as
/// `gitoxide.core.defaultPackCacheMemoryLimit`; `gitoxide.objects.cacheLimit`):
/// none, whatever a repository's config says. Each is a thread's own, and
/// every call takes its own thread-local handle: a repository setting them
/// to gigabytes would have that much held per thread reading it, as many
/// as the repositories' threads (`kept::MAX_THREADS`). gix built without its
/// `max-performance` feature, as here, makes no caches at all; set here
/// so that turning it on lets no repository size them.
const OBJECT_CACHE_LIMITS: [(&str, i64); 4] = [
    ("core.deltaBaseCacheLimit", 0),
    ("gitoxide.core.deltaBaseCacheLimit", 0),
    ("gitoxide.core.defaultPackCacheMemoryLimit", 0),
    ("gitoxide.objects.cacheLimit", 0),
];

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
/// listing at a time: `Own::listing`).
const MAX_STAMPED_REF_DIRS: usize = 4096;

/// The repositories under `--repos DIR`, with a cache of opened ones.
pub struct Repositories {
    /// Canonical `--repos` directory.
    root: PathBuf,
    layout: Layout,
    /// `"{owner}/{name}"` → opened repository.
    open: Mutex<LruCache<String, Arc<Repository>>>,
    /// `stamp::RACY_WINDOW`, for the repositories opened.
    racy_window: std::time::Duration,
    /// The bound on the reachable sets its repositories keep, together.
    kept: Arc<kept::Kept>,
    /// Each repository's own places, by git dir, while a handle holds them.
    own: Mutex<OwnPlaces>,
}

/// [`Repositories::own_places`]'s map, and the size past which it next
/// forgets the places no handle holds.
#[derive(Debug, Default)]
struct OwnPlaces {
    by_git_dir: HashMap<PathBuf, Weak<Own>>,
    pruned_past: usize,
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
            kept: Arc::new(kept::Kept::default()),
            own: Mutex::default(),
        })
    }

    /// Keeps at most `commits` commits in reachable sets, together.
    #[cfg(test)]
    fn keeping_reachable_commits(mut self, commits: usize) -> Repositories {
        self.kept = Arc::new(kept::Kept::new(commits));
        self
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
        repository.packs_settled = repository.packs.settled(self.racy_window);
        repository.kept = Arc::clone(&self.kept);
        // Its places are the repository's, not this handle's: a handle
        // opened anew (alternates within the racy window) takes those of
        // the handles open before it.
        repository.own = self.own_places(&repository.git_dir);
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

    /// Lets go of the opened repositories whose directory is gone or
    /// replaced, or whose packs changed (a `statx` each, and one per
    /// alternates file and pack directory): gix keeps the packs it read
    /// mapped, so a deleted repository's packs kept their disk space until
    /// it was asked for again (`open`; attack), and packs a `git gc` or
    /// `repack -d` replaced until gix next missed an object, on a
    /// repository nobody pushes to never; so are those whose pack
    /// directories were stamped within the racy window, whose stamps may
    /// not show the next change. The next request opens the
    /// repository anew. Returns how many were let go. The checks run
    /// outside the lock, as `open`'s do.
    pub fn forget_stale(&self) -> usize {
        let opened: Vec<(String, Arc<Repository>)> = self
            .cache()
            .iter()
            .map(|(key, repository)| (key.clone(), Arc::clone(repository)))
            .collect();
        let mut forgotten = 0;
        for (key, repository) in opened {
            let current = repository.is_current();
            if current && repository.packs_settled && repository.packs.unchanged() {
                continue;
            }
            // Only its packs changed: it is opened anew here, off the
            // requests' way, and keeps what it knew of its objects, which
            // a repack does not change (review: every `git gc` had cost
            // the next request for a commit id a walk of the whole
            // history, and a repack of a fork network's pool each fork's).
            let reopened = current.then(|| self.reopen(&key, &repository)).flatten();
            let mut cache = self.cache();
            // Unless a request opened it anew meanwhile.
            if cache
                .peek(&key)
                .is_some_and(|cached| Arc::ptr_eq(cached, &repository))
            {
                match reopened {
                    Some(reopened) => cache.put(key, reopened),
                    None => cache.pop(&key),
                };
                forgotten += 1;
            }
        }
        forgotten
    }

    /// `repository` (cached under `key`) opened anew, with every check of
    /// an open, keeping the answers it knew that name objects by id (the
    /// commits its refs reach, under their digest; peeled ids; `?path=`
    /// and `export-subst` answers) and those its refs' stamps vouch for
    /// (the refs digest, resolved refs): `None` if it is no longer the same git
    /// dir, or could not be kept in the cache.
    fn reopen(&self, key: &str, repository: &Arc<Repository>) -> Option<Arc<Repository>> {
        let (owner, name) = key.split_once('/')?;
        let mut reopened = self.locate(owner, name).ok()?;
        if reopened.git_dir != repository.git_dir
            || reopened.identity != repository.identity
            || !reopened.alternates.settled(self.racy_window)
        {
            return None;
        }
        reopened.racy_window = self.racy_window;
        reopened.packs_settled = reopened.packs.settled(self.racy_window);
        reopened.kept = Arc::clone(&self.kept);
        reopened.own = Arc::clone(&repository.own);
        reopened.reachable = Arc::clone(&repository.reachable);
        reopened.substitutes = Arc::clone(&repository.substitutes);
        reopened.peeled = Arc::clone(&repository.peeled);
        reopened.failed = Arc::clone(&repository.failed);
        reopened.paths = Arc::clone(&repository.paths);
        // Kept while the files they came from keep their stamps, which a
        // repack does not change (`git gc` packing the refs does).
        reopened.refs = Arc::clone(&repository.refs);
        reopened.digest = Arc::clone(&repository.digest);
        Some(Arc::new(reopened))
    }

    /// The places of the repository whose git dir is `git_dir`: those of
    /// a handle open on it, else new ones. Places no handle holds any more
    /// are forgotten once the map has doubled since it last forgot some.
    fn own_places(&self, git_dir: &Path) -> Arc<Own> {
        let mut own = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(places) = own.by_git_dir.get(git_dir).and_then(Weak::upgrade) {
            return places;
        }
        if own.by_git_dir.len() >= own.pruned_past {
            own.by_git_dir.retain(|_, places| places.strong_count() > 0);
            own.pruned_past = (2 * own.by_git_dir.len()).max(OWN_PLACES_PRUNED_PAST);
        }
        let places = Arc::new(Own::default());
        own.by_git_dir
            .insert(git_dir.to_path_buf(), Arc::downgrade(&places));
        places
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
                                    let stamps =
                                        alternates_stamps(&repository, &objects, &self.root)?;
                                    Ok((stamps, pack_stamps(&objects)))
                                });
                        match checked {
                            Ok((alternates, packs)) => {
                                let mut repository = repository;
                                repository.alternates = alternates;
                                repository.packs = packs;
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

/// Opens `path` with gix as the archiver reads every repository: isolated
/// from system and user config, and replace refs off, as for `git
/// --no-replace-objects`: what gix reads (the tree behind `substitutes`,
/// reachability, the refs) must be what git archives.
///
/// `core.multiPackIndex=false`: gix reads each pack through its own index,
/// which git writes with every pack. A multi-pack-index is derived data the
/// repository carries, and one a repack left stale (naming packs that are
/// gone) hid from gix every object it listed, while git, falling back to
/// the packs' own indexes, read them: a published commit was `404`
/// (attack).
///
/// Two keys of gix's own, which git does not know, are read from the
/// repository's config: `gitoxide.core.shallowFile`, set back here to
/// `shallow` in the common dir (as git reads it), and
/// `gitoxide.core.refsNamespace`, cleared after the open. The first led
/// gix's walk to read a file anywhere (a FIFO outside `--repos` held it
/// for good); the second made `main` mean
/// `refs/namespaces/{ns}/refs/heads/main`, another commit than
/// `git rev-parse main` (attack).
fn open_isolated(path: &Path) -> gix::Result<gix::ThreadSafeRepository> {
    let mut repo = gix::open::Options::isolated()
        .config_overrides(
            [
                "core.useReplaceRefs=false".to_owned(),
                "core.multiPackIndex=false".to_owned(),
                "gitoxide.core.shallowFile=shallow".to_owned(),
                format!("gitoxide.objects.allocLimit={MAX_OBJECT_READ_BYTES}"),
            ]
            .into_iter()
            .chain(
                OBJECT_CACHE_LIMITS
                    .iter()
                    .map(|(key, value)| format!("{key}={value}")),
            ),
        )
        .open(path)?;
    repo.refs.namespace = None;
    Ok(repo)
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
    let packs = pack_stamps(&[common_dir.join("objects")]);
    Ok(Some(Repository {
        repo,
        reachable: Arc::new(Mutex::new(None)),
        kept: Arc::default(),
        substitutes: Arc::new(Mutex::new(LruCache::new(SUBSTITUTION_ANSWERS))),
        peeled: Arc::new(Mutex::new(LruCache::new(PEELED_OBJECTS))),
        peeling: Reads::default(),
        failed: Arc::new(Mutex::new(LruCache::new(FAILED_OBJECTS))),
        paths: Arc::new(Mutex::new(LruCache::new(PATH_ANSWERS))),
        finding: flight::Flights::default(),
        own: Arc::default(),
        refs: Arc::new(Mutex::new(LruCache::new(REMEMBERED_REFS))),
        digest: Arc::new(Mutex::new(None)),
        listings: Mutex::new(Listings::default()),
        racy_window: RACY_WINDOW,
        git_dir,
        common_dir,
        identity,
        alternates: Stamps::default(),
        packs,
        packs_settled: false,
        confined_to: confine_to.map(Path::to_path_buf),
        #[cfg(test)]
        walk_steps: WalkSteps::default(),
        #[cfg(test)]
        refs_digest_checks: std::sync::atomic::AtomicUsize::new(0),
    }))
}

/// What an object peels to: its commit and the commit's committer time,
/// or why it has none.
type Peeled = Result<(ObjectId, i64), PeelFailure>;

/// A read's answer for those waiting: `None` when the read was given up
/// before it ran (the request that was to read went away while it waited
/// for its place), and a request waiting for it then reads itself.
type ReadAnswer = Option<Peeled>;

/// Whose turn it is to read an object (`Repository::turn`).
type Turn = flight::Turn<ObjectId, ReadAnswer>;

/// The reads under way, by object (`Repository::peeling`).
type Reads = flight::Flights<ObjectId, ReadAnswer>;

/// A caller's turn to read an object (`Repository::read`): a read that
/// panicked hands those waiting an error, one given up before it ran
/// `None`.
type Reader = flight::Worker<ObjectId, ReadAnswer>;

/// A `?path=` asked of a commit: the commit, and a digest of the path
/// (up to `MAX_SUBTREE_BYTES`, 1,024 bytes), so an answer kept takes the
/// same memory whatever the path's length.
type PathKey = (ObjectId, [u8; 32]);

/// Whether a path is in a commit's tree, or why that could not be read
/// (the text of an `Error::Internal`); `None` when the look was given up
/// before it ran (the request that was to look went away while it waited
/// for its place), and a request waiting for it then looks itself.
type PathAnswer = Option<Result<bool, String>>;

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

/// The listings of the refs for their digest: how many began, and the
/// latest one's answer. A request takes the answer of a listing that began
/// after it arrived, never of one under way when it came, which may have
/// read the refs before a push the request must see.
#[derive(Debug, Default)]
struct Listings {
    begun: u64,
    /// The latest listing that ended: its number (the count of listings
    /// begun before it) and its digest.
    latest: Option<(u64, String)>,
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

/// The stamps of the pack directories of `objects` (object directories):
/// none where one cannot be read, which then never counts as changed.
fn pack_stamps(objects: &[PathBuf]) -> Stamps {
    Stamps::take(objects.iter().map(|dir| dir.join("pack"))).unwrap_or_default()
}

/// One opened repository. Shared between requests; each call takes its own
/// thread-local `gix` handle, so calls may run on any thread concurrently.
#[derive(Debug)]
pub struct Repository {
    repo: gix::ThreadSafeRepository,
    /// The commits some ref reaches, for the refs state whose digest is
    /// kept beside them (`--require-reachable`), within the bound of
    /// `kept`, shared by every repository open.
    reachable: kept::Slot,
    kept: Arc<kept::Kept>,
    /// Commit → whether its tree asks for `export-subst` (trees never
    /// change, so the answer is kept).
    substitutes: Arc<Mutex<LruCache<ObjectId, bool>>>,
    /// Object id → the commit it peels to and the commit's committer time
    /// (an id names its content: the answer never changes).
    peeled: Arc<Mutex<LruCache<ObjectId, (ObjectId, i64)>>>,
    /// Object being read → that read, whose answer the requests for it
    /// that arrive meanwhile wait for and take: it is read once (its cost
    /// is a push's to decide: a delta chain through large objects). One
    /// per object, not one per repository: requests for one costly, broken
    /// object would otherwise hold up every other object's first read in
    /// the repository (review). A request waits on the runtime, holding
    /// no thread (`Repository::peel_waiting`): hundreds waiting for one
    /// object had each held one of the runtime's blocking threads, and
    /// every other repository's work off the serving threads queued behind
    /// them (review).
    peeling: Reads,
    /// Object id → why it does not peel to a commit, for the failures its
    /// content decides (`PeelFailure::is_content`): requests for a broken
    /// object read it once, not once each. "Not found" is never kept (a
    /// push or a fetch can bring the object), nor a read over the
    /// allocation bound (a repack can store the object otherwise).
    failed: Arc<Mutex<LruCache<ObjectId, PeelFailure>>>,
    /// (Commit, path) → whether the path is in the commit's tree (an id
    /// names its content: the answer never changes), so that the trees on
    /// a `?path=` are read once, not on every request, hits included
    /// (attack: 500 nested trees of 8 MB, 2.7 s of a blocking thread per
    /// request). A failure to read (I/O, the allocation bound, an object
    /// missing) is never kept.
    paths: Arc<Mutex<LruCache<PathKey, bool>>>,
    /// (Commit, path) being looked for → that look, whose answer the
    /// requests for it that arrive meanwhile wait for on the runtime and
    /// take, as for `peeling`.
    finding: flight::Flights<PathKey, PathAnswer>,
    /// The places of each kind of work on the repository: its own, shared
    /// by every handle open on it (`Repositories::own_places`).
    own: Arc<Own>,
    /// User's ref (as in the URL) → what it resolved to, while the files
    /// the answer came from are unchanged.
    refs: Arc<Mutex<LruCache<String, RememberedRef>>>,
    /// The refs digest, while nothing under `refs/` changed.
    digest: Arc<Mutex<Option<RememberedDigest>>>,
    /// The listings of the refs begun and the latest answer: what the
    /// requests that arrive while the digest cannot be remembered (the
    /// refs changed within the racy window) share.
    listings: Mutex<Listings>,
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
    /// The pack directories of every object directory (of its own alone
    /// for a repository the operator named), as at the open: gix keeps the
    /// packs it read mapped, so a handle whose packs a repack replaced is
    /// let go (`Repositories::forget_stale`), which unmaps them.
    packs: Stamps,
    /// Whether no pack directory had changed within the racy window when
    /// `packs` was taken (judged just after, as ref stamps are). One that
    /// had may change again within the same clock tick and keep its stamp
    /// (a repack replacing the pack a push had just brought): its handle
    /// is opened anew by the next sweep, which stamps its packs again.
    packs_settled: bool,
    /// `--repos`, which everything the repository leads to must stay under
    /// (`layout_inside`); `None` for a repository the operator named alone.
    confined_to: Option<PathBuf>,
    /// Test only: run between the steps of a history walk.
    #[cfg(test)]
    walk_steps: WalkSteps,
    /// Test only: how many times the remembered refs digest was checked
    /// against its stamps (one `statx` per loose ref and directory each).
    #[cfg(test)]
    pub(crate) refs_digest_checks: std::sync::atomic::AtomicUsize,
}

/// Test only: what a history walk runs after its first listing of the
/// refs and after reading its tips, each once, in order (a push there).
#[cfg(test)]
#[derive(Default)]
pub(crate) struct WalkSteps(Mutex<std::collections::VecDeque<Box<dyn FnOnce() + Send>>>);

#[cfg(test)]
impl std::fmt::Debug for WalkSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WalkSteps")
    }
}

#[cfg(test)]
impl WalkSteps {
    /// Runs `step` at the next step of a walk.
    pub(crate) fn then(&self, step: impl FnOnce() + Send + 'static) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(Box::new(step));
    }

    fn run_next(&self) {
        let step = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        if let Some(step) = step {
            step();
        }
    }
}

/// What [`Repository::find`] found: the answer, or an object to peel.
#[derive(Debug)]
pub enum RefLookup {
    Known(Resolved),
    Found(Found),
}

/// An object a ref names, not yet read ([`Repository::peel_found`]).
#[derive(Debug)]
pub struct Found {
    /// The user's ref, as in the URL.
    reference: String,
    target: ObjectId,
    kind: RefKind,
    /// The files the answer came from, for a name, when they were settled
    /// as it was read: the answer may be remembered.
    stamps: Option<Stamps>,
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

    fn known_peeled(&self, id: &ObjectId) -> Option<(ObjectId, i64)> {
        self.peeled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .copied()
    }

    /// Why `id` does not peel to a commit, if that is remembered: a lookup.
    fn known_failure(&self, id: &ObjectId) -> Option<PeelFailure> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// What is known of `id` without reading it: its commit, or why it
    /// has none.
    fn known(&self, id: &ObjectId) -> Option<Peeled> {
        match self.known_peeled(id) {
            Some(peeled) => Some(Ok(peeled)),
            None => self.known_failure(id).map(Err),
        }
    }

    /// Whose turn it is to read `id`: nobody's (its answer is known), a
    /// read under way's, or this caller's, who must then
    /// [`Repository::read`] it.
    fn turn(&self, id: ObjectId) -> Turn {
        flight::turn(
            &self.peeling,
            id,
            || self.known(&id).map(Some),
            // Given up before it ran: those waiting read again.
            |_| None,
        )
    }

    /// Reads the object whose turn `reader` is, keeps its answer if it
    /// cannot change, and hands it to the requests waiting for it.
    fn read(&self, repo: &gix::Repository, mut reader: Reader) -> Peeled {
        let id = reader.key;
        // What those waiting take if the reading panics: an error, not a
        // read again (which would panic again, once for each).
        reader.answer = Some(Some(Err(PeelFailure::Unreadable(format!(
            "reading object {id} panicked"
        )))));
        let answer = peel_to_commit(repo, id);
        match &answer {
            Ok(peeled) => {
                self.peeled
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .put(id, *peeled);
            }
            Err(failure) if failure.is_content() => {
                self.failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .put(id, failure.clone());
            }
            Err(_) => {}
        }
        reader.answer = Some(Some(answer.clone()));
        answer
    }

    /// [`peel_to_commit`], read once per object: requests for an object
    /// being read wait for that read and take its answer. For the
    /// reachability walk, on one of the repositories' threads already (one walk at a time
    /// per repository); requests wait with [`Repository::peel_waiting`].
    ///
    /// A waiter that the read answers "missing" asks once more: that read
    /// began before the waiter came, maybe before a push that brought the
    /// object, and a push is visible to the very next request (review of
    /// 2b0b416: the waiters took a "not found" begun before the push). Any
    /// read it then finds under way began after it came: `peeling` holds
    /// one read per object, and the first left it before answering.
    fn peel(&self, repo: &gix::Repository, id: ObjectId) -> Result<(ObjectId, i64), Error> {
        let mut asked_again = false;
        loop {
            let answer = match self.turn(id) {
                Turn::Known(known) => known,
                Turn::Wait(reading) => match reading.wait_blocking() {
                    Some(Err(PeelFailure::Missing)) if !asked_again => {
                        asked_again = true;
                        continue;
                    }
                    answer => answer,
                },
                Turn::Work(reader) => Some(self.read(repo, reader)),
            };
            // `None`: the read waited for was given up; a turn again.
            if let Some(answer) = answer {
                return answer.map_err(|failure| failure.error());
            }
        }
    }

    /// [`Repository::peel`] for a request: the object is read on one of the
    /// repositories' threads (`pool`), and a request that finds it being read waits for that read
    /// on the runtime, holding no thread.
    /// As there, a waiter answered "missing" asks once more.
    ///
    /// A read takes one of its repository's `READS_PER_REPOSITORY` places,
    /// then one of `kept::MAX_READS` shared by every repository open, each
    /// waited for on the runtime in the request whose turn it is: reads of
    /// one costly commit in each of many forks (a fork costs a push
    /// nothing) run that many at once, not one per fork (review of
    /// 1e89ccc). A request gone while it waits gives the read
    /// up, and one of those waiting for it, if any, reads instead; a read
    /// that has begun goes on, and its answer is there for the others.
    async fn peel_waiting(self: &Arc<Self>, id: ObjectId) -> Result<(ObjectId, i64), Error> {
        let mut asked_again = false;
        loop {
            let answer = match self.turn(id) {
                Turn::Known(known) => known,
                Turn::Wait(reading) => match reading.wait().await {
                    Some(Err(PeelFailure::Missing)) if !asked_again => {
                        asked_again = true;
                        continue;
                    }
                    answer => answer,
                },
                Turn::Work(reader) => {
                    let own = self.own.reading.take().await;
                    let across = self.kept.reads().take().await;
                    let repository = Arc::clone(self);
                    // A request that goes away leaves the read to finish,
                    // and its answer to those waiting.
                    let answer = self
                        .kept
                        .threads()
                        .run((own, across), move || {
                            repository.read(&repository.repo.to_thread_local(), reader)
                        })
                        .await
                        .map_err(|lost| {
                            Error::internal(format_args!("reading the commit: {lost}"))
                        })?;
                    Some(answer)
                }
            };
            // `None`: the read waited for was given up; a turn again.
            if let Some(answer) = answer {
                return answer.map_err(|failure| failure.error());
            }
        }
    }

    /// Resolves a user's ref (already validated by `url::validate_ref`) to a
    /// commit, in `git rev-parse` order, spawning no process.
    ///
    /// A ref name's answer is remembered while the files it came from keep
    /// their stamps (see the module docs): a hit costs one `statx` per file.
    /// The server calls its two halves apart ([`Repository::find`] on a
    /// serving thread, [`Repository::peel_found`] off it); the tests call it
    /// whole.
    #[cfg(test)]
    pub fn resolve(&self, reference: &str) -> Result<Resolved, Error> {
        match self.find(reference)? {
            RefLookup::Known(resolved) => Ok(resolved),
            RefLookup::Found(found) => self.peel_found(found),
        }
    }

    /// [`Repository::resolve`]'s first half, which reads refs but no
    /// object: the object the ref names, or the whole answer when the name
    /// is remembered or that object was peeled before. A [`Found`] object
    /// is then peeled by [`Repository::peel_found`], off the serving
    /// threads: it may be a delta at the end of a chain through large
    /// objects, whose cost a push decides (attack).
    pub fn find(&self, reference: &str) -> Result<RefLookup, Error> {
        if parse_full_hex(reference).is_none() {
            let remembered = self.remembered_refs().get(reference).cloned();
            if let Some(remembered) = remembered {
                if remembered.stamps.unchanged() {
                    return Ok(RefLookup::Known(remembered.resolved));
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
                    // Judged now, just after the read: judged once the
                    // object is peeled (off the serving thread, maybe
                    // behind another read), a ref rewritten within one
                    // clock tick of this read would pass for settled, and
                    // its stale answer be remembered (review).
                    stamps = answer.settled(self.racy_window).then_some(answer);
                    (found.id, found.kind)
                }
                None => match find_abbreviated(&repo, reference)? {
                    Some(id) => (id, RefKind::Commit),
                    None => return Err(Error::RefNotFound),
                },
            }
        };
        let found = Found {
            reference: reference.to_owned(),
            target,
            kind,
            stamps,
        };
        Ok(match self.known(&target) {
            // A commit asked for by its id is known from the memo only while
            // the object is still there: `gc` may have pruned it since, and
            // it is then "not found", as before it was first read (review:
            // with `--require-reachable false`, a pruned commit's archive
            // was served, or its generation failed, instead of a 404). An
            // index lookup, or one `stat` for a loose object; a name's
            // object is in a ref, which `gc` keeps.
            Some(_) if matches!(found.kind, RefKind::Commit) && !repo.has_object(target) => {
                return Err(Error::RefNotFound);
            }
            Some(Ok(peeled)) => RefLookup::Known(self.resolved(found, peeled)),
            // A remembered failure is answered here, with no blocking
            // thread and no wait.
            Some(Err(failure)) => return Err(failure.error()),
            None => RefLookup::Found(found),
        })
    }

    /// [`Repository::resolve`]'s second half: reads the object
    /// [`Repository::find`] found (once per object) and peels it to a
    /// commit, as [`Repository::peel_found_waiting`] does for a request.
    #[cfg(test)]
    pub fn peel_found(&self, found: Found) -> Result<Resolved, Error> {
        let peeled = self.peel(&self.repo.to_thread_local(), found.target)?;
        Ok(self.resolved(found, peeled))
    }

    /// [`Repository::resolve`]'s second half for a request: reads the
    /// object [`Repository::find`] found on one of the repositories' threads
    /// (`pool`), once however
    /// many requests ask for it (they wait on the runtime, holding no
    /// thread), and peels it to a commit.
    pub async fn peel_found_waiting(self: &Arc<Self>, found: Found) -> Result<Resolved, Error> {
        let peeled = self.peel_waiting(found.target).await?;
        Ok(self.resolved(found, peeled))
    }

    /// The answer for `found`, which peels to `peeled`; remembered by name
    /// when its files were settled as they were read.
    fn resolved(&self, found: Found, (commit, committer_time): (ObjectId, i64)) -> Resolved {
        let resolved = Resolved {
            commit: commit.to_hex().to_string(),
            kind: found.kind,
            committer_time,
        };
        if let Some(stamps) = found.stamps {
            self.remembered_refs().put(
                found.reference,
                RememberedRef {
                    stamps,
                    resolved: resolved.clone(),
                },
            );
        }
        resolved
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
    ///
    /// Read on one of the repositories' threads (`pool`), one walk at a time
    /// per repository:
    /// requests for a new commit that arrive together wait for it on the
    /// runtime and find its answer (review); and at most
    /// `kept::MAX_JUDGINGS` at a time across repositories, after the
    /// repository's own place (review of 1e89ccc: a commit with costly
    /// trees asked for in each of many forks walked them in each at once,
    /// a blocking thread per fork).
    pub async fn substitutes(self: &Arc<Self>, commit: &str) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        let repository = Arc::clone(self);
        known_or_in_place(
            "reading the attributes",
            self.kept.threads(),
            &[&self.own.judging, self.kept.judgings()],
            || self.known_substitutes(commit),
            move || repository.judge_substitutes(id),
        )
        .await
    }

    /// [`Repository::substitutes`]'s reading, in its place.
    fn judge_substitutes(&self, id: ObjectId) -> Result<bool, Error> {
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
    /// kept until a ref changes, or until other repositories' sets need
    /// the room (`kept`): about 30 bytes per commit.
    ///
    /// `refs` is the digest of the refs when the caller already took it
    /// (`refs_digest`); the listing is not repeated then.
    ///
    /// The walk runs on one of the repositories' threads (`pool`), in its
    /// places: one walk at a
    /// time per repository, so that requests that arrive meanwhile (a
    /// crawler's commit ids, after a push) take its answer instead of each
    /// walking the history and holding its set of commits (attack: 64 at
    /// once took 1.7 GB); and a few walks at a time across repositories,
    /// each holding a set as large as its history while it walks (`kept`).
    /// Requests wait for both on the runtime, holding no thread (review:
    /// each had held a blocking thread while one walk ran).
    pub async fn reaches(
        self: &Arc<Self>,
        commit: &str,
        refs: Option<String>,
    ) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        let refs = match refs {
            Some(refs) => refs,
            None => self.refs_digest().await?,
        };
        let repository = Arc::clone(self);
        known_or_in_place(
            "walking the history",
            self.kept.threads(),
            &[&self.own.walking, self.kept.walks()],
            || self.known_reach(&id, &refs),
            move || repository.walk_reachable(id),
        )
        .await
    }

    /// Whether some ref reaches `id`, if the set for the refs whose digest
    /// is `refs` is kept: a lookup, which uses that set last.
    fn known_reach(&self, id: &ObjectId, refs: &str) -> Option<bool> {
        let answer = {
            let reachable = self
                .reachable
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let known = reachable.as_ref()?;
            (known.refs == refs).then(|| known.commits.contains(id))?
        };
        self.kept.touch(&self.reachable);
        Some(answer)
    }

    /// [`Repository::reaches`]'s walk, in its places: keeps the set of
    /// commits reachable from the refs.
    ///
    /// The set is kept under the digest of the refs this walk listed, taken
    /// afresh before and after listing them, and only when the two agree
    /// with the digest of the refs the tips were read from (a push and its
    /// force-push back, both while the tips were read, leave the two equal
    /// and the tips the push's: review): not under `refs`, which the caller
    /// took before waiting for the walk places, maybe before a push (review
    /// of 9caf797: the set of a push made meanwhile was kept under the
    /// older digest, and a commit pushed by mistake and force-pushed away,
    /// the refs back as they were, was served by its id). The refs are
    /// listed with a handle opened afresh, as the digest's are
    /// (`list_and_keep_refs_digest`).
    fn walk_reachable(&self, id: ObjectId) -> Result<bool, Error> {
        let listed = self.current_refs_digest()?;
        let repo = self.repo.to_thread_local();
        let fresh = open_isolated(&self.git_dir)
            .map_err(|err| {
                Error::internal(format_args!("opening {}: {err}", self.git_dir.display()))
            })?
            .to_thread_local();
        #[cfg(test)]
        self.walk_steps.run_next();
        let mut tips = Vec::new();
        // The refs the tips are read from, listed in the same pass: a push
        // and its force-push back, both while the tips were read, leave the
        // digests before and after equal, and the tips the push's.
        let read = RefsSnapshot::of_each(&fresh, |name, target| {
            // A ref's object is peeled as `resolve` peels it, each object
            // once: gix's own peeling reads the object whole, every tip on
            // every walk (attack: 30 tags on a commit read through a chain
            // of deltas took 30 reads of it after each push).
            let target = match target {
                gix::refs::Target::Object(id) => Some(*id),
                // Followed to the object's id as `resolve` follows it (the
                // listing checked the ref files), which is not read here
                // (`peel_to_id` would read it, on every walk, as `HEAD`
                // leads to a branch's commit: review).
                gix::refs::Target::Symbolic(_) => std::str::from_utf8(name.as_bstr())
                    .ok()
                    .and_then(|name| follow_ref(&fresh, name, &|_| Ok(()), &mut Vec::new()).ok())
                    .flatten(),
            };
            // Refs to trees or blobs, and dangling ones, reach no commit.
            if let Some(target) = target
                && let Ok((tip, _)) = self.peel(&repo, target)
            {
                tips.push(tip);
            }
        })?;
        if let Ok(Some(head)) = follow_ref(&fresh, "HEAD", &|_| Ok(()), &mut Vec::new())
            && let Ok((tip, _)) = peel_to_commit(&repo, head)
        {
            tips.push(tip);
        }
        #[cfg(test)]
        self.walk_steps.run_next();
        // A push while the refs were listed: the set is this request's
        // answer, kept for no digest.
        let after = self.current_refs_digest()?;
        let refs = (read.digest() == listed && after == listed).then_some(listed);
        let walk = |use_commit_graph: bool| -> Result<HashSet<ObjectId>, Error> {
            let walk = repo
                .rev_walk(tips.iter().copied())
                .use_commit_graph(use_commit_graph)
                .all()
                .map_err(|err| Error::internal(format_args!("walking the history: {err}")))?;
            let mut commits = HashSet::new();
            for info in walk {
                let info = info
                    .map_err(|err| Error::internal(format_args!("walking the history: {err}")))?;
                commits.insert(info.id);
            }
            Ok(commits)
        };
        // A damaged commit-graph (a commit's id in it not the id of any
        // object: a disk's or a tool's fault) led the walk to an object
        // that is not there, and every request by commit id was a `500`
        // while git, which then reads the commit objects, walked on
        // (`a_damaged_commit_graph_leaves_commits_served_by_their_ids`).
        // The objects are walked instead; a walk that fails without the
        // graph too fails the request.
        let commits = match walk(true) {
            Ok(commits) => commits,
            Err(error) => {
                tracing::warn!(%error, "the walk of the history through the commit-graph failed; walked again without it");
                walk(false)?
            }
        };
        let answer = commits.contains(&id);
        let count = commits.len();
        if let Some(refs) = refs {
            *self
                .reachable
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Reachable {
                refs: refs.clone(),
                commits,
            });
            self.kept.record(&self.reachable, &refs, count);
        }
        Ok(answer)
    }

    /// The refs digest now: remembered, or listed (and remembered when
    /// settled).
    fn current_refs_digest(&self) -> Result<String, Error> {
        match self.known_refs_digest() {
            Some(digest) => Ok(digest),
            None => self.list_and_keep_refs_digest(),
        }
    }

    /// A digest of every ref and of `HEAD`: what ref-reading `export-subst`
    /// placeholders see. Two replicas with the same refs give the same
    /// digest, and so the same bytes.
    ///
    /// Remembered while every directory and loose ref under `refs/`,
    /// `packed-refs` and `HEAD` keep their stamps: git changes a ref by
    /// renaming a lock file into its directory, which changes the
    /// directory's stamp as well as the ref's.
    ///
    /// Listed on one of the repositories' threads (`pool`), one listing at a
    /// time per repository
    /// and at most `kept::MAX_LISTINGS` across repositories (review of
    /// 1e89ccc: forks with many refs, asked for at once, listed them in
    /// each at once, a blocking thread per fork):
    /// requests that find the digest unknown wait on the runtime for the
    /// listing under way, and find the digest it kept. While the refs keep
    /// changing within the racy window no digest is kept: the requests
    /// then take the answer of the first listing that began after they
    /// arrived, which saw every push made before them (before, each
    /// listed the refs again in turn: with 100,000 refs, about 1.5 s
    /// each, a queue that grew with every request for 2 s after a push).
    pub async fn refs_digest(self: &Arc<Self>) -> Result<String, Error> {
        let arrival = self.listings().begun;
        let repository = Arc::clone(self);
        known_or_in_place(
            "listing the refs",
            self.kept.threads(),
            &[&self.own.listing, self.kept.listings()],
            || {
                self.known_refs_digest()
                    .or_else(|| self.listed_since(arrival))
            },
            move || repository.list_and_keep_refs_digest(),
        )
        .await
    }

    fn listings(&self) -> std::sync::MutexGuard<'_, Listings> {
        self.listings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The digest of the latest listing if it began as the `arrival`th
    /// or later.
    fn listed_since(&self, arrival: u64) -> Option<String> {
        let listings = self.listings();
        let (number, digest) = listings.latest.as_ref()?;
        (*number >= arrival).then(|| digest.clone())
    }

    /// [`Repository::refs_digest`]'s listing, in its place: keeps the
    /// digest when the refs are settled, and as the latest listing's.
    fn list_and_keep_refs_digest(&self) -> Result<String, Error> {
        let number = {
            let mut listings = self.listings();
            listings.begun += 1;
            listings.begun - 1
        };
        // Stamped before listing, as for `resolve`, and judged settled
        // right then: judged once the listing ended (1.5 s for 100,000
        // refs), a change one clock tick before the stamps passed for
        // settled, and a second write in that tick, after the listing read
        // the ref, left the stamps of a stale digest (review).
        let stamps = self
            .stamp_all_refs()?
            .filter(|stamps| stamps.settled(self.racy_window));
        // Stamped before listing too, for the same reason: an object that
        // comes while the listing runs changes these.
        let arrivals = self
            .stamp_object_arrivals()
            .filter(|stamps| stamps.settled(self.racy_window));
        // Read afresh, as a generation reads them (`RefsSnapshot::at`):
        // gix's long-lived handle reloads `packed-refs` only when its mtime
        // is newer, and a rewrite within one clock tick would leave the two
        // disagreeing for good (every such archive then failing as
        // `refs_changed`).
        let listed = RefsSnapshot::at(&self.git_dir)?;
        let digest = listed.digest();
        // A ref left out for its object not being there is listed once the
        // object comes, which no ref file's stamp tells (kept by those
        // alone, the digest had stayed while each generation's snapshot,
        // listed afresh, had the ref: every `export-subst` archive a
        // `refs_changed`): such a digest is remembered by the stamps of
        // where an object can come as well. Not remembered at all, it had
        // been listed again for every request (100,000 refs: 2 s each, for
        // one pruned tag: attack).
        let stamps = match (stamps, listed.objects_missing) {
            (Some(mut stamps), true) => arrivals.map(|arrivals| {
                stamps.extend(arrivals);
                stamps
            }),
            (stamps, _) => stamps,
        };
        {
            let mut listings = self.listings();
            if listings
                .latest
                .as_ref()
                .is_none_or(|(latest, _)| *latest < number)
            {
                listings.latest = Some((number, digest.clone()));
            }
        }
        if let Some(stamps) = stamps {
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
        #[cfg(test)]
        self.refs_digest_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let known = self
            .digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        known.stamps.unchanged().then_some(known.digest)
    }

    /// Whether some ref reaches `commit`, if that is known without reading
    /// the history or listing the refs ([`Repository::reaches`] answers so
    /// then, with no blocking thread and no wait).
    #[cfg(test)]
    pub fn reaches_known(&self, commit: &str, refs: Option<&str>) -> Option<bool> {
        let id = ObjectId::from_hex(commit.as_bytes()).ok()?;
        let refs = match refs {
            Some(refs) => refs.to_owned(),
            None => self.known_refs_digest()?,
        };
        self.known_reach(&id, &refs)
    }

    /// Stamps of what vouches for the refs digest: `packed-refs`, `shallow`, `HEAD`,
    /// every directory under `refs/` and, up to `MAX_STAMPED_REF_FILES` of
    /// them, the loose refs (past that, their directories alone). `None`
    /// past `MAX_STAMPED_REF_DIRS` directories (the digest is then not
    /// kept).
    fn stamp_all_refs(&self) -> Result<Option<Stamps>, Error> {
        let mut stamps = Stamps::default();
        stamps
            .add(self.common_dir.join("packed-refs"))
            .map_err(stat_error)?;
        // Listed with the refs (`RefsSnapshot::shallow`); git rewrites it
        // by renaming a lock file over it, or deletes it.
        stamps
            .add(self.common_dir.join("shallow"))
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
            if matches!(
                stamps.add(directory.clone()).map_err(stat_error)?,
                Stamp::Absent | Stamp::Unreadable | Stamp::UnderAFile
            ) {
                continue;
            }
            directories += 1;
            let entries = match fs::read_dir(&directory) {
                Ok(entries) => entries,
                // Listed by git as by the listing, not at all: its own
                // stamp (a `chmod` changes it) vouches that it stays so.
                Err(error) if error.kind() == io::ErrorKind::PermissionDenied => continue,
                Err(error) => return Err(stat_error(error)),
            };
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

    /// The stamps of every place an object can come to in the object
    /// directories the repository reads: each fan-out directory (a loose
    /// object is renamed into it, or it is made for one), `pack` (a pack
    /// is renamed into it) and `info/alternates` (another directory
    /// named). `None` when one cannot be stamped.
    fn stamp_object_arrivals(&self) -> Option<Stamps> {
        let mut paths = Vec::new();
        for objects in self.object_dirs()? {
            paths.push(objects.join("info/alternates"));
            paths.push(objects.join("pack"));
            paths.extend((0..=255u8).map(|fan_out| objects.join(format!("{fan_out:02x}"))));
        }
        Stamps::take(paths).ok()
    }

    /// The object directories the repository reads, its own first: those
    /// checked at the open, and those gix follows alternates to (for a
    /// repository the operator named, which are not checked). `None` when
    /// gix cannot say.
    fn object_dirs(&self) -> Option<Vec<PathBuf>> {
        let mut dirs = vec![self.common_dir.join("objects")];
        dirs.extend(
            self.packs
                .paths()
                .filter_map(|pack| pack.parent().map(Path::to_path_buf)),
        );
        dirs.extend(self.repo.objects.alternate_db_paths().ok()?);
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|dir| seen.insert(dir.clone()));
        Some(dirs)
    }

    /// A linked work tree: some refs live in its own git dir.
    fn linked(&self) -> bool {
        self.git_dir != self.common_dir
    }

    /// True when `path` (a literal relative path, validated by
    /// `url::validate_subtree`) names a tree, file or symlink in `commit`'s
    /// tree. A submodule is not something `git archive` can include.
    ///
    /// Each tree on the path is read whole, and a push decides how large
    /// (attack: 500 nested trees of 8 MB, 2.7 s), so the answer is kept
    /// (`paths`): a later request for the same `?path=`, a cache hit, a
    /// `HEAD` or a `304`, reads no tree. A path not known is looked for on
    /// one of the repositories' threads (`pool`), once however many requests ask for it together
    /// (they wait on the runtime, holding no thread, and take its answer,
    /// an error too), and at most `PATH_CHECKS` different paths at a time
    /// per repository and `kept::MAX_PATH_LOOKS` across repositories (a
    /// look waits for its places on the runtime).
    ///
    /// The request whose turn it is waits for the place itself: if it goes
    /// away meanwhile, the look is given up, and one of the requests
    /// waiting for it, if any, looks instead; no look is left to run that
    /// no request waits for (review: a client asking for many paths and
    /// leaving left as many looks queued). A look that has begun goes on
    /// when its request goes away, so its answer is there for the others.
    #[cfg(test)]
    pub async fn has_path(self: &Arc<Self>, commit: &str, path: &str) -> Result<bool, Error> {
        self.has_path_paid(commit, path, || Ok(())).await
    }

    /// [`Repository::has_path`], calling `pay` before this request looks
    /// (reads trees) itself: not for an answer known, nor one another
    /// request is looking for. An error from `pay` is the answer, and the
    /// look is given up (a request waiting for it looks instead).
    pub async fn has_path_paid(
        self: &Arc<Self>,
        commit: &str,
        path: &str,
        pay: impl FnOnce() -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let id = ObjectId::from_hex(commit.as_bytes())
            .map_err(|err| Error::internal(format_args!("commit id {commit:?}: {err}")))?;
        let key: PathKey = (id, Sha256::digest(path.as_bytes()).into());
        let mut pay = Some(pay);
        loop {
            let answer = match self.path_turn(key) {
                flight::Turn::Known(answer) => answer,
                flight::Turn::Wait(looking) => looking.wait().await,
                flight::Turn::Work(finder) => {
                    if let Some(pay) = pay.take() {
                        pay()?;
                    }
                    self.look_for_path(finder, path).await?
                }
            };
            // `None`: the look waited for was given up; a turn again.
            if let Some(answer) = answer {
                return answer.map_err(Error::Internal);
            }
        }
    }

    /// Looks for `path` in the commit whose turn `finder` is, on one of the
    /// repositories' threads (`pool`), once it holds its places: waited for here, in the request, so
    /// that a request gone away drops `finder` (the look given up) rather
    /// than leaving a look to run for nobody.
    async fn look_for_path(
        self: &Arc<Self>,
        finder: flight::Worker<PathKey, PathAnswer>,
        path: &str,
    ) -> Result<PathAnswer, Error> {
        // The repository's own place, then one across repositories
        // (`kept::MAX_PATH_LOOKS`): many forks at once take no more.
        let own = self.own.path_checks.take().await;
        let across = self.kept.path_looks().take().await;
        let repository = Arc::clone(self);
        let path = path.to_owned();
        self.kept
            .threads()
            .run((own, across), move || repository.find_path(finder, &path))
            .await
            .map_err(|lost| Error::internal(format_args!("finding the path: {lost}")))
    }

    /// Whose turn it is to look for the path `key`: nobody's (its answer
    /// is kept), a look under way's, or the caller's.
    fn path_turn(&self, key: PathKey) -> flight::Turn<PathKey, PathAnswer> {
        flight::turn(
            &self.finding,
            key,
            || self.known_path(&key).map(|found| Some(Ok(found))),
            // Given up before it ran: those waiting look again.
            |_| None,
        )
    }

    /// Whether the path `key` is in its commit's tree, if that is kept: a
    /// lookup, no object read.
    fn known_path(&self, key: &PathKey) -> Option<bool> {
        self.paths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// Looks for `path` in the commit whose turn `finder` is, keeps the
    /// answer unless it is an error, and hands it to the requests waiting.
    fn find_path(&self, mut finder: flight::Worker<PathKey, PathAnswer>, path: &str) -> PathAnswer {
        let (id, _) = finder.key;
        // What those waiting take if the reading panics: an error, not a
        // look again (which would panic again, once for each).
        finder.answer = Some(Some(Err(format!("finding a path in {id} panicked"))));
        let answer = match self.read_path(id, path) {
            Ok(found) => {
                self.paths
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .put(finder.key, found);
                Ok(found)
            }
            Err(Error::Internal(text)) => Err(text),
            Err(error) => Err(error.to_string()),
        };
        finder.answer = Some(Some(answer.clone()));
        Some(answer)
    }

    /// [`Repository::has_path`]'s reading: every tree on the path.
    fn read_path(&self, id: ObjectId, path: &str) -> Result<bool, Error> {
        let repo = self.repo.to_thread_local();
        let commit = repo
            .find_commit(id)
            .map_err(|err| Error::internal(format_args!("commit {id}: {err}")))?;
        let mut tree = commit
            .tree()
            .map_err(|err| Error::internal(format_args!("tree of {id}: {err}")))?;
        let mut components = path.split('/').peekable();
        while let Some(component) = components.next() {
            let Some((mode, entry_id)) = entry_named(&tree, component)? else {
                return Ok(false);
            };
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

/// The mode and id of the entry `name` in `tree`, or an error if the tree
/// does not parse up to it: gix's `Tree::find_entry` skips what it cannot
/// parse, so a corrupt tree's path was "not there", and that answer kept
/// (`Repository::paths`) as if the tree said so (review of 2df3306).
fn entry_named(
    tree: &gix::Tree<'_>,
    name: &str,
) -> Result<Option<(gix::objs::tree::EntryMode, ObjectId)>, Error> {
    for entry in gix::objs::TreeRefIter::from_bytes(&tree.data, tree.id.kind()) {
        let entry =
            entry.map_err(|err| Error::internal(format_args!("tree {}: {err}", tree.id)))?;
        if entry.filename == name {
            return Ok(Some((entry.mode, entry.oid.to_owned())));
        }
    }
    Ok(None)
}

fn stat_error(error: io::Error) -> Error {
    Error::internal(format_args!("reading ref files' state: {error}"))
}
