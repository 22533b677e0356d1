//! `qvol rekey IMAGE`: rewraps the recipient keyslots of this keystore's keys for each key's
//! current generation (after `qvol key rotate`), so that the old generation can be removed.
//! Also what `qvol key rotate ID --rewrap IMAGE...` runs for each image.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use qvol_keys::{keyslot, SlotInfo, UnlockedKeystore};
use serde_json::json;
use vhost_qvol::unlock::wrap_secret;

use crate::access::{open_for_change, record_wraps, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// `qvol rekey`
#[derive(Debug, clap::Args)]
pub struct RekeyArgs {
    /// The image.
    pub image: PathBuf,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// One slot to rewrap.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rewrap {
    /// Slot number.
    pub slot: usize,
    /// The key.
    pub key_id: String,
    /// The generation it was wrapped for.
    pub from: u32,
    /// The key's current generation.
    pub to: u32,
}

/// Runs `qvol rekey`.
pub fn run(args: RekeyArgs) -> anyhow::Result<()> {
    let done = rekey_image(&args.image, &args.keystore, &args.unlock)?;
    report(&args.image, &done, args.json);
    Ok(())
}

/// Prints what [`rekey_image`] did.
pub fn report(image: &Path, done: &[Rewrap], json: bool) {
    if json {
        println!(
            "{}",
            json!({"image": image.display().to_string(), "rewrapped": done})
        );
    } else if done.is_empty() {
        println!(
            "{}: every keyslot of this keystore's keys is wrapped for the key's current \
             generation; nothing to rewrap.",
            image.display()
        );
    } else {
        for r in done {
            println!(
                "{}: rewrapped keyslot {} (key {}) from generation {} to {}.",
                image.display(),
                r.slot,
                r.key_id,
                r.from,
                r.to
            );
        }
    }
}

/// The recipient slots of `ks`'s keys wrapped for an older generation than the current one.
fn plan(slots: &[Vec<u8>], ks: &UnlockedKeystore) -> Vec<Rewrap> {
    let mut out = Vec::new();
    for (slot, blob) in slots.iter().enumerate() {
        let Ok(info) = keyslot::describe(blob) else {
            continue;
        };
        let Some(r) = own_key(ks, slot, &info) else {
            continue;
        };
        if r.from < r.to {
            out.push(r);
        }
    }
    out
}

/// The key of `ks` that the recipient slot `info` (number `slot`) is wrapped for, with the
/// generation it names and the key's current one. A slot is this keystore's if its
/// fingerprint is that of the generation it names (a foreign key may carry the same id), or
/// if it names a generation of one of its keys that was removed since (a restored header
/// backup): useless as it is, it gets the current one.
pub fn own_key(ks: &UnlockedKeystore, slot: usize, info: &SlotInfo) -> Option<Rewrap> {
    let (Some(key_id), Some(from), Some(fp)) = (&info.key_id, info.generation, &info.fingerprint)
    else {
        return None;
    };
    let key = ks.show(key_id).ok()?;
    let ours = match key.generations.iter().find(|g| g.generation == from) {
        Some(g) => g.fingerprint == *fp,
        None => true,
    };
    ours.then(|| Rewrap {
        slot,
        key_id: key_id.clone(),
        from,
        to: key.generation,
    })
}

/// Rewraps the outdated recipient slots of `image` (crash-safe: one keyslot-area change) and
/// records in the keystore which generations the volume's slots now use.
pub fn rekey_image(
    image: &Path,
    keys: &KeystoreArgs,
    unlock: &UnlockArgs,
) -> anyhow::Result<Vec<Rewrap>> {
    let mut todo = Vec::new();
    let change = open_for_change(image, keys, unlock, true, |c| {
        let ks = c.keystore.as_ref().ok_or_else(|| anyhow!("no keystore"))?;
        let slots = c.slots.clone();
        todo = plan(&slots, ks);
        if todo.is_empty() {
            // Nothing to rewrap; the keystore still learns which generations are in use.
            if let Some(b) = &c.binding {
                record_wraps(ks, &c.volume_id, &b.key_id, &slots)?;
            }
            return Ok(false);
        }
        Ok(true)
    })?;
    let Some(change) = change else {
        return Ok(Vec::new());
    };
    let ks = change
        .keystore
        .as_ref()
        .ok_or_else(|| anyhow!("no keystore"))?;
    let id = change.volume_id;
    let vk = wrap_secret(change.key());
    let mut slots = change.slots.clone();
    for r in &todo {
        let pk = ks
            .public_key(&r.key_id)
            .with_context(|| format!("cannot use key {}", r.key_id))?;
        slots[r.slot] = keyslot::wrap_for_recipient(&pk, &r.key_id, &id, &vk)?;
    }
    change.commit_slots(&slots, None)?;
    Ok(todo)
}
