//! Detached mounts (the new mount API) in launcher mode: nothing ever shows on the host.
//!
//! - A launcher receives the mount's descriptor with `ready-fd` (`sifuse mount --control-fd
//!   3 --detached`), lists the image through it, attaches it in a private mount namespace,
//!   and the server exits within a second of the last reference closing; the reverse
//!   hand-off (`serve-fd`) likewise.
//! - `sifuse run`, polled every 10 ms over a 2 s command: the host's mountinfo never shows
//!   the image and nothing is made under $TMPDIR.
//! - SIGKILL of the server at moments during `sifuse run` leaves nothing behind (SIGKILL of
//!   `sifuse run` itself: tests/launcher_run.rs, which now runs detached by default), nor
//!   does SIGKILL of the server after `ready-fd`, nor a launcher gone before taking the
//!   mount.
//! - Unprivileged `sifuse run` finds no fusermount3 and needs none; a `--bind` source the
//!   attached image hides is still reached; failures answer `error`.
//!
//! As root and as an unprivileged user. The unprivileged launcher needs CAP_SYS_ADMIN in a
//! user namespace owning its mount namespace: the test binary runs itself under
//! `setpriv ... unshare -r -m` as that launcher (the ignored `helper_*` test).

mod common;
mod launcher_util;
mod mount_util;

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use launcher_util::{command, Scratch, HOSTNAME, LIMIT, NOBODY};
use mount_util::{pids_mentioning, require_mount, wait_for, SIFUSE};
use sifuse::control::fdpass::{recv_line, send_line_with_fd};
use sifuse::mount::detached::create;
use sifuse::mount::options::Access;
use sifuse::mount::spec::MountSpec;
use sifuse::mount::sys::MountFlags;

fn owner(as_nobody: bool) -> u32 {
    if as_nobody {
        NOBODY
    } else {
        0
    }
}

/// Which way the mount is handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// sifuse creates the mount and sends its descriptor.
    ReadyFd,
    /// The launcher creates the mount and sends the /dev/fuse descriptor.
    ServeFd,
}

/// `sifuse mount --control-fd 3 FLAG IMAGE` with the other end of a socketpair as 3.
fn start_server(image: &Path, flag: &str) -> (std::process::Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(LIMIT)).unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(SIFUSE);
    cmd.args(["mount", "--control-fd", "3", flag])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    crate::mount_util::pass_as_fd3(&mut cmd, fd);
    let child = cmd.spawn().unwrap();
    drop(theirs);
    (child, ours)
}

/// Run `cat TARGET/etc/hostname` in a child that first attaches `mount` on TARGET in a
/// private mount namespace of its own; its output.
fn cat_in_a_private_namespace(mount: &OwnedFd, target: &Path) -> std::process::Output {
    let mfd = mount.as_raw_fd();
    // Made before the fork: between fork and exec only system calls run.
    let to = CString::new(target.as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new("cat");
    cmd.arg(target.join("etc/hostname"));
    // SAFETY: unshare, mount and move_mount with C strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // MOVE_MOUNT_F_EMPTY_PATH: the descriptor itself is what moves.
            if libc::syscall(
                libc::SYS_move_mount,
                mfd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                0x4,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn mountinfo_mentions(needle: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(needle)
}

/// The launcher's side of a hand-off, in this process: get the mount, list the image
/// through its descriptor, attach it in a private namespace, let go, and see the server
/// exit within a second. `target` is an empty directory to attach on.
fn act_as_launcher(image: &Path, target: &Path, flow: Flow) {
    let image_str = image.to_str().unwrap();
    let (mut server, control) = match flow {
        Flow::ReadyFd => start_server(image, "--detached"),
        Flow::ServeFd => start_server(image, "--serve-fd"),
    };
    let mount = match flow {
        Flow::ReadyFd => {
            let got = recv_line(control.as_fd())
                .unwrap()
                .expect("the server closed the stream before ready-fd");
            assert_eq!(got.line, "ready-fd");
            assert_eq!(got.fds.len(), 1, "ready-fd carries one descriptor");
            got.fds.into_iter().next().unwrap()
        }
        Flow::ServeFd => {
            let fuse: OwnedFd = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .unwrap()
                .into();
            let spec = MountSpec {
                source: image_str.to_string(),
                subtype: "sifuse".into(),
                flags: MountFlags {
                    nosuid: true,
                    nodev: true,
                },
                access: Access::Owner,
                // SAFETY: getuid and getgid have no preconditions.
                owner: unsafe { (libc::getuid(), libc::getgid()) },
            };
            let mount = create(fuse.as_fd(), &spec).unwrap_or_else(|e| panic!("{e}"));
            send_line_with_fd(control.as_fd(), "serve-fd", fuse.as_fd()).unwrap();
            drop(fuse);
            let got = recv_line(control.as_fd()).unwrap().expect("no answer");
            assert_eq!(got.line, "serving");
            mount
        }
    };
    // Through the descriptor: the mount's root is /proc/self/fd/N.
    let root = PathBuf::from(format!("/proc/self/fd/{}", mount.as_raw_fd()));
    let mut names: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["bin", "dev", "etc", "mnt", "proc", "sys", "tmp"],
        "the image's root, listed through the descriptor"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).unwrap(),
        HOSTNAME
    );
    assert!(
        !mountinfo_mentions(image_str),
        "the detached mount shows in this namespace's mount table"
    );

    let out = cat_in_a_private_namespace(&mount, target);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), HOSTNAME);
    assert!(
        !mountinfo_mentions(image_str),
        "the child's attached copy leaked into this namespace"
    );
    assert!(
        server.try_wait().unwrap().is_none(),
        "the server exited while the descriptor was still held"
    );

    // The last reference goes: the kernel ends the connection and the server exits 0.
    let dropped = Instant::now();
    drop(mount);
    let ended = wait_for(LIMIT, || server.try_wait().unwrap().is_some());
    let elapsed = dropped.elapsed();
    if !ended {
        let _ = server.kill();
    }
    let status = server.wait().unwrap();
    assert!(ended, "the server outlived its last reference");
    eprintln!("{flow:?}: the server ended {elapsed:?} after the last reference");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(status.success(), "{status}");
}

const HELPER_ENV: &str = "SIFUSE_TEST_LAUNCHER_HELPER";

/// Not a test: the unprivileged launcher, run by `hand_off` under setpriv and unshare -r -m
/// (see the module documentation). Does nothing when not started that way.
#[test]
#[ignore]
fn helper_unprivileged_launcher() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '\n');
    let (flow, image, target) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let flow = if flow == "ready-fd" {
        Flow::ReadyFd
    } else {
        Flow::ServeFd
    };
    act_as_launcher(Path::new(image), Path::new(target), flow);
}

fn hand_off(flow: Flow, as_nobody: bool) {
    let s = Scratch::new("detached-handoff", owner(as_nobody));
    let target = s.path().join("attach-here");
    fs::create_dir(&target).unwrap();
    if !as_nobody {
        act_as_launcher(&s.image, &target, flow);
        s.assert_nothing_left();
        return;
    }
    let flow_name = match flow {
        Flow::ReadyFd => "ready-fd",
        Flow::ServeFd => "serve-fd",
    };
    let out = command(true, "unshare")
        .args(["-r", "-m", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "helper_unprivileged_launcher",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            HELPER_ENV,
            format!("{flow_name}\n{}\n{}", s.image.display(), target.display()),
        )
        .env("TMPDIR", &s.tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the unprivileged launcher: {text}");
    assert!(text.contains("1 passed"), "the helper did not run: {text}");
    assert!(text.contains("after the last reference"), "{text}");
    s.assert_nothing_left();
}

#[test]
fn ready_fd_as_root() {
    require_mount();
    hand_off(Flow::ReadyFd, false);
}

#[test]
fn ready_fd_unprivileged() {
    require_mount();
    hand_off(Flow::ReadyFd, true);
}

#[test]
fn serve_fd_as_root() {
    require_mount();
    hand_off(Flow::ServeFd, false);
}

#[test]
fn serve_fd_unprivileged() {
    require_mount();
    hand_off(Flow::ServeFd, true);
}

#[test]
fn detached_failures_answer_error() {
    require_mount();
    // Not an image: error after the mount was created, which then simply goes.
    let s = Scratch::new("detached-fail", 0);
    fs::write(&s.image, vec![0u8; 8192]).unwrap();
    let (mut server, control) = start_server(&s.image, "--detached");
    let got = recv_line(control.as_fd()).unwrap().unwrap();
    assert!(
        got.line.starts_with("error ") && got.line.contains("not a SIF or SquashFS image"),
        "{}",
        got.line
    );
    assert!(got.fds.is_empty());
    assert!(!server.wait().unwrap().success());
    // Unprivileged outside a user namespace: the kernel refuses, and the error says why.
    let s = Scratch::new("detached-eperm", NOBODY);
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(LIMIT)).unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = command(true, SIFUSE);
    cmd.args(["mount", "--control-fd", "3", "--detached"])
        .arg(&s.image)
        .stdin(Stdio::null());
    crate::mount_util::pass_as_fd3(&mut cmd, fd);
    let mut server = cmd.spawn().unwrap();
    drop(theirs);
    let got = recv_line(ours.as_fd()).unwrap().unwrap();
    assert!(
        got.line
            .contains("user namespace that owns its mount namespace"),
        "{}",
        got.line
    );
    assert!(!server.wait().unwrap().success());
    // serve-fd with something other than /dev/fuse.
    let (mut server, control) = start_server(&s.image, "--serve-fd");
    let null = fs::File::open("/dev/null").unwrap();
    send_line_with_fd(control.as_fd(), "serve-fd", null.as_fd()).unwrap();
    let got = recv_line(control.as_fd()).unwrap().unwrap();
    assert_eq!(
        got.line,
        "error the descriptor sent with serve-fd is not open on /dev/fuse"
    );
    assert!(!server.wait().unwrap().success());
    s.assert_nothing_left();
}

/// `sifuse run` of a 2 s command, the host's mountinfo and $TMPDIR polled every 10 ms
/// from start to end: neither ever shows the image.
fn run_never_touches_the_host(as_nobody: bool) {
    let s = Scratch::new("detached-run", owner(as_nobody));
    let image = s.image.to_str().unwrap().to_string();
    let tmp = s.tmp.to_str().unwrap().to_string();
    // No fusermount3 (nor any other helper) can be found: none is needed. The setpriv
    // that makes the unprivileged user is looked up first, by this process's PATH.
    let mut run = command(as_nobody, SIFUSE);
    if as_nobody {
        let setpriv = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join("setpriv"))
            .find(|p| p.exists())
            .expect("setpriv");
        let args: Vec<_> = run.get_args().map(|a| a.to_os_string()).collect();
        run = Command::new(setpriv);
        run.args(args);
    }
    let mut child = run
        .args(["run", "--debug"])
        .arg(&s.image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "/bin/cat /proc/self/mountinfo; /bin/sleep 2",
        ])
        .env("TMPDIR", &s.tmp)
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let (mut polls, mut seen, mut made) = (0, Vec::new(), Vec::new());
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < LIMIT, "sifuse run did not finish");
        polls += 1;
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        seen.extend(
            info.lines()
                .filter(|l| l.contains(&image) || l.contains(&tmp))
                .map(str::to_string),
        );
        made.extend(fs::read_dir(&s.tmp).unwrap().flatten().map(|e| e.path()));
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(start.elapsed() >= Duration::from_secs(2));
    // At most 10 ms plus a read between polls: well over a hundred in 2 s.
    assert!(polls >= 100, "only {polls} polls");
    assert!(seen.is_empty(), "the host saw the mount: {seen:#?}");
    assert!(made.is_empty(), "made under $TMPDIR: {made:#?}");
    // What the poll looks for is what the mount shows: the container sees its root as
    // the image, by that source.
    let inside = String::from_utf8_lossy(&out.stdout);
    let root_line = inside
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root in the container's mountinfo: {inside}"));
    assert!(
        root_line.contains(" - fuse.sifuse ") && root_line.contains(&image),
        "{root_line}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("detached mount"), "{stderr}");
    s.assert_nothing_left();
    // --debug names the fallback as well, when it is taken.
    let out = command(as_nobody, SIFUSE)
        .args(["run", "--debug", "--no-detached"])
        .arg(&s.image)
        .args(["--", "/bin/true"])
        .env("TMPDIR", &s.tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("temp-directory protocol"), "{stderr}");
    s.assert_nothing_left();
}

#[test]
fn run_never_touches_the_host_as_root() {
    require_mount();
    run_never_touches_the_host(false);
}

#[test]
fn run_never_touches_the_host_unprivileged() {
    require_mount();
    run_never_touches_the_host(true);
}

/// The server of a running `sifuse run`, once it exists.
fn server_pid(s: &Scratch) -> Option<i32> {
    pids_mentioning(&s.image).into_iter().find(|pid| {
        fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"--serve-fd"))
    })
}

/// SIGKILL the server `delay` after it appears, during a `sifuse run` whose COMMAND would
/// wait for ever (and has a child that would too): then nothing may be left.
fn sigkill_of_the_server_at(s: &Scratch, as_nobody: bool, delay: Duration) {
    let image = s.image.to_str().unwrap().to_string();
    let mut run = command(as_nobody, SIFUSE)
        .arg("run")
        .arg(&s.image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "(while :; do sleep 1; done) & while :; do read x; done",
            &image,
        ])
        .env("TMPDIR", &s.tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _input = run.stdin.take().unwrap();
    let mut pid = None;
    assert!(
        wait_for(LIMIT, || {
            pid = server_pid(s);
            pid.is_some()
        }),
        "no server appeared"
    );
    std::thread::sleep(delay);
    // SAFETY: plain kill(2) of the server this test's sifuse run started.
    unsafe { libc::kill(pid.unwrap(), libc::SIGKILL) };
    let ended = wait_for(LIMIT, || run.try_wait().unwrap().is_some());
    if !ended {
        let _ = run.kill();
    }
    run.wait().unwrap();
    assert!(
        ended,
        "sifuse run outlived its server (killed after {delay:?})"
    );
    let clean = wait_for(LIMIT, || s.leftovers().is_empty());
    assert!(
        clean,
        "server killed after {delay:?}: left behind: {:#?}",
        s.leftovers()
    );
}

const SERVER_MOMENTS_MS: [u64; 8] = [0, 2, 5, 10, 20, 50, 150, 500];

#[test]
fn sigkill_of_the_server_during_run_as_root() {
    require_mount();
    let s = Scratch::new("detached-kill", 0);
    for ms in SERVER_MOMENTS_MS {
        sigkill_of_the_server_at(&s, false, Duration::from_millis(ms));
    }
}

#[test]
fn sigkill_of_the_server_during_run_unprivileged() {
    require_mount();
    let s = Scratch::new("detached-kill-user", NOBODY);
    for ms in SERVER_MOMENTS_MS {
        sigkill_of_the_server_at(&s, true, Duration::from_millis(ms));
    }
}

/// The image is attached on $TMPDIR inside the container's namespace, which hides that
/// directory there: a `--bind` source beneath it must still be reached.
fn a_bind_beneath_tmpdir_is_still_reached(as_nobody: bool) {
    let s = Scratch::new("detached-bind", owner(as_nobody));
    let data = s.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("f"), "bound\n").unwrap();
    let out = command(as_nobody, SIFUSE)
        .arg("run")
        .arg("--bind")
        .arg(format!("{}:/mnt", data.display()))
        .arg(&s.image)
        .args(["--", "/bin/cat", "/mnt/f", "/etc/hostname"])
        // The scratch directory, which holds `data`, as $TMPDIR.
        .env("TMPDIR", s.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("bound\n{HOSTNAME}")
    );
    s.assert_nothing_left();
}

#[test]
fn a_bind_beneath_tmpdir_is_still_reached_as_root() {
    require_mount();
    a_bind_beneath_tmpdir_is_still_reached(false);
}

#[test]
fn a_bind_beneath_tmpdir_is_still_reached_unprivileged() {
    require_mount();
    a_bind_beneath_tmpdir_is_still_reached(true);
}

/// A launcher that dies before taking the mount: the descriptor in flight goes with its
/// socket, the mount with it, and the server exits, at any moment.
#[test]
fn a_launcher_gone_before_taking_the_mount_leaves_nothing() {
    require_mount();
    let s = Scratch::new("detached-gone", 0);
    for ms in [0, 1, 5, 20, 100] {
        let (mut server, control) = start_server(&s.image, "--detached");
        std::thread::sleep(Duration::from_millis(ms));
        drop(control);
        let ended = wait_for(LIMIT, || server.try_wait().unwrap().is_some());
        if !ended {
            let _ = server.kill();
        }
        let _ = server.wait();
        assert!(ended, "the server outlived a launcher gone after {ms} ms");
        s.assert_nothing_left();
    }
}

/// SIGKILL of the server after the hand-off: the launcher's mount is dead (reads of what
/// the kernel has not cached fail), and once it lets go nothing is left.
#[test]
fn sigkill_of_the_server_after_ready_fd_leaves_nothing() {
    require_mount();
    let s = Scratch::new("detached-srvkill", 0);
    let (mut server, control) = start_server(&s.image, "--detached");
    let got = recv_line(control.as_fd()).unwrap().unwrap();
    assert_eq!((got.line.as_str(), got.fds.len()), ("ready-fd", 1));
    let mount = got.fds.into_iter().next().unwrap();
    let hostname = format!("/proc/self/fd/{}/etc/hostname", mount.as_raw_fd());
    assert_eq!(fs::read_to_string(&hostname).unwrap(), HOSTNAME);
    server.kill().unwrap();
    server.wait().unwrap();
    // What the kernel has cached (hostname's bytes) it may still show; anything it must
    // ask for fails.
    let unread = format!("/proc/self/fd/{}/bin/busybox", mount.as_raw_fd());
    let err = fs::read(&unread).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    // The launcher sees end of file, and nothing more.
    assert!(recv_line(control.as_fd()).unwrap().is_none());
    drop(mount);
    s.assert_nothing_left();
}
