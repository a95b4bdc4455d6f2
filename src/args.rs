//! Argument parsing for the Tcl commands, with Tcl-style messages. No Tcl here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

pub const SERVER_USAGE: &str = "?-myaddr addr? ?-backlog n? ?-queue n? ?-maxworkers n? port";
pub const CLIENT_USAGE: &str = "?-port port? handler";
pub const CLOSE_USAGE: &str = "port";
pub const INFO_USAGE: &str = "?port?";

const DEFAULT_BACKLOG: u32 = 128;

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

#[derive(Debug, PartialEq, Eq)]
pub struct ServerArgs {
    pub address: SocketAddr,
    pub backlog: u32,
    pub queue: usize,
    /// `-maxworkers`: how many workers may register at once; None = the dispatcher's default.
    pub max_workers: Option<usize>,
}

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

/// `server ?-myaddr addr? ?-backlog n? ?-queue n? ?-maxworkers n? port` — `args` are the words
/// after `server`.
pub fn parse_server(args: &[&str]) -> CmdResult<ServerArgs> {
    const OPTIONS: [&str; 4] = ["-backlog", "-maxworkers", "-myaddr", "-queue"];
    let wrong = CmdError::WrongArgs { words: 2, usage: SERVER_USAGE };
    let Some((port, options)) = args.split_last() else { return Err(wrong) };
    if port.starts_with('-') && lookup(port, &OPTIONS, "option").is_ok() {
        return Err(CmdError::new(format!("value for \"{port}\" missing"), &["TCL", "ARGUMENT", "MISSING"]));
    }
    if options.len() % 2 == 1 {
        return Err(wrong);
    }
    let (mut host, mut backlog, mut queue, mut max_workers) = (None, DEFAULT_BACKLOG, 0, None);
    for pair in options.chunks_exact(2) {
        // The index into OPTIONS.
        match lookup(pair[0], &OPTIONS, "option")? {
            0 => backlog = parse_count(pair[1])?,
            1 => max_workers = Some(parse_positive(pair[1])?),
            2 => host = Some(pair[1]),
            _ => queue = parse_count(pair[1])? as usize,
        }
    }
    let port = parse_port(port)?;
    let ip = match host {
        Some(host) => resolve(host)?,
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    Ok(ServerArgs { address: SocketAddr::new(ip, port), backlog, queue, max_workers })
}

/// `client ?-port port? handler` — returns the port, if given, and the handler word's index.
pub fn parse_client(args: &[&str]) -> CmdResult<(Option<u16>, usize)> {
    match args {
        ["-port"] => Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }),
        [_handler] => Ok((None, 0)),
        [option, port, _handler] if option.starts_with('-') => {
            lookup(option, &["-port"], "option")?;
            Ok((Some(parse_port(port)?), 2))
        }
        _ => Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }),
    }
}

/// `close port`.
pub fn parse_close(args: &[&str]) -> CmdResult<u16> {
    match args {
        [port] => parse_port(port),
        _ => Err(CmdError::WrongArgs { words: 2, usage: CLOSE_USAGE }),
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
mod tests {
    use super::*;

    fn text(err: CmdError) -> String {
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

    #[test]
    fn server_defaults_to_all_ipv4_addresses() {
        let parsed = parse_server(&["8080"]).unwrap();
        let expected = ServerArgs { address: "0.0.0.0:8080".parse().unwrap(), backlog: 128, queue: 0, max_workers: None };
        assert_eq!(parsed, expected);
    }

    #[test]
    fn server_takes_options_before_the_port() {
        let parsed = parse_server(&["-myaddr", "::1", "-queue", "4", "-backlog", "9", "0"]).unwrap();
        let expected = ServerArgs { address: "[::1]:0".parse().unwrap(), backlog: 9, queue: 4, max_workers: None };
        assert_eq!(parsed, expected);
        let parsed = parse_server(&["-maxworkers", "7", "-b", "3", "-q", "2", "-maxw", "1000", "80"]).unwrap();
        let expected = ServerArgs { address: "0.0.0.0:80".parse().unwrap(), backlog: 3, queue: 2, max_workers: Some(1000) };
        assert_eq!(parsed, expected);
        let parsed = parse_server(&["-myaddr", "localhost", "0"]).unwrap();
        assert!(parsed.address.ip().is_loopback());
    }

    #[test]
    fn server_reports_bad_arguments_in_tcl_style() {
        assert_eq!(parse_server(&[]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        assert_eq!(parse_server(&["1", "2"]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        let all = "-backlog, -maxworkers, -myaddr, or -queue";
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
    fn client_takes_an_optional_port_and_a_handler() {
        assert_eq!(parse_client(&["h"]), Ok((None, 0)));
        assert_eq!(parse_client(&["-port", "80", "h"]), Ok((Some(80), 2)));
        assert_eq!(parse_client(&["-p", "80", "h"]), Ok((Some(80), 2)));
        assert_eq!(text(parse_client(&["-x", "80", "h"]).unwrap_err()), "bad option \"-x\": must be -port");
        assert_eq!(parse_client(&[]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
        assert_eq!(parse_client(&["-port"]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
        assert_eq!(parse_client(&["a", "b"]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
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
