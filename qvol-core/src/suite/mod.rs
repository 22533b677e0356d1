//! Cipher suites for data blocks (DESIGN.md decision 3).
