//! What /proc/self/mountinfo says is mounted at a path, so that `sifuse umount` touches
//! nothing but FUSE mounts.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Undo the kernel's octal escapes in a mountinfo field (`\040` for a space, and so on).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The line of the topmost mount at `path` in `mountinfo` text, if any.
pub fn line_in<'a>(mountinfo: &'a str, path: &Path) -> Option<&'a str> {
    mountinfo
        .lines()
        .rev()
        .find(|line| line.split(' ').nth(4).map(unescape).as_deref() == Some(path))
}

/// The mount point on a mountinfo line.
pub fn mount_point(line: &str) -> Option<PathBuf> {
    line.split(' ').nth(4).map(unescape)
}

/// Every mount point in `mountinfo` text, in its order (parents before the mounts on them).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(mount_point).collect()
}

/// The file system type on a mountinfo line: the field after the "-" separator that ends
/// the optional fields.
pub fn fs_type(line: &str) -> Option<&str> {
    let mut fields = line.split(' ').skip_while(|f| *f != "-");
    fields.next()?;
    fields.next()
}

/// The line of the mount whose id (the first field) is `id` in `mountinfo` text.
pub fn line_with_id(mountinfo: &str, id: u64) -> Option<&str> {
    let id = id.to_string();
    mountinfo
        .lines()
        .find(|line| line.split(' ').next() == Some(id.as_str()))
}

/// The mountinfo line of mount `id` in this process's mount namespace.
pub fn line_of(id: u64) -> io::Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(line_with_id(&info, id).map(str::to_string))
}

/// The mountinfo line of the topmost mount at `path` in this process's mount namespace.
pub fn line_at(path: &Path) -> io::Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(line_in(&info, path).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
42 27 0:39 / /tmp/a\\040b ro,nosuid,nodev,relatime shared:1 - fuse.sifuse /img.sif ro,user_id=0,group_id=0
43 27 0:40 / /tmp/x rw - tmpfs none rw
44 43 0:41 / /tmp/x ro - fuse.sifuse /other ro";

    fn type_at(path: &str) -> Option<&'static str> {
        line_in(INFO, Path::new(path)).and_then(fs_type)
    }

    #[test]
    fn finds_the_topmost_mount_and_its_type() {
        assert_eq!(type_at("/tmp/a b"), Some("fuse.sifuse"));
        assert_eq!(type_at("/proc"), Some("proc"));
        assert_eq!(type_at("/tmp/x"), Some("fuse.sifuse"));
        assert!(line_in(INFO, Path::new("/tmp/x"))
            .unwrap()
            .ends_with("/other ro"));
        assert_eq!(type_at("/tmp"), None);
        assert_eq!(fs_type("no separator"), None);
    }

    #[test]
    fn lists_mount_points() {
        assert_eq!(
            mount_points(INFO),
            ["/proc", "/tmp/a b", "/tmp/x", "/tmp/x"].map(PathBuf::from)
        );
    }

    #[test]
    fn finds_a_mount_by_id() {
        assert!(line_with_id(INFO, 43).unwrap().contains("tmpfs"));
        assert!(line_with_id(INFO, 4).is_none());
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b\011c\134d"), PathBuf::from("/a b\tc\\d"));
        assert_eq!(unescape(r"/trailing\04"), PathBuf::from(r"/trailing\04"));
    }
}
