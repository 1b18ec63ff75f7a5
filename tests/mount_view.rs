//! The kernel's squashfs driver is the oracle: every fixture image, mounted by sifuse bare
//! (as a daemon) and inside a SIF (in the foreground), must show exactly what the kernel
//! shows: every stat field, directory order and d_ino, symlink targets, xattrs (with size
//! probes), every byte, and statfs. The kernel cannot mount lzma images; those are compared
//! with the kernel's mount of the gzip image of the same tree (inode numbering does not
//! depend on the compressor; the image size, hence statfs's block count, does).

mod common;
mod mount_util;

use common::fixtures::{fixtures, Fixtures};
use mount_util::{
    assert_no_differences, compare_views, require_mount, scratch, wrap_in_sif, KernelMount,
    SifuseMount, ViewExceptions,
};

/// Every image generate.sh builds; `every_fixture_image_is_compared` keeps this in step.
macro_rules! per_image {
    ($($test:ident => $name:literal,)*) => {
        const IMAGES: &[&str] = &[$($name),*];
        $(
            #[test]
            fn $test() {
                check_image($name);
            }
        )*
    };
}

with_fixture_images!(per_image);

#[test]
fn every_fixture_image_is_compared() {
    require_mount();
    let listed: Vec<&str> = fixtures().images.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        listed, IMAGES,
        "fixtures/generate.sh and this test list different images"
    );
}

fn check_image(name: &str) {
    require_mount();
    let fx = fixtures();
    let image = fx.image(name);
    let (oracle, except) = if Fixtures::kernel_can_mount(name) {
        (image, ViewExceptions::default())
    } else {
        (
            fx.image("gzip"),
            ViewExceptions {
                statfs_blocks: true,
            },
        )
    };
    let kernel = KernelMount::new(oracle);

    let bare = SifuseMount::daemon(image, &[]);
    assert_no_differences(
        &format!("{name}, bare"),
        &compare_views(&kernel.mountpoint, &bare.mountpoint, except),
    );
    drop(bare);

    let dir = scratch(&format!("sif-{name}"));
    let sif = wrap_in_sif(image, dir.path());
    let in_sif = SifuseMount::foreground(&sif, &[]);
    assert_no_differences(
        &format!("{name}, in a SIF"),
        &compare_views(&kernel.mountpoint, &in_sif.mountpoint, except),
    );
}
