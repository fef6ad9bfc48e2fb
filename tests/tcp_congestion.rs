//! `--tcp-congestion` (docs/archiver.md, "TCP congestion control"): each
//! tier's listener, and the in-process archiver's in embedded mode, use the
//! congestion control asked for, which every connection they accept
//! inherits; a name the kernel does not have stops the start with an error
//! that says so. Read from the outside, with `ss -ti`.

use std::process::Command;

use gitball_e2e::proxy::{Cluster, Proxy, fetch_ok, small_repository};
use gitball_e2e::{Archiver, RawConnection, Sandbox, binary_path, start_refused};

/// The host's default (`net.ipv4.tcp_congestion_control`).
fn host_default() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .expect("read the host's congestion control")
        .trim()
        .to_owned()
}

/// A congestion control this kernel has that is not its default (reno is
/// always built in; cubic or bbr is the usual default).
fn not_the_default() -> String {
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .expect("read the kernel's congestion controls");
    let default = host_default();
    available
        .split_whitespace()
        .find(|name| *name != default)
        .unwrap_or_else(|| panic!("this kernel has no congestion control but {default}"))
        .to_owned()
}

/// The congestion control of every established TCP socket on this host
/// whose local port is `port` (the connections a listener on it accepted):
/// the token before `wscale:` or `cwnd:` in `ss -ti`'s detail line.
fn accepted_congestion(port: u16) -> Vec<String> {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("run ss");
    assert!(output.status.success(), "ss: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|line| line.starts_with(char::is_whitespace))
        .filter_map(|details| {
            let tokens: Vec<&str> = details.split_whitespace().collect();
            let at = tokens
                .iter()
                .position(|token| token.starts_with("wscale:") || token.starts_with("cwnd:"))?;
            Some(tokens.get(at.checked_sub(1)?)?.to_string())
        })
        .collect()
}

/// Opens a keep-alive connection to `port` and asks for `/healthz`; the
/// connection stays open for `ss` while the value lives.
fn open_connection(addr: std::net::SocketAddr) -> RawConnection {
    let mut connection = RawConnection::connect(addr).expect("connect");
    connection
        .send_request("GET", "/healthz", &[])
        .expect("send");
    assert_eq!(connection.read_head().expect("head").status, 200);
    connection.read_body_to_end(|_| {});
    connection
}

#[test]
fn both_tiers_accept_connections_with_the_congestion_control_asked_for() {
    let algorithm = &not_the_default();
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

/// Without the flag the in-process archiver's loopback connections use
/// reno (nothing to pace for there: docs/proxy.md, "Embedded mode"), and
/// the proxy's listener the host's default.
#[test]
fn the_embedded_archiver_uses_reno_on_its_loopback_connections_by_default() {
    let (inside, outside) = embedded_congestion(&[]);
    assert!(
        !inside.is_empty() && inside.iter().all(|name| name == "reno"),
        "the embedded archiver's connections use {inside:?}"
    );
    assert_eq!(outside, [host_default()], "the proxy's own listener");
}

/// With the flag, both listeners use it. The name asked for is the host's
/// default unless that is reno, so that it differs from the embedded
/// default.
#[test]
fn the_embedded_archiver_accepts_with_the_congestion_control_asked_for() {
    let algorithm = if host_default() == "reno" {
        not_the_default()
    } else {
        host_default()
    };
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
