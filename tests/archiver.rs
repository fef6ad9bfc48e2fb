//! End-to-end tests of `gitball-archiver`: the real binary as a child
//! process on 127.0.0.1, real `git` on repositories built here with fixed
//! dates, real sockets. See `harness/` for the machinery.
//!
//! Each test names one property and starts the archivers it talks to (they
//! stop when it ends), so the tests run in parallel threads independently.
//! What they share is read-only: the widget and hostile-input repositories,
//! built once per test process, and the 96 MiB repository, built once per
//! target dir (see `harness/fixtures.rs`).
//!
//! Build the binary first: `cargo build -p gitball-archiver` (or run
//! `cargo test --workspace`). Figures (RSS growth, fd counts, times) are
//! printed; run with `--nocapture` to see them.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use gitball_e2e::{
    Archiver, BodyEnd, Metrics, RawConnection, RepoBuilder, Sandbox, assert_same_stream, base64,
    cached_dir, child_processes, deleted_files_open, header, holds_connection_to, http_client,
    http_date, partial_files_open, pipe_through, process_alive, process_dir, process_nice,
    pseudo_random_bytes, pseudo_text, sha256_hex, tar_entry_names, thread_nice_values,
    tree_snapshot, wait_until, zip_entry_names,
};
use gitball_e2e::{
    DocumentedFamily, SeriesRepo, assert_same_zip_entries, assert_zip_readers_accept,
    documented_families,
};
use sha2::{Digest, Sha256};

/// 2024-01-02T03:04:05Z, the first commit of every fixture.
const T1: i64 = 1_704_164_645;
const T2: i64 = 1_706_000_000;
const T3: i64 = 1_707_000_000;
const T_TAG: i64 = 1_706_500_000;

const MIB: u64 = 1 << 20;
const FORMATS: [&str; 4] = ["tar", "tar.gz", "tar.zst", "zip"];

// ---------------------------------------------------------------------------
// Fixtures

/// `acme/widget`: three commits, a branch with a slash, a lightweight and an
/// annotated tag, a subdirectory, an executable, a symlink, binary data.
struct Widget {
    repo: RepoBuilder,
    c1: String,
    c2: String,
    c3: String,
}

fn widget(sandbox: &Sandbox) -> Widget {
    widget_in(&sandbox.repos(), &sandbox.home())
}

/// [`widget`] served by an archiver whose git writes nothing until a line
/// is written to the returned fifo (one line per generation).
fn widget_with_git_that_waits(sandbox: &Sandbox) -> (Widget, std::fs::File, Archiver) {
    let w = widget(sandbox);
    let (stub, fifo) = sandbox.git_that_pauses("git-that-waits", 0);
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);
    (w, fifo, archiver)
}

/// [`Widget`] as `{repos}/acme/widget`, with `home` as git's `HOME`.
fn widget_in(repos: &Path, home: &Path) -> Widget {
    let repo = RepoBuilder::init(&repos.join("acme/widget"), home);
    repo.write("README.md", "# widget\n");
    repo.write("src/main.rs", "fn main() {\n    println!(\"widget\");\n}\n");
    repo.write("sub/dir/file.txt", "in sub/dir\n");
    repo.write("sub/dir/nested/deep.txt", "deeper\n");
    repo.write("sub/other.txt", "beside sub/dir\n");
    repo.write("data.bin", pseudo_random_bytes(1, 20_000));
    repo.write_executable("bin/tool.sh", "#!/bin/sh\necho tool\n");
    repo.symlink("link-to-readme", "README.md");
    let c1 = repo.commit_all(T1, "initial");
    repo.tag("v1.2.3", &c1);
    repo.write("README.md", "# widget\n\nSecond version.\n");
    repo.write("sub/dir/file.txt", "in sub/dir, changed\n");
    let c2 = repo.commit_all(T2, "second");
    repo.tag_annotated("v2.0.0", &c2, T_TAG, "release 2.0.0");
    repo.git(&["checkout", "-q", "-b", "feature/x"]);
    repo.write("feature.txt", "feature x\n");
    let c3 = repo.commit_all(T3, "feature x");
    repo.git(&["checkout", "-q", "main"]);
    Widget { repo, c1, c2, c3 }
}

/// The directory for this test process's shared fixtures (see
/// `harness/fixtures.rs`): under the target dir, removed by a later run.
fn shared_fixture_dir(name: &str) -> PathBuf {
    process_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), name)
}

/// `{repos}/acme/widget`, built once per test process for the tests that
/// only read it; each of them starts an archiver of its own over `repos`.
struct SharedWidget {
    repos: PathBuf,
    w: Widget,
}

fn shared_widget() -> &'static SharedWidget {
    static WIDGET: OnceLock<SharedWidget> = OnceLock::new();
    WIDGET.get_or_init(|| {
        let dir = shared_fixture_dir("archiver-widget");
        let repos = dir.join("repos");
        let w = widget_in(&repos, &dir.join("home"));
        SharedWidget { repos, w }
    })
}

/// A fresh archiver (its own process and cache) over the shared widget.
fn widget_archiver(extra_args: &[&str]) -> (&'static Widget, Archiver) {
    let shared = shared_widget();
    (&shared.w, Archiver::start(&shared.repos, extra_args))
}

/// `acme/big.git`: 24 files of 4 MiB of deterministic incompressible bytes
/// (96 MiB), one commit on `main`. Built once per target dir (it is the same
/// every time) with plumbing and uncompressed loose objects, so it costs
/// about a second; every test that needs a large or slow archive shares it.
struct BigRepo {
    repos: PathBuf,
    repo: RepoBuilder,
    commit: String,
}

const BIG_FILES: u64 = 24;
const BIG_FILE_BYTES: usize = 4 << 20;
/// The big repository's `main` as a path prefix inside its archives.
const BIG_PREFIX: &str = "big-main/";

fn big_repo() -> &'static BigRepo {
    static BIG: OnceLock<BigRepo> = OnceLock::new();
    BIG.get_or_init(|| {
        let root = cached_dir(
            Path::new(env!("CARGO_TARGET_TMPDIR")),
            "gitball-e2e-big-v1",
            build_big_repo,
        );
        let repos = root.join("repos");
        let repo = RepoBuilder::open(&repos.join("acme/big.git"), &root.join("home"));
        let commit = repo.rev_parse("main");
        BigRepo {
            repos,
            repo,
            commit,
        }
    })
}

fn build_big_repo(dir: &Path) {
    let repo = RepoBuilder::init_bare(&dir.join("repos/acme/big.git"), &dir.join("home"));
    let mut listing = String::new();
    for i in 0..BIG_FILES {
        let data = pseudo_random_bytes(1000 + i, BIG_FILE_BYTES);
        let blob = repo.git_with_input(
            None,
            &[
                "-c",
                "core.looseCompression=0",
                "hash-object",
                "-w",
                "--stdin",
            ],
            &data,
        );
        listing.push_str(&format!("100644 blob {blob}\tpart-{i:02}.bin\n"));
    }
    let tree = repo.git_with_input(None, &["mktree"], listing.as_bytes());
    let commit = repo.git_at(
        T1,
        &["commit-tree", &tree, "-m", "large incompressible content"],
    );
    repo.git(&["update-ref", "refs/heads/main", &commit]);
}

impl BigRepo {
    /// `git archive --format=tar --prefix=big-main/ <main>`, streaming.
    fn git_tar(&self) -> std::process::Child {
        self.repo.archive_stream("tar", BIG_PREFIX, &self.commit)
    }
}

// ---------------------------------------------------------------------------
// Helpers

fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    panic!(
        "{what}: {} bytes received, {} expected; first difference at offset {at}",
        actual.len(),
        expected.len()
    );
}

/// The tar inside a body of format `ext` (gzip and zstd via the system tools).
fn tar_of(ext: &str, body: &[u8]) -> Vec<u8> {
    match ext {
        "tar" => body.to_vec(),
        "tar.gz" | "tgz" => pipe_through("gzip", &["-dc"], body),
        "tar.zst" => pipe_through("zstd", &["-dcq"], body),
        other => panic!("{other} is not a tar format"),
    }
}

fn content_type(ext: &str) -> &'static str {
    match ext {
        "tar" => "application/x-tar",
        "tar.gz" | "tgz" => "application/gzip",
        "tar.zst" => "application/zstd",
        "zip" => "application/zip",
        other => panic!("unknown ext {other}"),
    }
}

/// The `gitball_archiver_tar_writer_info` series `archiver` sets to 1: the
/// fingerprint of the git it runs.
fn tar_writer(archiver: &Archiver) -> Vec<String> {
    archiver
        .metrics()
        .series_of("gitball_archiver_tar_writer_info")
        .into_iter()
        .filter(|(_, value)| *value == 1.0)
        .map(|(series, _)| series.to_owned())
        .collect()
}

fn metric_after(archiver: &Archiver, timeout: Duration, what: impl Fn(&Metrics) -> bool) -> bool {
    wait_until(timeout, || what(&archiver.metrics()))
}

fn active_downloads(archiver: &Archiver) -> f64 {
    archiver
        .metrics()
        .value("gitball_archiver_active_downloads", &[])
}

fn git_children(pid: u32) -> Vec<u32> {
    child_processes(pid)
        .into_iter()
        .filter(|child| child.command == "git")
        .map(|child| child.pid)
        .collect()
}

/// `GET path` on a raw connection; the head is read, the body is not.
fn open_download(archiver: &Archiver, path: &str) -> (RawConnection, gitball_e2e::ResponseHead) {
    let mut connection = RawConnection::connect(archiver.addr).expect("connect");
    connection
        .send_request("GET", path, &[])
        .expect("send the request");
    let head = connection.read_head().expect("read the response head");
    (connection, head)
}

// ---------------------------------------------------------------------------
// 1. Bytes

/// One archive to compare with `git archive`: the ref in the URL, the label
/// in the file name and top folder, the commit it names, and `?path=`.
struct ByteCase<'a> {
    reference: &'a str,
    label: &'a str,
    commit: &'a str,
    path: Option<&'a str>,
}

fn case<'a>(reference: &'a str, label: &'a str, commit: &'a str) -> ByteCase<'a> {
    ByteCase {
        reference,
        label,
        commit,
        path: None,
    }
}

/// Starts an archiver over the shared widget and asserts, for every case,
/// every format and both URL shapes: 200, the commit, content type and file
/// name headers, git's exact bytes (tar formats unpacked), and every entry
/// under the top folder (and, with `?path=`, only the subtree).
fn assert_archives_equal_git_archive(cases: &[ByteCase]) {
    let (w, archiver) = widget_archiver(&[]);
    let mut checked = 0;
    for &ByteCase {
        reference,
        label,
        commit,
        path,
    } in cases
    {
        let prefix = format!("widget-{label}/");
        let git_tar = w.repo.archive("tar", &prefix, commit, path);
        let git_zip = w.repo.archive("zip", &prefix, commit, path);
        let query = path.map(|p| format!("?path={p}")).unwrap_or_default();
        for ext in FORMATS {
            for url in [
                format!("/acme/widget/archive/{reference}.{ext}{query}"),
                format!("/acme/widget/{ext}/{reference}{query}"),
            ] {
                let response = archiver.get(&url);
                assert_eq!(response.status().as_u16(), 200, "GET {url}");
                assert_eq!(header(&response, "x-gitball-commit"), commit, "{url}");
                assert_eq!(
                    header(&response, "content-type"),
                    content_type(ext),
                    "{url}"
                );
                assert_eq!(
                    header(&response, "content-disposition"),
                    format!("attachment; filename=\"widget-{label}.{ext}\""),
                    "{url}"
                );
                let body = response.bytes().expect("read the body").to_vec();
                let names = if ext == "zip" {
                    assert_same_zip_entries(&body, &git_zip, &format!("GET {url} vs git archive"));
                    zip_entry_names(&body)
                } else {
                    let tar = tar_of(ext, &body);
                    assert_bytes_eq(
                        &tar,
                        &git_tar,
                        &format!("GET {url} (unpacked) vs git archive"),
                    );
                    tar_entry_names(&tar)
                };
                assert!(!names.is_empty(), "{url}: empty archive");
                for name in &names {
                    assert!(
                        name.starts_with(&prefix),
                        "{url}: entry {name:?} is not under the top folder {prefix}"
                    );
                }
                if path.is_some() {
                    assert!(
                        names.iter().all(|n| n == &prefix
                            || n.starts_with(&format!("{prefix}sub/"))
                            || n == &format!("{prefix}sub/")),
                        "{url}: entries outside sub/dir: {names:?}"
                    );
                    assert!(
                        names.iter().any(|n| n.ends_with("nested/deep.txt")),
                        "{url}"
                    );
                }
                checked += 1;
            }
        }
    }
    eprintln!("byte equality: {checked} archive URLs matched git archive");
}

#[test]
fn branch_archives_equal_git_archive_in_every_format() {
    let w = &shared_widget().w;
    assert_archives_equal_git_archive(&[
        case("main", "main", &w.c2),
        case("feature/x", "feature-x", &w.c3),
        case("refs/heads/feature/x", "feature-x", &w.c3),
    ]);
}

#[test]
fn tag_archives_equal_git_archive_in_every_format() {
    let w = &shared_widget().w;
    assert_archives_equal_git_archive(&[
        case("v1.2.3", "1.2.3", &w.c1),
        case("v2.0.0", "2.0.0", &w.c2),
        case("refs/tags/v1.2.3", "1.2.3", &w.c1),
    ]);
}

#[test]
fn commit_archives_equal_git_archive_in_every_format() {
    let w = &shared_widget().w;
    assert_archives_equal_git_archive(&[
        case("HEAD", &w.c2, &w.c2),
        case(&w.c3, &w.c3, &w.c3),
        // An abbreviated id is labelled with the full one.
        case(&w.c1[..10], &w.c1, &w.c1),
    ]);
}

#[test]
fn subtree_archives_hold_only_the_path_in_every_format() {
    let w = &shared_widget().w;
    assert_archives_equal_git_archive(&[ByteCase {
        path: Some("sub/dir"),
        ..case("main", "main", &w.c2)
    }]);
}

/// A subtree archive's `Link: rel="immutable"` keeps its `?path=`, and the
/// link's archive is that subtree at the commit: the link had named the
/// whole tree's archive, other contents than the ones asked for, which a
/// client pinning the link (Nix's lockable tarballs) would have fetched
/// from then on (attack).
#[test]
fn a_subtree_archives_immutable_link_is_of_the_same_subtree() {
    let (w, archiver) = widget_archiver(&[]);
    let response = archiver.get("/acme/widget/archive/main.tar?path=sub/dir");
    assert_eq!(response.status().as_u16(), 200);
    let link = format!("/acme/widget/archive/{}.tar?path=sub/dir", w.c2);
    assert_eq!(
        header(&response, "link"),
        format!("<{link}>; rel=\"immutable\"")
    );
    let pinned = archiver.get(&link);
    assert_eq!(pinned.status().as_u16(), 200, "GET {link}");
    let prefix = format!("widget-{}/", w.c2);
    assert_bytes_eq(
        &pinned.bytes().expect("read the body"),
        &w.repo.archive("tar", &prefix, &w.c2, Some("sub/dir")),
        "the linked archive vs git archive of the subtree",
    );
}

/// `tgz` is an alias whose file name uses the canonical extension.
#[test]
fn tgz_alias_is_named_tar_gz() {
    let (w, archiver) = widget_archiver(&[]);
    let response = archiver.get("/acme/widget/archive/main.tgz");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        header(&response, "content-disposition"),
        "attachment; filename=\"widget-main.tar.gz\""
    );
    let tar = tar_of("tgz", &response.bytes().unwrap());
    assert_bytes_eq(
        &tar,
        &w.repo.archive("tar", "widget-main/", &w.c2, None),
        "tgz",
    );
}

// ---------------------------------------------------------------------------
// 2. Golden hashes

/// Recorded with git 2.47.3. `tar` is git's own bytes (a git release that
/// changes its tar writer moves it); `tar.gz`, `tar.zst` and `zip` also pin
/// the archiver's writers and compressors (flate2/zlib-rs and zstd, pinned
/// exactly in the workspace) and their levels (6, 3 and 6).
/// `zip` and `tar.zst` moved with byte series `v3`: the zip is written by
/// the archiver from git's tar (entries deflated on all cores), tar.zst by
/// zstd's multi-threaded mode. The zip's series `v5` (every entry and
/// block on a fresh deflate state) left its bytes here as they were: these
/// entries are small, and a reused state changed none of them; so did
/// `v6` (symlink targets holding a NUL stored whole): there are none here.
/// Each format's ETag variant (the ETag is `"{commit}-{variant}"`) and the
/// SHA-256 of its bytes for the golden commit. The two move together: bytes
/// that change under an unchanged variant would reach caches and resumes
/// that already hold the old bytes under that ETag (docs/urls.md, "Byte
/// stability": bump the format's byte series, which is in the variant).
const GOLDEN: [(&str, &str, &str); 4] = [
    (
        "tar",
        "tar-2db3aa9239c0b923",
        "3c2ea3c04269e6e885202a6eb7eb73ab0d0d4331ca9d344b60dfc09f3269bf06",
    ),
    (
        "tar.gz",
        "tar.gz-531c3f698bdeda2a",
        "05298edb8e60459cdf6fe7b4c33bf0c37595c5a3bda955309bf344c8a90226e3",
    ),
    (
        "tar.zst",
        "tar.zst-801cfb4094dc3adb",
        "1a2528c1900c20e53d26b892dfe7f491fea81f20b30de061bd6978482d3a427c",
    ),
    (
        "zip",
        "zip-6221cee7bf3c03b7",
        "fd2a299d1c04b39e5373162e6ae4f2a3c290065f766999b1f8bf0418ecbbfa37",
    ),
];

fn golden_repo(sandbox: &Sandbox) -> RepoBuilder {
    let source = sandbox.source_repo("src/golden");
    source.write(
        "README.md",
        "# golden\n\nA repository whose archive bytes are pinned by the tests.\n",
    );
    source.write("src/lib.rs", "pub fn answer() -> u32 {\n    42\n}\n");
    // More than one 128 KiB input chunk, compressible: the compressors'
    // block boundaries are part of what is pinned.
    source.write("docs/words.txt", pseudo_text(42, 300_000));
    source.write("data/noise.bin", pseudo_random_bytes(43, 200_000));
    source.write_executable("bin/run.sh", "#!/bin/sh\nexec true\n");
    source.symlink("docs/readme-link", "../README.md");
    let commit = source.commit_all(T1, "golden");
    source.tag_annotated("v1.0.0", &commit, T1, "golden 1.0.0");
    source.clone_bare(&sandbox.repos().join("acme/golden.git"))
}

/// tar.zst's byte series v4 (4 MiB zstd jobs, docs/urls.md "Byte
/// stability") is part of its cache key: a file an archiver of series v3
/// left in the cache directory is not served after a restart, even where
/// (an archive smaller than one job) its bytes would be the same.
#[test]
fn a_restart_does_not_serve_a_tar_zst_of_the_older_byte_series() {
    let sandbox = Sandbox::new();
    let plain = SeriesRepo::new(&sandbox);
    let path = "/acme/plain/archive/main.tar.zst";

    let (current, current_path) = plain.generate(&sandbox, path, "v4", "tar.zst", "Zstd(3)");

    // What an archiver of series v3 left behind, under v3's key.
    let old_path = plain.cached_file("v3", "tar.zst", "Zstd(3)", &current);
    std::fs::rename(&current_path, old_path).expect("rename to v3's key");
    plain.assert_restart_generates(&sandbox, path, &current);
}

/// `--gzip-level` and `--zstd-level` change the bytes, so they are part of
/// the variant (docs/archiver.md, "Flags"): an archiver restarted over the
/// same cache with another level generates anew, under another ETag, the
/// same tar; what the cache holds of the other level is never served as
/// this one's, and is served again under the level it was made at.
#[test]
fn the_compression_level_is_part_of_the_etag_and_the_cache_key() {
    let sandbox = Sandbox::new();
    golden_repo(&sandbox);
    let cache = sandbox.path("level-cache");
    for (ext, flag) in [("tar.gz", "--gzip-level"), ("tar.zst", "--zstd-level")] {
        let path = format!("/acme/golden/archive/v1.0.0.{ext}");
        let fetch = |args: &[&str]| {
            let archiver = Archiver::start_with_cache(&sandbox.repos(), &cache, args);
            let response = archiver.get(&path);
            assert_eq!(response.status().as_u16(), 200, "{path} {args:?}");
            let etag = header(&response, "etag").to_owned();
            let cache_state = header(&response, "x-gitball-cache").to_owned();
            (etag, cache_state, response.bytes().unwrap().to_vec())
        };
        let (etag, state, body) = fetch(&[]);
        assert_eq!(state, "miss", "{ext}");
        let (other_etag, other_state, other_body) = fetch(&[flag, "1"]);
        assert_eq!(
            other_state, "miss",
            "{ext}: the default level's file was served at level 1"
        );
        assert_ne!(other_etag, etag, "{ext}");
        assert!(other_body != body, "{ext}: level 1 wrote the same bytes");
        assert_bytes_eq(
            &tar_of(ext, &other_body),
            &tar_of(ext, &body),
            &format!("{ext}: the tar at level 1"),
        );
        let (again_etag, again_state, again_body) = fetch(&[]);
        assert_eq!((again_etag, again_state), (etag, "hit".to_owned()), "{ext}");
        assert!(again_body == body, "{ext}: the default level's bytes");
    }
}

/// A git whose tar writer writes other bytes than the reference git's
/// (`archiver/src/canary.rs`, `docs/urls.md#byte-stability`): its archives
/// get ETags of their own, so no cache and no resume across replicas mixes
/// its bytes with the reference git's under one ETag, whether it is there
/// at the start or replaces the reference git under a running archiver (a
/// package upgrade renames a new binary over the old). The other git here
/// is a stub that ends every tar with one more zero block.
#[test]
fn a_git_writing_other_tar_bytes_gets_etags_of_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    let repos = &shared_widget().repos;
    let git = gitball_e2e::git::real_git();
    // `--git` of the upgraded archiver: the reference git, then the other.
    let upgraded_git = sandbox.path("git");
    let install = |path: &Path, after_archive: &str| {
        let new = sandbox.path("git.new");
        std::fs::write(
            &new,
            format!(
                "#!/bin/sh\n\
                 case \" $* \" in\n\
                 *' archive '*) '{git}' \"$@\" || exit $?; {after_archive} ;;\n\
                 esac\n\
                 exec '{git}' \"$@\"\n",
                git = git.display()
            ),
        )
        .expect("write the stub");
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&new, path).expect("rename the stub into place");
    };
    let other_git = sandbox.path("git-with-another-tar-writer");
    install(&other_git, "exec /usr/bin/head -c 512 /dev/zero");
    install(&upgraded_git, "exit 0");
    let reference = Archiver::start(repos, &[]);
    let other = Archiver::start(repos, &["--git", other_git.to_str().unwrap()]);
    let upgraded = Archiver::start(repos, &["--git", upgraded_git.to_str().unwrap()]);
    let reference_writer =
        vec!["gitball_archiver_tar_writer_info{fingerprint=\"reference/reference\"}".to_owned()];
    assert_eq!(tar_writer(&reference), reference_writer);
    assert_eq!(tar_writer(&upgraded), reference_writer);
    assert_eq!(tar_writer(&other).len(), 1);
    assert_ne!(tar_writer(&other), reference_writer);
    assert!(
        !reference.log().contains("other bytes"),
        "{}",
        reference.log()
    );
    assert!(
        other
            .log()
            .contains("writes other bytes than the reference git"),
        "no warning:\n{}",
        other.log()
    );

    let tar = "/acme/widget/archive/main.tar";
    let etag = |archiver: &Archiver, path: &str| {
        let response = archiver.get(path);
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let etag = header(&response, "etag").to_owned();
        (etag, response.bytes().unwrap().len())
    };
    let (reference_tar, reference_len) = etag(&reference, tar);
    assert_eq!(etag(&upgraded, tar), (reference_tar.clone(), reference_len));
    for path in [
        tar,
        "/acme/widget/archive/main.tar.gz",
        "/acme/widget/archive/main.zip",
    ] {
        let (ours, theirs) = (etag(&reference, path), etag(&other, path));
        assert_ne!(ours.0, theirs.0, "{path}: one ETag for two gits' bytes");
        if path == tar {
            assert_eq!(theirs.1, ours.1 + 512, "{path}");
        }
    }

    // The reference git replaced under a running archiver: the next
    // generation sees it, and archives made by it get the other ETags.
    install(&upgraded_git, "exec /usr/bin/head -c 512 /dev/zero");
    let gz = "/acme/widget/archive/main.tar.gz";
    assert_eq!(
        etag(&upgraded, gz),
        etag(&other, gz),
        "a cold tar.gz after the upgrade"
    );
    assert!(
        upgraded
            .log()
            .contains("git was replaced by one that writes other canary bytes"),
        "{}",
        upgraded.log()
    );
    assert_eq!(tar_writer(&upgraded), tar_writer(&other));
    // The tar cached before is under the reference's key: not served as
    // the new git's.
    assert_eq!(
        etag(&upgraded, tar),
        etag(&other, tar),
        "the tar after the upgrade"
    );
}

/// A git whose iconv re-encodes `working-tree-encoding` with other tables
/// than the reference host's writes other bytes for a tree that asks for
/// it, and its archives get ETags of their own (the canary's `encoding/`
/// files, `archiver/src/canary.rs`; docs/urls.md, byte stability): no cache
/// and no resume across replicas mixes the two. The other git is the real
/// git with a `GCONV_PATH` whose `gconv-modules` aliases `EUC-JP` to
/// glibc's eucJP-ms tables: a host whose libc or gconv configuration maps
/// EUC-JP otherwise (FULLWIDTH TILDE is `8f a2 b7` here, `a1 c1` there).
/// The archiver gives git none of its own environment, so the stub sets
/// it. (Security review: the canary had no such file, so both archivers
/// served their different bytes under one ETag.)
#[test]
fn a_git_whose_iconv_writes_other_bytes_gets_etags_of_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "kanji");
    // Stored as UTF-8 (added before the attribute), archived as EUC-JP.
    repo.write("notes.txt", "\u{301c} \u{ff5e}\n");
    repo.git(&["add", "notes.txt"]);
    repo.write(".gitattributes", "notes.txt working-tree-encoding=EUC-JP\n");
    repo.git(&["add", ".gitattributes"]);
    repo.git_at(T1, &["commit", "-q", "-m", "EUC-JP"]);
    let gconv = sandbox.path("gconv");
    std::fs::create_dir(&gconv).expect("mkdir gconv");
    std::fs::write(
        gconv.join("gconv-modules"),
        "alias\tEUC-JP//\tEUC-JP-MS//\n",
    )
    .expect("write gconv-modules");
    let other_git = sandbox.path("git-with-other-iconv-tables");
    std::fs::write(
        &other_git,
        format!(
            "#!/bin/sh\nGCONV_PATH='{gconv}' exec '{git}' \"$@\"\n",
            gconv = gconv.display(),
            git = gitball_e2e::git::real_git().display()
        ),
    )
    .expect("write the stub");
    std::fs::set_permissions(&other_git, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let reference = Archiver::start(&sandbox.repos(), &[]);
    let other = Archiver::start(&sandbox.repos(), &["--git", other_git.to_str().unwrap()]);
    let fetch = |archiver: &Archiver| {
        let response = archiver.get("/acme/kanji/archive/main.tar");
        assert_eq!(response.status().as_u16(), 200);
        let etag = header(&response, "etag").to_owned();
        (etag, response.bytes().unwrap().to_vec())
    };
    let (reference_etag, reference_tar) = fetch(&reference);
    let (other_etag, other_tar) = fetch(&other);
    let holds = |tar: &[u8], bytes: &[u8]| tar.windows(bytes.len()).any(|window| window == bytes);
    // What the stub stands for: other bytes for the same commit.
    assert!(
        holds(&reference_tar, b"\xa1\xc1 \x8f\xa2\xb7\n"),
        "glibc's EUC-JP"
    );
    assert!(holds(&other_tar, b"\xa1\xc1 \xa1\xc1\n"), "eucJP-ms");
    assert_ne!(other_etag, reference_etag, "one ETag for two gits' bytes");
    assert_eq!(
        tar_writer(&reference),
        ["gitball_archiver_tar_writer_info{fingerprint=\"reference/reference\"}"]
    );
    assert_ne!(tar_writer(&other), tar_writer(&reference));
}

#[test]
fn golden_hashes_pin_the_bytes_of_every_format() {
    let sandbox = Sandbox::new();
    let repo = golden_repo(&sandbox);
    let commit = repo.rev_parse("v1.0.0^{commit}");
    let first = Archiver::start(&sandbox.repos(), &[]);
    let second = Archiver::start(&sandbox.repos(), &[]);
    let git_version = repo.git(&["--version"]);

    let mut mismatches = Vec::new();
    for (ext, golden_variant, golden) in GOLDEN {
        let path = format!("/acme/golden/archive/v1.0.0.{ext}");
        let response = first.get(&path);
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(header(&response, "x-gitball-cache"), "miss", "{path}");
        let etag = header(&response, "etag");
        let variant = etag
            .trim_matches('"')
            .strip_prefix(&format!("{commit}-"))
            .unwrap_or_else(|| panic!("{path}: ETag {etag} is not of {commit}"))
            .to_owned();
        let body = response.bytes().unwrap().to_vec();
        let digest = Sha256::digest(&body);
        let hex = hex::encode(digest);

        // Cold again on another archiver with another cache: same bytes.
        let again = second.get(&path);
        assert_eq!(
            header(&again, "x-gitball-cache"),
            "miss",
            "{path} on the second archiver"
        );
        assert_bytes_eq(
            &again.bytes().unwrap(),
            &body,
            &format!("{path}: two cold generations"),
        );

        // .sha256 and Repr-Digest say the same.
        let filename = format!("golden-1.0.0.{ext}");
        let checksum = first.get(&format!("{path}.sha256"));
        assert_eq!(checksum.status().as_u16(), 200, "{path}.sha256");
        assert_eq!(
            checksum.text().unwrap(),
            format!("{hex}  {filename}\n"),
            "{path}.sha256"
        );
        let hit = first.get(&path);
        assert_eq!(header(&hit, "x-gitball-cache"), "hit");
        assert_eq!(
            header(&hit, "repr-digest"),
            format!("sha-256=:{}:", base64(&digest)),
            "{path}: Repr-Digest"
        );

        // Git's own output for the same commit, to tell a git change from a
        // compressor change when a golden hash moves.
        let git_format = if ext == "zip" { "zip" } else { "tar" };
        let git_bytes = repo.archive(git_format, "golden-1.0.0/", &commit, None);
        if ext == "zip" {
            assert_same_zip_entries(&body, &git_bytes, "zip vs git archive");
            assert_zip_readers_accept(&body, zip_entry_names(&body).len(), "golden zip");
        } else {
            assert_bytes_eq(
                &tar_of(ext, &body),
                &git_bytes,
                &format!("{ext} vs git archive"),
            );
        }
        eprintln!("golden {ext:7} {variant} {hex} ({} bytes)", body.len());
        if (variant.as_str(), hex.as_str()) != (golden_variant, golden) {
            mismatches.push(format!(
                "{ext}: got {variant} {hex}, pinned {golden_variant} {golden} \
                 (git's own {git_format}: {})",
                sha256_hex(&git_bytes)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "archive bytes or ETags changed ({git_version}); a pin moved (new bytes \
         need a new byte series in the variant, and both pins move together):\n{}",
        mismatches.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 3. Headers
//
// Each test starts an archiver of its own over the shared widget and asks
// for `TAG_GZ` (cold unless the test completes it first).

/// The archive the header tests ask for: the lightweight tag on `c1`.
const TAG_GZ: &str = "/acme/widget/archive/v1.2.3.tar.gz";

/// Sum of `gitball_archiver_generations_total` over every label.
fn generations(archiver: &Archiver) -> f64 {
    archiver
        .metrics()
        .sum("gitball_archiver_generations_total", &[])
}

/// Asserts `etag` is strong and has the form `"{commit}-{variant}"`.
fn assert_strong_etag(etag: &str, commit: &str) {
    assert!(
        etag.starts_with(&format!("\"{commit}-")) && etag.ends_with('"'),
        "ETag {etag:?} is not strong \"{{commit}}-{{variant}}\""
    );
}

/// The ETag a HEAD request gets for `path` (HEAD never generates).
fn head_etag(archiver: &Archiver, path: &str) -> String {
    let head = archiver.client().head(archiver.url(path)).send().unwrap();
    assert_eq!(head.status().as_u16(), 200, "HEAD {path}");
    header(&head, "etag").to_owned()
}

/// The first GET of `path` on `archiver`: a miss that completes the archive
/// (sent with `X-Request-Id: e2e-req-42`). Returns the body and ETag.
fn complete_archive(archiver: &Archiver, path: &str) -> (Vec<u8>, String) {
    let first = archiver
        .client()
        .get(archiver.url(path))
        .header("X-Request-Id", "e2e-req-42")
        .send()
        .unwrap();
    assert_eq!(first.status().as_u16(), 200, "GET {path}");
    assert_eq!(
        header(&first, "x-gitball-cache"),
        "miss",
        "first GET {path}"
    );
    let etag = header(&first, "etag").to_owned();
    (first.bytes().unwrap().to_vec(), etag)
}

#[test]
fn head_on_a_cold_archive_answers_without_generating() {
    let (w, archiver) = widget_archiver(&[]);
    let head = archiver.client().head(archiver.url(TAG_GZ)).send().unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(header(&head, "x-gitball-cache"), "miss");
    assert_strong_etag(header(&head, "etag"), &w.c1);
    // No length, as GET's (review: attack; it said Content-Length: 0).
    assert!(
        head.headers().get("content-length").is_none(),
        "{:?}",
        head.headers()
    );
    // `generations_total` counts a generation once it ended: one the HEAD
    // started would still be running, or cached, and the next HEAD would
    // say so (mutation review: the count alone let a generating HEAD pass).
    assert_eq!(
        archiver
            .metrics()
            .value("gitball_archiver_generations_in_flight", &[]),
        0.0,
        "HEAD started a generation"
    );
    let again = archiver.client().head(archiver.url(TAG_GZ)).send().unwrap();
    assert_eq!(header(&again, "x-gitball-cache"), "miss");
    assert_eq!(generations(&archiver), 0.0, "HEAD started a generation");
}

/// If-None-Match is answered before anything is generated.
#[test]
fn etag_match_answers_304_before_generating() {
    let (_, archiver) = widget_archiver(&[]);
    let etag = head_etag(&archiver, TAG_GZ);
    let not_modified = archiver
        .client()
        .get(archiver.url(TAG_GZ))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(not_modified.status().as_u16(), 304);
    assert_eq!(header(&not_modified, "etag"), etag);
    // docs/http.md (Conditional requests): a 304 carries the validators
    // and the headers a cache refreshes its copy with, as the 200 does.
    // (Docs audit: only its ETag and Cache-Control were read.)
    let head = archiver.client().head(archiver.url(TAG_GZ)).send().unwrap();
    for name in [
        "etag",
        "last-modified",
        "x-gitball-commit",
        "content-disposition",
        "link",
        "cache-control",
    ] {
        assert!(!header(&head, name).is_empty(), "{name}");
        assert_eq!(
            header(&not_modified, name),
            header(&head, name),
            "304 {name}"
        );
    }
    // A 304's Content-Length must be the 200's (RFC 9110, 8.6): none here,
    // to a GET as to a HEAD (review: attack; a HEAD's said 0).
    for request in [
        archiver.client().get(archiver.url(TAG_GZ)),
        archiver.client().head(archiver.url(TAG_GZ)),
    ] {
        let answer = request.header("If-None-Match", &etag).send().unwrap();
        assert_eq!(answer.status().as_u16(), 304);
        assert!(
            answer.headers().get("content-length").is_none(),
            "{:?}",
            answer.headers()
        );
    }
    assert!(not_modified.bytes().unwrap().is_empty());
    assert_eq!(
        generations(&archiver),
        0.0,
        "HEAD or a 304 started a generation"
    );
    // A checksum has no validators: the archive's do not make it a 304
    // (review: attack; it was one, with the archive's file name).
    let checksum = archiver
        .client()
        .get(archiver.url(&format!("{TAG_GZ}.sha256")))
        .header("If-None-Match", "*")
        .send()
        .unwrap();
    assert_eq!(checksum.status().as_u16(), 200);
    assert!(checksum.text().unwrap().ends_with(".tar.gz\n"));
}

/// `docs/http.md#checksum-responses`: a checksum's headers are
/// `Content-Type: text/plain; charset=utf-8`, `Content-Length`,
/// `X-Gitball-Commit`, `X-Gitball-Cache` and `X-Request-Id`, and it has no
/// validators of its own (no `ETag`, no `Last-Modified`). (Mutation
/// review: another `Content-Type` passed every test; fails this one.)
#[test]
fn a_checksum_answers_with_its_documented_headers() {
    let (w, archiver) = widget_archiver(&[]);
    let path = format!("{TAG_GZ}.sha256");
    let (head, body, end) = RawConnection::request(
        archiver.addr,
        "GET",
        &path,
        &[("X-Request-Id", "a-checksum")],
    )
    .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(end, BodyEnd::Complete);
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        head.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(head.header("x-gitball-commit"), Some(w.c1.as_str()));
    assert_eq!(head.header("x-gitball-cache"), Some("miss"));
    assert_eq!(head.header("x-request-id"), Some("a-checksum"));
    assert_eq!(head.header("etag"), None);
    assert_eq!(head.header("last-modified"), None);
    let line = String::from_utf8(body).expect("UTF-8");
    assert!(line.ends_with("  widget-1.2.3.tar.gz\n"), "{line:?}");
}

/// `HEAD` of a `.sha256` waits for the archive like its `GET`
/// (`docs/http.md#checksum-responses`): a cold one starts the generation
/// and answers the `GET`'s headers, the line's length included, without
/// the line.
#[test]
fn head_of_a_cold_checksum_generates_and_answers_the_gets_headers() {
    let (_, archiver) = widget_archiver(&[]);
    let path = format!("{TAG_GZ}.sha256");
    let head = archiver.client().head(archiver.url(&path)).send().unwrap();
    assert_eq!(head.status().as_u16(), 200);
    assert_eq!(header(&head, "x-gitball-cache"), "miss");
    assert!(
        metric_after(&archiver, Duration::from_secs(5), |m| {
            m.sum("gitball_archiver_generations_total", &[("outcome", "ok")]) == 1.0
        }),
        "the HEAD generated the archive"
    );
    let length = header(&head, "content-length").to_owned();
    let content_type = header(&head, "content-type").to_owned();
    assert!(head.bytes().unwrap().is_empty());
    let get = archiver.get(&path);
    assert_eq!(header(&get, "x-gitball-cache"), "hit");
    assert_eq!(header(&get, "content-type"), content_type);
    assert_eq!(header(&get, "content-length"), length);
    let line = get.text().unwrap();
    assert_eq!(line.len().to_string(), length);
    let body = archiver.get(TAG_GZ).bytes().unwrap();
    assert!(line.starts_with(&sha256_hex(&body)), "{line}");
}

#[test]
fn first_get_is_a_miss_with_validators_and_the_given_request_id() {
    let (w, archiver) = widget_archiver(&[]);
    let etag = head_etag(&archiver, TAG_GZ);
    let first = archiver
        .client()
        .get(archiver.url(TAG_GZ))
        .header("X-Request-Id", "e2e-req-42")
        .send()
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(header(&first, "x-gitball-cache"), "miss");
    assert_eq!(header(&first, "x-request-id"), "e2e-req-42");
    assert_eq!(
        header(&first, "etag"),
        etag,
        "ETag changed between HEAD and GET"
    );
    assert_eq!(header(&first, "last-modified"), http_date(T1));
    assert_eq!(header(&first, "x-gitball-commit"), w.c1);
    assert_eq!(
        header(&first, "link"),
        format!("</acme/widget/archive/{}.tar.gz>; rel=\"immutable\"", w.c1)
    );
    assert_eq!(header(&first, "content-type"), "application/gzip");
}

#[test]
fn hit_has_length_ranges_digest_and_a_generated_request_id() {
    let (_, archiver) = widget_archiver(&[]);
    let (body, etag) = complete_archive(&archiver, TAG_GZ);
    let hit = archiver.get(TAG_GZ);
    assert_eq!(hit.status().as_u16(), 200);
    assert_eq!(header(&hit, "x-gitball-cache"), "hit");
    assert_eq!(header(&hit, "etag"), etag, "ETag not stable");
    assert_eq!(header(&hit, "content-length"), body.len().to_string());
    assert_eq!(header(&hit, "accept-ranges"), "bytes");
    assert_eq!(
        header(&hit, "repr-digest"),
        format!("sha-256=:{}:", base64(&Sha256::digest(&body)))
    );
    let generated_id = header(&hit, "x-request-id").to_owned();
    assert!(
        generated_id.len() >= 16 && generated_id != "e2e-req-42",
        "no generated X-Request-Id: {generated_id:?}"
    );
    assert_bytes_eq(&hit.bytes().unwrap(), &body, "hit vs miss body");
}

#[test]
fn other_formats_and_refs_get_other_validators() {
    let (w, archiver) = widget_archiver(&[]);
    let etag = head_etag(&archiver, TAG_GZ);
    let zip = archiver
        .client()
        .head(archiver.url("/acme/widget/archive/main.zip"))
        .send()
        .unwrap();
    assert_ne!(header(&zip, "etag"), etag);
    assert!(header(&zip, "etag").starts_with(&format!("\"{}-", w.c2)));
    assert_eq!(header(&zip, "last-modified"), http_date(T2));
    assert_eq!(
        header(&zip, "link"),
        format!("</acme/widget/archive/{}.zip>; rel=\"immutable\"", w.c2)
    );
}

/// Seconds since the epoch, now.
fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A commit of one file in `acme/far`, its committer dated `date` (any
/// time, past year 9999 included: written as is, not checked), at the
/// branch `branch`; its id.
fn commit_in_far_dated(sandbox: &Sandbox, date: u64, branch: &str) -> String {
    let git_dir = sandbox.repos().join("acme/far.git");
    let repo = if git_dir.exists() {
        RepoBuilder::open(&git_dir, &sandbox.home())
    } else {
        RepoBuilder::init_bare(&git_dir, &sandbox.home())
    };
    let blob = repo.git_with_input(None, &["hash-object", "-w", "--stdin"], b"x\n");
    let tree = repo.git_with_input(
        None,
        &["mktree"],
        format!("100644 blob {blob}\tf\n").as_bytes(),
    );
    let commit = repo.git_with_input(
        None,
        &[
            "hash-object",
            "-t",
            "commit",
            "-w",
            "--literally",
            "--stdin",
        ],
        format!(
            "tree {tree}\nauthor T <t@e> 1700000000 +0000\n\
             committer T <t@e> {date} +0000\n\nfar\n"
        )
        .as_bytes(),
    );
    repo.git(&["update-ref", &format!("refs/heads/{branch}"), &commit]);
    commit
}

/// A commit carries whatever time its committer's clock gave it: ahead of
/// the server's (a clock set wrong, a server's clock stepped back), far in
/// the future, or past what an HTTP date can say (year 9999, whose header
/// had panicked the handler and cut every request for that commit: attack,
/// bytes). `Last-Modified` is the commit time, but never later than the
/// response's `Date` (RFC 9110, 8.8.2.1: an origin server must not send
/// one later); it was sent as the commit's, days or centuries ahead.
#[test]
fn a_commit_dated_in_the_future_is_last_modified_no_later_than_the_response() {
    let sandbox = Sandbox::new();
    // A day ahead, year 2191, and a second past year 9999.
    let dates = [now_seconds() + 86_400, 7_000_000_000, 253_402_300_800];
    for (n, date) in dates.iter().enumerate() {
        commit_in_far_dated(&sandbox, *date, &format!("b{n}"));
    }
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let parse = |response: &reqwest::blocking::Response, name: &str| {
        httpdate::parse_http_date(header(response, name))
            .unwrap_or_else(|error| panic!("{name}: {error}"))
    };
    for (n, date) in dates.iter().enumerate() {
        for ext in ["tar", "tar.gz", "zip"] {
            let path = format!("/acme/far/archive/b{n}.{ext}");
            let mut etag = None;
            for method in [
                reqwest::Method::HEAD,
                reqwest::Method::GET,
                reqwest::Method::GET,
            ] {
                let mut request = archiver
                    .client()
                    .request(method.clone(), archiver.url(&path));
                if let Some(etag) = etag.take() {
                    request = request.header("if-none-match", etag);
                }
                let response = request.send().unwrap();
                let status = response.status().as_u16();
                assert!([200, 304].contains(&status), "{method} {path}: {status}");
                assert!(
                    parse(&response, "last-modified") <= parse(&response, "date"),
                    "{method} {path} ({status}, commit dated {date}): Last-Modified {} is later than Date {}",
                    header(&response, "last-modified"),
                    header(&response, "date"),
                );
                etag = Some(header(&response, "etag").to_owned());
                response.bytes().expect("the whole body");
            }
        }
    }
}

/// libfaketime's preload library (Debian's `faketime` package), which
/// fakes the wall clock of a process from a file it reads again at every
/// call. `None` where it is not installed; CI installs it (`.ci/run`).
fn libfaketime() -> Option<PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| Path::new(dir).join("faketime/libfaketime.so.1"))
    .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is not installed (apt-get install faketime)"
        );
        eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
    }
    found
}

/// docs/http.md, "Archive headers": `Date` is the wall clock of the
/// response, also after the clock was stepped back (NTP correcting a
/// clock that ran ahead). hyper's cached `Date` stayed at the later time
/// until the clock caught up: a day ahead here, for a day. The archiver's
/// wall clock is faked (libfaketime, monotonic time left alone, as a step
/// leaves it) and stepped a day ahead, then back.
#[test]
fn the_date_header_follows_the_wall_clock_when_it_is_stepped_back() {
    let Some(libfaketime) = libfaketime() else {
        return;
    };
    let sandbox = Sandbox::new();
    let clock = sandbox.path("faketime");
    std::fs::write(&clock, "+0\n").unwrap();
    let env = |name: &str, value: &std::ffi::OsStr| {
        let mut pair = std::ffi::OsString::from(format!("{name}="));
        pair.push(value);
        pair
    };
    let wrapper = [
        "env".into(),
        env("LD_PRELOAD", libfaketime.as_os_str()),
        env("FAKETIME_TIMESTAMP_FILE", clock.as_os_str()),
        "FAKETIME_NO_CACHE=1".into(),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
    ];
    let archiver = Archiver::start_wrapped(&shared_widget().repos, &[], &wrapper);
    let date_off_by = |path: &str| {
        let response = archiver.get(path);
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let date = httpdate::parse_http_date(header(&response, "date")).unwrap();
        let now = std::time::SystemTime::now();
        let off = date
            .duration_since(now)
            .or_else(|_| now.duration_since(date))
            .unwrap();
        response.bytes().expect("the whole body");
        off.as_secs()
    };
    const DAY: u64 = 86_400;
    // Each answer a few seconds from its clock at most.
    let near = |off: u64, ahead: u64| off.abs_diff(ahead) <= 5;

    std::fs::write(&clock, "+1d\n").unwrap();
    let off = date_off_by("/acme/widget/archive/main.tar");
    assert!(near(off, DAY), "a day ahead, Date is {off} s off");
    std::fs::write(&clock, "+0\n").unwrap();
    for path in ["/acme/widget/archive/main.tar", "/healthz"] {
        let off = date_off_by(path);
        assert!(
            near(off, 0),
            "the clock stepped back a day, {path}'s Date is still {off} s off"
        );
    }
}

/// docs/http.md, "Conditional requests": a commit dated ahead of the
/// server's clock is `Last-Modified` at the time of each response, so
/// the date a client was sent is earlier than the one the next response
/// carries. Revalidated with that date, its commit URL (whose bytes never
/// change) is still a 304, not the whole archive again. (Review of
/// 801e9d3: every such revalidation was a 200.)
#[test]
fn a_commit_dated_in_the_future_is_revalidated_by_the_date_it_was_sent() {
    let sandbox = Sandbox::new();
    let commit = commit_in_far_dated(&sandbox, now_seconds() + 86_400, "main");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let path = format!("/acme/far/archive/{commit}.tar");
    let first = archiver.get(&path);
    assert_eq!(first.status().as_u16(), 200);
    let sent = header(&first, "last-modified").to_owned();
    first.bytes().expect("the whole body");
    // Until the server's clock has passed the date sent.
    let later = || {
        let response = archiver.client().head(archiver.url(&path)).send().unwrap();
        httpdate::parse_http_date(header(&response, "date")).unwrap()
            > httpdate::parse_http_date(&sent).unwrap()
    };
    assert!(wait_until(Duration::from_secs(10), later));
    let again = archiver
        .client()
        .get(archiver.url(&path))
        .header("if-modified-since", &sent)
        .send()
        .unwrap();
    assert_eq!(
        again.status().as_u16(),
        304,
        "{path} revalidated with the Last-Modified it was sent, {sent}, now {}",
        header(&again, "last-modified")
    );
}

/// A commit URL names itself as the immutable one (its top folder, and so
/// its ETag, differ from the branch URL's).
#[test]
fn commit_url_names_itself_as_the_immutable_one() {
    let (w, archiver) = widget_archiver(&[]);
    let by_branch = archiver
        .client()
        .head(archiver.url("/acme/widget/archive/main.zip"))
        .send()
        .unwrap();
    let by_commit = archiver
        .client()
        .head(archiver.url(&format!("/acme/widget/zip/{}", w.c2)))
        .send()
        .unwrap();
    assert_eq!(header(&by_commit, "link"), header(&by_branch, "link"));
    assert!(header(&by_commit, "etag").starts_with(&format!("\"{}-", w.c2)));
}

/// Only a URL naming the full lower-case commit id is immutable
/// (`docs/http.md`, `Cache-Control` and `If-Modified-Since`): an
/// abbreviated id can later be shadowed by a branch or tag of the same
/// name, and an upper-case one is another spelling a cache keys apart. A
/// CDN holding such a URL's answer for a year would serve the wrong bytes.
#[test]
fn only_the_full_lower_case_commit_url_is_immutable() {
    let (w, archiver) = widget_archiver(&[]);
    // A day after the commit: "not modified since" holds for its bytes.
    let later = http_date(T2 + 86_400);
    let ask = |reference: &str| {
        let head = |conditional: bool| {
            let mut request = archiver
                .client()
                .head(archiver.url(&format!("/acme/widget/archive/{reference}.tar")));
            if conditional {
                request = request.header("If-Modified-Since", &later);
            }
            request.send().unwrap()
        };
        let plain = head(false);
        assert_eq!(plain.status().as_u16(), 200, "{reference}");
        assert_eq!(header(&plain, "x-gitball-commit"), w.c2, "{reference}");
        let cache_control = header(&plain, "cache-control").to_owned();
        (cache_control, head(true).status().as_u16())
    };
    assert_eq!(
        ask(&w.c2),
        ("public, max-age=31536000, immutable".to_owned(), 304),
        "the full commit id"
    );
    for reference in [w.c2[..10].to_owned(), w.c2.to_ascii_uppercase()] {
        assert_eq!(
            ask(&reference),
            ("public, max-age=60".to_owned(), 200),
            "{reference}: If-Modified-Since ignored, cached for a minute"
        );
    }
}

/// Conditional requests on a complete archive: the tag itself, weak form,
/// lists, `*`; another tag gets the archive.
#[test]
fn etag_match_in_any_form_answers_304() {
    let (_, archiver) = widget_archiver(&[]);
    let (_, etag) = complete_archive(&archiver, TAG_GZ);
    for value in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".into(),
    ] {
        let response = archiver
            .client()
            .get(archiver.url(TAG_GZ))
            .header("If-None-Match", &value)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 304, "If-None-Match: {value}");
        assert_eq!(header(&response, "etag"), etag);
    }
    let other = archiver
        .client()
        .get(archiver.url(TAG_GZ))
        .header("If-None-Match", "\"something-else\"")
        .send()
        .unwrap();
    assert_eq!(other.status().as_u16(), 200);
}

#[test]
fn range_on_complete_archive_answers_206() {
    let (_, archiver) = widget_archiver(&[]);
    let (body, _) = complete_archive(&archiver, TAG_GZ);
    let len = body.len();
    // `Repr-Digest` on a 206 is the whole archive's, not the range's.
    let whole_digest = format!("sha-256=:{}:", base64(&Sha256::digest(&body)));
    for (range, start, end) in [
        ("bytes=100-1099", 100, 1099),
        ("bytes=-500", len - 500, len - 1),
        (&format!("bytes={}-", len - 7) as &str, len - 7, len - 1),
        ("bytes=0-0", 0, 0),
        (&format!("bytes=10-{}", len + 1000), 10, len - 1),
    ] {
        let response = archiver
            .client()
            .get(archiver.url(TAG_GZ))
            .header("Range", range)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 206, "Range: {range}");
        assert_eq!(
            header(&response, "content-range"),
            format!("bytes {start}-{end}/{len}"),
            "Range: {range}"
        );
        assert_eq!(
            header(&response, "content-length"),
            (end - start + 1).to_string()
        );
        assert_eq!(
            header(&response, "repr-digest"),
            whole_digest,
            "Range: {range}"
        );
        assert_bytes_eq(&response.bytes().unwrap(), &body[start..=end], range);
    }
}

#[test]
fn unsatisfiable_range_answers_416() {
    let (_, archiver) = widget_archiver(&[]);
    let (body, _) = complete_archive(&archiver, TAG_GZ);
    let len = body.len();
    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 5, len + 10),
        "bytes=-0".into(),
    ] {
        let response = archiver
            .client()
            .get(archiver.url(TAG_GZ))
            .header("Range", &range)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 416, "Range: {range}");
        assert_eq!(header(&response, "content-range"), format!("bytes */{len}"));
    }
}

#[test]
fn if_range_with_another_validator_answers_the_whole_archive() {
    let (_, archiver) = widget_archiver(&[]);
    let (body, _) = complete_archive(&archiver, TAG_GZ);
    let response = archiver
        .client()
        .get(archiver.url(TAG_GZ))
        .header("Range", "bytes=0-9")
        .header("If-Range", "\"other\"")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.bytes().unwrap().len(), body.len());
}

/// HEAD on a hit: the GET's headers, no body on the wire.
#[test]
fn head_on_a_hit_has_the_get_headers_and_no_body() {
    let (_, archiver) = widget_archiver(&[]);
    let (body, etag) = complete_archive(&archiver, TAG_GZ);
    let (head, rest, end) =
        RawConnection::request(archiver.addr, "HEAD", TAG_GZ, &[("X-Request-Id", "head-1")])
            .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    assert_eq!(head.header("x-request-id"), Some("head-1"));
    assert!(
        rest.is_empty() && end == BodyEnd::Complete,
        "HEAD sent a body"
    );
    let mut probe = RawConnection::connect(archiver.addr).unwrap();
    probe
        .send_request("HEAD", TAG_GZ, &[("Connection", "close")])
        .unwrap();
    probe.read_head().unwrap();
    let after = probe.read_to_close();
    assert!(
        after.is_empty(),
        "{} bytes after a HEAD response",
        after.len()
    );
}

/// The archiver's request-log line for `request_id`.
fn log_line_of(archiver: &Archiver, request_id: &str) -> Option<serde_json::Value> {
    archiver
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "request" && line["request_id"] == request_id)
}

/// A growing archive, and a hit larger than one read block, are sent with
/// `sendfile`, around hyper (`core/src/server/takeover.rs`). The
/// connection must go on as if hyper had sent them: kept alive, with
/// requests sent ahead (pipelined) answered in order, chunks and ranges
/// exact, `Connection: close` honoured, and the request log and metrics as
/// for any download.
#[test]
fn downloads_sent_around_hyper_keep_their_connection_pipelining_ranges_and_log() {
    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &[]);
    // One 4 MiB file: a medium archive, many blocks long.
    let path = "/acme/big/archive/main.tar?path=part-03.bin";
    let expected = big
        .repo
        .archive("tar", BIG_PREFIX, &big.commit, Some("part-03.bin"));
    let len = expected.len();
    let sent_before = archiver
        .metrics()
        .value("gitball_archiver_sent_bytes_total", &[]);

    // The cold download, chunked as the archive grows, on the connection
    // the rest then uses.
    let mut connection = RawConnection::connect(archiver.addr).unwrap();
    connection
        .send_request("GET", path, &[("X-Request-Id", "sendfile-cold")])
        .unwrap();
    let head = connection.read_head().unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-gitball-cache"), Some("miss"));
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    let mut cold = Vec::with_capacity(len);
    let end = connection.read_body_to_end(|piece| cold.extend_from_slice(piece));
    assert_eq!(end, BodyEnd::Complete, "the cold download");
    assert_bytes_eq(&cold, &expected, "the cold download");
    let whole = |connection: &mut RawConnection, what: &str| {
        let head = connection.read_head().unwrap();
        assert_eq!(head.status, 200, "{what}");
        assert_eq!(head.header("x-gitball-cache"), Some("hit"), "{what}");
        assert_eq!(
            head.header("content-length"),
            Some(len.to_string().as_str())
        );
        let mut body = Vec::with_capacity(len);
        let end = connection.read_body_to_end(|piece| body.extend_from_slice(piece));
        assert_eq!(end, BodyEnd::Complete, "{what}");
        assert_bytes_eq(&body, &expected, what);
    };
    // Two hits one after the other on one connection.
    for id in ["sendfile-1", "sendfile-2"] {
        connection
            .send_request("GET", path, &[("X-Request-Id", id)])
            .unwrap();
        whole(&mut connection, id);
    }
    // A range from the middle of a block to the middle of a later one.
    let (first, last) = (100_000, 3_000_000);
    connection
        .send_request(
            "GET",
            path,
            &[
                ("Range", &format!("bytes={first}-{last}")),
                ("X-Request-Id", "sendfile-range"),
            ],
        )
        .unwrap();
    let head = connection.read_head().unwrap();
    assert_eq!(head.status, 206);
    let range = connection.read_body_bytes(last - first + 2).unwrap();
    assert_bytes_eq(&range, &expected[first..=last], "the range");
    // Three requests in one write: two hits and a small answer after them,
    // answered in order.
    let host = archiver.addr.to_string();
    let request = |target: &str, id: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: {id}\r\n\r\n")
    };
    let pipelined = [
        request(path, "sendfile-pipelined-1"),
        request(path, "sendfile-pipelined-2"),
        request("/healthz", "sendfile-pipelined-3"),
    ]
    .concat();
    connection.send(pipelined.as_bytes()).unwrap();
    whole(&mut connection, "the first pipelined hit");
    whole(&mut connection, "the second pipelined hit");
    let head = connection.read_head().unwrap();
    assert_eq!(
        head.status, 200,
        "the health check after the pipelined hits"
    );
    let mut health = Vec::new();
    let end = connection.read_body_to_end(|piece| health.extend_from_slice(piece));
    assert_eq!(end, BodyEnd::Complete);
    assert!(
        health.starts_with(b"{"),
        "{}",
        String::from_utf8_lossy(&health)
    );
    // `Connection: close`: the whole archive, then the server closes.
    connection
        .send_request(
            "GET",
            path,
            &[("Connection", "close"), ("X-Request-Id", "sendfile-last")],
        )
        .unwrap();
    whole(&mut connection, "the last hit");
    assert!(
        connection.read_to_close().is_empty(),
        "bytes after the last hit"
    );

    let ids = [
        ("sendfile-cold", len),
        ("sendfile-1", len),
        ("sendfile-2", len),
        ("sendfile-range", last - first + 1),
        ("sendfile-pipelined-1", len),
        ("sendfile-pipelined-2", len),
        ("sendfile-last", len),
    ];
    let logged = wait_until(Duration::from_secs(5), || {
        ids.iter()
            .all(|(id, _)| log_line_of(&archiver, id).is_some())
    });
    assert!(logged, "not every download logged:\n{}", archiver.log());
    for (id, bytes) in ids {
        let line = log_line_of(&archiver, id).unwrap();
        assert_eq!(
            (line["bytes"].as_u64(), line["ending"].as_str()),
            (Some(bytes as u64), Some("complete")),
            "{line}"
        );
    }
    let sent = archiver
        .metrics()
        .value("gitball_archiver_sent_bytes_total", &[])
        - sent_before;
    assert_eq!(sent as usize, 6 * len + (last - first + 1));
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 0.0),
        "active_downloads stayed at {}",
        active_downloads(&archiver)
    );
}

#[test]
fn concurrent_request_joins_a_running_generation() {
    let big = big_repo();
    // The generation (see `SLOW_ZSTD`) runs far longer than this test; the
    // archiver is stopped at the end.
    let archiver = Archiver::start(
        &big.repos,
        &[SLOW_ZSTD[0], SLOW_ZSTD[1], "--shutdown-grace", "1"],
    );
    let path = SLOW_PATH;
    let (mut first, first_head) = open_download(&archiver, path);
    assert_eq!(first_head.status, 200);
    assert_eq!(first_head.header("x-gitball-cache"), Some("miss"));
    assert_eq!(
        first_head.header("content-length"),
        None,
        "a growing archive has no length"
    );
    // While generating, a Range with If-Range (a browser's resume) is
    // ignored: 200 and the whole body. (Without If-Range it waits for the
    // end: `clients.rs`.)
    let etag = first_head.header("etag").unwrap().to_owned();
    let mut second = RawConnection::connect(archiver.addr).unwrap();
    second
        .send_request("GET", path, &[("Range", "bytes=0-9"), ("If-Range", &etag)])
        .unwrap();
    let second_head = second.read_head().unwrap();
    assert_eq!(second_head.status, 200, "Range while generating");
    assert_eq!(second_head.header("x-gitball-cache"), Some("join"));
    assert_eq!(second_head.header("accept-ranges"), None);
    assert_eq!(second_head.header("etag"), first_head.header("etag"));
    let a = first.read_body_bytes(64 * 1024).unwrap();
    let b = second.read_body_bytes(64 * 1024).unwrap();
    assert_eq!(a.len(), 64 * 1024);
    assert_bytes_eq(&b, &a, "joined reader's first bytes");
    let metrics = archiver.metrics();
    assert_eq!(
        metrics.value("gitball_archiver_generations_in_flight", &[]),
        1.0
    );
    assert_eq!(metrics.value("gitball_archiver_active_downloads", &[]), 2.0);
}

/// A cold tar.gz's first bytes, the gzip header, leave before git writes
/// anything, not with git's first bytes nor once git has written a whole
/// 128 KiB compression block. The stub git writes nothing of the real
/// archive until told on a fifo: the client already has its `200` and the
/// header, and once git goes on, the rest of the same bytes.
#[test]
fn a_cold_tar_gz_starts_before_git_writes() {
    let sandbox = Sandbox::new();
    let (w, mut fifo, archiver) = widget_with_git_that_waits(&sandbox);

    let mut connection = RawConnection::connect(archiver.addr).unwrap();
    connection
        .send_request("GET", "/acme/widget/archive/v1.2.3.tar.gz", &[])
        .unwrap();
    let head = connection.read_head().unwrap();
    assert_eq!(head.status, 200);
    let first = connection.read_body_bytes(10).unwrap();
    assert_eq!(
        first,
        [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        "the gzip header"
    );
    std::io::Write::write_all(&mut fifo, b"go\n").unwrap();
    let mut body = first;
    let end = connection.read_body_to_end(|piece| body.extend_from_slice(piece));
    assert!(matches!(end, BodyEnd::Complete), "{end:?}");
    assert_eq!(
        pipe_through("gzip", &["-dc"], &body),
        w.repo.archive("tar", "widget-1.2.3/", &w.c1, None)
    );
    // The cached archive is the same bytes.
    let (_, hit, _) = RawConnection::request(
        archiver.addr,
        "GET",
        "/acme/widget/archive/v1.2.3.tar.gz",
        &[],
    )
    .unwrap();
    assert_eq!(sha256_hex(&hit), sha256_hex(&body));
}

/// Compression yields the CPU to git and to the threads serving requests
/// (docs/archiver.md, "Compression yields to git and to requests"): while a
/// cold tar.zst, tar.gz and zip are made, every thread that compresses (the
/// writer, zstd's workers started from it, the gzip and zip deflate
/// threads) runs 10 nice levels below the archiver's main thread, not
/// more, and git (here a stub that stops after 256 KiB, so that zstd has
/// its first block) does not.
#[test]
fn compressing_threads_run_below_git_and_the_request_threads() {
    const LOWER: i32 = 10;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "big");
    repo.write("data.bin", pseudo_random_bytes(11, 512 * 1024));
    let commit = repo.commit_all(T1, "big");
    let (stub, mut fifo) = sandbox.git_that_pauses("git-that-waits", 262_144);
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);
    let base = process_nice(archiver.pid).expect("the archiver's nice value");

    let formats = [
        ("tar.zst", "gitball-writer"),
        ("tar.gz", "gitball-gzip"),
        ("zip", "gitball-zip"),
    ];
    for (format, compressing) in formats {
        let mut connection = RawConnection::connect(archiver.addr).unwrap();
        connection
            .send_request("GET", &format!("/acme/big/archive/{commit}.{format}"), &[])
            .unwrap();
        assert_eq!(connection.read_head().unwrap().status, 200, "{format}");
        // zstd's first bytes leave once its workers compressed the first block.
        connection.read_body_bytes(4).unwrap();
        let lowered = |name: &str| {
            let threads = thread_nice_values(archiver.pid);
            let named: Vec<_> = threads.iter().filter(|t| t.name == name).collect();
            !named.is_empty() && named.iter().all(|t| t.nice == base + LOWER)
        };
        let settled = wait_until(Duration::from_secs(10), || {
            lowered("gitball-writer") && lowered(compressing)
        });
        let threads = thread_nice_values(archiver.pid);
        assert!(settled, "{format}: threads of the archiver: {threads:?}");
        let writers = threads
            .iter()
            .filter(|t| t.name == "gitball-writer")
            .count();
        if format == "tar.zst" {
            assert!(writers >= 2, "the writer and zstd's workers: {threads:?}");
        }
        // Every other thread (those serving requests, tokio's, jemalloc's)
        // and git keep the archiver's priority.
        let compressors = [
            "gitball-writer",
            "gitball-zip",
            "gitball-gzip",
            "gitball-zstd-dr",
        ];
        for thread in &threads {
            if !compressors.contains(&thread.name.as_str()) {
                assert_eq!(thread.nice, base, "{format}: {thread:?}");
            }
        }
        let children = child_processes(archiver.pid);
        assert!(!children.is_empty(), "{format}: git is running");
        for child in &children {
            assert_eq!(process_nice(child.pid), Some(base), "{format}: {child:?}");
        }
        std::io::Write::write_all(&mut fifo, b"go\n").unwrap();
        let mut body = Vec::new();
        let end = connection.read_body_to_end(|piece| body.extend_from_slice(piece));
        assert!(matches!(end, BodyEnd::Complete), "{format}: {end:?}");
    }
}

/// A ref looked up in a large `packed-refs` costs the archiver one copy of
/// the file on the heap, not more: read into a buffer grown by doubling
/// and copied once parsed, a 64 MiB file had raised its peak RSS by twice
/// its size (review of `repo::packed`; gix had mapped it), so the largest
/// file the archiver reads (256 MiB) by 512 MiB.
#[test]
fn a_lookup_in_a_large_packed_refs_holds_one_copy_of_the_file() {
    use std::io::Write;
    const PACKED_BYTES: u64 = 64 * MIB;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "tags");
    repo.write("README", "tags\n");
    let commit = repo.commit_all(T1, "one");
    repo.git(&["pack-refs", "--all"]);
    let packed_path = repo.dir().join(".git/packed-refs");
    let packed = std::fs::read_to_string(&packed_path).unwrap();
    assert!(packed.starts_with("# pack-refs with: peeled fully-peeled sorted \n"));
    // As git writes it: sorted, `refs/heads/main` first, then the tags.
    let mut file = std::io::BufWriter::new(std::fs::File::create(&packed_path).unwrap());
    file.write_all(packed.as_bytes()).unwrap();
    let pad = "x".repeat(150);
    let mut written = packed.len() as u64;
    let mut index = 0u64;
    while written < PACKED_BYTES {
        let line = format!("{commit} refs/tags/t{index:08}{pad}\n");
        file.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        index += 1;
    }
    file.flush().unwrap();
    drop(file);

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let baseline = archiver.peak_rss_bytes();
    let response = archiver.get("/acme/tags/archive/main.tar");
    assert_eq!(response.status(), 200, "main, in packed-refs alone");
    let growth = archiver.peak_rss_bytes().saturating_sub(baseline);
    eprintln!(
        "lookup in a {:.0} MiB packed-refs: peak RSS grew by {:.1} MiB",
        written as f64 / MIB as f64,
        growth as f64 / MIB as f64
    );
    assert!(
        growth < written * 3 / 2,
        "peak RSS grew by {growth} bytes for a lookup in a packed-refs of {written}: more than one copy"
    );
}

// ---------------------------------------------------------------------------
// 4. Single flight

#[test]
fn concurrent_cold_requests_share_one_generation() {
    const CLIENTS: usize = 30;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "medium");
    for i in 0..4 {
        repo.write(
            &format!("part-{i}.bin"),
            pseudo_random_bytes(200 + i, 1 << 20),
        );
    }
    repo.write("notes.txt", pseudo_text(7, 200_000));
    let commit = repo.commit_all(T1, "medium");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let url = archiver.url("/acme/medium/archive/main.tar.gz");

    let barrier = Arc::new(Barrier::new(CLIENTS));
    let started = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let barrier = barrier.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let client = http_client();
                barrier.wait();
                let response = client.get(&url).send().expect("GET");
                let status = response.status().as_u16();
                let cache = header(&response, "x-gitball-cache").to_owned();
                (status, cache, response.bytes().expect("body").to_vec())
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect();
    let elapsed = started.elapsed();

    let count = |label: &str| results.iter().filter(|(_, c, _)| c == label).count();
    eprintln!(
        "30 concurrent cold requests: {} miss, {} join, {} hit in {:.2} s",
        count("miss"),
        count("join"),
        count("hit"),
        elapsed.as_secs_f64()
    );
    assert!(results.iter().all(|(status, _, _)| *status == 200));
    assert_eq!(
        count("miss"),
        1,
        "exactly one request starts the generation"
    );
    assert_eq!(count("miss") + count("join") + count("hit"), CLIENTS);
    let first = &results[0].2;
    for (i, (_, _, body)) in results.iter().enumerate() {
        assert_bytes_eq(body, first, &format!("body {i} vs body 0"));
    }
    assert_bytes_eq(
        &tar_of("tar.gz", first),
        &repo.archive("tar", "medium-main/", &commit, None),
        "unpacked body vs git archive",
    );
    let metrics = archiver.metrics();
    assert_eq!(
        metrics.get(
            "gitball_archiver_generations_total",
            &[("format", "tar.gz"), ("outcome", "ok")]
        ),
        Some(1.0),
        "generations: {:?}",
        metrics.series_of("gitball_archiver_generations_total")
    );
    assert_eq!(metrics.sum("gitball_archiver_generations_total", &[]), 1.0);
}

// ---------------------------------------------------------------------------
// 5. Slow readers and aborted downloads

#[test]
fn stalled_reader_does_not_grow_memory_and_later_gets_every_byte() {
    /// Asserted bound on the archiver's RSS growth while one reader stalls.
    const RSS_GROWTH_LIMIT: u64 = 48 * MIB;

    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &[]);
    let path = "/acme/big/archive/main.tar";
    let baseline_rss = archiver.rss_bytes();

    // The stalled reader starts the generation, reads 4 KiB, then stops
    // reading with its socket open.
    let (mut stalled, head) = open_download(&archiver, path);
    assert_eq!(head.status, 200, "the stalled reader's response");
    assert_eq!(
        head.header("x-gitball-cache"),
        Some("miss"),
        "the stalled reader starts the generation"
    );
    let stalled_start = stalled.read_body_bytes(4096).unwrap();

    let peak_sampled = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak_sampled.clone(), sampling.clone(), archiver.pid);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            while sampling.load(Ordering::Relaxed) && Instant::now() < deadline {
                peak.fetch_max(gitball_e2e::vm_rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // The fast reader reads all 96 MiB meanwhile and gets git's bytes.
    let started = Instant::now();
    let (mut fast, head) = open_download(&archiver, path);
    assert_eq!(head.status, 200, "the fast reader's response");
    let fast_cache = head.header("x-gitball-cache").unwrap_or("").to_owned();
    let bytes = assert_same_stream(fast.body_reader(), big.git_tar(), "fast reader");
    let fast_seconds = started.elapsed().as_secs_f64();
    drop(fast);
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 1.0),
        "the stalled download should be the only one left"
    );
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak_sampled
        .load(Ordering::Relaxed)
        .max(archiver.peak_rss_bytes());
    let growth = peak.saturating_sub(baseline_rss);
    eprintln!(
        "slow reader: baseline RSS {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB while one reader \
         stalled and one read {} MiB ({fast_cache}) in {fast_seconds:.1} s",
        baseline_rss as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        growth as f64 / MIB as f64,
        bytes / MIB
    );
    assert!(
        growth < RSS_GROWTH_LIMIT,
        "RSS grew by {growth} bytes (limit {RSS_GROWTH_LIMIT}) while a reader stalled"
    );

    // The stalled reader, resumed, gets the whole archive at its own pace.
    let resumed = Cursor::new(stalled_start).chain(stalled.body_reader());
    assert_same_stream(resumed, big.git_tar(), "stalled reader, resumed");
    drop(stalled);
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 0.0),
        "active_downloads stayed at {} after both readers left",
        active_downloads(&archiver)
    );
    assert_eq!(
        generations(&archiver),
        1.0,
        "one generation for the stalled and the fast reader"
    );
    assert!(
        wait_until(Duration::from_secs(5), || archiver
            .stray_children()
            .is_empty()),
        "zombie or git children left: {:?}",
        archiver.stray_children()
    );
}

#[test]
fn aborted_downloads_release_fds_and_download_slots() {
    /// Open fds may differ from the baseline by this much afterwards.
    const FD_TOLERANCE: usize = 2;
    const ABORTED: usize = 50;

    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &[]);
    let path = "/acme/big/archive/main.tar";
    let baseline_fds = archiver.open_fds();

    // One complete download makes the archive a hit.
    let (mut warm, head) = open_download(&archiver, path);
    assert_eq!(head.status, 200, "the warm-up download");
    let mut warm_bytes = 0;
    let end = warm.read_body_to_end(|piece| warm_bytes += piece.len());
    assert_eq!(
        end,
        BodyEnd::Complete,
        "the warm-up download after {warm_bytes} bytes"
    );
    drop(warm);
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 0.0),
        "the warm-up download is still counted as active"
    );
    let disconnects_before = archiver
        .metrics()
        .value("gitball_archiver_client_disconnects_total", &[]);

    // 50 downloads that each read ~1 MiB, then hang up.
    let mut aborted = Vec::with_capacity(ABORTED);
    for _ in 0..ABORTED {
        let (mut connection, head) = open_download(&archiver, path);
        assert_eq!(head.status, 200);
        assert_eq!(head.header("x-gitball-cache"), Some("hit"));
        assert_eq!(connection.read_body_bytes(1 << 20).unwrap().len(), 1 << 20);
        aborted.push(connection);
    }
    let open_fds = archiver.open_fds();
    assert_eq!(active_downloads(&archiver), ABORTED as f64);
    let rss_with_50 = archiver.rss_bytes();
    let closed = Instant::now();
    drop(aborted);
    let released = wait_until(Duration::from_secs(5), || {
        archiver.open_fds() <= baseline_fds + FD_TOLERANCE
    });
    let release_seconds = closed.elapsed().as_secs_f64();
    let after_fds = archiver.open_fds();
    eprintln!(
        "aborted downloads: fds {baseline_fds} at start, {open_fds} with {ABORTED} open, \
         {after_fds} {release_seconds:.2} s after they hung up; RSS with {ABORTED} open {:.1} MiB",
        rss_with_50 as f64 / MIB as f64
    );
    assert!(
        released,
        "open fds {after_fds} did not return to the baseline {baseline_fds} (+{FD_TOLERANCE}) in 5 s"
    );
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 0.0),
        "active_downloads stayed at {}",
        active_downloads(&archiver)
    );
    let metrics = archiver.metrics();
    assert!(
        metrics.value("gitball_archiver_client_disconnects_total", &[]) - disconnects_before
            >= ABORTED as f64,
        "client_disconnects_total did not count every hang-up"
    );
    assert_eq!(
        metrics.sum("gitball_archiver_generations_total", &[]),
        1.0,
        "one generation for all of it"
    );
    assert!(
        wait_until(Duration::from_secs(5), || archiver
            .stray_children()
            .is_empty()),
        "zombie or git children left: {:?}",
        archiver.stray_children()
    );
}

/// A client that pipelines a second request behind a download and then
/// closes its sending side (`printf … | nc -N`) gets the whole download:
/// the end of its input comes after a request still to answer, which
/// hyper may already have read off the socket while the download waits
/// for git, so it is not taken for the client leaving.
#[test]
fn a_pipelined_request_then_a_half_close_gets_the_whole_download() {
    let sandbox = Sandbox::new();
    let (w, mut fifo, archiver) = widget_with_git_that_waits(&sandbox);

    let mut connection = RawConnection::connect(archiver.addr).unwrap();
    connection
        .send(
            b"GET /acme/widget/archive/v1.2.3.tar HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    connection
        .stream()
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    // The tar's first bytes wait for the release: the download is growing
    // and its body waits on git, with the client's end of input behind the
    // pipelined request.
    std::io::Write::write_all(&mut fifo, b"go\n").unwrap();
    let head = connection.read_head().unwrap();
    assert_eq!(head.status, 200);
    let mut body = Vec::new();
    let end = connection.read_body_to_end(|piece| body.extend_from_slice(piece));
    assert!(
        matches!(end, BodyEnd::Complete),
        "{end:?} after {} bytes",
        body.len()
    );
    assert_eq!(body, w.repo.archive("tar", "widget-1.2.3/", &w.c1, None));
    // What follows is the pipelined request's answer or the connection's
    // end, never stray bytes. (It is the end today: the connection the
    // loop hands the pipelined request to sees the client's end of input
    // first, "closed before message completed". Left as it is.)
    let rest = connection.read_to_close();
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}

/// A client that leaves while its download waits for the generation's
/// next bytes is noticed at once, not at the next write: its download and
/// its connection's fd are released while git still runs.
#[test]
fn a_client_leaving_a_waiting_download_is_released_while_git_runs() {
    const FD_TOLERANCE: usize = 2;
    let sandbox = Sandbox::new();
    let (_, mut fifo, archiver) = widget_with_git_that_waits(&sandbox);
    let baseline_fds = archiver.open_fds();

    let (mut connection, head) = open_download(&archiver, "/acme/widget/archive/v1.2.3.tar.gz");
    assert_eq!(head.status, 200);
    assert_eq!(connection.read_body_bytes(10).unwrap().len(), 10);
    assert_eq!(active_downloads(&archiver), 1.0);
    let client = match connection.stream().local_addr().unwrap() {
        std::net::SocketAddr::V4(client) => client,
        other => panic!("an IPv4 client, not {other}"),
    };
    assert!(holds_connection_to(archiver.pid, client));
    drop(connection);
    assert!(
        wait_until(Duration::from_secs(5), || active_downloads(&archiver)
            == 0.0),
        "the download was still counted 5 s after its client left"
    );
    assert!(
        wait_until(Duration::from_secs(5), || !holds_connection_to(
            archiver.pid,
            client
        )),
        "the connection's fd was still open 5 s after its client left"
    );
    assert_eq!(
        archiver
            .metrics()
            .sum("gitball_archiver_generations_total", &[]),
        0.0,
        "git was still paused meanwhile"
    );
    // The generation is not the client's: it finishes and is cached.
    std::io::Write::write_all(&mut fifo, b"go\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .metrics()
            .sum("gitball_archiver_generations_total", &[])
            == 1.0),
        "the generation did not finish"
    );
    assert!(
        wait_until(Duration::from_secs(5), || archiver.open_fds()
            <= baseline_fds + FD_TOLERANCE),
        "fds {} did not return to the baseline {baseline_fds}",
        archiver.open_fds()
    );
}

// ---------------------------------------------------------------------------
// 6. Killed generations

/// Runs one download that the archiver must cut: a 200 whose body ends
/// without its terminating chunk. Returns the bytes received.
fn expect_aborted_download(archiver: &Archiver, path: &str, cache: &str) -> usize {
    let started = Instant::now();
    let (mut connection, head) = open_download(archiver, path);
    assert_eq!(
        head.status, 200,
        "expected the failure after the first bytes (an aborted 200), got {} first",
        head.status
    );
    assert_eq!(head.header("x-gitball-cache"), Some(cache), "{path}");
    assert_eq!(
        head.header("content-length"),
        None,
        "a growing archive has no length"
    );
    let mut received = 0;
    let end = connection.read_body_to_end(|piece| received += piece.len());
    eprintln!(
        "{path}: {received} bytes, then {end:?} after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "a killed generation's body ended cleanly after {received} bytes"
    );
    received
}

/// After a killed generation: counted with `outcome`, not indexed, no file
/// left in the cache dir, no child left.
fn assert_generation_discarded(
    archiver: &Archiver,
    path: &str,
    format: &str,
    outcome: &str,
    count: f64,
) {
    let labels = [("format", format), ("outcome", outcome)];
    // Bounded, not tight: on 2 cores shared with the rest of the suite, a
    // generation that must first write 32 MiB of tar.gz took over 10 s once.
    assert!(
        metric_after(archiver, Duration::from_secs(60), |m| {
            m.value("gitball_archiver_generations_total", &labels) == count
        }),
        "generations_total{{{format},{outcome}}} != {count}: {:?}",
        archiver
            .metrics()
            .series_of("gitball_archiver_generations_total")
    );
    assert_eq!(
        archiver.metrics().value(
            "gitball_archiver_generations_total",
            &[("format", format), ("outcome", "ok")]
        ),
        0.0
    );
    // Not indexed: HEAD (which never generates) says miss once the failed
    // generation is gone; for one past the size limit, which every
    // generation of it would be, `500 archive_too_large`.
    let cache_state = || {
        let (head, _, _) = RawConnection::request(archiver.addr, "HEAD", path, &[]).unwrap();
        match head.status {
            500 => "refused".to_owned(),
            _ => head.header("x-gitball-cache").unwrap_or("").to_owned(),
        }
    };
    let expected = if outcome == "too_large" {
        "refused"
    } else {
        "miss"
    };
    assert!(wait_until(Duration::from_secs(10), || cache_state() != "join"));
    assert_eq!(cache_state(), expected, "a killed generation was indexed");
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .cache_files()
            .is_empty()),
        "files left in the cache dir: {:?}",
        archiver.cache_files()
    );
    assert_eq!(
        archiver
            .metrics()
            .value("gitball_archiver_cache_bytes", &[]),
        0.0
    );
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .stray_children()
            .is_empty()),
        "children left: {:?}",
        archiver.stray_children()
    );
}

/// Flags that make the big repository's `tar.zst` a slow generation: zstd
/// at level 19 is single-threaded and compresses 96 MiB of random bytes at
/// about 1 MB/s in debug builds and a few MB/s in release builds, while its
/// first block reaches the file within about 0.3 s (debug). So a limit of
/// 1.5 s or 1 MiB is hit well after the response head went out, in either
/// build and on a loaded machine.
const SLOW_ZSTD: [&str; 2] = ["--zstd-level", "19"];
const SLOW_PATH: &str = "/acme/big/archive/main.tar.zst";

/// First a git that writes nothing until it is released (never, here):
/// the tar.gz's header, written before git runs, is the first byte, so the
/// head has gone out when the timeout cuts the generation, however loaded
/// the machine. (zstd at level 19 as the slow generation was not: at its
/// lower priority on two cores busy with the rest of the suite, its first
/// block once took longer than the timeout, and the answer was a `500`.)
/// Then a git that trickles, cut mid-stream.
#[test]
fn generation_over_its_timeout_is_killed_aborted_and_not_cached() {
    const PATH: &str = "/acme/widget/archive/main.tar.gz";
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let (stub, _never_released) = sandbox.git_that_pauses("git-that-waits", 0);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &[
            "--git",
            stub.to_str().unwrap(),
            "--generation-timeout",
            "1.5",
        ],
    );
    let started = Instant::now();
    expect_aborted_download(&archiver, PATH, "miss");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(20),
        "the abort came after {took:?}, not after the 1.5 s timeout"
    );
    assert_generation_discarded(&archiver, PATH, "tar.gz", "timeout", 1.0);
    // The next request is a miss again, and is killed again.
    expect_aborted_download(&archiver, PATH, "miss");
    assert_generation_discarded(&archiver, PATH, "tar.gz", "timeout", 2.0);
    assert_eq!(archiver.health_status(), Some(200));

    // Cut mid-stream: git writing (64 KiB every 100 ms for 3 s, then the
    // rest of 96 MiB) and the compressors busy with it.
    let big = big_repo();
    let git = sandbox.git_that_trickles("trickling-git", 30, 100);
    let archiver = Archiver::start(
        &big.repos,
        &[
            "--git",
            git.to_str().unwrap(),
            "--generation-timeout",
            "1.5",
        ],
    );
    let big_path = "/acme/big/archive/main.tar.gz";
    expect_aborted_download(&archiver, big_path, "miss");
    assert_generation_discarded(&archiver, big_path, "tar.gz", "timeout", 1.0);
}

/// A partial clone (`--filter=blob:none`) lacks blobs, which git in the
/// repository fetches from its promisor remote when it needs one. git runs
/// in a shadow git dir that names no remote: an archive needing a missing
/// blob fails (a tar's before its first byte, a `500`; a zip's after the
/// bytes written ahead, an aborted download), is never cached, and nothing
/// is fetched, though the promisor remote is there to fetch from.
#[test]
fn a_partial_clones_missing_blob_fails_its_archive_and_is_never_fetched() {
    let sandbox = Sandbox::new();
    let source = sandbox.source_repo("src/widget");
    source.write("README", "only in the promisor remote\n");
    source.commit_all(1_700_000_000, "one");
    source.git(&["config", "uploadpack.allowFilter", "true"]);
    let widget = sandbox.bare_clone(&source, "acme", "widget", &["--filter=blob:none"]);
    let objects = || widget.git(&["count-objects", "-v"]);
    let before = objects();

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    for _ in 0..2 {
        let response = archiver.get("/acme/widget/archive/main.tar");
        assert_eq!(response.status().as_u16(), 500);
        assert_eq!(gitball_e2e::header(&response, "x-gitball-cache"), "miss");
        let body = response.text().unwrap();
        assert!(body.contains("generation_failed"), "{body}");
    }
    expect_aborted_download(&archiver, "/acme/widget/archive/main.zip", "miss");
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .cache_files()
            .is_empty()),
        "files left in the cache dir: {:?}",
        archiver.cache_files()
    );
    assert_eq!(objects(), before, "a blob was fetched");
    // git in the repository fetches it: the remote was there.
    widget.archive("tar", "widget-main/", "main", None);
    assert_ne!(objects(), before, "git fetched nothing from the remote");
}

/// `docs/http.md#status-codes` and `#errors`: a tar or tar.zst whose
/// generation fails before its first byte is a `500` whose `error` is the
/// stable code of the failure, `generation_failed` when git fails and
/// `generation_timeout` when it runs past `--generation-timeout`, with
/// `Cache-Control: no-store`; its message never holds git's stderr, which
/// goes to the log (`docs/archiver.md#clean-child-environment`), and the
/// request's log line names the code. The generation's own lines are
/// under its span (`docs/observability.md#generation-log`). (Docs audit: no
/// test read either code, nor the generation span's fields; answering a
/// timeout as `generation_failed`, or a failed git as `internal`, or a span
/// without the request id, fails this one.)
#[test]
fn a_generation_failing_before_its_first_byte_is_a_500_with_its_code_and_no_stderr() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    // What git says names the server's paths: it must reach the log only.
    const STDERR: &str = "fatal: cannot read /srv/secret-layout/acme/widget.git";
    let failing = sandbox.write_stub(
        "git-that-fails",
        &format!("echo '{STDERR}' >&2\nexit 128\n"),
    );
    let (pausing, _never_released) = sandbox.git_that_pauses("git-that-waits", 0);
    let cases = [
        (failing, "generation_failed", "failed"),
        (pausing, "generation_timeout", "timeout"),
    ];
    for (git, code, outcome) in cases {
        let archiver = Archiver::start(
            &sandbox.repos(),
            &["--git", git.to_str().unwrap(), "--generation-timeout", "1"],
        );
        for ext in ["tar", "tar.zst"] {
            let path = format!("/acme/widget/archive/main.{ext}");
            let id = format!("{code}-{}", ext.replace('.', "-"));
            let (head, body, end) =
                RawConnection::request(archiver.addr, "GET", &path, &[("X-Request-Id", &id)])
                    .unwrap();
            let text = String::from_utf8_lossy(&body);
            assert_eq!(head.status, 500, "{path} ({code}): {text}");
            assert_eq!(end, BodyEnd::Complete, "{path}");
            assert_eq!(head.header("cache-control"), Some("no-store"), "{path}");
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"], code, "{path}: {text}");
            assert!(
                !text.contains("secret-layout") && !text.contains("fatal"),
                "{path}: git's stderr reached the client: {text}"
            );
            let line = gitball_e2e::wait_for_line(Duration::from_secs(10), || archiver.log(), &id);
            assert_eq!(
                (line["status"].as_u64(), line["error"].as_str()),
                (Some(500), Some(code)),
                "{line}"
            );
            // `docs/observability.md#generation-log`: the generation's lines
            // are under its span, which names the key, the repository, the
            // commit, the format and the request that started it; when git
            // fails, its exit status and stderr.
            let generation_lines = || -> Vec<serde_json::Value> {
                archiver
                    .log()
                    .lines()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .filter(|line| {
                        line["span"]["name"] == "generation" && line["span"]["request_id"] == *id
                    })
                    .collect()
            };
            let ended = |lines: &[serde_json::Value]| {
                lines.iter().any(|line| {
                    line["message"] == "generation failed" && line["outcome"] == outcome
                })
            };
            assert!(
                wait_until(Duration::from_secs(10), || ended(&generation_lines())),
                "{path}: no end of the generation under its span:\n{}",
                archiver.log()
            );
            let lines = generation_lines();
            for logged in &lines {
                let span = &logged["span"];
                assert_eq!(
                    (
                        span["repository"].as_str(),
                        span["commit"].as_str(),
                        span["format"].as_str(),
                    ),
                    (Some("acme/widget"), line["commit"].as_str(), Some(ext)),
                    "{logged}"
                );
                let key = span["key"].as_str().unwrap_or_default();
                assert!(
                    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{logged}"
                );
            }
            if outcome == "failed" {
                assert!(
                    lines
                        .iter()
                        .any(|logged| logged["message"] == "git archive failed"
                            && logged["stderr"] == STDERR
                            && logged["status"].as_str().is_some_and(|s| s.contains("128"))),
                    "{path}: git's exit status and stderr are not under the generation's span:\n{}",
                    archiver.log()
                );
            }
        }
        assert!(
            metric_after(&archiver, Duration::from_secs(10), |m| {
                m.sum(
                    "gitball_archiver_generations_total",
                    &[("outcome", outcome)],
                ) == 2.0
            }),
            "{code}: {:?}",
            archiver
                .metrics()
                .series_of("gitball_archiver_generations_total")
        );
    }
}

#[test]
fn generation_over_max_archive_bytes_is_killed_aborted_and_not_cached() {
    let big = big_repo();
    let archiver = Archiver::start(
        &big.repos,
        &[SLOW_ZSTD[0], SLOW_ZSTD[1], "--max-archive-bytes", "1MiB"],
    );
    let received = expect_aborted_download(&archiver, SLOW_PATH, "miss");
    assert!(
        received as u64 <= MIB,
        "{received} bytes sent of an archive limited to 1 MiB"
    );
    assert_generation_discarded(&archiver, SLOW_PATH, "tar.zst", "too_large", 1.0);
    assert_eq!(archiver.health_status(), Some(200));
}

/// An archive's bytes never change under its key, so one that grew past
/// `--max-archive-bytes` always will: once it has, every later request for
/// it (a `GET`, a `HEAD`, a `.sha256`) is `500 archive_too_large` at once,
/// with no generation and no crawler budget token. Before, each request
/// ran git and compressed up to the limit again (4 GiB by default) for a
/// 500 or an aborted 200, one token each: a client with one URL of a huge
/// archive made every archiver it reached do the most a generation may do,
/// over and over, and through a proxy a `.sha256` did it on every
/// candidate in turn (attack).
#[test]
fn an_archive_past_max_archive_bytes_is_refused_at_once_after_its_first_generation() {
    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &["--max-archive-bytes", "1MiB"]);
    // `X-Gitball-Cache: hit` on the refusals the archiver answers from
    // memory (for a proxy: no archive failed there now), `miss` on a
    // generation this request started that failed.
    let too_large = |method: &str, path: &str, known: bool| {
        let (head, body, _) = RawConnection::request(archiver.addr, method, path, &[]).unwrap();
        assert_eq!(head.status, 500, "{method} {path}");
        if method == "GET" {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"], "archive_too_large", "{method} {path}");
        }
        let cache = head.header("x-gitball-cache");
        let expected = if known { "hit" } else { "miss" };
        assert_eq!(cache, Some(expected), "{method} {path}");
    };
    // The first one runs git up to the limit.
    too_large("GET", "/acme/big/archive/main.tar.sha256", false);
    let generated = |archiver: &Archiver| {
        archiver.metrics().value(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "too_large")],
        )
    };
    assert_eq!(generated(&archiver), 1.0);
    // Every spelling of the same archive, every method: refused unrun.
    for _ in 0..3 {
        too_large("GET", "/acme/big/archive/main.tar", true);
        too_large("GET", "/acme/big/tar/heads/main", true);
        too_large("HEAD", "/acme/big/archive/main.tar", true);
        too_large("GET", "/acme/big/archive/main.tar.sha256", true);
    }
    let metrics = archiver.metrics();
    assert_eq!(
        generated(&archiver),
        1.0,
        "git ran again for a known answer"
    );
    assert_eq!(
        metrics.value("gitball_archiver_budget_taken_total", &[]),
        1.0,
        "a refusal took budget tokens"
    );
    // Another archive of the same commit is its own: its git runs.
    too_large(
        "GET",
        "/acme/big/archive/main.tar.sha256?path=part-00.bin",
        false,
    );
    assert_eq!(generated(&archiver), 2.0);
    assert_eq!(archiver.health_status(), Some(200));
}

/// A generation's bytes are counted as they reach the file, and a failed
/// one's as held for as long as the archiver keeps its unlinked file open:
/// at every moment the partial files it has open take no more than
/// `cache_bytes + cache_held_bytes` (within one write) (docs/archiver.md,
/// "Held bytes"). The tar.zst (of random bytes) at level 12 fails as too
/// large when its second zstd job's output, 4 MiB in one compressor call,
/// passes 1 MiB, after the head went out; its writer then keeps the file
/// open for over 100 ms in a debug build (an abandoned zstd stream is
/// dropped on a thread of its own once zstd's workers are done), so the
/// file is seen open in several polls. Attacks: the writer's handle was
/// not counted at all (at level 19 the tmpfs space was pinned for 1.3 s
/// while `held_bytes` said 0), then only what had been announced was: the
/// output of the call that failed (megabytes) was in neither gauge, and a
/// running generation's undercounted `cache_bytes` the same way.
#[test]
fn a_generations_bytes_count_while_they_take_space() {
    /// One `Sink` write: a write's bytes are counted just after it.
    const SLACK: u64 = 256 * 1024;
    let big = big_repo();
    let archiver = Archiver::start(
        &big.repos,
        &["--zstd-level", "12", "--max-archive-bytes", "1MiB"],
    );
    let counted = || {
        let metrics = archiver.metrics();
        metrics.value("gitball_archiver_cache_bytes", &[])
            + metrics.value("gitball_archiver_cache_held_bytes", &[])
    };
    let (mut connection, head) = open_download(&archiver, SLOW_PATH);
    assert_eq!(head.status, 200);
    let mut uncounted = Vec::new();
    let mut seen_open = 0;
    let mut seen_unlinked = 0;
    let settled = wait_until(Duration::from_secs(60), || {
        // Open before the scrapes and still open after them: open during
        // them. Of two scrapes the larger: one scrape reads the two gauges
        // one after the other, and the failure could move the bytes from
        // one to the other in between.
        let before = partial_files_open(archiver.pid, &archiver.cache_dir);
        let counted = counted().max(counted());
        let after = partial_files_open(archiver.pid, &archiver.cache_dir);
        let open: Vec<(u64, bool)> = before
            .iter()
            .filter(|(inode, _)| after.contains_key(inode))
            .map(|(_, &file)| file)
            .collect();
        let size: u64 = open.iter().map(|(size, _)| size).sum();
        if size > 0 {
            seen_open += 1;
        }
        if open.iter().any(|&(_, unlinked)| unlinked) {
            seen_unlinked += 1;
        }
        if size as f64 > counted + SLACK as f64 {
            uncounted.push((size, counted));
        }
        after.is_empty()
            && archiver.metrics().value(
                "gitball_archiver_generations_total",
                &[("format", "tar.zst"), ("outcome", "too_large")],
            ) == 1.0
    });
    eprintln!("the partial file was seen open {seen_open} times, {seen_unlinked} of them unlinked");
    assert!(settled, "the failed generation's file is still open");
    assert!(
        uncounted.is_empty(),
        "(bytes open, bytes counted) of the partial file, counted short: {uncounted:?}"
    );
    // Or the test proved nothing of a failed generation's file.
    assert!(seen_unlinked > 0, "the unlinked file was never seen open");
    assert!(
        wait_until(Duration::from_secs(10), || counted() == 0.0),
        "bytes stay counted after the file was let go"
    );
    let end = connection.read_body_to_end(|_| {});
    assert!(matches!(end, BodyEnd::Aborted(_)), "{end:?}");
    assert_generation_discarded(&archiver, SLOW_PATH, "tar.zst", "too_large", 1.0);
}

/// A generation that fails while a download waits on its client, which
/// takes nothing, ends that download at once: the bytes announced before
/// the failure are not sent on, and the unlinked partial file is let go,
/// not held until the client reads on or is cut for idleness
/// (docs/archiver.md, "Archive files are sent with `sendfile`").
#[test]
fn a_generation_failing_while_its_client_takes_nothing_ends_the_download_at_once() {
    let big = big_repo();
    // The tar.gz (of random bytes, stored: as large as the tar) grows past
    // the bound within seconds, far ahead of what the socket buffers of a
    // client that reads nothing take, which are full long before: the
    // body is waiting on the socket by then. (Such a client is cut for its
    // stalled writes only after 300 s.) Stored (level 0), not deflated at
    // the default level: the compressing threads run niced, and deflating
    // 32 MiB in a debug build beside a busy suite had not reached the
    // bound after 60 s.
    let archiver = Archiver::start(
        &big.repos,
        &["--max-archive-bytes", "32MiB", "--gzip-level", "0"],
    );
    let (mut connection, head) = open_download(&archiver, "/acme/big/archive/main.tar.gz");
    assert_eq!(head.status, 200);
    assert_generation_discarded(
        &archiver,
        "/acme/big/archive/main.tar.gz",
        "tar.gz",
        "too_large",
        1.0,
    );

    // The held bytes are given back just after the writer closes its
    // handle (`generate::Space::writing`), on the writer's thread, which
    // runs niced: on a loaded machine the gauge was read in between, with
    // every byte still held and no handle open (1 of 12 runs).
    let held = || {
        archiver
            .metrics()
            .value("gitball_archiver_cache_held_bytes", &[])
    };
    let ended = wait_until(Duration::from_secs(10), || {
        active_downloads(&archiver) == 0.0
            && deleted_files_open(archiver.pid, &archiver.cache_dir).is_empty()
            && held() == 0.0
    });
    assert!(
        ended,
        "the failed generation's download still runs ({} active) or holds {:?} ({} bytes held)",
        active_downloads(&archiver),
        deleted_files_open(archiver.pid, &archiver.cache_dir),
        held()
    );

    // What the socket buffers held arrives, then the abort.
    let mut received = 0;
    let end = connection.read_body_to_end(|piece| received += piece.len());
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "{end:?} after {received} bytes"
    );
    assert!(
        (received as u64) < 16 * MIB,
        "{received} bytes sent after a failure at 32 MiB to a client that read nothing"
    );
}

// ---------------------------------------------------------------------------
// 7. Restart

/// One sequential scenario: fill the cache, stop on SIGTERM, leave partial
/// files as a crash would, start again on the same cache dir.
#[test]
fn restart_keeps_the_cache_warm_and_deletes_partials() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let cache_dir = sandbox.path("cache");
    let paths = [
        "/acme/widget/archive/main.tar.gz",
        "/acme/widget/zip/v1.2.3",
    ];

    let mut first = Archiver::start_with_cache(&sandbox.repos(), &cache_dir, &[]);
    let bodies: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| {
            let response = first.get(path);
            assert_eq!(
                header(&response, "x-gitball-cache"),
                "miss",
                "{path} before the restart"
            );
            response.bytes().unwrap().to_vec()
        })
        .collect();
    let (status, took) = first.terminate(Duration::from_secs(10));
    let status = status.expect("the archiver exits on SIGTERM");
    assert!(status.success(), "exit status {status} after SIGTERM");
    eprintln!("restart: SIGTERM to exit {:.2} s", took.as_secs_f64());
    drop(first);

    // Leftovers of a crash: partial files of both name shapes.
    let partials = [
        format!("{}.{}.partial", "a".repeat(64), "0123456789abcdef"),
        "leftover.partial".to_owned(),
    ];
    for name in &partials {
        std::fs::write(cache_dir.join(name), b"half an archive").unwrap();
    }

    let second = Archiver::start_with_cache(&sandbox.repos(), &cache_dir, &[]);
    // The log says how many bytes were restored and how long the check
    // took (docs/archiver.md, "Warm restart"; mutation review: a line
    // without them passed every test).
    let opened = gitball_e2e::log_line(&second.log(), "cache opened");
    assert_eq!(
        opened["restored_bytes"],
        (bodies[0].len() + bodies[1].len()) as u64,
        "{opened}"
    );
    assert_eq!(opened["entries"], 2, "{opened}");
    assert!(opened["check_seconds"].as_f64().is_some(), "{opened}");
    let files = second.cache_files();
    for name in &partials {
        assert!(
            !files.contains(name),
            "{name} survived the start: {files:?}"
        );
    }
    let metrics = second.metrics();
    assert_eq!(
        metrics.value("gitball_archiver_cache_entries", &[]),
        2.0,
        "cache entries re-indexed at the start"
    );
    assert_eq!(
        metrics.value("gitball_archiver_cache_bytes", &[]),
        (bodies[0].len() + bodies[1].len()) as f64,
        "cache bytes re-indexed at the start"
    );
    for (path, body) in paths.iter().zip(&bodies) {
        let response = second.get(path);
        assert_eq!(
            header(&response, "x-gitball-cache"),
            "hit",
            "{path} after restart"
        );
        assert_eq!(
            header(&response, "content-length"),
            body.len().to_string(),
            "{path} after restart: Content-Length"
        );
        assert_bytes_eq(
            &response.bytes().unwrap(),
            body,
            &format!("{path} after restart"),
        );
    }
    assert_eq!(
        generations(&second),
        0.0,
        "the restarted archiver generated an archive it had"
    );
}

/// A cached file whose bytes were damaged while the archiver was stopped
/// (cut short, as a crash can leave a file on a disk-backed cache dir, or
/// altered in place) is not served after the restart, under its old
/// checksum: it is deleted at the start and the archive generated anew.
#[test]
fn a_restart_deletes_cached_files_whose_bytes_were_damaged() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let cache_dir = sandbox.path("cache");
    let paths = [
        "/acme/widget/archive/main.tar.gz",
        "/acme/widget/archive/v1.2.3.zip",
    ];
    let mut first = Archiver::start_with_cache(&sandbox.repos(), &cache_dir, &[]);
    let bodies: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| first.get(path).bytes().unwrap().to_vec())
        .collect();
    let files = first.cache_files();
    assert_eq!(files.len(), 2, "{files:?}");
    let (status, _) = first.terminate(Duration::from_secs(10));
    assert!(status.is_some_and(|status| status.success()));
    drop(first);

    // One cut short, one altered in place (its length unchanged).
    let cut = cache_dir.join(&files[0]);
    let length = std::fs::metadata(&cut).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    let altered = cache_dir.join(&files[1]);
    let mut bytes = std::fs::read(&altered).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&altered, &bytes).unwrap();

    let second = Archiver::start_with_cache(&sandbox.repos(), &cache_dir, &[]);
    assert_eq!(
        second.cache_files(),
        Vec::<String>::new(),
        "damaged files survived the start"
    );
    assert_eq!(
        second
            .metrics()
            .value("gitball_archiver_cache_entries", &[]),
        0.0
    );
    for (path, body) in paths.iter().zip(&bodies) {
        let response = second.get(path);
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "x-gitball-cache"), "miss", "{path}");
        assert_bytes_eq(
            &response.bytes().unwrap(),
            body,
            &format!("{path} after the restart"),
        );
        let checksum = second.get(&format!("{path}.sha256")).text().unwrap();
        assert!(
            checksum.starts_with(&sha256_hex(body)),
            "{path}: checksum {checksum}"
        );
    }
}

/// A cached file deleted behind the archiver's back is generated anew on
/// the next request, not answered `500` until a restart, and its bytes are
/// no longer counted.
#[test]
fn a_cached_file_deleted_behind_the_archivers_back_is_generated_anew() {
    // Deleted, cut short (review: attack; every hit was then aborted until a
    // restart), replaced by other bytes of the same length (served
    // cleanly as the indexed archive), or overwritten in place at the same
    // length (its inode and length kept: served as the indexed archive
    // until a restart checked it).
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 4] = [
        ("deleted", |file| std::fs::remove_file(file).unwrap()),
        ("cut short", |file| {
            let len = std::fs::metadata(file).unwrap().len();
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }),
        ("replaced", |file| {
            let len = std::fs::metadata(file).unwrap().len() as usize;
            let other = file.with_extension("other");
            std::fs::write(&other, pseudo_random_bytes(7, len)).unwrap();
            std::fs::rename(&other, file).unwrap();
        }),
        ("overwritten in place", |file| {
            use std::os::unix::fs::FileExt;
            gitball_e2e::past_the_clock_of(file);
            let len = std::fs::metadata(file).unwrap().len() as usize;
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .write_all_at(&pseudo_random_bytes(7, len), 0)
                .unwrap();
        }),
    ];
    for (damage, apply) in damages {
        let cached = LargeArchiveCached::new(11);
        let files = cached.archiver.cache_files();
        apply(&cached.file);
        cached.assert_generated_anew(&format!("the file was {damage}"));
        assert_eq!(cached.archiver.cache_files(), files, "{damage}");
    }
}

/// A cached file given another name beside its own (a backup's `cp -al`,
/// `rsync --link-dest`) is still the archive: a hit, not a regeneration
/// (`docs/archiver.md#warm-restart`). (Review: a hit compared the file's
/// ctime, which a new link moves, and the test fixtures' hard-linked warm
/// caches were generated anew.)
#[test]
fn a_cached_file_linked_elsewhere_is_still_a_hit() {
    let cached = LargeArchiveCached::new(12);
    gitball_e2e::past_the_clock_of(&cached.file);
    let backup = cached._sandbox.path("backup.tar");
    std::fs::hard_link(&cached.file, &backup).unwrap();
    let response = cached.archiver.get(LargeArchiveCached::PATH);
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-gitball-cache"), "hit");
    assert_bytes_eq(&response.bytes().unwrap(), &cached.body, "after a link");
}

/// An archiver whose cache holds one archive of `/acme/large` (300 KiB of
/// bytes made from `seed`): larger than one shared block (128 KiB), which
/// a hit serves from memory without opening its file (an archive within
/// one is served again from memory when the first download read it under
/// its final name, on a loaded machine where the generation ended first,
/// and damage to its file is then noticed only once that block leaves
/// memory).
struct LargeArchiveCached {
    _sandbox: Sandbox,
    archiver: Archiver,
    /// Its bytes, as the first download got them.
    body: Vec<u8>,
    /// Its file in the cache.
    file: PathBuf,
}

impl LargeArchiveCached {
    const PATH: &'static str = "/acme/large/archive/main.tar";

    fn new(seed: u64) -> LargeArchiveCached {
        let sandbox = Sandbox::new();
        let repo = sandbox.repo("acme", "large");
        repo.write("data.bin", pseudo_random_bytes(seed, 300 * 1024));
        let commit = repo.commit_all(T1, "large");
        let archiver = Archiver::start(&sandbox.repos(), &[]);
        let body = archiver.get(Self::PATH).bytes().unwrap().to_vec();
        assert_bytes_eq(
            &body,
            &repo.archive("tar", "large-main/", &commit, None),
            "the first download",
        );
        let files = archiver.cache_files();
        assert_eq!(files.len(), 1, "{files:?}");
        let file = archiver.cache_dir.join(&files[0]);
        LargeArchiveCached {
            _sandbox: sandbox,
            archiver,
            body,
            file,
        }
    }

    /// After `what` happened to its file: the next request generates it
    /// anew and the one after is a hit, both with the same bytes, and the
    /// cache counts one archive of its length.
    fn assert_generated_anew(&self, what: &str) {
        for expected_cache in ["miss", "hit"] {
            let response = self.archiver.get(Self::PATH);
            assert_eq!(response.status(), 200, "after {what}");
            assert_eq!(
                header(&response, "x-gitball-cache"),
                expected_cache,
                "{what}"
            );
            assert_bytes_eq(&response.bytes().unwrap(), &self.body, what);
        }
        let metrics = self.archiver.metrics();
        assert_eq!(metrics.value("gitball_archiver_cache_entries", &[]), 1.0);
        assert_eq!(
            metrics.value("gitball_archiver_cache_bytes", &[]),
            self.body.len() as f64,
            "{what}"
        );
    }
}

/// A cached file deleted behind the archiver's back that no request asks
/// for again leaves `gitball_archiver_cache_bytes` within a sweep
/// (`docs/archiver.md#warm-restart`). (Review: its bytes were counted
/// until it was next requested, for good if it never was, and room was
/// made for them by evicting archives that were there.)
#[test]
fn a_cached_file_deleted_and_never_asked_for_again_leaves_the_cache_bytes() {
    let cached = LargeArchiveCached::new(15);
    let (archiver, body) = (&cached.archiver, &cached.body);
    let bytes = || {
        let metrics = archiver.metrics();
        (
            metrics.value("gitball_archiver_cache_bytes", &[]),
            metrics.value("gitball_archiver_cache_entries", &[]),
            metrics.value("gitball_archiver_cache_held_bytes", &[]),
        )
    };
    assert_eq!(bytes(), (body.len() as f64, 1.0, 0.0));
    std::fs::remove_file(&cached.file).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || bytes() == (0.0, 0.0, 0.0)),
        "cache bytes, entries and held bytes 15 s after the file was deleted: {:?}",
        bytes()
    );
}

/// Something that is not a regular file put at a cached archive's name
/// while the archiver runs (an outsider, a tool gone wrong) is noticed by
/// the next request, forgotten and the archive generated anew, never a
/// `500` until a restart (`docs/archiver.md#warm-restart`). Attack: a
/// directory there failed the rename of every generation of the key, each
/// a `500`; a fifo blocked a serving thread in `open` until a writer came;
/// a socket was a `500` until a restart. A directory is removed if empty,
/// else moved aside, what is in it untouched.
#[test]
fn a_non_file_planted_at_a_cached_files_name_is_generated_anew() {
    type Plant = (&'static str, fn(&Path));
    let plants: [Plant; 5] = [
        ("a directory with a file in it", |file| {
            std::fs::create_dir(file).unwrap();
            std::fs::write(file.join("inside"), b"not the cache's").unwrap();
        }),
        ("an empty directory", |file| {
            std::fs::create_dir(file).unwrap()
        }),
        ("a symlink to a copy of its bytes", |file| {
            let copy = file.with_file_name("copy");
            std::fs::copy(file.with_extension("was"), &copy).unwrap();
            std::os::unix::fs::symlink(&copy, file).unwrap();
        }),
        ("a socket", |file| {
            // Bound at a short path (a socket's is at most 108 bytes), then
            // moved to the archive's name.
            let short = file.parent().unwrap().with_file_name("socket");
            drop(std::os::unix::net::UnixListener::bind(&short).unwrap());
            std::fs::rename(&short, file).unwrap();
        }),
        ("a fifo", |file| {
            nix::unistd::mkfifo(file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        }),
    ];
    for (plant, apply) in plants {
        let cached = LargeArchiveCached::new(14);
        let (archiver, file) = (&cached.archiver, &cached.file);
        // Kept beside it under another name (no archive's), for the symlink
        // to lead to a copy.
        std::fs::rename(file, file.with_extension("was")).unwrap();
        apply(file);
        cached.assert_generated_anew(&format!("{plant} was put there"));
        assert!(
            std::fs::symlink_metadata(file).unwrap().is_file(),
            "{plant}: the archive's name is a file again"
        );
        if plant == "a directory with a file in it" {
            let aside: Vec<String> = archiver
                .cache_files()
                .into_iter()
                .filter(|name| name.ends_with(".aside"))
                .collect();
            assert_eq!(aside.len(), 1, "{:?}", archiver.cache_files());
            assert_eq!(
                std::fs::read(archiver.cache_dir.join(&aside[0]).join("inside")).unwrap(),
                b"not the cache's",
                "what was in the directory is left as it was"
            );
        }
    }
}

/// A partial file cut short behind the archiver's back while its
/// generation runs is never cached: the generation fails, its downloads are
/// aborted, and the next request generates git's bytes anew
/// (`docs/archiver.md#partial-files-and-rename`). Attack: the writer wrote
/// on at its own offset, the cut left a hole of zeros at the file's head,
/// and the file was renamed and indexed under the SHA-256 of git's bytes:
/// every hit then served 100 KiB of zeros as a complete archive, with a
/// clean end, until a restart's check deleted it.
#[test]
fn a_partial_file_cut_short_while_generating_is_never_cached() {
    a_partial_file_damaged_while_generating_is_never_cached("cut short", |file, _| {
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_len(0)
            .unwrap();
    });
}

/// As [`a_partial_file_cut_short_while_generating_is_never_cached`], for a
/// partial file replaced (another file of the archive's length renamed
/// over its name). Attack: the generation renamed that file in its stead,
/// and every hit served its bytes as the archive, under the archive's
/// `Repr-Digest`; a complete file replaced so was already noticed.
#[test]
fn a_partial_file_replaced_while_generating_is_never_cached() {
    a_partial_file_damaged_while_generating_is_never_cached("replaced", |file, len| {
        let other = file.with_extension("planted");
        std::fs::write(&other, pseudo_random_bytes(13, len)).unwrap();
        std::fs::rename(&other, file).unwrap();
    });
}

/// A tar's partial file damaged by `apply` (given its path and the
/// archive's length) once git wrote its first 100 KiB.
fn a_partial_file_damaged_while_generating_is_never_cached(
    damage: &str,
    apply: impl FnOnce(&Path, usize),
) {
    const FIRST: u64 = 100 * 1024;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "large");
    repo.write("data.bin", pseudo_random_bytes(12, 300 * 1024));
    let commit = repo.commit_all(T1, "large");
    let expected = repo.archive("tar", "large-main/", &commit, None);
    let (stub, mut release) = sandbox.git_that_pauses("git-that-waits", FIRST);
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);
    let path = "/acme/large/archive/main.tar";
    let (mut first, head) = open_download(&archiver, path);
    assert_eq!(head.status, 200);
    let partial = || {
        archiver
            .cache_files()
            .into_iter()
            .find(|name| name.ends_with(".partial"))
            .map(|name| archiver.cache_dir.join(name))
    };
    let written = || partial().and_then(|path| std::fs::metadata(path).ok().map(|m| m.len()));
    assert!(
        wait_until(Duration::from_secs(10), || written() == Some(FIRST)),
        "the partial file did not reach {FIRST} bytes: {:?}",
        written()
    );
    // An outsider damages it; git then writes the rest.
    apply(&partial().unwrap(), expected.len());
    // One line for this run of the stub, one for a generation anew.
    std::io::Write::write_all(&mut release, b"go\ngo\n").unwrap();

    let mut body = Vec::new();
    match first.read_body_to_end(|piece| body.extend_from_slice(piece)) {
        BodyEnd::Aborted(_) => {}
        BodyEnd::Complete => assert_bytes_eq(
            &body,
            &expected,
            &format!("{damage}: a download ended cleanly"),
        ),
    }
    // The download may end (a short read) before the generation does.
    assert!(
        wait_until(Duration::from_secs(10), || partial().is_none()),
        "{damage}: the generation did not end"
    );
    for round in ["after the damage", "again"] {
        let response = archiver.get(path);
        assert_eq!(response.status(), 200, "{damage}, {round}");
        assert_bytes_eq(
            &response.bytes().unwrap(),
            &expected,
            &format!("{damage}, {round}"),
        );
    }
    // The damaged generation counts as `failed`
    // (`docs/observability.md#label-values`), the one anew as `ok`.
    let metrics = archiver.metrics();
    for outcome in ["failed", "ok"] {
        assert_eq!(
            metrics.value(
                "gitball_archiver_generations_total",
                &[("format", "tar"), ("outcome", outcome)]
            ),
            1.0,
            "{damage}, {outcome}: {:?}",
            metrics.series_of("gitball_archiver_generations_total")
        );
    }
}

/// The shadow git dirs in the cache dir (`shadows-*`) removed while the
/// archiver runs (a tmp cleaner, by hand) are made again for the next
/// generation (`docs/archiver.md#no-command-from-the-repository`). Attack:
/// git failed in the shadow it had kept for the repository, and no new one
/// could be made, so every cold request was a `500` until a restart, with
/// `/healthz` ok.
#[test]
fn shadow_git_dirs_removed_while_running_are_made_again() {
    let sandbox = Sandbox::new();
    let w = widget(&sandbox);
    let (blobs_repo, blob_commits) = blobs(&sandbox, 1);
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let get = |path: &str| archiver.get(path);
    let first = get(&format!("/acme/widget/archive/{}.tar", w.c1));
    assert_eq!(first.status(), 200);
    first.bytes().unwrap();
    let mut removed = 0;
    for entry in std::fs::read_dir(&archiver.cache_dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("shadows-") {
            std::fs::remove_dir_all(entry.path()).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "one shadows dir");

    // The repository whose shadow was kept, and one without a shadow yet.
    let cases = [
        (
            format!("/acme/widget/archive/{}.tar", w.c2),
            w.repo
                .archive("tar", &format!("widget-{}/", w.c2), &w.c2, None),
        ),
        (
            format!("/acme/blobs/archive/{}.tar", blob_commits[0]),
            blobs_repo.archive(
                "tar",
                &format!("blobs-{}/", blob_commits[0]),
                &blob_commits[0],
                None,
            ),
        ),
    ];
    for (path, expected) in cases {
        let response = get(&path);
        assert_eq!(response.status(), 200, "{path}: {}", archiver.log());
        assert_bytes_eq(&response.bytes().unwrap(), &expected, &path);
    }
}

/// A tmp cleaner removes old empty directories, and a shared shadow's
/// `refs` is one (it holds no ref; git only checks that it is there, which
/// does not update its atime), while the files in it, read by every
/// generation, stay. git then takes the shadow for no git dir at all:
/// the shadow is made again, as one removed whole is (review: only its
/// files were checked, and every generation of the repository was a `500`
/// until a restart).
#[test]
fn a_shadow_git_dir_whose_empty_refs_dir_was_removed_is_made_again() {
    let sandbox = Sandbox::new();
    let w = widget(&sandbox);
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let first = archiver.get(&format!("/acme/widget/archive/{}.tar", w.c1));
    assert_eq!(first.status(), 200);
    first.bytes().unwrap();
    let mut removed = 0;
    for shadows in std::fs::read_dir(&archiver.cache_dir).unwrap() {
        let shadows = shadows.unwrap();
        if !shadows
            .file_name()
            .to_string_lossy()
            .starts_with("shadows-")
        {
            continue;
        }
        for shadow in std::fs::read_dir(shadows.path()).unwrap() {
            std::fs::remove_dir(shadow.unwrap().path().join("refs")).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "one shared shadow");

    let path = format!("/acme/widget/archive/{}.tar", w.c2);
    let response = archiver.get(&path);
    assert_eq!(response.status(), 200, "{path}: {}", archiver.log());
    let expected = w
        .repo
        .archive("tar", &format!("widget-{}/", w.c2), &w.c2, None);
    assert_bytes_eq(&response.bytes().unwrap(), &expected, &path);
}

/// `docs/archiver.md`, "Warm restart": a cache dir removed while the
/// archiver runs, or removed and made again (no longer the directory it
/// locked), fails `/healthz` (on `--listen` and on the admin listener)
/// until a restart, which locks what the path names now (attack: every
/// request was a `500` and `/healthz` said ok).
#[test]
fn a_cache_dir_removed_while_running_fails_healthz_until_a_restart() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    repo.write("README", "hello\n");
    repo.commit_all(T1, "one");
    let cache_dir = sandbox.path("cache");
    let archiver = Archiver::start_with_cache(
        &sandbox.repos(),
        &cache_dir,
        &["--admin-listen", "127.0.0.1:0"],
    );
    let admin = gitball_e2e::listen_address(&archiver.log(), "admin listener serving")
        .expect("the admin listener's address");
    let assert_serves = |archiver: &Archiver| {
        assert_eq!(archiver.get("/healthz").status().as_u16(), 200);
        let archive = archiver.get("/acme/widget/archive/main.tar");
        assert_eq!(archive.status().as_u16(), 200);
        // Read to its end: the generation is over before the directory
        // moves (one still running there would be joined by the request
        // below, a `200`, and fail at its rename).
        archive.bytes().expect("the archive's body");
    };
    assert_serves(&archiver);
    // Read again, a hit: a small archive's bytes are then kept in memory
    // and may be served from there once its file is gone (they are still
    // the archive's bytes), so what the lost directory must refuse is
    // checked with an archive never generated (CI: a miss that found its
    // generation complete had put them in memory, and the `500` below
    // for it was a `200`).
    assert_serves(&archiver);

    // Moved away in one step, then removed: the archiver may still be
    // writing in it (a `remove_dir_all` racing it can fail), and what
    // matters to it is that the path no longer names the directory.
    let gone = sandbox.path("cache-gone");
    std::fs::rename(&archiver.cache_dir, &gone).expect("move the cache dir away");
    let _ = std::fs::remove_dir_all(&gone);
    for (what, made_again) in [("removed", false), ("made again", true)] {
        if made_again {
            std::fs::create_dir(&archiver.cache_dir).expect("make it again");
        }
        for addr in [archiver.addr, admin] {
            let (head, body, _) =
                RawConnection::request(addr, "GET", "/healthz", &[]).expect("/healthz");
            assert_eq!(
                head.status,
                503,
                "{what}: {}",
                String::from_utf8_lossy(&body)
            );
            let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(json["error"], "unavailable", "{what}");
        }
    }
    // Nothing is generated into the directory made again, which no lock
    // guards (review: once shadows were made again when found gone, it
    // was).
    let archive = archiver.get("/acme/widget/archive/main.tar.gz");
    assert_eq!(
        archive.status().as_u16(),
        500,
        "generated in a dir made again"
    );
    assert_eq!(
        gitball_e2e::dir_file_names(&archiver.cache_dir),
        Vec::<String>::new(),
        "written in a dir made again"
    );
    // Counted as a generation `failed` (`docs/observability.md#label-values`).
    assert_eq!(
        archiver.metrics().value(
            "gitball_archiver_generations_total",
            &[("format", "tar.gz"), ("outcome", "failed")]
        ),
        1.0
    );
    assert!(
        archiver
            .log()
            .contains("the cache dir was removed or replaced while the archiver ran"),
        "{}",
        archiver.log()
    );

    drop(archiver);
    assert_serves(&Archiver::start_with_cache(
        &sandbox.repos(),
        &cache_dir,
        &[],
    ));
}

/// `docs/archiver.md`, "Warm restart": a hit opens its file in the
/// directory the archiver locked, by its fd, not by the cache dir's path.
/// Moved away and replaced by another directory holding a file of the same
/// name and length, the cache dir's archive is still served, from the
/// directory locked, and what the path names now is neither served nor
/// touched. (Review: opened by its path, the hit found the replacement,
/// which only its inode told apart from the archive.)
#[test]
fn a_hit_in_a_cache_dir_moved_and_replaced_is_served_from_the_dir_locked() {
    let cached = LargeArchiveCached::new(16);
    let (archiver, file) = (&cached.archiver, &cached.file);
    let name = file.file_name().unwrap();
    let moved = archiver.cache_dir.with_file_name("cache-moved");
    std::fs::rename(&archiver.cache_dir, &moved).unwrap();
    std::fs::create_dir(&archiver.cache_dir).unwrap();
    let planted = pseudo_random_bytes(7, cached.body.len());
    std::fs::write(archiver.cache_dir.join(name), &planted).unwrap();

    let response = archiver.get(LargeArchiveCached::PATH);
    assert_eq!(response.status(), 200, "a hit in the dir locked");
    assert_eq!(header(&response, "x-gitball-cache"), "hit");
    assert_bytes_eq(
        &response.bytes().unwrap(),
        &cached.body,
        "a hit in the dir locked",
    );
    assert_eq!(
        std::fs::read(archiver.cache_dir.join(name)).unwrap(),
        planted,
        "what the path names now is left as it is"
    );
    assert_eq!(
        gitball_e2e::dir_file_names(&archiver.cache_dir),
        vec![name.to_str().unwrap().to_owned()],
        "nothing else is written where the path names now"
    );
}

/// `docs/archiver.md#held-bytes`: a cache dir on a filesystem smaller than
/// `--cache-max-bytes` is said at start (the cache then keeps less than
/// its bound, and generations fail when readers pin what it evicts:
/// review, attack); one that fits is not.
#[test]
fn a_cache_filesystem_smaller_than_the_bound_is_warned_of_at_start() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    const WARNING: &str = "the cache directory's filesystem is smaller than --cache-max-bytes";
    let too_large = Archiver::start(&sandbox.repos(), &["--cache-max-bytes", "1048576TiB"]);
    assert!(too_large.log().contains(WARNING), "{}", too_large.log());
    let fits = Archiver::start(&sandbox.repos(), &["--cache-max-bytes", "1MiB"]);
    assert!(!fits.log().contains(WARNING), "{}", fits.log());
}

/// `docs/observability.md`: the size of the cache dir's filesystem and its
/// free bytes are exported, and follow what is written there within the
/// archiver's sweep (every 5 s). On a real 4 MiB tmpfs under a bound of
/// 64 MiB: the case where `cache_bytes / cache_max_bytes` tells nothing of
/// a full filesystem, and the cache-full alerts, which read only those,
/// stayed quiet (`ops/prometheus`).
#[test]
fn the_cache_filesystems_size_and_free_bytes_are_exported() {
    if !can_mount_a_tmpfs("the_cache_filesystems_size_and_free_bytes_are_exported") {
        return;
    }
    let sandbox = Sandbox::new();
    let (_, commits) = blobs(&sandbox, 1);
    let (_mount, archiver, cache) = archiver_on_a_tmpfs(&sandbox, "4m");
    let size = |m: &Metrics| m.get("gitball_archiver_cache_filesystem_size_bytes", &[]);
    let free = |m: &Metrics| m.get("gitball_archiver_cache_filesystem_free_bytes", &[]);
    let free_now = || {
        let filesystem = nix::sys::statvfs::statvfs(&cache).expect("statvfs");
        (filesystem.blocks_available() * filesystem.fragment_size()) as f64
    };
    let start = archiver.metrics();
    assert_eq!(size(&start), Some((4 * MIB) as f64), "the size at start-up");
    assert!(
        free(&start).is_some_and(|free| free > 0.0),
        "the free bytes at start-up: {:?}",
        free(&start)
    );

    let response = archiver.get(&format!("/acme/blobs/archive/{}.tar", commits[0]));
    assert_eq!(response.status().as_u16(), 200);
    let archive = response.bytes().expect("the archive").len() as f64;
    assert!(
        metric_after(&archiver, Duration::from_secs(15), |m| {
            m.value("gitball_archiver_cache_entries", &[]) == 1.0
        }),
        "the archive is not cached"
    );
    // Nothing else writes there now: within a sweep the gauge reads what
    // statvfs does, the archive's bytes taken.
    assert!(
        metric_after(&archiver, Duration::from_secs(15), |m| {
            free(m) == Some(free_now())
        }),
        "free bytes {:?}, statvfs {}",
        free(&archiver.metrics()),
        free_now()
    );
    assert!(
        free_now() <= (4 * MIB) as f64 - archive,
        "the archive of {archive} bytes is not on the tmpfs: {} free",
        free_now()
    );
}

/// Whether this test can mount a tmpfs (it runs as root). In CI it must;
/// elsewhere a test that cannot says it was skipped.
fn can_mount_a_tmpfs(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test mounts a tmpfs and must run in CI"
    );
    eprintln!("SKIPPED {test}: not root");
    false
}

/// An archiver whose cache dir is a tmpfs of `size` (as `mount(8)` reads
/// it), under a `--cache-max-bytes` of 64 MiB, far above it: its mount,
/// the archiver and the cache dir (bound in that order, the archiver stops
/// before the mount goes).
fn archiver_on_a_tmpfs(
    sandbox: &Sandbox,
    size: &str,
) -> (gitball_e2e::netns::TmpfsMount, Archiver, PathBuf) {
    let cache = sandbox.path("cache");
    let mount = gitball_e2e::netns::TmpfsMount::mount(&cache, size);
    let archiver =
        Archiver::start_with_cache(&sandbox.repos(), &cache, &["--cache-max-bytes", "64MiB"]);
    (mount, archiver, cache)
}

/// `acme/blobs` with `n` commits, each of a new 700 KiB random blob.
fn blobs(sandbox: &Sandbox, n: u64) -> (RepoBuilder, Vec<String>) {
    let repo = sandbox.repo("acme", "blobs");
    let commits = (0..n)
        .map(|round| {
            repo.write("blob.bin", pseudo_random_bytes(round, 700 * 1024));
            repo.commit_all(1_700_000_000 + round as i64, "a blob")
        })
        .collect();
    (repo, commits)
}

/// A cache file system fuller than the cache knows (smaller than
/// `--cache-max-bytes`, or filled by something else) is made room on as
/// the bound is: a generation that finds it full evicts archives and goes
/// on. Before, the generation failed with ENOSPC and its download was
/// aborted, while the cache, under its bound, evicted nothing: every
/// archive that did not fit in what was left failed for good.
#[test]
fn a_full_cache_filesystem_is_made_room_on_by_evicting() {
    if !can_mount_a_tmpfs("a_full_cache_filesystem_is_made_room_on_by_evicting") {
        return;
    }
    let sandbox = Sandbox::new();
    let (repo, commits) = blobs(&sandbox, 5);
    // Room for two of the archives, not three.
    let (_mount, archiver, _) = archiver_on_a_tmpfs(&sandbox, "2m");
    for commit in &commits {
        let response = archiver.get(&format!("/acme/blobs/archive/{commit}.tar"));
        assert_eq!(response.status().as_u16(), 200, "{commit}");
        let body = response
            .bytes()
            .unwrap_or_else(|error| panic!("the download of {commit} was cut: {error}"));
        let expected = repo.archive("tar", &format!("blobs-{commit}/"), commit, None);
        assert!(body[..] == expected[..], "{commit}: not git's bytes");
    }
    let evictions = archiver
        .metrics()
        .value("gitball_archiver_cache_evictions_total", &[]);
    assert!(evictions >= 3.0, "{evictions} evictions");
    assert!(
        archiver.log().contains("the cache's file system is full"),
        "{}",
        archiver.log()
    );
}

/// A tmpfs of 1,000 inodes holding a cache of `archives` tars of one
/// repository's commits (one commit more, not requested), each cached.
struct InodeLimitedCache {
    sandbox: Sandbox,
    repo: RepoBuilder,
    commits: Vec<String>,
    filesystem: PathBuf,
    cache: PathBuf,
    /// Serving the cache; `None` once stopped.
    archiver: Option<Archiver>,
    _mount: gitball_e2e::netns::TmpfsMount,
}

impl InodeLimitedCache {
    const INODES: usize = 1000;

    fn new(archives: usize) -> InodeLimitedCache {
        let sandbox = Sandbox::new();
        let repo = sandbox.repo("acme", "many");
        let commits: Vec<String> = (0..=archives)
            .map(|n| {
                repo.write("n.txt", format!("{n}\n"));
                repo.commit_all(T1 + n as i64, "one more")
            })
            .collect();
        let filesystem = sandbox.path("fs");
        // Inodes enough for git's canary at start, and few enough to fill.
        let mount = gitball_e2e::netns::TmpfsMount::mount_with_inodes(
            &filesystem,
            "64m",
            Self::INODES as u64,
        );
        let cache = filesystem.join("cache");
        let archiver = Self::start(&sandbox, &cache);
        for commit in &commits[..archives] {
            let response = archiver.get(&format!("/acme/many/archive/{commit}.tar"));
            assert_eq!(response.status().as_u16(), 200, "{commit}");
            response.bytes().expect("a whole archive");
        }
        let entries = || {
            archiver
                .metrics()
                .value("gitball_archiver_cache_entries", &[])
        };
        assert!(
            wait_until(Duration::from_secs(10), || entries() == archives as f64),
            "{} entries",
            entries()
        );
        InodeLimitedCache {
            sandbox,
            repo,
            commits,
            filesystem,
            cache,
            archiver: Some(archiver),
            _mount: mount,
        }
    }

    fn start(sandbox: &Sandbox, cache: &Path) -> Archiver {
        Archiver::start_with_cache(&sandbox.repos(), cache, &["--cache-max-bytes", "32MiB"])
    }

    /// Something else takes every free inode, and then gives `left_free`
    /// of them back.
    fn fill(&self, left_free: usize) {
        let filler = self.filesystem.join("filler");
        std::fs::create_dir(&filler).unwrap();
        let taken = (0..Self::INODES)
            .find(|n| std::fs::File::create(filler.join(n.to_string())).is_err())
            .expect("every inode taken on a file system of 1,000");
        assert!(taken > left_free, "{taken} inodes were free");
        for n in 0..left_free {
            std::fs::remove_file(filler.join(n.to_string())).unwrap();
        }
    }

    /// `archiver`'s tar of `commit` is git's, byte for byte.
    fn assert_served(&self, archiver: &Archiver, commit: &str) {
        let response = archiver.get(&format!("/acme/many/archive/{commit}.tar"));
        assert_eq!(response.status().as_u16(), 200, "{}", archiver.log());
        let expected = self
            .repo
            .archive("tar", &format!("many-{commit}/"), commit, None);
        assert_bytes_eq(&response.bytes().unwrap(), &expected, commit);
    }
}

/// A cache file system out of inodes (a tmpfs's `nr_inodes`, filled by
/// something else or by many small archives) is made room on as one out
/// of bytes is (`docs/archiver.md#held-bytes`): the create of a partial
/// file that fails with `ENOSPC` evicts an archive and is tried again, one
/// archive for its one inode. Attack: every cold request was a `500
/// generation_failed`, with archives left to evict and none evicted;
/// review: then 64 KiB of them, a git dir's room, seven 10 KiB archives.
#[test]
fn a_cache_filesystem_out_of_inodes_is_made_room_on_by_evicting() {
    if !can_mount_a_tmpfs("a_cache_filesystem_out_of_inodes_is_made_room_on_by_evicting") {
        return;
    }
    const ARCHIVES: usize = 10;
    let cache = InodeLimitedCache::new(ARCHIVES);
    let archiver = cache.archiver.as_ref().expect("serving");
    cache.fill(0);
    cache.assert_served(archiver, &cache.commits[ARCHIVES]);
    let evictions = archiver
        .metrics()
        .value("gitball_archiver_cache_evictions_total", &[]);
    assert_eq!(evictions, 1.0, "one archive for one inode");
}

/// An archiver restarted on a cache file system out of inodes evicts
/// archives until git's canary has inodes to be made in, as it does for
/// bytes (`docs/archiver.md#held-bytes`). Attack: with 60 archives left to
/// evict, the canary failed (`cannot archive a canary tree`) and the
/// archiver exited at start, until someone deleted files.
#[test]
fn a_cache_filesystem_out_of_inodes_is_made_room_on_for_the_canary() {
    if !can_mount_a_tmpfs("a_cache_filesystem_out_of_inodes_is_made_room_on_for_the_canary") {
        return;
    }
    const ARCHIVES: usize = 60;
    // Fewer than git's canary repository takes (73 with git 2.47).
    const LEFT_FREE: usize = 40;
    let mut cache = InodeLimitedCache::new(ARCHIVES);
    drop(cache.archiver.take());
    cache.fill(LEFT_FREE);
    let restarted = InodeLimitedCache::start(&cache.sandbox, &cache.cache);
    assert!(
        restarted
            .log()
            .contains("the cache's file system has no room for git's canary"),
        "{}",
        restarted.log()
    );
    cache.assert_served(&restarted, &cache.commits[0]);
}

/// A full cache file system whose archives the policy keeps (requested
/// more often than the new one) denies the generation room as the bound
/// does (`docs/observability.md`): counted in
/// `gitball_archiver_cache_admission_rejections_total` and as a
/// `too_large` generation, its download aborted. Attack: it was counted a
/// `failed` generation and no rejection.
#[test]
fn a_full_cache_filesystem_denies_room_as_the_bound_does() {
    if !can_mount_a_tmpfs("a_full_cache_filesystem_denies_room_as_the_bound_does") {
        return;
    }
    let sandbox = Sandbox::new();
    let (_, commits) = blobs(&sandbox, 3);
    // Room for two of the archives, not three.
    let (_mount, archiver, _) = archiver_on_a_tmpfs(&sandbox, "2m");
    // The first two, requested three times each.
    for commit in &commits[..2] {
        for _ in 0..3 {
            let path = format!("/acme/blobs/archive/{commit}.tar");
            let response = archiver.get(&path);
            assert_eq!(response.status().as_u16(), 200, "{commit}");
            response.bytes().expect("a whole archive");
        }
    }
    let path = format!("/acme/blobs/archive/{}.tar", commits[2]);
    // Denied once its first bytes are out (aborted), or before (a 500).
    let response = archiver.get(&path);
    match response.status().as_u16() {
        200 => assert!(response.bytes().is_err(), "a denied download ended cleanly"),
        500 => assert!(response.text().unwrap().contains("archive_too_large")),
        status => panic!("a denied download answered {status}"),
    }
    let metrics = archiver.metrics();
    assert_eq!(
        metrics.value("gitball_archiver_cache_admission_rejections_total", &[]),
        1.0
    );
    assert_eq!(
        metrics.value(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "too_large")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum(
            "gitball_archiver_generations_total",
            &[("outcome", "failed")]
        ),
        0.0
    );
    // The archives kept are still served.
    let kept = format!("/acme/blobs/archive/{}.tar", commits[0]);
    assert_eq!(archiver.get(&kept).status().as_u16(), 200);
}

/// A full cache file system makes room for the git dirs a generation
/// writes beside the archives (a repository's first shadow, a snapshot of
/// refs) and for git's canary at start, as it does for archives
/// (`docs/archiver.md#held-bytes`). Attack: a generation that needed a new
/// git dir failed with `500` and evicted nothing, and a restart on a full
/// file system failed its canary and exited, until someone deleted files.
#[test]
fn a_full_cache_filesystem_makes_room_for_git_dirs_and_the_canary() {
    if !can_mount_a_tmpfs("a_full_cache_filesystem_makes_room_for_git_dirs_and_the_canary") {
        return;
    }
    let sandbox = Sandbox::new();
    let (_, commits) = blobs(&sandbox, 2);
    let w = widget(&sandbox);
    let filesystem = sandbox.path("fs");
    let _mount = gitball_e2e::netns::TmpfsMount::mount(&filesystem, "4m");
    let cache = filesystem.join("cache");
    // Something else takes every free byte of the file system.
    let fill = || {
        let mut filler = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(filesystem.join("filler"))
            .expect("open the filler");
        let block = vec![0u8; 4096];
        for _ in 0..1024 {
            if std::io::Write::write_all(&mut filler, &block).is_err() {
                return;
            }
        }
        panic!("4 MiB written and the 4 MiB file system is not full");
    };

    let archiver =
        Archiver::start_with_cache(&sandbox.repos(), &cache, &["--cache-max-bytes", "64MiB"]);
    for commit in &commits {
        let path = format!("/acme/blobs/archive/{commit}.tar");
        let response = archiver.get(&path);
        assert_eq!(response.status().as_u16(), 200, "{commit}");
        response.bytes().expect("a whole archive");
    }
    // Both in the cache before anything else fills the file system (a
    // generation still writing would evict the other one; review).
    let entries = || {
        archiver
            .metrics()
            .value("gitball_archiver_cache_entries", &[])
    };
    assert!(
        wait_until(Duration::from_secs(10), || entries() == 2.0),
        "{} entries",
        entries()
    );
    fill();
    // A repository not generated from yet: its shadow is written first.
    let response = archiver.get("/acme/widget/archive/main.tar");
    assert_eq!(response.status().as_u16(), 200, "{}", archiver.log());
    let expected = w.repo.archive("tar", "widget-main/", &w.c2, None);
    assert!(
        response.bytes().unwrap()[..] == expected[..],
        "not git's bytes"
    );
    let evictions = archiver
        .metrics()
        .value("gitball_archiver_cache_evictions_total", &[]);
    assert!(evictions >= 1.0, "{evictions} evictions");
    // A blob archive is left for the canary to evict.
    assert!(entries() >= 2.0, "{} entries", entries());
    drop(archiver);

    // Full again, and the archiver restarts over the archives left.
    fill();
    let restarted =
        Archiver::start_with_cache(&sandbox.repos(), &cache, &["--cache-max-bytes", "64MiB"]);
    assert!(
        restarted
            .log()
            .contains("the cache's file system has no room for git's canary"),
        "{}",
        restarted.log()
    );
    let path = format!("/acme/blobs/archive/{}.tar", commits[0]);
    assert_eq!(restarted.get(&path).status().as_u16(), 200);
}

/// One archiver per cache dir: a second one given the same dir refuses to
/// start (it would delete the first one's partials and evict its files
/// from under it), and the first one serves on.
#[test]
fn a_second_archiver_on_a_cache_dir_in_use_refuses_to_start() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let first = Archiver::start(&sandbox.repos(), &[]);
    let mut second = std::process::Command::new(gitball_e2e::binary_path("gitball-archiver"))
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--repos")
        .arg(sandbox.repos())
        .arg("--cache-dir")
        .arg(&first.cache_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run a second archiver");
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = second.try_wait().expect("wait for the second archiver");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second archiver on the same cache dir started and runs");
    };
    assert!(!status.success(), "a second archiver started");
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("in use by another archiver"),
        "the refusal does not say why: {stderr}"
    );
    assert_eq!(first.get("/acme/widget/archive/v1.2.3.tar").status(), 200);
}

// ---------------------------------------------------------------------------
// 8. Cache bound

#[test]
fn cache_stays_under_its_bound_while_archives_churn() {
    const MAX: u64 = 3 * MIB;
    const ARCHIVES: u64 = 12;
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "churn");
    let mut commits = Vec::new();
    for k in 0..ARCHIVES {
        repo.write("data.bin", pseudo_random_bytes(300 + k, 400 * 1024));
        commits.push(repo.commit_all(T1 + k as i64 * 60, &format!("version {k}")));
    }
    let archiver = Archiver::start(&sandbox.repos(), &["--cache-max-bytes", "3MiB"]);
    assert_eq!(
        archiver
            .metrics()
            .value("gitball_archiver_cache_max_bytes", &[]),
        MAX as f64
    );

    let mut peak_bytes = 0.0f64;
    for commit in &commits {
        let path = format!("/acme/churn/archive/{commit}.tar");
        let response = archiver.get(&path);
        assert_eq!(response.status().as_u16(), 200, "{path}");
        assert_eq!(header(&response, "x-gitball-cache"), "miss");
        let body = response.bytes().unwrap();
        assert_bytes_eq(
            &body,
            &repo.archive("tar", &format!("churn-{commit}/"), commit, None),
            &path,
        );
        let metrics = archiver.metrics();
        let bytes = metrics.value("gitball_archiver_cache_bytes", &[]);
        peak_bytes = peak_bytes.max(bytes);
        assert!(bytes <= MAX as f64, "cache_bytes {bytes} over {MAX}");
        let on_disk = archiver.cache_dir_bytes();
        assert!(
            on_disk <= MAX,
            "{on_disk} bytes in the cache dir, over {MAX}"
        );
    }
    let metrics = archiver.metrics();
    let evictions = metrics.value("gitball_archiver_cache_evictions_total", &[]);
    let entries = metrics.value("gitball_archiver_cache_entries", &[]);
    eprintln!(
        "cache churn: {ARCHIVES} archives through {MAX} bytes: {evictions} evictions, \
         {entries} entries, peak cache_bytes {peak_bytes}"
    );
    assert!(evictions > 0.0);
    assert!(entries >= 1.0 && entries + evictions == ARCHIVES as f64);
    assert_eq!(metrics.value("gitball_archiver_cache_held_bytes", &[]), 0.0);
    // Least recently used went first.
    let oldest = archiver.get(&format!("/acme/churn/archive/{}.tar", commits[0]));
    assert_eq!(header(&oldest, "x-gitball-cache"), "miss");
    let newest = archiver.get(&format!("/acme/churn/archive/{}.tar", commits[11]));
    assert_eq!(header(&newest, "x-gitball-cache"), "hit");
}

// ---------------------------------------------------------------------------
// 9. Hostile input
//
// Each test sends one kind of hostile request to an archiver of its own over
// a shared sandbox (the widget, a real repository outside `--repos` and
// symlinks into it from inside), then checks that nothing changed: no file
// in the sandbox or the archiver's cwd, no generation, an empty cache, and
// the archiver still healthy and serving.

/// Expected status of a hostile request.
enum Expect {
    Status(u16),
    /// Where the docs leave the choice (e.g. an unknown codeload segment may be
    /// "no such route" or "malformed ext").
    OneOf(&'static [u16]),
}

struct Hostile {
    method: &'static str,
    target: String,
    expect: Expect,
}

fn get(target: impl Into<String>, expect: Expect) -> Hostile {
    request("GET", target, expect)
}

fn request(method: &'static str, target: impl Into<String>, expect: Expect) -> Hostile {
    Hostile {
        method,
        target: target.into(),
        expect,
    }
}

/// The archive URLs of the widget, the base of most hostile targets.
const A: &str = "/acme/widget/archive";

/// The sandbox the hostile tests share (read-only): `repos/` holds the
/// widget and `acme/escape`, `acme/escape-bare.git` and `evil`, symlinks to
/// the repository `outside/victim`.
fn hostile_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = shared_fixture_dir("archiver-hostile");
        let (repos, home) = (root.join("repos"), root.join("home"));
        widget_in(&repos, &home);
        // A real repository outside --repos, and links into it from inside.
        let outside = RepoBuilder::init(&root.join("outside/victim"), &home);
        outside.write("secret.txt", "outside the repos dir\n");
        outside.commit_all(T1, "secret");
        std::os::unix::fs::symlink(root.join("outside/victim"), repos.join("acme/escape")).unwrap();
        std::os::unix::fs::symlink(
            root.join("outside/victim/.git"),
            repos.join("acme/escape-bare.git"),
        )
        .unwrap();
        std::os::unix::fs::symlink(root.join("outside"), repos.join("evil")).unwrap();
        root
    })
}

/// Which leak a response body shows, if any: a temp or `/proc` path, git's
/// `fatal:`, a panic, or the sandbox's paths.
fn leak_in(body: &str, root: &Path) -> Option<&'static str> {
    for needle in ["/tmp", "fatal:", "/proc", "panicked"] {
        if body.contains(needle) {
            return Some(needle);
        }
    }
    let repos = root.join("repos").canonicalize().unwrap();
    let repos_text = repos.display().to_string();
    (body.contains(&repos_text) || body.contains(&root.display().to_string()))
        .then_some("the repos path")
}

/// Starts an archiver over the hostile sandbox, lets `send` send requests
/// (pushing a description of each wrong answer), asserts there was none,
/// and that nothing changed and the archiver still serves.
fn assert_refused_and_nothing_changed(send: impl FnOnce(&Archiver, &Path, &mut Vec<String>)) {
    let root = hostile_root();
    let archiver = Archiver::start(&root.join("repos"), &[]);
    let before = tree_snapshot(root);
    let workdir_before = tree_snapshot(&archiver.workdir);

    let mut failures = Vec::new();
    send(&archiver, root, &mut failures);
    assert!(
        failures.is_empty(),
        "hostile requests:\n{}",
        failures.join("\n")
    );

    // Nothing created or changed outside the cache dir; nothing generated.
    assert_eq!(tree_snapshot(root), before, "the sandbox changed");
    assert_eq!(
        tree_snapshot(&archiver.workdir),
        workdir_before,
        "the archiver's cwd changed"
    );
    assert_eq!(generations(&archiver), 0.0, "a hostile request generated");
    assert!(
        archiver.cache_files().is_empty(),
        "files in the cache dir: {:?}",
        archiver.cache_files()
    );
    // Still healthy and serving.
    assert_eq!(
        archiver.health_status(),
        Some(200),
        "health after the requests"
    );
    let response = archiver.get("/acme/widget/archive/main.tar");
    assert_eq!(
        response.status().as_u16(),
        200,
        "a good request after the hostile ones"
    );
}

/// Each case gets its status (or one of them), a JSON error body that leaks
/// nothing, and `Allow` with a 405.
fn assert_hostile_requests_refused(cases: &[Hostile]) {
    assert_refused_and_nothing_changed(|archiver, root, failures| {
        for Hostile {
            method,
            target,
            expect,
        } in cases
        {
            let (head, body, _) = match RawConnection::request(archiver.addr, method, target, &[]) {
                Ok(response) => response,
                Err(error) => {
                    failures.push(format!("{method} {target}: no response ({error})"));
                    continue;
                }
            };
            let shown: String = target.chars().take(80).collect();
            let ok = match expect {
                Expect::Status(status) => head.status == *status,
                Expect::OneOf(statuses) => statuses.contains(&head.status),
            };
            if !ok {
                failures.push(format!("{method} {shown}: status {}", head.status));
                continue;
            }
            let text = String::from_utf8_lossy(&body);
            if let Some(what) = leak_in(&text, root) {
                failures.push(format!("{method} {shown}: body leaks {what}: {text}"));
            }
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(json) if json["error"].is_string() && json["message"].is_string() => {}
                _ => failures.push(format!(
                    "{method} {shown}: body is not a JSON error: {text:?}"
                )),
            }
            if head.status == 405 && head.header("allow").is_none() {
                failures.push(format!("{method} {shown}: 405 without Allow"));
            }
        }
        eprintln!("hostile input: {} requests", cases.len());
    });
}

use Expect::{OneOf, Status};

#[test]
fn traversal_is_refused_with_400() {
    assert_hostile_requests_refused(&[
        get(format!("{A}/../../../etc/passwd.tar"), Status(400)),
        get(format!("{A}/%2e%2e/%2e%2e/etc/passwd.tar"), Status(400)),
        get(format!("{A}/..%2f..%2fetc%2fpasswd.tar"), Status(400)),
        get("/../widget/archive/main.tar", Status(400)),
        get("/%2e%2e/widget/archive/main.tar", Status(400)),
        get("/acme%2f..%2f..%2f/widget/archive/main.tar", Status(400)),
        get("/acme/widget/tar.gz/..%2f..%2fetc", Status(400)),
        get(format!("{A}/..%5c..%5cetc.tar"), Status(400)),
    ]);
}

#[test]
fn option_injection_and_revision_syntax_are_refused_with_400() {
    let long_ref = "r".repeat(300);
    assert_hostile_requests_refused(&[
        get(format!("{A}/--output=x.tar"), Status(400)),
        get("/acme/widget/tar/--output=x", Status(400)),
        get(format!("{A}/-h.zip"), Status(400)),
        get(format!("{A}/--remote=evil.tar.gz"), Status(400)),
        get(format!("{A}/main..feature.tar"), Status(400)),
        get(format!("{A}/main~1.tar"), Status(400)),
        get(format!("{A}/main%5E%7Btree%7D.tar"), Status(400)),
        get(format!("{A}/HEAD:README.md.tar"), Status(400)),
        get(format!("{A}/main@%7B1%7D.tar"), Status(400)),
        get(format!("{A}/main.lock.tar"), Status(400)),
        get(format!("{A}//etc/passwd.tar"), Status(400)),
        get(format!("{A}/{long_ref}.tar"), Status(400)),
    ]);
}

#[test]
fn control_bytes_and_bad_encodings_are_refused_with_400() {
    assert_hostile_requests_refused(&[
        get(format!("{A}/ma%00in.tar"), Status(400)),
        get(format!("{A}/ma%0ain.tar"), Status(400)),
        get(format!("{A}/main%0d%0aX-Injected:%20yes.tar"), Status(400)),
        get(format!("{A}/%ff%fe.tar"), Status(400)),
        get(format!("{A}/ma%zzin.tar"), Status(400)),
        get(format!("{A}/main%20branch.tar"), Status(400)),
    ]);
}

/// The subtree: pathspec magic, traversal, absolute, control bytes.
#[test]
fn hostile_subtree_paths_are_refused_with_400() {
    assert_hostile_requests_refused(&[
        get(format!("{A}/main.tar?path=%3A(glob)*"), Status(400)),
        get(format!("{A}/main.tar?path=:!x"), Status(400)),
        get(format!("{A}/main.tar?path=:(top)sub"), Status(400)),
        get(format!("{A}/main.tar?path=../../etc"), Status(400)),
        get(
            format!("{A}/main.tar?path=%2e%2e%2f%2e%2e%2fetc"),
            Status(400),
        ),
        get(format!("{A}/main.tar?path=sub/../../x"), Status(400)),
        get(format!("{A}/main.tar?path=/etc/passwd"), Status(400)),
        get(format!("{A}/main.tar?path=sub%00dir"), Status(400)),
    ]);
}

/// Literal paths: `*` is no glob.
#[test]
fn subtree_paths_are_literal_and_missing_ones_answer_404() {
    assert_hostile_requests_refused(&[
        get(format!("{A}/main.tar?path=*"), Status(404)),
        get(format!("{A}/main.tar?path=sub/*"), Status(404)),
        get(format!("{A}/main.tar?path=nope"), Status(404)),
    ]);
}

/// A `?path=` that names an entry whose name holds glob characters gets
/// that entry alone: git is run with `--literal-pathspecs`
/// (docs/archiver.md, "Only commit ids reach git"), so `data*` does not
/// bring in `data-old` beside it. Without it the archive holds whatever
/// the name matches as a glob, under the ETag of the subtree asked for.
#[test]
fn a_subtree_whose_name_holds_glob_characters_is_archived_alone() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    repo.write("data*/kept.txt", "kept\n");
    repo.write("data-old/leaked.txt", "not asked for\n");
    repo.write("README", "hello\n");
    let commit = repo.commit_all(1_700_000_000, "names that are globs");
    let output = gitball_e2e::git_command(&sandbox.home())
        .current_dir(repo.dir())
        .args([
            "--literal-pathspecs",
            "archive",
            "--format=tar",
            "--prefix=widget-main/",
            &commit,
            "--",
            "data*",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let response = archiver.get("/acme/widget/archive/main.tar?path=data*");
    assert_eq!(response.status().as_u16(), 200);
    let body = response.bytes().unwrap();
    let names = gitball_e2e::tar_entry_names(&body);
    assert!(
        names.iter().all(|name| !name.contains("data-old")),
        "an entry the path only matches as a glob: {names:?}"
    );
    assert!(
        names.contains(&"widget-main/data*/kept.txt".to_owned()),
        "{names:?}"
    );
    assert!(
        body == output.stdout,
        "not what git archives for the literal path"
    );
}

/// An unknown codeload segment may be "no such route" or "malformed ext":
/// the docs leave it open.
#[test]
fn unknown_formats_are_refused() {
    assert_hostile_requests_refused(&[
        get(format!("{A}/main.rar"), Status(400)),
        get(format!("{A}/main.tar.bz2"), Status(400)),
        get(format!("{A}/main.tar.sha256.sha256"), Status(400)),
        get("/acme/widget/7z/main", OneOf(&[400, 404])),
    ]);
}

/// Names: .git, dot-names, too long, unknown.
#[test]
fn bad_and_unknown_names_are_refused() {
    let long_name = "n".repeat(101);
    assert_hostile_requests_refused(&[
        get("/acme/.git/archive/main.tar", Status(400)),
        get("/.acme/widget/archive/main.tar", Status(400)),
        get("/acme/widget/.git/main", OneOf(&[400, 404])),
        get(format!("/acme/{long_name}/archive/main.tar"), Status(400)),
        get("/acme/nope/archive/main.tar", Status(404)),
        get("/nobody/widget/archive/main.tar", Status(404)),
        get("/acme/widget.git/archive/main.tar", Status(404)),
        get(format!("{A}/no-such-branch.tar"), Status(404)),
        get(format!("{A}/no-such-branch.tar.gz.sha256"), Status(404)),
        get(format!("{A}/deadbeef00.zip"), Status(404)),
    ]);
}

#[test]
fn symlinks_out_of_the_repos_dir_answer_404() {
    assert_hostile_requests_refused(&[
        get("/acme/escape/archive/main.tar", Status(404)),
        get("/acme/escape-bare/archive/main.tar", Status(404)),
        get("/evil/victim/archive/main.tar", Status(404)),
    ]);
}

#[test]
fn other_methods_answer_405_with_allow() {
    assert_hostile_requests_refused(&[
        request("POST", format!("{A}/main.tar"), Status(405)),
        request("PUT", format!("{A}/main.tar"), Status(405)),
        request("DELETE", format!("{A}/main.tar"), Status(405)),
        request("OPTIONS", format!("{A}/main.tar"), Status(405)),
    ]);
}

/// The request line (414); the head (431) is sent in pieces in
/// `malformed_or_oversized_heads_in_pieces_get_4xx_without_leaks`, and in
/// one write in `oversized_heads_get_431_however_they_arrive`.
#[test]
fn request_line_over_8_kib_answers_414() {
    let long_line = format!("{A}/{}.tar", "a".repeat(9000));
    assert_hostile_requests_refused(&[get(long_line, Status(414))]);
}

/// Protocol-level rejections (hyper answers before any route): the status
/// and no leak.
#[test]
fn malformed_or_oversized_heads_in_pieces_get_4xx_without_leaks() {
    let big_header = "h".repeat(40 * 1024);
    let mut raw_cases: Vec<(String, Vec<u8>, u16)> = vec![(
        "raw control byte in the request line".into(),
        b"GET /acme/wid\x01get/archive/main.tar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .to_vec(),
        400,
    )];
    let mut pieces =
        format!("GET {A}/main.tar HTTP/1.1\r\nHost: x\r\nX-Big: {big_header}\r\n").into_bytes();
    pieces.extend_from_slice(b"Connection: close\r\n\r\n");
    raw_cases.push(("40 KiB header".into(), pieces, 431));
    assert_refused_and_nothing_changed(|archiver, root, failures| {
        for (what, request, status) in raw_cases {
            let mut connection = RawConnection::connect(archiver.addr).unwrap();
            // In 4 KiB pieces, as a slow client would: each arrives on its own.
            for piece in request.chunks(4096) {
                if connection.send(piece).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            match connection.read_head() {
                Ok(head) if head.status == status => {
                    let mut body = Vec::new();
                    connection.read_body_to_end(|p| body.extend_from_slice(p));
                    if let Some(leak) = leak_in(&String::from_utf8_lossy(&body), root) {
                        failures.push(format!("{what}: body leaks {leak}"));
                    }
                }
                Ok(head) => failures.push(format!(
                    "{what}: status {} (expected {status})",
                    head.status
                )),
                Err(error) => failures.push(format!("{what}: no response ({error})")),
            }
        }
    });
}

/// A request head over 32 KiB gets 431 (`docs/http.md`) however its bytes arrive:
/// hyper checks its buffer bound only while a head is incomplete, so a head
/// that arrives in one write is measured by the server loop itself.
#[test]
fn oversized_heads_get_431_however_they_arrive() {
    let (_, archiver) = widget_archiver(&[]);
    let mut failures = Vec::new();
    for size in [33 * 1024, 40 * 1024, 64 * 1024] {
        let request = format!(
            "GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "h".repeat(size)
        );
        let mut connection = RawConnection::connect(archiver.addr).unwrap();
        let _ = connection.send(request.as_bytes());
        match connection.read_head() {
            Ok(head) if head.status == 431 => {}
            Ok(head) => failures.push(format!(
                "GET with a {} KiB header in one write: status {} (expected 431)",
                size / 1024,
                head.status
            )),
            Err(error) => {
                failures.push(format!("{} KiB header: no response ({error})", size / 1024))
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The HTTP/2 preface (`PRI * HTTP/2.0`: a client speaking HTTP/2 with
/// prior knowledge) gets no answer and a closed connection
/// (`docs/http.md`): nothing of it is taken as a request, and the archiver
/// serves on.
#[test]
fn the_http2_preface_gets_no_answer_and_a_closed_connection() {
    let (_, archiver) = widget_archiver(&[]);
    let mut connection = RawConnection::connect(archiver.addr).unwrap();
    connection
        .stream()
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    connection
        .send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let answer = connection.read_to_close();
    assert!(
        answer.is_empty(),
        "answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the connection was not closed at once: {:?}",
        started.elapsed()
    );
    assert_eq!(archiver.health_status(), Some(200));
}

/// `docs/http.md`: errors are JSON `{"error", "message"}`, also for `/healthz` and
/// `/metrics` (405) and oversized heads (431).
#[test]
fn errors_outside_archive_routes_are_json_too() {
    let (_, archiver) = widget_archiver(&[]);
    let mut failures = Vec::new();
    // (what, request, status, JSON body expected). hyper itself answers a
    // request it cannot parse or buffer (a control byte in the target, a
    // head beyond its buffer) before any route runs: those get the status
    // with an empty body, which leaks nothing either.
    let requests: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("POST /healthz", b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(), 405, true),
        ("DELETE /metrics", b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 405, true),
        ("40 KiB of headers", format!("GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "h".repeat(40 * 1024)).into_bytes(), 431, true),
        ("control byte in the target", b"GET /acme/wid\x01get/archive/main.tar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 400, false),
        ("80 KiB of headers", format!("GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "h".repeat(80 * 1024)).into_bytes(), 431, false),
    ];
    for (what, request, status, json) in requests {
        let mut connection = RawConnection::connect(archiver.addr).unwrap();
        let _ = connection.send(&request);
        let head = match connection.read_head() {
            Ok(head) => head,
            Err(error) => {
                failures.push(format!("{what}: no response ({error})"));
                continue;
            }
        };
        let mut body = Vec::new();
        connection.read_body_to_end(|p| body.extend_from_slice(p));
        if head.status != status {
            failures.push(format!(
                "{what}: status {} (expected {status})",
                head.status
            ));
        }
        let text = String::from_utf8_lossy(&body);
        if text.contains('/') && !json {
            failures.push(format!("{what}: body {text:?} may leak a path"));
        }
        if !json {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(json) if json["error"].is_string() && json["message"].is_string() => {}
            _ => failures.push(format!(
                "{what}: {} with body {text:?}, not a JSON error",
                head.status
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// 10. Bearer token

#[test]
fn token_file_guards_archives_but_not_health_or_metrics() {
    let sandbox = Sandbox::new();
    let w = widget(&sandbox);
    let token_file = sandbox.path("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--token-file", token_file.to_str().unwrap()],
    );
    let client = archiver.client();
    let path = "/acme/widget/archive/main.tar";
    for authorization in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("s3cret-token"),
    ] {
        let mut request = client.get(archiver.url(path));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let response = request.send().unwrap();
        assert_eq!(
            response.status().as_u16(),
            401,
            "Authorization: {authorization:?}"
        );
        assert!(header(&response, "www-authenticate").starts_with("Bearer"));
        let json: serde_json::Value = serde_json::from_slice(&response.bytes().unwrap()).unwrap();
        assert!(json["error"].is_string() && json["message"].is_string());
    }
    let checksum = client
        .get(archiver.url(&format!("{path}.sha256")))
        .send()
        .unwrap();
    assert_eq!(checksum.status().as_u16(), 401, ".sha256 without a token");
    let head = client.head(archiver.url(path)).send().unwrap();
    assert_eq!(head.status().as_u16(), 401, "HEAD without a token");

    let response = client
        .get(archiver.url(path))
        .header("Authorization", "Bearer s3cret-token")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_bytes_eq(
        &response.bytes().unwrap(),
        &w.repo.archive("tar", "widget-main/", &w.c2, None),
        "authorized download",
    );
    assert_eq!(archiver.get("/healthz").status().as_u16(), 200);
    assert_eq!(archiver.get("/metrics").status().as_u16(), 200);
    assert_eq!(
        archiver
            .metrics()
            .sum("gitball_archiver_generations_total", &[]),
        1.0,
        "only the authorized request generated"
    );
}

/// `docs/http.md#status-codes`: the archiver checks "method, bearer token,
/// URL, `?path=` syntax, repository, ref, subtree", in that order. So a
/// caller without the token learns nothing of what is served (a `404
/// repo_not_found` or `ref_not_found` against a `401` would list the
/// repositories and refs) and costs no resolution: every request below is
/// `401`, its log line names no commit, and with the token the same
/// requests get their own answers. A method other than `GET`/`HEAD` is
/// `405` before the token is looked at. (Docs audit: the existing token
/// test asked only for an archive that exists, so moving the token check
/// after the resolution passed every test.)
#[test]
fn the_bearer_token_is_checked_before_the_url_the_repository_and_the_ref() {
    let sandbox = Sandbox::new();
    let token_file = sandbox.path("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let (w, archiver) = widget_archiver(&["--token-file", token_file.to_str().unwrap()]);
    let bearer = ("Authorization", "Bearer s3cret-token");
    // (target, the answer with the token)
    let c2_tar = format!("/acme/widget/archive/{}.tar", w.c2);
    let cases: Vec<(String, u16, &str)> = vec![
        ("/acme/widget/archive/main.tar".into(), 200, ""),
        (c2_tar.clone(), 200, ""),
        ("/acme/widget/archive/v2.0.0.zip.sha256".into(), 200, ""),
        ("/acme/nope/archive/main.tar".into(), 404, "repo_not_found"),
        ("/acme/widget/archive/nope.tar".into(), 404, "ref_not_found"),
        (
            format!("/acme/widget/archive/{}.tar", "0".repeat(40)),
            404,
            "ref_not_found",
        ),
        (
            "/acme/widget/archive/main.tar?path=no/such/dir".into(),
            404,
            "path_not_found",
        ),
        ("/acme/widget/archive/main.rar".into(), 400, "bad_format"),
        ("/acme/widget/archive/-x.tar".into(), 400, "bad_ref"),
        ("/.acme/widget/archive/main.tar".into(), 400, "bad_name"),
        (
            "/acme/widget/archive/main.tar?path=../x".into(),
            400,
            "bad_path",
        ),
        ("/acme/widget/blob/main".into(), 404, "not_found"),
    ];
    for (index, (target, with_token, code)) in cases.iter().enumerate() {
        for method in ["GET", "HEAD"] {
            let id = format!("no-token-{index}-{method}");
            let (head, body, _) =
                RawConnection::request(archiver.addr, method, target, &[("X-Request-Id", &id)])
                    .unwrap();
            assert_eq!(head.status, 401, "{method} {target} without the token");
            assert!(
                head.header("www-authenticate")
                    .is_some_and(|value| value.starts_with("Bearer")),
                "{method} {target}: {head:?}"
            );
            if method == "GET" {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["error"], "unauthorized", "{method} {target}");
            }
            let line = gitball_e2e::wait_for_line(Duration::from_secs(5), || archiver.log(), &id);
            assert_eq!(
                (line["status"].as_u64(), line["commit"].as_str()),
                (Some(401), Some("-")),
                "{method} {target}: resolved before the token was checked: {line}"
            );

            let (head, body, _) =
                RawConnection::request(archiver.addr, method, target, &[bearer]).unwrap();
            assert_eq!(head.status, *with_token, "{method} {target} with the token");
            if method == "GET" && !code.is_empty() {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["error"], *code, "{method} {target} with the token");
            }
        }
    }
    // The method comes first: no token is asked of a `POST`.
    let (head, _, _) =
        RawConnection::request(archiver.addr, "POST", "/acme/widget/archive/main.tar", &[])
            .unwrap();
    assert_eq!(head.status, 405);
    assert_eq!(head.header("allow"), Some("GET, HEAD"));
}

// ---------------------------------------------------------------------------
// 11. Metrics

/// Every archiver family of `docs/observability.md`: (family, TYPE,
/// unlabelled: exists from start-up).
const PROCESS_FAMILIES: [&str; 4] = [
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

/// The archiver's families as `docs/observability.md` documents them.
fn families() -> Vec<DocumentedFamily> {
    let families = documented_families("### Archiver metrics");
    assert!(
        families.len() >= 26,
        "the table of archiver metrics did not parse: {families:?}"
    );
    families
}

/// Asserts every documented family (only the unlabelled ones if
/// `only_unlabelled`) has `# HELP`, the right `# TYPE` and a series, and
/// every process family a series and a type.
fn assert_families(metrics: &Metrics, only_unlabelled: bool, when: &str) {
    let mut missing = Vec::new();
    for DocumentedFamily {
        name: family,
        kind,
        unlabelled,
    } in families()
    {
        let family = family.as_str();
        if only_unlabelled && !unlabelled {
            continue;
        }
        if !metrics.help.contains_key(family) {
            missing.push(format!("{family}: no # HELP"));
        }
        match metrics.types.get(family) {
            Some(t) if *t == kind => {}
            other => missing.push(format!("{family}: # TYPE {other:?}, expected {kind}")),
        }
        let sample = if kind == "histogram" {
            format!("{family}_count")
        } else {
            family.to_owned()
        };
        if metrics.series_of(&sample).is_empty() {
            missing.push(format!("{family}: no series"));
        }
    }
    for family in PROCESS_FAMILIES {
        if metrics.series_of(family).is_empty() || !metrics.types.contains_key(family) {
            missing.push(format!("{family}: missing"));
        }
    }
    assert!(missing.is_empty(), "{when}:\n{}", missing.join("\n"));
}

/// An archiver over the shared widget (`--cache-max-bytes 64MiB`) that
/// served `main.tar` once: its `/metrics` text and the body's length.
fn metrics_after_one_download() -> (Archiver, String, usize) {
    let (w, archiver) = widget_archiver(&["--cache-max-bytes", "64MiB"]);
    let body = archiver
        .get("/acme/widget/archive/main.tar")
        .bytes()
        .unwrap();
    assert_bytes_eq(
        &body,
        &w.repo.archive("tar", "widget-main/", &w.c2, None),
        "tar",
    );
    // The download's gauge goes down before its request is counted (the
    // count is the log record's, dropped last): wait for both.
    assert!(
        metric_after(&archiver, Duration::from_secs(5), |m| {
            m.value("gitball_archiver_active_downloads", &[]) == 0.0
                && m.value(
                    "gitball_archiver_requests_total",
                    &[("format", "tar"), ("cache", "miss"), ("code", "200")],
                ) == 1.0
        }),
        "the download is still counted as active, or not counted as a request"
    );
    let text = archiver.metrics_text();
    (archiver, text, body.len())
}

/// At start-up: the unlabelled series, counters at 0.
#[test]
fn metrics_at_start_up_export_the_unlabelled_families() {
    let (_, archiver) = widget_archiver(&["--cache-max-bytes", "64MiB"]);
    let startup = archiver.metrics();
    assert_families(&startup, true, "at start-up");
    for counter in [
        "gitball_archiver_cache_evictions_total",
        "gitball_archiver_sent_bytes_total",
        "gitball_archiver_client_disconnects_total",
    ] {
        assert_eq!(
            startup.get(counter, &[]),
            Some(0.0),
            "{counter} at start-up"
        );
    }
    assert_eq!(
        startup.get("gitball_archiver_cache_max_bytes", &[]),
        Some((64 * MIB) as f64)
    );
    assert_eq!(
        startup.get("gitball_archiver_active_downloads", &[]),
        Some(0.0)
    );
    let labelled_at_startup: Vec<String> = families()
        .into_iter()
        .filter(|family| !family.unlabelled && startup.help.contains_key(&family.name))
        .map(|family| family.name)
        .collect();
    eprintln!("labelled families described at start-up: {labelled_at_startup:?}");
    assert!(startup.value("process_open_fds", &[]) > 0.0);
    assert!(startup.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(startup.value("process_start_time_seconds", &[]) > 1.6e9);
}

/// `docs/observability.md`, "Series at start-up": `generations_total`
/// exists at 0 for every format and outcome from the start, so the first
/// failed generation is an increase between two scrapes. Prometheus'
/// `increase()` and `rate()`, which `GitballArchiverGenerationsFailing`
/// uses, see nothing of the event a series is born with: a series that
/// appeared with its first failure hid it from the alert (attack on what
/// the operator sees: three failed generations, one per format, read as
/// `increase(...[10m]) = 0` in a Prometheus scraping the archiver). The
/// failure is real git's, over a repository that lost a blob.
#[test]
fn a_first_failed_generation_is_an_increase_between_two_scrapes() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "broken");
    repo.write("lost.txt", "this blob is lost\n");
    let commit = repo.commit_all(T1, "one");
    let blob = repo.rev_parse(&format!("{commit}:lost.txt"));
    let object = repo
        .dir()
        .join(".git/objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    std::fs::remove_file(&object).expect("remove the blob's loose object");
    let archiver = Archiver::start(&sandbox.repos(), &[]);

    let before = archiver.metrics();
    for format in FORMATS {
        for outcome in ["ok", "failed", "timeout", "too_large", "refs_changed"] {
            assert_eq!(
                before.get(
                    "gitball_archiver_generations_total",
                    &[("format", format), ("outcome", outcome)]
                ),
                Some(0.0),
                "generations_total{{format=\"{format}\",outcome=\"{outcome}\"}} at start-up"
            );
        }
    }
    let answer = archiver.get(&format!("/acme/broken/archive/{commit}.tar"));
    assert_eq!(
        answer.status(),
        500,
        "{}",
        answer.text().unwrap_or_default()
    );
    let failed = [("format", "tar"), ("outcome", "failed")];
    assert!(
        metric_after(&archiver, Duration::from_secs(10), |m| {
            m.get("gitball_archiver_generations_total", &failed) == Some(1.0)
        }),
        "the failed generation is not counted: {:?}",
        archiver
            .metrics()
            .get("gitball_archiver_generations_total", &failed)
    );
}

#[test]
fn metrics_after_a_download_export_every_documented_family_with_help_and_type() {
    let (_, text, _) = metrics_after_one_download();
    assert_families(&Metrics::parse(&text), false, "after one download");
}

#[test]
fn metrics_count_a_download() {
    let (_, text, body_len) = metrics_after_one_download();
    let metrics = Metrics::parse(&text);
    assert_eq!(
        metrics.get(
            "gitball_archiver_requests_total",
            &[("format", "tar"), ("cache", "miss"), ("code", "200")]
        ),
        Some(1.0),
        "{:?}",
        metrics.series_of("gitball_archiver_requests_total")
    );
    assert_eq!(
        metrics.get(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.get(
            "gitball_archiver_generation_duration_seconds_count",
            &[("format", "tar")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.value("gitball_archiver_sent_bytes_total", &[]),
        body_len as f64
    );
    assert_eq!(
        metrics.value("gitball_archiver_cache_bytes", &[]),
        body_len as f64
    );
    assert_eq!(metrics.value("gitball_archiver_cache_entries", &[]), 1.0);
}

/// promtool's own check, when it is installed.
#[test]
fn metrics_pass_promtool_check() {
    let (_, text, _) = metrics_after_one_download();
    match std::process::Command::new("promtool")
        .arg("--version")
        .output()
    {
        Ok(output) if output.status.success() => {
            let mut child = std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                stdin.write_all(text.as_bytes()).unwrap();
            }
            let output = child.wait_with_output().unwrap();
            assert!(
                output.status.success(),
                "promtool check metrics failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        _ => {
            // `.ci/run` installs it: in CI the check must run.
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required in CI (.ci/run installs it)"
            );
            eprintln!("note: promtool is not installed; skipped `promtool check metrics`");
        }
    }
}

// ---------------------------------------------------------------------------
// 12. Graceful shutdown

/// `docs/archiver.md`, "Shutdown drain": SIGHUP (a terminal's hangup, or
/// the proxy's reload sent to every gitball process) is logged and
/// ignored; it killed the archiver, cutting every download (attack).
#[test]
fn sighup_is_ignored_and_downloads_go_on() {
    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &[SLOW_ZSTD[0], SLOW_ZSTD[1]]);
    let (mut slow, head) = open_download(&archiver, SLOW_PATH);
    assert_eq!(head.status, 200);
    slow.read_body_bytes(4096).expect("the first bytes");
    archiver.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .log()
            .contains("SIGHUP ignored")),
        "{}",
        archiver.log()
    );
    assert_eq!(archiver.get("/healthz").status().as_u16(), 200);
    slow.read_body_bytes(4096)
        .expect("the download goes on after SIGHUP");
}

/// `docs/archiver.md`, "Shutdown drain": at SIGTERM open connections are
/// no longer kept alive, and running downloads go on within the grace. A
/// kept-alive idle connection is closed at once (not at the 10 s head
/// timeout, nor at the grace's end); a download under way ends complete,
/// and its connection is closed after it; the drain is then over, and the
/// archiver exits long before its 30 s grace. (Mutation review: keeping
/// connections alive through the shutdown, which left an idle client's
/// connection open until its head timeout and held the exit that long,
/// passed every test; fails this one.)
#[test]
fn at_sigterm_downloads_finish_and_no_connection_is_kept_alive() {
    let big = big_repo();
    let mut archiver = Archiver::start(&big.repos, &["--shutdown-grace", "30"]);
    let path = "/acme/big/archive/main.tar";
    let full_length = {
        let (mut warm, head) = open_download(&archiver, path);
        assert_eq!(head.status, 200);
        let mut length = 0u64;
        let end = warm.read_body_to_end(|piece| length += piece.len() as u64);
        assert_eq!(end, BodyEnd::Complete, "the warm-up download");
        length
    };
    // An idle connection, kept alive after its answer.
    let mut idle = RawConnection::connect(archiver.addr).expect("connect");
    idle.send_request("GET", "/healthz", &[]).expect("send");
    assert_eq!(idle.read_head().expect("head").status, 200);
    assert_eq!(idle.read_body_to_end(|_| {}), BodyEnd::Complete);
    // A download under way.
    let (mut download, head) = open_download(&archiver, path);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    let first = download
        .read_body_bytes(1 << 20)
        .expect("the download's first MiB");

    let signalled = Instant::now();
    archiver.signal(nix::sys::signal::Signal::SIGTERM);
    let after_idle = idle.read_to_close();
    let idle_closed = signalled.elapsed();
    assert!(
        after_idle.is_empty(),
        "the idle connection got {} bytes",
        after_idle.len()
    );
    assert!(
        idle_closed < Duration::from_secs(5),
        "the idle connection was closed {idle_closed:?} after SIGTERM, not at once"
    );
    let mut received = first.len() as u64;
    let end = download.read_body_to_end(|piece| received += piece.len() as u64);
    assert_eq!(end, BodyEnd::Complete, "the download after SIGTERM");
    assert_eq!(received, full_length);
    assert!(
        download.read_to_close().is_empty(),
        "bytes after the download's end"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !archiver.is_running()),
        "still running {:?} after SIGTERM; log:\n{}",
        signalled.elapsed(),
        archiver.log()
    );
    let exited = signalled.elapsed();
    assert!(
        exited < Duration::from_secs(8),
        "exited {exited:?} after SIGTERM: the drain waited"
    );
}

/// A thread of another process stopped by `ptrace` (the calling thread is
/// its tracer): it runs nothing until it is let go, and a process that
/// exits meanwhile still ends it.
struct StoppedThread(nix::unistd::Pid);

impl StoppedThread {
    fn stop(tid: u32) -> StoppedThread {
        use nix::sys::ptrace;
        use nix::sys::wait::{WaitPidFlag, waitpid};
        let tid = nix::unistd::Pid::from_raw(i32::try_from(tid).expect("tid fits i32"));
        ptrace::seize(tid, ptrace::Options::empty()).expect("ptrace the thread");
        // Made now: a failure below lets the thread go (its process's exit
        // would otherwise wait for this thread, its tracer, for ever).
        let stopped = StoppedThread(tid);
        ptrace::interrupt(tid).expect("stop the thread");
        waitpid(tid, Some(WaitPidFlag::__WALL)).expect("the thread stopped");
        stopped
    }

    /// Reaps the thread if its process ended it (a traced thread waits for
    /// its tracer, and its process's exit is not seen until then).
    fn reap_if_ended(&self) {
        use nix::sys::wait::{WaitPidFlag, waitpid};
        let _ = waitpid(self.0, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG));
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // Let go (it runs on), if it is still there.
        let _ = nix::sys::ptrace::detach(self.0, None);
        self.reap_if_ended();
    }
}

/// The exit after SIGTERM is bounded: the grace, then at most 5 s for the
/// generations to stop, then the process leaves, even with a compressor
/// thread that never ends its job (docs/archiver.md, "Shutdown drain"), on
/// an archiver and on an embedded proxy. Here the generation's writer
/// thread is stopped by the test; a runtime dropped the `#[tokio::main]`
/// way waited for it for ever.
#[test]
fn the_exit_after_sigterm_does_not_wait_for_a_compressor_that_never_stops() {
    const GRACE: Duration = Duration::from_secs(1);
    let sandbox = Sandbox::new();
    widget(&sandbox);
    // Writes nothing, so the writer thread waits for git's first bytes.
    let (stub, _never_released) = sandbox.git_that_pauses("git-that-waits", 0);
    let flags = ["--git", stub.to_str().unwrap(), "--shutdown-grace", "1"];
    let mut archiver = Archiver::start(&sandbox.repos(), &flags);
    let mut embedded = gitball_e2e::proxy::Proxy::embedded(
        &sandbox.repos(),
        &sandbox.path("embedded-cache"),
        &flags,
    );
    for (service, embedded_now) in [(&mut *archiver, false), (&mut *embedded, true)] {
        // A tar.gz's head goes out with the gzip header, before git writes.
        let mut download = RawConnection::connect(service.addr).expect("connect");
        download
            .send_request("GET", "/acme/widget/archive/main.tar.gz", &[])
            .expect("send");
        assert_eq!(download.read_head().expect("head").status, 200);
        let pid = service.pid;
        let writer = || {
            thread_nice_values(pid)
                .into_iter()
                .find(|thread| thread.name == "gitball-writer")
        };
        assert!(
            wait_until(Duration::from_secs(10), || writer().is_some()),
            "no writer thread"
        );
        let stopped = StoppedThread::stop(writer().expect("the writer thread").tid);

        let signalled = Instant::now();
        service.signal(nix::sys::signal::Signal::SIGTERM);
        // The grace, the 5 s for generations to stop, and a margin.
        let exited = wait_until(GRACE + Duration::from_secs(10), || {
            stopped.reap_if_ended();
            !service.is_running()
        });
        let took = signalled.elapsed();
        drop(stopped);
        assert!(
            exited,
            "still running {took:?} after SIGTERM; log:\n{}",
            service.log()
        );
        assert!(
            service.log().contains("generations did not stop in time"),
            "{}",
            service.log()
        );
        // Embedded, the proxy cut the download; the archiver drains only
        // after the proxy did.
        let cut_by = if embedded_now {
            "downloads were cut by the embedding proxy's shutdown"
        } else {
            "shutdown grace ran out; open downloads were cut"
        };
        assert!(service.log().contains(cut_by), "{}", service.log());
        eprintln!("exited {:.2} s after SIGTERM", took.as_secs_f64());
    }
}

/// A signal while the start-up canary runs ends the start within the
/// bound of a shutdown (the grace and 5 s), on an archiver and on an
/// embedded proxy, as a clean exit that served nothing
/// (docs/archiver.md, "Shutdown drain"). The canary may take its 10 s, and
/// three tries while the binary keeps changing; the exit waited for it.
#[test]
fn a_sigterm_while_the_canary_runs_ends_the_start_at_once() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let git = gitball_e2e::git::real_git();
    let marker = sandbox.path("canary-started");
    // Its canary's `fast-import` says it started, then takes 60 s.
    let stub = sandbox.path("git-with-a-slow-canary");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\n\
             case \" $* \" in\n\
             *' fast-import '*) echo $$ > '{marker}'; exec /bin/sleep 60 ;;\n\
             esac\n\
             exec '{git}' \"$@\"\n",
            marker = marker.display(),
            git = git.display()
        ),
    )
    .expect("write the stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (binary, cache) in [
        ("gitball-archiver", "cache-a"),
        ("gitball-proxy", "cache-p"),
    ] {
        let _ = std::fs::remove_file(&marker);
        let cache = sandbox.path(cache);
        let args = ["--git".as_ref(), stub.as_os_str()];
        let canary = sigterm_while_starting(&sandbox, binary, &cache, &args, |_| {
            std::fs::read_to_string(&marker)
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
        });
        // The canary's git went with it.
        assert!(
            wait_until(Duration::from_secs(5), || !process_alive(canary)),
            "{binary}: the canary's git {canary} outlived it"
        );
    }
}

/// `docs/observability.md`: `generations_in_flight` counts generations,
/// each holding one of `--max-generations`' slots, not the canary's gits:
/// after git was replaced, a request (here a `HEAD`, which never starts a
/// generation) runs the canary, and while the canary's git runs the gauge
/// reads 0; the request then gets its answer.
#[test]
fn the_canary_run_by_a_request_is_not_a_generation_in_flight() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let git = gitball_e2e::git::real_git();
    let stub = sandbox.path("git");
    let install = |name: &str, body: String| {
        let written = sandbox.path(name);
        std::fs::write(&written, body).expect("write the stub");
        std::fs::set_permissions(&written, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Renamed over it, as a package upgrade replaces a binary.
        std::fs::rename(&written, &stub).expect("rename the stub into place");
    };
    install(
        "git-1",
        format!("#!/bin/sh\nexec '{}' \"$@\"\n", git.display()),
    );
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);

    // The replacement's canary says it started, then waits for a line.
    let marker = sandbox.path("canary-started");
    let (release, mut fifo) = sandbox.fifo("canary-release");
    install(
        "git-2",
        format!(
            "#!/bin/sh\n\
             case \" $* \" in\n\
             *' fast-import '*) echo $$ > '{marker}'; read line < '{release}' ;;\n\
             esac\n\
             exec '{git}' \"$@\"\n",
            marker = marker.display(),
            release = release.display(),
            git = git.display()
        ),
    );
    // Requests look at git's binary at most once a second: HEADs until one
    // runs the canary (it waits for it), each bounded.
    let asking = std::thread::spawn({
        let base = archiver.base_url.clone();
        let marker = marker.clone();
        move || {
            let client = gitball_e2e::http_client();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut answers = Vec::new();
            while Instant::now() < deadline {
                let started = std::fs::metadata(&marker).is_ok();
                answers.push(
                    client
                        .head(format!("{base}/acme/widget/archive/main.tar"))
                        .send()
                        .map_or(0, |response| response.status().as_u16()),
                );
                if started {
                    break;
                }
            }
            answers
        }
    });
    let mut canary = None;
    wait_until(Duration::from_secs(30), || {
        canary = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        canary.is_some()
    });
    let metrics = archiver.metrics();
    let canary_running = canary.is_some_and(process_alive);
    writeln!(fifo, "go").expect("release the canary");
    let answers = asking.join().expect("the requests' thread");
    assert!(canary_running, "no canary ran: {canary:?}");
    assert_eq!(
        metrics.get("gitball_archiver_generations_in_flight", &[]),
        Some(0.0),
        "the canary's git counted as a generation"
    );
    assert!(
        answers.iter().all(|status| *status == 200),
        "the requests, the one that ran the canary included: {answers:?}"
    );
}

/// The same while the cache dir is opened: a warm restart hashes every
/// archive it keeps again, which for a large cache takes seconds (here a
/// sparse 16 GiB file named as an archive, never read to its end).
#[test]
fn a_sigterm_while_the_cache_dir_is_checked_ends_the_start_at_once() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    for (binary, cache) in [
        ("gitball-archiver", "cache-a"),
        ("gitball-proxy", "cache-p"),
    ] {
        let cache = sandbox.path(cache);
        std::fs::create_dir_all(&cache).expect("the cache dir");
        std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod the cache dir");
        let archive = cache.join(format!("{}-{}", "a".repeat(64), "b".repeat(64)));
        std::fs::File::create(&archive)
            .and_then(|file| file.set_len(16 << 30))
            .expect("a sparse archive");
        let args = ["--cache-max-bytes".as_ref(), "32GiB".as_ref()];
        // Its run logs the crawler budget just before it opens the cache.
        sigterm_while_starting(&sandbox, binary, &cache, &args, |log| {
            log.contains("crawler budget").then_some(())
        });
    }
}

/// Starts `binary` over the sandbox's repositories with the cache dir
/// `cache` and `args`, sends SIGTERM once `started` (given the log so far)
/// says it is where the test wants it, and checks that it then ends the
/// start at once: a clean exit that served nothing. Returns what `started`
/// found.
fn sigterm_while_starting<T>(
    sandbox: &Sandbox,
    binary: &str,
    cache: &Path,
    args: &[&std::ffi::OsStr],
    mut started: impl FnMut(&str) -> Option<T>,
) -> T {
    let log = sandbox.path(&format!("{binary}.log"));
    let mut child = std::process::Command::new(gitball_e2e::binary_path(binary))
        .args(["--listen", "127.0.0.1:0", "--repos"])
        .arg(sandbox.repos())
        .arg("--cache-dir")
        .arg(cache)
        .args(["--shutdown-grace", "1"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the log file"))
        .spawn()
        .expect("run the binary");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut found = None;
    if !wait_until(Duration::from_secs(10), || {
        found = started(&read_log());
        found.is_some()
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{binary} never got where the test waits:\n{}", read_log());
    }
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // The grace and the 5 s for generations to stop; it needs neither.
    let exited = wait_until(Duration::from_secs(6), || {
        child.try_wait().expect("wait").is_some()
    });
    let took = signalled.elapsed();
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let log = read_log();
    assert!(
        exited,
        "{binary}: still running {took:?} after SIGTERM:\n{log}"
    );
    assert!(status.success(), "{binary}: {status}:\n{log}");
    assert!(
        log.contains("shut down while starting; nothing was served"),
        "{binary}:\n{log}"
    );
    assert!(!log.contains("serving"), "{binary}:\n{log}");
    found.expect("checked above")
}

#[test]
fn sigterm_cuts_slow_downloads_after_the_grace_and_leaves_nothing_behind() {
    const GRACE: Duration = Duration::from_secs(1);
    let (mut archiver, slow) = a_slow_download_being_generated("1");
    let pid = archiver.pid;
    assert!(
        wait_until(Duration::from_secs(5), || archiver
            .cache_files()
            .iter()
            .any(|name| name.ends_with(".partial"))),
        "no partial file while generating: {:?}",
        archiver.cache_files()
    );
    let git = git_children(pid);
    assert_eq!(
        git.len(),
        1,
        "one git child while generating: {:?}",
        child_processes(pid)
    );

    // The grace, then at most the archiver's 5 s for generations to stop
    // (a level-19 zstd job in flight on a loaded machine takes seconds),
    // and a margin for the exit itself.
    let (status, took) = archiver.terminate(GRACE + Duration::from_secs(7));
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running {took:?} after SIGTERM; log:\n{}",
            archiver.log()
        )
    });
    eprintln!(
        "graceful shutdown: exited {status} {:.2} s after SIGTERM (grace {GRACE:?})",
        took.as_secs_f64()
    );
    assert!(status.success(), "exit status {status}");
    assert!(
        took >= GRACE,
        "exited after {took:?}, before the grace ran out"
    );
    left_nothing_behind(&archiver, git, slow);
}

/// An archiver over the big repository with `--shutdown-grace` `grace`
/// seconds, and a slow download of an archive it is still generating, its
/// first bytes read.
fn a_slow_download_being_generated(grace: &str) -> (Archiver, RawConnection) {
    let big = big_repo();
    let archiver = Archiver::start(
        &big.repos,
        &[SLOW_ZSTD[0], SLOW_ZSTD[1], "--shutdown-grace", grace],
    );
    let (mut slow, head) = open_download(&archiver, SLOW_PATH);
    assert_eq!(head.status, 200, "the slow download before SIGTERM");
    slow.read_body_bytes(4096)
        .expect("the slow download's first bytes");
    (archiver, slow)
}

/// What an archiver that cut its downloads at the end of its shutdown
/// leaves: no partial file, no git child, and `slow`, a download it cut,
/// ended as an abort, not as a clean end of a short archive.
fn left_nothing_behind(archiver: &Archiver, git: Vec<u32>, mut slow: RawConnection) {
    let leftovers: Vec<String> = archiver
        .cache_files()
        .into_iter()
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    for child in git {
        assert!(
            !process_alive(child),
            "git child {child} outlived the archiver"
        );
    }
    let end = slow.read_body_to_end(|_| {});
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "the cut download ended {end:?}"
    );
}

/// `docs/archiver.md` (Shutdown drain): a second SIGTERM or SIGINT during
/// the drain ends the grace at once, and the exit is the one after a grace
/// that ran out: downloads cut (aborted), git killed, partial files gone.
/// Before, the handlers swallowed it: the drain went on for the whole
/// grace, and only a SIGKILL (which leaves partial files and git children)
/// stopped it sooner.
#[test]
fn a_second_signal_ends_the_shutdown_grace_at_once() {
    let (mut archiver, slow) = a_slow_download_being_generated("600");
    let pid = archiver.pid;
    let git = git_children(pid);
    assert_eq!(git.len(), 1, "one git child: {:?}", child_processes(pid));

    archiver.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || archiver
            .log()
            .contains("SIGTERM: shutting down")),
        "the first SIGTERM was not logged"
    );
    assert!(archiver.is_running(), "exited before the grace ran out");
    let started = Instant::now();
    archiver.signal(nix::sys::signal::Signal::SIGINT);
    // The archiver's 5 s for generations to stop, and a margin.
    let exit = archiver.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    let status = exit.unwrap_or_else(|| {
        panic!(
            "still draining {took:?} after a second signal (grace 600 s); log:\n{}",
            archiver.log()
        )
    });
    assert!(status.success(), "exit status {status}");
    assert!(
        archiver
            .log()
            .contains("SIGINT again: ending the shutdown grace now"),
        "the second signal was not logged"
    );
    left_nothing_behind(&archiver, git, slow);
}

/// `docs/http.md`: the request head must arrive within 10 s, else the connection
/// is closed (a slowloris client cannot hold a connection open).
///
/// The test mostly waits. libtest starts a file's tests in name order, so a
/// name early in the alphabet lets the wait overlap the busy tests.
#[test]
fn connection_whose_request_head_does_not_arrive_in_ten_seconds_is_cut() {
    use std::io::Write;
    let (_, archiver) = widget_archiver(&[]);
    let mut stream = std::net::TcpStream::connect(archiver.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    // A head that never ends.
    stream
        .write_all(b"GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let elapsed = started.elapsed();
    println!("incomplete head cut after {elapsed:?}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&elapsed),
        "the connection was closed after {elapsed:?}, not ~10 s"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(archiver.health_status(), Some(200));
}

/// `docs/http.md`: on a kept-alive connection the 10 s for the next head
/// start when the previous response ends, whether hyper wrote it (a JSON
/// `404`) or the loop sent a cached file around hyper (`sendfile`, then
/// the connection handed back): an idle client cannot hold a connection,
/// and with it a place under `--max-connections`.
#[test]
fn an_idle_kept_alive_connection_is_closed_ten_seconds_after_its_response() {
    let big = big_repo();
    let archiver = Archiver::start(&big.repos, &[]);
    let cached = "/acme/big/archive/main.tar";
    let (head, _, end) = RawConnection::request(archiver.addr, "GET", cached, &[]).unwrap();
    assert_eq!((head.status, end), (200, BodyEnd::Complete), "cold");
    let addr = archiver.addr;
    let idle = [
        ("a JSON 404", "/acme/nothing/archive/main.tar", 404),
        ("a cached file sent around hyper", cached, 200),
    ]
    .map(|(what, target, status)| {
        std::thread::spawn(move || {
            let mut connection = RawConnection::connect(addr).unwrap();
            connection
                .stream()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            connection.send_request("GET", target, &[]).unwrap();
            let head = connection.read_head().unwrap();
            assert_eq!(head.status, status, "{what}");
            if status == 200 {
                assert_eq!(head.header("x-gitball-cache"), Some("hit"), "{what}");
            }
            let end = connection.read_body_to_end(|_| {});
            assert_eq!(end, BodyEnd::Complete, "{what}");
            let ended = Instant::now();
            let rest = connection.read_to_close();
            (what, ended.elapsed(), rest)
        })
    });
    for thread in idle {
        let (what, elapsed, rest) = thread.join().unwrap();
        println!("{what}: idle connection closed after {elapsed:?}");
        assert!(
            (Duration::from_secs(9)..Duration::from_secs(15)).contains(&elapsed),
            "{what}: closed {elapsed:?} after the response, not ~10 s"
        );
        assert!(rest.is_empty(), "{what}: sent {} more bytes", rest.len());
    }
}

/// `docs/archiver.md`: `--max-generations` children at a time; a generation that waits
/// in the queue longer than `--queue-timeout` gets `503` + `Retry-After`,
/// and the queue gauge goes back to 0.
#[test]
fn full_generation_queue_answers_503_with_retry_after() {
    let big = big_repo();
    let archiver = Archiver::start(
        &big.repos,
        &[
            SLOW_ZSTD[0],
            SLOW_ZSTD[1],
            "--max-generations",
            "1",
            "--queue-timeout",
            "0.5",
        ],
    );
    // Take the only slot: the slow generation starts, then its client
    // leaves (the generation goes on without it).
    {
        let mut slow = RawConnection::connect(archiver.addr).unwrap();
        slow.send_request("GET", SLOW_PATH, &[]).unwrap();
        let head = slow.read_head().unwrap();
        assert_eq!(head.status, 200);
    }
    assert_eq!(
        archiver
            .metrics()
            .get("gitball_archiver_generations_in_flight", &[]),
        Some(1.0)
    );
    // The series exists at 0 before the first 503 (docs/observability.md,
    // "Series at start-up"): `GitballArchiverShedding` takes its
    // `increase()`, which sees nothing of the event a series is born with.
    let busy = [("format", "tar"), ("cache", "miss"), ("code", "503")];
    assert_eq!(
        archiver
            .metrics()
            .get("gitball_archiver_requests_total", &busy),
        Some(0.0),
        "requests_total{{format=\"tar\",cache=\"miss\",code=\"503\"}} before the first 503"
    );
    let started = Instant::now();
    let (head, body, _) =
        RawConnection::request(archiver.addr, "GET", "/acme/big/archive/main.tar", &[]).unwrap();
    let waited = started.elapsed();
    assert_eq!(head.status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(
        head.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok())
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "busy");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(10),
        "503 after {waited:?}, not after the 0.5 s queue timeout"
    );
    // A generation that never got a slot is not a finished one
    // (`docs/observability.md`): only `requests_total` shows it. The slow
    // one still runs, so nothing has finished.
    let metrics = archiver.metrics();
    assert_eq!(
        (
            metrics.sum("gitball_archiver_generations_total", &[]),
            metrics.get("gitball_archiver_generations_in_flight", &[]),
        ),
        (0.0, Some(1.0)),
        "the busy generation was counted as finished"
    );
    assert_eq!(
        metrics.sum("gitball_archiver_requests_total", &[("code", "503")]),
        1.0
    );
    assert_eq!(
        archiver
            .metrics()
            .get("gitball_archiver_generations_queued", &[]),
        Some(0.0)
    );
    assert_eq!(archiver.health_status(), Some(200));
}

/// A generation's time is counted from its slot, not from its request:
/// `--generation-timeout` is "counted after the queue" (docs/archiver.md,
/// flags) and `generation_duration_seconds` runs from the "generation
/// start (after the queue) to its end" (docs/observability.md). With one
/// slot, a generation queued behind one that runs until the timeout kills
/// it has waited a whole timeout; it still gets its own, completes, and its
/// duration leaves the wait out. (Mutation review: a timeout or a duration
/// counted from the request passed every test; each fails this one.)
#[test]
fn a_generations_timeout_and_duration_count_from_its_slot_not_its_queue() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let (stub, mut release) = sandbox.git_that_pauses("git-that-waits", 0);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &[
            "--git",
            stub.to_str().unwrap(),
            "--max-generations",
            "1",
            "--generation-timeout",
            "6",
        ],
    );
    let addr = archiver.addr;
    let get = move |path: &'static str| {
        std::thread::spawn(move || RawConnection::request(addr, "GET", path, &[]).unwrap())
    };
    // Sent together: one takes the slot, its git paused until the timeout
    // kills it; the other waits in the queue all that time.
    let requests = [
        get("/acme/widget/archive/v1.2.3.tar"),
        get("/acme/widget/archive/v2.0.0.tar"),
    ];
    assert!(
        wait_until(Duration::from_secs(10), || {
            let metrics = archiver.metrics();
            metrics.value("gitball_archiver_generations_in_flight", &[]) == 1.0
                && metrics.value("gitball_archiver_generations_queued", &[]) == 1.0
        }),
        "one generation never started, or the other never queued"
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            let metrics = archiver.metrics();
            metrics.sum(
                "gitball_archiver_generations_total",
                &[("outcome", "timeout")],
            ) == 1.0
                && metrics.value("gitball_archiver_generations_in_flight", &[]) == 1.0
        }),
        "the first did not time out, or the queued one did not start: {:?}",
        archiver
            .metrics()
            .series_of("gitball_archiver_generations_total")
    );
    // The queued one now runs, its git taking a second (not a bound on
    // anything: well within the timeout it has of its own, well past what
    // is left of one counted from its request).
    std::thread::sleep(Duration::from_secs(1));
    std::io::Write::write_all(&mut release, b"go\n").unwrap();
    let mut answers: Vec<_> = requests
        .map(|request| request.join().unwrap())
        .into_iter()
        .map(|(head, _, end)| (head.status, matches!(end, BodyEnd::Complete)))
        .collect();
    answers.sort();
    assert_eq!(
        answers[0],
        (200, true),
        "the queued generation got no time of its own: {answers:?}"
    );
    assert_ne!(answers[1].0, 200, "{answers:?}");

    let metrics = archiver.metrics();
    assert_eq!(
        metrics.sum(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "ok")]
        ),
        1.0
    );
    let duration = "gitball_archiver_generation_duration_seconds";
    assert_eq!(
        metrics.value(&format!("{duration}_count"), &[("format", "tar")]),
        2.0
    );
    // The first ran 6 s; the second, which waited as long in the queue,
    // ran about 1 s.
    assert_eq!(
        metrics.value(
            &format!("{duration}_bucket"),
            &[("format", "tar"), ("le", "5")]
        ),
        1.0,
        "{:?}",
        metrics.series_of(&format!("{duration}_bucket"))
    );
}

/// The shadow git dirs live in a private directory of the cache dir
/// (`shadows-*`, mode 0700) that is removed at exit (docs/archiver.md, "No
/// command from the repository": "removed at exit, and at the next start
/// after a kill"): after a SIGTERM, the cache dir holds the archives and
/// nothing else. (Mutation review: a shadows directory left behind at
/// exit passed every test, whose listing of the cache dir leaves
/// `shadows-*` out.)
#[test]
fn the_shadow_git_dirs_are_private_and_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let mut archiver = Archiver::start(&sandbox.repos(), &[]);
    let response = archiver.get("/acme/widget/archive/v1.2.3.tar.gz");
    assert_eq!(response.status().as_u16(), 200);
    // The whole body: the generation completed, its file renamed.
    response.bytes().unwrap();
    let shadows: Vec<_> = std::fs::read_dir(&archiver.cache_dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("shadows-"))
        .collect();
    assert_eq!(shadows.len(), 1, "one shadows dir while running");
    let mode = shadows[0].metadata().unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o700, "{mode:o}");
    let files = archiver.cache_files();
    assert_eq!(files.len(), 1, "{files:?}");

    let (status, _) = archiver.terminate(Duration::from_secs(20));
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
    let mut left = gitball_e2e::git::dir_file_names(&archiver.cache_dir);
    left.sort();
    assert_eq!(left, files, "the cache dir after the exit");
}

/// A `--max-archive-bytes` given above `--cache-max-bytes` starts the
/// archiver with a warning (docs/archiver.md, flags: "the archiver starts
/// but warns. Such archives could never fit (the default never does)"):
/// the default, `--cache-max-bytes` when smaller than 4 GiB, warns of
/// nothing. (Mutation review: starting without the warning passed every
/// test.)
#[test]
fn a_max_archive_bytes_above_the_cache_bound_starts_with_a_warning() {
    const WARNING: &str = "archives larger than --cache-max-bytes cannot be generated";
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let warned = Archiver::start(
        &sandbox.repos(),
        &["--cache-max-bytes", "1MiB", "--max-archive-bytes", "2MiB"],
    );
    assert_eq!(warned.health_status(), Some(200));
    assert!(warned.log().contains(WARNING), "{}", warned.log());
    drop(warned);
    for args in [
        &["--cache-max-bytes", "1MiB"][..],
        &["--cache-max-bytes", "1MiB", "--max-archive-bytes", "1MiB"][..],
    ] {
        let quiet = Archiver::start(&sandbox.repos(), args);
        assert_eq!(quiet.health_status(), Some(200), "{args:?}");
        assert!(!quiet.log().contains(WARNING), "{args:?}: {}", quiet.log());
    }
}

/// A git that cannot archive the canary stops the start with the reason
/// (docs/archiver.md, "The git it runs": "A git that cannot archive the
/// canary stops the start with the reason"): the archiver exits, its
/// stderr saying so and what git said. (Mutation review: an archiver
/// that served on after its start-up canary failed passed every test.)
#[test]
fn a_git_that_cannot_archive_the_canary_stops_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let broken = sandbox.path("broken-git");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'this git is broken' >&2\nexit 1\n",
    )
    .expect("write the broken git");
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let stderr = gitball_e2e::start_refused(
        "gitball-archiver",
        &sandbox.repos(),
        &sandbox.path("cache"),
        &["--git".as_ref(), broken.as_os_str()],
    );
    assert!(
        stderr.contains("cannot archive a canary tree") && stderr.contains("this git is broken"),
        "{stderr}"
    );
}

/// Start-up fails with a message naming the flag, as docs/archiver.md's
/// flags section says: `--repos` that is no directory, a `--token-file`
/// that cannot be read or is empty, a `--cache-dir` that cannot be made,
/// and no `git` on `PATH` without `--git`. (Docs review: the cache dir's
/// and git's messages named no flag, so an operator of the env files
/// could not tell which setting was wrong.)
#[test]
fn start_up_failures_name_the_flag() {
    let sandbox = Sandbox::new();
    sandbox.repo("acme", "widget");
    let repos = sandbox.repos();
    let cache = sandbox.path("cache");
    let not_a_dir = sandbox.path("a-file");
    std::fs::write(&not_a_dir, "not a directory\n").expect("write a file");
    let empty = sandbox.path("empty.token");
    std::fs::write(&empty, "\n").expect("write an empty token");
    let refused = |repos: &Path, cache: &Path, args: &[&std::ffi::OsStr]| {
        gitball_e2e::start_refused("gitball-archiver", repos, cache, args)
    };
    let cases = [
        ("--repos", refused(&sandbox.path("missing"), &cache, &[])),
        (
            "--token-file",
            refused(
                &repos,
                &cache,
                &["--token-file".as_ref(), empty.as_os_str()],
            ),
        ),
        (
            "--token-file",
            refused(
                &repos,
                &cache,
                &[
                    "--token-file".as_ref(),
                    sandbox.path("missing.token").as_os_str(),
                ],
            ),
        ),
        (
            "--cache-dir",
            refused(&repos, &not_a_dir.join("cache"), &[]),
        ),
    ];
    for (flag, stderr) in cases {
        assert!(stderr.contains(flag), "no {flag} in: {stderr}");
    }
    // No git on PATH, and no --git.
    let mut child = std::process::Command::new(gitball_e2e::binary_path("gitball-archiver"))
        .args(["--listen", "127.0.0.1:0", "--repos"])
        .arg(&repos)
        .arg("--cache-dir")
        .arg(&cache)
        .env("PATH", sandbox.path("no-programs-here"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the archiver");
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().expect("wait").is_some()
    });
    if !exited {
        child.kill().expect("kill");
    }
    let output = child.wait_with_output().expect("its stderr");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        exited && !output.status.success(),
        "started without git: {stderr}"
    );
    assert!(stderr.contains("--git"), "no --git in: {stderr}");
}

/// docs/archiver.md, "Limits": a generation whose archive grew past
/// `--max-archive-bytes` stops its git at once, not at git's next write.
/// Here git (a stub) writes its first 64 KiB, four times the bound, and
/// then writes nothing more: the download ends (a `500`, or a `200` cut)
/// within seconds and git is gone. (The generation waited for git's next
/// write, which never came: the request hung until the client gave up.)
#[test]
fn a_generation_past_the_bound_stops_its_git_at_once() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "big");
    repo.write("data.bin", pseudo_random_bytes(12, 256 * 1024));
    let commit = repo.commit_all(T1, "big");
    let (stub, mut release) = sandbox.git_that_pauses("git-that-stops", 65_536);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &[
            "--git",
            stub.to_str().unwrap(),
            "--max-archive-bytes",
            "16KiB",
        ],
    );
    let started = Instant::now();
    let mut connection = RawConnection::connect(archiver.addr).unwrap();
    connection
        .send_request("GET", &format!("/acme/big/archive/{commit}.tar"), &[])
        .unwrap();
    let head = connection.read_head().expect("an answer");
    if head.status == 200 {
        let end = connection.read_body_to_end(|_| {});
        assert!(
            matches!(end, BodyEnd::Aborted(_)),
            "the cut archive: {end:?}"
        );
    } else {
        assert_eq!(head.status, 500);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the download ended after {took:?}: the generation waited for git"
    );
    assert!(
        wait_until(Duration::from_secs(10), || child_processes(archiver.pid)
            .is_empty()),
        "git is still running: {:?}",
        child_processes(archiver.pid)
    );
    // Were it still waiting, this would let it go.
    let _ = std::io::Write::write_all(&mut release, b"go\n");
}
