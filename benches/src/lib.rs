//! benches support code.
