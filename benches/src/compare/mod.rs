//! The end-to-end comparison (issue 6): the same libblkio client (`integration::client`,
//! shared with the end-to-end tests) drives every backend with the same workloads (`run`);
//! the backend's CPU time and memory are read from /proc.

pub mod backend;
pub mod disksync;
pub mod machine;
pub mod procstat;
pub mod report;
pub mod run;
pub mod workload;
