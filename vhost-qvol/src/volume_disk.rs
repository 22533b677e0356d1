//! `qvol_core::Volume` as the backend's [`Disk`].

use qvol_core::{ErrorKind, Volume};

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

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Vec<Result<(), DiskError>> {
        Volume::read_many_at(self, reads)
            .into_iter()
            .map(|r| r.map_err(|e| convert(&e)))
            .collect()
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

    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<qvol_core::Extent>, DiskError> {
        Volume::allocation(self, offset, len, max_extents).map_err(|e| convert(&e))
    }
}
