//! Attaching a FUSE file system at a mount point and detaching it again: mount(2) (or the
//! new mount API) as root, the fusermount3 helper otherwise, or a /dev/fuse descriptor
//! someone else already mounted (`/dev/fd/N` as the mount point, as Apptainer's setuid
//! starter passes it).
//!
//! A mount made here is remembered by its identity ([`MountId`]), and only that mount is
//! ever unmounted: if it is gone — unmounted by someone else, or never made — whatever
//! is at the path (the directory's own file system, or another mount) is left alone.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::spec::MountSpec;
use super::sys::{MountId, MountSyscalls, PinnedMount};
use crate::source::inherited_fd;

/// How a mount was made, which decides how to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// mount(2) (or the new mount API) at this path; the mount is `id`.
    Kernel { path: PathBuf, id: MountId },
    /// fusermount3 at this path; the mount is `id`.
    Helper { path: PathBuf, id: MountId },
    /// A /dev/fuse descriptor mounted by someone else, who also unmounts it.
    Inherited,
}

impl Attachment {
    /// The mount point, unless someone else mounted the file system.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Attachment::Kernel { path, .. } | Attachment::Helper { path, .. } => Some(path),
            Attachment::Inherited => None,
        }
    }

    /// The mount this process made, if it made one.
    pub fn id(&self) -> Option<MountId> {
        match self {
            Attachment::Kernel { id, .. } | Attachment::Helper { id, .. } => Some(*id),
            Attachment::Inherited => None,
        }
    }
}

/// Whether descriptor `fd` is open on the FUSE device (character device 10:229).
pub fn is_fuse_descriptor(fd: BorrowedFd<'_>) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(10, 229)
    })
}

/// The descriptor `/dev/fd/N` names, when this process has it open on the FUSE device: a
/// /dev/fuse descriptor someone else mounted (Apptainer's setuid starter passes one).
fn inherited_fuse_fd(target: &Path) -> Option<RawFd> {
    let fd = inherited_fd(target).filter(|_| target.starts_with("/dev/fd"))?;
    // SAFETY: inherited_fd found `fd` open in this process, and the borrow ends with
    // this call, before anything could close it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    is_fuse_descriptor(borrowed).then_some(fd)
}

/// Take the inherited FUSE descriptor `/dev/fd/N` names, to serve it: from here on this
/// process owns it. None when `target` is no such descriptor (an ordinary mount point).
pub fn take_inherited_fuse_fd(target: &Path) -> Option<OwnedFd> {
    let fd = inherited_fuse_fd(target)?;
    // SAFETY: the descriptor is open (checked above) and was handed to this process to
    // serve; nothing else in it uses the number, so owning it closes it exactly once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Mount `spec` at the directory `target` (absolute); returns the /dev/fuse descriptor to
/// serve and how to undo the mount. `mount_made` hears the new mount's identity as early as
/// the kernel allows (see [`MountSyscalls::mount`]).
pub fn attach(
    sys: &dyn MountSyscalls,
    target: &Path,
    spec: &MountSpec,
    mount_made: &mut dyn FnMut(MountId),
) -> io::Result<(OwnedFd, Attachment)> {
    if sys.is_root() {
        let fuse = sys.open_fuse_device().map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) => " (load the fuse kernel module: modprobe fuse)",
                Some(libc::EACCES | libc::EPERM) => " (no permission to use FUSE here)",
                _ => "",
            };
            io::Error::new(
                e.kind(),
                format!("cannot open {}: {e}{hint}", super::sys::FUSE_DEVICE),
            )
        })?;
        match sys.mount(spec, fuse.as_fd(), target, mount_made) {
            Ok(id) => {
                let path = target.to_path_buf();
                return Ok((fuse, Attachment::Kernel { path, id }));
            }
            // Root without the capability (a user namespace): the helper may still work,
            // as libfuse falls back to it.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    }
    let fd = sys.fusermount_mount(target, &spec.helper_options())?;
    // The helper mounted it: learn which mount it is at once. Only its owner (or root)
    // could have replaced it meanwhile.
    let id = sys.pin_mount(target)?.id;
    mount_made(id);
    let path = target.to_path_buf();
    Ok((fd, Attachment::Helper { path, id }))
}

/// Unmount what [`attach`] made, lazily or not. Nothing to do for an inherited descriptor: its owner unmounts it, and
/// the connection ends when this process closes the descriptor. A mount that is no
/// longer at its path is not looked for, and nothing else is unmounted.
pub fn unmount(sys: &dyn MountSyscalls, attachment: &Attachment, lazy: bool) -> io::Result<()> {
    let (Some(path), Some(id)) = (attachment.path(), attachment.id()) else {
        return Ok(());
    };
    if !unmount_exact(sys, path, id, lazy)? {
        tracing::info!(
            "{}: sifuse's mount is no longer there; nothing unmounted",
            path.display()
        );
    }
    Ok(())
}

/// Unmount the mount `id` at `target`: through the descriptor that holds it as root
/// (umount2), with the fusermount3 helper otherwise (or when root is refused, as in a
/// user namespace) right after checking that it is still the one at the path. Ok(false),
/// with nothing done, when what is at `target` is not that mount (it was unmounted, or
/// another is on top of it).
pub fn unmount_exact(
    sys: &dyn MountSyscalls,
    target: &Path,
    id: MountId,
    lazy: bool,
) -> io::Result<bool> {
    let Some(pinned) = pin_ours(sys, target, id)? else {
        return Ok(false);
    };
    if sys.is_root() {
        match sys.umount_pinned(pinned, lazy) {
            Ok(()) => return Ok(true),
            // Unmounted by someone else between the check and the call.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    } else {
        // Let go of it: fusermount3 must find it unused.
        drop(pinned);
    }
    sys.fusermount_unmount(target, lazy)?;
    Ok(true)
}

/// The mount at `target` held, if it is the root of mount `id`.
fn pin_ours(
    sys: &dyn MountSyscalls,
    target: &Path,
    id: MountId,
) -> io::Result<Option<PinnedMount>> {
    match sys.pin_mount(target) {
        Ok(p) if p.id == id && p.is_root => Ok(Some(p)),
        Ok(_) => Ok(None),
        // No path, no mount of ours on it: removing a directory detaches its mounts.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Unmount whatever FUSE mount is at `target` now (`sifuse umount`): the mount found there
/// is held while its type is checked (`is_fuse`, given its mountinfo id) and unmounted
/// through that hold, so that nothing mounted there meanwhile is touched.
pub fn unmount_fuse_at(
    sys: &dyn MountSyscalls,
    target: &Path,
    lazy: bool,
    is_fuse: &dyn Fn(&PinnedMount) -> Result<(), String>,
) -> Result<(), String> {
    let pinned = match sys.pin_mount(target) {
        Ok(p) if p.is_root => p,
        Ok(_) => return Err("nothing is mounted there".into()),
        Err(e) => return Err(e.to_string()),
    };
    is_fuse(&pinned)?;
    let id = pinned.id;
    drop(pinned);
    unmount_exact(sys, target, id, lazy)
        .map_err(|e| e.to_string())
        .and_then(|done| {
            if done {
                Ok(())
            } else {
                Err("the mount there changed while it was checked: nothing unmounted".into())
            }
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mount::options::Access;
    use crate::mount::sys::MountFlags;
    use std::sync::Mutex;

    /// The mount at every path before anything is mounted (a tmpfs, say).
    pub(crate) const UNDERNEATH: MountId = MountId {
        id: 1,
        unique: true,
    };
    /// The mount the fake makes.
    pub(crate) const OURS: MountId = MountId {
        id: 42,
        unique: true,
    };

    /// Records calls; answers as configured. One stack of mounts for every path: mounting
    /// pushes [`OURS`], unmounting pops it, and [`FakeSys::someone_unmounts`] pops it too.
    pub(crate) struct FakeSys {
        pub root: bool,
        pub mount_errno: Option<i32>,
        pub umount_errno: Option<i32>,
        pub calls: Mutex<Vec<String>>,
        pub mounted: Mutex<Vec<MountId>>,
        /// Pin real paths (O_PATH and statx need no privilege) instead of the stack.
        pub real_pins: bool,
    }

    impl Default for FakeSys {
        fn default() -> Self {
            FakeSys {
                root: false,
                mount_errno: None,
                umount_errno: None,
                calls: Mutex::default(),
                mounted: Mutex::new(vec![UNDERNEATH]),
                real_pins: false,
            }
        }
    }

    impl FakeSys {
        pub(crate) fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn some_fd() -> OwnedFd {
            std::fs::File::open("/dev/null").unwrap().into()
        }
        fn top(&self) -> MountId {
            *self.mounted.lock().unwrap().last().unwrap()
        }
        /// Someone else unmounts the topmost mount.
        pub(crate) fn someone_unmounts(&self) {
            self.mounted.lock().unwrap().pop();
        }
        /// Someone else mounts another file system on top.
        pub(crate) fn someone_mounts(&self, id: MountId) {
            self.mounted.lock().unwrap().push(id);
        }
    }

    impl MountSyscalls for FakeSys {
        fn is_root(&self) -> bool {
            self.root
        }
        fn user_and_group(&self) -> (u32, u32) {
            (1000, 100)
        }
        fn open_fuse_device(&self) -> io::Result<OwnedFd> {
            self.log("open /dev/fuse".into());
            Ok(Self::some_fd())
        }
        fn mount(
            &self,
            spec: &MountSpec,
            fuse: BorrowedFd<'_>,
            target: &Path,
            mount_made: &mut dyn FnMut(MountId),
        ) -> io::Result<MountId> {
            use std::os::fd::AsRawFd;
            let data = spec.mount_data(fuse.as_raw_fd());
            let data = data.split_once(',').map_or(&*data, |(_fd, rest)| rest);
            self.log(format!(
                "mount {} {} {} {:?} {data}",
                spec.source,
                target.display(),
                spec.fstype(),
                spec.flags
            ));
            if let Some(e) = self.mount_errno {
                return Err(io::Error::from_raw_os_error(e));
            }
            mount_made(OURS);
            self.someone_mounts(OURS);
            Ok(OURS)
        }
        fn pin_mount(&self, target: &Path) -> io::Result<PinnedMount> {
            if self.real_pins {
                return crate::mount::sys::LinuxSyscalls.pin_mount(target);
            }
            let id = self.top();
            Ok(PinnedMount {
                path: target.to_path_buf(),
                id,
                mountinfo_id: id.id,
                is_root: true,
                fd: None,
            })
        }
        fn umount_pinned(&self, pinned: PinnedMount, lazy: bool) -> io::Result<()> {
            self.log(format!("umount {} lazy={lazy}", pinned.path.display()));
            if let Some(e) = self.umount_errno {
                return Err(io::Error::from_raw_os_error(e));
            }
            // The hold makes it this very mount, wherever it is now.
            let mut stack = self.mounted.lock().unwrap();
            match stack.iter().rposition(|m| *m == pinned.id) {
                Some(i) => {
                    stack.remove(i);
                    Ok(())
                }
                None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        }
        fn fusermount_mount(&self, target: &Path, options: &str) -> io::Result<OwnedFd> {
            self.log(format!("fusermount3 -o {options} {}", target.display()));
            self.someone_mounts(OURS);
            Ok(Self::some_fd())
        }
        fn fusermount_unmount(&self, target: &Path, lazy: bool) -> io::Result<()> {
            self.log(format!("fusermount3 -u lazy={lazy} {}", target.display()));
            self.someone_unmounts();
            Ok(())
        }
    }

    fn spec(access: Access) -> MountSpec {
        MountSpec {
            source: "/img/a,b.sif".into(),
            subtype: "sifuse".into(),
            flags: MountFlags {
                nosuid: true,
                nodev: true,
            },
            access,
            owner: (1000, 100),
        }
    }

    fn attach_at(sys: &FakeSys, target: &str, access: Access) -> (Attachment, Vec<MountId>) {
        let mut heard = Vec::new();
        let (_fd, how) = attach(sys, Path::new(target), &spec(access), &mut |id| {
            heard.push(id)
        })
        .unwrap();
        (how, heard)
    }

    fn kernel(path: &str) -> Attachment {
        Attachment::Kernel {
            path: path.into(),
            id: OURS,
        }
    }

    fn helper(path: &str) -> Attachment {
        Attachment::Helper {
            path: path.into(),
            id: OURS,
        }
    }

    #[test]
    fn root_mounts_with_the_kernel() {
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        let (how, heard) = attach_at(&sys, "/mnt/x", Access::Owner);
        assert_eq!(how, kernel("/mnt/x"));
        assert_eq!(heard, [OURS]);
        assert_eq!(
            sys.calls(),
            [
                "open /dev/fuse",
                "mount /img/a,b.sif /mnt/x fuse.sifuse MountFlags { nosuid: true, nodev: true } rootmode=40000,user_id=1000,group_id=100",
            ]
        );
    }

    #[test]
    fn shared_mounts_always_get_default_permissions() {
        for access in [Access::Everyone, Access::OwnerAndRoot] {
            let sys = FakeSys {
                root: true,
                ..Default::default()
            };
            attach_at(&sys, "/m", access);
            assert!(
                sys.calls()[1].ends_with(",default_permissions,allow_other"),
                "{:?}",
                sys.calls()
            );
            let user = FakeSys::default();
            attach_at(&user, "/m", access);
            assert!(
                user.calls()[0].contains(",default_permissions,allow_other,"),
                "{:?}",
                user.calls()
            );
        }
    }

    #[test]
    fn users_mount_through_the_helper_with_escaped_names() {
        let sys = FakeSys::default();
        let (how, heard) = attach_at(&sys, "/mnt/x", Access::Owner);
        assert_eq!(how, helper("/mnt/x"));
        assert_eq!(heard, [OURS], "the helper's mount is identified at once");
        assert_eq!(
            sys.calls(),
            [r"fusermount3 -o ro,nosuid,nodev,fsname=/img/a\,b.sif,subtype=sifuse /mnt/x"]
        );
        let mut s = spec(Access::Owner);
        s.flags = MountFlags {
            nosuid: false,
            nodev: false,
        };
        let sys = FakeSys::default();
        attach(&sys, Path::new("/m"), &s, &mut |_| {}).unwrap();
        assert!(sys.calls()[0].starts_with("fusermount3 -o ro,suid,dev,"));
    }

    #[test]
    fn root_refused_by_the_kernel_falls_back_to_the_helper() {
        let sys = FakeSys {
            root: true,
            mount_errno: Some(libc::EPERM),
            ..Default::default()
        };
        let (how, _) = attach_at(&sys, "/m", Access::Owner);
        assert_eq!(how, helper("/m"));
        let sys = FakeSys {
            root: true,
            mount_errno: Some(libc::ENOTDIR),
            ..Default::default()
        };
        let err = attach(&sys, Path::new("/m"), &spec(Access::Owner), &mut |_| {}).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(
            sys.calls().len(),
            2,
            "no helper after a real error: {:?}",
            sys.calls()
        );
    }

    #[test]
    fn inherited_fuse_descriptors_are_taken_as_they_are() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // Any /dev/fd/N that is not the FUSE device is an ordinary mount point.
        let dev_null = std::fs::File::open("/dev/null").unwrap();
        let target = format!("/dev/fd/{}", dev_null.as_raw_fd());
        assert!(take_inherited_fuse_fd(Path::new(&target)).is_none());
        assert!(!is_fuse_descriptor(dev_null.as_fd()));
        // Opening /dev/fuse needs no privilege (when the device exists).
        let fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap_or_else(|e| {
                panic!("this test needs /dev/fuse (load the fuse module): cannot open it: {e}")
            });
        assert!(is_fuse_descriptor(fuse.as_fd()));
        let fd = fuse.into_raw_fd();
        // Only under /dev/fd: another path to the same number is a directory name.
        assert!(take_inherited_fuse_fd(Path::new(&format!("/proc/self/fd/{fd}"))).is_none());
        let owned = take_inherited_fuse_fd(Path::new(&format!("/dev/fd/{fd}"))).unwrap();
        assert_eq!(owned.as_raw_fd(), fd);
        // Someone else's mount: nothing to undo.
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        unmount(&sys, &Attachment::Inherited, true).unwrap();
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn unmount_uses_umount2_as_root_and_the_helper_otherwise() {
        let root = FakeSys {
            root: true,
            ..Default::default()
        };
        root.someone_mounts(OURS);
        assert!(unmount_exact(&root, Path::new("/m"), OURS, true).unwrap());
        assert_eq!(root.calls(), ["umount /m lazy=true"]);
        let user = FakeSys::default();
        user.someone_mounts(OURS);
        assert!(unmount_exact(&user, Path::new("/m"), OURS, false).unwrap());
        assert_eq!(user.calls(), ["fusermount3 -u lazy=false /m"]);
        let userns_root = FakeSys {
            root: true,
            umount_errno: Some(libc::EPERM),
            ..Default::default()
        };
        userns_root.someone_mounts(OURS);
        unmount(&userns_root, &helper("/m"), true).unwrap();
        assert_eq!(
            userns_root.calls(),
            ["umount /m lazy=true", "fusermount3 -u lazy=true /m"]
        );
        let busy = FakeSys {
            root: true,
            umount_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        busy.someone_mounts(OURS);
        assert_eq!(
            unmount_exact(&busy, Path::new("/m"), OURS, false)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBUSY)
        );
    }

    /// The launcher's tmpfs under the mount: once sifuse's mount is gone (unmounted by
    /// someone else), or another is on top of it, or it was never made, nothing is
    /// unmounted — as root and through the helper alike.
    #[test]
    fn only_the_mount_made_here_is_ever_unmounted() {
        for root in [true, false] {
            let sys = FakeSys {
                root,
                ..Default::default()
            };
            let (how, _) = attach_at(&sys, "/m", Access::Owner);
            let made = sys.calls().len();
            sys.someone_unmounts();
            unmount(&sys, &how, true).unwrap();
            assert_eq!(sys.calls().len(), made, "{:?}", sys.calls());
            assert_eq!(sys.top(), UNDERNEATH, "the tmpfs stays");

            let sys = FakeSys {
                root,
                ..Default::default()
            };
            let (how, _) = attach_at(&sys, "/m", Access::Owner);
            let other = MountId {
                id: 7,
                unique: true,
            };
            sys.someone_mounts(other);
            assert!(!unmount_exact(&sys, Path::new("/m"), OURS, true).unwrap());
            unmount(&sys, &how, false).unwrap();
            assert_eq!(sys.calls().len(), made);
            assert_eq!(sys.top(), other);
            // Its own mount, once on top again, goes.
            sys.someone_unmounts();
            unmount(&sys, &how, false).unwrap();
            assert_eq!(sys.top(), UNDERNEATH);
        }
        // Never mounted: the path shows only what was there.
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        assert!(!unmount_exact(&sys, Path::new("/m"), OURS, true).unwrap());
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn unmounting_whatever_fuse_mount_is_there_checks_the_held_one() {
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        sys.someone_mounts(OURS);
        let err = unmount_fuse_at(&sys, Path::new("/m"), true, &|p| {
            Err(format!("mount {} is no FUSE mount", p.mountinfo_id))
        })
        .unwrap_err();
        assert_eq!(err, "mount 42 is no FUSE mount");
        assert!(sys.calls().is_empty());
        unmount_fuse_at(&sys, Path::new("/m"), true, &|_| Ok(())).unwrap();
        assert_eq!(sys.calls(), ["umount /m lazy=true"]);
        assert_eq!(sys.top(), UNDERNEATH);
    }
}
