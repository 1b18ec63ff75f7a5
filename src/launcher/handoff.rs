//! Launcher mode without a host copy: detached mounts (Linux's new mount API), handed over
//! by descriptor instead of by path, so that nothing ever shows in the host's mount table
//! and no directory is made, whatever is killed and whenever.
//!
//! - `sifuse mount --control-fd FD --detached IMAGE`: sifuse opens /dev/fuse, creates the
//!   detached mount (read-only, nosuid and nodev unless asked), sends its descriptor with
//!   the line `ready-fd` and serves until the kernel ends the connection — when the last
//!   reference (descriptor, namespace, working directory, root) is gone.
//! - `sifuse mount --control-fd FD --serve-fd IMAGE`: the reverse, for launchers that mount
//!   inside their own namespaces: they send an open /dev/fuse descriptor, on which they
//!   created the mount, with the line `serve-fd`; sifuse answers `serving` once the FUSE
//!   session has started.
//!
//! Either way there is nothing on the host to detach or clean up: no watcher, and after
//! the hand-off nothing more is read from the control stream.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::mount::attach::is_inherited_fuse_fd;
use crate::mount::detached::{self, DetachedError, DetachedSpec};
use crate::mount::options::MountOptions;
use crate::mount::sys::{MountFlags, MountSyscalls};
use crate::mount::{self, MountRequest, DEFAULT_SUBTYPE};

use super::fdpass::{recv_line, send_line_with_fd};
use super::protocol::error_line;
use super::LauncherError;

/// Which hand-off `sifuse mount --control-fd` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    /// Mount on a directory of the host and hand over its path (`ready PATH`).
    HostPath,
    /// Create a detached mount and hand over its descriptor (`ready-fd`).
    MountFd,
    /// Serve a /dev/fuse descriptor the launcher mounted (`serve-fd`, `serving`).
    ServeFd,
}

/// The detached mount sifuse makes for IMAGE with `options`, owned by `owner`: the same
/// source, type, flags and access as a mount on a directory.
pub fn detached_spec(image: &Path, options: &MountOptions, owner: (u32, u32)) -> DetachedSpec {
    let source = match &options.fsname {
        Some(name) => name.clone(),
        None => std::path::absolute(image)
            .unwrap_or_else(|_| image.to_path_buf())
            .display()
            .to_string(),
    };
    DetachedSpec {
        source,
        subtype: options
            .subtype
            .clone()
            .unwrap_or_else(|| DEFAULT_SUBTYPE.into()),
        flags: MountFlags {
            nosuid: !options.suid,
            nodev: !options.dev,
        },
        access: options.access(),
        owner,
    }
}

/// A failed detached mount, with what to do about a refusal.
pub fn detached_error(source: DetachedError) -> LauncherError {
    let refused = matches!(
        &source,
        DetachedError::Failed { source: e, .. }
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
    );
    let hint = if refused {
        " (unprivileged, the caller needs CAP_SYS_ADMIN in a user namespace that owns its \
         mount namespace, as after unshare -r -m, and a /dev/fuse it may open)"
    } else {
        ""
    };
    LauncherError::Detached { source, hint }
}

/// Create a detached mount of `spec` through `fuse`.
pub fn create_mount(fuse: &OwnedFd, spec: &DetachedSpec) -> Result<OwnedFd, LauncherError> {
    detached::create(fuse.as_fd(), spec).map_err(detached_error)
}

/// The kernel calls of `--detached` before serving, behind a narrow trait so that what
/// the launcher hears when they fail is unit-tested without privileges.
pub trait DetachedSyscalls {
    /// Open /dev/fuse for reading and writing, close-on-exec.
    fn open_fuse(&self) -> io::Result<OwnedFd>;
    /// fsopen, fsconfig, FSCONFIG_CMD_CREATE, fsmount.
    fn create(&self, fuse: &OwnedFd, spec: &DetachedSpec) -> Result<OwnedFd, DetachedError>;
    /// The user and group the mount belongs to.
    fn owner(&self) -> (u32, u32);
}

/// The real calls, with /dev/fuse opened and the owner told by the mount layer's calls.
pub struct LinuxDetached<'a>(pub &'a dyn MountSyscalls);

impl DetachedSyscalls for LinuxDetached<'_> {
    fn open_fuse(&self) -> io::Result<OwnedFd> {
        self.0.open_fuse_device()
    }
    fn create(&self, fuse: &OwnedFd, spec: &DetachedSpec) -> Result<OwnedFd, DetachedError> {
        detached::create(fuse.as_fd(), spec)
    }
    fn owner(&self) -> (u32, u32) {
        self.0.user_and_group()
    }
}

/// Open /dev/fuse and create the detached mount; on failure tell the launcher
/// (`error <message>`). Returns the /dev/fuse descriptor and the mount's.
fn make_mount(
    control: &mut impl Write,
    image: &Path,
    options: &MountOptions,
    sys: &dyn DetachedSyscalls,
) -> Result<(OwnedFd, OwnedFd), LauncherError> {
    let made = sys
        .open_fuse()
        .map_err(|e| LauncherError::setup("cannot open /dev/fuse", e))
        .and_then(|fuse| {
            let spec = detached_spec(image, options, sys.owner());
            let mount = sys.create(&fuse, &spec).map_err(detached_error)?;
            Ok((fuse, mount))
        });
    if let Err(e) = &made {
        let _ = control.write_all(error_line(&e.to_string()).as_bytes());
    }
    made
}

/// `/dev/fd/N` for a FUSE descriptor this process serves: the mount layer's form of an
/// already mounted /dev/fuse descriptor. The number passes to the mount layer, which takes
/// ownership of it (and, should it fail before, the process exits anyway).
fn served_path(fuse: OwnedFd) -> PathBuf {
    PathBuf::from(format!("/dev/fd/{}", fuse.into_raw_fd()))
}

/// Serve `fuse` in the foreground; `live` runs once the session has started.
fn serve_descriptor(
    image: &Path,
    options: &MountOptions,
    fuse: OwnedFd,
    mount_sys: Arc<dyn MountSyscalls>,
    live: impl FnOnce(&Path) + Send + 'static,
) -> Result<(), mount::MountError> {
    let mut options = options.clone();
    options.foreground = true;
    let req = MountRequest {
        image: image.to_path_buf(),
        mountpoint: served_path(fuse),
        options,
    };
    // An inherited descriptor: no mount of this process's to know.
    mount::mount_foreground(&req, mount_sys, |_| {}, live)
}

/// `--detached`: create the mount, send `ready-fd` with its descriptor, serve.
pub fn serve_mount_fd(
    mut control: File,
    image: &Path,
    options: &MountOptions,
    mount_sys: Arc<dyn MountSyscalls>,
) -> Result<(), LauncherError> {
    let fail = |control: &mut File, e: LauncherError| {
        let _ = control.write_all(error_line(&e.to_string()).as_bytes());
        Err(e)
    };
    let (fuse, mount_fd) = make_mount(&mut control, image, options, &LinuxDetached(&*mount_sys))?;
    let announced = Arc::new(AtomicBool::new(false));
    let live = {
        let announced = announced.clone();
        let control = control.try_clone();
        move |_: &Path| {
            let sent =
                control.and_then(|c| send_line_with_fd(c.as_fd(), "ready-fd", mount_fd.as_fd()));
            match sent {
                Ok(()) => announced.store(true, Ordering::SeqCst),
                Err(e) => tracing::error!("cannot send ready-fd: {e}"),
            }
            // This process must hold no reference, or the connection would never end: the
            // launcher's copy (or, if sending failed, none) is the only one from here on.
            drop(mount_fd);
        }
    };
    let served = serve_descriptor(image, options, fuse, mount_sys, live);
    if announced.load(Ordering::SeqCst) {
        return served.map_err(LauncherError::from);
    }
    match served {
        Err(e) => fail(&mut control, e.into()),
        Ok(()) => Err(LauncherError::Control {
            fd: control.as_raw_fd(),
            reason: "cannot send ready-fd: the launcher is gone".into(),
        }),
    }
}

/// How long `--serve-fd` waits for the launcher's `serve-fd`: it creates the mount first,
/// which takes milliseconds.
const SERVE_FD_WAIT: Duration = Duration::from_secs(60);

/// The launcher's first line, waiting at most `limit` for it.
fn recv_line_within(
    control: &File,
    limit: Duration,
) -> Result<Option<super::fdpass::Received>, String> {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    let timeout = nix::sys::time::TimeVal::new(limit.as_secs() as libc::time_t, 0);
    setsockopt(control, ReceiveTimeout, &timeout)
        .map_err(|e| format!("the control stream must be a socket: {e}"))?;
    recv_line(control.as_fd()).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no serve-fd within {} s", limit.as_secs())
        }
        _ => e.to_string(),
    })
}

/// What the launcher's first message must be in `--serve-fd` mode.
fn expect_serve_fd(received: Option<super::fdpass::Received>) -> Result<OwnedFd, String> {
    let Some(r) = received else {
        return Err("end of file before serve-fd".into());
    };
    if r.line != "serve-fd" || r.fds.len() != 1 {
        return Err(format!(
            "expected serve-fd with one /dev/fuse descriptor, got {:?} with {} descriptors",
            r.line,
            r.fds.len()
        ));
    }
    let fd = r.fds.into_iter().next().expect("one descriptor");
    if !is_inherited_fuse_fd(Path::new(&format!("/dev/fd/{}", fd.as_raw_fd()))) {
        return Err("the descriptor sent with serve-fd is not open on /dev/fuse".into());
    }
    Ok(fd)
}

/// `--serve-fd`: receive the launcher's /dev/fuse descriptor, serve it, answer `serving`.
pub fn serve_received_fd(
    mut control: File,
    image: &Path,
    options: &MountOptions,
    mount_sys: Arc<dyn MountSyscalls>,
) -> Result<(), LauncherError> {
    let fd = control.as_raw_fd();
    let received = recv_line_within(&control, SERVE_FD_WAIT);
    let fuse = match received.and_then(expect_serve_fd) {
        Ok(f) => f,
        Err(reason) => {
            let _ = control.write_all(error_line(&reason).as_bytes());
            return Err(LauncherError::Control { fd, reason });
        }
    };
    let announced = Arc::new(AtomicBool::new(false));
    let live = {
        let announced = announced.clone();
        let control = control.try_clone();
        move |_: &Path| match control.and_then(|mut c| c.write_all(b"serving\n")) {
            Ok(()) => announced.store(true, Ordering::SeqCst),
            // The launcher holds the mount; it hears of trouble from the mount itself.
            Err(e) => tracing::warn!("cannot answer serving: {e}"),
        }
    };
    let served = serve_descriptor(image, options, fuse, mount_sys, live);
    match served {
        Err(e) if !announced.load(Ordering::SeqCst) => {
            let e = LauncherError::from(e);
            let _ = control.write_all(error_line(&e.to_string()).as_bytes());
            Err(e)
        }
        other => other.map_err(LauncherError::from),
    }
}

/// Whether this kernel has the new mount API at all: fsopen with no name fails with
/// EFAULT (or EPERM without the capability) where it exists, ENOSYS where it does not.
pub fn kernel_has_mount_api() -> bool {
    // SAFETY: fsopen with a null name reads nothing; it fails before creating anything.
    let rc = unsafe { libc::syscall(libc::SYS_fsopen, std::ptr::null::<libc::c_char>(), 0) };
    if rc >= 0 {
        // SAFETY: a descriptor this call created (it cannot, but close it if it did).
        unsafe { libc::close(rc as i32) };
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::options::Access;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_spec_follows_the_options() {
        let mut o = MountOptions::default();
        let s = detached_spec(Path::new("/i/img.sif"), &o, (1000, 100));
        assert_eq!(s.source, "/i/img.sif");
        assert_eq!(s.subtype, "sifuse");
        assert_eq!(
            s.flags,
            MountFlags {
                nosuid: true,
                nodev: true
            }
        );
        assert_eq!((s.access, s.owner), (Access::Owner, (1000, 100)));
        o.apply("suid,dev,allow_other,fsname=x,subtype=y").unwrap();
        let s = detached_spec(Path::new("img"), &o, (0, 0));
        assert_eq!((s.source.as_str(), s.subtype.as_str()), ("x", "y"));
        assert!(!s.flags.nosuid && !s.flags.nodev);
        assert_eq!(s.access, Access::Everyone);
    }

    #[test]
    fn refusals_say_what_is_needed_and_missing_apis_say_so() {
        let refused = DetachedError::Failed {
            call: "fsopen(\"fuse\")",
            source: io::Error::from_raw_os_error(libc::EPERM),
            log: String::new(),
        };
        let msg = detached_error(refused).to_string();
        assert!(
            msg.contains("user namespace that owns its mount namespace"),
            "{msg}"
        );
        let missing = DetachedError::Unsupported {
            call: "fsopen(\"fuse\")",
            source: io::Error::from_raw_os_error(libc::ENOSYS),
        };
        let msg = detached_error(missing).to_string();
        assert!(msg.contains("lacks the new mount API"), "{msg}");
        assert!(!msg.contains("user namespace"), "{msg}");
    }

    #[test]
    fn serve_fd_wants_one_fuse_descriptor() {
        let got = |line: &str, fds: Vec<OwnedFd>| {
            expect_serve_fd(Some(super::super::fdpass::Received {
                line: line.into(),
                fds,
            }))
        };
        assert!(expect_serve_fd(None).unwrap_err().contains("end of file"));
        let err = got("serve-fd", vec![]).unwrap_err();
        assert!(err.contains("with 0 descriptors"), "{err}");
        let null: OwnedFd = File::open("/dev/null").unwrap().into();
        let err = got("serve-fd", vec![null]).unwrap_err();
        assert!(err.contains("not open on /dev/fuse"), "{err}");
        let (a, _b) = UnixStream::pair().unwrap();
        let err = got("ready", vec![a.into()]).unwrap_err();
        assert!(err.contains("got \"ready\""), "{err}");
    }

    /// Answers as configured; records the spec it was asked for.
    struct FakeDetached {
        open_errno: Option<i32>,
        create: fn() -> Result<OwnedFd, DetachedError>,
        asked: std::sync::Mutex<Option<DetachedSpec>>,
    }

    impl DetachedSyscalls for FakeDetached {
        fn open_fuse(&self) -> io::Result<OwnedFd> {
            match self.open_errno {
                Some(e) => Err(io::Error::from_raw_os_error(e)),
                None => Ok(File::open("/dev/null")?.into()),
            }
        }
        fn create(&self, _: &OwnedFd, spec: &DetachedSpec) -> Result<OwnedFd, DetachedError> {
            *self.asked.lock().unwrap() = Some(spec.clone());
            (self.create)()
        }
        fn owner(&self) -> (u32, u32) {
            (1000, 100)
        }
    }

    fn make(sys: &FakeDetached) -> (Result<(OwnedFd, OwnedFd), LauncherError>, String) {
        let mut out = Vec::new();
        let made = make_mount(&mut out, Path::new("/i/img"), &MountOptions::default(), sys);
        (made, String::from_utf8(out).unwrap())
    }

    #[test]
    fn what_the_launcher_hears_before_serving() {
        // Made: nothing said yet (ready-fd follows once the session answers), and the
        // mount was asked for as the options and the owner say.
        let ok = FakeDetached {
            open_errno: None,
            create: || Ok(File::open("/dev/null").unwrap().into()),
            asked: Default::default(),
        };
        let (made, said) = make(&ok);
        assert!(made.is_ok());
        assert_eq!(said, "");
        let spec = ok.asked.lock().unwrap().clone().unwrap();
        assert_eq!((spec.source.as_str(), spec.owner), ("/i/img", (1000, 100)));
        // No /dev/fuse.
        let no_fuse = FakeDetached {
            open_errno: Some(libc::ENOENT),
            create: ok.create,
            asked: Default::default(),
        };
        let (made, said) = make(&no_fuse);
        assert!(made.is_err());
        assert!(said.starts_with("error cannot open /dev/fuse: "), "{said}");
        assert!(no_fuse.asked.lock().unwrap().is_none(), "nothing created");
        // A kernel without the API: the launcher is told, so that it can fall back.
        let old_kernel = FakeDetached {
            open_errno: None,
            create: || {
                Err(DetachedError::Unsupported {
                    call: "fsopen(\"fuse\")",
                    source: io::Error::from_raw_os_error(libc::ENOSYS),
                })
            },
            asked: Default::default(),
        };
        let (made, said) = make(&old_kernel);
        assert!(made.is_err());
        assert!(
            said.starts_with("error this kernel lacks the new mount API"),
            "{said}"
        );
        assert_eq!(said.lines().count(), 1, "{said}");
        // Refused: the error says what is needed.
        let refused = FakeDetached {
            create: || {
                Err(DetachedError::Failed {
                    call: "fsopen(\"fuse\")",
                    source: io::Error::from_raw_os_error(libc::EPERM),
                    log: String::new(),
                })
            },
            ..old_kernel
        };
        let (_, said) = make(&refused);
        assert!(said.contains("CAP_SYS_ADMIN in a user namespace"), "{said}");
    }

    #[test]
    fn this_kernel_has_the_mount_api() {
        // 5.2 and later; every kernel this project supports.
        assert!(kernel_has_mount_api());
    }
}
