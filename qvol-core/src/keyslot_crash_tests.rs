//! Crash safety of keyslot changes (FORMAT.md §3.1): a change (add, remove, replace,
//! replace all) is cut after every possible number of storage operations, by a process
//! crash (every completed write kept) and by power losses (any unsynced subset kept, torn
//! at sector granularity). The image must then open, read-only and writable, with exactly
//! the old slots or exactly the new ones, and its data must read back unchanged.

use std::sync::Arc;

use crate::layout::*;
use crate::storage::{CrashStorage, FaultConfig, FaultStorage, OpKinds, Storage};
use crate::{read_header, CipherSuite, CreateOptions, ErrorKind, Volume, VolumeKey};

fn key() -> VolumeKey {
    VolumeKey::from_bytes([0x24; 32])
}

fn slots(spec: &[(usize, u8, usize)]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new(); MAX_KEYSLOTS];
    for &(i, byte, len) in spec {
        out[i] = vec![byte; len];
    }
    out
}

/// A volume with `old` slots and some data, on a crash storage; returns its bytes.
fn base_image(old: &[Vec<u8>]) -> Vec<u8> {
    let st = Arc::new(CrashStorage::new());
    let opts = CreateOptions {
        key_epoch: 0,
        size: 8 << 20,
        suite: CipherSuite::XChaCha20Poly1305,
        name: "slots".into(),
        volume_id: [0x33; 16],
        keyslots: old.to_vec(),
        compression: None,
    };
    let vol = Volume::create(st.clone(), opts, &key()).unwrap();
    vol.write_at(8192, &data()).unwrap();
    vol.close().unwrap();
    st.durable_image()
}

fn data() -> Vec<u8> {
    (0..3 * BS).map(|i| (i * 31 % 251) as u8).collect()
}

/// Opens `bytes` read-only then writable; asserts the slots are `old` or `new` (the same
/// both times, and after the writable open settled them) and the data reads back.
fn check(bytes: Vec<u8>, old: &[Vec<u8>], new: &[Vec<u8>], what: &str) -> bool {
    let st = Arc::new(CrashStorage::from_bytes(bytes));
    let ro = Volume::open(st.clone(), &key(), true)
        .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
    let seen = ro.keyslots();
    assert!(
        seen == old || seen == new,
        "{what}: slots are neither the old nor the new set"
    );
    let keyless = read_header(&*st).unwrap().keyslots;
    assert_eq!(keyless, seen, "{what}: the keyless header read disagrees");
    drop(ro);
    let rw = Volume::open(st.clone(), &key(), false)
        .unwrap_or_else(|e| panic!("{what}: writable open failed: {e}"));
    let settled = rw.keyslots();
    assert!(
        settled == seen,
        "{what}: a writable open settled on another set than readers saw"
    );
    let mut buf = vec![0u8; 3 * BS];
    rw.read_at(8192, &mut buf).unwrap();
    assert_eq!(buf, data(), "{what}: data changed");
    rw.close().unwrap();
    // Settled: a plain reopen sees the same set, and the area is committed (no stage).
    let again = Volume::open(st.clone(), &key(), true).unwrap();
    assert_eq!(
        again.keyslots(),
        settled,
        "{what}: the settled set did not stick"
    );
    assert_eq!(
        again.superblock().staged_keyslots,
        0,
        "{what}: still staged"
    );
    settled == new
}

fn crash_everywhere(old: Vec<Vec<u8>>, new: Vec<Vec<u8>>, label: &str) {
    let base = base_image(&old);
    let mut completed = false;
    let mut n = 0u64;
    while !completed {
        let crash = Arc::new(CrashStorage::from_bytes(base.clone()));
        let fault = Arc::new(FaultStorage::new(crash.clone(), FaultConfig::never()));
        let vol = Volume::open(fault.clone() as Arc<dyn Storage>, &key(), false).unwrap();
        fault.set_config(FaultConfig {
            fail_after: n,
            count: OpKinds::MUTATIONS,
            fail: OpKinds::ALL,
            tear_failed_writes: true,
        });
        completed = vol.set_keyslots(&new).is_ok();
        drop(vol);
        let what = format!("{label}, cut after {n} operations");
        let mut saw_new = check(crash.process_crash().live_image(), &old, &new, &what);
        for seed in 0..6 {
            saw_new |= check(
                crash.crash_image_for(seed),
                &old,
                &new,
                &format!("{what}, power loss {seed}"),
            );
        }
        if completed {
            assert!(
                saw_new,
                "{label}: a completed change must keep the new slots"
            );
        }
        n += 1;
        assert!(n < 200, "{label}: the change never completed");
    }
}

impl CrashStorage {
    fn crash_image_for(&self, seed: u64) -> Vec<u8> {
        self.crash(seed).durable_image()
    }
}

#[test]
fn adding_a_slot_survives_any_crash() {
    crash_everywhere(
        slots(&[(0, 1, 1700)]),
        slots(&[(0, 1, 1700), (1, 2, 1700)]),
        "add",
    );
}

#[test]
fn removing_a_slot_survives_any_crash() {
    crash_everywhere(
        slots(&[(0, 1, 1700), (3, 2, 90)]),
        slots(&[(3, 2, 90)]),
        "remove",
    );
}

#[test]
fn replacing_every_slot_survives_any_crash() {
    crash_everywhere(
        slots(&[(0, 1, 1700), (1, 2, 900), (7, 3, 4000)]),
        slots(&[(0, 4, 1800), (1, 5, 90), (2, 6, 3000)]),
        "replace",
    );
}

#[test]
fn a_tampered_area_or_stage_is_refused() {
    let old = slots(&[(0, 1, 100)]);
    let base = base_image(&old);
    // The area edited behind the volume's back: refused.
    let mut edited = base.clone();
    edited[KEYSLOT_OFFSET as usize + 10] ^= 1;
    let st = Arc::new(CrashStorage::from_bytes(edited));
    assert_eq!(
        Volume::open(st, &key(), true).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    // A change cut right after its staging commit (before the area is rewritten), then
    // both the area and the staged copy edited: nothing vouches for either.
    let new = slots(&[(0, 1, 100), (1, 9, 100)]);
    let mut n = 0;
    let (image, stage_at) = loop {
        let c = Arc::new(CrashStorage::from_bytes(base.clone()));
        let f = Arc::new(FaultStorage::new(c.clone(), FaultConfig::never()));
        let v = Volume::open(f.clone() as Arc<dyn Storage>, &key(), false).unwrap();
        f.set_config(FaultConfig {
            fail_after: n,
            count: OpKinds::MUTATIONS,
            fail: OpKinds::ALL,
            tear_failed_writes: false,
        });
        let _ = v.set_keyslots(&new);
        drop(v);
        let img = c.process_crash().live_image();
        let staged = SUPERBLOCK_OFFSETS
            .iter()
            .map(|&o| crate::Superblock::decode(&img[o as usize..o as usize + 512]).unwrap())
            .max_by_key(|sb| sb.generation)
            .unwrap()
            .staged_keyslots;
        if staged != 0 {
            break (img, staged);
        }
        n += 1;
        assert!(n < 100, "the change never staged");
    };
    // As cut, it opens (with the old or the new set).
    check(image.clone(), &old, &new, "cut after staging");
    let mut bad = image;
    bad[KEYSLOT_OFFSET as usize + 5] ^= 0xff;
    bad[(stage_at * BLOCK_SIZE) as usize + 5] ^= 0xff;
    let st = Arc::new(CrashStorage::from_bytes(bad));
    assert_eq!(
        Volume::open(st, &key(), true).unwrap_err().kind(),
        ErrorKind::Integrity
    );
}

#[test]
fn keyslot_changes_need_a_writable_volume_and_fit_the_area() {
    let old = slots(&[(0, 1, 100)]);
    let st = Arc::new(CrashStorage::from_bytes(base_image(&old)));
    let ro = Volume::open(st.clone(), &key(), true).unwrap();
    assert_eq!(
        ro.set_keyslots(&old).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    drop(ro);
    let rw = Volume::open(st.clone(), &key(), false).unwrap();
    assert_eq!(
        rw.set_keyslots(&vec![vec![1u8]; 9]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        rw.set_keyslots(&[vec![0u8; MAX_KEYSLOT_LEN + 1]])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(rw.keyslots(), old, "a refused change changed nothing");
    let len_before = st.len().unwrap();
    rw.set_keyslots(&slots(&[(5, 7, 10)])).unwrap();
    assert_eq!(rw.keyslots(), slots(&[(5, 7, 10)]));
    assert_eq!(st.len().unwrap(), len_before, "the staged copy was removed");
    rw.close().unwrap();
}

#[test]
fn a_damaged_area_opens_only_for_a_restore_that_replaces_it() {
    let old = slots(&[(0, 1, 100), (2, 3, 50)]);
    let mut bytes = base_image(&old);
    bytes[KEYSLOT_OFFSET as usize + 2 * KEYSLOT_SIZE + 9] ^= 0x40;
    let st = Arc::new(CrashStorage::from_bytes(bytes));
    assert_eq!(
        Volume::open(st.clone(), &key(), false).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    let vol = Volume::open_with(
        st.clone(),
        &key(),
        crate::OpenOptions {
            accept_any_keyslot_area: true,
            ..crate::OpenOptions::default()
        },
    )
    .expect("a restore may open it");
    vol.set_keyslots(&old).unwrap();
    vol.close().unwrap();
    let again = Volume::open(st, &key(), true).expect("restored: opens normally");
    assert_eq!(again.keyslots(), old);
    let mut buf = vec![0u8; 3 * BS];
    again.read_at(8192, &mut buf).unwrap();
    assert_eq!(buf, data());
}

#[test]
fn a_checked_change_needs_the_key_the_nonce_and_the_current_state() {
    let old = slots(&[(0, 1, 100)]);
    let st = Arc::new(CrashStorage::from_bytes(base_image(&old)));
    let vol = Volume::open(st, &key(), false).unwrap();
    let new = slots(&[(0, 1, 100), (1, 2, 50)]);
    let now = vol.keyslots_hash();
    let suite = CipherSuite::XChaCha20Poly1305;
    let nonce = [9u8; 16];
    let proof = crate::keyslot_change_proof(&key(), suite, [0x33; 16], &nonce, &now, &new).unwrap();
    let other_key = VolumeKey::from_bytes([0x25; 32]);
    let forged =
        crate::keyslot_change_proof(&other_key, suite, [0x33; 16], &nonce, &now, &new).unwrap();
    for (n, expected, proof, what) in [
        (nonce, now, forged, "a proof made with another key"),
        (nonce, [7; 32], proof, "a stale expected hash"),
        ([8; 16], now, proof, "another nonce"),
    ] {
        assert_eq!(
            vol.set_keyslots_checked(&new, &n, &expected, &proof)
                .unwrap_err()
                .kind(),
            ErrorKind::Refused,
            "{what}"
        );
        assert_eq!(vol.keyslots(), old, "{what} changed nothing");
    }
    vol.set_keyslots_checked(&new, &nonce, &now, &proof)
        .unwrap();
    assert_eq!(vol.keyslots(), new);
    // The same request again, on the new state: refused (it names the old hash).
    assert_eq!(
        vol.set_keyslots_checked(&new, &nonce, &now, &proof)
            .unwrap_err()
            .kind(),
        ErrorKind::Refused
    );
    let (listed, hash) = vol.keyslots_with_hash();
    assert_eq!(listed, vol.keyslots());
    assert_eq!(hash, vol.keyslots_hash());
    let challenge = [5u8; 32];
    assert_eq!(
        vol.prove_key(&challenge),
        crate::key_holder_proof(&key(), suite, [0x33; 16], &challenge)
    );
    assert_ne!(
        vol.prove_key(&challenge),
        crate::key_holder_proof(&other_key, suite, [0x33; 16], &challenge)
    );
}

#[test]
fn an_unlocking_slot_outside_the_verified_area_refuses_the_open_before_any_write() {
    let old = slots(&[(0, 1, 100)]);
    let bytes = base_image(&old);
    let st = Arc::new(CrashStorage::from_bytes(bytes.clone()));
    let open = |slot: (usize, Vec<u8>)| {
        Volume::open_with(
            st.clone(),
            &key(),
            crate::OpenOptions {
                unlocked_slot: Some(slot),
                ..crate::OpenOptions::default()
            },
        )
    };
    let err = open((1, vec![1; 100])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    let err = open((0, vec![2; 100])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(
        st.live_image() == bytes,
        "a refused open wrote to the image"
    );
    open((0, vec![1; 100])).expect("the slot the area holds opens it");
}
