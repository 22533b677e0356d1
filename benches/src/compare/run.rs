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

/// Fills the whole I/O buffer with incompressible data, so that writes carry no zeros.
pub fn fill_buffer(client: &mut BlkioClient) {
    fill_pseudo_random(client.buffer(), 0x9e37_79b9_7f4a_7c15);
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
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let buffer = crate::compare::workload::max_queue_buffer() * queues;
    loop {
        match integration::client::BlkioClient::connect(socket, queues, false, buffer) {
            Ok(mut c) => {
                fill_buffer(&mut c);
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
    fn pseudo_random_fill_is_not_constant() {
        let mut buf = [0u8; 4096];
        fill_pseudo_random(&mut buf, 1);
        assert!(buf.iter().filter(|&&b| b == 0).count() < 100);
        assert_ne!(buf[..8], buf[8..16]);
    }
}
