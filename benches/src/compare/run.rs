//! The libblkio client: one thread per virtqueue, each keeping `queue_depth` requests in
//! flight for a fixed time.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::workload::{Op, Pattern, Workload};

/// How long one `do_io` may wait before the backend is called hung.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected libblkio `virtio-blk-vhost-user` instance with one I/O buffer per queue.
pub struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    per_queue: usize,
    capacity: u64,
    // Dropped last: the queues and the region belong to it.
    _blkio: Blkio,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("libblkio {what} failed: {} ({:?})", e.message(), e.errno())
}

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
    /// Completion latencies inside the window, in nanoseconds, sorted.
    pub latencies_ns: Vec<u64>,
}

impl RunStats {
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

impl Client {
    /// Connects to the vhost-user-blk socket with `num_queues` queues.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        per_queue_buffer: usize,
    ) -> Result<Self, String> {
        let mut b =
            Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("creating the driver"))?;
        b.set_str("path", &socket.to_string_lossy())
            .map_err(blkio_err("setting path"))?;
        b.connect().map_err(blkio_err("connect"))?;
        let nq = i32::try_from(num_queues).map_err(|_| "too many queues".to_owned())?;
        b.set_i32("num-queues", nq)
            .map_err(blkio_err("setting num-queues"))?;
        let outcome = b.start().map_err(blkio_err("start"))?;
        if outcome.queues.len() != num_queues {
            return Err(format!(
                "asked for {num_queues} queues, the backend gave {}",
                outcome.queues.len()
            ));
        }
        let capacity = b
            .get_u64("capacity")
            .map_err(blkio_err("reading capacity"))?;
        let align = usize::try_from(
            b.get_u64("mem-region-alignment")
                .map_err(blkio_err("reading mem-region-alignment"))?,
        )
        .unwrap_or(4096)
        .max(4096);
        let per_queue = per_queue_buffer.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(per_queue * num_queues)
            .map_err(blkio_err("allocating the I/O buffer"))?;
        b.map_mem_region(&region)
            .map_err(blkio_err("mapping the I/O buffer"))?;
        // SAFETY: the region was just allocated read-write for `len` bytes and stays mapped
        // while `b` lives; no request is in flight yet, so nothing else touches it. The
        // slice does not outlive this block.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        fill_pseudo_random(buf, 0x9e37_79b9_7f4a_7c15);
        Ok(Client {
            queues: outcome.queues,
            region,
            per_queue,
            capacity,
            _blkio: b,
        })
    }

    /// Checks that the backend really stores data: writes 16 distinct 4 KiB blocks at
    /// spread-out offsets on queue 0, flushes, reads them back and compares. Run before
    /// measuring, so that a backend that completes requests without doing them cannot look
    /// fast.
    pub fn verify(&mut self) -> Result<(), String> {
        const BS: usize = 4096;
        const N: usize = 16;
        if self.per_queue < 2 * BS {
            return Err("the I/O buffer is too small to verify".to_owned());
        }
        let blocks = self.capacity / BS as u64;
        let q = &mut self.queues[0];
        let base = self.region.addr;
        let (wbuf, rbuf) = (base, base + BS);
        for i in 0..N as u64 {
            let off = (xorshift(0xfeed ^ (i + 1)) % blocks) / N as u64 * N as u64 * BS as u64
                + i * BS as u64;
            let off = off.min((blocks - 1) * BS as u64);
            let expected: Vec<u8> = (0..BS)
                .map(|j| (j as u64 ^ (i * 131) ^ (off >> 12)) as u8)
                .collect();
            {
                // SAFETY: [wbuf, wbuf + BS) lies inside the mapped region (per_queue >= 2 BS)
                // and no request is in flight while this slice lives.
                let w = unsafe { std::slice::from_raw_parts_mut(wbuf as *mut u8, BS) };
                w.copy_from_slice(&expected);
            }
            q.write(off, wbuf as *const u8, BS, 0, ReqFlags::empty());
            wait_one(q, "verify write")?;
            q.flush(0, ReqFlags::empty());
            wait_one(q, "verify flush")?;
            q.read(off, rbuf as *mut u8, BS, 0, ReqFlags::empty());
            wait_one(q, "verify read")?;
            // SAFETY: [rbuf, rbuf + BS) lies inside the mapped region and the read that
            // filled it has completed.
            let r = unsafe { std::slice::from_raw_parts(rbuf as *const u8, BS) };
            if r != &expected[..] {
                return Err(format!(
                    "the backend returned different data at offset {off} than was written there"
                ));
            }
        }
        Ok(())
    }

    /// The disk size the backend reports.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Runs `w` on every queue at once: `warmup` unmeasured, then `measure` measured.
    /// With `one_pass`, each queue instead writes its stripe exactly once (the prefill).
    pub fn run(
        &mut self,
        w: &Workload,
        warmup: Duration,
        measure: Duration,
        one_pass: bool,
    ) -> Result<RunStats, String> {
        let nq = self.queues.len();
        let bs = w.block_size as u64;
        let stripe = (self.capacity / nq as u64) / bs * bs;
        if stripe == 0 {
            return Err(format!(
                "the disk ({} bytes) is too small for {}",
                self.capacity, w.name
            ));
        }
        let barrier = Barrier::new(nq);
        let base = self.region.addr;
        let per_queue = self.per_queue;
        let capacity = self.capacity;
        let results: Vec<Result<RunStats, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .map(|(i, q)| {
                    let barrier = &barrier;
                    let job = Job {
                        w: *w,
                        buf: base + i * per_queue,
                        stripe_start: i as u64 * stripe,
                        stripe_len: stripe,
                        capacity,
                        seed: 0x2545_f491_4f6c_dd1d ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9),
                        one_pass,
                    };
                    s.spawn(move || {
                        barrier.wait();
                        job.drive(q, warmup, measure)
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
}

/// Waits for the one request in flight on `q` and checks that it succeeded.
fn wait_one(q: &mut Blkioq, what: &str) -> Result<(), String> {
    let mut completions = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = IO_TIMEOUT;
    let n = q
        .do_io(&mut completions, 1, Some(&mut timeout), None)
        .map_err(blkio_err("do_io"))?;
    if n != 1 {
        return Err(format!(
            "{what}: no completion within {IO_TIMEOUT:?}; the backend hangs"
        ));
    }
    // SAFETY: do_io initialised the first `n` (= 1) entries.
    let c = unsafe { completions[0].assume_init_ref() };
    if c.ret != 0 {
        return Err(format!(
            "{what} failed: {}",
            std::io::Error::from_raw_os_error(-c.ret)
        ));
    }
    Ok(())
}

/// One queue's share of a run.
struct Job {
    w: Workload,
    buf: usize,
    stripe_start: u64,
    stripe_len: u64,
    capacity: u64,
    seed: u64,
    one_pass: bool,
}

impl Job {
    fn drive(
        &self,
        q: &mut Blkioq,
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
        let submit = |q: &mut Blkioq, slot: usize, off: u64| {
            let addr = self.buf + slot * w.block_size;
            match w.op {
                Op::Read => q.read(off, addr as *mut u8, w.block_size, slot, ReqFlags::empty()),
                Op::Write => q.write(
                    off,
                    addr as *const u8,
                    w.block_size,
                    slot,
                    ReqFlags::empty(),
                ),
            }
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
            let mut timeout = IO_TIMEOUT;
            let n = q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(blkio_err("do_io"))?;
            if n == 0 {
                return Err(format!(
                    "{}: no completion within {IO_TIMEOUT:?}; the backend hangs",
                    w.name
                ));
            }
            let now = Instant::now();
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` entries of `completions`.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    return Err(format!(
                        "{}: a request failed with {}",
                        w.name,
                        std::io::Error::from_raw_os_error(-c.ret)
                    ));
                }
                inflight -= 1;
                let slot = c.user_data;
                stats.total_bytes += bs;
                if now >= window_start && now < end {
                    stats.ops += 1;
                    stats.bytes += bs;
                    let lat = now.duration_since(started[slot]);
                    if w.queue_depth == 1 {
                        stats.latencies_ns.push(lat.as_nanos() as u64);
                    }
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

fn fill_pseudo_random(buf: &mut [u8], seed: u64) {
    let mut x = seed;
    for chunk in buf.chunks_mut(8) {
        x = xorshift(x);
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
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
        assert_eq!(RunStats::default().percentile(50.0), None);
    }

    #[test]
    fn pseudo_random_fill_is_not_constant() {
        let mut buf = [0u8; 4096];
        fill_pseudo_random(&mut buf, 1);
        assert!(buf.iter().filter(|&&b| b == 0).count() < 100);
        assert_ne!(buf[..8], buf[8..16]);
    }
}
