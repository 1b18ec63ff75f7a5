//! Metadata blocks: the 8 KiB units (2-byte header, optionally compressed) that hold the
//! inode, directory, fragment, export, id and xattr tables. A [`MetadataReader`] reads a
//! byte stream that continues from one block into the next.

use std::sync::Arc;

use crate::cache::{Block, BlockKey, BlockKind};
use crate::error::{Error, Result};

use super::Archive;

/// Largest decompressed metadata block.
pub const METADATA_SIZE: usize = 8192;

impl Archive {
    /// The decompressed metadata block that starts at `pos` (a byte offset in the image).
    pub(crate) fn metadata_block(&self, pos: u64) -> Result<Arc<Block>> {
        let key = BlockKey {
            kind: BlockKind::Metadata,
            offset: pos,
        };
        self.cache
            .get_or_load(key, || self.load_metadata_block(pos))
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
        let mut buf = vec![0u8; want];
        self.read_at(&mut buf, pos)?;
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

/// Reads a byte stream across chained metadata blocks.
pub struct MetadataReader<'a> {
    archive: &'a Archive,
    pos: MetaPos,
    block: Option<Arc<Block>>,
}

impl<'a> MetadataReader<'a> {
    pub fn new(archive: &'a Archive, pos: MetaPos) -> Self {
        MetadataReader {
            archive,
            pos,
            block: None,
        }
    }

    /// Where the next byte comes from.
    pub fn position(&self) -> MetaPos {
        self.pos
    }

    fn current(&mut self) -> Result<Arc<Block>> {
        if let Some(b) = &self.block {
            return Ok(b.clone());
        }
        let b = self.archive.metadata_block(self.pos.block)?;
        if self.pos.offset > b.data.len() {
            return Err(Error::corrupt(format!(
                "offset {} inside the {}-byte metadata block at byte {}",
                self.pos.offset,
                b.data.len(),
                self.pos.block
            )));
        }
        self.block = Some(b.clone());
        Ok(b)
    }

    /// Fill `out`, continuing into following blocks as needed. Blocks follow each other on
    /// disk, so the stream only moves forward and cannot loop.
    pub fn read(&mut self, out: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < out.len() {
            let block = self.current()?;
            let avail = &block.data[self.pos.offset..];
            if avail.is_empty() {
                self.pos = MetaPos {
                    block: self.pos.block + block.disk_len as u64,
                    offset: 0,
                };
                self.block = None;
                continue;
            }
            let n = avail.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&avail[..n]);
            done += n;
            self.pos.offset += n;
        }
        Ok(())
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut scratch = [0u8; 512];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.read(&mut scratch[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    pub fn u16(&mut self) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// `n` bytes; the caller has already bounded `n`.
    pub fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        self.read(&mut v)?;
        Ok(v)
    }
}
