//! Parked connections: held by the dispatcher, in its epoll set, until there is something for a
//! worker to do (`-wait data|head`, and every connection a worker hands back), with the timers
//! that give up on them.
//!
//! A parked connection is looked at only with `MSG_PEEK`: the worker reads every byte itself.
//! It is in the epoll set edge-triggered (EPOLLIN|EPOLLRDHUP|EPOLLET), so bytes peeked but left
//! in place (a head not complete yet) wake the thread again only when more arrive.
//!
//! Timers are FIFO queues, one per timeout kind, as in Apache's event MPM: every deadline in a
//! queue is "now + the same timeout", so the queue is in deadline order and expiring is O(1) at
//! its head. An entry whose deadline has moved or which has left is not looked for: it stays in
//! the queue (lazy deletion) and is skipped when it reaches the head; a queue that grows past
//! twice the parked connections is compacted, so its length stays O(parked), amortised O(1).
//!
//! Eviction (at `-maxparked`): the longest-idle connection that was handed back and has sent
//! nothing since, as nginx closes its oldest idle keep-alive connections. One that has sent bytes
//! is never evicted.

use super::event_loop::{member_token, Member};
use super::proxied::{ProxyPolicy, Step};
use super::workers::Connection;
use crate::fdpass;
use crate::fork_safety::CreateSection;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{recv, MsgFlags};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// When an accepted connection goes to a worker (`server -wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// At once (socketservtcl's behaviour).
    #[default]
    None = 0,
    /// Once it is readable.
    Data = 1,
    /// Once a whole head (up to the delimiter, or `-headsize` bytes) has arrived.
    Head = 2,
}

impl Wait {
    /// The names, in the order of the variants.
    pub const NAMES: [&'static str; 3] = ["none", "data", "head"];
    const ALL: [Wait; 3] = [Wait::None, Wait::Data, Wait::Head];

    pub fn name(self) -> &'static str {
        Wait::NAMES[self as usize]
    }

    pub fn from_index(index: usize) -> Option<Wait> {
        Wait::ALL.get(index).copied()
    }
}

/// The parked connections with more index bits than an epoll token has are never made: see
/// [`member_token`]. Far above any fd limit in practice.
pub const MAX_PARKED: usize = (1 << 30) - 1;

/// True if what has been peeked is a whole head: the delimiter is in it, or it is `limit` bytes
/// or more (then it is handed over anyway).
pub fn head_complete(peeked: &[u8], delimiter: &[u8], limit: usize) -> bool {
    peeked.len() >= limit || (!delimiter.is_empty() && peeked.windows(delimiter.len()).any(|w| w == delimiter))
}

/// What the dispatcher closed on its own, and why, and what it parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParkCounters {
    /// Parked ever: fresh connections and hand-backs.
    pub parked_total: u64,
    pub handed_back: u64,
    pub closed_idle: u64,
    pub closed_header: u64,
    /// At EOF (or reset) with nothing to read.
    pub closed_peer: u64,
    pub evicted: u64,
    /// PROXY headers taken (`-proxy`).
    pub proxied: u64,
    /// Closed for a bad, truncated, oversized, missing (at the header timeout) or untrusted
    /// PROXY header.
    pub proxy_rejected: u64,
}

/// When parked connections are ready and when they are given up on.
#[derive(Debug, Clone)]
pub struct ParkPolicy {
    pub wait: Wait,
    pub delimiter: Vec<u8>,
    pub head_size: usize,
    pub idle_timeout: Option<Duration>,
    pub header_timeout: Option<Duration>,
    pub max_parked: usize,
    pub proxy: ProxyPolicy,
}

#[derive(Debug)]
struct Entry {
    conn: Connection,
    serial: u32,
    handed_back: bool,
    /// Bytes have arrived (in head mode, not a whole head yet).
    has_sent: bool,
    idle_deadline: Option<Instant>,
    header_deadline: Option<Instant>,
    /// Waiting for its PROXY header (Some(trusted source)); its header timer runs from accept.
    awaiting_proxy: Option<bool>,
}

impl Entry {
    fn evictable(&self) -> bool {
        self.handed_back && !self.has_sent
    }
}

/// (deadline, index, serial), in the order they were set.
type TimerQueue = VecDeque<(Instant, usize, u32)>;

/// The two timeouts of a parked connection, each with its FIFO queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Idle,
    Header,
}

impl Timer {
    fn deadline(self, entry: &Entry) -> Option<Instant> {
        match self {
            Timer::Idle => entry.idle_deadline,
            Timer::Header => entry.header_deadline,
        }
    }
}

/// What an event on a parked connection came to.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to do yet.
    Parked,
    /// It is ready for a worker (it has left the set).
    Ready(Connection),
    /// It was at its end with nothing to read, and is closed.
    Closed,
}

#[derive(Debug)]
pub struct ParkedSet {
    policy: ParkPolicy,
    /// A slab: slots are reused, and each use has a new serial (never 0).
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    count: usize,
    last_serial: u32,
    idle: TimerQueue,
    header: TimerQueue,
    /// Handed-back connections in the order they came back (index, serial).
    evictable: VecDeque<(usize, u32)>,
    evictable_count: usize,
    peek: Vec<u8>,
    pub counters: ParkCounters,
}

impl ParkedSet {
    pub fn new(policy: ParkPolicy) -> ParkedSet {
        ParkedSet {
            policy,
            entries: Vec::new(),
            free: Vec::new(),
            count: 0,
            last_serial: 0,
            idle: VecDeque::new(),
            header: VecDeque::new(),
            evictable: VecDeque::new(),
            evictable_count: 0,
            peek: Vec::new(),
            counters: ParkCounters::default(),
        }
    }

    pub fn wait(&self) -> Wait {
        self.policy.wait
    }

    pub fn max_parked(&self) -> usize {
        self.policy.max_parked
    }

    /// Whether new connections start with a PROXY header (`-proxy`), so are held until it is in.
    pub fn proxy_enabled(&self) -> bool {
        self.policy.proxy.enabled()
    }

    /// With `-proxy`, takes a new connection's PROXY header if it is all there; if not yet,
    /// parks the connection until it is (with `held` connections held), or closes it if it is
    /// bad. The connection back when it can go on as `-wait` says.
    pub fn admit(&mut self, epoll: &Epoll, mut conn: Connection, held: usize, now: Instant) -> Option<Connection> {
        if !self.policy.proxy.enabled() {
            return Some(conn);
        }
        let trusted = self.policy.proxy.trusts(&conn);
        match self.policy.proxy.step(&mut conn, trusted, false, &mut self.peek) {
            Step::Done { proxied } => {
                self.counters.proxied += u64::from(proxied);
                return Some(conn);
            }
            Step::Rejected => self.counters.proxy_rejected += 1,
            Step::Gone => self.counters.closed_peer += 1,
            // Not to be handed over before its header is in: closed if it cannot be watched.
            Step::Pending => {
                if self.insert(epoll, lift(conn), false, Some(trusted), held, now).is_err() {
                    self.counters.proxy_rejected += 1;
                }
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Connections that could be evicted now.
    pub fn evictable(&self) -> usize {
        self.evictable_count
    }

    /// Parks `conn` (in `epoll`): `held` connections (this set and those waiting for a worker)
    /// are already held. At the limit, the longest-idle evictable connection is closed first; if
    /// there is none, a hand-back with nothing to read is itself that connection. The connection
    /// back if it cannot be watched (the caller gives it to a worker as it is).
    pub fn park(&mut self, epoll: &Epoll, conn: Connection, handed_back: bool, held: usize, now: Instant) -> Result<(), Connection> {
        self.insert(epoll, conn, handed_back, None, held, now)
    }

    /// Parks `conn`, awaiting its PROXY header if `awaiting_proxy` (see [`ParkedSet::park`]).
    fn insert(
        &mut self,
        epoll: &Epoll,
        conn: Connection,
        handed_back: bool,
        awaiting_proxy: Option<bool>,
        held: usize,
        now: Instant,
    ) -> Result<(), Connection> {
        if handed_back {
            self.counters.handed_back += 1;
        }
        if held >= self.policy.max_parked && !self.evict_one(epoll) && handed_back && !has_bytes(&conn) {
            self.counters.evicted += 1;
            return Ok(()); // closes as conn drops
        }
        let index = self.free.pop().unwrap_or(self.entries.len());
        if index > MAX_PARKED {
            return Err(conn);
        }
        self.last_serial = self.last_serial.checked_add(1).unwrap_or(1);
        let serial = self.last_serial;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        let event = EpollEvent::new(flags, member_token(Member::Parked, index, serial));
        if epoll.add(conn.fd.as_fd(), event).is_err() {
            if index < self.entries.len() {
                self.free.push(index);
            }
            return Err(conn);
        }
        let idle_deadline = self.policy.idle_timeout.map(|t| now + t);
        let header_deadline = self.policy.header_timeout.filter(|_| awaiting_proxy.is_some()).map(|t| now + t);
        let entry = Entry { conn, serial, handed_back, has_sent: false, idle_deadline, header_deadline, awaiting_proxy };
        if index == self.entries.len() {
            self.entries.push(Some(entry));
        } else {
            self.entries[index] = Some(entry);
        }
        self.count += 1;
        self.counters.parked_total += 1;
        if let Some(deadline) = idle_deadline {
            self.push_timer(Timer::Idle, deadline, index, serial);
        }
        if let Some(deadline) = header_deadline {
            self.push_timer(Timer::Header, deadline, index, serial);
        }
        if handed_back {
            self.evictable_count += 1;
            self.evictable.push_back((index, serial));
            self.compact_evictable();
        }
        Ok(())
    }

    /// Closes the longest-idle evictable connection, if there is one. One whose bytes (or end)
    /// are in the kernel but whose event this thread has not served yet is no longer a
    /// candidate: its event comes (the fds are edge-triggered), and its request is never lost.
    pub fn evict_one(&mut self, epoll: &Epoll) -> bool {
        while let Some((index, serial)) = self.evictable.pop_front() {
            if self.current(index, serial).is_some_and(|e| e.evictable() && !has_bytes(&e.conn)) {
                drop(self.remove(epoll, index));
                self.counters.evicted += 1;
                return true;
            }
        }
        false
    }

    /// Looks at a connection an event was reported for (stale events are ignored).
    pub fn on_event(&mut self, epoll: &Epoll, index: usize, serial: u32, flags: EpollFlags, now: Instant) -> Outcome {
        let Some(entry) = self.current(index, serial) else { return Outcome::Parked };
        let at_end = flags.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
        if entry.awaiting_proxy.is_some() {
            match self.proxy_step(index, at_end) {
                Step::Pending => return Outcome::Parked,
                Step::Done { .. } if self.policy.wait == Wait::None => return Outcome::Ready(self.remove(epoll, index)),
                // On to what `-wait` waits for: what came after the header is there already.
                Step::Done { .. } => {}
                Step::Rejected | Step::Gone => {
                    drop(self.remove(epoll, index));
                    return Outcome::Closed;
                }
            }
        }
        let fd = self.entries[index].as_ref().expect("current").conn.fd.as_raw_fd();
        let want = match self.policy.wait {
            Wait::Head => self.policy.head_size.max(1),
            _ => 1,
        };
        if self.peek.len() < want {
            self.peek.resize(want, 0);
        }
        let peeked = match recv(fd, &mut self.peek[..want], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Outcome::Parked,
            // Reset, or another failure: nothing a worker could do with it.
            Err(_) => None,
        };
        let Some(n) = peeked else {
            drop(self.remove(epoll, index));
            self.counters.closed_peer += 1;
            return Outcome::Closed;
        };
        let ready = self.policy.wait != Wait::Head
            || at_end
            || head_complete(&self.peek[..n], &self.policy.delimiter, self.policy.head_size);
        if ready {
            return Outcome::Ready(self.remove(epoll, index));
        }
        // Part of a head: the header timer runs from the first byte; idle means no new byte.
        let (header_timeout, idle_timeout) = (self.policy.header_timeout, self.policy.idle_timeout);
        let entry = self.entries[index].as_mut().expect("current");
        let first_bytes = !entry.has_sent;
        let was_evictable = entry.evictable();
        entry.has_sent = true;
        entry.idle_deadline = idle_timeout.map(|t| now + t);
        if first_bytes {
            entry.header_deadline = header_timeout.map(|t| now + t);
        }
        let (idle_deadline, header_deadline) = (entry.idle_deadline, entry.header_deadline);
        if was_evictable {
            self.evictable_count -= 1;
        }
        if let Some(deadline) = header_deadline.filter(|_| first_bytes) {
            self.push_timer(Timer::Header, deadline, index, serial);
        }
        if let Some(deadline) = idle_deadline {
            self.push_timer(Timer::Idle, deadline, index, serial);
        }
        Outcome::Parked
    }

    /// Closes the connections whose idle or header time is up. Header first: a head that stalls
    /// until both fall due together ended on its header timeout.
    pub fn expire(&mut self, epoll: &Epoll, now: Instant) {
        for timer in [Timer::Header, Timer::Idle] {
            while let Some(index) = self.next_due(timer).filter(|(d, ..)| *d <= now).map(|(_, i, _)| i) {
                self.queue(timer).pop_front();
                // Idle, as far as this thread has seen; but bytes that came since are served by
                // their event, still to come (edge-triggered), not lost to the timer.
                let unseen_bytes = self.entries[index].as_ref().is_some_and(|e| !e.has_sent && has_bytes(&e.conn));
                if timer == Timer::Idle && unseen_bytes {
                    continue;
                }
                let awaiting_proxy = self.entries[index].as_ref().is_some_and(|e| e.awaiting_proxy.is_some());
                drop(self.remove(epoll, index));
                match timer {
                    Timer::Idle => self.counters.closed_idle += 1,
                    Timer::Header if awaiting_proxy => self.counters.proxy_rejected += 1,
                    Timer::Header => self.counters.closed_header += 1,
                }
            }
        }
    }

    /// The earliest deadline of a parked connection.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        let idle = self.next_due(Timer::Idle).map(|e| e.0);
        let header = self.next_due(Timer::Header).map(|e| e.0);
        match (idle, header) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The head of a timer's queue that is still set, dropping stale heads on the way (their
    /// connection has left, or its timer was set again later).
    fn next_due(&mut self, timer: Timer) -> Option<(Instant, usize, u32)> {
        while let Some(&head) = self.queue(timer).front() {
            if self.is_set(timer, head) {
                return Some(head);
            }
            self.queue(timer).pop_front();
        }
        None
    }

    fn queue(&mut self, timer: Timer) -> &mut TimerQueue {
        match timer {
            Timer::Idle => &mut self.idle,
            Timer::Header => &mut self.header,
        }
    }

    fn is_set(&self, timer: Timer, (deadline, index, serial): (Instant, usize, u32)) -> bool {
        self.current(index, serial).is_some_and(|e| timer.deadline(e) == Some(deadline))
    }

    /// Queues a timer, and drops the stale entries when they outnumber the live ones, so that
    /// a queue never grows beyond a small multiple of the parked connections.
    fn push_timer(&mut self, timer: Timer, deadline: Instant, index: usize, serial: u32) {
        self.queue(timer).push_back((deadline, index, serial));
        if self.queue(timer).len() > 2 * self.count + 64 {
            let mut queue = std::mem::take(self.queue(timer));
            queue.retain(|&entry| self.is_set(timer, entry));
            *self.queue(timer) = queue;
        }
    }

    /// Runs the PROXY header step of a parked connection, and counts what it came to. Once done,
    /// the header timer is off (a head's own starts at its first byte).
    fn proxy_step(&mut self, index: usize, at_end: bool) -> Step {
        let entry = self.entries[index].as_mut().expect("current");
        let trusted = entry.awaiting_proxy.expect("awaiting its header");
        let step = self.policy.proxy.step(&mut entry.conn, trusted, at_end, &mut self.peek);
        match step {
            // Part of a header, seen: the idle timer may close it now (it skips only bytes this
            // thread has not seen yet).
            Step::Pending => entry.has_sent = true,
            Step::Done { proxied } => {
                entry.awaiting_proxy = None;
                entry.header_deadline = None;
                entry.has_sent = false; // a head's bytes start now
                self.counters.proxied += u64::from(proxied);
            }
            Step::Rejected => self.counters.proxy_rejected += 1,
            Step::Gone => self.counters.closed_peer += 1,
        }
        step
    }

    fn current(&self, index: usize, serial: u32) -> Option<&Entry> {
        self.entries.get(index)?.as_ref().filter(|e| e.serial == serial)
    }

    /// Takes a connection out of the set and out of `epoll` (explicitly: a copy of its fd in a
    /// child forked a moment ago would keep it in).
    fn remove(&mut self, epoll: &Epoll, index: usize) -> Connection {
        let entry = self.entries[index].take().expect("a parked connection");
        let _ = epoll.delete(entry.conn.fd.as_fd());
        self.free.push(index);
        self.count -= 1;
        if entry.evictable() {
            self.evictable_count -= 1;
        }
        entry.conn
    }

    /// Drops stale entries once a queue holds more than twice the parked connections.
    fn compact_evictable(&mut self) {
        if self.evictable.len() > 2 * self.count + 64 {
            let mut queue = std::mem::take(&mut self.evictable);
            queue.retain(|&(i, s)| self.current(i, s).is_some_and(Entry::evictable));
            self.evictable = queue;
        }
    }
}

/// The connection at an fd number above select()'s range, where parked connections live (see
/// `fdpass::above_select_range`); as it is if it is there already or cannot be moved. With
/// `-wait none` and `-proxy`, only the rare connection whose header is not in at accept is
/// parked, so it is moved then, not at accept.
fn lift(conn: Connection) -> Connection {
    if conn.fd.as_raw_fd() >= libc::FD_SETSIZE as i32 {
        return conn;
    }
    let section = CreateSection::enter();
    match conn.fd.try_clone().map(fdpass::above_select_range).and_then(|fd| section.adopt(fd)) {
        Ok(fd) => Connection { fd, peer: conn.peer },
        Err(_) => conn,
    }
}

/// True if a byte (or the end) can be read from the connection now.
fn has_bytes(conn: &Connection) -> bool {
    let mut byte = [0u8; 1];
    !matches!(recv(conn.fd.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Err(nix::errno::Errno::EAGAIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRLF2: &[u8] = b"\r\n\r\n";

    #[test]
    fn a_head_is_complete_at_the_delimiter_or_at_the_size_cap() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", CRLF2, 16384));
        assert!(head_complete(b"GET / HTTP/1.1\r\n\r\nbody", CRLF2, 16384), "bytes after the head");
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n", CRLF2, 16384), "truncated");
        assert!(!head_complete(b"GET / HTTP/1.1\r\n\r", CRLF2, 16384), "the delimiter cut short");
        assert!(!head_complete(b"", CRLF2, 16384));
        assert!(head_complete(&[b'x'; 16], CRLF2, 16), "oversized: handed over anyway");
        assert!(!head_complete(&[b'x'; 15], CRLF2, 16));
        assert!(head_complete(b"ab|", b"|", 100), "any delimiter");
    }

    #[test]
    fn a_delimiter_split_over_reads_is_found_once_it_has_all_arrived() {
        // Peeking sees everything buffered so far, so each look is at a longer prefix.
        let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let complete: Vec<bool> = (0..=request.len()).map(|n| head_complete(&request[..n], CRLF2, 16384)).collect();
        assert_eq!(complete.iter().position(|&c| c), Some(request.len()));
    }

    #[test]
    fn garbage_is_complete_only_when_it_holds_the_delimiter_or_fills_the_cap() {
        let mut rng = crate::wire::tests::Prng(0x4ead);
        for _ in 0..5000 {
            let bytes = rng.bytes(64);
            let has = bytes.windows(4).any(|w| w == CRLF2);
            assert_eq!(head_complete(&bytes, CRLF2, 48), has || bytes.len() >= 48, "{bytes:?}");
        }
    }

    #[test]
    fn wait_modes_have_their_names() {
        for (index, name) in Wait::NAMES.iter().enumerate() {
            assert_eq!(Wait::from_index(index).map(Wait::name), Some(*name));
        }
        assert_eq!(Wait::from_index(3), None);
    }
}
