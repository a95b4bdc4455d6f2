//! The thin unsafe edge to Tcl: reference-counted objects, results and errors, command
//! trampolines that stop panics at the border, file handlers and socket channels, and the hooks
//! that install [`notifier`] as Tcl's notifier.
//!
//! Everything calls the raw C API through [`crate::tcl_stubs`] (Tcl's stubs table, with the types
//! of `clib`, the bindings the `tcl` crate builds); the `tcl`
//! crate's high-level `Obj` is never used, so nothing here calls `Tcl_FindExecutable` or
//! otherwise touches the host interpreter's setup.

use crate::args::CmdError;
use crate::notifier::{self, Callback};
use crate::tcl_stubs::{ClientData, Tcl_Interp, Tcl_Obj};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

pub const TCL_OK: c_int = crate::tcl_stubs::TCL_OK as c_int;
pub const TCL_ERROR: c_int = crate::tcl_stubs::TCL_ERROR as c_int;

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
        crate::tcl_stubs::Tcl_DbIncrRefCount(ptr.as_ptr(), SOURCE.as_ptr(), 0);
        Obj(ptr)
    }

    pub fn string(s: &str) -> Obj {
        let len = c_int::try_from(s.len()).unwrap_or(c_int::MAX);
        // SAFETY: s points to len valid bytes; Tcl copies them.
        unsafe { Obj::from_ptr(crate::tcl_stubs::Tcl_NewStringObj(s.as_ptr().cast(), len)) }
    }

    pub fn int(n: i64) -> Obj {
        // SAFETY: plain constructor.
        unsafe { Obj::from_ptr(crate::tcl_stubs::Tcl_NewWideIntObj(n)) }
    }

    pub fn list<I: IntoIterator<Item = Obj>>(items: I) -> Obj {
        // SAFETY: plain constructor of an empty list.
        let list = unsafe { Obj::from_ptr(crate::tcl_stubs::Tcl_NewListObj(0, std::ptr::null())) };
        for item in items {
            // SAFETY: list is unshared (refcount 1, ours) and a list, so appending cannot fail.
            unsafe { crate::tcl_stubs::Tcl_ListObjAppendElement(std::ptr::null_mut(), list.as_ptr(), item.as_ptr()) };
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
            let bytes = crate::tcl_stubs::Tcl_GetStringFromObj(self.as_ptr(), &mut len);
            let slice = std::slice::from_raw_parts(bytes.cast::<u8>(), len.max(0) as usize);
            String::from_utf8_lossy(slice).into_owned()
        }
    }

    /// True if the object is a valid Tcl list (so it can serve as a command prefix).
    pub fn is_list(&self, interp: *mut Tcl_Interp) -> bool {
        let mut len: c_int = 0;
        // SAFETY: self is live; interp is the caller's live interp (receives the parse error).
        unsafe { crate::tcl_stubs::Tcl_ListObjLength(interp, self.as_ptr(), &mut len) == TCL_OK }
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
        unsafe { crate::tcl_stubs::Tcl_DbDecrRefCount(self.as_ptr(), SOURCE.as_ptr(), 0) };
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
            unsafe { crate::tcl_stubs::Tcl_SetObjResult(interp, result.as_ptr()) };
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
    if let CmdError::WrongArgs { words, usage } = err {
        let usage = CString::new(usage).unwrap_or_default();
        // An empty usage (a command without arguments) is passed as NULL, or Tcl adds a space.
        let usage = if usage.is_empty() { std::ptr::null() } else { usage.as_ptr() };
        // SAFETY: objv holds objc live objects and words <= objc by construction; usage is NULL
        // or a C string that outlives the call.
        unsafe { crate::tcl_stubs::Tcl_WrongNumArgs(interp, (words as c_int).min(objc), objv, usage) };
        return TCL_ERROR;
    }
    set_error_result(interp, err)
}

/// Reports `err` to the interp's background error handler (`interp bgerror`).
pub fn background_error(interp: *mut Tcl_Interp, err: CmdError) {
    set_error_result(interp, err);
    // SAFETY: interp is live (callers check it is not deleted); Tcl copies the error state.
    unsafe { crate::tcl_stubs::Tcl_BackgroundException(interp, TCL_ERROR) };
}

/// Sets the result and errorCode of a Message or Posix error.
fn set_error_result(interp: *mut Tcl_Interp, err: CmdError) -> c_int {
    match err {
        // Only commands raise usage errors (see set_error); there are no words to quote here.
        CmdError::WrongArgs { usage, .. } => {
            // SAFETY: interp is live; Tcl takes its own reference to the result.
            unsafe { crate::tcl_stubs::Tcl_SetObjResult(interp, Obj::string(&format!("wrong # args: {usage}")).as_ptr()) };
        }
        CmdError::Message { text, code } => {
            // SAFETY: interp is live; Tcl takes references to both objects.
            unsafe {
                crate::tcl_stubs::Tcl_SetObjResult(interp, Obj::string(&text).as_ptr());
                crate::tcl_stubs::Tcl_SetObjErrorCode(interp, Obj::list(code.iter().map(|c| Obj::string(c))).as_ptr());
            }
        }
        CmdError::Posix { prefix, errno } => {
            // SAFETY: Tcl_PosixError reads the errno we set, sets errorCode and returns a static
            // message string.
            let message = unsafe {
                crate::tcl_stubs::Tcl_SetErrno(errno);
                CStr::from_ptr(crate::tcl_stubs::Tcl_PosixError(interp)).to_string_lossy().into_owned()
            };
            // SAFETY: as above.
            unsafe { crate::tcl_stubs::Tcl_SetObjResult(interp, Obj::string(&format!("{prefix}: {message}")).as_ptr()) };
        }
    }
    TCL_ERROR
}

/// Registers an object command whose client data is `data`.
///
/// # Safety
/// `interp` must be live; `data` must stay valid for as long as the command exists.
pub unsafe fn create_command(interp: *mut Tcl_Interp, name: &CStr, proc_: crate::tcl_stubs::Tcl_ObjCmdProc, data: ClientData) {
    crate::tcl_stubs::Tcl_CreateObjCommand(interp, name.as_ptr(), proc_, data, None);
}

thread_local! {
    /// This thread's handlers from [`create_file_handler`], to move them when the notifier changes.
    static OWN_HANDLERS: RefCell<Vec<(RawFd, Callback)>> = const { RefCell::new(Vec::new()) };
}

/// Calls `proc_(data, mask)` whenever `fd` becomes readable, until [`delete_file_handler`].
///
/// # Safety
/// `data` must stay valid until the handler is deleted; call from the interp's thread.
pub unsafe fn create_file_handler(fd: RawFd, proc_: unsafe extern "C" fn(ClientData, c_int), data: ClientData) {
    crate::tcl_stubs::Tcl_CreateFileHandler(fd, crate::tcl_stubs::TCL_READABLE as c_int, Some(proc_), data);
    let _ = OWN_HANDLERS.try_with(|own| {
        let mut own = own.borrow_mut();
        own.retain(|(f, _)| *f != fd);
        own.push((fd, Callback { proc_, data }));
    });
}

pub fn delete_file_handler(fd: RawFd) {
    // SAFETY: deleting a handler that does not exist is a no-op; it touches only this thread's
    // notifier state.
    unsafe { crate::tcl_stubs::Tcl_DeleteFileHandler(fd) };
    let _ = OWN_HANDLERS.try_with(|own| own.borrow_mut().retain(|(f, _)| *f != fd));
}

/// Whether [`install_poll_notifier`] has switched this process (or an ancestor: it is inherited).
static POLL_NOTIFIER: AtomicBool = AtomicBool::new(false);

pub fn poll_notifier_installed() -> bool {
    POLL_NOTIFIER.load(SeqCst)
}

/// Replaces Tcl's notifier with [`notifier`]'s, for the whole process, from now on.
///
/// File handlers live in the notifier, so the ones registered before are moved over where that
/// is possible: this thread's own (from [`create_file_handler`]) and those of the channels of
/// `interp` (each channel registers its interest again when asked). Every handler of this
/// thread is deleted from Tcl's notifier first, so that an event it had already queued finds
/// none and does nothing. Listening sockets and sockets still connecting cannot be moved (their
/// drivers keep their file handlers to themselves): then nothing changes and the error says
/// which channel it is. Other C code's file handlers, and other threads', are not served by the
/// poll notifier.
pub fn install_poll_notifier(interp: *mut Tcl_Interp) -> Result<(), CmdError> {
    if POLL_NOTIFIER.load(SeqCst) {
        return Ok(());
    }
    let channels = interp_channels(interp);
    if let Some(name) = channels.iter().find_map(|(name, chan)| unmovable(*chan).then_some(name)) {
        return Err(CmdError::new(
            format!("cannot switch notifiers: channel \"{name}\" is a listening or connecting socket (switch before making it)"),
            &["SOCKETSERVER", "NOTIFIER", "CHANNEL", name],
        ));
    }
    notifier::install_fork_handler().map_err(|e| CmdError::Posix {
        prefix: "couldn't install fork handlers".into(),
        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
    })?;
    let own = OWN_HANDLERS.try_with(|own| own.borrow().clone()).unwrap_or_default();
    for fd in open_fds() {
        // SAFETY: removes the fd's entry from this thread's list in Tcl's notifier, if any.
        unsafe { crate::tcl_stubs::Tcl_DeleteFileHandler(fd) };
    }
    let mut procs = crate::tcl_stubs::Tcl_NotifierProcs {
        setTimerProc: Some(poll_set_timer),
        waitForEventProc: Some(poll_wait_for_event),
        createFileHandlerProc: Some(poll_create_file_handler),
        deleteFileHandlerProc: Some(poll_delete_file_handler),
        initNotifierProc: Some(poll_init_notifier),
        finalizeNotifierProc: Some(poll_finalize_notifier),
        alertNotifierProc: Some(poll_alert_notifier),
        serviceModeHookProc: Some(poll_service_mode_hook),
    };
    // SAFETY: Tcl copies the table; every hook is an extern "C" function of the right type that
    // lives as long as the library (never unloaded).
    unsafe { crate::tcl_stubs::Tcl_SetNotifier(&mut procs) };
    POLL_NOTIFIER.store(true, SeqCst);
    for (fd, callback) in own {
        notifier::set_handler(fd, crate::tcl_stubs::TCL_READABLE as c_int, callback);
    }
    for (name, _) in &channels {
        // Looked up again: a reflected channel's watch script, run by an earlier one, may have
        // closed it.
        let Ok(cname) = CString::new(name.as_str()) else { continue };
        // SAFETY: interp is live; a null mode pointer is allowed.
        let chan = unsafe { crate::tcl_stubs::Tcl_GetChannel(interp, cname.as_ptr(), std::ptr::null_mut()) };
        if chan.is_null() {
            continue;
        }
        // Adding and removing a channel handler that wants nothing makes Tcl compute the
        // channel's interest again and hand it to the driver, which makes its file handler anew.
        // SAFETY: chan is a live channel of interp; the dummy handler is removed at once.
        unsafe {
            crate::tcl_stubs::Tcl_CreateChannelHandler(chan, 0, Some(want_nothing), std::ptr::null_mut());
            crate::tcl_stubs::Tcl_DeleteChannelHandler(chan, Some(want_nothing), std::ptr::null_mut());
        }
    }
    // SAFETY: interp is live; Tcl_GetChannel may have left an error message in its result.
    unsafe { crate::tcl_stubs::Tcl_ResetResult(interp) };
    Ok(())
}

/// This process's open fds (from /proc/self/fd; else every number below the fd limit).
fn open_fds() -> Vec<RawFd> {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => {
            // SAFETY: sysconf only reads a limit.
            let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(0, 65536) as RawFd;
            (0..max).collect()
        }
    }
}

/// The channels registered in `interp`, by name.
fn interp_channels(interp: *mut Tcl_Interp) -> Vec<(String, crate::tcl_stubs::Tcl_Channel)> {
    let mut channels = Vec::new();
    // SAFETY: interp is live (the caller's command runs in it); we read the names from its
    // result, then reset the result, which our command sets again when it returns.
    unsafe {
        if crate::tcl_stubs::Tcl_GetChannelNamesEx(interp, std::ptr::null()) != TCL_OK {
            return channels;
        }
        let names = Obj::from_ptr(crate::tcl_stubs::Tcl_GetObjResult(interp));
        let mut count: c_int = 0;
        let mut items: *mut *mut Tcl_Obj = std::ptr::null_mut();
        if crate::tcl_stubs::Tcl_ListObjGetElements(std::ptr::null_mut(), names.as_ptr(), &mut count, &mut items) == TCL_OK {
            for i in 0..count.max(0) as usize {
                let name = crate::tcl_stubs::Tcl_GetString(*items.add(i));
                let chan = crate::tcl_stubs::Tcl_GetChannel(interp, name, std::ptr::null_mut());
                if !chan.is_null() {
                    channels.push((CStr::from_ptr(name).to_string_lossy().into_owned(), chan));
                }
            }
        }
        crate::tcl_stubs::Tcl_ResetResult(interp);
    }
    channels
}

/// A TCP socket that listens or is still connecting (`socket -async`).
fn unmovable(chan: crate::tcl_stubs::Tcl_Channel) -> bool {
    // SAFETY: chan is a live channel; its type is static data of its driver.
    let is_tcp = unsafe {
        let kind = crate::tcl_stubs::Tcl_GetChannelType(chan);
        !kind.is_null() && !(*kind).typeName.is_null() && CStr::from_ptr((*kind).typeName) == c"tcp"
    };
    let listening = channel_fds(chan).into_iter().any(|fd| {
        let mut value: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most len bytes into the live c_int.
        let ok = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, (&mut value as *mut c_int).cast(), &mut len)
        } == 0;
        ok && value != 0
    });
    is_tcp && (listening || channel_option(chan, c"-connecting").as_deref() == Some("1"))
}

/// A channel option's value; None if the driver reports an error.
fn channel_option(chan: crate::tcl_stubs::Tcl_Channel, option: &CStr) -> Option<String> {
    let mut value = std::mem::MaybeUninit::<crate::tcl_stubs::Tcl_DString>::uninit();
    // SAFETY: the DString is initialised before use and freed after; a null interp is allowed.
    unsafe {
        crate::tcl_stubs::Tcl_DStringInit(value.as_mut_ptr());
        let ok = crate::tcl_stubs::Tcl_GetChannelOption(std::ptr::null_mut(), chan, option.as_ptr(), value.as_mut_ptr()) == TCL_OK;
        let text = ok.then(|| CStr::from_ptr((*value.as_ptr()).string).to_string_lossy().into_owned());
        crate::tcl_stubs::Tcl_DStringFree(value.as_mut_ptr());
        text
    }
}

/// The fds under a channel (one, or two for a pipe-like channel).
fn channel_fds(chan: crate::tcl_stubs::Tcl_Channel) -> Vec<RawFd> {
    let mut fds = Vec::new();
    for direction in [crate::tcl_stubs::TCL_READABLE, crate::tcl_stubs::TCL_WRITABLE] {
        let mut handle: ClientData = std::ptr::null_mut();
        // SAFETY: chan is live; on Unix a channel's handle is its fd, stored in the pointer.
        if unsafe { crate::tcl_stubs::Tcl_GetChannelHandle(chan, direction as c_int, &mut handle) } == TCL_OK {
            let fd = handle as isize as RawFd;
            if !fds.contains(&fd) {
                fds.push(fd);
            }
        }
    }
    fds
}

unsafe extern "C" fn want_nothing(_data: ClientData, _mask: c_int) {}

unsafe extern "C" fn poll_set_timer(_time: *const crate::tcl_stubs::Tcl_Time) {
    // Nothing to do: Tcl_DoOneEvent passes the time to the next timer to the wait below.
}

unsafe extern "C" fn poll_wait_for_event(time: *const crate::tcl_stubs::Tcl_Time) -> c_int {
    // SAFETY: Tcl passes null (no limit) or a live Tcl_Time.
    let timeout = unsafe { time.as_ref() }.map(|t| {
        Duration::from_secs(t.sec.max(0) as u64) + Duration::from_micros(t.usec.max(0) as u64)
    });
    let mut queue = |fd: RawFd| {
        let size = std::mem::size_of::<FileEvent>() as u32;
        // SAFETY: as in queue_close_script: Tcl_Alloc'd, fully initialised, freed by Tcl after
        // service_file_event returns 1.
        unsafe {
            let event = crate::tcl_stubs::Tcl_Alloc(size) as *mut FileEvent;
            event.write(FileEvent {
                header: crate::tcl_stubs::Tcl_Event { proc_: Some(service_file_event), nextPtr: std::ptr::null_mut() },
                fd,
            });
            crate::tcl_stubs::Tcl_QueueEvent(event.cast(), crate::tcl_stubs::Tcl_QueuePosition_TCL_QUEUE_TAIL);
        }
    };
    match catch_unwind(AssertUnwindSafe(|| notifier::wait(timeout, &mut queue))) {
        Ok(Ok(())) => 0,
        _ => -1, // Tcl_DoOneEvent then returns without an event rather than spin on the error
    }
}

/// A queued "this fd is ready" event: the fd, not the handler, which may be gone by then.
#[repr(C)]
struct FileEvent {
    header: crate::tcl_stubs::Tcl_Event,
    fd: c_int,
}

unsafe extern "C" fn service_file_event(event: *mut crate::tcl_stubs::Tcl_Event, flags: c_int) -> c_int {
    if flags & crate::tcl_stubs::TCL_FILE_EVENTS as c_int == 0 {
        return 0;
    }
    // SAFETY: event is one of our FileEvents (queued by poll_wait_for_event).
    let fd = unsafe { (*(event as *mut FileEvent)).fd };
    if let Some((callback, mask)) = notifier::take_ready(fd) {
        // SAFETY: the callback is what Tcl_CreateFileHandler was given for fd, still registered.
        unsafe { (callback.proc_)(callback.data, mask) };
    }
    1
}

unsafe extern "C" fn poll_create_file_handler(fd: c_int, mask: c_int, proc_: crate::tcl_stubs::Tcl_FileProc, data: ClientData) {
    if let Some(proc_) = proc_ {
        notifier::set_handler(fd, mask, Callback { proc_, data });
    }
}

unsafe extern "C" fn poll_delete_file_handler(fd: c_int) {
    notifier::remove_handler(fd);
}

unsafe extern "C" fn poll_init_notifier() -> ClientData {
    notifier::wake_token() as ClientData
}

unsafe extern "C" fn poll_finalize_notifier(_data: ClientData) {
    // Nothing: a thread's state goes when the thread does.
}

unsafe extern "C" fn poll_alert_notifier(data: ClientData) {
    notifier::alert(data as usize);
}

unsafe extern "C" fn poll_service_mode_hook(_mode: c_int) {}

/// Calls `proc_(data)` once, after `ms` milliseconds, from the event loop.
///
/// # Safety
/// `data` must stay valid until the call, or until [`delete_timer`]; call from the interp's
/// thread.
pub unsafe fn create_timer(ms: u32, proc_: unsafe extern "C" fn(ClientData), data: ClientData) -> crate::tcl_stubs::Tcl_TimerToken {
    crate::tcl_stubs::Tcl_CreateTimerHandler(ms.min(c_int::MAX as u32) as c_int, Some(proc_), data)
}

pub fn delete_timer(token: crate::tcl_stubs::Tcl_TimerToken) {
    // SAFETY: deleting a timer that has fired or been deleted already is a no-op in Tcl.
    unsafe { crate::tcl_stubs::Tcl_DeleteTimerHandler(token) };
}

/// Wraps a connected TCP socket as a Tcl `sock` channel registered in `interp`; returns its name.
pub fn register_socket_channel(interp: *mut Tcl_Interp, fd: OwnedFd) -> Option<String> {
    let raw = fd.into_raw_fd();
    // SAFETY: raw is a connected TCP socket that we own; Tcl takes ownership (closing it when
    // the channel closes). ClientData carries the fd number, as Tcl's own code does (INT2PTR).
    let chan = unsafe { crate::tcl_stubs::Tcl_MakeTcpClientChannel(raw as isize as ClientData) };
    if chan.is_null() {
        // SAFETY: Tcl did not take the fd, so it is still ours to close.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        return None;
    }
    // SAFETY: chan is the live channel just created; registering gives interp a reference.
    unsafe {
        crate::tcl_stubs::Tcl_RegisterChannel(interp, chan);
        Some(CStr::from_ptr(crate::tcl_stubs::Tcl_GetChannelName(chan) as *const c_char).to_string_lossy().into_owned())
    }
}

/// Evaluates `{*}prefix args...` at global level; a failure goes to the background error handler,
/// as with the callbacks of Tcl's own `socket -server`.
pub fn call_in_background(interp: *mut Tcl_Interp, prefix: &Obj, args: &[Obj]) {
    // SAFETY: interp is live (the caller checked it is not deleted) and is preserved across
    // the evaluation; the command object is a fresh duplicate we own.
    unsafe {
        crate::tcl_stubs::Tcl_Preserve(interp as ClientData);
        let command = Obj::from_ptr(crate::tcl_stubs::Tcl_DuplicateObj(prefix.as_ptr()));
        let mut code = TCL_OK;
        for arg in args {
            code = crate::tcl_stubs::Tcl_ListObjAppendElement(interp, command.as_ptr(), arg.as_ptr());
            if code != TCL_OK {
                break;
            }
        }
        if code == TCL_OK {
            code = crate::tcl_stubs::Tcl_EvalObjEx(interp, command.as_ptr(), crate::tcl_stubs::TCL_EVAL_GLOBAL as c_int);
        }
        if code != TCL_OK {
            crate::tcl_stubs::Tcl_BackgroundException(interp, code);
        }
        drop(command);
        crate::tcl_stubs::Tcl_Release(interp as ClientData);
    }
}

pub fn interp_deleted(interp: *mut Tcl_Interp) -> bool {
    // SAFETY: asking is allowed until the interp's memory is released, which the state owning
    // this pointer outlives (it is the interp's assoc data).
    unsafe { crate::tcl_stubs::Tcl_InterpDeleted(interp) != 0 }
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
    header: crate::tcl_stubs::Tcl_Event,
    payload: *mut CloseScript,
}

/// Evaluates `script` (errors to the background handler) from the event loop once the channel
/// named `name` has closed. It runs as a queued event, not inside the close itself.
pub fn run_when_closed(interp: *mut Tcl_Interp, name: &str, script: Obj) -> Result<(), CmdError> {
    let cname = CString::new(name).unwrap_or_default();
    // SAFETY: interp is live during its command; a null mode pointer is allowed.
    let chan = unsafe { crate::tcl_stubs::Tcl_GetChannel(interp, cname.as_ptr(), std::ptr::null_mut()) };
    if chan.is_null() {
        return Err(CmdError::new(format!("can not find channel named \"{name}\""), &["TCL", "LOOKUP", "CHANNEL", name]));
    }
    let payload = Box::into_raw(Box::new(CloseScript { interp, script }));
    // SAFETY: the interp is preserved until the event has run; the payload is freed by the
    // event (or leaked if the channel never closes, which costs one small allocation).
    unsafe {
        crate::tcl_stubs::Tcl_Preserve(interp as ClientData);
        crate::tcl_stubs::Tcl_CreateCloseHandler(chan, Some(queue_close_script), payload as ClientData);
    }
    Ok(())
}

unsafe extern "C" fn queue_close_script(data: ClientData) {
    let size = std::mem::size_of::<ScriptEvent>() as u32;
    // SAFETY: Tcl_Alloc returns memory suitably aligned for any type (or panics Tcl on failure);
    // we initialise every field before queueing, and Tcl frees it after the event proc returns 1.
    unsafe {
        let event = crate::tcl_stubs::Tcl_Alloc(size) as *mut ScriptEvent;
        event.write(ScriptEvent {
            header: crate::tcl_stubs::Tcl_Event { proc_: Some(run_close_script), nextPtr: std::ptr::null_mut() },
            payload: data as *mut CloseScript,
        });
        crate::tcl_stubs::Tcl_QueueEvent(event.cast(), crate::tcl_stubs::Tcl_QueuePosition_TCL_QUEUE_TAIL);
    }
}

unsafe extern "C" fn run_close_script(event: *mut crate::tcl_stubs::Tcl_Event, flags: c_int) -> c_int {
    if flags & crate::tcl_stubs::TCL_FILE_EVENTS as c_int == 0 {
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
    unsafe { crate::tcl_stubs::Tcl_Release(payload.interp as ClientData) };
    1
}
