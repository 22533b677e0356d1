//! Recovery shares: a 32-byte recovery key split k-of-n with Shamir's secret sharing over
//! GF(2^8) (vsss-rs, constant-time field arithmetic), byte by byte.
//!
//! A share prints as `qvol-share-v1-` followed by hex of
//! `set id (8) || k (1) || n (1) || x (1) || y (32) || check (4)`, where `check` is the
//! first 4 bytes of SHA3-256(`CHECK_LABEL` || the preceding 43 bytes): a mistyped share is
//! refused before it can silently give a wrong key. The set id ties shares to one recovery
//! slot; the threshold is carried so that too few shares are refused with a clear error
//! (Shamir's scheme itself would just return a wrong secret).

use std::fmt;
use std::str::FromStr;

use sha3::{Digest, Sha3_256};
use subtle::ConstantTimeEq;
use vsss_rs::Gf256;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::Secret32;

/// Length of a share set id.
pub const SET_ID_LEN: usize = 8;
/// Text prefix of a share.
pub const SHARE_PREFIX: &str = "qvol-share-v1-";
/// Checksum label.
pub const CHECK_LABEL: &[u8] = b"qvol-share-v1 check";
const BODY_LEN: usize = SET_ID_LEN + 3 + 32;

/// One recovery share. Secret: zeroized on drop, redacted in Debug; `Display` prints the
/// share itself (for handing it to its keeper), so never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryShare {
    body: Zeroizing<[u8; BODY_LEN]>,
}

impl RecoveryShare {
    /// The share set (one per recovery slot).
    pub fn set_id(&self) -> &[u8] {
        &self.body[..SET_ID_LEN]
    }
    /// Shares needed to recover.
    pub fn threshold(&self) -> u8 {
        self.body[SET_ID_LEN]
    }
    /// Shares made.
    pub fn count(&self) -> u8 {
        self.body[SET_ID_LEN + 1]
    }
    /// This share's x coordinate (1..=n).
    pub fn index(&self) -> u8 {
        self.body[SET_ID_LEN + 2]
    }

    fn check(body: &[u8]) -> [u8; 4] {
        let mut h = Sha3_256::new();
        h.update(CHECK_LABEL);
        h.update(body);
        let d = h.finalize();
        [d[0], d[1], d[2], d[3]]
    }
}

impl fmt::Debug for RecoveryShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RecoveryShare(set {}, {} of {}, #{}, [REDACTED])",
            hex::encode(self.set_id()),
            self.threshold(),
            self.count(),
            self.index()
        )
    }
}

impl fmt::Display for RecoveryShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = Zeroizing::new(hex::encode(&self.body[..]));
        write!(
            f,
            "{SHARE_PREFIX}{}{}",
            text.as_str(),
            hex::encode(Self::check(&self.body[..]))
        )
    }
}

impl FromStr for RecoveryShare {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || Error::corrupt("the recovery share is malformed (expected qvol-share-v1-<hex>)");
        let hex_part = s.trim().strip_prefix(SHARE_PREFIX).ok_or_else(bad)?;
        let bytes = Zeroizing::new(hex::decode(hex_part).map_err(|_| bad())?);
        if bytes.len() != BODY_LEN + 4 {
            return Err(bad());
        }
        let (body, check) = bytes.split_at(BODY_LEN);
        if !bool::from(Self::check(body).ct_eq(check)) {
            return Err(Error::corrupt(
                "the recovery share's checksum is wrong (a typo?)",
            ));
        }
        let mut share = RecoveryShare {
            body: Zeroizing::new([0u8; BODY_LEN]),
        };
        share.body.copy_from_slice(body);
        let (k, n, x) = (share.threshold(), share.count(), share.index());
        if k < 2 || k > n || x == 0 || x > n {
            return Err(bad());
        }
        Ok(share)
    }
}

/// Splits `key` into `n` shares, any `k` of which recover it (2 <= k <= n <= 255).
pub fn split(key: &Secret32, k: u8, n: u8, set_id: [u8; SET_ID_LEN]) -> Result<Vec<RecoveryShare>> {
    split_with_rng(key, k, n, set_id, rand_core::OsRng)
}

/// [`split`] with the polynomial coefficients drawn from the stream
/// SHAKE256(`"qvol-share-v1 seeded test rng"` || `seed`): for the golden-vector tests only. Which bytes of the stream become which
/// coefficient is up to vsss-rs, so the shares (not their validity) may change with it.
pub fn split_deterministic(
    key: &Secret32,
    k: u8,
    n: u8,
    set_id: [u8; SET_ID_LEN],
    seed: &[u8; 32],
) -> Result<Vec<RecoveryShare>> {
    split_with_rng(key, k, n, set_id, SeededRng::new(seed))
}

fn split_with_rng(
    key: &Secret32,
    k: u8,
    n: u8,
    set_id: [u8; SET_ID_LEN],
    rng: impl rand_core::RngCore + rand_core::CryptoRng,
) -> Result<Vec<RecoveryShare>> {
    if k < 2 || k > n {
        return Err(Error::invalid(format!(
            "a recovery split needs 2 <= k <= n <= 255 (got {k} of {n})"
        )));
    }
    let raw = Gf256::split_array(usize::from(k), usize::from(n), key.expose(), rng)
        .map_err(|e| Error::invalid(format!("Shamir split failed: {e:?}")))?;
    let mut out = Vec::with_capacity(raw.len());
    for (i, mut r) in raw.into_iter().enumerate() {
        // vsss-rs numbers shares 1..=n in order; each is x || y[32].
        if r.len() != 33 || usize::from(r[0]) != i + 1 {
            r.zeroize();
            return Err(Error::invalid(
                "Shamir split returned an unexpected share layout",
            ));
        }
        let mut body = Zeroizing::new([0u8; BODY_LEN]);
        body[..SET_ID_LEN].copy_from_slice(&set_id);
        body[SET_ID_LEN] = k;
        body[SET_ID_LEN + 1] = n;
        body[SET_ID_LEN + 2..].copy_from_slice(&r);
        r.zeroize();
        out.push(RecoveryShare { body });
    }
    Ok(out)
}

/// Label of the [`SeededRng`] stream.
const SEEDED_RNG_LABEL: &[u8] = b"qvol-share-v1 seeded test rng";

/// A deterministic byte stream, SHAKE256(`SEEDED_RNG_LABEL` || seed), posing as a
/// cryptographic RNG so that vsss-rs draws reproducible Shamir coefficients: for
/// [`split_deterministic`] (golden vectors) only. Never use it with a secret seed.
struct SeededRng(sha3::Shake256Reader);

impl SeededRng {
    /// The stream of `seed`.
    fn new(seed: &[u8; 32]) -> Self {
        use sha3::digest::{ExtendableOutput, Update};
        let mut xof = sha3::Shake256::default();
        xof.update(SEEDED_RNG_LABEL);
        xof.update(seed);
        SeededRng(xof.finalize_xof())
    }
}

impl rand_core::RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use sha3::digest::XofReader;
        self.0.read(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// Deterministic by design; the marker only lets vsss-rs accept it (test vectors).
impl rand_core::CryptoRng for SeededRng {}

/// Recovers the key from shares of one set; refuses fewer than `threshold` distinct shares.
pub fn combine(shares: &[&RecoveryShare], threshold: u8) -> Result<Secret32> {
    let mut xs: Vec<u8> = shares.iter().map(|s| s.index()).collect();
    xs.sort_unstable();
    xs.dedup();
    if xs.len() < usize::from(threshold) || threshold < 2 {
        return Err(Error::new(
            ErrorKind::TooFewShares,
            format!(
                "{} distinct recovery share(s) given, {threshold} needed",
                xs.len()
            ),
        ));
    }
    let mut seen = Vec::new();
    let mut raw: Vec<Vec<u8>> = Vec::new();
    for s in shares {
        if seen.contains(&s.index()) {
            continue;
        }
        seen.push(s.index());
        raw.push(s.body[SET_ID_LEN + 2..].to_vec());
    }
    let result = Gf256::combine_array(&raw);
    for r in &mut raw {
        r.zeroize();
    }
    let mut key = result.map_err(|e| Error::corrupt(format!("Shamir combine failed: {e:?}")))?;
    let secret = Secret32::from_slice(&key)
        .ok_or_else(|| Error::corrupt("Shamir combine returned a key of the wrong length"));
    key.zeroize();
    secret
}
