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

/// How long a hand-back may wait for room in the mailbox (the dispatcher reads it at once unless
/// it is wedged).
const HANDBACK_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The TCP port the dispatcher serves (its answer says).
    pub port: u16,
}

impl WorkerLink {
    /// Registers through the named registration socket at `path` (`server -path`): connects,
    /// registers on the connection, and closes it once answered.
    pub fn register_at(path: &std::path::Path) -> Result<WorkerLink, RegisterError> {
        let conn = crate::named::connect(path, REGISTER_TIMEOUT)?;
        WorkerLink::register(conn.as_fd())
    }

    /// Creates the link and the mailbox, hands the dispatcher its ends (and a reference to our
    /// end of the mailbox) with our pid, and waits for its answer.
    pub fn register(registration: BorrowedFd) -> Result<WorkerLink, RegisterError> {
        let (link, dispatcher_link) = fdpass::seqpacket_pair()?;
        let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair()?;
        let message =
            wire::encode_registration(wire::Registration { version: wire::VERSION, pid: std::process::id() as i32 });
        let fds = [dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()];
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        // The registration socket's queue is short (net.unix.max_dgram_qlen, 10 by default):
        // when many workers start at once, this waits until there is room again.
        send_when_room(registration, &message, &fds, deadline)?;
        // Our copies of the dispatcher's ends must go, or its closing them would not show here.
        drop((dispatcher_link, dispatcher_mailbox));
        let mut buf = [0u8; MAX_MESSAGE];
        let port = loop {
            fdpass::wait_readable(link.as_fd(), deadline.saturating_duration_since(Instant::now()))?;
            match fdpass::recv_with_fds(link.as_fd(), &mut buf) {
                Ok(Received::Message(len, _)) => match wire::decode_answer(&buf[..len]) {
                    Some(Answer::Accepted { port, .. }) => break port,
                    Some(Answer::Refused(why)) => return Err(RegisterError::Refused(why)),
                    None => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed answer").into()),
                },
                Ok(Received::Empty) => {}
                Ok(Received::Closed) => return Err(io::Error::from_raw_os_error(libc::ECONNRESET).into()),
                Err(err) => return Err(err.into()),
            }
        };
        Ok(WorkerLink { link, mailbox, armed: false, generation: crate::fork_safety::generation(), port })
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
    /// Gives a connection back to the dispatcher, to be parked until its client sends more:
    /// `conn` travels in a hand-back on this worker's end of its mailbox, with `peer`, the address
    /// it was delivered with. The caller still owns `conn` and closes its copy afterwards.
    /// Waits at most [`HANDBACK_TIMEOUT`] for room (ETIMEDOUT); EPIPE: the server has closed.
    pub fn hand_back(&self, conn: BorrowedFd, peer: &SocketAddr) -> io::Result<()> {
        let mut message = [0u8; MAX_MESSAGE];
        let len = wire::encode_handback(peer, &mut message);
        send_when_room(self.mailbox.as_fd(), &message[..len], &[conn], Instant::now() + HANDBACK_TIMEOUT)
    }

    /// True if this process could take one more fd now (a delivered connection needs one).
    pub fn has_free_fd(&self) -> bool {
        fdpass::has_free_fds(self.mailbox.as_fd(), 1)
    }
}

/// Sends one message with `fds` on `sock`, waiting for room in the peer's queue until `deadline`
/// (then ETIMEDOUT).
fn send_when_room(sock: BorrowedFd, message: &[u8], fds: &[BorrowedFd], deadline: Instant) -> io::Result<()> {
    loop {
        match fdpass::send_with_fds(sock, message, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                fdpass::wait_writable(sock, deadline.saturating_duration_since(Instant::now()))?;
            }
            sent => return sent,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A registered worker's link, made by hand: the worker's ends, and the dispatcher's
    /// mailbox end.
    fn registered() -> (WorkerLink, OwnedFd) {
        let (link, _dispatcher_link) = fdpass::seqpacket_pair().unwrap();
        let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
        let worker = WorkerLink { link, mailbox, armed: false, generation: crate::fork_safety::generation(), port: 1 };
        (worker, dispatcher_mailbox)
    }

    #[test]
    fn a_hand_back_arrives_on_the_dispatchers_mailbox_end_with_the_connection_and_its_peer() {
        let (worker, dispatcher_mailbox) = registered();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, _) = listener.accept().unwrap();
        // The peer as delivered, which need not be getpeername's (a PROXY header's, say).
        let delivered: SocketAddr = "[2001:db8::7]:4711".parse().unwrap();
        worker.hand_back(conn.as_fd(), &delivered).unwrap();
        drop(conn); // the worker closes its copy; the connection lives on in the message
        let mut buf = [0u8; MAX_MESSAGE];
        let Received::Message(len, mut fds) = fdpass::recv_with_fds(dispatcher_mailbox.as_fd(), &mut buf).unwrap() else {
            panic!("expected the hand-back")
        };
        assert_eq!(wire::decode_handback(&buf[..len]), Some(delivered));
        assert_eq!(fds.len(), 1);
        let mut parked = TcpStream::from(fds.pop().unwrap());
        client.write_all(b"next request").unwrap();
        let mut got = [0u8; 12];
        parked.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"next request", "the same connection, still open");
        parked.write_all(b"reply").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"reply");
    }

    #[test]
    fn a_hand_back_waits_for_room_in_a_full_mailbox() {
        let (worker, dispatcher_mailbox) = registered();
        let mut queued = 0;
        while fdpass::send_message(worker.mailbox.as_fd(), b"x").is_ok() {
            queued += 1;
            assert!(queued < 100_000, "the mailbox never fills");
        }
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            // Exactly the fillers: the hand-back may arrive while they are read.
            let mut buf = [0u8; MAX_MESSAGE];
            for _ in 0..queued {
                let filler = fdpass::recv_with_fds(dispatcher_mailbox.as_fd(), &mut buf);
                assert!(matches!(filler, Ok(Received::Message(1, _))), "{filler:?}");
            }
            dispatcher_mailbox
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, peer) = listener.accept().unwrap();
        worker.hand_back(conn.as_fd(), &peer).expect("sent once the dispatcher has read its mailbox");
        let dispatcher_mailbox = reader.join().unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let Received::Message(len, fds) = fdpass::recv_with_fds(dispatcher_mailbox.as_fd(), &mut buf).unwrap() else {
            panic!("expected the hand-back")
        };
        assert_eq!((wire::decode_handback(&buf[..len]), fds.len()), (Some(peer), 1));
    }

    #[test]
    fn a_hand_back_to_a_closed_server_fails_with_epipe() {
        let (worker, dispatcher_mailbox) = registered();
        drop(dispatcher_mailbox);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (conn, peer) = listener.accept().unwrap();
        let err = worker.hand_back(conn.as_fd(), &peer).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
