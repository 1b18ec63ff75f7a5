//! Detached FUSE mounts (the new mount API) served by sifuse: the launcher side opens
//! /dev/fuse, creates the mount with `sifuse::mount::detached::create`, hands the /dev/fuse
//! descriptor to `sifuse mount -f IMAGE /dev/fd/N`, and reaches the image through the mount
//! descriptor, or attaches it in a private mount namespace. The host's mount table never
//! shows it, and the server ends once the last reference is gone.

mod common;
mod mount_util;

use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::fixtures;
use mount_util::{require_mount, scratch, wait_for, SIFUSE};
use sifuse::mount::detached::{attach_at, create};
use sifuse::mount::options::Access;
use sifuse::mount::spec::MountSpec;
use sifuse::mount::sys::MountFlags;

/// /dev/fuse, opened inheritable at descriptor 10 or above.
fn open_fuse_inheritable() -> OwnedFd {
    let dev = std::ffi::CString::new("/dev/fuse").unwrap();
    // SAFETY: open(2), fcntl(2) and close(2) on descriptors this function owns.
    unsafe {
        let fd = libc::open(dev.as_ptr(), libc::O_RDWR);
        assert!(
            fd >= 0,
            "open /dev/fuse: {}",
            std::io::Error::last_os_error()
        );
        let high = libc::fcntl(fd, libc::F_DUPFD, 10);
        libc::close(fd);
        assert!(high >= 10);
        OwnedFd::from_raw_fd(high)
    }
}

#[test]
fn a_detached_mount_is_served_reached_by_its_descriptor_and_attached_elsewhere() {
    require_mount();
    let source = format!("sifuse-detached-test-{}", std::process::id());
    let fuse = open_fuse_inheritable();
    let spec = MountSpec {
        source: source.clone(),
        subtype: "sifuse".into(),
        flags: MountFlags {
            nosuid: true,
            nodev: true,
        },
        access: Access::Owner,
        owner: (0, 0),
    };
    let mount = create(fuse.as_fd(), &spec).unwrap_or_else(|e| panic!("{e}"));
    let mut server = Command::new(SIFUSE)
        .args(["mount", "-f"])
        .arg(fixtures().image("gzip"))
        .arg(format!("/dev/fd/{}", fuse.as_raw_fd()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(fuse);

    // Through the descriptor: the mount's root is /proc/self/fd/N.
    let root = format!("/proc/self/fd/{}", mount.as_raw_fd());
    let want = fs::read(fixtures().tree.join("hello.txt")).unwrap();
    assert_eq!(fs::read(format!("{root}/hello.txt")).unwrap(), want);
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&source),
        "the detached mount shows in the host's mount table"
    );

    // Attached in a private mount namespace by a child, which reads through it.
    let dir = scratch("detached");
    let target = dir.path().join("mnt");
    fs::create_dir(&target).unwrap();
    let mfd = mount.as_raw_fd();
    let target_in_child = target.clone();
    let mut reader = Command::new("/bin/cat");
    reader.arg(target.join("hello.txt"));
    // SAFETY: unshare, mount and move_mount between fork and exec. attach_at allocates
    // (C strings), which is safe after fork only with no other thread holding the
    // allocator's lock: nextest runs this test alone in its process, on one thread.
    unsafe {
        reader.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            attach_at(std::os::fd::BorrowedFd::borrow_raw(mfd), &target_in_child)
        });
    }
    let out = reader.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, want);
    let host = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&source),
        "the child's mount leaked to the host"
    );

    // The last reference goes: the kernel ends the connection, and the server exits.
    let dropped = Instant::now();
    drop(mount);
    let ended = wait_for(Duration::from_secs(5), || {
        server.try_wait().unwrap().is_some()
    });
    if !ended {
        let _ = server.kill();
    }
    let out = server.wait_with_output().unwrap();
    assert!(ended, "the server outlived its last reference");
    eprintln!(
        "server ended {:?} after the last reference",
        dropped.elapsed()
    );
    assert!(dropped.elapsed() < Duration::from_secs(1));
    assert!(out.status.success(), "{out:?}");
}
