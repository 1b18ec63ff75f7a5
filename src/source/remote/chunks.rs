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
//! DIR/<uid>/<key>/<index>         chunk `index` (12 hex digits): a 64-byte header, then
//!                                 the chunk's bytes
//! DIR/<uid>/<key>/<index>.part    a chunk being fetched: the fetcher holds flock on it
//! ```
//!
//! - **Integrity.** The header names the object key, the index and the length, and carries
//!   an xxh3 checksum of header and bytes; a chunk is verified whenever it is read back. A
//!   truncated, torn or corrupt file is removed and fetched again, never served. A chunk is
//!   written to its `.part` file and renamed into place, so a reader sees a whole chunk or
//!   none.
//! - **Fetched once per node.** A process that needs a chunk nobody has creates or opens
//!   its `.part` file and takes an exclusive flock without waiting. Holding the lock, it
//!   fetches, writes and renames. Any other process finds the lock taken and waits (a
//!   bounded time, polling) for the chunk to appear; if the holder dies, the kernel drops
//!   its lock and the next one takes over.
//! - **Bounded.** Files are touched (mtime) when used, at most once a minute each; an
//!   eviction pass removes the least recently used chunks until the cache holds at most
//!   15/16 of its budget. Each process runs a pass when it has written a sixteenth of the
//!   budget (at most 64 MiB) since its last one, so the cache exceeds its budget by at most
//!   that much per writing process. Removing a chunk while another process reads it is
//!   safe: an open file stays readable, and a missing one is fetched again.
//! - **Whose cache.** Only the user's own directory is used: it is opened by descriptor
//!   without following a symbolic link, and refused unless it is owned by the user and
//!   closed to everybody else (no group or other permission bits). Every file is then
//!   reached relative to that descriptor, and a chunk file not owned by the user is never
//!   read. So a user can neither read nor poison another user's cache, even in a shared
//!   `DIR` (make that one mode 1777, as /tmp); the price is that two users of one image
//!   each fetch their own copy (an HTTP cache in front of the store absorbs that).
//! - **Full disk, read-only or unusable directory.** A chunk that cannot be written is
//!   still served from memory; writing pauses for a minute and a warning says why. A cache
//!   directory that cannot be opened leaves the caller to read without a disk cache.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{fstat, fstatat, futimens, mkdirat, FileStat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

use super::ObjectVersion;

/// Chunk size: 1 MiB is large enough that a request's overhead is small against its
/// transfer, and small enough that reading a few KiB of metadata fetches little else.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Default budget of the disk cache: 10 GiB.
pub const DEFAULT_CACHE_MAX: u64 = 10 << 30;

/// Bytes before a chunk's data in its file.
pub const HEADER_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"SIFUSEC1";
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
        let key = meta.key();
        let name = key.hex();
        let dir = self.open_object_dir(&name, &meta)?;
        Ok(ObjectChunks {
            cache: self.clone(),
            key,
            name,
            meta,
            dir: Mutex::new(Arc::new(dir)),
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

    /// Count `bytes` written, and run an eviction pass when this process has written
    /// enough since its last one.
    fn wrote(&self, bytes: u64) {
        let every = (self.max_bytes / 16).clamp(1, EVICT_EVERY_MAX);
        let total = self.written.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total >= every {
            self.written.store(0, Ordering::Relaxed);
            if let Err(e) = self.evict_to(self.max_bytes - self.max_bytes / 16, false) {
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
                        bytes += st.st_size as u64;
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
    /// bytes, and the debris of crashed fetches. Another process already evicting makes
    /// this return at once, unless `wait` (then it waits up to a minute for it).
    pub fn evict_to(&self, target: u64, wait: bool) -> io::Result<EvictReport> {
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
                Err((f, Errno::EWOULDBLOCK)) if wait && Instant::now() < deadline => {
                    lock_file = Some(f);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK)) if !wait => return Ok(EvictReport::default()),
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
                    chunks.push((used, st.st_size as u64, fd.clone(), entry));
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
}

/// The outcome of trying to claim a chunk for fetching.
#[derive(Debug)]
pub enum ClaimResult<'a> {
    /// This caller fetches it, then calls [`Claim::commit`].
    Mine(Claim<'a>),
    /// Another fetcher holds it: wait with [`ObjectChunks::wait_for`].
    Busy,
    /// The chunk is already there.
    Present,
}

/// The outcome of waiting for a chunk another process fetches.
#[derive(Debug)]
pub enum WaitResult<'a> {
    /// It arrived, verified.
    Arrived(Vec<u8>),
    /// Its fetcher let go without it: this caller fetches it now.
    Mine(Claim<'a>),
    /// Neither within the time allowed.
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

    fn header(&self, index: u64, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..40].copy_from_slice(&self.key.0);
        h[40..48].copy_from_slice(&index.to_le_bytes());
        h[48..52].copy_from_slice(&(len as u32).to_le_bytes());
        h
    }

    fn checksum(header: &[u8], payload: &[u8]) -> u64 {
        let mut x = Xxh3::new();
        x.update(&header[..56]);
        x.update(payload);
        x.digest()
    }

    /// True when chunk `index` has a file of the right size (not verified: for skipping
    /// what is already there when filling the cache).
    pub fn contains(&self, index: u64) -> bool {
        let want = (HEADER_LEN + self.meta.chunk_len(index)) as i64;
        fstatat(
            &*self.dir(),
            chunk_name(index).as_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| st.st_size == want && st.st_uid == self.cache.uid)
    }

    /// Chunk `index`, verified; `None` if absent or damaged (a damaged file is removed).
    pub fn read(&self, index: u64) -> Option<Vec<u8>> {
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
        match self.verify(&file, index) {
            Ok(payload) => {
                self.touch(&file);
                Some(payload)
            }
            Err(why) => {
                tracing::warn!(
                    "chunk {index} of {} in the cache {} is damaged ({why}): removed, \
                     fetching it again",
                    self.meta.address,
                    self.cache.path.display()
                );
                // Only the file just judged: a good copy renamed into place since stays.
                if same_file(&dir, &name, &file) {
                    let _ = unlinkat(&*dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                None
            }
        }
    }

    /// The chunk's bytes if `file` holds exactly chunk `index` of this object.
    fn verify(&self, file: &File, index: u64) -> Result<Vec<u8>, String> {
        let len = self.meta.chunk_len(index);
        let st = fstat(file.as_fd()).map_err(|e| e.to_string())?;
        if st.st_uid != self.cache.uid {
            return Err(format!("owned by uid {}", st.st_uid));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err("not a regular file".into());
        }
        if st.st_size as u64 != (HEADER_LEN + len) as u64 {
            return Err(format!(
                "{} bytes where {} belong",
                st.st_size,
                HEADER_LEN + len
            ));
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| e.to_string())?;
        let mut payload = vec![0u8; len];
        file.read_exact_at(&mut payload, HEADER_LEN as u64)
            .map_err(|e| e.to_string())?;
        let want = self.header(index, len);
        if header[..56] != want[..56] {
            return Err("its header names another chunk".into());
        }
        let sum = u64::from_le_bytes(header[56..64].try_into().expect("8 bytes"));
        if sum != Self::checksum(&header, &payload) {
            return Err("checksum mismatch".into());
        }
        Ok(payload)
    }

    fn touch(&self, file: &File) {
        let Ok(st) = fstat(file.as_fd()) else { return };
        let now = now_ms() / 1000;
        if (st.st_mtime.max(0) as u64) + TOUCH_EVERY.as_secs() < now {
            let t = TimeSpec::UTIME_NOW;
            let _ = futimens(file.as_fd(), &t, &t);
        }
    }

    /// Try to become the fetcher of chunk `index`, without waiting.
    /// A cache that cannot be written (full disk, lost permissions, no locks) never
    /// stops a fetch: the claim is then one that writes nothing.
    pub fn claim(&self, index: u64) -> ClaimResult<'_> {
        if self.cache.writes_paused() {
            // Nothing is written, so there is nothing to coordinate.
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
            if fstatat(
                &*dir,
                chunk_name(index).as_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .is_ok()
            {
                let _ = unlinkat(&*dir, part.as_str(), UnlinkatFlags::NoRemoveDir);
                return ClaimResult::Present;
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

    /// Wait until chunk `index`, which another fetcher claimed, is in the cache, or its
    /// fetcher lets go (then the claim is this caller's), or `deadline` passes.
    pub fn wait_for(&self, index: u64, deadline: Instant) -> WaitResult<'_> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(bytes) = self.read(index) {
                return WaitResult::Arrived(bytes);
            }
            match self.claim(index) {
                ClaimResult::Mine(c) => return WaitResult::Mine(c),
                ClaimResult::Present => {}
                ClaimResult::Busy => {}
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

/// The right to fetch one chunk and put it in the cache: a locked `.part` file, or
/// nothing when the cache is not being written.
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

    /// Write the fetched chunk into the cache. A failure to write is reported once and
    /// pauses writing; the caller serves `payload` whatever happens.
    pub fn commit(mut self, payload: &[u8]) {
        let Some((file, dir)) = self.file.take() else {
            return;
        };
        let chunks = self.chunks;
        let part = part_name(self.index);
        let result = (|| -> io::Result<()> {
            if payload.len() != chunks.meta.chunk_len(self.index) {
                return Err(io::Error::other("wrong chunk length"));
            }
            let mut header = chunks.header(self.index, payload.len());
            let sum = ObjectChunks::checksum(&header, payload);
            header[56..64].copy_from_slice(&sum.to_le_bytes());
            file.set_len(0)?;
            file.write_all_at(&header, 0)?;
            file.write_all_at(payload, HEADER_LEN as u64)?;
            renameat(&*dir, part.as_str(), &*dir, chunk_name(self.index).as_str())?;
            Ok(())
        })();
        match result {
            Ok(()) => chunks.cache.wrote((HEADER_LEN + payload.len()) as u64),
            Err(e) => {
                if same_file(&dir, &part, &*file) {
                    let _ = unlinkat(&*dir, part.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                chunks.cache.pause_writes(&e);
            }
        }
        // Dropping the Flock unlocks: a waiter then finds the chunk in place.
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // A claim given up (the fetch failed): remove the empty claim file so waiters
        // take over at once instead of finding a stale one.
        if let Some((file, dir)) = self.file.take() {
            let part = part_name(self.index);
            if same_file(&dir, &part, &*file) {
                let _ = unlinkat(&*dir, part.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }
}

#[cfg(test)]
#[path = "chunks_tests.rs"]
mod tests;
