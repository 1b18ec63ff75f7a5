use super::*;

use std::os::unix::fs::PermissionsExt;

/// Four pages a chunk.
const CS: u32 = 4 * PAGE_SIZE;

fn meta(validator: &str, len: u64) -> ObjectMeta {
    ObjectMeta {
        address: "https://example.invalid/image.sif".into(),
        validator: validator.into(),
        len,
        chunk_size: CS,
    }
}

fn payload(index: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 7 + index * 13) as u8)
        .collect()
}

/// Write all of chunk `index` through a claim, as a fetcher does.
fn put(chunks: &ObjectChunks, index: u64) {
    match chunks.claim(index) {
        ClaimResult::Mine(c) => assert!(
            c.commit(&[(0, &payload(index, chunks.meta().chunk_len(index)))]),
            "chunk {index} not written"
        ),
        other => panic!("chunk {index}: expected to claim it, got {other:?}"),
    }
}

/// Add `data` to chunk `index` from page `first` on, through a claim, as a fetcher does;
/// true when the pages are in the cache.
fn add_pages(chunks: &ObjectChunks, index: u64, first: u32, data: &[u8]) -> bool {
    match chunks.claim(index) {
        ClaimResult::Mine(c) => c.commit(&[(first, data)]),
        other => panic!("chunk {index}: expected to claim it, got {other:?}"),
    }
}

/// All of chunk `index`, verified, as a reader gets it; a damaged file is dropped.
fn read(chunks: &ObjectChunks, index: u64) -> Option<Vec<u8>> {
    let stored = chunks.open_chunk(index)?;
    let pages = chunks.meta().pages_in(index);
    if !stored.present().covers(0..pages) {
        return None;
    }
    let mut out = Vec::new();
    match stored.read_pages(0..pages, &mut out) {
        Ok(()) => Some(out),
        Err(why) => {
            chunks.drop_damaged(index, stored.file(), &why);
            None
        }
    }
}

impl ObjectChunks {
    /// How many chunk files are kept open.
    pub(crate) fn kept_open(&self) -> usize {
        self.kept.lock().unwrap().len()
    }

    /// True when every page of chunk `index` is in the cache.
    pub(crate) fn contains(&self, index: u64) -> bool {
        self.open_chunk(index)
            .is_some_and(|c| c.present().covers(0..self.meta().pages_in(index)))
    }
}

fn chunk_path(cache: &ChunkCache, chunks: &ObjectChunks, index: u64) -> PathBuf {
    cache.path().join(chunks.key_hex()).join(chunk_name(index))
}

fn setup(len: u64) -> (tempfile::TempDir, Arc<ChunkCache>, ObjectChunks) {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 30).unwrap();
    let chunks = cache.object(meta("\"v1\"", len)).unwrap();
    (dir, cache, chunks)
}

#[test]
fn a_committed_chunk_reads_back_verified_and_the_short_last_one_too() {
    let (_d, cache, chunks) = setup(3 * CS as u64 + 100);
    assert_eq!(read(&chunks, 0), None);
    put(&chunks, 0);
    put(&chunks, 3);
    assert_eq!(read(&chunks, 0).unwrap(), payload(0, CS as usize));
    assert_eq!(read(&chunks, 3).unwrap(), payload(3, 100));
    assert!(chunks.contains(0) && chunks.contains(3) && !chunks.contains(1));
    let on_disk = std::fs::read(chunk_path(&cache, &chunks, 3)).unwrap();
    assert_eq!(on_disk.len(), HEADER_LEN + 100);
    // The header names the object version and the chunk.
    assert_eq!(&on_disk[8..40], &chunks.key.0);
    assert_eq!(&on_disk[..8], MAGIC);
    // No claim file is left behind.
    let names = std::fs::read_dir(cache.path().join(chunks.key_hex()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
}

#[test]
fn damaged_chunks_are_removed_never_served() {
    let (_d, cache, chunks) = setup(8 * CS as u64);
    type Damage = fn(&Path, &Path);
    let damages: [(&str, Damage); 7] = [
        ("one header byte flipped", |p, _| {
            let mut b = std::fs::read(p).unwrap();
            b[70] ^= 1;
            std::fs::write(p, b).unwrap();
        }),
        ("one data byte flipped", |p, _| {
            let mut b = std::fs::read(p).unwrap();
            b[HEADER_LEN + 10] ^= 1;
            std::fs::write(p, b).unwrap();
        }),
        ("truncated", |p, _| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len((HEADER_LEN + 100) as u64).unwrap();
        }),
        ("torn: the second half zeroed", |p, _| {
            let mut b = std::fs::read(p).unwrap();
            let n = b.len();
            b[n / 2..].fill(0);
            std::fs::write(p, b).unwrap();
        }),
        ("too long", |p, _| {
            let mut b = std::fs::read(p).unwrap();
            b.push(0);
            std::fs::write(p, b).unwrap();
        }),
        ("empty", |p, _| std::fs::write(p, b"").unwrap()),
        (
            "another chunk's file, whole and valid, in its place",
            |p, other| {
                std::fs::copy(other, p).unwrap();
            },
        ),
    ];
    put(&chunks, 1);
    put(&chunks, 2);
    for (what, damage) in damages {
        let p = chunk_path(&cache, &chunks, 1);
        damage(&p, &chunk_path(&cache, &chunks, 2));
        assert_eq!(read(&chunks, 1), None, "{what}: served");
        assert!(!p.exists(), "{what}: the damaged file stays");
        // Fetched again, it is served.
        put(&chunks, 1);
        assert_eq!(read(&chunks, 1).unwrap(), payload(1, CS as usize), "{what}");
    }
}

#[test]
fn another_version_never_sees_these_chunks() {
    let (_d, cache, v1) = setup(2 * CS as u64);
    put(&v1, 0);
    let v2 = cache.object(meta("\"v2\"", 2 * CS as u64)).unwrap();
    assert_ne!(v1.key_hex(), v2.key_hex());
    assert_eq!(read(&v2, 0), None);
    // Even a v1 file copied into v2's place is refused: its header names v1.
    std::fs::copy(chunk_path(&cache, &v1, 0), chunk_path(&cache, &v2, 0)).unwrap();
    assert_eq!(read(&v2, 0), None);
    // A different length is another version too.
    let longer = cache.object(meta("\"v1\"", 3 * CS as u64)).unwrap();
    assert_ne!(v1.key_hex(), longer.key_hex());
}

#[test]
fn pages_are_added_to_a_chunk_and_the_ones_held_kept() {
    let (_d, cache, chunks) = setup(3 * CS as u64);
    let p = PAGE_SIZE as usize;
    let all = payload(1, CS as usize);
    // Page 2, then pages 0..1: the file keeps both, and never held page 3.
    assert!(add_pages(&chunks, 1, 2, &all[2 * p..3 * p]));
    assert!(add_pages(&chunks, 1, 0, &all[..p]));
    let stored = chunks.open_chunk(1).unwrap();
    assert!(stored.present().covers(0..1) && stored.present().covers(2..3));
    assert!(!stored.present().contains(1) && !stored.present().contains(3));
    assert_eq!(stored.present().missing_runs(0..4), vec![1..2, 3..4]);
    let mut out = Vec::new();
    stored.read_pages(2..3, &mut out).unwrap();
    assert_eq!(out, &all[2 * p..3 * p]);
    stored.read_pages(0..1, &mut out).unwrap();
    assert_eq!(out, &all[..p]);
    // The file is sparse: the pages it does not hold take no space.
    let st = std::fs::metadata(chunk_path(&cache, &chunks, 1)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        st.blocks() * 512 <= (HEADER_LEN + 3 * p) as u64,
        "{} blocks",
        st.blocks()
    );
    // Pages that would pass the chunk's end are refused, and nothing is written.
    assert!(!add_pages(&chunks, 1, 3, &all[..2 * p]));
    assert!(!chunks.open_chunk(1).unwrap().present().contains(3));
}

/// The chunk a reader of `pages` of chunk `index` gets.
fn reading(chunks: &ObjectChunks, index: u64, pages: Range<u32>) -> Arc<StoredChunk> {
    chunks
        .chunk_for(index, std::slice::from_ref(&pages))
        .expect("the chunk is in the cache")
}

/// A chunk read again is read from its file kept open, until that file is replaced (a
/// writer added pages) or removed; pages read from a kept file are still verified every
/// time.
#[test]
fn chunk_files_are_kept_open_for_reading_until_replaced_or_removed() {
    use std::os::unix::fs::FileExt;
    let (_d, cache, chunks) = setup(3 * CS as u64);
    let p = PAGE_SIZE as usize;
    let all = payload(1, CS as usize);
    assert!(add_pages(&chunks, 1, 0, &all[..2 * p]));
    let first = reading(&chunks, 1, 0..2);
    assert!(Arc::ptr_eq(&first, &reading(&chunks, 1, 0..1)));
    // Another process adds pages 2..4.
    let other = cache.object(meta("\"v1\"", 3 * CS as u64)).unwrap();
    assert!(add_pages(&other, 1, 2, &all[2 * p..]));
    // Its new file took the old one's place: the file kept is let go, and the new one
    // read, and kept in turn.
    let second = reading(&chunks, 1, 1..2);
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(Arc::ptr_eq(&second, &reading(&chunks, 1, 0..4)));
    let mut out = Vec::new();
    second.read_pages(0..4, &mut out).unwrap();
    assert_eq!(out, all);
    // A byte flipped in the file kept open is found when its page is read.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(chunk_path(&cache, &chunks, 1))
        .unwrap();
    f.write_all_at(&[all[3 * p + 5] ^ 1], (HEADER_LEN + 3 * p + 5) as u64)
        .unwrap();
    let kept = reading(&chunks, 1, 3..4);
    assert!(Arc::ptr_eq(&second, &kept));
    assert!(kept.read_pages(3..4, &mut out).is_err());
    assert!(kept.read_pages(0..3, &mut out).is_ok());
    // A file removed (evicted, pruned) is let go, not read through the descriptor kept.
    std::fs::remove_file(chunk_path(&cache, &chunks, 1)).unwrap();
    assert!(chunks.chunk_for(1, std::slice::from_ref(&(0..1))).is_none());
}

#[test]
fn at_most_a_few_chunk_files_are_kept_open() {
    let (_d, _cache, chunks) = setup(40 * CS as u64);
    for index in 0..40 {
        put(&chunks, index);
        reading(&chunks, index, 0..4);
    }
    let kept = chunks.kept.lock().unwrap();
    assert_eq!(kept.len(), KEPT_OPEN);
    // The most recently used.
    assert!(kept
        .iter()
        .all(|(index, _)| *index >= 40 - KEPT_OPEN as u64));
    drop(kept);
    // An idle server lets go of them all.
    chunks.let_go_kept();
    assert!(chunks.kept.lock().unwrap().is_empty());
}

#[test]
fn a_claim_excludes_other_fetchers_until_committed_or_given_up() {
    let (_d, cache, chunks) = setup(4 * CS as u64);
    // A second handle on the same object claims as another process would: flock
    // conflicts between open file descriptions, within a process too.
    let other = cache.object(chunks.meta().clone()).unwrap();
    let ClaimResult::Mine(claim) = chunks.claim(0) else {
        panic!("first claim refused")
    };
    assert!(matches!(other.claim(0), ClaimResult::Busy));
    assert!(
        matches!(other.claim(1), ClaimResult::Mine(_)),
        "claims are per chunk"
    );
    drop(claim); // the fetch failed
    let ClaimResult::Mine(claim) = other.claim(0) else {
        panic!("a claim given up did not pass on")
    };
    assert!(matches!(chunks.claim(0), ClaimResult::Busy));
    claim.commit(&[(0, &payload(0, CS as usize))]);
    assert_eq!(read(&chunks, 0).unwrap(), payload(0, CS as usize));
    assert!(matches!(chunks.claim(0), ClaimResult::Mine(_)));
}

#[test]
fn a_waiter_gets_the_claim_once_the_fetcher_is_done_or_times_out() {
    let (_d, cache, chunks) = setup(4 * CS as u64);
    let other = cache.object(chunks.meta().clone()).unwrap();
    std::thread::scope(|s| {
        let ClaimResult::Mine(claim) = chunks.claim(0) else {
            panic!()
        };
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            claim.commit(&[(0, &payload(0, CS as usize))]);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(other.wait_for(0, deadline), WaitResult::Mine(_)));
        // What the other fetcher wrote is there for the waiter.
        assert_eq!(read(&other, 0).unwrap(), payload(0, CS as usize));
    });
    // A stuck fetcher: the wait ends at its deadline.
    let ClaimResult::Mine(_stuck) = chunks.claim(2) else {
        panic!()
    };
    let t = Instant::now();
    let r = other.wait_for(2, Instant::now() + Duration::from_millis(150));
    assert!(matches!(r, WaitResult::TimedOut), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

fn set_mtime(path: &Path, secs_ago: u64) {
    let t = SystemTime::now() - Duration::from_secs(secs_ago);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(t).unwrap();
}

#[test]
fn eviction_removes_the_least_recently_used_down_to_the_budget() {
    let (_d, cache, chunks) = setup(10 * CS as u64);
    for i in 0..10 {
        put(&chunks, i);
        // Chunk 0 is the oldest, 9 the newest.
        set_mtime(&chunk_path(&cache, &chunks, i), 10_000 - i * 100);
    }
    // Reading chunk 0 makes it the most recently used.
    assert!(read(&chunks, 0).is_some());
    let file_len = (HEADER_LEN + CS as usize) as u64;
    let report = cache.evict_to(6 * file_len).unwrap();
    assert_eq!(report.bytes_before, 10 * file_len);
    assert_eq!(report.bytes_after, 6 * file_len);
    assert_eq!(report.removed_chunks, 4);
    let kept: Vec<u64> = (0..10).filter(|&i| chunks.contains(i)).collect();
    assert_eq!(kept, vec![0, 5, 6, 7, 8, 9]);
    // Everything: the object directory goes too, and comes back when written again.
    cache.evict_to(0).unwrap();
    assert!(!cache.path().join(chunks.key_hex()).exists());
    put(&chunks, 3);
    assert_eq!(read(&chunks, 3).unwrap(), payload(3, CS as usize));
}

#[test]
fn writing_past_the_budget_makes_an_eviction_pass_due() {
    let dir = tempfile::tempdir().unwrap();
    let file_len = (HEADER_LEN + CS as usize) as u64;
    let cache = ChunkCache::open(dir.path(), 16 * file_len).unwrap();
    let chunks = cache.object(meta("\"v1\"", 100 * CS as u64)).unwrap();
    for i in 0..100 {
        put(&chunks, i);
        // The commit only makes the pass due: the writer runs it once it has let go of
        // its chunks.
        if cache.eviction_due() {
            cache.evict_if_due();
            assert!(!cache.eviction_due());
        }
    }
    let held: u64 = cache.usage().unwrap().iter().map(|o| o.bytes).sum();
    // At most the budget, plus what one process writes between two passes.
    assert!(held <= 16 * file_len + file_len, "{held} bytes held");
    assert!(chunks.contains(99), "the newest chunk was evicted");
}

#[test]
fn pruning_while_a_reader_holds_a_chunk_is_safe() {
    let (_d, cache, chunks) = setup(2 * CS as u64);
    put(&chunks, 0);
    // A reader in the middle of reading chunk 0 holds it open.
    let held = chunks.open_chunk(0).unwrap();
    cache.evict_to(0).unwrap();
    let mut out = Vec::new();
    held.read_pages(0..4, &mut out).unwrap();
    assert_eq!(out, payload(0, CS as usize), "the open chunk changed");
    // The next reader finds nothing, fetches again, and is served.
    assert_eq!(read(&chunks, 0), None);
    put(&chunks, 0);
    assert_eq!(read(&chunks, 0).unwrap(), payload(0, CS as usize));
}

#[test]
fn stale_claim_files_are_cleared_and_live_ones_kept() {
    let (_d, cache, chunks) = setup(4 * CS as u64);
    let objdir = cache.path().join(chunks.key_hex());
    // Debris of a crashed fetcher: a .part file nobody holds, long unchanged.
    std::fs::write(objdir.join(part_name(1)), b"half a chunk").unwrap();
    set_mtime(&objdir.join(part_name(1)), 3600);
    // A live fetch, just as old.
    let ClaimResult::Mine(_live) = chunks.claim(2) else {
        panic!()
    };
    set_mtime(&objdir.join(part_name(2)), 3600);
    let report = cache.evict_to(u64::MAX).unwrap();
    assert_eq!(report.removed_parts, 1);
    assert!(!objdir.join(part_name(1)).exists());
    assert!(objdir.join(part_name(2)).exists());
    // A claim over debris truncates it and writes a whole chunk.
    std::fs::write(objdir.join(part_name(3)), vec![0xaa; 3 * CS as usize]).unwrap();
    put(&chunks, 3);
    assert_eq!(read(&chunks, 3).unwrap(), payload(3, CS as usize));
}

#[test]
fn a_directory_others_could_write_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(base.path(), 1 << 20).unwrap();
    let mine = cache.path().to_path_buf();
    drop(cache);
    let mode = std::fs::metadata(&mine).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);

    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o770)).unwrap();
    let e = ChunkCache::open(base.path(), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("lets other users in"), "{e}");
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A symbolic link in its place (to a directory someone else prepared) is not followed.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::rename(&mine, elsewhere.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path().join("moved"), &mine).unwrap();
    assert!(ChunkCache::open(base.path(), 1 << 20).is_err());
    std::fs::remove_file(&mine).unwrap();

    if nix::unistd::geteuid().is_root() {
        // Owned by another user: refused even by root, whose cache it is not.
        std::fs::create_dir(&mine).unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&mine, Some(54321), None).unwrap();
        let e = ChunkCache::open(base.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("owned by uid 54321"), "{e}");
    }
}

#[test]
fn a_chunk_file_of_another_owner_is_not_served() {
    if !nix::unistd::geteuid().is_root() {
        // Only root can make a file owned by someone else; say so instead of passing.
        panic!("this test needs root (it chowns a chunk file)");
    }
    let (_d, cache, chunks) = setup(2 * CS as u64);
    put(&chunks, 0);
    std::os::unix::fs::chown(chunk_path(&cache, &chunks, 0), Some(54321), None).unwrap();
    assert_eq!(read(&chunks, 0), None);
}

#[test]
fn an_unwritable_cache_still_lets_fetches_through() {
    let (_d, cache, chunks) = setup(2 * CS as u64);
    put(&chunks, 0);
    // The object's directory is replaced by a file: nothing can be written there, even
    // by root.
    let objdir = cache.path().join(chunks.key_hex());
    std::fs::remove_dir_all(&objdir).unwrap();
    std::fs::write(&objdir, b"not a directory").unwrap();
    match chunks.claim(1) {
        ClaimResult::Mine(c) => assert!(!c.commit(&[(0, &payload(1, CS as usize))])),
        other => panic!("{other:?}"),
    }
    assert!(cache.writes_paused());
    // While paused, claims are granted at once and write nothing.
    assert!(matches!(chunks.claim(1), ClaimResult::Mine(_)));
    assert_eq!(read(&chunks, 1), None);
}

#[test]
fn the_default_directory_follows_the_environment() {
    // One test sets the variables, so no other test races with it.
    let saved: Vec<_> = ["SIFUSE_CACHE_DIR", "XDG_CACHE_HOME", "HOME"]
        .iter()
        .map(|k| (k, std::env::var_os(k)))
        .collect();
    let set = |k: &str, v: Option<&str>| match v {
        Some(v) => std::env::set_var(k, v),
        None => std::env::remove_var(k),
    };
    set("SIFUSE_CACHE_DIR", Some("/a"));
    set("XDG_CACHE_HOME", Some("/b"));
    set("HOME", Some("/c"));
    assert_eq!(default_cache_dir().unwrap(), PathBuf::from("/a"));
    set("SIFUSE_CACHE_DIR", Some("relative"));
    assert_eq!(default_cache_dir().unwrap(), PathBuf::from("/b/sifuse"));
    set("XDG_CACHE_HOME", None);
    assert_eq!(
        default_cache_dir().unwrap(),
        PathBuf::from("/c/.cache/sifuse")
    );
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}

#[test]
fn sizes_parse_with_binary_units() {
    assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
    assert_eq!(parse_size("10G").unwrap(), 10 << 30);
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_size("1.5k").unwrap(), 1536);
    assert_eq!(parse_size("0").unwrap(), 0);
    assert!(parse_size("10X").is_err());
    assert!(parse_size("G").is_err());
    assert!(parse_size("-1G").is_err());
    assert!(parse_size("99999999999T").is_err());
}
