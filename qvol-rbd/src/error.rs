//! librados and librbd errors as [`std::io::Error`]s: the negative `errno` a call returns,
//! with a sentence saying what was being done (the OS's text comes from the source).

use std::fmt;
use std::io;

/// What failed, with the `errno` as its source.
#[derive(Debug)]
pub(crate) struct CephError {
    context: String,
    source: io::Error,
}

impl fmt::Display for CephError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for CephError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The `io::Error` for a call that returned `rc < 0` (`-errno`, as every librados and
/// librbd call does).
pub(crate) fn from_rc(rc: i64, context: impl Into<String>) -> io::Error {
    let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
    let source = io::Error::from_raw_os_error(errno);
    io::Error::new(
        source.kind(),
        CephError {
            context: context.into(),
            source,
        },
    )
}

/// `Ok(rc)` for `rc >= 0`, else [`from_rc`] with the context `what()` gives.
pub(crate) fn check<T: Into<i64> + Copy>(rc: T, what: impl FnOnce() -> String) -> io::Result<i64> {
    let rc = rc.into();
    if rc < 0 {
        Err(from_rc(rc, what()))
    } else {
        Ok(rc)
    }
}

/// An `io::Error` with no OS error behind it.
pub(crate) fn other(kind: io::ErrorKind, message: impl Into<String>) -> io::Error {
    io::Error::new(kind, message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_errno_keeps_its_kind_and_context() {
        let e = from_rc(-i64::from(libc::ENOENT), "cannot open rbd:p/i");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(e.to_string(), "cannot open rbd:p/i");
        let inner = e.get_ref().and_then(|e| e.source()).unwrap().to_string();
        assert!(inner.contains("No such file"), "{inner}");
        assert!(check(0i32, || unreachable!()).is_ok());
        assert!(check(-5i32, || "x".into()).is_err());
    }
}
