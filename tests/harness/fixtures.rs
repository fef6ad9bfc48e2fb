//! Directories that the tests of one test binary share.
//!
//! Cargo runs the tests of a file on parallel threads, so each test starts
//! the services it talks to and stops them on drop. Services are never
//! shared: one kept in a `static` is never dropped, and its process would
//! outlive the test binary. What tests may share is a directory built once
//! and then only read: a repository that each test serves with an archiver
//! of its own, or a cache dir that a stopped archiver left complete files
//! in (an archiver started on it re-indexes them, as after a restart).
//!
//! - [`process_dir`]: a directory for this process's shared fixtures
//!   (cheap to build, built fresh by every run); those of earlier runs are
//!   removed.
//! - [`cached_dir`]: a fixture built once per target dir and reused by later
//!   runs (large repositories that take seconds to build and are the same
//!   every time).
//! - [`link_files`]: a test's own copy of a shared cache dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::procfs::process_alive;

/// The directory under `parent` that holds every process's [`process_dir`]s.
const PROCESS_DIRS: &str = "gitball-e2e-shared";

/// A fresh, empty directory `{parent}/gitball-e2e-shared/{name}-{pid}` for
/// fixtures that the tests of this process share (call it once per name, in
/// a `OnceLock` initialiser).
///
/// It is not removed when the process exits (a value in a `static` is never
/// dropped); instead the directories of processes that are no longer running
/// are removed here, so at most one run's fixtures stay behind.
pub fn process_dir(parent: &Path, name: &str) -> PathBuf {
    let root = parent.join(PROCESS_DIRS);
    fs::create_dir_all(&root).expect("create the shared fixtures dir");
    let own = std::process::id();
    for entry in fs::read_dir(&root).into_iter().flatten().flatten() {
        let file_name = entry.file_name();
        let pid = file_name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != own
            && !process_alive(pid)
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{name}-{own}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create a shared fixture dir");
    dir
}

/// `{parent}/{name}`, built by `build` the first time and reused by every
/// later run with the same target dir. `name` should carry a version
/// (`…-v1`) to bump when `build` changes.
///
/// `build` fills a directory of its own, which is marked `ready` and then
/// renamed into place: a run that was interrupted leaves no half-built
/// fixture, and when two test processes build it at once, one keeps its copy
/// and the other uses it.
pub fn cached_dir(parent: &Path, name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let root = parent.join(name);
    if !root.join("ready").is_file() {
        let _ = fs::remove_dir_all(&root);
        let building = parent.join(format!("{name}.building-{}", std::process::id()));
        let _ = fs::remove_dir_all(&building);
        fs::create_dir_all(&building).expect("create the fixture dir");
        let started = Instant::now();
        build(&building);
        fs::write(building.join("ready"), "complete\n").expect("mark the fixture ready");
        // Another test process may have won the race: then use its copy.
        if fs::rename(&building, &root).is_err() {
            let _ = fs::remove_dir_all(&building);
        }
        eprintln!(
            "built the fixture {name} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    assert!(
        root.join("ready").is_file(),
        "the fixture {name} is missing"
    );
    root
}

/// Gives `to` (created) the files of `from`: hard links where both are on
/// one file system, copies otherwise. A service may delete its links (cache
/// eviction) without touching `from`; nothing writes into a complete cache
/// file, so the links never change under another test.
pub fn link_files(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create the target dir");
    for entry in fs::read_dir(from).expect("read the source dir").flatten() {
        let source = entry.path();
        if !source.is_file() {
            continue;
        }
        let target = to.join(entry.file_name());
        if fs::hard_link(&source, &target).is_err() {
            fs::copy(&source, &target).expect("copy a fixture file");
        }
    }
}

/// Returns once the kernel's clock, as a new file's ctime beside `path`
/// shows it, is past `path`'s ctime (its last change of any kind), so that
/// a write to `path` now moves its mtime, and a new link its ctime: where
/// timestamps are coarse (Linux before 6.13), a change in the tick the
/// file was last changed leaves its timestamps as they were.
pub fn past_the_clock_of(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let ctime = |path: &Path| {
        let metadata = fs::metadata(path).expect("the file's metadata");
        (metadata.ctime(), metadata.ctime_nsec())
    };
    let changed = ctime(path);
    let probe = path.with_extension("ctime-probe");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        fs::write(&probe, b"").expect("write a probe file");
        if ctime(&probe) > changed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
    }
    fs::remove_file(&probe).expect("remove the probe file");
}
