//! Where each file is being read, for read-ahead. Files are opened without a handle to keep
//! it in (no-open, see the adapter), so it is kept by node, for a bounded number of files:
//! past the bound an old entry goes, and its reader, if it comes back, starts a new stream
//! with a small window. Losing one costs read-ahead, never correctness.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::archive::readahead::Stream;

/// Shards, and streams kept per shard: 1,024 files read at once, about 64 KiB.
const SHARDS: usize = 16;
const PER_SHARD: usize = 64;

/// One shard: streams by node.
type Shard = Mutex<HashMap<u64, Arc<Stream>>>;

/// The read-ahead state of the files being read.
#[derive(Debug)]
pub struct Streams {
    shards: Box<[Shard]>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Streams {
    /// The stream of node `node`, made at its first read.
    pub fn of(&self, node: u64) -> Arc<Stream> {
        let mut shard = self.shards[(node % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shard.get(&node) {
            return s.clone();
        }
        if shard.len() >= PER_SHARD {
            // Any one will do: the map's order is as good as random.
            if let Some(&old) = shard.keys().next() {
                shard.remove(&old);
            }
        }
        shard.entry(node).or_default().clone()
    }

    /// Forget every stream (an idle server keeps nothing).
    pub fn clear(&self) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Streams kept.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no stream is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_stream() {
        let s = Streams::default();
        let a = s.of(9);
        assert!(Arc::ptr_eq(&a, &s.of(9)));
        assert!(!Arc::ptr_eq(&a, &s.of(10)));
    }

    #[test]
    fn streams_stay_within_their_bound() {
        let s = Streams::default();
        for node in 0..100_000 {
            s.of(node);
        }
        assert!(s.len() <= SHARDS * PER_SHARD, "{} streams", s.len());
        s.clear();
        assert!(s.is_empty());
    }
}
