//! vhost-qvol: glue between qvol-core (the volume engine), qvol-keys (keystore, KEM,
//! keyslots) and vhost-user-blk. Both binaries, `vhost-qvol` and `qvol`, are thin layers
//! over the modules here.

pub mod paths;
