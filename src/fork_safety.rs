//! File descriptors that a forked child must not keep.
//!
//! The serving process forks its workers while the dispatcher thread runs. A child gets a copy of
//! every fd, but only the forking thread. Had it kept the listener, `close` could not free the
//! port; had it kept an accepted client socket, that client would never see the connection close.
//! So every fd the dispatcher owns is a [`ParentOnlyFd`]: its number is marked in a lock-free
//! bitmap, and a `pthread_atfork` child handler closes every marked fd in the child.
//!
//! Marking must not race with `fork`: an fd created but not yet marked when the process forks
//! would leak into the child. Creation and closing therefore happen inside a [`CreateSection`], and
//! the prepare handler waits (briefly: the sections contain only non-blocking syscalls) until no
//! section is open. Only atomics are shared, so the child never waits on anything the dispatcher
//! thread held.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Once;

/// Fds at or above this number cannot be marked; [`CreateSection::adopt`] refuses them.
const MAX_FDS: usize = 1 << 20;
const WORDS: usize = MAX_FDS / 64;

#[allow(clippy::declare_interior_mutable_const)]
const CLEAR: AtomicU64 = AtomicU64::new(0);
static MARKED: [AtomicU64; WORDS] = [CLEAR; WORDS];
/// One past the highest word ever marked, so the child scans only what was used.
static USED_WORDS: AtomicUsize = AtomicUsize::new(0);
/// Threads inside a [`CreateSection`].
static CREATING: AtomicUsize = AtomicUsize::new(0);
/// Forks between their prepare and parent handlers.
static FORKING: AtomicUsize = AtomicUsize::new(0);
/// Counts forks along this process's line: a child's differs from every ancestor's.
static GENERATION: AtomicU64 = AtomicU64::new(0);

static INSTALL: Once = Once::new();

/// Registers the fork handlers, once per process. Must run before the first fd is adopted.
pub fn install() -> io::Result<()> {
    let mut result = 0;
    INSTALL.call_once(|| {
        // SAFETY: the three handlers are plain `extern "C"` functions that live as long as the
        // library, which is never unloaded (the package provides no unload procedure).
        result = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    });
    match result {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

extern "C" fn prepare() {
    FORKING.fetch_add(1, SeqCst);
    while CREATING.load(SeqCst) != 0 {
        std::thread::yield_now();
    }
}

extern "C" fn parent() {
    FORKING.fetch_sub(1, SeqCst);
}

extern "C" fn child() {
    // Only async-signal-safe work here: atomics and close(2). The generation first, so that
    // nothing (a signal handler's alert, say) writes to an fd below while it is being closed.
    GENERATION.fetch_add(1, SeqCst);
    let used = USED_WORDS.load(SeqCst).min(WORDS);
    for (index, word) in MARKED[..used].iter().enumerate() {
        let mut bits = word.swap(0, SeqCst);
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // SAFETY: the fd was marked as owned by the parent's dispatcher; in the child nothing
            // owns it (the dispatcher thread does not exist here), so closing it frees no one's fd.
            unsafe { libc::close((index * 64 + bit) as RawFd) };
        }
    }
    CREATING.store(0, SeqCst);
    FORKING.store(0, SeqCst);
    // The forking thread held no section (prepare waited them out), so its DEPTH is 0 already.
}

/// Which process of a fork lineage this is: state created under one generation and found under
/// another is a copy inherited by a forked child.
pub fn generation() -> u64 {
    GENERATION.load(SeqCst)
}

thread_local! {
    /// Sections this thread has open: only the outermost counts in CREATING, so that a nested
    /// one (a ParentOnlyFd dropped inside a section) never waits for a fork that waits for us.
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// While alive, no fork can happen between creating an fd and marking it. Not Send: it must end
/// on the thread that entered it (the nesting depth is per thread).
pub struct CreateSection(std::marker::PhantomData<*const ()>);

impl CreateSection {
    pub fn enter() -> CreateSection {
        let depth = DEPTH.with(|d| d.replace(d.get() + 1));
        if depth > 0 {
            return CreateSection(std::marker::PhantomData);
        }
        loop {
            CREATING.fetch_add(1, SeqCst);
            if FORKING.load(SeqCst) == 0 {
                return CreateSection(std::marker::PhantomData);
            }
            CREATING.fetch_sub(1, SeqCst);
            while FORKING.load(SeqCst) != 0 {
                std::thread::yield_now();
            }
        }
    }

    /// Takes ownership of `fd` as one that forked children close.
    pub fn adopt(&self, fd: OwnedFd) -> io::Result<ParentOnlyFd> {
        self.adopt_owner(fd)
    }

    /// Takes ownership of `owner`, which owns one fd (an `OwnedFd`, or nix's `Epoll`, say), as
    /// one that forked children close.
    pub fn adopt_owner<T: AsRawFd>(&self, owner: T) -> io::Result<ParentOnly<T>> {
        let raw = owner.as_raw_fd();
        let Ok(index) = usize::try_from(raw) else {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        };
        if index >= MAX_FDS {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        MARKED[index / 64].fetch_or(1 << (index % 64), SeqCst);
        USED_WORDS.fetch_max(index / 64 + 1, SeqCst);
        Ok(ParentOnly { owner: ManuallyDrop::new(owner), generation: generation() })
    }
}

impl Drop for CreateSection {
    fn drop(&mut self) {
        if DEPTH.with(|d| d.replace(d.get() - 1)) == 1 {
            CREATING.fetch_sub(1, SeqCst);
        }
    }
}

/// An owner of one fd (see [`CreateSection::adopt_owner`]) whose fd is closed in every child
/// forked while it is open. A copy of it that lives on in such a child closes nothing when
/// dropped: the fork handler has closed the fd already.
#[derive(Debug)]
pub struct ParentOnly<T: AsRawFd> {
    owner: ManuallyDrop<T>,
    generation: u64,
}

/// The usual case: a plain fd.
pub type ParentOnlyFd = ParentOnly<OwnedFd>;

impl<T: AsRawFd> std::ops::Deref for ParentOnly<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.owner
    }
}

impl<T: AsRawFd + AsFd> AsFd for ParentOnly<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.owner.as_fd()
    }
}

impl<T: AsRawFd> AsRawFd for ParentOnly<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.owner.as_raw_fd()
    }
}

impl<T: AsRawFd> Drop for ParentOnly<T> {
    fn drop(&mut self) {
        if self.generation != generation() {
            // In a forked child: the fd is closed already, and its number may be reused.
            return;
        }
        // Unmark and close as one step for fork: a child must neither inherit the fd unmarked
        // nor close a number that has been reused by then.
        let _section = CreateSection::enter();
        let index = self.owner.as_raw_fd() as usize;
        MARKED[index / 64].fetch_and(!(1 << (index % 64)), SeqCst);
        // SAFETY: dropped exactly once, here, and never used again (self is being dropped).
        unsafe { ManuallyDrop::drop(&mut self.owner) };
    }
}

#[cfg(test)]
pub(crate) fn is_marked(fd: RawFd) -> bool {
    let index = fd as usize;
    MARKED[index / 64].load(SeqCst) & (1 << (index % 64)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only queries the fd table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    }

    #[test]
    fn adopted_fds_are_marked_until_dropped() {
        install().unwrap();
        let (a, _b) = pair();
        let section = CreateSection::enter();
        let a = section.adopt(a).unwrap();
        drop(section);
        let raw = a.as_raw_fd();
        assert!(is_marked(raw));
        drop(a);
        assert!(!is_marked(raw));
        assert!(!is_open(raw));
    }

    #[test]
    fn a_nested_section_does_not_wait_for_a_fork_that_waits_for_the_outer_one() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outer = CreateSection::enter();
            FORKING.fetch_add(1, SeqCst); // as a fork's prepare handler does, then waits for us
            let inner = CreateSection::enter();
            drop(inner);
            FORKING.fetch_sub(1, SeqCst);
            drop(outer);
            done.send(()).unwrap();
        });
        if finished.recv_timeout(std::time::Duration::from_secs(5)).is_err() {
            FORKING.fetch_sub(1, SeqCst); // let the other tests' sections through, then fail
            panic!("a nested section waited for the fork");
        }
    }

    #[test]
    fn a_forked_child_closes_adopted_fds_and_keeps_others() {
        install().unwrap();
        let (parent_only, _peer) = pair();
        let (kept, _kept_peer) = pair();
        let section = CreateSection::enter();
        let parent_only = section.adopt(parent_only).unwrap();
        drop(section);
        let (p, k) = (parent_only.as_raw_fd(), kept.as_raw_fd());
        // SAFETY: the test's child does nothing but the async-signal-safe checks below.
        match unsafe { libc::fork() } {
            // SAFETY: the child only queries its fd table and leaves with _exit.
            0 => unsafe {
                let code = if !is_open(p) && is_open(k) { 0 } else { 1 };
                libc::_exit(code)
            },
            pid => {
                assert!(pid > 0);
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
                assert!(is_open(p), "the parent keeps its fd");
            }
        }
    }
}
