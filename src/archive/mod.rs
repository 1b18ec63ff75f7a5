//! The lazy SquashFS 4.0 reader. Opening reads the superblock, the compressor options and
//! the root inode; every table index, inode, directory and block is read on first use and
//! kept in the shared block cache. One file per on-disk structure, as in squashfuse.

pub mod blocks;
mod cached;
pub mod dir;
pub mod file;
pub mod inode;
pub mod metadata;
pub mod readahead;
pub mod superblock;
pub mod table;
pub mod xattr;

use std::sync::Arc;

use crate::cache::{BlockKind, BudgetCache};
use crate::error::{Error, Result};
use crate::source::ReadAt;

pub use blocks::BlockLocation;
pub use dir::{DirEntry, EntryRef};
pub use file::{BlockData, FileBytes};
pub use inode::{DirInfo, FileInfo, FileKind, Inode, InodeBody, InodeRef};
pub use superblock::{CompressorOptions, Superblock};
pub use xattr::Xattr;

use cached::{CacheKey, Cached};
use metadata::{MetaPos, MetadataReader};
use superblock::{flags, NO_TABLE, SUPERBLOCK_LEN};
use table::LookupTable;

/// Default cache budget: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// An open SquashFS image.
pub struct Archive {
    source: Arc<dyn ReadAt>,
    pub(crate) sb: Superblock,
    options: Option<CompressorOptions>,
    pub(crate) cache: BudgetCache<CacheKey, Cached>,
    ids: LookupTable,
    /// The whole id table, once read: at most 65,536 ids (256 KiB), and every inode
    /// decoded needs two of them. `None` when it could not be read whole; single entries
    /// are then read one by one.
    ids_loaded: std::sync::OnceLock<Option<Box<[u32]>>>,
    fragments: LookupTable,
    exports: Option<LookupTable>,
    xattr: xattr::XattrSlot,
    root: Inode,
    /// The fragment blocks in the cache, oldest first (see [`file::FRAGMENT_BYTES_KEPT`]).
    recent_fragments: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("superblock", &self.sb)
            .finish_non_exhaustive()
    }
}

impl Archive {
    /// Open the SquashFS image that fills `source`, with a block cache of `cache_bytes`.
    pub fn open(source: Arc<dyn ReadAt>, cache_bytes: u64) -> Result<Archive> {
        let mut raw = [0u8; SUPERBLOCK_LEN];
        if source.len() < SUPERBLOCK_LEN as u64 {
            return Err(Error::NotAnImage(format!(
                "{} bytes is too small for a SquashFS superblock",
                source.len()
            )));
        }
        source.read_exact_at(&mut raw, 0).map_err(|e| Error::Read {
            offset: 0,
            source: e,
        })?;
        let sb = Superblock::parse(&raw, source.len())?;
        let ids = LookupTable::new("id table", sb.id_table, sb.id_count as u64, 4);
        let fragments = LookupTable::new(
            "fragment table",
            if sb.fragment_table == NO_TABLE {
                0
            } else {
                sb.fragment_table
            },
            if sb.fragment_table == NO_TABLE {
                0
            } else {
                sb.fragment_count as u64
            },
            16,
        );
        let exports = (sb.export_table != NO_TABLE)
            .then(|| LookupTable::new("export table", sb.export_table, sb.inode_count as u64, 8));
        let mut archive = Archive {
            source,
            sb,
            options: None,
            // Blocks average a few KiB (metadata) to 128 KiB (data).
            cache: BudgetCache::new(cache_bytes, 16 << 10),
            ids,
            ids_loaded: Default::default(),
            fragments,
            exports,
            xattr: Default::default(),
            // Replaced below once the reader can decode it.
            root: placeholder_root(),
            recent_fragments: Default::default(),
        };
        if archive.sb.has(flags::COMPRESSOR_OPTIONS) {
            let mut r = MetadataReader::new(
                &archive,
                MetaPos {
                    block: SUPERBLOCK_LEN as u64,
                    offset: 0,
                },
            );
            let mut b = [0u8; 8];
            let n = match archive.sb.compressor {
                crate::codec::Compressor::Zstd => 4,
                _ => 8,
            };
            r.read(&mut b[..n])?;
            archive.options = Some(CompressorOptions::parse(archive.sb.compressor, &b[..n])?);
        }
        let root = archive.inode(InodeRef(archive.sb.root_inode))?;
        if root.kind != FileKind::Directory {
            return Err(Error::corrupt("the root inode is not a directory"));
        }
        archive.root = root;
        Ok(archive)
    }

    /// The validated superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Compressor options, when the image stores them.
    pub fn compressor_options(&self) -> Option<&CompressorOptions> {
        self.options.as_ref()
    }

    /// The root directory.
    pub fn root(&self) -> &Inode {
        &self.root
    }

    /// Bytes the archive's cache holds now.
    pub fn cache_weight(&self) -> u64 {
        self.cache.weight()
    }

    /// The archive's memory budget in bytes.
    pub fn cache_budget(&self) -> u64 {
        self.cache.budget()
    }

    /// Drop everything the archive caches, and what its source holds for speed (an idle
    /// server gives its memory back; the next request reads what it needs again).
    pub fn drop_caches(&self) {
        self.cache.clear();
        self.source.let_go();
    }

    /// Whether the image has an xattr table at all (the kernel answers listxattr on some
    /// inodes of an image without one with EOPNOTSUPP).
    pub fn has_xattr_table(&self) -> bool {
        self.sb.xattr_table != NO_TABLE
    }

    /// Whether the image has an export table (numbers lead to inodes without a walk).
    pub fn has_export_table(&self) -> bool {
        self.exports.is_some()
    }

    /// Whether the data block at image offset `offset` is cached (read-ahead skips those).
    pub fn is_data_block_cached(&self, offset: u64) -> bool {
        self.cache.contains(&CacheKey::Block {
            kind: BlockKind::Data,
            offset,
        })
    }

    /// The image bytes.
    pub fn source(&self) -> &Arc<dyn ReadAt> {
        &self.source
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.source
            .read_exact_at(buf, offset)
            .map_err(|e| Error::Read { offset, source: e })
    }

    /// The inode reference of inode number `number`, through the export table (absent
    /// when the image was made with -no-exports).
    pub fn inode_ref_by_number(&self, number: u32) -> Result<Option<InodeRef>> {
        let Some(t) = &self.exports else {
            return Ok(None);
        };
        if number == 0 {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        t.read_entry(self, number as u64 - 1, &mut b)?;
        Ok(Some(InodeRef(u64::from_le_bytes(b))))
    }

    /// Resolve a path inside the image (`/` separated, relative to the root; symlinks are
    /// not followed).
    pub fn resolve(&self, path: &[u8]) -> Result<Inode> {
        let mut cur = self.root.clone();
        let mut walked = Vec::new();
        for comp in path
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            walked.push(String::from_utf8_lossy(comp).into_owned());
            if comp == b".." {
                return Err(Error::NotFound(format!(
                    "/{}: '..' is not supported in image paths",
                    walked.join("/")
                )));
            }
            if cur.kind != FileKind::Directory {
                return Err(Error::NotADirectory(format!(
                    "/{}",
                    walked[..walked.len() - 1].join("/")
                )));
            }
            let entry = self
                .lookup(&cur, comp)?
                .ok_or_else(|| Error::NotFound(format!("/{}", walked.join("/"))))?;
            cur = self.inode(entry.iref)?;
        }
        Ok(cur)
    }

    /// Statistics for statfs, as the kernel's squashfs_statfs reports them: the SquashFS
    /// block size, and the image size in those blocks, rounded up.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            block_size: self.sb.block_size,
            blocks: self.sb.bytes_used.div_ceil(self.sb.block_size as u64),
            files: self.sb.inode_count as u64,
            name_max: dir::MAX_NAME as u32,
        }
    }
}

/// Figures statfs reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub files: u64,
    pub name_max: u32,
}

fn placeholder_root() -> Inode {
    Inode {
        iref: InodeRef(0),
        number: 0,
        kind: FileKind::Directory,
        permissions: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
        nlink: 0,
        xattr_index: None,
        extended: false,
        body: InodeBody::Ipc,
    }
}

#[cfg(test)]
mod tests;
