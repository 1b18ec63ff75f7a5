//! Test fixtures: the source tree and SquashFS images that `fixtures/generate.sh` builds.
//!
//! They are generated once per version of the script into
//! `<CARGO_TARGET_TMPDIR>/fixtures-<hash of generate.sh>/` and shared by every test binary
//! and every concurrent test process (nextest runs each test as its own process): the
//! first process takes an exclusive `flock` on a lock file, generates into a scratch
//! directory, writes a `.done` marker and renames the directory into place; the others wait
//! on the lock and then reuse the result.
//!
//! Generating needs root and squashfs-tools; tests never skip silently when those are
//! missing, they fail with a message that says what to install.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The generated fixtures.
#[derive(Debug)]
pub struct Fixtures {
    /// The directory holding everything below.
    pub root: PathBuf,
    /// The source tree every image was built from.
    pub tree: PathBuf,
    /// `(name, path)` of every image, in the order of `images/list.txt`.
    pub images: Vec<(String, PathBuf)>,
}

impl Fixtures {
    /// Path of the image called `name` (as in `images/list.txt`, e.g. `"gzip"`).
    pub fn image(&self, name: &str) -> &Path {
        self.images
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| {
                let names: Vec<&str> = self.images.iter().map(|(n, _)| n.as_str()).collect();
                panic!("no fixture image named {name:?}; the images are {names:?}")
            })
    }

    /// Whether the image was built with `-comp lzma`, which the kernel cannot mount.
    pub fn kernel_can_mount(name: &str) -> bool {
        !name.starts_with("lzma")
    }

    /// Whether the image stores xattrs (the `-no-xattrs` variants do not).
    pub fn has_xattrs(name: &str) -> bool {
        !name.contains("no-xattrs")
    }
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/generate.sh");

/// The fixtures, generated on first use (by this or another process) and then reused.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(ensure_fixtures)
}

/// Where cargo wants integration tests to put scratch files.
pub fn target_tmpdir() -> PathBuf {
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("tmp"),
    }
}

/// Panics with instructions unless the machine can build (and tests can use) the fixtures.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "\n\n*** sifuse fixture tests must run as root ***\n\
             They create device nodes, files owned by arbitrary uids, trusted.* xattrs, and \
             mount SquashFS images with the kernel. Run the tests as root (e.g. `sudo -E \
             cargo test`).\n\n"
        );
    }
    for tool in ["mksquashfs", "unsquashfs", "setfattr", "python3"] {
        if !in_path(tool) {
            panic!(
                "\n\n*** `{tool}` not found in PATH: the sifuse test fixtures need it ***\n\
                 Install the tools with:\n    apt-get install squashfs-tools attr python3\n\n"
            );
        }
    }
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// FNV-1a, 64 bit: a hash that is stable across Rust releases and needs no crate.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn ensure_fixtures() -> Fixtures {
    require_root_and_tools();
    let script = fs::read(SCRIPT).unwrap_or_else(|e| panic!("cannot read {SCRIPT}: {e}"));
    let base = target_tmpdir();
    fs::create_dir_all(&base).unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
    let name = format!("fixtures-{:016x}", fnv1a(&script));
    let root = base.join(&name);

    if !root.join(".done").exists() {
        let lock_path = base.join(format!("{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", lock_path.display()));
        flock(&lock, &lock_path);
        // Another process may have finished while we waited for the lock.
        if !root.join(".done").exists() {
            generate(&base, &name, &root);
        }
        drop(lock); // closing the file releases the lock
    }
    load(root)
}

fn flock(lock: &File, path: &Path) {
    loop {
        // SAFETY: a valid open file descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("flock {}: {err}", path.display());
        }
    }
}

/// Runs generate.sh into a scratch directory and renames it to `root`. Called with the
/// lock held.
fn generate(base: &Path, name: &str, root: &Path) {
    let partial = base.join(format!("{name}.partial"));
    for stale in [&partial, &root.to_path_buf()] {
        if stale.exists() {
            fs::remove_dir_all(stale)
                .unwrap_or_else(|e| panic!("cannot remove stale {}: {e}", stale.display()));
        }
    }
    let out = Command::new("bash")
        .arg(SCRIPT)
        .arg(&partial)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {SCRIPT}: {e}"));
    if !out.status.success() {
        panic!(
            "\n\n*** {SCRIPT} {} failed ({}) ***\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
            partial.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(partial.join(".done"), b"").expect("write .done marker");
    fs::rename(&partial, root)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", partial.display(), root.display()));
    remove_old_versions(base, name);
}

/// Fixtures of earlier versions of generate.sh only take disk space: remove them.
fn remove_old_versions(base: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let n = file_name.to_string_lossy();
        if n.starts_with("fixtures-") && !n.starts_with(current) {
            let p = entry.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

fn load(root: PathBuf) -> Fixtures {
    let list_path = root.join("images/list.txt");
    let list = fs::read_to_string(&list_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", list_path.display()));
    let images = list
        .lines()
        .filter(|l| !l.is_empty())
        .map(|n| (n.to_string(), root.join("images").join(format!("{n}.sqfs"))))
        .collect::<Vec<_>>();
    assert!(
        !images.is_empty(),
        "{} lists no images",
        list_path.display()
    );
    for (_, p) in &images {
        assert!(p.is_file(), "fixture image {} is missing", p.display());
    }
    Fixtures {
        tree: root.join("tree"),
        root,
        images,
    }
}
