//! Becoming a daemon once the mount exists: the parent stays until the daemon reports the
//! mount live (or why it failed), so its exit status tells the caller the truth; the daemon
//! starts a new session, leaves the caller's directory, and lets go of the caller's
//! stdin, stdout and stderr (callers wait for EOF on them).
//!
//! Fork only while the process has a single thread: the FUSE request threads start in the
//! daemon, after the fork.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::unistd::{fork, ForkResult};

/// The daemon's side of the readiness pipe.
#[derive(Debug)]
pub struct Readiness(File);

/// What the parent learns.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The mount is live.
    Ready,
    /// The daemon failed, with its message.
    Failed(String),
}

/// The parent's side of the readiness pipe.
#[derive(Debug)]
pub struct ReadinessWait(File);

impl ReadinessWait {
    /// Wait for the daemon's report. A daemon that exits without one failed.
    pub fn wait(mut self) -> Outcome {
        let mut report = Vec::new();
        if let Err(e) = self.0.read_to_end(&mut report) {
            return Outcome::Failed(format!("cannot hear from the daemon: {e}"));
        }
        match report.split_first() {
            Some((b's', _)) => Outcome::Ready,
            Some((_, msg)) if !msg.is_empty() => {
                Outcome::Failed(String::from_utf8_lossy(msg).into_owned())
            }
            _ => Outcome::Failed("the daemon exited before the mount was ready".into()),
        }
    }
}

impl Readiness {
    /// Tell the parent the mount is live.
    pub fn ready(mut self) {
        // A parent that is gone has nobody to tell.
        let _ = self.0.write_all(b"s");
    }

    /// Tell the parent why mounting failed.
    pub fn failed(mut self, message: &str) {
        let _ = self.0.write_all(format!("f{message}").as_bytes());
    }
}

/// The two ends of a readiness pipe, before the fork.
fn readiness_pipe() -> io::Result<(ReadinessWait, Readiness)> {
    let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((
        ReadinessWait(File::from(read)),
        Readiness(File::from(write)),
    ))
}

/// Which process this is after [`daemonize`].
#[derive(Debug)]
pub enum Fork {
    /// The caller's process: wait for the report; its part ends there.
    Parent(ReadinessWait),
    /// The daemon: serve, and report readiness.
    Daemon(Readiness),
}

/// Fork. The daemon detaches from the caller's session, directory and standard streams.
pub fn daemonize() -> io::Result<Fork> {
    let (wait, ready) = readiness_pipe()?;
    // SAFETY: called while the process has one thread (see the module comment), so the
    // child's memory is consistent.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(ready);
            Ok(Fork::Parent(wait))
        }
        ForkResult::Child => {
            drop(wait);
            nix::unistd::setsid()?;
            // Keep no directory busy: the caller's may be unmounted later.
            std::env::set_current_dir("/")?;
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            nix::unistd::dup2_stdin(&null)?;
            nix::unistd::dup2_stdout(&null)?;
            nix::unistd::dup2_stderr(&null)?;
            Ok(Fork::Daemon(ready))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_reach_the_parent() {
        let (wait, ready) = readiness_pipe().unwrap();
        ready.ready();
        assert_eq!(wait.wait(), Outcome::Ready);

        let (wait, ready) = readiness_pipe().unwrap();
        ready.failed("no such image");
        assert_eq!(wait.wait(), Outcome::Failed("no such image".into()));

        let (wait, ready) = readiness_pipe().unwrap();
        drop(ready);
        assert!(matches!(wait.wait(), Outcome::Failed(m) if m.contains("exited before")));
    }
}
