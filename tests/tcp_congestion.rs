//! TCP congestion control (docs/archiver.md, "TCP congestion control"):
//! without `--tcp-congestion`, every connection a tier accepts from a
//! loopback peer uses reno and one from another peer the host's default;
//! with `--tcp-congestion NAME`, the listeners of both tiers (and the
//! in-process archiver's in embedded mode) use NAME, which every connection
//! they accept inherits, loopback or not; a name the kernel does not have
//! stops the start with an error that says so. Read from the outside, with
//! `ss -ti`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use gitball_e2e::netns::{self, Network};
use gitball_e2e::proxy::{Cluster, Proxy, fetch_ok, small_repository};
use gitball_e2e::{Archiver, RawConnection, Sandbox, binary_path, start_refused};

/// What a tier gives a connection from a loopback peer when no
/// `--tcp-congestion` is given (`server::LOOPBACK_CONGESTION`).
const LOOPBACK_DEFAULT: &str = "reno";

/// The host's default (`net.ipv4.tcp_congestion_control`).
fn host_default() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("read the host's congestion control")
        .trim()
        .to_owned()
}

/// A congestion control to ask for with `--tcp-congestion`, neither reno
/// (what loopback peers get without the flag) nor, when the kernel has a
/// third, the host's default: so that the connections show the flag took
/// effect. Without `CAP_NET_ADMIN` only the allowed ones can be set.
fn asked_for() -> String {
    let list = if nix::unistd::geteuid().is_root() {
        "/proc/sys/net/ipv4/tcp_available_congestion_control"
    } else {
        "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
    };
    let names = std::fs::read_to_string(list).expect("read the kernel's congestion controls");
    let default = host_default();
    let candidates: Vec<&str> = names
        .split_whitespace()
        .filter(|name| *name != LOOPBACK_DEFAULT)
        .collect();
    candidates
        .iter()
        .find(|name| **name != default)
        .or(candidates.first())
        .unwrap_or_else(|| panic!("{list} has no congestion control but reno: {names}"))
        .to_string()
}

/// Why the default rule cannot be seen on this host (`None`: it can): a
/// host whose default is reno gives every connection reno anyway.
fn default_is_reno() -> Option<String> {
    (host_default() == LOOPBACK_DEFAULT)
        .then(|| format!("the host's default congestion control is {LOOPBACK_DEFAULT}"))
}

/// Says on the test's stderr (not captured away) why a test did nothing.
fn skipped(test: &str, reason: &str) {
    let _ = std::io::stderr().write_all(format!("SKIPPED {test}: {reason}\n").as_bytes());
}

/// The congestion control of every established TCP socket on this host
/// (in the calling thread's network namespace) whose local port is `port`
/// (the connections a listener on it accepted), with the peer's address:
/// the peer is the second address of `ss -ti`'s summary line, the name the
/// token before `wscale:` or `cwnd:` in its detail line.
fn accepted_congestion_by_peer(port: u16) -> Vec<(IpAddr, String)> {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss");
    assert!(output.status.success(), "ss: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    let mut peer = None;
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if !line.starts_with(char::is_whitespace) {
            peer = tokens
                .iter()
                .filter_map(|token| token.parse::<SocketAddr>().ok())
                .nth(1)
                .map(|address| address.ip());
            continue;
        }
        let name = tokens
            .iter()
            .position(|token| token.starts_with("wscale:") || token.starts_with("cwnd:"))
            .and_then(|at| tokens.get(at.checked_sub(1)?));
        if let (Some(peer), Some(name)) = (peer.take(), name) {
            found.push((peer, name.to_string()));
        }
    }
    found
}

/// The congestion control of every connection accepted on `port`.
fn accepted_congestion(port: u16) -> Vec<String> {
    accepted_congestion_by_peer(port)
        .into_iter()
        .map(|(_, name)| name)
        .collect()
}

/// Opens a keep-alive connection to `port` and asks for `/healthz`; the
/// connection stays open for `ss` while the value lives.
fn open_connection(addr: SocketAddr) -> RawConnection {
    answered(RawConnection::connect(addr).expect("connect"))
}

/// [`open_connection`] from the local address `source`.
fn open_connection_from(source: IpAddr, addr: SocketAddr) -> RawConnection {
    answered(RawConnection::connect_from(source, addr).expect("connect"))
}

fn answered(mut connection: RawConnection) -> RawConnection {
    connection
        .send_request("GET", "/healthz", &[])
        .expect("send");
    assert_eq!(connection.read_head().expect("head").status, 200);
    connection.read_body_to_end(|_| {});
    connection
}

#[test]
fn loopback_connections_to_both_tiers_use_reno_without_the_flag() {
    if let Some(reason) = default_is_reno() {
        skipped(
            "loopback_connections_to_both_tiers_use_reno_without_the_flag",
            &reason,
        );
        return;
    }
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&sandbox.repos(), &[]);
    let cluster = Cluster::around(archiver, vec![], &[]);
    for (tier, addr) in [
        ("archiver", cluster.primary.addr),
        ("proxy", cluster.proxy.addr),
    ] {
        let _connection = open_connection(addr);
        let found = accepted_congestion(addr.port());
        assert!(
            !found.is_empty() && found.iter().all(|name| name == LOOPBACK_DEFAULT),
            "{tier}: loopback connections accepted on {addr} use {found:?}, not {LOOPBACK_DEFAULT} \
             (host default {})",
            host_default()
        );
    }
}

#[test]
fn both_tiers_accept_connections_with_the_congestion_control_asked_for() {
    let algorithm = &asked_for();
    let sandbox = Sandbox::new();
    let archiver = Archiver::start(&sandbox.repos(), &["--tcp-congestion", algorithm]);
    let cluster = Cluster::around(archiver, vec![], &["--tcp-congestion", algorithm]);
    for (tier, addr) in [
        ("archiver", cluster.primary.addr),
        ("proxy", cluster.proxy.addr),
    ] {
        let _connection = open_connection(addr);
        let found = accepted_congestion(addr.port());
        assert!(
            !found.is_empty() && found.iter().all(|name| name == algorithm),
            "{tier}: connections accepted on {addr} use {found:?}, not {algorithm} (host default {})",
            host_default()
        );
    }
}

/// Namespaces of [`a_peer_on_another_address_keeps_the_hosts_congestion_control`].
const PREFIX: &str = "gbcc";
/// The peer's address: `eth0` of the test's namespace (a veth pair).
const PEER: &str = "10.77.0.2";

/// Inside a network namespace of its own (a veth pair gives it an address
/// that is not loopback), both tiers serve; a connection from `127.0.0.1`
/// uses reno, one from the namespace's `eth0` address the host's default.
#[test]
fn a_peer_on_another_address_keeps_the_hosts_congestion_control() {
    const TEST: &str = "a_peer_on_another_address_keeps_the_hosts_congestion_control";
    if let Some(reason) = default_is_reno().or_else(|| netns::unavailable_reason(PREFIX)) {
        skipped(TEST, &reason);
        return;
    }
    let network = Network::create(PREFIX, &[("peer", PEER)]);
    let ns = network.ns("peer");
    // A new namespace starts with the host's default (Linux copies it from
    // the initial namespace); read it there.
    let default = netns::ns_run(&ns, &["cat", "/proc/sys/net/ipv4/tcp_congestion_control"])
        .unwrap_or_else(|error| panic!("{error}"))
        .trim()
        .to_owned();
    let sandbox = Sandbox::new();
    let repos = sandbox.repos();
    // Everything in one thread inside the namespace: the services it
    // starts, its connections and `ss` all belong to the namespace. The
    // services stop when the thread's values drop, also on a panic.
    let found = netns::spawn_in(&ns, move || {
        let archiver = Archiver::start(&repos, &[]);
        let cluster = Cluster::around(archiver, vec![], &[]);
        let peer: IpAddr = PEER.parse().expect("an address");
        let mut found = Vec::new();
        for (tier, addr) in [
            ("archiver", cluster.primary.addr),
            ("proxy", cluster.proxy.addr),
        ] {
            let _loopback = open_connection(addr);
            let _outside = open_connection_from(peer, addr);
            found.push((tier, addr, accepted_congestion_by_peer(addr.port())));
        }
        found
    })
    .join()
    .expect("the namespace's thread");
    drop(network);
    for (tier, addr, connections) in found {
        let outside: Vec<&str> = connections
            .iter()
            .filter(|(peer, _)| peer.to_string() == PEER)
            .map(|(_, name)| name.as_str())
            .collect();
        let loopback: Vec<&str> = connections
            .iter()
            .filter(|(peer, _)| peer.is_loopback())
            .map(|(_, name)| name.as_str())
            .collect();
        assert_eq!(
            outside,
            [default.as_str()],
            "{tier} ({addr}): the connection from {PEER}; all: {connections:?}"
        );
        assert!(
            !loopback.is_empty() && loopback.iter().all(|name| *name == LOOPBACK_DEFAULT),
            "{tier} ({addr}): the connections from loopback; all: {connections:?}"
        );
    }
}

/// Namespace of [`a_routes_congctl_still_wins_for_the_connections_it_carries`].
const ROUTE_PREFIX: &str = "gbrt";
/// A second address of that namespace, on `lo`, whose route names its own
/// congestion control.
const ROUTED_PEER: &str = "10.77.1.3";

/// A route with its own `congctl` (`ip route … congctl NAME`) gives the
/// connections it carries NAME, over the listener's; the rule for peers
/// that are not loopback leaves such a connection alone (review: it was
/// switched to the host's default after the accept).
#[test]
fn a_routes_congctl_still_wins_for_the_connections_it_carries() {
    const TEST: &str = "a_routes_congctl_still_wins_for_the_connections_it_carries";
    if let Some(reason) = default_is_reno().or_else(|| netns::unavailable_reason(ROUTE_PREFIX)) {
        skipped(TEST, &reason);
        return;
    }
    let algorithm = asked_for();
    if algorithm == host_default() {
        skipped(
            TEST,
            "the kernel has no congestion control but reno and the default",
        );
        return;
    }
    let network = Network::create(ROUTE_PREFIX, &[("peer", "10.77.1.2")]);
    let ns = network.ns("peer");
    for command in [
        vec![
            "ip",
            "addr",
            "add",
            &format!("{ROUTED_PEER}/32"),
            "dev",
            "lo",
        ],
        vec![
            "ip",
            "route",
            "change",
            "local",
            ROUTED_PEER,
            "dev",
            "lo",
            "table",
            "local",
            "proto",
            "kernel",
            "scope",
            "host",
            "src",
            ROUTED_PEER,
            "congctl",
            &algorithm,
        ],
    ] {
        netns::ns_run(&ns, &command).unwrap_or_else(|error| panic!("{command:?}: {error}"));
    }
    let sandbox = Sandbox::new();
    let repos = sandbox.repos();
    let found = netns::spawn_in(&ns, move || {
        let archiver = Archiver::start(&repos, &[]);
        let peer: IpAddr = ROUTED_PEER.parse().expect("an address");
        let _routed = open_connection_from(peer, archiver.addr);
        accepted_congestion_by_peer(archiver.addr.port())
    })
    .join()
    .expect("the namespace's thread");
    drop(network);
    let routed: Vec<&str> = found
        .iter()
        .filter(|(peer, _)| peer.to_string() == ROUTED_PEER)
        .map(|(_, name)| name.as_str())
        .collect();
    assert_eq!(
        routed,
        [algorithm.as_str()],
        "the connection from {ROUTED_PEER}, whose route says congctl {algorithm}; all: {found:?}"
    );
}

/// The embedded proxy's two listeners after one download: what the
/// in-process archiver's connections use (its port from the proxy's
/// `embedded archiver ready` line) and what the proxy's own use.
fn embedded_congestion(extra_args: &[&str]) -> (Vec<String>, Vec<String>) {
    let sandbox = Sandbox::new();
    let tool = sandbox.source_repo("mytool");
    small_repository(&tool);
    let proxy = Proxy::embedded(tool.dir(), &sandbox.path("cache"), extra_args);
    // The proxy's pooled connection to the in-process archiver stays open.
    fetch_ok(proxy.addr, "/local/mytool/archive/HEAD.tar.gz");
    let log = proxy.log();
    let ready = log
        .lines()
        .find(|line| line.contains("embedded archiver ready"))
        .expect("the embedded archiver's ready line");
    let port: u16 = ready
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no address in {ready}"));
    let inside = accepted_congestion(port);
    let _connection = open_connection(proxy.addr);
    (inside, accepted_congestion(proxy.addr.port()))
}

/// Without the flag the in-process archiver's connections (all from the
/// proxy, over loopback) use reno, as do the proxy's own from loopback
/// clients.
#[test]
fn the_embedded_archiver_and_the_proxy_use_reno_for_loopback_peers_by_default() {
    if let Some(reason) = default_is_reno() {
        skipped(
            "the_embedded_archiver_and_the_proxy_use_reno_for_loopback_peers_by_default",
            &reason,
        );
        return;
    }
    let (inside, outside) = embedded_congestion(&[]);
    assert!(
        !inside.is_empty() && inside.iter().all(|name| name == LOOPBACK_DEFAULT),
        "the embedded archiver's connections use {inside:?}"
    );
    assert_eq!(outside, [LOOPBACK_DEFAULT], "the proxy's own listener");
}

/// With the flag, both listeners use it, for loopback peers too.
#[test]
fn the_embedded_archiver_accepts_with_the_congestion_control_asked_for() {
    let algorithm = asked_for();
    let (inside, outside) = embedded_congestion(&["--tcp-congestion", &algorithm]);
    assert!(
        !inside.is_empty() && inside.iter().all(|name| *name == algorithm),
        "the embedded archiver's connections use {inside:?}, not {algorithm}"
    );
    assert_eq!(outside, [algorithm], "the proxy's own listener");
}

#[test]
fn a_congestion_control_the_kernel_lacks_stops_the_start_with_an_error() {
    for binary in ["gitball-archiver", "gitball-proxy"] {
        let sandbox = Sandbox::new();
        let stderr = start_refused(
            binary,
            &sandbox.repos(),
            &sandbox.path("cache"),
            &["--tcp-congestion".as_ref(), "gitball-none".as_ref()],
        );
        assert!(
            stderr.contains("\"gitball-none\"")
                && stderr.contains("tcp_available_congestion_control"),
            "{binary}'s error does not name the algorithm and where to look: {stderr}"
        );
        // Not a name at all: refused before anything starts.
        let output = Command::new(binary_path(binary))
            .args(["--listen", "127.0.0.1:0", "--repos"])
            .arg(sandbox.repos())
            .args(["--tcp-congestion", "cubic; reboot"])
            .output()
            .expect("run the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{binary}: a usage error: {stderr}"
        );
        assert!(
            stderr.contains("is not a congestion control name"),
            "{binary}: {stderr}"
        );
    }
}

/// Why TCP's own pacing timers cannot be counted here (`None`: they can):
/// `perf` counts the `timer:hrtimer_start` tracepoint of a process,
/// filtered to `tcp_pace_kick`, the timer TCP arms for a connection it
/// paces itself (no `fq` qdisc, as on loopback), and to the process's own
/// context: an interrupt or softirq that runs while the process does may
/// be another's connections' work (other BBR connections on the host).
fn pacing_timers_uncountable() -> Option<String> {
    let output = Command::new("perf")
        .args(["stat", "-x,", "-e", "timer:hrtimer_start", "--filter"])
        .arg(PACING_TIMER_FILTER)
        .args(["--", "true"])
        .output();
    match output {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "perf cannot count tcp_pace_kick timers: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("no perf: {error}")),
    }
}

const PACING_TIMER_FILTER: &str = "function.function == tcp_pace_kick && !(common_flags & 0x18)";

/// BBR (without `fq`, as on loopback) paces a connection with a timer of
/// TCP's own, and it turns that pacing on when the connection is
/// established, before `accept` returns; the kernel never turns it off
/// again, so a connection switched to reno after `accept` stays paced.
/// Counted from the outside: the TCP pacing timers (`tcp_pace_kick`) the
/// archiver arms while it sends a 64 MiB archive, cold and then from its
/// cache, to a loopback client. Without the flag on a BBR host, none
/// (review: 479 with reno set after `accept`).
#[test]
fn loopback_downloads_are_not_paced_by_the_hosts_bbr() {
    const TEST: &str = "loopback_downloads_are_not_paced_by_the_hosts_bbr";
    if host_default() != "bbr" {
        skipped(TEST, "the host's default congestion control is not bbr");
        return;
    }
    if let Some(reason) = pacing_timers_uncountable() {
        skipped(TEST, &reason);
        return;
    }
    let sandbox = Sandbox::new();
    small_repository(&sandbox.repo("acme", "widget"));
    // A tar's magic, then zeros: 64 MiB in all.
    let stub = sandbox.write_stub(
        "big",
        "printf '%257s' ''\nprintf 'ustar'\nhead -c 67108602 /dev/zero\n",
    );
    let archiver = Archiver::start(&sandbox.repos(), &["--git", stub.to_str().unwrap()]);

    // perf starts with its counter off and says when it turned it on or off.
    let (control_path, mut control) = sandbox.fifo("perf-control");
    let (ack_path, _ack_writer) = sandbox.fifo("perf-ack");
    let mut perf = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-D",
            "-1",
            "-e",
            "timer:hrtimer_start",
            "--filter",
        ])
        .arg(PACING_TIMER_FILTER)
        .arg("--control")
        .arg(format!(
            "fifo:{},{}",
            control_path.display(),
            ack_path.display()
        ))
        .arg("-p")
        .arg(archiver.pid.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run perf");
    let (acks, acked) = std::sync::mpsc::channel();
    let ack_reader = std::fs::File::open(&ack_path).expect("open perf's ack fifo");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(ack_reader).lines() {
            if acks.send(line).is_err() {
                return;
            }
        }
    });
    let mut command = |word: &str| {
        writeln!(control, "{word}").expect("write to perf's control fifo");
        let ack = acked
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("perf did not acknowledge {word:?}"));
        // perf writes "ack\n" with its string's NUL.
        let ack = ack.expect("read perf's ack");
        assert_eq!(
            ack.trim_matches(|c: char| c == '\0' || c.is_whitespace()),
            "ack",
            "perf's answer to {word}"
        );
    };
    command("enable");
    for _ in 0..2 {
        let mut connection = RawConnection::connect(archiver.addr).expect("connect");
        connection
            .send_request("GET", "/acme/widget/archive/main.tar", &[])
            .expect("send");
        assert_eq!(connection.read_head().expect("head").status, 200);
        let mut received = 0;
        connection.read_body_to_end(|bytes| received += bytes.len());
        assert_eq!(received, 64 << 20, "the archive");
    }
    command("disable");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("stop perf");
    let mut report = String::new();
    std::io::Read::read_to_string(perf.stderr.as_mut().expect("perf's stderr"), &mut report)
        .expect("read perf's report");
    perf.wait().expect("wait for perf");
    let timers: u64 = report
        .lines()
        .find(|line| line.contains("timer:hrtimer_start"))
        .and_then(|line| line.split(',').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in perf's report: {report}"));
    assert_eq!(
        timers, 0,
        "the archiver armed {timers} TCP pacing timers sending 2 x 64 MiB to a loopback client"
    );
}
