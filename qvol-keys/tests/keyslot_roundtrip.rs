//! Wrap/unwrap round trips for each slot kind, key isolation and tampering.

mod common;

use common::{keystore, PASS, WEAK};
use qvol_keys::keyslot::{self, SlotKind};
use qvol_keys::{ErrorKind, Secret32};

const VOL: [u8; 16] = *b"volume-id-000001";

#[test]
fn recipient_slot_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keystore(dir.path());
    let key = ks.new_key("web01").unwrap();
    let pk = ks.public_key(&key.key_id).unwrap();
    let vk = Secret32::random();
    let slot = keyslot::wrap_for_recipient(&pk, &key.key_id, &VOL, &vk).unwrap();
    let slots = vec![b"not a slot".to_vec(), slot.clone()];
    let (index, got) = keyslot::unwrap_with_keystore(&slots, &ks, &VOL).unwrap();
    assert_eq!(index, 1);
    assert_eq!(got, vk);
    let info = keyslot::describe(&slot).unwrap();
    assert_eq!(info.kind, SlotKind::Recipient);
    assert_eq!(info.key_id.as_deref(), Some(key.key_id.as_str()));
    assert_eq!(info.generation, Some(1));
    assert_eq!(info.fingerprint.as_deref(), Some(key.fingerprint.as_str()));
    assert_eq!(info.kem, Some("ML-KEM-1024+X25519"));
    // Another volume id: the slot does not open.
    let err = keyslot::unwrap_with_keystore(&slots, &ks, b"volume-id-000002").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
}

#[test]
fn passphrase_slot_round_trip_and_wrong_passphrase() {
    let vk = Secret32::random();
    let slot = keyslot::wrap_with_passphrase(PASS, WEAK, &VOL, &vk).unwrap();
    let slots = vec![slot.clone()];
    let (i, got) = keyslot::unwrap_with_passphrase(&slots, PASS, &VOL).unwrap();
    assert_eq!((i, got), (0, vk));
    let err = keyslot::unwrap_with_passphrase(&slots, b"wrong", &VOL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert_eq!(keyslot::describe(&slot).unwrap().kdf, Some(WEAK));
}

#[test]
fn recovery_slot_round_trip() {
    let vk = Secret32::random();
    let (slot, shares) = keyslot::wrap_with_recovery(2, 3, &VOL, &vk).unwrap();
    assert_eq!(shares.len(), 3);
    let slots = vec![slot];
    let (_, got) = keyslot::unwrap_with_recovery(&slots, &shares[1..], &VOL).unwrap();
    assert_eq!(got, vk);
    let err = keyslot::unwrap_with_recovery(&slots, &shares[..1], &VOL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooFewShares);
}

#[test]
fn key_isolation_vm_b_cannot_open_vm_a() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keystore(dir.path());
    let a = ks.new_key("vm-a").unwrap();
    let b = ks.new_key("vm-b").unwrap();
    let vk = Secret32::random();
    let pk_a = ks.public_key(&a.key_id).unwrap();
    let slot = keyslot::wrap_for_recipient(&pk_a, &a.key_id, &VOL, &vk).unwrap();

    // A keystore holding only B (A deleted) finds no slot.
    ks.delete(&a.key_id).unwrap();
    let err = keyslot::unwrap_with_keystore(std::slice::from_ref(&slot), &ks, &VOL).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoMatchingSlot);

    // A slot relabelled to name B (key id and fingerprint) is still A's ciphertext: B's
    // secret key cannot open it.
    let pk_b = ks.public_key(&b.key_id).unwrap();
    let forged_for_b =
        keyslot::wrap_for_recipient(&pk_b, &b.key_id, &VOL, &Secret32::random()).unwrap();
    let mut forged = forged_for_b.clone();
    let ct_start = forged.len() - 72 - 1600;
    let a_ct_start = slot.len() - 72 - 1600;
    forged[ct_start..ct_start + 1600].copy_from_slice(&slot[a_ct_start..a_ct_start + 1600]);
    let tail = forged.len() - 72;
    forged[tail..].copy_from_slice(&slot[slot.len() - 72..]);
    assert!(keyslot::unwrap_with_keystore(&[forged], &ks, &VOL).is_err());
}

#[test]
fn tampering_any_byte_of_a_recipient_slot_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ks = keystore(dir.path());
    let key = ks.new_key("web01").unwrap();
    let pk = ks.public_key(&key.key_id).unwrap();
    let vk = Secret32::random();
    let slot = keyslot::wrap_for_recipient(&pk, &key.key_id, &VOL, &vk).unwrap();
    for i in 0..slot.len() {
        let mut t = slot.clone();
        t[i] ^= 0x01;
        assert!(
            keyslot::unwrap_with_keystore(&[t], &ks, &VOL).is_err(),
            "byte {i} flipped still opens"
        );
    }
    // Truncated and extended slots.
    assert!(keyslot::unwrap_with_keystore(&[slot[..slot.len() - 1].to_vec()], &ks, &VOL).is_err());
    let mut longer = slot.clone();
    longer.push(0);
    assert!(keyslot::unwrap_with_keystore(&[longer], &ks, &VOL).is_err());
}

#[test]
fn tampering_any_byte_of_passphrase_and_recovery_slots_fails() {
    let vk = Secret32::random();
    let slot = keyslot::wrap_with_passphrase(PASS, WEAK, &VOL, &vk).unwrap();
    for i in 0..slot.len() {
        let mut t = slot.clone();
        t[i] ^= 0x80;
        assert!(
            keyslot::unwrap_with_passphrase(&[t], PASS, &VOL).is_err(),
            "byte {i}"
        );
    }
    let (slot, shares) = keyslot::wrap_with_recovery(2, 2, &VOL, &vk).unwrap();
    for i in 0..slot.len() {
        let mut t = slot.clone();
        t[i] ^= 0x80;
        assert!(
            keyslot::unwrap_with_recovery(&[t], &shares, &VOL).is_err(),
            "byte {i}"
        );
    }
}
