//! Memory of a server on a node that runs many: blocks the kernel already holds are not
//! kept twice, an idle mount gives its memory back and then still reads every byte right,
//! and `cache_size` bounds the server under load.

mod common;
mod mount_util;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::fixtures::fixtures;
use mount_util::hammer::{assert_peak_within_budget, peak_rss, read_tree};
use mount_util::images::{pack, random_bytes, random_data_image, read_spread};
use mount_util::{
    assert_no_differences, compare_views, require_mount, scratch, wait_for, KernelMount,
    SifuseMount,
};

/// A process's resident set now (VmRSS), in bytes.
fn rss(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// 4 KiB reads spread over every file: each touches a block no read finishes, so the
/// blocks stay in the server's cache until it lets them go.
fn scattered_reads(mnt: &Path) {
    for f in 0..6 {
        let file = fs::File::open(mnt.join(format!("r{f}.bin"))).unwrap();
        let mut buf = [0u8; 4096];
        for i in 0..64u64 {
            file.read_exact_at(&mut buf, i * (128 << 10) + 4096)
                .unwrap();
        }
    }
}

/// After a while without requests the server drops its caches and returns the heap: its
/// resident set falls to a few MiB, and what it then reads is still right.
#[test]
fn an_idle_mount_gives_its_memory_back_and_reads_right_after() {
    require_mount();
    let dir = scratch("idle");
    let img = random_data_image(dir.path());
    let m = SifuseMount::daemon(&img, &["-o", "idle_release=2"]);
    let pid = m.daemon_pid();
    scattered_reads(&m.mountpoint);
    let busy = rss(pid);
    eprintln!("after the reads: RSS {} MiB", busy >> 20);
    assert!(
        busy > 32 << 20,
        "the reads left only {} MiB resident: the test proves nothing",
        busy >> 20
    );
    let released = wait_for(Duration::from_secs(20), || rss(pid) <= 16 << 20);
    let idle = rss(pid);
    eprintln!("idle: RSS {} MiB", idle >> 20);
    assert!(released, "idle for 20 s, yet {} MiB resident", idle >> 20);
    // Nothing kept, everything still served: drop the kernel's copy and compare again.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let k = KernelMount::new(&img);
    assert_no_differences(
        "after the release",
        &compare_views(&k.mountpoint, &m.mountpoint, Default::default()),
    );
}

/// A mount that never goes idle long enough keeps its cache (idle_release=0 turns the
/// release off, and the test above turns it on: together they show it is the release).
#[test]
fn without_idle_release_the_cache_stays() {
    require_mount();
    let dir = scratch("noidle");
    let img = random_data_image(dir.path());
    let m = SifuseMount::daemon(&img, &["-o", "idle_release=0"]);
    let pid = m.daemon_pid();
    scattered_reads(&m.mountpoint);
    std::thread::sleep(Duration::from_secs(4));
    assert!(rss(pid) > 32 << 20, "{} MiB", rss(pid) >> 20);
}

/// A sequential reader leaves no data blocks behind in the server: the kernel holds what
/// it was sent. Reading the fixture tree whole keeps the server far below its budget.
#[test]
fn blocks_the_kernel_holds_are_not_kept_twice() {
    require_mount();
    let fx = fixtures();
    let dir = scratch("seq");
    let img = random_data_image(dir.path());
    let m = SifuseMount::daemon(&img, &["-o", "idle_release=0"]);
    let pid = m.daemon_pid();
    for f in 0..6 {
        let got = fs::read(m.path(&format!("r{f}.bin"))).unwrap();
        assert_eq!(got.len(), 8 << 20);
    }
    let after = rss(pid);
    eprintln!("48 MiB read in order: RSS {} MiB", after >> 20);
    assert!(
        after <= 24 << 20,
        "after sequential reads the server holds {} MiB",
        after >> 20
    );
    // And a whole tree, small files and all.
    let t = SifuseMount::daemon(fx.image("gzip"), &["-o", "idle_release=0"]);
    let r = read_tree(&t.mountpoint, u64::MAX);
    assert!(r.unexpected(&[]).is_empty(), "{:?}", r.unexpected(&[]));
    let tree_rss = rss(t.daemon_pid());
    eprintln!("fixture tree read: RSS {} MiB", tree_rss >> 20);
}

/// A tree of small incompressible files (72 MiB of fragment blocks, more than the 64 MiB
/// cache) read whole, as tar does: the server keeps only the last few fragment blocks, not
/// the blocks whose files the kernel already holds.
#[test]
fn a_tree_read_keeps_only_the_last_fragment_blocks() {
    require_mount();
    let dir = scratch("fragments");
    let src = dir.path().join("src");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for d in 0..240 {
        let sub = src.join(format!("d{d:03}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..60 {
            fs::write(
                sub.join(format!("f{f:02}.bin")),
                random_bytes(&mut x, 5 << 10),
            )
            .unwrap();
        }
    }
    let img = pack(&src, "fragments.sqfs");
    let m = SifuseMount::daemon(&img, &["-o", "idle_release=0"]);
    let r = read_tree(&m.mountpoint, u64::MAX);
    // An image without an xattr table answers listxattr on directories as the kernel
    // does: EOPNOTSUPP.
    let unexpected = r.unexpected(&[libc::EOPNOTSUPP]);
    assert!(
        unexpected.is_empty(),
        "{:?}",
        &unexpected[..unexpected.len().min(3)]
    );
    assert_eq!(r.bytes, 240 * 60 * (5 << 10), "bytes read");
    let after = rss(m.daemon_pid());
    let peak = peak_rss(m.daemon_pid()).unwrap();
    eprintln!(
        "72 MiB of small files read: RSS {} MiB, peak {} MiB",
        after >> 20,
        peak >> 20
    );
    // A few MiB of its own, and at most 2 MiB of fragment blocks (it reached 29 MiB when
    // every fragment block shared by two directories stayed).
    assert!(
        peak <= 16 << 20,
        "a tree read took the server to {} MiB",
        peak >> 20
    );
}

/// Eight readers at once, each on its own part of the data, with the default budget and
/// with a small one: the peak stays within cache_size + 96 MiB.
#[test]
fn cache_size_bounds_memory_under_load() {
    require_mount();
    let dir = scratch("load");
    let img = random_data_image(dir.path());
    for (cache_mib, args) in [(64u64, vec![]), (4, vec!["-o", "cache_size=4"])] {
        let m = SifuseMount::daemon(&img, &args);
        let pid = m.daemon_pid();
        let readers: Vec<_> = (0..8)
            .map(|r| {
                let mnt = m.mountpoint.clone();
                std::thread::spawn(move || read_spread(&mnt.join(format!("r{}.bin", r % 6)), r, 7))
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        assert_peak_within_budget(pid, cache_mib << 20, &format!("cache_size={cache_mib}"));
    }
}
