//! A remote object as a [`ReadAt`]: reads go through a small in-memory cache of verified
//! chunks, then the node-local disk cache ([`super::chunks`]), then the store.
//!
//! - **Coalescing.** The chunks a read misses, and those it is about to need, are fetched
//!   in as few range requests as possible: runs of neighbouring chunks, up to
//!   [`RemoteConfig::max_request_bytes`] each.
//! - **Bounded.** At most [`RemoteConfig::max_in_flight`] requests at once; memory holds at
//!   most [`RemoteConfig::memory_bytes`] of chunks plus one request buffer per request in
//!   flight (32 MiB with the defaults), and a reading thread holds at most the chunks of
//!   its own read while it copies them.
//! - **Read-ahead.** A reader that moves forward chunk after chunk gets the chunks ahead of
//!   it fetched before it asks, in a window that doubles up to
//!   [`RemoteConfig::read_ahead_bytes`]: by background workers once serving has begun,
//!   otherwise as part of its own next request.
//! - **The metadata tail.** [`RemoteSource::prefetch`] fetches a range (the image's
//!   tables) in the background, in large requests, into the disk cache.
//! - **Failures.** A failed fetch is an `io::Error` for the read that needed it, once the
//!   store's own retries and timeouts are spent; nothing is remembered of it, so the next
//!   read asks the store again, and whatever is cached keeps being served. Waiting for a
//!   chunk someone else fetches, or for a request slot, is bounded by
//!   [`RemoteConfig::wait_limit`].
//!
//! **Background threads start late.** A mount opens its image and then forks into a
//! daemon; threads alive at the fork would vanish in the daemon, leaving any lock they
//! held taken forever. So the workers start only at the first read made from a thread
//! other than the one that opened the source (a request thread of the serving process),
//! or when [`RemoteSource::start_background`] is called.

use std::io;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, GuardResult};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use super::chunks::{ChunkCache, ClaimResult, ObjectChunks, ObjectMeta, WaitResult};
use super::{ObjectStore, ObjectVersion, RemoteError};
use crate::source::ReadAt;

/// How a remote object is read.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Chunk size (the unit of caching, aligned to multiples of itself).
    pub chunk_size: u32,
    /// Verified chunks kept in memory.
    pub memory_bytes: u64,
    /// Range requests in flight at once, at most.
    pub max_in_flight: usize,
    /// Longest range request (neighbouring chunks coalesced).
    pub max_request_bytes: u64,
    /// Longest wait for a chunk another reader (thread or process) is fetching, or for a
    /// free request slot.
    pub wait_limit: Duration,
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
            read_ahead_bytes: 8 << 20,
            workers: 2,
        }
    }
}

impl RemoteConfig {
    /// The most memory the source holds, whatever it reads: cached chunks plus request
    /// buffers in flight.
    pub fn memory_bound(&self) -> u64 {
        self.memory_bytes + self.max_in_flight as u64 * self.max_request_bytes
    }

    fn chunks_per_request(&self) -> u64 {
        (self.max_request_bytes / self.chunk_size as u64).max(1)
    }
}

/// A chunk's verified bytes.
type Chunk = Arc<Vec<u8>>;

#[derive(Clone)]
struct ChunkWeight;

impl Weighter<u64, Chunk> for ChunkWeight {
    fn weight(&self, _key: &u64, val: &Chunk) -> u64 {
        val.capacity() as u64 + 64
    }
}

type MemoryChunks = Cache<u64, Chunk, ChunkWeight>;
type Guard<'a> = quick_cache::sync::PlaceholderGuard<
    'a,
    u64,
    Chunk,
    ChunkWeight,
    DefaultHashBuilder,
    quick_cache::sync::DefaultLifecycle<u64, Chunk>,
>;

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

/// Counters, for tests, benchmarks and `sifuse fetch`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Range requests made to the store.
    pub requests: std::sync::atomic::AtomicU64,
    /// Bytes those requests fetched.
    pub bytes_fetched: std::sync::atomic::AtomicU64,
    /// Chunks read back from the disk cache.
    pub disk_hits: std::sync::atomic::AtomicU64,
}

/// One reader's position, for spotting sequential reads.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Last chunk it read.
    last: u64,
    /// Chunks it advanced one after another.
    run: u64,
    /// Chunks of read-ahead it gets next.
    window: u64,
    /// First chunk not yet read ahead.
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
    /// Note a read of chunks `first..=last`; the chunks to read ahead, if any.
    fn on_read(&mut self, first: u64, last: u64, max_window: u64) -> Option<Range<u64>> {
        self.clock += 1;
        let clock = self.clock;
        let found = self
            .slots
            .iter_mut()
            .find(|s| s.used != 0 && (first == s.last || first == s.last + 1));
        let s = match found {
            Some(s) => s,
            None => {
                let s = self
                    .slots
                    .iter_mut()
                    .min_by_key(|s| s.used)
                    .expect("STREAMS > 0");
                *s = Stream {
                    last,
                    run: 0,
                    window: 2,
                    ahead_until: last + 1,
                    used: clock,
                };
                return None;
            }
        };
        s.used = clock;
        // Only a reader that moved on to a new chunk asks for more.
        if last <= s.last {
            return None;
        }
        s.run += last - s.last;
        s.last = last;
        if s.run < 2 {
            return None;
        }
        // Ask for more once half the window ahead is consumed, so requests stay large.
        let start = s.ahead_until.max(last + 1);
        if start - (last + 1) > s.window / 2 {
            return None;
        }
        let end = last + 1 + s.window;
        s.ahead_until = end;
        s.window = (s.window * 2).min(max_window.max(2));
        Some(start..end)
    }
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    version: ObjectVersion,
    meta: ObjectMeta,
    disk: Option<ObjectChunks>,
    memory: MemoryChunks,
    config: RemoteConfig,
    slots: Slots,
    streams: Mutex<Streams>,
    counters: Counters,
}

enum Job {
    /// Chunks to load into memory ahead of a reader.
    ReadAhead(Range<u64>),
    /// Chunks to put in the disk cache (or memory, without one).
    Fill(Range<u64>),
}

struct Pool {
    jobs: SyncSender<Job>,
}

/// A remote object read through the chunk caches.
pub struct RemoteSource {
    inner: Arc<Inner>,
    opener: ThreadId,
    pool: OnceLock<Pool>,
    /// A prefetch asked for before the workers started.
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
        config: RemoteConfig,
    ) -> RemoteSource {
        let meta = ObjectMeta::new(&store.describe(), &version, config.chunk_size);
        let disk = disk.and_then(|cache| match cache.object(meta.clone()) {
            Ok(chunks) => Some(chunks),
            Err(e) => {
                tracing::warn!(
                    "cannot use the chunk cache {} for {}: {e}; keeping chunks in memory only",
                    cache.path().display(),
                    meta.address
                );
                None
            }
        });
        let memory = Cache::with_options(
            OptionsBuilder::new()
                .estimated_items_capacity(
                    (config.memory_bytes / config.chunk_size as u64).clamp(4, 4096) as usize,
                )
                .weight_capacity(config.memory_bytes.max(1))
                // One shard: a few large entries, and one budget for all of them.
                .shards(1)
                // Chunks read ahead must survive until their reader comes.
                .hot_allocation(0.5)
                .build()
                .expect("valid cache options"),
            ChunkWeight,
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
                streams: Mutex::new(Streams::default()),
                counters: Counters::default(),
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

    /// The user's chunk cache directory, when chunks go to disk.
    pub fn disk_cache_dir(&self) -> Option<&std::path::Path> {
        self.inner.disk.as_ref().map(|d| d.cache().path())
    }

    /// True when chunks go to the disk cache.
    pub fn has_disk_cache(&self) -> bool {
        self.inner.disk.is_some()
    }

    /// Requests and bytes fetched so far.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// How it reads.
    pub fn config(&self) -> &RemoteConfig {
        &self.inner.config
    }

    /// Load the bytes `range` now (coalesced, as one read would).
    pub fn warm(&self, range: Range<u64>) -> io::Result<()> {
        let chunks = self.inner.chunk_range(range);
        let per = self.inner.config.chunks_per_request();
        let mut start = chunks.start;
        while start < chunks.end {
            let end = (start + per).min(chunks.end);
            self.inner.load(start..end, Mode::Need)?;
            start = end;
        }
        Ok(())
    }

    /// Fetch the bytes `range` in the background (into the disk cache; without one, into
    /// memory, as much as fits in half of it). Starts when the workers do.
    pub fn prefetch(&self, range: Range<u64>) {
        let chunks = self.inner.chunk_range(range);
        if chunks.is_empty() {
            return;
        }
        match self.pool.get() {
            Some(pool) => {
                let _ = pool.jobs.try_send(Job::Fill(chunks));
            }
            None => self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(chunks),
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
        for chunks in pending {
            let _ = pool.jobs.try_send(Job::Fill(chunks));
        }
    }

    /// Put the whole object in the disk cache, `parallel` requests at once, calling
    /// `progress` with the bytes done so far (present or fetched). For `sifuse fetch`.
    pub fn fetch_all(&self, parallel: usize, progress: &(dyn Fn(u64) + Sync)) -> io::Result<()> {
        let inner = &*self.inner;
        if inner.disk.is_none() {
            return Err(io::Error::other("there is no disk cache to fill"));
        }
        let count = inner.meta.chunk_count();
        let per = inner.config.chunks_per_request();
        let next = std::sync::atomic::AtomicU64::new(0);
        let done = std::sync::atomic::AtomicU64::new(0);
        let failed: Mutex<Option<io::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..parallel.max(1) {
                s.spawn(|| loop {
                    if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        return;
                    }
                    let start = next.fetch_add(per, std::sync::atomic::Ordering::Relaxed);
                    if start >= count {
                        return;
                    }
                    let range = start..(start + per).min(count);
                    let bytes: u64 = range.clone().map(|i| inner.meta.chunk_len(i) as u64).sum();
                    if let Err(e) = inner.fill(range, true) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                    let d = done.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
                    progress(d);
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
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
            Job::ReadAhead(chunks) => inner.load(chunks, Mode::Ahead).map(drop),
            Job::Fill(chunks) => {
                let per = inner.config.chunks_per_request();
                let mut r = Ok(());
                let mut start = chunks.start;
                while start < chunks.end && r.is_ok() {
                    let end = (start + per).min(chunks.end);
                    r = inner.fill(start..end, false);
                    start = end;
                }
                r
            }
        };
        if let Err(e) = result {
            tracing::debug!("background fetch of {} failed: {e}", inner.meta.address);
        }
    }
}

/// How a load treats chunks other threads are loading.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The caller needs every chunk: wait for them.
    Need,
    /// Read-ahead: skip what others load, and failures cost nothing.
    Ahead,
}

impl Inner {
    fn chunk_range(&self, bytes: Range<u64>) -> Range<u64> {
        let cs = self.config.chunk_size as u64;
        let end = bytes.end.min(self.meta.len);
        if bytes.start >= end {
            return 0..0;
        }
        bytes.start / cs..end.div_ceil(cs)
    }

    fn error(&self, e: RemoteError) -> io::Error {
        let kind = io::Error::from(e.clone()).kind();
        io::Error::new(kind, format!("{}: {e}", self.meta.address))
    }

    /// One range request for chunks `run` (neighbours), bounded by the request slots.
    fn fetch_run(&self, run: Range<u64>) -> io::Result<Vec<u8>> {
        let cs = self.config.chunk_size as u64;
        let start = run.start * cs;
        let end = (run.end * cs).min(self.meta.len);
        let deadline = Instant::now() + self.config.wait_limit;
        let _slot = self.slots.take(deadline).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{}: no request slot came free within {} s",
                    self.meta.address,
                    self.config.wait_limit.as_secs()
                ),
            )
        })?;
        let mut buf = vec![0u8; (end - start) as usize];
        self.counters
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.store
            .read_range(&self.version, start, &mut buf)
            .map_err(|e| self.error(e))?;
        self.counters
            .bytes_fetched
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(buf)
    }

    fn chunk_slice<'b>(&self, buf: &'b [u8], run_start: u64, index: u64) -> &'b [u8] {
        let cs = self.config.chunk_size as usize;
        let at = (index - run_start) as usize * cs;
        &buf[at..at + self.meta.chunk_len(index)]
    }

    fn read_disk(&self, index: u64) -> Option<Chunk> {
        let bytes = self.disk.as_ref()?.read(index)?;
        self.counters
            .disk_hits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Arc::new(bytes))
    }

    /// The chunks `range`, from memory, disk or the store. In `Ahead` mode chunks others
    /// are loading are skipped (`None`).
    fn load(&self, range: Range<u64>, mode: Mode) -> io::Result<Vec<Option<Chunk>>> {
        let base = range.start;
        let mut out: Vec<Option<Chunk>> = vec![None; (range.end - range.start) as usize];
        let mut guards: Vec<(u64, Guard<'_>)> = Vec::new();
        let mut others: Vec<u64> = Vec::new();
        for index in range.clone() {
            match self.memory.get_value_or_guard(&index, Some(Duration::ZERO)) {
                GuardResult::Value(v) => out[(index - base) as usize] = Some(v),
                GuardResult::Guard(g) => guards.push((index, g)),
                GuardResult::Timeout => others.push(index),
            }
        }
        // What the disk has.
        let mut missing = Vec::new();
        for (index, guard) in guards {
            match self.read_disk(index) {
                Some(chunk) => {
                    let _ = guard.insert(chunk.clone());
                    out[(index - base) as usize] = Some(chunk);
                }
                None => missing.push((index, guard)),
            }
        }
        // The rest from the store, coalesced.
        let fetched = self.fetch_guarded(missing, true)?;
        for (index, chunk) in fetched {
            out[(index - base) as usize] = Some(chunk);
        }
        if mode == Mode::Need {
            // Chunks another thread of this process is loading: wait for them, holding
            // no placeholder of our own, so two readers never wait for each other.
            for index in others {
                let chunk = match self
                    .memory
                    .get_value_or_guard(&index, Some(self.config.wait_limit))
                {
                    GuardResult::Value(v) => v,
                    GuardResult::Guard(g) => match self.read_disk(index) {
                        Some(c) => {
                            let _ = g.insert(c.clone());
                            c
                        }
                        None => {
                            let mut got = self.fetch_guarded(vec![(index, g)], true)?;
                            got.pop().expect("one chunk fetched").1
                        }
                    },
                    GuardResult::Timeout => {
                        return Err(self.wait_timed_out(index));
                    }
                };
                out[(index - base) as usize] = Some(chunk);
            }
        }
        Ok(out)
    }

    fn wait_timed_out(&self, index: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{}: chunk {index} did not arrive within {} s",
                self.meta.address,
                self.config.wait_limit.as_secs()
            ),
        )
    }

    /// Fetch the chunks whose placeholders the caller holds: claim them in the disk cache
    /// (another process may be fetching some: wait for those, after fetching the rest,
    /// holding no claim), fetch the claimed ones in runs of neighbours, write them to disk
    /// and, if `into_memory`, to memory. Returns the chunks when `into_memory`.
    fn fetch_guarded<'g>(
        &'g self,
        chunks: Vec<(u64, Guard<'g>)>,
        into_memory: bool,
    ) -> io::Result<Vec<(u64, Chunk)>> {
        let mut got = Vec::new();
        let mut mine = Vec::new();
        let mut busy = Vec::new();
        for (index, guard) in chunks {
            match &self.disk {
                None => mine.push((index, guard, None)),
                Some(disk) => match disk.claim(index) {
                    ClaimResult::Mine(c) => mine.push((index, guard, Some(c))),
                    ClaimResult::Busy => busy.push((index, guard)),
                    ClaimResult::Present if !into_memory => drop(guard),
                    ClaimResult::Present => match self.read_disk(index) {
                        Some(c) => {
                            let _ = guard.insert(c.clone());
                            got.push((index, c));
                        }
                        None => mine.push((index, guard, None)),
                    },
                },
            }
        }
        let per = self.config.chunks_per_request();
        while !mine.is_empty() {
            let mut n = 1;
            while n < mine.len() && mine[n].0 == mine[n - 1].0 + 1 && (n as u64) < per {
                n += 1;
            }
            let run = mine[0].0..mine[n - 1].0 + 1;
            let buf = self.fetch_run(run.clone())?;
            for (index, guard, claim) in mine.drain(..n) {
                let bytes = self.chunk_slice(&buf, run.start, index);
                if let Some(c) = claim {
                    c.commit(bytes);
                }
                if into_memory {
                    let chunk = Arc::new(bytes.to_vec());
                    let _ = guard.insert(chunk.clone());
                    got.push((index, chunk));
                }
            }
        }
        for (index, guard) in busy {
            let disk = self.disk.as_ref().expect("busy only with a disk cache");
            let deadline = Instant::now() + self.config.wait_limit;
            let chunk = match disk.wait_for(index, deadline) {
                WaitResult::Arrived(bytes) => Arc::new(bytes),
                WaitResult::Mine(claim) => {
                    let buf = self.fetch_run(index..index + 1)?;
                    claim.commit(&buf);
                    Arc::new(buf)
                }
                // Its fetcher is stuck: fetch it without writing.
                WaitResult::TimedOut => Arc::new(self.fetch_run(index..index + 1)?),
            };
            if into_memory {
                let _ = guard.insert(chunk.clone());
                got.push((index, chunk));
            }
        }
        Ok(got)
    }

    /// Put chunks `range` in the disk cache. With `must`, every chunk is there at the end
    /// or this fails; without, chunks others are loading are left to them. Without a disk
    /// cache, into memory, as much as fits in half of it.
    fn fill(&self, range: Range<u64>, must: bool) -> io::Result<()> {
        let Some(disk) = &self.disk else {
            let limit = self.config.memory_bytes / 2 / self.config.chunk_size as u64;
            let end = range.end.min(range.start + limit);
            return self.load(range.start..end, Mode::Ahead).map(drop);
        };
        let mut guards = Vec::new();
        let mut others = Vec::new();
        for index in range {
            if disk.contains(index) || (!must && self.memory.peek(&index).is_some()) {
                continue;
            }
            match self.memory.get_value_or_guard(&index, Some(Duration::ZERO)) {
                GuardResult::Guard(g) => guards.push((index, g)),
                // In memory only (fetched while the disk refused writes): write it now.
                GuardResult::Value(v) if must => {
                    if let ClaimResult::Mine(c) = disk.claim(index) {
                        c.commit(&v);
                    }
                }
                GuardResult::Value(_) => {}
                GuardResult::Timeout => others.push(index),
            }
        }
        self.fetch_guarded(guards, false)?;
        if must {
            // Chunks another thread was loading: on disk once it is done, unless it failed
            // (then the placeholder comes to us).
            for index in others {
                match self
                    .memory
                    .get_value_or_guard(&index, Some(self.config.wait_limit))
                {
                    GuardResult::Guard(g) if !disk.contains(index) => {
                        self.fetch_guarded(vec![(index, g)], false)?;
                    }
                    GuardResult::Timeout => {
                        return Err(self.wait_timed_out(index));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

impl ReadAt for RemoteSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = &*self.inner;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= inner.meta.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} passes the end of {} ({} bytes)",
                        buf.len(),
                        inner.meta.address,
                        inner.meta.len
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = inner.config.chunk_size as u64;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let max_window = (inner.config.read_ahead_bytes / cs).max(1);
        let ahead = inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_read(first, last, max_window)
            .map(|r| r.start..r.end.min(inner.meta.chunk_count()))
            .filter(|r| !r.is_empty());
        let per = inner.config.chunks_per_request();
        let mut index = first;
        while index <= last {
            let group_end = (index + per).min(last + 1);
            let chunks = inner.load(index..group_end, Mode::Need)?;
            for (k, chunk) in chunks.iter().enumerate() {
                let chunk = chunk.as_ref().expect("Need mode loads every chunk");
                let chunk_start = (index + k as u64) * cs;
                let from = offset.max(chunk_start);
                let to = end.min(chunk_start + chunk.as_slice().len() as u64);
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(
                    &chunk[(from - chunk_start) as usize..(to - chunk_start) as usize],
                );
            }
            index = group_end;
        }
        // Read-ahead: by the workers beside this read, or, without workers, now, so that
        // the next reads find their chunks (a failure here is the next read's to report).
        let started = self.background_started();
        if let Some(ahead) = ahead {
            match self.pool.get() {
                Some(pool) if started => {
                    if let Err(TrySendError::Disconnected(_)) =
                        pool.jobs.try_send(Job::ReadAhead(ahead))
                    {
                        tracing::debug!("read-ahead workers are gone");
                    }
                }
                _ => {
                    let _ = inner.load(ahead, Mode::Ahead);
                }
            }
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.inner.meta.len
    }
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
