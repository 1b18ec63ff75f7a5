//! The FUSE adapter: fuser's request callbacks answered from the archive, showing what the
//! kernel's squashfs driver shows (see [`nodes`] for how st_ino stays the SquashFS inode
//! number). Nothing here knows the on-disk layout; nothing in the archive knows FUSE.
//!
//! Every request runs inside [`ArchiveFs::serve`]: a panic in one answers EIO (fuser sends
//! EIO for a reply dropped unsent) and the request threads keep serving.

pub mod access;
pub mod activity;
pub mod attr;
pub mod handles;
pub mod listings;
pub mod nodes;
pub mod owners;
pub mod push;

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode,
    OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::archive::readahead::{ReadAhead, Stream};
use crate::archive::superblock::NO_TABLE;
use crate::archive::{Archive, BlockData, DirEntry, FileKind, Inode, InodeRef};

use activity::Activity;
use attr::{bare_dir_attr, file_attr, file_type};
use handles::{HandleTable, OpenFile};
use listings::{Listing, Listings};
use nodes::NodeTable;
use owners::Owners;
use push::Pusher;

/// How long the kernel may trust entries and attributes: the image never changes, so in
/// effect forever (a year keeps the kernel's jiffies arithmetic far from overflow).
pub const CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Longest name a lookup can find (the kernel answers ENAMETOOLONG beyond it).
const MAX_NAME: usize = 256;

/// Background requests (mostly read-ahead) the kernel may have in flight at once.
const MAX_BACKGROUND: u16 = 64;

/// Namespaces SquashFS stores; the kernel has no handler for any other prefix.
const XATTR_PREFIXES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// Whether open and opendir hand out handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opens {
    /// Answer open and opendir with ENOSYS. The kernel then opens every file and directory
    /// without asking (FUSE's no_open and no_opendir: keep-cache for files, the kernel's
    /// readdir cache for directories, and no release either), which saves two of the
    /// three round trips reading a small file costs and two per directory listed. Reads
    /// and readdirs find the inode, read position and listing by node.
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
    opens: Opens,
    files: HandleTable<OpenFile>,
    dirs: HandleTable<Listing>,
    listings: Arc<Listings>,
    pusher: Arc<Pusher>,
    owners: Owners,
    activity: Arc<Activity>,
    /// How long the kernel may keep attributes: [`CACHE_TTL`], or zero under
    /// [`ArchiveFs::revalidate_every_access`].
    attr_ttl: Duration,
}

impl std::fmt::Debug for ArchiveFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveFs")
            .field("root", &self.root.number)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Where a request failed: the errno to answer, after logging what went wrong.
fn failed(op: &str, e: &crate::Error) -> Errno {
    let errno = e.errno();
    if errno == libc::EIO {
        tracing::warn!("{op}: {e}");
    } else {
        tracing::debug!("{op}: {e}");
    }
    Errno::from_i32(errno)
}

/// Keep every thread's allocations in one glibc heap. glibc gives each allocating thread
/// its own arena, and a block freed by cache eviction goes back to the arena of the thread
/// that decompressed it: with request and read-ahead threads all loading blocks, freed
/// space in one arena was seldom reused by the others and the server's RSS reached 2.5
/// times the cache budget. In one arena every freed block is reused; blocks are large, so
/// the shared lock is taken rarely. Call before the request threads start.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10);
    }
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
        limit_malloc_arenas();
        let archive = Arc::new(archive);
        // One read-ahead worker per CPU: a sequential reader then uses every core.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let nodes = Arc::new(NodeTable::new(root.number, root.iref));
        let listings = Arc::new(Listings::default());
        Ok(ArchiveFs {
            pusher: Arc::new(Pusher::new(
                archive.clone(),
                nodes.clone(),
                listings.clone(),
            )),
            nodes,
            readahead: ReadAhead::new(archive.clone(), workers),
            archive,
            root: Arc::new(root),
            opens,
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            listings,
            owners,
            activity,
            attr_ttl: CACHE_TTL,
        })
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
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(handle)) {
            tracing::error!(
                "{op}: request failed with a panic: {}; answered EIO",
                panic_message(&*payload)
            );
        }
    }

    /// The inode behind node `node`.
    fn inode_of(&self, op: &str, node: INodeNo) -> Result<Arc<Inode>, Errno> {
        if node.0 == nodes::ROOT_NODE {
            return Ok(self.root.clone());
        }
        let (iref, kept) = self.nodes.lookup_node(node.0).ok_or_else(|| {
            tracing::warn!(
                "{op}: the kernel asked for node {} it does not hold",
                node.0
            );
            Errno::ESTALE
        })?;
        if let Some(inode) = kept {
            return Ok(inode);
        }
        let inode = Arc::new(self.archive.inode(iref).map_err(|e| failed(op, &e))?);
        self.nodes.keep_inode(&inode);
        Ok(inode)
    }

    /// The inode a directory entry names, which must be of the type the entry says.
    fn entry_inode(&self, op: &str, entry: &DirEntry) -> Result<Inode, Errno> {
        let inode = self.archive.inode(entry.iref).map_err(|e| failed(op, &e))?;
        if inode.kind != entry.kind || inode.number != entry.inode_number {
            tracing::warn!(
                "{op}: corrupt image: entry {:?} says {:?} inode {} but the inode is {:?} inode {}",
                String::from_utf8_lossy(&entry.name),
                entry.kind,
                entry.inode_number,
                inode.kind,
                inode.number
            );
            return Err(Errno::EIO);
        }
        Ok(inode)
    }

    /// Attributes with the true inode number, for getattr.
    fn attr(&self, op: &str, inode: &Inode) -> Result<FileAttr, Errno> {
        let blocks = self
            .archive
            .stat_blocks(inode)
            .map_err(|e| failed(op, &e))?;
        Ok(file_attr(
            inode,
            u64::from(inode.number),
            blocks,
            &self.owners,
        ))
    }

    /// Attributes for an entry reply, which carry the node id as ino, and how long the
    /// kernel may keep them: not at all when the node id is not the inode number, so that
    /// stat asks getattr for the true one.
    fn entry_attr(&self, op: &str, inode: &Inode) -> Result<(FileAttr, Duration), Errno> {
        let blocks = self
            .archive
            .stat_blocks(inode)
            .map_err(|e| failed(op, &e))?;
        let node = self.nodes.node_id(inode.number);
        let ttl = if self.nodes.is_displaced(inode.number) {
            Duration::ZERO
        } else {
            self.attr_ttl
        };
        Ok((file_attr(inode, node, blocks, &self.owners), ttl))
    }

    /// Hand node of `inode`, found in directory `parent`, to the kernel once more.
    fn remember(&self, op: &str, inode: Inode, parent: InodeRef) -> Result<u64, Errno> {
        let node = self.nodes.remember(inode.number, inode.iref).map_err(|e| {
            tracing::warn!("{op}: corrupt image: {e}");
            Errno::EIO
        })?;
        self.nodes.note_parent(inode.number, parent);
        self.nodes.keep_inode(&Arc::new(inode));
        Ok(node)
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
            .map_err(|e| failed("lookup", &e))?
        else {
            return Ok(None);
        };
        let inode = self.entry_inode("lookup", &entry)?;
        let found = self.entry_attr("lookup", &inode)?;
        self.remember("lookup", inode, dir.iref)?;
        Ok(Some(found))
    }

    /// The listing of directory `node`, from its handle if it has one.
    fn listing(&self, op: &str, node: INodeNo, fh: FileHandle) -> Result<Arc<Listing>, Errno> {
        if let Some(open) = self.dirs.get(fh.0) {
            return Ok(open);
        }
        let inode = self.inode_of(op, node)?;
        if inode.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        self.listings
            .of(&self.archive, &inode)
            .map_err(|e| failed(op, &e))
    }

    fn open_dir(&self, node: INodeNo) -> Result<u64, Errno> {
        let listing = self.listing("opendir", node, FileHandle(0))?;
        Ok(self.dirs.insert(listing))
    }

    fn open_file(&self, node: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(Errno::EROFS);
        }
        let inode = self.inode_of("open", node)?;
        match inode.kind {
            FileKind::File => Ok(self.files.insert(OpenFile {
                inode,
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
        let stream = self.nodes.stream(node.0).unwrap_or_default();
        Ok((inode, stream))
    }

    /// The bytes of a read: a range of one cached block, or assembled in `assembly`; and
    /// the file's inode.
    fn read_file<'a>(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        assembly: &'a mut Vec<u8>,
    ) -> Result<(ReadData<'a>, Arc<Inode>), Errno> {
        let (inode, stream) = self.file_of(node, fh)?;
        let data = self.read_bytes(&inode, &stream, offset, size, assembly)?;
        Ok((data, inode))
    }

    fn read_bytes<'a>(
        &self,
        inode: &Inode,
        stream: &Stream,
        offset: u64,
        size: u32,
        assembly: &'a mut Vec<u8>,
    ) -> Result<ReadData<'a>, Errno> {
        let file = inode.as_file().ok_or(Errno::EBADF)?;
        let want = (size as u64).min(file.file_size.saturating_sub(offset)) as usize;
        self.readahead.on_read(file, stream, offset, want as u64);
        // The kernel reads whole aligned blocks, and small files are one fragment: answer
        // those straight from the cached block, without assembling a copy.
        let bs = u64::from(self.archive.superblock().block_size);
        let within = (offset % bs) as usize;
        if want > 0 && within + want <= bs as usize {
            let block = self
                .archive
                .file_block(file, offset / bs)
                .map_err(|e| failed("read", &e))?;
            if block.bytes().is_some() {
                return Ok(ReadData::Block(block, within..within + want));
            }
        }
        assembly.clear();
        assembly.resize(want, 0);
        let n = self
            .archive
            .read_file_at(file, offset, assembly)
            .map_err(|e| failed("read", &e))?;
        Ok(ReadData::Assembled(&assembly[..n]))
    }

    /// Entry `index` of a directory as readdir numbers them: `.`, `..`, then the stored
    /// entries. Returns (inode number, type, name).
    fn dir_slot(dir: &Listing, index: u64) -> Option<(u32, FileKind, &[u8])> {
        match index {
            0 => Some((dir.number, FileKind::Directory, b".")),
            1 => Some((dir.parent, FileKind::Directory, b"..")),
            i => dir
                .entries
                .get(usize::try_from(i - 2).ok()?)
                .map(|e| (e.inode_number, e.kind, e.name.as_slice())),
        }
    }

    fn fill_dir(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), Errno> {
        let dir = self.listing("readdir", node, fh)?;
        let mut index = offset;
        while let Some((number, kind, name)) = Self::dir_slot(&dir, index) {
            if reply.add(
                INodeNo(u64::from(number)),
                index + 1,
                file_type(kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
            index += 1;
        }
        Ok(())
    }

    /// Fill a readdirplus reply. Every entry added (but `.` and `..`, which the kernel does
    /// not keep) is a lookup the kernel will count, so it is remembered before the reply.
    fn fill_dir_plus(
        &self,
        node: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> Result<(), Errno> {
        let dir = self.listing("readdirplus", node, fh)?;
        let mut index = offset;
        while let Some((number, _, name)) = Self::dir_slot(&dir, index) {
            let name = OsStr::from_bytes(name);
            let full = if index < 2 {
                let attr = bare_dir_attr(u64::from(number));
                reply.add(
                    attr.ino,
                    index + 1,
                    name,
                    &self.attr_ttl,
                    &attr,
                    Generation(0),
                )
            } else {
                let entry = &dir.entries[(index - 2) as usize];
                // A readdirplus entry's d_ino is its node id, which for the displaced
                // inode is not its number. End the reply before it: the kernel asks for
                // the rest with plain readdir (READDIRPLUS_AUTO uses plus past offset 0
                // only after lookups in the directory), which reports the true number.
                if index > offset && self.nodes.is_displaced(entry.inode_number) {
                    break;
                }
                let (attr, ttl, node) = match self.plus_entry(dir.iref, entry) {
                    Ok(found) => found,
                    // Answer what is done; the next call starts at the bad entry and fails.
                    Err(_) if index > offset => break,
                    Err(e) => return Err(e),
                };
                let full = reply.add(attr.ino, index + 1, name, &ttl, &attr, Generation(0));
                if full {
                    self.nodes.forget(node, 1);
                }
                full
            };
            if full {
                break;
            }
            index += 1;
        }
        Ok(())
    }

    /// The attributes, their lifetime and the (remembered) node of one readdirplus entry
    /// of directory `dir`.
    fn plus_entry(
        &self,
        dir: InodeRef,
        entry: &DirEntry,
    ) -> Result<(FileAttr, Duration, u64), Errno> {
        let inode = self.entry_inode("readdirplus", entry)?;
        let (attr, ttl) = self.entry_attr("readdirplus", &inode)?;
        let node = self.remember("readdirplus", inode, dir)?;
        Ok((attr, ttl, node))
    }

    /// The value of xattr `name` of `node`.
    fn xattr_value(&self, node: INodeNo, name: &[u8]) -> Result<Vec<u8>, Errno> {
        if !XATTR_PREFIXES.iter().any(|p| name.starts_with(p)) {
            return Err(Errno::EOPNOTSUPP);
        }
        let inode = self.inode_of("getxattr", node)?;
        let xattrs = self
            .archive
            .xattrs(&inode)
            .map_err(|e| failed("getxattr", &e))?;
        xattrs
            .into_iter()
            .find(|x| x.name == name)
            .map(|x| x.value)
            .ok_or(Errno::NO_XATTR)
    }

    /// The NUL-terminated names of the xattrs of `node` that `uid` may list: trusted.* only
    /// for root, as the kernel lists them only to callers with CAP_SYS_ADMIN.
    fn xattr_names(&self, node: INodeNo, uid: u32) -> Result<Vec<u8>, Errno> {
        let inode = self.inode_of("listxattr", node)?;
        // In an image without an xattr table, the kernel answers listxattr with EOPNOTSUPP
        // for the inodes whose operations include listxattr (directories, symlinks and
        // every extended inode); basic files, devices, fifos and sockets list nothing.
        if self.archive.superblock().xattr_table == NO_TABLE
            && (inode.extended || matches!(inode.kind, FileKind::Directory | FileKind::Symlink))
        {
            return Err(Errno::EOPNOTSUPP);
        }
        let xattrs = self
            .archive
            .xattrs(&inode)
            .map_err(|e| failed("listxattr", &e))?;
        let mut names = Vec::new();
        for x in xattrs
            .iter()
            .filter(|x| uid == 0 || !x.name.starts_with(b"trusted."))
        {
            names.extend_from_slice(&x.name);
            names.push(0);
        }
        Ok(names)
    }
}

/// The answer to a read: a range of one cached block, or bytes assembled for it.
enum ReadData<'a> {
    Block(BlockData, std::ops::Range<usize>),
    Assembled(&'a [u8]),
}

impl ReadData<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            ReadData::Block(block, range) => &block.bytes().unwrap_or_default()[range.clone()],
            ReadData::Assembled(v) => v,
        }
    }
}

thread_local! {
    /// Where each request thread assembles reads that span blocks. The kernel reads up to
    /// 1 MiB at a time; a fresh buffer per read was a fresh mmap, and page faults on all of
    /// it, for every request of a sequential reader.
    static ASSEMBLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Answer an xattr request the way getxattr(2) and listxattr(2) expect: the size when
/// asked with size 0, ERANGE when the value does not fit, else the value.
fn reply_xattr(reply: ReplyXattr, size: u32, value: Result<Vec<u8>, Errno>) {
    match value {
        Err(e) => reply.error(e),
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
    }
}

/// The negative entry: node 0 tells the kernel the name does not exist, and the TTL lets
/// it remember that.
fn negative_entry() -> FileAttr {
    let mut attr = bare_dir_attr(0);
    attr.kind = fuser::FileType::RegularFile;
    attr
}

impl Filesystem for ArchiveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!("the kernel does not offer {cap:?}");
            }
        }
        // As much read-ahead as the kernel allows.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.serve("lookup", || {
            match self.lookup_entry(parent, name.as_bytes()) {
                Ok(Some((attr, attr_ttl))) => {
                    reply.entry_with_ttls(&attr_ttl, &CACHE_TTL, &attr, Generation(0))
                }
                Ok(None) => reply.entry(&CACHE_TTL, &negative_entry(), Generation(0)),
                Err(e) => reply.error(e),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.serve("forget", || self.nodes.forget(ino.0, nlookup))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve("getattr", || {
            match self
                .inode_of("getattr", ino)
                .and_then(|i| self.attr("getattr", &i))
            {
                Ok(attr) => reply.attr(&self.attr_ttl, &attr),
                Err(e) => reply.error(e),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.serve("readlink", || match self.inode_of("readlink", ino) {
            Ok(inode) => match inode.symlink_target() {
                Some(target) => reply.data(target),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.opens == Opens::Unasked {
            // The mount is read-only, so the kernel itself refuses opens for writing.
            return self.serve("open", || reply.error(Errno::ENOSYS));
        }
        self.serve("open", || match self.open_file(ino, flags) {
            Ok(fh) => {
                self.activity.opened();
                // Nothing is ever written, so close need not wait for a flush round trip.
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
                )
            }
            Err(e) => reply.error(e),
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.serve("read", || {
            ASSEMBLY.with_borrow_mut(|assembly| {
                match self.read_file(ino, fh, offset, size, assembly) {
                    Ok((data, inode)) => {
                        reply.data(data.bytes());
                        // After the reply: the reader goes on while siblings are pushed.
                        self.pusher.after_read(ino.0, &inode);
                    }
                    Err(e) => reply.error(e),
                }
            })
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.serve("release", || {
            if self.files.remove(fh.0) {
                self.activity.released();
            }
            reply.ok()
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.opens == Opens::Unasked {
            return self.serve("opendir", || reply.error(Errno::ENOSYS));
        }
        self.serve("opendir", || match self.open_dir(ino) {
            Ok(fh) => {
                self.activity.opened();
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                )
            }
            Err(e) => reply.error(e),
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.serve("readdir", || {
            match self.fill_dir(ino, fh, offset, &mut reply) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.serve("readdirplus", || {
            match self.fill_dir_plus(ino, fh, offset, &mut reply) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.serve("releasedir", || {
            if self.dirs.remove(fh.0) {
                self.activity.released();
            }
            reply.ok()
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.serve("statfs", || {
            let s = self.archive.statfs();
            // Nothing is free on a read-only image; f_frsize is f_bsize, as the kernel
            // fills it in for squashfs.
            reply.statfs(
                s.blocks,
                0,
                0,
                s.files,
                0,
                s.block_size,
                s.name_max,
                s.block_size,
            )
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.serve("getxattr", || {
            reply_xattr(reply, size, self.xattr_value(ino, name.as_bytes()))
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let uid = req.uid();
        self.serve("listxattr", || {
            reply_xattr(reply, size, self.xattr_names(ino, uid))
        })
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Called only without default_permissions, where mode bits are not enforced; the
        // kernel refuses W_OK on the read-only mount itself.
        self.serve("access", || reply.ok())
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written. Files opened without asking (Opens::Unasked) lack
        // FOPEN_NOFLUSH, so the kernel would flush at every close; ENOSYS tells it to stop.
        self.serve("flush", || reply.error(Errno::ENOSYS))
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.serve("fsync", || reply.ok())
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.serve("fsyncdir", || reply.ok())
    }

    // The kernel falls back to its own behaviour for these, as on the squashfs driver,
    // which implements none of them.
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: ReplyLseek,
    ) {
        self.serve("lseek", || reply.error(Errno::ENOSYS))
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        self.serve("poll", || reply.error(Errno::ENOSYS))
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.serve("ioctl", || reply.error(Errno::ENOTTY))
    }

    // Everything that would change the image answers EROFS.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.serve("setattr", || reply.error(Errno::EROFS))
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.serve("mknod", || reply.error(Errno::EROFS))
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.serve("mkdir", || reply.error(Errno::EROFS))
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.serve("unlink", || reply.error(Errno::EROFS))
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.serve("rmdir", || reply.error(Errno::EROFS))
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.serve("symlink", || reply.error(Errno::EROFS))
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.serve("rename", || reply.error(Errno::EROFS))
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.serve("link", || reply.error(Errno::EROFS))
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.serve("write", || reply.error(Errno::EROFS))
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.serve("create", || reply.error(Errno::EROFS))
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.serve("setxattr", || reply.error(Errno::EROFS))
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        self.serve("removexattr", || reply.error(Errno::EROFS))
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        self.serve("fallocate", || reply.error(Errno::EROFS))
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.serve("copy_file_range", || reply.error(Errno::EROFS))
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
    fn slots_number_dot_dotdot_then_entries() {
        let dir = Listing::new(
            crate::archive::InodeRef(0x40),
            10,
            20,
            vec![DirEntry {
                name: b"a".to_vec(),
                iref: crate::archive::InodeRef(0x30),
                inode_number: 3,
                kind: FileKind::File,
            }],
        );
        assert_eq!(
            ArchiveFs::dir_slot(&dir, 0),
            Some((10, FileKind::Directory, &b"."[..]))
        );
        assert_eq!(
            ArchiveFs::dir_slot(&dir, 1),
            Some((20, FileKind::Directory, &b".."[..]))
        );
        assert_eq!(
            ArchiveFs::dir_slot(&dir, 2),
            Some((3, FileKind::File, &b"a"[..]))
        );
        assert_eq!(ArchiveFs::dir_slot(&dir, 3), None);
        assert_eq!(ArchiveFs::dir_slot(&dir, u64::MAX), None);
    }
}
