//! `sifuse run`: the reference launcher (see sifuse::launcher::run).

use std::ffi::OsString;
use std::io;

use clap::Args;

use sifuse::launcher::run::{Bind, RunRequest};
use sifuse::launcher::LauncherError;
use sifuse::Result;

use super::ImageArgs;

pub const RUN_HELP: &str = "\
sifuse run starts `sifuse mount --control-fd` on IMAGE, waits for the mount, enters a new \
mount namespace (inside a user namespace mapping the caller to itself when not root, or \
with --userns), makes the image the read-only root with /proc, /dev and /sys from the \
host, a fresh /tmp and the --bind directories, then runs COMMAND. Once COMMAND is running \
the host copy of the mount is detached and its directory removed; the server serves the \
container until COMMAND and its children are gone. COMMAND runs in a new pid namespace \
and dies with sifuse run, together with everything it started.

Exit status: COMMAND's, or 128+N when signal N killed it; 126 or 127 when COMMAND cannot \
be run; 1 when the container could not be set up. Unprivileged use needs fusermount3, \
unprivileged user namespaces, and a /dev/fuse that users may open.";

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
}

/// Run `sifuse run`; exits with COMMAND's status.
pub fn run(args: &RunArgs) -> Result<()> {
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
    let req = RunRequest {
        image: args.image.image.clone(),
        mount_args,
        binds: args.bind.clone(),
        userns: args.userns,
        command: args.command.clone(),
    };
    match sifuse::launcher::run::run(&req) {
        Ok(code) => std::process::exit(code),
        Err(LauncherError::Exec { command, source }) => {
            eprintln!("sifuse: cannot run {command}: {source}");
            std::process::exit(if source.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
        Err(e) => Err(super::mount::launcher_error(e)),
    }
}
