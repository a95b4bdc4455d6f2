//! The thin unsafe edge to Tcl: reference-counted objects, results and errors, command
//! trampolines that stop panics at the border, file handlers and socket channels, and the hooks
//! that install [`notifier`] as Tcl's notifier.
//!
//! Everything calls the raw C API in `clib` (the bindings the `tcl` crate builds); the `tcl`
//! crate's high-level `Obj` is never used, so nothing here calls `Tcl_FindExecutable` or
//! otherwise touches the host interpreter's setup.

use crate::args::CmdError;
use crate::notifier::{self, Callback};
use crate::tcl_stubs::{ClientData, Tcl_Interp, Tcl_Obj};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use nix::sys::socket::{getsockopt, sockopt};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd, RawFd};
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

    /// Gives up this reference without releasing it, for a C structure to hold.
    fn into_raw(self) -> *mut Tcl_Obj {
        std::mem::ManuallyDrop::new(self).as_ptr()
    }

    /// Takes back a reference given up by [`Obj::into_raw`].
    ///
    /// # Safety
    /// `ptr` must come from `into_raw` and be taken back once.
    unsafe fn from_raw(ptr: *mut Tcl_Obj) -> Obj {
        Obj(NonNull::new(ptr).expect("a reference from into_raw"))
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
    match catch_panic(body).and_then(|result| result) {
        Ok(result) => {
            // SAFETY: interp is live during its command; Tcl takes its own reference.
            unsafe { crate::tcl_stubs::Tcl_SetObjResult(interp, result.as_ptr()) };
            TCL_OK
        }
        Err(err) => set_error(interp, objc, objv, err),
    }
}

/// Runs `body`, turning a panic (a bug in this package) into the error that reports it, so that
/// it never unwinds into Tcl and is never lost.
fn catch_panic<T>(body: impl FnOnce() -> T) -> Result<T, CmdError> {
    catch_unwind(AssertUnwindSafe(body)).map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        CmdError::new(format!("socketserver internal error: {why}"), &["SOCKETSERVER", "INTERNAL"])
    })
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
/// every interp in `interp`'s tree, its root and all the root's children and their children
/// (each channel registers its interest again when asked). Every handler of this thread is
/// deleted from Tcl's notifier first, so that an event it had already queued finds none and does
/// nothing. Listening sockets and sockets still connecting cannot be moved (their drivers keep
/// their file handlers to themselves): then nothing changes and the error says which channel it
/// is. Other C code's file handlers, other root interps', and other threads' are not served by
/// the poll notifier.
pub fn install_poll_notifier(interp: *mut Tcl_Interp) -> Result<(), CmdError> {
    if POLL_NOTIFIER.load(SeqCst) {
        return Ok(());
    }
    let tree = interp_tree(interp);
    let mut channels: Vec<(*mut Tcl_Interp, String, crate::tcl_stubs::Tcl_Channel)> = Vec::new();
    for &member in &tree {
        for (name, chan) in interp_channels(member) {
            // A channel shared by several interps is moved once.
            if !channels.iter().any(|(_, _, c)| *c == chan) {
                channels.push((member, name, chan));
            }
        }
    }
    if let Some(name) = channels.iter().find_map(|(_, name, chan)| unmovable(*chan).then_some(name)) {
        return Err(CmdError::new(
            format!("cannot switch notifiers: channel \"{name}\" is a listening or connecting socket (switch before making it)"),
            &["SOCKETSERVER", "NOTIFIER", "CHANNEL", name],
        ));
    }
    notifier::install_fork_handler().map_err(|e| CmdError::Posix {
        prefix: "couldn't install fork handlers".into(),
        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
    })?;
    for &member in &tree {
        // SAFETY: member is live (listed just now); preserved so that a watch script deleting
        // it below cannot free it while it is still in the list.
        unsafe { crate::tcl_stubs::Tcl_Preserve(member as ClientData) };
    }
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
    for (member, name, _) in &channels {
        // Looked up again: a reflected channel's watch script, run by an earlier one, may have
        // closed it, or deleted its interp.
        let Ok(cname) = CString::new(name.as_str()) else { continue };
        if interp_deleted(*member) {
            continue;
        }
        // SAFETY: member is preserved (below) and not deleted; its state is saved and restored
        // around the lookup, which leaves an error message when the channel is gone; a null mode
        // pointer is allowed. A found chan is live: adding and removing a channel handler that
        // wants nothing makes Tcl compute the channel's interest again and hand it to the driver,
        // which makes its file handler anew.
        unsafe {
            let saved = crate::tcl_stubs::Tcl_SaveInterpState(*member, TCL_OK);
            let chan = crate::tcl_stubs::Tcl_GetChannel(*member, cname.as_ptr(), std::ptr::null_mut());
            if !chan.is_null() {
                crate::tcl_stubs::Tcl_CreateChannelHandler(chan, 0, Some(want_nothing), std::ptr::null_mut());
                crate::tcl_stubs::Tcl_DeleteChannelHandler(chan, Some(want_nothing), std::ptr::null_mut());
            }
            crate::tcl_stubs::Tcl_RestoreInterpState(*member, saved);
        }
    }
    for member in tree {
        // SAFETY: balances the Tcl_Preserve when the tree was listed.
        unsafe { crate::tcl_stubs::Tcl_Release(member as ClientData) };
    }
    Ok(())
}

/// `interp`'s root (the interp without a parent above it) and every interp below the root.
fn interp_tree(interp: *mut Tcl_Interp) -> Vec<*mut Tcl_Interp> {
    let mut root = interp;
    // SAFETY: root is live; a live interp's parent outlives it.
    while let Some(parent) = NonNull::new(unsafe { crate::tcl_stubs::Tcl_GetMaster(root) }) {
        root = parent.as_ptr();
    }
    let mut tree = vec![root];
    let mut paths = vec![Obj::list([])];
    let mut at = 0;
    while at < paths.len() {
        for child in child_names(root, &paths[at]) {
            let path = Obj::list(list_elements(&paths[at]).into_iter().chain([child]));
            let cpath = CString::new(path.to_string_lossy()).unwrap_or_default();
            // SAFETY: root is live; cpath names a child that `interp slaves` just listed.
            let found = unsafe { crate::tcl_stubs::Tcl_GetSlave(root, cpath.as_ptr()) };
            if !found.is_null() {
                tree.push(found);
                paths.push(path);
            }
        }
        at += 1;
    }
    tree
}

/// The names of the children of the interp at `path` under `root` (`interp slaves $path`, run in
/// the root, whose result and error state are left as they were).
fn child_names(root: *mut Tcl_Interp, path: &Obj) -> Vec<Obj> {
    let words = [Obj::string("::interp"), Obj::string("slaves"), path.clone()];
    let objv: Vec<*mut Tcl_Obj> = words.iter().map(Obj::as_ptr).collect();
    // SAFETY: root is live; its state is saved first and restored after reading the result.
    unsafe {
        let saved = crate::tcl_stubs::Tcl_SaveInterpState(root, TCL_OK);
        let code = crate::tcl_stubs::Tcl_EvalObjv(root, objv.len() as c_int, objv.as_ptr(), crate::tcl_stubs::TCL_EVAL_GLOBAL as c_int);
        let names = if code == TCL_OK { list_elements(&Obj::from_ptr(crate::tcl_stubs::Tcl_GetObjResult(root))) } else { Vec::new() };
        crate::tcl_stubs::Tcl_RestoreInterpState(root, saved);
        names
    }
}

/// The elements of a list object (none if it is not a list).
fn list_elements(list: &Obj) -> Vec<Obj> {
    let mut count: c_int = 0;
    let mut items: *mut *mut Tcl_Obj = std::ptr::null_mut();
    // SAFETY: list is live; on success Tcl points items at count live elements, which we take
    // references to before anything can change the list.
    unsafe {
        if crate::tcl_stubs::Tcl_ListObjGetElements(std::ptr::null_mut(), list.as_ptr(), &mut count, &mut items) != TCL_OK {
            return Vec::new();
        }
        (0..count.max(0) as usize).map(|i| Obj::from_ptr(*items.add(i))).collect()
    }
}

/// This process's open fds (from /proc/self/fd; else every number below the fd limit).
fn open_fds() -> Vec<RawFd> {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => {
            // SAFETY: sysconf only reads a limit (-1, for none known, is clamped to no fds).
            let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) }.clamp(0, 65536) as RawFd;
            (0..max).collect()
        }
    }
}

/// The channels registered in `interp`, by name; its result and error state are left as they were.
fn interp_channels(interp: *mut Tcl_Interp) -> Vec<(String, crate::tcl_stubs::Tcl_Channel)> {
    let mut channels = Vec::new();
    // SAFETY: interp is live (in the tree running our command); its state is saved first and
    // restored once the names are read from its result.
    unsafe {
        let saved = crate::tcl_stubs::Tcl_SaveInterpState(interp, TCL_OK);
        if crate::tcl_stubs::Tcl_GetChannelNamesEx(interp, std::ptr::null()) == TCL_OK {
            for name in list_elements(&Obj::from_ptr(crate::tcl_stubs::Tcl_GetObjResult(interp))) {
                let cname = CString::new(name.to_string_lossy()).unwrap_or_default();
                let chan = crate::tcl_stubs::Tcl_GetChannel(interp, cname.as_ptr(), std::ptr::null_mut());
                if !chan.is_null() {
                    channels.push((name.to_string_lossy(), chan));
                }
            }
        }
        crate::tcl_stubs::Tcl_RestoreInterpState(interp, saved);
    }
    channels
}

/// True for a channel of Tcl's TCP socket driver (`socket`, `socket -server`, and the channels
/// socketserver delivers).
fn is_tcp_driver(chan: crate::tcl_stubs::Tcl_Channel) -> bool {
    // SAFETY: chan is a live channel; its type is static data of its driver.
    unsafe {
        let kind = crate::tcl_stubs::Tcl_GetChannelType(chan);
        !kind.is_null() && !(*kind).typeName.is_null() && CStr::from_ptr((*kind).typeName) == c"tcp"
    }
}

/// A TCP socket that listens or is still connecting (`socket -async`).
fn unmovable(chan: crate::tcl_stubs::Tcl_Channel) -> bool {
    let is_tcp = is_tcp_driver(chan);
    let listening = channel_fds(chan).into_iter().any(|fd| {
        // SAFETY: fd is the channel's open fd, borrowed only for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false)
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
        // SAFETY: Tcl_Alloc'd (aligned for any type), fully initialised before it is queued,
        // freed by Tcl after service_file_event returns 1.
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

thread_local! {
    /// The peer that each channel of [`register_socket_channel`] was delivered with (which a
    /// PROXY header may make differ from getpeername's), by channel, until the channel closes:
    /// `park` hands it back with the connection. Per thread, as channels are, and keyed by the
    /// channel, so that the close handler that removes a record needs no interp's state (which
    /// may be freed before the interp's channels close when the interp is deleted).
    static DELIVERED_PEERS: RefCell<HashMap<usize, SocketAddr>> = RefCell::new(HashMap::new());
}

/// Wraps a connected TCP socket, delivered with `peer`, as a Tcl `sock` channel registered in
/// `interp`; returns its name.
pub fn register_socket_channel(interp: *mut Tcl_Interp, fd: OwnedFd, peer: SocketAddr) -> Option<String> {
    let raw = fd.into_raw_fd();
    // SAFETY: raw is a connected TCP socket that we own; Tcl takes ownership (closing it when
    // the channel closes). ClientData carries the fd number, as Tcl's own code does (INT2PTR).
    let chan = unsafe { crate::tcl_stubs::Tcl_MakeTcpClientChannel(raw as isize as ClientData) };
    if chan.is_null() {
        // SAFETY: Tcl did not take the fd, so it is still ours to close.
        drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        return None;
    }
    let _ = DELIVERED_PEERS.try_with(|peers| peers.borrow_mut().insert(chan as usize, peer));
    // SAFETY: chan is the live channel just created; registering gives interp a reference. The
    // close handler's data is the channel's address, a plain key (never dereferenced).
    unsafe {
        crate::tcl_stubs::Tcl_CreateCloseHandler(chan, Some(forget_delivered_peer), chan as ClientData);
        crate::tcl_stubs::Tcl_RegisterChannel(interp, chan);
        Some(CStr::from_ptr(crate::tcl_stubs::Tcl_GetChannelName(chan) as *const c_char).to_string_lossy().into_owned())
    }
}

/// A delivered channel's close handler: its record goes with it.
unsafe extern "C" fn forget_delivered_peer(chan: ClientData) {
    // try_with: the thread may be exiting (its channels close after its thread-locals).
    let _ = DELIVERED_PEERS.try_with(|peers| peers.borrow_mut().remove(&(chan as usize)));
}

/// The channel named `name` in `interp`, or Tcl's own error for a name it does not know.
fn find_channel(interp: *mut Tcl_Interp, name: &str) -> Result<crate::tcl_stubs::Tcl_Channel, CmdError> {
    let cname = CString::new(name).unwrap_or_default();
    // SAFETY: interp is live during its command; a null mode pointer is allowed.
    let chan = unsafe { crate::tcl_stubs::Tcl_GetChannel(interp, cname.as_ptr(), std::ptr::null_mut()) };
    if chan.is_null() {
        return Err(CmdError::new(format!("can not find channel named \"{name}\""), &["TCL", "LOOKUP", "CHANNEL", name]));
    }
    Ok(chan)
}

/// The result of a Tcl channel call: TCL_ERROR becomes the errno Tcl kept for it (EIO if none).
fn channel_io(code: c_int) -> io::Result<()> {
    if code == TCL_OK {
        return Ok(());
    }
    // SAFETY: reads the calling thread's Tcl errno.
    let errno = unsafe { crate::tcl_stubs::Tcl_GetErrno() };
    Err(io::Error::from_raw_os_error(if errno == 0 { libc::EIO } else { errno }))
}

/// A socket channel over a TCP connection, found by name for one command, which must not let
/// any script run (one could close it) while it holds this.
pub struct TcpChannel {
    chan: crate::tcl_stubs::Tcl_Channel,
    fd: RawFd,
}

impl TcpChannel {
    /// The channel named `name` in `interp` if it is a channel of Tcl's TCP driver over a TCP
    /// connection (the kind socketserver delivers); `None` if it is another kind of channel.
    pub fn find(interp: *mut Tcl_Interp, name: &str) -> Result<Option<TcpChannel>, CmdError> {
        let chan = find_channel(interp, name)?;
        if !is_tcp_driver(chan) {
            return Ok(None);
        }
        let [fd] = channel_fds(chan)[..] else { return Ok(None) };
        // SAFETY: fd is the channel's open fd, borrowed only for this call.
        let is_tcp = crate::fdpass::is_tcp_stream(unsafe { BorrowedFd::borrow_raw(fd) });
        Ok(is_tcp.then_some(TcpChannel { chan, fd }))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel owns fd and stays open while self lives (see the struct), and
        // `close` consumes self.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    /// The peer the channel was delivered with, if [`register_socket_channel`] made it.
    pub fn delivered_peer(&self) -> Option<SocketAddr> {
        DELIVERED_PEERS.try_with(|peers| peers.borrow().get(&(self.chan as usize)).copied()).ok().flatten()
    }

    /// True if a transformation (`chan push`, `zlib push`, `tls::import`) is stacked on the
    /// socket: its state and its buffers would not travel with the connection.
    pub fn is_stacked(&self) -> bool {
        // SAFETY: chan is live (see the struct); Tcl_GetChannel gave the bottom of its stack.
        unsafe { crate::tcl_stubs::Tcl_GetTopChannel(self.chan) != self.chan }
    }

    /// True if the channel is registered in more than one interp.
    pub fn is_shared(&self) -> bool {
        // SAFETY: chan is live (see the struct).
        unsafe { crate::tcl_stubs::Tcl_IsChannelShared(self.chan) != 0 }
    }

    /// True if Tcl has read input ahead into the channel's buffers that no command has taken.
    pub fn has_buffered_input(&self) -> bool {
        // SAFETY: chan is live (see the struct).
        unsafe { crate::tcl_stubs::Tcl_InputBuffered(self.chan) > 0 }
    }

    pub fn is_blocking(&self) -> bool {
        channel_option(self.chan, c"-blocking").as_deref() != Some("0")
    }

    /// `fconfigure -blocking`: also the fd's O_NONBLOCK, which every copy of the fd shares.
    pub fn set_blocking(&self, blocking: bool) -> io::Result<()> {
        let value = if blocking { c"1" } else { c"0" };
        // SAFETY: chan is live (see the struct); a null interp is allowed.
        channel_io(unsafe {
            crate::tcl_stubs::Tcl_SetChannelOption(std::ptr::null_mut(), self.chan, c"-blocking".as_ptr(), value.as_ptr())
        })
    }

    /// Writes out what is buffered for output: all of it if the channel is blocking.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: chan is live (see the struct).
        channel_io(unsafe { crate::tcl_stubs::Tcl_Flush(self.chan) })
    }

    /// Closes the channel as `close` does in `interp`, the only interp it is registered in:
    /// close handlers and `onclose` scripts run; the fd is closed.
    pub fn close(self, interp: *mut Tcl_Interp) {
        // SAFETY: interp is live and holds the channel, which is live (see the struct). The
        // result is ignored: with nothing left to flush, only the driver's close(2) can fail,
        // and then the fd is gone all the same.
        unsafe { crate::tcl_stubs::Tcl_UnregisterChannel(interp, self.chan) };
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

/// Holds an interp with `Tcl_Preserve` until dropped: while held, a deleted interp (and its
/// assoc data, our state) is not freed, so [`interp_deleted`] can be asked of it.
pub struct PreservedInterp(*mut Tcl_Interp);

impl PreservedInterp {
    /// # Safety
    /// `interp` must be live (not yet freed), and the guard dropped in its thread.
    pub unsafe fn new(interp: *mut Tcl_Interp) -> PreservedInterp {
        // SAFETY: the caller guarantees interp is live.
        unsafe { crate::tcl_stubs::Tcl_Preserve(interp as ClientData) };
        PreservedInterp(interp)
    }

    pub fn interp(&self) -> *mut Tcl_Interp {
        self.0
    }
}

impl Drop for PreservedInterp {
    fn drop(&mut self) {
        // SAFETY: balances the Tcl_Preserve in new; this may free a deleted interp.
        unsafe { crate::tcl_stubs::Tcl_Release(self.0 as ClientData) };
    }
}

pub fn interp_deleted(interp: *mut Tcl_Interp) -> bool {
    // SAFETY: asking is allowed until the interp's memory is released, which the state owning
    // this pointer outlives (it is the interp's assoc data).
    unsafe { crate::tcl_stubs::Tcl_InterpDeleted(interp) != 0 }
}

/// Runs a callback's body (file handler, timer, event) for `interp`, keeping any panic from
/// unwinding into Tcl: it becomes a background error of the interp (errorCode SOCKETSERVER
/// INTERNAL), unless the interp is being deleted and has no one left to tell.
pub fn guard_callback<F: FnOnce()>(interp: *mut Tcl_Interp, body: F) {
    if let Err(err) = catch_panic(body) {
        if !interp_deleted(interp) {
            background_error(interp, err);
        }
    }
}

/// An `onclose` script. The same Tcl_Alloc'ed block is first the channel's close handler's data
/// and then, once the channel has closed, the queued event itself (Tcl requires the Tcl_Event
/// header first and frees the block with Tcl_Free). It holds no Rust allocation, so when Tcl
/// frees it unrun (a thread's queue at its exit) nothing is lost; what it holds of the interp
/// (the script's reference and the pointer) is given back when the interp is deleted.
#[repr(C)]
struct CloseEvent {
    header: crate::tcl_stubs::Tcl_Event,
    /// Null once the interp has been deleted or the event has run.
    interp: *mut Tcl_Interp,
    /// One reference to the script, owned; null whenever `interp` is.
    script: *mut Tcl_Obj,
    /// The channel while the close handler waits for it; null once the event is queued.
    chan: crate::tcl_stubs::Tcl_Channel,
}

/// Evaluates `script` (errors to the background handler) from the event loop once the channel
/// named `name` has closed. It runs as a queued event, not inside the close itself, and never
/// once `interp` has been deleted.
pub fn run_when_closed(interp: *mut Tcl_Interp, name: &str, script: Obj) -> Result<(), CmdError> {
    let chan = find_channel(interp, name)?;
    let size = std::mem::size_of::<CloseEvent>() as u32;
    // SAFETY: Tcl_Alloc returns memory aligned for any type (or panics Tcl on failure); every
    // field is written before the pointer is handed out. The block lives until the event has run
    // (Tcl frees it), or until forget_close_interp frees it while the channel is still open.
    unsafe {
        let event = crate::tcl_stubs::Tcl_Alloc(size) as *mut CloseEvent;
        event.write(CloseEvent {
            header: crate::tcl_stubs::Tcl_Event { proc_: Some(run_close_script), nextPtr: std::ptr::null_mut() },
            interp,
            script: script.into_raw(),
            chan,
        });
        crate::tcl_stubs::Tcl_CreateCloseHandler(chan, Some(queue_close_script), event as ClientData);
        crate::tcl_stubs::Tcl_CallWhenDeleted(interp, Some(forget_close_interp), event as ClientData);
    }
    Ok(())
}

/// The channel's close handler: queues the block as the event.
unsafe extern "C" fn queue_close_script(data: ClientData) {
    let event = data as *mut CloseEvent;
    // SAFETY: data is the live CloseEvent of run_when_closed; the channel is going, so the block
    // now belongs to the event queue.
    unsafe {
        (*event).chan = std::ptr::null_mut();
        crate::tcl_stubs::Tcl_QueueEvent(event.cast(), crate::tcl_stubs::Tcl_QueuePosition_TCL_QUEUE_TAIL);
    }
}

/// The interp is being deleted: its script will never run. A block still waiting for its
/// channel is taken back from it and freed; a queued one is emptied, to do nothing when it runs.
unsafe extern "C" fn forget_close_interp(data: ClientData, _interp: *mut Tcl_Interp) {
    let event = data as *mut CloseEvent;
    // SAFETY: data is a live CloseEvent: it is registered here until it runs (run_close_script
    // unregisters it first) and only freed after that or below. A non-null chan is still open
    // (its close handler has not run), in this thread.
    unsafe {
        let script = std::mem::replace(&mut (*event).script, std::ptr::null_mut());
        if !script.is_null() {
            drop(Obj::from_raw(script));
        }
        (*event).interp = std::ptr::null_mut();
        let chan = (*event).chan;
        if !chan.is_null() {
            crate::tcl_stubs::Tcl_DeleteCloseHandler(chan, Some(queue_close_script), data);
            crate::tcl_stubs::Tcl_Free(event.cast());
        }
    }
}

unsafe extern "C" fn run_close_script(event: *mut crate::tcl_stubs::Tcl_Event, flags: c_int) -> c_int {
    if flags & crate::tcl_stubs::TCL_FILE_EVENTS as c_int == 0 {
        return 0; // not now: a file event, and this round is not servicing those
    }
    let event = event as *mut CloseEvent;
    // SAFETY: event is our queued CloseEvent; a non-null interp has not been deleted yet (else
    // forget_close_interp would have emptied it), so its pointer is valid and unregistering is
    // sound. The script's reference moves to `script`; Tcl frees the block after we return 1.
    let (interp, script) = unsafe {
        let interp = std::mem::replace(&mut (*event).interp, std::ptr::null_mut());
        if interp.is_null() {
            return 1;
        }
        crate::tcl_stubs::Tcl_DontCallWhenDeleted(interp, Some(forget_close_interp), event as ClientData);
        (interp, Obj::from_raw(std::mem::replace(&mut (*event).script, std::ptr::null_mut())))
    };
    guard_callback(interp, || {
        if !interp_deleted(interp) {
            call_in_background(interp, &script, &[]);
        }
    });
    1
}


/// `$::env(name)`, if set and valid UTF-8: read through Tcl's env array, which mirrors (and
/// may have changed) the process environment.
pub fn get_env(interp: *mut Tcl_Interp, name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    // SAFETY: interp is the caller's live interp; the strings are NUL-terminated; Tcl returns a
    // string it owns (or null), which we copy at once.
    unsafe {
        let value = crate::tcl_stubs::Tcl_GetVar2(interp, c"env".as_ptr(), name.as_ptr(), crate::tcl_stubs::TCL_GLOBAL_ONLY as c_int);
        (!value.is_null()).then(|| CStr::from_ptr(value).to_str().ok().map(str::to_owned)).flatten()
    }
}

/// `unset -nocomplain ::env(name)`: Tcl removes it from the process environment as well, so
/// that programs this process runs do not see it.
pub fn unset_env(interp: *mut Tcl_Interp, name: &str) {
    let Ok(name) = CString::new(name) else { return };
    // SAFETY: interp is the caller's live interp; the strings are NUL-terminated. Without
    // TCL_LEAVE_ERR_MSG a missing variable leaves the interp's result alone.
    unsafe { crate::tcl_stubs::Tcl_UnsetVar2(interp, c"env".as_ptr(), name.as_ptr(), crate::tcl_stubs::TCL_GLOBAL_ONLY as c_int) };
}

/// The key-value pairs of a dict value, keys unique, as `dict` reads it; a value that is no dict
/// gives Tcl's own message (`missing value to go with key`), errorCode `TCL VALUE DICTIONARY`.
pub fn dict_pairs(interp: *mut Tcl_Interp, dict: &Obj) -> Result<Vec<(Obj, Obj)>, CmdError> {
    let mut size: c_int = 0;
    // SAFETY: interp is the caller's live interp; dict is live; Tcl leaves a message in the
    // interp's result on failure, which we copy at once.
    if unsafe { crate::tcl_stubs::Tcl_DictObjSize(interp, dict.as_ptr(), &mut size) } != TCL_OK {
        // SAFETY: as above; the result object is live until the interp's result changes.
        let message = unsafe { Obj::from_ptr(crate::tcl_stubs::Tcl_GetObjResult(interp)) }.to_string_lossy();
        return Err(CmdError::new(message, &["TCL", "VALUE", "DICTIONARY"]));
    }
    // A dict is a valid list of its pairs, keys unique.
    let elements = list_elements(dict);
    Ok(elements.chunks_exact(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_with_its_message() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        let code = ["SOCKETSERVER", "INTERNAL"].map(String::from).to_vec();
        let text = "socketserver internal error: slot 3 vanished".to_string();
        // A runtime value, so that the message is a String (a literal is folded into a &str).
        let slot = std::hint::black_box(3);
        assert_eq!(catch_panic(|| panic!("slot {slot} vanished")), Err::<(), _>(CmdError::Message { text, code: code.clone() }));
        let text = "socketserver internal error: static".to_string();
        assert_eq!(catch_panic(|| panic!("static")), Err::<(), _>(CmdError::Message { text, code }));
    }
}
