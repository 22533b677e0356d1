//! `vhost-qvol`: the vhost-user-blk backend daemon.
fn main() {}
