//! What the fuzz targets share: driving every public read path of an archive, and building
//! the spliced images of the `inode_dir` target. A finding is a panic, an abort, a timeout,
//! or an allocation past libFuzzer's `-malloc_limit_mb`; errors are the expected outcome.

use std::sync::{Arc, OnceLock};

use sifuse::archive::{Archive, FileKind, Inode};
use sifuse::sif::{has_sif_magic, SifImage};
use sifuse::walk::{walk, Event};

/// Cache budget: small, so eviction and reloading are exercised too.
pub const CACHE_BYTES: u64 = 256 << 10;

/// A hostile image may legitimately hold a huge sparse file; stop reading file data after
/// this many bytes per input so one input cannot hold the fuzzer for minutes.
const MAX_READ_PER_INPUT: u64 = 64 << 20;
/// Entries visited per input, for the same reason.
const MAX_ENTRIES: usize = 20_000;

/// The SquashFS bytes of `data`: the selected partition of a SIF, or `data` itself.
pub fn squashfs_bytes(data: &[u8]) -> Option<Vec<u8>> {
    if has_sif_magic(data) {
        let sif = SifImage::parse(&data.to_vec()).ok()?;
        let part = sif.select_partition(None).ok()?;
        let start = usize::try_from(part.offset).ok()?;
        let end = start.checked_add(usize::try_from(part.size).ok()?)?;
        return data.get(start..end).map(<[u8]>::to_vec);
    }
    Some(data.to_vec())
}

/// Open `bytes` as an archive; `None` on any error.
pub fn open(bytes: Vec<u8>) -> Option<Archive> {
    Archive::open(Arc::new(bytes), CACHE_BYTES).ok()
}

/// Everything about one inode that does not need its data.
fn inode_metadata(a: &Archive, inode: &Inode) {
    let _ = a.xattrs(inode);
    let _ = a.stat_blocks(inode);
    let _ = (
        inode.mode(),
        inode.size(),
        inode.blocks_512(),
        inode.device_numbers(),
    );
    let _ = a.inode_ref_by_number(inode.number);
    if let Some(t) = inode.symlink_target() {
        assert!(t.len() <= 4096, "symlink target of {} bytes", t.len());
    }
}

/// Read a regular file to the end (or to the per-input budget), through `read_file_at`
/// with an odd buffer size so reads straddle blocks.
fn read_file(a: &Archive, inode: &Inode, budget: &mut u64) {
    let Some(f) = inode.as_file() else { return };
    let mut buf = vec![0u8; 70_001];
    let mut off = 0u64;
    while *budget > 0 {
        match a.read_file_at(f, off, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                assert!(n <= buf.len());
                off += n as u64;
                *budget = budget.saturating_sub(n as u64);
            }
        }
    }
    assert!(
        off <= f.file_size,
        "read {off} bytes of a {}-byte file",
        f.file_size
    );
}

/// Walk the whole tree: every entry's inode, xattrs and symlink; with `data`, every
/// file's bytes. Also look every name up again through the directory index.
pub fn exercise(a: &Archive, data: bool) {
    let mut budget = MAX_READ_PER_INPUT;
    let mut entries = 0usize;
    let _ = walk(a, a.root(), b"", &mut |ev| {
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(sifuse::Error::Corrupt("entry budget".into()));
        }
        match ev {
            Event::EnterDir { inode, .. } => {
                inode_metadata(a, inode);
                if let Ok(list) = a.read_dir(inode) {
                    for e in list.iter().take(64) {
                        let found = a.lookup(inode, &e.name);
                        if let Ok(Some(f)) = found {
                            assert_eq!(f.name, e.name);
                        }
                    }
                    let _ = a.lookup(inode, b"\xffno-such-name");
                    let _ = a.lookup(inode, b"");
                }
            }
            Event::Entry { inode, .. } => {
                inode_metadata(a, inode);
                if data && inode.kind == FileKind::File {
                    read_file(a, inode, &mut budget);
                }
            }
            Event::LeaveDir { .. } => {}
        }
        Ok(())
    });
    for path in [
        &b"/dir/numbers"[..],
        b"/hello.txt",
        b"/many/entry-0300",
        b"/bin/sh",
    ] {
        if let Ok(inode) = a.resolve(path) {
            inode_metadata(a, &inode);
        }
    }
}

/// The committed tiny images the `inode_dir` target splices its input into.
pub const SEEDS: [&[u8]; 3] = [
    include_bytes!("../../fixtures/tiny/tiny-raw.sqfs"),
    include_bytes!("../../fixtures/tiny/tiny-gzip.sqfs"),
    include_bytes!("../../fixtures/tiny/tiny-zstd-nofrag.sqfs"),
];

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `[start, end)` of the inode and directory tables of a (valid) image: from the inode
/// table to the first metadata block of whichever table follows the directory table.
pub fn inode_dir_region(image: &[u8]) -> (usize, usize) {
    let inode_table = u64_at(image, 64).expect("superblock") as usize;
    let dir_table = u64_at(image, 72).expect("superblock");
    let mut end = u64_at(image, 40).expect("superblock"); // bytes_used
                                                          // id, xattr, fragment, export: each index's first entry is where that table's metadata
                                                          // starts; the xattr table header's first word is where its key/value area starts.
    for field in [48usize, 56, 80, 88] {
        let at = u64_at(image, field).expect("superblock");
        if at == u64::MAX {
            continue;
        }
        if let Some(first) = u64_at(image, at as usize) {
            if first > dir_table && first < end {
                end = first;
            }
        }
        if at > dir_table && at < end {
            end = at;
        }
    }
    (inode_table, end as usize)
}

/// The seed image chosen by the first byte of `data`, with the rest of `data` written over
/// its inode and directory tables (as far as it reaches).
pub fn spliced_image(data: &[u8]) -> Option<Vec<u8>> {
    static REGIONS: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    let regions = REGIONS.get_or_init(|| SEEDS.iter().map(|s| inode_dir_region(s)).collect());
    let (&sel, rest) = data.split_first()?;
    let which = sel as usize % SEEDS.len();
    let mut image = SEEDS[which].to_vec();
    let (start, end) = regions[which];
    let n = rest.len().min(end - start);
    image[start..start + n].copy_from_slice(&rest[..n]);
    Some(image)
}

/// Page through every directory the way the mount's readdir does, in pages of several
/// sizes, and check the pages against the whole listing; resume a fresh archive at a
/// reported position and check it continues there.
pub fn page_directories(bytes: &[u8]) {
    let Some(a) = open(bytes.to_vec()) else {
        return;
    };
    let mut entries = 0usize;
    let _ = walk(&a, a.root(), b"", &mut |ev| {
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(sifuse::Error::Corrupt("entry budget".into()));
        }
        let Event::EnterDir { inode, .. } = ev else {
            return Ok(());
        };
        let whole = a.read_dir(inode).ok();
        for page in [1usize, 7, 100] {
            let mut names: Vec<Vec<u8>> = Vec::new();
            let mut positions = Vec::new();
            let mut from = 0u64;
            let complete = loop {
                let mut taken = 0;
                let mut last = from;
                let r = a.list_from(inode, from, |e, after| {
                    if taken == page || names.len() >= MAX_ENTRIES {
                        return false;
                    }
                    assert!(after > last, "positions must grow: {after} after {last}");
                    names.push(e.name.to_vec());
                    positions.push(after);
                    taken += 1;
                    last = after;
                    true
                });
                if r.is_err() || names.len() >= MAX_ENTRIES {
                    break false;
                }
                if taken == 0 {
                    break true;
                }
                from = last;
            };
            if let (true, Some(whole)) = (complete, &whole) {
                let expected: Vec<&[u8]> = whole.iter().map(|e| e.name.as_slice()).collect();
                let got: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
                assert_eq!(got, expected, "pages of {page} differ from the whole listing");
            }
            // A fresh reader resumes at a reported position without the remembered seek.
            if let Some(i) = positions.len().checked_sub(2).map(|i| i / 2) {
                if let Some(fresh) = open(bytes.to_vec()) {
                    if let Ok(dir) = fresh.inode(inode.iref) {
                        let mut next = None;
                        let r = fresh.list_from(&dir, positions[i], |e, _| {
                            next = Some(e.name.to_vec());
                            false
                        });
                        if r.is_ok() && next.is_some() {
                            assert_eq!(next.as_deref(), Some(names[i + 1].as_slice()));
                        }
                    }
                }
            }
        }
        Ok(())
    });
}

/// Every inode's xattrs the way the mount asks for them: the list of names, then each
/// value by name, which must match the whole set when that is readable, and a name that
/// is not there.
pub fn look_up_xattrs(bytes: &[u8]) {
    let Some(a) = open(bytes.to_vec()) else {
        return;
    };
    let mut entries = 0usize;
    let _ = walk(&a, a.root(), b"", &mut |ev| {
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(sifuse::Error::Corrupt("entry budget".into()));
        }
        let inode = match ev {
            Event::EnterDir { inode, .. } | Event::Entry { inode, .. } => inode,
            Event::LeaveDir { .. } => return Ok(()),
        };
        let whole = a.xattrs(inode).ok();
        if let Ok(names) = a.xattr_names(inode, |_| true) {
            assert!(names.len() <= sifuse::archive::xattr::MAX_XATTR_LIST);
            for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()).take(64) {
                let value = a.xattr_value(inode, name);
                if let (Ok(v), Some(whole)) = (&value, &whole) {
                    let first = whole.iter().find(|x| x.name == name).map(|x| &x.value);
                    assert_eq!(v.as_ref(), first, "value of {:?}", String::from_utf8_lossy(name));
                }
            }
        }
        let _ = a.xattr_value(inode, b"user.\xffno-such-name");
        Ok(())
    });
}
