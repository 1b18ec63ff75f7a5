//! `sifuse run IMAGE -- COMMAND`: COMMAND sees the image as its read-only root; exit
//! statuses pass through; with the temp-directory protocol (`--no-detached`) the host copy
//! is already detached while COMMAND runs; SIGKILL of `sifuse run` at ten moments from 0 ms
//! to 2 s after start leaves nothing behind. As root and as an unprivileged user, with the
//! default detached mount (see also tests/launcher_detached.rs) and with the fallback.

mod common;
mod launcher_util;
mod mount_util;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use launcher_util::{command, Scratch, HOSTNAME, LIMIT, NOBODY};
use mount_util::{require_mount, wait_for, SIFUSE};

fn owner(as_nobody: bool) -> u32 {
    if as_nobody {
        NOBODY
    } else {
        0
    }
}

/// `sifuse run [args] IMAGE -- COMMAND...` to completion, with a time limit.
fn run(s: &Scratch, as_nobody: bool, args: &[&str], cmd: &[&str]) -> Output {
    let mut c = sifuse_run(s, as_nobody, args, cmd);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let exited = wait_for(LIMIT, || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "sifuse run did not finish: {out:?}");
    out
}

fn sifuse_run(s: &Scratch, as_nobody: bool, args: &[&str], cmd: &[&str]) -> Command {
    let mut c = command(as_nobody, SIFUSE);
    c.arg("run")
        .args(args)
        .arg(&s.image)
        .arg("--")
        .args(cmd)
        .env("TMPDIR", &s.tmp);
    c
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn prints_the_file_and_passes_exit_statuses(as_nobody: bool, mode: &[&str]) {
    let s = Scratch::new("run-cat", owner(as_nobody));
    let out = run(&s, as_nobody, mode, &["/bin/cat", "/etc/hostname"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), HOSTNAME);
    s.assert_nothing_left();

    let out = run(&s, as_nobody, mode, &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let out = run(&s, as_nobody, mode, &["/bin/sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let out = run(&s, as_nobody, mode, &["/bin/no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot run /bin/no-such-command"),
        "{out:?}"
    );
    s.assert_nothing_left();

    // The container: read-only root, its own /tmp, the host's /proc and /dev, and the
    // caller's identity.
    let script = r#"
        touch /new 2>/dev/null && echo root-writable
        touch /tmp/x && echo tmp-ok
        echo > /dev/null && echo dev-ok
        cat /proc/self/status >/dev/null && echo proc-ok
        id -u"#;
    let out = run(&s, as_nobody, mode, &["/bin/sh", "-c", script]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("tmp-ok\ndev-ok\nproc-ok\n{}\n", owner(as_nobody))
    );
    s.assert_nothing_left();
}

#[test]
fn prints_the_file_and_passes_exit_statuses_as_root() {
    require_mount();
    prints_the_file_and_passes_exit_statuses(false, &[]);
}

#[test]
fn prints_the_file_and_passes_exit_statuses_on_the_fallback_as_root() {
    require_mount();
    prints_the_file_and_passes_exit_statuses(false, &["--no-detached"]);
}

#[test]
fn prints_the_file_and_passes_exit_statuses_unprivileged() {
    require_mount();
    prints_the_file_and_passes_exit_statuses(true, &[]);
}

#[test]
fn prints_the_file_and_passes_exit_statuses_on_the_fallback_unprivileged() {
    require_mount();
    prints_the_file_and_passes_exit_statuses(true, &["--no-detached"]);
}

#[test]
fn runs_the_demo_sif_with_binds_and_a_user_namespace() {
    require_mount();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/demo.sif");
    let s = Scratch::new("run-sif", 0);
    let data = s.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("f"), "bound\n").unwrap();
    let bind = format!("{}:/root", data.display());
    let s = s.with_image(&demo);
    let out = run(
        &s,
        false,
        &["--userns", "--bind", &bind],
        &["/bin/sh", "-c", "cat /etc/os-release /root/f; id -u"],
    );
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.starts_with("NAME=\"sifuse demo\"\n"), "{text}");
    assert!(text.ends_with("bound\n0\n"), "{text}");
    // A bind whose destination the image lacks fails before COMMAND, leaving nothing.
    let out = run(&s, false, &["--bind", "/tmp:/nonexistent"], &["/bin/true"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent"),
        "{out:?}"
    );
    s.assert_nothing_left();
}

fn the_host_copy_is_detached_while_the_command_runs(as_nobody: bool) {
    let s = Scratch::new("run-long", owner(as_nobody));
    // The host copy exists only in the temp-directory protocol.
    let mut child = sifuse_run(
        &s,
        as_nobody,
        &["--no-detached"],
        &["/bin/sh", "-c", "echo up; read x; cat /etc/hostname"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    // `started` follows the exec: poll until the server has detached. What is left is
    // the server (and `sifuse run` and COMMAND): no mount, no directory.
    let detached = wait_for(LIMIT, || {
        s.leftovers().iter().all(|l| l.starts_with("process "))
    });
    assert!(detached, "still attached on the host: {:#?}", s.leftovers());
    assert!(
        !s.leftovers().is_empty(),
        "the server should still be serving"
    );
    input.write_all(b"go\n").unwrap();
    let mut rest = String::new();
    output.read_line(&mut rest).unwrap();
    assert_eq!(rest, HOSTNAME);
    assert!(wait_for(LIMIT, || child.try_wait().unwrap().is_some()));
    assert!(child.wait().unwrap().success());
    s.assert_nothing_left();
}

#[test]
fn the_host_copy_is_detached_while_the_command_runs_as_root() {
    require_mount();
    the_host_copy_is_detached_while_the_command_runs(false);
}

#[test]
fn the_host_copy_is_detached_while_the_command_runs_unprivileged() {
    require_mount();
    the_host_copy_is_detached_while_the_command_runs(true);
}

/// SIGKILL `sifuse run` `delay` after starting it, with a COMMAND that would wait for
/// ever and has started a process of its own that would too; then nothing may be left.
/// COMMAND is a shell whose $0 is the image path, and its child a subshell, so that both
/// count among the processes naming the image.
fn sigkill_at(s: &Scratch, as_nobody: bool, mode: &[&str], delay: Duration) {
    let image = s.image.to_str().unwrap().to_string();
    let mut c = sifuse_run(
        s,
        as_nobody,
        mode,
        &[
            "/bin/sh",
            "-c",
            "(while :; do sleep 1; done) & while :; do read x; done",
            &image,
        ],
    );
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Held open: COMMAND must end by the parent-death signal, not by end of file.
    let _input = child.stdin.take().unwrap();
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    let clean = wait_for(LIMIT, || s.leftovers().is_empty());
    assert!(
        clean,
        "SIGKILL after {delay:?} ({mode:?}): left behind: {:#?}",
        s.leftovers()
    );
}

const MOMENTS_MS: [u64; 10] = [0, 5, 20, 50, 100, 200, 400, 700, 1200, 2000];

#[test]
fn sigkill_of_sifuse_run_at_ten_moments_as_root() {
    require_mount();
    let s = Scratch::new("run-kill", 0);
    for ms in MOMENTS_MS {
        sigkill_at(&s, false, &[], Duration::from_millis(ms));
    }
}

#[test]
fn sigkill_of_sifuse_run_at_ten_moments_on_the_fallback_as_root() {
    require_mount();
    let s = Scratch::new("run-kill-fallback", 0);
    for ms in MOMENTS_MS {
        sigkill_at(&s, false, &["--no-detached"], Duration::from_millis(ms));
    }
}

#[test]
fn sigkill_of_sifuse_run_at_ten_moments_unprivileged() {
    require_mount();
    let s = Scratch::new("run-kill-user", NOBODY);
    for ms in MOMENTS_MS {
        sigkill_at(&s, true, &[], Duration::from_millis(ms));
    }
}

#[test]
fn sigkill_of_sifuse_run_at_ten_moments_on_the_fallback_unprivileged() {
    require_mount();
    let s = Scratch::new("run-kill-user-fallback", NOBODY);
    for ms in MOMENTS_MS {
        sigkill_at(&s, true, &["--no-detached"], Duration::from_millis(ms));
    }
}

/// Inside the container every mount of the /sys tree (the cgroup hierarchies under
/// /sys/fs/cgroup included, which used to stay writable) and every mount below /proc is
/// read-only, as mountinfo read there shows; the kernel's knobs (/proc/sys,
/// /proc/sysrq-trigger, ...) are such mounts (the container's root is the host's without
/// a user namespace).
fn sys_and_below_are_read_only(as_nobody: bool) {
    let s = Scratch::new("run-sys-ro", owner(as_nobody));
    let out = run(&s, as_nobody, &[], &["/bin/cat", "/proc/self/mountinfo"]);
    assert!(out.status.success(), "{out:?}");
    let info = stdout(&out);
    let mut seen = 0;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (point, options) = (fields[4], fields[5]);
        let below_proc = point.starts_with("/proc/");
        if point == "/sys" || point.starts_with("/sys/") || below_proc {
            seen += 1;
            assert!(
                options.split(',').any(|o| o == "ro"),
                "writable inside the container: {line}"
            );
        }
    }
    assert!(seen > 0, "no /sys in the container: {info}");
    // Those of the host's kernel knobs there are (no /proc/sysrq-trigger without
    // CONFIG_MAGIC_SYSRQ); /proc/sys always.
    let knobs = ["sys", "sysrq-trigger", "irq", "bus", "fs"].map(|k| format!("/proc/{k}"));
    assert!(Path::new("/proc/sys").is_dir());
    for knob in knobs.iter().filter(|k| Path::new(k).exists()) {
        assert!(
            info.lines().any(|l| l.split(' ').nth(4) == Some(knob)),
            "{knob} is not a read-only mount of its own in the container: {info}"
        );
    }
    s.assert_nothing_left();
}

#[test]
fn sys_and_below_are_read_only_as_root() {
    require_mount();
    sys_and_below_are_read_only(false);
}

#[test]
fn sys_and_below_are_read_only_unprivileged() {
    require_mount();
    sys_and_below_are_read_only(true);
}
