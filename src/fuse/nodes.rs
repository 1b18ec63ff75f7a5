//! FUSE node ids and the inodes they stand for.
//!
//! fuser 0.18 sends `attr.ino` as the node id of every entry it replies with (lookup and
//! readdirplus), and the kernel reports `attr.ino` as st_ino. So st_ino can only be the
//! SquashFS inode number if the node id is that number too. Two numbers need care: the
//! kernel's root is always node 1, while the served root has its own number S, and some
//! other inode has number 1. The two swap: the served root is node 1, the inode numbered 1
//! is node S (a number no entry inside the served tree can carry). That one inode's entry
//! replies therefore carry ino S, so the adapter gives their attributes no cache lifetime
//! and the next stat asks getattr, whose reply carries the true number.
//!
//! A number does not lead to its inode without the export table (absent from images made
//! with -no-exports), so the table remembers the inode reference of every node the kernel
//! holds, counting lookups as the kernel does and dropping a node when the kernel forgets
//! it. Hard links share their inode reference and number, hence their node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::archive::readahead::Stream;
use crate::archive::{Inode, InodeRef};

/// The kernel's id for the root of a FUSE mount.
pub const ROOT_NODE: u64 = 1;

/// Shards of the table: enough that request threads seldom wait for each other.
const SHARDS: usize = 32;

/// Why a node could not be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// Two different inodes claim one number: the image is corrupt.
    #[error("inode number {number} belongs to inodes {first:#x} and {second:#x}")]
    NumberReused {
        number: u32,
        first: u64,
        second: u64,
    },
    /// An entry inside the served tree names the served root itself: a directory loop.
    #[error("a directory entry names the served root (inode {0}): the image loops")]
    RootReentered(u32),
}

#[derive(Debug, Clone)]
struct Node {
    iref: InodeRef,
    /// Lookups the kernel has been told about and not yet forgotten.
    lookups: u64,
    /// The decoded inode, once known: getattr, open and readlink then answer without
    /// decoding it again.
    inode: Option<Arc<Inode>>,
    /// Where reads of the file are, for read-ahead: files are opened without a handle to
    /// keep it in (see no-open in the adapter), so it lives as long as the node.
    stream: Option<Arc<Stream>>,
    /// The directory the kernel first found it in (a hard link may have others).
    parent: Option<InodeRef>,
}

/// Node ids handed to the kernel, and their inode references.
#[derive(Debug)]
pub struct NodeTable {
    root_number: u32,
    root_iref: InodeRef,
    shards: Box<[Mutex<HashMap<u32, Node>>]>,
}

impl NodeTable {
    /// A table whose root (node 1) is the inode `root_iref`, numbered `root_number`.
    pub fn new(root_number: u32, root_iref: InodeRef) -> Self {
        NodeTable {
            root_number,
            root_iref,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// The node id of the inode numbered `number`.
    pub fn node_id(&self, number: u32) -> u64 {
        if number == self.root_number {
            ROOT_NODE
        } else if u64::from(number) == ROOT_NODE {
            u64::from(self.root_number)
        } else {
            u64::from(number)
        }
    }

    /// The inode number of node `node`: the inverse of [`node_id`](Self::node_id).
    pub fn number(&self, node: u64) -> Option<u32> {
        if node == ROOT_NODE {
            Some(self.root_number)
        } else if node == u64::from(self.root_number) {
            Some(ROOT_NODE as u32)
        } else {
            u32::try_from(node).ok()
        }
    }

    /// Whether the node id of `number` differs from the number, so that entry replies
    /// (which must carry the node id as ino) show a wrong st_ino until getattr corrects it.
    pub fn is_displaced(&self, number: u32) -> bool {
        self.node_id(number) != u64::from(number) && number != self.root_number
    }

    fn shard(&self, number: u32) -> &Mutex<HashMap<u32, Node>> {
        &self.shards[number as usize % SHARDS]
    }

    /// `f` of the entry of `node`, if the kernel holds it. The served root is never in the
    /// table (remember refuses its number), so node 1 finds nothing here.
    fn with_node<R>(&self, node: u64, f: impl FnOnce(&mut Node) -> R) -> Option<R> {
        let number = self.number(node)?;
        let mut shard = self.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        shard.get_mut(&number).map(f)
    }

    /// Record one kernel lookup of the inode `iref` numbered `number`; returns its node id.
    /// Call it before the reply that hands the node to the kernel is sent.
    pub fn remember(&self, number: u32, iref: InodeRef) -> Result<u64, NodeError> {
        if number == self.root_number {
            return Err(NodeError::RootReentered(number));
        }
        let mut shard = self.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        let node = shard.entry(number).or_insert(Node {
            iref,
            lookups: 0,
            inode: None,
            stream: None,
            parent: None,
        });
        if node.iref != iref {
            return Err(NodeError::NumberReused {
                number,
                first: node.iref.0,
                second: iref.0,
            });
        }
        node.lookups += 1;
        Ok(self.node_id(number))
    }

    /// The kernel dropped `count` lookups of `node` (FUSE forget).
    pub fn forget(&self, node: u64, count: u64) {
        if node == ROOT_NODE {
            return;
        }
        let Some(number) = self.number(node) else {
            return;
        };
        let mut shard = self.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(&number) {
            n.lookups = n.lookups.saturating_sub(count);
            if n.lookups == 0 {
                shard.remove(&number);
            }
        }
    }

    /// The inode reference behind `node`, if the kernel holds it.
    pub fn iref(&self, node: u64) -> Option<InodeRef> {
        if node == ROOT_NODE {
            return Some(self.root_iref);
        }
        self.with_node(node, |n| n.iref)
    }

    /// Keep the decoded inode of a node the kernel holds (remembered before), so that
    /// [`inode`](Self::inode) returns it until the kernel forgets the node.
    pub fn keep_inode(&self, inode: &Arc<Inode>) {
        let mut shard = self
            .shard(inode.number)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(&inode.number) {
            if n.iref == inode.iref && n.inode.is_none() {
                n.inode = Some(inode.clone());
            }
        }
    }

    /// The inode reference behind `node`, and its decoded inode if kept.
    pub fn lookup_node(&self, node: u64) -> Option<(InodeRef, Option<Arc<Inode>>)> {
        if node == ROOT_NODE {
            return Some((self.root_iref, None));
        }
        self.with_node(node, |n| (n.iref, n.inode.clone()))
    }

    /// Note that the kernel found the inode numbered `number` in directory `parent`.
    pub fn note_parent(&self, number: u32, parent: InodeRef) {
        let mut shard = self.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(&number) {
            n.parent.get_or_insert(parent);
        }
    }

    /// The directory the kernel found `node` in, if it holds the node.
    pub fn parent(&self, node: u64) -> Option<InodeRef> {
        self.with_node(node, |n| n.parent).flatten()
    }

    /// The read-ahead state of the file behind `node`, made at its first use; `None` if
    /// the kernel does not hold the node.
    pub fn stream(&self, node: u64) -> Option<Arc<Stream>> {
        self.with_node(node, |n| {
            n.stream.get_or_insert_with(Default::default).clone()
        })
    }

    /// How many nodes (besides the root) the kernel holds.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether the kernel holds no node besides the root.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u32 = 500;

    fn table() -> NodeTable {
        NodeTable::new(ROOT, InodeRef(0x1234))
    }

    #[test]
    fn root_and_inode_one_swap_and_the_rest_keep_their_number() {
        let t = table();
        assert_eq!(t.node_id(ROOT), ROOT_NODE);
        assert_eq!(t.node_id(1), u64::from(ROOT));
        assert_eq!(t.node_id(7), 7);
        for n in [1, 2, 7, ROOT, u32::MAX] {
            assert_eq!(t.number(t.node_id(n)), Some(n), "round trip of {n}");
        }
        assert!(t.is_displaced(1));
        assert!(!t.is_displaced(ROOT));
        assert!(!t.is_displaced(7));
        assert_eq!(t.number(u64::from(u32::MAX) + 1), None);
    }

    #[test]
    fn a_root_numbered_one_displaces_nothing() {
        let t = NodeTable::new(1, InodeRef(0));
        assert_eq!(t.node_id(1), ROOT_NODE);
        assert_eq!(t.node_id(2), 2);
        assert!(!t.is_displaced(1));
        assert!(!t.is_displaced(2));
    }

    #[test]
    fn nodes_live_until_every_lookup_is_forgotten() {
        let t = table();
        assert_eq!(t.iref(ROOT_NODE), Some(InodeRef(0x1234)));
        assert_eq!(t.iref(9), None);
        assert_eq!(t.remember(9, InodeRef(0x90)), Ok(9));
        assert_eq!(t.remember(9, InodeRef(0x90)), Ok(9));
        assert_eq!(t.iref(9), Some(InodeRef(0x90)));
        t.forget(9, 1);
        assert_eq!(t.iref(9), Some(InodeRef(0x90)));
        t.forget(9, 1);
        assert_eq!(t.iref(9), None);
        assert!(t.is_empty());
        // Forgetting what was never remembered, or the root, changes nothing.
        t.forget(9, 5);
        t.forget(ROOT_NODE, 5);
        assert_eq!(t.iref(ROOT_NODE), Some(InodeRef(0x1234)));
    }

    #[test]
    fn inode_one_lives_under_the_root_number() {
        let t = table();
        assert_eq!(t.remember(1, InodeRef(0x10)), Ok(u64::from(ROOT)));
        assert_eq!(t.iref(u64::from(ROOT)), Some(InodeRef(0x10)));
        assert_eq!(t.iref(1), Some(InodeRef(0x1234)));
        t.forget(u64::from(ROOT), 1);
        assert_eq!(t.iref(u64::from(ROOT)), None);
    }

    #[test]
    fn corrupt_numbering_is_refused() {
        let t = table();
        t.remember(9, InodeRef(0x90)).unwrap();
        assert!(matches!(
            t.remember(9, InodeRef(0x91)),
            Err(NodeError::NumberReused { number: 9, .. })
        ));
        assert_eq!(
            t.remember(ROOT, InodeRef(0x1234)),
            Err(NodeError::RootReentered(ROOT))
        );
    }

    #[test]
    fn a_node_keeps_one_stream_until_it_is_forgotten() {
        let t = table();
        assert!(t.stream(9).is_none());
        assert!(t.stream(ROOT_NODE).is_none());
        t.remember(9, InodeRef(0x90)).unwrap();
        let first = t.stream(9).unwrap();
        assert!(Arc::ptr_eq(&first, &t.stream(9).unwrap()));
        t.forget(9, 1);
        assert!(t.stream(9).is_none());
        t.remember(9, InodeRef(0x90)).unwrap();
        assert!(!Arc::ptr_eq(&first, &t.stream(9).unwrap()));
    }

    #[test]
    fn a_node_keeps_the_first_directory_it_was_found_in() {
        let t = table();
        t.note_parent(9, InodeRef(0x5));
        assert_eq!(t.parent(9), None, "not held, nothing noted");
        t.remember(9, InodeRef(0x90)).unwrap();
        t.note_parent(9, InodeRef(0x5));
        t.note_parent(9, InodeRef(0x6));
        assert_eq!(t.parent(9), Some(InodeRef(0x5)));
        assert_eq!(t.parent(ROOT_NODE), None);
        t.forget(9, 1);
        assert_eq!(t.parent(9), None);
    }
}
