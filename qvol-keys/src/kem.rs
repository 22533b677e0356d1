//! The hybrid KEM: ML-KEM-1024 (FIPS 203) + X25519 (RFC 7748), combined X-Wing-style.
//!
//! ```text
//! keygen(seed32):  (d, z, sk_X) = SHAKE256(KEYGEN_LABEL || seed32, 96 bytes)
//!                  (ek_M, dk_M) = ML-KEM-1024.KeyGen_internal(d, z)      FIPS 203 Alg. 16
//!                  pk_X = X25519(sk_X, 9)                                RFC 7748 §6.1
//!                  pk = ek_M (1568) || pk_X (32)
//! encaps(pk):      (ss_M, ct_M) = ML-KEM-1024.Encaps(ek_M)               FIPS 203 Alg. 20
//!                  ct_X = X25519(esk, 9); ss_X = X25519(esk, pk_X)
//!                  ss = SHA3-256(COMBINER_LABEL || ss_M || ss_X || ct_X || pk_X)
//!                  ct = ct_M (1568) || ct_X (32)
//! decaps(sk, ct):  ss_M = ML-KEM-1024.Decaps(dk_M, ct_M)                 FIPS 203 Alg. 21
//!                  ss_X = X25519(sk_X, ct_X); same hash
//! ```
//! docs/KEYS.md argues the combiner (the X-Wing argument carried over to ML-KEM-1024).

use std::fmt;

use ml_kem::kem::{Decapsulate, DecapsulationKey, EncapsulationKey};
use ml_kem::{EncapsulateDeterministic, EncodedSizeUser, KemCore, MlKem1024, MlKem1024Params, B32};
use sha3::digest::{Digest, ExtendableOutput, Update, XofReader};
use sha3::{Sha3_256, Shake256};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::{fill_random, Secret32};

/// Name of the KEM, as shown by `qvol info` and `qvol key show`.
pub const KEM_NAME: &str = "ML-KEM-1024+X25519";
/// Identifier of this KEM in keyslots (u16).
pub const KEM_ID: u16 = 1;
/// Length of an ML-KEM-1024 encapsulation key (FIPS 203 Table 3: 384k + 32, k = 4).
pub const MLKEM_EK_LEN: usize = 1568;
/// Length of an ML-KEM-1024 ciphertext (FIPS 203 Table 3: 32(du k + dv), du = 11, dv = 5).
pub const MLKEM_CT_LEN: usize = 1568;
/// Length of a hybrid public key: ek_M || pk_X.
pub const PUBLIC_KEY_LEN: usize = MLKEM_EK_LEN + 32;
/// Length of a hybrid ciphertext: ct_M || ct_X.
pub const CIPHERTEXT_LEN: usize = MLKEM_CT_LEN + 32;

/// Domain label of the seed expansion (key generation).
pub const KEYGEN_LABEL: &[u8] = b"qvol-kem-v1 ML-KEM-1024+X25519 keygen";
/// Domain label of the shared-secret combiner.
pub const COMBINER_LABEL: &[u8] = b"qvol-kem-v1 ML-KEM-1024+X25519 combiner";
/// Domain label of public key fingerprints.
pub const FINGERPRINT_LABEL: &[u8] = b"qvol-kem-v1 public key fingerprint";

/// A recipient's hybrid public key (ML-KEM-1024 encapsulation key + X25519 public key).
///
/// It may carry the keystore generation it belongs to (not part of its encoding), which
/// [`crate::keyslot::wrap_for_recipient`] records in the slot.
#[derive(Clone)]
pub struct RecipientPublicKey {
    bytes: Box<[u8; PUBLIC_KEY_LEN]>,
    generation: u32,
}

impl PartialEq for RecipientPublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for RecipientPublicKey {}

impl RecipientPublicKey {
    /// Parses an encoded public key, with the FIPS 203 §7.2 encapsulation key check
    /// (every coefficient of ek_M below q = 3329).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != PUBLIC_KEY_LEN {
            return Err(Error::corrupt(format!(
                "a {KEM_NAME} public key is {PUBLIC_KEY_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        if !mlkem_ek_is_valid(&bytes[..MLKEM_EK_LEN]) {
            return Err(Error::corrupt(
                "the ML-KEM-1024 encapsulation key fails the FIPS 203 modulus check",
            ));
        }
        let mut out = Box::new([0u8; PUBLIC_KEY_LEN]);
        out.copy_from_slice(bytes);
        Ok(RecipientPublicKey {
            bytes: out,
            generation: 0,
        })
    }

    /// The keystore generation this key belongs to (0 when unknown).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The same key, labelled with keystore generation `generation`.
    pub fn with_generation(mut self, generation: u32) -> Self {
        self.generation = generation;
        self
    }

    /// The encoding ek_M || pk_X.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.bytes
    }

    /// SHA3-256(FINGERPRINT_LABEL || pk): names the key in slots and in `qvol key show`.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha3_256::new();
        Digest::update(&mut h, FINGERPRINT_LABEL);
        Digest::update(&mut h, &self.bytes[..]);
        h.finalize().into()
    }

    /// The fingerprint in lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint())
    }

    fn x25519(&self) -> [u8; 32] {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&self.bytes[MLKEM_EK_LEN..]);
        pk
    }
}

impl fmt::Debug for RecipientPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RecipientPublicKey({KEM_NAME}, fingerprint {})",
            self.fingerprint_hex()
        )
    }
}

/// A hybrid ciphertext (ct_M || ct_X).
pub type Ciphertext = Box<[u8; CIPHERTEXT_LEN]>;

/// A recipient's hybrid secret key, derived from a 32-byte seed.
pub struct HybridSecretKey {
    dk: DecapsulationKey<MlKem1024Params>,
    sk_x: StaticSecret,
    public: RecipientPublicKey,
}

impl HybridSecretKey {
    /// Derives the key pair from `seed` (see the module documentation).
    pub fn from_seed(seed: &Secret32) -> Self {
        let mut expanded = Zeroizing::new([0u8; 96]);
        let mut xof = Shake256::default();
        Update::update(&mut xof, KEYGEN_LABEL);
        Update::update(&mut xof, seed.expose());
        xof.finalize_xof().read(&mut expanded[..]);
        let (mut d, mut z, mut sk) = split96(&expanded);
        let (dk, ek) = MlKem1024::generate_deterministic(&d, &z);
        let sk_x = StaticSecret::from(sk);
        d.as_mut_slice().zeroize();
        z.as_mut_slice().zeroize();
        sk.zeroize();
        let pk_x = XPublicKey::from(&sk_x);
        let mut bytes = Box::new([0u8; PUBLIC_KEY_LEN]);
        bytes[..MLKEM_EK_LEN].copy_from_slice(&ek.as_bytes());
        bytes[MLKEM_EK_LEN..].copy_from_slice(pk_x.as_bytes());
        HybridSecretKey {
            dk,
            sk_x,
            public: RecipientPublicKey {
                bytes,
                generation: 0,
            },
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> &RecipientPublicKey {
        &self.public
    }

    /// Recovers the shared secret from `ct`. ML-KEM rejects implicitly (a wrong ciphertext
    /// yields an unrelated secret, caught later by the slot's AEAD); an X25519 share of
    /// small order is rejected here.
    pub fn decapsulate(&self, ct: &[u8]) -> Result<Secret32> {
        if ct.len() != CIPHERTEXT_LEN {
            return Err(Error::corrupt(format!(
                "a {KEM_NAME} ciphertext is {CIPHERTEXT_LEN} bytes, not {}",
                ct.len()
            )));
        }
        let ct_m = ml_kem::Ciphertext::<MlKem1024>::try_from(&ct[..MLKEM_CT_LEN])
            .map_err(|_| Error::corrupt("the ML-KEM-1024 ciphertext has the wrong length"))?;
        let mut ss_m = self
            .dk
            .decapsulate(&ct_m)
            .map_err(|()| Error::corrupt("ML-KEM-1024 decapsulation failed"))?;
        let mut ct_x = [0u8; 32];
        ct_x.copy_from_slice(&ct[MLKEM_CT_LEN..]);
        let ss_x = self.sk_x.diffie_hellman(&XPublicKey::from(ct_x));
        let result = if ss_x.was_contributory() {
            Ok(combine(
                &ss_m,
                ss_x.as_bytes(),
                &ct_x,
                &self.public.x25519(),
            ))
        } else {
            Err(Error::new(
                ErrorKind::Integrity,
                "the X25519 share of the ciphertext has small order",
            ))
        };
        ss_m.as_mut_slice().zeroize();
        result
    }
}

impl fmt::Debug for HybridSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HybridSecretKey([REDACTED], public {:?})", self.public)
    }
}

/// Encapsulates a fresh shared secret to `pk` with randomness from the OS.
pub fn encapsulate(pk: &RecipientPublicKey) -> Result<(Ciphertext, Secret32)> {
    let mut m = Zeroizing::new([0u8; 32]);
    let mut esk = Zeroizing::new([0u8; 32]);
    fill_random(&mut m[..]);
    fill_random(&mut esk[..]);
    encapsulate_deterministic(pk, &m, &esk)
}

/// Encapsulation with caller-given randomness: `m` for ML-KEM (FIPS 203 Alg. 17) and the
/// ephemeral X25519 secret `esk`. Only for known-answer tests: both must be fresh random
/// bytes in real use, which [`encapsulate`] ensures.
pub fn encapsulate_deterministic(
    pk: &RecipientPublicKey,
    m: &[u8; 32],
    esk: &[u8; 32],
) -> Result<(Ciphertext, Secret32)> {
    let ek_bytes =
        ml_kem::Encoded::<EncapsulationKey<MlKem1024Params>>::try_from(&pk.bytes[..MLKEM_EK_LEN])
            .map_err(|_| Error::corrupt("the ML-KEM-1024 encapsulation key has the wrong length"))?;
    let ek = EncapsulationKey::<MlKem1024Params>::from_bytes(&ek_bytes);
    let (ct_m, ss_m) = ek
        .encapsulate_deterministic(&B32::from(*m))
        .map_err(|()| Error::corrupt("ML-KEM-1024 encapsulation failed"))?;
    let mut ss_m = ss_m;
    let esk = StaticSecret::from(*esk);
    let ct_x = XPublicKey::from(&esk);
    let pk_x = pk.x25519();
    let ss_x = esk.diffie_hellman(&XPublicKey::from(pk_x));
    if !ss_x.was_contributory() {
        ss_m.as_mut_slice().zeroize();
        return Err(Error::invalid(
            "the recipient's X25519 public key has small order",
        ));
    }
    let mut ct = Box::new([0u8; CIPHERTEXT_LEN]);
    ct[..MLKEM_CT_LEN].copy_from_slice(&ct_m);
    ct[MLKEM_CT_LEN..].copy_from_slice(ct_x.as_bytes());
    let ss = combine(&ss_m, ss_x.as_bytes(), ct_x.as_bytes(), &pk_x);
    ss_m.as_mut_slice().zeroize();
    Ok((ct, ss))
}

/// The X-Wing-style combiner: SHA3-256(label || ss_M || ss_X || ct_X || pk_X).
fn combine(ss_m: &[u8], ss_x: &[u8; 32], ct_x: &[u8; 32], pk_x: &[u8; 32]) -> Secret32 {
    let mut h = Sha3_256::new();
    Digest::update(&mut h, COMBINER_LABEL);
    Digest::update(&mut h, ss_m);
    Digest::update(&mut h, ss_x);
    Digest::update(&mut h, ct_x);
    Digest::update(&mut h, pk_x);
    let mut out: [u8; 32] = h.finalize().into();
    let secret = Secret32::from_bytes(out);
    out.zeroize();
    secret
}

fn split96(expanded: &[u8; 96]) -> (B32, B32, [u8; 32]) {
    let mut d = [0u8; 32];
    let mut z = [0u8; 32];
    let mut sk = [0u8; 32];
    d.copy_from_slice(&expanded[..32]);
    z.copy_from_slice(&expanded[32..64]);
    sk.copy_from_slice(&expanded[64..]);
    let out = (B32::from(d), B32::from(z), sk);
    d.zeroize();
    z.zeroize();
    out
}

/// FIPS 203 §7.2 "encapsulation key check": ByteEncode12(ByteDecode12(ek)) == ek, i.e. each
/// packed 12-bit coefficient of the 4 polynomials is below q = 3329.
pub fn mlkem_ek_is_valid(ek: &[u8]) -> bool {
    if ek.len() != MLKEM_EK_LEN {
        return false;
    }
    ek[..MLKEM_EK_LEN - 32].chunks_exact(3).all(|b| {
        let c0 = u16::from(b[0]) | (u16::from(b[1] & 0x0f) << 8);
        let c1 = u16::from(b[1] >> 4) | (u16::from(b[2]) << 4);
        c0 < 3329 && c1 < 3329
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let sk = HybridSecretKey::from_seed(&Secret32::from_bytes([1; 32]));
        let (ct, ss) = encapsulate(sk.public_key()).unwrap();
        assert_eq!(sk.decapsulate(&ct[..]).unwrap(), ss);
        let other = HybridSecretKey::from_seed(&Secret32::from_bytes([2; 32]));
        assert_ne!(other.decapsulate(&ct[..]).unwrap(), ss);
    }

    #[test]
    fn modulus_check_rejects_q() {
        let sk = HybridSecretKey::from_seed(&Secret32::from_bytes([1; 32]));
        let mut pk = *sk.public_key().as_bytes();
        assert!(RecipientPublicKey::from_bytes(&pk).is_ok());
        // First coefficient := 3329 = 0xd01.
        pk[0] = 0x01;
        pk[1] = (pk[1] & 0xf0) | 0x0d;
        assert_eq!(
            RecipientPublicKey::from_bytes(&pk).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
