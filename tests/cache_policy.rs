//! End-to-end tests of the archiver cache's replacement policy
//! (`docs/archiver.md#cache-policy`): a scan must not flush the cache.
//! The real binary on 127.0.0.1, real git on repositories built here.
//!
//! The case of issue 9: a 3 MiB cache holds two popular archives; one
//! request for an archive larger than the whole cache used to leave the
//! cache empty (it evicted everything as it grew, then failed as too large
//! anyway). Now it fails without taking the popular archives' room, and a
//! pass over cold archives takes only the room of other cold ones.

use std::time::Duration;

use gitball_e2e::{Archiver, Sandbox, header, pseudo_random_bytes, wait_until};

/// 2024-01-02T03:04:05Z.
const T1: i64 = 1_704_164_645;
const MIB: u64 = 1 << 20;
const KIB: usize = 1 << 10;

struct Site {
    _sandbox: Sandbox,
    archiver: Archiver,
    /// Two archives downloaded several times.
    popular: [String; 2],
    /// One archive larger than the cache.
    huge: String,
    /// Distinct archives requested once each, together larger than the
    /// cache.
    cold: Vec<String>,
}

/// An archiver with a 3 MiB cache (and `extra` flags) over three
/// repositories: `acme/popular` (two commits, ~600 KiB archives),
/// `acme/huge` (a 6 MiB archive) and `acme/cold` (eight commits, ~400 KiB
/// archives). Uncompressed tars: their sizes are their contents'.
fn site(extra: &[&str]) -> Site {
    let sandbox = Sandbox::new();
    let popular = sandbox.repo("acme", "popular");
    let popular: [String; 2] = std::array::from_fn(|n| {
        popular.write("data.bin", pseudo_random_bytes(10 + n as u64, 600 * KIB));
        popular.commit_all(T1 + n as i64 * 60, &format!("popular {n}"))
    });
    let huge = sandbox.repo("acme", "huge");
    huge.write("data.bin", pseudo_random_bytes(20, 6 * MIB as usize));
    let huge = huge.commit_all(T1, "huge");
    let cold_repo = sandbox.repo("acme", "cold");
    let cold = (0..8u64)
        .map(|n| {
            cold_repo.write("data.bin", pseudo_random_bytes(30 + n, 400 * KIB));
            let commit = cold_repo.commit_all(T1 + n as i64 * 60, &format!("cold {n}"));
            format!("/acme/cold/archive/{commit}.tar")
        })
        .collect();
    let mut args = vec!["--cache-max-bytes", "3MiB"];
    args.extend_from_slice(extra);
    let archiver = Archiver::start(&sandbox.repos(), &args);
    Site {
        _sandbox: sandbox,
        archiver,
        popular: popular.map(|commit| format!("/acme/popular/archive/{commit}.tar")),
        huge: format!("/acme/huge/archive/{huge}.tar"),
        cold,
    }
}

/// GETs `path` whole; its `X-Gitball-Cache`.
fn download(archiver: &Archiver, path: &str) -> String {
    let response = archiver.get(path);
    assert_eq!(response.status().as_u16(), 200, "{path}");
    let cache = header(&response, "x-gitball-cache").to_owned();
    let body = response.bytes().unwrap();
    assert!(body.len() > 300 * KIB, "{path}: {} bytes", body.len());
    cache
}

/// Downloads both popular archives three times each: a miss, then hits.
fn make_popular(site: &Site) {
    for path in &site.popular {
        assert_eq!(download(&site.archiver, path), "miss");
        for _ in 0..2 {
            assert_eq!(download(&site.archiver, path), "hit");
        }
    }
}

/// The huge archive is requested once: it fails as too large (an error
/// status, or a body cut short) and leaves nothing of its own behind.
fn request_huge(site: &Site) {
    let response = site.archiver.get(&site.huge);
    if response.status().as_u16() == 200 {
        assert!(
            response.bytes().is_err(),
            "a complete body for {}",
            site.huge
        );
    } else {
        assert_eq!(response.status().as_u16(), 500, "{}", site.huge);
        assert!(response.text().unwrap().contains("archive_too_large"));
    }
    let failed = wait_until(Duration::from_secs(10), || {
        let metrics = site.archiver.metrics();
        metrics.value(
            "gitball_archiver_generations_total",
            &[("format", "tar"), ("outcome", "too_large")],
        ) == 1.0
            && metrics.value("gitball_archiver_generations_in_flight", &[]) == 0.0
    });
    assert!(
        failed,
        "the huge archive's generation did not fail as too large"
    );
    // The outcome is counted just before the partial file is removed and
    // its bytes released.
    let cleaned = wait_until(Duration::from_secs(10), || {
        site.archiver
            .cache_files()
            .iter()
            .all(|name| !name.ends_with(".partial"))
    });
    assert!(cleaned, "its partial file was left behind");
}

fn metric(site: &Site, name: &str) -> f64 {
    site.archiver.metrics().value(name, &[])
}

fn assert_popular_still_hit(site: &Site, after: &str) {
    for path in &site.popular {
        assert_eq!(
            download(&site.archiver, path),
            "hit",
            "{path} after {after}"
        );
    }
}

#[test]
fn an_archive_larger_than_the_cache_does_not_flush_popular_archives() {
    let site = site(&[]);
    make_popular(&site);
    let before = metric(&site, "gitball_archiver_cache_bytes");

    request_huge(&site);

    assert_eq!(metric(&site, "gitball_archiver_cache_evictions_total"), 0.0);
    assert_popular_still_hit(&site, "the huge archive");
    let released = wait_until(Duration::from_secs(10), || {
        metric(&site, "gitball_archiver_cache_bytes") == before
    });
    assert!(released, "cache_bytes is not back to the popular archives'");
    // What the operator sees: the popular archives are protected, and the
    // refusal is counted.
    assert_eq!(
        metric(&site, "gitball_archiver_cache_protected_bytes"),
        before
    );
    assert_eq!(
        metric(&site, "gitball_archiver_cache_admission_rejections_total"),
        1.0
    );
    assert_eq!(metric(&site, "gitball_archiver_cache_held_bytes"), 0.0);
}

/// `--max-archive-bytes` below the cache: the huge archive is stopped by
/// that limit, and on its way there it took no popular archive's room
/// (2 MiB of it and the popular 1.2 MiB do not fit in 3 MiB together).
#[test]
fn an_archive_stopped_by_max_archive_bytes_does_not_flush_popular_archives() {
    let site = site(&["--max-archive-bytes", "2MiB"]);
    make_popular(&site);
    request_huge(&site);
    assert_eq!(metric(&site, "gitball_archiver_cache_evictions_total"), 0.0);
    assert_popular_still_hit(&site, "the huge archive");
}

/// A crawler's pass: eight cold archives, 3.2 MiB together, each requested
/// once. They evict each other, never the popular ones; and the cache stays
/// within its bound throughout.
#[test]
fn a_pass_over_cold_archives_evicts_only_cold_archives() {
    let site = site(&[]);
    make_popular(&site);
    for path in &site.cold {
        assert_eq!(download(&site.archiver, path), "miss", "{path}");
        assert!(metric(&site, "gitball_archiver_cache_bytes") <= (3 * MIB) as f64);
        assert!(site.archiver.cache_dir_bytes() <= 3 * MIB);
    }
    assert_popular_still_hit(&site, "a pass over cold archives");
    assert!(metric(&site, "gitball_archiver_cache_evictions_total") >= 4.0);
    // The newest cold archive is still there; the first went.
    assert_eq!(download(&site.archiver, &site.cold[7]), "hit");
    assert_eq!(download(&site.archiver, &site.cold[0]), "miss");
}

/// A `HEAD` of a cached archive neither counts nor protects it
/// (`docs/archiver.md#cache-policy`): checking before downloading does not
/// make an archive requested once look popular. However often it is
/// checked, it stays in probation, and its next `GET` is the hit that
/// protects it. (Mutation review: a `HEAD` of a hit looked up as a download
/// passed every test.)
#[test]
fn a_head_of_a_cached_archive_neither_counts_nor_protects_it() {
    let site = site(&[]);
    let path = &site.popular[0];
    let head = || {
        let response = site
            .archiver
            .client()
            .head(site.archiver.url(path))
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "HEAD {path}");
        header(&response, "x-gitball-cache").to_owned()
    };
    let protected = || metric(&site, "gitball_archiver_cache_protected_bytes");

    assert_eq!(download(&site.archiver, path), "miss");
    // Indexed once its generation ended, which the download may outrun.
    assert!(
        wait_until(Duration::from_secs(10), || head() == "hit"),
        "{path} was not cached"
    );
    for _ in 0..3 {
        assert_eq!(head(), "hit");
    }
    assert_eq!(protected(), 0.0, "HEADs of {path} protected it");
    assert_eq!(download(&site.archiver, path), "hit");
    assert!(protected() > 0.0, "a GET's hit did not protect {path}");
}
