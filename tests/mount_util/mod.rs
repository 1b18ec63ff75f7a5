//! Helpers of the `tests/mount_*.rs` tests: running `sifuse mount`, kernel mounts of the
//! same images, guards that leave nothing mounted when a test fails, and the comparison of
//! what the kernel shows with what sifuse shows beyond what `tree_compare` covers (st_ino,
//! st_blocks, all three times, st_blksize, directory order and d_ino, xattr size probes,
//! statfs).
#![allow(dead_code)]

pub mod hammer;
pub mod images;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::fixtures::target_tmpdir;
use crate::common::tree_compare::{compare_trees, CompareOptions};

/// The sifuse binary under test.
pub const SIFUSE: &str = env!("CARGO_BIN_EXE_sifuse");

/// Stop a test that needs to mount (root and /dev/fuse) where it cannot, with the reason:
/// a test that did not run must not be counted as passed.
pub fn require_mount() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    assert!(
        root && fuse,
        "this test mounts: it needs root and /dev/fuse (root: {root}, /dev/fuse: {fuse}), so it \
         did not run; run it as root (scripts/test.sh) on a machine with FUSE"
    );
}

/// A scratch directory under the cargo target directory.
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    let base = target_tmpdir();
    fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("mount-{prefix}-"))
        .tempdir_in(base)
        .unwrap()
}

/// The mountinfo line of the mount at `path`, if there is one (the topmost, if stacked).
pub fn mountinfo(path: &Path) -> Option<String> {
    sifuse::mount::mountinfo::line_at(path).unwrap()
}

pub fn is_mounted(path: &Path) -> bool {
    mountinfo(path).is_some()
}

/// Wait up to `limit` for `cond`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Lazily unmount whatever is at `path`.
pub fn force_unmount(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    while is_mounted(path) {
        // SAFETY: a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}

/// Processes whose command line mentions `needle`.
pub fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_bytes();
    pids_with_arg(|arg| arg == needle)
}

/// Processes with a command-line argument for which `matches` holds.
pub fn pids_with_arg(matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(&matches) {
            pids.push(pid);
        }
    }
    pids
}

/// A sifuse mount in a scratch directory; dropping it unmounts and ends the server.
pub struct SifuseMount {
    _dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
    /// The foreground server, when mounted with -f.
    pub child: Option<Child>,
}

impl SifuseMount {
    /// A fresh mount point that every user can reach (tests read as other users).
    pub fn new_mountpoint(prefix: &str) -> (tempfile::TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch(prefix);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        (dir, mnt)
    }

    /// `sifuse mount IMAGE MNT ARGS` as a daemon; panics unless it exits 0 with the mount
    /// live.
    pub fn daemon(image: &Path, args: &[&str]) -> SifuseMount {
        let (dir, mnt) = Self::new_mountpoint("d");
        let out = run_sifuse_mount(image, &mnt, args);
        let m = SifuseMount {
            _dir: dir,
            mountpoint: mnt,
            child: None,
        };
        assert!(
            out.status.success(),
            "sifuse mount {} failed ({}): {}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            is_mounted(&m.mountpoint),
            "exit 0 but nothing mounted at {}",
            m.mountpoint.display()
        );
        m
    }

    /// `sifuse mount -f IMAGE MNT ARGS`; returns once the mount shows in mountinfo.
    pub fn foreground(image: &Path, args: &[&str]) -> SifuseMount {
        let (dir, mnt) = Self::new_mountpoint("f");
        let child = Command::new(SIFUSE)
            .arg("mount")
            .arg("-f")
            .arg(image)
            .arg(&mnt)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut m = SifuseMount {
            _dir: dir,
            mountpoint: mnt,
            child: Some(child),
        };
        let mounted = wait_for(Duration::from_secs(20), || {
            is_mounted(&m.mountpoint) || m.child.as_mut().unwrap().try_wait().unwrap().is_some()
        });
        assert!(
            mounted && is_mounted(&m.mountpoint),
            "sifuse mount -f did not mount: {:?}",
            m.child_output()
        );
        m
    }

    /// Take charge of a mount made some other way, so that dropping it cleans up.
    pub fn adopt(dir: tempfile::TempDir, mountpoint: PathBuf, child: Option<Child>) -> SifuseMount {
        SifuseMount {
            _dir: dir,
            mountpoint,
            child,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// The daemon serving this mount (daemon mode).
    pub fn daemon_pid(&self) -> i32 {
        let pids = pids_mentioning(&self.mountpoint);
        assert_eq!(
            pids.len(),
            1,
            "expected one server for {}: {pids:?}",
            self.mountpoint.display()
        );
        pids[0]
    }

    /// Wait for the foreground server to exit; its status and stderr.
    pub fn child_output(&mut self) -> Option<Output> {
        self.child.take().map(|c| c.wait_with_output().unwrap())
    }
}

impl Drop for SifuseMount {
    fn drop(&mut self) {
        force_unmount(&self.mountpoint);
        if let Some(mut c) = self.child.take() {
            if !wait_for(Duration::from_secs(5), || c.try_wait().unwrap().is_some()) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // A daemon ends once its mount is gone; do not leave one behind either way.
        let mnt = self.mountpoint.clone();
        if !wait_for(Duration::from_secs(5), || pids_mentioning(&mnt).is_empty()) {
            for pid in pids_mentioning(&mnt) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Run `sifuse mount IMAGE MNT ARGS` and wait for the command (not the daemon) to exit.
pub fn run_sifuse_mount(image: &Path, mnt: &Path, args: &[&str]) -> Output {
    run_to_exit(
        Command::new(SIFUSE)
            .arg("mount")
            .arg(image)
            .arg(mnt)
            .args(args),
    )
}

/// Run a command that mounts and returns (leaving a daemon behind), with its output
/// captured; panics unless it exits within 30 s.
pub fn run_to_exit(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Exits once the mount is live; the daemon must not hold our pipes (wait_with_output
    // reads them to EOF, so a daemon that kept them would hang this call).
    let limit = Instant::now() + Duration::from_secs(30);
    // Short sleeps first: a mount usually takes a few milliseconds, and the corruption
    // suite mounts thousands of images.
    let mut pause = Duration::from_millis(1);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < limit,
            "sifuse mount did not return within 30 s"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The kernel's squashfs driver mounting an image read-only; dropping it unmounts.
pub struct KernelMount {
    _dir: tempfile::TempDir,
    pub mountpoint: PathBuf,
}

impl KernelMount {
    pub fn new(image: &Path) -> KernelMount {
        let (dir, mnt) = SifuseMount::new_mountpoint("k");
        // A loop device drops a partial last sector, where a -nopad image may end: the
        // kernel mounts a zero-padded copy (sifuse reads the file and needs no padding).
        let len = fs::metadata(image).unwrap().len();
        let image = if len % 4096 == 0 {
            image.to_path_buf()
        } else {
            let copy = dir.path().join("padded.sqfs");
            fs::copy(image, &copy).unwrap();
            fs::OpenOptions::new()
                .write(true)
                .open(&copy)
                .unwrap()
                .set_len(len.next_multiple_of(4096))
                .unwrap();
            copy
        };
        let out = Command::new("mount")
            .args(["-t", "squashfs", "-o", "loop,ro"])
            .arg(&image)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kernel mount of {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        KernelMount {
            _dir: dir,
            mountpoint: mnt,
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        force_unmount(&self.mountpoint);
    }
}

/// What `compare_views` may let differ.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewExceptions {
    /// statfs block count (images of the same tree by different compressors differ).
    pub statfs_blocks: bool,
}

/// Every difference between the kernel's view at `kernel` and sifuse's at `sifuse`.
pub fn compare_views(kernel: &Path, sifuse: &Path, except: ViewExceptions) -> Vec<String> {
    let opts = CompareOptions {
        dir_sizes: true,
        dir_nlink: true,
        ..CompareOptions::default()
    };
    let mut diffs = compare_trees(kernel, sifuse, &opts);
    compare_walk(kernel, sifuse, Path::new(""), &mut diffs);
    compare_statfs(kernel, sifuse, except, &mut diffs);
    diffs
}

/// Directory order, d_ino and d_type, and the stat fields tree_compare leaves out.
fn compare_walk(kernel: &Path, sifuse: &Path, rel: &Path, diffs: &mut Vec<String>) {
    let list = |root: &Path| -> Vec<(Vec<u8>, u64, bool)> {
        fs::read_dir(root.join(rel))
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", root.join(rel).display()))
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().as_bytes().to_vec(),
                    e.ino(),
                    e.file_type().unwrap().is_dir(),
                )
            })
            .collect()
    };
    let (k, s) = (list(kernel), list(sifuse));
    if k != s {
        let first = k.iter().zip(&s).find(|(a, b)| a != b);
        diffs.push(format!(
            "{}: readdir differs (order, d_ino or type); first: {first:?}",
            rel.display()
        ));
    }
    compare_stat(kernel, sifuse, rel, diffs);
    for (name, _, is_dir) in k {
        let child = rel.join(std::ffi::OsStr::from_bytes(&name));
        if is_dir {
            compare_walk(kernel, sifuse, &child, diffs);
        } else {
            compare_stat(kernel, sifuse, &child, diffs);
        }
    }
}

fn compare_stat(kernel: &Path, sifuse: &Path, rel: &Path, diffs: &mut Vec<String>) {
    let (Ok(k), Ok(s)) = (
        fs::symlink_metadata(kernel.join(rel)),
        fs::symlink_metadata(sifuse.join(rel)),
    ) else {
        diffs.push(format!("{}: lstat fails on one side", rel.display()));
        return;
    };
    let fields = [
        ("st_ino", k.ino(), s.ino()),
        ("st_blocks", k.blocks(), s.blocks()),
        ("st_blksize", k.blksize(), s.blksize()),
        ("st_atime", k.atime() as u64, s.atime() as u64),
        ("st_ctime", k.ctime() as u64, s.ctime() as u64),
        ("st_mtime", k.mtime() as u64, s.mtime() as u64),
        ("st_nlink", k.nlink(), s.nlink()),
        ("st_size", k.size(), s.size()),
        ("st_mode", u64::from(k.mode()), u64::from(s.mode())),
        ("st_rdev", k.rdev(), s.rdev()),
    ];
    for (what, a, b) in fields {
        if a != b {
            diffs.push(format!("{}: {what}: kernel {a}, sifuse {b}", rel.display()));
        }
    }
    compare_xattr_probes(&kernel.join(rel), &sifuse.join(rel), rel, diffs);
}

/// llistxattr / lgetxattr with a null buffer, an exact one, a one-byte-short one (ERANGE)
/// and an absent or foreign name: errno and sizes must match.
fn compare_xattr_probes(kernel: &Path, sifuse: &Path, rel: &Path, diffs: &mut Vec<String>) {
    fn list(path: &Path, size: usize) -> Result<Vec<u8>, i32> {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; size];
        // SAFETY: buf is valid for size bytes (a null pointer when empty, as the call allows).
        let n = unsafe {
            libc::llistxattr(
                c.as_ptr(),
                if size == 0 {
                    std::ptr::null_mut()
                } else {
                    buf.as_mut_ptr().cast()
                },
                size,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
        }
        buf.truncate(if size == 0 { 0 } else { n as usize });
        Ok(if size == 0 {
            n.to_string().into_bytes()
        } else {
            buf
        })
    }
    fn get(path: &Path, name: &[u8], size: usize) -> Result<Vec<u8>, i32> {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n_c = CString::new(name).unwrap();
        let mut buf = vec![0u8; size];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                n_c.as_ptr(),
                if size == 0 {
                    std::ptr::null_mut()
                } else {
                    buf.as_mut_ptr().cast()
                },
                size,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
        }
        buf.truncate(if size == 0 { 0 } else { n as usize });
        Ok(if size == 0 {
            n.to_string().into_bytes()
        } else {
            buf
        })
    }
    let mut check = |what: String, a: Result<Vec<u8>, i32>, b: Result<Vec<u8>, i32>| {
        if a != b {
            diffs.push(format!(
                "{}: {what}: kernel {a:?}, sifuse {b:?}",
                rel.display()
            ));
        }
    };
    let size = list(kernel, 0)
        .ok()
        .and_then(|s| String::from_utf8(s).ok()?.parse::<usize>().ok());
    check(
        "llistxattr(size 0)".into(),
        list(kernel, 0),
        list(sifuse, 0),
    );
    let Some(size) = size else { return };
    if size > 0 {
        check(
            "llistxattr(one byte short)".into(),
            list(kernel, size - 1),
            list(sifuse, size - 1),
        );
    }
    let names = list(kernel, size).unwrap_or_default();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let shown = String::from_utf8_lossy(name);
        let len = get(kernel, name, 0);
        check(
            format!("lgetxattr({shown}, size 0)"),
            len.clone(),
            get(sifuse, name, 0),
        );
        let Some(len) = len
            .ok()
            .and_then(|s| String::from_utf8(s).ok()?.parse::<usize>().ok())
        else {
            continue;
        };
        check(
            format!("lgetxattr({shown})"),
            get(kernel, name, len),
            get(sifuse, name, len),
        );
        if len > 0 {
            check(
                format!("lgetxattr({shown}, one byte short)"),
                get(kernel, name, len - 1),
                get(sifuse, name, len - 1),
            );
        }
    }
    for absent in [
        &b"user.sifuse-absent"[..],
        b"trusted.sifuse-absent",
        b"system.sifuse",
        b"bogus.name",
    ] {
        let shown = String::from_utf8_lossy(absent);
        check(
            format!("lgetxattr({shown})"),
            get(kernel, absent, 64),
            get(sifuse, absent, 64),
        );
    }
}

fn compare_statfs(kernel: &Path, sifuse: &Path, except: ViewExceptions, diffs: &mut Vec<String>) {
    let statvfs = |p: &Path| {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: zeroed statvfs is a valid out buffer.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::statvfs(c.as_ptr(), &mut s) },
            0,
            "statvfs {}",
            p.display()
        );
        s
    };
    let (k, s) = (statvfs(kernel), statvfs(sifuse));
    // sifuse mounts nosuid,nodev by default; the kernel mount here is neither.
    let flags = |f: u64| f & !(libc::ST_NOSUID | libc::ST_NODEV);
    let mut fields = vec![
        ("f_bsize", k.f_bsize, s.f_bsize),
        ("f_frsize", k.f_frsize, s.f_frsize),
        ("f_bfree", k.f_bfree, s.f_bfree),
        ("f_bavail", k.f_bavail, s.f_bavail),
        ("f_files", k.f_files, s.f_files),
        ("f_ffree", k.f_ffree, s.f_ffree),
        ("f_favail", k.f_favail, s.f_favail),
        ("f_namemax", k.f_namemax, s.f_namemax),
        ("f_flag", flags(k.f_flag), flags(s.f_flag)),
    ];
    if !except.statfs_blocks {
        fields.push(("f_blocks", k.f_blocks, s.f_blocks));
    }
    for (what, a, b) in fields {
        if a != b {
            diffs.push(format!("statfs {what}: kernel {a}, sifuse {b}"));
        }
    }
}

/// Fail with every difference listed (the first 50).
pub fn assert_no_differences(what: &str, diffs: &[String]) {
    assert!(
        diffs.is_empty(),
        "{what}: {} differences between the kernel and sifuse:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `image` wrapped in a SIF as its primary system partition, after a definition file.
pub fn wrap_in_sif(image: &Path, dir: &Path) -> PathBuf {
    use sifuse::sif::{
        arch_code, host_arch, DataType, FsType, PartType, PartitionInfo, SifWriter, WriterObject,
    };
    let sif = dir.join("image.sif");
    let info = PartitionInfo {
        fs_type: FsType::Squashfs,
        part_type: PartType::PrimarySystem,
        arch: arch_code(host_arch()).unwrap(),
    };
    SifWriter {
        objects: vec![
            WriterObject::bytes(DataType::Deffile, "", b"bootstrap: scratch\n".to_vec()),
            WriterObject::partition("rootfs", image.to_path_buf(), info),
        ],
        arch: host_arch().into(),
        ..Default::default()
    }
    .write_file(&sif)
    .unwrap();
    sif
}

/// Where the served partition of a SIF starts: the `offset=N` a launcher passes.
pub fn partition_offset(sif: &Path) -> u64 {
    let bytes = fs::read(sif).unwrap();
    let parsed = sifuse::sif::SifImage::parse(&bytes).unwrap();
    u64::try_from(parsed.select_partition(None).unwrap().offset).unwrap()
}

/// What a setuid starter does: open /dev/fuse and mount it on `mnt` as `fuse.NAME` (source
/// NAME), read-only, nosuid, nodev. Returns the descriptor, at `min_fd` or above and
/// inheritable, for the server to be handed as `/dev/fd/N`; the caller closes its copy.
pub fn mount_fuse_descriptor(mnt: &Path, name: &str, min_fd: i32) -> i32 {
    let dev = CString::new("/dev/fuse").unwrap();
    // SAFETY: plain open(2), fcntl(2) and close(2) on descriptors this function owns.
    let fd = unsafe {
        let opened = libc::open(dev.as_ptr(), libc::O_RDWR);
        assert!(
            opened >= 0,
            "open /dev/fuse: {}",
            std::io::Error::last_os_error()
        );
        let moved = libc::fcntl(opened, libc::F_DUPFD, min_fd);
        libc::close(opened);
        moved
    };
    assert!(
        fd >= min_fd,
        "fcntl F_DUPFD: {}",
        std::io::Error::last_os_error()
    );
    let data = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0")).unwrap();
    let (src, target, fstype) = (
        CString::new(name).unwrap(),
        CString::new(mnt.as_os_str().as_bytes()).unwrap(),
        CString::new(format!("fuse.{name}")).unwrap(),
    );
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
    fd
}

/// Have `cmd`'s child find `fd` as its descriptor 3, inheritable, as launchers pass an
/// image or a control socket. (When `fd` already is 3, dup2 would leave its close-on-exec
/// flag set, so the flag is cleared instead.)
pub fn pass_as_fd3(cmd: &mut Command, fd: i32) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 and fcntl only, both async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
