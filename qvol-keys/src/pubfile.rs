//! The public key file: the public half of one generation of a keystore key, written by
//! `qvol key export-public KEY_ID -o FILE` and read by `qvol keyslot add --recipient FILE`,
//! so that a volume can get a recipient keyslot for another keystore's key
//! (docs/KEYS.md §7.1). One JSON object on one line, then a newline:
//!
//! ```text
//! {"format":"qvol-public-key","version":1,"key_id":"web01-6c194950","vm":"web01",
//!  "generation":3,"kem":"ML-KEM-1024+X25519","fingerprint":"<64 hex>",
//!  "public_key":"<3200 hex: ek_M (1568) || pk_X (32)>"}
//! ```
//!
//! The slot names the key id and generation and carries the fingerprint; the other keystore
//! finds its secret key by those three (`UnlockedKeystore::secret_key_for_slot`). Nothing in
//! the file is secret or authenticated: whoever hands it over vouches for it, so compare the
//! fingerprint out of band. [`PublicKeyFile::parse`] is strict and never panics: every
//! refusal is one sentence.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{Error, ErrorKind, Result};
use crate::kem::{self, RecipientPublicKey, KEM_NAME, MLKEM_EK_LEN, PUBLIC_KEY_LEN};
use crate::keystore::{is_valid_key_id, validate_vm_name};

/// `format` of a public key file.
pub const PUBLIC_KEY_FORMAT: &str = "qvol-public-key";
/// Version of the public key file format.
pub const PUBLIC_KEY_VERSION: u32 = 1;
/// Largest public key file accepted (a real one is about 3.5 KiB).
pub const MAX_PUBLIC_KEY_FILE_LEN: usize = 16 * 1024;

/// The public key of one generation of a keystore key, with what a recipient keyslot
/// names: key id and generation.
#[derive(Debug, Clone)]
pub struct PublicKeyFile {
    /// The key id (a slot names it; the holder's keystore finds its record by it).
    pub key_id: String,
    /// The VM of the key (informative).
    pub vm: String,
    /// The generation of the key this public key belongs to (1 or more).
    pub generation: u32,
    /// The hybrid public key, labelled with `generation` (so that
    /// [`crate::keyslot::wrap_for_recipient`] records it).
    pub public_key: RecipientPublicKey,
}

/// The file as JSON, field by field (in this order when written).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    format: String,
    version: u32,
    key_id: String,
    vm: String,
    generation: u32,
    kem: String,
    fingerprint: String,
    public_key: String,
}

impl PublicKeyFile {
    /// The file's bytes: one JSON object on one line and a newline.
    pub fn to_json(&self) -> String {
        let wire = Wire {
            format: PUBLIC_KEY_FORMAT.into(),
            version: PUBLIC_KEY_VERSION,
            key_id: self.key_id.clone(),
            vm: self.vm.clone(),
            generation: self.generation,
            kem: KEM_NAME.into(),
            fingerprint: self.public_key.fingerprint_hex(),
            public_key: hex::encode(self.public_key.as_bytes()),
        };
        // A struct of strings and integers always serializes.
        let mut text = serde_json::to_string(&wire).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Parses and checks a public key file: size, format, version, exactly the known fields,
    /// KEM, key id, VM name, generation, lowercase hex of the right lengths, the FIPS 203
    /// §7.2 encapsulation key check, an X25519 key not of small order, and the fingerprint
    /// against the key. Corrupt, or Unsupported (version, KEM), each with one sentence.
    pub fn parse(bytes: &[u8]) -> Result<PublicKeyFile> {
        if bytes.len() > MAX_PUBLIC_KEY_FILE_LEN {
            return Err(Error::corrupt(format!(
                "the file is not a qvol public key file (it is {} bytes, more than the \
                 {MAX_PUBLIC_KEY_FILE_LEN} one can be)",
                bytes.len()
            )));
        }
        check_header(bytes)?;
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(
                "the public key file is malformed (it must hold exactly the fields format, \
                 version, key_id, vm, generation, kem, fingerprint and public_key, each once)",
            )
            .with_source(e)
        })?;
        if wire.kem != KEM_NAME {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the public key file's KEM {} is not supported (this build knows {KEM_NAME})",
                    shown(&wire.kem)
                ),
            ));
        }
        if !is_valid_key_id(&wire.key_id) {
            return Err(Error::corrupt(format!(
                "the public key file names an invalid key id {}",
                shown(&wire.key_id)
            )));
        }
        if validate_vm_name(&wire.vm).is_err() {
            return Err(Error::corrupt(format!(
                "the public key file names an invalid VM {}",
                shown(&wire.vm)
            )));
        }
        if wire.generation == 0 {
            return Err(Error::corrupt(
                "the public key file names generation 0 (generations start at 1)",
            ));
        }
        let key = decode_hex::<PUBLIC_KEY_LEN>(&wire.public_key, "public key")?;
        let fingerprint = decode_hex::<32>(&wire.fingerprint, "fingerprint")?;
        // FIPS 203 §7.2, encapsulation key check (modulus check): each coefficient < q.
        if !kem::mlkem_ek_is_valid(&key[..MLKEM_EK_LEN]) {
            return Err(Error::corrupt(
                "the public key's ML-KEM-1024 encapsulation key fails the FIPS 203 modulus \
                 check (damaged or forged)",
            ));
        }
        if !x25519_is_usable(&key[MLKEM_EK_LEN..]) {
            return Err(Error::corrupt(
                "the public key's X25519 part has small order (damaged or forged)",
            ));
        }
        let public_key = RecipientPublicKey::from_bytes(&key[..])?.with_generation(wire.generation);
        if !bool::from(public_key.fingerprint().ct_eq(&fingerprint[..])) {
            return Err(Error::corrupt(
                "the public key's fingerprint does not match the key it carries",
            ));
        }
        Ok(PublicKeyFile {
            key_id: wire.key_id,
            vm: wire.vm,
            generation: wire.generation,
            public_key,
        })
    }
}

/// Refuses, before the strict parse, anything that is not a public key file of this
/// version, so that the sentence says what the file is instead of which field is extra.
fn check_header(bytes: &[u8]) -> Result<()> {
    let not_ours =
        |why: String| Error::corrupt(format!("the file is not a qvol public key file ({why})"));
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| not_ours("it is not JSON".into()).with_source(e))?;
    let Some(object) = value.as_object() else {
        return Err(not_ours("it is not a JSON object".into()));
    };
    match object.get("format").and_then(serde_json::Value::as_str) {
        Some(PUBLIC_KEY_FORMAT) => {}
        Some(crate::EXPORT_FORMAT) => {
            return Err(not_ours(format!(
                "format {:?} is a secret key export; make a public key file with `qvol key \
                 export-public KEY_ID -o FILE`",
                crate::EXPORT_FORMAT
            )))
        }
        Some(other) => {
            return Err(not_ours(format!(
                "format {}, expected {PUBLIC_KEY_FORMAT:?}",
                shown(other)
            )))
        }
        None => return Err(not_ours("it has no format".into())),
    }
    match object.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PUBLIC_KEY_VERSION) => Ok(()),
        Some(v) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "qvol public key file version {v} is not supported (this build reads version \
                 {PUBLIC_KEY_VERSION})"
            ),
        )),
        None => Err(Error::corrupt(
            "the public key file has no valid version number",
        )),
    }
}

/// Decodes exactly `N` bytes of lowercase hex (docs/KEYS.md: hex in JSON files is
/// lowercase), naming the field otherwise.
fn decode_hex<const N: usize>(text: &str, field: &str) -> Result<Box<[u8; N]>> {
    if text.len() != 2 * N {
        return Err(Error::corrupt(format!(
            "the public key file's {field} is {} hex digits long, not {}",
            text.len(),
            2 * N
        )));
    }
    if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::corrupt(format!(
            "the public key file's {field} is not lowercase hex"
        )));
    }
    let mut out = Box::new([0u8; N]);
    hex::decode_to_slice(text, &mut out[..]).map_err(|e| {
        Error::corrupt(format!(
            "the public key file's {field} is not lowercase hex"
        ))
        .with_source(e)
    })?;
    Ok(out)
}

/// Whether an X25519 public key is not of small order: a clamped scalar is a multiple of
/// the cofactor 8 (RFC 7748 §5), so its product with a point of small order (on the curve
/// or its twist) is zero, and with any other point it is not. Encapsulating to a key of
/// small order would fail anyway; refusing it here names the file.
fn x25519_is_usable(pk: &[u8]) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(pk) else {
        return false;
    };
    let probe = x25519_dalek::StaticSecret::from([0x5a; 32]);
    probe
        .diffie_hellman(&x25519_dalek::PublicKey::from(pk))
        .was_contributory()
}

/// A string from the file, quoted and escaped, cut after 64 characters.
fn shown(s: &str) -> String {
    if s.chars().count() <= 64 {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(64).collect();
        format!("{cut:?}...")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::kem::HybridSecretKey;
    use crate::secret::Secret32;

    fn sample() -> PublicKeyFile {
        let sk = HybridSecretKey::from_seed(&Secret32::from_bytes([7; 32]));
        PublicKeyFile {
            key_id: "web01-6c194950".into(),
            vm: "web01".into(),
            generation: 3,
            public_key: sk.public_key().clone().with_generation(3),
        }
    }

    fn sample_value() -> Value {
        serde_json::from_str(&sample().to_json()).unwrap()
    }

    fn parse_value(v: &Value) -> Result<PublicKeyFile> {
        PublicKeyFile::parse(serde_json::to_string(v).unwrap().as_bytes())
    }

    /// `edit` applied to a good file makes parse fail with `kind` and a sentence holding
    /// `says`.
    fn refused(edit: impl FnOnce(&mut Value), kind: ErrorKind, says: &str) {
        let mut v = sample_value();
        edit(&mut v);
        let err = parse_value(&v).unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(says), "{err:?} lacks {says:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn round_trip_is_one_line_in_field_order() {
        let f = sample();
        let text = f.to_json();
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        assert!(text.starts_with(
            "{\"format\":\"qvol-public-key\",\"version\":1,\"key_id\":\"web01-6c194950\",\
             \"vm\":\"web01\",\"generation\":3,\"kem\":\"ML-KEM-1024+X25519\",\"fingerprint\":\""
        ));
        let back = PublicKeyFile::parse(text.as_bytes()).unwrap();
        assert_eq!(back.key_id, f.key_id);
        assert_eq!(back.vm, f.vm);
        assert_eq!(back.generation, 3);
        assert_eq!(back.public_key, f.public_key);
        assert_eq!(back.public_key.generation(), 3);
        assert_eq!(back.to_json(), text);
    }

    #[test]
    fn every_malformed_field_is_refused_with_one_sentence() {
        use ErrorKind::{Corrupt, Unsupported};
        let wrong_fp = "00".repeat(32);
        let fp = sample().public_key.fingerprint_hex();
        let key_hex = hex::encode(sample().public_key.as_bytes());
        let key_hex2 = key_hex.clone();
        // Coefficient 0 of ek_M := 3329 (= q): fails the modulus check.
        let mut bad_ek = *sample().public_key.as_bytes();
        bad_ek[0] = 0x01;
        bad_ek[1] = (bad_ek[1] & 0xf0) | 0x0d;
        // The X25519 part := 0 (a point of small order).
        let mut small = *sample().public_key.as_bytes();
        small[MLKEM_EK_LEN..].fill(0);
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(Edit, ErrorKind, &str)> = vec![
            (
                Box::new(move |v| v["format"] = json!("qvol-key")),
                Corrupt,
                "not a qvol public key file (format \"qvol-key\"",
            ),
            (
                Box::new(move |v| v["format"] = json!("qvol-key-export")),
                Corrupt,
                "secret key export",
            ),
            (
                Box::new(move |v| {
                    v.as_object_mut().unwrap().remove("format");
                }),
                Corrupt,
                "it has no format",
            ),
            (
                Box::new(move |v| v["version"] = json!(2)),
                Unsupported,
                "version 2 is not supported",
            ),
            (
                Box::new(move |v| v["version"] = json!("1")),
                Corrupt,
                "no valid version",
            ),
            (
                Box::new(move |v| v["extra"] = json!(1)),
                Corrupt,
                "exactly the fields",
            ),
            (
                Box::new(move |v| {
                    v.as_object_mut().unwrap().remove("vm");
                }),
                Corrupt,
                "exactly the fields",
            ),
            (
                Box::new(move |v| v["generation"] = json!(-1)),
                Corrupt,
                "exactly the fields",
            ),
            (
                Box::new(move |v| v["generation"] = json!(0)),
                Corrupt,
                "generation 0",
            ),
            (
                Box::new(move |v| v["kem"] = json!("X-Wing")),
                Unsupported,
                "KEM \"X-Wing\" is not supported",
            ),
            (
                Box::new(move |v| v["key_id"] = json!("../../etc")),
                Corrupt,
                "invalid key id",
            ),
            (
                Box::new(move |v| v["key_id"] = json!("")),
                Corrupt,
                "invalid key id",
            ),
            (
                Box::new(move |v| v["key_id"] = json!("k".repeat(65))),
                Corrupt,
                "invalid key id",
            ),
            (
                Box::new(move |v| v["vm"] = json!("-x")),
                Corrupt,
                "invalid VM",
            ),
            (
                Box::new(move |v| v["public_key"] = json!(key_hex2[2..])),
                Corrupt,
                "public key is 3198 hex digits long, not 3200",
            ),
            (
                Box::new(move |v| v["public_key"] = json!(key_hex.to_uppercase())),
                Corrupt,
                "public key is not lowercase hex",
            ),
            (
                Box::new(move |v| v["public_key"] = json!(hex::encode(bad_ek))),
                Corrupt,
                "FIPS 203 modulus check",
            ),
            (
                Box::new(move |v| v["public_key"] = json!(hex::encode(small))),
                Corrupt,
                "small order",
            ),
            (
                Box::new(move |v| v["fingerprint"] = json!(fp[1..])),
                Corrupt,
                "fingerprint is 63 hex digits long",
            ),
            (
                Box::new(move |v| v["fingerprint"] = json!(wrong_fp)),
                Corrupt,
                "fingerprint does not match the key it carries",
            ),
            (
                Box::new(move |v| *v = json!([1, 2])),
                Corrupt,
                "not a JSON object",
            ),
        ];
        for (edit, kind, says) in cases {
            refused(edit, kind, says);
        }
        for junk in [&b""[..], b"not json", b"{\"format\":", b"\xff\xfe", b"null"] {
            let err = PublicKeyFile::parse(junk).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("the file is not a qvol public key file"),
                "{err}"
            );
        }
        // A field given twice (the last would otherwise win).
        let text = sample().to_json();
        let twice = text.replacen("\"vm\":\"web01\"", "\"vm\":\"web01\",\"vm\":\"db01\"", 1);
        assert_eq!(
            PublicKeyFile::parse(twice.as_bytes()).unwrap_err().kind(),
            Corrupt
        );
        // Over the size cap, even if padded with whitespace.
        let big = format!("{}{}", text.trim_end(), " ".repeat(MAX_PUBLIC_KEY_FILE_LEN));
        let err = PublicKeyFile::parse(big.as_bytes()).unwrap_err();
        assert_eq!(err.kind(), Corrupt);
        assert!(err.to_string().contains("more than the 16384"), "{err}");
        // Trailing whitespace within the cap is fine.
        PublicKeyFile::parse(format!("{text}\n\n").as_bytes()).unwrap();
    }

    /// The file another keystore's operator receives: parsed, it wraps a slot that the
    /// exporting keystore opens (by key id, generation and fingerprint), and no other one.
    #[test]
    fn an_exported_key_gets_a_slot_its_keystore_opens() {
        use crate::{keyslot, KdfParams, Keystore};
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::init(dir.path(), None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        let key = ks.new_key("web01").unwrap();
        ks.rotate(&key.key_id).unwrap();
        let exported = ks.export_public(&key.key_id).unwrap();
        assert_eq!(exported.key_id, key.key_id);
        assert_eq!(exported.vm, "web01");
        assert_eq!(exported.generation, 2);
        assert_eq!(exported.public_key, ks.public_key(&key.key_id).unwrap());
        let text = exported.to_json();
        assert!(text.contains(&ks.show(&key.key_id).unwrap().fingerprint));

        let f = PublicKeyFile::parse(text.as_bytes()).unwrap();
        let volume_id = [9u8; 16];
        let vk = Secret32::from_bytes([0x3c; 32]);
        let slot = keyslot::wrap_for_recipient_generation(
            &f.public_key,
            &f.key_id,
            f.generation,
            &volume_id,
            &vk,
        )
        .unwrap();
        let info = keyslot::describe(&slot).unwrap();
        assert_eq!(info.key_id.as_deref(), Some(key.key_id.as_str()));
        assert_eq!(info.generation, Some(2));
        let slots = vec![slot];
        let (i, got) = keyslot::unwrap_with_keystore(&slots, &ks, &volume_id).unwrap();
        assert_eq!((i, &got), (0, &vk));

        let other_dir = tempfile::tempdir().unwrap();
        let other = Keystore::init(other_dir.path(), None, KdfParams::insecure_for_tests())
            .unwrap()
            .unlock(None)
            .unwrap();
        other.new_key("web01").unwrap();
        assert_eq!(
            keyslot::unwrap_with_keystore(&slots, &other, &volume_id)
                .unwrap_err()
                .kind(),
            ErrorKind::NoMatchingSlot
        );
        assert_eq!(
            ks.export_public("web01-00000000").unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes never make parse panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = PublicKeyFile::parse(&bytes);
        }

        /// A good file with bytes changed, cut or inserted is refused or still the same key
        /// (a change inside whitespace-free JSON never yields another valid key silently).
        #[test]
        fn edited_files_never_panic_and_never_change_the_key(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let good = sample();
            let mut bytes = good.to_json().into_bytes();
            for (at, byte, how) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, byte),
                }
            }
            if let Ok(f) = PublicKeyFile::parse(&bytes) {
                // Only edits that keep the key and fingerprint intact can pass.
                prop_assert_eq!(f.public_key, good.public_key);
            }
        }
    }
}
