//! End-to-end tests of the ops material against the real binaries:
//!
//! - the nginx front (`ops/nginx/gitball.conf`, rendered for a test prefix
//!   by `ops/nginx/render-test-conf.sh`) in front of a real proxy and
//!   archivers: bytes through nginx equal `git archive`'s;
//! - every series the Grafana dashboard and the alert rules query exists in
//!   the live `/metrics` of both services (`ops/check-queries.py`).
//!
//! nginx and python3 come from Debian (`.ci/run` installs them). Outside CI a
//! machine without them skips these tests with a note; in CI (`CI=true`) a
//! missing tool is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gitball_e2e::proxy::{
    Cluster, Proxy, Route, SmallRepository, fetch_ok, small_repository, token, unix_now,
    write_routes,
};
use gitball_e2e::{Archiver, RawConnection, Sandbox, pipe_through, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// True when `tool` runs; false (skip) outside CI, panic in CI.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// nginx in the foreground in its own prefix, killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    prefix: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream_port: u16) -> Nginx {
        Nginx::start_before(&[upstream_port])
    }

    /// nginx in front of several proxies: the rendered config's one
    /// `server` line, and one more for each further port (as
    /// `gitball.conf` invites an operator to add).
    fn start_before(upstream_ports: &[u16]) -> Nginx {
        let prefix = tempfile::Builder::new()
            .prefix("gitball-nginx-")
            .tempdir()
            .expect("prefix dir");
        // A port freed a moment ago may be taken again; retry a few times.
        for _ in 0..5 {
            let port = free_port();
            let rendered = Command::new(repo_root().join("ops/nginx/render-test-conf.sh"))
                .arg(prefix.path())
                .arg(port.to_string())
                .arg(upstream_ports[0].to_string())
                .status()
                .expect("run render-test-conf.sh");
            assert!(rendered.success(), "render-test-conf.sh failed");
            let included = prefix.path().join("conf/gitball.conf");
            let text = std::fs::read_to_string(&included).expect("read the rendered gitball.conf");
            let more: String = upstream_ports[1..]
                .iter()
                .map(|port| format!("\n    server 127.0.0.1:{port};"))
                .collect();
            let tagged = format!("server 127.0.0.1:{};  # test: upstream", upstream_ports[0]);
            assert!(text.contains(&tagged), "the rendered upstream line");
            std::fs::write(&included, text.replace(&tagged, &format!("{tagged}{more}")))
                .expect("write the rendered gitball.conf");
            let config = prefix.path().join("conf/nginx.conf");
            let error_log = prefix.path().join("logs/error.log");
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(prefix.path())
                .arg("-c")
                .arg(&config)
                .arg("-e")
                .arg(&error_log)
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            let up = wait_until(START_TIMEOUT, || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || child.try_wait().ok().flatten().is_some()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return Nginx {
                    child,
                    port,
                    prefix,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx did not start");
    }

    fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master: it stops its workers before exiting. A
        // SIGKILL would leave the workers behind as orphans.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = &self.prefix;
    }
}

/// A private repository's URL carries its signed token in the query, a
/// credential for days: gitball's own request log leaves the query out
/// (docs/observability.md), and the front's access log does too. It
/// logged the request line, `?token=` included, into a log file that is
/// read more widely than the signing key (attack).
#[test]
fn the_fronts_access_log_holds_no_token() {
    if !have("nginx") {
        return;
    }
    const KEY: &str = "ops-signing-key-0123456789";
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "secret"));
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(
        &routes,
        &[Route::new("acme/secret", &archiver.base_url, &[]).private()],
    );
    let key_file = sandbox.path("signing.key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("write the key");
    let proxy = Proxy::with_routes(
        &routes,
        &["--signing-key-file", key_file.to_str().expect("utf-8 path")],
    );
    let nginx = Nginx::start(proxy.addr.port());

    let signed = token(KEY.as_bytes(), "acme/secret", unix_now() + 600);
    let signature = signed
        .split_once('.')
        .expect("expiry.signature")
        .1
        .to_owned();
    fetch_ok(
        nginx.addr(),
        &format!("/acme/secret/archive/main.tar?path=src&token={signed}"),
    );
    let log_path = nginx.prefix.path().join("logs/gitball.access.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        wait_until(START_TIMEOUT, || log()
            .contains("/acme/secret/archive/main.tar")),
        "the download was not logged: {}",
        log()
    );
    assert!(
        !log().contains(&signature),
        "the access log holds the token: {}",
        log()
    );
}

/// An HTTP/0.9 request (a request line without a version) gets a bare
/// body from nginx: no status, no headers, no length, so a download cut
/// midway ends with the same close as a complete one. nginx proxied it,
/// and a generation that failed midway reached the client as 100 KB of a
/// tar ending cleanly (attack). The front refuses it, as both tiers do.
#[test]
fn an_http_0_9_request_through_the_front_gets_no_archive_byte() {
    if !have("nginx") {
        return;
    }
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // The start of a tar, a pause, a failure: a generation that fails
    // midway, after its first bytes went out.
    let stub = sandbox.write_stub(
        "fails-midway",
        "printf '%257s' ''\nprintf 'ustar'\nhead -c 100000 /dev/zero\nsleep 1\nexit 1\n",
    );
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxy = Proxy::with_routes(&routes, &[]);
    let nginx = Nginx::start(proxy.addr.port());

    for target in [
        "/acme/widget/archive/main.tar",
        "/acme/widget/archive/main.zip",
    ] {
        let mut connection = RawConnection::connect(nginx.addr()).unwrap();
        connection
            .send(format!("GET {target}\r\n").as_bytes())
            .unwrap();
        let answer = connection.read_to_close();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            !text.contains("ustar") && !answer.starts_with(b"PK"),
            "{target}: {} bytes of a failed archive ended cleanly: {:?}",
            answer.len(),
            &text[..text.len().min(80)]
        );
        assert!(text.contains("400 Bad Request"), "{target}: {text}");
    }
}

/// A request with a body (which `GET` never needs, and nginx passes on)
/// left the front's pooled connection to the proxy unable to serve a
/// later head of more than 64 lines: the proxy closed it unanswered, and
/// nginx counted that as the proxy failing. With two proxies behind
/// nginx, one client's 16 requests with a 1-byte body and one of 80
/// header lines made nginx answer `502` to every client for its
/// `fail_timeout` (attack). A request with a body is now answered with
/// `Connection: close`, so no front keeps such a connection.
#[test]
fn request_bodies_cannot_make_the_front_fail_its_proxies() {
    if !have("nginx") {
        return;
    }
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let routes = sandbox.path("routes.toml");
    write_routes(&routes, &[Route::new("*", &archiver.base_url, &[])]);
    let proxies = [
        Proxy::with_routes(&routes, &[]),
        Proxy::with_routes(&routes, &[]),
    ];
    let nginx = Nginx::start_before(&[proxies[0].addr.port(), proxies[1].addr.port()]);
    let target = "/acme/widget/archive/main.tar";
    fetch_ok(nginx.addr(), target);

    // Requests with a body, all open at once: nginx reaches the proxies
    // on as many connections, and keeps them.
    let mut with_body: Vec<RawConnection> = (0..16)
        .map(|_| {
            let mut connection = RawConnection::connect(nginx.addr()).unwrap();
            connection
                .send(
                    format!("GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
                        .as_bytes(),
                )
                .unwrap();
            connection
        })
        .collect();
    for connection in &mut with_body {
        let answer = connection.read_to_close();
        assert!(
            answer.starts_with(b"HTTP/1.1 200 "),
            "{:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)])
        );
    }
    let long_head: String = (0..80)
        .map(|line| format!("X-Line-{line}: v\r\n"))
        .collect();
    let status = |head: &str| {
        let mut connection = RawConnection::connect(nginx.addr()).unwrap();
        connection
            .send(
                format!("GET {target} HTTP/1.1\r\nHost: x\r\n{head}Connection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
        let answer = connection.read_to_close();
        String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned()
    };
    let long: Vec<String> = (0..4).map(|_| status(&long_head)).collect();
    let plain: Vec<String> = (0..4).map(|_| status("")).collect();
    assert!(
        long.iter()
            .chain(&plain)
            .all(|answer| answer == "HTTP/1.1 200"),
        "long heads {long:?}, then plain requests {plain:?}"
    );
}

#[test]
fn downloads_through_nginx_proxy_and_archiver_equal_git_archive() {
    if !have("nginx") {
        return;
    }
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    let SmallRepository { second: commit, .. } = small_repository(&repo);
    let cluster = Cluster::start(&sandbox.repos(), &sandbox.repos(), 2, &[]);
    let nginx = Nginx::start(cluster.proxy.addr.port());

    let tar = repo.archive("tar", "widget-main/", &commit, None);
    for target in ["/acme/widget/archive/main.tar", "/acme/widget/tar/main"] {
        let fetched = fetch_ok(nginx.addr(), target);
        assert_eq!(fetched.body, tar, "{target} through nginx");
        assert_eq!(fetched.header("x-gitball-commit"), commit);
        assert!(
            !fetched.header("x-request-id").is_empty(),
            "nginx forwards and echoes X-Request-Id"
        );
    }
    let gz = fetch_ok(nginx.addr(), "/acme/widget/archive/main.tar.gz");
    assert_eq!(pipe_through("gzip", &["-dc"], &gz.body), tar);
    // Hit: Content-Length and the digest pass through nginx.
    let hit = fetch_ok(nginx.addr(), "/acme/widget/archive/main.tar.gz");
    assert_eq!(hit.header("x-gitball-cache"), "hit");
    assert_eq!(hit.header("content-length"), gz.body.len().to_string());
    assert_eq!(hit.body, gz.body);
}

#[test]
fn every_dashboard_and_alert_series_is_exported() {
    if !have("python3") {
        return;
    }
    let sandbox = Sandbox::new();
    let repo = sandbox.repo("acme", "widget");
    small_repository(&repo);
    let cluster = Cluster::start(&sandbox.repos(), &sandbox.repos(), 2, &[]);
    // Traffic that makes the labelled families appear: misses, hits, a 404,
    // every format.
    for ext in ["tar", "tar.gz", "zip", "tar.zst"] {
        fetch_ok(
            cluster.proxy.addr,
            &format!("/acme/widget/archive/main.{ext}"),
        );
        fetch_ok(
            cluster.proxy.addr,
            &format!("/acme/widget/archive/main.{ext}"),
        );
    }
    let _ = gitball_e2e::proxy::fetch(cluster.proxy.addr, "/acme/nothing/archive/main.tar");

    let scrapes = tempfile::tempdir().expect("scrape dir");
    let mut files = Vec::new();
    for (name, service) in std::iter::once(("proxy", &*cluster.proxy)).chain(
        cluster
            .archivers()
            .into_iter()
            .enumerate()
            .map(|(i, a)| (["primary", "replica1", "replica2"][i], &**a)),
    ) {
        let path = scrapes.path().join(format!("{name}.txt"));
        std::fs::write(&path, service.metrics_text()).expect("write scrape");
        files.push(path);
    }
    let output = Command::new("python3")
        .arg(repo_root().join("ops/check-queries.py"))
        .args(&files)
        .output()
        .expect("run check-queries.py");
    assert!(
        output.status.success(),
        "dashboard or alerts query series the services do not export:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `docs/http.md#health-and-metrics`: the nginx front of `ops/` answers
/// `/metrics` with `403`, so the proxies' metrics (upstream addresses,
/// traffic) stay off the public network, however the path is spelled: a
/// doubled slash, an escaped letter, a query, `..` segments. nginx matches
/// its locations on the normalised path but passes the raw one on, so a
/// raw path that only normalises into an archive location reaches the
/// proxy, which must not take it for `/metrics` either. `/healthz` passes.
/// (Docs audit: nothing asked the front for `/metrics`.)
#[test]
fn the_front_never_serves_the_proxys_metrics() {
    if !have("nginx") {
        return;
    }
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    let cluster = Cluster::around(Archiver::start(&sandbox.repos(), &[]), vec![], &[]);
    let nginx = Nginx::start(cluster.proxy.addr.port());
    for target in [
        "/metrics",
        "//metrics",
        "/%6Detrics",
        "/metrics?format=prometheus",
        "/acme/widget/archive/../../metrics",
        "/acme/widget/archive/%2E%2E/%2E%2E/metrics",
        "/metrics/../acme/widget/archive/main.tar",
        "/./metrics",
    ] {
        let (head, body, _) = RawConnection::request(nginx.addr(), "GET", target, &[]).unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("# TYPE") && !text.contains("gitball_"),
            "{target}: {} {text}",
            head.status
        );
        assert!(
            (400..500).contains(&head.status),
            "{target}: {}",
            head.status
        );
    }
    let (head, _, _) = RawConnection::request(nginx.addr(), "GET", "/metrics", &[]).unwrap();
    assert_eq!(head.status, 403);
    let (head, body, _) = RawConnection::request(nginx.addr(), "GET", "/healthz", &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(body, b"{\"status\":\"ok\"}\n");
}
