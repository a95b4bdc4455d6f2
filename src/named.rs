//! The named registration socket (`server -path`): a filesystem AF_UNIX SOCK_SEQPACKET socket on
//! which any process, not only a forked child, can register as a worker. Here: making it (never
//! clobbering a live server's, replacing a stale one), removing it (only if it is still ours),
//! connecting to it, and who may register through it (SO_PEERCRED).
//!
//! Servers in one process or many that ask for the same path take turns (a flock(2) on its
//! directory): the first binds, the others find it live.

use nix::sys::socket::{self, getsockopt, setsockopt, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io;
use crate::fork_safety::{CreateSection, ParentOnlyFd};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The mode of a named socket unless `-pathmode` says otherwise: the owner only.
pub const DEFAULT_MODE: u32 = 0o600;

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A named socket this process made. Dropped in that process (not in a forked child's copy), it
/// removes the path if it still names that socket (not one that replaced it since).
#[derive(Debug)]
pub struct NamedPath {
    pub path: PathBuf,
    /// (st_dev, st_ino) of the socket file.
    identity: (u64, u64),
    creator: u32,
}

impl Drop for NamedPath {
    fn drop(&mut self) {
        if std::process::id() != self.creator {
            return;
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Listens on `path` with `mode`: refuses a path where a live server answers (EADDRINUSE) or that
/// is not a socket (EEXIST); replaces a stale socket (nobody listening). Returns the non-blocking,
/// close-on-exec listener and the path to remove later. The caller holds `path`'s
/// [`DirectoryLock`], so that two servers asking for one path at once take turns: the second
/// finds the first's socket live (it has its mode and listens before the lock goes).
pub fn listen(path: &Path, mode: u32, backlog: u32, _turn: &DirectoryLock) -> io::Result<(OwnedFd, NamedPath)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
        Ok(_) if is_live(path) => return Err(io::Error::from_raw_os_error(libc::EADDRINUSE)),
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)?;
    // bind(2) makes the file, or fails with EADDRINUSE if anything took the name meanwhile.
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    let meta = std::fs::symlink_metadata(path)?;
    let named = NamedPath { path: path.to_path_buf(), identity: (meta.dev(), meta.ino()), creator: std::process::id() };
    // Until listen(2) nobody can connect, so the mode bind gave it (umask's) never lets anyone in.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let backlog = backlog.min(i32::MAX as u32) as i32;
    // Raw listen(2), as fdpass::listen: nix's Backlog refuses values above SOMAXCONN.
    // SAFETY: listen(2) on a socket we own; the kernel caps the backlog at somaxconn.
    crate::sys::check(unsafe { libc::listen(listener.as_raw_fd(), backlog) })?;
    Ok((listener, named))
}

/// An exclusive flock(2) on a named socket's directory, released as it drops. Its fd is one that
/// forked children close: a child keeping it would keep the lock.
pub struct DirectoryLock {
    /// Never read: closing it, as it drops, unlocks. None: the file system has no flock.
    _dir: Option<ParentOnlyFd>,
}

/// How long [`DirectoryLock::take`] tries: other servers hold the lock for a few syscalls only;
/// anyone holding it longer is not one of them.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

impl DirectoryLock {
    /// Locks `path`'s directory, trying again every 10 ms for [`LOCK_PATIENCE`] (EAGAIN then).
    /// Never waits blocked, so call it outside a CreateSection: a fork meanwhile must not wait
    /// for it. A file system without flock (EBADF, ENOLCK, EOPNOTSUPP: NFS, some FUSE) goes
    /// without: two servers there could still both replace one stale socket.
    pub fn take(path: &Path) -> io::Result<DirectoryLock> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let section = CreateSection::enter();
        let dir = section.adopt(OwnedFd::from(std::fs::File::open(dir)?))?;
        drop(section);
        let deadline = Instant::now() + LOCK_PATIENCE;
        loop {
            // libc's flock(2): nix's Flock must own the file, and this one is a ParentOnlyFd.
            // SAFETY: flock(2) on an fd we own; it touches no memory.
            match crate::sys::check(unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
                Ok(_) => return Ok(DirectoryLock { _dir: Some(dir) }),
                Err(err) if matches!(err.raw_os_error(), Some(libc::EBADF | libc::ENOLCK | libc::EOPNOTSUPP)) => {
                    return Ok(DirectoryLock { _dir: None });
                }
                Err(err) if err.raw_os_error() == Some(libc::EWOULDBLOCK) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => return Err(err),
            }
        }
    }
}

/// True if a server accepts connections on the socket at `path` (ECONNREFUSED: a stale one).
/// A socket of another type (EPROTOTYPE) belongs to another program: live too.
fn is_live(path: &Path) -> bool {
    match connect_nonblocking(path) {
        Ok(_) => true,
        Err(err) => !matches!(err.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)),
    }
}

fn connect_nonblocking(path: &Path) -> io::Result<OwnedFd> {
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(errno)?;
    socket::connect(sock.as_raw_fd(), &UnixAddr::new(path).map_err(errno)?).map_err(errno)?;
    Ok(sock)
}

/// Connects to the named socket at `path`, waiting at most `timeout` for room in its backlog.
/// The connection is blocking and close-on-exec.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let sock = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    // A blocking connect(2) on a Unix socket waits for backlog room for at most SO_SNDTIMEO.
    let timeout = nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    setsockopt(&sock, sockopt::SendTimeout, &timeout).map_err(errno)?;
    let address = UnixAddr::new(path).map_err(errno)?;
    match socket::connect(sock.as_raw_fd(), &address) {
        Ok(()) => Ok(sock),
        Err(nix::errno::Errno::EAGAIN) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        Err(e) => Err(errno(e)),
    }
}

/// Who may register through the named socket: the serving process's own uid, and the users and
/// groups `-allowusers` and `-allowgroups` name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permitted {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Permitted {
    /// True if a process with these credentials may register (`own_uid`: the server's).
    pub fn allows(&self, own_uid: u32, uid: u32, gid: u32) -> bool {
        uid == own_uid || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// The credentials (pid, uid, gid) of the process at the other end of a Unix socket as they were
/// when it connected (SO_PEERCRED): the kernel's word, not the peer's.
pub fn peer_credentials(sock: BorrowedFd) -> Option<(i32, u32, u32)> {
    getsockopt(&sock, sockopt::PeerCredentials).ok().map(|cred| (cred.pid(), cred.uid(), cred.gid()))
}

/// A uid from a user name or number.
pub fn resolve_user(word: &str) -> Result<u32, String> {
    if let Ok(uid) = word.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(word) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        _ => Err(format!("unknown user \"{word}\"")),
    }
}

/// A gid from a group name or number.
pub fn resolve_group(word: &str) -> Result<u32, String> {
    if let Ok(gid) = word.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(word) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(format!("unknown group \"{word}\"")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// `f`'s results in `n` threads that call it at the same moment.
    pub(crate) fn at_once<T: Send>(n: usize, f: impl Fn() -> T + Sync) -> Vec<T> {
        let start = std::sync::Barrier::new(n);
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        f()
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).collect()
        })
    }

    fn listen_now(path: &Path, mode: u32) -> io::Result<(OwnedFd, NamedPath)> {
        listen(path, mode, 8, &DirectoryLock::take(path)?)
    }

    #[test]
    fn a_directory_locked_by_someone_else_for_long_is_an_eagain_error_not_a_wait_without_end() {
        let path = scratch("locked");
        let holder = std::fs::File::open(path.parent().unwrap()).unwrap();
        // SAFETY: flock(2) on a file we own.
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
        let started = Instant::now();
        let err = DirectoryLock::take(&path).err().expect("locked elsewhere");
        assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
        assert!(started.elapsed() >= LOCK_PATIENCE && started.elapsed() < 2 * LOCK_PATIENCE);
        drop(holder);
        listen_now(&path, DEFAULT_MODE).expect("free again");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ss-named-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir.join("app.sock")
    }

    #[test]
    fn a_named_socket_has_its_mode_takes_connections_and_is_removed_only_while_it_is_ours() {
        let path = scratch("mode");
        let (listener, named) = listen_now(&path, 0o640).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let conn = connect(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(peer_credentials(conn.as_fd()).map(|c| c.0), Some(std::process::id() as i32));
        drop((conn, listener));
        // Replaced by someone else meanwhile: not ours to remove.
        // (Written before the socket file goes, so it cannot reuse its inode number.)
        let other = path.with_file_name("other");
        std::fs::write(&other, b"other").unwrap();
        std::fs::rename(&other, &path).unwrap();
        drop(named);
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
        let (_listener, named) = listen_now(&path, DEFAULT_MODE).unwrap();
        drop(named);
        assert!(!path.exists());
    }

    #[test]
    fn a_live_servers_path_is_refused_a_stale_one_replaced_and_a_file_left_alone() {
        let path = scratch("live");
        let (listener, named) = listen_now(&path, DEFAULT_MODE).unwrap();
        let err = listen_now(&path, DEFAULT_MODE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        std::mem::forget(named); // the server died without removing its path
        drop(listener);
        let (_listener, _named) = listen_now(&path, DEFAULT_MODE).expect("a stale socket is replaced");
        connect(&path, Duration::from_secs(1)).expect("the new one answers");
        let file = path.with_file_name("file");
        std::fs::write(&file, b"precious").unwrap();
        assert_eq!(listen_now(&file, DEFAULT_MODE).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }

    #[test]
    fn servers_asking_for_one_path_at_once_get_it_once() {
        let path = scratch("race");
        for round in 0..50 {
            // A stale socket each round: all of them find it so and want to replace it.
            let (listener, stale) = listen_now(&path, DEFAULT_MODE).unwrap();
            std::mem::forget(stale);
            drop(listener);
            let made: Vec<_> = at_once(4, || listen_now(&path, DEFAULT_MODE)).into_iter().filter_map(Result::ok).collect();
            assert_eq!(made.len(), 1, "round {round}: {} servers got the path", made.len());
            for (listener, named) in made {
                std::mem::forget(named); // stale for the next round
                drop(listener);
            }
        }
    }

    #[test]
    fn a_path_as_long_as_a_unix_address_takes_works() {
        let dir = scratch("long").parent().unwrap().to_path_buf();
        let room = 107 - dir.as_os_str().len() - 1;
        let path = dir.join("s".repeat(room));
        let (_listener, _named) = listen_now(&path, DEFAULT_MODE).expect("107 bytes fit");
        connect(&path, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn connecting_to_nothing_fails_with_errno() {
        let path = scratch("nothing");
        assert_eq!(connect(&path, Duration::from_secs(1)).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(connect(&long, Duration::from_secs(1)).is_err());
        assert!(listen_now(&long, DEFAULT_MODE).is_err());
    }

    #[test]
    fn permission_is_the_own_uid_or_an_allowed_uid_or_gid() {
        let permitted = Permitted { uids: vec![1001], gids: vec![50] };
        assert!(permitted.allows(1000, 1000, 1000));
        assert!(permitted.allows(1000, 1001, 1));
        assert!(permitted.allows(1000, 7, 50));
        assert!(!permitted.allows(1000, 7, 8));
        assert!(!Permitted::default().allows(0, 65534, 65534));
        assert_eq!(resolve_user("root"), Ok(0));
        assert_eq!(resolve_user("4711"), Ok(4711));
        assert!(resolve_user("no-such-user-here").is_err());
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }
}
