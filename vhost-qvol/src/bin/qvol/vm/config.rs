//! A VM's `config.yaml`: parsed with the line of every key, validated once into a
//! [`VmConfig`], and edited in place (only the lines of `storage.encryption.key_id` and
//! `algorithm` change; comments and the rest of the file stay as they are).
//!
//! ```yaml
//! vm: {name: web01, type: linux, description: "..."}
//! machine: {type: q35, accel: kvm}           # kvm falls back to tcg when /dev/kvm does not work
//! hardware:
//!   cpu: {model: max, cores: 2}
//!   memory: {size: 1024}                     # MiB
//!   disk:
//!     primary: {path: disk.qvol, size: 20G}  # relative to the VM's directory; more disks allowed
//!     data: {path: "rbd:vms/web01-data", size: 20G, ceph_conf: /etc/ceph/ceph.conf, ceph_id: qvol}
//! boot: {kernel: /path/vmlinuz, initrd: /path/initrd.img, cmdline: "console=ttyS0 root=/dev/vda"}
//! network: {mode: user, device: virtio-net-pci, mac: "52:54:00:12:34:56"}
//! storage:
//!   encryption: {enabled: true, algorithm: xchacha20-poly1305, key_encapsulation: ML-KEM-1024+X25519, key_id: web01-1a2b3c4d}
//! autostart: false
//! ```

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::Node;
use qvol_core::CipherSuite;
use qvol_rbd::{CephOptions, RbdName};
use vhost_qvol::size::parse_size;

/// The file name of a VM's configuration.
pub const CONFIG_FILE: &str = "config.yaml";
/// The only key encapsulation qvol has.
pub const KEM: &str = "ML-KEM-1024+X25519";

/// `machine.accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM (falls back to TCG, with a warning, when it does not work).
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

/// `network.mode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// QEMU user-mode networking (no privileges needed).
    User,
    /// No network.
    None,
}

/// One disk of `hardware.disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Its key under `hardware.disk` (`primary`, ...).
    pub id: String,
    /// Where the image is: a file (resolved against the VM's directory), or an RBD image
    /// `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE` as written.
    pub path: PathBuf,
    /// Its size when it has to be created.
    pub size: Option<u64>,
    /// For an `rbd:` disk: the Ceph cluster and client id (`ceph_conf`, `ceph_id`; Ceph's
    /// defaults where absent).
    pub ceph: CephOptions,
}

impl DiskConfig {
    /// Whether this disk is a qvol volume (by its extension; an `rbd:` disk always is).
    pub fn is_qvol(&self) -> bool {
        self.is_rbd() || self.path.extension().is_some_and(|e| e == "qvol")
    }

    /// Whether this disk is an RBD image.
    pub fn is_rbd(&self) -> bool {
        RbdName::from_path(&self.path).is_some()
    }

    /// The format QEMU runs a plain disk with (by its extension: `.raw` and `.img` are raw,
    /// anything else qcow2). Every tool that reads the disk is told this format, never left
    /// to guess it: a raw disk's first sector is the guest's to write, and a guessed qcow2
    /// header there could name any host file as its backing file.
    pub fn qemu_format(&self) -> &'static str {
        match self.path.extension().and_then(|e| e.to_str()) {
            Some("raw" | "img") => "raw",
            _ => "qcow2",
        }
    }
}

/// `boot`: direct kernel boot (firmware boot when absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootConfig {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// A validated `config.yaml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// `vm.name`.
    pub name: String,
    /// `vm.type`.
    pub kind: String,
    /// `vm.description`.
    pub description: String,
    /// `machine.type`.
    pub machine: String,
    /// `machine.accel`.
    pub accel: Accel,
    /// `hardware.cpu.model`.
    pub cpu_model: String,
    /// `hardware.cpu.cores`.
    pub cores: u16,
    /// `hardware.memory.size`, MiB.
    pub memory_mib: u64,
    /// `hardware.disk.*`, `primary` first.
    pub disks: Vec<DiskConfig>,
    /// `boot`.
    pub boot: Option<BootConfig>,
    /// `network.mode`.
    pub net_mode: NetMode,
    /// `network.device`.
    pub net_device: String,
    /// `network.mac`.
    pub mac: String,
    /// `storage.encryption.enabled`.
    pub encrypted: bool,
    /// `storage.encryption.algorithm`.
    pub suite: CipherSuite,
    /// `storage.encryption.key_id` (set by `qvol vm start` when it creates the key).
    pub key_id: Option<String>,
    /// `autostart`.
    pub autostart: bool,
}

/// Where a sentence about the file points.
struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn at(&self, line: usize, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}:{line}: {what}", self.file)
    }

    fn line_of(node: &MarkedScalarNode) -> usize {
        node.span().start().map_or(0, |m| m.line())
    }

    /// Refuses keys of `map` not in `known` (a typo must not be ignored silently).
    fn only(&self, map: &MarkedMappingNode, path: &str, known: &[&str]) -> anyhow::Result<()> {
        for (key, _) in map.iter() {
            if !known.contains(&key.as_str()) {
                let full = if path.is_empty() {
                    key.as_str().to_string()
                } else {
                    format!("{path}.{}", key.as_str())
                };
                return Err(self.at(
                    Self::line_of(key),
                    format!("unknown key {full} (known here: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// The line of `key` in `map`, if it is there.
    fn key_line(map: &MarkedMappingNode, key: &str) -> Option<usize> {
        map.iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(k, _)| Self::line_of(k))
    }

    fn map<'n>(
        &self,
        parent: &'n MarkedMappingNode,
        key: &str,
        path: &str,
    ) -> anyhow::Result<Option<&'n MarkedMappingNode>> {
        match parent.get_node(key) {
            None => Ok(None),
            // `key:` with nothing after it (YAML null) holds no keys.
            Some(Node::Scalar(s)) if matches!(s.as_str(), "" | "~" | "null") => Ok(None),
            Some(Node::Mapping(m)) => Ok(Some(m)),
            Some(other) => Err(self.at(
                other.span().start().map_or(0, |m| m.line()),
                format!("{path} must be a mapping of keys"),
            )),
        }
    }

    fn scalar<'n>(
        &self,
        parent: &'n MarkedMappingNode,
        key: &str,
        path: &str,
    ) -> anyhow::Result<Option<&'n MarkedScalarNode>> {
        match parent.get_node(key) {
            None => Ok(None),
            Some(Node::Scalar(s)) => Ok(Some(s)),
            Some(other) => Err(self.at(
                other.span().start().map_or(0, |m| m.line()),
                format!("{path} must be a single value"),
            )),
        }
    }

    fn text(
        &self,
        parent: &MarkedMappingNode,
        key: &str,
        path: &str,
    ) -> anyhow::Result<Option<String>> {
        Ok(self
            .scalar(parent, key, path)?
            .map(|s| s.as_str().to_string()))
    }

    fn number(
        &self,
        parent: &MarkedMappingNode,
        key: &str,
        path: &str,
        what: &str,
    ) -> anyhow::Result<Option<u64>> {
        let Some(s) = self.scalar(parent, key, path)? else {
            return Ok(None);
        };
        s.as_str()
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| self.at(Self::line_of(s), format!("{path} must be {what}")))
    }

    fn flag(
        &self,
        parent: &MarkedMappingNode,
        key: &str,
        path: &str,
    ) -> anyhow::Result<Option<bool>> {
        let Some(s) = self.scalar(parent, key, path)? else {
            return Ok(None);
        };
        match s.as_str().trim() {
            "true" | "yes" | "on" => Ok(Some(true)),
            "false" | "no" | "off" => Ok(Some(false)),
            _ => Err(self.at(Self::line_of(s), format!("{path} must be true or false"))),
        }
    }
}

/// Parses and validates `text` (named `file` in messages); relative disk paths are taken
/// from `vm_dir`.
pub fn parse(text: &str, file: &str, vm_dir: &Path) -> anyhow::Result<VmConfig> {
    let ctx = Ctx { file };
    let root = marked_yaml::parse_yaml(0, text)
        .map_err(|e| anyhow!("{file}: not valid YAML at {}", yaml_error(&e)))?;
    let root = root
        .as_mapping()
        .ok_or_else(|| anyhow!("{file}: the top level must be a mapping of keys"))?;
    ctx.only(
        root,
        "",
        &[
            "vm",
            "machine",
            "hardware",
            "boot",
            "network",
            "storage",
            "autostart",
        ],
    )?;
    let vm = ctx
        .map(root, "vm", "vm")?
        .ok_or_else(|| anyhow!("{file}: vm.name is missing"))?;
    ctx.only(vm, "vm", &["name", "type", "description"])?;
    let name_node = ctx
        .scalar(vm, "name", "vm.name")?
        .ok_or_else(|| anyhow!("{file}: vm.name is missing"))?;
    let name = name_node.as_str().to_string();
    qvol_keys::validate_vm_name(&name).map_err(|e| ctx.at(Ctx::line_of(name_node), e))?;

    let empty = MarkedMappingNode::new_empty(marked_yaml::Span::new_blank());
    let machine = ctx.map(root, "machine", "machine")?.unwrap_or(&empty);
    ctx.only(machine, "machine", &["type", "accel"])?;
    let machine_type = ctx
        .text(machine, "type", "machine.type")?
        .unwrap_or_else(|| "q35".into());
    if !known_machine(&machine_type) {
        let line = ctx
            .scalar(machine, "type", "machine.type")?
            .map_or(0, Ctx::line_of);
        bail!(ctx.at(
            line,
            format!("machine.type {machine_type:?} is not a machine type qvol runs (q35, pc, pc-q35-*, pc-i440fx-*)")
        ));
    }
    let accel = match ctx.scalar(machine, "accel", "machine.accel")? {
        None => Accel::Kvm,
        Some(s) => match s.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => bail!(ctx.at(
                Ctx::line_of(s),
                format!("machine.accel must be kvm or tcg, not {other:?}")
            )),
        },
    };

    let hw = ctx
        .map(root, "hardware", "hardware")?
        .ok_or_else(|| anyhow!("{file}: hardware is missing (hardware.memory.size and hardware.disk.primary are needed)"))?;
    ctx.only(hw, "hardware", &["cpu", "memory", "disk"])?;
    let cpu = ctx.map(hw, "cpu", "hardware.cpu")?.unwrap_or(&empty);
    ctx.only(cpu, "hardware.cpu", &["model", "cores"])?;
    let cpu_model = ctx
        .text(cpu, "model", "hardware.cpu.model")?
        .unwrap_or_else(|| "max".into());
    if !plain_name(&cpu_model) {
        let line = ctx.scalar(cpu, "model", "")?.map_or(0, Ctx::line_of);
        bail!(ctx.at(
            line,
            "hardware.cpu.model must be a QEMU CPU model name (letters, digits, '.', '_', '-')"
        ));
    }
    let cores = ctx
        .number(
            cpu,
            "cores",
            "hardware.cpu.cores",
            "a number of cores from 1 to 64",
        )?
        .unwrap_or(1);
    if !(1..=64).contains(&cores) {
        let line = ctx.scalar(cpu, "cores", "")?.map_or(0, Ctx::line_of);
        bail!(ctx.at(
            line,
            "hardware.cpu.cores must be a number of cores from 1 to 64"
        ));
    }
    // A missing size points at `memory:`, or at `hardware:` when that is missing too.
    let memory_line = Ctx::key_line(hw, "memory")
        .or_else(|| Ctx::key_line(root, "hardware"))
        .unwrap_or(0);
    let memory = ctx.map(hw, "memory", "hardware.memory")?.unwrap_or(&empty);
    ctx.only(memory, "hardware.memory", &["size"])?;
    let memory_mib = ctx
        .number(memory, "size", "hardware.memory.size", "a number of MiB")?
        .ok_or_else(|| ctx.at(memory_line, "hardware.memory.size is missing"))?;
    if !(16..=1 << 20).contains(&memory_mib) {
        let line = ctx.scalar(memory, "size", "")?.map_or(0, Ctx::line_of);
        bail!(ctx.at(
            line,
            "hardware.memory.size must be a number of MiB from 16 to 1048576"
        ));
    }
    let disks = parse_disks(&ctx, hw, vm_dir)?;

    let boot = match ctx.map(root, "boot", "boot")? {
        None => None,
        Some(b) => {
            ctx.only(b, "boot", &["kernel", "initrd", "cmdline"])?;
            let kernel = ctx.text(b, "kernel", "boot.kernel")?.ok_or_else(|| {
                anyhow!("{file}: boot.kernel is missing (remove boot for a firmware boot)")
            })?;
            Some(BootConfig {
                kernel: vm_dir.join(kernel),
                initrd: ctx
                    .text(b, "initrd", "boot.initrd")?
                    .map(|p| vm_dir.join(p)),
                cmdline: ctx.text(b, "cmdline", "boot.cmdline")?.unwrap_or_default(),
            })
        }
    };

    let net = ctx.map(root, "network", "network")?.unwrap_or(&empty);
    ctx.only(net, "network", &["mode", "device", "mac"])?;
    let net_mode = match ctx.scalar(net, "mode", "network.mode")? {
        None => NetMode::User,
        Some(s) => match s.as_str() {
            "user" => NetMode::User,
            "none" => NetMode::None,
            other => bail!(ctx.at(
                Ctx::line_of(s),
                format!("network.mode must be user or none, not {other:?}")
            )),
        },
    };
    let net_device = ctx
        .text(net, "device", "network.device")?
        .unwrap_or_else(|| "virtio-net-pci".into());
    if !net_device
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        let line = ctx.scalar(net, "device", "")?.map_or(0, Ctx::line_of);
        bail!(ctx.at(
            line,
            "network.device must be a QEMU device name such as virtio-net-pci"
        ));
    }
    let mac = match ctx.scalar(net, "mac", "network.mac")? {
        None => default_mac(&name),
        Some(s) if valid_mac(s.as_str()) => s.as_str().to_ascii_lowercase(),
        Some(s) => bail!(ctx.at(
            Ctx::line_of(s),
            "network.mac must be a unicast MAC address such as 52:54:00:12:34:56"
        )),
    };

    let storage = ctx.map(root, "storage", "storage")?.unwrap_or(&empty);
    ctx.only(storage, "storage", &["encryption"])?;
    let enc = ctx
        .map(storage, "encryption", "storage.encryption")?
        .unwrap_or(&empty);
    ctx.only(
        enc,
        "storage.encryption",
        &["enabled", "algorithm", "key_encapsulation", "key_id"],
    )?;
    let encrypted = ctx
        .flag(enc, "enabled", "storage.encryption.enabled")?
        .unwrap_or(false);
    let suite = match ctx.scalar(enc, "algorithm", "storage.encryption.algorithm")? {
        None => CipherSuite::XChaCha20Poly1305,
        Some(s) => s.as_str().parse().map_err(|_| {
            ctx.at(
                Ctx::line_of(s),
                "storage.encryption.algorithm must be xchacha20-poly1305 or aegis-256",
            )
        })?,
    };
    if let Some(s) = ctx.scalar(
        enc,
        "key_encapsulation",
        "storage.encryption.key_encapsulation",
    )? {
        if s.as_str() != KEM {
            bail!(ctx.at(
                Ctx::line_of(s),
                format!("storage.encryption.key_encapsulation must be {KEM}")
            ));
        }
    }
    let key_id = ctx
        .text(enc, "key_id", "storage.encryption.key_id")?
        .filter(|k| !k.is_empty());
    let autostart = ctx.flag(root, "autostart", "autostart")?.unwrap_or(false);
    Ok(VmConfig {
        name,
        kind: ctx
            .text(vm, "type", "vm.type")?
            .unwrap_or_else(|| "linux".into()),
        description: ctx
            .text(vm, "description", "vm.description")?
            .unwrap_or_default(),
        machine: machine_type,
        accel,
        cpu_model,
        cores: cores as u16,
        memory_mib,
        disks,
        boot,
        net_mode,
        net_device,
        mac,
        encrypted,
        suite,
        key_id,
        autostart,
    })
}

fn parse_disks(
    ctx: &Ctx<'_>,
    hw: &MarkedMappingNode,
    vm_dir: &Path,
) -> anyhow::Result<Vec<DiskConfig>> {
    let disk_map = ctx
        .map(hw, "disk", "hardware.disk")?
        .ok_or_else(|| anyhow!("{}: hardware.disk.primary is missing", ctx.file))?;
    let mut disks = Vec::new();
    for (key, node) in disk_map.iter() {
        let id = key.as_str().to_string();
        let path_name = format!("hardware.disk.{id}");
        let Node::Mapping(d) = node else {
            bail!(ctx.at(
                Ctx::line_of(key),
                format!("{path_name} must be a mapping with path and size")
            ));
        };
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || id.len() > 32
        {
            bail!(ctx.at(
                Ctx::line_of(key),
                format!("{path_name}: a disk name is 1 to 32 letters, digits, '_' or '-'")
            ));
        }
        ctx.only(d, &path_name, &["path", "size", "ceph_conf", "ceph_id"])?;
        let path = ctx
            .scalar(d, "path", &format!("{path_name}.path"))?
            .ok_or_else(|| ctx.at(Ctx::line_of(key), format!("{path_name}.path is missing")))?;
        let ceph = parse_ceph(ctx, d, &path_name, path, vm_dir)?;
        let path = match ceph {
            Some(_) => PathBuf::from(path.as_str()),
            None => vm_dir.join(path.as_str()),
        };
        let size = match ctx.scalar(d, "size", &format!("{path_name}.size"))? {
            None => None,
            Some(s) => Some(
                parse_size(s.as_str())
                    .ok()
                    .filter(|n| *n > 0 && n % 4096 == 0)
                    .ok_or_else(|| {
                        ctx.at(
                            Ctx::line_of(s),
                            format!(
                                "{path_name}.size must be a size such as 20G (a multiple of 4 KiB)"
                            ),
                        )
                    })?,
            ),
        };
        disks.push(DiskConfig {
            id,
            path,
            size,
            ceph: ceph.unwrap_or_default(),
        });
    }
    let mut rbd = disks.iter().filter(|d| d.is_rbd());
    if let Some(first) = rbd.next() {
        if let Some(other) = rbd.find(|d| d.ceph != first.ceph) {
            bail!(ctx.at(
                Ctx::key_line(disk_map, &other.id).unwrap_or(0),
                format!(
                    "hardware.disk.{} names another Ceph cluster or client than \
                     hardware.disk.{} (ceph_conf, ceph_id): the rbd: disks of a VM share one",
                    other.id, first.id
                )
            ));
        }
    }
    let Some(primary) = disks.iter().position(|d| d.id == "primary") else {
        bail!(ctx.at(
            disk_map.span().start().map_or(0, |m| m.line()),
            "hardware.disk.primary is missing"
        ));
    };
    disks.swap(0, primary);
    Ok(disks)
}

/// For a disk whose `path` is `rbd:...`: the name checked, and its `ceph_conf` (relative to
/// the VM's directory) and `ceph_id`; `None` for a file disk, which may not have them.
fn parse_ceph(
    ctx: &Ctx<'_>,
    d: &MarkedMappingNode,
    path_name: &str,
    path: &MarkedScalarNode,
    vm_dir: &Path,
) -> anyhow::Result<Option<CephOptions>> {
    let conf = ctx.text(d, "ceph_conf", &format!("{path_name}.ceph_conf"))?;
    let id = ctx.text(d, "ceph_id", &format!("{path_name}.ceph_id"))?;
    match RbdName::from_path(Path::new(path.as_str())) {
        Some(Ok(_)) => Ok(Some(CephOptions {
            conf: conf.map(|c| vm_dir.join(c)),
            id,
        })),
        Some(Err(e)) => Err(ctx.at(Ctx::line_of(path), format!("{path_name}.path: {e}"))),
        None => match ["ceph_conf", "ceph_id"]
            .into_iter()
            .find_map(|k| Ctx::key_line(d, k).map(|line| (k, line)))
        {
            Some((k, line)) => Err(ctx.at(
                line,
                format!("{path_name}.{k} is only for a disk whose path is rbd:POOL/IMAGE"),
            )),
            None => Ok(None),
        },
    }
}

/// The machine types qvol starts VMs with (both have PCI for virtio devices).
fn known_machine(t: &str) -> bool {
    (matches!(t, "q35" | "pc") || t.starts_with("pc-q35-") || t.starts_with("pc-i440fx-"))
        && plain_name(t)
}

/// A name QEMU takes as one option value: letters, digits, '.', '_', '-' (no ',' or '=').
fn plain_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// A locally administered QEMU MAC derived from the VM name (stable across starts).
pub fn default_mac(name: &str) -> String {
    let h = fnv_bytes(name.as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// FNV-1a, spread over 3 bytes: only to make distinct names give distinct MACs.
fn fnv_bytes(data: &[u8]) -> [u8; 3] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [b[0] ^ b[3], b[1] ^ b[4], b[2] ^ b[5]]
}

/// A YAML error as "line N: what" (the parser says "LINE:COLUMN: what").
fn yaml_error(e: &marked_yaml::LoadError) -> String {
    let text = e.to_string();
    match text.split_once(": ") {
        Some((pos, msg)) if pos.split(':').all(|p| p.parse::<usize>().is_ok()) => {
            let line = pos.split(':').next().unwrap_or("?");
            format!("line {line}: {msg}")
        }
        _ => text,
    }
}

/// `text` with `storage.encryption.key_id` and `algorithm` set (lines replaced in place, or
/// added under `encryption:`); everything else, comments included, unchanged.
pub fn with_encryption_keys(text: &str, key_id: &str, algorithm: &str) -> anyhow::Result<String> {
    set_scalars(
        text,
        &["storage", "encryption"],
        &[("key_id", key_id), ("algorithm", algorithm)],
    )
}

/// `text` with the keys `pairs` of the block mapping at `parent` set to plain values: a
/// key's line is rewritten in place (keeping a trailing comment), a missing key is added
/// after the mapping's last key with the same indentation. Nothing else changes.
pub fn set_scalars(text: &str, parent: &[&str], pairs: &[(&str, &str)]) -> anyhow::Result<String> {
    let root = marked_yaml::parse_yaml(0, text)
        .map_err(|e| anyhow!("not valid YAML: {}", yaml_error(&e)))?;
    let mut map = root.as_mapping();
    for key in parent {
        map = map.and_then(|m| m.get_mapping(key));
    }
    let dotted = parent.join(".");
    let map = map.ok_or_else(|| anyhow!("config.yaml has no {dotted} mapping to update"))?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut last_line = 0usize;
    let mut indent = String::new();
    for (key, _) in map.iter() {
        let line = Ctx::line_of(key);
        last_line = last_line.max(line);
        if let Some(l) = lines.get(line.wrapping_sub(1)) {
            indent = l[..l.len() - l.trim_start().len()].to_string();
        }
    }
    if map.iter().next().is_none() || indent.is_empty() {
        bail!("{dotted} must be written as an indented block (one key per line) for qvol to update it");
    }
    let mut inserts: Vec<String> = Vec::new();
    for &(key, value) in pairs {
        let own_line = |node: &MarkedScalarNode| {
            node.span().start().and_then(|m| {
                let line = m.line().checked_sub(1)?;
                lines
                    .get(line)
                    .filter(|l| l.trim_start().starts_with(&format!("{key}:")))
                    .map(|_| line)
            })
        };
        match map.get_scalar(key) {
            Some(node) => {
                let line = own_line(node).ok_or_else(|| {
                    anyhow!("{dotted}.{key} must be on a line of its own for qvol to update it")
                })?;
                // A comment is kept only when the old value is a plain word: anything else
                // (quotes, spaces, '#' inside a value) is rewritten without it.
                let rest = lines[line].trim_start()[key.len() + 1..].trim_start();
                let comment = match rest.split_once(" #") {
                    Some((old, c)) if !old.trim_end().contains(['"', '\'', ' ']) => {
                        format!(" #{c}")
                    }
                    _ => String::new(),
                };
                lines[line] = format!("{indent}{key}: {}{comment}", yaml_value(value));
            }
            None => inserts.push(format!("{indent}{key}: {}", yaml_value(value))),
        }
    }
    for (i, line) in inserts.into_iter().enumerate() {
        lines.insert(last_line + i, line);
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    // The edit must say exactly what was meant, and nothing else may have moved.
    let check = marked_yaml::parse_yaml(0, out.as_str())
        .map_err(|e| anyhow!("internal: the edited config.yaml does not parse: {e}"))?;
    let mut map = check.as_mapping();
    for key in parent {
        map = map.and_then(|m| m.get_mapping(key));
    }
    for &(key, value) in pairs {
        let got = map
            .and_then(|m| m.get_scalar(key))
            .map(|v| v.as_str().to_string());
        if got.as_deref() != Some(value) {
            bail!("internal: the edited config.yaml does not hold {dotted}.{key} as intended");
        }
    }
    Ok(out)
}

/// The `config.yaml` that `qvol vm new` writes.
pub fn new_config_text(
    name: &str,
    cores: u16,
    memory_mib: u64,
    disk_size: &str,
    encrypt: bool,
    boot: Option<(&Path, Option<&Path>, &str)>,
) -> String {
    let disk = if encrypt { "disk.qvol" } else { "disk.qcow2" };
    let boot = match boot {
        Some((kernel, initrd, cmdline)) => format!(
            "boot:\n  kernel: {}\n{}  cmdline: {}\n",
            yaml_str(&kernel.display().to_string()),
            initrd.map_or(String::new(), |i| format!("  initrd: {}\n", yaml_str(&i.display().to_string()))),
            yaml_str(cmdline)
        ),
        None => "# boot: {kernel: /path/vmlinuz, initrd: /path/initrd.img, cmdline: \"...\"}  (firmware boot when absent)\n".into(),
    };
    format!(
        "# qvol VM configuration (qvol vm start {name})\n\
         vm:\n  name: {name}\n  type: linux\n  description: \"\"\n\
         machine:\n  type: q35\n  accel: kvm        # falls back to tcg when KVM does not work\n\
         hardware:\n  cpu:\n    model: max\n    cores: {cores}\n  memory:\n    size: {memory_mib}       # MiB\n\
         \x20 disk:\n    primary:\n      path: {disk}\n      size: {disk_size}\n\
         {boot}\
         network:\n  mode: user\n  device: virtio-net-pci\n  mac: \"{mac}\"\n\
         storage:\n  encryption:\n    enabled: {encrypt}\n    algorithm: xchacha20-poly1305\n    key_encapsulation: {KEM}\n\
         autostart: false\n",
        mac = default_mac(name),
    )
}

/// A value as YAML: as it is when it is a plain word (`disk.qvol`, `web01-1a2b`, `true`),
/// double-quoted otherwise (a space, '#', ':', quotes...).
fn yaml_value(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/+-".contains(&b))
        && !s.starts_with(['-', '.']);
    if plain {
        s.to_string()
    } else {
        yaml_str(s)
    }
}

/// A YAML double-quoted string.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        new_config_text(
            "web01",
            2,
            512,
            "64M",
            true,
            Some((
                Path::new("/k/vmlinuz"),
                Some(Path::new("/k/initrd")),
                "console=ttyS0 root=/dev/vda",
            )),
        )
    }

    #[test]
    fn the_new_config_parses() {
        let c = parse(&sample(), "config.yaml", Path::new("/vms/web01")).unwrap();
        assert_eq!(c.name, "web01");
        assert_eq!(c.cores, 2);
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.disks[0].path, Path::new("/vms/web01/disk.qvol"));
        assert_eq!(c.disks[0].size, Some(64 << 20));
        assert!(c.encrypted && c.disks[0].is_qvol());
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(
            c.boot.as_ref().unwrap().cmdline,
            "console=ttyS0 root=/dev/vda"
        );
        assert_eq!(c.mac, default_mac("web01"));
        assert_eq!(c.key_id, None);
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let bad = |from: &str, to: &str| {
            let text = sample().replacen(from, to, 1);
            parse(&text, "config.yaml", Path::new("/v"))
                .unwrap_err()
                .to_string()
        };
        let line_of = |needle: &str| sample().lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert_eq!(
            bad("size: 512", "size: lots"),
            format!(
                "config.yaml:{}: hardware.memory.size must be a number of MiB",
                line_of("size: 512")
            )
        );
        assert!(bad("  cores: 2", "  coers: 2").contains("unknown key hardware.cpu.coers"));
        assert_eq!(
            bad("    size: 512       # MiB\n", ""),
            format!(
                "config.yaml:{}: hardware.memory.size is missing",
                line_of("memory:")
            )
        );
        assert!(bad("type: q35", "type: sparc").contains("machine.type \"sparc\""));
        assert!(bad("name: web01", "name: a/b")
            .starts_with(&format!("config.yaml:{}:", line_of("name: web01"))));
        assert!(
            bad("      path: disk.qvol\n", "").contains("hardware.disk.primary.path is missing")
        );
        assert!(bad("mac: \"", "mac: \"01").contains("network.mac"));
        assert!(bad("enabled: true", "enabled: maybe").contains("true or false"));
        let err = bad("vm:", "vm: [");
        assert!(
            err.starts_with("config.yaml: not valid YAML at line "),
            "{err}"
        );
    }

    #[test]
    fn rbd_disks_keep_their_name_and_are_checked() {
        let with = |disks: &str| {
            let text = sample().replacen("      path: disk.qvol\n", disks, 1);
            parse(&text, "config.yaml", Path::new("/v"))
        };
        let c =
            with("      path: rbd:vms/ns/web01\n      ceph_conf: ceph.conf\n      ceph_id: qvol\n")
                .unwrap();
        let d = &c.disks[0];
        assert_eq!(d.path, Path::new("rbd:vms/ns/web01"));
        assert!(d.is_rbd() && d.is_qvol());
        assert_eq!(d.ceph.conf.as_deref(), Some(Path::new("/v/ceph.conf")));
        assert_eq!(d.ceph.id.as_deref(), Some("qvol"));
        let err = |disks: &str| with(disks).unwrap_err().to_string();
        let e = err("      path: rbd:vms/a/b/c\n");
        assert!(
            e.contains("hardware.disk.primary.path: \"rbd:vms/a/b/c\" is not an RBD"),
            "{e}"
        );
        let e = err("      path: disk.qvol\n      ceph_id: qvol\n");
        assert!(
            e.contains("hardware.disk.primary.ceph_id is only for a disk whose path is rbd:"),
            "{e}"
        );
        let e = err(
            "      path: rbd:vms/a\n      ceph_id: one\n    data:\n      path: rbd:vms/b\n      \
             ceph_id: two\n",
        );
        assert!(
            e.contains("hardware.disk.data names another Ceph cluster or client"),
            "{e}"
        );
    }

    #[test]
    fn key_writeback_keeps_the_rest_of_the_file() {
        let text = sample().replace(
            "autostart: false",
            "autostart: false   # boot with the host",
        );
        let out = with_encryption_keys(&text, "web01-1234abcd", "aegis-256").unwrap();
        let c = parse(&out, "config.yaml", Path::new("/v")).unwrap();
        assert_eq!(c.key_id.as_deref(), Some("web01-1234abcd"));
        assert_eq!(c.suite, CipherSuite::Aegis256);
        assert!(out.contains("# boot with the host"));
        assert!(out.starts_with("# qvol VM configuration"));
        // Once set, a second write replaces the lines instead of adding more.
        let again = with_encryption_keys(&out, "web01-ffff0000", "xchacha20-poly1305").unwrap();
        assert_eq!(again.matches("key_id:").count(), 1);
        assert_eq!(again.lines().count(), out.lines().count());
        let c = parse(&again, "config.yaml", Path::new("/v")).unwrap();
        assert_eq!(c.key_id.as_deref(), Some("web01-ffff0000"));
    }

    #[test]
    fn edits_quote_what_needs_it_and_say_exactly_what_was_meant() {
        let text = sample().replace(
            "      path: disk.qvol",
            "      path: \"disk #1.qcow2\"  # the old one",
        );
        let out = set_scalars(
            &text,
            &["hardware", "disk", "primary"],
            &[("path", "disk #1.qvol")],
        )
        .unwrap();
        let c = parse(&out, "config.yaml", Path::new("/v")).unwrap();
        assert_eq!(c.disks[0].path, Path::new("/v/disk #1.qvol"));
        assert!(out.contains("path: \"disk #1.qvol\""), "{out}");
        let plain = set_scalars(
            &sample(),
            &["storage", "encryption"],
            &[("enabled", "false")],
        )
        .unwrap();
        assert!(plain.contains("    enabled: false\n"), "{plain}");
        assert!(
            !parse(&plain, "config.yaml", Path::new("/v"))
                .unwrap()
                .encrypted
        );
        assert!(set_scalars(&sample(), &["nope"], &[("x", "y")]).is_err());
    }

    #[test]
    fn machine_and_cpu_names_cannot_carry_qemu_options() {
        let bad = |from: &str, to: &str| {
            parse(
                &sample().replacen(from, to, 1),
                "config.yaml",
                Path::new("/v"),
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad("type: q35", "type: pc-q35-7.2,smm=off").contains("machine.type"));
        assert!(bad("model: max", "model: max,+vmx").contains("hardware.cpu.model"));
    }
}
