//! The comparison's results: a Markdown table (printed and written) and JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::backend::{BackendKind, ImageSpace};
use super::disksync::DiskSync;
use super::machine::Machine;
use super::run::DataKind;
use super::workload::{Metric, Workload, SUSTAINED, WORKLOADS};

/// When [`ImageSpace`] is read the first time: the image written once, whole, with the
/// run's data.
pub const AFTER_PREFILL: &str = "after the prefill";

/// When [`ImageSpace`] is read the second time.
pub const AFTER_WORKLOADS: &str = "after the workloads";

/// One backend, one queue count, one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Backend label, e.g. "qsd LUKS".
    pub backend: String,
    /// Virtqueues used by client and backend.
    pub queues: usize,
    /// Workload name.
    pub workload: String,
    /// What the workload reports.
    pub metric: Metric,
    /// Bytes per second in the measurement window.
    pub bytes_per_sec: f64,
    /// Requests per second in the measurement window.
    pub iops: f64,
    /// Median completion latency.
    pub p50_us: Option<f64>,
    /// 99th percentile completion latency.
    pub p99_us: Option<f64>,
    /// 99.9th percentile completion latency.
    pub p99_9_us: Option<f64>,
    /// The longest completion latency in the window.
    pub max_us: Option<f64>,
    /// Measured seconds.
    pub measure_s: f64,
    /// Bytes moved in the whole run, warm-up and drain included.
    pub total_bytes: u64,
    /// Backend CPU seconds (user + system, all threads) per GB (1e9 bytes) moved.
    pub backend_cpu_s_per_gb: f64,
    /// Backend resident memory after the workload, in bytes.
    pub backend_rss_bytes: u64,
    /// Backend peak resident memory so far, in bytes.
    pub backend_peak_rss_bytes: u64,
    /// Backend CPU while idle, in percent of one core: measured over [`IDLE_SECONDS`] with
    /// no I/O, once the workloads of its run are done (set on the last measurement of it).
    pub backend_idle_cpu_pct: Option<f64>,
}

/// Seconds of no I/O over which a backend's idle CPU is measured (after one more second of
/// quiet, so that a polling queue thread has gone back to sleep).
pub const IDLE_SECONDS: u64 = 3;

/// A backend that was not measured, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// Backend label.
    pub backend: String,
    /// The reason, as a sentence.
    pub reason: String,
}

/// Everything one run produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// UTC time the run started (RFC 3339-ish, from `date -u`).
    pub date: String,
    /// How to reproduce it.
    pub command: String,
    /// vhost-qvol's environment settings that change its behaviour (e.g.
    /// `QVOL_WRITEBACK_MIB`, `QVOL_BENCH_POLL_US` for `--poll-us`), as set for this run.
    pub daemon_env: Vec<(String, String)>,
    /// The disk's own sync bandwidth, before and after the backends.
    pub disk_sync: Vec<DiskSync>,
    /// Measured seconds of the sustained write, if it ran.
    pub sustained_s: Option<f64>,
    /// Whether RBD backends were measured.
    pub rbd: bool,
    /// Whether qsd's rbd driver ran with librbd's cache off.
    pub rbd_cache_off: bool,
    /// The machine.
    pub machine: Machine,
    /// Image size in bytes, the same for every backend.
    pub image_size: u64,
    /// Unmeasured seconds before each measurement.
    pub warmup_s: f64,
    /// Measured seconds per workload.
    pub measure_s: f64,
    /// Queue counts run.
    pub queue_counts: Vec<usize>,
    /// The figures.
    pub measurements: Vec<Measurement>,
    /// Backends left out, with the reason.
    pub skipped: Vec<Skipped>,
    /// What the client's writes carried (the same for every backend).
    pub data: DataKind,
    /// The workloads, in the order they ran on each backend.
    pub workloads: Vec<String>,
    /// `qvol create --compress` arguments of the compressed qvol backends (when any ran).
    pub compress: Option<String>,
    /// What qvol's unit codec makes of the client's data (when a compressed backend ran).
    pub data_units: Option<DataUnits>,
    /// The space each image took: after the prefill, and after the workloads.
    pub space: Vec<ImageSpace>,
}

/// The client's buffer cut into compression units and packed by qvol's unit codec
/// (`qvol_core::unit::pack`): the saving a volume gets when the data is written whole.
#[derive(Clone, Debug, Serialize)]
pub struct DataUnits {
    /// Unit size in bytes.
    pub unit_bytes: u64,
    /// zstd level.
    pub level: i32,
    /// Units packed.
    pub units: u64,
    /// Blocks they would take (a unit that saves no block counts as its `N` plain blocks).
    pub blocks: u64,
    /// Plain blocks / stored blocks.
    pub saving: f64,
    /// zstd's own ratio (unit bytes / frame bytes) over the units.
    pub zstd_ratio: f64,
}

fn find<'a>(
    r: &'a Report,
    backend: BackendKind,
    queues: usize,
    w: &Workload,
) -> Option<&'a Measurement> {
    r.measurements
        .iter()
        .find(|m| m.backend == backend.label() && m.queues == queues && m.workload == w.name)
}

/// The figure compared in ratios: bandwidth, IOPS, or p99 latency.
fn key_figure(m: &Measurement) -> Option<f64> {
    match m.metric {
        Metric::Bandwidth => Some(m.bytes_per_sec),
        Metric::Iops => Some(m.iops),
        Metric::Latency => m.p99_us,
    }
}

fn cell(m: Option<&Measurement>) -> String {
    let Some(m) = m else { return "—".to_owned() };
    match m.metric {
        Metric::Bandwidth => format!("{:.2} GB/s", m.bytes_per_sec / 1e9),
        Metric::Iops => format!("{:.1}k IOPS", m.iops / 1e3),
        Metric::Latency => format!(
            "{:.0} / {:.0} µs",
            m.p50_us.unwrap_or(f64::NAN),
            m.p99_us.unwrap_or(f64::NAN)
        ),
    }
}

fn ratio(m: Option<&Measurement>, base: Option<&Measurement>) -> String {
    match (m.and_then(key_figure), base.and_then(key_figure)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".to_owned(),
    }
}

const QVOLS: [BackendKind; 2] = [BackendKind::ALL[2], BackendKind::ALL[3]];

/// The backend families of the tables, each with what its heading adds: images in files,
/// and images in Ceph RBD (when measured).
const FAMILIES: [([BackendKind; 4], &str); 2] = [
    (BackendKind::ALL, ""),
    (BackendKind::RBD, ", images in Ceph RBD"),
];

/// The log length qvol gives an image of `size` bytes (qvol-core's `Regions::for_size`:
/// size / 32 rounded up to a power of two, 4 to 64 MiB). One 128-byte record per 4 KiB
/// block written, so the log is full after `log_len * 32` bytes of writes.
pub fn qvol_log_len(size: u64) -> u64 {
    (size / 32).next_power_of_two().clamp(4 << 20, 64 << 20)
}

fn ms(us: Option<f64>) -> String {
    match us {
        Some(us) if us >= 10_000.0 => format!("{:.0} ms", us / 1e3),
        Some(us) if us >= 1_000.0 => format!("{:.1} ms", us / 1e3),
        Some(us) => format!("{us:.0} µs"),
        None => "—".to_owned(),
    }
}

fn times(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".to_owned(),
    }
}

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# qvol end-to-end comparison ({})\n", self.date);
        let _ = writeln!(
            s,
            "Machine: {} ({} CPUs, {:.0} GiB), crypto flags: {}; {}; images on {}; {}.",
            m.cpu_model,
            m.cpus,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.crypto_flags.join(" "),
            m.kernel,
            m.filesystem,
            m.qsd_version
        );
        for (suite, imp) in &m.qvol_implementations {
            let _ = writeln!(s, "qvol {suite}: {imp}.");
        }
        let _ = writeln!(
            s,
            "\nOne libblkio `virtio-blk-vhost-user` client, one thread per queue, queue depth per \
             queue as named; image {} MiB (the same for every backend, filled once before \
             measuring); {:.1} s warm-up then {:.1} s measured per workload. Latency cells are \
             p50 / p99; latency ratios compare p99 (above 1 is slower). Reproduce: `{}`.",
            self.image_size >> 20,
            self.warmup_s,
            self.measure_s,
            self.command
        );
        if let Some(secs) = self.sustained_s {
            let _ = writeln!(
                s,
                "\nThe sustained write (`{}`) runs {secs:.0} s after the other workloads; a qvol \
                 image of this size has a {} MiB log, full after {} MiB of writes (format \
                 version 6: two areas of half that, a pipelined commit after every {} MiB).",
                SUSTAINED.name,
                qvol_log_len(self.image_size) >> 20,
                (qvol_log_len(self.image_size) * 32) >> 20,
                (qvol_log_len(self.image_size) * 16) >> 20
            );
        }
        if self.rbd {
            let _ = writeln!(
                s,
                "\nqsd's rbd driver ran with librbd's cache {}; vhost-qvol always runs with it \
                 off (an acknowledged write is on the OSDs: it survives kill -9).",
                if self.rbd_cache_off {
                    "off (`cache.direct=on`, `QVOL_BENCH_RBD_CACHE=off`): an acknowledged write \
                     is on the OSDs, as qvol's"
                } else {
                    "on (QEMU's default, writeback: an acknowledged write waits in qsd's memory \
                     until the guest flushes)"
                }
            );
        }
        for (k, v) in &self.daemon_env {
            let _ = writeln!(s, "\nvhost-qvol ran with `{k}={v}`.");
        }
        if !self.disk_sync.is_empty() {
            let figures: Vec<String> = self
                .disk_sync
                .iter()
                .map(|d| {
                    format!(
                        "{:.2} GB/s {} (fdatasync {:.2} s)",
                        d.bytes_per_sec / 1e9,
                        d.when,
                        d.sync_s
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "\nDisk sync bandwidth ({} MiB of 1 MiB writes to a new file next to the \
                 images, then `fdatasync`, as `dd ... conv=fdatasync`): {}.",
                self.disk_sync[0].bytes >> 20,
                figures.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "\nData written: {} ({}). Workloads in the order they ran on each backend: {}.",
            self.data.name(),
            match self.data {
                DataKind::Random => "pseudo-random bytes, incompressible",
                DataKind::Text => {
                    "log lines with varying timestamps, addresses, paths and ids, the same \
                     bytes for every backend"
                }
            },
            self.workloads.join(", ")
        );
        if let (Some(c), Some(u)) = (&self.compress, &self.data_units) {
            let _ = writeln!(
                s,
                "\nCompressed backends: `qvol create --compress {c}`. qvol's unit codec (zstd \
                 level {}) packs the client's buffer, cut into {} KiB units, into {} blocks \
                 for {} plain: {:.2}× when written whole (zstd alone: {:.2}×).",
                u.level,
                u.unit_bytes >> 10,
                u.blocks,
                u.units * (u.unit_bytes / 4096),
                u.saving,
                u.zstd_ratio
            );
        }
        for skipped in &self.skipped {
            let _ = writeln!(s, "\n**Skipped {}**: {}", skipped.backend, skipped.reason);
        }
        for &q in &self.queue_counts {
            for (family, medium) in FAMILIES {
                if family.iter().any(|&b| self.measured(b, q)) {
                    self.family_tables(&mut s, q, &family, medium);
                }
            }
            s.push_str(&self.write_latency(q));
            s.push_str(&self.compression_tables(q));
        }
        s.push_str(&self.space_table());
        // Issue 6's goals compare with qemu-storage-daemon: only when it ran.
        if [BackendKind::QsdRaw, BackendKind::QsdLuks]
            .iter()
            .any(|&b| self.measured(b, 1))
        {
            s.push_str(&self.goals());
            s.push_str(&self.sustained_goals());
        }
        s.push_str(&self.compression_goals());
        s
    }

    /// The compressed qvol backends measured with `q` queues whose plain twin was measured
    /// too, with it.
    fn zstd_pairs(&self, q: usize) -> Vec<(BackendKind, BackendKind)> {
        BackendKind::ZSTD
            .into_iter()
            .filter_map(|z| Some((z, z.plain_twin()?)))
            .filter(|&(z, p)| self.measured(z, q) && self.measured(p, q))
            .collect()
    }

    /// The workloads measured, in table order.
    fn measured_workloads(&self) -> Vec<&'static Workload> {
        WORKLOADS
            .iter()
            .chain([&SUSTAINED])
            .filter(|w| self.measurements.iter().any(|m| m.workload == w.name))
            .collect()
    }

    /// Each compressed qvol backend beside the same suite without compression: throughput
    /// (ratio compressed / plain, above 1 is faster; for latency, p99 compressed / plain,
    /// above 1 is slower) and CPU seconds per GB.
    fn compression_tables(&self, q: usize) -> String {
        let mut s = String::new();
        let pairs = self.zstd_pairs(q);
        if pairs.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\n## Compression, {q} queue{} ({} data)\n",
            if q == 1 { "" } else { "s" },
            self.data.name()
        );
        let _ = write!(s, "| workload |");
        for (z, p) in &pairs {
            let _ = write!(s, " {} | {} | zstd / plain |", p.label(), z.label());
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(pairs.len() * 3));
        for w in self.measured_workloads() {
            let _ = write!(s, "| {} |", w.name);
            for &(z, p) in &pairs {
                let (mz, mp) = (find(self, z, q, w), find(self, p, q, w));
                let _ = write!(s, " {} | {} | {} |", cell(mp), cell(mz), ratio(mz, mp));
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "\nBackend CPU seconds per GB moved (user + system, all threads):\n"
        );
        let _ = write!(s, "| workload |");
        for (z, p) in &pairs {
            let _ = write!(s, " {} | {} | zstd − plain |", p.label(), z.label());
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(pairs.len() * 3));
        for w in self.measured_workloads() {
            let _ = write!(s, "| {} |", w.name);
            for &(z, p) in &pairs {
                let cpu = |b| find(self, b, q, w).map(|m| m.backend_cpu_s_per_gb);
                let f = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.2}"));
                let diff = match (cpu(z), cpu(p)) {
                    (Some(a), Some(b)) => format!("{:+.2}", a - b),
                    _ => "—".to_owned(),
                };
                let _ = write!(s, " {} | {} | {diff} |", f(cpu(p)), f(cpu(z)));
            }
            let _ = writeln!(s);
        }
        s
    }

    /// The space of every image, after the prefill and after the workloads.
    fn space_table(&self) -> String {
        let mut s = String::new();
        if self.space.is_empty() {
            return s;
        }
        let mib =
            |b: Option<u64>| b.map_or("—".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0));
        let _ = writeln!(
            s,
            "\nSpace (read with the backend stopped): the image file's length and the host \
             bytes it takes (`st_blocks` × 512); for qvol, `qvol info --json`'s allocated \
             bytes and compression usage (logical blocks in units / the blocks those units \
             take / plain blocks). Saving = the plain twin's host bytes / these, at the same \
             point:\n"
        );
        let _ = writeln!(
            s,
            "| backend | when | file MiB | host allocated MiB | qvol allocated MiB | ratio | \
             units (lbns / blocks) | plain blocks | saving vs plain |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for sp in &self.space {
            let twin = BackendKind::ZSTD
                .into_iter()
                .find(|z| z.label() == sp.backend)
                .and_then(BackendKind::plain_twin)
                .and_then(|p| {
                    self.space
                        .iter()
                        .find(|o| o.backend == p.label() && o.when == sp.when)
                });
            let saving = match (
                twin.and_then(|t| t.host_allocated_bytes),
                sp.host_allocated_bytes,
            ) {
                (Some(a), Some(b)) if b > 0 => format!("{:.2}×", a as f64 / b as f64),
                _ => "—".to_owned(),
            };
            let units = match (sp.unit_lbns, sp.unit_blocks) {
                (Some(l), Some(b)) => format!("{l} / {b}"),
                _ => "—".to_owned(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {units} | {} | {saving} |",
                sp.backend,
                sp.when,
                mib(sp.file_bytes),
                mib(sp.host_allocated_bytes),
                mib(sp.qvol_allocated_bytes),
                sp.compression_ratio
                    .map_or("—".to_owned(), |r| format!("{r:.2}")),
                sp.plain_blocks.map_or("—".to_owned(), |p| p.to_string()),
            );
        }
        for sp in self.space.iter().filter(|sp| sp.error.is_some()) {
            let _ = writeln!(
                s,
                "\n{} ({}): {}",
                sp.backend,
                sp.when,
                sp.error.as_deref().unwrap_or("")
            );
        }
        s
    }

    /// Issue 16's throughput goals (1 queue), compressed against plain; the space goal is
    /// for a guest's filesystem (scripts/bench-compress.sh), so here it is only shown for
    /// this run's data.
    fn compression_goals(&self) -> String {
        let mut s = String::new();
        let q = 1;
        let pairs = self.zstd_pairs(q);
        if pairs.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\n## Goals (issue 16, compression, 1 queue, {} data)\n",
            self.data.name()
        );
        let verdict = |met: bool| if met { "met" } else { "MISSED" };
        let w = |name: &str| WORKLOADS.iter().find(|w| w.name == name);
        for (z, p) in pairs {
            for (wname, goal, what) in [
                ("seq-read-1M-qd8", 0.75, "≤ 25 % loss"),
                ("rand-read-4K-qd32", 0.7, "≥ 0.7×"),
            ] {
                let Some(wl) = w(wname) else { continue };
                match (
                    find(self, z, q, wl).and_then(key_figure),
                    find(self, p, q, wl).and_then(key_figure),
                ) {
                    (Some(a), Some(b)) if b > 0.0 => {
                        let r = a / b;
                        let _ = writeln!(
                            s,
                            "- {} {wname}: {r:.2}× {} (goal {what}): {}",
                            z.label(),
                            p.label(),
                            verdict(r >= goal)
                        );
                    }
                    _ => {
                        let _ = writeln!(s, "- {} {wname}: not measured", z.label());
                    }
                }
            }
            let host = |b: BackendKind| {
                self.space
                    .iter()
                    .find(|sp| sp.backend == b.label() && sp.when == AFTER_PREFILL)
                    .and_then(|sp| sp.host_allocated_bytes)
            };
            if let (Some(a), Some(b)) = (host(p), host(z)) {
                if b > 0 && self.data == DataKind::Random {
                    let _ = writeln!(
                        s,
                        "- {}: {:.2}× the host space of {} {AFTER_PREFILL} (random data: \
                         nothing to save; the space goal is for a guest's filesystem, \
                         scripts/bench-compress.sh)",
                        z.label(),
                        b as f64 / a as f64,
                        p.label()
                    );
                } else if b > 0 {
                    let r = a as f64 / b as f64;
                    let _ = writeln!(
                        s,
                        "- {}: {r:.2}× less host space than {} {AFTER_PREFILL} (goal ≥ 1.8× \
                         on a guest's filesystem, measured by scripts/bench-compress.sh; \
                         here on this run's {} data): {}",
                        z.label(),
                        p.label(),
                        self.data.name(),
                        verdict(r >= 1.8)
                    );
                }
            }
        }
        s
    }

    /// Whether `b` was measured with `q` queues.
    fn measured(&self, b: BackendKind, q: usize) -> bool {
        self.measurements
            .iter()
            .any(|m| m.backend == b.label() && m.queues == q)
    }

    /// The throughput and CPU tables of one family (raw, LUKS, the two qvol suites) on one
    /// medium, with `q` queues.
    fn family_tables(&self, s: &mut String, q: usize, family: &[BackendKind; 4], medium: &str) {
        let _ = writeln!(
            s,
            "\n## {q} queue{}{medium}\n",
            if q == 1 { "" } else { "s" }
        );
        let _ = write!(s, "| workload |");
        for b in *family {
            let _ = write!(s, " {} |", b.label());
        }
        for b in [family[2], family[3]] {
            let _ = write!(s, " {0} vs LUKS | {0} vs raw |", b.short());
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---|".repeat(family.len() + 4));
        for w in &WORKLOADS {
            let _ = write!(s, "| {} |", w.name);
            for b in *family {
                let _ = write!(s, " {} |", cell(find(self, b, q, w)));
            }
            for b in [family[2], family[3]] {
                let mine = find(self, b, q, w);
                let _ = write!(
                    s,
                    " {} | {} |",
                    ratio(mine, find(self, family[1], q, w)),
                    ratio(mine, find(self, family[0], q, w))
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "\nBackend CPU seconds per GB moved (user + system, all threads), and peak RSS:\n"
        );
        let _ = write!(s, "| workload |");
        for b in *family {
            let _ = write!(s, " {} |", b.label());
        }
        let _ = writeln!(s, "\n|---|{}", "---|".repeat(family.len()));
        for w in &WORKLOADS {
            let _ = write!(s, "| {} |", w.name);
            for b in *family {
                let c = find(self, b, q, w).map_or("—".to_owned(), |m| {
                    format!("{:.2}", m.backend_cpu_s_per_gb)
                });
                let _ = write!(s, " {c} |");
            }
            let _ = writeln!(s);
        }
        self.backend_row(s, q, family, "peak RSS", |ms| {
            let peak = ms.iter().map(|m| m.backend_peak_rss_bytes).max()?;
            Some(format!("{:.0} MiB", peak as f64 / 1048576.0))
        });
        let idle = format!("idle CPU ({IDLE_SECONDS} s, no I/O)");
        self.backend_row(s, q, family, &idle, |ms| {
            let p = ms.iter().find_map(|m| m.backend_idle_cpu_pct)?;
            Some(format!("{p:.2} % of a core"))
        });
    }

    /// A table row `label` with one cell per backend of `family`: `cell` of its measurements
    /// at `q` queues ("—" for none).
    fn backend_row(
        &self,
        s: &mut String,
        q: usize,
        family: &[BackendKind; 4],
        label: &str,
        cell: impl Fn(&[&Measurement]) -> Option<String>,
    ) {
        let _ = write!(s, "| {label} |");
        for &b in family {
            let ms: Vec<&Measurement> = self
                .measurements
                .iter()
                .filter(|m| m.backend == b.label() && m.queues == q)
                .collect();
            let c = cell(&ms).unwrap_or_else(|| "—".to_owned());
            let _ = write!(s, " {c} |");
        }
        let _ = writeln!(s);
    }

    /// The mean of the disk sync measurements, bytes per second.
    pub fn disk_sync_bytes_per_sec(&self) -> Option<f64> {
        (!self.disk_sync.is_empty()).then(|| {
            self.disk_sync.iter().map(|d| d.bytes_per_sec).sum::<f64>()
                / self.disk_sync.len() as f64
        })
    }

    /// Sequential writes (the burst and the sustained write): bandwidth against LUKS and
    /// the disk's sync bandwidth, and the tail latency of single requests.
    fn write_latency(&self, q: usize) -> String {
        let mut s = String::new();
        let workloads = [&WORKLOADS[0], &SUSTAINED];
        if !workloads.iter().any(|w| {
            BackendKind::ALL
                .iter()
                .any(|&b| find(self, b, q, w).is_some())
        }) {
            return s;
        }
        let sync = self.disk_sync_bytes_per_sec();
        let _ = writeln!(
            s,
            "\nSequential writes: bandwidth, the latency of single requests (submission to \
             completion), and ratios to qsd LUKS and to the disk's sync bandwidth{}:\n",
            sync.map_or(String::new(), |b| format!(" ({:.2} GB/s)", b / 1e9))
        );
        let _ = writeln!(
            s,
            "| workload | backend | GB/s | vs LUKS | vs disk sync | p99 | p99.9 | max | \
             p99.9 vs LUKS | max vs LUKS | CPU-s/GB | GB written |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for w in workloads {
            let luks = find(self, BackendKind::QsdLuks, q, w);
            for b in BackendKind::ALL {
                let Some(m) = find(self, b, q, w) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.1} |",
                    w.name,
                    b.label(),
                    m.bytes_per_sec / 1e9,
                    times(Some(m.bytes_per_sec), luks.map(|l| l.bytes_per_sec)),
                    times(Some(m.bytes_per_sec), sync),
                    ms(m.p99_us),
                    ms(m.p99_9_us),
                    ms(m.max_us),
                    times(m.p99_9_us, luks.and_then(|l| l.p99_9_us)),
                    times(m.max_us, luks.and_then(|l| l.max_us)),
                    m.backend_cpu_s_per_gb,
                    m.total_bytes as f64 / 1e9
                );
            }
        }
        s
    }

    /// Issue 15's goals for the sustained write, against the 1-queue figures.
    fn sustained_goals(&self) -> String {
        let mut s = String::new();
        let q = 1;
        let Some(luks) = find(self, BackendKind::QsdLuks, q, &SUSTAINED) else {
            return s;
        };
        let _ = writeln!(s, "\n## Goals (issue 15, sustained write, 1 queue)\n");
        let sync = self.disk_sync_bytes_per_sec();
        let log_fill = qvol_log_len(self.image_size) * 32;
        let verdict = |met: bool| if met { "met" } else { "MISSED" };
        for b in QVOLS {
            let Some(m) = find(self, b, q, &SUSTAINED) else {
                continue;
            };
            let fills = m.total_bytes as f64 / log_fill as f64;
            let _ = writeln!(
                s,
                "- {}: {:.1} log-fulls written{}",
                b.label(),
                fills,
                if fills < 8.0 {
                    " (fewer than 8: run longer or use a smaller image)"
                } else {
                    ""
                }
            );
            let r = m.bytes_per_sec / luks.bytes_per_sec;
            let _ = writeln!(
                s,
                "- {}: {r:.2}× qsd LUKS bandwidth (goal ≥ 1.3×): {}",
                b.label(),
                verdict(r >= 1.3)
            );
            if let Some(sync) = sync {
                let r = m.bytes_per_sec / sync;
                let _ = writeln!(
                    s,
                    "- {}: {r:.2}× the disk's sync bandwidth (goal ≥ 0.9×): {}",
                    b.label(),
                    verdict(r >= 0.9)
                );
            }
            if let (Some(a), Some(l)) = (m.p99_9_us, luks.p99_9_us) {
                let r = a / l;
                let _ = writeln!(
                    s,
                    "- {}: p99.9 {} = {r:.2}× qsd LUKS's {} (goal ≤ 3×): {}",
                    b.label(),
                    ms(Some(a)),
                    ms(Some(l)),
                    verdict(r <= 3.0)
                );
            }
            if let Some(max) = m.max_us {
                let _ = writeln!(
                    s,
                    "- {}: longest wait {} (goal < 250 ms): {}",
                    b.label(),
                    ms(Some(max)),
                    verdict(max < 250_000.0)
                );
            }
        }
        s
    }

    /// The goals of issue 6, checked against the 1-queue figures.
    fn goals(&self) -> String {
        let mut s = String::from("\n## Goals (issue 6, 1 queue)\n\n");
        let q = 1;
        let w = |name: &str| WORKLOADS.iter().find(|w| w.name == name);
        let check = |s: &mut String,
                     b: BackendKind,
                     wname: &str,
                     base: BackendKind,
                     goal: f64,
                     higher_better: bool| {
            let Some(wl) = w(wname) else { return };
            let got = match (
                find(self, b, q, wl).and_then(key_figure),
                find(self, base, q, wl).and_then(key_figure),
            ) {
                (Some(a), Some(bb)) if bb > 0.0 => a / bb,
                _ => {
                    let _ = writeln!(
                        s,
                        "- {} {wname} vs {}: not measured",
                        b.label(),
                        base.label()
                    );
                    return;
                }
            };
            let met = if higher_better {
                got >= goal
            } else {
                got <= goal
            };
            let _ = writeln!(
                s,
                "- {} {wname}: {got:.2}× {} (goal {} {goal}×): {}",
                b.label(),
                base.label(),
                if higher_better { "≥" } else { "≤" },
                if met { "met" } else { "MISSED" }
            );
        };
        let (x, a) = (QVOLS[0], QVOLS[1]);
        for (b, goal) in [(x, 3.5), (a, 8.0)] {
            for wname in ["seq-write-1M-qd8", "seq-read-1M-qd8"] {
                check(&mut s, b, wname, BackendKind::QsdLuks, goal, true);
            }
        }
        for b in QVOLS {
            check(
                &mut s,
                b,
                "rand-read-4K-qd32",
                BackendKind::QsdRaw,
                0.8,
                true,
            );
            check(
                &mut s,
                b,
                "rand-write-4K-qd32",
                BackendKind::QsdRaw,
                0.6,
                true,
            );
            check(
                &mut s,
                b,
                "lat-read-4K-qd1",
                BackendKind::QsdRaw,
                1.5,
                false,
            );
            check(
                &mut s,
                b,
                "lat-write-4K-qd1",
                BackendKind::QsdRaw,
                1.5,
                false,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_length_follows_the_image_size() {
        assert_eq!(qvol_log_len(256 << 20), 8 << 20);
        assert_eq!(qvol_log_len(1 << 30), 32 << 20);
        assert_eq!(qvol_log_len(2 << 30), 64 << 20);
        assert_eq!(qvol_log_len(64 << 30), 64 << 20);
        assert_eq!(qvol_log_len(64 << 20), 4 << 20);
    }

    #[test]
    fn latencies_print_in_readable_units() {
        assert_eq!(ms(Some(850.0)), "850 µs");
        assert_eq!(ms(Some(1_700.0)), "1.7 ms");
        assert_eq!(ms(Some(1_700_000.0)), "1700 ms");
        assert_eq!(ms(None), "—");
        assert_eq!(times(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(times(Some(3.0), None), "—");
    }
}
