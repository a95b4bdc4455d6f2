//! Argument parsing for the Tcl commands, with Tcl-style messages. No Tcl here.

use crate::dispatcher::{ServerConfig, Wait};
use crate::proxy::{Accept, Cidr};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub const SERVER_USAGE: &str = "?-myaddr addr? ?-backlog n? ?-queue n? ?-maxworkers n? ?-wait none|data|head? ?-delimiter bytes? ?-headsize n? ?-idletimeout ms? ?-headertimeout ms? ?-maxparked n? ?-proxy none|v1|v2|any? ?-proxyfrom {cidr ...}? ?-agent port? ?-path path? ?-pathmode mode? ?-allowusers {user ...}? ?-allowgroups {group ...}? ?-fd n? ?-systemd name? ?port?";
pub const CLIENT_USAGE: &str = "?-port port | -path path? ?-onclose command? handler";
pub const CLOSE_USAGE: &str = "port";
pub const INFO_USAGE: &str = "?port?";
pub const DRAIN_USAGE: &str = "port ?bool?";

/// The largest `-headsize`: far above any real request head, and a bound on what the
/// dispatcher peeks at once.
pub const MAX_HEAD_SIZE: usize = 1 << 20;

/// A command's failure, rendered into the interp result and errorCode by the FFI layer.
#[derive(Debug, PartialEq, Eq)]
pub enum CmdError {
    /// `wrong # args: should be "<the words so far> <usage>"`; `words` is how many words of the
    /// command to repeat.
    WrongArgs { words: usize, usage: &'static str },
    /// A message and its errorCode list.
    Message { text: String, code: Vec<String> },
    /// `<prefix>: <system message>`, errorCode `POSIX <ERRNAME> <message>`.
    Posix { prefix: String, errno: i32 },
}

impl CmdError {
    pub fn new(text: impl Into<String>, code: &[&str]) -> CmdError {
        CmdError::Message { text: text.into(), code: code.iter().map(|s| s.to_string()).collect() }
    }

    pub fn no_server(port: u16) -> CmdError {
        CmdError::new(format!("no socketserver on port {port}"), &["SOCKETSERVER", "NOSERVER", &port.to_string()])
    }
}

pub type CmdResult<T> = Result<T, CmdError>;

/// Finds `word` in `table` as Tcl_GetIndexFromObj does: an exact match, or else a prefix of
/// exactly one entry (never the empty word). Otherwise the error says what `word` had to be, in
/// Tcl's words (`bad option "-x": must be -a, -b, or -c`, or `ambiguous option ...`), with
/// errorCode `TCL LOOKUP INDEX <what> <word>`. `what` names the kind of word ("option", ...).
pub fn lookup(word: &str, table: &[&str], what: &str) -> CmdResult<usize> {
    if let Some(exact) = table.iter().position(|entry| *entry == word) {
        return Ok(exact);
    }
    let mut prefixed = table.iter().enumerate().filter(|(_, entry)| entry.starts_with(word));
    let (first, second) = (prefixed.next(), prefixed.next());
    match (first, second) {
        (Some((index, _)), None) if !word.is_empty() => return Ok(index),
        _ => {}
    }
    let adjective = if second.is_some() { "ambiguous" } else { "bad" };
    let text = format!("{adjective} {what} \"{word}\": {}", choices(table));
    Err(CmdError::new(text, &["TCL", "LOOKUP", "INDEX", what, word]))
}

/// "must be a, b, or c" as Tcl_GetIndexFromObj writes it (empty entries are skipped except last).
fn choices(table: &[&str]) -> String {
    let Some((first, rest)) = table.split_first() else { return "no valid options".into() };
    let mut text = format!("must be {first}");
    let mut commas = 0;
    for (at, entry) in rest.iter().enumerate() {
        if at + 1 == rest.len() {
            text.push_str(if commas > 0 { ", or " } else { " or " });
            text.push_str(entry);
        } else if !entry.is_empty() {
            text.push_str(", ");
            text.push_str(entry);
            commas += 1;
        }
    }
    text
}

/// A decimal number of type T, digits only (no sign, no spaces), or `expected <what> but got`.
fn parse_decimal<T: std::str::FromStr>(word: &str, what: &str, kind: &str) -> CmdResult<T> {
    let digits = !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit());
    match word.parse::<T>() {
        Ok(n) if digits => Ok(n),
        _ => Err(CmdError::new(format!("expected {what} but got \"{word}\""), &["TCL", "VALUE", kind])),
    }
}

pub fn parse_port(word: &str) -> CmdResult<u16> {
    parse_decimal(word, "port number from 0 to 65535", "PORT")
}

/// A count that must be at least 1 (a limit of no workers at all would serve nothing).
fn parse_positive(word: &str) -> CmdResult<usize> {
    match parse_decimal::<usize>(word, "positive integer", "NUMBER")? {
        0 => Err(CmdError::new(format!("expected positive integer but got \"{word}\""), &["TCL", "VALUE", "NUMBER"])),
        n => Ok(n),
    }
}

fn parse_count(word: &str) -> CmdResult<u32> {
    parse_decimal(word, "non-negative integer", "NUMBER")
}

/// Milliseconds (at most 2^32-1, about 49 days); 0 = never.
fn parse_timeout(word: &str) -> CmdResult<Option<Duration>> {
    let ms = parse_count(word)?;
    Ok((ms > 0).then(|| Duration::from_millis(ms.into())))
}

fn parse_head_size(word: &str) -> CmdResult<usize> {
    match parse_positive(word) {
        Ok(n) if n <= MAX_HEAD_SIZE => Ok(n),
        _ => Err(CmdError::new(
            format!("expected positive integer up to {MAX_HEAD_SIZE} but got \"{word}\""),
            &["TCL", "VALUE", "NUMBER"],
        )),
    }
}

/// A non-empty string of bytes: characters \x01-\xff, each one byte (as Tcl's binary strings).
fn parse_delimiter(word: &str) -> CmdResult<Vec<u8>> {
    let bytes: Option<Vec<u8>> = word.chars().map(|c| u8::try_from(c).ok().filter(|&b| b != 0)).collect();
    match bytes {
        Some(bytes) if !bytes.is_empty() => Ok(bytes),
        _ => Err(CmdError::new(
            format!("expected non-empty delimiter of bytes \\x01-\\xff but got \"{word}\""),
            &["TCL", "VALUE", "DELIMITER"],
        )),
    }
}

/// A list of address ranges, `addr/bits` or `addr`, separated by white space (a Tcl list of
/// such words); empty: no source is trusted.
fn parse_cidrs(word: &str) -> CmdResult<Vec<Cidr>> {
    word.split_ascii_whitespace()
        .map(|cidr| {
            cidr.parse().map_err(|()| {
                CmdError::new(format!("expected address or address/bits but got \"{cidr}\""), &["TCL", "VALUE", "CIDR"])
            })
        })
        .collect()
}

fn resolve(host: &str) -> CmdResult<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let failed = |why: String| {
        CmdError::new(format!("couldn't resolve address \"{host}\": {why}"), &["TCL", "LOOKUP", "HOST", host])
    };
    let mut found = (host, 0).to_socket_addrs().map_err(|e| {
        let text = e.to_string();
        failed(text.trim_start_matches("failed to lookup address information: ").to_string())
    })?;
    found.next().map(|a| a.ip()).ok_or_else(|| failed("no address found".into()))
}

/// `server ?-option value ...? port` (see [`SERVER_USAGE`]) — `args` are the words after
/// `server`.
pub fn parse_server(args: &[&str]) -> CmdResult<ServerConfig> {
    const OPTIONS: [&str; 19] = [
        "-agent", "-allowgroups", "-allowusers", "-backlog", "-delimiter", "-fd", "-headertimeout", "-headsize",
        "-idletimeout", "-maxparked", "-maxworkers", "-myaddr", "-path", "-pathmode", "-proxy", "-proxyfrom",
        "-queue", "-systemd", "-wait",
    ];
    /// The options that adopt an inherited socket, with which the port may be left out.
    const ADOPTING: [&str; 2] = ["-fd", "-systemd"];
    let wrong = CmdError::WrongArgs { words: 2, usage: SERVER_USAGE };
    let adopting = |options: &[&str]| {
        options.chunks_exact(2).any(|pair| lookup(pair[0], &OPTIONS, "option").is_ok_and(|i| ADOPTING.contains(&OPTIONS[i])))
    };
    let (port, options) = match args.split_last() {
        Some((port, options)) if options.len() % 2 == 0 => (Some(*port), options),
        _ if adopting(args) => (None, args),
        _ => return Err(wrong),
    };
    if let Some(port) = port.filter(|port| port.starts_with('-')) {
        if lookup(port, &OPTIONS, "option").is_ok() {
            return Err(CmdError::new(format!("value for \"{port}\" missing"), &["TCL", "ARGUMENT", "MISSING"]));
        }
    }
    let mut config = ServerConfig::new(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let mut host = None;
    let mut given = Vec::new();
    for pair in options.chunks_exact(2) {
        let value = pair[1];
        let option = OPTIONS[lookup(pair[0], &OPTIONS, "option")?];
        given.push(option);
        match option {
            "-agent" => config.agent = Some(parse_port(value)?),
            "-allowgroups" => config.permitted.gids = parse_ids(value, crate::named::resolve_group, "GROUP")?,
            "-allowusers" => config.permitted.uids = parse_ids(value, crate::named::resolve_user, "USER")?,
            "-backlog" => config.backlog = parse_count(value)?,
            "-delimiter" => config.delimiter = parse_delimiter(value)?,
            "-fd" => config.fd = Some(parse_decimal(value, "file descriptor number", "NUMBER")?),
            "-headertimeout" => config.header_timeout = parse_timeout(value)?,
            "-headsize" => config.head_size = parse_head_size(value)?,
            "-idletimeout" => config.idle_timeout = parse_timeout(value)?,
            "-maxparked" => config.max_parked = Some(parse_positive(value)?),
            "-maxworkers" => config.max_workers = Some(parse_positive(value)?),
            "-myaddr" => host = Some(value),
            "-path" => config.path = Some(parse_path(value)?),
            "-pathmode" => config.path_mode = parse_mode(value)?,
            "-proxy" => config.proxy = Accept::from_index(lookup(value, &Accept::NAMES, "proxy mode")?).expect("a name's index"),
            "-proxyfrom" => config.proxy_from = parse_cidrs(value)?,
            "-queue" => config.queue_limit = parse_count(value)? as usize,
            "-systemd" => config.systemd = Some(value.to_string()),
            _ => config.wait = Wait::from_index(lookup(value, &Wait::NAMES, "wait mode")?).expect("a name's index"),
        }
    }
    if config.fd.is_some() || config.systemd.is_some() {
        let conflict = |text: String| Err(CmdError::new(text, &["SOCKETSERVER", "ADOPT", "CONFLICT"]));
        let adopting = if config.fd.is_some() { "-fd" } else { "-systemd" };
        if config.fd.is_some() && config.systemd.is_some() {
            return conflict("\"-fd\" and \"-systemd\" cannot be used together".into());
        }
        // -backlog and -myaddr: the socket's owner has chosen them.
        if let Some(&option) = given.iter().find(|&&option| option == "-backlog" || option == "-myaddr") {
            return conflict(format!("\"{option}\" cannot be used with \"{adopting}\": the adopted socket is listening already"));
        }
    }
    let port = match port {
        Some(port) => parse_port(port)?,
        None => 0,
    };
    let ip = match host {
        Some(host) => resolve(host)?,
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    config.address = SocketAddr::new(ip, port);
    Ok(config)
}

/// The server a `client` registers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTarget {
    /// The first server this interp created.
    Default,
    /// `-port`: a server this process serves or inherited.
    Port(u16),
    /// `-path`: a server's named registration socket.
    Path(std::path::PathBuf),
}

/// `client ?-port port | -path path? ?-onclose command? handler` (see [`CLIENT_USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientArgs {
    pub target: ClientTarget,
    /// The index of `-onclose`'s value among the words, if given.
    pub on_close_at: Option<usize>,
    /// The index of the handler among the words.
    pub handler_at: usize,
}

pub fn parse_client(args: &[&str]) -> CmdResult<ClientArgs> {
    const OPTIONS: [&str; 3] = ["-onclose", "-path", "-port"];
    let wrong = || CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE };
    let Some((handler, options)) = args.split_last() else { return Err(wrong()) };
    if options.len() % 2 != 0 || (options.is_empty() && OPTIONS.contains(handler)) {
        return Err(wrong());
    }
    let mut parsed = ClientArgs { target: ClientTarget::Default, on_close_at: None, handler_at: options.len() };
    for (k, pair) in options.chunks_exact(2).enumerate() {
        let target = match OPTIONS[lookup(pair[0], &OPTIONS, "option")?] {
            "-onclose" => {
                parsed.on_close_at = Some(2 * k + 1);
                continue;
            }
            "-path" => ClientTarget::Path(parse_path(pair[1])?),
            _ => ClientTarget::Port(parse_port(pair[1])?),
        };
        // Given twice, the last one counts, as with Tcl's own options.
        let other_kind = std::mem::discriminant(&parsed.target) != std::mem::discriminant(&target);
        if parsed.target != ClientTarget::Default && other_kind {
            return Err(CmdError::new("\"-port\" and \"-path\" cannot be used together", &["SOCKETSERVER", "CLIENT", "CONFLICT"]));
        }
        parsed.target = target;
    }
    Ok(parsed)
}

/// A named socket's path: not empty; normalized as `file normalize` does (absolute from the
/// current directory, its directory's `.`, `..` and symbolic links resolved), so `info` tells
/// it, `exit` removes it wherever `cd` went since, and two spellings of one path are one.
fn parse_path(word: &str) -> CmdResult<std::path::PathBuf> {
    if word.is_empty() {
        return Err(CmdError::new("expected a path but got \"\"", &["TCL", "VALUE", "PATH"]));
    }
    let absolute = std::path::absolute(word).map_err(|e| CmdError::Posix {
        prefix: format!("couldn't use path \"{word}\""),
        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
    })?;
    // A directory that does not exist is reported when the socket is made or reached.
    let canonical = match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir).ok().map(|dir| dir.join(name)),
        _ => None,
    };
    Ok(canonical.unwrap_or(absolute))
}

/// A file mode in octal, as `file attributes -permissions` takes one (0600, 600 or 0o600).
fn parse_mode(word: &str) -> CmdResult<u32> {
    let digits = word.strip_prefix("0o").unwrap_or(word);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o7777 && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(mode),
        _ => Err(CmdError::new(format!("expected octal file mode but got \"{word}\""), &["TCL", "VALUE", "NUMBER"])),
    }
}

/// A list of users or groups, each a name or a number.
fn parse_ids(word: &str, resolve: fn(&str) -> Result<u32, String>, what: &str) -> CmdResult<Vec<u32>> {
    word.split_ascii_whitespace()
        .map(|id| resolve(id).map_err(|why| CmdError::new(why, &["SOCKETSERVER", what, id])))
        .collect()
}

/// `close port`.
pub fn parse_close(args: &[&str]) -> CmdResult<u16> {
    match args {
        [port] => parse_port(port),
        _ => Err(CmdError::WrongArgs { words: 2, usage: CLOSE_USAGE }),
    }
}

/// A boolean as Tcl reads one: an integer (0 is false), or a unique prefix of true, false, yes,
/// no, on or off, in any case.
pub fn parse_bool(word: &str) -> CmdResult<bool> {
    const BOOLEANS: [(&str, bool); 6] =
        [("false", false), ("no", false), ("off", false), ("on", true), ("true", true), ("yes", true)];
    if let Ok(n) = parse_decimal::<u64>(word, "", "") {
        return Ok(n != 0);
    }
    match lookup(&word.to_ascii_lowercase(), &BOOLEANS.map(|(name, _)| name), "boolean") {
        Ok(index) => Ok(BOOLEANS[index].1),
        Err(_) => Err(CmdError::new(format!("expected boolean value but got \"{word}\""), &["TCL", "VALUE", "NUMBER"])),
    }
}

/// `drain port ?bool?` — the port, and the state to set if given.
pub fn parse_drain(args: &[&str]) -> CmdResult<(u16, Option<bool>)> {
    match args {
        [port] => Ok((parse_port(port)?, None)),
        [port, on] => Ok((parse_port(port)?, Some(parse_bool(on)?))),
        _ => Err(CmdError::WrongArgs { words: 2, usage: DRAIN_USAGE }),
    }
}

/// `::socketserver::info ?port?`.
pub fn parse_info(args: &[&str]) -> CmdResult<Option<u16>> {
    match args {
        [] => Ok(None),
        [port] => Ok(Some(parse_port(port)?)),
        _ => Err(CmdError::WrongArgs { words: 1, usage: INFO_USAGE }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The message of a CmdError that is one.
    pub(crate) fn text(err: CmdError) -> String {
        match err {
            CmdError::Message { text, .. } => text,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn ports_are_integers_from_0_to_65535() {
        assert_eq!(parse_port("0"), Ok(0));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["", "65536", "-1", "abc", "+80", " 80", "0x50"] {
            let message = text(parse_port(bad).unwrap_err());
            assert_eq!(message, format!("expected port number from 0 to 65535 but got \"{bad}\""));
        }
    }

    fn config(address: &str) -> ServerConfig {
        ServerConfig::new(address.parse().unwrap())
    }

    #[test]
    fn server_defaults_to_all_ipv4_addresses() {
        let parsed = parse_server(&["8080"]).unwrap();
        assert_eq!(parsed, config("0.0.0.0:8080"));
        assert_eq!((parsed.backlog, parsed.queue_limit, parsed.max_workers, parsed.wait), (128, 0, None, Wait::None));
        assert_eq!((parsed.delimiter.as_slice(), parsed.head_size, parsed.max_parked), (&b"\r\n\r\n"[..], 16384, None));
        assert_eq!(parsed.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(parsed.header_timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn server_takes_options_before_the_port() {
        let parsed = parse_server(&["-myaddr", "::1", "-queue", "4", "-backlog", "9", "0"]).unwrap();
        let expected = ServerConfig { backlog: 9, queue_limit: 4, ..config("[::1]:0") };
        assert_eq!(parsed, expected);
        let parsed = parse_server(&["-maxworkers", "7", "-b", "3", "-q", "2", "-maxw", "1000", "80"]).unwrap();
        let expected = ServerConfig { backlog: 3, queue_limit: 2, max_workers: Some(1000), ..config("0.0.0.0:80") };
        assert_eq!(parsed, expected);
        let parsed = parse_server(&["-myaddr", "localhost", "0"]).unwrap();
        assert!(parsed.address.ip().is_loopback());
    }

    #[test]
    fn server_takes_the_parking_options() {
        let words = [
            "-wait", "head", "-delimiter", "\n\n", "-heads", "100", "-idle", "0", "-headert", "250", "-maxp", "3", "80",
        ];
        let expected = ServerConfig {
            wait: Wait::Head,
            delimiter: b"\n\n".to_vec(),
            head_size: 100,
            idle_timeout: None,
            header_timeout: Some(Duration::from_millis(250)),
            max_parked: Some(3),
            ..config("0.0.0.0:80")
        };
        assert_eq!(parse_server(&words).unwrap(), expected);
        for (word, wait) in [("none", Wait::None), ("d", Wait::Data), ("head", Wait::Head)] {
            assert_eq!(parse_server(&["-wait", word, "0"]).unwrap().wait, wait);
        }
        assert_eq!(parse_server(&["-delimiter", "\u{ff}|", "0"]).unwrap().delimiter, vec![0xff, b'|']);
        assert_eq!(parse_server(&["-headsize", "1048576", "0"]).unwrap().head_size, MAX_HEAD_SIZE);
        let forever = parse_server(&["-idletimeout", "4294967295", "0"]).unwrap().idle_timeout;
        assert_eq!(forever, Some(Duration::from_millis(u32::MAX.into())));
    }

    #[test]
    fn server_reports_bad_parking_options_in_tcl_style() {
        let err = parse_server(&["-wait", "x", "80"]).unwrap_err();
        let code = ["TCL", "LOOKUP", "INDEX", "wait mode", "x"].map(String::from).to_vec();
        assert_eq!(err, CmdError::Message { text: "bad wait mode \"x\": must be none, data, or head".into(), code });
        assert_eq!(text(parse_server(&["-wait", "", "80"]).unwrap_err()), "ambiguous wait mode \"\": must be none, data, or head");
        for bad in ["0", "-1", "1048577", "x"] {
            let message = text(parse_server(&["-headsize", bad, "80"]).unwrap_err());
            assert_eq!(message, format!("expected positive integer up to 1048576 but got \"{bad}\""));
        }
        for bad in ["", "\u{100}", "a\0"] {
            let message = text(parse_server(&["-delimiter", bad, "80"]).unwrap_err());
            assert_eq!(message, format!("expected non-empty delimiter of bytes \\x01-\\xff but got \"{bad}\""));
        }
        for option in ["-idletimeout", "-headertimeout"] {
            let message = text(parse_server(&[option, "-5", "80"]).unwrap_err());
            assert_eq!(message, "expected non-negative integer but got \"-5\"");
            let message = text(parse_server(&[option, "4294967296", "80"]).unwrap_err());
            assert_eq!(message, "expected non-negative integer but got \"4294967296\"");
        }
        assert_eq!(text(parse_server(&["-maxparked", "0", "80"]).unwrap_err()), "expected positive integer but got \"0\"");
        assert_eq!(text(parse_server(&["-h", "1", "80"]).unwrap_err()).split(':').next(), Some("ambiguous option \"-h\""));
        assert_eq!(text(parse_server(&["-wait", "data", "-wait"]).unwrap_err()), "value for \"-wait\" missing");
    }

    #[test]
    fn server_adopts_an_inherited_socket_with_or_without_a_port() {
        let parsed = parse_server(&["-fd", "3"]).unwrap();
        assert_eq!(parsed, ServerConfig { fd: Some(3), ..config("0.0.0.0:0") });
        let parsed = parse_server(&["-queue", "2", "-fd", "0", "8080"]).unwrap();
        assert_eq!(parsed, ServerConfig { fd: Some(0), queue_limit: 2, ..config("0.0.0.0:8080") });
        let parsed = parse_server(&["-s", "http", "-wait", "head"]).unwrap();
        assert_eq!(parsed, ServerConfig { systemd: Some("http".into()), wait: Wait::Head, ..config("0.0.0.0:0") });
        assert_eq!(parse_server(&["-systemd", "*", "80"]).unwrap().systemd.as_deref(), Some("*"));
    }

    #[test]
    fn server_reports_bad_adoption_options() {
        for bad in ["-1", "x", "2147483648", ""] {
            assert_eq!(text(parse_server(&["-fd", bad]).unwrap_err()), format!("expected file descriptor number but got \"{bad}\""));
        }
        let conflict = |words: &[&str]| match parse_server(words).unwrap_err() {
            CmdError::Message { text, code } if code == ["SOCKETSERVER", "ADOPT", "CONFLICT"] => text,
            other => panic!("expected a conflict, got {other:?}"),
        };
        assert_eq!(conflict(&["-fd", "3", "-systemd", "x"]), "\"-fd\" and \"-systemd\" cannot be used together");
        assert_eq!(
            conflict(&["-my", "::1", "-fd", "3"]),
            "\"-myaddr\" cannot be used with \"-fd\": the adopted socket is listening already"
        );
        assert_eq!(
            conflict(&["-systemd", "x", "-backlog", "5", "80"]),
            "\"-backlog\" cannot be used with \"-systemd\": the adopted socket is listening already"
        );
        // Without an adopting option the port is required, as before.
        assert_eq!(parse_server(&["-queue", "1"]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        assert_eq!(text(parse_server(&["-fd", "3", "-queue"]).unwrap_err()), "value for \"-queue\" missing");
        assert_eq!(text(parse_server(&["-fd", "3", "x"]).unwrap_err()), "expected port number from 0 to 65535 but got \"x\"");
    }

    #[test]
    fn server_takes_the_proxy_options() {
        let parsed = parse_server(&["-proxy", "v2", "-proxyfrom", " 10.0.0.0/8\t::1 192.0.2.7 ", "80"]).unwrap();
        let cidrs = ["10.0.0.0/8", "::1", "192.0.2.7"].map(|c| c.parse().unwrap()).to_vec();
        assert_eq!(parsed, ServerConfig { proxy: Accept::V2, proxy_from: cidrs, ..config("0.0.0.0:80") });
        assert_eq!(parse_server(&["80"]).unwrap().proxy, Accept::None);
        assert_eq!(parse_server(&["-proxyfrom", "", "80"]).unwrap().proxy_from, vec![], "trust no one");
        for (word, accept) in [("none", Accept::None), ("v1", Accept::V1), ("v2", Accept::V2), ("a", Accept::Any)] {
            assert_eq!(parse_server(&["-proxy", word, "0"]).unwrap().proxy, accept);
        }
        assert_eq!(text(parse_server(&["-proxy", "v3", "80"]).unwrap_err()), "bad proxy mode \"v3\": must be none, v1, v2, or any");
        assert_eq!(text(parse_server(&["-proxy", "v", "80"]).unwrap_err()), "ambiguous proxy mode \"v\": must be none, v1, v2, or any");
        let err = parse_server(&["-proxyfrom", "127.0.0.1 10.0.0.0/33", "80"]).unwrap_err();
        let code = ["TCL", "VALUE", "CIDR"].map(String::from).to_vec();
        assert_eq!(err, CmdError::Message { text: "expected address or address/bits but got \"10.0.0.0/33\"".into(), code });
        assert_eq!(text(parse_server(&["-proxyfrom", "1", "-proxy"]).unwrap_err()), "value for \"-proxy\" missing");
    }

    #[test]
    fn server_reports_bad_arguments_in_tcl_style() {
        assert_eq!(parse_server(&[]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        assert_eq!(parse_server(&["1", "2"]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        let all = "-agent, -allowgroups, -allowusers, -backlog, -delimiter, -fd, -headertimeout, -headsize, -idletimeout, -maxparked, -maxworkers, -myaddr, -path, -pathmode, -proxy, -proxyfrom, -queue, -systemd, or -wait";
        assert_eq!(text(parse_server(&["-x", "1", "80"]).unwrap_err()), format!("bad option \"-x\": must be {all}"));
        assert_eq!(text(parse_server(&["-m", "1", "80"]).unwrap_err()), format!("ambiguous option \"-m\": must be {all}"));
        assert_eq!(text(parse_server(&["-maxworkers", "-1", "80"]).unwrap_err()), "expected positive integer but got \"-1\"");
        assert_eq!(text(parse_server(&["-maxworkers", "0", "80"]).unwrap_err()), "expected positive integer but got \"0\"");
        assert_eq!(text(parse_server(&["-maxworkers", "1", "-my"]).unwrap_err()), "value for \"-my\" missing");
        assert_eq!(text(parse_server(&["-queue", "1", "-myaddr"]).unwrap_err()), "value for \"-myaddr\" missing");
        assert_eq!(text(parse_server(&["-queue", "-1", "80"]).unwrap_err()), "expected non-negative integer but got \"-1\"");
        assert_eq!(text(parse_server(&["-backlog", "x", "80"]).unwrap_err()), "expected non-negative integer but got \"x\"");
        let message = text(parse_server(&["-myaddr", "no.such.host.invalid", "80"]).unwrap_err());
        assert!(message.starts_with("couldn't resolve address \"no.such.host.invalid\": "), "{message}");
    }

    #[test]
    fn server_takes_an_agent_port() {
        assert_eq!(parse_server(&["80"]).unwrap().agent, None);
        assert_eq!(parse_server(&["-agent", "0", "80"]).unwrap().agent, Some(0));
        assert_eq!(parse_server(&["-ag", "8081", "80"]).unwrap().agent, Some(8081));
        let message = text(parse_server(&["-agent", "65536", "80"]).unwrap_err());
        assert_eq!(message, "expected port number from 0 to 65535 but got \"65536\"");
        assert_eq!(text(parse_server(&["-agent"]).unwrap_err()), "value for \"-agent\" missing");
    }

    #[test]
    fn drain_takes_a_port_and_a_tcl_boolean() {
        assert_eq!(parse_drain(&["80"]), Ok((80, None)));
        for (word, on) in [("1", true), ("0", false), ("10", true), ("true", true), ("T", true), ("no", false)] {
            assert_eq!(parse_drain(&["80", word]), Ok((80, Some(on))), "{word}");
        }
        for (word, on) in [("yes", true), ("off", false), ("of", false), ("ON", true), ("f", false)] {
            assert_eq!(parse_bool(word), Ok(on), "{word}");
        }
        for bad in ["", "o", "x", "-1", "truth", " 1"] {
            let err = parse_bool(bad).unwrap_err();
            let code = ["TCL", "VALUE", "NUMBER"].map(String::from).to_vec();
            assert_eq!(err, CmdError::Message { text: format!("expected boolean value but got \"{bad}\""), code });
        }
        assert_eq!(parse_drain(&[]), Err(CmdError::WrongArgs { words: 2, usage: DRAIN_USAGE }));
        assert_eq!(parse_drain(&["1", "2", "3"]), Err(CmdError::WrongArgs { words: 2, usage: DRAIN_USAGE }));
        assert_eq!(text(parse_drain(&["x"]).unwrap_err()), "expected port number from 0 to 65535 but got \"x\"");
    }

    #[test]
    fn client_takes_a_port_or_a_path_an_onclose_command_and_a_handler() {
        let client = |target, on_close_at, handler_at| Ok(ClientArgs { target, on_close_at, handler_at });
        assert_eq!(parse_client(&["h"]), client(ClientTarget::Default, None, 0));
        assert_eq!(parse_client(&["-port", "80", "h"]), client(ClientTarget::Port(80), None, 2));
        assert_eq!(parse_client(&["-po", "80", "h"]), client(ClientTarget::Port(80), None, 2));
        assert_eq!(parse_client(&["-pa", "/s", "h"]), client(ClientTarget::Path("/s".into()), None, 2));
        assert_eq!(
            parse_client(&["-onclose", "exit", "-path", "/s", "h"]),
            client(ClientTarget::Path("/s".into()), Some(1), 4)
        );
        assert_eq!(text(parse_client(&["-x", "80", "h"]).unwrap_err()), "bad option \"-x\": must be -onclose, -path, or -port");
        assert_eq!(text(parse_client(&["-p", "80", "h"]).unwrap_err()), "ambiguous option \"-p\": must be -onclose, -path, or -port");
        assert_eq!(
            text(parse_client(&["-port", "80", "-path", "/s", "h"]).unwrap_err()),
            "\"-port\" and \"-path\" cannot be used together"
        );
        assert_eq!(text(parse_client(&["-path", "", "h"]).unwrap_err()), "expected a path but got \"\"");
        assert_eq!(parse_client(&["-port", "1", "-port", "2", "h"]).unwrap().target, ClientTarget::Port(2));
        for wrong in [&[][..], &["-port"], &["a", "b"], &["-port", "80"]] {
            assert_eq!(parse_client(wrong), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
        }
    }

    #[test]
    fn server_path_options_take_a_mode_in_octal_and_users_and_groups_by_name_or_number() {
        let config = parse_server(&["-path", "/run/app.sock", "-pathmode", "0660", "-allowusers", "root 4711", "-allowg", "0", "80"]).unwrap();
        assert_eq!(config.path, Some("/run/app.sock".into()));
        assert_eq!(config.path_mode, 0o660);
        assert_eq!(config.permitted.uids, [0, 4711]);
        assert_eq!(config.permitted.gids, [0]);
        assert_eq!(parse_server(&["80"]).unwrap().path_mode, 0o600);
        for (mode, bits) in [("600", 0o600), ("0o755", 0o755), ("0", 0)] {
            assert_eq!(parse_mode(mode), Ok(bits));
        }
        for bad in ["", "0o", "0800", "rw", "17777", "-1", "+600"] {
            assert_eq!(text(parse_mode(bad).unwrap_err()), format!("expected octal file mode but got \"{bad}\""));
        }
        assert_eq!(text(parse_server(&["-allowusers", "no-such-user-here", "80"]).unwrap_err()), "unknown user \"no-such-user-here\"");
        assert_eq!(text(parse_server(&["-allowgroups", "no-such-group-here", "80"]).unwrap_err()), "unknown group \"no-such-group-here\"");
    }

    #[test]
    fn lookup_takes_an_exact_word_or_a_unique_prefix_as_tcl_does() {
        let table = ["-a", "-ab", "-b", "-c"];
        assert_eq!(lookup("-ab", &table, "option"), Ok(1));
        assert_eq!(lookup("-a", &table, "option"), Ok(0), "exact beats prefix");
        assert_eq!(lookup("-b", &table, "option"), Ok(2));
        assert_eq!(lookup("-c", &["-cat"], "option"), Ok(0));
        let err = lookup("-", &table, "option").unwrap_err();
        let code = ["TCL", "LOOKUP", "INDEX", "option", "-"].map(String::from).to_vec();
        assert_eq!(err, CmdError::Message { text: "ambiguous option \"-\": must be -a, -ab, -b, or -c".into(), code });
        assert_eq!(text(lookup("", &["x"], "mode").unwrap_err()), "bad mode \"\": must be x");
        assert_eq!(text(lookup("z", &["x", "y"], "mode").unwrap_err()), "bad mode \"z\": must be x or y");
        assert_eq!(text(lookup("z", &[], "mode").unwrap_err()), "bad mode \"z\": no valid options");
    }

    #[test]
    fn close_and_info_take_a_port() {
        assert_eq!(parse_close(&["80"]), Ok(80));
        assert_eq!(parse_close(&[]), Err(CmdError::WrongArgs { words: 2, usage: CLOSE_USAGE }));
        assert_eq!(parse_info(&[]), Ok(None));
        assert_eq!(parse_info(&["80"]), Ok(Some(80)));
        assert_eq!(parse_info(&["1", "2"]), Err(CmdError::WrongArgs { words: 1, usage: INFO_USAGE }));
    }
}
