//! The end-to-end comparison (issue 6): the same libblkio client drives every backend with
//! the same workloads; the backend's CPU time and memory are read from /proc.

pub mod backend;
pub mod client;
pub mod machine;
pub mod procstat;
pub mod report;
pub mod workload;
