//! How a command gets a volume key: through a recipient keyslot of a keystore key, a
//! passphrase keyslot, or a recovery keyslot and K share files (docs/KEYS.md §5, §6).

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qvol_core::{HeaderInfo, VolumeKey};
use qvol_keys::{keyslot, RecoveryShare, Secret32, UnlockedKeystore};
use zeroize::Zeroizing;

use crate::open::read_passphrase;
use crate::volume_disk::error_chain;

/// Which kind of keyslot unlocks the volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Unlock {
    /// A recipient slot of a key in the keystore (the key the volume is recorded for).
    #[default]
    Keystore,
    /// A passphrase slot; the passphrase is in this file (one trailing newline ignored).
    Passphrase(PathBuf),
    /// A recovery slot; one share per file, at least as many as the slot needs.
    Recovery(Vec<PathBuf>),
}

impl Unlock {
    /// From `--unlock-passphrase-file` and `--recovery-share` (repeatable); neither means
    /// the keystore.
    pub fn from_flags(passphrase: Option<PathBuf>, shares: Vec<PathBuf>) -> anyhow::Result<Self> {
        match (passphrase, shares.is_empty()) {
            (Some(_), false) => {
                bail!("--unlock-passphrase-file and --recovery-share cannot be used together")
            }
            (Some(file), true) => Ok(Unlock::Passphrase(file)),
            (None, false) => Ok(Unlock::Recovery(shares)),
            (None, true) => Ok(Unlock::Keystore),
        }
    }

    /// Whether the keystore's keys unwrap (rather than a passphrase or shares).
    pub fn is_keystore(&self) -> bool {
        matches!(self, Unlock::Keystore)
    }

    /// Unwraps the volume key of `header`; returns the slot that opened. `keystore` is
    /// needed (and only used) for [`Unlock::Keystore`]; with `only_key`, recipient slots of
    /// other keys are not tried.
    pub fn unwrap(
        &self,
        image: &Path,
        header: &HeaderInfo,
        keystore: Option<&UnlockedKeystore>,
        only_key: Option<&str>,
    ) -> anyhow::Result<(usize, VolumeKey)> {
        let (slot, secret) = match self {
            Unlock::Keystore => {
                let ks = keystore.ok_or_else(|| {
                    anyhow!(
                        "no keystore to unlock {} with: pass --keystore DIR, or unlock with \
                         --unlock-passphrase-file FILE or --recovery-share FILE",
                        image.display()
                    )
                })?;
                return unwrap_with_keystore(image, header, ks, only_key);
            }
            Unlock::Passphrase(file) => {
                let pass = read_passphrase(file)?;
                keyslot::unwrap_with_passphrase(&header.keyslots, pass.expose(), &header.volume_id)
                    .map_err(|e| {
                        anyhow!(
                            "the passphrase in {} does not unlock {}: {}",
                            file.display(),
                            image.display(),
                            error_chain(&e)
                        )
                    })?
            }
            Unlock::Recovery(files) => {
                let shares = read_shares(files)?;
                keyslot::unwrap_with_recovery(&header.keyslots, &shares, &header.volume_id)
                    .map_err(|e| {
                        anyhow!(
                            "the {} recovery share(s) given do not unlock {}: {}",
                            files.len(),
                            image.display(),
                            error_chain(&e)
                        )
                    })?
            }
        };
        Ok((slot, VolumeKey::from_bytes(*secret.expose())))
    }
}

impl fmt::Display for Unlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unlock::Keystore => f.write_str("the keystore"),
            Unlock::Passphrase(file) => write!(f, "the passphrase in {}", file.display()),
            Unlock::Recovery(files) => write!(f, "{} recovery shares", files.len()),
        }
    }
}

/// Tries the recipient slots of `header` with the keys of `keystore` (only those of
/// `only_key`, if given); returns the slot that opened.
pub fn unwrap_with_keystore(
    image: &Path,
    header: &HeaderInfo,
    keystore: &UnlockedKeystore,
    only_key: Option<&str>,
) -> anyhow::Result<(usize, VolumeKey)> {
    // Slots of other keys become empty blobs, so that indices stay the image's.
    let slots: Vec<Vec<u8>> = header
        .keyslots
        .iter()
        .map(|blob| match (only_key, keyslot::describe(blob)) {
            (None, _) => blob.clone(),
            (Some(want), Ok(info)) if info.key_id.as_deref() == Some(want) => blob.clone(),
            _ => Vec::new(),
        })
        .collect();
    if let (Some(key), true) = (only_key, slots.iter().all(Vec::is_empty)) {
        bail!(
            "no keyslot of {} is wrapped for key {key} (removed, or never added)",
            image.display()
        );
    }
    let (slot, secret) = keyslot::unwrap_with_keystore(&slots, keystore, &header.volume_id)
        .map_err(|e| {
            let which = only_key.map_or(String::new(), |k| format!(" for key {k}"));
            anyhow!(
                "no keyslot{which} of {} opens with the keys in keystore {}: {}",
                image.display(),
                keystore.dir().display(),
                error_chain(&e)
            )
        })?;
    Ok((slot, VolumeKey::from_bytes(*secret.expose())))
}

/// The longest share file read (a share is 100 characters; comments say what it is).
const MAX_SHARE_FILE: u64 = 4096;

/// Reads one share per file: the single line that is not blank and not a `#` comment.
pub fn read_shares(files: &[PathBuf]) -> anyhow::Result<Vec<RecoveryShare>> {
    let mut shares: Vec<RecoveryShare> = Vec::with_capacity(files.len());
    for file in files {
        let share = read_share(file)?;
        if shares
            .iter()
            .any(|s| s.set_id() == share.set_id() && s.index() == share.index())
        {
            bail!(
                "{} holds share {} of set {} a second time; give K different shares",
                file.display(),
                share.index(),
                hex::encode(share.set_id())
            );
        }
        shares.push(share);
    }
    Ok(shares)
}

fn read_share(file: &Path) -> anyhow::Result<RecoveryShare> {
    use std::io::Read;
    let mut text = Zeroizing::new(String::new());
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_SHARE_FILE + 1).read_to_string(&mut text))
        .with_context(|| format!("cannot read the recovery share file {}", file.display()))?;
    if text.len() as u64 > MAX_SHARE_FILE {
        bail!("{} is too long to be a recovery share file", file.display());
    }
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        bail!(
            "{} must hold exactly one recovery share line (qvol-share-v1-...)",
            file.display()
        );
    };
    line.parse::<RecoveryShare>()
        .map_err(|e| anyhow!("{}: {}", file.display(), error_chain(&e)))
}

/// The volume key as the keyslot functions take it.
pub fn wrap_secret(key: &VolumeKey) -> Secret32 {
    Secret32::from_bytes(*key.expose())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share_text() -> (String, String) {
        let key = Secret32::from_bytes([7; 32]);
        let shares = qvol_keys::recovery::split(&key, 2, 3, [1; 8]).unwrap();
        (shares[0].to_string(), shares[1].to_string())
    }

    #[test]
    fn share_files_hold_one_share_line_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = share_text();
        let fa = dir.path().join("a");
        let fb = dir.path().join("b");
        std::fs::write(&fa, format!("# share 1\n\n{a}\n")).unwrap();
        std::fs::write(&fb, &b).unwrap();
        let got = read_shares(&[fa.clone(), fb.clone()]).unwrap();
        assert_eq!(got.len(), 2);
        // The same share twice is one share, said so.
        let err = read_shares(&[fa.clone(), fa.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("a second time"), "{err}");
        // Two share lines, none, a typo (checksum), an oversized file.
        let two = dir.path().join("two");
        std::fs::write(&two, format!("{a}\n{b}\n")).unwrap();
        assert!(read_shares(&[two])
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
        let none = dir.path().join("none");
        std::fs::write(&none, "# nothing\n").unwrap();
        assert!(read_shares(&[none]).is_err());
        let typo = dir.path().join("typo");
        let mut bad = a.clone().into_bytes();
        let last = bad.len() - 6;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        std::fs::write(&typo, bad).unwrap();
        let err = format!("{:#}", read_shares(&[typo]).unwrap_err());
        assert!(err.contains("checksum"), "{err}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'#'; 5000]).unwrap();
        assert!(read_shares(&[big])
            .unwrap_err()
            .to_string()
            .contains("too long"));
    }

    #[test]
    fn one_kind_of_unlock_at_a_time() {
        assert_eq!(Unlock::from_flags(None, vec![]).unwrap(), Unlock::Keystore);
        assert!(Unlock::from_flags(Some("p".into()), vec!["s".into()]).is_err());
        assert_eq!(
            Unlock::from_flags(Some("p".into()), vec![])
                .unwrap()
                .to_string(),
            "the passphrase in p"
        );
    }
}
