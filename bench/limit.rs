//! `limit`: the floor for the benchmark — a bare accept-and-answer HTTP/1.0 server, no Tcl.
//!
//! Usage: `limit PORT ?NPROCS?`
//!
//! Binds 127.0.0.1:PORT (0 = a port the kernel chooses), forks NPROCS processes
//! (default: one per core) that each block in `accept` on the shared listener,
//! read the request to the blank line, answer `HTTP/1.0 200 OK` with
//! `Content-Length` and `Connection: close`, and close. A request for `/slow`
//! sleeps 5 ms first (the slow-mix scenario, though the driver does not use it).
//!
//! Prints one line, `port PORT pids PID...`, with the worker pids, then waits
//! until it is killed: on SIGTERM or SIGINT the parent kills its workers by pid
//! and reaps them. Each worker also asks the kernel for SIGTERM when the parent
//! dies (`PR_SET_PDEATHSIG`), so no worker outlives it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";

/// Longest request head we read before giving up on a connection.
const MAX_HEAD: usize = 16 * 1024;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn usage() -> ! {
    eprintln!("usage: limit PORT ?NPROCS?");
    exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 || args.len() > 3 {
        usage();
    }
    let port: u16 = args[1].parse().unwrap_or_else(|_| usage());
    let nprocs: usize = match args.get(2) {
        Some(s) => s.parse().ok().filter(|n| (1..=256).contains(n)).unwrap_or_else(|| usage()),
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };

    // std's listener sets SO_REUSEADDR and CLOEXEC, listens with backlog 128.
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap_or_else(|e| {
        eprintln!("limit: couldn't bind 127.0.0.1:{port}: {e}");
        exit(1);
    });
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);

    let parent = std::process::id() as libc::pid_t;
    let mut pids = Vec::with_capacity(nprocs);
    for _ in 0..nprocs {
        // SAFETY: single-threaded process; the child only runs plain Rust code
        // that allocates nothing before its own accept loop.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            eprintln!("limit: fork: {}", io::Error::last_os_error());
            kill_all(&pids);
            exit(1);
        }
        if pid == 0 {
            // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                exit(0); // the parent died before prctl took effect
            }
            serve(&listener);
        }
        pids.push(pid);
    }
    drop(listener);

    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    println!("port {port} pids {}", list.join(" "));
    let _ = io::stdout().flush();

    // No SA_RESTART: the signal must interrupt the parent's waitpid.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores into an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = 0;
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    let mut alive = pids.len();
    while !STOP.load(Ordering::SeqCst) && alive > 0 {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer; EINTR on a signal.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r > 0 {
            alive -= 1;
        } else if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    kill_all(&pids);
}

/// Kill every worker by pid and reap it (each wait bounded: SIGKILL after 1 s).
fn kill_all(pids: &[libc::pid_t]) {
    for &pid in pids {
        // SAFETY: kill with a pid we forked.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for &pid in pids {
        let mut reaped = false;
        for _ in 0..100 {
            let mut status = 0;
            // SAFETY: waitpid on our own child, non-blocking.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                reaped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !reaped {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn serve(listener: &TcpListener) -> ! {
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = answer(stream, &mut buf);
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::ECONNABORTED) => {}
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    eprintln!("limit: accept: {e}");
                    exit(1);
                }
            },
        }
    }
}

fn answer(mut stream: TcpStream, buf: &mut [u8]) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(()); // head too long: drop the connection
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(()); // peer closed before the blank line
        }
        let from = len.saturating_sub(3);
        len += n;
        if buf[from..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[from..len].windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    if buf[..len].starts_with(b"GET /slow") {
        std::thread::sleep(Duration::from_millis(5));
    }
    stream.write_all(RESPONSE)
    // The connection closes when `stream` drops.
}
