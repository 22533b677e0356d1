//! Cipher suites: the AEADs that seal every data block and map node.
//!
//! Two suites, named in the volume header and chosen at create time:
//! - `xchacha20-poly1305` (id 1, the default): XChaCha20-Poly1305 as specified in
//!   draft-irtf-cfrg-xchacha-03, 192-bit nonces, constant time without AES hardware;
//! - `aegis-256` (id 2): AEGIS-256 as specified in draft-irtf-cfrg-aegis-aead, 256-bit
//!   nonces, fast where the CPU has AES instructions.
//!
//! Both use 128-bit tags. [`CipherSuite::cipher`] picks the fastest implementation for the
//! running CPU; [`CipherSuite::reference_cipher`] gives the portable one the fast one is
//! proved against (`tests/suite_equivalence.rs`).

mod aegis256;
mod cpu;
mod xchacha;

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// Length of every authentication tag, in bytes (both suites use 128-bit tags).
pub const TAG_LEN: usize = 16;

/// The longest nonce of any suite, in bytes.
pub const MAX_NONCE_LEN: usize = 32;

/// A 128-bit authentication tag.
pub type Tag = [u8; TAG_LEN];

/// An AEAD named in the volume header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03): 256-bit key, 192-bit nonce.
    #[default]
    XChaCha20Poly1305,
    /// AEGIS-256 (draft-irtf-cfrg-aegis-aead): 256-bit key, 256-bit nonce.
    Aegis256,
}

impl CipherSuite {
    /// Both suites use 128-bit tags.
    pub const TAG_LEN: usize = TAG_LEN;

    /// Every suite, in id order.
    pub const ALL: [CipherSuite; 2] = [CipherSuite::XChaCha20Poly1305, CipherSuite::Aegis256];

    /// The on-disk identifier: 1 = xchacha20-poly1305, 2 = aegis-256.
    pub const fn id(self) -> u16 {
        match self {
            CipherSuite::XChaCha20Poly1305 => 1,
            CipherSuite::Aegis256 => 2,
        }
    }

    /// The suite with on-disk identifier `id`, if there is one.
    pub fn from_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.id() == id)
    }

    /// The suite's name as used on the command line and in `qvol info`.
    pub const fn name(self) -> &'static str {
        match self {
            CipherSuite::XChaCha20Poly1305 => "xchacha20-poly1305",
            CipherSuite::Aegis256 => "aegis-256",
        }
    }

    /// Nonce length in bytes: 24 for xchacha20-poly1305, 32 for aegis-256.
    pub const fn nonce_len(self) -> usize {
        match self {
            CipherSuite::XChaCha20Poly1305 => xchacha::NONCE_LEN,
            CipherSuite::Aegis256 => aegis256::NONCE_LEN,
        }
    }

    /// Which implementation [`CipherSuite::cipher`] uses on this CPU, for `qvol info` and logs,
    /// e.g. `"ring chacha20-poly1305 + hchacha20 (avx2)"`.
    pub fn implementation(self) -> &'static str {
        match self {
            CipherSuite::XChaCha20Poly1305 => cpu::xchacha_fast_implementation(),
            CipherSuite::Aegis256 => cpu::aegis_implementation(),
        }
    }

    /// A keyed cipher using the fastest implementation for this CPU.
    pub fn cipher(self, key: &[u8; 32]) -> SuiteCipher {
        let engine = match self {
            CipherSuite::XChaCha20Poly1305 => Engine::RingXChaCha,
            CipherSuite::Aegis256 => Engine::LibAegis,
        };
        SuiteCipher::new(self, engine, key)
    }

    /// A keyed cipher using the portable reference implementation: RustCrypto
    /// `chacha20poly1305` for xchacha20-poly1305. For aegis-256 the `aegis` crate is the only
    /// library implementation (it dispatches between AES-NI, ARMv8 AES and constant-time
    /// software AES internally), so this is the same as [`CipherSuite::cipher`]; the tests
    /// check it against an independent transcription of the draft instead.
    pub fn reference_cipher(self, key: &[u8; 32]) -> SuiteCipher {
        let engine = match self {
            CipherSuite::XChaCha20Poly1305 => Engine::RustCryptoXChaCha,
            CipherSuite::Aegis256 => Engine::LibAegis,
        };
        SuiteCipher::new(self, engine, key)
    }

    /// The implementation [`CipherSuite::reference_cipher`] uses.
    pub fn reference_implementation(self) -> &'static str {
        match self {
            CipherSuite::XChaCha20Poly1305 => "RustCrypto chacha20poly1305 (XChaCha20Poly1305)",
            CipherSuite::Aegis256 => cpu::aegis_implementation(),
        }
    }
}

impl fmt::Display for CipherSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown cipher suite name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownSuite(pub String);

impl fmt::Display for UnknownSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown cipher suite {:?} (expected xchacha20-poly1305 or aegis-256)",
            self.0
        )
    }
}

impl std::error::Error for UnknownSuite {}

impl FromStr for CipherSuite {
    type Err = UnknownSuite;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|suite| suite.name() == s)
            .ok_or_else(|| UnknownSuite(s.to_owned()))
    }
}

/// Opening failed: the tag does not match the key, nonce, associated data and ciphertext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthError;

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("authentication tag mismatch")
    }
}

impl std::error::Error for AuthError {}

/// Which code does the work for a [`SuiteCipher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    RingXChaCha,
    RustCryptoXChaCha,
    LibAegis,
}

/// A keyed suite, ready to seal and open. Send + Sync; seal and open allocate nothing.
/// The key is zeroized on drop and never printed.
pub struct SuiteCipher {
    suite: CipherSuite,
    engine: Engine,
    key: Zeroizing<[u8; 32]>,
}

impl SuiteCipher {
    fn new(suite: CipherSuite, engine: Engine, key: &[u8; 32]) -> Self {
        SuiteCipher {
            suite,
            engine,
            key: Zeroizing::new(*key),
        }
    }

    /// A copy of the key (for sealing it elsewhere; zeroized on drop).
    pub(crate) fn key_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(*self.key)
    }

    /// The suite this cipher implements.
    pub fn suite(&self) -> CipherSuite {
        self.suite
    }

    /// Encrypts `buf` in place and returns the tag.
    ///
    /// # Panics
    /// If `nonce.len()` is not `self.suite().nonce_len()` (a programming error).
    pub fn seal(&self, nonce: &[u8], ad: &[u8], buf: &mut [u8]) -> Tag {
        assert_eq!(
            nonce.len(),
            self.suite.nonce_len(),
            "{} needs a {}-byte nonce",
            self.suite,
            self.suite.nonce_len()
        );
        match self.engine {
            Engine::RingXChaCha => xchacha::ring_seal(&self.key, nonce, ad, buf),
            Engine::RustCryptoXChaCha => xchacha::rustcrypto_seal(&self.key, nonce, ad, buf),
            Engine::LibAegis => aegis256::seal(&self.key, nonce, ad, buf),
        }
    }

    /// Decrypts `buf` in place after checking `tag`. On failure the content of `buf` is
    /// unspecified. A nonce of the wrong length fails like a wrong tag.
    pub fn open(
        &self,
        nonce: &[u8],
        ad: &[u8],
        buf: &mut [u8],
        tag: &Tag,
    ) -> Result<(), AuthError> {
        if nonce.len() != self.suite.nonce_len() {
            return Err(AuthError);
        }
        match self.engine {
            Engine::RingXChaCha => xchacha::ring_open(&self.key, nonce, ad, buf, tag),
            Engine::RustCryptoXChaCha => xchacha::rustcrypto_open(&self.key, nonce, ad, buf, tag),
            Engine::LibAegis => aegis256::open(&self.key, nonce, ad, buf, tag),
        }
    }
}

impl fmt::Debug for SuiteCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SuiteCipher")
            .field("suite", &self.suite)
            .field("engine", &self.engine)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

/// The CPU features that matter to the suites' speed (`qvol benchmark` prints them), each
/// with whether this CPU has it: AES-NI, SSSE3, AVX, AVX2, AVX-512F and SHA-NI on x86_64;
/// NEON, AES, PMULL, SHA2 and SHA3 on aarch64; none elsewhere. Names are lower case
/// (`"aes-ni"`, `"avx2"`), in a fixed order per architecture.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    cpu::features()
}

/// A fresh random nonce of `suite`'s length from the OS CSPRNG, zero-padded to 32 bytes.
///
/// # Panics
/// If the operating system's random source fails, which leaves no safe way to go on.
pub fn random_nonce(suite: CipherSuite) -> [u8; MAX_NONCE_LEN] {
    let mut nonce = [0u8; MAX_NONCE_LEN];
    if let Err(e) = getrandom::getrandom(&mut nonce[..suite.nonce_len()]) {
        panic!("the operating system's random number generator failed: {e}");
    }
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for suite in CipherSuite::ALL {
            assert_eq!(CipherSuite::from_id(suite.id()), Some(suite));
            assert_eq!(suite.name().parse::<CipherSuite>(), Ok(suite));
            assert_eq!(suite.to_string(), suite.name());
        }
        assert_eq!(CipherSuite::from_id(0), None);
        assert_eq!(CipherSuite::from_id(3), None);
        assert!("aes-256-gcm".parse::<CipherSuite>().is_err());
        assert_eq!(CipherSuite::default(), CipherSuite::XChaCha20Poly1305);
    }

    #[test]
    fn debug_is_redacted() {
        let cipher = CipherSuite::Aegis256.cipher(&[0x41; 32]);
        let text = format!("{cipher:?}");
        assert!(text.contains("[REDACTED]"));
        assert!(!text.contains("65"), "{text}");
    }

    #[test]
    fn random_nonces_are_padded_and_differ() {
        for suite in CipherSuite::ALL {
            let a = random_nonce(suite);
            let b = random_nonce(suite);
            assert_ne!(a, b);
            assert!(a[suite.nonce_len()..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn wrong_nonce_length_fails_open() {
        let cipher = CipherSuite::XChaCha20Poly1305.cipher(&[7; 32]);
        let mut buf = [0u8; 8];
        assert_eq!(
            cipher.open(&[0; 12], b"", &mut buf, &[0; 16]),
            Err(AuthError)
        );
    }

    #[test]
    fn cpu_features_agree_with_the_implementations_named() {
        let has = |name: &str| cpu_features().contains(&(name, true));
        let xchacha = CipherSuite::XChaCha20Poly1305.implementation();
        let aegis = CipherSuite::Aegis256.implementation();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(has("avx2"), xchacha.contains("(avx2)"), "{xchacha}");
            assert_eq!(
                has("aes-ni") && has("avx"),
                aegis.contains("aes-ni"),
                "{aegis}"
            );
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(has("neon"), xchacha.contains("(neon)"), "{xchacha}");
            assert_eq!(has("aes"), aegis.contains("armv8 aes"), "{aegis}");
        }
    }

    #[test]
    fn cipher_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SuiteCipher>();
    }
}
