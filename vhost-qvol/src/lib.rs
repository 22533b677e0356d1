//! vhost-qvol: glue between qvol-core (the volume engine), qvol-keys (keystore, KEM,
//! keyslots) and vhost-user-blk. Both binaries, `vhost-qvol` and `qvol`, are thin layers
//! over the modules here.
//!
//! A request's path: `serve` accepts a frontend -> `backend` (one thread per queue) pops
//! a descriptor chain -> `request` parses it and copies through a bounce buffer ->
//! `disk::Disk` (a `qvol_core::Volume`) encrypts or decrypts -> status back to the guest.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
pub mod blk_config;
pub mod compression;
pub mod config;
pub mod control;
pub mod describe;
mod direct;
pub mod disk;
pub mod hardening;
pub mod image;
pub mod lock;
pub mod nbd;
pub mod open;
pub mod paths;
pub mod poll;
mod pool;
pub mod recorder;
pub mod reencryptor;
pub mod request;
pub mod serve;
pub mod signals;
pub mod size;
pub mod socket_file;
pub mod stats;
pub mod text;
pub mod unlock;
pub mod volume_disk;

use std::sync::Arc;

use anyhow::Context;
use log::{error, info, warn};

use crate::backend::Device;
use crate::config::Config;
use crate::disk::Disk;
use crate::lock::ImageLock;
use crate::open::KeySource;
use crate::serve::SocketSource;

/// Runs the daemon: opens the image, listens, serves frontends one after another until
/// SIGTERM/SIGINT (then finishes what is in flight, commits and exits 0).
pub fn start_backend(config: Config) -> anyhow::Result<()> {
    // Before any secret is read: no core dump, no ptrace by other users of this uid, and
    // nothing inherited from the parent left open but the standard streams and --fd.
    hardening::forbid_core_dumps();
    image::set_rbd_settings(config.rbd.clone());
    hardening::close_inherited_fds(match config.socket {
        SocketSource::Fd(fd) => Some(fd),
        SocketSource::Path(_) => None,
    });
    // Before any thread starts, so that every thread inherits the blocked mask.
    signals::block_termination_signals().context("cannot block SIGTERM and SIGINT")?;
    // An inherited socket is checked before the image is opened; a socket path is bound
    // after, so that it appears only once the daemon can serve.
    let inherited = match &config.socket {
        SocketSource::Fd(_) => Some(serve::listen(&config.socket)?),
        SocketSource::Path(_) => None,
    };
    if image::is_rbd(&config.blk_file) {
        // RBD's request threads allocate each request's sealed data (handed to the writes
        // gathered with other writers'), and glibc gives each thread an arena of its own
        // (up to 8 a core) that keeps what they free: peak RSS 304 MiB in `compare
        // --backends rbd-xchacha`. Two arenas, set before librados starts its threads
        // (glibc fixes its arena limit once the first few arenas exist): 102 MiB at the same
        // speed (one arena slowed writes; a fixed mmap threshold cut RSS to 74 MiB but
        // sequential reads to a tenth, librbd's own buffers being mapped and unmapped for
        // each read). benches/RESULTS.md has the runs.
        // SAFETY: mallopt only changes allocator parameters; no other thread runs yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
    let (volume, volume_id, recorder, lock) = open_disk(&config)?;
    let stats = Arc::new(stats::Stats::default());
    let disk: Arc<dyn Disk> = Arc::new(stats::CountingDisk::new(
        Arc::clone(&volume) as Arc<dyn Disk>,
        Arc::clone(&stats),
    ));
    // Bound before the sandbox (no bind after it), served after (its threads inherit it).
    let control_listener = config
        .control_socket
        .as_deref()
        .map(|path| {
            control::bind(path)
                .with_context(|| format!("cannot listen on the control socket {}", path.display()))
        })
        .transpose()?;
    if config.binding.volume_id.is_none() {
        warn!(
            "--any-volume: serving whatever recorded volume is at {}; an image copied over it \
             would be served too",
            config.blk_file.display()
        );
    }
    let serial = config
        .serial
        .unwrap_or_else(|| config::default_serial(&volume_id));
    let device = Arc::new(Device::new(
        disk,
        config.read_only,
        serial,
        config.num_queues,
    ));
    device.set_poll(std::time::Duration::from_micros(u64::from(config.poll_us)));
    if image::is_rbd(&config.blk_file) {
        // Each storage call waits on the cluster: serve a queue's requests together.
        device.set_parallel(RBD_PARALLEL, 0);
        device.set_read_batch(RBD_READ_BATCH);
    } else {
        // Sealing and opening large requests is what bounds one queue: spread them over
        // the cores the queues leave (more threads than cores only preempt lock holders).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_queue = cores / usize::from(config.num_queues.max(1));
        device.set_parallel(per_queue.clamp(1, FILE_PARALLEL), FILE_PARALLEL_MIN);
    }
    let mut listener = match inherited {
        Some(listener) => listener,
        None => serve::listen(&config.socket)?,
    };
    // Every file the daemon needs is open now: shut the rest of the filesystem away
    // before any serving thread starts (they inherit the restriction).
    confine(&config)?;
    if let Some(recorder) = &recorder {
        recorder
            .start_thread()
            .context("cannot start the keystore recording thread")?;
    }
    let reencryptor = reencryptor::Reencryptor::new(Arc::clone(&volume), config.reencrypt_rate);
    if !config.read_only {
        resume_reencryption(&reencryptor, &volume)?;
    }
    if let Some(listener) = control_listener {
        let control =
            control::Control::new(volume, stats, Arc::clone(&device), Arc::clone(&reencryptor));
        control::spawn(listener, Arc::new(control))
            .context("cannot start the control socket's thread")?;
    }
    info!(
        "serving {} ({} bytes{}) on {}",
        config.blk_file.display(),
        device.disk().size(),
        match (&config.snapshot, config.read_only) {
            (Some(name), _) => format!(", snapshot {}, read-only", text::escape_untrusted(name)),
            (None, true) => ", read-only".to_string(),
            (None, false) => String::new(),
        },
        match &config.socket {
            SocketSource::Path(p) => p.display().to_string(),
            SocketSource::Fd(fd) => format!("fd {fd}"),
        }
    );
    let socket_path = match &config.socket {
        SocketSource::Path(p) => Some(p.clone()),
        SocketSource::Fd(_) => None,
    };
    let on_signal_device = Arc::clone(&device);
    let on_signal_recorder = recorder.clone();
    signals::on_termination(move |sig| {
        shut_down(
            &on_signal_device,
            &reencryptor,
            on_signal_recorder.as_deref(),
            &lock,
            socket_path,
            sig,
        )
    })
    .context("cannot start the signal thread")?;
    serve::serve(&mut listener, &device)?;
    Ok(())
}

/// Applies the Landlock sandbox (`hardening::sandbox`) and says how it came out.
fn confine(config: &Config) -> anyhow::Result<()> {
    let paths = hardening::SandboxPaths {
        keystore: config.keystore.clone(),
    };
    match hardening::sandbox(&paths).context("cannot sandbox the daemon (Landlock)")? {
        hardening::SandboxStatus::Full => info!(
            "sandboxed (Landlock, seccomp): only the keystore's volume records and lock stay \
             reachable"
        ),
        hardening::SandboxStatus::Partial => {
            warn!("sandboxed in part: this kernel's Landlock lacks some restrictions qvol asks for")
        }
        hardening::SandboxStatus::None => warn!(
            "not sandboxed: this kernel has no Landlock, so a compromised daemon could read \
             the keystore files its user can read"
        ),
    }
    Ok(())
}

/// A re-encryption in progress (started before the daemon last stopped) goes on in the
/// background.
fn resume_reencryption(
    reencryptor: &Arc<reencryptor::Reencryptor>,
    volume: &qvol_core::Volume,
) -> anyhow::Result<()> {
    let Some(progress) = volume.reencryption() else {
        return Ok(());
    };
    info!(
        "resuming the re-encryption of the volume in the background ({}% done, to {})",
        describe::percent(&progress),
        progress.to_suite
    );
    reencryptor
        .start()
        .context("cannot start the re-encryption thread")?;
    Ok(())
}

/// SIGTERM/SIGINT: let requests in flight finish, stop new ones, commit, exit.
fn shut_down(
    device: &Device,
    reencryptor: &reencryptor::Reencryptor,
    recorder: Option<&recorder::Recorder>,
    lock: &ImageLock,
    socket: Option<std::path::PathBuf>,
    sig: i32,
) -> ! {
    info!("signal {sig}: finishing requests in flight and closing the image");
    // A background re-encryption ends its step (crash-safe either way: it resumes at the
    // next start).
    reencryptor.stop(std::time::Duration::from_secs(5));
    let _quiet = device.quiesce();
    let mut code = 0;
    if let Err(e) = device.disk().commit() {
        error!("cannot commit the image: {e}");
        code = 1;
    }
    // The keystore learns the last commit before the process goes (longer than the
    // keystore lock's own 10 s limit; the systemd unit allows 20 s to stop).
    if recorder.is_some_and(|r| !r.flush(std::time::Duration::from_secs(15))) {
        error!(
            "the keystore did not record the last commit; the next start accepts an image \
             no older than the last recorded one"
        );
        code = 1;
    }
    // Closed rather than left to die with the process: an RBD image's lock and watch
    // outlive their holder until the cluster notices it is gone (about 30 s).
    lock.close();
    // The sandbox may refuse this (no remove right outside the keystore's records); the
    // next start replaces a stale socket.
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(code)
}

/// How many requests of one queue an RBD-backed disk serves at once: enough for the queue
/// depths guests use (Linux's virtio-blk asks for up to 128 per queue; 32 already keeps a
/// single OSD busy here, benches/RESULTS.md).
const RBD_PARALLEL: usize = 32;

/// The most bytes of reads an RBD-backed disk hands to one request thread together: many
/// small reads share a thread's wake-ups, a large one (opened on a core of its own) goes
/// alone.
const RBD_READ_BATCH: u64 = 256 << 10;

/// The most requests of one queue served at once on a file image (there: the cores per
/// queue), and the fewest bytes a request carries to be handed to another thread. On 2
/// cores, one queue's 1 MiB requests at queue depth 8 went from 1.03 / 1.60 GB/s
/// (xchacha20-poly1305 / aegis-256 writes) and 1.60 / 4.21 GB/s (reads) served one after the
/// other to 1.58 / 2.03 and 3.19 / 7.00 with 2 at once (8 at once: no better), while 4 KiB
/// requests, served on the queue's thread, kept their rate; with 8 per queue on 2 queues,
/// 16 threads sealing on 2 cores preempted each other's lock holders and writes fell to
/// 0.59 GB/s with waits up to 1.4 s (benches/RESULTS.md).
const FILE_PARALLEL: usize = 8;
const FILE_PARALLEL_MIN: u64 = 64 * 1024;

/// What [`open_disk`] returns: the volume as a [`Disk`], its id, its commit recorder
/// (writable only) and the lock that must be held while it is served.
type OpenedDisk = (
    Arc<qvol_core::Volume>,
    [u8; 16],
    Option<Arc<recorder::Recorder>>,
    ImageLock,
);

/// Opens the image named in `config`. The keystore is unlocked and dropped inside: from
/// here on the daemon holds the volume key and its own volume's record key, never the
/// keystore's master seed.
fn open_disk(config: &Config) -> anyhow::Result<OpenedDisk> {
    let keys = KeySource {
        keystore: config.keystore.clone(),
        passphrase_file: config.passphrase_file.clone(),
        passphrase_named: config.passphrase_named,
    };
    let opened = open::open_volume(&open::OpenRequest {
        read_only: config.read_only,
        snapshot: config.snapshot.as_deref(),
        ..open::OpenRequest::new(&config.blk_file, &keys, &config.unlock, &config.binding)
    })?;
    let (vm, key_id) = opened
        .binding
        .as_ref()
        .map_or(("?", "?"), |b| (b.vm.as_str(), b.key_id.as_str()));
    info!(
        "opened {} (volume {} of VM {vm}, key {key_id}) with keyslot {} ({})",
        config.blk_file.display(),
        hex::encode(opened.header.volume_id),
        opened.slot,
        config.unlock
    );
    let volume_id = opened.header.volume_id;
    Ok((
        Arc::new(opened.volume),
        volume_id,
        opened.recorder,
        opened.lock,
    ))
}
