//! A regular file's block list: one size word per block, stored right after the inode.
//! The list is decoded on demand, in runs of [`RUN`] blocks kept in the archive's cache,
//! so a file costs memory only for the parts of it being read, whatever size it claims.
//! A run knows where the next one starts, so a sequential reader decodes each word once;
//! a reader that jumps ahead decodes from the nearest cached run before it, and no read
//! reaches past [`MAX_FILE_BLOCKS`], which bounds that work.

use std::sync::Arc;

use crate::cache::ENTRY_OVERHEAD;
use crate::error::{Error, Result};

use super::cached::{CacheKey, Cached};
use super::inode::{FileInfo, MAX_FILE_BLOCKS};
use super::metadata::{MetaPos, MetadataReader};
use super::Archive;

/// Blocks per decoded run: 12 KiB of memory, 128 MiB of file at 128 KiB blocks.
pub const RUN: u64 = 1024;

/// Bit of a block size word that marks data stored uncompressed.
pub(crate) const STORED: u32 = 1 << 24;

/// Consecutive entries of a block list, decoded and checked.
#[derive(Debug)]
pub struct BlockRun {
    /// Image offset of each block.
    offsets: Box<[u64]>,
    /// Size word of each block (on-disk length, and [`STORED`] for uncompressed data).
    words: Box<[u32]>,
    /// Where the next run's words are, and the image offset of its first block.
    next_list: MetaPos,
    next_offset: u64,
}

impl BlockRun {
    pub(crate) fn weight(&self) -> u64 {
        (self.offsets.len() * 12) as u64 + std::mem::size_of::<Self>() as u64 + ENTRY_OVERHEAD
    }
}

/// Where one block of a file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    /// Image offset.
    pub offset: u64,
    /// Size word: on-disk length in the low 24 bits, [`STORED`] for uncompressed data; an
    /// on-disk length of 0 is a sparse block.
    pub word: u32,
}

impl BlockLocation {
    /// Bytes on disk (0 for a sparse block).
    pub fn disk_len(self) -> u32 {
        self.word & !STORED
    }
}

impl Archive {
    /// Where block `index` of `file` is stored (`index` < `file.block_count`).
    pub fn block_location(&self, file: &FileInfo, index: u64) -> Result<BlockLocation> {
        if index >= file.block_count {
            return Err(Error::corrupt(format!(
                "block {index} of a file of {} stored blocks",
                file.block_count
            )));
        }
        if index >= MAX_FILE_BLOCKS {
            return Err(Error::Unsupported(format!(
                "block {index} of a file of {} bytes: sifuse reads the first \
                 {MAX_FILE_BLOCKS} blocks of a file",
                file.file_size
            )));
        }
        let run = self.block_run(file, index / RUN)?;
        let i = (index % RUN) as usize;
        Ok(BlockLocation {
            offset: run.offsets[i],
            word: run.words[i],
        })
    }

    fn block_run(&self, file: &FileInfo, run: u64) -> Result<Arc<BlockRun>> {
        let key = |run| CacheKey::BlockRun {
            list: file.list,
            run,
        };
        if let Some(hit) = self.cache.get(&key(run)) {
            return hit.into_block_run();
        }
        // Decoding starts where the nearest cached run before this one ends, or at the
        // start of the list.
        let mut from = run;
        let mut start = (file.list, file.blocks_start);
        while from > 0 {
            if let Some(prev) = self.cache.get(&key(from - 1)) {
                let prev = prev.into_block_run()?;
                start = (prev.next_list, prev.next_offset);
                break;
            }
            from -= 1;
        }
        let mut decoded = None;
        for r in from..=run {
            let d = Arc::new(self.decode_run(file, r, start)?);
            start = (d.next_list, d.next_offset);
            self.cache.insert(key(r), Cached::BlockRun(d.clone()));
            decoded = Some(d);
        }
        decoded.ok_or_else(|| Error::corrupt("empty block list run"))
    }

    /// Decode run `run` of `file`'s list, whose words start at `list` and whose first block
    /// is at image offset `offset`.
    fn decode_run(
        &self,
        file: &FileInfo,
        run: u64,
        (list, offset): (MetaPos, u64),
    ) -> Result<BlockRun> {
        let first = run * RUN;
        let n = (file.block_count - first).min(RUN) as usize;
        let bs = u64::from(self.sb.block_size);
        let mut r = MetadataReader::new(self, list);
        let mut offsets = Vec::with_capacity(n);
        let mut words = Vec::with_capacity(n);
        let mut pos = offset;
        let mut raw = [0u8; 4 * 256];
        let mut left = n;
        while left > 0 {
            let k = left.min(256);
            r.read(&mut raw[..4 * k])?;
            for c in raw[..4 * k].chunks_exact(4) {
                let word = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                let on_disk = u64::from(word & 0x00ff_ffff);
                if word >> 25 != 0 || on_disk > bs {
                    return Err(Error::corrupt(format!(
                        "a file's block list (at inode table byte {}) has an impossible \
                         block size word {word:#x}",
                        file.list.block
                    )));
                }
                offsets.push(pos);
                words.push(word);
                pos = pos
                    .checked_add(on_disk)
                    .filter(|&p| p <= self.sb.bytes_used)
                    .ok_or_else(|| {
                        Error::corrupt(format!(
                            "a file's data (block list at inode table byte {}) runs past \
                             the end of the image",
                            file.list.block
                        ))
                    })?;
            }
            left -= k;
        }
        Ok(BlockRun {
            offsets: offsets.into(),
            words: words.into(),
            next_list: r.position(),
            next_offset: pos,
        })
    }
}
