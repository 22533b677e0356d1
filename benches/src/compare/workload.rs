//! The workloads every backend runs, in order.

use serde::Serialize;

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Guest reads.
    Read,
    /// Guest writes.
    Write,
}

/// Where the requests go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Each queue walks its own stripe of the disk in order, wrapping around.
    Sequential,
    /// Uniformly random block-aligned offsets over the whole disk.
    Random,
}

/// What is reported for a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Bytes per second.
    Bandwidth,
    /// Requests per second.
    Iops,
    /// Completion latency percentiles.
    Latency,
}

/// One workload: a request size, a queue depth per queue, a pattern and a direction.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Workload {
    /// Short name used in tables and JSON, e.g. `seq-write-1M-qd8`.
    pub name: &'static str,
    /// Read or write.
    pub op: Op,
    /// Sequential or random.
    pub pattern: Pattern,
    /// Request size in bytes.
    pub block_size: usize,
    /// Requests kept in flight on each queue.
    pub queue_depth: usize,
    /// The figure that matters.
    pub metric: Metric,
}

const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;

/// The workloads of issue 6, in the order they run (writes first so reads find data).
pub const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "seq-write-1M-qd8",
        op: Op::Write,
        pattern: Pattern::Sequential,
        block_size: MIB,
        queue_depth: 8,
        metric: Metric::Bandwidth,
    },
    Workload {
        name: "seq-read-1M-qd8",
        op: Op::Read,
        pattern: Pattern::Sequential,
        block_size: MIB,
        queue_depth: 8,
        metric: Metric::Bandwidth,
    },
    Workload {
        name: "rand-write-4K-qd32",
        op: Op::Write,
        pattern: Pattern::Random,
        block_size: 4 * KIB,
        queue_depth: 32,
        metric: Metric::Iops,
    },
    Workload {
        name: "rand-read-4K-qd32",
        op: Op::Read,
        pattern: Pattern::Random,
        block_size: 4 * KIB,
        queue_depth: 32,
        metric: Metric::Iops,
    },
    Workload {
        name: "lat-read-4K-qd1",
        op: Op::Read,
        pattern: Pattern::Random,
        block_size: 4 * KIB,
        queue_depth: 1,
        metric: Metric::Latency,
    },
    Workload {
        name: "lat-write-4K-qd1",
        op: Op::Write,
        pattern: Pattern::Random,
        block_size: 4 * KIB,
        queue_depth: 1,
        metric: Metric::Latency,
    },
];

/// The sustained write (issue 15): sequential 1 MiB writes at QD8 for a minute or more, long
/// enough for many log-full commits, so that a stall behind a commit shows in the tail
/// latency and the average meets the disk's own sync bandwidth. Not part of [`WORKLOADS`]:
/// `--sustained` (or naming it in `--workloads`) runs it, for `--sustained-seconds`.
pub const SUSTAINED: Workload = Workload {
    name: "sustained-write-1M-qd8",
    op: Op::Write,
    pattern: Pattern::Sequential,
    block_size: MIB,
    queue_depth: 8,
    metric: Metric::Bandwidth,
};

/// The one-pass sequential write that fills the disk before anything is measured, so that
/// reads decrypt real data instead of finding holes.
pub const PREFILL: Workload = Workload {
    name: "prefill",
    op: Op::Write,
    pattern: Pattern::Sequential,
    block_size: MIB,
    queue_depth: 8,
    metric: Metric::Bandwidth,
};

/// The largest buffer one queue needs over all workloads.
pub fn max_queue_buffer() -> usize {
    WORKLOADS
        .iter()
        .chain([&PREFILL, &SUSTAINED])
        .map(|w| w.block_size * w.queue_depth)
        .max()
        .unwrap_or(MIB)
}
