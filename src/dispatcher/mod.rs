//! The serving side: a listener, and a thread that accepts only when a worker can take the
//! connection and hands each one to the longest-waiting ready worker.
//!
//! Nothing is lost if a worker dies before taking its connection: the connection waits in the
//! worker's mailbox socket, and the dispatcher holds a reference to the worker's end of that
//! mailbox too, so the queued message outlives the worker; when the worker's link closes, the
//! dispatcher reads back whatever is still queued and sends it to another worker. So the
//! dispatcher closes its copy of a connection as soon as it is sent, needs no acknowledgement,
//! and wakes up once per connection (to accept it) when other workers are ready.
//!
//! The thread shares nothing with the Tcl thread but sockets: requests (`info`, `close`) arrive
//! on a control socket. So a child forked at any moment finds no lock held by this thread; and
//! every fd the thread owns is a [`ParentOnlyFd`](crate::fork_safety::ParentOnlyFd), which forked
//! children close.
//!
//! Each worker costs the serving process [`FDS_PER_WORKER`] fds (its link, its mailbox, and the
//! worker's end of the mailbox), so the number of workers is capped (see [`default_max_workers`]);
//! a worker over the cap, or one that comes when the process is out of fds, is refused with a
//! reason it can report.
//!
//! With `-wait data|head`, and for every connection a worker hands back, the dispatcher holds
//! ("parks") the connection in its epoll set until there is something for a worker to do, so
//! that idle and slow clients cost no worker (see `parked`).
//!
//! Modules: `event_loop` (the thread), `workers` (the registry), `ready_queue`, `parked` (parked
//! connections and their timers), `control` (the Tcl thread's requests and the snapshot), `agent`
//! (HAProxy's agent check and the drain state), `pending` (the named registration socket, `-path`,
//! and the connections on it that have not sent their registration yet).

mod agent;
mod control;
mod event_loop;
#[cfg(test)]
mod hostile;
#[cfg(test)]
mod named_tests;
#[cfg(test)]
mod park_tests;
mod parked;
mod pending;
mod proxied;
mod ready_queue;
mod workers;

pub use control::Snapshot;
pub use parked::Wait;

use crate::fdpass::{self, Received};
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use control::Request;
use std::cell::Cell;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the Tcl thread waits for the dispatcher to answer a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The fds a registered worker holds open in the serving process.
pub const FDS_PER_WORKER: usize = 3;

/// The default worker limit: a quarter of the soft limit on open files (RLIMIT_NOFILE), so that
/// workers take at most three quarters of the fds and the rest is left for connections and
/// everything else. At least 1.
pub fn default_max_workers() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    (soft / 4).clamp(1, u32::MAX as u64) as usize
}

/// The default limit on parked connections: half the soft limit on open files, at least 1.
pub fn default_max_parked() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    (soft / 2).clamp(1, parked::MAX_PARKED as u64) as usize
}

/// What `::socketserver::socket server` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub address: SocketAddr,
    pub backlog: u32,
    /// `-queue`: accepted connections that may wait for a worker (with `-wait none`).
    pub queue_limit: usize,
    /// `-maxworkers`; None: [`default_max_workers`].
    pub max_workers: Option<usize>,
    pub wait: Wait,
    /// `-delimiter`: the end of a head, for `-wait head`.
    pub delimiter: Vec<u8>,
    /// `-headsize`: a head is handed over once this many bytes are buffered.
    pub head_size: usize,
    /// `-idletimeout`, `-headertimeout`; None: never.
    pub idle_timeout: Option<Duration>,
    pub header_timeout: Option<Duration>,
    /// `-maxparked`; None: [`default_max_parked`].
    pub max_parked: Option<usize>,
    /// `-fd`, or the fd `-systemd` names: an inherited listening socket to serve instead of
    /// binding `address` (a duplicate of it, so the fd itself stays open; checked before start
    /// with `fdpass::listening_address`, whose answer `address` then is).
    pub fd: Option<std::os::fd::RawFd>,
    /// `-systemd`: the name of the socket the service manager passed.
    pub systemd: Option<String>,
    /// `-agent`: the port of HAProxy's agent check, on the same address (0: the kernel picks).
    pub agent: Option<u16>,
    /// `-proxy`: the PROXY protocol headers new connections start with.
    pub proxy: crate::proxy::Accept,
    /// `-proxyfrom`: the sources whose headers are believed.
    pub proxy_from: Vec<crate::proxy::Cidr>,
    /// `-path`: the named registration socket, for workers that are not forked children.
    pub path: Option<std::path::PathBuf>,
    /// `-pathmode`: its file mode.
    pub path_mode: u32,
    /// `-allowusers`, `-allowgroups`: who besides the server's own uid may register through it.
    pub permitted: crate::named::Permitted,
}

impl ServerConfig {
    /// The defaults, on `address`.
    pub fn new(address: SocketAddr) -> ServerConfig {
        ServerConfig {
            address,
            backlog: 128,
            queue_limit: 0,
            max_workers: None,
            wait: Wait::None,
            delimiter: b"\r\n\r\n".to_vec(),
            head_size: 16384,
            idle_timeout: Some(Duration::from_secs(60)),
            header_timeout: Some(Duration::from_secs(10)),
            max_parked: None,
            fd: None,
            systemd: None,
            agent: None,
            proxy: crate::proxy::Accept::None,
            proxy_from: crate::proxy::default_trusted(),
            path: None,
            path_mode: crate::named::DEFAULT_MODE,
            permitted: crate::named::Permitted::default(),
        }
    }
}

/// A listening port served by a dispatcher thread, as the Tcl thread that created it sees it.
#[derive(Debug)]
pub struct Server {
    /// The bound address (the port the kernel chose for port 0).
    pub address: SocketAddr,
    /// As asked, with the limits' defaults filled in.
    pub config: ServerConfig,
    /// The end of the registration socket that workers (this process and its forked children)
    /// use to register. Inherited by children on purpose.
    pub registration: OwnedFd,
    /// `-path`'s socket file, removed when the server closes.
    named_path: Option<crate::named::NamedPath>,
    control: ParentOnlyFd,
    thread: Option<JoinHandle<()>>,
    generation: u64,
    last_request: Cell<u64>,
}

impl Server {
    /// Binds and listens at once (or adopts `config.fd`), so every failure is reported here, then
    /// starts the thread.
    pub fn start(mut config: ServerConfig) -> io::Result<Server> {
        crate::fork_safety::install()?;
        config.max_workers = Some(config.max_workers.unwrap_or_else(default_max_workers));
        config.max_parked = Some(config.max_parked.unwrap_or_else(default_max_parked).min(parked::MAX_PARKED));
        // Taken before the section: it may have to wait for another server, and a fork must
        // not wait meanwhile.
        let path_lock = config.path.as_deref().map(crate::named::DirectoryLock::take).transpose()?;
        let section = CreateSection::enter();
        let listener = match config.fd {
            Some(fd) => fdpass::adopt_listener(fd)?,
            None => fdpass::listen(config.address, config.backlog)?,
        };
        let listener = section.adopt(listener)?;
        let (registration, registrar) = fdpass::seqpacket_pair()?;
        let registrar = section.adopt(registrar)?;
        let (control, thread_control) = fdpass::seqpacket_pair()?;
        let control = section.adopt(control)?;
        let thread_control = section.adopt(thread_control)?;
        let (named, named_path) = match &config.path {
            Some(path) => {
                let turn = path_lock.as_ref().expect("taken above for a path");
                let (listener, named_path) = crate::named::listen(path, config.path_mode, config.backlog, turn)?;
                // (Removed again as it drops, if the server does not start.)
                let listener = section.adopt(listener)?;
                (Some(pending::NamedListener::new(listener, config.permitted.clone())), Some(named_path))
            }
            None => (None, None),
        };
        drop(section);
        drop(path_lock);
        let address = fdpass::local_addr(listener.as_fd())?;
        let own_sockets = [fdpass::identity(registration.as_fd()), fdpass::identity(registrar.as_fd())];
        let dispatcher = event_loop::Dispatcher::new(listener, registrar, thread_control, &config, own_sockets, named)?;
        let thread = std::thread::Builder::new()
            .name(format!("socketserver:{}", address.port()))
            .spawn(move || dispatcher.run())?;
        Ok(Server {
            address,
            config,
            registration,
            named_path,
            control,
            thread: Some(thread),
            generation: crate::fork_safety::generation(),
            last_request: Cell::new(0),
        })
    }

    /// Removes `-path`'s socket file now (registrations through it end; serving goes on). A
    /// forked child's copy removes nothing.
    pub fn remove_named_path(&mut self) {
        drop(self.named_path.take());
    }

    /// False in a child forked from the process that started the server.
    pub fn is_owner(&self) -> bool {
        self.generation == crate::fork_safety::generation()
    }

    /// Asks the dispatcher thread for its counters. Only in the owning process. Errors: EPIPE
    /// when the thread has stopped, ETIMEDOUT when it did not answer in time, or the errno of
    /// what kept it from answering (EMFILE, ...).
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        let id = self.last_request.get() + 1;
        self.last_request.set(id);
        let mut buf = vec![0u8; control::MAX_ANSWER];
        // Answers to earlier requests that timed out (their fds close as they drop).
        while let Ok(Received::Message(..)) = fdpass::recv_with_fds(self.control.as_fd(), &mut buf) {}
        self.request(Request::Snapshot(id))?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            fdpass::wait_readable(self.control.as_fd(), deadline.saturating_duration_since(Instant::now()))?;
            match fdpass::recv_with_fds(self.control.as_fd(), &mut buf) {
                Ok(Received::Message(len, mut fds)) => match control::decode_answer(&buf[..len]) {
                    Some((answered, 0, inline)) if answered == id => {
                        let snapshot = match fds.pop() {
                            Some(file) => read_snapshot(file)?,
                            None => inline.to_vec(),
                        };
                        return Snapshot::decode(&snapshot)
                            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed snapshot"));
                    }
                    Some((answered, errno, _)) if answered == id => return Err(io::Error::from_raw_os_error(errno)),
                    _ => {} // a late answer to an earlier request
                },
                Ok(Received::Empty) => {}
                Ok(Received::Closed) => return Err(stopped()),
                Err(err) => return Err(err),
            }
        }
    }
}

impl Server {
    /// Sets the drain state (the agent answers `drain` while it is on). Only in the owning
    /// process. The dispatcher reads requests in order, so a snapshot asked for after this
    /// returns sees it.
    pub fn drain(&self, on: bool) -> io::Result<()> {
        self.request(Request::Drain(on))
    }

    fn request(&self, request: Request) -> io::Result<()> {
        fdpass::send_message(self.control.as_fd(), &control::encode_request(request)).map_err(|err| {
            match err.raw_os_error() {
                Some(libc::EPIPE | libc::ECONNRESET) => stopped(),
                _ => err,
            }
        })
    }
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the dispatcher thread has stopped")
}

/// Reads the snapshot the dispatcher wrote into a memfd.
fn read_snapshot(fd: OwnedFd) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    // The dispatcher's copy of the file shared its offset: read from the start.
    std::io::Seek::rewind(&mut file)?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

impl Drop for Server {
    /// In the owning process: stops the thread, which closes the listener and every connection
    /// not yet handed over. In a forked child the thread does not exist and the fork handler has
    /// already closed the parent-only fds, so there is nothing to stop.
    fn drop(&mut self) {
        if !self.is_owner() {
            // The handle names a thread of the parent: detaching it here would be wrong.
            std::mem::forget(self.thread.take());
            return;
        }
        // The path goes first: a worker finds no path rather than one nobody answers.
        drop(self.named_path.take());
        // A send error means the thread has already ended; joining is then immediate.
        let _ = fdpass::send_message(self.control.as_fd(), &control::encode_request(Request::Stop));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::control::{WorkerState, WorkerStatus};
    use super::*;
    use crate::fdpass::wait_readable;
    use crate::worker::{Delivery, WorkerLink};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn start(queue: usize) -> Server {
        Server::start(ServerConfig { backlog: 16, queue_limit: queue, ..ServerConfig::new("127.0.0.1:0".parse().unwrap()) }).unwrap()
    }

    /// Polls the dispatcher's counters until `cond` holds (a bound against a hang: 10 s).
    pub(super) fn wait_for(server: &Server, what: &str, cond: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = server.snapshot().unwrap();
            if cond(&snap) {
                return snap;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {snap:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A worker registered with `server` and armed, once the dispatcher knows it is ready.
    pub(super) fn ready_worker(server: &Server) -> WorkerLink {
        let mut link = WorkerLink::register(server.registration.as_fd()).unwrap();
        link.arm().unwrap();
        wait_for(server, "ready", |s| s.ready == 1);
        link
    }

    pub(super) fn receive(link: &mut WorkerLink) -> Delivery {
        wait_readable(link.as_fd(), Duration::from_secs(5)).expect("a delivery in time");
        link.receive().unwrap().expect("a connection")
    }

    #[test]
    fn a_ready_worker_gets_the_connection_and_its_peer() {
        let server = start(0);
        let mut link = ready_worker(&server);
        let mut client = TcpStream::connect(server.address).unwrap();
        let delivery = receive(&mut link);
        assert_eq!(delivery.peer, client.local_addr().unwrap());
        let mut conn = TcpStream::from(delivery.fd);
        conn.write_all(b"pong").unwrap();
        drop(conn);
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "pong", "closing the worker's copy closes the connection");
        let snap = wait_for(&server, "delivery", |s| s.delivered == 1);
        assert_eq!((snap.accepted, snap.queued, snap.ready), (1, 0, 0));
        let me = WorkerStatus { pid: std::process::id() as i32, state: WorkerState::Busy, delivered: 1, busy_ms: snap.workers[0].busy_ms };
        assert_eq!(snap.workers, vec![me]);
        link.arm().unwrap();
        let snap = wait_for(&server, "ready again", |s| s.ready == 1);
        assert_eq!(snap.workers[0].state, WorkerState::Ready);
    }

    #[test]
    fn nothing_is_accepted_until_a_worker_is_ready() {
        let server = start(0);
        let clients: Vec<_> = (0..3).map(|_| TcpStream::connect(server.address).unwrap()).collect();
        let mut link = WorkerLink::register(server.registration.as_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(server.snapshot().unwrap().accepted, 0);
        for client in &clients {
            link.arm().unwrap();
            assert_eq!(receive(&mut link).peer, client.local_addr().unwrap(), "in arrival order");
        }
        assert_eq!(server.snapshot().unwrap().accepted, 3);
    }

    #[test]
    fn the_queue_limit_bounds_what_is_accepted_ahead() {
        let server = start(2);
        let _clients: Vec<_> = (0..4).map(|_| TcpStream::connect(server.address).unwrap()).collect();
        let snap = wait_for(&server, "two queued", |s| s.queued == 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(server.snapshot().unwrap().accepted, 2, "{snap:?}");
    }

    #[test]
    fn ready_workers_are_served_first_come_first_served() {
        let server = start(0);
        let mut first = WorkerLink::register(server.registration.as_fd()).unwrap();
        let mut second = WorkerLink::register(server.registration.as_fd()).unwrap();
        second.arm().unwrap();
        wait_for(&server, "second ready", |s| s.ready == 1);
        first.arm().unwrap();
        wait_for(&server, "both ready", |s| s.ready == 2);
        let a = TcpStream::connect(server.address).unwrap();
        assert_eq!(receive(&mut second).peer, a.local_addr().unwrap());
        let b = TcpStream::connect(server.address).unwrap();
        assert_eq!(receive(&mut first).peer, b.local_addr().unwrap());
    }

    #[test]
    fn a_connection_sent_to_a_worker_that_dies_goes_to_the_next() {
        let server = start(0);
        let mut doomed = WorkerLink::register(server.registration.as_fd()).unwrap();
        doomed.arm().unwrap();
        wait_for(&server, "doomed ready", |s| s.ready == 1);
        let mut client = TcpStream::connect(server.address).unwrap();
        wait_readable(doomed.as_fd(), Duration::from_secs(5)).unwrap();
        drop(doomed); // dies with the connection still in its mailbox
        let mut survivor = WorkerLink::register(server.registration.as_fd()).unwrap();
        survivor.arm().unwrap();
        let delivery = receive(&mut survivor);
        assert_eq!(delivery.peer, client.local_addr().unwrap());
        TcpStream::from(delivery.fd).write_all(b"saved").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "saved");
        let snap = wait_for(&server, "one worker", |s| s.workers.len() == 1);
        assert_eq!((snap.accepted, snap.delivered), (1, 1));
    }

    #[test]
    fn a_connection_taken_by_a_worker_that_dies_is_not_sent_again() {
        let server = start(0);
        let mut doomed = WorkerLink::register(server.registration.as_fd()).unwrap();
        doomed.arm().unwrap();
        let mut other = WorkerLink::register(server.registration.as_fd()).unwrap();
        wait_for(&server, "doomed ready", |s| s.ready == 1);
        let mut client = TcpStream::connect(server.address).unwrap();
        let taken = receive(&mut doomed);
        drop(doomed);
        other.arm().unwrap();
        wait_for(&server, "one worker, ready", |s| s.workers.len() == 1 && s.ready == 1);
        drop(taken); // the dead worker's connection ends here, and only here
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(matches!(other.receive(), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn readys_read_together_queue_in_the_order_they_were_sent() {
        let server = start(0);
        // Slots in the order a, b, c; asking in the order c, b, a.
        let mut links: Vec<_> = (0..3).map(|_| WorkerLink::register(server.registration.as_fd()).unwrap()).collect();
        wait_for(&server, "three workers", |s| s.workers.len() == 3);
        links[2].arm().unwrap();
        wait_for(&server, "c ready", |s| s.ready == 1);
        // With c ready, the dispatcher does not wait for these: it reads both at once later.
        links[1].arm().unwrap();
        links[0].arm().unwrap();
        for expected in [2, 1, 0] {
            let client = TcpStream::connect(server.address).unwrap();
            assert_eq!(receive(&mut links[expected]).peer, client.local_addr().unwrap());
        }
    }

    #[test]
    fn a_worker_that_takes_its_connection_and_leaves_is_counted() {
        let server = start(0);
        let mut link = ready_worker(&server);
        let _client = TcpStream::connect(server.address).unwrap();
        let _taken = receive(&mut link);
        drop(link);
        let snap = wait_for(&server, "the worker gone", |s| s.workers.is_empty());
        assert_eq!((snap.accepted, snap.delivered), (1, 1));
    }

    fn ask_agent(server: &Server) -> String {
        let port = server.snapshot().unwrap().agent.port;
        let mut line = String::new();
        TcpStream::connect(("127.0.0.1", port)).unwrap().read_to_string(&mut line).unwrap();
        line
    }

    #[test]
    fn the_agent_answers_the_ready_share_and_drain_while_draining() {
        let config = ServerConfig { agent: Some(0), ..ServerConfig::new("127.0.0.1:0".parse().unwrap()) };
        let server = Server::start(config).unwrap();
        assert_eq!(ask_agent(&server), "down\n", "no worker yet");
        let mut ready = ready_worker(&server);
        let _idle = WorkerLink::register(server.registration.as_fd()).unwrap();
        wait_for(&server, "two workers", |s| s.workers.len() == 2);
        assert_eq!(ask_agent(&server), "up ready 50%\n");
        let _client = TcpStream::connect(server.address).unwrap();
        let _taken = receive(&mut ready);
        assert_eq!(ask_agent(&server), "up ready 1%\n", "both busy or idle: at least 1%");
        server.drain(true).unwrap();
        assert_eq!(ask_agent(&server), "drain\n");
        server.drain(false).unwrap();
        ready.arm().unwrap();
        // The READY is read when the agent asks, not waited for.
        assert_eq!(ask_agent(&server), "up ready 50%\n");
        let agent = server.snapshot().unwrap().agent;
        assert_eq!((agent.answers, agent.drains, agent.draining), (5, 1, false));
    }

    #[test]
    fn without_agent_there_is_no_agent_port_but_drain_is_kept() {
        let server = start(0);
        server.drain(true).unwrap();
        let agent = server.snapshot().unwrap().agent;
        assert_eq!((agent.port, agent.draining, agent.answers), (0, true, 0));
    }

    #[test]
    fn dropping_the_server_frees_the_port_and_tells_workers() {
        let server = start(0);
        let address = server.address;
        let mut link = ready_worker(&server);
        drop(server);
        let again = Server::start(ServerConfig::new(address)).expect("the port is free again at once");
        assert_eq!(again.address, address);
        wait_readable(link.as_fd(), Duration::from_secs(5)).unwrap();
        assert!(link.receive().unwrap().is_none(), "the worker sees the server close");
    }
}
