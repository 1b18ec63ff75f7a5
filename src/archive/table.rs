//! Lookup tables (id, fragment, export, xattr id): fixed-size entries packed into metadata
//! blocks, found through an index of block offsets. The index is read on first use, so
//! opening an image costs the same whatever the table sizes.

use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::metadata::{MetaPos, MetadataReader, METADATA_SIZE};
use super::Archive;

/// Index entries kept in memory, at most (64 KiB, for 64 MiB of table). A larger index
/// (only a hostile count, or an image of hundreds of millions of inodes, needs one) is
/// read one entry at a time instead of being loaded whole.
const MAX_LOADED_INDEX: u64 = 8192;

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

    /// Number of metadata blocks the table spans, once its index is known to lie inside
    /// the image.
    fn blocks(&self, archive: &Archive) -> Result<u64> {
        // count < 2^32 and entry_size <= 16: no overflow.
        let blocks = (self.count * self.entry_size).div_ceil(METADATA_SIZE as u64);
        if self
            .index_start
            .checked_add(blocks * 8)
            .is_none_or(|e| e > archive.sb.bytes_used)
        {
            return Err(Error::corrupt(format!(
                "{} index ({blocks} entries at byte {}) runs past the end of the image",
                self.name, self.index_start
            )));
        }
        Ok(blocks)
    }

    fn check_block_pos(&self, archive: &Archive, pos: u64) -> Result<u64> {
        if pos >= archive.sb.bytes_used || pos < 96 {
            return Err(Error::corrupt(format!(
                "{} index points to byte {pos}, outside the image",
                self.name
            )));
        }
        Ok(pos)
    }

    fn index(&self, archive: &Archive, blocks: u64) -> Result<&[u64]> {
        if let Some(i) = self.index.get() {
            return Ok(i);
        }
        let mut raw = vec![0u8; (blocks * 8) as usize];
        archive.read_at(&mut raw, self.index_start)?;
        let index = raw
            .chunks_exact(8)
            .map(|c| self.check_block_pos(archive, u64::from_le_bytes(c.try_into().expect("8"))))
            .collect::<Result<Vec<u64>>>()?;
        Ok(self.index.get_or_init(|| index))
    }

    /// Image offset of metadata block `block` of the table.
    fn block_pos(&self, archive: &Archive, block: u64) -> Result<u64> {
        let blocks = self.blocks(archive)?;
        if blocks <= MAX_LOADED_INDEX {
            return Ok(self.index(archive, blocks)?[block as usize]);
        }
        let mut raw = [0u8; 8];
        archive.read_at(&mut raw, self.index_start + block * 8)?;
        self.check_block_pos(archive, u64::from_le_bytes(raw))
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
        let pos = MetaPos {
            block: self.block_pos(archive, byte / METADATA_SIZE as u64)?,
            offset: (byte % METADATA_SIZE as u64) as usize,
        };
        MetadataReader::new(archive, pos).read(out)
    }
}
