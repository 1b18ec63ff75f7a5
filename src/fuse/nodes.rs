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
//! A node id must lead back to its inode. With an export table (mksquashfs writes one
//! unless told `-no-exports`), the number leads to the inode reference through the table,
//! and nothing is kept per node: however many nodes the kernel holds, the server holds no
//! memory for them. Without one, a table remembers the reference of each node the kernel
//! holds, counting lookups as the kernel does and dropping a node when the kernel forgets
//! it. That table has a fixed capacity (a share of the memory budget); past it, a node is
//! handed out under an id that encodes its inode reference (top bit set), displaced like
//! inode 1 above, so memory stays bounded however many nodes the kernel keeps. stat still
//! shows the true number (getattr answers it), but such an entry's d_ino in a readdirplus
//! reply is the encoded id: the one way sifuse's view can differ from the kernel's, and
//! only on an image without an export table while the kernel holds more nodes than the
//! table (a quarter of the budget, 350,000 nodes at the default 64 MiB). Hard links share
//! their inode reference and number, hence their node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::archive::{Archive, InodeRef};

/// The kernel's id for the root of a FUSE mount.
pub const ROOT_NODE: u64 = 1;

/// Marks a node id that encodes an inode reference instead of an inode number.
const ENCODED: u64 = 1 << 63;

/// Shards of the reference table: enough that request threads seldom wait for each other.
const SHARDS: usize = 32;

/// Memory one remembered node takes in the reference table, roughly (key, reference,
/// count, and the hash table's spare slots).
pub const BYTES_PER_NODE: usize = 48;

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
    /// The export table could not be read.
    #[error("{0}")]
    Image(String),
}

/// A node handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    /// The node id the reply carries (as `attr.ino`).
    pub node: u64,
    /// Whether that id differs from the inode number, so that the reply's attributes must
    /// not be cached (stat must ask getattr for the true number).
    pub displaced: bool,
}

/// Remembered references, for images without an export table.
#[derive(Debug)]
struct RefTable {
    shards: Box<[Mutex<HashMap<u32, Remembered>>]>,
    held: AtomicUsize,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    iref: InodeRef,
    /// Lookups the kernel has been told about and not yet forgotten.
    lookups: u64,
}

/// Node ids handed to the kernel, and how each leads back to its inode.
#[derive(Debug)]
pub struct NodeTable {
    root_number: u32,
    root_iref: InodeRef,
    /// `None` when the image's export table maps numbers to inodes.
    refs: Option<RefTable>,
}

impl NodeTable {
    /// A table whose root (node 1) is the inode `root_iref`, numbered `root_number`.
    /// Without an export table, at most `capacity` nodes are remembered.
    pub fn new(root_number: u32, root_iref: InodeRef, has_exports: bool, capacity: usize) -> Self {
        NodeTable {
            root_number,
            root_iref,
            refs: (!has_exports).then(|| RefTable {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                held: AtomicUsize::new(0),
                capacity,
            }),
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

    /// The inode number of node `node`: the inverse of [`node_id`](Self::node_id); `None`
    /// for an id that encodes a reference.
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

    /// Record one kernel lookup of the inode `iref` numbered `number`, found inside the
    /// served tree, and return the node to hand out. Call it before the reply that hands
    /// the node to the kernel is sent.
    pub fn hand_out(
        &self,
        archive: &Archive,
        number: u32,
        iref: InodeRef,
    ) -> Result<Handed, NodeError> {
        if number == self.root_number {
            return Err(NodeError::RootReentered(number));
        }
        let by_number = Handed {
            node: self.node_id(number),
            displaced: self.is_displaced(number),
        };
        let Some(refs) = &self.refs else {
            // The export table must agree, or two inodes would share one node.
            let listed = archive
                .inode_ref_by_number(number)
                .map_err(|e| NodeError::Image(e.to_string()))?;
            return match listed {
                Some(listed) if listed != iref => Err(NodeError::NumberReused {
                    number,
                    first: listed.0,
                    second: iref.0,
                }),
                _ => Ok(by_number),
            };
        };
        let mut shard = refs.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(node) = shard.get_mut(&number) {
            if node.iref != iref {
                return Err(NodeError::NumberReused {
                    number,
                    first: node.iref.0,
                    second: iref.0,
                });
            }
            node.lookups += 1;
            return Ok(by_number);
        }
        if refs.held.load(Ordering::Relaxed) >= refs.capacity {
            // Full: the id itself leads back to the inode.
            return Ok(Handed {
                node: ENCODED | iref.0,
                displaced: true,
            });
        }
        refs.held.fetch_add(1, Ordering::Relaxed);
        shard.insert(number, Remembered { iref, lookups: 1 });
        Ok(by_number)
    }

    /// The kernel dropped `count` lookups of `node` (FUSE forget).
    pub fn forget(&self, node: u64, count: u64) {
        let Some(refs) = &self.refs else { return };
        if node == ROOT_NODE || node & ENCODED != 0 {
            return;
        }
        let Some(number) = self.number(node) else {
            return;
        };
        let mut shard = refs.shard(number).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = shard.get_mut(&number) {
            n.lookups = n.lookups.saturating_sub(count);
            if n.lookups == 0 {
                shard.remove(&number);
                refs.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// The inode reference behind `node`: `Ok(None)` for a node the kernel should not hold.
    pub fn iref(&self, archive: &Archive, node: u64) -> Result<Option<InodeRef>, NodeError> {
        if node == ROOT_NODE {
            return Ok(Some(self.root_iref));
        }
        if node & ENCODED != 0 {
            let iref = node & !ENCODED;
            return Ok((iref <= InodeRef::MAX).then_some(InodeRef(iref)));
        }
        let Some(number) = self.number(node) else {
            return Ok(None);
        };
        match &self.refs {
            None => archive
                .inode_ref_by_number(number)
                .map_err(|e| NodeError::Image(e.to_string())),
            Some(refs) => {
                let shard = refs.shard(number).lock().unwrap_or_else(|p| p.into_inner());
                Ok(shard.get(&number).map(|n| n.iref))
            }
        }
    }

    /// How many nodes the table remembers (always 0 with an export table).
    pub fn len(&self) -> usize {
        self.refs
            .as_ref()
            .map_or(0, |r| r.held.load(Ordering::Relaxed))
    }

    /// Whether the table remembers no node.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RefTable {
    fn shard(&self, number: u32) -> &Mutex<HashMap<u32, Remembered>> {
        &self.shards[number as usize % SHARDS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u32 = 500;

    /// An archive to resolve numbers against: the committed tiny image, which has an export
    /// table; the tables under test are told whether to use it.
    fn archive() -> Archive {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny-raw.sqfs");
        Archive::open(std::sync::Arc::new(std::fs::read(p).unwrap()), 1 << 20).unwrap()
    }

    fn table(capacity: usize) -> NodeTable {
        NodeTable::new(ROOT, InodeRef(0x1234), false, capacity)
    }

    #[test]
    fn root_and_inode_one_swap_and_the_rest_keep_their_number() {
        let t = table(10);
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
        let t = NodeTable::new(1, InodeRef(0), false, 10);
        assert_eq!(t.node_id(1), ROOT_NODE);
        assert_eq!(t.node_id(2), 2);
        assert!(!t.is_displaced(1));
        assert!(!t.is_displaced(2));
    }

    #[test]
    fn nodes_live_until_every_lookup_is_forgotten() {
        let a = archive();
        let t = table(10);
        assert_eq!(t.iref(&a, ROOT_NODE), Ok(Some(InodeRef(0x1234))));
        assert_eq!(t.iref(&a, 9), Ok(None));
        let handed = t.hand_out(&a, 9, InodeRef(0x90)).unwrap();
        assert_eq!(
            handed,
            Handed {
                node: 9,
                displaced: false
            }
        );
        t.hand_out(&a, 9, InodeRef(0x90)).unwrap();
        assert_eq!(t.iref(&a, 9), Ok(Some(InodeRef(0x90))));
        t.forget(9, 1);
        assert_eq!(t.iref(&a, 9), Ok(Some(InodeRef(0x90))));
        t.forget(9, 1);
        assert_eq!(t.iref(&a, 9), Ok(None));
        assert!(t.is_empty());
        // Forgetting what was never remembered, or the root, changes nothing.
        t.forget(9, 5);
        t.forget(ROOT_NODE, 5);
        assert_eq!(t.iref(&a, ROOT_NODE), Ok(Some(InodeRef(0x1234))));
    }

    #[test]
    fn inode_one_lives_under_the_root_number() {
        let a = archive();
        let t = table(10);
        let handed = t.hand_out(&a, 1, InodeRef(0x10)).unwrap();
        assert_eq!(
            handed,
            Handed {
                node: u64::from(ROOT),
                displaced: true
            }
        );
        assert_eq!(t.iref(&a, u64::from(ROOT)), Ok(Some(InodeRef(0x10))));
        assert_eq!(t.iref(&a, 1), Ok(Some(InodeRef(0x1234))));
        t.forget(u64::from(ROOT), 1);
        assert_eq!(t.iref(&a, u64::from(ROOT)), Ok(None));
    }

    #[test]
    fn corrupt_numbering_is_refused() {
        let a = archive();
        let t = table(10);
        t.hand_out(&a, 9, InodeRef(0x90)).unwrap();
        assert!(matches!(
            t.hand_out(&a, 9, InodeRef(0x91)),
            Err(NodeError::NumberReused { number: 9, .. })
        ));
        assert_eq!(
            t.hand_out(&a, ROOT, InodeRef(0x1234)),
            Err(NodeError::RootReentered(ROOT))
        );
    }

    #[test]
    fn a_full_table_hands_out_ids_that_encode_the_reference() {
        let a = archive();
        let t = table(2);
        t.hand_out(&a, 7, InodeRef(0x70)).unwrap();
        t.hand_out(&a, 8, InodeRef(0x80)).unwrap();
        let handed = t.hand_out(&a, 9, InodeRef(0x1_0090)).unwrap();
        assert!(handed.displaced);
        assert_ne!(handed.node, 9);
        assert_eq!(t.len(), 2, "nothing more is remembered");
        assert_eq!(t.iref(&a, handed.node), Ok(Some(InodeRef(0x1_0090))));
        // Forgetting an encoded node needs no memory either; a remembered one frees a slot.
        t.forget(handed.node, 1);
        t.forget(7, 1);
        assert_eq!(t.hand_out(&a, 9, InodeRef(0x1_0090)).unwrap().node, 9);
    }

    #[test]
    fn with_an_export_table_nothing_is_remembered() {
        let a = archive();
        let root = a.root().clone();
        let t = NodeTable::new(root.number, root.iref, true, 0);
        let hello = a.resolve(b"hello.txt").unwrap();
        let handed = t.hand_out(&a, hello.number, hello.iref).unwrap();
        assert_eq!(handed.node, u64::from(hello.number));
        assert!(t.is_empty());
        assert_eq!(t.iref(&a, handed.node), Ok(Some(hello.iref)));
        // A number the export table gives to another inode is corrupt.
        let other = a.resolve(b"dir").unwrap();
        assert!(matches!(
            t.hand_out(&a, hello.number, other.iref),
            Err(NodeError::NumberReused { .. })
        ));
    }
}
