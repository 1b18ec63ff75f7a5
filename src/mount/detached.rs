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
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::options::Access;
use super::sys::MountFlags;

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

    /// As an I/O error: the kernel's own where it refused the privilege (EPERM, which
    /// callers answer by trying fusermount3), else of the same kind, with the message.
    pub fn into_io(self) -> io::Error {
        let (DetachedError::Unsupported { source, .. } | DetachedError::Failed { source, .. }) =
            &self;
        if source.raw_os_error() == Some(libc::EPERM) {
            return io::Error::from_raw_os_error(libc::EPERM);
        }
        io::Error::new(source.kind(), self.to_string())
    }
}

/// What the detached mount looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedSpec {
    /// The source mountinfo shows once attached.
    pub source: String,
    /// mountinfo shows the type as `fuse.SUBTYPE`.
    pub subtype: String,
    pub flags: MountFlags,
    pub access: Access,
    /// The user and group the kernel lets use the mount (besides allow_other).
    pub owner: (u32, u32),
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
    // SAFETY: reading into a buffer of the length passed; a context descriptor returns
    // one message per read and ENODATA once empty.
    loop {
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
    // SAFETY: valid C strings; fsconfig copies them.
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
    // SAFETY: a valid C string; no value for a flag.
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

/// Create a detached FUSE mount served through `fuse` (an open /dev/fuse descriptor);
/// returns the mount's descriptor (close-on-exec). The FUSE connection starts now: the
/// first access through the mount waits for the server's INIT reply.
pub fn create(fuse: BorrowedFd<'_>, spec: &DetachedSpec) -> Result<OwnedFd, DetachedError> {
    let (uid, gid) = spec.owner;
    let mut params: Vec<(&str, Option<String>)> = vec![
        ("source", Some(spec.source.clone())),
        ("subtype", Some(spec.subtype.clone())),
        ("fd", Some(fuse.as_raw_fd().to_string())),
        ("rootmode", Some("40000".into())),
        ("user_id", Some(uid.to_string())),
        ("group_id", Some(gid.to_string())),
    ];
    if spec.access.kernel_allows_others(uid) {
        // As for mount(2): the kernel enforces mode bits for everyone else.
        params.push(("default_permissions", None));
        params.push(("allow_other", None));
    }
    create_mount(&params, spec.flags)
}

/// Create, detached, the mount that mount(2) would make of `fstype` (`fuse` or
/// `fuse.SUBTYPE`) from `source` with the option string `data` (`key=value` and bare
/// flags, comma-separated, as the kernel's FUSE driver takes them).
pub fn create_from_data(
    source: &str,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<OwnedFd, DetachedError> {
    let mut params: Vec<(&str, Option<String>)> = vec![("source", Some(source.to_string()))];
    match fstype.split_once('.') {
        Some(("fuse", subtype)) => params.push(("subtype", Some(subtype.to_string()))),
        None if fstype == "fuse" => {}
        _ => {
            return Err(DetachedError::Failed {
                call: "fsopen",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{fstype} is not a FUSE file system type"),
                ),
                log: String::new(),
            })
        }
    }
    for item in data.split(',').filter(|i| !i.is_empty()) {
        params.push(match item.split_once('=') {
            Some((key, value)) => (key, Some(value.to_string())),
            None => (item, None),
        });
    }
    create_mount(&params, flags)
}

/// fsopen("fuse"), one fsconfig per parameter (a string, or a flag where there is no
/// value), a read-only superblock, FSCONFIG_CMD_CREATE, and fsmount read-only with `flags`.
fn create_mount(
    params: &[(&str, Option<String>)],
    flags: MountFlags,
) -> Result<OwnedFd, DetachedError> {
    let name = cstring("fuse").expect("no NUL");
    // SAFETY: a valid C string.
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
    // SAFETY: fsopen returned a new descriptor this function owns.
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
    // SAFETY: no pointers.
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
    // SAFETY: no pointers.
    let raw = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if raw < 0 {
        return Err(failed("fsmount", last_error()));
    }
    // SAFETY: fsmount returned a new descriptor; the caller owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// Attach a detached mount at `target` in the caller's mount namespace.
pub fn attach_at(mount: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let empty = cstring("").expect("no NUL");
    let to = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the target path"))?;
    // SAFETY: valid C strings.
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
