//! Opening an image reads the superblock and a few fixed-size pieces, nothing that grows
//! with the image: the bytes read at open are counted through the source.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use sifuse::source::{CountingSource, FileWindow};
use sifuse::Archive;

fn build_image(dir: &Path, files: usize, name: &str) -> std::path::PathBuf {
    let tree = dir.join(format!("{name}-tree"));
    for i in 0..files {
        // 100 files a directory, like a real package tree.
        let d = tree.join(format!("pkg{:04}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(d.join(format!("module_{i}.py")), format!("x = {i}\n")).unwrap();
    }
    let img = dir.join(format!("{name}.sqfs"));
    let st = Command::new("mksquashfs")
        .arg(&tree)
        .arg(&img)
        // -no-duplicates: duplicate detection is quadratic over 100k same-sized files.
        .args([
            "-noappend",
            "-quiet",
            "-no-progress",
            "-comp",
            "gzip",
            "-no-duplicates",
        ])
        .status()
        .expect("mksquashfs (apt-get install squashfs-tools)");
    assert!(st.success());
    img
}

fn open_counting(img: &Path) -> (u64, u64, u64) {
    let f = Arc::new(std::fs::File::open(img).unwrap());
    let len = f.metadata().unwrap().len();
    let src = Arc::new(CountingSource::new(FileWindow::new(f, 0, len).unwrap()));
    let archive = Archive::open(src.clone(), 64 << 20).unwrap();
    assert!(archive.superblock().inode_count > 0);
    (src.bytes_read(), src.reads(), len)
}

#[test]
fn open_cost_does_not_grow_with_the_image() {
    // tmpfs when there is one: 100k small files on a disk file system take minutes.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let small = build_image(dir.path(), 10, "small");
    let large = build_image(dir.path(), 100_000, "large");
    let (small_bytes, small_reads, small_len) = open_counting(&small);
    let (large_bytes, large_reads, large_len) = open_counting(&large);
    eprintln!(
        "10 files: {small_len} byte image, open read {small_bytes} bytes in {small_reads} reads"
    );
    eprintln!(
        "100k files: {large_len} byte image, open read {large_bytes} bytes in {large_reads} reads"
    );
    assert!(
        large_len > 50 * small_len,
        "the large image is large ({large_len} vs {small_len})"
    );
    assert_eq!(small_reads, large_reads, "the same reads whatever the size");
    // Superblock, one metadata block for the root inode, the id index and one id block.
    let bound = 96 + 2 * 8194 + 8;
    assert!(
        large_bytes <= bound,
        "open read {large_bytes} bytes (bound {bound})"
    );
    assert!(small_bytes <= bound);
}
