//! Who a request is for: the client address the proxy tells the archiver
//! in `X-Gitball-Client`, which keys the archiver's crawler budget
//! (`docs/security.md#client-identity`).
//!
//! The address is the socket peer's, unless the peer is one of
//! `--trusted-proxies` (nginx in front): then `X-Forwarded-For` is read from
//! the right, skipping trusted hops, and the first address that is not one
//! of them is the client. Everything to the left of it was written by the
//! client itself and is never believed. With no `--trusted-proxies` (the
//! default) the header is ignored entirely, so a client cannot choose whose
//! budget it spends.

use std::net::IpAddr;

use gitball_core::client::Nets;
use http::HeaderMap;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// `--trusted-proxies`: peers whose `X-Forwarded-For` is believed, parsed
/// by `gitball_core::client::parse_nets` (the ranges of every such flag).
pub type TrustedProxies = Nets;

/// The client of a request that came from `peer` with `headers`.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    // An IPv4-mapped IPv6 address is its IPv4 address.
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    // Every X-Forwarded-For line, in order, as one list. Split as bytes: a
    // line is one value to nginx, which appends the client's address to
    // whatever the client wrote on it, so a byte that is not UTF-8 must
    // spoil only the entry it is in, not the address appended after it.
    let hops: Vec<&[u8]> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // Garbage can only have come from the client's side of the chain:
        // stop at the last address a trusted hop vouched for.
        let Some(address) = std::str::from_utf8(hop)
            .ok()
            .and_then(|hop| hop.trim().parse::<IpAddr>().ok())
        else {
            break;
        };
        client = address.to_canonical();
        if !trusted.contains(client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn forwarded(values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_static(value));
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let none = TrustedProxies::default();
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(
            client_address(ip("198.51.100.1"), &headers, &none),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn forwarded_for_is_read_from_the_right_past_trusted_hops() {
        let trusted = gitball_core::client::parse_nets("127.0.0.1,10.0.0.0/8").unwrap();
        let peer = ip("127.0.0.1");
        // The client wrote the first entry itself; nginx appended the real one.
        let headers = forwarded(&["6.6.6.6, 203.0.113.9"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("203.0.113.9"));
        // Two trusted hops, over two header lines.
        let headers = forwarded(&["6.6.6.6, 203.0.113.9", "10.1.2.3"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("203.0.113.9"));
        // No header: the peer itself.
        assert_eq!(client_address(peer, &HeaderMap::new(), &trusted), peer);
        // Garbage stops the walk at the last vouched-for address.
        let headers = forwarded(&["junk, 10.1.2.3"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("10.1.2.3"));
        let headers = forwarded(&["::ffff:203.0.113.9"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("203.0.113.9"));
    }

    /// An entry that does not parse stops the walk at the last trusted
    /// address (`docs/proxy.md`, "Client address"): what is left of it was
    /// written by the client, so an address there is not believed either.
    /// (Mutation review: skipping the garbage and walking on passed every
    /// test, whose garbage had nothing left of it.)
    #[test]
    fn garbage_stops_the_walk_before_what_is_left_of_it() {
        let trusted = gitball_core::client::parse_nets("127.0.0.1,10.0.0.0/8").unwrap();
        let peer = ip("127.0.0.1");
        let headers = forwarded(&["198.51.100.7, junk, 10.1.2.3"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("10.1.2.3"));
        let headers = forwarded(&["198.51.100.7", "", "10.1.2.3"]);
        assert_eq!(client_address(peer, &headers, &trusted), ip("10.1.2.3"));
    }

    /// A client behind nginx wrote a byte that is not UTF-8 into its own
    /// `X-Forwarded-For`; nginx appended its address on the same line. That
    /// address is still the client, not nginx's own (which would put every
    /// such client in the trusted proxy's budget).
    #[test]
    fn a_client_written_entry_that_is_not_utf8_spoils_only_itself() {
        let trusted = gitball_core::client::parse_nets("127.0.0.1").unwrap();
        let peer = ip("127.0.0.1");
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"1\xff, 203.0.113.9").unwrap(),
        );
        assert_eq!(client_address(peer, &headers, &trusted), ip("203.0.113.9"));
        // A line of its own that is not UTF-8, then nginx's.
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xfe\xff").unwrap(),
        );
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        assert_eq!(client_address(peer, &headers, &trusted), ip("203.0.113.9"));
    }
}
