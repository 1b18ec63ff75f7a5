//! 16 readers at once, through a small block cache and a few request threads, all get the
//! right bytes: whole files and random ranges, with the page cache dropped between passes so
//! that every pass reaches the server again.

mod common;
mod mount_util;

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use common::fixtures::fixtures;
use mount_util::{require_mount, SifuseMount};

const READERS: usize = 16;
const PASSES: usize = 3;

const FILES: &[&str] = &[
    "mixed.bin",
    "sizes/size-1",
    "sizes/size-4097",
    "sizes/size-131071",
    "sizes/size-131073",
    "sizes/size-1048577",
    "sizes/text-300000",
    "sizes/dup-a",
    "sizes/dup-b",
    "sizes/zero-block-inside",
    "links/a/big-1",
    "links/b/hl-3",
    "sparse/trailing-hole",
    "xattrs/big-file-with-xattr",
];

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

fn drop_page_cache(file: &fs::File) {
    // SAFETY: fadvise on an open descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn reader(
    id: usize,
    root: PathBuf,
    expected: Arc<HashMap<&'static str, Vec<u8>>>,
    start: Arc<Barrier>,
) {
    let mut rng = Lcg(id as u64 + 1);
    start.wait();
    for pass in 0..PASSES {
        for k in 0..FILES.len() {
            let name = FILES[(k + id + pass) % FILES.len()];
            let want = &expected[name];
            let file = fs::File::open(root.join(name)).unwrap();
            if (id + pass) % 2 == 0 {
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut got).unwrap();
                assert!(
                    got == *want,
                    "reader {id} pass {pass}: {name} differs read whole"
                );
            } else {
                for _ in 0..8 {
                    let offset = rng.next(want.len() as u64 + 10);
                    let len = 1 + rng.next(300_000) as usize;
                    let mut buf = vec![0u8; len];
                    let mut got = 0;
                    while got < len {
                        let n = file.read_at(&mut buf[got..], offset + got as u64).unwrap();
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    let from = (offset as usize).min(want.len());
                    let to = (from + len).min(want.len());
                    assert!(
                        buf[..got] == want[from..to],
                        "reader {id} pass {pass}: {name} [{offset}, +{len}) differs"
                    );
                }
            }
            drop_page_cache(&file);
        }
    }
}

#[test]
fn sixteen_parallel_readers_get_the_right_bytes() {
    require_mount();
    let fx = fixtures();
    let expected: Arc<HashMap<&'static str, Vec<u8>>> = Arc::new(
        FILES
            .iter()
            .map(|&f| (f, fs::read(fx.tree.join(f)).unwrap()))
            .collect(),
    );
    for image in ["gzip", "zstd-b1m"] {
        let m = SifuseMount::daemon(fx.image(image), &["-o", "cache_size=1,threads=4"]);
        let start = Arc::new(Barrier::new(READERS));
        let readers: Vec<_> = (0..READERS)
            .map(|id| {
                let (root, expected, start) =
                    (m.mountpoint.clone(), expected.clone(), start.clone());
                std::thread::spawn(move || reader(id, root, expected, start))
            })
            .collect();
        for r in readers {
            r.join()
                .unwrap_or_else(|_| panic!("a reader of {image} failed"));
        }
    }
}
