//! Mount options: owner override and maps, subdir, SIF partition selection, offset,
//! allow_other with the kernel enforcing mode bits, allow_root keeping everyone but root
//! and the owner out (with the kernel's caches warm), and the ro/nosuid/nodev flags.

mod common;
mod mount_util;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::fixtures;
use common::tree_compare::{compare_trees, CompareOptions};
use mount_util::{
    assert_no_differences, compare_views, mountinfo, require_mount, scratch, KernelMount,
    SifuseMount, ViewExceptions,
};
use sifuse::sif::{
    arch_code, host_arch, DataType, FsType, PartType, PartitionInfo, SifWriter, WriterObject,
};

fn gzip() -> &'static Path {
    fixtures().image("gzip")
}

/// (uid, gid) of every entry under `root`, by path relative to it.
fn owners_under(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let md = fs::symlink_metadata(root.join(&rel)).unwrap();
        out.push((rel.clone(), md.uid(), md.gid()));
        if md.is_dir() {
            for e in fs::read_dir(root.join(&rel)).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

#[test]
fn uid_and_gid_show_every_entry_with_one_owner() {
    require_mount();
    let kernel = KernelMount::new(gzip());
    let m = SifuseMount::daemon(gzip(), &["-o", "uid=1234", "--gid", "5678"]);
    let owners = owners_under(&m.mountpoint);
    assert!(owners.len() > 3000);
    for (path, uid, gid) in owners {
        assert_eq!((uid, gid), (1234, 5678), "{}", path.display());
    }
    // Nothing else changes.
    let diffs = compare_trees(
        &kernel.mountpoint,
        &m.mountpoint,
        &CompareOptions {
            owners: false,
            ..Default::default()
        },
    );
    assert_no_differences("uid=,gid=", &diffs);
}

#[test]
fn maps_shift_owner_ranges_like_a_user_namespace() {
    require_mount();
    let m = SifuseMount::daemon(
        gzip(),
        &[
            "--uidmap",
            "0:100000:1000",
            "--uidmap",
            "1000:5000:1",
            "-o",
            "gidmap=0:200000:65536",
        ],
    );
    let owner = |rel: &str| {
        let md = fs::symlink_metadata(m.path(rel)).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!(owner(""), (100000, 200000));
    assert_eq!(owner("owners/file-0-0"), (100000, 200000));
    assert_eq!(owner("owners/file-1000-1000"), (5000, 201000));
    assert_eq!(owner("owners/file-1000-0"), (5000, 200000));
    assert_eq!(owner("owners/file-65534-65534"), (65534, 265534));
    assert_eq!(owner("owners/file-12345-54321"), (65534, 254321));
    assert_eq!(owner("owners/file-65536-70000"), (65534, 65534));
    assert_eq!(owner("owners/file-4294967294-4294967294"), (65534, 65534));
    assert_eq!(owner("owners/symlink-4242"), (65534, 204343));
}

#[test]
fn subdir_serves_a_subtree_as_the_kernel_shows_it() {
    require_mount();
    let kernel = KernelMount::new(gzip());
    for subdir in ["links", "/names/", "bigdir"] {
        let m = SifuseMount::daemon(gzip(), &["--subdir", subdir]);
        let expected = kernel.mountpoint.join(subdir.trim_matches('/'));
        assert_no_differences(
            &format!("subdir={subdir}"),
            &compare_views(&expected, &m.mountpoint, ViewExceptions::default()),
        );
    }
}

/// gzip as the primary system partition and gzip-b4k (4 KiB blocks) as a data partition
/// named "data"; the block size tells which one a mount serves.
fn two_partition_sif(dir: &Path) -> PathBuf {
    let part = |name: &str, image: &str, part_type| {
        let info = PartitionInfo {
            fs_type: FsType::Squashfs,
            part_type,
            arch: arch_code(host_arch()).unwrap(),
        };
        WriterObject::partition(name, fixtures().image(image).to_path_buf(), info)
    };
    let sif = dir.join("two.sif");
    SifWriter {
        objects: vec![
            WriterObject::bytes(DataType::Deffile, "", b"bootstrap: scratch\n".to_vec()),
            part("rootfs", "gzip", PartType::PrimarySystem),
            part("data", "gzip-b4k", PartType::Data),
        ],
        arch: host_arch().into(),
        ..Default::default()
    }
    .write_file(&sif)
    .unwrap();
    sif
}

fn block_size(m: &SifuseMount) -> u64 {
    let c = std::ffi::CString::new(m.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: zeroed statvfs is a valid out buffer.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bsize
}

#[test]
fn partition_selects_the_sif_partition_served() {
    require_mount();
    let dir = scratch("partitions");
    let sif = two_partition_sif(dir.path());
    let hello = fs::read(fixtures().tree.join("hello.txt")).unwrap();
    for (args, bsize) in [
        (&[][..], 131072),
        (&["--partition", "data"][..], 4096),
        (&["-o", "partition=3"][..], 4096),
        (&["-o", "partition=rootfs"][..], 131072),
    ] {
        let m = SifuseMount::daemon(&sif, args);
        assert_eq!(block_size(&m), bsize, "{args:?}");
        assert_eq!(fs::read(m.path("hello.txt")).unwrap(), hello);
    }
    let (_d, mnt) = SifuseMount::new_mountpoint("partition-bad");
    let out = mount_util::run_sifuse_mount(&sif, &mnt, &["--partition", "nope"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{out:?}"
    );
}

#[test]
fn offset_finds_an_image_inside_another_file() {
    require_mount();
    let dir = scratch("offset");
    let wrapped = dir.path().join("wrapped.bin");
    let mut f = fs::File::create(&wrapped).unwrap();
    f.write_all(&vec![0xa5u8; 12345]).unwrap();
    f.write_all(&fs::read(fixtures().image("gzip-b4k")).unwrap())
        .unwrap();
    drop(f);
    let m = SifuseMount::daemon(&wrapped, &["-o", "offset=12345"]);
    assert_eq!(block_size(&m), 4096);
    assert_eq!(
        fs::read(m.path("hello.txt")).unwrap(),
        fs::read(fixtures().tree.join("hello.txt")).unwrap()
    );
}

/// Run `args` as user 65534 with no groups.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn allow_other_lets_others_in_and_the_kernel_enforces_mode_bits() {
    require_mount();
    let path = |m: &SifuseMount, rel: &str| m.path(rel).to_str().unwrap().to_string();

    // Without allow_other, nobody else gets in at all.
    let private = SifuseMount::daemon(gzip(), &[]);
    assert!(!as_nobody(&["cat", &path(&private, "modes/file-0644")])
        .status
        .success());
    drop(private);

    let m = SifuseMount::daemon(gzip(), &["--allow-other"]);
    let info = mountinfo(&m.mountpoint).unwrap();
    assert!(
        info.contains("default_permissions") && info.contains("allow_other"),
        "{info}"
    );
    let readable = as_nobody(&["cat", &path(&m, "modes/file-0644")]);
    assert!(readable.status.success(), "{readable:?}");
    assert_eq!(readable.stdout, b"mode 0644\n");
    let refused = as_nobody(&["cat", &path(&m, "modes/file-0600")]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );
    let dir = as_nobody(&["ls", &path(&m, "modes/dir-0700")]);
    assert!(!dir.status.success(), "{dir:?}");

    // An unprivileged caller lists xattrs as the kernel lists them (no trusted.*).
    let kernel = KernelMount::new(gzip());
    for rel in [
        "xattrs/all-namespaces",
        "xattrs/dir-with-xattrs",
        "xattrs/shared-1",
    ] {
        let dump = |root: &Path| {
            let out = as_nobody(&[
                "getfattr",
                "--absolute-names",
                "-h",
                "-d",
                "-m",
                "-",
                root.join(rel).to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).replace(root.to_str().unwrap(), "ROOT")
        };
        let (k, s) = (dump(&kernel.mountpoint), dump(&m.mountpoint));
        assert!(!s.contains("trusted."), "{s}");
        assert_eq!(k, s, "{rel}");
    }
}

/// Run `args` as `uid` (and group `uid`, no other groups).
fn as_user(uid: u32, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}")])
        .arg("--clear-groups")
        .args(args)
        .output()
        .unwrap()
}

/// Every kind of access the fixture offers, as `uid`: stat of the mount point and of a
/// file, listing, reading, a symlink, xattrs and a walk through a subtree.
fn every_access(m: &SifuseMount, uid: u32) -> Vec<(String, std::process::Output)> {
    let p = |rel: &str| m.path(rel).to_str().unwrap().to_string();
    let root = m.mountpoint.to_str().unwrap().to_string();
    let calls: Vec<Vec<String>> = vec![
        vec!["stat".into(), root.clone()],
        vec!["stat".into(), p("hello.txt")],
        vec!["ls".into(), root.clone()],
        vec!["ls".into(), "-l".into(), p("modes")],
        vec!["cat".into(), p("hello.txt")],
        vec!["readlink".into(), "-v".into(), p("symlinks/absolute")],
        vec!["getfattr".into(), "-d".into(), p("xattrs/user-only")],
        vec![
            "getfattr".into(),
            "-d".into(),
            "-m".into(),
            "-".into(),
            root.clone(),
        ],
        vec!["find".into(), p("deep")],
    ];
    calls
        .into_iter()
        .map(|args| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            (args.join(" "), as_user(uid, &refs))
        })
        .collect()
}

fn assert_all_allowed(m: &SifuseMount, uid: u32) {
    for (what, out) in every_access(m, uid) {
        assert!(out.status.success(), "uid {uid}: {what}: {out:?}");
    }
}

/// Every access refused with EACCES.
fn assert_all_refused(m: &SifuseMount, uid: u32) {
    for (what, out) in every_access(m, uid) {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Permission denied"),
            "uid {uid} got in: {what}: {out:?}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("squashfs"),
            "uid {uid} read the file: {what}: {out:?}"
        );
    }
}

/// `-o allow_root` as root, under sifuse's name and squashfuse_ll's: root reads and
/// lists everything, and then user 65534 — with every cache of the kernel warm — gets
/// EACCES for each access (it used to read files, list directories and stat anything,
/// since files and directories open without asking the server).
#[test]
fn allow_root_keeps_everyone_else_out_with_the_caches_warm() {
    require_mount();
    let dir = scratch("allow-root-bin");
    let compat = dir.path().join("squashfuse_ll");
    std::os::unix::fs::symlink(mount_util::SIFUSE, &compat).unwrap();
    for program in [Path::new(mount_util::SIFUSE), compat.as_path()] {
        let (mdir, mnt) = SifuseMount::new_mountpoint("allow-root");
        let mut cmd = Command::new(program);
        if program == Path::new(mount_util::SIFUSE) {
            cmd.arg("mount");
        }
        let out = mount_util::run_to_exit(cmd.args(["-o", "allow_root"]).arg(gzip()).arg(&mnt));
        let m = SifuseMount::adopt(mdir, mnt, None);
        assert!(out.status.success(), "{}: {out:?}", program.display());
        assert_all_allowed(&m, 0);
        assert_all_refused(&m, 65534);
        assert_all_allowed(&m, 0);
        // Root owns it: the kernel itself admits only root, no allow_other needed.
        let info = mountinfo(&m.mountpoint).unwrap();
        assert!(!info.contains("allow_other"), "{info}");
    }
}

/// `-o allow_root` with an owner who is not root (a setuid-root starter running sifuse
/// for user 1000): the owner and root read everything, user 65534 is refused each access
/// with the caches warm (the kernel must let everyone reach the server here, which
/// refuses them and keeps no attributes in the kernel).
#[test]
fn allow_root_for_another_owner_admits_only_that_owner_and_root() {
    require_mount();
    let (mdir, mnt) = SifuseMount::new_mountpoint("allow-root-user");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--ruid=1000", "--rgid=1000", "--clear-groups"])
        .args([mount_util::SIFUSE, "mount", "-o", "allow_root"])
        .arg(gzip())
        .arg(&mnt);
    let out = mount_util::run_to_exit(&mut cmd);
    let m = SifuseMount::adopt(mdir, mnt, None);
    assert!(out.status.success(), "{out:?}");
    let info = mountinfo(&m.mountpoint).unwrap();
    assert!(
        info.contains("user_id=1000") && info.contains("allow_other"),
        "{info}"
    );
    assert_all_allowed(&m, 1000);
    assert_all_allowed(&m, 0);
    assert_all_refused(&m, 65534);
    assert_all_refused(&m, 1001);
    assert_all_allowed(&m, 1000);
}

#[test]
fn mounts_are_read_only_nosuid_and_nodev_unless_asked() {
    require_mount();
    let options = |m: &SifuseMount| -> Vec<String> {
        let info = mountinfo(&m.mountpoint).unwrap();
        info.split(' ')
            .nth(5)
            .unwrap()
            .split(',')
            .map(str::to_string)
            .collect()
    };
    let m = SifuseMount::daemon(gzip(), &[]);
    let opts = options(&m);
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(
            opts.iter().any(|o| o == flag),
            "{flag} missing from {opts:?}"
        );
    }
    let info = mountinfo(&m.mountpoint).unwrap();
    assert!(info.contains(" - fuse.sifuse "), "{info}");
    for attempt in [
        fs::write(m.path("new-file"), b"x"),
        fs::create_dir(m.path("new-dir")),
        fs::OpenOptions::new()
            .append(true)
            .open(m.path("hello.txt"))
            .map(drop),
        fs::remove_file(m.path("hello.txt")),
    ] {
        assert_eq!(attempt.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
    drop(m);

    let m = SifuseMount::daemon(
        gzip(),
        &["-o", "suid,dev,fsname=my-image,subtype=squashfuse_ll"],
    );
    let opts = options(&m);
    assert!(opts.iter().any(|o| o == "ro"), "{opts:?}");
    assert!(
        !opts.iter().any(|o| o == "nosuid" || o == "nodev"),
        "{opts:?}"
    );
    let info = mountinfo(&m.mountpoint).unwrap();
    assert!(info.contains(" - fuse.squashfuse_ll my-image "), "{info}");
}
