//! The integration files in `qemu-configs/` are exercised where the tool exists here:
//! - `qemu-vhost-qvol.sh` boots the test guest (TCG) on a vhost-qvol disk with two queues;
//! - `50-vhost-qvol.json` is a valid vhost-user backend descriptor that agrees with
//!   `vhost-qvol --print-capabilities`;
//! - `vhost-qvol@.service` passes `systemd-analyze verify` without a warning;
//! - `libvirt-domain.xml` is well-formed and valid against libvirt's domain schema;
//! - `cloud-hypervisor.sh` and `crosvm.sh` parse (`sh -n`): neither VMM runs without KVM.
//!
//! A missing tool is a failure that names `scripts/setup.sh`, never a skip.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::guest::backend::{workspace_binary, Backend, BackendKind, QvolVolume, ScratchDir};
use integration::guest::{self, repo_root, require_tool, GuestKit};

fn config(name: &str) -> PathBuf {
    repo_root().join("qemu-configs").join(name)
}

fn tool(name: &str) -> PathBuf {
    require_tool(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The guest checks it sees two virtqueues (two blk-mq hardware queues with two vCPUs), then
/// writes 4 MiB to the disk, reads them back with O_DIRECT and compares.
const TWO_QUEUES: &str = r#"
queues=$(ls /sys/block/vda/mq | wc -l)
echo "QVOL-QUEUES $queues"
head -c 4194304 /dev/urandom > /run/qvol/pattern
dd if=/run/qvol/pattern of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | cmp - /run/qvol/pattern
echo QVOL-CONFIG-OK
"#;

#[test]
fn qemu_command_line_boots_a_guest_on_vhost_qvol() {
    let kit = GuestKit::locate().unwrap_or_else(|e| panic!("cannot boot the test guest: {e:#}"));
    let dir = ScratchDir::new("guest-config").expect("scratch dir");
    let volume = QvolVolume::create(dir.path(), "32M", None)
        .unwrap_or_else(|e| panic!("cannot create the test volume: {e:#}"));
    let backend = Backend::start(
        BackendKind::VhostQvol(volume),
        &dir.path().join("disk.sock"),
        2,
    )
    .unwrap_or_else(|e| panic!("cannot start vhost-qvol: {e:#}"));

    let mut launcher = Command::new(config("qemu-vhost-qvol.sh"));
    launcher
        .env("QVOL_SOCKET", backend.socket())
        .env("QVOL_ACCEL", "tcg")
        .env("QVOL_MEM", "512M")
        .env("QVOL_QUEUES", "2")
        .env("QEMU", &kit.qemu)
        .args(["-smp", "2"]);
    let outcome = guest::boot_with(
        &kit,
        launcher,
        TWO_QUEUES,
        Duration::from_secs(180),
        &dir.path().join("boot"),
    )
    .and_then(|g| g.wait())
    .unwrap_or_else(|e| panic!("the guest did not run: {e:#}"));
    assert!(
        outcome.succeeded(),
        "{}\n--- backend ---\n{}",
        outcome.report(),
        backend.log()
    );
    assert!(outcome.io_error_lines().is_empty(), "{}", outcome.report());
    let queues: Vec<&str> = outcome.lines_with_prefix("QVOL-QUEUES ").collect();
    assert_eq!(queues, ["2"], "{}", outcome.report());
    assert!(
        outcome.console.contains("QVOL-CONFIG-OK"),
        "{}",
        outcome.report()
    );
}

#[test]
fn vhost_user_descriptor_matches_print_capabilities() {
    let text = fs::read_to_string(config("50-vhost-qvol.json")).expect("read the descriptor");
    let descriptor: serde_json::Value =
        serde_json::from_str(&text).expect("the descriptor is JSON");
    let object = descriptor
        .as_object()
        .expect("the descriptor is a JSON object");
    // QEMU docs/interop/vhost-user.json, VhostUserBackend: description, type, binary, tags.
    for key in object.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&key.as_str()),
            "unknown descriptor member {key}"
        );
    }
    assert!(descriptor["description"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    let binary = descriptor["binary"].as_str().expect("binary is a string");
    assert!(
        binary.starts_with('/'),
        "binary must be an absolute path: {binary}"
    );
    assert!(
        binary.ends_with("/vhost-qvol"),
        "binary is not vhost-qvol: {binary}"
    );

    let daemon = workspace_binary("vhost-qvol").unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(&daemon)
        .arg("--print-capabilities")
        .output()
        .expect("run vhost-qvol --print-capabilities");
    assert!(
        out.status.success(),
        "--print-capabilities exited with {}",
        out.status
    );
    let caps: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--print-capabilities prints JSON");
    assert_eq!(
        descriptor["type"], caps["type"],
        "descriptor and capabilities disagree"
    );
    assert_eq!(descriptor["type"], "block");
    // vhost-user.rst, "Backend program conventions": block backends support these.
    let features: Vec<&str> = caps["features"]
        .as_array()
        .expect("capabilities list features")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    for needed in ["read-only", "blk-file"] {
        assert!(
            features.contains(&needed),
            "capabilities lack {needed}: {caps}"
        );
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze");
    let unit = fs::read_to_string(config("vhost-qvol@.service")).expect("read the unit");
    let installed = "/usr/libexec/vhost-qvol";
    assert!(
        unit.contains(&format!("ExecStart={installed} ")),
        "ExecStart changed: update this test"
    );
    assert!(
        unit.contains("LoadCredential=qvol-passphrase:"),
        "the passphrase credential is gone"
    );
    // Bound to one volume, and hardened (docs/SECURITY.md, break 1 and 5).
    for needed in [
        "--volume-id ${QVOL_VOLUME_ID}",
        "EnvironmentFile=/etc/qvol/disks/%i.env",
        "LimitCORE=0",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "User=",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let daemon = workspace_binary("vhost-qvol").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = ScratchDir::new("systemd").expect("scratch dir");
    fs::write(
        dir.path().join("vhost-qvol@.service"),
        unit.replace(installed, &daemon.to_string_lossy()),
    )
    .expect("write the unit copy");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("vhost-qvol@vm1-disk0.service"))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    // Unknown keys and bad values are warnings with status 0: allow none.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned: {stderr}"
    );
}

#[test]
fn libvirt_domain_is_valid() {
    let xml = config("libvirt-domain.xml");
    let out = Command::new(tool("xmllint"))
        .arg("--noout")
        .arg(&xml)
        .output()
        .expect("run xmllint");
    assert!(
        out.status.success(),
        "not well-formed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(tool("virt-xml-validate"))
        .arg(&xml)
        .arg("domain")
        .output()
        .expect("run virt-xml-validate");
    assert!(
        out.status.success(),
        "not a valid libvirt domain: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&xml).expect("read the domain");
    for needed in [
        "<source type='memfd'/>",
        "<access mode='shared'/>",
        "type='vhostuser'",
    ] {
        assert!(text.contains(needed), "the domain lacks {needed}");
    }
}

#[test]
fn cloud_hypervisor_and_crosvm_scripts_parse() {
    for script in ["cloud-hypervisor.sh", "crosvm.sh", "qemu-vhost-qvol.sh"] {
        let out = Command::new("sh")
            .arg("-n")
            .arg(config(script))
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "{script} does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `qvol vm systemd NAME` writes a unit that systemd-analyze accepts, with start and stop
/// through `qvol vm`, the credential only for a keystore that has a passphrase, and the
/// install target only for `autostart: true`.
#[test]
fn qvol_vm_systemd_units_pass_systemd_analyze_verify() {
    let analyze = tool("systemd-analyze");
    let f = integration::fixture::Fixture::new();
    let vms = f.path("vms");
    let vms_arg = vms.to_string_lossy().into_owned();
    f.qvol(["vm", "new", "web01", "--vms-dir", &vms_arg])
        .success();
    let config_path = vms.join("web01/config.yaml");
    let text = fs::read_to_string(&config_path).expect("config.yaml");
    for autostart in [false, true] {
        fs::write(
            &config_path,
            text.replace("autostart: false", &format!("autostart: {autostart}")),
        )
        .expect("edit config.yaml");
        let out = f
            .qvol(["vm", "systemd", "web01", "--vms-dir", &vms_arg])
            .success();
        let unit = out.stdout.clone();
        assert!(unit.contains("ExecStart=") && unit.contains(" vm start web01 --wait --vms-dir "));
        assert!(unit.contains(" vm stop web01 --timeout 60 --vms-dir "));
        assert_eq!(
            unit.contains("WantedBy=multi-user.target"),
            autostart,
            "wanted at boot exactly when autostart is true"
        );
        // The fixture's keystore has no passphrase: loading one would be refused.
        assert!(!unit.contains("\nLoadCredential="), "{unit}");
        let dir = ScratchDir::new("vm-systemd").expect("scratch dir");
        let file = dir.path().join("qvol-vm-web01.service");
        fs::write(&file, &unit).expect("write the unit");
        let verify = Command::new(&analyze)
            .arg("verify")
            .arg(&file)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("run systemd-analyze verify");
        let stderr = String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success(),
            "systemd-analyze verify failed: {stderr}"
        );
        assert!(
            stderr.trim().is_empty(),
            "systemd-analyze verify warned: {stderr}"
        );
    }
}
