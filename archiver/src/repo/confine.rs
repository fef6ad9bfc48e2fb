//! What a repository on disk may make the archiver read, checked before
//! gix opens it and again before each generation: the files git and gix
//! read whole (regular, within a bound), the alternates (bounded in number,
//! each inside `--repos`), and no symlink, FIFO, device or socket where a
//! ref or an object is read. Every check here answers an attack in which a
//! repository's own files led a read outside its root, hung a serving
//! thread, or took the process's memory.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use super::Repository;
use super::stamp::Stamps;

/// The most object directories a repository may read from, its own and
/// its alternates'.
pub(super) const MAX_OBJECT_DIRS: usize = 64;

/// How deep git follows alternates of alternates (its own limit).
pub(super) const MAX_ALTERNATE_DEPTH: usize = 5;

/// The most bytes a loose ref file may hold: a ref is 41 bytes, a symbolic
/// one a line. git and gix read such a file whole.
pub(super) const MAX_REF_FILE_BYTES: u64 = 64 * 1024;

/// The most bytes of `packed-refs`: a million refs (`MAX_LISTED_REFS`)
/// take 60 to 120 MB.
pub(super) const MAX_PACKED_REFS_BYTES: u64 = 256 * 1024 * 1024;

/// The files of a git dir that git or gix read whole when they open it or
/// resolve a ref, and the most bytes each may hold. Every one must be a
/// regular file within its bound (attack: a 1 GiB `HEAD` or `config`
/// crashed the archiver out of memory, a FIFO hung a serving thread for
/// good, `config` linked to `/dev/zero` grew it until the kernel killed
/// it).
pub(super) const GIT_FILES: [(&str, u64); 8] = [
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
pub(super) fn regular_file_within(path: &Path, max_bytes: u64) -> Result<(), PathBuf> {
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
pub(super) fn git_files_sane(directory: &Path) -> Result<(), PathBuf> {
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
pub(super) fn alternates_bounded(git_dir: &Path) -> Result<(), PathBuf> {
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
pub(super) fn named_dir(file: &Path, base: &Path, prefix: &[u8]) -> Option<PathBuf> {
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
pub(super) fn alternates_stamps(
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
pub(super) fn ref_path_without_symlinks(base: &Path, name: &str) -> Result<(), PathBuf> {
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
pub(super) enum RefsRefused {
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
pub(super) fn refs_without_symlinks(dir: &Path) -> Result<(), RefsRefused> {
    for top in ["packed-refs", "refs"] {
        ref_path_without_symlinks(dir, top).map_err(RefsRefused::NotAFile)?;
    }
    let mut pending = vec![dir.join("refs")];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Nested past `PATH_MAX`, or one this process may not list:
            // nothing can read through it, and git passes it over (a `500`
            // before: attack).
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::InvalidFilename
                        | io::ErrorKind::PermissionDenied
                ) =>
            {
                continue;
            }
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
                    // In a directory this process may list but not
                    // search: read as no ref (`refs::read_loose`).
                    Err(error)
                        if matches!(
                            error.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                        ) =>
                    {
                        continue;
                    }
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
pub(super) const OBJECTS_DEPTH: usize = 3;

/// `Err` names the first symlink under `dir`, `depth` levels down at most,
/// or a directory that cannot be listed.
///
/// What is gone by the time it is looked at is passed over: git's own
/// maintenance removes files and directories here while a repository is
/// served (`gc` and `prune-packed` delete the loose objects they packed and
/// the fan-out directories they emptied, `repack -d` the packs it
/// replaced), and nothing can be read through what is not there (attack:
/// a `git gc --prune=now` made a repository `404 repo_not_found`, and its
/// cold archives `500`, until it ended).
pub(super) fn without_symlinks(dir: &Path, depth: usize) -> Result<(), PathBuf> {
    let entries = fs::read_dir(dir).map_err(|_| dir.to_path_buf())?;
    entries_without_symlinks(entries, dir, depth)
}

fn entries_without_symlinks(entries: fs::ReadDir, dir: &Path, depth: usize) -> Result<(), PathBuf> {
    for entry in entries {
        let entry = entry.map_err(|_| dir.to_path_buf())?;
        // `DirEntry::file_type` does not follow a symlink.
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => return Err(entry.path()),
        };
        // Nor a FIFO, a device or a socket: a read of one (a pack's index,
        // the commit-graph) would hang or never end (attack).
        if !kind.is_file() && !kind.is_dir() {
            return Err(entry.path());
        }
        if kind.is_dir() && depth > 1 {
            let path = entry.path();
            match fs::read_dir(&path) {
                Ok(entries) => entries_without_symlinks(entries, &path, depth - 1)?,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                // Nor can anything be read in a directory this process may
                // not search: git's quarantine of a push being received
                // (`tmp_objdir-incoming-*`, mode 0700, the pusher's) where
                // the archiver reads another user's repositories through
                // their group, as the ops units run it (attack: every cold
                // archive of a repository was `500` while a push to it was
                // received).
                Err(error)
                    if error.kind() == io::ErrorKind::PermissionDenied
                        && nix::unistd::eaccess(&path, nix::unistd::AccessFlags::X_OK).is_err() => {
                }
                Err(_) => return Err(path),
            }
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
pub(super) fn alternates_inside(common_dir: &Path, root: &Path) -> Result<Vec<PathBuf>, PathBuf> {
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
