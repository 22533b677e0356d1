//! The daemon's control socket (docs/CONTROL.md): a small versioned JSON-lines protocol in
//! QMP's spirit. The server greets, then answers one request object per line with one
//! response object per line. It runs on threads of its own, never on a queue thread; each
//! command maps onto one `Volume` or `Stats` call. Also the client side, and how `qvol`
//! finds the control socket of the daemon serving an image.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use log::{debug, info, warn};
use qvol_core::Volume;
use serde_json::{json, Value};

use crate::backend::Device;
use crate::describe;
use crate::reencryptor::Reencryptor;
use crate::stats::Stats;
use crate::text::escape_untrusted;
use crate::volume_disk::error_chain;

/// The protocol version in the greeting.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest request line accepted.
const MAX_LINE: u64 = 1 << 20;
/// Clients served at once; more wait in the listen queue.
const MAX_CLIENTS: usize = 8;
/// A client silent for this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
/// The commands, in the order `query-commands` lists them.
pub const COMMANDS: [&str; 15] = [
    "query-commands",
    "query-status",
    "stats",
    "commit",
    "prove-key",
    "keyslots",
    "keyslots-set",
    "snapshot-create",
    "snapshot-list",
    "snapshot-delete",
    "check",
    "resize",
    "reencrypt-start",
    "reencrypt-status",
    "reencrypt-resume",
];
/// Commits asked for through the socket are at most this frequent (each takes the volume's
/// exclusive gate and two syncs: a client must not be able to stall the guest with them).
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// What the control socket acts on.
#[derive(Debug)]
pub struct Control {
    /// The served volume.
    pub volume: Arc<Volume>,
    /// The request counters.
    pub stats: Arc<Stats>,
    /// The vhost-user device serving the volume (to tell the frontend of a new size).
    pub device: Arc<Device>,
    /// The generation the daemon opened the volume at.
    pub opened_generation: u64,
    /// Held across a `resize`, so that the size it judged (a shrink is refused) is the
    /// size it changes: two clients' resizes never interleave.
    resizing: std::sync::Mutex<()>,
    /// When a client last asked for a commit.
    pub last_commit: std::sync::Mutex<Option<std::time::Instant>>,
    /// The background re-encryption of the volume.
    pub reencryptor: Arc<Reencryptor>,
}

impl Control {
    /// What the control socket of a daemon serving `volume` through `device` acts on;
    /// `reencryptor` steps its re-encryption.
    pub fn new(
        volume: Arc<Volume>,
        stats: Arc<Stats>,
        device: Arc<Device>,
        reencryptor: Arc<Reencryptor>,
    ) -> Control {
        let opened_generation = volume.info().generation;
        Control {
            volume,
            stats,
            device,
            reencryptor,
            opened_generation,
            resizing: std::sync::Mutex::new(()),
            last_commit: std::sync::Mutex::new(None),
        }
    }
}

/// Decrements the client count when a client's thread ends, however it ends.
struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one connection remembers between requests.
#[derive(Default)]
struct Session {
    /// The nonce of the last `keyslots` reply, retired by the next `keyslots-set` or
    /// `reencrypt-start`.
    nonce: Option<[u8; 16]>,
}

/// Binds the control socket at `path` (mode 0600; see [`crate::socket_file`]).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    crate::socket_file::bind_private(path)
}

/// Serves clients of `listener` on threads of their own, for the life of the process.
pub fn spawn(listener: UnixListener, control: Arc<Control>) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("qvol-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("control socket: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.load(Ordering::Acquire) >= MAX_CLIENTS {
                    let _ = reply_error(&stream, &Value::Null, "Busy", "too many control clients");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let seat = Seat(Arc::clone(&active));
                let control = Arc::clone(&control);
                let spawned = std::thread::Builder::new()
                    .name("qvol-control-client".into())
                    .spawn(move || {
                        let _seat = seat;
                        if let Err(e) = serve_client(stream, &control) {
                            debug!("control client ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    warn!("control socket: cannot start a client thread: {e}");
                }
            }
        })?;
    Ok(())
}

fn reply_error(mut stream: &UnixStream, id: &Value, class: &str, desc: &str) -> io::Result<()> {
    let mut r = json!({"error": {"class": class, "desc": desc}});
    if !id.is_null() {
        r["id"] = id.clone();
    }
    writeln!(stream, "{r}")
}

fn serve_client(stream: UnixStream, control: &Control) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut out = stream.try_clone()?;
    let info = control.volume.info();
    writeln!(
        out,
        "{}",
        json!({"qvol": {"version": PROTOCOL_VERSION, "volume_id": hex::encode(info.volume_id),
                        "commands": COMMANDS}})
    )?;
    let mut reader = BufReader::new(stream);
    let mut session = Session::default();
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() as u64 > MAX_LINE {
            reply_error(
                &out,
                &Value::Null,
                "GenericError",
                "request longer than 1 MiB",
            )?;
            return Ok(());
        }
        let response = match serde_json::from_slice::<Value>(&line) {
            Ok(request) => respond(control, &mut session, &request),
            Err(e) => json!({"error": {"class": "GenericError",
                                        "desc": format!("the request is not JSON: {e}")}}),
        };
        writeln!(out, "{response}")?;
    }
}

/// The response to one request.
fn respond(control: &Control, session: &mut Session, request: &Value) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let result = match (
        request.get("execute").and_then(Value::as_str),
        request.get("arguments"),
    ) {
        (None, _) => Err((
            "GenericError",
            "a request is {\"execute\": COMMAND}".to_string(),
        )),
        (Some(cmd), args) => execute(control, session, cmd, args.unwrap_or(&Value::Null)),
    };
    let mut r = match result {
        Ok(ret) => json!({ "return": ret }),
        Err((class, desc)) => json!({"error": {"class": class, "desc": desc}}),
    };
    if !id.is_null() {
        r["id"] = id;
    }
    r
}

type Outcome = Result<Value, (&'static str, String)>;

fn execute(control: &Control, session: &mut Session, cmd: &str, args: &Value) -> Outcome {
    let vol = &control.volume;
    match cmd {
        "query-commands" => Ok(json!(COMMANDS)),
        "query-status" => Ok(status(control)),
        "stats" => {
            let mut s = control.stats.json();
            s["volume"] = status(control);
            s["volume"]["commits"] = json!(vol
                .info()
                .generation
                .saturating_sub(control.opened_generation));
            // A walk of the map (no data is read), for a volume with compression units;
            // a map that cannot be read does not keep the rest of the statistics back.
            if vol.info().unit_bytes != 0 {
                match vol.compression_usage() {
                    Ok(usage) => describe::add_compression_usage(&mut s["volume"], &usage),
                    Err(e) => s["volume"]["compression_error"] = json!(error_chain(&e)),
                }
            }
            Ok(s)
        }
        "commit" => {
            {
                let mut last = control
                    .last_commit
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if last.is_some_and(|t| t.elapsed() < COMMIT_INTERVAL) {
                    return Err(("Busy", "one commit per second at most; try again".into()));
                }
                *last = Some(std::time::Instant::now());
            }
            vol.commit().map_err(engine_failure)?;
            Ok(json!({"generation": vol.info().generation}))
        }
        "prove-key" => {
            let challenge = hex_arg::<32>(args, "challenge").map_err(|e| ("GenericError", e))?;
            Ok(json!({"proof": hex::encode(vol.prove_key(&challenge))}))
        }
        "keyslots" => {
            let mut nonce = [0u8; 16];
            getrandom::getrandom(&mut nonce)
                .map_err(|e| ("GenericError", format!("no random nonce: {e}")))?;
            session.nonce = Some(nonce);
            let (slots, hash) = vol.keyslots_with_hash();
            Ok(json!({
                "keyslots": slots.iter().map(hex::encode).collect::<Vec<_>>(),
                "hash": hex::encode(hash),
                "nonce": hex::encode(nonce),
            }))
        }
        "keyslots-set" => {
            let (slots, expected, proof) = keyslot_args(args).map_err(|e| ("GenericError", e))?;
            let nonce = take_nonce(session)?;
            vol.set_keyslots_checked(&slots, &nonce, &expected, &proof)
                .map_err(engine_failure)?;
            Ok(json!({"hash": hex::encode(vol.keyslots_hash()),
                      "generation": vol.info().generation}))
        }
        "snapshot-create" => {
            let name = name_arg(args).map_err(|e| ("GenericError", e))?;
            let snap = vol.create_snapshot(name).map_err(engine_failure)?;
            Ok(describe::snapshot_json(&snap))
        }
        "snapshot-list" => {
            let usage = vol.snapshot_usage().map_err(engine_failure)?;
            Ok(json!({"snapshots": usage.iter().map(describe::usage_json).collect::<Vec<_>>()}))
        }
        "snapshot-delete" => {
            let name = name_arg(args).map_err(|e| ("GenericError", e))?;
            let freed = vol.delete_snapshot(name).map_err(engine_failure)?;
            Ok(json!({"freed_bytes": freed}))
        }
        "check" => {
            let report = vol.check(&mut |_, _| {}).map_err(engine_failure)?;
            Ok(describe::check_json(&report))
        }
        "resize" => resize(control, args),
        "reencrypt-start" => reencrypt_start(control, session, args),
        "reencrypt-status" => Ok(reencrypt_status(control)),
        "reencrypt-resume" => reencrypt_resume(control, args),
        other => Err((
            "CommandNotFound",
            format!("unknown command {other:?} (query-commands lists them)"),
        )),
    }
}

/// The nonce of the session's last `keyslots` reply, retired now.
fn take_nonce(session: &mut Session) -> Result<[u8; 16], (&'static str, String)> {
    session.nonce.take().ok_or((
        "Refused",
        "ask for \"keyslots\" first: each change needs the nonce of that reply".to_string(),
    ))
}

/// `reencrypt-start`: switches the volume to the new key the client sealed (crash-safe,
/// `Volume::start_reencryption_sealed`), then re-seals the data in the background.
fn reencrypt_start(control: &Control, session: &mut Session, args: &Value) -> Outcome {
    let bad = |e: String| ("GenericError", e);
    let suite = args
        .get("suite")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("\"suite\" is needed: a cipher suite's name".into()))?;
    let suite: qvol_core::CipherSuite = suite.parse().map_err(|e| bad(format!("{e}")))?;
    let slots = slots_arg(args).map_err(bad)?;
    let expected = hex_arg::<32>(args, "expected").map_err(bad)?;
    let sealed = args
        .get("sealed")
        .and_then(Value::as_str)
        .and_then(|s| hex::decode(s).ok())
        .ok_or_else(|| bad("\"sealed\" is needed: the new key sealed, as hex".into()))?;
    let rate = rate_arg(args).map_err(bad)?;
    let nonce = take_nonce(session)?;
    let started = control
        .volume
        .start_reencryption_sealed(&sealed, &nonce, suite, &slots, &expected)
        .map_err(engine_failure)?;
    info!(
        "re-encryption started: to {}, a new volume key; re-sealing {} bytes in the background",
        started.to_suite,
        started.total_bytes()
    );
    start_worker(control, rate)?;
    Ok(reencrypt_status(control))
}

/// `reencrypt-resume`: starts the background worker again (after a failure), or changes
/// its rate.
fn reencrypt_resume(control: &Control, args: &Value) -> Outcome {
    let rate = rate_arg(args).map_err(|e| ("GenericError", e))?;
    if control.volume.reencryption().is_none() {
        return Err((
            "GenericError",
            "the volume is not being re-encrypted".to_string(),
        ));
    }
    start_worker(control, rate)?;
    Ok(reencrypt_status(control))
}

fn start_worker(control: &Control, rate: Option<u64>) -> Result<(), (&'static str, String)> {
    if let Some(rate) = rate {
        control.reencryptor.set_rate(rate);
    }
    control.reencryptor.start().map_err(|e| {
        (
            "GenericError",
            format!("cannot start the re-encryption thread: {e}"),
        )
    })?;
    Ok(())
}

/// `reencrypt-status`: the re-encryption in progress (`null` when none), the suite new
/// data is sealed with, whether the background worker runs, its rate limit, and why it last
/// stopped if it failed.
fn reencrypt_status(control: &Control) -> Value {
    json!({
        "cipher": control.volume.data_suite().name(),
        "reencryption": control.volume.reencryption().map(|r| describe::reencryption_json(&r)),
        "running": control.reencryptor.running(),
        "rate_bytes_per_s": control.reencryptor.rate(),
        "error": control.reencryptor.failure(),
    })
}

/// The optional `rate_bytes_per_s` argument (0: no limit).
fn rate_arg(args: &Value) -> Result<Option<u64>, String> {
    match args.get("rate_bytes_per_s") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            "\"rate_bytes_per_s\" is a whole number of bytes a second (0: no limit)".to_string()
        }),
    }
}

/// A `Volume` call's failure: `Refused` when the volume refused it, else `GenericError`.
fn engine_failure(e: qvol_core::Error) -> (&'static str, String) {
    let class = if e.kind() == qvol_core::ErrorKind::Refused {
        "Refused"
    } else {
        "GenericError"
    };
    (class, error_chain(&e))
}

/// `resize`: grows the served disk and tells the frontend (the guest sees the new capacity
/// without a reboot). A shrink is refused: the guest's filesystem may use the tail.
fn resize(control: &Control, args: &Value) -> Outcome {
    let size = args.get("size").and_then(Value::as_u64).ok_or((
        "GenericError",
        "\"size\" is needed: the new size in bytes".to_string(),
    ))?;
    let vol = &control.volume;
    let resizing = control
        .resizing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let old = vol.size();
    if size < old {
        return Err((
            "Refused",
            format!(
                "a served disk cannot shrink ({old} to {size} bytes) under a running guest: \
                 stop the VM first"
            ),
        ));
    }
    let plan = vol.resize(size).map_err(engine_failure)?;
    drop(resizing);
    let mut reply = json!({"old_size": plan.old_size, "new_size": plan.new_size,
                           "notified": false});
    if plan.new_size != plan.old_size {
        info!(
            "resized the disk from {} to {} bytes",
            plan.old_size, plan.new_size
        );
        match control.device.config_changed() {
            Ok(notified) => reply["notified"] = json!(notified),
            Err(e) => {
                warn!("resized, but {e}");
                reply["notify_error"] = json!(e);
            }
        }
    }
    Ok(reply)
}

fn status(control: &Control) -> Value {
    let info = control.volume.info();
    json!({
        "volume_id": hex::encode(info.volume_id),
        "format_version": info.format_version,
        "size": info.size,
        "cipher": info.suite.name(),
        "read_only": info.read_only,
        "generation": info.generation,
        "allocated_bytes": info.allocated_bytes,
        "log_records": info.log_records,
        "keyslots": info.keyslot_count,
        "compression_unit_bytes": info.unit_bytes,
        "compress_level": info.compress_level,
        "snapshots": control
            .volume
            .snapshots()
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>(),
        "reencryption": control.volume.reencryption().map(|r| describe::reencryption_json(&r)),
    })
}

/// The `name` argument of a snapshot command.
fn name_arg(args: &Value) -> Result<&str, String> {
    args.get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| "\"name\" is needed: the snapshot's name".to_string())
}

type KeyslotArgs = (Vec<Vec<u8>>, [u8; 32], [u8; 32]);

/// Argument `name` of `args`: N bytes as 2N hex digits.
fn hex_arg<const N: usize>(args: &Value, name: &str) -> Result<[u8; N], String> {
    let text = args
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{name}\" is needed ({} hex digits)", 2 * N))?;
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| format!("\"{name}\" is not {} hex digits", 2 * N))?;
    Ok(out)
}

fn keyslot_args(args: &Value) -> Result<KeyslotArgs, String> {
    let hex32 = |name: &str| hex_arg::<32>(args, name);
    Ok((slots_arg(args)?, hex32("expected")?, hex32("proof")?))
}

/// The `keyslots` argument: the new keyslot area, a list of hex strings.
fn slots_arg(args: &Value) -> Result<Vec<Vec<u8>>, String> {
    args.get("keyslots")
        .and_then(Value::as_array)
        .ok_or("\"keyslots\" is needed: a list of hex strings")?
        .iter()
        .map(|v| {
            v.as_str()
                .and_then(|s| hex::decode(s).ok())
                .ok_or_else(|| "every keyslot is a hex string (\"\" for a free slot)".to_string())
        })
        .collect()
}

/// A connection to a daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The greeting's `qvol` object.
    pub greeting: Value,
}

impl ControlClient {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> anyhow::Result<ControlClient> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to the control socket {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let writer = stream.try_clone()?;
        let mut client = ControlClient {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
        };
        let hello = client.read()?;
        let greeting = hello
            .get("qvol")
            .cloned()
            .ok_or_else(|| anyhow!("{} is not a qvol control socket", path.display()))?;
        if greeting.get("version").and_then(Value::as_u64) != Some(u64::from(PROTOCOL_VERSION)) {
            bail!(
                "the daemon on {} speaks control protocol {}, this qvol speaks {PROTOCOL_VERSION}",
                path.display(),
                greeting.get("version").unwrap_or(&Value::Null)
            );
        }
        client.greeting = greeting;
        Ok(client)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            bail!("the daemon closed the control connection");
        }
        if line.len() as u64 > MAX_LINE {
            bail!("the daemon sent a line longer than 1 MiB");
        }
        serde_json::from_slice(&line).context("the daemon sent something that is not JSON")
    }

    /// Waits at most `timeout` for each reply (`None`: as long as it takes; a check of a
    /// large disk can take long).
    pub fn set_reply_timeout(&self, timeout: Option<Duration>) -> anyhow::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        Ok(())
    }

    /// Runs `command` with `arguments`; its `return` value, or its error as one sentence.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}")?;
        let reply = self.read()?;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let desc = reply["error"]["desc"].as_str().unwrap_or("no reason given");
        bail!("the daemon refused {command}: {}", escape_untrusted(desc))
    }
}

/// A process of this host as `/proc` shows it: what [`find_server`] judges.
struct Process {
    pid: u32,
    dir: PathBuf,
    args: Vec<String>,
    cwd: Option<PathBuf>,
}

impl Process {
    /// Every other process whose real uid `trusted` accepts.
    fn list(trusted: impl Fn(u32) -> bool) -> Vec<Process> {
        let me = std::process::id();
        let Ok(procs) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|entry| {
                let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let dir = entry.path();
                (pid != me && process_uid(&dir).is_some_and(&trusted)).then(|| Process {
                    pid,
                    args: command_line(&dir),
                    cwd: fs::read_link(dir.join("cwd")).ok(),
                    dir,
                })
            })
            .collect()
    }

    /// A path of its command line, made absolute against its working directory.
    fn resolve(&self, arg: &str) -> Option<PathBuf> {
        let p = PathBuf::from(arg);
        match (&self.cwd, p.is_relative()) {
            (Some(cwd), true) => Some(cwd.join(p)),
            (None, true) => None,
            (_, false) => Some(p),
        }
    }

    /// The value of `--flag` on its command line.
    fn flag(&self, flag: &str) -> Option<String> {
        flag_value(&self.args, flag)
    }

    /// Its `--control-socket`.
    fn control_socket(&self) -> Option<PathBuf> {
        self.flag("--control-socket").and_then(|s| self.resolve(&s))
    }
}

/// The process serving `image`, and the control socket on its command line (if any): how
/// `qvol` reaches the daemon serving an image it cannot lock (or, for an RBD image, whose
/// exclusive lock another client holds).
///
/// A file image: a process whose open files can be listed (`/proc/PID/fd`: this user's
/// dumpable processes, or all as root) is found by the image's inode; a daemon (not
/// dumpable: its fds are root's to list) by the image named in its `--blk-file`. Only
/// processes of root or of the image's owner count: another user's process naming the image
/// cannot pose as its daemon.
///
/// An RBD image: a `vhost-qvol` of root or of this user whose `--blk-file` names the same
/// image (pool, namespace, image) of the same cluster (its `--ceph-conf`, else its `CEPH_CONF`).
pub fn find_server(image: &Path) -> anyhow::Result<Option<(u32, Option<PathBuf>)>> {
    if let Some(name) = crate::image::rbd_name(image)? {
        return Ok(find_rbd_server(&name));
    }
    let meta = fs::metadata(image).with_context(|| format!("cannot stat {}", image.display()))?;
    let same = |m: &fs::Metadata| m.dev() == meta.dev() && m.ino() == meta.ino();
    let mut by_name = None;
    for process in Process::list(|uid| uid == 0 || uid == meta.uid()) {
        let holds = fs::read_dir(process.dir.join("fd"))
            .map(|fds| {
                fds.flatten()
                    .any(|fd| fs::metadata(fd.path()).is_ok_and(|m| same(&m)))
            })
            .unwrap_or(false);
        if holds {
            return Ok(Some((process.pid, process.control_socket())));
        }
        let names_it = process
            .flag("--blk-file")
            .and_then(|f| process.resolve(&f))
            .and_then(|f| fs::metadata(f).ok())
            .is_some_and(|m| same(&m));
        if names_it && by_name.is_none() {
            by_name = Some((process.pid, process.control_socket()));
        }
    }
    Ok(by_name)
}

fn find_rbd_server(name: &qvol_rbd::RbdName) -> Option<(u32, Option<PathBuf>)> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let my_uid = unsafe { libc::getuid() };
    let conf = comparable(&crate::image::ceph_options().conf_file());
    Process::list(|uid| uid == 0 || uid == my_uid)
        .into_iter()
        .find(|p| {
            let is_daemon = p
                .args
                .first()
                .and_then(|a| Path::new(a).file_name())
                .is_some_and(|n| n == "vhost-qvol");
            let serves = p
                .flag("--blk-file")
                .and_then(|f| qvol_rbd::RbdName::parse(&f).ok())
                .is_some_and(|n| n == *name);
            is_daemon && serves && rbd_server_conf(p).is_none_or(|c| comparable(&c) == conf)
        })
        .map(|p| (p.pid, p.control_socket()))
}

/// The Ceph configuration file a daemon uses: its `--ceph-conf`, else the `CEPH_CONF` of its
/// environment, else Ceph's default; `None` when its environment cannot be read (another
/// user's daemon, not dumpable, seen by a user that is not root): it is then judged by the
/// image it names alone (the volume id and the key proof still guard what is sent to it).
fn rbd_server_conf(process: &Process) -> Option<PathBuf> {
    if let Some(conf) = process.flag("--ceph-conf") {
        return process.resolve(&conf);
    }
    let environ = fs::read(process.dir.join("environ")).ok()?;
    let from_env = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"CEPH_CONF="))
        .filter(|v| !v.is_empty())
        .map(|v| process.resolve(&String::from_utf8_lossy(v)));
    match from_env {
        Some(conf) => conf,
        None => Some(PathBuf::from(qvol_rbd::DEFAULT_CONF)),
    }
}

/// A path as it can be compared with another naming the same file.
fn comparable(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The real uid of the process whose `/proc` directory is `proc_dir`.
fn process_uid(proc_dir: &Path) -> Option<u32> {
    let status = fs::read_to_string(proc_dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
}

/// The pid and uid of the process at the other end of a Unix socket (`SO_PEERCRED`).
fn peer_credentials(stream: &UnixStream) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the descriptor
    // belongs to `stream`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((u32::try_from(cred.pid).unwrap_or(0), cred.uid))
}

fn command_line(proc_dir: &Path) -> Vec<String> {
    fs::read(proc_dir.join("cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `args`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
        })
}

/// Connects to the control socket of the daemon serving `image`, or says in one sentence
/// why that is not possible. The process at the other end must be the one found serving
/// the image (`SO_PEERCRED`), and the socket file must belong to its user.
pub fn connect_to_server(image: &Path) -> anyhow::Result<ControlClient> {
    match find_server(image)? {
        Some((pid, Some(socket))) => {
            let uid = process_uid(&Path::new("/proc").join(pid.to_string()))
                .ok_or_else(|| anyhow!("process {pid} serving {} went away", image.display()))?;
            let owner = fs::metadata(&socket)
                .with_context(|| format!("cannot stat the control socket {}", socket.display()))?
                .uid();
            if owner != uid {
                bail!(
                    "the control socket {} belongs to user {owner}, not to the user {uid} of the \
                     daemon (process {pid}) serving {}; refusing it",
                    socket.display(),
                    image.display()
                );
            }
            let client = ControlClient::connect(&socket)?;
            let (peer_pid, peer_uid) = peer_credentials(&client.writer)
                .context("cannot tell who listens on the control socket")?;
            if peer_pid != pid || peer_uid != uid {
                bail!(
                    "the control socket {} is served by process {peer_pid}, not by process {pid} \
                     which serves {}; refusing it",
                    socket.display(),
                    image.display()
                );
            }
            Ok(client)
        }
        Some((pid, None)) => bail!(
            "{} is in use by process {pid}, which has no control socket (start vhost-qvol with \
             --control-socket PATH to manage a served image)",
            image.display()
        ),
        None if crate::image::is_rbd(image) => {
            let owners = crate::image::rbd_lock_holders(image)?;
            if owners.is_empty() {
                bail!(
                    "no vhost-qvol on this host serves {}, and no Ceph client holds its \
                     exclusive lock",
                    image.display()
                );
            }
            bail!(
                "{} is served by the Ceph client at {} (the holder of its exclusive lock), not \
                 by a vhost-qvol on this host: run the command on that host (or, if that \
                 client is dead, again with --break-lock)",
                image.display(),
                escape_untrusted(&owners.join(", "))
            )
        }
        None => bail!(
            "{} is locked by a process this user cannot see (another user's vhost-qvol?)",
            image.display()
        ),
    }
}
