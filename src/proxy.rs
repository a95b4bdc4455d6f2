//! The PROXY protocol (HAProxy's doc/proxy-protocol.txt), as a receiver: pure functions over the
//! bytes peeked from a new connection, no I/O. The dispatcher peeks, asks [`parse`] whether a
//! whole header is there and how long it is, then reads exactly that many bytes, so the request
//! after it stays in the socket for the worker.
//!
//! - v1: one text line `PROXY TCP4|TCP6 src dst sport dport\r\n` of at most 107 bytes, or
//!   `PROXY UNKNOWN ...\r\n` (keep the socket's own peer). Anything not exactly that is rejected,
//!   as the spec asks (no leading zeros, single spaces, a CR only before the LF).
//! - v2: a 12-byte signature, version/command, family/transport, a 16-bit length, then the
//!   address block and TLVs (skipped, but they must tile the rest of the block exactly). The
//!   LOCAL command (a health check of the proxy's own) and the families and transports that carry
//!   no TCP address (UNSPEC, UNIX, UDP) keep the socket's own peer.
//!
//! Every input is untrusted: any prefix of any byte string gives an answer without panicking,
//! and an answer never claims more bytes than were given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// The longest v1 line, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two IPv6
/// addresses).
pub const MAX_V1: usize = 107;
/// The longest v2 header taken (16 + address block + TLVs): HAProxy's own TLVs (unique id,
/// authority, SSL, netns) come to well under 1 KiB; more is refused as oversized.
pub const MAX_V2: usize = 4096;
/// The most bytes [`parse`] needs to see to decide.
pub const MAX_HEADER: usize = MAX_V2;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

/// Which headers a server takes (`server -proxy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accept {
    /// No PROXY protocol: every connection is a direct client.
    #[default]
    None = 0,
    V1 = 1,
    V2 = 2,
    /// Either version, told apart by the first byte.
    Any = 3,
}

impl Accept {
    /// The names, in the order of the variants.
    pub const NAMES: [&'static str; 4] = ["none", "v1", "v2", "any"];
    const ALL: [Accept; 4] = [Accept::None, Accept::V1, Accept::V2, Accept::Any];

    pub fn name(self) -> &'static str {
        Accept::NAMES[self as usize]
    }

    pub fn from_index(index: usize) -> Option<Accept> {
        Accept::ALL.get(index).copied()
    }
}

/// A whole header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes: what is to be consumed.
    pub len: usize,
    /// The real client; None: keep the socket's own peer (LOCAL, UNKNOWN, or no TCP address).
    pub source: Option<SocketAddr>,
}

/// What the bytes seen so far come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning: more bytes are needed.
    Incomplete,
    Header(Header),
}

/// Why a connection's first bytes are not a header it may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not the beginning of a header of an accepted version.
    NotAHeader,
    /// A header's beginning, then bytes the spec does not allow.
    Invalid,
    /// Longer than [`MAX_V1`] or [`MAX_V2`].
    Oversized,
}

/// Parses the first bytes of a connection as a header of the versions `accept` takes.
/// `Accept::None` takes none: every input is `NotAHeader`.
pub fn parse(accept: Accept, bytes: &[u8]) -> Result<Parsed, Rejected> {
    let Some(&first) = bytes.first() else { return Ok(Parsed::Incomplete) };
    match accept {
        Accept::V1 | Accept::Any if first == V1_PREFIX[0] => parse_v1(bytes),
        Accept::V2 | Accept::Any if first == V2_SIGNATURE[0] => parse_v2(bytes),
        _ => Err(Rejected::NotAHeader),
    }
}

/// For a connection from an untrusted source: whether its first bytes are a PROXY header's
/// beginning (v1's `PROXY ` or v2's signature, whatever `-proxy` takes). None while they are a
/// proper prefix of one (more bytes decide).
pub fn starts_like_header(bytes: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for signature in [V1_PREFIX, &V2_SIGNATURE[..]] {
        let n = bytes.len().min(signature.len());
        if bytes[..n] == signature[..n] {
            if n == signature.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(false)
}

/// Checks that `bytes` begins like `expected` (or is a proper prefix of it).
fn check_prefix(bytes: &[u8], expected: &[u8]) -> Result<bool, Rejected> {
    let n = bytes.len().min(expected.len());
    if bytes[..n] != expected[..n] {
        return Err(Rejected::NotAHeader);
    }
    Ok(n == expected.len())
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, Rejected> {
    if !check_prefix(bytes, V1_PREFIX)? {
        return Ok(Parsed::Incomplete);
    }
    let window = &bytes[..bytes.len().min(MAX_V1)];
    // The first CR or LF ends the line: it must be a CR, followed by LF, within 107 bytes.
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if bytes.len() >= MAX_V1 { Err(Rejected::Oversized) } else { Ok(Parsed::Incomplete) };
    };
    match bytes.get(end + 1) {
        _ if bytes[end] == b'\n' => return Err(Rejected::Invalid),
        _ if end + 2 > MAX_V1 => return Err(Rejected::Oversized),
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(Rejected::Invalid),
    }
    let line = std::str::from_utf8(&bytes[V1_PREFIX.len()..end]).map_err(|_| Rejected::Invalid)?;
    let len = end + 2;
    let mut fields = line.split(' ');
    let source = match fields.next() {
        Some("UNKNOWN") => return Ok(Parsed::Header(Header { len, source: None })),
        Some("TCP4") => v1_source::<Ipv4Addr>(fields)?,
        Some("TCP6") => v1_source::<Ipv6Addr>(fields)?,
        _ => return Err(Rejected::Invalid),
    };
    Ok(Parsed::Header(Header { len, source: Some(source) }))
}

/// `src dst sport dport`, exactly, with addresses of one family.
fn v1_source<'a, A: FromStr + Into<IpAddr>>(mut fields: impl Iterator<Item = &'a str>) -> Result<SocketAddr, Rejected> {
    let mut next = || fields.next().ok_or(Rejected::Invalid);
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if next().is_ok() {
        return Err(Rejected::Invalid);
    }
    let address = |text: &str| text.parse::<A>().map(Into::into).map_err(|_| Rejected::Invalid);
    let source = address(src)?;
    address(dst)?;
    v1_port(dport)?;
    Ok(SocketAddr::new(source, v1_port(sport)?))
}

/// A decimal port without leading zeros.
fn v1_port(text: &str) -> Result<u16, Rejected> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    let leading_zero = text.len() > 1 && text.starts_with('0');
    match text.parse::<u16>() {
        Ok(port) if digits && !leading_zero => Ok(port),
        _ => Err(Rejected::Invalid),
    }
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, Rejected> {
    if !check_prefix(bytes, V2_SIGNATURE)? {
        return Ok(Parsed::Incomplete);
    }
    // Version 2; command LOCAL (0) or PROXY (1). Checked as soon as it is there.
    let local = match bytes.get(12) {
        None => return Ok(Parsed::Incomplete),
        Some(0x20) => true,
        Some(0x21) => false,
        Some(_) => return Err(Rejected::Invalid),
    };
    let Some(&[family_transport, hi, lo]) = bytes.get(13..V2_FIXED) else { return Ok(Parsed::Incomplete) };
    let len = V2_FIXED + usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_V2 {
        return Err(Rejected::Oversized);
    }
    let (family, transport) = (family_transport >> 4, family_transport & 0x0f);
    if !local && (family > 3 || transport > 2) {
        return Err(Rejected::Invalid);
    }
    // The address block each family needs: checked before the rest arrives.
    let address_len = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if !local && len < V2_FIXED + address_len {
        return Err(Rejected::Invalid);
    }
    let Some(block) = bytes.get(V2_FIXED..len) else { return Ok(Parsed::Incomplete) };
    // LOCAL: the whole block is ignored, as is an UNSPEC one (its layout is unknown).
    if local || family == 0 {
        return Ok(Parsed::Header(Header { len, source: None }));
    }
    check_tlvs(&block[address_len..])?;
    let source = match (family, transport) {
        (1, 1) => {
            let ip: [u8; 4] = block[..4].try_into().expect("4 bytes");
            Some(SocketAddr::new(Ipv4Addr::from(ip).into(), u16::from_be_bytes([block[8], block[9]])))
        }
        (2, 1) => {
            let ip: [u8; 16] = block[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes([block[32], block[33]])))
        }
        // UNIX, UDP, or no transport: the spec's fallback is UNSPEC, the socket's own peer.
        _ => None,
    };
    Ok(Parsed::Header(Header { len, source }))
}

/// TLVs (type:u8, length:u16 big-endian, value) must tile what follows the addresses exactly.
fn check_tlvs(mut rest: &[u8]) -> Result<(), Rejected> {
    loop {
        match rest {
            [] => return Ok(()),
            [_, hi, lo, tail @ ..] => rest = tail.get(usize::from(u16::from_be_bytes([*hi, *lo]))..).ok_or(Rejected::Invalid)?,
            _ => return Err(Rejected::Invalid),
        }
    }
}

/// An address range, `addr/bits` (or one address): `-proxyfrom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. IPv4 addresses mapped into IPv6 (`::ffff:a.b.c.d`, a dual
    /// stack listener's IPv4 peers) are matched as the IPv4 addresses they are.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    a[..whole] == b[..whole] && (rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0)
}

impl FromStr for Cidr {
    type Err = ();

    /// `addr` or `addr/bits`, bits at most 32 (IPv4) or 128 (IPv6), digits only; the address's
    /// bits beyond the prefix may be set (`10.1.2.3/8` is `10.0.0.0/8`).
    fn from_str(text: &str) -> Result<Cidr, ()> {
        let (address, bits) = match text.split_once('/') {
            Some((address, bits)) if !bits.is_empty() && bits.bytes().all(|b| b.is_ascii_digit()) => {
                (address, Some(bits.parse::<u8>().map_err(|_| ())?))
            }
            Some(_) => return Err(()),
            None => (text, None),
        };
        let network = address.parse::<IpAddr>().map_err(|_| ())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        match bits.unwrap_or(max) {
            bits if bits <= max => Ok(Cidr { network, bits }),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.bits)
    }
}

/// The default `-proxyfrom`: loopback only.
pub fn default_trusted() -> Vec<Cidr> {
    vec![Cidr { network: Ipv4Addr::new(127, 0, 0, 0).into(), bits: 8 }, Cidr { network: Ipv6Addr::LOCALHOST.into(), bits: 128 }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::Prng;

    fn header(len: usize, source: &str) -> Result<Parsed, Rejected> {
        Ok(Parsed::Header(Header { len, source: Some(source.parse().unwrap()) }))
    }

    fn local(len: usize) -> Result<Parsed, Rejected> {
        Ok(Parsed::Header(Header { len, source: None }))
    }

    /// A v2 header: command byte, family byte, block.
    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[command, family]);
        out.extend_from_slice(&(block.len() as u16).to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    fn v2_inet(tlvs: &[u8]) -> Vec<u8> {
        let block = [&[192, 0, 2, 7, 10, 0, 0, 1, 0xd4, 0x31, 0, 80][..], tlvs].concat();
        v2(0x21, 0x11, &block)
    }

    fn v2_inet6() -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let block = [&src.octets()[..], &Ipv6Addr::LOCALHOST.octets(), &[0xff, 0xff, 0x01, 0xbb]].concat();
        v2(0x21, 0x21, &block)
    }

    #[test]
    fn v1_lines_give_the_source_and_their_length() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 54321 80\r\nGET / HTTP/1.0\r\n\r\n";
        assert_eq!(parse(Accept::V1, line), header(40, "192.0.2.7:54321"));
        assert_eq!(parse(Accept::Any, line), header(40, "192.0.2.7:54321"));
        let line = b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n";
        assert_eq!(parse(Accept::V1, line), header(line.len(), "[2001:db8::7]:65535"));
        let line = b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n";
        assert_eq!(parse(Accept::V1, line), header(line.len(), "[::ffff:192.0.2.7]:1"));
        assert_eq!(parse(Accept::V1, b"PROXY UNKNOWN\r\n"), local(15));
        let worst = format!("PROXY UNKNOWN {0} {0} 65535 65535\r\n", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
        assert_eq!(worst.len(), MAX_V1);
        assert_eq!(parse(Accept::V1, worst.as_bytes()), local(MAX_V1), "the longest line is taken");
    }

    #[test]
    fn v1_lines_that_are_not_exactly_the_format_are_invalid() {
        for bad in [
            "PROXY TCP4 192.0.2.7 10.0.0.1 54321 80\n",       // LF alone
            "PROXY TCP4 192.0.2.7 10.0.0.1 54321 80\rX",      // CR alone
            "PROXY TCP4 192.0.2.7  10.0.0.1 54321 80\r\n",    // two spaces
            "PROXY TCP4 192.0.2.7 10.0.0.1 54321 80 \r\n",    // trailing space
            "PROXY TCP4 192.0.2.7 10.0.0.1 54321\r\n",        // a field missing
            "PROXY TCP4 192.0.2.7 10.0.0.1 54321 80 1\r\n",   // one too many
            "PROXY TCP4 192.0.2.07 10.0.0.1 54321 80\r\n",    // octal-looking
            "PROXY TCP4 192.0.2.256 10.0.0.1 54321 80\r\n",
            "PROXY TCP4 ::1 10.0.0.1 54321 80\r\n",           // family mismatch
            "PROXY TCP6 192.0.2.7 ::1 54321 80\r\n",
            "PROXY TCP4 192.0.2.7 10.0.0.1 054321 80\r\n",    // leading zero
            "PROXY TCP4 192.0.2.7 10.0.0.1 65536 80\r\n",
            "PROXY TCP4 192.0.2.7 10.0.0.1 +1 80\r\n",
            "PROXY TCP4 192.0.2.7 10.0.0.1 1 -0\r\n",
            "PROXY TCP5 192.0.2.7 10.0.0.1 1 2\r\n",
            "PROXY tcp4 192.0.2.7 10.0.0.1 1 2\r\n",
            "PROXY \r\n",
            "PROXY UNKNOWN\n",
        ] {
            assert_eq!(parse(Accept::V1, bad.as_bytes()), Err(Rejected::Invalid), "{bad:?}");
        }
        assert_eq!(parse(Accept::V1, b"PROXY TCP4 \xff 1 2\r\n"), Err(Rejected::Invalid), "not ASCII");
    }

    #[test]
    fn a_v1_line_without_crlf_in_107_bytes_is_oversized() {
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1));
        assert_eq!(parse(Accept::V1, &long.as_bytes()[..MAX_V1]), Err(Rejected::Oversized));
        assert_eq!(parse(Accept::V1, long.as_bytes()), Err(Rejected::Oversized));
        assert_eq!(parse(Accept::V1, &long.as_bytes()[..MAX_V1 - 1]), Ok(Parsed::Incomplete));
        let lf_past_107 = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1 - 15));
        assert_eq!(lf_past_107.len(), MAX_V1 + 1);
        assert_eq!(parse(Accept::V1, lf_past_107.as_bytes()), Err(Rejected::Oversized), "the LF is byte 108");
    }

    #[test]
    fn every_truncation_of_a_valid_header_is_incomplete() {
        let v1 = b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n".to_vec();
        for (accept, whole) in [(Accept::V1, v1), (Accept::V2, v2_inet(&[1, 0, 2, b'h', b'2'])), (Accept::V2, v2_inet6())] {
            for n in 0..whole.len() {
                assert_eq!(parse(accept, &whole[..n]), Ok(Parsed::Incomplete), "{:?}", &whole[..n]);
                assert_eq!(parse(Accept::Any, &whole[..n]), Ok(Parsed::Incomplete));
            }
            assert!(matches!(parse(accept, &whole), Ok(Parsed::Header(h)) if h.len == whole.len()));
        }
    }

    #[test]
    fn v2_headers_give_the_source_and_skip_tlvs() {
        assert_eq!(parse(Accept::V2, &v2_inet(&[])), header(28, "192.0.2.7:54321"));
        let tlvs = [&[0x01, 0, 2][..], b"h2", &[0x05, 0, 0], &[0x04, 0, 3], &[0; 3]].concat();
        let with_tlvs = [v2_inet(&tlvs), b"GET /".to_vec()].concat();
        assert_eq!(parse(Accept::Any, &with_tlvs), header(28 + tlvs.len(), "192.0.2.7:54321"), "bytes after it are not its");
        assert_eq!(parse(Accept::V2, &v2_inet6()), header(52, "[2001:db8::7]:65535"));
        assert_eq!(parse(Accept::V2, &v2(0x20, 0x00, &[])), local(16), "LOCAL");
        assert_eq!(parse(Accept::V2, &v2(0x20, 0x11, &[9; 12])), local(28), "LOCAL ignores the block");
        assert_eq!(parse(Accept::V2, &v2(0x20, 0xff, &[9; 3])), local(19), "... even its family");
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x00, &[1, 2])), local(18), "UNSPEC");
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x12, &[1; 12])), local(28), "UDP: the socket's peer");
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x10, &[1; 12])), local(28), "no transport");
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x31, &[0; 216])), local(232), "UNIX");
    }

    #[test]
    fn v2_headers_with_bogus_fields_or_lengths_are_refused() {
        let mut bad_version = v2_inet(&[]);
        bad_version[12] = 0x11;
        assert_eq!(parse(Accept::V2, &bad_version[..13]), Err(Rejected::Invalid), "seen at its byte");
        for command in [0x22, 0x2f, 0x31, 0x01] {
            assert_eq!(parse(Accept::V2, &v2(command, 0x11, &[0; 12])), Err(Rejected::Invalid), "{command:#x}");
        }
        for family in [0x41, 0x13, 0xf1] {
            assert_eq!(parse(Accept::V2, &v2(0x21, family, &[0; 12])[..16]), Err(Rejected::Invalid), "{family:#x}");
        }
        // Lengths shorter than the family's addresses: refused from the fixed part alone.
        for (family, short) in [(0x11, 11), (0x21, 35), (0x31, 215), (0x11, 0)] {
            let header = v2(0x21, family, &vec![0; short]);
            assert_eq!(parse(Accept::V2, &header[..16]), Err(Rejected::Invalid), "{family:#x} {short}");
        }
        // TLVs that overrun the block or leave a stub.
        for tlvs in [&[1, 0, 3, b'h', b'2'][..], &[1, 0], &[1], &[1, 0, 0, 2]] {
            assert_eq!(parse(Accept::V2, &v2_inet(tlvs)), Err(Rejected::Invalid), "{tlvs:?}");
        }
        // Lengths past the limit: refused before the bytes arrive.
        let mut huge = v2_inet(&[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(Accept::V2, &huge), Err(Rejected::Oversized));
        let tlv = |len: usize| [&[0; 12][..], &[0xe0], &(len as u16).to_be_bytes(), &vec![0; len]].concat();
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x11, &tlv(MAX_V2 - 31))), header(MAX_V2, "0.0.0.0:0"));
        assert_eq!(parse(Accept::V2, &v2(0x21, 0x11, &tlv(MAX_V2 - 30))[..16]), Err(Rejected::Oversized));
    }

    #[test]
    fn each_version_takes_only_its_own_headers() {
        let v1 = b"PROXY UNKNOWN\r\n";
        let v2 = v2_inet(&[]);
        assert_eq!(parse(Accept::V2, v1), Err(Rejected::NotAHeader));
        assert_eq!(parse(Accept::V1, &v2), Err(Rejected::NotAHeader));
        for accept in Accept::ALL {
            assert_eq!(parse(accept, b"GET / HTTP/1.1\r\n\r\n"), Err(Rejected::NotAHeader));
            assert_eq!(parse(accept, b""), Ok(Parsed::Incomplete));
        }
        assert_eq!(parse(Accept::None, v1), Err(Rejected::NotAHeader));
        assert_eq!(parse(Accept::V1, b"PROXX"), Err(Rejected::NotAHeader));
        assert_eq!(parse(Accept::V1, b"PROX"), Ok(Parsed::Incomplete));
        assert_eq!(parse(Accept::V2, b"\r\n\r\n\0\r\nQUIX"), Err(Rejected::NotAHeader));
    }

    #[test]
    fn garbage_never_panics_and_never_claims_bytes_it_was_not_given() {
        let mut rng = Prng(0x9e37_79b9);
        let seeds: [Vec<u8>; 3] = [b"PROXY TCP4 1.2.3.4 5.6.7.8 9 10\r\n".to_vec(), v2_inet(&[1, 0, 1, 7]), v2_inet6()];
        for round in 0..30_000 {
            // Pure noise, or a valid header with bytes flipped, cut or appended.
            let bytes = match round % 4 {
                0 => rng.bytes(200),
                seed => {
                    let mut bytes = seeds[seed - 1].clone();
                    for _ in 0..1 + rng.next() % 3 {
                        let at = (rng.next() as usize) % bytes.len();
                        bytes[at] = rng.next() as u8;
                    }
                    bytes.truncate((rng.next() as usize) % (bytes.len() + 1));
                    bytes.extend(rng.bytes(8));
                    bytes
                }
            };
            for accept in Accept::ALL {
                if let Ok(Parsed::Header(h)) = parse(accept, &bytes) {
                    assert!(h.len <= bytes.len() && h.len <= MAX_HEADER, "{bytes:?}");
                    // The same header is found whatever follows it.
                    assert_eq!(parse(accept, &bytes[..h.len]), Ok(Parsed::Header(h)));
                }
            }
            let _ = starts_like_header(&bytes);
        }
    }

    #[test]
    fn untrusted_first_bytes_are_told_from_headers() {
        assert_eq!(starts_like_header(b"PROXY TCP4"), Some(true));
        assert_eq!(starts_like_header(b"PROXY "), Some(true));
        assert_eq!(starts_like_header(&v2_inet(&[])[..12]), Some(true));
        assert_eq!(starts_like_header(b"PROXY"), None);
        assert_eq!(starts_like_header(b"\r\n\r\n"), None);
        assert_eq!(starts_like_header(b""), None);
        assert_eq!(starts_like_header(b"GET /"), Some(false));
        assert_eq!(starts_like_header(b"PROXYZ"), Some(false));
        assert_eq!(starts_like_header(b"\r\n\r\nX"), Some(false));
    }

    #[test]
    fn cidrs_parse_and_match() {
        let cidr = |text: &str| text.parse::<Cidr>().unwrap();
        assert!(cidr("10.0.0.0/8").contains("10.255.1.2".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("10.1.2.3/8").contains("10.9.9.9".parse().unwrap()), "host bits ignored");
        assert!(cidr("192.168.1.128/25").contains("192.168.1.200".parse().unwrap()));
        assert!(!cidr("192.168.1.128/25").contains("192.168.1.127".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("::2".parse().unwrap()), "families do not mix");
        assert!(cidr("127.0.0.1").contains("::ffff:127.0.0.1".parse().unwrap()), "IPv4-mapped peers");
        assert!(!cidr("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        assert!(cidr("2001:db8::/32").contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!cidr("2001:db8::/33").contains("2001:db8:8000::1".parse().unwrap()));
        assert!(cidr("::1").contains("::1".parse().unwrap()));
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.1.2.3/8");
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/+8", "x/8", "10.0.0.0/8/8", "localhost"] {
            assert_eq!(bad.parse::<Cidr>(), Err(()), "{bad:?}");
        }
        let defaults = default_trusted();
        assert!(defaults.iter().any(|c| c.contains("127.0.0.2".parse().unwrap())));
        assert!(defaults.iter().any(|c| c.contains("::1".parse().unwrap())));
        assert!(!defaults.iter().any(|c| c.contains("192.0.2.1".parse().unwrap())));
    }

    #[test]
    fn accept_modes_have_their_names() {
        for (index, name) in Accept::NAMES.iter().enumerate() {
            assert_eq!(Accept::from_index(index).map(Accept::name), Some(*name));
        }
        assert_eq!(Accept::from_index(4), None);
    }
}
