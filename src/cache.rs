//! The one memory budget: a concurrent cache weighted by bytes, holding decompressed blocks
//! and whatever the archive decodes from them (block lists, directory positions).
//!
//! quick_cache is sharded (no global lock) and weighs entries by their byte size. Its
//! placeholder guards mean a thread that asks for an entry another thread is loading waits
//! for that result instead of loading it a second time. The cache is generic over its key
//! and value: the archive, which knows what it stores, defines both, so this layer knows
//! nothing of the SquashFS layout.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

/// Which table or area a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Metadata,
    Fragment,
    Data,
}

/// A decompressed block and how many bytes it occupies on disk (metadata blocks are
/// chained: the next one starts right after this one's on-disk bytes).
#[derive(Debug)]
pub struct Block {
    pub data: Vec<u8>,
    pub disk_len: u32,
}

/// Something the cache can hold: it says how much memory it keeps alive.
pub trait Weigh {
    /// Bytes held, including a little bookkeeping, so tiny entries still cost something.
    fn weight(&self) -> u64;
}

/// Bookkeeping per cache entry (the table slot, the Arc and its counts), roughly.
pub const ENTRY_OVERHEAD: u64 = 64;

impl Weigh for Block {
    fn weight(&self) -> u64 {
        self.data.capacity() as u64 + ENTRY_OVERHEAD
    }
}

/// Buffers of evicted blocks, kept for the next blocks to decompress into, once
/// [`tune_for_serving`] turned recycling on. Reusing them saves mapping, faulting in and
/// unmapping fresh memory for every block (the allocator maps large buffers afresh, see
/// there), which cost a sequential read a quarter of its time.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static RECYCLE: AtomicBool = AtomicBool::new(false);
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

/// Tune this process's memory for a long-running server. Call once, before the threads
/// that serve requests start.
///
/// - Every thread's allocations go to one glibc heap. glibc gives each allocating thread
///   its own arena, and a block freed by cache eviction goes back to the arena of the
///   thread that decompressed it: with request and read-ahead threads all loading blocks,
///   freed space in one arena was seldom reused by the others and the server's RSS reached
///   2.5 times the cache budget. In one arena every freed block is reused; blocks are
///   large, so the shared lock is taken rarely.
/// - Buffers of 64 KiB and more are mapped by the allocator and unmapped when freed, so
///   memory the cache lets go of goes back to the system at once...
/// - ...and, as that makes every fresh block buffer a fresh mapping, the buffers of evicted
///   blocks are recycled (a few of them, see [`block_buffer`]).
pub fn tune_for_serving() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes tuning parameters of the allocator; it is called before
    // other threads allocate, and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, SPARE_MIN_CAPACITY as i32);
    }
    RECYCLE.store(true, Ordering::Relaxed);
}

/// Give the spare buffers back to the allocator (an idle server keeps nothing it does not
/// need). Returns the bytes released.
pub fn release_spare_buffers() -> u64 {
    let drained: Vec<Vec<u8>> =
        std::mem::take(&mut *SPARE.lock().unwrap_or_else(|p| p.into_inner()));
    drained.iter().map(|b| b.capacity() as u64).sum()
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.data.capacity() >= SPARE_MIN_CAPACITY && RECYCLE.load(Ordering::Relaxed) {
            let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_MAX {
                spare.push(std::mem::take(&mut self.data));
            }
        }
    }
}

#[derive(Clone)]
struct ByWeight;

impl<K, V: Weigh> Weighter<K, V> for ByWeight {
    fn weight(&self, _key: &K, val: &V) -> u64 {
        val.weight()
    }
}

/// The share of the budget for entries used more than once; the rest holds new ones.
const HOT_SHARE: f64 = 0.5;

/// A byte-budgeted cache shared by every reader of one archive.
pub struct BudgetCache<K, V> {
    cache: Cache<K, V, ByWeight>,
    budget: u64,
}

impl<K, V> BudgetCache<K, V>
where
    K: Eq + Hash + Clone,
    V: Weigh + Clone,
{
    /// A cache holding up to `budget_bytes`, expecting entries of `typical_weight` bytes.
    pub fn new(budget_bytes: u64, typical_weight: u64) -> Self {
        let items = (budget_bytes / typical_weight.max(1)).clamp(16, 1 << 20) as usize;
        let options = OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(budget_bytes.max(1))
            // quick_cache admits new entries to a cold ring and evicts its unreferenced
            // ones first; by default that ring is 3% of the budget. Blocks read ahead wait
            // there until their reader arrives, and with 3% (a block or two per shard) they
            // were evicted first: a sequential read decompressed most blocks twice. Half the
            // budget holds every reader's window, and the other half still keeps what is
            // used again (metadata, fragments) from being flushed by a long stream.
            .hot_allocation(HOT_SHARE)
            .build()
            .expect("a positive capacity and item estimate are valid options");
        BudgetCache {
            cache: Cache::with_options(
                options,
                ByWeight,
                DefaultHashBuilder::default(),
                Default::default(),
            ),
            budget: budget_bytes,
        }
    }

    /// The entry for `key`, loading it with `load` if it is not cached. Concurrent callers
    /// for the same key wait for the one load. A failed load caches nothing.
    pub fn get_or_load<E>(&self, key: &K, load: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        self.cache.get_or_insert_with(key, load)
    }

    /// The entry for `key` if cached.
    pub fn get(&self, key: &K) -> Option<V> {
        self.cache.get(key)
    }

    /// Whether `key` is cached, without counting it as a use.
    pub fn contains(&self, key: &K) -> bool {
        self.cache.contains_key(key)
    }

    /// Insert an entry loaded elsewhere (read-ahead).
    pub fn insert(&self, key: K, value: V) {
        self.cache.insert(key, value);
    }

    /// Drop the entry for `key`, if cached.
    pub fn remove(&self, key: &K) {
        self.cache.remove(key);
    }

    /// Drop every entry.
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Bytes currently held.
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    use std::sync::Arc;

    #[derive(Clone)]
    struct Held(Arc<Block>);

    impl Weigh for Held {
        fn weight(&self) -> u64 {
            self.0.weight()
        }
    }

    fn block(len: usize) -> Held {
        Held(Arc::new(Block {
            data: vec![0u8; len],
            disk_len: 1,
        }))
    }

    #[test]
    fn stays_within_budget() {
        let c = BudgetCache::new(1 << 20, 32 << 10);
        for i in 0..100u64 {
            c.get_or_load::<()>(&i, || Ok(block(64 << 10))).unwrap();
        }
        assert!(c.weight() <= 1 << 20, "weight {}", c.weight());
    }

    /// A sequential reader with read-ahead: blocks land `ahead` blocks before the reader
    /// asks for them, while some blocks are used again and again (metadata, fragments).
    #[test]
    fn blocks_read_ahead_are_still_there_when_their_reader_arrives() {
        const BLOCK: usize = 128 << 10;
        let c = BudgetCache::new(64 << 20, 32 << 10);
        let ahead = 32; // MAX_WINDOW_BYTES of read-ahead
        let mut missed = 0;
        for i in 0..4096u64 {
            c.insert((i + ahead) * BLOCK as u64, block(BLOCK));
            if c.get(&(i * BLOCK as u64)).is_none() && i >= ahead {
                missed += 1;
            }
            // The same few blocks used throughout.
            c.get_or_load::<()>(&(1 << 40 | (i % 8)), || Ok(block(BLOCK)))
                .unwrap();
        }
        assert_eq!(missed, 0, "blocks evicted before their reader reached them");
        assert!(c.weight() <= 64 << 20);
    }

    #[test]
    fn concurrent_callers_load_once() {
        let c = Arc::new(BudgetCache::new(1 << 20, 32 << 10));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                let loads = loads.clone();
                std::thread::spawn(move || {
                    c.get_or_load::<()>(&7u64, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(Held(Arc::new(Block {
                            data: vec![7u8; 10],
                            disk_len: 1,
                        })))
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(&t.join().unwrap().0.data[..], &[7u8; 10]);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn failed_load_is_not_cached() {
        let c = BudgetCache::new(1 << 20, 32 << 10);
        assert!(c.get_or_load(&1u64, || Err::<Held, _>("bad")).is_err());
        let b = c.get_or_load::<()>(&1u64, || Ok(block(1))).unwrap();
        assert_eq!(b.0.data.len(), 1);
    }

    #[test]
    fn clearing_empties_the_cache() {
        let c = BudgetCache::new(1 << 20, 32 << 10);
        for i in 0..4u64 {
            c.insert(i, block(1000));
        }
        assert!(c.weight() > 0);
        c.clear();
        assert_eq!(c.weight(), 0);
        assert!(c.is_empty());
    }
}
