//! Deterministic corruption suite: thousands of damaged images, each opened, walked (every
//! inode, xattr, symlink and every file's bytes) and extracted. Every outcome must be `Ok`
//! or an `Err` with a message; a panic, a case that runs past its deadline, or an
//! allocation past a fixed bound fails the suite and names the case.
//!
//! The damage is aimed at each on-disk structure, found from the superblock (and the SIF
//! header): superblock, data blocks, inode, directory, fragment, export, id and xattr
//! tables, SIF header and descriptors. Kinds: overwritten words (0xffffffff, 0x80000000,
//! 0, 0x7fffffff), bit flips, zeroed ranges, truncation. The base images are the committed
//! tiny images, the demo SIF, a small SIF made here, and small images made here with
//! mksquashfs for the compressors the committed ones lack (lzo, lz4, xz, lzma). Inputs
//! the fuzzers found (fuzz/regressions/) run through the same pipeline.
//!
//! `CORRUPTION_VERBOSE=1` prints every case as it starts (to find the one that aborted the
//! process, should an allocation be refused outright).

mod common;
mod mount_util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use sifuse::archive::{Archive, FileKind};
use sifuse::extract::{extract, ExtractOptions};
use sifuse::image::{self, ImageSpec};
use sifuse::sif::{
    arch_code, DataType, FsType, ObjectData, PartType, PartitionInfo, SifImage, SifWriter,
    WriterObject,
};
use sifuse::walk::{walk, Event};

// ------------------------------------------------------------------ bounded allocator

/// One allocation larger than this fails the case that asked for it.
const MAX_ALLOCATION: usize = 64 << 20;
/// Larger requests are refused outright (the process aborts): granting them could take the
/// machine's memory before the case ends and is checked.
const REFUSE_ALLOCATION: usize = 1 << 30;
/// Live bytes across the whole test process, at most.
const MAX_LIVE: usize = 1 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Largest allocation past MAX_ALLOCATION made on this thread (0: none).
    static OVERSIZE: Cell<usize> = const { Cell::new(0) };
}

struct BoundedAllocator;

impl BoundedAllocator {
    fn note(&self, size: usize) -> bool {
        if size > MAX_ALLOCATION {
            let _ = OVERSIZE.try_with(|c| c.set(c.get().max(size)));
        }
        if size > REFUSE_ALLOCATION {
            return false;
        }
        let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
        PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
        true
    }
}

// SAFETY: every call goes to the system allocator with the caller's layout; the counters
// are atomics and a const-initialised thread-local that never allocates.
unsafe impl GlobalAlloc for BoundedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.note(new_size) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            LIVE.fetch_sub(new_size, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: BoundedAllocator = BoundedAllocator;

// ------------------------------------------------------------------ images and structures

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where cases write their image and extract it: tmpfs when there is one (creating a
/// few hundred files per case costs ~50x more on the disk filesystem here).
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.join(format!("sifuse-corruption-{}", std::process::id()))
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("corruption")
    };
    std::fs::create_dir_all(&base).unwrap();
    base
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const NO_TABLE: u64 = u64::MAX;

/// The named structures of a valid SquashFS image, as byte ranges, in disk order.
fn squashfs_regions(img: &[u8]) -> Vec<(String, Range<usize>)> {
    let f = |at| u64_at(img, at).expect("superblock");
    let bytes_used = f(40) as usize;
    let flags = u16::from_le_bytes([img[24], img[25]]);
    let mut starts: Vec<(usize, String)> = vec![(0, "superblock".into())];
    // Compressor options (a metadata block) follow the superblock when flagged.
    let data_start = if flags & 0x0400 != 0 {
        starts.push((96, "compressor options".into()));
        96 + 2 + (u16::from_le_bytes([img[96], img[97]]) & 0x7fff) as usize
    } else {
        96
    };
    starts.push((data_start, "data blocks".into()));
    starts.push((f(64) as usize, "inode table".into()));
    starts.push((f(72) as usize, "directory table".into()));
    for (name, field) in [("id", 48usize), ("fragment", 80), ("export", 88)] {
        let index = f(field);
        if index == NO_TABLE {
            continue;
        }
        starts.push((index as usize, format!("{name} table index")));
        if let Some(first) = u64_at(img, index as usize) {
            if first < index {
                starts.push((first as usize, format!("{name} table")));
            }
        }
    }
    let xattr = f(56);
    if xattr != NO_TABLE {
        let x = xattr as usize;
        starts.push((x, "xattr table header and index".into()));
        if let Some(kv) = u64_at(img, x) {
            starts.push((kv as usize, "xattr key/value area".into()));
        }
        if let Some(ids) = u64_at(img, x + 16) {
            starts.push((ids as usize, "xattr id table".into()));
        }
    }
    starts.retain(|(s, _)| *s < bytes_used);
    starts.sort_by_key(|(s, _)| *s);
    starts.dedup_by_key(|(s, _)| *s);
    let mut regions = Vec::new();
    for (i, (start, name)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(bytes_used, |(s, _)| *s);
        if end > *start {
            regions.push((name.clone(), *start..end));
        }
    }
    regions
}

/// The named structures of a SIF: header, descriptor table, each used descriptor, and
/// the SquashFS partition's own structures (shifted to its offset).
fn sif_regions(sif: &[u8]) -> Vec<(String, Range<usize>)> {
    let parsed = SifImage::parse(&sif.to_vec()).expect("base SIF parses");
    let h = &parsed.header;
    let table = h.descriptors_offset as usize;
    let mut regions = vec![
        ("SIF header".to_string(), 0..128),
        (
            "SIF descriptor table".to_string(),
            table..table + h.descriptors_total as usize * 585,
        ),
    ];
    for (slot, d) in parsed.descriptors.iter().enumerate() {
        let at = table + slot * 585;
        regions.push((format!("SIF descriptor {}", d.id), at..at + 585));
    }
    let part = parsed
        .select_partition(None)
        .expect("base SIF has a partition");
    let start = part.offset as usize;
    let inner = &sif[start..start + part.size as usize];
    for (name, r) in squashfs_regions(inner) {
        regions.push((format!("partition {name}"), r.start + start..r.end + start));
    }
    regions
}

/// The small tree the per-compressor images are made from: several blocks, a fragment
/// tail, a hole, a symlink, a hard link, a fifo, nested directories and an xattr.
fn make_tree(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("dir/sub")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello, squashfs\n").unwrap();
    let numbers: Vec<u8> = (0..2000)
        .flat_map(|i| format!("{i:04}\n").into_bytes())
        .collect();
    std::fs::write(root.join("dir/numbers"), &numbers).unwrap();
    let noise: Vec<u8> = (0..9000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("dir/sub/noise"), &noise).unwrap();
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(40_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", 39_000).unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    std::fs::hard_link(root.join("hello.txt"), root.join("dir/hardlink")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    for i in 0..40 {
        std::fs::write(root.join(format!("dir/f{i:02}")), format!("{i}\n")).unwrap();
    }
    // Best effort: a filesystem without user xattrs still gives a useful image.
    let _ = Command::new("setfattr")
        .args(["-n", "user.note", "-v", "corrupt me"])
        .arg(root.join("hello.txt"))
        .status();
}

/// Small images for the compressors the committed ones do not cover.
fn made_images() -> Vec<(String, Vec<u8>)> {
    let dir = scratch_root().join(format!("images-{}", std::process::id()));
    let tree = dir.join("tree");
    make_tree(&tree);
    let mut out = Vec::new();
    for comp in ["lzo", "lz4", "xz", "lzma"] {
        let img = dir.join(format!("{comp}.sqfs"));
        let status = Command::new("mksquashfs")
            .arg(&tree)
            .arg(&img)
            .args([
                "-comp",
                comp,
                "-b",
                "4K",
                "-noappend",
                "-quiet",
                "-no-progress",
            ])
            .args(["-processors", "1", "-mkfs-time", "1700000000"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run mksquashfs ({e}): install squashfs-tools \
                     (scripts/test.sh does this as root)"
                )
            });
        assert!(status.success(), "mksquashfs -comp {comp} failed");
        out.push((format!("mini-{comp}"), read(&img)));
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A small SIF around a tiny image, with a definition file before the partition.
fn small_sif(inner: &[u8]) -> Vec<u8> {
    let info = PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code("amd64").unwrap(),
    };
    let mut part = WriterObject::bytes(DataType::Partition, "rootfs", inner.to_vec());
    part.partition = Some(info);
    part.data = ObjectData::Bytes(inner.to_vec());
    let w = SifWriter {
        objects: vec![
            WriterObject::bytes(DataType::Deffile, "", b"bootstrap: scratch\n".to_vec()),
            part,
        ],
        arch: "amd64".into(),
        descriptor_slots: 4,
        ..Default::default()
    };
    let mut c = Cursor::new(Vec::new());
    w.write(&mut c).unwrap();
    c.into_inner()
}

// ------------------------------------------------------------------ cases

#[derive(Clone, Copy, Debug)]
enum Damage {
    Word { at: usize, value: u32 },
    Flip { at: usize, bit: u8 },
    Zero { range: (usize, usize) },
    Truncate { len: usize },
    None,
}

impl Damage {
    fn apply(self, base: &[u8]) -> Vec<u8> {
        let mut b = base.to_vec();
        match self {
            Damage::Word { at, value } => {
                let end = (at + 4).min(b.len());
                b[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            Damage::Flip { at, bit } => b[at] ^= 1 << bit,
            Damage::Zero { range } => b[range.0..range.1].fill(0),
            Damage::Truncate { len } => b.truncate(len),
            Damage::None => {}
        }
        b
    }
}

struct Case {
    base: usize,
    region: String,
    damage: Damage,
}

struct Base {
    name: String,
    bytes: Vec<u8>,
    /// A SIF rather than a bare SquashFS image.
    sif: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "base #{} {}: {:?}", self.base, self.region, self.damage)
    }
}

const WORDS: [u32; 4] = [0xffff_ffff, 0x8000_0000, 0, 0x7fff_ffff];

/// `n` positions spread over `r` (deterministic: even spacing plus a fixed jitter), each
/// aligned to `align`.
fn positions(r: &Range<usize>, n: usize, align: usize, salt: usize) -> Vec<usize> {
    let len = r.end - r.start;
    if len == 0 {
        return Vec::new();
    }
    let n = n.min(len.div_ceil(align));
    let mut out: Vec<usize> = (0..n)
        .map(|k| {
            let spread = len * k / n;
            let jitter = (k * 7919 + salt * 104_729) % (len / n).max(1);
            let p = r.start + ((spread + jitter) / align) * align;
            p.min(r.end - 1)
        })
        .collect();
    out.dedup();
    out
}

/// Damage for one structure: words at `n` places, bit flips, zeroed windows and halves,
/// truncation at and inside it.
fn damage_region(base: usize, name: &str, r: &Range<usize>, n: usize, cases: &mut Vec<Case>) {
    let mut push = |damage| {
        cases.push(Case {
            base,
            region: name.to_string(),
            damage,
        })
    };
    let align = if name.contains("superblock") || name.contains("header") {
        4
    } else {
        2
    };
    for (i, at) in positions(r, n, align, base).into_iter().enumerate() {
        for value in WORDS {
            push(Damage::Word { at, value });
        }
        push(Damage::Flip {
            at,
            bit: ((i * 5 + base) % 8) as u8,
        });
    }
    for at in positions(r, n / 2, 1, base + 1) {
        push(Damage::Flip {
            at,
            bit: ((at ^ base) % 8) as u8,
        });
    }
    let len = r.end - r.start;
    push(Damage::Zero {
        range: (r.start, r.end),
    });
    push(Damage::Zero {
        range: (r.start, r.start + len / 2),
    });
    push(Damage::Zero {
        range: (r.start + len / 2, r.end),
    });
    for at in positions(r, 4, 1, base + 2) {
        push(Damage::Zero {
            range: (at, (at + 64).min(r.end)),
        });
    }
    for len in [r.start, r.start + 1, r.start + len / 2, r.end - 1] {
        push(Damage::Truncate { len });
    }
}

fn cases_for(base: usize, b: &Base) -> Vec<Case> {
    let mut cases = vec![Case {
        base,
        region: "pristine".into(),
        damage: Damage::None,
    }];
    let regions = if b.sif {
        sif_regions(&b.bytes)
    } else {
        squashfs_regions(&b.bytes)
    };
    for (name, r) in &regions {
        let n = if name.ends_with("superblock") || name.starts_with("SIF header") {
            // Every word of the superblock and header.
            (r.end - r.start) / 4
        } else if name.starts_with("SIF descriptor ") {
            24
        } else if b.sif {
            // The partition's own structures are covered through the bare images.
            3
        } else {
            12
        };
        damage_region(base, name, r, n, &mut cases);
    }
    // Truncation across the whole file.
    for k in 1..16 {
        cases.push(Case {
            base,
            region: "whole file".into(),
            damage: Damage::Truncate {
                len: b.bytes.len() * k / 16,
            },
        });
    }
    cases
}

// ------------------------------------------------------------------ running a case

#[derive(Debug)]
enum Outcome {
    Ok,
    /// Where it stopped (open, walk, extract) and the error's message.
    Err(&'static str, String),
}

enum Failure {
    Panic(String),
    Timeout,
    Oversize(usize),
    EmptyMessage(&'static str),
}

/// Deadline for one case; an undamaged image takes well under a second.
const DEADLINE: Duration = Duration::from_secs(30);
/// File data read per case, at most (a damaged size field can describe a huge sparse file).
const MAX_READ: u64 = 256 << 20;

fn run_pipeline(path: &Path, work: &Path) -> Outcome {
    let img = match image::open(&ImageSpec::new(path), 256 << 10) {
        Ok(i) => i,
        Err(e) => return Outcome::Err("open", e.to_string()),
    };
    if let Err(e) = walk_everything(&img.archive) {
        return Outcome::Err("walk", e.to_string());
    }
    let opts = ExtractOptions {
        progress: false,
        owners: nix::unistd::geteuid().is_root(),
    };
    let dest = work.join("x");
    let r = extract(&img.archive, b"/", &dest, &opts);
    let _ = std::fs::remove_dir_all(&dest);
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Err("extract", e.to_string()),
    }
}

/// Every inode, xattr and symlink, and every file read to the end with `read_file_at`.
fn walk_everything(a: &Archive) -> sifuse::Result<()> {
    let mut budget = MAX_READ;
    let mut buf = vec![0u8; 50_000];
    walk(a, a.root(), b"", &mut |ev| {
        let inode = match ev {
            Event::EnterDir { inode, .. } | Event::Entry { inode, .. } => inode,
            Event::LeaveDir { .. } => return Ok(()),
        };
        a.xattrs(inode)?;
        if inode.kind == FileKind::Symlink {
            assert!(inode.symlink_target().is_some_and(|t| t.len() <= 4096));
        }
        if let Some(f) = inode.as_file() {
            let mut off = 0;
            while budget > 0 {
                let n = a.read_file_at(f, off, &mut buf)?;
                if n == 0 {
                    break;
                }
                off += n as u64;
                budget = budget.saturating_sub(n as u64);
            }
            assert!(off <= f.file_size);
        }
        Ok(())
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// Run `body` on its own thread with a deadline, catching panics and recording oversized
/// allocations made on that thread.
fn guarded<F>(body: F) -> Result<Outcome, Failure>
where
    F: FnOnce() -> Outcome + Send + 'static,
{
    guarded_for(DEADLINE, body)
}

fn guarded_for<F>(deadline: Duration, body: F) -> Result<Outcome, Failure>
where
    F: FnOnce() -> Outcome + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("corruption-case".into())
        .spawn(move || {
            OVERSIZE.with(|c| c.set(0));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let oversize = OVERSIZE.with(|c| c.get());
            let _ = tx.send((r, oversize));
        })
        .expect("spawn case thread");
    match rx.recv_timeout(deadline) {
        // The thread is left running: it cannot be stopped, and the suite fails anyway.
        Err(_) => Err(Failure::Timeout),
        Ok((Err(p), _)) => Err(Failure::Panic(panic_message(&*p))),
        Ok((Ok(_), n)) if n > 0 => Err(Failure::Oversize(n)),
        Ok((Ok(Outcome::Err(stage, msg)), _)) if msg.trim().is_empty() => {
            Err(Failure::EmptyMessage(stage))
        }
        Ok((Ok(o), _)) => Ok(o),
    }
}

struct Report {
    cases: usize,
    ok: usize,
    errors: BTreeMap<&'static str, usize>,
    /// A few error messages per stage, to show what the errors say.
    samples: BTreeMap<&'static str, Vec<String>>,
    failures: Vec<String>,
    pristine_failures: Vec<String>,
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::Panic(m) => format!("PANIC: {m}"),
        Failure::Timeout => format!("HANG: still running after {DEADLINE:?}"),
        Failure::Oversize(n) => format!("ALLOCATION of {n} bytes (bound {MAX_ALLOCATION})"),
        Failure::EmptyMessage(stage) => format!("error without a message at {stage}"),
    }
}

/// Run `cases` over `bases` on every core.
fn run_cases(bases: &Arc<Vec<Base>>, cases: Vec<Case>) -> Report {
    let verbose = std::env::var_os("CORRUPTION_VERBOSE").is_some();
    let total = cases.len();
    let queue = Arc::new(Mutex::new(cases.into_iter().enumerate()));
    let report = Arc::new(Mutex::new(Report {
        cases: total,
        ok: 0,
        errors: BTreeMap::new(),
        samples: BTreeMap::new(),
        failures: Vec::new(),
        pristine_failures: Vec::new(),
    }));
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let root = scratch_root();
    std::thread::scope(|s| {
        for w in 0..workers {
            let (queue, report, bases, root) = (&queue, &report, bases, &root);
            s.spawn(move || {
                let work = tempfile::Builder::new()
                    .prefix(&format!("worker{w}-"))
                    .tempdir_in(root)
                    .unwrap();
                loop {
                    let Some((i, case)) = queue.lock().unwrap().next() else {
                        break;
                    };
                    let base = &bases[case.base];
                    if verbose {
                        eprintln!("case {i}: {} {case}", base.name);
                    }
                    let bytes = case.damage.apply(&base.bytes);
                    let path = work.path().join("image");
                    std::fs::write(&path, &bytes).unwrap();
                    let work_dir = work.path().to_path_buf();
                    let result = guarded(move || run_pipeline(&path, &work_dir));
                    let mut rep = report.lock().unwrap();
                    let label = format!("case {i} ({} {case})", base.name);
                    match (result, matches!(case.damage, Damage::None)) {
                        (Ok(Outcome::Ok), _) => rep.ok += 1,
                        (Ok(Outcome::Err(stage, msg)), true) => rep
                            .pristine_failures
                            .push(format!("{label}: failed at {stage}: {msg}")),
                        (Ok(Outcome::Err(stage, msg)), false) => {
                            *rep.errors.entry(stage).or_default() += 1;
                            let s = rep.samples.entry(stage).or_default();
                            if s.len() < 4 && (i % 7 == 0 || stage == "extract") {
                                s.push(format!("{label}: {msg}"));
                            }
                        }
                        (Err(f), _) => rep.failures.push(format!("{label}: {}", describe(&f))),
                    }
                }
            });
        }
    });
    // Empty once every worker's directory is gone; the other test may still use it.
    let _ = std::fs::remove_dir(&root);
    Arc::try_unwrap(report)
        .ok()
        .expect("workers done")
        .into_inner()
        .unwrap()
}

fn check(report: &Report, what: &str, started: Instant) {
    eprintln!(
        "{what}: {} cases in {:.1?}: {} ok, errors by stage {:?}, {} failures; peak live heap {} MiB",
        report.cases,
        started.elapsed(),
        report.ok,
        report.errors,
        report.failures.len(),
        PEAK_LIVE.load(Ordering::Relaxed) >> 20
    );
    for (stage, msgs) in &report.samples {
        for m in msgs {
            eprintln!("  {stage} error, e.g. {m}");
        }
    }
    assert!(
        report.failures.is_empty(),
        "{what}: {} of {} cases panicked, hung or over-allocated:\n{}",
        report.failures.len(),
        report.cases,
        report.failures.join("\n")
    );
    assert!(
        report.pristine_failures.is_empty(),
        "{what}: undamaged images must open, walk and extract:\n{}",
        report.pristine_failures.join("\n")
    );
    assert!(
        PEAK_LIVE.load(Ordering::Relaxed) <= MAX_LIVE,
        "live heap peaked at {} bytes",
        PEAK_LIVE.load(Ordering::Relaxed)
    );
}

// ------------------------------------------------------------------ the tests

/// The suite's base images and every damage case aimed at them.
fn suite() -> (Arc<Vec<Base>>, Vec<Case>) {
    let mut bases = Vec::new();
    for name in ["tiny-raw", "tiny-gzip", "tiny-zstd-nofrag"] {
        bases.push(Base {
            name: name.into(),
            bytes: read(&repo().join(format!("fixtures/tiny/{name}.sqfs"))),
            sif: false,
        });
    }
    for (name, bytes) in made_images() {
        bases.push(Base {
            name,
            bytes,
            sif: false,
        });
    }
    bases.push(Base {
        name: "small.sif".into(),
        bytes: small_sif(&bases[2].bytes),
        sif: true,
    });
    bases.push(Base {
        name: "demo.sif".into(),
        bytes: read(&repo().join("fixtures/demo.sif")),
        sif: true,
    });
    let mut cases = Vec::new();
    let mut per_base = Vec::new();
    for (i, b) in bases.iter().enumerate() {
        let c = cases_for(i, b);
        per_base.push(format!("{}: {}", b.name, c.len()));
        cases.extend(c);
    }
    eprintln!("bases: {}", per_base.join(", "));
    (Arc::new(bases), cases)
}

#[test]
fn damaged_images_fail_cleanly() {
    let started = Instant::now();
    let (bases, cases) = suite();
    let report = run_cases(&bases, cases);
    check(&report, "damaged images", started);
    // The damage must bite: most cases end in an error, and some still succeed.
    let errors: usize = report.errors.values().sum();
    assert!(
        errors > report.cases / 2,
        "only {errors} of {} damaged images failed",
        report.cases
    );
    assert!(
        report.ok > bases.len(),
        "only {} cases succeeded",
        report.ok
    );
}

/// What mounting every damaged image met.
#[derive(Default)]
struct MountedReport {
    refused: usize,
    served: usize,
    /// Served cases in which some request answered EIO.
    with_eio: usize,
    failures: Vec<String>,
}

/// The server processes whose command line names something under `root`.
fn servers_under(root: &Path) -> Vec<i32> {
    let root = root.as_os_str().as_encoded_bytes();
    mount_util::pids_with_arg(|arg| arg.starts_with(root))
}

/// Mount one damaged image as a daemon, read everything it shows, and check the daemon
/// still answers; then unmount. `Err` describes a failure of sifuse.
fn mount_and_read(image: &Path, mnt: &Path, rep: &Mutex<MountedReport>) -> Result<(), String> {
    use mount_util::hammer::{read_tree, statfs_errno};
    std::fs::create_dir(mnt).unwrap();
    let out = mount_util::run_sifuse_mount(image, mnt, &["-o", "cache_size=4"]);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if mount_util::is_mounted(mnt) {
            mount_util::force_unmount(mnt);
            return Err(format!("a refused mount was left mounted: {stderr}"));
        }
        if stderr.lines().count() != 1 || !stderr.starts_with("sifuse: ") {
            return Err(format!("refused without one clear line: {stderr:?}"));
        }
        rep.lock().unwrap().refused += 1;
        return Ok(());
    }
    let seen = read_tree(mnt, MAX_READ);
    let answering = statfs_errno(mnt);
    // EOPNOTSUPP: listxattr in an image without an xattr table, as the kernel answers.
    let unexpected = seen.unexpected(&[libc::EIO, libc::EOPNOTSUPP]);
    // Not lazy: nothing may still hold the mount.
    let c = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).unwrap();
    // Another worker's fork, between fork and exec, briefly holds copies of this
    // worker's open descriptors, so EBUSY is retried for a while.
    let unmounted = (0..100).any(|_| {
        // SAFETY: a valid C string.
        let done = unsafe { libc::umount2(c.as_ptr(), 0) } == 0;
        if !done {
            std::thread::sleep(Duration::from_millis(10));
        }
        done
    });
    if !unmounted {
        mount_util::force_unmount(mnt);
    }
    if let Some(errno) = answering {
        let e = std::io::Error::from_raw_os_error(errno);
        return Err(format!("the daemon stopped answering after the read: {e}"));
    }
    if !unexpected.is_empty() {
        let first: Vec<_> = unexpected.iter().take(3).cloned().collect();
        return Err(format!(
            "{} unexpected errors, e.g. {}",
            unexpected.len(),
            first.join("; ")
        ));
    }
    if !unmounted {
        return Err("the mount was busy after the read".into());
    }
    let mut r = rep.lock().unwrap();
    r.served += 1;
    if seen.count(libc::EIO) > 0 {
        r.with_eio += 1;
    }
    Ok(())
}

/// Every damaged image of the suite, mounted by a daemon and read through the kernel: the
/// mount is refused with one clear line, or served with EIO where the damage is, and the
/// daemon answers after the full read and ends with its mount.
#[test]
fn a_mounted_daemon_survives_every_damaged_image() {
    mount_util::require_mount();
    let started = Instant::now();
    let (bases, cases) = suite();
    let total = cases.len();
    let queue = Mutex::new(cases.into_iter().enumerate());
    let report = Mutex::new(MountedReport::default());
    let root = scratch_root().join(format!("mounted-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    // Each case mostly waits on a mount, a handshake and FUSE round trips: more workers
    // than cores keep both cores busy.
    let workers = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for w in 0..workers {
            let (queue, report, bases, root) = (&queue, &report, &bases, &root);
            s.spawn(move || {
                let work = root.join(format!("w{w}"));
                std::fs::create_dir_all(&work).unwrap();
                let image = work.join("image");
                loop {
                    let Some((i, case)) = queue.lock().unwrap().next() else {
                        break;
                    };
                    let base = &bases[case.base];
                    std::fs::write(&image, case.damage.apply(&base.bytes)).unwrap();
                    let mnt = work.join(format!("m{i}"));
                    if let Err(e) = mount_and_read(&image, &mnt, report) {
                        let label = format!("case {i} ({} {case})", base.name);
                        report
                            .lock()
                            .unwrap()
                            .failures
                            .push(format!("{label}: {e}"));
                    }
                    let _ = std::fs::remove_dir(&mnt);
                }
            });
        }
    });
    // Every daemon ends once its mount is gone.
    let left = mount_util::wait_for(Duration::from_secs(10), || servers_under(&root).is_empty());
    let stray = servers_under(&root);
    for pid in &stray {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(&root);
    let r = report.into_inner().unwrap();
    eprintln!(
        "mounted: {total} cases in {:.1?}: {} refused, {} served ({} with EIO), {} failures",
        started.elapsed(),
        r.refused,
        r.served,
        r.with_eio,
        r.failures.len()
    );
    assert!(
        left,
        "daemons still running after their mounts went: {stray:?}"
    );
    assert!(
        r.failures.is_empty(),
        "{} of {total} damaged images broke the daemon:\n{}",
        r.failures.len(),
        r.failures.join("\n")
    );
    assert_eq!(r.refused + r.served, total);
    assert!(r.with_eio > 0 && r.refused > 0, "the damage never showed");
}

/// Files under fuzz/regressions/<target>/: inputs the fuzzers found. Each runs through the
/// whole pipeline (as a bare image or a SIF) and through its fuzz target's own entry point.
#[test]
fn fuzz_regressions_fail_cleanly() {
    let started = Instant::now();
    let dir = repo().join("fuzz/regressions");
    let mut inputs = Vec::new();
    for target in std::fs::read_dir(&dir).unwrap() {
        let target = target.unwrap().path();
        if !target.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&target).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "md") {
                continue;
            }
            let t = target.file_name().unwrap().to_string_lossy().into_owned();
            inputs.push((t, f));
        }
    }
    inputs.sort();
    let mut failures = Vec::new();
    for (target, path) in &inputs {
        let data = read(path);
        let label = format!("{target}/{}", path.file_name().unwrap().to_string_lossy());
        let scratch = tempfile::tempdir_in(scratch_root()).unwrap();
        let image = scratch.path().join("image");
        let bytes = if target == "inode_dir" {
            spliced_image(&data)
        } else {
            data.clone()
        };
        std::fs::write(&image, &bytes).unwrap();
        let work = scratch.path().to_path_buf();
        if let Err(f) = guarded(move || run_pipeline(&image, &work)) {
            failures.push(format!("{label} (pipeline): {}", describe(&f)));
        }
        let t = target.clone();
        if let Err(f) = guarded(move || target_entry(&t, &bytes)) {
            failures.push(format!("{label} ({target} target): {}", describe(&f)));
        }
    }
    let _ = std::fs::remove_dir(scratch_root());
    eprintln!(
        "fuzz regressions: {} inputs in {:.1?}",
        inputs.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What each fuzz target does beyond the pipeline.
fn target_entry(target: &str, data: &[u8]) -> Outcome {
    match target {
        "sif" => {
            if let Ok(sif) = SifImage::parse(&data.to_vec()) {
                let _ = sif.check_layout();
                for sel in [None, Some("1"), Some("rootfs")] {
                    if let Ok(p) = sif.select_partition(sel) {
                        assert!(p.offset >= 0 && (p.offset + p.size) as usize <= data.len());
                    }
                }
            }
            Outcome::Ok
        }
        _ => match Archive::open(Arc::new(data.to_vec()), 256 << 10) {
            Err(e) => Outcome::Err("open", e.to_string()),
            Ok(a) => {
                let sb = a.superblock().clone();
                for i in (0..sb.id_count).take(64) {
                    let _ = a.id(i);
                }
                for i in (0..sb.fragment_count).take(64) {
                    let _ = a.fragment_entry(i);
                }
                for n in (0..sb.inode_count).take(64) {
                    if let Ok(Some(r)) = a.inode_ref_by_number(n) {
                        let _ = a.inode(r);
                    }
                }
                match walk_everything(&a) {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Err("walk", e.to_string()),
                }
            }
        },
    }
}

/// The `inode_dir` fuzz target's input mapping (fuzz/src/lib.rs): the first byte picks a
/// committed tiny image, the rest is written over its inode and directory tables.
fn spliced_image(data: &[u8]) -> Vec<u8> {
    let seeds = ["tiny-raw", "tiny-gzip", "tiny-zstd-nofrag"];
    let Some((&sel, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut image = read(&repo().join(format!(
        "fixtures/tiny/{}.sqfs",
        seeds[sel as usize % seeds.len()]
    )));
    let regions = squashfs_regions(&image);
    let start = regions
        .iter()
        .find(|(n, _)| n == "inode table")
        .unwrap()
        .1
        .start;
    let end = regions
        .iter()
        .find(|(n, _)| n == "directory table")
        .unwrap()
        .1
        .end;
    let n = rest.len().min(end - start);
    image[start..start + n].copy_from_slice(&rest[..n]);
    image
}

/// The suite's own checks can fail: a panic, an oversized allocation and a hang are each
/// caught and reported, not missed.
#[test]
fn the_guards_catch_what_they_guard_against() {
    assert!(matches!(
        guarded(|| panic!("boom")),
        Err(Failure::Panic(m)) if m == "boom"
    ));
    assert!(matches!(
        guarded(|| {
            let v = vec![1u8; MAX_ALLOCATION + 1];
            assert_eq!(v.len(), MAX_ALLOCATION + 1);
            Outcome::Ok
        }),
        Err(Failure::Oversize(n)) if n == MAX_ALLOCATION + 1
    ));
    assert!(matches!(
        guarded(|| Outcome::Err("open", " ".into())),
        Err(Failure::EmptyMessage("open"))
    ));
    assert!(matches!(guarded(|| Outcome::Ok), Ok(Outcome::Ok)));
    assert!(matches!(
        guarded_for(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(2));
            Outcome::Ok
        }),
        Err(Failure::Timeout)
    ));
    // Regions cover a real image from the superblock to bytes_used, in order.
    let img = read(&repo().join("fixtures/tiny/tiny-gzip.sqfs"));
    let regions = squashfs_regions(&img);
    let names: Vec<&str> = regions.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "superblock",
        "data blocks",
        "inode table",
        "directory table",
        "fragment table",
        "export table",
        "id table",
        "xattr key/value area",
        "xattr id table",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(regions.windows(2).all(|w| w[0].1.end == w[1].1.start));
}

// ------------------------------------------------------------------ crafted images
//
// Hostile structures that random damage does not reach, each built by editing the
// uncompressed tiny image (its metadata blocks are stored, so a decoded position is the
// block's image offset + 2 + the offset inside it).

fn tiny_raw() -> Vec<u8> {
    read(&repo().join("fixtures/tiny/tiny-raw.sqfs"))
}

fn open_bytes(bytes: &[u8]) -> sifuse::Result<Archive> {
    Archive::open(Arc::new(bytes.to_vec()), 1 << 20)
}

/// Image offset of the decoded bytes of inode `path`.
fn inode_pos(a: &Archive, path: &str) -> usize {
    let inode = a.resolve(path.as_bytes()).unwrap();
    (a.superblock().inode_table + inode.iref.block()) as usize + 2 + inode.iref.offset()
}

/// Open, walk and extract `bytes` under the suite's guards; the outcome must be an error
/// whose message contains `want`.
fn assert_refused(bytes: Vec<u8>, want: &str) {
    let scratch = tempfile::tempdir_in(scratch_root()).unwrap();
    let image = scratch.path().join("image");
    std::fs::write(&image, &bytes).unwrap();
    let work = scratch.path().to_path_buf();
    match guarded(move || run_pipeline(&image, &work)) {
        Ok(Outcome::Err(_, msg)) => assert!(msg.contains(want), "{msg:?} lacks {want:?}"),
        Ok(Outcome::Ok) => panic!("the crafted image was accepted (expected {want:?})"),
        Err(f) => panic!("{}", describe(&f)),
    }
}

/// Two entries of one name: an extraction would otherwise create the second through the
/// first (a symlink to a host file followed by a regular file of the same name).
#[test]
fn crafted_duplicate_names_are_refused() {
    let mut img = tiny_raw();
    let dir_table = u64_at(&img, 72).unwrap() as usize;
    let at = dir_table
        + img[dir_table..]
            .windows(10)
            .position(|w| w == b"entry-0002")
            .expect("listing of /many");
    img[at..at + 10].copy_from_slice(b"entry-0001");
    let a = open_bytes(&img).unwrap();
    let many = a.resolve(b"/many").unwrap();
    match a.read_dir(&many) {
        Ok(list) => panic!(
            "a listing with a duplicate name read as {} entries",
            list.len()
        ),
        Err(e) => assert!(e.to_string().contains("duplicate"), "{e}"),
    }
    assert_refused(img, "duplicate");
}

/// A directory pointed at another directory's listing: without the check, a walk reads
/// the listing once per directory that shares it (hostile images multiply that).
#[test]
fn crafted_shared_listing_is_refused() {
    let mut img = tiny_raw();
    let a = open_bytes(&img).unwrap();
    let many = a.resolve(b"/many").unwrap().as_dir().unwrap().clone();
    let sub = a.resolve(b"/dir/sub").unwrap();
    assert!(!sub.extended, "/dir/sub is a basic directory inode");
    let at = inode_pos(&a, "/dir/sub");
    // Basic directory: start_block at 16, file_size (u16) at 24, offset at 26.
    img[at + 16..at + 20].copy_from_slice(&many.start_block.to_le_bytes());
    img[at + 24..at + 26].copy_from_slice(&u16::try_from(many.file_size).unwrap().to_le_bytes());
    img[at + 26..at + 28].copy_from_slice(&many.offset.to_le_bytes());
    // Each directory on its own still reads: only the walk sees the sharing.
    let b = open_bytes(&img).unwrap();
    let shared = b.resolve(b"/dir/sub").unwrap();
    assert_eq!(b.read_dir(&shared).unwrap().len(), 600);
    assert_refused(img, "appears twice");
}

/// A file whose size asks for more blocks than any real file has: it stats as the kernel
/// shows it (nothing of its block list is read for that), a read past the blocks sifuse
/// reads is refused before any list is decoded, and reading it from the start fails on the
/// metadata that follows its real list instead of growing a list from it.
#[test]
fn crafted_huge_file_is_refused() {
    let mut img = tiny_raw();
    let a = open_bytes(&img).unwrap();
    let numbers = a.resolve(b"/dir/numbers").unwrap();
    let at = inode_pos(&a, "/dir/numbers");
    // An extended file inode (it has an xattr): blocks_start u64 at 16, file_size u64 at 24.
    assert!(
        numbers.extended,
        "/dir/numbers has an xattr, so an extended inode"
    );
    img[at + 24..at + 32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let b = open_bytes(&img).unwrap();
    let huge = b.resolve(b"/dir/numbers").unwrap();
    assert_eq!(huge.size(), 1 << 50);
    let f = huge.as_file().unwrap();
    let far = sifuse::archive::inode::MAX_FILE_BLOCKS * 4096;
    match b.read_file_at(f, far, &mut [0u8; 16]) {
        Ok(n) => panic!("read {n} bytes at byte {far}"),
        Err(e) => assert!(e.to_string().contains("first"), "{e}"),
    }
    assert_refused(img, "block");
}

/// An xattr id entry claiming 2^29 attributes: the reader must not reserve for them.
#[test]
fn crafted_xattr_count_does_not_allocate() {
    let mut img = tiny_raw();
    let xattr_table = u64_at(&img, 56).unwrap() as usize;
    let block = u64_at(&img, xattr_table + 16).unwrap() as usize;
    for entry in 0..2 {
        let e = block + 2 + 16 * entry;
        img[e + 8..e + 12].copy_from_slice(&0x1fff_ffffu32.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    let scratch = tempfile::tempdir_in(scratch_root()).unwrap();
    let image = scratch.path().join("image");
    std::fs::write(&image, &img).unwrap();
    let work = scratch.path().to_path_buf();
    match guarded(move || run_pipeline(&image, &work)) {
        Ok(Outcome::Err(..)) => {}
        Ok(Outcome::Ok) => panic!("2^29 xattrs accepted"),
        Err(f) => panic!("{}", describe(&f)),
    }
}

/// An export table whose index is too large to load whole (a hostile inode count makes
/// one) is read entry by entry, and answers as the loaded index does.
#[test]
fn crafted_large_export_index_reads_lazily() {
    let pristine = tiny_raw();
    let a = open_bytes(&pristine).unwrap();
    let mut img = pristine.clone();
    let export_index = u64_at(&img, 88).unwrap() as usize;
    let first_block = u64_at(&img, export_index).unwrap();
    // 8193 index entries (one past what is loaded whole), all naming the first block.
    let blocks = 8193u64;
    let new_index = img.len() as u64;
    for _ in 0..blocks {
        img.extend_from_slice(&first_block.to_le_bytes());
    }
    let inode_count = u32::try_from(blocks * 8192 / 8).unwrap();
    img[4..8].copy_from_slice(&inode_count.to_le_bytes());
    let bytes_used = img.len() as u64;
    img[40..48].copy_from_slice(&bytes_used.to_le_bytes());
    img[88..96].copy_from_slice(&new_index.to_le_bytes());
    let b = open_bytes(&img).unwrap();
    for n in 1..=a.superblock().inode_count {
        assert_eq!(
            b.inode_ref_by_number(n).unwrap(),
            a.inode_ref_by_number(n).unwrap(),
            "inode {n}"
        );
    }
    // An index entry pointing outside the image is still refused.
    let last = new_index as usize + (blocks as usize - 1) * 8;
    img[last..last + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let c = open_bytes(&img).unwrap();
    let e = c.inode_ref_by_number(inode_count).unwrap_err().to_string();
    assert!(e.contains("outside the image"), "{e}");
}
