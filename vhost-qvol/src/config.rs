//! The daemon's validated configuration. `main.rs` turns command-line `Args` into a
//! [`Config`] (all validation happens there, once); everything after works from this.

use std::path::{Path, PathBuf};

use crate::backend::{Serial, MAX_QUEUES};
use crate::open::Binding;
use crate::serve::SocketSource;
use crate::unlock::Unlock;

/// Everything `start_backend` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where frontends connect.
    pub socket: SocketSource,
    /// The `.qvol` image: a file, or `rbd:POOL/IMAGE`.
    pub blk_file: PathBuf,
    /// How an `rbd:` image is reached (cluster, identity, `--break-lock`).
    pub rbd: crate::image::RbdSettings,
    /// Serve read-only (VIRTIO_BLK_F_RO; the image is opened read-only).
    pub read_only: bool,
    /// Number of request queues, 1..=64.
    pub num_queues: u16,
    /// How long a queue's thread polls its ring after a request, in microseconds (0: off).
    pub poll_us: u32,
    /// The keystore directory (already resolved from flag, environment, default).
    pub keystore: Option<PathBuf>,
    /// The passphrase file, if any (already resolved).
    pub passphrase_file: Option<PathBuf>,
    /// Whether the passphrase file was named rather than the systemd credential default.
    pub passphrase_named: bool,
    /// The GET_ID serial; `None` derives one from the volume id.
    pub serial: Option<Serial>,
    /// The volume (and key) this daemon may serve.
    pub binding: Binding,
    /// Which keyslot kind unlocks the volume.
    pub unlock: Unlock,
    /// Where the control socket listens (docs/CONTROL.md), if anywhere.
    pub control_socket: Option<PathBuf>,
    /// Serve this snapshot of the volume instead of its live disk (read-only).
    pub snapshot: Option<String>,
    /// The rate of a background re-encryption, bytes of disk a second (0: no limit).
    pub reencrypt_rate: u64,
}

/// A command line that cannot work, said as one sentence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Neither `--socket-path` nor `--fd`.
    #[error("say where to listen with --socket-path PATH or --fd N")]
    NoSocket,
    /// Both `--socket-path` and `--fd`.
    #[error("--socket-path and --fd cannot be used together")]
    BothSockets,
    /// No `--blk-file`.
    #[error("say which image to serve with --blk-file IMAGE")]
    NoImage,
    /// The image does not exist or is not a file.
    #[error("the image {} does not exist or is not a regular file", .0.display())]
    ImageMissing(PathBuf),
    /// An `rbd:` name that is not `rbd:POOL/IMAGE`.
    #[error("{0}")]
    BadRbdName(String),
    /// The socket's directory does not exist.
    #[error("the directory of the socket path {} does not exist", .0.display())]
    SocketDirMissing(PathBuf),
    /// `--snapshot` without `--read-only`.
    #[error("a snapshot is served read-only: add --read-only to --snapshot")]
    SnapshotNeedsReadOnly,
    /// Bad `--poll-us`.
    #[error("--poll-us is at most 1000 (one millisecond), not {0}")]
    BadPoll(u32),
    /// Bad `--num-queues`.
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    BadQueueCount(u32),
    /// `--serial` too long.
    #[error("--serial is {0} bytes long; virtio-blk allows at most 20")]
    SerialTooLong(usize),
    /// Negative `--fd`.
    #[error("--fd must be a file descriptor number, not {0}")]
    BadFd(i32),
    /// `--volume-id` is not 32 hex digits.
    #[error("--volume-id must be the 32 hex digits `qvol info IMAGE` prints, not {0:?}")]
    BadVolumeId(String),
    /// A daemon without `--volume-id` or `--any-volume`.
    #[error(
        "say which volume this daemon serves with --volume-id ID (as `qvol info IMAGE` prints \
         it), or pass --any-volume to serve whatever image is at the path"
    )]
    NoBinding,
    /// Both `--volume-id` and `--any-volume`.
    #[error("--volume-id and --any-volume cannot be used together")]
    BothBindings,
    /// Both `--unlock-passphrase-file` and `--recovery-share`.
    #[error("--unlock-passphrase-file and --recovery-share cannot be used together")]
    BothUnlocks,
    /// `--key` with a passphrase or recovery unlock.
    #[error("--key chooses a keystore key to unlock with; it cannot be combined with --unlock-passphrase-file or --recovery-share")]
    KeyWithOtherUnlock,
}

/// Validates `--unlock-passphrase-file`, `--recovery-share` and their use with `--key`.
pub fn check_unlock(
    passphrase: Option<PathBuf>,
    shares: Vec<PathBuf>,
    key: Option<&str>,
) -> Result<Unlock, ConfigError> {
    let unlock = Unlock::from_flags(passphrase, shares).map_err(|_| ConfigError::BothUnlocks)?;
    if key.is_some() && !unlock.is_keystore() {
        return Err(ConfigError::KeyWithOtherUnlock);
    }
    Ok(unlock)
}

/// Validates `--volume-id`, `--any-volume` and `--key`: a daemon must be bound to one
/// volume unless `any_volume` says otherwise (read-only too: serving another VM's image
/// read-only still hands its plaintext to this guest).
pub fn check_binding(
    volume_id: Option<&str>,
    any_volume: bool,
    key_id: Option<String>,
) -> Result<Binding, ConfigError> {
    let volume_id = match (volume_id, any_volume) {
        (Some(_), true) => return Err(ConfigError::BothBindings),
        (None, false) => return Err(ConfigError::NoBinding),
        (None, true) => None,
        (Some(text), false) => Some(
            crate::open::parse_volume_id(text)
                .ok_or_else(|| ConfigError::BadVolumeId(text.to_string()))?,
        ),
    };
    Ok(Binding { volume_id, key_id })
}

/// Validates the image path.
pub fn check_image(path: &Path) -> Result<PathBuf, ConfigError> {
    if let Some(name) = qvol_rbd::RbdName::from_path(path) {
        // Whether the RBD image exists is for the cluster to say, at open.
        return name
            .map(|_| path.to_path_buf())
            .map_err(ConfigError::BadRbdName);
    }
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(ConfigError::ImageMissing(path.to_path_buf()))
    }
}

/// Validates a socket path: its directory must exist (the socket itself is created).
pub fn check_socket_path(path: &Path) -> Result<SocketSource, ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(SocketSource::Path(path.to_path_buf()))
    } else {
        Err(ConfigError::SocketDirMissing(path.to_path_buf()))
    }
}

/// Validates a queue count.
pub fn check_queues(n: u32) -> Result<u16, ConfigError> {
    match u16::try_from(n) {
        Ok(q) if (1..=MAX_QUEUES).contains(&q) => Ok(q),
        _ => Err(ConfigError::BadQueueCount(n)),
    }
}

/// Turns `--serial` into the 20-byte, NUL-padded GET_ID answer.
pub fn serial_bytes(serial: &str) -> Result<Serial, ConfigError> {
    let bytes = serial.as_bytes();
    let mut out = [0u8; 20];
    if bytes.len() > out.len() {
        return Err(ConfigError::SerialTooLong(bytes.len()));
    }
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

/// The default serial: "qvol-" and the first 7 bytes of the volume id in hex (19 bytes).
pub fn default_serial(volume_id: &[u8; 16]) -> Serial {
    let mut out = [0u8; 20];
    let text: String = std::iter::once("qvol-".to_string())
        .chain(volume_id[..7].iter().map(|b| format!("{b:02x}")))
        .collect();
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_in_a_missing_directory_is_refused() {
        let err = check_socket_path(Path::new("/nonexistent-dir/x.sock")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the directory of the socket path /nonexistent-dir/x.sock does not exist"
        );
        assert!(check_socket_path(Path::new("relative.sock")).is_ok());
    }

    #[test]
    fn serials_are_padded_and_bounded() {
        assert_eq!(&serial_bytes("abc").unwrap()[..4], b"abc\0");
        assert_eq!(
            serial_bytes("012345678901234567890"),
            Err(ConfigError::SerialTooLong(21))
        );
        let s = default_serial(&[0xab; 16]);
        assert_eq!(&s[..19], b"qvol-ababababababab");
        assert_eq!(s[19], 0);
    }

    #[test]
    fn a_daemon_needs_a_binding() {
        let id = "00112233445566778899aabbccddeeff";
        assert_eq!(
            check_binding(None, false, None),
            Err(ConfigError::NoBinding)
        );
        assert_eq!(check_binding(None, true, None).unwrap().volume_id, None);
        assert_eq!(
            check_binding(Some(id), true, None),
            Err(ConfigError::BothBindings)
        );
        assert_eq!(
            check_binding(Some("0011"), false, None),
            Err(ConfigError::BadVolumeId("0011".into()))
        );
        let b = check_binding(Some(id), false, Some("vm1-00000000".into())).unwrap();
        assert_eq!(b.volume_id.unwrap()[15], 0xff);
        assert_eq!(b.key_id.as_deref(), Some("vm1-00000000"));
    }

    #[test]
    fn queue_counts_are_bounded() {
        assert_eq!(check_queues(4), Ok(4));
        assert!(check_queues(0).is_err());
        assert!(check_queues(65).is_err());
        assert!(check_queues(70_000).is_err());
    }
}
