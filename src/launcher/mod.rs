//! Launcher mode: sifuse owns the host side of a container's mount, so that nothing is
//! left behind whatever is killed, whenever.
//!
//! - [`server`]: `sifuse mount --control-fd FD`, the protocol of [`protocol`] on an
//!   inherited stream. The host copy of the mount is detached as soon as the container
//!   holds its own, or cleaned up when the container never starts.
//! - [`watcher`]: a forked process that cleans up after a server that died (even by
//!   SIGKILL) before the host copy was detached.
//! - [`handoff`]: `--detached` and `--serve-fd`, the hand-offs by descriptor of a
//!   detached mount (the new mount API), which never shows on the host at all.
//! - [`run`]: `sifuse run`, a reference launcher on top of the protocol; [`rootfs`]: the
//!   mounts that make its container's root.
//!
//! The decisions sit on top of narrow traits for the kernel calls ([`host::HostSyscalls`]
//! here, [`crate::mount::sys::MountSyscalls`] below), so that every transition, each call
//! failing included, is unit-tested without privileges.

pub mod fdpass;
pub mod handoff;
pub mod host;
pub mod protocol;
pub mod rootfs;
pub mod run;
pub mod server;
pub mod watcher;

use std::io;
use std::path::PathBuf;

use crate::mount::detached::DetachedError;
use crate::mount::MountError;

/// Why launcher mode failed.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
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
    #[error("{what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("cannot run {command}: {source}")]
    Exec { command: String, source: io::Error },
    #[error("{source}{hint}")]
    Detached {
        source: DetachedError,
        /// What the caller may do about it, if anything.
        hint: &'static str,
    },
    #[error("the sifuse server: {0}")]
    Server(String),
}

impl LauncherError {
    /// A container setup step that failed.
    pub fn setup(what: impl Into<String>, source: impl Into<io::Error>) -> LauncherError {
        LauncherError::Setup {
            what: what.into(),
            source: source.into(),
        }
    }
}
