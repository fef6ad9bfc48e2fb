//! Refs to commits, as `git rev-parse` resolves them: git's "dwim" order of
//! candidate names, symbolic refs followed only to `HEAD` or `refs/`
//! names, abbreviated ids, annotated tags peeled within a bound; and the
//! listing of every ref (`RefsSnapshot`) that an `export-subst` archive's
//! bytes depend on.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    io::{self, Read},
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
};

use lru::LruCache;

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, openat},
    sys::stat::{Mode, SFlag, fstatat},
};

use gix::{
    bstr::BString,
    hash::ObjectId,
    object::Kind,
    refs::{FullName, Target},
};

use gitball_core::url::RefKind;

use super::beneath;
use super::confine::{
    MAX_PACKED_REFS_BYTES, MAX_REF_FILE_BYTES, RefsRefused, refs_without_symlinks,
};
use super::open_isolated;
use super::packed::{PackedRef, PackedRefs};
use super::stamp::{RACY_WINDOW, Stamp, names_nothing};
use crate::error::Error;

/// git's `SYMREF_MAXDEPTH`: the most refs read to resolve a name, the
/// last a direct one, so at most 4 symbolic refs in a row (one more had
/// been read, and a name `git rev-parse` does not resolve served: attack).
pub(super) const SYMREF_MAX_DEPTH: usize = 5;

/// How a `HEAD` gix cannot read is listed: the null id, no commit.
const UNREADABLE_HEAD: &str = "0000000000000000000000000000000000000000";

/// Length of a full SHA-1 object id in hex.
pub(super) const FULL_HEX_LEN: usize = 40;

/// Shortest abbreviated object id accepted (`docs/urls.md#refs`; git
/// itself takes 4).
pub(super) const MIN_ABBREV_HEX_LEN: usize = 7;

/// The most bytes of commit and tag objects read to resolve a ref, the
/// whole chain of tags included (git has no bound; a commit message of
/// hundreds of MB, pushed, was read whole on every request for it:
/// attack).
pub(super) const MAX_PEELED_OBJECT_BYTES: u64 = 16 * 1024 * 1024;

/// A repository's refs and `HEAD` as listed once: what the bytes of an
/// archive whose `export-subst` reads refs depend on. Its [`digest`] keys
/// such an archive, and git makes it from exactly these refs
/// (`shadow::Shadows::snapshot`), not from the live ones.
///
/// The bytes of such an archive are a function of the commit and the
/// snapshot git reads, and the snapshot one of this listing, so two
/// archives under one digest never differ. The listing is git's
/// (`refs_files_read_as_git_reads_them` compares git's listing in a
/// snapshot with git's in the repository), with more in it than git
/// shows where that changes no byte: a dangling symbolic ref, which git
/// in the snapshot leaves out as git in the repository does, and which
/// its target's coming changes the listing of. A ref to an object that is
/// not there is not listed (git shows it once the object comes, with no
/// ref changed: `a_ref_to_an_object_not_there_is_listed_only_once_it_is`).
/// Every name and symbolic target is a ref name, with no
/// whitespace, so no two listings share a digest.
///
/// [`digest`]: RefsSnapshot::digest
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefsSnapshot {
    /// Every ref but `HEAD`, in the order git lists them (by name, but for
    /// a `packed-refs` whose header says it is sorted and is not, or that
    /// has a name twice, which git lists in its order, twice, and so do
    /// its decorations; the snapshot's `packed-refs` keeps them so): its name and its target, an
    /// object id in hex or `ref: {name}` for a symbolic ref. Bytes, as git
    /// takes a name: one that is not UTF-8 had been listed, and written
    /// into a snapshot, as lossy UTF-8, so an archive said `\u{fffd}`
    /// where `git archive` says `\xff`, and two names one listing (attack).
    pub refs: Vec<(BString, BString)>,
    /// `HEAD`: `ref: {name}` (also when that branch is unborn), or the id
    /// of a detached `HEAD`.
    pub head: BString,
    /// Some ref or `HEAD` names an object that is not there, and is left
    /// out: the listing changes when the object comes, with no ref file
    /// changed, so its digest is not remembered by the ref files' stamps
    /// (`Repository::refs_digest`).
    pub objects_missing: bool,
    /// The `shallow` file of a shallow repository (`git clone --depth`),
    /// as its bytes; empty for any other. It lists the commits whose
    /// parents the repository does not hold, which git takes for roots
    /// (`%P` empty, `grafted` in `%D`, `%(describe)` stops there): what
    /// git in the snapshot reads, and part of the digest, so that a
    /// history deepened (`git fetch --unshallow`), with no ref changed, is
    /// a new digest (`a_shallow_repositorys_boundary_is_read_with_its_refs`:
    /// without it, git in the snapshot walked into the missing parents,
    /// and `%(describe)` found a tag once they came, under the same ETag).
    pub shallow: Vec<u8>,
}

impl RefsSnapshot {
    /// Lists `repo`'s refs and `HEAD`.
    fn of(repo: &gix::Repository) -> Result<RefsSnapshot, Error> {
        RefsSnapshot::of_each(repo, |_, _| {})
    }

    /// Lists `repo`'s refs and `HEAD`, calling `each` with every ref (not
    /// `HEAD`) as it is listed: what `each` makes of the refs is made of
    /// exactly the refs listed.
    pub(super) fn of_each(
        repo: &gix::Repository,
        mut each: impl FnMut(&FullName, &Target),
    ) -> Result<RefsSnapshot, Error> {
        let mut refs = Vec::new();
        let mut objects_missing = for_each_ref(repo, |name, target| {
            refs.push((name.as_bstr().to_owned(), listed_target(target)));
            each(name, target);
        })?;
        // `HEAD` as its file says, read as git reads it, not followed: a
        // `HEAD` naming a ref git ignores (an empty file) is an unborn
        // one, and following it had failed the listing, and every request
        // by commit id (attack). A `HEAD` that is no ref to git (`{id}junk`,
        // a target that is no ref name) is listed as no commit, which a
        // snapshot's git takes as a `HEAD` that names nothing, as git
        // takes it in the repository.
        let head = match read_loose(repo.git_dir(), Path::new("HEAD"))? {
            // A detached `HEAD` at an object not there names nothing to
            // git, as a ref to one does (`for_each_ref`).
            Some(Loose::Ref(Target::Object(id))) if !repo.has_object(id) => {
                objects_missing = true;
                UNREADABLE_HEAD.into()
            }
            Some(Loose::Ref(target)) => listed_target(&target),
            Some(Loose::Broken) | None => UNREADABLE_HEAD.into(),
        };
        Ok(RefsSnapshot {
            refs,
            head,
            objects_missing,
            shallow: read_shallow(repo.common_dir())?,
        })
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
            for part in [&name[..], b" ", target, b"\n"] {
                sha2::Digest::update(&mut hasher, part);
            }
        }
        for part in [&b"HEAD "[..], &self.head, b"\n"] {
            sha2::Digest::update(&mut hasher, part);
        }
        // Only for a shallow repository: every other digest stays what it
        // was. After `HEAD`'s line, which ends the refs, so no listing's
        // refs can spell it.
        if !self.shallow.is_empty() {
            for part in [&b"shallow\n"[..], &self.shallow] {
                sha2::Digest::update(&mut hasher, part);
            }
        }
        hex::encode(sha2::Digest::finalize(hasher))
    }
}

/// How a ref's target is listed: an object id in hex, or `ref: {name}`.
fn listed_target(target: &Target) -> BString {
    match target {
        Target::Object(id) => id.to_hex().to_string().into(),
        Target::Symbolic(name) => [&b"ref: "[..], name.as_bstr()].concat().into(),
    }
}

/// Calls `each` with every ref of `repo` (not `HEAD`), in the order git
/// lists them ([`merged`]: by name, but for a `packed-refs` whose header
/// says it is sorted and is not, or that has a name twice): the refs of
/// `packed-refs`, and over them the loose ones, each read as git reads it
/// ([`parse_loose`]). A loose ref file git
/// cannot read ("ignoring broken ref": an empty file, as a crash leaves
/// one; `{id}junk`), or whose name is no ref name, is left out, and hides
/// a packed ref of its name as it does for git: one such file had made
/// every listing fail, and every request by commit id a `500` (attack).
/// gix's own reading of loose refs listed `{id}junk` and left out
/// `ref:refs/heads/main` (no space), both the other way round from git.
///
/// True when a ref was left out for its object not being there.
pub(super) fn for_each_ref(
    repo: &gix::Repository,
    mut each: impl FnMut(&FullName, &Target),
) -> Result<bool, Error> {
    let listing =
        |err: &dyn std::fmt::Display| Error::internal(format_args!("listing refs: {err}"));
    // The loose refs by name, `None` for one git ignores ("broken"),
    // which hides a packed one of its name as for git.
    let mut refs: BTreeMap<FullName, Option<Target>> = BTreeMap::new();
    let too_many = || Error::internal(format_args!("more than {MAX_LISTED_REFS} refs: not listed"));
    let packed = match packed_refs(repo)? {
        Some(packed) => packed.refs().map_err(|fatal| listing(&fatal))?,
        None => Vec::new(),
    };
    if packed.len() > MAX_LISTED_REFS {
        return Err(too_many());
    }
    let common_dir = repo.common_dir();
    let git_dir = repo.git_dir();
    let linked = common_dir != git_dir;
    // Every directory and file under `refs` is opened from the one before
    // it, following no symlink ([`beneath`](super::beneath)): one swapped
    // in since `refs_without_symlinks` looked is refused, not listed
    // through (`a_ref_directory_swapped_for_a_symlink_is_not_read_through`).
    let mut bases = vec![(common_dir, open_base(common_dir)?)];
    if linked {
        bases.push((git_dir, open_base(git_dir)?));
    }
    let mut pending: Vec<(PathBuf, Vec<u8>, usize)> = (0..bases.len())
        .map(|base| (PathBuf::from("refs"), b"refs".to_vec(), base))
        .collect();
    let mut loose = 0usize;
    while let Some((relative, prefix, base)) = pending.pop() {
        let (base_dir, base_fd) = &bases[base];
        let dir = base_dir.join(&relative);
        // A directory nested past `PATH_MAX` cannot be opened by its path,
        // and git passes it over: a `500` before (attack).
        if beneath::too_long_for_git(&dir) {
            continue;
        }
        let opened = beneath::open_beneath(
            base_fd.as_fd(),
            &relative,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        )
        .and_then(|fd| Ok(nix::dir::Dir::from_fd(fd)?));
        let mut entries = match opened {
            Ok(entries) => entries,
            // git passes over a directory it cannot list, as one that is
            // not there: the packed refs under it are listed.
            Err(error)
                if names_nothing(&error) || error.kind() == io::ErrorKind::PermissionDenied =>
            {
                continue;
            }
            Err(error) if beneath::is_swapped(&error) => return Err(swapped(&dir)),
            Err(error) => return Err(listing(&format_args!("{}: {error}", dir.display()))),
        };
        let mut names = Vec::new();
        for entry in entries.iter() {
            let entry =
                entry.map_err(|error| listing(&format_args!("{}: {error}", dir.display())))?;
            let file_name = entry.file_name().to_bytes();
            if file_name == b"." || file_name == b".." {
                continue;
            }
            names.push((OsStr::from_bytes(file_name).to_owned(), entry.file_type()));
        }
        for (file_name, kind) in names {
            let mut name = prefix.clone();
            name.push(b'/');
            name.extend_from_slice(file_name.as_bytes());
            // Where the file system gives no type, looked at without
            // following a symlink; passed over if it cannot be, as git
            // passes it over.
            let is_dir = match kind {
                Some(kind) => kind == nix::dir::Type::Directory,
                None => match fstatat(
                    entries.as_fd(),
                    file_name.as_os_str(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(stat) => {
                        SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                    }
                    Err(_) => continue,
                },
            };
            if is_dir {
                pending.push((relative.join(&file_name), name, base));
                continue;
            }
            // A linked work tree's own refs are read from its git dir, the
            // others from the common dir, as git reads them.
            if linked && is_per_worktree(&name) != (*base_dir == git_dir) {
                continue;
            }
            // git leaves out a ref whose name is no ref name, and so does
            // gix's check of the name ("ignoring ref with broken name").
            let Ok(name) = FullName::try_from(BString::from(name)) else {
                continue;
            };
            loose += 1;
            if loose > MAX_LISTED_REFS {
                return Err(too_many());
            }
            let path = dir.join(&file_name);
            match read_loose_in(entries.as_fd(), &file_name, &path)? {
                // git lists a loose null id as a broken ref (resolved, it
                // names a missing object).
                Some(Loose::Ref(Target::Object(id))) if id.is_null() => {
                    refs.insert(name, None);
                }
                Some(Loose::Ref(target)) => {
                    refs.insert(name, Some(target));
                }
                Some(Loose::Broken) => {
                    tracing::warn!(
                        path = %path.display(),
                        "a loose ref that cannot be read as one is ignored"
                    );
                    refs.insert(name, None);
                }
                None => {}
            }
        }
    }
    if refs.len() + packed.len() > MAX_LISTED_REFS {
        return Err(too_many());
    }
    let mut objects_missing = false;
    for (name, target) in merged(refs, packed) {
        let Some(target) = target else {
            continue;
        };
        let (name, target) = (&name, &target);
        // A ref to an object that is not there (a pool's `gc` pruned it,
        // a damaged replica) is left out, as git leaves it out ("ignoring
        // broken ref"), in the repository and in a snapshot alike, until
        // the object is there: listed either way, it had left the refs
        // digest the same while git's `%D` changed (review).
        if let Target::Object(id) = target
            && !repo.has_object(id)
        {
            objects_missing = true;
            continue;
        }
        each(name, target);
    }
    Ok(objects_missing)
}

/// The loose refs (by name) over the packed ones (in the order git reads
/// them), merged as git's iterator merges them (`overlay` in
/// `refs/iterator.c`): whichever name is first goes first, and of two of
/// one name the loose one, and the packed one is passed. In a file whose
/// header says it is sorted and is not, or that has a name twice, both
/// lists as git lists them: in its order, twice.
fn merged(
    loose: BTreeMap<FullName, Option<Target>>,
    packed: Vec<PackedRef>,
) -> Vec<(FullName, Option<Target>)> {
    let mut merged = Vec::with_capacity(loose.len() + packed.len());
    let mut loose = loose.into_iter().peekable();
    let mut packed = packed.into_iter().peekable();
    loop {
        let take_loose = match (loose.peek(), packed.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((name, _)), Some(reference)) => {
                match name.as_bstr().cmp(reference.name.as_bstr()) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Greater => false,
                    std::cmp::Ordering::Equal => {
                        packed.next();
                        true
                    }
                }
            }
        };
        if take_loose {
            merged.extend(loose.next());
        } else if let Some(reference) = packed.next() {
            merged.push((reference.name, Some(Target::Object(reference.id))));
        }
    }
    merged
}

/// Whether a linked work tree keeps the ref `name` in its own git dir
/// (gix's and git's per-worktree refs).
fn is_per_worktree(name: &[u8]) -> bool {
    [&b"refs/bisect/"[..], b"refs/worktree/", b"refs/rewritten/"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// What a loose ref file holds, read as git reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Loose {
    Ref(Target),
    /// No ref to git, which ignores it ("ignoring broken ref"), and looks
    /// no further for its name: not in `packed-refs` either.
    Broken,
}

/// git's `isspace`: space, tab, LF and CR, not VT or FF.
fn is_git_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim_git_space(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&byte| !is_git_space(byte))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&byte| !is_git_space(byte))
        .map_or(start, |last| last + 1);
    &bytes[start..end.max(start)]
}

/// The content of a loose ref file as git's `parse_loose_ref_contents`
/// reads it, after the `strbuf_rtrim` of `files_read_raw_ref`: `ref:`
/// and any whitespace (none included) before a symbolic ref's target,
/// whose whitespace at either end is trimmed and which ends at a NUL, and
/// which must be a ref name (git's `check_refname_format`: a target that
/// is none is not followed); or an object id in hex of either case, which
/// nothing but whitespace or a NUL may follow (`FETCH_HEAD`'s form). gix
/// wants `ref: ` with its space, keeps trailing spaces and tabs, ends a
/// target at CR or LF, and takes an id with anything not hex glued to it:
/// the archiver had served a ref git calls broken, and named no commit
/// for one git resolves (`refs_files_read_as_git_reads_them`).
pub(super) fn parse_loose(contents: &[u8]) -> Loose {
    let end = contents
        .iter()
        .rposition(|&byte| !is_git_space(byte))
        .map_or(0, |last| last + 1);
    let contents = &contents[..end];
    // git reads the buffer as a C string from here on.
    let text = contents.split(|&byte| byte == 0).next().unwrap_or_default();
    if let Some(target) = text.strip_prefix(b"ref:") {
        return match FullName::try_from(BString::from(trim_git_space(target))) {
            Ok(name) => Loose::Ref(Target::Symbolic(name)),
            Err(_) => Loose::Broken,
        };
    }
    let Some(hex) = text.get(..FULL_HEX_LEN) else {
        return Loose::Broken;
    };
    let follows = text.get(FULL_HEX_LEN).copied();
    if !hex.iter().all(u8::is_ascii_hexdigit) || follows.is_some_and(|byte| !is_git_space(byte)) {
        return Loose::Broken;
    }
    match ObjectId::from_hex(&hex.to_ascii_lowercase()) {
        Ok(id) => Loose::Ref(Target::Object(id)),
        Err(_) => Loose::Broken,
    }
}

/// Reads the loose ref `name` (a path relative to `base`, the git dir or
/// the common dir) as git does ([`parse_loose`]). `None` when there is
/// none: missing, a directory (git then looks in `packed-refs`; under a
/// file where a directory should be, it does not: `Broken`), or a path
/// too long to open (`ENAMETOOLONG`: git takes it as no ref; a `500`
/// before: attack). Anything but a regular file within
/// `MAX_REF_FILE_BYTES` (a symlink, a FIFO: the checks before the read,
/// `loose_ref_inside` and `refs_without_symlinks`, refuse these; one
/// swapped in since) is refused as they refuse it, and never read.
///
/// Its directory is opened from `base` following no symlink on the way
/// ([`beneath`](super::beneath)), and the file from that directory: a
/// directory on the way swapped for a symlink since the checks is refused
/// too, not read through (opened by its whole path, it had been, to a ref
/// file outside the repository:
/// `a_ref_directory_swapped_for_a_symlink_is_not_read_through`, attack).
pub(super) fn read_loose(base: &Path, name: &Path) -> Result<Option<Loose>, Error> {
    let shown = base.join(name);
    let Some(file_name) = name.file_name() else {
        return Ok(None);
    };
    let parent = name
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    let dir = beneath::open_dir(base).and_then(|base| match parent {
        Some(parent) => {
            beneath::open_beneath(base.as_fd(), parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
        }
        None => Ok(base),
    });
    match dir {
        Ok(dir) => read_loose_in(dir.as_fd(), file_name, &shown),
        // A file where a directory on the way should be (a loose
        // `refs/heads/x` over a packed `refs/heads/x/y`): git's `lstat`
        // fails with `ENOTDIR`, not `ENOENT`, so it looks no further, not
        // in `packed-refs` either, and finds no ref; the packed one had
        // been served (review).
        Err(error) if error.kind() == io::ErrorKind::NotADirectory => Ok(Some(Loose::Broken)),
        Err(error) if names_nothing(&error) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => {
            Ok(Some(unreadable(&shown)))
        }
        Err(error) if beneath::is_swapped(&error) => Err(swapped(&shown)),
        Err(error) => Err(Error::internal(format_args!(
            "reading {}: {error}",
            shown.display()
        ))),
    }
}

/// Reads the loose ref file `name` in the directory `dir` (opened with no
/// symlink on the way; `shown` is its path, for messages and for git's
/// bound on a path's length), as [`read_loose`] says.
fn read_loose_in(dir: BorrowedFd, name: &OsStr, shown: &Path) -> Result<Option<Loose>, Error> {
    if beneath::too_long_for_git(shown) {
        return Ok(None);
    }
    let reading = |error: &dyn std::fmt::Display| {
        Error::internal(format_args!("reading {}: {error}", shown.display()))
    };
    // Looked at before it is opened: a device is never opened.
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => return Ok(None),
            SFlag::S_IFREG if stat.st_size as u64 <= MAX_REF_FILE_BYTES => {}
            _ => {
                tracing::warn!(
                    path = %shown.display(),
                    "a loose ref is a symlink (which leads outside the repository), not a regular file, or too large; refused"
                );
                return Err(Error::RepoNotFound);
            }
        },
        Err(Errno::EACCES) => return Ok(Some(unreadable(shown))),
        Err(errno) => {
            let error = io::Error::from(errno);
            if names_nothing(&error) {
                return Ok(None);
            }
            return Err(reading(&error));
        }
    }
    // What is opened is what is read, and checked again once open: a
    // symlink swapped in since is not followed (`O_NOFOLLOW`), and a FIFO
    // not waited on for a writer (`O_NONBLOCK`). Opened by the path alone,
    // the symlink had been read through, to a file outside the repository,
    // and the FIFO had hung the read for good
    // (`a_loose_ref_swapped_after_its_check_is_refused_not_read`: attack).
    let opened = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    let file = match opened {
        Ok(file) => fs::File::from(file),
        // Deleted (or packed) since: as if it had not been there.
        Err(Errno::ENOENT) => return Ok(None),
        // A symlink swapped in since.
        Err(Errno::ELOOP) => return Err(swapped(shown)),
        Err(Errno::EACCES) => return Ok(Some(unreadable(shown))),
        Err(errno) => return Err(reading(&errno)),
    };
    match file.metadata() {
        Ok(meta) if meta.is_dir() => return Ok(None),
        Ok(meta) if meta.is_file() && meta.len() <= MAX_REF_FILE_BYTES => {}
        Ok(_) => return Err(swapped(shown)),
        Err(error) => return Err(reading(&error)),
    }
    let mut contents = Vec::new();
    match file.take(MAX_REF_FILE_BYTES + 1).read_to_end(&mut contents) {
        Ok(_) => Ok(Some(parse_loose(&contents))),
        Err(error) => Err(reading(&error)),
    }
}

/// The most bytes of a `shallow` file read: 41 bytes per commit on the
/// boundary, so 400,000 of them.
const MAX_SHALLOW_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The `shallow` file in the common dir `common_dir` (where git reads it),
/// as its bytes: empty when there is none. Read as a loose ref is: through
/// no symlink, and a FIFO is not waited on. One that is a symlink, not a
/// regular file, or over `MAX_SHALLOW_FILE_BYTES` refuses the repository
/// (`RepoNotFound`, logged), as the same file found so at its open does
/// (`confine::git_files_sane`): swapped in while the repository is open, it
/// was a `500`.
fn read_shallow(common_dir: &Path) -> Result<Vec<u8>, Error> {
    let shown = common_dir.join("shallow");
    let reading = |error: &dyn std::fmt::Display| {
        Error::internal(format_args!("reading {}: {error}", shown.display()))
    };
    let refused = || {
        tracing::warn!(
            file = %shown.display(),
            "a file git reads whole is not a regular file, or is too large; repository refused"
        );
        Error::RepoNotFound
    };
    let dir = open_base(common_dir)?;
    let opened = openat(
        dir.as_fd(),
        "shallow",
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    let file = match opened {
        Ok(file) => fs::File::from(file),
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        // A symlink (`O_NOFOLLOW`).
        Err(Errno::ELOOP) => return Err(refused()),
        Err(errno) => return Err(reading(&errno)),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() && meta.len() <= MAX_SHALLOW_FILE_BYTES => {}
        Ok(_) => return Err(refused()),
        Err(error) => return Err(reading(&error)),
    }
    let mut contents = Vec::new();
    file.take(MAX_SHALLOW_FILE_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(|error| reading(&error))?;
    Ok(contents)
}

/// A loose ref the archiver's user may not read (`EACCES`: the file, or a
/// directory on the way it may not search): no ref to git run as the same
/// user either, which ignores it and looks for its name in `packed-refs`
/// no more than for a broken one. A `500` before, for every lookup that
/// met it and every listing
/// (`ref_directories_the_archiver_may_not_read_are_read_as_git_reads_them`).
fn unreadable(path: &Path) -> Loose {
    tracing::debug!(path = %path.display(), "a loose ref this user may not read is ignored, as git ignores it");
    Loose::Broken
}

/// Opens a git dir or common dir to read refs under it.
fn open_base(dir: &Path) -> Result<OwnedFd, Error> {
    beneath::open_dir(dir)
        .map_err(|error| Error::internal(format_args!("opening {}: {error}", dir.display())))
}

/// A loose ref found a symlink, a FIFO, a device or too large once opened:
/// refused as the checks before refuse it.
fn swapped(path: &Path) -> Error {
    tracing::warn!(
        path = %path.display(),
        "a loose ref was swapped for a symlink, a special file or a large one since it was checked; refused"
    );
    Error::RepoNotFound
}

/// The most refs a listing takes (for the refs digest, and the tips of the
/// reachability walk): 8 million refs in a `packed-refs` within its bound
/// had aborted the archiver out of memory (attack).
pub(super) const MAX_LISTED_REFS: usize = 1_000_000;

/// A full hex object id, in either case (as git accepts it).
pub(super) fn parse_full_hex(reference: &str) -> Option<ObjectId> {
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
pub(super) fn ref_candidates(reference: &str) -> impl Iterator<Item = String> + '_ {
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
pub(super) struct FoundRef {
    pub(super) id: ObjectId,
    pub(super) kind: RefKind,
    /// How many of the candidates were read, the match included.
    pub(super) tried: usize,
    /// The symbolic refs' targets followed on the way, in any candidate.
    pub(super) followed: Vec<String>,
}

/// The first existing ref of `candidates` (from `ref_candidates`),
/// followed through symbolic refs to the object it names, with the kind its
/// full name implies.
pub(super) fn find_reference(
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
pub(super) fn follow_ref(
    repo: &gix::Repository,
    full_name: &str,
    inside: &dyn Fn(&str) -> Result<(), Error>,
    followed: &mut Vec<String>,
) -> Result<Option<ObjectId>, Error> {
    let mut name = full_name.to_owned();
    for _ in 0..SYMREF_MAX_DEPTH {
        // gix reads these from another git dir than the name says, where
        // the checks of `inside` do not look (attack: a symbolic ref to
        // `main-worktree/refs/heads/x` was read through a symlink there).
        // A served repository has no other work tree to name: not found.
        // Nor anything but `HEAD` or a name under `refs/` (a symbolic
        // ref's target may be any name gix accepts, and for `foo/bar` gix
        // opens `refs/foo/bar` and more, never `foo/bar`, so no answer
        // could have the asked name: review). A name that is not ASCII is
        // followed: `find_exact` opens its loose file by its exact bytes,
        // where gix's lookup could open another spelling (precomposed),
        // and `packed-refs` keeps only its exact name; refused, a `HEAD`
        // naming the branch `dév` had been `404` (attack).
        if !(name == "HEAD" || name.starts_with("refs/")) {
            return Ok(None);
        }
        inside(&name)?;
        let Some(target) = find_exact(repo, &name)? else {
            return Ok(None);
        };
        match target {
            Target::Object(id) => return Ok(Some(id)),
            Target::Symbolic(target) => match std::str::from_utf8(target.as_bstr()) {
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

/// `repo`'s `packed-refs`, read as git reads it ([`PackedRefs`]; gix's
/// parser read some files otherwise: a CR before the LF, which git keeps
/// in the name and so skips the line, gix dropped, and the archiver
/// served commits under names git says do not exist:
/// `a_packed_refs_file_with_cr_lf_line_ends_serves_no_name_git_skips`).
/// A file git dies on is an `Err`, a `500`.
///
/// Opened from the common dir without following a symlink and checked
/// once open, as a loose ref is ([`read_loose`]): gix opened it by its
/// path, so one swapped for a symlink after `loose_ref_inside` looked was
/// read through (attack). What was parsed is kept by the file's identity
/// and times ([`PACKED_REFS_KEPT`]): a lookup costs two opens (the common
/// dir, the file) and an `fstat`, not a read of up to
/// `MAX_PACKED_REFS_BYTES`, as with gix's own cache.
fn packed_refs(repo: &gix::Repository) -> Result<Option<Arc<PackedRefs>>, Error> {
    let dir = repo.common_dir();
    let shown = dir.join("packed-refs");
    let reading = |error: &dyn std::fmt::Display| {
        Error::internal(format_args!("reading {}: {error}", shown.display()))
    };
    let opened = beneath::open_dir(dir).and_then(|dir| {
        beneath::open_beneath(
            dir.as_fd(),
            Path::new("packed-refs"),
            OFlag::O_RDONLY | OFlag::O_NONBLOCK,
        )
    });
    let file = match opened {
        Ok(file) => fs::File::from(file),
        Err(error) if names_nothing(&error) => return Ok(None),
        Err(error) if beneath::is_swapped(&error) => return Err(swapped(&shown)),
        Err(error) => return Err(reading(&error)),
    };
    let meta = file.metadata().map_err(|error| reading(&error))?;
    if !meta.is_file() || meta.len() > MAX_PACKED_REFS_BYTES {
        return Err(swapped(&shown));
    }
    let stamp = Stamp::of_metadata(&meta);
    let identity = (meta.dev(), meta.ino());
    if let Some(kept) = kept_packed_refs().get(identity, stamp) {
        return Ok(Some(kept));
    }
    // Room for the whole file at once, and it is kept as read
    // ([`PackedRefs::parse`]): grown by doubling and copied once parsed,
    // a lookup had raised the peak memory by twice the file's size
    // (`a_lookup_in_a_large_packed_refs_holds_one_copy_of_the_file`).
    let mut contents = Vec::with_capacity(usize::try_from(meta.len()).map_or(0, |len| len + 1));
    file.take(MAX_PACKED_REFS_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(|error| reading(&error))?;
    let buffer = Arc::new(PackedRefs::parse(contents).map_err(|fatal| reading(&fatal))?);
    // A file changed within the racy window may change again with the
    // same stamp: read again next time.
    if stamp.settled_now(RACY_WINDOW) {
        kept_packed_refs().put(identity, stamp, Arc::clone(&buffer));
    }
    Ok(Some(buffer))
}

/// How many parsed `packed-refs` are kept, process-wide, by file.
const PACKED_REFS_KEPT: NonZeroUsize = match NonZeroUsize::new(16) {
    Some(kept) => kept,
    None => unreachable!(),
};

/// How many bytes of parsed `packed-refs` are kept at most, the last one
/// read always: they are on the heap, where gix mapped the files it kept,
/// and sixteen of the largest (`MAX_PACKED_REFS_BYTES`) would be 4 GiB.
const PACKED_REFS_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// The parsed `packed-refs` kept, by file (device and inode) and stamp:
/// git rewrites the file by renaming a new one over it, so an equal stamp
/// names one content.
struct KeptPackedRefs {
    files: LruCache<(u64, u64), (Stamp, Arc<PackedRefs>)>,
    bytes: usize,
    /// [`PACKED_REFS_KEPT_BYTES`], but in tests.
    max_bytes: usize,
}

impl KeptPackedRefs {
    fn new(max_bytes: usize) -> KeptPackedRefs {
        KeptPackedRefs {
            files: LruCache::new(PACKED_REFS_KEPT),
            bytes: 0,
            max_bytes,
        }
    }

    fn get(&mut self, identity: (u64, u64), stamp: Stamp) -> Option<Arc<PackedRefs>> {
        let (kept, parsed) = self.files.get(&identity)?;
        (*kept == stamp).then(|| Arc::clone(parsed))
    }

    fn put(&mut self, identity: (u64, u64), stamp: Stamp, parsed: Arc<PackedRefs>) {
        self.bytes += parsed.len();
        if let Some((_, (_, replaced))) = self.files.push(identity, (stamp, parsed)) {
            self.bytes -= replaced.len();
        }
        while self.bytes > self.max_bytes && self.files.len() > 1 {
            if let Some((_, (_, evicted))) = self.files.pop_lru() {
                self.bytes -= evicted.len();
            }
        }
    }
}

fn kept_packed_refs() -> MutexGuard<'static, KeptPackedRefs> {
    static KEPT: OnceLock<Mutex<KeptPackedRefs>> = OnceLock::new();
    KEPT.get_or_init(|| Mutex::new(KeptPackedRefs::new(PACKED_REFS_KEPT_BYTES)))
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Looks up one ref by its full name: its loose file, read as git reads
/// it ([`read_loose`]), else `packed-refs`. A loose file git cannot read
/// is no ref, and hides a packed one of its name, as for git, which then
/// tries the next candidate of a short name (a `500` before: attack).
pub(super) fn find_exact(repo: &gix::Repository, full_name: &str) -> Result<Option<Target>, Error> {
    // A name gix considers invalid cannot exist as a ref.
    let Ok(name) = FullName::try_from(full_name) else {
        return Ok(None);
    };
    let dir = if full_name == "HEAD" || is_per_worktree(full_name.as_bytes()) {
        repo.git_dir()
    } else {
        repo.common_dir()
    };
    match read_loose(dir, Path::new(full_name))? {
        Some(Loose::Ref(target)) => return Ok(Some(target)),
        Some(Loose::Broken) => return Ok(None),
        None => {}
    }
    if full_name == "HEAD" {
        return Ok(None);
    }
    let Some(packed) = packed_refs(repo)? else {
        return Ok(None);
    };
    let found = packed
        .find(name.as_bstr())
        .map_err(|fatal| Error::internal(format_args!("reading ref {full_name}: {fatal}")))?;
    Ok(found.map(Target::Object))
}

/// `Branch`/`Tag` by the matched ref's namespace; `HEAD`, remotes and
/// anything else are labelled by their commit.
pub(super) fn ref_kind(full_name: &str) -> RefKind {
    if let Some(branch) = full_name.strip_prefix("refs/heads/") {
        RefKind::Branch(branch.to_owned())
    } else if let Some(tag) = full_name.strip_prefix("refs/tags/") {
        RefKind::Tag(tag.to_owned())
    } else {
        RefKind::Commit
    }
}

/// An abbreviated object id of 7 to 39 hex digits naming exactly one object.
pub(super) fn find_abbreviated(
    repo: &gix::Repository,
    reference: &str,
) -> Result<Option<ObjectId>, Error> {
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

/// Why an object did not peel to a commit, and so whether that answer
/// may be remembered (`Repository::peel`): an object id names its
/// content, so what follows from the content alone never changes, while a
/// missing object may be pushed or fetched, and a pack may be repacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PeelFailure {
    /// The object, or one a tag on the way names, is not there (yet).
    Missing,
    /// A tree or a blob, or a tag of one: its content says so.
    NotACommit,
    /// The chain of tags and the commit are over `MAX_PEELED_OBJECT_BYTES`:
    /// their headers say so, and each names the next by its content.
    TooLarge,
    /// A commit or tag whose content does not parse.
    Malformed(String),
    /// Reading it would allocate more than `gitoxide.objects.allocLimit`
    /// (`MAX_OBJECT_READ_BYTES`, ours, not the repository's): not the
    /// content alone but how it is stored (a delta of a huge base) decides,
    /// and a repack may store it otherwise. Found from the pack entries'
    /// headers, before anything is inflated: cheap to find again.
    OverAllocLimit(String),
    /// Anything else (an I/O error, a damaged pack): may pass.
    Unreadable(String),
}

impl PeelFailure {
    /// Whether the object's content alone decides this failure, so that it
    /// never changes.
    pub(super) fn is_content(&self) -> bool {
        match self {
            PeelFailure::NotACommit | PeelFailure::TooLarge | PeelFailure::Malformed(_) => true,
            PeelFailure::Missing | PeelFailure::OverAllocLimit(_) | PeelFailure::Unreadable(_) => {
                false
            }
        }
    }

    pub(super) fn error(&self) -> Error {
        match self {
            PeelFailure::Missing | PeelFailure::NotACommit => Error::RefNotFound,
            PeelFailure::TooLarge => Error::TooLarge,
            PeelFailure::Malformed(detail)
            | PeelFailure::OverAllocLimit(detail)
            | PeelFailure::Unreadable(detail) => Error::internal(detail),
        }
    }

    /// An object read failing: over the allocation limit, or unreadable.
    fn reading(id: ObjectId, error: &gix::Error) -> PeelFailure {
        use gix::error::{Class, ResourceExhaustionKind};
        let detail = format!("reading object {id}: {error}");
        if error.classify().has(Class::ResourceExhaustion(
            ResourceExhaustionKind::AllocationLimit,
        )) {
            PeelFailure::OverAllocLimit(detail)
        } else {
            PeelFailure::Unreadable(detail)
        }
    }
}

/// Peels annotated tags (nested ones too) down to a commit and reads its
/// committer time. A tree, a blob or a missing object is "not found".
pub(super) fn peel_to_commit(
    repo: &gix::Repository,
    mut id: ObjectId,
) -> Result<(ObjectId, i64), PeelFailure> {
    // No depth bound: object ids are hashes of their content, so a chain of
    // tags cannot loop.
    // The bound is on the whole chain: 1,200 chained tags of 16 MB each
    // had cost seconds of a serving thread per request (attack).
    let mut read_bytes = 0u64;
    loop {
        let header = repo
            .try_find_header(id)
            .map_err(|err| PeelFailure::reading(id, &err))?
            .ok_or(PeelFailure::Missing)?;
        if matches!(header.kind(), Kind::Tree | Kind::Blob) {
            return Err(PeelFailure::NotACommit);
        }
        read_bytes = read_bytes.saturating_add(header.size());
        if read_bytes > MAX_PEELED_OBJECT_BYTES {
            tracing::warn!(
                object = %id,
                bytes = header.size(),
                "a commit or tag object larger than the archiver reads; refused"
            );
            return Err(PeelFailure::TooLarge);
        }
        let object = repo
            .try_find_object(id)
            .map_err(|err| PeelFailure::reading(id, &err))?
            .ok_or(PeelFailure::Missing)?;
        let malformed = |what: &str, err: &dyn std::fmt::Display| {
            PeelFailure::Malformed(format!("{what} of {id}: {err}"))
        };
        match object.kind {
            Kind::Commit => {
                let committer = object
                    .try_to_commit_ref_iter()
                    .ok_or_else(|| malformed("the kind", &"not a commit"))?
                    .committer()
                    .map_err(|err| malformed("the committer", &err))?;
                return Ok((id, committer.seconds()));
            }
            Kind::Tag => {
                id = object
                    .try_to_tag_ref_iter()
                    .ok_or_else(|| malformed("the kind", &"not a tag"))?
                    .target_id()
                    .map_err(|err| malformed("the target", &err))?;
            }
            Kind::Tree | Kind::Blob => return Err(PeelFailure::NotACommit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed `packed-refs` of `refs` records of 64 bytes.
    fn packed(refs: usize) -> Arc<PackedRefs> {
        let contents: String = (0..refs)
            .map(|n| format!("{} refs/heads/{n:011}\n", "1".repeat(40)))
            .collect();
        let parsed = PackedRefs::parse(contents.into_bytes()).unwrap();
        assert_eq!(parsed.len(), refs * 64);
        Arc::new(parsed)
    }

    fn stamp(size: u64) -> Stamp {
        Stamp::Present {
            device: 1,
            inode: 1,
            size,
            modified: (1, 0),
            changed: (1, 0),
        }
    }

    /// The parsed files kept are bounded in bytes, not only in count
    /// (review: sixteen of the largest would be 4 GiB of heap), the last
    /// one read always kept; a changed stamp is a miss.
    #[test]
    fn kept_packed_refs_are_bounded_in_bytes() {
        let mut kept = KeptPackedRefs::new(100 * 64);
        kept.put((1, 1), stamp(1), packed(60));
        kept.put((1, 2), stamp(1), packed(30));
        assert!(kept.get((1, 1), stamp(1)).is_some());
        assert!(kept.get((1, 1), stamp(2)).is_none(), "another stamp");
        kept.put((1, 3), stamp(1), packed(30));
        assert!(kept.get((1, 2), stamp(1)).is_none(), "least recent let go");
        assert!(kept.get((1, 1), stamp(1)).is_some());
        assert_eq!(kept.bytes, 90 * 64);
        kept.put((1, 1), stamp(2), packed(10));
        assert_eq!(kept.bytes, 40 * 64, "a file read anew replaces its entry");
        kept.put((1, 4), stamp(1), packed(200));
        assert_eq!(kept.files.len(), 1, "the last one read is kept alone");
        assert_eq!(kept.bytes, 200 * 64);
    }
}
