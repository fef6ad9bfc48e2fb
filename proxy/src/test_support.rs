//! What the unit tests share.

use std::net::SocketAddr;

/// A port on 127.0.0.1 that refuses every connection for as long as this
/// value lives: a TCP socket bound to it and never listening. An upstream
/// that is down. (`gitball_e2e::RefusingPort` is the same for the
/// end-to-end tests, which cannot share this crate's test code.)
///
/// A port bound, closed, and then trusted to refuse is free in between:
/// any listener of this test process or another may be given it, and the
/// connection meant to be refused is accepted. This one cannot be given to
/// anyone: bound without `SO_REUSEADDR` or `SO_REUSEPORT`, it makes the
/// kernel refuse every other bind of the port (`EADDRINUSE`) and never pick
/// it for a bind to port 0, and a socket that does not listen answers a SYN
/// with a reset: `ECONNREFUSED`.
pub(crate) struct RefusingPort {
    _socket: socket2::Socket,
    pub(crate) addr: SocketAddr,
}

impl RefusingPort {
    pub(crate) fn new() -> RefusingPort {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        RefusingPort {
            _socket: socket,
            addr,
        }
    }
}
