//! The keyslots of a re-encrypted volume: each slot in use is made again around the new
//! volume key, or dropped (never left wrapping the old key). A recipient slot of a key in
//! the keystore gets the key's current generation; another recipient's slot needs that
//! key's public key file (`--recipient`); a passphrase slot needs a passphrase
//! (`--slot-passphrase-file SLOT=FILE`; the passphrase this command was unlocked with serves
//! its own slot); a recovery slot gets a new set of shares of the same K of N
//! (`--shares-dir SLOT=DIR`): the old shares open only the old key.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qvol_core::VolumeKey;
use qvol_keys::{keyslot, KdfParams, PublicKeyFile, SecretBytes, SlotInfo, SlotKind};
use serde_json::{json, Value};
use vhost_qvol::open::read_passphrase;
use vhost_qvol::text::escape_untrusted;
use vhost_qvol::unlock::{wrap_secret, Unlock};

use crate::access::Change;

/// `SLOT=PATH`: a file or directory for keyslot SLOT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPath {
    /// The slot number.
    pub slot: usize,
    /// The path.
    pub path: PathBuf,
}

/// Parses `SLOT=PATH` (clap's value parser).
pub fn parse_slot_path(text: &str) -> Result<SlotPath, String> {
    let (slot, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not SLOT=PATH (e.g. 2=/root/pass.txt)"))?;
    let slot: usize = slot
        .parse()
        .ok()
        .filter(|n| *n < qvol_core::MAX_KEYSLOTS)
        .ok_or_else(|| {
            format!(
                "{slot:?} is not a keyslot number (0 to {})",
                qvol_core::MAX_KEYSLOTS - 1
            )
        })?;
    if path.is_empty() {
        return Err(format!("{text:?} names no path after the ="));
    }
    Ok(SlotPath {
        slot,
        path: PathBuf::from(path),
    })
}

/// The secrets the flags give, read before the image is touched.
#[derive(Default)]
pub struct Secrets {
    /// Passphrase per passphrase slot, and the file it came from.
    passphrases: BTreeMap<usize, (SecretBytes, PathBuf)>,
    /// Where the new shares of each recovery slot go.
    shares_dirs: BTreeMap<usize, PathBuf>,
    /// Other keystores' public keys.
    recipients: Vec<(PublicKeyFile, PathBuf)>,
}

impl Secrets {
    /// Reads the passphrase files and public key files the flags name; each slot at most
    /// once.
    pub fn load(
        passphrases: &[SlotPath],
        shares_dirs: &[SlotPath],
        recipients: &[PathBuf],
    ) -> anyhow::Result<Secrets> {
        let mut out = Secrets::default();
        for sp in passphrases {
            let pass = read_passphrase(&sp.path)?;
            if out
                .passphrases
                .insert(sp.slot, (pass, sp.path.clone()))
                .is_some()
            {
                bail!("--slot-passphrase-file names keyslot {} twice", sp.slot);
            }
        }
        for sp in shares_dirs {
            if out.passphrases.contains_key(&sp.slot)
                || out.shares_dirs.insert(sp.slot, sp.path.clone()).is_some()
            {
                bail!(
                    "keyslot {} is named twice by --slot-passphrase-file and --shares-dir",
                    sp.slot
                );
            }
        }
        for file in recipients {
            let bytes = fs::read(file)
                .with_context(|| format!("cannot read the public key file {}", file.display()))?;
            let pk = PublicKeyFile::parse(&bytes)
                .with_context(|| format!("{} is not a usable public key file", file.display()))?;
            out.recipients.push((pk, file.clone()));
        }
        Ok(out)
    }
}

/// What becomes of one keyslot in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Wrapped for this keystore's key `key_id`, generation `generation` (its current one).
    Keystore { key_id: String, generation: u32 },
    /// Wrapped for the public key of `--recipient` number `index`.
    Recipient { index: usize },
    /// A passphrase slot with the passphrase of `--slot-passphrase-file` (`given`), or the
    /// one this command was unlocked with.
    Passphrase { given: bool },
    /// A recovery slot with new shares, K of N as before, written to `dir`.
    Recovery { k: u8, n: u8, dir: PathBuf },
    /// Dropped, for this reason.
    Dropped(String),
}

/// One keyslot in use and what becomes of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Its number.
    pub slot: usize,
    /// Its kind ("recipient", "passphrase", "recovery", "unreadable").
    pub kind: &'static str,
    /// What it is now (from the image: untrusted text).
    pub description: String,
    /// What becomes of it.
    pub fate: Fate,
}

impl Planned {
    /// Whether the slot is dropped.
    pub fn dropped(&self) -> bool {
        matches!(self.fate, Fate::Dropped(_))
    }

    /// The warning naming a dropped slot.
    pub fn warning(&self) -> Option<String> {
        let Fate::Dropped(why) = &self.fate else {
            return None;
        };
        Some(format!(
            "keyslot {} ({}: {}) is dropped: {why}",
            self.slot,
            self.kind,
            escape_untrusted(&self.description)
        ))
    }

    /// The slot as the report lists it.
    pub fn json(&self) -> Value {
        let mut v = json!({"slot": self.slot, "kind": self.kind,
                           "description": self.description});
        match &self.fate {
            Fate::Dropped(why) => {
                v["action"] = json!("dropped");
                v["reason"] = json!(why);
            }
            Fate::Keystore { key_id, generation } => {
                v["action"] = json!("rewrapped");
                v["key_id"] = json!(key_id);
                v["generation"] = json!(generation);
            }
            _ => v["action"] = json!("rewrapped"),
        }
        v
    }
}

/// What the plan asks of the keystore: the current generation of the keystore key a
/// recipient slot (number, description) is wrapped for, if it is one of its keys.
pub type OwnKey<'a> = dyn Fn(usize, &SlotInfo) -> Option<(String, u32)> + 'a;

/// Plans the new slots of `slots`. `own` finds this keystore's keys; `unlocked` is the
/// passphrase slot this command was unlocked with, if it was; `recipients` are the
/// fingerprints (hex) of the `--recipient` keys. A flag naming a slot of another kind, or
/// a recipient matching no slot, is refused; so is a plan that drops every slot.
pub fn plan(
    image: &Path,
    slots: &[Vec<u8>],
    own: &OwnKey<'_>,
    unlocked: Option<usize>,
    secrets: &Secrets,
) -> anyhow::Result<Vec<Planned>> {
    let fingerprints: Vec<String> = secrets
        .recipients
        .iter()
        .map(|(pk, _)| pk.public_key.fingerprint_hex())
        .collect();
    let mut used_recipients = vec![false; fingerprints.len()];
    let mut out = Vec::new();
    for (slot, blob) in slots.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
        let planned = match keyslot::describe(blob) {
            Err(e) => Planned {
                slot,
                kind: "unreadable",
                description: e.to_string(),
                fate: Fate::Dropped("it cannot be read".into()),
            },
            Ok(info) => {
                let fate = fate_of(slot, &info, own, unlocked, secrets, &fingerprints);
                if let Fate::Recipient { index } = fate {
                    used_recipients[index] = true;
                }
                Planned {
                    slot,
                    kind: info.kind.name(),
                    description: info.to_string(),
                    fate,
                }
            }
        };
        out.push(planned);
    }
    check_flags(image, &out, secrets, &used_recipients)?;
    if out.iter().all(Planned::dropped) {
        let why: Vec<String> = out.iter().filter_map(Planned::warning).collect();
        bail!(
            "re-encrypting {} would leave no keyslot to open it ({}); nothing was changed",
            image.display(),
            why.join("; ")
        );
    }
    Ok(out)
}

fn fate_of(
    slot: usize,
    info: &SlotInfo,
    own: &OwnKey<'_>,
    unlocked: Option<usize>,
    secrets: &Secrets,
    fingerprints: &[String],
) -> Fate {
    match info.kind {
        SlotKind::Recipient => {
            if let Some((key_id, generation)) = own(slot, info) {
                return Fate::Keystore { key_id, generation };
            }
            let fp = info.fingerprint.as_deref().unwrap_or_default();
            match fingerprints.iter().position(|f| f == fp) {
                Some(index) => Fate::Recipient { index },
                None => Fate::Dropped(
                    "its key is not in this keystore and no --recipient FILE gives its public \
                     key"
                    .into(),
                ),
            }
        }
        SlotKind::Passphrase => {
            if secrets.passphrases.contains_key(&slot) {
                Fate::Passphrase { given: true }
            } else if unlocked == Some(slot) {
                Fate::Passphrase { given: false }
            } else {
                Fate::Dropped(format!(
                    "no --slot-passphrase-file {slot}=FILE gives it a passphrase"
                ))
            }
        }
        SlotKind::Recovery => match (secrets.shares_dirs.get(&slot), info.threshold, info.shares) {
            (Some(dir), Some(k), Some(n)) => Fate::Recovery {
                k,
                n,
                dir: dir.clone(),
            },
            _ => Fate::Dropped(format!(
                "no --shares-dir {slot}=DIR to write its new shares to"
            )),
        },
        _ => Fate::Dropped("its kind is unknown to this qvol".into()),
    }
}

/// Every slot a flag names must be one of that kind; every `--recipient` must match a slot.
fn check_flags(
    image: &Path,
    planned: &[Planned],
    secrets: &Secrets,
    used_recipients: &[bool],
) -> anyhow::Result<()> {
    let kind_of = |slot: usize| {
        planned
            .iter()
            .find(|p| p.slot == slot)
            .map_or("free", |p| p.kind)
    };
    for (flag, kind, slots) in [
        (
            "--slot-passphrase-file",
            "passphrase",
            secrets.passphrases.keys().copied().collect::<Vec<_>>(),
        ),
        (
            "--shares-dir",
            "recovery",
            secrets.shares_dirs.keys().copied().collect(),
        ),
    ] {
        if let Some(&slot) = slots.iter().find(|&&s| kind_of(s) != kind) {
            bail!(
                "{flag} names keyslot {slot} of {}, which is a {} slot, not a {kind} slot; \
                 nothing was changed",
                image.display(),
                kind_of(slot)
            );
        }
    }
    if let Some(i) = used_recipients.iter().position(|used| !used) {
        bail!(
            "the public key in {} (key {}) matches no recipient keyslot of {}; nothing was \
             changed",
            secrets.recipients[i].1.display(),
            secrets.recipients[i].0.key_id,
            image.display()
        );
    }
    for dir in secrets.shares_dirs.values() {
        crate::keyslot::check_shares_dir(dir)?;
    }
    Ok(())
}

/// The planned slots of `change` made around `new_key`: the new keyslot area (8 entries,
/// empty = free) and the share files written, removed again unless kept (once the slots
/// are in the image).
pub fn make(
    planned: &[Planned],
    change: &Change,
    secrets: &Secrets,
    new_key: &VolumeKey,
) -> anyhow::Result<(Vec<Vec<u8>>, ShareFiles)> {
    let mut written = ShareFiles::default();
    let mut slots = vec![Vec::new(); qvol_core::MAX_KEYSLOTS];
    for p in planned {
        slots[p.slot] = make_one(p, change, secrets, new_key, &mut written.0)?;
    }
    Ok((slots, written))
}

fn make_one(
    p: &Planned,
    change: &Change,
    secrets: &Secrets,
    new_key: &VolumeKey,
    share_files: &mut Vec<PathBuf>,
) -> anyhow::Result<Vec<u8>> {
    let id = &change.volume_id;
    let vk = wrap_secret(new_key);
    let blob = match &p.fate {
        Fate::Dropped(_) => Vec::new(),
        Fate::Keystore { key_id, .. } => {
            let ks = change
                .keystore
                .as_ref()
                .ok_or_else(|| anyhow!("internal: a keystore slot without a keystore"))?;
            let pk = ks
                .public_key(key_id)
                .with_context(|| format!("cannot use key {key_id}"))?;
            keyslot::wrap_for_recipient(&pk, key_id, id, &vk)?
        }
        Fate::Recipient { index } => {
            let pk = &secrets.recipients[*index].0;
            keyslot::wrap_for_recipient_generation(
                &pk.public_key,
                &pk.key_id,
                pk.generation,
                id,
                &vk,
            )?
        }
        Fate::Passphrase { given } => {
            let from_unlock;
            let pass = match (secrets.passphrases.get(&p.slot), &change.unlock) {
                (Some((pass, _)), _) => pass,
                (None, Unlock::Passphrase(file)) if !given => {
                    from_unlock = read_passphrase(file)?;
                    &from_unlock
                }
                _ => bail!("internal: no passphrase for keyslot {}", p.slot),
            };
            keyslot::wrap_with_passphrase(pass.expose(), KdfParams::from_env(), id, &vk)?
        }
        Fate::Recovery { k, n, dir } => {
            let (blob, shares) = keyslot::wrap_with_recovery(*k, *n, id, &vk)?;
            let files = crate::keyslot::write_shares(dir, &change.image, id, &shares)?;
            share_files.extend(files);
            blob
        }
    };
    Ok(blob)
}

/// Share files written for slots that may not be made: removed unless kept.
#[derive(Default)]
pub struct ShareFiles(pub Vec<PathBuf>);

impl ShareFiles {
    /// Keeps the files (the slots they open exist); returns their paths.
    pub fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for ShareFiles {
    fn drop(&mut self) {
        // The shares of a slot that was not made open nothing: take them back.
        for file in &self.0 {
            let _ = fs::remove_file(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qvol_keys::kem::HybridSecretKey;
    use qvol_keys::Secret32;

    const ID: [u8; 16] = [7; 16];

    fn vk() -> Secret32 {
        Secret32::from_bytes([9; 32])
    }

    /// The public key file of key `key_id`, generation 1, from a seed of `seed` bytes.
    fn public_key(seed: u8, key_id: &str) -> PublicKeyFile {
        let sk = HybridSecretKey::from_seed(&Secret32::from_bytes([seed; 32]));
        PublicKeyFile {
            key_id: key_id.into(),
            vm: "vm".into(),
            generation: 1,
            public_key: sk.public_key().clone(),
        }
    }

    fn recipient(seed: u8, key_id: &str) -> (Vec<u8>, String) {
        let pk = public_key(seed, key_id).public_key;
        let blob = keyslot::wrap_for_recipient_generation(&pk, key_id, 1, &ID, &vk()).unwrap();
        (blob, pk.fingerprint_hex())
    }

    fn passphrase() -> Vec<u8> {
        keyslot::wrap_with_passphrase(b"pass", KdfParams::insecure_for_tests(), &ID, &vk()).unwrap()
    }

    fn recovery() -> Vec<u8> {
        keyslot::wrap_with_recovery(2, 3, &ID, &vk()).unwrap().0
    }

    /// Slot 0: this keystore's key "mine"; 1: a passphrase; 2: a recovery set; 3: a foreign
    /// key; 5: a passphrase; 6: garbage.
    fn area() -> Vec<Vec<u8>> {
        let mut slots = vec![Vec::new(); 8];
        slots[0] = recipient(1, "mine").0;
        slots[1] = passphrase();
        slots[2] = recovery();
        slots[3] = recipient(2, "bob").0;
        slots[5] = passphrase();
        slots[6] = b"not a keyslot".to_vec();
        slots
    }

    fn mine(_: usize, info: &SlotInfo) -> Option<(String, u32)> {
        (info.key_id.as_deref() == Some("mine")).then(|| ("mine".to_string(), 3))
    }

    fn fates(planned: &[Planned]) -> Vec<(usize, Fate)> {
        planned.iter().map(|p| (p.slot, p.fate.clone())).collect()
    }

    fn with_passphrase(slot: usize) -> Secrets {
        let mut s = Secrets::default();
        s.passphrases.insert(
            slot,
            (SecretBytes::new(b"new".to_vec()), PathBuf::from("p.txt")),
        );
        s
    }

    #[test]
    fn slot_paths_are_a_slot_number_and_a_path() {
        assert_eq!(
            parse_slot_path("2=/a/b=c").unwrap(),
            SlotPath {
                slot: 2,
                path: "/a/b=c".into()
            }
        );
        for bad in ["2", "8=x", "-1=x", "x=y", "3=", "=x"] {
            assert!(parse_slot_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_not_given_drop_their_slots_and_each_drop_is_named() {
        let planned = plan(
            Path::new("d.qvol"),
            &area(),
            &mine,
            None,
            &Secrets::default(),
        )
        .unwrap();
        let f = fates(&planned);
        assert_eq!(
            f[0],
            (
                0,
                Fate::Keystore {
                    key_id: "mine".into(),
                    generation: 3
                }
            )
        );
        for (slot, _) in &f[1..] {
            let p = planned.iter().find(|p| p.slot == *slot).unwrap();
            let warning = p.warning().expect("dropped");
            assert!(
                warning.starts_with(&format!("keyslot {slot} ({}", p.kind)),
                "{warning}"
            );
        }
        assert_eq!(
            planned.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [
                "recipient",
                "passphrase",
                "recovery",
                "recipient",
                "passphrase",
                "unreadable"
            ]
        );
        assert!(planned[1]
            .warning()
            .unwrap()
            .contains("--slot-passphrase-file 1=FILE"));
    }

    #[test]
    fn given_secrets_and_the_unlock_passphrase_keep_their_slots() {
        let (bob_slot, bob_fp) = recipient(2, "bob");
        let mut slots = area();
        slots[3] = bob_slot;
        let mut secrets = with_passphrase(1);
        secrets.shares_dirs.insert(2, PathBuf::from("."));
        let bob = public_key(2, "bob");
        assert_eq!(bob.public_key.fingerprint_hex(), bob_fp);
        secrets.recipients.push((bob, PathBuf::from("bob.pub")));
        let planned = plan(Path::new("d.qvol"), &slots, &mine, Some(5), &secrets).unwrap();
        let f = fates(&planned);
        assert_eq!(f[1], (1, Fate::Passphrase { given: true }));
        assert_eq!(
            f[2],
            (
                2,
                Fate::Recovery {
                    k: 2,
                    n: 3,
                    dir: ".".into()
                }
            )
        );
        assert_eq!(f[3], (3, Fate::Recipient { index: 0 }));
        assert_eq!(f[4], (5, Fate::Passphrase { given: false }));
        assert!(matches!(f[5], (6, Fate::Dropped(_))));
    }

    #[test]
    fn flags_naming_other_kinds_of_slot_and_plans_keeping_nothing_are_refused() {
        let img = Path::new("d.qvol");
        let err = plan(img, &area(), &mine, None, &with_passphrase(0)).unwrap_err();
        assert!(
            err.to_string()
                .contains("keyslot 0 of d.qvol, which is a recipient slot"),
            "{err}"
        );
        let err = plan(img, &area(), &mine, None, &with_passphrase(4)).unwrap_err();
        assert!(err.to_string().contains("a free slot"), "{err}");
        let mut only_passphrase = vec![Vec::new(); 8];
        only_passphrase[3] = passphrase();
        let err = plan(img, &only_passphrase, &mine, None, &Secrets::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("would leave no keyslot"), "{text}");
        assert!(text.contains("keyslot 3 (passphrase"), "{text}");
        // Given its passphrase, it stays.
        assert!(plan(img, &only_passphrase, &mine, None, &with_passphrase(3)).is_ok());
    }

    #[test]
    fn a_recipient_file_matching_no_slot_is_refused() {
        let mut secrets = Secrets::default();
        secrets
            .recipients
            .push((public_key(4, "carol"), PathBuf::from("carol.pub")));
        let err = plan(Path::new("d.qvol"), &area(), &mine, None, &secrets).unwrap_err();
        assert!(
            err.to_string().contains("carol.pub (key carol) matches no"),
            "{err}"
        );
    }
}
