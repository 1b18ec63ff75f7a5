//! The life of a mount: daemon and foreground modes, unmounting ending the server, signals,
//! the idle timeout, the notify pipe, failures that leave nothing mounted, mounting as an
//! ordinary user through fusermount3, and serving a /dev/fuse descriptor mounted by
//! someone else (`/dev/fd/N`, Apptainer's setuid flow).

mod common;
mod mount_util;

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::fixtures;
use mount_util::{
    is_mounted, pids_mentioning, require_mount, run_sifuse_mount, wait_for, SifuseMount, SIFUSE,
};

const HELLO: &str = "hello.txt";

fn gzip() -> &'static Path {
    fixtures().image("gzip")
}

fn expected_hello() -> Vec<u8> {
    fs::read(fixtures().tree.join(HELLO)).unwrap()
}

/// The mount answers with the image's content, from a file system other than the parent's.
fn assert_serving(m: &SifuseMount) {
    let parent = m.mountpoint.parent().unwrap();
    assert_ne!(
        fs::metadata(&m.mountpoint).unwrap().dev(),
        fs::metadata(parent).unwrap().dev()
    );
    assert_eq!(fs::read(m.path(HELLO)).unwrap(), expected_hello());
}

fn gone(m: &SifuseMount) -> bool {
    !is_mounted(&m.mountpoint) && pids_mentioning(&m.mountpoint).is_empty()
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

#[test]
fn daemon_returns_once_live_and_ends_with_its_mount() {
    require_mount();
    let (dir, mnt) = SifuseMount::new_mountpoint("daemon");
    // run_sifuse_mount reads stdout and stderr to EOF: it returns only because the daemon
    // let go of them.
    let out = run_sifuse_mount(gzip(), &mnt, &[]);
    let m = SifuseMount::adopt(dir, mnt, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    // Live as soon as the command returned.
    assert_serving(&m);
    let pid = m.daemon_pid();
    let fds: Vec<_> = (0..3)
        .map(|fd| fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap())
        .collect();
    assert!(
        fds.iter().all(|p| p == Path::new("/dev/null")),
        "daemon stdio: {fds:?}"
    );

    let status = Command::new("umount").arg(&m.mountpoint).status().unwrap();
    assert!(status.success());
    assert!(
        wait_for(Duration::from_secs(5), || gone(&m)),
        "the daemon outlived its mount"
    );
}

#[test]
fn foreground_server_exits_0_when_unmounted() {
    require_mount();
    let mut m = SifuseMount::foreground(gzip(), &[]);
    assert_serving(&m);
    assert!(
        m.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "foreground server still runs"
    );
    let status = Command::new("fusermount3")
        .arg("-u")
        .arg(&m.mountpoint)
        .status()
        .unwrap();
    assert!(status.success());
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(gone(&m));
}

#[test]
fn debug_logs_every_request_in_the_foreground() {
    require_mount();
    let mut m = SifuseMount::foreground(gzip(), &["-d"]);
    assert_serving(&m);
    assert!(fs::metadata(m.path("no-such-name")).is_err());
    mount_util::force_unmount(&m.mountpoint);
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    for request in [
        "LOOKUP name \"hello.txt\"",
        "LOOKUP name \"no-such-name\"",
        "OPEN",
        "READ",
    ] {
        assert!(
            log.contains(request),
            "no {request} in the debug log:\n{log}"
        );
    }
}

/// Requests of one kind in a `-d` log: lines naming `what` (e.g. "OPEN flags").
fn logged(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// How often the open tests read hello.txt and list the root.
const ROUNDS: usize = 10;

/// Read hello.txt and list the root ROUNDS times each on a `-d` mount with `opts`;
/// returns the log.
fn log_of_reads_and_listings(opts: &[&str]) -> String {
    let mut args = vec!["-d"];
    args.extend_from_slice(opts);
    let mut m = SifuseMount::foreground(gzip(), &args);
    assert_serving(&m);
    for _ in 0..ROUNDS {
        assert_eq!(fs::read(m.path(HELLO)).unwrap(), expected_hello());
        let names: Vec<_> = fs::read_dir(&m.mountpoint)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.iter().any(|n| n == HELLO), "{names:?}");
    }
    mount_util::force_unmount(&m.mountpoint);
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn files_and_directories_open_without_a_round_trip() {
    require_mount();
    let log = log_of_reads_and_listings(&[]);
    // The first open and opendir are answered ENOSYS, and the kernel asks no more (two
    // that were in flight together may both be asked). No handle is ever given, so
    // nothing is released; at most one flush teaches the kernel not to flush.
    assert!(logged(&log, "OPEN flags") <= 2, "{log}");
    assert!(logged(&log, "OPENDIR flags") <= 2, "{log}");
    assert_eq!(logged(&log, "RELEASE fh"), 0, "{log}");
    assert_eq!(logged(&log, "RELEASEDIR fh"), 0, "{log}");
    assert!(logged(&log, "FLUSH fh") <= 2, "{log}");
}

#[test]
fn an_idle_timeout_has_every_open_asked() {
    require_mount();
    let log = log_of_reads_and_listings(&["-o", "timeout=600"]);
    // The timeout must know what is open, so every open is asked (hello.txt was read once
    // more by assert_serving) and handles are given. Releases travel in the background
    // and may be cut off by the unmount; idle_timeout_waits_for_open_files shows they
    // are counted.
    assert_eq!(logged(&log, "OPEN flags"), ROUNDS + 1, "{log}");
    assert!(logged(&log, "OPENDIR flags") >= ROUNDS, "{log}");
    assert!(logged(&log, "RELEASE fh") >= 1, "{log}");
}

/// Reading one small file pushes its directory's other small files (same fragment block)
/// into the page cache: reading them afterwards sends the server no READ, and they read
/// back exactly as stored.
#[test]
fn reading_one_small_file_pushes_its_siblings_into_the_page_cache() {
    require_mount();
    let scratch = mount_util::scratch("push");
    let tree = scratch.path().join("tree");
    let pkg = tree.join("pkg");
    fs::create_dir_all(&pkg).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let body = format!("# module {i}\n").repeat(20 + i * 7).into_bytes();
            (format!("mod{i:02}.py"), body)
        })
        .collect();
    for (name, body) in &files {
        fs::write(pkg.join(name), body).unwrap();
    }
    let image = gzip_image(&tree, &scratch.path().join("push.sqfs"));

    let mut m = SifuseMount::foreground(&image, &["-d"]);
    // List first, as tar does: readdirplus hands the kernel every file's node.
    let listed = fs::read_dir(m.path("pkg")).unwrap().count();
    assert_eq!(listed, files.len());
    assert_eq!(fs::read(m.path("pkg/mod00.py")).unwrap(), files[0].1);
    // The push runs after the reply, on its own thread: wait until the kernel holds every
    // sibling's page (mincore asks without reading).
    let pushed = wait_for(Duration::from_secs(10), || {
        files[1..]
            .iter()
            .all(|(name, _)| resident(&m.path(&format!("pkg/{name}"))))
    });
    assert!(
        pushed,
        "the siblings of mod00.py never reached the page cache"
    );
    for (name, body) in &files {
        let got = fs::read(m.path(&format!("pkg/{name}"))).unwrap();
        assert!(got == *body, "{name} differs from what was stored");
    }
    mount_util::force_unmount(&m.mountpoint);
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(logged(&log, " READ fh"), 1, "{log}");
}

/// One fragment block holding the small files of two directories: the second directory's
/// files are pushed when its first file is read, although the block was pushed before
/// (for the first directory, when the kernel had not yet looked up the second's files and
/// refused them). Two READs for twenty files.
#[test]
fn a_fragment_block_shared_by_two_directories_is_pushed_for_each() {
    require_mount();
    let scratch = mount_util::scratch("push2");
    let tree = scratch.path().join("tree");
    let mut files = Vec::new();
    for dir in ["a", "b"] {
        fs::create_dir_all(tree.join(dir)).unwrap();
        for i in 0..10 {
            let body = format!("# {dir} {i}\n").repeat(100 + i * 13).into_bytes();
            let name = format!("{dir}/f{i:02}.py");
            fs::write(tree.join(&name), &body).unwrap();
            files.push((name, body));
        }
    }
    let image = gzip_image(&tree, &scratch.path().join("push2.sqfs"));

    let mut m = SifuseMount::foreground(&image, &["-d"]);
    for dir in ["a", "b"] {
        // As tar does: list the directory, read its first file, then the others.
        assert_eq!(fs::read_dir(m.path(dir)).unwrap().count(), 10);
        let prefix = format!("{dir}/");
        let mine: Vec<_> = files
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .collect();
        assert_eq!(fs::read(m.path(&mine[0].0)).unwrap(), mine[0].1);
        let pushed = wait_for(Duration::from_secs(10), || {
            mine[1..].iter().all(|(name, _)| resident(&m.path(name)))
        });
        assert!(
            pushed,
            "the files of {dir}/ after its first were not pushed"
        );
    }
    for (name, body) in &files {
        assert!(fs::read(m.path(name)).unwrap() == *body, "{name} differs");
    }
    mount_util::force_unmount(&m.mountpoint);
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(logged(&log, " READ fh"), 2, "{log}");
}

/// `tree` packed by mksquashfs (gzip) into `image`.
fn gzip_image(tree: &Path, image: &Path) -> std::path::PathBuf {
    let out = Command::new("mksquashfs")
        .arg(tree)
        .arg(image)
        .args(["-quiet", "-no-progress", "-comp", "gzip"])
        .output()
        .expect("squashfs-tools must be installed (mksquashfs)");
    assert!(out.status.success(), "mksquashfs: {out:?}");
    image.to_path_buf()
}

/// Whether every page of the file at `path` is in the page cache.
fn resident(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    if len == 0 {
        return true;
    }
    // SAFETY: a fresh read-only shared mapping of an open file, only passed to mincore
    // and unmapped; the vector has a byte per page of it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let mut pages = vec![0u8; len.div_ceil(page)];
        let rc = libc::mincore(addr, len, pages.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(rc, 0, "mincore {}", path.display());
        pages.iter().all(|p| p & 1 == 1)
    }
}

#[test]
fn sigterm_unmounts_and_ends_the_daemon() {
    require_mount();
    let m = SifuseMount::daemon(gzip(), &[]);
    assert_serving(&m);
    kill(m.daemon_pid(), libc::SIGTERM);
    assert!(wait_for(Duration::from_secs(5), || gone(&m)));
}

#[test]
fn sigint_ends_a_busy_foreground_mount() {
    require_mount();
    let mut m = SifuseMount::foreground(gzip(), &[]);
    // An open file keeps the lazily unmounted file system alive; the server still goes.
    let mut busy = fs::File::open(m.path(HELLO)).unwrap();
    kill(m.child.as_ref().unwrap().id() as i32, libc::SIGINT);
    let start = Instant::now();
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(gone(&m));
    let mut buf = Vec::new();
    assert!(
        busy.read_to_end(&mut buf).is_err(),
        "the connection is gone"
    );
}

#[test]
fn idle_timeout_waits_for_open_files() {
    require_mount();
    let m = SifuseMount::daemon(gzip(), &["-o", "timeout=1"]);
    let open = fs::File::open(m.path(HELLO)).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(is_mounted(&m.mountpoint), "unmounted while a file was open");
    drop(open);
    let closed = Instant::now();
    assert!(
        wait_for(Duration::from_secs(6), || gone(&m)),
        "no idle unmount"
    );
    assert!(
        closed.elapsed() >= Duration::from_millis(900),
        "unmounted before the timeout"
    );
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Read the notify FIFO on a thread, as a launcher does while sifuse starts.
fn notify_reader(fifo: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let fifo = fifo.to_path_buf();
    std::thread::spawn(move || fs::read(fifo).unwrap())
}

#[test]
fn notify_pipe_reports_s_when_live() {
    require_mount();
    let dir = mount_util::scratch("notify-s");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let reader = notify_reader(&fifo);
    let opt = format!("notify_pipe={}", fifo.display());
    let m = SifuseMount::daemon(gzip(), &["-o", &opt]);
    assert_eq!(reader.join().unwrap(), b"s");
    assert_serving(&m);
}

#[test]
fn notify_pipe_reports_f_on_failure() {
    require_mount();
    let dir = mount_util::scratch("notify-f");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let reader = notify_reader(&fifo);
    let (_mdir, mnt) = SifuseMount::new_mountpoint("notify-f");
    let out = run_sifuse_mount(
        Path::new("/etc/passwd"),
        &mnt,
        &["--notify-pipe", fifo.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert_eq!(reader.join().unwrap(), b"f");
    assert!(!is_mounted(&mnt));
}

/// A notify_pipe that is a symlink to a regular file, or a regular file: the mount is
/// refused with one line, and the file keeps every byte (it used to get `s` written over
/// its first one).
#[test]
fn notify_pipe_writes_only_to_a_fifo() {
    require_mount();
    let dir = mount_util::scratch("notify-file");
    let file = dir.path().join("precious");
    fs::write(&file, "keep").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    for target in [&link, &file] {
        let (_mdir, mnt) = SifuseMount::new_mountpoint("notify-file");
        let opt = format!("notify_pipe={}", target.display());
        let out = run_sifuse_mount(gzip(), &mnt, &["-o", &opt]);
        assert_one_clear_line(&out, "not a FIFO");
        assert!(!is_mounted(&mnt));
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    }
}

/// An IMAGE that is a FIFO nobody writes to: refused with one line at once, in the
/// foreground too (open(2) used to wait for a writer forever).
#[test]
fn a_fifo_as_image_is_refused_at_once() {
    require_mount();
    let dir = mount_util::scratch("fifo-image");
    let fifo = dir.path().join("image.sqfs");
    mkfifo(&fifo);
    let (_mdir, mnt) = SifuseMount::new_mountpoint("fifo-image");
    for args in [&[][..], &["-f"]] {
        let out = run_sifuse_mount(&fifo, &mnt, args);
        assert_one_clear_line(&out, "is a FIFO");
        assert!(!is_mounted(&mnt));
    }
}

/// An image on a block device (here a read-only loop device over a fixture, as a site
/// might keep images on a disk partition) mounts and reads as the file does: its size is
/// the device's, which the file's metadata does not give.
#[test]
fn a_block_device_image_mounts_as_the_file_does() {
    require_mount();
    let image = fixtures().image("zstd");
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(image)
        .output()
        .expect("losetup (util-linux)");
    assert!(out.status.success(), "losetup: {out:?}");
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _loop = Loop(device.clone());
    let kernel = mount_util::KernelMount::new(image);
    let m = SifuseMount::daemon(Path::new(&device), &[]);
    mount_util::assert_no_differences(
        "zstd on a loop device",
        &mount_util::compare_views(
            &kernel.mountpoint,
            &m.mountpoint,
            mount_util::ViewExceptions::default(),
        ),
    );
}

/// One line on stderr, starting "sifuse: ", and mentioning `what`.
fn assert_one_clear_line(out: &std::process::Output, what: &str) {
    assert!(!out.status.success(), "should fail: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("sifuse: ") && err.contains(what),
        "{err:?} should mention {what:?}"
    );
}

#[test]
fn failures_say_why_in_one_line_and_leave_nothing_mounted() {
    require_mount();
    let (_dir, mnt) = SifuseMount::new_mountpoint("fail");
    let file = mnt.parent().unwrap().join("file");
    fs::write(&file, b"x").unwrap();
    let cases: [(&Path, &Path, &[&str], &str); 6] = [
        (
            Path::new("/etc/passwd"),
            &mnt,
            &[],
            "not a SIF or SquashFS image",
        ),
        (Path::new("/nonexistent.sif"), &mnt, &[], "/nonexistent.sif"),
        (
            gzip(),
            Path::new("/nonexistent/mnt"),
            &[],
            "mount point /nonexistent/mnt",
        ),
        (gzip(), &file, &[], "not a directory"),
        (gzip(), &mnt, &["-o", "subdir=hello.txt"], "not a directory"),
        (gzip(), &mnt, &["-o", "rw"], "read-only"),
    ];
    for (image, target, args, what) in cases {
        let out = run_sifuse_mount(image, target, args);
        assert_one_clear_line(&out, what);
        assert!(!is_mounted(&mnt));
        assert!(
            pids_mentioning(target).is_empty(),
            "a server was left for {}",
            target.display()
        );
    }
}

#[test]
fn no_dev_fuse_is_one_clear_line() {
    require_mount();
    let (_dir, mnt) = SifuseMount::new_mountpoint("nofuse");
    // In a private mount namespace whose /dev lacks the FUSE device.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} mount {} {}",
        SIFUSE,
        gzip().display(),
        mnt.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_one_clear_line(&out, "cannot open /dev/fuse");
    assert!(!is_mounted(&mnt));
}

#[test]
fn sifuse_umount_ends_the_daemon_and_can_detach_lazily() {
    require_mount();
    let m = SifuseMount::daemon(gzip(), &[]);
    let out = Command::new(SIFUSE)
        .arg("umount")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(wait_for(Duration::from_secs(5), || gone(&m)));

    let m = SifuseMount::daemon(gzip(), &[]);
    let busy = fs::File::open(m.path(HELLO)).unwrap();
    let out = Command::new(SIFUSE)
        .arg("umount")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a busy mount needs --lazy");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{out:?}"
    );
    let out = Command::new(SIFUSE)
        .args(["umount", "--lazy"])
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mounted(&m.mountpoint));
    // The detached file system serves its last user, then the daemon goes.
    let mut buf = Vec::new();
    (&busy).read_to_end(&mut buf).unwrap();
    assert_eq!(buf, expected_hello());
    drop(busy);
    assert!(wait_for(Duration::from_secs(5), || gone(&m)));

    let out = Command::new(SIFUSE)
        .arg("umount")
        .arg(&m.mountpoint)
        .output()
        .unwrap();
    assert_one_clear_line(&out, "cannot unmount");
}

/// User 65534 mounts through fusermount3 and unmounts with sifuse umount; then root
/// unmounts the user's mount (which refuses root everything else).
#[test]
fn ordinary_users_mount_through_fusermount3() {
    require_mount();
    let (dir, mnt) = SifuseMount::new_mountpoint("user");
    let c = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let m = SifuseMount::adopt(dir, mnt, None);
    // In a private mount namespace whose /dev has a FUSE device everyone may open (as on
    // most hosts; this machine's may be root-only), user 65534 mounts and unmounts.
    let nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups";
    let (mnt, image) = (m.mountpoint.display(), gzip().display());
    let script = format!(
        "set -e
         mount -t tmpfs -o mode=755 none /dev
         mknod -m 666 /dev/fuse c 10 229
         mknod -m 666 /dev/null c 1 3
         {nobody} {SIFUSE} mount {image} {mnt}
         grep ' {mnt} ' /proc/self/mountinfo
         {nobody} cat {mnt}/{HELLO}
         if cat {mnt}/{HELLO} 2>/dev/null; then echo ROOT-READ; fi
         {nobody} {SIFUSE} umount {mnt}
         echo UNMOUNTED
         {nobody} {SIFUSE} mount {image} {mnt}
         {SIFUSE} umount {mnt}
         echo ROOT-UNMOUNTED"
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("user_id=65534"), "{stdout}");
    assert!(
        stdout.contains(std::str::from_utf8(&expected_hello()).unwrap()),
        "{stdout}"
    );
    // Without allow_other, even root is refused.
    assert!(!stdout.contains("ROOT-READ"), "{stdout}");
    assert!(stdout.contains("UNMOUNTED"), "{stdout}");
    // Root unmounts the user's mount, which refuses root every other access.
    assert!(stdout.contains("ROOT-UNMOUNTED"), "{stdout}");
    assert!(
        wait_for(Duration::from_secs(5), || gone(&m)),
        "the user's daemon outlived its mount"
    );
}

#[test]
fn serves_a_fuse_descriptor_mounted_by_someone_else() {
    require_mount();
    let (dir, mnt) = SifuseMount::new_mountpoint("devfd");
    // What a setuid starter does: open /dev/fuse, mount it, hand the descriptor over.
    let fd = mount_util::mount_fuse_descriptor(&mnt, "starter", 3);
    let child = Command::new(SIFUSE)
        .arg("mount")
        .arg("-f")
        .arg(gzip())
        .arg(format!("/dev/fd/{fd}"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // SAFETY: the child has its copy; ours goes.
    unsafe { libc::close(fd) };
    let mut m = SifuseMount::adopt(dir, mnt, Some(child));
    assert_serving(&m);
    // The starter unmounts; the server then ends.
    mount_util::force_unmount(&m.mountpoint);
    let out = m.child_output().unwrap();
    assert!(out.status.success(), "{out:?}");
}
