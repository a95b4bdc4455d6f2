//! Socket activation: the listening sockets a service manager passes to the process it starts,
//! by systemd's protocol (sd_listen_fds(3)): `LISTEN_PID` (the process they are for),
//! `LISTEN_FDS` (how many, as fds from 3 on) and `LISTEN_FDNAMES` (their names, colon-separated).
//! Pure: the caller reads the variables (through Tcl's env) and unsets them.

use crate::args::{CmdError, CmdResult};
use std::os::fd::RawFd;

/// The first passed fd (SD_LISTEN_FDS_START).
pub const FIRST_FD: RawFd = 3;

/// The variables of the protocol, in the order [`Passed::parse`] takes them.
pub const VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// The sockets passed to process `pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub pid: u32,
    /// Each socket's name, in fd order from [`FIRST_FD`].
    names: Vec<String>,
}

fn none() -> CmdError {
    CmdError::new("no socket passed by the service manager", &["SOCKETSERVER", "SYSTEMD", "NONE"])
}

fn invalid(variable: &str, value: &str) -> CmdError {
    CmdError::new(
        format!("malformed {variable} \"{value}\" from the service manager"),
        &["SOCKETSERVER", "SYSTEMD", "INVALID"],
    )
}

impl Passed {
    /// What the variables say was passed to process `me`. A missing `LISTEN_FDNAMES` names every
    /// socket "unknown", as systemd does.
    /// `max_fds`: the process's limit on open files; more passed fds than that is malformed
    /// (and would cost memory and time to walk).
    pub fn parse(pid: Option<&str>, fds: Option<&str>, names: Option<&str>, me: u32, max_fds: usize) -> CmdResult<Passed> {
        let (Some(pid_word), Some(fds_word)) = (pid, fds) else { return Err(none()) };
        let number = |word: &str| word.bytes().all(|b| b.is_ascii_digit()).then(|| word.parse::<u32>().ok()).flatten();
        let pid = number(pid_word).filter(|&p| p > 0).ok_or_else(|| invalid("LISTEN_PID", pid_word))?;
        if pid != me {
            return Err(CmdError::new(
                format!("no socket passed by the service manager to this process: LISTEN_PID is {pid}, not {me}"),
                &["SOCKETSERVER", "SYSTEMD", "PID"],
            ));
        }
        let count = number(fds_word)
            .filter(|&n| n <= (RawFd::MAX - FIRST_FD) as u32 && n as usize <= max_fds)
            .ok_or_else(|| invalid("LISTEN_FDS", fds_word))? as usize;
        if count == 0 {
            return Err(none());
        }
        let names = match names {
            None => vec!["unknown".to_string(); count],
            Some(list) => {
                let names: Vec<String> = list.split(':').map(str::to_owned).collect();
                if names.len() != count {
                    return Err(invalid("LISTEN_FDNAMES", list));
                }
                names
            }
        };
        Ok(Passed { pid, names })
    }

    /// Every passed fd.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> {
        (0..self.names.len()).map(|at| FIRST_FD + at as RawFd)
    }

    /// The fd of the socket named `name`; `*` is the first.
    pub fn find(&self, name: &str) -> CmdResult<RawFd> {
        let at = if name == "*" { Some(0) } else { self.names.iter().position(|n| n == name) };
        at.map(|at| FIRST_FD + at as RawFd).ok_or_else(|| {
            CmdError::new(
                format!("no socket named \"{name}\" passed by the service manager"),
                &["SOCKETSERVER", "SYSTEMD", "NAME", name],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(err: CmdError) -> (String, Vec<String>) {
        match err {
            CmdError::Message { text, code } => (text, code),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn named_sockets_are_found_by_name_from_fd_3() {
        let passed = Passed::parse(Some("42"), Some("3"), Some("http:admin:http"), 42, 1024).unwrap();
        assert_eq!(passed.fds().collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(passed.find("http"), Ok(3), "the first of a name");
        assert_eq!(passed.find("admin"), Ok(4));
        assert_eq!(passed.find("*"), Ok(3));
        let (message, code) = text(passed.find("web").unwrap_err());
        assert_eq!(message, "no socket named \"web\" passed by the service manager");
        assert_eq!(code, ["SOCKETSERVER", "SYSTEMD", "NAME", "web"]);
    }

    #[test]
    fn sockets_without_names_are_unknown() {
        let passed = Passed::parse(Some("7"), Some("2"), None, 7, 1024).unwrap();
        assert_eq!(passed.find("unknown"), Ok(3));
        assert_eq!(passed.find("*"), Ok(3));
    }

    #[test]
    fn nothing_passed_or_passed_to_another_process_is_an_error() {
        for (pid, fds) in [(None, None), (Some("7"), None), (None, Some("1")), (Some("7"), Some("0"))] {
            let (message, code) = text(Passed::parse(pid, fds, None, 7, 1024).unwrap_err());
            assert_eq!(message, "no socket passed by the service manager");
            assert_eq!(code, ["SOCKETSERVER", "SYSTEMD", "NONE"]);
        }
        let (message, code) = text(Passed::parse(Some("8"), Some("1"), None, 7, 1024).unwrap_err());
        assert_eq!(message, "no socket passed by the service manager to this process: LISTEN_PID is 8, not 7");
        assert_eq!(code, ["SOCKETSERVER", "SYSTEMD", "PID"]);
    }

    #[test]
    fn malformed_variables_are_reported() {
        for (pid, fds, names, bad) in [
            ("x", "1", None, "malformed LISTEN_PID \"x\" from the service manager"),
            ("0", "1", None, "malformed LISTEN_PID \"0\" from the service manager"),
            ("+7", "1", None, "malformed LISTEN_PID \"+7\" from the service manager"),
            ("7", "-1", None, "malformed LISTEN_FDS \"-1\" from the service manager"),
            ("7", "99999999999", None, "malformed LISTEN_FDS \"99999999999\" from the service manager"),
            ("7", "2000000000", None, "malformed LISTEN_FDS \"2000000000\" from the service manager"),
            ("7", "1025", None, "malformed LISTEN_FDS \"1025\" from the service manager"),
            ("7", "2", Some("a"), "malformed LISTEN_FDNAMES \"a\" from the service manager"),
            ("7", "1", Some("a:b"), "malformed LISTEN_FDNAMES \"a:b\" from the service manager"),
        ] {
            let (message, code) = text(Passed::parse(Some(pid), Some(fds), names, 7, 1024).unwrap_err());
            assert_eq!((message.as_str(), code[2].as_str()), (bad, "INVALID"));
        }
    }
}
