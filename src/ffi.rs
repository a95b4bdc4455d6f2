//! The thin unsafe edge to Tcl: reference-counted objects, results and errors, command
//! trampolines that stop panics at the border, file handlers and socket channels.
//!
//! Everything calls the raw C API in `clib` (the bindings the `tcl` crate builds); the `tcl`
//! crate's high-level `Obj` is never used, so nothing here calls `Tcl_FindExecutable` or
//! otherwise touches the host interpreter's setup.

use crate::args::CmdError;
use clib::{ClientData, Tcl_Interp, Tcl_Obj};
use std::ffi::{c_char, c_int, CStr, CString};
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

pub const TCL_OK: c_int = clib::TCL_OK as c_int;
pub const TCL_ERROR: c_int = clib::TCL_ERROR as c_int;

/// Labels refcount calls, as Tcl's macros do with __FILE__.
const SOURCE: &CStr = c"socketserver";

/// An owned reference to a Tcl object.
pub struct Obj(NonNull<Tcl_Obj>);

impl Obj {
    /// Takes a new reference to `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to a live Tcl_Obj of the current thread.
    pub unsafe fn from_ptr(ptr: *mut Tcl_Obj) -> Obj {
        let ptr = NonNull::new(ptr).expect("Tcl returned a null object");
        clib::Tcl_DbIncrRefCount(ptr.as_ptr(), SOURCE.as_ptr(), 0);
        Obj(ptr)
    }

    pub fn string(s: &str) -> Obj {
        let len = c_int::try_from(s.len()).unwrap_or(c_int::MAX);
        // SAFETY: s points to len valid bytes; Tcl copies them.
        unsafe { Obj::from_ptr(clib::Tcl_NewStringObj(s.as_ptr().cast(), len)) }
    }

    pub fn int(n: i64) -> Obj {
        // SAFETY: plain constructor.
        unsafe { Obj::from_ptr(clib::Tcl_NewWideIntObj(n)) }
    }

    pub fn list<I: IntoIterator<Item = Obj>>(items: I) -> Obj {
        // SAFETY: plain constructor of an empty list.
        let list = unsafe { Obj::from_ptr(clib::Tcl_NewListObj(0, std::ptr::null())) };
        for item in items {
            // SAFETY: list is unshared (refcount 1, ours) and a list, so appending cannot fail.
            unsafe { clib::Tcl_ListObjAppendElement(std::ptr::null_mut(), list.as_ptr(), item.as_ptr()) };
        }
        list
    }

    pub fn as_ptr(&self) -> *mut Tcl_Obj {
        self.0.as_ptr()
    }

    pub fn to_string_lossy(&self) -> String {
        let mut len: c_int = 0;
        // SAFETY: self is live; Tcl returns a pointer to len bytes owned by the object, which we
        // copy before anything can change it.
        unsafe {
            let bytes = clib::Tcl_GetStringFromObj(self.as_ptr(), &mut len);
            let slice = std::slice::from_raw_parts(bytes.cast::<u8>(), len.max(0) as usize);
            String::from_utf8_lossy(slice).into_owned()
        }
    }

    /// True if the object is a valid Tcl list (so it can serve as a command prefix).
    pub fn is_list(&self, interp: *mut Tcl_Interp) -> bool {
        let mut len: c_int = 0;
        // SAFETY: self is live; interp is the caller's live interp (receives the parse error).
        unsafe { clib::Tcl_ListObjLength(interp, self.as_ptr(), &mut len) == TCL_OK }
    }
}

impl Clone for Obj {
    fn clone(&self) -> Obj {
        // SAFETY: self is live, so taking another reference is sound.
        unsafe { Obj::from_ptr(self.as_ptr()) }
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        // SAFETY: we hold one reference, released exactly once here.
        unsafe { clib::Tcl_DbDecrRefCount(self.as_ptr(), SOURCE.as_ptr(), 0) };
    }
}

/// The words of a command invocation.
pub fn objects(objc: c_int, objv: *const *mut Tcl_Obj) -> Vec<Obj> {
    // SAFETY: Tcl passes objc live objects in objv to a command procedure.
    let objs = unsafe { std::slice::from_raw_parts(objv, objc.max(0) as usize) };
    objs.iter()
        .map(|&ptr| {
            // SAFETY: each element is a live object for the duration of the command.
            unsafe { Obj::from_ptr(ptr) }
        })
        .collect()
}

/// Runs a command body, turning its result, its error or its panic into the interp's result.
pub fn trampoline<F>(interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj, body: F) -> c_int
where
    F: FnOnce() -> Result<Obj, CmdError>,
{
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(result)) => {
            // SAFETY: interp is live during its command; Tcl takes its own reference.
            unsafe { clib::Tcl_SetObjResult(interp, result.as_ptr()) };
            TCL_OK
        }
        Ok(Err(err)) => set_error(interp, objc, objv, err),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let err = CmdError::new(format!("socketserver internal error: {why}"), &["SOCKETSERVER", "INTERNAL"]);
            set_error(interp, objc, objv, err)
        }
    }
}

fn set_error(interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj, err: CmdError) -> c_int {
    match err {
        CmdError::WrongArgs { words, usage } => {
            let usage = CString::new(usage).unwrap_or_default();
            // An empty usage (a command without arguments) is passed as NULL, or Tcl adds a space.
            let usage = if usage.is_empty() { std::ptr::null() } else { usage.as_ptr() };
            // SAFETY: objv holds objc live objects and words <= objc by construction; usage is
            // NULL or a C string that outlives the call.
            unsafe { clib::Tcl_WrongNumArgs(interp, (words as c_int).min(objc), objv, usage) };
        }
        CmdError::Message { text, code } => {
            // SAFETY: interp is live; Tcl takes references to both objects.
            unsafe {
                clib::Tcl_SetObjResult(interp, Obj::string(&text).as_ptr());
                clib::Tcl_SetObjErrorCode(interp, Obj::list(code.iter().map(|c| Obj::string(c))).as_ptr());
            }
        }
        CmdError::Posix { prefix, errno } => {
            // SAFETY: Tcl_PosixError reads the errno we set, sets errorCode and returns a static
            // message string.
            let message = unsafe {
                clib::Tcl_SetErrno(errno);
                CStr::from_ptr(clib::Tcl_PosixError(interp)).to_string_lossy().into_owned()
            };
            // SAFETY: as above.
            unsafe { clib::Tcl_SetObjResult(interp, Obj::string(&format!("{prefix}: {message}")).as_ptr()) };
        }
    }
    TCL_ERROR
}

/// Registers an object command whose client data is `data`.
///
/// # Safety
/// `interp` must be live; `data` must stay valid for as long as the command exists.
pub unsafe fn create_command(interp: *mut Tcl_Interp, name: &CStr, proc_: clib::Tcl_ObjCmdProc, data: ClientData) {
    clib::Tcl_CreateObjCommand(interp, name.as_ptr(), proc_, data, None);
}

/// Calls `proc_(data, mask)` whenever `fd` becomes readable, until [`delete_file_handler`].
///
/// # Safety
/// `data` must stay valid until the handler is deleted; call from the interp's thread.
pub unsafe fn create_file_handler(fd: RawFd, proc_: unsafe extern "C" fn(ClientData, c_int), data: ClientData) {
    clib::Tcl_CreateFileHandler(fd, clib::TCL_READABLE as c_int, Some(proc_), data);
}

pub fn delete_file_handler(fd: RawFd) {
    // SAFETY: deleting a handler that does not exist is a no-op; it touches only this thread's
    // notifier state.
    unsafe { clib::Tcl_DeleteFileHandler(fd) };
}

/// Wraps a connected TCP socket as a Tcl `sock` channel registered in `interp`; returns its name.
pub fn register_socket_channel(interp: *mut Tcl_Interp, fd: OwnedFd) -> Option<String> {
    let raw = fd.into_raw_fd();
    // SAFETY: raw is a connected TCP socket that we own; Tcl takes ownership (closing it when
    // the channel closes). ClientData carries the fd number, as Tcl's own code does (INT2PTR).
    let chan = unsafe { clib::Tcl_MakeTcpClientChannel(raw as isize as ClientData) };
    if chan.is_null() {
        // SAFETY: Tcl did not take the fd, so it is still ours to close.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        return None;
    }
    // SAFETY: chan is the live channel just created; registering gives interp a reference.
    unsafe {
        clib::Tcl_RegisterChannel(interp, chan);
        Some(CStr::from_ptr(clib::Tcl_GetChannelName(chan) as *const c_char).to_string_lossy().into_owned())
    }
}

/// Evaluates `{*}prefix args...` at global level; a failure goes to the background error handler,
/// as with the callbacks of Tcl's own `socket -server`.
pub fn call_in_background(interp: *mut Tcl_Interp, prefix: &Obj, args: &[Obj]) {
    // SAFETY: interp is live (the caller checked it is not deleted) and is preserved across
    // the evaluation; the command object is a fresh duplicate we own.
    unsafe {
        clib::Tcl_Preserve(interp as ClientData);
        let command = Obj::from_ptr(clib::Tcl_DuplicateObj(prefix.as_ptr()));
        let mut code = TCL_OK;
        for arg in args {
            code = clib::Tcl_ListObjAppendElement(interp, command.as_ptr(), arg.as_ptr());
            if code != TCL_OK {
                break;
            }
        }
        if code == TCL_OK {
            code = clib::Tcl_EvalObjEx(interp, command.as_ptr(), clib::TCL_EVAL_GLOBAL as c_int);
        }
        if code != TCL_OK {
            clib::Tcl_BackgroundException(interp, code);
        }
        drop(command);
        clib::Tcl_Release(interp as ClientData);
    }
}

pub fn interp_deleted(interp: *mut Tcl_Interp) -> bool {
    // SAFETY: asking is allowed until the interp's memory is released, which the state owning
    // this pointer outlives (it is the interp's assoc data).
    unsafe { clib::Tcl_InterpDeleted(interp) != 0 }
}

/// Runs a file-handler body, keeping any panic from unwinding into Tcl.
pub fn guard_callback<F: FnOnce()>(body: F) {
    // There is no caller to report to; a panic here is a bug, and stopping it is all we can do.
    let _ = catch_unwind(AssertUnwindSafe(body));
}

/// What a channel's close handler carries: the script to queue and the interp to run it in.
struct CloseScript {
    interp: *mut Tcl_Interp,
    script: Obj,
}

/// A queued Tcl event; Tcl requires the Tcl_Event header first and frees it with Tcl_Free.
#[repr(C)]
struct ScriptEvent {
    header: clib::Tcl_Event,
    payload: *mut CloseScript,
}

/// Evaluates `script` (errors to the background handler) from the event loop once the channel
/// named `name` has closed. It runs as a queued event, not inside the close itself.
pub fn run_when_closed(interp: *mut Tcl_Interp, name: &str, script: Obj) -> Result<(), CmdError> {
    let cname = CString::new(name).unwrap_or_default();
    // SAFETY: interp is live during its command; a null mode pointer is allowed.
    let chan = unsafe { clib::Tcl_GetChannel(interp, cname.as_ptr(), std::ptr::null_mut()) };
    if chan.is_null() {
        return Err(CmdError::new(format!("can not find channel named \"{name}\""), &["TCL", "LOOKUP", "CHANNEL", name]));
    }
    let payload = Box::into_raw(Box::new(CloseScript { interp, script }));
    // SAFETY: the interp is preserved until the event has run; the payload is freed by the
    // event (or leaked if the channel never closes, which costs one small allocation).
    unsafe {
        clib::Tcl_Preserve(interp as ClientData);
        clib::Tcl_CreateCloseHandler(chan, Some(queue_close_script), payload as ClientData);
    }
    Ok(())
}

unsafe extern "C" fn queue_close_script(data: ClientData) {
    let size = std::mem::size_of::<ScriptEvent>() as u32;
    // SAFETY: Tcl_Alloc returns memory suitably aligned for any type (or panics Tcl on failure);
    // we initialise every field before queueing, and Tcl frees it after the event proc returns 1.
    unsafe {
        let event = clib::Tcl_Alloc(size) as *mut ScriptEvent;
        event.write(ScriptEvent {
            header: clib::Tcl_Event { proc_: Some(run_close_script), nextPtr: std::ptr::null_mut() },
            payload: data as *mut CloseScript,
        });
        clib::Tcl_QueueEvent(event.cast(), clib::Tcl_QueuePosition_TCL_QUEUE_TAIL);
    }
}

unsafe extern "C" fn run_close_script(event: *mut clib::Tcl_Event, flags: c_int) -> c_int {
    if flags & clib::TCL_FILE_EVENTS as c_int == 0 {
        return 0; // not now: a file event, and this round is not servicing those
    }
    // SAFETY: event is our ScriptEvent (queued above); its payload is the Box from
    // run_when_closed, taken back exactly once here.
    let payload = unsafe { Box::from_raw((*(event as *mut ScriptEvent)).payload) };
    guard_callback(|| {
        if !interp_deleted(payload.interp) {
            call_in_background(payload.interp, &payload.script, &[]);
        }
    });
    // SAFETY: balances the Tcl_Preserve in run_when_closed.
    unsafe { clib::Tcl_Release(payload.interp as ClientData) };
    1
}
