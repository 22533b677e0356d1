//! `qvol keyslot list|add|remove`: the ways a volume opens (docs/KEYS.md §5). Every change
//! unlocks through an existing slot, rewrites the keyslot area crash-safely (FORMAT.md
//! §3.1) and leaves the image as it was when it fails.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qvol_keys::{keyslot, KdfParams, PublicKeyFile, RecoveryShare, SlotInfo};
use serde_json::{json, Value};
use vhost_qvol::open::{read_image_header, read_passphrase, volume_id_hex};
use vhost_qvol::text::escape_untrusted;
use vhost_qvol::unlock::wrap_secret;

use crate::access::{open_for_change, UnlockArgs};
use crate::keystore::KeystoreArgs;

/// `qvol keyslot ...`
#[derive(Debug, clap::Subcommand)]
pub enum KeyslotCommand {
    /// List the keyslots of an image (no key needed).
    List {
        /// The image.
        image: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a keyslot; prints its number. Unlocks through an existing slot first.
    Add(AddArgs),
    /// Remove a keyslot (its bytes are overwritten). Refuses the last slot, and the slot
    /// this command was unlocked with unless --force.
    Remove {
        /// The image.
        image: PathBuf,
        /// Slot number (0 to 7, as `qvol keyslot list` prints it).
        slot: usize,
        /// Remove it even though this command was unlocked through it.
        #[arg(long)]
        force: bool,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        unlock: UnlockArgs,
        #[command(flatten)]
        keystore: KeystoreArgs,
    },
}

/// `qvol keyslot add`
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true)
    .args(["key", "recipient", "slot_passphrase_file", "recovery"])))]
pub struct AddArgs {
    /// The image.
    pub image: PathBuf,
    /// A slot for another key of this keystore (its current generation).
    #[arg(long, value_name = "KEY_ID")]
    pub key: Option<String>,
    /// A slot for someone else's key: the file `qvol key export-public` wrote.
    #[arg(long, value_name = "PUBKEY_FILE")]
    pub recipient: Option<PathBuf>,
    /// A passphrase slot (argon2id); the new passphrase is read from FILE.
    #[arg(long, value_name = "FILE")]
    pub slot_passphrase_file: Option<PathBuf>,
    /// A recovery slot: N shares, any K of which open the volume (e.g. 3/5).
    #[arg(long, value_name = "K/N", requires = "shares_dir")]
    pub recovery: Option<String>,
    /// Where the N share files are written (created 0700 if missing; files 0600).
    #[arg(long, value_name = "DIR")]
    pub shares_dir: Option<PathBuf>,
    /// The slot number to use [default: the first free one].
    #[arg(long, value_name = "N")]
    pub slot: Option<usize>,
    /// Print one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub unlock: UnlockArgs,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

/// Runs `qvol keyslot ...`.
pub fn run(command: KeyslotCommand) -> anyhow::Result<()> {
    match command {
        KeyslotCommand::List { image, json } => list(&image, json),
        KeyslotCommand::Add(args) => add(args),
        KeyslotCommand::Remove {
            image,
            slot,
            force,
            json,
            unlock,
            keystore,
        } => remove(&image, slot, force, json, &unlock, &keystore),
    }
}

/// The JSON description of slot `index` (no secrets).
pub fn slot_json(index: usize, blob: &[u8]) -> Value {
    match keyslot::describe(blob) {
        Ok(info) => json!({"slot": index, "kind": info.kind, "key_id": info.key_id,
            "generation": info.generation, "fingerprint": info.fingerprint, "kem": info.kem,
            "kdf": info.kdf, "threshold": info.threshold, "shares": info.shares,
            "share_set": info.share_set, "description": info.to_string()}),
        Err(e) => json!({"slot": index, "kind": "unreadable", "description": e.to_string()}),
    }
}

fn list(image: &Path, json: bool) -> anyhow::Result<()> {
    let (_, header) = read_image_header(image)?;
    let slots: Vec<Value> = used(&header.keyslots)
        .map(|(i, blob)| slot_json(i, blob))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "image": image.display().to_string(),
                "volume_id": volume_id_hex(&header.volume_id),
                "keyslots": slots,
                "free": header.keyslots.iter().filter(|b| b.is_empty()).count(),
            }))?
        );
        return Ok(());
    }
    println!(
        "{}: volume {}, {} of {} keyslots in use",
        image.display(),
        volume_id_hex(&header.volume_id),
        slots.len(),
        header.keyslots.len()
    );
    for slot in &slots {
        println!(
            "  slot {}: {}",
            slot["slot"],
            escape_untrusted(slot["description"].as_str().unwrap_or_default())
        );
    }
    Ok(())
}

/// The slots in use, with their numbers.
fn used(slots: &[Vec<u8>]) -> impl Iterator<Item = (usize, &Vec<u8>)> {
    slots.iter().enumerate().filter(|(_, b)| !b.is_empty())
}

/// A new slot, made before the image is touched where possible.
enum NewSlot {
    Key(String),
    Recipient(PublicKeyFile),
    Passphrase(qvol_keys::SecretBytes),
    Recovery { k: u8, n: u8, dir: PathBuf },
}

fn parse_new_slot(args: &AddArgs) -> anyhow::Result<NewSlot> {
    if let Some(key) = &args.key {
        return Ok(NewSlot::Key(key.clone()));
    }
    if let Some(file) = &args.recipient {
        let bytes = fs::read(file)
            .with_context(|| format!("cannot read the public key file {}", file.display()))?;
        let pk = PublicKeyFile::parse(&bytes)
            .with_context(|| format!("{} is not a usable public key file", file.display()))?;
        return Ok(NewSlot::Recipient(pk));
    }
    if let Some(file) = &args.slot_passphrase_file {
        return Ok(NewSlot::Passphrase(read_passphrase(file)?));
    }
    let spec = args.recovery.as_deref().unwrap_or_default();
    let bad = || anyhow!("--recovery takes K/N with 2 <= K <= N <= 255 (e.g. 3/5), not {spec:?}");
    let (k, n) = spec.split_once('/').ok_or_else(bad)?;
    let (k, n): (u8, u8) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k < 2 || k > n {
        return Err(bad());
    }
    let dir = args
        .shares_dir
        .clone()
        .ok_or_else(|| anyhow!("--recovery needs --shares-dir DIR"))?;
    Ok(NewSlot::Recovery { k, n, dir })
}

fn add(args: AddArgs) -> anyhow::Result<()> {
    if let Some(n) = args.slot {
        check_range(n)?;
    }
    let new = parse_new_slot(&args)?;
    let need_keystore = matches!(new, NewSlot::Key(_));
    let mut index = 0;
    let change = open_for_change(
        &args.image,
        &args.keystore,
        &args.unlock,
        need_keystore,
        |c| {
            index = free_slot(&c.slots.clone(), args.slot, &args.image)?;
            match (&new, &c.keystore) {
                (NewSlot::Key(key), Some(ks)) => {
                    ks.public_key(key).with_context(|| {
                        format!("cannot use key {key} of keystore {}", ks.dir().display())
                    })?;
                }
                (NewSlot::Recovery { dir, .. }, _) => check_shares_dir(dir)?,
                _ => {}
            }
            Ok(true)
        },
    )?
    .ok_or_else(|| anyhow!("internal: nothing to add"))?;
    let mut slots = change.slots.clone();
    let id = change.volume_id;
    let vk = wrap_secret(change.key());
    let mut share_files = Vec::new();
    let mut adopt_for = None;
    let blob = match &new {
        NewSlot::Key(key) => {
            let ks = change
                .keystore
                .as_ref()
                .ok_or_else(|| anyhow!("no keystore"))?;
            let pk = ks.public_key(key).with_context(|| {
                format!("cannot use key {key} of keystore {}", ks.dir().display())
            })?;
            adopt_for = Some(key.as_str());
            keyslot::wrap_for_recipient(&pk, key, &id, &vk)?
        }
        NewSlot::Recipient(file) => keyslot::wrap_for_recipient_generation(
            &file.public_key,
            &file.key_id,
            file.generation,
            &id,
            &vk,
        )?,
        NewSlot::Passphrase(pass) => {
            keyslot::wrap_with_passphrase(pass.expose(), KdfParams::from_env(), &id, &vk)?
        }
        NewSlot::Recovery { k, n, dir } => {
            let (blob, shares) = keyslot::wrap_with_recovery(*k, *n, &id, &vk)?;
            share_files = write_shares(dir, &args.image, &id, &shares)?;
            blob
        }
    };
    slots[index] = blob.clone();
    let result = change.commit_slots(&slots, adopt_for);
    if let Err(e) = result {
        // The shares of a slot that was not added open nothing: take them back.
        for file in &share_files {
            let _ = fs::remove_file(file);
        }
        return Err(e);
    }
    report_add(&args, index, &blob, &share_files)
}

/// The slot to fill: `wanted` if free, else the first free one.
fn free_slot(slots: &[Vec<u8>], wanted: Option<usize>, image: &Path) -> anyhow::Result<usize> {
    match wanted {
        Some(n) if !slots[n].is_empty() => bail!(
            "keyslot {n} of {} is in use; remove it first or choose a free one",
            image.display()
        ),
        Some(n) => Ok(n),
        None => slots.iter().position(Vec::is_empty).ok_or_else(|| {
            anyhow!(
                "all {} keyslots of {} are in use; remove one first (`qvol keyslot remove`)",
                slots.len(),
                image.display()
            )
        }),
    }
}

/// The shares directory must exist as a directory, or be creatable in an existing one.
pub fn check_shares_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.exists() || !parent.is_dir() {
        bail!(
            "--shares-dir {} is not a directory, and cannot be created",
            dir.display()
        );
    }
    Ok(())
}

fn report_add(
    args: &AddArgs,
    index: usize,
    blob: &[u8],
    share_files: &[PathBuf],
) -> anyhow::Result<()> {
    let info: Option<SlotInfo> = keyslot::describe(blob).ok();
    if args.json {
        let mut doc = slot_json(index, blob);
        doc["image"] = json!(args.image.display().to_string());
        doc["action"] = json!("added");
        if !share_files.is_empty() {
            doc["share_files"] = json!(share_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>());
        }
        println!("{doc}");
        return Ok(());
    }
    let what = info.map_or_else(|| "?".to_string(), |i| i.to_string());
    println!(
        "Added keyslot {index} to {}: {}.",
        args.image.display(),
        escape_untrusted(&what)
    );
    for file in share_files {
        println!("  share file: {}", file.display());
    }
    if !share_files.is_empty() {
        println!("Give each share to a different keeper; qvol keeps no copy.");
    }
    Ok(())
}

/// Writes one share per file in `dir` (0600, never over an existing file), synced; nothing
/// is left behind if one fails. Returns the files in share order.
pub fn write_shares(
    dir: &Path,
    image: &Path,
    volume_id: &[u8; 16],
    shares: &[RecoveryShare],
) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the shares directory {}", dir.display()))?;
    }
    let id = volume_id_hex(volume_id);
    let stem: String = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let files: Vec<PathBuf> = shares
        .iter()
        .map(|s| {
            dir.join(format!(
                "{stem}-{}-share-{}-of-{}.txt",
                hex::encode(s.set_id()),
                s.index(),
                s.count()
            ))
        })
        .collect();
    if let Some(taken) = files.iter().find(|f| f.exists()) {
        bail!(
            "{} already exists; refusing to overwrite a share file",
            taken.display()
        );
    }
    for (i, (share, file)) in shares.iter().zip(&files).enumerate() {
        let text = zeroize::Zeroizing::new(format!(
            "# qvol recovery share {} of {} of volume {id} ({})\n\
             # Any {} shares of set {} unlock it: --recovery-share FILE, once per share.\n\
             # Keep this file secret, and apart from the other shares.\n{share}\n",
            share.index(),
            share.count(),
            image.display(),
            share.threshold(),
            hex::encode(share.set_id()),
        ));
        if let Err(e) = crate::files::write_new(file, text.as_bytes(), 0o600) {
            for done in &files[..i] {
                let _ = fs::remove_file(done);
            }
            return Err(e);
        }
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(files)
}

fn check_range(slot: usize) -> anyhow::Result<()> {
    if slot >= qvol_core::MAX_KEYSLOTS {
        bail!(
            "there is no keyslot {slot}: slots are numbered 0 to {}",
            qvol_core::MAX_KEYSLOTS - 1
        );
    }
    Ok(())
}

fn remove(
    image: &Path,
    slot: usize,
    force: bool,
    json: bool,
    unlock: &UnlockArgs,
    keystore: &KeystoreArgs,
) -> anyhow::Result<()> {
    check_range(slot)?;
    let change = open_for_change(image, keystore, unlock, false, |c| {
        let slots = c.slots.clone();
        if slots[slot].is_empty() {
            bail!("keyslot {slot} of {} is empty", image.display());
        }
        if used(&slots).count() == 1 {
            bail!(
                "keyslot {slot} is the last keyslot of {}; removing it would leave no way to \
                 open the volume",
                image.display()
            );
        }
        if slot == c.unlocked_slot && !force {
            bail!(
                "keyslot {slot} is the one this command was unlocked with ({}); removing it may \
                 lock you out: unlock through another slot, or pass --force",
                c.unlock
            );
        }
        Ok(true)
    })?
    .ok_or_else(|| anyhow!("internal: nothing to remove"))?;
    let mut slots = change.slots.clone();
    let removed = slot_json(slot, &slots[slot]);
    slots[slot].clear();
    change.commit_slots(&slots, None)?;
    if json {
        let mut doc = removed;
        doc["image"] = json!(image.display().to_string());
        doc["action"] = json!("removed");
        println!("{doc}");
    } else {
        println!(
            "Removed keyslot {slot} of {} ({}).",
            image.display(),
            escape_untrusted(removed["description"].as_str().unwrap_or_default())
        );
    }
    Ok(())
}
