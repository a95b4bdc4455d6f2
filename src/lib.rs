//! socketserver: share one TCP port among pre-forked Tcl worker processes by passing accepted
//! sockets between them with SCM_RIGHTS.
//!
//! This file is the package's entry point and the only place that knows its Tcl names.
#![warn(clippy::undocumented_unsafe_blocks)]

mod activation;
mod args;
mod commands;
mod dispatcher;
mod fdpass;
mod ffi;
mod fork_safety;
mod named;
mod notifier;
mod process;
mod proxy;
mod spawn;
mod sys;
mod tcl_stubs;
mod wire;
mod worker;

use crate::tcl_stubs::{ClientData, Tcl_Interp, Tcl_Obj};
use commands::{InterpState, StateCell};
use ffi::Obj;
use std::cell::RefCell;
use std::ffi::{c_int, CStr, CString};

const PACKAGE: &CStr = c"socketserver";
const SOCKET_COMMAND: &CStr = c"::socketserver::socket";
const INFO_COMMAND: &CStr = c"::socketserver::info";
const FORK_COMMAND: &CStr = c"::socketserver::fork";
const WAIT_COMMAND: &CStr = c"::socketserver::wait";
const KILL_COMMAND: &CStr = c"::socketserver::kill";
const TRAP_COMMAND: &CStr = c"::socketserver::trap";
const ONCLOSE_COMMAND: &CStr = c"::socketserver::onclose";
const NOTIFIER_COMMAND: &CStr = c"::socketserver::notifier";
const SPAWN_COMMAND: &CStr = c"::socketserver::spawn";
/// The key of the per-interp state in the interp's assoc data.
const STATE_KEY: &CStr = c"socketserver";

/// Called by `load` (and so by `package require socketserver`).
///
/// # Safety
/// Tcl calls it with a live interp, in that interp's thread.
#[no_mangle]
pub unsafe extern "C" fn Socketserver_Init(interp: *mut Tcl_Interp) -> c_int {
    // SAFETY: interp is live (Tcl's contract for init procedures).
    if unsafe { tcl_stubs::init(interp) }.is_err() {
        return ffi::TCL_ERROR;
    }
    if let Err(err) = fork_safety::install() {
        let message = format!("couldn't install fork handlers: {err}");
        // SAFETY: interp is live; Tcl takes its own reference to the result.
        unsafe { crate::tcl_stubs::Tcl_SetObjResult(interp, Obj::string(&message).as_ptr()) };
        return ffi::TCL_ERROR;
    }
    // SAFETY: interp is live; the state is created once per interp and owned by its assoc data,
    // which Tcl deletes after the interp's commands, so the commands never see it freed.
    unsafe {
        let mut state = crate::tcl_stubs::Tcl_GetAssocData(interp, STATE_KEY.as_ptr(), std::ptr::null_mut());
        if state.is_null() {
            state = Box::into_raw(Box::new(RefCell::new(InterpState::new(interp)))) as ClientData;
            crate::tcl_stubs::Tcl_SetAssocData(interp, STATE_KEY.as_ptr(), Some(delete_state), state);
            // `exit` ends the process without deleting interps: the exit handler removes the
            // named sockets (`-path`) that the state's Drop would have. A thread exit handler,
            // so that it runs in the thread that owns the state, never beside it: Tcl_Exit runs
            // those of the thread that calls it (a process-wide one would run there too, and
            // touch another thread's interp state while that thread runs).
            crate::tcl_stubs::Tcl_CreateThreadExitHandler(Some(on_exit), state);
        }
        ffi::create_command(interp, SOCKET_COMMAND, Some(socket_proc), state);
        ffi::create_command(interp, INFO_COMMAND, Some(info_proc), state);
        ffi::create_command(interp, FORK_COMMAND, Some(fork_proc), state);
        ffi::create_command(interp, WAIT_COMMAND, Some(wait_proc), state);
        ffi::create_command(interp, KILL_COMMAND, Some(kill_proc), state);
        ffi::create_command(interp, TRAP_COMMAND, Some(trap_proc), state);
        ffi::create_command(interp, ONCLOSE_COMMAND, Some(onclose_proc), state);
        ffi::create_command(interp, NOTIFIER_COMMAND, Some(notifier_proc), state);
        ffi::create_command(interp, SPAWN_COMMAND, Some(spawn_proc), state);
        let version = CString::new(env!("CARGO_PKG_VERSION")).expect("no NUL in a version");
        crate::tcl_stubs::Tcl_PkgProvideEx(interp, PACKAGE.as_ptr(), version.as_ptr(), std::ptr::null_mut())
    }
}

unsafe extern "C" fn delete_state(state: ClientData, interp: *mut Tcl_Interp) {
    // SAFETY: the handler was created with this very state; Tcl may run no exit handler for a
    // freed state.
    unsafe { crate::tcl_stubs::Tcl_DeleteThreadExitHandler(Some(on_exit), state) };
    // SAFETY: state came from Box::into_raw in Socketserver_Init and Tcl calls this once.
    let state = unsafe { Box::from_raw(state as *mut StateCell) };
    ffi::guard_callback(interp, move || drop(state));
}

/// The process is exiting (`exit` in this interp's thread, or the end of tclsh's script), or the
/// thread is ending: removes the named sockets of the servers this interp serves. Nothing else:
/// the threads end with the process.
unsafe extern "C" fn on_exit(state: ClientData) {
    // SAFETY: the state is live: delete_state deletes this handler before freeing it.
    let cell = unsafe { &*(state as *const StateCell) };
    // No interp to report to, and a panic must not unwind into Tcl; a borrow held means a
    // command of ours called `exit` in the middle of its work: leave it.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Ok(mut state) = cell.try_borrow_mut() {
            state.remove_named_paths();
        }
    }));
}

/// The signature of every command body: the interp's state, the words as objects and strings.
type Body = fn(&StateCell, &[Obj], &[String]) -> Result<Obj, args::CmdError>;

/// Runs `body` for a command called by Tcl with the state pointer registered above.
///
/// # Safety
/// `state` must be the interp's live StateCell and objv must hold objc live objects.
unsafe fn run(body: Body, state: ClientData, interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj) -> c_int {
    // SAFETY: state is the interp's live StateCell (see Socketserver_Init).
    let cell = unsafe { &*(state as *const StateCell) };
    ffi::trampoline(interp, objc, objv, || {
        let objs = ffi::objects(objc, objv);
        let words: Vec<String> = objs.iter().map(Obj::to_string_lossy).collect();
        body(cell, &objs, &words)
    })
}

/// Declares the `extern "C"` command procedure that Tcl calls for one command body.
macro_rules! command_proc {
    ($name:ident, $body:expr) => {
        unsafe extern "C" fn $name(state: ClientData, interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj) -> c_int {
            // SAFETY: Tcl calls us with the state registered for this command and live objv.
            unsafe { run($body, state, interp, objc, objv) }
        }
    };
}

command_proc!(socket_proc, commands::socket_command);
command_proc!(info_proc, |cell, _, words| commands::info_command(cell, words));
command_proc!(fork_proc, |cell, _, words| commands::fork_command(cell, words));
command_proc!(wait_proc, |_, _, words| commands::wait_command(words));
command_proc!(kill_proc, |_, _, words| commands::kill_command(words));
command_proc!(trap_proc, commands::trap_command);
command_proc!(onclose_proc, commands::onclose_command);
command_proc!(notifier_proc, |cell, _, words| commands::notifier_command(cell, words));

/// `spawn` needs no state, but the interp (to read its `-env` dict as Tcl does).
unsafe extern "C" fn spawn_proc(_state: ClientData, interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj) -> c_int {
    ffi::trampoline(interp, objc, objv, || spawn::spawn_command(interp, &ffi::objects(objc, objv)))
}
