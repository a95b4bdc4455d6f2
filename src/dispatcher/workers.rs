//! The registry of workers: who they are, checking what a registration hands over, and reading
//! back what a worker that went had not taken.
//!
//! Everything a worker sends is untrusted. A registration's fds must be AF_UNIX SOCK_SEQPACKET
//! sockets, and the third must really be the mailbox's other end: a nonce sent into the mailbox
//! must come out of it. What is read back from a dead worker's mailbox must be the very socket
//! the dispatcher had sent it (same inode), with a well-formed peer address: a worker can queue
//! other sockets in its own mailbox, and those are closed, never handed to another worker.

use super::control::{WorkerState, WorkerStatus};
use crate::fdpass::{self, Received};
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use crate::wire::{self, MAX_MESSAGE};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Instant;

/// Messages read back from a dead worker's mailbox at most: it is sent one connection at a
/// time, so more can only be junk that a hostile worker queued there.
const READ_BACK_LIMIT: usize = 8;

/// An accepted connection and the peer's address.
#[derive(Debug)]
pub struct Connection {
    pub fd: ParentOnlyFd,
    pub peer: SocketAddr,
}

#[derive(Debug)]
pub struct Worker {
    /// Says READY; closes when the worker goes.
    pub link: ParentOnlyFd,
    /// Where connections are sent.
    pub mailbox: ParentOnlyFd,
    /// The worker's end of the mailbox: what it has not taken can be read back from here.
    mailbox_peer: ParentOnlyFd,
    pub pid: i32,
    /// Tells this worker's events from those of an earlier one in the same slot.
    pub serial: u32,
    pub ready: bool,
    delivered: u64,
    /// A connection was sent and not yet counted as taken.
    sent_untaken: bool,
    /// Which socket (see `fdpass::identity`) the connection last sent is: the only one that
    /// read-back takes.
    sent_identity: Option<(u64, u64)>,
    /// No READY of this worker can have been sent before this (CLOCK_MONOTONIC ns): when it
    /// registered or was last sent a connection.
    asked_floor_ns: u64,
    /// When its current connection was handed over; None before the first or once ready again.
    busy_since: Option<Instant>,
}

impl Worker {
    pub fn status(&self) -> WorkerStatus {
        let state = match (self.ready, self.busy_since) {
            (true, _) => WorkerState::Ready,
            (false, Some(_)) => WorkerState::Busy,
            (false, None) => WorkerState::Idle,
        };
        let busy_ms = self.busy_since.map_or(0, |t| t.elapsed().as_millis() as u64);
        WorkerStatus { pid: self.pid, state, delivered: self.delivered, busy_ms }
    }

    pub fn sent(&mut self, identity: Option<(u64, u64)>) {
        self.sent_untaken = true;
        self.sent_identity = identity;
        self.busy_since = Some(Instant::now());
        self.asked_floor_ns = fdpass::monotonic_ns();
    }

    /// When the worker says it asked, kept between when it could have asked and now: the stamp
    /// orders the ready queue, and a worker must not jump it by lying (or by another clock).
    pub fn asked_at(&self, claimed_ns: u64) -> u64 {
        claimed_ns.clamp(self.asked_floor_ns, fdpass::monotonic_ns().max(self.asked_floor_ns))
    }

    pub fn asked(&mut self) {
        self.ready = true;
        self.busy_since = None;
    }

    /// Counts the connection sent to it as taken if it is no longer in its mailbox (a worker
    /// asks again only once it has taken what it was sent; it may also have taken it and left).
    /// True if it counted one.
    pub fn note_taken(&mut self, asked_again: bool) -> bool {
        if self.sent_untaken && (asked_again || !fdpass::has_queued(self.mailbox_peer.as_fd())) {
            self.sent_untaken = false;
            self.delivered += 1;
            return true;
        }
        false
    }

    /// Reads back the connection sent to it that it had not taken, if any; closes anything else
    /// found there. Returns it and how many messages were dropped.
    pub fn read_back(&self) -> (Option<Connection>, u64) {
        let mut buf = [0u8; MAX_MESSAGE];
        let mut found = None;
        let mut dropped = 0;
        for _ in 0..READ_BACK_LIMIT {
            // Received fds are adopted or closed before the section ends: no fork catches them.
            let section = CreateSection::enter();
            match fdpass::recv_with_fds(self.mailbox_peer.as_fd(), &mut buf) {
                Ok(Received::Message(len, mut fds)) => {
                    let peer = wire::decode_peer(&buf[..len]);
                    let conn = match (fds.pop(), peer) {
                        (Some(fd), Some(peer))
                            if fds.is_empty()
                                && self.sent_identity.is_some()
                                && fdpass::identity(fd.as_fd()) == self.sent_identity =>
                        {
                            section.adopt(fd).ok().map(|fd| Connection { fd, peer })
                        }
                        _ => None,
                    };
                    match conn {
                        Some(conn) if found.is_none() && self.sent_untaken => found = Some(conn),
                        _ => dropped += 1,
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::InvalidData => dropped += 1,
                _ => break,
            }
        }
        (found, dropped)
    }

    /// Takes one hand-back from the worker's end of its mailbox: the connection, if the message
    /// is well formed and carries a TCP socket; `Some(None)` if it was not (closed, counted by
    /// the caller); `None` if there is none.
    pub fn read_handback(&self) -> Option<Option<Connection>> {
        let mut buf = [0u8; MAX_MESSAGE];
        // Received fds are adopted or closed before the section ends: no fork catches them.
        let section = CreateSection::enter();
        match fdpass::recv_with_fds(self.mailbox.as_fd(), &mut buf) {
            Ok(Received::Message(len, mut fds)) => Some(match (fds.pop(), wire::decode_handback(&buf[..len])) {
                (Some(fd), Some(peer)) if fds.is_empty() && fdpass::is_tcp_stream(fd.as_fd()) => {
                    // Delivered later as an accepted connection is: blocking (a worker may have
                    // made it non-blocking, and the flag belongs to the connection, not the fd).
                    fdpass::set_blocking(fd.as_fd());
                    section.adopt(fdpass::above_select_range(fd)).ok().map(|fd| Connection { fd, peer })
                }
                _ => None,
            }),
            // Malformed, or its connection lost for lack of fds.
            Err(err) if err.kind() == io::ErrorKind::InvalidData || err.raw_os_error() == Some(libc::EMFILE) => {
                Some(None)
            }
            // Empty; never closed (we hold both ends); or a failing socket.
            _ => None,
        }
    }
}

/// True if `mailbox` is an AF_UNIX SOCK_SEQPACKET socket and `mailbox_peer` its other end: a
/// nonce sent into the one comes out of the other.
pub fn is_mailbox_pair(mailbox: &ParentOnlyFd, mailbox_peer: &ParentOnlyFd, nonce: u64) -> bool {
    if !fdpass::is_unix_seqpacket(mailbox.as_fd())
        || fdpass::send_message(mailbox.as_fd(), &wire::encode_check(nonce)).is_err()
    {
        return false;
    }
    let mut buf = [0u8; MAX_MESSAGE];
    // Fds that come with the answer are closed before the section ends: no fork catches them.
    let _section = CreateSection::enter();
    match fdpass::recv_with_fds(mailbox_peer.as_fd(), &mut buf) {
        Ok(Received::Message(len, fds)) => fds.is_empty() && wire::decode_check(&buf[..len]) == Some(nonce),
        _ => false,
    }
}

impl Worker {
    /// A worker whose fds have been checked (see [`is_mailbox_pair`]).
    pub fn new(link: ParentOnlyFd, mailbox: ParentOnlyFd, mailbox_peer: ParentOnlyFd, pid: i32) -> Worker {
        Worker {
            link,
            mailbox,
            mailbox_peer,
            pid,
            serial: 0,
            ready: false,
            delivered: 0,
            sent_untaken: false,
            sent_identity: None,
            asked_floor_ns: fdpass::monotonic_ns(),
            busy_since: None,
        }
    }
}

/// The registered workers, each in a slot (slots are reused).
#[derive(Debug, Default)]
pub struct Registry {
    slots: Vec<Option<Worker>>,
    free: Vec<usize>,
    count: usize,
    last_serial: u32,
}

impl Registry {
    pub fn len(&self) -> usize {
        self.count
    }

    /// Adds a worker; its slot.
    pub fn insert(&mut self, mut worker: Worker) -> usize {
        // Serials start at 1 (see `event_loop::link_token`) and skip 0 when they wrap.
        self.last_serial = self.last_serial.checked_add(1).unwrap_or(1);
        worker.serial = self.last_serial;
        self.count += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(worker);
                slot
            }
            None => {
                self.slots.push(Some(worker));
                self.slots.len() - 1
            }
        }
    }

    pub fn take(&mut self, slot: usize) -> Option<Worker> {
        let worker = self.slots.get_mut(slot)?.take()?;
        self.count -= 1;
        self.free.push(slot);
        Some(worker)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Worker> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// The worker in `slot` if it is the one with this serial.
    pub fn get_current(&mut self, slot: usize, serial: u32) -> Option<&mut Worker> {
        self.get_mut(slot).filter(|w| w.serial == serial)
    }

    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Worker> {
        self.slots.iter().flatten()
    }
}
