//! qvol-keys: the keystore, the hybrid ML-KEM-1024 + X25519 KEM and keyslots.
//! Knows nothing of block I/O.
#![forbid(unsafe_code)]
