//! End-to-end tests of the request log (`docs/observability.md#request-log`):
//! both tiers write one record per request with the same fields, and a
//! request whose client leaves before its answer is logged and counted as
//! `499` — on the archiver too, where a request can wait a long time for a
//! generation slot.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::Duration;

use gitball_e2e::proxy::{Cluster, Proxy, big_repository, fetch, fetch_with, small_repository};
use gitball_e2e::{
    Archiver, RawConnection, Sandbox, line_for, request_lines, wait_for_line, wait_until,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The fields of a line, less the ones the JSON formatter adds.
fn field_names(line: &Value) -> BTreeSet<String> {
    line.as_object()
        .expect("a JSON object")
        .keys()
        .filter(|key| !matches!(key.as_str(), "timestamp" | "level" | "target"))
        .cloned()
        .collect()
}

#[test]
fn both_tiers_log_the_same_fields_joined_by_request_id() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let cache = sandbox.path("cache");
    let proxy = Proxy::embedded(&sandbox.repos(), &cache, &[]);
    fetch_ok_with_id(&proxy, "/acme/widget/archive/main.tar.gz", "join-me-1");
    let missing = fetch_with(
        proxy.addr,
        "GET",
        "/acme/widget/archive/nope.tar",
        &[("X-Request-Id", "join-me-2")],
    );
    assert_eq!(missing.status(), 404);
    let bad = fetch_with(
        proxy.addr,
        "GET",
        "/acme/widget/archive/main.rar",
        &[("X-Request-Id", "join-me-3")],
    );
    assert_eq!(bad.status(), 400);

    let lines = wait_for_lines(&proxy, &["join-me-1", "join-me-2", "join-me-3"], 5);
    let proxy_line = find(&lines, "proxy", "join-me-1");
    let archiver_line = find(&lines, "archiver", "join-me-1");
    assert_eq!(
        field_names(&proxy_line),
        field_names(&archiver_line),
        "the two tiers' records differ: {proxy_line}\n{archiver_line}"
    );
    for field in [
        "tier",
        "request_id",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "ending",
        "fault",
        "error",
        "cache",
        "commit",
        "format",
        "upstream",
        "attempts",
    ] {
        assert!(
            proxy_line.get(field).is_some(),
            "no {field} in {proxy_line}"
        );
    }
    assert_eq!(proxy_line["status"], 200);
    assert_eq!(proxy_line["ending"], "complete");
    assert_eq!(archiver_line["ending"], "complete");
    assert_eq!(archiver_line["cache"], "miss");
    assert_eq!(archiver_line["format"], "tar.gz");
    assert_eq!(proxy_line["bytes"], archiver_line["bytes"]);
    assert_eq!(proxy_line["attempts"], "1");
    assert_eq!(archiver_line["upstream"], "-");

    // An error: both tiers say whose fault it is; the archiver, which
    // answered it, gives the code, and the proxy, which passed it on, none
    // (docs/observability.md, the `error` field).
    let proxy_error = find(&lines, "proxy", "join-me-2");
    let archiver_error = find(&lines, "archiver", "join-me-2");
    assert_eq!(archiver_error["status"], 404);
    assert_eq!(archiver_error["fault"], "client");
    assert_eq!(archiver_error["error"], "ref_not_found");
    assert_eq!(proxy_error["status"], 404);
    assert_eq!(field_names(&proxy_error), field_names(&proxy_line));
    // A 4xx passed on is the client's fault on the proxy too (review:
    // attack; it said `-`), and a JSON body a tier wrote is counted in
    // `bytes` like an archive's (it said 0).
    assert_eq!(proxy_error["fault"], "client", "{proxy_error}");
    assert_eq!(proxy_error["error"], "", "{proxy_error}");
    let length = missing.body.len() as u64;
    assert_eq!(archiver_error["bytes"], length, "{archiver_error}");
    assert_eq!(proxy_error["bytes"], length, "{proxy_error}");
    let refused = find(&lines, "proxy", "join-me-3");
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["fault"], "client");
    assert_eq!(refused["bytes"], bad.body.len() as u64, "{refused}");
}

/// A line's level follows its fault and ending (docs/observability.md,
/// "Request log"): `error` for an internal fault, `warn` for an upstream
/// one (or an ending other than `complete`), `info` otherwise, a client's
/// 4xx included.
#[test]
fn the_level_is_the_faults() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let cache = sandbox.path("cache");
    // Level-4's `git archive` (its prefix is `widget-1.2.3/`) runs the real
    // git, then exits with the status the test writes on a fifo: its
    // tar.gz fails only once its head reached the client. (It was a zip cut
    // by the bound with its second entry; on a loaded host the bound could
    // be passed before the answer began, a `500`: seen once in a full run.)
    // The others run git alone: a stub that outlived its git would hold
    // the pipe, and the archiver reads git's output to its end.
    let (release, mut exit_with) = sandbox.fifo("release");
    let stub = sandbox.write_stub(
        "level-4-exits-as-told",
        &format!(
            "case \" $* \" in\n\
             *' --prefix=widget-1.2.3/ '*) '{git}' \"$@\" || exit $?\n\
             read code < '{release}'\n\
             exit $code ;;\n\
             esac\n\
             exec '{git}' \"$@\"\n",
            git = gitball_e2e::real_git().display(),
            release = release.display()
        ),
    );
    // The whole tree's archives are over the bound, the `docs` subtree's
    // tar.gz (of one 10 KiB tar record, most of it zeros) is not. The tar
    // passes it with git's first write, before the answer began (`500`).
    let proxy = Proxy::embedded(
        &sandbox.repos(),
        &cache,
        &[
            "--max-archive-bytes",
            "2KiB",
            "--git",
            stub.to_str().unwrap(),
        ],
    );
    let cases = [
        ("/acme/widget/archive/main.tar.gz?path=docs", 200, "level-1"),
        ("/acme/widget/archive/nope.tar", 404, "level-2"),
        ("/acme/widget/archive/main.tar", 500, "level-3"),
    ];
    for (target, status, id) in cases {
        let fetched = fetch_with(proxy.addr, "GET", target, &[("X-Request-Id", id)]);
        assert_eq!(fetched.status(), status, "{target}: {}", fetched.text());
    }
    // A tar.gz's head goes out before git runs; its git then fails.
    let mut failing = RawConnection::connect(proxy.addr).expect("connect");
    failing
        .send_request(
            "GET",
            "/acme/widget/archive/v1.2.3.tar.gz?path=docs",
            &[("X-Request-Id", "level-4")],
        )
        .expect("send");
    assert_eq!(failing.read_head().expect("level-4's head").status, 200);
    writeln!(exit_with, "1").expect("level-4's status");
    let end = failing.read_body_to_end(|_| {});
    assert!(
        matches!(end, gitball_e2e::BodyEnd::Aborted(_)),
        "level-4: {end:?}"
    );
    let lines = wait_for_lines(&proxy, &["level-1", "level-2", "level-3", "level-4"], 8);
    let level = |tier: &str, id: &str| {
        let line = find(&lines, tier, id);
        (
            line["level"].as_str().unwrap_or_default().to_owned(),
            line["fault"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let expected = [
        ("archiver", "level-1", "INFO", "-"),
        ("proxy", "level-1", "INFO", "-"),
        ("archiver", "level-2", "INFO", "client"),
        ("proxy", "level-2", "INFO", "client"),
        ("archiver", "level-3", "ERROR", "internal"),
        ("proxy", "level-3", "WARN", "upstream"),
        ("archiver", "level-4", "ERROR", "internal"),
        ("proxy", "level-4", "WARN", "upstream"),
    ];
    assert_eq!(find(&lines, "proxy", "level-4")["ending"], "aborted");
    for (tier, id, want_level, want_fault) in expected {
        assert_eq!(
            level(tier, id),
            (want_level.to_owned(), want_fault.to_owned()),
            "{tier} {id}: {}",
            find(&lines, tier, id)
        );
    }
}

fn fetch_ok_with_id(proxy: &Proxy, target: &str, request_id: &str) {
    let fetched = fetch_with(proxy.addr, "GET", target, &[("X-Request-Id", request_id)]);
    assert_eq!(fetched.status(), 200, "{target}: {}", fetched.text());
}

fn wait_for_lines(proxy: &Proxy, ids: &[&str], count: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    let found = wait_until(WAIT, || {
        lines = request_lines(&proxy.log())
            .into_iter()
            .filter(|line| ids.iter().any(|id| line["request_id"] == *id))
            .collect();
        lines.len() >= count
    });
    assert!(found, "expected {count} request lines:\n{}", proxy.log());
    lines
}

fn find(lines: &[Value], tier: &str, request_id: &str) -> Value {
    lines
        .iter()
        .find(|line| line["tier"] == tier && line["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no {tier} line for {request_id} in {lines:?}"))
        .clone()
}

/// A client that gives up while its request waits for a generation slot
/// is logged (`499`, `client_gone`) and counted in `requests_total`.
#[test]
fn archiver_logs_and_counts_a_client_that_leaves_while_queued() {
    let sandbox = Sandbox::new();
    big_repository(&sandbox.repo("acme", "big"), 32 << 20);
    let archiver = Archiver::start(
        &sandbox.repos(),
        // zstd at level 19 on 32 MiB of random bytes keeps the only slot
        // busy for far longer than this test.
        &[
            "--zstd-level",
            "19",
            "--max-generations",
            "1",
            "--queue-timeout",
            "120",
        ],
    );
    {
        let mut slow = RawConnection::connect(archiver.addr).unwrap();
        slow.send_request("GET", "/acme/big/archive/main.tar.zst", &[])
            .unwrap();
        assert_eq!(slow.read_head().unwrap().status, 200);
    }
    let mut leaver = RawConnection::connect(archiver.addr).unwrap();
    leaver
        .send_request(
            "GET",
            "/acme/big/archive/main.tar",
            &[("X-Request-Id", "leaves-while-queued")],
        )
        .unwrap();
    assert!(
        wait_until(WAIT, || archiver
            .metrics()
            .get("gitball_archiver_generations_queued", &[])
            == Some(1.0)),
        "the second generation never queued:\n{}",
        archiver.log()
    );
    drop(leaver);

    let line = wait_for_line(WAIT, || archiver.log(), "leaves-while-queued");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["ending"], "client_gone", "{line}");
    assert_eq!(line["tier"], "archiver");
    assert_eq!(line["format"], "tar");
    assert_eq!(line["cache"], "miss");
    let metrics = archiver.metrics();
    assert_eq!(
        metrics.value(
            "gitball_archiver_requests_total",
            &[("code", "499"), ("format", "tar"), ("cache", "miss")]
        ),
        1.0
    );
    assert!(metrics.value("gitball_archiver_client_disconnects_total", &[]) >= 1.0);
}

/// A download the server cuts when its `--shutdown-grace` runs out is
/// logged `shutdown`, on both tiers, not as a client that left.
#[test]
fn downloads_cut_when_the_shutdown_grace_runs_out_are_logged_shutdown() {
    let sandbox = Sandbox::new();
    big_repository(&sandbox.repo("acme", "big"), 32 << 20);
    let mut archiver = Archiver::start(&sandbox.repos(), &["--shutdown-grace", "1"]);
    let mut proxy = Proxy::embedded(
        &sandbox.repos(),
        &sandbox.path("embedded-cache"),
        &["--shutdown-grace", "1"],
    );
    // Each client takes the head and a little, then nothing.
    let mut stalled = Vec::new();
    for (addr, id) in [
        (archiver.addr, "cut-on-archiver"),
        (proxy.addr, "cut-on-proxy"),
    ] {
        let mut client = RawConnection::connect(addr).unwrap();
        client
            .send_request("GET", "/acme/big/archive/main.tar", &[("X-Request-Id", id)])
            .unwrap();
        assert_eq!(client.read_head().unwrap().status, 200);
        client.read_body_bytes(64 << 10).unwrap();
        stalled.push(client);
    }
    let (status, _) = archiver.terminate(Duration::from_secs(20));
    assert!(status.is_some(), "the archiver did not exit");
    let (status, _) = proxy.terminate(Duration::from_secs(20));
    assert!(status.is_some(), "the proxy did not exit");
    for (log, tier, id) in [
        (archiver.log(), "archiver", "cut-on-archiver"),
        (proxy.log(), "proxy", "cut-on-proxy"),
        (proxy.log(), "archiver", "cut-on-proxy"),
    ] {
        let line = request_lines(&log)
            .into_iter()
            .find(|line| line["tier"] == tier && line["request_id"] == id)
            .unwrap_or_else(|| panic!("no {tier} line for {id}:\n{log}"));
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["ending"], "shutdown", "{line}");
    }
    drop(stalled);
}

/// A client that leaves while the proxy's attempt is in flight (the
/// archiver's git writes nothing, so no head comes): the proxy's line names
/// the attempt, which the archiver's own line for the same request id shows
/// was made, and the attempt is counted with the outcome `client_gone`
/// (docs/observability.md; review: attack: the line said `attempts` 0 and
/// `upstream` `-`, and the attempt was counted nowhere).
#[test]
fn a_client_leaving_mid_attempt_is_logged_and_counted_with_the_attempt() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let (git, mut release) = sandbox.git_that_pauses("git-that-waits", 0);
    let archiver = Archiver::start(&sandbox.repos(), &["--git", git.to_str().unwrap()]);
    let cluster = Cluster::around(archiver, Vec::new(), &[]);
    let upstream = cluster.primary.base_url.clone();

    let mut client = std::net::TcpStream::connect(cluster.proxy.addr).unwrap();
    client
        .write_all(
            b"GET /acme/widget/archive/main.tar HTTP/1.1\r\nHost: x\r\n\
              X-Request-Id: leaves-mid-attempt\r\n\r\n",
        )
        .unwrap();
    assert!(
        wait_until(WAIT, || cluster
            .primary
            .metrics()
            .value("gitball_archiver_generations_in_flight", &[])
            == 1.0),
        "the archiver never started the generation:\n{}",
        cluster.primary.log()
    );
    // Half-closed, as a client that sent its request and left does.
    client.shutdown(std::net::Shutdown::Write).unwrap();

    let mut line = None;
    assert!(
        wait_until(WAIT, || {
            line = request_lines(&cluster.proxy.log())
                .into_iter()
                .find(|line| line["request_id"] == "leaves-mid-attempt");
            line.is_some()
        }),
        "no proxy line:\n{}",
        cluster.proxy.log()
    );
    let line = line.unwrap();
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["ending"], "client_gone", "{line}");
    assert_eq!(line["upstream"], upstream.as_str(), "{line}");
    assert_eq!(line["attempts"], "1", "{line}");
    let attempts = |outcome: &str| {
        cluster.proxy.scrape().value(
            "gitball_proxy_upstream_attempts_total",
            &[("upstream", upstream.as_str()), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("client_gone"), 1.0);
    // The archiver's line for the same request: the attempt was made.
    release.write_all(b"go\n").unwrap();
    assert!(
        wait_until(WAIT, || line_for(
            &cluster.primary.log(),
            "leaves-mid-attempt"
        )
        .is_some()),
        "no archiver line:\n{}",
        cluster.primary.log()
    );
    // Not ejected: the client's leaving says nothing of the archiver.
    assert_eq!(
        cluster.proxy.scrape().value(
            "gitball_proxy_upstream_ejected",
            &[("upstream", upstream.as_str())]
        ),
        0.0
    );
}

/// Every request a tier logs is in its `request_duration_seconds`, with the
/// duration its line gives (docs/observability.md, "Request log": one value
/// decides both), and that duration runs to the end of the body: a client
/// that holds its download for a second is timed with that second on both
/// tiers, not up to its head (mutation review: a histogram recording 0
/// passed every test).
#[test]
fn each_tier_times_every_logged_request_to_the_end_of_its_body() {
    const HOLD: Duration = Duration::from_secs(1);
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // Far more than the kernel buffers between the tiers and the client
    // hold (a few hundred KiB each way, under TCP_NOTSENT_LOWAT): the last
    // bytes leave each tier only after the client read again.
    big_repository(&sandbox.repo("acme", "big"), 16 << 20);
    let cluster = Cluster::around(Archiver::start(&sandbox.repos(), &[]), vec![], &[]);
    let proxy = &cluster.proxy;
    for (path, status) in [
        ("/acme/widget/archive/main.tar.gz", 200),
        ("/acme/widget/archive/main.tar.gz", 200),
        ("/acme/widget/archive/nope.tar", 404),
        ("/acme/widget/archive/main.rar", 400),
    ] {
        assert_eq!(fetch(proxy.addr, path).status(), status, "{path}");
    }
    let mut held = RawConnection::connect(proxy.addr).unwrap();
    held.send_request(
        "GET",
        "/acme/big/archive/main.tar",
        &[("X-Request-Id", "held-for-a-second")],
    )
    .unwrap();
    assert_eq!(held.read_head().unwrap().status, 200);
    // The client's own pause, which the durations must cover.
    std::thread::sleep(HOLD);
    assert!(matches!(
        held.read_body_to_end(|_| {}),
        gitball_e2e::BodyEnd::Complete
    ));

    // Each line is written as its request is timed, so the logs are read
    // once both tiers wrote the held download's, and the metrics after.
    wait_for_line(WAIT, || proxy.log(), "held-for-a-second");
    wait_for_line(WAIT, || cluster.primary.log(), "held-for-a-second");
    let logs = [proxy.log(), cluster.primary.log()];
    let scrapes = [proxy.scrape(), cluster.primary.metrics()];
    for ((tier, histogram), (log, metrics)) in [
        ("proxy", "gitball_proxy_request_duration_seconds"),
        ("archiver", "gitball_archiver_request_duration_seconds"),
    ]
    .into_iter()
    .zip(logs.iter().zip(&scrapes))
    {
        let held_line = line_for(log, "held-for-a-second").unwrap();
        let held_ms = held_line["duration_ms"].as_f64().unwrap();
        assert!(held_ms >= HOLD.as_secs_f64() * 1e3, "{tier}: {held_line}");
        let lines = request_lines(log);
        let logged: f64 = lines
            .iter()
            .map(|line| line["duration_ms"].as_f64().unwrap() / 1e3)
            .sum();
        assert_eq!(
            metrics.value(&format!("{histogram}_count"), &[]),
            lines.len() as f64,
            "{tier}: requests logged and timed"
        );
        // Lines give microseconds, rounded.
        let timed = metrics.value(&format!("{histogram}_sum"), &[]);
        assert!(
            (timed - logged).abs() <= 1e-6 * lines.len() as f64 + 1e-9,
            "{tier}: {timed} s timed, {logged} s logged"
        );
    }
}

/// `docs/http.md#health-and-metrics` and `docs/observability.md#request-log`:
/// `/healthz` and `/metrics` (`GET`, `HEAD`, and the `405` of any other
/// method), on `--listen` and on the admin listener, are neither logged nor
/// counted as requests, on either tier: a probe every second would
/// otherwise fill the log and drown the archive requests in
/// `requests_total` and its error ratios. (Docs audit: no test looked for
/// their absence.)
#[test]
fn probes_and_scrapes_are_neither_logged_nor_counted() {
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let admin = ["--admin-listen", "127.0.0.1:0"];
    let cluster = Cluster::around(Archiver::start(&sandbox.repos(), &admin), vec![], &admin);
    let proxy = &cluster.proxy;
    let archiver = &cluster.primary;
    let request = |addr, method: &str, target: &str, id: &str| {
        RawConnection::request(addr, method, target, &[("X-Request-Id", id)])
            .unwrap()
            .0
            .status
    };
    assert_eq!(
        request(
            proxy.addr,
            "GET",
            "/acme/widget/archive/main.tar",
            "a-download"
        ),
        200
    );
    for (tier, service) in [("archiver", &**archiver), ("proxy", &**proxy)] {
        let admin = gitball_e2e::listen_address(&service.log(), "admin listener serving")
            .unwrap_or_else(|| panic!("{tier}: no admin listener:\n{}", service.log()));
        for addr in [service.addr, admin] {
            for (method, target, status) in [
                ("GET", "/healthz", 200),
                ("HEAD", "/healthz", 200),
                ("GET", "/metrics", 200),
                ("HEAD", "/metrics", 200),
                ("POST", "/healthz", 405),
                ("DELETE", "/metrics", 405),
            ] {
                assert_eq!(
                    request(addr, method, target, "a-probe"),
                    status,
                    "{tier} {addr}: {method} {target}"
                );
            }
        }
    }
    // A line is written before its answer leaves: once this request's
    // lines are there, a probe's would be too.
    assert_eq!(
        request(
            proxy.addr,
            "GET",
            "/acme/widget/archive/nope.tar",
            "after-the-probes"
        ),
        404
    );
    for (tier, service, family) in [
        ("archiver", &**archiver, "gitball_archiver"),
        ("proxy", &**proxy, "gitball_proxy"),
    ] {
        wait_for_line(WAIT, || service.log(), "after-the-probes");
        let log = service.log();
        let lines = request_lines(&log);
        let probes: Vec<&Value> = lines
            .iter()
            .filter(|line| {
                line["request_id"] == "a-probe"
                    || matches!(line["path"].as_str(), Some("/healthz" | "/metrics"))
            })
            .collect();
        assert!(probes.is_empty(), "{tier} logged probes: {probes:?}");
        assert_eq!(lines.len(), 2, "{tier}: {lines:?}");
        let metrics = gitball_e2e::Metrics::parse(&service.metrics_text());
        assert_eq!(
            metrics.sum(&format!("{family}_requests_total"), &[]),
            2.0,
            "{tier}: {:?}",
            metrics.series_of(&format!("{family}_requests_total"))
        );
        assert_eq!(
            metrics.value(&format!("{family}_request_duration_seconds_count"), &[]),
            2.0,
            "{tier}"
        );
    }
}
