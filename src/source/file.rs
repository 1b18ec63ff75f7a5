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
        let file_len = file.metadata()?.len();
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
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} passes the end of the image ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                )
            })?;
        debug_assert!(end <= self.len);
        // The file may have shrunk since the window was made: pread reports a short read,
        // which read_exact_at turns into UnexpectedEof rather than a signal.
        self.file.read_exact_at(buf, self.start + offset)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Open an image file read-only. `/proc/self/fd/N` and `/dev/fd/N` name an inherited
/// descriptor: reopening the magic link would fail for some files (and would not share the
/// descriptor the launcher handed over), so duplicate the descriptor instead.
pub fn open_image_file(path: &Path) -> io::Result<File> {
    if let Some(fd) = inherited_fd(path) {
        let dup = nix::unistd::dup(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            .map_err(io::Error::from)?;
        let file = File::from(dup);
        // Refuse directories and the like early: a clear message beats EISDIR later.
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        return Ok(file);
    }
    let file = File::open(path)?;
    if file.metadata()?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory",
        ));
    }
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
    let valid = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    valid.then_some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
}
