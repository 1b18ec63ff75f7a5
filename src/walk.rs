//! Depth-first walk of a directory tree inside an archive, shared by `ls -R`, `extract`
//! and tests. Iterative (a hostile image could nest directories deeper than any stack),
//! and every directory is visited once: a directory reached twice means the image loops
//! or shares directories, which is corrupt.

use std::collections::HashSet;

use crate::archive::{Archive, Inode, InodeRef};
use crate::error::{Error, Result};

/// What the walk reports.
pub enum Event<'a> {
    /// A directory, before its entries.
    EnterDir { path: &'a [u8], inode: &'a Inode },
    /// Anything that is not a directory.
    Entry { path: &'a [u8], inode: &'a Inode },
    /// A directory, after its entries.
    LeaveDir { path: &'a [u8], inode: &'a Inode },
}

struct Frame {
    /// Length of this directory's path in the walk's path buffer.
    path_len: usize,
    inode: Inode,
    entries: std::vec::IntoIter<crate::archive::DirEntry>,
}

/// Where a directory's listing starts, for telling two directories that share one apart.
fn listing_key(inode: &Inode) -> Option<(u32, u16)> {
    // Empty directories (stored size 3) may share their position with the next listing.
    let d = inode.as_dir().filter(|d| d.file_size > 3)?;
    Some((d.start_block, d.offset))
}

/// Walk the tree under `start`, whose path is `start_path` (reported as given; children
/// are `start_path/name`, or `name` when `start_path` is empty).
///
/// Each directory inode is entered once, and each non-empty listing read once: a hostile
/// image that points many directories at one large listing would otherwise make the walk's
/// work grow with their product. One path buffer serves the whole walk, so memory grows
/// with the deepest path, not with depth times path length.
pub fn walk(
    archive: &Archive,
    start: &Inode,
    start_path: &[u8],
    visit: &mut dyn FnMut(Event<'_>) -> Result<()>,
) -> Result<()> {
    if start.as_dir().is_none() {
        return visit(Event::Entry {
            path: start_path,
            inode: start,
        });
    }
    let mut seen: HashSet<InodeRef> = HashSet::new();
    let mut listings: HashSet<(u32, u16)> = HashSet::new();
    seen.insert(start.iref);
    listings.extend(listing_key(start));
    visit(Event::EnterDir {
        path: start_path,
        inode: start,
    })?;
    let mut path = start_path.to_vec();
    let mut stack = vec![Frame {
        path_len: path.len(),
        inode: start.clone(),
        entries: archive.read_dir(start)?.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        path.truncate(frame.path_len);
        let Some(entry) = frame.entries.next() else {
            let done = stack.pop().expect("non-empty");
            visit(Event::LeaveDir {
                path: &path,
                inode: &done.inode,
            })?;
            continue;
        };
        if !path.is_empty() && !path.ends_with(b"/") {
            path.push(b'/');
        }
        path.extend_from_slice(&entry.name);
        let inode = archive.inode(entry.iref)?;
        if inode.kind != entry.kind {
            return Err(Error::corrupt(format!(
                "{}: directory entry says {:?} but the inode is {:?}",
                String::from_utf8_lossy(&path),
                entry.kind,
                inode.kind
            )));
        }
        if inode.as_dir().is_some() {
            let shared = listing_key(&inode).is_some_and(|k| !listings.insert(k));
            if !seen.insert(inode.iref) || shared {
                return Err(Error::corrupt(format!(
                    "{}: directory appears twice in the tree (a loop or shared directory)",
                    String::from_utf8_lossy(&path)
                )));
            }
            visit(Event::EnterDir {
                path: &path,
                inode: &inode,
            })?;
            let entries = archive.read_dir(&inode)?.into_iter();
            stack.push(Frame {
                path_len: path.len(),
                inode,
                entries,
            });
        } else {
            visit(Event::Entry {
                path: &path,
                inode: &inode,
            })?;
        }
    }
    Ok(())
}
