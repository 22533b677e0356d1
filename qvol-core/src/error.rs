//! The error type of qvol-core: a kind the caller can match plus a sentence of context.

use std::fmt;
use std::io;

/// What went wrong, for callers that react differently (the daemon maps all of them to an
/// I/O error for the guest; the CLI prints the sentence).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The storage failed (read, write, sync).
    Io,
    /// Not a qvol image, truncated, unsupported version, or a structure that cannot be parsed.
    Corrupt,
    /// A tag or MAC did not verify: the image was changed by someone without the key, or an
    /// older copy of a block or node was put back.
    Integrity,
    /// The key is not this volume's key.
    WrongKey,
    /// The request goes past the end of the volume.
    OutOfRange,
    /// The offset or length is not a multiple of 512 bytes.
    Unaligned,
    /// The volume was opened read-only.
    ReadOnly,
    /// The image uses a feature this version does not support.
    Unsupported,
    /// An earlier write or sync failed; the volume must be reopened.
    PreviousIo,
    /// No free physical block is left in the volume's space map.
    NoSpace,
    /// An argument is invalid (e.g. a volume size that is not a multiple of 4096).
    InvalidInput,
    /// The caller's check refused the volume's commit point at open (`OpenOptions::check`):
    /// nothing was written. The check's own error is the source.
    Refused,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Integrity => "integrity check failed",
            ErrorKind::WrongKey => "wrong key",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Unaligned => "unaligned request",
            ErrorKind::ReadOnly => "read-only volume",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::PreviousIo => "previous I/O error",
            ErrorKind::NoSpace => "no space",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Refused => "refused by the caller's check",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// An error of the volume engine: a kind, a sentence saying what failed and where (block,
/// offset, operation), and the underlying error if any. The message never repeats the
/// source's text; print the chain to see both.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of qvol-core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` with a context sentence.
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error with context.
    pub(crate) fn io(message: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An error of `kind` with a context sentence and the error that caused it.
    pub(crate) fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(source),
        }
    }

    /// An integrity failure.
    pub(crate) fn integrity(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Integrity, message)
    }

    /// A corrupt-image error.
    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context sentence, without the source.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
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
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::OutOfRange | ErrorKind::Unaligned | ErrorKind::InvalidInput => {
                io::ErrorKind::InvalidInput
            }
            ErrorKind::ReadOnly | ErrorKind::Refused => io::ErrorKind::PermissionDenied,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_and_source_are_separate() {
        let e = Error::io("cannot read block 7", io::Error::other("disk on fire"));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.to_string(), "cannot read block 7");
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(source.as_deref(), Some("disk on fire"));
    }

    #[test]
    fn converts_to_io_error() {
        let e: io::Error = Error::new(ErrorKind::OutOfRange, "past the end").into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
