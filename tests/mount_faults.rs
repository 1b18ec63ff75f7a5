//! Faults a long-lived daemon meets on a shared node: its process killed, its image file
//! shrinking under it, a cache far smaller than the blocks it serves, and many readers at
//! once on a damaged image. Each ends in clear errors at worst, never in a dead or stuck
//! server (a SIGBUS from a shrunk mapping would kill it: sifuse reads with pread).

mod common;
mod mount_util;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::fixtures::fixtures;
use mount_util::hammer::{alive, peak_rss, read_tree, statfs_errno};
use mount_util::{
    assert_no_differences, compare_views, is_mounted, require_mount, scratch, wait_for,
    KernelMount, SifuseMount, ViewExceptions, SIFUSE,
};

fn kill(pid: i32, signal: i32) {
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

/// A private copy of a fixture image, for tests that damage or shrink it.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch("image");
    let path = dir.path().join(format!("{name}.sqfs"));
    fs::copy(fixtures().image(name), &path).unwrap();
    (dir, path)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Where a SquashFS image's inode table starts: everything before it, after the 96-byte
/// superblock, is data blocks and fragments.
fn inode_table_start(image: &[u8]) -> usize {
    u64_at(image, 64) as usize
}

#[test]
fn sigkill_leaves_enotconn_and_sifuse_umount_clears_it() {
    require_mount();
    let m = SifuseMount::daemon(fixtures().image("gzip"), &[]);
    let pid = m.daemon_pid();
    kill(pid, libc::SIGKILL);
    assert!(
        wait_for(Duration::from_secs(10), || !alive(pid)),
        "the daemon survived SIGKILL"
    );
    // The mount is still there, with nobody behind it.
    assert!(is_mounted(&m.mountpoint));
    // Attributes, and the pages and listings already read, may come from the kernel's
    // cache; statfs, and listing a directory not listed before, ask the server.
    // A request caught while the kernel aborts the connection answers ECONNABORTED;
    // once aborted, every request answers ENOTCONN.
    let mut seen = Vec::new();
    let settled = wait_for(Duration::from_secs(5), || {
        let e = statfs_errno(&m.mountpoint);
        seen.push(e);
        e == Some(libc::ENOTCONN)
    });
    assert!(
        settled
            && seen
                .iter()
                .all(|e| matches!(e, Some(libc::ENOTCONN | libc::ECONNABORTED))),
        "statfs of the dead mount answered {seen:?}"
    );
    let err = fs::read_dir(&m.mountpoint).expect_err("listing a dead FUSE mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let out = Command::new(SIFUSE)
        .arg("umount")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sifuse umount of a dead mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty() && out.stdout.is_empty());
    assert!(!is_mounted(&m.mountpoint), "sifuse umount left it mounted");
    assert!(fs::metadata(&m.mountpoint).unwrap().is_dir());
}

#[test]
fn image_truncated_while_mounted_answers_eio_and_the_daemon_lives() {
    require_mount();
    let (_dir, image) = copy_of("gzip");
    let m = SifuseMount::daemon(&image, &[]);
    let pid = m.daemon_pid();
    assert_eq!(
        fs::read(m.path("hello.txt")).unwrap(),
        fs::read(fixtures().tree.join("hello.txt")).unwrap()
    );
    // Cut the image to half of its data blocks: every table, and most data, is gone.
    let bytes = fs::read(&image).unwrap();
    let cut = inode_table_start(&bytes) / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();

    let seen = read_tree(&m.mountpoint, 256 << 20);
    assert!(alive(pid), "the daemon died reading a truncated image");
    let unexpected = seen.unexpected(&[libc::EIO]);
    assert!(
        unexpected.is_empty(),
        "errors other than EIO:\n{}",
        unexpected.join("\n")
    );
    assert!(
        seen.count(libc::EIO) > 0,
        "reading a truncated image gave no EIO: {seen:?}"
    );
    assert_eq!(
        statfs_errno(&m.mountpoint),
        None,
        "the mount stopped answering"
    );

    // The file grows back: the same daemon serves it again (nothing failed for good).
    fs::write(&image, &bytes).unwrap();
    let again = read_tree(&m.mountpoint, 256 << 20);
    assert!(alive(pid));
    assert!(
        again.errors.is_empty(),
        "after restoring the image: {:?}",
        &again.errors[..again.errors.len().min(10)]
    );
}

/// A 1 MiB cache budget, smaller than one block of the 1 MiB-block image, and several
/// readers evicting each other's blocks: every byte and stat still matches the kernel.
#[test]
fn one_mib_cache_serves_every_byte() {
    require_mount();
    for name in ["gzip", "zstd-b1m", "gzip-b4k", "xz"] {
        let image = fixtures().image(name);
        let m = SifuseMount::daemon(image, &["-o", "cache_size=1"]);
        let pid = m.daemon_pid();
        let clean = std::thread::scope(|s| {
            let readers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| read_tree(&m.mountpoint, u64::MAX)))
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().unwrap())
                .all(|r| r.errors.is_empty())
        });
        assert!(clean, "{name}: parallel readers met errors");
        let k = KernelMount::new(image);
        let diffs = compare_views(&k.mountpoint, &m.mountpoint, ViewExceptions::default());
        assert_no_differences(&format!("{name} with cache_size=1"), &diffs);
        let rss = peak_rss(pid).unwrap();
        eprintln!("{name}: daemon peak RSS {} MiB", rss >> 20);
        assert!(
            rss < 96 << 20,
            "{name}: a 1 MiB cache, yet the daemon peaked at {} MiB",
            rss >> 20
        );
    }
}

/// Damage every data block and fragment of an image that still mounts.
fn damaged_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = copy_of(name);
    let mut bytes = fs::read(&path).unwrap();
    let end = inode_table_start(&bytes);
    let mut at = 96 + 17;
    while at < end {
        bytes[at] ^= 0x5a;
        at += 509;
    }
    fs::write(&path, &bytes).unwrap();
    (dir, path)
}

#[test]
fn sixteen_readers_on_a_damaged_image_leave_the_daemon_answering() {
    require_mount();
    let (_dir, image) = damaged_copy("gzip");
    let m = SifuseMount::daemon(&image, &[]);
    let pid = m.daemon_pid();
    let rounds = std::thread::scope(|s| {
        let readers: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    (0..2)
                        .map(|_| read_tree(&m.mountpoint, 64 << 20))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(alive(pid), "the daemon died under 16 readers");
    assert_eq!(
        statfs_errno(&m.mountpoint),
        None,
        "the mount stopped answering"
    );
    let mut eio = 0;
    for r in &rounds {
        let unexpected = r.unexpected(&[libc::EIO]);
        assert!(
            unexpected.is_empty(),
            "errors other than EIO:\n{}",
            unexpected.join("\n")
        );
        eio += r.count(libc::EIO);
        assert!(r.entries > 0, "a reader saw no entries");
    }
    assert!(eio > 0, "the damage never showed");
    // Undamaged metadata still answers after all that.
    assert!(fs::metadata(m.path("hello.txt")).unwrap().is_file());
}
