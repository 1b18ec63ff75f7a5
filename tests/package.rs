//! The packages `scripts/package.sh` builds, here from the binary under test (a release
//! package is the same script over a release build): the .deb holds exactly the files it
//! should, installs with `dpkg -i` on a clean system, its compat link answers `-V` and mounts
//! an image as a launcher would, and `dpkg -r` removes every file it installed; the .rpm
//! lists the same files in the places RPM distributions use.
//!
//! The clean system is this machine's root seen through an overlay, inside a private mount
//! namespace that `unshare` makes for each step and that ends with it: every write (dpkg's
//! database, the installed files) lands in the overlay's upper directory, inside the test's
//! scratch directory, which the test then removes. Nothing is installed on the machine.

mod common;
mod mount_util;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use mount_util::{pids_with_arg, require_mount, scratch, wait_for, SIFUSE};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files and links the .deb installs (directories aside).
const DEB_FILES: &[&str] = &[
    "/usr/bin/sifuse",
    "/usr/libexec/sifuse/squashfuse",
    "/usr/libexec/sifuse/squashfuse_ll",
    "/usr/share/bash-completion/completions/sifuse",
    "/usr/share/doc/sifuse/LICENSE-APACHE",
    "/usr/share/doc/sifuse/LICENSE-MIT",
    "/usr/share/doc/sifuse/README.md",
    "/usr/share/doc/sifuse/copyright",
    "/usr/share/fish/vendor_completions.d/sifuse.fish",
    "/usr/share/man/man1/sifuse.1.gz",
    "/usr/share/zsh/vendor-completions/_sifuse",
];

/// Everything the .rpm owns (`rpm -qlp` lists files and the directories it owns).
const RPM_FILES: &[&str] = &[
    "/usr/bin/sifuse",
    "/usr/libexec/sifuse",
    "/usr/libexec/sifuse/squashfuse",
    "/usr/libexec/sifuse/squashfuse_ll",
    "/usr/share/bash-completion/completions/sifuse",
    "/usr/share/doc/sifuse",
    "/usr/share/doc/sifuse/README.md",
    "/usr/share/fish/vendor_completions.d/sifuse.fish",
    "/usr/share/licenses/sifuse",
    "/usr/share/licenses/sifuse/LICENSE-APACHE",
    "/usr/share/licenses/sifuse/LICENSE-MIT",
    "/usr/share/man/man1/sifuse.1.gz",
    "/usr/share/zsh/site-functions/_sifuse",
];

/// Where dpkg and the triggers it runs (man-db) keep their own records: the only places
/// an install and removal may leave changes behind.
const BOOKKEEPING: &[&str] = &[
    "var/lib/dpkg",
    "var/log",
    "var/cache/man",
    "var/cache/debconf",
];

/// The mount point of the compat mount, a name no other test uses, so that a server left
/// running can be found by it.
const MOUNTPOINT: &str = "/tmp/sifuse-package-test-mnt";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// This machine's root behind an overlay whose upper and work directories live in the
/// test's scratch directory; the packages' directory appears inside at /tmp/pkg.
struct CleanSystem {
    upper: PathBuf,
    work: PathBuf,
    root: PathBuf,
    packages: PathBuf,
}

/// Run in `unshare --mount --propagation private`: mount the overlay, give it /dev (for
/// /dev/fuse), /proc and fresh tmpfs /tmp and /run, bind the packages' directory, and run
/// the step's script chrooted into it. The namespace, and every mount in it, ends with the
/// step's last process.
const ENTER: &str = r#"
upper=$1 work=$2 root=$3 packages=$4 script=$5
mount -t overlay overlay -o "lowerdir=/,upperdir=$upper,workdir=$work" "$root"
mount --rbind /dev "$root/dev"
mount --rbind /proc "$root/proc"
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
mkdir "$root/tmp/pkg"
mount --bind "$packages" "$root/tmp/pkg"
exec chroot "$root" /bin/sh -euc "$script"
"#;

impl CleanSystem {
    fn new(dir: &Path, packages: &Path) -> CleanSystem {
        let sys = CleanSystem {
            upper: dir.join("upper"),
            work: dir.join("work"),
            root: dir.join("root"),
            packages: packages.to_path_buf(),
        };
        for d in [&sys.upper, &sys.work, &sys.root] {
            fs::create_dir(d).unwrap();
        }
        sys
    }

    /// Run `script` with `sh -eu` inside the clean system; its output, whatever the status.
    fn sh(&self, script: &str) -> Output {
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-euc",
                ENTER,
                "enter",
            ])
            .args([&self.upper, &self.work, &self.root, &self.packages])
            .arg(script)
            .output()
            .expect("run unshare (util-linux)")
    }

    /// Like `sh`, and the script must succeed.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the clean system, `{script}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    }

    /// Every path in the upper directory (what the system's changes are), with its kind.
    fn changes(&self) -> BTreeMap<String, &'static str> {
        let mut seen = BTreeMap::new();
        let mut stack = vec![self.upper.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                let rel = e
                    .path()
                    .strip_prefix(&self.upper)
                    .unwrap()
                    .display()
                    .to_string();
                let kind = if t.is_dir() {
                    stack.push(e.path());
                    "directory"
                } else if t.is_char_device() {
                    "whiteout (a deleted file of the machine)"
                } else if t.is_symlink() {
                    "symlink"
                } else {
                    "file"
                };
                seen.insert(rel, kind);
            }
        }
        seen
    }

    /// A file as installed, read from the upper directory.
    fn installed(&self, path: &str) -> PathBuf {
        self.upper.join(path.trim_start_matches('/'))
    }
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
        .read_to_end(&mut text)
        .unwrap();
    text
}

#[test]
fn deb_installs_mounts_and_removes_cleanly_and_rpm_lists_the_same_files() {
    require_mount();
    let dir = scratch("package");
    let out = dir.path().join("out");

    // Build both packages from the binary under test.
    let made = run(Command::new(repo().join("scripts/package.sh"))
        .arg("--binary")
        .arg(SIFUSE)
        .arg("--out")
        .arg(&out));
    let made: Vec<PathBuf> = stdout(&made).lines().map(PathBuf::from).collect();
    assert_eq!(
        made.len(),
        2,
        "package.sh prints the .deb and the .rpm: {made:?}"
    );
    let (deb, rpm) = (&made[0], &made[1]);
    assert!(
        deb.to_string_lossy().ends_with(".deb") && deb.is_file(),
        "{deb:?}"
    );
    assert!(
        rpm.to_string_lossy().ends_with(".rpm") && rpm.is_file(),
        "{rpm:?}"
    );

    // The .deb: exactly these files, owned by root, and what it depends on.
    let listing = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(deb)));
    let mut files = Vec::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "root/root", "owned by root: {line}");
        let path = fields[5].trim_start_matches('.');
        if !fields[0].starts_with('d') {
            files.push(path.to_string());
        }
    }
    files.sort();
    assert_eq!(files, DEB_FILES);
    let field = |name: &str| stdout(&run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name)));
    assert_eq!(field("Package").trim(), "sifuse");
    assert_eq!(field("Version").trim(), VERSION);
    let depends = field("Depends");
    assert!(
        depends.contains("fuse3") && depends.contains("libc6 (>= 2."),
        "Depends: {depends}"
    );

    // The .rpm: its file list and what it requires.
    let mut rpm_files: Vec<String> = stdout(&run(Command::new("rpm").arg("-qlp").arg(rpm)))
        .lines()
        .map(str::to_string)
        .collect();
    rpm_files.sort();
    assert_eq!(rpm_files, RPM_FILES);
    let requires = stdout(&run(Command::new("rpm")
        .args(["-qp", "--requires"])
        .arg(rpm)));
    assert!(
        requires.lines().any(|l| l.trim() == "fuse3"),
        "Requires: {requires}"
    );
    let rpm_version = stdout(&run(Command::new("rpm")
        .args(["-qp", "--queryformat", "%{VERSION}"])
        .arg(rpm)));
    assert_eq!(rpm_version, VERSION);

    // A clean system: no sifuse package installed (one installed on this machine is purged
    // in the overlay only).
    fs::copy(
        repo().join("fixtures/tiny/tiny-gzip.sqfs"),
        out.join("tiny.sqfs"),
    )
    .unwrap();
    let sys = CleanSystem::new(dir.path(), &out);
    sys.ok("test -f /var/lib/dpkg/status; if dpkg-query -W sifuse >/dev/null 2>&1; then dpkg --purge sifuse; fi");
    let before = sys.changes();

    // dpkg -i.
    let deb_name = deb.file_name().unwrap().to_str().unwrap();
    sys.ok(&format!("dpkg -i /tmp/pkg/{deb_name}"));
    let bin = sys.installed("/usr/bin/sifuse");
    let readelf = stdout(&run(Command::new("readelf").arg("-S").arg(&bin)));
    assert!(
        !readelf.contains(".debug_info") && !readelf.contains(".symtab"),
        "/usr/bin/sifuse is installed stripped:\n{readelf}"
    );
    for link in ["squashfuse_ll", "squashfuse"] {
        let path = sys.installed(&format!("/usr/libexec/sifuse/{link}"));
        assert_eq!(fs::read_link(&path).unwrap(), Path::new("../../bin/sifuse"));
    }
    assert_eq!(
        gunzip(&sys.installed("/usr/share/man/man1/sifuse.1.gz")),
        fs::read(repo().join("man/sifuse.1")).unwrap(),
        "the installed man page is man/sifuse.1"
    );
    for (shell, path) in [
        ("bash", "/usr/share/bash-completion/completions/sifuse"),
        ("zsh", "/usr/share/zsh/vendor-completions/_sifuse"),
        ("fish", "/usr/share/fish/vendor_completions.d/sifuse.fish"),
    ] {
        let want = run(Command::new(SIFUSE).args(["completions", shell])).stdout;
        assert_eq!(fs::read(sys.installed(path)).unwrap(), want, "{path}");
    }
    for (installed, source) in [
        ("/usr/share/doc/sifuse/README.md", "README.md"),
        ("/usr/share/doc/sifuse/LICENSE-MIT", "LICENSE-MIT"),
        ("/usr/share/doc/sifuse/LICENSE-APACHE", "LICENSE-APACHE"),
    ] {
        assert_eq!(
            fs::read(sys.installed(installed)).unwrap(),
            fs::read(repo().join(source)).unwrap(),
            "{installed}"
        );
    }

    // The installed commands answer; the compat links are not on PATH.
    let v = sys.ok("/usr/libexec/sifuse/squashfuse_ll -V; /usr/libexec/sifuse/squashfuse -V");
    assert_eq!(
        v,
        format!("squashfuse_ll (sifuse {VERSION})\nsquashfuse (sifuse {VERSION})\n")
    );
    let v = sys.ok("sifuse --version");
    assert!(v.starts_with(&format!("sifuse {VERSION}\ncommit: ")), "{v}");
    let found = sys.ok("command -v squashfuse_ll || true");
    assert!(!found.contains("/usr/libexec/sifuse"), "on PATH: {found}");

    // A mount through the installed compat link, as SingularityCE runs it (daemon, ro,
    // uid=0,gid=0); unmounted on the way out whatever happens, and its server gone after.
    let shown = sys.ok(&format!(
        "mkdir {MOUNTPOINT}; trap 'umount -l {MOUNTPOINT} 2>/dev/null || true' EXIT
         /usr/libexec/sifuse/squashfuse_ll -o ro,uid=0,gid=0 /tmp/pkg/tiny.sqfs {MOUNTPOINT}
         grep -c ' {MOUNTPOINT} .* - fuse.squashfuse_ll ' /proc/self/mountinfo
         cat {MOUNTPOINT}/hello.txt
         umount {MOUNTPOINT}"
    ));
    assert_eq!(shown, "1\nhello, squashfs\n");
    let server_gone = wait_for(Duration::from_secs(10), || {
        pids_with_arg(|arg| arg == MOUNTPOINT.as_bytes()).is_empty()
    });
    assert!(
        server_gone,
        "the compat mount's server still runs after its unmount"
    );

    // dpkg -r: nothing the package installed is left, and nothing else changed but dpkg's
    // records and the directories the overlay copied up on the way (which the machine has).
    sys.ok("dpkg -r sifuse");
    let after = sys.changes();
    let left: Vec<String> = after
        .iter()
        .filter(|(path, kind)| before.get(*path) != Some(*kind))
        .filter(|(path, _)| !BOOKKEEPING.iter().any(|b| path.starts_with(b)))
        .filter(|(path, kind)| !(**kind == "directory" && Path::new("/").join(path).is_dir()))
        .map(|(path, kind)| format!("/{path} ({kind})"))
        .collect();
    assert!(left.is_empty(), "dpkg -r left these behind: {left:?}");
    let status = sys.ok("dpkg-query -W -f '${db:Status-Abbrev}' sifuse 2>/dev/null || true");
    assert!(!status.starts_with("ii"), "still installed: {status}");
}
