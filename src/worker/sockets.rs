//! The workers' listening sockets: one per worker on the same address, so the kernel
//! spreads new connections over them (`SO_REUSEPORT`, Linux).

use std::io;
use std::net::SocketAddr;

use crate::server::listener::bind_with;

/// One listening socket per worker on `addr`. The first binds (resolving port 0); on
/// Linux the others bind the same port with `SO_REUSEPORT`, so the kernel balances new
/// connections over them; elsewhere they share the first socket.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(if cfg!(target_os = "linux") {
            bind_one(bound)?
        } else {
            sockets[0].try_clone()?
        });
    }
    Ok(sockets)
}

/// A listening socket with address reuse, `SO_REUSEPORT` (Linux) and a long accept
/// queue, not yet registered with any runtime.
pub fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    bind_with(addr, true)?.into_std()
}
