//! End-to-end tests of the crawler budget (`docs/archiver.md#crawler-budget`,
//! `docs/security.md#client-identity`): the real archiver and proxy, real
//! git, real sockets.
//!
//! Cold keys are cheap to make here: one commit with many small
//! directories, and `?path=dNN` names a distinct archive for each. A test
//! that needs a generation still running when another request arrives uses
//! one large incompressible file at gzip level 9 (seconds of work).
//! Identities other than 127.0.0.1 come from `X-Gitball-Client`, which the
//! archiver believes from a loopback peer, or from `X-Forwarded-For`
//! through a proxy with `--trusted-proxies`; a peer that is not loopback is
//! a client socket bound to this machine's own non-loopback address.
//!
//! Build the binaries first: `cargo build -p gitball-archiver -p gitball-proxy`.

use std::io::Write;
use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use gitball_e2e::proxy::{Proxy, Route, big_repository, write_routes};
use gitball_e2e::{Archiver, RawConnection, Sandbox, wait_until};

const CLIENTS: &str = "gitball_archiver_budget_clients";
const REJECTED: &str = "gitball_archiver_budget_rejected_total";
const TAKEN: &str = "gitball_archiver_budget_taken_total";
const GENERATIONS: &str = "gitball_archiver_generations_total";
const SETTLE: Duration = Duration::from_secs(10);

/// `acme/widget` with 40 directories `d00`…`d39`: 40 distinct cold archives
/// of one commit (`/acme/widget/archive/main.tar?path=dNN`).
fn widget(sandbox: &Sandbox) {
    let repo = sandbox.repo("acme", "widget");
    for index in 0..40 {
        repo.write(&format!("d{index:02}/file.txt"), format!("file {index}\n"));
    }
    repo.commit_all(1_700_000_000, "many directories");
}

fn cold(index: usize) -> String {
    format!("/acme/widget/archive/main.tar?path=d{index:02}")
}

/// One answer: status, `X-Gitball-Cache`, `Retry-After`, JSON error code.
#[derive(Debug)]
struct Answer {
    status: u16,
    cache: String,
    retry_after: Option<u64>,
    code: String,
}

fn answer(response: reqwest::blocking::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let status = response.status().as_u16();
    let cache = header("x-gitball-cache").unwrap_or_default();
    let retry_after = header("retry-after").map(|value| value.parse().expect("whole seconds"));
    let content_type = header("content-type").unwrap_or_default();
    let body = response.bytes().expect("read the body");
    // A `HEAD` has no body to read an error code from.
    let code = if status >= 400 && !body.is_empty() {
        assert_eq!(content_type, "application/json", "an error is JSON");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error body");
        json["error"].as_str().unwrap_or_default().to_owned()
    } else {
        String::new()
    };
    Answer {
        status,
        cache,
        retry_after,
        code,
    }
}

/// `GET base + path` with `headers`, through `client`.
fn get_with(
    client: &reqwest::blocking::Client,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = client.get(format!("{base}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(
        request
            .send()
            .unwrap_or_else(|error| panic!("GET {path}: {error}")),
    )
}

fn get(service: &gitball_e2e::Service, path: &str, headers: &[(&str, &str)]) -> Answer {
    get_with(service.client(), &service.base_url, path, headers)
}

/// `HEAD path`, answered as [`Answer`] (without an error code: no body).
fn head(service: &gitball_e2e::Service, path: &str) -> Answer {
    answer(
        service
            .client()
            .head(service.url(path))
            .send()
            .unwrap_or_else(|error| panic!("HEAD {path}: {error}")),
    )
}

fn assert_rate_limited(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 429, "{what}: {answer:?}");
    assert_eq!(answer.code, "rate_limited", "{what}");
    let retry_after = answer.retry_after.expect("429 carries Retry-After");
    assert!((1..=3600).contains(&retry_after), "{what}: {retry_after}");
}

/// This machine's address on its default route: a peer that is not
/// loopback, though the packets never leave the host.
fn non_loopback_address() -> IpAddr {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket");
    // No packet is sent: connect only chooses the route and source address.
    socket
        .connect("203.0.113.1:9")
        .expect("this test needs a default route (a non-loopback address)");
    let address = socket.local_addr().expect("local address").ip();
    assert!(!address.is_loopback(), "no non-loopback address: {address}");
    address
}

/// A client whose connections come from `address`.
fn client_from(address: IpAddr) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address(address)
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("build a client")
}

#[test]
fn beyond_the_burst_a_cold_request_is_429_with_retry_after_and_starts_nothing() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-rate", "1/h", "--client-cold-burst", "3"],
    );
    for index in 0..3 {
        let answer = get(&archiver, &cold(index), &[]);
        assert_eq!((answer.status, answer.cache.as_str()), (200, "miss"));
    }
    let refused = get(&archiver, &cold(3), &[]);
    assert_rate_limited(&refused, "the fourth cold archive");
    // One token an hour: the next one is most of an hour away.
    assert!(refused.retry_after.unwrap() > 3000, "{refused:?}");
    // A checksum would generate too: refused the same way, for a `HEAD`
    // as well (which generates like a `GET` there).
    assert_rate_limited(
        &get(&archiver, "/acme/widget/archive/main.zip.sha256", &[]),
        "a cold checksum",
    );
    let refused_head = head(&archiver, "/acme/widget/archive/main.zip.sha256");
    assert_eq!(refused_head.status, 429, "a HEAD of a cold checksum");
    assert!(
        refused_head
            .retry_after
            .is_some_and(|seconds| seconds > 3000),
        "{refused_head:?}"
    );
    // A `HEAD` of an archive never generates, so it is never limited
    // (but for a `?path=` not looked for before, whose look takes a token:
    // `a_look_for_a_new_subtree_takes_a_token_and_a_known_one_none`).
    let whole = "/acme/widget/archive/main.tar";
    let peek = head(&archiver, whole);
    assert_eq!(
        (peek.status, peek.cache.as_str()),
        (200, "miss"),
        "{peek:?}"
    );
    // Nor is a `304`: a revalidation generates nothing, so a client whose
    // budget is spent still gets it (docs/archiver.md, "Crawler budget").
    // (Docs audit: no test revalidated with a spent budget.)
    let etag = archiver
        .client()
        .head(archiver.url(whole))
        .send()
        .unwrap()
        .headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let revalidated = get(&archiver, whole, &[("If-None-Match", &etag)]);
    assert_eq!(revalidated.status, 304, "{revalidated:?}");

    let metrics = archiver.metrics();
    assert_eq!(metrics.value(REJECTED, &[]), 3.0);
    assert_eq!(metrics.get("gitball_archiver_budget_burst", &[]), Some(3.0));
    let rate = metrics.get("gitball_archiver_budget_rate", &[]);
    assert!(
        rate.is_some_and(|rate| (rate - 1.0 / 3600.0).abs() < 1e-9),
        "one an hour, in generations per second: {rate:?}"
    );
    assert_eq!(metrics.sum(GENERATIONS, &[]), 3.0, "the refused start none");
    assert_eq!(
        metrics.value(
            "gitball_archiver_requests_total",
            &[("format", "tar"), ("cache", "none"), ("code", "429")]
        ),
        1.0
    );
    assert_eq!(
        archiver.cache_files().len(),
        3,
        "{:?}",
        archiver.cache_files()
    );
}

#[test]
fn hits_and_joins_are_never_limited() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    big_repository(&sandbox.repo("acme", "big"), 16 << 20);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &[
            "--client-cold-rate",
            "1/h",
            "--client-cold-burst",
            "1",
            "--gzip-level",
            "9",
        ],
    );
    let spent = [("X-Gitball-Client", "198.51.100.1")];
    assert_eq!(get(&archiver, &cold(0), &spent).status, 200);
    assert_rate_limited(&get(&archiver, &cold(1), &spent), "budget spent");
    // Hits, again and again.
    for _ in 0..10 {
        let hit = get(&archiver, &cold(0), &spent);
        assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    }
    // A client with a token to spend spends none on hits: the budget is not
    // even asked.
    let taken = archiver.metrics().value(TAKEN, &[]);
    let fresh = [("X-Gitball-Client", "198.51.100.3")];
    for _ in 0..5 {
        let hit = get(&archiver, &cold(0), &fresh);
        assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    }
    assert_eq!(archiver.metrics().value(TAKEN, &[]), taken);
    // A generation another client started: joined, though this client has
    // no token left.
    let big = "/acme/big/archive/main.tar.gz";
    let mut starter = RawConnection::connect(archiver.addr).expect("connect");
    starter
        .send_request("GET", big, &[("X-Gitball-Client", "198.51.100.2")])
        .expect("send");
    let head = starter.read_head().expect("the head of the cold archive");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-gitball-cache"), Some("miss"));
    let mut joiner = RawConnection::connect(archiver.addr).expect("connect");
    joiner.send_request("GET", big, &spent).expect("send");
    let joined = joiner.read_head().expect("the head of the joined archive");
    assert_eq!(joined.status, 200);
    assert_eq!(joined.header("x-gitball-cache"), Some("join"));
    assert_eq!(archiver.metrics().value(REJECTED, &[]), 1.0);
}

/// A `?path=` the archiver has not looked for in its commit is a read of
/// every tree on the path, whose size a push decides: cold work, whatever
/// the answer. It takes a token as a cold generation does (one token for
/// the look and the generation it leads to), `HEAD` and `404` alike; an
/// answer already known, or an archive the cache has, takes none. Before,
/// such looks were free: with a directory of 50,000 entries each
/// `404 path_not_found` cost the archiver 40 ms of CPU (debug build),
/// 23 times an unknown ref's, and four clients asking for names that are
/// not there kept both cores busy without spending a token (attack).
#[test]
fn a_look_for_a_new_subtree_takes_a_token_and_a_known_one_none() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-burst", "3", "--client-cold-rate", "1/h"],
    );
    let path = |name: &str| format!("/acme/widget/archive/main.tar?path={name}");
    // Three looks: a 404, a HEAD (which generates nothing) and a download
    // (one token for its look and its generation).
    assert_eq!(
        get(&archiver, &path("missing1"), &[]).code,
        "path_not_found"
    );
    assert_eq!(head(&archiver, &path("d00")).cache, "miss");
    assert_eq!(get(&archiver, &path("d01"), &[]).cache, "miss");
    assert_eq!(
        archiver.metrics().value(TAKEN, &[]),
        3.0,
        "tokens taken for three looks"
    );
    // The burst is spent: a new look is refused, by GET or HEAD.
    assert_rate_limited(&get(&archiver, &path("missing2"), &[]), "a new look");
    assert_eq!(
        head(&archiver, &path("d02")).status,
        429,
        "a HEAD's new look"
    );
    // What was looked for is answered from what is known, free.
    assert_eq!(
        get(&archiver, &path("missing1"), &[]).code,
        "path_not_found"
    );
    assert_eq!(head(&archiver, &path("d00")).cache, "miss");
    assert_eq!(get(&archiver, &path("d01"), &[]).cache, "hit");
    let metrics = archiver.metrics();
    assert_eq!(metrics.value(TAKEN, &[]), 3.0);
    assert_eq!(metrics.value(REJECTED, &[]), 2.0);
    assert_eq!(metrics.sum(GENERATIONS, &[]), 1.0);
}

/// A commit the archiver has not seen has its changed trees read, to know
/// whether its archive asks for `export-subst` (which keys it by the
/// refs): cold work a push decides the size of, whatever the method, so
/// it takes a token as a cold generation does (one for the reading and the
/// generation it leads to). A commit seen before, or one whose archive the
/// cache has, takes none. Before, a `HEAD` by the id of each commit of a
/// history whose directory of 50,000 entries changed in every commit cost
/// the archiver 42 ms of CPU each (debug build), with no token (attack).
#[test]
fn a_commit_not_seen_before_takes_a_token_to_be_read() {
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    let commits: Vec<String> = (0..3)
        .map(|index| {
            repo.write("file.txt", format!("version {index}\n"));
            repo.commit_all(1_700_000_000 + index, "one more")
        })
        .collect();
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-burst", "2", "--client-cold-rate", "1/h"],
    );
    let by_id = |commit: &str| format!("/acme/widget/archive/{commit}.tar");
    // Read once each: a token each, though HEAD generates nothing.
    for commit in &commits[..2] {
        assert_eq!(head(&archiver, &by_id(commit)).status, 200, "{commit}");
    }
    assert_eq!(archiver.metrics().value(TAKEN, &[]), 2.0);
    let refused = head(&archiver, &by_id(&commits[2]));
    assert_eq!(
        refused.status, 429,
        "a third commit not seen before: {refused:?}"
    );
    // Seen before: free.
    for commit in &commits[..2] {
        assert_eq!(head(&archiver, &by_id(commit)).cache, "miss", "{commit}");
    }
    let metrics = archiver.metrics();
    assert_eq!(metrics.value(TAKEN, &[]), 2.0);
    assert_eq!(metrics.value(REJECTED, &[]), 1.0);
}

#[test]
fn rate_zero_turns_the_budget_off() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-rate", "0", "--client-cold-burst", "1"],
    );
    for index in 0..12 {
        let answer = get(&archiver, &cold(index), &[]);
        assert_eq!((answer.status, answer.cache.as_str()), (200, "miss"));
    }
    let metrics = archiver.metrics();
    assert_eq!(metrics.value(REJECTED, &[]), 0.0);
    // Exported, and zero: no budget (`value` would read a missing series as 0).
    assert_eq!(metrics.get("gitball_archiver_budget_rate", &[]), Some(0.0));
    assert_eq!(metrics.get("gitball_archiver_budget_burst", &[]), Some(0.0));
    assert_eq!(metrics.value(CLIENTS, &[]), 0.0);
}

#[test]
fn identity_header_is_believed_only_from_loopback_or_an_authenticated_peer() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let outside = non_loopback_address();
    let budget = ["--client-cold-rate", "1/h", "--client-cold-burst", "1"];
    let archiver = Archiver::start(&sandbox.repos(), &budget);

    // Loopback peer (a proxy on this host): each named client has its own.
    for (index, client) in ["198.51.100.1", "198.51.100.2"].iter().enumerate() {
        let answer = get(&archiver, &cold(index), &[("X-Gitball-Client", client)]);
        assert_eq!(answer.status, 200, "{client}");
    }
    assert_rate_limited(
        &get(&archiver, &cold(2), &[("X-Gitball-Client", "198.51.100.1")]),
        "198.51.100.1 spent its token",
    );

    // A direct client that is not loopback forges the header: ignored, it
    // spends its own socket address's budget whatever it claims.
    let direct = client_from(outside);
    let base = &archiver.base_url;
    let first = get_with(
        &direct,
        base,
        &cold(3),
        &[("X-Gitball-Client", "198.51.100.3")],
    );
    assert_eq!(first.status, 200, "{first:?}");
    let forged = get_with(
        &direct,
        base,
        &cold(4),
        &[("X-Gitball-Client", "198.51.100.4")],
    );
    assert_rate_limited(&forged, "a forged identity");
    // …and loopback clients are not charged for it.
    let loopback = get(&archiver, &cold(5), &[]);
    assert_eq!(loopback.status, 200, "{loopback:?}");

    // With --token-file, a peer that holds the token is the proxy: believed
    // from any address.
    let token_file = sandbox.path("upstream-token");
    std::fs::write(&token_file, "s3cret-upstream\n").unwrap();
    let mut args = budget.to_vec();
    args.extend(["--token-file", token_file.to_str().unwrap()]);
    let guarded = Archiver::start(&sandbox.repos(), &args);
    let bearer = ("Authorization", "Bearer s3cret-upstream");
    for (index, client) in ["198.51.100.5", "198.51.100.6"].iter().enumerate() {
        let answer = get_with(
            &direct,
            &guarded.base_url,
            &cold(index),
            &[bearer, ("X-Gitball-Client", client)],
        );
        assert_eq!(answer.status, 200, "{client}: {answer:?}");
    }
    let again = get_with(
        &direct,
        &guarded.base_url,
        &cold(2),
        &[bearer, ("X-Gitball-Client", "198.51.100.5")],
    );
    assert_rate_limited(&again, "198.51.100.5 through the authenticated peer");
}

#[test]
fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-rate", "1/h", "--client-cold-burst", "1"],
    );
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);

    // Default: no trusted proxies. Neither X-Forwarded-For nor a forged
    // X-Gitball-Client is believed: every request is 127.0.0.1's.
    let plain = Proxy::with_routes(&routes, &[]);
    let first = get(
        &plain,
        &cold(0),
        &[
            ("X-Forwarded-For", "198.51.100.1"),
            ("X-Gitball-Client", "198.51.100.9"),
        ],
    );
    assert_eq!(first.status, 200, "{first:?}");
    let second = get(
        &plain,
        &cold(1),
        &[
            ("X-Forwarded-For", "198.51.100.2"),
            ("X-Gitball-Client", "198.51.100.10"),
        ],
    );
    assert_rate_limited(&second, "127.0.0.1 again, whatever it claims");

    // nginx in front on 127.0.0.1: its X-Forwarded-For names the client
    // (the entry it appended, the rightmost untrusted one).
    let behind_nginx = Proxy::with_routes(&routes, &["--trusted-proxies", "127.0.0.1/32"]);
    for (index, chain) in ["198.51.100.1", "6.6.6.6, 198.51.100.2"].iter().enumerate() {
        let answer = get(
            &behind_nginx,
            &cold(2 + index),
            &[("X-Forwarded-For", chain)],
        );
        assert_eq!(answer.status, 200, "{chain}: {answer:?}");
    }
    assert_rate_limited(
        &get(
            &behind_nginx,
            &cold(4),
            &[("X-Forwarded-For", "198.51.100.2, 198.51.100.1")],
        ),
        "198.51.100.1 again",
    );
    assert_rate_limited(
        &get(&behind_nginx, &cold(5), &[]),
        "no header: the peer, 127.0.0.1, spent",
    );
}

#[test]
fn tracked_clients_stay_within_their_bound() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--client-cold-max-clients", "8", "--client-cold-burst", "2"],
    );
    assert_eq!(get(&archiver, &cold(0), &[]).status, 200);
    for index in 0..60 {
        let client = format!("198.51.{}.{}", 100 + index / 20, index % 20 + 1);
        // A hit and a cold archive (40 distinct ones) each.
        let hit = get(&archiver, &cold(0), &[("X-Gitball-Client", &client)]);
        assert_eq!(hit.status, 200, "{client}");
        let miss = get(
            &archiver,
            &cold(index % 40),
            &[("X-Gitball-Client", &client)],
        );
        assert_eq!(miss.status, 200, "{client}");
        let tracked = archiver.metrics().value(CLIENTS, &[]);
        assert!(tracked <= 8.0, "{tracked} tracked after {index}");
    }
    let metrics = archiver.metrics();
    assert_eq!(metrics.value(CLIENTS, &[]), 8.0);
    assert_eq!(
        metrics.value("gitball_archiver_budget_max_clients", &[]),
        8.0
    );
}

#[test]
fn embedded_mode_budgets_each_client() {
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let proxy = Proxy::embedded(
        &sandbox.repos(),
        &sandbox.path("cache"),
        &[
            "--client-cold-rate",
            "1/h",
            "--client-cold-burst",
            "1",
            "--trusted-proxies",
            "127.0.0.0/8",
        ],
    );
    let one = [("X-Forwarded-For", "198.51.100.1")];
    assert_eq!(get(&proxy, &cold(0), &one).status, 200);
    assert_rate_limited(&get(&proxy, &cold(1), &one), "embedded, same client");
    let other = get(&proxy, &cold(1), &[("X-Forwarded-For", "198.51.100.2")]);
    assert_eq!((other.status, other.cache.as_str()), (200, "miss"));
    let hit = get(&proxy, &cold(0), &one);
    assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    let metrics = proxy.scrape();
    assert_eq!(metrics.value(REJECTED, &[]), 1.0);
    assert!(wait_until(SETTLE, || proxy.scrape().sum(GENERATIONS, &[]) == 2.0));
}

/// `acme/widget` (see [`widget`]) served by an archiver with `slots`
/// generation slots, `args` and a git that writes nothing until a line is
/// written to the fifo returned beside it (see [`Releases`]).
fn archiver_with_paused_git(
    sandbox: &Sandbox,
    slots: &str,
    args: &[&str],
) -> (Archiver, std::fs::File) {
    widget(sandbox);
    let (git, release) = sandbox.git_that_pauses("git-that-waits", 0);
    let mut all = vec!["--max-generations", slots, "--git", git.to_str().unwrap()];
    all.extend_from_slice(args);
    (Archiver::start(&sandbox.repos(), &all), release)
}

/// The fifo lines a git stub from `git_that_pauses` waits for, one per
/// generation: those not given by [`Releases::one`] are written on drop, so
/// a test that fails while generations wait does not hold its requests
/// until their timeout.
struct Releases<'a> {
    fifo: &'a mut std::fs::File,
    left: usize,
}

impl Releases<'_> {
    fn one(&mut self) {
        self.left -= 1;
        self.fifo
            .write_all(b"go\n")
            .expect("release one generation");
    }
}

impl Drop for Releases<'_> {
    fn drop(&mut self) {
        let _ = self.fifo.write_all(&b"go\n".repeat(self.left));
    }
}

/// `ask(who, client, index)`: asks for cold archive `index` as `client`
/// on a thread of `scope`, and sends `who` and the answer's status to
/// `done` once answered.
fn asker<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    archiver: &'env Archiver,
    done: &std::sync::mpsc::Sender<(&'static str, u16)>,
) -> impl Fn(&'static str, &'static str, usize) + 'scope {
    let done = done.clone();
    move |who, client, index| {
        let done = done.clone();
        scope.spawn(move || {
            let answer = get(archiver, &cold(index), &[("X-Gitball-Client", client)]);
            done.send((who, answer.status)).expect("the test waits");
        });
    }
}

/// No client waits, and five generations ran whole.
fn all_five_ran(archiver: &Archiver) -> bool {
    let metrics = archiver.metrics();
    metrics.value("gitball_archiver_generations_queued_clients", &[]) == 0.0
        && metrics.sum(GENERATIONS, &[("outcome", "ok")]) == 5.0
}

/// One generation running, `generations` queued, for `clients` clients.
fn queue_is(archiver: &Archiver, generations: f64, clients: f64) -> bool {
    let metrics = archiver.metrics();
    metrics.value("gitball_archiver_generations_in_flight", &[]) == 1.0
        && metrics.value("gitball_archiver_generations_queued", &[]) == generations
        && metrics.value("gitball_archiver_generations_queued_clients", &[]) == clients
}

/// The crawler (198.51.100.1) asks for archives 0 to 3 (`ask(who,
/// client, index)`): its first runs while the other three queue.
fn crawler_runs_one_and_queues_three(
    ask: &impl Fn(&'static str, &'static str, usize),
    waiting: &impl Fn(f64, f64) -> bool,
) {
    let crawler = "198.51.100.1";
    ask("crawler 0", crawler, 0);
    assert!(wait_until(SETTLE, || waiting(0.0, 0.0)), "crawler 0 runs");
    for (n, who) in ["crawler 1", "crawler 2", "crawler 3"]
        .into_iter()
        .enumerate()
    {
        ask(who, crawler, n + 1);
        let queued = (n + 1) as f64;
        assert!(wait_until(SETTLE, || waiting(queued, 1.0)), "{who} queued");
    }
}

/// `docs/archiver.md#queue-and-503`: the generation slots go to the waiting
/// clients in turn. One slot, and a git that writes nothing until a line is
/// written to its fifo, so each line ends exactly one generation: the one
/// holding the slot. A crawler runs one generation and queues three more;
/// then one client asks for a new archive, and another joins the crawler's
/// last queued one. First come first served, the crawler's whole queue
/// would run first.
#[test]
fn a_crawlers_queued_burst_does_not_stand_before_other_clients() {
    let sandbox = Sandbox::new();
    let (archiver, mut release) = archiver_with_paused_git(&sandbox, "1", &[]);
    let waiting = |generations: f64, clients: f64| queue_is(&archiver, generations, clients);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let mut release = Releases {
            fifo: &mut release,
            left: 5,
        };
        let ask = asker(scope, &archiver, &done);
        crawler_runs_one_and_queues_three(&ask, &waiting);
        ask("new archive", "198.51.100.2", 10);
        assert!(
            wait_until(SETTLE, || waiting(4.0, 2.0)),
            "a second client waits"
        );
        ask("joins crawler 3", "198.51.100.3", 3);
        assert!(
            wait_until(SETTLE, || waiting(4.0, 3.0)),
            "a third client waits"
        );

        let expected: [&[&str]; 5] = [
            &["crawler 0"],
            // The clients with nothing running go first, in their turn.
            &["new archive"],
            &["crawler 1"],
            &["crawler 3", "joins crawler 3"],
            &["crawler 2"],
        ];
        for group in expected {
            release.one();
            let mut ended: Vec<&str> = (0..group.len())
                .map(|_| {
                    let (who, status) = finished
                        .recv_timeout(SETTLE)
                        .unwrap_or_else(|_| panic!("{group:?} did not end"));
                    assert_eq!(status, 200, "{who}");
                    who
                })
                .collect();
            ended.sort_unstable();
            assert_eq!(ended, group, "the generation that ran next");
        }
    });
    assert!(wait_until(SETTLE, || all_five_ran(&archiver)));
}

/// `docs/archiver.md#queue-and-503`: a client's place for a generation it
/// joined lasts only while its request waits. One slot, and a git that
/// writes nothing until a line is written to its fifo. A crawler runs one
/// generation and queues three more; another client joins the crawler's
/// last queued one, disconnects, then asks for an archive of its own. Its
/// turn runs its own; the crawler's last runs on the crawler's turn, last.
/// (Before, the join's place outlived the request: the crawler's generation
/// ran on the other client's turn, as its running generation, before its
/// own.)
#[test]
fn a_join_that_left_costs_its_client_no_turn() {
    let sandbox = Sandbox::new();
    let (archiver, mut release) = archiver_with_paused_git(&sandbox, "1", &[]);
    let waiting = |generations: f64, clients: f64| queue_is(&archiver, generations, clients);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let mut release = Releases {
            fifo: &mut release,
            left: 5,
        };
        let ask = asker(scope, &archiver, &done);
        let other = "198.51.100.2";
        crawler_runs_one_and_queues_three(&ask, &waiting);
        let mut join = RawConnection::connect(archiver.addr).expect("connect");
        join.send_request("GET", &cold(3), &[("X-Gitball-Client", other)])
            .expect("send the request");
        assert!(
            wait_until(SETTLE, || waiting(3.0, 2.0)),
            "the join waits on its client's turn"
        );
        drop(join);
        let left = || {
            archiver
                .metrics()
                .sum("gitball_archiver_requests_total", &[("code", "499")])
        };
        // Checked after the order, which says what it cost.
        let place_left = wait_until(SETTLE, || left() == 1.0 && waiting(3.0, 1.0));
        ask("own archive", other, 10);
        assert!(
            wait_until(SETTLE, || waiting(4.0, 2.0)),
            "the other client's own archive waits"
        );

        let expected = [
            "crawler 0",
            // The other client has nothing running: its turn is next.
            "own archive",
            "crawler 1",
            "crawler 2",
            "crawler 3",
        ];
        for who in expected {
            release.one();
            let (ended, status) = finished
                .recv_timeout(SETTLE)
                .unwrap_or_else(|_| panic!("{who} did not end"));
            assert_eq!(status, 200, "{ended}");
            assert_eq!(ended, who, "the generation that ran next");
        }
        assert!(
            place_left,
            "the client's place for the crawler's generation outlived its request"
        );
    });
    assert!(wait_until(SETTLE, || all_five_ran(&archiver)));
}

/// `docs/archiver.md#queue-and-503`: a crawler sends a burst of cold
/// requests and disconnects at once. Their generations, still queued, have
/// no request left waiting for them: they leave the queue there and then,
/// and no `git archive` ever runs for them. Another client's cold request
/// then gets the slot next. (Before, each waited its turn and ran whole for
/// no one, in front of the other client's.) One slot, held by a generation
/// whose git waits on a fifo; the stub logs each `git archive` it runs.
#[test]
fn a_crawlers_burst_that_disconnected_leaves_the_queue_and_never_runs() {
    const BURST: usize = 20;
    let sandbox = Sandbox::new();
    widget(&sandbox);
    let runs = sandbox.path("archive-runs");
    let (release_path, mut release) = sandbox.fifo("release");
    let git = sandbox.write_stub(
        "git-that-logs-and-waits",
        &format!(
            "echo \"$*\" >> '{runs}'\nread line < '{release}'\nexec '{git}' \"$@\"\n",
            runs = runs.display(),
            release = release_path.display(),
            git = gitball_e2e::real_git().display(),
        ),
    );
    let archiver = Archiver::start(
        &sandbox.repos(),
        &["--max-generations", "1", "--git", git.to_str().unwrap()],
    );
    let gauges = || {
        let metrics = archiver.metrics();
        (
            metrics.value("gitball_archiver_generations_in_flight", &[]),
            metrics.value("gitball_archiver_generations_queued", &[]),
            metrics.value("gitball_archiver_generations_queued_clients", &[]),
        )
    };
    let abandoned = || {
        archiver
            .metrics()
            .value("gitball_archiver_generations_abandoned_total", &[])
    };
    let archive_runs = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(abandoned(), 0.0, "made at 0 at start-up");
    std::thread::scope(|scope| {
        let mut release = Releases {
            fifo: &mut release,
            left: 2,
        };
        let ask = |client: &'static str, index: usize| {
            let archiver = &archiver;
            scope.spawn(move || get(archiver, &cold(index), &[("X-Gitball-Client", client)]))
        };
        let holder = ask("198.51.100.9", 0);
        assert!(
            wait_until(SETTLE, || gauges() == (1.0, 0.0, 0.0)),
            "the first generation holds the slot: {:?}",
            gauges()
        );

        let crawler: Vec<RawConnection> = (1..=BURST)
            .map(|index| {
                let mut connection = RawConnection::connect(archiver.addr).expect("connect");
                connection
                    .send_request("GET", &cold(index), &[("X-Gitball-Client", "198.51.100.1")])
                    .expect("send the request");
                connection
            })
            .collect();
        assert!(
            wait_until(SETTLE, || gauges() == (1.0, BURST as f64, 1.0)),
            "the crawler's burst is queued: {:?}",
            gauges()
        );
        drop(crawler);
        let mut seen = (gauges(), abandoned());
        let left = wait_until(SETTLE, || {
            seen = (gauges(), abandoned());
            seen == ((1.0, 0.0, 0.0), BURST as f64)
        });
        assert!(
            left,
            "((in flight, queued, clients queued), abandoned) {seen:?}: the generations of \
             the requests that left still wait for the slot"
        );

        let other = ask("198.51.100.2", 30);
        assert!(
            wait_until(SETTLE, || gauges() == (1.0, 1.0, 1.0)),
            "the other client's generation waits: {:?}",
            gauges()
        );
        release.one();
        assert_eq!(holder.join().expect("answered").status, 200);
        // The slot's next generation is the other client's.
        assert!(
            wait_until(SETTLE, || archive_runs().len() == 2),
            "{:?}",
            archive_runs()
        );
        release.one();
        assert_eq!(other.join().expect("answered").status, 200);
    });
    let runs = archive_runs();
    assert_eq!(runs.len(), 2, "git archive ran for: {runs:?}");
    assert!(runs[0].ends_with("-- d00"), "{runs:?}");
    assert!(runs[1].ends_with("-- d30"), "{runs:?}");
    let metrics = archiver.metrics();
    assert_eq!(metrics.sum(GENERATIONS, &[]), 2.0);
    assert_eq!(
        metrics.value("gitball_archiver_generations_abandoned_total", &[]),
        BURST as f64
    );
    assert_eq!(
        metrics.sum("gitball_archiver_requests_total", &[("code", "499")]),
        BURST as f64,
        "every crawler request was seen to leave"
    );
    let partials: Vec<String> = archiver
        .cache_files()
        .into_iter()
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(partials.is_empty(), "{partials:?}");
    assert_eq!(
        archiver.cache_files().len(),
        2,
        "{:?}",
        archiver.cache_files()
    );
}

/// `docs/archiver.md#queue-and-503`: with two slots or more, one client
/// never runs in all of them; a slot stays for another client's cold
/// request, which would otherwise wait for the end of a generation already
/// running (past `--queue-timeout` when those are long).
#[test]
fn one_client_never_takes_every_generation_slot() {
    let sandbox = Sandbox::new();
    let (archiver, mut release) = archiver_with_paused_git(&sandbox, "2", &[]);
    let gauges = || {
        let metrics = archiver.metrics();
        (
            metrics.value("gitball_archiver_generations_in_flight", &[]),
            metrics.value("gitball_archiver_generations_queued", &[]),
        )
    };
    std::thread::scope(|scope| {
        let ask = |client: &'static str, index: usize| {
            let archiver = &archiver;
            scope.spawn(move || {
                let answer = get(archiver, &cold(index), &[("X-Gitball-Client", client)]);
                assert_eq!(answer.status, 200, "{client} {index}");
            })
        };
        let crawler = [ask("198.51.100.1", 0), ask("198.51.100.1", 1)];
        // One runs; the other waits, a slot free.
        let crawler_waits = wait_until(SETTLE, || gauges() == (1.0, 1.0));
        let crawler_gauges = gauges();
        let other = ask("198.51.100.2", 2);
        let other_runs = wait_until(SETTLE, || gauges() == (2.0, 1.0));
        // The generations end before any assertion, or the requests would
        // hold the test.
        release
            .write_all(b"go\ngo\ngo\n")
            .expect("release the generations");
        for asked in crawler.into_iter().chain([other]) {
            asked.join().expect("answered 200");
        }
        assert!(
            crawler_waits,
            "(running, queued) {crawler_gauges:?}: the crawler took both slots"
        );
        assert!(other_runs, "the other client's generation waits");
    });
    assert!(wait_until(SETTLE, || gauges() == (0.0, 0.0)));
}

/// `docs/internal-api.md#client-identity`: a prewarm admitted by the prewarm
/// token alone is not a proxy's request, so its `X-Gitball-Client` is not
/// believed: its generations queue as its socket peer, not as the client it
/// names (whose own requests would then wait behind them).
#[test]
fn a_prewarm_queues_as_its_sender_whatever_client_it_names() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.path("upstream-token");
    std::fs::write(&upstream, "s3cret-upstream\n").unwrap();
    let prewarm = sandbox.path("prewarm-token");
    std::fs::write(&prewarm, "s3cret-prewarm\n").unwrap();
    let (archiver, mut release) = archiver_with_paused_git(
        &sandbox,
        "1",
        &[
            "--token-file",
            upstream.to_str().unwrap(),
            "--prewarm-token-file",
            prewarm.to_str().unwrap(),
        ],
    );
    let direct = client_from(non_loopback_address());
    let named = ("X-Gitball-Client", "198.51.100.1");
    let accepted = direct
        .post(format!(
            "{}/acme/widget/prewarm/main?format=tar,zip",
            archiver.base_url
        ))
        .header("Authorization", "Bearer s3cret-prewarm")
        .header(named.0, named.1)
        .send()
        .expect("prewarm");
    assert_eq!(accepted.status(), 202);
    let metrics = || archiver.metrics();
    let queued = |metrics: gitball_e2e::Metrics| {
        (
            metrics.value("gitball_archiver_generations_queued", &[]),
            metrics.value("gitball_archiver_generations_queued_clients", &[]),
        )
    };
    std::thread::scope(|scope| {
        // The client it named, through a proxy (the upstream token).
        let download = scope.spawn(|| {
            get_with(
                &direct,
                &archiver.base_url,
                &cold(0),
                &[("Authorization", "Bearer s3cret-upstream"), named],
            )
        });
        let both_queued = wait_until(SETTLE, || queued(metrics()).0 == 2.0);
        let seen = queued(metrics());
        release
            .write_all(b"go\ngo\ngo\n")
            .expect("release the generations");
        assert_eq!(download.join().expect("answered").status, 200);
        assert!(both_queued, "{seen:?}");
        assert_eq!(seen.1, 2.0, "the prewarm queued as the client it named");
    });
}

/// `docs/archiver.md#queue-and-503`: a `HEAD` of a queued generation waits
/// for it like a `GET` that joins it, on its own client's turn too.
#[test]
fn a_head_of_a_queued_generation_waits_on_its_own_turn() {
    let sandbox = Sandbox::new();
    let (archiver, mut release) = archiver_with_paused_git(&sandbox, "1", &[]);
    let clients_waiting = || {
        archiver
            .metrics()
            .value("gitball_archiver_generations_queued_clients", &[])
    };
    std::thread::scope(|scope| {
        // One runs, then one queues: in that order.
        let in_flight = || {
            archiver
                .metrics()
                .value("gitball_archiver_generations_in_flight", &[])
        };
        let ask = |index: usize| {
            let archiver = &archiver;
            scope.spawn(move || {
                get(
                    archiver,
                    &cold(index),
                    &[("X-Gitball-Client", "198.51.100.1")],
                )
            })
        };
        let first = ask(0);
        let first_runs = wait_until(SETTLE, || in_flight() == 1.0);
        let crawler = [first, ask(1)];
        let crawler_waits = wait_until(SETTLE, || clients_waiting() == 1.0);
        let head = scope.spawn(|| {
            archiver
                .client()
                .head(format!("{}{}", archiver.base_url, cold(1)))
                .header("X-Gitball-Client", "198.51.100.2")
                .send()
                .expect("HEAD")
                .status()
        });
        let head_waits = wait_until(SETTLE, || clients_waiting() == 2.0);
        release
            .write_all(b"go\ngo\n")
            .expect("release the generations");
        for asked in crawler {
            assert_eq!(asked.join().expect("answered").status, 200);
        }
        assert_eq!(head.join().expect("answered"), 200);
        assert!(
            first_runs && crawler_waits && head_waits,
            "{first_runs} {crawler_waits} {head_waits}"
        );
    });
}
