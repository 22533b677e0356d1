//! The error type of qvol-keys: a kind the caller can match, a sentence of context and the
//! source. Messages never contain secret material.

use std::fmt;

/// What went wrong, for callers that react differently to different failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file or directory could not be read or written.
    Io,
    /// A file or blob is not in the expected format (truncated, foreign, bad checksum).
    Corrupt,
    /// A format version or algorithm this build does not know.
    Unsupported,
    /// The passphrase does not unlock the keystore, slot or export file.
    WrongPassphrase,
    /// No keyslot could be opened with what was offered.
    NoMatchingSlot,
    /// An authenticated blob failed its authentication check (tampered or wrong key).
    Integrity,
    /// The named key, VM or generation does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// An argument is out of range or malformed (VM name, k-of-n, KDF parameters...).
    InvalidInput,
    /// Fewer recovery shares than the threshold, or shares from different sets.
    TooFewShares,
    /// An image is older than the state the keystore recorded for it, or its history forked.
    Rollback,
    /// The thing to remove is still in use (a key bound to recorded volumes).
    InUse,
}

/// An error from qvol-keys.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias of qvol-keys.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` whose message is `message` (a sentence without secrets).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// An I/O error about `what` (e.g. "cannot write /x/keystore.json").
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, what).with_source(source)
    }

    /// A format error.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// An invalid argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
