//! Parked connections with real sockets and no Tcl: `-wait data|head`, the timeouts, eviction
//! at `-maxparked`, hand-backs on a worker's mailbox (a worker here is a `WorkerLink`, which
//! hands back by sending `wire::encode_handback` with the fd on its end of the mailbox, the fd
//! it watches), and the fds of 10,000 parked-and-closed connections.

use super::hostile::{in_own_process, open_fds};
use super::tests::{ready_worker, receive, wait_for};
use super::*;
use crate::wire::{self, MAX_MESSAGE};
use crate::worker::WorkerLink;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd};

const SECOND: Duration = Duration::from_secs(1);

fn start(wait: Wait, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig { backlog: 64, wait, ..ServerConfig::new("127.0.0.1:0".parse().unwrap()) };
    tweak(&mut config);
    Server::start(config).unwrap()
}




fn nothing_delivered(link: &mut WorkerLink) -> bool {
    matches!(link.receive(), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn client(server: &Server) -> TcpStream {
    let client = TcpStream::connect(server.address).unwrap();
    client.set_read_timeout(Some(5 * SECOND)).unwrap();
    client
}

/// Reads exactly `n` bytes from a delivered connection.
fn read_n(conn: &mut TcpStream, n: usize) -> Vec<u8> {
    conn.set_read_timeout(Some(5 * SECOND)).unwrap();
    let mut bytes = vec![0; n];
    conn.read_exact(&mut bytes).unwrap();
    bytes
}

/// True once the dispatcher has closed the client's connection (within 5 s): EOF, or a reset
/// if the client had sent bytes that nobody read.
fn closed_by_server(client: &mut TcpStream) -> bool {
    client.set_read_timeout(Some(5 * SECOND)).unwrap();
    let mut byte = [0u8; 1];
    match client.read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Still open: nothing to read, no EOF, for a moment.
fn still_open(client: &TcpStream) -> bool {
    client.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let open = matches!((&*client).read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    client.set_nonblocking(false).unwrap();
    open
}

/// A worker hands a connection back, as `socket park` does: `P` + peer, fd attached.
fn hand_back(link: &WorkerLink, fd: BorrowedFd, peer: SocketAddr) {
    let mut buf = [0u8; MAX_MESSAGE];
    let len = wire::encode_handback(&peer, &mut buf);
    fdpass::send_with_fds(link.as_fd(), &buf[..len], &[fd]).unwrap();
}

/// A TCP connection made elsewhere: (the client's end, the server's end).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (conn, _) = listener.accept().unwrap();
    (client, conn)
}

#[test]
fn data_mode_hands_over_a_connection_once_it_is_readable() {
    let server = start(Wait::Data, |_| {});
    let mut link = ready_worker(&server);
    let mut silent = client(&server);
    let mut talker = client(&server);
    wait_for(&server, "both parked", |s| s.parked == 2);
    assert!(nothing_delivered(&mut link), "a silent connection costs no worker");
    talker.write_all(b"hello").unwrap();
    let delivery = receive(&mut link);
    assert_eq!(delivery.peer, talker.local_addr().unwrap());
    let mut conn = TcpStream::from(delivery.fd);
    assert_eq!(read_n(&mut conn, 5), b"hello", "peeked, not consumed");
    conn.write_all(b"ok").unwrap();
    drop(conn);
    let mut reply = String::new();
    talker.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "ok");
    link.arm().unwrap();
    silent.write_all(b"late").unwrap();
    let mut conn = TcpStream::from(receive(&mut link).fd);
    assert_eq!(read_n(&mut conn, 4), b"late");
    let snap = wait_for(&server, "none parked", |s| s.parked == 0);
    assert_eq!((snap.accepted, snap.park.parked_total, snap.delivered), (2, 2, 2));
}

#[test]
fn head_mode_waits_for_the_delimiter_even_split_over_writes() {
    let server = start(Wait::Head, |_| {});
    let mut link = ready_worker(&server);
    let mut talker = client(&server);
    talker.set_nodelay(true).unwrap();
    let parts: [&[u8]; 4] = [b"GET / HTTP/1.1\r\n", b"Host: x\r\n\r", b"", b"\n"];
    for part in &parts[..2] {
        talker.write_all(part).unwrap();
        wait_for(&server, "parked", |s| s.parked == 1);
        // Give the dispatcher the bytes' event: it must look and keep it parked.
        std::thread::sleep(Duration::from_millis(50));
        assert!(nothing_delivered(&mut link), "an incomplete head stays parked");
    }
    talker.write_all(parts[3]).unwrap();
    let mut conn = TcpStream::from(receive(&mut link).fd);
    let head = parts.concat();
    assert_eq!(read_n(&mut conn, head.len()), head, "every byte is the worker's to read");
    assert_eq!(server.snapshot().unwrap().parked, 0);
}

#[test]
fn head_mode_hands_over_at_the_size_cap_and_at_eof_before_the_head() {
    let server = start(Wait::Head, |c| c.head_size = 16);
    let mut link = ready_worker(&server);
    let mut oversized = client(&server);
    oversized.write_all(b"0123456789abcdef").unwrap();
    let delivery = receive(&mut link);
    assert_eq!(delivery.peer, oversized.local_addr().unwrap());
    assert_eq!(read_n(&mut TcpStream::from(delivery.fd), 16), b"0123456789abcdef");
    link.arm().unwrap();
    let mut truncated = client(&server);
    truncated.write_all(b"GET").unwrap();
    wait_for(&server, "parked", |s| s.parked == 1);
    truncated.shutdown(Shutdown::Write).unwrap();
    let mut conn = TcpStream::from(receive(&mut link).fd);
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(5 * SECOND)).unwrap();
    conn.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"GET", "the bytes, then EOF");
}

#[test]
fn a_connection_at_eof_with_nothing_to_read_is_closed_by_the_dispatcher() {
    let server = start(Wait::Data, |_| {});
    let mut link = ready_worker(&server);
    let quitter = client(&server);
    wait_for(&server, "parked", |s| s.parked == 1);
    drop(quitter);
    let snap = wait_for(&server, "closed", |s| s.park.closed_peer == 1);
    assert_eq!(snap.parked, 0);
    assert!(nothing_delivered(&mut link), "nothing for a worker to do");
}

#[test]
fn the_idle_timeout_closes_silent_connections_and_spares_those_sending() {
    let idle = Duration::from_millis(300);
    let server = start(Wait::Head, |c| {
        c.idle_timeout = Some(idle);
        c.header_timeout = None;
    });
    let mut silent = client(&server);
    let mut dripper = client(&server);
    dripper.set_nodelay(true).unwrap();
    wait_for(&server, "both parked", |s| s.parked == 2);
    let started = Instant::now();
    // A byte every 100 ms for 3 idle timeouts: never idle for one.
    for byte in b"GET /" {
        dripper.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.park.closed_idle, snap.parked), (1, 1), "{snap:?}");
    assert!(closed_by_server(&mut silent));
    assert!(still_open(&dripper));
    assert!(started.elapsed() >= idle);
    // Silent from now on: idle too.
    let snap = wait_for(&server, "the dripper closed", |s| s.park.closed_idle == 2);
    assert_eq!((snap.parked, snap.park.closed_header), (0, 0));
    assert!(closed_by_server(&mut dripper));
}

#[test]
fn a_head_that_stalls_until_both_timeouts_fall_due_together_ends_on_the_header_timeout() {
    let timeout = Duration::from_millis(300);
    let server = start(Wait::Head, |c| {
        c.idle_timeout = Some(timeout);
        c.header_timeout = Some(timeout);
    });
    let mut slow = client(&server);
    wait_for(&server, "parked", |s| s.parked == 1);
    // Its first and last bytes: both timers start at this moment.
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let snap = wait_for(&server, "the stalled head closed", |s| s.parked == 0);
    assert_eq!((snap.park.closed_header, snap.park.closed_idle), (1, 0), "{snap:?}");
    assert!(closed_by_server(&mut slow));
}

#[test]
fn the_header_timeout_closes_an_incomplete_head_and_only_that() {
    let server = start(Wait::Head, |c| {
        c.idle_timeout = None;
        c.header_timeout = Some(Duration::from_millis(300));
    });
    let silent = client(&server);
    let mut slow = client(&server);
    wait_for(&server, "both parked", |s| s.parked == 2);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(server.snapshot().unwrap().park.closed_header, 0, "no byte, no header timer");
    let sent = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let snap = wait_for(&server, "the slow head closed", |s| s.park.closed_header == 1);
    assert!(sent.elapsed() >= Duration::from_millis(300), "not before its time");
    assert_eq!((snap.parked, snap.park.closed_idle), (1, 0));
    assert!(closed_by_server(&mut slow));
    assert!(still_open(&silent), "-idletimeout 0: never idle");
}

#[test]
fn a_handed_back_connection_is_parked_and_comes_back_with_its_next_request() {
    let server = start(Wait::None, |_| {});
    let mut link = ready_worker(&server);
    let mut talker = client(&server);
    let first = receive(&mut link);
    let peer = first.peer;
    let mut conn = TcpStream::from(first.fd);
    talker.write_all(b"one").unwrap();
    assert_eq!(read_n(&mut conn, 3), b"one");
    conn.write_all(b"1").unwrap();
    hand_back(&link, conn.as_fd(), peer);
    drop(conn); // the worker's copy: the connection lives on in the dispatcher
    let snap = wait_for(&server, "parked", |s| s.parked == 1);
    assert_eq!((snap.park.handed_back, snap.park.parked_total), (1, 1));
    link.arm().unwrap();
    wait_for(&server, "ready", |s| s.ready == 1);
    assert!(nothing_delivered(&mut link), "-wait none: a handed-back connection still waits for data");
    talker.write_all(b"two").unwrap();
    let second = receive(&mut link);
    assert_eq!(second.peer, peer, "the peer it was handed back with");
    let mut conn = TcpStream::from(second.fd);
    assert_eq!(read_n(&mut conn, 3), b"two");
    conn.write_all(b"2").unwrap();
    drop(conn);
    let mut replies = String::new();
    talker.read_to_string(&mut replies).unwrap();
    assert_eq!(replies, "12", "both answers on the one connection");
}

#[test]
fn a_connection_handed_back_non_blocking_is_delivered_blocking_as_an_accepted_one() {
    let server = start(Wait::None, |_| {});
    let mut link = ready_worker(&server);
    let mut talker = client(&server);
    let first = receive(&mut link);
    let conn = TcpStream::from(first.fd);
    // As a Python worker's settimeout() leaves it: O_NONBLOCK is the open file's, shared.
    conn.set_nonblocking(true).unwrap();
    hand_back(&link, conn.as_fd(), first.peer);
    drop(conn);
    wait_for(&server, "parked", |s| s.parked == 1);
    link.arm().unwrap();
    talker.write_all(b"next").unwrap();
    let second = receive(&mut link);
    let flags = nix::fcntl::fcntl(second.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    assert_eq!(flags & libc::O_NONBLOCK, 0, "delivered blocking");
}

#[test]
fn a_hand_back_that_is_not_a_tcp_connection_is_dropped() {
    let server = start(Wait::Data, |_| {});
    let mut link = ready_worker(&server);
    let (unix, _other) = std::os::unix::net::UnixStream::pair().unwrap();
    let (pipe, _w) = nix::unistd::pipe().unwrap();
    let peer = "127.0.0.1:1".parse().unwrap();
    hand_back(&link, unix.as_fd(), peer);
    hand_back(&link, pipe.as_fd(), peer);
    let (_c, tcp) = tcp_pair();
    fdpass::send_with_fds(link.as_fd(), b"P", &[tcp.as_fd()]).unwrap(); // truncated
    fdpass::send_message(link.as_fd(), &{
        let mut buf = [0u8; MAX_MESSAGE];
        let len = wire::encode_handback(&peer, &mut buf);
        buf[..len].to_vec()
    })
    .unwrap(); // no fd
    let snap = wait_for(&server, "four dropped", |s| s.dropped == 4);
    assert_eq!((snap.parked, snap.park.handed_back, snap.workers.len()), (0, 0, 1));
    let mut talker = client(&server);
    talker.write_all(b"x").unwrap();
    assert_eq!(receive(&mut link).peer, talker.local_addr().unwrap(), "the worker still serves");
}

#[test]
fn a_worker_that_dies_right_after_a_hand_back_loses_nothing() {
    let server = start(Wait::Data, |_| {});
    let doomed = WorkerLink::register(server.registration.as_fd()).unwrap();
    // More than the dispatcher reads from a mailbox per wake-up: some are still there when it
    // sees the link close, and must be read then.
    let pairs: Vec<(TcpStream, TcpStream)> = (0..48).map(|_| tcp_pair()).collect();
    for (talker, conn) in &pairs {
        hand_back(&doomed, conn.as_fd(), talker.local_addr().unwrap());
    }
    drop(doomed); // its link closes at once
    let mut talkers: Vec<TcpStream> = pairs.into_iter().map(|(talker, _)| talker).collect();
    let snap = wait_for(&server, "the worker gone", |s| s.workers.is_empty());
    assert_eq!((snap.parked, snap.park.handed_back, snap.dropped), (48, 48, 0));
    let mut survivor = ready_worker(&server);
    let last = talkers.last_mut().unwrap();
    last.write_all(b"next").unwrap();
    let delivery = receive(&mut survivor);
    assert_eq!(delivery.peer, last.local_addr().unwrap());
    let mut conn = TcpStream::from(delivery.fd);
    assert_eq!(read_n(&mut conn, 4), b"next");
}

#[test]
fn at_maxparked_the_longest_idle_handed_back_connection_goes_first_and_never_one_that_sent() {
    let server = start(Wait::Head, |c| c.max_parked = Some(3));
    let worker = WorkerLink::register(server.registration.as_fd()).unwrap();
    // Three hand-backs, in order: a (then sends part of a head), b, c.
    let [(mut a, a_conn), (mut b, b_conn), (mut c, c_conn)] = [tcp_pair(), tcp_pair(), tcp_pair()];
    for (n, (talker, conn)) in [(&a, &a_conn), (&b, &b_conn), (&c, &c_conn)].into_iter().enumerate() {
        hand_back(&worker, conn.as_fd(), talker.local_addr().unwrap());
        wait_for(&server, "parked", |s| s.parked == n as u64 + 1);
    }
    drop((a_conn, b_conn, c_conn)); // only the dispatcher's copies remain
    a.write_all(b"GET /").unwrap();
    std::thread::sleep(Duration::from_millis(50)); // its event: no longer evictable
    let fresh1 = client(&server);
    let snap = wait_for(&server, "one evicted", |s| s.park.evicted == 1);
    assert_eq!((snap.parked, snap.park.handed_back), (3, 3));
    assert!(closed_by_server(&mut b), "b was handed back first of those that sent nothing");
    assert!(still_open(&a) && still_open(&c));
    let fresh2 = client(&server);
    wait_for(&server, "two evicted", |s| s.park.evicted == 2);
    assert!(closed_by_server(&mut c));
    // Now a (sent bytes) and two fresh ones: nothing may go, so accepting pauses.
    let fresh3 = client(&server);
    std::thread::sleep(Duration::from_millis(100));
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.accepted, snap.parked, snap.park.evicted), (2, 3, 2), "{snap:?}");
    assert!(still_open(&a));
    a.write_all(b" HTTP/1.0\r\n\r\n").unwrap(); // ready: goes to waiting, still held
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(server.snapshot().unwrap().accepted, 2, "a waiting connection is held too");
    let mut worker = worker;
    worker.arm().unwrap();
    let delivery = receive(&mut worker);
    assert_eq!(delivery.peer, a.local_addr().unwrap());
    wait_for(&server, "the third fresh accepted", |s| s.accepted == 3);
    drop((fresh1, fresh2, fresh3));
}

#[test]
fn a_handed_back_connection_whose_request_is_still_unseen_is_never_evicted() {
    // Hand-backs read in one batch: the second one's parking needs room while the first one's
    // request sits in the kernel, its event not served yet.
    for trial in 0..20 {
        let server = start(Wait::Data, |c| c.max_parked = Some(1));
        let worker = WorkerLink::register(server.registration.as_fd()).unwrap();
        let (mut a, a_conn) = tcp_pair();
        let (mut b, b_conn) = tcp_pair();
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        hand_back(&worker, a_conn.as_fd(), a.local_addr().unwrap());
        hand_back(&worker, b_conn.as_fd(), b.local_addr().unwrap());
        drop((a_conn, b_conn));
        wait_for(&server, "both handed back", |s| s.park.handed_back == 2);
        let mut worker = worker;
        worker.arm().unwrap();
        let delivery = receive(&mut worker);
        assert_eq!(delivery.peer, a.local_addr().unwrap(), "trial {trial}: a's request was lost");
        let mut conn = TcpStream::from(delivery.fd);
        assert_eq!(read_n(&mut conn, 18), b"GET / HTTP/1.1\r\n\r\n");
        let snap = server.snapshot().unwrap();
        assert!(snap.park.evicted <= 1, "{snap:?}");
        drop(b.write_all(b"x")); // b may have been evicted (it had sent nothing): either is fine
    }
}

#[test]
fn fds_are_flat_after_10000_parked_and_closed_connections_and_parked_ones_sit_above_fd_setsize() {
    if in_own_process(module_path!(), "fds_are_flat_after_10000_parked_and_closed_connections_and_parked_ones_sit_above_fd_setsize") {
        return;
    }
    // A backlog for bursts of 100 connects even when the thread is slow to be scheduled.
    let server = start(Wait::Data, |c| {
        c.idle_timeout = Some(SECOND);
        c.backlog = 1024;
    });
    let high_fds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<usize>().unwrap() >= 1024)
            .count()
    };
    let before = open_fds();
    let high_before = high_fds();
    let deadline = Instant::now() + 60 * SECOND;
    let mut total = 0;
    for round in 0..100 {
        assert!(Instant::now() < deadline, "10,000 connections took too long ({total})");
        // 100 at a time, parked, then closed by their clients; in every twentieth round half
        // of them stay silent until the idle timeout closes them.
        let mut batch: Vec<TcpStream> = (0..100).map(|_| client(&server)).collect();
        total += batch.len() as u64;
        wait_for(&server, "the batch parked", |s| s.park.parked_total == total);
        if round == 0 {
            let snap = server.snapshot().unwrap();
            assert_eq!(high_fds() - high_before, snap.parked as usize, "parked fds at 1024 and up");
        }
        let idlers = if round % 20 == 0 { batch.split_off(50) } else { Vec::new() };
        drop(batch);
        let snap = wait_for(&server, "the batch closed", |s| s.parked == 0);
        assert_eq!(snap.park.closed_peer + snap.park.closed_idle, total);
        drop(idlers);
    }
    let snap = server.snapshot().unwrap();
    // (A loaded machine may let a few quitters idle out first.)
    assert!(snap.park.closed_idle >= 250 && snap.park.closed_peer > 0, "{snap:?}");
    assert_eq!(open_fds(), before, "fds leaked");
}
