//! Cache hits and push visibility: the archiver remembers what a ref
//! resolved to, and a push must still show on the very next request.
//!
//! The archiver remembers an answer only for ref files that have not
//! changed for its racy window (2 s); a ref pushed in a tight loop is read
//! afresh each time, and one that had settled is answered from memory
//! until a stat of its files shows a change. Both are driven here against
//! the real binary with real git.

use std::time::Duration;

use gitball_e2e::{Archiver, RepoBuilder, Sandbox, deleted_files_mapped, refs_settled, wait_until};

/// 2024-01-02T03:04:05Z.
const T1: i64 = 1_704_164_645;

const ITERATIONS: usize = 50;

fn commit_of_download(archiver: &Archiver, path: &str) -> String {
    let response = archiver.get(path);
    assert_eq!(response.status(), 200, "{path}");
    let commit = response
        .headers()
        .get("x-gitball-commit")
        .expect("X-Gitball-Commit")
        .to_str()
        .unwrap()
        .to_owned();
    // The body is read whole: a download, not just a head.
    assert!(!response.bytes().unwrap().is_empty());
    commit
}

fn small_repository(repo: &RepoBuilder) -> String {
    repo.write("README", "hello\n");
    repo.commit_all(T1, "one")
}

/// A commit on `parent` that no ref points at yet.
fn new_commit(repo: &RepoBuilder, parent: &str, n: usize) -> String {
    let tree = repo.rev_parse(&format!("{parent}^{{tree}}"));
    repo.git_at(
        T1 + n as i64,
        &["commit-tree", &tree, "-p", parent, "-m", &format!("c{n}")],
    )
}

#[test]
fn each_push_in_a_tight_loop_shows_on_the_next_download() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    let mut head = small_repository(&repo);
    // Every push is a cold generation for one client: beyond the crawler
    // budget's burst. The budget is not what this test is about.
    let archiver = Archiver::start(&sandbox.repos(), &["--client-cold-rate", "0"]);
    for n in 0..ITERATIONS {
        assert_eq!(
            commit_of_download(&archiver, "/acme/widget/archive/HEAD.tar.gz"),
            head
        );
        head = new_commit(&repo, &head, n + 1);
        // As a push does: a lock file renamed over the ref.
        repo.git(&["update-ref", "refs/heads/master", &head]);
        repo.git(&["update-ref", "refs/heads/main", &head]);
        assert_eq!(
            commit_of_download(&archiver, "/acme/widget/archive/main.tar.gz"),
            head,
            "iteration {n}"
        );
    }
}

#[test]
fn remembered_refs_show_every_kind_of_change_on_the_next_download() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    let first = small_repository(&repo);
    let git_dir = repo.dir().join(".git");
    // Half the branches packed, half loose.
    let half = ITERATIONS / 2;
    for n in 0..half {
        repo.git(&["branch", &format!("packed-{n}"), &first]);
    }
    repo.git(&["branch", "packed-last", &first]);
    repo.git(&["pack-refs", "--all"]);
    for n in 0..half {
        repo.git(&["branch", &format!("loose-{n}"), &first]);
    }
    // Every push is a cold generation for one client: beyond the crawler
    // budget's burst. The budget is not what this test is about.
    let archiver = Archiver::start(&sandbox.repos(), &["--client-cold-rate", "0"]);
    assert!(
        wait_until(Duration::from_secs(30), || refs_settled(&git_dir)),
        "the ref files never got older than the racy window"
    );
    // Now each answer is remembered by the archiver.
    let names: Vec<String> = (0..half)
        .flat_map(|n| [format!("packed-{n}"), format!("loose-{n}")])
        .collect();
    for name in names.iter().chain([&"packed-last".to_owned()]) {
        let path = format!("/acme/widget/archive/{name}.tar");
        assert_eq!(commit_of_download(&archiver, &path), first, "{name}");
    }
    assert!(
        refs_settled(&git_dir),
        "something touched the refs meanwhile"
    );

    for (n, name) in names.iter().enumerate() {
        let path = format!("/acme/widget/archive/{name}.tar");
        let moved = new_commit(&repo, &first, n + 1);
        // Even `n` are packed branches, odd ones loose.
        match n % 6 {
            // A push: a loose ref that now shadows the packed one, or a
            // lock file renamed over the loose ref.
            0 | 1 => {
                repo.git(&["update-ref", &format!("refs/heads/{name}"), &moved]);
            }
            // A tag of the same name, which git's order puts first.
            2 | 5 => {
                repo.git(&["tag", name, &moved]);
            }
            // The same byte count rewritten in place, as no git does: only
            // the stamp's times tell (not size, not inode).
            3 => {
                std::fs::write(git_dir.join("refs/heads").join(name), format!("{moved}\n")).unwrap()
            }
            // Deleted, with the packed ref still there.
            _ => {
                repo.git(&["update-ref", &format!("refs/heads/{name}"), &moved]);
                assert_eq!(commit_of_download(&archiver, &path), moved, "{name}");
                let loose = git_dir.join("refs/heads").join(name);
                std::fs::remove_file(loose).unwrap();
                assert_eq!(commit_of_download(&archiver, &path), first, "{name}");
                continue;
            }
        }
        assert_eq!(commit_of_download(&archiver, &path), moved, "{name}");
    }

    // `packed-refs` rewritten in place, same size, for a branch that was
    // remembered all along.
    let packed = std::fs::read_to_string(git_dir.join("packed-refs")).unwrap();
    let moved = new_commit(&repo, &first, 1_000);
    let rewritten = packed.replace(
        &format!("{first} refs/heads/packed-last\n"),
        &format!("{moved} refs/heads/packed-last\n"),
    );
    assert_ne!(packed, rewritten);
    std::fs::write(git_dir.join("packed-refs"), rewritten).unwrap();
    assert_eq!(
        commit_of_download(&archiver, "/acme/widget/archive/packed-last.tar"),
        moved
    );

    // Deleted: gone at once.
    repo.git(&["branch", "-D", "loose-1"]);
    let response = archiver.get("/acme/widget/archive/loose-1.tar");
    assert_eq!(response.status(), 404);
}

/// A repository the archiver has opened keeps its packs mapped (gix reads
/// objects through them). One removed from `--repos` (deleted, or moved
/// away) was let go only when asked for again, or once 1,024 other
/// repositories had been opened since: until then its packs' disk space
/// stayed taken, however large, after `rm -rf`. The archiver lets go of
/// removed repositories within seconds (docs/archiver.md, "Repository
/// layout").
#[test]
fn a_removed_repository_is_let_go_without_being_asked_for_again() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    small_repository(&repo);
    repo.git(&["repack", "-adq"]);
    let git_dir = repo.dir().join(".git");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let response = archiver.get("/acme/widget/archive/main.tar");
    assert_eq!(response.status(), 200);
    response.bytes().unwrap();
    let packs = git_dir.join("objects/pack");
    assert!(
        std::fs::read_to_string(format!("/proc/{}/maps", archiver.pid))
            .unwrap()
            .contains(&*packs.to_string_lossy()),
        "the archiver does not map the repository's pack"
    );

    std::fs::remove_dir_all(repo.dir()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || deleted_files_mapped(
            archiver.pid,
            &packs
        )
        .is_empty()),
        "30 s after the repository was removed, the archiver still maps {:?}",
        deleted_files_mapped(archiver.pid, &packs)
    );
}

/// Packs that `git repack -d` (or `gc`) replaced in a repository still
/// served: the archiver's handle kept them mapped, and their disk space
/// taken, until gix next missed an object and listed the pack directory
/// again; on a repository nobody pushes to, until a restart. The archiver
/// lets go of a handle whose pack directories changed within seconds,
/// asked for again or not (docs/archiver.md, "Repository layout").
#[test]
fn packs_a_repack_replaced_are_let_go_without_being_asked_for_again() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    small_repository(&repo);
    repo.git(&["repack", "-adq"]);
    let packs = repo.dir().join(".git/objects/pack");
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    assert!(!commit_of_download(&archiver, "/acme/widget/archive/main.tar").is_empty());
    assert!(
        std::fs::read_to_string(format!("/proc/{}/maps", archiver.pid))
            .unwrap()
            .contains(&*packs.to_string_lossy()),
        "the archiver does not map the repository's pack"
    );

    // Another commit, and a repack that replaces the one pack with one
    // holding both commits.
    repo.write("more", "more\n");
    repo.commit_all(T1 + 1, "two");
    repo.git(&["repack", "-adq"]);
    assert!(
        wait_until(Duration::from_secs(30), || deleted_files_mapped(
            archiver.pid,
            &packs
        )
        .is_empty()),
        "30 s after a repack replaced its pack, the archiver still maps {:?}",
        deleted_files_mapped(archiver.pid, &packs)
    );
    // The repository is served as before, from its new pack.
    assert_eq!(
        commit_of_download(&archiver, "/acme/widget/archive/main.tar"),
        repo.rev_parse("main")
    );
}
