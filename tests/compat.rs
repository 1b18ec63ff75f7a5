//! sifuse as squashfuse_ll and squashfuse: the built binary, run through the links
//! `sifuse install-compat` makes, replaying how SingularityCE and Apptainer call it
//! (README.md, "squashfuse compatibility"), the /dev/fd/N handover of a setuid
//! starter, notify_pipe, subdir, the idle timeout, the usage probe, and the kernel
//! comparison of the mount issue through these names.

mod common;
mod mount_util;

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::fixtures::fixtures;
use mount_util::hammer::alive;
use mount_util::{
    assert_no_differences, compare_views, force_unmount, is_mounted, mount_fuse_descriptor,
    mountinfo, partition_offset, pass_as_fd3, pids_mentioning, require_mount, run_to_exit, scratch,
    wait_for, wrap_in_sif, KernelMount, SifuseMount, ViewExceptions, SIFUSE,
};

const NAMES: [&str; 2] = ["squashfuse_ll", "squashfuse"];

/// The directory `sifuse install-compat` filled, made once per test process.
fn compat_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = scratch("compat-bin");
        let bin = dir.path().join("bin");
        let out = Command::new(SIFUSE)
            .arg("install-compat")
            .arg(&bin)
            .output()
            .unwrap();
        assert!(out.status.success(), "install-compat: {out:?}");
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
        (dir, bin)
    })
    .1
}

fn compat(name: &str) -> Command {
    Command::new(compat_dir().join(name))
}

/// The gzip fixture inside a SIF, and the partition's offset (what launchers pass).
fn gzip_sif() -> &'static (PathBuf, u64) {
    static SIF: OnceLock<(tempfile::TempDir, (PathBuf, u64))> = OnceLock::new();
    &SIF.get_or_init(|| {
        let dir = scratch("compat-sif");
        let sif = wrap_in_sif(fixtures().image("gzip"), dir.path());
        let offset = partition_offset(&sif);
        (dir, (sif, offset))
    })
    .1
}

fn hello() -> Vec<u8> {
    fs::read(fixtures().tree.join("hello.txt")).unwrap()
}

/// The type and source fields of a mountinfo line.
fn type_and_source(line: &str) -> (String, String) {
    let after = line.split(" - ").nth(1).expect("mountinfo separator");
    let mut f = after.split_whitespace();
    (f.next().unwrap().into(), f.next().unwrap().into())
}

fn assert_quiet_success(what: &str, out: &Output) {
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{what}: status {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file of the fixture tree owned by neither root user nor root group.
fn non_root_owned() -> (PathBuf, u32, u32) {
    let rel = PathBuf::from("owners");
    for e in fs::read_dir(fixtures().tree.join(&rel)).unwrap().flatten() {
        let m = e.path().symlink_metadata().unwrap();
        if m.uid() != 0 && m.gid() != 0 {
            return (rel.join(e.file_name()), m.uid(), m.gid());
        }
    }
    panic!("the fixture tree has no file under owners/ owned by a non-root user and group");
}

/// `ps` names a process by /proc/PID/comm and shows its command line from cmdline.
fn assert_ps_shows(pid: i32, name: &str) {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim_end(), name);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap();
    assert!(
        argv0.ends_with(name.as_bytes()),
        "argv[0] is {}",
        String::from_utf8_lossy(argv0)
    );
}

#[test]
fn singularity_daemon_call_then_the_hosts_lazy_unmount() {
    require_mount();
    let (sif, offset) = gzip_sif();
    let (owned, stored_uid, stored_gid) = non_root_owned();
    for name in NAMES {
        for (uid, gid, allow_other) in [(1234, 99, true), (0, 0, false)] {
            let what = format!("{name} uid={uid},gid={gid} allow_other={allow_other}");
            let (dir, mnt) = SifuseMount::new_mountpoint(name);
            let opts = format!(
                "uid={uid},gid={gid},ro{},offset={offset}",
                if allow_other { ",allow_other" } else { "" }
            );
            // `$(squashfuse_ll ...)` returns only if the daemon let go of stdout and stderr:
            // run_to_exit reads both to the end.
            let out = run_to_exit(compat(name).arg("-o").arg(&opts).arg(sif).arg(&mnt));
            assert_quiet_success(&what, &out);
            let m = SifuseMount::adopt(dir, mnt, None);
            assert_eq!(fs::read(m.path("hello.txt")).unwrap(), hello(), "{what}");

            let line = mountinfo(&m.mountpoint).unwrap();
            assert_eq!(
                type_and_source(&line),
                (format!("fuse.{name}"), name.to_string()),
                "{what}: {line}"
            );
            assert_eq!(line.contains("allow_other"), allow_other, "{what}: {line}");
            let pid = m.daemon_pid();
            assert_ps_shows(pid, name);

            let meta = fs::symlink_metadata(m.path(owned.to_str().unwrap())).unwrap();
            let want = if uid == 0 {
                // uid=0,gid=0: owners as stored.
                (stored_uid, stored_gid)
            } else {
                (uid, gid)
            };
            assert_eq!((meta.uid(), meta.gid()), want, "{what}");

            // The host's cleanup: fusermount3 -z -u; the daemon then ends.
            let st = Command::new("fusermount3")
                .args(["-z", "-u"])
                .arg(&m.mountpoint)
                .status()
                .unwrap();
            assert!(st.success(), "{what}: fusermount3 -z -u");
            assert!(
                wait_for(Duration::from_secs(10), || !alive(pid)),
                "{what}: the daemon outlived its mount"
            );
            assert!(!is_mounted(&m.mountpoint));
        }
    }
}

/// Spawn `cmd` with `file` as its descriptor 3, as Apptainer passes the image.
fn spawn_with_fd3(cmd: &mut Command, file: &fs::File) -> Child {
    pass_as_fd3(cmd, file.as_raw_fd());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, signal) };
}

#[test]
fn apptainer_foreground_call_with_the_image_on_fd_3() {
    require_mount();
    let (sif, offset) = gzip_sif();
    for name in NAMES {
        let (dir, mnt) = SifuseMount::new_mountpoint(name);
        let image = fs::File::open(sif).unwrap();
        let mut child = spawn_with_fd3(
            compat(name)
                .arg("-f")
                .arg("-o")
                .arg(format!("allow_other,ro,uid=1000,gid=1000,offset={offset}"))
                .arg("/proc/self/fd/3")
                .arg(&mnt),
            &image,
        );
        drop(image);
        // Apptainer polls mountinfo for the target, for up to 10 s.
        let live = wait_for(Duration::from_secs(10), || is_mounted(&mnt));
        if !live {
            let _ = child.kill();
            panic!("{name}: not mounted: {:?}", child.wait_with_output());
        }
        let meta = fs::metadata(mnt.join("hello.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
        assert_eq!(fs::read(mnt.join("hello.txt")).unwrap(), hello());
        let (fstype, _) = type_and_source(&mountinfo(&mnt).unwrap());
        assert_eq!(fstype, format!("fuse.{name}"));
        assert_ps_shows(child.id() as i32, name);

        if name == "squashfuse_ll" {
            // Apptainer's stop: unmount, then SIGTERM after a second if still running.
            force_unmount(&mnt);
            if !wait_for(Duration::from_secs(1), || {
                child.try_wait().unwrap().is_some()
            }) {
                kill(child.id(), libc::SIGTERM);
            }
        } else {
            // SIGTERM while mounted: the server unmounts and ends.
            kill(child.id(), libc::SIGTERM);
        }
        assert!(
            wait_for(Duration::from_secs(2), || child
                .try_wait()
                .unwrap()
                .is_some()),
            "{name}: still running 2 s after unmount and SIGTERM (Apptainer would SIGKILL)"
        );
        let out = child.wait_with_output().unwrap();
        assert_quiet_success(&format!("{name} -f after unmount and SIGTERM"), &out);
        assert!(!is_mounted(&mnt), "{name}: left mounted");
        drop(dir);
    }
}

#[test]
fn serves_a_dev_fd_mounted_by_a_setuid_starter() {
    require_mount();
    let (sif, offset) = gzip_sif();
    for name in NAMES {
        let (dir, mnt) = SifuseMount::new_mountpoint(name);
        // What the setuid starter does: open /dev/fuse, mount it, pass the descriptor
        // (above the image's descriptor 3).
        let fd = mount_fuse_descriptor(&mnt, name, 10);
        let image = fs::File::open(sif).unwrap();
        let child = spawn_with_fd3(
            compat(name)
                .arg("-f")
                .arg("-o")
                .arg(format!("allow_other,ro,offset={offset}"))
                .arg("/proc/self/fd/3")
                .arg(format!("/dev/fd/{fd}")),
            &image,
        );
        // SAFETY: the child has its copy; ours goes.
        unsafe { libc::close(fd) };
        let mut m = SifuseMount::adopt(dir, mnt, Some(child));
        assert_eq!(fs::read(m.path("hello.txt")).unwrap(), hello(), "{name}");
        // The starter unmounts; the server then ends, quietly.
        force_unmount(&m.mountpoint);
        let out = m.child_output().unwrap();
        assert_quiet_success(&format!("{name} on /dev/fd/N"), &out);
    }
}

/// Read a FIFO to its end on another thread (opening it blocks until a writer comes).
fn fifo_reader(fifo: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let fifo = fifo.to_path_buf();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        fs::File::open(&fifo)
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        buf
    })
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn notify_pipe_and_subdir() {
    require_mount();
    let image = fixtures().image("gzip");
    for name in NAMES {
        let (dir, mnt) = SifuseMount::new_mountpoint(name);
        let fifo = dir.path().join("notify");
        mkfifo(&fifo);
        let reader = fifo_reader(&fifo);
        let opts = format!("notify_pipe={},subdir=/deep", fifo.display());
        let out = run_to_exit(compat(name).arg("-o").arg(&opts).arg(image).arg(&mnt));
        assert_quiet_success(name, &out);
        assert_eq!(reader.join().unwrap(), b"s", "{name}: notify pipe");
        let m = SifuseMount::adopt(dir, mnt, None);
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&m.mountpoint), names(&fixtures().tree.join("deep")));

        // A failure writes 'f' and says why on stderr, with nothing mounted.
        let (dir2, mnt2) = SifuseMount::new_mountpoint(name);
        let fifo2 = dir2.path().join("notify");
        mkfifo(&fifo2);
        let reader = fifo_reader(&fifo2);
        let opts = format!("notify_pipe={}", fifo2.display());
        let missing = dir2.path().join("missing.sqfs");
        let out = run_to_exit(compat(name).arg("-o").arg(&opts).arg(&missing).arg(&mnt2));
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("{name}: ")), "{stderr}");
        assert_eq!(
            reader.join().unwrap(),
            b"f",
            "{name}: notify pipe on failure"
        );
        assert!(!is_mounted(&mnt2));
    }
}

#[test]
fn idle_timeout_unmounts_and_ends_the_daemon() {
    require_mount();
    for name in NAMES {
        let (dir, mnt) = SifuseMount::new_mountpoint(name);
        let out = run_to_exit(
            compat(name)
                .args(["-o", "timeout=1"])
                .arg(fixtures().image("gzip"))
                .arg(&mnt),
        );
        assert_quiet_success(name, &out);
        let m = SifuseMount::adopt(dir, mnt, None);
        let pid = m.daemon_pid();
        assert_eq!(fs::read(m.path("hello.txt")).unwrap(), hello());
        assert!(
            wait_for(Duration::from_secs(15), || !is_mounted(&m.mountpoint)
                && !alive(pid)),
            "{name}: still mounted or running long after a 1 s idle timeout"
        );
        assert!(pids_mentioning(&m.mountpoint).is_empty());
    }
}

#[test]
fn usage_probe_version_and_bad_options() {
    for name in NAMES {
        // Apptainer runs the program without arguments and looks for `-o uid=`.
        for args in [&[][..], &["-h"]] {
            let out = compat(name).args(args).output().unwrap();
            assert_eq!(out.status.code(), Some(254), "{name} {args:?}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("-o uid="), "{name} {args:?}: {stdout}");
            assert!(stdout.contains(&format!("Usage: {name} [options] ARCHIVE MOUNTPOINT")));
            assert!(String::from_utf8_lossy(&out.stderr).contains("-o allow_other"));
        }
        let out = compat(name).arg("-V").output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{name} (sifuse ")));

        let dir = scratch("compat-bad");
        for (args, want) in [
            (&["-o", "bogus"][..], "unknown option(s): `-o bogus'"),
            (
                &["-o", "cache_size=8"],
                "unknown option(s): `-o cache_size=8'",
            ),
            (&["-x"], "unknown option `-x'"),
        ] {
            let out = compat(name)
                .args(args)
                .arg(fixtures().image("gzip"))
                .arg(dir.path())
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1), "{name} {args:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stderr),
                format!("{name}: {want}\n")
            );
            assert!(out.stdout.is_empty());
        }
        assert!(!is_mounted(dir.path()));
    }
}

/// Every fixture image mounted as squashfuse_ll with SingularityCE's options (owners as
/// stored): the kernel's view, as in the mount issue's comparison.
macro_rules! per_image {
    ($($test:ident => $name:literal,)*) => {
        mod every_image_as_squashfuse_ll {
            $(
                #[test]
                fn $test() {
                    super::compare_with_kernel($name);
                }
            )*
        }
    };
}

with_fixture_images!(per_image);

fn compare_with_kernel(image: &str) {
    require_mount();
    let name = "squashfuse_ll";
    let (dir, mnt) = SifuseMount::new_mountpoint(name);
    let path = fixtures().image(image);
    let out = run_to_exit(
        compat(name)
            .args(["-o", "uid=0,gid=0,ro"])
            .arg(path)
            .arg(&mnt),
    );
    assert_quiet_success(image, &out);
    let m = SifuseMount::adopt(dir, mnt, None);
    // The kernel cannot mount lzma: compare with its mount of the gzip image of the same
    // tree, whose statfs block count differs.
    let (kernel_image, except) = if common::fixtures::Fixtures::kernel_can_mount(image) {
        (image, ViewExceptions::default())
    } else {
        (
            "gzip",
            ViewExceptions {
                statfs_blocks: true,
            },
        )
    };
    let k = KernelMount::new(fixtures().image(kernel_image));
    let diffs = compare_views(&k.mountpoint, &m.mountpoint, except);
    assert_no_differences(&format!("{name} {image}"), &diffs);
}

/// The same through both names, with the options launchers pass: two compressors and
/// layouts, and the SIF at its partition offset.
#[test]
fn the_kernels_view_through_both_names() {
    require_mount();
    let (sif, offset) = gzip_sif();
    let offset_opt = format!("offset={offset}");
    let cases: [(&str, &Path, &str, &str); 4] = [
        ("squashfuse_ll", fixtures().image("gzip"), "ro", "gzip"),
        ("squashfuse", fixtures().image("xz"), "ro", "xz"),
        (
            "squashfuse_ll",
            fixtures().image("zstd-b1m"),
            "uid=0,gid=0",
            "zstd-b1m",
        ),
        ("squashfuse", sif, &offset_opt, "gzip"),
    ];
    for (name, image, opts, kernel_image) in cases {
        let (dir, mnt) = SifuseMount::new_mountpoint(name);
        let out = run_to_exit(compat(name).arg("-o").arg(opts).arg(image).arg(&mnt));
        assert_quiet_success(name, &out);
        let m = SifuseMount::adopt(dir, mnt, None);
        let k = KernelMount::new(fixtures().image(kernel_image));
        let diffs = compare_views(&k.mountpoint, &m.mountpoint, ViewExceptions::default());
        assert_no_differences(&format!("{name} -o {opts} {}", image.display()), &diffs);
    }
}
