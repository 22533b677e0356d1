//! `qvol_core::Volume` as the backend's [`Disk`].

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use log::{debug, warn};
use qvol_core::{ErrorKind, Volume};
use qvol_keys::UnlockedKeystore;

use crate::disk::{Disk, DiskError, DiskErrorKind};

/// The error and its sources, each said once, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn convert(err: &qvol_core::Error) -> DiskError {
    let kind = match err.kind() {
        ErrorKind::Integrity => DiskErrorKind::Integrity,
        ErrorKind::OutOfRange => DiskErrorKind::OutOfRange,
        ErrorKind::Unaligned => DiskErrorKind::Unaligned,
        ErrorKind::ReadOnly => DiskErrorKind::ReadOnly,
        ErrorKind::Unsupported => DiskErrorKind::Unsupported,
        _ => DiskErrorKind::Io,
    };
    DiskError::new(kind, error_chain(err))
}

impl Disk for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        Volume::read_at(self, offset, buf).map_err(|e| convert(&e))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        Volume::write_at(self, offset, data).map_err(|e| convert(&e))
    }

    fn flush(&self) -> Result<(), DiskError> {
        Volume::flush(self).map_err(|e| convert(&e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        Volume::discard(self, offset, len).map_err(|e| convert(&e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        Volume::write_zeroes(self, offset, len, unmap).map_err(|e| convert(&e))
    }

    fn commit(&self) -> Result<(), DiskError> {
        Volume::commit(self).map_err(|e| convert(&e))
    }
}

/// A volume being served for writing: commits also record the new generation in the
/// keystore, so that a later open can tell if an older copy of the image was put back.
#[derive(Debug)]
pub struct RecordingVolume {
    volume: Volume,
    keystore: UnlockedKeystore,
    volume_id: [u8; 16],
    image: PathBuf,
    /// Serialises commit + record: a disconnect and a SIGTERM may commit at once, and the
    /// keystore writes its record through one temporary file per process.
    record: Mutex<()>,
}

impl RecordingVolume {
    /// Wraps an open, writable volume.
    pub fn new(
        volume: Volume,
        keystore: UnlockedKeystore,
        volume_id: [u8; 16],
        image: PathBuf,
    ) -> Self {
        Self {
            volume,
            keystore,
            volume_id,
            image,
            record: Mutex::new(()),
        }
    }
}

impl Disk for RecordingVolume {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        Disk::read_at(&self.volume, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        Disk::write_at(&self.volume, offset, data)
    }

    fn flush(&self) -> Result<(), DiskError> {
        Disk::flush(&self.volume)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        Disk::discard(&self.volume, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        Disk::write_zeroes(&self.volume, offset, len, unmap)
    }

    fn commit(&self) -> Result<(), DiskError> {
        let _one_at_a_time = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        Disk::commit(&self.volume)?;
        let generation = self.volume.info().generation;
        match crate::open::record_generation(
            &self.keystore,
            &self.image,
            &self.volume_id,
            generation,
        ) {
            Ok(()) => debug!("recorded generation {generation}"),
            // The commit itself succeeded; the record only lags (it never goes down).
            Err(e) => warn!("{e:#}"),
        }
        Ok(())
    }
}
