//! The wire between the dispatcher and its workers: the messages, as pure encode and decode
//! functions. Sockets and fds are `fdpass`'s; here are only bytes. This is the public protocol
//! that workers in other languages speak: `doc/protocol.md` describes it for them, and this table
//! is its summary. The version is [`VERSION`]; a registration says which version it speaks.
//!
//! Every message is one SOCK_SEQPACKET datagram (boundaries hold), starting with a tag byte.
//! Integers are little-endian; ports are big-endian (network order). A worker has two private
//! socketpairs with the dispatcher: its **link** (it says READY there, the dispatcher answers its
//! registration there, and its closing says the worker is gone) and its **mailbox** (connections
//! arrive there, one at a time). The registration socket is the one a forked child inherits, or a
//! connection to the server's `-path`.
//!
//! | direction | socket | bytes | fds |
//! |---|---|---|---|
//! | worker → dispatcher | registration | `W` version:u8 pid:i32 (6): the pid of the process that made the link (checked with SO_PEERCRED) | link, mailbox (dispatcher's ends), the worker's own mailbox end |
//! | dispatcher → worker | mailbox | `C` nonce:u64 (9): checks that the third fd is the mailbox's peer; the worker never sees it | none |
//! | dispatcher → worker | link | `A` version:u8 port:u16 (4): registered, with the version the dispatcher speaks and the TCP port it serves | none |
//! | dispatcher → worker | link | `N` reason:u8 value:u32 (6): refused; reason 1 = worker limit (value: the limit), 2 = serving process out of fds, 3 = invalid registration, 4 = unsupported version (value: the version spoken), 5 = not permitted (uid/gid) | none |
//! | worker → dispatcher | link | `R` asked:u64 (9): ready for one connection, asked at CLOCK_MONOTONIC ns | none |
//! | dispatcher → worker | mailbox | family:u8 (4 or 6) port:u16 address (4 or 16 bytes) (7 or 19) | the connection |
//! | worker → dispatcher | mailbox (the worker's end) | `P` then a peer as above (8 or 20): hand-back of a connection the worker is done with for now, to be parked until the client sends more | the connection |
//!
//! Anything else (another tag, another length, fds where none belong) is malformed: the
//! dispatcher drops the worker that sent it, or the registration it came with. A registration of
//! another version is answered with refusal 4, so that a later version can be told apart and
//! refused cleanly.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

const REGISTER: u8 = b'W';
const CHECK: u8 = b'C';
const ACCEPTED: u8 = b'A';
const REFUSED: u8 = b'N';
const READY: u8 = b'R';
const HANDBACK: u8 = b'P';

/// The protocol version this dispatcher and its Tcl workers speak.
pub const VERSION: u8 = 1;

/// Longest message: a hand-back with an IPv6 peer (1 + 1 + 2 + 16).
pub const MAX_MESSAGE: usize = 20;
/// The longest registration of any version (a dispatcher reads this much, to answer one of a
/// later version with the version it speaks).
pub const MAX_REGISTRATION: usize = 256;

/// What a peer address that cannot be read is reported as: 0.0.0.0 port 0.
pub const UNKNOWN_PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));

/// A registration: the protocol version the worker speaks, and its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    pub version: u8,
    pub pid: i32,
}

pub fn encode_registration(registration: Registration) -> [u8; 6] {
    let p = registration.pid.to_le_bytes();
    [REGISTER, registration.version, p[0], p[1], p[2], p[3]]
}

pub fn decode_registration(bytes: &[u8]) -> Option<Registration> {
    match bytes {
        [REGISTER, version, a, b, c, d] => Some(Registration { version: *version, pid: i32::from_le_bytes([*a, *b, *c, *d]) }),
        _ => None,
    }
}

/// The version a registration of any version speaks: every version starts `W`, version byte.
pub fn registration_version(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [REGISTER, version, ..] => Some(*version),
        _ => None,
    }
}

fn tag_u64(tag: u8, value: u64) -> [u8; 9] {
    let mut buf = [tag; 9];
    buf[1..].copy_from_slice(&value.to_le_bytes());
    buf
}

fn untag_u64(tag: u8, bytes: &[u8]) -> Option<u64> {
    match bytes {
        [t, rest @ ..] if *t == tag && rest.len() == 8 => Some(u64::from_le_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// A worker's READY, stamped with when it asked, so that READYs read together still queue in
/// the order they were sent.
pub fn encode_ready(asked_ns: u64) -> [u8; 9] {
    tag_u64(READY, asked_ns)
}

pub fn decode_ready(bytes: &[u8]) -> Option<u64> {
    untag_u64(READY, bytes)
}

/// The nonce the dispatcher sends into a new worker's mailbox and reads back from the fd the
/// worker claims is the mailbox's other end.
pub fn encode_check(nonce: u64) -> [u8; 9] {
    tag_u64(CHECK, nonce)
}

pub fn decode_check(bytes: &[u8]) -> Option<u64> {
    untag_u64(CHECK, bytes)
}

/// Why the dispatcher refused a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It has this many workers, its limit.
    WorkerLimit(u32),
    /// The serving process has no fds for another worker.
    OutOfFds,
    /// The registration's fds were not what they must be.
    Invalid,
    /// The registration spoke another version; the dispatcher speaks this one.
    Version(u8),
    /// The registering process's uid and gid are not allowed (`-allowusers`, `-allowgroups`).
    NotPermitted,
}

/// The dispatcher's answer to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Registered: the version the dispatcher speaks, and the TCP port it serves.
    Accepted { version: u8, port: u16 },
    Refused(Refusal),
}

pub fn encode_answer(answer: Answer) -> ([u8; 6], usize) {
    let (reason, value) = match answer {
        Answer::Accepted { version, port } => {
            let p = port.to_be_bytes();
            return ([ACCEPTED, version, p[0], p[1], 0, 0], 4);
        }
        Answer::Refused(Refusal::WorkerLimit(limit)) => (1, limit),
        Answer::Refused(Refusal::OutOfFds) => (2, 0),
        Answer::Refused(Refusal::Invalid) => (3, 0),
        Answer::Refused(Refusal::Version(spoken)) => (4, u32::from(spoken)),
        Answer::Refused(Refusal::NotPermitted) => (5, 0),
    };
    let v = value.to_le_bytes();
    ([REFUSED, reason, v[0], v[1], v[2], v[3]], 6)
}

pub fn decode_answer(bytes: &[u8]) -> Option<Answer> {
    match bytes {
        [ACCEPTED, version, p0, p1] => Some(Answer::Accepted { version: *version, port: u16::from_be_bytes([*p0, *p1]) }),
        [REFUSED, reason, a, b, c, d] => {
            let value = u32::from_le_bytes([*a, *b, *c, *d]);
            Some(Answer::Refused(match (reason, value) {
                (1, limit) => Refusal::WorkerLimit(limit),
                (2, 0) => Refusal::OutOfFds,
                (3, 0) => Refusal::Invalid,
                (4, spoken) => Refusal::Version(u8::try_from(spoken).ok()?),
                (5, 0) => Refusal::NotPermitted,
                _ => return None,
            }))
        }
        _ => None,
    }
}

/// Encodes a peer address: family (4 or 6), port (big-endian), address bytes.
pub fn encode_peer(peer: &SocketAddr, buf: &mut [u8; MAX_MESSAGE]) -> usize {
    buf[1..3].copy_from_slice(&peer.port().to_be_bytes());
    match peer.ip() {
        IpAddr::V4(ip) => {
            buf[0] = 4;
            buf[3..7].copy_from_slice(&ip.octets());
            7
        }
        IpAddr::V6(ip) => {
            buf[0] = 6;
            buf[3..19].copy_from_slice(&ip.octets());
            19
        }
    }
}

/// A worker's hand-back: `P` and the peer of the connection attached to the message.
pub fn encode_handback(peer: &SocketAddr, buf: &mut [u8; MAX_MESSAGE]) -> usize {
    let mut encoded = [0u8; MAX_MESSAGE];
    let len = encode_peer(peer, &mut encoded);
    buf[0] = HANDBACK;
    buf[1..=len].copy_from_slice(&encoded[..len]);
    len + 1
}

pub fn decode_handback(bytes: &[u8]) -> Option<SocketAddr> {
    match bytes {
        [HANDBACK, peer @ ..] => decode_peer(peer),
        _ => None,
    }
}

pub fn decode_peer(bytes: &[u8]) -> Option<SocketAddr> {
    match bytes {
        [4, p0, p1, a @ ..] if a.len() == 4 => {
            let octets: [u8; 4] = a.try_into().ok()?;
            Some(SocketAddr::new(Ipv4Addr::from(octets).into(), u16::from_be_bytes([*p0, *p1])))
        }
        [6, p0, p1, a @ ..] if a.len() == 16 => {
            let octets: [u8; 16] = a.try_into().ok()?;
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([*p0, *p1])))
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small seeded PRNG (xorshift64*): the same garbage on every run.
    pub(crate) struct Prng(pub u64);

    impl Prng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn bytes(&mut self, max_len: usize) -> Vec<u8> {
            let len = (self.next() % (max_len as u64 + 1)) as usize;
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn every_registration_tells_its_version_in_its_second_byte() {
        assert_eq!(registration_version(&encode_registration(Registration { version: VERSION, pid: 7 })), Some(VERSION));
        assert_eq!(registration_version(b"W\x09 and whatever a later version adds"), Some(9));
        assert_eq!(registration_version(b"W"), None);
        assert_eq!(registration_version(b"R\x01"), None);
    }

    #[test]
    fn every_message_round_trips() {
        let mut buf = [0; MAX_MESSAGE];
        for peer in ["127.0.0.1:8080", "[::1]:65535", "10.1.2.3:0", "[fe80::1]:1"] {
            let peer: SocketAddr = peer.parse().unwrap();
            let len = encode_peer(&peer, &mut buf);
            assert_eq!(decode_peer(&buf[..len]), Some(peer));
            let len = encode_handback(&peer, &mut buf);
            assert_eq!(decode_handback(&buf[..len]), Some(peer));
            assert_eq!(decode_peer(&buf[..len]), None, "a hand-back is not a delivery");
        }
        let registration = Registration { version: VERSION, pid: -7 };
        assert_eq!(decode_registration(&encode_registration(registration)), Some(registration));
        assert_eq!(decode_ready(&encode_ready(u64::MAX)), Some(u64::MAX));
        assert_eq!(decode_check(&encode_check(42)), Some(42));
        for answer in [
            Answer::Accepted { version: VERSION, port: 8080 },
            Answer::Refused(Refusal::WorkerLimit(500)),
            Answer::Refused(Refusal::OutOfFds),
            Answer::Refused(Refusal::Invalid),
            Answer::Refused(Refusal::Version(1)),
            Answer::Refused(Refusal::NotPermitted),
        ] {
            let (bytes, len) = encode_answer(answer);
            assert_eq!(decode_answer(&bytes[..len]), Some(answer));
        }
    }

    #[test]
    fn truncated_oversized_and_mistagged_messages_are_refused() {
        let ready = encode_ready(1);
        let registration = encode_registration(Registration { version: VERSION, pid: 1 });
        let check = encode_check(1);
        let (refused, _) = encode_answer(Answer::Refused(Refusal::OutOfFds));
        assert_eq!(decode_ready(&ready[..8]), None);
        assert_eq!(decode_ready(&[&ready[..], &[0]].concat()), None);
        assert_eq!(decode_ready(&check), None, "another tag");
        assert_eq!(decode_check(&ready), None);
        assert_eq!(decode_registration(&registration[..4]), None);
        assert_eq!(decode_registration(&[&registration[..], &[0]].concat()), None);
        assert_eq!(decode_answer(&refused[..5]), None);
        assert_eq!(decode_answer(&[b'N', 9, 0, 0, 0, 0]), None, "an unknown reason");
        assert_eq!(decode_answer(&[b'A', 0]), None);
        assert_eq!(decode_answer(&[b'A', 1, 0, 80, 0]), None, "an oversized acceptance");
        assert_eq!(decode_answer(&[b'N', 2, 1, 0, 0, 0]), None, "a value where none belongs");
        assert_eq!(decode_answer(&[b'N', 4, 0, 1, 0, 0]), None, "a version beyond a byte");
        assert_eq!(decode_peer(&[4, 0]), None);
        assert_eq!(decode_peer(&[4, 0, 1, 2, 3, 4]), None);
        assert_eq!(decode_peer(&[6, 0, 1, 2, 3, 4, 5, 6]), None);
        assert_eq!(decode_peer(&[5, 0, 1, 2, 3, 4]), None);
        assert_eq!(decode_handback(&[b'P', 4, 0, 1, 2, 3, 4]), None, "a truncated hand-back");
        assert_eq!(decode_handback(&[b'P', 4, 0, 1, 2, 3, 4, 5, 6]), None, "an oversized hand-back");
        assert_eq!(decode_handback(&[b'R', 4, 0, 1, 2, 3, 4, 5]), None, "another tag");
        for empty in [decode_ready(&[]).is_some(), decode_peer(&[]).is_some(), decode_answer(&[]).is_some()] {
            assert!(!empty);
        }
    }

    #[test]
    fn garbage_never_panics_and_decodes_only_to_what_encodes_back() {
        let mut rng = Prng(0x5eed);
        for _ in 0..20_000 {
            let bytes = rng.bytes(24);
            if let Some(registration) = decode_registration(&bytes) {
                assert_eq!(encode_registration(registration)[..], bytes[..]);
            }
            if let Some(at) = decode_ready(&bytes) {
                assert_eq!(encode_ready(at)[..], bytes[..]);
            }
            if let Some(answer) = decode_answer(&bytes) {
                let (back, len) = encode_answer(answer);
                assert_eq!(back[..len], bytes[..]);
            }
            if let Some(peer) = decode_handback(&bytes) {
                let mut back = [0; MAX_MESSAGE];
                let len = encode_handback(&peer, &mut back);
                assert_eq!(back[..len], bytes[..]);
            }
            if let Some(peer) = decode_peer(&bytes) {
                let mut back = [0; MAX_MESSAGE];
                let len = encode_peer(&peer, &mut back);
                assert_eq!(back[..len], bytes[..]);
            }
        }
    }
}
