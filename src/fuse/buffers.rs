//! Buffers for reads that span blocks. The kernel reads up to 1 MiB at a time; a fresh
//! buffer per read was a fresh mmap, and page faults on all of it, for every request of a
//! sequential reader. Request threads take one from a small shared pool and give it back,
//! so an idle server can empty the pool (a buffer per thread, kept by the thread, could not
//! be given back from outside).

use std::sync::Mutex;

/// Buffers kept in the pool, at most: one per request thread is all a busy server uses.
const POOL_MAX: usize = 16;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer to assemble one read in.
pub fn assembly_buffer() -> Vec<u8> {
    POOL.lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default()
}

/// Give a buffer back for the next read.
pub fn return_assembly_buffer(mut buffer: Vec<u8>) {
    if buffer.capacity() == 0 {
        return;
    }
    buffer.clear();
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(buffer);
    }
}

/// Free every pooled buffer; returns the bytes released.
pub fn release_assembly_buffers() -> u64 {
    let drained = std::mem::take(&mut *POOL.lock().unwrap_or_else(|p| p.into_inner()));
    drained.iter().map(|b| b.capacity() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_released() {
        let mut b = assembly_buffer();
        b.resize(1 << 20, 7);
        return_assembly_buffer(b);
        let again = assembly_buffer();
        assert!(again.capacity() >= 1 << 20 && again.is_empty());
        return_assembly_buffer(again);
        assert!(release_assembly_buffers() >= 1 << 20);
        assert_eq!(assembly_buffer().capacity(), 0);
    }
}
