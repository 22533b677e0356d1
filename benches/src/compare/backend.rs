//! The backends under comparison: how to create their images and start their processes.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qvol_core::suite::CipherSuite;

/// One backend configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// qemu-storage-daemon exporting a raw file: no encryption.
    QsdRaw,
    /// qemu-storage-daemon exporting a LUKS image (aes-256-xts): what QEMU users pick today.
    QsdLuks,
    /// vhost-qvol with the given suite.
    Qvol(CipherSuite),
    /// qemu-storage-daemon exporting an RBD image through QEMU's rbd driver: no encryption.
    QsdRbdRaw,
    /// qemu-storage-daemon, LUKS on an RBD image: the usual encrypted disk of OpenStack.
    QsdRbdLuks,
    /// vhost-qvol serving `rbd:POOL/IMAGE` with the given suite.
    QvolRbd(CipherSuite),
    /// vhost-qvol with the given suite on a volume created with `--compress` (zstd in
    /// 16 KiB units by default, docs/FORMAT.md §18; `compare --compress` sets the level and
    /// unit).
    QvolZstd(CipherSuite),
}

impl BackendKind {
    /// Every backend, in table order.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::QsdRaw,
        BackendKind::QsdLuks,
        BackendKind::Qvol(CipherSuite::XChaCha20Poly1305),
        BackendKind::Qvol(CipherSuite::Aegis256),
    ];

    /// The same backends with their images in Ceph RBD (the pool `$QVOL_BENCH_RBD_POOL`,
    /// default `rbd`, of the cluster `$CEPH_CONF` names; `scripts/bench.sh --rbd` starts a
    /// throwaway one).
    pub const RBD: [BackendKind; 4] = [
        BackendKind::QsdRbdRaw,
        BackendKind::QsdRbdLuks,
        BackendKind::QvolRbd(CipherSuite::XChaCha20Poly1305),
        BackendKind::QvolRbd(CipherSuite::Aegis256),
    ];

    /// The qvol backends on compressed volumes (each compared with its plain twin,
    /// [`BackendKind::plain_twin`]).
    pub const ZSTD: [BackendKind; 2] = [
        BackendKind::QvolZstd(CipherSuite::XChaCha20Poly1305),
        BackendKind::QvolZstd(CipherSuite::Aegis256),
    ];

    /// Every backend `--backends` knows, in table order.
    pub fn every() -> impl Iterator<Item = BackendKind> {
        BackendKind::ALL
            .into_iter()
            .chain(BackendKind::ZSTD)
            .chain(BackendKind::RBD)
    }

    /// For a compressed qvol backend, the same suite without compression.
    pub fn plain_twin(self) -> Option<BackendKind> {
        match self {
            BackendKind::QvolZstd(suite) => Some(BackendKind::Qvol(suite)),
            _ => None,
        }
    }

    /// Name in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::QsdRaw => "qsd raw",
            BackendKind::QsdLuks => "qsd LUKS",
            BackendKind::Qvol(CipherSuite::XChaCha20Poly1305) => "qvol xchacha20-poly1305",
            BackendKind::Qvol(CipherSuite::Aegis256) => "qvol aegis-256",
            BackendKind::QsdRbdRaw => "qsd rbd raw",
            BackendKind::QsdRbdLuks => "qsd rbd LUKS",
            BackendKind::QvolRbd(CipherSuite::XChaCha20Poly1305) => "qvol rbd xchacha20-poly1305",
            BackendKind::QvolRbd(CipherSuite::Aegis256) => "qvol rbd aegis-256",
            BackendKind::QvolZstd(CipherSuite::XChaCha20Poly1305) => "qvol xchacha20-poly1305 zstd",
            BackendKind::QvolZstd(CipherSuite::Aegis256) => "qvol aegis-256 zstd",
        }
    }

    /// Short name for `--backends`.
    pub fn short(self) -> &'static str {
        match self {
            BackendKind::QsdRaw => "raw",
            BackendKind::QsdLuks => "luks",
            BackendKind::Qvol(CipherSuite::XChaCha20Poly1305) => "xchacha",
            BackendKind::Qvol(CipherSuite::Aegis256) => "aegis",
            BackendKind::QsdRbdRaw => "rbd-raw",
            BackendKind::QsdRbdLuks => "rbd-luks",
            BackendKind::QvolRbd(CipherSuite::XChaCha20Poly1305) => "rbd-xchacha",
            BackendKind::QvolRbd(CipherSuite::Aegis256) => "rbd-aegis",
            BackendKind::QvolZstd(CipherSuite::XChaCha20Poly1305) => "xchacha-zstd",
            BackendKind::QvolZstd(CipherSuite::Aegis256) => "aegis-zstd",
        }
    }

    /// Whether vhost-qvol serves it.
    pub fn is_qvol(self) -> bool {
        matches!(
            self,
            BackendKind::Qvol(_) | BackendKind::QvolRbd(_) | BackendKind::QvolZstd(_)
        )
    }

    /// Whether its image is in Ceph RBD.
    pub fn is_rbd(self) -> bool {
        matches!(
            self,
            BackendKind::QsdRbdRaw | BackendKind::QsdRbdLuks | BackendKind::QvolRbd(_)
        )
    }
}

/// The RBD pool of the `rbd-*` backends.
fn rbd_pool() -> String {
    std::env::var("QVOL_BENCH_RBD_POOL").unwrap_or_else(|_| "rbd".to_owned())
}

/// The Ceph configuration of the `rbd-*` backends (as Ceph's tools find it).
fn ceph_conf() -> String {
    std::env::var("CEPH_CONF").unwrap_or_else(|_| "/etc/ceph/ceph.conf".to_owned())
}

/// Whether qemu-storage-daemon's rbd driver runs with librbd's cache off
/// (`QVOL_BENCH_RBD_CACHE=off`): each write on the OSDs when it is acknowledged, as qvol's.
pub fn rbd_cache_off() -> bool {
    std::env::var("QVOL_BENCH_RBD_CACHE").is_ok_and(|v| v == "off")
}

/// The RBD image of an `rbd-*` backend, in its pool.
fn rbd_image(kind: BackendKind) -> String {
    format!("bench-{}", kind.short())
}

/// Removes the image of `p` (a file, or an RBD image).
pub fn remove_image(p: &Prepared) {
    if p.kind.is_rbd() {
        let spec = format!("{}/{}", rbd_pool(), rbd_image(p.kind));
        let _ = Command::new("rbd")
            .args(["rm", "--no-progress", &spec])
            .stdin(Stdio::null())
            .output();
    } else {
        let _ = fs::remove_file(&p.image);
    }
}

/// The executables the comparison needs.
#[derive(Clone, Debug)]
pub struct Tools {
    /// qemu-storage-daemon (required).
    pub qsd: PathBuf,
    /// qemu-img (required for the LUKS image).
    pub qemu_img: PathBuf,
    /// `qvol` and `vhost-qvol`, or why they cannot be used.
    pub qvol: Result<(PathBuf, PathBuf), String>,
}

/// Looks `name` up in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Looks for a workspace binary next to this program (target/release), then in
/// target/release and target/debug under the current directory, then in PATH.
pub fn find_workspace_binary(name: &str) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    dirs.push(PathBuf::from("target/release"));
    dirs.push(PathBuf::from("target/debug"));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| which(name))
}

impl Tools {
    /// Finds the tools, or says how to install qemu-storage-daemon.
    pub fn find() -> Result<Tools, String> {
        let qsd = which("qemu-storage-daemon").ok_or(
            "qemu-storage-daemon is not installed (not found in PATH); install it with \
             `apt-get install qemu-system-common` (Debian/Ubuntu)",
        )?;
        let qemu_img = which("qemu-img")
            .ok_or("qemu-img is not installed (not found in PATH); install it with `apt-get install qemu-utils`")?;
        let qvol = match (find_workspace_binary("qvol"), find_workspace_binary("vhost-qvol")) {
            (Some(q), Some(v)) => Ok((q, v)),
            _ => Err("the `qvol` and `vhost-qvol` binaries were not found next to this program, in \
                      target/{release,debug} or in PATH (build them with `cargo build --release -p vhost-qvol`)"
                .to_owned()),
        };
        Ok(Tools {
            qsd,
            qemu_img,
            qvol,
        })
    }
}

/// A backend whose image exists, ready to be started.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Extra arguments for the backend process (vhost-qvol only).
    pub extra_args: Vec<String>,
    /// Which backend.
    pub kind: BackendKind,
    /// The image file.
    pub image: PathBuf,
    dir: PathBuf,
    keystore: PathBuf,
}

const LUKS_SECRET: &str = "qvol-bench-passphrase";

fn run_tool(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The compression of the `*-zstd` backends when none is named: `qvol create --compress
/// zstd` (level 3, 16 KiB units).
pub const DEFAULT_COMPRESS: &str = "zstd";

/// Creates the image of `kind` (size `size` bytes) in `dir`, replacing an old one; a
/// compressed qvol backend gets [`DEFAULT_COMPRESS`].
pub fn prepare(
    tools: &Tools,
    kind: BackendKind,
    dir: &Path,
    size: u64,
) -> Result<Prepared, String> {
    prepare_with(tools, kind, dir, size, &[DEFAULT_COMPRESS])
}

/// [`prepare`], with `compress` as the arguments of `qvol create --compress` for a
/// compressed qvol backend (e.g. `["zstd:1"]` or `["zstd", "--compress-unit", "32K"]`).
pub fn prepare_with(
    tools: &Tools,
    kind: BackendKind,
    dir: &Path,
    size: u64,
    compress: &[&str],
) -> Result<Prepared, String> {
    let image = if kind.is_rbd() {
        PathBuf::from(format!("rbd:{}/{}", rbd_pool(), rbd_image(kind)))
    } else {
        dir.join(format!("{}.img", kind.short()))
    };
    let keystore = dir.join("keystore");
    let prepared = Prepared {
        extra_args: Vec::new(),
        kind,
        image,
        dir: dir.to_path_buf(),
        keystore,
    };
    remove_image(&prepared);
    let (image, keystore) = (&prepared.image, &prepared.keystore);
    match kind {
        BackendKind::QsdRaw => {
            let f = File::create(image)
                .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
            f.set_len(size)
                .map_err(|e| format!("cannot size {}: {e}", image.display()))?;
        }
        BackendKind::QsdRbdRaw => {
            let spec = format!("{}/{}", rbd_pool(), rbd_image(kind));
            run_tool(
                Command::new("rbd").args(["create", &spec, "--size", &format!("{}M", size >> 20)]),
                "rbd create",
            )?;
        }
        BackendKind::QsdLuks | BackendKind::QsdRbdLuks => {
            // qemu-img times its PBKDF2 with getrusage(); with a 10 ms iteration time it
            // sometimes measures no CPU time at all and fails ("Unable to get accurate CPU
            // usage"), so it gets a few tries.
            let mut tries = 0;
            loop {
                tries += 1;
                remove_image(&prepared);
                let target = if kind.is_rbd() {
                    format!(
                        "rbd:{}/{}:conf={}",
                        rbd_pool(),
                        rbd_image(kind),
                        ceph_conf()
                    )
                } else {
                    image.display().to_string()
                };
                match run_tool(
                    Command::new(&tools.qemu_img)
                        .args(["create", "-q", "-f", "luks", "--object"])
                        .arg(format!("secret,id=s0,data={LUKS_SECRET}"))
                        .args(["-o", "key-secret=s0,iter-time=10"])
                        .arg(target)
                        .arg(size.to_string()),
                    "qemu-img create -f luks",
                ) {
                    Ok(_) => break,
                    Err(e) if tries < 5 && e.contains("accurate CPU usage") => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        BackendKind::Qvol(suite) | BackendKind::QvolRbd(suite) | BackendKind::QvolZstd(suite) => {
            let (qvol, _) = tools.qvol.as_ref().map_err(Clone::clone)?;
            // The comparison program removes the keystore when it starts, so this runs
            // once per run.
            if !keystore.exists() {
                run_tool(
                    Command::new(qvol).env("QVOL_KEYSTORE", keystore).args([
                        "keystore",
                        "init",
                        "--no-passphrase",
                    ]),
                    "qvol keystore init",
                )?;
            }
            let key = run_tool(
                Command::new(qvol).env("QVOL_KEYSTORE", keystore).args([
                    "key",
                    "new",
                    &format!("bench-{}", kind.short()),
                ]),
                "qvol key new",
            )?;
            let key = key.lines().last().unwrap_or("").trim().to_owned();
            let mut create = Command::new(qvol);
            create
                .env("QVOL_KEYSTORE", keystore)
                .arg("create")
                .arg(image)
                .args([
                    "--size",
                    &format!("{}K", size / 1024),
                    "--key",
                    &key,
                    "--cipher",
                    suite.name(),
                ]);
            if matches!(kind, BackendKind::QvolZstd(_)) {
                create.arg("--compress").args(compress);
            }
            run_tool(&mut create, "qvol create")?;
        }
    }
    Ok(prepared)
}

impl Prepared {
    /// The keystore a qvol image's key is in (`QVOL_KEYSTORE` for `qvol`).
    pub fn keystore(&self) -> &Path {
        &self.keystore
    }
}

/// The space an image takes, read while no backend serves it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ImageSpace {
    /// Backend label.
    pub backend: String,
    /// When it was read, e.g. "after the prefill".
    pub when: String,
    /// The image file's length (`None` for an RBD image).
    pub file_bytes: Option<u64>,
    /// The host bytes the image file takes (`st_blocks * 512`; `None` for an RBD image).
    pub host_allocated_bytes: Option<u64>,
    /// qvol: `qvol info --json`'s `allocated_bytes` (data blocks and metadata nodes in use).
    pub qvol_allocated_bytes: Option<u64>,
    /// qvol with compression units: `compression_ratio` (logical data blocks per physical
    /// data block).
    pub compression_ratio: Option<f64>,
    /// qvol with compression units: logical blocks stored in units.
    pub unit_lbns: Option<u64>,
    /// qvol with compression units: the physical blocks those units take.
    pub unit_blocks: Option<u64>,
    /// qvol with compression units: logical blocks stored plain.
    pub plain_blocks: Option<u64>,
    /// Why the qvol figures are missing, if `qvol info` failed.
    pub error: Option<String>,
}

/// Reads the space the image of `p` takes: the file's allocated blocks and, for qvol,
/// `qvol info --json` (allocation and compression usage). Call it with the backend stopped,
/// so that qvol's figures are those of a committed, closed volume.
pub fn image_space(tools: &Tools, p: &Prepared, when: &str) -> ImageSpace {
    let mut space = ImageSpace {
        backend: p.kind.label().to_owned(),
        when: when.to_owned(),
        ..ImageSpace::default()
    };
    if !p.kind.is_rbd() {
        if let Ok(meta) = fs::metadata(&p.image) {
            space.file_bytes = Some(meta.len());
            space.host_allocated_bytes = Some(meta.blocks() * 512);
        }
    }
    if !p.kind.is_qvol() {
        return space;
    }
    let info = tools
        .qvol
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|(qvol, _)| {
            run_tool(
                Command::new(qvol)
                    .env("QVOL_KEYSTORE", &p.keystore)
                    .args(["info", "--json"])
                    .arg(&p.image),
                "qvol info --json",
            )
        });
    let doc = info.and_then(|text| {
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| format!("qvol info --json printed no JSON: {e}"))
    });
    match doc {
        Ok(v) => {
            space.qvol_allocated_bytes = v["allocated_bytes"].as_u64();
            space.compression_ratio = v["compression_ratio"].as_f64();
            let usage = &v["compression_usage"];
            space.unit_lbns = usage["unit_lbns"].as_u64();
            space.unit_blocks = usage["unit_blocks"].as_u64();
            space.plain_blocks = usage["plain_blocks"].as_u64();
            if let Some(e) = v["compression_error"].as_str() {
                space.error = Some(e.to_owned());
            }
        }
        Err(e) => space.error = Some(e),
    }
    space
}

/// A running backend process; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Running {
    child: Child,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Running {
    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process: SIGTERM, up to 5 s, then SIGKILL.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Starts the backend for `p` with `queues` virtqueues and waits for its socket.
pub fn start(tools: &Tools, p: &Prepared, queues: usize) -> Result<Running, String> {
    let socket = p.dir.join(format!("{}.sock", p.kind.short()));
    let log = p.dir.join(format!("{}-q{queues}.log", p.kind.short()));
    let _ = fs::remove_file(&socket);
    let mut cmd = match p.kind {
        BackendKind::QsdRaw
        | BackendKind::QsdLuks
        | BackendKind::QsdRbdRaw
        | BackendKind::QsdRbdLuks => {
            let mut c = Command::new(&tools.qsd);
            let mut top = "f0";
            let luks = matches!(p.kind, BackendKind::QsdLuks | BackendKind::QsdRbdLuks);
            if luks {
                c.arg("--object")
                    .arg(format!("secret,id=s0,data={LUKS_SECRET}"));
            }
            c.arg("--blockdev").arg(if p.kind.is_rbd() {
                // QEMU's rbd driver, with its default cache mode (writeback: librbd's cache
                // on, made durable by the guest's flushes), or with librbd's cache off
                // (`cache.direct=on`, as qvol runs it) when `QVOL_BENCH_RBD_CACHE=off`.
                format!(
                    "driver=rbd,node-name=f0,pool={},image={},conf={}{}",
                    rbd_pool(),
                    rbd_image(p.kind),
                    ceph_conf(),
                    if rbd_cache_off() {
                        ",cache.direct=on"
                    } else {
                        ""
                    }
                )
            } else {
                format!(
                    "driver=file,node-name=f0,filename={},aio=threads",
                    p.image.display()
                )
            });
            if luks {
                c.arg("--blockdev")
                    .arg("driver=luks,node-name=l0,file=f0,key-secret=s0");
                top = "l0";
            }
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e0,node-name={top},addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ));
            c
        }
        BackendKind::Qvol(_) | BackendKind::QvolRbd(_) | BackendKind::QvolZstd(_) => {
            let (_, vhost) = tools.qvol.as_ref().map_err(Clone::clone)?;
            let mut c = Command::new(vhost);
            let volume_id = integration::fixture::volume_id_of(&p.image)?;
            c.env("QVOL_KEYSTORE", &p.keystore)
                .arg("--socket-path")
                .arg(&socket)
                .arg("--blk-file")
                .arg(&p.image)
                .arg("--volume-id")
                .arg(volume_id)
                .arg("--num-queues")
                .arg(queues.to_string());
            // `QVOL_BENCH_POLL_US=N` runs the daemon with `--poll-us N` (issue 15's polling).
            if let Some(us) = std::env::var_os("QVOL_BENCH_POLL_US") {
                c.arg("--poll-us").arg(us);
            }
            c.args(&p.extra_args);
            c
        }
    };
    let log_file =
        File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log file handle: {e}"))?;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it asks the kernel to SIGTERM the backend if this
    // program dies (Ctrl-C), so no backend outlives a run.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut running = Running { child, socket, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if running.socket.exists() {
            return Ok(running);
        }
        if let Ok(Some(status)) = running.child.try_wait() {
            return Err(format!(
                "{} exited ({status}) before listening: {}",
                p.kind.label(),
                running.log_tail()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not create its socket within 20 s: {}",
                p.kind.label(),
                running.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
