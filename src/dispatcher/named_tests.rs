//! Tests of the named registration socket (`-path`): registering through it, what the answer
//! says, silent and hostile connections to it.

use super::hostile::{answer, dispatcher_cpu_ticks, in_own_process, open_fds, random_message, registration, rss_kib, serves, tcp_pair};
use super::pending::CAPACITY;
use super::tests::wait_for;
use super::*;
use crate::named;
use crate::wire::tests::Prng;
use crate::wire::{self, Refusal};
use crate::worker::{RegisterError, WorkerLink};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

const SECOND: Duration = Duration::from_secs(1);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ss-path-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir.join("app.sock")
}

fn start_at(path: &std::path::Path) -> Server {
    let config = ServerConfig { path: Some(path.to_path_buf()), ..ServerConfig::new("127.0.0.1:0".parse().unwrap()) };
    Server::start(config).unwrap()
}

/// A registration made by hand on a fresh connection to `path`: the answer on its link.
fn register_by_hand(path: &std::path::Path, message: &[u8]) -> Option<wire::Answer> {
    let conn = named::connect(path, 5 * SECOND).unwrap();
    let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
    let (mailbox, dispatcher_mailbox) = fdpass::seqpacket_pair().unwrap();
    fdpass::send_with_fds(conn.as_fd(), message, &[dispatcher_link.as_fd(), dispatcher_mailbox.as_fd(), mailbox.as_fd()])
        .unwrap();
    drop((dispatcher_link, dispatcher_mailbox));
    answer(&link)
}

#[test]
fn a_worker_registers_through_the_path_learns_the_port_and_is_served() {
    let path = scratch("serve");
    let server = start_at(&path);
    let mut worker = WorkerLink::register_at(&path).unwrap();
    assert_eq!(worker.port, server.address.port());
    serves(&server, &mut worker);
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.workers.len(), snap.refused), (1, 0));
    drop(server);
    assert!(!path.exists(), "the path goes with the server");
    let err = WorkerLink::register_at(&path).unwrap_err();
    assert!(matches!(err, RegisterError::Io(ref e) if e.raw_os_error() == Some(libc::ENOENT)), "{err:?}");
}

#[test]
fn a_registration_of_another_version_is_refused_with_the_version_spoken() {
    let path = scratch("version");
    let server = start_at(&path);
    let other = wire::encode_registration(wire::Registration { version: 2, pid: std::process::id() as i32 });
    assert_eq!(register_by_hand(&path, &other), Some(wire::Answer::Refused(Refusal::Version(wire::VERSION))));
    // A later version may change the length and the fds after the first (its link): still
    // answered, on that link.
    for fds in 1..=3 {
        let conn = named::connect(&path, 5 * SECOND).unwrap();
        let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
        let (extra, _extra_peer) = fdpass::seqpacket_pair().unwrap();
        let sent = [dispatcher_link.as_fd(), extra.as_fd(), extra.as_fd()];
        fdpass::send_with_fds(conn.as_fd(), b"W\x02 a longer registration", &sent[..fds]).unwrap();
        drop(dispatcher_link);
        assert_eq!(answer(&link), Some(wire::Answer::Refused(Refusal::Version(wire::VERSION))), "with {fds} fds");
    }
    // Truncated (the tag alone) and oversized (past the longest registration of any version):
    // dropped unanswered, and the dispatcher goes on.
    let oversized = [b"W\x02".as_slice(), &[0x55; wire::MAX_REGISTRATION]].concat();
    for message in [b"W".as_slice(), &oversized] {
        let conn = named::connect(&path, 5 * SECOND).unwrap();
        let (link, dispatcher_link) = fdpass::seqpacket_pair().unwrap();
        fdpass::send_with_fds(conn.as_fd(), message, &[dispatcher_link.as_fd()]).unwrap();
        drop(dispatcher_link);
        assert_eq!(answer(&link), None, "{} bytes", message.len());
    }
    let accepted = register_by_hand(&path, &registration(std::process::id() as i32));
    assert_eq!(accepted, Some(wire::Answer::Accepted { version: wire::VERSION, port: server.address.port() }));
    let snap = server.snapshot().unwrap();
    assert_eq!((snap.refused, snap.denied), (6, 0));
}

#[test]
fn silent_connections_to_the_path_cannot_keep_a_worker_out() {
    let path = scratch("silent");
    let server = start_at(&path);
    // Twice as many as there are places: each new one evicts the one that waited longest.
    let silent: Vec<OwnedFd> = (0..2 * CAPACITY).map(|_| named::connect(&path, 5 * SECOND).unwrap()).collect();
    let mut worker = WorkerLink::register_at(&path).expect("registered despite the silent ones");
    serves(&server, &mut worker);
    let snap = wait_for(&server, "the evictions counted", |s| s.refused as usize >= CAPACITY);
    assert_eq!(snap.workers.len(), 1);
    // The evicted ones are closed: reading gives EOF at once.
    let closed = silent.iter().filter(|c| fdpass::wait_readable(c.as_fd(), Duration::ZERO).is_ok()).count();
    assert!(closed >= CAPACITY, "{closed} closed");
}

#[test]
fn a_fuzzed_named_socket_leaves_the_dispatcher_serving_idle_and_without_leaked_fds() {
    if in_own_process(module_path!(), "a_fuzzed_named_socket_leaves_the_dispatcher_serving_idle_and_without_leaked_fds") {
        return;
    }
    let path = scratch("fuzz");
    let server = start_at(&path);
    let mut honest = WorkerLink::register_at(&path).unwrap();
    serves(&server, &mut honest);
    let before = open_fds();
    let mut rng = Prng(0xfa57_0f5e_ed00);
    // A guard against a hang, not a speed target.
    let deadline = Instant::now() + 45 * SECOND;
    let mut left_open = Vec::new();
    // Memory the first rounds take (allocator arenas, the test's own) stays; later rounds must
    // add next to nothing to it.
    let mut warm_rss = 0;
    for round in 0..2000 {
        assert!(Instant::now() < deadline, "the fuzzing took too long (round {round})");
        if round == 500 {
            warm_rss = rss_kib();
        }
        let (sp, _sp_peer) = fdpass::seqpacket_pair().unwrap();
        let (us, _us_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_c, tcp) = tcp_pair(&server);
        let file = std::fs::File::open("/dev/null").unwrap();
        let conn = named::connect(&path, 5 * SECOND).unwrap();
        let kinds = [sp.as_fd(), us.as_fd(), tcp.as_fd(), file.as_fd(), conn.as_fd()];
        // One to three messages, or none (a connection that just closes).
        for _ in 0..rng.next() % 4 {
            let (bytes, picks) = random_message(&mut rng, &kinds);
            let fds: Vec<BorrowedFd> = picks.iter().map(|&k| kinds[k]).collect();
            let _ = fdpass::send_with_fds(conn.as_fd(), &bytes, &fds);
        }
        if round % 10 == 0 {
            left_open.push(conn); // silent or not: it must be evicted, or taken when it closes
        }
    }
    // Connections are served in order of arrival: this comes after all the junk.
    let late = WorkerLink::register_at(&path).expect("registration still works");
    let snap = wait_for(&server, "only the honest workers left", |s| s.workers.len() == 2);
    assert!(snap.refused > 0, "{snap:?}");
    eprintln!("after the fuzzing: refused {}, dropped {}", snap.refused, snap.dropped);
    drop(late);
    wait_for(&server, "the late worker gone", |s| s.workers.len() == 1);
    serves(&server, &mut honest);
    drop(left_open);
    // The dispatcher sees the last ones close (bounded by wait_for's deadline).
    let fds_settle = Instant::now() + 10 * SECOND;
    while open_fds() != before && Instant::now() < fds_settle {
        server.snapshot().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(open_fds(), before, "fds leaked");
    let grown = rss_kib().saturating_sub(warm_rss);
    eprintln!("RSS after 500 rounds {warm_rss} KiB, grown by {grown} KiB in 1500 more");
    assert!(grown < 2048, "RSS grew by {grown} KiB in 1500 rounds of junk");
    let ticks = dispatcher_cpu_ticks(&server);
    std::thread::sleep(SECOND / 2);
    let spent = dispatcher_cpu_ticks(&server) - ticks;
    assert!(spent <= 2, "the idle dispatcher used {spent} ticks in half a second");
}

#[test]
fn more_workers_registering_at_once_than_there_are_places_all_get_in() {
    let path = scratch("crowd");
    let server = start_at(&path);
    let crowd = 5 * CAPACITY / 2;
    let results = named::tests::at_once(crowd, || WorkerLink::register_at(&path).map_err(|e| format!("{e:?}")));
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {crowd} refused: {failed:?}", failed.len());
    let snap = wait_for(&server, "every one registered", |s| s.workers.len() == crowd);
    assert_eq!(snap.refused, 0, "{snap:?}");
}

#[test]
fn a_full_set_of_silent_connections_loses_one_place_per_newcomer_and_no_more() {
    let path = scratch("full");
    let server = start_at(&path);
    let silent: Vec<OwnedFd> = (0..CAPACITY).map(|_| named::connect(&path, 5 * SECOND).unwrap()).collect();
    let mut worker = WorkerLink::register_at(&path).expect("registered in place of one silent connection");
    serves(&server, &mut worker);
    let closed = silent.iter().filter(|c| fdpass::wait_readable(c.as_fd(), Duration::ZERO).is_ok()).count();
    assert_eq!(closed, 1, "silent connections closed for one newcomer");
}
