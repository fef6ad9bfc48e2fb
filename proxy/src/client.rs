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

use gitball_core::client::{Nets, parse_nets};
use http::HeaderMap;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// `--trusted-proxies`: peers whose `X-Forwarded-For` is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Nets);

/// Parses `CIDR[,CIDR…]`; a bare address is its own `/32` or `/128`.
pub fn parse_trusted_proxies(text: &str) -> Result<TrustedProxies, String> {
    parse_nets(text).map(TrustedProxies)
}

impl TrustedProxies {
    pub fn contains(&self, address: IpAddr) -> bool {
        self.0.contains(address)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges, as the accept loop's list of fronts takes them.
    pub fn nets(&self) -> &Nets {
        &self.0
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// The client of a request that came from `peer` with `headers`.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = canonical(peer);
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
        client = canonical(address);
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
    fn trusted_proxies_parse_ranges_and_addresses() {
        let trusted = parse_trusted_proxies("127.0.0.1, 10.0.0.0/8,fd00::/8").unwrap();
        assert!(trusted.contains(ip("127.0.0.1")));
        assert!(trusted.contains(ip("::ffff:127.0.0.1")));
        assert!(!trusted.contains(ip("127.0.0.2")));
        assert!(trusted.contains(ip("10.200.1.1")));
        assert!(trusted.contains(ip("fd00::1")));
        assert!(!trusted.contains(ip("2001:db8::1")));
        assert!(parse_trusted_proxies("").unwrap().is_empty());
        assert!(parse_trusted_proxies("10.0.0.0/33").is_err());
        assert!(parse_trusted_proxies("nginx").is_err());
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
        let trusted = parse_trusted_proxies("127.0.0.1,10.0.0.0/8").unwrap();
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
        let trusted = parse_trusted_proxies("127.0.0.1,10.0.0.0/8").unwrap();
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
        let trusted = parse_trusted_proxies("127.0.0.1").unwrap();
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
