//! The kernel calls `sifuse run` makes — starting the server, unsharing namespaces, the
//! container root's mounts, pivot_root, forking the container, pidfds — behind one trait,
//! so that every decision and every failure branch of [`super::container`] is unit-tested
//! without privileges (its fake is in that module's tests).

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::rootfs::{self, RootSyscalls};
use super::LauncherError;
use crate::mount::detached::{self, DetachedError, DetachedSyscalls, LinuxDetached};
use crate::mount::spec::MountSpec;
use crate::mount::sys::LinuxSyscalls;

/// The server process, as `sifuse run` needs it.
pub trait ServerChild: Send {
    /// Stop it (SIGKILL).
    fn kill(&mut self) -> io::Result<()>;
    /// Wait for it to end.
    fn wait(&mut self) -> io::Result<ExitStatus>;
}

impl ServerChild for std::process::Child {
    fn kill(&mut self) -> io::Result<()> {
        std::process::Child::kill(self)
    }
    fn wait(&mut self) -> io::Result<ExitStatus> {
        std::process::Child::wait(self)
    }
}

/// What `sifuse run` asks of the system, besides the container root's mounts
/// ([`RootSyscalls`]) and the detached mount ([`DetachedSyscalls`]).
pub trait ContainerSyscalls: RootSyscalls + DetachedSyscalls {
    /// Whether this process runs as root (effective uid 0).
    fn is_root(&self) -> bool;
    /// Whether the kernel has the new mount API (fsopen).
    fn has_mount_api(&self) -> bool;
    /// The canonical form of a path of the caller's (a `--bind` source).
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
    /// `$TMPDIR`, or /tmp, resolved.
    fn temp_base(&self) -> io::Result<PathBuf>;
    /// Start `sifuse ARGS` (this binary) with one end of a new socketpair as its
    /// descriptor 3, in the caller's namespaces and a process group of its own; returns the
    /// process and the other end.
    fn start_server(&self, args: &[OsString]) -> io::Result<(Box<dyn ServerChild>, UnixStream)>;
    /// unshare(2) `namespaces`.
    fn unshare(&self, namespaces: CloneFlags) -> io::Result<()>;
    /// Write `content` to `/proc/self/NAME` (`setgroups`, `uid_map`, `gid_map`).
    fn write_proc_self(&self, name: &str, content: &str) -> io::Result<()>;
    /// Make every mount of this namespace private, recursively.
    fn make_mounts_private(&self) -> io::Result<()>;
    /// move_mount a detached mount onto `target`.
    fn attach_detached(&self, mount: BorrowedFd<'_>, target: &Path) -> io::Result<()>;
    /// Hold `path` by an O_PATH descriptor (it may be hidden by a mount later).
    fn hold(&self, path: &Path) -> io::Result<OwnedFd>;
    /// Whether `path` is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// chdir(2).
    fn chdir(&self, path: &Path) -> io::Result<()>;
    /// pivot_root(".", "."): the working directory becomes the root, the old root stacked
    /// on top of it.
    fn pivot_root_to_cwd(&self) -> io::Result<()>;
    /// umount2(".", MNT_DETACH): detach the old root stacked by [`Self::pivot_root_to_cwd`].
    fn detach_old_root(&self) -> io::Result<()>;
    /// Fork the container's init, with a parent-death signal (SIGKILL), which forks and
    /// execs `argv`; returns init's pid once `argv` was exec'd, or
    /// [`LauncherError::Exec`] when it could not be. Called in the new pid namespace's
    /// parent, with this process single-threaded.
    fn fork_container(&self, argv: &[CString]) -> Result<Pid, LauncherError>;
    /// Wait for `pid` to end.
    fn wait_exit(&self, pid: Pid) -> io::Result<WaitStatus>;
    /// pidfd_open(2): a descriptor that names `pid` for good, readable once it ends.
    fn open_pidfd(&self, pid: Pid) -> io::Result<OwnedFd>;
    /// pidfd_send_signal(2) SIGKILL.
    fn kill_pidfd(&self, pidfd: BorrowedFd<'_>) -> io::Result<()>;
}

/// The real calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxContainer;

/// struct mount_attr of <linux/mount.h>.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// AT_RECURSIVE of <linux/fcntl.h>.
const AT_RECURSIVE: libc::c_uint = 0x8000;

impl RootSyscalls for LinuxContainer {
    fn bind(&self, source: &Path, target: &Path) -> io::Result<()> {
        let none: Option<&str> = None;
        nix::mount::mount(
            Some(source),
            target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .map_err(io::Error::from)
    }

    fn remount_read_only(&self, target: &Path) -> io::Result<()> {
        let none: Option<&str> = None;
        let st = nix::sys::statvfs::statvfs(target)?;
        nix::mount::mount(
            none,
            target,
            none,
            rootfs::readonly_remount_flags(st.flags()),
            none,
        )
        .map_err(io::Error::from)
    }

    fn set_read_only(&self, target: &Path, recursive: bool) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(target.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let flags =
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
        // SAFETY: `path` is a NUL-terminated string and `attr` a mount_attr whose size is
        // passed with it; both live across the call, which only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                path.as_ptr(),
                flags,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn mount_points_under(&self, target: &Path) -> io::Result<Vec<PathBuf>> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(crate::mount::mountinfo::mount_points(&info)
            .into_iter()
            .filter(|p| p.starts_with(target))
            .collect())
    }

    fn tmpfs(&self, target: &Path) -> io::Result<()> {
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        )
        .map_err(io::Error::from)
    }
}

impl DetachedSyscalls for LinuxContainer {
    fn open_fuse(&self) -> io::Result<OwnedFd> {
        LinuxDetached(&LinuxSyscalls).open_fuse()
    }
    fn create_detached(
        &self,
        fuse: BorrowedFd<'_>,
        spec: &MountSpec,
    ) -> Result<OwnedFd, DetachedError> {
        detached::create(fuse, spec)
    }
    fn user_and_group(&self) -> (u32, u32) {
        LinuxDetached(&LinuxSyscalls).user_and_group()
    }
}

/// Whether the process that holds the write end of `alive` is gone (its end closed).
fn parent_gone(alive: &OwnedFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll(2) reads and writes exactly the one pollfd the pointer and the count
    // describe, which lives across the call; the timeout 0 makes it return at once.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    n != 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// End a forked child at once, skipping the parent's exit handlers and buffered output,
/// which are not the child's.
fn exit_child(code: i32) -> ! {
    // SAFETY: _exit(2) ends the calling process without running any code of this one;
    // it touches no memory.
    unsafe { libc::_exit(code) }
}

/// The exit status a shell would show for `status`.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 1,
    }
}

/// The container's init: start COMMAND, reap whatever ends, exit with COMMAND's status.
/// Leaving kills everything else in the pid namespace.
fn init(program: &CString, argv: &[CString], exec_write: OwnedFd) -> ! {
    // SAFETY: the process has one thread (fork_container's caller guarantees it, and a
    // forked child has only the thread that forked), so the child's memory is consistent
    // and it may run ordinary code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            // Rust ignores SIGPIPE; COMMAND expects the default.
            // SAFETY: signal(2) with SIG_DFL installs no handler and touches no memory of
            // this process.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let err = nix::unistd::execvp(program, argv).unwrap_err();
            let _ = File::from(exec_write).write_all(&(err as i32).to_ne_bytes());
            exit_child(if err == nix::errno::Errno::ENOENT {
                127
            } else {
                126
            })
        }
        Ok(ForkResult::Parent { child }) => {
            drop(exec_write);
            loop {
                match waitpid(None, None) {
                    Ok(status) if status.pid() == Some(child) => exit_child(exit_code(status)),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => exit_child(1),
                }
            }
        }
        Err(e) => {
            let _ = File::from(exec_write).write_all(&(e as i32).to_ne_bytes());
            exit_child(126)
        }
    }
}

impl ContainerSyscalls for LinuxContainer {
    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn has_mount_api(&self) -> bool {
        detached::kernel_has_mount_api()
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        path.canonicalize()
    }

    fn temp_base(&self) -> io::Result<PathBuf> {
        crate::control::host::temp_base()
    }

    fn start_server(&self, args: &[OsString]) -> io::Result<(Box<dyn ServerChild>, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("sifuse")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A process group of its own: a terminal's ^C ends COMMAND and this launcher,
            // and the server then cleans up in order instead of dying with them.
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes only dup2 and fcntl, and touches
        // no memory but the captured descriptor number.
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
        let child = cmd.spawn()?;
        drop(theirs);
        Ok((Box::new(child), ours))
    }

    fn unshare(&self, namespaces: CloneFlags) -> io::Result<()> {
        nix::sched::unshare(namespaces).map_err(io::Error::from)
    }

    fn write_proc_self(&self, name: &str, content: &str) -> io::Result<()> {
        std::fs::write(format!("/proc/self/{name}"), content)
    }

    fn make_mounts_private(&self) -> io::Result<()> {
        let none: Option<&str> = None;
        nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
            .map_err(io::Error::from)
    }

    fn attach_detached(&self, mount: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
        detached::attach_at(mount, target)
    }

    fn hold(&self, path: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(path)
            .map(OwnedFd::from)
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn pivot_root_to_cwd(&self) -> io::Result<()> {
        nix::unistd::pivot_root(".", ".").map_err(io::Error::from)
    }

    fn detach_old_root(&self) -> io::Result<()> {
        nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(io::Error::from)
    }

    fn fork_container(&self, argv: &[CString]) -> Result<Pid, LauncherError> {
        let program = argv
            .first()
            .cloned()
            .ok_or_else(|| LauncherError::setup("COMMAND", io::Error::other("no command given")))?;
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| LauncherError::setup("pipe", e))
        };
        // COMMAND writes errno here when exec fails; end of file means it was exec'd.
        let (exec_read, exec_write) = pipe()?;
        // This process keeps the write end for life: init sees it close when this one dies.
        let (alive_read, alive_write) = pipe()?;
        // SAFETY: the caller is single-threaded (`sifuse run` unshared namespaces, which
        // the kernel allows only then), so the child's memory is consistent and it may run
        // ordinary code.
        match unsafe { fork() }.map_err(|e| LauncherError::setup("fork", e))? {
            ForkResult::Child => {
                drop(exec_read);
                drop(alive_write);
                // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only and touches no
                // memory of this process.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                // The launcher may have died before the prctl took effect.
                if parent_gone(&alive_read) {
                    exit_child(1);
                }
                init(&program, argv, exec_write)
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
                        Err(LauncherError::Exec {
                            command: program.to_string_lossy().into_owned(),
                            source: io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
                        })
                    }
                }
            }
        }
    }

    fn wait_exit(&self, pid: Pid) -> io::Result<WaitStatus> {
        loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    fn open_pidfd(&self, pid: Pid) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open(2) takes a pid and flags, integers only, and touches no
        // memory of this process.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pidfd_open returned a new descriptor that nothing else in this process
        // knows of: owning it closes it exactly once.
        Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    }

    fn kill_pidfd(&self, pidfd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a borrowed, open pidfd, a signal number, a
        // null siginfo (which the kernel then fills in itself) and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 7)), 7);
        assert_eq!(
            exit_code(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            137
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), 1);
    }

    #[test]
    fn a_dead_parent_is_seen_and_a_live_one_is_not() {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        assert!(!parent_gone(&read));
        drop(write);
        assert!(parent_gone(&read));
    }
}
