//! [`Chunked`]: a byte image in 4 KiB copy-on-write chunks, so that copies of a large,
//! mostly unchanged image (the crash model keeps several) cost a pointer per chunk, and
//! never-written chunks cost nothing.

use std::io;
use std::sync::Arc;

use super::{range_end, read_past_end};

const CHUNK: usize = 4096;

/// A growable byte image; clones share chunks until one side writes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chunked {
    len: usize,
    /// `None`: the chunk reads as zeros.
    chunks: Vec<Option<Arc<[u8; CHUNK]>>>,
}

impl Chunked {
    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        let mut c = Chunked::default();
        // Cannot fail: the range is in memory already.
        let _ = c.write(bytes, 0);
        c
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        for (i, chunk) in self.chunks.iter().enumerate() {
            if let Some(c) = chunk {
                let start = i * CHUNK;
                let end = (start + CHUNK).min(self.len);
                out[start..end].copy_from_slice(&c[..end - start]);
            }
        }
        out
    }

    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = range_end(offset, buf.len())?;
        if end > self.len {
            return Err(read_past_end(offset, buf.len(), self.len));
        }
        let mut pos = end - buf.len();
        let mut done = 0;
        while done < buf.len() {
            let (i, within) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - within).min(buf.len() - done);
            match &self.chunks[i] {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = range_end(offset, buf.len())?;
        if end > self.len {
            self.resize(end);
        }
        let mut pos = end - buf.len();
        let mut done = 0;
        while done < buf.len() {
            let (i, within) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - within).min(buf.len() - done);
            let chunk = self.chunks[i].get_or_insert_with(|| Arc::new([0u8; CHUNK]));
            Arc::make_mut(chunk)[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
            pos += n;
        }
        Ok(())
    }

    /// Zeros `offset..offset + len` clamped to the length.
    pub(crate) fn punch(&mut self, offset: u64, len: u64) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len);
        let end = usize::try_from(offset.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(self.len);
        let mut pos = start;
        while pos < end {
            let (i, within) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - within).min(end - pos);
            if n == CHUNK {
                self.chunks[i] = None;
            } else if let Some(c) = &mut self.chunks[i] {
                Arc::make_mut(c)[within..within + n].fill(0);
            }
            pos += n;
        }
    }

    pub(crate) fn set_len(&mut self, len: u64) -> io::Result<()> {
        let len = range_end(len, 0)?;
        self.resize(len);
        Ok(())
    }

    fn resize(&mut self, len: usize) {
        if len < self.len {
            // Zero the tail of the last kept chunk, so that growing again reads zeros.
            let keep = len.div_ceil(CHUNK);
            self.chunks.truncate(keep);
            if len % CHUNK != 0 {
                if let Some(Some(c)) = self.chunks.last_mut() {
                    Arc::make_mut(c)[len % CHUNK..].fill(0);
                }
            }
        } else {
            self.chunks.resize(len.div_ceil(CHUNK), None);
        }
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_vec() {
        let mut c = Chunked::default();
        let mut v: Vec<u8> = Vec::new();
        let ops: [(u64, usize, u8); 6] = [
            (10, 5000, 1),
            (4090, 20, 2),
            (0, 3, 3),
            (9000, 4096, 4),
            (8192, 1, 5),
            (100, 12000, 6),
        ];
        for (off, len, val) in ops {
            let data = vec![val; len];
            c.write(&data, off).unwrap();
            crate::storage::mem::write_vec(&mut v, &data, off).unwrap();
            assert_eq!(c.to_vec(), v);
        }
        c.punch(50, 9000);
        crate::storage::mem::punch_vec(&mut v, 50, 9000);
        assert_eq!(c.to_vec(), v);
        c.set_len(5000).unwrap();
        c.set_len(20000).unwrap();
        v.truncate(5000);
        v.resize(20000, 0);
        assert_eq!(c.to_vec(), v);
        let mut buf = vec![9u8; 7000];
        c.read(&mut buf, 3000).unwrap();
        assert_eq!(buf, v[3000..10000]);
        assert!(c.read(&mut buf, 15000).is_err());
    }

    #[test]
    fn clones_share_until_written() {
        let mut a = Chunked::from_bytes(&[1u8; 3 * CHUNK]);
        let b = a.clone();
        a.write(&[2u8], CHUNK as u64).unwrap();
        assert_eq!(b.to_vec(), vec![1u8; 3 * CHUNK]);
        assert_eq!(a.to_vec()[CHUNK], 2);
        assert!(Arc::ptr_eq(
            a.chunks[0].as_ref().unwrap(),
            b.chunks[0].as_ref().unwrap()
        ));
    }
}
