//! The zip the archiver writes from git's tar: entry by entry the same as
//! `git archive --format=zip` (on a synthetic repository with every kind of
//! entry, and on a real one: this project's own history), read by
//! independent readers, and a new byte series that a restart over an older
//! series' cache file does not serve.

use std::path::{Path, PathBuf};
use std::process::Command;

use gitball_e2e::{
    Archiver, RepoBuilder, Sandbox, SeriesRepo, assert_same_zip_entries, assert_zip_readers_accept,
    proc_status_kib, pseudo_random_bytes, pseudo_text, zip_entry_names,
};

/// 2024-01-02T03:04:05Z.
const T1: i64 = 1_704_164_645;

#[test]
fn zip_entries_match_git_archive_for_every_kind_of_entry() {
    let sandbox = Sandbox::new();
    let source = sandbox.source_repo("src/kinds");
    source.write("README.md", "# kinds\n");
    source.write("naïve/日本語 ファイル.txt", "non-ASCII name\n");
    let long = format!("deep/{}/{}.txt", "a".repeat(120), "b".repeat(140));
    source.write(&long, "a name longer than tar's 100 bytes\n");
    source.symlink("links/far", &format!("../{long}"));
    source.symlink("links/near", "../README.md");
    source.write_executable("bin/run.sh", "#!/bin/sh\nexec true\n");
    source.write("empty", "");
    source.write("bin/data.bin", pseudo_random_bytes(7, 3000));
    // Larger than one block of the zip writer: streamed, compressible and
    // not (git stores what deflate does not shrink; the entry is the same).
    source.write("big/words.txt", pseudo_text(8, 2_500_000));
    source.write("big/noise.bin", pseudo_random_bytes(9, 1_500_000));
    source.write(
        ".gitattributes",
        "secret/ export-ignore\nversion.txt export-subst\n",
    );
    source.write("secret/key.txt", "not in the archive\n");
    source.write("version.txt", "commit $Format:%H$ at $Format:%ct$\n");
    let first = source.commit_all(T1, "kinds");
    // A submodule (gitlink): git writes it as an empty directory.
    source.git(&[
        "update-index",
        "--add",
        "--cacheinfo",
        &format!("160000,{first},vendor/lib"),
    ]);
    source.git_at(T1 + 60, &["commit", "-q", "-m", "submodule"]);
    let repo = source.clone_bare(&sandbox.repos().join("acme/kinds.git"));
    let commit = repo.rev_parse("main");

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let (body, cache) = archiver.get_body_and_cache("/acme/kinds/archive/main.zip");
    assert_eq!(cache, "miss");
    let git_zip = repo.archive("zip", "kinds-main/", &commit, None);
    assert_same_zip_entries(&body, &git_zip, "kinds main.zip");
    let names = zip_entry_names(&body);
    assert!(
        names.contains(&"kinds-main/vendor/lib/".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|name| name.contains("secret")),
        "{names:?}"
    );
    assert_zip_readers_accept(&body, names.len(), "kinds main.zip");
}

/// The "text" bit of an entry (its internal attributes) is git's: text
/// when the first 8,000 bytes hold no NUL (`docs/urls.md`, Formats). A NUL
/// at byte 7,999 makes an entry binary, one at byte 8,000 does not, in a
/// small entry and in one streamed in blocks. (Mutation review: sniffing
/// only the first 800 bytes passed every test, the entry comparison's
/// files having their first NUL early or not at all.)
#[test]
fn an_entrys_text_bit_looks_for_a_nul_in_its_first_8000_bytes_as_gits_does() {
    let with_nul_at = |position: usize, len: usize| {
        let mut bytes = pseudo_text(11, len);
        bytes[position] = 0;
        bytes
    };
    let sandbox = Sandbox::new();
    let source = sandbox.source_repo("src/sniff");
    source.write("nul-at-7999.bin", with_nul_at(7_999, 20_000));
    source.write("nul-at-8000.txt", with_nul_at(8_000, 20_000));
    source.write("big/nul-at-7999.bin", with_nul_at(7_999, 1_500_000));
    source.write("big/nul-at-8000.txt", with_nul_at(8_000, 1_500_000));
    source.commit_all(T1, "NULs at the edge of git's sniff");
    let repo = source.clone_bare(&sandbox.repos().join("acme/sniff.git"));
    let commit = repo.rev_parse("main");

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let (body, _) = archiver.get_body_and_cache("/acme/sniff/archive/main.zip");
    let git_zip = repo.archive("zip", "sniff-main/", &commit, None);
    assert_same_zip_entries(&body, &git_zip, "sniff main.zip");
}

/// A commit time past the ustar mtime field (after year 2242; git clamps
/// the field and writes the real time in its global pax header): git's zip
/// carries the real time, and so does ours. Before, every entry had the
/// clamped time (review: attack).
#[test]
fn zip_entries_carry_a_commit_time_past_the_tar_field_as_git_does() {
    let sandbox = Sandbox::new();
    let source = sandbox.source_repo("src/future");
    source.write("README.md", "# from the future\n");
    source.write("src/lib.rs", "\n");
    source.commit_all(9_000_000_000, "far ahead");
    let repo = source.clone_bare(&sandbox.repos().join("acme/future.git"));
    let commit = repo.rev_parse("main");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let (body, _) = archiver.get_body_and_cache("/acme/future/archive/main.zip");
    let git_zip = repo.archive("zip", "future-main/", &commit, None);
    assert_same_zip_entries(&body, &git_zip, "future main.zip");
}

/// A symlink's target is its blob, which a push may fill with any bytes,
/// NULs included: git's zip stores the blob whole, and so does ours, for a
/// target in the tar's 100-byte `linkname` field (which git fills with the
/// blob, NUL-padded) as for a longer one (in a pax `linkpath` record).
/// Before, a target was cut at its first NUL: `safe\0../../etc/passwd` was
/// stored as `safe`, an entry git's zip does not have (attack).
#[test]
fn a_symlink_target_holding_a_nul_is_stored_whole_as_git_does() {
    let sandbox = Sandbox::new();
    let repo = RepoBuilder::init_bare(&sandbox.repos().join("acme/links.git"), &sandbox.home());
    let mut listing = Vec::new();
    for (name, target) in [
        ("nul-inside", b"safe\0../../etc/passwd".to_vec()),
        ("nul-first", b"\0tail".to_vec()),
        ("nul-in-a-long-one", [&b"x\0"[..], &[b'y'; 150]].concat()),
        ("plain", b"../README.md".to_vec()),
    ] {
        let blob = repo.git_with_input(None, &["hash-object", "-w", "--stdin"], &target);
        listing.extend_from_slice(format!("120000 blob {blob}\t{name}\0").as_bytes());
    }
    let tree = repo.git_with_input(None, &["mktree", "-z"], &listing);
    let commit = repo.git_at(T1, &["commit-tree", &tree, "-m", "links"]);
    repo.git(&["update-ref", "refs/heads/main", &commit]);

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let (body, _) = archiver.get_body_and_cache("/acme/links/archive/main.zip");
    let git_zip = repo.archive("zip", "links-main/", &commit, None);
    assert_same_zip_entries(&body, &git_zip, "links main.zip");
}

/// A zip's central directory grows with the number and length of its
/// entries' names, which the repository decides: here 8,776 entries with
/// paths of up to 8 KB, from a repository of a few objects (every tree
/// reuses one subtree), make 66 MiB of records. They are spilled to a
/// file, not held: the archiver's peak memory grew by 9 MiB (its queues).
/// Before, it grew by 85 MiB; an attacker's 262,144 entries took 1.2 GB
/// (review: attack).
#[test]
fn a_zip_central_directory_does_not_grow_the_archivers_memory() {
    let sandbox = Sandbox::new();
    let repo = RepoBuilder::init_bare(&sandbox.repos().join("evil/wide.git"), &sandbox.home());
    let blob = repo.git_with_input(None, &["hash-object", "-w", "--stdin"], b"x\n");
    let mut tree = repo.git_with_input(
        None,
        &["mktree"],
        format!("100644 blob {blob}\tf\n").as_bytes(),
    );
    for level in 0..4 {
        let listing: String = (0..8)
            .map(|i| format!("040000 tree {tree}\t{}{level}{i}\n", "n".repeat(2000)))
            .collect();
        tree = repo.git_with_input(None, &["mktree"], listing.as_bytes());
    }
    let commit = repo.git_with_input(
        Some(1_700_000_000),
        &["commit-tree", &tree, "-m", "wide"],
        b"",
    );
    repo.git(&["update-ref", "refs/heads/main", &commit]);
    let small = repo.git_with_input(
        None,
        &["mktree"],
        format!("100644 blob {blob}\tf\n").as_bytes(),
    );
    let small = repo.git_with_input(
        Some(1_700_000_000),
        &["commit-tree", &small, "-m", "small"],
        b"",
    );
    repo.git(&["update-ref", "refs/heads/small", &small]);

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let peak = || proc_status_kib(archiver.pid, "VmHWM") * 1024;
    // Warmed up: a zip generated, so the threads and buffers every zip
    // uses are counted before.
    let (warm, _) = archiver.get_body_and_cache("/evil/wide/archive/small.zip");
    assert!(!warm.is_empty());
    let before = peak();
    let (body, _) = archiver.get_body_and_cache("/evil/wide/archive/main.zip");
    let grown = peak().saturating_sub(before);
    let names = zip_entry_names(&body);
    assert_eq!(
        names.iter().filter(|name| name.ends_with("/f")).count(),
        4096
    );
    let central: usize = names.iter().map(|name| name.len() + 46).sum();
    assert!(central > 64 << 20, "{central} bytes of records");
    assert!(
        grown < 24 << 20,
        "the archiver's peak memory grew by {} MiB for a central directory of {} MiB",
        grown >> 20,
        central >> 20
    );
}

#[test]
fn zip_entries_match_git_archive_on_this_projects_history() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .arg("-C")
            .arg(manifest)
            .args(args)
            .output()
            .expect("run git");
        assert!(output.status.success(), "git {args:?}");
        String::from_utf8(output.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    let common_dir = PathBuf::from(git(&[
        "rev-parse",
        "--path-format=absolute",
        "--git-common-dir",
    ]));
    let commit = git(&["rev-parse", "HEAD"]);
    let sandbox = Sandbox::new();
    let destination = sandbox.repos().join("acme/gitball.git");
    let status = Command::new("git")
        .args(["clone", "-q", "--bare", "--no-tags", "--single-branch"])
        .arg(&common_dir)
        .arg(&destination)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .status()
        .expect("clone");
    assert!(status.success(), "clone {}", common_dir.display());
    // HEAD of this checkout may be on another branch than the clone's: a
    // ref of its own makes it reachable (`--require-reachable`).
    let fetched = Command::new("git")
        .arg(format!("--git-dir={}", destination.display()))
        .args(["fetch", "-q"])
        .arg(&common_dir)
        .arg(format!("{commit}:refs/heads/tested"))
        .status()
        .expect("fetch");
    assert!(fetched.success());

    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let (body, _) = archiver.get_body_and_cache(&format!("/acme/gitball/archive/{commit}.zip"));
    let names = zip_entry_names(&body);
    let prefix = names.first().expect("entries").clone();
    let git_zip = Command::new("git")
        .arg(format!("--git-dir={}", destination.display()))
        .args(["archive", "--format=zip"])
        .arg(format!("--prefix={prefix}"))
        .arg(&commit)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        // git writes DOS times in the local time zone; gitball in UTC.
        .env("TZ", "UTC")
        .output()
        .expect("git archive");
    assert!(git_zip.status.success());
    assert_same_zip_entries(&body, &git_zip.stdout, "this project's zip");
    assert_zip_readers_accept(&body, names.len(), "this project's zip");
}

#[test]
fn a_restart_does_not_serve_a_zip_of_the_older_byte_series() {
    let sandbox = Sandbox::new();
    let plain = SeriesRepo::new(&sandbox);
    let path = "/acme/plain/archive/main.zip";

    let (current, current_path) = plain.generate(&sandbox, path, "v6", "zip", "Zip(6)");

    // What archivers of older series left behind: git's own zip under the
    // key of v2 (where the zip was git's bytes, `Compression::None`), and
    // other bytes under v3's (whose zips of entries over 1 MiB could
    // differ from run to run) and v5's (whose symlink targets could be
    // cut short).
    std::fs::remove_file(&current_path).expect("remove the current file");
    let old = plain
        .repo
        .archive("zip", "plain-main/", &plain.commit, None);
    assert_ne!(old, current);
    std::fs::write(plain.cached_file("v2", "zip", "None", &old), &old).expect("write the old file");
    std::fs::write(plain.cached_file("v3", "zip", "Zip(6)", &old), &old)
        .expect("write the v3 file");
    std::fs::write(plain.cached_file("v5", "zip", "Zip(6)", &old), &old)
        .expect("write the v5 file");
    plain.assert_restart_generates(&sandbox, path, &current);
}
