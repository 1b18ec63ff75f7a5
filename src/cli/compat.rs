//! squashfuse and squashfuse_ll, as launchers call them: when the binary runs under one of
//! those names (a symlink, or a copy), it parses their command line instead of sifuse's,
//! prints their usage text, names its mounts as libfuse names theirs, and treats
//! `uid=0`/`gid=0` as "leave owners alone", as squashfuse does.
//!
//! The exit statuses follow squashfuse 0.1.x with libfuse 3: 254 after printing the usage
//! (no arguments, a missing argument, `-h`), 1 for a bad option or a failed mount.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sifuse::mount::options::MountOptions;
use sifuse::mount::sys::LinuxSyscalls;
use sifuse::mount::{MountRequest, Server, Standalone};

use super::Exit;

/// The names under which the binary behaves as squashfuse. squashfuse_ll first: launchers
/// look for it first.
pub const COMPAT_NAMES: [&str; 2] = ["squashfuse_ll", "squashfuse"];

/// How compat mode behaves, for `sifuse install-compat --help` and the man page.
pub const COMPAT_HELP: &str = "\
Run under the name squashfuse_ll or squashfuse (a link made by install-compat, or a \
copy), sifuse takes squashfuse's command line: [options] ARCHIVE MOUNTPOINT, with -f, -d, \
-s, -h, -V and -o offset, subdir, notify_pipe, timeout, uid, gid, allow_other, allow_root, \
ro, dev, suid, nodev, nosuid, nonempty, debug, clone_fd, max_threads, max_idle_threads, \
default_permissions, fsname, subtype. Any other -o option is an error, as in squashfuse. \
uid=0 and gid=0 leave owners as stored, as squashfuse does. Mounts show in mountinfo as \
type fuse.NAME with source NAME, as libfuse names squashfuse's. Without -f the command \
returns once the mount is live and prints nothing; errors go to stderr with exit status \
1; the usage text (-h, or missing arguments) exits with 254. ARCHIVE may also be a URL \
(https://, http://, s3://, oras://), as for sifuse mount; its chunks are cached in \
$SIFUSE_CACHE_DIR (else $XDG_CACHE_HOME/sifuse, else ~/.cache/sifuse), up to 10 GiB.

Point a launcher at the links: SingularityCE and Apptainer look for squashfuse_ll, then \
squashfuse, on their search path (see README.md, \"squashfuse compatibility\").";

/// Exit status after printing the usage text (libfuse's fuse_main returns -2 there).
const USAGE_STATUS: i32 = 254;

/// The `-o` options squashfuse itself takes, then the generic FUSE ones it passes through.
const COMPAT_OPTIONS: &[&str] = &[
    "offset",
    "subdir",
    "notify_pipe",
    "timeout",
    "uid",
    "gid",
    "allow_other",
    "allow_root",
    "ro",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "nonempty",
    "debug",
    "clone_fd",
    "max_threads",
    "max_idle_threads",
    "default_permissions",
    "fsname",
    "subtype",
];

/// Which compat name `argv0` invokes, if any.
pub fn compat_name(argv0: &OsStr) -> Option<&'static str> {
    let name = Path::new(argv0).file_name()?;
    COMPAT_NAMES.into_iter().find(|n| name == OsStr::new(n))
}

/// What a compat command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Print the usage text (to stdout, the FUSE options to stderr) and exit 254.
    Usage,
    Version,
    Mount(Box<MountRequest>),
}

/// A bad command line: the message squashfuse's users would see, after `PROG: `.
#[derive(Debug, PartialEq, Eq)]
pub struct CompatError(pub String);

/// Parse `args` (without argv[0]) as squashfuse's command line: `[options] ARCHIVE
/// MOUNTPOINT` with -f, -d, -s, -h, -V and `-o LIST` (also `-oLIST`).
pub fn parse(prog: &str, args: &[OsString]) -> Result<Invocation, CompatError> {
    let mut lists: Vec<String> = Vec::new();
    let mut positional: Vec<PathBuf> = Vec::new();
    let (mut foreground, mut debug, mut single) = (false, false, false);
    let mut iter = args.iter();
    let mut options_done = false;
    while let Some(arg) = iter.next() {
        let text = arg.to_str();
        if options_done || !text.is_some_and(|t| t.starts_with('-') && t.len() > 1) {
            if positional.len() == 2 {
                return Err(CompatError(format!(
                    "invalid argument `{}'",
                    arg.to_string_lossy()
                )));
            }
            positional.push(PathBuf::from(arg));
            continue;
        }
        match text.expect("checked above") {
            "--" => options_done = true,
            "-h" | "--help" => return Ok(Invocation::Usage),
            "-V" | "--version" => return Ok(Invocation::Version),
            "-f" => foreground = true,
            "-d" => debug = true,
            "-s" => single = true,
            "-o" => {
                let list = iter
                    .next()
                    .ok_or_else(|| CompatError("missing argument after `-o'".into()))?;
                lists.push(list_text(list)?);
            }
            joined if joined.starts_with("-o") => lists.push(joined[2..].to_string()),
            other => return Err(CompatError(format!("unknown option `{other}'"))),
        }
    }
    // Missing arguments print the usage, as squashfuse does.
    let Ok([archive, mountpoint]) = <[PathBuf; 2]>::try_from(positional) else {
        return Ok(Invocation::Usage);
    };
    let mut options = MountOptions {
        foreground: foreground || debug,
        debug,
        threads: single.then_some(1),
        fsname: Some(prog.to_string()),
        subtype: Some(prog.to_string()),
        ..MountOptions::default()
    };
    for list in &lists {
        check_known(list)?;
        options.apply(list).map_err(|e| CompatError(e.0))?;
    }
    // squashfuse ignores uid=0 and gid=0: launchers pass them to mean "as stored".
    if options.uid == Some(0) {
        options.uid = None;
    }
    if options.gid == Some(0) {
        options.gid = None;
    }
    options.validate().map_err(|e| CompatError(e.0))?;
    Ok(Invocation::Mount(Box::new(MountRequest {
        image: archive,
        mountpoint,
        options,
    })))
}

fn list_text(list: &OsStr) -> Result<String, CompatError> {
    list.to_str()
        .map(str::to_string)
        .ok_or_else(|| CompatError(format!("-o {}: not UTF-8", list.to_string_lossy())))
}

/// Refuse every option squashfuse would refuse, naming them as libfuse does.
fn check_known(list: &str) -> Result<(), CompatError> {
    let unknown: Vec<&str> = list
        .split(',')
        .filter(|item| !item.is_empty())
        .filter(|item| {
            let name = item.split_once('=').map_or(*item, |(n, _)| n);
            !COMPAT_OPTIONS.contains(&name)
        })
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(CompatError(format!(
            "unknown option(s): `-o {}'",
            unknown.join(",")
        )))
    }
}

/// squashfuse's usage text: the program's own options (on stdout, where squashfuse
/// prints them; Apptainer searches them for `-o uid=`), then the FUSE ones (on stderr).
fn usage(prog: &str) -> (String, String) {
    let out = format!(
        "{prog} (sifuse {version}): mount a SquashFS or SIF image read-only\n\
         \n\
         Usage: {prog} [options] ARCHIVE MOUNTPOINT\n\
         \n\
         {prog} options:\n\
         \x20   -o offset=N            offset N bytes into ARCHIVE to mount\n\
         \x20   -o subdir=PATH         mount subdirectory PATH of ARCHIVE\n\
         \x20   -o timeout=N           idle N seconds for automatic unmount\n\
         \x20   -o notify_pipe=PATH    write 's' to PATH once mounted, 'f' on failure\n\
         \x20   -o uid=N               set file owner to N (0: as stored)\n\
         \x20   -o gid=N               set file group to N (0: as stored)\n\
         \n",
        version = env!("CARGO_PKG_VERSION"),
    );
    let err = "\
FUSE options:
    -h   --help            print help
    -V   --version         print version
    -d   -o debug          enable debug output (implies -f)
    -f                     foreground operation
    -s                     disable multi-threaded operation
    -o allow_other         allow access by other users
    -o allow_root          allow access by the superuser
    -o ro, dev, suid, nodev, nosuid, nonempty, default_permissions
    -o fsname=NAME, subtype=NAME
    -o clone_fd            use separate fuse device fd for each thread
    -o max_idle_threads    the maximum number of idle worker threads
    -o max_threads         the maximum number of worker threads
"
    .to_string();
    (out, err)
}

/// Run as squashfuse or squashfuse_ll; `main` prints a failure after PROG's name.
pub fn main(prog: &str, args: &[OsString]) -> Exit {
    let req = match parse(prog, args) {
        Ok(Invocation::Mount(req)) => req,
        Ok(Invocation::Version) => {
            println!("{prog} (sifuse {})", env!("CARGO_PKG_VERSION"));
            return Exit::Done;
        }
        Ok(Invocation::Usage) => {
            let (out, err) = usage(prog);
            let _ = io::stdout().write_all(out.as_bytes());
            let _ = io::stdout().flush();
            let _ = io::stderr().write_all(err.as_bytes());
            return Exit::Status(USAGE_STATUS);
        }
        Err(CompatError(msg)) => return Exit::failed(msg),
    };
    super::mount::init_logging(req.options.debug);
    let server = Server::new(req.image, req.options, Arc::new(LinuxSyscalls));
    match server.run(Standalone::new(req.mountpoint)) {
        Ok(ending) => Exit::Served(ending),
        Err(e) => Exit::failed(e),
    }
}

/// Why `sifuse install-compat` refused.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the sifuse binary: {0}")]
    SelfPath(io::Error),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} exists and is not a link to sifuse: move it away, or pass --force to replace it",
        path.display()
    )]
    Exists { path: PathBuf },
}

/// Create `squashfuse_ll` and `squashfuse` in `dir` as symbolic links to `target`.
/// Links that already point at `target` are left as they are; anything else under those
/// names is replaced only with `force`.
pub fn install(dir: &Path, target: &Path, force: bool) -> Result<Vec<PathBuf>, InstallError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut made = Vec::new();
    for name in COMPAT_NAMES {
        let link = dir.join(name);
        match fs::symlink_metadata(&link) {
            Ok(_) if fs::read_link(&link).is_ok_and(|t| t == target) => continue,
            Ok(_) if !force => return Err(InstallError::Exists { path: link }),
            Ok(_) => fs::remove_file(&link).map_err(io_err(&link))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&link)(e)),
        }
        symlink(target, &link).map_err(io_err(&link))?;
        made.push(link);
    }
    Ok(made)
}

/// `sifuse install-compat DIR [--force]`: links to the running binary.
pub fn install_compat(dir: &Path, force: bool) -> sifuse::Result<()> {
    let exe = std::env::current_exe()
        .and_then(fs::canonicalize)
        .map_err(InstallError::SelfPath)
        .map_err(|e| sifuse::Error::Io(io::Error::other(e.to_string())))?;
    install(dir, &exe, force).map_err(|e| sifuse::Error::Io(io::Error::other(e.to_string())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn mount(list: &[&str]) -> MountRequest {
        match parse("squashfuse_ll", &args(list)) {
            Ok(Invocation::Mount(r)) => *r,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    fn refused(list: &[&str]) -> String {
        match parse("squashfuse_ll", &args(list)) {
            Err(CompatError(m)) => m,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            compat_name(OsStr::new("/usr/bin/squashfuse_ll")),
            Some("squashfuse_ll")
        );
        assert_eq!(compat_name(OsStr::new("squashfuse")), Some("squashfuse"));
        assert_eq!(compat_name(OsStr::new("/usr/bin/sifuse")), None);
        assert_eq!(compat_name(OsStr::new("squashfuse_ll.sh")), None);
    }

    #[test]
    fn singularity_call() {
        let r = mount(&[
            "-o",
            "uid=1000,gid=100,ro,allow_other,offset=4096",
            "a.sif",
            "/m",
        ]);
        assert_eq!(r.image, Path::new("a.sif"));
        assert_eq!(r.mountpoint, Path::new("/m"));
        let o = &r.options;
        assert_eq!(
            (o.uid, o.gid, o.offset),
            (Some(1000), Some(100), Some(4096))
        );
        assert!(o.allow_other && !o.foreground && !o.debug);
        assert_eq!(o.fsname.as_deref(), Some("squashfuse_ll"));
        assert_eq!(o.subtype.as_deref(), Some("squashfuse_ll"));
    }

    #[test]
    fn uid_and_gid_zero_leave_owners_alone() {
        let o = mount(&["-o", "uid=0,gid=0", "a", "b"]).options;
        assert_eq!((o.uid, o.gid), (None, None));
        let o = mount(&["-o", "uid=0", "-o", "gid=7", "a", "b"]).options;
        assert_eq!((o.uid, o.gid), (None, Some(7)));
    }

    #[test]
    fn apptainer_call() {
        let r = mount(&[
            "-f",
            "-o",
            "allow_other,ro,uid=5,gid=6,offset=0",
            "/proc/self/fd/3",
            "/dev/fd/4",
        ]);
        assert!(r.options.foreground);
        assert_eq!(r.image, Path::new("/proc/self/fd/3"));
        assert_eq!(r.mountpoint, Path::new("/dev/fd/4"));
    }

    #[test]
    fn flags_and_joined_lists() {
        let o = mount(&[
            "-d",
            "-s",
            "-oclone_fd,max_threads=4,max_idle_threads=2",
            "a",
            "b",
        ])
        .options;
        assert!(o.debug && o.foreground);
        // -s wins over max_threads only when it comes after; squashfuse's -s is one thread.
        assert_eq!(o.threads, Some(4));
        let o = mount(&["-s", "a", "b"]).options;
        assert_eq!(o.threads, Some(1));
        let o = mount(&["a", "--", "-b"]).options;
        assert!(!o.foreground);
        let r = mount(&["a", "--", "-b"]);
        assert_eq!(r.mountpoint, Path::new("-b"));
        let o = mount(&[
            "-o",
            "subdir=x,notify_pipe=/p,timeout=5,nonempty,dev,suid",
            "a",
            "b",
        ])
        .options;
        assert_eq!(o.subdir.as_deref(), Some("x"));
        assert_eq!(o.timeout, 5);
        assert!(o.dev && o.suid);
    }

    #[test]
    fn refusals() {
        assert_eq!(
            refused(&["-o", "foo,ro,bar=1", "a", "b"]),
            "unknown option(s): `-o foo,bar=1'"
        );
        // sifuse's own options are not squashfuse's.
        assert!(refused(&["-o", "cache_size=8", "a", "b"]).contains("cache_size"));
        assert_eq!(refused(&["-x", "a", "b"]), "unknown option `-x'");
        assert_eq!(refused(&["a", "b", "c"]), "invalid argument `c'");
        assert_eq!(refused(&["a", "b", "-o"]), "missing argument after `-o'");
        assert!(refused(&["-o", "uid=x", "a", "b"]).contains("not a valid number"));
        assert!(refused(&["-o", "rw", "a", "b"]).contains("read-only"));
    }

    #[test]
    fn usage_when_asked_or_short_of_arguments() {
        let is_usage =
            |list: &[&str]| matches!(parse("squashfuse", &args(list)), Ok(Invocation::Usage));
        for list in [
            &[][..],
            &["a"],
            &["-h"],
            &["-f", "a"],
            &["--help", "a", "b"],
        ] {
            assert!(is_usage(list), "{list:?}");
        }
        assert!(!is_usage(&["a", "b"]));
        assert!(!is_usage(&["-x"]));
        let (out, err) = usage("squashfuse_ll");
        assert!(out.contains("-o uid=N") && out.contains("-o gid=N"));
        assert!(out.contains("Usage: squashfuse_ll [options] ARCHIVE MOUNTPOINT"));
        assert!(err.contains("-o allow_other"));
    }

    #[test]
    fn install_links_both_names_and_respects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = Path::new("/usr/bin/sifuse-test-target");
        let made = install(dir.path(), target, false).unwrap();
        assert_eq!(made.len(), 2);
        for n in COMPAT_NAMES {
            assert_eq!(fs::read_link(dir.path().join(n)).unwrap(), target);
        }
        // Again: nothing to do.
        assert!(install(dir.path(), target, false).unwrap().is_empty());
        // Someone else's squashfuse is not replaced unless forced.
        fs::remove_file(dir.path().join("squashfuse")).unwrap();
        fs::write(dir.path().join("squashfuse"), "#!/bin/sh\n").unwrap();
        let e = install(dir.path(), target, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(install(dir.path(), target, true).unwrap().len(), 1);
        assert_eq!(
            fs::read_link(dir.path().join("squashfuse")).unwrap(),
            target
        );
    }
}
