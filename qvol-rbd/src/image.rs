//! [`RbdImage`]: an open RBD image as a [`Storage`], and its exclusive lock.
//!
//! The mapping onto librbd's C API (`<rbd/librbd.h>`):
//!
//! | `Storage` | librbd |
//! |---|---|
//! | `read_exact_at` | `rbd_read2` |
//! | `write_all_at` | `rbd_write2` (after `rbd_resize` if it ends past the image) |
//! | `write_many` / `read_many` | `rbd_aio_write` / `rbd_aio_read` for each, up to 256 in flight at once, each waited for with `rbd_aio_wait_for_complete` |
//! | `len` / `set_len` | `rbd_get_size` / `rbd_resize` |
//! | `sync_data` | `rbd_flush` |
//! | `punch_hole` | `rbd_write_zeroes` (deallocates whole objects, zeroes the rest) |
//!
//! A write past the end grows the image first, by at least [`GROW_STEP`] (RBD images are
//! thin: the size costs nothing until written), so that appending blocks does not resize
//! for each. The image may therefore be longer than the volume's last block; the engine
//! never relies on the length (everything past what it wrote reads as zeros, as a file
//! extended with `set_len` does).

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, CStr, CString};
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use qvol_core::storage::Storage;

use crate::cluster::{CephOptions, Cluster, Pool};
use crate::error::{check, other};
use crate::ffi::{self, CompletionT, ImageT, RBD_LOCK_MODE_EXCLUSIVE};
use crate::name::RbdName;

/// How much a write past the end grows the image at least (a multiple of RBD's default
/// 4 MiB object size).
pub const GROW_STEP: u64 = 64 << 20;

/// The features of an image `qvol create` makes: the default set of librbd 1.16
/// (`RBD_FEATURES_DEFAULT` of `<rbd/features.h>`: layering, exclusive-lock, object-map,
/// fast-diff, deep-flatten), named explicitly because the exclusive lock is required.
const FEATURES: u64 = 1 | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5);

/// librbd and librados I/O calls take at most this many bytes at a time (their return
/// value is an `int` in places).
const MAX_CHUNK: usize = 1 << 30;

/// The most `rbd_aio_*` requests one call keeps in flight (a queue's batch of reads, a
/// gathering's writes: far fewer in practice).
const MAX_IN_FLIGHT: usize = 256;

fn api() -> io::Result<&'static ffi::Api> {
    ffi::api().map_err(|e| other(io::ErrorKind::NotFound, e))
}

/// An open RBD image.
#[derive(Debug)]
pub struct RbdImage {
    /// The librbd handle; null once [`RbdImage::close`]d. Every call holds a read guard, so
    /// the handle is never closed under a call in progress.
    handle: RwLock<ImageT>,
    name: RbdName,
    writable: bool,
    /// The image's size as last read or set: only this handle's writer changes it (it holds
    /// the exclusive lock); a read-only handle re-reads it before calling a read past it.
    size: AtomicU64,
    /// Serialises growing.
    grow: Mutex<()>,
    _pool: Arc<Pool>,
}

// SAFETY: librbd's image handle may be used by several threads at once for I/O (each call
// is an asynchronous request plus a wait; librbd.h's synchronous API is thread-safe), and is
// closed only in `drop`.
unsafe impl Send for RbdImage {}
// SAFETY: as above.
unsafe impl Sync for RbdImage {}

fn image_c_name(name: &RbdName) -> io::Result<CString> {
    CString::new(name.image.as_str()).map_err(|_| {
        other(
            io::ErrorKind::InvalidInput,
            format!("{name} contains a NUL byte"),
        )
    })
}

impl RbdImage {
    /// Creates the (thin, empty) image `name`; fails with `AlreadyExists` if it exists.
    pub fn create(options: &CephOptions, name: &RbdName) -> io::Result<()> {
        let api = api()?;
        let pool = Cluster::connect(options)?.pool(&name.pool, &name.namespace)?;
        let c_name = image_c_name(name)?;
        let mut order: c_int = 0;
        // SAFETY: a valid I/O context, a NUL-terminated name, a valid out-pointer for the
        // order (0: librbd's default object size).
        let rc =
            unsafe { (api.rbd_create2)(pool.ioctx(), c_name.as_ptr(), 0, FEATURES, &mut order) };
        if rc == -libc::EEXIST {
            return Err(other(
                io::ErrorKind::AlreadyExists,
                format!("{name} already exists; refusing to overwrite it"),
            ));
        }
        check(rc, || format!("cannot create the RBD image {name}"))?;
        Ok(())
    }

    /// Removes the image `name` (for a `qvol create` that failed half-way).
    pub fn remove(options: &CephOptions, name: &RbdName) -> io::Result<()> {
        let api = api()?;
        let pool = Cluster::connect(options)?.pool(&name.pool, &name.namespace)?;
        let c_name = image_c_name(name)?;
        // SAFETY: a valid I/O context and a NUL-terminated name.
        let rc = unsafe { (api.rbd_remove)(pool.ioctx(), c_name.as_ptr()) };
        check(rc, || format!("cannot remove the RBD image {name}"))?;
        Ok(())
    }

    /// Opens `name`, read-only unless `writable`. A writable open does not take the
    /// exclusive lock by itself: call [`RbdImage::lock_exclusive`].
    pub fn open(options: &CephOptions, name: &RbdName, writable: bool) -> io::Result<Self> {
        let pool = Cluster::connect(options)?.pool(&name.pool, &name.namespace)?;
        Self::open_in(pool, name, writable)
    }

    /// Whether the image `name` exists (its pool, and its namespace if it names one, must:
    /// their absence is an error).
    pub fn exists(options: &CephOptions, name: &RbdName) -> io::Result<bool> {
        let pool = Cluster::connect(options)?.pool(&name.pool, &name.namespace)?;
        match Self::open_in(pool, name, false) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn open_in(pool: Arc<Pool>, name: &RbdName, writable: bool) -> io::Result<Self> {
        let api = api()?;
        let c_name = image_c_name(name)?;
        let mut handle: ImageT = ptr::null_mut();
        let open = if writable {
            api.rbd_open
        } else {
            api.rbd_open_read_only
        };
        // SAFETY: a valid I/O context, a NUL-terminated name, a valid out-pointer and no
        // snapshot (NULL).
        let rc = unsafe { open(pool.ioctx(), c_name.as_ptr(), &mut handle, ptr::null()) };
        if rc == -libc::ENOENT {
            return Err(other(
                io::ErrorKind::NotFound,
                format!("the RBD image {name} does not exist"),
            ));
        }
        check(rc, || format!("cannot open the RBD image {name}"))?;
        let image = RbdImage {
            handle: RwLock::new(handle),
            name: name.clone(),
            writable,
            size: AtomicU64::new(0),
            grow: Mutex::new(()),
            _pool: pool,
        };
        image.size.store(image.current_size()?, Ordering::Release);
        Ok(image)
    }

    /// The open handle, held for one call; an error once the image is closed.
    fn handle(&self) -> io::Result<RwLockReadGuard<'_, ImageT>> {
        let guard = self
            .handle
            .read()
            .map_err(|_| other(io::ErrorKind::Other, "a thread using the image panicked"))?;
        if guard.is_null() {
            return Err(other(
                io::ErrorKind::BrokenPipe,
                format!("{} is closed", self.name),
            ));
        }
        Ok(guard)
    }

    /// Closes the image now (`rbd_close`: its exclusive lock is released and its watch on
    /// the header object removed, so the next client need not wait for the cluster to
    /// notice this one is gone); every later call fails. Waits for calls in progress.
    pub fn close(&self) -> io::Result<()> {
        let api = api()?;
        let mut handle = self
            .handle
            .write()
            .map_err(|_| other(io::ErrorKind::Other, "a thread using the image panicked"))?;
        if handle.is_null() {
            return Ok(());
        }
        // SAFETY: the handle came from rbd_open, is not null (not closed yet), and no call
        // is using it (the write guard excludes them); it is nulled so it is closed once.
        let rc = unsafe { (api.rbd_close)(*handle) };
        *handle = ptr::null_mut();
        check(rc, || format!("cannot close {}", self.name))?;
        Ok(())
    }

    /// The image's name.
    pub fn name(&self) -> &RbdName {
        &self.name
    }

    fn current_size(&self) -> io::Result<u64> {
        let api = api()?;
        let mut size = 0u64;
        // SAFETY: an open image and a valid out-pointer.
        let rc = unsafe { (api.rbd_get_size)(*self.handle()?, &mut size) };
        check(rc, || format!("cannot get the size of {}", self.name))?;
        Ok(size)
    }

    fn resize(&self, size: u64) -> io::Result<()> {
        let api = api()?;
        // SAFETY: an open image.
        let rc = unsafe { (api.rbd_resize)(*self.handle()?, size) };
        check(rc, || {
            format!("cannot resize {} to {size} bytes", self.name)
        })?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Grows the image so that it holds `end` bytes.
    fn ensure_len(&self, end: u64) -> io::Result<()> {
        if end <= self.size.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one = self
            .grow
            .lock()
            .map_err(|_| other(io::ErrorKind::Other, "a thread growing the image panicked"))?;
        let size = self.size.load(Ordering::Acquire);
        if end <= size {
            return Ok(());
        }
        let target = end.max(size + size / 8).next_multiple_of(GROW_STEP);
        self.resize(target)
    }

    /// Takes RBD's exclusive lock (`rbd_lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)`) and keeps it
    /// until the image is closed: librbd then never hands it over on another client's
    /// request, so every other client's writes fail (`EROFS`). The error names the holder.
    pub fn lock_exclusive(&self) -> io::Result<()> {
        let api = api()?;
        // SAFETY: an open image.
        let rc = unsafe { (api.rbd_lock_acquire)(*self.handle()?, RBD_LOCK_MODE_EXCLUSIVE) };
        if rc >= 0 {
            return Ok(());
        }
        if rc == -libc::EROFS || rc == -libc::EBUSY || rc == -libc::EAGAIN {
            let holders = self.lock_owners().unwrap_or_default();
            // librbd names an owner by its messenger address (IP:PORT/NONCE).
            let who = if holders.is_empty() {
                "another Ceph client".to_string()
            } else {
                format!("the Ceph client at {}", holders.join(", "))
            };
            return Err(other(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use: {who} holds its exclusive lock (if that client is dead, \
                     `vhost-qvol --break-lock` takes the volume over)",
                    self.name
                ),
            ));
        }
        check(rc, || {
            format!("cannot take the exclusive lock of {}", self.name)
        })?;
        Ok(())
    }

    /// The clients holding the exclusive lock (`rbd_lock_get_owners`), as Ceph names them.
    pub fn lock_owners(&self) -> io::Result<Vec<String>> {
        let api = api()?;
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut count = owners.len();
        // SAFETY: an open image, a valid out-pointer for the mode, an array of `count`
        // pointers librbd fills (and `count` set to how many it filled).
        let rc = unsafe {
            (api.rbd_lock_get_owners)(*self.handle()?, &mut mode, owners.as_mut_ptr(), &mut count)
        };
        if rc == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(rc, || {
            format!("cannot list the lock owners of {}", self.name)
        })?;
        let count = count.min(owners.len());
        let names = owners[..count]
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: librbd filled these with NUL-terminated strings, valid until the
            // cleanup call below.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees exactly the `count` strings rbd_lock_get_owners allocated.
        unsafe { (api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), count) };
        Ok(names)
    }

    /// The addresses (`IP:PORT/NONCE`) of the clients holding the image's exclusive lock, as
    /// `rbd lock ls` lists them (`rbd_list_lockers`: the exclusive lock is a lock on the
    /// image's header object whose cookie starts with `auto `). Unlike
    /// [`RbdImage::lock_owners`] it works on a read-only open. Empty when nobody holds it.
    pub fn lock_holders(&self) -> io::Result<Vec<String>> {
        let api = api()?;
        // tag, clients, cookies, addresses: librbd says how much each needs (-ERANGE).
        let mut want = [64usize, 256, 256, 256];
        for _ in 0..4 {
            let mut bufs = want.map(|n| vec![0u8; n]);
            let mut lens = want;
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            // SAFETY: an open image; each buffer is valid for writes of the length passed
            // beside it, which librbd reads and then sets to what it needs.
            let rc = unsafe {
                (api.rbd_list_lockers)(
                    *self.handle()?,
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            if rc == -(libc::ERANGE as isize) {
                want = std::array::from_fn(|i| lens[i].max(want[i]) + 64);
                continue;
            }
            let count = check(rc as i64, || {
                format!("cannot list the lockers of {}", self.name)
            })?;
            let list = |buf: &[u8], len: usize| -> Vec<String> {
                buf[..len.min(buf.len())]
                    .split(|&b| b == 0)
                    .take(count as usize)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            };
            // The exclusive lock's cookie is "auto <watch handle>" (librbd's ManagedLock);
            // other lockers are advisory locks (`rbd lock add`), which do not hold writes.
            let cookies = list(cookies, *cookies_len);
            return Ok(list(addrs, *addrs_len)
                .into_iter()
                .zip(cookies)
                .filter(|(_, cookie)| cookie.starts_with("auto "))
                .map(|(addr, _)| addr)
                .collect());
        }
        Err(other(
            io::ErrorKind::Other,
            format!(
                "the lockers of {} kept changing while being listed",
                self.name
            ),
        ))
    }

    /// Breaks every holder's exclusive lock (`rbd_lock_break`; librbd blocklists the holder
    /// with the default `rbd_blocklist_on_break_lock=true`, so a holder that is not dead
    /// after all cannot write any more). Returns the holders broken.
    pub fn break_lock(&self) -> io::Result<Vec<String>> {
        let api = api()?;
        let owners = self.lock_owners()?;
        for owner in &owners {
            let c_owner = CString::new(owner.as_str())
                .map_err(|_| other(io::ErrorKind::InvalidData, "a lock owner's name has a NUL"))?;
            // SAFETY: an open image and a NUL-terminated owner name.
            let rc = unsafe {
                (api.rbd_lock_break)(*self.handle()?, RBD_LOCK_MODE_EXCLUSIVE, c_owner.as_ptr())
            };
            if rc != -libc::ENOENT {
                check(rc, || {
                    format!("cannot break {owner}'s exclusive lock of {}", self.name)
                })?;
            }
        }
        Ok(owners)
    }

    /// The image's size, read again from the cluster if `end` lies past the size known
    /// (a read-only handle's writer may have grown it).
    fn size_reaching(&self, end: u64) -> io::Result<u64> {
        let known = self.size.load(Ordering::Acquire);
        if end <= known {
            return Ok(known);
        }
        let size = self.current_size()?;
        Ok(self.size.fetch_max(size, Ordering::AcqRel).max(size))
    }

    /// [`Storage::write_many`]: every write put in flight with `rbd_aio_write`, then each
    /// waited for.
    fn write_together(&self, writes: &[(u64, &[u8])]) -> io::Result<Vec<io::Result<()>>> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        let end = writes
            .iter()
            .map(|&(offset, buf)| offset.saturating_add(buf.len() as u64))
            .max()
            .unwrap_or(0);
        self.ensure_len(end)?;
        let mut ops = Vec::new();
        for (i, &(offset, buf)) in writes.iter().enumerate() {
            for (k, chunk) in buf.chunks(MAX_CHUNK).enumerate() {
                let at = offset + (k * MAX_CHUNK) as u64;
                ops.push((i, Aio::Write { at, buf: chunk }));
            }
        }
        self.in_flight(&ops, writes.len())
    }

    /// [`Storage::read_many`]: every read put in flight with `rbd_aio_read`, then each
    /// waited for.
    fn read_together(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<Vec<io::Result<()>>> {
        let end = reads
            .iter()
            .map(|(offset, buf)| offset.saturating_add(buf.len() as u64))
            .max()
            .unwrap_or(0);
        let size = self.size_reaching(end)?;
        let mut ops = Vec::new();
        for (i, (offset, buf)) in reads.iter_mut().enumerate() {
            let past_end = offset.saturating_add(buf.len() as u64) > size;
            for (k, chunk) in buf.chunks_mut(MAX_CHUNK).enumerate() {
                let at = *offset + (k * MAX_CHUNK) as u64;
                let (ptr, n) = (chunk.as_mut_ptr(), chunk.len());
                ops.push((
                    i,
                    Aio::Read {
                        at,
                        ptr,
                        n,
                        past_end,
                    },
                ));
            }
        }
        self.in_flight(&ops, reads.len())
    }

    /// Puts `ops` in flight, up to [`MAX_IN_FLIGHT`] at once, and waits for each: each op at most
    /// [`MAX_CHUNK`] bytes, of the caller's request given with it; the outcome of each of
    /// `requests` requests (its first failure). Every completion made is waited for before
    /// this returns, whatever fails (the buffers must outlive the requests).
    fn in_flight(
        &self,
        ops: &[(usize, Aio<'_>)],
        requests: usize,
    ) -> io::Result<Vec<io::Result<()>>> {
        let api = api()?;
        let handle = self.handle()?;
        let mut outcomes: Vec<io::Result<()>> = (0..requests).map(|_| Ok(())).collect();
        let mut flying: VecDeque<(usize, Flying)> = VecDeque::new();
        for (index, &(i, ref op)) in ops.iter().enumerate() {
            // At most MAX_IN_FLIGHT at once: a read of a fragmented 64 MiB region is
            // thousands of runs, and librbd holds a completion and its state for each.
            if flying.len() >= MAX_IN_FLIGHT {
                if let Some((oldest, c)) = flying.pop_front() {
                    self.settle(ops, oldest, c, &mut outcomes);
                }
            }
            if outcomes[i].is_err() {
                continue;
            }
            let (at, n) = op.range();
            let what = || op.failed(&self.name);
            if let Aio::Read { past_end: true, .. } = op {
                outcomes[i] = Err(other(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "a read of {n} bytes at offset {at} goes past the end of {}",
                        self.name
                    ),
                ));
                continue;
            }
            let mut c: CompletionT = ptr::null_mut();
            // SAFETY: no callback, no argument; `c` receives the new completion.
            let rc =
                unsafe { (api.rbd_aio_create_completion)(ptr::null_mut(), ptr::null(), &mut c) };
            if let Err(e) = check(rc, what) {
                outcomes[i] = Err(e);
                continue;
            }
            // SAFETY: an open image (the guard is held until every completion is waited
            // for); the buffer is valid for `n` bytes (reads: for writes, and borrowed
            // mutably by the caller) and outlives the request: `Flying` waits for it
            // before it is released, and it is dropped before this function returns.
            let rc = unsafe {
                match *op {
                    Aio::Write { buf, .. } => {
                        (api.rbd_aio_write)(*handle, at, n, buf.as_ptr().cast(), c)
                    }
                    Aio::Read { ptr, .. } => (api.rbd_aio_read)(*handle, at, n, ptr.cast(), c),
                }
            };
            if let Err(e) = check(rc, what) {
                // Never submitted: nothing to wait for.
                // SAFETY: the completion made above, released once.
                unsafe { (api.rbd_aio_release)(c) };
                outcomes[i] = Err(e);
                continue;
            }
            flying.push_back((index, Flying { api, c }));
        }
        for (index, c) in flying {
            self.settle(ops, index, c, &mut outcomes);
        }
        Ok(outcomes)
    }

    /// Waits for op `index` of `ops` and records its outcome in its request's.
    fn settle(
        &self,
        ops: &[(usize, Aio<'_>)],
        index: usize,
        c: Flying,
        outcomes: &mut [io::Result<()>],
    ) {
        let rv = c.wait();
        let (i, ref op) = ops[index];
        if outcomes[i].is_err() {
            return;
        }
        let (at, n) = op.range();
        outcomes[i] = match check(rv as i64, || op.failed(&self.name)) {
            Err(e) => Err(e),
            // A completed write returns 0 (librbd's aio writes return no byte count) or
            // the count, a read the count: anything else is short.
            Ok(done) if done as usize == n || (done == 0 && matches!(op, Aio::Write { .. })) => {
                Ok(())
            }
            Ok(done) => Err(other(
                io::ErrorKind::UnexpectedEof,
                format!("{} moved {done} of {n} bytes at offset {at}", self.name),
            )),
        };
    }

    fn read_only_error(&self) -> io::Error {
        other(
            io::ErrorKind::PermissionDenied,
            format!("{} is open read-only", self.name),
        )
    }
}

impl Drop for RbdImage {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("{e}");
        }
    }
}

/// The outcome of each of `n` requests: `outcomes`, or its error for every one of them.
fn each(n: usize, outcomes: io::Result<Vec<io::Result<()>>>) -> Vec<io::Result<()>> {
    outcomes.unwrap_or_else(|e| {
        (0..n)
            .map(|_| Err(other(e.kind(), e.to_string())))
            .collect()
    })
}

/// One request of [`RbdImage::in_flight`].
enum Aio<'a> {
    Write {
        at: u64,
        buf: &'a [u8],
    },
    /// Into `n` bytes at `ptr`, borrowed mutably by the caller for the call.
    Read {
        at: u64,
        ptr: *mut u8,
        n: usize,
        /// Ends past the image: not submitted, `UnexpectedEof`.
        past_end: bool,
    },
}

impl Aio<'_> {
    fn range(&self) -> (u64, usize) {
        match *self {
            Aio::Write { at, buf } => (at, buf.len()),
            Aio::Read { at, n, .. } => (at, n),
        }
    }

    fn failed(&self, name: &RbdName) -> String {
        let (at, n) = self.range();
        let verb = match self {
            Aio::Write { .. } => "write",
            Aio::Read { .. } => "read",
        };
        format!("cannot {verb} {n} bytes at offset {at} of {name}")
    }
}

/// A submitted `rbd_aio_write` or `rbd_aio_read`: waited for and released on drop, so that no buffer is
/// freed under a write librbd still reads from (even while unwinding).
struct Flying {
    api: &'static ffi::Api,
    c: CompletionT,
}

impl Flying {
    /// Waits for the write; its return value (negative errno on failure).
    fn wait(self) -> isize {
        // SAFETY: a completion of a submitted write, not yet released (`Drop` does that).
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.c);
            (self.api.rbd_aio_get_return_value)(self.c)
        }
    }
}

impl Drop for Flying {
    fn drop(&mut self) {
        // SAFETY: a completion made by `rbd_aio_create_completion`, released once; waiting
        // on a completion that already completed returns at once.
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.c);
            (self.api.rbd_aio_release)(self.c);
        }
    }
}

impl Storage for RbdImage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.size.load(Ordering::Acquire))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let api = api()?;
        let end = offset.saturating_add(buf.len() as u64);
        let size = self.size_reaching(end)?;
        if end > size {
            return Err(other(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "a read of {} bytes at offset {offset} goes past the end of {} \
                     ({size} bytes)",
                    buf.len(),
                    self.name
                ),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_CHUNK);
            let at = offset + done as u64;
            let chunk = &mut buf[done..done + n];
            // SAFETY: an open image; `chunk` is valid for writes of `n` bytes.
            let rc =
                unsafe { (api.rbd_read2)(*self.handle()?, at, n, chunk.as_mut_ptr().cast(), 0) };
            let got = check(rc as i64, || {
                format!("cannot read {n} bytes at offset {at} of {}", self.name)
            })?;
            if got as usize != n {
                return Err(other(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} returned {got} of {n} bytes at offset {at}", self.name),
                ));
            }
            done += n;
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let api = api()?;
        if !self.writable {
            return Err(self.read_only_error());
        }
        self.ensure_len(offset.saturating_add(buf.len() as u64))?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_CHUNK);
            let at = offset + done as u64;
            let chunk = &buf[done..done + n];
            // SAFETY: an open image; `chunk` is valid for reads of `n` bytes.
            let rc = unsafe { (api.rbd_write2)(*self.handle()?, at, n, chunk.as_ptr().cast(), 0) };
            let put = check(rc as i64, || {
                format!("cannot write {n} bytes at offset {at} of {}", self.name)
            })?;
            if put as usize != n {
                return Err(other(
                    io::ErrorKind::WriteZero,
                    format!("{} took {put} of {n} bytes at offset {at}", self.name),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// All in flight at once.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<io::Result<()>> {
        if reads.len() < 2 {
            return reads
                .iter_mut()
                .map(|(offset, buf)| self.read_exact_at(buf, *offset))
                .collect();
        }
        let n = reads.len();
        each(n, self.read_together(reads))
    }

    /// All in flight at once: what the engine hands in together may land in any order.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        if writes.len() < 2 {
            return writes
                .iter()
                .map(|&(offset, buf)| self.write_all_at(buf, offset))
                .collect();
        }
        each(writes.len(), self.write_together(writes))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(self.read_only_error());
        }
        let _one = self
            .grow
            .lock()
            .map_err(|_| other(io::ErrorKind::Other, "a thread growing the image panicked"))?;
        self.resize(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let api = api()?;
        // SAFETY: an open image.
        let rc = unsafe { (api.rbd_flush)(*self.handle()?) };
        check(rc, || format!("cannot flush {}", self.name))?;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let api = api()?;
        if !self.writable {
            return Err(self.read_only_error());
        }
        let end = offset
            .saturating_add(len)
            .min(self.size.load(Ordering::Acquire));
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_CHUNK as u64);
            // SAFETY: an open image; no flags (deallocate where whole objects are covered).
            let rc = unsafe { (api.rbd_write_zeroes)(*self.handle()?, at, n as usize, 0, 0) };
            check(rc as i64, || {
                format!("cannot zero {n} bytes at offset {at} of {}", self.name)
            })?;
            at += n;
        }
        Ok(())
    }

    /// Every write waits for the OSDs (librbd's cache is off: FORMAT.md §11.1).
    fn round_trips(&self) -> bool {
        true
    }
}
