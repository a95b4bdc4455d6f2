//! The Tcl C API, called through the stubs table of the Tcl that loaded us, as every TEA extension
//! does (`Tcl_InitStubs`, tcl's generic/tclStubLib.c). The library so has no link-time reference
//! to libtcl: loaded into a tclkit or an application that embeds its own Tcl, it uses that Tcl
//! instead of pulling in a second runtime.
//!
//! Call sites use the C names (`crate::tcl_stubs::Tcl_NewStringObj(...)`); `clib` provides only
//! the types and the layout of `TclStubs`. Every function the crate calls needs a line in
//! `stub_functions!` below; calling `clib::Tcl_*` instead would link libtcl again, which
//! tests/load.test catches.

use clib::TclStubs;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};

pub use clib::{
    ClientData, Tcl_Channel, Tcl_ChannelProc, Tcl_ChannelType, Tcl_CloseProc, Tcl_CmdDeleteProc, Tcl_Command,
    Tcl_DString, Tcl_Event, Tcl_ExitProc, Tcl_FileProc, Tcl_Interp, Tcl_InterpDeleteProc, Tcl_InterpState, Tcl_NotifierProcs, Tcl_Obj,
    Tcl_ObjCmdProc, Tcl_QueuePosition, Tcl_QueuePosition_TCL_QUEUE_TAIL, Tcl_Time, Tcl_TimerProc, Tcl_TimerToken,
    Tcl_WideInt, TCL_ERROR, TCL_EVAL_GLOBAL, TCL_FILE_EVENTS, TCL_GLOBAL_ONLY, TCL_OK, TCL_READABLE, TCL_WRITABLE,
};

/// `TCL_STUB_MAGIC` of tcl.h (bindgen skips its cast): the mark of a Tcl 8 stubs table.
const TCL_STUB_MAGIC: c_int = 0xFCA3_BACF_u32 as c_int;

/// The head of Tcl's internal `Interp` (tclInt.h): the public fields of `Tcl_Interp`, then the
/// interp's stubs table. Every stubs-enabled extension relies on this layout, so Tcl 8 keeps it.
#[repr(C)]
struct InterpHead {
    result: *const c_char,
    free_proc: Option<unsafe extern "C" fn(*mut c_char)>,
    error_line: c_int,
    stub_table: *const TclStubs,
}

/// The stubs table of the Tcl library in this process. Process-wide by nature, as `tclStubsPtr`
/// in every TEA extension: all interps of one Tcl library share one table. Set by [`init`] before
/// the first call through it, and never changed afterwards.
static STUBS: AtomicPtr<TclStubs> = AtomicPtr::new(std::ptr::null_mut());

/// The table that [`init`] stored.
///
/// # Safety
/// [`init`] has succeeded, which holds in any code Tcl reaches through our commands and callbacks.
unsafe fn table() -> &'static TclStubs {
    // SAFETY: init stored a non-null pointer to the library's static table (so it lives as long as
    // the library that loaded us), checked for the magic and every slot used here.
    unsafe { &*STUBS.load(Ordering::Acquire) }
}

/// Defines, for each `Tcl_Name = slot(args) -> result;`, a function `Tcl_Name` that calls the
/// table's `slot`, and `first_missing`, which [`init`] uses to check that the table has them all.
macro_rules! stub_functions {
    ($($name:ident = $slot:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;)*) => {
        $(
            /// Calls the Tcl C function of this name through the stubs table.
            ///
            /// # Safety
            /// The C function's contract, and [`init`] has succeeded.
            #[allow(non_snake_case, clippy::too_many_arguments)]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: init stores only a table whose slot is filled (first_missing); the
                // caller keeps the C function's contract.
                unsafe { (table().$slot.unwrap_unchecked())($($arg),*) }
            }
        )*

        /// The name of the first function above that `table` does not provide, if any.
        fn first_missing(table: &TclStubs) -> Option<&'static CStr> {
            $(
                if table.$slot.is_none() {
                    return Some(const {
                        match CStr::from_bytes_with_nul(concat!(
                            "the Tcl library does not provide ", stringify!($name), "\0"
                        ).as_bytes()) {
                            Ok(message) => message,
                            Err(_) => panic!("a NUL inside a function name"),
                        }
                    });
                }
            )*
            None
        }
    };
}

stub_functions! {
    Tcl_Alloc = tcl_Alloc(size: c_uint) -> *mut c_char;
    Tcl_BackgroundException = tcl_BackgroundException(interp: *mut Tcl_Interp, code: c_int);
    Tcl_CallWhenDeleted = tcl_CallWhenDeleted(interp: *mut Tcl_Interp, proc_: Tcl_InterpDeleteProc, client_data: ClientData);
    Tcl_CreateChannelHandler = tcl_CreateChannelHandler(chan: Tcl_Channel, mask: c_int, proc_: Tcl_ChannelProc, client_data: ClientData);
    Tcl_CreateThreadExitHandler = tcl_CreateThreadExitHandler(proc_: Tcl_ExitProc, client_data: ClientData);
    Tcl_CreateCloseHandler = tcl_CreateCloseHandler(chan: Tcl_Channel, proc_: Tcl_CloseProc, client_data: ClientData);
    Tcl_CreateFileHandler = tcl_CreateFileHandler(fd: c_int, mask: c_int, proc_: Tcl_FileProc, client_data: ClientData);
    Tcl_CreateObjCommand = tcl_CreateObjCommand(interp: *mut Tcl_Interp, cmd_name: *const c_char, proc_: Tcl_ObjCmdProc, client_data: ClientData, delete_proc: Tcl_CmdDeleteProc) -> Tcl_Command;
    Tcl_CreateTimerHandler = tcl_CreateTimerHandler(milliseconds: c_int, proc_: Tcl_TimerProc, client_data: ClientData) -> Tcl_TimerToken;
    Tcl_DStringFree = tcl_DStringFree(ds: *mut Tcl_DString);
    Tcl_DStringInit = tcl_DStringInit(ds: *mut Tcl_DString);
    Tcl_DbDecrRefCount = tcl_DbDecrRefCount(obj: *mut Tcl_Obj, file: *const c_char, line: c_int);
    Tcl_DbIncrRefCount = tcl_DbIncrRefCount(obj: *mut Tcl_Obj, file: *const c_char, line: c_int);
    Tcl_DeleteChannelHandler = tcl_DeleteChannelHandler(chan: Tcl_Channel, proc_: Tcl_ChannelProc, client_data: ClientData);
    Tcl_DeleteCloseHandler = tcl_DeleteCloseHandler(chan: Tcl_Channel, proc_: Tcl_CloseProc, client_data: ClientData);
    Tcl_DeleteThreadExitHandler = tcl_DeleteThreadExitHandler(proc_: Tcl_ExitProc, client_data: ClientData);
    Tcl_DeleteFileHandler = tcl_DeleteFileHandler(fd: c_int);
    Tcl_DeleteTimerHandler = tcl_DeleteTimerHandler(token: Tcl_TimerToken);
    Tcl_DictObjSize = tcl_DictObjSize(interp: *mut Tcl_Interp, dict: *mut Tcl_Obj, size_ptr: *mut c_int) -> c_int;
    Tcl_DontCallWhenDeleted = tcl_DontCallWhenDeleted(interp: *mut Tcl_Interp, proc_: Tcl_InterpDeleteProc, client_data: ClientData);
    Tcl_DuplicateObj = tcl_DuplicateObj(obj: *mut Tcl_Obj) -> *mut Tcl_Obj;
    Tcl_EvalObjEx = tcl_EvalObjEx(interp: *mut Tcl_Interp, obj: *mut Tcl_Obj, flags: c_int) -> c_int;
    Tcl_EvalObjv = tcl_EvalObjv(interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj, flags: c_int) -> c_int;
    Tcl_Flush = tcl_Flush(chan: Tcl_Channel) -> c_int;
    Tcl_Free = tcl_Free(ptr: *mut c_char);
    Tcl_GetAssocData = tcl_GetAssocData(interp: *mut Tcl_Interp, name: *const c_char, proc_ptr: *mut Tcl_InterpDeleteProc) -> ClientData;
    Tcl_GetChannel = tcl_GetChannel(interp: *mut Tcl_Interp, chan_name: *const c_char, mode_ptr: *mut c_int) -> Tcl_Channel;
    Tcl_GetChannelHandle = tcl_GetChannelHandle(chan: Tcl_Channel, direction: c_int, handle_ptr: *mut ClientData) -> c_int;
    Tcl_GetChannelName = tcl_GetChannelName(chan: Tcl_Channel) -> *const c_char;
    Tcl_GetChannelNamesEx = tcl_GetChannelNamesEx(interp: *mut Tcl_Interp, pattern: *const c_char) -> c_int;
    Tcl_GetChannelOption = tcl_GetChannelOption(interp: *mut Tcl_Interp, chan: Tcl_Channel, option_name: *const c_char, ds: *mut Tcl_DString) -> c_int;
    Tcl_GetChannelType = tcl_GetChannelType(chan: Tcl_Channel) -> *const Tcl_ChannelType;
    Tcl_GetErrno = tcl_GetErrno() -> c_int;
    Tcl_GetMaster = tcl_GetMaster(interp: *mut Tcl_Interp) -> *mut Tcl_Interp;
    Tcl_GetObjResult = tcl_GetObjResult(interp: *mut Tcl_Interp) -> *mut Tcl_Obj;
    Tcl_GetSlave = tcl_GetSlave(interp: *mut Tcl_Interp, name: *const c_char) -> *mut Tcl_Interp;
    Tcl_GetStringFromObj = tcl_GetStringFromObj(obj: *mut Tcl_Obj, length_ptr: *mut c_int) -> *mut c_char;
    Tcl_GetTopChannel = tcl_GetTopChannel(chan: Tcl_Channel) -> Tcl_Channel;
    Tcl_GetVar2 = tcl_GetVar2(interp: *mut Tcl_Interp, part1: *const c_char, part2: *const c_char, flags: c_int) -> *const c_char;
    Tcl_InputBuffered = tcl_InputBuffered(chan: Tcl_Channel) -> c_int;
    Tcl_InterpDeleted = tcl_InterpDeleted(interp: *mut Tcl_Interp) -> c_int;
    Tcl_IsChannelShared = tcl_IsChannelShared(channel: Tcl_Channel) -> c_int;
    Tcl_ListObjAppendElement = tcl_ListObjAppendElement(interp: *mut Tcl_Interp, list: *mut Tcl_Obj, obj: *mut Tcl_Obj) -> c_int;
    Tcl_ListObjGetElements = tcl_ListObjGetElements(interp: *mut Tcl_Interp, list: *mut Tcl_Obj, objc_ptr: *mut c_int, objv_ptr: *mut *mut *mut Tcl_Obj) -> c_int;
    Tcl_ListObjLength = tcl_ListObjLength(interp: *mut Tcl_Interp, list: *mut Tcl_Obj, length_ptr: *mut c_int) -> c_int;
    Tcl_MakeTcpClientChannel = tcl_MakeTcpClientChannel(tcp_socket: ClientData) -> Tcl_Channel;
    Tcl_NewListObj = tcl_NewListObj(objc: c_int, objv: *const *mut Tcl_Obj) -> *mut Tcl_Obj;
    Tcl_NewStringObj = tcl_NewStringObj(bytes: *const c_char, length: c_int) -> *mut Tcl_Obj;
    Tcl_NewWideIntObj = tcl_NewWideIntObj(value: Tcl_WideInt) -> *mut Tcl_Obj;
    Tcl_PkgProvideEx = tcl_PkgProvideEx(interp: *mut Tcl_Interp, name: *const c_char, version: *const c_char, client_data: *const c_void) -> c_int;
    Tcl_PosixError = tcl_PosixError(interp: *mut Tcl_Interp) -> *const c_char;
    Tcl_Preserve = tcl_Preserve(data: ClientData);
    Tcl_QueueEvent = tcl_QueueEvent(event: *mut Tcl_Event, position: Tcl_QueuePosition);
    Tcl_RegisterChannel = tcl_RegisterChannel(interp: *mut Tcl_Interp, chan: Tcl_Channel);
    Tcl_Release = tcl_Release(client_data: ClientData);
    Tcl_RestoreInterpState = tcl_RestoreInterpState(interp: *mut Tcl_Interp, state: Tcl_InterpState) -> c_int;
    Tcl_SaveInterpState = tcl_SaveInterpState(interp: *mut Tcl_Interp, status: c_int) -> Tcl_InterpState;
    Tcl_SetAssocData = tcl_SetAssocData(interp: *mut Tcl_Interp, name: *const c_char, proc_: Tcl_InterpDeleteProc, client_data: ClientData);
    Tcl_SetChannelOption = tcl_SetChannelOption(interp: *mut Tcl_Interp, chan: Tcl_Channel, option_name: *const c_char, new_value: *const c_char) -> c_int;
    Tcl_SetErrno = tcl_SetErrno(err: c_int);
    Tcl_SetNotifier = tcl_SetNotifier(procs: *mut Tcl_NotifierProcs);
    Tcl_SetObjErrorCode = tcl_SetObjErrorCode(interp: *mut Tcl_Interp, error_obj: *mut Tcl_Obj);
    Tcl_SetObjResult = tcl_SetObjResult(interp: *mut Tcl_Interp, result_obj: *mut Tcl_Obj);
    Tcl_UnregisterChannel = tcl_UnregisterChannel(interp: *mut Tcl_Interp, chan: Tcl_Channel) -> c_int;
    Tcl_UnsetVar2 = tcl_UnsetVar2(interp: *mut Tcl_Interp, part1: *const c_char, part2: *const c_char, flags: c_int) -> c_int;
    Tcl_WrongNumArgs = tcl_WrongNumArgs(interp: *mut Tcl_Interp, objc: c_int, objv: *const *mut Tcl_Obj, message: *const c_char);
}

/// Binds the library to the stubs table of `interp`'s Tcl after `package require Tcl 8.6` there,
/// as `Tcl_InitStubs(interp, "8.6", 0)` does. On failure the interp's result says why.
///
/// # Safety
/// `interp` is a live interp, in its thread (Tcl's contract for package init procedures).
pub unsafe fn init(interp: *mut Tcl_Interp) -> Result<(), ()> {
    // SAFETY: a Tcl interp is an Interp, which starts with InterpHead; a non-null stubTable points
    // to its library's static table.
    let own = unsafe { (*interp.cast::<InterpHead>()).stub_table.as_ref() };
    let Some(require) = own.filter(|t| t.magic == TCL_STUB_MAGIC).and_then(|t| t.tcl_PkgRequireEx) else {
        // SAFETY: interp is live.
        return unsafe { fail(interp, c"interpreter uses an incompatible stubs mechanism") };
    };
    let mut data: ClientData = std::ptr::null_mut();
    // SAFETY: interp is live, the strings are NUL-terminated, and data is where Tcl stores the
    // package's client data.
    let version = unsafe { require(interp, c"Tcl".as_ptr(), c"8.6".as_ptr(), 0, (&raw mut data).cast()) };
    if version.is_null() {
        return Err(()); // Tcl has set the error ("version conflict for package ...").
    }
    let found = data.cast::<TclStubs>();
    // SAFETY: Tcl provides its own package with its stubs table as client data; a script's
    // `package provide Tcl` leaves none (null), which is refused here.
    let problem = match unsafe { found.as_ref() } {
        Some(t) if t.magic == TCL_STUB_MAGIC => first_missing(t),
        _ => Some(c"package Tcl provides no stubs table"),
    };
    if let Some(message) = problem {
        // SAFETY: interp is live.
        return unsafe { fail(interp, message) };
    }
    match STUBS.compare_exchange(std::ptr::null_mut(), found, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(()),
        Err(bound) if bound == found => Ok(()),
        // SAFETY: interp is live.
        Err(_) => unsafe { fail(interp, c"socketserver is already bound to another Tcl library in this process") },
    }
}

/// Leaves `message` as the interp's error, where `load` looks for it when no stubs table can be
/// trusted yet: the interp's legacy result, as tclStubLib.c does.
///
/// # Safety
/// `interp` is a live interp, in its thread.
unsafe fn fail(interp: *mut Tcl_Interp, message: &'static CStr) -> Result<(), ()> {
    let head = interp.cast::<InterpHead>();
    // SAFETY: head is the interp's head (see init); a static string with no free proc
    // (TCL_STATIC) is a valid legacy result, which Tcl copies and never frees.
    unsafe {
        (*head).result = message.as_ptr();
        (*head).free_proc = None;
    }
    Err(())
}
