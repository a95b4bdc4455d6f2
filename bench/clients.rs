//! `clients`: the benchmark's clients for parked connections (issue 11) that wrk and ab cannot
//! be — thousands of connections that stay open and send nothing or a byte at a time, and normal
//! requests timed one by one, each with a deadline, so that a server that never answers gives a
//! figure too. Loopback only (127.0.0.1).
//!
//! Usage:
//! - `clients hold PORT IDLE DRIP INTERVAL_MS LIMIT_S`: opens IDLE connections that send
//!   nothing, then DRIP that send an HTTP/1.1 request head one byte at a time, each every
//!   INTERVAL_MS (the drippers take turns, evenly spread), and prints `ready IDLE DRIP` once all
//!   are connected. Holds them until its stdin ends or LIMIT_S seconds have passed, then exits
//!   (the kernel closes them). A connection the server closes is not replaced. Raises its soft
//!   RLIMIT_NOFILE to the hard limit first, and fails at once if that is not enough.
//! - `clients requests PORT N DURATION_S TIMEOUT_MS`: sends normal requests (`GET /`,
//!   `Connection: close`) one after the other, at most N and for at most DURATION_S seconds, each
//!   given TIMEOUT_MS from the start of connect to the end of the answer. Prints one line, a Tcl
//!   dict: `requests answered timeouts failed p50 p99 max` (milliseconds, over every request
//!   sent; one that timed out counts as TIMEOUT_MS, so a p99 of TIMEOUT_MS means "no answer").
//!
//! Every connect is bounded in time (at most 5 s each for `hold`, whose caller also bounds the
//! whole run and kills it by pid).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

const DRIP_HEAD: &[u8] = b"GET /drip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
const HOLD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn usage() -> ! {
    eprintln!(
        "usage: clients hold PORT IDLE DRIP INTERVAL_MS LIMIT_S\n       \
         clients requests PORT N DURATION_S TIMEOUT_MS"
    );
    exit(2);
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("clients: {what}: {e}");
    exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let numbers: Vec<u64> = args
        .iter()
        .skip(1)
        .map(|a| a.parse().unwrap_or_else(|_| usage()))
        .collect();
    match (args.first().map(String::as_str), numbers.as_slice()) {
        (Some("hold"), &[port, idle, drip, interval, limit]) => {
            hold(port_of(port), idle as usize, drip as usize, interval, limit)
        }
        (Some("requests"), &[port, n, duration, timeout]) if timeout > 0 => {
            requests(port_of(port), n, duration, timeout)
        }
        _ => usage(),
    }
}

fn port_of(n: u64) -> SocketAddr {
    match u16::try_from(n) {
        Ok(p) if p > 0 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p)),
        _ => usage(),
    }
}

/// Room for `need` more fds: the soft limit raised to the hard one if that is needed.
fn raise_nofile(need: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or_else(|e| fail("getrlimit", e));
    if soft < need {
        if hard < need {
            fail("RLIMIT_NOFILE", format!("{need} fds needed, the hard limit is {hard}"));
        }
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap_or_else(|e| fail("setrlimit", e));
    }
}

fn hold(addr: SocketAddr, idle: usize, drip: usize, interval_ms: u64, limit_s: u64) {
    raise_nofile((idle + drip) as u64 + 32);
    let connect = |i: usize| {
        TcpStream::connect_timeout(&addr, HOLD_CONNECT_TIMEOUT)
            .unwrap_or_else(|e| fail(&format!("connection {} of {}", i + 1, idle + drip), e))
    };
    let silent: Vec<TcpStream> = (0..idle).map(connect).collect();
    let mut drippers: Vec<(TcpStream, usize)> = (idle..idle + drip).map(|i| (connect(i), 0)).collect();
    println!("ready {idle} {drip}");
    let _ = io::stdout().flush();

    // stdin's end (the driver closes it, or goes away) stops us.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = Arc::clone(&stop);
    thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !matches!(io::stdin().read(&mut buf), Ok(0) | Err(_)) {}
        stop_reader.store(true, Ordering::SeqCst);
    });
    let end = Instant::now() + Duration::from_secs(limit_s);
    // One byte to the next dripper per tick: each gets one every interval.
    let tick = Duration::from_millis((interval_ms / drip.max(1) as u64).max(1));
    let mut next = 0;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        thread::sleep(tick);
        if drippers.is_empty() {
            continue;
        }
        next %= drippers.len();
        let (stream, sent) = &mut drippers[next];
        // A write error: the server closed it. A complete head: nothing more to send.
        if stream.write_all(&DRIP_HEAD[*sent..*sent + 1]).is_err() || *sent + 1 == DRIP_HEAD.len() {
            drippers.swap_remove(next);
        } else {
            *sent += 1;
            next += 1;
        }
    }
    drop(silent);
}

enum Outcome {
    Answered,
    TimedOut,
    Failed,
}

/// One request within `timeout`: whether a 200 answer came, then the end of the connection.
fn request(addr: &SocketAddr, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let left = || timeout.checked_sub(start.elapsed()).filter(|d| !d.is_zero());
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(addr, timeout)?;
        stream.set_write_timeout(left())?;
        stream.write_all(REQUEST)?;
        let mut answer = Vec::with_capacity(256);
        let mut buf = [0u8; 4096];
        loop {
            let Some(rest) = left() else {
                return Err(io::ErrorKind::TimedOut.into());
            };
            stream.set_read_timeout(Some(rest))?;
            match stream.read(&mut buf)? {
                0 => return Ok(answer.starts_with(b"HTTP/1.1 200 ") || answer.starts_with(b"HTTP/1.0 200 ")),
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    match attempt() {
        Ok(true) => Outcome::Answered,
        Ok(false) => Outcome::Failed,
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => Outcome::TimedOut,
        Err(_) => Outcome::Failed,
    }
}

fn requests(addr: SocketAddr, n: u64, duration_s: u64, timeout_ms: u64) {
    let timeout = Duration::from_millis(timeout_ms);
    let end = Instant::now() + Duration::from_secs(duration_s);
    let (mut answered, mut timeouts, mut failed) = (0, 0, 0);
    let mut times: Vec<f64> = Vec::new();
    while (times.len() as u64) < n && Instant::now() < end {
        let start = Instant::now();
        let ms = match request(&addr, timeout) {
            Outcome::Answered => {
                answered += 1;
                start.elapsed().as_secs_f64() * 1000.0
            }
            Outcome::TimedOut => {
                timeouts += 1;
                timeout_ms as f64
            }
            Outcome::Failed => {
                failed += 1;
                start.elapsed().as_secs_f64() * 1000.0
            }
        };
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        let i = ((q * times.len() as f64).ceil() as usize).max(1) - 1;
        times.get(i).map_or_else(String::new, |v| format!("{v:.3}"))
    };
    println!(
        "requests {} answered {answered} timeouts {timeouts} failed {failed} p50 {{{}}} p99 {{{}}} max {{{}}}",
        times.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
