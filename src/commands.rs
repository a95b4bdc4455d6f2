//! The Tcl commands and the per-interp state behind them.
//!
//! Each interp owns its state (as assoc data): the servers it created and, per port, its link to
//! the dispatcher as a worker. Nothing is shared between interps or threads. After a fork the
//! child has a copy of the state: servers it did not create are inherited (it can be a worker of
//! them, and `close` merely forgets them), and links registered by an ancestor are dropped before
//! anything else happens, so that the child registers as a worker of its own.

use crate::args::{self, CmdError, CmdResult};
use crate::dispatcher::Server;
use crate::ffi::{self, Obj};
use crate::worker::WorkerLink;
use clib::{ClientData, Tcl_Interp};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_int;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

pub struct InterpState {
    interp: *mut Tcl_Interp,
    /// In creation order: the first is the default port.
    servers: Vec<(u16, Server)>,
    slots: HashMap<u16, Slot>,
}

pub type StateCell = RefCell<InterpState>;

/// This interp's worker registration for one port.
struct Slot {
    link: WorkerLink,
    handler: Option<Obj>,
    received: u64,
    wakeups: u64,
    /// What the file handler's client data points to; boxed so the address stays put.
    target: Box<HandlerTarget>,
}

struct HandlerTarget {
    state: *const StateCell,
    port: u16,
}

impl InterpState {
    pub fn new(interp: *mut Tcl_Interp) -> InterpState {
        InterpState { interp, servers: Vec::new(), slots: HashMap::new() }
    }

    fn server(&self, port: u16) -> Option<&Server> {
        self.servers.iter().find(|(p, _)| *p == port).map(|(_, s)| s)
    }

    fn default_port(&self) -> CmdResult<u16> {
        self.servers.first().map(|(port, _)| *port).ok_or_else(|| {
            CmdError::new(
                "no socketserver in this process: call \"::socketserver::socket server\" first",
                &["SOCKETSERVER", "NOSERVER"],
            )
        })
    }

    /// Drops worker links that a forked child inherited from the process that registered them.
    fn forget_inherited_links(&mut self) {
        self.slots.retain(|_, slot| !slot.link.is_inherited() || {
            disarm(slot);
            false
        });
    }

    fn remove_slot(&mut self, port: u16) {
        if let Some(mut slot) = self.slots.remove(&port) {
            disarm(&mut slot);
        }
    }
}

fn disarm(slot: &mut Slot) {
    ffi::delete_file_handler(slot.link.as_raw_fd());
    slot.handler = None;
}

impl Drop for InterpState {
    fn drop(&mut self) {
        for slot in self.slots.values_mut() {
            disarm(slot);
        }
    }
}

fn posix(prefix: &str, err: io::Error) -> CmdError {
    match err.raw_os_error() {
        Some(errno) => CmdError::Posix { prefix: prefix.into(), errno },
        None => CmdError::new(format!("{prefix}: {err}"), &["SOCKETSERVER", "IO"]),
    }
}

/// `::socketserver::socket server|client|close ...`
pub fn socket_command(cell: &StateCell, objv: &[Obj], words: &[String]) -> CmdResult<Obj> {
    const SUBCOMMANDS: &str = "client, close, or server";
    let Some(sub) = words.get(1) else {
        return Err(CmdError::WrongArgs { words: 1, usage: "subcommand ?arg ...?" });
    };
    let rest: Vec<&str> = words[2..].iter().map(String::as_str).collect();
    let mut state = cell.borrow_mut();
    state.forget_inherited_links();
    match sub.as_str() {
        "server" => server(&mut state, &rest),
        "client" => {
            let (port, handler_at) = args::parse_client(&rest)?;
            client(cell, &mut state, port, objv[2 + handler_at].clone())
        }
        "close" => {
            let port = args::parse_close(&rest)?;
            close(&mut state, port)
        }
        other => Err(CmdError::new(
            format!("bad subcommand \"{other}\": must be {SUBCOMMANDS}"),
            &["TCL", "LOOKUP", "INDEX", "subcommand", other],
        )),
    }
}

fn server(state: &mut InterpState, rest: &[&str]) -> CmdResult<Obj> {
    let parsed = args::parse_server(rest)?;
    let port = parsed.address.port();
    if port != 0 && state.server(port).is_some_and(Server::is_owner) {
        return Ok(Obj::int(port.into()));
    }
    let server = Server::start(parsed.address, parsed.backlog, parsed.queue)
        .map_err(|e| posix("couldn't open socket", e))?;
    let port = server.address.port();
    // A server inherited from the parent on the same port is replaced by this process's own.
    state.servers.retain(|(p, _)| *p != port);
    state.servers.push((port, server));
    Ok(Obj::int(port.into()))
}

fn client(cell: &StateCell, state: &mut InterpState, port: Option<u16>, handler: Obj) -> CmdResult<Obj> {
    let port = match port {
        Some(port) => port,
        None => state.default_port()?,
    };
    if !handler.is_list(state.interp) {
        return Err(CmdError::new(
            format!("handler is not a valid command prefix: \"{}\"", handler.to_string_lossy()),
            &["SOCKETSERVER", "HANDLER"],
        ));
    }
    let Some(server) = state.server(port) else { return Err(CmdError::no_server(port)) };
    if !state.slots.contains_key(&port) {
        let link = match WorkerLink::register(server.registration.as_fd()) {
            Ok(link) => link,
            Err(err) => {
                // The dispatcher is gone (closed in the parent): forget the server here too.
                state.servers.retain(|(p, _)| *p != port);
                return Err(posix(&format!("socketserver on port {port} is closed"), err));
            }
        };
        let target = Box::new(HandlerTarget { state: cell, port });
        state.slots.insert(port, Slot { link, handler: None, received: 0, wakeups: 0, target });
    }
    let slot = state.slots.get_mut(&port).expect("inserted above");
    let was_armed = slot.link.is_armed();
    if let Err(err) = slot.link.arm() {
        state.remove_slot(port);
        return Err(posix(&format!("socketserver on port {port} is closed"), err));
    }
    slot.handler = Some(handler);
    if !was_armed {
        let data = &*slot.target as *const HandlerTarget as ClientData;
        // SAFETY: the target lives in the slot, whose removal deletes this handler first.
        unsafe { ffi::create_file_handler(slot.link.as_raw_fd(), on_readable, data) };
    }
    Ok(Obj::string(""))
}

fn close(state: &mut InterpState, port: u16) -> CmdResult<Obj> {
    let Some(at) = state.servers.iter().position(|(p, _)| *p == port) else {
        return Err(CmdError::no_server(port));
    };
    state.remove_slot(port);
    let (_, server) = state.servers.remove(at);
    drop(server); // in the owning process: stops the dispatcher and closes the listener
    Ok(Obj::string(""))
}

/// `::socketserver::info ?port?`
pub fn info_command(cell: &StateCell, words: &[String]) -> CmdResult<Obj> {
    let rest: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let port = args::parse_info(&rest)?;
    let mut state = cell.borrow_mut();
    state.forget_inherited_links();
    let port = match port {
        Some(port) => port,
        None => state.default_port()?,
    };
    let server = state.server(port).ok_or_else(|| CmdError::no_server(port))?;
    let slot = state.slots.get(&port);
    let mut dict: Vec<(&str, Obj)> = vec![
        ("port", Obj::int(port.into())),
        ("role", Obj::string(if server.is_owner() { "server" } else { "worker" })),
        ("received", Obj::int(slot.map_or(0, |s| s.received) as i64)),
        ("wakeups", Obj::int(slot.map_or(0, |s| s.wakeups) as i64)),
        ("armed", Obj::int(slot.is_some_and(|s| s.link.is_armed()).into())),
    ];
    if server.is_owner() {
        let snap = server.snapshot().map_err(|e| posix(&format!("socketserver on port {port}"), e))?;
        dict.extend([
            ("address", Obj::string(&server.address.ip().to_string())),
            ("backlog", Obj::int(server.backlog.into())),
            ("queue", Obj::int(server.queue_limit as i64)),
            ("accepted", Obj::int(snap.accepted as i64)),
            ("delivered", Obj::int(snap.delivered as i64)),
            ("queued", Obj::int(snap.queued.into())),
            ("ready", Obj::int(snap.ready.into())),
            ("workers", Obj::list(snap.workers.iter().map(|&pid| Obj::int(pid.into())))),
        ]);
    }
    Ok(Obj::list(dict.into_iter().flat_map(|(k, v)| [Obj::string(k), v])))
}

/// The file handler of an armed slot: takes the connection, disarms, and calls the handler.
unsafe extern "C" fn on_readable(data: ClientData, _mask: c_int) {
    // SAFETY: data is the slot's HandlerTarget, valid while the handler is registered.
    let target = unsafe { &*(data as *const HandlerTarget) };
    // SAFETY: the state outlives every handler: dropping it deletes them all first.
    let cell = unsafe { &*target.state };
    let port = target.port;
    ffi::guard_callback(|| deliver(cell, port));
}

fn deliver(cell: &StateCell, port: u16) {
    let (interp, handler, delivery) = {
        let mut state = cell.borrow_mut();
        state.forget_inherited_links();
        let interp = state.interp;
        let Some(slot) = state.slots.get_mut(&port) else { return };
        slot.wakeups += 1;
        match slot.link.receive() {
            Ok(Some(delivery)) => {
                slot.received += 1;
                ffi::delete_file_handler(slot.link.as_raw_fd());
                (interp, slot.handler.take(), delivery)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            // The server has closed: armed workers are simply never called.
            _ => return state.remove_slot(port),
        }
    };
    // No borrow is held from here on: the handler may call any of our commands.
    if ffi::interp_deleted(interp) {
        return;
    }
    let Some(chan) = ffi::register_socket_channel(interp, delivery.fd) else { return };
    if let Some(handler) = handler {
        let args = [
            Obj::string(&chan),
            Obj::string(&delivery.peer.ip().to_string()),
            Obj::int(delivery.peer.port().into()),
        ];
        ffi::call_in_background(interp, &handler, &args);
    }
}
