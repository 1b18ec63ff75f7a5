//! The kernel calls mounting needs, behind one narrow trait so that the decisions made
//! around them ([`super::attach`]) are unit-tested without privileges.
//!
//! A mount is known by its identity ([`MountId`]), taken when it is made, and unmounted
//! only through a descriptor that holds the very mount found at the path
//! ([`PinnedMount`]): what someone else mounted there before or after, or over it, is
//! never touched.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

use super::spec::MountSpec;

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

/// Which mount a path led to: the kernel's mount id. Linux 6.8 and later give one never
/// reused (STATX_MNT_ID_UNIQUE); before, the id mountinfo shows, which the kernel reuses
/// only once the mount is gone and freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MountId {
    pub id: u64,
    /// Whether `id` is the never-reused kind.
    pub unique: bool,
}

/// The mount on top of a path, held (by an O_PATH descriptor of its root, for the real
/// calls) so that it stays the same mount while it is checked and unmounted.
#[derive(Debug)]
pub struct PinnedMount {
    /// The path it was found at.
    pub path: PathBuf,
    pub id: MountId,
    /// The id mountinfo shows (the first field of its line).
    pub mountinfo_id: u64,
    /// Whether the path is the root of that mount (rather than a directory inside it).
    pub is_root: bool,
    /// What holds it; None for fakes.
    pub fd: Option<OwnedFd>,
}

/// What mounting and unmounting a FUSE file system asks of the system.
pub trait MountSyscalls: Send + Sync {
    /// Whether the process may call mount(2) itself (effective uid 0).
    fn is_root(&self) -> bool;
    /// The real uid and gid, which the kernel lets use a mount without allow_other.
    fn user_and_group(&self) -> (u32, u32);
    /// Open /dev/fuse for reading and writing.
    fn open_fuse_device(&self) -> io::Result<OwnedFd>;
    /// Mount `spec` read-only at `target`, served through the /dev/fuse descriptor
    /// `fuse`, as mount(2) would, and return the new mount's identity. `mount_made` hears it
    /// before the mount is attached at `target` where the kernel allows (the new mount
    /// API: the mount is made detached, then moved there), right after otherwise: whoever
    /// must clean up after a crash learns it before anyone can see the mount.
    fn mount(
        &self,
        spec: &MountSpec,
        fuse: BorrowedFd<'_>,
        target: &Path,
        mount_made: &mut dyn FnMut(MountId),
    ) -> io::Result<MountId>;
    /// Hold the mount on top of `target` and tell which it is, without asking its file
    /// system anything (a dead FUSE server cannot answer).
    fn pin_mount(&self, target: &Path) -> io::Result<PinnedMount>;
    /// umount2(2) of the pinned mount. Lazily (MNT_DETACH) it is exactly that mount, not
    /// whatever is at its path by now. A plain unmount must fail while the mount is in
    /// use, and the hold itself would count as a use: the hold is let go first and the
    /// path unmounted, so only in those microseconds could someone (root, or the owner of
    /// a FUSE mount) put another mount there.
    fn umount_pinned(&self, pinned: PinnedMount, lazy: bool) -> io::Result<()>;
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

/// Start the first fusermount found, as `configure` sets it up; its stderr is piped, to
/// become the error.
fn spawn_fusermount(configure: impl Fn(&mut Command)) -> io::Result<std::process::Child> {
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

/// statx of what `fd` names, asking for `mask` and nothing that needs the file system
/// (AT_STATX_DONT_SYNC: a FUSE server is not asked, so a dead one cannot make this wait).
fn statx_of(fd: BorrowedFd<'_>, mask: libc::c_uint) -> io::Result<libc::statx> {
    let empty = c"";
    // SAFETY: zeroed memory is a valid statx buffer.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty C string with AT_EMPTY_PATH, and a buffer of the
    // right type.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC | libc::AT_SYMLINK_NOFOLLOW,
            mask,
            &mut st,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.stx_mask & mask != mask {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel does not report mount ids (statx STATX_MNT_ID, Linux 5.8)",
        ));
    }
    Ok(st)
}

/// The id mountinfo shows of the mount `fd` lies on, from /proc/self/fdinfo (Linux 3.15):
/// it asks no file system anything, so neither a dead FUSE server nor a FUSE mount's
/// refusal of callers other than its owner (statx is refused them) matters.
fn fdinfo_mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|line| line.strip_prefix("mnt_id:"))
        .and_then(|id| id.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no mnt_id in /proc/self/fdinfo"))
}

/// The identity of the mount `fd` lies on: the never-reused id where the kernel has one
/// (Linux 6.8) and the caller may stat the mount, else the id mountinfo shows. The same
/// caller gets the same kind for the same mount each time.
fn mount_id_of(fd: BorrowedFd<'_>) -> io::Result<MountId> {
    match statx_of(fd, libc::STATX_MNT_ID_UNIQUE) {
        Ok(st) => Ok(MountId {
            id: st.stx_mnt_id,
            unique: true,
        }),
        Err(_) => fdinfo_mount_id(fd).map(|id| MountId { id, unique: false }),
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
        spec: &MountSpec,
        fuse: BorrowedFd<'_>,
        target: &Path,
        mount_made: &mut dyn FnMut(MountId),
    ) -> io::Result<MountId> {
        match super::detached::create(fuse, spec) {
            Ok(mount) => {
                let id = mount_id_of(mount.as_fd())?;
                mount_made(id);
                super::detached::attach_at(mount.as_fd(), target)?;
                Ok(id)
            }
            // Before Linux 5.2: mount(2), and the identity found at the path at once.
            Err(e) if e.is_unsupported() => {
                nix::mount::mount(
                    Some(spec.source.as_str()),
                    target,
                    Some(spec.fstype().as_str()),
                    spec.flags.to_ms_flags(),
                    Some(spec.mount_data(fuse.as_raw_fd()).as_str()),
                )?;
                let id = self.pin_mount(target)?.id;
                mount_made(id);
                Ok(id)
            }
            Err(e) => Err(e.into_io()),
        }
    }

    fn pin_mount(&self, target: &Path) -> io::Result<PinnedMount> {
        // O_PATH opens nothing on the file system: a dead FUSE server does not matter, and
        // a mount point is not followed past by a final symlink.
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(target)?
            .into();
        let id = mount_id_of(fd.as_fd())?;
        let mountinfo_id = fdinfo_mount_id(fd.as_fd())?;
        // Asking for nothing: a FUSE mount answers even callers it refuses (with no
        // attributes), and the kernel still says whether this is the mount's root (Linux
        // 5.8; before, mountinfo says where that mount is).
        let st = statx_of(fd.as_fd(), 0)?;
        let mount_root = libc::STATX_ATTR_MOUNT_ROOT as u64;
        let is_root = if st.stx_attributes_mask & mount_root != 0 {
            st.stx_attributes & mount_root != 0
        } else {
            super::mountinfo::line_of(mountinfo_id)?
                .and_then(|line| super::mountinfo::mount_point(&line))
                .is_some_and(|point| point == target)
        };
        Ok(PinnedMount {
            path: target.to_path_buf(),
            id,
            mountinfo_id,
            is_root,
            fd: Some(fd),
        })
    }

    fn umount_pinned(&self, pinned: PinnedMount, lazy: bool) -> io::Result<()> {
        let fd = pinned
            .fd
            .ok_or_else(|| io::Error::other("the mount is not held"))?;
        if !pinned.is_root {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if !lazy {
            drop(fd);
            return nix::mount::umount2(&pinned.path, MntFlags::UMOUNT_NOFOLLOW)
                .map_err(io::Error::from);
        }
        // The descriptor's magic link resolves to the very mount it holds: one that was
        // unmounted meanwhile is refused (EINVAL), and what is at the path now is not seen.
        let held = format!("/proc/self/fd/{}", fd.as_raw_fd());
        nix::mount::umount2(held.as_str(), MntFlags::MNT_DETACH).map_err(io::Error::from)
    }

    fn fusermount_mount(&self, target: &Path, options: &str) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let their_fd = theirs.as_raw_fd();
        let child = spawn_fusermount(|cmd| {
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
        let child = spawn_fusermount(|cmd| {
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
