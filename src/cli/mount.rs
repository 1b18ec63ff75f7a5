//! `sifuse mount` and `sifuse umount`: flags and `-o` lists into one set of mount options,
//! then the mount layer.

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use sifuse::control::{self, HandOff};
use sifuse::fuse::owners::IdRange;
use sifuse::mount::options::{MountOptions, OptionError};
use sifuse::mount::sys::LinuxSyscalls;
use sifuse::mount::{Server, Standalone};
use sifuse::{Error, Result};

use super::{Exit, ImageArgs};

/// What `-o` accepts, for `sifuse mount --help` and the man page.
pub const MOUNT_OPTIONS_HELP: &str = "\
Mount options (-o OPT[,OPT...], repeatable; applied after the flags, later ones win; \
a backslash escapes a comma inside a value):
  offset=N               byte offset of the SquashFS image inside IMAGE
  partition=ID|NAME      SIF partition to serve (default: the primary system partition)
  subdir=PATH            serve PATH inside the image as the root
  uid=N, gid=N           show every entry as owned by N
  uidmap=IN:OUT:COUNT    show image owners IN..IN+COUNT as OUT..OUT+COUNT, as a user
  gidmap=IN:OUT:COUNT      namespace map does; repeatable; unmapped ids show as 65534
  allow_other            let every user use the mount (mode bits are then enforced)
  allow_root             let root use the mount too (mode bits are then enforced)
  suid, dev              honour set-id bits and device files (default: nosuid, nodev)
  timeout=N              unmount after N seconds without requests and with nothing open
  notify_pipe=FIFO       write 's' to FIFO once the mount is live, 'f' if mounting failed
  cache_size=MiB         memory budget: an upper bound, not a reservation (default: 64)
  idle_release=N         give memory back after N seconds without requests (default:
                           30; 0 never)
  threads=N              request threads (also max_threads=N)
  fsname=NAME            mount source shown in mountinfo (default: the image path)
  subtype=NAME           mountinfo shows the type as fuse.NAME (default: sifuse)
  cache_dir=DIR          chunk cache of a remote image (as --cache-dir)
  cache_max=SIZE         most the chunk cache holds on disk, e.g. 10G (as --cache-max)
  no_disk_cache          keep a remote image's chunks in memory only
  registry_auth=FILE     registry credentials of an oras:// image (as --registry-auth)
  no_https               reach an oras:// registry over plain HTTP (as --no-https)
  debug                  same as -d
  ro, nosuid, nodev, default_permissions, nonempty, clone_fd, max_idle_threads=N
                         accepted for squashfuse compatibility

The mount is always read-only. Without -f, sifuse returns once the mount answers, and \
keeps serving in the background until the mount goes away (umount, fusermount3 -u, \
sifuse umount) or it receives SIGTERM, SIGINT or SIGHUP, which unmount lazily.";

/// `sifuse mount`.
#[derive(Debug, Args)]
#[command(after_long_help = MOUNT_OPTIONS_HELP)]
pub struct MountArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Directory to mount on, or /dev/fd/N naming an already mounted /dev/fuse descriptor
    /// (optional with --control-fd: sifuse then makes $TMPDIR/sifuse-XXXXXX/root)
    #[arg(required_unless_present = "control_fd")]
    pub mountpoint: Option<PathBuf>,
    /// Launcher mode: speak the control protocol on this inherited socket, in the
    /// foreground (see the README: ready, started/detached, cleanup/done)
    #[arg(long, value_name = "FD")]
    pub control_fd: Option<i32>,
    /// With --control-fd: create a detached mount (new mount API), attached nowhere, and
    /// send its descriptor with the line ready-fd instead of mounting on a directory
    #[arg(long, requires = "control_fd", conflicts_with_all = ["mountpoint", "serve_fd"])]
    pub detached: bool,
    /// With --control-fd: serve the /dev/fuse descriptor, already mounted by the launcher,
    /// that arrives with the line serve-fd; answer serving
    #[arg(long, requires = "control_fd", conflicts_with = "mountpoint")]
    pub serve_fd: bool,
    /// Mount options, squashfuse style (see below)
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// Stay in the foreground instead of becoming a daemon
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Log every request to stderr (implies --foreground)
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Serve this directory inside the image as the root
    #[arg(long, value_name = "PATH")]
    pub subdir: Option<String>,
    /// Show every entry as owned by this user id
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Show every entry as owned by this group id
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,
    /// Shift owner ids as a user namespace map does (repeatable)
    #[arg(long, value_name = "INSIDE:OUTSIDE:COUNT")]
    pub uidmap: Vec<IdRange>,
    /// Shift group ids as a user namespace map does (repeatable)
    #[arg(long, value_name = "INSIDE:OUTSIDE:COUNT")]
    pub gidmap: Vec<IdRange>,
    /// Let every user use the mount; the kernel then enforces mode bits
    #[arg(long)]
    pub allow_other: bool,
    /// Let root use the mount too; the kernel then enforces mode bits
    #[arg(long)]
    pub allow_root: bool,
    /// Honour set-user-id and set-group-id bits
    #[arg(long)]
    pub suid: bool,
    /// Honour device files
    #[arg(long)]
    pub dev: bool,
    /// Unmount after this many seconds without requests and with nothing open
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// FIFO that receives 's' once the mount is live, 'f' if mounting failed
    #[arg(long, value_name = "FIFO")]
    pub notify_pipe: Option<PathBuf>,
    /// Decompressed block cache size in MiB [default: 64]
    #[arg(long, value_name = "MiB")]
    pub cache_size: Option<u64>,
    /// Request threads [default: one per CPU, 2 to 16]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl MountArgs {
    /// The mount options: flags first, then the `-o` lists.
    pub fn options(&self) -> std::result::Result<MountOptions, OptionError> {
        let mut o = MountOptions {
            offset: self.image.offset,
            partition: self.image.partition.clone(),
            subdir: self.subdir.clone(),
            uid: self.uid,
            gid: self.gid,
            uidmap: self.uidmap.clone(),
            gidmap: self.gidmap.clone(),
            allow_other: self.allow_other,
            allow_root: self.allow_root,
            suid: self.suid,
            dev: self.dev,
            timeout: self.timeout.unwrap_or(0),
            notify_pipe: self.notify_pipe.clone(),
            threads: self.threads,
            foreground: self.foreground || self.debug,
            debug: self.debug,
            chunk_cache: self.image.cache.settings(),
            registry_auth: self.image.store.registry_auth.clone(),
            no_https: self.image.store.no_https,
            ..MountOptions::default()
        };
        if let Some(mib) = self.cache_size {
            o.cache_size_mib = mib;
        }
        for list in &self.options {
            o.apply(list)?;
        }
        Ok(o)
    }
}

/// `sifuse umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point
    pub mountpoint: PathBuf,
    /// Detach now and finish once nothing uses the mount (umount -l, fusermount3 -z)
    #[arg(short = 'l', visible_short_alias = 'z', long)]
    pub lazy: bool,
}

/// Log to stderr: warnings, or with --debug every request (fuser logs them at debug level).
/// RUST_LOG overrides.
pub(super) fn init_logging(debug: bool) {
    let default = if debug {
        "sifuse=debug,fuser=debug"
    } else {
        "sifuse=warn,fuser=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .try_init();
}

/// `sifuse mount`: serve until the mount goes away, in the standalone role or, with
/// `--control-fd`, in launcher mode's.
pub fn mount(args: &MountArgs) -> Exit {
    let options = match args.options() {
        Ok(options) => options,
        Err(e) => return Exit::failed(e),
    };
    init_logging(options.debug);
    let server = Server::new(args.image.image.clone(), options, Arc::new(LinuxSyscalls));
    let ended = match args.control_fd {
        Some(control_fd) => {
            let hand_off = if args.detached {
                HandOff::MountFd
            } else if args.serve_fd {
                HandOff::ServeFd
            } else {
                HandOff::HostPath {
                    mountpoint: args.mountpoint.clone(),
                }
            };
            server
                .run(control::role(control_fd, hand_off))
                .map_err(|e| e.to_string())
        }
        // clap requires a mount point without --control-fd.
        None => server
            .run(Standalone::new(args.mountpoint.clone().unwrap_or_default()))
            .map_err(|e| e.to_string()),
    };
    match ended {
        Ok(ending) => Exit::Served(ending),
        Err(message) => Exit::failed(message),
    }
}

/// Run `sifuse umount`.
pub fn umount(args: &UmountArgs) -> Result<()> {
    sifuse::mount::umount(&LinuxSyscalls, &args.mountpoint, args.lazy)
        .map_err(|e| Error::Io(io::Error::other(e.to_string())))
}
