//! A new connection's PROXY protocol header (`server -proxy`), read by the dispatcher before the
//! connection goes on as `-wait` says.
//!
//! One step looks at what has arrived: it peeks, asks [`proxy::parse`], and once a whole header
//! is there reads exactly its bytes (so the request after it stays in the socket, the worker's)
//! and puts the header's source in the connection's peer. Tried once at accept (a proxy sends
//! the header with the connection, so it is usually there already and the connection is never
//! parked for it); otherwise the connection is parked and the step runs again as bytes arrive.
//!
//! The listener is set to TCP_DEFER_ACCEPT, as HAProxy's `defer-accept` and nginx's `deferred`
//! do: the kernel hands over a connection only once its first bytes are in (or after about a
//! second, then the header timer runs), so the header is nearly always there at accept. Without
//! it, a third of the connections from HAProxy were accepted before their header and parked
//! (measured: 1148 of 3000), which costs an epoll_ctl pair and a wake-up each.
//!
//! A connection from a source not in `-proxyfrom` is a direct client with its own address: its
//! bytes are only peeked, and if they begin like a header (spoofing) it is closed.

use super::workers::Connection;
use crate::proxy::{self, Accept, Cidr, Parsed};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use std::os::fd::{AsRawFd, BorrowedFd};

/// TCP_DEFER_ACCEPT's wait, in seconds.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Asks the kernel to hand over connections once their first bytes are in (see the module doc).
/// Raw: nix 0.29 has no sockopt for TCP_DEFER_ACCEPT.
pub fn defer_accept(listener: BorrowedFd) -> std::io::Result<()> {
    let secs = DEFER_ACCEPT_SECS;
    // SAFETY: listener is an open fd for the call; the option value is a c_int that lives across
    // the call, and its size is passed with it.
    let ret = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    crate::sys::check(ret).map(drop)
}

/// `-proxy` and `-proxyfrom`.
#[derive(Debug, Clone, Default)]
pub struct ProxyPolicy {
    pub accept: Accept,
    pub trusted: Vec<Cidr>,
}

/// Where a connection's header stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More bytes are needed to decide.
    Pending,
    /// It may go on: `proxied` if a header was taken (and the peer is now its source).
    Done { proxied: bool },
    /// A bad, truncated or oversized header, a missing one from a trusted source, or a header
    /// from an untrusted one: to be closed.
    Rejected,
    /// Closed or reset by the peer before sending anything: to be closed (as any parked
    /// connection at its end; a proxy's plain TCP health check ends this way).
    Gone,
}

impl ProxyPolicy {
    pub fn enabled(&self) -> bool {
        self.accept != Accept::None
    }

    /// Whether headers from this connection's peer are believed.
    pub fn trusts(&self, conn: &Connection) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(conn.peer.ip()))
    }

    /// Looks at what has arrived on `conn`; `at_end`: the peer has shut its side (so nothing
    /// more will come). `buf` is scratch space.
    pub fn step(&self, conn: &mut Connection, trusted: bool, at_end: bool, buf: &mut Vec<u8>) -> Step {
        // An untrusted peer's first bytes are only told from a header's beginning.
        let want = if trusted { proxy::MAX_HEADER } else { 12 };
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let fd = conn.fd.as_raw_fd();
        let peeked = match recv(fd, &mut buf[..want], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Step::Gone,
            Ok(n) => &buf[..n],
            Err(Errno::EAGAIN | Errno::EINTR) if !at_end => return Step::Pending,
            Err(_) => return Step::Gone,
        };
        if !trusted {
            return match proxy::starts_like_header(peeked) {
                Some(true) => Step::Rejected,
                // A direct client whose first bytes, so far, are a prefix of a header's: it is
                // one only if more come.
                None if !at_end => Step::Pending,
                _ => Step::Done { proxied: false },
            };
        }
        let header = match proxy::parse(self.accept, peeked) {
            Ok(Parsed::Header(header)) => header,
            Ok(Parsed::Incomplete) if !at_end => return Step::Pending,
            Ok(Parsed::Incomplete) | Err(_) => return Step::Rejected,
        };
        if !consume(fd, &mut buf[..header.len]) {
            return Step::Gone;
        }
        if let Some(source) = header.source {
            conn.peer = source;
        }
        Step::Done { proxied: true }
    }
}

/// Reads exactly `buf.len()` bytes, which have been peeked (so they are there).
fn consume(fd: i32, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match recv(fd, &mut buf[done..], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
    true
}
