//! `qvol nbd IMAGE --socket PATH [--read-only] [--export-name NAME]`: serves the decrypted
//! disk over NBD on a Unix socket until SIGINT or SIGTERM, so that every QEMU tool
//! (`qemu-img convert/compare/map/info`, `qemu-io`) and `nbdinfo`/`nbdcopy` work on a qvol
//! disk. The image is opened as the daemon opens it (`open.rs`: lock, header, keystore
//! record, unlock, freshness); the server is `vhost_qvol::nbd`. docs/NBD.md has examples.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Context};
use log::{error, info};
use vhost_qvol::disk::Disk;
use vhost_qvol::nbd::{NbdOptions, NbdServer};
use vhost_qvol::open::{open_volume, volume_id_hex, Binding, OpenRequest, OpenedVolume};
use vhost_qvol::signals;
use vhost_qvol::volume_disk::error_chain;

use crate::access::UnlockArgs;
use crate::keystore::KeystoreArgs;

/// How long the keystore may take to record the last commit at exit.
const RECORD_TIMEOUT: Duration = Duration::from_secs(15);

/// `qvol nbd`
#[derive(Debug, clap::Args)]
pub struct NbdArgs {
    /// The image to serve.
    pub image: PathBuf,
    /// The Unix socket to listen on (made with mode 0600; whoever can connect reads and
    /// writes the decrypted disk: keep it in a private directory).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Serve read-only, to any number of clients at once (a writable export serves one).
    #[arg(long)]
    pub read_only: bool,
    /// The export's name (clients may also ask for the default export, "").
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export_name: String,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// Runs `qvol nbd`.
pub fn run(args: NbdArgs) -> anyhow::Result<()> {
    // Before any thread starts, so that every thread inherits the blocked mask and the
    // signal thread alone receives them (signals.rs).
    signals::block_termination_signals().context("cannot block SIGTERM and SIGINT")?;
    let unlock = args.unlock.unlock()?;
    let source = args.keys.source();
    let binding = Binding::default();
    let OpenedVolume {
        volume,
        header,
        recorder,
        lock,
        ..
    } = open_volume(&OpenRequest {
        read_only: args.read_only,
        ..OpenRequest::new(&args.image, &source, &unlock, &binding)
    })?;
    if let Some(recorder) = &recorder {
        recorder
            .start_thread()
            .context("cannot start the keystore recording thread")?;
    }
    let id = volume_id_hex(&header.volume_id);
    let volume = Arc::new(volume);
    let size = volume.size();
    let opts = NbdOptions {
        read_only: args.read_only,
        export_name: args.export_name.clone(),
        description: format!("qvol volume {id} ({})", args.image.display()),
    };
    let server = NbdServer::bind(&args.socket, Arc::clone(&volume) as Arc<dyn Disk>, opts)?;
    let (signalled, signal) = mpsc::channel();
    signals::on_termination(move |sig| {
        let _ = signalled.send(sig);
    })
    .context("cannot start the signal thread")?;
    let handle = server.spawn().context("cannot start the NBD server")?;
    println!(
        "Serving {} (volume {id}, {size} bytes{}) over NBD on {}; stop with Ctrl-C.",
        args.image.display(),
        if args.read_only { ", read-only" } else { "" },
        args.socket.display()
    );
    match signal.recv() {
        Ok(sig) => info!("signal {sig}: ending the NBD connections and closing the image"),
        Err(_) => error!("the signal thread ended; closing the image"),
    }
    let served = handle.shutdown();
    let closed = match Arc::try_unwrap(volume) {
        Ok(volume) => volume.close().map_err(|e| error_chain(&e)),
        Err(_) => Err("the volume is still in use".to_string()),
    };
    let recorded = recorder.is_none_or(|r| r.flush(RECORD_TIMEOUT));
    drop(lock);
    served.map_err(|e| anyhow!("cannot flush {}: {e}", args.image.display()))?;
    closed.map_err(|e| anyhow!("cannot close {}: {e}", args.image.display()))?;
    if !recorded {
        return Err(anyhow!(
            "the keystore did not record the last commit of {}; the next open accepts an \
             image no older than the last recorded one",
            args.image.display()
        ));
    }
    Ok(())
}
