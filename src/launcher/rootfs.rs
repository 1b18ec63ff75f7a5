//! The container's root for `sifuse run`: which mounts make the image a root ([`plan`]),
//! and making them ([`apply`]) through the narrow [`RootSyscalls`] (the real calls are
//! [`super::sys::LinuxContainer`]'s), so that every decision, the fallbacks included, is
//! unit-tested without privileges.
//!
//! The host's /sys and /proc come in as recursive binds, with whatever is mounted below
//! them (cgroup hierarchies under /sys/fs/cgroup, binfmt_misc under /proc/sys/fs, ...).
//! Every mount of the /sys tree is made read-only, and every mount below /proc (/proc
//! itself stays writable: a process writes its own files there): with mount_setattr and
//! AT_RECURSIVE where the kernel has it (5.12), which covers a whole tree at once, else by
//! remounting each mount mountinfo shows there. The kernel's own knobs under /proc
//! ([`PROC_KNOBS`]: /proc/sys, /proc/sysrq-trigger, ...) are first bound onto themselves,
//! so that they too are mounts below /proc and read-only: without a user namespace the
//! container runs as the host's root, whom a writable /proc/sys would let retune the host.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::statvfs::FsFlags;

use super::Bind;
use super::LauncherError;

/// One step of building the container's root, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Recursive bind of `source` onto `target`.
    Bind { source: PathBuf, target: PathBuf },
    /// Remount the bind at `target` read-only, keeping the flags it has.
    ReadOnly(PathBuf),
    /// Make the mount at `target` and every mount below it read-only.
    ReadOnlyTree(PathBuf),
    /// Make every mount below `target` read-only, but not `target` itself.
    ReadOnlyBelow(PathBuf),
    /// A fresh tmpfs, nosuid and nodev, mode 1777.
    Tmpfs(PathBuf),
}

/// The entries of /proc that tune the whole kernel rather than describe a process, made
/// read-only in the container (the set container runtimes make read-only).
pub const PROC_KNOBS: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// Where `inside` (absolute, in the container) lies under `root`. A symlink in the image
/// may lead the mount elsewhere; it then lands in the old root, which is detached after
/// pivot_root, so it can reach nothing of the host's (every mount here is private).
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// The mounts that make `root` a container root. `is_dir(path)` says whether a standard
/// mount point exists in the image (it is read-only: nothing can be created); a missing
/// one is skipped with a warning. Binds must find their destination. `exists(path)` also
/// says which of the host's [`PROC_KNOBS`] there are.
pub fn plan(
    root: &Path,
    binds: &[Bind],
    is_dir: &dyn Fn(&Path) -> bool,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Vec<Step>, LauncherError> {
    let mut steps = vec![
        Step::Bind {
            source: root.into(),
            target: root.into(),
        },
        Step::ReadOnly(root.into()),
    ];
    let standard = ["proc", "dev", "sys", "tmp"];
    for name in standard {
        let target = root.join(name);
        if !is_dir(&target) {
            tracing::warn!("the image has no /{name}: not mounted");
            continue;
        }
        let bind = Step::Bind {
            source: Path::new("/").join(name),
            target: target.clone(),
        };
        match name {
            "proc" => {
                steps.push(bind);
                for knob in PROC_KNOBS {
                    if exists(&Path::new("/proc").join(knob)) {
                        let at = target.join(knob);
                        steps.push(Step::Bind {
                            source: at.clone(),
                            target: at,
                        });
                    }
                }
                steps.push(Step::ReadOnlyBelow(target));
            }
            "sys" => steps.extend([bind, Step::ReadOnlyTree(target)]),
            "dev" => steps.push(bind),
            _ => steps.push(Step::Tmpfs(target)),
        }
    }
    for b in binds {
        let target = under(root, &b.dest);
        if !exists(&target) {
            return Err(LauncherError::setup(
                format!("--bind {}:{}", b.source.display(), b.dest.display()),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the destination does not exist in the image (it is read-only, so \
                     sifuse cannot create it)",
                ),
            ));
        }
        steps.push(Step::Bind {
            source: b.source.clone(),
            target,
        });
    }
    Ok(steps)
}

/// The flags of a read-only bind remount of a mount that has `current`. In a user
/// namespace the kernel locks nosuid, nodev, noexec and the atime flags of mounts that
/// came from a more privileged namespace: a remount that drops any of them fails with
/// EPERM, so keep all that are set.
pub fn readonly_remount_flags(current: FsFlags) -> MsFlags {
    let mut f = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    let keep = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    for (st, ms) in keep {
        if current.contains(st) {
            f |= ms;
        }
    }
    f
}

/// What building the root asks of the system.
pub trait RootSyscalls {
    /// mount(2) MS_BIND|MS_REC of `source` onto `target`.
    fn bind(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Remount the mount at `target` (only that one) read-only, keeping its other flags.
    fn remount_read_only(&self, target: &Path) -> io::Result<()>;
    /// mount_setattr(MOUNT_ATTR_RDONLY) of the mount at `target` and, with `recursive`
    /// (AT_RECURSIVE), every mount below it. ENOSYS where the kernel lacks it.
    fn set_read_only(&self, target: &Path, recursive: bool) -> io::Result<()>;
    /// The mount points at or below `target`, as this namespace's mountinfo lists them.
    fn mount_points_under(&self, target: &Path) -> io::Result<Vec<PathBuf>>;
    /// A tmpfs at `target`, nosuid and nodev, mode 1777.
    fn tmpfs(&self, target: &Path) -> io::Result<()>;
}

/// Make the trees topped by `tops` read-only: a tree at once with mount_setattr where the
/// kernel has it, else one remount per mount that mountinfo shows in it.
fn read_only_trees<S: RootSyscalls + ?Sized>(sys: &S, tops: &[PathBuf]) -> io::Result<()> {
    for top in tops {
        match sys.set_read_only(top, true) {
            Ok(()) => {}
            // Before Linux 5.12.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                for mount in sys.mount_points_under(top)? {
                    sys.remount_read_only(&mount)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The topmost mounts strictly below `target`: each is the top of a tree below it.
fn trees_below<S: RootSyscalls + ?Sized>(sys: &S, target: &Path) -> io::Result<Vec<PathBuf>> {
    let mut tops: Vec<PathBuf> = Vec::new();
    for mount in sys.mount_points_under(target)? {
        if mount != target && !tops.iter().any(|t| mount.starts_with(t)) {
            tops.push(mount);
        }
    }
    Ok(tops)
}

/// Make one step.
pub fn apply<S: RootSyscalls + ?Sized>(sys: &S, step: &Step) -> Result<(), LauncherError> {
    match step {
        Step::Bind { source, target } => sys.bind(source, target).map_err(|e| {
            LauncherError::setup(
                format!("cannot bind {} to {}", source.display(), target.display()),
                e,
            )
        }),
        Step::ReadOnly(target) => sys.remount_read_only(target).map_err(|e| {
            LauncherError::setup(format!("cannot make {} read-only", target.display()), e)
        }),
        Step::ReadOnlyTree(target) => {
            read_only_trees(sys, std::slice::from_ref(target)).map_err(|e| {
                LauncherError::setup(
                    format!("cannot make {} and below read-only", target.display()),
                    e,
                )
            })
        }
        Step::ReadOnlyBelow(target) => trees_below(sys, target)
            .and_then(|tops| read_only_trees(sys, &tops))
            .map_err(|e| {
                LauncherError::setup(
                    format!(
                        "cannot make the mounts below {} read-only",
                        target.display()
                    ),
                    e,
                )
            }),
        Step::Tmpfs(target) => sys.tmpfs(target).map_err(|e| {
            LauncherError::setup(format!("cannot mount a tmpfs on {}", target.display()), e)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records calls; mountinfo as given; mount_setattr missing on request.
    #[derive(Default)]
    struct FakeRoot {
        mounts: Vec<&'static str>,
        no_mount_setattr: bool,
        calls: RefCell<Vec<String>>,
    }

    impl RootSyscalls for FakeRoot {
        fn bind(&self, source: &Path, target: &Path) -> io::Result<()> {
            let call = format!("bind {} {}", source.display(), target.display());
            self.calls.borrow_mut().push(call);
            Ok(())
        }
        fn remount_read_only(&self, target: &Path) -> io::Result<()> {
            let call = format!("remount ro {}", target.display());
            self.calls.borrow_mut().push(call);
            Ok(())
        }
        fn set_read_only(&self, target: &Path, recursive: bool) -> io::Result<()> {
            if self.no_mount_setattr {
                return Err(io::Error::from_raw_os_error(libc::ENOSYS));
            }
            let call = format!("setattr ro recursive={recursive} {}", target.display());
            self.calls.borrow_mut().push(call);
            Ok(())
        }
        fn mount_points_under(&self, target: &Path) -> io::Result<Vec<PathBuf>> {
            Ok(self
                .mounts
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.starts_with(target))
                .collect())
        }
        fn tmpfs(&self, target: &Path) -> io::Result<()> {
            let call = format!("tmpfs {}", target.display());
            self.calls.borrow_mut().push(call);
            Ok(())
        }
    }

    const MOUNTS: [&str; 7] = [
        "/r",
        "/r/proc",
        "/r/proc/sys/fs/binfmt_misc",
        "/r/sys",
        "/r/sys/fs/cgroup",
        "/r/sys/fs/cgroup/cpu",
        "/r/sysfoo",
    ];

    fn applied(sys: &FakeRoot, step: Step) -> Vec<String> {
        apply(sys, &step).unwrap();
        sys.calls.take()
    }

    #[test]
    fn sys_and_below_are_read_only_in_one_call_where_the_kernel_can() {
        let sys = FakeRoot {
            mounts: MOUNTS.to_vec(),
            ..Default::default()
        };
        assert_eq!(
            applied(&sys, Step::ReadOnlyTree("/r/sys".into())),
            ["setattr ro recursive=true /r/sys"]
        );
        // Below /proc: each tree under it, not /proc itself.
        assert_eq!(
            applied(&sys, Step::ReadOnlyBelow("/r/proc".into())),
            ["setattr ro recursive=true /r/proc/sys/fs/binfmt_misc"]
        );
    }

    /// Before Linux 5.12: one remount per mount in the tree, /sys/fs/cgroup and the
    /// hierarchies under it included (they used to stay writable).
    #[test]
    fn without_mount_setattr_every_mount_of_the_tree_is_remounted() {
        let sys = FakeRoot {
            mounts: MOUNTS.to_vec(),
            no_mount_setattr: true,
            ..Default::default()
        };
        assert_eq!(
            applied(&sys, Step::ReadOnlyTree("/r/sys".into())),
            [
                "remount ro /r/sys",
                "remount ro /r/sys/fs/cgroup",
                "remount ro /r/sys/fs/cgroup/cpu"
            ]
        );
        assert_eq!(
            applied(&sys, Step::ReadOnlyBelow("/r/proc".into())),
            ["remount ro /r/proc/sys/fs/binfmt_misc"]
        );
        let bare = FakeRoot {
            mounts: vec!["/r/proc"],
            no_mount_setattr: true,
            ..Default::default()
        };
        assert!(applied(&bare, Step::ReadOnlyBelow("/r/proc".into())).is_empty());
    }

    #[test]
    fn the_plan_binds_the_root_first_and_skips_what_the_image_lacks() {
        let root = Path::new("/t/r");
        let binds = ["/data:/opt".parse::<Bind>().unwrap()];
        let steps = plan(root, &binds, &|p| p != Path::new("/t/r/sys"), &|p| {
            ["/t/r/opt", "/proc/sys", "/proc/sysrq-trigger"]
                .iter()
                .any(|q| p == Path::new(q))
        })
        .unwrap();
        let bind = |s: &str, t: &str| Step::Bind {
            source: s.into(),
            target: t.into(),
        };
        assert_eq!(
            steps,
            [
                bind("/t/r", "/t/r"),
                Step::ReadOnly("/t/r".into()),
                bind("/proc", "/t/r/proc"),
                // The host's kernel knobs that exist, each a mount of its own.
                bind("/t/r/proc/sys", "/t/r/proc/sys"),
                bind("/t/r/proc/sysrq-trigger", "/t/r/proc/sysrq-trigger"),
                Step::ReadOnlyBelow("/t/r/proc".into()),
                bind("/dev", "/t/r/dev"),
                Step::Tmpfs("/t/r/tmp".into()),
                bind("/data", "/t/r/opt"),
            ]
        );
        let all = plan(root, &[], &|_| true, &|_| true).unwrap();
        assert!(all.contains(&Step::ReadOnlyTree("/t/r/sys".into())));
        let err = plan(root, &binds, &|_| true, &|_| false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--bind /data:/opt"), "{err}");
    }

    #[test]
    fn read_only_remounts_keep_locked_flags() {
        let f = readonly_remount_flags(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_NOEXEC);
        assert_eq!(
            f,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
        );
        let f = readonly_remount_flags(FsFlags::ST_RELATIME);
        assert!(f.contains(MsFlags::MS_RELATIME) && !f.contains(MsFlags::MS_NOSUID));
    }
}
