//! Open files and directories, when the adapter hands out handles (only under an idle
//! timeout, which must know what is open). A handle keeps what open decoded (a file's
//! inode and read position, a directory's listing) for the reads and readdirs on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::archive::readahead::Stream;
use crate::archive::Inode;

/// An open regular file, and where its reader is, for read-ahead.
#[derive(Debug)]
pub struct OpenFile {
    pub inode: Arc<Inode>,
    pub stream: Arc<Stream>,
}

/// Handles of one kind, by the id given to the kernel.
#[derive(Debug)]
pub struct HandleTable<T> {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        HandleTable {
            next: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> HandleTable<T> {
    /// Keep `value`; returns its handle id.
    pub fn insert(&self, value: impl Into<Arc<T>>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, value.into());
        id
    }

    /// The value behind handle `id`.
    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.lock().get(&id).cloned()
    }

    /// Drop handle `id`; returns whether it existed.
    pub fn remove(&self, id: u64) -> bool {
        self.lock().remove(&id).is_some()
    }

    /// Handles open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove() {
        let t = HandleTable::default();
        let a = t.insert("a");
        let b = t.insert("b");
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(t.get(a).as_deref(), Some(&"a"));
        assert!(t.remove(a));
        assert!(!t.remove(a));
        assert!(t.get(a).is_none());
        assert_eq!(t.len(), 1);
    }
}
