//! Read-ahead: when a file is read sequentially, decompress the blocks that follow on
//! worker threads, in parallel with the request that is being answered, into the block
//! cache. The kernel sends a FUSE server at most one read-ahead window (128 KiB, one block)
//! at a time, so without this one request thread decompresses one block after another
//! while the other core idles; with it, the next request finds its block decompressed.
//!
//! Bounded on every side: a fixed number of workers, a bounded job queue (a full queue
//! drops the job; the reader decompresses the block itself when it gets there), a window
//! of at most [`MAX_WINDOW_BYTES`] per file, and the blocks land in the byte-budgeted
//! cache. Workers load through the cache's placeholder guards, so a block is never
//! decompressed twice: a reader that arrives while a worker decompresses it waits for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::cache::BlockKind;

use super::inode::FileInfo;
use super::Archive;

/// Most bytes one file reads ahead of its reader: a few blocks is enough to keep the
/// workers busy, and little enough that read-ahead cannot crowd the cache out.
pub const MAX_WINDOW_BYTES: u64 = 4 << 20;
/// Jobs waiting for a worker, at most.
const QUEUE: usize = 64;

/// One block to decompress into the cache.
struct Job {
    pos: u64,
    word: u32,
    expected: usize,
    /// The stream it is read ahead for, and where in the file the block starts: once the
    /// reader has got there, the block is the reader's (and may already have been
    /// delivered and let go: loading it then would leave it in the cache for nothing).
    stream: Arc<Stream>,
    from: u64,
}

/// The worker pool of one archive. The workers start at the first read, not at creation:
/// a mount creates the pool before it forks into a daemon (which keeps only the forking
/// thread) and before it blocks the exit signals that every serving thread must inherit
/// blocked; threads spawned by a request thread inherit its signal mask.
pub struct ReadAhead {
    archive: Arc<Archive>,
    workers: usize,
    pool: OnceLock<Pool>,
}

struct Pool {
    queue: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// The sequential-read state of one open file.
#[derive(Debug, Default)]
pub struct Stream {
    /// Where the next read starts if the reader is sequential.
    next_offset: AtomicU64,
    /// First block not yet handed to the workers.
    ahead_until: AtomicU64,
    /// Blocks of read-ahead: doubles while the reader stays sequential.
    window: AtomicU64,
}

impl ReadAhead {
    /// A pool of `workers` threads (0: no read-ahead) loading blocks of `archive`.
    pub fn new(archive: Arc<Archive>, workers: usize) -> Self {
        ReadAhead {
            archive,
            workers,
            pool: OnceLock::new(),
        }
    }

    /// The job queue, starting the workers on first use.
    fn queue(&self) -> Option<&SyncSender<Job>> {
        if self.workers == 0 {
            return None;
        }
        let pool = self.pool.get_or_init(|| {
            let (tx, rx) = sync_channel::<Job>(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            let threads: Vec<_> = (0..self.workers)
                .filter_map(|i| {
                    let archive = self.archive.clone();
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name(format!("sifuse-ra{i}"))
                        .spawn(move || work(&archive, &rx))
                        .map_err(|e| tracing::warn!("cannot start a read-ahead thread: {e}"))
                        .ok()
                })
                .collect();
            Pool {
                // Without a worker, queued jobs would only fill the queue.
                queue: (!threads.is_empty()).then_some(tx),
                threads,
            }
        });
        pool.queue.as_ref()
    }

    /// Note a read of `[offset, offset + len)` of `file` and, if the stream is sequential,
    /// queue the blocks that follow. Call before serving the read, so the workers run
    /// alongside it.
    pub fn on_read(&self, file: &FileInfo, stream: &Arc<Stream>, offset: u64, len: u64) {
        let Some(queue) = self.queue() else { return };
        let bs = u64::from(self.archive.sb.block_size);
        let end = offset.saturating_add(len).min(file.file_size);
        let prev = stream.next_offset.swap(end, Ordering::Relaxed);
        // Sequential: starts where the last read ended, or within one block of it (the
        // kernel's request threads may deliver neighbouring reads out of order).
        let sequential = offset != 0 && offset.abs_diff(prev) <= bs;
        if !sequential {
            // A fresh start or a seek: begin again with a small window at the next block.
            stream.window.store(0, Ordering::Relaxed);
            stream
                .ahead_until
                .store(end.div_ceil(bs), Ordering::Relaxed);
            if offset != 0 {
                return;
            }
        }
        // Never more than an eighth of the cache: what is read ahead must still be there
        // when its reader arrives.
        let max_window = (MAX_WINDOW_BYTES.min(self.archive.cache_budget() / 8) / bs).max(1);
        let window = match stream.window.load(Ordering::Relaxed) {
            0 => 2,
            w => (w * 2).min(max_window),
        };
        stream.window.store(window, Ordering::Relaxed);
        let blocks = file.block_count;
        let first = stream
            .ahead_until
            .load(Ordering::Relaxed)
            .max(end.div_ceil(bs));
        let last = (end.div_ceil(bs) + window).min(blocks);
        let mut next = first;
        // The image bytes of the blocks queued, for the source to fetch ahead.
        let mut bytes: Option<std::ops::Range<u64>> = None;
        while next < last {
            // A block the list cannot locate is the reader's to report.
            let Ok(at) = self.archive.block_location(file, next) else {
                break;
            };
            // Sparse blocks need no work; cached ones are done.
            if at.disk_len() != 0 && !self.archive.is_data_block_cached(at.offset) {
                let end = at.offset + u64::from(at.disk_len());
                bytes = Some(match bytes {
                    Some(r) => r.start.min(at.offset)..r.end.max(end),
                    None => at.offset..end,
                });
                let expected = (file.file_size - next * bs).min(bs) as usize;
                match queue.try_send(Job {
                    pos: at.offset,
                    word: at.word,
                    expected,
                    stream: stream.clone(),
                    from: next * bs,
                }) {
                    Ok(()) => {}
                    // Busy: leave the rest to the reader, and try again on its next read.
                    Err(TrySendError::Full(_)) => break,
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
            next += 1;
        }
        stream.ahead_until.fetch_max(next, Ordering::Relaxed);
        if let Some(range) = bytes {
            self.archive.source().will_read(range);
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(mut pool) = self.pool.take() {
            // Closing the queue ends the workers once they finish their current block.
            pool.queue.take();
            for t in pool.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

fn work(archive: &Archive, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        // Late: the reader got to the block first (under load, workers fall behind).
        if job.stream.next_offset.load(Ordering::Relaxed) > job.from {
            continue;
        }
        // A failure is the reader's to report when it reaches the block; nothing is cached.
        // A panic (a bug on a hostile image) must not end the worker either.
        let load = || archive.data_block(BlockKind::Data, job.pos, job.word, job.expected);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!("read-ahead of the block at byte {}: {e}", job.pos),
            Err(_) => tracing::warn!("read-ahead of the block at byte {} panicked", job.pos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tiny() -> Archive {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny-gzip.sqfs");
        Archive::open(Arc::new(std::fs::read(path).unwrap()), 1 << 20).unwrap()
    }

    /// A job for a block its reader has already reached is dropped: the block was the
    /// reader's to load, and may have been delivered and let go already.
    #[test]
    fn a_late_job_leaves_nothing_in_the_cache() {
        let a = tiny();
        let inode = a.resolve(b"dir/numbers").unwrap();
        let f = inode.as_file().unwrap();
        let bs = u64::from(a.sb.block_size);
        let at = a.block_location(f, 1).unwrap();
        let job = |reader_at: u64| Job {
            pos: at.offset,
            word: at.word,
            expected: (f.file_size - bs).min(bs) as usize,
            stream: Arc::new(Stream {
                next_offset: AtomicU64::new(reader_at),
                ..Stream::default()
            }),
            from: bs,
        };
        let run = |job: Job| {
            let (tx, rx) = sync_channel(1);
            tx.send(job).unwrap();
            drop(tx);
            work(&a, &Mutex::new(rx));
        };
        run(job(bs + 1));
        assert!(
            !a.is_data_block_cached(at.offset),
            "a late job loaded its block"
        );
        run(job(bs));
        assert!(a.is_data_block_cached(at.offset), "a timely job did not");
    }
}
