use super::*;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::source::remote::MemoryObject;

use crate::source::remote::chunks::{HEADER_LEN, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;
/// Four pages a chunk.
const CS: u32 = 4 * PAGE_SIZE;

fn config() -> RemoteConfig {
    RemoteConfig {
        chunk_size: CS,
        memory_bytes: 16 * CS as u64,
        max_in_flight: 4,
        max_request_bytes: 4 * CS as u64,
        wait_limit: Duration::from_secs(10),
        read_ahead_min_run: 2 * CS as u64,
        read_ahead_bytes: 8 * CS as u64,
        workers: 2,
    }
}

/// [`config`] without background workers: read-ahead and hints are fetched at once, by
/// the reader, so what a test counts does not depend on timing.
fn without_workers() -> RemoteConfig {
    RemoteConfig {
        workers: 0,
        ..config()
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u32 | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn read(src: &RemoteSource, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    src.read_exact_at(&mut b, offset)?;
    Ok(b)
}

struct Fixture {
    _dir: tempfile::TempDir,
    cache: Arc<ChunkCache>,
    object: Arc<MemoryObject>,
    data: Vec<u8>,
}

fn fixture(chunks: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let data = bytes(chunks * CS as usize - 1000, 1);
    Fixture {
        _dir: dir,
        cache,
        object: Arc::new(MemoryObject::new(data.clone())),
        data,
    }
}

impl Fixture {
    fn open(&self, config: RemoteConfig) -> RemoteSource {
        RemoteSource::open(self.object.clone(), Some(self.cache.clone()), config).unwrap()
    }
}

#[test]
fn reads_anywhere_return_the_object_bytes() {
    let f = fixture(20);
    let src = f.open(config());
    assert_eq!(src.len(), f.data.len() as u64);
    let len = f.data.len();
    for (off, n) in [
        (0, 1),
        (0, len),
        (CS as usize - 1, 2),
        (5 * CS as usize + 7, 3 * CS as usize),
        (len - 1, 1),
        (len - 5000, 5000),
        (123, 0),
    ] {
        assert_eq!(
            read(&src, off as u64, n).unwrap(),
            &f.data[off..off + n],
            "{off}+{n}"
        );
    }
    let e = read(&src, len as u64 - 1, 2).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(read(&src, u64::MAX, 1).is_err());
}

#[test]
fn neighbouring_missing_pages_come_in_one_request_up_to_the_limit() {
    let f = fixture(20);
    let src = f.open(without_workers());
    assert_eq!(f.object.requests(), 1, "opening asks the version once");
    // Pages 8..=16 (chunks 2 to 4) in one read: one request, for those pages only.
    read(&src, 2 * CS as u64 + 10, 2 * CS as usize + 100).unwrap();
    assert_eq!(f.object.requests(), 2);
    assert_eq!(f.object.bytes_served(), 9 * P);
    // Pages 4..44: 4..8 missing, 8..17 cached, 17..44 missing. A read is served in
    // windows of one request's length (16 pages), so that it holds one request's buffer at
    // a time: 4..8 and 17..20, then 20..36, then 36..44, runs across chunk boundaries.
    read(&src, CS as u64, 10 * CS as usize).unwrap();
    assert_eq!(f.object.requests(), 2 + 4);
    assert_eq!(f.object.bytes_served(), 40 * P);
}

#[test]
fn a_small_read_fetches_its_pages_not_its_chunk() {
    let f = fixture(20);
    let src = f.open(without_workers());
    // 100 bytes inside one page, then 100 bytes across two pages of another chunk.
    read(&src, 5 * CS as u64 + P + 7, 100).unwrap();
    assert_eq!(f.object.bytes_served(), P);
    read(&src, 9 * CS as u64 + 2 * P - 50, 100).unwrap();
    assert_eq!(f.object.bytes_served(), 3 * P);
    // The rest of the first chunk: the pages it lacks, not the one it holds.
    read(&src, 5 * CS as u64, CS as usize).unwrap();
    assert_eq!(f.object.bytes_served(), 6 * P);
    assert!(src.inner.disk.as_ref().unwrap().contains(5));
}

#[test]
fn a_remount_of_an_unchanged_object_fetches_nothing_but_the_revalidation() {
    let f = fixture(30);
    let src = f.open(config());
    assert_eq!(read(&src, 0, f.data.len()).unwrap(), f.data);
    drop(src);
    let before = f.object.requests();
    let again = f.open(config());
    for off in (0..f.data.len()).step_by(3000) {
        let n = 3000.min(f.data.len() - off);
        assert_eq!(read(&again, off as u64, n).unwrap(), &f.data[off..off + n]);
    }
    assert_eq!(
        f.object.requests() - before,
        1,
        "more than one revalidation"
    );
    assert_eq!(again.counters().requests.load(Ordering::Relaxed), 0);
}

#[test]
fn a_changed_object_is_never_mixed_with_the_old_one() {
    let f = fixture(10);
    let src = f.open(config());
    let head = read(&src, 0, 100).unwrap();
    let v2 = bytes(f.data.len(), 2);
    f.object.replace(v2.clone());
    // Cached bytes of the version opened are still served; uncached ones fail.
    assert_eq!(read(&src, 0, 100).unwrap(), head);
    let e = read(&src, 5 * CS as u64, 10).unwrap_err();
    assert!(e.to_string().contains("changed"), "{e}");
    // A new open reads the new version only, though the old one's chunks are on disk.
    let src2 = f.open(config());
    assert_eq!(read(&src2, 0, f.data.len()).unwrap(), v2);
}

#[test]
fn a_failed_fetch_is_an_error_and_the_next_read_recovers() {
    let f = fixture(10);
    let src = f.open(without_workers());
    read(&src, 0, 10).unwrap();
    f.object.fail_next([
        RemoteError::Transient("connection reset".into()),
        RemoteError::Transient("connection reset".into()),
    ]);
    let e = read(&src, 3 * CS as u64, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(
        e.to_string().contains("memory object: connection reset"),
        "{e}"
    );
    // What is cached is still served while the store fails.
    assert_eq!(read(&src, 0, 10).unwrap(), &f.data[..10]);
    assert!(read(&src, 6 * CS as u64, 10).is_err());
    // The store is back: the same reads work, without reopening.
    assert_eq!(
        read(&src, 3 * CS as u64, 10).unwrap(),
        &f.data[3 * CS as usize..3 * CS as usize + 10]
    );
    // A failure beyond retrying is an error, not a hang, and not a panic.
    f.object
        .fail_next([RemoteError::Refused("403 Forbidden".into())]);
    assert!(read(&src, 8 * CS as u64, 10).is_err());
    assert!(read(&src, 8 * CS as u64, 10).is_ok());
}

#[test]
fn a_damaged_chunk_on_disk_is_fetched_again() {
    let f = fixture(6);
    let src = f.open(config());
    read(&src, 0, f.data.len()).unwrap();
    drop(src);
    let dir = f.cache.path().join(
        ObjectMeta::new("memory object", &f.object.version().unwrap(), CS)
            .key()
            .hex(),
    );
    let victim = dir.join(format!("{:012x}", 2));
    let mut b = std::fs::read(&victim).unwrap();
    b[100] ^= 0x40;
    std::fs::write(&victim, b).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{:012x}", 4)))
        .unwrap()
        .set_len(10)
        .unwrap();
    let before = f.object.bytes_served();
    let src = f.open(config());
    assert_eq!(read(&src, 0, f.data.len()).unwrap(), f.data);
    assert_eq!(f.object.bytes_served() - before, 2 * CS as u64);
}

#[test]
fn without_a_disk_cache_memory_stays_within_its_budget() {
    let f = fixture(64);
    let c = config();
    let src = RemoteSource::open(f.object.clone(), None, c.clone()).unwrap();
    assert!(!src.has_disk_cache());
    for round in 0..2 {
        for off in (0..f.data.len()).step_by(5000) {
            let n = 5000.min(f.data.len() - off);
            assert_eq!(
                read(&src, off as u64, n).unwrap(),
                &f.data[off..off + n],
                "{round}"
            );
        }
        let weight = src.inner.memory.weight();
        assert!(weight <= c.memory_bytes, "{weight} > {}", c.memory_bytes);
    }
}

#[test]
fn a_sequential_reader_gets_what_follows_in_few_requests() {
    let f = fixture(64);
    let src = f.open(without_workers());
    for off in (0..f.data.len()).step_by(1024) {
        let n = 1024.min(f.data.len() - off);
        read(&src, off as u64, n).unwrap();
    }
    let requests = src.counters().requests.load(Ordering::Relaxed);
    // 256 pages, read 1 KiB at a time: without read-ahead one request a page; with it,
    // a page at a time for the first 2 chunks (8 pages), then windows as long as what was
    // read, up to 8 chunks.
    assert!(
        requests <= 32,
        "{requests} requests for 256 pages read in order"
    );
    assert_eq!(
        f.object.bytes_served(),
        f.data.len() as u64,
        "a chunk fetched twice"
    );
}

/// A file read in order whose blocks arrive from several threads, some ahead of the
/// reader (the archive's own read-ahead decompresses the blocks that follow): the bytes
/// do not come in order, so the source cannot see a stream, but the archive says what
/// comes next (`will_read`), and those hints are fetched in growing requests. Without
/// them a cold 512 MiB read over loopback went at 100 MiB/s.
#[test]
fn read_ahead_hints_are_fetched_in_growing_requests() {
    let f = fixture(64);
    // Without workers the hints are fetched at once: the count does not depend on timing.
    let src = f.open(without_workers());
    let piece = 2 * P as usize;
    let mut off = 0;
    while off + 2 * piece <= f.data.len() {
        src.will_read(off as u64..(off + 2 * piece) as u64);
        // The block after next first (a read-ahead worker), then the next (the reader).
        assert_eq!(
            read(&src, (off + piece) as u64, piece).unwrap(),
            f.data[off + piece..off + 2 * piece]
        );
        assert_eq!(
            read(&src, off as u64, piece).unwrap(),
            f.data[off..off + piece]
        );
        off += 2 * piece;
    }
    let requests = src.counters().requests.load(Ordering::Relaxed);
    assert!(
        requests <= 48,
        "{requests} requests for 256 pages read in order, pairs swapped"
    );
}

/// Blocks of an image do not line up with chunks; read-ahead fetches whole chunks all the
/// same, so that a chunk file is written once, not once per part (each time with all the
/// pages it held before).
#[test]
fn read_ahead_writes_each_chunk_file_once() {
    let f = fixture(64);
    let src = f.open(without_workers());
    // Blocks of three pages, each hinted as the block after next is read.
    let block = 3 * P as usize;
    let mut off = 0;
    while off < f.data.len() {
        let hint = (off + block).min(f.data.len())..(off + 3 * block).min(f.data.len());
        if !hint.is_empty() {
            src.will_read(hint.start as u64..hint.end as u64);
        }
        let n = block.min(f.data.len() - off);
        assert_eq!(read(&src, off as u64, n).unwrap(), f.data[off..off + n]);
        off += n;
    }
    let files = f.cache.files_written();
    assert!(
        files <= 64 + 2,
        "{files} chunk files written for 64 chunks read in order"
    );
}

#[test]
fn background_workers_read_ahead_and_prefetch_in_large_requests() {
    let f = fixture(64);
    let src = Arc::new(f.open(config()));
    // Reads from the opening thread do not start the workers.
    read(&src, 0, 10).unwrap();
    assert!(src.pool.get().is_none());
    src.prefetch(40 * CS as u64..60 * CS as u64);
    // A read from another thread (a request thread) starts them.
    let s2 = src.clone();
    std::thread::spawn(move || read(&s2, CS as u64, 10).unwrap())
        .join()
        .unwrap();
    assert!(src.pool.get().is_some());
    let disk = src.inner.disk.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(40..60).all(|i| disk.contains(i)) {
        assert!(Instant::now() < deadline, "prefetch did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    // 20 chunks in requests of at most 4.
    assert!(src.counters().requests.load(Ordering::Relaxed) <= 2 + 5);
}

#[test]
fn sifuse_fetch_fills_the_disk_cache_with_the_whole_object() {
    let f = fixture(37);
    let src = f.open(config());
    read(&src, 10 * CS as u64, 10).unwrap();
    let last = Mutex::new(0);
    src.fetch_all(3, &|done| {
        let mut l = last.lock().unwrap();
        *l = (*l).max(done);
    })
    .unwrap();
    assert_eq!(*last.lock().unwrap(), f.data.len() as u64);
    let disk = src.inner.disk.as_ref().unwrap();
    assert!((0..37).all(|i| disk.contains(i)));
    assert_eq!(f.object.bytes_served(), f.data.len() as u64);
    // A remount reads it all without a range request.
    let again = f.open(config());
    assert_eq!(read(&again, 0, f.data.len()).unwrap(), f.data);
    assert_eq!(again.counters().requests.load(Ordering::Relaxed), 0);
}

/// A store that answers its first range request only after `stall`.
#[derive(Debug)]
struct Stalling {
    inner: MemoryObject,
    stall: Duration,
    stalled: std::sync::atomic::AtomicBool,
}

impl ObjectStore for Stalling {
    fn describe(&self) -> String {
        "stalling object".into()
    }
    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        self.inner.version()
    }
    fn read_range(
        &self,
        version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        if !self.stalled.swap(true, Ordering::SeqCst) {
            std::thread::sleep(self.stall);
        }
        self.inner.read_range(version, offset, buf)
    }
}

#[test]
fn a_reader_waiting_for_another_readers_fetch_gives_up_within_the_limit() {
    let store = Arc::new(Stalling {
        inner: MemoryObject::new(bytes(8 * CS as usize, 3)),
        stall: Duration::from_secs(3),
        stalled: false.into(),
    });
    let mut c = config();
    c.wait_limit = Duration::from_millis(300);
    let src = Arc::new(RemoteSource::open(store, None, c).unwrap());
    let s2 = src.clone();
    let stuck = std::thread::spawn(move || read(&s2, 0, 10));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let e = read(&src, 0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Other chunks are served meanwhile.
    assert!(read(&src, 5 * CS as u64, 10).is_ok());
    assert!(stuck.join().unwrap().is_ok());
}

// ---- two processes filling one cache -------------------------------------------------

/// An object in a local file, as a store: every range request waits `delay` (a slow
/// network) and appends `offset length` to a log that several processes share.
#[derive(Debug)]
struct LoggedFile {
    path: PathBuf,
    log: PathBuf,
    delay: Duration,
}

impl ObjectStore for LoggedFile {
    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }
    fn version(&self) -> Result<ObjectVersion, RemoteError> {
        let m = std::fs::metadata(&self.path).map_err(|e| RemoteError::Refused(e.to_string()))?;
        Ok(ObjectVersion {
            len: m.len(),
            validator: format!("{:?}", m.modified().unwrap()),
        })
    }
    fn read_range(
        &self,
        _version: &ObjectVersion,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RemoteError> {
        use std::os::unix::fs::FileExt;
        std::thread::sleep(self.delay);
        let f = std::fs::File::open(&self.path).unwrap();
        f.read_exact_at(buf, offset).unwrap();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .unwrap();
        log.write_all(format!("{offset} {}\n", buf.len()).as_bytes())
            .unwrap();
        Ok(())
    }
}

const CHILD_ENV: &str = "SIFUSE_TEST_FILL_CHILD";

/// Run by `two_processes_fill_one_cache_fetching_each_chunk_once` in two child processes.
#[test]
#[ignore = "a child of two_processes_fill_one_cache_fetching_each_chunk_once"]
fn fill_child() {
    let dir = PathBuf::from(std::env::var(CHILD_ENV).expect("run by the parent test"));
    let store = Arc::new(LoggedFile {
        path: dir.join("object"),
        log: dir.join("log"),
        delay: Duration::from_millis(5),
    });
    let want = std::fs::read(dir.join("object")).unwrap();
    let cache = ChunkCache::open(&dir.join("cache"), 1 << 30).unwrap();
    let src = RemoteSource::open(store, Some(cache), without_workers()).unwrap();
    // Both start together.
    while !dir.join("go").exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    for off in (0..want.len()).step_by(3 * CS as usize) {
        let n = (3 * CS as usize).min(want.len() - off);
        assert_eq!(read(&src, off as u64, n).unwrap(), &want[off..off + n]);
    }
}

#[test]
fn two_processes_fill_one_cache_fetching_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(200 * CS as usize, 9);
    std::fs::write(dir.path().join("object"), &data).unwrap();
    let spawn = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "source::remote::source::tests::fill_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children = [spawn(), spawn()];
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.path().join("go"), b"").unwrap();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "a child failed: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let mut covered = vec![0u32; 200 * (CS as u64 / P) as usize];
    let mut requests = 0;
    for line in log.lines() {
        let mut it = line.split(' ').map(|x| x.parse::<u64>().unwrap());
        let (off, len) = (it.next().unwrap(), it.next().unwrap());
        requests += 1;
        for page in off / P..(off + len).div_ceil(P) {
            covered[page as usize] += 1;
        }
    }
    assert!(
        covered.iter().all(|&n| n == 1),
        "pages fetched other than once: {:?} ({requests} requests)",
        covered
            .iter()
            .enumerate()
            .filter(|(_, &n)| n != 1)
            .collect::<Vec<_>>()
    );
}

/// A tmpfs of `bytes` mounted on a fresh directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(bytes: u64) -> SmallDisk {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: it mounts a small tmpfs to fill"
        );
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(format!("size={bytes},mode=0755").as_str()),
        )
        .unwrap();
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_disk_still_serves_every_read() {
    // Room for the directories and a few chunks, not for the object.
    let disk = SmallDisk::new(256 << 10);
    let cache = ChunkCache::open(disk.dir.path(), 1 << 30).unwrap();
    let data = bytes(64 * CS as usize, 5);
    let object = Arc::new(MemoryObject::new(data.clone()));
    let src = RemoteSource::open(object.clone(), Some(cache.clone()), config()).unwrap();
    for off in (0..data.len()).step_by(5000) {
        let n = 5000.min(data.len() - off);
        assert_eq!(read(&src, off as u64, n).unwrap(), &data[off..off + n]);
    }
    assert!(cache.writes_paused(), "the disk never filled");
    // What did fit is served from disk, and what did not from memory, as far as it goes.
    let before = object.bytes_served();
    read(&src, 0, 100).unwrap();
    let tail = data.len() as u64 - 5000;
    read(&src, tail, 5000).unwrap();
    assert_eq!(object.bytes_served(), before);
}

/// An idle server lets go of what the source holds for speed: the chunk files kept open
/// and the spare request buffers. What it reads next is still right.
#[test]
fn letting_go_closes_the_kept_chunk_files_and_frees_the_spare_buffers() {
    let f = fixture(8);
    let src = f.open(without_workers());
    assert_eq!(
        read(&src, 0, 3 * CS as usize).unwrap(),
        f.data[..3 * CS as usize]
    );
    // Read again, from the disk cache: the chunk files are kept open.
    assert_eq!(read(&src, 0, CS as usize).unwrap(), f.data[..CS as usize]);
    let disk = src.inner.disk.as_ref().unwrap();
    assert!(disk.kept_open() > 0);
    assert!(!src.inner.spare_buffers.lock().unwrap().is_empty());
    src.let_go();
    assert_eq!(disk.kept_open(), 0);
    assert!(src.inner.spare_buffers.lock().unwrap().is_empty());
    assert_eq!(
        read(&src, 10, 2 * CS as usize).unwrap(),
        f.data[10..10 + 2 * CS as usize]
    );
}

/// Reads past the disk cache's budget keep it within the budget (plus what one process
/// writes between two passes): the pass their writes make due runs after the fetch, by the
/// reader itself without workers, by a worker once serving.
#[test]
fn reads_past_the_budget_run_the_eviction_pass_after_their_fetch() {
    for workers in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        let file_len = (HEADER_LEN + CS as usize) as u64;
        let cache = ChunkCache::open(dir.path(), 16 * file_len).unwrap();
        let data = bytes(64 * CS as usize, 3);
        let object = Arc::new(MemoryObject::new(data.clone()));
        let mut c = config();
        c.workers = workers;
        let src = Arc::new(RemoteSource::open(object, Some(cache.clone()), c).unwrap());
        let reader = src.clone();
        // From a thread other than the opener's: a serving thread, which starts workers.
        std::thread::spawn(move || {
            for k in 0..64 {
                let at = k * CS as usize;
                assert_eq!(
                    read(&reader, at as u64, CS as usize).unwrap(),
                    data[at..at + CS as usize]
                );
            }
        })
        .join()
        .unwrap();
        let held = || -> u64 { cache.usage().unwrap().iter().map(|o| o.bytes).sum() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while held() > 17 * file_len {
            assert!(
                Instant::now() < deadline,
                "workers={workers}: {} bytes held",
                held()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
