//! The node-local disk cache of remote objects: fixed, aligned chunks in files, shared by
//! every sifuse process of one user on the node, without a daemon.
//!
//! Layout under the cache directory `DIR` (see [`default_cache_dir`]):
//!
//! ```text
//! DIR/<uid>/                      one directory per user, mode 0700, owned by that user
//! DIR/<uid>/evict.lock            taken (flock) by whoever evicts, so one process does
//! DIR/<uid>/<key>/                one object version: key = sha256(address, validator,
//!                                 length, chunk size), 64 hex digits
//! DIR/<uid>/<key>/object.json     what the object is, for `sifuse cache info`
//! DIR/<uid>/<key>/<index>         chunk `index` (12 hex digits): a 4 KiB header, then
//!                                 the chunk's pages at their place (a sparse file)
//! DIR/<uid>/<key>/<index>.part    the next version of a chunk being written: whoever
//!                                 holds flock on it is fetching pages of that chunk
//! ```
//!
//! - **Pages.** The unit of fetching is the 4 KiB page ([`PAGE_SIZE`]): a chunk file holds
//!   the pages fetched so far. Its header names the object key, the index and the length,
//!   which pages it holds with an xxh3 checksum of each, and a checksum of the header.
//!   Pages are checked whenever they are read back; a file whose header or pages do not
//!   check is removed and its pages fetched again, never served.
//! - **Written by rename.** Pages are added by writing a new file (the pages held and the
//!   new ones) to the `.part` file and renaming it over the chunk, so a reader sees one
//!   whole version of the file or the other.
//! - **Fetched once per node.** A process that fetches pages of a chunk creates or opens
//!   its `.part` file and takes an exclusive flock without waiting. Any other process that
//!   needs pages of that chunk finds the lock taken and waits (a bounded time, polling),
//!   then looks again and fetches only what is still missing. If the holder dies, the
//!   kernel drops its lock.
//! - **Kept open for reading.** A process keeps the last few chunk files it read open
//!   ([`ObjectChunks::chunk_for`]). A chunk file is never written once renamed into place
//!   (new pages go to a new file, renamed over it), so a file kept open still holds what it
//!   held, each page verified when read; it is opened again when a read wants pages it
//!   lacks, or once it has been removed (evicted, pruned or found damaged) so that its
//!   space is not held. An idle server lets go of them all ([`ObjectChunks::let_go_kept`]).
//! - **Bounded.** Files are touched (mtime) when used, at most once a minute each; an
//!   eviction pass removes the least recently used chunks until the cache holds at most
//!   15/16 of its budget (counting the blocks files occupy). Each process runs a pass when
//!   it has written a sixteenth of the budget (at most 64 MiB) since its last one, so the
//!   cache exceeds its budget by at most that much per writing process. The pass (a stat
//!   of every chunk file, some 20 ms for a full 10 GiB cache) is made due by the write and
//!   run by [`ChunkCache::evict_if_due`] once the writer has let go of its chunks: by a
//!   background worker when serving, so no reader waits for it. Removing a chunk
//!   while another process reads it is safe: an open file stays readable, and a missing
//!   one is fetched again.
//! - **Whose cache.** Only the user's own directory is used: it is opened by descriptor
//!   without following a symbolic link, and refused unless it is owned by the user and
//!   closed to everybody else (no group or other permission bits). Every file is then
//!   reached relative to that descriptor, and a chunk file not owned by the user is never
//!   read. So a user can neither read nor poison another user's cache, even in a shared
//!   `DIR` (make that one mode 1777, as /tmp); the price is that two users of one image
//!   each fetch their own copy (an HTTP cache in front of the store absorbs that).
//! - **Full disk, read-only or unusable directory.** Pages that cannot be written are
//!   still served; writing pauses for a minute and a warning says why. A cache directory
//!   that cannot be opened leaves the caller to read without a disk cache.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{fstat, fstatat, futimens, mkdirat, FileStat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::ObjectVersion;

/// Chunk size: 1 MiB is large enough that a request's overhead is small against its
/// transfer, and small enough that reading a few KiB of metadata fetches little else.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Default budget of the disk cache: 10 GiB.
pub const DEFAULT_CACHE_MAX: u64 = 10 << 30;

/// The unit of fetching and checking inside a chunk: reading a few KiB fetches a few
/// KiB, not a whole chunk.
pub const PAGE_SIZE: u32 = 4096;
/// Most pages in a chunk (so chunks are at most 1 MiB).
pub const MAX_PAGES: usize = 256;
/// Bytes before a chunk's pages in its file: one page, so pages stay page-aligned.
pub const HEADER_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"SIFUSEC2";
/// Where the page checksums start in the header (after the present-page bitmap).
const SUMS_AT: usize = 64 + MAX_PAGES / 8;
/// A chunk used again is touched at most this often: eviction needs minutes, not
/// nanoseconds, and a touch is a syscall.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// How long writing pauses after the disk refused a chunk.
const WRITE_PAUSE: Duration = Duration::from_secs(60);
/// A `.part` file nobody holds and nobody changed for this long is debris of a crash.
const STALE_PART: Duration = Duration::from_secs(600);
/// Most bytes one process writes between two eviction passes.
const EVICT_EVERY_MAX: u64 = 64 << 20;
/// Length of a chunk file's name: the index in hex.
const INDEX_DIGITS: usize = 12;
/// Chunk files one process keeps open per object, the most recently used: reading from
/// one again costs a read, not an open, two fstats, a header read and a close (a
/// sequential read of a file comes back to the same chunk a few times per MiB).
const KEPT_OPEN: usize = 16;

/// Why the disk cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The directory cannot be created, opened or trusted.
    #[error("cache directory {}: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    /// No directory was given and none could be derived from the environment.
    #[error(
        "no cache directory: set SIFUSE_CACHE_DIR, XDG_CACHE_HOME or HOME, or pass --cache-dir"
    )]
    NoDirectory,
}

/// The cache directory when none is given: `$SIFUSE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/sifuse`, else `$HOME/.cache/sifuse` (the passwd entry's home when
/// HOME is unset). Relative values are ignored, as the XDG specification asks.
pub fn default_cache_dir() -> Result<PathBuf, CacheError> {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(dir) = var("SIFUSE_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("sifuse"));
    }
    let home = var("HOME").or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.dir)
            .filter(|d| d.is_absolute())
    });
    home.map(|h| h.join(".cache").join("sifuse"))
        .ok_or(CacheError::NoDirectory)
}

/// Where chunks are kept and how many: what `--cache-dir`, `--cache-max` and
/// `--no-disk-cache` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// The cache directory; `None`: [`default_cache_dir`].
    pub dir: Option<PathBuf>,
    /// Budget of the disk cache in bytes.
    pub max_bytes: u64,
    /// False: keep chunks in memory only.
    pub disk: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            dir: None,
            max_bytes: DEFAULT_CACHE_MAX,
            disk: true,
        }
    }
}

impl CacheSettings {
    /// The cache directory these settings name.
    pub fn dir(&self) -> Result<PathBuf, CacheError> {
        match &self.dir {
            Some(d) => Ok(d.clone()),
            None => default_cache_dir(),
        }
    }

    /// Open this user's cache (for `sifuse fetch` and `sifuse cache`, which need it).
    pub fn open(&self) -> Result<Arc<ChunkCache>, CacheError> {
        ChunkCache::open(&self.dir()?, self.max_bytes)
    }

    /// The cache for reading an image: `None` with `--no-disk-cache`, or, with a warning,
    /// when the directory is unusable (the image is then read with memory only).
    pub fn open_for_reading(&self) -> Option<Arc<ChunkCache>> {
        if !self.disk {
            return None;
        }
        match self.open() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("{e}; reading without a disk cache");
                None
            }
        }
    }
}

/// A size as `--cache-max` takes it: bytes, or a number with K, M, G or T (powers of
/// 1024; `KiB`, `MB`, ... are read the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size (for example 10G, 512M, 1048576)"
        ));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (for example 10G, 512M, 1048576)"))?;
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// The identity of one object version in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectKey([u8; 32]);

impl ObjectKey {
    /// The key of `address` at `version`, cut in chunks of `chunk_size`. Each field is
    /// length-prefixed, so no two different tuples hash the same bytes.
    pub fn new(address: &str, version: &ObjectVersion, chunk_size: u32) -> Self {
        let mut h = Sha256::new();
        for field in [address.as_bytes(), version.validator.as_bytes()] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field);
        }
        h.update(version.len.to_le_bytes());
        h.update(chunk_size.to_le_bytes());
        ObjectKey(h.finalize().into())
    }

    /// 64 hex digits: the object's directory name.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What is cached of one object, as `object.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectMeta {
    /// The object's address, without credentials.
    pub address: String,
    /// Its validator (ETag, Last-Modified or digest).
    pub validator: String,
    /// Its length in bytes.
    pub len: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
}

impl ObjectMeta {
    /// The meta of `address` at `version`.
    pub fn new(address: &str, version: &ObjectVersion, chunk_size: u32) -> Self {
        ObjectMeta {
            address: address.to_string(),
            validator: version.validator.clone(),
            len: version.len,
            chunk_size,
        }
    }

    /// Its cache key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(
            &self.address,
            &ObjectVersion {
                len: self.len,
                validator: self.validator.clone(),
            },
            self.chunk_size,
        )
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.len.div_ceil(self.chunk_size as u64)
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size as u64;
        (self.len.saturating_sub(start)).min(self.chunk_size as u64) as usize
    }

    /// Pages in chunk `index`.
    pub fn pages_in(&self, index: u64) -> u32 {
        self.chunk_len(index).div_ceil(PAGE_SIZE as usize) as u32
    }
}

/// One user's chunk cache on this node.
#[derive(Debug)]
pub struct ChunkCache {
    /// `DIR/<uid>`, checked when opened; every path below is relative to it.
    dir: OwnedFd,
    path: PathBuf,
    uid: u32,
    max_bytes: u64,
    /// Bytes written since this process's last eviction pass.
    written: AtomicU64,
    /// Writing is paused until this time (ms since the epoch) after a refused write.
    paused_until_ms: AtomicU64,
    /// Chunk files this process has written (each commit writes one).
    files_written: AtomicU64,
    /// This process has written enough since its last eviction pass to run another.
    evict_due: AtomicBool,
}

fn unusable(path: &Path, reason: impl std::fmt::Display) -> CacheError {
    CacheError::Unusable {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ChunkCache {
    /// Open (creating it if needed) this user's cache under `base`, with a budget of
    /// `max_bytes`.
    pub fn open(base: &Path, max_bytes: u64) -> Result<Arc<ChunkCache>, CacheError> {
        let base = std::path::absolute(base).map_err(|e| unusable(base, e))?;
        if !base.exists() {
            // Only the user's own default location is created here: a directory shared
            // by several users is made by the administrator, mode 1777.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode_0700()
                .create(&base)
                .map_err(|e| unusable(&base, e))?;
        }
        let base_fd = nix::fcntl::open(
            &base,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| unusable(&base, io::Error::from(e)))?;
        let uid = nix::unistd::geteuid().as_raw();
        let name = uid.to_string();
        let path = base.join(&name);
        match mkdirat(&base_fd, name.as_str(), Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(unusable(&path, io::Error::from(e))),
        }
        let dir = openat(
            &base_fd,
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| unusable(&path, io::Error::from(e)))?;
        let st = fstat(&dir).map_err(|e| unusable(&path, io::Error::from(e)))?;
        if st.st_uid != uid {
            return Err(unusable(
                &path,
                format!(
                    "owned by uid {}, not by this user (uid {uid}); refusing a cache someone \
                     else could have written",
                    st.st_uid
                ),
            ));
        }
        if st.st_mode & 0o077 != 0 {
            return Err(unusable(
                &path,
                format!(
                    "mode {:o} lets other users in; make it 0700 (chmod 700) or remove it",
                    st.st_mode & 0o7777
                ),
            ));
        }
        Ok(Arc::new(ChunkCache {
            dir,
            path,
            uid,
            max_bytes,
            // The first write of a process runs a pass: the budget may have shrunk.
            written: AtomicU64::new(u64::MAX / 2),
            paused_until_ms: AtomicU64::new(0),
            files_written: AtomicU64::new(0),
            evict_due: AtomicBool::new(false),
        }))
    }

    /// This user's directory inside the cache directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The budget in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The chunks of one object version, creating its directory if needed.
    pub fn object(self: &Arc<Self>, meta: ObjectMeta) -> io::Result<ObjectChunks> {
        if meta.chunk_size == 0
            || meta.chunk_size % PAGE_SIZE != 0
            || meta.chunk_size as usize > MAX_PAGES * PAGE_SIZE as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunk size {} is not a multiple of {PAGE_SIZE} up to {}",
                    meta.chunk_size,
                    MAX_PAGES * PAGE_SIZE as usize
                ),
            ));
        }
        let key = meta.key();
        let name = key.hex();
        let dir = self.open_object_dir(&name, &meta)?;
        Ok(ObjectChunks {
            cache: self.clone(),
            key,
            name,
            meta,
            dir: Mutex::new(Arc::new(dir)),
            kept: Mutex::new(Vec::new()),
        })
    }

    fn open_object_dir(&self, name: &str, meta: &ObjectMeta) -> io::Result<OwnedFd> {
        match mkdirat(&self.dir, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        if fstatat(&fd, "object.json", AtFlags::AT_SYMLINK_NOFOLLOW).is_err() {
            // Best effort: only `cache info` reads it.
            let json = serde_json::to_vec_pretty(meta).map_err(io::Error::other)?;
            let tmp = format!("object.json.{}", std::process::id());
            if write_new(&fd, &tmp, &[&json]).is_ok()
                && renameat(&fd, tmp.as_str(), &fd, "object.json").is_err()
            {
                let _ = unlinkat(&fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
        Ok(fd)
    }

    /// True while writing is paused after a refused write.
    pub fn writes_paused(&self) -> bool {
        now_ms() < self.paused_until_ms.load(Ordering::Relaxed)
    }

    fn pause_writes(&self, why: &io::Error) {
        let until = now_ms() + WRITE_PAUSE.as_millis() as u64;
        let was = self.paused_until_ms.swap(until, Ordering::Relaxed);
        if was < now_ms() {
            tracing::warn!(
                "cannot write to the chunk cache {}: {why}; serving from memory, and trying \
                 again in {} s",
                self.path.display(),
                WRITE_PAUSE.as_secs()
            );
        }
    }

    /// Chunk files this process has written so far: a chunk fetched in parts is written
    /// once per part (each time with the pages it held before).
    pub fn files_written(&self) -> u64 {
        self.files_written.load(Ordering::Relaxed)
    }

    /// Count `bytes` written; an eviction pass is due when this process has written
    /// enough since its last one.
    fn wrote(&self, bytes: u64) {
        self.files_written.fetch_add(1, Ordering::Relaxed);
        let every = (self.max_bytes / 16).clamp(1, EVICT_EVERY_MAX);
        let total = self.written.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total >= every {
            self.written.store(0, Ordering::Relaxed);
            self.evict_due.store(true, Ordering::Relaxed);
        }
    }

    /// True when this process's writes have made an eviction pass due.
    pub fn eviction_due(&self) -> bool {
        self.evict_due.load(Ordering::Relaxed)
    }

    /// Run the eviction pass this process's writes made due, if any. Writers call it once
    /// they have let go of the chunks they wrote, not while holding them.
    pub fn evict_if_due(&self) {
        if self.evict_due.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.evict_to(self.max_bytes - self.max_bytes / 16) {
                tracing::warn!(
                    "cannot evict from the chunk cache {}: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// What the cache holds, object by object.
    pub fn usage(&self) -> io::Result<Vec<ObjectUsage>> {
        let mut out = Vec::new();
        for name in list_dir(&self.dir)? {
            if !is_key_name(&name) {
                continue;
            }
            let Ok(fd) = open_subdir(&self.dir, &name) else {
                continue;
            };
            let meta = read_meta(&fd);
            let (mut chunks, mut bytes) = (0u64, 0u64);
            for entry in list_dir(&fd)? {
                if is_chunk_name(&entry) {
                    if let Ok(st) = fstatat(&fd, entry.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                        chunks += 1;
                        bytes += st.st_blocks as u64 * 512;
                    }
                }
            }
            out.push(ObjectUsage {
                key: name,
                meta,
                chunks,
                bytes,
            });
        }
        Ok(out)
    }

    /// Remove the least recently used chunks until the cache holds at most `target`
    /// bytes, and the debris of crashed fetches. A pass already running (another process,
    /// or another thread) is waited for, up to a minute: a pass returning at once would
    /// miss what was written since that one looked.
    pub fn evict_to(&self, target: u64) -> io::Result<EvictReport> {
        let lock_file = File::from(openat(
            &self.dir,
            "evict.lock",
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o600),
        )?);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut lock_file = Some(lock_file);
        let _lock = loop {
            match Flock::lock(
                lock_file.take().expect("set"),
                FlockArg::LockExclusiveNonblock,
            ) {
                Ok(l) => break l,
                Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    lock_file = Some(f);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, e)) => return Err(e.into()),
            }
        };
        let mut report = EvictReport::default();
        let mut chunks: Vec<(i128, u64, Arc<OwnedFd>, String)> = Vec::new();
        let mut objects: Vec<(Arc<OwnedFd>, String)> = Vec::new();
        for name in list_dir(&self.dir)? {
            if !is_key_name(&name) {
                continue;
            }
            let Ok(fd) = open_subdir(&self.dir, &name) else {
                continue;
            };
            let fd = Arc::new(fd);
            for entry in list_dir(&fd)? {
                let Ok(st) = fstatat(&*fd, entry.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                    continue;
                };
                if is_chunk_name(&entry) {
                    let used = st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128;
                    chunks.push((used, st.st_blocks as u64 * 512, fd.clone(), entry));
                } else if is_part_name(&entry) && remove_stale_part(&fd, &entry, &st) {
                    report.removed_parts += 1;
                }
            }
            objects.push((fd, name));
        }
        report.bytes_before = chunks.iter().map(|c| c.1).sum();
        let mut total = report.bytes_before;
        if total > target {
            chunks.sort_by_key(|c| c.0);
            for (_, size, fd, name) in &chunks {
                if total <= target {
                    break;
                }
                match unlinkat(&**fd, name.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {
                        total -= size;
                        report.removed_chunks += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        report.bytes_after = total;
        // An object left without chunks goes; a process still using it makes its
        // directory again when it next writes.
        for (fd, name) in objects {
            let empty = list_dir(&fd)?
                .iter()
                .all(|e| e == "object.json" || e.starts_with("object.json."));
            if empty {
                let _ = unlinkat(&*fd, "object.json", UnlinkatFlags::NoRemoveDir);
                if unlinkat(&self.dir, name.as_str(), UnlinkatFlags::RemoveDir).is_ok() {
                    report.removed_objects += 1;
                }
            }
        }
        Ok(report)
    }
}

trait DirBuilderExt {
    fn mode_0700(&mut self) -> &mut Self;
}

impl DirBuilderExt for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt as _;
        self.mode(0o700)
    }
}

/// A `.part` file: remove it if nobody holds it and it has not changed for a while.
fn remove_stale_part(dir: &OwnedFd, name: &str, st: &FileStat) -> bool {
    let age = now_ms() / 1000 - (st.st_mtime.max(0) as u64).min(now_ms() / 1000);
    if age < STALE_PART.as_secs() {
        return false;
    }
    let Ok(fd) = openat(
        dir,
        name,
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    ) else {
        return false;
    };
    match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
            same_file(dir, name, &*locked) && {
                unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).is_ok()
            }
        }
        Err(_) => false,
    }
}

/// What `cache info` shows of one object.
#[derive(Debug, Clone)]
pub struct ObjectUsage {
    /// The directory name (key).
    pub key: String,
    /// Its `object.json`, if readable.
    pub meta: Option<ObjectMeta>,
    /// Chunk files.
    pub chunks: u64,
    /// Their bytes on disk.
    pub bytes: u64,
}

/// What an eviction pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub removed_chunks: u64,
    pub removed_parts: u64,
    pub removed_objects: u64,
}

/// The chunks of one object version.
#[derive(Debug)]
pub struct ObjectChunks {
    cache: Arc<ChunkCache>,
    key: ObjectKey,
    name: String,
    meta: ObjectMeta,
    /// The object's directory; made again if an eviction pass removed it.
    dir: Mutex<Arc<OwnedFd>>,
    /// Chunk files kept open, by index, the most recently used last (at most
    /// [`KEPT_OPEN`]).
    kept: Mutex<Vec<(u64, Arc<StoredChunk>)>>,
}

/// Which pages of a chunk a file holds: one bit each, [`MAX_PAGES`] at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSet([u64; MAX_PAGES / 64]);

impl PageSet {
    /// True when page `p` is in the set.
    pub fn contains(&self, p: u32) -> bool {
        (p as usize) < MAX_PAGES && self.0[p as usize / 64] & (1 << (p % 64)) != 0
    }
    /// Add page `p`.
    pub fn insert(&mut self, p: u32) {
        if (p as usize) < MAX_PAGES {
            self.0[p as usize / 64] |= 1 << (p % 64);
        }
    }
    /// True when every page of `pages` is in the set.
    pub fn covers(&self, pages: Range<u32>) -> bool {
        pages.into_iter().all(|p| self.contains(p))
    }
    /// The runs of pages of `pages` not in the set.
    pub fn missing_runs(&self, pages: Range<u32>) -> Vec<Range<u32>> {
        runs(pages, |p| !self.contains(p))
    }
    fn bytes(&self) -> [u8; MAX_PAGES / 8] {
        let mut b = [0u8; MAX_PAGES / 8];
        for (i, w) in self.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
    fn from_bytes(b: &[u8]) -> Self {
        let mut s = PageSet::default();
        for (i, w) in s.0.iter_mut().enumerate() {
            *w = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        }
        s
    }
}

/// The runs of pages of `pages` for which `pick` holds.
pub fn runs(pages: Range<u32>, pick: impl Fn(u32) -> bool) -> Vec<Range<u32>> {
    let mut out: Vec<Range<u32>> = Vec::new();
    for p in pages.filter(|&p| pick(p)) {
        match out.last_mut() {
            Some(r) if r.end == p => r.end = p + 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

/// A chunk file, opened and its header verified: which pages it holds, and reading them.
#[derive(Debug)]
pub struct StoredChunk {
    file: File,
    present: PageSet,
    sums: Vec<u64>,
    /// Bytes of the object in this chunk.
    len: usize,
}

impl StoredChunk {
    /// Which pages it holds.
    pub fn present(&self) -> &PageSet {
        &self.present
    }
}

/// The outcome of trying to claim a chunk for fetching.
#[derive(Debug)]
pub enum ClaimResult<'a> {
    /// This caller fetches what is missing, then calls [`Claim::commit`].
    Mine(Claim<'a>),
    /// Another fetcher holds it: wait with [`ObjectChunks::wait_for`].
    Busy,
}

/// The outcome of waiting for a chunk another process is fetching.
#[derive(Debug)]
pub enum WaitResult<'a> {
    /// The other fetcher let go: the claim is this caller's, who looks again at what the
    /// chunk holds before fetching the rest.
    Mine(Claim<'a>),
    /// The other fetcher still holds it at the deadline.
    TimedOut,
}

fn chunk_name(index: u64) -> String {
    format!("{index:0width$x}", width = INDEX_DIGITS)
}

fn part_name(index: u64) -> String {
    format!("{}.part", chunk_name(index))
}

fn is_key_name(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_chunk_name(s: &str) -> bool {
    s.len() == INDEX_DIGITS && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_part_name(s: &str) -> bool {
    s.strip_suffix(".part").is_some_and(is_chunk_name)
}

fn open_subdir(dir: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn list_dir(dir: &OwnedFd) -> io::Result<Vec<String>> {
    let fd = nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        if let Ok(name) = entry.file_name().to_str() {
            if name != "." && name != ".." {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

fn read_meta(dir: &OwnedFd) -> Option<ObjectMeta> {
    let fd = openat(
        dir,
        "object.json",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .ok()?;
    let mut s = String::new();
    io::Read::read_to_string(&mut io::Read::take(File::from(fd), 64 << 10), &mut s).ok()?;
    serde_json::from_str(&s).ok()
}

/// Create `name` in `dir` (which must not hold it) with the given pieces as content.
fn write_new(dir: &OwnedFd, name: &str, pieces: &[&[u8]]) -> io::Result<()> {
    let fd = openat(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )?;
    let f = File::from(fd);
    let mut at = 0;
    for p in pieces {
        f.write_all_at(p, at)?;
        at += p.len() as u64;
    }
    Ok(())
}

/// True when `name` in `dir` is the file `f` has open.
fn same_file(dir: &OwnedFd, name: &str, f: &impl AsFd) -> bool {
    match (
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW),
        fstat(f.as_fd()),
    ) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

impl ObjectChunks {
    /// What the object is.
    pub fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    /// The cache it lives in.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The object's directory name (its key in hex).
    pub fn key_hex(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> Arc<OwnedFd> {
        self.dir.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Open the object's directory again: an eviction pass removed it.
    fn reopen_dir(&self) -> io::Result<Arc<OwnedFd>> {
        let fd = Arc::new(self.cache.open_object_dir(&self.name, &self.meta)?);
        *self.dir.lock().unwrap_or_else(|p| p.into_inner()) = fd.clone();
        Ok(fd)
    }

    fn header(&self, index: u64, len: usize, present: &PageSet, sums: &[u64]) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..40].copy_from_slice(&self.key.0);
        h[40..48].copy_from_slice(&index.to_le_bytes());
        h[48..52].copy_from_slice(&(len as u32).to_le_bytes());
        h[52..56].copy_from_slice(&PAGE_SIZE.to_le_bytes());
        h[64..64 + MAX_PAGES / 8].copy_from_slice(&present.bytes());
        for (p, sum) in sums.iter().enumerate().take(MAX_PAGES) {
            let at = SUMS_AT + p * 8;
            h[at..at + 8].copy_from_slice(&sum.to_le_bytes());
        }
        let sum = header_checksum(&h);
        h[56..64].copy_from_slice(&sum.to_le_bytes());
        h
    }

    /// Chunk `index` as its file holds it, header verified; `None` if there is no file or
    /// it is damaged (then removed).
    pub fn open_chunk(&self, index: u64) -> Option<StoredChunk> {
        let dir = self.dir();
        let name = chunk_name(index);
        let fd = match openat(
            &*dir,
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return None,
            Err(e) => {
                tracing::warn!(
                    "cannot open chunk {index} of {} in the cache: {e}",
                    self.meta.address
                );
                return None;
            }
        };
        let file = File::from(fd);
        let checked = fstat(file.as_fd())
            .map_err(|e| e.to_string())
            .and_then(|st| {
                let header = self.verify_header(&file, &st, index)?;
                self.touch(&file, &st);
                Ok(header)
            });
        match checked {
            Ok((present, sums, len)) => Some(StoredChunk {
                file,
                present,
                sums,
                len,
            }),
            Err(why) => {
                self.drop_damaged(index, &file, &why);
                None
            }
        }
    }

    /// Chunk `index` for reading pages `runs`: the file kept open when it holds them all
    /// and is still in the cache (a renamed chunk file is never written again), else the
    /// file opened again and kept. `None` when there is no file or it is damaged; the
    /// caller checks which pages the chunk returned holds.
    pub fn chunk_for(&self, index: u64, runs: &[Range<u32>]) -> Option<Arc<StoredChunk>> {
        {
            let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = kept.iter().position(|(i, _)| *i == index) {
                let chunk = kept[at].1.clone();
                // A file removed since (evicted, pruned) would keep its blocks taken.
                let linked = fstat(chunk.file.as_fd()).ok().filter(|st| st.st_nlink > 0);
                if let Some(st) = linked {
                    if runs.iter().all(|r| chunk.present.covers(r.clone())) {
                        self.touch(&chunk.file, &st);
                        let used = kept.remove(at);
                        kept.push(used);
                        return Some(chunk);
                    }
                }
            }
        }
        let chunk = Arc::new(self.open_chunk(index)?);
        self.keep(index, Some(chunk.clone()));
        Some(chunk)
    }

    /// Close every chunk file kept open (the server is idle).
    pub fn let_go_kept(&self) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Keep `chunk` open as chunk `index` (`None`: keep nothing for it).
    fn keep(&self, index: u64, chunk: Option<Arc<StoredChunk>>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(i, _)| *i != index);
        if let Some(chunk) = chunk {
            if kept.len() >= KEPT_OPEN {
                kept.remove(0);
            }
            kept.push((index, chunk));
        }
    }

    /// Remove chunk `index`'s file, which `file` showed damaged (unless another file has
    /// been renamed into its place since).
    pub fn drop_damaged(&self, index: u64, file: &File, why: &str) {
        self.keep(index, None);
        tracing::warn!(
            "chunk {index} of {} in the cache {} is damaged ({why}): removed, fetching it again",
            self.meta.address,
            self.cache.path.display()
        );
        let dir = self.dir();
        let name = chunk_name(index);
        if same_file(&dir, &name, file) {
            let _ = unlinkat(&*dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }

    /// The pages `file` holds, their checksums and the chunk's length, if its header is
    /// right for chunk `index` of this object.
    fn verify_header(
        &self,
        file: &File,
        st: &FileStat,
        index: u64,
    ) -> Result<(PageSet, Vec<u64>, usize), String> {
        let len = self.meta.chunk_len(index);
        if st.st_uid != self.cache.uid {
            return Err(format!("owned by uid {}", st.st_uid));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err("not a regular file".into());
        }
        if st.st_size as u64 > (HEADER_LEN + len) as u64 {
            return Err(format!("{} bytes, more than a chunk", st.st_size));
        }
        let mut h = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| format!("{} bytes, shorter than its header", st.st_size))?;
        let want = self.header(index, len, &PageSet::default(), &[]);
        if h[..56] != want[..56] {
            return Err("its header names another chunk".into());
        }
        let sum = u64::from_le_bytes(h[56..64].try_into().expect("8 bytes"));
        if sum != header_checksum(&h) {
            return Err("header checksum mismatch".into());
        }
        let present = PageSet::from_bytes(&h[64..64 + MAX_PAGES / 8]);
        let pages = self.meta.pages_in(index);
        let mut sums = Vec::with_capacity(pages as usize);
        for p in 0..MAX_PAGES as u32 {
            if p >= pages && present.contains(p) {
                return Err(format!("page {p} lies beyond the chunk's end"));
            }
            if p < pages {
                let at = SUMS_AT + p as usize * 8;
                sums.push(u64::from_le_bytes(h[at..at + 8].try_into().expect("8")));
            }
        }
        Ok((present, sums, len))
    }

    /// Mark `file` (whose status is `st`) used now, unless it was within the last
    /// [`TOUCH_EVERY`].
    fn touch(&self, file: &File, st: &FileStat) {
        let now = now_ms() / 1000;
        if (st.st_mtime.max(0) as u64) + TOUCH_EVERY.as_secs() < now {
            let t = TimeSpec::UTIME_NOW;
            let _ = futimens(file.as_fd(), &t, &t);
        }
    }

    /// Try to become the fetcher of chunk `index`, without waiting. A cache that cannot
    /// be written (full disk, lost permissions, no locks) never stops a fetch: the claim
    /// is then one that writes nothing.
    pub fn claim(&self, index: u64) -> ClaimResult<'_> {
        if self.cache.writes_paused() {
            return ClaimResult::Mine(Claim::unwritten(self, index));
        }
        for _ in 0..4 {
            let dir = self.dir();
            let part = part_name(index);
            let fd = match openat(
                &*dir,
                part.as_str(),
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    // An eviction pass removed the directory.
                    if let Err(e) = self.reopen_dir() {
                        self.cache.pause_writes(&e);
                        return ClaimResult::Mine(Claim::unwritten(self, index));
                    }
                    continue;
                }
                Err(e) => {
                    self.cache.pause_writes(&e.into());
                    return ClaimResult::Mine(Claim::unwritten(self, index));
                }
            };
            let locked = match Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, Errno::EWOULDBLOCK)) => return ClaimResult::Busy,
                Err((_, e)) => {
                    self.cache.pause_writes(&e.into());
                    return ClaimResult::Mine(Claim::unwritten(self, index));
                }
            };
            // The file may have been renamed into place, or removed, between the open and
            // the lock: then it is not the claim file any more.
            if !same_file(&dir, &part, &*locked) {
                continue;
            }
            return ClaimResult::Mine(Claim {
                chunks: self,
                index,
                file: Some((locked, dir)),
            });
        }
        // The claim file kept changing under us: fetch without writing.
        ClaimResult::Mine(Claim::unwritten(self, index))
    }

    /// Wait until the fetcher holding chunk `index` lets go (then the claim is this
    /// caller's), or `deadline` passes.
    pub fn wait_for(&self, index: u64, deadline: Instant) -> WaitResult<'_> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let ClaimResult::Mine(c) = self.claim(index) {
                return WaitResult::Mine(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return WaitResult::TimedOut;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

impl StoredChunk {
    /// Read pages `pages` (clipped to the chunk's end) into `out`, each verified; an error
    /// names the damage (the caller drops the file).
    pub fn read_pages(&self, pages: Range<u32>, out: &mut Vec<u8>) -> Result<(), String> {
        let p = PAGE_SIZE as usize;
        let start = pages.start as usize * p;
        let end = (pages.end as usize * p).min(self.len);
        // Zeroed only where the buffer grows: a reused one is overwritten by the read.
        out.resize(end.saturating_sub(start), 0);
        if out.is_empty() {
            return Ok(());
        }
        self.file
            .read_exact_at(out, (HEADER_LEN + start) as u64)
            .map_err(|_| "shorter than its pages".to_string())?;
        for (k, page) in out.chunks(p).enumerate() {
            let n = pages.start as usize + k;
            if xxh3_64(page) != self.sums[n] {
                return Err(format!("page {n} checksum mismatch"));
            }
        }
        Ok(())
    }

    /// The file, for [`ObjectChunks::drop_damaged`].
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The right to fetch one chunk and put what was fetched in the cache: a locked `.part`
/// file, or nothing when the cache is not being written.
#[derive(Debug)]
pub struct Claim<'a> {
    chunks: &'a ObjectChunks,
    index: u64,
    file: Option<(Flock<File>, Arc<OwnedFd>)>,
}

impl<'a> Claim<'a> {
    fn unwritten(chunks: &'a ObjectChunks, index: u64) -> Self {
        Claim {
            chunks,
            index,
            file: None,
        }
    }

    /// The chunk this claim is for.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Add pages to the chunk: each piece is the bytes of the pages from its first page
    /// on. A new file with the pages the chunk held and these is renamed over the old one.
    /// A failure to write is reported once and pauses writing; the caller serves the pages
    /// whatever happens. True when the pages are now in the cache.
    pub fn commit(mut self, pieces: &[(u32, &[u8])]) -> bool {
        let Some((file, dir)) = self.file.take() else {
            return false;
        };
        let chunks = self.chunks;
        let index = self.index;
        let part = part_name(index);
        let result = (|| -> io::Result<u64> {
            let len = chunks.meta.chunk_len(index);
            let p = PAGE_SIZE as usize;
            let pages = chunks.meta.pages_in(index) as usize;
            let mut new = PageSet::default();
            for (first, data) in pieces {
                let start = *first as usize * p;
                if start + data.len() > len || (start + data.len() < len && data.len() % p != 0) {
                    return Err(io::Error::other("pages outside the chunk"));
                }
                for k in 0..data.len().div_ceil(p) {
                    new.insert(first + k as u32);
                }
            }
            // What the chunk holds already and is not being replaced, verified, one read
            // per run of pages (a damaged one is started afresh: none of it is kept).
            let mut old_runs: Vec<(u32, Vec<u8>)> = Vec::new();
            if let Some(old) = chunks.open_chunk(index) {
                let keep = runs(0..pages as u32, |q| {
                    old.present.contains(q) && !new.contains(q)
                });
                for run in keep {
                    let mut buf = Vec::new();
                    if old.read_pages(run.clone(), &mut buf).is_err() {
                        old_runs.clear();
                        break;
                    }
                    old_runs.push((run.start, buf));
                }
            }
            file.set_len(0)?;
            // Each run written where it belongs, straight from where it is: the file is
            // sparse, holding only the pages present.
            let mut present = PageSet::default();
            let mut sums = vec![0u64; pages];
            let mut written = HEADER_LEN as u64;
            let old_pieces = old_runs
                .iter()
                .map(|(first, data)| (*first, data.as_slice()));
            for (first, data) in old_pieces.chain(pieces.iter().copied()) {
                for (k, page) in data.chunks(p).enumerate() {
                    let n = first as usize + k;
                    sums[n] = xxh3_64(page);
                    present.insert(n as u32);
                }
                file.write_all_at(data, (HEADER_LEN + first as usize * p) as u64)?;
                written += data.len() as u64;
            }
            file.write_all_at(&chunks.header(index, len, &present, &sums), 0)?;
            renameat(&*dir, part.as_str(), &*dir, chunk_name(index).as_str())?;
            Ok(written)
        })();
        // Dropping the Flock (at return) unlocks: a waiter then finds the pages in place.
        match result {
            Ok(written) => {
                // The file kept open, if any, is the chunk's previous version.
                chunks.keep(index, None);
                chunks.cache.wrote(written);
                true
            }
            Err(e) => {
                if same_file(&dir, &part, &*file) {
                    let _ = unlinkat(&*dir, part.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                chunks.cache.pause_writes(&e);
                false
            }
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // A claim given up (the fetch failed, or nothing was missing): remove the claim
        // file so that waiters take over at once.
        if let Some((file, dir)) = self.file.take() {
            let part = part_name(self.index);
            if same_file(&dir, &part, &*file) {
                let _ = unlinkat(&*dir, part.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }
}

fn header_checksum(h: &[u8]) -> u64 {
    let mut x = Xxh3::new();
    x.update(&h[..56]);
    x.update(&h[64..]);
    x.digest()
}

#[cfg(test)]
#[path = "chunks_tests.rs"]
mod tests;
