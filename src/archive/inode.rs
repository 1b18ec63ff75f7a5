//! Inodes: the 14 SquashFS inode types, decoded into one [`Inode`].

use std::sync::Arc;

use crate::error::{Error, Result};

use super::metadata::{MetaPos, MetadataReader};
use super::Archive;

/// A reference to an inode: (metadata block offset relative to the inode table) << 16 |
/// offset inside the decompressed block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeRef(pub u64);

impl InodeRef {
    /// Largest value a valid reference can take (32-bit block offset, 13-bit offset).
    pub const MAX: u64 = (u32::MAX as u64) << 16 | 0x1fff;

    pub fn block(self) -> u64 {
        self.0 >> 16
    }
    pub fn offset(self) -> usize {
        (self.0 & 0xffff) as usize
    }
}

/// The type of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Directory,
    File,
    Symlink,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
}

impl FileKind {
    /// From the basic type number used in inodes (1..=7, extended 8..=14) and directory
    /// entries (1..=7).
    pub fn from_type(t: u16) -> Option<Self> {
        Some(match t {
            1 | 8 => FileKind::Directory,
            2 | 9 => FileKind::File,
            3 | 10 => FileKind::Symlink,
            4 | 11 => FileKind::BlockDevice,
            5 | 12 => FileKind::CharDevice,
            6 | 13 => FileKind::Fifo,
            7 | 14 => FileKind::Socket,
            _ => return None,
        })
    }

    /// The S_IFMT bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Directory => libc::S_IFDIR,
            FileKind::File => libc::S_IFREG,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::BlockDevice => libc::S_IFBLK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }

    /// One letter as `ls -l` shows it.
    pub fn letter(self) -> char {
        match self {
            FileKind::Directory => 'd',
            FileKind::File => '-',
            FileKind::Symlink => 'l',
            FileKind::BlockDevice => 'b',
            FileKind::CharDevice => 'c',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }
}

/// A fragment holding a file's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentRef {
    pub index: u32,
    pub offset: u32,
}

/// Where a directory's entries are, and its index for fast lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirInfo {
    /// Offset of the first listing block relative to the directory table.
    pub start_block: u32,
    /// Offset inside that block.
    pub offset: u16,
    /// Listing size + 3, as stored (the kernel reports it as st_size).
    pub file_size: u32,
    /// Inode number of the parent directory.
    pub parent: u32,
    /// Number of directory index entries (extended directories only).
    pub index_count: u16,
    /// Where the index entries start.
    pub index_pos: Option<MetaPos>,
}

/// Where a regular file's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub blocks_start: u64,
    pub file_size: u64,
    /// Bytes saved by sparse blocks (extended inodes); 0 otherwise.
    pub sparse: u64,
    pub fragment: Option<FragmentRef>,
    /// Stored size word of every full (or non-fragment tail) block.
    pub block_sizes: Arc<[u32]>,
    /// Image offset of every block: O(1) lookup of block i instead of summing sizes.
    pub block_offsets: Arc<[u64]>,
}

/// What a specific inode type carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeBody {
    Directory(DirInfo),
    File(FileInfo),
    Symlink(Vec<u8>),
    Device { rdev: u32 },
    Ipc,
}

/// A decoded inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub iref: InodeRef,
    pub number: u32,
    pub kind: FileKind,
    /// Permission bits (07777).
    pub permissions: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub nlink: u32,
    pub xattr_index: Option<u32>,
    pub extended: bool,
    pub body: InodeBody,
}

/// Longest symlink target the kernel accepts (it refuses more than a page).
pub const MAX_SYMLINK: u32 = 4096;
/// Most blocks one regular file may have: 16 GiB at 4 KiB blocks, 512 GiB at 128 KiB,
/// 4 TiB at 1 MiB. The decoded block list costs 12 bytes a block, and a hostile image can
/// describe a list far longer than itself (zero words for sparse blocks compress to
/// nothing), so its length needs a fixed ceiling.
pub const MAX_FILE_BLOCKS: u64 = 1 << 22;
const NO_INDEX: u32 = u32::MAX;

impl Inode {
    /// st_mode: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | (self.permissions as u32 & 0o7777)
    }

    /// st_size as the kernel reports it.
    pub fn size(&self) -> u64 {
        match &self.body {
            InodeBody::Directory(d) => d.file_size as u64,
            InodeBody::File(f) => f.file_size,
            InodeBody::Symlink(t) => t.len() as u64,
            _ => 0,
        }
    }

    /// st_blocks (512-byte units) as the kernel's squashfs driver computes them.
    pub fn blocks_512(&self) -> u64 {
        match &self.body {
            InodeBody::File(f) if f.file_size == 0 => 0,
            InodeBody::File(f) if self.extended => {
                f.file_size.saturating_sub(f.sparse).div_ceil(512)
            }
            InodeBody::File(f) => ((f.file_size - 1) >> 9) + 1,
            _ => 0,
        }
    }

    /// Raw device number in the kernel's encoding, or 0.
    pub fn rdev(&self) -> u32 {
        match self.body {
            InodeBody::Device { rdev } => rdev,
            _ => 0,
        }
    }

    /// (major, minor) of a device.
    pub fn device_numbers(&self) -> (u32, u32) {
        let d = self.rdev();
        ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))
    }

    /// The directory details, for directories.
    pub fn as_dir(&self) -> Option<&DirInfo> {
        match &self.body {
            InodeBody::Directory(d) => Some(d),
            _ => None,
        }
    }

    /// The file details, for regular files.
    pub fn as_file(&self) -> Option<&FileInfo> {
        match &self.body {
            InodeBody::File(f) => Some(f),
            _ => None,
        }
    }

    /// The target, for symlinks.
    pub fn symlink_target(&self) -> Option<&[u8]> {
        match &self.body {
            InodeBody::Symlink(t) => Some(t),
            _ => None,
        }
    }
}

impl Archive {
    /// Decode the inode at `iref`.
    pub fn inode(&self, iref: InodeRef) -> Result<Inode> {
        if iref.0 > InodeRef::MAX || iref.offset() >= super::metadata::METADATA_SIZE {
            return Err(Error::corrupt(format!(
                "inode reference {:#x} is invalid",
                iref.0
            )));
        }
        let block = self
            .sb
            .inode_table
            .checked_add(iref.block())
            .filter(|&b| b < self.sb.directory_table)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "inode reference {:#x} points outside the inode table",
                    iref.0
                ))
            })?;
        let mut r = MetadataReader::new(
            self,
            MetaPos {
                block,
                offset: iref.offset(),
            },
        );
        let inode_type = r.u16()?;
        let kind = FileKind::from_type(inode_type).ok_or_else(|| {
            Error::corrupt(format!("inode {:#x} has unknown type {inode_type}", iref.0))
        })?;
        let extended = inode_type >= 8;
        let permissions = r.u16()? & 0o7777;
        let uid_index = r.u16()?;
        let gid_index = r.u16()?;
        let mtime = r.u32()?;
        let number = r.u32()?;
        if number == 0 || number > self.sb.inode_count {
            return Err(Error::corrupt(format!(
                "inode {:#x} has number {number}, outside 1..={}",
                iref.0, self.sb.inode_count
            )));
        }
        let mut xattr = NO_INDEX;
        let (nlink, body) = match (kind, extended) {
            (FileKind::Directory, false) => {
                let start_block = r.u32()?;
                let nlink = r.u32()?;
                let file_size = r.u16()? as u32;
                let offset = r.u16()?;
                let parent = r.u32()?;
                (
                    nlink,
                    InodeBody::Directory(DirInfo {
                        start_block,
                        offset,
                        file_size,
                        parent,
                        index_count: 0,
                        index_pos: None,
                    }),
                )
            }
            (FileKind::Directory, true) => {
                let nlink = r.u32()?;
                let file_size = r.u32()?;
                let start_block = r.u32()?;
                let parent = r.u32()?;
                let index_count = r.u16()?;
                let offset = r.u16()?;
                xattr = r.u32()?;
                let index_pos = Some(r.position());
                (
                    nlink,
                    InodeBody::Directory(DirInfo {
                        start_block,
                        offset,
                        file_size,
                        parent,
                        index_count,
                        index_pos,
                    }),
                )
            }
            (FileKind::File, false) => {
                let blocks_start = r.u32()? as u64;
                let frag = r.u32()?;
                let frag_offset = r.u32()?;
                let file_size = r.u32()? as u64;
                let f = self.read_block_list(
                    &mut r,
                    iref,
                    blocks_start,
                    file_size,
                    0,
                    frag,
                    frag_offset,
                )?;
                (1, InodeBody::File(f))
            }
            (FileKind::File, true) => {
                let blocks_start = r.u64()?;
                let file_size = r.u64()?;
                let sparse = r.u64()?;
                let nlink = r.u32()?;
                let frag = r.u32()?;
                let frag_offset = r.u32()?;
                xattr = r.u32()?;
                let f = self.read_block_list(
                    &mut r,
                    iref,
                    blocks_start,
                    file_size,
                    sparse,
                    frag,
                    frag_offset,
                )?;
                (nlink, InodeBody::File(f))
            }
            (FileKind::Symlink, ext) => {
                let nlink = r.u32()?;
                let len = r.u32()?;
                if len > MAX_SYMLINK {
                    return Err(Error::corrupt(format!(
                        "symlink inode {number} has a {len}-byte target"
                    )));
                }
                let target = r.bytes(len as usize)?;
                if ext {
                    xattr = r.u32()?;
                }
                (nlink, InodeBody::Symlink(target))
            }
            (FileKind::BlockDevice | FileKind::CharDevice, ext) => {
                let nlink = r.u32()?;
                let rdev = r.u32()?;
                if ext {
                    xattr = r.u32()?;
                }
                (nlink, InodeBody::Device { rdev })
            }
            (FileKind::Fifo | FileKind::Socket, ext) => {
                let nlink = r.u32()?;
                if ext {
                    xattr = r.u32()?;
                }
                (nlink, InodeBody::Ipc)
            }
        };
        let uid = self.id(uid_index)?;
        let gid = self.id(gid_index)?;
        Ok(Inode {
            iref,
            number,
            kind,
            permissions,
            uid,
            gid,
            mtime,
            nlink,
            xattr_index: (xattr != NO_INDEX).then_some(xattr),
            extended,
            body,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn read_block_list(
        &self,
        r: &mut MetadataReader<'_>,
        iref: InodeRef,
        blocks_start: u64,
        file_size: u64,
        sparse: u64,
        frag: u32,
        frag_offset: u32,
    ) -> Result<FileInfo> {
        let bs = self.sb.block_size as u64;
        let fragment = (frag != NO_INDEX).then_some(FragmentRef {
            index: frag,
            offset: frag_offset,
        });
        let count = if fragment.is_some() {
            file_size / bs
        } else {
            file_size.div_ceil(bs)
        };
        if count > MAX_FILE_BLOCKS {
            return Err(Error::Unsupported(format!(
                "inode {:#x} is a file of {file_size} bytes in {count} blocks; sifuse reads \
                 files of at most {MAX_FILE_BLOCKS} blocks",
                iref.0
            )));
        }
        if let Some(f) = fragment {
            if f.index >= self.sb.fragment_count {
                return Err(Error::corrupt(format!(
                    "inode {:#x} uses fragment {} of {}",
                    iref.0, f.index, self.sb.fragment_count
                )));
            }
            if file_size % bs == 0 {
                return Err(Error::corrupt(format!(
                    "inode {:#x} has a fragment but no tail",
                    iref.0
                )));
            }
        }
        // The block list lives in the inode table, so a real count is bounded by it; grow
        // the vectors as entries are actually read rather than trusting `count`.
        let mut sizes = Vec::with_capacity(count.min(1 << 16) as usize);
        let mut offsets = Vec::with_capacity(count.min(1 << 16) as usize);
        let mut pos = blocks_start;
        let mut raw = [0u8; 4 * 256];
        let mut left = count;
        while left > 0 {
            let n = left.min(256) as usize;
            r.read(&mut raw[..4 * n])?;
            for c in raw[..4 * n].chunks_exact(4) {
                let word = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                let on_disk = (word & 0x00ff_ffff) as u64;
                if word >> 25 != 0 || on_disk > bs {
                    return Err(Error::corrupt(format!(
                        "inode {:#x} has an impossible block size word {word:#x}",
                        iref.0
                    )));
                }
                offsets.push(pos);
                sizes.push(word);
                pos = pos
                    .checked_add(on_disk)
                    .filter(|&p| p <= self.sb.bytes_used)
                    .ok_or_else(|| {
                        Error::corrupt(format!(
                            "data of inode {:#x} runs past the end of the image",
                            iref.0
                        ))
                    })?;
            }
            left -= n as u64;
        }
        Ok(FileInfo {
            blocks_start,
            file_size,
            sparse,
            fragment,
            block_sizes: sizes.into(),
            block_offsets: offsets.into(),
        })
    }

    /// The uid or gid stored at `index` in the id table.
    pub fn id(&self, index: u16) -> Result<u32> {
        let mut b = [0u8; 4];
        self.ids.read_entry(self, index as u64, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
