//! Which tar the configured git writes: a fingerprint of its tar writer,
//! taken once at start-up.
//!
//! `tar` is git's own bytes, and every other format is made from them
//! (`docs/urls.md#byte-stability`), so a git release that changes its tar
//! writer changes archives under ETags that promise the old bytes: a cache
//! or CDN holding one and an archiver making the other would serve two
//! archives under one ETag, and the proxy would resume a download begun on
//! one replica with the other's bytes after a rolling upgrade. So at
//! start-up the archiver has its git archive a fixed canary tree, made with
//! git's plumbing in a directory of its own, exactly as a generation runs
//! git ([`generate::command`]), and compares the tar's SHA-256 with
//! [`REFERENCE`], the one the reference git writes. The same bytes: every
//! ETag is what it always was. Other bytes: the fingerprint becomes part of
//! every archive's variant (`Spec::variant`), so archives of this git get
//! ETags and cache keys of their own, and a warning says so.
//!
//! The canary holds what a tar writer encodes: a file, an executable, an
//! empty file, a symlink, a path and a symlink target too long for the
//! ustar fields (pax headers), a name that is not ASCII, a nested
//! directory, a submodule, and the commit id in the global header.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::generate::{self, Compression, Spec};
use gitball_core::url::Format;

/// The SHA-256 of the canary's tar as git 2.47.3 writes it, with which the
/// golden hashes (`tests/archiver.rs`) were recorded (git 2.39.5 writes
/// the same).
pub const REFERENCE: &str = "8a3c97413c0d0b40c3334fba9086b508dbf17e64b6de5f95162cd368324054d9";

/// The prefix of the canary's entries. Stub gits in the tests pass a
/// command line that holds it through to the real git.
pub const PREFIX: &str = "gitball-canary/";

/// The canary commit's author and committer time.
const TIME: i64 = 1_700_000_000;

/// The whole canary, made and archived, takes at most this long.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `git fast-import` input of the canary: one commit of the tree above.
fn fast_import_stream() -> String {
    let long_dir = "d".repeat(90);
    let long_target = "t".repeat(120);
    let files: [(&str, &str, &str); 7] = [
        ("100644", "README", "gitball canary\n"),
        ("100755", "bin/run.sh", "#!/bin/sh\nexit 0\n"),
        ("100644", "empty", ""),
        ("120000", "link", "README"),
        ("120000", "long-link", &long_target),
        ("100644", "naïve/fichier.txt", "non-ASCII name\n"),
        ("100644", "a/b/c/nested.txt", "nested\n"),
    ];
    let mut stream = format!(
        "commit refs/heads/main\n\
         author Canary <canary@example.invalid> {TIME} +0000\n\
         committer Canary <canary@example.invalid> {TIME} +0000\n\
         data 7\ncanary\n"
    );
    for (mode, path, content) in files {
        stream.push_str(&format!(
            "M {mode} inline {path}\ndata {}\n{content}\n",
            content.len()
        ));
    }
    stream.push_str(&format!(
        "M 100644 inline {long_dir}/{long_dir}/long-path.txt\ndata 5\nlong\n\n"
    ));
    // A submodule: git writes it as an empty directory.
    stream.push_str("M 160000 0123456789abcdef0123456789abcdef01234567 submodule\n\n");
    stream
}

/// A git command in `git_dir` with the environment `generate::command`
/// gives git: no configuration but the directory's own, no program found.
fn plumbing(git: &Path, git_dir: &Path) -> Command {
    let mut command = Command::new(git);
    command
        .env_clear()
        .env("PATH", "/dev/null")
        .env("HOME", "/nonexistent")
        .env("LC_ALL", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .arg(format!("--git-dir={}", git_dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `command` (with `input` on its stdin, if any) and returns its
/// stdout; an error names `what` and carries git's stderr.
async fn run(mut command: Command, input: Option<&[u8]>, what: &str) -> anyhow::Result<Vec<u8>> {
    if input.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().with_context(|| format!("{what}: spawn"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input)
            .await
            .with_context(|| format!("{what}: write"))?;
    }
    let output = child
        .wait_with_output()
        .await
        .with_context(|| format!("{what}: wait"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{what}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// The SHA-256 (hex) of the canary's tar as `git` writes it, made in a new
/// directory in `parent` that is removed afterwards.
pub async fn fingerprint(git: &Path, parent: &Path) -> anyhow::Result<String> {
    // Named as the shadows are: one a killed archiver left is removed at
    // the next start (`Cache::open`).
    let dir = tempfile::Builder::new()
        .prefix(crate::shadow::SHADOWS_PREFIX)
        .tempdir_in(parent)
        .context("a directory for the canary")?;
    let git_dir = dir.path().join("canary.git");
    tokio::time::timeout(TIMEOUT, async {
        let mut init = plumbing(git, &git_dir);
        init.args(["init", "--quiet", "--bare", "--template="]);
        run(init, None, "git init").await?;
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
        let mut rev_parse = plumbing(git, &git_dir);
        rev_parse.args(["rev-parse", "--verify", "refs/heads/main^{commit}"]);
        let commit = run(rev_parse, None, "git rev-parse").await?;
        let spec = Spec {
            git_dir: git_dir.clone(),
            common_dir: git_dir.clone(),
            repository: "gitball/canary".to_owned(),
            commit: String::from_utf8_lossy(&commit).trim().to_owned(),
            format: Format::Tar,
            prefix: PREFIX.to_owned(),
            subtree: None,
            compression: Compression::None,
            commit_time: TIME,
            refs: None,
            confined_to: None,
            tar_writer: None,
        };
        let tar = run(generate::command(git, &spec, &git_dir), None, "git archive").await?;
        Ok(hex::encode(Sha256::digest(&tar)))
    })
    .await
    .with_context(|| format!("the canary took more than {TIMEOUT:?}"))?
}

/// What [`Spec::variant`] is given for archives of `git`: `None` when it
/// writes the reference tar, else its fingerprint (16 hex digits), with a
/// warning.
pub async fn tar_writer(git: &Path, parent: &Path) -> anyhow::Result<Option<String>> {
    let fingerprint = fingerprint(git, parent)
        .await
        .with_context(|| format!("{} cannot archive a canary tree", git.display()))?;
    if fingerprint == REFERENCE {
        tracing::debug!(git = %git.display(), "git writes the reference tar");
        return Ok(None);
    }
    tracing::warn!(
        git = %git.display(),
        %fingerprint,
        "this git writes other tar bytes than the reference git (2.47.3) for the canary tree: its archives get ETags and cache keys of their own (docs/urls.md#byte-stability)"
    );
    Ok(Some(fingerprint[..16].to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The git on this host (CI's) is the reference: its archives keep the
    /// ETags they always had. A host whose git fails this writes other
    /// bytes; `golden_hashes_pin_the_bytes_of_every_format` fails there too.
    #[tokio::test]
    async fn this_hosts_git_writes_the_reference_tar() {
        let parent = tempfile::tempdir().unwrap();
        let git = generate::find_git().unwrap();
        let fingerprint = fingerprint(&git, parent.path()).await.unwrap();
        assert_eq!(fingerprint, REFERENCE, "{}", git.display());
        assert_eq!(tar_writer(&git, parent.path()).await.unwrap(), None);
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}
