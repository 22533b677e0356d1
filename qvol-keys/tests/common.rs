//! Helpers shared by the integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use qvol_keys::{KdfParams, Keystore, UnlockedKeystore};

/// Fast argon2id parameters: tests must stay quick.
pub const WEAK: KdfParams = KdfParams::insecure_for_tests();
pub const PASS: &[u8] = b"correct horse battery staple";

/// A fresh keystore with a passphrase, unlocked.
pub fn keystore(dir: &Path) -> UnlockedKeystore {
    Keystore::init(dir, Some(PASS), WEAK)
        .unwrap()
        .unlock(Some(PASS))
        .unwrap()
}

/// Every file under `dir` with its bytes: to prove a failed operation changed nothing.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
}

/// Creates a FIFO at `path` (mkfifo(1)).
pub fn make_fifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}
