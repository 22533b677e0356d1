//! Golden vectors of our own constructions (fixed inputs -> fixed bytes, checked in under
//! tests/data/): the hybrid KEM, keyslot format version 1 (recipient, passphrase and
//! recovery slots), the VM key derivation path and the public key file. An accidental change
//! to any label, layout or derivation fails here; the stored slots must keep opening (old
//! images stay readable) and stored public key files must keep parsing. `QVOL_BLESS=1`
//! rewrites the files.

use qvol_keys::kem::{self, HybridSecretKey};
use qvol_keys::recovery::{self, RecoveryShare};
use qvol_keys::{derive_vm_key_seed, KdfParams, PublicKeyFile, Secret32};
use qvol_keys::{keyslot, ErrorKind};
use serde_json::{json, Value};

const VOLUME_ID: [u8; 16] = *b"golden-volume-01";

fn seq(start: u8) -> [u8; 32] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

fn path(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Compares `actual` with the checked-in file (or writes it under QVOL_BLESS=1).
fn check_golden(name: &str, actual: &Value) -> Value {
    let p = path(name);
    if blessing() {
        std::fs::write(&p, serde_json::to_string_pretty(actual).unwrap() + "\n").unwrap();
    }
    let stored: Value = serde_json::from_slice(
        &std::fs::read(&p).unwrap_or_else(|e| panic!("golden file {p} missing ({e}); bless it")),
    )
    .unwrap();
    for (k, v) in stored.as_object().unwrap() {
        assert_eq!(&actual[k], v, "golden field {k} of {name} changed");
    }
    assert_eq!(
        stored.as_object().unwrap().len(),
        actual.as_object().unwrap().len()
    );
    stored
}

fn blessing() -> bool {
    std::env::var("QVOL_BLESS").as_deref() == Ok("1")
}

fn unhex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

#[test]
fn hybrid_kem_v1() {
    let seed = Secret32::from_bytes(seq(0x00));
    let (m, esk) = (seq(0x40), seq(0x80));
    let sk = HybridSecretKey::from_seed(&seed);
    let pk = sk.public_key();
    let (ct, ss) = kem::encapsulate_deterministic(pk, &m, &esk).unwrap();
    let actual = json!({
        "kem": kem::KEM_NAME,
        "seed": hex::encode(seed.expose()),
        "m": hex::encode(m),
        "x25519_ephemeral_secret": hex::encode(esk),
        "public_key": hex::encode(pk.as_bytes()),
        "public_key_fingerprint": pk.fingerprint_hex(),
        "ciphertext": hex::encode(&ct[..]),
        "shared_secret": hex::encode(ss.expose()),
    });
    let stored = check_golden("hybrid-kem-v1.golden.json", &actual);
    // The stored ciphertext decapsulates to the stored secret.
    let got = sk.decapsulate(&unhex(&stored["ciphertext"])).unwrap();
    assert_eq!(
        hex::encode(got.expose()),
        stored["shared_secret"].as_str().unwrap()
    );
}

#[test]
fn keyslot_v1_and_derivation() {
    let vk = Secret32::from_bytes(seq(0xa0));
    let sk = HybridSecretKey::from_seed(&Secret32::from_bytes(seq(0x10)));
    let mut randomness = [0u8; 88];
    randomness
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = 0x55 ^ i as u8);
    let recipient = keyslot::wrap_for_recipient_deterministic(
        sk.public_key(),
        "golden-vm-0011aabb",
        3,
        &VOLUME_ID,
        &vk,
        &randomness,
    )
    .unwrap();
    let weak = KdfParams::insecure_for_tests();
    let passphrase = keyslot::wrap_with_passphrase_deterministic(
        b"golden passphrase",
        weak,
        &VOLUME_ID,
        &vk,
        &[0x77; 16],
        &[0x99; 24],
    )
    .unwrap();
    let master = Secret32::from_bytes(seq(0xc0));
    let vm_seed = derive_vm_key_seed(&master, "web01", "web01-0011aabb", 2);
    let vm_pk = HybridSecretKey::from_seed(&vm_seed)
        .public_key()
        .fingerprint_hex();
    let actual = json!({
        "volume_id": hex::encode(VOLUME_ID),
        "volume_key": hex::encode(vk.expose()),
        "recipient_key_seed": hex::encode(seq(0x10)),
        "recipient_randomness": hex::encode(randomness),
        "recipient_slot": hex::encode(&recipient),
        "passphrase": "golden passphrase",
        "passphrase_slot": hex::encode(&passphrase),
        "master_seed": hex::encode(master.expose()),
        "vm_key_seed_web01_gen2": hex::encode(vm_seed.expose()),
        "vm_key_fingerprint_web01_gen2": vm_pk,
    });
    let stored = check_golden("keyslot-v1.golden.json", &actual);
    // Stored slots still open and describe themselves.
    let slots = vec![
        unhex(&stored["passphrase_slot"]),
        unhex(&stored["recipient_slot"]),
    ];
    let (i, got) = keyslot::unwrap_with_secret_key(&slots, &sk, &VOLUME_ID).unwrap();
    assert_eq!((i, &got), (1, &vk));
    let (i, got) =
        keyslot::unwrap_with_passphrase(&slots, b"golden passphrase", &VOLUME_ID).unwrap();
    assert_eq!((i, &got), (0, &vk));
    let info = keyslot::describe(&slots[1]).unwrap();
    assert_eq!(info.key_id.as_deref(), Some("golden-vm-0011aabb"));
    assert_eq!(info.generation, Some(3));
    assert_eq!(
        info.to_string(),
        format!(
            "recipient (v1): key golden-vm-0011aabb generation 3, {}",
            kem::KEM_NAME
        )
    );
}

#[test]
fn recovery_keyslot_v1() {
    let vk = Secret32::from_bytes(seq(0xa0));
    let recovery_key = Secret32::from_bytes(seq(0x30));
    let set_id = *b"golden01";
    let nonce = [0x66; 24];
    let shamir_seed = seq(0x70);
    let (slot, shares) = keyslot::wrap_with_recovery_deterministic(
        2,
        3,
        &VOLUME_ID,
        &vk,
        &recovery_key,
        set_id,
        &nonce,
        &shamir_seed,
    )
    .unwrap();
    let actual = json!({
        "volume_id": hex::encode(VOLUME_ID),
        "volume_key": hex::encode(vk.expose()),
        "recovery_key": hex::encode(recovery_key.expose()),
        "share_set_id": hex::encode(set_id),
        "nonce": hex::encode(nonce),
        "shamir_seed": hex::encode(shamir_seed),
        "threshold": 2,
        "shares_made": 3,
        "recovery_slot": hex::encode(&slot),
        "shares": shares.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    let stored = check_golden("keyslot-v1-recovery.golden.json", &actual);
    // The stored shares parse, recombine to the recovery key, and open the stored slot in
    // any pair; one alone is too few.
    let stored_shares: Vec<RecoveryShare> = stored["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(stored_shares.len(), 3);
    let slots = vec![unhex(&stored["recovery_slot"])];
    for pair in [[0, 1], [0, 2], [2, 1]] {
        let two = [
            stored_shares[pair[0]].clone(),
            stored_shares[pair[1]].clone(),
        ];
        let key = recovery::combine(&[&two[0], &two[1]], 2).unwrap();
        assert_eq!(key, recovery_key);
        let (i, got) = keyslot::unwrap_with_recovery(&slots, &two, &VOLUME_ID).unwrap();
        assert_eq!((i, &got), (0, &vk));
    }
    assert_eq!(
        keyslot::unwrap_with_recovery(&slots, &stored_shares[..1], &VOLUME_ID)
            .unwrap_err()
            .kind(),
        ErrorKind::TooFewShares
    );
    assert_eq!(
        keyslot::describe(&slots[0]).unwrap().to_string(),
        "recovery (v1): 2 of 3 shares, set 676f6c64656e3031"
    );
}

#[test]
fn public_key_file_v1() {
    let sk = HybridSecretKey::from_seed(&Secret32::from_bytes(seq(0x10)));
    let file = PublicKeyFile {
        key_id: "golden-vm-0011aabb".into(),
        vm: "golden-vm".into(),
        generation: 3,
        public_key: sk.public_key().clone().with_generation(3),
    };
    let actual = file.to_json();
    let p = path("public-key-v1.golden.json");
    if blessing() {
        std::fs::write(&p, &actual).unwrap();
    }
    let stored =
        std::fs::read(&p).unwrap_or_else(|e| panic!("golden file {p} missing ({e}); bless it"));
    assert_eq!(
        String::from_utf8_lossy(&stored),
        actual,
        "the public key file format changed"
    );
    let parsed = PublicKeyFile::parse(&stored).unwrap();
    assert_eq!(parsed.key_id, "golden-vm-0011aabb");
    assert_eq!(parsed.vm, "golden-vm");
    assert_eq!(parsed.generation, 3);
    assert_eq!(&parsed.public_key, sk.public_key());
    // The key is the recipient of the golden recipient slot.
    assert_eq!(
        parsed.public_key.fingerprint_hex(),
        HybridSecretKey::from_seed(&Secret32::from_bytes(seq(0x10)))
            .public_key()
            .fingerprint_hex()
    );
    // A slot wrapped for the parsed file names its key and generation and opens with the
    // secret key.
    let vk = Secret32::from_bytes(seq(0xa0));
    let slot =
        keyslot::wrap_for_recipient(&parsed.public_key, &parsed.key_id, &VOLUME_ID, &vk).unwrap();
    let info = keyslot::describe(&slot).unwrap();
    assert_eq!(info.key_id.as_deref(), Some("golden-vm-0011aabb"));
    assert_eq!(info.generation, Some(3));
    let (_, got) = keyslot::unwrap_with_secret_key(&[slot], &sk, &VOLUME_ID).unwrap();
    assert_eq!(got, vk);
}
