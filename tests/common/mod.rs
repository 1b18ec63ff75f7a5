//! Helpers shared by the integration tests: `mod common;` in a test file.
#![allow(dead_code)]

pub mod fixtures;
pub mod tree_compare;

/// Calls the macro `$m` with `test_name => "image name",` for every image that
/// fixtures/generate.sh builds, so each test file gets one test per image from one list.
#[macro_export]
macro_rules! with_fixture_images {
    ($m:ident $(, $arg:ident)?) => {
        $m! {
            $($arg;)?
            gzip => "gzip",
            lzo => "lzo",
            lz4 => "lz4",
            lz4_hc => "lz4-hc",
            xz => "xz",
            zstd => "zstd",
            lzma => "lzma",
            gzip_b4k => "gzip-b4k",
            zstd_b1m => "zstd-b1m",
            gzip_no_fragments => "gzip-no-fragments",
            zstd_always_fragments => "zstd-always-fragments",
            zstd_no_xattrs => "zstd-no-xattrs",
            gzip_uncompressed => "gzip-uncompressed",
            gzip_nopad => "gzip-nopad",
            gzip_no_exports => "gzip-no-exports",
            gzip_no_sparse => "gzip-no-sparse",
            zstd_no_duplicates => "zstd-no-duplicates",
            xz_bcj_dict => "xz-bcj-dict",
            gzip_level1_window10 => "gzip-level1-window10",
        }
    };
}

/// One test per fixture image, each calling `$check(image_name)`, and one more that the
/// list names every image fixtures/generate.sh builds.
#[macro_export]
macro_rules! one_test_per_fixture_image {
    ($check:ident) => {
        with_fixture_images!(fixture_image_tests, $check);
    };
}

/// The tests [`one_test_per_fixture_image!`] makes.
#[macro_export]
macro_rules! fixture_image_tests {
    ($check:ident; $($test:ident => $name:literal,)*) => {
        $( #[test] fn $test() { $check($name); } )*

        #[test]
        fn every_image_has_a_test() {
            let mut listed: Vec<&str> = vec![$($name),*];
            let mut built: Vec<&str> = common::fixtures::fixtures()
                .images
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            listed.sort();
            built.sort();
            assert_eq!(listed, built, "update with_fixture_images! in tests/common/mod.rs");
        }
    };
}
