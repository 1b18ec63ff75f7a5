//! The FUSE adapter: fuser's requests answered from the archive, showing what the kernel's
//! squashfs driver shows (see [`nodes`] for how st_ino stays the SquashFS inode number).
//! Nothing here knows the on-disk layout: it asks the archive for inodes, listings from a
//! position, byte ranges and xattrs; nothing in the archive knows FUSE.
//!
//! The answers live here, the request dispatch (fuser's `Filesystem`) in [`dispatch`].
//! Every request runs inside [`ArchiveFs::serve`]: a panic in one answers EIO (fuser sends
//! EIO for a reply dropped unsent) and the request threads keep serving.
//!
//! What the adapter keeps is bounded whatever the image or the kernel do: no listing is
//! held whole (readdir pages through the archive from the position the kernel gives), no
//! decoded inode is kept per node, nodes cost nothing with an export table and at most a
//! fixed table without one, and read-ahead state is kept for a bounded number of files.

pub mod access;
pub mod activity;
pub mod attr;
mod buffers;
mod dispatch;
pub mod handles;
pub mod nodes;
pub mod owners;
pub mod push;
pub mod release;
pub mod streams;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, Generation, INodeNo, OpenAccMode, OpenFlags, ReplyDirectory,
    ReplyDirectoryPlus,
};

use crate::archive::readahead::{ReadAhead, Stream};
use crate::archive::{Archive, EntryRef, FileBytes, FileKind, Inode};

use access::Callers;
use activity::Activity;
use attr::{bare_dir_attr, file_attr, file_type};
use handles::{HandleTable, OpenFile};
use nodes::{Handed, NodeTable};
use owners::Owners;
use push::Pusher;
use release::IdleRelease;
use streams::Streams;

/// How long the kernel may trust entries and attributes: the image never changes, so in
/// effect forever (a year keeps the kernel's jiffies arithmetic far from overflow).
pub const CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Longest name a lookup can find (the kernel answers ENAMETOOLONG beyond it).
const MAX_NAME: usize = 256;

/// Namespaces SquashFS stores; the kernel has no handler for any other prefix.
const XATTR_PREFIXES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// readdir offsets: 1 follows `.`, 2 follows `..`, and `LISTING_BASE + p` follows the
/// entry that ends at byte `p` of the stored listing (the numbering the kernel's own
/// driver uses, shifted past the two invented entries).
const LISTING_BASE: u64 = 2;

/// The node table may use a quarter of the memory budget (an image without an export
/// table only).
const NODE_TABLE_SHARE: u64 = 4;

/// Whether open and opendir hand out handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opens {
    /// Answer open and opendir with ENOSYS. The kernel then opens every file and directory
    /// without asking (FUSE's no_open and no_opendir: keep-cache for files, the kernel's
    /// readdir cache for directories, and no release either), which saves two of the
    /// three round trips reading a small file costs and two per directory listed. Reads
    /// and readdirs find the inode and read position by node.
    Unasked,
    /// Hand out handles and count them: the idle timeout must not unmount while anything
    /// is open, and without open and release it could not know.
    Counted,
}

/// A read-only file system over one archive, rooted at one of its directories.
pub struct ArchiveFs {
    archive: Arc<Archive>,
    readahead: ReadAhead,
    root: Arc<Inode>,
    nodes: Arc<NodeTable>,
    streams: Arc<Streams>,
    opens: Opens,
    files: HandleTable<OpenFile>,
    dirs: HandleTable<Inode>,
    pusher: Arc<Pusher>,
    owners: Owners,
    activity: Arc<Activity>,
    /// Who the server answers (see [`access`]).
    callers: Callers,
    /// How long the kernel may keep attributes: [`CACHE_TTL`], or zero under
    /// [`ArchiveFs::revalidate_every_access`].
    attr_ttl: Duration,
    idle_release: IdleRelease,
}

impl std::fmt::Debug for ArchiveFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveFs")
            .field("root", &self.root.number)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Log why a request failed (a warning for EIO, which means a damaged image or a failing
/// source; a debug line otherwise) and return the errno to answer.
fn log_failure(op: &str, e: &crate::Error) -> Errno {
    let errno = e.errno();
    if errno == libc::EIO {
        tracing::warn!("{op}: {e}");
    } else {
        tracing::debug!("{op}: {e}");
    }
    Errno::from_i32(errno)
}

/// The message of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

impl ArchiveFs {
    /// Serve `root` (a directory of `archive`) with owners shown through `owners`,
    /// reporting requests (and, when `opens` counts them, open handles) to `activity`.
    pub fn new(
        archive: Archive,
        root: Inode,
        owners: Owners,
        opens: Opens,
        activity: Arc<Activity>,
    ) -> crate::Result<Self> {
        if root.kind != FileKind::Directory {
            return Err(crate::Error::NotADirectory(format!(
                "inode {}",
                root.number
            )));
        }
        let archive = Arc::new(archive);
        // One read-ahead worker per CPU: a sequential reader then uses every core.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let node_capacity =
            (archive.cache_budget() / NODE_TABLE_SHARE) as usize / nodes::BYTES_PER_NODE;
        let nodes = Arc::new(NodeTable::new(
            root.number,
            root.iref,
            archive.has_export_table(),
            node_capacity.max(1024),
        ));
        Ok(ArchiveFs {
            pusher: Arc::new(Pusher::new(archive.clone(), nodes.clone())),
            nodes,
            streams: Arc::default(),
            readahead: ReadAhead::new(archive.clone(), workers),
            archive,
            root: Arc::new(root),
            opens,
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            owners,
            activity,
            callers: Callers::Anyone,
            attr_ttl: CACHE_TTL,
            idle_release: IdleRelease::new(Some(release::DEFAULT_IDLE_RELEASE)),
        })
    }

    /// Give memory back after `after` without a request (`None`: never); the default is
    /// [`release::DEFAULT_IDLE_RELEASE`].
    pub fn release_when_idle(&mut self, after: Option<Duration>) {
        self.idle_release = IdleRelease::new(after);
    }

    /// Answer only `callers`; every other caller's request is refused with EACCES.
    pub fn admit_only(&mut self, callers: Callers) {
        self.callers = callers;
    }

    /// Let the kernel keep no attributes, so that with default_permissions every access
    /// (each directory a path walk passes, every stat) asks this server with the caller's
    /// ids: for a mount the server must refuse some callers of ([`access`]).
    pub fn revalidate_every_access(&mut self) {
        self.attr_ttl = Duration::ZERO;
    }

    /// What pushes small files into the page cache; it pushes once connected to the
    /// session's notifier.
    pub fn pusher(&self) -> Arc<Pusher> {
        self.pusher.clone()
    }

    /// Run one request. A panic inside `handle` is logged and the reply it owned, dropped
    /// while unwinding, answers EIO.
    fn serve(&self, op: &'static str, handle: impl FnOnce()) {
        self.activity.touch();
        self.idle_release.start(|| release::Held {
            archive: self.archive.clone(),
            streams: self.streams.clone(),
            activity: self.activity.clone(),
        });
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(handle)) {
            tracing::error!(
                "{op}: request failed with a panic: {}; answered EIO",
                panic_message(&*payload)
            );
        }
    }

    /// The inode behind node `node`.
    fn inode_of(&self, op: &str, node: INodeNo) -> Result<Inode, Errno> {
        if node.0 == nodes::ROOT_NODE {
            return Ok(Inode::clone(&self.root));
        }
        let iref = match self.nodes.iref(&self.archive, node.0) {
            Ok(Some(iref)) => iref,
            Ok(None) => {
                tracing::warn!(
                    "{op}: the kernel asked for node {} it does not hold",
                    node.0
                );
                return Err(Errno::ESTALE);
            }
            Err(e) => {
                tracing::warn!("{op}: corrupt image: {e}");
                return Err(Errno::EIO);
            }
        };
        self.archive.inode(iref).map_err(|e| log_failure(op, &e))
    }

    /// The inode a directory entry names, which must be of the type the entry says.
    fn entry_inode(&self, op: &str, entry: &EntryRef<'_>) -> Result<Inode, Errno> {
        let inode = self
            .archive
            .inode(entry.iref)
            .map_err(|e| log_failure(op, &e))?;
        if inode.kind != entry.kind || inode.number != entry.inode_number {
            tracing::warn!(
                "{op}: corrupt image: entry {:?} says {:?} inode {} but the inode is {:?} inode {}",
                String::from_utf8_lossy(entry.name),
                entry.kind,
                entry.inode_number,
                inode.kind,
                inode.number
            );
            return Err(Errno::EIO);
        }
        Ok(inode)
    }

    /// st_blocks of `inode`.
    fn stat_blocks(&self, op: &str, inode: &Inode) -> Result<u64, Errno> {
        self.archive
            .stat_blocks(inode)
            .map_err(|e| log_failure(op, &e))
    }

    /// Attributes with the true inode number, for getattr.
    fn attr(&self, op: &str, inode: &Inode) -> Result<FileAttr, Errno> {
        let blocks = self.stat_blocks(op, inode)?;
        Ok(file_attr(
            inode,
            u64::from(inode.number),
            blocks,
            &self.owners,
        ))
    }

    /// Hand the node of `inode` (found inside the served tree) to the kernel once more:
    /// the attributes an entry reply carries (the node id as ino) and how long the kernel
    /// may keep them: not at all when the node id is not the inode number, so that stat
    /// asks getattr for the true one.
    fn hand_out(&self, op: &str, inode: &Inode) -> Result<(FileAttr, Duration, Handed), Errno> {
        // Everything that can fail comes first: a node handed out must reach the kernel.
        let blocks = self.stat_blocks(op, inode)?;
        let handed = self
            .nodes
            .hand_out(&self.archive, inode.number, inode.iref)
            .map_err(|e| {
                tracing::warn!("{op}: corrupt image: {e}");
                Errno::EIO
            })?;
        let ttl = if handed.displaced {
            Duration::ZERO
        } else {
            self.attr_ttl
        };
        Ok((
            file_attr(inode, handed.node, blocks, &self.owners),
            ttl,
            handed,
        ))
    }

    fn lookup_entry(
        &self,
        parent: INodeNo,
        name: &[u8],
    ) -> Result<Option<(FileAttr, Duration)>, Errno> {
        if name.len() > MAX_NAME {
            return Err(Errno::ENAMETOOLONG);
        }
        let dir = self.inode_of("lookup", parent)?;
        if dir.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        let Some(entry) = self
            .archive
            .lookup(&dir, name)
            .map_err(|e| log_failure("lookup", &e))?
        else {
            return Ok(None);
        };
        let entry = EntryRef {
            name: &entry.name,
            iref: entry.iref,
            inode_number: entry.inode_number,
            kind: entry.kind,
        };
        let inode = self.entry_inode("lookup", &entry)?;
        let (attr, ttl, _) = self.hand_out("lookup", &inode)?;
        Ok(Some((attr, ttl)))
    }

    /// The directory being listed: the handle's, or the node's.
    fn dir_of(&self, op: &str, node: INodeNo, fh: FileHandle) -> Result<Inode, Errno> {
        if let Some(open) = self.dirs.get(fh.0) {
            return Ok(Inode::clone(&open));
        }
        let inode = self.inode_of(op, node)?;
        if inode.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        Ok(inode)
    }

    fn open_dir(&self, node: INodeNo) -> Result<u64, Errno> {
        let dir = self.dir_of("opendir", node, FileHandle(0))?;
        Ok(self.dirs.insert(dir))
    }

    fn open_file(&self, node: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(Errno::EROFS);
        }
        let inode = self.inode_of("open", node)?;
        match inode.kind {
            FileKind::File => Ok(self.files.insert(OpenFile {
                inode: Arc::new(inode),
                stream: Arc::default(),
            })),
            FileKind::Directory => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The inode of the file being read and its read-ahead state: the handle's, or, for a
    /// file opened without one, the node's.
    fn file_of(&self, node: INodeNo, fh: FileHandle) -> Result<(Arc<Inode>, Arc<Stream>), Errno> {
        if let Some(open) = self.files.get(fh.0) {
            return Ok((open.inode.clone(), open.stream.clone()));
        }
        let inode = self.inode_of("read", node)?;
        Ok((Arc::new(inode), self.streams.of(node.0)))
    }

    /// The bytes of a read (a range of one cached block, or assembled in `assembly`), and
    /// the file's inode.
    fn read_file<'a>(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        assembly: &'a mut Vec<u8>,
    ) -> Result<(FileBytes<'a>, Arc<Inode>), Errno> {
        let (inode, stream) = self.file_of(node, fh)?;
        let file = inode.as_file().ok_or(Errno::EBADF)?;
        let want = u64::from(size).min(file.file_size.saturating_sub(offset));
        self.readahead.on_read(file, &stream, offset, want);
        let bytes = self
            .archive
            .read_range(file, offset, size as usize, assembly)
            .map_err(|e| log_failure("read", &e))?;
        Ok((bytes, inode))
    }

    /// After a read of `len` bytes at `offset` of `inode` was answered: push the files that
    /// share its fragment block, and let go of the blocks the kernel now holds.
    fn after_read(&self, inode: &Inode, offset: u64, len: u64) {
        self.pusher.after_read(inode);
        if let Some(file) = inode.as_file() {
            self.archive.release_delivered(file, offset, len);
        }
    }

    /// Add `.` and `..` to a listing that starts at `offset`, through `add` (which answers
    /// whether the reply is full). Returns the listing position to go on from, or `None`
    /// when the reply is full.
    fn add_dots(
        dir: &Inode,
        offset: u64,
        mut add: impl FnMut(u64, u64, &[u8]) -> bool,
    ) -> Option<u64> {
        let parent = dir.as_dir().map_or(dir.number, |d| d.parent);
        if offset == 0 && add(u64::from(dir.number), 1, b".") {
            return None;
        }
        if offset <= 1 && add(u64::from(parent), LISTING_BASE, b"..") {
            return None;
        }
        Some(offset.saturating_sub(LISTING_BASE))
    }

    fn fill_dir(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), Errno> {
        let dir = self.dir_of("readdir", node, fh)?;
        let Some(from) = Self::add_dots(&dir, offset, |ino, off, name| {
            reply.add(
                INodeNo(ino),
                off,
                file_type(FileKind::Directory),
                OsStr::from_bytes(name),
            )
        }) else {
            return Ok(());
        };
        let mut added = offset < LISTING_BASE;
        let listed = self.archive.list_from(&dir, from, |entry, after| {
            let full = reply.add(
                INodeNo(u64::from(entry.inode_number)),
                LISTING_BASE + after,
                file_type(entry.kind),
                OsStr::from_bytes(entry.name),
            );
            added |= !full;
            !full
        });
        match listed {
            // Answer what is done; the next call starts at the bad entry and fails.
            Err(e) if !added => Err(log_failure("readdir", &e)),
            _ => Ok(()),
        }
    }

    /// Fill a readdirplus reply. Every entry added (but `.` and `..`, which the kernel does
    /// not keep) is a lookup the kernel will count, so its node is handed out before the
    /// reply, and taken back if the reply has no room for it.
    fn fill_dir_plus(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> Result<(), Errno> {
        let dir = self.dir_of("readdirplus", node, fh)?;
        let Some(from) = Self::add_dots(&dir, offset, |ino, off, name| {
            let attr = bare_dir_attr(ino);
            reply.add(
                attr.ino,
                off,
                OsStr::from_bytes(name),
                &CACHE_TTL,
                &attr,
                Generation(0),
            )
        }) else {
            return Ok(());
        };
        let mut added = offset < LISTING_BASE;
        let mut failure = None;
        let listed = self.archive.list_from(&dir, from, |entry, after| {
            // A readdirplus entry's d_ino is its node id, which for a displaced inode is
            // not its number. End the reply before it: the kernel asks for the rest with
            // plain readdir (READDIRPLUS_AUTO uses plus past offset 0 only after lookups
            // in the directory), which reports the true number.
            if added && self.nodes.is_displaced(entry.inode_number) {
                return false;
            }
            let found = self
                .entry_inode("readdirplus", &entry)
                .and_then(|inode| self.hand_out("readdirplus", &inode));
            let (attr, ttl, handed) = match found {
                Ok(found) => found,
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            };
            let name = OsStr::from_bytes(entry.name);
            if reply.add(
                attr.ino,
                LISTING_BASE + after,
                name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                self.nodes.forget(handed.node, 1);
                return false;
            }
            added = true;
            true
        });
        match (listed, failure) {
            // Answer what is done; the next call starts at the bad entry and fails.
            _ if added => Ok(()),
            (Err(e), _) => Err(log_failure("readdirplus", &e)),
            (Ok(()), Some(errno)) => Err(errno),
            (Ok(()), None) => Ok(()),
        }
    }

    /// The value of xattr `name` of `node`.
    fn xattr_value(&self, node: INodeNo, name: &[u8]) -> Result<Vec<u8>, Errno> {
        if !XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Err(Errno::EOPNOTSUPP);
        }
        let inode = self.inode_of("getxattr", node)?;
        self.archive
            .xattr_value(&inode, name)
            .map_err(|e| log_failure("getxattr", &e))?
            .ok_or(Errno::NO_XATTR)
    }

    /// The NUL-terminated names of the xattrs of `node` that `uid` may list: trusted.* only
    /// for root, as the kernel lists them only to callers with CAP_SYS_ADMIN.
    fn xattr_names(&self, node: INodeNo, uid: u32) -> Result<Vec<u8>, Errno> {
        let inode = self.inode_of("listxattr", node)?;
        // In an image without an xattr table, the kernel answers listxattr with EOPNOTSUPP
        // for the inodes whose operations include listxattr (directories, symlinks and
        // every extended inode); basic files, devices, fifos and sockets list nothing.
        if !self.archive.has_xattr_table()
            && (inode.extended || matches!(inode.kind, FileKind::Directory | FileKind::Symlink))
        {
            return Err(Errno::EOPNOTSUPP);
        }
        self.archive
            .xattr_names(&inode, |name| uid == 0 || !name.starts_with(b"trusted."))
            .map_err(|e| log_failure("listxattr", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_in_a_request_are_contained() {
        // What serve() relies on: catch_unwind stops the panic and drops what the closure
        // owned (there, the reply, whose drop answers EIO).
        struct Flag<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Flag<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = std::cell::Cell::new(false);
        let owned = Flag(&dropped);
        let result = panic::catch_unwind(AssertUnwindSafe(move || {
            let _reply = owned;
            panic!("boom");
        }));
        let payload = result.expect_err("the panic is caught");
        assert_eq!(panic_message(&*payload), "boom");
        assert!(dropped.get(), "the reply is dropped while unwinding");
    }

    #[test]
    fn panic_messages_of_formatted_panics() {
        let payload = panic::catch_unwind(|| panic!("bad {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*payload), "bad 7");
    }

    #[test]
    fn dots_come_first_and_the_listing_follows() {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny-raw.sqfs");
        let a = Archive::open(Arc::new(std::fs::read(p).unwrap()), 1 << 20).unwrap();
        let dir = a.resolve(b"dir").unwrap();
        let parent = dir.as_dir().unwrap().parent;
        let mut seen = Vec::new();
        let from = ArchiveFs::add_dots(&dir, 0, |ino, off, name| {
            seen.push((ino, off, name.to_vec()));
            false
        });
        assert_eq!(from, Some(0));
        assert_eq!(
            seen,
            vec![
                (u64::from(dir.number), 1, b".".to_vec()),
                (u64::from(parent), LISTING_BASE, b"..".to_vec())
            ]
        );
        // Resuming after `.` gives `..`; after `..` or later, only the listing.
        seen.clear();
        assert_eq!(
            ArchiveFs::add_dots(&dir, 1, |ino, off, name| {
                seen.push((ino, off, name.to_vec()));
                false
            }),
            Some(0)
        );
        assert_eq!(seen.len(), 1);
        assert_eq!(
            ArchiveFs::add_dots(&dir, 40, |_, _, _| panic!("no dots")),
            Some(38)
        );
        // A full reply stops at once.
        assert_eq!(ArchiveFs::add_dots(&dir, 0, |_, _, _| true), None);
    }
}
