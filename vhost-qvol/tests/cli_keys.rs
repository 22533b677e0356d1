//! `qvol keystore init` and `qvol key ...`, through the built binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QVOL: &str = env!("CARGO_BIN_EXE_qvol");

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        std::fs::write(root.join("pass"), "correct horse\n").unwrap();
        std::fs::write(root.join("wrong"), "incorrect horse\n").unwrap();
        Env { _tmp: tmp, root }
    }

    fn ks(&self) -> PathBuf {
        self.root.join("ks")
    }

    fn qvol(&self, args: &[&str]) -> Output {
        Command::new(QVOL)
            .args(args)
            .env("QVOL_TEST_WEAK_KDF", "1")
            .env_remove("QVOL_KEYSTORE")
            .env_remove("QVOL_PASSPHRASE_FILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("HOME", &self.root)
            .env_remove("XDG_DATA_HOME")
            .current_dir(&self.root)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.qvol(args);
        assert!(
            out.status.success(),
            "qvol {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with exit 1, one line on stderr, and change no file.
    fn fails(&self, args: &[&str], expect: &str) {
        let before = snapshot(&self.root);
        let out = self.qvol(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "qvol {args:?}: {stderr}");
        assert!(stderr.starts_with("qvol: "), "{stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one sentence: {stderr}"
        );
        assert!(stderr.contains(expect), "{stderr:?} lacks {expect:?}");
        assert_eq!(snapshot(&self.root), before, "qvol {args:?} changed files");
    }

    fn init(&self) {
        self.ok(&[
            "keystore",
            "init",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ]);
    }

    fn new_key(&self, vm: &str) -> String {
        let out = self.ok(&[
            "key",
            "new",
            vm,
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ]);
        assert_eq!(
            out.lines().count(),
            1,
            "key new prints only the id: {out:?}"
        );
        out.trim().to_string()
    }
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), Vec::new());
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn init_reports_unlock_cost_and_makes_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let out = env.ok(&[
        "keystore",
        "init",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    assert!(out.contains("unlock takes"), "{out}");
    assert!(out.contains("argon2id"), "{out}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.ks()), 0o700);
    assert_eq!(mode(&env.ks().join("keys")), 0o700);
    assert_eq!(mode(&env.ks().join("keystore.json")), 0o600);
    let text = std::fs::read_to_string(env.ks().join("keystore.json")).unwrap();
    assert!(
        text.contains("\"argon2id\"") && text.contains("sealed_seed"),
        "{text}"
    );
}

#[test]
fn no_passphrase_warns() {
    let env = Env::new();
    let out = env.qvol(&["keystore", "init", "--keystore", "ks", "--no-passphrase"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    // Unlocks without any passphrase file.
    let id = env.ok(&["key", "new", "vm1", "--keystore", "ks"]);
    assert!(id.starts_with("vm1-"));
}

#[test]
fn new_list_show() {
    let env = Env::new();
    env.init();
    let a = env.new_key("web01");
    let b = env.new_key("db01");
    assert_ne!(a, b);
    let list = env.ok(&[
        "key",
        "list",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    let json = env.ok(&[
        "key",
        "list",
        "--json",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let show = env.ok(&[
        "key",
        "show",
        &a,
        "--json",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["key_id"], a.as_str());
    assert_eq!(v["vm"], "web01");
    assert_eq!(v["key_type"], "ML-KEM-1024+X25519");
    assert_eq!(v["rotation_count"], 0);
    assert_eq!(v["fingerprint"].as_str().unwrap().len(), 64);
    let text = env.ok(&[
        "key",
        "show",
        &a,
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    assert!(text.contains("fingerprint:") && text.contains(v["fingerprint"].as_str().unwrap()));
    // Never a secret: the keystore's sealed seed text appears nowhere in the output.
    let ks = std::fs::read_to_string(env.ks().join("keystore.json")).unwrap();
    let ks: serde_json::Value = serde_json::from_str(&ks).unwrap();
    let sealed = ks["sealed_seed"]["ciphertext"].as_str().unwrap();
    assert!(!text.contains(&sealed[..16]) && !show.contains(&sealed[..16]));
}

#[test]
fn env_defaults_are_used() {
    let env = Env::new();
    let out = Command::new(QVOL)
        .args(["keystore", "init"])
        .env("QVOL_TEST_WEAK_KDF", "1")
        .env("QVOL_KEYSTORE", env.ks())
        .env("QVOL_PASSPHRASE_FILE", env.root.join("pass"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.ks().join("keystore.json").exists());
}

#[test]
fn user_errors_exit_1_and_change_nothing() {
    let env = Env::new();
    env.fails(
        &[
            "key",
            "list",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "no keystore",
    );
    env.fails(&["keystore", "init", "--keystore", "ks"], "passphrase");
    env.fails(
        &[
            "keystore",
            "init",
            "--keystore",
            "ks",
            "--passphrase-file",
            "missing",
        ],
        "cannot read the passphrase file",
    );
    env.init();
    let id = env.new_key("web01");
    env.fails(
        &["keystore", "init", "--keystore", "ks", "--no-passphrase"],
        "already holds a keystore",
    );
    env.fails(
        &[
            "key",
            "list",
            "--keystore",
            "ks",
            "--passphrase-file",
            "wrong",
        ],
        "passphrase does not unlock",
    );
    env.fails(
        &[
            "key",
            "new",
            "web01",
            "--keystore",
            "ks",
            "--passphrase-file",
            "wrong",
        ],
        "passphrase",
    );
    env.fails(
        &["key", "list", "--keystore", "ks"],
        "protected by a passphrase",
    );
    env.fails(
        &[
            "key",
            "show",
            "nope",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "no key",
    );
    env.fails(
        &[
            "key",
            "new",
            "bad/name",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "invalid",
    );
    env.fails(
        &[
            "key",
            "delete",
            &id,
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "--yes",
    );
    // A truncated keystore file.
    let path = env.ks().join("keystore.json");
    let text = std::fs::read(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    env.fails(
        &[
            "key",
            "list",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "not a valid qvol keystore file",
    );
}

#[test]
fn usage_error_exits_2() {
    let env = Env::new();
    let out = env.qvol(&[
        "keystore",
        "init",
        "--passphrase-file",
        "pass",
        "--no-passphrase",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn rotate_export_import() {
    let env = Env::new();
    env.init();
    let id = env.new_key("web01");
    let out = env.ok(&[
        "key",
        "rotate",
        &id,
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    assert!(out.contains("generation 2"), "{out}");
    env.ok(&[
        "key",
        "export",
        &id,
        "-o",
        "web01.key",
        "--export-passphrase-file",
        "pass",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(env.root.join("web01.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // An existing output file is never overwritten.
    env.fails(
        &[
            "key",
            "export",
            &id,
            "-o",
            "web01.key",
            "--export-passphrase-file",
            "pass",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "cannot create",
    );
    env.ok(&["keystore", "init", "--keystore", "ks2", "--no-passphrase"]);
    env.fails(
        &[
            "key",
            "import",
            "web01.key",
            "--export-passphrase-file",
            "wrong",
            "--keystore",
            "ks2",
        ],
        "passphrase does not open",
    );
    let imported = env.ok(&[
        "key",
        "import",
        "web01.key",
        "--export-passphrase-file",
        "pass",
        "--keystore",
        "ks2",
    ]);
    assert_eq!(imported.trim(), id);
    let a = env.ok(&[
        "key",
        "show",
        &id,
        "--json",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
    ]);
    let b = env.ok(&["key", "show", &id, "--json", "--keystore", "ks2"]);
    let a: serde_json::Value = serde_json::from_str(&a).unwrap();
    let b: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(a["fingerprint"], b["fingerprint"]);
    assert_eq!(b["generation"], 2);
    assert_eq!(b["rotation_count"], 1);
}

#[test]
fn argon2_cost_is_the_users_choice() {
    let env = Env::new();
    let out = env.ok(&[
        "keystore",
        "init",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
        "--argon2-memory",
        "1",
        "--argon2-passes",
        "2",
        "--argon2-lanes",
        "1",
    ]);
    assert!(out.contains("argon2id, 1 MiB, 2 passes, 1 lanes"), "{out}");
    let text = std::fs::read_to_string(env.ks().join("keystore.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["kdf"]["m_cost_kib"], 1024);
    assert_eq!(v["kdf"]["t_cost"], 2);
    assert_eq!(v["kdf"]["p_cost"], 1);
    env.new_key("vm1");
    let env = Env::new();
    env.fails(
        &[
            "keystore",
            "init",
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
            "--argon2-passes",
            "0",
        ],
        "outside the accepted range",
    );
}

#[test]
fn passwd_changes_the_passphrase() {
    let env = Env::new();
    env.init();
    let id = env.new_key("vm1");
    std::fs::write(env.root.join("new"), "a new passphrase\n").unwrap();
    env.fails(
        &[
            "keystore",
            "passwd",
            "--keystore",
            "ks",
            "--passphrase-file",
            "wrong",
            "--new-passphrase-file",
            "new",
        ],
        "passphrase does not unlock",
    );
    env.ok(&[
        "keystore",
        "passwd",
        "--keystore",
        "ks",
        "--passphrase-file",
        "pass",
        "--new-passphrase-file",
        "new",
    ]);
    env.fails(
        &[
            "key",
            "show",
            &id,
            "--keystore",
            "ks",
            "--passphrase-file",
            "pass",
        ],
        "passphrase does not unlock",
    );
    env.ok(&[
        "key",
        "show",
        &id,
        "--keystore",
        "ks",
        "--passphrase-file",
        "new",
    ]);
}
