//! Who a client is, for the rules kept per client: the archiver's crawler
//! budget and generation queue, and both tiers' connection cap per client
//! (`docs/security.md#client-identity`).
//!
//! A client is an address: an IPv4 address, or an IPv6 `/64` (what a single
//! host or home network is given, so one machine cannot mint addresses for
//! free); an IPv4-mapped IPv6 address is its IPv4 address. The same key
//! everywhere, so a client is one client to every per-client rule.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

/// The key of the client at `address`: an IPv4 address, or an IPv6 `/64`
/// (an IPv4-mapped IPv6 address is its IPv4 address).
pub fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// A list of address ranges (`CIDR[,CIDR…]` on a command line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nets(Vec<IpNet>);

impl Nets {
    /// 127.0.0.0/8 and `::1`: this host.
    pub fn loopback() -> Nets {
        Nets(vec![
            // A prefix length of 8 is valid for IPv4: this cannot fail.
            IpNet::V4(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("a valid prefix")),
            IpNet::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ])
    }

    /// Whether `address` (an IPv4-mapped IPv6 address as its IPv4 address)
    /// is in one of the ranges.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|net| net.contains(&address))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Both lists' ranges.
    pub fn union(&self, other: &Nets) -> Nets {
        Nets(self.0.iter().chain(&other.0).copied().collect())
    }

    /// The ranges.
    pub fn ranges(&self) -> &[IpNet] {
        &self.0
    }
}

impl From<Vec<IpNet>> for Nets {
    /// An IPv4-mapped range (`::ffff:10.0.0.0/104`, as `ss` shows an IPv4
    /// peer of a dual-stack listener) is kept as the IPv4 range it maps:
    /// [`Nets::contains`] sees such a peer as its IPv4 address.
    fn from(nets: Vec<IpNet>) -> Nets {
        Nets(
            nets.into_iter()
                .map(|net| match net {
                    IpNet::V6(v6) if v6.prefix_len() >= 96 => {
                        match v6.network().to_ipv4_mapped() {
                            // 96 <= prefix <= 128: a valid IPv4 prefix length.
                            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                                .map(IpNet::V4)
                                .unwrap_or(net),
                            None => net,
                        }
                    }
                    _ => net,
                })
                .map(|net| net.trunc())
                .collect(),
        )
    }
}

/// Parses `CIDR[,CIDR…]`; a bare address is its own `/32` or `/128`.
/// Empty items are skipped, so `""` is the empty list.
pub fn parse_nets(text: &str) -> Result<Nets, String> {
    let mut nets = Vec::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let net = match item.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => item
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("{item:?} is not a CIDR range or an IP address"))?,
        };
        nets.push(net);
    }
    Ok(Nets::from(nets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_client_its_ipv4_address() {
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff::1")),
            client_key(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:3::1")),
            client_key(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn nets_parse_ranges_and_addresses() {
        let nets = parse_nets("127.0.0.1, 10.0.0.0/8,fd00::/8").unwrap();
        assert!(nets.contains(ip("127.0.0.1")));
        assert!(nets.contains(ip("::ffff:127.0.0.1")));
        assert!(!nets.contains(ip("127.0.0.2")));
        assert!(nets.contains(ip("10.200.1.1")));
        assert!(nets.contains(ip("fd00::1")));
        assert!(!nets.contains(ip("2001:db8::1")));
        assert!(parse_nets("").unwrap().is_empty());
        assert!(parse_nets("10.0.0.0/33").is_err());
        assert!(parse_nets("nginx").is_err());
        let loopback = Nets::loopback();
        assert!(loopback.contains(ip("127.0.0.2")));
        assert!(loopback.contains(ip("::1")));
        assert!(loopback.contains(ip("::ffff:127.0.0.9")));
        assert!(!loopback.contains(ip("192.0.2.1")));
    }

    #[test]
    fn an_ipv4_mapped_range_holds_the_ipv4_addresses_it_maps() {
        // What `ss` shows for an IPv4 peer of a dual-stack listener.
        let nets = parse_nets("::ffff:10.0.0.0/104, ::ffff:192.0.2.7").unwrap();
        assert!(
            nets.contains(ip("10.1.2.3")),
            "::ffff:10.0.0.0/104 does not hold 10.1.2.3"
        );
        assert!(nets.contains(ip("::ffff:10.1.2.3")));
        assert!(nets.contains(ip("192.0.2.7")));
        assert!(!nets.contains(ip("11.0.0.1")));
        assert!(!nets.contains(ip("192.0.2.8")));
        // A range wider than the mapped block is an IPv6 range.
        assert!(!parse_nets("::/0").unwrap().contains(ip("10.1.2.3")));
    }
}
