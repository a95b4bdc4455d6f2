//! The worker side of the wire: one private socket to the dispatcher, over which the worker says
//! it is ready and receives one connection at a time. No Tcl here; `tclcmd` wires it to the
//! event loop.

use crate::fdpass::{self, Received, ACK, MAX_MESSAGE, READY};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

/// How long registering may wait for room in the registration socket.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection handed over by the dispatcher.
#[derive(Debug)]
pub struct Delivery {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
}

/// This process's registration with one dispatcher.
#[derive(Debug)]
pub struct WorkerLink {
    sock: OwnedFd,
    armed: bool,
    generation: u64,
}

impl WorkerLink {
    /// Creates a private socketpair and hands the dispatcher its end, with our pid.
    pub fn register(registration: BorrowedFd) -> io::Result<WorkerLink> {
        let (sock, dispatcher_end) = fdpass::seqpacket_pair()?;
        let message = fdpass::encode_registration(std::process::id() as i32);
        let deadline = std::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            match fdpass::send_with_fd(registration, &message, dispatcher_end.as_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
                    }
                    std::thread::sleep(left.min(Duration::from_millis(1)));
                }
                sent => break sent?,
            }
        }
        Ok(WorkerLink { sock, armed: false, generation: crate::fork_safety::generation() })
    }

    /// True in a forked child of the process that registered: the dispatcher knows the parent.
    pub fn is_inherited(&self) -> bool {
        self.generation != crate::fork_safety::generation()
    }

    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Asks for one connection; asking again before it arrives changes nothing.
    pub fn arm(&mut self) -> io::Result<()> {
        if !self.armed {
            fdpass::send_byte(self.sock.as_fd(), READY)?;
            self.armed = true;
        }
        Ok(())
    }

    /// Takes the connection if one has arrived, and acknowledges it so the dispatcher lets go of
    /// its copy. `Ok(None)`: the server has closed. `WouldBlock`: nothing yet.
    pub fn receive(&mut self) -> io::Result<Option<Delivery>> {
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            match fdpass::recv_with_fd(self.sock.as_fd(), &mut buf)? {
                Received::Message(len, Some(fd)) => {
                    self.armed = false;
                    // If the dispatcher has gone it needs no ACK; the connection is ours anyway.
                    let _ = fdpass::send_byte(self.sock.as_fd(), ACK);
                    let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
                    let peer = fdpass::decode_peer(&buf[..len]).unwrap_or(unspecified);
                    return Ok(Some(Delivery { fd, peer }));
                }
                Received::Message(_, None) => continue,
                Received::Closed => {
                    self.armed = false;
                    return Ok(None);
                }
                Received::Empty => return Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }
}

impl AsFd for WorkerLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for WorkerLink {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}
