//! `qvol recv IMAGE [-i FILE] [--force]`: receives a stream `qvol send` wrote. A full stream
//! creates IMAGE (the sender's volume: same volume id, cipher, size and keyslots), unlocked
//! through a slot the stream carries, and records it in the keystore like `qvol volume
//! adopt`; it is built as `IMAGE.partial` and renamed only once everything verified. An
//! incremental stream goes into the existing IMAGE, opened like every changing command
//! (`access.rs`), never while a daemon serves it. Every node and data block is checked with
//! the key before anything becomes reachable: a refused stream changes nothing.

use std::fs::{self, File};
use std::io::{BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use qvol_core::storage::FileStorage;
use qvol_core::{Snapshot, StreamHead, Volume};
use qvol_keys::{keyslot, UnlockedKeystore};
use vhost_qvol::lock::{ImageLock, LockError};
use vhost_qvol::open::{read_image_header, state_of, volume_id_hex};
use vhost_qvol::volume_disk::error_chain;

use crate::access::{open_for_change, record_wraps, Handle, UnlockArgs};
use crate::create::RemoveOnFailure;
use crate::keystore::KeystoreArgs;
use crate::send::{partial_path, Meter};

/// `qvol recv`
#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// The image: created from a full stream if it does not exist; an incremental stream
    /// goes into the existing one (not while a daemon serves it).
    pub image: PathBuf,
    /// Read the stream from FILE instead of standard input.
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Discard what changed on the image's disk since the stream's base snapshot (otherwise
    /// such an image is refused).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keys: KeystoreArgs,
}

/// Receives the rest of the stream into a volume, with `force` (the stream's hash state
/// and reader inside).
type Receive<'a> = &'a mut dyn FnMut(&Volume, bool) -> qvol_core::Result<Snapshot>;

/// Runs `qvol recv`.
pub fn run(args: RecvArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let (mut reader, what) = open_stream(args.input.as_deref())?;
    let (head, hash) = qvol_core::read_stream_head(&mut *reader)
        .map_err(|e| anyhow!("cannot read the stream {what}: {}", error_chain(&e)))?;
    let mut meter = Meter::new("received");
    let mut hash = Some(hash);
    let mut rx = |volume: &Volume, force: bool| {
        let hash = hash.take().unwrap_or_default();
        let progress = &mut |bytes: u64| meter.show(bytes);
        volume.receive(&head, hash, &mut *reader, force, progress)
    };
    let exists = fs::symlink_metadata(image).is_ok();
    let (snap, how) = if exists {
        into_existing(&args, &head, &mut rx)?
    } else {
        into_new(&args, &head, &mut rx)?
    };
    meter.finish();
    println!(
        "Received snapshot {:?} into {} ({how}); the disk is now its content.",
        snap.name,
        image.display()
    );
    Ok(())
}

/// Opens the stream (standard input unless `input`); says what it is for messages.
fn open_stream(input: Option<&Path>) -> anyhow::Result<(Box<dyn Read>, String)> {
    Ok(match input {
        Some(path) => {
            let file = File::open(path)
                .with_context(|| format!("cannot open the stream {}", path.display()))?;
            (
                Box::new(BufReader::with_capacity(1 << 20, file)),
                path.display().to_string(),
            )
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!(
                    "refusing to read a binary stream from a terminal: pipe it in or pass -i FILE"
                );
            }
            (
                Box::new(BufReader::with_capacity(1 << 20, stdin)),
                "on standard input".to_string(),
            )
        }
    })
}

/// Creates `args.image` from a full stream: built as `IMAGE.partial`, recorded in the
/// keystore, then linked to its name (never over a file that appeared meanwhile).
fn into_new(
    args: &RecvArgs,
    head: &StreamHead,
    rx: Receive<'_>,
) -> anyhow::Result<(Snapshot, String)> {
    let image = &args.image;
    if head.base.is_some() {
        bail!(
            "{} does not exist, and the stream is incremental: receive the full stream of the \
             volume first",
            image.display()
        );
    }
    let header = head
        .header_info()
        .map_err(|e| anyhow!("cannot read the stream's header: {}", error_chain(&e)))?;
    let id = header.volume_id;
    let unlock = args.unlock.unlock()?;
    let source = args.keys.source();
    let keystore = if unlock.is_keystore() || source.keystore_exists() {
        Some(source.unlock()?)
    } else {
        None
    };
    if let Some(ks) = &keystore {
        if ks.volume_guard(&id).is_ok() {
            bail!(
                "volume {} is already recorded in keystore {}: this host has an image of it \
                 (receive incremental streams into that image instead)",
                volume_id_hex(&id),
                ks.dir().display()
            );
        }
    }
    let (slot, key) = unlock.unwrap(Path::new("the stream"), &header, keystore.as_ref(), None)?;
    let bind_key = binding_key(
        &header.keyslots,
        slot,
        keystore.as_ref(),
        unlock.is_keystore(),
    );

    let partial = partial_path(image);
    let storage = FileStorage::create_new(&partial).with_context(|| {
        format!(
            "cannot create {} (if a receive was interrupted, remove it)",
            partial.display()
        )
    })?;
    let mut cleanup = RemoveOnFailure(Some(&partial));
    let _lock = ImageLock::acquire(&partial, true)?;
    let failed = |what: &str, e: qvol_core::Error| {
        anyhow!("cannot {what} {}: {}", image.display(), error_chain(&e))
    };
    let options = head.create_options().map_err(|e| failed("create", e))?;
    let volume =
        Volume::create(Arc::new(storage), options, &key).map_err(|e| failed("create", e))?;
    let snap = rx(&volume, false).map_err(|e| {
        anyhow!(
            "cannot receive into {}: {}; no image was made",
            image.display(),
            error_chain(&e)
        )
    })?;
    volume.commit().map_err(|e| failed("commit", e))?;
    let point = volume.commit_point();
    volume.close().map_err(|e| failed("close", e))?;

    let recorded = match (&keystore, &bind_key) {
        (Some(ks), Some(key_id)) => {
            ks.adopt_volume(&id, key_id, &state_of(&point))
                .with_context(|| {
                    format!(
                        "cannot record volume {} in keystore {}",
                        volume_id_hex(&id),
                        ks.dir().display()
                    )
                })?;
            record_wraps(ks, &id, key_id, &header.keyslots)?;
            Some((ks, key_id))
        }
        _ => None,
    };
    if let Err(e) = publish(&partial, image) {
        if let Some((ks, _)) = recorded {
            let _ = ks.forget_volume(&id);
        }
        return Err(e);
    }
    cleanup.0 = None;
    let how = match recorded {
        Some((_, key_id)) => format!(
            "new volume {}, recorded for key {key_id}",
            volume_id_hex(&id)
        ),
        None => {
            log::warn!(
                "volume {} ({}) is recorded in no keystore (no recipient slot of the stream is \
                 for a key of this one), so no daemon serves it yet: `qvol keyslot add {} --key \
                 KEY_ID` with the same unlock flags adds a slot for a key of this keystore and \
                 records it",
                volume_id_hex(&id),
                image.display(),
                image.display()
            );
            format!("new volume {}, not recorded", volume_id_hex(&id))
        }
    };
    Ok((snap, how))
}

/// The keystore key the new volume is bound to: the key of the recipient slot that
/// unwrapped, or (with a passphrase or shares) the first key of this keystore that one of
/// the stream's recipient slots is for.
fn binding_key(
    slots: &[Vec<u8>],
    unlocked: usize,
    keystore: Option<&UnlockedKeystore>,
    by_keystore: bool,
) -> Option<String> {
    let ks = keystore?;
    let key_of = |blob: &Vec<u8>| keyslot::describe(blob).ok().and_then(|i| i.key_id);
    if by_keystore {
        return slots.get(unlocked).and_then(key_of);
    }
    slots
        .iter()
        .filter_map(key_of)
        .find(|id| ks.public_key(id).is_ok())
}

/// Gives `partial` its final name `image` (refused if something is there), durably.
fn publish(partial: &Path, image: &Path) -> anyhow::Result<()> {
    fs::hard_link(partial, image).with_context(|| {
        format!(
            "cannot name the received image {} (it must not exist)",
            image.display()
        )
    })?;
    let _ = fs::remove_file(partial);
    if let Some(dir) = image.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Receives an incremental (or, with `--force`, any) stream into the existing image.
fn into_existing(
    args: &RecvArgs,
    head: &StreamHead,
    rx: Receive<'_>,
) -> anyhow::Result<(Snapshot, String)> {
    let image = &args.image;
    // A daemon holding the image (even read-only) means a guest may be using its disk.
    if let Err(LockError::Busy { .. }) = ImageLock::acquire(image, true) {
        bail!("{}", served(image));
    }
    let (_, header) = read_image_header(image)?;
    if header.volume_id != head.volume_id() {
        bail!(
            "the stream is of volume {}, not of {}'s volume {}; nothing was changed",
            volume_id_hex(&head.volume_id()),
            image.display(),
            volume_id_hex(&header.volume_id)
        );
    }
    let mut base_name = None;
    let change = open_for_change(image, &args.keys, &args.unlock, false, |change| {
        if let Some(vol) = change.volume() {
            base_name = judge(vol, head, image, args.force)?;
        }
        Ok(true)
    })?
    .ok_or_else(|| anyhow!("internal: the receive was judged unnecessary"))?;
    let Handle::Local(opened) = change.into_handle() else {
        bail!("{}", served(image));
    };
    let snap = rx(&opened.volume, args.force).map_err(|e| {
        anyhow!(
            "cannot receive into {}: {}; nothing was changed",
            image.display(),
            error_chain(&e)
        )
    })?;
    let recorder = opened.recorder.clone();
    opened
        .volume
        .close()
        .map_err(|e| anyhow!("cannot close {}: {}", image.display(), error_chain(&e)))?;
    if let Some(recorder) = recorder {
        recorder.flush(std::time::Duration::from_secs(15));
    }
    let how = match base_name {
        Some(base) => format!("incremental from its snapshot {base:?}"),
        None => "full".to_string(),
    };
    Ok((snap, how))
}

/// Refuses, on a read-only view, a stream the volume cannot take: one of a snapshot it has,
/// an incremental one whose base it lacks, and whatever else `Volume::check_stream` judges
/// from the head (a forged entry, a disk changed since the base without `force`), so that a
/// refused receive leaves the image as it was. Returns the base's name.
fn judge(
    vol: &Volume,
    head: &StreamHead,
    image: &Path,
    force: bool,
) -> anyhow::Result<Option<String>> {
    let snaps = vol.snapshots();
    let name = &head.snapshot.name;
    if snaps
        .iter()
        .any(|s| s.guid == head.snapshot.guid || s.name == *name)
    {
        bail!(
            "{} already has a snapshot named {name:?}; nothing was changed",
            image.display()
        );
    }
    let base = match head.base {
        None => None,
        Some(guid) => match snaps.iter().find(|s| s.guid == guid) {
            Some(base) => Some(base.name.clone()),
            None => bail!(
                "the stream is incremental from a snapshot {} does not have (receive the \
                 streams in order); nothing was changed",
                image.display()
            ),
        },
    };
    vol.check_stream(head, force).map_err(|e| {
        anyhow!(
            "cannot receive into {}: {}; nothing was changed",
            image.display(),
            error_chain(&e)
        )
    })?;
    Ok(base)
}

fn served(image: &Path) -> String {
    format!(
        "{} is served by a vhost-qvol: stop the VM first (its disk cannot change under a \
         running guest), then receive",
        image.display()
    )
}
