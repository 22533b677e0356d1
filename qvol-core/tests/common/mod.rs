//! Helpers shared by the engine's integration tests: keys, volume creation, content
//! patterns and a per-block reference model of what a crash may leave.
#![allow(dead_code)] // each test binary uses a different subset

pub mod layout;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use qvol_core::storage::Storage;
use qvol_core::{CipherSuite, CreateOptions, ErrorKind, Volume, VolumeKey};

/// The block size of the contract.
pub const BS: usize = 4096;
/// The request alignment of the contract.
pub const SECTOR: u64 = 512;

/// A fixed test key, different for each `n`.
pub fn key(n: u8) -> VolumeKey {
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = n.wrapping_mul(31).wrapping_add(i as u8);
    }
    VolumeKey::from_bytes(bytes)
}

/// Options for a test volume of `size` bytes.
pub fn options(size: u64, suite: CipherSuite) -> CreateOptions {
    CreateOptions {
        key_epoch: 0,
        size,
        suite,
        name: "test".to_string(),
        volume_id: [0x42; 16],
        keyslots: vec![b"an opaque keyslot blob".to_vec()],
        compression: None,
    }
}

/// Creates a volume of `size` bytes on `storage` with [`key`]`(1)`.
pub fn create(storage: Arc<dyn Storage>, size: u64) -> Volume {
    Volume::create(
        storage,
        options(size, CipherSuite::XChaCha20Poly1305),
        &key(1),
    )
    .unwrap_or_else(|e| panic!("create a {size}-byte volume: {e:?}"))
}

/// Opens `storage` with [`key`]`(1)`, writable.
pub fn open(storage: Arc<dyn Storage>) -> qvol_core::Result<Volume> {
    Volume::open(storage, &key(1), false)
}

/// Deterministic pseudo-random bytes for a write tagged `tag` (SplitMix64 stream).
/// `len` bytes of text that compresses (lines naming `tag` and their number), as files of
/// a guest's filesystem do.
pub fn text(tag: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 80);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("tag {tag} line {line}: the quick brown fox jumps over the lazy dog\n")
                .as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = tag.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5851_f42d_4c95_7f2d;
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads the whole block `lbn` of `vol`.
pub fn read_block(vol: &Volume, lbn: u64) -> qvol_core::Result<Vec<u8>> {
    let mut buf = vec![0u8; BS];
    vol.read_at(lbn * BS as u64, &mut buf)?;
    Ok(buf)
}

/// Asserts `result` failed with `kind`.
pub fn assert_kind<T: std::fmt::Debug>(result: qvol_core::Result<T>, kind: ErrorKind, what: &str) {
    match result {
        Ok(v) => panic!("{what}: expected a {kind:?} error, got Ok({v:?})"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: {e:?}"),
    }
}

/// What each 4 KiB block may hold after a crash: its content as of the last completed
/// flush (the first version) followed by every version written since, the last being the
/// current content.
#[derive(Clone, Debug)]
pub struct BlockHistory {
    blocks: Vec<Vec<Vec<u8>>>,
}

impl BlockHistory {
    /// A volume of `size` bytes that reads as zeros and is durable.
    pub fn new(size: u64) -> Self {
        let n = (size / BS as u64) as usize;
        Self {
            blocks: vec![vec![vec![0u8; BS]]; n],
        }
    }

    /// The disk is resized to `size` bytes (durable): blocks past a smaller end are gone,
    /// blocks past the old end read as zeros.
    pub fn resize(&mut self, size: u64) {
        let n = (size / BS as u64) as usize;
        self.blocks.resize(n, vec![vec![0u8; BS]]);
    }

    /// The number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// The current content of block `lbn`.
    pub fn current(&self, lbn: usize) -> &[u8] {
        self.blocks[lbn].last().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Applies `data` at byte `offset` (a write, or zeros for discard/write_zeroes): every
    /// touched block gets a new version.
    pub fn apply(&mut self, offset: u64, data: &[u8]) {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset as usize + pos;
            let lbn = abs / BS;
            let within = abs % BS;
            let n = (BS - within).min(data.len() - pos);
            let mut next = self.current(lbn).to_vec();
            next[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.blocks[lbn].push(next);
            pos += n;
        }
    }

    /// The bytes the volume must return for `len` bytes at `offset` now.
    pub fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut pos = 0usize;
        while pos < len {
            let abs = offset as usize + pos;
            let (lbn, within) = (abs / BS, abs % BS);
            let n = (BS - within).min(len - pos);
            out.extend_from_slice(&self.current(lbn)[within..within + n]);
            pos += n;
        }
        out
    }

    /// Everything up to now is durable: only the current versions remain.
    pub fn make_durable(&mut self) {
        for versions in &mut self.blocks {
            if versions.len() > 1 {
                let last = versions.pop().unwrap_or_default();
                *versions = vec![last];
            }
        }
    }

    /// Which version of `lbn` the bytes `got` are, if any (0 = the durable one).
    pub fn version_of(&self, lbn: usize, got: &[u8]) -> Option<usize> {
        self.blocks[lbn].iter().position(|v| v.as_slice() == got)
    }

    /// Every allowed version of `lbn`, the durable one first.
    pub fn all_versions(&self, lbn: usize) -> &[Vec<u8>] {
        &self.blocks[lbn]
    }

    /// How many versions block `lbn` has.
    pub fn versions(&self, lbn: usize) -> usize {
        self.blocks[lbn].len()
    }

    /// After a crash and reopen: every block of `vol` must read without error as one of its
    /// versions; the state read becomes the new durable state. `Err` describes the first
    /// violation.
    pub fn check_after_crash(&mut self, vol: &Volume) -> Result<(), String> {
        for lbn in 0..self.len() {
            let got = read_block(vol, lbn as u64)
                .map_err(|e| format!("block {lbn} fails to read after a crash: {e:?}"))?;
            match self.version_of(lbn, &got) {
                Some(_) => self.blocks[lbn] = vec![got],
                None => {
                    return Err(format!(
                        "block {lbn} reads as none of its {} versions after a crash \
                         (first bytes {:02x?})",
                        self.versions(lbn),
                        &got[..16]
                    ))
                }
            }
        }
        Ok(())
    }

    /// How many versions each block has now (a mark to pass to [`Self::check_from`]).
    pub fn version_counts(&self) -> Vec<usize> {
        self.blocks.iter().map(Vec::len).collect()
    }

    /// After a kill -9 in the middle of an operation: every block of `vol` must read as the
    /// version it had at `mark` (from [`Self::version_counts`], taken when the operation
    /// began) or as a later one. The versions after the one read are dropped (they never
    /// landed); the older ones stay (what was not synced may still be lost).
    pub fn check_after_kill(&mut self, vol: &Volume, mark: &[usize]) -> Result<(), String> {
        assert_eq!(mark.len(), self.len(), "a mark of this history");
        for (lbn, &count) in mark.iter().enumerate() {
            let got = read_block(vol, lbn as u64)
                .map_err(|e| format!("block {lbn} fails to read after a kill: {e:?}"))?;
            let first = count.max(1) - 1;
            match self.blocks[lbn][first..].iter().rposition(|v| *v == got) {
                Some(i) => self.blocks[lbn].truncate(first + i + 1),
                None => {
                    return Err(format!(
                        "block {lbn} reads as none of its versions {first}.. after a kill \
                         (it is version {:?} of {})",
                        self.version_of(lbn, &got),
                        self.versions(lbn)
                    ))
                }
            }
        }
        Ok(())
    }

    /// The whole disk as it reads now.
    pub fn image(&self) -> Vec<u8> {
        (0..self.len())
            .flat_map(|lbn| self.current(lbn).to_vec())
            .collect()
    }

    /// The disk becomes `image` (a whole disk), durable.
    pub fn reset_to(&mut self, image: &[u8]) {
        for (lbn, versions) in self.blocks.iter_mut().enumerate() {
            *versions = vec![image[lbn * BS..(lbn + 1) * BS].to_vec()];
        }
    }

    /// Every block of `vol` must read as its current version.
    pub fn check_current(&self, vol: &Volume) -> Result<(), String> {
        for lbn in 0..self.len() {
            let got = read_block(vol, lbn as u64)
                .map_err(|e| format!("block {lbn} fails to read: {e:?}"))?;
            if got != self.current(lbn) {
                return Err(format!(
                    "block {lbn} is not its latest version (it is version {:?} of {})",
                    self.version_of(lbn, &got),
                    self.versions(lbn)
                ));
            }
        }
        Ok(())
    }
}

/// A storage whose every write first runs a hook with the buffer and its offset, which says
/// whether the write reaches `inner` (false: it is dropped, and reported done); it says each
/// write is a round trip (`Storage::round_trips`, as RBD does) when built so.
pub struct Hooked {
    inner: Arc<dyn Storage>,
    round_trips: bool,
    hook: Box<WriteHook>,
    /// The number of reads of each `read_many` call.
    pub read_calls: Mutex<Vec<usize>>,
}

/// What [`Hooked`] runs before each write: buffer and offset in, whether to write out.
type WriteHook = dyn Fn(&[u8], u64) -> bool + Send + Sync;

impl Hooked {
    pub fn new(
        inner: Arc<dyn Storage>,
        round_trips: bool,
        hook: impl Fn(&[u8], u64) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Hooked {
            inner,
            round_trips,
            hook: Box::new(hook),
            read_calls: Mutex::new(Vec::new()),
        })
    }
}

/// A storage that drops every write to the superblocks (blocks 9 and 10) once the flag it
/// returns is set: what kill -9 leaves while a pipelined commit's superblock is not written
/// yet (FORMAT.md §10.1).
pub fn no_superblocks(inner: Arc<dyn Storage>) -> (Arc<Hooked>, Arc<AtomicBool>) {
    let dropping = Arc::new(AtomicBool::new(false));
    let flag = dropping.clone();
    let st = Hooked::new(inner, false, move |_, offset| {
        !(flag.load(Ordering::SeqCst) && (9 * 4096..11 * 4096).contains(&offset))
    });
    (st, dropping)
}

/// Blocks the calling thread until [`Gate::open`] (a hook's way to hold a write).
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooked")
            .field("inner", &self.inner)
            .field("round_trips", &self.round_trips)
            .finish_non_exhaustive()
    }
}

impl Storage for Hooked {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if !(self.hook)(buf, offset) {
            return Ok(());
        }
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn round_trips(&self) -> bool {
        self.round_trips
    }
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<std::io::Result<()>> {
        self.read_calls.lock().unwrap().push(reads.len());
        self.inner.read_many(reads)
    }
}
