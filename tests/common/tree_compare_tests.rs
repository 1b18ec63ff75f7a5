//! Self-tests of `common::tree_compare`: each kind of difference is found, and identical
//! trees show none. Only `fixtures_selfcheck` includes this file, so they run once rather
//! than in every test binary that uses `common`.

use crate::common::tree_compare::*;
use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "lsetxattr {name} on {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

fn set_mtime(path: &Path, secs: i64) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// A small tree with a bit of everything that works without root.
fn build(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("a.txt"), b"hello").unwrap();
    fs::write(root.join("dir/b.bin"), vec![7u8; 3 << 20]).unwrap();
    fs::write(root.join("dir/sub/c"), b"").unwrap();
    fs::hard_link(root.join("a.txt"), root.join("dir/a-link")).unwrap();
    symlink("../a.txt", root.join("dir/link")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    let sparse = File::create(root.join("sparse")).unwrap();
    sparse.set_len(50 << 20).unwrap();
    fs::set_permissions(root.join("dir/sub/c"), fs::Permissions::from_mode(0o4755)).unwrap();
    set_xattr(&root.join("a.txt"), "user.one", b"1");
    set_xattr(&root.join("dir"), "user.big", &[0x55; 2000]);
    for p in [
        "a.txt",
        "dir/b.bin",
        "dir/sub/c",
        "dir/link",
        "dangling",
        "sparse",
        "dir/sub",
        "dir",
        "",
    ] {
        set_mtime(&root.join(p), 1_000_000_000);
    }
}

fn pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    build(&a);
    build(&b);
    (tmp, a, b)
}

fn diffs(a: &Path, b: &Path) -> Vec<String> {
    compare_trees(a, b, &CompareOptions::default())
}

#[test]
fn identical_trees_have_no_differences() {
    let (_tmp, a, b) = pair();
    assert_eq!(diffs(&a, &b), Vec::<String>::new());
    assert_eq!(diffs(&a, &a), Vec::<String>::new());
}

#[test]
fn cp_preserving_everything_is_identical() {
    let (tmp, a, _) = pair();
    let c = tmp.path().join("c");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&c)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(diffs(&a, &c), Vec::<String>::new());
}

#[test]
fn one_mode_bit() {
    let (_tmp, a, b) = pair();
    fs::set_permissions(b.join("dir/sub/c"), fs::Permissions::from_mode(0o755)).unwrap();
    let d = diffs(&a, &b);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].starts_with("dir/sub/c: mode differs: expected 104755, actual 100755"),
        "{d:?}"
    );
}

#[test]
fn one_byte() {
    let (_tmp, a, b) = pair();
    let mut data = vec![7u8; 3 << 20];
    data[(2 << 20) + 5] = 8;
    fs::write(b.join("dir/b.bin"), data).unwrap();
    set_mtime(&b.join("dir/b.bin"), 1_000_000_000);
    let d = diffs(&a, &b);
    assert_eq!(
        d,
        vec![format!(
            "dir/b.bin: content differs at offset {} (expected byte 0x07, actual 0x08)",
            (2 << 20) + 5
        )]
    );
}

#[test]
fn one_byte_in_sparse_file() {
    let (_tmp, a, b) = pair();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(b.join("sparse"))
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"x", 40 << 20).unwrap();
    drop(f);
    set_mtime(&b.join("sparse"), 1_000_000_000);
    let d = diffs(&a, &b);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].contains("content differs at offset 41943040"), "{d:?}");
    assert!(sparse_allocated_bytes(&a.join("sparse")) < (1 << 20));
}

#[test]
fn one_xattr() {
    let (_tmp, a, b) = pair();
    set_xattr(&b.join("dir"), "user.big", &[0x56; 2000]);
    let d = diffs(&a, &b);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].starts_with("dir: xattr \"user.big\" differs"), "{d:?}");

    set_xattr(&b.join("dir"), "user.big", &[0x55; 2000]);
    set_xattr(&b.join("dir/sub/c"), "user.extra", b"");
    let d = diffs(&a, &b);
    assert_eq!(
        d,
        vec!["dir/sub/c: unexpected xattr \"user.extra\" in actual".to_string()]
    );
    let no_xattrs = CompareOptions {
        xattrs: false,
        ..Default::default()
    };
    assert!(compare_trees(&a, &b, &no_xattrs).is_empty());
}

#[test]
fn missing_subtree_reported_once() {
    let (_tmp, a, b) = pair();
    fs::remove_dir_all(b.join("dir/sub")).unwrap();
    set_mtime(&b.join("dir"), 1_000_000_000);
    let d = diffs(&a, &b);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(d[0], "dir: nlink differs: expected 3, actual 2");
    assert!(
        d[1].starts_with("dir/sub: missing in actual (directory)"),
        "{d:?}"
    );
    let opts = CompareOptions {
        dir_nlink: false,
        ..Default::default()
    };
    let d = compare_trees(&b, &a, &opts);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(d[0].starts_with("dir/sub: unexpected in actual"), "{d:?}");
}

#[test]
fn type_symlink_target_and_mtime() {
    let (_tmp, a, b) = pair();
    fs::remove_file(b.join("dangling")).unwrap();
    symlink("elsewhere", b.join("dangling")).unwrap();
    set_mtime(&b.join("dangling"), 1_000_000_000);
    set_mtime(&b, 1_000_000_000);
    set_mtime(&b.join("dir/sub"), 5);
    let d = diffs(&a, &b);
    assert_eq!(
        d,
        vec![
            "dangling: size differs: expected 7, actual 9".to_string(),
            "dangling: symlink target differs: expected \"nowhere\", actual \"elsewhere\""
                .to_string(),
            "dir/sub: mtime differs: expected 1000000000, actual 5".to_string(),
        ]
    );
    fs::remove_file(b.join("dangling")).unwrap();
    fs::create_dir(b.join("dangling")).unwrap();
    set_mtime(&b.join("dir/sub"), 1_000_000_000);
    set_mtime(&b, 1_000_000_000);
    let d = diffs(&a, &b);
    assert_eq!(
        d,
        vec![
            ".: nlink differs: expected 3, actual 4".to_string(),
            "dangling: type differs: expected symlink, actual directory".to_string()
        ]
    );
}

#[test]
fn root_mtime_option() {
    let (_tmp, a, b) = pair();
    set_mtime(&b, 7);
    assert_eq!(diffs(&a, &b).len(), 1);
    let opts = CompareOptions {
        root_mtime: false,
        ..Default::default()
    };
    assert!(compare_trees(&a, &b, &opts).is_empty());
}

#[test]
fn hard_link_groups() {
    let (_tmp, a, b) = pair();
    // Same names, same content, but no longer one inode: the group and nlink differ.
    fs::remove_file(b.join("dir/a-link")).unwrap();
    fs::copy(b.join("a.txt"), b.join("dir/a-link")).unwrap();
    set_xattr(&b.join("dir/a-link"), "user.one", b"1");
    for p in ["dir/a-link", "dir"] {
        set_mtime(&b.join(p), 1_000_000_000);
    }
    let opts = CompareOptions {
        nlink: false,
        ..Default::default()
    };
    let d = compare_trees(&a, &b, &opts);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert!(
        d[0].contains("hard-link group differs: expected [a.txt, dir/a-link], actual [a.txt]"),
        "{d:?}"
    );
    let d = diffs(&a, &b);
    assert_eq!(d.len(), 3, "{d:#?}"); // plus nlink of both names
}
