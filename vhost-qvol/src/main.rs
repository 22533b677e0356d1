//! `vhost-qvol`: the vhost-user-blk backend daemon (one per VM disk).
//!
//! Follows the vhost-user spec's "Backend program conventions": no daemonizing,
//! `--socket-path` xor `--fd`, `--print-capabilities`, `--blk-file`, `--read-only`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vhost_qvol::config::{
    check_binding, check_image, check_queues, check_socket_path, check_unlock, serial_bytes,
    Config, ConfigError,
};
use vhost_qvol::paths;
use vhost_qvol::serve::SocketSource;

/// What `--print-capabilities` prints (vhost-user.json, block backends).
const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

#[derive(Debug, Parser)]
#[command(
    name = "vhost-qvol",
    version,
    about = "Serve an encrypted .qvol volume to a VM over vhost-user-blk"
)]
struct Args {
    /// Listen on this Unix socket path (replaced if a socket is there already).
    #[arg(long, value_name = "SOCK")]
    socket_path: Option<PathBuf>,
    /// Serve on this already listening Unix socket, inherited from the parent.
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// The .qvol image to serve: a file, or an RBD image `rbd:POOL/IMAGE`.
    #[arg(long, value_name = "IMAGE")]
    blk_file: Option<PathBuf>,
    #[command(flatten)]
    ceph: vhost_qvol::image::CephArgs,
    /// Serve only the volume with this id (as `qvol info IMAGE` prints it): any other
    /// image at the path is refused before anything is written.
    #[arg(long, value_name = "ID")]
    volume_id: Option<String>,
    /// Serve whatever recorded volume is at the path instead of one --volume-id (logs a
    /// warning).
    #[arg(long)]
    any_volume: bool,
    /// Unwrap only with this keystore key (it must be the key the volume is recorded for).
    #[arg(long, value_name = "KEY_ID")]
    key: Option<String>,
    /// Unlock through a passphrase keyslot, the passphrase read from FILE (instead of a
    /// keystore key; the keystore still vouches for the volume's freshness).
    #[arg(long, value_name = "FILE")]
    unlock_passphrase_file: Option<PathBuf>,
    /// Unlock through a recovery keyslot: one share file per flag, as many as it needs.
    #[arg(long, value_name = "FILE")]
    recovery_share: Vec<PathBuf>,
    /// Listen for `qvol` commands on this Unix socket (mode 0600; docs/CONTROL.md): stats,
    /// keyslot changes of the served image.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Serve the disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Serve this snapshot of the volume instead of its live disk (needs --read-only;
    /// `qvol snapshot list IMAGE` names them).
    #[arg(long, value_name = "NAME")]
    snapshot: Option<String>,
    /// Number of request queues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    num_queues: u32,
    /// After serving a request, a queue's thread watches its ring for up to this many
    /// microseconds before going back to sleep (0: never; at most 1000): a request arriving
    /// meanwhile is picked up without a thread wake-up, for a core kept busy meanwhile. The
    /// window adapts below this maximum to how soon requests follow each other, and closes
    /// when the queue is idle.
    #[arg(
        long,
        visible_alias = "poll-max-us",
        value_name = "US",
        default_value_t = 0
    )]
    poll_us: u32,
    /// Re-encrypt in the background (after `qvol reencrypt`, or resuming one found at
    /// start) at most this many MiB of data a second (0: no limit; `qvol reencrypt --rate`
    /// overrides it for the re-encryption it starts). The default keeps the guest's p99
    /// latency within about twice what it is without (benches/RESULTS.md).
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    reencrypt_rate: u64,
    /// Keystore directory [default: $QVOL_KEYSTORE, then $XDG_DATA_HOME/qvol/keystore].
    #[arg(long, value_name = "DIR")]
    keystore: Option<PathBuf>,
    /// File holding the keystore passphrase [default: $QVOL_PASSPHRASE_FILE, then
    /// $CREDENTIALS_DIRECTORY/qvol-passphrase].
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// Serial number the guest sees (at most 20 bytes) [default: from the volume id].
    #[arg(long, value_name = "S")]
    serial: Option<String>,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let socket = match (args.socket_path, args.fd) {
            (Some(_), Some(_)) => return Err(ConfigError::BothSockets),
            (None, None) => return Err(ConfigError::NoSocket),
            (Some(path), None) => check_socket_path(&path)?,
            (None, Some(fd)) if fd < 0 => return Err(ConfigError::BadFd(fd)),
            (None, Some(fd)) => SocketSource::Fd(fd),
        };
        let blk_file = check_image(&args.blk_file.ok_or(ConfigError::NoImage)?)?;
        let unlock = check_unlock(
            args.unlock_passphrase_file,
            args.recovery_share,
            args.key.as_deref(),
        )?;
        let binding = check_binding(args.volume_id.as_deref(), args.any_volume, args.key)?;
        if args.snapshot.is_some() && !args.read_only {
            return Err(ConfigError::SnapshotNeedsReadOnly);
        }
        Ok(Config {
            socket,
            blk_file,
            rbd: args.ceph.into(),
            read_only: args.read_only,
            num_queues: check_queues(args.num_queues)?,
            poll_us: check_poll(args.poll_us)?,
            keystore: paths::keystore_dir(args.keystore.as_deref()),
            passphrase_file: paths::passphrase_file(args.passphrase_file.as_deref()),
            passphrase_named: paths::passphrase_file_named(args.passphrase_file.as_deref()),
            serial: args.serial.as_deref().map(serial_bytes).transpose()?,
            binding,
            unlock,
            control_socket: args.control_socket,
            snapshot: args.snapshot,
            reencrypt_rate: args.reencrypt_rate.saturating_mul(1 << 20),
        })
    }
}

fn check_poll(us: u32) -> Result<u32, ConfigError> {
    if us > 1000 {
        return Err(ConfigError::BadPoll(us));
    }
    Ok(us)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = Config::try_from(args)
        .map_err(anyhow::Error::from)
        .and_then(vhost_qvol::start_backend);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!("vhost-qvol: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_qvol::unlock::Unlock;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let args = Args::try_parse_from(std::iter::once("vhost-qvol").chain(args.iter().copied()))
            .expect("clap accepts the arguments");
        Config::try_from(args)
    }

    #[test]
    fn socket_path_and_fd_are_exclusive_and_one_is_needed() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let img = img.path().to_str().unwrap();
        assert_eq!(
            parse(&["--socket-path", "a.sock", "--fd", "3", "--blk-file", img]),
            Err(ConfigError::BothSockets)
        );
        assert_eq!(parse(&["--blk-file", img]), Err(ConfigError::NoSocket));
        assert_eq!(
            parse(&["--fd", "3", "--blk-file", img]),
            Err(ConfigError::NoBinding)
        );
        let cfg = parse(&[
            "--fd",
            "3",
            "--blk-file",
            img,
            "--num-queues",
            "4",
            "--any-volume",
        ])
        .unwrap();
        assert_eq!(cfg.socket, SocketSource::Fd(3));
        assert_eq!(cfg.num_queues, 4);
        assert_eq!(cfg.reencrypt_rate, 32 << 20, "32 MiB/s by default");
        let cfg = parse(&[
            "--fd",
            "3",
            "--blk-file",
            img,
            "--any-volume",
            "--reencrypt-rate",
            "20",
        ])
        .unwrap();
        assert_eq!(cfg.reencrypt_rate, 20 << 20);
    }

    #[test]
    fn missing_image_and_bad_queue_counts_are_refused() {
        assert_eq!(
            parse(&[
                "--socket-path",
                "a.sock",
                "--blk-file",
                "/nonexistent/x.qvol"
            ]),
            Err(ConfigError::ImageMissing("/nonexistent/x.qvol".into()))
        );
        assert_eq!(
            parse(&["--socket-path", "a.sock"]),
            Err(ConfigError::NoImage)
        );
        let img = tempfile::NamedTempFile::new().unwrap();
        let img = img.path().to_str().unwrap();
        assert_eq!(
            parse(&[
                "--socket-path",
                "a.sock",
                "--blk-file",
                img,
                "--num-queues",
                "0",
                "--any-volume"
            ]),
            Err(ConfigError::BadQueueCount(0))
        );
    }

    #[test]
    fn unlock_flags_choose_one_kind_of_keyslot() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let img = img.path().to_str().unwrap();
        let base = ["--fd", "3", "--blk-file", img, "--any-volume"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert_eq!(with(&[]).unwrap().unlock, Unlock::Keystore);
        assert_eq!(
            with(&["--unlock-passphrase-file", "p"]).unwrap().unlock,
            Unlock::Passphrase("p".into())
        );
        assert_eq!(
            with(&["--recovery-share", "a", "--recovery-share", "b"])
                .unwrap()
                .unlock,
            Unlock::Recovery(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            with(&["--unlock-passphrase-file", "p", "--recovery-share", "a"]),
            Err(ConfigError::BothUnlocks)
        );
        assert_eq!(
            with(&["--unlock-passphrase-file", "p", "--key", "k"]),
            Err(ConfigError::KeyWithOtherUnlock)
        );
    }
}
