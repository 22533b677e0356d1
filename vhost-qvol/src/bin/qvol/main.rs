//! `qvol`: the administration tool (the commands are listed in README.md).
//!
//! Each subcommand lives in its own module with a `run` function; this file only parses
//! and reports. Exit status: 0 on success, 1 on a user-facing error (one sentence on
//! stderr), 2 on a usage error (clap's own).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod access;
mod benchmark;
mod check;
mod compress;
mod convert;
mod create;
mod files;
mod header;
mod info;
mod key;
mod keyslot;
mod keystore;
mod nbd;
mod progress;
mod qemu_img;
mod recv;
mod reencrypt;
mod rekey;
mod resize;
mod send;
mod snapshot;
mod stats;
mod upgrade;
mod vm;
mod volume;

#[derive(Debug, Parser)]
#[command(
    name = "qvol",
    version,
    about = "Manage post-quantum encrypted .qvol volumes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    ceph: vhost_qvol::image::CephArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version of qvol and of the format it writes.
    Version,
    /// Manage the keystore.
    Keystore {
        #[command(subcommand)]
        command: keystore::KeystoreCommand,
    },
    /// Manage VM keys (ML-KEM-1024 + X25519).
    Key {
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// Create an encrypted volume with a keyslot for a keystore key.
    Create(create::CreateArgs),
    /// Describe a volume: header, cipher, keyslots; generation and space used if unlockable.
    Info(info::InfoArgs),
    /// List, add and remove the keyslots of a volume (the ways it opens).
    Keyslot {
        #[command(subcommand)]
        command: keyslot::KeyslotCommand,
    },
    /// Rewrap a volume's keyslots for the current generation of this keystore's keys.
    Rekey(rekey::RekeyArgs),
    /// Re-encrypt a volume under a new volume key (all data re-sealed, every keyslot made
    /// again around it); --resume continues, --status says how far it is.
    Reencrypt(reencrypt::ReencryptArgs),
    /// Back up or restore a volume's header and keyslots.
    Header {
        #[command(subcommand)]
        command: header::HeaderCommand,
    },
    /// Copy any image qemu-img reads into a new encrypted volume (holes stay holes; verified).
    Import(convert::ImportArgs),
    /// Copy a volume to any format qemu-img writes (holes stay holes; verified).
    Export(convert::ExportArgs),
    /// Convert a format-1 or format-2 image to format 3 in place (crash-safe).
    Upgrade(upgrade::UpgradeArgs),
    /// Grow a volume's disk (online when a daemon serves it), or shrink it (--shrink).
    Resize(resize::ResizeArgs),
    /// Set the compression of a volume's new writes: zstd, zstd:LEVEL or off (for a volume
    /// created with --compress; what was written before stays as it is).
    Compress(compress::CompressArgs),
    /// Take, list, revert to and delete snapshots of a volume (format version 4).
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Verify every block of the disk and its snapshots and the space accounting (exit 1
    /// when damaged); optionally salvage the readable blocks to a raw file.
    Check(check::CheckArgs),
    /// Write a snapshot as a stream (all of it, or what changed since an older one); needs
    /// no key.
    Send(send::SendArgs),
    /// Receive a stream: a full one creates the image, an incremental one adds to it.
    Recv(recv::RecvArgs),
    /// Request statistics and state of a served image, from its daemon's control socket.
    Stats(stats::StatsArgs),
    /// VMs whose disks are qvol volumes: new, start, stop, info, list, migrate.
    Vm(vm::VmArgs),
    /// The keystore's volume records (adopt an image from elsewhere, forget a deleted one).
    Volume {
        #[command(subcommand)]
        command: volume::VolumeCommand,
    },
    /// Measure this CPU: each cipher suite's seal and open speed (the implementation in use
    /// beside the reference), the hybrid KEM and the keystore's argon2id unlock.
    Benchmark(benchmark::BenchmarkArgs),
    /// Serve a volume's decrypted disk over NBD on a Unix socket, for qemu-img, qemu-io and
    /// nbdinfo, until Ctrl-C.
    Nbd(nbd::NbdArgs),
}

fn run(command: Command, ceph: vhost_qvol::image::CephArgs) -> anyhow::Result<()> {
    // A VM's config.yaml names the cluster of its rbd: disks (`vm::run`).
    if !matches!(command, Command::Vm(_)) {
        vhost_qvol::image::set_rbd_settings(ceph.clone().into());
    }
    match command {
        Command::Version => {
            println!("qvol {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Keystore { command } => keystore::run(command),
        Command::Key { command } => key::run(command),
        Command::Create(args) => create::run(args),
        Command::Info(args) => info::run(args),
        Command::Volume { command } => volume::run(command),
        Command::Keyslot { command } => keyslot::run(command),
        Command::Rekey(args) => rekey::run(args),
        Command::Reencrypt(args) => reencrypt::run(args),
        Command::Header { command } => header::run(command),
        Command::Import(args) => convert::import(args),
        Command::Export(args) => convert::export(args),
        Command::Vm(args) => vm::run(args, ceph),
        Command::Stats(args) => stats::run(args),
        Command::Resize(args) => resize::run(args),
        Command::Compress(args) => compress::run(args),
        Command::Snapshot { command } => snapshot::run(command),
        Command::Check(args) => check::run(args),
        Command::Send(args) => send::run(args),
        Command::Recv(args) => recv::run(args),
        Command::Upgrade(args) => upgrade::run(args),
        Command::Nbd(args) => nbd::run(args),
        Command::Benchmark(args) => benchmark::run(args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings (a failed mlock, a weak test KDF) reach stderr; RUST_LOG raises the level.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // It may unlock the keystore (the master seed in memory): no core dump, and no ptrace by
    // other processes of the same user (a daemon whose guest broke in, say).
    vhost_qvol::hardening::forbid_core_dumps();
    match run(cli.command, cli.ceph) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its causes, each said once.
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!("qvol: {}", chain.join(": "));
            ExitCode::from(1)
        }
    }
}
