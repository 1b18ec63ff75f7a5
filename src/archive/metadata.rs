//! Metadata blocks: the 8 KiB units (2-byte header, optionally compressed) that hold the
//! inode, directory, fragment, export, id and xattr tables. A [`MetadataReader`] reads a
//! byte stream that continues from one block into the next.

use std::sync::Arc;

use crate::cache::{Block, BlockKind};
use crate::error::{Error, Result};

use super::cached::{CacheKey, Cached};
use super::Archive;

/// Largest decompressed metadata block.
pub const METADATA_SIZE: usize = 8192;

impl Archive {
    /// The decompressed metadata block that starts at `pos` (a byte offset in the image).
    pub(crate) fn metadata_block(&self, pos: u64) -> Result<Arc<Block>> {
        let key = CacheKey::Block {
            kind: BlockKind::Metadata,
            offset: pos,
        };
        self.cache
            .get_or_load(&key, || {
                self.load_metadata_block(pos)
                    .map(|b| Cached::Block(Arc::new(b)))
            })?
            .into_block()
    }

    fn load_metadata_block(&self, pos: u64) -> Result<Block> {
        let end_of_image = self.sb.bytes_used;
        if pos.checked_add(2).is_none_or(|e| e > end_of_image) {
            return Err(Error::corrupt(format!(
                "metadata block at byte {pos} lies outside the image"
            )));
        }
        // One read for header and body: the body is at most 8 KiB.
        let want = (end_of_image - pos).min(2 + METADATA_SIZE as u64) as usize;
        let mut buf = [0u8; 2 + METADATA_SIZE];
        let buf = &mut buf[..want];
        self.read_at(buf, pos)?;
        let header = u16::from_le_bytes([buf[0], buf[1]]);
        let stored_uncompressed = header & 0x8000 != 0;
        let size = (header & 0x7fff) as usize;
        if size == 0 || size > METADATA_SIZE {
            return Err(Error::corrupt(format!(
                "metadata block at byte {pos} claims {size} bytes (1..=8192 allowed)"
            )));
        }
        if 2 + size > buf.len() {
            return Err(Error::corrupt(format!(
                "metadata block at byte {pos} runs past the end of the image"
            )));
        }
        let body = &buf[2..2 + size];
        let data: Vec<u8> = if stored_uncompressed {
            body.to_vec()
        } else {
            let mut out = Vec::with_capacity(METADATA_SIZE);
            self.sb
                .compressor
                .decompress(body, &mut out, METADATA_SIZE)
                .map_err(|detail| Error::Decompress {
                    compressor: self.sb.compressor.name(),
                    offset: pos,
                    detail,
                })?;
            if out.is_empty() {
                return Err(Error::corrupt(format!(
                    "metadata block at byte {pos} is empty"
                )));
            }
            out.shrink_to_fit();
            out
        };
        Ok(Block {
            data,
            disk_len: (2 + size) as u32,
        })
    }
}

/// A position in a metadata stream: the image offset of a block and an offset inside its
/// decompressed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetaPos {
    pub block: u64,
    pub offset: usize,
}

/// Reads a byte stream across chained metadata blocks. It holds the block it is in, so
/// reading a field is a bounds check and a copy, not a cache look-up.
pub struct MetadataReader<'a> {
    archive: &'a Archive,
    /// Image offset of the block the position is in.
    block_pos: u64,
    /// That block, once loaded.
    block: Option<Arc<Block>>,
    /// Offset of the next byte inside the block's decompressed bytes.
    offset: usize,
}

impl<'a> MetadataReader<'a> {
    pub fn new(archive: &'a Archive, pos: MetaPos) -> Self {
        MetadataReader {
            archive,
            block_pos: pos.block,
            block: None,
            offset: pos.offset,
        }
    }

    /// Where the next byte comes from.
    pub fn position(&self) -> MetaPos {
        MetaPos {
            block: self.block_pos,
            offset: self.offset,
        }
    }

    /// Where the next byte comes from, moved to the start of the next block when this one
    /// is used up (the form inode references take).
    pub fn next_position(&mut self) -> Result<MetaPos> {
        self.available()?;
        Ok(self.position())
    }

    /// The unread bytes of the current block (at least one), loading blocks as needed.
    /// Blocks follow each other on disk and each takes at least three bytes, so the stream
    /// only moves forward and ends at the end of the image.
    fn available(&mut self) -> Result<&[u8]> {
        loop {
            let block = match self.block.take() {
                Some(b) => b,
                None => {
                    let b = self.archive.metadata_block(self.block_pos)?;
                    if self.offset > b.data.len() {
                        return Err(Error::corrupt(format!(
                            "offset {} inside the {}-byte metadata block at byte {}",
                            self.offset,
                            b.data.len(),
                            self.block_pos
                        )));
                    }
                    b
                }
            };
            if self.offset < block.data.len() {
                let block = self.block.insert(block);
                return Ok(&block.data[self.offset..]);
            }
            self.block_pos += u64::from(block.disk_len);
            self.offset = 0;
        }
    }

    /// Fill `out`, continuing into following blocks as needed.
    #[inline]
    pub fn read(&mut self, out: &mut [u8]) -> Result<()> {
        if let Some(block) = &self.block {
            if let Some(src) = block.data.get(self.offset..self.offset + out.len()) {
                out.copy_from_slice(src);
                self.offset += out.len();
                return Ok(());
            }
        }
        self.read_across(out)
    }

    fn read_across(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let avail = self.available()?;
            let n = avail.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&avail[..n]);
            done += n;
            self.offset += n;
        }
        Ok(())
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let avail = self.available()?.len() as u64;
            let k = avail.min(n);
            self.offset += k as usize;
            n -= k;
        }
        Ok(())
    }

    /// A fixed-size array of the next bytes.
    #[inline]
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.read(&mut b)?;
        Ok(b)
    }

    #[inline]
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    #[inline]
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    #[inline]
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// `n` bytes; the caller has already bounded `n`.
    pub fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.read(&mut v)?;
        Ok(v)
    }
}

/// Little-endian fields of a fixed-size record read in one piece.
pub(crate) struct Fields<'b>(pub &'b [u8]);

impl Fields<'_> {
    #[inline]
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }
    #[inline]
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
    #[inline]
    pub fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
}
