//! The worker side of the wire: a private link to the dispatcher, on which the worker says it is
//! ready, and a private mailbox, on which it receives one connection at a time. No Tcl here;
//! `commands` wires it to the event loop.

use crate::fdpass::{self, Received};
use crate::wire::{self, Answer, Refusal, MAX_MESSAGE};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long registering may wait for room in the registration socket and for the answer.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection handed over by the dispatcher.
#[derive(Debug)]
pub struct Delivery {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
}

/// Why registering failed.
#[derive(Debug)]
pub enum RegisterError {
    /// The dispatcher answered, and said no.
    Refused(Refusal),
    /// No answer: the server has closed (EPIPE, ECONNRESET), or did not answer in time
    /// (ETIMEDOUT), or this process could not make its sockets (EMFILE, ...).
    Io(io::Error),
}

impl From<io::Error> for RegisterError {
    fn from(err: io::Error) -> RegisterError {
        RegisterError::Io(err)
    }
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
    /// Creates the link and the mailbox, hands the dispatcher its ends (and a reference to our
    /// end of the mailbox) with our pid, and waits for its answer.
    pub fn register(registration: BorrowedFd) -> Result<WorkerLink, RegisterError> {
        let (link, dispatcher_link) = fdpass::seqpacket_pair()?;
        let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair()?;
        let message = wire::encode_registration(std::process::id() as i32);
        let fds = [dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()];
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        loop {
            match fdpass::send_with_fds(registration, &message, &fds) {
                // The registration socket's queue is short (net.unix.max_dgram_qlen, 10 by
                // default): when many workers start at once, wait until there is room again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    fdpass::wait_writable(registration, deadline.saturating_duration_since(Instant::now()))?;
                }
                sent => break sent?,
            }
        }
        // Our copies of the dispatcher's ends must go, or its closing them would not show here.
        drop((dispatcher_link, dispatcher_mailbox));
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            fdpass::wait_readable(link.as_fd(), deadline.saturating_duration_since(Instant::now()))?;
            match fdpass::recv_with_fds(link.as_fd(), &mut buf) {
                Ok(Received::Message(len, _)) => match wire::decode_answer(&buf[..len]) {
                    Some(Answer::Accepted) => break,
                    Some(Answer::Refused(why)) => return Err(RegisterError::Refused(why)),
                    None => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed answer").into()),
                },
                Ok(Received::Empty) => {}
                Ok(Received::Closed) => return Err(io::Error::from_raw_os_error(libc::ECONNRESET).into()),
                Err(err) => return Err(err.into()),
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
            fdpass::send_message(self.link.as_fd(), &wire::encode_ready(fdpass::monotonic_ns()))?;
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
                    let peer = wire::decode_peer(&buf[..len]).unwrap_or(wire::UNKNOWN_PEER);
                    return Ok(Some(Delivery { fd: fds.pop().expect("one fd"), peer }));
                }
                Ok(Received::Message(..)) => continue, // not a delivery: its fds (if any) are closed
                Ok(Received::Closed) => {
                    self.armed = false;
                    return Ok(None);
                }
                Ok(Received::Empty) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(err) if err.kind() == io::ErrorKind::InvalidData => continue,
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
