//! The connection cap per client (`--max-connections-per-client`,
//! docs/archiver.md "Connections and file descriptors").
//!
//! `--max-connections` protects the process; it does not protect the other
//! clients: one client (a crawler, a broken CI script, a slowloris) could
//! hold every connection, each a stalled download, and everyone else would
//! get `503 overloaded`. So, as nginx's `limit_conn` on
//! `$binary_remote_addr` and HAProxy's `src_conn_cur` do, the accept loop
//! also counts each client's open connections, and past its cap a client's
//! new connection is refused at once with `429 too_many_connections`
//! (`Retry-After`, `Connection: close`), while every other client is still
//! served. Only once the process holds half its `--max-connections`
//! ([`contended`]): below that there is room for everyone, and a refusal
//! would only fail the many CI jobs behind one NAT address of a release
//! rush.
//!
//! Invariants:
//! - The client is the peer's address as the per-client rules key it
//!   ([`crate::client::client_key`]: an IPv6 client is its `/64`), decided
//!   at accept, before a byte is read: a client that sends nothing is
//!   counted too.
//! - A peer in `fronts` (a gitball proxy in front of an archiver, the
//!   operator's nginx or load balancer) is never counted: each of its
//!   connections carries another client, and the cap for those is the
//!   front's to keep.
//! - A connection's place is held by a [`ClientSlot`] whose `Drop` gives it
//!   back, however the connection ends; a client whose count reaches 0 is
//!   removed, so the table holds only clients with a connection open (at
//!   most `--max-connections` entries).
//! - Shared by every serving thread (one mutex, held for a map update).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::client::{Nets, client_key};
use crate::protocol::{REFUSED_MAX_CONNECTIONS_PER_CLIENT, code};

/// `--max-connections-per-client` and the peers it does not count.
#[derive(Clone, Debug, Default)]
pub struct PerClient {
    /// Connections one client holds at once; `0`: no cap per client.
    pub max: usize,
    /// Peers not counted (fronts carrying other clients' connections).
    pub fronts: Nets,
}

/// The open connections of each client, under the cap.
pub(super) struct PerClientLimit {
    max: usize,
    fronts: Nets,
    open: Mutex<HashMap<IpAddr, usize>>,
    clients: metrics::Gauge,
    pub(super) rejected: metrics::Counter,
    /// The whole `429` response, built once.
    pub(super) refusal: Arc<[u8]>,
}

/// One connection's place in its client's count; dropping it frees it.
pub(super) struct ClientSlot {
    limit: Arc<PerClientLimit>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
        self.limit.clients.set(open.len() as f64);
    }
}

/// What [`PerClientLimit::try_acquire`] decided.
pub(super) enum Admission {
    /// Counted: the slot frees the place when dropped.
    Counted(ClientSlot),
    /// Not counted: no cap, or a front.
    Uncounted,
    /// The client holds its cap already.
    Refused(IpAddr),
}

impl PerClientLimit {
    /// `None` when the cap is off (`max` 0). `series`: the prefix of the
    /// process's connection series, whose gauges it sets.
    pub(super) fn new(
        per_client: PerClient,
        series: Option<&'static str>,
        rejected: metrics::Counter,
    ) -> Option<Arc<PerClientLimit>> {
        let clients = match series {
            Some(prefix) => {
                let max_name = format!("{prefix}_connections_per_client_max");
                let clients_name = format!("{prefix}_connections_clients");
                metrics::describe_gauge!(
                    max_name.clone(),
                    "--max-connections-per-client: connections one client holds at once before \
                     its new ones get 429 (0: no cap)."
                );
                metrics::describe_gauge!(
                    clients_name.clone(),
                    "Clients with a connection counted by --max-connections-per-client now."
                );
                metrics::gauge!(max_name).set(per_client.max as f64);
                let clients = metrics::gauge!(clients_name);
                clients.set(0.0);
                clients
            }
            None => metrics::Gauge::noop(),
        };
        if per_client.max == 0 {
            return None;
        }
        Some(Arc::new(PerClientLimit {
            max: per_client.max,
            fronts: per_client.fronts,
            open: Mutex::new(HashMap::new()),
            clients,
            rejected,
            refusal: too_many_connections_response().into(),
        }))
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Counts a connection from `peer`, unless its client holds the cap
    /// while the process is `contended` (it holds at least half its
    /// `--max-connections`, [`contended`]): a client past its cap is
    /// refused only when its connections could keep others out.
    pub(super) fn try_acquire(self: &Arc<Self>, peer: IpAddr, contended: bool) -> Admission {
        if self.fronts.contains(peer) {
            return Admission::Uncounted;
        }
        let client = client_key(peer);
        let mut open = self.lock();
        let count = open.entry(client).or_insert(0);
        if contended && *count >= self.max {
            return Admission::Refused(client);
        }
        *count += 1;
        self.clients.set(open.len() as f64);
        Admission::Counted(ClientSlot {
            limit: self.clone(),
            client,
        })
    }

    /// Clients with a connection counted now.
    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Every update is one map operation: a poisoned map is consistent.
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a process holding `open` of its `max` connections is
/// contended: at least half of them are taken, so that a client holding
/// more than its cap could keep others out. Below that, a client past its
/// cap (many CI jobs behind one NAT address, in a release rush) is served:
/// there is room for everyone.
pub(super) fn contended(open: usize, max: usize) -> bool {
    open.saturating_mul(2) >= max
}

/// The `429` a client's connection past its cap gets: the JSON error, with
/// `Retry-After`, `Connection: close` and `X-Gitball-Refused`.
fn too_many_connections_response() -> Vec<u8> {
    super::refusal_response(
        "429 Too Many Requests",
        REFUSED_MAX_CONNECTIONS_PER_CLIENT,
        code::TOO_MANY_CONNECTIONS,
        "this client holds as many connections as one client may; retry later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::parse_nets;

    fn limit(max: usize, fronts: &str) -> Arc<PerClientLimit> {
        PerClientLimit::new(
            PerClient {
                max,
                fronts: parse_nets(fronts).unwrap(),
            },
            None,
            metrics::Counter::noop(),
        )
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    impl PerClientLimit {
        /// Under contention, where the cap applies.
        fn try_acquire_now(self: &Arc<Self>, peer: IpAddr) -> Admission {
            self.try_acquire(peer, true)
        }
    }

    /// Below half of `--max-connections` a client past its cap is served
    /// (and counted); from half on it is refused.
    #[test]
    fn the_cap_applies_once_the_process_holds_half_its_connections() {
        assert!(!contended(0, 1) && contended(1, 1));
        assert!(!contended(4_935, 9_872) && contended(4_936, 9_872));
        let limit = limit(1, "");
        let held = limit.try_acquire(ip("192.0.2.1"), false);
        let past = limit.try_acquire(ip("192.0.2.1"), false);
        assert!(matches!(held, Admission::Counted(_)));
        assert!(matches!(past, Admission::Counted(_)), "refused with room");
        assert!(matches!(
            limit.try_acquire(ip("192.0.2.1"), true),
            Admission::Refused(_)
        ));
        drop((held, past));
        assert_eq!(limit.tracked(), 0);
    }

    #[test]
    fn a_client_at_its_cap_is_refused_and_a_freed_place_lets_it_in_again() {
        let limit = limit(2, "");
        let first = limit.try_acquire_now(ip("192.0.2.1"));
        let second = limit.try_acquire_now(ip("192.0.2.1"));
        assert!(matches!(first, Admission::Counted(_)));
        assert!(matches!(second, Admission::Counted(_)));
        assert!(matches!(
            limit.try_acquire_now(ip("192.0.2.1")),
            Admission::Refused(_)
        ));
        // Another client is not affected.
        let other = limit.try_acquire_now(ip("192.0.2.2"));
        assert!(matches!(other, Admission::Counted(_)));
        drop(first);
        assert!(matches!(
            limit.try_acquire_now(ip("192.0.2.1")),
            Admission::Counted(_)
        ));
    }

    #[test]
    fn one_ipv6_64_is_one_client_and_fronts_are_not_counted() {
        let limit = limit(1, "10.0.0.0/8");
        let held = limit.try_acquire_now(ip("2001:db8:1:2::1"));
        assert!(matches!(held, Admission::Counted(_)));
        assert!(matches!(
            limit.try_acquire_now(ip("2001:db8:1:2::ffff")),
            Admission::Refused(_)
        ));
        for _ in 0..5 {
            assert!(matches!(
                limit.try_acquire_now(ip("10.1.2.3")),
                Admission::Uncounted
            ));
        }
    }

    /// The proxy tells this refusal of its own connection from a `429` for
    /// its client by `X-Gitball-Refused` (docs/internal-api.md).
    #[test]
    fn the_refusal_is_a_429_marked_as_the_cap_per_clients() {
        let refusal = String::from_utf8(too_many_connections_response()).unwrap();
        let (head, body) = refusal.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
        assert!(
            head.contains("\r\nx-gitball-refused: max_connections_per_client\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], code::TOO_MANY_CONNECTIONS);
    }

    #[test]
    fn a_client_whose_last_connection_closed_is_forgotten() {
        let limit = limit(3, "");
        let slots: Vec<_> = (0..50)
            .map(|index| limit.try_acquire_now(ip(&format!("192.0.2.{index}"))))
            .collect();
        assert_eq!(limit.tracked(), 50);
        drop(slots);
        assert_eq!(limit.tracked(), 0);
    }
}
