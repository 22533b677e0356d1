//! `qvol benchmark` through the binary, with a short `--seconds`: every figure is there and
//! positive, in the table and in `--json`; the implementations it names are the ones
//! `qvol info` reports for images of each suite; the unlock is timed with the argon2id
//! parameters a new keystore gets; a bad `--seconds` is one sentence.

use integration::bins;
use integration::fixture::{json_of, Fixture, Run};
use serde_json::Value;

const SUITES: [&str; 2] = ["xchacha20-poly1305", "aegis-256"];

fn positive(doc: &Value, field: &str) -> f64 {
    let x = doc[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {doc}"));
    assert!(x > 0.0, "{field} is not positive in {doc}");
    x
}

fn benchmark_json(f: &Fixture, extra: &[&str]) -> Value {
    let mut args = vec!["benchmark", "--seconds", "0.02", "--json"];
    args.extend(extra);
    json_of(&f.qvol(args).success())
}

/// Checks one implementation's figures and returns its name.
fn implementation(doc: &Value) -> String {
    for op in ["seal", "open"] {
        let mb = positive(doc, &format!("{op}_mb_per_s"));
        let ns = positive(doc, &format!("{op}_ns_per_block"));
        // Two views of one figure: 4096 bytes per `ns` nanoseconds.
        assert!((mb * ns / 4096e3 - 1.0).abs() < 1e-6, "{doc}");
    }
    let name = doc["name"].as_str().expect("a name").to_string();
    assert!(!name.is_empty(), "{doc}");
    name
}

#[test]
fn json_has_every_figure_and_the_implementations_qvol_info_reports() {
    let f = Fixture::new();
    let doc = benchmark_json(&f, &[]);
    assert_eq!(positive(&doc, "seconds_per_measurement"), 0.02);
    assert_eq!(doc["block_bytes"], 4096);
    assert!(!doc["cpu"]["arch"].as_str().unwrap().is_empty(), "{doc}");
    let features = doc["cpu"]["features"].as_object().expect("features");
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        assert!(!features.is_empty(), "{doc}");
    }
    assert!(features.values().all(Value::is_boolean), "{doc}");

    let suites = doc["suites"].as_array().expect("suites");
    let names: Vec<&str> = suites
        .iter()
        .map(|s| s["suite"].as_str().unwrap())
        .collect();
    assert_eq!(names, SUITES);
    let key = f.new_key("bench");
    for s in suites {
        let suite = s["suite"].as_str().unwrap();
        let in_use = implementation(&s["implementation"]);
        let reference = implementation(&s["reference"]);
        let image = f.create_image(&format!("{suite}.qvol"), "1M", &key, &["--cipher", suite]);
        let info = json_of(
            &f.qvol(["info", image.to_str().unwrap(), "--json"])
                .success(),
        );
        assert_eq!(info["implementation"], in_use.as_str(), "{suite}");
        // What the suite module says (qvol-core suite/mod.rs): RustCrypto is the reference
        // for xchacha20-poly1305; aegis-256 has one library, its own reference.
        match suite {
            "xchacha20-poly1305" => {
                assert!(in_use.starts_with("ring "), "{in_use}");
                assert!(reference.starts_with("RustCrypto "), "{reference}");
            }
            _ => {
                assert!(in_use.starts_with("libaegis "), "{in_use}");
                assert_eq!(reference, in_use);
                assert_eq!(s["reference"], s["implementation"], "measured once");
            }
        }
    }

    assert_eq!(doc["kem"]["name"], "ML-KEM-1024+X25519");
    for field in ["keygen_us", "encapsulate_us", "decapsulate_us"] {
        positive(&doc["kem"], field);
    }
    assert_eq!(doc["kdf"]["algorithm"], "argon2id");
    for field in ["memory_kib", "iterations", "lanes", "unlock_ms"] {
        positive(&doc["kdf"], field);
    }
}

#[test]
fn the_table_names_each_suite_and_implementation_with_positive_figures() {
    let f = Fixture::new();
    let doc = benchmark_json(&f, &[]);
    let run = f.qvol(["benchmark", "--seconds", "0.02"]).success();
    let text = &run.stdout;
    assert!(text.contains("CPU ("), "{text}");
    for s in doc["suites"].as_array().unwrap() {
        let suite = s["suite"].as_str().unwrap();
        for role in ["in use", "reference"] {
            let prefix = format!("{suite:<20}{role}");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} row in:\n{text}"));
            let key = if role == "in use" {
                "implementation"
            } else {
                "reference"
            };
            let name = s[key]["name"].as_str().unwrap();
            assert!(line.ends_with(name), "{line:?} does not name {name}");
            if line.contains("(same code as in use)") {
                continue;
            }
            let figures: Vec<f64> = line[prefix.len()..line.len() - name.len()]
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|_| panic!("{x:?} in {line:?}")))
                .collect();
            assert_eq!(figures.len(), 4, "{line:?}");
            assert!(figures.iter().all(|&x| x > 0.0), "{line:?}");
        }
    }
    for op in ["key generation", "encapsulate", "decapsulate"] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(op))
            .unwrap();
        let us: f64 = line
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert!(us > 0.0, "{line:?}");
    }
    assert!(text.contains("Keystore unlock (argon2id, "), "{text}");
}

#[test]
fn the_unlock_is_timed_with_the_parameters_of_a_new_keystore() {
    let f = Fixture::new();
    // The fixture makes its keystores with fast test parameters; a user's get the default.
    let mut cmd = f.command(&bins::qvol());
    cmd.env_remove("QVOL_TEST_WEAK_KDF");
    cmd.args([
        "benchmark",
        "--seconds",
        "0.01",
        "--suite",
        "aegis-256",
        "--json",
    ]);
    let run = Run::from(cmd.output().expect("qvol runs")).success();
    let doc = json_of(&run);
    let suites = doc["suites"].as_array().unwrap();
    assert_eq!(suites.len(), 1, "--suite limits the suites: {doc}");
    assert_eq!(suites[0]["suite"], "aegis-256");
    // qvol-keys KdfParams::default: 256 MiB, 3 passes, 4 lanes.
    assert_eq!(doc["kdf"]["memory_kib"], 256 * 1024);
    assert_eq!(doc["kdf"]["iterations"], 3);
    assert_eq!(doc["kdf"]["lanes"], 4);
    positive(&doc["kdf"], "unlock_ms");
}

#[test]
fn bad_arguments_are_refused() {
    let f = Fixture::new();
    for seconds in ["0", "-1", "61", "NaN"] {
        f.qvol(["benchmark", &format!("--seconds={seconds}")])
            .one_sentence_error("qvol", "--seconds must be more than 0");
    }
    let run = f.qvol(["benchmark", "--suite", "aes-xts"]);
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("unknown cipher suite"), "{run:#?}");
}
