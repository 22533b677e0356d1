//! Re-encryption (FORMAT.md §17): the data of the live disk and of every snapshot moves to a
//! new, independent volume key; reads stay right throughout, and the old key opens nothing
//! afterwards.

mod common;

use std::sync::Arc;

use common::{assert_kind, key, pattern, BlockHistory};
use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{CipherSuite, ErrorKind, OpenOptions, Volume};

const SIZE: u64 = 16 << 20;

fn open_with(st: &Arc<dyn Storage>, k: u8, read_only: bool) -> qvol_core::Result<Volume> {
    Volume::open(st.clone(), &key(k), read_only)
}

/// Snapshot names with their whole content.
type Snaps = Vec<(String, Vec<u8>)>;

/// A volume with data in the live disk and in two snapshots (shared and not).
fn populated(suite: CipherSuite) -> (Arc<dyn Storage>, BlockHistory, Snaps) {
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let vol = Volume::create(st.clone(), common::options(SIZE, suite), &key(1)).expect("create");
    let mut model = BlockHistory::new(SIZE);
    let mut snaps = Vec::new();
    for round in 0..3u64 {
        for i in 0..200u64 {
            let lbn = (i * 37 + round * 11) % (SIZE / 4096);
            let data = pattern(round * 1000 + i, 4096);
            vol.write_at(lbn * 4096, &data).expect("write");
            model.apply(lbn * 4096, &data);
        }
        if round < 2 {
            let name = format!("s{round}");
            vol.create_snapshot(&name).expect("snapshot");
            let mut image = vec![0u8; SIZE as usize];
            vol.read_at(0, &mut image).expect("read");
            snaps.push((name, image));
        }
    }
    vol.close().expect("close");
    (st, model, snaps)
}

fn check_snapshots(st: &Arc<dyn Storage>, k: u8, snaps: &[(String, Vec<u8>)]) {
    for (name, image) in snaps {
        let view = Volume::open_with(
            st.clone(),
            &key(k),
            OpenOptions {
                read_only: true,
                snapshot: Some(name.clone()),
                ..OpenOptions::default()
            },
        )
        .expect("open the snapshot");
        let mut got = vec![0u8; SIZE as usize];
        view.read_at(0, &mut got).expect("read the snapshot");
        assert!(got == *image, "snapshot {name} reads back");
    }
}

fn reencrypt(vol: &Volume, new: u8, suite: CipherSuite) {
    let slots = vol.keyslots();
    vol.start_reencryption(&key(new), suite, &slots, &vol.keyslots_hash())
        .expect("start");
}

#[test]
fn everything_moves_to_the_new_key_and_reads_the_same_throughout() {
    for (from, to) in [
        (
            CipherSuite::XChaCha20Poly1305,
            CipherSuite::XChaCha20Poly1305,
        ),
        (CipherSuite::XChaCha20Poly1305, CipherSuite::Aegis256),
    ] {
        let (st, mut model, snaps) = populated(from);
        let old_image = {
            let mut b = vec![0u8; st.len().unwrap() as usize];
            st.read_exact_at(&mut b, 0).unwrap();
            b
        };
        let vol = open_with(&st, 1, false).expect("open");
        reencrypt(&vol, 2, to);
        let r = vol.reencryption().expect("in progress");
        assert_eq!((r.from_epoch, r.to_epoch, r.done), (0, 1, 0));
        assert_eq!((r.from_suite, r.to_suite), (from, to));
        assert_eq!(vol.data_suite(), to);
        model
            .check_current(&vol)
            .expect("reads right after the start");
        let mut steps = 0;
        while let Some(p) = vol.reencrypt_step(3).expect("step") {
            steps += 1;
            assert!(p.done <= p.total);
            // The guest keeps writing meanwhile.
            let lbn = (steps * 13) % (SIZE / 4096);
            let data = pattern(50_000 + steps, 4096);
            vol.write_at(lbn * 4096, &data)
                .expect("write while re-encrypting");
            model.apply(lbn * 4096, &data);
            model.check_current(&vol).expect("reads right during");
            if steps == 2 {
                // A crash (the open state is dropped) in the middle: either key opens it.
                drop(vol.close());
                for k in [1, 2] {
                    let v = open_with(&st, k, true).expect("either key opens mid-way");
                    model.check_current(&v).expect("reads right after a reopen");
                    assert!(v.reencryption().is_some());
                }
                break;
            }
        }
        let vol = open_with(&st, 2, false).expect("open with the new key");
        while vol.reencrypt_step(5).expect("step").is_some() {}
        assert!(vol.reencryption().is_none());
        assert_kind(
            vol.reencrypt_step(1),
            ErrorKind::InvalidInput,
            "nothing to resume",
        );
        model.check_current(&vol).expect("reads right after");
        let report = vol.check(&mut |_, _| {}).expect("check");
        assert!(report.is_clean(), "{report:#?}");
        vol.close().expect("close");
        assert_kind(open_with(&st, 1, true), ErrorKind::WrongKey, "the old key");
        check_snapshots(&st, 2, &snaps);
        // Put the old header area (header and keyslots) back: the old key still opens
        // nothing.
        st.write_all_at(&old_image[..9 * 4096], 0).unwrap();
        assert!(open_with(&st, 1, true).is_err(), "old header, old key");
        // No block the old key sealed is left in the file: every old data block position
        // is now a new block or a hole.
        let layout = common::layout::Layout::read(&old_image);
        let now = {
            let mut b = vec![0u8; st.len().unwrap() as usize];
            st.read_exact_at(&mut b, 0).unwrap();
            b
        };
        let mut same = 0;
        for lbn in 0..SIZE / 4096 {
            if let Some(pbn) = layout.pbn_of(lbn) {
                let at = (pbn * 4096) as usize;
                if now.len() >= at + 4096 && now[at..at + 4096] == old_image[at..at + 4096] {
                    same += 1;
                }
            }
        }
        assert_eq!(same, 0, "old ciphertext left in the file");
    }
}

#[test]
fn bad_requests_change_nothing() {
    let (st, model, _) = populated(CipherSuite::XChaCha20Poly1305);
    let vol = open_with(&st, 1, false).expect("open");
    let slots = vol.keyslots();
    assert_kind(
        vol.start_reencryption(&key(2), CipherSuite::Aegis256, &slots, &[0; 32]),
        ErrorKind::Refused,
        "a stale keyslot hash",
    );
    assert_kind(
        vol.start_reencryption(
            &key(2),
            CipherSuite::Aegis256,
            &[Vec::new()],
            &vol.keyslots_hash(),
        ),
        ErrorKind::InvalidInput,
        "no keyslot left",
    );
    assert_kind(
        vol.reencrypt_step(1),
        ErrorKind::InvalidInput,
        "nothing to resume",
    );
    reencrypt(&vol, 2, CipherSuite::XChaCha20Poly1305);
    assert_kind(
        vol.start_reencryption(&key(3), CipherSuite::Aegis256, &slots, &vol.keyslots_hash()),
        ErrorKind::InvalidInput,
        "a second start",
    );
    model.check_current(&vol).expect("reads");
    drop(vol);
    let ro = open_with(&st, 2, true).expect("open read-only");
    assert_kind(ro.reencrypt_step(1), ErrorKind::InvalidInput, "read-only");
}

#[test]
fn a_sealed_key_must_come_from_a_holder_of_the_key() {
    let (st, model, _) = populated(CipherSuite::XChaCha20Poly1305);
    let vol = open_with(&st, 1, false).expect("open");
    let slots = vol.keyslots();
    let vid = vol.info().volume_id;
    let nonce = [7u8; 16];
    let forged =
        qvol_core::seal_key_for_reencryption(&key(9), vid, &nonce, &slots, &key(2)).unwrap();
    assert_kind(
        vol.start_reencryption_sealed(
            &forged,
            &nonce,
            CipherSuite::Aegis256,
            &slots,
            &vol.keyslots_hash(),
        ),
        ErrorKind::Refused,
        "sealed by another key",
    );
    let sealed =
        qvol_core::seal_key_for_reencryption(&key(1), vid, &nonce, &slots, &key(2)).unwrap();
    assert_kind(
        vol.start_reencryption_sealed(
            &sealed,
            &[8; 16],
            CipherSuite::Aegis256,
            &slots,
            &vol.keyslots_hash(),
        ),
        ErrorKind::Refused,
        "another nonce",
    );
    vol.start_reencryption_sealed(
        &sealed,
        &nonce,
        CipherSuite::Aegis256,
        &slots,
        &vol.keyslots_hash(),
    )
    .expect("sealed by the key holder");
    let (mut steps, mut bytes) = (0, 0);
    while let Some(p) = vol.reencrypt_step(1).expect("step") {
        assert!(p.step_bytes <= 64 * 4096, "a step of one leaf: {p:?}");
        steps += 1;
        bytes += p.step_bytes;
    }
    assert!(
        steps > 1 && bytes > 0,
        "{steps} steps re-sealed {bytes} bytes"
    );
    model.check_current(&vol).expect("reads");
    vol.close().expect("close");
    open_with(&st, 2, true).expect("the new key opens it");
}

/// After a re-encryption, a stream carries the new key epoch: a full stream makes a new image
/// at that epoch (opened with the new key), an old replica refuses an incremental with one
/// sentence, and a volume mid-way sends nothing.
#[test]
fn streams_follow_the_key_epoch() {
    use qvol_core::{read_stream_head, send_snapshot};
    let send = |st: &Arc<dyn Storage>, name: &str, from: Option<&str>| {
        let mut out = Vec::new();
        send_snapshot(&**st, name, from, &mut out, &mut |_| {}).map(|_| out)
    };
    let receive = |st: &Arc<dyn Storage>, stream: &[u8], k: u8, new: bool| {
        let mut r: &[u8] = stream;
        let (head, hash) = read_stream_head(&mut r)?;
        let vol = if new {
            Volume::create(st.clone(), head.create_options()?, &key(k))?
        } else {
            open_with(st, k, false)?
        };
        vol.receive(&head, hash, &mut r, false, &mut |_| {})?;
        vol.close()
    };
    let (st, model, _) = populated(CipherSuite::XChaCha20Poly1305);
    let replica: Arc<dyn Storage> = Arc::new(MemStorage::new());
    receive(&replica, &send(&st, "s0", None).expect("send s0"), 1, true).expect("seed");
    let vol = open_with(&st, 1, false).expect("open");
    reencrypt(&vol, 2, CipherSuite::Aegis256);
    vol.reencrypt_step(1).expect("step");
    vol.create_snapshot("mid").expect("snapshot mid-way");
    drop(vol.close());
    assert_kind(send(&st, "s1", None), ErrorKind::Refused, "send mid-way");
    let vol = open_with(&st, 2, false).expect("open");
    while vol.reencrypt_step(64).expect("step").is_some() {}
    vol.close().expect("close");
    let incremental = send(&st, "s1", Some("s0")).expect("send after");
    let err = receive(&replica, &incremental, 1, false).expect_err("old replica");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.to_string().contains("key epoch"), "{err}");
    let fresh: Arc<dyn Storage> = Arc::new(MemStorage::new());
    receive(&fresh, &send(&st, "mid", None).expect("send mid"), 2, true).expect("full");
    let got = open_with(&fresh, 2, true).expect("open the copy with the new key");
    model
        .check_current(&got)
        .expect("the copy reads as the original did");
}

/// A block changed behind the volume's back is never laundered into a valid one: the step
/// that reaches it fails with `Integrity`, the block keeps failing, every other block reads.
#[test]
fn a_damaged_block_stops_the_reencryption_instead_of_being_resealed() {
    let (st, model, _) = populated(CipherSuite::XChaCha20Poly1305);
    let image = {
        let mut b = vec![0u8; st.len().unwrap() as usize];
        st.read_exact_at(&mut b, 0).unwrap();
        b
    };
    let layout = common::layout::Layout::read(&image);
    let victim = (0..SIZE / 4096)
        .find(|&lbn| layout.pbn_of(lbn).is_some())
        .expect("a written block");
    let pbn = layout.pbn_of(victim).unwrap();
    let mut byte = [0u8; 1];
    st.read_exact_at(&mut byte, pbn * 4096 + 100).unwrap();
    st.write_all_at(&[byte[0] ^ 1], pbn * 4096 + 100).unwrap();
    let vol = open_with(&st, 1, false).expect("open");
    reencrypt(&vol, 2, CipherSuite::XChaCha20Poly1305);
    let err = loop {
        match vol.reencrypt_step(64) {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the re-encryption finished over a damaged block"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    drop(vol);
    let vol = open_with(&st, 2, true).expect("reopen");
    assert!(vol.reencryption().is_some(), "still in progress");
    assert_kind(
        common::read_block(&vol, victim),
        ErrorKind::Integrity,
        "the damaged block",
    );
    for lbn in (0..SIZE / 4096).filter(|&l| l != victim) {
        assert_eq!(
            common::read_block(&vol, lbn).expect("read"),
            model.current(lbn as usize),
            "block {lbn}"
        );
    }
}
