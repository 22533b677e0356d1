//! ML-KEM-1024 (FIPS 203) against NIST's ACVP known-answer vectors (tests/data/README.md):
//! keyGen (Algorithm 16, ML-KEM.KeyGen_internal), encapsulation (Algorithm 17,
//! ML-KEM.Encaps_internal) and decapsulation (Algorithm 18, ML-KEM.Decaps_internal),
//! including the invalid-ciphertext cases where implicit rejection must return
//! K̄ = J(z || c).

use ml_kem::kem::{Decapsulate, DecapsulationKey, EncapsulationKey};
use ml_kem::{EncapsulateDeterministic, EncodedSizeUser, KemCore, MlKem1024, MlKem1024Params, B32};
use serde_json::Value;

type Ek = EncapsulationKey<MlKem1024Params>;
type Dk = DecapsulationKey<MlKem1024Params>;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn bytes(v: &Value, field: &str) -> Vec<u8> {
    hex::decode(
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("no field {field}")),
    )
    .unwrap()
}

fn b32(v: &Value, field: &str) -> B32 {
    B32::try_from(bytes(v, field).as_slice()).unwrap()
}

fn groups(v: &Value) -> &Vec<Value> {
    v["testGroups"].as_array().unwrap()
}

#[test]
fn keygen() {
    let v = load("ml-kem-1024-keygen.acvp.json");
    let mut n = 0;
    for g in groups(&v) {
        assert_eq!(g["parameterSet"], "ML-KEM-1024");
        for t in g["tests"].as_array().unwrap() {
            let (dk, ek) = MlKem1024::generate_deterministic(&b32(t, "d"), &b32(t, "z"));
            assert_eq!(
                ek.as_bytes().as_slice(),
                bytes(t, "ek").as_slice(),
                "tcId {}",
                t["tcId"]
            );
            assert_eq!(
                dk.as_bytes().as_slice(),
                bytes(t, "dk").as_slice(),
                "tcId {}",
                t["tcId"]
            );
            assert!(qvol_keys::kem::mlkem_ek_is_valid(&bytes(t, "ek")));
            n += 1;
        }
    }
    assert_eq!(n, 25);
}

#[test]
fn encapsulation_and_decapsulation() {
    let v = load("ml-kem-1024-encapdecap.acvp.json");
    let (mut enc, mut dec_valid, mut dec_invalid) = (0, 0, 0);
    for g in groups(&v) {
        assert_eq!(g["parameterSet"], "ML-KEM-1024");
        match g["function"].as_str().unwrap() {
            "encapsulation" => {
                for t in g["tests"].as_array().unwrap() {
                    let ek_bytes = bytes(t, "ek");
                    assert!(qvol_keys::kem::mlkem_ek_is_valid(&ek_bytes));
                    let ek = Ek::from_bytes(&ek_bytes.as_slice().try_into().unwrap());
                    let (c, k) = ek.encapsulate_deterministic(&b32(t, "m")).unwrap();
                    assert_eq!(c.as_slice(), bytes(t, "c").as_slice(), "tcId {}", t["tcId"]);
                    assert_eq!(k.as_slice(), bytes(t, "k").as_slice(), "tcId {}", t["tcId"]);
                    // The same group's dk decapsulates it back.
                    let dk = Dk::from_bytes(&bytes(t, "dk").as_slice().try_into().unwrap());
                    assert_eq!(dk.decapsulate(&c).unwrap(), k);
                    enc += 1;
                }
            }
            "decapsulation" => {
                let dk = Dk::from_bytes(&bytes(g, "dk").as_slice().try_into().unwrap());
                for t in g["tests"].as_array().unwrap() {
                    let c = bytes(t, "c");
                    let k = dk.decapsulate(&c.as_slice().try_into().unwrap()).unwrap();
                    assert_eq!(k.as_slice(), bytes(t, "k").as_slice(), "tcId {}", t["tcId"]);
                    match t["reason"].as_str().unwrap() {
                        "no modification" => dec_valid += 1,
                        _ => dec_invalid += 1,
                    }
                }
            }
            other => panic!("unknown function {other}"),
        }
    }
    assert_eq!(enc, 25);
    assert!(dec_valid > 0, "no valid decapsulation case ran");
    assert!(
        dec_invalid > 0,
        "no invalid-ciphertext (implicit rejection) case ran"
    );
    assert_eq!(dec_valid + dec_invalid, 10);
}
