//! Keystore version 2: the manifest, random generation seeds, volume records with binding
//! and root id, the pinned protection mode, the upgrade from version 1, argon2id bounds,
//! skipped bad slots and redacted Debug output. The attacker can write the keystore
//! directory but not decrypt it.

mod common;

use std::path::{Path, PathBuf};

use common::{keystore, PASS, WEAK};
use qvol_keys::kem::HybridSecretKey;
use qvol_keys::{
    derive_vm_key_seed, keyslot, ErrorKind, KdfParams, Keystore, Secret32, VolumeState,
};

const VOL: [u8; 16] = [0x42; 16];

fn st(generation: u64, root: u8) -> VolumeState {
    VolumeState {
        generation,
        root_id: [root; 32],
    }
}

fn reopen(dir: &Path) -> qvol_keys::Result<qvol_keys::UnlockedKeystore> {
    Keystore::open(dir)?.unlock(Some(PASS))
}

fn key_file(dir: &Path, id: &str) -> PathBuf {
    dir.join("keys").join(format!("{id}.json"))
}

fn vol_file(dir: &Path, vol: &[u8; 16]) -> PathBuf {
    dir.join("volumes")
        .join(format!("{}.json", hex::encode(vol)))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn assert_integrity_naming(err: qvol_keys::Error, file: &Path) {
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err} does not name {}",
        file.display()
    );
}

#[test]
fn manifest_refuses_added_edited_and_removed_key_records() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let rec = key_file(d, &k.key_id);
    let good = std::fs::read(&rec).unwrap();
    drop(u);
    reopen(d).unwrap();

    // Edited (one character of metadata).
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(
        &rec,
        text.replace("\"rotation_count\": 0", "\"rotation_count\": 1"),
    )
    .unwrap();
    assert_integrity_naming(reopen(d).unwrap_err(), &rec);
    std::fs::write(&rec, &good).unwrap();

    // Removed.
    std::fs::remove_file(&rec).unwrap();
    assert_integrity_naming(reopen(d).unwrap_err(), &rec);
    std::fs::write(&rec, &good).unwrap();

    // Added: a record from another keystore, or a copy under another name.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let f = other.new_key("web01").unwrap();
    let added = key_file(d, &f.key_id);
    std::fs::copy(key_file(other_dir.path(), &f.key_id), &added).unwrap();
    assert_integrity_naming(reopen(d).unwrap_err(), &added);
    std::fs::remove_file(&added).unwrap();

    // A forged manifest line is caught by the MAC.
    let man = d.join("manifest.json");
    let m = std::fs::read_to_string(&man).unwrap();
    std::fs::write(&man, m.replace("\"counter\": ", "\"counter\": 1")).unwrap();
    let err = reopen(d).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("manifest.json"), "{err}");
    std::fs::write(&man, m).unwrap();
    let u = reopen(d).unwrap();
    assert_eq!(u.list().unwrap().len(), 1);
}

#[test]
fn volume_records_unlisted_deleted_put_back_and_forked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let b = u.register_volume(&VOL, &k.key_id, &st(5, 1)).unwrap();
    assert_eq!(
        (b.key_id.as_str(), b.vm.as_str()),
        (k.key_id.as_str(), "web01")
    );
    assert_eq!(
        u.register_volume(&VOL, &k.key_id, &st(5, 1))
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    let g = u.volume_guard(&VOL).unwrap();
    assert_eq!(g.binding(), &b);
    g.check(&st(5, 1)).unwrap();
    g.record(&st(6, 2)).unwrap();
    let rec = vol_file(d, &VOL);
    let at6 = std::fs::read(&rec).unwrap();

    // Forked history: same generation, another root id.
    let err = g.check(&st(6, 9)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rollback);
    assert!(err.to_string().contains("forked"), "{err}");
    // Older than recorded.
    assert_eq!(g.check(&st(5, 1)).unwrap_err().kind(), ErrorKind::Rollback);

    // Put back an older record file: the floor (raised at open) still catches it.
    g.record(&st(9, 3)).unwrap();
    u.raise_volume_floor(&VOL, &st(9, 3)).unwrap();
    assert_eq!(
        u.raise_volume_floor(&VOL, &st(8, 3)).unwrap_err().kind(),
        ErrorKind::Rollback
    );
    std::fs::write(&rec, &at6).unwrap();
    let fresh = reopen(d).unwrap().volume_guard(&VOL).unwrap();
    assert_eq!(
        fresh.check(&st(6, 2)).unwrap_err().kind(),
        ErrorKind::Rollback
    );
    assert_eq!(
        fresh.check(&st(9, 4)).unwrap_err().kind(),
        ErrorKind::Rollback
    );
    fresh.check(&st(9, 3)).unwrap();

    // A record edited by hand fails its MAC.
    let text = String::from_utf8(at6.clone()).unwrap();
    std::fs::write(
        &rec,
        text.replace("\"generation\": 6", "\"generation\": 60"),
    )
    .unwrap();
    assert_integrity_naming(fresh.check(&st(60, 2)).unwrap_err(), &rec);
    assert_integrity_naming(reopen(d).unwrap_err(), &rec);
    std::fs::write(&rec, &at6).unwrap();

    // Deleted record: the guard and unlock refuse.
    std::fs::remove_file(&rec).unwrap();
    assert_integrity_naming(fresh.check(&st(9, 3)).unwrap_err(), &rec);
    assert_integrity_naming(fresh.record(&st(10, 3)).unwrap_err(), &rec);
    assert_integrity_naming(reopen(d).unwrap_err(), &rec);
    std::fs::write(&rec, &at6).unwrap();

    // An unlisted record (copied from another keystore, or made up) is refused at unlock.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let ok = other.new_key("x").unwrap();
    let vol2 = [0x43; 16];
    other.register_volume(&vol2, &ok.key_id, &st(1, 1)).unwrap();
    let stray = vol_file(d, &vol2);
    std::fs::copy(vol_file(other_dir.path(), &vol2), &stray).unwrap();
    assert_integrity_naming(reopen(d).unwrap_err(), &stray);
    let err = u.volume_guard(&vol2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("qvol volume adopt IMAGE"), "{err}");
    // forget_volume cleans it up.
    u.forget_volume(&vol2).unwrap();
    assert!(!stray.exists());
    let u = reopen(d).unwrap();
    assert_eq!(u.volumes_of_key(&k.key_id).unwrap(), vec![b.clone()]);
    u.forget_volume(&VOL).unwrap();
    assert!(u.volumes_of_key(&k.key_id).unwrap().is_empty());
    assert_eq!(
        u.volume_guard(&VOL).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    reopen(d).unwrap();
}

#[test]
fn volume_guard_holds_no_master_seed_and_works_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ks = Keystore::init(d, None, WEAK).unwrap();
    let u = ks.unlock(None).unwrap();
    let k = u.new_key("vm").unwrap();
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    let g = u.volume_guard(&VOL).unwrap();
    drop(u);
    drop(ks);
    g.record(&st(2, 2)).unwrap();
    g.check(&st(2, 2)).unwrap();
    let text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("keystore.json")).unwrap()).unwrap();
    let seed = text["seed"].as_str().unwrap();
    let dbg = format!("{g:?}");
    assert!(dbg.contains("[REDACTED]") && !dbg.contains(seed), "{dbg}");
    let u = Keystore::open(d).unwrap().unlock(None).unwrap();
    u.volume_guard(&VOL).unwrap().check(&st(2, 2)).unwrap();
}

#[test]
fn debug_of_secret_types_is_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::init(dir.path(), None, WEAK).unwrap();
    let text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("keystore.json")).unwrap()).unwrap();
    let seed = text["seed"].as_str().unwrap().to_owned();
    let u = ks.unlock(None).unwrap();
    let master = Secret32::from_slice(&hex::decode(&seed).unwrap()).unwrap();
    let opened = Keystore::open(dir.path()).unwrap();
    for dbg in [
        format!("{ks:?}"),
        format!("{opened:?}"),
        format!("{u:?}"),
        format!("{master:?}"),
        format!("{:?}", HybridSecretKey::from_seed(&master)),
    ] {
        assert!(!dbg.contains(&seed), "{dbg}");
        assert!(!dbg.contains(&seed[..16]), "{dbg}");
        assert!(dbg.contains("REDACTED"), "{dbg}");
    }
}

#[test]
fn passphrase_given_to_an_unprotected_keystore_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Keystore::init(dir.path(), None, WEAK).unwrap();
    let err = Keystore::open(dir.path())
        .unwrap()
        .unlock(Some(PASS))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert!(
        err.to_string()
            .contains("not protected by a passphrase but one was given"),
        "{err}"
    );
}

#[test]
fn replaced_keystore_json_is_refused() {
    // Another keystore.json (another seed): the manifest MAC fails.
    let dir = tempfile::tempdir().unwrap();
    keystore(dir.path()).new_key("web01").unwrap();
    let other = tempfile::tempdir().unwrap();
    keystore(other.path());
    std::fs::copy(
        other.path().join("keystore.json"),
        dir.path().join("keystore.json"),
    )
    .unwrap();
    let err = reopen(dir.path()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(
        err.to_string().contains("manifest.json fails its MAC"),
        "{err}"
    );

    // An unprotected keystore.json with the right seed in place of the protected one (the
    // passphrase-less downgrade): refused because the manifest pins the protection mode.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = Keystore::init(d, None, WEAK).unwrap().unlock(None).unwrap();
    let plain = std::fs::read(d.join("keystore.json")).unwrap();
    u.change_passphrase(Some(PASS), WEAK).unwrap();
    reopen(d).unwrap();
    std::fs::write(d.join("keystore.json"), plain).unwrap();
    let err = Keystore::open(d).unwrap().unlock(None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("keystore.json"), "{err}");

    // A version 2 keystore.json relabelled as version 1 does not open (version in the AD).
    let dir = tempfile::tempdir().unwrap();
    keystore(dir.path());
    let p = dir.path().join("keystore.json");
    let t = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, t.replace("\"version\": 2", "\"version\": 1")).unwrap();
    let ks = Keystore::open(dir.path()).unwrap();
    assert_eq!(
        ks.unlock(Some(PASS)).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        ks.upgrade(Some(PASS)).unwrap_err().kind(),
        ErrorKind::WrongPassphrase
    );
}

#[test]
fn deleted_keys_are_crypto_erased() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = Keystore::init(d, None, WEAK).unwrap().unlock(None).unwrap();
    let text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("keystore.json")).unwrap()).unwrap();
    let master =
        Secret32::from_slice(&hex::decode(text["seed"].as_str().unwrap()).unwrap()).unwrap();
    let k = u.new_key("web01").unwrap();
    let r = u.rotate(&k.key_id).unwrap();
    let vk = Secret32::random();
    let slot = keyslot::wrap_for_recipient(&u.public_key(&k.key_id).unwrap(), &k.key_id, &VOL, &vk)
        .unwrap();
    let saved = std::fs::read(key_file(d, &k.key_id)).unwrap();
    u.delete(&k.key_id).unwrap();
    // The master seed alone does not give back any generation.
    for (g, fp) in [(1, &k.fingerprint), (2, &r.fingerprint)] {
        let derived = derive_vm_key_seed(&master, "web01", &k.key_id, g);
        assert_ne!(
            &HybridSecretKey::from_seed(&derived)
                .public_key()
                .fingerprint_hex(),
            fp
        );
    }
    // Putting the deleted record back is refused (not listed).
    std::fs::write(key_file(d, &k.key_id), saved).unwrap();
    assert_eq!(
        keyslot::unwrap_with_keystore(&[slot], &u, &VOL)
            .unwrap_err()
            .kind(),
        ErrorKind::NoMatchingSlot
    );
    assert_integrity_naming(
        Keystore::open(d).unwrap().unlock(None).unwrap_err(),
        &key_file(d, &k.key_id),
    );
}

#[test]
fn remove_generation_and_delete_refuse_bound_keys() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    u.rotate(&k.key_id).unwrap();
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    for err in [
        u.remove_generation_checked(&k.key_id, 1, false)
            .unwrap_err(),
        u.remove_generation(&k.key_id, 1).unwrap_err(),
        u.delete_checked(&k.key_id, false).unwrap_err(),
        u.delete(&k.key_id).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::InUse);
        assert!(err.to_string().contains(&hex::encode(VOL)), "{err}");
    }
    u.remove_generation_checked(&k.key_id, 1, true).unwrap();
    assert_eq!(u.show(&k.key_id).unwrap().generations.len(), 1);
    u.delete_checked(&k.key_id, true).unwrap();
    assert_eq!(u.show(&k.key_id).unwrap_err().kind(), ErrorKind::NotFound);
    reopen(dir.path()).unwrap();
}

#[test]
fn argon2id_parameters_are_bounded() {
    for (m, t, p, ok) in [
        (256 * 1024, 3, 4, true),
        (2 * 1024 * 1024, 4, 4, true),
        (2 * 1024 * 1024 + 1, 1, 1, false),
        (64, 17, 1, false),
        (1024, 1, 17, false),
        (2 * 1024 * 1024, 5, 1, false),
        (64, 0, 1, false),
    ] {
        let k = KdfParams {
            m_cost_kib: m,
            t_cost: t,
            p_cost: p,
        };
        assert_eq!(k.validate().is_ok(), ok, "{k:?}");
    }
}

#[test]
fn garbage_and_out_of_range_slots_are_skipped() {
    let vk = Secret32::random();
    let good = keyslot::wrap_with_passphrase(b"pw", WEAK, &VOL, &vk).unwrap();
    // A passphrase slot whose m_cost is 4 GiB: skipped without running argon2id.
    let mut huge = good.clone();
    huge[9..13].copy_from_slice(&(4u32 * 1024 * 1024).to_le_bytes());
    let garbage = b"QVKS\x01\x02garbage".to_vec();
    let slots = vec![garbage, huge, good];
    let (i, got) = keyslot::unwrap_with_passphrase(&slots, b"pw", &VOL).unwrap();
    assert_eq!((i, got), (2, vk));

    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    let vk = Secret32::random();
    let slot = keyslot::wrap_for_recipient(&u.public_key(&k.key_id).unwrap(), &k.key_id, &VOL, &vk)
        .unwrap();
    let mut bad = slot.clone();
    bad[3] ^= 1;
    let (i, got) = keyslot::unwrap_with_keystore(&[bad, vec![0; 10], slot], &u, &VOL).unwrap();
    assert_eq!((i, got), (2, vk));
}

#[test]
fn concurrent_writers_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    keystore(dir.path());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let d = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let u = reopen(&d).unwrap();
                for j in 0..3 {
                    u.new_key(&format!("vm{i}{j}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(reopen(dir.path()).unwrap().list().unwrap().len(), 12);
}

fn golden_v1(name: &str) -> (tempfile::TempDir, serde_json::Value) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&data.join(name), tmp.path());
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join(format!("{name}.expected.json"))).unwrap())
            .unwrap();
    (tmp, expected)
}

#[test]
fn v1_keystores_are_refused_then_upgraded() {
    for (name, pass) in [
        ("v1-keystore-nopass", None),
        ("v1-keystore-pass", Some(&b"golden v1 passphrase"[..])),
    ] {
        let (tmp, expected) = golden_v1(name);
        let d = tmp.path();
        let ks = Keystore::open(d).unwrap();
        assert_eq!(ks.version(), 1);
        let err = ks.unlock(pass).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("`qvol keystore upgrade`"), "{err}");
        if pass.is_some() {
            assert_eq!(
                ks.upgrade(Some(b"wrong")).unwrap_err().kind(),
                ErrorKind::WrongPassphrase
            );
            assert!(!d.join("manifest.json").exists());
        }
        ks.upgrade(pass).unwrap();
        // Rerunnable.
        let ks = Keystore::open(d).unwrap();
        assert_eq!(ks.version(), 2);
        ks.upgrade(pass).unwrap();
        let u = Keystore::open(d).unwrap().unlock(pass).unwrap();
        let keys = u.list().unwrap();
        assert_eq!(keys.len(), expected.as_object().unwrap().len());
        for k in &keys {
            let e = &expected[&k.key_id];
            assert_eq!(k.vm, e["vm"].as_str().unwrap());
            assert_eq!(
                u.public_key(&k.key_id).unwrap().fingerprint_hex(),
                e["current"]
            );
            let fps: Vec<&str> = k
                .generations
                .iter()
                .map(|g| g.fingerprint.as_str())
                .collect();
            let want: Vec<&str> = e["generations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(fps, want);
        }
        // The v1 volume record: unknown binding, generation kept, adoptable.
        let vol = [0x11; 16];
        let g = u.volume_guard(&vol).unwrap();
        assert_eq!(g.binding().key_id, "");
        assert_eq!(g.check(&st(6, 1)).unwrap_err().kind(), ErrorKind::Rollback);
        g.check(&st(7, 1)).unwrap();
        let web = keys.iter().find(|k| k.vm == "web01").unwrap();
        assert_eq!(
            u.adopt_volume(&vol, &web.key_id, &st(6, 1))
                .unwrap_err()
                .kind(),
            ErrorKind::Rollback
        );
        let b = u.adopt_volume(&vol, &web.key_id, &st(8, 1)).unwrap();
        assert_eq!(b.key_id, web.key_id);
        assert_eq!(
            u.adopt_volume(&vol, &web.key_id, &st(9, 1))
                .unwrap_err()
                .kind(),
            ErrorKind::AlreadyExists
        );
        // Rotating a v1 (derived) key gives a random generation; all still open.
        let r = u.rotate(&web.key_id).unwrap();
        assert_eq!(r.generations.len(), 3);
        let u = Keystore::open(d).unwrap().unlock(pass).unwrap();
        assert_eq!(u.volume_guard(&vol).unwrap().binding(), &b);
        assert_eq!(u.volumes_of_key(&web.key_id).unwrap(), vec![b]);
    }
}
