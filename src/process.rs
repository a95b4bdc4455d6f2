//! Processes and signals for the pool, so that it needs no Tclx: fork, wait, kill, and signals
//! turned into Tcl events. No Tcl here beyond what `commands` passes in.
//!
//! Signals are process-wide by nature: a trapped signal's handler writes its number to a
//! self-pipe, which the interps that trap it watch. A forked child gets a pipe of its own at fork
//! (see [`renew_pipe_in_child`]), under the same fd numbers, so its signals never reach the parent.
//! The action a signal had before its first trap (Tcl's SIG_IGN for SIGPIPE, `nohup`'s for
//! SIGHUP, ...) is kept and put back exactly when the last trap of it goes.

use crate::args::{CmdError, CmdResult};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{self, WaitPidFlag, WaitStatus};
use nix::unistd::{self, ForkResult, Pid};
use std::collections::HashMap;
use std::os::fd::{IntoRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::{Mutex, Once};

/// Parses `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse_signal(word: &str) -> CmdResult<Signal> {
    let upper = word.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    let by_number = || word.parse::<i32>().ok().and_then(|n| Signal::try_from(n).ok());
    Signal::from_str(&name)
        .ok()
        .or_else(by_number)
        .ok_or_else(|| CmdError::new(format!("unknown signal \"{word}\""), &["TCL", "LOOKUP", "SIGNAL", word]))
}

fn posix(prefix: impl Into<String>, errno: Errno) -> CmdError {
    CmdError::Posix { prefix: prefix.into(), errno: errno as i32 }
}

/// fork(2): the child's pid in the parent, 0 in the child.
pub fn fork() -> CmdResult<i32> {
    // SAFETY: the child continues in this thread only, running Tcl. It touches none of the
    // dispatcher thread's state (fork_safety closes the parent-only fds and every other copy of
    // dispatcher state is inert in the child), and Tcl's own fork handlers restart its notifier.
    match unsafe { unistd::fork() } {
        Ok(ForkResult::Parent { child }) => Ok(child.as_raw()),
        Ok(ForkResult::Child) => Ok(0),
        Err(errno) => Err(posix("couldn't fork child process", errno)),
    }
}

/// How a child ended, as Tclx's `wait` reports it: `pid EXIT code` or `pid SIG name`.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    pub pid: i32,
    pub how: &'static str,
    pub detail: String,
}

/// waitpid(2) for `pid` (or any child); with `nohang`, `None` if none has ended.
pub fn wait(pid: Option<i32>, nohang: bool) -> CmdResult<Option<Ended>> {
    let flags = nohang.then_some(WaitPidFlag::WNOHANG);
    loop {
        let ended = match wait::waitpid(pid.map(Pid::from_raw), flags) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(posix("couldn't wait for child process", errno)),
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(WaitStatus::Exited(pid, code)) => (pid, "EXIT", code.to_string()),
            Ok(WaitStatus::Signaled(pid, signal, _core)) => (pid, "SIG", signal.as_str().to_string()),
            Ok(WaitStatus::Stopped(pid, signal)) => (pid, "STOP", signal.as_str().to_string()),
            // Without WUNTRACED/WCONTINUED/ptrace, waitpid reports nothing else; wait again.
            Ok(_) => continue,
        };
        let (pid, how, detail) = ended;
        return Ok(Some(Ended { pid: pid.as_raw(), how, detail }));
    }
}

pub fn kill(pid: i32, signal: Signal) -> CmdResult<()> {
    signal::kill(Pid::from_raw(pid), signal)
        .map_err(|errno| posix(format!("couldn't send {} to process {pid}", signal.as_str()), errno))
}

/// The self-pipe: [read end, write end], or -1 before the first trap.
static PIPE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

const PIPE_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK;

/// The read end of the self-pipe, created on first use.
pub fn trap_pipe() -> CmdResult<RawFd> {
    static CREATE: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    CREATE.call_once(|| {
        let (read, write) = match unistd::pipe2(OFlag::from_bits_truncate(PIPE_FLAGS)) {
            Ok(ends) => ends,
            Err(errno) => return ERRNO.store(errno as i32, SeqCst),
        };
        PIPE[1].store(write.into_raw_fd(), SeqCst);
        PIPE[0].store(read.into_raw_fd(), SeqCst);
        // SAFETY: our handler is a plain extern "C" fn valid for the life of the library.
        ERRNO.store(unsafe { libc::pthread_atfork(None, None, Some(renew_pipe_in_child)) }, SeqCst);
    });
    match ERRNO.load(SeqCst) {
        0 => Ok(PIPE[0].load(SeqCst)),
        errno => Err(CmdError::Posix { prefix: "couldn't create signal pipe".into(), errno }),
    }
}

/// Gives a forked child its own pipe under the old numbers (so the Tcl file handler watching it
/// stays valid): otherwise a signal to the child could wake the parent's trap, and vice versa.
/// Raw libc calls: an atfork child handler may make async-signal-safe calls only, and owns
/// nothing (no OwnedFd, no allocation).
extern "C" fn renew_pipe_in_child() {
    let (read, write) = (PIPE[0].load(SeqCst), PIPE[1].load(SeqCst));
    if read == -1 {
        return;
    }
    let mut new = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; async-signal-safe.
    if unsafe { libc::pipe2(new.as_mut_ptr(), PIPE_FLAGS) } == 0 {
        // SAFETY: async-signal-safe calls on fds this module owns; dup3 keeps O_CLOEXEC.
        unsafe {
            libc::dup3(new[0], read, libc::O_CLOEXEC);
            libc::dup3(new[1], write, libc::O_CLOEXEC);
            libc::close(new[0]);
            libc::close(new[1]);
        }
    }
}

/// The signal handler: raw write(2), the only thing a handler may do here (async-signal-safe).
extern "C" fn on_signal(signal: libc::c_int) {
    // SAFETY: only async-signal-safe calls; errno is saved and restored around write(2).
    unsafe {
        let errno = *libc::__errno_location();
        let byte = signal as u8;
        libc::write(PIPE[1].load(SeqCst), (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// A trapped signal: what it did before its first trap, and how many interps trap it now.
struct Trapped {
    previous: SigAction,
    holders: usize,
}

/// The traps of the whole process (signal actions are process-wide), by signal.
static TRAPPED: Mutex<Option<HashMap<Signal, Trapped>>> = Mutex::new(None);

fn with_trapped<T>(body: impl FnOnce(&mut HashMap<Signal, Trapped>) -> T) -> T {
    // Inside a fork_safety section: a fork waits until no thread holds the lock, so a child never
    // inherits it locked by a thread it does not have (its own first `trap` would hang forever).
    // What the lock guards is brief and never blocks (a sigaction).
    let _section = crate::fork_safety::CreateSection::enter();
    // A panic while holding the lock left the map consistent (every change is one insert or
    // remove), so a poisoned lock is still usable.
    let mut guard = TRAPPED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    body(guard.get_or_insert_with(HashMap::new))
}

/// Routes `signal` to the self-pipe for one more holder (an interp that traps it). The first
/// holder saves the action it replaces.
pub fn trap(signal: Signal) -> CmdResult<()> {
    if matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
        return Err(CmdError::new(format!("{} cannot be trapped", signal.as_str()), &["TCL", "VALUE", "SIGNAL"]));
    }
    with_trapped(|trapped| {
        if let Some(entry) = trapped.get_mut(&signal) {
            entry.holders += 1;
            return Ok(());
        }
        let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
        // SAFETY: on_signal is async-signal-safe (it only writes one byte to the pipe).
        let previous = unsafe { signal::sigaction(signal, &action) }
            .map_err(|errno| posix("couldn't set signal action", errno))?;
        trapped.insert(signal, Trapped { previous, holders: 1 });
        Ok(())
    })
}

/// One holder of `signal` lets go; the last one puts back the action from before the first trap.
pub fn untrap(signal: Signal) -> CmdResult<()> {
    with_trapped(|trapped| {
        let Some(entry) = trapped.get_mut(&signal) else { return Ok(()) };
        entry.holders -= 1;
        if entry.holders > 0 {
            return Ok(());
        }
        let previous = entry.previous;
        // SAFETY: reinstalls the action that was in place before; it was valid then.
        unsafe { signal::sigaction(signal, &previous) }.map_err(|errno| posix("couldn't set signal action", errno))?;
        trapped.remove(&signal);
        Ok(())
    })
}

/// Reads the next signal that has arrived, if any (bytes that name no signal are skipped). One
/// at a time: a trap script that runs the event loop (a pool's stop waits for its workers) then
/// finds the pipe still readable and the signals after its own served, not held back until it
/// returns.
pub fn next_signal(read: RawFd) -> Option<Signal> {
    let mut byte = [0u8; 1];
    loop {
        match unistd::read(read, &mut byte) {
            Ok(1) => {
                if let Ok(signal) = Signal::try_from(i32::from(byte[0])) {
                    return Some(signal);
                }
            }
            Err(Errno::EINTR) => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("term"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("9"), Ok(Signal::SIGKILL));
        assert_eq!(parse_signal("Usr1"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("").is_err());
    }

    #[test]
    fn a_forked_child_is_reaped_with_its_exit_code() {
        let pid = fork().unwrap();
        if pid == 0 {
            // SAFETY: leave the child at once, without running the test harness's cleanup.
            unsafe { libc::_exit(7) };
        }
        let ended = wait(Some(pid), false).unwrap().unwrap();
        assert_eq!(ended, Ended { pid, how: "EXIT", detail: "7".into() });
    }

    #[test]
    fn a_killed_child_reports_its_signal() {
        let pid = fork().unwrap();
        if pid == 0 {
            // SAFETY: the child only waits to be killed.
            unsafe {
                libc::pause();
                libc::_exit(0)
            };
        }
        kill(pid, Signal::SIGKILL).unwrap();
        let ended = wait(Some(pid), false).unwrap().unwrap();
        assert_eq!((ended.how, ended.detail.as_str()), ("SIG", "SIGKILL"));
        assert!(matches!(wait(Some(pid), true), Err(CmdError::Posix { errno: libc::ECHILD, .. })));
    }

    fn current_handler(signal: Signal) -> SigHandler {
        let probe = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        // SAFETY: installs SIG_DFL for an instant and puts the action read back at once.
        unsafe {
            let current = signal::sigaction(signal, &probe).unwrap();
            signal::sigaction(signal, &current).unwrap();
            current.handler()
        }
    }

    #[test]
    fn a_trapped_signal_arrives_on_the_pipe() {
        let read = trap_pipe().unwrap();
        trap(Signal::SIGUSR2).unwrap();
        // SAFETY: raise(3) delivers to this thread, whose handler only writes to the pipe.
        unsafe { libc::raise(libc::SIGUSR2) };
        assert_eq!(next_signal(read), Some(Signal::SIGUSR2));
        assert_eq!(next_signal(read), None);
        untrap(Signal::SIGUSR2).unwrap();
        assert!(trap(Signal::SIGKILL).is_err());
    }

    #[test]
    fn a_child_forked_while_another_thread_is_inside_trap_can_trap() {
        crate::fork_safety::install().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    trap(Signal::SIGURG).unwrap();
                    untrap(Signal::SIGURG).unwrap();
                }
            })
        };
        let mut hung = 0;
        for _ in 0..500 {
            if hung > 0 {
                break; // one is proof enough
            }
            // SAFETY: the child only calls trap (which takes the table's lock, the point of
            // the test) and leaves with _exit; it has one thread, so a lock it finds held stays
            // held forever.
            match unsafe { libc::fork() } {
                0 => {
                    let _ = trap(Signal::SIGURG);
                    // SAFETY: ends the child without running the parent's destructors.
                    unsafe { libc::_exit(0) }
                }
                pid => {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                    while nix::sys::wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive) {
                        if std::time::Instant::now() > deadline {
                            hung += 1;
                            let _ = signal::kill(pid, Signal::SIGKILL);
                            let _ = nix::sys::wait::waitpid(pid, None);
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        looping.join().unwrap();
        assert_eq!(hung, 0, "children that found the trap table locked forever");
    }

    #[test]
    fn the_last_untrap_restores_the_action_from_before_the_first_trap() {
        let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        // SAFETY: SIGWINCH is ignored by default anyway; nothing else in the tests uses it.
        unsafe { signal::sigaction(Signal::SIGWINCH, &ignore) }.unwrap();
        trap(Signal::SIGWINCH).unwrap();
        trap(Signal::SIGWINCH).unwrap();
        untrap(Signal::SIGWINCH).unwrap();
        assert!(matches!(current_handler(Signal::SIGWINCH), SigHandler::Handler(_)), "one holder left");
        untrap(Signal::SIGWINCH).unwrap();
        assert_eq!(current_handler(Signal::SIGWINCH), SigHandler::SigIgn);
    }
}
