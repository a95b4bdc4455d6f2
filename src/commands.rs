//! The Tcl commands and the per-interp state behind them.
//!
//! Each interp owns its state (as assoc data): the servers it created and, per port, its link to
//! the dispatcher as a worker. Nothing is shared between interps or threads. After a fork the
//! child has a copy of the state: servers it did not create are inherited (it can be a worker of
//! them, and `close` merely forgets them), and links registered by an ancestor are dropped before
//! anything else happens, so that the child registers as a worker of its own.

use crate::activation::{self, Passed};
use crate::args::{self, ClientTarget, CmdError, CmdResult};
use crate::dispatcher::{Server, FDS_PER_WORKER};
use crate::fdpass::Unfit;
use crate::ffi::{self, Obj};
use crate::process;
use crate::tcl_stubs::{ClientData, Tcl_Interp};
use crate::wire::Refusal;
use crate::worker::{RegisterError, WorkerLink};
use nix::sys::signal::Signal;
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
    /// Scripts for trapped signals; while any is set, the interp is in [`TRAPPERS`].
    traps: HashMap<Signal, Obj>,
    /// The sockets a service manager passed, once `-systemd` has read (and unset) the variables.
    passed: Option<Passed>,
}

pub type StateCell = RefCell<InterpState>;

/// This interp's worker registration for one port.
struct Slot {
    link: WorkerLink,
    /// The named socket it registered through (`client -path`); None: the inherited one.
    path: Option<std::path::PathBuf>,
    handler: Option<Obj>,
    /// `client -onclose`: called once the server has closed.
    on_close: Option<Obj>,
    /// After a connection was dropped for lack of fds: the timer that arms again once there
    /// is a free fd.
    retry: Option<crate::tcl_stubs::Tcl_TimerToken>,
    received: u64,
    wakeups: u64,
    /// What the file handler's client data points to: owned here (never read) so that it lives
    /// exactly as long as the handler, and boxed so its address stays put.
    _target: Box<HandlerTarget>,
}

struct HandlerTarget {
    interp: *mut Tcl_Interp,
    state: *const StateCell,
    port: u16,
}

impl InterpState {
    pub fn new(interp: *mut Tcl_Interp) -> InterpState {
        InterpState { interp, servers: Vec::new(), slots: HashMap::new(), traps: HashMap::new(), passed: None }
    }

    fn server(&self, port: u16) -> Option<&Server> {
        self.servers.iter().find(|(p, _)| *p == port).map(|(_, s)| s)
    }

    /// The first server this interp created; else, in a worker registered by path only, the
    /// port of its first registration.
    fn default_port(&self) -> CmdResult<u16> {
        let first_slot = || self.slots.iter().filter(|(_, slot)| slot.path.is_some()).map(|(port, _)| *port).min();
        self.servers.first().map(|(port, _)| *port).or_else(first_slot).ok_or_else(|| {
            CmdError::new(
                "no socketserver in this interp: call \"::socketserver::socket server\" first",
                &["SOCKETSERVER", "NOSERVER"],
            )
        })
    }

    /// Drops worker links that a forked child inherited from the process that registered them.
    fn forget_inherited_links(&mut self) {
        self.slots.retain(|_, slot| !slot.link.is_inherited() || {
            unwatch(slot);
            false
        });
    }

    /// Removes the named sockets (`-path`) of the servers this process serves.
    pub fn remove_named_paths(&mut self) {
        for (_, server) in &mut self.servers {
            server.remove_named_path();
        }
    }

    fn remove_slot(&mut self, port: u16) {
        if let Some(mut slot) = self.slots.remove(&port) {
            unwatch(&mut slot);
        }
    }
}

fn unwatch(slot: &mut Slot) {
    ffi::delete_file_handler(slot.link.as_raw_fd());
    if let Some(timer) = slot.retry.take() {
        ffi::delete_timer(timer);
    }
    slot.handler = None;
}

/// How often a worker that ran out of fds looks for a free one before it asks for more.
const FD_RETRY_MS: u32 = 100;

impl Drop for InterpState {
    fn drop(&mut self) {
        for slot in self.slots.values_mut() {
            unwatch(slot);
        }
        if !self.traps.is_empty() {
            for &signal in self.traps.keys() {
                let _ = process::untrap(signal);
            }
            stop_trapping(self.interp);
        }
    }
}

fn posix(prefix: &str, err: io::Error) -> CmdError {
    match err.raw_os_error() {
        Some(errno) => CmdError::Posix { prefix: prefix.into(), errno },
        None => CmdError::new(format!("{prefix}: {err}"), &["SOCKETSERVER", "IO"]),
    }
}

/// `::socketserver::socket server|client|close|drain|park ...`
pub fn socket_command(cell: &StateCell, objv: &[Obj], words: &[String]) -> CmdResult<Obj> {
    const SUBCOMMANDS: [&str; 5] = ["client", "close", "drain", "park", "server"];
    let Some(sub) = words.get(1) else {
        return Err(CmdError::WrongArgs { words: 1, usage: "subcommand ?arg ...?" });
    };
    let sub = args::lookup(sub, &SUBCOMMANDS, "subcommand")?;
    let rest: Vec<&str> = words[2..].iter().map(String::as_str).collect();
    let mut state = cell.borrow_mut();
    state.forget_inherited_links();
    match SUBCOMMANDS[sub] {
        "client" => {
            let parsed = args::parse_client(&rest)?;
            let on_close = parsed.on_close_at.map(|at| objv[2 + at].clone());
            match client(cell, &mut state, parsed.target, objv[2 + parsed.handler_at].clone(), on_close) {
                Ok(result) => Ok(result),
                Err(ClientError::Cmd(error)) => Err(error),
                // Found closed while arming (a handler re-arming as the server went): -onclose
                // runs as if the mailbox had said so first, and the error says what happened.
                Err(ClientError::Closed { port, error }) => {
                    server_closed(state, port);
                    Err(error)
                }
            }
        }
        "close" => {
            let port = args::parse_close(&rest)?;
            close(&mut state, port)
        }
        "drain" => {
            let (port, on) = args::parse_drain(&rest)?;
            drain(&state, port, on)
        }
        "park" => match rest[..] {
            [channel] => park(state, channel),
            _ => Err(CmdError::WrongArgs { words: 2, usage: "channel" }),
        },
        _ => server(&mut state, &rest),
    }
}

fn server(state: &mut InterpState, rest: &[&str]) -> CmdResult<Obj> {
    let mut config = args::parse_server(rest)?;
    if let Some(name) = &config.systemd {
        config.fd = Some(passed(state)?.find(name)?);
    }
    if let Some(fd) = config.fd {
        let bound = listening_address(fd, config.systemd.as_deref())?;
        let asked = config.address.port();
        if asked != 0 && asked != bound.port() {
            return Err(CmdError::new(
                format!("fd {fd} listens on port {}, not {asked}", bound.port()),
                &["SOCKETSERVER", "ADOPT", "PORT"],
            ));
        }
        config.address = bound;
    }
    let port = config.address.port();
    if let Some(served) = state.server(port).filter(|server| port != 0 && server.is_owner()) {
        // Served already: the same call again is answered with the port, as socketservtcl
        // did; one that asks for another named socket cannot be.
        if config.path.is_some() && config.path != served.config.path {
            let now = served.config.path.as_ref().map_or_else(|| "no -path".into(), |p| format!("-path {}", p.display()));
            return Err(CmdError::new(
                format!("port {port} is already served here, with {now}"),
                &["SOCKETSERVER", "SERVED", &port.to_string()],
            ));
        }
        return Ok(Obj::int(port.into()));
    }
    let server = Server::start(config).map_err(|e| posix("couldn't open socket", e))?;
    let port = server.address.port();
    // A server inherited from the parent on the same port is replaced by this process's own.
    state.servers.retain(|(p, _)| *p != port);
    state.servers.push((port, server));
    Ok(Obj::int(port.into()))
}

/// The sockets the service manager passed to this process. The first call reads the variables
/// of the protocol and unsets them through Tcl's env, so that no program this process runs takes
/// them for its own (as sd_listen_fds(3) does when asked to); it also makes every passed fd
/// close-on-exec. The sockets then belong to this interp.
fn passed(state: &mut InterpState) -> CmdResult<&Passed> {
    let me = std::process::id();
    // A forked child's copy is its parent's.
    if state.passed.as_ref().is_some_and(|passed| passed.pid != me) {
        state.passed = None;
    }
    if state.passed.is_none() {
        let [pid, fds, names] = activation::VARIABLES.map(|name| ffi::get_env(state.interp, name));
        if pid.is_some() || fds.is_some() || names.is_some() {
            for name in activation::VARIABLES {
                ffi::unset_env(state.interp, name);
            }
        }
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(usize::MAX, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX));
        let passed = Passed::parse(pid.as_deref(), fds.as_deref(), names.as_deref(), me, max_fds)?;
        for fd in passed.fds() {
            // Not open (a manager's mistake): the check of the adopted fd reports it.
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        }
        state.passed = Some(passed);
    }
    Ok(state.passed.as_ref().expect("set above"))
}

/// The address `fd` listens on, or why it cannot be adopted (`name`: the `-systemd` name it has).
fn listening_address(fd: std::os::fd::RawFd, name: Option<&str>) -> CmdResult<std::net::SocketAddr> {
    let subject = match name {
        Some(name) => format!("fd {fd} (socket \"{name}\" of the service manager)"),
        None => format!("fd {fd}"),
    };
    let unfit = |what: &str, code: &str| {
        Err(CmdError::new(format!("{subject} is not {what}"), &["SOCKETSERVER", "ADOPT", code, &fd.to_string()]))
    };
    match crate::fdpass::listening_address(fd) {
        Ok(address) => Ok(address),
        Err(Unfit::NotSocket) => unfit("a socket", "NOTSOCKET"),
        Err(Unfit::NotTcp) => unfit("a TCP socket", "NOTTCP"),
        Err(Unfit::NotListening) => unfit("listening", "NOTLISTENING"),
        Err(Unfit::Io(err)) => Err(posix(&format!("couldn't adopt {subject}"), err)),
    }
}

/// Why `client` failed.
enum ClientError {
    Cmd(CmdError),
    /// The server of `port` turned out to be closed: the slot is there still, with the
    /// `-onclose` command to run.
    Closed { port: u16, error: CmdError },
}

impl From<CmdError> for ClientError {
    fn from(error: CmdError) -> ClientError {
        ClientError::Cmd(error)
    }
}

fn client(
    cell: &StateCell,
    state: &mut InterpState,
    target: ClientTarget,
    handler: Obj,
    on_close: Option<Obj>,
) -> Result<Obj, ClientError> {
    for (what, prefix) in [("handler", Some(&handler)), ("-onclose command", on_close.as_ref())] {
        if prefix.is_some_and(|prefix| !prefix.is_list(state.interp)) {
            return Err(ClientError::Cmd(CmdError::new(
                format!("{what} is not a valid command prefix: \"{}\"", prefix.map(Obj::to_string_lossy).unwrap_or_default()),
                &["SOCKETSERVER", "HANDLER"],
            )));
        }
    }
    let port = match target {
        ClientTarget::Path(path) => register_at(cell, state, path)?,
        ClientTarget::Port(port) => register_inherited(cell, state, port)?,
        ClientTarget::Default => register_inherited(cell, state, state.default_port()?)?,
    };
    let slot = state.slots.get_mut(&port).expect("registered above");
    if on_close.is_some() {
        slot.on_close = on_close;
    }
    if let Err(err) = slot.link.arm() {
        let error = posix(&format!("{} is closed", slot.server_name(port)), err);
        return Err(ClientError::Closed { port, error });
    }
    slot.handler = Some(handler);
    Ok(Obj::string(""))
}

/// Registers (once) as a worker of the server on `port` that this process serves or inherited;
/// the port.
fn register_inherited(cell: &StateCell, state: &mut InterpState, port: u16) -> CmdResult<u16> {
    if state.slots.contains_key(&port) {
        return Ok(port);
    }
    let Some(server) = state.server(port) else { return Err(CmdError::no_server(port)) };
    let link = match WorkerLink::register(server.registration.as_fd()) {
        Ok(link) => link,
        Err(RegisterError::Refused(why)) => return Err(refused(&format!("socketserver on port {port}"), why)),
        Err(RegisterError::Io(err)) => {
            // The dispatcher is gone (closed in the parent): forget the server here too.
            state.servers.retain(|(p, _)| *p != port);
            return Err(posix(&format!("socketserver on port {port} is closed"), err));
        }
    };
    add_slot(cell, state, port, link, None);
    Ok(port)
}

/// Registers (once) as a worker of the server whose named registration socket is `path`; the
/// port it serves.
fn register_at(cell: &StateCell, state: &mut InterpState, path: std::path::PathBuf) -> CmdResult<u16> {
    if let Some((&port, _)) = state.slots.iter().find(|(_, slot)| slot.path.as_ref() == Some(&path)) {
        return Ok(port);
    }
    let server = format!("socketserver at {}", path.display());
    let link = match WorkerLink::register_at(&path) {
        Ok(link) => link,
        Err(RegisterError::Refused(why)) => return Err(refused(&server, why)),
        Err(RegisterError::Io(err)) => return Err(posix(&format!("couldn't register with {server}"), err)),
    };
    let port = link.port;
    // Already a worker of that server by another route: keep that registration.
    if !state.slots.contains_key(&port) {
        add_slot(cell, state, port, link, Some(path));
    }
    Ok(port)
}

fn add_slot(cell: &StateCell, state: &mut InterpState, port: u16, link: WorkerLink, path: Option<std::path::PathBuf>) {
    let target = Box::new(HandlerTarget { interp: state.interp, state: cell, port });
    // The mailbox is watched for as long as the slot lives, armed or not: the dispatcher
    // sends nothing unasked, so an unarmed mailbox wakes us only when the server closes, and
    // no connection pays for changing the notifier's set of fds.
    let data = &*target as *const HandlerTarget as ClientData;
    // SAFETY: the target lives in the slot, whose removal deletes this handler first.
    unsafe { ffi::create_file_handler(link.as_raw_fd(), on_readable, data) };
    let slot = Slot { link, path, handler: None, on_close: None, retry: None, received: 0, wakeups: 0, _target: target };
    state.slots.insert(port, slot);
}

impl Slot {
    /// How errors name the server: by port, or by path for a registration by path.
    fn server_name(&self, port: u16) -> String {
        match &self.path {
            Some(path) => format!("socketserver at {}", path.display()),
            None => format!("socketserver on port {port}"),
        }
    }
}

/// The error of a worker the dispatcher refused (`server`: how to name it).
fn refused(server: &str, why: Refusal) -> CmdError {
    let prefix = format!("{server} refused this worker");
    match why {
        Refusal::WorkerLimit(limit) => CmdError::new(
            format!("{prefix}: it already has {limit} workers (-maxworkers)"),
            &["SOCKETSERVER", "MAXWORKERS", &limit.to_string()],
        ),
        Refusal::OutOfFds => posix(
            &format!("{prefix}: the serving process is out of file descriptors (each worker needs {FDS_PER_WORKER})"),
            io::Error::from_raw_os_error(libc::EMFILE),
        ),
        Refusal::Invalid => CmdError::new(format!("{prefix}: invalid registration"), &["SOCKETSERVER", "REFUSED"]),
        Refusal::Version(spoken) => CmdError::new(
            format!("{prefix}: it speaks protocol version {spoken}, this worker {}", crate::wire::VERSION),
            &["SOCKETSERVER", "VERSION", &spoken.to_string()],
        ),
        Refusal::NotPermitted => posix(
            &format!("{prefix}: this user and group may not register (-allowusers, -allowgroups)"),
            io::Error::from_raw_os_error(libc::EACCES),
        ),
    }
}

fn close(state: &mut InterpState, port: u16) -> CmdResult<Obj> {
    let Some(at) = state.servers.iter().position(|(p, _)| *p == port) else {
        // A worker registered by path only: it leaves the server (what the dispatcher had sent
        // it goes to another worker).
        if state.slots.get(&port).is_some_and(|slot| slot.path.is_some()) {
            state.remove_slot(port);
            return Ok(Obj::string(""));
        }
        return Err(CmdError::no_server(port));
    };
    state.remove_slot(port);
    let (_, server) = state.servers.remove(at);
    drop(server); // in the owning process: stops the dispatcher and closes the listener
    Ok(Obj::string(""))
}

/// `drain port ?bool?`: sets the drain state of a server this process serves, if asked, and
/// returns it (read back from the dispatcher, so it is the state the agent answers with).
fn drain(state: &InterpState, port: u16, on: Option<bool>) -> CmdResult<Obj> {
    let server = state.server(port).ok_or_else(|| CmdError::no_server(port))?;
    if !server.is_owner() {
        return Err(CmdError::new(
            format!("cannot drain port {port}: it is served by the process this one was forked from"),
            &["SOCKETSERVER", "NOTOWNER", &port.to_string()],
        ));
    }
    let failed = |e| posix(&format!("socketserver on port {port}"), e);
    if let Some(on) = on {
        server.drain(on).map_err(failed)?;
    }
    let snap = server.snapshot().map_err(failed)?;
    Ok(Obj::int(snap.agent.draining.into()))
}

/// `park channel`: hands the connection under `channel` back to the dispatcher, to be parked
/// until its client sends more, and closes the channel (1); or refuses (0) and leaves it as it
/// was, because Tcl has already read input ahead into it, which the dispatcher could not give
/// the next worker. Output is flushed first, so no byte the worker wrote is lost.
fn park(state: std::cell::RefMut<InterpState>, name: &str) -> CmdResult<Obj> {
    let not_ours = || {
        CmdError::new(
            format!("channel \"{name}\" is not a connection of a socketserver this process serves"),
            &["SOCKETSERVER", "PARK", "NOTOURS"],
        )
    };
    let interp = state.interp;
    let conn = ffi::TcpChannel::find(interp, name)?.ok_or_else(not_ours)?;
    let port = crate::fdpass::local_addr(conn.fd()).map_err(|_| not_ours())?.port();
    let slot = state.slots.get(&port).ok_or_else(not_ours)?;
    if conn.is_stacked() {
        return Err(CmdError::new(
            format!("channel \"{name}\" has a transformation stacked on it"),
            &["SOCKETSERVER", "PARK", "STACKED"],
        ));
    }
    if conn.is_shared() {
        // Closing it here would leave it open in the other interp, a second reader of the
        // connection the dispatcher now holds.
        return Err(CmdError::new(
            format!("channel \"{name}\" is shared with another interpreter"),
            &["SOCKETSERVER", "PARK", "SHARED"],
        ));
    }
    if conn.has_buffered_input() {
        return Ok(Obj::int(0));
    }
    // No record: a channel made otherwise over one of our connections (moved in from another
    // thread, say).
    let peer = conn
        .delivered_peer()
        .or_else(|| crate::fdpass::peer_addr(conn.fd()).ok())
        .unwrap_or(crate::wire::UNKNOWN_PEER);
    let was_blocking = conn.is_blocking();
    // Blocking, so that the flush writes everything, a non-blocking channel's background flush
    // included (else Tcl would close the channel only once that is done, writing on meanwhile
    // from here); the connection then also travels blocking, as an accepted one does.
    let handed_back = conn
        .set_blocking(true)
        .and_then(|()| conn.flush())
        .and_then(|()| slot.link.hand_back(conn.fd(), &peer));
    if let Err(err) = handed_back {
        let _ = conn.set_blocking(was_blocking);
        return Err(posix(&format!("couldn't park channel \"{name}\""), err));
    }
    // Closing runs close handlers: no borrow may be held by then.
    drop(state);
    conn.close(interp);
    Ok(Obj::int(1))
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
    let server = state.server(port);
    let slot = state.slots.get(&port);
    if server.is_none() && slot.is_none_or(|slot| slot.path.is_none()) {
        return Err(CmdError::no_server(port));
    }
    let owner = server.filter(|server| server.is_owner());
    // A forked worker's copy of the server knows the path too.
    let path = server.and_then(|server| server.config.path.clone()).or_else(|| slot.and_then(|slot| slot.path.clone()));
    let mut dict: Vec<(&str, Obj)> = vec![
        ("port", Obj::int(port.into())),
        ("role", Obj::string(if owner.is_some() { "server" } else { "worker" })),
        ("path", Obj::string(&path.map_or_else(String::new, |p| p.display().to_string()))),
        ("received", Obj::int(slot.map_or(0, |s| s.received) as i64)),
        ("wakeups", Obj::int(slot.map_or(0, |s| s.wakeups) as i64)),
        ("armed", Obj::int(slot.is_some_and(|s| s.link.is_armed()).into())),
    ];
    if let Some(server) = owner {
        let snap = server.snapshot().map_err(|e| posix(&format!("socketserver on port {port}"), e))?;
        dict.extend([
            ("address", Obj::string(&server.address.ip().to_string())),
            ("backlog", Obj::int(server.config.backlog.into())),
            ("queue", Obj::int(server.config.queue_limit as i64)),
            ("wait", Obj::string(server.config.wait.name())),
            ("maxparked", Obj::int(server.config.max_parked.unwrap_or(0) as i64)),
            ("parked", Obj::int(snap.parked as i64)),
            ("parkedtotal", Obj::int(snap.park.parked_total as i64)),
            ("handedback", Obj::int(snap.park.handed_back as i64)),
            ("closedidle", Obj::int(snap.park.closed_idle as i64)),
            ("closedheader", Obj::int(snap.park.closed_header as i64)),
            ("closedpeer", Obj::int(snap.park.closed_peer as i64)),
            ("evicted", Obj::int(snap.park.evicted as i64)),
            ("agentport", Obj::int(snap.agent.port.into())),
            ("draining", Obj::int(snap.agent.draining.into())),
            ("agentanswers", Obj::int(snap.agent.answers as i64)),
            ("agentdrains", Obj::int(snap.agent.drains as i64)),
            ("proxy", Obj::string(server.config.proxy.name())),
            ("proxyfrom", Obj::list(server.config.proxy_from.iter().map(|c| Obj::string(&c.to_string())))),
            ("proxied", Obj::int(snap.park.proxied as i64)),
            ("proxyrejected", Obj::int(snap.park.proxy_rejected as i64)),
            ("maxworkers", Obj::int(snap.max_workers.into())),
            ("refused", Obj::int(snap.refused as i64)),
            ("denied", Obj::int(snap.denied as i64)),
            ("dropped", Obj::int(snap.dropped as i64)),
            ("accepted", Obj::int(snap.accepted as i64)),
            ("delivered", Obj::int(snap.delivered as i64)),
            ("queued", Obj::int(snap.queued.into())),
            ("ready", Obj::int(snap.ready.into())),
            ("workers", Obj::list(snap.workers.iter().map(|w| Obj::int(w.pid.into())))),
            ("status", Obj::list(snap.workers.iter().flat_map(|w| {
                let status = [
                    Obj::string("state"), Obj::string(w.state.name()),
                    Obj::string("delivered"), Obj::int(w.delivered as i64),
                    Obj::string("busy_ms"), Obj::int(w.busy_ms as i64),
                ];
                [Obj::int(w.pid.into()), Obj::list(status)]
            }))),
        ]);
    }
    Ok(Obj::list(dict.into_iter().flat_map(|(k, v)| [Obj::string(k), v])))
}

/// The file handler of a slot: takes the connection, disarms, and calls the handler.
unsafe extern "C" fn on_readable(data: ClientData, _mask: c_int) {
    // SAFETY: data is the slot's HandlerTarget, valid while the handler is registered.
    let target = unsafe { &*(data as *const HandlerTarget) };
    // SAFETY: the state outlives every handler: dropping it deletes them all first.
    let cell = unsafe { &*target.state };
    let port = target.port;
    ffi::guard_callback(target.interp, || deliver(cell, port));
}

fn deliver(cell: &StateCell, port: u16) {
    let (interp, handler, delivery) = {
        let mut state = cell.borrow_mut();
        state.forget_inherited_links();
        let interp = state.interp;
        if ffi::interp_deleted(interp) {
            // Closing the link makes the dispatcher give the connection to another worker.
            return state.remove_slot(port);
        }
        let Some(slot) = state.slots.get_mut(&port) else { return };
        slot.wakeups += 1;
        match slot.link.receive() {
            Ok(Some(delivery)) => {
                slot.received += 1;
                (interp, slot.handler.take(), delivery)
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => {
                // The connection came, but this process had no fd for it, so the kernel closed
                // it. Say so, and ask for the next one with the same handler, but only once
                // there is an fd for it: asking now would drop the next one too.
                schedule_retry(slot);
                drop(state);
                if !ffi::interp_deleted(interp) {
                    let prefix = format!("socketserver on port {port}: a connection was dropped");
                    ffi::background_error(interp, posix(&prefix, err));
                }
                return;
            }
            // The server has closed: armed workers are simply never called; -onclose is.
            _ => return server_closed(state, port),
        }
    };
    // No borrow is held from here on: the handler may call any of our commands.
    if ffi::interp_deleted(interp) {
        return;
    }
    // The dispatcher sends only to an armed worker, so there is always a handler.
    let Some(handler) = handler else { return };
    let Some(chan) = ffi::register_socket_channel(interp, delivery.fd, delivery.peer) else { return };
    let args = [
        Obj::string(&chan),
        Obj::string(&delivery.peer.ip().to_string()),
        Obj::int(delivery.peer.port().into()),
    ];
    ffi::call_in_background(interp, &handler, &args);
}

fn schedule_retry(slot: &mut Slot) {
    if slot.retry.is_none() {
        let data = &*slot._target as *const HandlerTarget as ClientData;
        // SAFETY: the target lives in the slot, whose removal deletes this timer first.
        slot.retry = Some(unsafe { ffi::create_timer(FD_RETRY_MS, arm_when_an_fd_is_free, data) });
    }
}

/// The retry timer of a slot whose connection was dropped for lack of fds.
unsafe extern "C" fn arm_when_an_fd_is_free(data: ClientData) {
    // SAFETY: data is the slot's HandlerTarget, valid while the timer is pending.
    let target = unsafe { &*(data as *const HandlerTarget) };
    // SAFETY: the state outlives every timer: dropping it deletes them all first.
    let cell = unsafe { &*target.state };
    let port = target.port;
    ffi::guard_callback(target.interp, || {
        let mut state = cell.borrow_mut();
        // A forked child's copy of the timer must not arm the parent's link.
        state.forget_inherited_links();
        let deleted = ffi::interp_deleted(state.interp);
        let Some(slot) = state.slots.get_mut(&port) else { return };
        slot.retry = None;
        if deleted {
            return state.remove_slot(port);
        }
        if slot.link.is_armed() || slot.handler.is_none() {
            return; // armed again by `client` meanwhile, or never to be
        }
        if !slot.link.has_free_fd() {
            return schedule_retry(slot);
        }
        if slot.link.arm().is_err() {
            server_closed(state, port);
        }
    });
}

/// The server of a slot has closed: forgets the slot and calls its `-onclose` command.
fn server_closed(mut state: std::cell::RefMut<InterpState>, port: u16) {
    let interp = state.interp;
    let on_close = state.slots.get_mut(&port).and_then(|slot| slot.on_close.take());
    state.remove_slot(port);
    drop(state);
    if let Some(on_close) = on_close.filter(|_| !ffi::interp_deleted(interp)) {
        ffi::call_in_background(interp, &on_close, &[]);
    }
}

/// `::socketserver::fork`
pub fn fork_command(cell: &StateCell, words: &[String]) -> CmdResult<Obj> {
    if words.len() != 1 {
        return Err(CmdError::WrongArgs { words: 1, usage: "" });
    }
    let pid = process::fork()?;
    if pid == 0 {
        // At once, not at the child's first command: until then its copies would hold the
        // parent's links open (hiding the parent's death from the dispatcher).
        cell.borrow_mut().forget_inherited_links();
    }
    Ok(Obj::int(pid.into()))
}

/// `::socketserver::wait ?-nohang? ?pid?`
pub fn wait_command(words: &[String]) -> CmdResult<Obj> {
    let wrong = CmdError::WrongArgs { words: 1, usage: "?-nohang? ?pid?" };
    // A pid is never negative, so a word starting with "-" is an option.
    let (nohang, rest) = match words.get(1) {
        Some(word) if word.starts_with('-') => {
            args::lookup(word, &["-nohang"], "option")?;
            (true, &words[2..])
        }
        _ => (false, &words[1..]),
    };
    let pid = match rest {
        [] => None,
        [pid] => Some(parse_pid(pid)?),
        _ => return Err(wrong),
    };
    Ok(match process::wait(pid, nohang)? {
        Some(ended) => Obj::list([Obj::int(ended.pid.into()), Obj::string(ended.how), Obj::string(&ended.detail)]),
        None => Obj::string(""),
    })
}

fn parse_pid(word: &str) -> CmdResult<i32> {
    match word.parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(CmdError::new(format!("expected process id but got \"{word}\""), &["TCL", "VALUE", "PID"])),
    }
}

/// `::socketserver::kill ?signal? pid`
pub fn kill_command(words: &[String]) -> CmdResult<Obj> {
    let (signal, pid) = match &words[1..] {
        [pid] => (Signal::SIGTERM, pid),
        [signal, pid] => (process::parse_signal(signal)?, pid),
        _ => return Err(CmdError::WrongArgs { words: 1, usage: "?signal? pid" }),
    };
    process::kill(parse_pid(pid)?, signal)?;
    Ok(Obj::string(""))
}

thread_local! {
    /// The interps of this thread that trap signals, and their states. The self-pipe is watched
    /// (by one file handler per thread) while there is any; a signal runs each one's trap of it.
    static TRAPPERS: RefCell<Vec<(*mut Tcl_Interp, *const StateCell)>> = const { RefCell::new(Vec::new()) };
}

fn start_trapping(cell: &StateCell, interp: *mut Tcl_Interp, pipe: std::os::fd::RawFd) {
    TRAPPERS.with(|trappers| {
        let mut trappers = trappers.borrow_mut();
        if trappers.iter().any(|(i, _)| *i == interp) {
            return;
        }
        if trappers.is_empty() {
            // SAFETY: the handler reads only TRAPPERS, whose entries leave with their states.
            unsafe { ffi::create_file_handler(pipe, on_signal_pipe, std::ptr::null_mut()) };
        }
        trappers.push((interp, cell));
    });
}

/// Takes `interp` out of [`TRAPPERS`] (its traps are gone, or it is): after this, its state is
/// never reached from a signal.
fn stop_trapping(interp: *mut Tcl_Interp) {
    let _ = TRAPPERS.try_with(|trappers| {
        let mut trappers = trappers.borrow_mut();
        let before = trappers.len();
        trappers.retain(|(i, _)| *i != interp);
        if before > 0 && trappers.is_empty() {
            if let Ok(pipe) = process::trap_pipe() {
                ffi::delete_file_handler(pipe);
            }
        }
    });
}

/// `::socketserver::trap signal ?script?` — with an empty script, the signal does again what it
/// did before it was first trapped.
pub fn trap_command(cell: &StateCell, objv: &[Obj], words: &[String]) -> CmdResult<Obj> {
    let (signal, script) = match objv.len() {
        2 => (process::parse_signal(&words[1])?, None),
        3 => (process::parse_signal(&words[1])?, Some(objv[2].clone())),
        _ => return Err(CmdError::WrongArgs { words: 1, usage: "signal ?script?" }),
    };
    let mut state = cell.borrow_mut();
    let Some(script) = script else {
        return Ok(state.traps.get(&signal).cloned().unwrap_or_else(|| Obj::string("")));
    };
    let pipe = process::trap_pipe()?;
    if script.to_string_lossy().is_empty() {
        if state.traps.contains_key(&signal) {
            process::untrap(signal)?;
            state.traps.remove(&signal);
        }
        if state.traps.is_empty() {
            stop_trapping(state.interp);
        }
    } else {
        if !state.traps.contains_key(&signal) {
            process::trap(signal)?;
        }
        state.traps.insert(signal, script);
        start_trapping(cell, state.interp, pipe);
    }
    Ok(Obj::string(""))
}

/// The self-pipe's file handler: reads one signal and runs the trap of every interp of this
/// thread that traps it (the next signal is the next call's: see `process::next_signal`).
unsafe extern "C" fn on_signal_pipe(_data: ClientData, _mask: c_int) {
    let Ok(pipe) = process::trap_pipe() else { return };
    // try_with: never a panic here, where nothing would catch it (TRAPPERS is gone only while
    // the thread exits).
    let listed = TRAPPERS.try_with(|trappers| trappers.borrow().clone()).unwrap_or_default();
    let Some(signal) = process::next_signal(pipe) else { return };
    // Every interp that traps now is held while the signal's traps run: a trap script that
    // deletes an interp (its own or another's) leaves it deleted but not freed, with its state,
    // until the end; and an interp created meanwhile (even at a freed one's address) is not in
    // this list, so it hears only signals that arrive after it trapped them.
    let held: Vec<(ffi::PreservedInterp, *const StateCell)> = listed
        .into_iter()
        // SAFETY: a listed interp is live: its state's Drop unlists it before the interp is freed.
        .map(|(interp, cell)| (unsafe { ffi::PreservedInterp::new(interp) }, cell))
        .collect();
    for (held, cell) in &held {
        let interp = held.interp();
        if ffi::interp_deleted(interp) {
            continue;
        }
        // SAFETY: the interp is preserved, so its assoc data (this state) is not freed yet.
        let cell = unsafe { &**cell };
        ffi::guard_callback(interp, || {
            let script = cell.borrow().traps.get(&signal).cloned();
            if let Some(script) = script {
                ffi::call_in_background(interp, &script, &[]);
            }
        });
    }
}

/// `::socketserver::onclose channel script`
pub fn onclose_command(cell: &StateCell, objv: &[Obj], words: &[String]) -> CmdResult<Obj> {
    if objv.len() != 3 {
        return Err(CmdError::WrongArgs { words: 1, usage: "channel script" });
    }
    let interp = cell.borrow().interp;
    ffi::run_when_closed(interp, &words[1], objv[2].clone())?;
    Ok(Obj::string(""))
}

/// `::socketserver::notifier ?poll|tcl?` — which notifier this process uses; `poll` switches to
/// socketserver's (see `notifier.rs`). There is no way back: the handlers now live in it.
pub fn notifier_command(cell: &StateCell, words: &[String]) -> CmdResult<Obj> {
    const NOTIFIERS: [&str; 2] = ["poll", "tcl"];
    let interp = cell.borrow().interp;
    let wanted = match &words[1..] {
        [] => None,
        [name] => Some(NOTIFIERS[args::lookup(name, &NOTIFIERS, "notifier")?]),
        _ => return Err(CmdError::WrongArgs { words: 1, usage: "?poll|tcl?" }),
    };
    match wanted {
        Some("poll") => ffi::install_poll_notifier(interp)?,
        Some(_) if ffi::poll_notifier_installed() => {
            return Err(CmdError::new(
                "cannot go back to Tcl's notifier once the poll notifier is installed",
                &["SOCKETSERVER", "NOTIFIER"],
            ));
        }
        _ => {}
    }
    Ok(Obj::string(if ffi::poll_notifier_installed() { "poll" } else { "tcl" }))
}
