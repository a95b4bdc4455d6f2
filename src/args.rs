//! Argument parsing for the Tcl commands, with Tcl-style messages. No Tcl here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

pub const SERVER_USAGE: &str = "?-myaddr addr? ?-backlog n? ?-queue n? port";
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

fn bad_option(word: &str, choices: &str) -> CmdError {
    CmdError::new(format!("bad option \"{word}\": must be {choices}"), &["TCL", "LOOKUP", "INDEX", "option", word])
}

/// `server ?-myaddr addr? ?-backlog n? ?-queue n? port` — `args` are the words after `server`.
pub fn parse_server(args: &[&str]) -> CmdResult<ServerArgs> {
    const OPTIONS: [&str; 3] = ["-myaddr", "-backlog", "-queue"];
    let wrong = CmdError::WrongArgs { words: 2, usage: SERVER_USAGE };
    let Some((port, options)) = args.split_last() else { return Err(wrong) };
    if OPTIONS.contains(port) {
        return Err(CmdError::new(format!("value for \"{port}\" missing"), &["TCL", "ARGUMENT", "MISSING"]));
    }
    if options.len() % 2 == 1 {
        return Err(wrong);
    }
    let (mut host, mut backlog, mut queue) = (None, DEFAULT_BACKLOG, 0);
    for pair in options.chunks_exact(2) {
        match pair[0] {
            "-myaddr" => host = Some(pair[1]),
            "-backlog" => backlog = parse_count(pair[1])?,
            "-queue" => queue = parse_count(pair[1])? as usize,
            other => return Err(bad_option(other, "-backlog, -myaddr, or -queue")),
        }
    }
    let port = parse_port(port)?;
    let ip = match host {
        Some(host) => resolve(host)?,
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    Ok(ServerArgs { address: SocketAddr::new(ip, port), backlog, queue })
}

/// `client ?-port port? handler` — returns the port, if given, and the handler word's index.
pub fn parse_client(args: &[&str]) -> CmdResult<(Option<u16>, usize)> {
    match args {
        ["-port"] => Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }),
        [_handler] => Ok((None, 0)),
        ["-port", port, _handler] => Ok((Some(parse_port(port)?), 2)),
        [option, _, _] if option.starts_with('-') => Err(bad_option(option, "-port")),
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
        assert_eq!(parsed, ServerArgs { address: "0.0.0.0:8080".parse().unwrap(), backlog: 128, queue: 0 });
    }

    #[test]
    fn server_takes_options_before_the_port() {
        let parsed = parse_server(&["-myaddr", "::1", "-queue", "4", "-backlog", "9", "0"]).unwrap();
        assert_eq!(parsed, ServerArgs { address: "[::1]:0".parse().unwrap(), backlog: 9, queue: 4 });
        let parsed = parse_server(&["-myaddr", "localhost", "0"]).unwrap();
        assert!(parsed.address.ip().is_loopback());
    }

    #[test]
    fn server_reports_bad_arguments_in_tcl_style() {
        assert_eq!(parse_server(&[]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        assert_eq!(parse_server(&["1", "2"]), Err(CmdError::WrongArgs { words: 2, usage: SERVER_USAGE }));
        assert_eq!(text(parse_server(&["-x", "1", "80"]).unwrap_err()), "bad option \"-x\": must be -backlog, -myaddr, or -queue");
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
        assert_eq!(text(parse_client(&["-p", "80", "h"]).unwrap_err()), "bad option \"-p\": must be -port");
        assert_eq!(parse_client(&[]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
        assert_eq!(parse_client(&["-port"]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
        assert_eq!(parse_client(&["a", "b"]), Err(CmdError::WrongArgs { words: 2, usage: CLIENT_USAGE }));
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
