//! `sifuse run`: a reference launcher (see sifuse::launcher).

use std::ffi::OsString;
use std::io;

use clap::Args;

use sifuse::launcher::server_process::Waits;
use sifuse::launcher::sys::LinuxContainer;
use sifuse::launcher::{self, Bind, ContainerRequest, LauncherError};
use sifuse::mount::options::MountOptions;

use super::{Exit, ImageArgs};

pub const RUN_HELP: &str = "\
sifuse run starts `sifuse mount --control-fd` on IMAGE, enters a new mount namespace \
(inside a user namespace mapping the caller to itself when not root, or with --userns), \
makes the image the read-only root with /proc, /dev and /sys from the host, a fresh /tmp \
and the --bind directories, then runs COMMAND. COMMAND runs in a new pid namespace and \
dies with sifuse run, together with everything it started.

By default the image is a detached mount (Linux's new mount API), created inside the new \
namespaces and handed to the server by its /dev/fuse descriptor: the host's mount table \
never shows it and no directory is made. Where the kernel lacks that API, or with \
--no-detached, the server mounts on a private directory under $TMPDIR, and once COMMAND \
is running the host copy is detached and the directory removed. Either way the server \
serves the container until COMMAND and its children are gone; --debug says which way \
was taken.

Exit status: COMMAND's, or 128+N when signal N killed it; 126 or 127 when COMMAND cannot \
be run; 1 when the container could not be set up. Unprivileged use needs unprivileged user \
namespaces and a /dev/fuse that users may open; the temp-directory fallback needs \
fusermount3 too.";

/// `sifuse run`.
#[derive(Debug, Args)]
#[command(after_long_help = RUN_HELP)]
pub struct RunArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// The command to run inside the image, and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
    /// Mount options, as for sifuse mount
    #[arg(short = 'o', value_name = "OPT[,OPT...]")]
    pub options: Vec<String>,
    /// Bind the host's SRC at DST inside the container (DST defaults to SRC; it must
    /// exist in the image); repeatable
    #[arg(long, value_name = "SRC[:DST]")]
    pub bind: Vec<Bind>,
    /// Run in a user namespace even as root (always, when not root)
    #[arg(long)]
    pub userns: bool,
    /// Mount on a temporary directory of the host and detach it once COMMAND runs, even
    /// where a detached mount would work
    #[arg(long)]
    pub no_detached: bool,
    /// Say on stderr how the image is mounted, and log the launcher's steps
    #[arg(short = 'd', long)]
    pub debug: bool,
}

/// `sifuse run`: COMMAND's exit status, 126 or 127 when COMMAND cannot be run, 1 when
/// the container cannot be set up.
pub fn run_container(args: &RunArgs) -> Exit {
    super::mount::init_logging(args.debug);
    let mut options = MountOptions::default();
    for list in &args.options {
        if let Err(e) = options.apply(list) {
            return Exit::failed(e);
        }
    }
    let mut mount_args: Vec<OsString> = Vec::new();
    if let Some(offset) = args.image.offset {
        mount_args.push(format!("--offset={offset}").into());
    }
    if let Some(p) = &args.image.partition {
        mount_args.push(format!("--partition={p}").into());
    }
    for list in &args.options {
        mount_args.push("-o".into());
        mount_args.push(list.into());
    }
    let req = ContainerRequest {
        image: args.image.image.clone(),
        mount_args,
        binds: args.bind.clone(),
        userns: args.userns,
        command: args.command.clone(),
        options,
        detached: !args.no_detached,
        waits: Waits::default(),
    };
    match launcher::run_container(&req, &LinuxContainer) {
        Ok(code) => Exit::Status(code),
        Err(e @ LauncherError::Exec { .. }) => {
            let status = match &e {
                LauncherError::Exec { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    127
                }
                _ => 126,
            };
            Exit::Failed {
                message: e.to_string(),
                status,
            }
        }
        Err(e) => Exit::failed(e),
    }
}
