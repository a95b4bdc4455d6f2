//! The wire between dispatcher and workers: SOCK_SEQPACKET messages, some carrying fds.
//!
//! A worker has two private socketpairs with the dispatcher: its link, on which it says it is
//! ready (and whose closing says it is gone), and its mailbox, on which connections arrive.
//! Messages (one datagram each, so boundaries hold):
//! - worker → dispatcher, on the shared registration socket: `W` + pid (i32 LE), with three fds
//!   attached: the dispatcher's end of the link, the dispatcher's end of the mailbox, and the
//!   worker's own end of the mailbox (see `dispatcher`: it is how an undelivered connection
//!   survives its worker);
//! - worker → dispatcher, on the link: `R` + when it asked (CLOCK_MONOTONIC ns, u64 LE): ready
//!   for one connection;
//! - dispatcher → worker, on the mailbox: the peer address, with the client fd attached.
//!
//! Also here: the listener and `accept4`, since both deal in socket addresses.

use nix::sys::socket::{
    self, sendmsg, setsockopt, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, SockaddrLike, SockaddrStorage,
};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const READY: u8 = b'R';
const REGISTER: u8 = b'W';
/// The most fds one message carries: a registration's.
pub const MAX_FDS: usize = 3;

/// What a peer address that cannot be read is reported as: 0.0.0.0 port 0.
pub const UNKNOWN_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// Longest message: a registration (5 bytes) or an IPv6 peer (1 + 2 + 16).
pub const MAX_MESSAGE: usize = 19;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A connected pair of close-on-exec SOCK_SEQPACKET sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(errno)
}

/// Encodes a peer address: family (4 or 6), port (big-endian), address bytes.
pub fn encode_peer(peer: &SocketAddr, buf: &mut [u8; MAX_MESSAGE]) -> usize {
    let port = peer.port().to_be_bytes();
    buf[1..3].copy_from_slice(&port);
    match peer.ip() {
        IpAddr::V4(ip) => {
            buf[0] = 4;
            buf[3..7].copy_from_slice(&ip.octets());
            7
        }
        IpAddr::V6(ip) => {
            buf[0] = 6;
            buf[3..19].copy_from_slice(&ip.octets());
            19
        }
    }
}

pub fn decode_peer(bytes: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*bytes.get(1)?, *bytes.get(2)?]);
    match (bytes[0], bytes.len()) {
        (4, 7) => {
            let octets: [u8; 4] = bytes[3..7].try_into().ok()?;
            Some(SocketAddr::new(Ipv4Addr::from(octets).into(), port))
        }
        (6, 19) => {
            let octets: [u8; 16] = bytes[3..19].try_into().ok()?;
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        _ => None,
    }
}

/// Sends one message with `fds` attached. Never blocks and never raises SIGPIPE.
pub fn send_with_fds(sock: BorrowedFd, payload: &[u8], fds: &[BorrowedFd]) -> io::Result<()> {
    debug_assert!(fds.len() <= MAX_FDS);
    let mut raw = [0 as RawFd; MAX_FDS];
    let count = fds.len().min(MAX_FDS);
    for (slot, fd) in raw.iter_mut().zip(fds) {
        *slot = fd.as_raw_fd();
    }
    let cmsg = [ControlMessage::ScmRights(&raw[..count])];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(payload)], &cmsg, flags, None)
        .map_err(errno)?;
    Ok(())
}

/// True if this process could take `count` (at most [`MAX_FDS`]) more fds now: tried with dups
/// of `any` (any number, 0 up), closed at once.
pub fn has_free_fds(any: BorrowedFd, count: usize) -> bool {
    let mut probes: [Option<OwnedFd>; MAX_FDS] = Default::default();
    for probe in probes.iter_mut().take(count) {
        // SAFETY: F_DUPFD_CLOEXEC makes a new fd that only we know; it closes as `probes` drops.
        let fd = unsafe { libc::fcntl(any.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: fd is the new fd just made.
        *probe = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    true
}

/// Sends a message without fds. Never blocks and never raises SIGPIPE.
pub fn send_message(sock: BorrowedFd, payload: &[u8]) -> io::Result<()> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    socket::send(sock.as_raw_fd(), payload, flags).map_err(errno)?;
    Ok(())
}

/// Receives a message without room for fds (any attached are discarded by the kernel).
/// `None`: the peer has closed its end.
fn recv_message(sock: BorrowedFd, buf: &mut [u8; MAX_MESSAGE]) -> io::Result<Option<usize>> {
    match socket::recv(sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
        Ok(0) | Err(nix::errno::Errno::ECONNRESET) => Ok(None),
        Ok(len) => Ok(Some(len)),
        Err(e) => Err(errno(e)),
    }
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed message")
}

/// Receives a one-byte message. `None`: the peer has closed its end.
pub fn recv_byte(sock: BorrowedFd) -> io::Result<Option<u8>> {
    let mut buf = [0u8; MAX_MESSAGE];
    match recv_message(sock, &mut buf)? {
        Some(1) => Ok(Some(buf[0])),
        Some(_) => Err(malformed()),
        None => Ok(None),
    }
}

/// A worker's READY, stamped with when it asked, so that READYs read together still queue in
/// the order they were sent.
pub fn encode_ready(at_ns: u64) -> [u8; 9] {
    let mut buf = [READY; 9];
    buf[1..].copy_from_slice(&at_ns.to_le_bytes());
    buf
}

/// Receives a READY and when it was sent. `None`: the peer has closed its end.
pub fn recv_ready(sock: BorrowedFd) -> io::Result<Option<u64>> {
    let mut buf = [0u8; MAX_MESSAGE];
    match recv_message(sock, &mut buf)? {
        Some(9) if buf[0] == READY => Ok(Some(u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes")))),
        Some(_) => Err(malformed()),
        None => Ok(None),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so workers'
/// stamps compare.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the live local we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// What one non-blocking receive found.
#[derive(Debug)]
pub enum Received {
    /// A message of this many bytes, with the fds it carried.
    Message(usize, Vec<OwnedFd>),
    /// The peer has closed its end.
    Closed,
    /// Nothing to read now.
    Empty,
}

/// Receives one message and the fds it may carry (at most [`MAX_FDS`]), made close-on-exec by
/// the kernel. Raw recvmsg(2), because the fds that did arrive must be taken (and closed) even
/// when the kernel could not deliver all of them (MSG_CTRUNC), which nix's parser refuses.
pub fn recv_with_fds(sock: BorrowedFd, buf: &mut [u8]) -> io::Result<Received> {
    // Room for exactly MAX_FDS fds in one SCM_RIGHTS message (CMSG_SPACE(12) is 32 on Linux),
    // as u64s for the cmsghdr's alignment: a message with more is cut short (MSG_CTRUNC).
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    debug_assert_eq!(std::mem::size_of_val(&control), unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize);
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points to the live iovec and control buffer above, with their true lengths.
    let len = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if len < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Received::Empty),
            Some(libc::ECONNRESET) => Ok(Received::Closed),
            _ => Err(err),
        };
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_controllen bytes of control with well-formed cmsghdrs; the
    // CMSG_* helpers stay within them. Each SCM_RIGHTS fd was just installed in our table for
    // us and nobody else knows its number, so each gets exactly one owner here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                fds.extend((0..count).map(|i| OwnedFd::from_raw_fd(data.add(i).read_unaligned())));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let fds_cut = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if msg.msg_flags & libc::MSG_TRUNC != 0 || (fds_cut && fds.len() >= MAX_FDS) {
        // Not a message of ours: the fds received are closed as `fds` drops.
        return Err(malformed());
    }
    if fds_cut {
        // Room for the fds, but no free fd numbers: the kernel has closed those that did not
        // fit, and those that did are closed as `fds` drops.
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    if len == 0 && fds.is_empty() {
        return Ok(Received::Closed);
    }
    Ok(Received::Message(len as usize, fds))
}

pub fn encode_registration(pid: i32) -> [u8; 5] {
    let p = pid.to_le_bytes();
    [REGISTER, p[0], p[1], p[2], p[3]]
}

pub fn decode_registration(bytes: &[u8]) -> Option<i32> {
    match bytes {
        [REGISTER, a, b, c, d] => Some(i32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Creates a non-blocking, close-on-exec listening socket on `addr` (port 0: the kernel picks).
/// IPv6 listeners are IPv6-only, so peers' addresses are never IPv4-mapped.
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(family, SockType::Stream, flags, None).map_err(errno)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(errno)?;
    if family == AddressFamily::Inet6 {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(errno)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(errno)?;
    let backlog = backlog.min(i32::MAX as u32) as i32;
    // Raw listen(2): nix 0.29's takes a Backlog that refuses values above SOMAXCONN, which the
    // kernel would cap anyway.
    // SAFETY: listen(2) on a socket we own; the kernel caps the backlog at somaxconn.
    crate::sys::check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// The address a socket is bound to.
pub fn local_addr(fd: BorrowedFd) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(errno)?;
    storage_to_std(&addr).ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
}

fn storage_to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddrV4::new(v4.ip(), v4.port()).into());
    }
    let v6 = addr.as_sockaddr_in6()?;
    Some(SocketAddrV6::new(v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()).into())
}

/// Accepts one connection as a blocking, close-on-exec socket, with its peer's address.
/// A peer of an unknown family is reported as unspecified rather than refused.
pub fn accept(listener: BorrowedFd) -> io::Result<(OwnedFd, SocketAddr)> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is a zeroed sockaddr_storage and len says its size, so the kernel writes
    // at most that much.
    let fd = crate::sys::check(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            storage.as_mut_ptr().cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 returned a new fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: storage was zero-initialised and the kernel filled at most len bytes of it.
    let addr = unsafe { SockaddrStorage::from_raw(storage.as_ptr().cast(), Some(len)) };
    let peer = addr.as_ref().and_then(storage_to_std).unwrap_or(UNKNOWN_PEER);
    Ok((fd, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn peers_round_trip() {
        let mut buf = [0; MAX_MESSAGE];
        for peer in ["127.0.0.1:8080", "[::1]:65535", "10.1.2.3:0", "[fe80::1]:1"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let len = encode_peer(&peer, &mut buf);
            assert_eq!(decode_peer(&buf[..len]), Some(peer));
        }
        assert_eq!(decode_peer(&[4, 0]), None);
        assert_eq!(decode_peer(&[6, 0, 1, 2, 3, 4, 5]), None);
        assert_eq!(decode_peer(&[]), None);
    }

    #[test]
    fn registrations_round_trip() {
        assert_eq!(decode_registration(&encode_registration(4242)), Some(4242));
        assert_eq!(decode_registration(b"R"), None);
    }

    #[test]
    fn an_fd_travels_with_its_message_and_arrives_cloexec() {
        let (a, b) = seqpacket_pair().unwrap();
        let (tx, rx) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[tx.as_fd()]).unwrap();
        send_message(a.as_fd(), &encode_ready(42)).unwrap();
        let mut buf = [0; MAX_MESSAGE];
        let Received::Message(len, mut fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap() else {
            panic!("expected a message")
        };
        let fd = fds.pop().expect("an fd");
        assert_eq!(&buf[..len], b"hello");
        // SAFETY: F_GETFD only reads the fd's flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // The received fd is the same socket: what goes in one end comes out of rx.
        send_message(fd.as_fd(), b"x").unwrap();
        let Received::Message(1, fds) = recv_with_fds(rx.as_fd(), &mut buf).unwrap() else {
            panic!("expected one byte")
        };
        assert!(fds.is_empty());
        assert_eq!(buf[0], b'x');
        // Boundaries hold: the next message is the READY, then nothing, then EOF.
        assert_eq!(recv_ready(b.as_fd()).unwrap(), Some(42));
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Empty));
        assert_eq!(recv_byte(b.as_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Closed));
        assert_eq!(recv_byte(b.as_fd()).unwrap(), None);
    }

    #[test]
    fn a_message_carries_up_to_three_fds_in_order() {
        let (a, b) = seqpacket_pair().unwrap();
        let pairs: Vec<_> = (0..MAX_FDS).map(|_| seqpacket_pair().unwrap()).collect();
        let sent: Vec<BorrowedFd> = pairs.iter().map(|(x, _)| x.as_fd()).collect();
        send_with_fds(a.as_fd(), b"W", &sent).unwrap();
        let mut buf = [0; MAX_MESSAGE];
        let Received::Message(1, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap() else {
            panic!("expected a message")
        };
        assert_eq!(fds.len(), MAX_FDS);
        for (i, (fd, (_, peer))) in fds.iter().zip(&pairs).enumerate() {
            send_message(fd.as_fd(), &[i as u8]).unwrap();
            assert_eq!(recv_byte(peer.as_fd()).unwrap(), Some(i as u8));
        }
    }

    #[test]
    fn fds_that_do_not_fit_are_an_emfile_error_and_those_that_did_are_closed() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), b"W", &[x.as_fd(), x.as_fd()]).unwrap();
        // SAFETY: the child only calls what the check needs, then leaves with _exit.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: fd-table calls on our own fds, in the child only.
                let ok = unsafe {
                    let limit = libc::rlimit { rlim_cur: 4096, rlim_max: 4096 };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    let any = a.as_raw_fd();
                    let mut last = -1;
                    loop {
                        let fd = libc::dup(any);
                        if fd < 0 {
                            break;
                        }
                        last = fd;
                    }
                    libc::close(last); // one fd number free: the first fd fits, the second not
                    let mut buf = [0u8; MAX_MESSAGE];
                    let emfile = recv_with_fds(b.as_fd(), &mut buf).err().and_then(|e| e.raw_os_error());
                    let freed = libc::dup(any) >= 0 && libc::dup(any) < 0; // exactly one free again
                    emfile == Some(libc::EMFILE) && freed
                };
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            pid => {
                assert!(pid > 0);
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            }
        }
    }

    #[test]
    fn sending_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = seqpacket_pair().unwrap();
        drop(b);
        let err = send_message(a.as_fd(), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn accept_reports_the_peer_and_returns_a_blocking_socket() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(listener.as_fd()).unwrap();
        assert_ne!(addr.port(), 0);
        let mut client = TcpStream::connect(addr).unwrap();
        let (conn, peer) = accept(listener.as_fd()).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // SAFETY: F_GETFL only reads the status flags.
        let flags = unsafe { libc::fcntl(conn.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let mut conn = TcpStream::from(conn);
        conn.write_all(b"hi").unwrap();
        let mut reply = [0; 2];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"hi");
    }

    #[test]
    fn listen_reports_address_in_use() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = listen(taken.local_addr().unwrap(), 16).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn ipv6_listeners_accept_ipv6_peers() {
        let Ok(listener) = listen("[::1]:0".parse().unwrap(), 16) else {
            return; // no IPv6 loopback on this machine
        };
        let addr = local_addr(listener.as_fd()).unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let (_conn, peer) = accept(listener.as_fd()).unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }
}
