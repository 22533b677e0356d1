//! The volume generation register: the highest commit generation the keystore has seen for
//! each volume, so that putting back an older copy of a whole image is detected
//! (DESIGN.md, "Freshness"). One file per volume, `volumes/<volume id hex>.json`, MACed with
//! a key derived from the master seed so that it cannot be lowered without the keystore's
//! secrets.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::records::{self, hex_array};
use super::{files, time, UnlockedKeystore, MASTER_SALT};
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::hkdf32;

/// Subdirectory of volume records.
pub const VOLUMES_DIR: &str = "volumes";
/// HKDF info of the volume record MAC key.
pub const VOLUME_MAC_INFO: &[u8] = b"qvol-keystore-v1 volume record mac key";
/// MAC input label.
pub const VOLUME_MAC_LABEL: &[u8] = b"qvol-keystore-v1 volume record";
const FORMAT: &str = "qvol-volume-record";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeRecord {
    format: String,
    version: u32,
    volume_id: String,
    generation: u64,
    updated: String,
    /// HMAC-SHA-256(mac key, label || volume id || generation u64 LE), hex.
    mac: String,
}

impl UnlockedKeystore {
    fn volume_path(&self, volume_id: &[u8; 16]) -> std::path::PathBuf {
        self.dir
            .join(VOLUMES_DIR)
            .join(format!("{}.json", hex::encode(volume_id)))
    }

    fn volume_mac(&self, volume_id: &[u8; 16], generation: u64) -> Hmac<Sha256> {
        let key = hkdf32(MASTER_SALT, self.master.expose(), &[VOLUME_MAC_INFO]);
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key.expose()) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(VOLUME_MAC_LABEL);
        mac.update(volume_id);
        mac.update(&generation.to_le_bytes());
        mac
    }

    /// The highest generation recorded for `volume_id`, if any.
    pub fn volume_generation(&self, volume_id: &[u8; 16]) -> Result<Option<u64>> {
        let path = self.volume_path(volume_id);
        if !path.exists() {
            return Ok(None);
        }
        let what = path.display().to_string();
        let rec: VolumeRecord = records::parse(&files::read_bounded(&path)?, &what)?;
        if rec.format != FORMAT || rec.version != 1 || rec.volume_id != hex::encode(volume_id) {
            return Err(Error::corrupt(format!(
                "{what} is not a volume record of this volume"
            )));
        }
        let tag = hex_array::<32>(&rec.mac, "a volume record MAC")?;
        // Mac::verify_slice compares in constant time.
        self.volume_mac(volume_id, rec.generation)
            .verify_slice(&tag)
            .map_err(|_| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("{what} fails its MAC (edited, or from another keystore)"),
                )
            })?;
        Ok(Some(rec.generation))
    }

    /// Records that `volume_id` has reached `generation`. The record never goes down: a
    /// lower generation than the recorded one is a rollback error and changes nothing.
    pub fn record_volume_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<()> {
        self.check_volume_generation(volume_id, generation)?;
        if self.volume_generation(volume_id)? == Some(generation) {
            return Ok(());
        }
        let mac = self
            .volume_mac(volume_id, generation)
            .finalize()
            .into_bytes();
        let rec = VolumeRecord {
            format: FORMAT.into(),
            version: 1,
            volume_id: hex::encode(volume_id),
            generation,
            updated: time::now_rfc3339(),
            mac: hex::encode(mac),
        };
        files::create_private_dir(&self.dir.join(VOLUMES_DIR))?;
        files::write_atomic(&self.volume_path(volume_id), &records::to_json(&rec))
    }

    /// Fails with [`ErrorKind::Rollback`] if `generation` is older than the recorded one
    /// (the image was replaced by an older copy).
    pub fn check_volume_generation(&self, volume_id: &[u8; 16], generation: u64) -> Result<()> {
        match self.volume_generation(volume_id)? {
            Some(recorded) if generation < recorded => Err(Error::new(
                ErrorKind::Rollback,
                format!(
                    "the image is at generation {generation} but the keystore has seen \
                     generation {recorded}: it was replaced by an older copy"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Forgets the record of `volume_id` (after the volume is deleted or restored on purpose).
    pub fn forget_volume(&self, volume_id: &[u8; 16]) -> Result<()> {
        let path = self.volume_path(volume_id);
        if path.exists() {
            files::remove(&path)?;
        }
        Ok(())
    }
}
