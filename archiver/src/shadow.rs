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
//! - `refs` and `packed-refs`: symlinks to the repository's, so ref-dependent
//!   `export-subst` placeholders (`%D`, `%(describe)`) expand as before (git
//!   reads them when it runs: `cache` checks afterwards that they are still
//!   those of the archive's key);
//! - `HEAD`: a copy of the repository's (git refuses a symlinked `HEAD`
//!   that leads out of the git dir), refreshed before each generation.
//!
//! What still applies is what the tree itself says (`export-ignore`,
//! `export-subst`, `eol` in `.gitattributes`): content, not commands. A
//! `filter=` attribute without a driver configured does nothing.
//!
//! Shadows live in a private directory under the temp dir (not in the
//! cache dir, which holds archives only), one per repository, and are
//! removed when the cache is dropped.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The shadow's whole configuration. `abbrev = 40`: `export-subst`'s
/// abbreviated ids (`%h`, `%p`, `%t`, `%(describe)`) are written with 40
/// hex digits, a SHA-1 id whole (`no` says the same only since git 2.31).
/// git's default length grows with the repository's object count, and any
/// length is lengthened where another object shares the prefix, so a push
/// of unrelated (even unreachable) objects, or a replica with more of
/// them, changed the bytes under the same refs and ETag; a prefix can also
/// be forged. Only the whole id is decided by the commit alone
/// (docs/urls.md, "Archives that read refs").
const CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n\tabbrev = 40\n";

/// Where one cache keeps its shadow git dirs: a private (mode 0700)
/// temporary directory, removed when dropped.
#[derive(Debug)]
pub struct Shadows {
    root: tempfile::TempDir,
}

impl Shadows {
    pub fn create() -> io::Result<Shadows> {
        let root = tempfile::Builder::new()
            .prefix("gitball-archiver-")
            .tempdir()?;
        Ok(Shadows { root })
    }

    /// The shadow git dir for the repository whose git dir is `git_dir`
    /// and whose objects and refs are in `common_dir`, made if needed and
    /// with a fresh `HEAD`.
    pub fn prepare(&self, git_dir: &Path, common_dir: &Path) -> io::Result<PathBuf> {
        let digest = hex::encode(Sha256::digest(git_dir.as_os_str().as_encoded_bytes()));
        let shadow = self.root.path().join(&digest[..32]);
        if !shadow.join("config").is_file() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(shadow.join("objects/info"))?;
            write_atomically(
                &shadow.join("objects/info/alternates"),
                format!("{}\n", common_dir.join("objects").display()).as_bytes(),
            )?;
            for name in ["refs", "packed-refs"] {
                match std::os::unix::fs::symlink(common_dir.join(name), shadow.join(name)) {
                    Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(error);
                    }
                    _ => {}
                }
            }
            // Last: its presence says the shadow is complete.
            write_atomically(&shadow.join("config"), CONFIG.as_bytes())?;
        }
        let head = fs::read(git_dir.join("HEAD"))?;
        if fs::read(shadow.join("HEAD")).ok().as_deref() != Some(head.as_slice()) {
            write_atomically(&shadow.join("HEAD"), &head)?;
        }
        Ok(shadow)
    }
}

/// Writes `path` through a temporary name and a rename, so a concurrent
/// generation never reads half a file.
fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let temporary = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    fs::write(&temporary, contents)?;
    fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_borrows_objects_and_refs_and_copies_head() {
        let dir = tempfile::tempdir().unwrap();
        let git_dir = dir.path().join("repo.git");
        fs::create_dir_all(git_dir.join("refs/heads")).unwrap();
        fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        fs::write(git_dir.join("config"), "[tar \"zip\"]\n\tcommand = evil\n").unwrap();
        let shadows = Shadows::create().unwrap();
        let shadow = shadows.prepare(&git_dir, &git_dir).unwrap();
        assert_eq!(fs::read_to_string(shadow.join("config")).unwrap(), CONFIG);
        assert_eq!(
            fs::read_to_string(shadow.join("objects/info/alternates")).unwrap(),
            format!("{}\n", git_dir.join("objects").display())
        );
        assert_eq!(
            fs::read_link(shadow.join("refs")).unwrap(),
            git_dir.join("refs")
        );
        assert_eq!(
            fs::read_to_string(shadow.join("HEAD")).unwrap(),
            "ref: refs/heads/main\n"
        );
        // HEAD follows the repository's; the rest is made once.
        fs::write(git_dir.join("HEAD"), "ref: refs/heads/trunk\n").unwrap();
        assert_eq!(shadows.prepare(&git_dir, &git_dir).unwrap(), shadow);
        assert_eq!(
            fs::read_to_string(shadow.join("HEAD")).unwrap(),
            "ref: refs/heads/trunk\n"
        );
        let root = shadows.root.path().to_owned();
        drop(shadows);
        assert!(!root.exists(), "shadows outlived their owner");
    }
}
