//! The write-ahead log (docs/FORMAT.md §9): 128-byte MAC'd records of map updates, written
//! before a write is acknowledged, replayed at open.

use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::layout::*;
use crate::node::LeafEntry;
use crate::storage::Storage;
use crate::subkeys::Subkeys;

const KIND_MAP: u8 = 1;
const KIND_UNMAP: u8 = 2;
const OFF_MAC: usize = 96;

/// What a record does to the block map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Logical block `lbn` now has `entry` (kind 1).
    Map {
        /// Logical block.
        lbn: u64,
        /// Its new leaf entry (pbn != 0).
        entry: LeafEntry,
    },
    /// Logical blocks `lbn .. lbn + count` are unallocated (kind 2; within one leaf).
    Unmap {
        /// First logical block.
        lbn: u64,
        /// Number of blocks, 1..=64.
        count: u64,
    },
}

/// A decoded log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// The log epoch (the generation of the superblock it extends).
    pub epoch: u64,
    /// Sequence number = slot index.
    pub seq: u64,
    /// Every slot below this was synced when the record was written.
    pub durable: u64,
    /// The map update.
    pub op: LogOp,
}

impl LogRecord {
    /// Encodes and MACs the record.
    pub(crate) fn encode(&self, keys: &Subkeys, out: &mut [u8]) {
        let b = &mut out[..LOG_RECORD_LEN];
        b.fill(0);
        put_u64(b, 8, self.epoch);
        put_u64(b, 16, self.seq);
        put_u64(b, 24, self.durable);
        match self.op {
            LogOp::Map { lbn, entry } => {
                b[0] = KIND_MAP;
                put_u32(b, 4, entry.key_epoch);
                put_u64(b, 32, lbn);
                put_u64(b, 40, entry.pbn);
                b[48..80].copy_from_slice(&entry.nonce);
                b[80..96].copy_from_slice(&entry.tag);
            }
            LogOp::Unmap { lbn, count } => {
                b[0] = KIND_UNMAP;
                put_u64(b, 32, lbn);
                put_u64(b, 40, count);
            }
        }
        let mac = mac(keys, &b[..OFF_MAC]);
        b[OFF_MAC..].copy_from_slice(&mac);
    }

    /// Parses a record's fields without checking its MAC (for fuzzing and diagnostics).
    pub fn decode(b: &[u8]) -> Result<LogRecord> {
        if b.len() < LOG_RECORD_LEN {
            return Err(Error::corrupt("a log record is 128 bytes"));
        }
        if b[1..4] != [0, 0, 0] {
            return Err(Error::corrupt(
                "the log record's reserved bytes are not zero",
            ));
        }
        let lbn = get_u64(b, 32);
        let op = match b[0] {
            KIND_MAP => {
                let entry = LeafEntry {
                    pbn: get_u64(b, 40),
                    key_epoch: get_u32(b, 4),
                    nonce: get_array(b, 48),
                    tag: get_array(b, 80),
                };
                if !(MIN_DATA_START_BLOCK..MAX_PBN).contains(&entry.pbn) {
                    return Err(Error::corrupt(
                        "a log record maps a block outside the data region",
                    ));
                }
                LogOp::Map { lbn, entry }
            }
            KIND_UNMAP => {
                let count = get_u64(b, 40);
                let in_one_leaf = count >= 1 && count <= FANOUT - lbn % FANOUT;
                if !in_one_leaf || b[4..8] != [0; 4] || b[48..96].iter().any(|&x| x != 0) {
                    return Err(Error::corrupt("an unmap log record has an invalid range"));
                }
                LogOp::Unmap { lbn, count }
            }
            kind => return Err(Error::corrupt(format!("unknown log record kind {kind}"))),
        };
        let rec = LogRecord {
            epoch: get_u64(b, 8),
            seq: get_u64(b, 16),
            durable: get_u64(b, 24),
            op,
        };
        if rec.durable > rec.seq || rec.seq >= MAX_LOG_SLOTS {
            return Err(Error::corrupt(
                "a log record has an invalid sequence number",
            ));
        }
        Ok(rec)
    }

    /// Parses and verifies a record; `None` for anything that is not a valid record.
    pub(crate) fn decode_verified(b: &[u8], keys: &Subkeys) -> Option<LogRecord> {
        let expected = blake3::Hash::from(mac(keys, &b[..OFF_MAC]));
        if expected != blake3::Hash::from(get_array::<32>(b, OFF_MAC)) {
            return None;
        }
        LogRecord::decode(b).ok()
    }
}

fn mac(keys: &Subkeys, body: &[u8]) -> [u8; 32] {
    let mut h = keys.log_mac();
    h.update(b"qvol-log-v1");
    h.update(keys.volume_id());
    h.update(body);
    *h.finalize().as_bytes()
}

/// The valid records of one epoch and the durable mark, after the tamper check of §9.
#[derive(Debug)]
pub(crate) struct ScannedLog {
    pub(crate) records: Vec<LogRecord>,
    pub(crate) durable: u64,
}

/// Scans the whole log region (`log`, all its slots) for `epoch`. Fails with `Integrity` if a
/// slot below the durable mark is invalid (a synced record was removed or altered).
pub(crate) fn scan(log: &[u8], epoch: u64, keys: &Subkeys) -> Result<ScannedLog> {
    let mut records = Vec::new();
    let mut valid = vec![false; log.len() / LOG_RECORD_LEN];
    let mut durable = 0;
    for (slot, chunk) in log.chunks_exact(LOG_RECORD_LEN).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        if let Some(rec) = LogRecord::decode_verified(chunk, keys) {
            if rec.epoch == epoch && rec.seq == slot as u64 {
                valid[slot] = true;
                durable = durable.max(rec.durable);
                records.push(rec);
            }
        }
    }
    if let Some(hole) = valid[..durable as usize].iter().position(|v| !v) {
        return Err(Error::integrity(format!(
            "log slot {hole} is missing or altered although a later record says it was synced"
        )));
    }
    Ok(ScannedLog { records, durable })
}

/// Reads the whole log region of an image with `regions`.
pub(crate) fn read_log(storage: &dyn Storage, regions: Regions) -> Result<Vec<u8>> {
    let mut log = vec![0u8; regions.log_len as usize];
    storage
        .read_exact_at(&mut log, LOG_OFFSET)
        .map_err(|e| Error::io("cannot read the write-ahead log", e))?;
    Ok(log)
}

/// The log's tail, reservations and durable mark.
#[derive(Debug)]
pub(crate) struct Wal {
    state: Mutex<WalState>,
    /// Slots in the log region.
    slots: u64,
}

#[derive(Debug)]
struct WalState {
    epoch: u64,
    next: u64,
    reserved: u64,
    durable: u64,
    /// First slots of appends whose slots are assigned but whose `pwrite` has not returned.
    writing: Vec<u64>,
}

impl Wal {
    /// An empty log of `slots` slots and `epoch` whose next record goes to slot `next`.
    pub(crate) fn new(slots: u64, epoch: u64, next: u64) -> Self {
        Wal {
            slots,
            state: Mutex::new(WalState {
                epoch,
                next,
                reserved: 0,
                durable: 0,
                writing: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves room for `n` records; false if the log is too full (commit first).
    pub(crate) fn try_reserve(&self, n: u64) -> bool {
        let mut s = self.lock();
        if s.next + s.reserved + n > self.slots {
            return false;
        }
        s.reserved += n;
        true
    }

    /// Gives back `n` reserved records that were not used.
    pub(crate) fn release(&self, n: u64) {
        let mut s = self.lock();
        s.reserved = s.reserved.saturating_sub(n);
    }

    /// Appends `ops` (taken from an earlier reservation) and writes them to the log region.
    /// Call with the lock of the map leaf they update held, so that records of one block
    /// are in the order of its map updates. Only the slot assignment is under the log's
    /// mutex; the records are MACed and written outside it, so that appends of different
    /// leaves overlap.
    pub(crate) fn append(
        &self,
        storage: &dyn Storage,
        keys: &Subkeys,
        ops: &[LogOp],
    ) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let n = ops.len() as u64;
        let (epoch, first, durable) = {
            let mut s = self.lock();
            if s.next + n > self.slots {
                return Err(Error::new(
                    crate::error::ErrorKind::NoSpace,
                    "the write-ahead log is full (a reservation was not honoured)",
                ));
            }
            let first = s.next;
            s.next += n;
            s.reserved = s.reserved.saturating_sub(n);
            s.writing.push(first);
            (s.epoch, first, s.durable)
        };
        let mut buf = vec![0u8; ops.len() * LOG_RECORD_LEN];
        for (i, op) in ops.iter().enumerate() {
            let rec = LogRecord {
                epoch,
                seq: first + i as u64,
                durable,
                op: *op,
            };
            rec.encode(keys, &mut buf[i * LOG_RECORD_LEN..]);
        }
        let offset = LOG_OFFSET + first * LOG_RECORD_LEN as u64;
        let written = storage.write_all_at(&buf, offset);
        {
            let mut s = self.lock();
            if let Some(k) = s.writing.iter().position(|&w| w == first) {
                s.writing.swap_remove(k);
            }
        }
        written.map_err(|e| {
            Error::io(
                format!("cannot append {n} records to the write-ahead log"),
                e,
            )
        })
    }

    /// Every slot below this is written (its `pwrite` returned): what a sync makes durable.
    pub(crate) fn written(&self) -> u64 {
        let s = self.lock();
        s.writing.iter().copied().min().unwrap_or(s.next)
    }

    /// The slot the next record goes to.
    pub(crate) fn next(&self) -> u64 {
        self.lock().next
    }

    /// Records that every slot below `upto` is durable (after a completed sync).
    pub(crate) fn set_durable(&self, upto: u64) {
        let mut s = self.lock();
        s.durable = s.durable.max(upto.min(s.next));
    }

    /// Starts the empty log of a new epoch (after a commit).
    pub(crate) fn reset(&self, epoch: u64) {
        let mut s = self.lock();
        s.epoch = epoch;
        s.next = 0;
        s.durable = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::VolumeKey;
    use crate::storage::MemStorage;
    use crate::suite::CipherSuite;

    fn keys() -> Subkeys {
        Subkeys::derive(
            &VolumeKey::from_bytes([3; 32]),
            CipherSuite::default(),
            [2; 16],
        )
    }

    fn map_op(lbn: u64) -> LogOp {
        LogOp::Map {
            lbn,
            entry: LeafEntry {
                pbn: 2000 + lbn,
                key_epoch: 0,
                nonce: [1; 32],
                tag: [2; 16],
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let k = keys();
        for op in [map_op(9), LogOp::Unmap { lbn: 64, count: 64 }] {
            let rec = LogRecord {
                epoch: 3,
                seq: 10,
                durable: 4,
                op,
            };
            let mut b = [0u8; LOG_RECORD_LEN];
            rec.encode(&k, &mut b);
            assert_eq!(LogRecord::decode_verified(&b, &k), Some(rec));
            for i in 0..LOG_RECORD_LEN {
                let mut c = b;
                c[i] ^= 4;
                assert_eq!(LogRecord::decode_verified(&c, &k), None, "byte {i}");
            }
        }
        let bad = LogRecord {
            epoch: 1,
            seq: 1,
            durable: 0,
            op: LogOp::Unmap { lbn: 60, count: 5 },
        };
        let mut b = [0u8; LOG_RECORD_LEN];
        bad.encode(&k, &mut b);
        assert!(
            LogRecord::decode(&b).is_err(),
            "an unmap may not cross a leaf"
        );
    }

    fn log_with(k: &Subkeys, epoch: u64, n: u64, durable_after: u64) -> (MemStorage, Wal) {
        let st = MemStorage::new();
        st.set_len(Regions::V1.data_offset()).unwrap();
        let wal = Wal::new(Regions::V1.log_slots(), epoch, 0);
        for i in 0..n {
            assert!(wal.try_reserve(1));
            if i == durable_after {
                wal.set_durable(i);
            }
            wal.append(&st, k, &[map_op(i)]).unwrap();
        }
        (st, wal)
    }

    #[test]
    fn replay_scan_finds_records_of_the_epoch() {
        let k = keys();
        let (st, wal) = log_with(&k, 5, 10, 6);
        assert_eq!(wal.next(), 10);
        let log = read_log(&st, Regions::V1).unwrap();
        let scanned = scan(&log, 5, &k).unwrap();
        assert_eq!(scanned.records.len(), 10);
        assert_eq!(scanned.durable, 6);
        assert_eq!(
            scan(&log, 6, &k).unwrap().records.len(),
            0,
            "other epochs are stale"
        );
    }

    #[test]
    fn holes_above_the_durable_mark_are_a_crash_below_it_tampering() {
        let k = keys();
        let (st, _) = log_with(&k, 5, 10, 6);
        let zero = [0u8; LOG_RECORD_LEN];
        st.write_all_at(&zero, LOG_OFFSET + 8 * LOG_RECORD_LEN as u64)
            .unwrap();
        let scanned = scan(&read_log(&st, Regions::V1).unwrap(), 5, &k).unwrap();
        assert_eq!(scanned.records.len(), 9);
        st.write_all_at(&zero, LOG_OFFSET + 2 * LOG_RECORD_LEN as u64)
            .unwrap();
        let err = scan(&read_log(&st, Regions::V1).unwrap(), 5, &k).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Integrity);
    }

    /// A storage whose log writes wait until the test lets them go.
    #[derive(Debug)]
    struct Gated {
        inner: MemStorage,
        entered: std::sync::mpsc::SyncSender<()>,
        go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for Gated {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.entered.send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.punch_hole(offset, len)
        }
    }

    #[test]
    fn a_sync_covers_only_appends_whose_write_returned() {
        let k = keys();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(0);
        let (go, go_rx) = std::sync::mpsc::sync_channel(0);
        let st = Gated {
            inner: MemStorage::new(),
            entered: entered_tx,
            go: std::sync::Mutex::new(go_rx),
        };
        st.set_len(Regions::V1.data_offset()).unwrap();
        let wal = Wal::new(Regions::V1.log_slots(), 1, 0);
        assert!(wal.try_reserve(3));
        std::thread::scope(|s| {
            let first = s.spawn(|| wal.append(&st, &k, &[map_op(0), map_op(1)]));
            entered.recv().unwrap();
            // Slots 0 and 1 are assigned, not written: a sync now makes nothing durable.
            assert_eq!(wal.next(), 2);
            assert_eq!(wal.written(), 0);
            let second = s.spawn(|| wal.append(&st, &k, &[map_op(2)]));
            entered.recv().unwrap();
            go.send(()).unwrap();
            go.send(()).unwrap();
            first.join().unwrap().unwrap();
            second.join().unwrap().unwrap();
        });
        assert_eq!(wal.written(), 3);
        let scanned = scan(&read_log(&st.inner, Regions::V1).unwrap(), 1, &k).unwrap();
        assert_eq!(scanned.records.len(), 3);
    }

    #[test]
    fn reservations_bound_the_log() {
        let wal = Wal::new(Regions::V1.log_slots(), 1, Regions::V1.log_slots() - 2);
        assert!(wal.try_reserve(2));
        assert!(!wal.try_reserve(1));
        wal.release(2);
        assert!(wal.try_reserve(1));
    }
}
