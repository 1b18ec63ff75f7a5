//! What the archive keeps in its one memory budget: decompressed blocks, runs of decoded
//! block lists, and positions inside directory listings. One cache holds all three, so the
//! budget follows the workload (a tree walk fills it with metadata, a large read with data)
//! and nothing an image describes is kept outside it.

use std::sync::Arc;

use crate::cache::{Block, BlockKind, Weigh, ENTRY_OVERHEAD};
use crate::error::{Error, Result};

use super::blocks::BlockRun;
use super::dir::ListingSeek;
use super::metadata::MetaPos;

/// What an entry of the archive's cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CacheKey {
    /// A decompressed block, by its image offset.
    Block { kind: BlockKind, offset: u64 },
    /// Run `run` of the block list that starts at `list` in the inode table.
    BlockRun { list: MetaPos, run: u64 },
    /// Where the listing that starts at `listing` continues at readdir position `cookie`.
    ListingSeek { listing: MetaPos, cookie: u64 },
}

/// An entry of the archive's cache.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    Block(Arc<Block>),
    BlockRun(Arc<BlockRun>),
    ListingSeek(ListingSeek),
}

impl Weigh for Cached {
    fn weight(&self) -> u64 {
        match self {
            Cached::Block(b) => b.weight(),
            Cached::BlockRun(r) => r.weight(),
            Cached::ListingSeek(_) => std::mem::size_of::<ListingSeek>() as u64 + ENTRY_OVERHEAD,
        }
    }
}

/// An entry found under a key of another kind: a bug in this module's callers, never
/// something an image can cause, but answered as an error rather than a panic.
fn mismatch(want: &str) -> Error {
    Error::corrupt(format!(
        "internal error: the cache held no {want} where one was stored"
    ))
}

impl Cached {
    pub(crate) fn into_block(self) -> Result<Arc<Block>> {
        match self {
            Cached::Block(b) => Ok(b),
            _ => Err(mismatch("block")),
        }
    }

    pub(crate) fn into_block_run(self) -> Result<Arc<BlockRun>> {
        match self {
            Cached::BlockRun(r) => Ok(r),
            _ => Err(mismatch("block list run")),
        }
    }

    pub(crate) fn into_listing_seek(self) -> Option<ListingSeek> {
        match self {
            Cached::ListingSeek(s) => Some(s),
            _ => None,
        }
    }
}
