//! Socket settings shared by both sides of the data plane.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// No Nagle delay, and TCP keepalive to find peers that vanished without a word.
///
/// Kernel keepalive rather than HTTP/2 PINGs: it costs nothing per frame.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(20))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
