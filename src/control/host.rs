//! The host copy of a launcher's mount: the directories sifuse made for it, and the two
//! ways it ends — detached once the container holds its own copy, or cleaned up when the
//! container never started. The kernel calls sit behind [`HostSyscalls`], so every
//! transition, including each call failing, is unit-tested without privileges.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::mount::attach;
use crate::mount::sys::{MountId, MountSyscalls};

use super::ControlError;

/// The name of the directory sifuse mounts on inside its private directory.
pub const ROOT_DIR: &str = "root";

/// What the host side of the protocol asks of the system.
pub trait HostSyscalls: Send + Sync {
    /// Create a fresh directory from `template` (ending in `XXXXXX`), mode 0700.
    fn mkdtemp(&self, template: &Path) -> io::Result<PathBuf>;
    /// Create one directory, mode 0700.
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Remove one empty directory.
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// Detach mount `id` at `path` lazily: umount2(MNT_DETACH) as root, `fusermount3 -u
    /// -z` otherwise. Ok(false), with nothing done, when what is at `path` is not that
    /// mount (see [`attach::unmount_exact`]).
    fn unmount_lazy(&self, path: &Path, id: MountId) -> io::Result<bool>;
}

/// The real calls; unmounting goes through the mount layer's syscalls.
#[derive(Clone)]
pub struct LinuxHost(pub Arc<dyn MountSyscalls>);

impl HostSyscalls for LinuxHost {
    fn mkdtemp(&self, template: &Path) -> io::Result<PathBuf> {
        nix::unistd::mkdtemp(template).map_err(io::Error::from)
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn unmount_lazy(&self, path: &Path, id: MountId) -> io::Result<bool> {
        attach::unmount_exact(&*self.0, path, id, true)
    }
}

/// Where the host copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Directories made; the mount may or may not exist yet.
    Prepared,
    /// The host copy is detached and the directories removed: the container holds the
    /// only copy.
    Detached,
    /// Unmounted and removed because the container never started.
    CleanedUp,
}

/// The host copy of the mount and the directories sifuse made for it.
#[derive(Debug, Clone)]
pub struct HostCopy {
    mountpoint: PathBuf,
    /// The mount sifuse made there, once made: the only one it ever unmounts.
    mount: Option<MountId>,
    /// Directories this process created, outermost first; only these are ever removed.
    created: Vec<PathBuf>,
    stage: Stage,
}

/// The base of the private directory: $TMPDIR, or /tmp when it is unset or empty. Resolved,
/// so that the mount point sifuse reports is the one mountinfo shows.
pub fn temp_base() -> io::Result<PathBuf> {
    let base = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    base.canonicalize()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", base.display())))
}

impl HostCopy {
    /// Make `BASE/sifuse-XXXXXX/root`, both mode 0700.
    pub fn create(sys: &dyn HostSyscalls, base: &Path) -> Result<HostCopy, ControlError> {
        let mut template = base.as_os_str().to_owned().into_vec();
        template.extend_from_slice(b"/sifuse-XXXXXX");
        let template = PathBuf::from(OsString::from_vec(template));
        let dir = sys
            .mkdtemp(&template)
            .map_err(|source| ControlError::TempDir {
                path: base.to_path_buf(),
                source,
            })?;
        let root = dir.join(ROOT_DIR);
        if let Err(source) = sys.mkdir(&root) {
            // Leave nothing behind: the directory just made goes again.
            let _ = sys.rmdir(&dir);
            return Err(ControlError::TempDir { path: root, source });
        }
        Ok(HostCopy {
            mountpoint: root,
            mount: None,
            created: vec![dir.clone(), dir.join(ROOT_DIR)],
            stage: Stage::Prepared,
        })
    }

    /// A mount point the launcher chose: sifuse unmounts it but never removes it.
    pub fn given(mountpoint: PathBuf) -> HostCopy {
        HostCopy {
            mountpoint,
            mount: None,
            created: Vec::new(),
            stage: Stage::Prepared,
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The directories this process created, outermost first.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// Record the mount made at the mount point.
    pub fn set_mount(&mut self, id: MountId) {
        self.mount = Some(id);
    }

    /// The mount made at the mount point, if known.
    pub fn mount(&self) -> Option<MountId> {
        self.mount
    }

    /// Detach the mount sifuse made, if it is still at the mount point; Ok(false) when
    /// there is none to detach (never made, or gone): nothing else is ever unmounted.
    fn unmount_ours(&self, sys: &dyn HostSyscalls) -> io::Result<bool> {
        match self.mount {
            Some(id) => sys.unmount_lazy(&self.mountpoint, id),
            None => Ok(false),
        }
    }

    /// The container holds its own copy: detach the host copy lazily and remove the
    /// directories. On failure the stage stays [`Stage::Prepared`], so that a later
    /// `cleanup` (or the watcher) still removes what is left.
    pub fn detach(&mut self, sys: &dyn HostSyscalls) -> Result<(), ControlError> {
        let detached = self
            .unmount_ours(sys)
            .map_err(|source| ControlError::Unmount {
                path: self.mountpoint.clone(),
                source,
            })?;
        if !detached {
            tracing::info!(
                "{}: sifuse's mount is no longer there; nothing unmounted",
                self.mountpoint.display()
            );
        }
        self.remove_dirs(sys)?;
        self.stage = Stage::Detached;
        Ok(())
    }

    /// The container never started: unmount (lazily: whatever holds the mount lets go on
    /// its own time, and the path is free at once) and remove the directories. `mounted`
    /// says whether a mount may exist; only the one sifuse made is unmounted, and only if
    /// it is still there. An unmount failure matters only when the mount point cannot be
    /// removed afterwards, or when it is not ours to remove.
    pub fn clean_up(&mut self, sys: &dyn HostSyscalls, mounted: bool) -> Result<(), ControlError> {
        let unmounted = if mounted {
            self.unmount_ours(sys).map(drop)
        } else {
            Ok(())
        };
        let ours = !self.created.is_empty();
        let removed = self.remove_dirs(sys);
        match (unmounted, removed) {
            (_, Err(e)) => return Err(e),
            (Err(source), Ok(())) if !ours => {
                return Err(ControlError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
            _ => {}
        }
        self.stage = Stage::CleanedUp;
        Ok(())
    }

    /// Remove the created directories, innermost first; one already gone is fine.
    fn remove_dirs(&mut self, sys: &dyn HostSyscalls) -> Result<(), ControlError> {
        while let Some(dir) = self.created.last() {
            match sys.rmdir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ControlError::Remove {
                        path: dir.clone(),
                        source,
                    })
                }
            }
            self.created.pop();
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records calls; each fails with the errno configured for it.
    #[derive(Default)]
    pub(crate) struct FakeHost {
        pub mkdtemp_errno: Option<i32>,
        pub mkdir_errno: Option<i32>,
        pub rmdir_errno: Option<i32>,
        pub unmount_errno: Option<i32>,
        /// The mount at the mount point is not the one made (someone else unmounted it).
        pub mount_gone: bool,
        pub calls: Mutex<Vec<String>>,
    }

    /// The mount the tests' host copies made.
    pub(crate) const MADE: MountId = MountId {
        id: 42,
        unique: true,
    };

    fn answer(errno: Option<i32>) -> io::Result<()> {
        errno.map_or(Ok(()), |e| Err(io::Error::from_raw_os_error(e)))
    }

    impl FakeHost {
        pub(crate) fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl HostSyscalls for FakeHost {
        fn mkdtemp(&self, template: &Path) -> io::Result<PathBuf> {
            self.log(format!("mkdtemp {}", template.display()));
            answer(self.mkdtemp_errno)?;
            let s = template.to_str().unwrap().replace("XXXXXX", "abc123");
            Ok(PathBuf::from(s))
        }
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            self.log(format!("mkdir {}", path.display()));
            answer(self.mkdir_errno)
        }
        fn rmdir(&self, path: &Path) -> io::Result<()> {
            self.log(format!("rmdir {}", path.display()));
            answer(self.rmdir_errno)
        }
        fn unmount_lazy(&self, path: &Path, id: MountId) -> io::Result<bool> {
            assert_eq!(id, MADE);
            self.log(format!("umount -l {}", path.display()));
            answer(self.unmount_errno)?;
            Ok(!self.mount_gone)
        }
    }

    /// A host copy whose directories are made and whose mount is [`MADE`].
    pub(crate) fn created(sys: &FakeHost) -> HostCopy {
        let mut host = HostCopy::create(sys, Path::new("/t")).unwrap();
        host.set_mount(MADE);
        host
    }

    /// Before the mount is made, or when it was never made, nothing is unmounted; a
    /// mount point the launcher gave whose mount someone else removed is not an error.
    #[test]
    fn only_the_mount_made_is_unmounted() {
        let sys = FakeHost::default();
        let mut host = HostCopy::create(&sys, Path::new("/t")).unwrap();
        host.clean_up(&sys, true).unwrap();
        assert_eq!(
            sys.calls()[2..],
            ["rmdir /t/sifuse-abc123/root", "rmdir /t/sifuse-abc123"]
        );
        let sys = FakeHost::default();
        let mut host = HostCopy::given("/mnt/tmpfs".into());
        host.clean_up(&sys, true).unwrap();
        host.detach(&sys).unwrap();
        assert!(sys.calls().is_empty(), "{:?}", sys.calls());
        let sys = FakeHost {
            mount_gone: true,
            ..Default::default()
        };
        let mut host = HostCopy::given("/mnt/tmpfs".into());
        host.set_mount(MADE);
        host.clean_up(&sys, true).unwrap();
        assert_eq!(host.stage(), Stage::CleanedUp);
    }

    #[test]
    fn creates_a_private_directory_with_root_inside() {
        let sys = FakeHost::default();
        let host = created(&sys);
        assert_eq!(host.mountpoint(), Path::new("/t/sifuse-abc123/root"));
        assert_eq!(
            sys.calls(),
            ["mkdtemp /t/sifuse-XXXXXX", "mkdir /t/sifuse-abc123/root"]
        );
        assert_eq!(host.stage(), Stage::Prepared);
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let sys = FakeHost {
            mkdir_errno: Some(libc::ENOSPC),
            ..Default::default()
        };
        let err = HostCopy::create(&sys, Path::new("/t")).unwrap_err();
        assert!(err.to_string().contains("/t/sifuse-abc123/root"), "{err}");
        assert_eq!(sys.calls()[2], "rmdir /t/sifuse-abc123");
        let sys = FakeHost {
            mkdtemp_errno: Some(libc::EACCES),
            ..Default::default()
        };
        let err = HostCopy::create(&sys, Path::new("/t")).unwrap_err();
        assert!(err.to_string().contains("Permission denied"), "{err}");
        assert_eq!(sys.calls().len(), 1);
    }

    #[test]
    fn detach_unmounts_lazily_then_removes_innermost_first() {
        let sys = FakeHost::default();
        let mut host = created(&sys);
        host.detach(&sys).unwrap();
        assert_eq!(
            &sys.calls()[2..],
            [
                "umount -l /t/sifuse-abc123/root",
                "rmdir /t/sifuse-abc123/root",
                "rmdir /t/sifuse-abc123"
            ]
        );
        assert_eq!(host.stage(), Stage::Detached);
        assert!(host.created().is_empty());
    }

    #[test]
    fn a_failed_detach_keeps_the_directories_for_cleanup() {
        let sys = FakeHost {
            unmount_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let mut host = created(&sys);
        let err = host.detach(&sys).unwrap_err().to_string();
        assert!(
            err.contains("cannot unmount /t/sifuse-abc123/root"),
            "{err}"
        );
        assert_eq!(host.stage(), Stage::Prepared);
        assert_eq!(host.created().len(), 2);
        assert_eq!(sys.calls().len(), 3, "no rmdir: {:?}", sys.calls());

        let sys = FakeHost {
            rmdir_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let mut host = created(&sys);
        let err = host.detach(&sys).unwrap_err().to_string();
        assert!(err.contains("cannot remove /t/sifuse-abc123/root"), "{err}");
        assert_eq!(host.stage(), Stage::Prepared);
    }

    #[test]
    fn clean_up_removes_dirs_even_when_nothing_was_mounted() {
        // Not mounted: no unmount call at all.
        let sys = FakeHost::default();
        let mut host = created(&sys);
        host.clean_up(&sys, false).unwrap();
        assert_eq!(
            &sys.calls()[2..],
            ["rmdir /t/sifuse-abc123/root", "rmdir /t/sifuse-abc123"]
        );
        assert_eq!(host.stage(), Stage::CleanedUp);
        // Maybe mounted, but the unmount fails (it was not): the removal decides.
        let sys = FakeHost {
            unmount_errno: Some(libc::EINVAL),
            ..Default::default()
        };
        let mut host = created(&sys);
        host.clean_up(&sys, true).unwrap();
        assert_eq!(sys.calls().len(), 5);
        // Removal failing is an error, and cleanup may be tried again.
        let sys = FakeHost {
            rmdir_errno: Some(libc::EBUSY),
            ..Default::default()
        };
        let mut host = created(&sys);
        assert!(host.clean_up(&sys, true).is_err());
        assert_eq!(host.stage(), Stage::Prepared);
        assert_eq!(host.created().len(), 2);
    }

    #[test]
    fn a_given_mount_point_is_unmounted_but_never_removed() {
        let sys = FakeHost::default();
        let mut host = HostCopy::given("/mnt/c".into());
        host.set_mount(MADE);
        host.detach(&sys).unwrap();
        assert_eq!(sys.calls(), ["umount -l /mnt/c"]);
        let sys = FakeHost {
            unmount_errno: Some(libc::EPERM),
            ..Default::default()
        };
        let mut host = HostCopy::given("/mnt/c".into());
        host.set_mount(MADE);
        let err = host.clean_up(&sys, true).unwrap_err().to_string();
        assert!(err.contains("cannot unmount /mnt/c"), "{err}");
        assert_eq!(sys.calls(), ["umount -l /mnt/c"]);
    }

    #[test]
    fn temp_base_follows_tmpdir() {
        // The environment is process-wide: read it, do not change it.
        let base = temp_base().unwrap();
        assert!(base.is_absolute() && base.is_dir(), "{}", base.display());
    }
}
