//! Inodes as FUSE attributes, field for field what the kernel's squashfs driver shows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::archive::{FileKind, Inode};

use super::owners::Owners;

/// st_blksize of squashfs on a loop device: the driver's 1 KiB device block size.
pub const KERNEL_BLKSIZE: u32 = 1024;

/// The FUSE file type of a SquashFS file kind.
pub fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The attributes of `inode`, reported with inode number `ino` and `blocks` 512-byte
/// blocks. SquashFS keeps one time per inode; the kernel shows it as atime, mtime and ctime.
pub fn file_attr(inode: &Inode, ino: u64, blocks: u64, owners: &Owners) -> FileAttr {
    let time = UNIX_EPOCH + Duration::from_secs(u64::from(inode.mtime));
    FileAttr {
        ino: INodeNo(ino),
        size: inode.size(),
        blocks,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(inode.kind),
        perm: inode.permissions & 0o7777,
        nlink: inode.nlink,
        uid: owners.uid.show(inode.uid),
        gid: owners.gid.show(inode.gid),
        // Both the squashfs driver and the FUSE client decode this with new_decode_dev.
        rdev: inode.rdev(),
        blksize: KERNEL_BLKSIZE,
        flags: 0,
    }
}

/// Attributes carrying only an inode number and a type: what readdirplus needs for the
/// `.` and `..` entries, whose attributes the kernel ignores.
pub fn bare_dir_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: KERNEL_BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{InodeBody, InodeRef};
    use crate::fuse::owners::IdView;

    fn device() -> Inode {
        Inode {
            iref: InodeRef(0x20),
            number: 42,
            kind: FileKind::CharDevice,
            permissions: 0o4755,
            uid: 1000,
            gid: 100,
            mtime: 4_294_967_295,
            nlink: 3,
            xattr_index: None,
            extended: false,
            body: InodeBody::Device { rdev: 0xffff_ffff },
        }
    }

    #[test]
    fn every_field_comes_from_the_inode() {
        let a = file_attr(&device(), 42, 7, &Owners::default());
        assert_eq!(a.ino, INodeNo(42));
        assert_eq!(a.kind, FileType::CharDevice);
        assert_eq!(a.perm, 0o4755);
        assert_eq!(
            (a.uid, a.gid, a.nlink, a.blocks, a.rdev),
            (1000, 100, 3, 7, 0xffff_ffff)
        );
        let t = UNIX_EPOCH + Duration::from_secs(4_294_967_295);
        assert_eq!((a.atime, a.mtime, a.ctime), (t, t, t));
        assert_eq!(a.blksize, KERNEL_BLKSIZE);
    }

    #[test]
    fn owners_are_shown_through_the_views() {
        let owners = Owners {
            uid: IdView::Fixed(5),
            gid: IdView::Mapped(vec!["100:200:1".parse().unwrap()]),
        };
        let a = file_attr(&device(), 42, 0, &owners);
        assert_eq!((a.uid, a.gid), (5, 200));
    }
}
