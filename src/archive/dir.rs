//! Directories: listings (runs of entries under a header that gives their inode block and
//! base inode number) and the index that lets a lookup skip to the right metadata block.

use crate::error::{Error, Result};

use super::inode::{FileKind, Inode, InodeRef};
use super::metadata::{MetaPos, MetadataReader, METADATA_SIZE};
use super::Archive;

/// Longest name SquashFS stores.
pub const MAX_NAME: usize = 256;
/// Entries per directory header, at most.
const MAX_RUN: u32 = 256;
/// Entries one directory may hold (4 Mi: more than any real dataset directory), and name
/// bytes across them. A listing is decoded into memory whole, and a hostile image can
/// describe a listing far larger than itself (repeated entries compress to nothing).
pub const MAX_DIR_ENTRIES: usize = 1 << 22;
const MAX_DIR_NAME_BYTES: usize = 128 << 20;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub iref: InodeRef,
    pub inode_number: u32,
    pub kind: FileKind,
}

/// Reads entries of one directory in order.
struct ListingReader<'a> {
    archive: &'a Archive,
    reader: MetadataReader<'a>,
    /// Listing bytes still to read.
    remaining: u64,
    /// Entries left under the current header, and its block and base number.
    run_left: u32,
    run_block: u32,
    run_base: u32,
}

impl<'a> ListingReader<'a> {
    /// Start at `pos`, `consumed` bytes into a listing of `file_size` (stored size, which
    /// counts 3 bytes for "." and "..").
    fn new(archive: &'a Archive, pos: MetaPos, file_size: u32, consumed: u64) -> Result<Self> {
        let total = (file_size as u64).checked_sub(3).ok_or_else(|| {
            Error::corrupt(format!(
                "directory size {file_size} is below the minimum of 3"
            ))
        })?;
        Ok(ListingReader {
            archive,
            reader: MetadataReader::new(archive, pos),
            remaining: total.saturating_sub(consumed),
            run_left: 0,
            run_block: 0,
            run_base: 0,
        })
    }

    fn take(&mut self, n: u64) -> Result<()> {
        self.remaining = self
            .remaining
            .checked_sub(n)
            .ok_or_else(|| Error::corrupt("directory entry runs past the directory's size"))?;
        Ok(())
    }

    fn next_entry(&mut self) -> Result<Option<DirEntry>> {
        if self.run_left == 0 {
            if self.remaining == 0 {
                return Ok(None);
            }
            self.take(12)?;
            let count = self.reader.u32()?.checked_add(1).filter(|&c| c <= MAX_RUN);
            self.run_left = count
                .ok_or_else(|| Error::corrupt("directory header counts more than 256 entries"))?;
            self.run_block = self.reader.u32()?;
            self.run_base = self.reader.u32()?;
        }
        self.take(8)?;
        let offset = self.reader.u16()?;
        let delta = self.reader.u16()? as i16;
        let kind_raw = self.reader.u16()?;
        let name_len = self.reader.u16()? as usize + 1;
        if name_len > MAX_NAME {
            return Err(Error::corrupt(format!(
                "directory entry name of {name_len} bytes"
            )));
        }
        self.take(name_len as u64)?;
        let name = self.reader.bytes(name_len)?;
        self.run_left -= 1;
        if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
            return Err(Error::corrupt(format!(
                "directory entry has an invalid name {:?}",
                String::from_utf8_lossy(&name)
            )));
        }
        let kind = match kind_raw {
            1..=7 => FileKind::from_type(kind_raw).expect("1..=7 are types"),
            _ => {
                return Err(Error::corrupt(format!(
                    "directory entry of unknown type {kind_raw}"
                )))
            }
        };
        let number = (self.run_base as i64 + delta as i64) as u64;
        if number == 0 || number > self.archive.sb.inode_count as u64 {
            return Err(Error::corrupt(format!(
                "directory entry names inode number {number}"
            )));
        }
        if offset as usize >= METADATA_SIZE {
            return Err(Error::corrupt(format!(
                "directory entry has inode offset {offset}"
            )));
        }
        Ok(Some(DirEntry {
            name,
            iref: InodeRef((self.run_block as u64) << 16 | offset as u64),
            inode_number: number as u32,
            kind,
        }))
    }
}

impl Archive {
    fn listing_start(&self, dir: &Inode) -> Result<(MetaPos, u32)> {
        let info = dir
            .as_dir()
            .ok_or_else(|| Error::NotADirectory(format!("inode {}", dir.number)))?;
        let block = self
            .sb
            .directory_table
            .checked_add(info.start_block as u64)
            .filter(|&b| b < self.sb.bytes_used)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "directory inode {} points outside the image",
                    dir.number
                ))
            })?;
        if info.offset as usize >= METADATA_SIZE {
            return Err(Error::corrupt(format!(
                "directory inode {} has offset {}",
                dir.number, info.offset
            )));
        }
        Ok((
            MetaPos {
                block,
                offset: info.offset as usize,
            },
            info.file_size,
        ))
    }

    /// Every entry of a directory, in stored (sorted) order, without "." and "..".
    /// Names must be strictly ascending, as mksquashfs writes them and lookups assume: a
    /// duplicate name is corrupt (and would make an extraction write through the first).
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let (pos, size) = self.listing_start(dir)?;
        let mut r = ListingReader::new(self, pos, size, 0)?;
        let mut out: Vec<DirEntry> = Vec::new();
        let mut name_bytes = 0usize;
        while let Some(e) = r.next_entry()? {
            if let Some(prev) = out.last() {
                if prev.name >= e.name {
                    return Err(Error::corrupt(format!(
                        "directory inode {}: entry {:?} follows {:?} (duplicate or out of order)",
                        dir.number,
                        String::from_utf8_lossy(&e.name),
                        String::from_utf8_lossy(&prev.name)
                    )));
                }
            }
            name_bytes += e.name.len();
            if out.len() >= MAX_DIR_ENTRIES || name_bytes > MAX_DIR_NAME_BYTES {
                return Err(Error::Unsupported(format!(
                    "directory inode {} has more than {MAX_DIR_ENTRIES} entries or \
                     {MAX_DIR_NAME_BYTES} bytes of names",
                    dir.number
                )));
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The entry called `name` in `dir`, using the directory index to start near it.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        let (mut pos, size) = self.listing_start(dir)?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Ok(None);
        }
        let mut consumed = 0u64;
        let info = dir.as_dir().expect("checked by listing_start");
        if let (Some(index_pos), true) = (info.index_pos, info.index_count > 0) {
            let start_offset = pos.offset as u64;
            let mut r = MetadataReader::new(self, index_pos);
            for _ in 0..info.index_count {
                let index = r.u32()?;
                let start_block = r.u32()?;
                let len = r.u32()? as usize + 1;
                if len > MAX_NAME {
                    return Err(Error::corrupt(format!(
                        "directory index name of {len} bytes"
                    )));
                }
                let first = r.bytes(len)?;
                if first.as_slice() > name {
                    break;
                }
                let block = self
                    .sb
                    .directory_table
                    .checked_add(start_block as u64)
                    .filter(|&b| b < self.sb.bytes_used)
                    .ok_or_else(|| Error::corrupt("directory index points outside the image"))?;
                consumed = index as u64;
                pos = MetaPos {
                    block,
                    offset: ((start_offset + index as u64) % METADATA_SIZE as u64) as usize,
                };
            }
        }
        let mut r = ListingReader::new(self, pos, size, consumed)?;
        while let Some(e) = r.next_entry()? {
            match e.name.as_slice().cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(e)),
                // Entries are sorted: once past the name it is not there.
                std::cmp::Ordering::Greater => return Ok(None),
                std::cmp::Ordering::Less => {}
            }
        }
        Ok(None)
    }
}
