//! The git dir `git archive` runs in: the repository's objects and refs,
//! and nothing else the repository carries.
//!
//! `git archive` reads the repository's own config, and config can run
//! commands: `tar.<format>.command` replaces a built-in format (config
//! filters are registered before the zip writer), and a
//! `filter.<driver>.smudge` or `.process` runs for every file a
//! `.gitattributes` line in the tree maps to that driver. The environment
//! can switch off system and global config, but nothing switches off a
//! repository's. So git never opens the repository's git dir: it runs in a
//! *shadow* git dir of the service's own, which has
//!
//! - `config`: written here, the bare minimum (no filters, no tar commands,
//!   no attributes file, no remotes to fetch missing objects from);
//! - `objects/info/alternates`: the repository's object directory, so every
//!   object is there (the repository's own alternates were checked to stay
//!   under `--repos` when it was opened, see `repo`);
//! - `refs`: none, and an unborn `HEAD`. git is given a commit id, and an
//!   archive without `export-subst` reads no ref. One whose placeholders
//!   may read refs (`%D`, `%(describe)`, `%aN` through `HEAD:.mailmap`; its
//!   key holds their digest) runs in a shadow of the generation's own with
//!   a snapshot of them as they were listed for the key
//!   ([`Shadows::snapshot`]), so git reads those and not what was pushed
//!   since. The repository's own refs are never linked in: git would read
//!   through whatever a symlink under them leads to, and an archive whose
//!   `export-subst` the archiver failed to see would change its bytes with
//!   the refs under a key without them (review: attack).
//!
//! What still applies is what the tree itself says (`export-ignore`,
//! `export-subst`, `eol` in `.gitattributes`): content, not commands. A
//! `filter=` attribute without a driver configured does nothing.
//!
//! Shadows live in a private directory in the cache dir (`shadows-*`),
//! one per repository for the most recently served ones
//! (`SHARED_SHADOWS`), and are removed when the cache is dropped, or at
//! the next start after a kill (the cache dir's lock says no other archiver
//! uses them). They are small (a config, `HEAD`, the alternates; a ref
//! snapshot's `packed-refs`) and not counted in `--cache-max-bytes`.

use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use crate::repo::RefsSnapshot;

/// The shadow's whole configuration. `abbrev = 40`: `export-subst`'s
/// abbreviated ids (`%h`, `%p`, `%t`, `%(describe)`) are written with 40
/// hex digits, a SHA-1 id whole (`no` says the same only since git 2.31).
/// git's default length grows with the repository's object count, and any
/// length is lengthened where another object shares the prefix, so a push
/// of unrelated (even unreachable) objects, or a replica with more of
/// them, changed the bytes under the same refs and ETag; a prefix can also
/// be forged. Only the whole id is decided by the commit alone
/// (docs/urls.md, "Archives that read refs").
///
/// The signature programs (`gpg`, `gpgsm`, `ssh-keygen`, which signature
/// placeholders such as `%G?` make git run on the commit's signature) are
/// a path that cannot exist: nothing runs, and every host writes the same
/// bytes (attack: 2,000 placeholders in one commit ran `gpg` 2,000 times,
/// its parser fed pushed bytes).
///
/// `commitGraph = false`: a commit-graph in the repository's object
/// directory (which the shadow's alternates lead to) is derived data git
/// trusts without a check, and `git archive` took the commit's date, every
/// entry's mtime, from it: a graph with wrong dates (a tool's bug, a stale
/// or damaged replica) gave other bytes under the same ETag (attack). With
/// it off git parses the commit object itself, the one read it needs.
///
/// `deltaBaseCacheLimit = 8m` (git's default 96m): `git archive` reads
/// each blob once, so its cache of delta bases is filled and hardly hit,
/// and every page of it is fresh memory the kernel faults in and zeroes.
/// With 8 MiB git/git's tar of `v2.47.0` takes 7,100 page faults instead
/// of 13,900 and that of `v2.0.0` 6,000 instead of 26,500, for 7 % and
/// 24 % less of git's CPU (BENCHMARKS.md, "A cold generation's CPU beyond
/// git and the compressor"). The bytes are the same: only what git keeps
/// in memory changes.
pub(crate) const CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n\tabbrev = 40\n\
    \tcommitGraph = false\n\tdeltaBaseCacheLimit = 8m\n\
    [gpg]\n\tprogram = /dev/null/gitball-runs-no-gpg\n\
    [gpg \"openpgp\"]\n\tprogram = /dev/null/gitball-runs-no-gpg\n\
    [gpg \"x509\"]\n\tprogram = /dev/null/gitball-runs-no-gpgsm\n\
    [gpg \"ssh\"]\n\tprogram = /dev/null/gitball-runs-no-ssh-keygen\n";

/// The shared shadow's `HEAD`: git needs one, and nothing it archives
/// reads it there.
const UNBORN_HEAD: &str = "ref: refs/heads/main\n";

/// The files a shared shadow is made of, each checked to be there before
/// it is used again.
const SHADOW_FILES: [&str; 3] = ["objects/info/alternates", "HEAD", "config"];
/// Its `refs`, empty, checked too: git takes a git dir without it for none
/// at all, and a tmp cleaner removes old empty directories (their atime is
/// never renewed: git only checks that this one is there).
const SHADOW_REFS: &str = "refs";

/// Most repositories whose shared shadow is kept for the next generation
/// (as many as the archiver keeps open); the least recently used one goes
/// when another is made. A file server's thousands of repositories each
/// left one behind, 12 KiB and 5 inodes of the cache's tmpfs, until exit
/// (attack).
const SHARED_SHADOWS: NonZeroUsize = match NonZeroUsize::new(1024) {
    Some(count) => count,
    None => unreachable!(),
};

/// Where one cache keeps its shadow git dirs: a private (mode 0700)
/// temporary directory, removed when dropped.
#[derive(Debug)]
pub struct Shadows {
    root: tempfile::TempDir,
    /// The directory `root` is in (the cache dir as locked), where it is
    /// made again if removed.
    parent: fs::File,
    /// The shared shadows kept, by the repository's git dir.
    shared: Mutex<LruCache<PathBuf, Arc<Shared>>>,
}

/// A repository's shared shadow git dir ([`Shadows::prepare`]): removed
/// when the last holder lets go, the set of kept shadows or a generation
/// still running git in it.
#[derive(Debug)]
pub struct Shared {
    dir: tempfile::TempDir,
}

impl Shared {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// How the name of a [`Shadows`] root begins.
pub const SHADOWS_PREFIX: &str = "shadows-";

impl Shadows {
    /// A root in `parent`, opened as `parent_dir`: the cache dir, whose
    /// lock (`parent_dir`) makes it this archiver's alone, so that one a
    /// killed archiver left behind (never dropped) is found and removed at
    /// the next start (`Cache::open`), not left in a temp dir for good.
    pub fn create_in_opened(parent: &Path, parent_dir: fs::File) -> io::Result<Shadows> {
        Shadows::keeping(parent, parent_dir, SHARED_SHADOWS)
    }

    /// [`Shadows::create_in_opened`], opening `parent` itself.
    #[cfg(test)]
    pub fn create_in(parent: &Path) -> io::Result<Shadows> {
        Shadows::create_in_opened(parent, fs::File::open(parent)?)
    }

    /// Where the shadows are.
    #[cfg(test)]
    pub(crate) fn root_path(&self) -> &Path {
        self.root.path()
    }

    /// [`Shadows::create_in`], keeping at most `shared` shared shadows.
    fn keeping(parent: &Path, parent_dir: fs::File, shared: NonZeroUsize) -> io::Result<Shadows> {
        let root = tempfile::Builder::new()
            .prefix(SHADOWS_PREFIX)
            .permissions(private())
            .tempdir_in(parent)?;
        Ok(Shadows {
            root,
            parent: parent_dir,
            shared: Mutex::new(LruCache::new(shared)),
        })
    }

    /// The root, made again (empty, mode 0700) if it was removed behind
    /// the archiver's back: every new shadow failed until a restart
    /// (attack). One `mkdir` that finds it there. Made in the directory it
    /// was made in, by that directory's fd: a cache dir replaced while the
    /// archiver runs gets none (review: made by its path, it went into
    /// what the path named then, and the generation's shadow with it).
    /// What is made in it is made by its path, which then leads nowhere.
    fn root(&self) -> io::Result<&Path> {
        let root = self.root.path();
        let name = root.file_name().unwrap_or_default();
        match nix::sys::stat::mkdirat(&self.parent, name, nix::sys::stat::Mode::S_IRWXU) {
            Ok(()) => {
                tracing::warn!(path = %root.display(), "the shadow git dirs' directory was removed behind the archiver's back; made again");
                Ok(root)
            }
            Err(nix::errno::Errno::EEXIST) => Ok(root),
            Err(error) => Err(error.into()),
        }
    }

    /// The shadow git dir for the repository whose git dir is `git_dir`
    /// and whose objects are in `common_dir`, made if needed: the
    /// repository's objects, no refs.
    pub fn prepare(&self, git_dir: &Path, common_dir: &Path) -> io::Result<Arc<Shared>> {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shadow) = shared.get(git_dir) {
            // Removed behind the archiver's back (a tmp cleaner, by hand),
            // it is made again (attack: git failed in it, every generation
            // of the repository a `500` until a restart).
            if SHADOW_FILES
                .iter()
                .all(|file| shadow.path().join(file).is_file())
                && shadow.path().join(SHADOW_REFS).is_dir()
            {
                return Ok(shadow.clone());
            }
            tracing::warn!(path = %shadow.path().display(), "a shadow git dir was removed behind the archiver's back; made again");
            shared.pop(git_dir);
        }
        // A name of its own: one that was let go may still be in use by a
        // generation, under its own name, until that ends.
        let dir = tempfile::Builder::new()
            .prefix("repo-")
            .permissions(private())
            .tempdir_in(self.root()?)?;
        let shadow = dir.path();
        for dir in ["objects/info", SHADOW_REFS] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(shadow.join(dir))?;
        }
        fs::write(
            shadow.join("objects/info/alternates"),
            alternates(common_dir),
        )?;
        fs::write(shadow.join("HEAD"), UNBORN_HEAD)?;
        fs::write(shadow.join("config"), CONFIG)?;
        let shadow = Arc::new(Shared { dir });
        // The least recently used one goes now, or with the last
        // generation running in it.
        shared.put(git_dir.to_path_buf(), shadow.clone());
        Ok(shadow)
    }
}

/// A shadow git dir of one generation's own, whose refs are a snapshot
/// ([`Shadows::snapshot`]); removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    dir: tempfile::TempDir,
}

impl Snapshot {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Shadows {
    /// A shadow git dir for one generation of an archive whose bytes depend
    /// on the refs: the repository's objects (as [`Shadows::prepare`]), and
    /// `refs` written out as they were listed (direct refs in `packed-refs`,
    /// symbolic ones as loose files, `HEAD`) instead of links to the live
    /// ones. git then reads the refs the archive is keyed by, however long
    /// the generation queued or ran, and whatever is pushed meanwhile.
    pub fn snapshot(&self, common_dir: &Path, refs: &RefsSnapshot) -> io::Result<Snapshot> {
        let dir = tempfile::Builder::new()
            .prefix("snapshot-")
            .permissions(private())
            .tempdir_in(self.root()?)?;
        let shadow = dir.path();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(shadow.join("objects/info"))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(shadow.join("refs"))?;
        fs::write(
            shadow.join("objects/info/alternates"),
            alternates(common_dir),
        )?;
        // In the order listed, which git's own reading of the repository's
        // refs gave (`RefsSnapshot::refs`): said sorted, so that git takes
        // it in that order, as it took the repository's, rather than
        // sorting it; it is sorted, but for a repository whose
        // `packed-refs` said so and was not.
        let mut packed = b"# pack-refs with: sorted \n".to_vec();
        for (name, target) in &refs.refs {
            // Anything else is no ref git could read from a git dir.
            if !is_plain_ref_name(name) {
                continue;
            }
            if target.starts_with(b"ref: ") {
                let path = shadow.join(std::ffi::OsStr::from_bytes(name));
                if let Some(parent) = path.parent() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                fs::write(path, [&target[..], b"\n"].concat())?;
            } else {
                packed.extend_from_slice(&[&target[..], b" ", name, b"\n"].concat());
            }
        }
        fs::write(shadow.join("packed-refs"), packed)?;
        fs::write(shadow.join("HEAD"), [&refs.head[..], b"\n"].concat())?;
        // A shallow repository's boundary, which git reads from the git
        // dir it runs in, not through the alternates.
        if !refs.shallow.is_empty() {
            fs::write(shadow.join("shallow"), &refs.shallow)?;
        }
        fs::write(shadow.join("config"), CONFIG)?;
        Ok(Snapshot { dir })
    }
}

/// A shadow's `objects/info/alternates`: the repository's object directory.
fn alternates(common_dir: &Path) -> String {
    format!("{}\n", common_dir.join("objects").display())
}

/// Mode 0700: a shadow holds copies of a repository's `HEAD` and refs,
/// which other users of the host must not read (`tempfile` leaves the mode
/// to the umask).
fn private() -> fs::Permissions {
    std::os::unix::fs::PermissionsExt::from_mode(0o700)
}

/// A ref name that stays inside `refs/` as a path: no empty, `.` or `..`
/// component (git's own rules allow none of these either).
fn is_plain_ref_name(name: &[u8]) -> bool {
    name.strip_prefix(b"refs/").is_some_and(|rest| {
        rest.split(|&byte| byte == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared shadow borrows the repository's objects and nothing else:
    /// not its config, not its refs (before, `refs` and `packed-refs` were
    /// links to the repository's, which git read through symlinks under
    /// them for an archive whose `export-subst` went unseen: review,
    /// attack), not its `HEAD`.
    #[test]
    fn a_shadow_borrows_objects_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join("repo.git");
        fs::create_dir_all(git_dir.join("refs/heads")).unwrap();
        fs::write(
            git_dir.join("refs/heads/trunk"),
            format!("{}\n", "1".repeat(40)),
        )
        .unwrap();
        fs::write(
            git_dir.join("packed-refs"),
            format!("{} refs/tags/v1\n", "2".repeat(40)),
        )
        .unwrap();
        fs::write(git_dir.join("HEAD"), "ref: refs/heads/trunk\n").unwrap();
        fs::write(git_dir.join("config"), "[tar \"zip\"]\n\tcommand = evil\n").unwrap();
        let shadows = Shadows::create_in(&std::env::temp_dir()).unwrap();
        let shared = shadows.prepare(&git_dir, &git_dir).unwrap();
        let shadow = shared.path();
        assert_eq!(fs::read_to_string(shadow.join("config")).unwrap(), CONFIG);
        assert_eq!(
            fs::read_to_string(shadow.join("objects/info/alternates")).unwrap(),
            format!("{}\n", git_dir.join("objects").display())
        );
        let refs = fs::symlink_metadata(shadow.join("refs")).unwrap();
        assert!(refs.is_dir(), "refs is the shadow's own");
        assert_eq!(fs::read_dir(shadow.join("refs")).unwrap().count(), 0);
        assert!(!shadow.join("packed-refs").exists());
        assert_eq!(
            fs::read_to_string(shadow.join("HEAD")).unwrap(),
            UNBORN_HEAD
        );
        // Made once.
        assert_eq!(shadows.prepare(&git_dir, &git_dir).unwrap().path(), shadow);
        let root = shadows.root.path().to_owned();
        let mode = |path: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(path).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&root), 0o700, "the shadows are private");
        drop(shared);
        drop(shadows);
        assert!(!root.exists(), "shadows outlived their owner");
    }

    /// At most so many shared shadows are kept: the least recently used
    /// goes when another is made, at once, or once the generation running
    /// git in it lets go (attack: one per repository ever served, until
    /// exit).
    #[test]
    fn shared_shadows_are_bounded_and_outlive_no_generation() {
        let dir = tempfile::tempdir().unwrap();
        let repo = |name: &str| {
            let git_dir = dir.path().join(name);
            fs::create_dir_all(git_dir.join("objects")).unwrap();
            git_dir
        };
        let (a, b, c) = (repo("a.git"), repo("b.git"), repo("c.git"));
        let shadows = Shadows::keeping(
            dir.path(),
            fs::File::open(dir.path()).unwrap(),
            NonZeroUsize::new(2).unwrap(),
        )
        .unwrap();
        let kept = || fs::read_dir(shadows.root.path()).unwrap().count();

        let first_a = shadows.prepare(&a, &a).unwrap().path().to_owned();
        shadows.prepare(&b, &b).unwrap();
        shadows.prepare(&c, &c).unwrap();
        assert_eq!(kept(), 2);
        assert!(!first_a.exists(), "the least recently used went");

        // In use by a generation when it is let go: it stays until then.
        let running = shadows.prepare(&b, &b).unwrap();
        shadows.prepare(&a, &a).unwrap();
        shadows.prepare(&c, &c).unwrap();
        assert!(running.path().exists());
        assert_eq!(kept(), 3);
        let second_b = shadows.prepare(&b, &b).unwrap();
        assert_ne!(second_b.path(), running.path(), "a new one of its own");
        let gone = running.path().to_owned();
        drop(running);
        assert!(!gone.exists());
        assert_eq!(kept(), 2);
        assert_eq!(
            fs::read_to_string(second_b.path().join("objects/info/alternates")).unwrap(),
            format!("{}\n", b.join("objects").display())
        );
    }

    /// git in a shadow keeps at most 8 MiB of delta bases (docs/archiver.md,
    /// "Bounded child"), not git's default 96 MiB: `git archive` reads each
    /// blob once, and the default cache was fresh memory, faulted in and
    /// zeroed, in every generation (7 % to 24 % of git's CPU on git/git).
    #[test]
    fn git_in_a_shadow_keeps_a_cache_of_delta_bases_of_8_mib() {
        gitball_core::docs::assert_says(
            include_str!("../../docs/archiver.md"),
            "docs/archiver.md",
            ["a cache of delta bases of 8 MiB"],
        );
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join("repo.git");
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .args(args)
                .output()
                .unwrap()
        };
        assert!(
            git(&["init", "-q", "--bare", git_dir.to_str().unwrap()])
                .status
                .success()
        );
        let shadows = Shadows::create_in(dir.path()).unwrap();
        let shared = shadows.prepare(&git_dir, &git_dir).unwrap();
        let limit = git(&[
            &format!("--git-dir={}", shared.path().display()),
            "config",
            "--type=int",
            "core.deltaBaseCacheLimit",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&limit.stdout).trim(),
            (8 << 20).to_string(),
            "git's delta base cache in the shadow: {limit:?}"
        );
    }

    /// git in a snapshot shadow reads the refs as they were listed, not as
    /// the repository has them afterwards.
    #[test]
    fn git_in_a_snapshot_reads_the_refs_as_listed() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let git = |args: &[&str]| {
            let output = std::process::Command::new("git")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_AUTHOR_NAME", "a")
                .env("GIT_AUTHOR_EMAIL", "a@example.com")
                .env("GIT_COMMITTER_NAME", "a")
                .env("GIT_COMMITTER_EMAIL", "a@example.com")
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "git {args:?}: {output:?}");
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        let w = work.to_str().unwrap();
        git(&["init", "-q", "-b", "main", w]);
        std::fs::write(work.join("f"), "one\n").unwrap();
        git(&["-C", w, "add", "f"]);
        git(&["-C", w, "commit", "-q", "-m", "one"]);
        git(&["-C", w, "tag", "-a", "v1", "-m", "v1"]);
        git(&[
            "-C",
            w,
            "symbolic-ref",
            "refs/remotes/origin/HEAD",
            "refs/heads/main",
        ]);
        git(&["-C", w, "pack-refs", "--all"]);
        git(&["-C", w, "branch", "loose"]);
        let git_dir = work.join(".git");
        let refs = RefsSnapshot::at(&git_dir).unwrap();
        let shadows = Shadows::create_in(&std::env::temp_dir()).unwrap();
        let snapshot = shadows.snapshot(&git_dir, &refs).unwrap();
        let listed = |git_dir: &Path| {
            let g = format!("--git-dir={}", git_dir.display());
            (
                git(&[
                    &g,
                    "for-each-ref",
                    "--format=%(refname) %(objectname) %(symref)",
                ]),
                git(&[&g, "symbolic-ref", "HEAD"]),
                git(&[&g, "describe", "--tags", "main"]),
            )
        };
        let before = listed(&git_dir);
        assert_eq!(listed(snapshot.path()), before);

        // Pushed after the listing: the snapshot does not see it.
        std::fs::write(work.join("f"), "two\n").unwrap();
        git(&["-C", w, "commit", "-q", "-am", "two"]);
        git(&["-C", w, "tag", "-a", "v2", "-m", "v2"]);
        assert_ne!(listed(&git_dir), before);
        assert_eq!(listed(snapshot.path()), before);
        assert_eq!(
            std::fs::read_to_string(snapshot.path().join("config")).unwrap(),
            CONFIG
        );

        let path = snapshot.path().to_owned();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions())
                & 0o777,
            0o700
        );
        drop(snapshot);
        assert!(!path.exists(), "the snapshot outlived its generation");
    }
}
