//! `sifuse mount --control-fd FD`: the server side of the launcher protocol. Make the
//! private directory (unless given a mount point), fork the cleanup watcher, mount in the
//! foreground, then let a control thread talk to the launcher while the main thread
//! serves until the kernel ends the connection.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::mount::options::MountOptions;
use crate::mount::sys::{MountId, MountSyscalls};
use crate::mount::{self, MountRequest};

use super::handoff::{self, HandOff};
use super::host::{temp_base, HostCopy, HostSyscalls, LinuxHost, Stage};
use super::protocol::{converse, error_line, Ending};
use super::watcher::{self, Watcher};
use super::LauncherError;

/// After cleanup, how long to keep serving copies someone still holds before exiting.
const CLEANUP_GRACE: Duration = Duration::from_secs(1);

/// What `sifuse mount --control-fd` was asked.
#[derive(Debug, Clone)]
pub struct ServerRequest {
    pub image: PathBuf,
    pub options: MountOptions,
    /// The launcher's mount point; sifuse makes a private one when there is none.
    pub mountpoint: Option<PathBuf>,
    /// The inherited control stream.
    pub control_fd: RawFd,
    /// How the mount reaches the launcher: by path on the host, or by descriptor.
    pub handoff: HandOff,
}

/// State the control thread and the serving thread share.
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

/// Take the inherited control descriptor: it must be open, and no helper this process
/// starts (fusermount3) may inherit it, or the launcher would not see end of file when
/// sifuse dies.
fn take_control(fd: RawFd) -> Result<File, LauncherError> {
    let bad = |reason: String| LauncherError::Control { fd, reason };
    if fd < 3 {
        return Err(bad(
            "must be 3 or above (0-2 are the standard streams)".into()
        ));
    }
    // SAFETY: fcntl on a number; it fails with EBADF when nothing is open there.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == -1 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: the launcher handed this descriptor to this process, which from here on is
    // its only user.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Run the server. Returns once the mount is gone; Err when the launcher was told `error`.
pub fn serve(req: ServerRequest, mount_sys: Arc<dyn MountSyscalls>) -> Result<(), LauncherError> {
    let mut control = take_control(req.control_fd)?;
    match req.handoff {
        HandOff::HostPath => {}
        HandOff::MountFd => {
            return handoff::serve_mount_fd(control, &req.image, &req.options, mount_sys)
        }
        HandOff::ServeFd => {
            return handoff::serve_received_fd(control, &req.image, &req.options, mount_sys)
        }
    }
    let host_sys = LinuxHost(mount_sys.clone());
    let fail = |control: &mut File, e: LauncherError| {
        let _ = control.write_all(error_line(&e.to_string()).as_bytes());
        Err(e)
    };
    let host = match &req.mountpoint {
        Some(p) => match p.canonicalize() {
            Ok(abs) => HostCopy::given(abs),
            Err(source) => {
                let e = LauncherError::Mountpoint {
                    path: p.clone(),
                    source,
                };
                return fail(&mut control, e);
            }
        },
        None => match temp_base()
            .map_err(|source| LauncherError::TempDir {
                path: "$TMPDIR".into(),
                source,
            })
            .and_then(|base| HostCopy::create(&host_sys, &base))
        {
            Ok(h) => h,
            Err(e) => return fail(&mut control, e),
        },
    };
    let watcher = match watcher::spawn(&host, &host_sys) {
        Ok(w) => w,
        Err(e) => {
            let mut host = host;
            let _ = host.clean_up(&host_sys, false);
            return fail(&mut control, LauncherError::Watcher(e));
        }
    };
    let mut options = req.options.clone();
    options.foreground = true;
    let mount_req = MountRequest {
        image: req.image.clone(),
        mountpoint: host.mountpoint().to_path_buf(),
        options,
    };
    let shared = Arc::new(Shared {
        host: Mutex::new(host),
        watcher: Mutex::new(Some(watcher)),
    });
    let (ended_tx, ended_rx) = mpsc::channel::<()>();
    let live = {
        let shared = shared.clone();
        let host_sys = host_sys.clone();
        let control = control.try_clone();
        move |_: &std::path::Path| match control {
            Ok(control) => start_control_thread(control, shared, host_sys, ended_rx),
            Err(e) => cannot_talk(&format!("cannot use the control stream: {e}")),
        }
    };
    // Which mount is ours: the host copy and the watcher learn it before it is attached
    // (where the kernel allows), so that neither ever unmounts anything else there.
    let created = {
        let shared = shared.clone();
        move |id: MountId| {
            shared
                .host
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_mount(id);
            if let Some(w) = &*shared.watcher.lock().unwrap_or_else(|e| e.into_inner()) {
                w.tell_mount(id);
            }
        }
    };
    let served = mount::mount_foreground(&mount_req, mount_sys, created, live);
    let _ = ended_tx.send(());
    finish(served, &shared, &host_sys, &mut control)
}

/// The mount has ended, or never began: decide from where the host copy stands.
fn finish(
    served: Result<(), mount::MountError>,
    shared: &Shared,
    sys: &dyn HostSyscalls,
    control: &mut impl Write,
) -> Result<(), LauncherError> {
    // Waits for a transition the control thread may be in the middle of.
    let mut host = shared.host.lock().unwrap_or_else(|e| e.into_inner());
    match host.stage() {
        Stage::Detached | Stage::CleanedUp => return served.map_err(LauncherError::from),
        Stage::Prepared => {}
    }
    let error = match served {
        // The mount layer has undone its mount already.
        Err(e) => {
            let _ = host.clean_up(sys, false);
            LauncherError::from(e)
        }
        // Unmounted by someone else before the container started.
        Ok(()) => {
            let _ = host.clean_up(sys, true);
            LauncherError::MountGone
        }
    };
    if host.stage() == Stage::CleanedUp {
        drop(host);
        shared.disarm();
    }
    let _ = control.write_all(error_line(&error.to_string()).as_bytes());
    Err(error)
}

/// Talk to the launcher on a thread of its own, so that serving goes on meanwhile.
fn start_control_thread(
    control: File,
    shared: Arc<Shared>,
    sys: LinuxHost,
    ended: mpsc::Receiver<()>,
) {
    let spawned = std::thread::Builder::new()
        .name("sifuse-control".into())
        .spawn(move || {
            let mut output = match control.try_clone() {
                Ok(c) => c,
                Err(e) => cannot_talk(&format!("cannot use the control stream: {e}")),
            };
            let mut input = BufReader::new(control);
            let ending = converse(&mut input, &mut output, &shared.host, &sys, &mut || {
                shared.disarm()
            });
            match ending {
                Ending::Detached => {}
                Ending::CleanedUp | Ending::LauncherGone => {
                    // Unused, the unmounted file system goes at once and the serving
                    // thread returns; one still held somewhere is not waited for.
                    if ended.recv_timeout(CLEANUP_GRACE).is_err() {
                        std::process::exit(0);
                    }
                }
                // The watcher, still armed, tries once more when this process is gone.
                Ending::CleanupFailed => std::process::exit(1),
            }
        });
    if let Err(e) = spawned {
        cannot_talk(&format!("cannot start the control thread: {e}"));
    }
}

/// Without a conversation nobody can start a container on the mount: exit, so that the
/// launcher sees end of file and the still armed watcher removes the mount and the
/// directories.
fn cannot_talk(message: &str) -> ! {
    tracing::error!("{message}");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::host::tests::{created, FakeHost};

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
        let failed = Err(mount::MountError::DaemonFailed("no such image".into()));
        let err = finish(failed, &sh, &sys, &mut out).unwrap_err();
        assert_eq!(err.to_string(), "no such image");
        assert_eq!(out, b"error no such image\n");
        // The mount layer undid its mount: no unmount, only the directories.
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
        assert!(matches!(err, LauncherError::MountGone));
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
        finish(Ok(()), &sh, &sys, &mut out).unwrap();
        let mut host = created(&sys);
        host.clean_up(&sys, true).unwrap();
        finish(Ok(()), &shared(host), &sys, &mut out).unwrap();
        assert!(out.is_empty(), "nothing more to say: {out:?}");
        assert_eq!(sys.calls().len(), 10, "no further calls: {:?}", sys.calls());
    }

    #[test]
    fn the_control_descriptor_must_be_open_and_not_a_standard_stream() {
        let err = take_control(1).unwrap_err().to_string();
        assert!(err.contains("must be 3 or above"), "{err}");
        let err = take_control(1_000_000).unwrap_err().to_string();
        assert!(err.contains("control descriptor 1000000"), "{err}");
    }
}
