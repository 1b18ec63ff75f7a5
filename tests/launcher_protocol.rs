//! `sifuse mount --control-fd`, spoken to as a launcher would: `ready` with a live mount
//! point; after `started` a container in its own mount namespace keeps reading while the
//! host copy and the directory are gone, and the server exits after it; end of file before
//! `started`; `cleanup`; SIGKILL of the server before `started` (the watcher cleans up);
//! failures; a given mount point. As root and as an unprivileged user (fusermount3).
//! Every test ends by checking that nothing is left behind.

mod common;
mod launcher_util;
mod mount_util;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;

use launcher_util::{command, mount_line, Launcher, Scratch, HOSTNAME, NOBODY};
use mount_util::{require_mount, wait_for};

fn owner(as_nobody: bool) -> u32 {
    if as_nobody {
        NOBODY
    } else {
        0
    }
}

/// `ready PATH`: PATH is `$TMPDIR/sifuse-XXXXXX/root`, the directory is private to its
/// owner, and the mount there is live and serves the image.
fn assert_ready(s: &Scratch, path: &Path, as_nobody: bool) {
    let dir = path.parent().unwrap();
    assert_eq!(dir.parent().unwrap(), s.tmp, "{}", path.display());
    assert!(dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("sifuse-"));
    assert_eq!(path.file_name().unwrap(), "root");
    let meta = fs::metadata(dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    assert_eq!(meta.uid(), owner(as_nobody));
    let line = mount_line(path).expect("ready, but nothing is mounted there");
    assert!(line.contains(" - fuse.sifuse "), "{line}");
    assert!(
        line.contains(&format!("user_id={}", owner(as_nobody))),
        "{line}"
    );
    // As nobody only nobody may use the mount (no allow_other): read it as nobody.
    let out = command(as_nobody, "cat")
        .arg(path.join("etc/hostname"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), HOSTNAME, "{out:?}");
}

/// A container: a shell in a new mount namespace (and a user namespace, unprivileged)
/// holding its copy of the mount by its working directory, which reads the image each
/// time it gets a line on stdin and exits at end of file.
fn container(path: &Path, as_nobody: bool) -> std::process::Child {
    let mut cmd = command(as_nobody, "unshare");
    if as_nobody {
        cmd.arg("--user");
    }
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            r#"cd "$0" || exit 9
echo in
while read -r line; do cat etc/hostname || exit 8; done"#,
        )
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn started_detaches_and_the_container_keeps_reading(as_nobody: bool) {
    let s = Scratch::new("proto-started", owner(as_nobody));
    let mut l = Launcher::start(&s, as_nobody, &[]);
    let path = l.ready();
    assert_ready(&s, &path, as_nobody);

    let mut c = container(&path, as_nobody);
    let mut c_in = c.stdin.take().unwrap();
    let mut c_out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    c_out.read_line(&mut line).unwrap();
    assert_eq!(line, "in\n", "the container did not enter the mount");

    l.send("started");
    assert_eq!(l.read().as_deref(), Some("detached"));
    // The host copy and the directory are gone at once; the server is still there.
    assert!(mount_line(&path).is_none(), "host copy still mounted");
    assert!(!path.parent().unwrap().exists(), "directory not removed");
    assert_eq!(fs::read_dir(&s.tmp).unwrap().count(), 0);
    // End of file after started changes nothing.
    l.close();

    for _ in 0..3 {
        c_in.write_all(b"go\n").unwrap();
        let mut got = String::new();
        c_out.read_line(&mut got).unwrap();
        assert_eq!(got, HOSTNAME, "the container lost its copy");
        assert!(
            l.server.try_wait().unwrap().is_none(),
            "the server exited early"
        );
    }
    // The container goes: the kernel ends the connection, and the server exits 0.
    drop(c_in);
    assert!(c.wait().unwrap().success());
    assert_eq!(l.exit_code(), 0);
    s.assert_nothing_left();
}

#[test]
fn started_as_root() {
    require_mount();
    started_detaches_and_the_container_keeps_reading(false);
}

#[test]
fn started_unprivileged() {
    require_mount();
    started_detaches_and_the_container_keeps_reading(true);
}

fn end_of_file_before_started_cleans_up(as_nobody: bool) {
    let s = Scratch::new("proto-eof", owner(as_nobody));
    let mut l = Launcher::start(&s, as_nobody, &[]);
    let path = l.ready();
    assert_ready(&s, &path, as_nobody);
    l.close();
    assert_eq!(l.exit_code(), 0);
    s.assert_nothing_left();
}

#[test]
fn end_of_file_before_started_as_root() {
    require_mount();
    end_of_file_before_started_cleans_up(false);
}

#[test]
fn end_of_file_before_started_unprivileged() {
    require_mount();
    end_of_file_before_started_cleans_up(true);
}

fn cleanup_answers_done(as_nobody: bool) {
    let s = Scratch::new("proto-cleanup", owner(as_nobody));
    let mut l = Launcher::start(&s, as_nobody, &[]);
    let path = l.ready();
    assert_ready(&s, &path, as_nobody);
    l.send("bogus");
    let err = l.read().unwrap();
    assert!(err.starts_with("error unknown message"), "{err}");
    l.send("cleanup");
    assert_eq!(l.read().as_deref(), Some("done"));
    assert_eq!(l.read(), None, "nothing after done");
    assert_eq!(l.exit_code(), 0);
    s.assert_nothing_left();
}

#[test]
fn cleanup_as_root() {
    require_mount();
    cleanup_answers_done(false);
}

#[test]
fn cleanup_unprivileged() {
    require_mount();
    cleanup_answers_done(true);
}

fn sigkill_before_started_the_watcher_cleans_up(as_nobody: bool) {
    let s = Scratch::new("proto-kill", owner(as_nobody));
    let mut l = Launcher::start(&s, as_nobody, &[]);
    let path = l.ready();
    assert_ready(&s, &path, as_nobody);
    l.server.kill().unwrap();
    l.server.wait().unwrap();
    // The watcher holds no copy of the control stream: the launcher sees end of file.
    assert_eq!(l.read(), None);
    s.assert_nothing_left();
}

#[test]
fn sigkill_before_started_as_root() {
    require_mount();
    sigkill_before_started_the_watcher_cleans_up(false);
}

#[test]
fn sigkill_before_started_unprivileged() {
    require_mount();
    sigkill_before_started_the_watcher_cleans_up(true);
}

#[test]
fn failures_answer_error_and_leave_nothing() {
    require_mount();
    let s = Scratch::new("proto-fail", 0);
    // Not an image: mounting fails after the directory was made.
    fs::write(&s.image, vec![0u8; 8192]).unwrap();
    let mut l = Launcher::start(&s, false, &[]);
    let line = l.read().unwrap();
    assert!(
        line.starts_with("error ") && line.contains("not a SIF or SquashFS image"),
        "{line}"
    );
    assert_eq!(l.read(), None);
    assert_ne!(l.exit_code(), 0);
    s.assert_nothing_left();
    // An unusable $TMPDIR.
    let s2 = Scratch::new("proto-fail2", 0);
    fs::remove_dir(&s2.tmp).unwrap();
    let mut l = Launcher::start(&s2, false, &[]);
    let line = l.read().unwrap();
    assert!(
        line.starts_with("error cannot create a private directory"),
        "{line}"
    );
    assert_ne!(l.exit_code(), 0);
    fs::create_dir(&s2.tmp).unwrap();
    s2.assert_nothing_left();
}

#[test]
fn a_given_mount_point_is_unmounted_but_kept() {
    require_mount();
    let s = Scratch::new("proto-given", 0);
    let mnt = s.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // The notify pipe works in launcher mode too.
    let fifo = s.path().join("notify");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (tx, notified) = std::sync::mpsc::channel();
    {
        let fifo = fifo.clone();
        std::thread::spawn(move || tx.send(fs::read(fifo).unwrap()));
    }
    let notify = format!("notify_pipe={}", fifo.display());
    let mut l = Launcher::start(&s, false, &[&mnt, Path::new("-o"), Path::new(&notify)]);
    assert_eq!(l.ready(), mnt);
    assert_eq!(
        notified
            .recv_timeout(launcher_util::LIMIT)
            .expect("no word on the notify pipe"),
        b"s"
    );
    assert!(mount_line(&mnt).is_some());
    l.send("started");
    assert_eq!(l.read().as_deref(), Some("detached"));
    assert!(mnt.is_dir(), "the launcher's directory must stay");
    assert!(wait_for(launcher_util::LIMIT, || mount_line(&mnt).is_none()));
    // Nobody else held the mount: the connection ends with the host copy.
    assert_eq!(l.exit_code(), 0);
    s.assert_nothing_left();
}

#[test]
fn sigterm_before_started_unmounts_reports_and_cleans_up() {
    require_mount();
    let s = Scratch::new("proto-term", 0);
    let mut l = Launcher::start(&s, false, &[]);
    let path = l.ready();
    assert_ready(&s, &path, false);
    // SAFETY: plain kill(2) of the server this test started.
    assert_eq!(
        unsafe { libc::kill(l.server.id() as i32, libc::SIGTERM) },
        0
    );
    // SIGTERM unmounts (as in every mode); the mount ending before `started` is an error
    // the launcher hears about.
    assert_eq!(
        l.read().as_deref(),
        Some("error the mount went away before the container started")
    );
    assert_eq!(l.read(), None);
    assert_eq!(l.exit_code(), 1);
    s.assert_nothing_left();
}

/// A tmpfs the launcher mounted at the mount point it gives sifuse, with a file in it.
struct Precious {
    path: std::path::PathBuf,
}

impl Precious {
    fn new(s: &Scratch) -> Precious {
        let path = s.path().join("precious");
        fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "precious"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "cannot mount a tmpfs");
        fs::write(path.join("f"), "x").unwrap();
        Precious { path }
    }

    /// Still there, with its file, and nothing of sifuse's on top of it.
    fn assert_kept(&self) {
        let line = mount_line(&self.path).expect("the launcher's tmpfs was unmounted");
        assert!(line.contains(" - tmpfs precious "), "{line}");
        assert_eq!(fs::read_to_string(self.path.join("f")).unwrap(), "x");
    }
}

impl Drop for Precious {
    fn drop(&mut self) {
        mount_util::force_unmount(&self.path);
    }
}

/// Wait until no process mentions the image any more (the server and its watcher).
fn assert_processes_gone(s: &Scratch) {
    assert!(
        wait_for(launcher_util::LIMIT, || mount_util::pids_mentioning(
            &s.image
        )
        .is_empty()),
        "the server or its watcher did not exit"
    );
}

/// SIGTERM before `started`: sifuse unmounts its own mount and, cleaning up, nothing else —
/// the launcher's tmpfs under it stays (it used to be unmounted too).
#[test]
fn sigterm_leaves_the_launchers_own_mount_alone() {
    require_mount();
    let s = Scratch::new("proto-precious-term", 0);
    let t = Precious::new(&s);
    let mut l = Launcher::start(&s, false, &[&t.path]);
    assert_eq!(l.ready(), t.path);
    assert!(mount_line(&t.path).unwrap().contains(" - fuse.sifuse "));
    // SAFETY: plain kill(2) of the server this test started.
    assert_eq!(
        unsafe { libc::kill(l.server.id() as i32, libc::SIGTERM) },
        0
    );
    assert_eq!(
        l.read().as_deref(),
        Some("error the mount went away before the container started")
    );
    assert_eq!(l.exit_code(), 1);
    assert_processes_gone(&s);
    t.assert_kept();
    drop(t);
    s.assert_nothing_left();
}

/// Someone else unmounts sifuse's copy first: sifuse's cleanup finds the launcher's
/// tmpfs at the path, which is not its mount, and leaves it.
#[test]
fn a_copy_unmounted_by_someone_else_leaves_what_is_under_it() {
    require_mount();
    let s = Scratch::new("proto-precious-other", 0);
    let t = Precious::new(&s);
    let mut l = Launcher::start(&s, false, &[&t.path]);
    assert_eq!(l.ready(), t.path);
    let status = std::process::Command::new("umount")
        .arg(&t.path)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        l.read().as_deref(),
        Some("error the mount went away before the container started")
    );
    assert_eq!(l.exit_code(), 1);
    assert_processes_gone(&s);
    t.assert_kept();
    drop(t);
    s.assert_nothing_left();
}

/// The server SIGKILLed before it ever mounted: held up opening an image that lies on a
/// FUSE mount whose server is stopped. Its watcher, forked before the image is opened,
/// knows of no mount of sifuse's and unmounts nothing (it used to unmount the tmpfs).
#[test]
fn a_server_killed_before_it_mounted_unmounts_nothing() {
    require_mount();
    let mut s = Scratch::new("proto-precious-kill", 0);
    let t = Precious::new(&s);
    let blocker_image = s.path().join("blocker.sqfs");
    fs::copy(&s.image, &blocker_image).unwrap();
    let blocker = mount_util::SifuseMount::foreground(&blocker_image, &[]);
    let blocker_pid = blocker.child.as_ref().unwrap().id() as i32;
    // SAFETY: plain kill(2) of the server this test started.
    assert_eq!(unsafe { libc::kill(blocker_pid, libc::SIGSTOP) }, 0);
    // Every thread stopped: none can have taken the lookup below off the queue (a
    // request taken but unanswered would hold the killed server until SIGCONT).
    let stopped = || {
        fs::read_dir(format!("/proc/{blocker_pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                state.starts_with('T')
            })
    };
    assert!(
        wait_for(launcher_util::LIMIT, stopped),
        "the blocker did not stop"
    );
    // A path the stopped server was never asked about: looking it up waits for it.
    s.image = blocker.path("etc/hostname");
    let mut l = Launcher::start(&s, false, &[&t.path]);
    // The server and its watcher (a fork with the same command line) exist.
    assert!(wait_for(launcher_util::LIMIT, || {
        mount_util::pids_mentioning(&s.image).len() == 2
    }));
    l.server.kill().unwrap();
    l.server.wait().unwrap();
    assert_eq!(l.read(), None);
    assert_processes_gone(&s);
    t.assert_kept();
    // SAFETY: plain kill(2) of the server this test started.
    assert_eq!(unsafe { libc::kill(blocker_pid, libc::SIGCONT) }, 0);
    drop(blocker);
    drop(t);
    s.assert_nothing_left();
}

/// A FIFO as the image, which used to hold the server in open(2) until it was killed (and
/// its watcher then unmounted the tmpfs): refused at once, and the tmpfs stays.
#[test]
fn a_fifo_as_image_is_refused_and_the_mount_point_left_alone() {
    require_mount();
    let mut s = Scratch::new("proto-precious-fifo", 0);
    let t = Precious::new(&s);
    let fifo = s.path().join("image.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    s.image = fifo;
    let mut l = Launcher::start(&s, false, &[&t.path]);
    let line = l.read().unwrap();
    assert!(
        line.starts_with("error ") && line.contains("is a FIFO"),
        "{line}"
    );
    assert_ne!(l.exit_code(), 0);
    assert_processes_gone(&s);
    t.assert_kept();
    drop(t);
    s.assert_nothing_left();
}

/// A line of 64 MiB without a newline, then one not in UTF-8: each answered with one
/// short `error unknown message` line, and the conversation goes on (a non-UTF-8 line used
/// to be taken as end of file, and the long line was kept whole and echoed back).
#[test]
fn long_and_non_utf8_lines_are_answered_and_ignored() {
    require_mount();
    let s = Scratch::new("proto-lines", 0);
    let mut l = Launcher::start(&s, false, &[]);
    let path = l.ready();
    assert_ready(&s, &path, false);
    let writer = {
        let mut out = l.output_clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                out.write_all(&chunk).unwrap();
            }
            out.write_all(b"\n\xff\xfe hello\n").unwrap();
        })
    };
    let long = l.read().unwrap();
    assert!(
        long.starts_with("error unknown message (a line longer than"),
        "{}",
        &long[..long.len().min(200)]
    );
    assert!(
        long.len() < 200,
        "the line was echoed: {} bytes",
        long.len()
    );
    writer.join().unwrap();
    assert_eq!(
        l.read().as_deref(),
        Some("error unknown message (a line not in UTF-8): expected started or cleanup")
    );
    l.send("cleanup");
    assert_eq!(l.read().as_deref(), Some("done"));
    assert_eq!(l.exit_code(), 0);
    s.assert_nothing_left();
}
