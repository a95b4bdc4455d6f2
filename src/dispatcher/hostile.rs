//! Tests with hostile and broken peers: the worker limit, registrations that lie, junk in a
//! dead worker's mailbox, a seeded flood of malformed messages, and 3000 workers.
//!
//! The tests that count this process's fds or time the dispatcher thread's CPU run in a process
//! of their own (the test binary started again for that one test), so that other tests running
//! in parallel threads cannot disturb the counts.

use super::control::WorkerState;
use super::tests::{receive, wait_for};
use super::*;
use crate::fdpass::wait_readable;
use crate::wire::tests::Prng;
use crate::wire::{self, Refusal, MAX_MESSAGE};
use crate::worker::{RegisterError, WorkerLink};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::{Command, Stdio};

const SECOND: Duration = Duration::from_secs(1);

fn start(max_workers: Option<usize>) -> Server {
    Server::start(ServerConfig { backlog: 64, max_workers, ..ServerConfig::new("127.0.0.1:0".parse().unwrap()) }).unwrap()
}


/// Runs the calling test (`name`, its function's name, in `module`, the caller's
/// `module_path!()`) in a process of its own: false there (run the body), true in the parent
/// once the child has passed.
pub(super) fn in_own_process(module: &str, name: &str) -> bool {
    let module = module.split_once("::").expect("crate::module").1;
    let test = format!("{module}::{name}");
    if std::env::var("SOCKETSERVER_OWN_PROCESS").as_deref() == Ok(test.as_str()) {
        return false;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env("SOCKETSERVER_OWN_PROCESS", &test)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + 120 * SECOND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{test} failed in its own process: {status}");
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill(); // by pid: our own child
            let _ = child.wait();
            panic!("{test} did not finish in its own process in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// This process's resident set size in KiB (VmRSS).
pub(super) fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time (clock ticks) used so far by this process's dispatcher thread.
pub(super) fn dispatcher_cpu_ticks(server: &Server) -> u64 {
    // Answered: the thread runs, so it has named itself.
    server.snapshot().unwrap();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.starts_with("socketserver:") {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            return fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        }
    }
    panic!("no dispatcher thread");
}

/// A registration message made by hand, with whatever fds; waits (bounded) for room.
fn send_registration(server: &Server, payload: &[u8], fds: &[BorrowedFd]) {
    let deadline = Instant::now() + 5 * SECOND;
    while let Err(err) = fdpass::send_with_fds(server.registration.as_fd(), payload, fds) {
        assert!(err.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline, "{err}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The dispatcher's answer on a hand-made link: None if it closed the link unanswered.
pub(super) fn answer(link: &OwnedFd) -> Option<wire::Answer> {
    wait_readable(link.as_fd(), 5 * SECOND).expect("an answer or the link closed, in time");
    let mut buf = [0u8; MAX_MESSAGE];
    match fdpass::recv_with_fds(link.as_fd(), &mut buf).unwrap() {
        Received::Message(len, _) => Some(wire::decode_answer(&buf[..len]).expect("a well-formed answer")),
        _ => None,
    }
}

/// A registration of this protocol's version, claiming `pid`.
pub(super) fn registration(pid: i32) -> [u8; 6] {
    wire::encode_registration(wire::Registration { version: wire::VERSION, pid })
}

/// A worker registered by hand, keeping what an honest worker would give away: its copy of
/// the dispatcher's end of the mailbox, with which it can put anything in its own mailbox.
struct Rogue {
    link: OwnedFd,
    _mailbox: OwnedFd,
    dispatcher_mailbox: OwnedFd,
}

impl Rogue {
    fn register(server: &Server) -> Rogue {
        let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
        let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
        let fds = [dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()];
        send_registration(server, &registration(std::process::id() as i32), &fds);
        drop(dispatcher_link);
        assert!(matches!(answer(&link), Some(wire::Answer::Accepted { .. })));
        Rogue { link, _mailbox: mailbox, dispatcher_mailbox }
    }

    fn arm(&self) {
        fdpass::send_message(self.link.as_fd(), &wire::encode_ready(fdpass::monotonic_ns())).unwrap();
    }
}

pub(super) fn tcp_pair(server_for_listen: &Server) -> (TcpStream, OwnedFd) {
    // Any TCP connection will do: the server's own listener is not ours to accept from.
    let _ = server_for_listen;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (conn, _) = listener.accept().unwrap();
    (client, OwnedFd::from(conn))
}

/// The honest worker answers a real client.
pub(super) fn serves(server: &Server, link: &mut WorkerLink) {
    link.arm().unwrap();
    let mut client = TcpStream::connect(server.address).unwrap();
    answers(link, &mut client);
}

/// The worker gets `client`'s connection, with its address, and what it writes reaches it.
fn answers(link: &mut WorkerLink, client: &mut TcpStream) {
    client.set_read_timeout(Some(5 * SECOND)).unwrap();
    let delivery = receive(link);
    assert_eq!(delivery.peer, client.local_addr().unwrap());
    TcpStream::from(delivery.fd).write_all(b"served").unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "served");
}

#[test]
fn a_worker_over_the_limit_is_refused_and_told_the_limit() {
    let server = start(Some(2));
    let first = WorkerLink::register(server.registration.as_fd()).unwrap();
    let _second = WorkerLink::register(server.registration.as_fd()).unwrap();
    match WorkerLink::register(server.registration.as_fd()) {
        Err(RegisterError::Refused(Refusal::WorkerLimit(2))) => {}
        other => panic!("expected a refusal at the limit, got {other:?}"),
    }
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.workers.len(), snap.refused, snap.max_workers), (2, 1, 2));
    drop(first);
    wait_for(&server, "room again", |s| s.workers.len() == 1);
    let mut third = WorkerLink::register(server.registration.as_fd()).expect("room once one has gone");
    serves(&server, &mut third);
}

#[test]
fn the_default_limit_is_a_quarter_of_the_open_files_limit() {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    assert_eq!(default_max_workers() as u64, (soft / 4).max(1));
    assert_eq!(start(None).snapshot().unwrap().max_workers as u64, (soft / 4).max(1));
}

#[test]
fn a_registration_whose_mailbox_peer_is_another_socket_is_refused() {
    let server = start(None);
    let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
    let (_mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
    let (impostor, _other) = fdpass::seqpacket_pair().unwrap();
    let me = std::process::id() as i32;
    send_registration(&server, &registration(me), &[dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), impostor.as_fd()]);
    drop(dispatcher_link);
    assert_eq!(answer(&link), Some(wire::Answer::Refused(Refusal::Invalid)));
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.workers.len(), snap.refused), (0, 1));
}

#[test]
fn a_registration_that_gives_another_pid_is_refused() {
    let server = start(None);
    let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
    let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
    let me = std::process::id() as i32;
    send_registration(&server, &registration(me + 1), &[dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()]);
    drop(dispatcher_link);
    assert_eq!(answer(&link), Some(wire::Answer::Refused(Refusal::Invalid)));
    assert_eq!(server.snapshot().unwrap().workers.len(), 0);
}

#[test]
fn a_registration_whose_link_is_not_a_seqpacket_socket_is_closed_unanswered() {
    let server = start(None);
    let (stream_link, dispatcher_stream) =
        std::os::unix::net::UnixStream::pair().map(|(a, b)| (OwnedFd::from(a), OwnedFd::from(b))).unwrap();
    let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
    send_registration(&server, &registration(1), &[dispatcher_stream.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()]);
    drop(dispatcher_stream);
    wait_readable(stream_link.as_fd(), 5 * SECOND).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(nix::unistd::read(stream_link.as_raw_fd(), &mut byte), Ok(0), "closed, nothing written");
    assert_eq!(server.snapshot().unwrap().refused, 1);
}

#[test]
fn a_malformed_message_on_a_link_drops_that_worker_only() {
    let server = start(None);
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    let rogue = Rogue::register(&server);
    fdpass::send_message(rogue.link.as_fd(), b"").unwrap(); // an empty datagram is not a READY
    let snap = wait_for(&server, "the rogue dropped", |s| s.workers.len() == 1);
    assert_eq!(snap.dropped, 1);
    serves(&server, &mut honest);
}

#[test]
fn junk_in_a_dead_workers_mailbox_is_dropped_and_its_connection_saved() {
    let server = start(None);
    let rogue = Rogue::register(&server);
    // Ahead of the connection it will be sent: a TCP socket with a good address, a file, a
    // message without an fd and an oversized one, all in its own mailbox.
    let (_c, tcp) = tcp_pair(&server);
    let file = std::fs::File::open("/dev/null").unwrap();
    let mut peer = [0u8; MAX_MESSAGE];
    let len = wire::encode_peer(&"127.0.0.1:1".parse().unwrap(), &mut peer);
    let junk: [(&[u8], Vec<BorrowedFd>); 4] = [
        (&peer[..len], vec![file.as_fd()]),
        (&peer[..len], vec![]),
        (&[9; 64], vec![tcp.as_fd()]),
        (b"", vec![]),
    ];
    for (bytes, fds) in &junk {
        fdpass::send_with_fds(rogue.dispatcher_mailbox.as_fd(), bytes, fds).unwrap();
    }
    rogue.arm();
    wait_for(&server, "the rogue ready", |s| s.ready == 1);
    let mut client = TcpStream::connect(server.address).unwrap();
    wait_for(&server, "the connection sent", |s| s.accepted == 1 && s.ready == 0);
    drop(rogue); // dies without taking it
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    honest.arm().unwrap();
    answers(&mut honest, &mut client); // the saved connection
    assert_eq!(server.snapshot().unwrap().dropped, 4);
}

/// Random bytes (or a well-formed message) with random fds of every kind, at most three.
pub(super) fn random_message(rng: &mut Prng, kinds: &[BorrowedFd]) -> (Vec<u8>, Vec<usize>) {
    let bytes = match rng.next() % 6 {
        0 => Vec::new(),
        1 => registration(rng.next() as i32).to_vec(),
        2 => wire::encode_ready(rng.next()).to_vec(),
        3 => rng.bytes(200),
        _ => rng.bytes(MAX_MESSAGE),
    };
    let count = (rng.next() % 5) as usize; // 4 is one too many
    let fds = (0..count).map(|_| (rng.next() % kinds.len() as u64) as usize).collect();
    (bytes, fds)
}

#[test]
fn a_flood_of_malformed_messages_leaves_the_dispatcher_serving_idle_and_without_leaked_fds() {
    if in_own_process(module_path!(), "a_flood_of_malformed_messages_leaves_the_dispatcher_serving_idle_and_without_leaked_fds") {
        return;
    }
    let server = start(None);
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    serves(&server, &mut honest);
    let before = open_fds();
    let mut rng = Prng(0x50c3_e75e_7e55);
    // A guard against a hang, not a speed target (generous: the machine may be loaded).
    let deadline = Instant::now() + 45 * SECOND;
    let mut rogue = Rogue::register(&server);
    for round in 0..3000 {
        assert!(Instant::now() < deadline, "the flood took too long (round {round})");
        // Fds of every kind, new each round: seqpacket ends, a stream socket, TCP, a file, a pipe.
        let (sp, _sp_peer) = fdpass::seqpacket_pair().unwrap();
        let (us, _us_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_c, tcp) = tcp_pair(&server);
        let file = std::fs::File::open("/dev/null").unwrap();
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let kinds = [sp.as_fd(), us.as_fd(), tcp.as_fd(), file.as_fd(), pipe_r.as_fd(), rogue.dispatcher_mailbox.as_fd()];
        let (bytes, picks) = random_message(&mut rng, &kinds);
        let fds: Vec<BorrowedFd> = picks.iter().map(|&k| kinds[k]).collect();
        let target = match rng.next() % 3 {
            0 => rogue.link.as_fd(),
            1 => rogue.dispatcher_mailbox.as_fd(), // junk into its own mailbox
            _ => server.registration.as_fd(),
        };
        // Too many fds, or a full socket: the kernel refuses, which is fine too.
        let _ = fdpass::send_with_fds(target, &bytes, &fds);
        if round % 100 == 0 {
            for _ in 0..200 {
                let _ = fdpass::send_message(server.registration.as_fd(), b"");
            }
        }
        if fdpass::has_queued(rogue.link.as_fd()) || round % 50 == 0 {
            // Dropped (its link closed) or at random: a fresh rogue.
            rogue = Rogue::register(&server);
        }
    }
    drop(rogue);
    // The registration socket is read in order: this answer comes after all the junk.
    let late = WorkerLink::register(server.registration.as_fd()).expect("registration still works");
    let snap = wait_for(&server, "only the honest workers left", |s| s.workers.len() == 2);
    assert!(snap.refused > 0 && snap.dropped > 0, "{snap:?}");
    eprintln!("after the flood: refused {}, dropped {}", snap.refused, snap.dropped);
    drop(late);
    wait_for(&server, "the late worker gone", |s| s.workers.len() == 1);
    serves(&server, &mut honest);
    assert_eq!(open_fds(), before, "fds leaked");
    let ticks = dispatcher_cpu_ticks(&server);
    std::thread::sleep(SECOND / 2);
    let spent = dispatcher_cpu_ticks(&server) - ticks;
    assert!(spent <= 2, "the idle dispatcher used {spent} ticks in half a second");
}

#[test]
fn an_empty_datagram_on_the_registration_socket_does_not_make_the_dispatcher_spin() {
    if in_own_process(module_path!(), "an_empty_datagram_on_the_registration_socket_does_not_make_the_dispatcher_spin") {
        return;
    }
    let server = start(None);
    fdpass::send_message(server.registration.as_fd(), b"").unwrap();
    // Alone in the socket (a registration after it would have it read on the way).
    let ticks = dispatcher_cpu_ticks(&server);
    std::thread::sleep(SECOND / 2);
    let spent = dispatcher_cpu_ticks(&server) - ticks;
    assert!(spent <= 2, "the dispatcher used {spent} ticks in half a second after an empty datagram");
    assert_eq!(server.snapshot().unwrap().refused, 1);
    let mut honest = WorkerLink::register(server.registration.as_fd()).expect("served after the empty datagram");
    serves(&server, &mut honest);
}

#[test]
fn info_reports_3000_workers() {
    if in_own_process(module_path!(), "info_reports_3000_workers") {
        return;
    }
    // 3 fds per worker in the dispatcher and 2 on the registering side.
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if soft < 16_000 {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let server = start(Some(3000));
    let mut links: Vec<WorkerLink> =
        (0..3000).map(|_| WorkerLink::register(server.registration.as_fd()).unwrap()).collect();
    for link in links.iter_mut().step_by(2) {
        link.arm().unwrap();
    }
    let snap = wait_for(&server, "1500 ready", |s| s.ready == 1500);
    assert_eq!(snap.workers.len(), 3000);
    assert_eq!(snap.workers.iter().filter(|w| w.state == WorkerState::Ready).count(), 1500);
    assert!(matches!(
        WorkerLink::register(server.registration.as_fd()),
        Err(RegisterError::Refused(Refusal::WorkerLimit(3000)))
    ));
    serves(&server, &mut links[0]); // the longest-waiting ready worker
}

#[test]
fn a_socket_a_worker_queues_in_its_own_mailbox_is_never_read_back_as_its_connection() {
    let server = start(None);
    let rogue = Rogue::register(&server);
    // The rogue's own TCP socket, labelled with a forged peer, queued ahead of the real one.
    let (_attacker_end, fake) = tcp_pair(&server);
    let mut peer = [0u8; MAX_MESSAGE];
    let forged: std::net::SocketAddr = "10.6.6.6:666".parse().unwrap();
    let len = wire::encode_peer(&forged, &mut peer);
    fdpass::send_with_fds(rogue.dispatcher_mailbox.as_fd(), &peer[..len], &[fake.as_fd()]).unwrap();
    drop(fake);
    rogue.arm();
    wait_for(&server, "the rogue ready", |s| s.ready == 1);
    let client = TcpStream::connect(server.address).unwrap();
    wait_for(&server, "the connection sent", |s| s.accepted == 1 && s.ready == 0);
    drop(rogue);
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    honest.arm().unwrap();
    let delivery = receive(&mut honest);
    assert_eq!(delivery.peer, client.local_addr().unwrap(), "the honest worker gets the real client");
    let snap = wait_for(&server, "the fake counted", |s| s.dropped >= 1);
    assert_eq!(snap.dropped, 1);
}

#[test]
fn a_worker_that_lies_about_when_it_asked_does_not_jump_the_queue() {
    let server = start(None);
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    honest.arm().unwrap();
    wait_for(&server, "honest ready", |s| s.ready == 1);
    let rogue = Rogue::register(&server);
    fdpass::send_message(rogue.link.as_fd(), &wire::encode_ready(0)).unwrap();
    wait_for(&server, "both ready", |s| s.ready == 2);
    let _client = TcpStream::connect(server.address).unwrap();
    wait_readable(honest.as_fd(), 5 * SECOND).expect("the worker that asked first is served first");
    assert!(wait_readable(rogue._mailbox.as_fd(), Duration::from_millis(100)).is_err());
}

#[test]
fn a_copy_of_the_registration_socket_offered_as_a_link_is_refused() {
    let server = start(None);
    let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
    // Its SO_PEERCRED pid is the serving process's: ours, here.
    let fds = [server.registration.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()];
    send_registration(&server, &registration(std::process::id() as i32), &fds);
    wait_for(&server, "the refusal counted", |s| s.refused == 1);
    let mut honest = WorkerLink::register(server.registration.as_fd()).unwrap();
    serves(&server, &mut honest);
    assert_eq!(server.snapshot().unwrap().workers.len(), 1);
}
