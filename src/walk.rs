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
    path: Vec<u8>,
    inode: Inode,
    entries: std::vec::IntoIter<crate::archive::DirEntry>,
}

/// Walk the tree under `start`, whose path is `start_path` (reported as given; children
/// are `start_path/name`, or `name` when `start_path` is empty).
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
    seen.insert(start.iref);
    visit(Event::EnterDir {
        path: start_path,
        inode: start,
    })?;
    let mut stack = vec![Frame {
        path: start_path.to_vec(),
        inode: start.clone(),
        entries: archive.read_dir(start)?.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(entry) = frame.entries.next() else {
            let done = stack.pop().expect("non-empty");
            visit(Event::LeaveDir {
                path: &done.path,
                inode: &done.inode,
            })?;
            continue;
        };
        let mut path = frame.path.clone();
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
            if !seen.insert(inode.iref) {
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
                path,
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
