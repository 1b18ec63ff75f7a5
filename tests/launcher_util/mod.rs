//! Helpers of the `tests/launcher_*.rs` tests: a small busybox root file system image per
//! test, a private $TMPDIR, the launcher's end of the control stream, and the check that
//! nothing is left behind — no mount in the scratch directory (which holds the $TMPDIR) in
//! /proc/self/mountinfo, no process whose command line names the test's image (server,
//! watcher, `sifuse run`, COMMAND), nothing in the $TMPDIR.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::mount_util::{pids_mentioning, scratch, wait_for, SIFUSE};

/// The user unprivileged tests run as.
pub const NOBODY: u32 = 65534;

/// What /etc/hostname holds in the test image.
pub const HOSTNAME: &str = "sifuse-launcher-test\n";

/// How long anything may take before a test fails.
pub const LIMIT: Duration = Duration::from_secs(20);

/// A test's image and $TMPDIR, in a scratch directory every user can reach.
pub struct Scratch {
    dir: tempfile::TempDir,
    pub image: PathBuf,
    pub tmp: PathBuf,
}

impl Scratch {
    /// A busybox root file system (static busybox, /etc/hostname, the usual mount
    /// points, /mnt for binds) as SquashFS, and a $TMPDIR owned by `owner`.
    pub fn new(prefix: &str, owner: u32) -> Scratch {
        let dir = scratch(prefix);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let tree = dir.path().join("tree");
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "mnt"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .expect("busybox-static must be installed (/bin/busybox)");
        for applet in ["sh", "cat", "echo", "id", "ls", "sleep", "touch", "true"] {
            std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        fs::write(tree.join("etc/hostname"), HOSTNAME).unwrap();
        let image = dir.path().join("image.sqfs");
        let out = Command::new("mksquashfs")
            .arg(&tree)
            .arg(&image)
            .args(["-quiet", "-no-progress", "-all-root", "-comp", "gzip"])
            .output()
            .expect("squashfs-tools must be installed (mksquashfs)");
        assert!(
            out.status.success(),
            "mksquashfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        chown(&tmp, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).unwrap();
        Scratch { dir, image, tmp }
    }

    /// A copy of another image (e.g. the committed demo SIF) beside the built one.
    pub fn with_image(mut self, source: &Path) -> Scratch {
        let copy = self.dir.path().join(source.file_name().unwrap());
        fs::copy(source, &copy).unwrap();
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o644)).unwrap();
        self.image = copy;
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Everything left behind right now: mounts anywhere in the scratch directory (the
    /// $TMPDIR, or a mount point a test gave), processes, entries in the $TMPDIR.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let base = self.path().to_str().unwrap();
        for line in info.lines() {
            if line.split(' ').nth(4).is_some_and(|p| p.starts_with(base)) {
                left.push(format!("mount: {line}"));
            }
        }
        for pid in pids_mentioning(&self.image) {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            left.push(format!(
                "process {pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
        for e in fs::read_dir(&self.tmp).unwrap().flatten() {
            left.push(format!("in $TMPDIR: {}", e.path().display()));
        }
        left
    }

    /// Wait until nothing is left behind; fail with what is.
    pub fn assert_nothing_left(&self) {
        let clean = wait_for(LIMIT, || self.leftovers().is_empty());
        assert!(clean, "left behind: {:#?}", self.leftovers());
    }
}

impl Drop for Scratch {
    /// After a failed test: end what is left, so that later tests start clean.
    fn drop(&mut self) {
        for pid in pids_mentioning(&self.image) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let base = self.path().to_str().unwrap().to_string();
        for line in info.lines().rev() {
            if let Some(p) = line.split(' ').nth(4).filter(|p| p.starts_with(&base)) {
                crate::mount_util::force_unmount(Path::new(p));
            }
        }
    }
}

/// Make /dev/fuse usable by every user, as distributions ship it.
pub fn open_dev_fuse_to_users() {
    fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
}

/// A command as root, or as nobody through setpriv.
pub fn command(as_nobody: bool, program: &str) -> Command {
    if as_nobody {
        open_dev_fuse_to_users();
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A launcher's view of `sifuse mount --control-fd 3`.
pub struct Launcher {
    pub server: Child,
    input: BufReader<UnixStream>,
    output: Option<UnixStream>,
}

impl Launcher {
    /// Start the server on `scratch.image` (plus `extra` arguments after it) with the
    /// other end of a socketpair as descriptor 3, and $TMPDIR set to `scratch.tmp`.
    pub fn start(scratch: &Scratch, as_nobody: bool, extra: &[&Path]) -> Launcher {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(LIMIT)).unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = command(as_nobody, SIFUSE);
        cmd.args(["mount", "--control-fd", "3"])
            .arg(&scratch.image)
            .args(extra)
            .env("TMPDIR", &scratch.tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        crate::mount_util::pass_as_fd3(&mut cmd, fd);
        let server = cmd.spawn().unwrap();
        drop(theirs);
        let output = ours.try_clone().unwrap();
        Launcher {
            server,
            input: BufReader::new(ours),
            output: Some(output),
        }
    }

    /// The next message; None at end of file. Fails the test after LIMIT.
    pub fn read(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.input.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "message without newline: {line:?}");
                Some(line.trim_end().to_string())
            }
            Err(e) => panic!("reading the control stream: {e}"),
        }
    }

    /// Wait for `ready PATH`.
    pub fn ready(&mut self) -> PathBuf {
        let line = self
            .read()
            .expect("the server closed the stream before ready");
        let path = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("expected ready, got {line:?}"));
        PathBuf::from(path)
    }

    pub fn send(&mut self, message: &str) {
        let out = self.output.as_mut().expect("stream closed");
        out.write_all(format!("{message}\n").as_bytes()).unwrap();
    }

    /// Another handle on the launcher's sending end, for a writer thread.
    pub fn output_clone(&self) -> UnixStream {
        self.output
            .as_ref()
            .expect("stream closed")
            .try_clone()
            .unwrap()
    }

    /// Close the launcher's end (end of file for the server).
    pub fn close(&mut self) {
        self.output = None;
        let _ = self.input.get_ref().shutdown(std::net::Shutdown::Both);
    }

    /// Wait for the server to exit; its status code.
    pub fn exit_code(&mut self) -> i32 {
        let mut status = None;
        let exited = wait_for(LIMIT, || {
            status = self.server.try_wait().unwrap();
            status.is_some()
        });
        assert!(exited, "the server did not exit");
        status.unwrap().code().expect("the server was killed")
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.server.try_wait().ok().flatten().is_none() {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }
}

/// The mountinfo line of the mount at `path`, as its file system type and options.
pub fn mount_line(path: &Path) -> Option<String> {
    sifuse::mount::mountinfo::line_at(path).unwrap()
}
