//! Launcher mode without a host copy: detached mounts (Linux's new mount API), handed over
//! by descriptor instead of by path, so that nothing ever shows in the host's mount table
//! and no directory is made, whatever is killed and whenever.
//!
//! - `sifuse mount --control-fd FD --detached IMAGE` ([`MountFd`]): sifuse opens
//!   /dev/fuse, creates the detached mount (read-only, nosuid and nodev unless asked),
//!   sends its descriptor with the line `ready-fd` and serves until the kernel ends the
//!   connection — when the last reference (descriptor, namespace, working directory,
//!   root) is gone.
//! - `sifuse mount --control-fd FD --serve-fd IMAGE` ([`ServeFd`]): the reverse, for
//!   launchers that mount inside their own namespaces: they send an open /dev/fuse
//!   descriptor, on which they created the mount, with the line `serve-fd`; sifuse answers
//!   `serving` once the FUSE session has started.
//!
//! Either way there is nothing on the host to detach or clean up: no watcher, and after
//! the hand-off nothing more is read from the control stream.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::mount::attach::is_fuse_descriptor;
use crate::mount::detached::{self, DetachedMount, DetachedSyscalls, LinuxDetached};
use crate::mount::options::MountOptions;
use crate::mount::server::{Connection, Ending, Ends, Role, Server};
use crate::mount::MountError;

use super::fdpass::{recv_line, send_line_with_fd, Received};
use super::protocol::Message;
use super::{take_control, tell_error, unmounted, ControlError};

/// How long `--serve-fd` waits for the launcher's `serve-fd`: it creates the mount first,
/// which takes milliseconds.
pub const SERVE_FD_WAIT: Duration = Duration::from_secs(60);

/// Open /dev/fuse and create the detached mount; on failure tell the launcher
/// (`error <message>`).
fn make_mount(
    control: &mut impl Write,
    image: &Path,
    options: &MountOptions,
    sys: &dyn DetachedSyscalls,
) -> Result<DetachedMount, ControlError> {
    detached::make(sys, image, options)
        .map_err(|e| tell_error(control, ControlError::Detached { source: e }))
}

/// The server's role for `--control-fd FD --detached`.
pub struct MountFd {
    control_fd: RawFd,
    control: Option<File>,
    /// The detached mount's descriptor, until it is handed over.
    mount: Option<OwnedFd>,
    announced: bool,
}

impl MountFd {
    pub fn new(control_fd: RawFd) -> MountFd {
        MountFd {
            control_fd,
            control: None,
            mount: None,
            announced: false,
        }
    }
}

impl Role for MountFd {
    type Error = ControlError;

    fn connect(&mut self, server: &Server) -> Result<Connection, ControlError> {
        let mut control = take_control(self.control_fd)?;
        let made = make_mount(
            &mut control,
            server.image(),
            server.options(),
            &LinuxDetached(&**server.sys()),
        )?;
        self.control = Some(control);
        self.mount = Some(made.mount);
        Ok(Connection::Descriptor(made.fuse))
    }

    /// Send `ready-fd` with the mount's descriptor, and let go of it: this process must
    /// hold no reference, or the connection would never end. The launcher's copy (or, if
    /// sending failed, none) is the only one from here on.
    fn announce(&mut self, _: Option<&Path>, _: Ends) {
        let (Some(control), Some(mount)) = (&self.control, self.mount.take()) else {
            return;
        };
        let sent = send_line_with_fd(
            control.as_fd(),
            &Message::ReadyFd.to_string(),
            mount.as_fd(),
        );
        match sent {
            Ok(()) => self.announced = true,
            Err(e) => tracing::error!("cannot send ready-fd: {e}"),
        }
    }

    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, ControlError> {
        if self.announced {
            return unmounted(served);
        }
        let Some(control) = &mut self.control else {
            return unmounted(served);
        };
        match served {
            Err(e) => Err(tell_error(control, ControlError::from(e))),
            Ok(()) => Err(ControlError::Control {
                fd: control.as_raw_fd(),
                reason: "cannot send ready-fd: the launcher is gone".into(),
            }),
        }
    }
}

/// The launcher's first line, waiting at most `limit` for it.
fn recv_line_within(control: &File, limit: Duration) -> Result<Option<Received>, String> {
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
fn expect_serve_fd(received: Option<Received>) -> Result<OwnedFd, String> {
    let Some(r) = received else {
        return Err("end of file before serve-fd".into());
    };
    if Message::parse(&r.line) != Some(Message::ServeFd) || r.fds.len() != 1 {
        return Err(format!(
            "expected serve-fd with one /dev/fuse descriptor, got {:?} with {} descriptors",
            r.line,
            r.fds.len()
        ));
    }
    let fd = r.fds.into_iter().next().expect("one descriptor");
    if !is_fuse_descriptor(fd.as_fd()) {
        return Err("the descriptor sent with serve-fd is not open on /dev/fuse".into());
    }
    Ok(fd)
}

/// The server's role for `--control-fd FD --serve-fd`.
pub struct ServeFd {
    control_fd: RawFd,
    control: Option<File>,
    announced: bool,
}

impl ServeFd {
    pub fn new(control_fd: RawFd) -> ServeFd {
        ServeFd {
            control_fd,
            control: None,
            announced: false,
        }
    }
}

impl Role for ServeFd {
    type Error = ControlError;

    /// Receive the launcher's /dev/fuse descriptor.
    fn connect(&mut self, _: &Server) -> Result<Connection, ControlError> {
        let mut control = take_control(self.control_fd)?;
        let fd = control.as_raw_fd();
        let fuse = recv_line_within(&control, SERVE_FD_WAIT)
            .and_then(expect_serve_fd)
            .map_err(|reason| ControlError::Control {
                fd,
                reason: tell_error(&mut control, reason),
            })?;
        self.control = Some(control);
        Ok(Connection::Descriptor(fuse))
    }

    fn announce(&mut self, _: Option<&Path>, _: Ends) {
        let Some(control) = &mut self.control else {
            return;
        };
        match control.write_all(Message::Serving.line().as_bytes()) {
            Ok(()) => self.announced = true,
            // The launcher holds the mount; it hears of trouble from the mount itself.
            Err(e) => tracing::warn!("cannot answer serving: {e}"),
        }
    }

    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, ControlError> {
        match (served, &mut self.control) {
            (Err(e), Some(control)) if !self.announced => {
                Err(tell_error(control, ControlError::from(e)))
            }
            (served, _) => unmounted(served),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::detached::tests::FakeDetached;
    use crate::mount::detached::DetachedError;
    use std::os::unix::net::UnixStream;

    #[test]
    fn serve_fd_wants_one_fuse_descriptor() {
        let got = |line: &str, fds: Vec<OwnedFd>| {
            expect_serve_fd(Some(Received {
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

    fn make(sys: &FakeDetached) -> (Result<DetachedMount, ControlError>, String) {
        let mut out = Vec::new();
        let made = make_mount(&mut out, Path::new("/i/img"), &MountOptions::default(), sys);
        (made, String::from_utf8(out).unwrap())
    }

    #[test]
    fn what_the_launcher_hears_before_serving() {
        // Made: nothing said yet (ready-fd follows once the session answers), and the
        // mount was asked for as the options and the owner say.
        let ok = FakeDetached::working();
        let (made, said) = make(&ok);
        assert!(made.is_ok());
        assert_eq!(said, "");
        let spec = ok.asked.lock().unwrap().clone().unwrap();
        assert_eq!((spec.source.as_str(), spec.owner), ("/i/img", (1000, 100)));
        // No /dev/fuse.
        let no_fuse = FakeDetached {
            open_errno: Some(libc::ENOENT),
            ..FakeDetached::working()
        };
        let (made, said) = make(&no_fuse);
        assert!(made.is_err());
        assert!(said.starts_with("error cannot open /dev/fuse: "), "{said}");
        assert!(no_fuse.asked.lock().unwrap().is_none(), "nothing created");
        // A kernel without the API: the launcher is told, so that it can fall back.
        let old_kernel = FakeDetached {
            create: || {
                Err(DetachedError::Unsupported {
                    call: "fsopen(\"fuse\")",
                    source: io::Error::from_raw_os_error(libc::ENOSYS),
                })
            },
            ..FakeDetached::working()
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
            ..FakeDetached::working()
        };
        let (_, said) = make(&refused);
        assert!(said.contains("CAP_SYS_ADMIN in a user namespace"), "{said}");
    }

    /// Before the hand-off the launcher hears why serving failed; after it, nothing more
    /// is said, and a launcher gone before `ready-fd` is an error of its own.
    #[test]
    fn what_the_launcher_hears_when_serving_ends() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut role = MountFd::new(-1);
        role.control = Some(File::from(OwnedFd::from(ours)));
        let err = role
            .finish(Err(MountError::DaemonFailed("no such image".into())))
            .unwrap_err();
        assert_eq!(err.to_string(), "no such image");
        let err = role.finish(Ok(())).unwrap_err().to_string();
        assert!(err.contains("the launcher is gone"), "{err}");
        role.announced = true;
        assert_eq!(role.finish(Ok(())).unwrap(), Ending::Unmounted);
        drop(role);
        let mut heard = String::new();
        std::io::Read::read_to_string(&mut &theirs, &mut heard).unwrap();
        assert_eq!(heard, "error no such image\n");

        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut role = ServeFd::new(-1);
        role.control = Some(File::from(OwnedFd::from(ours)));
        role.announce(None, crate::mount::server::tests::ends());
        assert!(role
            .finish(Err(MountError::DaemonFailed("late".into())))
            .is_err());
        drop(role);
        let mut heard = String::new();
        std::io::Read::read_to_string(&mut &theirs, &mut heard).unwrap();
        assert_eq!(heard, "serving\n", "nothing after serving");
    }
}
