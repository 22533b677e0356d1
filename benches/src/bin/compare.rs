//! End-to-end comparison (issue 6): qemu-storage-daemon raw and LUKS against vhost-qvol
//! with each cipher suite, all driven by the same libblkio client.
//!
//! `scripts/bench.sh` builds and runs it; `--quick` finishes in under two minutes.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use benches::compare::backend::{self, BackendKind, Tools};
use benches::compare::disksync::{self, DiskSync};
use benches::compare::machine::Machine;
use benches::compare::procstat;
use benches::compare::report::{
    DataUnits, Measurement, Report, Skipped, AFTER_PREFILL, AFTER_WORKLOADS, IDLE_SECONDS,
};
use benches::compare::run::{self, connect_with, DataKind};
use benches::compare::workload::{Metric, Workload, PREFILL, SUSTAINED, WORKLOADS};
use clap::Parser;
use integration::client::BlkioClient;

/// Compare vhost-qvol with qemu-storage-daemon (raw and LUKS) through one libblkio client.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Measured seconds per workload.
    #[arg(long, env = "QVOL_BENCH_SECONDS", default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds before each workload.
    #[arg(long, env = "QVOL_BENCH_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// Image size in MiB (the same for every backend).
    #[arg(long, env = "QVOL_BENCH_SIZE_MIB", default_value_t = 1024)]
    size_mib: u64,
    /// Queue counts to run, comma-separated; "n" means one per CPU.
    #[arg(
        long,
        env = "QVOL_BENCH_QUEUES",
        default_value = "1,n",
        value_delimiter = ','
    )]
    queues: Vec<String>,
    /// Backends to run: raw, luks, xchacha, aegis; qvol on compressed volumes (`qvol create
    /// --compress`, see --compress): xchacha-zstd, aegis-zstd; on Ceph RBD (the cluster of
    /// $CEPH_CONF, `scripts/bench.sh --rbd` starts one): rbd-raw, rbd-luks, rbd-xchacha,
    /// rbd-aegis.
    #[arg(
        long,
        env = "QVOL_BENCH_BACKENDS",
        default_value = "raw,luks,xchacha,aegis",
        value_delimiter = ','
    )]
    backends: Vec<String>,
    /// Workloads to run (default: all), comma-separated names as in the table, e.g.
    /// seq-write-1M-qd8,rand-read-4K-qd32; sustained-write-1M-qd8 is the sustained write.
    #[arg(long, env = "QVOL_BENCH_WORKLOADS", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Also run the sustained write (sustained-write-1M-qd8: sequential 1 MiB writes at QD8
    /// for --sustained-seconds, after the other workloads), with bandwidth, p99, p99.9 and
    /// max latency against the disk's own fdatasync bandwidth. Not part of the default set.
    #[arg(long, env = "QVOL_BENCH_SUSTAINED")]
    sustained: bool,
    /// Measured seconds of the sustained write (at least 8 log-fulls of a qvol image: a
    /// 2 GiB image has a 64 MiB log, full after 2 GiB of writes).
    #[arg(long, env = "QVOL_BENCH_SUSTAINED_SECONDS", default_value_t = 60.0)]
    sustained_seconds: f64,
    /// MiB written (1 MiB writes, then one fdatasync) to measure the disk's own sync
    /// bandwidth before and after the backends; 0 skips it.
    #[arg(long, env = "QVOL_BENCH_SYNC_MIB", default_value_t = 1024)]
    sync_mib: u64,
    /// Short run (0.5 s warm-up, 1 s per workload, 256 MiB images, 256 MiB sync
    /// measurement, no sustained write unless asked for): under two minutes.
    #[arg(long, env = "QVOL_BENCH_QUICK")]
    quick: bool,
    /// What the client writes, the same for every backend: random (incompressible) or text
    /// (log lines, about 3× by zstd; a 16 KiB unit of it takes 2 blocks).
    #[arg(long, env = "QVOL_BENCH_DATA", default_value = "random")]
    data: String,
    /// The compression of the *-zstd backends, as `qvol create --compress` takes it:
    /// zstd or zstd:LEVEL.
    #[arg(long, env = "QVOL_BENCH_COMPRESS", default_value = "zstd")]
    compress: String,
    /// The compression unit of the *-zstd backends (`qvol create --compress-unit`): 8K,
    /// 16K, 32K or 64K.
    #[arg(long, env = "QVOL_BENCH_COMPRESS_UNIT", default_value = "16K")]
    compress_unit: String,
    /// Where the images and sockets go (one filesystem for all).
    #[arg(long, env = "QVOL_BENCH_DIR", default_value = "target/bench/work")]
    dir: PathBuf,
    /// Where compare.md and compare.json are written.
    #[arg(long, env = "QVOL_BENCH_OUT", default_value = "target/bench")]
    out: PathBuf,
}

struct Config {
    measure: Duration,
    warmup: Duration,
    size: u64,
    queues: Vec<usize>,
    backends: Vec<BackendKind>,
    workloads: Vec<Workload>,
    sustained: Duration,
    sync_bytes: u64,
    dir: PathBuf,
    out: PathBuf,
    data: DataKind,
    compress: String,
    compress_unit: String,
}

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(a: Args) -> Result<Config, String> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (seconds, warmup, size_mib, sync_mib) = if a.quick {
            (1.0, 0.5, 256, a.sync_mib.min(256))
        } else {
            (a.seconds, a.warmup, a.size_mib, a.sync_mib)
        };
        if !(seconds > 0.0 && warmup >= 0.0 && a.sustained_seconds > 0.0) {
            return Err(
                "--seconds and --sustained-seconds must be positive and --warmup not negative"
                    .to_owned(),
            );
        }
        if size_mib < 64 {
            return Err("--size-mib must be at least 64".to_owned());
        }
        let mut queues = Vec::new();
        for q in &a.queues {
            let n = if q == "n" {
                cpus.max(2)
            } else {
                q.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| {
                        format!("--queues: {q:?} is not a number from 1 to 64 or \"n\"")
                    })?
            };
            if !queues.contains(&n) {
                queues.push(n);
            }
        }
        let mut backends = Vec::new();
        for b in &a.backends {
            let kind = BackendKind::every()
                .find(|k| k.short() == b)
                .ok_or_else(|| {
                    let names: Vec<&str> = BackendKind::every().map(BackendKind::short).collect();
                    format!("--backends: unknown backend {b:?} ({})", names.join(", "))
                })?;
            backends.push(kind);
        }
        let known = || WORKLOADS.iter().chain([&SUSTAINED]);
        let mut workloads = if a.workloads.is_empty() {
            WORKLOADS.to_vec()
        } else {
            a.workloads
                .iter()
                .map(|name| {
                    known().find(|w| w.name == name).copied().ok_or_else(|| {
                        let names: Vec<&str> = known().map(|w| w.name).collect();
                        format!(
                            "--workloads: unknown workload {name:?} (one of {})",
                            names.join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        if a.sustained && !workloads.iter().any(|w| w.name == SUSTAINED.name) {
            workloads.push(SUSTAINED);
        }
        let data = DataKind::parse(&a.data)
            .ok_or_else(|| format!("--data: {:?} is neither random nor text", a.data))?;
        compress_level(&a.compress)?;
        unit_bytes(&a.compress_unit)?;
        Ok(Config {
            workloads,
            sustained: Duration::from_secs_f64(a.sustained_seconds),
            sync_bytes: sync_mib << 20,
            measure: Duration::from_secs_f64(seconds),
            warmup: Duration::from_secs_f64(warmup),
            size: size_mib << 20,
            queues,
            backends,
            dir: a.dir,
            out: a.out,
            data,
            compress: a.compress,
            compress_unit: a.compress_unit,
        })
    }
}

/// The zstd level of a `--compress` value (`zstd` is level 3).
fn compress_level(spec: &str) -> Result<i32, String> {
    match spec.split_once(':') {
        None if spec == "zstd" => Ok(3),
        Some(("zstd", level)) => level
            .parse::<i32>()
            .ok()
            .filter(|l| (-7..=22).contains(l) && *l != 0)
            .ok_or_else(|| format!("--compress: {level:?} is not a zstd level (-7..-1, 1..22)")),
        _ => Err(format!("--compress: {spec:?} is not zstd or zstd:LEVEL")),
    }
}

/// The bytes of a `--compress-unit` value.
fn unit_bytes(spec: &str) -> Result<u64, String> {
    match spec {
        "8K" => Ok(8 << 10),
        "16K" => Ok(16 << 10),
        "32K" => Ok(32 << 10),
        "64K" => Ok(64 << 10),
        _ => Err(format!(
            "--compress-unit: {spec:?} is not 8K, 16K, 32K or 64K"
        )),
    }
}

/// What qvol's unit codec makes of the client's data: the buffer of one queue, filled as
/// the client fills it, cut into units and packed.
fn data_units(cfg: &Config) -> Result<DataUnits, String> {
    let unit = unit_bytes(&cfg.compress_unit)? as usize;
    let level = compress_level(&cfg.compress)?;
    let mut buf = vec![0u8; benches::compare::workload::max_queue_buffer()];
    run::fill_data(&mut buf, cfg.data);
    let (mut units, mut blocks, mut frames) = (0u64, 0u64, 0u64);
    for group in buf.chunks_exact(unit) {
        units += 1;
        match qvol_core::unit::pack(group, level).map_err(|e| e.to_string())? {
            Some(p) => {
                blocks += u64::from(p.k);
                frames += u64::from(u32::from_le_bytes([
                    p.bytes[0], p.bytes[1], p.bytes[2], p.bytes[3],
                ]));
            }
            None => {
                blocks += (unit / 4096) as u64;
                frames += unit as u64;
            }
        }
    }
    let plain = units * (unit / 4096) as u64;
    Ok(DataUnits {
        unit_bytes: unit as u64,
        level,
        units,
        blocks,
        saving: plain as f64 / blocks.max(1) as f64,
        zstd_ratio: (units * unit as u64) as f64 / frames.max(1) as f64,
    })
}

fn progress(line: &str) {
    let mut err = std::io::stderr();
    let _ = write!(err, "\r\x1b[2K{line}");
    let _ = err.flush();
}

/// What a run collects besides measurements: its progress, and the images' space.
struct Tally {
    /// Workloads run so far.
    step: usize,
    /// Workloads to run.
    steps: usize,
    /// The space of the images, as read.
    space: Vec<backend::ImageSpace>,
}

/// Runs every workload on one backend with `queues` queues; with `prefill`, first fills the
/// image once and reads its space with the backend stopped.
fn run_backend(
    tools: &Tools,
    prepared: &backend::Prepared,
    queues: usize,
    cfg: &Config,
    prefill: bool,
    tally: &mut Tally,
) -> Result<Vec<Measurement>, String> {
    let kind = prepared.kind;
    let running = backend::start(tools, prepared, queues)?;
    let pid = running.pid();
    let mut client = connect_with(&running.socket, queues, cfg.data)
        .map_err(|e| format!("{}: {e}", kind.label()))?;
    let capacity = run::capacity(&client).map_err(|e| format!("{}: {e}", kind.label()))?;
    if capacity < cfg.size {
        return Err(format!(
            "{} reports {capacity} bytes, less than the {} asked for",
            kind.label(),
            cfg.size
        ));
    }
    run::verify(&mut client).map_err(|e| format!("{} data check: {e}", kind.label()))?;
    // The check wrote through the start of the buffer: fill it again, so that every write
    // carries the run's data (a random block there would change what compresses).
    run::fill_buffer_with(&mut client, cfg.data);
    if prefill {
        progress(&format!(
            "{} q{queues}: filling the image once",
            kind.label()
        ));
        let st = run::run(&mut client, &PREFILL, Duration::ZERO, Duration::ZERO, true)
            .map_err(|e| format!("{} prefill: {e}", kind.label()))?;
        progress(&format!(
            "{} q{queues}: filled {} MiB at {:.2} GB/s",
            kind.label(),
            st.total_bytes >> 20,
            st.total_bytes as f64 / st.window.as_secs_f64() / 1e9
        ));
        // The space of the image written once, whole: read with the backend stopped (qvol's
        // figures are then those of a committed, closed volume), then serve it again.
        drop(client);
        running.stop();
        tally
            .space
            .push(backend::image_space(tools, prepared, AFTER_PREFILL));
        return run_backend(tools, prepared, queues, cfg, false, tally);
    }
    let mut out = Vec::new();
    for w in &cfg.workloads {
        tally.step += 1;
        progress(&format!(
            "[{}/{}] {} q{queues} {} ...",
            tally.step,
            tally.steps,
            kind.label(),
            w.name
        ));
        let m = measure(&mut client, pid, kind, queues, w, cfg)?;
        progress(&format!(
            "[{}/{}] {} q{queues} {}: {}",
            tally.step,
            tally.steps,
            kind.label(),
            w.name,
            headline(&m)
        ));
        out.push(m);
    }
    // Idle: no I/O for a second, then CPU over IDLE_SECONDS (issue 15: an idle daemon stays
    // idle, polling included).
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = procstat::cpu_time(pid)?;
    std::thread::sleep(Duration::from_secs(IDLE_SECONDS));
    let idle = procstat::cpu_time(pid)?.saturating_sub(cpu0);
    if let Some(last) = out.last_mut() {
        last.backend_idle_cpu_pct = Some(idle.as_secs_f64() / IDLE_SECONDS as f64 * 100.0);
    }
    drop(client);
    running.stop();
    Ok(out)
}

/// The headline figure of a measurement, for the progress line.
fn headline(m: &Measurement) -> String {
    match m.metric {
        Metric::Bandwidth => format!("{:.2} GB/s", m.bytes_per_sec / 1e9),
        Metric::Iops => format!("{:.1}k IOPS", m.iops / 1e3),
        Metric::Latency => format!(
            "p50 {:.0} µs, p99 {:.0} µs",
            m.p50_us.unwrap_or(f64::NAN),
            m.p99_us.unwrap_or(f64::NAN)
        ),
    }
}

fn measure(
    client: &mut BlkioClient,
    pid: u32,
    kind: BackendKind,
    queues: usize,
    w: &Workload,
    cfg: &Config,
) -> Result<Measurement, String> {
    let seconds = if w.name == SUSTAINED.name {
        cfg.sustained
    } else {
        cfg.measure
    };
    let cpu0 = procstat::cpu_time(pid)?;
    let st = run::run(client, w, cfg.warmup, seconds, false)
        .map_err(|e| format!("{} {}: {e}", kind.label(), w.name))?;
    let cpu = procstat::cpu_time(pid)?.saturating_sub(cpu0);
    let mem = procstat::memory(pid)?;
    let secs = st.window.as_secs_f64();
    let us = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6);
    Ok(Measurement {
        backend: kind.label().to_owned(),
        queues,
        workload: w.name.to_owned(),
        metric: w.metric,
        bytes_per_sec: st.bytes as f64 / secs,
        iops: st.ops as f64 / secs,
        p50_us: us(st.percentile(50.0)),
        p99_us: us(st.percentile(99.0)),
        p99_9_us: us(st.percentile(99.9)),
        max_us: us(st.max()),
        measure_s: secs,
        total_bytes: st.total_bytes,
        backend_cpu_s_per_gb: if st.total_bytes > 0 {
            cpu.as_secs_f64() / (st.total_bytes as f64 / 1e9)
        } else {
            0.0
        },
        backend_rss_bytes: mem.rss,
        backend_peak_rss_bytes: mem.peak_rss,
        backend_idle_cpu_pct: None,
    })
}

fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The disk's sync bandwidth, printed as it is measured; `None` (with a note) if it failed.
fn disk_sync(cfg: &Config, when: &str) -> Option<DiskSync> {
    if cfg.sync_bytes == 0 {
        return None;
    }
    progress(&format!(
        "disk: {} MiB of writes and an fdatasync ({when})",
        cfg.sync_bytes >> 20
    ));
    match disksync::measure(&cfg.dir, cfg.sync_bytes, when) {
        Ok(d) => {
            progress(&format!(
                "disk sync bandwidth ({when}): {:.2} GB/s (fdatasync {:.2} s)\n",
                d.bytes_per_sec / 1e9,
                d.sync_s
            ));
            Some(d)
        }
        Err(e) => {
            eprintln!("\ndisk sync bandwidth ({when}) not measured: {e}");
            None
        }
    }
}

/// How to reproduce the run: the arguments given, the environment the daemons read, and
/// the `QVOL_BENCH_*` settings (which `scripts/bench.sh --compress` uses for its defaults).
fn command_line() -> String {
    let mut bench: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("QVOL_BENCH_") && !QVOL_DAEMON_ENV.contains(&k.as_str()))
        .collect();
    bench.sort();
    let mut parts: Vec<String> = QVOL_DAEMON_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .chain(bench.into_iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    parts.push("scripts/bench.sh".to_owned());
    parts.extend(std::env::args().skip(1));
    parts.join(" ")
}

/// Variables of vhost-qvol's environment that change what it does (passed through to the
/// daemon, which inherits this program's environment) and are recorded with the figures.
const QVOL_DAEMON_ENV: [&str; 2] = ["QVOL_WRITEBACK_MIB", "QVOL_BENCH_POLL_US"];

fn run(cfg: Config) -> Result<Report, String> {
    let date = date_utc();
    let tools = Tools::find()?;
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.dir.display()))?;
    let _ = std::fs::remove_dir_all(cfg.dir.join("keystore"));
    let machine = Machine::describe(&cfg.dir, &tools.qsd);
    let mut disk = Vec::new();
    disk.extend(disk_sync(&cfg, "before"));
    let mut measurements = Vec::new();
    let mut skipped = Vec::new();
    let compressed = cfg
        .backends
        .iter()
        .any(|b| matches!(b, BackendKind::QvolZstd(_)));
    let data_units = if compressed {
        Some(data_units(&cfg)?)
    } else {
        None
    };
    let mut tally = Tally {
        step: 0,
        steps: cfg.backends.len() * cfg.queues.len() * cfg.workloads.len(),
        space: Vec::new(),
    };
    for &kind in &cfg.backends {
        progress(&format!(
            "{}: creating a {} MiB image",
            kind.label(),
            cfg.size >> 20
        ));
        let compress = [
            cfg.compress.as_str(),
            "--compress-unit",
            cfg.compress_unit.as_str(),
        ];
        let prepared = match backend::prepare_with(&tools, kind, &cfg.dir, cfg.size, &compress) {
            Ok(p) => p,
            Err(reason) => {
                eprintln!("\nskipping {}: {reason}", kind.label());
                skipped.push(Skipped {
                    backend: kind.label().to_owned(),
                    reason,
                });
                tally.step += cfg.queues.len() * cfg.workloads.len();
                continue;
            }
        };
        for (i, &q) in cfg.queues.iter().enumerate() {
            match run_backend(&tools, &prepared, q, &cfg, i == 0, &mut tally) {
                Ok(m) => measurements.extend(m),
                // qemu-storage-daemon failing is an error; a qvol backend that cannot run yet
                // is skipped with its reason, so the other rows still come out.
                Err(reason) if kind.is_qvol() => {
                    eprintln!("\nskipping {} with {q} queue(s): {reason}", kind.label());
                    skipped.push(Skipped {
                        backend: format!("{} ({q} queues)", kind.label()),
                        reason,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        tally
            .space
            .push(backend::image_space(&tools, &prepared, AFTER_WORKLOADS));
        backend::remove_image(&prepared);
        eprintln!();
    }
    disk.extend(disk_sync(&cfg, "after"));
    Ok(Report {
        date,
        command: command_line(),
        daemon_env: QVOL_DAEMON_ENV
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect(),
        disk_sync: disk,
        rbd: cfg.backends.iter().any(|b| b.is_rbd()),
        rbd_cache_off: benches::compare::backend::rbd_cache_off(),
        sustained_s: cfg
            .workloads
            .iter()
            .any(|w| w.name == SUSTAINED.name)
            .then_some(cfg.sustained.as_secs_f64()),
        machine,
        image_size: cfg.size,
        warmup_s: cfg.warmup.as_secs_f64(),
        measure_s: cfg.measure.as_secs_f64(),
        queue_counts: cfg.queues.clone(),
        measurements,
        skipped,
        data: cfg.data,
        workloads: cfg.workloads.iter().map(|w| w.name.to_owned()).collect(),
        compress: compressed
            .then(|| format!("{} --compress-unit {}", cfg.compress, cfg.compress_unit)),
        data_units,
        space: tally.space,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::from(2);
        }
    };
    let out = cfg.out.clone();
    let report = match run(cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("\ncompare: {e}");
            return ExitCode::from(1);
        }
    };
    let md = report.markdown();
    println!("{md}");
    let json = match serde_json::to_string_pretty(&report) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("compare: cannot serialise the report: {e}");
            return ExitCode::from(1);
        }
    };
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("compare.md"), &md))
        .and_then(|()| std::fs::write(out.join("compare.json"), json));
    if let Err(e) = written {
        eprintln!(
            "compare: cannot write the report under {}: {e}",
            out.display()
        );
        return ExitCode::from(1);
    }
    eprintln!(
        "wrote {} and {}",
        out.join("compare.md").display(),
        out.join("compare.json").display()
    );
    ExitCode::SUCCESS
}
