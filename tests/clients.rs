//! End-to-end tests of what the download clients people run ask for,
//! replayed as the exact requests they send (so the tests need none of
//! them installed): curl, wget, aria2, Python's `urllib` and `requests`.
//!
//! What they do that a browser does not: resume with a bare `Range`
//! (`curl -C -`, `wget -c`), and refuse an answer that does not continue
//! the file (`curl -C -` exits 33 on a `200`).

use std::time::Duration;

use gitball_e2e::proxy::Cluster;
use gitball_e2e::{Archiver, RawConnection, Sandbox, pseudo_random_bytes, wait_until};

/// 2024-01-02T03:04:05Z.
const T1: i64 = 1_704_164_645;

/// A resume, `Range: bytes={n}-` without `If-Range` (what `curl -C -`
/// and `wget -c` send), of an archive that is not complete in the cache
/// (evicted since the first half came, or still being generated) gets a
/// `206` with the rest once the archive is complete, directly and through
/// the proxy, even when generating takes longer than the proxy's
/// `--header-timeout` (`docs/http.md#range-requests`). Attack: such a resume got the
/// growing archive's whole body as a `200`; curl then exits 33 ("HTTP
/// server doesn't seem to support byte ranges. Cannot resume."), and aria2
/// starts a second file.
#[test]
fn a_resume_of_an_archive_not_yet_complete_gets_the_rest_once_it_is() {
    // The first bytes git writes before it waits for a line on the fifo.
    const FIRST: u64 = 100 * 1024;
    // Where the client's first half ended.
    const RESUME_AT: usize = 40_000;
    for through_proxy in [false, true] {
        let sandbox = Sandbox::new();
        let repo = sandbox.repo("acme", "large");
        repo.write("data.bin", pseudo_random_bytes(21, 300 * 1024));
        let commit = repo.commit_all(T1, "large");
        let expected = repo.archive("tar", "large-main/", &commit, None);
        let (stub, mut release) = sandbox.git_that_pauses("git-that-waits", FIRST);
        let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);
        let cache_dir = archiver.cache_dir.clone();
        let case = if through_proxy { "proxy" } else { "archiver" };
        let (addr, _cluster) = if through_proxy {
            // A generation slower than the proxy's header timeout (below).
            let cluster = Cluster::around(archiver, Vec::new(), &["--header-timeout", "1"]);
            (cluster.proxy.addr, Some(cluster))
        } else {
            (archiver.addr, None)
        };
        // curl -C - (7.88), as it sends it.
        let range = format!("bytes={RESUME_AT}-");
        let mut resume = RawConnection::connect(addr).expect("connect");
        resume
            .send_request(
                "GET",
                "/acme/large/archive/main.tar",
                &[
                    ("Range", range.as_str()),
                    ("User-Agent", "curl/7.88.1"),
                    ("Accept", "*/*"),
                ],
            )
            .expect("send the resume");
        // The resume started the generation: git wrote its first bytes and
        // waits. Only then may it finish.
        let partial_written = || {
            std::fs::read_dir(&cache_dir).is_ok_and(|entries| {
                entries.flatten().any(|entry| {
                    entry.file_name().to_string_lossy().ends_with(".partial")
                        && entry
                            .metadata()
                            .is_ok_and(|metadata| metadata.len() >= FIRST)
                })
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), partial_written),
            "{case}: the generation did not write its first {FIRST} bytes"
        );
        if through_proxy {
            // The generation outlasts `--header-timeout`: the resume waits
            // for a complete archive, as an HTTP/1.0 client's request does,
            // not for a head within that timeout (a 504).
            std::thread::sleep(Duration::from_millis(1_500));
        }
        std::io::Write::write_all(&mut release, b"go\n").expect("release git");
        let head = resume.read_head().expect("the resume's head");
        assert_eq!(
            head.status, 206,
            "{case}: a resume of an archive being generated got {} ({:?})",
            head.status, head.headers
        );
        assert_eq!(
            head.header("content-range"),
            Some(
                format!(
                    "bytes {RESUME_AT}-{}/{}",
                    expected.len() - 1,
                    expected.len()
                )
                .as_str()
            ),
            "{case}"
        );
        let rest = resume
            .read_body_bytes(expected.len() - RESUME_AT)
            .expect("the rest");
        assert!(
            rest == expected[RESUME_AT..],
            "{case}: the rest is not the archive's bytes from {RESUME_AT}"
        );
    }
}
