//! `qvol header backup|restore`: a copy of the header block and the keyslot area (36,864
//! bytes, the image's own bytes; docs/KEYS.md §5.2), and putting its keyslots back.
//! Restoring an older backup brings back the slots it had, removed ones included.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qvol_core::header::{decode_header, decode_keyslots, encode_keyslots};
use qvol_core::storage::Storage;
use qvol_core::{BLOCK_SIZE, KEYSLOT_SIZE, MAX_KEYSLOTS};
use serde_json::json;
use vhost_qvol::open::{open_volume, read_image_header, volume_id_hex, Binding, OpenRequest};
use vhost_qvol::volume_disk::error_chain;

use crate::access::{busy_sentence, Change, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// Bytes of a header backup: the header block and the keyslot area.
const BACKUP_LEN: usize = BLOCK_SIZE as usize + MAX_KEYSLOTS * KEYSLOT_SIZE;

/// `qvol header ...`
#[derive(Debug, clap::Subcommand)]
pub enum HeaderCommand {
    /// Copy the header and keyslot area to FILE (0600; must not exist). No key needed.
    Backup {
        /// The image.
        image: PathBuf,
        /// The backup file.
        file: PathBuf,
    },
    /// Put the keyslots of a backup of this volume back (unlocking through a slot of the
    /// backup or of the image): slots removed since the backup work again.
    Restore {
        /// The image.
        image: PathBuf,
        /// The backup file.
        file: PathBuf,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// Runs `qvol header ...`.
pub fn run(command: HeaderCommand) -> anyhow::Result<()> {
    match command {
        HeaderCommand::Backup { image, file } => backup(&image, &file),
        HeaderCommand::Restore {
            image,
            file,
            json,
            unlock,
            keystore,
        } => restore(&image, &file, json, &unlock, &keystore),
    }
}

fn backup(image: &Path, file: &Path) -> anyhow::Result<()> {
    // The keyslots as a keyless reader sees them (the staged copy while a change is torn).
    let (storage, header) = read_image_header(image)?;
    let mut bytes = vec![0u8; BLOCK_SIZE as usize];
    storage
        .read_exact_at(&mut bytes, 0)
        .with_context(|| format!("cannot read the header of {}", image.display()))?;
    bytes.extend_from_slice(&encode_keyslots(&header.keyslots)?);
    crate::files::write_new(file, &bytes, 0o600)?;
    let used = header.keyslots.iter().filter(|s| !s.is_empty()).count();
    println!(
        "Backed up the header and {used} keyslot(s) of {} (volume {}) to {}.",
        image.display(),
        volume_id_hex(&header.volume_id),
        file.display()
    );
    Ok(())
}

/// Reads and checks a backup file: its length, its header block, and that it is a backup
/// of `image`'s volume and volume key. Returns its keyslots.
fn read_backup(image: &Path, file: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut bytes = Vec::with_capacity(BACKUP_LEN);
    fs::File::open(file)
        .and_then(|f| f.take(BACKUP_LEN as u64 + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read the header backup {}", file.display()))?;
    if bytes.len() != BACKUP_LEN {
        let len = if bytes.len() > BACKUP_LEN {
            format!("more than {BACKUP_LEN}")
        } else {
            bytes.len().to_string()
        };
        bail!(
            "{} is {len} bytes long; a qvol header backup is exactly {BACKUP_LEN} bytes \
             (truncated, or not a backup)",
            file.display()
        );
    }
    let saved = decode_header(&bytes[..BLOCK_SIZE as usize]).map_err(|e| {
        anyhow!(
            "{} is not a qvol header backup: {}",
            file.display(),
            error_chain(&e)
        )
    })?;
    let storage = vhost_qvol::image::open_read_only(image)?;
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    storage
        .read_exact_at(&mut block, 0)
        .with_context(|| format!("cannot read the header of {}", image.display()))?;
    let current = decode_header(&block).map_err(|e| {
        anyhow!(
            "the header block of {} is unreadable ({}); `header restore` puts back keyslots, \
             not the header block",
            image.display(),
            error_chain(&e)
        )
    })?;
    if saved.volume_id != current.volume_id {
        bail!(
            "{} is a header backup of volume {}, not of volume {} ({}); refusing it",
            file.display(),
            volume_id_hex(&saved.volume_id),
            volume_id_hex(&current.volume_id),
            image.display()
        );
    }
    let same_volume = saved.suite == current.suite
        && saved.size == current.size
        && saved.log_len == current.log_len
        && saved.name == current.name;
    if !same_volume {
        bail!(
            "the header block of {} differs from the one in {} (size, cipher, log or name); \
             `header restore` puts back keyslots only, over an intact header",
            image.display(),
            file.display()
        );
    }
    if saved.key_check != current.key_check {
        bail!(
            "{} was made for another volume key of volume {} (re-encrypted since?); its \
             keyslots cannot open the image",
            file.display(),
            volume_id_hex(&current.volume_id)
        );
    }
    decode_keyslots(&bytes[BLOCK_SIZE as usize..]).map_err(|e| {
        anyhow!(
            "the keyslot area of {} is damaged: {}",
            file.display(),
            error_chain(&e)
        )
    })
}

fn restore(
    image: &Path,
    file: &Path,
    json: bool,
    unlock: &UnlockArgs,
    keys: &KeystoreArgs,
) -> anyhow::Result<()> {
    let saved = read_backup(image, file)?;
    let how = unlock.unlock()?;
    let source = keys.source();
    let keystore = if how.is_keystore() || source.keystore_exists() {
        Some(source.unlock()?)
    } else {
        None
    };
    let binding = Binding::default();
    let opened = open_volume(&OpenRequest {
        allow_unrecorded: true,
        keep_key: true,
        keystore: keystore.as_ref(),
        restore_slots: Some(&saved),
        ..OpenRequest::new(image, &source, &how, &binding)
    })
    .map_err(|e| busy_sentence(image, e))?;
    let before = opened.volume.keyslots();
    let back: Vec<usize> = (0..MAX_KEYSLOTS)
        .filter(|&i| !saved[i].is_empty() && saved[i] != before.get(i).cloned().unwrap_or_default())
        .collect();
    let gone: Vec<usize> = (0..MAX_KEYSLOTS)
        .filter(|&i| saved[i].is_empty() && before.get(i).is_some_and(|b| !b.is_empty()))
        .collect();
    let stale = stale_generations(&saved, keystore.as_ref());
    let change = Change::local(image, opened, keystore, how)?;
    change.commit_slots(&saved, None)?;
    for (slot, key, generation) in &stale {
        eprintln!(
            "qvol: note: keyslot {slot} is wrapped for generation {generation} of key {key}, \
             which this keystore no longer holds; `qvol rekey {}` rewraps it",
            image.display()
        );
    }
    if json {
        println!(
            "{}",
            json!({"image": image.display().to_string(), "backup": file.display().to_string(),
                   "restored_slots": back, "dropped_slots": gone})
        );
    } else {
        println!(
            "Restored the keyslots of {} from {}: slot(s) {:?} are as in the backup again \
             (slots removed since the backup open the volume again), slot(s) {:?} added since \
             are gone.",
            image.display(),
            file.display(),
            back,
            gone
        );
    }
    Ok(())
}

/// The recipient slots of `slots` that name a key of `keystore` at a generation it no longer
/// holds (removed after the backup was taken): (slot, key id, generation).
fn stale_generations(
    slots: &[Vec<u8>],
    keystore: Option<&qvol_keys::UnlockedKeystore>,
) -> Vec<(usize, String, u32)> {
    let Some(ks) = keystore else {
        return Vec::new();
    };
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, blob)| {
            let info = qvol_keys::keyslot::describe(blob).ok()?;
            let (key, generation) = (info.key_id?, info.generation?);
            let held = ks.show(&key).ok()?;
            (!held.generations.iter().any(|g| g.generation == generation))
                .then_some((i, key, generation))
        })
        .collect()
}
