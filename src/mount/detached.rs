//! Detached FUSE mounts through Linux's new mount API: `fsopen("fuse")`, `fsconfig` (the
//! /dev/fuse descriptor, root mode, owner, flags), `FSCONFIG_CMD_CREATE` and `fsmount`
//! give a mount attached nowhere, reachable only through its descriptor until
//! `move_mount` attaches it, in whatever mount namespace the caller is in. Nothing ever
//! shows in the host's mount table, so nothing can be left behind there.
//!
//! Works as root, and unprivileged inside a user namespace that owns the current mount
//! namespace (FUSE is mountable there), with /dev/fuse readable and writable.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::options::MountOptions;
use super::spec::MountSpec;
use super::sys::{MountFlags, MountSyscalls};

// From <linux/mount.h>; the libc crate has the syscall numbers but not these.
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Why a detached mount could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DetachedError {
    /// /dev/fuse could not be opened.
    #[error("cannot open /dev/fuse: {0}")]
    FuseDevice(io::Error),
    /// The kernel has no new mount API (before 5.2), or FUSE does not take it: the caller
    /// can fall back to mounting on a directory.
    #[error("this kernel lacks the new mount API for FUSE ({call}: {source}); fall back to mounting on a directory")]
    Unsupported {
        call: &'static str,
        source: io::Error,
    },
    #[error("{call}: {source}{}", log_hint(.log))]
    Failed {
        call: &'static str,
        source: io::Error,
        /// What the kernel logged on the file system context, if anything.
        log: String,
    },
}

fn log_hint(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {log})")
    }
}

impl DetachedError {
    /// Whether the kernel lacks the API (rather than refusing this mount).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DetachedError::Unsupported { .. })
    }

    /// What a caller who chose its own namespaces may do about a refusal, to follow the
    /// message (empty for anything else).
    pub fn hint(&self) -> &'static str {
        match self {
            DetachedError::Failed { source, .. }
                if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                " (unprivileged, the caller needs CAP_SYS_ADMIN in a user namespace that owns \
                 its mount namespace, as after unshare -r -m, and a /dev/fuse it may open)"
            }
            _ => "",
        }
    }

    /// As an I/O error: the kernel's own where it refused the privilege (EPERM, which
    /// callers answer by trying fusermount3), else of the same kind, with the message.
    pub fn into_io(self) -> io::Error {
        let source = match &self {
            DetachedError::FuseDevice(source)
            | DetachedError::Unsupported { source, .. }
            | DetachedError::Failed { source, .. } => source,
        };
        if source.raw_os_error() == Some(libc::EPERM) {
            return io::Error::from_raw_os_error(libc::EPERM);
        }
        io::Error::new(source.kind(), self.to_string())
    }
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a string"))
}

/// The messages the kernel queued on a file system context (read until empty).
fn context_log(fs: &OwnedFd) -> String {
    let mut lines = Vec::new();
    let mut buf = [0u8; 512];
    // A context descriptor returns one message per read, and ENODATA once empty.
    loop {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`, which lives across
        // the call; `fs` is an open descriptor this function borrows.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || lines.len() > 16 {
            break;
        }
        lines.push(
            String::from_utf8_lossy(&buf[..n as usize])
                .trim()
                .to_string(),
        );
    }
    lines.join("; ")
}

fn set_string(fs: &OwnedFd, key: &str, value: &str) -> io::Result<()> {
    let (k, v) = (cstring(key)?, cstring(value)?);
    // SAFETY: `k` and `v` are NUL-terminated strings that live across the call, which
    // copies them; `fs` is an open context descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            k.as_ptr(),
            v.as_ptr(),
            0,
        )
    };
    if rc < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

fn set_flag(fs: &OwnedFd, key: &str) -> io::Result<()> {
    let k = cstring(key)?;
    // SAFETY: `k` is a NUL-terminated string that lives across the call, which copies it;
    // a flag takes a null value; `fs` is an open context descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_FLAG,
            k.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

/// Create a detached FUSE mount of `spec` served through `fuse` (an open /dev/fuse
/// descriptor); returns the mount's descriptor (close-on-exec). The FUSE connection starts
/// now: the first access through the mount waits for the server's INIT reply.
pub fn create(fuse: BorrowedFd<'_>, spec: &MountSpec) -> Result<OwnedFd, DetachedError> {
    let mut params: Vec<(&str, Option<String>)> = vec![
        ("source", Some(spec.source.clone())),
        ("subtype", Some(spec.subtype.clone())),
    ];
    params.extend(spec.fuse_parameters(fuse.as_raw_fd()));
    create_mount(&params, spec.flags)
}

/// fsopen("fuse"), one fsconfig per parameter (a string, or a flag where there is no
/// value), a read-only superblock, FSCONFIG_CMD_CREATE, and fsmount read-only with `flags`.
fn create_mount(
    params: &[(&str, Option<String>)],
    flags: MountFlags,
) -> Result<OwnedFd, DetachedError> {
    let name = cstring("fuse").expect("no NUL");
    // SAFETY: `name` is a NUL-terminated string that lives across the call, which only
    // reads it.
    let raw = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) };
    if raw < 0 {
        let e = last_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::ENODEV) => DetachedError::Unsupported {
                call: "fsopen(\"fuse\")",
                source: e,
            },
            _ => DetachedError::Failed {
                call: "fsopen(\"fuse\")",
                source: e,
                log: String::new(),
            },
        });
    }
    // SAFETY: fsopen returned a new descriptor that nothing else in this process knows of:
    // owning it closes it exactly once.
    let fs = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let failed = |call: &'static str, source: io::Error| DetachedError::Failed {
        call,
        log: context_log(&fs),
        source,
    };
    for (key, value) in params {
        match value {
            Some(value) => set_string(&fs, key, value),
            None => set_flag(&fs, key),
        }
        .map_err(|e| failed("fsconfig", e))?;
    }
    // A read-only superblock too, as mount(2) with MS_RDONLY makes.
    set_flag(&fs, "ro").map_err(|e| failed("fsconfig", e))?;
    // SAFETY: fsconfig(FSCONFIG_CMD_CREATE) on the open context `fs` takes a null key and
    // value, so the kernel reads no memory of this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 {
        return Err(failed("fsconfig(FSCONFIG_CMD_CREATE)", last_error()));
    }
    let mut attrs = MOUNT_ATTR_RDONLY;
    if flags.nosuid {
        attrs |= MOUNT_ATTR_NOSUID;
    }
    if flags.nodev {
        attrs |= MOUNT_ATTR_NODEV;
    }
    // SAFETY: fsmount(2) takes the open context `fs` and integer flags only: the kernel
    // reads no memory of this process.
    let raw = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if raw < 0 {
        return Err(failed("fsmount", last_error()));
    }
    // SAFETY: fsmount returned a new descriptor that nothing else in this process knows of;
    // the caller owns it from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Attach a detached mount at `target` in the caller's mount namespace.
pub fn attach_at(mount: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let empty = cstring("").expect("no NUL");
    let to = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the target path"))?;
    // SAFETY: `empty` and `to` are NUL-terminated strings that live across the call, which
    // only reads them; `mount` is a borrowed, open mount descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

/// Whether this kernel has the new mount API at all: fsopen with no name fails with
/// EFAULT (or EPERM without the capability) where it exists, ENOSYS where it does not.
pub fn kernel_has_mount_api() -> bool {
    // SAFETY: fsopen with a null name reads nothing: the kernel fails the call before it
    // could create anything.
    let rc = unsafe { libc::syscall(libc::SYS_fsopen, std::ptr::null::<libc::c_char>(), 0) };
    if rc >= 0 {
        // SAFETY: rc is a descriptor this call created (it cannot, but close it if it did)
        // and nothing else knows of it.
        unsafe { libc::close(rc as i32) };
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// The kernel calls that make a detached mount, behind a narrow trait so that what a
/// launcher hears when they fail is unit-tested without privileges.
pub trait DetachedSyscalls {
    /// Open /dev/fuse for reading and writing, close-on-exec.
    fn open_fuse(&self) -> io::Result<OwnedFd>;
    /// fsopen, fsconfig, FSCONFIG_CMD_CREATE, fsmount: [`create`].
    fn create_detached(
        &self,
        fuse: BorrowedFd<'_>,
        spec: &MountSpec,
    ) -> Result<OwnedFd, DetachedError>;
    /// The real user and group of this process, who will own the mount.
    fn user_and_group(&self) -> (u32, u32);
}

/// The real calls: /dev/fuse and the owner as the mount layer's syscalls give them.
pub struct LinuxDetached<'a>(pub &'a dyn MountSyscalls);

impl DetachedSyscalls for LinuxDetached<'_> {
    fn open_fuse(&self) -> io::Result<OwnedFd> {
        self.0.open_fuse_device()
    }
    fn create_detached(
        &self,
        fuse: BorrowedFd<'_>,
        spec: &MountSpec,
    ) -> Result<OwnedFd, DetachedError> {
        create(fuse, spec)
    }
    fn user_and_group(&self) -> (u32, u32) {
        self.0.user_and_group()
    }
}

/// A detached mount and the /dev/fuse descriptor whose server serves it.
#[derive(Debug)]
pub struct DetachedMount {
    pub fuse: OwnedFd,
    pub mount: OwnedFd,
}

/// Open /dev/fuse and create the detached mount of `image` that `options` ask for, owned
/// by this process's user: what `--detached` hands to a launcher, and what `sifuse run`
/// creates inside its namespaces for `--serve-fd`.
pub fn make<S: DetachedSyscalls + ?Sized>(
    sys: &S,
    image: &Path,
    options: &MountOptions,
) -> Result<DetachedMount, DetachedError> {
    let fuse = sys.open_fuse().map_err(DetachedError::FuseDevice)?;
    let spec = MountSpec::new(image, options, sys.user_and_group());
    let mount = sys.create_detached(fuse.as_fd(), &spec)?;
    Ok(DetachedMount { fuse, mount })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::sync::Mutex;

    /// Answers as configured; records the spec it was asked for.
    pub(crate) struct FakeDetached {
        pub open_errno: Option<i32>,
        pub create: fn() -> Result<OwnedFd, DetachedError>,
        pub asked: Mutex<Option<MountSpec>>,
    }

    impl FakeDetached {
        /// Every call succeeds.
        pub(crate) fn working() -> FakeDetached {
            FakeDetached {
                open_errno: None,
                create: || Ok(File::open("/dev/null").unwrap().into()),
                asked: Mutex::default(),
            }
        }
    }

    impl DetachedSyscalls for FakeDetached {
        fn open_fuse(&self) -> io::Result<OwnedFd> {
            match self.open_errno {
                Some(e) => Err(io::Error::from_raw_os_error(e)),
                None => Ok(File::open("/dev/null")?.into()),
            }
        }
        fn create_detached(
            &self,
            _: BorrowedFd<'_>,
            spec: &MountSpec,
        ) -> Result<OwnedFd, DetachedError> {
            *self.asked.lock().unwrap() = Some(spec.clone());
            (self.create)()
        }
        fn user_and_group(&self) -> (u32, u32) {
            (1000, 100)
        }
    }

    #[test]
    fn refusals_say_what_is_needed_and_missing_apis_say_so() {
        let refused = DetachedError::Failed {
            call: "fsopen(\"fuse\")",
            source: io::Error::from_raw_os_error(libc::EPERM),
            log: String::new(),
        };
        assert!(
            refused
                .hint()
                .contains("user namespace that owns its mount namespace"),
            "{}",
            refused.hint()
        );
        let missing = DetachedError::Unsupported {
            call: "fsopen(\"fuse\")",
            source: io::Error::from_raw_os_error(libc::ENOSYS),
        };
        assert!(missing.to_string().contains("lacks the new mount API"));
        assert_eq!(missing.hint(), "");
    }

    #[test]
    fn a_detached_mount_is_asked_for_as_the_options_and_the_owner_say() {
        let sys = FakeDetached::working();
        let mut options = MountOptions::default();
        options.apply("allow_other,fsname=img").unwrap();
        make(&sys, Path::new("/i/img"), &options).unwrap();
        let spec = sys.asked.lock().unwrap().clone().unwrap();
        assert_eq!(
            spec,
            MountSpec::new(Path::new("/i/img"), &options, (1000, 100))
        );
        let no_fuse = FakeDetached {
            open_errno: Some(libc::ENOENT),
            ..FakeDetached::working()
        };
        let err = make(&no_fuse, Path::new("/i/img"), &options).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open /dev/fuse: "),
            "{err}"
        );
        assert!(no_fuse.asked.lock().unwrap().is_none(), "nothing created");
    }

    #[test]
    fn this_kernel_has_the_mount_api() {
        // 5.2 and later; every kernel this project supports.
        assert!(kernel_has_mount_api());
    }
}
