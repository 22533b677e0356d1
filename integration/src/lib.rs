//! End-to-end test support for qvol: find (and build) the binaries, make temporary
//! keystores and images with the `qvol` CLI, run `vhost-qvol`, and talk to it through
//! libblkio (`client`), a virtio-blk frontend nobody here wrote.
//!
//! The tests in `tests/` need the workspace binaries: see [`bins`] (they are built on
//! first use with `cargo build -p vhost-qvol --bins`).

pub mod background;
pub mod bins;
pub mod ceph;
pub mod client;
pub mod crash;
pub mod daemon;
pub mod fixture;
pub mod guest;
pub mod inproc;
pub mod pattern;
pub mod rootfs;
