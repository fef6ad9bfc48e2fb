//! End-to-end tests of what the proxy promises for security
//! (`docs/security.md#what-the-proxy-promises`): the real `gitball-proxy`
//! in front of a real `gitball-archiver`, over repositories built with the
//! real `git`, on 127.0.0.1.
//!
//! - **Cache-Control** reaches a cache in front of the proxy as the archiver
//!   set it, so a commit URL is cached for a year and a branch for a minute.
//!
//! Build the binaries first: `cargo build -p gitball-archiver -p gitball-proxy`.

use gitball_e2e::Sandbox;
use gitball_e2e::proxy::{Cluster, fetch_ok, fetch_with, small_repository};

const BRANCH_CACHE_CONTROL: &str = "public, max-age=60";
const COMMIT_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

// ---------------------------------------------------------------------------
// Cache-Control

#[test]
fn proxy_passes_the_archivers_cache_control() {
    let sandbox = Sandbox::new();
    let commits = small_repository(&sandbox.repo("acme", "widget"));
    let cluster = Cluster::start(&sandbox.repos(), &sandbox.repos(), 0, &[]);
    let cases = [
        (
            "branch",
            "/acme/widget/archive/main.tar".to_owned(),
            BRANCH_CACHE_CONTROL,
        ),
        (
            "tag",
            "/acme/widget/archive/v1.2.3.tar.gz".to_owned(),
            BRANCH_CACHE_CONTROL,
        ),
        (
            "codeload branch",
            "/acme/widget/zip/main".to_owned(),
            BRANCH_CACHE_CONTROL,
        ),
        (
            "commit",
            format!("/acme/widget/archive/{}.tar", commits.second),
            COMMIT_CACHE_CONTROL,
        ),
        (
            "commit, codeload",
            format!("/acme/widget/tar.gz/{}", commits.first),
            COMMIT_CACHE_CONTROL,
        ),
    ];
    for (what, path, expected) in &cases {
        let direct = fetch_ok(cluster.primary.addr, path);
        assert_eq!(
            direct.header("cache-control"),
            *expected,
            "{what}: archiver"
        );
        let proxied = fetch_ok(cluster.proxy.addr, path);
        assert_eq!(
            proxied.header("cache-control"),
            direct.header("cache-control"),
            "{what}: the proxy changed or dropped the archiver's Cache-Control"
        );

        // A revalidation and a HEAD carry it too: a cache refreshes its
        // copy's freshness from them.
        let etag = proxied.header("etag").to_owned();
        let not_modified = fetch_with(cluster.proxy.addr, "GET", path, &[("If-None-Match", &etag)]);
        assert_eq!(not_modified.status(), 304, "{what}");
        assert_eq!(
            not_modified.header("cache-control"),
            *expected,
            "{what}: 304"
        );
        let head = fetch_with(cluster.proxy.addr, "HEAD", path, &[]);
        assert_eq!(head.status(), 200, "{what}");
        assert_eq!(head.header("cache-control"), *expected, "{what}: HEAD");
    }
}
