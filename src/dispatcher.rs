//! The serving side: a listener, and a thread that accepts only when a worker can take the
//! connection and hands each one to the longest-waiting ready worker.
//!
//! Nothing is lost if a worker dies before taking its connection: the connection waits in the
//! worker's mailbox socket, and the dispatcher holds a reference to the worker's end of that
//! mailbox too, so the queued message outlives the worker; when the worker's link closes, the
//! dispatcher reads back whatever is still queued and sends it to another worker. So the
//! dispatcher closes its copy of a connection as soon as it is sent, needs no acknowledgement,
//! and wakes up once per connection (to accept it) when other workers are ready.
//!
//! The thread shares nothing with the Tcl thread but sockets: requests (`info`, `close`) arrive
//! on a control socket. So a child forked at any moment finds no lock held by this thread; and
//! every fd the thread owns is a [`ParentOnlyFd`], which forked children close.

use crate::fdpass::{self, Received, MAX_MESSAGE};
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long accepting pauses after running out of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections accepted in a row before the other sockets get a look.
const ACCEPT_BATCH: usize = 64;
/// How long the Tcl thread waits for the dispatcher to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

const STOP: u8 = b'S';
const SNAPSHOT: u8 = b'I';

/// What `::socketserver::info` reports of a dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub accepted: u64,
    pub delivered: u64,
    pub queued: u32,
    pub ready: u32,
    pub workers: Vec<WorkerStatus>,
}

/// One registered worker as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub pid: i32,
    pub state: WorkerState,
    /// Connections it has taken from its mailbox.
    pub delivered: u64,
    /// Milliseconds since its current connection was handed over (0 unless busy).
    pub busy_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Registered, has not asked for a connection yet.
    Idle = 0,
    /// Waiting for a connection.
    Ready = 1,
    /// Has been handed a connection and not asked for the next.
    Busy = 2,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
        }
    }
}

const HEADER_LEN: usize = 24;
const WORKER_LEN: usize = 24;

impl Snapshot {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + WORKER_LEN * self.workers.len());
        out.extend_from_slice(&self.accepted.to_le_bytes());
        out.extend_from_slice(&self.delivered.to_le_bytes());
        out.extend_from_slice(&self.queued.to_le_bytes());
        out.extend_from_slice(&self.ready.to_le_bytes());
        for w in &self.workers {
            out.extend_from_slice(&w.pid.to_le_bytes());
            out.extend_from_slice(&(w.state as u32).to_le_bytes());
            out.extend_from_slice(&w.delivered.to_le_bytes());
            out.extend_from_slice(&w.busy_ms.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Snapshot> {
        if bytes.len() < HEADER_LEN || !(bytes.len() - HEADER_LEN).is_multiple_of(WORKER_LEN) {
            return None;
        }
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let workers = bytes[HEADER_LEN..]
            .chunks_exact(WORKER_LEN)
            .map(|w| {
                let state = match u32_at(w, 4) {
                    0 => WorkerState::Idle,
                    1 => WorkerState::Ready,
                    _ => WorkerState::Busy,
                };
                WorkerStatus { pid: u32_at(w, 0) as i32, state, delivered: u64_at(w, 8), busy_ms: u64_at(w, 16) }
            })
            .collect();
        Some(Snapshot {
            accepted: u64_at(bytes, 0),
            delivered: u64_at(bytes, 8),
            queued: u32_at(bytes, 16),
            ready: u32_at(bytes, 20),
            workers,
        })
    }
}

/// A listening port served by a dispatcher thread, as the Tcl thread that created it sees it.
#[derive(Debug)]
pub struct Server {
    pub address: SocketAddr,
    pub backlog: u32,
    pub queue_limit: usize,
    /// The end of the registration socket that workers (this process and its forked children)
    /// use to register. Inherited by children on purpose.
    pub registration: OwnedFd,
    control: ParentOnlyFd,
    thread: Option<JoinHandle<()>>,
    generation: u64,
}

impl Server {
    /// Binds and listens at once, so every failure is reported here, then starts the thread.
    pub fn start(address: SocketAddr, backlog: u32, queue_limit: usize) -> io::Result<Server> {
        crate::fork_safety::install()?;
        let section = CreateSection::enter();
        let listener = section.adopt(fdpass::listen(address, backlog)?)?;
        let (registration, registrar) = fdpass::seqpacket_pair()?;
        let registrar = section.adopt(registrar)?;
        let (control, thread_control) = fdpass::seqpacket_pair()?;
        let control = section.adopt(control)?;
        let thread_control = section.adopt(thread_control)?;
        drop(section);
        let address = fdpass::local_addr(listener.as_fd())?;
        let dispatcher = Dispatcher::new(listener, registrar, thread_control, queue_limit);
        let thread = std::thread::Builder::new()
            .name(format!("socketserver:{}", address.port()))
            .spawn(move || dispatcher.run())?;
        Ok(Server {
            address,
            backlog,
            queue_limit,
            registration,
            control,
            thread: Some(thread),
            generation: crate::fork_safety::generation(),
        })
    }

    /// False in a child forked from the process that started the server.
    pub fn is_owner(&self) -> bool {
        self.generation == crate::fork_safety::generation()
    }

    /// Asks the dispatcher thread for its counters. Only in the owning process.
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        let mut buf = vec![0u8; 64 * 1024];
        // A reply that came after an earlier request timed out must not answer this one.
        let stale = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        while nix::sys::socket::recv(self.control.as_raw_fd(), &mut buf, stale).is_ok_and(|n| n > 0) {}
        fdpass::send_message(self.control.as_fd(), &[SNAPSHOT])?;
        wait_readable(self.control.as_fd(), REQUEST_TIMEOUT)?;
        let len = nix::sys::socket::recv(self.control.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        Snapshot::decode(&buf[..len]).ok_or_else(|| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the dispatcher thread has stopped")
        })
    }
}

impl Drop for Server {
    /// In the owning process: stops the thread, which closes the listener and every connection
    /// not yet handed over. In a forked child the thread does not exist and the fork handler has
    /// already closed the parent-only fds, so there is nothing to stop.
    fn drop(&mut self) {
        if !self.is_owner() {
            // The handle names a thread of the parent: detaching it here would be wrong.
            std::mem::forget(self.thread.take());
            return;
        }
        // A send error means the thread has already ended; joining is then immediate.
        let _ = fdpass::send_message(self.control.as_fd(), &[STOP]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits until `fd` is readable, or fails with ETIMEDOUT.
fn wait_readable(fd: BorrowedFd, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, and nfds says one.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        match n {
            1 => return Ok(()),
            0 => return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// True if a message waits in `sock` (FIONREAD: the bytes queued in a SOCK_SEQPACKET socket).
fn has_message(sock: BorrowedFd) -> bool {
    let mut size: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the live local we pass.
    let ok = unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut size) } == 0;
    ok && size > 0
}

/// An accepted connection and the peer's address.
#[derive(Debug)]
struct Connection {
    fd: ParentOnlyFd,
    peer: SocketAddr,
}

#[derive(Debug)]
struct Worker {
    /// Says READY; closes when the worker goes.
    link: ParentOnlyFd,
    /// Where connections are sent.
    mailbox: ParentOnlyFd,
    /// The worker's end of the mailbox: what it has not taken can be read back from here.
    mailbox_peer: ParentOnlyFd,
    pid: i32,
    ready: bool,
    delivered: u64,
    /// A connection was sent and not yet counted as taken.
    sent_untaken: bool,
    /// When its current connection was handed over; None before the first or once ready again.
    busy_since: Option<Instant>,
}

impl Worker {
    fn status(&self) -> WorkerStatus {
        let state = match (self.ready, self.busy_since) {
            (true, _) => WorkerState::Ready,
            (false, Some(_)) => WorkerState::Busy,
            (false, None) => WorkerState::Idle,
        };
        let busy_ms = self.busy_since.map_or(0, |t| t.elapsed().as_millis() as u64);
        WorkerStatus { pid: self.pid, state, delivered: self.delivered, busy_ms }
    }
}

struct Dispatcher {
    listener: ParentOnlyFd,
    registrar: ParentOnlyFd,
    control: ParentOnlyFd,
    queue_limit: usize,
    workers: Vec<Option<Worker>>,
    /// Ready workers and when they asked, longest-waiting first.
    ready: VecDeque<(u64, usize)>,
    /// Accepted connections waiting for a ready worker.
    waiting: VecDeque<Connection>,
    accepted: u64,
    delivered: u64,
    accept_paused_until: Option<Instant>,
    /// Registrations wait in their socket until then (see register_workers).
    registrations_paused_until: Option<Instant>,
    pollfds: Vec<libc::pollfd>,
    /// The worker slot behind each pollfd from index WORKERS_AT on.
    polled_workers: Vec<usize>,
}

const CONTROL_AT: usize = 0;
const REGISTRAR_AT: usize = 1;
const LISTENER_AT: usize = 2;
const WORKERS_AT: usize = 3;

impl Dispatcher {
    fn new(
        listener: ParentOnlyFd,
        registrar: ParentOnlyFd,
        control: ParentOnlyFd,
        queue_limit: usize,
    ) -> Dispatcher {
        Dispatcher {
            listener,
            registrar,
            control,
            queue_limit,
            workers: Vec::new(),
            ready: VecDeque::new(),
            waiting: VecDeque::new(),
            accepted: 0,
            delivered: 0,
            accept_paused_until: None,
            registrations_paused_until: None,
            pollfds: Vec::new(),
            polled_workers: Vec::new(),
        }
    }

    /// Runs until told to stop or until the Tcl side's control socket closes. Dropping self
    /// then closes the listener, the worker sockets and every connection not handed over.
    fn run(mut self) {
        loop {
            let timeout = self.poll_timeout();
            self.build_pollfds();
            // SAFETY: pollfds is a live Vec of initialised pollfd structs and nfds is its length.
            let n = unsafe {
                libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as libc::nfds_t, timeout)
            };
            if n == -1 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // poll fails only on bad arguments or lack of memory: wait and try again.
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
            if self.revents(CONTROL_AT) != 0 && !self.serve_control() {
                return;
            }
            if self.revents(REGISTRAR_AT) != 0 {
                self.register_workers();
            }
            for i in 0..self.polled_workers.len() {
                let revents = self.pollfds[WORKERS_AT + i].revents;
                if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    // Gone: a READY it sent last does not count (the dispatcher would send a
                    // connection into its mailbox only to read it back).
                    self.remove_worker(self.polled_workers[i]);
                } else if revents != 0 {
                    self.serve_worker(self.polled_workers[i]);
                }
            }
            self.dispatch();
            if self.revents(LISTENER_AT) != 0 {
                self.accept_batch();
            }
        }
    }

    fn revents(&self, at: usize) -> libc::c_short {
        self.pollfds[at].revents
    }

    fn can_accept(&self) -> bool {
        self.accept_paused_until.is_none() && self.waiting.len() < self.ready.len() + self.queue_limit
    }

    /// Ends the pauses that are over; the poll timeout until the next one ends (-1: none).
    fn poll_timeout(&mut self) -> libc::c_int {
        let now = Instant::now();
        let mut timeout = -1;
        for pause in [&mut self.accept_paused_until, &mut self.registrations_paused_until] {
            if let Some(until) = *pause {
                let left = until.saturating_duration_since(now);
                if left.is_zero() {
                    *pause = None;
                } else {
                    let ms = left.as_millis() as libc::c_int + 1;
                    timeout = if timeout < 0 { ms } else { timeout.min(ms) };
                }
            }
        }
        timeout
    }

    fn build_pollfds(&mut self) {
        let entry = |fd: i32| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // A negative fd makes poll skip the listener: back pressure stays in the kernel backlog.
        let listener = if self.can_accept() { self.listener.as_raw_fd() } else { -1 };
        self.pollfds.clear();
        self.pollfds.push(entry(self.control.as_raw_fd()));
        let registrar = if self.registrations_paused_until.is_none() { self.registrar.as_raw_fd() } else { -1 };
        self.pollfds.push(entry(registrar));
        self.pollfds.push(entry(listener));
        self.polled_workers.clear();
        // A worker's READY matters only when no other worker is ready: until then it may wait
        // in the socket, and this thread sleeps through it (at c=1 with N idle workers, that is
        // one wake-up per connection fewer). Poll reports a worker that goes (POLLHUP) anyway.
        let events = if self.ready.is_empty() { libc::POLLIN } else { 0 };
        for (slot, worker) in self.workers.iter().enumerate() {
            if let Some(worker) = worker {
                self.pollfds.push(libc::pollfd { fd: worker.link.as_raw_fd(), events, revents: 0 });
                self.polled_workers.push(slot);
            }
        }
    }

    /// Brings the counters up to date for a snapshot: reads READYs not waited for, and counts
    /// the connections that workers have taken from their mailboxes since.
    fn catch_up(&mut self) {
        for slot in 0..self.workers.len() {
            // A READY not waited for (see build_pollfds): at most one per worker, and a receive
            // that finds none costs no more than polling for it.
            if self.workers[slot].as_ref().is_some_and(|w| !w.ready) {
                self.serve_worker(slot);
            }
            if self.workers[slot].as_ref().is_some_and(|w| w.sent_untaken && !has_message(w.mailbox_peer.as_fd())) {
                self.note_taken(slot);
            }
        }
    }

    /// Counts the connection sent to a worker as taken.
    fn note_taken(&mut self, slot: usize) {
        if let Some(worker) = self.workers[slot].as_mut() {
            if std::mem::take(&mut worker.sent_untaken) {
                worker.delivered += 1;
                self.delivered += 1;
            }
        }
    }

    /// Answers one request; false when the thread should stop.
    fn serve_control(&mut self) -> bool {
        match fdpass::recv_byte(self.control.as_fd()) {
            Ok(Some(SNAPSHOT)) => {
                self.catch_up();
                let reply = self.snapshot().encode();
                // The Tcl thread is waiting for it; if it has gone, there is no one to tell.
                let _ = nix::sys::socket::send(
                    self.control.as_raw_fd(),
                    &reply,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                );
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            // STOP, the Tcl side closing, or anything unexpected from it.
            _ => false,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            accepted: self.accepted,
            delivered: self.delivered,
            queued: self.waiting.len() as u32,
            ready: self.ready.len() as u32,
            workers: self.workers.iter().flatten().map(Worker::status).collect(),
        }
    }

    fn register_workers(&mut self) {
        let mut buf = [0u8; MAX_MESSAGE];
        while has_message(self.registrar.as_fd()) {
            let section = CreateSection::enter();
            // A registration received without fds for it would be lost (the kernel closes what
            // does not fit): while there are none, leave it queued and look again later.
            // (Probed inside the section: a fork must not catch the probes.)
            if !fdpass::has_free_fds(self.registrar.as_fd(), fdpass::MAX_FDS) {
                self.registrations_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                return;
            }
            let (len, fds) = match fdpass::recv_with_fds(self.registrar.as_fd(), &mut buf) {
                Ok(Received::Message(len, fds)) => (len, fds),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    // Lost to another thread's fds after the probe: rare, and nothing to undo.
                    self.registrations_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
                _ => return,
            };
            let fds: io::Result<Vec<ParentOnlyFd>> = fds.into_iter().map(|fd| section.adopt(fd)).collect();
            drop(section);
            let (Some(pid), Ok(fds)) = (fdpass::decode_registration(&buf[..len]), fds) else {
                continue;
            };
            let Ok([link, mailbox, mailbox_peer]) = <[ParentOnlyFd; 3]>::try_from(fds) else {
                continue; // not a registration: its fds are closed
            };
            let worker = Some(Worker {
                link,
                mailbox,
                mailbox_peer,
                pid,
                ready: false,
                delivered: 0,
                sent_untaken: false,
                busy_since: None,
            });
            match self.workers.iter().position(Option::is_none) {
                Some(free) => self.workers[free] = worker,
                None => self.workers.push(worker),
            }
        }
    }

    /// Takes one message from a worker (poll reports it again if there are more: cheaper than
    /// a receive that finds nothing).
    fn serve_worker(&mut self, slot: usize) {
        let Some(worker) = self.workers[slot].as_mut() else { return };
        match fdpass::recv_ready(worker.link.as_fd()) {
            Ok(Some(asked_ns)) => {
                if !worker.ready {
                    worker.ready = true;
                    worker.busy_since = None;
                    // First come, first served by when they asked, also among READYs read in
                    // one go (the ready queue is short: at most one entry per worker).
                    let at = self.ready.partition_point(|&(t, _)| t <= asked_ns);
                    self.ready.insert(at, (asked_ns, slot));
                    // A worker asks again only once it has taken what it was sent.
                    self.note_taken(slot);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Gone, or speaking another protocol: either way no longer a worker.
            _ => self.remove_worker(slot),
        }
    }

    /// Forgets a worker; a connection it had not taken from its mailbox goes first to the next.
    fn remove_worker(&mut self, slot: usize) {
        // It may have taken its last connection and left without asking again.
        if self.workers[slot].as_ref().is_some_and(|w| !has_message(w.mailbox_peer.as_fd())) {
            self.note_taken(slot);
        }
        let Some(worker) = self.workers[slot].take() else { return };
        if worker.ready {
            self.ready.retain(|&(_, s)| s != slot);
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let mut untaken = Vec::new();
        loop {
            let section = CreateSection::enter();
            let Ok(Received::Message(len, mut fds)) = fdpass::recv_with_fds(worker.mailbox_peer.as_fd(), &mut buf)
            else {
                break;
            };
            let (Some(fd), Some(peer)) = (fds.pop(), fdpass::decode_peer(&buf[..len])) else { continue };
            if let Ok(fd) = section.adopt(fd) {
                untaken.push(Connection { fd, peer });
            }
        }
        for conn in untaken.into_iter().rev() {
            self.waiting.push_front(conn);
        }
    }

    /// Hands waiting connections to ready workers, longest-waiting worker first. A READY not
    /// read yet (see build_pollfds) was sent after every one already read, so the queue's head
    /// is the longest-waiting worker without reading it.
    fn dispatch(&mut self) {
        while !self.waiting.is_empty() {
            let Some((_, slot)) = self.ready.pop_front() else { return };
            let conn = self.waiting.pop_front().expect("checked non-empty");
            let worker = self.workers[slot].as_mut().expect("ready workers exist");
            worker.ready = false;
            let mut payload = [0u8; MAX_MESSAGE];
            let len = fdpass::encode_peer(&conn.peer, &mut payload);
            match fdpass::send_with_fds(worker.mailbox.as_fd(), &payload[..len], &[conn.fd.as_fd()]) {
                Ok(()) => {
                    // The message holds the connection now; our copy closes as conn drops.
                    worker.sent_untaken = true;
                    worker.busy_since = Some(Instant::now());
                }
                Err(_) => {
                    // The worker has gone (or cannot take it): keep the connection for the next.
                    self.waiting.push_front(conn);
                    self.remove_worker(slot);
                }
            }
        }
    }

    fn accept_batch(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            if !self.can_accept() {
                return;
            }
            let section = CreateSection::enter();
            let accepted = fdpass::accept(self.listener.as_fd())
                .and_then(|(fd, peer)| Ok(Connection { fd: section.adopt(fd)?, peer }));
            drop(section);
            match accepted {
                Ok(conn) => {
                    self.accepted += 1;
                    self.waiting.push_back(conn);
                    self.dispatch();
                }
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    // The client gave up, or a signal: just take the next.
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => {}
                    // Out of fds or memory (or worse): back off rather than spin, keep serving.
                    _ => {
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                        return;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Delivery, WorkerLink};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn start(queue: usize) -> Server {
        Server::start("127.0.0.1:0".parse().unwrap(), 16, queue).unwrap()
    }

    fn wait_for(server: &Server, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let snap = server.snapshot().unwrap();
            if cond(&snap) {
                return snap;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {snap:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A worker registered with `server` and armed, once the dispatcher knows it is ready.
    fn ready_worker(server: &Server) -> WorkerLink {
        let mut link = WorkerLink::register(server.registration.as_fd()).unwrap();
        link.arm().unwrap();
        wait_for(server, "ready", |s| s.ready == 1);
        link
    }

    fn receive(link: &mut WorkerLink) -> Delivery {
        wait_readable(link.as_fd(), Duration::from_secs(5)).expect("a delivery in time");
        link.receive().unwrap().expect("a connection")
    }

    #[test]
    fn snapshots_round_trip() {
        let busy = WorkerStatus { pid: 3, state: WorkerState::Busy, delivered: 4, busy_ms: 12 };
        let ready = WorkerStatus { pid: 9, state: WorkerState::Ready, delivered: 1, busy_ms: 0 };
        let snap = Snapshot { accepted: 7, delivered: 5, queued: 1, ready: 2, workers: vec![busy, ready] };
        assert_eq!(Snapshot::decode(&snap.encode()), Some(snap));
        assert_eq!(Snapshot::decode(&[0; 23]), None);
    }

    #[test]
    fn a_ready_worker_gets_the_connection_and_its_peer() {
        let server = start(0);
        let mut link = ready_worker(&server);
        let mut client = TcpStream::connect(server.address).unwrap();
        let delivery = receive(&mut link);
        assert_eq!(delivery.peer, client.local_addr().unwrap());
        let mut conn = TcpStream::from(delivery.fd);
        conn.write_all(b"pong").unwrap();
        drop(conn);
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "pong", "closing the worker's copy closes the connection");
        let snap = wait_for(&server, "delivery", |s| s.delivered == 1);
        assert_eq!((snap.accepted, snap.queued, snap.ready), (1, 0, 0));
        let me = WorkerStatus { pid: std::process::id() as i32, state: WorkerState::Busy, delivered: 1, busy_ms: snap.workers[0].busy_ms };
        assert_eq!(snap.workers, vec![me]);
        link.arm().unwrap();
        let snap = wait_for(&server, "ready again", |s| s.ready == 1);
        assert_eq!(snap.workers[0].state, WorkerState::Ready);
    }

    #[test]
    fn nothing_is_accepted_until_a_worker_is_ready() {
        let server = start(0);
        let clients: Vec<_> = (0..3).map(|_| TcpStream::connect(server.address).unwrap()).collect();
        let mut link = WorkerLink::register(server.registration.as_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(server.snapshot().unwrap().accepted, 0);
        for client in &clients {
            link.arm().unwrap();
            assert_eq!(receive(&mut link).peer, client.local_addr().unwrap(), "in arrival order");
        }
        assert_eq!(server.snapshot().unwrap().accepted, 3);
    }

    #[test]
    fn the_queue_limit_bounds_what_is_accepted_ahead() {
        let server = start(2);
        let _clients: Vec<_> = (0..4).map(|_| TcpStream::connect(server.address).unwrap()).collect();
        let snap = wait_for(&server, "two queued", |s| s.queued == 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(server.snapshot().unwrap().accepted, 2, "{snap:?}");
    }

    #[test]
    fn ready_workers_are_served_first_come_first_served() {
        let server = start(0);
        let mut first = WorkerLink::register(server.registration.as_fd()).unwrap();
        let mut second = WorkerLink::register(server.registration.as_fd()).unwrap();
        second.arm().unwrap();
        wait_for(&server, "second ready", |s| s.ready == 1);
        first.arm().unwrap();
        wait_for(&server, "both ready", |s| s.ready == 2);
        let a = TcpStream::connect(server.address).unwrap();
        assert_eq!(receive(&mut second).peer, a.local_addr().unwrap());
        let b = TcpStream::connect(server.address).unwrap();
        assert_eq!(receive(&mut first).peer, b.local_addr().unwrap());
    }

    #[test]
    fn a_connection_sent_to_a_worker_that_dies_goes_to_the_next() {
        let server = start(0);
        let mut doomed = WorkerLink::register(server.registration.as_fd()).unwrap();
        doomed.arm().unwrap();
        wait_for(&server, "doomed ready", |s| s.ready == 1);
        let mut client = TcpStream::connect(server.address).unwrap();
        wait_readable(doomed.as_fd(), Duration::from_secs(5)).unwrap();
        drop(doomed); // dies with the connection still in its mailbox
        let mut survivor = WorkerLink::register(server.registration.as_fd()).unwrap();
        survivor.arm().unwrap();
        let delivery = receive(&mut survivor);
        assert_eq!(delivery.peer, client.local_addr().unwrap());
        TcpStream::from(delivery.fd).write_all(b"saved").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "saved");
        let snap = wait_for(&server, "one worker", |s| s.workers.len() == 1);
        assert_eq!((snap.accepted, snap.delivered), (1, 1));
    }

    #[test]
    fn a_connection_taken_by_a_worker_that_dies_is_not_sent_again() {
        let server = start(0);
        let mut doomed = WorkerLink::register(server.registration.as_fd()).unwrap();
        doomed.arm().unwrap();
        let mut other = WorkerLink::register(server.registration.as_fd()).unwrap();
        wait_for(&server, "doomed ready", |s| s.ready == 1);
        let mut client = TcpStream::connect(server.address).unwrap();
        let taken = receive(&mut doomed);
        drop(doomed);
        other.arm().unwrap();
        wait_for(&server, "one worker, ready", |s| s.workers.len() == 1 && s.ready == 1);
        drop(taken); // the dead worker's connection ends here, and only here
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(matches!(other.receive(), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn readys_read_together_queue_in_the_order_they_were_sent() {
        let server = start(0);
        // Slots in the order a, b, c; asking in the order c, b, a.
        let mut links: Vec<_> = (0..3).map(|_| WorkerLink::register(server.registration.as_fd()).unwrap()).collect();
        wait_for(&server, "three workers", |s| s.workers.len() == 3);
        links[2].arm().unwrap();
        wait_for(&server, "c ready", |s| s.ready == 1);
        // With c ready, the dispatcher does not wait for these: it reads both at once later.
        links[1].arm().unwrap();
        links[0].arm().unwrap();
        for expected in [2, 1, 0] {
            let client = TcpStream::connect(server.address).unwrap();
            assert_eq!(receive(&mut links[expected]).peer, client.local_addr().unwrap());
        }
    }

    #[test]
    fn a_worker_that_takes_its_connection_and_leaves_is_counted() {
        let server = start(0);
        let mut link = ready_worker(&server);
        let _client = TcpStream::connect(server.address).unwrap();
        let _taken = receive(&mut link);
        drop(link);
        let snap = wait_for(&server, "the worker gone", |s| s.workers.is_empty());
        assert_eq!((snap.accepted, snap.delivered), (1, 1));
    }

    #[test]
    fn dropping_the_server_frees_the_port_and_tells_workers() {
        let server = start(0);
        let address = server.address;
        let mut link = ready_worker(&server);
        drop(server);
        let again = Server::start(address, 16, 0).expect("the port is free again at once");
        assert_eq!(again.address, address);
        wait_readable(link.as_fd(), Duration::from_secs(5)).unwrap();
        assert!(link.receive().unwrap().is_none(), "the worker sees the server close");
    }
}
