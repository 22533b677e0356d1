//! Image names of the form `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`.

use std::fmt;
use std::path::Path;

/// The prefix that marks an RBD image where a file path is accepted.
pub const PREFIX: &str = "rbd:";

/// An RBD image: its pool, the namespace within the pool, and its name there.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbdName {
    /// The pool.
    pub pool: String,
    /// The namespace within the pool (`rbd namespace create`); empty: the pool's default
    /// namespace.
    pub namespace: String,
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

    /// Parses `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`; the error is one sentence.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "{text:?} is not an RBD image name ({why}): write rbd:POOL/IMAGE or \
                 rbd:POOL/NAMESPACE/IMAGE"
            )
        };
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("no rbd: prefix"))?;
        if text.contains('\0') {
            return Err(bad("a NUL byte"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let (pool, namespace, image) = match parts[..] {
            [_] => return Err(bad("no /")),
            [pool, image] => (pool, "", image),
            [pool, namespace, image] => (pool, namespace, image),
            _ => return Err(bad("more than two /")),
        };
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("an empty pool, namespace or image"));
        }
        if image.contains('@') {
            return Err(bad("RBD snapshots are not supported"));
        }
        Ok(Self {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            image: image.to_string(),
        })
    }
}

impl fmt::Display for RbdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.namespace.as_str() {
            "" => write!(f, "{PREFIX}{}/{}", self.pool, self.image),
            ns => write!(f, "{PREFIX}{}/{ns}/{}", self.pool, self.image),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pool_namespace_and_image() {
        let n = RbdName::parse("rbd:vms/disk-1").unwrap();
        assert_eq!(
            (n.pool.as_str(), n.namespace.as_str(), n.image.as_str()),
            ("vms", "", "disk-1")
        );
        assert_eq!(n.to_string(), "rbd:vms/disk-1");
        let n = RbdName::parse("rbd:vms/tenant-a/disk-1").unwrap();
        assert_eq!(
            (n.pool.as_str(), n.namespace.as_str(), n.image.as_str()),
            ("vms", "tenant-a", "disk-1")
        );
        assert_eq!(n.to_string(), "rbd:vms/tenant-a/disk-1");
        assert!(RbdName::from_path(Path::new("/var/disk.qvol")).is_none());
        assert!(RbdName::from_path(Path::new("rbd:p/i")).unwrap().is_ok());
    }

    #[test]
    fn refuses_malformed_names_with_a_sentence() {
        for (bad, why) in [
            ("rbd:", "no /"),
            ("rbd:pool", "no /"),
            ("rbd:/img", "empty"),
            ("rbd:pool/", "empty"),
            ("rbd:p//i", "empty"),
            ("rbd:p/ns/", "empty"),
            ("rbd:/ns/i", "empty"),
            ("rbd:p/a/b/c", "more than two /"),
            ("rbd:p/i@snap", "snapshots"),
            ("rbd:p/ns/i@snap", "snapshots"),
        ] {
            let err = RbdName::parse(bad).unwrap_err();
            assert!(
                err.contains(why)
                    && err.ends_with("write rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE"),
                "{bad}: {err}"
            );
        }
    }
}
