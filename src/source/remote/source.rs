//! A remote object as a [`ReadAt`]: reads are served from the node-local disk cache
//! ([`super::chunks`]; or, without one, a small in-memory cache of pages), and what is
//! missing is fetched from the store.
//!
//! - **Fetch what is read.** The unit of fetching is the 4 KiB page, not the chunk: a read
//!   of a few KiB fetches the pages it covers. The pages a read misses in neighbouring
//!   chunks are fetched in one range request (up to [`RemoteConfig::max_request_bytes`]).
//! - **Bounded.** At most [`RemoteConfig::max_in_flight`] fetches at once, each holding
//!   the buffers of its requests (a request's worth, and a page either side) until it
//!   has put them in the cache. Memory holds those, two spare buffers, and, without a disk
//!   cache, at most [`RemoteConfig::memory_bytes`] of pages: [`RemoteConfig::memory_bound`],
//!   40 MiB with the defaults. With a disk cache, pages read back come through the
//!   kernel's page cache and are not kept (each serving thread keeps a buffer of at most
//!   256 KiB to read them into). An idle server lets go of the spare buffers and of the
//!   chunk files kept open ([`ReadAt::let_go`]).
//! - **One fetcher per chunk.** Threads of one process take turns per chunk; processes
//!   claim a chunk in the disk cache (see [`super::chunks`]). A reader that finds its chunk
//!   taken waits, at most [`RemoteConfig::wait_limit`], then reads what arrived.
//! - **Read-ahead.** A reader that has read [`RemoteConfig::read_ahead_min_run`] bytes in a
//!   row gets what follows fetched before it asks, as far ahead as it has read, up to
//!   [`RemoteConfig::read_ahead_bytes`]: by background workers once serving has begun,
//!   otherwise right after its own read.
//! - **The metadata tail.** [`RemoteSource::prefetch`] fetches a range (the image's
//!   tables) in the background, in large requests; [`RemoteSource::warm`] does it now.
//! - **Failures.** A failed fetch is an `io::Error` for the read that needed it, once the
//!   store's own retries and timeouts are spent; nothing is remembered of it, so the next
//!   read asks the store again, and whatever is cached keeps being served.
//!
//! **Background threads start late.** A mount opens its image and then forks into a
//! daemon; threads alive at the fork would vanish in the daemon, leaving any lock they
//! held taken forever. So the workers start only at the first read made from a thread
//! other than the one that opened the source (a request thread of the serving process),
//! or when [`RemoteSource::start_background`] is called.

use std::collections::HashSet;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use super::chunks::{
    runs, ChunkCache, ClaimResult, ObjectChunks, ObjectMeta, WaitResult, PAGE_SIZE,
};
use super::{ObjectStore, ObjectVersion, RemoteError};
use crate::source::ReadAt;

const PAGE: u64 = PAGE_SIZE as u64;
/// Request buffers kept for the next requests.
const SPARE_BUFFERS: usize = 2;
/// The largest read-back buffer a thread keeps for its next read.
const SCRATCH_KEPT: usize = 256 << 10;

/// How a remote object is read.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Chunk size: the unit of the disk cache's files (a multiple of the 4 KiB page).
    pub chunk_size: u32,
    /// Without a disk cache: pages kept in memory.
    pub memory_bytes: u64,
    /// Range requests in flight at once, at most.
    pub max_in_flight: usize,
    /// Longest range request.
    pub max_request_bytes: u64,
    /// Longest wait for a chunk another reader (thread or process) is fetching, or for a
    /// free request slot.
    pub wait_limit: Duration,
    /// Bytes a reader reads in a row before read-ahead starts.
    pub read_ahead_min_run: u64,
    /// Most bytes read ahead of a sequential reader.
    pub read_ahead_bytes: u64,
    /// Background workers (read-ahead and prefetch).
    pub workers: usize,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            chunk_size: super::chunks::DEFAULT_CHUNK_SIZE,
            memory_bytes: 16 << 20,
            max_in_flight: 4,
            max_request_bytes: 4 << 20,
            wait_limit: Duration::from_secs(60),
            read_ahead_min_run: 1 << 20,
            read_ahead_bytes: 8 << 20,
            workers: 2,
        }
    }
}

impl RemoteConfig {
    /// The most memory the source holds, whatever it reads: pages kept in memory (without
    /// a disk cache), the buffers of the fetches in flight and the spare buffers.
    pub fn memory_bound(&self) -> u64 {
        self.memory_bytes + (self.max_in_flight + SPARE_BUFFERS) as u64 * self.max_request_bytes
    }
}

#[derive(Clone)]
struct PageWeight;

impl Weighter<u64, Arc<Vec<u8>>> for PageWeight {
    fn weight(&self, _key: &u64, val: &Arc<Vec<u8>>) -> u64 {
        val.capacity() as u64 + 64
    }
}

/// Pages in memory, by page number in the object: the cache when there is no disk cache.
type MemoryPages = Cache<u64, Arc<Vec<u8>>, PageWeight>;

/// Request slots: at most `max` fetches at once.
#[derive(Debug)]
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(max: usize) -> Self {
        Slots {
            free: Mutex::new(max.max(1)),
            freed: Condvar::new(),
        }
    }

    fn take(&self, deadline: Instant) -> Option<Slot<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            free = self
                .freed
                .wait_timeout(free, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// The chunks a thread of this process is fetching: one thread per chunk at a time.
#[derive(Debug, Default)]
struct Fetching {
    busy: Mutex<HashSet<u64>>,
    released: Condvar,
}

struct Taken<'a> {
    fetching: &'a Fetching,
    chunk: u64,
}

impl Fetching {
    fn try_take(&self, chunk: u64) -> Option<Taken<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(chunk) {
            return None;
        }
        Some(Taken {
            fetching: self,
            chunk,
        })
    }

    /// Wait until `chunk` is free; false at the deadline.
    fn wait(&self, chunk: u64, deadline: Instant) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(&chunk) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            busy = self
                .released
                .wait_timeout(busy, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.fetching
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.chunk);
        self.fetching.released.notify_all();
    }
}

/// Counters, for tests, benchmarks and `sifuse fetch`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Range requests made to the store.
    pub requests: AtomicU64,
    /// Bytes those requests fetched.
    pub bytes_fetched: AtomicU64,
}

/// One reader's position, for spotting sequential reads.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Where the reader's last read ended.
    next: u64,
    /// Bytes it has read in a row.
    run: u64,
    /// Where read-ahead has reached.
    ahead_until: u64,
    /// When it last read (a counter), to replace the stalest.
    used: u64,
}

const STREAMS: usize = 8;

#[derive(Debug, Default)]
struct Streams {
    slots: [Stream; STREAMS],
    clock: u64,
}

impl Streams {
    /// Note a read of `offset..end`; the bytes to read ahead, if any.
    ///
    /// A read follows on from a reader's last one when it starts where that one ended, or
    /// up to `back` bytes before (readers of neighbouring blocks on several threads arrive
    /// a little out of order). Read-ahead starts once a reader has read `min_run` bytes in
    /// a row, and reaches as far ahead as it has read, up to `max_window`: small files
    /// that happen to lie one after another (a module and its bytecode) are read without
    /// fetching what follows them, and a long read soon gets large requests.
    fn on_read(
        &mut self,
        offset: u64,
        end: u64,
        back: u64,
        min_run: u64,
        max_window: u64,
    ) -> Option<Range<u64>> {
        self.clock += 1;
        let clock = self.clock;
        let found = self
            .slots
            .iter_mut()
            .find(|s| s.used != 0 && offset <= s.next && offset + back >= s.next);
        let Some(s) = found else {
            let s = self
                .slots
                .iter_mut()
                .min_by_key(|s| s.used)
                .expect("STREAMS > 0");
            *s = Stream {
                next: end,
                run: end - offset,
                ahead_until: end,
                used: clock,
            };
            return None;
        };
        s.used = clock;
        if end <= s.next {
            return None;
        }
        s.run += end - s.next;
        s.next = end;
        if s.run < min_run {
            return None;
        }
        // Ask for more once half the window ahead is consumed, so requests stay large.
        let window = s.run.min(max_window);
        let start = s.ahead_until.max(end);
        if start - end > window / 2 {
            return None;
        }
        let stop = end + window;
        s.ahead_until = stop;
        Some(start..stop)
    }
}

/// A part of one chunk a read wants: pages `pages` of chunk `chunk`.
#[derive(Debug, Clone)]
struct Want {
    chunk: u64,
    pages: Range<u32>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    version: ObjectVersion,
    meta: ObjectMeta,
    disk: Option<ObjectChunks>,
    /// Pages kept in memory: all the cache there is without a disk cache, and what the
    /// disk cache could not take (a full disk) with one.
    memory: MemoryPages,
    config: RemoteConfig,
    slots: Slots,
    fetching: Fetching,
    streams: Mutex<Streams>,
    counters: Counters,
    /// Request buffers given back, for the next requests: a fresh buffer of a few MiB
    /// costs a page fault per 4 KiB when first written. At most [`SPARE_BUFFERS`] kept.
    spare_buffers: Mutex<Vec<Vec<u8>>>,
}

enum Job {
    /// Bytes to fetch ahead of a reader.
    ReadAhead(Range<u64>),
    /// Bytes to put in the cache.
    Fill(Range<u64>),
    /// The disk cache's eviction pass, which a reader's writes made due.
    Evict,
}

struct Pool {
    jobs: SyncSender<Job>,
}

/// A remote object read through the chunk cache.
pub struct RemoteSource {
    inner: Arc<Inner>,
    opener: ThreadId,
    pool: OnceLock<Pool>,
    /// Prefetches asked for before the workers started.
    pending: Mutex<Vec<Range<u64>>>,
}

impl std::fmt::Debug for RemoteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSource")
            .field("object", &self.inner.meta.address)
            .field("version", &self.inner.version)
            .field("disk", &self.inner.disk.as_ref().map(|d| d.key_hex()))
            .finish_non_exhaustive()
    }
}

/// How an [`Inner::obtain`] treats what others are fetching.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The caller needs every byte: wait for them.
    Need,
    /// Read-ahead: leave what others fetch to them.
    Ahead,
}

impl RemoteSource {
    /// Open the object `store` names: ask its version (one request) and find its chunks
    /// in `disk`, the user's chunk cache (none: memory only).
    pub fn open(
        store: Arc<dyn ObjectStore>,
        disk: Option<Arc<ChunkCache>>,
        config: RemoteConfig,
    ) -> Result<RemoteSource, RemoteError> {
        let version = store.version()?;
        Ok(Self::at_version(store, version, disk, config))
    }

    /// The object at a version already known.
    pub fn at_version(
        store: Arc<dyn ObjectStore>,
        version: ObjectVersion,
        disk: Option<Arc<ChunkCache>>,
        mut config: RemoteConfig,
    ) -> RemoteSource {
        // Requests and read-ahead in whole pages.
        config.max_request_bytes = config.max_request_bytes.max(PAGE) / PAGE * PAGE;
        let meta = ObjectMeta::new(&store.describe(), &version, config.chunk_size);
        let disk = disk.and_then(|cache| match cache.object(meta.clone()) {
            Ok(chunks) => Some(chunks),
            Err(e) => {
                tracing::warn!(
                    "cannot use the chunk cache {} for {}: {e}; keeping pages in memory only",
                    cache.path().display(),
                    meta.address
                );
                None
            }
        });
        let memory = Cache::with_options(
            OptionsBuilder::new()
                .estimated_items_capacity((config.memory_bytes / PAGE).clamp(16, 1 << 16) as usize)
                .weight_capacity(config.memory_bytes.max(1))
                // Pages read ahead must survive until their reader comes.
                .hot_allocation(0.5)
                .build()
                .expect("valid cache options"),
            PageWeight,
            DefaultHashBuilder::default(),
            Default::default(),
        );
        RemoteSource {
            inner: Arc::new(Inner {
                store,
                slots: Slots::new(config.max_in_flight),
                version,
                meta,
                disk,
                memory,
                config,
                fetching: Fetching::default(),
                streams: Mutex::new(Streams::default()),
                counters: Counters::default(),
                spare_buffers: Mutex::new(Vec::new()),
            }),
            opener: std::thread::current().id(),
            pool: OnceLock::new(),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// The object's address.
    pub fn address(&self) -> &str {
        &self.inner.meta.address
    }

    /// The version being read.
    pub fn version(&self) -> &ObjectVersion {
        &self.inner.version
    }

    /// How it reads.
    pub fn config(&self) -> &RemoteConfig {
        &self.inner.config
    }

    /// The user's chunk cache directory, when pages go to disk.
    pub fn disk_cache_dir(&self) -> Option<&std::path::Path> {
        self.inner.disk.as_ref().map(|d| d.cache().path())
    }

    /// True when pages go to the disk cache.
    pub fn has_disk_cache(&self) -> bool {
        self.inner.disk.is_some()
    }

    /// Requests and bytes fetched so far.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Fetch the bytes `range` now, in requests as large as allowed.
    pub fn warm(&self, range: Range<u64>) -> io::Result<()> {
        let result = self.inner.fill(range, Mode::Need);
        self.evict_if_due();
        result
    }

    /// Run the eviction pass this process's writes made due, if any: by a background
    /// worker once serving has begun (no reader waits for it), else now.
    fn evict_if_due(&self) {
        let Some(disk) = &self.inner.disk else { return };
        if !disk.cache().eviction_due() {
            return;
        }
        match self.pool.get() {
            // A full queue is no loss: the workers look after every job.
            Some(pool) => drop(pool.jobs.try_send(Job::Evict)),
            None => disk.cache().evict_if_due(),
        }
    }

    /// Fetch the bytes `range` in the background (into the disk cache; without one, into
    /// memory, as much as fits in half of it). Starts when the workers do.
    pub fn prefetch(&self, range: Range<u64>) {
        match self.pool.get() {
            Some(pool) => {
                let _ = pool.jobs.try_send(Job::Fill(range));
            }
            None => self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(range),
        }
    }

    /// Start the background workers now (see the module notes for when they start by
    /// themselves).
    pub fn start_background(&self) {
        if self.inner.config.workers == 0 {
            return;
        }
        let pool = self.pool.get_or_init(|| {
            let (tx, rx) = sync_channel::<Job>(16);
            let rx = Arc::new(Mutex::new(rx));
            for n in 0..self.inner.config.workers {
                let weak = Arc::downgrade(&self.inner);
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("sifuse-fetch-{n}"))
                    .spawn(move || worker(weak, rx));
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a fetch worker: {e}");
                }
            }
            Pool { jobs: tx }
        });
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for range in pending {
            let _ = pool.jobs.try_send(Job::Fill(range));
        }
    }

    /// Put the whole object in the disk cache, `parallel` requests at once, calling
    /// `progress` with the bytes done so far (present or fetched). For `sifuse fetch`.
    pub fn fetch_all(&self, parallel: usize, progress: &(dyn Fn(u64) + Sync)) -> io::Result<()> {
        let inner = &*self.inner;
        if inner.disk.is_none() {
            return Err(io::Error::other("there is no disk cache to fill"));
        }
        let len = inner.meta.len;
        let step = inner.config.max_request_bytes;
        let next = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let failed: Mutex<Option<io::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| loop {
                    if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        return;
                    }
                    let start = next.fetch_add(step, Ordering::Relaxed);
                    if start >= len {
                        return;
                    }
                    let end = (start + step).min(len);
                    if let Err(e) = inner.obtain(start, (end - start) as usize, None, Mode::Need) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                    self.evict_if_due();
                    progress(done.fetch_add(end - start, Ordering::Relaxed) + end - start);
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Note a read (or a hint) of `range` in the read streams; what to fetch ahead of it,
    /// if anything (see [`Streams::on_read`]).
    fn stream_ahead(&self, range: Range<u64>) -> Option<Range<u64>> {
        let inner = &*self.inner;
        inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_read(
                range.start,
                range.end,
                inner.config.chunk_size as u64,
                inner.config.read_ahead_min_run,
                inner.config.read_ahead_bytes.max(PAGE),
            )
            .map(|r| r.start..r.end.min(inner.meta.len))
            .filter(|r| !r.is_empty())
    }

    /// Fetch `range` ahead of its readers: by the workers beside the reads, or, without
    /// workers, now, so that the next reads find their bytes (a failure here is the next
    /// read's to report).
    fn fetch_ahead(&self, range: Range<u64>) {
        // To the end of its last chunk: a chunk fetched in two parts is written to the disk
        // cache twice, and a sequential reader reads the rest of it next anyway.
        let cs = self.inner.config.chunk_size as u64;
        let range = range.start
            ..range
                .end
                .div_ceil(cs)
                .saturating_mul(cs)
                .min(self.inner.meta.len);
        let started = self.background_started();
        match self.pool.get() {
            Some(pool) if started => {
                if let Err(TrySendError::Disconnected(_)) =
                    pool.jobs.try_send(Job::ReadAhead(range))
                {
                    tracing::debug!("read-ahead workers are gone");
                }
            }
            _ => {
                let _ = self.inner.fill(range, Mode::Ahead);
            }
        }
    }

    fn background_started(&self) -> bool {
        if self.pool.get().is_some() {
            return true;
        }
        if std::thread::current().id() != self.opener {
            self.start_background();
            return self.pool.get().is_some();
        }
        false
    }
}

fn worker(inner: Weak<Inner>, jobs: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let Some(inner) = inner.upgrade() else { return };
        let result = match job {
            Job::ReadAhead(range) => inner.fill(range, Mode::Ahead),
            Job::Fill(range) => inner.fill(range, Mode::Need),
            Job::Evict => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!("background fetch of {} failed: {e}", inner.meta.address);
        }
        if let Some(disk) = &inner.disk {
            disk.cache().evict_if_due();
        }
    }
}

impl Inner {
    fn error(&self, e: RemoteError) -> io::Error {
        let kind = io::Error::from(e.clone()).kind();
        io::Error::new(kind, format!("{}: {e}", self.meta.address))
    }

    fn timed_out(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{}: {what} within {} s",
                self.meta.address,
                self.config.wait_limit.as_secs()
            ),
        )
    }

    /// Bytes `range` into the cache (in memory without a disk cache: as much as fits in
    /// half of it), in windows of one request each.
    fn fill(&self, range: Range<u64>, mode: Mode) -> io::Result<()> {
        let mut end = range.end.min(self.meta.len);
        if self.disk.is_none() {
            end = end.min(range.start.saturating_add(self.config.memory_bytes / 2));
        }
        let step = self.config.max_request_bytes;
        let cs = self.config.chunk_size as u64;
        let mut at = range.start;
        while at < end {
            let mut stop = (at + step).min(end);
            // Windows end on a chunk's end, so that no chunk is fetched (and written to the
            // disk cache) in two parts.
            if stop < end && stop / cs * cs > at {
                stop = stop / cs * cs;
            }
            self.obtain(at, (stop - at) as usize, None, mode)?;
            at = stop;
        }
        Ok(())
    }

    /// The wants of bytes `offset..offset + len`: whole pages, split by chunk.
    fn wants(&self, offset: u64, len: usize) -> Vec<Want> {
        let cs = self.config.chunk_size as u64;
        let mut out = Vec::new();
        let (mut page, end) = (offset / PAGE, (offset + len as u64).div_ceil(PAGE));
        while page < end {
            let chunk = page * PAGE / cs;
            let first = (page - chunk * cs / PAGE) as u32;
            let last = (end - chunk * cs / PAGE).min(cs / PAGE) as u32;
            out.push(Want {
                chunk,
                pages: first..last,
            });
            page = chunk * cs / PAGE + last as u64;
        }
        out
    }

    /// The object's bytes of pages `pages` of `chunk`.
    fn page_bytes(&self, chunk: u64, pages: &Range<u32>) -> Range<u64> {
        let base = chunk * self.config.chunk_size as u64;
        let start = base + pages.start as u64 * PAGE;
        let end = (base + pages.end as u64 * PAGE).min(self.meta.len);
        start..end
    }

    /// Copy what of `data` (the object's bytes from `at`) falls in `out` (the object's
    /// bytes from `offset`).
    fn copy_out(out: &mut [u8], offset: u64, data: &[u8], at: u64) {
        let from = offset.max(at);
        let to = (offset + out.len() as u64).min(at + data.len() as u64);
        if from < to {
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
        }
    }

    /// The object's page number of page `p` of `chunk`.
    fn global_page(&self, chunk: u64, p: u32) -> u64 {
        chunk * (self.config.chunk_size as u64 / PAGE) + p as u64
    }

    /// Serve `want` from the cache (memory, or the disk cache) into `out` (just check it is
    /// all there when `out` is `None`); false when some page is missing.
    fn serve(
        &self,
        want: &Want,
        out: Option<&mut [u8]>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> bool {
        if want.pages.is_empty() {
            return true;
        }
        // Asked once: the memory cache counts its entries shard by shard.
        let memory_empty = self.memory.is_empty();
        let in_memory =
            |p: u32| !memory_empty && self.memory.peek(&self.global_page(want.chunk, p)).is_some();
        let on_disk = if memory_empty {
            vec![want.pages.clone()]
        } else {
            runs(want.pages.clone(), |p| !in_memory(p))
        };
        let stored = match (&self.disk, on_disk.is_empty()) {
            (_, true) => None,
            (None, false) => return false,
            (Some(disk), false) => match disk.chunk_for(want.chunk, &on_disk) {
                Some(s) if on_disk.iter().all(|r| s.present().covers(r.clone())) => Some(s),
                _ => return false,
            },
        };
        let Some(out) = out else { return true };
        if let (Some(stored), Some(disk)) = (&stored, &self.disk) {
            for run in &on_disk {
                if let Err(why) = stored.read_pages(run.clone(), scratch) {
                    disk.drop_damaged(want.chunk, stored.file(), &why);
                    return false;
                }
                Self::copy_out(out, offset, scratch, self.page_bytes(want.chunk, run).start);
            }
        }
        for p in want.pages.clone().filter(|&p| in_memory(p)) {
            let Some(page) = self.memory.get(&self.global_page(want.chunk, p)) else {
                return false;
            };
            Self::copy_out(out, offset, &page, self.global_page(want.chunk, p) * PAGE);
        }
        true
    }

    /// The runs of pages of `want` not in the cache.
    fn missing(&self, want: &Want) -> Vec<Range<u32>> {
        let stored = self
            .disk
            .as_ref()
            .and_then(|d| d.chunk_for(want.chunk, std::slice::from_ref(&want.pages)));
        let memory_empty = self.memory.is_empty();
        runs(want.pages.clone(), |p| {
            stored.as_ref().is_none_or(|s| !s.present().contains(p))
                && (memory_empty || self.memory.peek(&self.global_page(want.chunk, p)).is_none())
        })
    }

    /// Make bytes `offset..offset + len` (at most one request's worth) available, and copy
    /// them into `out` when given.
    fn obtain(
        &self,
        offset: u64,
        len: usize,
        out: Option<&mut [u8]>,
        mode: Mode,
    ) -> io::Result<()> {
        // Pages read back from the disk cache pass through this thread's buffer, kept from
        // one read to the next (a fresh one costs a page fault per 4 KiB) when it is no
        // larger than SCRATCH_KEPT: a block's worth on most images.
        thread_local! {
            static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut scratch = SCRATCH.take();
        let result = self.obtain_with(offset, len, out, mode, &mut scratch);
        if scratch.capacity() <= SCRATCH_KEPT {
            SCRATCH.set(scratch);
        }
        result
    }

    fn obtain_with(
        &self,
        offset: u64,
        len: usize,
        mut out: Option<&mut [u8]>,
        mode: Mode,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let deadline = Instant::now() + self.config.wait_limit;
        let mut wants = self.wants(offset, len);
        loop {
            wants.retain(|w| !self.serve(w, out.as_deref_mut(), offset, scratch));
            if wants.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Pages fetched kept going missing (a cache that loses what it is given).
                return Err(self.timed_out("the pages could not be had"));
            }
            let mut mine = Vec::new();
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for w in wants {
                let Some(taken) = self.fetching.try_take(w.chunk) else {
                    local.push(w);
                    continue;
                };
                match &self.disk {
                    None => mine.push((w, taken, None)),
                    Some(disk) => match disk.claim(w.chunk) {
                        ClaimResult::Mine(c) => mine.push((w, taken, Some(c))),
                        ClaimResult::Busy => remote.push(w),
                    },
                }
            }
            if !mine.is_empty() {
                let unserved = self.fetch(mine, out.as_deref_mut(), offset, scratch)?;
                wants = unserved.into_iter().chain(local).chain(remote).collect();
                continue;
            }
            if mode == Mode::Ahead {
                return Ok(());
            }
            if let Some(w) = local.first() {
                if !self.fetching.wait(w.chunk, deadline) {
                    return Err(self.timed_out(&format!("chunk {} did not arrive", w.chunk)));
                }
            } else if let Some(w) = remote.first() {
                let disk = self.disk.as_ref().expect("remote claims need a disk cache");
                if let WaitResult::TimedOut = disk.wait_for(w.chunk, deadline) {
                    // Its fetcher is stuck: fetch it without writing it.
                    let taken = self.fetching.try_take(w.chunk);
                    if let Some(taken) = taken {
                        let mut rest = remote.split_off(1);
                        let w = remote.pop().expect("one");
                        let unserved = self.fetch(
                            vec![(w, taken, None)],
                            out.as_deref_mut(),
                            offset,
                            scratch,
                        )?;
                        rest.extend(unserved);
                        wants = local.into_iter().chain(rest).collect();
                        continue;
                    }
                }
            }
            wants = local.into_iter().chain(remote).collect();
        }
    }

    /// Fetch what `mine` (wants whose chunks this thread holds) lacks, exactly the pages
    /// missing, in requests of neighbouring pages across chunks; write them to the cache
    /// and copy them into `out`. Returns the wants still not served (pages that were there
    /// a moment ago and now are not).
    fn fetch(
        &self,
        mine: Vec<(Want, Taken<'_>, Option<super::chunks::Claim<'_>>)>,
        mut out: Option<&mut [u8]>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<Vec<Want>> {
        let mut unserved = Vec::new();
        // What each lacks, looked at again now that the chunk is ours.
        let mut jobs = Vec::new();
        for (w, taken, claim) in mine {
            let missing = self.missing(&w);
            if missing.is_empty() {
                if !self.serve(&w, out.as_deref_mut(), offset, scratch) {
                    unserved.push(w);
                }
            } else {
                jobs.push((w, missing, taken, claim));
            }
        }
        // Requests: the runs, in order, joined where one ends where the next begins.
        let mut requests: Vec<Range<u64>> = Vec::new();
        for (w, missing, _, _) in &jobs {
            for run in missing {
                let r = self.page_bytes(w.chunk, run);
                match requests.last_mut() {
                    Some(last)
                        if last.end == r.start
                            && r.end - last.start <= self.config.max_request_bytes =>
                    {
                        last.end = r.end
                    }
                    _ => requests.push(r),
                }
            }
        }
        if requests.is_empty() {
            // Others filled every page meanwhile: nothing to wait for a slot for.
            return Ok(unserved);
        }
        // One slot for the whole fetch: its buffers are held until they are in the cache.
        let deadline = Instant::now() + self.config.wait_limit;
        let _slot = self
            .slots
            .take(deadline)
            .ok_or_else(|| self.timed_out("no request slot came free"))?;
        let mut fetched = Vec::with_capacity(requests.len());
        for r in requests {
            let data = self.request(r.clone())?;
            fetched.push((r, data));
        }
        let bytes_of = |r: &Range<u64>| -> &[u8] {
            let (at, data) = fetched
                .iter()
                .find(|(f, _)| f.start <= r.start && r.end <= f.end)
                .expect("every run was fetched");
            &data[(r.start - at.start) as usize..(r.end - at.start) as usize]
        };
        for (w, missing, taken, claim) in jobs {
            let pieces: Vec<(u32, &[u8])> = missing
                .iter()
                .map(|run| (run.start, bytes_of(&self.page_bytes(w.chunk, run))))
                .collect();
            let on_disk = claim.is_some_and(|c| c.commit(&pieces));
            if !on_disk {
                for (first, data) in &pieces {
                    for (k, page) in data.chunks(PAGE as usize).enumerate() {
                        let n = self.global_page(w.chunk, *first + k as u32);
                        self.memory.insert(n, Arc::new(page.to_vec()));
                    }
                }
            }
            drop(taken);
            if let Some(out) = out.as_deref_mut() {
                for (first, data) in &pieces {
                    let at = self.page_bytes(w.chunk, &(*first..*first + 1)).start;
                    Self::copy_out(out, offset, data, at);
                }
                // The pages of the want between the runs were there already.
                let held = runs(w.pages.clone(), |p| !missing.iter().any(|r| r.contains(&p)));
                for pages in held {
                    let side = Want {
                        chunk: w.chunk,
                        pages,
                    };
                    if !self.serve(&side, Some(&mut *out), offset, scratch) {
                        unserved.push(side);
                    }
                }
            }
        }
        for (_, data) in fetched {
            self.give_back(data);
        }
        Ok(unserved)
    }

    /// A request buffer of `len` bytes: a spare one when there is one (zeroed only where it
    /// grows; the request overwrites it all).
    fn buffer(&self, len: usize) -> Vec<u8> {
        let spare = self
            .spare_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut buf = spare.unwrap_or_default();
        // Exactly: a buffer grown by doubling could outgrow a request and not come back.
        buf.reserve_exact(len.saturating_sub(buf.len()));
        buf.resize(len, 0);
        buf
    }

    /// Keep a request buffer for the next request, if fewer than [`SPARE_BUFFERS`] are
    /// kept (and it is no larger than a request).
    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() as u64 > self.config.max_request_bytes {
            return;
        }
        let mut spare = self.spare_buffers.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// One range request (the caller holds a request slot).
    fn request(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let mut buf = self.buffer((range.end - range.start) as usize);
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.store.read_range(&self.version, range.start, &mut buf) {
            self.give_back(buf);
            return Err(self.error(e));
        }
        self.counters
            .bytes_fetched
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf)
    }
}

impl ReadAt for RemoteSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = &*self.inner;
        let end =
            crate::source::end_within(offset, buf.len(), inner.meta.len, &inner.meta.address)?;
        if buf.is_empty() {
            return Ok(());
        }
        let ahead = self.stream_ahead(offset..end);
        // In windows of one request, so that a huge read holds few chunks and one
        // request's buffer at once.
        let step = inner.config.max_request_bytes as usize;
        for (k, part) in buf.chunks_mut(step).enumerate() {
            let at = offset + (k * step) as u64;
            let len = part.len();
            inner.obtain(at, len, Some(part), Mode::Need)?;
        }
        // The first read from a serving thread starts the workers (and the prefetch
        // waiting for them), whether or not it has anything to read ahead.
        self.background_started();
        if let Some(ahead) = ahead {
            self.fetch_ahead(ahead);
        }
        self.evict_if_due();
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner.meta.len
    }

    fn let_go(&self) {
        let inner = &*self.inner;
        inner
            .spare_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(disk) = &inner.disk {
            disk.let_go_kept();
        }
    }

    /// Fetch what the archive's read-ahead will read, by the background workers, in large
    /// requests. The byte-level detection in [`Streams`] misses a sequential file read
    /// whose blocks arrive from several threads, some ahead of the reader.
    fn will_read(&self, range: Range<u64>) {
        let range = range.start..range.end.min(self.inner.meta.len);
        if range.is_empty() {
            return;
        }
        // The hints of one file follow on from each other: as a stream, they earn windows
        // as far ahead as the file has been read (up to the read-ahead limit), so the
        // requests grow large.
        let fetch = match self.stream_ahead(range.clone()) {
            Some(a) => range.start.min(a.start)..range.end.max(a.end),
            None => range,
        };
        self.fetch_ahead(fetch);
        self.evict_if_due();
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
