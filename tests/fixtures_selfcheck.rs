//! Proves the fixtures and the tree comparator right: every image, extracted by
//! `unsquashfs` and (except lzma) mounted by the kernel's squashfs driver, must be
//! identical to the tree it was built from.

mod common;
#[path = "common/tree_compare_tests.rs"]
mod tree_compare_tests;

use common::fixtures::{fixtures, target_tmpdir, Fixtures};
use common::tree_compare::{compare_trees, sparse_allocated_bytes, CompareOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every image generate.sh builds; `image_list_is_complete` keeps this in step.
macro_rules! per_image {
    ($($test:ident => $name:literal,)*) => {
        const IMAGES: &[&str] = &[$($name),*];
        $(
            mod $test {
                #[test]
                fn unsquashfs_matches_tree() {
                    super::check_unsquashfs($name);
                }
                #[test]
                fn kernel_mount_matches_tree() {
                    super::check_kernel_mount($name);
                }
            }
        )*
    };
}

with_fixture_images!(per_image);

const SPARSE_FILE: &str = "sparse/hole-200m";

fn options_for(name: &str) -> CompareOptions {
    CompareOptions {
        xattrs: Fixtures::has_xattrs(name),
        ..Default::default()
    }
}

fn assert_same(name: &str, how: &str, actual: &Path) {
    let fx = fixtures();
    let diffs = compare_trees(&fx.tree, actual, &options_for(name));
    assert!(
        diffs.is_empty(),
        "image {name} ({how}) differs from the tree in {} ways:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(50)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn scratch(name: &str) -> tempfile::TempDir {
    let base = target_tmpdir();
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("selfcheck-{name}-"))
        .tempdir_in(base)
        .unwrap()
}

fn check_unsquashfs(name: &str) {
    let img = fixtures().image(name);
    let tmp = scratch(name);
    let dest = tmp.path().join("x");
    let out = Command::new("unsquashfs")
        .args(["-quiet", "-no-progress", "-processors", "2", "-dest"])
        .arg(&dest)
        .arg(img)
        .output()
        .expect("run unsquashfs");
    assert!(
        out.status.success(),
        "unsquashfs {} failed: {}\n{}{}",
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(name, "unsquashfs", &dest);
    // unsquashfs leaves holes for sparse blocks.
    if !name.contains("no-sparse") {
        let allocated = sparse_allocated_bytes(&dest.join(SPARSE_FILE));
        // Only the blocks holding data (at most two of up to 1 MiB) take space.
        assert!(
            allocated <= 2 << 20,
            "{SPARSE_FILE} extracted from {name} not sparse: {allocated} bytes"
        );
    }
}

/// A read-only kernel mount of an image, unmounted on drop (also when the test panics).
struct KernelMount {
    dir: PathBuf,
}

impl KernelMount {
    fn new(img: &Path, dir: &Path) -> KernelMount {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "squashfs", "-o", "loop,ro"])
            .arg(img)
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t squashfs -o loop,ro {} {} failed: {}\n{}",
            img.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        KernelMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A loop device has whole 512-byte sectors and drops a partial one at the end, so the
/// kernel cannot mount a `-nopad` image whose last metadata ends there. Mount a zero-padded
/// copy of such an image instead (sifuse reads the file itself and needs no padding).
fn padded_for_loop(img: &Path, scratch: &Path) -> PathBuf {
    let len = std::fs::metadata(img).unwrap().len();
    if len % 4096 == 0 {
        return img.to_path_buf();
    }
    let copy = scratch.join("padded.sqfs");
    std::fs::copy(img, &copy).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(len.next_multiple_of(4096)).unwrap();
    copy
}

fn check_kernel_mount(name: &str) {
    if !Fixtures::kernel_can_mount(name) {
        return; // the kernel has no lzma decompressor for squashfs
    }
    let tmp = scratch(name);
    let img = padded_for_loop(fixtures().image(name), tmp.path());
    let mount = KernelMount::new(&img, &tmp.path().join("mnt"));
    assert_same(name, "kernel mount", &mount.dir);
    drop(mount);
}

#[test]
fn image_list_is_complete() {
    let listed: Vec<&str> = fixtures().images.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        listed, IMAGES,
        "update per_image! in tests/fixtures_selfcheck.rs"
    );
}

#[test]
fn tree_has_a_sparse_file() {
    let fx = fixtures();
    let path = fx.tree.join(SPARSE_FILE);
    assert!(std::fs::metadata(&path).unwrap().len() > 200 << 20);
    assert!(
        sparse_allocated_bytes(&path) < 1 << 20,
        "the tree's {SPARSE_FILE} is not sparse"
    );
}

#[test]
fn tree_compared_with_itself_is_identical() {
    let fx = fixtures();
    assert_eq!(
        compare_trees(&fx.tree, &fx.tree, &CompareOptions::default()),
        Vec::<String>::new()
    );
}
