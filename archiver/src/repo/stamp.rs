//! Cheap proof that ref files did not change since they were read: a stat
//! stamp (device, inode, size, modification and change times, to the
//! nanosecond) per file, or "absent".
//!
//! git updates a ref by writing `{name}.lock` and renaming it over the ref,
//! and rewrites `packed-refs` the same way, so every update gives the file a
//! new inode, new times, and touches its directory. A stamp that is still
//! equal therefore means the same content, with one exception that
//! `is_settled` rules out: timestamps come from a coarse clock (a jiffy, a
//! second on some filesystems), so two writes within one tick can leave the
//! same times, size and (reused) inode. A file that changed within
//! `RACY_WINDOW` of being stamped is not trusted: whatever was read from it
//! is read again next time instead of being remembered (git's own "racy
//! git" rule for its index).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after its last change a file's stamp is trusted.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// One file's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    Absent,
    /// A directory on the way may not be searched by this process
    /// (`EACCES`): git, as the same user, reads no ref there either, and
    /// does not look in `packed-refs` for it as for an absent one, so the
    /// two are told apart.
    Unreadable,
    /// A file stands where a directory on the way should be (`ENOTDIR`):
    /// git finds no ref there and, unlike for an absent one, does not look
    /// in `packed-refs` for it, so the two are told apart.
    UnderAFile,
    Present {
        device: u64,
        inode: u64,
        size: u64,
        /// Seconds and nanoseconds.
        modified: (i64, i64),
        changed: (i64, i64),
    },
}

/// Whether `error`, from opening or stating a path, says the path names
/// nothing git could read: missing, under something that is not a
/// directory, or too long to open.
pub fn names_nothing(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::InvalidFilename
    )
}

impl Stamp {
    /// Stats `path` (following symlinks, as git reads refs). A path whose
    /// parent is missing or not a directory is absent too, and so is one
    /// too long to open, which git cannot read either.
    pub fn of(path: &std::path::Path) -> io::Result<Stamp> {
        match fs::metadata(path) {
            Ok(metadata) => Ok(Stamp::of_metadata(&metadata)),
            Err(error) if error.kind() == io::ErrorKind::NotADirectory => Ok(Stamp::UnderAFile),
            Err(error) if names_nothing(&error) => Ok(Stamp::Absent),
            Err(error) if error.kind() == io::ErrorKind::PermissionDenied => Ok(Stamp::Unreadable),
            Err(error) => Err(error),
        }
    }

    /// The stamp of a file already open (its `fstat`).
    pub fn of_metadata(metadata: &fs::Metadata) -> Stamp {
        Stamp::Present {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// Whether the file last changed at least `window` before now.
    pub fn settled_now(&self, window: Duration) -> bool {
        self.is_settled(SystemTime::now(), window)
    }

    /// Whether the file last changed at least `window` before `now`, so a
    /// later change cannot leave the same stamp.
    fn is_settled(&self, now: SystemTime, window: Duration) -> bool {
        let Stamp::Present {
            modified, changed, ..
        } = *self
        else {
            return true;
        };
        let Some(limit) = now.checked_sub(window) else {
            return false;
        };
        let Ok(limit) = limit.duration_since(UNIX_EPOCH) else {
            return false;
        };
        let before = |(seconds, nanos): (i64, i64)| {
            let Ok(seconds) = u64::try_from(seconds) else {
                return true;
            };
            Duration::new(seconds, u32::try_from(nanos).unwrap_or(0)) < limit
        };
        before(modified) && before(changed)
    }
}

/// Files and their stamps, taken together.
#[derive(Clone, Debug, Default)]
pub struct Stamps(Vec<(PathBuf, Stamp)>);

impl Stamps {
    /// Stamps every path in `paths`.
    pub fn take(paths: impl IntoIterator<Item = PathBuf>) -> io::Result<Stamps> {
        let mut stamps = Stamps::default();
        for path in paths {
            stamps.add(path)?;
        }
        Ok(stamps)
    }

    /// Stamps one more path; returns its stamp.
    pub fn add(&mut self, path: PathBuf) -> io::Result<Stamp> {
        let stamp = Stamp::of(&path)?;
        self.0.push((path, stamp));
        Ok(stamp)
    }

    /// The paths stamped, in the order they were.
    pub fn paths(&self) -> impl Iterator<Item = &std::path::Path> {
        self.0.iter().map(|(path, _)| path.as_path())
    }

    pub fn extend(&mut self, other: Stamps) {
        self.0.extend(other.0);
    }

    /// Every file still has the stamp it had (one `statx` per file). An
    /// error reading a stamp counts as a change.
    pub fn unchanged(&self) -> bool {
        self.0
            .iter()
            .all(|(path, stamp)| Stamp::of(path).is_ok_and(|now| now == *stamp))
    }

    /// No file changed within `window` before now: the stamps may be trusted.
    pub fn settled(&self, window: Duration) -> bool {
        let now = SystemTime::now();
        self.0
            .iter()
            .all(|(_, stamp)| stamp.is_settled(now, window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_of_the_same_size_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refs/heads/main");
        assert_eq!(Stamp::of(&path).unwrap(), Stamp::Absent);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "a").unwrap();
        let stamps = Stamps::take([path.clone()]).unwrap();
        assert!(stamps.unchanged());
        // As git does: a lock file renamed over the ref.
        let lock = dir.path().join("refs/heads/main.lock");
        fs::write(&lock, "b").unwrap();
        fs::rename(&lock, &path).unwrap();
        assert!(!stamps.unchanged());
        fs::remove_file(&path).unwrap();
        assert!(!stamps.unchanged());
        // Below a file: not absent (git looks no further for such a ref,
        // where for an absent one it looks in `packed-refs`), and changed
        // once the file is gone.
        fs::write(&path, "c").unwrap();
        let below = dir.path().join("refs/heads/main/x");
        assert_eq!(Stamp::of(&below).unwrap(), Stamp::UnderAFile);
        let under = Stamps::take([below]).unwrap();
        assert!(under.unchanged());
        fs::remove_file(&path).unwrap();
        assert!(!under.unchanged());
    }

    /// An in-place rewrite of the same size whose modification time is
    /// set back (`touch -r`, a tool preserving times) still changes the
    /// stamp: its change time moved (docs/archiver.md, "A push is visible
    /// to the very next request": stamps hold modification *and* change
    /// times). (Mutation review: a stamp without the change time passed
    /// every test.)
    #[test]
    fn a_rewrite_in_place_with_its_old_mtime_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed-refs");
        fs::write(&path, "a").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let stamps = Stamps::take([path.clone()]).unwrap();
        assert!(stamps.unchanged());
        // The ctime clock may not have ticked since the stamp was taken.
        let taken = fs::metadata(&path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let file = fs::File::options().write(true).open(&path).unwrap();
            std::io::Write::write_all(&mut &file, b"b").unwrap();
            file.set_modified(old).unwrap();
            let now = fs::metadata(&path).unwrap();
            if (now.ctime(), now.ctime_nsec()) != (taken.ctime(), taken.ctime_nsec()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "ctime never moved");
            std::thread::sleep(Duration::from_millis(10));
        }
        let now = fs::metadata(&path).unwrap();
        assert_eq!(
            (now.ino(), now.size(), now.mtime(), now.mtime_nsec()),
            (taken.ino(), taken.size(), taken.mtime(), taken.mtime_nsec()),
            "only the change time tells"
        );
        assert!(!stamps.unchanged());
    }

    /// A file whose modification time is old but which changed just now
    /// (its change time) is not settled: a tool that preserves times must
    /// not make a fresh write look old (docs/archiver.md: an answer whose
    /// files changed within the last 2 s is not remembered). (Mutation
    /// review: judging by the modification time alone passed every test.)
    #[test]
    fn a_file_with_an_old_mtime_changed_just_now_is_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed-refs");
        fs::write(&path, "x").unwrap();
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let stamps = Stamps::take([path]).unwrap();
        assert!(!stamps.settled(RACY_WINDOW));
    }

    #[test]
    fn a_file_changed_within_the_window_is_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed-refs");
        fs::write(&path, "x").unwrap();
        let stamps = Stamps::take([path, dir.path().join("missing")]).unwrap();
        assert!(!stamps.settled(RACY_WINDOW));
        assert!(stamps.settled(Duration::ZERO));
        assert!(
            Stamps::take([dir.path().join("missing")])
                .unwrap()
                .settled(RACY_WINDOW)
        );
    }
}
