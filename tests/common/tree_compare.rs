//! Exact comparison of two directory trees, as `lstat` and `l*xattr` see them.
//!
//! Used to prove that a view of a SquashFS image (kernel mount, sifuse mount, `unsquashfs`
//! or `sifuse extract` output) is identical to the tree the image was built from. Symlinks
//! are never followed. Every difference is reported as one human-readable line; an empty
//! result means the trees are identical for everything the options ask to compare.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What [`compare_trees`] compares. Everything that SquashFS stores is compared by default;
/// the flags relax the comparison for views that legitimately differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareOptions {
    /// Compare `st_size` of directories. Off by default: ext4 reports block multiples,
    /// SquashFS reports the size of its directory listing (+3).
    pub dir_sizes: bool,
    /// Compare the mtime of the root directory itself. On by default; turn it off when the
    /// actual root is a mount point or extraction directory that does not carry the
    /// image's root inode.
    pub root_mtime: bool,
    /// Compare mode, uid, gid and xattrs of the root directory itself. On by default, for
    /// the same reason as `root_mtime`.
    pub root_attrs: bool,
    /// Compare mtimes (seconds; SquashFS stores no sub-second part). On by default.
    pub mtimes: bool,
    /// Compare uid and gid. On by default.
    pub owners: bool,
    /// Compare `st_nlink` of everything but directories, whose link count depends on the
    /// file system. On by default.
    pub nlink: bool,
    /// Compare `st_nlink` of directories: 2 + number of subdirectories on ext4, tmpfs and
    /// SquashFS alike (mksquashfs stores it). On by default.
    pub dir_nlink: bool,
    /// Compare the content of regular files. On by default.
    pub content: bool,
    /// Compare extended attributes. On by default.
    pub xattrs: bool,
    /// Leave `security.*` xattrs out of the comparison. Off by default.
    pub ignore_security_xattrs: bool,
    /// Leave `system.*` xattrs (POSIX ACLs and the like) out of the comparison. Off by
    /// default.
    pub ignore_system_xattrs: bool,
    /// Require the same partition of regular files into hard-link groups (same
    /// `(st_dev, st_ino)`) on both sides. On by default.
    pub hard_links: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            dir_sizes: false,
            root_mtime: true,
            root_attrs: true,
            mtimes: true,
            owners: true,
            nlink: true,
            dir_nlink: true,
            content: true,
            xattrs: true,
            ignore_security_xattrs: false,
            ignore_system_xattrs: false,
            hard_links: true,
        }
    }
}

/// Compares the tree at `expected` with the tree at `actual` and returns one line per
/// difference, empty when they are identical. Paths in the messages are relative to the
/// roots (`.` is the root). A subtree present on one side only is reported once, not entry
/// by entry.
pub fn compare_trees(expected: &Path, actual: &Path, opts: &CompareOptions) -> Vec<String> {
    let mut cmp = Comparer {
        expected,
        actual,
        opts,
        diffs: Vec::new(),
        exp_inodes: HashMap::new(),
        act_inodes: HashMap::new(),
    };
    cmp.compare_entry(Path::new(""));
    if opts.hard_links {
        cmp.compare_hard_links();
    }
    cmp.diffs
}

/// Bytes actually allocated to `path` on disk (`st_blocks * 512`), without following a
/// final symlink. Lets a test check that a file is stored sparse.
pub fn sparse_allocated_bytes(path: &Path) -> u64 {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    md.blocks() * 512
}

/// All extended attributes of `path` (never following a symlink), name to value.
/// A file system without xattr support yields an empty map.
pub fn list_xattrs(path: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let names = loop {
        // SAFETY: a null buffer with size 0 asks for the needed size.
        let need = unsafe { libc::llistxattr(cpath.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(BTreeMap::new());
            }
            return Err(err);
        }
        let mut buf = vec![0u8; need as usize];
        // SAFETY: buf is valid for buf.len() bytes.
        let got = unsafe { libc::llistxattr(cpath.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue; // the list grew in between: ask again
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        break buf;
    };
    let mut map = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split at NUL");
        let value = loop {
            // SAFETY: as above.
            let need =
                unsafe { libc::lgetxattr(cpath.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
            if need < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = vec![0u8; need as usize];
            // SAFETY: buf is valid for buf.len() bytes.
            let got = unsafe {
                libc::lgetxattr(
                    cpath.as_ptr(),
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if got < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ERANGE) {
                    continue;
                }
                return Err(err);
            }
            buf.truncate(got as usize);
            break buf;
        };
        map.insert(name.to_vec(), value);
    }
    Ok(map)
}

struct Comparer<'a> {
    expected: &'a Path,
    actual: &'a Path,
    opts: &'a CompareOptions,
    diffs: Vec<String>,
    /// Regular files by (st_dev, st_ino), relative paths present as regular files on both
    /// sides only.
    exp_inodes: HashMap<(u64, u64), Vec<PathBuf>>,
    act_inodes: HashMap<(u64, u64), Vec<PathBuf>>,
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        format!("{:?}", rel).trim_matches('"').to_string()
    }
}

fn type_name(md: &Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_char_device() {
        "char device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "unknown type"
    }
}

/// Printable form of an xattr name or value: text as is, otherwise hex; long values cut.
fn show_bytes(b: &[u8]) -> String {
    const MAX: usize = 64;
    let cut = &b[..b.len().min(MAX)];
    let mut s = match std::str::from_utf8(cut) {
        Ok(t) if !t.chars().any(|c| c.is_control()) => format!("{t:?}"),
        _ => format!(
            "0x{}",
            cut.iter().map(|x| format!("{x:02x}")).collect::<String>()
        ),
    };
    if b.len() > MAX {
        s.push_str(&format!("... ({} bytes)", b.len()));
    }
    s
}

/// `major:minor` of a Linux `dev_t` (glibc's encoding).
fn dev_pair(rdev: u64) -> String {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    format!("{major}:{minor}")
}

impl Comparer<'_> {
    fn diff(&mut self, rel: &Path, what: String) {
        self.diffs.push(format!("{}: {what}", show(rel)));
    }

    fn compare_entry(&mut self, rel: &Path) {
        let (exp_path, act_path) = (self.expected.join(rel), self.actual.join(rel));
        let exp = fs::symlink_metadata(&exp_path);
        let act = fs::symlink_metadata(&act_path);
        let (exp, act) = match (exp, act) {
            (Ok(e), Ok(a)) => (e, a),
            (Ok(e), Err(err)) => {
                return self.diff(rel, format!("missing in actual ({}): {err}", type_name(&e)));
            }
            (Err(err), Ok(a)) => {
                return self.diff(
                    rel,
                    format!("unexpected in actual ({}): {err}", type_name(&a)),
                );
            }
            (Err(e1), Err(e2)) => {
                return self.diff(rel, format!("cannot lstat either side: {e1} / {e2}"));
            }
        };
        if exp.file_type() != act.file_type() {
            return self.diff(
                rel,
                format!(
                    "type differs: expected {}, actual {}",
                    type_name(&exp),
                    type_name(&act)
                ),
            );
        }
        let is_root = rel.as_os_str().is_empty();
        let ft = exp.file_type();

        if !is_root || self.opts.root_attrs {
            if exp.mode() != act.mode() {
                self.diff(
                    rel,
                    format!(
                        "mode differs: expected {:o}, actual {:o}",
                        exp.mode(),
                        act.mode()
                    ),
                );
            }
            if self.opts.owners && exp.uid() != act.uid() {
                self.diff(
                    rel,
                    format!("uid differs: expected {}, actual {}", exp.uid(), act.uid()),
                );
            }
            if self.opts.owners && exp.gid() != act.gid() {
                self.diff(
                    rel,
                    format!("gid differs: expected {}, actual {}", exp.gid(), act.gid()),
                );
            }
        }
        if self.opts.mtimes && (!is_root || self.opts.root_mtime) && exp.mtime() != act.mtime() {
            self.diff(
                rel,
                format!(
                    "mtime differs: expected {}, actual {}",
                    exp.mtime(),
                    act.mtime()
                ),
            );
        }
        let size_matters = ft.is_file() || ft.is_symlink() || (ft.is_dir() && self.opts.dir_sizes);
        if size_matters && exp.size() != act.size() {
            self.diff(
                rel,
                format!(
                    "size differs: expected {}, actual {}",
                    exp.size(),
                    act.size()
                ),
            );
        }
        let nlink_matters = if ft.is_dir() {
            self.opts.dir_nlink
        } else {
            self.opts.nlink
        };
        if nlink_matters && exp.nlink() != act.nlink() {
            self.diff(
                rel,
                format!(
                    "nlink differs: expected {}, actual {}",
                    exp.nlink(),
                    act.nlink()
                ),
            );
        }
        if (ft.is_char_device() || ft.is_block_device()) && exp.rdev() != act.rdev() {
            self.diff(
                rel,
                format!(
                    "rdev differs: expected {}, actual {}",
                    dev_pair(exp.rdev()),
                    dev_pair(act.rdev())
                ),
            );
        }
        if ft.is_symlink() {
            match (fs::read_link(&exp_path), fs::read_link(&act_path)) {
                (Ok(e), Ok(a)) if e != a => self.diff(
                    rel,
                    format!(
                        "symlink target differs: expected {}, actual {}",
                        show_bytes(e.as_os_str().as_bytes()),
                        show_bytes(a.as_os_str().as_bytes())
                    ),
                ),
                (Ok(_), Ok(_)) => {}
                (e, a) => self.diff(rel, format!("readlink failed: {e:?} / {a:?}")),
            }
        }
        if ft.is_file() {
            self.exp_inodes
                .entry((exp.dev(), exp.ino()))
                .or_default()
                .push(rel.to_path_buf());
            self.act_inodes
                .entry((act.dev(), act.ino()))
                .or_default()
                .push(rel.to_path_buf());
            if self.opts.content && exp.size() == act.size() {
                if let Some(d) = compare_content(&exp_path, &act_path, exp.size()) {
                    self.diff(rel, d);
                }
            }
        }
        if self.opts.xattrs && (!is_root || self.opts.root_attrs) {
            self.compare_xattrs(rel, &exp_path, &act_path);
        }
        if ft.is_dir() {
            self.compare_dir(rel, &exp_path, &act_path);
        }
    }

    fn compare_dir(&mut self, rel: &Path, exp_path: &Path, act_path: &Path) {
        let names = |p: &Path| -> io::Result<BTreeSet<OsString>> {
            fs::read_dir(p)?.map(|e| e.map(|e| e.file_name())).collect()
        };
        let (exp_names, act_names) = match (names(exp_path), names(act_path)) {
            (Ok(e), Ok(a)) => (e, a),
            (e, a) => {
                let (e, a) = (e.err(), a.err());
                return self.diff(rel, format!("readdir failed: expected {e:?}, actual {a:?}"));
            }
        };
        for name in exp_names.union(&act_names) {
            self.compare_entry(&rel.join(name));
        }
    }

    fn filter_xattrs(&self, map: BTreeMap<Vec<u8>, Vec<u8>>) -> BTreeMap<Vec<u8>, Vec<u8>> {
        map.into_iter()
            .filter(|(name, _)| {
                !(self.opts.ignore_security_xattrs && name.starts_with(b"security.")
                    || self.opts.ignore_system_xattrs && name.starts_with(b"system."))
            })
            .collect()
    }

    fn compare_xattrs(&mut self, rel: &Path, exp_path: &Path, act_path: &Path) {
        let (exp, act) = match (list_xattrs(exp_path), list_xattrs(act_path)) {
            (Ok(e), Ok(a)) => (self.filter_xattrs(e), self.filter_xattrs(a)),
            (e, a) => {
                let (e, a) = (e.err(), a.err());
                return self.diff(
                    rel,
                    format!("listing xattrs failed: expected {e:?}, actual {a:?}"),
                );
            }
        };
        for (name, ev) in &exp {
            match act.get(name) {
                None => self.diff(rel, format!("xattr {} missing in actual", show_bytes(name))),
                Some(av) if av != ev => self.diff(
                    rel,
                    format!(
                        "xattr {} differs: expected {}, actual {}",
                        show_bytes(name),
                        show_bytes(ev),
                        show_bytes(av)
                    ),
                ),
                Some(_) => {}
            }
        }
        for name in act.keys().filter(|n| !exp.contains_key(*n)) {
            self.diff(
                rel,
                format!("unexpected xattr {} in actual", show_bytes(name)),
            );
        }
    }

    /// The partition of regular files (present on both sides) into hard-link groups must be
    /// the same. Each group that differs is reported once.
    fn compare_hard_links(&mut self) {
        fn groups(map: &HashMap<(u64, u64), Vec<PathBuf>>) -> HashMap<PathBuf, Vec<PathBuf>> {
            let mut by_path = HashMap::new();
            for paths in map.values() {
                let mut sorted = paths.clone();
                sorted.sort();
                for p in paths {
                    by_path.insert(p.clone(), sorted.clone());
                }
            }
            by_path
        }
        let exp = groups(&self.exp_inodes);
        let act = groups(&self.act_inodes);
        let both: BTreeSet<&PathBuf> = exp.keys().filter(|p| act.contains_key(*p)).collect();
        let mut reported = BTreeSet::new();
        for p in both {
            let keep = |g: &Vec<PathBuf>| -> Vec<PathBuf> {
                g.iter()
                    .filter(|q| exp.contains_key(*q) && act.contains_key(*q))
                    .cloned()
                    .collect()
            };
            let (eg, ag) = (keep(&exp[p]), keep(&act[p]));
            if eg != ag && reported.insert(eg.clone()) {
                let list = |g: &[PathBuf]| g.iter().map(|q| show(q)).collect::<Vec<_>>().join(", ");
                self.diffs.push(format!(
                    "{}: hard-link group differs: expected [{}], actual [{}]",
                    show(p),
                    list(&eg),
                    list(&ag)
                ));
            }
        }
    }
}

/// Streams both files in 1 MiB chunks; `None` when equal. Reports the first differing
/// offset.
fn compare_content(exp_path: &Path, act_path: &Path, size: u64) -> Option<String> {
    const CHUNK: usize = 1 << 20;
    let open = |p: &Path| File::open(p);
    let (mut ef, mut af) = match (open(exp_path), open(act_path)) {
        (Ok(e), Ok(a)) => (e, a),
        (e, a) => {
            return Some(format!(
                "open failed: expected {:?}, actual {:?}",
                e.err(),
                a.err()
            ))
        }
    };
    let mut eb = vec![0u8; CHUNK];
    let mut ab = vec![0u8; CHUNK];
    let mut offset = 0u64;
    loop {
        let en = match read_full(&mut ef, &mut eb) {
            Ok(n) => n,
            Err(e) => return Some(format!("read of expected failed at {offset}: {e}")),
        };
        let an = match read_full(&mut af, &mut ab) {
            Ok(n) => n,
            Err(e) => return Some(format!("read failed at offset {offset}: {e}")),
        };
        let n = en.min(an);
        if eb[..n] != ab[..n] {
            let at = eb[..n]
                .iter()
                .zip(&ab[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Some(format!(
                "content differs at offset {} (expected byte {:#04x}, actual {:#04x})",
                offset + at as u64,
                eb[at],
                ab[at]
            ));
        }
        if en != an {
            return Some(format!(
                "content length differs: expected {} bytes, actual {} bytes read (size {size})",
                offset + en as u64,
                offset + an as u64
            ));
        }
        if en == 0 {
            return None;
        }
        offset += en as u64;
    }
}

/// Reads until `buf` is full or end of file.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The self-tests that need private parts; the rest are in tree_compare_tests.rs.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_namespace_filters() {
        let mut m = BTreeMap::new();
        m.insert(b"security.selinux".to_vec(), b"x".to_vec());
        m.insert(b"system.posix_acl_access".to_vec(), b"y".to_vec());
        m.insert(b"user.z".to_vec(), b"z".to_vec());
        let opts = CompareOptions {
            ignore_security_xattrs: true,
            ignore_system_xattrs: true,
            ..Default::default()
        };
        let c = Comparer {
            expected: Path::new("/"),
            actual: Path::new("/"),
            opts: &opts,
            diffs: vec![],
            exp_inodes: HashMap::new(),
            act_inodes: HashMap::new(),
        };
        let kept: Vec<_> = c.filter_xattrs(m).into_keys().collect();
        assert_eq!(kept, vec![b"user.z".to_vec()]);
    }
}
