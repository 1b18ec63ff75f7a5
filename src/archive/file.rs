//! Regular file data: full blocks (compressed, stored or sparse) and the tail kept in a
//! fragment block shared with other files.

use std::cell::RefCell;
use std::sync::Arc;

use crate::cache::{Block, BlockKind};
use crate::error::{Error, Result};

use super::blocks::STORED;
use super::cached::{CacheKey, Cached};
use super::inode::{FileInfo, Inode, InodeRef};
use super::Archive;

thread_local! {
    /// Compressed bytes of the block being decompressed on this thread.
    static RAW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One block of file data: a cached decompressed block (or a slice of a fragment), or
/// zeros for a sparse block.
pub enum BlockData {
    Cached {
        block: Arc<Block>,
        start: usize,
        len: usize,
    },
    Zeros(usize),
}

impl BlockData {
    pub fn len(&self) -> usize {
        match self {
            BlockData::Cached { len, .. } => *len,
            BlockData::Zeros(n) => *n,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `[from, from + out.len())` of this block into `out`.
    pub fn copy_to(&self, from: usize, out: &mut [u8]) {
        match self {
            BlockData::Cached { block, start, .. } => {
                out.copy_from_slice(&block.data[start + from..start + from + out.len()])
            }
            BlockData::Zeros(_) => out.fill(0),
        }
    }
    /// The bytes, when not sparse.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            BlockData::Cached { block, start, len } => Some(&block.data[*start..start + len]),
            BlockData::Zeros(_) => None,
        }
    }
}

impl FileInfo {
    /// Number of blocks including the fragment tail.
    pub fn block_count(&self, block_size: u32) -> u64 {
        self.file_size.div_ceil(block_size as u64)
    }
}

/// At most this many bytes of fragment blocks stay in the cache: those decompressed last.
/// A fragment block holds the tails of files that lie together in the image, and readers
/// reach them together: its files in the directory being read are pushed into the page
/// cache at once (`fuse/push.rs`), and the files of the next directory that share it are
/// read next. Kept longer, fragment blocks filled the whole budget during a tree read
/// (64 MiB of them per mount, for nothing: the kernel held every file already), which made
/// eight mounts read at once cost 580 MiB.
pub const FRAGMENT_BYTES_KEPT: u64 = 2 << 20;
/// ...and at least this many blocks, whatever the block size.
const FRAGMENTS_KEPT_MIN: u64 = 4;

impl Archive {
    /// Block `index` of a file, `index` < `file.block_count()`.
    pub fn file_block(&self, file: &FileInfo, index: u64) -> Result<BlockData> {
        let bs = self.sb.block_size as u64;
        let start = index
            .checked_mul(bs)
            .filter(|&s| s < file.file_size)
            .ok_or_else(|| Error::corrupt(format!("file block {index} requested past the end")))?;
        let expected = (file.file_size - start).min(bs) as usize;
        if index < file.block_count {
            let at = self.block_location(file, index)?;
            if at.disk_len() == 0 {
                return Ok(BlockData::Zeros(expected));
            }
            let block = self.data_block(BlockKind::Data, at.offset, at.word, expected)?;
            if block.data.len() != expected {
                return Err(Error::corrupt(format!(
                    "data block at byte {} holds {} bytes, expected {expected}",
                    at.offset,
                    block.data.len()
                )));
            }
            return Ok(BlockData::Cached {
                block,
                start: 0,
                len: expected,
            });
        }
        let frag = file
            .fragment
            .filter(|_| index == file.block_count)
            .ok_or_else(|| Error::corrupt("file has fewer blocks than its size needs"))?;
        let block = self.fragment_block(frag.index)?;
        let from = frag.offset as usize;
        if from
            .checked_add(expected)
            .is_none_or(|end| end > block.data.len())
        {
            return Err(Error::corrupt(format!(
                "file tail [{from}, +{expected}) lies outside fragment {} ({} bytes)",
                frag.index,
                block.data.len()
            )));
        }
        Ok(BlockData::Cached {
            block,
            start: from,
            len: expected,
        })
    }

    /// Fragment block `index`, through the cache, which keeps only the few most recently
    /// decompressed fragment blocks ([`FRAGMENT_BYTES_KEPT`]).
    fn fragment_block(&self, index: u32) -> Result<Arc<Block>> {
        let (pos, word) = self.fragment_entry(index)?;
        let (block, loaded) =
            self.data_block_loading(BlockKind::Fragment, pos, word, self.sb.block_size as usize)?;
        if loaded {
            let kept =
                (FRAGMENT_BYTES_KEPT / u64::from(self.sb.block_size)).max(FRAGMENTS_KEPT_MIN);
            let mut recent = self
                .recent_fragments
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            recent.push_back(pos);
            while recent.len() as u64 > kept {
                if let Some(old) = recent.pop_front() {
                    if !recent.contains(&old) {
                        self.cache.remove(&CacheKey::Block {
                            kind: BlockKind::Fragment,
                            offset: old,
                        });
                    }
                }
            }
        }
        Ok(block)
    }

    /// Image offset and size word of fragment block `index` (an entry of the fragment
    /// table).
    pub fn fragment_entry(&self, index: u32) -> Result<(u64, u32)> {
        let mut e = [0u8; 16];
        self.fragments.read_entry(self, index as u64, &mut e)?;
        let pos = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
        let word = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
        Ok((pos, word))
    }

    /// A data or fragment block through the cache. `max` bounds the decompressed size.
    pub(crate) fn data_block(
        &self,
        kind: BlockKind,
        pos: u64,
        word: u32,
        max: usize,
    ) -> Result<Arc<Block>> {
        self.data_block_loading(kind, pos, word, max)
            .map(|(block, _)| block)
    }

    /// [`Self::data_block`], and whether this call loaded it (it was not in the cache).
    fn data_block_loading(
        &self,
        kind: BlockKind,
        pos: u64,
        word: u32,
        max: usize,
    ) -> Result<(Arc<Block>, bool)> {
        let key = CacheKey::Block { kind, offset: pos };
        let mut loaded = false;
        let block = self
            .cache
            .get_or_load(&key, || {
                loaded = true;
                self.load_data_block(pos, word, max)
                    .map(|b| Cached::Block(Arc::new(b)))
            })?
            .into_block()?;
        Ok((block, loaded))
    }

    /// Read and decompress one data block (no cache). Used by read-ahead too.
    pub(crate) fn load_data_block(&self, pos: u64, word: u32, max: usize) -> Result<Block> {
        let disk_len = (word & 0x00ff_ffff) as usize;
        if word >> 25 != 0 || disk_len == 0 || disk_len > self.sb.block_size as usize {
            return Err(Error::corrupt(format!(
                "data block at byte {pos} has size word {word:#x}"
            )));
        }
        if pos
            .checked_add(disk_len as u64)
            .is_none_or(|e| e > self.sb.bytes_used)
        {
            return Err(Error::corrupt(format!(
                "data block at byte {pos} runs past the end of the image"
            )));
        }
        let data: Vec<u8> = if word & STORED != 0 {
            if disk_len > max {
                return Err(Error::corrupt(format!(
                    "stored block at byte {pos} is larger than expected"
                )));
            }
            let mut raw = crate::cache::block_buffer(disk_len);
            raw.resize(disk_len, 0);
            self.read_at(&mut raw, pos)?;
            raw
        } else {
            // The compressed bytes go to a per-thread buffer: no allocation and no
            // zero-filling per block.
            RAW.with(|raw| -> Result<Vec<u8>> {
                let mut raw = raw.borrow_mut();
                raw.resize(disk_len, 0);
                self.read_at(&mut raw, pos)?;
                let mut out = crate::cache::block_buffer(max);
                self.sb
                    .compressor
                    .decompress(&raw, &mut out, max)
                    .map_err(|detail| Error::Decompress {
                        compressor: self.sb.compressor.name(),
                        offset: pos,
                        detail,
                    })?;
                Ok(out)
            })?
        };
        Ok(Block {
            data,
            disk_len: disk_len as u32,
        })
    }

    /// Read up to `buf.len()` bytes at `offset`; returns the count (0 at end of file).
    pub fn read_file_at(&self, file: &FileInfo, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= file.file_size {
            return Ok(0);
        }
        let bs = self.sb.block_size as u64;
        let want = (buf.len() as u64).min(file.file_size - offset) as usize;
        let mut done = 0usize;
        while done < want {
            let at = offset + done as u64;
            let index = at / bs;
            let within = (at % bs) as usize;
            let block = self.file_block(file, index)?;
            let n = (block.len() - within).min(want - done);
            block.copy_to(within, &mut buf[done..done + n]);
            done += n;
        }
        Ok(done)
    }
}

/// The bytes of one read request: a range of one cached block when the request lies inside
/// one block (the kernel reads whole aligned blocks, and a small file is one fragment
/// slice), so nothing is copied; otherwise assembled in a buffer the caller keeps.
pub enum FileBytes<'a> {
    InBlock(BlockData, std::ops::Range<usize>),
    Assembled(&'a [u8]),
}

impl FileBytes<'_> {
    /// The bytes read.
    pub fn bytes(&self) -> &[u8] {
        match self {
            FileBytes::InBlock(block, range) => &block.bytes().unwrap_or_default()[range.clone()],
            FileBytes::Assembled(v) => v,
        }
    }
}

/// Inodes looked at past a file for others in its fragment block, at most.
const NEIGHBOURS_SCANNED: usize = 512;
/// Inodes in a row outside the fragment block after which the scan stops.
const NEIGHBOURS_MISSED: usize = 32;

impl Archive {
    /// Up to `size` bytes of `file` at `offset`, for a reply: see [`FileBytes`]. `assembly`
    /// is reused across calls, so a reader of large requests does not map fresh memory for
    /// each.
    pub fn read_range<'a>(
        &self,
        file: &FileInfo,
        offset: u64,
        size: usize,
        assembly: &'a mut Vec<u8>,
    ) -> Result<FileBytes<'a>> {
        let want = (size as u64).min(file.file_size.saturating_sub(offset)) as usize;
        let bs = u64::from(self.sb.block_size);
        let within = (offset % bs) as usize;
        if want > 0 && within + want <= bs as usize {
            let block = self.file_block(file, offset / bs)?;
            if block.bytes().is_some() {
                return Ok(FileBytes::InBlock(block, within..within + want));
            }
        }
        assembly.clear();
        assembly.resize(want, 0);
        let n = self.read_file_at(file, offset, assembly)?;
        Ok(FileBytes::Assembled(&assembly[..n]))
    }

    /// Whether `file` lies wholly in a fragment block (no block of its own), and which.
    pub fn whole_in_fragment(file: &FileInfo) -> Option<u32> {
        file.fragment
            .filter(|_| file.block_count == 0 && file.file_size > 0)
            .map(|f| f.index)
    }

    /// The files that follow the inode `after` in the inode table and lie wholly in
    /// fragment block `fragment`, with their bytes, while `visit` answers true. mksquashfs
    /// writes a directory's inodes together and packs its small files into fragments in
    /// the same order, so these are mostly the file's neighbours in its directory. The scan
    /// is bounded: it stops after a run of inodes outside the block, or a fixed count.
    pub fn files_in_fragment_after(
        &self,
        after: InodeRef,
        fragment: u32,
        mut visit: impl FnMut(&Inode, &[u8]) -> bool,
    ) -> Result<()> {
        let (_, mut next) = self.inode_and_next(after)?;
        let mut missed = 0;
        for _ in 0..NEIGHBOURS_SCANNED {
            let Some(iref) = next else { break };
            let (inode, following) = self.inode_and_next(iref)?;
            next = following;
            let file = inode
                .as_file()
                .filter(|f| Self::whole_in_fragment(f) == Some(fragment));
            let Some(file) = file else {
                missed += 1;
                if missed >= NEIGHBOURS_MISSED {
                    break;
                }
                continue;
            };
            missed = 0;
            let block = self.file_block(file, 0)?;
            if let Some(bytes) = block.bytes() {
                if !visit(&inode, bytes) {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Archive {
    /// Forget the data blocks of `file` that a read of `[offset, offset + len)` delivered
    /// to its last byte. The kernel keeps what it was sent in its page cache (keep-cache),
    /// so a block read to its end will not be asked for again unless the kernel lets the
    /// page go: holding it here as well only doubles the memory. A reader that reads a
    /// block's end before its start pays one decompression more.
    pub fn release_delivered(&self, file: &FileInfo, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bs = u64::from(self.sb.block_size);
        let end = offset.saturating_add(len).min(file.file_size);
        let first = offset / bs;
        for index in first..end.div_ceil(bs).min(file.block_count) {
            let block_end = ((index + 1) * bs).min(file.file_size);
            if block_end <= end && block_end > offset {
                if let Ok(at) = self.block_location(file, index) {
                    self.cache.remove(&CacheKey::Block {
                        kind: BlockKind::Data,
                        offset: at.offset,
                    });
                }
            }
        }
    }
}
