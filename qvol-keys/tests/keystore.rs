//! Keystore life cycle: init/unlock, rotation, export/import, deletion, and the negative
//! cases (each with its error kind, and no file changed).

mod common;

use common::{keystore, snapshot, PASS, WEAK};
use qvol_keys::keyslot;
use qvol_keys::{ErrorKind, Keystore, Secret32, VolumeState};

const VOL: [u8; 16] = [7; 16];

#[test]
fn init_open_unlock_and_wrong_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let ks_dir = dir.path().join("ks");
    let ks = Keystore::init(&ks_dir, Some(PASS), WEAK).unwrap();
    assert!(ks.needs_passphrase());
    assert!(ks.kdf_duration().is_some());
    assert_eq!(ks.kdf_params(), Some(WEAK));
    let before = snapshot(&ks_dir);

    let ks = Keystore::open(&ks_dir).unwrap();
    let err = ks.unlock(Some(b"wrong")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert_eq!(
        err.to_string(),
        "the passphrase does not unlock the keystore"
    );
    assert_eq!(
        ks.unlock(None).unwrap_err().kind(),
        ErrorKind::WrongPassphrase
    );
    // A second init is refused.
    let err = Keystore::init(&ks_dir, Some(PASS), WEAK).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(snapshot(&ks_dir), before, "failed operations changed files");
    ks.unlock(Some(PASS)).unwrap();
}

#[test]
fn no_passphrase_keystore() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::init(dir.path(), None, WEAK).unwrap();
    assert!(!ks.needs_passphrase());
    let u = Keystore::open(dir.path()).unwrap().unlock(None).unwrap();
    let k = u.new_key("vm1").unwrap();
    assert_eq!(u.show(&k.key_id).unwrap(), k);
    assert_eq!(
        Keystore::init(dir.path(), None, WEAK).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        Keystore::init(empty.path(), Some(b""), WEAK)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn truncated_or_foreign_keystore_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let key = u.new_key("web01").unwrap();
    let main = dir.path().join("keystore.json");
    let good = std::fs::read(&main).unwrap();

    for (bad, kind) in [
        (good[..good.len() / 2].to_vec(), ErrorKind::Corrupt),
        (
            b"{\"format\":\"something-else\"}".to_vec(),
            ErrorKind::Corrupt,
        ),
        (b"\x7fELF\x02\x01\x01".to_vec(), ErrorKind::Corrupt),
        (Vec::new(), ErrorKind::Corrupt),
    ] {
        std::fs::write(&main, &bad).unwrap();
        let before = snapshot(dir.path());
        assert_eq!(Keystore::open(dir.path()).unwrap_err().kind(), kind);
        assert_eq!(snapshot(dir.path()), before);
    }
    // A sealed seed with one byte changed: refused, reported as a wrong passphrase (the AEAD
    // cannot tell the two apart).
    let text = String::from_utf8(good.clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ct = v["sealed_seed"]["ciphertext"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        if ct.starts_with('0') { "1" } else { "0" },
        &ct[1..]
    );
    std::fs::write(&main, text.replace(ct, &flipped)).unwrap();
    let err = Keystore::open(dir.path())
        .unwrap()
        .unlock(Some(PASS))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    // Lowered KDF parameters in the file are authenticated too.
    let weaker = text.replace("\"t_cost\": 1", "\"t_cost\": 2");
    assert_ne!(weaker, text);
    std::fs::write(&main, weaker).unwrap();
    assert!(Keystore::open(dir.path())
        .unwrap()
        .unlock(Some(PASS))
        .is_err());
    std::fs::write(&main, &good).unwrap();

    // A truncated key record, and a key record from another keystore.
    let rec = dir.path().join("keys").join(format!("{}.json", key.key_id));
    let rec_good = std::fs::read(&rec).unwrap();
    std::fs::write(&rec, &rec_good[..rec_good.len() - 10]).unwrap();
    // Keystore version 2: the manifest's hash catches it first.
    assert_eq!(
        u.show(&key.key_id).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    std::fs::write(&rec, &rec_good).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let foreign = other.new_key("web01").unwrap();
    let foreign_rec = other_dir
        .path()
        .join("keys")
        .join(format!("{}.json", foreign.key_id));
    std::fs::copy(
        &foreign_rec,
        dir.path()
            .join("keys")
            .join(format!("{}.json", foreign.key_id)),
    )
    .unwrap();
    let err = u.public_key(&foreign.key_id).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("not listed"), "{err}");
}

#[test]
fn new_list_show_validation() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let a = u.new_key("vm-a").unwrap();
    let b = u.new_key("vm-b").unwrap();
    assert_eq!(a.key_type, "ML-KEM-1024+X25519");
    assert_eq!(
        (a.generation, a.rotation_count, a.last_rotated.clone()),
        (1, 0, None)
    );
    assert_eq!(
        a.fingerprint,
        u.public_key(&a.key_id).unwrap().fingerprint_hex()
    );
    let ids: Vec<String> = u.list().unwrap().into_iter().map(|k| k.key_id).collect();
    assert_eq!(ids, vec![a.key_id.clone(), b.key_id.clone()]);
    let before = snapshot(dir.path());
    for bad in [
        "",
        "a/b",
        "../x",
        ".hidden",
        "-x",
        &"v".repeat(49),
        "sp ace",
    ] {
        assert_eq!(
            u.new_key(bad).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{bad:?}"
        );
    }
    for bad in ["nope", "../keystore", "a/b", ""] {
        assert_eq!(
            u.show(bad).unwrap_err().kind(),
            ErrorKind::NotFound,
            "{bad:?}"
        );
    }
    assert_eq!(snapshot(dir.path()), before);
    // Two keys of one VM are different key pairs.
    let a2 = u.new_key("vm-a").unwrap();
    assert_ne!(a2.fingerprint, a.fingerprint);
}

#[cfg(unix)]
#[test]
fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ks_dir = dir.path().join("ks");
    let u = Keystore::init(&ks_dir, Some(PASS), WEAK)
        .unwrap()
        .unlock(Some(PASS))
        .unwrap();
    let k = u.new_key("vm").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ks_dir), 0o700);
    assert_eq!(mode(&ks_dir.join("keys")), 0o700);
    assert_eq!(mode(&ks_dir.join("keystore.json")), 0o600);
    assert_eq!(
        mode(&ks_dir.join("keys").join(format!("{}.json", k.key_id))),
        0o600
    );
}

#[test]
fn rotation_keeps_old_generations_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    let vk1 = Secret32::random();
    let pk1 = u.public_key(&k.key_id).unwrap();
    assert_eq!(pk1.generation(), 1);
    let slot1 = keyslot::wrap_for_recipient(&pk1, &k.key_id, &VOL, &vk1).unwrap();

    let r = u.rotate(&k.key_id).unwrap();
    assert_eq!((r.generation, r.rotation_count), (2, 1));
    assert!(r.last_rotated.is_some());
    assert_ne!(r.fingerprint, k.fingerprint);
    let pk2 = u.public_key(&k.key_id).unwrap();
    assert_eq!(pk2.generation(), 2);
    let vk2 = Secret32::random();
    let slot2 = keyslot::wrap_for_recipient(&pk2, &k.key_id, &VOL, &vk2).unwrap();
    assert_eq!(keyslot::describe(&slot2).unwrap().generation, Some(2));

    // Both generations open.
    assert_eq!(
        keyslot::unwrap_with_keystore(std::slice::from_ref(&slot1), &u, &VOL)
            .unwrap()
            .1,
        vk1
    );
    assert_eq!(
        keyslot::unwrap_with_keystore(std::slice::from_ref(&slot2), &u, &VOL)
            .unwrap()
            .1,
        vk2
    );

    // The current generation cannot be removed; generation 1 can, then its slot is closed.
    let before = snapshot(dir.path());
    assert_eq!(
        u.remove_generation(&k.key_id, 2).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        u.remove_generation(&k.key_id, 9).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(snapshot(dir.path()), before);
    u.remove_generation(&k.key_id, 1).unwrap();
    assert_eq!(
        keyslot::unwrap_with_keystore(&[slot1], &u, &VOL)
            .unwrap_err()
            .kind(),
        ErrorKind::NoMatchingSlot
    );
    assert_eq!(
        keyslot::unwrap_with_keystore(&[slot2], &u, &VOL).unwrap().1,
        vk2
    );
}

#[test]
fn delete_then_new_key_for_same_vm_does_not_resurrect() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    let slot = keyslot::wrap_for_recipient(
        &u.public_key(&k.key_id).unwrap(),
        &k.key_id,
        &VOL,
        &Secret32::random(),
    )
    .unwrap();
    u.delete(&k.key_id).unwrap();
    assert_eq!(u.show(&k.key_id).unwrap_err().kind(), ErrorKind::NotFound);
    let k2 = u.new_key("web01").unwrap();
    assert_ne!(k2.fingerprint, k.fingerprint);
    assert!(keyslot::unwrap_with_keystore(&[slot], &u, &VOL).is_err());
}

#[test]
fn export_import_across_two_keystores() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = keystore(a_dir.path());
    let b = keystore(b_dir.path());
    let k = a.new_key("web01").unwrap();
    let vk1 = Secret32::random();
    let slot1 =
        keyslot::wrap_for_recipient(&a.public_key(&k.key_id).unwrap(), &k.key_id, &VOL, &vk1)
            .unwrap();
    a.rotate(&k.key_id).unwrap();
    let vk2 = Secret32::random();
    let slot2 =
        keyslot::wrap_for_recipient(&a.public_key(&k.key_id).unwrap(), &k.key_id, &VOL, &vk2)
            .unwrap();

    let export = a.export_key(&k.key_id, b"export pass", WEAK).unwrap();
    let text = String::from_utf8(export.clone()).unwrap();
    assert!(text.contains(&k.key_id) && !text.contains("sealed_seed"));

    // Negative cases first: no file of B changes.
    let before = snapshot(b_dir.path());
    let err = b.import_key(&export, b"wrong pass").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    let tampered = text.replace("\"web01\"", "\"web02\"");
    assert_ne!(tampered, text);
    assert!(b.import_key(tampered.as_bytes(), b"export pass").is_err());
    assert_eq!(
        b.import_key(&export[..export.len() / 2], b"export pass")
            .unwrap_err()
            .kind(),
        ErrorKind::Corrupt
    );
    assert!(keyslot::unwrap_with_keystore(std::slice::from_ref(&slot1), &b, &VOL).is_err());
    assert_eq!(snapshot(b_dir.path()), before);

    let imported = b.import_key(&export, b"export pass").unwrap();
    assert_eq!(imported.key_id, k.key_id);
    assert_eq!(imported.fingerprint, a.show(&k.key_id).unwrap().fingerprint);
    assert!(imported.generations.iter().all(|g| g.imported));
    assert_eq!(
        b.import_key(&export, b"export pass").unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );

    // B opens volumes wrapped on A, both generations, and B's own public key matches A's.
    assert_eq!(
        keyslot::unwrap_with_keystore(&[slot1], &b, &VOL).unwrap().1,
        vk1
    );
    assert_eq!(
        keyslot::unwrap_with_keystore(&[slot2], &b, &VOL).unwrap().1,
        vk2
    );
    assert_eq!(
        b.public_key(&k.key_id).unwrap(),
        a.public_key(&k.key_id).unwrap()
    );
    // After a reopen too (seeds sealed under B's storage key).
    let b2 = Keystore::open(b_dir.path())
        .unwrap()
        .unlock(Some(PASS))
        .unwrap();
    assert_eq!(b2.show(&k.key_id).unwrap(), imported);
    // Rotation on B continues from B's master seed.
    let r = b2.rotate(&k.key_id).unwrap();
    assert_eq!(r.generation, 3);
    assert!(!r.generations.last().unwrap().imported);
}

#[test]
fn volume_records_detect_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let vol = [0x42; 16];
    let st = |generation: u64| VolumeState {
        generation,
        root_id: [generation as u8; 32],
    };
    let key = u.new_key("web01").unwrap().key_id;
    assert_eq!(
        u.volume_guard(&vol).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    u.register_volume(&vol, &key, &st(5)).unwrap();
    let g = u.volume_guard(&vol).unwrap();
    g.check(&st(5)).unwrap();
    let before = snapshot(dir.path());
    let err = g.check(&st(4)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rollback);
    assert_eq!(g.record(&st(3)).unwrap_err().kind(), ErrorKind::Rollback);
    assert_eq!(snapshot(dir.path()), before);
    g.record(&st(7)).unwrap();
    g.check(&st(7)).unwrap();
    // A newer image than the record is fine (the record may lag).
    g.check(&st(9)).unwrap();

    // Lowering the number in the file is caught by its MAC.
    let path = dir
        .path()
        .join("volumes")
        .join(format!("{}.json", hex::encode(vol)));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"generation\": 7", "\"generation\": 2"),
    )
    .unwrap();
    assert_eq!(g.check(&st(7)).unwrap_err().kind(), ErrorKind::Integrity);
    // So is a record from another keystore.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let other_key = other.new_key("web01").unwrap().key_id;
    other.register_volume(&vol, &other_key, &st(1)).unwrap();
    std::fs::copy(
        other_dir
            .path()
            .join("volumes")
            .join(format!("{}.json", hex::encode(vol))),
        &path,
    )
    .unwrap();
    assert_eq!(g.check(&st(7)).unwrap_err().kind(), ErrorKind::Integrity);
    u.forget_volume(&vol).unwrap();
    assert_eq!(
        u.volume_guard(&vol).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn change_passphrase_keeps_keys() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    let slot = keyslot::wrap_for_recipient(
        &u.public_key(&k.key_id).unwrap(),
        &k.key_id,
        &VOL,
        &Secret32::random(),
    )
    .unwrap();
    let before = snapshot(dir.path());
    assert_eq!(
        u.change_passphrase(Some(b""), WEAK).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(snapshot(dir.path()), before);
    u.change_passphrase(Some(b"new pass"), WEAK).unwrap();
    let ks = Keystore::open(dir.path()).unwrap();
    assert_eq!(
        ks.unlock(Some(PASS)).unwrap_err().kind(),
        ErrorKind::WrongPassphrase
    );
    let u2 = ks.unlock(Some(b"new pass")).unwrap();
    assert_eq!(u2.show(&k.key_id).unwrap(), k);
    assert!(keyslot::unwrap_with_keystore(std::slice::from_ref(&slot), &u2, &VOL).is_ok());
    u2.change_passphrase(None, WEAK).unwrap();
    let u3 = Keystore::open(dir.path()).unwrap().unlock(None).unwrap();
    assert!(keyslot::unwrap_with_keystore(&[slot], &u3, &VOL).is_ok());
}
