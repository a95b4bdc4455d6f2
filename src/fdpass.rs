//! Sockets and the fds they carry: SOCK_SEQPACKET pairs, sending and receiving a message with
//! fds attached (the messages themselves are `wire`'s), checking what kind of socket an fd
//! received from a peer really is, the listener and `accept4`.

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, getsockopt, sendmsg, setsockopt, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType, SockaddrLike, SockaddrStorage,
};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most fds one message carries: a registration's.
pub const MAX_FDS: usize = 3;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A connected pair of close-on-exec SOCK_SEQPACKET sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(errno)
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

/// Clears O_NONBLOCK on `fd` if it is set (a failure leaves it as it was).
pub fn set_blocking(fd: BorrowedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_retain(flags);
        if flags.contains(OFlag::O_NONBLOCK) {
            let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK));
        }
    }
}

/// A new close-on-exec fd for the same file as `any`: a spare that holds an fd number.
pub fn spare_fd(any: BorrowedFd) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::fcntl(any.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0)).map_err(errno)?;
    // SAFETY: F_DUPFD_CLOEXEC has just made fd, and only we know its number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fd` moved to a number at or above FD_SETSIZE (1024) if the fd limit allows, else `fd` as it
/// is. For the dispatcher's long-lived fds (three per worker): the serving process's own Tcl
/// notifier uses select(2), which cannot watch fds from 1024 on, so the numbers below are left to
/// Tcl's channels however many workers register.
pub fn above_select_range(fd: OwnedFd) -> OwnedFd {
    match nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(libc::FD_SETSIZE as RawFd)) {
        // SAFETY: F_DUPFD_CLOEXEC has just made high, and only we know its number; the old fd
        // closes as `fd` drops.
        Ok(high) => unsafe { OwnedFd::from_raw_fd(high) },
        Err(_) => fd,
    }
}

/// True if this process could take `count` (at most [`MAX_FDS`]) more fds now: tried with
/// spares of `any` (any fd), closed at once.
pub fn has_free_fds(any: BorrowedFd, count: usize) -> bool {
    let mut probes: [Option<OwnedFd>; MAX_FDS] = Default::default();
    for probe in probes.iter_mut().take(count) {
        match spare_fd(any) {
            Ok(fd) => *probe = Some(fd),
            Err(_) => return false,
        }
    }
    true
}

/// Sends a message without fds. Never blocks and never raises SIGPIPE.
pub fn send_message(sock: BorrowedFd, payload: &[u8]) -> io::Result<()> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    socket::send(sock.as_raw_fd(), payload, flags).map_err(errno)?;
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so workers'
/// stamps compare.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to the live local we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed message")
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
    // A SOCK_SEQPACKET receive returns 0 both at the end and for an empty datagram (which a
    // peer may send on purpose): only the socket's state tells them apart.
    if len == 0 && fds.is_empty() && peer_has_closed(sock) {
        return Ok(Received::Closed);
    }
    Ok(Received::Message(len as usize, fds))
}

/// True once the peer has closed (or shut down) its end: nothing more will arrive.
fn peer_has_closed(sock: BorrowedFd) -> bool {
    // Raw poll(2): nix 0.29's PollFlags has no POLLRDHUP (the peer has shut down its sending
    // side), and its `revents()` gives None when the kernel reports it.
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one live pollfd, and nfds says one.
    match crate::sys::check(unsafe { libc::poll(&mut pfd, 1, 0) }) {
        Ok(_) => pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0,
        // Cannot tell: say closed, so that the caller stops reading rather than spin.
        Err(_) => true,
    }
}

/// Waits until `fd` is readable (or at its end), or fails with ETIMEDOUT.
pub fn wait_readable(fd: BorrowedFd, timeout: std::time::Duration) -> io::Result<()> {
    wait_for(fd, PollFlags::POLLIN, timeout)
}

/// Waits until `fd` can take a message (for a SOCK_SEQPACKET socket: its peer's receive queue
/// has room), or fails with ETIMEDOUT.
pub fn wait_writable(fd: BorrowedFd, timeout: std::time::Duration) -> io::Result<()> {
    wait_for(fd, PollFlags::POLLOUT, timeout)
}

fn wait_for(fd: BorrowedFd, events: PollFlags, timeout: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        let mut pfd = [PollFd::new(fd, events)];
        match nix::poll::poll(&mut pfd, ms) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(errno(e)),
        }
    }
}

/// True if a message (of any length, even 0) waits in `sock`'s receive queue.
pub fn has_queued(sock: BorrowedFd) -> bool {
    let mut pfd = [PollFd::new(sock, PollFlags::POLLIN)];
    nix::poll::poll(&mut pfd, PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && pfd[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
}

/// True if `fd` is a socket (S_ISSOCK: anything else fails SO_TYPE with ENOTSOCK) of this
/// family and type.
fn is_socket_of(fd: BorrowedFd, family: &[AddressFamily], kind: SockType) -> bool {
    if getsockopt(&fd, sockopt::SockType) != Ok(kind) {
        return false;
    }
    socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|addr| addr.family().is_some_and(|f| family.contains(&f)))
}

/// Which open file `fd` is (st_dev, st_ino): the same for every fd of one socket, in any
/// process, and different for any other socket.
pub fn identity(fd: BorrowedFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|st| (st.st_dev, st.st_ino))
}

/// The pid of the process that made the other end of a Unix socket (SO_PEERCRED).
pub fn peer_pid(fd: BorrowedFd) -> Option<i32> {
    getsockopt(&fd, sockopt::PeerCredentials).ok().map(|cred| cred.pid())
}

/// What a worker's link and mailbox must be: an AF_UNIX SOCK_SEQPACKET socket.
pub fn is_unix_seqpacket(fd: BorrowedFd) -> bool {
    is_socket_of(fd, &[AddressFamily::Unix], SockType::SeqPacket)
}

/// What a connection must be: a TCP (AF_INET or AF_INET6 SOCK_STREAM) socket.
pub fn is_tcp_stream(fd: BorrowedFd) -> bool {
    is_socket_of(fd, &[AddressFamily::Inet, AddressFamily::Inet6], SockType::Stream)
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

/// Why an inherited fd cannot be a server's listener.
#[derive(Debug)]
pub enum Unfit {
    /// Not open (EBADF), or another failure to look at it.
    Io(io::Error),
    NotSocket,
    /// A socket, but not TCP (UDP, a Unix socket, ...).
    NotTcp,
    /// A TCP socket that is not listening.
    NotListening,
}

/// The address of `fd` if it is a listening TCP (AF_INET or AF_INET6 SOCK_STREAM) socket: what
/// `-fd` and `-systemd` adopt.
pub fn listening_address(fd: RawFd) -> Result<SocketAddr, Unfit> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| Unfit::Io(errno(e)))?;
    // SAFETY: fd is open (just checked), and nothing on this thread closes it while borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    match getsockopt(&fd, sockopt::SockType) {
        Err(nix::errno::Errno::ENOTSOCK) => return Err(Unfit::NotSocket),
        Err(e) => return Err(Unfit::Io(errno(e))),
        Ok(_) if !is_tcp_stream(fd) => return Err(Unfit::NotTcp),
        Ok(_) => {}
    }
    if getsockopt(&fd, sockopt::AcceptConn) != Ok(true) {
        return Err(Unfit::NotListening);
    }
    local_addr(fd).map_err(Unfit::Io)
}

/// A close-on-exec duplicate of the listening socket `fd` (checked by [`listening_address`]),
/// for a server to own: `fd` itself stays open and is left to whoever passed it (a service
/// manager's socket outlives the server). The socket is made non-blocking, which its other fds
/// share: another process accepting from it too must never leave the dispatcher blocked in
/// accept(2).
pub fn adopt_listener(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fd is open (the caller checked it), and nothing on this thread closes it meanwhile.
    let own = spare_fd(unsafe { BorrowedFd::borrow_raw(fd) })?;
    let flags = nix::fcntl::fcntl(own.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(errno)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(own.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(errno)?;
    Ok(own)
}

/// The address a socket is bound to.
pub fn local_addr(fd: BorrowedFd) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(errno)?;
    storage_to_std(&addr).ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
}

/// The address of a connected socket's peer.
pub fn peer_addr(fd: BorrowedFd) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = socket::getpeername(fd.as_raw_fd()).map_err(errno)?;
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
    let peer = addr.as_ref().and_then(storage_to_std).unwrap_or(crate::wire::UNKNOWN_PEER);
    Ok((fd, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MAX_MESSAGE;
    use std::os::fd::AsFd;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_full_seqpacket_queue_is_waited_out_until_there_is_room() {
        let (a, b) = seqpacket_pair().unwrap();
        let mut sent = 0;
        while send_message(a.as_fd(), b"W").is_ok() {
            sent += 1;
            assert!(sent < 100_000, "the queue never fills");
        }
        let short = std::time::Duration::from_millis(20);
        let err = wait_writable(a.as_fd(), short).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            // As the dispatcher does: it reads the queue to the end (a socketpair's POLLOUT
            // comes back only once most of the send buffer is free again).
            let mut buf = [0u8; 8];
            while nix::sys::socket::recv(b.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
            b
        });
        wait_writable(a.as_fd(), std::time::Duration::from_secs(5)).expect("room once the queue is read");
        send_message(a.as_fd(), b"W").unwrap();
        drop(reader.join().unwrap());
    }

    #[test]
    fn an_fd_travels_with_its_message_and_arrives_cloexec() {
        let (a, b) = seqpacket_pair().unwrap();
        let (tx, rx) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[tx.as_fd()]).unwrap();
        send_message(a.as_fd(), b"next").unwrap();
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
        // Boundaries hold: the next message is the second, then nothing, then EOF.
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Message(4, _)));
        assert_eq!(&buf[..4], b"next");
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Empty));
        drop(a);
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Closed));
    }

    #[test]
    fn an_empty_datagram_is_a_message_not_the_end() {
        let (a, b) = seqpacket_pair().unwrap();
        send_message(a.as_fd(), b"").unwrap();
        send_message(a.as_fd(), b"").unwrap();
        assert!(has_queued(b.as_fd()));
        let mut buf = [0; MAX_MESSAGE];
        for _ in 0..2 {
            assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Message(0, _)));
        }
        assert!(!has_queued(b.as_fd()), "both read: nothing left to wake anyone");
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Empty));
        drop(a);
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Closed));
    }

    #[test]
    fn oversized_messages_are_malformed_and_consumed() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, _y) = seqpacket_pair().unwrap();
        send_with_fds(a.as_fd(), &[7; 100], &[x.as_fd()]).unwrap();
        let mut buf = [0; MAX_MESSAGE];
        let err = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(recv_with_fds(b.as_fd(), &mut buf).unwrap(), Received::Empty));
    }

    #[test]
    fn socket_kinds_are_told_apart() {
        let (a, _b) = seqpacket_pair().unwrap();
        let listener = listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let client = TcpStream::connect(local_addr(listener.as_fd()).unwrap()).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let (stream, _) = socket::socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).unwrap();
        assert!(is_unix_seqpacket(a.as_fd()));
        assert!(is_tcp_stream(client.as_fd()));
        for not_seqpacket in [client.as_fd(), file.as_fd(), stream.as_fd()] {
            assert!(!is_unix_seqpacket(not_seqpacket));
        }
        for not_tcp in [a.as_fd(), file.as_fd(), stream.as_fd()] {
            assert!(!is_tcp_stream(not_tcp));
        }
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
            assert!(matches!(recv_with_fds(peer.as_fd(), &mut buf).unwrap(), Received::Message(1, _)));
            assert_eq!(buf[0], i as u8);
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
    fn only_a_listening_tcp_socket_can_be_adopted() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let addr = local_addr(listener.as_fd()).unwrap();
        assert_eq!(listening_address(listener.as_raw_fd()).unwrap(), addr);
        let unbound = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (unix, _peer) = seqpacket_pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(listening_address(unbound.as_raw_fd()), Err(Unfit::NotListening)));
        assert!(matches!(listening_address(udp.as_raw_fd()), Err(Unfit::NotTcp)));
        assert!(matches!(listening_address(unix.as_raw_fd()), Err(Unfit::NotTcp)));
        assert!(matches!(listening_address(file.as_raw_fd()), Err(Unfit::NotSocket)));
        let closed = spare_fd(file.as_fd()).unwrap().as_raw_fd(); // closed again at once
        assert!(matches!(listening_address(closed), Err(Unfit::Io(e)) if e.raw_os_error() == Some(libc::EBADF)));
    }

    #[test]
    fn an_adopted_listener_is_a_nonblocking_duplicate() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
        let addr = local_addr(listener.as_fd()).unwrap();
        // As a service manager passes it: blocking.
        nix::fcntl::fcntl(listener.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty())).unwrap();
        let own = adopt_listener(listener.as_raw_fd()).unwrap();
        assert_ne!(own.as_raw_fd(), listener.as_raw_fd());
        assert_eq!(identity(own.as_fd()), identity(listener.as_fd()));
        let err = accept(own.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "no connection yet: accept must not block");
        drop(own);
        let _client = TcpStream::connect(addr).unwrap();
        assert!(accept(listener.as_fd()).is_ok(), "the passed fd stays open and listening");
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
