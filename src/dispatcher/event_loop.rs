//! The dispatcher thread: one loop over an epoll set, O(1) work per event whatever the number of
//! workers.
//!
//! Two epoll sets. The main one holds the control socket, the registration socket, the listener
//! (only while a connection could be handed over or queued), every worker's link with no events
//! (so a worker that dies, EPOLLHUP/EPOLLERR, is reported at once), and the inner set. The inner
//! set holds every link for EPOLLIN, and is itself in the main set only while no worker is ready:
//! a READY matters only then, so while some worker is ready the READYs of others wait in their
//! sockets and the thread sleeps through them (at c=1 with N idle workers: one wake-up per
//! connection). Toggling costs one epoll_ctl per transition, not per worker.
//!
//! The main set also holds each worker's end of its mailbox for EPOLLIN (a worker hands
//! connections back there; it is otherwise never readable, so this costs nothing), and every
//! parked connection (see `parked`). Its wait times out at the earliest of the accept pause and
//! the parked connections' next deadline.
//!
//! With `-path`, the main set also holds the named registration socket's listener and the
//! connections on it that have not sent their registration yet (see `pending`).
//!
//! With `-agent`, the main set also holds the agent port's listener: each agent connection is
//! answered and closed at once (see `agent`), so it costs one wake-up and O(workers) to count the
//! ready ones.
//!
//! Every loop is bounded per wake-up (connections accepted, registrations, messages per link),
//! and every message is read whatever its length, so no peer can make the thread spin or starve
//! the others.

use super::agent::Agent;
use super::control::{self, Request, Snapshot};
use super::parked::{Outcome, ParkPolicy, ParkedSet, Wait};
use super::pending::NamedListener;
use super::proxied::ProxyPolicy;
use super::ready_queue::ReadyQueue;
use super::workers::{self, Connection, Registry, Worker};
use crate::fdpass::{self, Received};
use crate::fork_safety::{CreateSection, ParentOnly, ParentOnlyFd};
use crate::wire::{self, Answer, Refusal, Registration, MAX_MESSAGE};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

/// How long accepting pauses after running out of fds or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections accepted in a row before the other sockets get a look.
const ACCEPT_BATCH: usize = 64;
/// Registrations taken in a row before the other sockets get a look.
const REGISTRATION_BATCH: usize = 32;
/// Messages read from one link per wake-up.
const LINK_BATCH: usize = 16;
/// Events taken per epoll_wait (more stay pending: level-triggered).
const EVENTS: usize = 64;
/// Fds kept in reserve, so that a registration can be received (it brings 3) and refused even
/// when the process is out of fds.
const RESERVE: usize = fdpass::MAX_FDS;

const CONTROL: u64 = 0;
const REGISTRAR: u64 = 1;
const LISTENER: u64 = 2;
const INNER: u64 = 3;
const AGENT: u64 = 4;
const NAMED: u64 = 5;

/// The members of the epoll sets that come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A worker's link (index: its slot).
    Link = 0,
    /// The dispatcher's end of a worker's mailbox, where hand-backs arrive (index: its slot).
    Mailbox = 1,
    /// A parked connection (index: its place in the parked set).
    Parked = 2,
    /// A connection to the named socket that has not sent its registration (index: its place).
    Pending = 3,
}

const INDEX_BITS: u32 = 30;

/// The epoll data of a member: its serial (never 0) above bit 32, so that an event of one that
/// has gone never reaches the one now in its place and no token is one of the fixed ones; then
/// its kind (2 bits) and its index (below 2^30).
pub fn member_token(member: Member, index: usize, serial: u32) -> u64 {
    debug_assert!(index < 1 << INDEX_BITS && serial != 0);
    (u64::from(serial) << 32) | ((member as u64) << INDEX_BITS) | index as u64
}

fn member_of(token: u64) -> Option<(Member, usize, u32)> {
    let serial = (token >> 32) as u32;
    let member = match (token >> INDEX_BITS) & 3 {
        0 => Member::Link,
        1 => Member::Mailbox,
        2 => Member::Parked,
        _ => Member::Pending,
    };
    let index = (token & ((1 << INDEX_BITS) - 1)) as usize;
    (serial != 0).then_some((member, index, serial))
}

/// nix's epoll set, as an owner of one fd (so that it can be a [`ParentOnly`]).
struct EpollSet(Epoll);

impl EpollSet {
    fn new(section: &CreateSection) -> io::Result<ParentOnly<EpollSet>> {
        let set = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(errno)?;
        section.adopt_owner(EpollSet(set))
    }
}

impl std::ops::Deref for EpollSet {
    type Target = Epoll;
    fn deref(&self) -> &Epoll {
        &self.0
    }
}

impl AsFd for EpollSet {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0 .0.as_fd()
    }
}

impl AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

pub struct Dispatcher {
    listener: ParentOnlyFd,
    registrar: ParentOnlyFd,
    control: ParentOnlyFd,
    epoll: ParentOnly<EpollSet>,
    links: ParentOnly<EpollSet>,
    /// Which of the toggled members of the main set are in it now.
    watching_listener: bool,
    watching_links: bool,
    reserve: Vec<ParentOnlyFd>,
    queue_limit: usize,
    max_workers: usize,
    workers: Registry,
    ready: ReadyQueue,
    /// Accepted (or parked and now ready) connections waiting for a ready worker.
    waiting: VecDeque<Connection>,
    parked: ParkedSet,
    accepted: u64,
    delivered: u64,
    refused: u64,
    dropped: u64,
    accept_paused_until: Option<Instant>,
    /// The agent's port is not watched until then (it ran out of fds answering).
    agent_paused_until: Option<Instant>,
    watching_agent: bool,
    /// The named registration socket (`-path`), if any, and its pause (out of fds accepting).
    named: Option<NamedListener>,
    named_paused_until: Option<Instant>,
    watching_named: bool,
    /// Registrations refused because their uid and gid are not permitted.
    denied: u64,
    /// The TCP port served, told to every worker that registers.
    port: u16,
    nonces: RandomState,
    nonce_count: u64,
    /// The registration socket's two ends (see `fdpass::identity`): a worker may hand over a
    /// copy of its end as a "link" (its SO_PEERCRED pid is the serving process's), which must be
    /// refused, or the dispatcher would answer itself.
    own_sockets: [Option<(u64, u64)>; 2],
    /// The agent port (`-agent`) and the drain state.
    agent: Agent,
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl Dispatcher {
    /// Sets up the epoll sets (in the caller's thread, so that failures are reported to it).
    pub fn new(
        listener: ParentOnlyFd,
        registrar: ParentOnlyFd,
        control: ParentOnlyFd,
        config: &super::ServerConfig,
        own_sockets: [Option<(u64, u64)>; 2],
        named: Option<NamedListener>,
    ) -> io::Result<Dispatcher> {
        let section = CreateSection::enter();
        let epoll = EpollSet::new(&section)?;
        let links = EpollSet::new(&section)?;
        let reserve = (0..RESERVE)
            .map(|_| section.adopt(fdpass::spare_fd(control.as_fd())?))
            .collect::<io::Result<Vec<_>>>()?;
        drop(section);
        let watch = |fd: BorrowedFd, token| epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token)).map_err(errno);
        watch(control.as_fd(), CONTROL)?;
        watch(registrar.as_fd(), REGISTRAR)?;
        watch(listener.as_fd(), LISTENER)?;
        watch(links.as_fd(), INNER)?;
        let agent = Agent::new(config.agent.map(|port| std::net::SocketAddr::new(config.address.ip(), port)))?;
        if let Some(listener) = agent.listener() {
            watch(listener, AGENT)?;
        }
        if let Some(named) = &named {
            watch(named.listener(), NAMED)?;
        }
        let port = fdpass::local_addr(listener.as_fd())?.port();
        if config.proxy != crate::proxy::Accept::None {
            super::proxied::defer_accept(listener.as_fd())?;
        }
        Ok(Dispatcher {
            listener,
            registrar,
            control,
            epoll,
            links,
            watching_listener: true,
            watching_links: true,
            reserve,
            queue_limit: config.queue_limit,
            max_workers: config.max_workers.unwrap_or_else(super::default_max_workers),
            workers: Registry::default(),
            ready: ReadyQueue::default(),
            waiting: VecDeque::new(),
            parked: ParkedSet::new(ParkPolicy {
                wait: config.wait,
                delimiter: config.delimiter.clone(),
                head_size: config.head_size,
                idle_timeout: config.idle_timeout,
                header_timeout: config.header_timeout,
                max_parked: config.max_parked.unwrap_or_else(super::default_max_parked),
                proxy: ProxyPolicy { accept: config.proxy, trusted: config.proxy_from.clone() },
            }),
            accepted: 0,
            delivered: 0,
            refused: 0,
            dropped: 0,
            accept_paused_until: None,
            agent_paused_until: None,
            watching_agent: true,
            named,
            named_paused_until: None,
            watching_named: true,
            denied: 0,
            port,
            nonces: RandomState::new(),
            nonce_count: 0,
            own_sockets,
            agent,
        })
    }

    /// Runs until told to stop or until the Tcl side's control socket closes. Dropping self
    /// then closes the listener, the worker sockets and every connection not handed over.
    pub fn run(mut self) {
        let mut events = [EpollEvent::empty(); EVENTS];
        loop {
            // The pauses that are over end first, so the watches below follow them.
            let timeout = self.timeout();
            self.update_watches();
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    // Fails only on bad arguments or lack of memory: wait and try again.
                    std::thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let mut listener_ready = false;
            let mut named_ready = false;
            for event in &events[..n] {
                match event.data() {
                    CONTROL => {
                        if !self.serve_control() {
                            return;
                        }
                    }
                    REGISTRAR => self.register_workers(),
                    LISTENER => listener_ready = true,
                    INNER => self.serve_links(),
                    AGENT => self.answer_agents(),
                    // After the pending connections' events: their places are free then.
                    NAMED => named_ready = true,
                    token => match member_of(token) {
                        // Only EPOLLHUP/EPOLLERR: the worker has gone. A READY it sent last does
                        // not count (a connection sent into its mailbox would only be read back).
                        Some((Member::Link, slot, serial)) if self.workers.get_current(slot, serial).is_some() => {
                            self.remove_worker(slot);
                        }
                        Some((Member::Mailbox, slot, serial)) if self.workers.get_current(slot, serial).is_some() => {
                            self.take_handbacks(slot, LINK_BATCH);
                        }
                        Some((Member::Parked, index, serial)) => self.parked_event(index, serial, event.events()),
                        Some((Member::Pending, place, serial)) => self.pending_event(place, serial),
                        _ => {}
                    },
                }
            }
            self.expire_parked();
            self.expire_pending();
            if named_ready {
                self.accept_named();
            }
            self.dispatch();
            if listener_ready {
                self.accept_batch();
            }
        }
    }

    /// With `-wait none`, accept only what ready workers and the queue can take; when
    /// connections are parked, accept while fewer than `-maxparked` are held (parked, or ready
    /// and waiting for a worker) or one can be evicted to make room. With `-proxy` and `-wait
    /// none`, both: a connection whose header is not in yet is parked for it.
    fn can_accept(&self) -> bool {
        if self.accept_paused_until.is_some() {
            return false;
        }
        let room = self.held() < self.parked.max_parked() || self.parked.evictable() > 0;
        match self.parked.wait() {
            Wait::None => self.waiting.len() < self.ready.len() + self.queue_limit && (room || !self.parked.proxy_enabled()),
            Wait::Data | Wait::Head => room,
        }
    }

    /// The connections this thread holds: parked, or waiting for a worker.
    fn held(&self) -> usize {
        self.parked.len() + self.waiting.len()
    }

    /// Ends the pauses (accepting, the agent's port) that are over; the wait's timeout: until the
    /// next pause ends or the next parked connection's deadline, whichever comes first.
    fn timeout(&mut self) -> EpollTimeout {
        let now = Instant::now();
        for pause in [&mut self.accept_paused_until, &mut self.agent_paused_until, &mut self.named_paused_until] {
            if pause.is_some_and(|until| until <= now) {
                *pause = None;
            }
        }
        let pauses = [self.accept_paused_until, self.agent_paused_until, self.named_paused_until];
        let pending = self.named.as_ref().and_then(NamedListener::next_deadline);
        let Some(until) = pauses.into_iter().chain([self.parked.next_deadline(), pending]).flatten().min() else {
            return EpollTimeout::NONE;
        };
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            return EpollTimeout::ZERO;
        }
        EpollTimeout::try_from(left + Duration::from_millis(1)).unwrap_or(EpollTimeout::MAX)
    }

    fn expire_parked(&mut self) {
        if self.parked.len() > 0 {
            self.parked.expire(&self.epoll, Instant::now());
        }
    }

    fn parked_event(&mut self, index: usize, serial: u32, flags: EpollFlags) {
        if let Outcome::Ready(conn) = self.parked.on_event(&self.epoll, index, serial, flags, Instant::now()) {
            self.waiting.push_back(conn);
        }
    }

    /// Parks a connection; one that cannot be watched goes to a worker as it is.
    fn park(&mut self, conn: Connection, handed_back: bool) {
        let held = self.held();
        if let Err(conn) = self.parked.park(&self.epoll, conn, handed_back, held, Instant::now()) {
            self.waiting.push_back(conn);
        }
    }

    /// Parks the connections a worker has handed back (at most `limit`).
    fn take_handbacks(&mut self, slot: usize, limit: usize) {
        for _ in 0..limit {
            let Some(worker) = self.workers.get_mut(slot) else { return };
            // Out of fds, a hand-back would arrive without its connection (the kernel closes
            // it): free the reserve for it, take it back after. One at a time, so that each
            // finds an fd.
            if !fdpass::has_free_fds(worker.mailbox.as_fd(), 1) {
                self.reserve.clear();
            }
            let handback = worker.read_handback();
            self.take_reserve();
            match handback {
                Some(Some(conn)) => self.park(conn, true),
                Some(None) => self.dropped += 1,
                None => return, // the mailbox is empty
            }
        }
    }

    /// Puts the listener and the inner set in the main set, or takes them out: one epoll_ctl per
    /// change, none when nothing changed.
    fn update_watches(&mut self) {
        let want_listener = self.can_accept();
        if want_listener != self.watching_listener {
            self.watching_listener = want_listener;
            self.set_watch(self.listener.as_fd(), want_listener, LISTENER);
        }
        let want_agent = self.agent_paused_until.is_none();
        if want_agent != self.watching_agent {
            self.watching_agent = want_agent;
            if let Some(listener) = self.agent.listener() {
                self.set_watch(listener, want_agent, AGENT);
            }
        }
        let want_named = self.named_paused_until.is_none();
        if want_named != self.watching_named {
            self.watching_named = want_named;
            if let Some(named) = &self.named {
                self.set_watch(named.listener(), want_named, NAMED);
            }
        }
        let want_links = self.ready.is_empty();
        if want_links != self.watching_links {
            self.watching_links = want_links;
            self.set_watch(self.links.as_fd(), want_links, INNER);
        }
    }

    fn set_watch(&self, fd: BorrowedFd, on: bool, token: u64) {
        let flags = if on { EpollFlags::EPOLLIN } else { EpollFlags::empty() };
        // Cannot fail for a member of the set (MOD fails only for fds not in it).
        let _ = self.epoll.modify(fd, &mut EpollEvent::new(flags, token));
    }

    /// Serves the links with messages, at most EVENTS of them (the rest wait: level-triggered).
    fn serve_links(&mut self) {
        let mut events = [EpollEvent::empty(); EVENTS];
        let n = self.links.wait(&mut events, EpollTimeout::ZERO).unwrap_or(0);
        for event in &events[..n] {
            if let Some((Member::Link, slot, serial)) = member_of(event.data()) {
                if self.workers.get_current(slot, serial).is_some() {
                    self.serve_worker(slot);
                }
            }
        }
    }

    /// Reads a worker's messages until its link is empty (at most LINK_BATCH). A READY makes it
    /// ready; anything else drops it.
    fn serve_worker(&mut self, slot: usize) {
        let mut buf = [0u8; MAX_MESSAGE];
        for _ in 0..LINK_BATCH {
            let Some(worker) = self.workers.get_mut(slot) else { return };
            let message = {
                // Fds a hostile worker attaches are closed before the section ends.
                let _section = CreateSection::enter();
                match fdpass::recv_with_fds(worker.link.as_fd(), &mut buf) {
                    Ok(Received::Message(len, fds)) if fds.is_empty() => Some(wire::decode_ready(&buf[..len])),
                    Ok(Received::Empty) => return,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Ok(Received::Closed) => None,
                    // Fds attached, too long, or a failing link.
                    Ok(Received::Message(..)) | Err(_) => Some(None),
                }
            };
            match message {
                Some(Some(asked_ns)) => {
                    if !worker.ready {
                        worker.asked();
                        if worker.note_taken(true) {
                            self.delivered += 1;
                        }
                        let asked_ns = worker.asked_at(asked_ns);
                        self.ready.push(asked_ns, slot);
                    }
                }
                None => return self.remove_worker(slot),
                Some(None) => {
                    self.dropped += 1;
                    return self.remove_worker(slot);
                }
            }
        }
    }

    /// Forgets a worker; a connection it had not taken from its mailbox goes first to the next.
    fn remove_worker(&mut self, slot: usize) {
        // Hand-backs it sent before it went are parked: its mailbox outlives it (we hold both
        // ends), and what it holds is bounded by the socket's buffer.
        self.take_handbacks(slot, usize::MAX);
        let Some(mut worker) = self.workers.take(slot) else { return };
        // Out of the sets explicitly: a copy of the link held elsewhere would keep it in.
        let _ = self.epoll.delete(worker.link.as_fd());
        let _ = self.links.delete(worker.link.as_fd());
        let _ = self.epoll.delete(worker.mailbox.as_fd());
        if worker.ready {
            self.ready.remove(slot);
        }
        if worker.note_taken(false) {
            self.delivered += 1;
        }
        let (untaken, dropped) = worker.read_back();
        self.dropped += dropped;
        if let Some(conn) = untaken {
            self.waiting.push_front(conn);
        }
    }

    /// Hands waiting connections to ready workers, longest-waiting worker first. A READY not
    /// read yet (see the module doc) was sent after every one already read, so the queue's head
    /// is the longest-waiting worker without reading it.
    fn dispatch(&mut self) {
        while !self.waiting.is_empty() {
            let Some(slot) = self.ready.pop() else { return };
            let Some(worker) = self.workers.get_mut(slot) else { continue };
            let conn = self.waiting.pop_front().expect("checked non-empty");
            worker.ready = false;
            let mut payload = [0u8; MAX_MESSAGE];
            let len = wire::encode_peer(&conn.peer, &mut payload);
            let identity = fdpass::identity(conn.fd.as_fd());
            match fdpass::send_with_fds(worker.mailbox.as_fd(), &payload[..len], &[conn.fd.as_fd()]) {
                // The message holds the connection now; our copy closes as conn drops.
                Ok(()) => worker.sent(identity),
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
            let parking = self.parked.wait() != Wait::None;
            let section = CreateSection::enter();
            let accepted = fdpass::accept(self.listener.as_fd()).and_then(|(fd, peer)| {
                // Parked connections may be many: out of the way of the Tcl thread's select().
                let fd = if parking { fdpass::above_select_range(fd) } else { fd };
                Ok(Connection { fd: section.adopt(fd)?, peer })
            });
            drop(section);
            let accepted = accepted.map(|conn| {
                self.accepted += 1;
                // With -proxy, on only once its header is in (else it is parked for it, or closed).
                let held = self.held();
                self.parked.admit(&self.epoll, conn, held, Instant::now())
            });
            match accepted {
                Ok(None) => {}
                Ok(Some(conn)) if self.parked.wait() != Wait::None => self.park(conn, false),
                Ok(Some(conn)) => {
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

    /// Takes registrations until the socket is empty (at most REGISTRATION_BATCH); each is
    /// answered on its link, unless its link cannot take an answer.
    fn register_workers(&mut self) {
        for _ in 0..REGISTRATION_BATCH {
            match receive_registration(self.registrar.as_fd(), &mut self.reserve) {
                Incoming::Nothing => break,
                Incoming::Closed => {
                    // Only once the Tcl side has gone, and then the thread stops: just in case,
                    // stop watching an fd that would stay readable.
                    let _ = self.epoll.delete(self.registrar.as_fd());
                    break;
                }
                Incoming::Malformed => self.refused += 1,
                Incoming::Registration(registration, fds, short) => self.register(registration, fds, short, true),
                Incoming::OtherVersion(link) => self.refuse_version(link, true),
            }
            self.take_reserve();
        }
        self.take_reserve();
    }

    /// Takes the connections waiting on the named socket.
    fn accept_named(&mut self) {
        let Some(named) = &mut self.named else { return };
        let accepted = named.accept(&self.epoll, Instant::now());
        self.refused += accepted.evicted;
        if accepted.exhausted {
            self.named_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
        }
    }

    /// A connection to the named socket has sent something, or closed: its registration is
    /// answered and the connection closed, whatever it was.
    fn pending_event(&mut self, place: usize, serial: u32) {
        let Some(pending) = self.named.as_mut().and_then(|named| named.take(&self.epoll, place, serial)) else { return };
        match receive_registration(pending.conn.as_fd(), &mut self.reserve) {
            Incoming::Registration(registration, fds, short) => {
                self.register(registration, fds, short, pending.permitted);
            }
            Incoming::OtherVersion(link) => self.refuse_version(link, pending.permitted),
            // Closed, empty or malformed: nothing to answer.
            _ => {
                self.refused += 1;
                self.denied += u64::from(!pending.permitted);
            }
        }
        self.take_reserve();
    }

    fn expire_pending(&mut self) {
        if let Some(named) = self.named.as_mut().filter(|named| named.len() > 0) {
            self.refused += named.expire(&self.epoll, Instant::now());
        }
    }

    /// Answers one registration whose fds have been received; `short`: the process has no fds
    /// to spare for it; `permitted`: its sender's uid or gid may register.
    fn register(&mut self, registration: Registration, [link, mailbox, peer]: [ParentOnlyFd; 3], short: bool, permitted: bool) {
        // The three sockets must be three, none of them the registration socket (an answer
        // sent on a copy of it would come back to this thread as a registration).
        let ids = [&link, &mailbox, &peer].map(|fd| fdpass::identity(fd.as_fd()));
        let distinct = ids.iter().all(|id| id.is_some() && !self.own_sockets.contains(id))
            && ids[0] != ids[1]
            && ids[0] != ids[2]
            && ids[1] != ids[2];
        if !distinct || !fdpass::is_unix_seqpacket(link.as_fd()) {
            self.refused += 1; // nowhere to answer
            return;
        }
        // The pid it says must be the one the kernel knows made the link (SO_PEERCRED).
        let pid = registration.pid;
        let pid_checks = fdpass::peer_pid(link.as_fd()) == Some(pid);
        let refusal = if short {
            Some(Refusal::OutOfFds)
        } else if !permitted {
            Some(Refusal::NotPermitted)
        } else if registration.version != wire::VERSION {
            Some(Refusal::Version(wire::VERSION))
        } else if !pid_checks {
            Some(Refusal::Invalid)
        } else if self.workers.len() >= self.max_workers {
            Some(Refusal::WorkerLimit(self.max_workers.min(u32::MAX as usize) as u32))
        } else if !workers::is_mailbox_pair(&mailbox, &peer, self.next_nonce()) {
            Some(Refusal::Invalid)
        } else {
            None
        };
        let answer = refusal.map_or(Answer::Accepted { version: wire::VERSION, port: self.port }, Answer::Refused);
        let (bytes, len) = wire::encode_answer(answer);
        let answered = fdpass::send_message(link.as_fd(), &bytes[..len]).is_ok();
        if refusal.is_some() || !answered {
            self.refused += 1;
            if refusal == Some(Refusal::NotPermitted) {
                self.denied += 1;
            }
            return;
        }
        let slot = self.workers.insert(Worker::new(link, mailbox, peer, pid));
        let worker = self.workers.get_mut(slot).expect("just inserted");
        let token = member_token(Member::Link, slot, worker.serial);
        let mailbox_token = member_token(Member::Mailbox, slot, worker.serial);
        let link = worker.link.as_fd();
        let added = self.links.add(link, EpollEvent::new(EpollFlags::EPOLLIN, token)).is_ok()
            && self.epoll.add(link, EpollEvent::new(EpollFlags::empty(), token)).is_ok()
            && self.epoll.add(worker.mailbox.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, mailbox_token)).is_ok();
        if !added {
            self.remove_worker(slot);
        }
    }

    /// Answers a registration of another version with the version spoken here (or, from a
    /// process that may not register, with that), on its link if that is a socket of the kind
    /// every version's link is (and not one of ours).
    fn refuse_version(&mut self, link: ParentOnlyFd, permitted: bool) {
        self.refused += 1;
        self.denied += u64::from(!permitted);
        let refusal = if permitted { Refusal::Version(wire::VERSION) } else { Refusal::NotPermitted };
        let id = fdpass::identity(link.as_fd());
        if id.is_some() && !self.own_sockets.contains(&id) && fdpass::is_unix_seqpacket(link.as_fd()) {
            let (bytes, len) = wire::encode_answer(Answer::Refused(refusal));
            let _ = fdpass::send_message(link.as_fd(), &bytes[..len]);
        }
    }

    /// Takes the reserve of fds back, as far as there are free fds.
    fn take_reserve(&mut self) {
        if self.reserve.len() == RESERVE {
            return;
        }
        let section = CreateSection::enter();
        while self.reserve.len() < RESERVE {
            match fdpass::spare_fd(self.control.as_fd()).and_then(|fd| section.adopt(fd)) {
                Ok(fd) => self.reserve.push(fd),
                Err(_) => return,
            }
        }
    }

    fn next_nonce(&mut self) -> u64 {
        self.nonce_count += 1;
        self.nonces.hash_one(self.nonce_count)
    }

    /// Answers the agent connections that wait, with the share of workers ready now.
    fn answer_agents(&mut self) {
        self.catch_up();
        if self.agent.serve(self.workers.len(), self.ready.len()) {
            self.agent_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
        }
    }

    /// Answers the Tcl thread's requests; false when the thread should stop.
    fn serve_control(&mut self) -> bool {
        let mut buf = [0u8; 16];
        loop {
            let request = match fdpass::recv_with_fds(self.control.as_fd(), &mut buf) {
                Ok(Received::Message(len, _)) => control::decode_request(&buf[..len]),
                Ok(Received::Empty) => return true,
                // The Tcl side has closed, or its socket fails.
                _ => return false,
            };
            match request {
                Some(Request::Snapshot(id)) => self.answer_snapshot(id),
                Some(Request::Stop) => return false,
                Some(Request::Drain(on)) => self.agent.counters.draining = on,
                None => {} // the Tcl side sends none: ignore
            }
        }
    }

    /// Sends the snapshot inline, or in a memfd if it is large: its size is bound by nothing,
    /// and sending it never waits for the Tcl thread (which may have given up).
    fn answer_snapshot(&mut self, id: u64) {
        self.catch_up();
        let bytes = self.snapshot().encode();
        // If the Tcl thread has gone, or its socket is full of answers it gave up on, there is
        // no one to tell.
        if bytes.len() <= control::INLINE_SNAPSHOT {
            let _ = fdpass::send_message(self.control.as_fd(), &control::encode_answer(id, 0, &bytes));
            return;
        }
        let section = CreateSection::enter();
        let file = nix::sys::memfd::memfd_create(c"socketserver-info", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(errno)
            .and_then(|fd| section.adopt_owner(std::fs::File::from(fd)));
        drop(section);
        let _ = match file.and_then(|file| (&*file).write_all(&bytes).map(|()| file)) {
            Ok(file) => fdpass::send_with_fds(self.control.as_fd(), &control::encode_answer(id, 0, &[]), &[file.as_fd()]),
            Err(err) => {
                let errno = err.raw_os_error().unwrap_or(libc::EIO);
                fdpass::send_message(self.control.as_fd(), &control::encode_answer(id, errno, &[]))
            }
        };
    }

    /// Brings the counters up to date for a snapshot: reads READYs not waited for, and counts
    /// the connections that workers have taken from their mailboxes since. O(workers).
    fn catch_up(&mut self) {
        for slot in 0..self.workers.slots() {
            if self.workers.get_mut(slot).is_some_and(|w| !w.ready) {
                self.serve_worker(slot);
            }
            if self.workers.get_mut(slot).is_some_and(|w| w.note_taken(false)) {
                self.delivered += 1;
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            accepted: self.accepted,
            delivered: self.delivered,
            refused: self.refused,
            denied: self.denied,
            dropped: self.dropped,
            queued: self.waiting.len() as u32,
            ready: self.ready.len() as u32,
            max_workers: self.max_workers.min(u32::MAX as usize) as u32,
            parked: self.parked.len() as u64,
            park: self.parked.counters,
            workers: self.workers.iter().map(Worker::status).collect(),
            agent: self.agent.counters,
        }
    }
}

/// What a registration socket had.
enum Incoming {
    /// Nothing now (empty, or a failing socket).
    Nothing,
    /// Its other end has closed.
    Closed,
    /// A message that is not a registration, or one whose fds were lost: refused unanswered.
    Malformed,
    /// A registration with its three fds; true if the process has no fds to spare for it.
    Registration(Registration, [ParentOnlyFd; 3], bool),
    /// A registration of another version, whatever its length: the fd it sent first, where
    /// every version takes its answer.
    OtherVersion(ParentOnlyFd),
}

/// Receives one registration from `sock`. Out of fds, a registration would arrive without them
/// (the kernel closes what does not fit) and could not even be refused: the reserve is freed for
/// it, and the caller takes it back after.
fn receive_registration(sock: BorrowedFd, reserve: &mut Vec<ParentOnlyFd>) -> Incoming {
    let mut buf = [0u8; wire::MAX_REGISTRATION];
    let section = CreateSection::enter();
    // (Inside the section: a fork must not catch the probes.)
    let short = !fdpass::has_free_fds(sock, fdpass::MAX_FDS);
    if short {
        reserve.clear();
    }
    match fdpass::recv_with_fds(sock, &mut buf) {
        Ok(Received::Message(len, fds)) => {
            let fds: Option<Vec<ParentOnlyFd>> =
                fds.into_iter().map(|fd| section.adopt(fdpass::above_select_range(fd)).ok()).collect();
            let other_version = wire::registration_version(&buf[..len]).is_some_and(|v| v != wire::VERSION);
            match (wire::decode_registration(&buf[..len]), fds) {
                (_, Some(fds)) if other_version => match fds.into_iter().next() {
                    Some(link) => Incoming::OtherVersion(link),
                    None => Incoming::Malformed,
                },
                (Some(registration), Some(fds)) => match <[ParentOnlyFd; 3]>::try_from(fds) {
                    Ok(fds) => Incoming::Registration(registration, fds, short),
                    Err(_) => Incoming::Malformed,
                },
                _ => Incoming::Malformed,
            }
        }
        Ok(Received::Empty) => Incoming::Nothing,
        Ok(Received::Closed) => Incoming::Closed,
        // Malformed, or fds cut short for lack of fd numbers: lost.
        Err(err) if err.kind() == io::ErrorKind::InvalidData || err.raw_os_error() == Some(libc::EMFILE) => {
            Incoming::Malformed
        }
        Err(_) => Incoming::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_tokens_round_trip_and_never_collide_with_the_fixed_ones() {
        for member in [Member::Link, Member::Mailbox, Member::Parked, Member::Pending] {
            for (index, serial) in [(0, 1), (5, u32::MAX), ((1 << 30) - 1, 7)] {
                let token = member_token(member, index, serial);
                assert_eq!(member_of(token), Some((member, index, serial)));
            }
        }
        for fixed in [CONTROL, REGISTRAR, LISTENER, INNER, AGENT, NAMED] {
            assert_eq!(member_of(fixed), None);
        }
    }
}
