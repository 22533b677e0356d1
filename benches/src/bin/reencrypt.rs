//! Re-encryption figures (issue 13): how fast `qvol reencrypt` re-seals a filled volume
//! offline, and, online, how long the daemon takes while a libblkio client keeps doing 4 KiB
//! QD1 reads and writes, with the client's latency before and during the re-encryption.
//!
//! `scripts/bench.sh --reencrypt [options]` builds and runs it; `--help` lists the options.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use benches::compare::backend::{self, BackendKind, Prepared, Tools};
use benches::compare::machine::Machine;
use benches::compare::procstat;
use benches::compare::run::{self, connect, RunStats};
use benches::compare::workload::{Workload, PREFILL, WORKLOADS};
use clap::Parser;
use qvol_core::CipherSuite;

/// Re-encryption throughput and its effect on a client's latency.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds of each latency workload before the re-encryption.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Suites: xchacha, aegis.
    #[arg(long, default_value = "xchacha,aegis", value_delimiter = ',')]
    suites: Vec<String>,
    /// Rates (MiB/s of data re-sealed) of the online runs, comma-separated; 0 = unlimited.
    #[arg(long, default_value = "0,64", value_delimiter = ',')]
    rates: Vec<u64>,
    /// Where the images and sockets go.
    #[arg(long, default_value = "target/bench/work")]
    dir: PathBuf,
}

/// Latency figures of a run, in µs.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Latency {
    ops: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Latency {
    fn of(st: &RunStats) -> Latency {
        let us = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
        Latency {
            ops: st.latencies_ns.len(),
            p50: us(st.percentile(50.0)),
            p99: us(st.percentile(99.0)),
            p999: us(st.percentile(99.9)),
            max: us(st.max()),
        }
    }
}

fn workload(name: &str) -> Workload {
    *WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no workload {name}"))
}

/// CPU seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain integers: all zeros is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) fills the struct we hand it, nothing else.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn qvol(tools: &Tools, p: &Prepared) -> Result<Command, String> {
    let (qvol, _) = tools.qvol.as_ref().map_err(Clone::clone)?;
    let mut c = Command::new(qvol);
    c.env("QVOL_KEYSTORE", p.keystore())
        .arg("reencrypt")
        .arg(&p.image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(c)
}

/// Fills the image of `p` once through the daemon.
fn fill(tools: &Tools, p: &Prepared) -> Result<(), String> {
    let running = backend::start(tools, p, 1)?;
    let mut client = connect(&running.socket, 1)?;
    run::run(&mut client, &PREFILL, Duration::ZERO, Duration::ZERO, true)?;
    drop(client);
    running.stop();
    Ok(())
}

/// Re-encrypts the image of `p` offline; returns (seconds, CPU seconds).
fn offline(tools: &Tools, p: &Prepared) -> Result<(f64, f64), String> {
    let (t, cpu) = (Instant::now(), children_cpu());
    let out = qvol(tools, p)?
        .output()
        .map_err(|e| format!("cannot run qvol reencrypt: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qvol reencrypt failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((t.elapsed().as_secs_f64(), children_cpu() - cpu))
}

struct Online {
    rate_mib: u64,
    seconds: f64,
    daemon_cpu: f64,
    before: [Latency; 2],
    during: [Latency; 2],
}

/// Serves the image of `p`, measures QD1 read and write latency, then re-encrypts it
/// through the daemon at `rate_mib` while measuring again, until it is done.
fn online(tools: &Tools, p: &Prepared, seconds: f64, rate_mib: u64) -> Result<Online, String> {
    let mut p = p.clone();
    p.extra_args = vec![
        "--control-socket".to_owned(),
        p.image.with_extension("ctl").display().to_string(),
    ];
    let p = &p;
    let running = backend::start(tools, p, 1)?;
    let mut client = connect(&running.socket, 1)?;
    let lat = [workload("lat-read-4K-qd1"), workload("lat-write-4K-qd1")];
    let measure = Duration::from_secs_f64(seconds);
    let mut before = Vec::new();
    for w in &lat {
        before.push(Latency::of(&run::run(
            &mut client,
            w,
            Duration::from_millis(500),
            measure,
            false,
        )?));
    }
    let mut cmd = qvol(tools, p)?;
    if rate_mib > 0 {
        cmd.arg("--rate").arg(rate_mib.to_string());
    }
    let cpu0 = procstat::cpu_time(running.pid())?;
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run qvol reencrypt: {e}"))?;
    let mut during = [RunStats::default(), RunStats::default()];
    let mut turn = 0;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        let st = run::run(
            &mut client,
            &lat[turn],
            Duration::ZERO,
            Duration::from_millis(500),
            false,
        )?;
        during[turn].latencies_ns.extend(st.latencies_ns);
        turn = 1 - turn;
    };
    let secs = t.elapsed().as_secs_f64();
    let daemon_cpu = (procstat::cpu_time(running.pid())? - cpu0).as_secs_f64();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!(
            "qvol reencrypt (served) failed: {status}: {}",
            err.trim()
        ));
    }
    run::verify(&mut client)?;
    drop(client);
    running.stop();
    for d in &mut during {
        d.latencies_ns.sort_unstable();
    }
    Ok(Online {
        rate_mib,
        seconds: secs,
        daemon_cpu,
        before: [before[0], before[1]],
        during: [Latency::of(&during[0]), Latency::of(&during[1])],
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run_all(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reencrypt bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_all(args: &Args) -> Result<(), String> {
    let tools = Tools::find()?;
    std::fs::create_dir_all(&args.dir).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(args.dir.join("keystore"));
    let size = args.size_mib << 20;
    let gb = size as f64 / 1e9;
    let m = Machine::describe(&args.dir, &tools.qsd);
    println!(
        "{} ({} CPUs; {}), images on {}, kernel {}",
        m.cpu_model,
        m.cpus,
        m.crypto_flags.join(" "),
        m.filesystem,
        m.kernel
    );
    println!(
        "\n{} MiB images, filled; 4 KiB QD1 random reads and writes through libblkio.\n\n| suite | run | seconds | GB/s | CPU-s/GB | read p50/p99/max µs | write p50/p99/max µs |",
        args.size_mib
    );
    println!("|---|---|---|---|---|---|---|");
    for name in &args.suites {
        let suite = match name.as_str() {
            "xchacha" => CipherSuite::XChaCha20Poly1305,
            "aegis" => CipherSuite::Aegis256,
            other => return Err(format!("unknown suite {other:?} (xchacha, aegis)")),
        };
        let p = backend::prepare(&tools, BackendKind::Qvol(suite), &args.dir, size)?;
        fill(&tools, &p)?;
        let (secs, cpu) = offline(&tools, &p)?;
        println!(
            "| {suite} | offline | {secs:.1} | {:.2} | {:.2} | | |",
            gb / secs,
            cpu / gb
        );
        for &rate in &args.rates {
            let o = online(&tools, &p, args.seconds, rate)?;
            let fmt = |l: &Latency| format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.max);
            println!(
                "| {suite} | served, before | | | | {} | {} |",
                fmt(&o.before[0]),
                fmt(&o.before[1])
            );
            let label = if o.rate_mib == 0 {
                "unlimited".to_owned()
            } else {
                format!("--rate {}", o.rate_mib)
            };
            println!(
                "| {suite} | served, during ({label}) | {:.1} | {:.2} | {:.2} | {} | {} |",
                o.seconds,
                gb / o.seconds,
                o.daemon_cpu / gb,
                fmt(&o.during[0]),
                fmt(&o.during[1])
            );
            println!(
                "|  | p99 during / before | | | | {:.1}x | {:.1}x |",
                o.during[0].p99 / o.before[0].p99,
                o.during[1].p99 / o.before[1].p99
            );
        }
    }
    Ok(())
}
