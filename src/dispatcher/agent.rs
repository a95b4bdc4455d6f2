//! HAProxy's agent check (its `agent-check` server option), answered by the dispatcher thread on
//! a port of its own (`-agent`), and the drain state (`socket drain`).
//!
//! HAProxy connects, reads one line up to the first `\r` or `\n`, and applies its words: a
//! percentage sets the server's weight relative to its configured one, `drain` stops new
//! connections, `ready` ends a drain (only the agent can undo what it set), `up`/`down` set the
//! operational state. The dispatcher knows how many workers are ready, so it answers with that
//! share: a host whose workers are busy gets proportionally fewer connections, and a host that is
//! about to stop says `drain` first.
//!
//! Each connection is answered as soon as it is accepted, with one short write into its empty
//! send buffer, and closed: nothing here waits for a peer, so the agent port cannot stall the
//! dispatcher whoever connects to it. What the peer sent (HAProxy's `agent-send`) is read and
//! ignored, so that the close is a FIN rather than a reset.

use crate::fdpass;
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use nix::sys::socket::{self, MsgFlags};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Agent connections answered in a row before the other sockets get a look.
const ANSWER_BATCH: usize = 16;
/// The listen backlog of the agent port: balancers ask a few times a second at most.
const BACKLOG: u32 = 64;

/// What `info` reports of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentCounters {
    /// The bound agent port; 0 without `-agent`.
    pub port: u16,
    pub draining: bool,
    /// Connections answered, and how many of them were told `drain`.
    pub answers: u64,
    pub drains: u64,
}

/// The agent's line for a dispatcher with `registered` workers of which `ready` wait for a
/// connection: `drain` while draining; `down` with no worker; else `up ready N%`, N the ready
/// share, rounded, at least 1 (a busy host gets less traffic but stays in the farm). `ready` ends
/// a drain the agent set before (a reload's).
pub fn answer(draining: bool, registered: usize, ready: usize) -> String {
    if draining {
        return "drain\n".into();
    }
    if registered == 0 {
        return "down\n".into();
    }
    let ready = ready.min(registered);
    let percent = ((ready * 200 + registered) / (registered * 2)).max(1);
    format!("up ready {percent}%\n")
}

/// The agent port (if any) and the drain state.
pub struct Agent {
    listener: Option<ParentOnlyFd>,
    pub counters: AgentCounters,
}

impl Agent {
    /// Listens on `address` (port 0: the kernel picks) when given.
    pub fn new(address: Option<SocketAddr>) -> io::Result<Agent> {
        let mut counters = AgentCounters::default();
        let listener = match address {
            Some(address) => {
                let section = CreateSection::enter();
                let listener = section.adopt(fdpass::listen(address, BACKLOG)?)?;
                drop(section);
                counters.port = fdpass::local_addr(listener.as_fd())?.port();
                Some(listener)
            }
            None => None,
        };
        Ok(Agent { listener, counters })
    }

    pub fn listener(&self) -> Option<BorrowedFd<'_>> {
        self.listener.as_ref().map(|l| l.as_fd())
    }

    /// Answers the waiting agent connections (at most [`ANSWER_BATCH`]).
    /// Answers the waiting connections; true if it stopped for lack of fds or memory (the
    /// caller then stops watching the port for a while: a connection it cannot accept keeps the
    /// port readable).
    pub fn serve(&mut self, registered: usize, ready: usize) -> bool {
        let Some(listener) = &self.listener else { return false };
        let line = answer(self.counters.draining, registered, ready);
        for _ in 0..ANSWER_BATCH {
            // The connection lives only inside the section: a fork never catches it.
            let _section = CreateSection::enter();
            let conn = match fdpass::accept(listener.as_fd()) {
                Ok((conn, _)) => conn,
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => return false,
                // The peer gave up, or a signal: the next.
                Err(err) if matches!(err.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)) => {
                    continue
                }
                // Out of fds or memory.
                Err(_) => return true,
            };
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            // A fresh socket's send buffer is empty, so the short line goes in one write; a peer
            // that has already reset gets nothing, and is not counted.
            if socket::send(conn.as_raw_fd(), line.as_bytes(), flags) == Ok(line.len()) {
                self.counters.answers += 1;
                if self.counters.draining {
                    self.counters.drains += 1;
                }
            }
            // Whatever the peer sent so far (bounded: two reads), so the close is not a reset.
            let mut sink = [0u8; 512];
            for _ in 0..2 {
                if !matches!(socket::recv(conn.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0) {
                    break;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn the_answer_is_the_ready_share_drain_or_down() {
        assert_eq!(answer(false, 4, 4), "up ready 100%\n");
        assert_eq!(answer(false, 4, 3), "up ready 75%\n");
        assert_eq!(answer(false, 3, 2), "up ready 67%\n", "rounded to nearest");
        assert_eq!(answer(false, 3, 1), "up ready 33%\n");
        assert_eq!(answer(false, 8, 1), "up ready 13%\n", "12.5 rounds up");
        assert_eq!(answer(false, 4, 0), "up ready 1%\n", "busy, but not out of the farm");
        assert_eq!(answer(false, 1000, 1), "up ready 1%\n");
        assert_eq!(answer(false, 2, 5), "up ready 100%\n", "never above 100");
        assert_eq!(answer(false, 0, 0), "down\n");
        assert_eq!(answer(true, 4, 4), "drain\n");
        assert_eq!(answer(true, 0, 0), "drain\n", "a drain asked for holds while workers come and go");
    }

    fn ask(agent: &mut Agent, registered: usize, ready: usize, send: &[u8]) -> String {
        let address = SocketAddr::new("127.0.0.1".parse().unwrap(), agent.counters.port);
        let mut client = TcpStream::connect(address).unwrap();
        client.write_all(send).unwrap();
        fdpass::wait_readable(agent.listener().unwrap(), std::time::Duration::from_secs(5)).unwrap();
        agent.serve(registered, ready);
        let mut line = String::new();
        client.read_to_string(&mut line).expect("a clean close, not a reset");
        line
    }

    #[test]
    fn each_connection_gets_one_line_then_the_close_and_is_counted() {
        let mut agent = Agent::new(Some("127.0.0.1:0".parse().unwrap())).unwrap();
        assert_ne!(agent.counters.port, 0);
        assert_eq!(ask(&mut agent, 4, 1, b""), "up ready 25%\n");
        assert_eq!(ask(&mut agent, 4, 1, b"haproxy's agent-send text\n"), "up ready 25%\n");
        agent.counters.draining = true;
        assert_eq!(ask(&mut agent, 4, 1, b""), "drain\n");
        let counters = agent.counters;
        assert_eq!((counters.answers, counters.drains, counters.draining), (3, 1, true));
        agent.serve(4, 4); // nothing waiting: returns at once
        assert_eq!(agent.counters.answers, 3);
    }

    #[test]
    fn without_a_port_there_is_no_listener() {
        let mut agent = Agent::new(None).unwrap();
        assert!(agent.listener().is_none());
        assert_eq!(agent.counters.port, 0);
        agent.serve(1, 1);
        assert_eq!(agent.counters, AgentCounters::default());
    }
}
