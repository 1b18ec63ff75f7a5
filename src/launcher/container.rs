//! `sifuse run`: run a command with the image as its read-only root.
//!
//! By default the image is a detached mount (the new mount API) made inside the
//! container's namespaces, so the host never sees it and no directory is made:
//!
//! 1. Start the server (`sifuse mount --control-fd 3 --serve-fd IMAGE`) in the caller's
//!    namespaces — it must not hold the container's mount namespace, or the mount would
//!    outlive the container and the server with it.
//! 2. Unshare a mount namespace (and a user namespace, as below), make every mount private,
//!    open /dev/fuse, create the detached mount, send the /dev/fuse descriptor with
//!    `serve-fd` and wait for `serving`.
//! 3. Attach the mount with move_mount on $TMPDIR (or /tmp) inside the new namespace —
//!    which hides that directory there and changes nothing on the host — and go on as
//!    below from the pivot_root. Nothing is ever detached or cleaned up: the connection
//!    ends with the container's namespace, and the server with it. Should the server die,
//!    the container, whose root is then dead, is ended too.
//!
//! Where the kernel lacks the new mount API (before 5.2), or with `--no-detached`, it
//! falls back to the host-path hand-off:
//!
//! 1. Start the server (`sifuse mount --control-fd 3 IMAGE`, this same binary) with one
//!    end of a socketpair, in the caller's namespaces, and wait for `ready PATH`. As root
//!    it mounts with mount(2); otherwise through the setuid fusermount3, so the host copy
//!    lives in the caller's mount namespace where the server can later detach it.
//! 2. Unshare a mount namespace (and a user namespace mapping the caller to itself when
//!    not root, or with `--userns`), make every mount private, build the root
//!    ([`super::rootfs`]: the mount bound onto itself and kept read-only, /proc, /dev and
//!    /sys from the host, a tmpfs /tmp, the `--bind`s), then pivot_root into it. From here
//!    the container's namespace holds its own copy.
//! 3. In a new pid namespace, fork an init with a parent-death signal, which forks
//!    COMMAND; learn through a close-on-exec pipe that COMMAND was exec'd, send `started`
//!    (the server detaches the host copy and removes its directory), wait, and return
//!    COMMAND's status (128+signal if killed).
//!
//! Killing `sifuse run` at any moment leaves nothing behind: init dies with it and takes
//! every process of the container along, the server sees end of file (before `started`:
//! it cleans up) or the connection end (after: it exits), and the server's watcher
//! covers the server itself.
//!
//! Why an init: when `sifuse run` dies, init gets SIGKILL (parent-death signal), and when
//! a pid namespace's init dies the kernel kills every process in it, so nothing COMMAND
//! started outlives the launcher and keeps the container's mount alive. COMMAND itself is
//! not that init, because an init ignores signals it has no handler for, even SIGKILL
//! from inside its namespace.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::Pid;

use crate::mount::detached;
use crate::mount::options::MountOptions;

use super::rootfs;
use super::server_process::{Heard, ServerProcess, Waits};
use super::sys::{exit_code, ContainerSyscalls};
use super::{Bind, LauncherError};

/// What `sifuse run` was asked.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub image: PathBuf,
    /// Arguments for `sifuse mount` before IMAGE: image selection flags and `-o` lists.
    pub mount_args: Vec<OsString>,
    pub binds: Vec<Bind>,
    /// A user namespace even as root.
    pub userns: bool,
    pub command: Vec<OsString>,
    /// The mount options `mount_args` hold, for the detached mount this process creates.
    pub options: MountOptions,
    /// Use a detached mount where the kernel can (else the host-path hand-off).
    pub detached: bool,
    /// How long to wait for the server.
    pub waits: Waits,
}

/// Run COMMAND in IMAGE; returns COMMAND's exit status as a shell shows it.
pub fn run_container(
    req: &ContainerRequest,
    sys: &dyn ContainerSyscalls,
) -> Result<i32, LauncherError> {
    let userns = req.userns || !sys.is_root();
    let argv = command_argv(&req.command)?;
    let mut binds = req.binds.clone();
    for b in &mut binds {
        b.source = sys
            .canonicalize(&b.source)
            .map_err(|e| LauncherError::setup(format!("--bind {}", b.source.display()), e))?;
    }
    if !req.detached {
        tracing::debug!("--no-detached: mounting on the host (temp-directory protocol)");
    } else if sys.has_mount_api() {
        tracing::debug!(
            "detached mount: created and attached inside the container's namespaces, \
             never on the host"
        );
        return with_detached_mount(req, sys, userns, &binds, &argv);
    } else {
        tracing::debug!(
            "this kernel lacks the new mount API: mounting on the host (temp-directory \
             protocol)"
        );
    }
    with_host_mount(req, sys, userns, &binds, &argv)
}

/// COMMAND as exec takes it.
fn command_argv(command: &[OsString]) -> Result<Vec<CString>, LauncherError> {
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| LauncherError::setup("COMMAND", io::Error::other(e)))?;
    if argv.is_empty() {
        return Err(LauncherError::setup(
            "COMMAND",
            io::Error::other("no command given"),
        ));
    }
    Ok(argv)
}

/// Enter new namespaces: a mount namespace, inside a user namespace mapping the caller
/// to itself when `userns`.
fn enter_namespaces(sys: &dyn ContainerSyscalls, userns: bool) -> Result<(), LauncherError> {
    let (uid, gid) = sys.user_and_group();
    let mut flags = CloneFlags::CLONE_NEWNS;
    if userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    sys.unshare(flags).map_err(|e| {
        let hint = if userns {
            " (are unprivileged user namespaces disabled here?)"
        } else {
            ""
        };
        LauncherError::setup(format!("cannot unshare namespaces{hint}"), e)
    })?;
    if userns {
        // An unprivileged process may map only itself, and a gid only once setgroups
        // is denied.
        for (name, content) in [
            ("setgroups", "deny".to_string()),
            ("uid_map", format!("{uid} {uid} 1\n")),
            ("gid_map", format!("{gid} {gid} 1\n")),
        ] {
            sys.write_proc_self(name, &content)
                .map_err(|e| LauncherError::setup(format!("cannot write /proc/self/{name}"), e))?;
        }
    }
    Ok(())
}

/// Make every mount of this (new) namespace private: no mount or unmount here may reach
/// the caller's namespace. pivot_root needs it too.
fn make_private(sys: &dyn ContainerSyscalls) -> Result<(), LauncherError> {
    sys.make_mounts_private()
        .map_err(|e| LauncherError::setup("cannot make mounts private", e))
}

/// Bind sources held by descriptor, by their canonical paths.
type HeldSources = Vec<(PathBuf, OwnedFd)>;

/// Make `root` the root of this mount namespace. Bind sources found in `held` are bound
/// from their descriptors (`/proc/self/fd/N`), so that a source the attached image hides
/// is still reached.
fn enter_root(
    sys: &dyn ContainerSyscalls,
    root: &Path,
    binds: &[Bind],
    held: &HeldSources,
) -> Result<(), LauncherError> {
    make_private(sys)?;
    let mut steps = rootfs::plan(root, binds, &|p| sys.is_dir(p), &|p| sys.exists(p))?;
    for step in &mut steps {
        if let rootfs::Step::Bind { source, .. } = step {
            if let Some((_, fd)) = held.iter().find(|(p, _)| p == source) {
                *source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            }
        }
    }
    for step in &steps {
        rootfs::apply(sys, step)?;
    }
    sys.chdir(root)
        .map_err(|e| LauncherError::setup(format!("cannot enter {}", root.display()), e))?;
    // The new root needs no directory for the old one (it is read-only anyway): stack the
    // old root on top and detach it.
    sys.pivot_root_to_cwd()
        .map_err(|e| LauncherError::setup("pivot_root", e))?;
    sys.detach_old_root()
        .map_err(|e| LauncherError::setup("cannot detach the old root", e))?;
    sys.chdir(Path::new("/"))
        .map_err(|e| LauncherError::setup("chdir /", e))?;
    Ok(())
}

/// Start the container's processes in a new pid namespace: its init, which forks
/// COMMAND. Returns init's pid once COMMAND was exec'd.
fn start_container(sys: &dyn ContainerSyscalls, argv: &[CString]) -> Result<Pid, LauncherError> {
    sys.unshare(CloneFlags::CLONE_NEWPID)
        .map_err(|e| LauncherError::setup("cannot unshare a pid namespace", e))?;
    sys.fork_container(argv)
}

/// Wait for the container's init; COMMAND's exit status.
fn wait_container(sys: &dyn ContainerSyscalls, init: Pid) -> Result<i32, LauncherError> {
    sys.wait_exit(init)
        .map(exit_code)
        .map_err(|e| LauncherError::setup("waitpid", e))
}

/// The host-path hand-off: the server mounts on the host, the container's namespace
/// copies the mount, and `started` has the server detach the host copy.
fn with_host_mount(
    req: &ContainerRequest,
    sys: &dyn ContainerSyscalls,
    userns: bool,
    binds: &[Bind],
    argv: &[CString],
) -> Result<i32, LauncherError> {
    let mut server = ServerProcess::start(sys, &req.image, &req.mount_args, false, req.waits)?;
    let root = server.wait_ready()?;
    let started = enter_namespaces(sys, userns)
        .and_then(|()| enter_root(sys, &root, binds, &Vec::new()))
        .and_then(|()| start_container(sys, argv));
    let init = match started {
        Ok(init) => init,
        Err(e) => {
            server.clean_up();
            return Err(e);
        }
    };
    server.tell_started();
    let status = wait_container(sys, init)?;
    // The server serves the container's copy until this process, the last holder, is
    // gone; it is not waited for.
    drop(server);
    Ok(status)
}

/// In the new namespaces: create the detached mount, have the server serve it.
fn create_and_hand_over(
    req: &ContainerRequest,
    sys: &dyn ContainerSyscalls,
    server: &mut ServerProcess,
) -> Result<OwnedFd, LauncherError> {
    let made = detached::make(sys, &req.image, &req.options)
        .map_err(|source| LauncherError::Detached { source })?;
    server.hand_over(made.fuse.as_fd())?;
    Ok(made.mount)
}

/// The detached mount: made, attached and pivoted into inside the new namespaces only.
fn with_detached_mount(
    req: &ContainerRequest,
    sys: &dyn ContainerSyscalls,
    userns: bool,
    binds: &[Bind],
    argv: &[CString],
) -> Result<i32, LauncherError> {
    let attach_on = sys
        .temp_base()
        .map_err(|e| LauncherError::setup("$TMPDIR", e))?;
    // Before unsharing: the server must stay outside the container's namespaces.
    let mut server = ServerProcess::start(sys, &req.image, &req.mount_args, true, req.waits)?;
    // On failure nothing needs cleaning: dropping the server's stream (or this process's
    // mount descriptor and namespace) ends the server.
    enter_namespaces(sys, userns)?;
    make_private(sys)?;
    let mount = create_and_hand_over(req, sys, &mut server)?;
    // The image is attached on $TMPDIR, which it then hides inside the namespace; bind
    // sources are held by descriptor first, so that one beneath it is still reached. They
    // are opened here, in the new namespace: a bind must come from a mount of the
    // caller's own namespace.
    let mut held: HeldSources = Vec::new();
    for b in binds {
        let fd = sys
            .hold(&b.source)
            .map_err(|e| LauncherError::setup(format!("--bind {}", b.source.display()), e))?;
        held.push((b.source.clone(), fd));
    }
    sys.attach_detached(mount.as_fd(), &attach_on)
        .map_err(|e| {
            LauncherError::setup(
                format!("cannot attach the image on {}", attach_on.display()),
                e,
            )
        })?;
    drop(mount);
    enter_root(sys, &attach_on, binds, &held)?;
    drop(held);
    let init = start_container(sys, argv)?;
    wait_with_the_server(sys, init, &mut server)
}

/// Wait for COMMAND's init, and for the server: should it die while COMMAND runs, the
/// container's root is dead, so end the container (SIGKILL to init, which takes every
/// process of its pid namespace along) and fail. The server says nothing after `serving`,
/// so its stream is readable only at its end. One thread polls both: a thread cannot be
/// started once a pid namespace was unshared for the children. A pidfd names init for
/// good, where a kill by number could hit a later process given the same one.
fn wait_with_the_server(
    sys: &dyn ContainerSyscalls,
    init: Pid,
    server: &mut ServerProcess,
) -> Result<i32, LauncherError> {
    let pidfd = match sys.open_pidfd(init) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("pidfd_open: {e}");
            return wait_container(sys, init);
        }
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: server.stream().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) reads and writes exactly the two pollfds the pointer and the
        // count describe, which live across the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(LauncherError::setup("poll", e));
        }
        if fds[0].revents != 0 {
            return wait_container(sys, init);
        }
        if fds[1].revents != 0 {
            // Readable: a line, or the end of the stream, is there already.
            match server.hear_answer() {
                Ok(Heard::Message(m)) => {
                    tracing::warn!("the server said {:?} after serving", m.to_string());
                    continue;
                }
                Ok(Heard::Other(line)) => {
                    tracing::warn!("the server said {line:?} after serving");
                    continue;
                }
                Ok(Heard::End) | Err(_) => {}
            }
            if let Err(e) = sys.kill_pidfd(pidfd.as_fd()) {
                tracing::warn!("cannot kill the container: {e}");
            }
            let _ = wait_container(sys, init);
            return Err(LauncherError::Server(
                "exited while COMMAND ran (its mount is dead): the container was ended".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::fdpass::recv_line;
    use crate::launcher::rootfs::RootSyscalls;
    use crate::launcher::sys::ServerChild;
    use crate::mount::detached::{DetachedError, DetachedSyscalls};
    use crate::mount::spec::MountSpec;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::BorrowedFd;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;
    use std::sync::Mutex;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use nix::sys::wait::WaitStatus;

    /// What the fake server does with its end of the control stream; returns what it
    /// heard.
    type Script = Box<dyn FnOnce(UnixStream) -> Vec<String> + Send>;

    /// The server of the detached mount: takes `serve-fd` (with a descriptor), answers
    /// `answer` (None: closes the stream; Some(""): says nothing), then listens to the end.
    fn serving(answer: Option<&'static str>) -> Script {
        Box::new(move |stream| {
            let mut heard = Vec::new();
            // The launcher failed before the hand-off: its end is closed.
            let Ok(Some(r)) = recv_line(stream.as_fd()) else {
                return heard;
            };
            heard.push(format!("{} with {} descriptor(s)", r.line, r.fds.len()));
            let Some(answer) = answer else { return heard };
            if !answer.is_empty() {
                (&stream).write_all(answer.as_bytes()).unwrap();
            }
            heard.extend(BufReader::new(&stream).lines().map_while(Result::ok));
            heard
        })
    }

    /// The server of the host-path hand-off: says `first`, then answers each line it hears
    /// (`started`, `cleanup`) as `answers` say.
    fn on_host(first: &'static str, answers: &'static [(&'static str, &'static str)]) -> Script {
        Box::new(move |stream| {
            (&stream).write_all(first.as_bytes()).unwrap();
            let mut heard = Vec::new();
            for line in BufReader::new(&stream).lines().map_while(Result::ok) {
                if let Some((_, answer)) = answers.iter().find(|(asked, _)| *asked == line) {
                    (&stream).write_all(answer.as_bytes()).unwrap();
                }
                heard.push(line);
            }
            heard
        })
    }

    struct FakeChild(std::sync::Arc<Mutex<Vec<String>>>);

    impl ServerChild for FakeChild {
        fn kill(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push("kill the server".into());
            Ok(())
        }
        fn wait(&mut self) -> io::Result<ExitStatus> {
            Ok(ExitStatus::from_raw(1 << 8))
        }
    }

    /// Records every call; the call that starts with `fail.0`, its `fail.1`-th time (from
    /// 0), fails with EPERM. The server runs `script` on a thread; COMMAND exits 7 at once
    /// unless `command_runs`.
    struct FakeContainer {
        calls: std::sync::Arc<Mutex<Vec<String>>>,
        root: bool,
        mount_api: bool,
        fail: Option<(&'static str, usize)>,
        exec_errno: Option<i32>,
        create: fn() -> Result<OwnedFd, DetachedError>,
        missing: Vec<&'static str>,
        command_runs: bool,
        script: Mutex<Option<Script>>,
        server: Mutex<Option<JoinHandle<Vec<String>>>>,
        /// The write end of init's stand-in pidfd, while COMMAND runs.
        running: Mutex<Option<OwnedFd>>,
        pidfd: Mutex<Option<OwnedFd>>,
    }

    impl FakeContainer {
        fn new(script: Script) -> FakeContainer {
            FakeContainer {
                calls: Default::default(),
                root: false,
                mount_api: true,
                fail: None,
                exec_errno: None,
                create: || Ok(std::fs::File::open("/dev/null").unwrap().into()),
                missing: Vec::new(),
                command_runs: false,
                script: Mutex::new(Some(script)),
                server: Mutex::default(),
                running: Mutex::default(),
                pidfd: Mutex::default(),
            }
        }

        fn failing(mut self, call: &'static str, nth: usize) -> Self {
            self.fail = Some((call, nth));
            self
        }

        fn call(&self, call: String) -> io::Result<()> {
            let mut calls = self.calls.lock().unwrap();
            let fails = self.fail.is_some_and(|(prefix, nth)| {
                call.starts_with(prefix)
                    && calls.iter().filter(|c| c.starts_with(prefix)).count() == nth
            });
            calls.push(call);
            if fails {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        /// What the server heard, once it is gone.
        fn server_heard(&self) -> Vec<String> {
            let server = self.server.lock().unwrap().take();
            server.map_or_else(Vec::new, |s| s.join().unwrap())
        }

        fn null() -> OwnedFd {
            std::fs::File::open("/dev/null").unwrap().into()
        }
    }

    impl RootSyscalls for FakeContainer {
        fn bind(&self, source: &Path, target: &Path) -> io::Result<()> {
            self.call(format!("bind {} {}", source.display(), target.display()))
        }
        fn remount_read_only(&self, target: &Path) -> io::Result<()> {
            self.call(format!("remount ro {}", target.display()))
        }
        fn set_read_only(&self, target: &Path, _: bool) -> io::Result<()> {
            self.call(format!("setattr ro {}", target.display()))
        }
        fn mount_points_under(&self, _: &Path) -> io::Result<Vec<PathBuf>> {
            Ok(Vec::new())
        }
        fn tmpfs(&self, target: &Path) -> io::Result<()> {
            self.call(format!("tmpfs {}", target.display()))
        }
    }

    impl DetachedSyscalls for FakeContainer {
        fn open_fuse(&self) -> io::Result<OwnedFd> {
            self.call("open /dev/fuse".into()).map(|()| Self::null())
        }
        fn create_detached(
            &self,
            _: BorrowedFd<'_>,
            spec: &MountSpec,
        ) -> Result<OwnedFd, DetachedError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("create the detached mount of {}", spec.source));
            (self.create)()
        }
        fn user_and_group(&self) -> (u32, u32) {
            (1000, 100)
        }
    }

    impl ContainerSyscalls for FakeContainer {
        fn is_root(&self) -> bool {
            self.root
        }
        fn has_mount_api(&self) -> bool {
            self.mount_api
        }
        fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
            self.call(format!("canonicalize {}", path.display()))
                .map(|()| Path::new("/host").join(path.strip_prefix("/").unwrap_or(path)))
        }
        fn temp_base(&self) -> io::Result<PathBuf> {
            self.call("temp base".into()).map(|()| "/t".into())
        }
        fn start_server(
            &self,
            args: &[OsString],
        ) -> io::Result<(Box<dyn ServerChild>, UnixStream)> {
            let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            self.call(format!("start sifuse {}", args.join(" ")))?;
            let (ours, theirs) = UnixStream::pair()?;
            let script = self.script.lock().unwrap().take().expect("one server");
            *self.server.lock().unwrap() = Some(std::thread::spawn(move || script(theirs)));
            Ok((Box::new(FakeChild(self.calls.clone())), ours))
        }
        fn unshare(&self, namespaces: CloneFlags) -> io::Result<()> {
            self.call(format!("unshare {namespaces:?}"))
        }
        fn write_proc_self(&self, name: &str, content: &str) -> io::Result<()> {
            self.call(format!("write {name} {}", content.trim_end()))
        }
        fn make_mounts_private(&self) -> io::Result<()> {
            self.call("make private".into())
        }
        fn attach_detached(&self, _: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
            self.call(format!("move_mount {}", target.display()))
        }
        fn hold(&self, path: &Path) -> io::Result<OwnedFd> {
            self.call(format!("hold {}", path.display()))
                .map(|()| Self::null())
        }
        fn is_dir(&self, path: &Path) -> bool {
            !self.missing.iter().any(|m| path == Path::new(m))
        }
        fn exists(&self, path: &Path) -> bool {
            self.is_dir(path)
        }
        fn chdir(&self, path: &Path) -> io::Result<()> {
            self.call(format!("chdir {}", path.display()))
        }
        fn pivot_root_to_cwd(&self) -> io::Result<()> {
            self.call("pivot_root . .".into())
        }
        fn detach_old_root(&self) -> io::Result<()> {
            self.call("umount -l .".into())
        }
        fn fork_container(&self, argv: &[CString]) -> Result<Pid, LauncherError> {
            let argv: Vec<_> = argv.iter().map(|a| a.to_string_lossy()).collect();
            self.call(format!("fork init: {}", argv.join(" ")))
                .map_err(|e| LauncherError::setup("fork", e))?;
            if let Some(errno) = self.exec_errno {
                return Err(LauncherError::Exec {
                    command: argv[0].to_string(),
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            *self.pidfd.lock().unwrap() = Some(read);
            if self.command_runs {
                *self.running.lock().unwrap() = Some(write);
            }
            Ok(Pid::from_raw(4242))
        }
        fn wait_exit(&self, pid: Pid) -> io::Result<WaitStatus> {
            self.call(format!("wait {pid}"))
                .map(|()| WaitStatus::Exited(pid, 7))
        }
        fn open_pidfd(&self, pid: Pid) -> io::Result<OwnedFd> {
            self.call(format!("pidfd_open {pid}"))?;
            Ok(self.pidfd.lock().unwrap().take().expect("forked"))
        }
        fn kill_pidfd(&self, _: BorrowedFd<'_>) -> io::Result<()> {
            self.running.lock().unwrap().take();
            self.call("kill init".into())
        }
    }

    fn request(detached: bool) -> ContainerRequest {
        ContainerRequest {
            image: "/i/img.sif".into(),
            mount_args: vec!["-o".into(), "uid=5".into()],
            binds: vec!["/data:/opt".parse().unwrap()],
            userns: false,
            command: vec!["sh".into(), "-c".into(), "exit 7".into()],
            options: MountOptions::default(),
            detached,
            waits: Waits {
                mount: Duration::from_millis(200),
                answer: Duration::from_millis(200),
            },
        }
    }

    /// Every call `sifuse run` makes on the default path, unprivileged, in order.
    const DETACHED: &[&str] = &[
        "canonicalize /data",
        "temp base",
        "start sifuse mount --control-fd 3 --serve-fd -o uid=5 -- /i/img.sif",
        "unshare CloneFlags(CLONE_NEWNS | CLONE_NEWUSER)",
        "write setgroups deny",
        "write uid_map 1000 1000 1",
        "write gid_map 100 100 1",
        "make private",
        "open /dev/fuse",
        "create the detached mount of /i/img.sif",
        "hold /host/data",
        "move_mount /t",
        "make private",
        "bind /t /t",
        "remount ro /t",
        "bind /proc /t/proc",
        "bind /t/proc/sys /t/proc/sys",
        "bind /t/proc/sysrq-trigger /t/proc/sysrq-trigger",
        "bind /t/proc/irq /t/proc/irq",
        "bind /t/proc/bus /t/proc/bus",
        "bind /t/proc/fs /t/proc/fs",
        "bind /dev /t/dev",
        "bind /sys /t/sys",
        "setattr ro /t/sys",
        "tmpfs /t/tmp",
        "bind /proc/self/fd/",
        "chdir /t",
        "pivot_root . .",
        "umount -l .",
        "chdir /",
        "unshare CloneFlags(CLONE_NEWPID)",
        "fork init: sh -c exit 7",
        "pidfd_open 4242",
        "wait 4242",
    ];

    fn assert_calls(calls: &[String], expected: &[&str]) {
        assert_eq!(calls.len(), expected.len(), "{calls:#?}");
        for (call, want) in calls.iter().zip(expected) {
            assert!(
                call.starts_with(want),
                "{call:?} is not {want:?}: {calls:#?}"
            );
        }
    }

    #[test]
    fn the_detached_mount_is_made_inside_and_command_s_status_returned() {
        let sys = FakeContainer::new(serving(Some("serving\n")));
        assert_eq!(run_container(&request(true), &sys).unwrap(), 7);
        assert_calls(&sys.calls(), DETACHED);
        assert_eq!(sys.server_heard(), ["serve-fd with 1 descriptor(s)"]);
        // As root, no user namespace; a missing /sys in the image is skipped.
        let mut sys = FakeContainer::new(serving(Some("serving\n")));
        sys.root = true;
        sys.missing = vec!["/t/sys"];
        assert_eq!(run_container(&request(true), &sys).unwrap(), 7);
        let calls = sys.calls();
        assert_eq!(calls[3], "unshare CloneFlags(CLONE_NEWNS)");
        assert!(!calls
            .iter()
            .any(|c| c.starts_with("write ") || c.contains("/t/sys")));
    }

    /// Each call failing, in turn: the error says which step, the server is not left
    /// waiting, and nothing after the failed step is done.
    #[test]
    fn every_failure_on_the_detached_path_is_reported_and_stops_there() {
        let cases: &[(&str, usize, &str)] = &[
            ("canonicalize", 0, "--bind /data: "),
            ("temp base", 0, "$TMPDIR: "),
            ("start sifuse", 0, "cannot start the sifuse server: "),
            (
                "unshare",
                0,
                "cannot unshare namespaces (are unprivileged user namespaces",
            ),
            ("write setgroups", 0, "cannot write /proc/self/setgroups: "),
            ("write uid_map", 0, "cannot write /proc/self/uid_map: "),
            ("write gid_map", 0, "cannot write /proc/self/gid_map: "),
            ("make private", 0, "cannot make mounts private: "),
            ("open /dev/fuse", 0, "cannot open /dev/fuse: "),
            ("hold", 0, "--bind /host/data: "),
            ("move_mount", 0, "cannot attach the image on /t: "),
            ("make private", 1, "cannot make mounts private: "),
            ("bind /t", 0, "cannot bind /t to /t: "),
            ("remount ro", 0, "cannot make /t read-only: "),
            (
                "bind /t/proc/sys",
                0,
                "cannot bind /t/proc/sys to /t/proc/sys: ",
            ),
            ("bind /proc/self/fd/", 0, "cannot bind /proc/self/fd/"),
            ("setattr ro", 0, "cannot make /t/sys and below read-only: "),
            ("tmpfs", 0, "cannot mount a tmpfs on /t/tmp: "),
            ("chdir /t", 0, "cannot enter /t: "),
            ("pivot_root", 0, "pivot_root: "),
            ("umount -l .", 0, "cannot detach the old root: "),
            ("chdir /", 1, "chdir /: "),
            (
                "unshare CloneFlags(CLONE_NEWPID)",
                0,
                "cannot unshare a pid namespace: ",
            ),
            ("fork init", 0, "fork: "),
            ("wait", 0, "waitpid: "),
        ];
        for &(call, nth, expected) in cases {
            let sys = FakeContainer::new(serving(Some("serving\n"))).failing(call, nth);
            let err = run_container(&request(true), &sys).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{call}: {err:?}");
            assert!(
                err.ends_with("Operation not permitted (os error 1)"),
                "{call}: {err}"
            );
            let calls = sys.calls();
            let failed = calls
                .iter()
                .filter(|c| c.starts_with(call))
                .nth(nth)
                .unwrap_or_else(|| panic!("{call}: {calls:#?}"));
            assert_eq!(failed, calls.last().unwrap(), "{call}: stopped there");
            // The server (if started) sees the stream end: nothing keeps it waiting.
            drop(sys.script.lock().unwrap().take());
            let _ = sys.server_heard();
        }
        // Init's pidfd cannot be had: waited for by its pid instead.
        let sys = FakeContainer::new(serving(Some("serving\n"))).failing("pidfd_open", 0);
        assert_eq!(run_container(&request(true), &sys).unwrap(), 7);
    }

    #[test]
    fn what_the_kernel_and_the_server_say_about_the_detached_mount() {
        let mut sys = FakeContainer::new(serving(None));
        sys.create = || {
            Err(DetachedError::Failed {
                call: "fsopen(\"fuse\")",
                source: io::Error::from_raw_os_error(libc::EPERM),
                log: String::new(),
            })
        };
        let err = run_container(&request(true), &sys).unwrap_err().to_string();
        assert!(err.contains("CAP_SYS_ADMIN in a user namespace"), "{err}");
        assert!(sys.server_heard().is_empty(), "nothing handed over");

        for (answer, expected) in [
            (
                Some("error no such image\n"),
                "the sifuse server: no such image",
            ),
            (Some("ready /x\n"), "the sifuse server: ready /x"),
            (
                None,
                "the sifuse server: exited before serving (exit status: 1)",
            ),
            (
                Some(""),
                "the sifuse server: did not answer within 0.2 s: stopped",
            ),
        ] {
            let sys = FakeContainer::new(serving(answer));
            let err = run_container(&request(true), &sys).unwrap_err().to_string();
            assert_eq!(err, expected);
            let calls = sys.calls();
            assert!(calls.last().unwrap().starts_with(if answer == Some("") {
                "kill the server"
            } else {
                "create the detached mount"
            }));
            assert!(
                !calls.iter().any(|c| c.starts_with("move_mount")),
                "{calls:#?}"
            );
        }
    }

    #[test]
    fn a_server_that_dies_while_command_runs_ends_the_container() {
        let mut sys = FakeContainer::new(Box::new(|stream| {
            let got = recv_line(stream.as_fd()).unwrap().unwrap();
            (&stream)
                .write_all(b"serving\nnot a word of the protocol\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            vec![got.line]
        }));
        sys.command_runs = true;
        let err = run_container(&request(true), &sys).unwrap_err().to_string();
        assert_eq!(
            err,
            "the sifuse server: exited while COMMAND ran (its mount is dead): the container was ended"
        );
        let calls = sys.calls();
        assert_eq!(calls[calls.len() - 2..], ["kill init", "wait 4242"]);
    }

    #[test]
    fn a_command_that_cannot_run_is_its_own_error() {
        let mut sys = FakeContainer::new(serving(Some("serving\n")));
        sys.exec_errno = Some(libc::ENOENT);
        match run_container(&request(true), &sys) {
            Err(LauncherError::Exec { command, source }) => {
                assert_eq!(command, "sh");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    const ON_HOST: &[&str] = &[
        "canonicalize /data",
        "start sifuse mount --control-fd 3 -o uid=5 -- /i/img.sif",
        "unshare CloneFlags(CLONE_NEWNS | CLONE_NEWUSER)",
        "write setgroups deny",
        "write uid_map 1000 1000 1",
        "write gid_map 100 100 1",
        "make private",
        "bind /r /r",
        "remount ro /r",
        "bind /proc /r/proc",
        "bind /r/proc/sys /r/proc/sys",
        "bind /r/proc/sysrq-trigger /r/proc/sysrq-trigger",
        "bind /r/proc/irq /r/proc/irq",
        "bind /r/proc/bus /r/proc/bus",
        "bind /r/proc/fs /r/proc/fs",
        "bind /dev /r/dev",
        "bind /sys /r/sys",
        "setattr ro /r/sys",
        "tmpfs /r/tmp",
        "bind /host/data /r/opt",
        "chdir /r",
        "pivot_root . .",
        "umount -l .",
        "chdir /",
        "unshare CloneFlags(CLONE_NEWPID)",
        "fork init: sh -c exit 7",
        "wait 4242",
    ];

    const HOST_SERVER: &[(&str, &str)] = &[("started", "detached\n"), ("cleanup", "done\n")];

    #[test]
    fn on_the_host_path_started_follows_the_container_and_cleanup_a_failure() {
        // --no-detached, and a kernel without the new mount API, take the host path.
        for (detached, mount_api) in [(false, true), (true, false)] {
            let mut sys = FakeContainer::new(on_host("ready /r\n", HOST_SERVER));
            sys.mount_api = mount_api;
            assert_eq!(run_container(&request(detached), &sys).unwrap(), 7);
            assert_calls(&sys.calls(), ON_HOST);
            assert_eq!(sys.server_heard(), ["started"]);
        }
        // A step after ready fails: the server is asked to clean up, and is waited for.
        for (call, nth) in [
            ("unshare", 0),
            ("bind /r", 0),
            ("pivot_root", 0),
            ("fork", 0),
        ] {
            let sys = FakeContainer::new(on_host("ready /r\n", HOST_SERVER)).failing(call, nth);
            assert!(run_container(&request(false), &sys).is_err(), "{call}");
            assert_eq!(sys.server_heard(), ["cleanup"], "{call}");
        }
        // The bind's destination must exist in the image, which is read-only.
        let mut sys = FakeContainer::new(on_host("ready /r\n", HOST_SERVER));
        sys.missing = vec!["/r/opt"];
        let err = run_container(&request(false), &sys)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--bind /host/data:/opt: "), "{err}");
        assert_eq!(sys.server_heard(), ["cleanup"]);
        // The server does not detach its copy: the container runs anyway.
        let sys = FakeContainer::new(on_host("ready /r\n", &[("started", "error busy\n")]));
        assert_eq!(run_container(&request(false), &sys).unwrap(), 7);
    }

    #[test]
    fn what_the_server_says_before_ready_on_the_host_path() {
        for (first, expected) in [
            ("error no such image\n", "the sifuse server: no such image"),
            (
                "serving\n",
                "the sifuse server: unexpected message \"serving\"",
            ),
            (
                "",
                "the sifuse server: did not answer within 0.2 s: stopped",
            ),
        ] {
            let sys = FakeContainer::new(on_host(first, HOST_SERVER));
            let err = run_container(&request(false), &sys)
                .unwrap_err()
                .to_string();
            assert_eq!(err, expected);
            assert!(!sys.calls().iter().any(|c| c.starts_with("unshare")));
        }
        let sys = FakeContainer::new(Box::new(|_| Vec::new()));
        let err = run_container(&request(false), &sys)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the sifuse server: exited before the mount was ready (exit status: 1)"
        );
    }
}
