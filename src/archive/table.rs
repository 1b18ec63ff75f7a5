//! Lookup tables (id, fragment, export, xattr id): fixed-size entries packed into metadata
//! blocks, found through an index of block offsets. The index is read on first use, so
//! opening an image costs the same whatever the table sizes.

use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::metadata::{MetaPos, MetadataReader, METADATA_SIZE};
use super::Archive;

/// One lookup table.
#[derive(Debug)]
pub struct LookupTable {
    name: &'static str,
    /// Image offset of the index (an array of u64 block offsets).
    index_start: u64,
    count: u64,
    entry_size: u64,
    index: OnceLock<Vec<u64>>,
}

impl LookupTable {
    pub fn new(name: &'static str, index_start: u64, count: u64, entry_size: u64) -> Self {
        LookupTable {
            name,
            index_start,
            count,
            entry_size,
            index: OnceLock::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True when the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn index(&self, archive: &Archive) -> Result<&[u64]> {
        if let Some(i) = self.index.get() {
            return Ok(i);
        }
        let bytes = self.count * self.entry_size;
        let blocks = bytes.div_ceil(METADATA_SIZE as u64);
        let len = blocks * 8;
        let end = archive.sb.bytes_used;
        if self.index_start.checked_add(len).is_none_or(|e| e > end) {
            return Err(Error::corrupt(format!(
                "{} index ({blocks} entries at byte {}) runs past the end of the image",
                self.name, self.index_start
            )));
        }
        let mut raw = vec![0u8; len as usize];
        archive.read_at(&mut raw, self.index_start)?;
        let index: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(bad) = index.iter().find(|&&p| p >= end || p < 96) {
            return Err(Error::corrupt(format!(
                "{} index points to byte {bad}, outside the image",
                self.name
            )));
        }
        Ok(self.index.get_or_init(|| index))
    }

    /// Read entry `i` into `out` (`out.len()` == entry size).
    pub fn read_entry(&self, archive: &Archive, i: u64, out: &mut [u8]) -> Result<()> {
        if i >= self.count {
            return Err(Error::corrupt(format!(
                "{} entry {i} requested, but the table has {}",
                self.name, self.count
            )));
        }
        let byte = i * self.entry_size;
        let block = (byte / METADATA_SIZE as u64) as usize;
        let index = self.index(archive)?;
        let pos = MetaPos {
            block: index[block],
            offset: (byte % METADATA_SIZE as u64) as usize,
        };
        MetadataReader::new(archive, pos).read(out)
    }
}
