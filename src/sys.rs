//! The one place that turns a raw syscall's "-1 and errno" into an `io::Error`, for the few
//! calls that `nix` does not wrap the way we need (each call site says why it is raw).

use std::io;

/// A raw syscall's return value: `-1` becomes the thread's errno as an `io::Error`.
pub trait SyscallResult: Copy + PartialEq + From<i8> {}
impl SyscallResult for i32 {}
impl SyscallResult for i64 {}
impl SyscallResult for isize {}

/// `Ok(ret)` unless `ret` is -1, then `Err(errno)`.
pub fn check<T: SyscallResult>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minus_one_is_errno_and_anything_else_passes() {
        assert_eq!(check(3).unwrap(), 3);
        // SAFETY: closing an fd number that is never open here (-1 is refused with EBADF).
        let err = check(unsafe { libc::close(-1) }).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
