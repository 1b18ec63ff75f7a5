//! Attaching a FUSE file system at a mount point and detaching it again: mount(2) as root,
//! the fusermount3 helper otherwise, or a /dev/fuse descriptor someone else already mounted
//! (`/dev/fd/N` as the mount point, as Apptainer's setuid starter passes it).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::options::Access;
use super::sys::{MountFlags, MountSyscalls};
use crate::source::inherited_fd;

/// How a mount was made, which decides how to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// mount(2) at this path.
    Kernel(PathBuf),
    /// fusermount3 at this path.
    Helper(PathBuf),
    /// A /dev/fuse descriptor mounted by someone else, who also unmounts it.
    Inherited,
}

impl Attachment {
    /// The mount point, unless someone else mounted the file system.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Attachment::Kernel(p) | Attachment::Helper(p) => Some(p),
            Attachment::Inherited => None,
        }
    }
}

/// What to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The source mountinfo shows.
    pub source: String,
    /// mountinfo shows the type as `fuse.SUBTYPE`.
    pub subtype: String,
    pub flags: MountFlags,
    pub access: Access,
}

/// The kernel's FUSE mount data. The kernel enforces mode bits only with
/// default_permissions, which every mount that others can use gets.
fn kernel_data(fd: i32, (uid, gid): (u32, u32), access: Access) -> String {
    let mut data = format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid}");
    if access != Access::Owner {
        data += ",default_permissions,allow_other";
    }
    data
}

/// Escape `,` and `\` for fusermount3's option parser.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

/// fusermount3's `-o` list. allow_root is allow_other to the kernel; fuser refuses other
/// users' requests itself.
fn helper_options(spec: &MountSpec) -> String {
    let mut opts = vec!["ro".to_string()];
    opts.push(if spec.flags.nosuid { "nosuid" } else { "suid" }.into());
    opts.push(if spec.flags.nodev { "nodev" } else { "dev" }.into());
    if spec.access != Access::Owner {
        opts.push("default_permissions".into());
        opts.push("allow_other".into());
    }
    opts.push(format!("fsname={}", escape(&spec.source)));
    opts.push(format!("subtype={}", escape(&spec.subtype)));
    opts.join(",")
}

/// Whether descriptor `fd` is open on the FUSE device (character device 10:229).
fn is_fuse_device(fd: i32) -> bool {
    // SAFETY: fstat on a descriptor inherited_fd found open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::sys::stat::fstat(borrowed).is_ok_and(|st| {
        st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(10, 229)
    })
}

/// The descriptor `/dev/fd/N` names, when it is open on the FUSE device.
fn inherited_fuse_fd(target: &Path) -> Option<i32> {
    inherited_fd(target).filter(|&fd| target.starts_with("/dev/fd") && is_fuse_device(fd))
}

/// Whether `target` names an inherited, already mounted FUSE descriptor (`/dev/fd/N`).
pub fn is_inherited_fuse_fd(target: &Path) -> bool {
    inherited_fuse_fd(target).is_some()
}

/// Mount at `target` (absolute, or `/dev/fd/N` naming an already mounted /dev/fuse
/// descriptor); returns the /dev/fuse descriptor to serve and how to undo the mount.
pub fn attach(
    sys: &dyn MountSyscalls,
    target: &Path,
    spec: &MountSpec,
) -> io::Result<(OwnedFd, Attachment)> {
    if let Some(fd) = inherited_fuse_fd(target) {
        // SAFETY: inherited_fd checked that the descriptor is open; from here on this
        // process serves it and nothing else uses the number.
        return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, Attachment::Inherited));
    }
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
        use std::os::fd::AsRawFd;
        let data = kernel_data(fuse.as_raw_fd(), sys.user_and_group(), spec.access);
        let fstype = format!("fuse.{}", spec.subtype);
        match sys.mount(&spec.source, target, &fstype, spec.flags, &data) {
            Ok(()) => return Ok((fuse, Attachment::Kernel(target.to_path_buf()))),
            // Root without the capability (a user namespace): the helper may still work,
            // as libfuse falls back to it.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => return Err(e),
        }
    }
    let fd = sys.fusermount_mount(target, &helper_options(spec))?;
    Ok((fd, Attachment::Helper(target.to_path_buf())))
}

/// Undo [`attach`]. Nothing to do for an inherited descriptor: its owner unmounts it, and
/// the connection ends when this process closes the descriptor.
pub fn detach(sys: &dyn MountSyscalls, attachment: &Attachment, lazy: bool) -> io::Result<()> {
    match attachment {
        Attachment::Inherited => Ok(()),
        Attachment::Kernel(p) | Attachment::Helper(p) => unmount(sys, p, lazy),
    }
}

/// Unmount `target`: umount2 as root, the fusermount3 helper otherwise (or when root is
/// refused, as in a user namespace).
pub fn unmount(sys: &dyn MountSyscalls, target: &Path, lazy: bool) -> io::Result<()> {
    if sys.is_root() {
        match sys.umount(target, lazy) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => return other,
        }
    }
    sys.fusermount_unmount(target, lazy)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records calls; answers as configured.
    #[derive(Default)]
    pub(crate) struct FakeSys {
        pub root: bool,
        pub mount_errno: Option<i32>,
        pub umount_errno: Option<i32>,
        pub calls: Mutex<Vec<String>>,
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
            source: &str,
            target: &Path,
            fstype: &str,
            flags: MountFlags,
            data: &str,
        ) -> io::Result<()> {
            let data = data.split_once(',').map_or(data, |(_fd, rest)| rest);
            self.log(format!(
                "mount {source} {} {fstype} {flags:?} {data}",
                target.display()
            ));
            self.mount_errno
                .map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
        fn umount(&self, target: &Path, lazy: bool) -> io::Result<()> {
            self.log(format!("umount {} lazy={lazy}", target.display()));
            self.umount_errno
                .map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
        }
        fn fusermount_mount(&self, target: &Path, options: &str) -> io::Result<OwnedFd> {
            self.log(format!("fusermount3 -o {options} {}", target.display()));
            Ok(Self::some_fd())
        }
        fn fusermount_unmount(&self, target: &Path, lazy: bool) -> io::Result<()> {
            self.log(format!("fusermount3 -u lazy={lazy} {}", target.display()));
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
        }
    }

    #[test]
    fn root_mounts_with_the_kernel() {
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        let (_fd, how) = attach(&sys, Path::new("/mnt/x"), &spec(Access::Owner)).unwrap();
        assert_eq!(how, Attachment::Kernel("/mnt/x".into()));
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
            attach(&sys, Path::new("/m"), &spec(access)).unwrap();
            assert!(
                sys.calls()[1].ends_with(",default_permissions,allow_other"),
                "{:?}",
                sys.calls()
            );
            let user = FakeSys::default();
            attach(&user, Path::new("/m"), &spec(access)).unwrap();
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
        let (_fd, how) = attach(&sys, Path::new("/mnt/x"), &spec(Access::Owner)).unwrap();
        assert_eq!(how, Attachment::Helper("/mnt/x".into()));
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
        attach(&sys, Path::new("/m"), &s).unwrap();
        assert!(sys.calls()[0].starts_with("fusermount3 -o ro,suid,dev,"));
    }

    #[test]
    fn root_refused_by_the_kernel_falls_back_to_the_helper() {
        let sys = FakeSys {
            root: true,
            mount_errno: Some(libc::EPERM),
            ..Default::default()
        };
        let (_fd, how) = attach(&sys, Path::new("/m"), &spec(Access::Owner)).unwrap();
        assert_eq!(how, Attachment::Helper("/m".into()));
        let sys = FakeSys {
            root: true,
            mount_errno: Some(libc::ENOTDIR),
            ..Default::default()
        };
        let err = attach(&sys, Path::new("/m"), &spec(Access::Owner)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(
            sys.calls().len(),
            2,
            "no helper after a real error: {:?}",
            sys.calls()
        );
    }

    #[test]
    fn inherited_fuse_descriptors_are_served_as_they_are() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // Any /dev/fd/N that is not the FUSE device is an ordinary mount point.
        let dev_null = std::fs::File::open("/dev/null").unwrap();
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        let target = format!("/dev/fd/{}", dev_null.as_raw_fd());
        let (_fd, how) = attach(&sys, Path::new(&target), &spec(Access::Owner)).unwrap();
        assert_eq!(how, Attachment::Kernel(target.into()));
        // Opening /dev/fuse needs no privilege (when the device exists).
        let Ok(fuse) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        else {
            eprintln!("no /dev/fuse here: the inherited-descriptor half of this test did not run");
            return;
        };
        let fd = fuse.into_raw_fd();
        let sys = FakeSys {
            root: true,
            ..Default::default()
        };
        let (owned, how) = attach(
            &sys,
            Path::new(&format!("/dev/fd/{fd}")),
            &spec(Access::Owner),
        )
        .unwrap();
        assert_eq!(how, Attachment::Inherited);
        assert_eq!(owned.as_raw_fd(), fd);
        assert!(sys.calls().is_empty());
        detach(&sys, &how, true).unwrap();
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn unmount_uses_umount2_as_root_and_the_helper_otherwise() {
        let root = FakeSys {
            root: true,
            ..Default::default()
        };
        unmount(&root, Path::new("/m"), true).unwrap();
        assert_eq!(root.calls(), ["umount /m lazy=true"]);
        let user = FakeSys::default();
        unmount(&user, Path::new("/m"), false).unwrap();
        assert_eq!(user.calls(), ["fusermount3 -u lazy=false /m"]);
        let userns_root = FakeSys {
            root: true,
            umount_errno: Some(libc::EPERM),
            ..Default::default()
        };
        detach(&userns_root, &Attachment::Helper("/m".into()), true).unwrap();
        assert_eq!(
            userns_root.calls(),
            ["umount /m lazy=true", "fusermount3 -u lazy=true /m"]
        );
        let busy = FakeSys {
            root: true,
            umount_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        assert_eq!(
            unmount(&busy, Path::new("/m"), false)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBUSY)
        );
    }
}
