//! Keystore version 2: the manifest, random generation seeds, volume records with binding
//! and root id, the pinned protection mode, the upgrade from version 1, argon2id bounds,
//! skipped bad slots and redacted Debug output. The attacker can write the keystore
//! directory but not decrypt it.

mod common;

use std::path::{Path, PathBuf};

use common::{keystore, snapshot, PASS, WEAK};
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

/// The key record `rec` of `id` is damaged: unlock works and reports it, `show`, `list`,
/// `public_key` and `rotate` fail naming the file, the other key `ok` keeps working.
fn assert_key_refused(d: &Path, id: &str, rec: &Path, ok: &str) {
    let u = reopen(d).unwrap();
    assert!(
        u.damaged_entries()
            .iter()
            .any(|e| e.contains(&rec.display().to_string())),
        "{:?}",
        u.damaged_entries()
    );
    assert_integrity_naming(u.show(id).unwrap_err(), rec);
    assert_integrity_naming(u.list().unwrap_err(), rec);
    assert_integrity_naming(u.public_key(id).unwrap_err(), rec);
    assert_integrity_naming(u.rotate(id).unwrap_err(), rec);
    assert_integrity_naming(u.export_key(id, b"export pass", WEAK).unwrap_err(), rec);
    u.show(ok).unwrap();
    u.public_key(ok).unwrap();
}

#[test]
fn manifest_refuses_added_edited_and_removed_key_records() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let other_key = u.new_key("db01").unwrap().key_id;
    let rec = key_file(d, &k.key_id);
    let good = std::fs::read(&rec).unwrap();
    drop(u);
    assert!(reopen(d).unwrap().damaged_entries().is_empty());

    // Edited (one character of metadata).
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(
        &rec,
        text.replace("\"rotation_count\": 0", "\"rotation_count\": 1"),
    )
    .unwrap();
    assert_key_refused(d, &k.key_id, &rec, &other_key);
    std::fs::write(&rec, &good).unwrap();

    // Removed.
    std::fs::remove_file(&rec).unwrap();
    assert_key_refused(d, &k.key_id, &rec, &other_key);
    std::fs::write(&rec, &good).unwrap();

    // Added: a record from another keystore, or a copy under another name.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let f = other.new_key("web01").unwrap();
    let added = key_file(d, &f.key_id);
    std::fs::copy(key_file(other_dir.path(), &f.key_id), &added).unwrap();
    assert_key_refused(d, &f.key_id, &added, &k.key_id);
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
    assert_eq!(u.list().unwrap().len(), 2);
    assert!(u.damaged_entries().is_empty());
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
    assert_integrity_naming(reopen(d).unwrap().volume_guard(&VOL).unwrap_err(), &rec);
    std::fs::write(&rec, &at6).unwrap();

    // Deleted record: the guard and a fresh volume_guard refuse.
    std::fs::remove_file(&rec).unwrap();
    assert_integrity_naming(fresh.check(&st(9, 3)).unwrap_err(), &rec);
    assert_integrity_naming(fresh.record(&st(10, 3)).unwrap_err(), &rec);
    assert_integrity_naming(reopen(d).unwrap().volume_guard(&VOL).unwrap_err(), &rec);
    std::fs::write(&rec, &at6).unwrap();

    // An unlisted record (copied from another keystore, or made up) is refused when used.
    let other_dir = tempfile::tempdir().unwrap();
    let other = keystore(other_dir.path());
    let ok = other.new_key("x").unwrap();
    let vol2 = [0x43; 16];
    other.register_volume(&vol2, &ok.key_id, &st(1, 1)).unwrap();
    let stray = vol_file(d, &vol2);
    std::fs::copy(vol_file(other_dir.path(), &vol2), &stray).unwrap();
    let err = reopen(d).unwrap().volume_guard(&vol2).unwrap_err();
    assert!(err.to_string().contains("qvol volume adopt IMAGE"), "{err}");
    assert_integrity_naming(err, &stray);
    // Registering it (or adopting it) does not legitimise the stray file.
    assert_integrity_naming(
        u.register_volume(&vol2, &k.key_id, &st(1, 1)).unwrap_err(),
        &stray,
    );
    assert_integrity_naming(
        u.adopt_volume(&vol2, &k.key_id, &st(1, 1)).unwrap_err(),
        &stray,
    );
    reopen(d).unwrap().volume_guard(&VOL).unwrap();
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
    let u = Keystore::open(d).unwrap().unlock(None).unwrap();
    assert_integrity_naming(u.show(&k.key_id).unwrap_err(), &key_file(d, &k.key_id));
    assert_integrity_naming(u.list().unwrap_err(), &key_file(d, &k.key_id));
    u.delete_checked(&k.key_id, true).unwrap();
    assert!(!key_file(d, &k.key_id).exists());
    assert!(u.list().unwrap().is_empty());
}

#[test]
fn remove_generation_and_delete_refuse_bound_keys() {
    let dir = tempfile::tempdir().unwrap();
    let u = keystore(dir.path());
    let k = u.new_key("web01").unwrap();
    // Created at generation 1: its keyslot is wrapped for generation 1.
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    u.rotate(&k.key_id).unwrap();
    let id = &k.key_id;
    let rewrap = format!(
        "(rewrap them with `qvol rekey IMAGE` (or `qvol key rotate {id} --rewrap IMAGE`), or \
         pass --force)"
    );
    let forget = "(forget them with `qvol volume forget ID`, or pass --force)";
    for (err, ending) in [
        (
            u.remove_generation_checked(id, 1, false).unwrap_err(),
            &rewrap[..],
        ),
        (u.remove_generation(id, 1).unwrap_err(), &rewrap[..]),
        (u.delete_checked(id, false).unwrap_err(), forget),
        (u.delete(id).unwrap_err(), forget),
    ] {
        assert_eq!(err.kind(), ErrorKind::InUse);
        let msg = err.to_string();
        assert!(msg.contains(&hex::encode(VOL)), "{err}");
        assert!(!msg.contains("  "), "{err}");
        assert!(msg.ends_with(ending), "{err}");
    }
    u.remove_generation_checked(id, 1, true).unwrap();
    assert_eq!(u.show(id).unwrap().generations.len(), 1);
    u.delete_checked(id, true).unwrap();
    assert_eq!(u.show(id).unwrap_err().kind(), ErrorKind::NotFound);
    reopen(dir.path()).unwrap();
}

#[test]
fn remove_generation_refuses_only_volumes_whose_slots_may_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let id = &k.key_id;
    let (a, b) = (VOL, [0x43; 16]);
    u.register_volume(&a, id, &st(1, 1)).unwrap();
    assert_eq!(u.volume_wraps(&a).unwrap(), Some(vec![1]));
    u.rotate(id).unwrap();
    // An adopted image may hold slots of any generation: unknown.
    u.adopt_volume(&b, id, &st(1, 1)).unwrap();
    assert_eq!(u.volume_wraps(&b).unwrap(), None);
    let before = snapshot(d);
    let err = u.remove_generation_checked(id, 1, false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InUse);
    assert!(
        err.to_string().contains(&format!(
            "volume(s) {}, {} (wrapped generations not recorded) are recorded as bound",
            hex::encode(a),
            hex::encode(b)
        )),
        "{err}"
    );
    assert_eq!(snapshot(d), before, "a refused removal wrote something");

    // `qvol rekey` of a: its slots are now wrapped for generation 2 only.
    u.record_volume_wraps(&a, &[2, 2]).unwrap();
    assert_eq!(u.volume_wraps(&a).unwrap(), Some(vec![2]));
    let err = u.remove_generation_checked(id, 1, false).unwrap_err();
    assert!(!err.to_string().contains(&hex::encode(a)), "{err}");
    assert!(err.to_string().contains(&hex::encode(b)), "{err}");
    // b holds slots of both generations: still refused, now as wrapped for it.
    u.record_volume_wraps(&b, &[2, 1]).unwrap();
    assert_eq!(u.volume_wraps(&b).unwrap(), Some(vec![1, 2]));
    let err = u.remove_generation_checked(id, 1, false).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("volume(s) {} are", hex::encode(b))),
        "{err}"
    );
    // Rewrapped too (and a volume with no slot for this key at all is recorded as []).
    u.record_volume_wraps(&b, &[]).unwrap();
    let u = reopen(d).unwrap();
    assert_eq!(u.volume_wraps(&a).unwrap(), Some(vec![2]));
    assert_eq!(u.volume_wraps(&b).unwrap(), Some(vec![]));
    u.remove_generation_checked(id, 1, false).unwrap();
    assert_eq!(u.show(id).unwrap().generations.len(), 1);
    // Deleting the key still needs the volumes gone.
    assert_eq!(
        u.delete_checked(id, false).unwrap_err().kind(),
        ErrorKind::InUse
    );

    // Unknown volumes, too many generations.
    let c = [0x44; 16];
    assert_eq!(
        u.record_volume_wraps(&c, &[1]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(u.volume_wraps(&c).unwrap_err().kind(), ErrorKind::NotFound);
    let many: Vec<u32> = (1..=257).collect();
    assert_eq!(
        u.record_volume_wraps(&a, &many).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    // Recording the same wraps again writes nothing.
    let before = snapshot(d);
    u.record_volume_wraps(&a, &[2]).unwrap();
    assert_eq!(snapshot(d), before);

    // Forgetting drops the wraps; adopting again starts from unknown.
    u.forget_volume(&a).unwrap();
    assert!(manifest_json(d)["wraps"].get(hex::encode(a)).is_none());
    u.adopt_volume(&a, id, &st(1, 1)).unwrap();
    assert_eq!(u.volume_wraps(&a).unwrap(), None);
    let u = reopen(d).unwrap();
    assert!(u.damaged_entries().is_empty(), "{:?}", u.damaged_entries());
}

#[test]
fn manifest_wraps_are_covered_by_its_mac() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    u.rotate(&k.key_id).unwrap();
    u.record_volume_wraps(&VOL, &[2]).unwrap();
    let good = manifest_json(d);
    assert_eq!(good["wraps"][hex::encode(VOL)], serde_json::json!([2]));
    let name = hex::encode(VOL);
    let other = hex::encode([0x43u8; 16]);
    type Edit<'a> = Box<dyn Fn(&mut serde_json::Value) + 'a>;
    let edits: Vec<Edit<'_>> = vec![
        // What an attacker wants: generation 1 looks unused.
        Box::new(|m| m["wraps"][&name] = serde_json::json!([3])),
        Box::new(|m| m["wraps"][&name] = serde_json::json!([])),
        Box::new(|m| m["wraps"][&name] = serde_json::json!([2, 2])),
        // Dropped wraps (more refusals, but still an edit).
        Box::new(|m| {
            m.as_object_mut().unwrap().remove("wraps");
        }),
        Box::new(|m| m["wraps"][&other] = serde_json::json!([1])),
    ];
    for edit in edits {
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(
            d.join("manifest.json"),
            serde_json::to_vec_pretty(&m).unwrap(),
        )
        .unwrap();
        let err = reopen(d).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(err.to_string().contains("fails its MAC"), "{err}");
    }
    std::fs::write(
        d.join("manifest.json"),
        serde_json::to_vec_pretty(&good).unwrap(),
    )
    .unwrap();
    assert_eq!(
        reopen(d).unwrap().volume_wraps(&VOL).unwrap(),
        Some(vec![2])
    );
}

/// tests/data/v2-keystore-before-wraps was written by the code before volume wraps were
/// recorded: its manifest (a tombstone, no wraps) keeps its MAC, and its volumes have
/// unknown wraps until recorded.
#[test]
fn a_keystore_written_before_wraps_still_opens() {
    let name = "v2-keystore-before-wraps";
    let (tmp, expected) = golden_v1(name);
    let d = tmp.path();
    let pass = expected["passphrase"].as_str().unwrap().as_bytes();
    let manifest_before = std::fs::read(d.join("manifest.json")).unwrap();
    let u = Keystore::open(d).unwrap().unlock(Some(pass)).unwrap();
    assert!(u.damaged_entries().is_empty(), "{:?}", u.damaged_entries());
    assert_eq!(
        std::fs::read(d.join("manifest.json")).unwrap(),
        manifest_before
    );
    for (id, generations) in expected["keys"].as_object().unwrap() {
        let info = u.show(id).unwrap();
        for g in info.generations {
            assert_eq!(
                generations[g.generation.to_string()].as_str().unwrap(),
                g.fingerprint
            );
        }
    }
    let vols: Vec<([u8; 16], String)> = expected["volumes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(v, k)| {
            let mut id = [0u8; 16];
            hex::decode_to_slice(v, &mut id).unwrap();
            (id, k.as_str().unwrap().to_owned())
        })
        .collect();
    for (vol, key) in &vols {
        assert_eq!(u.volume_wraps(vol).unwrap(), None);
        assert_eq!(&u.volume_guard(vol).unwrap().binding().key_id, key);
    }
    let forgotten = expected["forgotten"][0].as_str().unwrap();
    let mut gone = [0u8; 16];
    hex::decode_to_slice(forgotten, &mut gone).unwrap();
    let web = &vols[0].1;
    assert!(web.starts_with("web01-"));
    assert_eq!(
        u.register_volume(&gone, web, &st(1, 1)).unwrap_err().kind(),
        ErrorKind::Integrity
    );
    // Unknown wraps refuse; recorded ones let generation 1 go.
    assert_eq!(
        u.remove_generation_checked(web, 1, false)
            .unwrap_err()
            .kind(),
        ErrorKind::InUse
    );
    u.record_volume_wraps(&vols[0].0, &[2]).unwrap();
    u.remove_generation_checked(web, 1, false).unwrap();
    let u = Keystore::open(d).unwrap().unlock(Some(pass)).unwrap();
    assert!(u.damaged_entries().is_empty(), "{:?}", u.damaged_entries());
    assert_eq!(u.volume_wraps(&vols[0].0).unwrap(), Some(vec![2]));
    assert_eq!(u.show(web).unwrap().generations.len(), 1);
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
        assert!(!err.to_string().contains("  "), "{err}");
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

// Damage isolation: a damaged, missing or unlisted record refuses only the operations that
// touch it; unlock, the other keys and the other volumes keep working, and the repair
// operations (forget_volume, delete_checked with force) work on it.

fn manifest_json(d: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_deleted_volume_record_refuses_only_that_volume_until_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let k2 = u.new_key("db01").unwrap();
    let vol2 = [0x43; 16];
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    u.register_volume(&vol2, &k2.key_id, &st(1, 1)).unwrap();
    let rec = vol_file(d, &VOL);
    std::fs::remove_file(&rec).unwrap();

    let u = reopen(d).unwrap();
    let damaged = u.damaged_entries();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert!(
        damaged[0].contains(&rec.display().to_string()),
        "{damaged:?}"
    );
    assert_integrity_naming(u.volume_guard(&VOL).unwrap_err(), &rec);
    assert_integrity_naming(u.raise_volume_floor(&VOL, &st(2, 2)).unwrap_err(), &rec);
    let g2 = u.volume_guard(&vol2).unwrap();
    g2.check(&st(1, 1)).unwrap();
    g2.record(&st(2, 2)).unwrap();
    u.raise_volume_floor(&vol2, &st(2, 2)).unwrap();
    assert_eq!(u.list().unwrap().len(), 2);
    u.show(&k.key_id).unwrap();

    // An unrelated admin write neither fails nor legitimises the damaged entry.
    let before = manifest_json(d)["volumes"][hex::encode(VOL)].clone();
    u.new_key("app01").unwrap();
    u.rotate(&k2.key_id).unwrap();
    assert_eq!(manifest_json(d)["volumes"][hex::encode(VOL)], before);
    assert!(!rec.exists());
    assert_integrity_naming(reopen(d).unwrap().volume_guard(&VOL).unwrap_err(), &rec);
    // The key stays bound to the damaged volume.
    assert_eq!(
        u.delete_checked(&k.key_id, false).unwrap_err().kind(),
        ErrorKind::InUse
    );

    // forget_volume repairs it; the image can then be adopted again.
    u.forget_volume(&VOL).unwrap();
    assert!(u.damaged_entries().is_empty(), "{:?}", u.damaged_entries());
    assert_eq!(
        u.volume_guard(&VOL).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    u.adopt_volume(&VOL, &k.key_id, &st(3, 3)).unwrap();
    let u = reopen(d).unwrap();
    assert!(u.damaged_entries().is_empty());
    u.volume_guard(&VOL).unwrap().check(&st(3, 3)).unwrap();
    u.volume_guard(&vol2).unwrap().check(&st(2, 2)).unwrap();
}

#[test]
fn a_put_back_volume_record_refuses_only_that_volume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let vol2 = [0x43; 16];
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    u.register_volume(&vol2, &k.key_id, &st(1, 1)).unwrap();
    let rec = vol_file(d, &VOL);

    // An older copy of a listed record: not damage (the floor catches the old image).
    let g = u.volume_guard(&VOL).unwrap();
    g.record(&st(2, 2)).unwrap();
    let at2 = std::fs::read(&rec).unwrap();
    g.record(&st(5, 5)).unwrap();
    u.raise_volume_floor(&VOL, &st(5, 5)).unwrap();
    std::fs::write(&rec, &at2).unwrap();
    let u = reopen(d).unwrap();
    assert!(u.damaged_entries().is_empty());
    let g = u.volume_guard(&VOL).unwrap();
    assert_eq!(g.check(&st(2, 2)).unwrap_err().kind(), ErrorKind::Rollback);
    g.check(&st(5, 5)).unwrap();

    // A record put back after `forget`: unlisted, refused, and only that volume.
    let saved = std::fs::read(&rec).unwrap();
    u.forget_volume(&VOL).unwrap();
    std::fs::write(&rec, &saved).unwrap();
    let u = reopen(d).unwrap();
    assert_eq!(u.damaged_entries().len(), 1);
    assert_integrity_naming(u.volume_guard(&VOL).unwrap_err(), &rec);
    u.volume_guard(&vol2).unwrap().check(&st(1, 1)).unwrap();
    assert_eq!(u.list().unwrap().len(), 1);
    // Admin writes leave it unlisted.
    u.new_key("db01").unwrap();
    assert!(manifest_json(d)["volumes"].get(hex::encode(VOL)).is_none());
    assert_integrity_naming(u.volume_guard(&VOL).unwrap_err(), &rec);
    // A record edited by hand (fails its MAC): refused, only that volume.
    u.forget_volume(&VOL).unwrap();
    assert!(!rec.exists());
    // The id of a forgotten volume is not registered again (a random id never repeats);
    // the image is adopted, at or above the state it was forgotten at.
    assert_eq!(
        u.register_volume(&VOL, &k.key_id, &st(6, 6))
            .unwrap_err()
            .kind(),
        ErrorKind::Integrity
    );
    u.adopt_volume(&VOL, &k.key_id, &st(6, 6)).unwrap();
    let text = std::fs::read_to_string(&rec).unwrap();
    std::fs::write(&rec, text.replace("\"generation\": 6", "\"generation\": 7")).unwrap();
    let u = reopen(d).unwrap();
    assert_integrity_naming(u.volume_guard(&VOL).unwrap_err(), &rec);
    u.volume_guard(&vol2).unwrap();
    u.forget_volume(&VOL).unwrap();
    assert!(!rec.exists());
    assert!(reopen(d).unwrap().damaged_entries().is_empty());
}

#[test]
fn a_put_back_deleted_key_refuses_only_that_key_until_deleted_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let gone = u.new_key("old01").unwrap().key_id;
    let kept = u.new_key("web01").unwrap().key_id;
    u.register_volume(&VOL, &kept, &st(1, 1)).unwrap();
    let rec = key_file(d, &gone);
    let saved = std::fs::read(&rec).unwrap();
    u.delete(&gone).unwrap();
    std::fs::write(&rec, &saved).unwrap();

    let u = reopen(d).unwrap();
    assert_eq!(u.damaged_entries().len(), 1);
    assert_integrity_naming(u.show(&gone).unwrap_err(), &rec);
    assert_integrity_naming(u.list().unwrap_err(), &rec);
    assert_integrity_naming(
        u.register_volume(&[0x44; 16], &gone, &st(1, 1))
            .unwrap_err(),
        &rec,
    );
    assert_integrity_naming(u.delete_checked(&gone, false).unwrap_err(), &rec);
    assert_integrity_naming(
        u.remove_generation_checked(&gone, 1, false).unwrap_err(),
        &rec,
    );
    u.show(&kept).unwrap();
    u.volume_guard(&VOL).unwrap().check(&st(1, 1)).unwrap();

    // An unrelated admin write: the put-back key stays unlisted and refused.
    u.new_key("db01").unwrap();
    assert!(manifest_json(d)["keys"].get(&gone).is_none());
    assert_integrity_naming(reopen(d).unwrap().show(&gone).unwrap_err(), &rec);

    // delete_checked with force repairs it.
    u.delete_checked(&gone, true).unwrap();
    assert!(!rec.exists());
    assert_eq!(u.show(&gone).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(u.list().unwrap().len(), 2);
    assert!(reopen(d).unwrap().damaged_entries().is_empty());
}

#[test]
fn an_edited_key_record_stays_refused_after_admin_writes_and_is_deleted_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let bad = u.new_key("web01").unwrap().key_id;
    let ok = u.new_key("db01").unwrap().key_id;
    u.register_volume(&VOL, &bad, &st(1, 1)).unwrap();
    let vk = Secret32::random();
    let slot = keyslot::wrap_for_recipient(&u.public_key(&bad).unwrap(), &bad, &VOL, &vk).unwrap();
    let rec = key_file(d, &bad);
    let text = std::fs::read_to_string(&rec).unwrap();
    std::fs::write(&rec, text.replace("\"vm\": \"web01\"", "\"vm\": \"web02\"")).unwrap();
    let line = manifest_json(d)["keys"][&bad].clone();

    let u = reopen(d).unwrap();
    // Every kind of admin write on other entries works and keeps the damaged line.
    u.new_key("app01").unwrap();
    u.rotate(&ok).unwrap();
    u.register_volume(&[0x44; 16], &ok, &st(1, 1)).unwrap();
    u.raise_volume_floor(&VOL, &st(2, 2)).unwrap();
    u.change_passphrase(Some(PASS), WEAK).unwrap();
    assert_eq!(manifest_json(d)["keys"][&bad], line);
    let u = reopen(d).unwrap();
    assert_integrity_naming(u.show(&bad).unwrap_err(), &rec);
    assert_integrity_naming(u.rotate(&bad).unwrap_err(), &rec);
    // The volume of the damaged key: its record is fine, so its guard works.
    u.volume_guard(&VOL).unwrap().check(&st(2, 2)).unwrap();
    // The damaged key opens no slot.
    assert_eq!(
        keyslot::unwrap_with_keystore(std::slice::from_ref(&slot), &u, &VOL)
            .unwrap_err()
            .kind(),
        ErrorKind::NoMatchingSlot
    );
    assert_eq!(manifest_json(d)["keys"][&bad], line);
    u.delete_checked(&bad, true).unwrap();
    assert!(!rec.exists());
    assert_eq!(u.list().unwrap().len(), 2);
    assert!(reopen(d).unwrap().damaged_entries().is_empty());
}

// Repair keeps rollback protection; forget keeps a tombstone (security review, item 1).

const ACCEPT: &str = "(pass --accept-rollback to adopt it anyway)";

#[test]
fn a_deleted_volume_record_is_repaired_without_losing_rollback_protection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    let vol2 = [0x43; 16];
    let b = u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    u.register_volume(&vol2, &k.key_id, &st(1, 1)).unwrap();
    let g = u.volume_guard(&VOL).unwrap();
    g.record(&st(3, 3)).unwrap();
    g.record(&st(5, 5)).unwrap();
    u.raise_volume_floor(&VOL, &st(5, 5)).unwrap();
    let rec = vol_file(d, &VOL);

    // Sound record: repair writes nothing.
    let sound = std::fs::read(&rec).unwrap();
    assert_eq!(u.repair_volume(&VOL).unwrap(), b);
    assert_eq!(std::fs::read(&rec).unwrap(), sound);

    // The attack: delete the record and put back an older image (generation 3).
    std::fs::remove_file(&rec).unwrap();
    let u = reopen(d).unwrap();
    let err = u.volume_guard(&VOL).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("`qvol volume repair {}`", hex::encode(VOL))),
        "{msg}"
    );
    assert!(!msg.contains("forget") && !msg.contains("adopt"), "{msg}");
    assert_integrity_naming(err, &rec);
    assert!(u.damaged_entries()[0].contains("qvol volume repair"));
    // The advice: repair. The old image stays refused, the current one opens.
    assert_eq!(u.repair_volume(&VOL).unwrap(), b);
    assert!(u.damaged_entries().is_empty(), "{:?}", u.damaged_entries());
    let u = reopen(d).unwrap();
    assert!(u.damaged_entries().is_empty());
    let g = u.volume_guard(&VOL).unwrap();
    assert_eq!(g.binding(), &b);
    assert_eq!(g.check(&st(3, 3)).unwrap_err().kind(), ErrorKind::Rollback);
    assert_eq!(g.check(&st(5, 6)).unwrap_err().kind(), ErrorKind::Rollback);
    g.check(&st(5, 5)).unwrap();
    g.record(&st(6, 6)).unwrap();

    // An edited record (fails its MAC): rebuilt at the manifest floor.
    let text = std::fs::read_to_string(&rec).unwrap();
    std::fs::write(&rec, text.replace("\"generation\": 6", "\"generation\": 2")).unwrap();
    let u = reopen(d).unwrap();
    let err = u.volume_guard(&VOL).unwrap_err();
    assert!(err.to_string().contains("fails its MAC"), "{err}");
    assert!(err.to_string().contains("qvol volume repair"), "{err}");
    u.repair_volume(&VOL).unwrap();
    let g = reopen(d).unwrap().volume_guard(&VOL).unwrap();
    assert_eq!(g.check(&st(4, 4)).unwrap_err().kind(), ErrorKind::Rollback);
    g.check(&st(6, 6)).unwrap();

    // A FIFO planted as the record: refused without blocking, repaired.
    std::fs::remove_file(&rec).unwrap();
    common::make_fifo(&rec);
    let u = reopen(d).unwrap();
    let err = u.volume_guard(&VOL).unwrap_err();
    assert!(err.to_string().contains("is a FIFO"), "{err}");
    assert!(err.to_string().contains("qvol volume repair"), "{err}");
    u.repair_volume(&VOL).unwrap();
    reopen(d)
        .unwrap()
        .volume_guard(&VOL)
        .unwrap()
        .check(&st(5, 5))
        .unwrap();

    // Not listed: nothing to rebuild from.
    let stray = [0x77; 16];
    assert_eq!(
        u.repair_volume(&stray).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    std::fs::copy(&rec, vol_file(d, &stray)).unwrap();
    let err = u.repair_volume(&stray).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("qvol volume forget"), "{err}");
    u.forget_volume(&stray).unwrap();
    // The other volume was never touched.
    u.volume_guard(&vol2).unwrap().check(&st(1, 1)).unwrap();
    assert!(reopen(d).unwrap().damaged_entries().is_empty());
}

#[test]
fn a_forgotten_volume_keeps_a_tombstone_against_old_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let u = keystore(d);
    let k = u.new_key("web01").unwrap();
    u.register_volume(&VOL, &k.key_id, &st(1, 1)).unwrap();
    let g = u.volume_guard(&VOL).unwrap();
    g.record(&st(5, 5)).unwrap();
    u.raise_volume_floor(&VOL, &st(5, 5)).unwrap();
    g.record(&st(7, 7)).unwrap(); // the record is above the floor

    // The old repair path: delete the record, forget, adopt an older image. Refused.
    std::fs::remove_file(vol_file(d, &VOL)).unwrap();
    let u = reopen(d).unwrap();
    u.forget_volume(&VOL).unwrap();
    let t = &manifest_json(d)["forgotten"][hex::encode(VOL)];
    assert_eq!(t["floor_generation"], 5, "{t}");
    assert!(t["forgotten"].is_string(), "{t}");
    for old in [st(3, 3), st(5, 9)] {
        let err = u.adopt_volume(&VOL, &k.key_id, &old).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Rollback, "{err}");
        assert!(err.to_string().ends_with(ACCEPT), "{err}");
    }
    // The same state as forgotten, or a later one, is adopted.
    u.adopt_volume(&VOL, &k.key_id, &st(5, 5)).unwrap();
    assert!(manifest_json(d).get("forgotten").is_none());
    let g = u.volume_guard(&VOL).unwrap();
    g.record(&st(7, 7)).unwrap();

    // A forget of a sound record remembers the record's state (above the floor).
    u.forget_volume(&VOL).unwrap();
    assert_eq!(
        manifest_json(d)["forgotten"][hex::encode(VOL)]["floor_generation"],
        7
    );
    // Unrelated admin writes and a new unlock keep it; the MAC covers it.
    u.new_key("db01").unwrap();
    let u = reopen(d).unwrap();
    let err = u.adopt_volume(&VOL, &k.key_id, &st(6, 6)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rollback);
    assert!(err.to_string().ends_with(ACCEPT), "{err}");
    let nf = u.volume_guard(&VOL).unwrap_err();
    assert_eq!(nf.kind(), ErrorKind::NotFound);
    assert!(nf.to_string().contains("forgotten"), "{nf}");
    let man = d.join("manifest.json");
    let text = std::fs::read_to_string(&man).unwrap();
    std::fs::write(
        &man,
        text.replace("\"floor_generation\": 7", "\"floor_generation\": 1"),
    )
    .unwrap();
    assert_integrity_naming(reopen(d).unwrap_err(), &man);
    std::fs::write(&man, &text).unwrap();
    // Registering the id of a forgotten volume: refused (a random id never repeats).
    let err = u.register_volume(&VOL, &k.key_id, &st(9, 9)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert!(err.to_string().contains("was forgotten"), "{err}");
    // Forgetting again changes nothing of it.
    u.forget_volume(&VOL).unwrap();
    assert_eq!(
        manifest_json(d)["forgotten"][hex::encode(VOL)]["floor_generation"],
        7
    );

    // The operator accepts the rollback: adopted, the floor is the adopted state, the
    // tombstone is gone.
    let before = snapshot(d);
    let b = u
        .adopt_volume_accepting_rollback(&VOL, &k.key_id, &st(2, 2))
        .unwrap();
    assert_ne!(snapshot(d), before);
    assert_eq!(b.key_id, k.key_id);
    assert!(manifest_json(d).get("forgotten").is_none());
    let u = reopen(d).unwrap();
    let g = u.volume_guard(&VOL).unwrap();
    g.check(&st(2, 2)).unwrap();
    assert_eq!(g.check(&st(1, 1)).unwrap_err().kind(), ErrorKind::Rollback);
    // A recorded volume is not adopted again, even accepting a rollback.
    assert_eq!(
        u.adopt_volume_accepting_rollback(&VOL, &k.key_id, &st(1, 1))
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    assert!(reopen(d).unwrap().damaged_entries().is_empty());
}

#[test]
fn adopting_an_upgraded_record_below_it_names_accept_rollback() {
    let (tmp, _) = golden_v1("v1-keystore-nopass");
    let d = tmp.path();
    Keystore::open(d).unwrap().upgrade(None).unwrap();
    let u = Keystore::open(d).unwrap().unlock(None).unwrap();
    let key = u.list().unwrap()[0].key_id.clone();
    let vol = [0x11; 16];
    let err = u.adopt_volume(&vol, &key, &st(6, 1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rollback);
    assert!(err.to_string().ends_with(ACCEPT), "{err}");
    u.adopt_volume_accepting_rollback(&vol, &key, &st(6, 1))
        .unwrap();
    let g = Keystore::open(d)
        .unwrap()
        .unlock(None)
        .unwrap()
        .volume_guard(&vol)
        .unwrap();
    assert_eq!(g.binding().key_id, key);
    g.check(&st(6, 1)).unwrap();
}

// A refused upgrade changes nothing (security review, item 6).

fn without_lock(
    mut s: std::collections::BTreeMap<String, Vec<u8>>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    s.remove(".lock");
    s
}

#[test]
fn a_refused_upgrade_leaves_every_file_unchanged() {
    // A corrupted volume record sorting after a good one (which the old code rewrote first).
    let (tmp, _) = golden_v1("v1-keystore-nopass");
    let d = tmp.path();
    let good = std::fs::read_to_string(vol_file(d, &[0x11; 16])).unwrap();
    let bad = vol_file(d, &[0xff; 16]);
    std::fs::write(&bad, good.replace(&"11".repeat(16), &"ff".repeat(16))).unwrap();
    let before = without_lock(snapshot(d));
    let err = Keystore::open(d).unwrap().upgrade(None).unwrap_err();
    assert_integrity_naming(err, &bad);
    assert_eq!(without_lock(snapshot(d)), before);
    assert!(!d.join("manifest.json").exists());
    // Removed, the upgrade goes through.
    std::fs::remove_file(&bad).unwrap();
    Keystore::open(d).unwrap().upgrade(None).unwrap();
    Keystore::open(d).unwrap().unlock(None).unwrap();

    // A key record whose fingerprint does not match its (derived) seed, with a passphrase.
    let (tmp, _) = golden_v1("v1-keystore-pass");
    let d = tmp.path();
    let pass = &b"golden v1 passphrase"[..];
    let keys: Vec<PathBuf> = std::fs::read_dir(d.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let rec = keys.iter().max().unwrap().clone();
    let text = std::fs::read_to_string(&rec).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fp = v["generations"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let forged = format!("{}{}", &fp[..63], if fp.ends_with('0') { '1' } else { '0' });
    std::fs::write(&rec, text.replace(&fp, &forged)).unwrap();
    let before = without_lock(snapshot(d));
    let err = Keystore::open(d).unwrap().upgrade(Some(pass)).unwrap_err();
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert!(
        err.to_string().contains(&rec.display().to_string()),
        "{err}"
    );
    assert_eq!(without_lock(snapshot(d)), before);
    assert_eq!(Keystore::open(d).unwrap().version(), 1);
    std::fs::write(&rec, text).unwrap();
    Keystore::open(d).unwrap().upgrade(Some(pass)).unwrap();
}
