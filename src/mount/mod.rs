//! The mount layer: everything between the options and a FUSE mount that answers, and the
//! one pipeline that serves it ([`server`]).
//!
//! - [`options`]: the mount options, as long flags or squashfuse's `-o` lists;
//!   [`spec`]: what a mount of the image looks like to the kernel, built from them.
//! - [`attach`]: mounting on a directory and unmounting only the mount made
//!   ([`sys`]: the kernel calls, behind a trait; [`mountinfo`]: what is mounted where);
//!   [`detached`]: mounts attached nowhere (the new mount API).
//! - [`server`]: the pipeline, with [`daemon`], [`notify`], [`signals`] and [`idle`] as its
//!   steps; a [`server::Role`] adds what a launcher needs ([`crate::control`]).

pub mod attach;
pub mod daemon;
pub mod detached;
pub mod idle;
pub mod mountinfo;
pub mod notify;
pub mod options;
pub mod server;
pub mod signals;
pub mod spec;
pub mod sys;

use std::io;
use std::path::{Path, PathBuf};

use options::{MountOptions, OptionError};
use sys::MountSyscalls;

pub use server::{Ending, Server, Standalone};

/// What to mount where: `sifuse mount IMAGE DIR`, or squashfuse's command line.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
}

/// Why mounting or serving failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Options(#[from] OptionError),
    #[error(transparent)]
    Image(#[from] crate::Error),
    #[error("mount point {}: {reason}", path.display())]
    Mountpoint { path: PathBuf, reason: String },
    #[error("cannot mount on {}: {source}", path.display())]
    Attach { path: PathBuf, source: io::Error },
    #[error("the kernel did not start the FUSE session on {}: {source}", path.display())]
    Handshake { path: PathBuf, source: io::Error },
    #[error("{} was mounted but does not answer: {reason}", path.display())]
    NotAnswering { path: PathBuf, reason: String },
    #[error("notify pipe {}: {source}", path.display())]
    NotifyPipe { path: PathBuf, source: io::Error },
    #[error("cannot become a daemon: {0}")]
    Daemon(io::Error),
    #[error("{0}")]
    DaemonFailed(String),
    #[error("serving the mount failed: {0}")]
    Serve(io::Error),
    #[error("cannot unmount {}: {reason}", path.display())]
    Unmount { path: PathBuf, reason: String },
}

/// The mount point as mountinfo spells it: absolute, the parent resolved, the last
/// component as given (stat cannot reach a dead FUSE mount to resolve it).
fn mountinfo_path(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().map_or(abs.clone(), |p| p.join(name)),
        _ => abs,
    }
}

/// `sifuse umount`: unmount the FUSE file system at `path`, and nothing else. The mount
/// found there is held while its type is checked and unmounted through that hold, so a
/// mount made there meanwhile is not touched.
pub fn umount(sys: &dyn MountSyscalls, path: &Path, lazy: bool) -> Result<(), MountError> {
    let target = mountinfo_path(path);
    let is_fuse = |pinned: &sys::PinnedMount| {
        let line = mountinfo::line_of(pinned.mountinfo_id)
            .map_err(|e| format!("cannot read mountinfo: {e}"))?
            .ok_or("nothing is mounted there")?;
        match mountinfo::fs_type(&line) {
            Some(t) if t == "fuse" || t.starts_with("fuse.") => Ok(()),
            t => Err(format!(
                "it is a {} mount, not FUSE: use umount(8)",
                t.unwrap_or("unknown")
            )),
        }
    };
    attach::unmount_fuse_at(sys, &target, lazy, &is_fuse).map_err(|reason| MountError::Unmount {
        path: target.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use attach::tests::FakeSys;

    #[test]
    fn umount_touches_only_fuse_mounts() {
        let sys = FakeSys {
            root: true,
            real_pins: true,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let err = umount(&sys, dir.path(), false).unwrap_err().to_string();
        assert!(err.contains("nothing is mounted there"), "{err}");
        let err = umount(&sys, Path::new("/proc"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("it is a proc mount, not FUSE"), "{err}");
        assert!(sys.calls().is_empty(), "{:?}", sys.calls());
    }
}
