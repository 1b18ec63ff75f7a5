//! Reader tests over the small committed images (fixtures/make-tiny.sh documents their
//! contents). The full matrix of compressors and layouts is covered by tests/extract.rs.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::source::CountingSource;

const IMAGES: [&str; 3] = ["tiny-gzip.sqfs", "tiny-raw.sqfs", "tiny-zstd-nofrag.sqfs"];

fn image_bytes(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tiny")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn open(name: &str) -> Archive {
    Archive::open(Arc::new(image_bytes(name)), 1 << 20).unwrap()
}

fn read_all(a: &Archive, path: &str) -> Vec<u8> {
    let inode = a.resolve(path.as_bytes()).unwrap();
    let f = inode.as_file().unwrap();
    let mut buf = vec![0u8; f.file_size as usize + 10];
    let n = a.read_file_at(f, 0, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn numbers() -> Vec<u8> {
    (0..2000)
        .flat_map(|i| format!("{i:04}\n").into_bytes())
        .collect()
}

#[test]
fn superblocks() {
    for name in IMAGES {
        let a = open(name);
        let sb = a.superblock();
        assert_eq!(sb.block_size, 4096, "{name}");
        assert_eq!(sb.mod_time, 1_700_000_000, "{name}");
        assert_eq!(sb.inode_count, 615, "{name}");
    }
    assert_eq!(
        open("tiny-zstd-nofrag.sqfs").superblock().compressor,
        crate::codec::Compressor::Zstd
    );
    assert!(open("tiny-raw.sqfs")
        .superblock()
        .has(superblock::flags::UNCOMPRESSED_INODES));
}

#[test]
fn file_contents() {
    for name in IMAGES {
        let a = open(name);
        assert_eq!(read_all(&a, "/hello.txt"), b"hello, squashfs\n", "{name}");
        assert_eq!(read_all(&a, "empty"), b"", "{name}");
        assert_eq!(read_all(&a, "dir/numbers"), numbers(), "{name}");
        let mut block = vec![0u8; 4096];
        block[100] = b'x';
        assert_eq!(read_all(&a, "dir/exact-block"), block, "{name}");
        let mut sparse = vec![0u8; 65536 + 8192 + 3];
        sparse[..5].copy_from_slice(b"start");
        sparse[65536 + 8192..].copy_from_slice(b"end");
        assert_eq!(read_all(&a, "sparse"), sparse, "{name}");
    }
}

#[test]
fn reads_at_offsets_across_blocks() {
    let a = open("tiny-gzip.sqfs");
    let inode = a.resolve(b"dir/numbers").unwrap();
    let f = inode.as_file().unwrap();
    let all = numbers();
    for (off, len) in [
        (0, 1),
        (4090, 20),
        (8191, 2),
        (9995, 100),
        (10_000, 5),
        (3, 9000),
    ] {
        let mut buf = vec![0u8; len];
        let n = a.read_file_at(f, off, &mut buf).unwrap();
        let end = (off as usize + len).min(all.len());
        let want = all.get(off as usize..end).unwrap_or(&[]);
        assert_eq!(&buf[..n], want, "offset {off} len {len}");
    }
}

#[test]
fn sparse_blocks_are_marked_sparse() {
    let a = open("tiny-gzip.sqfs");
    let inode = a.resolve(b"sparse").unwrap();
    let f = inode.as_file().unwrap();
    let words: Vec<u32> = (0..f.block_count)
        .map(|i| a.block_location(f, i).unwrap().word)
        .collect();
    let holes = words.iter().filter(|&&w| w & 0x00ff_ffff == 0).count();
    assert!(holes >= 15, "{holes} sparse blocks in {words:?}");
    assert!(matches!(
        a.file_block(f, 3).unwrap(),
        BlockData::Zeros(4096)
    ));
}

#[test]
fn attributes() {
    for name in IMAGES {
        let a = open(name);
        let hello = a.resolve(b"hello.txt").unwrap();
        let hard = a.resolve(b"dir/hardlink").unwrap();
        assert_eq!(
            hello.number, hard.number,
            "{name}: hard links share an inode"
        );
        assert_eq!(hello.nlink, 2);
        assert_eq!((hello.uid, hello.gid), (1000, 2000));
        let empty = a.resolve(b"empty").unwrap();
        assert_eq!(
            (empty.uid, empty.gid, empty.permissions),
            (4_294_967_294, 65534, 0o600)
        );
        assert_eq!(
            a.resolve(b"dir/numbers").unwrap().mode(),
            libc::S_IFREG | 0o4755
        );
        assert_eq!(
            a.resolve(b"dir/sub").unwrap().mode(),
            libc::S_IFDIR | 0o1777
        );
        let link = a.resolve(b"link").unwrap();
        assert_eq!(link.symlink_target(), Some(&b"hello.txt"[..]));
        assert_eq!(link.mtime, 0);
        assert_eq!(a.resolve(b"dir/exact-block").unwrap().mtime, 4_102_444_800);
        assert_eq!(
            a.resolve(b"dir/longlink")
                .unwrap()
                .symlink_target()
                .unwrap(),
            vec![b'a'; 300].as_slice()
        );
        assert_eq!(
            a.resolve(b"chr").unwrap().device_numbers(),
            (4095, 1_048_575)
        );
        assert_eq!(a.resolve(b"blk").unwrap().device_numbers(), (8, 1));
        assert_eq!(a.resolve(b"blk").unwrap().kind, FileKind::BlockDevice);
        assert_eq!(a.resolve(b"fifo").unwrap().kind, FileKind::Fifo);
        assert_eq!(a.resolve(b"sock").unwrap().kind, FileKind::Socket);
        assert_eq!(a.root().mtime, 1_700_000_000);
        assert_eq!(a.root().nlink, 4, "{name}: root holds dir and many");
    }
}

#[test]
fn xattrs() {
    for name in IMAGES {
        let a = open(name);
        let mut x = a.xattrs(&a.resolve(b"hello.txt").unwrap()).unwrap();
        x.sort();
        assert_eq!(x.len(), 2, "{name}");
        assert_eq!(x[0].name, b"trusted.big");
        assert_eq!(x[0].value, vec![b'v'; 2000]);
        assert_eq!(
            x[1],
            Xattr {
                name: b"user.greeting".to_vec(),
                value: b"hi".to_vec()
            }
        );
        let d = a.xattrs(&a.resolve(b"dir").unwrap()).unwrap();
        assert_eq!(
            d,
            vec![Xattr {
                name: b"user.dirattr".to_vec(),
                value: b"yes".to_vec()
            }]
        );
        let s = a.xattrs(&a.resolve(b"dir/numbers").unwrap()).unwrap();
        assert_eq!(s[0].name, b"security.label");
        assert!(a.xattrs(&a.resolve(b"fifo").unwrap()).unwrap().is_empty());
    }
}

#[test]
fn directory_lookup_through_the_index() {
    for name in IMAGES {
        let a = open(name);
        let many = a.resolve(b"many").unwrap();
        let info = many.as_dir().unwrap();
        assert!(
            info.index_count > 0,
            "{name}: a 600-entry directory has an index"
        );
        let all = a.read_dir(&many).unwrap();
        assert_eq!(all.len(), 600);
        assert!(all.windows(2).all(|w| w[0].name < w[1].name));
        for e in &all {
            assert_eq!(a.lookup(&many, &e.name).unwrap().as_ref(), Some(e));
        }
        for missing in [
            &b"a"[..],
            b"entry-0000",
            b"entry-0300x",
            b"entry-9999",
            b"zzz",
            b"",
        ] {
            assert_eq!(a.lookup(&many, missing).unwrap(), None);
        }
    }
}

#[test]
fn paths_that_do_not_resolve() {
    let a = open("tiny-gzip.sqfs");
    assert!(matches!(a.resolve(b"nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        a.resolve(b"hello.txt/x"),
        Err(Error::NotADirectory(_))
    ));
    assert!(a.resolve(b"/dir/../hello.txt").is_err());
    assert_eq!(
        a.resolve(b"//dir/./sub/").unwrap().kind,
        FileKind::Directory
    );
}

#[test]
fn export_table_maps_numbers_to_inodes() {
    let a = open("tiny-gzip.sqfs");
    let hello = a.resolve(b"hello.txt").unwrap();
    let iref = a.inode_ref_by_number(hello.number).unwrap().unwrap();
    assert_eq!(a.inode(iref).unwrap(), hello);
    assert_eq!(
        open("tiny-zstd-nofrag.sqfs")
            .inode_ref_by_number(1)
            .unwrap(),
        None
    );
}

#[test]
fn opening_reads_only_the_superblock_and_root() {
    let c = Arc::new(CountingSource::new(image_bytes("tiny-gzip.sqfs")));
    let a = Archive::open(c.clone(), 1 << 20).unwrap();
    // Superblock, the metadata block holding the root inode, and the id table (index and
    // block) to resolve the root's owner.
    assert_eq!(c.reads(), 4);
    assert!(c.bytes_read() <= 96 + 8194 + 8 + 8194);
    let before = c.bytes_read();
    a.resolve(b"dir/numbers").unwrap();
    assert!(c.bytes_read() > before, "inodes are read on demand");
}

#[test]
fn walk_visits_everything_once() {
    let a = open("tiny-gzip.sqfs");
    let mut count = 0;
    crate::walk::walk(&a, a.root(), b"", &mut |ev| {
        if !matches!(ev, crate::walk::Event::LeaveDir { .. }) {
            count += 1;
        }
        Ok(())
    })
    .unwrap();
    // 615 inodes plus one extra name for the hard link.
    assert_eq!(count, 616);
}

#[test]
fn statfs_matches_the_kernel_formula() {
    let a = open("tiny-gzip.sqfs");
    let s = a.statfs();
    // squashfs_statfs: f_bsize is the block size, f_blocks = ((bytes_used - 1) >> block_log) + 1.
    let sb = a.superblock();
    assert_eq!(s.block_size, sb.block_size);
    assert_eq!(s.blocks, ((sb.bytes_used - 1) >> sb.block_log) + 1);
    assert_eq!(s.files, 615);
    assert_eq!(s.name_max, 256);
}

/// Overwrite bytes across the image; opening, walking and reading must return, never panic.
#[test]
fn corruption_never_panics() {
    for name in IMAGES {
        let clean = image_bytes(name);
        let mut cases = 0;
        for at in (0..clean.len()).step_by(clean.len() / 400) {
            for v in [0xffu8, 0x00, 0x80] {
                let mut bytes = clean.clone();
                bytes[at] = v;
                cases += 1;
                let Ok(a) = Archive::open(Arc::new(bytes), 1 << 20) else {
                    continue;
                };
                let _ = crate::walk::walk(&a, &a.root().clone(), b"", &mut |ev| {
                    if let crate::walk::Event::Entry { inode, .. } = ev {
                        let _ = a.xattrs(inode);
                        if let Some(f) = inode.as_file() {
                            let mut buf = vec![0u8; 70_000];
                            let _ = a.read_file_at(f, 0, &mut buf);
                        }
                    }
                    Ok(())
                });
            }
        }
        assert!(cases > 1100, "{name}: {cases}");
    }
}
