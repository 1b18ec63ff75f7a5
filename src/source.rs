//! Positioned reads over a byte window of a file.
//!
//! The archive reads the image only through [`ReadAt`], so a SIF partition, an image at an
//! offset, an in-memory buffer (tests, fuzzing) and a counting wrapper all look the same.
//! pread rather than mmap: a daemon must not die of SIGBUS when the image file shrinks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Random-access reads from an image of known length.
pub trait ReadAt: Send + Sync {
    /// Fill `buf` from `offset`; an error if the range is not entirely readable.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Length of the window in bytes.
    fn len(&self) -> u64;
    /// True when the window is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        <[u8] as ReadAt>::read_exact_at(self.as_slice(), buf, offset)
    }
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the image",
    )
}

/// Counts the bytes and calls that pass through to the inner source: lets tests prove that
/// opening an image reads a fixed amount whatever its size, and lets `inspect` report it.
pub struct CountingSource<S: ?Sized> {
    bytes: AtomicU64,
    calls: AtomicU64,
    inner: S,
}

impl<S> CountingSource<S> {
    /// Wrap a source.
    pub fn new(inner: S) -> Self {
        CountingSource {
            bytes: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            inner,
        }
    }
}

impl<S: ?Sized> CountingSource<S> {
    /// Bytes requested so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Read calls so far.
    pub fn reads(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl<S: ReadAt + ?Sized> ReadAt for CountingSource<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.read_exact_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

impl<S: ReadAt + ?Sized> ReadAt for Arc<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn len(&self) -> u64 {
        (**self).len()
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
    fn counting_counts() {
        let c = CountingSource::new(vec![1u8; 100]);
        let mut b = [0u8; 10];
        c.read_exact_at(&mut b, 0).unwrap();
        c.read_exact_at(&mut b, 50).unwrap();
        assert_eq!(c.bytes_read(), 20);
        assert_eq!(c.reads(), 2);
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
