//! `sifuse mount`: open the image, mount it, become a daemon unless asked to stay in the
//! foreground, serve until the mount goes away, and end it on SIGTERM, SIGINT, SIGHUP or
//! after an idle timeout.
//!
//! Everything that can fail for a reason the caller can fix (options, image, mount point,
//! /dev/fuse, mount permission) fails before the daemon exists, with one clear message,
//! a non-zero exit and nothing left mounted.

pub mod attach;
pub mod daemon;
pub mod detached;
pub mod idle;
pub mod mountinfo;
pub mod notify;
pub mod options;
pub mod signals;
pub mod sys;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Session, SessionACL};

use crate::archive::{Archive, FileKind, Inode};
use crate::fuse::access::Callers;
use crate::fuse::activity::Activity;
use crate::fuse::{ArchiveFs, Opens};
use crate::image::{self, ImageSpec};

use attach::{Attachment, MountSpec};
use daemon::{Outcome, Readiness, Role};
use notify::NotifyPipe;
use options::{Access, MountOptions, OptionError};
use sys::{MountFlags, MountId, MountSyscalls};

/// The subtype mountinfo shows (`fuse.sifuse`) unless the options name another.
pub const DEFAULT_SUBTYPE: &str = "sifuse";

/// How long a signalled server waits for its lazily unmounted mount to go before exiting.
const SIGNAL_GRACE: Duration = Duration::from_secs(1);

/// What to mount where.
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

/// The served root: the archive's root, or the directory `subdir` names inside it.
pub fn served_root(archive: &Archive, subdir: Option<&str>) -> crate::Result<Inode> {
    let Some(path) = subdir.filter(|p| !p.trim_matches('/').is_empty()) else {
        return Ok(archive.root().clone());
    };
    let inode = archive.resolve(path.as_bytes())?;
    if inode.kind != FileKind::Directory {
        return Err(crate::Error::NotADirectory(path.to_string()));
    }
    Ok(inode)
}

/// The mount point, absolute and checked, or a `/dev/fd/N` FUSE descriptor as given.
fn check_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    if attach::is_inherited_fuse_fd(path) {
        return Ok(path.to_path_buf());
    }
    let bad = |reason: String| MountError::Mountpoint {
        path: path.to_path_buf(),
        reason,
    };
    let abs = path.canonicalize().map_err(|e| bad(e.to_string()))?;
    let meta = abs.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    Ok(abs)
}

/// A live FUSE session on a mounted file system, not yet serving.
struct Mounted {
    session: Session<ArchiveFs>,
    attachment: Attachment,
    activity: Arc<Activity>,
    root_number: u32,
}

/// Everything up to a mounted, handshaken session. `created` hears the identity of the
/// mount made, as early as the kernel allows (see [`MountSyscalls::mount`]).
fn prepare(
    req: &MountRequest,
    sys: &dyn MountSyscalls,
    created: &mut dyn FnMut(MountId),
) -> Result<Mounted, MountError> {
    let opts = &req.options;
    opts.validate()?;
    let owners = opts.owners()?;
    let mountpoint = check_mountpoint(&req.mountpoint)?;
    let spec = ImageSpec {
        path: req.image.clone(),
        offset: opts.offset,
        partition: opts.partition.clone(),
        cache: opts.chunk_cache.clone(),
        store: None,
    };
    let img = image::open(&spec, opts.cache_bytes())?;
    let root = served_root(&img.archive, opts.subdir.as_deref())?;
    let root_number = root.number;
    let activity = Arc::new(Activity::default());
    // Who may use the mount: the kernel lets in only the owner unless allow_other is
    // set on the mount, which everyone and, for an owner who is not root, allow_root need;
    // then the server refuses the callers the options do not admit, and must be asked on
    // every access. A /dev/fuse descriptor someone else mounted may carry allow_other.
    let owner = sys.user_and_group().0;
    let inherited = attach::is_inherited_fuse_fd(&mountpoint);
    let callers = match opts.access() {
        Access::Owner => Callers::Owner(owner),
        Access::OwnerAndRoot => Callers::OwnerAndRoot(owner),
        Access::Everyone => Callers::Anyone,
    };
    let server_decides = opts.access() == Access::OwnerAndRoot
        && (inherited || opts.access().kernel_allows_others(owner));
    // The idle timeout counts open files, so only under one are opens asked for; and
    // where the server decides who gets in, so that each open is checked too.
    let opens = match opts.idle_timeout() {
        Some(_) => Opens::Counted,
        None if server_decides => Opens::Counted,
        None => Opens::Unasked,
    };
    let mut fs = ArchiveFs::new(img.archive, root, owners, opens, activity.clone())?;
    fs.admit_only(callers);
    fs.release_when_idle(opts.idle_release());
    if server_decides {
        fs.revalidate_every_access();
    }

    let source = match &opts.fsname {
        Some(name) => name.clone(),
        // A remote image: its address, without credentials.
        None if img.located.remote.is_some() => img.located.name.clone(),
        None => std::path::absolute(&req.image)
            .unwrap_or_else(|_| req.image.clone())
            .display()
            .to_string(),
    };
    let spec = MountSpec {
        source,
        subtype: opts
            .subtype
            .clone()
            .unwrap_or_else(|| DEFAULT_SUBTYPE.into()),
        flags: MountFlags {
            nosuid: !opts.suid,
            nodev: !opts.dev,
        },
        access: opts.access(),
    };
    let (fd, attachment) =
        attach::attach(sys, &mountpoint, &spec, created).map_err(|source| MountError::Attach {
            path: mountpoint.clone(),
            source,
        })?;

    // Callers are checked by the adapter, against the mount's owner (the real uid, which the
    // kernel was given); fuser's own check would compare with the effective one.
    let acl = SessionACL::All;
    let mut config = fuser::Config::default();
    config.acl = acl;
    config.n_threads = Some(opts.thread_count());
    config.clone_fd = true;
    let pusher = fs.pusher();
    let session = Session::from_fd(fs, fd, acl, config).map_err(|source| {
        undo(sys, &attachment);
        MountError::Handshake {
            path: mountpoint.clone(),
            source,
        }
    })?;
    pusher.connect(session.notifier());
    Ok(Mounted {
        session,
        attachment,
        activity,
        root_number,
    })
}

/// Remove a mount this run made, after a failure.
fn undo(sys: &dyn MountSyscalls, attachment: &Attachment) {
    if let Err(e) = attach::detach(sys, attachment, true) {
        tracing::error!("cannot unmount after the failure: {e}");
    }
}

/// Mount as `req` asks and serve until the mount goes away. In daemon mode the caller's
/// process returns once the daemon reports the mount live (Ok) or failed (Err).
pub fn mount(req: &MountRequest, sys: Arc<dyn MountSyscalls>) -> Result<(), MountError> {
    let notify = req.options.notify_pipe.as_ref().map(NotifyPipe::new);
    let mounted = prepare(req, &*sys, &mut |_| {}).inspect_err(|_| {
        if let Some(n) = &notify {
            n.failed();
        }
    })?;
    let report = if req.options.foreground || req.options.debug {
        Live::Quiet
    } else {
        match daemon::daemonize() {
            Ok(Role::Parent(wait)) => {
                // The daemon holds its own copy of the FUSE descriptor; this one goes.
                drop(mounted);
                return match wait.wait() {
                    Outcome::Ready => Ok(()),
                    Outcome::Failed(msg) => Err(MountError::DaemonFailed(msg)),
                };
            }
            Ok(Role::Daemon(report)) => Live::Daemon(report),
            Err(e) => {
                undo(&*sys, &mounted.attachment);
                if let Some(n) = &notify {
                    n.failed();
                }
                return Err(MountError::Daemon(e));
            }
        }
    };
    serve(mounted, &req.options, sys, notify, report)
}

/// Mount in the foreground, call `live` with the mount point once the mount answers (on
/// the calling thread, before serving goes on), then serve until the kernel ends the
/// connection: the last copy of the mount, in any mount namespace, is gone. For launchers
/// ([`crate::launcher`]), which detach and clean up the host copy from another thread
/// with [`attach::unmount_exact`]: `created` tells them which mount is theirs, before it
/// is attached where the kernel allows.
pub fn mount_foreground(
    req: &MountRequest,
    sys: Arc<dyn MountSyscalls>,
    mut created: impl FnMut(MountId),
    live: impl FnOnce(&Path) + Send + 'static,
) -> Result<(), MountError> {
    let notify = req.options.notify_pipe.as_ref().map(NotifyPipe::new);
    let mounted = prepare(req, &*sys, &mut created).inspect_err(|_| {
        if let Some(n) = &notify {
            n.failed();
        }
    })?;
    serve(
        mounted,
        &req.options,
        sys,
        notify,
        Live::Call(Box::new(live)),
    )
}

/// Whom to tell that the mount is live.
enum Live {
    /// Nobody (foreground mode; the notify pipe, if any, is told separately).
    Quiet,
    /// The parent waiting for the daemon.
    Daemon(Readiness),
    /// A launcher's callback, with the mount point.
    Call(Box<dyn FnOnce(&Path) + Send>),
}

/// Check that the mount point now shows the served root, answered by this process.
fn check_answers(path: &Path, root_number: u32) -> Result<(), MountError> {
    let not = |reason: String| MountError::NotAnswering {
        path: path.to_path_buf(),
        reason,
    };
    let meta = path.metadata().map_err(|e| not(e.to_string()))?;
    if meta.ino() != u64::from(root_number) {
        return Err(not(format!(
            "it shows inode {}, not the image root {root_number}",
            meta.ino()
        )));
    }
    Ok(())
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

/// Start the request threads, confirm the mount answers, report, then serve until the
/// mount goes away.
fn serve(
    mounted: Mounted,
    opts: &MountOptions,
    sys: Arc<dyn MountSyscalls>,
    notify: Option<NotifyPipe>,
    report: Live,
) -> Result<(), MountError> {
    let Mounted {
        session,
        attachment,
        activity,
        root_number,
    } = mounted;
    let attachment = Arc::new(attachment);
    let started = start_serving(
        session,
        opts,
        &sys,
        &attachment,
        activity,
        root_number,
        notify.as_ref(),
    );
    let running = match started {
        Ok(running) => running,
        Err(e) => {
            undo(&*sys, &attachment);
            if let Some(n) = &notify {
                n.failed();
            }
            if let Live::Daemon(r) = report {
                r.failed(&e.to_string());
            }
            return Err(e);
        }
    };
    match report {
        Live::Quiet => {}
        Live::Daemon(r) => r.ready(),
        Live::Call(live) => live(attachment.path().unwrap_or(Path::new(""))),
    }
    // Returns once the kernel ends the connection: the mount is gone.
    running.join().map_err(|e| {
        undo(&*sys, &attachment);
        MountError::Serve(e)
    })
}

/// Everything between a handshaken session and a mount reported live.
fn start_serving(
    session: Session<ArchiveFs>,
    opts: &MountOptions,
    sys: &Arc<dyn MountSyscalls>,
    attachment: &Arc<Attachment>,
    activity: Arc<Activity>,
    root_number: u32,
    notify: Option<&NotifyPipe>,
) -> Result<BackgroundSession, MountError> {
    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = signals::block_exit_signals().map_err(MountError::Serve)?;
    let running = session.spawn().map_err(MountError::Serve)?;
    if let Some(path) = attachment.path() {
        if let Err(e) = check_answers(path, root_number) {
            // A client may use the mount and unmount it before this thread gets to look
            // (a busy machine, a launcher polling mountinfo): requests served and the
            // mount already gone mean it was live, and serving ends as for any unmount.
            let was_live = activity.requests() > 0
                && mountinfo::line_at(path).is_ok_and(|line| line.is_none());
            if !was_live {
                return Err(e);
            }
            tracing::debug!("the mount was used and unmounted before it was checked");
        }
    }
    if let Some(n) = notify {
        n.ready().map_err(|source| MountError::NotifyPipe {
            path: n.path().to_path_buf(),
            source,
        })?;
    }
    spawn_signal_watcher(signals, sys.clone(), attachment.clone())?;
    if let Some(timeout) = opts.idle_timeout() {
        spawn_idle_watcher(timeout, activity, sys.clone(), attachment.clone())?;
    }
    Ok(running)
}

/// On SIGTERM, SIGINT or SIGHUP: detach the mount lazily and exit.
fn spawn_signal_watcher(
    signals: nix::sys::signal::SigSet,
    sys: Arc<dyn MountSyscalls>,
    attachment: Arc<Attachment>,
) -> Result<(), MountError> {
    signals::spawn_watcher(signals, move |signal| {
        tracing::info!("{signal}: unmounting");
        if let Err(e) = attach::detach(&*sys, &attachment, true) {
            tracing::error!("cannot unmount: {e}");
        }
        // Unused, the detached file system goes at once and the session ends by itself;
        // one that others still use stays until they let go, which is not waited for.
        if attachment.path().is_some() {
            std::thread::sleep(SIGNAL_GRACE);
        }
        std::process::exit(0);
    })
    .map(drop)
    .map_err(MountError::Serve)
}

/// After `timeout` without requests and with nothing open: unmount.
fn spawn_idle_watcher(
    timeout: Duration,
    activity: Arc<Activity>,
    sys: Arc<dyn MountSyscalls>,
    attachment: Arc<Attachment>,
) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name("sifuse-idle".into())
        .spawn(move || {
            idle::watch(&activity, timeout, || match attachment.path() {
                Some(_) => attach::detach(&*sys, &attachment, false),
                // Someone else's mount: ending the session is all this process can do.
                None => std::process::exit(0),
            })
        })
        .map(drop)
        .map_err(MountError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use attach::tests::FakeSys;

    fn request(image: &Path, mountpoint: &Path) -> MountRequest {
        MountRequest {
            image: image.into(),
            mountpoint: mountpoint.into(),
            options: MountOptions::default(),
        }
    }

    #[test]
    fn bad_input_fails_before_anything_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let not_an_image = dir.path().join("img");
        std::fs::write(&not_an_image, vec![0u8; 4096]).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let cases: Vec<(MountRequest, &str)> = vec![
            (
                request(&not_an_image, &dir.path().join("absent")),
                "mount point",
            ),
            (request(&not_an_image, &file), "not a directory"),
            (
                request(&not_an_image, dir.path()),
                "not a SIF or SquashFS image",
            ),
            (
                request(&dir.path().join("absent.sqfs"), dir.path()),
                "absent.sqfs",
            ),
            (
                MountRequest {
                    options: MountOptions {
                        allow_other: true,
                        allow_root: true,
                        ..Default::default()
                    },
                    ..request(&not_an_image, dir.path())
                },
                "cannot be combined",
            ),
        ];
        for (req, expected) in cases {
            let sys = Arc::new(FakeSys {
                root: true,
                ..Default::default()
            });
            let err = mount(&req, sys.clone()).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
            assert!(sys.calls().is_empty(), "nothing mounted: {:?}", sys.calls());
        }
    }

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

    #[test]
    fn failures_report_f_to_the_notify_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("notify");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let mut req = request(&dir.path().join("absent.sqfs"), dir.path());
        req.options.notify_pipe = Some(fifo);
        assert!(mount(&req, Arc::new(FakeSys::default())).is_err());
        assert_eq!(reader.join().unwrap(), b"f");
    }
}
