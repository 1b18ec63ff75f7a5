//! Images built to exhaust a server: one inode with 60,000 out-of-line xattrs sharing one
//! 64 KiB value, files of four million sparse blocks, directories of a million entries,
//! and more nodes than the node table holds. Whatever the image, the daemon's peak RSS
//! stays within `cache_size` + 96 MiB and every request answers: the mounted tests read
//! the daemon's VmHWM after the work. The library tests check the same bounds without a
//! mount.

mod common;
mod craft;
mod mount_util;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use craft::{build, Node, Options, XattrBomb};
use mount_util::hammer::assert_peak_within_budget;
use mount_util::{require_mount, scratch, KernelMount, SifuseMount};
use sifuse::source::CountingSource;
use sifuse::{Archive, Error};

/// sifuse's default cache budget.
const DEFAULT_CACHE: u64 = 64 << 20;

fn names(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}{i:07}").into_bytes())
        .collect()
}

fn empty_files(prefix: &str, n: usize) -> Node {
    Node::dir(
        names(prefix, n)
            .into_iter()
            .map(|name| (name, Node::SparseFile { size: 0 })),
    )
}

fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn open(bytes: Vec<u8>, cache: u64) -> Archive {
    Archive::open(Arc::new(bytes), cache).unwrap()
}

/// getxattr(2)/listxattr(2) on a path: the value or list, or the errno.
fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 1 << 17];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(path: &Path) -> Result<Vec<u8>, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 17];
    // SAFETY: a valid C string and a buffer of the given length.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn xattr_bomb() -> Vec<u8> {
    build(
        Node::dir([(b"f".to_vec(), Node::SparseFile { size: 10 })]),
        Options {
            xattrs: Some(XattrBomb {
                pairs: 60_000,
                value_len: 65536,
            }),
            ..Options::default()
        },
    )
}

/// Files of 4 Mi sparse 4 KiB blocks: each block list is 16 MiB, which compresses to
/// almost nothing.
fn block_list_bomb(files: usize) -> Vec<u8> {
    build(
        Node::dir(
            names("f", files)
                .into_iter()
                .map(|n| (n, Node::SparseFile { size: 4096 << 22 })),
        ),
        Options::default(),
    )
}

/// The crafted images are what the kernel reads: the writer is checked against the oracle.
#[test]
fn craft_selfcheck() {
    require_mount();
    let dir = scratch("craft");
    let tree = Node::dir([
        (b"big".to_vec(), empty_files("e", 3000)),
        (b"sparse".to_vec(), Node::SparseFile { size: 5 << 20 }),
        (
            b"sub".to_vec(),
            Node::dir([(b"x".to_vec(), Node::SparseFile { size: 1 })]),
        ),
    ]);
    for (name, opts) in [
        ("indexed", Options::default()),
        (
            "plain",
            Options {
                dir_index: false,
                exports: false,
                ..Options::default()
            },
        ),
    ] {
        let img = write_image(dir.path(), name, &build(tree.clone(), opts));
        let k = KernelMount::new(&img);
        let m = SifuseMount::daemon(&img, &[]);
        for base in [&k.mountpoint, &m.mountpoint] {
            let mut listed: Vec<_> = fs::read_dir(base.join("big"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_vec())
                .collect();
            listed.sort();
            assert_eq!(listed, names("e", 3000), "{name}: {}", base.display());
            let mut tail = [1u8; 16];
            fs::File::open(base.join("sparse"))
                .unwrap()
                .read_exact_at(&mut tail, (5 << 20) - 16)
                .unwrap();
            assert_eq!(tail, [0u8; 16]);
        }
        let diffs = mount_util::compare_views(&k.mountpoint, &m.mountpoint, Default::default());
        mount_util::assert_no_differences(name, &diffs);
    }
    // A file of more than 4 GiB needs an extended inode, and more blocks than sifuse reads:
    // it still stats as the kernel shows it (its contents are not compared: 20 GiB).
    let img = write_image(
        dir.path(),
        "huge",
        &build(
            Node::dir([(b"huge".to_vec(), Node::SparseFile { size: 5 << 32 })]),
            Options::default(),
        ),
    );
    let k = KernelMount::new(&img);
    let m = SifuseMount::daemon(&img, &[]);
    let (km, sm) = (
        fs::metadata(k.mountpoint.join("huge")).unwrap(),
        fs::metadata(m.path("huge")).unwrap(),
    );
    assert_eq!(
        (km.len(), km.blocks(), km.ino()),
        (sm.len(), sm.blocks(), sm.ino())
    );
    assert_eq!(sm.len(), 5 << 32);
}

use std::os::unix::ffi::OsStringExt;

#[test]
fn an_xattr_bomb_is_read_lazily_and_bounded() {
    let a = open(xattr_bomb(), DEFAULT_CACHE);
    let f = a.resolve(b"f").unwrap();
    // A name that is not there: every name scanned, no value read.
    assert_eq!(a.xattr_value(&f, b"user.missing").unwrap(), None);
    // One value, the one asked for.
    let v = a.xattr_value(&f, b"user.x7").unwrap().unwrap();
    assert_eq!(v, vec![b'v'; 65536]);
    // 60,000 names are more than listxattr may return.
    match a.xattr_names(&f, |_| true) {
        Err(e @ Error::XattrsTooLarge(_)) => assert_eq!(e.errno(), libc::E2BIG),
        other => panic!("listing 60,000 names: {other:?}"),
    }
    // Tools that copy whole sets are bounded too.
    assert!(matches!(a.xattrs(&f), Err(Error::XattrsTooLarge(_))));
}

#[test]
fn a_mounted_xattr_bomb_answers_within_the_budget() {
    require_mount();
    let dir = scratch("xbomb");
    let img = write_image(dir.path(), "xbomb.sqfs", &xattr_bomb());
    let m = SifuseMount::daemon(&img, &[]);
    let f = m.path("f");
    assert_eq!(getxattr(&f, "user.missing"), Err(libc::ENODATA));
    assert_eq!(getxattr(&f, "user.x59999").unwrap(), vec![b'v'; 65536]);
    assert_eq!(listxattr(&f), Err(libc::E2BIG));
    assert_eq!(fs::read(&f).unwrap(), vec![0u8; 10]);
    assert_peak_within_budget(m.daemon_pid(), DEFAULT_CACHE, "xattr bomb");
}

#[test]
fn block_lists_are_decoded_as_reads_need_them() {
    let bytes = block_list_bomb(4);
    let source = Arc::new(CountingSource::new(bytes));
    let a = Archive::open(source.clone(), DEFAULT_CACHE).unwrap();
    let root = a.root().clone();
    let before = source.bytes_read();
    for e in a.read_dir(&root).unwrap() {
        let inode = a.inode(e.iref).unwrap();
        assert_eq!(inode.size(), 4096 << 22);
    }
    // Stat needs no block list: a few metadata blocks, not 64 MiB of lists.
    assert!(
        source.bytes_read() - before < 1 << 20,
        "decoding four inodes read {} bytes",
        source.bytes_read() - before
    );
    // Reading the last byte decodes the list up to it, once.
    let f = a.resolve(b"f0000003").unwrap();
    let mut b = [1u8; 1];
    assert_eq!(
        a.read_file_at(f.as_file().unwrap(), (4096 << 22) - 1, &mut b)
            .unwrap(),
        1
    );
    assert_eq!(b, [0]);
    assert!(a.cache_weight() <= DEFAULT_CACHE);
}

#[test]
fn a_mounted_block_list_bomb_stays_within_the_budget() {
    require_mount();
    let dir = scratch("lbomb");
    let img = write_image(dir.path(), "lbomb.sqfs", &block_list_bomb(48));
    let m = SifuseMount::daemon(&img, &[]);
    // ls -l: every inode stated.
    let mut n = 0;
    for e in fs::read_dir(&m.mountpoint).unwrap() {
        let meta = e.unwrap().metadata().unwrap();
        assert_eq!(meta.len(), 4096 << 22);
        assert_eq!(meta.blocks(), 0);
        n += 1;
    }
    assert_eq!(n, 48);
    // And a read at the far end of each, which needs its whole list.
    for name in names("f", 48) {
        let f = fs::File::open(m.mountpoint.join(std::str::from_utf8(&name).unwrap())).unwrap();
        let mut b = [1u8; 4096];
        f.read_exact_at(&mut b, (4096 << 22) - 4096).unwrap();
        assert_eq!(b, [0u8; 4096]);
    }
    assert_peak_within_budget(m.daemon_pid(), DEFAULT_CACHE, "block-list bomb");
}

/// Page through a listing the way readdir does, `page` entries per call, resuming at the
/// position the previous call reported.
fn page_through(a: &Archive, dir: &sifuse::archive::Inode, page: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let mut taken = 0;
        let mut last = from;
        a.list_from(dir, from, |e, after| {
            if taken == page {
                return false;
            }
            out.push(e.name.to_vec());
            taken += 1;
            last = after;
            true
        })
        .unwrap();
        if taken == 0 {
            return out;
        }
        from = last;
    }
}

/// A listing paged through costs about one read of it, with or without a directory
/// index, even in a cache far smaller than the listing: every page resumes where the last
/// one stopped instead of parsing from the start.
#[test]
fn paging_through_a_huge_listing_reads_it_about_once() {
    const N: usize = 200_000;
    for dir_index in [true, false] {
        let bytes = build(
            Node::dir([(b"big".to_vec(), empty_files("entry-", N))]),
            Options {
                dir_index,
                ..Options::default()
            },
        );
        let source = Arc::new(CountingSource::new(bytes));
        let a = Archive::open(source.clone(), 512 << 10).unwrap();
        let big = a.resolve(b"big").unwrap();
        let listing = big.size();
        let before = source.bytes_read();
        let got = page_through(&a, &big, 100);
        assert_eq!(got, names("entry-", N), "index {dir_index}");
        let read = source.bytes_read() - before;
        eprintln!("index {dir_index}: listing of {listing} bytes, read {read} bytes");
        // Compressed blocks are read; the listing's size is decompressed: one pass reads
        // less than the listing, a quadratic one thousands of times more.
        assert!(
            read < 2 * listing,
            "index {dir_index}: read {read} bytes for a {listing}-byte listing"
        );
        // Resuming anywhere (a seekdir) works too, through the index or from the start.
        let mut resumed = Vec::new();
        a.list_from(&big, 0, |e, after| {
            resumed.push((e.name.to_vec(), after));
            resumed.len() < 1000
        })
        .unwrap();
        let (_, at) = resumed[499].clone();
        let fresh = open(source_bytes(&source), 512 << 10);
        let mut next = None;
        fresh
            .list_from(&fresh.resolve(b"big").unwrap(), at, |e, _| {
                next = Some(e.name.to_vec());
                false
            })
            .unwrap();
        assert_eq!(next.as_deref(), Some(&resumed[500].0[..]));
    }
}

fn source_bytes(s: &CountingSource<Vec<u8>>) -> Vec<u8> {
    use sifuse::source::ReadAt;
    let mut v = vec![0u8; s.len() as usize];
    s.read_exact_at(&mut v, 0).unwrap();
    v
}

/// Two directories of a million entries each, each listed twice at once.
#[test]
fn huge_directories_listed_at_once_stay_within_the_budget() {
    require_mount();
    const N: usize = 1_000_000;
    let dir = scratch("hugedir");
    let bytes = build(
        Node::dir([
            (b"a".to_vec(), empty_files("a", N)),
            (b"b".to_vec(), empty_files("b", N)),
        ]),
        Options::default(),
    );
    let img = write_image(dir.path(), "huge.sqfs", &bytes);
    drop(bytes);
    let m = SifuseMount::daemon(&img, &[]);
    let started = std::time::Instant::now();
    let listers: Vec<_> = ["a", "b", "a", "b"]
        .into_iter()
        .map(|d| {
            let p = m.path(d);
            std::thread::spawn(move || fs::read_dir(p).unwrap().count())
        })
        .collect();
    for l in listers {
        assert_eq!(l.join().unwrap(), N);
    }
    eprintln!("four listings of {N} entries in {:.1?}", started.elapsed());
    assert_peak_within_budget(
        m.daemon_pid(),
        DEFAULT_CACHE,
        "two directories of a million entries",
    );
}

/// Without an export table the node table remembers each node the kernel holds, up to a
/// share of the budget; past it nodes get ids that encode their inode, and stat still shows
/// the inode numbers the kernel's own driver shows (only d_ino of such entries differs).
#[test]
fn more_nodes_than_the_table_holds_keep_their_inode_numbers() {
    require_mount();
    const N: usize = 20_000;
    let dir = scratch("nodes");
    let bytes = build(
        Node::dir([(b"d".to_vec(), empty_files("n", N))]),
        Options {
            exports: false,
            ..Options::default()
        },
    );
    let img = write_image(dir.path(), "noexport.sqfs", &bytes);
    let k = KernelMount::new(&img);
    // A 1 MiB cache: the table holds a few thousand nodes.
    let m = SifuseMount::daemon(&img, &["-o", "cache_size=1"]);
    let mut kernel: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for e in fs::read_dir(k.mountpoint.join("d")).unwrap() {
        let e = e.unwrap();
        kernel.insert(e.file_name().into_vec(), e.metadata().unwrap().ino());
    }
    let mut served = BTreeMap::new();
    let mut encoded = 0;
    for e in fs::read_dir(m.path("d")).unwrap() {
        let e = e.unwrap();
        let ino = fs::symlink_metadata(e.path()).unwrap().ino();
        if e.ino() != ino {
            assert!(
                e.ino() >= 1 << 63,
                "d_ino {} of {:?}",
                e.ino(),
                e.file_name()
            );
            encoded += 1;
        }
        served.insert(e.file_name().into_vec(), ino);
    }
    assert_eq!(served.len(), N);
    assert_eq!(served, kernel);
    assert!(
        encoded > 0,
        "the table never filled: the test proves nothing"
    );
    // Each file again, by path: lookups of held and of encoded nodes.
    for (name, ino) in kernel.iter().step_by(97) {
        let p = m.path("d").join(std::str::from_utf8(name).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().ino(), *ino);
        assert_eq!(fs::read(&p).unwrap(), b"");
    }
    assert_peak_within_budget(m.daemon_pid(), 1 << 20, "20,000 nodes, no export table");
}

use std::os::unix::fs::DirEntryExt;
