//! Named crash points for the kill -9 tests: with the `failpoints` feature (off in normal
//! builds), a process whose `QVOL_FAILPOINT` environment variable names a point aborts
//! there, leaving its completed writes in the page cache as kill -9 would.

/// Aborts the process if `QVOL_FAILPOINT` is `name` (feature `failpoints` only; a no-op
/// otherwise).
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var_os("QVOL_FAILPOINT").is_some_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
