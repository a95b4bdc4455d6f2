//! `::socketserver::spawn`: start a program, as `exec ... &` would, but leave the child for the
//! caller to reap with `::socketserver::wait` (a pool supervises exec'd workers as it does forked
//! ones). Tcl's `exec` would reap it in the background and take its exit status with it.
//!
//! The child is started with `std::process::Command`, which prepares everything (arguments,
//! environment, the PATH lookup's candidates) before it forks, so the child of a process that runs
//! a dispatcher thread only resets signals and execs. Every fd this package and Tcl open is
//! close-on-exec, so the child gets stdin, stdout and stderr and nothing else.

use crate::args::{lookup, CmdError, CmdResult};
use crate::ffi::{self, Obj};
use crate::tcl_stubs::Tcl_Interp;
use nix::sys::signal::{self, SigHandler, Signal};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

pub const SPAWN_USAGE: &str = "?-env dict? ?--? command ?arg ...?";

/// What `spawn` was asked to run.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    /// The `-env` value, a dict still to be read (its words are Tcl's to parse).
    env: Option<usize>,
    /// The index of the program's word; the arguments follow it.
    program: usize,
    words: &'a [String],
}

/// Options up to `--` or the first word that does not start with `-`, as `exec` reads them.
fn parse(words: &[String]) -> CmdResult<Request<'_>> {
    const OPTIONS: [&str; 2] = ["--", "-env"];
    let wrong = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
    let mut env = None;
    let mut at = 1;
    while let Some(word) = words.get(at).filter(|word| word.starts_with('-')) {
        if OPTIONS[lookup(word, &OPTIONS, "option")?] == "--" {
            at += 1;
            break;
        }
        if at + 1 >= words.len() {
            return Err(CmdError::new(format!("value for \"{word}\" missing"), &["TCL", "ARGUMENT", "MISSING"]));
        }
        env = Some(at + 1);
        at += 2;
    }
    if at >= words.len() {
        return Err(wrong);
    }
    Ok(Request { env, program: at, words })
}

/// `::socketserver::spawn ?-env dict? ?--? command ?arg ...?` → the child's pid.
pub fn spawn_command(interp: *mut Tcl_Interp, objv: &[Obj]) -> CmdResult<Obj> {
    let words: Vec<String> = objv.iter().map(Obj::to_string_lossy).collect();
    let request = parse(&words)?;
    let program = &request.words[request.program];
    let mut command = Command::new(program);
    command.args(&request.words[request.program + 1..]);
    if let Some(env) = request.env {
        for (name, value) in ffi::dict_pairs(interp, &objv[env])? {
            let (name, value) = (name.to_string_lossy(), value.to_string_lossy());
            if name.is_empty() || name.contains('=') {
                return Err(CmdError::new(format!("bad environment variable name \"{name}\""), &["TCL", "VALUE", "ENV"]));
            }
            command.env(name, value);
        }
    }
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: sigaction(2) is one, and reset_signals allocates nothing and takes no lock.
    unsafe { command.pre_exec(reset_signals) };
    match command.spawn() {
        // Dropping the Child neither waits for it nor kills it: the caller reaps it.
        Ok(child) => Ok(Obj::int(child.id().into())),
        Err(err) => Err(exec_error(program, &err)),
    }
}

/// Gives every standard signal its default action in the child, as Tcl's `exec` does (its RestoreSignals):
/// a signal the serving process ignores (SIGPIPE, which Tcl ignores; SIGHUP under `nohup`; SIGINT
/// in a background job) must not be ignored by a worker that the pool retires with SIGTERM or that
/// expects a broken pipe to end it. Handlers are reset by exec anyway; the mask std empties.
fn reset_signals() -> io::Result<()> {
    for signal in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: SIG_DFL is always a valid action; sigaction is async-signal-safe.
        unsafe { signal::signal(signal, SigHandler::SigDfl) }.map_err(io::Error::from)?;
    }
    Ok(())
}

/// `couldn't execute "prog": no such file or directory`, with POSIX errorCode, as `exec` says it.
fn exec_error(program: &str, err: &io::Error) -> CmdError {
    let prefix = format!("couldn't execute \"{program}\"");
    match err.raw_os_error() {
        Some(errno) => CmdError::Posix { prefix, errno },
        None => CmdError::new(format!("{prefix}: {err}"), &["SOCKETSERVER", "SPAWN"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<String> {
        std::iter::once("spawn").chain(list.iter().copied()).map(String::from).collect()
    }

    fn text(err: CmdError) -> String {
        match err {
            CmdError::Message { text, .. } => text,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn the_program_is_the_first_word_after_the_options() {
        let w = words(&["-env", "A 1", "--", "-x", "y"]);
        assert_eq!(parse(&w), Ok(Request { env: Some(2), program: 4, words: &w }));
        let w = words(&["-e", "A 1", "sh", "-c", "x"]);
        assert_eq!(parse(&w), Ok(Request { env: Some(2), program: 3, words: &w }));
        let w = words(&["sh", "-env"]);
        assert_eq!(parse(&w), Ok(Request { env: None, program: 1, words: &w }));
    }

    #[test]
    fn bad_usage_is_reported_as_tcl_would() {
        let usage = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
        assert_eq!(parse(&words(&[])), Err(usage));
        let usage = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
        assert_eq!(parse(&words(&["-env", "A 1", "--"])), Err(usage));
        assert_eq!(text(parse(&words(&["-env"])).unwrap_err()), "value for \"-env\" missing");
        assert_eq!(text(parse(&words(&["-x", "sh"])).unwrap_err()), "bad option \"-x\": must be -- or -env");
    }

    #[test]
    fn a_failed_exec_reads_as_tcl_exec_says_it() {
        let err = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            exec_error("nowhere", &err),
            CmdError::Posix { prefix: "couldn't execute \"nowhere\"".into(), errno: libc::ENOENT }
        );
    }
}
