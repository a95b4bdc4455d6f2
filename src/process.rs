//! Processes and signals for the pool, so that it needs no Tclx: fork, wait, kill, and signals
//! turned into Tcl events. No Tcl here beyond what `commands` passes in.
//!
//! Signals are process-wide by nature: a trapped signal's handler writes its number to a
//! self-pipe, whose read end one interp watches. A forked child gets a pipe of its own at fork
//! (see [`renew_pipe_in_child`]), under the same fd numbers, so its signals never reach the parent.

use crate::args::{CmdError, CmdResult};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::Once;

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
];

/// Parses `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse_signal(word: &str) -> CmdResult<i32> {
    let upper = word.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, number)) = SIGNALS.iter().find(|(n, _)| *n == name) {
        return Ok(number);
    }
    match word.parse::<i32>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(CmdError::new(format!("unknown signal \"{word}\""), &["TCL", "LOOKUP", "SIGNAL", word])),
    }
}

pub fn signal_name(number: i32) -> String {
    match SIGNALS.iter().find(|(_, n)| *n == number) {
        Some((name, _)) => format!("SIG{name}"),
        None => number.to_string(),
    }
}

fn last_error(prefix: &str) -> CmdError {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    CmdError::Posix { prefix: prefix.into(), errno }
}

/// fork(2): the child's pid in the parent, 0 in the child.
pub fn fork() -> CmdResult<i32> {
    // SAFETY: the child continues in this thread only, running Tcl. It touches none of the
    // dispatcher thread's state (fork_safety closes the parent-only fds and every other copy of
    // dispatcher state is inert in the child), and Tcl's own fork handlers restart its notifier.
    match unsafe { libc::fork() } {
        -1 => Err(last_error("couldn't fork child process")),
        pid => Ok(pid),
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
    let mut status = 0;
    loop {
        let flags = if nohang { libc::WNOHANG } else { 0 };
        // SAFETY: waitpid writes only the status int we pass.
        let got = unsafe { libc::waitpid(pid.unwrap_or(-1), &mut status, flags) };
        match got {
            0 => return Ok(None),
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            -1 => return Err(last_error("couldn't wait for child process")),
            pid => {
                let (how, detail) = if libc::WIFEXITED(status) {
                    ("EXIT", libc::WEXITSTATUS(status).to_string())
                } else if libc::WIFSIGNALED(status) {
                    ("SIG", signal_name(libc::WTERMSIG(status)))
                } else {
                    ("STOP", signal_name(libc::WSTOPSIG(status)))
                };
                return Ok(Some(Ended { pid, how, detail }));
            }
        }
    }
}

pub fn kill(pid: i32, signal: i32) -> CmdResult<()> {
    // SAFETY: kill(2) has no memory effects on us.
    if unsafe { libc::kill(pid, signal) } == -1 {
        return Err(last_error(&format!("couldn't send {} to process {pid}", signal_name(signal))));
    }
    Ok(())
}

/// The self-pipe: [read end, write end], or -1 before the first trap.
static PIPE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

fn new_pipe() -> Option<[RawFd; 2]> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    let ok = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0;
    ok.then_some(fds)
}

/// The read end of the self-pipe, created on first use.
pub fn trap_pipe() -> CmdResult<RawFd> {
    static CREATE: Once = Once::new();
    static ERRNO: AtomicI32 = AtomicI32::new(0);
    CREATE.call_once(|| {
        let Some([read, write]) = new_pipe() else {
            ERRNO.store(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO), SeqCst);
            return;
        };
        PIPE[1].store(write, SeqCst);
        PIPE[0].store(read, SeqCst);
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
extern "C" fn renew_pipe_in_child() {
    let (read, write) = (PIPE[0].load(SeqCst), PIPE[1].load(SeqCst));
    if read == -1 {
        return;
    }
    if let Some([new_read, new_write]) = new_pipe() {
        // SAFETY: async-signal-safe calls on fds this module owns; dup3 keeps O_CLOEXEC.
        unsafe {
            libc::dup3(new_read, read, libc::O_CLOEXEC);
            libc::dup3(new_write, write, libc::O_CLOEXEC);
            libc::close(new_read);
            libc::close(new_write);
        }
    }
}

extern "C" fn on_signal(signal: libc::c_int) {
    // SAFETY: only async-signal-safe calls; errno is saved and restored around write(2).
    unsafe {
        let errno = *libc::__errno_location();
        let byte = signal as u8;
        libc::write(PIPE[1].load(SeqCst), (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// Routes `signal` to the self-pipe (`trap`) or restores its default action.
pub fn set_trap(signal: i32, trap: bool) -> CmdResult<()> {
    if matches!(signal, libc::SIGKILL | libc::SIGSTOP) {
        return Err(CmdError::new(format!("{} cannot be trapped", signal_name(signal)), &["TCL", "VALUE", "SIGNAL"]));
    }
    // SAFETY: a zeroed sigaction is valid; we fill in the handler and flags before installing.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = if trap { on_signal as extern "C" fn(libc::c_int) as usize } else { libc::SIG_DFL };
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) == -1 {
            return Err(last_error("couldn't set signal action"));
        }
    }
    Ok(())
}

/// Reads the signals that have arrived, in order.
pub fn drain_signals(read: RawFd) -> Vec<i32> {
    let mut buf = [0u8; 64];
    let mut signals = Vec::new();
    loop {
        // SAFETY: reading into a local buffer of the length we pass.
        let n = unsafe { libc::read(read, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return signals;
        }
        signals.extend(buf[..n as usize].iter().map(|&b| b as i32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("SIGTERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("term"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("9"), Ok(9));
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
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
        kill(pid, libc::SIGKILL).unwrap();
        let ended = wait(Some(pid), false).unwrap().unwrap();
        assert_eq!((ended.how, ended.detail.as_str()), ("SIG", "SIGKILL"));
        assert!(matches!(wait(Some(pid), true), Err(CmdError::Posix { errno: libc::ECHILD, .. })));
    }

    #[test]
    fn a_trapped_signal_arrives_on_the_pipe() {
        let read = trap_pipe().unwrap();
        set_trap(libc::SIGUSR2, true).unwrap();
        // SAFETY: raise(3) delivers to this thread, whose handler only writes to the pipe.
        unsafe { libc::raise(libc::SIGUSR2) };
        assert_eq!(drain_signals(read), vec![libc::SIGUSR2]);
        set_trap(libc::SIGUSR2, false).unwrap();
        assert!(set_trap(libc::SIGKILL, true).is_err());
    }
}
