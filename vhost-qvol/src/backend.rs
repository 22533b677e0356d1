//! The vhost-user-blk device: `VhostUserBackend` (the `&self` variant) over a [`Disk`].
//!
//! A [`Device`] lives as long as the process and holds what must outlive a frontend
//! connection: the disk, the write-cache mode, and one [`QueueWorker`] per queue. A
//! [`BlkBackend`] is made per connection (see `serve.rs`). Each queue is served by its own
//! worker thread (`queues_per_thread`), and on the I/O path a thread takes only its own
//! queue's lock, never one shared by all queues.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk_config::{BlkConfig, WRITEBACK_OFFSET};
use crate::disk::{Disk, DiskError};
use crate::poll::AdaptivePoll;
use crate::pool::Pool;
use crate::request::{self, DeviceSettings, QueueWorker};

/// Largest queue the frontend may configure (libblkio needs at least 256).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// The queue size `seg_max` is computed for (QEMU's and libblkio's default is 256 or less).
const SEG_MAX_QUEUE_SIZE: u16 = 256;
/// Most queues one device serves (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// The GET_ID string: at most 20 bytes, NUL padded (virtio 1.2, 5.2.6).
pub type Serial = [u8; VIRTIO_BLK_ID_BYTES as usize];

/// What stays across frontend connections.
pub struct Device {
    disk: Arc<dyn Disk>,
    read_only: bool,
    serial: Serial,
    writeback: AtomicBool,
    workers: Vec<Mutex<QueueWorker>>,
    /// The backend request channel of the connected frontend (protocol feature
    /// BACKEND_REQ), to tell it the config space changed.
    frontend: Mutex<Option<vhost::vhost_user::Backend>>,
    /// The most a queue's thread polls its ring after serving it, in nanoseconds (0: off).
    poll_ns: AtomicU64,
    /// Each queue's polling window, below that maximum.
    polls: Vec<AdaptivePoll>,
    /// How many requests of one queue may be served at once (1: one after the other).
    parallel: AtomicUsize,
    /// Requests of fewer bytes (descriptors' lengths) are served on the queue's thread.
    parallel_min: AtomicU64,
    /// Reads handed out together to one request thread, up to this many bytes (0: each on
    /// its own).
    read_batch: AtomicU64,
    /// Each queue's request threads, started on its first use when `parallel` > 1.
    pools: Vec<OnceLock<Pool>>,
    /// Set while `quiesce` waits or its guards live: queues take no new request (one with
    /// requests in flight on its request threads finishes them and lets go of its worker).
    quiescing: AtomicBool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("size", &self.disk.size())
            .field("read_only", &self.read_only)
            .field("queues", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device serving `disk` over `num_queues` queues (clamped to 1..=[`MAX_QUEUES`]).
    pub fn new(disk: Arc<dyn Disk>, read_only: bool, serial: Serial, num_queues: u16) -> Self {
        let n = num_queues.clamp(1, MAX_QUEUES);
        Self {
            disk,
            read_only,
            serial,
            writeback: AtomicBool::new(true),
            workers: (0..usize::from(n))
                .map(|q| Mutex::new(QueueWorker::new(q)))
                .collect(),
            frontend: Mutex::new(None),
            poll_ns: AtomicU64::new(0),
            polls: (0..usize::from(n))
                .map(|_| AdaptivePoll::default())
                .collect(),
            parallel: AtomicUsize::new(1),
            parallel_min: AtomicU64::new(0),
            read_batch: AtomicU64::new(0),
            pools: (0..usize::from(n)).map(|_| OnceLock::new()).collect(),
            quiescing: AtomicBool::new(false),
        }
    }

    /// Serves up to `n` available requests of a queue at once on request threads of the
    /// queue's own (`pool.rs`), completing each as it finishes; requests whose descriptors
    /// carry fewer than `min_len` bytes, and a request that is alone, are served on the
    /// queue's thread (a hand-over costs a thread wake-up). Where each storage call waits on
    /// a network round trip (an RBD image; `min_len` 0), a queue would otherwise never have
    /// more than one request in flight however deep the guest's queue is; on a file, large
    /// requests are sealed and opened on more than one core. 1 (the default) serves one
    /// request after the other on the queue's thread.
    pub fn set_parallel(&self, n: usize, min_len: u64) {
        self.parallel.store(n.max(1), Ordering::Relaxed);
        self.parallel_min.store(min_len, Ordering::Relaxed);
    }

    /// With [`Device::set_parallel`], hands the reads available together to one request
    /// thread, up to `bytes` of them a thread, which puts them in flight at once
    /// ([`Disk::read_many`]): where each read is a network round trip, one thread's wake-up
    /// each way serves many reads instead of one. 0 (the default): each read on its own.
    pub fn set_read_batch(&self, bytes: u64) {
        self.read_batch.store(bytes, Ordering::Relaxed);
    }

    /// After serving a queue, its thread watches the ring for up to `poll` before sleeping
    /// again (as QEMU's iothread `poll-max-ns`; the window adapts below it, `poll.rs`): a
    /// request that arrives meanwhile is served without the wake-up of a sleeping thread,
    /// for a core kept busy. Zero: off.
    pub fn set_poll(&self, poll: Duration) {
        let ns = u64::try_from(poll.as_nanos()).unwrap_or(u64::MAX);
        self.poll_ns.store(ns, Ordering::Relaxed);
    }

    /// Tells the connected frontend that the config space changed (the disk was resized):
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after which QEMU re-reads the config and
    /// raises the guest's config interrupt. `Ok(false)` when no frontend gave a channel.
    pub fn config_changed(&self) -> Result<bool, String> {
        use vhost::vhost_user::VhostUserFrontendReqHandler;
        let frontend = self.frontend.lock().unwrap_or_else(PoisonError::into_inner);
        match frontend.as_ref() {
            None => Ok(false),
            Some(backend) => backend
                .handle_config_change()
                .map(|_| true)
                .map_err(|e| format!("the frontend did not take the config change: {e}")),
        }
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> usize {
        self.workers.len()
    }

    /// The disk being served.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }

    /// The config space as it stands now.
    pub fn config(&self) -> BlkConfig {
        let mut cfg = BlkConfig::new(
            self.disk.size(),
            self.workers.len() as u16,
            SEG_MAX_QUEUE_SIZE,
        );
        cfg.writeback = u8::from(self.writeback.load(Ordering::Relaxed));
        cfg
    }

    /// Waits until no queue is in the middle of a request, then keeps every queue from
    /// starting another for as long as the returned guards live. Used at shutdown:
    /// requests in flight finish (and are completed to the guest), nothing new starts.
    pub fn quiesce(&self) -> Quiesced<'_> {
        // First, so that a queue with requests in flight (which holds its worker until none
        // is) stops taking new ones: a guest that keeps its queue busy would otherwise keep
        // it from ever letting go.
        self.quiescing.store(true, Ordering::SeqCst);
        Quiesced {
            device: self,
            _workers: self.workers.iter().map(lock).collect(),
        }
    }

    fn quiescing(&self) -> bool {
        self.quiescing.load(Ordering::SeqCst)
    }

    /// What every request of this device is served with.
    fn settings(&self) -> DeviceSettings<'_> {
        DeviceSettings {
            read_only: self.read_only,
            writeback: self.writeback.load(Ordering::Relaxed),
            serial: &self.serial,
        }
    }

    /// Commits and syncs what was written.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.disk.flush()
    }
}

/// What [`Device::quiesce`] returns: no queue starts a request while it lives.
#[must_use]
pub struct Quiesced<'a> {
    device: &'a Device,
    _workers: Vec<MutexGuard<'a, QueueWorker>>,
}

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiesced").finish_non_exhaustive()
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        self.device.quiescing.store(false, Ordering::SeqCst);
    }
}

fn lock(worker: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    // A worker only panics on a bug; its state (a bounce buffer) stays usable.
    worker.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `VhostUserBackend` for one frontend connection.
pub struct BlkBackend {
    device: Arc<Device>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: AtomicBool,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl BlkBackend {
    /// A backend for `device`, reading guest memory through `mem` (the same
    /// `GuestMemoryAtomic` handed to `VhostUserDaemon::new`, so memory-table updates from
    /// the frontend are seen here).
    pub fn new(device: Arc<Device>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        Self {
            device,
            mem,
            event_idx: AtomicBool::new(false),
        }
    }

    /// Serves every available request of queue `queue`, completing them in order (or,
    /// with `set_parallel`, as they finish).
    fn process_queue(&self, queue: usize, vring: &VringRwLock) -> Result<(), String> {
        let Some(worker) = self.device.workers.get(queue) else {
            return Err(format!("no worker for queue {queue}"));
        };
        let parallel = self.device.parallel.load(Ordering::Relaxed);
        if parallel > 1 {
            return self.process_queue_parallel(queue, vring, worker, parallel);
        }
        let settings = self.device.settings();
        loop {
            if self.device.quiescing() {
                // Wait behind it rather than take a request it would not see finish.
                drop(lock(worker));
            }
            let mem = self.mem.memory();
            let (mut chains, stale) = self.pop_chains(vring, &mem, 1);
            let Some(chain) = chains.pop() else {
                if stale {
                    continue;
                }
                break;
            };
            // Held from the disk operation until the guest is told: see Device::quiesce.
            let mut worker = lock(worker);
            let head = chain.head_index();
            let len = worker.process(self.device.disk.as_ref(), settings, &mem, chain);
            self.complete(vring, &[(head, len)])?;
            drop(worker);
        }
        Ok(())
    }

    /// Serves queue `queue` on its request threads, up to `parallel` requests in flight,
    /// each completed as soon as it is served; returns once none is left in flight and the
    /// ring is empty.
    fn process_queue_parallel(
        &self,
        queue: usize,
        vring: &VringRwLock,
        worker: &Mutex<QueueWorker>,
        parallel: usize,
    ) -> Result<(), String> {
        let pool = match self.device.pools.get(queue).map(|p| p.get()) {
            Some(Some(pool)) => pool,
            Some(None) => {
                let pool = Pool::start(queue, parallel).map_err(|e| {
                    format!("cannot start the request threads of queue {queue}: {e}")
                })?;
                self.device.pools[queue].get_or_init(|| pool)
            }
            None => return Err(format!("no request threads for queue {queue}")),
        };
        let (done_tx, done_rx) = channel();
        // Held while requests are in flight (see Device::quiesce); serves those that are
        // not worth a hand-over to another thread (a wake-up).
        let mut own = lock(worker);
        let mut in_flight = 0usize;
        let served = self.serve_parallel(
            vring,
            pool,
            &mut own,
            parallel,
            &mut in_flight,
            &done_tx,
            &done_rx,
        );
        if served.is_err() {
            // Requests handed out still finish, and are completed if the ring lets us,
            // before the worker is let go (Device::quiesce relies on it).
            for _ in 0..in_flight {
                if let Ok(done) = done_rx.recv() {
                    let _ = self.complete(vring, &[done]);
                }
            }
        }
        served
    }

    /// The loop of [`Self::process_queue_parallel`]; `in_flight`: requests handed out and
    /// not completed yet (left at 0 unless it fails).
    #[allow(clippy::too_many_arguments)]
    fn serve_parallel(
        &self,
        vring: &VringRwLock,
        pool: &Pool,
        own: &mut QueueWorker,
        parallel: usize,
        in_flight: &mut usize,
        done_tx: &std::sync::mpsc::Sender<(u16, u32)>,
        done_rx: &std::sync::mpsc::Receiver<(u16, u32)>,
    ) -> Result<(), String> {
        let min_len = self.device.parallel_min.load(Ordering::Relaxed);
        loop {
            let max = if self.device.quiescing() {
                0
            } else {
                parallel - *in_flight
            };
            let mem = self.mem.memory();
            let (chains, stale) = self.pop_chains(vring, &mem, max);
            let alone = *in_flight == 0 && chains.len() == 1;
            let batch_max = self.device.read_batch.load(Ordering::Relaxed);
            let mut done = Vec::new();
            let (mut batch, mut batch_bytes) = (Vec::new(), 0u64);
            for chain in chains {
                let bytes = chain.clone().map(|d| u64::from(d.len())).sum::<u64>();
                if alone || bytes < min_len {
                    let settings = self.device.settings();
                    let head = chain.head_index();
                    done.push((
                        head,
                        own.process(self.device.disk.as_ref(), settings, &mem, chain),
                    ));
                } else if batch_max > 0 && request::is_read(&mem, &chain) {
                    batch.push(chain);
                    batch_bytes += bytes;
                    if batch_bytes >= batch_max {
                        *in_flight +=
                            self.hand_out(pool, std::mem::take(&mut batch), &mem, done_tx)?;
                        batch_bytes = 0;
                    }
                } else {
                    *in_flight += self.hand_out(pool, vec![chain], &mem, done_tx)?;
                }
            }
            if !batch.is_empty() {
                *in_flight += self.hand_out(pool, batch, &mem, done_tx)?;
            }
            if done.is_empty() {
                if *in_flight == 0 {
                    if stale {
                        continue;
                    }
                    return Ok(());
                }
                if stale {
                    continue;
                }
                done.push(
                    done_rx
                        .recv()
                        .map_err(|_| "the queue's request threads are gone".to_owned())?,
                );
                *in_flight -= 1;
            }
            let finished: Vec<_> = done_rx.try_iter().collect();
            *in_flight -= finished.len();
            done.extend(finished);
            self.complete(vring, &done)?;
        }
    }

    /// Hands the requests of `chains` to one request thread; returns how many.
    fn hand_out(
        &self,
        pool: &Pool,
        chains: Vec<DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>>,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
        done_tx: &std::sync::mpsc::Sender<(u16, u32)>,
    ) -> Result<usize, String> {
        let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
        let n = heads.len();
        let device = Arc::clone(&self.device);
        let mem = mem.clone();
        let job = Box::new(move |w: &mut QueueWorker| {
            w.process_many(device.disk.as_ref(), device.settings(), &mem, chains)
        });
        pool.submit(heads, job, done_tx)?;
        Ok(n)
    }

    /// Adds `done` (chain heads and bytes written) to the used ring and signals the guest
    /// if it asked to be.
    fn complete(&self, vring: &VringRwLock, done: &[(u16, u32)]) -> Result<(), String> {
        for &(head, len) in done {
            vring
                .add_used(head, len)
                .map_err(|e| format!("cannot complete request {head}: {e}"))?;
        }
        if vring
            .needs_notification()
            .map_err(|e| format!("cannot read the used event index: {e}"))?
        {
            vring
                .signal_used_queue()
                .map_err(|e| format!("cannot notify the frontend: {e}"))?;
        }
        Ok(())
    }

    /// Pops up to `max` available requests, all against `mem`, the guest memory as it is
    /// now: the frontend may add regions while the queue runs (libblkio maps its I/O
    /// buffers after starting the device), and it makes a request that uses one available
    /// only after the region was added. A view loaded before the pop can predate the region
    /// (this loop may have started before it, e.g. on a spurious kick): such a chain reads
    /// as invalid and is dropped with no status written, which a driver whose status byte
    /// was 0 takes for success. So the view must be at least as new as the requests: if the
    /// memory changed around a pop, that chain is put back for the next round, with the new
    /// view (`true`: the view went stale).
    fn pop_chains(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
        max: usize,
    ) -> (
        Vec<DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>>,
        bool,
    ) {
        let mut chains = Vec::new();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        while chains.len() < max {
            let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
                break;
            };
            if !std::ptr::eq(&**mem, &*self.mem.memory()) {
                queue.go_to_previous_position();
                return (chains, true);
            }
            chains.push(chain);
        }
        (chains, false)
    }

    /// Whether the guest has made requests available that are not served yet.
    fn has_requests(&self, vring: &VringRwLock) -> bool {
        let mem = self.mem.memory();
        let state = vring.get_ref();
        let queue = state.get_queue();
        queue
            .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|avail| {
                // More than a ring's worth ahead is no request but a broken ring (popping
                // finds nothing): polling must not spin on it.
                let pending = avail.0.wrapping_sub(queue.next_avail());
                pending != 0 && pending <= queue.size()
            })
    }

    /// Serves the queue, then, with polling on, keeps serving what arrives until the ring
    /// stays empty for the polling time.
    fn serve_and_poll(&self, queue: usize, vring: &VringRwLock) -> Result<(), String> {
        let max_ns = self.device.poll_ns.load(Ordering::Relaxed);
        let adaptive = self.device.polls.get(queue).filter(|_| max_ns > 0);
        if let Some(p) = adaptive {
            p.woke(max_ns);
        }
        self.process_queue(queue, vring)?;
        let Some(p) = adaptive else {
            return Ok(());
        };
        let poll = p.window();
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < poll {
            if self.has_requests(vring) {
                self.process_queue(queue, vring)?;
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
        p.sleeping();
        Ok(())
    }

    fn serve_kick(&self, queue: usize, vring: &VringRwLock) -> Result<(), String> {
        if !self.event_idx.load(Ordering::Relaxed) {
            return self.serve_and_poll(queue, vring);
        }
        // With VIRTIO_F_EVENT_IDX a kick may cover many requests, and requests added while
        // notifications were off would not kick us: loop until re-enabling notifications
        // finds the ring empty (virtio 1.2, 2.7.10).
        loop {
            vring
                .disable_notification()
                .map_err(|e| format!("cannot disable notifications: {e}"))?;
            self.serve_and_poll(queue, vring)?;
            if !vring
                .enable_notification()
                .map_err(|e| format!("cannot enable notifications: {e}"))?
            {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let mut blk = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | (1 << bit));
        if self.device.read_only {
            blk |= 1 << VIRTIO_BLK_F_RO;
        }
        blk | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!("frontend acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        debug!("the frontend opened the backend request channel");
        *self
            .device
            .frontend
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(backend);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable (VIRTIO_BLK_F_CONFIG_WCE, virtio 1.2 5.2.5).
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            info!(
                "guest switched the write cache to {}",
                if writeback {
                    "write-back"
                } else {
                    "write-through"
                }
            );
            self.device.writeback.store(writeback, Ordering::Relaxed);
        } else {
            warn!(
                "ignoring a write of {} bytes at config offset {offset}",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the daemon updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create an exit event, a worker thread may linger: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per thread: the thread index is the queue number, and the event is
        // the index of the vring within this thread's (single-element) list.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("queue {thread_id}: event {device_event} has no vring");
            return Ok(());
        };
        if let Err(e) = self.serve_kick(thread_id, vring) {
            // A broken ring is the guest's problem; keep the thread alive for the next kick.
            warn!("queue {thread_id}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::testing::Batches;
    use crate::disk::MemDisk;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MmapRegion};

    fn backend(read_only: bool, queues: u16) -> BlkBackend {
        let disk = Arc::new(MemDisk::new(1 << 20, read_only));
        let device = Arc::new(Device::new(disk, read_only, [0; 20], queues));
        BlkBackend::new(device, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
    }

    #[test]
    fn offers_the_issue_5_feature_set() {
        let b = backend(false, 4);
        let f = b.features();
        for bit in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_F_VERSION_1,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit} missing");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(backend(true, 1).features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = b.protocol_features();
        assert!(p.contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        ));
        assert!(b.max_queue_size() >= 256);
    }

    /// A memory disk that runs `before` at the start of every write: the frontend acting
    /// while a queue worker is inside its loop, or writes waiting for each other.
    struct BeforeWrite {
        inner: MemDisk,
        before: Box<dyn Fn() + Send + Sync>,
    }

    impl Disk for BeforeWrite {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
            (self.before)();
            self.inner.write_at(offset, data)
        }
        fn flush(&self) -> Result<(), DiskError> {
            self.inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
            self.inner.write_zeroes(offset, len, unmap)
        }
    }

    /// The three descriptors of a one-buffer write request at table index `at`.
    fn write_chain(hdr: u64, data: u64, status: u64, at: u16) -> [RawDescriptor; 3] {
        let next = VRING_DESC_F_NEXT as u16;
        [
            Descriptor::new(hdr, 16, next, at + 1).into(),
            Descriptor::new(data, 4096, next, at + 2).into(),
            Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0).into(),
        ]
    }

    fn write_header(mem: &GuestMemoryMmap, at: u64, sector: u64) {
        request_header(mem, at, VIRTIO_BLK_T_OUT, sector);
    }

    /// A request header of type `kind` at `sector`, at guest address `at`.
    fn request_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(at)).unwrap();
    }

    /// libblkio adds its I/O buffers as a memory region after the device started; a request
    /// using that region, made available while the queue's worker is already in its loop
    /// (which began with the older memory table), must be served, not dropped as an
    /// invalid chain with no status written (which libblkio, its status byte 0, took for a
    /// successful write: the data was silently lost).
    #[test]
    fn a_request_in_a_region_added_while_the_queue_runs_is_served() {
        const HDR1: u64 = 0x1_0000;
        const DATA1: u64 = 0x2_0000;
        const STATUS1: u64 = 0x3_0000;
        const HDR2: u64 = 0x1_1000;
        const STATUS2: u64 = 0x3_1000;
        const LATE: u64 = 0x10_0000;
        let first = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(first.clone());
        let mock = MockSplitQueue::new(&first, 16);
        write_header(&first, HDR1, 0);
        first
            .write_slice(&[0x11; 4096], GuestAddress(DATA1))
            .unwrap();
        first.write_slice(&[0xee], GuestAddress(STATUS1)).unwrap();
        mock.add_desc_chains(&write_chain(HDR1, DATA1, STATUS1, 0), 0)
            .unwrap();
        let (desc, avail) = (mock.desc_table_addr().0, mock.avail_addr().0);
        let vring = ready_vring(&atomic, desc, avail, mock.used_addr().0);

        // While request 1 is served: the frontend adds a region (as the vhost-user handler
        // does on ADD_MEM_REG, before its acknowledgement), then makes request 2 available.
        let frontend = atomic.clone();
        let hook = move || {
            let late = GuestRegionMmap::new(MmapRegion::new(0x1_0000).unwrap(), GuestAddress(LATE))
                .unwrap();
            let mem = frontend.memory().insert_region(Arc::new(late)).unwrap();
            frontend.lock().unwrap().replace(mem);
            let mem = frontend.memory();
            write_header(&mem, HDR2, 8);
            mem.write_slice(&[0x5a; 4096], GuestAddress(LATE)).unwrap();
            mem.write_slice(&[0xee], GuestAddress(STATUS2)).unwrap();
            for (i, d) in write_chain(HDR2, LATE, STATUS2, 3).into_iter().enumerate() {
                mem.write_obj(d, GuestAddress(desc + 16 * (3 + i as u64)))
                    .unwrap();
            }
            mem.write_obj(3u16.to_le(), GuestAddress(avail + 4 + 2))
                .unwrap();
            mem.write_obj(2u16.to_le(), GuestAddress(avail + 2))
                .unwrap();
        };
        let hook = Mutex::new(Some(hook));
        let disk = Arc::new(BeforeWrite {
            inner: MemDisk::new(1 << 20, false),
            before: Box::new(move || {
                if let Some(hook) = hook.lock().unwrap().take() {
                    hook();
                }
            }),
        });
        let device = Arc::new(Device::new(disk.clone(), false, [0; 20], 1));
        let backend = BlkBackend::new(device, atomic.clone());
        backend.process_queue(0, &vring).unwrap();

        let mem = atomic.memory();
        let status = |at| mem.read_obj::<u8>(GuestAddress(at)).unwrap();
        assert_eq!(status(STATUS1), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            status(STATUS2),
            VIRTIO_BLK_S_OK as u8,
            "request 2 was not completed with a status"
        );
        let data = disk.inner.contents();
        assert!(data[..4096].iter().all(|&b| b == 0x11));
        assert!(
            data[4096..8192].iter().all(|&b| b == 0x5a),
            "request 2's data did not reach the disk"
        );
    }

    /// Writes in flight now and the most seen at once; each write waits (up to 5 s) until
    /// `want` have been in flight together.
    #[derive(Default)]
    struct Gather {
        state: Mutex<(usize, usize)>,
        more: std::sync::Condvar,
    }

    impl Gather {
        fn write(&self, want: usize) {
            let mut state = self.state.lock().unwrap();
            state.0 += 1;
            state.1 = state.1.max(state.0);
            self.more.notify_all();
            let (mut state, _) = self
                .more
                .wait_timeout_while(state, Duration::from_secs(5), |s| s.1 < want)
                .unwrap();
            state.0 -= 1;
        }
    }

    /// A ready, enabled 16-entry queue on `atomic` with its rings at these guest addresses.
    fn ready_vring(
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> VringRwLock {
        let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(desc, avail, used).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    /// Makes `chains` (four requests of three descriptors, at table indexes 0, 3, 6 and 9)
    /// available on a fresh queue in `mem`, serves it with `device`, and checks that each
    /// request was completed once.
    fn serve_four(mem: &GuestMemoryMmap, chains: &[RawDescriptor], device: Arc<Device>) {
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(chains, 0).unwrap();
        let vring = ready_vring(
            &atomic,
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        );
        BlkBackend::new(device, atomic)
            .process_queue(0, &vring)
            .unwrap();
        let used = mock.used_addr().0;
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 4);
        let mut ids: Vec<u32> = (0..4u64)
            .map(|i| mem.read_obj::<u32>(GuestAddress(used + 4 + 8 * i)).unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 3, 6, 9], "each request completed once");
    }

    /// Serves four available 4 KiB writes with `set_parallel(4, min_len)`, each write
    /// waiting until `want` were in flight together; checks that each was completed once
    /// (in the order they finished) and landed. Returns the most in flight at once and
    /// whether any write ran on the calling thread (the queue's).
    fn serve_four_writes(min_len: u64, want: usize) -> (usize, bool) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut chains = Vec::new();
        for i in 0..4u64 {
            let (hdr, data, status) = (0x1_0000 + i * 0x100, 0x2_0000 + i * 0x1000, 0x3_0000 + i);
            write_header(&mem, hdr, i * 8);
            mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(data))
                .unwrap();
            mem.write_slice(&[0xee], GuestAddress(status)).unwrap();
            chains.extend(write_chain(hdr, data, status, 3 * i as u16));
        }
        let gather = Arc::new(Gather::default());
        let writes = Arc::clone(&gather);
        let queue_thread = std::thread::current().id();
        let on_queue_thread = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&on_queue_thread);
        let disk = Arc::new(BeforeWrite {
            inner: MemDisk::new(1 << 20, false),
            before: Box::new(move || {
                if std::thread::current().id() == queue_thread {
                    seen.store(true, Ordering::SeqCst);
                }
                writes.write(want)
            }),
        });
        let device = Arc::new(Device::new(disk.clone(), false, [0; 20], 1));
        device.set_parallel(4, min_len);
        serve_four(&mem, &chains, device);
        for i in 0..4u64 {
            let status = mem.read_obj::<u8>(GuestAddress(0x3_0000 + i)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        }
        let data = disk.inner.contents();
        for i in 0..4usize {
            assert!(data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1));
        }
        let most = gather.state.lock().unwrap().1;
        (most, on_queue_thread.load(Ordering::SeqCst))
    }

    /// With `set_parallel(4, 0)`, four available writes are served together (the disk sees
    /// four in flight).
    #[test]
    fn parallel_serving_has_requests_in_flight_together_and_completes_each() {
        let (most, on_queue_thread) = serve_four_writes(0, 4);
        assert_eq!(most, 4, "requests in flight together");
        assert!(!on_queue_thread, "all handed to the request threads");
    }

    /// Requests below the size worth a hand-over are served on the queue's thread, one
    /// after the other.
    #[test]
    fn small_requests_are_served_on_the_queues_thread() {
        assert_eq!(
            serve_four_writes(64 * 1024, 1),
            (1, true),
            "one at a time, there"
        );
    }

    /// Serves four available 4 KiB reads of blocks 0..4 with `set_parallel(4, 0)` and
    /// `set_read_batch(batch)` on a disk whose block 2 fails its tag check; checks each
    /// request's status and data (the failed one's buffer zeroed, not garbled) and returns
    /// the offsets of each `read_many` call.
    fn serve_four_reads(batch: u64) -> Vec<Vec<u64>> {
        serve_four_reads_into(batch, |i| 0x2_0000 + i * 0x1000, false)
    }

    /// [`serve_four_reads`] with read `i`'s data at guest address `data(i)` (reads that
    /// share a buffer are only checked for their status), on a disk that panics at block 2
    /// if `panics`: then every read of that disk call fails, its buffer zeroed.
    fn serve_four_reads_into(batch: u64, data: impl Fn(u64) -> u64, panics: bool) -> Vec<Vec<u64>> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let disk = Arc::new(Batches::new(1 << 20, 2 * 4096));
        disk.panics.store(panics, Ordering::SeqCst);
        let mut chains = Vec::new();
        for i in 0..4u64 {
            disk.inner.write_at(i * 4096, &[i as u8 + 1; 4096]).unwrap();
            let (hdr, status) = (0x1_0000 + i * 0x100, 0x3_0000 + i);
            let data = data(i);
            request_header(&mem, hdr, VIRTIO_BLK_T_IN, i * 8);
            mem.write_slice(&[0xee; 4096], GuestAddress(data)).unwrap();
            mem.write_slice(&[0xee], GuestAddress(status)).unwrap();
            let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
            let at = 3 * i as u16;
            chains.extend([
                RawDescriptor::from(Descriptor::new(hdr, 16, next, at + 1)),
                Descriptor::new(data, 4096, next | write, at + 2).into(),
                Descriptor::new(status, 1, write, 0).into(),
            ]);
        }
        let device = Arc::new(Device::new(disk.clone(), false, [0; 20], 1));
        device.set_parallel(4, 0);
        device.set_read_batch(batch);
        serve_four(&mem, &chains, device);
        for i in 0..4u64 {
            let status = mem.read_obj::<u8>(GuestAddress(0x3_0000 + i)).unwrap();
            let mut buf = [0u8; 4096];
            mem.read_slice(&mut buf, GuestAddress(data(i))).unwrap();
            let shared = (0..4).any(|j| j != i && data(j).abs_diff(data(i)) < 4096);
            if shared {
                assert_ne!(i, 2, "the failing read's buffer is not shared");
                assert_eq!(status, VIRTIO_BLK_S_OK as u8, "read {i}'s status");
                continue;
            }
            let data = buf;
            if i == 2 || panics {
                assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "the failed read's status");
                assert!(
                    data.iter().all(|&b| b == 0),
                    "the failed read's buffer is zeroed"
                );
            } else {
                assert_eq!(status, VIRTIO_BLK_S_OK as u8, "read {i}'s status");
                assert!(data.iter().all(|&b| b == i as u8 + 1), "read {i}'s data");
            }
        }
        let mut calls = disk.calls.lock().unwrap().clone();
        calls.sort();
        calls
    }

    /// With a read batch, reads available together reach the disk in one call; one that
    /// fails fails alone.
    #[test]
    fn reads_available_together_are_read_in_one_call_and_fail_alone() {
        assert_eq!(serve_four_reads(1 << 20), [vec![0, 4096, 8192, 12288]]);
    }

    /// Reads whose guest buffers overlap are read one at a time (no two live slices of
    /// guest memory alias), each still answered.
    #[test]
    fn reads_into_overlapping_buffers_are_read_one_at_a_time() {
        let calls = serve_four_reads_into(
            1 << 20,
            |i| match i {
                3 => 0x2_0000,
                i => 0x2_0000 + i * 0x1000,
            },
            false,
        );
        assert_eq!(calls, [vec![0], vec![4096], vec![8192], vec![12288]]);
    }

    /// A bug that panics under a batch's disk call fails each of its reads with an I/O
    /// error status and zeroed buffers, never leaves the guest's own status byte standing.
    #[test]
    fn a_panic_under_a_batch_fails_each_of_its_reads() {
        let calls = serve_four_reads_into(1 << 20, |i| 0x2_0000 + i * 0x1000, true);
        assert_eq!(calls, [vec![0, 4096, 8192, 12288]]);
    }

    /// Without one, or once a batch holds its bytes, each read goes on its own.
    #[test]
    fn reads_go_alone_without_a_batch_and_batches_end_at_their_size() {
        let alone = [vec![0], vec![4096], vec![8192], vec![12288]];
        assert_eq!(serve_four_reads(0), alone);
        // Each request's descriptors carry 4096 + 17 bytes: two fill an 8 KiB batch.
        assert_eq!(serve_four_reads(8192), [vec![0, 4096], vec![8192, 12288]]);
    }

    /// An available index more than a ring ahead is a broken ring, not requests: the
    /// polling loop, which serves while `has_requests`, would otherwise spin on it for as
    /// long as the guest leaves it there.
    #[test]
    fn an_available_index_past_the_ring_is_no_request() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mock = MockSplitQueue::new(&mem, 16);
        let vring = ready_vring(
            &atomic,
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        );
        let device = Arc::new(Device::new(
            Arc::new(MemDisk::new(1 << 20, false)),
            false,
            [0; 20],
            1,
        ));
        let b = BlkBackend::new(device, atomic);
        let avail_idx = GuestAddress(mock.avail_addr().0 + 2);
        for (idx, pending) in [
            (0u16, false),
            (3, true),
            (16, true),
            (17, false),
            (900, false),
        ] {
            mem.write_obj(idx, avail_idx).unwrap();
            assert_eq!(b.has_requests(&vring), pending, "available index {idx}");
        }
    }

    /// Shutdown (`Device::quiesce`) while a guest keeps its queue busy (each request it
    /// sees served makes another available, as fio does at a fixed queue depth): the
    /// queue's request threads must stop taking requests, finish and complete those in
    /// flight, and let quiesce in, not hold the queue until the guest stops on its own.
    #[test]
    fn quiesce_gets_in_while_a_guest_keeps_its_queue_busy() {
        const HDR: u64 = 0x1_0000;
        const DATA: u64 = 0x2_0000;
        const STATUS: u64 = 0x3_0000;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let mock = MockSplitQueue::new(&mem, 16);
        write_header(&mem, HDR, 0);
        mem.write_slice(&[7; 4096], GuestAddress(DATA)).unwrap();
        mock.add_desc_chains(&write_chain(HDR, DATA, STATUS, 0), 0)
            .unwrap();
        // The mock's used ring overlaps the second half of its available ring, which this
        // test goes round: a used ring of our own.
        let (avail, used) = (mock.avail_addr().0, 0x800);
        // A second request (the same chain again) available: queue depth 2.
        mem.write_obj(0u16, GuestAddress(avail + 4 + 2)).unwrap();
        mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
        let vring = ready_vring(&atomic, mock.desc_table_addr().0, avail, used);

        // The guest: each write that starts makes one more request available, for up to
        // 3 s after shutdown began.
        let shutdown: Arc<Mutex<Option<Instant>>> = Arc::default();
        let started = Arc::new(AtomicUsize::new(0));
        let idx = Arc::new(Mutex::new(2u16));
        let disk = {
            let (mem, shutdown, started, idx) = (
                mem.clone(),
                Arc::clone(&shutdown),
                Arc::clone(&started),
                Arc::clone(&idx),
            );
            Arc::new(BeforeWrite {
                inner: MemDisk::new(1 << 20, false),
                before: Box::new(move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                    let since = *shutdown.lock().unwrap();
                    if since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                        return;
                    }
                    let mut idx = idx.lock().unwrap();
                    mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(*idx % 16)))
                        .unwrap();
                    *idx = idx.wrapping_add(1);
                    mem.store(*idx, GuestAddress(avail + 2), Ordering::Release)
                        .unwrap();
                }),
            })
        };
        let device = Arc::new(Device::new(disk, false, [0; 20], 1));
        device.set_parallel(4, 0);
        let backend = BlkBackend::new(Arc::clone(&device), atomic);
        std::thread::scope(|scope| {
            let queue = scope.spawn(|| backend.process_queue(0, &vring));
            while started.load(Ordering::SeqCst) < 20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let t0 = Instant::now();
            *shutdown.lock().unwrap() = Some(t0);
            let quiet = device.quiesce();
            let waited = t0.elapsed();
            let begun = started.load(Ordering::SeqCst);
            let completed = mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let begun_later = started.load(Ordering::SeqCst);
            drop(quiet);
            // Let the guest stop so that the queue's thread returns.
            *shutdown.lock().unwrap() = Some(t0 - Duration::from_secs(10));
            queue.join().unwrap().unwrap();
            assert!(
                waited < Duration::from_secs(2),
                "quiesce waited {waited:?}, until the guest stopped on its own"
            );
            assert_eq!(
                begun_later, begun,
                "a request started after quiesce returned"
            );
            assert_eq!(
                usize::from(completed),
                begun,
                "a request in flight was not completed before quiesce returned"
            );
        });
    }

    #[test]
    fn one_thread_per_queue() {
        let b = backend(false, 3);
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        assert!(b.exit_event(0).is_some());
    }

    #[test]
    fn the_guest_can_switch_the_write_cache_and_nothing_else() {
        let b = backend(false, 1);
        assert_eq!(b.get_config(WRITEBACK_OFFSET as u32, 1), vec![1]);
        b.set_config(WRITEBACK_OFFSET as u32, &[0]).unwrap();
        assert_eq!(b.get_config(WRITEBACK_OFFSET as u32, 1), vec![0]);
        let capacity = b.get_config(0, 8);
        b.set_config(0, &[0xff; 8]).unwrap();
        assert_eq!(b.get_config(0, 8), capacity);
        assert_eq!(u64::from_le_bytes(capacity.try_into().unwrap()), 2048);
    }

    /// A frontend that takes the backend channel but never answers a config change (with
    /// REPLY_ACK negotiated) must not block the caller (the control thread) forever.
    #[test]
    fn a_frontend_that_never_answers_a_config_change_times_out() {
        let b = backend(false, 1);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let channel = vhost::vhost_user::Backend::from_stream(ours);
        channel.set_reply_ack_flag(true);
        b.set_backend_req_fd(channel);
        let device = Arc::clone(&b.device);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(device.config_changed()));
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("config_changed is still waiting for the frontend");
        assert!(result.is_err(), "{result:?}");
        // The channel is now broken: the next change fails at once.
        let start = std::time::Instant::now();
        assert!(b.device.config_changed().is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        drop(theirs);
    }
}
