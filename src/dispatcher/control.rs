//! Requests from the Tcl thread to its dispatcher thread, on their private control socket, and
//! the snapshot that answers `info`.
//!
//! - `S` (1 byte): stop.
//! - `D` flag:u8 (2): drain (1) or stop draining (0); no answer (a snapshot asked for after it
//!   sees it).
//! - `I` id:u64 (9): a snapshot, please. The answer is `I` id:u64 errno:i32 (13), then, when
//!   errno is 0, the encoded [`Snapshot`]: inline if it is at most [`INLINE_SNAPSHOT`] bytes (no
//!   fd needed, so `info` works even when the process is out of fds), else in a memfd attached
//!   to the answer, so that its size is bound by no socket buffer. Either way the dispatcher
//!   never waits for the Tcl thread to read it. The id tells an answer to this request from a
//!   late one to an earlier request that timed out.
//!
//! A snapshot: accepted:u64 delivered:u64 refused:u64 dropped:u64 parked:u64 parked_total:u64
//! handed_back:u64 closed_idle:u64 closed_header:u64 closed_peer:u64 evicted:u64 proxied:u64
//! proxy_rejected:u64 denied:u64 queued:u32 ready:u32 max_workers:u32 count:u32 (128 bytes), then `count`
//! workers of 24 bytes each: pid:i32 state:u32 delivered:u64 busy_ms:u64, then the agent's:
//! port:u32 draining:u32 answers:u64 drains:u64 (24 bytes). Little-endian.

use super::agent::AgentCounters;
use super::parked::ParkCounters;

/// What `::socketserver::info` reports of a dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub accepted: u64,
    pub delivered: u64,
    /// Registrations refused: worker limit, no fds, or not a valid registration.
    pub refused: u64,
    /// Of those, refused because the registering process's uid and gid are not permitted.
    pub denied: u64,
    /// Malformed messages from workers (each drops its worker) and fds read back from a dead
    /// worker's mailbox that were not a connection sent to it.
    pub dropped: u64,
    pub queued: u32,
    pub ready: u32,
    pub max_workers: u32,
    /// Parked connections now.
    pub parked: u64,
    pub park: ParkCounters,
    pub workers: Vec<WorkerStatus>,
    pub agent: AgentCounters,
}

/// One registered worker as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub pid: i32,
    pub state: WorkerState,
    /// Connections it has taken from its mailbox.
    pub delivered: u64,
    /// Milliseconds since its current connection was handed over (0 unless busy).
    pub busy_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Registered, has not asked for a connection yet.
    Idle = 0,
    /// Waiting for a connection.
    Ready = 1,
    /// Has been handed a connection and not asked for the next.
    Busy = 2,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
        }
    }
}

const STOP: u8 = b'S';
const SNAPSHOT: u8 = b'I';
const HEADER_LEN: usize = 128;
const COUNT_AT: usize = HEADER_LEN - 4;
const WORKER_LEN: usize = 24;
const AGENT_LEN: usize = 24;
const DRAIN: u8 = b'D';

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Stop,
    Snapshot(u64),
    Drain(bool),
}

pub fn encode_request(request: Request) -> Vec<u8> {
    match request {
        Request::Stop => vec![STOP],
        Request::Snapshot(id) => [&[SNAPSHOT][..], &id.to_le_bytes()].concat(),
        Request::Drain(on) => vec![DRAIN, on.into()],
    }
}

pub fn decode_request(bytes: &[u8]) -> Option<Request> {
    match bytes {
        [STOP] => Some(Request::Stop),
        [SNAPSHOT, id @ ..] => Some(Request::Snapshot(u64::from_le_bytes(id.try_into().ok()?))),
        [DRAIN, on @ (0 | 1)] => Some(Request::Drain(*on == 1)),
        _ => None,
    }
}

/// The largest snapshot sent inline (about 1300 workers): well under any socket send buffer.
pub const INLINE_SNAPSHOT: usize = 32 * 1024;
/// The largest answer: its header and an inline snapshot.
pub const MAX_ANSWER: usize = ANSWER_HEADER + INLINE_SNAPSHOT;
const ANSWER_HEADER: usize = 13;

/// The answer to snapshot request `id`: errno 0 when the snapshot follows, `inline` or in a
/// memfd attached to the message.
pub fn encode_answer(id: u64, errno: i32, inline: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANSWER_HEADER + inline.len());
    out.push(SNAPSHOT);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&errno.to_le_bytes());
    out.extend_from_slice(inline);
    out
}

/// The request id, errno and inline snapshot bytes of an answer.
pub fn decode_answer(bytes: &[u8]) -> Option<(u64, i32, &[u8])> {
    match bytes {
        [SNAPSHOT, rest @ ..] if rest.len() >= 12 => Some((
            u64::from_le_bytes(rest[..8].try_into().ok()?),
            i32::from_le_bytes(rest[8..12].try_into().ok()?),
            &rest[12..],
        )),
        _ => None,
    }
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + WORKER_LEN * self.workers.len() + AGENT_LEN);
        let p = &self.park;
        for n in [self.accepted, self.delivered, self.refused, self.dropped, self.parked, p.parked_total]
            .into_iter()
            .chain([p.handed_back, p.closed_idle, p.closed_header, p.closed_peer, p.evicted])
            .chain([p.proxied, p.proxy_rejected, self.denied])
        {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for n in [self.queued, self.ready, self.max_workers, self.workers.len() as u32] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for w in &self.workers {
            out.extend_from_slice(&w.pid.to_le_bytes());
            out.extend_from_slice(&(w.state as u32).to_le_bytes());
            out.extend_from_slice(&w.delivered.to_le_bytes());
            out.extend_from_slice(&w.busy_ms.to_le_bytes());
        }
        let agent = &self.agent;
        out.extend_from_slice(&u32::from(agent.port).to_le_bytes());
        out.extend_from_slice(&u32::from(agent.draining).to_le_bytes());
        out.extend_from_slice(&agent.answers.to_le_bytes());
        out.extend_from_slice(&agent.drains.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
        let u64_at = |i: usize| Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
        let count = u32_at(COUNT_AT)? as usize;
        let agent_at = HEADER_LEN + count.checked_mul(WORKER_LEN)?;
        if bytes.len() != agent_at + AGENT_LEN {
            return None;
        }
        let workers = (0..count)
            .map(|k| {
                let at = HEADER_LEN + k * WORKER_LEN;
                let state = match u32_at(at + 4)? {
                    0 => WorkerState::Idle,
                    1 => WorkerState::Ready,
                    2 => WorkerState::Busy,
                    _ => return None,
                };
                Some(WorkerStatus {
                    pid: u32_at(at)? as i32,
                    state,
                    delivered: u64_at(at + 8)?,
                    busy_ms: u64_at(at + 16)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Snapshot {
            accepted: u64_at(0)?,
            delivered: u64_at(8)?,
            refused: u64_at(16)?,
            dropped: u64_at(24)?,
            parked: u64_at(32)?,
            park: ParkCounters {
                parked_total: u64_at(40)?,
                handed_back: u64_at(48)?,
                closed_idle: u64_at(56)?,
                closed_header: u64_at(64)?,
                closed_peer: u64_at(72)?,
                evicted: u64_at(80)?,
                proxied: u64_at(88)?,
                proxy_rejected: u64_at(96)?,
            },
            denied: u64_at(104)?,
            queued: u32_at(112)?,
            ready: u32_at(116)?,
            max_workers: u32_at(120)?,
            workers,
            agent: AgentCounters {
                port: u16::try_from(u32_at(agent_at)?).ok()?,
                draining: match u32_at(agent_at + 4)? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
                answers: u64_at(agent_at + 8)?,
                drains: u64_at(agent_at + 16)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_a_wrong_length_is_refused() {
        let busy = WorkerStatus { pid: 3, state: WorkerState::Busy, delivered: 4, busy_ms: 12 };
        let ready = WorkerStatus { pid: -9, state: WorkerState::Ready, delivered: 1, busy_ms: 0 };
        let snap = Snapshot {
            accepted: 7,
            delivered: 5,
            refused: 2,
            denied: 1,
            dropped: 3,
            queued: 1,
            ready: 2,
            max_workers: 500,
            parked: 8,
            park: ParkCounters { parked_total: 9, handed_back: 10, closed_idle: 11, closed_header: 12, closed_peer: 13, evicted: 14, proxied: 15, proxy_rejected: 16 },
            workers: vec![busy, ready],
            agent: AgentCounters { port: 8081, draining: true, answers: 15, drains: 16 },
        };
        let bytes = snap.encode();
        assert_eq!(Snapshot::decode(&bytes), Some(snap));
        assert_eq!(Snapshot::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(Snapshot::decode(&[bytes.as_slice(), &[0]].concat()), None);
        assert_eq!(Snapshot::decode(&[0; HEADER_LEN - 1]), None);
        assert_eq!(Snapshot::decode(&[0xff; HEADER_LEN + AGENT_LEN]), None, "a count that does not fit");
        let mut bad = bytes.clone();
        let draining_at = bytes.len() - AGENT_LEN + 4;
        bad[draining_at] = 2;
        assert_eq!(Snapshot::decode(&bad), None, "draining is 0 or 1");
    }

    #[test]
    fn requests_and_answers_round_trip() {
        for request in [Request::Stop, Request::Snapshot(u64::MAX), Request::Drain(true), Request::Drain(false)] {
            assert_eq!(decode_request(&encode_request(request)), Some(request));
        }
        assert_eq!(decode_request(&[SNAPSHOT, 1]), None);
        assert_eq!(decode_request(&[]), None);
        assert_eq!(decode_request(&[DRAIN, 2]), None);
        assert_eq!(decode_request(&[DRAIN]), None);
        assert_eq!(decode_answer(&encode_answer(9, libc::EMFILE, &[])), Some((9, libc::EMFILE, &[][..])));
        assert_eq!(decode_answer(&encode_answer(9, 0, b"abc")), Some((9, 0, &b"abc"[..])));
        assert_eq!(decode_answer(&encode_answer(9, 0, &[])[..12]), None);
    }
}
