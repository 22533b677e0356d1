//! Image names of the form `rbd:POOL/IMAGE`.

use std::fmt;
use std::path::Path;

/// The prefix that marks an RBD image where a file path is accepted.
pub const PREFIX: &str = "rbd:";

/// An RBD image: its pool and its name within the pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbdName {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
}

impl RbdName {
    /// `Some` for a path that starts with `rbd:` (well formed or not: [`RbdName::parse`]
    /// says what is wrong), `None` for an ordinary file path.
    pub fn from_path(path: &Path) -> Option<Result<Self, String>> {
        let text = path.to_str()?;
        text.starts_with(PREFIX).then(|| Self::parse(text))
    }

    /// Parses `rbd:POOL/IMAGE`; the error is one sentence.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("{text:?} is not an RBD image name ({why}): write rbd:POOL/IMAGE");
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("no rbd: prefix"))?;
        let (pool, image) = rest.split_once('/').ok_or_else(|| bad("no /"))?;
        if pool.is_empty() || image.is_empty() {
            return Err(bad("empty pool or image"));
        }
        if image.contains('/') || image.contains('@') {
            return Err(bad("namespaces and snapshots are not supported"));
        }
        if text.contains('\0') {
            return Err(bad("a NUL byte"));
        }
        Ok(Self {
            pool: pool.to_string(),
            image: image.to_string(),
        })
    }
}

impl fmt::Display for RbdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/{}", self.pool, self.image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pool_and_image() {
        let n = RbdName::parse("rbd:vms/disk-1").unwrap();
        assert_eq!((n.pool.as_str(), n.image.as_str()), ("vms", "disk-1"));
        assert_eq!(n.to_string(), "rbd:vms/disk-1");
        assert!(RbdName::from_path(Path::new("/var/disk.qvol")).is_none());
        assert!(RbdName::from_path(Path::new("rbd:p/i")).unwrap().is_ok());
    }

    #[test]
    fn refuses_malformed_names_with_a_sentence() {
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/img",
            "rbd:pool/",
            "rbd:p/a/b",
            "rbd:p/i@snap",
        ] {
            let err = RbdName::parse(bad).unwrap_err();
            assert!(err.contains("write rbd:POOL/IMAGE"), "{bad}: {err}");
        }
    }
}
