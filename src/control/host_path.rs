//! The host-path hand-off: make the private directory (unless the launcher gave a mount
//! point), fork the cleanup watcher, mount there, then let a control thread talk to the
//! launcher ([`super::conversation`]) while the server serves, until the kernel ends the
//! connection.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::mount::server::{Connection, Ending, Ends, Role, Server};
use crate::mount::sys::MountId;
use crate::mount::MountError;

use super::conversation::{converse, ConversationEnd};
use super::host::{temp_base, HostCopy, HostSyscalls, LinuxHost, Stage};
use super::watcher::{self, Watcher};
use super::{take_control, tell_error, unmounted, ControlError};

/// The host copy and its watcher, which the control thread and the serving thread share.
struct Shared {
    host: Mutex<HostCopy>,
    watcher: Mutex<Option<Watcher>>,
}

impl Shared {
    fn disarm(&self) {
        let taken = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = taken {
            w.disarm();
        }
    }
}

/// What the role holds once connected.
struct Connected {
    control: File,
    shared: Arc<Shared>,
    sys: LinuxHost,
}

/// The server's role for `--control-fd FD` without `--detached` or `--serve-fd`.
pub struct HostPath {
    control_fd: RawFd,
    mountpoint: Option<PathBuf>,
    connected: Option<Connected>,
}

impl HostPath {
    /// Speak on `control_fd`; mount on `mountpoint`, or on a private directory.
    pub fn new(control_fd: RawFd, mountpoint: Option<PathBuf>) -> HostPath {
        HostPath {
            control_fd,
            mountpoint,
            connected: None,
        }
    }
}

impl Role for HostPath {
    type Error = ControlError;

    fn connect(&mut self, server: &Server) -> Result<Connection, ControlError> {
        let mut control = take_control(self.control_fd)?;
        let sys = LinuxHost(server.sys().clone());
        let host = match &self.mountpoint {
            Some(p) => match p.canonicalize() {
                Ok(abs) => HostCopy::given(abs),
                Err(source) => {
                    let e = ControlError::Mountpoint {
                        path: p.clone(),
                        source,
                    };
                    return Err(tell_error(&mut control, e));
                }
            },
            None => match temp_base()
                .map_err(|source| ControlError::TempDir {
                    path: "$TMPDIR".into(),
                    source,
                })
                .and_then(|base| HostCopy::create(&sys, &base))
            {
                Ok(h) => h,
                Err(e) => return Err(tell_error(&mut control, e)),
            },
        };
        let watcher = match watcher::spawn(&host, &sys) {
            Ok(w) => w,
            Err(e) => {
                let mut host = host;
                let _ = host.clean_up(&sys, false);
                return Err(tell_error(&mut control, ControlError::Watcher(e)));
            }
        };
        let mountpoint = host.mountpoint().to_path_buf();
        self.connected = Some(Connected {
            control,
            shared: Arc::new(Shared {
                host: Mutex::new(host),
                watcher: Mutex::new(Some(watcher)),
            }),
            sys,
        });
        Ok(Connection::Path(mountpoint))
    }

    /// The host copy and the watcher learn which mount is theirs before it is attached
    /// (where the kernel allows), so that neither ever unmounts anything else there.
    fn mount_made(&mut self, id: MountId) {
        let Some(c) = &self.connected else { return };
        c.shared
            .host
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_mount(id);
        if let Some(w) = &*c.shared.watcher.lock().unwrap_or_else(|e| e.into_inner()) {
            w.tell_mount(id);
        }
    }

    fn announce(&mut self, _: Option<&Path>, ends: Ends) {
        let Some(c) = &self.connected else { return };
        match c.control.try_clone() {
            Ok(control) => start_control_thread(control, c.shared.clone(), c.sys.clone(), ends),
            Err(e) => cannot_talk(&format!("cannot use the control stream: {e}"), &ends),
        }
    }

    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, ControlError> {
        match &mut self.connected {
            Some(c) => finish(served, &c.shared, &c.sys, &mut c.control),
            // Nothing was connected: nothing to tell or clean up.
            None => unmounted(served),
        }
    }
}

/// The mount has ended, or never began: decide from where the host copy stands.
fn finish(
    served: Result<(), MountError>,
    shared: &Shared,
    sys: &dyn HostSyscalls,
    control: &mut impl Write,
) -> Result<Ending, ControlError> {
    // Waits for a transition the control thread may be in the middle of.
    let mut host = shared.host.lock().unwrap_or_else(|e| e.into_inner());
    match host.stage() {
        Stage::Detached | Stage::CleanedUp => {
            return unmounted(served);
        }
        Stage::Prepared => {}
    }
    let error = match served {
        // The pipeline has undone its mount already.
        Err(e) => {
            let _ = host.clean_up(sys, false);
            ControlError::from(e)
        }
        // Unmounted by someone else before the container started.
        Ok(()) => {
            let _ = host.clean_up(sys, true);
            ControlError::MountGone
        }
    };
    if host.stage() == Stage::CleanedUp {
        drop(host);
        shared.disarm();
    }
    Err(tell_error(control, error))
}

/// Talk to the launcher on a thread of its own, so that serving goes on meanwhile.
fn start_control_thread(control: File, shared: Arc<Shared>, sys: LinuxHost, ends: Ends) {
    let thread_ends = ends.clone();
    let spawned = std::thread::Builder::new()
        .name("sifuse-control".into())
        .spawn(move || {
            let ends = thread_ends;
            let mut output = match control.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    return cannot_talk(&format!("cannot use the control stream: {e}"), &ends)
                }
            };
            let mut input = BufReader::new(control);
            let end = converse(&mut input, &mut output, &shared.host, &sys, &mut || {
                shared.disarm()
            });
            match end {
                ConversationEnd::Detached => {}
                // Unused, the unmounted file system goes at once and the session ends;
                // one still held somewhere is served a moment, not waited for.
                ConversationEnd::CleanedUp | ConversationEnd::LauncherGone => {
                    ends.after_grace(Ending::CleanedUp)
                }
                // The watcher, still armed, tries once more when this process is gone.
                ConversationEnd::CleanupFailed => ends.now(Ending::CleanupFailed),
            }
        });
    if let Err(e) = spawned {
        cannot_talk(&format!("cannot start the control thread: {e}"), &ends);
    }
}

/// Without a conversation nobody can start a container on the mount: end, so that the
/// launcher sees end of file and the still armed watcher removes the mount and the
/// directories.
fn cannot_talk(message: &str, ends: &Ends) {
    tracing::error!("{message}");
    ends.now(Ending::ControlLost);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::host::tests::{created, FakeHost};

    fn shared(host: HostCopy) -> Shared {
        Shared {
            host: Mutex::new(host),
            watcher: Mutex::new(None),
        }
    }

    #[test]
    fn a_failed_mount_removes_the_directories_and_reports() {
        let sys = FakeHost::default();
        let sh = shared(created(&sys));
        let mut out = Vec::new();
        let failed = Err(MountError::DaemonFailed("no such image".into()));
        let err = finish(failed, &sh, &sys, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "no such image");
        assert_eq!(out, b"error no such image\n");
        // The pipeline undid its mount: no unmount, only the directories.
        assert_eq!(
            sys.calls()[2..],
            ["rmdir /t/sifuse-abc123/root", "rmdir /t/sifuse-abc123"]
        );
        assert_eq!(sh.host.lock().unwrap().stage(), Stage::CleanedUp);
    }

    #[test]
    fn a_mount_gone_before_started_is_an_error() {
        let sys = FakeHost::default();
        let sh = shared(created(&sys));
        let mut out = Vec::new();
        let err = finish(Ok(()), &sh, &sys, &mut out).unwrap_err();
        assert!(matches!(err, ControlError::MountGone));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "error the mount went away before the container started\n"
        );
        assert_eq!(sys.calls()[2], "umount -l /t/sifuse-abc123/root");
        assert_eq!(sys.calls().len(), 5);
    }

    #[test]
    fn after_detach_or_cleanup_the_end_of_the_mount_is_success() {
        let sys = FakeHost::default();
        let mut host = created(&sys);
        host.detach(&sys).unwrap();
        let sh = shared(host);
        let mut out = Vec::new();
        assert_eq!(
            finish(Ok(()), &sh, &sys, &mut out).unwrap(),
            Ending::Unmounted
        );
        let mut host = created(&sys);
        host.clean_up(&sys, true).unwrap();
        assert_eq!(
            finish(Ok(()), &shared(host), &sys, &mut out).unwrap(),
            Ending::Unmounted
        );
        assert!(out.is_empty(), "nothing more to say: {out:?}");
        assert_eq!(sys.calls().len(), 10, "no further calls: {:?}", sys.calls());
        // Serving failed after the container started: an error, but nothing to tell.
        let failed = Err(MountError::Serve(std::io::Error::other("broken")));
        let mut host = created(&sys);
        host.detach(&sys).unwrap();
        let err = finish(failed, &shared(host), &sys, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "serving the mount failed: broken");
        assert!(out.is_empty());
    }
}
