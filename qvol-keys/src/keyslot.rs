//! Keyslots: a volume key wrapped for one way of opening the volume. Slots are opaque byte
//! strings to qvol-core, stored in the image header; docs/KEYS.md gives the byte layout.
//!
//! ```text
//! 0    4  magic "QVKS"
//! 4    1  format version (1)
//! 5    1  kind: 1 recipient (hybrid KEM), 2 passphrase (argon2id), 3 recovery (Shamir)
//! 6    2  body length B (u16, little-endian)
//! 8    B  body, per kind
//! 8+B 24  XChaCha20-Poly1305 nonce
//! 32+B 32 encrypted volume key
//! 64+B 16 tag
//! ```
//! The AEAD's associated data is `AD_LABEL || volume_id || bytes[0 .. 8+B]`: every byte of
//! the slot is authenticated (header and body as associated data, nonce, ciphertext and tag
//! by the AEAD itself), and a slot copied into another volume does not open.

use std::fmt;

use crate::aead::{self, NONCE_LEN, TAG_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::kdf::{hkdf32, KdfParams};
use crate::kem::{self, HybridSecretKey, RecipientPublicKey, CIPHERTEXT_LEN, KEM_ID, KEM_NAME};
use crate::keystore::UnlockedKeystore;
use crate::recovery::{self, RecoveryShare};
use crate::secret::{fill_random, Secret32};

/// Slot magic.
pub const MAGIC: &[u8; 4] = b"QVKS";
/// Current slot format version.
pub const VERSION: u8 = 1;
/// Associated-data label.
pub const AD_LABEL: &[u8] = b"qvol-keyslot-v1";
/// HKDF info of the recipient slot's wrapping key.
pub const RECIPIENT_INFO: &[u8] = b"qvol-keyslot-v1 recipient wrap key";
/// HKDF info of the passphrase slot's wrapping key.
pub const PASSPHRASE_INFO: &[u8] = b"qvol-keyslot-v1 passphrase wrap key";
/// HKDF info of the recovery slot's wrapping key.
pub const RECOVERY_INFO: &[u8] = b"qvol-keyslot-v1 recovery wrap key";
/// Longest key id a slot can name.
pub const MAX_KEY_ID_LEN: usize = 64;
/// argon2id (version 0x13) in a passphrase slot.
pub const KDF_ARGON2ID: u8 = 1;

const HEADER_LEN: usize = 8;
const TRAILER_LEN: usize = NONCE_LEN + 32 + TAG_LEN;
const SALT_LEN: usize = 16;

/// The kind of a keyslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SlotKind {
    /// Wrapped for a keystore key through the hybrid KEM.
    Recipient,
    /// Wrapped under an argon2id hash of a passphrase.
    Passphrase,
    /// Wrapped under a recovery key split into Shamir shares.
    Recovery,
}

impl SlotKind {
    fn code(self) -> u8 {
        match self {
            SlotKind::Recipient => 1,
            SlotKind::Passphrase => 2,
            SlotKind::Recovery => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SlotKind::Recipient),
            2 => Some(SlotKind::Passphrase),
            3 => Some(SlotKind::Recovery),
            _ => None,
        }
    }

    /// "recipient", "passphrase" or "recovery".
    pub fn name(self) -> &'static str {
        match self {
            SlotKind::Recipient => "recipient",
            SlotKind::Passphrase => "passphrase",
            SlotKind::Recovery => "recovery",
        }
    }
}

impl fmt::Display for SlotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The public description of a slot (for `qvol info`): no secrets.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotInfo {
    /// Slot kind.
    pub kind: SlotKind,
    /// Slot format version.
    pub version: u8,
    /// Recipient slots: the key id.
    pub key_id: Option<String>,
    /// Recipient slots: the key generation.
    pub generation: Option<u32>,
    /// Recipient slots: the recipient public key fingerprint (hex).
    pub fingerprint: Option<String>,
    /// Recipient slots: the KEM name.
    pub kem: Option<&'static str>,
    /// Passphrase slots: the argon2id parameters.
    pub kdf: Option<KdfParams>,
    /// Recovery slots: shares needed.
    pub threshold: Option<u8>,
    /// Recovery slots: shares made.
    pub shares: Option<u8>,
    /// Recovery slots: the share set id (hex), printed on each share.
    pub share_set: Option<String>,
}

impl serde::Serialize for SlotKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for SlotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (v{})", self.kind, self.version)?;
        if let (Some(id), Some(g), Some(kem)) = (&self.key_id, self.generation, self.kem) {
            write!(f, ": key {id} generation {g}, {kem}")?;
        }
        if let Some(p) = self.kdf {
            write!(
                f,
                ": argon2id m={} KiB t={} p={}",
                p.m_cost_kib, p.t_cost, p.p_cost
            )?;
        }
        if let (Some(k), Some(n), Some(set)) = (self.threshold, self.shares, &self.share_set) {
            write!(f, ": {k} of {n} shares, set {set}")?;
        }
        Ok(())
    }
}

/// A parsed slot, borrowing the bytes.
struct Parsed<'a> {
    kind: SlotKind,
    /// Everything before the nonce: the associated data after the label and volume id.
    authenticated: &'a [u8],
    body: &'a [u8],
    nonce: &'a [u8],
    wrapped: &'a [u8],
    tag: &'a [u8],
}

fn parse(slot: &[u8]) -> Result<Parsed<'_>> {
    if slot.len() < HEADER_LEN + TRAILER_LEN || &slot[..4] != MAGIC {
        return Err(Error::corrupt(
            "the keyslot is not a qvol keyslot (bad magic or too short)",
        ));
    }
    if slot[4] != VERSION {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "keyslot format version {} is not supported (this build reads {VERSION})",
                slot[4]
            ),
        ));
    }
    let kind = SlotKind::from_code(slot[5]).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            format!("keyslot kind {} is unknown", slot[5]),
        )
    })?;
    let body_len = usize::from(u16::from_le_bytes([slot[6], slot[7]]));
    if slot.len() != HEADER_LEN + body_len + TRAILER_LEN {
        return Err(Error::corrupt(format!(
            "the keyslot is {} bytes but its header announces {}",
            slot.len(),
            HEADER_LEN + body_len + TRAILER_LEN
        )));
    }
    let (authenticated, rest) = slot.split_at(HEADER_LEN + body_len);
    let (nonce, rest) = rest.split_at(NONCE_LEN);
    let (wrapped, tag) = rest.split_at(32);
    Ok(Parsed {
        kind,
        authenticated,
        body: &authenticated[HEADER_LEN..],
        nonce,
        wrapped,
        tag,
    })
}

fn associated_data(volume_id: &[u8; 16], authenticated: &[u8]) -> Vec<u8> {
    [AD_LABEL, volume_id, authenticated].concat()
}

/// Builds a slot: header, body, then the volume key sealed under `wrap_key`.
fn seal_slot(
    kind: SlotKind,
    body: &[u8],
    wrap_key: &Secret32,
    nonce: &[u8; NONCE_LEN],
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<Vec<u8>> {
    let body_len = u16::try_from(body.len())
        .map_err(|_| Error::invalid("the keyslot body is longer than 65535 bytes"))?;
    let mut slot = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    slot.extend_from_slice(MAGIC);
    slot.push(VERSION);
    slot.push(kind.code());
    slot.extend_from_slice(&body_len.to_le_bytes());
    slot.extend_from_slice(body);
    let ad = associated_data(volume_id, &slot);
    let mut wrapped = Secret32::clone(vk);
    let tag = aead::seal(wrap_key, nonce, &ad, wrapped.expose_mut());
    slot.extend_from_slice(nonce);
    slot.extend_from_slice(wrapped.expose());
    slot.extend_from_slice(&tag);
    Ok(slot)
}

fn open_slot(p: &Parsed<'_>, wrap_key: &Secret32, volume_id: &[u8; 16]) -> Result<Secret32> {
    let ad = associated_data(volume_id, p.authenticated);
    let mut vk = Secret32::zero();
    vk.expose_mut().copy_from_slice(p.wrapped);
    aead::open(
        wrap_key,
        p.nonce,
        &ad,
        vk.expose_mut(),
        p.tag,
        "the keyslot failed authentication (tampered, or not for this volume)",
    )?;
    Ok(vk)
}

// ---- recipient slots ------------------------------------------------------------------

struct RecipientBody<'a> {
    key_id: &'a str,
    generation: u32,
    fingerprint: [u8; 32],
    ciphertext: &'a [u8],
}

/// Decapsulates a recipient slot's KEM ciphertext with `sk` and opens the wrapped key.
fn open_recipient_slot(
    p: &Parsed<'_>,
    body: &RecipientBody<'_>,
    sk: &HybridSecretKey,
    volume_id: &[u8; 16],
) -> Result<Secret32> {
    let shared = sk.decapsulate(body.ciphertext)?;
    let wrap_key = hkdf32(volume_id, shared.expose(), &[RECIPIENT_INFO]);
    open_slot(p, &wrap_key, volume_id)
}

fn parse_recipient(body: &[u8]) -> Result<RecipientBody<'_>> {
    let bad = || Error::corrupt("the recipient keyslot body is malformed");
    if body.len() < 3 {
        return Err(bad());
    }
    let kem_id = u16::from_le_bytes([body[0], body[1]]);
    if kem_id != KEM_ID {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("KEM {kem_id} is unknown"),
        ));
    }
    let id_len = usize::from(body[2]);
    if id_len == 0 || id_len > MAX_KEY_ID_LEN || body.len() != 3 + id_len + 4 + 32 + CIPHERTEXT_LEN
    {
        return Err(bad());
    }
    let key_id = std::str::from_utf8(&body[3..3 + id_len]).map_err(|_| bad())?;
    let rest = &body[3 + id_len..];
    let generation = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&rest[4..36]);
    Ok(RecipientBody {
        key_id,
        generation,
        fingerprint,
        ciphertext: &rest[36..],
    })
}

/// Wraps `vk` for the holder of `pk` (keystore key `key_id`, generation `generation`).
pub fn wrap_for_recipient_generation(
    pk: &RecipientPublicKey,
    key_id: &str,
    generation: u32,
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<Vec<u8>> {
    let (ct, ss) = kem::encapsulate(pk)?;
    recipient_slot(
        pk,
        key_id,
        generation,
        volume_id,
        vk,
        &ct[..],
        &ss,
        &aead::random_nonce(),
    )
}

/// Wraps `vk` for the holder of `pk`; the slot names `key_id` so that a keystore finds its
/// key without trying them all. The generation is read from `pk` when it came from
/// [`UnlockedKeystore::public_key`], else 0 (the fingerprint is what identifies the key).
pub fn wrap_for_recipient(
    pk: &RecipientPublicKey,
    key_id: &str,
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<Vec<u8>> {
    wrap_for_recipient_generation(pk, key_id, pk.generation(), volume_id, vk)
}

/// Recipient slot with fixed randomness (KEM `m`, ephemeral X25519 key, nonce): for the
/// golden-vector tests only.
pub fn wrap_for_recipient_deterministic(
    pk: &RecipientPublicKey,
    key_id: &str,
    generation: u32,
    volume_id: &[u8; 16],
    vk: &Secret32,
    randomness: &[u8; 88],
) -> Result<Vec<u8>> {
    let mut m = [0u8; 32];
    let mut esk = [0u8; 32];
    let mut nonce = [0u8; NONCE_LEN];
    m.copy_from_slice(&randomness[..32]);
    esk.copy_from_slice(&randomness[32..64]);
    nonce.copy_from_slice(&randomness[64..]);
    let (ct, ss) = kem::encapsulate_deterministic(pk, &m, &esk)?;
    recipient_slot(pk, key_id, generation, volume_id, vk, &ct[..], &ss, &nonce)
}

#[allow(clippy::too_many_arguments)]
fn recipient_slot(
    pk: &RecipientPublicKey,
    key_id: &str,
    generation: u32,
    volume_id: &[u8; 16],
    vk: &Secret32,
    ct: &[u8],
    ss: &Secret32,
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
        return Err(Error::invalid(format!(
            "a key id must be 1 to {MAX_KEY_ID_LEN} bytes long"
        )));
    }
    let mut body = Vec::with_capacity(3 + key_id.len() + 36 + CIPHERTEXT_LEN);
    body.extend_from_slice(&KEM_ID.to_le_bytes());
    body.push(key_id.len() as u8); // <= MAX_KEY_ID_LEN, checked above
    body.extend_from_slice(key_id.as_bytes());
    body.extend_from_slice(&generation.to_le_bytes());
    body.extend_from_slice(&pk.fingerprint());
    body.extend_from_slice(ct);
    let wrap_key = hkdf32(volume_id, ss.expose(), &[RECIPIENT_INFO]);
    seal_slot(SlotKind::Recipient, &body, &wrap_key, nonce, volume_id, vk)
}

/// Tries every recipient slot whose key this keystore holds (any generation still present).
/// Returns the index of the slot that opened and the volume key.
pub fn unwrap_with_keystore(
    slots: &[Vec<u8>],
    ks: &UnlockedKeystore,
    volume_id: &[u8; 16],
) -> Result<(usize, Secret32)> {
    let mut failure: Option<Error> = None;
    for (index, slot) in slots.iter().enumerate() {
        let Ok(p) = parse(slot) else { continue };
        if p.kind != SlotKind::Recipient {
            continue;
        }
        let Ok(body) = parse_recipient(p.body) else {
            continue;
        };
        let Some(sk) = ks.secret_key_for_slot(body.key_id, body.generation, &body.fingerprint)
        else {
            continue;
        };
        let attempt = open_recipient_slot(&p, &body, &sk, volume_id);
        match attempt {
            Ok(vk) => return Ok((index, vk)),
            Err(e) => {
                failure = Some(Error::new(
                    ErrorKind::Integrity,
                    format!("keyslot {index} (key {}) does not open: {e}", body.key_id),
                ));
            }
        }
    }
    Err(failure.unwrap_or_else(|| {
        Error::new(
            ErrorKind::NoMatchingSlot,
            format!(
                "none of the {} keyslots is wrapped for a key in this keystore",
                slots.iter().filter(|s| !s.is_empty()).count()
            ),
        )
    }))
}

/// Tries every recipient slot made for `sk`'s public key (matched by fingerprint),
/// without a keystore: for tools holding one decapsulation key.
pub fn unwrap_with_secret_key(
    slots: &[Vec<u8>],
    sk: &HybridSecretKey,
    volume_id: &[u8; 16],
) -> Result<(usize, Secret32)> {
    let fingerprint = sk.public_key().fingerprint();
    let mut failure: Option<Error> = None;
    for (index, slot) in slots.iter().enumerate() {
        let Ok(p) = parse(slot) else { continue };
        if p.kind != SlotKind::Recipient {
            continue;
        }
        let Ok(body) = parse_recipient(p.body) else {
            continue;
        };
        if body.fingerprint != fingerprint {
            continue;
        }
        let attempt = open_recipient_slot(&p, &body, sk, volume_id);
        match attempt {
            Ok(vk) => return Ok((index, vk)),
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.unwrap_or_else(|| {
        Error::new(
            ErrorKind::NoMatchingSlot,
            "no keyslot is wrapped for this key",
        )
    }))
}

// ---- passphrase slots -----------------------------------------------------------------

/// Wraps `vk` under argon2id(`pass`) with `params` and a fresh salt.
pub fn wrap_with_passphrase(
    pass: &[u8],
    params: KdfParams,
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<Vec<u8>> {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt);
    wrap_with_passphrase_deterministic(pass, params, volume_id, vk, &salt, &aead::random_nonce())
}

/// Passphrase slot with a fixed salt and nonce: for the golden-vector tests only.
pub fn wrap_with_passphrase_deterministic(
    pass: &[u8],
    params: KdfParams,
    volume_id: &[u8; 16],
    vk: &Secret32,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(13 + SALT_LEN);
    body.push(KDF_ARGON2ID);
    body.extend_from_slice(&params.m_cost_kib.to_le_bytes());
    body.extend_from_slice(&params.t_cost.to_le_bytes());
    body.extend_from_slice(&params.p_cost.to_le_bytes());
    body.extend_from_slice(salt);
    let (hash, _) = params.derive(pass, salt)?;
    let wrap_key = hkdf32(volume_id, hash.expose(), &[PASSPHRASE_INFO]);
    seal_slot(SlotKind::Passphrase, &body, &wrap_key, nonce, volume_id, vk)
}

fn parse_passphrase(body: &[u8]) -> Result<(KdfParams, &[u8])> {
    if body.len() != 13 + SALT_LEN {
        return Err(Error::corrupt("the passphrase keyslot body is malformed"));
    }
    if body[0] != KDF_ARGON2ID {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("KDF {} is unknown", body[0]),
        ));
    }
    let word = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let params = KdfParams {
        m_cost_kib: word(1),
        t_cost: word(5),
        p_cost: word(9),
    };
    Ok((params, &body[13..]))
}

/// Tries every passphrase slot with `pass`.
pub fn unwrap_with_passphrase(
    slots: &[Vec<u8>],
    pass: &[u8],
    volume_id: &[u8; 16],
) -> Result<(usize, Secret32)> {
    let mut seen = 0usize;
    for (index, slot) in slots.iter().enumerate() {
        let Ok(p) = parse(slot) else { continue };
        if p.kind != SlotKind::Passphrase {
            continue;
        }
        let Ok((params, salt)) = parse_passphrase(p.body) else {
            log::debug!("keyslot {index}: malformed passphrase slot skipped");
            continue;
        };
        if let Err(e) = params.validate() {
            log::debug!("keyslot {index}: skipped: {e}");
            continue;
        }
        seen += 1;
        let Ok((hash, _)) = params.derive(pass, salt) else {
            log::debug!("keyslot {index}: argon2id failed; skipped");
            continue;
        };
        let wrap_key = hkdf32(volume_id, hash.expose(), &[PASSPHRASE_INFO]);
        if let Ok(vk) = open_slot(&p, &wrap_key, volume_id) {
            return Ok((index, vk));
        }
    }
    if seen == 0 {
        Err(Error::new(
            ErrorKind::NoMatchingSlot,
            "the volume has no passphrase keyslot",
        ))
    } else {
        Err(Error::new(
            ErrorKind::WrongPassphrase,
            format!("the passphrase opens none of the {seen} passphrase keyslots"),
        ))
    }
}

// ---- recovery slots -------------------------------------------------------------------

/// Makes a recovery slot: a fresh recovery key wraps `vk` and is split into `shares` Shamir
/// shares of which any `threshold` recover it. The shares are returned once; qvol keeps
/// none of them.
pub fn wrap_with_recovery(
    threshold: u8,
    shares: u8,
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<(Vec<u8>, Vec<RecoveryShare>)> {
    let recovery_key = Secret32::random();
    let mut set_id = [0u8; recovery::SET_ID_LEN];
    fill_random(&mut set_id);
    let split = recovery::split(&recovery_key, threshold, shares, set_id)?;
    let slot = recovery_slot(
        threshold,
        shares,
        &set_id,
        &recovery_key,
        &aead::random_nonce(),
        volume_id,
        vk,
    )?;
    Ok((slot, split))
}

/// Recovery slot with a fixed recovery key, share set id, nonce and Shamir randomness (the
/// coefficients come from a stream of `shamir_seed`, see
/// [`recovery::split_deterministic`]): for the golden-vector tests only. In real use every
/// one of these must be fresh and random, which [`wrap_with_recovery`] ensures.
#[allow(clippy::too_many_arguments)]
pub fn wrap_with_recovery_deterministic(
    threshold: u8,
    shares: u8,
    volume_id: &[u8; 16],
    vk: &Secret32,
    recovery_key: &Secret32,
    set_id: [u8; recovery::SET_ID_LEN],
    nonce: &[u8; NONCE_LEN],
    shamir_seed: &[u8; 32],
) -> Result<(Vec<u8>, Vec<RecoveryShare>)> {
    let split =
        recovery::split_deterministic(recovery_key, threshold, shares, set_id, shamir_seed)?;
    let slot = recovery_slot(
        threshold,
        shares,
        &set_id,
        recovery_key,
        nonce,
        volume_id,
        vk,
    )?;
    Ok((slot, split))
}

/// Recovery body (k, n, set id) and the volume key sealed under
/// HKDF(volume id, recovery key, RECOVERY_INFO).
fn recovery_slot(
    threshold: u8,
    shares: u8,
    set_id: &[u8; recovery::SET_ID_LEN],
    recovery_key: &Secret32,
    nonce: &[u8; NONCE_LEN],
    volume_id: &[u8; 16],
    vk: &Secret32,
) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(2 + recovery::SET_ID_LEN);
    body.push(threshold);
    body.push(shares);
    body.extend_from_slice(set_id);
    let wrap_key = hkdf32(volume_id, recovery_key.expose(), &[RECOVERY_INFO]);
    seal_slot(SlotKind::Recovery, &body, &wrap_key, nonce, volume_id, vk)
}

/// Recovers the volume key from at least `threshold` shares of the set named by a
/// recovery slot.
pub fn unwrap_with_recovery(
    slots: &[Vec<u8>],
    shares: &[RecoveryShare],
    volume_id: &[u8; 16],
) -> Result<(usize, Secret32)> {
    let mut failure: Option<Error> = None;
    for (index, slot) in slots.iter().enumerate() {
        let Ok(p) = parse(slot) else { continue };
        if p.kind != SlotKind::Recovery || p.body.len() != 2 + recovery::SET_ID_LEN {
            continue;
        }
        let (threshold, count) = (p.body[0], p.body[1]);
        if threshold < 2 || threshold > count {
            log::debug!("keyslot {index}: recovery slot with {threshold} of {count} skipped");
            continue;
        }
        let set_id = &p.body[2..];
        let mine: Vec<&RecoveryShare> = shares.iter().filter(|s| s.set_id() == set_id).collect();
        if mine.is_empty() {
            continue;
        }
        let recovery_key = match recovery::combine(&mine, threshold) {
            Ok(k) => k,
            Err(e) => {
                failure = Some(e);
                continue;
            }
        };
        let wrap_key = hkdf32(volume_id, recovery_key.expose(), &[RECOVERY_INFO]);
        match open_slot(&p, &wrap_key, volume_id) {
            Ok(vk) => return Ok((index, vk)),
            Err(_) => {
                failure = Some(Error::new(
                    ErrorKind::Integrity,
                    format!("the recovery shares do not open keyslot {index} (a share is wrong)"),
                ));
            }
        }
    }
    Err(failure.unwrap_or_else(|| {
        Error::new(
            ErrorKind::NoMatchingSlot,
            "no recovery keyslot of this volume matches the shares given",
        )
    }))
}

/// Describes a slot without opening it.
pub fn describe(slot: &[u8]) -> Result<SlotInfo> {
    let p = parse(slot)?;
    let mut info = SlotInfo {
        kind: p.kind,
        version: VERSION,
        key_id: None,
        generation: None,
        fingerprint: None,
        kem: None,
        kdf: None,
        threshold: None,
        shares: None,
        share_set: None,
    };
    match p.kind {
        SlotKind::Recipient => {
            let b = parse_recipient(p.body)?;
            info.key_id = Some(b.key_id.to_owned());
            info.generation = Some(b.generation);
            info.fingerprint = Some(hex::encode(b.fingerprint));
            info.kem = Some(KEM_NAME);
        }
        SlotKind::Passphrase => info.kdf = Some(parse_passphrase(p.body)?.0),
        SlotKind::Recovery => {
            if p.body.len() != 2 + recovery::SET_ID_LEN {
                return Err(Error::corrupt("the recovery keyslot body is malformed"));
            }
            info.threshold = Some(p.body[0]);
            info.shares = Some(p.body[1]);
            info.share_set = Some(hex::encode(&p.body[2..]));
        }
    }
    Ok(info)
}
