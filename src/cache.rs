//! The concurrent, byte-budgeted cache of decompressed blocks.
//!
//! quick_cache is sharded (no global lock) and weighs entries by their byte size. Its
//! placeholder guards mean a thread that asks for a block another thread is decompressing
//! waits for that result instead of decompressing the block a second time.

use std::sync::{Arc, Mutex};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

/// Which table or area a block belongs to; blocks are keyed by kind and disk offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Metadata,
    Fragment,
    Data,
}

/// Cache key: the block's kind and its byte offset in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub kind: BlockKind,
    pub offset: u64,
}

/// A decompressed block and how many bytes it occupies on disk (metadata blocks are
/// chained: the next one starts right after this one's on-disk bytes).
#[derive(Debug)]
pub struct Block {
    pub data: Vec<u8>,
    pub disk_len: u32,
}

/// Buffers of evicted blocks, kept for the next blocks to decompress into. Reusing them
/// saves mapping, faulting in and unmapping fresh memory for every block (large buffers
/// are mmap'd by the allocator, see `fuse::limit_malloc_arenas`), which cost a sequential
/// read a quarter of its time.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Spare buffers kept, at most: a few blocks' worth (16 MiB at the largest block size).
const SPARE_MAX: usize = 16;
/// Smaller buffers come from the allocator's bins, which reuse them well enough.
const SPARE_MIN_CAPACITY: usize = 64 << 10;

/// An empty buffer with room for `capacity` bytes, recycled from an evicted block when
/// one is spare.
pub fn block_buffer(capacity: usize) -> Vec<u8> {
    if capacity >= SPARE_MIN_CAPACITY {
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = spare.iter().position(|b| b.capacity() >= capacity) {
            let mut b = spare.swap_remove(i);
            b.clear();
            return b;
        }
    }
    Vec::with_capacity(capacity)
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.data.capacity() >= SPARE_MIN_CAPACITY {
            let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_MAX {
                spare.push(std::mem::take(&mut self.data));
            }
        }
    }
}

#[derive(Clone)]
struct ByteWeighter;

impl Weighter<BlockKey, Arc<Block>> for ByteWeighter {
    fn weight(&self, _key: &BlockKey, val: &Arc<Block>) -> u64 {
        // The memory held, and a little bookkeeping per entry so tiny blocks still cost
        // something.
        val.data.capacity() as u64 + 64
    }
}

/// The share of the budget for blocks used more than once; the rest holds new ones.
const HOT_SHARE: f64 = 0.5;

/// Decompressed blocks, shared by every reader of one archive.
pub struct BlockCache {
    cache: Cache<BlockKey, Arc<Block>, ByteWeighter>,
    budget: u64,
}

impl BlockCache {
    /// A cache holding up to `budget_bytes` of decompressed data.
    pub fn new(budget_bytes: u64) -> Self {
        // quick_cache wants an item estimate for its table sizing; assume 32 KiB blocks.
        let items = (budget_bytes / 32768).clamp(16, 1 << 20) as usize;
        let options = OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(budget_bytes.max(1))
            // quick_cache admits new blocks to a cold ring and evicts its unreferenced ones
            // first; by default that ring is 3% of the budget. Blocks read ahead wait there
            // until their reader arrives, and with 3% (a block or two per shard) they were
            // evicted first: a sequential read decompressed most blocks twice. Half the
            // budget holds every reader's window, and the other half still keeps what is
            // used again (metadata, fragments) from being flushed by a long stream.
            .hot_allocation(HOT_SHARE)
            .build()
            .expect("a positive capacity and item estimate are valid options");
        BlockCache {
            cache: Cache::with_options(
                options,
                ByteWeighter,
                DefaultHashBuilder::default(),
                Default::default(),
            ),
            budget: budget_bytes,
        }
    }

    /// The block for `key`, loading it with `load` if it is not cached. Concurrent callers
    /// for the same key wait for the one load. A failed load caches nothing.
    pub fn get_or_load<E>(
        &self,
        key: BlockKey,
        load: impl FnOnce() -> Result<Block, E>,
    ) -> Result<Arc<Block>, E> {
        self.cache.get_or_insert_with(&key, || load().map(Arc::new))
    }

    /// The block for `key` if cached.
    pub fn get(&self, key: &BlockKey) -> Option<Arc<Block>> {
        self.cache.get(key)
    }

    /// Whether `key` is cached, without counting it as a use.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.cache.contains_key(key)
    }

    /// Insert a block loaded elsewhere (read-ahead).
    pub fn insert(&self, key: BlockKey, block: Block) {
        self.cache.insert(key, Arc::new(block));
    }

    /// Bytes currently held.
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(offset: u64) -> BlockKey {
        BlockKey {
            kind: BlockKind::Data,
            offset,
        }
    }

    #[test]
    fn stays_within_budget() {
        let c = BlockCache::new(1 << 20);
        for i in 0..100 {
            c.get_or_load::<()>(key(i), || {
                Ok(Block {
                    data: vec![0u8; 64 << 10],
                    disk_len: 1,
                })
            })
            .unwrap();
        }
        assert!(c.weight() <= 1 << 20, "weight {}", c.weight());
    }

    /// A sequential reader with read-ahead: blocks land `ahead` blocks before the reader
    /// asks for them, while some blocks are used again and again (metadata, fragments).
    #[test]
    fn blocks_read_ahead_are_still_there_when_their_reader_arrives() {
        const BLOCK: usize = 128 << 10;
        let c = BlockCache::new(64 << 20);
        let block = || Block {
            data: vec![0u8; BLOCK],
            disk_len: 1,
        };
        let ahead = 32; // MAX_WINDOW_BYTES of read-ahead
        let mut missed = 0;
        for i in 0..4096u64 {
            c.insert(key((i + ahead) * BLOCK as u64), block());
            if c.get(&key(i * BLOCK as u64)).is_none() && i >= ahead {
                missed += 1;
            }
            // The same few blocks used throughout.
            c.get_or_load::<()>(key(1 << 40 | (i % 8)), || Ok(block()))
                .unwrap();
        }
        assert_eq!(missed, 0, "blocks evicted before their reader reached them");
        assert!(c.weight() <= 64 << 20);
    }

    #[test]
    fn concurrent_callers_load_once() {
        let c = Arc::new(BlockCache::new(1 << 20));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let loads = loads.clone();
                std::thread::spawn(move || {
                    c.get_or_load::<()>(key(7), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(Block {
                            data: vec![7u8; 10],
                            disk_len: 1,
                        })
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(&t.join().unwrap().data[..], &[7u8; 10]);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_load_is_not_cached() {
        let c = BlockCache::new(1 << 20);
        assert!(c.get_or_load(key(1), || Err::<Block, _>("bad")).is_err());
        let b = c
            .get_or_load::<()>(key(1), || {
                Ok(Block {
                    data: vec![1],
                    disk_len: 1,
                })
            })
            .unwrap();
        assert_eq!(&b.data[..], &[1]);
    }
}
