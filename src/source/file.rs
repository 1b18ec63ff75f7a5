//! A window of a local file: the bytes of the image read with pread. pread rather than
//! mmap: a daemon must not die of SIGBUS when the image file shrinks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::ReadAt;

/// The bytes `[start, start + len)` of a file.
#[derive(Debug)]
pub struct FileWindow {
    file: Arc<File>,
    start: u64,
    len: u64,
}

impl FileWindow {
    /// A window over an open file. The window must lie inside the file as it is now.
    pub fn new(file: Arc<File>, start: u64, len: u64) -> io::Result<Self> {
        let file_len = file_size(&file)?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "window end overflows"))?;
        if end > file_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "window [{start}, {end}) lies beyond the end of the file ({file_len} bytes)"
                ),
            ));
        }
        Ok(FileWindow { file, start, len })
    }

    /// Byte offset of the window inside the file.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl ReadAt for FileWindow {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::end_within(offset, buf.len(), self.len, "the image")?;
        // The file may have shrunk since the window was made: pread reports a short read,
        // which read_exact_at turns into UnexpectedEof rather than a signal.
        self.file.read_exact_at(buf, self.start + offset)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Refuse what cannot be an image before anything reads it: a FIFO or a socket would block
/// or fail every positioned read, a directory cannot be read at all.
fn check_image_kind(meta: &std::fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_file() || kind.is_block_device() {
        return Ok(());
    } else if kind.is_dir() {
        "is a directory"
    } else if kind.is_fifo() {
        "is a FIFO"
    } else if kind.is_socket() {
        "is a socket"
    } else if kind.is_char_device() {
        "is a character device"
    } else {
        "is not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}: an image must be a regular file or a block device"),
    ))
}

/// The size of an image file: its length, or for a block device (whose metadata says 0)
/// the size of the device.
pub fn file_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Reads are positioned (pread), so moving the file offset changes nothing else.
        return (&*file).seek(SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Open an image file read-only. `/proc/self/fd/N` and `/dev/fd/N` name an inherited
/// descriptor: reopening the magic link would fail for some files (and would not share the
/// descriptor the launcher handed over), so duplicate the descriptor instead.
///
/// Never blocks: the type is checked before the file is opened, the open itself does not
/// wait (O_NONBLOCK, which a FIFO would otherwise need to block for a writer), and what was
/// opened is checked again to be the same file.
pub fn open_image_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if let Some(fd) = inherited_fd(path) {
        // SAFETY: inherited_fd checked that the descriptor is open; it is only duplicated.
        let dup = nix::unistd::dup(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            .map_err(io::Error::from)?;
        let file = File::from(dup);
        check_image_kind(&file.metadata()?)?;
        return Ok(file);
    }
    let before = std::fs::metadata(path)?;
    check_image_kind(&before)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let opened = file.metadata()?;
    check_image_kind(&opened)?;
    if (opened.dev(), opened.ino()) != (before.dev(), before.ino()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the file changed while it was opened",
        ));
    }
    // Reads of a regular file or a block device may wait for the disk, as usual.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(io::Error::from)?;
    Ok(file)
}

/// The descriptor number in `/proc/self/fd/N` or `/dev/fd/N`, if that is what `path` is.
pub fn inherited_fd(path: &Path) -> Option<i32> {
    let s = path.to_str()?;
    let n = s
        .strip_prefix("/proc/self/fd/")
        .or_else(|| s.strip_prefix("/dev/fd/"))?;
    let fd: i32 = n.parse().ok()?;
    // Only a descriptor that is actually open in this process.
    // SAFETY: fcntl(F_GETFD) on a number reads and writes no memory; it fails with EBADF
    // when nothing is open there.
    let valid = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    valid.then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    #[test]
    fn window_reads_inside_and_refuses_outside() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let w = FileWindow::new(Arc::new(f), 2, 5).unwrap();
        let mut buf = [0u8; 3];
        w.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"345");
        assert!(w.read_exact_at(&mut buf, 3).is_err());
        assert!(w.read_exact_at(&mut buf, u64::MAX).is_err());
    }

    #[test]
    fn window_beyond_file_is_refused() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123").unwrap();
        assert!(FileWindow::new(Arc::new(f), 2, 5).is_err());
    }

    #[test]
    fn proc_self_fd_is_duplicated() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"abc").unwrap();
        use std::os::fd::AsRawFd;
        let p = format!("/proc/self/fd/{}", f.as_file().as_raw_fd());
        let g = open_image_file(Path::new(&p)).unwrap();
        let mut b = [0u8; 3];
        g.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"abc");
    }

    /// A FIFO (which open(2) would block on for a writer), a pipe or socket handed over as
    /// a descriptor, a directory and a character device: refused at once, with the reason;
    /// the open does not wait for a writer.
    #[test]
    fn what_cannot_be_an_image_is_refused_without_blocking() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let by_fd = |fd: i32| PathBuf::from(format!("/proc/self/fd/{fd}"));
        for (path, what) in [
            (fifo.clone(), "is a FIFO"),
            (by_fd(pipe_read.as_raw_fd()), "is a FIFO"),
            (by_fd(sock.as_raw_fd()), "is a socket"),
            (dir.path().to_path_buf(), "is a directory"),
            (PathBuf::from("/dev/null"), "is a character device"),
        ] {
            let err = open_image_file(&path).unwrap_err().to_string();
            assert!(err.contains(what), "{}: {err}", path.display());
            assert!(err.contains("regular file or a block device"), "{err}");
        }
    }
}
