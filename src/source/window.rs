//! A window of another source: the bytes of a SIF partition, or of an image at an offset,
//! inside a whole file or remote object.

use std::io;
use std::sync::Arc;

use super::ReadAt;

/// The bytes `[start, start + len)` of `inner`.
pub struct Window {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Window {
    /// A window that must lie inside `inner`.
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> io::Result<Self> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "window end overflows"))?;
        if end > inner.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "window [{start}, {end}) lies beyond the end of the image ({} bytes)",
                    inner.len()
                ),
            ));
        }
        Ok(Window { inner, start, len })
    }

    /// Byte offset of the window inside the whole source.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl ReadAt for Window {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::end_within(offset, buf.len(), self.len, "the image")?;
        self.inner.read_exact_at(buf, self.start + offset)
    }

    fn will_read(&self, range: std::ops::Range<u64>) {
        let end = range.end.min(self.len);
        if range.start < end {
            self.inner
                .will_read(self.start + range.start..self.start + end);
        }
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn let_go(&self) {
        self.inner.let_go()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_reads_inside_and_refuses_outside() {
        let whole: Arc<dyn ReadAt> = Arc::new(b"0123456789".to_vec());
        let w = Window::new(whole.clone(), 2, 5).unwrap();
        let mut buf = [0u8; 3];
        w.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"345");
        assert!(w.read_exact_at(&mut buf, 3).is_err());
        assert!(w.read_exact_at(&mut buf, u64::MAX).is_err());
        assert!(Window::new(whole.clone(), 6, 5).is_err());
        assert!(Window::new(whole, u64::MAX, 2).is_err());
    }
}
