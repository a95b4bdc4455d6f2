//! `::socketserver::spawn`: start a program, as `exec ... &` would, but leave the child for the
//! caller to reap with `::socketserver::wait` (a pool supervises exec'd workers as it does forked
//! ones). Tcl's `exec` would reap it in the background and take its exit status with it.
//!
//! The child is started with `std::process::Command`, which prepares everything (arguments,
//! environment, the PATH lookup's candidates) before it forks, so the child of a process that runs
//! a dispatcher thread only resets signals and execs. Every fd this package and Tcl open is
//! close-on-exec, so the child gets stdin, stdout and stderr and nothing else.

use crate::args::{lookup, parse_bool, CmdError, CmdResult};
use crate::ffi::{self, Obj};
use crate::tcl_stubs::Tcl_Interp;
use nix::sys::signal::{self, SigHandler, Signal};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

pub const SPAWN_USAGE: &str = "?-env dict? ?-newgroup bool? ?--? command ?arg ...?";

/// What `spawn` was asked to run.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    /// The `-env` value, a dict still to be read (its words are Tcl's to parse).
    env: Option<usize>,
    /// `-newgroup`: the child leads a process group of its own.
    new_group: bool,
    /// The index of the program's word; the arguments follow it.
    program: usize,
    words: &'a [String],
}

/// Options up to `--` or the first word that does not start with `-`, as `exec` reads them.
fn parse(words: &[String]) -> CmdResult<Request<'_>> {
    const OPTIONS: [&str; 3] = ["--", "-env", "-newgroup"];
    let wrong = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
    let (mut env, mut new_group) = (None, false);
    let mut at = 1;
    while let Some(word) = words.get(at).filter(|word| word.starts_with('-')) {
        let option = OPTIONS[lookup(word, &OPTIONS, "option")?];
        if option == "--" {
            at += 1;
            break;
        }
        let Some(value) = words.get(at + 1) else {
            return Err(CmdError::new(format!("value for \"{word}\" missing"), &["TCL", "ARGUMENT", "MISSING"]));
        };
        match option {
            "-env" => env = Some(at + 1),
            _ => new_group = parse_bool(value)?,
        }
        at += 2;
    }
    if at >= words.len() {
        return Err(wrong);
    }
    Ok(Request { env, new_group, program: at, words })
}

/// `::socketserver::spawn ?-env dict? ?--? command ?arg ...?` → the child's pid.
pub fn spawn_command(interp: *mut Tcl_Interp, objv: &[Obj]) -> CmdResult<Obj> {
    let words: Vec<String> = objv.iter().map(Obj::to_string_lossy).collect();
    let request = parse(&words)?;
    let program = &request.words[request.program];
    let mut command = Command::new(find_program(program).map_err(|err| exec_error(program, &err))?);
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
    if request.new_group {
        command.process_group(0);
    }
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: sigaction(2) and close_range(2) are, and prepare_child allocates nothing and
    // takes no lock.
    unsafe { command.pre_exec(prepare_child) };
    match command.spawn() {
        // Dropping the Child neither waits for it nor kills it: the caller reaps it.
        Ok(child) => Ok(Obj::int(child.id().into())),
        Err(err) => Err(exec_error(program, &err)),
    }
}

/// In the child before exec: only stdin, stdout and stderr go on (fds this process inherited
/// without close-on-exec too; ours and Tcl's have it already), and the signals as below.
fn prepare_child() -> io::Result<()> {
    // Marked close-on-exec rather than closed: std reports a failed exec through a pipe of its
    // own. Before Linux 5.11 (EINVAL, ENOSYS) they stay as exec would leave them.
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on fds; it touches no memory.
    let _ = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    reset_signals()
}

/// The program execvp(3) would run: a name with a slash as it is, else the first executable file
/// of that name on PATH. Looked up here, so that a missing program is an error before anything
/// is forked (std's Command, failing to exec, waits for its child, and cannot when this process
/// ignores SIGCHLD).
fn find_program(program: &str) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return Ok(program.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
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
    use crate::args::tests::text;

    fn words(list: &[&str]) -> Vec<String> {
        std::iter::once("spawn").chain(list.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn the_program_is_the_first_word_after_the_options() {
        let w = words(&["-env", "A 1", "--", "-x", "y"]);
        assert_eq!(parse(&w), Ok(Request { env: Some(2), new_group: false, program: 4, words: &w }));
        let w = words(&["-e", "A 1", "-n", "yes", "sh", "-c", "x"]);
        assert_eq!(parse(&w), Ok(Request { env: Some(2), new_group: true, program: 5, words: &w }));
        let w = words(&["sh", "-env"]);
        assert_eq!(parse(&w), Ok(Request { env: None, new_group: false, program: 1, words: &w }));
    }

    #[test]
    fn bad_usage_is_reported_as_tcl_would() {
        let usage = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
        assert_eq!(parse(&words(&[])), Err(usage));
        let usage = CmdError::WrongArgs { words: 1, usage: SPAWN_USAGE };
        assert_eq!(parse(&words(&["-env", "A 1", "--"])), Err(usage));
        assert_eq!(text(parse(&words(&["-env"])).unwrap_err()), "value for \"-env\" missing");
        assert_eq!(text(parse(&words(&["-x", "sh"])).unwrap_err()), "bad option \"-x\": must be --, -env, or -newgroup");
        assert_eq!(text(parse(&words(&["-newgroup", "maybe", "sh"])).unwrap_err()), "expected boolean value but got \"maybe\"");
        assert_eq!(find_program("no-such-program-here").unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(find_program("sh").is_ok_and(|path| path.is_absolute()));
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
