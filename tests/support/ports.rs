//! Free loopback ports, for servers that must be told their port instead of binding `:0`
//! themselves (dnsmasq, redis-server, `tollgate run`'s flags). Bound, read, released: another
//! process may take the port meanwhile, so callers that start a server retry on a new port.

use std::net::{TcpListener, UdpSocket};

/// A TCP port free on 127.0.0.1 at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A port free for both UDP and TCP on 127.0.0.1 (a DNS server binds both).
pub fn free_udp_tcp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        let port = udp.local_addr().expect("UDP address").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
