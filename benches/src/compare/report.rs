//! The comparison's results: a Markdown table (printed and written) and JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::backend::BackendKind;
use super::machine::Machine;
use super::workload::{Metric, Workload, WORKLOADS};

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
    /// Median completion latency (QD1 workloads).
    pub p50_us: Option<f64>,
    /// 99th percentile completion latency (QD1 workloads).
    pub p99_us: Option<f64>,
    /// Backend CPU seconds (user + system, all threads) per GB (1e9 bytes) moved.
    pub backend_cpu_s_per_gb: f64,
    /// Backend resident memory after the workload, in bytes.
    pub backend_rss_bytes: u64,
    /// Backend peak resident memory so far, in bytes.
    pub backend_peak_rss_bytes: u64,
}

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
        for skipped in &self.skipped {
            let _ = writeln!(s, "\n**Skipped {}**: {}", skipped.backend, skipped.reason);
        }
        for &q in &self.queue_counts {
            let _ = writeln!(s, "\n## {q} queue{}\n", if q == 1 { "" } else { "s" });
            let _ = write!(s, "| workload |");
            for b in BackendKind::ALL {
                let _ = write!(s, " {} |", b.label());
            }
            for b in QVOLS {
                let _ = write!(s, " {0} vs LUKS | {0} vs raw |", b.short());
            }
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "|---|{}",
                "---|".repeat(BackendKind::ALL.len() + 2 * QVOLS.len())
            );
            for w in &WORKLOADS {
                let _ = write!(s, "| {} |", w.name);
                for b in BackendKind::ALL {
                    let _ = write!(s, " {} |", cell(find(self, b, q, w)));
                }
                for b in QVOLS {
                    let mine = find(self, b, q, w);
                    let _ = write!(
                        s,
                        " {} | {} |",
                        ratio(mine, find(self, BackendKind::QsdLuks, q, w)),
                        ratio(mine, find(self, BackendKind::QsdRaw, q, w))
                    );
                }
                let _ = writeln!(s);
            }
            let _ = writeln!(
                s,
                "\nBackend CPU seconds per GB moved (user + system, all threads), and peak RSS:\n"
            );
            let _ = write!(s, "| workload |");
            for b in BackendKind::ALL {
                let _ = write!(s, " {} |", b.label());
            }
            let _ = writeln!(s, "\n|---|{}", "---|".repeat(BackendKind::ALL.len()));
            for w in &WORKLOADS {
                let _ = write!(s, "| {} |", w.name);
                for b in BackendKind::ALL {
                    let c = find(self, b, q, w).map_or("—".to_owned(), |m| {
                        format!("{:.2}", m.backend_cpu_s_per_gb)
                    });
                    let _ = write!(s, " {c} |");
                }
                let _ = writeln!(s);
            }
            let _ = write!(s, "| peak RSS |");
            for b in BackendKind::ALL {
                let peak = self
                    .measurements
                    .iter()
                    .filter(|m| m.backend == b.label() && m.queues == q)
                    .map(|m| m.backend_peak_rss_bytes)
                    .max();
                let c = peak.map_or("—".to_owned(), |p| {
                    format!("{:.0} MiB", p as f64 / 1048576.0)
                });
                let _ = write!(s, " {c} |");
            }
            let _ = writeln!(s);
        }
        s.push_str(&self.goals());
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
