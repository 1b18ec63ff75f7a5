//! fuser's request callbacks: each one hands its request to the answer in the adapter
//! (`super`), inside [`ArchiveFs::serve`](super::ArchiveFs). The requests a read-only image
//! refuses are generated from one table at the end.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::attr::bare_dir_attr;
use super::{ArchiveFs, Opens, CACHE_TTL};

/// Background requests (mostly read-ahead) the kernel may have in flight at once.
const MAX_BACKGROUND: u16 = 64;

/// The negative entry: node 0 tells the kernel the name does not exist, and the TTL lets
/// it remember that.
fn negative_entry() -> FileAttr {
    let mut attr = bare_dir_attr(0);
    attr.kind = fuser::FileType::RegularFile;
    attr
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

/// Answer EACCES and return when the mount does not admit the caller (see
/// [`access`](super::access)). Requests the kernel sends on behalf of a file already open
/// (reads, directory reads, releases) or on no one's behalf (forgets) are not checked, as
/// in libfuse: opening was.
macro_rules! admit {
    ($self:ident, $req:ident, $reply:ident) => {
        if !$self.callers.admits($req.uid()) {
            tracing::debug!("refused a request from uid {} (EACCES)", $req.uid());
            return $reply.error(Errno::EACCES);
        }
    };
}

/// Requests answered with one fixed errno, whatever they carry: one line each.
macro_rules! answer_every {
    ($($errno:expr => fn $name:ident($($arg:ident: $ty:ty),*) -> $reply:ty;)*) => {
        $(
            fn $name(&self, req: &Request, $($arg: $ty,)* reply: $reply) {
                $(let _ = $arg;)*
                admit!(self, req, reply);
                self.serve(stringify!($name), || reply.error($errno))
            }
        )*
    };
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

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        admit!(self, req, reply);
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

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        admit!(self, req, reply);
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

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        admit!(self, req, reply);
        self.serve("readlink", || match self.inode_of("readlink", ino) {
            Ok(inode) => match inode.symlink_target() {
                Some(target) => reply.data(target),
                None => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        admit!(self, req, reply);
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
            let mut assembly = super::buffers::assembly_buffer();
            match self.read_file(ino, fh, offset, size, &mut assembly) {
                Ok((bytes, inode)) => {
                    let sent = bytes.bytes().len() as u64;
                    reply.data(bytes.bytes());
                    // After the reply: the reader goes on while neighbours are pushed and
                    // what the kernel now holds is let go.
                    self.after_read(&inode, offset, sent);
                }
                Err(e) => reply.error(e),
            }
            super::buffers::return_assembly_buffer(assembly);
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

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        admit!(self, req, reply);
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

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        admit!(self, req, reply);
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

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        admit!(self, req, reply);
        self.serve("getxattr", || {
            reply_xattr(reply, size, self.xattr_value(ino, name.as_bytes()))
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        admit!(self, req, reply);
        let uid = req.uid();
        self.serve("listxattr", || {
            reply_xattr(reply, size, self.xattr_names(ino, uid))
        })
    }

    fn access(&self, req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        admit!(self, req, reply);
        // Called only without default_permissions, where mode bits are not enforced; the
        // kernel refuses W_OK on the read-only mount itself.
        self.serve("access", || reply.ok())
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

    answer_every! {
        // Nothing is ever written. Files opened without asking (Opens::Unasked) lack
        // FOPEN_NOFLUSH, so the kernel would flush at every close; ENOSYS tells it to stop.
        Errno::ENOSYS => fn flush(_ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner) -> ReplyEmpty;
        // The kernel falls back to its own behaviour for these, as on the squashfs driver,
        // which implements none of them.
        Errno::ENOSYS => fn lseek(_ino: INodeNo, _fh: FileHandle, _offset: i64, _whence: i32) -> ReplyLseek;
        Errno::ENOSYS => fn poll(_ino: INodeNo, _fh: FileHandle, _ph: PollNotifier, _events: PollEvents, _flags: PollFlags) -> ReplyPoll;
        Errno::ENOTTY => fn ioctl(_ino: INodeNo, _fh: FileHandle, _flags: IoctlFlags, _cmd: u32, _in_data: &[u8], _out_size: u32) -> ReplyIoctl;
        // Everything that would change the image.
        Errno::EROFS => fn setattr(_ino: INodeNo, _mode: Option<u32>, _uid: Option<u32>, _gid: Option<u32>, _size: Option<u64>, _atime: Option<TimeOrNow>, _mtime: Option<TimeOrNow>, _ctime: Option<SystemTime>, _fh: Option<FileHandle>, _crtime: Option<SystemTime>, _chgtime: Option<SystemTime>, _bkuptime: Option<SystemTime>, _flags: Option<BsdFileFlags>) -> ReplyAttr;
        Errno::EROFS => fn mknod(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _rdev: u32) -> ReplyEntry;
        Errno::EROFS => fn mkdir(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32) -> ReplyEntry;
        Errno::EROFS => fn unlink(_parent: INodeNo, _name: &OsStr) -> ReplyEmpty;
        Errno::EROFS => fn rmdir(_parent: INodeNo, _name: &OsStr) -> ReplyEmpty;
        Errno::EROFS => fn symlink(_parent: INodeNo, _link_name: &OsStr, _target: &Path) -> ReplyEntry;
        Errno::EROFS => fn rename(_parent: INodeNo, _name: &OsStr, _newparent: INodeNo, _newname: &OsStr, _flags: RenameFlags) -> ReplyEmpty;
        Errno::EROFS => fn link(_ino: INodeNo, _newparent: INodeNo, _newname: &OsStr) -> ReplyEntry;
        Errno::EROFS => fn write(_ino: INodeNo, _fh: FileHandle, _offset: u64, _data: &[u8], _write_flags: WriteFlags, _flags: OpenFlags, _lock_owner: Option<LockOwner>) -> ReplyWrite;
        Errno::EROFS => fn create(_parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _flags: i32) -> ReplyCreate;
        Errno::EROFS => fn setxattr(_ino: INodeNo, _name: &OsStr, _value: &[u8], _flags: i32, _position: u32) -> ReplyEmpty;
        Errno::EROFS => fn removexattr(_ino: INodeNo, _name: &OsStr) -> ReplyEmpty;
        Errno::EROFS => fn fallocate(_ino: INodeNo, _fh: FileHandle, _offset: u64, _length: u64, _mode: i32) -> ReplyEmpty;
        Errno::EROFS => fn copy_file_range(_ino_in: INodeNo, _fh_in: FileHandle, _offset_in: u64, _ino_out: INodeNo, _fh_out: FileHandle, _offset_out: u64, _len: u64, _flags: CopyFileRangeFlags) -> ReplyWrite;
    }
}
