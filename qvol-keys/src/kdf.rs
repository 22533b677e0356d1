//! Passphrase hashing with argon2id (RFC 9106) and key derivation with HKDF-SHA-256
//! (RFC 5869).

use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Params, Version};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};
use crate::secret::Secret32;

/// Environment variable that makes [`KdfParams::from_env`] pick the (insecure, fast) test
/// parameters. Meant for test suites only.
pub const WEAK_KDF_ENV: &str = "QVOL_TEST_WEAK_KDF";

/// Largest memory cost accepted from a file (2 GiB): a forged slot or keystore must not be
/// able to make unlocking allocate without bound.
pub const MAX_M_COST_KIB: u32 = 2 * 1024 * 1024;
/// Largest time cost accepted from a file.
pub const MAX_T_COST: u32 = 16;
/// Largest parallelism accepted from a file.
pub const MAX_P_COST: u32 = 16;
/// Largest total work m x t accepted from a file, in KiB-passes (8 GiB-passes: 2 GiB with
/// 4 passes, 256 MiB with 32 would be refused by MAX_T_COST; about 10 s on one core). The
/// default (256 MiB x 3) is 768 MiB-passes.
pub const MAX_WORK_KIB_PASSES: u64 = 8 * 1024 * 1024;

/// argon2id cost parameters, stored beside every passphrase-protected secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Passes over memory.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 256 MiB, 3 passes, 4 lanes: RFC 9106 §4's second recommended option (64 MiB, t = 3,
    /// p = 4) with four times the memory, about a second on one core of a 2024 server.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 256 * 1024,
            t_cost: 3,
            p_cost: 4,
        }
    }
}

impl KdfParams {
    /// Fast, INSECURE parameters (64 KiB, 1 pass, 1 lane) for tests.
    pub const fn insecure_for_tests() -> Self {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// [`KdfParams::default`], or the test parameters when `QVOL_TEST_WEAK_KDF=1`.
    pub fn from_env() -> Self {
        match std::env::var(WEAK_KDF_ENV) {
            Ok(v) if v == "1" => KdfParams::insecure_for_tests(),
            _ => KdfParams::default(),
        }
    }

    /// Checks the parameters are within what argon2 and our limits allow.
    pub fn validate(&self) -> Result<()> {
        let ok = self.p_cost >= 1
            && self.p_cost <= MAX_P_COST
            && self.t_cost >= 1
            && self.t_cost <= MAX_T_COST
            && self.m_cost_kib >= 8 * self.p_cost
            && self.m_cost_kib <= MAX_M_COST_KIB
            && u64::from(self.m_cost_kib) * u64::from(self.t_cost) <= MAX_WORK_KIB_PASSES;
        if ok {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "argon2id parameters m={} KiB, t={}, p={} are outside the accepted range \
                     (m 8p..{MAX_M_COST_KIB} KiB, t 1..{MAX_T_COST}, p 1..{MAX_P_COST}, \
                     m x t <= {MAX_WORK_KIB_PASSES} KiB)",
                    self.m_cost_kib, self.t_cost, self.p_cost
                ),
            ))
        }
    }

    /// argon2id(passphrase, salt) -> 32 bytes, and how long it took.
    pub fn derive(&self, passphrase: &[u8], salt: &[u8]) -> Result<(Secret32, Duration)> {
        self.validate()?;
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::invalid(format!("argon2id rejected its parameters: {e}")))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut out = Secret32::zero();
        let start = Instant::now();
        argon
            .hash_password_into(passphrase, salt, out.expose_mut())
            .map_err(|e| Error::invalid(format!("argon2id failed: {e}")))?;
        Ok((out, start.elapsed()))
    }
}

/// HKDF-SHA-256 (RFC 5869): Extract(salt, ikm) then Expand(info, 32).
pub fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Secret32 {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut out = Secret32::zero();
    let info: Zeroizing<Vec<u8>> = Zeroizing::new(info.concat());
    // 32 bytes is far below HKDF-SHA-256's limit of 255 * 32, so expand cannot fail.
    if hk.expand(&info, out.expose_mut()).is_err() {
        unreachable!("HKDF-SHA-256 can always expand 32 bytes");
    }
    out
}

/// Length-prefixed (u16 big-endian) encoding of a variable field inside an HKDF info string,
/// so that ("ab", "c") and ("a", "bc") never collide.
pub fn lp(field: &[u8]) -> Vec<u8> {
    let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(field.len() + 2);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&field[..usize::from(len)]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_rfc9106_shape_and_limits() {
        let p = KdfParams::insecure_for_tests();
        let (a, _) = p.derive(b"pass", b"saltsaltsaltsalt").unwrap();
        let (b, _) = p.derive(b"pass", b"saltsaltsaltsalt").unwrap();
        let (c, _) = p.derive(b"pasS", b"saltsaltsaltsalt").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let huge = KdfParams {
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1,
        };
        assert_eq!(
            huge.derive(b"p", b"saltsalt").unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn hkdf_rfc5869_case1() {
        // RFC 5869 A.1 with L = 32 (a prefix of the 42-byte OKM).
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf32(&salt, &ikm, &[&info]);
        assert_eq!(
            hex::encode(okm.expose()),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        );
    }
}
