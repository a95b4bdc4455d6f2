//! The named registration socket's listener and the connections on it that have not yet sent
//! their registration.
//!
//! A worker connects and sends its registration at once, so a connection is usually pending for
//! a moment only; one that sends nothing is closed after [`DEADLINE`], and at most [`CAPACITY`]
//! wait: when all places are taken, the silent one that has waited longest makes room (one that
//! has sent its registration is read first, never evicted; while every place holds one, the rest
//! wait in the listen backlog). So a process that opens connections and sends nothing delays
//! honest workers by nothing more than the places it holds, and costs the dispatcher at most
//! `CAPACITY` fds. Who connected is read with
//! SO_PEERCRED at accept time, so the registration can be answered "not permitted".

use super::event_loop::{member_token, Member};
use crate::fdpass;
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use crate::named::{self, Permitted};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{self, SockFlag};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long a connection may take to send its registration.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Connections waiting for their registration at most.
pub const CAPACITY: usize = 16;
/// Connections accepted in a row before the other sockets get a look.
const ACCEPT_BATCH: usize = 16;

/// A connection to the named socket, waiting for its registration.
#[derive(Debug)]
pub struct Pending {
    pub conn: ParentOnlyFd,
    /// Its uid or gid may register.
    pub permitted: bool,
    deadline: Instant,
    serial: u32,
}

/// What accepting did besides adding connections.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Connections closed to make room (they had sent nothing).
    pub evicted: u64,
    /// Accepting failed for lack of fds or memory: pause.
    pub exhausted: bool,
}

pub struct NamedListener {
    listener: ParentOnlyFd,
    permitted: Permitted,
    own_uid: u32,
    places: Vec<Option<Pending>>,
    last_serial: u32,
}

impl NamedListener {
    pub fn new(listener: ParentOnlyFd, permitted: Permitted) -> NamedListener {
        NamedListener {
            listener,
            permitted,
            own_uid: nix::unistd::geteuid().as_raw(),
            places: (0..CAPACITY).map(|_| None).collect(),
            last_serial: 0,
        }
    }

    pub fn listener(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    pub fn len(&self) -> usize {
        self.places.iter().flatten().count()
    }

    /// Accepts what waits (at most a batch), each into a place, watched in `epoll`. Call it
    /// after the pending connections' own events of the same wait were handled: those are the
    /// registrations that have arrived, and their places are free now.
    pub fn accept(&mut self, epoll: &Epoll, now: Instant) -> Accepted {
        let mut accepted = Accepted::default();
        for _ in 0..ACCEPT_BATCH {
            // A free place, or the one to make free once there is a connection for it.
            let (place, evict) = match self.places.iter().position(Option::is_none) {
                Some(place) => (place, false),
                None => match self.oldest_silent() {
                    Some(place) => (place, true),
                    // Every place holds a registration that the next wait reports: the rest
                    // wait in the backlog until then.
                    None => return accepted,
                },
            };
            let section = CreateSection::enter();
            let conn = match accept(self.listener.as_fd()).and_then(|fd| section.adopt(fd)) {
                Ok(conn) => conn,
                Err(err) => {
                    accepted.exhausted = !matches!(
                        err.raw_os_error(),
                        Some(libc::EAGAIN | libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                    );
                    return accepted;
                }
            };
            drop(section);
            if evict {
                accepted.evicted += 1;
                self.close(epoll, place);
            }
            let permitted = named::peer_credentials(conn.as_fd())
                .is_some_and(|(_, uid, gid)| self.permitted.allows(self.own_uid, uid, gid));
            self.last_serial = self.last_serial.checked_add(1).unwrap_or(1);
            let token = member_token(Member::Pending, place, self.last_serial);
            if epoll.add(conn.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token)).is_ok() {
                self.places[place] = Some(Pending { conn, permitted, deadline: now + DEADLINE, serial: self.last_serial });
            }
        }
        accepted
    }

    /// The place of the connection that has waited longest with nothing sent (a closed one has
    /// something to read: its end, which the next wait reports).
    fn oldest_silent(&self) -> Option<usize> {
        (0..CAPACITY)
            .filter_map(|i| self.places[i].as_ref().map(|p| (i, p)))
            .filter(|(_, p)| !fdpass::has_queued(p.conn.as_fd()))
            .min_by_key(|(_, p)| p.deadline)
            .map(|(i, _)| i)
    }

    /// Takes the connection in `place` if it is the one with `serial`, out of `epoll`.
    pub fn take(&mut self, epoll: &Epoll, place: usize, serial: u32) -> Option<Pending> {
        let pending = self.places.get_mut(place)?.take_if(|p| p.serial == serial)?;
        let _ = epoll.delete(pending.conn.as_fd());
        Some(pending)
    }

    fn close(&mut self, epoll: &Epoll, place: usize) {
        if let Some(pending) = self.places[place].take() {
            let _ = epoll.delete(pending.conn.as_fd());
        }
    }

    /// Closes the connections past their deadline; how many.
    pub fn expire(&mut self, epoll: &Epoll, now: Instant) -> u64 {
        let mut expired = 0;
        for place in 0..CAPACITY {
            if self.places[place].as_ref().is_some_and(|p| p.deadline <= now) {
                self.close(epoll, place);
                expired += 1;
            }
        }
        expired
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.places.iter().flatten().map(|p| p.deadline).min()
    }
}

/// Accepts a Unix connection: non-blocking (a registration is read without waiting) and
/// close-on-exec.
fn accept(listener: BorrowedFd) -> io::Result<OwnedFd> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::accept4(listener.as_raw_fd(), flags).map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    // SAFETY: accept4 returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
