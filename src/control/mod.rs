//! Launcher mode, the server's side: `sifuse mount --control-fd FD`, where a launcher
//! (SingularityCE, Apptainer, `sifuse run`) holds the other end of FD and sifuse owns the
//! host side of the container's mount, so that nothing is left behind whatever is killed,
//! whenever.
//!
//! Each hand-off is a [`Role`] of the server's one pipeline ([`crate::mount::server`]):
//!
//! - [`host_path`]: mount on a directory of the host, announce `ready PATH`, then detach
//!   the host copy once the container holds its own (`started`), or clean up when it never
//!   starts ([`conversation`], [`host`]); a forked [`watcher`] cleans up after a server
//!   that died, even by SIGKILL.
//! - [`by_descriptor`]: `--detached` and `--serve-fd`, the hand-offs by descriptor of a detached
//!   mount (the new mount API), which never shows on the host at all.
//!
//! Both ends of the stream speak the [`protocol`]'s messages; [`fdpass`] carries the ones
//! with a descriptor attached. The launcher's end is [`crate::launcher`].
//!
//! The decisions sit on narrow traits for the kernel calls ([`host::HostSyscalls`],
//! [`crate::mount::detached::DetachedSyscalls`], and the mount layer's
//! [`crate::mount::sys::MountSyscalls`] below), so that every transition, each call
//! failing included, is unit-tested without privileges.

pub mod by_descriptor;
pub mod conversation;
pub mod fdpass;
pub mod host;
pub mod host_path;
pub mod protocol;
pub mod watcher;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::mount::detached::DetachedError;
use crate::mount::server::{Ending, Role};
use crate::mount::MountError;

use protocol::Message;

/// Why launcher mode failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create a private directory in {}: {source}", path.display())]
    TempDir { path: PathBuf, source: io::Error },
    #[error("cannot remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot unmount {}: {source}", path.display())]
    Unmount { path: PathBuf, source: io::Error },
    #[error("mount point {}: {source}", path.display())]
    Mountpoint { path: PathBuf, source: io::Error },
    #[error("control descriptor {fd}: {reason}")]
    Control { fd: i32, reason: String },
    #[error("cannot start the cleanup watcher: {0}")]
    Watcher(io::Error),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("the mount went away before the container started")]
    MountGone,
    #[error("{source}{hint}", hint = .source.hint())]
    Detached { source: DetachedError },
}

/// How the mount reaches the launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOff {
    /// Mount on a directory of the host and hand over its path (`ready PATH`): the
    /// launcher's mount point, or `$TMPDIR/sifuse-XXXXXX/root` when it gave none.
    HostPath { mountpoint: Option<PathBuf> },
    /// Create a detached mount and hand over its descriptor (`--detached`: `ready-fd`).
    MountFd,
    /// Serve a /dev/fuse descriptor the launcher mounted (`--serve-fd`: `serve-fd`,
    /// `serving`).
    ServeFd,
}

/// The server's role for `--control-fd FD` with `hand_off`.
pub fn role(control_fd: RawFd, hand_off: HandOff) -> Box<dyn Role<Error = ControlError>> {
    match hand_off {
        HandOff::HostPath { mountpoint } => {
            Box::new(host_path::HostPath::new(control_fd, mountpoint))
        }
        HandOff::MountFd => Box::new(by_descriptor::MountFd::new(control_fd)),
        HandOff::ServeFd => Box::new(by_descriptor::ServeFd::new(control_fd)),
    }
}

/// Take the inherited control descriptor: it must be open, and no helper this process
/// starts (fusermount3) may inherit it, or the launcher would not see end of file when
/// sifuse dies.
fn take_control(fd: RawFd) -> Result<File, ControlError> {
    let bad = |reason: String| ControlError::Control { fd, reason };
    if fd < 3 {
        return Err(bad(
            "must be 3 or above (0-2 are the standard streams)".into()
        ));
    }
    // SAFETY: fcntl(F_SETFD) on a number reads and writes no memory; it fails with EBADF
    // when nothing is open there.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    // SAFETY: the descriptor is open (checked above) and the launcher handed it to this
    // process, which from here on is its only user: the File closes it exactly once.
    let control = unsafe { File::from_raw_fd(fd) };
    bound_sends(&control).map_err(|e| bad(e.to_string()))?;
    Ok(control)
}

/// Longest a message to the launcher may wait for room in the control socket. Messages
/// are a few lines, so only a launcher that stopped reading fills it; a send that times
/// out fails as a closed stream does.
pub const CONTROL_SEND_LIMIT: Duration = Duration::from_secs(10);

/// Bound every write to the control stream by [`CONTROL_SEND_LIMIT`]. Reads stay
/// unbounded: the launcher answers `started` when its container has started, however long
/// that takes. A control descriptor that is not a socket is left as it is.
fn bound_sends(control: &File) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt::SendTimeout};
    use nix::sys::time::TimeVal;
    let limit = TimeVal::new(CONTROL_SEND_LIMIT.as_secs() as i64, 0);
    match setsockopt(control, SendTimeout, &limit) {
        Ok(()) | Err(nix::errno::Errno::ENOTSOCK) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How a hand-off ends once serving did not fail, or was not the launcher's to hear of:
/// the kernel ended the connection.
fn unmounted(served: Result<(), MountError>) -> Result<Ending, ControlError> {
    Ok(served.map(|()| Ending::Unmounted)?)
}

/// Tell the launcher `error MESSAGE`, if it still listens, and return the error.
fn tell_error<E: std::fmt::Display>(control: &mut impl Write, error: E) -> E {
    let _ = control.write_all(Message::error(&error).line().as_bytes());
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_descriptor_must_be_open_and_not_a_standard_stream() {
        let err = take_control(1).unwrap_err().to_string();
        assert!(err.contains("must be 3 or above"), "{err}");
        let err = take_control(1_000_000).unwrap_err().to_string();
        assert!(err.contains("control descriptor 1000000"), "{err}");
    }

    /// A launcher that stops reading cannot hold the server in a write: once the socket
    /// is full, a write fails after CONTROL_SEND_LIMIT instead of waiting for ever.
    #[test]
    fn writes_to_a_launcher_that_stopped_reading_end() {
        use std::os::fd::IntoRawFd;
        use std::os::unix::net::UnixStream;
        let (ours, _launcher) = UnixStream::pair().unwrap();
        let mut control = take_control(ours.into_raw_fd()).unwrap();
        let started = std::time::Instant::now();
        let line = [b'x'; 4096];
        let failed = (0..100_000).find_map(|_| control.write_all(&line).err());
        let took = started.elapsed();
        let e = failed.expect("the socket never filled");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        assert!(
            took >= CONTROL_SEND_LIMIT - Duration::from_secs(1),
            "{took:?}"
        );
        assert!(took < CONTROL_SEND_LIMIT * 3, "{took:?}");
    }

    #[test]
    fn errors_reach_the_launcher_as_one_line() {
        let mut out = Vec::new();
        let e = tell_error(&mut out, ControlError::MountGone);
        assert!(matches!(e, ControlError::MountGone));
        assert_eq!(
            out,
            b"error the mount went away before the container started\n"
        );
    }
}
