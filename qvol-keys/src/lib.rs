//! qvol-keys: the keystore, the hybrid ML-KEM-1024 + X25519 KEM and keyslots.
//! Knows nothing of block I/O. docs/KEYS.md describes the hierarchy and every format.
//!
//! - [`Secret32`]: 32 secret bytes, zeroized on drop, mlocked, printed `[REDACTED]`.
//! - [`kem`]: the hybrid KEM (keygen from a seed, encapsulate, decapsulate).
//! - [`Keystore`] / [`UnlockedKeystore`]: master seed, per-VM keys, rotation, export/import,
//!   the MACed manifest and volume records ([`VolumeGuard`]).
//! - [`keyslot`]: wrapping a volume key for a recipient, a passphrase or recovery shares.
//! - [`PublicKeyFile`]: a key's public half as a file, to wrap keyslots for another
//!   keystore's key.
#![deny(unsafe_code)]

mod aead;
mod error;
pub mod kdf;
pub mod kem;
pub mod keyslot;
mod keystore;
mod mlock;
mod pubfile;
pub mod recovery;
mod secret;

pub use error::{Error, ErrorKind, Result};
pub use kdf::KdfParams;
pub use kem::RecipientPublicKey;
pub use keyslot::{SlotInfo, SlotKind};
pub use keystore::{
    derive_vm_key_seed, validate_vm_name, GenerationInfo, KeyInfo, Keystore, UnlockedKeystore,
    VolumeBinding, VolumeGuard, VolumeState, EXPORT_FORMAT, KEYSTORE_FILE, KEYSTORE_VERSION,
    KEYS_DIR, LOCK_FILE, MANIFEST_FILE, VOLUMES_DIR,
};
pub use pubfile::{PublicKeyFile, MAX_PUBLIC_KEY_FILE_LEN, PUBLIC_KEY_FORMAT, PUBLIC_KEY_VERSION};
pub use recovery::RecoveryShare;
pub use secret::{Secret32, SecretBytes};
