//! The server: one pipeline from the options to why serving ended, for every way sifuse is
//! asked to serve an image — `sifuse mount IMAGE DIR`, squashfuse's command line, and the
//! hand-offs of launcher mode ([`crate::control`]).
//!
//! [`Server::run`] takes the same steps in the same order every time; a [`Role`] supplies
//! the few that differ (where the FUSE connection comes from, whom to tell that the mount
//! is live, what its end means to them):
//!
//! 1. **connect** (the role): a mount point, or a /dev/fuse descriptor to serve;
//! 2. **prepare**: check the options, open the image, build the file system;
//! 3. **attach**: mount on the directory (or take the descriptor someone else mounted),
//!    telling the role which mount was made, and start the FUSE session;
//! 4. **daemon**: where the role asks for one, fork; the caller's process waits for the
//!    daemon's word and ends with [`Ending::Daemonized`];
//! 5. **start serving**: the exit signals blocked in every thread, the request threads, a
//!    check that the mount answers, the notify pipe, the signal and idle-timeout threads;
//! 6. **announce**: the daemon's parent, then the role (a launcher hears `ready`,
//!    `ready-fd` or `serving`);
//! 7. **wait** for the first thing that ends serving — the kernel ending the connection,
//!    a signal, the idle timeout, the launcher — and let the role say what it means.
//!
//! A failure at any step undoes what the steps before made, reports `f` to the notify pipe
//! and the failure to the daemon's parent, and goes to the role, which tells its launcher.
//! Everything a caller can fix (options, image, mount point, /dev/fuse, permission) fails
//! before the daemon exists, with one clear message and nothing left mounted.
//!
//! Nothing here exits the process: [`Server::run`] returns an [`Ending`] or the error, and
//! `main` turns that into the exit status.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Session, SessionACL};
use nix::sys::signal::{SigSet, Signal};

use crate::archive::{Archive, FileKind, Inode};
use crate::fuse::access::Callers;
use crate::fuse::activity::Activity;
use crate::fuse::{ArchiveFs, Opens};
use crate::image::{self, ImageSpec};
use crate::source::remote::StoreConfig;

use super::attach::{self, Attachment};
use super::daemon::{self, Fork, Outcome};
use super::notify::NotifyPipe;
use super::options::{Access, MountOptions};
use super::spec::MountSpec;
use super::sys::{MountId, MountSyscalls};
use super::{idle, mountinfo, signals, MountError};

/// After a lazy unmount (a signal, a launcher's cleanup), how long copies of the mount that
/// someone still holds are served before the server ends anyway.
pub const LAZY_UNMOUNT_GRACE: Duration = Duration::from_secs(1);

/// Why a server ended without an error. `main` turns it into the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// This is the caller's process, and the daemon it forked reported the mount live.
    Daemonized,
    /// The kernel ended the connection: the mount is gone from every namespace.
    Unmounted,
    /// SIGTERM, SIGINT or SIGHUP: the mount was unmounted lazily.
    Signalled(Signal),
    /// The idle timeout passed on a mount someone else made (`/dev/fd/N`): ending the
    /// session is all this process can do. (A mount the server made is unmounted
    /// instead, and the server ends [`Ending::Unmounted`].)
    IdleTimeout,
    /// Launcher mode: the host copy was cleaned up, because the launcher asked or went
    /// away before the container started.
    CleanedUp,
    /// Launcher mode: cleaning up failed (the launcher was told); the cleanup watcher,
    /// still armed, tries again once this process is gone.
    CleanupFailed,
    /// Launcher mode: the control stream cannot be used, so nobody can start a container
    /// on the mount; the cleanup watcher removes it once this process is gone.
    ControlLost,
}

impl Ending {
    /// Whether the server did what it was asked (as opposed to ending because something
    /// failed, which the launcher or the log was told).
    pub fn is_success(self) -> bool {
        !matches!(self, Ending::CleanupFailed | Ending::ControlLost)
    }
}

/// Where the FUSE connection comes from.
#[derive(Debug)]
pub enum Connection {
    /// Mount on this directory; or, when it is `/dev/fd/N` naming an inherited /dev/fuse
    /// descriptor that someone else mounted, serve that.
    Path(PathBuf),
    /// Serve this /dev/fuse descriptor, on which someone else made (or will make) the
    /// mount.
    Descriptor(OwnedFd),
}

/// The steps that differ between the ways a server is asked to serve (see the module
/// documentation for where each comes in the pipeline).
pub trait Role {
    /// What [`Server::run`] returns on failure: the role's own errors and the mount's.
    type Error: From<MountError>;

    /// Take what the role starts with, and say where the FUSE connection comes from. A
    /// role reports its own failures here (nothing of the pipeline exists yet).
    fn connect(&mut self, server: &Server) -> Result<Connection, Self::Error>;

    /// The mount made at the role's path is `id`: heard before the mount is attached
    /// where the kernel allows ([`MountSyscalls::mount`]), right after otherwise.
    fn mount_made(&mut self, _id: MountId) {}

    /// Whether to become a daemon once the mount exists.
    fn daemonizes(&self, _options: &MountOptions) -> bool {
        false
    }

    /// The mount answers (at `mountpoint`, when the server mounted it on one). Anything
    /// the role starts that can end serving reports through `ends`.
    fn announce(&mut self, mountpoint: Option<&Path>, ends: Ends);

    /// Serving ended with the kernel ending the connection (Ok), or a step failed (Err,
    /// with the mount already undone): what the server's run returns.
    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, Self::Error>;
}

/// A role chosen at run time.
impl<R: Role + ?Sized> Role for Box<R> {
    type Error = R::Error;
    fn connect(&mut self, server: &Server) -> Result<Connection, R::Error> {
        (**self).connect(server)
    }
    fn mount_made(&mut self, id: MountId) {
        (**self).mount_made(id)
    }
    fn daemonizes(&self, options: &MountOptions) -> bool {
        (**self).daemonizes(options)
    }
    fn announce(&mut self, mountpoint: Option<&Path>, ends: Ends) {
        (**self).announce(mountpoint, ends)
    }
    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, R::Error> {
        (**self).finish(served)
    }
}

/// What a server was asked: the image and how to mount it.
pub struct Server {
    image: PathBuf,
    options: MountOptions,
    sys: Arc<dyn MountSyscalls>,
}

/// `sifuse mount IMAGE DIR` and squashfuse's command line: mount on DIR (or serve the
/// `/dev/fd/N` someone else mounted), as a daemon unless the options say foreground.
#[derive(Debug)]
pub struct Standalone {
    mountpoint: PathBuf,
}

impl Standalone {
    pub fn new(mountpoint: impl Into<PathBuf>) -> Standalone {
        Standalone {
            mountpoint: mountpoint.into(),
        }
    }
}

impl Role for Standalone {
    type Error = MountError;

    fn connect(&mut self, _: &Server) -> Result<Connection, MountError> {
        Ok(Connection::Path(self.mountpoint.clone()))
    }

    fn daemonizes(&self, options: &MountOptions) -> bool {
        !(options.foreground || options.debug)
    }

    fn announce(&mut self, _: Option<&Path>, _: Ends) {}

    fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, MountError> {
        served.map(|()| Ending::Unmounted)
    }
}

/// What ends serving; the first to arrive decides.
enum Event {
    /// The FUSE session ended: the kernel ended the connection (Ok), or serving failed.
    Session(io::Result<()>),
    /// End now, this way.
    Now(Ending),
    /// The mount was unmounted lazily: end this way, unless the session ends within
    /// [`LAZY_UNMOUNT_GRACE`] (the end of the session then decides).
    AfterGrace(Ending),
}

/// Where whatever can end serving reports it.
#[derive(Clone)]
pub struct Ends(Sender<Event>);

impl Ends {
    fn channel() -> (Ends, Receiver<Event>) {
        let (tx, rx) = mpsc::channel();
        (Ends(tx), rx)
    }

    /// Serving ends now, this way.
    pub fn now(&self, ending: Ending) {
        // The receiver lives as long as the server runs.
        let _ = self.0.send(Event::Now(ending));
    }

    /// The mount was unmounted lazily: serving ends this way unless the kernel ends the
    /// connection within [`LAZY_UNMOUNT_GRACE`]. An unused mount goes at once; one that
    /// others still use is not waited for longer.
    pub fn after_grace(&self, ending: Ending) {
        let _ = self.0.send(Event::AfterGrace(ending));
    }

    fn session_ended(&self, result: io::Result<()>) {
        let _ = self.0.send(Event::Session(result));
    }
}

/// How the wait ended.
enum Waited {
    Ending(Ending),
    Session(io::Result<()>),
}

/// Wait for the first thing that ends serving.
fn wait_for_end(events: &Receiver<Event>) -> Waited {
    let grace_ending = match events.recv() {
        Ok(Event::Session(result)) => return Waited::Session(result),
        Ok(Event::Now(ending)) => return Waited::Ending(ending),
        Ok(Event::AfterGrace(ending)) => ending,
        // Every sender gone: the session thread, which sends before it ends, is gone too.
        Err(_) => {
            return Waited::Session(Err(io::Error::other(
                "the FUSE session ended without a word",
            )))
        }
    };
    let deadline = Instant::now() + LAZY_UNMOUNT_GRACE;
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Session(result)) => return Waited::Session(result),
            Ok(Event::Now(ending)) => return Waited::Ending(ending),
            Ok(Event::AfterGrace(_)) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return Waited::Ending(grace_ending)
            }
        }
    }
}

/// The mount point checked: a directory, or an inherited /dev/fuse descriptor.
enum Target {
    Directory(PathBuf),
    Inherited(OwnedFd),
}

/// The mount point, absolute and checked, or the `/dev/fd/N` FUSE descriptor it names.
fn check_mountpoint(path: &Path) -> Result<Target, MountError> {
    if let Some(fd) = attach::take_inherited_fuse_fd(path) {
        return Ok(Target::Inherited(fd));
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
    Ok(Target::Directory(abs))
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

/// A FUSE session on an attached file system, not yet serving.
struct Mounted {
    session: Session<ArchiveFs>,
    attachment: Attachment,
    activity: Arc<Activity>,
    root_number: u32,
}

/// Remove a mount this run made, after a failure.
fn undo(sys: &dyn MountSyscalls, attachment: &Attachment) {
    if let Err(e) = attach::unmount(sys, attachment, true) {
        tracing::error!("cannot unmount after the failure: {e}");
    }
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

impl Server {
    /// A server of `image` as `options` ask, making its kernel calls through `sys`.
    pub fn new(
        image: impl Into<PathBuf>,
        options: MountOptions,
        sys: Arc<dyn MountSyscalls>,
    ) -> Self {
        Server {
            image: image.into(),
            options,
            sys,
        }
    }

    /// The image to serve.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// How to mount and serve it.
    pub fn options(&self) -> &MountOptions {
        &self.options
    }

    /// The kernel calls mounting makes.
    pub fn sys(&self) -> &Arc<dyn MountSyscalls> {
        &self.sys
    }

    /// Serve in `role` until the mount goes away (see the module documentation).
    pub fn run<R: Role>(self, mut role: R) -> Result<Ending, R::Error> {
        let connection = role.connect(&self)?;
        let notify = self.options.notify_pipe.as_ref().map(NotifyPipe::new);
        let tell_failure = || {
            if let Some(n) = &notify {
                n.failed();
            }
        };
        let mounted = match self.mount(connection, &mut |id| role.mount_made(id)) {
            Ok(mounted) => mounted,
            Err(e) => {
                tell_failure();
                return role.finish(Err(e));
            }
        };
        let readiness = if role.daemonizes(&self.options) {
            match daemon::daemonize() {
                Ok(Fork::Parent(wait)) => {
                    // The daemon holds its own copy of the FUSE descriptor; this one goes.
                    drop(mounted);
                    return match wait.wait() {
                        Outcome::Ready => Ok(Ending::Daemonized),
                        Outcome::Failed(msg) => Err(MountError::DaemonFailed(msg).into()),
                    };
                }
                Ok(Fork::Daemon(readiness)) => Some(readiness),
                Err(e) => {
                    undo(&*self.sys, &mounted.attachment);
                    tell_failure();
                    return role.finish(Err(MountError::Daemon(e)));
                }
            }
        } else {
            None
        };
        let (ends, events) = Ends::channel();
        let attachment = Arc::new(mounted.attachment);
        let started = self.start_serving(
            mounted.session,
            &attachment,
            mounted.activity,
            mounted.root_number,
            notify.as_ref(),
            &ends,
        );
        if let Err(e) = started {
            undo(&*self.sys, &attachment);
            tell_failure();
            if let Some(readiness) = readiness {
                readiness.failed(&e.to_string());
            }
            return role.finish(Err(e));
        }
        if let Some(readiness) = readiness {
            readiness.ready();
        }
        role.announce(attachment.path(), ends);
        match wait_for_end(&events) {
            Waited::Ending(ending) => Ok(ending),
            Waited::Session(Ok(())) => role.finish(Ok(())),
            Waited::Session(Err(e)) => {
                undo(&*self.sys, &attachment);
                role.finish(Err(MountError::Serve(e)))
            }
        }
    }

    /// Steps 2 and 3: everything up to an attached mount with its FUSE session started.
    /// `mount_made` hears the identity of a mount made on a directory.
    fn mount(
        &self,
        connection: Connection,
        mount_made: &mut dyn FnMut(MountId),
    ) -> Result<Mounted, MountError> {
        let opts = &self.options;
        let sys = &*self.sys;
        opts.validate()?;
        let owners = opts.owners()?;
        let target = match connection {
            Connection::Path(path) => check_mountpoint(&path)?,
            Connection::Descriptor(fd) => Target::Inherited(fd),
        };
        let image_spec = ImageSpec {
            path: self.image.clone(),
            offset: opts.offset,
            partition: opts.partition.clone(),
            cache: opts.chunk_cache.clone(),
            store: StoreConfig::from_options(opts.registry_auth.as_deref(), opts.no_https),
        };
        // The process is about to become a long-running server: tune its allocator once,
        // before the image's readers and the serving threads start (see the function).
        crate::cache::tune_for_serving();
        let img = image::open(&image_spec, opts.cache_bytes())?;
        let root = served_root(&img.archive, opts.subdir.as_deref())?;
        let root_number = root.number;
        let activity = Arc::new(Activity::default());
        // Who may use the mount: the kernel lets in only the owner unless allow_other is
        // set on the mount, which everyone and, for an owner who is not root, allow_root
        // need; then the server refuses the callers the options do not admit, and must be
        // asked on every access. A /dev/fuse descriptor someone else mounted may carry
        // allow_other.
        let owner = sys.user_and_group();
        let inherited = matches!(target, Target::Inherited(_));
        let callers = match opts.access() {
            Access::Owner => Callers::Owner(owner.0),
            Access::OwnerAndRoot => Callers::OwnerAndRoot(owner.0),
            Access::Everyone => Callers::Anyone,
        };
        let server_decides = opts.access() == Access::OwnerAndRoot
            && (inherited || opts.access().kernel_allows_others(owner.0));
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

        let (fd, attachment, shown) = match target {
            Target::Directory(path) => {
                let spec = MountSpec::new(&self.image, opts, owner);
                let (fd, attachment) =
                    attach::attach(sys, &path, &spec, mount_made).map_err(|source| {
                        MountError::Attach {
                            path: path.clone(),
                            source,
                        }
                    })?;
                (fd, attachment, path)
            }
            Target::Inherited(fd) => {
                let shown = PathBuf::from(format!("/dev/fd/{}", fd.as_raw_fd()));
                (fd, Attachment::Inherited, shown)
            }
        };

        // Callers are checked by the adapter, against the mount's owner (the real uid, which
        // the kernel was given); fuser's own check would compare with the effective one.
        let acl = SessionACL::All;
        let mut config = fuser::Config::default();
        config.acl = acl;
        config.n_threads = Some(opts.thread_count());
        config.clone_fd = true;
        let pusher = fs.pusher();
        let session = Session::from_fd(fs, fd, acl, config).map_err(|source| {
            undo(sys, &attachment);
            MountError::Handshake {
                path: shown,
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

    /// Step 5: everything between a started session and a mount reported live.
    fn start_serving(
        &self,
        session: Session<ArchiveFs>,
        attachment: &Arc<Attachment>,
        activity: Arc<Activity>,
        root_number: u32,
        notify: Option<&NotifyPipe>,
        ends: &Ends,
    ) -> Result<(), MountError> {
        // Before any thread exists, so that every thread inherits the blocked mask.
        let signals = signals::block_exit_signals().map_err(MountError::Serve)?;
        spawn_session(session, ends.clone())?;
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
        spawn_signal_handler(signals, self.sys.clone(), attachment.clone(), ends.clone())?;
        if let Some(timeout) = self.options.idle_timeout() {
            spawn_idle_timer(
                timeout,
                activity,
                self.sys.clone(),
                attachment.clone(),
                ends.clone(),
            )?;
        }
        Ok(())
    }
}

/// Serve requests on the session's threads; report when the kernel ends the connection.
fn spawn_session(session: Session<ArchiveFs>, ends: Ends) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name("sifuse-session".into())
        .spawn(move || ends.session_ended(session.run()))
        .map(drop)
        .map_err(MountError::Serve)
}

/// On SIGTERM, SIGINT or SIGHUP: unmount lazily, and end.
fn spawn_signal_handler(
    signals: SigSet,
    sys: Arc<dyn MountSyscalls>,
    attachment: Arc<Attachment>,
    ends: Ends,
) -> Result<(), MountError> {
    signals::spawn_signal_thread(signals, move |signal| {
        tracing::info!("{signal}: unmounting");
        if let Err(e) = attach::unmount(&*sys, &attachment, true) {
            tracing::error!("cannot unmount: {e}");
        }
        match attachment.path() {
            Some(_) => ends.after_grace(Ending::Signalled(signal)),
            // Someone else's mount: ending the session is all this process can do.
            None => ends.now(Ending::Signalled(signal)),
        }
    })
    .map(drop)
    .map_err(MountError::Serve)
}

/// After `timeout` without requests and with nothing open: unmount (the session then
/// ends by itself), or end a session on someone else's mount.
fn spawn_idle_timer(
    timeout: Duration,
    activity: Arc<Activity>,
    sys: Arc<dyn MountSyscalls>,
    attachment: Arc<Attachment>,
    ends: Ends,
) -> Result<(), MountError> {
    std::thread::Builder::new()
        .name("sifuse-idle".into())
        .spawn(move || {
            idle::watch(&activity, timeout, || {
                attach::unmount(&*sys, &attachment, false)
            });
            if attachment.path().is_none() {
                ends.now(Ending::IdleTimeout);
            }
        })
        .map(drop)
        .map_err(MountError::Serve)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mount::attach::tests::FakeSys;

    /// Somewhere for a role's ends to go, for tests of a role alone.
    pub(crate) fn ends() -> Ends {
        Ends::channel().0
    }

    fn run(
        image: &Path,
        mountpoint: &Path,
        options: MountOptions,
        sys: Arc<FakeSys>,
    ) -> Result<Ending, MountError> {
        Server::new(image, options, sys).run(Standalone::new(mountpoint))
    }

    #[test]
    fn bad_input_fails_before_anything_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let not_an_image = dir.path().join("img");
        std::fs::write(&not_an_image, vec![0u8; 4096]).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let both = MountOptions {
            allow_other: true,
            allow_root: true,
            ..Default::default()
        };
        let default = MountOptions::default;
        let cases: Vec<(&Path, PathBuf, MountOptions, &str)> = vec![
            (
                &not_an_image,
                dir.path().join("absent"),
                default(),
                "mount point",
            ),
            (&not_an_image, file.clone(), default(), "not a directory"),
            (
                &not_an_image,
                dir.path().into(),
                default(),
                "not a SIF or SquashFS image",
            ),
            (
                Path::new("/nonexistent/absent.sqfs"),
                dir.path().into(),
                default(),
                "absent.sqfs",
            ),
            // The options are checked first, even with no mount point.
            (
                &not_an_image,
                dir.path().join("absent"),
                both,
                "cannot be combined",
            ),
        ];
        for (image, mountpoint, options, expected) in cases {
            let sys = Arc::new(FakeSys {
                root: true,
                ..Default::default()
            });
            let err = run(image, &mountpoint, options, sys.clone())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
            assert!(!err.contains('\n'), "one line: {err:?}");
            assert!(sys.calls().is_empty(), "nothing mounted: {:?}", sys.calls());
        }
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
        let options = MountOptions {
            notify_pipe: Some(fifo),
            ..Default::default()
        };
        let image = dir.path().join("absent.sqfs");
        assert!(run(&image, dir.path(), options, Arc::new(FakeSys::default())).is_err());
        assert_eq!(reader.join().unwrap(), b"f");
    }

    /// A role whose mount point does not exist; it records what the pipeline told it.
    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

    impl Role for Recorder {
        type Error = MountError;
        fn connect(&mut self, _: &Server) -> Result<Connection, MountError> {
            Ok(Connection::Path("/nonexistent/mountpoint".into()))
        }
        fn announce(&mut self, _: Option<&Path>, _: Ends) {
            panic!("nothing was mounted");
        }
        fn finish(&mut self, served: Result<(), MountError>) -> Result<Ending, MountError> {
            let told = format!("{:?}", served.as_ref().map_err(|e| e.to_string()));
            self.0.lock().unwrap().push(told);
            served.map(|()| Ending::Unmounted)
        }
    }

    /// A failure before the mount exists goes to the role, which tells its launcher.
    #[test]
    fn a_failure_before_mounting_goes_to_the_role() {
        let told = Arc::default();
        let sys = Arc::new(FakeSys::default());
        let err = Server::new("/nonexistent/img", MountOptions::default(), sys.clone())
            .run(Recorder(Arc::clone(&told)))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("mount point /nonexistent/mountpoint"),
            "{err}"
        );
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(told[0].contains("mount point"), "{told:?}");
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn the_first_end_decides_and_a_lazy_unmount_waits_for_the_session() {
        let (ends, events) = Ends::channel();
        ends.now(Ending::ControlLost);
        ends.session_ended(Ok(()));
        assert!(matches!(
            wait_for_end(&events),
            Waited::Ending(Ending::ControlLost)
        ));
        // Lazily unmounted, and the session ends within the grace: the session decides.
        let (ends, events) = Ends::channel();
        ends.after_grace(Ending::CleanedUp);
        let late = ends.clone();
        let session = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.session_ended(Err(io::Error::other("broken")));
        });
        assert!(matches!(wait_for_end(&events), Waited::Session(Err(_))));
        session.join().unwrap();
        // Held by someone: the grace passes, and the lazy ending stands.
        let (ends, events) = Ends::channel();
        ends.after_grace(Ending::Signalled(Signal::SIGTERM));
        let start = Instant::now();
        assert!(matches!(
            wait_for_end(&events),
            Waited::Ending(Ending::Signalled(Signal::SIGTERM))
        ));
        assert!(start.elapsed() >= LAZY_UNMOUNT_GRACE);
        drop(ends);
        // Nobody left to report: an error, not a hang.
        let (ends, events) = Ends::channel();
        drop(ends);
        assert!(matches!(wait_for_end(&events), Waited::Session(Err(_))));
    }

    #[test]
    fn failures_are_not_successes() {
        assert!(Ending::Unmounted.is_success() && Ending::CleanedUp.is_success());
        assert!(!Ending::CleanupFailed.is_success() && !Ending::ControlLost.is_success());
    }
}
