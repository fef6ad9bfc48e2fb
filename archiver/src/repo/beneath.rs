//! Opening a file of a repository by a path under one of its directories
//! (its git dir or common dir) without following a symlink anywhere on
//! the way: the read is of the file under that directory, or of nothing.
//!
//! The checks for symlinks (`confine::ref_path_without_symlinks`,
//! `confine::refs_without_symlinks`) run before a read, by path, and a
//! directory on the way swapped for a symlink between a check and the read
//! was followed by an `open(2)` of the whole path: `O_NOFOLLOW` guards its
//! last component alone, so a ref file anywhere on the host was read as a
//! ref and its commit served (attack:
//! `a_ref_directory_swapped_for_a_symlink_is_not_read_through`). Here the
//! directory is opened first, and the path under it resolved from that
//! descriptor with `openat2(2)`'s `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`:
//! a symlink met anywhere is `ELOOP`, a `..` leading above it `EXDEV`
//! ([`is_swapped`]), and nothing outside is opened.
//!
//! The directory itself is opened by its path, as gix and git open it:
//! that the git dir and common dir are inside `--repos`, and still the
//! directory opened, is the checks' of the open and of each request
//! (`Repository::is_current`, which looks at the git dir: under
//! `--repos` a repository's common dir is its git dir,
//! `Repositories::is_own_git_dir`; the one repository an operator names
//! as `--repos` may have another, where the operator put it), not this
//! module's.
//!
//! `openat2` is Linux 5.6 and later. Where it is missing (`ENOSYS`, or a
//! seccomp filter that refuses it) the path is walked one component at a
//! time, each opened with `openat(2)` and `O_NOFOLLOW` from the directory
//! opened before it: slower (a syscall per component), as safe. Which is
//! used is decided once, by the first open, and logged when it is the walk.

use std::{
    ffi::OsStr,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Component, Path},
    sync::OnceLock,
};

use nix::{
    errno::Errno,
    fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2},
    sys::stat::{Mode, SFlag, fstatat},
};

/// How many times an `openat2` that a concurrent rename made give up
/// (`EAGAIN`, which `RESOLVE_BENEATH` may return) is tried before the path
/// is walked instead.
const OPENAT2_TRIES: usize = 4;

/// The longest path git can open (`PATH_MAX` less its NUL): git opens a
/// ref by its whole path, so one longer names nothing to git, while an
/// `openat` relative to a directory would still reach it.
pub(super) const LONGEST_PATH_BYTES: usize = 4095;

/// Whether `path` is too long for git to open: it reads no ref there.
pub(super) fn too_long_for_git(path: &Path) -> bool {
    path.as_os_str().len() > LONGEST_PATH_BYTES
}

/// Opens the directory `dir` (a git dir or common dir, checked when the
/// repository was opened) to resolve paths under it: `O_PATH`, so that one
/// the archiver may search but not list opens.
pub(super) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(openat(
        AT_FDCWD,
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens `relative` under the directory `dir` with `flags` (`O_NOFOLLOW`
/// and `O_CLOEXEC` added), following no symlink on the way nor at the end,
/// and leaving `dir` by no `..`: `ELOOP` or `EXDEV` if it would
/// ([`is_swapped`]).
pub(super) fn open_beneath(dir: BorrowedFd, relative: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    if openat2_works() && !walking_in_test() {
        // No `O_NOFOLLOW`: with `O_PATH` it would open a symlink at the
        // end as itself (`ENOTDIR` with `O_DIRECTORY`), where
        // `RESOLVE_NO_SYMLINKS` alone refuses it, `ELOOP`, as any other.
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        for _ in 0..OPENAT2_TRIES {
            match openat2(dir, relative, how) {
                Err(Errno::EAGAIN) => continue,
                opened => return Ok(opened?),
            }
        }
    }
    walk_beneath(dir, relative, flags)
}

/// [`open_beneath`] without `openat2`: one `openat` per component, each
/// from the directory opened before it, none following a symlink.
pub(super) fn walk_beneath(dir: BorrowedFd, relative: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            // What `RESOLVE_BENEATH` refuses: a way out of `dir`.
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Errno::EXDEV.into());
            }
        }
    }
    let Some((last, on_the_way)) = names.split_last() else {
        return Err(Errno::ENOENT.into());
    };
    let mut opened: Option<OwnedFd> = None;
    for name in on_the_way {
        let from = opened.as_ref().map_or(dir, AsFd::as_fd);
        let next = open_component(
            from,
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        )?;
        opened = Some(next);
    }
    open_component(opened.as_ref().map_or(dir, AsFd::as_fd), last, flags)
}

/// One component opened from `dir` with `flags` (which hold
/// `O_NOFOLLOW`). With `O_PATH | O_DIRECTORY`, a symlink is `ENOTDIR`, not
/// `ELOOP`: told apart here, so that the walk says `ELOOP` for a symlink
/// wherever it is, as `openat2` does.
fn open_component(dir: BorrowedFd, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
    match openat(dir, name, flags, Mode::empty()) {
        Err(Errno::ENOTDIR)
            if fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|stat| {
                SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
            }) =>
        {
            Err(Errno::ELOOP.into())
        }
        opened => Ok(opened?),
    }
}

/// Whether opening failed for a symlink on the way (`ELOOP`), or a way
/// out of the directory (`EXDEV`): what the checks before the read refuse,
/// swapped in since.
pub(super) fn is_swapped(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::ELOOP | Errno::EXDEV)
    )
}

#[cfg(test)]
thread_local! {
    /// Test only: this thread opens as on a kernel without `openat2`.
    static WALKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Test only: makes this thread open by the walk, as on a kernel without
/// `openat2`.
#[cfg(test)]
pub(super) fn walk_on_this_thread() {
    WALKING.with(|walking| walking.set(true));
}

#[cfg(test)]
fn walking_in_test() -> bool {
    WALKING.with(std::cell::Cell::get)
}

#[cfg(not(test))]
fn walking_in_test() -> bool {
    false
}

/// Whether this kernel has `openat2` and lets this process call it.
fn openat2_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(AT_FDCWD, "/", how) {
            Ok(_) => true,
            Err(error) => {
                tracing::info!(
                    %error,
                    "openat2 is not available; ref files are opened one path component at a time"
                );
                false
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Both ways of opening, on every case: a file, a directory, a
    /// symlink at the end and on the way (to a directory that exists), a
    /// `..`, and something missing.
    #[test]
    fn both_ways_refuse_a_symlink_anywhere_and_a_way_out() {
        assert!(openat2_works(), "this kernel has openat2");
        let temp = tempfile::tempdir().unwrap();
        let base = temp.path().join("git");
        fs::create_dir_all(base.join("refs/heads/sub")).unwrap();
        fs::write(base.join("refs/heads/sub/x"), "x\n").unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("x"), "outside\n").unwrap();
        std::os::unix::fs::symlink(&outside, base.join("refs/heads/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("x"), base.join("refs/heads/file")).unwrap();
        let dir = open_dir(&base).unwrap();
        type Open = fn(BorrowedFd, &Path, OFlag) -> io::Result<OwnedFd>;
        for (way, open) in [
            ("openat2", open_beneath as Open),
            ("walk", walk_beneath as Open),
        ] {
            let open = |path: &str, flags| open(dir.as_fd(), Path::new(path), flags);
            let read = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
            let mut file = fs::File::from(open("refs/heads/sub/x", read).unwrap());
            let mut contents = String::new();
            std::io::Read::read_to_string(&mut file, &mut contents).unwrap();
            assert_eq!(contents, "x\n", "{way}");
            open("refs/heads/sub", OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap();
            open("refs/heads/sub", OFlag::O_PATH | OFlag::O_DIRECTORY).unwrap();
            for (path, flags) in [
                ("refs/heads/link/x", read),
                ("refs/heads/link", OFlag::O_RDONLY | OFlag::O_DIRECTORY),
                ("refs/heads/link", OFlag::O_PATH | OFlag::O_DIRECTORY),
                ("refs/heads/file", read),
                ("refs/../../outside/x", read),
            ] {
                let error = open(path, flags).unwrap_err();
                assert!(is_swapped(&error), "{way} {path}: {error}");
            }
            let missing = open("refs/heads/none/x", read).unwrap_err();
            assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{way}");
            let under_a_file = open("refs/heads/sub/x/y", read).unwrap_err();
            assert_eq!(under_a_file.kind(), io::ErrorKind::NotADirectory, "{way}");
        }
    }
}
