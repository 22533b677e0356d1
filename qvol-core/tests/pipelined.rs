//! Pipelined commits (format version 6, FORMAT.md §9.1 and §10.1) caught in flight: what a
//! flush during one promises, against kill -9, an attacker and a failed sync.

mod common;

use std::sync::Arc;

use qvol_core::storage::{MemStorage, Storage};
use qvol_core::{CipherSuite, CreateOptions, Volume};

fn keyslots() -> Vec<Vec<u8>> {
    vec![b"a keyslot".to_vec()]
}

fn golden_key() -> qvol_core::VolumeKey {
    common::key(1)
}

/// A storage whose commit thread ("qvol-commit") blocks before it writes a superblock while
/// armed: a pipelined commit caught after its first sync, its superblock not written yet.
/// (Blocking inside the sync would also block every flush: syncs of a volume never overlap.)
#[derive(Debug, Default)]
struct HoldCommit {
    armed: std::sync::atomic::AtomicBool,
    gate: common::Gate,
}

impl HoldCommit {
    /// `inner` with this hold on its superblock writes.
    fn over(self: &Arc<Self>, inner: Arc<MemStorage>) -> Arc<common::Hooked> {
        let hold = self.clone();
        common::Hooked::new(inner, false, move |_, offset| {
            if hold.armed.load(std::sync::atomic::Ordering::SeqCst)
                && std::thread::current().name() == Some("qvol-commit")
                && (9 * 4096..11 * 4096).contains(&offset)
            {
                hold.gate.wait();
            }
            true
        })
    }
}

/// FORMAT.md §12: "the durable mark of §9 is on the file as soon as the flush returns:
/// zeroing slots below it is `Integrity`". A flush that runs while a pipelined commit is in
/// flight and before the new epoch has a record writes no mark at all, so the attacker can
/// drop the flushed record of the committed epoch unnoticed.
#[test]
fn a_flush_during_a_pipelined_commit_marks_the_epoch_it_covers() {
    let mem = Arc::new(MemStorage::new());
    let hold = Arc::new(HoldCommit::default());
    let vol = Volume::create(
        hold.over(mem.clone()),
        CreateOptions {
            key_epoch: 0,
            size: 64 << 20,
            suite: CipherSuite::XChaCha20Poly1305,
            name: "t".into(),
            volume_id: [7; 16],
            keyslots: keyslots(),
            compression: None,
        },
        &golden_key(),
    )
    .unwrap();
    let w1 = common::pattern(1, 4096);
    let w2 = common::pattern(2, 4096);
    vol.write_at(0, &w1).unwrap(); // slot 0
    vol.flush().unwrap(); // mark: D = 1
    vol.write_at(4096, &w2).unwrap(); // slot 1
    let g = vol.commit_point().generation;
    hold.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    vol.commit_async().unwrap(); // its thread waits before writing the superblock
    vol.flush().unwrap(); // w2 is flushed: synced, the call returned
    let honest = mem.to_vec(); // kill -9 now
    let mut tampered = honest.clone();
    // 4 MiB log for 64 MiB: 32768 slots, 16384 per area; epoch g in area g % 2.
    let slot = (g % 2) as usize * 16384 + 1;
    let off = 0x10000 + slot * 128;
    tampered[off..off + 128].fill(0);
    hold.gate.open();
    drop(vol);
    let read = |image: Vec<u8>| -> qvol_core::Result<Vec<u8>> {
        let v = Volume::open(Arc::new(MemStorage::from_bytes(image)), &golden_key(), true)?;
        let mut b = vec![0u8; 4096];
        v.read_at(4096, &mut b)?;
        Ok(b)
    };
    assert_eq!(read(honest).unwrap(), w2, "kill -9 keeps w2");
    match read(tampered) {
        Err(e) if e.kind() == qvol_core::ErrorKind::Integrity => {}
        Ok(b) => assert!(
            b == w2,
            "a flushed write was dropped silently (reads zeros: {})",
            b.iter().all(|&x| x == 0)
        ),
        Err(e) => panic!("{e}"),
    }
}

/// A storage with a durable image apart from the live one. The first sync of the commit
/// thread while armed fails the way Linux reports a writeback error: the dirty data is
/// dropped (never reaches the media) and only that one fsync sees the error; it returns
/// only once the test lets it (the commit thread descheduled right after its failed sync).
#[derive(Debug)]
struct Lossy {
    live: MemStorage,
    st: std::sync::Mutex<LossyState>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct LossyState {
    durable: Vec<u8>,
    dirty: Vec<(u64, Vec<u8>)>,
    armed: bool,
    dropped: bool,
}

impl Lossy {
    fn record(&self, off: u64, data: Vec<u8>) {
        self.st.lock().unwrap().dirty.push((off, data));
    }
    fn durable_image(&self) -> Vec<u8> {
        self.st.lock().unwrap().durable.clone()
    }
}

impl Storage for Lossy {
    fn len(&self) -> std::io::Result<u64> {
        self.live.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.live.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.live.write_all_at(buf, offset)?;
        self.record(offset, buf.to_vec());
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.live.set_len(len)?;
        self.record(u64::MAX, len.to_le_bytes().to_vec());
        Ok(())
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let mut s = self.st.lock().unwrap();
        if s.armed && !s.dropped && std::thread::current().name() == Some("qvol-commit") {
            s.dirty.clear(); // writeback failed: the pages are dropped
            s.dropped = true;
            self.cv.notify_all();
            drop(s);
            // The commit thread is descheduled between its failed sync and noting it: a
            // flush that syncs meanwhile must not report success.
            std::thread::sleep(std::time::Duration::from_millis(300));
            return Err(std::io::Error::other("EIO (writeback error)"));
        }
        for (off, data) in std::mem::take(&mut s.dirty) {
            if off == u64::MAX {
                let len = u64::from_le_bytes(data.try_into().unwrap()) as usize;
                s.durable.resize(len, 0);
            } else {
                let end = off as usize + data.len();
                if s.durable.len() < end {
                    s.durable.resize(end, 0);
                }
                s.durable[off as usize..end].copy_from_slice(&data);
            }
        }
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.live.punch_hole(offset, len)?;
        let end = (offset + len).min(self.live.len()?);
        if end > offset {
            self.record(offset, vec![0; (end - offset) as usize]);
        }
        Ok(())
    }
}

/// A flush that returns Ok must survive power loss, even when the commit thread's sync
/// failed just before (Linux reports a writeback error to one fsync of the file only).
#[test]
fn a_flush_after_the_commit_threads_failed_sync_is_not_ok() {
    let lossy = Arc::new(Lossy {
        live: MemStorage::new(),
        st: Default::default(),
        cv: Default::default(),
    });
    let vol = Volume::create(
        lossy.clone(),
        CreateOptions {
            key_epoch: 0,
            size: 64 << 20,
            suite: CipherSuite::XChaCha20Poly1305,
            name: "t".into(),
            volume_id: [7; 16],
            keyslots: keyslots(),
            compression: None,
        },
        &golden_key(),
    )
    .unwrap();
    let w = common::pattern(3, 4096);
    vol.write_at(4096, &w).unwrap();
    lossy.st.lock().unwrap().armed = true;
    vol.commit_async().unwrap();
    {
        let mut s = lossy.st.lock().unwrap();
        while !s.dropped {
            s = lossy.cv.wait(s).unwrap();
        }
    }
    let flushed = vol.flush();
    drop(vol);
    if flushed.is_ok() {
        // Power loss now: only what reached the media.
        let image = lossy.durable_image();
        let v = Volume::open(Arc::new(MemStorage::from_bytes(image)), &golden_key(), true)
            .expect("open after power loss");
        let mut b = vec![0u8; 4096];
        v.read_at(4096, &mut b).unwrap();
        assert!(
            b == w,
            "flush returned Ok, yet the write is lost after power loss"
        );
    }
}
