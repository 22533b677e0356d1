//! qvol-core: the `.qvol` format, cipher suites, block map, commit protocol and the
//! `Volume` API. Knows nothing of virtio or of key storage.
#![forbid(unsafe_code)]

pub mod storage;
pub mod suite;
