//! Directories: listings (runs of entries under a header that gives their inode block and
//! base inode number) and the index that lets a lookup, or a reader resuming a listing,
//! skip to the right metadata block.
//!
//! A listing is read as a stream, never materialised whole on the serving path: readdir
//! resumes at a position (the listing byte after the last entry the kernel took, as the
//! kernel's own driver numbers them), found through a seek point remembered in the cache
//! when the previous page ended, else through the directory index, else from the start
//! (only small, unindexed listings).

use crate::error::{Error, Result};

use super::cached::{CacheKey, Cached};
use super::inode::{DirInfo, FileKind, Inode, InodeRef};
use super::metadata::{Fields, MetaPos, MetadataReader, METADATA_SIZE};
use super::Archive;

/// Longest name SquashFS stores.
pub const MAX_NAME: usize = 256;
/// Entries per directory header, at most.
const MAX_RUN: u32 = 256;
/// Entries one directory may hold when read whole (`read_dir`, for the command-line tools:
/// 4 Mi, more than any real dataset directory), and name bytes across them. A hostile
/// image can describe a listing far larger than itself (repeated entries compress to
/// nothing). The mount pages through listings and needs no such bound.
pub const MAX_DIR_ENTRIES: usize = 1 << 22;
const MAX_DIR_NAME_BYTES: usize = 128 << 20;
/// Listing bytes one request parses to reach its place, at most: what lies between two
/// points of a directory index is one metadata block (mksquashfs indexes every block), and
/// an unindexed listing is at most 64 KiB unless an image is crafted; this bounds the work
/// a crafted one can ask for.
pub const MAX_LISTING_SCAN: u64 = 64 << 20;

/// One directory entry, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub iref: InodeRef,
    pub inode_number: u32,
    pub kind: FileKind,
}

/// One directory entry, its name borrowed from the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'n> {
    pub name: &'n [u8],
    pub iref: InodeRef,
    pub inode_number: u32,
    pub kind: FileKind,
}

impl EntryRef<'_> {
    pub fn to_owned(self) -> DirEntry {
        DirEntry {
            name: self.name.to_vec(),
            iref: self.iref,
            inode_number: self.inode_number,
            kind: self.kind,
        }
    }
}

/// Where a listing can be resumed: a run header, and its byte position in the listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListingSeek {
    header: MetaPos,
    at: u64,
}

/// Reads entries of one directory in order, without allocating per entry.
struct ListingReader<'a> {
    archive: &'a Archive,
    reader: MetadataReader<'a>,
    /// Listing bytes read so far, and in all.
    consumed: u64,
    total: u64,
    /// Entries left under the current header, its block and base number, and where it is.
    run_left: u32,
    run_block: u32,
    run_base: u32,
    run_header: ListingSeek,
    name: [u8; MAX_NAME],
}

impl<'a> ListingReader<'a> {
    /// Start at the run header at `seek`, in a listing of `file_size` (stored size, which
    /// counts 3 bytes for "." and "..").
    fn new(archive: &'a Archive, seek: ListingSeek, file_size: u32) -> Result<Self> {
        let total = (file_size as u64).checked_sub(3).ok_or_else(|| {
            Error::corrupt(format!(
                "directory size {file_size} is below the minimum of 3"
            ))
        })?;
        Ok(ListingReader {
            archive,
            reader: MetadataReader::new(archive, seek.header),
            consumed: seek.at,
            total,
            run_left: 0,
            run_block: 0,
            run_base: 0,
            run_header: seek,
            name: [0; MAX_NAME],
        })
    }

    fn take(&mut self, n: u64) -> Result<()> {
        self.consumed = self
            .consumed
            .checked_add(n)
            .filter(|&end| end <= self.total)
            .ok_or_else(|| Error::corrupt("directory entry runs past the directory's size"))?;
        Ok(())
    }

    /// The next entry, the listing position after it and where its run starts; `None` at
    /// the end of the listing.
    fn next(&mut self) -> Result<Option<(EntryRef<'_>, u64, ListingSeek)>> {
        if self.run_left == 0 {
            if self.consumed >= self.total {
                return Ok(None);
            }
            self.run_header = ListingSeek {
                header: self.reader.position(),
                at: self.consumed,
            };
            self.take(12)?;
            let h: [u8; 12] = self.reader.array()?;
            let h = Fields(&h);
            let count = h.u32(0).checked_add(1).filter(|&c| c <= MAX_RUN);
            self.run_left = count
                .ok_or_else(|| Error::corrupt("directory header counts more than 256 entries"))?;
            self.run_block = h.u32(4);
            self.run_base = h.u32(8);
        }
        self.take(8)?;
        let e: [u8; 8] = self.reader.array()?;
        let e = Fields(&e);
        let offset = e.u16(0);
        let delta = e.u16(2) as i16;
        let kind_raw = e.u16(4);
        let name_len = e.u16(6) as usize + 1;
        if name_len > MAX_NAME {
            return Err(Error::corrupt(format!(
                "directory entry name of {name_len} bytes"
            )));
        }
        self.take(name_len as u64)?;
        self.reader.read(&mut self.name[..name_len])?;
        self.run_left -= 1;
        let name = &self.name[..name_len];
        if name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
            return Err(Error::corrupt(format!(
                "directory entry has an invalid name {:?}",
                String::from_utf8_lossy(name)
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
        let entry = EntryRef {
            name,
            iref: InodeRef((self.run_block as u64) << 16 | offset as u64),
            inode_number: number as u32,
            kind,
        };
        Ok(Some((entry, self.consumed, self.run_header)))
    }

    /// The next entry, or `None` at the end of the listing.
    fn next_entry(&mut self) -> Result<Option<EntryRef<'_>>> {
        Ok(self.next()?.map(|(e, _, _)| e))
    }

    /// Where the reader stands, as a seek point: valid only between runs.
    fn here(&self) -> ListingSeek {
        ListingSeek {
            header: self.reader.position(),
            at: self.consumed,
        }
    }
}

/// One entry of a directory index: the listing position of a run header that starts a
/// metadata block, where that block is, and the first name under the header.
struct IndexEntry {
    at: u64,
    block: u64,
    name_len: usize,
}

/// Reads a directory's index entries in order.
struct IndexReader<'a> {
    reader: MetadataReader<'a>,
    left: u16,
    name: [u8; MAX_NAME],
}

impl IndexReader<'_> {
    fn next(&mut self, archive: &Archive) -> Result<Option<IndexEntry>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let h: [u8; 12] = self.reader.array()?;
        let h = Fields(&h);
        let name_len = h.u32(8) as usize + 1;
        if name_len > MAX_NAME {
            return Err(Error::corrupt(format!(
                "directory index name of {name_len} bytes"
            )));
        }
        self.reader.read(&mut self.name[..name_len])?;
        let block = archive
            .sb
            .directory_table
            .checked_add(u64::from(h.u32(4)))
            .filter(|&b| b < archive.sb.bytes_used)
            .ok_or_else(|| Error::corrupt("directory index points outside the image"))?;
        Ok(Some(IndexEntry {
            at: u64::from(h.u32(0)),
            block,
            name_len,
        }))
    }

    fn name(&self, e: &IndexEntry) -> &[u8] {
        &self.name[..e.name_len]
    }
}

impl Archive {
    fn dir_info<'i>(&self, dir: &'i Inode) -> Result<&'i DirInfo> {
        dir.as_dir()
            .ok_or_else(|| Error::NotADirectory(format!("inode {}", dir.number)))
    }

    /// Where the listing of `dir` starts.
    fn listing_start(&self, dir: &Inode) -> Result<MetaPos> {
        let info = self.dir_info(dir)?;
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
        Ok(MetaPos {
            block,
            offset: info.offset as usize,
        })
    }

    fn index_reader(&self, info: &DirInfo) -> Option<IndexReader<'_>> {
        let pos = info.index_pos.filter(|_| info.index_count > 0)?;
        Some(IndexReader {
            reader: MetadataReader::new(self, pos),
            left: info.index_count,
            name: [0; MAX_NAME],
        })
    }

    /// The run header at or before listing position `pos` closest to it that the index (or
    /// the start of the listing) gives.
    fn index_seek(&self, dir: &Inode, start: MetaPos, pos: u64) -> Result<ListingSeek> {
        let mut best = ListingSeek {
            header: start,
            at: 0,
        };
        let info = self.dir_info(dir)?;
        if let Some(mut index) = self.index_reader(info) {
            while let Some(e) = index.next(self)? {
                if e.at > pos {
                    break;
                }
                best = ListingSeek {
                    header: MetaPos {
                        block: e.block,
                        offset: ((start.offset as u64 + e.at) % METADATA_SIZE as u64) as usize,
                    },
                    at: e.at,
                };
            }
        }
        Ok(best)
    }

    /// Every entry of a directory, in stored (sorted) order, without "." and "..".
    /// Names must be strictly ascending, as mksquashfs writes them and lookups assume: a
    /// duplicate name is corrupt (and would make an extraction write through the first).
    pub fn read_dir(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        let start = self.listing_start(dir)?;
        let size = self.dir_info(dir)?.file_size;
        let mut r = ListingReader::new(
            self,
            ListingSeek {
                header: start,
                at: 0,
            },
            size,
        )?;
        let mut out: Vec<DirEntry> = Vec::new();
        let mut name_bytes = 0usize;
        while let Some(e) = r.next_entry()? {
            if let Some(prev) = out.last() {
                if prev.name.as_slice() >= e.name {
                    return Err(Error::corrupt(format!(
                        "directory inode {}: entry {:?} follows {:?} (duplicate or out of order)",
                        dir.number,
                        String::from_utf8_lossy(e.name),
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
            out.push(e.to_owned());
        }
        Ok(out)
    }

    /// Read the entries of `dir` that lie after listing position `from` (0: the first
    /// entry; otherwise a position this function reported), calling `visit` with each and
    /// the position after it, until `visit` answers false or the listing ends. The cost of
    /// resuming is bounded whatever the listing's size: the position where a call stops is
    /// remembered, and otherwise the directory index leads close to it.
    pub fn list_from(
        &self,
        dir: &Inode,
        from: u64,
        mut visit: impl FnMut(EntryRef<'_>, u64) -> bool,
    ) -> Result<()> {
        let start = self.listing_start(dir)?;
        let size = self.dir_info(dir)?.file_size;
        let key = CacheKey::ListingSeek {
            listing: start,
            cookie: from,
        };
        let seek = match self.cache.get(&key).and_then(Cached::into_listing_seek) {
            Some(seek) => seek,
            None if from == 0 => ListingSeek {
                header: start,
                at: 0,
            },
            None => self.index_seek(dir, start, from)?,
        };
        let mut r = ListingReader::new(self, seek, size)?;
        loop {
            let before = r.consumed;
            let Some((e, after, run)) = r.next()? else {
                // The kernel asks once more at the end, to learn it is the end: make that
                // call cost nothing.
                if r.run_left == 0 && before > from {
                    let key = CacheKey::ListingSeek {
                        listing: start,
                        cookie: before,
                    };
                    self.cache.insert(key, Cached::ListingSeek(r.here()));
                }
                return Ok(());
            };
            // Entries before the position were taken by an earlier call.
            if after <= from {
                if after - seek.at > MAX_LISTING_SCAN {
                    return Err(too_far(dir, from - seek.at));
                }
                continue;
            }
            if !visit(e, after) {
                // The next call resumes before this entry: remember where its run starts.
                let key = CacheKey::ListingSeek {
                    listing: start,
                    cookie: before,
                };
                self.cache.insert(key, Cached::ListingSeek(run));
                return Ok(());
            }
        }
    }

    /// The entry called `name` in `dir`, using the directory index to start near it.
    pub fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<DirEntry>> {
        let start = self.listing_start(dir)?;
        let info = self.dir_info(dir)?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Ok(None);
        }
        let mut seek = ListingSeek {
            header: start,
            at: 0,
        };
        if let Some(mut index) = self.index_reader(info) {
            while let Some(e) = index.next(self)? {
                if index.name(&e) > name {
                    break;
                }
                seek = ListingSeek {
                    header: MetaPos {
                        block: e.block,
                        offset: ((start.offset as u64 + e.at) % METADATA_SIZE as u64) as usize,
                    },
                    at: e.at,
                };
            }
        }
        let mut r = ListingReader::new(self, seek, info.file_size)?;
        while let Some((e, after, _)) = r.next()? {
            if after - seek.at > MAX_LISTING_SCAN {
                return Err(too_far(dir, after - seek.at));
            }
            match e.name.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(e.to_owned())),
                // Entries are sorted: once past the name it is not there.
                std::cmp::Ordering::Greater => return Ok(None),
                std::cmp::Ordering::Less => {}
            }
        }
        Ok(None)
    }
}

/// The error of a request that would parse more than [`MAX_LISTING_SCAN`] bytes of a
/// listing to reach its place.
fn too_far(dir: &Inode, distance: u64) -> Error {
    Error::Unsupported(format!(
        "directory inode {} would need {distance} bytes of its listing parsed to reach one \
         entry (at most {MAX_LISTING_SCAN}): its directory index is missing or too sparse",
        dir.number
    ))
}
