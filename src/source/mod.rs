//! Where the image's bytes come from: positioned reads behind one trait.
//!
//! The archive reads the image only through [`ReadAt`], so a SIF partition or an image at
//! an offset of a local file ([`file`]), a remote object behind the node-local chunk cache
//! ([`remote`]), an in-memory buffer (tests, fuzzing) and a counting wrapper all look the
//! same, and nothing above this layer knows which it reads.

pub mod file;
pub mod remote;
pub mod window;

pub use file::{file_size, inherited_fd, open_image_file, FileWindow};
pub use window::Window;

use std::io;
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
    /// A hint that the bytes `range` will be read soon: the archive's read-ahead found a
    /// file read in order. A source that fetches from afar may start fetching them; others
    /// ignore it.
    fn will_read(&self, _range: std::ops::Range<u64>) {}
    /// Let go of what is held for speed alone (files kept open, spare buffers): the server
    /// has been idle a while. The next reads take what they need again.
    fn let_go(&self) {}
}

/// The end of a read of `len` bytes at `offset` from `what` of `size` bytes, or the
/// error a read past its end gets (never a short read).
pub fn end_within(offset: u64, len: usize, size: u64, what: &str) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .filter(|&end| end <= size)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {len} bytes at {offset} passes the end of {what} ({size} bytes)"),
            )
        })
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
    fn will_read(&self, range: std::ops::Range<u64>) {
        self.inner.will_read(range)
    }
    fn let_go(&self) {
        self.inner.let_go()
    }
}

impl<S: ReadAt + ?Sized> ReadAt for Arc<S> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn will_read(&self, range: std::ops::Range<u64>) {
        (**self).will_read(range)
    }
    fn let_go(&self) {
        (**self).let_go()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_counts() {
        let c = CountingSource::new(vec![1u8; 100]);
        let mut b = [0u8; 10];
        c.read_exact_at(&mut b, 0).unwrap();
        c.read_exact_at(&mut b, 50).unwrap();
        assert_eq!(c.bytes_read(), 20);
        assert_eq!(c.reads(), 2);
    }
}
