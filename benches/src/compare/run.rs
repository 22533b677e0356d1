//! Workloads on the shared libblkio client (`integration::client`): one thread per
//! virtqueue, each keeping `queue_depth` requests in flight for a fixed time, and what
//! that measured.

use std::mem::MaybeUninit;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blkio::{Completion, Errno};
use integration::client::{completion_result, describe, BlkioClient, QueueHandle, IO_TIMEOUT};
use integration::pattern;

use super::workload::{Op, Pattern, Workload};

/// What one run measured, summed over the queues.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Requests completed inside the measurement window.
    pub ops: u64,
    /// Bytes moved inside the measurement window.
    pub bytes: u64,
    /// Bytes moved in the whole run, warm-up and drain included (for CPU per GB).
    pub total_bytes: u64,
    /// Length of the measurement window.
    pub window: Duration,
    /// Completion latencies (submission to completion as the client sees it) of the
    /// requests completed inside the window, in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl RunStats {
    /// The longest latency, if any request completed.
    pub fn max(&self) -> Option<Duration> {
        self.latencies_ns.last().map(|&ns| Duration::from_nanos(ns))
    }

    /// The `p`-th percentile latency (0..=100), if any request completed.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies_ns.is_empty() {
            return None;
        }
        let idx = ((p / 100.0) * (self.latencies_ns.len() - 1) as f64).round() as usize;
        Some(Duration::from_nanos(
            self.latencies_ns[idx.min(self.latencies_ns.len() - 1)],
        ))
    }
}

/// A failed request or wait, as a sentence: `what` names the request.
fn request_error(what: &str, errno: Errno) -> String {
    if errno == Errno::TIMEDOUT {
        format!("{what}: no completion within {IO_TIMEOUT:?}; the backend hangs")
    } else {
        format!(
            "{what} failed: {}",
            std::io::Error::from_raw_os_error(errno.raw_os_error())
        )
    }
}

/// The disk size the backend reports.
pub fn capacity(client: &BlkioClient) -> Result<u64, String> {
    client
        .capacity()
        .map_err(|e| format!("reading the capacity failed: {}", describe(&e)))
}

/// What the client's writes carry (`compare --data`): the same for every backend of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Pseudo-random bytes: nothing compresses (the default, as before compression).
    #[default]
    Random,
    /// Log lines (timestamps, hosts, request lines, ids, durations) with varying fields:
    /// compressible as real text is, about 3× by zstd level 3 in 16 KiB pieces.
    Text,
}

impl DataKind {
    /// Its name for `--data`.
    pub fn name(self) -> &'static str {
        match self {
            DataKind::Random => "random",
            DataKind::Text => "text",
        }
    }

    /// Parses `--data`.
    pub fn parse(s: &str) -> Option<DataKind> {
        [DataKind::Random, DataKind::Text]
            .into_iter()
            .find(|d| d.name() == s)
    }
}

/// Fills the whole I/O buffer with incompressible data, so that writes carry no zeros.
pub fn fill_buffer(client: &mut BlkioClient) {
    fill_buffer_with(client, DataKind::Random);
}

/// Fills the whole I/O buffer with `data`; it never holds a block of zeros.
pub fn fill_buffer_with(client: &mut BlkioClient, data: DataKind) {
    fill_data(client.buffer(), data);
}

/// Fills `buf` with `data` (deterministic: the same bytes in every run).
pub fn fill_data(buf: &mut [u8], data: DataKind) {
    match data {
        DataKind::Random => fill_pseudo_random(buf, 0x9e37_79b9_7f4a_7c15),
        DataKind::Text => fill_text(buf, 0x2545_f491_4f6c_dd1d),
    }
}

/// Web server and daemon log lines, as a guest's /var/log holds: fixed words and formats
/// with varying timestamps, addresses, paths, status codes, sizes, durations and request
/// ids (16 random hex digits each, which keep zstd from finding long repeats).
fn fill_text(buf: &mut [u8], seed: u64) {
    use std::fmt::Write as _;
    const PATHS: [&str; 10] = [
        "/api/v1/volumes",
        "/api/v1/volumes/{n}/snapshots",
        "/api/v1/instances/{h}",
        "/static/js/app.{h}.js",
        "/static/css/main.css",
        "/login?next=/dashboard/{n}",
        "/api/v2/metrics/query?start={n}&step=60",
        "/healthz",
        "/api/v1/users/{u}/sessions",
        "/api/v1/instances/{h}/console",
    ];
    const AGENTS: [&str; 5] = [
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        "curl/7.88.1",
        "python-requests/2.31.0",
        "Prometheus/2.45.0",
    ];
    const DAEMONS: [(&str, &str); 6] = [
        (
            "sshd",
            "Accepted publickey for {u} from {ip} port {n} ssh2: ED25519 SHA256:{h}{h}{h}",
        ),
        (
            "systemd",
            "Started session-{n}.scope - Session {n} of User {u}.",
        ),
        (
            "kernel",
            "[UFW BLOCK] IN=ens3 OUT= SRC={ip} DST=10.0.0.{n} LEN={n} TTL=52 ID={n} PROTO=TCP \
             SPT={n} DPT=22 WINDOW={n} SYN",
        ),
        (
            "CRON",
            "({u}) CMD (/usr/local/bin/backup --incremental --target /srv/backup/{h})",
        ),
        (
            "postgres",
            "LOG:  checkpoint complete: wrote {n} buffers; 0 WAL file(s) added, 0 removed, \
             1 recycled; write={n}.{n} s, sync=0.{n} s",
        ),
        (
            "dockerd",
            "level=info msg=\"ignoring event\" container={h}{h}{h} module=libcontainerd \
             namespace=moby topic=/tasks/delete",
        ),
    ];
    const USERS: [&str; 6] = ["alice", "bob", "deploy", "backup", "ci-runner", "postgres"];
    let mut rng = seed | 1;
    let mut next = move || {
        rng = xorshift(rng);
        rng
    };
    // A template's {u}, {n}, {h} and {ip} with a user, a number, 8 hex digits, an address.
    let expand = |out: &mut String, template: &str, next: &mut dyn FnMut() -> u64| {
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').unwrap_or(0);
            let v = next();
            let _ = match &rest[open + 1..close] {
                "u" => write!(out, "{}", USERS[v as usize % USERS.len()]),
                "h" => write!(out, "{:08x}", v >> 32),
                "ip" => write!(out, "10.{}.{}.{}", v % 4, (v >> 8) % 256, (v >> 16) % 256),
                _ => write!(
                    out,
                    "{}",
                    v % [10, 100, 1000, 100_000][(v >> 40) as usize % 4]
                ),
            };
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
    };
    let mut line = String::with_capacity(512);
    let mut pos = 0;
    let mut t = 1_764_460_800u64 + next() % 86_400; // some second of 2025-11-30 UTC
    while pos < buf.len() {
        line.clear();
        let r = next();
        t += r % 3;
        let (h, m, sec) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
        if r % 3 == 0 {
            let (name, template) = DAEMONS[(r >> 8) as usize % DAEMONS.len()];
            let _ = write!(
                line,
                "2025-11-30T{h:02}:{m:02}:{sec:02}.{:06}+00:00 node-{} {name}[{}]: ",
                (r >> 12) % 1_000_000,
                (r >> 32) % 8,
                100 + (r >> 36) % 40_000
            );
            expand(&mut line, template, &mut next);
        } else {
            let ip = next();
            let _ = write!(
                line,
                "10.{}.{}.{} - - [30/Nov/2025:{h:02}:{m:02}:{sec:02} +0000] \"{} ",
                ip % 4,
                (ip >> 8) % 256,
                (ip >> 16) % 256,
                ["GET", "GET", "GET", "POST", "PUT", "DELETE"][(r >> 28) as usize % 6]
            );
            expand(&mut line, PATHS[(r >> 8) as usize % PATHS.len()], &mut next);
            let _ = write!(
                line,
                " HTTP/1.1\" {} {} \"-\" \"{}\" rt={}.{:03} req={:016x} span={:016x} \
                 sid={:012x}",
                [200, 200, 200, 200, 304, 201, 404, 500][(r >> 24) as usize % 8],
                (r >> 40) % 60_000,
                AGENTS[(r >> 32) as usize % AGENTS.len()],
                (r >> 56) % 2,
                next() % 1000,
                next(),
                next(),
                next() >> 16
            );
        }
        line.push('\n');
        let n = line.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&line.as_bytes()[..n]);
        pos += n;
    }
}

fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    pattern::fill(buf, 0, seed);
}

/// Checks that the backend really stores data: writes 16 distinct 4 KiB blocks at
/// spread-out offsets on queue 0, flushes, reads them back and compares. Run before
/// measuring, so that a backend that completes requests without doing them cannot look
/// fast.
pub fn verify(client: &mut BlkioClient) -> Result<(), String> {
    const BS: usize = 4096;
    const N: u64 = 16;
    let capacity = capacity(client)?;
    let blocks = capacity / BS as u64;
    if blocks == 0 {
        return Err(format!(
            "the disk ({capacity} bytes) is too small to verify"
        ));
    }
    for i in 0..N {
        let off = (xorshift(0xfeed ^ (i + 1)) % blocks) / N * N * BS as u64 + i * BS as u64;
        let off = off.min((blocks - 1) * BS as u64);
        let expected = pattern::make(BS, off, i);
        client
            .write(off, &expected)
            .map_err(|e| request_error("verify write", e))?;
        client
            .flush()
            .map_err(|e| request_error("verify flush", e))?;
        let data = client
            .read(off, BS)
            .map_err(|e| request_error("verify read", e))?;
        if data != expected {
            return Err(format!(
                "the backend returned different data at offset {off} than was written there"
            ));
        }
    }
    Ok(())
}

/// Runs `w` on every queue of `client` at once: `warmup` unmeasured, then `measure`
/// measured. With `one_pass`, each queue instead writes its stripe exactly once (the
/// prefill).
pub fn run(
    client: &mut BlkioClient,
    w: &Workload,
    warmup: Duration,
    measure: Duration,
    one_pass: bool,
) -> Result<RunStats, String> {
    let capacity = capacity(client)?;
    let nq = client.num_queues();
    let bs = w.block_size as u64;
    let stripe = (capacity / nq as u64) / bs * bs;
    if stripe == 0 {
        return Err(format!(
            "the disk ({capacity} bytes) is too small for {}",
            w.name
        ));
    }
    let barrier = Barrier::new(nq);
    let results: Vec<Result<RunStats, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = client
            .split()
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                let barrier = &barrier;
                let job = Job {
                    w: *w,
                    stripe_start: i as u64 * stripe,
                    stripe_len: stripe,
                    capacity,
                    seed: 0x2545_f491_4f6c_dd1d ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9),
                    one_pass,
                };
                s.spawn(move || {
                    barrier.wait();
                    job.drive(&mut q, warmup, measure)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".to_owned()))
            })
            .collect()
    });
    let mut total = RunStats::default();
    for r in results {
        let r = r?;
        total.ops += r.ops;
        total.bytes += r.bytes;
        total.total_bytes += r.total_bytes;
        total.window = total.window.max(r.window);
        total.latencies_ns.extend(r.latencies_ns);
    }
    total.latencies_ns.sort_unstable();
    Ok(total)
}

/// One queue's share of a run.
struct Job {
    w: Workload,
    stripe_start: u64,
    stripe_len: u64,
    capacity: u64,
    seed: u64,
    one_pass: bool,
}

impl Job {
    fn drive(
        &self,
        q: &mut QueueHandle<'_>,
        warmup: Duration,
        measure: Duration,
    ) -> Result<RunStats, String> {
        let w = &self.w;
        let bs = w.block_size as u64;
        let blocks = self.capacity / bs;
        let mut rng = self.seed;
        let mut seq = 0u64;
        let mut next_offset = || -> Option<u64> {
            match w.pattern {
                Pattern::Sequential => {
                    if self.one_pass && seq >= self.stripe_len {
                        return None;
                    }
                    let off = self.stripe_start + seq % self.stripe_len;
                    seq += bs;
                    Some(off)
                }
                Pattern::Random => {
                    rng = xorshift(rng);
                    Some((rng % blocks) * bs)
                }
            }
        };
        // Request `slot` uses the `slot`-th block of the queue's buffer.
        let submit = |q: &mut QueueHandle<'_>, slot: usize, off: u64| match w.op {
            Op::Read => q.submit_read(off, slot * w.block_size, w.block_size, slot),
            Op::Write => q.submit_write(off, slot * w.block_size, w.block_size, slot),
        };

        let start = Instant::now();
        let window_start = start + warmup;
        let end = window_start + measure;
        let mut started = vec![start; w.queue_depth];
        let mut inflight = 0usize;
        for (slot, t) in started.iter_mut().enumerate() {
            if let Some(off) = next_offset() {
                *t = Instant::now();
                submit(q, slot, off);
                inflight += 1;
            }
        }
        let mut stats = RunStats::default();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..w.queue_depth).map(|_| MaybeUninit::uninit()).collect();
        while inflight > 0 {
            let done = q
                .wait_for_completions(&mut completions)
                .map_err(|e| request_error(w.name, e))?;
            let now = Instant::now();
            for c in done {
                completion_result(c).map_err(|e| request_error(w.name, e))?;
                inflight -= 1;
                let slot = c.user_data;
                stats.total_bytes += bs;
                if now >= window_start && now < end {
                    stats.ops += 1;
                    stats.bytes += bs;
                    let lat = now.duration_since(started[slot]);
                    stats.latencies_ns.push(lat.as_nanos() as u64);
                }
                let keep_going = if self.one_pass { true } else { now < end };
                if keep_going {
                    if let Some(off) = next_offset() {
                        started[slot] = Instant::now();
                        submit(q, slot, off);
                        inflight += 1;
                    }
                }
            }
        }
        stats.window = if self.one_pass {
            start.elapsed()
        } else {
            measure
        };
        if self.one_pass {
            stats.ops = stats.total_bytes / bs;
            stats.bytes = stats.total_bytes;
        }
        Ok(stats)
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Connects, retrying for a few seconds: the socket file appears at bind(), a moment
/// before the backend listens. Fills the buffer so that writes carry no zeros.
pub fn connect(
    socket: &std::path::Path,
    queues: usize,
) -> Result<integration::client::BlkioClient, String> {
    connect_with(socket, queues, DataKind::Random)
}

/// [`connect`], with the buffer (what every write carries) filled with `data`.
pub fn connect_with(
    socket: &std::path::Path,
    queues: usize,
    data: DataKind,
) -> Result<integration::client::BlkioClient, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let buffer = crate::compare::workload::max_queue_buffer() * queues;
    loop {
        match integration::client::BlkioClient::connect(socket, queues, false, buffer) {
            Ok(mut c) => {
                fill_buffer_with(&mut c, data);
                return Ok(c);
            }
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.errno() == blkio::Errno::CONNREFUSED =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(format!(
                    "libblkio connect failed: {}",
                    integration::client::describe(&e)
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_sorted_latencies() {
        let st = RunStats {
            latencies_ns: (1..=100).map(|i| i * 1000).collect(),
            ..RunStats::default()
        };
        assert_eq!(st.percentile(50.0), Some(Duration::from_micros(51)));
        assert_eq!(st.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(st.percentile(100.0), Some(Duration::from_micros(100)));
        assert_eq!(st.percentile(99.9), Some(Duration::from_micros(100)));
        assert_eq!(st.max(), Some(Duration::from_micros(100)));
        assert_eq!(RunStats::default().percentile(50.0), None);
        assert_eq!(RunStats::default().max(), None);
    }

    #[test]
    fn text_is_text_and_compresses_about_threefold() {
        // As much as compare's buffer holds with two queues (8 MiB each).
        let mut buf = vec![0u8; 16 << 20];
        fill_data(&mut buf, DataKind::Text);
        assert!(buf.iter().all(|&b| b == b'\n' || (0x20..0x7f).contains(&b)));
        assert!(buf.chunks(4096).all(|b| b.iter().any(|&x| x != 0)));
        let mut again = vec![0u8; 16 << 20];
        fill_data(&mut again, DataKind::Text);
        assert_eq!(buf, again, "the same bytes in every run");
        // What qvol's unit codec makes of it: every 16 KiB unit in 2 blocks (zstd between
        // 2x and 4x), and zstd's own ratio about 3x.
        let mut blocks = 0u64;
        let mut frame = 0u64;
        for unit in buf.chunks(16384) {
            let packed = qvol_core::unit::pack(unit, 3).unwrap().unwrap();
            blocks += u64::from(packed.k);
            frame += u64::from(u32::from_le_bytes(packed.bytes[..4].try_into().unwrap()));
        }
        let units = (buf.len() / 16384) as u64;
        let zstd = buf.len() as f64 / frame as f64;
        eprintln!("text: {blocks} blocks for {units} units, zstd {zstd:.2}x");
        assert_eq!(blocks, 2 * units);
        assert!((2.3..3.8).contains(&zstd), "zstd ratio {zstd:.2}");
    }

    #[test]
    fn pseudo_random_fill_is_not_constant() {
        let mut buf = [0u8; 4096];
        fill_pseudo_random(&mut buf, 1);
        assert!(buf.iter().filter(|&&b| b == 0).count() < 100);
        assert_ne!(buf[..8], buf[8..16]);
    }
}
