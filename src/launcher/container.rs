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
        tracing::debug!("--no-detached: mounting on the host (host-path hand-off)");
    } else if sys.has_mount_api() {
        tracing::debug!(
            "detached mount: created and attached inside the container's namespaces, \
             never on the host"
        );
        return with_detached_mount(req, sys, userns, &binds, &argv);
    } else {
        tracing::debug!(
            "this kernel lacks the new mount API: mounting on the host (host-path hand-off)"
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
    server.started();
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
