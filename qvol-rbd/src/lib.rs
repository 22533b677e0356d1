//! qvol volumes on Ceph RBD: [`RbdImage`], a [`qvol_core::storage::Storage`] on librbd,
//! named `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE` ([`RbdName`]) wherever an image path is accepted.
//!
//! librados and librbd are loaded at run time (`ffi.rs`): this crate builds and every other
//! image kind works on a machine without Ceph; opening an `rbd:` image there fails with
//! one sentence naming the package to install.
//!
//! Durability: librbd's writeback cache is turned off ([`cluster::FORCED`]), so a write
//! this storage acknowledged is in the OSDs' journals and survives kill -9 of the process
//! and the loss of the host (docs/FORMAT.md §11).

mod cluster;
mod error;
mod ffi;
mod image;
mod name;

pub use cluster::{CephOptions, Cluster, Pool, DEFAULT_CONF, DEFAULT_ID, FORCED, TIMEOUTS};
pub use image::{RbdImage, GROW_STEP};
pub use name::{RbdName, PREFIX};

/// Whether librados and librbd can be loaded here; `Err` is the sentence saying what to
/// install.
pub fn available() -> Result<(), String> {
    ffi::api().map(|_| ())
}
