//! The worker side of the wire: a private link to the dispatcher, on which the worker says it is
//! ready, and a private mailbox, on which it receives one connection at a time. No Tcl here;
//! `commands` wires it to the event loop.

use crate::fdpass::{self, Received, MAX_MESSAGE};
use std::io;
use std::net::SocketAddr;
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
    link: OwnedFd,
    mailbox: OwnedFd,
    armed: bool,
    generation: u64,
}

impl WorkerLink {
    /// Creates the link and the mailbox and hands the dispatcher its ends (and a reference to
    /// our end of the mailbox), with our pid.
    pub fn register(registration: BorrowedFd) -> io::Result<WorkerLink> {
        let (link, dispatcher_link) = fdpass::seqpacket_pair()?;
        let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair()?;
        let message = fdpass::encode_registration(std::process::id() as i32);
        let fds = [dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()];
        let deadline = std::time::Instant::now() + REGISTER_TIMEOUT;
        loop {
            match fdpass::send_with_fds(registration, &message, &fds) {
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
        Ok(WorkerLink { link, mailbox, armed: false, generation: crate::fork_safety::generation() })
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
            fdpass::send_message(self.link.as_fd(), &fdpass::encode_ready(fdpass::monotonic_ns()))?;
            self.armed = true;
        }
        Ok(())
    }

    /// Takes the connection if one has arrived. `Ok(None)`: the server has closed.
    /// `WouldBlock`: nothing yet. `EMFILE`: it arrived, but this process had no fd for it, so
    /// the kernel closed it; the worker is no longer armed.
    pub fn receive(&mut self) -> io::Result<Option<Delivery>> {
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            match fdpass::recv_with_fds(self.mailbox.as_fd(), &mut buf) {
                Ok(Received::Message(len, mut fds)) if fds.len() == 1 => {
                    self.armed = false;
                    let peer = fdpass::decode_peer(&buf[..len]).unwrap_or(fdpass::UNKNOWN_PEER);
                    return Ok(Some(Delivery { fd: fds.pop().expect("one fd"), peer }));
                }
                Ok(Received::Message(..)) => continue, // not a delivery: its fds (if any) are closed
                Ok(Received::Closed) => {
                    self.armed = false;
                    return Ok(None);
                }
                Ok(Received::Empty) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(err) => {
                    if err.raw_os_error() == Some(libc::EMFILE) {
                        self.armed = false;
                    }
                    return Err(err);
                }
            }
        }
    }
}

impl WorkerLink {
    /// True if this process could take one more fd now (a delivered connection needs one).
    pub fn has_free_fd(&self) -> bool {
        fdpass::has_free_fds(self.mailbox.as_fd(), 1)
    }
}

/// The fd to watch: the mailbox, which is readable when a connection has arrived and at its end
/// when the server has closed.
impl AsFd for WorkerLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.mailbox.as_fd()
    }
}

impl AsRawFd for WorkerLink {
    fn as_raw_fd(&self) -> RawFd {
        self.mailbox.as_raw_fd()
    }
}
