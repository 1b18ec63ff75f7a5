//! `sifuse run`: a reference launcher on top of the control protocol.
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
//! falls back to the temp-directory protocol:
//!
//! 1. Start the server (`sifuse mount --control-fd 3 IMAGE`, this same binary) with one
//!    end of a socketpair, in the caller's namespaces, and wait for `ready PATH`. As root
//!    it mounts with mount(2); otherwise through the setuid fusermount3, so the host copy
//!    lives in the caller's mount namespace where the server can later detach it.
//! 2. Unshare a mount namespace (and a user namespace mapping the caller to itself when
//!    not root, or with `--userns`), make every mount private, bind the mount onto itself
//!    (a mount copied from a more privileged namespace is locked and cannot become a
//!    root), keep it read-only, mount /proc, /dev and /sys (binds of the host's: a fresh
//!    sysfs needs a network namespace, a fresh proc a process inside the pid namespace),
//!    a tmpfs /tmp and the `--bind`s, then pivot_root into it. From here the container's
//!    namespace holds its own copy.
//! 3. In a new pid namespace, fork an init with a parent-death signal, which forks
//!    COMMAND; learn through a close-on-exec pipe that COMMAND was exec'd, send `started`
//!    (the server detaches the host copy and removes its directory), wait, and return
//!    COMMAND's status (128+signal if killed).
//!
//! Killing `sifuse run` at any moment leaves nothing behind: init dies with it and takes
//! every process of the container along, the server sees end of file (before `started`:
//! it cleans up) or the connection end (after: it exits), and the server's watcher
//! covers the server itself.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use super::fdpass::send_line_with_fd;
use super::handoff;
use super::host::temp_base;
use super::protocol::{read_line_bounded, Line, MAX_LINE};
use super::rootfs;
use super::LauncherError;
use crate::mount::detached::attach_at;
use crate::mount::options::MountOptions;

/// `--bind SRC[:DST]`: the host's SRC at DST inside the container (DST defaults to SRC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub dest: PathBuf,
}

impl FromStr for Bind {
    type Err = String;

    fn from_str(s: &str) -> Result<Bind, String> {
        let (source, dest) = s.split_once(':').unwrap_or((s, s));
        if source.is_empty() || dest.is_empty() {
            return Err(format!("{s:?}: expected SRC or SRC:DST"));
        }
        if !dest.starts_with('/') {
            return Err(format!(
                "{dest:?}: the destination must be an absolute path"
            ));
        }
        Ok(Bind {
            source: source.into(),
            dest: dest.into(),
        })
    }
}

/// What `sifuse run` was asked.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub image: PathBuf,
    /// Arguments for `sifuse mount` before IMAGE: image selection flags and `-o` lists.
    pub mount_args: Vec<OsString>,
    pub binds: Vec<Bind>,
    /// A user namespace even as root.
    pub userns: bool,
    pub command: Vec<OsString>,
    /// The mount options `mount_args` hold, for the detached mount this process creates.
    pub options: MountOptions,
    /// Use a detached mount where the kernel can (else the temp-directory protocol).
    pub detached: bool,
}

/// How long to wait for the server to mount (`ready`) or start serving (`serving`): it
/// opens the image and reads its superblock and tables first.
const MOUNT_WAIT: Duration = Duration::from_secs(60);

/// How long to wait for any other answer (`detached`, `done`).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// The server and the launcher's end of the control stream.
struct Server {
    child: Child,
    input: BufReader<UnixStream>,
    output: UnixStream,
}

impl Server {
    /// Start `sifuse mount --control-fd 3 [--serve-fd] ... IMAGE` with the other end as
    /// descriptor 3.
    fn start(req: &RunRequest, serve_fd: bool) -> Result<Server, LauncherError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| LauncherError::setup("socketpair", e))?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("sifuse")
            .args(["mount", "--control-fd", "3"])
            .args(serve_fd.then_some("--serve-fd"))
            .args(&req.mount_args)
            .arg("--")
            .arg(&req.image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A process group of its own: a terminal's ^C ends COMMAND and this launcher,
            // and the server then cleans up in order instead of dying with them.
            .process_group(0);
        // SAFETY: only dup2 and fcntl, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if their_fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(their_fd, 3) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| LauncherError::setup("cannot start the sifuse server", e))?;
        drop(theirs);
        let output = ours
            .try_clone()
            .map_err(|e| LauncherError::setup("socketpair", e))?;
        Ok(Server {
            child,
            input: BufReader::new(ours),
            output,
        })
    }

    /// The next line from the server, without its newline; None at end of file. A server
    /// that says nothing for `limit` is killed (its watcher cleans up after it) and that
    /// is the error.
    fn read_line(&mut self, limit: Duration) -> Result<Option<String>, LauncherError> {
        let timed_out = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        let read = self
            .input
            .get_ref()
            .set_read_timeout(Some(limit))
            .and_then(|()| read_line_bounded(&mut self.input, MAX_LINE));
        match read {
            Ok(Line::Text(line)) => Ok(Some(line)),
            Ok(Line::NotUtf8 | Line::TooLong) => Ok(Some("(an unreadable line)".into())),
            Ok(Line::End) => Ok(None),
            Err(e) if timed_out(&e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Err(LauncherError::Server(format!(
                    "did not answer within {} s: stopped",
                    limit.as_secs()
                )))
            }
            // A broken stream: the server is gone.
            Err(_) => Ok(None),
        }
    }

    /// Wait for `ready PATH`.
    fn ready(&mut self) -> Result<PathBuf, LauncherError> {
        match self.read_line(MOUNT_WAIT)? {
            Some(line) => match line.split_once(' ') {
                Some(("ready", path)) => Ok(PathBuf::from(path)),
                Some(("error", msg)) => {
                    let _ = self.child.wait();
                    Err(LauncherError::Server(msg.to_string()))
                }
                _ => Err(LauncherError::Server(format!(
                    "unexpected message {line:?}"
                ))),
            },
            None => {
                let status = self.child.wait();
                Err(LauncherError::Server(format!(
                    "exited before the mount was ready ({})",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                )))
            }
        }
    }

    /// Hand over the /dev/fuse descriptor of the detached mount and wait for `serving`.
    fn serve(&mut self, fuse: &OwnedFd) -> Result<(), LauncherError> {
        use std::os::fd::AsFd;
        send_line_with_fd(self.output.as_fd(), "serve-fd", fuse.as_fd())
            .map_err(|e| LauncherError::Server(format!("cannot send serve-fd: {e}")))?;
        match self.read_line(MOUNT_WAIT)? {
            Some(line) if line == "serving" => Ok(()),
            Some(line) => Err(LauncherError::Server(
                line.strip_prefix("error ").unwrap_or(&line).to_string(),
            )),
            None => Err(LauncherError::Server(format!(
                "exited before serving ({})",
                self.child
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string())
            ))),
        }
    }

    fn send(&mut self, message: &str) -> io::Result<()> {
        self.output.write_all(format!("{message}\n").as_bytes())
    }

    /// Startup failed: ask the server to clean up, and wait for it.
    fn clean_up(mut self) {
        if self.send("cleanup").is_ok() {
            match self.read_line(ANSWER_WAIT) {
                Ok(Some(line)) if line == "done" => {}
                Ok(None) => {}
                Ok(Some(other)) => eprintln!("sifuse: cleanup: {other}"),
                Err(e) => eprintln!("sifuse: cleanup: {e}"),
            }
        }
        drop(self.output);
        drop(self.input);
        let _ = self.child.wait();
    }
}

/// Write one line to a /proc file of this process.
fn write_proc(name: &str, content: &str) -> Result<(), LauncherError> {
    std::fs::write(format!("/proc/self/{name}"), content)
        .map_err(|e| LauncherError::setup(format!("cannot write /proc/self/{name}"), e))
}

/// Enter new namespaces: a mount namespace, inside a user namespace mapping the caller
/// to itself when `userns`.
fn unshare(userns: bool) -> Result<(), LauncherError> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let mut flags = CloneFlags::CLONE_NEWNS;
    if userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    nix::sched::unshare(flags).map_err(|e| {
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
        write_proc("setgroups", "deny")?;
        write_proc("uid_map", &format!("{uid} {uid} 1\n"))?;
        write_proc("gid_map", &format!("{gid} {gid} 1\n"))?;
    }
    Ok(())
}

/// Make every mount of this (new) namespace private: no mount or unmount here may reach
/// the caller's namespace. pivot_root needs it too.
fn make_private() -> Result<(), LauncherError> {
    let none: Option<&str> = None;
    nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| LauncherError::setup("cannot make mounts private", e))
}

/// Bind sources held by descriptor (`/proc/self/fd/N`), by their canonical paths.
type HeldSources = Vec<(PathBuf, File)>;

/// Make `root` the root of this mount namespace. Bind sources found in `held` are bound
/// from their descriptors, so that a source the attached image hides is still reached.
fn enter_root(root: &Path, binds: &[Bind], held: &HeldSources) -> Result<(), LauncherError> {
    make_private()?;
    let mut steps = rootfs::plan(root, binds, &|p| p.is_dir(), &|p| p.exists())?;
    for step in &mut steps {
        if let rootfs::Step::Bind { source, .. } = step {
            if let Some((_, f)) = held.iter().find(|(p, _)| p == source) {
                *source = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
            }
        }
    }
    for step in &steps {
        rootfs::apply(&rootfs::LinuxRoot, step)?;
    }
    std::env::set_current_dir(root)
        .map_err(|e| LauncherError::setup(format!("cannot enter {}", root.display()), e))?;
    // The new root needs no directory for the old one (it is read-only anyway): stack the
    // old root on top and detach it.
    nix::unistd::pivot_root(".", ".").map_err(|e| LauncherError::setup("pivot_root", e))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| LauncherError::setup("cannot detach the old root", e))?;
    std::env::set_current_dir("/").map_err(|e| LauncherError::setup("chdir /", e))?;
    Ok(())
}

/// The exit status a shell would show for `status`.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}

/// Whether the process that holds the write end of `alive` is gone (its end closed).
fn parent_gone(alive: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll on one valid descriptor, without waiting.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n != 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Start the container's processes in a new pid namespace: its init, a fork of this
/// process, and COMMAND, init's child. Returns init's pid once COMMAND was exec'd.
///
/// Why an init: when `sifuse run` dies, init gets SIGKILL (parent-death signal), and when
/// a pid namespace's init dies the kernel kills every process in it, so nothing COMMAND
/// started outlives the launcher and keeps the container's mount alive. COMMAND itself is
/// not that init, because an init ignores signals it has no handler for, even SIGKILL
/// from inside its namespace. Init exits with COMMAND's status (128+N when signal N
/// killed it), which is what `sifuse run` returns.
fn spawn_container(command: &[OsString]) -> Result<nix::unistd::Pid, LauncherError> {
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| LauncherError::setup("COMMAND", io::Error::other(e)))?;
    let Some(program) = argv.first().cloned() else {
        return Err(LauncherError::setup(
            "COMMAND",
            io::Error::other("no command given"),
        ));
    };
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LauncherError::setup("pipe", e))
    };
    // COMMAND writes errno here when exec fails; end of file means it was exec'd.
    let (exec_read, exec_write) = pipe()?;
    // This process keeps the write end for life: init sees it close when this one dies.
    let (alive_read, alive_write) = pipe()?;
    nix::sched::unshare(CloneFlags::CLONE_NEWPID)
        .map_err(|e| LauncherError::setup("cannot unshare a pid namespace", e))?;
    // SAFETY: `sifuse run` has a single thread (it unshared namespaces, which the kernel
    // allows only then), so the child may run ordinary code.
    match unsafe { fork() }.map_err(|e| LauncherError::setup("fork", e))? {
        ForkResult::Child => {
            drop(exec_read);
            drop(alive_write);
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            // The launcher may have died before the prctl took effect.
            if parent_gone(&alive_read) {
                // SAFETY: _exit ends the process at once.
                unsafe { libc::_exit(1) };
            }
            init(&program, &argv, exec_write)
        }
        ForkResult::Parent { child } => {
            drop(exec_write);
            drop(alive_read);
            // Deliberately kept open until this process exits (see above).
            std::mem::forget(alive_write);
            let mut errno = [0u8; 4];
            let mut r = File::from(exec_read);
            match r.read_exact(&mut errno) {
                Err(_) => Ok(child),
                Ok(()) => {
                    let _ = waitpid(child, None);
                    let e = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                    Err(LauncherError::Exec {
                        command: program.to_string_lossy().into_owned(),
                        source: e,
                    })
                }
            }
        }
    }
}

/// The container's init: start COMMAND, reap whatever ends, exit with COMMAND's status.
fn init(program: &CString, argv: &[CString], exec_write: OwnedFd) -> ! {
    // SAFETY: as in spawn_container, one thread.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // Rust ignores SIGPIPE; COMMAND expects the default.
            // SAFETY: restoring a default disposition.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let err = nix::unistd::execvp(program, argv).unwrap_err();
            let _ = File::from(exec_write).write_all(&(err as i32).to_ne_bytes());
            let code = if err == nix::errno::Errno::ENOENT {
                127
            } else {
                126
            };
            // SAFETY: _exit ends the process at once.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(exec_write);
            loop {
                match waitpid(None, None) {
                    Ok(status) if status.pid() == Some(child) => {
                        // Leaving kills everything else in the namespace.
                        // SAFETY: _exit ends the process at once.
                        unsafe { libc::_exit(exit_code(status)) }
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    // SAFETY: as above.
                    Err(_) => unsafe { libc::_exit(1) },
                }
            }
        }
        Err(e) => {
            let _ = File::from(exec_write).write_all(&(e as i32).to_ne_bytes());
            // SAFETY: as above.
            unsafe { libc::_exit(126) }
        }
    }
}

/// Run COMMAND in IMAGE; returns COMMAND's exit status.
pub fn run(req: &RunRequest) -> Result<i32, LauncherError> {
    let userns = req.userns || !nix::unistd::geteuid().is_root();
    let mut binds = req.binds.clone();
    for b in &mut binds {
        b.source = b
            .source
            .canonicalize()
            .map_err(|e| LauncherError::setup(format!("--bind {}", b.source.display()), e))?;
    }
    if !req.detached {
        tracing::debug!("--no-detached: mounting on the host (temp-directory protocol)");
    } else if handoff::kernel_has_mount_api() {
        tracing::debug!(
            "detached mount: created and attached inside the container's namespaces, \
             never on the host"
        );
        return run_detached(req, userns, &binds);
    } else {
        tracing::debug!(
            "this kernel lacks the new mount API: mounting on the host (temp-directory \
             protocol)"
        );
    }
    run_on_host(req, userns, &binds)
}

/// Wait for COMMAND's init; its exit status.
fn wait_container(child: nix::unistd::Pid) -> Result<i32, LauncherError> {
    loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(s) => return Ok(exit_code(s)),
            Err(e) => return Err(LauncherError::setup("waitpid", e)),
        }
    }
}

/// The temp-directory protocol: the server mounts on the host, the container's namespace
/// copies the mount, and `started` has the server detach the host copy.
fn run_on_host(req: &RunRequest, userns: bool, binds: &[Bind]) -> Result<i32, LauncherError> {
    let mut server = Server::start(req, false)?;
    let root = server.ready()?;
    let started = unshare(userns)
        .and_then(|()| enter_root(&root, binds, &Vec::new()))
        .and_then(|()| spawn_container(&req.command));
    let child = match started {
        Ok(child) => child,
        Err(e) => {
            server.clean_up();
            return Err(e);
        }
    };
    let answer = match server.send("started") {
        Ok(()) => server.read_line(ANSWER_WAIT),
        Err(e) => Err(LauncherError::Server(format!("cannot send started: {e}"))),
    };
    match answer {
        Ok(Some(line)) if line == "detached" => {}
        Ok(Some(line)) => eprintln!("sifuse: the server did not detach the host copy: {line}"),
        Ok(None) => eprintln!("sifuse: the server did not answer started"),
        Err(e) => eprintln!("sifuse: {e}"),
    }
    let status = wait_container(child)?;
    // The server serves the container's copy until this process, the last holder, is
    // gone; it is not waited for.
    drop(server);
    Ok(status)
}

/// In the new namespaces: create the detached mount, have the server serve it.
fn create_and_hand_over(req: &RunRequest, server: &mut Server) -> Result<OwnedFd, LauncherError> {
    use handoff::DetachedSyscalls;
    let sys = handoff::LinuxDetached(&crate::mount::sys::LinuxSyscalls);
    let fuse = sys
        .open_fuse()
        .map_err(|e| LauncherError::setup("cannot open /dev/fuse", e))?;
    let spec = handoff::detached_spec(&req.image, &req.options, sys.owner());
    let mount = handoff::create_mount(&fuse, &spec)?;
    server.serve(&fuse)?;
    Ok(mount)
}

/// The detached mount: made, attached and pivoted into inside the new namespaces only.
fn run_detached(req: &RunRequest, userns: bool, binds: &[Bind]) -> Result<i32, LauncherError> {
    let attach_on = temp_base().map_err(|e| LauncherError::setup("$TMPDIR", e))?;
    // Before unsharing: the server must stay outside the container's namespaces.
    let mut server = Server::start(req, true)?;
    let made = unshare(userns)
        .and_then(|()| make_private())
        .and_then(|()| create_and_hand_over(req, &mut server));
    // On failure nothing needs cleaning: dropping the server's stream (or this process's
    // mount descriptor and namespace) ends the server.
    let mount = made?;
    // The image is attached on $TMPDIR, which it then hides inside the namespace; bind
    // sources are held by descriptor first, so that one beneath it is still reached. They
    // are opened here, in the new namespace: a bind must come from a mount of the
    // caller's own namespace.
    let mut held: HeldSources = Vec::new();
    for b in binds {
        use std::os::unix::fs::OpenOptionsExt;
        let f = File::options()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&b.source)
            .map_err(|e| LauncherError::setup(format!("--bind {}", b.source.display()), e))?;
        held.push((b.source.clone(), f));
    }
    attach_at(std::os::fd::AsFd::as_fd(&mount), &attach_on).map_err(|e| {
        LauncherError::setup(
            format!("cannot attach the image on {}", attach_on.display()),
            e,
        )
    })?;
    drop(mount);
    enter_root(&attach_on, binds, &held)?;
    drop(held);
    let child = spawn_container(&req.command)?;
    wait_with_the_server(child, &mut server)
}

/// Wait for COMMAND's init, and for the server: should it die while COMMAND runs, the
/// container's root is dead, so end the container (SIGKILL to init, which takes every
/// process of its pid namespace along) and fail. The server says nothing after `serving`,
/// so its stream is readable only at its end. One thread polls both: a thread cannot be
/// started once a pid namespace was unshared for the children. A pidfd names init for
/// good, where a kill by number could hit a later process given the same one.
fn wait_with_the_server(
    child: nix::unistd::Pid,
    server: &mut Server,
) -> Result<i32, LauncherError> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open with a pid and no flags.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    if raw < 0 {
        tracing::warn!("pidfd_open: {}", io::Error::last_os_error());
        return wait_container(child);
    }
    // SAFETY: a new descriptor this process owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: server.input.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two valid descriptors.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(LauncherError::setup("poll", e));
        }
        if fds[0].revents != 0 {
            return wait_container(child);
        }
        if fds[1].revents != 0 {
            // Readable: a line, or the end of the stream, is there already.
            if let Ok(Some(line)) = server.read_line(ANSWER_WAIT) {
                tracing::warn!("the server said {line:?} after serving");
                continue;
            }
            // SAFETY: pidfd_send_signal on this process's pidfd of init, no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            let _ = wait_container(child);
            return Err(LauncherError::Server(
                "exited while COMMAND ran (its mount is dead): the container was ended".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse() {
        assert_eq!(
            "/a".parse::<Bind>().unwrap(),
            Bind {
                source: "/a".into(),
                dest: "/a".into()
            }
        );
        assert_eq!(
            "data:/mnt/d".parse::<Bind>().unwrap(),
            Bind {
                source: "data".into(),
                dest: "/mnt/d".into()
            }
        );
        assert!("a:b".parse::<Bind>().unwrap_err().contains("absolute"));
        assert!(":/x".parse::<Bind>().is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = nix::unistd::Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 7)), 7);
        assert_eq!(
            exit_code(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            137
        );
    }
}
