//! End-to-end tests of `gitball-proxy` (`docs/urls.md`, `docs/http.md`,
//! `docs/proxy.md`, `docs/observability.md`): the real proxy binary in front
//! of real `gitball-archiver` processes, over repositories built with the
//! real `git`, on 127.0.0.1.
//!
//! Each test starts its own processes (killed on drop) and checks one
//! behaviour a client or an operator relies on: bytes and headers through the
//! proxy, rendezvous placement, failover and ejection, the backpressured
//! pipe (slow, idle and vanishing clients, an archiver dying mid-body),
//! routing table reloads, signed URLs, hostile input, embedded mode and the
//! upstream bearer token. What tests share is read-only: the small
//! repositories (built once per test process), the large ones (built once
//! per target dir) and a cache dir holding the complete 128 MiB archive,
//! which a test links into a cache dir of its own (see
//! `harness/fixtures.rs`).
//!
//! Build the binaries first: `cargo build -p gitball-archiver -p gitball-proxy`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gitball_e2e::proxy::{
    Cluster, Fetched, Proxy, Route, SmallRepository, big_repository, family_sum, fetch, fetch_ok,
    fetch_with, kill_hard, scrape, settled_fd_count, small_repository, start_archiver_at,
    tar_length, token, unix_now, write_atomically, write_routes,
};
use gitball_e2e::{
    Archiver, BodyEnd, RawConnection, RefusingPort, RepoBuilder, ResponseHead, Sandbox, Service,
    base64, binary_path, cached_dir, http_date, link_files, open_fd_count, pipe_through,
    process_dir, sha256_hex, vm_rss_bytes, wait_until,
};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Generous bound for a condition that normally holds within milliseconds.
const SETTLE: Duration = Duration::from_secs(10);

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    pipe_through("gzip", &["-dc"], bytes)
}

fn unzstd(bytes: &[u8]) -> Vec<u8> {
    pipe_through("zstd", &["-dc"], bytes)
}

/// Asserts two byte strings are equal without printing megabytes.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!("{what}: bytes differ at offset {at}");
    }
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
}

const ATTEMPTS: &str = "gitball_proxy_upstream_attempts_total";
const GENERATIONS: &str = "gitball_archiver_generations_total";

/// `upstream_attempts_total` for one upstream, all outcomes.
fn attempts_of(metrics: &gitball_e2e::Metrics, upstream: &str) -> f64 {
    metrics.sum(ATTEMPTS, &[("upstream", upstream)])
}

fn generations(addr: SocketAddr) -> f64 {
    family_sum(&scrape(addr), GENERATIONS)
}

// ---------------------------------------------------------------------------
// Shared fixtures

/// Where this process's shared fixtures live: under the target dir.
fn target_tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// `acme/widget` and `acme/secret`, each a [`small_repository`] (the same
/// commits), in one repos dir built once per test process. Tests serve it
/// with archivers of their own and never write to it.
struct SharedRepos {
    repos: PathBuf,
    widget: RepoBuilder,
    secret: RepoBuilder,
    commits: SmallRepository,
}

fn shared_repos() -> &'static SharedRepos {
    static REPOS: OnceLock<SharedRepos> = OnceLock::new();
    REPOS.get_or_init(|| {
        let dir = process_dir(target_tmp(), "proxy-repos");
        let (repos, home) = (dir.join("repos"), dir.join("home"));
        let widget = RepoBuilder::init(&repos.join("acme/widget"), &home);
        let commits = small_repository(&widget);
        let secret = RepoBuilder::init(&repos.join("acme/secret"), &home);
        let secret_commits = small_repository(&secret);
        assert_eq!(
            secret_commits.second, commits.second,
            "small_repository is not deterministic"
        );
        SharedRepos {
            repos,
            widget,
            secret,
            commits,
        }
    })
}

/// A primary and two replicas over the shared repos, and a proxy in front.
fn widget_cluster(proxy_args: &[&str]) -> (&'static SharedRepos, Cluster) {
    let shared = shared_repos();
    let cluster = Cluster::start(&shared.repos, &shared.repos, 2, proxy_args);
    (shared, cluster)
}

/// `acme/big`: one file of incompressible bytes ([`big_repository`]),
/// built once per target dir.
struct BigRepo {
    repos: PathBuf,
    /// `git archive --format=tar` of `main`'s byte length.
    full_length: u64,
}

fn big_repo_of(name: &str, bytes: usize) -> BigRepo {
    let root = cached_dir(target_tmp(), name, |dir| {
        let repo = RepoBuilder::init(&dir.join("repos/acme/big"), &dir.join("home"));
        big_repository(&repo, bytes);
    });
    let repos = root.join("repos");
    let repo = RepoBuilder::open(&repos.join("acme/big"), &root.join("home"));
    let commit = repo.rev_parse("main");
    let full_length = tar_length(&repo, "big-main/", &commit);
    BigRepo { repos, full_length }
}

/// 64 MiB: for downloads that are cut early.
fn big_repo_64() -> &'static BigRepo {
    static BIG: OnceLock<BigRepo> = OnceLock::new();
    BIG.get_or_init(|| big_repo_of("gitball-e2e-proxy-big-64m-v1", 64 * MIB))
}

/// 128 MiB: for the slow and aborting clients.
fn big_repo_128() -> &'static BigRepo {
    static BIG: OnceLock<BigRepo> = OnceLock::new();
    BIG.get_or_init(|| big_repo_of("gitball-e2e-proxy-big-128m-v1", 128 * MIB))
}

const BIG_PATH: &str = "/acme/big/archive/main.tar";

/// A cache dir holding the complete `main.tar` of [`big_repo_128`], made
/// once per test process: a primary on it serves one complete download
/// through a proxy, then both are stopped (the archiver keeps complete files
/// on SIGTERM and re-indexes them when started again).
fn warm_big_cache() -> &'static Path {
    static CACHE: OnceLock<PathBuf> = OnceLock::new();
    CACHE.get_or_init(|| {
        let big = big_repo_128();
        let cache = process_dir(target_tmp(), "proxy-warm-cache").join("cache");
        let primary = Archiver::start_with_cache(&big.repos, &cache, &[]);
        let cluster = Cluster::around(primary, Vec::new(), &[]);
        let started = Instant::now();
        let (_, warm) = download(cluster.proxy.addr, BIG_PATH);
        assert_eq!(warm, big.full_length, "the warm-up download");
        assert!(
            wait_until(SETTLE, || scrape(cluster.primary.addr)
                .value("gitball_archiver_cache_entries", &[])
                == 1.0),
            "the warm-up archive was not indexed"
        );
        eprintln!(
            "warmed the 128 MiB archive in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cache
    })
}

/// A primary over [`big_repo_128`] on a link of [`warm_big_cache`] (in
/// `sandbox`), and a proxy with `proxy_args` in front: `main.tar` is a hit
/// from the start.
fn warm_big_cluster(sandbox: &Sandbox, proxy_args: &[&str]) -> (&'static BigRepo, Cluster) {
    let big = big_repo_128();
    let cache = sandbox.path("cache");
    link_files(warm_big_cache(), &cache);
    let primary = Archiver::start_with_cache(&big.repos, &cache, &[]);
    (big, Cluster::around(primary, Vec::new(), proxy_args))
}

/// `GET path` on a fresh connection, read to its end, which must be a clean
/// one; returns the head and the body's length.
fn download(addr: SocketAddr, path: &str) -> (ResponseHead, u64) {
    let mut connection = RawConnection::connect(addr).expect("connect");
    connection.send_request("GET", path, &[]).expect("send");
    let head = connection.read_head().expect("head");
    assert_eq!(head.status, 200, "GET {path}");
    let mut received = 0u64;
    let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
    assert_eq!(end, BodyEnd::Complete, "GET {path} after {received} bytes");
    (head, received)
}

// ---------------------------------------------------------------------------
// Bytes and headers

#[test]
fn archives_through_the_proxy_equal_git_archive_for_both_url_shapes() {
    let (shared, cluster) = widget_cluster(&[]);
    let (repo, commits) = (&shared.widget, &shared.commits);
    let addr = cluster.proxy.addr;

    let tag_tar = repo.archive("tar", "widget-1.2.3/", &commits.second, None);
    for path in [
        "/acme/widget/archive/v1.2.3.tar",
        "/acme/widget/tar/v1.2.3",
        "/acme/widget/archive/refs/tags/v1.2.3.tar",
    ] {
        assert_same_bytes(&fetch_ok(addr, path).body, &tag_tar, path);
    }

    let main_zip = repo.archive("zip", "widget-main/", &commits.second, None);
    for path in ["/acme/widget/zip/main", "/acme/widget/archive/main.zip"] {
        // gitball writes its own zip: git's entries, not git's bytes.
        gitball_e2e::assert_same_zip_entries(&fetch_ok(addr, path).body, &main_zip, path);
    }

    let feature_tar = repo.archive("tar", "widget-feature-x/", &commits.first, None);
    for path in [
        "/acme/widget/tar.gz/feature/x",
        "/acme/widget/archive/feature/x.tar.gz",
    ] {
        assert_same_bytes(&gunzip(&fetch_ok(addr, path).body), &feature_tar, path);
    }

    let release_tar = repo.archive("tar", "widget-1.0.0/", &commits.first, None);
    let path = "/acme/widget/archive/v1.0.0.tgz";
    assert_same_bytes(&gunzip(&fetch_ok(addr, path).body), &release_tar, path);

    // An abbreviated commit id is labelled by the full id.
    let commit_tar = repo.archive(
        "tar",
        &format!("widget-{}/", commits.first),
        &commits.first,
        None,
    );
    for path in [
        format!("/acme/widget/archive/{}.tar.zst", &commits.first[..10]),
        format!("/acme/widget/tar.zst/{}", commits.first),
    ] {
        assert_same_bytes(&unzstd(&fetch_ok(addr, &path).body), &commit_tar, &path);
    }

    // A subtree (`path` query) is forwarded.
    let subtree = repo.archive("tar", "widget-main/", &commits.second, Some("src"));
    let path = "/acme/widget/archive/main.tar?path=src";
    assert_same_bytes(&fetch_ok(addr, path).body, &subtree, path);

    // `.sha256`: the checksum line of the archive's exact bytes.
    let checksum = fetch_ok(addr, "/acme/widget/archive/v1.2.3.tar.sha256");
    assert_eq!(
        checksum.text(),
        format!("{}  widget-1.2.3.tar\n", sha256_hex(&tag_tar))
    );
    let tgz = fetch_ok(addr, "/acme/widget/archive/v1.2.3.tar.gz").body;
    assert_same_bytes(&gunzip(&tgz), &tag_tar, "v1.2.3.tar.gz");
    let checksum = fetch_ok(addr, "/acme/widget/archive/v1.2.3.tar.gz.sha256");
    assert_eq!(
        checksum.text(),
        format!("{}  widget-1.2.3.tar.gz\n", sha256_hex(&tgz))
    );
}

// Headers through the proxy. Each test starts its own cluster over the
// shared repos and asks for `TAG_TAR`.

/// The archive the header tests ask for: tag `v1.2.3`, on the second commit.
const TAG_TAR: &str = "/acme/widget/archive/v1.2.3.tar";

/// `git archive` of [`TAG_TAR`]'s commit with its top folder.
fn tag_tar(shared: &SharedRepos) -> Vec<u8> {
    shared
        .widget
        .archive("tar", "widget-1.2.3/", &shared.commits.second, None)
}

/// The first GET of [`TAG_TAR`] through the proxy: git's bytes.
fn first_fetch(shared: &SharedRepos, addr: SocketAddr) -> Fetched {
    let first = fetch_ok(addr, TAG_TAR);
    assert_same_bytes(&first.body, &tag_tar(shared), TAG_TAR);
    first
}

#[test]
fn proxy_passes_validators_and_names_through() {
    let (shared, cluster) = widget_cluster(&[]);
    let commits = &shared.commits;
    let first = first_fetch(shared, cluster.proxy.addr);
    let etag = first.header("etag").to_owned();
    assert!(
        etag.starts_with(&format!("\"{}-", commits.second)) && etag.ends_with('"'),
        "ETag {etag:?}"
    );
    assert_eq!(first.header("content-type"), "application/x-tar");
    assert_eq!(first.header("x-gitball-commit"), commits.second);
    assert_eq!(
        first.header("content-disposition"),
        "attachment; filename=\"widget-1.2.3.tar\""
    );
    assert_eq!(
        first.header("link"),
        format!(
            "</acme/widget/archive/{}.tar>; rel=\"immutable\"",
            commits.second
        )
    );
    assert_eq!(first.header("last-modified"), http_date(1_700_086_400));
    assert!(
        ["miss", "join", "hit"].contains(&first.header("x-gitball-cache")),
        "X-Gitball-Cache {:?}",
        first.header("x-gitball-cache")
    );
    // Hop-by-hop and server-private headers stay behind.
    assert_eq!(first.head.header("server"), None);
}

/// Complete in the cache: a hit, with length, ranges and digest.
#[test]
fn proxy_passes_a_hit_with_length_ranges_and_digest() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let expected = tag_tar(shared);
    let etag = first_fetch(shared, addr).header("etag").to_owned();
    let hit = fetch_ok(addr, TAG_TAR);
    assert_same_bytes(&hit.body, &expected, "hit");
    assert_eq!(hit.header("x-gitball-cache"), "hit");
    assert_eq!(hit.header("etag"), etag);
    assert_eq!(hit.header("content-length"), expected.len().to_string());
    assert_eq!(hit.header("accept-ranges"), "bytes");
    assert_eq!(
        hit.header("repr-digest"),
        format!("sha-256=:{}:", base64(&Sha256::digest(&expected)))
    );
}

#[test]
fn range_through_the_proxy_answers_206() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let expected = tag_tar(shared);
    first_fetch(shared, addr);
    let part = fetch_with(addr, "GET", TAG_TAR, &[("Range", "bytes=100-1123")]);
    assert_eq!(part.status(), 206);
    assert_eq!(part.end, BodyEnd::Complete);
    assert_eq!(
        part.header("content-range"),
        format!("bytes 100-1123/{}", expected.len())
    );
    assert_same_bytes(&part.body, &expected[100..1124], "range");
}

#[test]
fn unsatisfiable_range_through_the_proxy_answers_416() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let expected = tag_tar(shared);
    first_fetch(shared, addr);
    let past_end = format!("bytes={}-", expected.len());
    let unsatisfiable = fetch_with(addr, "GET", TAG_TAR, &[("Range", &past_end)]);
    assert_eq!(unsatisfiable.status(), 416);
}

#[test]
fn etag_match_through_the_proxy_answers_304() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let etag = first_fetch(shared, addr).header("etag").to_owned();
    let not_modified = fetch_with(addr, "GET", TAG_TAR, &[("If-None-Match", &etag)]);
    assert_eq!(not_modified.status(), 304);
    assert!(not_modified.body.is_empty());
}

/// `docs/internal-api.md#forwarded-request-headers`: `Range`,
/// `If-None-Match` and `If-Range` reach the archiver with every value as
/// sent, so a request in several header lines gets through the proxy what
/// the archiver answers it (`docs/http.md#conditional-and-range-requests`):
/// several `Range` lines are ignored, a tag in a second `If-None-Match`
/// line matches, several `If-Range` lines never match. (Mutation review:
/// forwarding only each header's first line passed every test; fails this
/// one.)
#[test]
fn validators_and_ranges_in_several_lines_reach_the_archiver_whole() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let expected = tag_tar(shared);
    let etag = first_fetch(shared, addr).header("etag").to_owned();

    let ranges = fetch_with(
        addr,
        "GET",
        TAG_TAR,
        &[("Range", "bytes=0-9"), ("Range", "bytes=20-29")],
    );
    assert_eq!(ranges.status(), 200, "two Range lines");
    assert_same_bytes(&ranges.body, &expected, "two Range lines");

    let second_matches = fetch_with(
        addr,
        "GET",
        TAG_TAR,
        &[("If-None-Match", "\"other\""), ("If-None-Match", &etag)],
    );
    assert_eq!(second_matches.status(), 304, "the ETag in a second line");

    let two_if_ranges = fetch_with(
        addr,
        "GET",
        TAG_TAR,
        &[
            ("Range", "bytes=0-9"),
            ("If-Range", &etag),
            ("If-Range", &etag),
        ],
    );
    assert_eq!(two_if_ranges.status(), 200, "two If-Range lines");
    assert_same_bytes(&two_if_ranges.body, &expected, "two If-Range lines");
}

#[test]
fn head_through_the_proxy_has_the_length_and_commit() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let expected = tag_tar(shared);
    first_fetch(shared, addr);
    let head = fetch_with(addr, "HEAD", TAG_TAR, &[]);
    assert_eq!(head.status(), 200);
    assert_eq!(head.header("content-length"), expected.len().to_string());
    assert_eq!(head.header("x-gitball-commit"), shared.commits.second);
}

/// `docs/internal-api.md#requests`: the proxy sends `GET` or `HEAD`,
/// matching the client's method; so a `HEAD` through the proxy never starts
/// a generation (`docs/http.md#head`): it reaches the archiver as a
/// `HEAD`, is a `miss` that generates nothing, and the `GET` after it is
/// the miss that generates. (Mutation review: forwarding every request as
/// a `GET`, which started a generation for each `HEAD` of a cold archive,
/// passed every test; fails this one.)
#[test]
fn a_head_through_the_proxy_reaches_the_archiver_as_a_head() {
    let shared = shared_repos();
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&shared.repos, &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    let id = "a-head-through-the-proxy";

    let head = fetch_with(proxy.addr, "HEAD", TAG_TAR, &[("X-Request-Id", id)]);
    assert_eq!(head.status(), 200);
    assert_eq!(head.header("x-gitball-cache"), "miss");
    let line = gitball_e2e::wait_for_line(SETTLE, || archiver.log(), id);
    assert_eq!(line["method"], "HEAD", "{line}");

    let get = fetch_ok(proxy.addr, TAG_TAR);
    assert_eq!(
        get.header("x-gitball-cache"),
        "miss",
        "the HEAD started the generation"
    );
    assert_same_bytes(&get.body, &tag_tar(shared), "the GET after the HEAD");
    // Counted as it ends, which may come just after its last byte.
    assert!(wait_until(SETTLE, || generations(archiver.addr) == 1.0));
}

/// Asserts an archiver of `cluster` logged the request id `id`.
fn assert_forwarded(cluster: &Cluster, id: &str) {
    assert!(
        wait_until(SETTLE, || cluster
            .archivers()
            .iter()
            .any(|archiver| archiver.log().contains(id))),
        "no archiver logged the request id {id}"
    );
}

/// X-Request-Id: generated when absent (a new one each time) and forwarded
/// to the archiver.
#[test]
fn proxy_generates_a_request_id_per_request_and_forwards_it() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let first = first_fetch(shared, addr);
    let generated = first.header("x-request-id").to_owned();
    assert!(
        (16..=128).contains(&generated.len())
            && generated
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "generated X-Request-Id {generated:?}"
    );
    let second = fetch_ok(addr, TAG_TAR);
    assert_ne!(second.header("x-request-id"), generated);
    assert_forwarded(&cluster, &generated);
}

/// X-Request-Id: echoed when given, and forwarded to the archiver.
#[test]
fn proxy_echoes_a_given_request_id_and_forwards_it() {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    first_fetch(shared, addr);
    let chosen = "e2e-proxy-request-7f3a";
    let echoed = fetch_with(addr, "GET", TAG_TAR, &[("X-Request-Id", chosen)]);
    assert_eq!(echoed.status(), 200);
    assert_eq!(echoed.header("x-request-id"), chosen);
    assert_forwarded(&cluster, chosen);
}

// ---------------------------------------------------------------------------
// Routing

#[test]
fn rendezvous_keeps_one_repository_on_one_replica() {
    let (_, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;

    let refs = ["main", "v1.0.0", "feature/x"];
    let formats = ["tar", "tar.gz", "zip", "tar.zst"];
    let mut requests = 0;
    for (i, reference) in refs.iter().enumerate() {
        for (j, format) in formats.iter().enumerate() {
            // Both URL shapes name the same archive.
            let shapes = [
                format!("/acme/widget/archive/{reference}.{format}"),
                format!("/acme/widget/{format}/{reference}"),
            ];
            for path in [&shapes[(i + j) % 2], &shapes[(i + j + 1) % 2]] {
                fetch_ok(addr, path);
                requests += 1;
            }
        }
    }
    fetch_ok(addr, "/acme/widget/archive/main.tar.sha256");
    requests += 1;
    let distinct = (refs.len() * formats.len()) as f64;

    let counts = || -> Vec<f64> {
        cluster
            .archivers()
            .iter()
            .map(|archiver| generations(archiver.addr))
            .collect()
    };
    let mut seen = Vec::new();
    let settled = wait_until(SETTLE, || {
        seen = counts();
        seen.iter().sum::<f64>() >= distinct
    });
    assert!(settled, "generations per archiver: {seen:?}");
    println!("generations per archiver (primary first): {seen:?}");
    let owner = seen
        .iter()
        .position(|&count| count == distinct)
        .unwrap_or_else(|| panic!("no one archiver generated all {distinct}: {seen:?}"));
    assert_ne!(
        owner, 0,
        "the primary generated them, not a replica: {seen:?}"
    );
    for (index, count) in seen.iter().enumerate() {
        if index != owner {
            assert_eq!(*count, 0.0, "archiver {index} generated some: {seen:?}");
        }
    }
    let owner_metrics = scrape(cluster.archivers()[owner].addr);
    assert_eq!(
        owner_metrics.value(GENERATIONS, &[("format", "tar"), ("outcome", "ok")])
            + owner_metrics.value(GENERATIONS, &[("format", "tar.gz"), ("outcome", "ok")])
            + owner_metrics.value(GENERATIONS, &[("format", "zip"), ("outcome", "ok")])
            + owner_metrics.value(GENERATIONS, &[("format", "tar.zst"), ("outcome", "ok")]),
        distinct,
        "every generation succeeded"
    );

    let proxy = cluster.proxy.scrape();
    let owner_url = cluster.archivers()[owner].base_url.clone();
    assert_eq!(
        proxy.value(ATTEMPTS, &[("upstream", &owner_url), ("outcome", "ok")]),
        f64::from(requests)
    );
    assert_eq!(family_sum(&proxy, ATTEMPTS), f64::from(requests));
    assert_eq!(proxy.value("gitball_proxy_failovers_total", &[]), 0.0);
}

#[test]
fn killed_replica_fails_over_and_is_used_again_after_eject_for() {
    const EJECT_FOR_SECONDS: u64 = 3;
    let shared = shared_repos();
    let (repo, commits) = (&shared.widget, &shared.commits);
    let eject_for = EJECT_FOR_SECONDS.to_string();
    let mut cluster = Cluster::start(
        &shared.repos,
        &shared.repos,
        2,
        &["--eject-for", &eject_for],
    );
    let addr = cluster.proxy.addr;

    // Find the replica that owns acme/widget.
    fetch_ok(addr, "/acme/widget/archive/main.tar");
    let owner = cluster
        .replicas
        .iter()
        .position(|replica| generations(replica.addr) > 0.0)
        .expect("one replica generated acme/widget's archive");
    let victim_url = cluster.replicas[owner].base_url.clone();
    let victim_addr = cluster.replicas[owner].addr;
    let victim_cache = cluster.replicas[owner].cache_dir.clone();
    kill_hard(&mut cluster.replicas[owner]);

    // Requests still succeed, through the next candidate.
    let zip = repo.archive("zip", "widget-1.0.0/", &commits.first, None);
    let failed_over = Instant::now();
    let got = fetch_ok(addr, "/acme/widget/archive/v1.0.0.zip");
    gitball_e2e::assert_same_zip_entries(&got.body, &zip, "after the kill");
    let metrics = cluster.proxy.scrape();
    assert!(
        metrics.value("gitball_proxy_failovers_total", &[]) >= 1.0,
        "failovers_total"
    );
    // Ejected from the failover on, for --eject-for: a loaded host can
    // take that long over the zip and the scrape (seen at load 13).
    assert_ejected_since(
        metrics.get(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &victim_url)],
        ),
        failed_over,
        Duration::from_secs(EJECT_FOR_SECONDS),
        "the killed replica is ejected",
    );
    let failed_attempts = attempts_of(&metrics, &victim_url)
        - metrics.value(ATTEMPTS, &[("upstream", &victim_url), ("outcome", "ok")]);
    assert!(failed_attempts >= 1.0, "no failed attempt counted");
    let tar = repo.archive("tar", "widget-main/", &commits.second, None);
    assert_same_bytes(
        &fetch_ok(addr, "/acme/widget/archive/main.tar").body,
        &tar,
        "main.tar after the kill",
    );

    // Back on the same port (and cache dir); once --eject-for has passed it
    // is the first candidate again.
    let restarted = start_archiver_at(&shared.repos, &victim_cache, victim_addr, &[]);
    let mut ejected = None;
    let expired = wait_until(Duration::from_secs(EJECT_FOR_SECONDS + 10), || {
        ejected = cluster.proxy.scrape().get(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &victim_url)],
        );
        ejected == Some(0.0)
    });
    assert!(expired, "ejection did not end: gauge {ejected:?}");
    let before = cluster.proxy.scrape();
    let tgz = fetch_ok(addr, "/acme/widget/archive/v1.2.3.tar.gz").body;
    let tag_tar = repo.archive("tar", "widget-1.2.3/", &commits.second, None);
    assert_same_bytes(&gunzip(&tgz), &tag_tar, "after the restart");
    let after = cluster.proxy.scrape();
    assert_eq!(
        after.value(ATTEMPTS, &[("upstream", &victim_url), ("outcome", "ok")]),
        before.value(ATTEMPTS, &[("upstream", &victim_url), ("outcome", "ok")]) + 1.0,
        "the restarted replica answered"
    );
    assert!(
        wait_until(SETTLE, || generations(restarted.addr) == 1.0),
        "the restarted replica generated the new archive"
    );
}

#[test]
fn replica_404_falls_back_to_primary() {
    let sandbox = Sandbox::new();
    // Only the primary has acme/fresh (the replicas lag behind).
    let primary_repos = sandbox.path("primary-repos");
    let fresh = gitball_e2e::RepoBuilder::init(&primary_repos.join("acme/fresh"), &sandbox.home());
    let commits = small_repository(&fresh);
    let cluster = Cluster::start(&primary_repos, &shared_repos().repos, 2, &[]);
    let addr = cluster.proxy.addr;

    let expected = fresh.archive("tar", "fresh-main/", &commits.second, None);
    assert_same_bytes(
        &fetch_ok(addr, "/acme/fresh/archive/main.tar").body,
        &expected,
        "acme/fresh via the primary",
    );
    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.sum(ATTEMPTS, &[("outcome", "replica_not_found")]),
        2.0,
        "both replicas answered 404 first"
    );
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[("upstream", &cluster.primary.base_url), ("outcome", "ok")]
        ),
        1.0
    );
    // A replica's 404 is lag, not failure: nobody is ejected.
    for replica in &cluster.replicas {
        assert_eq!(
            metrics.value(
                "gitball_proxy_upstream_ejected",
                &[("upstream", &replica.base_url)]
            ),
            0.0
        );
    }
    assert!(wait_until(SETTLE, || generations(cluster.primary.addr) == 1.0));

    // The primary's 404 is final.
    let missing = fetch(addr, "/acme/fresh/archive/no-such-branch.tar");
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.error_code(), "ref_not_found");
    let unknown = fetch(addr, "/acme/nothing/archive/main.tar");
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.error_code(), "repo_not_found");
}

/// `docs/http.md#head`: a `HEAD` has the headers a `GET` would get, through
/// the proxy too: no length for an archive not yet complete, and a `304`
/// has none (RFC 9110, 8.6; review: attack, both said `Content-Length: 0`).
#[test]
fn a_head_or_304_without_a_length_gets_none_through_the_proxy() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let proxy = Proxy::embedded(&sandbox.repos(), &sandbox.path("cache"), &[]);
    let target = "/acme/widget/archive/v1.2.3.tar.gz";
    let cold = fetch_with(proxy.addr, "HEAD", target, &[]);
    assert_eq!(cold.status(), 200);
    assert_eq!(cold.head.header("x-gitball-cache"), Some("miss"));
    assert_eq!(cold.head.header("content-length"), None, "{:?}", cold.head);
    let etag = cold.head.header("etag").expect("an ETag").to_owned();
    for method in ["GET", "HEAD"] {
        let not_modified = fetch_with(proxy.addr, method, target, &[("If-None-Match", &etag)]);
        assert_eq!(not_modified.status(), 304, "{method}");
        assert_eq!(
            not_modified.head.header("content-length"),
            None,
            "{method}: {:?}",
            not_modified.head
        );
    }
}

/// `docs/proxy.md#failover`: a `503` with `Retry-After` (here the
/// replica's `503 busy`, its only generation slot held) moves on to the
/// next candidate but does not eject the archiver, which is up: its other
/// clients' requests, hits above all, keep going to it.
#[test]
fn a_busy_archiver_is_failed_over_but_not_ejected() {
    let sandbox = Sandbox::new();
    let commits = small_repository(&sandbox.repo("acme", "widget"));
    let (git, mut release) = sandbox.git_that_pauses("git-that-waits", 0);
    let busy = Archiver::start(
        &sandbox.repos(),
        &[
            "--max-generations",
            "1",
            "--queue-timeout",
            "0.001",
            "--git",
            git.to_str().unwrap(),
        ],
    );
    let primary = Archiver::start(&sandbox.repos(), &[]);
    let cluster = Cluster::around(primary, vec![busy], &[]);
    let busy = &cluster.replicas[0];
    std::thread::scope(|scope| {
        // The replica's one slot: a generation its git holds.
        let holder = scope.spawn(|| fetch(busy.addr, "/acme/widget/archive/main.tar"));
        let held = wait_until(SETTLE, || {
            busy.metrics()
                .value("gitball_archiver_generations_in_flight", &[])
                == 1.0
        });
        let through = (held).then(|| {
            fetch(
                cluster.proxy.addr,
                &format!("/acme/widget/archive/{}.tar", commits.first),
            )
        });
        release.write_all(b"go\n").expect("release the generation");
        assert_eq!(holder.join().expect("answered").status(), 200);
        assert!(held, "the replica's slot was not taken");
        assert_eq!(through.expect("asked").status(), 200);
    });
    let metrics = cluster.proxy.scrape();
    let replica = &[("upstream", busy.base_url.as_str()), ("outcome", "busy")];
    assert_eq!(
        metrics.value(ATTEMPTS, replica),
        1.0,
        "the replica said busy"
    );
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[
                ("upstream", cluster.primary.base_url.as_str()),
                ("outcome", "ok")
            ]
        ),
        1.0,
        "the primary answered"
    );
    assert_eq!(
        metrics.value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &busy.base_url)]
        ),
        0.0,
        "a busy archiver is not ejected"
    );
}

/// An archiver's `500` says this archive failed there (here: it is larger
/// than the replica's `--max-archive-bytes`), not that the archiver is
/// down: the next candidate is tried, and the archiver is not ejected. So
/// is a download the archiver aborts midway for the same reason (a tar.gz,
/// whose head leaves before git runs). Before, either ejected it, moving
/// every client's traffic, hits included, off it for `--eject-for`: one
/// request for a huge or broken commit did that on every proxy. Five in a
/// row do eject it (an archiver where every generation fails).
#[test]
fn an_archive_failing_at_its_archiver_is_failed_over_and_ejects_nothing() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // Each of the replica's `git archive`s waits for a line, then runs the
    // real git (its canary runs at once): a tar.gz's generation is let go
    // only once its head reached the client, so the cut comes after the
    // head. Let go at once, git could pass 4 KiB before the archiver looked
    // for the first bytes (a loaded machine): a 500 before the head, failed
    // over, and served whole by the primary.
    let (release, mut lines) = sandbox.fifo("release");
    let stub = sandbox.write_stub(
        "waits-for-a-line",
        &format!(
            "read line < '{}'\nexec '{}' \"$@\"\n",
            release.display(),
            gitball_e2e::real_git().display()
        ),
    );
    let small = Archiver::start(
        &sandbox.repos(),
        &[
            "--max-archive-bytes",
            "4KiB",
            "--git",
            stub.to_str().unwrap(),
        ],
    );
    let primary = Archiver::start(&sandbox.repos(), &[]);
    let cluster = Cluster::around(primary, vec![small], &[]);
    let replica = &cluster.replicas[0];
    // A tar.gz through the proxy, its generation at the replica let go once
    // the head came: how its download ended.
    let cut_after_head = |lines: &mut std::fs::File, reference: &str| {
        let mut connection = RawConnection::connect(cluster.proxy.addr).expect("connect");
        connection
            .send_request(
                "GET",
                &format!("/acme/widget/archive/{reference}.tar.gz"),
                &[],
            )
            .expect("send");
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 200, "{reference}");
        writeln!(lines).expect("release the generation");
        connection.read_body_to_end(|_| {})
    };

    // Refused before its head: the primary answers. (Its git let go at once:
    // the archiver waits for a tar's first bytes before its head.)
    writeln!(lines).expect("release the generation");
    let fetched = fetch(cluster.proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(fetched.status(), 200);
    assert!(
        matches!(fetched.end, BodyEnd::Complete),
        "{:?}",
        fetched.end
    );
    // Cut after its head: the client's download is aborted, never a clean end.
    let end = cut_after_head(&mut lines, "main");
    assert!(matches!(end, BodyEnd::Aborted(_)), "{end:?}");

    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[
                ("upstream", replica.base_url.as_str()),
                ("outcome", "archive_failed")
            ]
        ),
        1.0,
        "the replica's 500"
    );
    // The cut tar.gz counts against the archiver that cut it; its attempt
    // counted `ok` (its head came).
    let aborts = |upstream: &str| {
        metrics.value(
            "gitball_proxy_upstream_aborts_total",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(aborts(&replica.base_url), 1.0);
    assert_eq!(aborts(&cluster.primary.base_url), 0.0);
    assert!(
        metrics
            .get(
                "gitball_proxy_upstream_aborts_total",
                &[("upstream", &cluster.primary.base_url)]
            )
            .is_some(),
        "made at 0 for every upstream"
    );
    assert_eq!(
        metrics.value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &replica.base_url)]
        ),
        0.0,
        "an archiver whose archive failed was ejected"
    );

    // But an archiver where every archive fails (here: every tar.gz, which
    // cannot be failed over) is ejected after five in a row with no
    // download ending whole between them; then the primary serves. Five
    // archives: one it knows too large is refused from that memory, which
    // is no failure there (`requests_for_an_archive_an_archiver_knows_too_large_eject_nothing`).
    for reference in ["v1.2.3", "v1.0.0", "feature/x"] {
        let end = cut_after_head(&mut lines, reference);
        assert!(matches!(end, BodyEnd::Aborted(_)), "{reference}: {end:?}");
    }
    assert!(wait_until(SETTLE, || cluster.proxy.scrape().value(
        "gitball_proxy_upstream_ejected",
        &[("upstream", &replica.base_url)]
    ) == 1.0));
    let fetched = fetch(cluster.proxy.addr, "/acme/widget/archive/main.tar.gz");
    assert!(
        matches!(fetched.end, BodyEnd::Complete),
        "{:?}",
        fetched.end
    );
}

/// An archiver that remembers an archive is too large refuses it from
/// that memory, running nothing: that answer says nothing of the
/// archiver, and however many requests get it, the archiver is not
/// ejected. Before, five requests for one archive too large for a replica
/// (the first ran git there, the others were refused) ejected it for
/// `--eject-for`, moving every client's requests for its repositories,
/// hits included, to candidates that must generate them anew: an outsider
/// could do that every ten seconds, free (attack).
#[test]
fn requests_for_an_archive_an_archiver_knows_too_large_eject_nothing() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let small = Archiver::start(&sandbox.repos(), &["--max-archive-bytes", "4KiB"]);
    let primary = Archiver::start(&sandbox.repos(), &[]);
    let cluster = Cluster::around(primary, vec![small], &[]);
    let replica = &cluster.replicas[0];
    for _ in 0..8 {
        let fetched = fetch(cluster.proxy.addr, "/acme/widget/archive/main.tar");
        assert_eq!(fetched.status(), 200);
        assert!(
            matches!(fetched.end, BodyEnd::Complete),
            "{:?}",
            fetched.end
        );
    }
    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[
                ("upstream", replica.base_url.as_str()),
                ("outcome", "archive_failed")
            ]
        ),
        8.0,
        "every request was tried at the replica first"
    );
    assert_eq!(
        metrics.value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &replica.base_url)]
        ),
        0.0,
        "requests for an archive the replica knows too large ejected it"
    );
    // It ran git once.
    assert_eq!(
        replica.metrics().value(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "too_large")]
        ),
        1.0
    );
}

/// A cluster whose replica (started with `args`) runs each `git archive`
/// only once the test writes a line to the returned fifo, and then fails
/// it; its primary is a plain archiver.
fn cluster_whose_replica_fails_when_told(
    sandbox: &Sandbox,
    args: &[&str],
) -> (Cluster, std::fs::File) {
    let (release, lines) = sandbox.fifo("release");
    let stub = sandbox.write_stub(
        "fails-when-told",
        &format!("read line < '{}'\nexit 1\n", release.display()),
    );
    let mut replica_args = vec!["--git", stub.to_str().unwrap()];
    replica_args.extend_from_slice(args);
    let failing = Archiver::start(&sandbox.repos(), &replica_args);
    let primary = Archiver::start(&sandbox.repos(), &[]);
    (Cluster::around(primary, vec![failing], &[]), lines)
}

/// Requests that join one generation already under way at an archiver
/// (`X-Gitball-Cache: join`) share its failure, which counts once toward
/// the row of archive failures that ejects the archiver: at the request
/// that started it (`miss`). Before, each cut download counted, so six
/// concurrent requests for one new archive that fails there ejected the
/// replica for `--eject-for`, moving every client's requests for its
/// repositories, hits included, to candidates that must generate them
/// anew: an outsider could keep it ejected with one failing archive each
/// time (attack). A row of five failed generations still ejects it.
#[test]
fn requests_joining_one_failing_generation_count_as_one_archive_failure() {
    const RUSH: usize = 6;
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // A generation that fails when the test says, after every request of
    // the rush joined it.
    let (cluster, mut lines) = cluster_whose_replica_fails_when_told(&sandbox, &[]);
    let replica = &cluster.replicas[0];
    let addr = cluster.proxy.addr;
    let ejected = || {
        cluster.proxy.scrape().value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &replica.base_url)],
        )
    };

    std::thread::scope(|scope| {
        let (heads, heads_seen) = std::sync::mpsc::channel();
        let clients: Vec<_> = (0..RUSH)
            .map(|_| {
                let heads = heads.clone();
                scope.spawn(move || {
                    let mut connection = RawConnection::connect(addr).expect("connect");
                    connection
                        .send_request("GET", "/acme/widget/archive/main.zip", &[])
                        .expect("send");
                    // A zip's head leaves before git runs.
                    let head = connection.read_head().expect("head");
                    let cache = head.header("x-gitball-cache").map(str::to_owned);
                    heads.send((head.status, cache)).expect("tell the test");
                    connection.read_body_to_end(|_| {})
                })
            })
            .collect();
        let mut seen: Vec<(u16, Option<String>)> = (0..RUSH)
            .map(|_| heads_seen.recv_timeout(SETTLE).expect("every head in time"))
            .collect();
        seen.sort();
        let mut expected = vec![(200, Some("join".to_owned())); RUSH - 1];
        expected.push((200, Some("miss".to_owned())));
        assert_eq!(seen, expected, "one generation, joined by the others");
        // Every request joined it: now it fails.
        writeln!(lines).expect("release the generation");
        for client in clients {
            let end = client.join().expect("a client");
            assert!(matches!(end, BodyEnd::Aborted(_)), "{end:?}");
        }
    });
    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.value(
            "gitball_proxy_upstream_aborts_total",
            &[("upstream", &replica.base_url)]
        ),
        RUSH as f64,
        "every download was cut by the replica"
    );
    assert_eq!(
        ejected(),
        0.0,
        "requests joining one failing generation ejected the replica"
    );

    // That generation counted once: four more failing in a row eject the
    // replica, at the fourth.
    for (n, reference) in ["main", "v1.2.3", "v1.0.0", "feature/x"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(ejected(), 0.0, "ejected after {n} more");
        writeln!(lines).expect("let the next generation fail");
        let fetched = fetch(addr, &format!("/acme/widget/archive/{reference}.tar.gz"));
        assert_eq!(fetched.header("x-gitball-cache"), "miss");
        assert!(
            matches!(fetched.end, BodyEnd::Aborted(_)),
            "{reference}: {:?}",
            fetched.end
        );
    }
    assert!(wait_until(SETTLE, || ejected() == 1.0));
}

/// So do requests that wait for the whole archive (a `.sha256`) and get
/// the joined generation's failure as a `500` before any head: the
/// archiver marks the joiners' `500`s `X-Gitball-Cache: join` (the
/// starter's `miss`), and the proxy fails them over without counting
/// them. Before, those `500`s carried no `X-Gitball-Cache` and each
/// counted: five clients joining one failing generation ejected the
/// replica (attack).
#[test]
fn requests_joining_one_generation_that_fails_before_their_heads_count_once() {
    const CLIENTS: u8 = 6;
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // One slot: the rush's generation waits in the queue behind another,
    // where each client joining it is seen (`generations_queued_clients`).
    let (cluster, mut lines) =
        cluster_whose_replica_fails_when_told(&sandbox, &["--max-generations", "1"]);
    let replica = &cluster.replicas[0];
    let addr = cluster.proxy.addr;

    // The slot's holder: a zip, whose head leaves once it has the slot.
    let mut holder = RawConnection::connect(addr).expect("connect");
    holder
        .send_request("GET", "/acme/widget/archive/v1.0.0.zip", &[])
        .expect("send");
    let head = holder.read_head().expect("head");
    assert_eq!(head.header("x-gitball-cache"), Some("miss"));

    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|n| {
                scope.spawn(move || {
                    let source = std::net::IpAddr::from([127, 0, 0, 2 + n]);
                    let mut connection =
                        RawConnection::connect_from(source, addr).expect("connect");
                    connection
                        .send_request("GET", "/acme/widget/archive/main.tar.gz.sha256", &[])
                        .expect("send");
                    let head = connection.read_head().expect("head");
                    let end = connection.read_body_to_end(|_| {});
                    (head.status, end)
                })
            })
            .collect();
        assert!(
            wait_until(SETTLE, || replica
                .metrics()
                .value("gitball_archiver_generations_queued_clients", &[])
                == f64::from(CLIENTS)),
            "every client joined the queued generation"
        );
        // Both generations fail: the holder's, then the rush's.
        writeln!(lines).expect("release the holder");
        writeln!(lines).expect("release the rush's generation");
        for client in clients {
            let (status, end) = client.join().expect("a client");
            assert_eq!(
                (status, end),
                (200, BodyEnd::Complete),
                "the primary answered"
            );
        }
    });
    assert!(matches!(
        holder.read_body_to_end(|_| {}),
        BodyEnd::Aborted(_)
    ));
    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[
                ("upstream", replica.base_url.as_str()),
                ("outcome", "archive_failed")
            ]
        ),
        f64::from(CLIENTS),
        "every client was tried at the replica first"
    );
    assert_eq!(
        metrics.value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &replica.base_url)]
        ),
        0.0,
        "clients joining one failing generation ejected the replica"
    );
}

// ---------------------------------------------------------------------------
// The pipe

#[test]
fn archiver_killed_mid_body_aborts_the_client_connection() {
    let big = big_repo_64();
    let full_length = big.full_length;
    let mut cluster = Cluster::start(&big.repos, &big.repos, 0, &[]);

    let mut connection = RawConnection::connect(cluster.proxy.addr).expect("connect");
    connection
        .send_request("GET", "/acme/big/archive/main.tar", &[])
        .expect("send");
    let head = connection.read_head().expect("response head");
    assert_eq!(head.status, 200);
    // A slow client: 2 MiB at about 6 MiB/s.
    let mut received = 0usize;
    for _ in 0..32 {
        received += connection
            .read_body_bytes(64 * KIB)
            .expect("body before the kill")
            .len();
        std::thread::sleep(Duration::from_millis(10));
    }
    kill_hard(&mut cluster.primary);

    let end = connection.read_body_to_end(|piece| received += piece.len());
    println!(
        "archiver killed mid-body: client got {received} of {full_length} bytes, {end:?}, \
         Content-Length {:?}",
        head.header("content-length")
    );
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "a truncated archive ended cleanly after {received} bytes"
    );
    assert!((received as u64) < full_length);

    let proxy = &cluster.proxy;
    assert!(
        wait_until(SETTLE, || proxy
            .scrape()
            .sum("gitball_proxy_upstream_aborts_total", &[])
            >= 1.0),
        "upstream_aborts_total stayed 0"
    );
    assert!(downloads_end(proxy));
}

/// Reads `path` at about `bytes_per_tick` per `tick` for `ticks` ticks, then
/// closes; returns the bytes taken.
fn slow_client(
    addr: SocketAddr,
    path: &str,
    bytes_per_tick: usize,
    tick: Duration,
    ticks: u32,
) -> usize {
    let mut connection = RawConnection::connect(addr).expect("connect");
    connection.send_request("GET", path, &[]).expect("send");
    let head = connection.read_head().expect("response head");
    assert_eq!(head.status, 200);
    let started = Instant::now();
    let mut received = 0;
    for n in 1..=ticks {
        received += connection
            .read_body_bytes(bytes_per_tick)
            .expect("slow read")
            .len();
        // Pacing, not synchronisation: this is the client's read rate.
        if let Some(wait) = (started + tick * n).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    received
}

/// One complete download through the proxy (a hit, thanks to the warm
/// cache), and a scrape of each service, so the fd baselines read next
/// include whatever the first download opens for good (e.g. a pooled
/// upstream connection).
fn warm_up(cluster: &Cluster, big: &BigRepo) {
    let (head, warm) = download(cluster.proxy.addr, BIG_PATH);
    assert_eq!(
        head.header("x-gitball-cache"),
        Some("hit"),
        "the shared warm cache was not used"
    );
    assert_eq!(warm, big.full_length, "the warm-up download");
    scrape(cluster.proxy.addr);
    scrape(cluster.primary.addr);
}

#[test]
fn slow_clients_do_not_grow_proxy_memory() {
    const SLOW_CLIENTS: usize = 40;
    const RSS_GROWTH_LIMIT: u64 = 48 * MIB as u64;
    // 64 KiB/s: 16 KiB every 250 ms, for 10 s.
    const TICK: Duration = Duration::from_millis(250);
    const TICKS: u32 = 40;
    const BYTES_PER_TICK: usize = 16 * KIB;

    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &[]);
    let full_length = big.full_length;
    let addr = cluster.proxy.addr;
    let proxy_pid = cluster.proxy.pid;
    let archiver_pid = cluster.primary.pid;

    warm_up(&cluster, big);

    let baseline_rss = vm_rss_bytes(proxy_pid);
    let proxy_fds = settled_fd_count(proxy_pid);
    let archiver_fds = settled_fd_count(archiver_pid);

    let mut peak_rss = baseline_rss;
    let mut peak_active = 0.0f64;
    let received: Vec<usize> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..SLOW_CLIENTS)
            .map(|_| scope.spawn(|| slow_client(addr, BIG_PATH, BYTES_PER_TICK, TICK, TICKS)))
            .collect();
        let deadline = Instant::now() + TICK * TICKS + Duration::from_secs(30);
        while clients.iter().any(|client| !client.is_finished()) && Instant::now() < deadline {
            peak_rss = peak_rss.max(vm_rss_bytes(proxy_pid));
            peak_active =
                peak_active.max(scrape(addr).value("gitball_proxy_active_downloads", &[]));
            std::thread::sleep(Duration::from_millis(100));
        }
        clients
            .into_iter()
            .map(|client| client.join().expect("a slow client failed"))
            .collect()
    });
    let growth = peak_rss.saturating_sub(baseline_rss);
    println!(
        "{SLOW_CLIENTS} slow clients on a {full_length}-byte archive: proxy VmRSS {} KiB -> peak {} KiB, \
         growth {} KiB (limit {} KiB); peak active downloads {peak_active}; bytes per client {}..{}",
        baseline_rss / 1024,
        peak_rss / 1024,
        growth / 1024,
        RSS_GROWTH_LIMIT / 1024,
        received.iter().min().unwrap_or(&0),
        received.iter().max().unwrap_or(&0),
    );
    assert_eq!(
        peak_active, SLOW_CLIENTS as f64,
        "the slow downloads ran at the same time"
    );
    assert!(
        received
            .iter()
            .all(|&n| n >= BYTES_PER_TICK * TICKS as usize),
        "a slow client got less than it asked for"
    );
    assert!(
        growth < RSS_GROWTH_LIMIT,
        "proxy RSS grew by {growth} bytes for {SLOW_CLIENTS} slow clients"
    );
    let released = wait_until(SETTLE, || {
        open_fd_count(proxy_pid) <= proxy_fds && open_fd_count(archiver_pid) <= archiver_fds
    });
    assert!(
        released,
        "after the slow clients left: proxy fds {} (baseline {proxy_fds}), archiver fds {} (baseline {archiver_fds})",
        open_fd_count(proxy_pid),
        open_fd_count(archiver_pid)
    );
    assert!(
        wait_until(SETTLE, || scrape(addr)
            .value("gitball_proxy_client_disconnects_total", &[])
            >= SLOW_CLIENTS as f64),
        "client_disconnects_total did not count the slow clients that left"
    );
}

/// Both connections of a download stay on the thread that accepted it
/// (docs/proxy.md, "The pipe"): the proxy runs one serving thread, with its
/// own runtime and upstream pool, per CPU.
#[test]
fn proxy_serves_on_one_thread_per_cpu() {
    let (_shared, cluster) = widget_cluster(&[]);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let serving = || {
        let tasks =
            std::fs::read_dir(format!("/proc/{}/task", cluster.proxy.pid)).expect("task dir");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("gitball-proxy-"))
            .count()
    };
    // A serving thread names itself once it runs: on a loaded host the
    // proxy can answer on one before another has (seen: 1 of 2).
    wait_until(SETTLE, || serving() >= cpus);
    assert_eq!(serving(), cpus, "serving threads of the proxy");
}

#[test]
fn aborted_clients_release_proxy_and_archiver_fds() {
    const ABORTING_CLIENTS: usize = 50;

    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &[]);
    let addr = cluster.proxy.addr;
    let proxy_pid = cluster.proxy.pid;
    let archiver_pid = cluster.primary.pid;
    warm_up(&cluster, big);
    let proxy_fds = settled_fd_count(proxy_pid);
    let archiver_fds = settled_fd_count(archiver_pid);

    // 50 clients that abort after 1 MiB.
    let mut peak_fds = (0, 0);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..ABORTING_CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut connection = RawConnection::connect(addr).expect("connect");
                    connection.send_request("GET", BIG_PATH, &[]).expect("send");
                    let head = connection.read_head().expect("head");
                    assert_eq!(head.status, 200);
                    assert_eq!(
                        head.header("x-gitball-cache"),
                        Some("hit"),
                        "the shared warm cache was not used"
                    );
                    let taken = connection.read_body_bytes(MIB).expect("first MiB");
                    assert_eq!(taken.len(), MIB);
                    // Dropped here with unread bytes: the client is gone.
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while clients.iter().any(|client| !client.is_finished()) && Instant::now() < deadline {
            peak_fds.0 = peak_fds.0.max(open_fd_count(proxy_pid));
            peak_fds.1 = peak_fds.1.max(open_fd_count(archiver_pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        for client in clients {
            client.join().expect("an aborting client failed");
        }
    });
    let left = Instant::now();
    let released = wait_until(Duration::from_secs(5), || {
        open_fd_count(proxy_pid) <= proxy_fds && open_fd_count(archiver_pid) <= archiver_fds
    });
    println!(
        "{ABORTING_CLIENTS} aborting clients: proxy fds {proxy_fds} -> peak {} -> {} after {:?}; \
         archiver fds {archiver_fds} -> peak {} -> {}",
        peak_fds.0,
        open_fd_count(proxy_pid),
        left.elapsed(),
        peak_fds.1,
        open_fd_count(archiver_pid)
    );
    assert!(released, "fds not back to baseline within 5 s");
    let idle = wait_until(Duration::from_secs(5), || {
        scrape(addr).value("gitball_proxy_active_downloads", &[]) == 0.0
            && scrape(cluster.primary.addr).value("gitball_archiver_active_downloads", &[]) == 0.0
    });
    assert!(idle, "active_downloads not back to 0");
    assert!(
        scrape(addr).value("gitball_proxy_client_disconnects_total", &[])
            >= ABORTING_CLIENTS as f64,
        "client_disconnects_total did not count every aborting client"
    );
}

#[test]
fn idle_clients_are_disconnected_after_client_idle_timeout() {
    // Several at once: the pipe's watchdog and the server's write-stall
    // guard race to cut each one, and every cut must count as an idle
    // timeout whichever wins; one client alone would test one order only.
    const IDLE_CLIENTS: usize = 6;
    let big = big_repo_64();
    let full_length = big.full_length;
    let cluster = Cluster::start(&big.repos, &big.repos, 0, &["--client-idle-timeout", "1"]);
    let proxy = &cluster.proxy;
    let proxy_fds = settled_fd_count(proxy.pid);

    let mut clients: Vec<(RawConnection, usize)> = (0..IDLE_CLIENTS)
        .map(|_| {
            let mut connection = RawConnection::connect(proxy.addr).expect("connect");
            connection
                .send_request("GET", "/acme/big/archive/main.tar", &[])
                .expect("send");
            assert_eq!(connection.read_head().expect("head").status, 200);
            let received = connection
                .read_body_bytes(8 * KIB)
                .expect("first bytes")
                .len();
            (connection, received)
        })
        .collect();
    // The clients stop reading, their sockets open.
    let stopped = Instant::now();

    // The proxy fills the socket buffers, then gives up on the clients:
    // their connections and the upstream ones are closed.
    assert!(
        wait_until(SETTLE, || open_fd_count(proxy.pid) <= proxy_fds),
        "proxy fds {} > baseline {proxy_fds}",
        open_fd_count(proxy.pid)
    );
    let released_after = stopped.elapsed();
    println!(
        "{IDLE_CLIENTS} idle clients cut and proxy fds back to {proxy_fds} after \
         {released_after:?} (idle timeout 1 s)"
    );
    // Bounded (the idle timeout, not the 300 s write-stall cut or never),
    // with room for a loaded machine to fill the buffers and close 12
    // sockets.
    assert!(released_after < Duration::from_secs(16));

    // What a client finds when it reads again: the buffered bytes, then the
    // end of a connection that was cut, never a complete body.
    for (connection, received) in &mut clients {
        let end = connection.read_body_to_end(|piece| *received += piece.len());
        assert!(
            matches!(end, BodyEnd::Aborted(_)),
            "an idle client's body ended cleanly after {received} bytes"
        );
        assert!((*received as u64) < full_length);
    }
    assert!(wait_until(SETTLE, || scrape(cluster.primary.addr)
        .value("gitball_archiver_active_downloads", &[])
        == 0.0));
    let metrics = proxy.scrape();
    assert_eq!(metrics.value("gitball_proxy_active_downloads", &[]), 0.0);

    let idle_timeouts = metrics.value("gitball_proxy_client_idle_timeouts_total", &[]);
    let disconnects = metrics.value("gitball_proxy_client_disconnects_total", &[]);
    println!(
        "cuts counted as idle timeouts: {idle_timeouts}, as client disconnects: {disconnects}"
    );
    assert_eq!(
        idle_timeouts, IDLE_CLIENTS as f64,
        "{IDLE_CLIENTS} idle clients were cut, but client_idle_timeouts_total is \
         {idle_timeouts} and client_disconnects_total {disconnects}"
    );
}

// ---------------------------------------------------------------------------
// Parking: a stalled download releases its upstream

/// How long a test client stays stalled before its download parks.
const PARK_AFTER: &str = "0.3";

/// Opens a download of `path` through `proxy`, takes its head and 1 MiB,
/// then stops reading until the proxy has parked it (its upstream released:
/// the archiver serves no download). Returns the connection, the head and
/// a hasher over the bytes taken.
fn stall_until_parked(
    proxy: &Proxy,
    archiver: SocketAddr,
    path: &str,
) -> (RawConnection, ResponseHead, Sha256, u64) {
    let stalled = stall_until_the_proxy_parks(proxy, path);
    assert!(
        wait_until(SETTLE, || scrape(archiver)
            .value("gitball_archiver_active_downloads", &[])
            == 0.0),
        "the archiver still serves the parked download"
    );
    stalled
}

/// Waits until the proxy has parked its one stalled spliced download.
fn wait_until_the_spliced_download_parks(proxy: &Proxy) {
    assert!(
        wait_until(SETTLE, || proxy
            .scrape()
            .value("gitball_proxy_parked_downloads", &[])
            == 1.0),
        "the stalled spliced download was not parked"
    );
}

/// [`stall_until_parked`], judged by the proxy alone (an embedded proxy's
/// archiver has no address of its own to scrape).
fn stall_until_the_proxy_parks(
    proxy: &Proxy,
    path: &str,
) -> (RawConnection, ResponseHead, Sha256, u64) {
    let mut connection = RawConnection::connect(proxy.addr).expect("connect");
    // A piped download: a receive buffer of its own size, which the kernel
    // does not grow, so the proxy never gets 4 MiB into the socket within
    // 40 ms and never splices it (CI: the kernel's autotuned buffers took
    // 4.4 MB, the download was spliced, and its resume from a cold
    // archiver, a request for the complete archive, failed before any
    // byte: not the piped resume the tests are about). It also keeps the
    // kernel from taking more bytes after the park.
    socket2::SockRef::from(connection.stream())
        .set_recv_buffer_size(256 * KIB)
        .expect("SO_RCVBUF");
    let spliced = || {
        proxy
            .scrape()
            .value("gitball_proxy_splices_total", &[("outcome", "spliced")])
    };
    let spliced_before = spliced();
    connection.send_request("GET", path, &[]).expect("send");
    let head = connection.read_head().expect("head");
    assert_eq!(head.status, 200);
    let first = connection.read_body_bytes(MIB).expect("first MiB");
    let mut hasher = Sha256::new();
    hasher.update(&first);
    // The client reads nothing now; the proxy fills the socket buffers and
    // then has nothing to do but wait.
    assert!(
        wait_until(SETTLE, || proxy
            .scrape()
            .value("gitball_proxy_parked_downloads", &[])
            == 1.0),
        "the stalled download was not parked"
    );
    assert_eq!(
        spliced(),
        spliced_before,
        "the stalled download was spliced"
    );
    (connection, head, hasher, first.len() as u64)
}

/// `git archive --format=tar` of `big`'s `main`: SHA-256 and length.
fn big_tar_digest(big: &BigRepo) -> (String, u64) {
    let home = big
        .repos
        .parent()
        .expect("repos dir has a parent")
        .join("home");
    let repo = RepoBuilder::open(&big.repos.join("acme/big"), &home);
    let commit = repo.rev_parse("main");
    let mut child = repo.archive_stream("tar", "big-main/", &commit);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut hasher = Sha256::new();
    let length = std::io::copy(&mut stdout, &mut hasher).expect("read git archive");
    assert!(child.wait().expect("wait for git").success(), "git archive");
    (format!("{:x}", hasher.finalize()), length)
}

/// Whether `proxy` pipes no download within `SETTLE`.
fn downloads_end(proxy: &Proxy) -> bool {
    wait_until(SETTLE, || {
        proxy.scrape().value("gitball_proxy_active_downloads", &[]) == 0.0
    })
}

/// Kills a cluster's `primary` and starts an archiver on its address over
/// `big` without its cache (so the rest of a download can only come from a
/// new generation), running `git` if given. Returns the new archiver.
fn restart_without_cache(
    primary: &mut Archiver,
    big: &BigRepo,
    sandbox: &Sandbox,
    git: Option<&Path>,
) -> Service {
    let addr = primary.addr;
    kill_hard(primary);
    let git_args = git.map(|git| ["--git", git.to_str().expect("a UTF-8 path")]);
    start_archiver_at(
        &big.repos,
        &sandbox.path("empty-cache"),
        addr,
        git_args.as_ref().map_or(&[][..], |args| &args[..]),
    )
}

/// A warm cluster parking after `PARK_AFTER`, and a download of `BIG_PATH`
/// through it stalled until parked (the archiver's side released): what
/// the client has read so far.
fn parked_on_a_warm_cluster(sandbox: &Sandbox) -> (&'static BigRepo, Cluster, RawConnection, u64) {
    let (big, cluster) = warm_big_cluster(sandbox, &["--park-after", PARK_AFTER]);
    warm_up(&cluster, big);
    let (connection, _head, _hasher, received) =
        stall_until_parked(&cluster.proxy, cluster.primary.addr, BIG_PATH);
    (big, cluster, connection, received)
}

/// Reads the rest of a download of `big`'s archive whose first `received`
/// bytes were taken: it must be aborted short, never ended.
fn read_on_until_aborted(connection: &mut RawConnection, mut received: u64, big: &BigRepo) {
    let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "a download that could not go on ended cleanly after {received} bytes"
    );
    assert!(received < big.full_length);
}

/// Reads the rest of a download whose first `received` bytes went into
/// `hasher`: it must end cleanly, with `length` bytes of SHA-256 `digest`
/// (hex, as [`big_tar_digest`] gives them).
fn read_rest_as_gits(
    connection: &mut RawConnection,
    mut hasher: Sha256,
    mut received: u64,
    digest: &str,
    length: u64,
) {
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        received += piece.len() as u64;
    });
    assert_eq!(end, BodyEnd::Complete, "after {received} bytes");
    assert_eq!(received, length);
    assert_eq!(format!("{:x}", hasher.finalize()), digest);
}

/// Reads the rest of a download of `big`'s archive whose first `received`
/// bytes went into `hasher`: it must end cleanly, whole, with the bytes
/// `digest` (its `Repr-Digest`) names.
fn read_rest_and_check(
    connection: &mut RawConnection,
    mut hasher: Sha256,
    mut received: u64,
    digest: &str,
    big: &BigRepo,
    what: &str,
) {
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        received += piece.len() as u64;
    });
    assert_eq!(end, BodyEnd::Complete, "{what}: after {received} bytes");
    assert_eq!(received, big.full_length, "{what}");
    assert_eq!(
        digest,
        format!("sha-256=:{}:", base64(&hasher.finalize())),
        "{what}: the bytes differ from the archive's"
    );
}

#[test]
fn a_stalled_download_parks_and_resumes_with_the_same_bytes() {
    let sandbox = Sandbox::new();
    // Longer than `PARK_AFTER`: the test must see the gauge at 0 between
    // the resume and the next park, a window of about --park-after, and a
    // scrape on a loaded machine can take longer than 0.3 s.
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", "1.5"]);
    warm_up(&cluster, big);

    let (mut connection, head, mut hasher, mut received) =
        stall_until_parked(&cluster.proxy, cluster.primary.addr, BIG_PATH);
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    let digest = head.header("repr-digest").expect("a hit has a digest");

    // The client reads again until the download resumed (the socket
    // buffers held some bytes), then stalls again: parked again after
    // --park-after, not only once the idle timeout (60 s) comes (attack:
    // the watchdog slept through the resume).
    let resumed = |proxy: &Proxy| {
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
            >= 1.0
    };
    while !resumed(&cluster.proxy) {
        assert!(
            received < big.full_length / 2,
            "not resumed after {received} bytes"
        );
        let piece = connection.read_body_bytes(256 * 1024).expect("more bytes");
        hasher.update(&piece);
        received += piece.len() as u64;
    }
    // Unparked right after the resume is counted, and parked again no
    // sooner than --park-after after the socket buffers filled: the gauge
    // reads 0 in between, and a 1 then is the second park. A loaded host
    // can take longer than --park-after between the resume and a scrape,
    // and then the download has rightly been parked again: the client
    // reads on (each read resumes it) until a scrape sees the 0.
    let parked = |proxy: &Proxy| proxy.scrape().value("gitball_proxy_parked_downloads", &[]);
    while parked(&cluster.proxy) != 0.0 {
        assert!(
            received < big.full_length / 2,
            "the resumed download was not unparked after {received} bytes"
        );
        let piece = connection.read_body_bytes(256 * 1024).expect("more bytes");
        hasher.update(&piece);
        received += piece.len() as u64;
    }
    assert!(
        wait_until(SETTLE, || parked(&cluster.proxy) == 1.0),
        "the resumed download, stalled again, was not parked again"
    );

    // The client reads again: the rest comes by a range request.
    read_rest_and_check(&mut connection, hasher, received, digest, big, "resumed");
    let metrics = cluster.proxy.scrape();
    assert!(metrics.value("gitball_proxy_resumes_total", &[("outcome", "resumed")]) >= 2.0);
    assert_eq!(
        metrics.value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        0.0
    );
    assert_eq!(metrics.value("gitball_proxy_parked_downloads", &[]), 0.0);
    assert_eq!(metrics.sum("gitball_proxy_upstream_aborts_total", &[]), 0.0);
    // The log line is the download's one (after the warm-up's), complete,
    // with every byte, and its attempts count the resumes'
    // (`docs/observability.md`).
    let resumes = metrics.value("gitball_proxy_resumes_total", &[("outcome", "resumed")]);
    // The warm-up's line, then this download's.
    let line = nth_complete_line(&cluster.proxy, big.full_length, 2);
    assert_eq!(line["attempts"], (1 + resumes as u32).to_string(), "{line}");
    assert_eq!(
        line["upstream"],
        cluster.primary.base_url.as_str(),
        "{line}"
    );
}

/// `--park-after 0` never parks (docs/proxy.md, "Flags"): a client that
/// stalls keeps its upstream download (as with nginx) until it reads on or
/// is cut for idleness, and then gets the rest from it.
#[test]
fn park_after_zero_never_parks() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", "0"]);
    warm_up(&cluster, big);
    let mut connection = RawConnection::connect(cluster.proxy.addr).expect("connect");
    connection.send_request("GET", BIG_PATH, &[]).expect("send");
    let head = connection.read_head().expect("head");
    assert_eq!(head.status, 200);
    let digest = head.header("repr-digest").expect("a hit has a digest");
    let first = connection.read_body_bytes(MIB).expect("first MiB");
    let mut hasher = Sha256::new();
    hasher.update(&first);
    // Stalled for far longer than a park takes (`PARK_AFTER` parks within
    // a scrape or two): never parked, the archiver still serving it.
    assert!(
        !wait_until(Duration::from_secs(2), || cluster
            .proxy
            .scrape()
            .value("gitball_proxy_parked_downloads", &[])
            > 0.0),
        "parked with --park-after 0"
    );
    assert_eq!(
        scrape(cluster.primary.addr).value("gitball_archiver_active_downloads", &[]),
        1.0,
        "the upstream download was let go"
    );
    read_rest_and_check(
        &mut connection,
        hasher,
        first.len() as u64,
        digest,
        big,
        "never parked",
    );
    let metrics = cluster.proxy.scrape();
    assert_eq!(metrics.sum("gitball_proxy_resumes_total", &[]), 0.0);
}

/// The `n`th request line of `proxy` for a complete download of `bytes`,
/// once it is written (a line comes when the body ends, which may be after
/// the client has its last byte).
fn nth_complete_line(proxy: &Proxy, bytes: u64, n: usize) -> serde_json::Value {
    let mut lines = Vec::new();
    assert!(
        wait_until(SETTLE, || {
            lines = gitball_e2e::request_lines(&proxy.log());
            lines.retain(|line| line["ending"] == "complete" && line["bytes"] == bytes);
            lines.len() >= n
        }),
        "fewer than {n} complete log lines of {bytes} bytes:\n{}",
        proxy.log()
    );
    lines.swap_remove(n - 1)
}

/// A parked download that resumes on another archiver (the one it came
/// from is gone) is logged with that archiver as its `upstream`, and with
/// every attempt: the first answer's and both of the resume's
/// (`docs/observability.md`).
#[test]
fn a_download_resumed_elsewhere_is_logged_with_the_upstream_that_resumed_it() {
    let big = big_repo_64();
    let (expected_digest, expected_length) = big_tar_digest(big);
    let mut cluster = Cluster::start(&big.repos, &big.repos, 1, &["--park-after", PARK_AFTER]);
    let path = "/acme/big/archive/main.tar";
    let (mut connection, _head, hasher, received) =
        stall_until_the_proxy_parks(&cluster.proxy, path);
    // Parked, the download's upstream was released: the archiver that
    // served it has logged it.
    let served = |archiver: &Archiver| {
        archiver
            .log()
            .lines()
            .any(|line| line.contains("\"message\":\"request\"") && line.contains(path))
    };
    assert!(
        wait_until(SETTLE, || cluster.archivers().into_iter().any(served)),
        "no archiver logged the parked download"
    );
    let (gone, other) = if served(&cluster.primary) {
        (&mut cluster.primary, cluster.replicas[0].base_url.clone())
    } else {
        (&mut cluster.replicas[0], cluster.primary.base_url.clone())
    };
    kill_hard(gone);

    read_rest_as_gits(
        &mut connection,
        hasher,
        received,
        &expected_digest,
        expected_length,
    );
    let line = nth_complete_line(&cluster.proxy, expected_length, 1);
    assert_eq!(line["upstream"], other.as_str(), "{line}");
    // The first answer's attempt and the resume's two (the gone archiver's
    // and the other's), and one more for each time the client's kernel took
    // more bytes after the park and the download resumed and parked again:
    // the line counts what the proxy counted, this cluster's only download.
    let attempts = cluster.proxy.scrape().sum(ATTEMPTS, &[]);
    assert!(attempts >= 3.0, "{attempts} attempts counted");
    assert_eq!(line["attempts"], attempts.to_string().as_str(), "{line}");
}

/// Embedded, the in-process archiver serves on through the proxy's
/// shutdown grace: a parked download whose client reads again after
/// SIGTERM resumes on a new connection to it and ends complete, and the
/// drain then completes (docs/proxy.md, "Signals"). The archiver used to
/// stop accepting at SIGTERM with the proxy: the resume was an upstream
/// failure, the archiver ejected and the download aborted (attack).
#[test]
fn embedded_a_parked_download_resumes_during_the_shutdown_grace() {
    let sandbox = Sandbox::new();
    let big = big_repo_128();
    let cache = sandbox.path("cache");
    link_files(warm_big_cache(), &cache);
    let mut proxy = Proxy::embedded(
        &big.repos,
        &cache,
        &["--park-after", PARK_AFTER, "--shutdown-grace", "60"],
    );
    let (mut connection, head, hasher, received) = stall_until_the_proxy_parks(&proxy, BIG_PATH);
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    let digest = head.header("repr-digest").expect("a hit has a digest");

    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(SETTLE, || proxy.log().contains("SIGTERM: shutting down")),
        "{}",
        proxy.log()
    );
    read_rest_and_check(
        &mut connection,
        hasher,
        received,
        digest,
        big,
        "resumed after SIGTERM",
    );
    drop(connection);
    assert!(
        wait_until(SETTLE, || !proxy.is_running()),
        "the proxy did not exit once its download was done"
    );
    let log = proxy.log();
    assert!(log.contains("shutdown: all downloads finished"), "{log}");
    assert!(!log.contains("ejected"), "{log}");
}

/// `docs/archiver.md` (Shutdown drain), for the proxy: a second SIGTERM
/// during the drain ends the grace at once, in embedded mode for the
/// in-process archiver too, and the stalled download is cut (aborted).
/// Before, the second signal did nothing and the drain ran its whole grace.
#[test]
fn embedded_a_second_sigterm_ends_the_shutdown_grace_at_once() {
    let sandbox = Sandbox::new();
    let big = big_repo_128();
    let cache = sandbox.path("cache");
    link_files(warm_big_cache(), &cache);
    let mut proxy = Proxy::embedded(&big.repos, &cache, &["--shutdown-grace", "600"]);
    let mut connection = RawConnection::connect(proxy.addr).unwrap();
    connection.send_request("GET", BIG_PATH, &[]).unwrap();
    assert_eq!(connection.read_head().unwrap().status, 200);
    connection.read_body_bytes(64 << 10).unwrap();

    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(SETTLE, || proxy.log().contains("SIGTERM: shutting down")),
        "{}",
        proxy.log()
    );
    assert!(proxy.is_running(), "exited before the grace ran out");
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    // The embedded archiver's generations get 5 s to stop; a margin.
    let exit = proxy.wait_exit(Duration::from_secs(10));
    let status = exit.unwrap_or_else(|| {
        panic!(
            "still draining after a second SIGTERM (grace 600 s); log:\n{}",
            proxy.log()
        )
    });
    assert!(status.success(), "exit status {status}");
    let log = proxy.log();
    assert!(
        log.contains("SIGTERM again: ending the shutdown grace now"),
        "{log}"
    );
    let end = connection.read_body_to_end(|_| {});
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "the cut download ended {end:?}"
    );
}

#[test]
fn a_parked_download_resumes_from_a_new_generation_after_a_restart_on_an_empty_cache() {
    let sandbox = Sandbox::new();
    let big = big_repo_64();
    let (expected_digest, expected_length) = big_tar_digest(big);
    // A cold cache: the download starts while its archive is generated
    // (chunked, no length).
    let mut cluster = Cluster::start(&big.repos, &big.repos, 0, &["--park-after", PARK_AFTER]);
    let (mut connection, head, hasher, received) = stall_until_parked(
        &cluster.proxy,
        cluster.primary.addr,
        "/acme/big/archive/main.tar",
    );
    assert_eq!(head.header("x-gitball-cache"), Some("miss"));

    // The archiver goes, and comes back on the same address without its
    // cache: the rest can only come from a new generation.
    let _restarted = restart_without_cache(&mut cluster.primary, big, &sandbox, None);

    read_rest_as_gits(
        &mut connection,
        hasher,
        received,
        &expected_digest,
        expected_length,
    );
    let metrics = cluster.proxy.scrape();
    assert!(metrics.value("gitball_proxy_resumes_total", &[("outcome", "resumed")]) >= 1.0);
    assert_eq!(
        metrics.value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        0.0
    );
}

/// A parked download resumed from a new generation that then fails: the
/// resume counts as `resumed` (an upstream gave the rest's head), the
/// failure as an upstream abort, and the download is aborted, never ended
/// (`docs/proxy.md#parking`; attack: the docs said a resume that did not
/// bring the download to its end counted as `failed`).
#[test]
fn a_resumed_download_whose_new_generation_fails_is_an_upstream_abort() {
    let sandbox = Sandbox::new();
    let (big, mut cluster, mut connection, received) = parked_on_a_warm_cluster(&sandbox);
    let resumed = |outcome| {
        cluster
            .proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", outcome)])
    };
    // Counted from the park: the client's kernel may have taken more bytes
    // before it, and the download resumed on the warm archiver.
    let resumed_at_park = resumed("resumed");
    // Back on the same address without its cache, with a git that writes
    // the first 512 KiB of the archive and fails.
    let git = sandbox.write_stub(
        "failing-git",
        &format!(
            "'{git}' \"$@\" | /usr/bin/head -c 524288\nexit 1\n",
            git = gitball_e2e::real_git().display()
        ),
    );
    let _restarted = restart_without_cache(&mut cluster.primary, big, &sandbox, Some(&git));

    read_on_until_aborted(&mut connection, received, big);
    assert!(
        resumed("resumed") > resumed_at_park,
        "the resume not counted"
    );
    assert_eq!(resumed("failed"), 0.0);
    let metrics = cluster.proxy.scrape();
    assert!(metrics.sum("gitball_proxy_upstream_aborts_total", &[]) >= 1.0);
}

/// A parked download resumed from an archiver that generates the archive
/// again slowly but steadily: the bytes before the download's next one take
/// longer than `--header-timeout` to come again, but none is that long in
/// coming. The silence bound is per chunk, skipped ones included, so the
/// download continues (it was aborted when the bound covered the skip).
#[test]
fn a_parked_download_resumes_from_a_generation_slower_than_the_silence_bound() {
    let sandbox = Sandbox::new();
    let big = big_repo_64();
    let (expected_digest, expected_length) = big_tar_digest(big);
    // The bound also covers each answer's head, which a cold generation
    // sends with git's first bytes: on a loaded machine a restarted
    // archiver took more than 1 s to start git and send them, and the
    // resume was a header timeout (flaked 1 of 15 under load with a bound
    // of 1 s).
    let mut cluster = Cluster::start(
        &big.repos,
        &big.repos,
        0,
        &["--park-after", PARK_AFTER, "--header-timeout", "3"],
    );
    let (mut connection, _head, hasher, received) = stall_until_parked(
        &cluster.proxy,
        cluster.primary.addr,
        "/acme/big/archive/main.tar",
    );
    let resumed = || {
        cluster
            .proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };
    // Counted from the park the test saw: the client's kernel may have
    // taken more bytes before it, and the download resumed.
    let resumed_at_park = resumed();
    // 12 pieces of 64 KiB 500 ms apart, all within the client's first MiB:
    // the bytes before its next one take 5.5 s to come again, twice the
    // 3 s bound, and each piece comes well within it.
    let git = sandbox.git_that_trickles("trickling-git", 12, 500);
    let _restarted = restart_without_cache(&mut cluster.primary, big, &sandbox, Some(&git));

    read_rest_as_gits(
        &mut connection,
        hasher,
        received,
        &expected_digest,
        expected_length,
    );
    assert!(resumed() > resumed_at_park, "the resume not counted");
    assert_eq!(
        cluster
            .proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        0.0
    );
}

/// A parked download resumed from a new generation skips the bytes its
/// client already has as they come again; a client that leaves during that
/// skip ends the download there, and the upstream connection goes with it,
/// not when the skip ends or the silence bound runs out
/// (`docs/proxy.md#parking`).
#[test]
fn a_client_that_leaves_while_its_resume_skips_releases_the_upstream() {
    use std::io::Read as _;
    let sandbox = Sandbox::new();
    let big = big_repo_64();
    let mut cluster = Cluster::start(&big.repos, &big.repos, 0, &["--park-after", PARK_AFTER]);
    let (connection, ..) = stall_until_parked(
        &cluster.proxy,
        cluster.primary.addr,
        "/acme/big/archive/main.tar",
    );
    // Back without its cache, with a git that writes the archive's first
    // 64 KiB and then waits: all of it bytes the client has (1 MiB), so
    // the resume's answer comes and its skip never ends.
    let (git, mut release) = sandbox.git_that_pauses("pausing-git", 64 * KIB as u64);
    let restarted = restart_without_cache(&mut cluster.primary, big, &sandbox, Some(&git));
    let addr = restarted.addr;
    let proxy = &cluster.proxy;
    let resumed = || {
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };
    let resumed_at_park = resumed();
    // The client reads what the kernel holds, so hyper asks for more and
    // the pipe resumes.
    let stream = connection.stream();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut buffer = vec![0; 256 * KIB];
    let deadline = Instant::now() + SETTLE;
    while resumed() == resumed_at_park {
        assert!(Instant::now() < deadline, "the download did not resume");
        match (&*stream).read(&mut buffer) {
            Ok(read) => assert_ne!(read, 0, "the download ended"),
            Err(error) => assert!(
                matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{error}"
            ),
        }
    }
    let disconnects = || {
        proxy
            .scrape()
            .sum("gitball_proxy_client_disconnects_total", &[])
    };
    let disconnects_before = disconnects();
    // The skip is under way: the new generation serves the resume.
    assert_eq!(
        scrape(addr).value("gitball_archiver_active_downloads", &[]),
        1.0
    );

    drop(connection);
    assert!(
        downloads_end(proxy),
        "the download went on after its client left"
    );
    assert!(
        wait_until(SETTLE, || scrape(addr)
            .value("gitball_archiver_active_downloads", &[])
            == 0.0),
        "the archiver still serves the download"
    );
    assert!(disconnects() > disconnects_before, "no disconnect counted");
    writeln!(release).expect("release the paused git");
}

/// A `.sha256` waits for the whole generation, as a complete-only request
/// does: a generation longer than `--header-timeout` is answered, and its
/// archiver is not ejected for taking that long.
#[test]
fn a_checksum_of_a_generation_slower_than_the_header_timeout_is_answered() {
    let sandbox = Sandbox::new();
    let big = big_repo_64();
    let (expected_digest, _) = big_tar_digest(big);
    // 12 pieces 250 ms apart: 3 s before the rest.
    let git = sandbox.git_that_trickles("trickling-git", 12, 250);
    let primary = Archiver::start(&big.repos, &["--git", git.to_str().unwrap()]);
    let cluster = Cluster::around(primary, Vec::new(), &["--header-timeout", "1"]);
    let answer = fetch(cluster.proxy.addr, "/acme/big/archive/main.tar.sha256");
    assert_eq!(answer.status(), 200, "{}", answer.text());
    assert!(
        answer.text().starts_with(&expected_digest),
        "{}",
        answer.text()
    );
    let metrics = cluster.proxy.scrape();
    assert_eq!(metrics.sum(ATTEMPTS, &[("outcome", "header_timeout")]), 0.0);
    assert_eq!(family_sum(&metrics, "gitball_proxy_upstream_ejected"), 0.0);
}

#[test]
fn a_parked_download_that_cannot_resume_is_aborted_not_ended() {
    let sandbox = Sandbox::new();
    let (big, mut cluster, mut connection, received) = parked_on_a_warm_cluster(&sandbox);
    // No archiver left to give the rest.
    kill_hard(&mut cluster.primary);
    read_on_until_aborted(&mut connection, received, big);
    let metrics = cluster.proxy.scrape();
    assert_eq!(
        metrics.value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        1.0
    );
    assert_eq!(metrics.value("gitball_proxy_parked_downloads", &[]), 0.0);
    assert!(wait_until(SETTLE, || cluster
        .proxy
        .scrape()
        .value("gitball_proxy_active_downloads", &[])
        == 0.0));
}

/// A chunked download (its archive still generated) parked with every byte
/// of the archive handed to the client's connection, but the body's end not
/// yet read from the archiver: the archive completes meanwhile, and when the
/// client reads on, the resume finds nothing left and the download ends
/// complete (`docs/proxy.md#parking`). Review: the resume asked for the
/// range from the next byte, past the end of the now complete archive, got
/// `416`, and aborted a download that had every byte.
#[test]
fn a_chunked_download_parked_with_every_byte_sent_ends_complete() {
    // The archive: 160 KiB of tar, which git writes in three pieces, each
    // in one write when told, and then exits when told: the archiver
    // streams them chunked, and the end of the body comes only after that.
    // 60 KiB and then 40 KiB fit on the way to a client with a 4 KiB window
    // (the proxy's socket takes writes while less than 64 KiB waits
    // unsent, and the 40 KiB write takes it past that); the last 60 KiB do
    // not, and stay with the proxy, the download parked with every byte
    // handed over. Where chunks are cut is the kernel's and the
    // archiver's, so a try whose chunks did not come that way is done
    // again (at most 4); every try must end complete.
    const PIECES: [usize; 3] = [60 * KIB, 40 * KIB, 60 * KIB];
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "tail");
    let (release, mut go) = sandbox.fifo("release");
    let output = sandbox.path("output");
    let out = output.display();
    let release = release.display();
    let piece = |skip: usize, take: usize| {
        format!(
            "/usr/bin/tail -c +{from} '{out}' | /usr/bin/head -c {take} \
             | /usr/bin/dd bs=1M iflag=fullblock status=none\n\
             read line < '{release}'\n",
            from = skip + 1,
        )
    };
    let git = sandbox.write_stub(
        "pausing-git",
        &format!(
            "'{git}' \"$@\" > '{out}' || exit $?\n{first}{second}{third}",
            git = gitball_e2e::real_git().display(),
            first = piece(0, PIECES[0]),
            second = piece(PIECES[0], PIECES[1]),
            third = piece(PIECES[0] + PIECES[1], PIECES[2]),
        ),
    );
    let archiver = Archiver::start(&sandbox.repos(), &["--git", git.to_str().unwrap()]);
    let cluster = Cluster::around(archiver, Vec::new(), &["--park-after", PARK_AFTER]);
    let proxy = &cluster.proxy;
    let sent = || proxy.scrape().value("gitball_proxy_sent_bytes_total", &[]);
    let parked = || proxy.scrape().value("gitball_proxy_parked_downloads", &[]);
    let resumed = || {
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };

    for attempt in 0..4u64 {
        repo.write(
            "blob.bin",
            gitball_e2e::pseudo_random_bytes(attempt, 150 * KIB),
        );
        let commit = repo.commit_all(1_700_000_000 + attempt as i64, "blob");
        let tar = repo.archive("tar", &format!("tail-{commit}/"), &commit, None);
        assert_eq!(
            tar.len(),
            PIECES.iter().sum::<usize>(),
            "the test's premise"
        );
        let path = format!("/acme/tail/archive/{commit}.tar");
        let (before, resumed_before) = (sent(), resumed());

        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        socket2::SockRef::from(connection.stream())
            .set_recv_buffer_size(4 * KIB)
            .expect("SO_RCVBUF");
        connection.send_request("GET", &path, &[]).expect("send");
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 200);
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        // The client reads nothing now; each piece is told to come once
        // the last one was handed to the client's connection.
        let mut handed = 0;
        let mut as_planned = true;
        for (n, piece) in PIECES.iter().enumerate() {
            if n > 0 {
                writeln!(go, "piece {n}").expect("release git");
            }
            handed += piece;
            as_planned &= wait_until(SETTLE, || sent() - before == handed as f64);
            // Not parked before the last piece: nothing was left unwritten.
            as_planned &= n == PIECES.len() - 1 || parked() == 0.0;
        }
        as_planned &= wait_until(SETTLE, || parked() == 1.0);
        // git exits: the archive is complete (its checksum waits for that).
        writeln!(go, "exit").expect("release git");
        let checksum = fetch(cluster.primary.addr, &format!("{path}.sha256"));
        assert_eq!(checksum.status(), 200, "{}", checksum.text());

        let mut body = Vec::new();
        let end = connection.read_body_to_end(|piece| body.extend_from_slice(piece));
        assert_eq!(
            end,
            BodyEnd::Complete,
            "try {attempt}: after {} bytes",
            body.len()
        );
        assert_same_bytes(&body, &tar, "the download");
        assert_eq!(
            proxy
                .scrape()
                .sum("gitball_proxy_upstream_aborts_total", &[]),
            0.0
        );
        if as_planned {
            assert_eq!(resumed() - resumed_before, 1.0);
            return;
        }
        println!("try {attempt}: the chunks did not come as planned; again");
    }
    panic!("no download was parked with every byte handed over in 4 tries");
}

/// A client is judged by the writes its socket takes
/// (`docs/http.md#limits-on-client-input`, `docs/proxy.md#parking`): the
/// socket takes a write once the client took about the last one's bytes,
/// up to 64 KiB. A client that takes 64 KiB well within `--park-after` is
/// never parked; one that reads on, but slower than 64 KiB per
/// `--park-after`, is parked and resumed in turn, and gets every byte.
#[test]
fn a_slow_client_is_judged_by_the_writes_its_socket_takes() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "paced");
    repo.write("blob.bin", gitball_e2e::pseudo_random_bytes(11, 200 * KIB));
    let commit = repo.commit_all(1_700_000_000, "blob");
    let tar = repo.archive("tar", "paced-main/", &commit, None);
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let cluster = Cluster::around(archiver, Vec::new(), &["--park-after", "1"]);
    let path = "/acme/paced/archive/main.tar";
    // A hit, with its length: piped (too short to splice).
    assert_eq!(fetch(cluster.proxy.addr, path).status(), 200);
    let resumes = || {
        cluster
            .proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };

    // 64 KiB every 100 ms; then at most 4 KiB every 100 ms (a 4 KiB
    // window), 64 KiB in 1.6 s or more.
    for (piece, window, parked) in [(64 * KIB, None, false), (4 * KIB, Some(4 * KIB), true)] {
        let before = resumes();
        let mut connection = RawConnection::connect(cluster.proxy.addr).expect("connect");
        if let Some(window) = window {
            socket2::SockRef::from(connection.stream())
                .set_recv_buffer_size(window)
                .expect("SO_RCVBUF");
        }
        connection.send_request("GET", path, &[]).expect("send");
        assert_eq!(connection.read_head().expect("head").status, 200);
        let mut body = Vec::new();
        while body.len() < tar.len() {
            let got = connection.read_body_bytes(piece).expect("read");
            assert!(!got.is_empty(), "ended after {} bytes", body.len());
            body.extend_from_slice(&got);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_same_bytes(&body, &tar, "the paced download");
        let resumed = resumes() - before;
        if parked {
            assert!(resumed >= 1.0, "a client taking 40 KiB/s was not parked");
        } else {
            assert_eq!(resumed, 0.0, "a client taking 640 KiB/s was parked");
        }
    }
}

// ---------------------------------------------------------------------------
// Upstreams that frame bodies as no archiver does

/// An upstream on 127.0.0.1 that answers each of `connections` connections
/// with `answer`, whatever was asked, then closes it. Its thread ends after
/// the last connection, or when none comes within [`SETTLE`].
fn scripted_upstream(answer: &'static [u8], connections: usize) -> SocketAddr {
    sequenced_upstream(vec![answer; connections]).0
}

/// An upstream on 127.0.0.1 that answers its n-th connection with
/// `answers[n]`, whatever was asked, then closes it, and sends each request
/// head it read. Its thread ends after the last answer, or when no
/// connection comes within [`SETTLE`].
fn sequenced_upstream(
    answers: Vec<&'static [u8]>,
) -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
    use std::io::Write;
    let (heads, received) = std::sync::mpsc::channel();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for answer in answers {
            let mut accepted = None;
            if !wait_until(SETTLE, || {
                accepted = listener.accept().ok();
                accepted.is_some()
            }) {
                return;
            }
            let (mut stream, _) = accepted.expect("accepted");
            stream.set_nonblocking(false).expect("blocking");
            stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
            let head = gitball_e2e::read_request_head(&mut stream);
            let _ = stream.write_all(answer);
            // The test may not want the heads.
            let _ = heads.send(head);
        }
    });
    (addr, received)
}

/// A proxy whose one route goes to `upstream`.
fn proxy_before(upstream: SocketAddr, sandbox: &Sandbox) -> Proxy {
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new("*", &format!("http://{upstream}"), &[])],
    );
    Proxy::with_routes(&routes, &[])
}

/// `docs/internal-api.md`, "Connections": a burst leaves at most 256 idle
/// connections per upstream in a serving thread's pool; the others close as
/// their responses end, not when the pool's 5 s run out. The proxy runs on
/// one CPU (one serving thread, one pool), and 320 requests are in flight
/// at once (the upstream answers none before it has all of them), so 320
/// connections come back to the pool together. (Without the bound all 320
/// stayed open to the archiver for 5 s after a burst of 320.)
#[test]
fn a_burst_leaves_at_most_256_idle_upstream_connections_per_pool() {
    const BOUND: usize = 256;
    const BURST: usize = BOUND + 64;
    let sandbox = Sandbox::new();

    // Answers each connection's request once all BURST have come, and
    // keeps every connection open: only the proxy closes one.
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    listener.bind(&any.into()).expect("bind");
    listener.listen(1024).expect("listen");
    let listener: std::net::TcpListener = listener.into();
    let upstream = listener.local_addr().expect("address");
    let (answered, answered_at) = std::sync::mpsc::channel();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut connections = Vec::new();
        while connections.len() < BURST {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
            assert!(gitball_e2e::is_whole_head(&gitball_e2e::read_request_head(
                &mut stream
            )));
            connections.push(stream);
        }
        let _ = answered.send(Instant::now());
        for stream in &mut connections {
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: 1\r\n\r\nx",
            );
        }
        let _ = finished.recv_timeout(Duration::from_secs(120));
    });

    // One CPU for the proxy: the spawning thread's affinity is the child's.
    let all_cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let first = (0..nix::sched::CpuSet::count())
        .find(|&cpu| all_cpus.is_set(cpu).unwrap_or(false))
        .expect("a CPU");
    let mut one = nix::sched::CpuSet::new();
    one.set(first).expect("cpu");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("set affinity");
    let proxy = proxy_before(upstream, &sandbox);
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all_cpus)
        .expect("restore affinity");

    let path = "/acme/widget/archive/main.tar.gz";
    let mut clients: Vec<RawConnection> = (0..BURST)
        .map(|_| {
            let mut client = RawConnection::connect(proxy.addr).expect("connect");
            client.send_request("GET", path, &[]).expect("send");
            client
        })
        .collect();
    let answered_at = answered_at
        .recv_timeout(Duration::from_secs(60))
        .expect("the upstream got every request");
    for client in &mut clients {
        let head = client.read_head().expect("head");
        assert_eq!(head.status, 200);
        assert_eq!(client.read_body_bytes(1).expect("body"), b"x");
    }
    // Well before any of them could have expired (5 s after it came back).
    let within = Duration::from_secs(4).saturating_sub(answered_at.elapsed());
    let mut open = 0;
    let mut sampled = Duration::ZERO;
    let bounded = wait_until(within, || {
        open = gitball_e2e::connections_to(proxy.pid, as_v4(upstream));
        sampled = answered_at.elapsed();
        open <= BOUND
    });
    assert!(
        bounded,
        "{open} connections to the upstream left open after a burst of {BURST}"
    );
    // Idle connections expire 5 s after they came back: a test thread
    // held off the CPU that long (reading 320 heads) may rightly see none.
    assert!(
        open > 0 || sampled >= Duration::from_secs(5),
        "the pool kept no idle connection ({sampled:?} after the answers)"
    );
    drop(done);
}

fn as_v4(addr: SocketAddr) -> std::net::SocketAddrV4 {
    match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => panic!("{addr} is not IPv4"),
    }
}

/// `docs/http.md#errors`: the proxy's own error's message never holds an
/// upstream's address (that goes to the log). (Docs audit: no test read
/// the 502, 503 or 504 bodies for one.)
fn assert_names_no_upstream(answer: &Fetched, upstreams: &[&str]) {
    let text = answer.text();
    for upstream in upstreams {
        let host_port = upstream.trim_start_matches("http://");
        let port = host_port.rsplit(':').next().unwrap_or(host_port);
        assert!(
            !text.contains(host_port) && !text.contains(port) && !text.contains("127.0.0.1"),
            "{}: the body names an upstream: {text}",
            answer.status()
        );
    }
}

/// `docs/proxy.md#when-every-candidate-fails`: the first rule that applies
/// decides the answer. A `5xx` an attempt got is passed through, the last
/// one (the archiver's reason, `Retry-After` with it); candidates that all
/// timed out are a `504`; candidates all ejected before the request are a
/// `503 unavailable` whose `Retry-After` is the time to the first
/// ejection's end.
#[test]
fn when_every_candidate_fails_the_answer_follows_the_documented_rules() {
    let sandbox = Sandbox::new();
    let path = "/acme/widget/archive/main.tar";
    let table = |primary: &str, replica: &str| {
        let routes = sandbox.path("routes.toml");
        write_routes(&routes, &[Route::new("*", primary, &[replica])]);
        routes
    };

    // Rule 1: both busy. The replica is tried first, the primary last, and
    // the primary's answer is the client's; a busy archiver is not ejected.
    let primary = scripted_upstream(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\
          Content-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"error\":\"primary\"}",
        1,
    );
    let replica = scripted_upstream(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n\
          Content-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"error\":\"replica\"}",
        1,
    );
    let proxy = Proxy::with_routes(
        &table(&format!("http://{primary}"), &format!("http://{replica}")),
        &[],
    );
    let answer = fetch(proxy.addr, path);
    assert_eq!(answer.status(), 503, "{}", answer.text());
    assert_eq!(answer.header("retry-after"), "5");
    assert_eq!(
        answer.error_code(),
        "primary",
        "the last 5xx is passed through"
    );
    let metrics = proxy.scrape();
    assert_eq!(metrics.sum(ATTEMPTS, &[("outcome", "busy")]), 2.0);
    assert_eq!(metrics.sum("gitball_proxy_upstream_ejected", &[]), 0.0);
    drop(proxy);

    // Rule 3: two upstreams that accept (the kernel completes the
    // handshake into the backlog) and never answer.
    let silent = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let [primary, replica] = silent
        .each_ref()
        .map(|listener| format!("http://{}", listener.local_addr().expect("address")));
    let proxy = Proxy::with_routes(
        &table(&primary, &replica),
        &["--header-timeout", "1", "--eject-for", "60"],
    );
    let started = Instant::now();
    let answer = fetch(proxy.addr, path);
    assert_eq!(answer.status(), 504, "{}", answer.text());
    assert_eq!(answer.error_code(), "gateway_timeout");
    assert_names_no_upstream(&answer, &[&primary, &replica]);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "one --header-timeout per candidate"
    );
    let metrics = proxy.scrape();
    assert_eq!(metrics.sum(ATTEMPTS, &[("outcome", "header_timeout")]), 2.0);
    assert_eq!(metrics.sum("gitball_proxy_upstream_ejected", &[]), 2.0);

    // Rule 2: both were ejected before this request. Each is still tried
    // (an ejected candidate goes last, it is not skipped), and the answer
    // says when the first ejection ends.
    let answer = fetch(proxy.addr, path);
    assert_eq!(answer.status(), 503, "{}", answer.text());
    assert_eq!(answer.error_code(), "unavailable");
    assert_names_no_upstream(&answer, &[&primary, &replica]);
    let retry_after: u64 = answer.header("retry-after").parse().expect("whole seconds");
    assert!(
        (50..=60).contains(&retry_after),
        "the first of two 60 s ejections began seconds ago: {retry_after}"
    );
    assert_eq!(
        proxy
            .scrape()
            .sum(ATTEMPTS, &[("outcome", "header_timeout")]),
        4.0
    );
}

/// `docs/observability.md`, "Series at start-up": the 5xx the proxy
/// answers exist at 0 from the start, so the first `502` is an increase
/// between two scrapes. `GitballProxyErrors` takes the `increase()` of
/// them, which sees nothing of the event a series is born with: each 5xx
/// code's first answer after a start was missing from its count.
#[test]
fn a_first_bad_gateway_is_an_increase_between_two_scrapes() {
    let sandbox = Sandbox::new();
    let refused = RefusingPort::new();
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &refused.url(), &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    let before = proxy.scrape();
    for code in ["500", "502", "503", "504"] {
        assert_eq!(
            before.get("gitball_proxy_requests_total", &[("code", code)]),
            Some(0.0),
            "requests_total{{code=\"{code}\"}} at start-up"
        );
    }
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(answer.status(), 502, "{}", answer.text());
    assert_eq!(
        proxy
            .scrape()
            .get("gitball_proxy_requests_total", &[("code", "502")]),
        Some(1.0)
    );
}

/// `docs/proxy.md#when-every-candidate-fails`, rule 3: `504
/// gateway_timeout` only when *every* attempt was a `header_timeout`. A
/// candidate that timed out beside one that refused the connection is rule
/// 4, `502 bad_gateway`: not every archiver was slow, one was down.
#[test]
fn a_header_timeout_beside_a_refused_connection_is_a_502_not_a_504() {
    let sandbox = Sandbox::new();
    // Accepts (the kernel completes the handshake into the backlog) and
    // never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let refused = RefusingPort::new();
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new(
            "*",
            &format!("http://{}", silent.local_addr().expect("address")),
            &[&refused.url()],
        )],
    );
    let proxy = Proxy::with_routes(&routes, &["--header-timeout", "1", "--eject-for", "60"]);
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    let metrics = proxy.scrape();
    assert_eq!(
        (
            metrics.sum(ATTEMPTS, &[("outcome", "header_timeout")]),
            metrics.sum(ATTEMPTS, &[("outcome", "connect_error")]),
        ),
        (1.0, 1.0),
        "one attempt of each"
    );
    assert_eq!(answer.status(), 502, "{}", answer.text());
    assert_eq!(answer.error_code(), "bad_gateway");
    let silent = format!("http://{}", silent.local_addr().expect("address"));
    assert_names_no_upstream(&answer, &[&silent, &refused.url()]);
}

/// Asserts that an upstream's ejection gauge, scraped just before this
/// call, reads `1`, or `0` only if `eject_for` has passed since `since`, an
/// instant no later than the failure that ejected it: on a loaded host the
/// request and the scrape can outlast a short `--eject-for`, and then the
/// ejection has rightly ended (as 508bde8 found with 3 s).
fn assert_ejected_since(gauge: Option<f64>, since: Instant, eject_for: Duration, what: &str) {
    let elapsed = since.elapsed();
    assert!(
        gauge == Some(1.0) || (gauge == Some(0.0) && elapsed >= eject_for),
        "{what}: gauge {gauge:?} {elapsed:?} after the failure, --eject-for {eject_for:?}"
    );
}

/// An upstream whose first connection is reset (ejected at once, no
/// timeout to wait) and every later one accepted, reported (its index on
/// the receiver), held open and never answered: a hung archiver.
fn hung_upstream() -> (SocketAddr, std::sync::mpsc::Receiver<usize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung = listener.local_addr().expect("address");
    let (accepted, connections) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (index, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            if index == 0 {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger");
                drop(stream);
            } else {
                held.push(stream);
            }
            if accepted.send(index).is_err() {
                return;
            }
        }
    });
    (hung, connections)
}

/// `docs/proxy.md#ejection`: when an ejection ends, one request tries the
/// archiver in its place; the others try it after the healthy candidates
/// until that request's attempt ends. An archiver that accepts connections
/// and never answers (stopped, hung) therefore holds up one request per
/// `--eject-for`. (Every request that came while the probe waited went to
/// it first, and waited `--header-timeout` there too: a SIGSTOPped replica
/// cost each of 32 clients 3 s per 4 s `--eject-for`.)
#[test]
fn a_hung_archiver_whose_ejection_ended_holds_up_one_request_not_all() {
    const HEADER_TIMEOUT_SECONDS: u64 = 5;
    const EJECT_FOR: Duration = Duration::from_secs(1);
    const FOLLOWERS: usize = 4;
    let sandbox = Sandbox::new();
    let (hung, connections) = hung_upstream();
    let healthy = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nConnection: close\r\n\
          Content-Length: 2\r\n\r\nok",
        2 + FOLLOWERS,
    );
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new(
            "*",
            &format!("http://{healthy}"),
            &[&format!("http://{hung}")],
        )],
    );
    let header_timeout = HEADER_TIMEOUT_SECONDS.to_string();
    let eject_for = EJECT_FOR.as_secs().to_string();
    let proxy = Proxy::with_routes(
        &routes,
        &[
            "--header-timeout",
            &header_timeout,
            "--eject-for",
            &eject_for,
        ],
    );
    let addr = proxy.addr;
    let path = "/acme/widget/archive/main.tar";
    let hung_url = format!("http://{hung}");
    let ejected = || {
        proxy
            .scrape()
            .get("gitball_proxy_upstream_ejected", &[("upstream", &hung_url)])
    };

    let reset = Instant::now();
    assert_eq!(fetch(addr, path).text(), "ok", "failed over at the reset");
    assert_eq!(connections.recv_timeout(SETTLE), Ok(0));
    assert_ejected_since(ejected(), reset, EJECT_FOR, "ejected by the reset");
    assert!(
        wait_until(SETTLE, || ejected() == Some(0.0)),
        "the ejection did not end"
    );

    // The first request after it tries the hung archiver, and waits.
    let probe = std::thread::spawn(move || {
        let started = Instant::now();
        (fetch(addr, path).text(), started, started.elapsed())
    });
    assert_eq!(
        connections.recv_timeout(SETTLE),
        Ok(1),
        "the first request after the ejection did not try the archiver"
    );
    // Meanwhile the others go to the healthy candidate at once.
    for follower in 0..FOLLOWERS {
        let started = Instant::now();
        assert_eq!(fetch(addr, path).text(), "ok");
        assert_eq!(
            connections.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "request {follower} after the probe also went to the hung archiver \
             (answered after {:?})",
            started.elapsed()
        );
    }
    let (text, probe_started, waited) = probe.join().expect("the probe");
    assert_eq!(text, "ok", "the probe failed over");
    let header_timeout = Duration::from_secs(HEADER_TIMEOUT_SECONDS);
    assert!(waited >= header_timeout, "the probe waited {waited:?}");
    // Its attempt timed out no sooner than --header-timeout after it began.
    assert_ejected_since(
        ejected(),
        probe_started + header_timeout,
        EJECT_FOR,
        "ejected again by the probe's timeout",
    );
    let metrics = proxy.scrape();
    assert_eq!(
        metrics.value(
            ATTEMPTS,
            &[("upstream", &hung_url), ("outcome", "header_timeout")]
        ),
        1.0,
        "one request waited for the hung archiver"
    );
}

/// `docs/proxy.md#ejection`: the probe spares the other requests only when
/// another candidate answers them. A route of one upstream has none: while
/// one request probes a hung archiver whose ejection ended, the next one
/// tries it too and waits `--header-timeout` there, then gets the `504` the
/// probe gets; it is neither held back nor refused at once.
#[test]
fn a_request_with_no_other_candidate_tries_the_upstream_another_is_probing() {
    const HEADER_TIMEOUT_SECONDS: u64 = 2;
    const EJECT_FOR: Duration = Duration::from_secs(1);
    let sandbox = Sandbox::new();
    let (hung, connections) = hung_upstream();
    let routes = sandbox.path("routes.toml");
    let hung_url = format!("http://{hung}");
    write_routes(&routes, &[Route::new("*", &hung_url, &[])]);
    let header_timeout = HEADER_TIMEOUT_SECONDS.to_string();
    let eject_for = EJECT_FOR.as_secs().to_string();
    let proxy = Proxy::with_routes(
        &routes,
        &[
            "--header-timeout",
            &header_timeout,
            "--eject-for",
            &eject_for,
        ],
    );
    let addr = proxy.addr;
    let path = "/acme/widget/archive/main.tar";
    let ejected = || {
        proxy
            .scrape()
            .get("gitball_proxy_upstream_ejected", &[("upstream", &hung_url)])
    };

    let reset = Instant::now();
    assert_eq!(fetch(addr, path).status(), 502, "the reset");
    assert_eq!(connections.recv_timeout(SETTLE), Ok(0));
    assert_ejected_since(ejected(), reset, EJECT_FOR, "ejected by the reset");
    assert!(
        wait_until(SETTLE, || ejected() == Some(0.0)),
        "the ejection did not end"
    );
    let timed = move || {
        let started = Instant::now();
        (fetch(addr, path).status(), started, started.elapsed())
    };
    let probe = std::thread::spawn(timed);
    assert_eq!(
        connections.recv_timeout(SETTLE),
        Ok(1),
        "the first request after the ejection did not try the archiver"
    );
    let other = std::thread::spawn(timed);
    assert_eq!(
        connections.recv_timeout(SETTLE),
        Ok(2),
        "a request with no other candidate did not try the upstream being probed"
    );
    let header_timeout = Duration::from_secs(HEADER_TIMEOUT_SECONDS);
    let mut first_started = None;
    for (who, waiter) in [("the probe", probe), ("the other request", other)] {
        let (status, started, waited) = waiter.join().expect(who);
        assert_eq!(status, 504, "{who}");
        assert!(waited >= header_timeout, "{who} waited {waited:?}");
        first_started.get_or_insert(started);
    }
    assert_eq!(
        proxy.scrape().value(
            ATTEMPTS,
            &[("upstream", &hung_url), ("outcome", "header_timeout")]
        ),
        2.0,
        "both requests waited for the hung archiver"
    );
    // Neither attempt timed out sooner than --header-timeout after the
    // probe, the first, began.
    assert_ejected_since(
        ejected(),
        first_started.expect("the probe") + header_timeout,
        EJECT_FOR,
        "ejected again by the timeouts",
    );
}

/// `docs/proxy.md#ejection`: any answer ends an ejection at once, except a
/// busy `503` and a `500`, which say the archiver is up but not that this
/// request went well there.
#[test]
fn a_busy_answer_or_a_failed_archive_does_not_end_an_ejection() {
    let sandbox = Sandbox::new();
    let (upstream, _) = sequenced_upstream(vec![
        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n\
          Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ]);
    let proxy = proxy_before(upstream, &sandbox);
    let ejected = || {
        proxy.scrape().get(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &format!("http://{upstream}"))],
        )
    };
    let path = "/acme/widget/archive/main.tar";
    for (status, still_ejected) in [(502, 1.0), (503, 1.0), (500, 1.0), (404, 0.0)] {
        assert_eq!(fetch(proxy.addr, path).status(), status);
        assert_eq!(ejected(), Some(still_ejected), "after the {status}");
    }
}

/// `docs/proxy.md#ejection`: a replica's `404` is an answer, and ends its
/// ejection at once like any other (it is no failure, and the replica is
/// up), though the request goes on to the next candidate. Here the ejected
/// replica is reached after the primary answered busy.
#[test]
fn a_replicas_404_ends_its_ejection() {
    let sandbox = Sandbox::new();
    let (primary, _) = sequenced_upstream(vec![
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n\
          Content-Length: 0\r\n\r\n",
    ]);
    let (replica, _) = sequenced_upstream(vec![
        b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    ]);
    let routes = sandbox.path("routes.toml");
    let replica_url = format!("http://{replica}");
    write_routes(
        &routes,
        &[Route::new(
            "*",
            &format!("http://{primary}"),
            &[&replica_url],
        )],
    );
    let proxy = Proxy::with_routes(&routes, &["--eject-for", "60"]);
    let ejected = || {
        proxy.scrape().get(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &replica_url)],
        )
    };
    let path = "/acme/widget/archive/main.tar";
    // The replica goes first and fails; the primary answers.
    assert_eq!(fetch(proxy.addr, path).status(), 404);
    assert_eq!(ejected(), Some(1.0), "after the replica's 502");
    // Ejected, the replica goes after the primary, which is busy.
    assert_eq!(fetch(proxy.addr, path).status(), 503);
    let metrics = proxy.scrape();
    assert_eq!(
        metrics.sum(ATTEMPTS, &[("outcome", "replica_not_found")]),
        1.0,
        "the ejected replica was asked"
    );
    assert_eq!(
        ejected(),
        Some(0.0),
        "a replica's 404 did not end its ejection"
    );
}

/// A body ended by the upstream closing its connection, or a growing one
/// for a client that needs a length (HTTP/1.0: the proxy asks with
/// `X-Gitball-Want-Length`), could be a cut: never passed on as an answer.
#[test]
fn an_upstream_body_whose_end_cannot_be_told_from_a_cut_is_a_bad_gateway() {
    let sandbox = Sandbox::new();
    let close_delimited = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nConnection: close\r\n\r\nan archive's first bytes, then a close",
        1,
    );
    let proxy = proxy_before(close_delimited, &sandbox);
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(answer.status(), 502, "{}", answer.text());
    assert_eq!(proxy.scrape().sum(ATTEMPTS, &[("outcome", "error")]), 1.0);

    let chunked = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nbytes\r\n0\r\n\r\n",
        1,
    );
    let proxy = proxy_before(chunked, &sandbox);
    let mut connection = RawConnection::connect(proxy.addr).expect("connect");
    connection
        .send(b"GET /acme/widget/archive/main.tar HTTP/1.0\r\n\r\n")
        .expect("send");
    let head = connection.read_head().expect("head");
    assert_eq!(
        head.status, 502,
        "an HTTP/1.0 client got a body without a length"
    );
}

/// Framing the proxy cannot pass on as the archiver would have framed it
/// is a bad gateway (attack: misbehaving upstreams). A transfer coding
/// other than `chunked` alone makes a body close-delimited (RFC 9112,
/// section 6.3) whatever its `Content-Length`, and had been passed on with
/// a clean end after a cut; a coded body would reach the client still
/// coded; a `Content-Length` list got the client an empty reply; a length
/// past the largest file (2^63 - 1 bytes) is no archive's, and had been
/// passed on, the download then waiting for bytes that never come; and a
/// status past 599 is no HTTP status.
#[test]
fn an_upstream_framing_other_than_one_length_or_chunked_alone_is_a_bad_gateway() {
    let sandbox = Sandbox::new();
    let cases: [(&str, &'static [u8]); 8] = [
        (
            // No coding is not `chunked` last either: read to the close,
            // the cut was a clean end of a chunked 200 to the client.
            "an empty Transfer-Encoding beside a length, cut",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: \r\n\
              Content-Length: 5\r\n\r\nby",
        ),
        (
            "identity beside a length, cut",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: identity\r\n\
              Content-Length: 200\r\n\r\nonly the first bytes",
        ),
        (
            "gzip beside a length",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: gzip\r\n\
              Content-Length: 5\r\n\r\nbytes",
        ),
        (
            "gzip, then chunked",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              5\r\nbytes\r\n0\r\n\r\n",
        ),
        (
            "chunked, then identity on a second line",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nTransfer-Encoding: chunked\r\n\
              Transfer-Encoding: identity\r\n\r\n5\r\nbytes\r\n0\r\n\r\n",
        ),
        (
            "a list of two lengths",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5, 6\r\n\r\nbytes",
        ),
        (
            "a length past the largest file",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\n\
              Content-Length: 18446744073709551615\r\n\r\nbytes",
        ),
        (
            "status 600",
            b"HTTP/1.1 600 Odd\r\nContent-Length: 5\r\n\r\nbytes",
        ),
    ];
    for (case, answer) in cases {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
        assert_eq!(answer.status(), 502, "{case}: {}", answer.text());
        assert_eq!(answer.end, BodyEnd::Complete, "{case}");
        assert_eq!(
            proxy.scrape().sum(ATTEMPTS, &[("outcome", "error")]),
            1.0,
            "{case}"
        );
    }
    // A `HEAD`'s length is passed on as well: a list of two is refused
    // there too.
    let lengths: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5, 6\r\n\r\n";
    let proxy = proxy_before(scripted_upstream(lengths, 1), &sandbox);
    let answer = fetch_with(proxy.addr, "HEAD", "/acme/widget/archive/main.tar", &[]);
    assert_eq!(answer.status(), 502, "HEAD with a list of lengths");
}

/// A `Content-Length` list of one number repeated (RFC 9112, section 6.3)
/// is that number, on the pooled path as on a splice's range request
/// (`splice::tests::a_splices_answer_is_read_as_the_pooled_exchange_reads_it`),
/// and the client gets it once: `docs/internal-api.md#response-headers`.
/// (Review: the splice took `900, 900` as 900; the pooled path answered
/// `502`, counted an upstream failure, and so ejected the archiver.)
#[test]
fn an_upstream_length_listed_twice_is_that_length() {
    let sandbox = Sandbox::new();
    let answers: [(&str, &str, &'static [u8]); 3] = [
        (
            "in one field",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5, 5\r\n\r\nbytes",
        ),
        (
            "in two fields",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nbytes",
        ),
        (
            "on a HEAD",
            "HEAD",
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5, 5\r\n\r\n",
        ),
    ];
    for (case, method, answer) in answers {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let fetched = fetch_with(proxy.addr, method, "/acme/widget/archive/main.tar", &[]);
        assert_eq!(fetched.status(), 200, "{case}: {}", fetched.text());
        assert_eq!(fetched.end, BodyEnd::Complete, "{case}");
        let lengths: Vec<&str> = fetched
            .head
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(lengths, ["5"], "{case}");
        if method == "GET" {
            assert_eq!(fetched.text(), "bytes", "{case}");
        }
        assert_eq!(
            proxy.scrape().sum(ATTEMPTS, &[("outcome", "error")]),
            0.0,
            "{case}"
        );
    }
}

/// Hostile spellings of a head's framing and hop-by-hop names, sent by a
/// raw upstream through the real proxy: the client gets the body as the
/// upstream framed it, with one length or none beside a coding, or a
/// `502`; never the bytes past the body, nor a name the head's own
/// `Connection` named (`docs/internal-api.md#response-headers`).
#[test]
fn hostile_framing_spellings_reach_the_client_as_framed_or_not_at_all() {
    let sandbox = Sandbox::new();
    /// The case, the method, the upstream's answer, and what the client
    /// gets: status, body, `Content-Length`s.
    type Case = (
        &'static str,
        &'static str,
        &'static [u8],
        u16,
        &'static str,
        &'static [&'static str],
    );
    let cases: [Case; 11] = [
        (
            "a length list beside chunked",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5, 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            200,
            "abc",
            &[],
        ),
        (
            "chunked in capitals beside a length",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nTRANSFER-ENCODING: chunked\r\n\
              Content-Length: 5\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            200,
            "abc",
            &[],
        ),
        (
            "a leading zero in a list",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 05, 5\r\n\r\nbytes",
            200,
            "bytes",
            &["5"],
        ),
        (
            "an empty element",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5,,5\r\n\r\nbytes",
            502,
            "",
            &[],
        ),
        (
            "a plus sign in a list",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5, +5\r\n\r\nbytes",
            502,
            "",
            &[],
        ),
        (
            "a space before the colon",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nTransfer-Encoding : chunked\r\n\
              Content-Length: 5\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            502,
            "",
            &[],
        ),
        (
            "an obs-fold hiding a coding",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nX-Gitball-Cache: hit\r\n \
              Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            502,
            "",
            &[],
        ),
        (
            "a list on a 304",
            "GET",
            b"HTTP/1.1 304 Not Modified\r\nETag: \"e-tar\"\r\nContent-Length: 5, 5\r\n\r\n",
            304,
            "",
            &["5"],
        ),
        (
            "a list beside chunked on a HEAD",
            "HEAD",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5, 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
            200,
            "",
            &[],
        ),
        (
            "two lists on a HEAD, one of two numbers",
            "HEAD",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5, 5\r\n\
              Content-Length: 5, 6\r\n\r\n",
            502,
            "",
            &[],
        ),
        (
            "Connection in capitals naming ETag",
            "GET",
            b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nCONNECTION: etag\r\n\
              Content-Length: 5, 5\r\n\r\nbytes",
            200,
            "bytes",
            &["5"],
        ),
    ];
    for (case, method, answer, status, body, lengths) in cases {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let fetched = fetch_with(proxy.addr, method, "/acme/widget/archive/main.tar", &[]);
        assert_eq!(fetched.status(), status, "{case}: {}", fetched.text());
        if status == 502 {
            continue;
        }
        assert_eq!(fetched.end, BodyEnd::Complete, "{case}");
        assert_eq!(fetched.text(), body, "{case}");
        let passed: Vec<(&str, &str)> = fetched
            .head
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let got: Vec<&str> = passed
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .map(|(_, value)| *value)
            .collect();
        assert_eq!(got, lengths, "{case}: {passed:?}");
        if case.contains("naming ETag") {
            assert!(
                !passed
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case("etag")),
                "{case}: {passed:?}"
            );
        }
    }
    // Bytes past a listed length are another response to no one: the
    // connection is not kept, and the next request gets its own answer.
    let (upstream, _heads) = sequenced_upstream(vec![
        b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5, 5\r\n\r\nbytes\
          HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nETag: \"e-tar\"\r\nContent-Length: 5\r\n\r\nother",
    ]);
    let proxy = proxy_before(upstream, &sandbox);
    let first = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!((first.status(), first.text()), (200, "bytes".to_owned()));
    let second = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!((second.status(), second.text()), (200, "other".to_owned()));
}

/// `docs/internal-api.md#response-headers`: an upstream's headers reach the
/// client only through the allowlist, on a download's `200` and on a `5xx`
/// passed through when every candidate failed. A hostile or misconfigured
/// archiver (or an intermediary in front of it) cannot set a cookie, a
/// redirect, credentials prompts, HSTS or CORS on the service's origin, nor
/// a `Date`, `Server` or `X-Request-Id` beside the proxy's own (attack:
/// misbehaving upstreams; the unit test held `is_passed_through` alone,
/// and dropping its use in the proxy's answer failed no end-to-end test).
#[test]
fn only_allowlisted_upstream_headers_reach_the_client() {
    let sandbox = Sandbox::new();
    let stray: &[&str] = &[
        "set-cookie",
        "www-authenticate",
        "proxy-authenticate",
        "location",
        "refresh",
        "server",
        "strict-transport-security",
        "access-control-allow-origin",
        "content-security-policy",
        "alt-svc",
        "vary",
        "content-encoding",
        "keep-alive",
        "x-powered-by",
    ];
    let answers: [(u16, &'static [u8]); 2] = [
        (
            200,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nContent-Length: 5\r\n\
              Content-Disposition: attachment; filename=\"widget-main.tar\"\r\n\
              ETag: \"c0ffee-tar\"\r\nLast-Modified: Mon, 01 Jan 2001 00:00:00 GMT\r\n\
              Accept-Ranges: bytes\r\nRepr-Digest: sha-256=:AAAA:\r\nLink: </x>; rel=\"describedby\"\r\n\
              Cache-Control: public, max-age=60\r\nX-Gitball-Commit: 0123\r\n\
              Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nX-Request-Id: the-upstreams-id\r\n\
              Set-Cookie: session=stolen; Path=/\r\nWWW-Authenticate: Basic realm=\"x\"\r\n\
              Proxy-Authenticate: Basic realm=\"x\"\r\nLocation: http://evil.example/\r\n\
              Refresh: 0; url=http://evil.example/\r\nServer: evil/1.0\r\n\
              Strict-Transport-Security: max-age=0\r\nAccess-Control-Allow-Origin: *\r\n\
              Content-Security-Policy: default-src *\r\nAlt-Svc: h2=\"evil.example:443\"\r\n\
              Vary: Cookie\r\nContent-Encoding: identity\r\nKeep-Alive: timeout=600\r\n\
              X-Powered-By: evil\r\n\r\nbytes",
        ),
        (
            503,
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Type: application/json\r\n\
              Content-Length: 16\r\nCache-Control: no-store\r\nX-Gitball-Commit: 0123\r\n\
              Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nX-Request-Id: the-upstreams-id\r\n\
              Set-Cookie: session=stolen; Path=/\r\nWWW-Authenticate: Basic realm=\"x\"\r\n\
              Proxy-Authenticate: Basic realm=\"x\"\r\nLocation: http://evil.example/\r\n\
              Refresh: 0; url=http://evil.example/\r\nServer: evil/1.0\r\n\
              Strict-Transport-Security: max-age=0\r\nAccess-Control-Allow-Origin: *\r\n\
              Content-Security-Policy: default-src *\r\nAlt-Svc: h2=\"evil.example:443\"\r\n\
              Vary: Cookie\r\nContent-Encoding: identity\r\nKeep-Alive: timeout=600\r\n\
              X-Powered-By: evil\r\n\r\n{\"error\":\"busy\"}",
        ),
    ];
    for (status, answer) in answers {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let fetched = fetch(proxy.addr, "/acme/widget/archive/main.tar");
        assert_eq!(fetched.status(), status, "{}", fetched.text());
        assert_eq!(fetched.end, BodyEnd::Complete);
        for name in stray {
            assert_eq!(fetched.header(name), "", "{status}: {name} passed on");
        }
        for name in ["date", "x-request-id"] {
            let values: Vec<&str> = fetched
                .head
                .headers
                .iter()
                .filter(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(values.len(), 1, "{status}: {name}: {values:?}");
            assert!(
                !values[0].contains("2001") && values[0] != "the-upstreams-id",
                "{status}: the upstream's {name} passed on: {values:?}"
            );
        }
        // The allowlist itself passes.
        assert_eq!(fetched.header("x-gitball-commit"), "0123", "{status}");
        if status == 200 {
            assert_eq!(fetched.text(), "bytes");
            for (name, value) in [
                ("content-type", "application/x-tar"),
                ("content-length", "5"),
                (
                    "content-disposition",
                    "attachment; filename=\"widget-main.tar\"",
                ),
                ("etag", "\"c0ffee-tar\""),
                ("last-modified", "Mon, 01 Jan 2001 00:00:00 GMT"),
                ("accept-ranges", "bytes"),
                ("repr-digest", "sha-256=:AAAA:"),
                ("link", "</x>; rel=\"describedby\""),
                ("cache-control", "public, max-age=60"),
            ] {
                assert_eq!(fetched.header(name), value, "{name}");
            }
        } else {
            assert_eq!(fetched.header("retry-after"), "5");
            assert_eq!(fetched.error_code(), "busy", "the last 5xx's own body");
        }
    }
}

/// The client gets one `X-Request-Id`, the proxy's, whatever the archiver
/// echoes: the echo is passed on as it is only when it is that one value
/// and not hop-by-hop; twice, or named in `Connection`, it is replaced.
#[test]
fn the_client_gets_one_request_id_whatever_the_archiver_echoes() {
    let sandbox = Sandbox::new();
    let answers: [&'static [u8]; 3] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: chosen-id\r\n\r\nbytes",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: chosen-id\r\n\
          X-Request-Id: chosen-id\r\n\r\nbytes",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: X-Request-Id\r\n\
          X-Request-Id: chosen-id\r\n\r\nbytes",
    ];
    for answer in answers {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let fetched = fetch_with(
            proxy.addr,
            "GET",
            "/acme/widget/archive/main.tar",
            &[("X-Request-Id", "chosen-id")],
        );
        assert_eq!(fetched.status(), 200, "{}", fetched.text());
        assert_eq!(fetched.text(), "bytes");
        let ids: Vec<&str> = fetched
            .head
            .headers
            .iter()
            .filter(|(key, _)| key == "x-request-id")
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(
            ids,
            ["chosen-id"],
            "after {:?}",
            String::from_utf8_lossy(answer)
        );
    }
}

/// What is not passed on is taken out of the archiver's head in the head's
/// order, whatever it is (hop-by-hop names, an id that is not the one sent,
/// a custom name): the client's head is the same, line for line, as each
/// removal moves the head's last line into the removed one's place.
#[test]
fn the_client_gets_the_passed_lines_in_the_order_the_removals_leave() {
    let sandbox = Sandbox::new();
    let answer: &'static [u8] = b"HTTP/1.1 200 OK\r\nX-Request-Id: other-id\r\n\
        Server: a\r\nETag: \"e-tar\"\r\nKeep-Alive: timeout=5\r\n\
        Content-Type: application/x-tar\r\nX-Other: 1\r\nX-Gitball-Cache: hit\r\n\
        Via: 1.1 x\r\nX-Other: 2\r\nAccept-Ranges: bytes\r\nContent-Length: 5\r\n\r\nbytes";
    let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
    let fetched = fetch_with(
        proxy.addr,
        "GET",
        "/acme/widget/archive/main.tar",
        &[("X-Request-Id", "chosen-id")],
    );
    assert_eq!(fetched.status(), 200, "{}", fetched.text());
    assert_eq!(fetched.text(), "bytes");
    let lines: Vec<String> = fetched
        .head
        .headers
        .iter()
        .filter(|(key, _)| key != "date")
        .map(|(key, value)| format!("{key}: {value}"))
        .collect();
    assert_eq!(
        lines,
        [
            "content-length: 5",
            "accept-ranges: bytes",
            "etag: \"e-tar\"",
            "x-gitball-cache: hit",
            "content-type: application/x-tar",
            "x-request-id: chosen-id",
            "connection: close",
        ]
    );
}

/// `docs/proxy.md#the-pipe`, upstream abort: an upstream that sends a
/// head and some of the body, then nothing while keeping its connection
/// open (a hung archiver, whose kernel still acknowledges), aborts the
/// client's download after `--header-timeout` of silence, never a hang
/// nor a clean end, and is ejected and counted as an upstream abort
/// (attack: misbehaving upstreams; only a unit test of the silence
/// wrapper held this, not its use on a proxied body: without it, the
/// download hung for as long as the upstream did).
#[test]
fn an_upstream_silent_midway_aborts_the_download_after_the_header_timeout() {
    use std::io::Write;
    let sandbox = Sandbox::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = listener.local_addr().expect("address");
    let (release, released) = std::sync::mpsc::channel::<()>();
    let hung = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
        gitball_e2e::read_request_head(&mut stream);
        let mut answer =
            b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        answer.extend_from_slice(&[b'x'; 1000]);
        stream.write_all(&answer).expect("write");
        // Silent, the connection open, until the test is over.
        let _ = released.recv_timeout(Duration::from_secs(60));
    });
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new("*", &format!("http://{upstream}"), &[])],
    );
    let proxy = Proxy::with_routes(&routes, &["--header-timeout", "1", "--eject-for", "60"]);
    let mut connection = RawConnection::connect(proxy.addr).expect("connect");
    connection
        .stream()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    connection
        .send_request("GET", "/acme/widget/archive/main.tar", &[])
        .expect("send");
    let head = connection.read_head().expect("head");
    assert_eq!(head.status, 200);
    let started = Instant::now();
    let mut received = 0;
    let end = connection.read_body_to_end(|piece| received += piece.len());
    let waited = started.elapsed();
    assert!(
        matches!(&end, BodyEnd::Aborted(_)),
        "{end:?} after {waited:?}"
    );
    assert_eq!(
        received, 1000,
        "the bytes the upstream sent, then the abort"
    );
    assert!(
        waited < Duration::from_secs(10),
        "aborted after one --header-timeout of silence, not {waited:?}"
    );
    let upstream_url = format!("http://{upstream}");
    assert!(
        wait_until(SETTLE, || proxy.scrape().get(
            "gitball_proxy_upstream_aborts_total",
            &[("upstream", &upstream_url)]
        ) == Some(1.0)),
        "counted as an upstream abort"
    );
    assert_eq!(
        proxy.scrape().get(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &upstream_url)]
        ),
        Some(1.0),
        "a silent upstream is ejected"
    );
    let _ = release.send(());
    hung.join().expect("the hung upstream's thread");
}

/// docs/internal-api.md, "Connections": a fault in a chunked upstream body
/// that the proxy can tell as it comes (a chunk of 2^64 - 1 bytes, past
/// the largest file and so no archive's; a trailer that is no header
/// field) aborts the client's download at once, while the upstream holds
/// its connection open and silent: not after `--header-timeout` of
/// silence, nor with a clean end. (The chunk was taken, and the download
/// waited for its bytes until the silence bound; the trailers were taken
/// unchecked, and the download ended cleanly.)
#[test]
fn a_fault_in_a_chunked_upstream_body_aborts_the_download_at_once() {
    use std::io::Write;
    let cases: [(&str, &'static [u8]); 3] = [
        (
            "a chunk of 2^64 - 1 bytes",
            b"ffffffffffffffff\r\nnever all of it",
        ),
        ("a NUL in a trailer", b"0\r\nX-Trailer: a\0b\r\n\r\n"),
        (
            "a trailer line that is no header field",
            b"0\r\nno colon here\r\n\r\n",
        ),
    ];
    for (case, fault) in cases {
        let sandbox = Sandbox::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = listener.local_addr().expect("address");
        let (release, released) = std::sync::mpsc::channel::<()>();
        let held = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
            gitball_e2e::read_request_head(&mut stream);
            let mut answer = b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\n\
                Transfer-Encoding: chunked\r\n\r\n5\r\nbytes\r\n"
                .to_vec();
            answer.extend_from_slice(fault);
            stream.write_all(&answer).expect("write");
            // Silent, the connection open, until the test is over.
            let _ = released.recv_timeout(Duration::from_secs(60));
        });
        let routes = sandbox.path("routes.toml");
        write_routes(
            &routes,
            &[Route::new("*", &format!("http://{upstream}"), &[])],
        );
        let proxy = Proxy::with_routes(&routes, &["--header-timeout", "30"]);
        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        connection
            .stream()
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("read timeout");
        connection
            .send_request("GET", "/acme/widget/archive/main.tar", &[])
            .expect("send");
        let started = Instant::now();
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 200, "{case}");
        let mut received = Vec::new();
        let end = connection.read_body_to_end(|piece| received.extend_from_slice(piece));
        let waited = started.elapsed();
        assert!(
            matches!(&end, BodyEnd::Aborted(_)),
            "{case}: {end:?} after {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{case}: aborted after {waited:?}, not at once"
        );
        assert_eq!(
            received, b"bytes",
            "{case}: the sound chunk, then the abort"
        );
        assert_eq!(
            proxy.scrape().sum(
                "gitball_proxy_upstream_aborts_total",
                &[("upstream", &format!("http://{upstream}"))]
            ),
            1.0,
            "{case}: counted as an upstream abort"
        );
        let _ = release.send(());
        held.join().expect("the upstream thread");
    }
}

/// `docs/proxy.md#parking`: the proxy never joins bytes of two ETags. An
/// upstream that answers a parked download's range request with exactly
/// the range asked for, but under another ETag (the archive changed under
/// it: another ref target, another compression level, a hostile
/// archiver), gets the download aborted, never continued with its bytes
/// (attack: misbehaving upstreams; the check was held by a unit test of
/// `Resume::skip` alone).
#[test]
fn a_resume_answered_under_another_etag_aborts_the_download() {
    use std::io::Write;
    const LENGTH: u64 = 64 * MIB as u64;
    fn head_of(stream: &mut std::net::TcpStream) -> String {
        stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
        let head = gitball_e2e::read_request_head(stream);
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    }
    /// Writes `fill` bytes until `count` are written or the proxy closes.
    fn body(stream: &mut std::net::TcpStream, fill: u8, mut count: u64) {
        let piece = [fill; 64 * 1024];
        while count > 0 {
            let now = count.min(piece.len() as u64) as usize;
            if stream.write_all(&piece[..now]).is_err() {
                return;
            }
            count -= now as u64;
        }
    }
    let sandbox = Sandbox::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = listener.local_addr().expect("address");
    let (heads, asked) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let (mut first, _) = listener.accept().expect("accept the download");
        let _ = head_of(&mut first);
        let head =
            format!("HTTP/1.1 200 OK\r\nETag: \"first-tar\"\r\nContent-Length: {LENGTH}\r\n\r\n");
        if first.write_all(head.as_bytes()).is_ok() {
            body(&mut first, b'a', LENGTH);
        }
        // Parked: the proxy closed the first connection, then asks again.
        let Ok((mut again, _)) = listener.accept() else {
            return;
        };
        let resume = head_of(&mut again);
        let range = resume
            .lines()
            .find_map(|line| line.strip_prefix("range: bytes="))
            .and_then(|range| range.trim().split_once('-'))
            .and_then(|(from, to)| Some((from.parse::<u64>().ok()?, to.parse::<u64>().ok()?)));
        let _ = heads.send(resume.clone());
        let Some((from, to)) = range else { return };
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nETag: \"other-tar\"\r\n\
             Content-Range: bytes {from}-{to}/{LENGTH}\r\nContent-Length: {}\r\n\r\n",
            to + 1 - from
        );
        if again.write_all(head.as_bytes()).is_ok() {
            body(&mut again, b'b', to + 1 - from);
        }
    });
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new("*", &format!("http://{upstream}"), &[])],
    );
    let proxy = Proxy::with_routes(&routes, &["--park-after", PARK_AFTER]);
    let (mut connection, head, _, mut received) =
        stall_until_the_proxy_parks(&proxy, "/acme/widget/archive/main.tar");
    assert_eq!(head.header("etag"), Some("\"first-tar\""));
    let mut others = 0u64;
    let end = connection.read_body_to_end(|piece| {
        received += piece.len() as u64;
        others += piece.iter().filter(|&&byte| byte != b'a').count() as u64;
    });
    let resume = asked
        .recv_timeout(SETTLE)
        .expect("the parked download was resumed");
    assert!(
        resume.contains("if-range: \"first-tar\""),
        "the resume names the download's ETag: {resume}"
    );
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "{end:?} after {received} bytes"
    );
    assert_eq!(others, 0, "bytes of another ETag reached the client");
    assert!(received < LENGTH);
    assert_eq!(
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        1.0
    );
}

/// A `101 Switching Protocols` is no answer to an archive request (the
/// proxy never asks to upgrade, and an archiver never answers so): a failed
/// attempt, outcome `error`, like a status past 599, never passed on
/// (attack: misbehaving upstreams). It had been relayed as the final
/// answer, which a `HEAD` (no length needed) or a `GET` with a length got:
/// the client's connection switched to nothing and closed, a request
/// pipelined behind it never answered, and the proxy logged a complete
/// `101` from a healthy upstream.
#[test]
fn an_upstream_switching_protocols_is_a_bad_gateway() {
    let sandbox = Sandbox::new();
    let cases: [(&str, &str, &'static [u8]); 2] = [
        (
            "HEAD",
            "a 101 without a length",
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        ),
        (
            "GET",
            "a 101 with a length",
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\
              Content-Length: 5\r\n\r\nbytes",
        ),
    ];
    for (method, case, answer) in cases {
        let proxy = proxy_before(scripted_upstream(answer, 1), &sandbox);
        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        connection
            .send_request(method, "/acme/widget/archive/main.tar", &[])
            .expect("send");
        // Pipelined behind it: answered only if the connection was not
        // handed over to another protocol.
        connection
            .send(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .expect("send");
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 502, "{method}, {case}: {head:?}");
        assert_eq!(
            connection.read_body_to_end(|_| {}),
            BodyEnd::Complete,
            "{method}, {case}"
        );
        let next = connection
            .read_head()
            .expect("the pipelined request's head");
        assert_eq!(
            next.status, 200,
            "{method}, {case}: the connection serves on"
        );
        assert_eq!(
            proxy.scrape().sum(ATTEMPTS, &[("outcome", "error")]),
            1.0,
            "{method}, {case}"
        );
    }
}

/// Headers the upstream names in `Connection` are hop-by-hop (RFC 9110,
/// section 7.6.1): never passed on, even one the proxy would pass
/// otherwise (attack: misbehaving upstreams).
#[test]
fn headers_an_upstream_names_in_connection_are_not_passed_on() {
    let sandbox = Sandbox::new();
    let upstream = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nConnection: X-Gitball-Cache, close\r\n\
          X-Gitball-Cache: hit\r\nX-Gitball-Commit: 0123\r\nContent-Length: 5\r\n\r\nbytes",
        1,
    );
    let proxy = proxy_before(upstream, &sandbox);
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text(), "bytes");
    assert_eq!(answer.header("x-gitball-cache"), "");
    assert_eq!(answer.header("x-gitball-commit"), "0123");
    assert_eq!(answer.header("etag"), "\"c0ffee-tar\"");

    // Except the length, which frames the body (review: dropped, the client
    // got a chunked answer a splice would write raw bytes into).
    let upstream = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nConnection: Content-Length\r\n\
          Content-Length: 5\r\n\r\nbytes",
        1,
    );
    let proxy = proxy_before(upstream, &sandbox);
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.header("content-length"), "5");
    assert_eq!(answer.header("transfer-encoding"), "");
    assert_eq!(answer.text(), "bytes");
}

/// A `Content-Length` beside chunked framing does not frame the body (RFC
/// 9112, section 6.3): the client gets the body as the upstream framed it,
/// never cut (or overrun) at the stray length.
#[test]
fn a_content_length_beside_chunked_framing_is_not_passed_on() {
    let sandbox = Sandbox::new();
    let upstream = scripted_upstream(
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          8\r\nall the \r\n6\r\nbytes.\r\n0\r\n\r\n",
        1,
    );
    let proxy = proxy_before(upstream, &sandbox);
    let answer = fetch(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.header("content-length"), "");
    assert_eq!(answer.end, BodyEnd::Complete);
    assert_eq!(answer.text(), "all the bytes.");
}

// ---------------------------------------------------------------------------
// Spliced downloads: a fast client's rest moved socket to socket

/// `gitball_proxy_splices_total{outcome="spliced"}`.
fn spliced(proxy: &Proxy) -> f64 {
    proxy
        .scrape()
        .value("gitball_proxy_splices_total", &[("outcome", "spliced")])
}

/// Opens a download of [`BIG_PATH`] through `proxy` and takes its first
/// 8 MiB as fast as it can, so the proxy judges it fast and splices the
/// rest (docs/proxy.md, "Spliced downloads"). The judgement is a rate
/// (4 MiB within 40 ms): a client slowed by a loaded machine is piped
/// instead, and tries again (bounded in count and time). Returns the
/// connection, the head and a hasher over the bytes taken.
fn spliced_download(proxy: &Proxy) -> (RawConnection, ResponseHead, Sha256, u64) {
    spliced_download_counting(proxy).0
}

/// [`spliced_download`], and how many downloads it left (a client not
/// judged fast): each is a disconnect and a `client_gone` line.
fn spliced_download_counting(proxy: &Proxy) -> ((RawConnection, ResponseHead, Sha256, u64), u32) {
    spliced_download_sending(proxy, b"")
}

/// [`spliced_download_counting`], with `after` sent right after the
/// request.
fn spliced_download_sending(
    proxy: &Proxy,
    after: &[u8],
) -> ((RawConnection, ResponseHead, Sha256, u64), u32) {
    const ATTEMPTS: u32 = 30;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    while attempt < ATTEMPTS && Instant::now() < deadline {
        attempt += 1;
        let before = spliced(proxy);
        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        connection.send_request("GET", BIG_PATH, &[]).expect("send");
        connection
            .send(after)
            .expect("send what follows the request");
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 200);
        let first = connection.read_body_bytes(8 * MIB).expect("first 8 MiB");
        assert_eq!(first.len(), 8 * MIB);
        // The pipe stops at 4 MiB until the splice is set up or declined,
        // so with 8 MiB taken it was one or the other.
        if spliced(proxy) > before {
            let mut hasher = Sha256::new();
            hasher.update(&first);
            return ((connection, head, hasher, first.len() as u64), attempt - 1);
        }
        println!("attempt {attempt}: the client was not judged fast; again");
    }
    panic!("no download was spliced in {attempt} attempts");
}

/// The proxy's log lines for `BIG_PATH` that ended `ending`.
fn big_log_lines(proxy: &Proxy, ending: &str) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter(|line| {
            line.contains(&format!("\"path\":\"{BIG_PATH}\""))
                && line.contains(&format!("\"ending\":\"{ending}\""))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_fast_download_is_spliced_with_the_archives_bytes_and_keeps_its_connection() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &[]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;

    let (mut connection, head, hasher, received) = spliced_download(proxy);
    let digest = head
        .header("repr-digest")
        .expect("a hit has a digest")
        .to_owned();
    read_rest_and_check(&mut connection, hasher, received, &digest, big, "spliced");

    // The connection goes on: a range, read as fast (spliced too, or not:
    // the same bytes either way), compared with the archiver's own answer.
    let range = [("Range", "bytes=1000-99999999")];
    let direct = {
        let mut direct = RawConnection::connect(cluster.primary.addr).expect("connect");
        direct.send_request("GET", BIG_PATH, &range).expect("send");
        assert_eq!(direct.read_head().expect("head").status, 206);
        let mut hasher = Sha256::new();
        assert_eq!(
            direct.read_body_to_end(|piece| hasher.update(piece)),
            BodyEnd::Complete
        );
        hasher.finalize()
    };
    connection
        .send_request("GET", BIG_PATH, &range)
        .expect("send");
    assert_eq!(connection.read_head().expect("head").status, 206);
    let mut hasher = Sha256::new();
    assert_eq!(
        connection.read_body_to_end(|piece| hasher.update(piece)),
        BodyEnd::Complete
    );
    assert_eq!(hasher.finalize(), direct, "the range's bytes");

    // Two requests in one write: the second waits in the proxy's read
    // buffer while the first is spliced, and is answered after it.
    let host = format!("Host: {}\r\n", proxy.addr);
    let pipelined =
        format!("GET {BIG_PATH} HTTP/1.1\r\n{host}\r\nGET /healthz HTTP/1.1\r\n{host}\r\n");
    connection.send(pipelined.as_bytes()).expect("send");
    assert_eq!(connection.read_head().expect("head").status, 200);
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        length += piece.len() as u64;
    });
    assert_eq!(end, BodyEnd::Complete);
    assert_eq!(length, big.full_length);
    assert_eq!(digest, format!("sha-256=:{}:", base64(&hasher.finalize())));
    assert_eq!(
        connection.read_head().expect("the pipelined head").status,
        200
    );

    let metrics = proxy.scrape();
    assert_eq!(
        metrics.value("gitball_proxy_splices_total", &[("outcome", "declined")]),
        0.0
    );
    assert_eq!(metrics.value("gitball_proxy_active_downloads", &[]), 0.0);
    assert_eq!(metrics.sum("gitball_proxy_upstream_aborts_total", &[]), 0.0);
    // Each download's one log line counts all its bytes.
    let complete = big_log_lines(proxy, "complete");
    let full = format!("\"bytes\":{}", big.full_length);
    assert!(
        complete.iter().filter(|line| line.contains(&full)).count() >= 3,
        "not every whole download logged {full}:\n{}",
        complete.join("\n")
    );
    assert!(
        complete
            .iter()
            .any(|line| line.contains("\"bytes\":99999000")),
        "the range's log line:\n{}",
        complete.join("\n")
    );
}

/// A spliced download on the archiver's side
/// (`docs/observability.md#joining-the-tiers`): the request it began with,
/// closed by the proxy to splice the rest (`client_gone`, counted as a
/// disconnect there), and a `206` for the rest, both with its request id;
/// the proxy counts the splice and no disconnect.
#[test]
fn a_large_hit_is_spliced_and_logged_on_both_tiers() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &[]);
    warm_up(&cluster, big);
    let ((mut connection, head, hasher, received), not_judged_fast) =
        spliced_download_counting(&cluster.proxy);
    let digest = head.header("repr-digest").expect("a digest").to_owned();
    let id = head
        .header("x-request-id")
        .expect("a request id")
        .to_owned();
    read_rest_and_check(&mut connection, hasher, received, &digest, big, "spliced");
    drop(connection);

    let ours = |log: &str| -> Vec<serde_json::Value> {
        gitball_e2e::request_lines(log)
            .into_iter()
            .filter(|line| line["request_id"] == id.as_str())
            .collect()
    };
    // Each line is written once its body is over, which the client may see
    // first.
    let mut archiver_lines = Vec::new();
    wait_until(SETTLE, || {
        archiver_lines = ours(&cluster.primary.log());
        archiver_lines.len() >= 2
    });
    assert_eq!(archiver_lines.len(), 2, "{archiver_lines:#?}");
    archiver_lines.sort_by_key(|line| line["status"].as_u64());
    assert_eq!(archiver_lines[0]["status"], 200, "{archiver_lines:#?}");
    assert_eq!(archiver_lines[0]["ending"], "client_gone");
    assert_eq!(archiver_lines[1]["status"], 206, "{archiver_lines:#?}");
    assert_eq!(archiver_lines[1]["ending"], "complete");
    let mut proxy_lines = Vec::new();
    wait_until(SETTLE, || {
        proxy_lines = ours(&cluster.proxy.log());
        !proxy_lines.is_empty()
    });
    assert_eq!(proxy_lines.len(), 1, "{proxy_lines:#?}");
    assert_eq!(proxy_lines[0]["ending"], "complete");
    assert_eq!(proxy_lines[0]["bytes"], big.full_length);

    let archiver = scrape(cluster.primary.addr);
    assert!(
        archiver.value("gitball_archiver_client_disconnects_total", &[])
            >= 1.0 + f64::from(not_judged_fast)
    );
    let proxy = cluster.proxy.scrape();
    assert_eq!(
        proxy.value("gitball_proxy_client_disconnects_total", &[]),
        f64::from(not_judged_fast)
    );
}

/// A parked spliced download whose resume finds the proxy out of fds
/// asks no other candidate (`docs/proxy.md#failover`, `overloaded`: the
/// next would fare no better) and is aborted, never ended. Review: its
/// resume went on to the next candidate.
#[test]
fn a_parked_spliced_download_out_of_fds_asks_no_other_candidate() {
    let sandbox = Sandbox::new();
    let big = big_repo_128();
    let [primary, replica] = ["cache-a", "cache-b"].map(|name| {
        let cache = sandbox.path(name);
        link_files(warm_big_cache(), &cache);
        Archiver::start_with_cache(&big.repos, &cache, &[])
    });
    let cluster = Cluster::around(primary, vec![replica], &["--park-after", PARK_AFTER]);
    let proxy = &cluster.proxy;
    let (mut connection, _head, _hasher, mut received) = spliced_download(proxy);
    wait_until_the_spliced_download_parks(proxy);
    let overloaded = || proxy.scrape().sum(ATTEMPTS, &[("outcome", "overloaded")]);
    assert_eq!(overloaded(), 0.0);

    // No fd left for the proxy: it keeps the fds it has and may open none,
    // also in the number of one that closes meanwhile (a limit at its lowest
    // free fd let the resume open a socket in such a hole once, in the full
    // suite beside a build: "ended cleanly").
    let soft = fd_limit(proxy.pid);
    set_fd_limit(proxy.pid, "0");
    let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
    set_fd_limit(proxy.pid, &soft);
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "a download that could not resume ended cleanly after {received} bytes"
    );
    assert_eq!(overloaded(), 1.0, "the next candidate was asked");
    assert_eq!(
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        1.0
    );
}

/// The soft `RLIMIT_NOFILE` of process `pid`.
fn fd_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .expect("the process's limits")
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3).map(str::to_owned))
        .expect("the process's fd limit")
}

/// Sets the soft `RLIMIT_NOFILE` of process `pid` to `soft`.
fn set_fd_limit(pid: u32, soft: &str) {
    let set = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:"))
        .status()
        .expect("run prlimit");
    assert!(set.success(), "prlimit --nofile={soft}:");
}

/// The fd limit under which process `pid` can open `count` more fds and
/// no more, once its fds settled: a new fd takes the lowest free number,
/// which must be below the limit.
fn free_fds(pid: u32, count: usize) -> u64 {
    settled_fd_count(pid);
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's fds")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..)
        .filter(|fd| !open.contains(fd))
        .nth(count)
        .expect("a free fd")
}

/// The copied path end to end (docs/proxy.md, "Spliced downloads",
/// limits): a parked spliced download that resumes where it can have no
/// pipe (the proxy one fd short of one: its fds are what a resume that
/// finds none of the 64 places free goes on with too) goes on copied
/// through a buffer, and its client gets the archive's bytes in the
/// response's framing: the connection then answers its next request.
#[test]
fn a_parked_spliced_download_resumed_without_a_pipe_is_copied_whole() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", PARK_AFTER]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;
    let (mut connection, head, mut hasher, mut received) = spliced_download(proxy);
    let digest = head.header("repr-digest").expect("a hit has a digest");
    wait_until_the_spliced_download_parks(proxy);
    let counted = || {
        let metrics = proxy.scrape();
        (
            metrics.value("gitball_proxy_resumes_total", &[("outcome", "resumed")]),
            metrics.value("gitball_proxy_splices_total", &[("outcome", "copied")]),
        )
    };
    let (resumed, copied) = counted();

    // One fd for the resume's upstream connection, none for a pipe.
    let soft = fd_limit(proxy.pid);
    set_fd_limit(proxy.pid, &free_fds(proxy.pid, 1).to_string());
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        received += piece.len() as u64;
    });
    set_fd_limit(proxy.pid, &soft);
    assert_eq!(end, BodyEnd::Complete, "after {received} bytes");
    assert_eq!(received, big.full_length);
    assert_eq!(
        digest,
        format!("sha-256=:{}:", base64(&hasher.finalize())),
        "the bytes differ from the archive's"
    );
    // At least the resume under the limit was copied (one that the
    // client's kernel made before it, taking a few more bytes after the
    // park, may have been spliced): each copied resume is counted.
    let (resumed_now, copied_now) = counted();
    assert!(
        copied_now > copied && copied_now - copied <= resumed_now - resumed,
        "no resume was copied: resumes {resumed} -> {resumed_now}, copied {copied} -> {copied_now}"
    );

    connection
        .send_request("GET", "/healthz", &[])
        .expect("send");
    assert_eq!(
        connection
            .read_head()
            .expect("the next answer's head")
            .status,
        200,
        "the connection after the copied download"
    );
}

#[test]
fn a_spliced_download_whose_archiver_dies_is_aborted_not_ended() {
    let sandbox = Sandbox::new();
    let (big, mut cluster) = warm_big_cluster(&sandbox, &[]);
    warm_up(&cluster, big);
    let (mut connection, _head, _hasher, mut received) = spliced_download(&cluster.proxy);
    kill_hard(&mut cluster.primary);

    let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "a truncated spliced archive ended cleanly after {received} bytes"
    );
    assert!(received < big.full_length);
    let proxy = &cluster.proxy;
    assert!(
        downloads_end(proxy),
        "the aborted download is still counted"
    );
    assert_eq!(
        proxy
            .scrape()
            .sum("gitball_proxy_upstream_aborts_total", &[]),
        1.0
    );
    assert_eq!(big_log_lines(proxy, "aborted").len(), 1, "{}", proxy.log());
    // An archiver that cut the body itself is not ejected for it (it may
    // be an archive that failed there); a dead one shows at the next
    // connection, which ejects it.
    let ejected = || {
        proxy.scrape().value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &cluster.primary.base_url)],
        )
    };
    assert_eq!(ejected(), 0.0, "the abort alone ejected the archiver");
    let fetched = fetch(proxy.addr, "/acme/big/archive/main.tar");
    assert_eq!(fetched.status(), 502);
    assert_eq!(ejected(), 1.0, "a refused connection did not eject it");
}

/// A proxy whose ejections last an hour (`--eject-for 3600`) in front of
/// one archiver (`archiver_args`) over the big repository, with its cache
/// warm; and that cache's dir, for the archiver's restarts.
fn a_warm_archiver_ejected_for_an_hour(
    sandbox: &Sandbox,
    archiver_args: &[&str],
) -> (&'static BigRepo, PathBuf, Cluster) {
    let big = big_repo_128();
    let cache = sandbox.path("cache");
    link_files(warm_big_cache(), &cache);
    let primary = Archiver::start_with_cache(&big.repos, &cache, archiver_args);
    let cluster = Cluster::around(primary, Vec::new(), &["--eject-for", "3600"]);
    (big, cache, cluster)
}

/// `proxy`'s `gitball_proxy_upstream_ejected` for `upstream`.
fn ejected_gauge(proxy: &Proxy, upstream: &str) -> f64 {
    proxy
        .scrape()
        .value("gitball_proxy_upstream_ejected", &[("upstream", upstream)])
}

/// Downloads of the warm big archive through `proxy`, `count` of them,
/// each with its head and first 64 KiB taken and then left waiting (piped,
/// not spliced: too slow a start), so that each holds its upstream.
fn downloads_in_flight(proxy: &Proxy, count: usize) -> Vec<RawConnection> {
    (0..count)
        .map(|_| {
            let mut connection = RawConnection::connect(proxy.addr).expect("connect");
            connection.send_request("GET", BIG_PATH, &[]).expect("send");
            assert_eq!(connection.read_head().expect("head").status, 200);
            connection
                .read_body_bytes(64 * KIB)
                .expect("the first bytes");
            connection
        })
        .collect()
}

/// A download cut because its archiver's process went away is no archive
/// failed there: an archiver restarted gracefully, whose drain cut more
/// downloads than the row of archive failures that ejects (five), is
/// served from again as soon as it is back, and a killed one is ejected by
/// the connect that follows, not by its cut downloads. Before, each cut
/// counted as an archive failed there: the restart ejected the restarted
/// archiver for `--eject-for` (review).
#[test]
fn downloads_cut_by_a_restart_or_a_kill_do_not_eject_the_archiver() {
    const IN_FLIGHT: usize = 6;
    let sandbox = Sandbox::new();
    let (big, cache, mut cluster) =
        a_warm_archiver_ejected_for_an_hour(&sandbox, &["--shutdown-grace", "1"]);
    let addr = cluster.primary.addr;
    let url = cluster.primary.base_url.clone();
    let proxy = &cluster.proxy;
    let ejected = || ejected_gauge(proxy, &url);
    // The cuts the proxy told were followed by no answer from their
    // upstream (one check, and one line, for the cuts made while it ran).
    let not_counted = || -> usize {
        proxy
            .log()
            .lines()
            .filter(|line| line.contains("its process went away"))
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                value["cuts"].as_u64().expect("cuts") as usize
            })
            .sum()
    };
    // Until the proxy told so of `count` cuts, or ejected the upstream.
    let gone = |count: usize| wait_until(SETTLE, || not_counted() >= count || ejected() == 1.0);
    let cut_all = |connections: Vec<RawConnection>| {
        for mut connection in connections {
            let end = connection.read_body_to_end(|_| {});
            assert!(matches!(end, BodyEnd::Aborted(_)), "{end:?}");
        }
    };

    // A graceful restart: the drain's grace runs out on the downloads.
    let connections = downloads_in_flight(proxy, IN_FLIGHT);
    let (exit, _) = cluster.primary.terminate(SETTLE);
    assert!(exit.is_some(), "the archiver did not drain and exit");
    cut_all(connections);
    assert!(gone(IN_FLIGHT), "{}", proxy.log());
    assert_eq!(ejected(), 0.0, "the restart's cut downloads ejected it");
    assert_eq!(not_counted(), IN_FLIGHT);
    let mut restarted = start_archiver_at(&big.repos, &cache, addr, &[]);
    let (head, length) = download(proxy.addr, BIG_PATH);
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    assert_eq!(length, big.full_length);
    assert_eq!(ejected(), 0.0);

    // A kill: the cut downloads count for nothing; the next connect ejects.
    let connections = downloads_in_flight(proxy, IN_FLIGHT);
    kill_hard(&mut restarted);
    cut_all(connections);
    assert!(gone(2 * IN_FLIGHT), "{}", proxy.log());
    assert_eq!(
        ejected(),
        0.0,
        "the killed archiver's cut downloads ejected it"
    );
    assert_eq!(not_counted(), 2 * IN_FLIGHT);
    assert_eq!(fetch(proxy.addr, BIG_PATH).status(), 502);
    assert_eq!(ejected(), 1.0, "the refused connect did not eject it");
}

/// An archiver ejected for a refused connect (restarting: nothing
/// listens) is asked whether it is back, and its first `200` to
/// `/healthz` ends the ejection, long before `--eject-for`
/// (`docs/proxy.md#ejection`). (Attack: a rolling restart moved each
/// archiver's archives to the next for `--eject-for`, which generated them
/// all again.)
#[test]
fn a_restarted_archiver_is_back_before_its_ejection_ends() {
    let sandbox = Sandbox::new();
    let (big, cache, mut cluster) = a_warm_archiver_ejected_for_an_hour(&sandbox, &[]);
    let addr = cluster.primary.addr;
    let url = cluster.primary.base_url.clone();
    let proxy = &cluster.proxy;
    let ejected = || ejected_gauge(proxy, &url);
    let (exit, _) = cluster.primary.terminate(SETTLE);
    assert!(exit.is_some(), "the archiver did not exit");
    assert_eq!(fetch(proxy.addr, BIG_PATH).status(), 502);
    assert_eq!(ejected(), 1.0, "the refused connect did not eject it");

    let _restarted = start_archiver_at(&big.repos, &cache, addr, &[]);
    assert!(
        wait_until(SETTLE, || ejected() == 0.0),
        "still ejected after its restart: {}",
        proxy.log()
    );
    assert!(
        proxy
            .log()
            .contains("upstream ejected for a refused connect answers again")
    );
    let (head, length) = download(proxy.addr, BIG_PATH);
    assert_eq!(head.header("x-gitball-cache"), Some("hit"));
    assert_eq!(length, big.full_length);
    assert_eq!(ejected(), 0.0);
}

/// The row of archive failures that ejects an archiver (five, see
/// `an_archive_failing_at_its_archiver_is_failed_over_and_ejects_nothing`)
/// is broken only by an archive that ended whole: not by an error's body
/// (a `404` here), and also by a spliced download (review: attack; a `404`
/// or the `500` itself broke the row, so an archiver whose every
/// generation failed was never ejected, and a spliced hit did not, so one
/// with mostly large hits was ejected by any five failures).
#[test]
fn only_an_archive_ended_whole_breaks_a_row_of_archive_failures() {
    let sandbox = Sandbox::new();
    let big = big_repo_128();
    let cache = sandbox.path("cache");
    link_files(warm_big_cache(), &cache);
    // Every new archive fails (past 1 MiB); the cached big tar is a hit.
    let primary = Archiver::start_with_cache(&big.repos, &cache, &["--max-archive-bytes", "1MiB"]);
    let cluster = Cluster::around(primary, Vec::new(), &[]);
    let proxy = &cluster.proxy;
    let ejected = || {
        proxy.scrape().value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", &cluster.primary.base_url)],
        )
    };
    // Each a new archive, which fails by running: one the archiver knows
    // too large is refused before its head, and counts for nothing
    // (`requests_for_an_archive_an_archiver_knows_too_large_eject_nothing`).
    let failing: Vec<String> = ["zip", "tar.gz", "tar.zst"]
        .into_iter()
        .flat_map(|ext| {
            [
                format!("/acme/big/archive/main.{ext}"),
                format!("/acme/big/archive/HEAD.{ext}"),
                format!("/acme/big/archive/main.{ext}?path=big.bin"),
            ]
        })
        .chain(["/acme/big/archive/HEAD.tar".to_owned()])
        .collect();
    let next = std::cell::Cell::new(0);
    let failing_archive = || {
        let target = &failing[next.replace(next.get() + 1)];
        let fetched = fetch(proxy.addr, target);
        assert!(
            matches!(fetched.end, BodyEnd::Aborted(_)),
            "{target}: {:?}",
            fetched.end
        );
    };
    for _ in 0..5 {
        assert_eq!(
            fetch(proxy.addr, "/acme/big/archive/no-such-ref.zip").status(),
            404
        );
        failing_archive();
    }
    // A cut counts once its archiver answered the check after it
    // (`downloads_cut_by_a_restart_or_a_kill_do_not_eject_the_archiver`).
    assert!(
        wait_until(SETTLE, || ejected() == 1.0),
        "404s between them broke the row"
    );

    for _ in 0..5 {
        let (mut connection, _, _, _) = spliced_download(proxy);
        let end = connection.read_body_to_end(|_| {});
        assert_eq!(end, BodyEnd::Complete);
        failing_archive();
    }
    assert_eq!(ejected(), 0.0, "whole spliced hits did not break the row");
}

#[test]
fn a_client_leaving_a_spliced_download_releases_both_connections() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &[]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;
    let proxy_fds = settled_fd_count(proxy.pid);
    let archiver_fds = settled_fd_count(cluster.primary.pid);

    let ((connection, _head, _hasher, _received), left) = spliced_download_counting(proxy);
    // A spliced download holds its client socket, an upstream socket and a
    // pipe's two ends.
    assert!(open_fd_count(proxy.pid) >= proxy_fds + 3);
    drop(connection);

    assert!(
        wait_until(SETTLE, || open_fd_count(proxy.pid) <= proxy_fds
            && open_fd_count(cluster.primary.pid) <= archiver_fds),
        "after the client left: proxy fds {} (baseline {proxy_fds}), archiver fds {} (baseline {archiver_fds})",
        open_fd_count(proxy.pid),
        open_fd_count(cluster.primary.pid)
    );
    assert!(wait_until(SETTLE, || scrape(cluster.primary.addr)
        .value("gitball_archiver_active_downloads", &[])
        == 0.0));
    let metrics = proxy.scrape();
    assert_eq!(metrics.value("gitball_proxy_active_downloads", &[]), 0.0);
    assert_eq!(
        metrics.value("gitball_proxy_client_disconnects_total", &[]),
        f64::from(1 + left)
    );
    assert_eq!(
        big_log_lines(proxy, "client_gone").len(),
        1 + left as usize,
        "{}",
        proxy.log()
    );
}

#[test]
fn a_stalled_spliced_download_parks_and_resumes_with_the_same_bytes() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", PARK_AFTER]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;

    let ok = || {
        proxy.scrape().value(
            ATTEMPTS,
            &[("upstream", &cluster.primary.base_url), ("outcome", "ok")],
        )
    };
    let (mut connection, head, hasher, received) = spliced_download(proxy);
    // Spliced: the download's first answer and its splice's range request
    // are counted, and nothing after them yet (it cannot park before its
    // client stops reading).
    let ok_when_spliced = ok();
    let digest = head.header("repr-digest").expect("a hit has a digest");
    // The client reads nothing now: the spliced body lets go of its
    // upstream connection and its pipe.
    wait_until_the_spliced_download_parks(proxy);
    assert!(
        wait_until(SETTLE, || scrape(cluster.primary.addr)
            .value("gitball_archiver_active_downloads", &[])
            == 0.0),
        "the archiver still serves the parked download"
    );
    let resumed = || {
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };
    // Resumes are counted from the park the test saw, as attempts are: the
    // download may have resumed before it (the client's kernel took more
    // bytes as its receive buffer grew, and the download was parked again),
    // and one parked before its splice began counts the splice's range
    // request as a resume (CI: counted from the start, 7 against 6).
    let (ok_while_parked, resumed_while_parked) = (ok(), resumed());

    read_rest_and_check(
        &mut connection,
        hasher,
        received,
        digest,
        big,
        "resumed spliced",
    );
    let metrics = proxy.scrape();
    // Each resume's range request, made around the pooled client, is an
    // attempt like any other.
    let resumes = resumed() - resumed_while_parked;
    assert!(resumes >= 1.0);
    assert_eq!(ok(), ok_while_parked + resumes, "the resumes' attempts");
    assert_eq!(
        metrics.value("gitball_proxy_resumes_total", &[("outcome", "failed")]),
        0.0
    );
    // A spliced body's line is written when its splice returns, which can
    // be after the client read the last byte of its length.
    let full = format!("\"bytes\":{}", big.full_length);
    let whole_lines = || {
        big_log_lines(proxy, "complete")
            .iter()
            .filter(|line| line.contains(&full))
            .count()
    };
    assert!(
        wait_until(SETTLE, || whole_lines() == 2),
        "the warm-up's and the parked download's log lines:\n{}",
        proxy.log()
    );
    // Its attempts: the first answer, the splice's range request and each
    // resume's since the splice, those before the park the test saw
    // included: one, unless the client's kernel took more bytes after the
    // first park or a loaded machine parked it again (counted from the
    // park the test saw, an early resume made the line's 4 attempts
    // against 3 expected).
    let attempts = format!("\"attempts\":\"{}\"", 2.0 + ok() - ok_when_spliced);
    assert!(
        big_log_lines(proxy, "complete")
            .iter()
            .any(|line| line.contains(&full) && line.contains(&attempts)),
        "no line of the parked download with {attempts}:\n{}",
        proxy.log()
    );
    assert_eq!(
        proxy.scrape().value("gitball_proxy_parked_downloads", &[]),
        0.0
    );
}

/// A spliced download whose archiver went silent lets go of what it holds
/// as soon as its client leaves, as a piped one does: nothing is written to
/// the client then, so only its end of input tells (docs/proxy.md,
/// "Spliced downloads"), or its reset when a pipelined request waits to be
/// answered after the download, and empty lines after the request are no
/// such request. Attacks: the client's socket, the upstream connection and
/// the pipe were held until the archiver sent again, or until
/// `--header-timeout` ended the download as the archiver's failure and
/// ejected it; then the same with an empty line or a pipelined request
/// sent after the request.
#[test]
fn a_spliced_download_whose_archiver_went_silent_ends_when_its_client_leaves() {
    let sandbox = Sandbox::new();
    // Parking would let go of the upstream too: not before the client left.
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", "600"]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;

    /// Lets the archiver go on however the test ends.
    struct Resumes<'a>(&'a Archiver);
    impl Drop for Resumes<'_> {
        fn drop(&mut self) {
            self.0.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }
    let pipelined = format!("GET {BIG_PATH} HTTP/1.1\r\nHost: x\r\n\r\n");
    let cases: [(&str, &[u8], bool); 3] = [
        ("its end of input", b"", false),
        ("an empty line, then its end of input", b"\r\n", false),
        (
            "a pipelined request, then a reset",
            pipelined.as_bytes(),
            true,
        ),
    ];
    for (what, after, reset) in cases {
        let gone = || big_log_lines(proxy, "client_gone").len();
        let before = gone();
        let ((mut connection, ..), left) = spliced_download_sending(proxy, after);
        let resumes = Resumes(&cluster.primary);
        assert!(cluster.primary.suspend(), "the archiver did not stop");
        // The client takes what the archiver sent before it stopped: the
        // pipe is then empty, and the proxy waits on the silent upstream.
        connection
            .stream()
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("read timeout");
        let deadline = Instant::now() + SETTLE;
        let drained = loop {
            match connection.read_body_some(MIB) {
                Ok(Some(_)) if Instant::now() < deadline => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break true;
                }
                _ => break false,
            }
        };
        assert!(
            drained,
            "{what}: the client could not take what was in flight"
        );
        if reset {
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(
                connection.stream(),
                nix::sys::socket::sockopt::Linger,
                &linger,
            )
            .expect("SO_LINGER");
        }
        drop(connection);

        // Ended as the client's leaving, with the archiver still stopped.
        assert!(
            wait_until(SETTLE, || gone() == before + left as usize + 1),
            "{what}: the download did not end when its client left:\n{}",
            proxy.log()
        );
        let metrics = proxy.scrape();
        assert_eq!(
            metrics.value("gitball_proxy_active_downloads", &[]),
            0.0,
            "{what}"
        );
        assert_eq!(
            metrics.sum("gitball_proxy_upstream_aborts_total", &[]),
            0.0,
            "{what}"
        );
        assert_eq!(
            metrics.value(
                "gitball_proxy_upstream_ejected",
                &[("upstream", &cluster.primary.base_url)]
            ),
            0.0,
            "{what}"
        );
        drop(resumes);
    }
}

/// A parked spliced download whose client leaves ends there: the closed
/// socket turns writable, which is no reason to ask an archiver for the
/// rest (attack: a range connection was opened for nothing, counted as an
/// attempt the client left).
#[test]
fn a_parked_spliced_download_whose_client_leaves_asks_no_archiver() {
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", PARK_AFTER]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;
    let attempts = || proxy.scrape().sum(ATTEMPTS, &[]);
    let before_the_download = attempts();
    let ((connection, ..), declined) = spliced_download_counting(proxy);
    wait_until_the_spliced_download_parks(proxy);
    let before = attempts();
    // Unread bytes in its socket: the close is a reset.
    drop(connection);
    assert!(downloads_end(proxy), "the download did not end");
    assert_eq!(attempts(), before, "an archiver was asked for the rest");
    assert_eq!(
        proxy.scrape().value("gitball_proxy_parked_downloads", &[]),
        0.0
    );
    // Its line counts the first answer and the splice's range request, and
    // no resume after the client left: one begun is counted there even when
    // the client's leaving cut it short before any connection (review: the
    // metric alone missed that race). Counted as the proxy counted them:
    // the client's kernel may have taken more bytes after the first park,
    // and the download resumed and parked again before the test saw it (CI:
    // 3 attempts on the line against 2 expected).
    let lines = big_log_lines(proxy, "client_gone");
    let line: serde_json::Value =
        serde_json::from_str(lines.last().expect("the download's line")).expect("JSON");
    // Less one attempt for each download tried before it that was not
    // spliced (on a loaded host: the full suite saw 5 counted against 2).
    let counted = before - before_the_download - f64::from(declined);
    assert!(counted >= 2.0, "{counted} attempts counted");
    assert_eq!(line["attempts"], counted.to_string().as_str(), "{line}");
}

/// A download judged fast whose client stalls before the chunk that got
/// it judged is written is parked by the pipe before its splice begins;
/// when the client reads again it is spliced, and no longer counted as
/// parked. For that, the chunk hyper is stuck writing when the client
/// stops must be the one that took the download past 4 MiB: the bytes
/// written to the client's socket must end less than a chunk (64 KiB at
/// most) below 4 MiB. Those are the bytes the client read plus the bytes
/// the kernel holds between the two (its receive queue and the proxy's
/// send queue: 100 to 230 KiB, as autotuning goes), which each try
/// measures in `/proc/net/tcp`. Each next client stops where the median
/// of those measurements puts the written end at one of several points
/// below 4 MiB; any try is spliced before it was parked (stopped too
/// late), parked and never judged (too early), or parked and then
/// spliced, which is what the test checks (at most 24 tries).
#[test]
fn a_download_parked_before_its_splice_began_is_spliced_and_unparked() {
    const TRIES: usize = 24;
    /// Where the written bytes should end, below the 4 MiB judgement.
    const AIMS_BELOW: [usize; 6] = [16 * KIB, 32 * KIB, 8 * KIB, 48 * KIB, 24 * KIB, 40 * KIB];
    const JUDGED_AT: usize = 4 * MIB;
    let sandbox = Sandbox::new();
    let (big, cluster) = warm_big_cluster(&sandbox, &["--park-after", PARK_AFTER]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;
    let parked = || proxy.scrape().value("gitball_proxy_parked_downloads", &[]);
    let resumes = || {
        proxy
            .scrape()
            .value("gitball_proxy_resumes_total", &[("outcome", "resumed")])
    };
    let v4 = |addr: SocketAddr| match addr {
        SocketAddr::V4(addr) => addr,
        SocketAddr::V6(_) => panic!("the tests listen on IPv4"),
    };
    let mut between: Vec<usize> = Vec::new();
    for attempt in 0..TRIES {
        let kernel_holds = if between.is_empty() {
            160 * KIB
        } else {
            between.sort_unstable();
            between[between.len() / 2]
        };
        let stop_at = (JUDGED_AT - AIMS_BELOW[attempt % AIMS_BELOW.len()])
            .checked_sub(kernel_holds)
            .unwrap_or_else(|| panic!("{kernel_holds} bytes held between client and proxy"));
        let before = spliced(proxy);
        let resumes_before = resumes();
        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        socket2::SockRef::from(connection.stream())
            .set_recv_buffer_size(64 * KIB)
            .expect("SO_RCVBUF");
        connection.send_request("GET", BIG_PATH, &[]).expect("send");
        assert_eq!(connection.read_head().expect("head").status, 200);
        let first = connection.read_body_bytes(stop_at).expect("first bytes");
        assert_eq!(first.len(), stop_at);
        assert!(
            wait_until(SETTLE, || parked() == 1.0),
            "the stalled download was not parked"
        );
        let spliced_before_parked = spliced(proxy) > before;
        let held = gitball_e2e::procfs::bytes_between(
            v4(connection.stream().local_addr().expect("local address")),
            v4(proxy.addr),
        )
        .expect("the connection in /proc/net/tcp");
        between.push(usize::try_from(held).expect("bytes held"));
        // Reading again lets the pipe go on: spliced now if it was judged.
        connection.read_body_bytes(MIB).expect("more bytes");
        let spliced_after = spliced(proxy) > before;
        println!(
            "stop at {stop_at}, written {}: spliced before it was parked {spliced_before_parked}, after {spliced_after}",
            stop_at as u64 + held
        );
        if (spliced_before_parked, spliced_after) == (false, true) {
            assert!(
                wait_until(SETTLE, || parked() == 0.0),
                "a download spliced after it was parked is still counted as parked"
            );
            // Its splice's range request is its resume.
            assert_eq!(resumes() - resumes_before, 1.0);
            let mut received = (stop_at + MIB) as u64;
            let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
            assert_eq!(end, BodyEnd::Complete, "after {received} bytes");
            assert_eq!(received, big.full_length);
            return;
        }
        drop(connection);
        assert!(wait_until(SETTLE, || parked() == 0.0
            && proxy.scrape().value("gitball_proxy_active_downloads", &[])
                == 0.0));
    }
    panic!("no client stopped between the judgement and its splice in {TRIES} tries");
}

#[test]
fn a_stalled_spliced_download_is_cut_after_the_client_idle_timeout() {
    let sandbox = Sandbox::new();
    // Parking (10 s by default) comes after the idle timeout here.
    let (big, cluster) = warm_big_cluster(&sandbox, &["--client-idle-timeout", "1"]);
    warm_up(&cluster, big);
    let proxy = &cluster.proxy;
    let proxy_fds = settled_fd_count(proxy.pid);

    let (mut connection, _head, _hasher, mut received) = spliced_download(proxy);
    let stopped = Instant::now();
    assert!(
        wait_until(SETTLE, || open_fd_count(proxy.pid) <= proxy_fds),
        "proxy fds {} > baseline {proxy_fds}",
        open_fd_count(proxy.pid)
    );
    println!(
        "stalled spliced download cut after {:?} (idle timeout 1 s)",
        stopped.elapsed()
    );
    let end = connection.read_body_to_end(|piece| received += piece.len() as u64);
    assert!(
        matches!(end, BodyEnd::Aborted(_)),
        "an idle client's spliced body ended cleanly after {received} bytes"
    );
    let metrics = proxy.scrape();
    assert_eq!(
        metrics.value("gitball_proxy_client_idle_timeouts_total", &[]),
        1.0
    );
    assert_eq!(metrics.value("gitball_proxy_active_downloads", &[]), 0.0);
    assert_eq!(
        big_log_lines(proxy, "idle_timeout").len(),
        1,
        "{}",
        proxy.log()
    );
}

/// An upstream on 127.0.0.1 that answers every request on every connection
/// (each served by a thread of its own, so the splice's range request is
/// answered while the first download is under way) with `answer` whole,
/// whatever was asked (a `Range` included), then closes the connection.
/// Its thread ends when no connection comes within [`SETTLE`].
fn concurrent_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        loop {
            let mut accepted = None;
            if !wait_until(SETTLE, || {
                accepted = listener.accept().ok();
                accepted.is_some()
            }) {
                return;
            }
            let (mut stream, _) = accepted.expect("accepted");
            std::thread::spawn(move || {
                stream.set_nonblocking(false).expect("blocking");
                stream.set_read_timeout(Some(SETTLE)).expect("read timeout");
                let head = gitball_e2e::read_request_head(&mut stream);
                if !gitball_e2e::is_whole_head(&head) {
                    return;
                }
                let _ = stream.write_all(answer);
            });
        }
    });
    addr
}

/// `docs/proxy.md#spliced-downloads`: a splice whose range request the
/// archiver does not answer as required (here, the whole archive again: a
/// `200`, as when it is being generated anew) is declined, counted in
/// `gitball_proxy_splices_total{outcome="declined"}`, and the download
/// carries on through the pipe, whole and with the archive's bytes.
#[test]
fn a_splice_whose_range_is_not_answered_as_required_is_declined_and_piped_whole() {
    const LENGTH: usize = 24 * MIB;
    let body: Vec<u8> = (0..LENGTH)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    let expected = Sha256::digest(&body);
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nETag: \"d0d0-tar\"\r\nContent-Length: {LENGTH}\r\n\r\n"
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let sandbox = Sandbox::new();
    let proxy = proxy_before(concurrent_upstream(answer), &sandbox);
    let count = |outcome: &str| {
        proxy
            .scrape()
            .value("gitball_proxy_splices_total", &[("outcome", outcome)])
    };

    // The judgement is a rate (4 MiB within 40 ms): a client slowed by a
    // loaded machine is not judged at all, and tries again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    loop {
        attempt += 1;
        assert!(
            attempt <= 30 && Instant::now() < deadline,
            "no download was judged fast in {attempt} attempts"
        );
        let before = count("declined");
        let mut connection = RawConnection::connect(proxy.addr).expect("connect");
        connection
            .send_request("GET", "/acme/widget/archive/main.tar", &[])
            .expect("send");
        let head = connection.read_head().expect("head");
        assert_eq!(head.status, 200);
        let first = connection.read_body_bytes(8 * MIB).expect("first 8 MiB");
        // The pipe stops at 4 MiB until the splice is set up or declined,
        // so with 8 MiB taken it was one or the other.
        if count("declined") == before {
            println!("attempt {attempt}: the client was not judged fast; again");
            continue;
        }
        let mut hasher = Sha256::new();
        hasher.update(&first);
        let mut received = first.len();
        let end = connection.read_body_to_end(|piece| {
            hasher.update(piece);
            received += piece.len();
        });
        assert_eq!(end, BodyEnd::Complete, "after {received} bytes");
        assert_eq!(received, LENGTH);
        assert_eq!(hasher.finalize(), expected, "the piped bytes");
        break;
    }
    assert_eq!(count("declined"), 1.0);
    assert_eq!(count("spliced"), 0.0);
    let metrics = proxy.scrape();
    assert_eq!(metrics.value("gitball_proxy_active_downloads", &[]), 0.0);
    assert_eq!(metrics.sum("gitball_proxy_upstream_aborts_total", &[]), 0.0);
}

/// `docs/proxy.md#parking`: only a download with a strong ETag is parked
/// (the rest is asked for by `If-Range`, which a weak one cannot name). A
/// download under a weak ETag whose client stops reading keeps its
/// upstream, however long past `--park-after`, and ends whole when the
/// client reads on; the same download under a strong ETag is parked.
/// (Mutation review: parking downloads under a weak ETag passed every
/// test; fails this one.)
#[test]
fn only_a_download_with_a_strong_etag_is_parked() {
    const LENGTH: usize = 24 * MIB;
    let body: Vec<u8> = (0..LENGTH)
        .map(|i| (i as u32).wrapping_mul(2_246_822_519).to_be_bytes()[1])
        .collect();
    let expected = Sha256::digest(&body);
    let answer = |etag: &str| -> &'static [u8] {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nETag: {etag}\r\n\
             Content-Length: {LENGTH}\r\n\r\n"
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        Box::leak(answer.into_boxed_slice())
    };
    let sandbox = Sandbox::new();
    let proxy_to = |upstream: SocketAddr, name: &str| {
        let routes = sandbox.path(name);
        write_routes(
            &routes,
            &[Route::new("*", &format!("http://{upstream}"), &[])],
        );
        Proxy::with_routes(&routes, &["--park-after", "0.5"])
    };
    let strong = proxy_to(concurrent_upstream(answer("\"d0d0-tar\"")), "strong.toml");
    let weak = proxy_to(concurrent_upstream(answer("W/\"d0d0-tar\"")), "weak.toml");
    let parked = |proxy: &Proxy| proxy.scrape().value("gitball_proxy_parked_downloads", &[]);

    // The control: a strong ETag's stalled download is parked.
    let (mut connection, _head, hasher, received) =
        stall_until_the_proxy_parks(&strong, "/acme/widget/archive/main.tar");
    let mut hasher = hasher;
    let mut received = received as usize;
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        received += piece.len();
    });
    assert_eq!(end, BodyEnd::Complete, "strong: after {received} bytes");
    assert_eq!(hasher.finalize(), expected, "strong: the bytes");

    // A weak one's is not, within six times --park-after (the window in
    // which the strong one's was parked, with room for a loaded machine).
    let mut connection = RawConnection::connect(weak.addr).expect("connect");
    connection
        .send_request("GET", "/acme/widget/archive/main.tar", &[])
        .expect("send");
    assert_eq!(connection.read_head().expect("head").status, 200);
    let first = connection.read_body_bytes(MIB).expect("first MiB");
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_secs(3) {
        assert_eq!(parked(&weak), 0.0, "a weak ETag's download was parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut hasher = Sha256::new();
    hasher.update(&first);
    let mut received = first.len();
    let end = connection.read_body_to_end(|piece| {
        hasher.update(piece);
        received += piece.len();
    });
    assert_eq!(end, BodyEnd::Complete, "weak: after {received} bytes");
    assert_eq!(hasher.finalize(), expected, "weak: the bytes");
    assert_eq!(
        weak.scrape().sum("gitball_proxy_resumes_total", &[]),
        0.0,
        "a weak ETag's download was resumed"
    );
}

// ---------------------------------------------------------------------------
// Configuration

#[test]
fn sighup_reloads_a_good_routes_file_and_keeps_the_old_table_on_a_bad_one() {
    let shared = shared_repos();
    let (repo, commits) = (&shared.widget, &shared.commits);
    let sandbox = Sandbox::new();
    let empty_repos = sandbox.path("empty-repos");
    std::fs::create_dir_all(&empty_repos).expect("mkdir");
    let full = Archiver::start(&shared.repos, &[]);
    let empty = Archiver::start(&empty_repos, &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &empty.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    let path = "/acme/widget/archive/main.tar";
    let expected = repo.archive("tar", "widget-main/", &commits.second, None);
    let reloads = |outcome: &str| {
        proxy.scrape().value(
            "gitball_proxy_routes_reloads_total",
            &[("outcome", outcome)],
        )
    };

    assert_eq!(
        fetch(proxy.addr, path).status(),
        404,
        "routed to the empty archiver"
    );

    // A good file: acme/* now goes to the archiver that has it.
    write_routes(
        &routes,
        &[
            Route::new("acme/*", &full.base_url, &[]),
            Route::new("*", &empty.base_url, &[]),
        ],
    );
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(wait_until(SETTLE, || reloads("ok") == 1.0), "no ok reload");
    assert_same_bytes(
        &fetch_ok(proxy.addr, path).body,
        &expected,
        "after the reload",
    );
    assert_eq!(
        fetch(proxy.addr, "/other/widget/archive/main.tar").status(),
        404
    );

    // A file with a syntax error, then one that parses but is invalid: the
    // table in use stays.
    write_atomically(&routes, b"[[route]\nrepos = \"*\"\nprimary = \n");
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(SETTLE, || reloads("error") == 1.0),
        "no error reload"
    );
    assert_same_bytes(
        &fetch_ok(proxy.addr, path).body,
        &expected,
        "after a bad file",
    );
    write_routes(&routes, &[Route::new("*", "ftp://127.0.0.1:1", &[])]);
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(SETTLE, || reloads("error") == 2.0),
        "no second error reload"
    );
    assert_same_bytes(
        &fetch_ok(proxy.addr, path).body,
        &expected,
        "after an invalid file",
    );
    assert_eq!(reloads("ok"), 1.0);
    assert!(proxy.log().contains("keeping the previous table"));
}

// Private routes. Each test starts an archiver over the shared repos and a
// proxy whose table makes `acme/secret` private.

const SIGNING_KEY: &str = "e2e-signing-key-0123456789abcdef";

/// An archiver, and a proxy with `--signing-key-file` routing `acme/secret`
/// (private) and everything else to it.
struct PrivateRoute {
    shared: &'static SharedRepos,
    sandbox: Sandbox,
    archiver: Archiver,
    proxy: Proxy,
}

impl PrivateRoute {
    fn start() -> PrivateRoute {
        let shared = shared_repos();
        let sandbox = Sandbox::new();
        let archiver = Archiver::start(&shared.repos, &[]);
        let key_file = sandbox.path("signing.key");
        // Surrounding whitespace is not part of the key.
        std::fs::write(&key_file, format!("  {SIGNING_KEY}\n")).expect("write the key");
        let routes = sandbox.path("routes.toml");
        write_routes(
            &routes,
            &[
                Route::new("acme/secret", &archiver.base_url, &[]).private(),
                Route::new("*", &archiver.base_url, &[]),
            ],
        );
        let key_arg = key_file.to_str().expect("utf-8 path");
        let proxy = Proxy::with_routes(&routes, &["--signing-key-file", key_arg]);
        PrivateRoute {
            shared,
            sandbox,
            archiver,
            proxy,
        }
    }

    fn key_file(&self) -> PathBuf {
        self.sandbox.path("signing.key")
    }

    /// `git archive` of `acme/secret`'s `main`.
    fn expected(&self) -> Vec<u8> {
        self.shared
            .secret
            .archive("tar", "secret-main/", &self.shared.commits.second, None)
    }

    /// How many requests reached the archiver.
    fn archiver_requests(&self) -> f64 {
        scrape(self.archiver.addr).sum("gitball_archiver_requests_total", &[])
    }
}

/// Both tiers' allocator gives freed memory back (docs/architecture.md,
/// "Memory per slow download"): jemalloc, built with a background thread
/// and a one-second decay. jemalloc prints its options at exit when asked
/// (`stats_print`, through its prefixed `_RJEM_MALLOC_CONF`); glibc's
/// malloc, or jemalloc without the baked configuration, would not print
/// these lines.
#[test]
fn both_tiers_allocate_with_jemalloc_that_returns_freed_pages() {
    for binary in ["gitball-proxy", "gitball-archiver"] {
        let output = Command::new(binary_path(binary))
            .arg("--version")
            .env_clear()
            .env("_RJEM_MALLOC_CONF", "stats_print:true")
            .output()
            .unwrap_or_else(|error| panic!("run {binary} --version: {error}"));
        assert!(output.status.success(), "{binary} --version failed");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for option in [
            "opt.background_thread: true",
            "opt.dirty_decay_ms: 1000",
            "opt.muzzy_decay_ms: 0",
        ] {
            assert!(
                printed.contains(option),
                "{binary}: {option:?} not in jemalloc's statistics:\n{}",
                printed.lines().take(40).collect::<Vec<_>>().join("\n")
            );
        }
    }
}

#[test]
fn token_from_the_sign_subcommand_opens_a_private_route() {
    let route = PrivateRoute::start();
    let addr = route.proxy.addr;
    let expected = route.expected();
    let output = Command::new(binary_path("gitball-proxy"))
        .arg("sign")
        .arg("--key-file")
        .arg(route.key_file())
        .args(["--repo", "acme/secret", "--ttl", "10m"])
        .env_clear()
        .output()
        .expect("run gitball-proxy sign");
    assert!(
        output.status.success(),
        "sign: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let signed = String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let (expiry, _) = signed.split_once('.').expect("{expiry}.{sig}");
    let expiry: u64 = expiry.parse().expect("expiry is a number");
    assert!(expiry.abs_diff(unix_now() + 600) < 60, "expiry {expiry}");
    let path = format!("/acme/secret/archive/main.tar?token={signed}");
    assert_same_bytes(&fetch_ok(addr, &path).body, &expected, "signed");
    let path = format!("/acme/secret/tar.gz/main?token={signed}");
    assert_same_bytes(
        &gunzip(&fetch_ok(addr, &path).body),
        &expected,
        "signed, codeload",
    );
    assert_eq!(
        route.archiver_requests(),
        2.0,
        "both signed requests reached the archiver"
    );
}

/// Private routes fail closed without a key (`docs/proxy.md`): a proxy
/// does not start on a table with a private route and no
/// `--signing-key-file`, and one started without a key whose reload adds a
/// private route answers that repository `404 repo_not_found`, with a token
/// or without, asking no archiver.
#[test]
fn private_routes_without_a_signing_key_fail_closed() {
    use std::io::Read as _;
    let shared = shared_repos();
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&shared.repos, &[]);
    let routes = sandbox.path("routes.toml");
    let private_table = [
        Route::new("acme/secret", &archiver.base_url, &[]).private(),
        Route::new("*", &archiver.base_url, &[]),
    ];
    write_routes(&routes, &private_table);
    let mut refused = Command::new(binary_path("gitball-proxy"))
        .args(["--listen", "127.0.0.1:0", "--routes"])
        .arg(&routes)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gitball-proxy");
    let mut status = None;
    wait_until(SETTLE, || {
        status = refused.try_wait().expect("wait for the proxy");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = refused.kill();
        let _ = refused.wait();
        panic!("a proxy with a private route and no --signing-key-file started");
    };
    assert!(!status.success());
    let mut stderr = String::new();
    refused
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("--signing-key-file"), "{stderr}");

    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    let secret = "/acme/secret/archive/main.tar";
    assert_eq!(
        fetch(proxy.addr, secret).status(),
        200,
        "public before the reload"
    );
    write_routes(&routes, &private_table);
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(SETTLE, || proxy
            .scrape()
            .value("gitball_proxy_routes_reloads_total", &[("outcome", "ok")])
            == 1.0),
        "the reload was not taken"
    );
    let asked = || scrape(archiver.addr).sum("gitball_archiver_requests_total", &[]);
    let before = asked();
    let signed = token(SIGNING_KEY.as_bytes(), "acme/secret", unix_now() + 600);
    for target in [secret.to_owned(), format!("{secret}?token={signed}")] {
        let answer = fetch(proxy.addr, &target);
        assert_eq!(answer.status(), 404, "{target}: {}", answer.text());
        assert_eq!(answer.error_code(), "repo_not_found", "{target}");
    }
    assert_eq!(asked(), before, "no archiver was asked");
    assert_eq!(
        fetch(proxy.addr, "/acme/widget/archive/main.tar").status(),
        200
    );
}

/// A token is never forwarded to an archiver nor logged
/// (`docs/proxy.md#private-repositories`): the archiver is asked the
/// canonical path with the other query parameters, and the request log
/// records the path without the query.
#[test]
fn a_token_is_neither_forwarded_nor_logged() {
    let sandbox = Sandbox::new();
    let answer: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nETag: \"c0ffee-tar\"\r\nContent-Length: 5\r\n\r\nbytes";
    let (upstream, heads) = sequenced_upstream(vec![answer; 2]);
    let key_file = sandbox.path("signing.key");
    std::fs::write(&key_file, SIGNING_KEY).expect("write the key");
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new("acme/secret", &format!("http://{upstream}"), &[]).private()],
    );
    let proxy = Proxy::with_routes(
        &routes,
        &["--signing-key-file", key_file.to_str().expect("utf-8 path")],
    );
    let signed = token(SIGNING_KEY.as_bytes(), "acme/secret", unix_now() + 600);
    let (_, signature) = signed.split_once('.').expect("{expiry}.{sig}");
    for (target, asked) in [
        (
            format!("/acme/secret/archive/main.tar?token={signed}"),
            "GET /acme/secret/archive/main.tar HTTP/1.1\r\n",
        ),
        (
            format!("/acme/secret/tar/main?path=src&token={signed}"),
            "GET /acme/secret/archive/main.tar?path=src HTTP/1.1\r\n",
        ),
    ] {
        let answer = fetch(proxy.addr, &target);
        assert_eq!(answer.status(), 200, "{target}: {}", answer.text());
        let head = heads.recv_timeout(SETTLE).expect("the upstream was asked");
        let head = String::from_utf8(head).expect("a text head");
        assert!(head.starts_with(asked), "{target}: asked\n{head}");
        assert!(!head.contains("token"), "{target}: forwarded\n{head}");
    }
    assert!(
        wait_until(SETTLE, || proxy.log().matches("\"path\":").count() >= 2),
        "no request lines: {}",
        proxy.log()
    );
    assert!(!proxy.log().contains(signature), "logged: {}", proxy.log());
}

/// The same formula computed here: the documented one (`docs/proxy.md`),
/// not an implementation detail.
#[test]
fn token_of_the_documented_formula_opens_a_private_route() {
    let route = PrivateRoute::start();
    let mine = token(SIGNING_KEY.as_bytes(), "acme/secret", unix_now() + 300);
    let fetched = fetch_ok(
        route.proxy.addr,
        &format!("/acme/secret/archive/main.tar?token={mine}"),
    );
    assert_same_bytes(&fetched.body, &route.expected(), "signed here");
    assert_eq!(route.archiver_requests(), 1.0);
}

/// Every refusal looks exactly like an unknown repository, and none reaches
/// the archiver.
#[test]
fn refused_tokens_look_like_an_unknown_repository() {
    let route = PrivateRoute::start();
    let addr = route.proxy.addr;
    let unknown = fetch(addr, "/acme/no-such-repo/archive/main.tar");
    assert_eq!(unknown.status(), 404);
    let unknown_json: serde_json::Value = serde_json::from_slice(&unknown.body).expect("JSON");
    assert_eq!(unknown.error_code(), "repo_not_found");

    let key = SIGNING_KEY.as_bytes();
    let now = unix_now();
    let valid = token(key, "acme/secret", now + 300);
    let (valid_expiry, valid_signature) = valid.split_once('.').expect("a dot");
    let refused: Vec<(&str, String)> = vec![
        ("expired", token(key, "acme/secret", now - 60)),
        ("wrong repository", token(key, "acme/other", now + 300)),
        ("wrong key", token(b"another-key", "acme/secret", now + 300)),
        (
            "later expiry, same signature",
            format!("{}.{valid_signature}", now + 3600),
        ),
        ("padded signature", format!("{valid}=")),
        ("plus-signed expiry", format!("%2B{valid}")),
        ("truncated signature", valid[..valid.len() - 4].to_owned()),
        ("no signature", format!("{valid_expiry}.")),
        ("no expiry", format!(".{valid_signature}")),
        ("garbage", "not-a-token".to_owned()),
        ("bad base64", format!("{valid_expiry}.!!!!")),
        ("empty", String::new()),
    ];
    let mut cases: Vec<(String, String)> = refused
        .into_iter()
        .map(|(what, token)| {
            (
                what.to_owned(),
                format!("/acme/secret/archive/main.tar?token={token}"),
            )
        })
        .collect();
    cases.push(("missing".into(), "/acme/secret/archive/main.tar".into()));
    cases.push(("missing, codeload".into(), "/acme/secret/zip/main".into()));
    cases.push((
        "token for the ref, not the repository".into(),
        format!(
            "/acme/secret/archive/main.tar?path=src&token={}",
            token(key, "acme/secret:main", now + 300)
        ),
    ));
    // The head too, line by line (attack: hyper put the refusal's length
    // after the request id, the forwarded 404's before it), for GET and
    // HEAD; only the values that differ per request may differ.
    let shape = |head: &ResponseHead| -> Vec<(String, String)> {
        head.headers
            .iter()
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "date" | "x-request-id" => "…".to_owned(),
                    _ => value.clone(),
                };
                (name.clone(), value)
            })
            .collect()
    };
    let unknown_head = fetch_with(addr, "HEAD", "/acme/no-such-repo/archive/main.tar", &[]);
    for (what, path) in &cases {
        let answer = fetch(addr, path);
        assert_eq!(answer.status(), 404, "{what}: {path}");
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .unwrap_or_else(|_| panic!("{what}: body is not JSON: {}", answer.text()));
        assert_eq!(
            json, unknown_json,
            "{what}: the refusal differs from an unknown repository's 404"
        );
        assert_eq!(
            shape(&answer.head),
            shape(&unknown.head),
            "{what}: GET head"
        );
        let head = fetch_with(addr, "HEAD", path, &[]);
        assert_eq!(shape(&head.head), shape(&unknown_head.head), "{what}: HEAD");
    }
    assert_eq!(
        route.archiver_requests(),
        2.0,
        "only the unknown repository reached the archiver (GET and HEAD)"
    );
}

// Hostile input. Each test sends one kind of hostile request to a cluster of
// its own over the shared repos, then checks that no request reached an
// upstream and that the proxy still serves.

/// One hostile request and the status it must get.
struct Hostile {
    what: &'static str,
    method: &'static str,
    target: String,
    header: Option<(&'static str, String)>,
    status: u16,
}

fn hostile_get(what: &'static str, target: &str, status: u16) -> Hostile {
    Hostile {
        what,
        method: "GET",
        target: target.to_owned(),
        header: None,
        status,
    }
}

/// Starts a cluster (two replicas) over the shared repos, lets `send` send
/// requests to the proxy, then asserts no upstream was tried, no archiver
/// saw a request, and a good request still gets git's bytes.
fn assert_refused_without_upstream_attempt(send: impl FnOnce(SocketAddr)) {
    let (shared, cluster) = widget_cluster(&[]);
    let addr = cluster.proxy.addr;
    let before = family_sum(&cluster.proxy.scrape(), ATTEMPTS);

    send(addr);

    let after = family_sum(&cluster.proxy.scrape(), ATTEMPTS);
    assert_eq!(after, before, "a hostile request reached an upstream");
    for archiver in cluster.archivers() {
        assert_eq!(
            scrape(archiver.addr).sum("gitball_archiver_requests_total", &[]),
            0.0,
            "an archiver saw a request"
        );
    }

    // The proxy still serves.
    let expected = shared
        .widget
        .archive("tar", "widget-main/", &shared.commits.second, None);
    assert_same_bytes(
        &fetch_ok(addr, "/acme/widget/archive/main.tar").body,
        &expected,
        "after the hostile requests",
    );
    assert_eq!(family_sum(&cluster.proxy.scrape(), ATTEMPTS), before + 1.0);
}

/// Each case gets its status, a body that names no path it was fed, and
/// `Allow: GET, HEAD` with a 405.
fn assert_hostile_urls_refused(cases: &[Hostile]) {
    assert_refused_without_upstream_attempt(|addr| {
        for case in cases {
            let headers: Vec<(&str, &str)> = case
                .header
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            let answer = fetch_with(addr, case.method, &case.target, &headers);
            let what = case.what;
            assert_eq!(
                answer.status(),
                case.status,
                "{what}: {} {}",
                case.method,
                &case.target[..case.target.len().min(80)]
            );
            let body = answer.text();
            assert!(
                !body.contains("/etc") && !body.contains("passwd"),
                "{what}: body {body}"
            );
            if case.status == 405 {
                assert_eq!(answer.header("allow"), "GET, HEAD", "{what}");
            }
        }
    });
}

#[test]
fn traversal_is_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get(
            "encoded traversal in the ref",
            "/acme/widget/archive/..%2F..%2F..%2Fetc%2Fpasswd.tar",
            400,
        ),
        hostile_get("dot-dot repository", "/acme/../archive/main.tar", 400),
        hostile_get(
            "encoded traversal in the owner",
            "/..%2F..%2Fetc/widget/archive/main.tar",
            400,
        ),
        hostile_get("dot owner", "/.git/widget/archive/main.tar", 400),
    ]);
}

#[test]
fn option_refs_are_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get(
            "option as ref",
            "/acme/widget/archive/--output=%2Ftmp%2Fx.tar",
            400,
        ),
        hostile_get(
            "dash ref, codeload",
            "/acme/widget/tar.gz/--remote=evil",
            400,
        ),
        hostile_get("dash ref", "/acme/widget/archive/-main.zip", 400),
    ]);
}

#[test]
fn control_bytes_and_bad_encodings_are_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get("NUL in the ref", "/acme/widget/archive/main%00.tar", 400),
        hostile_get(
            "newline in the ref",
            "/acme/widget/archive/ma%0Ain.tar",
            400,
        ),
        hostile_get("space in the ref", "/acme/widget/archive/main%20x.tar", 400),
        hostile_get("invalid UTF-8", "/acme/widget/archive/%E9t%E9.tar", 400),
    ]);
}

#[test]
fn revision_syntax_is_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get(
            "reflog syntax",
            "/acme/widget/archive/main@%7B-1%7D.tar",
            400,
        ),
        hostile_get(
            "lock component",
            "/acme/widget/archive/refs%2Fheads%2Fx.lock.tar",
            400,
        ),
    ]);
}

#[test]
fn unknown_formats_and_other_urls_are_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get("unknown format", "/acme/widget/archive/main.rar", 400),
        hostile_get(
            "not an archive URL",
            "/acme/widget/blob/main/README.md",
            404,
        ),
    ]);
}

#[test]
fn hostile_subtree_paths_are_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get(
            "pathspec magic",
            "/acme/widget/archive/main.tar?path=%3A(glob)**",
            400,
        ),
        hostile_get(
            "pathspec magic, last path wins",
            "/acme/widget/archive/main.tar?path=src&path=%3A%21src",
            400,
        ),
        hostile_get(
            "traversal in path",
            "/acme/widget/archive/main.tar?path=..%2F..%2Fetc",
            400,
        ),
        hostile_get(
            "absolute path",
            "/acme/widget/archive/main.tar?path=%2Fetc%2Fpasswd",
            400,
        ),
        hostile_get(
            "control byte in path",
            "/acme/widget/archive/main.tar?path=src%01",
            400,
        ),
    ]);
}

#[test]
fn oversized_request_lines_and_heads_are_refused_by_the_proxy() {
    assert_hostile_urls_refused(&[
        hostile_get(
            "request line over 8 KiB",
            &format!("/acme/widget/archive/{}.tar", "a".repeat(9 * KIB)),
            414,
        ),
        Hostile {
            header: Some(("X-Filler", "x".repeat(64 * KIB))),
            ..hostile_get("head of 64 KiB", "/acme/widget/archive/main.tar", 431)
        },
    ]);
}

#[test]
fn other_methods_get_405_with_allow_from_the_proxy() {
    assert_hostile_urls_refused(&[
        Hostile {
            method: "POST",
            header: Some(("Content-Length", "0".to_owned())),
            ..hostile_get("POST", "/acme/widget/archive/main.tar", 405)
        },
        Hostile {
            method: "DELETE",
            ..hostile_get("DELETE", "/acme/widget/archive/main.tar", 405)
        },
    ]);
}

/// Raw bytes a client library would refuse to send.
#[test]
fn malformed_request_bytes_get_4xx_from_the_proxy() {
    let raw: [(&str, &[u8]); 3] = [
        ("control byte in the request line", b"GET /acme/widget/archive/ma\x01in.tar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("space in the target", b"GET /acme/widget/archive/ma in.tar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("bare LF header injection", b"GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\nX-A: b\rX-Injected: 1\r\nConnection: close\r\n\r\n"),
    ];
    assert_refused_without_upstream_attempt(|addr| {
        for (what, bytes) in raw {
            let mut connection = RawConnection::connect(addr).expect("connect");
            connection.send(bytes).expect("send");
            let head = connection
                .read_head()
                .unwrap_or_else(|error| panic!("{what}: no response: {error}"));
            assert!((400..500).contains(&head.status), "{what}: {}", head.status);
        }
    });
}

/// `docs/http.md`: a request head over 32 KiB gets `431`, on the proxy too, and is
/// never forwarded.
#[test]
fn request_head_over_32_kib_gets_431() {
    let shared = shared_repos();
    let cluster = Cluster::start(&shared.repos, &shared.repos, 0, &[]);
    let addr = cluster.proxy.addr;
    let before = family_sum(&cluster.proxy.scrape(), ATTEMPTS);
    let answers: Vec<(usize, u16)> = [33, 40, 47]
        .into_iter()
        .map(|filler_kib| {
            let filler = "x".repeat(filler_kib * KIB);
            let answer = fetch_with(
                addr,
                "GET",
                "/acme/widget/archive/main.tar",
                &[("X-Filler", &filler)],
            );
            (filler_kib, answer.status())
        })
        .collect();
    let forwarded = family_sum(&cluster.proxy.scrape(), ATTEMPTS) - before;
    assert!(
        answers.iter().all(|&(_, status)| status == 431),
        "(header KiB, status) for heads over 32 KiB: {answers:?}; {forwarded} forwarded upstream"
    );
}

/// `docs/proxy.md` (Flags): start-up fails when a key or token file cannot
/// be read or is empty, naming the flag. An empty `--signing-key-file`
/// taken as a key would sign with the empty key, which anyone can: every
/// private repository would be open to forged tokens. (Docs audit: only
/// the archiver's start-up failures were tested; the proxy's wiring of
/// the files to the check was not.)
#[test]
fn start_up_fails_on_an_empty_or_unreadable_key_or_token_file_naming_the_flag() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let empty = sandbox.path("empty");
    std::fs::write(&empty, " \n").unwrap();
    let missing = sandbox.path("missing");
    for flag in [
        "--signing-key-file",
        "--upstream-token-file",
        "--prewarm-token-file",
    ] {
        for (what, file) in [("empty", &empty), ("missing", &missing)] {
            let stderr = gitball_e2e::start_refused(
                "gitball-proxy",
                &sandbox.repos(),
                &sandbox.path("cache"),
                &[flag.as_ref(), file.as_os_str()],
            );
            assert!(stderr.contains(flag), "{flag} {what}: {stderr}");
        }
    }
}

/// `docs/proxy.md` (Embedded mode, Signals): in embedded mode SIGHUP has
/// nothing to reload; the process, proxy and in-process archiver, goes on,
/// and a download under way ends whole. `routes_reloads_total` is absent
/// there (`docs/observability.md`). Embedded mode is the one-command mode
/// run from a terminal, whose hangup sends SIGHUP. (Docs audit: SIGHUP was
/// tested on a routed proxy and on an archiver, not in embedded mode.)
#[test]
fn embedded_mode_goes_on_through_a_sighup() {
    let big = big_repo_64();
    let sandbox = Sandbox::new();
    let proxy = Proxy::embedded(&big.repos, &sandbox.path("cache"), &[]);
    let mut download = RawConnection::connect(proxy.addr).unwrap();
    download.send_request("GET", BIG_PATH, &[]).unwrap();
    assert_eq!(download.read_head().unwrap().status, 200);
    let first = download.read_body_bytes(64 * 1024).unwrap().len();
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(SETTLE, || proxy.log().contains("no routes file to reload")),
        "{}",
        proxy.log()
    );
    let mut rest = 0u64;
    let end = download.read_body_to_end(|piece| rest += piece.len() as u64);
    assert_eq!(end, BodyEnd::Complete);
    assert_eq!(first as u64 + rest, big.full_length);
    assert_eq!(fetch(proxy.addr, "/healthz").status(), 200);
    let metrics = proxy.scrape();
    assert!(
        metrics
            .series_of("gitball_proxy_routes_reloads_total")
            .is_empty()
    );
}

/// `docs/proxy.md` (Flags): with `--routes`, the archiver flags the proxy
/// accepts for embedded mode are accepted and ignored, so a proxy host
/// needs no git, no cache dir and none of an archiver's files, and an
/// environment shared with archivers (`GITBALL_CACHE_DIR`, …) does not
/// stop it. (Docs audit: no test gave a proxy with a routing table an
/// archiver flag.)
#[test]
fn with_a_routing_table_the_archiver_flags_are_accepted_and_ignored() {
    let shared = shared_repos();
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&shared.repos, &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let a_file = sandbox.path("a-file");
    std::fs::write(&a_file, "not a directory\n").unwrap();
    let cache_dir = a_file.join("cache");
    let missing = sandbox.path("missing");
    let proxy = Proxy::with_routes(
        &routes,
        &[
            "--git",
            missing.to_str().unwrap(),
            "--cache-dir",
            cache_dir.to_str().unwrap(),
            "--token-file",
            missing.to_str().unwrap(),
            "--cache-max-bytes",
            "1MiB",
            "--max-archive-bytes",
            "1GiB",
            "--max-generations",
            "1",
            "--generation-timeout",
            "0.001",
            "--require-reachable",
            "false",
        ],
    );
    let got = fetch_ok(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(
        got.body.len() as u64,
        tar_length(&shared.widget, "widget-main/", &shared.commits.second)
    );
    assert!(!cache_dir.exists());
}

/// `docs/proxy.md#embedded-mode` and `docs/internal-api.md#embedded-mode`:
/// with `--token-file` alone, the in-process archiver asks for that token
/// and the proxy sends it, so downloads and checksums are served, while the
/// archiver's loopback port turns away whoever lacks it (another user of
/// the host). With `--upstream-token-file` naming the same token, the
/// same. (Docs audit: no test ran embedded mode with a token; had the
/// proxy not sent it, every download would have been a `401`, then a
/// `502` with the one upstream ejected.)
#[test]
fn embedded_mode_sends_the_archivers_token_file_to_its_archiver() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let token = sandbox.path("archiver.token");
    std::fs::write(&token, "the-embedded-token\n").unwrap();
    let same = sandbox.path("same.token");
    std::fs::write(&same, "  the-embedded-token\n").unwrap();
    let token = token.to_str().unwrap();
    let same = same.to_str().unwrap();
    for (what, args) in [
        ("--token-file alone", vec!["--token-file", token]),
        (
            "both, the same token",
            vec!["--token-file", token, "--upstream-token-file", same],
        ),
    ] {
        let proxy = Proxy::embedded(&sandbox.repos(), &sandbox.path(what), &args);
        for path in [
            "/acme/widget/archive/main.tar",
            "/acme/widget/archive/main.tar.gz.sha256",
        ] {
            let answer = fetch(proxy.addr, path);
            assert_eq!(answer.status(), 200, "{what}: {path}: {}", answer.text());
        }
        let archiver = gitball_e2e::listen_address(&proxy.log(), "gitball-archiver serving")
            .unwrap_or_else(|| panic!("{what}: no archiver address:\n{}", proxy.log()));
        let direct = fetch(archiver, "/acme/widget/archive/main.tar");
        assert_eq!(direct.status(), 401, "{what}: {}", direct.text());
        let authorized = fetch_with(
            archiver,
            "GET",
            "/acme/widget/archive/main.tar",
            &[("Authorization", "Bearer the-embedded-token")],
        );
        assert_eq!(authorized.status(), 200, "{what}");
        assert_eq!(
            proxy.scrape().sum(
                "gitball_proxy_upstream_attempts_total",
                &[("outcome", "ok")]
            ),
            2.0,
            "{what}"
        );
    }
}

/// `docs/proxy.md`, "Embedded mode": both ends are one process, so two
/// tokens that differ are refused at start (attack: every download was a
/// 502, then every upstream ejected).
#[test]
fn embedded_mode_refuses_two_different_tokens_at_start() {
    let sandbox = Sandbox::new();
    let (archiver_token, upstream_token) = (sandbox.path("a.token"), sandbox.path("u.token"));
    std::fs::write(&archiver_token, "one-token-for-the-archiver\n").unwrap();
    std::fs::write(&upstream_token, "another-token-sent-to-it\n").unwrap();
    let stderr = gitball_e2e::start_refused(
        "gitball-proxy",
        &sandbox.repos(),
        &sandbox.path("cache"),
        &[
            "--token-file".as_ref(),
            archiver_token.as_os_str(),
            "--upstream-token-file".as_ref(),
            upstream_token.as_os_str(),
        ],
    );
    assert!(stderr.contains("hold different tokens"), "{stderr}");
}

/// `docs/observability.md#process-metrics`: both tiers export every
/// `process_*` series that section names, refreshed on every scrape (so
/// `process_open_fds` follows the fds the service holds now), and
/// `process_virtual_memory_max_bytes` is `0` without an address-space
/// limit. (Mutation review: rendering `/metrics` without refreshing the
/// process series, which then kept their start-up values, passed every
/// test; so would a collector exporting only some of them.)
#[test]
fn both_tiers_export_the_documented_process_series_refreshed_on_every_scrape() {
    const IDLE_CONNECTIONS: usize = 32;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/observability.md");
    let text = std::fs::read_to_string(&path).expect("read docs/observability.md");
    let (_, section) = text
        .split_once("### Process metrics\n")
        .expect("a Process metrics section");
    let section = section.split("\n### ").next().unwrap_or_default();
    let mut documented: Vec<&str> = section
        .split('`')
        .filter(|word| {
            word.starts_with("process_")
                && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .collect();
    documented.sort_unstable();
    documented.dedup();
    assert!(
        documented.len() >= 8,
        "the process series did not parse: {documented:?}"
    );
    let shared = shared_repos();
    let archiver = Archiver::start(&shared.repos, &[]);
    let sandbox = Sandbox::new();
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    // No address-space limit in this test's processes (inherited).
    let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
    let unlimited = limits
        .lines()
        .any(|line| line.starts_with("Max address space") && line.contains("unlimited"));

    for (tier, addr, pid) in [
        ("archiver", archiver.addr, archiver.pid),
        ("proxy", proxy.addr, proxy.pid),
    ] {
        let before = scrape(addr);
        for family in &documented {
            assert!(
                !before.series_of(family).is_empty(),
                "{tier}: no {family} series"
            );
        }
        if unlimited {
            assert_eq!(
                before.value("process_virtual_memory_max_bytes", &[]),
                0.0,
                "{tier}: no address-space limit"
            );
        }
        let open_before = before.value("process_open_fds", &[]);
        // Settled: the scrape's own connection may still be closing.
        let fds_before = settled_fd_count(pid);
        // Idle connections, well within the 10 s a head has to arrive:
        // each holds one accepted socket in the service.
        let idle: Vec<std::net::TcpStream> = (0..IDLE_CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        assert!(
            wait_until(SETTLE, || open_fd_count(pid)
                >= fds_before + IDLE_CONNECTIONS),
            "{tier}: the idle connections were not accepted ({} fds, {fds_before} before)",
            open_fd_count(pid)
        );
        let open_after = scrape(addr).value("process_open_fds", &[]);
        assert!(
            open_after >= open_before + IDLE_CONNECTIONS as f64 - 2.0,
            "{tier}: process_open_fds {open_before} before {IDLE_CONNECTIONS} more \
             connections, {open_after} after"
        );
        drop(idle);
    }
}

/// `docs/observability.md`: `gitball_proxy_upstream_ejected` is `1` while
/// an upstream is ejected, and it and `gitball_proxy_upstream_aborts_total`
/// are made at 0 for every upstream of each routing table loaded. So a
/// reload (SIGHUP) makes the series of an upstream it adds, and leaves an
/// ejected upstream's gauge at `1`. (Mutation review: setting the gauge
/// to 0 on every load, and making no series on a reload, each passed every
/// test; each fails this one.)
#[test]
fn a_reload_makes_the_new_upstreams_series_and_keeps_an_ejection_at_one() {
    let shared = shared_repos();
    let sandbox = Sandbox::new();
    let live = Archiver::start(&shared.repos, &[]);
    let refusing = RefusingPort::new();
    let dead = refusing.url();
    // Never connected to: the requests are all for acme/*.
    let unused = RefusingPort::new();
    let added = unused.url();
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &live.base_url, &[&dead])]);
    // Longer than the test: the ejection cannot end on its own meanwhile.
    let proxy = Proxy::with_routes(&routes, &["--eject-for", "600"]);
    // The replica is tried first, refuses the connection, and is ejected.
    fetch_ok(proxy.addr, "/acme/widget/archive/main.tar");
    let ejected = |metrics: &gitball_e2e::Metrics, upstream: &str| {
        metrics.get("gitball_proxy_upstream_ejected", &[("upstream", upstream)])
    };
    assert_eq!(
        ejected(&proxy.scrape(), &dead),
        Some(1.0),
        "before the reload"
    );
    assert_eq!(ejected(&proxy.scrape(), &added), None, "before the reload");

    write_routes(
        &routes,
        &[
            Route::new("acme/*", &live.base_url, &[&dead]),
            Route::new("*", &added, &[]),
        ],
    );
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(SETTLE, || proxy
            .scrape()
            .value("gitball_proxy_routes_reloads_total", &[("outcome", "ok")])
            == 1.0),
        "no ok reload"
    );
    let metrics = proxy.scrape();
    assert_eq!(
        ejected(&metrics, &dead),
        Some(1.0),
        "the ejected upstream after the reload"
    );
    assert_eq!(ejected(&metrics, &live.base_url), Some(0.0));
    assert_eq!(ejected(&metrics, &added), Some(0.0), "the added upstream");
    for upstream in [&dead, &live.base_url, &added] {
        assert!(
            metrics
                .get(
                    "gitball_proxy_upstream_aborts_total",
                    &[("upstream", upstream)]
                )
                .is_some(),
            "no upstream_aborts_total series for {upstream}"
        );
    }
    // Still tried last: the primary answers at once.
    let attempts_before = metrics.value(
        ATTEMPTS,
        &[("upstream", &dead), ("outcome", "connect_error")],
    );
    fetch_ok(proxy.addr, "/acme/widget/archive/main.tar");
    assert_eq!(
        proxy.scrape().value(
            ATTEMPTS,
            &[("upstream", &dead), ("outcome", "connect_error")]
        ),
        attempts_before,
        "the ejected replica was tried first after the reload"
    );
}

/// Every family `docs/observability.md` documents for the proxy is
/// exported with `# HELP` and its `# TYPE` once its event happened: here a
/// download and a reload. A parked download's resume and a splice are not
/// made here, but their families are made at 0 at start-up
/// (`docs/observability.md#series-at-start-up`), so they are there too.
#[test]
fn metrics_after_a_download_export_every_documented_family_with_help_and_type() {
    let shared = shared_repos();
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&shared.repos, &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    fetch_ok(proxy.addr, "/acme/widget/archive/main.tar");
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(wait_until(SETTLE, || {
        let metrics = proxy.scrape();
        metrics.value("gitball_proxy_routes_reloads_total", &[("outcome", "ok")]) == 1.0
            && metrics.value("gitball_proxy_active_downloads", &[]) == 0.0
    }));
    let metrics = proxy.scrape();
    let families = gitball_e2e::documented_families("### Proxy metrics");
    assert!(
        families.len() >= 18,
        "the table did not parse: {families:?}"
    );
    let mut missing = Vec::new();
    for family in &families {
        let name = family.name.as_str();
        let sample = if family.kind == "histogram" {
            format!("{name}_count")
        } else {
            name.to_owned()
        };
        if metrics.series_of(&sample).is_empty() {
            missing.push(format!("{name}: no series"));
            continue;
        }
        if !metrics.help.contains_key(name) {
            missing.push(format!("{name}: no # HELP"));
        }
        if metrics.types.get(name) != Some(&family.kind) {
            missing.push(format!(
                "{name}: # TYPE {:?}, documented {}",
                metrics.types.get(name),
                family.kind
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    for process in ["process_open_fds", "process_resident_memory_bytes"] {
        assert!(!metrics.series_of(process).is_empty(), "{process}");
    }
}

#[test]
fn embedded_mode_serves_a_work_tree_and_both_tiers_metrics() {
    let sandbox = Sandbox::new();
    let tool = sandbox.source_repo("mytool");
    let commits = small_repository(&tool);
    let proxy = Proxy::embedded(tool.dir(), &sandbox.path("cache"), &[]);

    let got = fetch_ok(proxy.addr, "/local/mytool/archive/HEAD.tar.gz");
    assert_eq!(got.header("x-gitball-commit"), commits.second);
    assert_eq!(
        got.header("content-disposition"),
        format!("attachment; filename=\"mytool-{}.tar.gz\"", commits.second)
    );
    let expected = tool.archive("tar", &format!("mytool-{}/", commits.second), "HEAD", None);
    assert_same_bytes(&gunzip(&got.body), &expected, "embedded HEAD.tar.gz");

    let text = fetch_ok(proxy.addr, "/metrics").text();
    let metrics = gitball_e2e::Metrics::parse(&text);
    for family in [
        "gitball_proxy_requests_total",
        "gitball_proxy_upstream_attempts_total",
        "gitball_proxy_active_downloads",
        "gitball_archiver_requests_total",
        "gitball_archiver_generations_total",
        "gitball_archiver_active_downloads",
        "process_open_fds",
    ] {
        assert!(
            metrics.types.contains_key(family) && !metrics.series_of(family).is_empty(),
            "{family} missing from the embedded proxy's /metrics"
        );
    }
    assert_eq!(
        metrics.sum("gitball_archiver_generations_total", &[("outcome", "ok")]),
        1.0
    );

    let promtool = Command::new("promtool").arg("--version").output();
    if promtool.is_ok_and(|output| output.status.success()) {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin is piped");
            stdin.write_all(text.as_bytes()).expect("write to promtool");
        }
        let output = child.wait_with_output().expect("wait for promtool");
        assert!(
            output.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    } else {
        // `.ci/run` installs it: in CI the check must run.
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is required in CI (.ci/run installs it)"
        );
        eprintln!("promtool not installed: skipping `promtool check metrics`");
    }
}

#[test]
fn upstream_token_is_sent_and_its_absence_never_leaks_a_401() {
    let shared = shared_repos();
    let (repo, commits) = (&shared.widget, &shared.commits);
    let sandbox = Sandbox::new();
    let token_file = sandbox.path("upstream.token");
    std::fs::write(&token_file, "e2e-upstream-token-42\n").expect("write the token");
    let token_arg = token_file.to_str().expect("utf-8 path");
    let archiver = Archiver::start(&shared.repos, &["--token-file", token_arg]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let with_token = Proxy::with_routes(&routes, &["--upstream-token-file", token_arg]);
    let without_token = Proxy::with_routes(&routes, &[]);
    let path = "/acme/widget/archive/main.tar";

    assert_eq!(
        fetch(archiver.addr, path).status(),
        401,
        "the archiver wants the token"
    );
    let expected = repo.archive("tar", "widget-main/", &commits.second, None);
    assert_same_bytes(
        &fetch_ok(with_token.addr, path).body,
        &expected,
        "with the token",
    );

    let refused: Fetched = fetch(without_token.addr, path);
    assert!(
        [502, 503].contains(&refused.status()),
        "without the token: {} {}",
        refused.status(),
        refused.text()
    );
    assert_eq!(refused.head.header("www-authenticate"), None);
    assert!(!refused.text().to_lowercase().contains("unauthorized"));
    assert!(
        without_token.scrape().value(
            ATTEMPTS,
            &[
                ("upstream", &archiver.base_url),
                ("outcome", "unauthorized")
            ]
        ) >= 1.0
    );
    // Proxies are independent: the one with the token is unaffected.
    fetch_ok(with_token.addr, path);
}

/// proxy/src/main.rs: the proxy's jemalloc keeps freed blocks up to
/// 64 KiB in each thread's cache (the upstream read buffer's size), on
/// top of `.cargo/config.toml`'s options. jemalloc says which options it
/// set when asked to confirm them.
#[test]
fn the_proxys_allocator_caches_freed_read_buffers_per_thread() {
    let output = Command::new(gitball_e2e::binary_path("gitball-proxy"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "confirm_conf:true")
        .output()
        .expect("run the proxy");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("Set conf value: tcache_max:65536"),
        "jemalloc said:\n{said}"
    );
    assert!(
        said.contains("Set conf value: background_thread:true"),
        "jemalloc said:\n{said}"
    );
}
