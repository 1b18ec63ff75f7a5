//! Reading everything a mount shows, as a client that tolerates errors would: every
//! directory listed, every file read, every symlink and xattr, each failure recorded with
//! its errno rather than stopping the walk. The fault tests use it on damaged images.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What one pass over a mounted tree met.
#[derive(Debug, Default)]
pub struct TreeRead {
    pub entries: usize,
    pub bytes: u64,
    /// Each failed call: the path, what was called, and the errno.
    pub errors: Vec<(PathBuf, &'static str, i32)>,
}

impl TreeRead {
    /// The errnos met, other than the ones in `allowed`.
    pub fn unexpected(&self, allowed: &[i32]) -> Vec<String> {
        self.errors
            .iter()
            .filter(|(_, _, e)| !allowed.contains(e))
            .map(|(p, what, e)| {
                format!(
                    "{what} {}: {}",
                    p.display(),
                    std::io::Error::from_raw_os_error(*e)
                )
            })
            .collect()
    }

    pub fn count(&self, errno: i32) -> usize {
        self.errors.iter().filter(|(_, _, e)| *e == errno).count()
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Read everything under `root`, at most `byte_budget` bytes of file data in all (a
/// damaged size can describe a huge sparse file).
pub fn read_tree(root: &Path, byte_budget: u64) -> TreeRead {
    let mut out = TreeRead::default();
    let mut budget = byte_budget;
    let mut stack = vec![root.to_path_buf()];
    let mut buf = vec![0u8; 128 << 10];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                out.errors.push((dir, "opendir", errno_of(&e)));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.errors.push((dir.clone(), "readdir", errno_of(&e)));
                    break;
                }
            };
            out.entries += 1;
            let path = entry.path();
            xattrs(&path, &mut out);
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    out.errors.push((path, "lstat", errno_of(&e)));
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_symlink() {
                if let Err(e) = fs::read_link(&path) {
                    out.errors.push((path, "readlink", errno_of(&e)));
                }
            } else if ft.is_file() {
                let mut f = match fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        out.errors.push((path, "open", errno_of(&e)));
                        continue;
                    }
                };
                while budget > 0 {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            out.bytes += n as u64;
                            budget = budget.saturating_sub(n as u64);
                        }
                        Err(e) => {
                            out.errors.push((path.clone(), "read", errno_of(&e)));
                            break;
                        }
                    }
                }
            }
        }
    }
    out
}

/// llistxattr, then lgetxattr of every name listed.
fn xattrs(path: &Path, out: &mut TreeRead) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: a valid C string and a buffer of the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        out.errors
            .push((path.to_path_buf(), "llistxattr", errno_of(&e)));
        return;
    }
    names.truncate(n as usize);
    let mut value = vec![0u8; 64 << 10];
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).unwrap();
        // SAFETY: valid C strings and a buffer of the length passed.
        let r = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            out.errors
                .push((path.to_path_buf(), "lgetxattr", errno_of(&e)));
        }
    }
}

/// statfs(2) on `path`: a request every FUSE server answers itself, never from the
/// kernel's caches, so it shows whether the server is still there.
pub fn statfs_errno(path: &Path) -> Option<i32> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        None
    } else {
        Some(errno_of(&std::io::Error::last_os_error()))
    }
}

/// Whether process `pid` is alive (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// What a server may use beyond its `cache_size`, whatever the image.
pub const MEMORY_SLACK: u64 = 96 << 20;

/// Assert that the server `pid` peaked within `cache` bytes + [`MEMORY_SLACK`]; `what`
/// names the case in the message.
pub fn assert_peak_within_budget(pid: i32, cache: u64, what: &str) {
    let rss = peak_rss(pid).expect("the daemon's VmHWM");
    eprintln!("{what}: daemon peak RSS {} MiB", rss >> 20);
    assert!(
        rss <= cache + MEMORY_SLACK,
        "{what}: the daemon peaked at {} MiB, over the {} MiB cache + 96 MiB",
        rss >> 20,
        cache >> 20
    );
}

/// A process's peak resident set (VmHWM) in bytes.
pub fn peak_rss(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
