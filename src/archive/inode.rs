//! Inodes: the 14 SquashFS inode types, decoded into one [`Inode`]. A regular file's block
//! list is not decoded with it: the inode records where the list is, and reads decode the
//! part they need (see [`blocks`](super::blocks)), so an inode costs the same to decode and
//! to keep whatever size its file claims.

use crate::error::{Error, Result};

use super::metadata::{Fields, MetaPos, MetadataReader};
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
    /// Blocks stored in the data area (every full block, and the tail of a file without a
    /// fragment): the length of the block list.
    pub block_count: u64,
    /// Where the block list starts: right after the inode, in the inode table.
    pub list: MetaPos,
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
/// Most blocks of a file sifuse reads: 64 GiB at 4 KiB blocks, 2 TiB at 128 KiB, 16 TiB at
/// 1 MiB. Finding block i decodes the list up to it (once; the runs are cached), and a
/// hostile image can describe a list far longer than itself (zero words for sparse blocks
/// compress to nothing), so the position a read may reach needs a ceiling that bounds the
/// work of one read: 64 MiB of list. Larger files still stat as the kernel shows them.
pub const MAX_FILE_BLOCKS: u64 = 1 << 24;
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
        let mut r = self.inode_reader(iref)?;
        self.decode_inode(iref, &mut r)
    }

    /// Decode the inode at `iref`, and find where the next inode of the table starts
    /// (after its block list or directory index). Inodes are written in directory order,
    /// so the ones that follow a file are mostly its neighbours.
    pub fn inode_and_next(&self, iref: InodeRef) -> Result<(Inode, Option<InodeRef>)> {
        let mut r = self.inode_reader(iref)?;
        let inode = self.decode_inode(iref, &mut r)?;
        match &inode.body {
            InodeBody::File(f) => r.skip(f.block_count * 4)?,
            InodeBody::Directory(d) => {
                for _ in 0..d.index_count {
                    let header: [u8; 12] = r.array()?;
                    let len = Fields(&header).u32(8) as u64 + 1;
                    if len > super::dir::MAX_NAME as u64 {
                        return Err(Error::corrupt(format!(
                            "directory index name of {len} bytes"
                        )));
                    }
                    r.skip(len)?;
                }
            }
            _ => {}
        }
        let end = r.position();
        if end.block >= self.sb.directory_table {
            return Ok((inode, None));
        }
        // The end of a block is the start of the next: references point at the next.
        let next = match r.next_position() {
            Ok(p) => p,
            Err(_) => return Ok((inode, None)),
        };
        if next.block >= self.sb.directory_table {
            return Ok((inode, None));
        }
        let block = next.block - self.sb.inode_table;
        Ok((inode, Some(InodeRef(block << 16 | next.offset as u64))))
    }

    fn inode_reader(&self, iref: InodeRef) -> Result<MetadataReader<'_>> {
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
        Ok(MetadataReader::new(
            self,
            MetaPos {
                block,
                offset: iref.offset(),
            },
        ))
    }

    fn decode_inode(&self, iref: InodeRef, r: &mut MetadataReader<'_>) -> Result<Inode> {
        // The header every type shares: type, mode, uid and gid indexes, mtime, number.
        let head: [u8; 16] = r.array()?;
        let head = Fields(&head);
        let inode_type = head.u16(0);
        let kind = FileKind::from_type(inode_type).ok_or_else(|| {
            Error::corrupt(format!("inode {:#x} has unknown type {inode_type}", iref.0))
        })?;
        let extended = inode_type >= 8;
        let permissions = head.u16(2) & 0o7777;
        let (uid_index, gid_index) = (head.u16(4), head.u16(6));
        let mtime = head.u32(8);
        let number = head.u32(12);
        if number == 0 || number > self.sb.inode_count {
            return Err(Error::corrupt(format!(
                "inode {:#x} has number {number}, outside 1..={}",
                iref.0, self.sb.inode_count
            )));
        }
        let mut xattr = NO_INDEX;
        let (nlink, body) = match (kind, extended) {
            (FileKind::Directory, false) => {
                let b: [u8; 16] = r.array()?;
                let f = Fields(&b);
                (
                    f.u32(4),
                    InodeBody::Directory(DirInfo {
                        start_block: f.u32(0),
                        offset: f.u16(10),
                        file_size: u32::from(f.u16(8)),
                        parent: f.u32(12),
                        index_count: 0,
                        index_pos: None,
                    }),
                )
            }
            (FileKind::Directory, true) => {
                let b: [u8; 24] = r.array()?;
                let f = Fields(&b);
                xattr = f.u32(20);
                (
                    f.u32(0),
                    InodeBody::Directory(DirInfo {
                        start_block: f.u32(8),
                        offset: f.u16(18),
                        file_size: f.u32(4),
                        parent: f.u32(12),
                        index_count: f.u16(16),
                        index_pos: Some(r.position()),
                    }),
                )
            }
            (FileKind::File, false) => {
                let b: [u8; 16] = r.array()?;
                let f = Fields(&b);
                let file = self.file_info(
                    iref,
                    u64::from(f.u32(0)),
                    u64::from(f.u32(12)),
                    0,
                    f.u32(4),
                    f.u32(8),
                    r.position(),
                )?;
                (1, InodeBody::File(file))
            }
            (FileKind::File, true) => {
                let b: [u8; 40] = r.array()?;
                let f = Fields(&b);
                xattr = f.u32(36);
                let file = self.file_info(
                    iref,
                    f.u64(0),
                    f.u64(8),
                    f.u64(16),
                    f.u32(28),
                    f.u32(32),
                    r.position(),
                )?;
                (f.u32(24), InodeBody::File(file))
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

    /// A regular file's data layout, checked as far as it can be without its block list.
    #[allow(clippy::too_many_arguments)]
    fn file_info(
        &self,
        iref: InodeRef,
        blocks_start: u64,
        file_size: u64,
        sparse: u64,
        frag: u32,
        frag_offset: u32,
        list: MetaPos,
    ) -> Result<FileInfo> {
        let bs = self.sb.block_size as u64;
        let fragment = (frag != NO_INDEX).then_some(FragmentRef {
            index: frag,
            offset: frag_offset,
        });
        let block_count = if fragment.is_some() {
            file_size / bs
        } else {
            file_size.div_ceil(bs)
        };
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
        Ok(FileInfo {
            blocks_start,
            file_size,
            sparse,
            fragment,
            block_count,
            list,
        })
    }

    /// The uid or gid stored at `index` in the id table.
    pub fn id(&self, index: u16) -> Result<u32> {
        let loaded = self.ids_loaded.get_or_init(|| {
            (0..self.ids.len())
                .map(|i| {
                    let mut b = [0u8; 4];
                    self.ids.read_entry(self, i, &mut b)?;
                    Ok(u32::from_le_bytes(b))
                })
                .collect::<Result<Box<[u32]>>>()
                .ok()
        });
        if let Some(id) = loaded.as_ref().and_then(|ids| ids.get(index as usize)) {
            return Ok(*id);
        }
        let mut b = [0u8; 4];
        self.ids.read_entry(self, index as u64, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
