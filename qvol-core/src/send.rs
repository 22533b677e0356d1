//! Raw send and receive of snapshots (docs/FORMAT.md §15): a stream of a snapshot's
//! encrypted data blocks and authenticated map nodes, full or relative to an older snapshot,
//! written **without the key** (nodes are parsed, not verified), and received with it: every
//! node is checked against the portable MAC its parent (or the snapshot's MAC'd entry)
//! holds, every data block against its tag, before anything becomes reachable.

use std::io::{Read, Write};

use crate::datablock::open_block;
use crate::error::{Error, ErrorKind, Result};
use crate::group::{first_reference, group_of};
use crate::header::{decode_header, decode_keyslots, HEADER_AREA_LEN};
use crate::layout::*;
use crate::node::{
    decode_interior_entry, decode_map_node, encode_interior_entry, node_mac, node_pmac, LeafEntry,
    NodePtr, TreeKind,
};
use crate::snapshot::{decode_table_block, decode_table_entry, entry_mac, Snapshot};
use crate::storage::Storage;
use crate::superblock::{Superblock, SUPERBLOCK_LEN};
use crate::tree::{read_node, zero_page, Page};
use crate::volume::Volume;

/// `"QVOLSEND"`.
const STREAM_MAGIC: [u8; 8] = *b"QVOLSEND";
/// The stream version of volumes without compression units.
const STREAM_VERSION: u32 = 1;
/// The stream version of volumes with compression units (FORMAT.md §18.3 rule 4).
const STREAM_VERSION_UNITS: u32 = 2;
const FLAG_INCREMENTAL: u32 = 1;
const REC_NODE: u8 = 1;
const REC_DATA: u8 = 2;
const REC_UNIT: u8 = 3;
const REC_END: u8 = 0xff;
/// Bytes of a snapshot entry in the stream (the table's entry layout).
pub(crate) const ENTRY_LEN: usize = 400;

/// What a stream says about itself before its records.
#[derive(Clone, Debug)]
pub struct StreamHead {
    /// The sending image's header block and keyslot area (no secret).
    pub header_area: Vec<u8>,
    /// The snapshot the stream carries (its root pointer is the sender's, unused).
    pub snapshot: Snapshot,
    /// The snapshot an incremental stream is relative to (its guid).
    pub base: Option<[u8; 16]>,
    entry: Vec<u8>,
}

impl StreamHead {
    /// The volume id of the volume the stream is of.
    pub fn volume_id(&self) -> [u8; 16] {
        get_array(&self.header_area, 16)
    }

    /// The sender's header and keyslots, as [`crate::read_header`] reads an image's: to
    /// find the keyslot that unwraps the volume key before any image exists.
    pub fn header_info(&self) -> Result<crate::HeaderInfo> {
        let header = decode_header(&self.header_area[..BS])?;
        Ok(crate::HeaderInfo {
            format_version: header.version,
            log_len: header.log_len,
            volume_id: header.volume_id,
            suite: header.suite,
            key_epoch: header.key_epoch,
            size: header.size,
            unit_bytes: header.unit_bytes(),
            name: header.name,
            keyslots: decode_keyslots(&self.header_area[BS..])?,
        })
    }

    /// What a new image receiving the stream is created with.
    pub fn create_options(&self) -> Result<crate::CreateOptions> {
        let header = decode_header(&self.header_area[..BS])?;
        let units = header.units();
        Ok(crate::CreateOptions {
            size: header.size,
            suite: header.suite,
            name: header.name,
            volume_id: header.volume_id,
            keyslots: decode_keyslots(&self.header_area[BS..])?,
            key_epoch: header.key_epoch,
            // The unit size is the volume's; new writes are not compressed until the owner
            // says so (`Volume::set_compression`), as for a new volume.
            compression: units.map(|unit_log2| crate::Compression {
                unit_log2,
                level: None,
            }),
        })
    }
}

/// What `send` wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Map nodes in the stream.
    pub nodes: u64,
    /// Data blocks in the stream.
    pub data_blocks: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    inner: W,
    hash: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.hash.update(b);
        self.bytes += b.len() as u64;
        self.inner
            .write_all(b)
            .map_err(|e| Error::io("cannot write the stream", e))
    }
}

/// The newest superblock of an image, read without the key (its MAC is not checked: the
/// receiver checks everything the stream carries).
fn keyless_superblock(st: &dyn Storage) -> Result<Superblock> {
    let mut best: Option<Superblock> = None;
    for (i, &off) in SUPERBLOCK_OFFSETS.iter().enumerate() {
        let mut b = [0u8; SUPERBLOCK_LEN];
        st.read_exact_at(&mut b, off)
            .map_err(|e| Error::io("cannot read a superblock", e))?;
        if let Ok(sb) = Superblock::decode(&b) {
            if sb.generation % 2 == i as u64
                && best.as_ref().is_none_or(|b| b.generation < sb.generation)
            {
                best = Some(sb);
            }
        }
    }
    best.ok_or_else(|| Error::corrupt("neither superblock of the image can be read"))
}

/// The snapshot table of an image, read without the key: each entry with its encoded bytes.
fn keyless_table(st: &dyn Storage, sb: &Superblock) -> Result<Vec<(Snapshot, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut ptr = sb.snapshots;
    let mut blocks = 0;
    while ptr.pbn != 0 {
        blocks += 1;
        if blocks > crate::snapshot::MAX_SNAPSHOTS / crate::snapshot::PER_BLOCK {
            return Err(Error::corrupt("the snapshot table loops"));
        }
        let page = read_raw(st, ptr.pbn)?;
        let (list, next) = decode_table_block(&page[..])?;
        for (k, s) in list.into_iter().enumerate() {
            let at = crate::snapshot::ENTRIES_AT + k * ENTRY_LEN;
            out.push((s, page[at..at + ENTRY_LEN].to_vec()));
        }
        ptr = next;
    }
    Ok(out)
}

fn read_raw(st: &dyn Storage, pbn: u64) -> Result<Page> {
    let mut page = zero_page();
    st.read_exact_at(&mut page[..], pbn * BLOCK_SIZE)
        .map_err(|e| Error::io(format!("cannot read block {pbn}"), e))?;
    Ok(page)
}

/// Writes the stream of snapshot `name` of the image on `st` to `out`: everything (full), or
/// what changed since snapshot `from`. Needs no key. `progress(bytes)` is told as it goes.
pub fn send_snapshot(
    st: &dyn Storage,
    name: &str,
    from: Option<&str>,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<SendSummary> {
    let (header, area) = crate::header::read_header_area(st)?;
    if !header.portable_nodes() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the image was made with format version {} or upgraded from it: sending needs an \
                 image created as version {SNAPSHOT_VERSION} (its node MACs leave out block \
                 numbers)",
                if header.version < SNAPSHOT_VERSION {
                    header.version
                } else {
                    SNAPSHOT_VERSION - 1
                }
            ),
        ));
    }
    let sb = keyless_superblock(st)?;
    if sb.rekey.is_some() {
        return Err(Error::new(
            ErrorKind::Refused,
            "the volume is being re-encrypted: finish that first (its blocks are under two keys)",
        ));
    }
    let table = keyless_table(st, &sb)?;
    let find = |n: &str| {
        table
            .iter()
            .find(|(s, _)| s.name == n)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("the volume has no snapshot named {n:?}"),
                )
            })
    };
    let (snap, entry) = find(name)?;
    // The image is not verified: its map must at least fit the disk it claims, so that a
    // crafted one cannot make the walk (and the stream) endless.
    // (A snapshot taken before the disk grew has a shorter map: FORMAT.md §16.)
    let blocks = header.size / BLOCK_SIZE;
    // A map may be taller than the size needs (a shrink keeps the trees' height, FORMAT.md
    // §16), never taller than a map can be.
    if snap.map_height > 8 {
        return Err(Error::corrupt(format!(
            "snapshot {name:?} has a map of height {}, taller than any map",
            snap.map_height
        )));
    }
    let base = match from {
        Some(f) => {
            let (b, _) = find(f)?;
            if b.epoch >= snap.epoch {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("snapshot {f:?} is not older than {name:?}"),
                ));
            }
            if b.map_height > snap.map_height {
                return Err(Error::corrupt(format!(
                    "snapshot {f:?} has a taller map than the newer {name:?}"
                )));
            }
            Some(b)
        }
        None => None,
    };
    let mut w = Hashing {
        inner: out,
        hash: blake3::Hasher::new(),
        bytes: 0,
    };
    let mut pre = [0u8; 32];
    pre[..8].copy_from_slice(&STREAM_MAGIC);
    put_u32(&mut pre, 8, stream_version(header.units()));
    put_u32(
        &mut pre,
        12,
        if base.is_some() { FLAG_INCREMENTAL } else { 0 },
    );
    if let Some(b) = &base {
        pre[16..32].copy_from_slice(&b.guid);
    }
    w.put(&pre)?;
    w.put(&area)?;
    w.put(&entry)?;
    let mut sum = SendSummary::default();
    let file_blocks = st
        .len()
        .map_err(|e| Error::io("cannot read the image's length", e))?
        / BLOCK_SIZE;
    let mut sender = Sender {
        st,
        units: header.units(),
        blocks,
        file_blocks,
        w: &mut w,
        sum: &mut sum,
        progress,
    };
    sender.node(
        snap.map_height,
        0,
        snap.root,
        base.as_ref().map(|b| (b.root, b.map_height)),
    )?;
    let mut end = [0u8; 17];
    end[0] = REC_END;
    put_u64(&mut end, 1, sum.nodes);
    put_u64(&mut end, 9, sum.data_blocks);
    w.put(&end)?;
    let digest = *w.hash.finalize().as_bytes();
    w.put(&digest)?;
    w.inner
        .flush()
        .map_err(|e| Error::io("cannot write the stream", e))?;
    sum.bytes = w.bytes;
    Ok(sum)
}

struct Sender<'a, W> {
    st: &'a dyn Storage,
    /// `log2 N` of the volume's compression units.
    units: Option<u8>,
    /// Logical blocks of the disk: no data record lies beyond them.
    blocks: u64,
    /// Blocks of the image: a map (a tree) has no more nodes than that, so a crafted one
    /// (nodes named more than once) cannot make the stream endless.
    file_blocks: u64,
    w: &'a mut Hashing<W>,
    sum: &'a mut SendSummary,
    progress: &'a mut dyn FnMut(u64),
}

impl<W: Write> Sender<'_, W> {
    /// Sends node (`level`, `index`) at `ptr` and what it needs, unless `base` holds the same
    /// subtree (equal portable MACs). `base` is the base's pointer at this position and the
    /// level it points to (lower for a base of a smaller disk: see [`child_base`]).
    fn node(
        &mut self,
        level: u8,
        index: u64,
        ptr: NodePtr,
        base: Option<(NodePtr, u8)>,
    ) -> Result<()> {
        if ptr.pbn == 0 || same_subtree(base, level, &ptr.pmac) {
            return Ok(());
        }
        // Nodes past the end of the disk are those a shrink left (FORMAT.md §16): they hold
        // no data (a data record past the end is refused below) and are sent as they are.
        if self.sum.nodes >= self.file_blocks {
            return Err(Error::corrupt(format!(
                "the map has more nodes than the image has blocks (at node {index} of level \
                 {level})"
            )));
        }
        let page = read_raw(self.st, ptr.pbn)?;
        decode_map_node(&page[..], level)?;
        let mut head = [0u8; 10];
        head[0] = REC_NODE;
        head[1] = level;
        put_u64(&mut head, 2, index);
        self.w.put(&head)?;
        self.w.put(&page[..])?;
        self.sum.nodes += 1;
        let base_page = match base {
            Some((b, l)) if l == level && b.pbn != 0 => Some(read_raw(self.st, b.pbn)?),
            _ => None,
        };
        if level == 0 {
            crate::group::check_groups(&page[..], self.units)?;
        }
        for i in 0..FANOUT as usize {
            if level == 0 {
                let e = LeafEntry::decode(&page[..], i)?;
                let lbn = index * FANOUT + i as u64;
                if e.k > 0 {
                    self.unit(&page, base_page.as_ref(), lbn, i, &e)?;
                    continue;
                }
                let same = match &base_page {
                    Some(bp) => same_data(&LeafEntry::decode(&bp[..], i)?, &e),
                    None => false,
                };
                if e.pbn == 0 || same {
                    continue;
                }
                if lbn >= self.blocks {
                    return Err(Error::corrupt(format!(
                        "logical block {lbn} lies beyond the end of the disk"
                    )));
                }
                let data = read_raw(self.st, e.pbn)?;
                let mut head = [0u8; 9];
                head[0] = REC_DATA;
                put_u64(&mut head, 1, lbn);
                self.w.put(&head)?;
                self.w.put(&data[..])?;
                self.sum.data_blocks += 1;
                (self.progress)(self.w.bytes);
            } else {
                let child = decode_interior_entry(&page[..], i)?;
                let b = child_base(base, base_page.as_deref(), level, i)?;
                self.node(level - 1, index * FANOUT + i as u64, child, b)?;
            }
        }
        Ok(())
    }
}

impl<W: Write> Sender<'_, W> {
    /// Sends the unit entry `i` (logical block `lbn`) of leaf `page` references, once for
    /// its group (at its first referencing entry), unless the base's group references the
    /// same sealed unit (FORMAT.md §18.3 rule 4).
    fn unit(
        &mut self,
        page: &Page,
        base_page: Option<&Page>,
        lbn: u64,
        i: usize,
        e: &LeafEntry,
    ) -> Result<()> {
        let group = group_of(self.units, i);
        if first_reference(&page[..], group.clone(), e.pbn)? != Some(i)
            || base_unit(base_page, group, e)?.is_some()
        {
            return Ok(());
        }
        let first = lbn - (i - group_of(self.units, i).start) as u64;
        if first >= self.blocks {
            return Err(Error::corrupt(format!(
                "logical block {first} lies beyond the end of the disk"
            )));
        }
        let mut head = [0u8; 10];
        head[0] = REC_UNIT;
        put_u64(&mut head, 1, first);
        head[9] = e.k;
        self.w.put(&head)?;
        for pbn in e.pbn..e.pbn + u64::from(e.k) {
            self.w.put(&read_raw(self.st, pbn)?[..])?;
        }
        self.sum.data_blocks += 1;
        (self.progress)(self.w.bytes);
        Ok(())
    }
}

/// The stream version of a volume whose compression units are `units`.
fn stream_version(units: Option<u8>) -> u32 {
    if units.is_some() {
        STREAM_VERSION_UNITS
    } else {
        STREAM_VERSION
    }
}

/// The base's entry of the same group referencing the same sealed unit as `e` (same key
/// epoch field, nonce and tag; stored wherever the base has it), if any.
fn base_unit(
    base_page: Option<&Page>,
    group: std::ops::Range<usize>,
    e: &LeafEntry,
) -> Result<Option<LeafEntry>> {
    let Some(bp) = base_page else {
        return Ok(None);
    };
    for j in group {
        let b = LeafEntry::decode(&bp[..], j)?;
        if same_data(&b, e) {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Whether `base` (pointer, level) holds the subtree at `level` whose portable MAC is `pmac`.
fn same_subtree(base: Option<(NodePtr, u8)>, level: u8, pmac: &[u8; 16]) -> bool {
    base.is_some_and(|(b, l)| l == level && b.pbn != 0 && b.pmac == *pmac)
}

/// The base's pointer below entry `i` of the node at `level`: from the base's node there,
/// or, for a base of a smaller disk (its root lower than `level`), its root down the first
/// entries and nothing elsewhere (FORMAT.md §16).
fn child_base(
    base: Option<(NodePtr, u8)>,
    page: Option<&[u8; BS]>,
    level: u8,
    i: usize,
) -> Result<Option<(NodePtr, u8)>> {
    Ok(match (base, page) {
        (Some(_), Some(p)) => Some((decode_interior_entry(&p[..], i)?, level - 1)),
        (Some((b, l)), None) if l < level && i == 0 => Some((b, l)),
        _ => None,
    })
}

/// Whether two leaf entries name the same sealed block (wherever it is stored).
fn same_data(a: &LeafEntry, b: &LeafEntry) -> bool {
    a.pbn != 0
        && b.pbn != 0
        && a.key_epoch == b.key_epoch
        && a.k == b.k
        && a.nonce == b.nonce
        && a.tag == b.tag
}

/// A reader that hashes what it reads.
struct Hashed<'a> {
    inner: &'a mut dyn Read,
    hash: blake3::Hasher,
}

impl Hashed<'_> {
    fn take(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Integrity,
                    "the stream ends early: it was cut short",
                )
            } else {
                Error::io("cannot read the stream", e)
            }
        })?;
        self.hash.update(buf);
        Ok(())
    }
}

/// Reads the head of a stream (before any record).
pub fn read_stream_head(r: &mut dyn Read) -> Result<(StreamHead, blake3::Hasher)> {
    let mut h = Hashed {
        inner: r,
        hash: blake3::Hasher::new(),
    };
    let mut pre = [0u8; 32];
    h.take(&mut pre)
        .map_err(|_| Error::corrupt("this is not a qvol send stream (too short)"))?;
    if pre[..8] != STREAM_MAGIC {
        return Err(Error::corrupt("this is not a qvol send stream"));
    }
    let version = get_u32(&pre, 8);
    if version != STREAM_VERSION && version != STREAM_VERSION_UNITS {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the stream has version {version}; this build reads versions {STREAM_VERSION} \
                 and {STREAM_VERSION_UNITS}"
            ),
        ));
    }
    let flags = get_u32(&pre, 12);
    if flags & !FLAG_INCREMENTAL != 0 {
        return Err(Error::corrupt("the stream has unknown flags"));
    }
    let base = (flags & FLAG_INCREMENTAL != 0).then(|| get_array(&pre, 16));
    let mut header_area = vec![0u8; HEADER_AREA_LEN];
    h.take(&mut header_area)?;
    // Version 2 exactly for a volume with compression units (FORMAT.md §18.3 rule 4).
    if stream_version(decode_header(&header_area[..BS])?.units()) != version {
        return Err(Error::corrupt(format!(
            "a stream of version {version} does not fit the volume's compression units"
        )));
    }
    decode_keyslots(&header_area[BS..])?;
    let mut entry = vec![0u8; ENTRY_LEN];
    h.take(&mut entry)?;
    let snapshot = decode_table_entry(&entry)?;
    Ok((
        StreamHead {
            header_area,
            snapshot,
            base,
            entry,
        },
        h.hash,
    ))
}

impl Volume {
    /// Refuses a stream this volume cannot take, judging its head only: not a volume
    /// created as version 4, another volume, an entry that fails its MAC, a snapshot the
    /// volume has, a base it lacks, a disk changed since the base (or not empty, for a full
    /// stream) without `force`, another map height. Also on a read-only open, so that a
    /// caller can refuse before opening for writing (a writable open commits). Returns the
    /// base snapshot.
    pub fn check_stream(&self, head: &StreamHead, force: bool) -> Result<Option<Snapshot>> {
        self.check_usable()?;
        if !self.header.portable_nodes() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "this image was not created as format version 4 and cannot receive streams",
            ));
        }
        if head.volume_id() != self.header.volume_id {
            return Err(Error::new(
                ErrorKind::Refused,
                "the stream is of another volume",
            ));
        }
        let sent_units = decode_header(&head.header_area[..BS])?.units();
        if sent_units != self.header.units() {
            return Err(Error::new(
                ErrorKind::Refused,
                "the stream's compression units are not this image's",
            ));
        }
        let keys = self.keys();
        if keys.previous().is_some() {
            return Err(Error::new(
                ErrorKind::Refused,
                "the volume is being re-encrypted: finish that first, then receive",
            ));
        }
        let sent = head.header_info()?.key_epoch;
        if sent != keys.epoch() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "the stream is sealed under key epoch {sent} and this image is at key epoch \
                     {} (one of them was re-encrypted since they parted): receive a full stream \
                     into a new image instead",
                    keys.epoch()
                ),
            ));
        }
        let snap = &head.snapshot;
        if blake3::Hash::from(entry_mac(&self.keys(), snap))
            != blake3::Hash::from(get_array::<32>(&head.entry, crate::snapshot::E_MAC))
        {
            return Err(Error::integrity(
                "the stream's snapshot entry fails its MAC: the stream was changed or is not of this volume",
            ));
        }
        let list = self.snaps.lock().list.clone();
        if list
            .iter()
            .any(|s| s.guid == snap.guid || s.name == snap.name)
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the volume already has a snapshot named {:?} (or this one)",
                    snap.name
                ),
            ));
        }
        let base =
            match head.base {
                None => None,
                Some(guid) => Some(list.iter().find(|s| s.guid == guid).cloned().ok_or_else(
                    || {
                        Error::new(
                            ErrorKind::Refused,
                            "the stream is incremental from a snapshot this volume does not have",
                        )
                    },
                )?),
            };
        let (live, live_height) = {
            let sb = self.superblock();
            (sb.map_root, sb.map_height)
        };
        // Uncommitted changes (log records a read-only open replayed) are changes too.
        let unchanged = !self.map.is_dirty()
            && match &base {
                Some(b) => self.same_map((live, live_height), (b.root, b.map_height))?,
                None => live.pbn == 0,
            };
        if !unchanged && !force {
            return Err(Error::new(
                ErrorKind::Refused,
                "the volume changed since the stream's base (or is not empty): revert it first, \
                 or force the receive to discard those changes",
            ));
        }
        // A map taller than this image's is fine (a shrink keeps the height; the live map
        // grows to it), a disk larger than this one is not: its data past this end would be
        // hidden here and come back if this image grew.
        if head.create_options()?.size > self.size() {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "the stream is of a disk larger than this one ({} bytes): resize it to that \
                     size first",
                    head.create_options()?.size
                ),
            ));
        }
        if list.len() >= crate::snapshot::MAX_SNAPSHOTS {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "a volume has at most {} snapshots; delete one first",
                    crate::snapshot::MAX_SNAPSHOTS
                ),
            ));
        }
        Ok(base)
    }

    /// Receives the stream whose head is `head` (read by [`read_stream_head`], with the hash
    /// state it returned) from `r`: builds the snapshot it carries, sharing what its base
    /// holds, checks every node and data block against the MACs, and makes the live disk its
    /// content. The live disk must not have changed since the base snapshot (or since the
    /// volume was created, for a full stream), unless `force` discards those changes. On
    /// any error nothing of the stream becomes reachable and the volume must be reopened.
    pub fn receive(
        &self,
        head: &StreamHead,
        hash: blake3::Hasher,
        r: &mut dyn Read,
        force: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Snapshot> {
        self.check_usable()?;
        let _gate = self.exclusive();
        self.commit_locked(false)?;
        let base = self.check_stream(head, force)?;
        let mut snap = head.snapshot.clone();
        let mut rx = Receiver {
            vol: self,
            r: Hashed { inner: r, hash },
            birth: self.snaps.epoch(),
            nodes: 0,
            data: 0,
            progress,
        };
        let result = rx.node(
            snap.map_height,
            0,
            snap.root.pmac,
            base.as_ref().map(|b| (b.root, b.map_height)),
        );
        let root = match result.and_then(|root| rx.finish().map(|()| root)) {
            Ok(root) => root,
            // Blocks were allocated in memory only; nothing refers to them on disk.
            Err(e) => return Err(self.fail(e)),
        };
        snap.root = root;
        self.install_received(snap).map_err(|e| self.fail(e))
    }
}

struct Receiver<'a, 'r> {
    vol: &'a Volume,
    r: Hashed<'r>,
    birth: u32,
    nodes: u64,
    data: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl Receiver<'_, '_> {
    fn bad(&self, what: String) -> Error {
        Error::integrity(format!(
            "the stream is damaged, reordered or forged: {what}"
        ))
    }

    /// Builds node (`level`, `index`), whose portable MAC must be `pmac`: the base's copy if
    /// it has the same, else the next record of the stream.
    fn node(
        &mut self,
        level: u8,
        index: u64,
        pmac: [u8; 16],
        base: Option<(NodePtr, u8)>,
    ) -> Result<NodePtr> {
        if same_subtree(base, level, &pmac) {
            return Ok(base.map(|(b, _)| b).unwrap_or_default());
        }
        // An absent subtree (only a root can be: a snapshot of a disk nothing was written
        // to) has a zero portable MAC, which no node has but with probability 2^-128; the
        // sender sends no record for it. The entry MAC vouches for the root's.
        if pmac == [0; 16] {
            return Ok(NodePtr::default());
        }
        let vol = self.vol;
        let st = &*vol.storage;
        let keys_now = vol.keys();
        let keys = &*keys_now;
        let mut kind = [0u8; 1];
        self.r.take(&mut kind)?;
        let mut head = [0u8; 9];
        self.r.take(&mut head)?;
        let (l, i) = (head[0], get_u64(&head, 1));
        if kind[0] != REC_NODE || l != level || i != index {
            return Err(self.bad(format!("expected map node {index} at level {level}")));
        }
        let mut page = zero_page();
        self.r.take(&mut page[..])?;
        if blake3::Hash::from(pad(node_pmac(keys, TreeKind::Map, level, index, &page[..])))
            != blake3::Hash::from(pad(pmac))
        {
            return Err(self.bad(format!("map node {index} at level {level} fails its MAC")));
        }
        decode_map_node(&page[..], level)?;
        self.nodes += 1;
        let base_page = match base {
            Some((b, l)) if l == level && b.pbn != 0 => {
                Some(read_node(st, keys, TreeKind::Map, level, index, &b)?)
            }
            _ => None,
        };
        if level == 0 {
            crate::group::check_groups(&page[..], vol.header.units())?;
        }
        // Units received (or found in the base) for this leaf, by group (one unit a group:
        // `check_groups`); never by the sender's pbn, which no MAC covers.
        let mut units: Vec<(usize, LeafEntry)> = Vec::new();
        for k in 0..FANOUT as usize {
            if level == 0 {
                let e = LeafEntry::decode(&page[..], k)?;
                if e.pbn == 0 {
                    continue;
                }
                if e.k > 0 {
                    let lbn = index * FANOUT + k as u64;
                    let group = group_of(vol.header.units(), k);
                    let local = match units.iter().find(|(g, _)| *g == group.start) {
                        Some((_, local)) => *local,
                        None => {
                            let local = match base_unit(base_page.as_ref(), group.clone(), &e)? {
                                Some(b) => b,
                                None => self.unit(lbn - (k - group.start) as u64, e)?,
                            };
                            units.push((group.start, local));
                            local
                        }
                    };
                    local.encode(&mut page[..], k);
                    continue;
                }
                let lbn = index * FANOUT + k as u64;
                let be = match &base_page {
                    Some(bp) => LeafEntry::decode(&bp[..], k)?,
                    None => LeafEntry::default(),
                };
                let local = if same_data(&be, &e) {
                    be
                } else {
                    self.data_block(lbn, e)?
                };
                local.encode(&mut page[..], k);
            } else {
                let child = decode_interior_entry(&page[..], k)?;
                if child.pbn == 0 {
                    continue;
                }
                let b = child_base(base, base_page.as_deref(), level, k)?;
                let local = self.node(level - 1, index * FANOUT + k as u64, child.pmac, b)?;
                encode_interior_entry(&mut page[..], k, &local);
            }
        }
        let pbn = vol.alloc.lock().alloc(st, keys, 1)?[0];
        st.write_all_at(&page[..], pbn * BLOCK_SIZE)
            .map_err(|e| Error::io("cannot write a received map node", e))?;
        Ok(NodePtr {
            pbn,
            mac: node_mac(keys, TreeKind::Map, level, index, &page[..]),
            birth: self.birth,
            pmac,
        })
    }

    /// Reads the data record of `lbn`, checks it against `e` and stores it.
    fn data_block(&mut self, lbn: u64, mut e: LeafEntry) -> Result<LeafEntry> {
        let vol = self.vol;
        let st = &*vol.storage;
        let mut head = [0u8; 9];
        self.r.take(&mut head)?;
        if head[0] != REC_DATA || get_u64(&head, 1) != lbn {
            return Err(self.bad(format!("expected the data of logical block {lbn}")));
        }
        let mut block = vec![0u8; BS];
        self.r.take(&mut block)?;
        let mut plain = block.clone();
        if open_block(&vol.keys(), lbn, &e, &mut plain).is_err() {
            return Err(self.bad(format!("the data of logical block {lbn} fails its tag")));
        }
        drop(plain);
        e.pbn = vol.alloc.lock().alloc(st, &vol.keys(), 1)?[0];
        e.birth = self.birth;
        st.write_all_at(&block, e.pbn * BLOCK_SIZE)
            .map_err(|err| Error::io("cannot write a received data block", err))?;
        self.data += 1;
        (self.progress)(self.data * BLOCK_SIZE);
        Ok(e)
    }

    /// Reads the unit record of the group from `first`, checks it against `e` by every rule
    /// of FORMAT.md §18.2 and stores it in `k` contiguous blocks.
    fn unit(&mut self, first: u64, mut e: LeafEntry) -> Result<LeafEntry> {
        let vol = self.vol;
        let st = &*vol.storage;
        let mut head = [0u8; 10];
        self.r.take(&mut head)?;
        if head[0] != REC_UNIT || get_u64(&head, 1) != first || head[9] != e.k {
            return Err(self.bad(format!(
                "expected the compressed unit of logical block {first}"
            )));
        }
        let k = u64::from(e.k);
        let mut sealed = vec![0u8; usize::from(e.k) * BS];
        self.r.take(&mut sealed)?;
        let log2_n = vol.header.units().unwrap_or(0);
        let mut opened = zeroize::Zeroizing::new(sealed.clone());
        let mut group = crate::group::group_buffer(log2_n);
        if crate::group::open_entry_unit(&vol.keys(), log2_n, first, &e, &mut opened, &mut group)
            .is_err()
        {
            return Err(self.bad(format!(
                "the compressed unit of logical block {first} does not open"
            )));
        }
        e.pbn = vol.alloc.lock().alloc_run_anywhere(st, &vol.keys(), k)?;
        e.birth = self.birth;
        st.write_all_at(&sealed, e.pbn * BLOCK_SIZE)
            .map_err(|err| Error::io("cannot write a received compressed unit", err))?;
        self.data += 1;
        (self.progress)(self.data * BLOCK_SIZE);
        Ok(e)
    }

    /// Reads the end record and checks the counts and the stream's hash.
    fn finish(&mut self) -> Result<()> {
        let mut end = [0u8; 17];
        self.r.take(&mut end)?;
        if end[0] != REC_END || get_u64(&end, 1) != self.nodes || get_u64(&end, 9) != self.data {
            return Err(self.bad("the end record does not match what came before".into()));
        }
        let expected = self.r.hash.finalize();
        let mut digest = [0u8; 32];
        self.r
            .inner
            .read_exact(&mut digest)
            .map_err(|_| self.bad("the stream ends before its checksum".into()))?;
        if expected != blake3::Hash::from(digest) {
            return Err(self.bad("its checksum does not match".into()));
        }
        let mut extra = [0u8; 1];
        if matches!(self.r.inner.read(&mut extra), Ok(n) if n > 0) {
            return Err(self.bad("there are bytes after its end".into()));
        }
        Ok(())
    }
}

fn pad(p: [u8; 16]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&p);
    out
}
