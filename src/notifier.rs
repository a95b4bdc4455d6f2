//! A single-threaded poll(2) notifier for Tcl 8.6, installed on request (`::socketserver::notifier
//! poll`) through `Tcl_SetNotifier`; `ffi` holds the hooks, this module the logic.
//!
//! Why: Tcl 8.6's Unix notifier makes every thread that waits for files hand its fds to a
//! notifier thread (a trigger-pipe write, a mutex hand-off, that thread's select, a condition
//! variable), so each wake-up costs four to six context switches. A worker wakes once per
//! connection, and this was most of its CPU (measured: 6.3 switches per connection). Here each
//! thread polls its own fds and sleeps once. Tcl 8.7 made the same change (its epoll notifier).
//!
//! Each thread has its own handlers, as with Tcl's notifier, and an eventfd so that other threads
//! (`Tcl_ThreadAlert`) and signal handlers (`Tcl_AsyncMark`) can wake it. Alerts find that eventfd
//! through a fixed table of atomics, because they may run in a signal handler.

use crate::fork_safety::{self, CreateSection};
use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

/// Tcl's event masks (tcl.h).
pub const READABLE: c_int = 2;
pub const WRITABLE: c_int = 4;
pub const EXCEPTION: c_int = 8;

/// What Tcl asked to call when an fd is ready: `proc_(data, mask)`. Called only by `ffi`.
#[derive(Clone, Copy, Debug)]
pub struct Callback {
    pub proc_: unsafe extern "C" fn(*mut c_void, c_int),
    pub data: *mut c_void,
}

#[derive(Debug)]
struct Handler {
    fd: RawFd,
    mask: c_int,
    /// Events seen since the handler last ran; non-zero while its event is queued.
    ready: c_int,
    callback: Callback,
    /// Not polled until set again: the fd was closed without deleting the handler (POLLNVAL),
    /// or hung up while the handler asks for nothing that would report it (select would not
    /// either); poll would return at once forever.
    unpolled: bool,
}

/// One thread's file handlers.
#[derive(Debug, Default)]
pub struct HandlerTable {
    handlers: Vec<Handler>,
}

impl HandlerTable {
    /// Tcl_CreateFileHandler: a second call for the same fd replaces the first.
    pub fn set(&mut self, fd: RawFd, mask: c_int, callback: Callback) {
        match self.handlers.iter_mut().find(|h| h.fd == fd) {
            Some(handler) => {
                handler.mask = mask;
                handler.callback = callback;
                handler.unpolled = false;
            }
            None => self.handlers.push(Handler { fd, mask, ready: 0, callback, unpolled: false }),
        }
    }

    /// Tcl_DeleteFileHandler: an event already queued for `fd` then finds nothing to call.
    pub fn remove(&mut self, fd: RawFd) {
        self.handlers.retain(|h| h.fd != fd);
    }

    /// The pollfd array for the handlers (replacing `out`'s contents, keeping its allocation).
    fn fill(&self, out: &mut Vec<libc::pollfd>) {
        out.clear();
        out.extend(self.handlers.iter().filter(|h| !h.unpolled).map(|h| libc::pollfd {
            fd: h.fd,
            events: poll_events(h.mask),
            revents: 0,
        }));
    }

    /// Records what `polled` (from [`fill`], polled) found, and calls `queue(fd)` for every
    /// handler that became ready and has no event queued yet.
    fn record(&mut self, polled: &[libc::pollfd], queue: &mut dyn FnMut(RawFd)) {
        for p in polled.iter().filter(|p| p.revents != 0) {
            let Some(handler) = self.handlers.iter_mut().find(|h| h.fd == p.fd) else { continue };
            let mask = ready_mask(p.revents) & handler.mask;
            if mask != 0 {
                if handler.ready == 0 {
                    queue(handler.fd);
                }
                handler.ready = mask;
            } else if p.revents & (libc::POLLNVAL | libc::POLLHUP | libc::POLLERR) != 0 {
                handler.unpolled = true;
            }
        }
    }

    /// For a queued event being serviced: the callback and what is ready, if anything still is.
    pub fn take_ready(&mut self, fd: RawFd) -> Option<(Callback, c_int)> {
        let handler = self.handlers.iter_mut().find(|h| h.fd == fd)?;
        let mask = std::mem::take(&mut handler.ready) & handler.mask;
        (mask != 0).then_some((handler.callback, mask))
    }
}

fn poll_events(mask: c_int) -> libc::c_short {
    let mut events = 0;
    if mask & READABLE != 0 {
        events |= libc::POLLIN;
    }
    if mask & WRITABLE != 0 {
        events |= libc::POLLOUT;
    }
    if mask & EXCEPTION != 0 {
        events |= libc::POLLPRI;
    }
    events
}

/// What select(2), which Tcl's handlers were written against, would report: an fd at its end or
/// in error is readable and writable, so that the handler's read or write finds out.
fn ready_mask(revents: libc::c_short) -> c_int {
    let mut mask = 0;
    if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
        mask |= READABLE;
    }
    if revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
        mask |= WRITABLE;
    }
    if revents & libc::POLLPRI != 0 {
        mask |= EXCEPTION;
    }
    mask
}

/// How many threads can be woken by an alert; one more still works, but only polls (see
/// [`MISSED_ALERT_BOUND`]).
const WAKE_SLOTS: usize = 1024;
/// A thread without a wake slot never sleeps longer than this, so an alert is late, not lost.
const MISSED_ALERT_BOUND: Duration = Duration::from_millis(10);

/// A slot is one u64: the fork generation that wrote it (31 bits), whether a thread holds it
/// (1 bit), and its eventfd (32 bits; NO_FD until the holder first waits). An eventfd, once
/// made, stays with its slot and is never closed (the next thread to hold the slot reuses it),
/// so an alert that read a slot just before its thread ended still writes to an eventfd and
/// never to some other fd that took its number. A slot of another generation was copied
/// through fork: the fork handler has closed its eventfd, so nothing writes to it and any
/// thread may take it.
const FREE: u64 = u64::MAX;
const NO_FD: u32 = u32::MAX;
const HELD: u64 = 1 << 32;

#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: AtomicU64 = AtomicU64::new(FREE);
static WAKE_FDS: [AtomicU64; WAKE_SLOTS] = [FREE_SLOT; WAKE_SLOTS];

fn this_generation() -> u64 {
    fork_safety::generation() & 0x7fff_ffff
}

fn slot_value(held: bool, fd: u32) -> u64 {
    (this_generation() << 33) | if held { HELD } else { 0 } | fd as u64
}

fn is_current(value: u64) -> bool {
    value != FREE && value >> 33 == this_generation()
}

fn wake_fd(value: u64) -> Option<RawFd> {
    (is_current(value) && value as u32 != NO_FD).then_some(value as u32 as RawFd)
}

fn write_wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd; async-signal-safe. A full counter
    // (EAGAIN) already means "wake up".
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Wakes the thread whose token is `token` (from [`wake_token`]), or every thread using this
/// notifier if the token is not one of ours (threads that Tcl's own notifier set up before this
/// one was installed). Only atomics and write(2): safe in a signal handler.
pub fn alert(token: usize) {
    match token.checked_sub(1).filter(|&slot| slot < WAKE_SLOTS) {
        Some(slot) => {
            if let Some(fd) = wake_fd(WAKE_FDS[slot].load(SeqCst)) {
                write_wake(fd);
            }
        }
        None => WAKE_FDS.iter().filter_map(|s| wake_fd(s.load(SeqCst))).for_each(write_wake),
    }
}

/// Takes a slot for this thread: one that is free and has an eventfd to reuse, else a free one,
/// else one copied through fork (last, so that a thread forked with its slot takes that back
/// before a new thread could).
fn claim_slot() -> Option<usize> {
    let held_no_fd = slot_value(true, NO_FD);
    let take = |pick: &dyn Fn(u64) -> Option<u64>| {
        WAKE_FDS.iter().position(|s| s.fetch_update(SeqCst, SeqCst, pick).is_ok())
    };
    take(&|old| (is_current(old) && old & HELD == 0 && old as u32 != NO_FD).then_some(old | HELD))
        .or_else(|| take(&|old| (old == FREE).then_some(held_no_fd)))
        .or_else(|| take(&|old| (!is_current(old)).then_some(held_no_fd)))
}

/// The notifier state of one thread.
#[derive(Debug, Default)]
struct ThreadNotifier {
    table: HandlerTable,
    polled: Vec<libc::pollfd>,
    /// Our slot in WAKE_FDS, taken when first asked for (see `slot`).
    slot: Option<usize>,
}

impl ThreadNotifier {
    /// Our slot, taken (in this process) if need be. Only atomics: this also runs inside Tcl's
    /// fork handler (Tcl_InitNotifier in the child), where nothing may wait; in a child it may
    /// run before our own fork handler has counted the fork, and then takes back a slot that
    /// looks current and turns stale a moment later, which the first wait puts right.
    fn slot(&mut self) -> Option<usize> {
        if let Some(slot) = self.slot {
            let value = WAKE_FDS[slot].load(SeqCst);
            if is_current(value) && value & HELD != 0 {
                return Some(slot); // ours: a held slot is never taken (see take_slot_back_in_child)
            }
            // A forked child: our slot was copied with the parent's generation; take it back.
            if !is_current(value) && WAKE_FDS[slot].compare_exchange(value, slot_value(true, NO_FD), SeqCst, SeqCst).is_ok() {
                return Some(slot);
            }
        }
        self.slot = claim_slot();
        self.slot
    }

    /// Our eventfd, made at the first wait (and again in a forked child). It starts signalled:
    /// an alert sent before it existed found nothing to write to, and waking once for nothing is
    /// harmless.
    fn wake(&mut self) -> Option<RawFd> {
        let slot = self.slot()?;
        if let Some(fd) = wake_fd(WAKE_FDS[slot].load(SeqCst)) {
            return Some(fd);
        }
        let section = CreateSection::enter();
        // SAFETY: eventfd has no memory arguments; a non-negative result is a new fd we own.
        let raw = unsafe { libc::eventfd(1, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return None;
        }
        // SAFETY: raw is the fresh eventfd, owned by nothing else.
        let fd = section.adopt(unsafe { OwnedFd::from_raw_fd(raw) }).ok()?;
        // The slot owns it from now on, for good (see WAKE_FDS); it stays marked, so that
        // forked children close their copy.
        std::mem::forget(fd);
        WAKE_FDS[slot].store(slot_value(true, raw as u32), SeqCst);
        Some(raw)
    }
}

impl Drop for ThreadNotifier {
    /// Gives the slot up: free if it has no eventfd, else kept with it for the next thread.
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let give_up = |old: u64| {
                let freed = if old as u32 == NO_FD { FREE } else { old & !HELD };
                is_current(old).then_some(freed)
            };
            let _ = WAKE_FDS[slot].fetch_update(SeqCst, SeqCst, give_up);
        }
    }
}

/// In a forked child, before any other thread can exist there: the forking thread takes its
/// slot back under the new generation, so that no thread the child starts can take it first.
extern "C" fn take_slot_back_in_child() {
    let _ = THREAD.try_with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            if t.slot.is_some() {
                t.slot();
            }
        }
    });
}

/// Registers [`take_slot_back_in_child`]; once, when the notifier is installed (after the
/// fork_safety handler, so it runs after the generation has changed).
pub fn install_fork_handler() -> io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = 0;
    ONCE.call_once(|| {
        // SAFETY: the handler is an extern "C" function that lives as long as the library.
        result = unsafe { libc::pthread_atfork(None, None, Some(take_slot_back_in_child)) };
    });
    match result {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

thread_local! {
    static THREAD: RefCell<ThreadNotifier> = RefCell::default();
}

fn drain(fd: RawFd) {
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from our nonblocking eventfd.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
}

/// Runs `f` on this thread's state; `None` if it is in use (a re-entrant call) or gone (thread
/// exit), which no caller turns into a panic.
fn with_thread<R>(f: impl FnOnce(&mut ThreadNotifier) -> R) -> Option<R> {
    THREAD.try_with(|t| t.try_borrow_mut().ok().map(|mut t| f(&mut t))).ok().flatten()
}

/// The token that [`alert`] takes to wake this thread (0 if there is no slot left: then alerts
/// reach it only by broadcast, and [`wait`] never sleeps long).
pub fn wake_token() -> usize {
    with_thread(|t| t.slot()).flatten().map_or(0, |slot| slot + 1)
}

pub fn set_handler(fd: RawFd, mask: c_int, callback: Callback) {
    with_thread(|t| t.table.set(fd, mask, callback));
}

pub fn remove_handler(fd: RawFd) {
    with_thread(|t| t.table.remove(fd));
}

pub fn take_ready(fd: RawFd) -> Option<(Callback, c_int)> {
    with_thread(|t| t.table.take_ready(fd)).flatten()
}

/// Waits until a handler's fd is ready, an alert comes, a signal arrives or `timeout` (`None`:
/// no limit) passes, and calls `queue(fd)` for each handler to run. `queue` must not call back
/// into this module.
pub fn wait(timeout: Option<Duration>, queue: &mut dyn FnMut(RawFd)) -> io::Result<()> {
    with_thread(|t| {
        let mut polled = std::mem::take(&mut t.polled);
        t.table.fill(&mut polled);
        let wake = t.wake();
        let timeout = match wake {
            Some(_) => timeout,
            None => Some(timeout.map_or(MISSED_ALERT_BOUND, |t| t.min(MISSED_ALERT_BOUND))),
        };
        if let Some(fd) = wake {
            polled.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        let spec = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let spec_ptr = spec.as_ref().map_or(std::ptr::null(), |s| s as *const libc::timespec);
        // SAFETY: polled is a live array of polled.len() pollfds; spec_ptr is null or points to
        // a live timespec; a null signal mask leaves the thread's mask alone.
        let found = unsafe { libc::ppoll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, spec_ptr, std::ptr::null()) };
        let result = if found < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(err) }
        } else {
            if let Some(fd) = wake {
                if polled.pop().is_some_and(|p| p.revents != 0) {
                    drain(fd);
                }
            }
            t.table.record(&polled, queue);
            Ok(())
        };
        t.polled = polled;
        result
    })
    .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    unsafe extern "C" fn nothing(_data: *mut c_void, _mask: c_int) {}

    fn callback(tag: usize) -> Callback {
        Callback { proc_: nothing, data: tag as *mut c_void }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    fn poll_once(table: &mut HandlerTable) -> Vec<RawFd> {
        let mut polled = Vec::new();
        table.fill(&mut polled);
        // SAFETY: a live array of pollfds, no wait.
        unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        let mut queued = Vec::new();
        table.record(&polled, &mut |fd| queued.push(fd));
        queued
    }

    #[test]
    fn a_ready_fd_is_queued_once_until_serviced() {
        let (r, w) = pipe();
        let mut table = HandlerTable::default();
        table.set(r.as_raw_fd(), READABLE, callback(1));
        assert!(poll_once(&mut table).is_empty());
        nix::unistd::write(w.as_fd(), b"x").unwrap();
        assert_eq!(poll_once(&mut table), vec![r.as_raw_fd()]);
        assert!(poll_once(&mut table).is_empty(), "already queued");
        let (cb, mask) = table.take_ready(r.as_raw_fd()).unwrap();
        assert_eq!((cb.data as usize, mask), (1, READABLE));
        assert!(table.take_ready(r.as_raw_fd()).is_none());
        assert_eq!(poll_once(&mut table), vec![r.as_raw_fd()], "still readable: queued again");
    }

    #[test]
    fn only_the_asked_events_are_reported() {
        let (r, w) = pipe();
        let mut table = HandlerTable::default();
        table.set(w.as_raw_fd(), READABLE, callback(1));
        assert!(poll_once(&mut table).is_empty(), "a pipe's write end is writable, not readable");
        table.set(w.as_raw_fd(), WRITABLE, callback(2));
        assert_eq!(poll_once(&mut table), vec![w.as_raw_fd()]);
        assert_eq!(table.take_ready(w.as_raw_fd()).map(|(c, m)| (c.data as usize, m)), Some((2, WRITABLE)));
        drop(r);
    }

    #[test]
    fn a_deleted_handler_is_not_called() {
        let (r, w) = pipe();
        let mut table = HandlerTable::default();
        table.set(r.as_raw_fd(), READABLE, callback(1));
        nix::unistd::write(w.as_fd(), b"x").unwrap();
        assert_eq!(poll_once(&mut table).len(), 1);
        table.remove(r.as_raw_fd());
        assert!(table.take_ready(r.as_raw_fd()).is_none());
    }

    #[test]
    fn a_hang_up_that_no_asked_event_reports_is_dropped_from_polling() {
        let (r, w) = pipe();
        let mut table = HandlerTable::default();
        table.set(r.as_raw_fd(), EXCEPTION, callback(1));
        drop(w);
        assert!(poll_once(&mut table).is_empty());
        let mut polled = Vec::new();
        table.fill(&mut polled);
        assert!(polled.is_empty(), "POLLHUP would return at once forever");
        table.set(r.as_raw_fd(), READABLE, callback(1));
        assert_eq!(poll_once(&mut table), vec![r.as_raw_fd()], "set again: readable at its end");
    }

    #[test]
    fn a_closed_fd_is_dropped_from_polling_until_set_again() {
        let (r, w) = pipe();
        let raw = r.as_raw_fd();
        let mut table = HandlerTable::default();
        table.set(raw, READABLE, callback(1));
        drop(r);
        assert!(poll_once(&mut table).is_empty());
        let mut polled = Vec::new();
        table.fill(&mut polled);
        assert!(polled.is_empty(), "POLLNVAL would return at once forever");
        drop(w);
    }

    #[test]
    fn end_of_file_and_errors_are_readable_and_writable() {
        assert_eq!(ready_mask(libc::POLLHUP), READABLE | WRITABLE);
        assert_eq!(ready_mask(libc::POLLERR), READABLE | WRITABLE);
        assert_eq!(ready_mask(libc::POLLIN), READABLE);
        assert_eq!(ready_mask(libc::POLLPRI), EXCEPTION);
        assert_eq!(poll_events(READABLE | WRITABLE | EXCEPTION), libc::POLLIN | libc::POLLOUT | libc::POLLPRI);
    }

    /// The tests that claim wake slots or wait run one at a time, so that one test's slots are
    /// not another's.
    static SLOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn wait_returns_for_a_ready_fd_and_honours_its_timeout() {
        let _serial = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        let (r, w) = pipe();
        set_handler(r.as_raw_fd(), READABLE, callback(7));
        let mut queued = Vec::new();
        wait(Some(Duration::ZERO), &mut |fd| queued.push(fd)).unwrap(); // the first wakes at once
        let start = std::time::Instant::now();
        wait(Some(Duration::from_millis(30)), &mut |fd| queued.push(fd)).unwrap();
        assert!(queued.is_empty() && start.elapsed() >= Duration::from_millis(25));
        nix::unistd::write(w.as_fd(), b"x").unwrap();
        wait(Some(Duration::from_secs(5)), &mut |fd| queued.push(fd)).unwrap();
        assert_eq!(queued, vec![r.as_raw_fd()]);
        assert_eq!(take_ready(r.as_raw_fd()).map(|(c, m)| (c.data as usize, m)), Some((7, READABLE)));
        remove_handler(r.as_raw_fd());
    }

    #[test]
    fn an_alert_from_another_thread_ends_a_wait() {
        let _serial = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        let token = wake_token();
        assert!(token > 0);
        wait(Some(Duration::ZERO), &mut |_| {}).unwrap(); // the first wakes at once
        let alerter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            alert(token);
        });
        let start = std::time::Instant::now();
        wait(Some(Duration::from_secs(5)), &mut |_| {}).unwrap();
        assert!(start.elapsed() < Duration::from_secs(4));
        alerter.join().unwrap();
        // A token that is not ours (Tcl's own notifier's) wakes every thread: this one too.
        alert(0x5555_0000);
        let start = std::time::Instant::now();
        wait(Some(Duration::from_secs(5)), &mut |_| {}).unwrap();
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn threads_get_their_own_slots_and_free_them_on_exit() {
        let _serial = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        let mine = wake_token();
        let theirs = std::thread::spawn(wake_token).join().unwrap();
        assert!(theirs > 0 && theirs != mine);
        let given_up = WAKE_FDS[theirs - 1].load(SeqCst);
        assert!(given_up == FREE || given_up & HELD == 0, "given up when it ended");
        // A slot without an eventfd is freed, not kept: nothing else could take it again.
        let free = WAKE_FDS.iter().position(|s| s.load(SeqCst) == FREE).expect("a free slot");
        WAKE_FDS[free].store(slot_value(true, NO_FD), SeqCst);
        let mut reserved = ThreadNotifier::default();
        reserved.slot = Some(free);
        drop(reserved);
        assert_eq!(WAKE_FDS[free].load(SeqCst), FREE);
        // A thread that waited made an eventfd, which stays with its slot for the next thread.
        let waited = std::thread::spawn(|| {
            wait(Some(Duration::ZERO), &mut |_| {}).unwrap();
            wake_token()
        });
        let token = waited.join().unwrap();
        let value = WAKE_FDS[token - 1].load(SeqCst);
        assert!(value as u32 != NO_FD && value & HELD == 0, "kept, not held");
        let next = std::thread::spawn(|| WAKE_FDS[wake_token() - 1].load(SeqCst) as u32);
        assert_ne!(next.join().unwrap(), NO_FD, "a slot with an eventfd is taken first, fd and all");
    }
}
