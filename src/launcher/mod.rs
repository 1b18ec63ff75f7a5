//! A launcher: `sifuse run`, which runs a command with the image as its read-only root, on
//! top of launcher mode's control protocol. It is the other end of [`crate::control`]: it
//! starts the server, speaks the [`crate::control::protocol`]'s messages with it, and builds
//! the container.
//!
//! - [`container`]: the steps, for the detached mount (the default) and for the
//!   host-path hand-off; [`server_process`]: the server it starts, every wait bounded.
//! - [`rootfs`]: which mounts make the image a container root, and making them.
//! - [`sys`]: every kernel call it makes (namespaces, mounts, pivot_root, fork, pidfds),
//!   behind [`sys::ContainerSyscalls`], so that each failure branch is unit-tested without
//!   privileges.

pub mod container;
pub mod rootfs;
pub mod server_process;
pub mod sys;

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use crate::mount::detached::DetachedError;

pub use container::{run_container, ContainerRequest};

/// Why `sifuse run` failed.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("{what}: {source}")]
    Setup { what: String, source: io::Error },
    #[error("cannot run {command}: {source}")]
    Exec { command: String, source: io::Error },
    #[error("{source}{hint}", hint = .source.hint())]
    Detached { source: DetachedError },
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

/// `--bind SRC[:DST]`: the host's SRC at DST inside the container (DST defaults to SRC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    pub dest: PathBuf,
}

impl FromStr for Bind {
    type Err = String;

    fn from_str(s: &str) -> Result<Bind, String> {
        let (source, dest) = s.split_once(':').unwrap_or((s, s));
        if source.is_empty() || dest.is_empty() {
            return Err(format!("{s:?}: expected SRC or SRC:DST"));
        }
        if !dest.starts_with('/') {
            return Err(format!(
                "{dest:?}: the destination must be an absolute path"
            ));
        }
        Ok(Bind {
            source: source.into(),
            dest: dest.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse() {
        assert_eq!(
            "/a".parse::<Bind>().unwrap(),
            Bind {
                source: "/a".into(),
                dest: "/a".into()
            }
        );
        assert_eq!(
            "data:/mnt/d".parse::<Bind>().unwrap(),
            Bind {
                source: "data".into(),
                dest: "/mnt/d".into()
            }
        );
        assert!("a:b".parse::<Bind>().unwrap_err().contains("absolute"));
        assert!(":/x".parse::<Bind>().is_err());
    }
}
