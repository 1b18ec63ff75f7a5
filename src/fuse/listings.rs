//! Parsed directory listings, by directory. The kernel opens directories without asking the
//! server (see [`ArchiveFs`](super::ArchiveFs) on no-open), so there is no open handle to
//! keep a listing in between the readdir calls that page through it: they find it here.
//!
//! Bounded by bytes. A listing too big for the cache (a directory of some 50,000 entries
//! or more) is kept in a slot of its own until another such listing replaces it, so that
//! paging through a huge directory parses it once, not once per page.

use std::sync::{Arc, Mutex};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use crate::archive::{Archive, DirEntry, Inode, InodeRef};

/// Bytes of parsed listings kept.
pub const LISTINGS_BUDGET: u64 = 16 << 20;
/// Shards of the cache: few, since each bounds the largest listing it can hold.
const SHARDS: usize = 4;

/// A directory's entries in stored order, and the numbers `.` and `..` report.
#[derive(Debug)]
pub struct Listing {
    /// The directory's own inode.
    pub iref: InodeRef,
    pub number: u32,
    pub parent: u32,
    pub entries: Vec<DirEntry>,
    /// Memory held, roughly: weighed once, as readdir asks for a listing per page.
    weight: u64,
}

impl Listing {
    pub fn new(iref: InodeRef, number: u32, parent: u32, entries: Vec<DirEntry>) -> Self {
        let held: usize = entries
            .iter()
            .map(|e| std::mem::size_of::<DirEntry>() + e.name.capacity())
            .sum();
        Listing {
            iref,
            number,
            parent,
            entries,
            weight: (held + std::mem::size_of::<Listing>()) as u64,
        }
    }
}

#[derive(Clone)]
struct ListingWeighter;

impl Weighter<InodeRef, Arc<Listing>> for ListingWeighter {
    fn weight(&self, _key: &InodeRef, listing: &Arc<Listing>) -> u64 {
        listing.weight
    }
}

/// Listings of recently read directories.
pub struct Listings {
    cache: Cache<InodeRef, Arc<Listing>, ListingWeighter>,
    /// The latest listing too heavy for one shard of the cache.
    oversized: Mutex<Option<(InodeRef, Arc<Listing>)>>,
    shard_budget: u64,
}

impl std::fmt::Debug for Listings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listings")
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Default for Listings {
    fn default() -> Self {
        Self::with_budget(LISTINGS_BUDGET)
    }
}

impl Listings {
    /// A cache of up to `budget` bytes of listings.
    pub fn with_budget(budget: u64) -> Self {
        let budget = budget.max(SHARDS as u64);
        let options = OptionsBuilder::new()
            // Directories average well under 4 KiB of listing.
            .estimated_items_capacity((budget / 4096).clamp(16, 1 << 16) as usize)
            .weight_capacity(budget)
            .shards(SHARDS)
            .build()
            .expect("a positive capacity and a power-of-two shard count are valid options");
        Listings {
            cache: Cache::with_options(
                options,
                ListingWeighter,
                DefaultHashBuilder::default(),
                Default::default(),
            ),
            oversized: Mutex::new(None),
            shard_budget: budget / SHARDS as u64,
        }
    }

    /// The listing of the directory `iref`, parsed with `load` if not kept. Concurrent
    /// callers for one directory wait for a single parse.
    pub fn get_or_load<E>(
        &self,
        iref: InodeRef,
        load: impl FnOnce() -> Result<Listing, E>,
    ) -> Result<Arc<Listing>, E> {
        if let Some(hit) = self.oversized_hit(iref) {
            return Ok(hit);
        }
        let listing = self
            .cache
            .get_or_insert_with(&iref, || load().map(Arc::new))?;
        // A listing heavier than its shard was returned but not kept.
        if listing.weight * 2 > self.shard_budget {
            *self.oversized.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((iref, listing.clone()));
        }
        Ok(listing)
    }

    /// The listing of directory `dir` of `archive`, parsed if not kept.
    pub fn of(&self, archive: &Archive, dir: &Inode) -> crate::Result<Arc<Listing>> {
        let parent = dir
            .as_dir()
            .ok_or_else(|| crate::Error::NotADirectory(format!("inode {}", dir.number)))?
            .parent;
        self.get_or_load(dir.iref, || {
            let entries = archive.read_dir(dir)?;
            Ok(Listing::new(dir.iref, dir.number, parent, entries))
        })
    }

    fn oversized_hit(&self, iref: InodeRef) -> Option<Arc<Listing>> {
        let slot = self.oversized.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|(key, _)| *key == iref)
            .map(|(_, listing)| listing.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::FileKind;
    use std::cell::Cell;

    fn listing(entries: usize) -> Listing {
        Listing::new(
            InodeRef(0x40),
            2,
            1,
            (0..entries)
                .map(|i| DirEntry {
                    name: format!("entry-{i:06}").into_bytes(),
                    iref: InodeRef(i as u64),
                    inode_number: i as u32 + 3,
                    kind: FileKind::File,
                })
                .collect(),
        )
    }

    #[test]
    fn parses_each_directory_once() {
        let listings = Listings::default();
        let parses = Cell::new(0);
        for _ in 0..3 {
            for dir in [10, 20] {
                let got = listings
                    .get_or_load(InodeRef(dir), || {
                        parses.set(parses.get() + 1);
                        Ok::<_, ()>(listing(dir as usize))
                    })
                    .unwrap();
                assert_eq!(got.entries.len(), dir as usize);
            }
        }
        assert_eq!(parses.get(), 2);
    }

    #[test]
    fn a_failed_parse_is_not_kept() {
        let listings = Listings::default();
        assert_eq!(
            listings
                .get_or_load(InodeRef(1), || Err::<Listing, _>("bad"))
                .unwrap_err(),
            "bad"
        );
        let got = listings.get_or_load(InodeRef(1), || Ok::<_, ()>(listing(4)));
        assert_eq!(got.unwrap().entries.len(), 4);
    }

    #[test]
    fn a_listing_bigger_than_the_cache_is_parsed_once_while_it_is_paged() {
        // 64 KiB of budget; 5,000 entries weigh far more.
        let listings = Listings::with_budget(64 << 10);
        let parses = Cell::new(0);
        let load = || {
            parses.set(parses.get() + 1);
            Ok::<_, ()>(listing(5000))
        };
        for _ in 0..10 {
            listings.get_or_load(InodeRef(7), load).unwrap();
        }
        assert_eq!(parses.get(), 1);
        // Another big one takes the slot; the first is parsed again when asked.
        listings.get_or_load(InodeRef(8), load).unwrap();
        listings.get_or_load(InodeRef(7), load).unwrap();
        assert_eq!(parses.get(), 3);
    }

    #[test]
    fn the_cache_stays_within_its_budget() {
        let listings = Listings::with_budget(256 << 10);
        for dir in 0..2000 {
            listings
                .get_or_load(InodeRef(dir), || Ok::<_, ()>(listing(50)))
                .unwrap();
        }
        assert!(listings.cache.weight() <= 256 << 10);
    }
}
