//! Nothing a file can hold makes the parsers panic: arbitrary keyslots, shares and export
//! files are refused with an error. Round trips hold for arbitrary keys and volume ids.

mod common;

use common::{PASS, WEAK};
use proptest::prelude::*;
use qvol_keys::keyslot;
use qvol_keys::{RecoveryShare, Secret32};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_slots_are_refused_not_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = keyslot::describe(&bytes);
        let slots = vec![bytes];
        prop_assert!(keyslot::unwrap_with_passphrase(&slots, PASS, &[0; 16]).is_err());
        prop_assert!(keyslot::unwrap_with_recovery(&slots, &[], &[0; 16]).is_err());
    }

    #[test]
    fn slot_header_with_arbitrary_body(kind in 1u8..=3, body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut slot = b"QVKS\x01".to_vec();
        slot.push(kind);
        slot.extend_from_slice(&(body.len() as u16).to_le_bytes());
        slot.extend_from_slice(&body);
        slot.extend_from_slice(&[0u8; 72]);
        let _ = keyslot::describe(&slot);
        prop_assert!(keyslot::unwrap_with_recovery(&[slot], &[], &[0; 16]).is_err());
    }

    #[test]
    fn arbitrary_share_text_is_refused(text in "\\PC*") {
        let _ = text.parse::<RecoveryShare>();
        let prefixed = format!("qvol-share-v1-{text}");
        let _ = prefixed.parse::<RecoveryShare>();
    }

    #[test]
    fn passphrase_slot_round_trip(vk in any::<[u8; 32]>(), vol in any::<[u8; 16]>()) {
        let vk = Secret32::from_bytes(vk);
        let slot = keyslot::wrap_with_passphrase(PASS, WEAK, &vol, &vk).unwrap();
        prop_assert!(slot.len() <= 4092);
        let (_, got) = keyslot::unwrap_with_passphrase(&[slot], PASS, &vol).unwrap();
        prop_assert_eq!(got, vk);
    }
}

#[test]
fn recipient_slot_with_longest_key_id_fits_a_header_slot() {
    use qvol_keys::kem::HybridSecretKey;
    let sk = HybridSecretKey::from_seed(&Secret32::random());
    let id = "k".repeat(keyslot::MAX_KEY_ID_LEN);
    let slot =
        keyslot::wrap_for_recipient(sk.public_key(), &id, &[0; 16], &Secret32::random()).unwrap();
    assert!(slot.len() <= 4092, "{} bytes", slot.len());
    let too_long = "k".repeat(keyslot::MAX_KEY_ID_LEN + 1);
    assert!(
        keyslot::wrap_for_recipient(sk.public_key(), &too_long, &[0; 16], &Secret32::random())
            .is_err()
    );
}

#[test]
fn import_of_arbitrary_json_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ks = common::keystore(dir.path());
    for junk in [
        &b""[..],
        b"{}",
        b"[]",
        b"null",
        b"{\"format\":\"qvol-key-export\",\"version\":1}",
    ] {
        assert!(ks.import_key(junk, b"x").is_err());
    }
}
