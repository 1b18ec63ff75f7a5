//! The kernel calls mounting needs, behind one narrow trait so that the decisions made
//! around them ([`super::attach`]) are unit-tested without privileges.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// The FUSE device.
pub const FUSE_DEVICE: &str = "/dev/fuse";

/// Mount flags that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountFlags {
    pub nosuid: bool,
    pub nodev: bool,
}

impl MountFlags {
    fn to_ms_flags(self) -> MsFlags {
        let mut f = MsFlags::MS_RDONLY;
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f
    }
}

/// What mounting and unmounting a FUSE file system asks of the system.
pub trait MountSyscalls: Send + Sync {
    /// Whether the process may call mount(2) itself (effective uid 0).
    fn is_root(&self) -> bool;
    /// The real uid and gid, which the kernel lets use a mount without allow_other.
    fn user_and_group(&self) -> (u32, u32);
    /// Open /dev/fuse for reading and writing.
    fn open_fuse_device(&self) -> io::Result<OwnedFd>;
    /// mount(2) read-only with `flags`.
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// umount2(2), detaching lazily when `lazy`.
    fn umount(&self, target: &Path, lazy: bool) -> io::Result<()>;
    /// Mount through the setuid fusermount3 helper; returns the /dev/fuse descriptor it
    /// passes back.
    fn fusermount_mount(&self, target: &Path, options: &str) -> io::Result<OwnedFd>;
    /// `fusermount3 -u [-z] TARGET`.
    fn fusermount_unmount(&self, target: &Path, lazy: bool) -> io::Result<()>;
}

/// The real system calls and helpers.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscalls;

/// fusermount3 first, then the FUSE 2 name, as libfuse looks for them.
const FUSERMOUNT: [&str; 2] = ["fusermount3", "fusermount"];

/// Run the first fusermount found with `args`; the helper's stderr becomes the error.
fn run_fusermount(configure: impl Fn(&mut Command)) -> io::Result<std::process::Child> {
    let mut last = None;
    for bin in FUSERMOUNT {
        let mut cmd = Command::new(bin);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "fusermount3 not found ({}): install fuse3, or mount as root",
            last.map_or_else(String::new, |e| e.to_string())
        ),
    ))
}

fn helper_failed(child: std::process::Child) -> io::Error {
    match child.wait_with_output() {
        Ok(out) => {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let msg = if msg.is_empty() {
                format!("fusermount3 failed ({})", out.status)
            } else {
                msg
            };
            io::Error::other(msg)
        }
        Err(e) => e,
    }
}

/// Receive the descriptor fusermount3 sends over the socket (SCM_RIGHTS).
fn receive_fd(socket: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = loop {
        match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process and
            // nothing else owns them; any beyond the first (there should be none) close.
            let mut owned = fds
                .into_iter()
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
            return Ok(owned.next());
        }
    }
    Ok(None)
}

impl MountSyscalls for LinuxSyscalls {
    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn user_and_group(&self) -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    fn open_fuse_device(&self) -> io::Result<OwnedFd> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(FUSE_DEVICE)?;
        Ok(f.into())
    }

    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            flags.to_ms_flags(),
            Some(data),
        )
        .map_err(io::Error::from)
    }

    fn umount(&self, target: &Path, lazy: bool) -> io::Result<()> {
        let flags = if lazy {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        nix::mount::umount2(target, flags).map_err(io::Error::from)
    }

    fn fusermount_mount(&self, target: &Path, options: &str) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let their_fd = theirs.as_raw_fd();
        let child = run_fusermount(|cmd| {
            cmd.arg("-o").arg(options).arg("--").arg(target);
            cmd.env("_FUSE_COMMFD", their_fd.to_string());
            // SAFETY: only async-signal-safe fcntl between fork and exec. The helper must
            // inherit its end of the socket.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::fcntl(their_fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })?;
        drop(theirs);
        match receive_fd(&ours) {
            Ok(Some(fd)) => {
                // The helper exits once it has passed the descriptor on.
                let _ = child.wait_with_output();
                Ok(fd)
            }
            Ok(None) | Err(_) => Err(helper_failed(child)),
        }
    }

    fn fusermount_unmount(&self, target: &Path, lazy: bool) -> io::Result<()> {
        let child = run_fusermount(|cmd| {
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            cmd.arg("--").arg(OsStr::new(target));
        })?;
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Err(io::Error::other(if msg.is_empty() {
                format!("fusermount3 -u failed ({})", out.status)
            } else {
                msg
            }))
        }
    }
}
