//! What the running CPU offers, to report which code path the suites take.
//!
//! ring and libaegis each detect CPU features themselves; these functions look at the same
//! features so that `qvol info` and the logs can say which path is active.

/// The fast XChaCha20-Poly1305 path on this CPU.
pub(super) fn xchacha_fast_implementation() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            return "ring chacha20-poly1305 + hchacha20 (avx2)";
        }
        if std::arch::is_x86_feature_detected!("ssse3") {
            return "ring chacha20-poly1305 + hchacha20 (ssse3)";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return "ring chacha20-poly1305 + hchacha20 (neon)";
        }
    }
    "ring chacha20-poly1305 + hchacha20 (generic)"
}

/// The AEGIS-256 path libaegis takes on this CPU.
pub(super) fn aegis_implementation() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("avx")
        {
            // libaegis takes its AES-NI path only when AVX is there too.
            return "libaegis aegis-256 (aes-ni+avx)";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            return "libaegis aegis-256 (armv8 aes)";
        }
    }
    "libaegis aegis-256 (software aes)"
}

/// The CPU features worth knowing for the suites' speed (AES for aegis-256, the vector
/// extensions for ChaCha20, SHA for the key code's hashing), and whether this CPU has each,
/// in a fixed order per architecture (none on other architectures).
pub(super) fn features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        vec![
            ("aes-ni", has!("aes")),
            ("ssse3", has!("ssse3")),
            ("avx", has!("avx")),
            ("avx2", has!("avx2")),
            ("avx-512f", has!("avx512f")),
            ("sha-ni", has!("sha")),
        ]
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        vec![
            ("neon", has!("neon")),
            ("aes", has!("aes")),
            ("pmull", has!("pmull")),
            ("sha2", has!("sha2")),
            ("sha3", has!("sha3")),
        ]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}
